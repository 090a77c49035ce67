"""Keeping secrets out of messages and state files: URLs, headers and free text about a source.

``redact_url`` hides userinfo and secret-looking query values (``?token=``);
``url_key`` is how state files name a URL (its redacted form and, when that hid a secret,
a keyed hash of the whole URL, so two URLs differing only in a token stay distinct);
``state_secret`` is that hash's key, kept in the state folder with mode 0600;
``redact_headers`` hides the values of secret headers (``Authorization``, ``Cookie``,
``X-Api-Key``, any name with token/secret/key/password); ``_secret_values`` lists every
secret string of one source, for scrubbing error texts that may quote them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

from etl.core.durable import PRIVATE_MODE

_SECRET_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key"})
_SECRET_WORDS = ("token", "secret", "key", "password", "signature", "credential")


def is_secret_header(name: str) -> bool:
    low = name.lower()
    return low in _SECRET_HEADERS or any(w in low for w in ("token", "secret", "key", "password"))


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: "***" if is_secret_header(k) else v for k, v in headers.items()}


_USERINFO = re.compile(r"(//)[^/?#]*@")
_SECRET_QUERY = re.compile(r"([?&;][^=&#]*(?:" + "|".join(_SECRET_WORDS) + r")[^=&#]*=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with any userinfo and secret-looking query values (``?token=``) replaced by
    ``***``; a URL too broken to parse (``http://[::1/x``) is redacted by pattern."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", url))
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret_param(k) for k, _ in pairs):
            query = "&".join(f"{quote(k)}={'***' if _is_secret_param(k) else quote(v)}" for k, v in pairs)
    return parts._replace(netloc=netloc, query=query).geturl()


def _is_secret_param(name: str) -> bool:
    return any(w in name.lower() for w in _SECRET_WORDS)


def _secret_values(url: str, headers: Mapping[str, str]) -> list[str]:
    """Every secret string a message about this source could leak, longest first."""
    parts = urlsplit(url)
    found = [v for k, v in headers.items() if is_secret_header(k)]
    found += [p for p in (parts.username, parts.password) if p]
    found += [v for k, v in parse_qsl(parts.query) if _is_secret_param(k)]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


SECRET_FILE = "url.key"  # in the state folder: the key of url_key's hashes
_KEY_HEX = 16  # hex digits of the keyed hash kept in state files: 64 bits tell a job's URLs apart


def url_key(url: str, key: bytes | Callable[[], bytes]) -> str:
    """How a state file names ``url``: the URL itself when it holds no secret; otherwise
    its redacted form plus ``#hmac=`` and a keyed hash of the whole URL (identity without
    the secret, and without a hash that could be brute-forced offline: the key is needed).
    ``key`` may be a function that gives it, called only for a URL that holds a secret."""
    safe = redact_url(url)
    if safe == url:
        return url
    secret = key if isinstance(key, bytes) else key()
    digest = hmac.new(secret, url.encode(), hashlib.sha256).hexdigest()[:_KEY_HEX]
    return f"{safe}#hmac={digest}"


def state_secret(folder: Path) -> bytes:
    """The key of ``url_key`` for one state folder: read from ``<folder>/url.key``, or made
    (32 random bytes, mode 0600, created whole by a hard link so a concurrent reader never
    sees it half-written)."""
    path = folder / SECRET_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{SECRET_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    try:
        os.write(fd, secrets.token_bytes(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process made it first: theirs wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()
