"""Keeping secrets out of messages: URLs, headers and free text about a source.

``redact_url`` hides userinfo and secret-looking query values (``?token=``);
``redact_headers`` hides the values of secret headers (``Authorization``, ``Cookie``,
``X-Api-Key``, any name with token/secret/key/password); ``_secret_values`` lists every
secret string of one source, for scrubbing error texts that may quote them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote, urlsplit

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
