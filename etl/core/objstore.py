"""Object storage through fsspec: which URLs are object URLs, and the filesystem for one.

Any ``scheme://`` URL other than http(s) and file goes through fsspec, so every installed
implementation works (``s3://`` with s3fs, the ``s3`` extra; ``gs://`` with gcsfs,
``memory://`` built in). Credentials come only from the environment, as the SDKs read
them (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, ``AWS_REGION``); a custom endpoint (MinIO, Ceph, moto) from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``. Never from the job file.

Used by the download stage for sources (``etl.download.objects``) and by the write stage
for outputs (``etl.write.objects``).
"""

from __future__ import annotations

import os
import re
from typing import Any, cast

from etl.core.errors import ConfigError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL_SCHEMES = frozenset({"http", "https", "file"})


def is_object_url(text: str) -> bool:
    """``s3://b/k`` and other fsspec URLs; not http(s)://, not file://, not a local path."""
    m = _URL.match(text)
    return m is not None and m.group(1).lower() not in _LOCAL_SCHEMES


def storage_options(protocol: str) -> dict[str, Any]:
    """Options from the environment only (the job file never holds credentials)."""
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def filesystem(url: str, *, key: str, file: str = "") -> tuple[Any, str]:
    """(fsspec filesystem, path without the scheme) for ``url``; ``ConfigError`` names ``key``
    when no installed package handles its scheme."""
    try:
        import fsspec
    except ImportError:
        raise ConfigError(f"{url!r} needs fsspec: pip install 'cronetl[s3]'", key=key, file=file) from None
    m = _URL.match(url)
    assert m is not None, f"not an object URL: {url!r}"  # callers check is_object_url first
    protocol = m.group(1).lower()
    try:
        return cast("tuple[Any, str]", fsspec.core.url_to_fs(url, **storage_options(protocol)))
    except (ImportError, ValueError) as e:
        hint = " (pip install 'cronetl[s3]')" if protocol.startswith("s3") else ""
        raise ConfigError(f"cannot open {protocol}:// URLs: {e}{hint}", key=key, file=file) from None


def store_errors() -> tuple[type[BaseException], ...]:
    """What a filesystem call raises besides OSError (botocore's own errors, e.g. no credentials)."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError)


def url_of(fs: Any, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{path}"
