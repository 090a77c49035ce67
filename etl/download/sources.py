"""Expand the job's ``[sources]`` section into the flat, ordered list of files to process.

In: a validated ``JobConfig``. Out: ``list[Source]``, one per file, ``Source.index`` equal
to its position. Everything is checked here, at start-up, before any work begins; a
problem raises ``ConfigError`` naming the key (``sources.urls[2]``) or the listing file
and line, the rule, and the value.

What each key accepts:

* ``sources.urls``: ``http(s)://`` URLs, ``file://`` URLs, object-store URLs (``s3://``,
  globs and ``prefix/`` listings: see ``etl.download.objects``) and local paths (relative to
  the job file's folder; ``~`` expanded). Numeric ranges ``part-{000..007}.csv`` expand
  in URLs and paths (zero padding kept; several ranges give their product, leftmost
  slowest). Local paths may be globs (``data/*.csv``, ``**`` recursive), matched in
  sorted order; a glob that matches nothing is an error.
* ``sources.files``: one entry per file with an optional ``sha256``/``md5`` and headers.
  Ranges and globs expand here too, but a checksum must then name exactly one file.
* ``sources.urls_file``: one URL or path per line, optionally followed by a checksum
  (64 hex digits = SHA-256, or ``md5:<32 hex>``). ``#`` starts a comment. Lines are
  taken literally (no ranges or globs); relative paths resolve against the listing
  file's folder.

The format comes from ``sources.format`` or the file extension. Names are file names,
made unique: sources that share a file name get a short hash of their URL in front.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from etl.core.config import JobConfig
from etl.core.errors import ConfigError
from etl.core.objstore import is_object_url
from etl.core.records import Format, Source
from etl.core.redact import redact_url
from etl.download import objects as objectstore

MAX_SOURCES = 1_000_000  # guards against a typo like {0..99999999}; raise it if a job needs more

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE_NAME_CHARS = re.compile(r"[^\w.+=@,-]")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_MD5 = re.compile(r"^md5:([0-9a-fA-F]{32})$", re.IGNORECASE)

_FORMATS: dict[str, Format] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2")


@dataclass(frozen=True)
class _Item:
    """One file before names and indexes are assigned; ``where`` names its origin for errors."""

    url: str  # http(s) URL or absolute local path
    where: str  # sources.urls[3], or urls.txt:12
    file: str  # the file to name in a ConfigError (job file or listing file)
    sha256: str | None = None
    md5: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


def expand_sources(cfg: JobConfig) -> list[Source]:
    """Every source file of the job, in order. Raises ``ConfigError`` on any bad entry."""
    job_file = str(cfg.file)
    items: list[_Item] = []
    for i, text in enumerate(cfg.sources.urls):
        where = f"sources.urls[{i}]"
        items += (_Item(url, where, job_file) for url in _expand(text, cfg.base_dir, where, job_file))
    for i, entry in enumerate(cfg.sources.files):
        where = f"sources.files[{i}].url"
        urls = _expand(entry.url, cfg.base_dir, where, job_file)
        if (entry.sha256 or entry.md5) and len(urls) > 1:
            raise ConfigError(
                f"a checksum applies to one file, but {entry.url!r} expands to {len(urls)} files",
                key=where,
                file=job_file,
            )
        headers = tuple(entry.headers.items())
        sha, md5 = _lower(entry.sha256), _lower(entry.md5)
        items += (_Item(u, where, job_file, sha, md5, headers) for u in urls)
    if cfg.sources.urls_file is not None:
        items += _read_urls_file(Path(cfg.sources.urls_file))
    if not items:
        raise ConfigError(
            "no sources: give sources.urls, sources.files or sources.urls_file", key="sources", file=job_file
        )
    if len(items) > MAX_SOURCES:
        raise ConfigError(f"{len(items)} sources is more than the limit of {MAX_SOURCES}", key="sources", file=job_file)
    _check_duplicates(items)
    _check_credentials(items, cfg.download.headers)
    names = _unique_names(items)
    return [
        Source(
            index=i,
            url=it.url,
            name=names[i],
            format=_format(it, names[i], cfg.sources.format),
            sha256=it.sha256,
            md5=it.md5,
            headers=it.headers,
        )
        for i, it in enumerate(items)
    ]


# ------------------------------------------------------------------- ranges and globs


def expand_ranges(text: str) -> list[str]:
    """``a{01..03}b`` → ``['a01b', 'a02b', 'a03b']``; several ranges give their product.

    Raises ``ValueError`` stating the rule when a range runs backwards or the expansion
    would pass ``MAX_SOURCES`` (checked before anything is built).
    """
    parts = _RANGE.split(text)  # literal, start, end, literal, start, end, ..., literal
    bounds = [(parts[k + 1], parts[k + 2]) for k in range(0, len(parts) - 1, 3)]
    if (count := math.prod(int(b) - int(a) + 1 for a, b in bounds)) > MAX_SOURCES:
        raise ValueError(f"the ranges expand to {count} names, more than the limit of {MAX_SOURCES}")
    choices: list[list[str]] = []
    for k in range(0, len(parts) - 1, 3):
        start, end = parts[k + 1], parts[k + 2]
        if int(start) > int(end):
            raise ValueError(f"range {{{start}..{end}}} runs backwards; write the smaller number first")
        padded = (start.startswith("0") and len(start) > 1) or (end.startswith("0") and len(end) > 1)
        width = max(len(start), len(end)) if padded else 0
        choices.append([parts[k]])
        choices.append([str(n).zfill(width) for n in range(int(start), int(end) + 1)])
    choices.append([parts[-1]])
    return ["".join(combo) for combo in itertools.product(*choices)]


def _expand(text: str, base_dir: Path, where: str, file: str) -> list[str]:
    """One config entry → absolute local paths or http(s) URLs."""
    try:
        expanded = expand_ranges(text)
    except ValueError as e:
        raise ConfigError(f"{e} (in {text!r})", key=where, file=file) from None
    out: list[str] = []
    for one in expanded:
        if _is_remote(one):
            _check_url(one, where, file)
            out.append(_lower_scheme(one))
            continue
        if is_object_url(one):  # s3://bucket/key, globs and prefixes listed at start-up
            out += objectstore.expand(one, where=where, file=file)
            continue
        path = _local_path(one, base_dir)
        if _GLOB_CHARS.search(path) and not os.path.isfile(path):  # data[1].csv may be a real name
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"the pattern {path!r} matches no files", key=where, file=file)
            out += matches
        elif not os.path.isfile(path):
            raise ConfigError(f"local file not found: {path}", key=where, file=file)
        else:
            out.append(path)
    return out


def _check_url(url: str, where: str, file: str) -> None:
    """A URL that cannot be parsed (an unclosed IPv6 bracket, a port out of range) is a
    config error naming the key, before anything else reads it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check: out of range raises ValueError
    except ValueError as e:
        raise ConfigError(f"not a valid URL: {redact_url(url)} ({e})", key=where, file=file) from None
    if not parts.hostname:
        raise ConfigError(f"not a valid URL: {redact_url(url)} (no host name)", key=where, file=file)


def _is_remote(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


def _lower_scheme(url: str) -> str:
    """``HTTPS://h/a.csv`` → ``https://h/a.csv``: ``Source.is_remote`` expects a lower-case scheme."""
    scheme, rest = url.split(":", 1)
    return f"{scheme.lower()}:{rest}"


def _local_path(text: str, base_dir: Path) -> str:
    """A ``file://`` URL or a path → an absolute, normalised path (symlinks kept)."""
    if text.lower().startswith("file://"):
        text = url2pathname(unquote(urlsplit(text).path))
    path = os.path.expanduser(text)
    return os.path.abspath(os.path.join(base_dir, path))


# ----------------------------------------------------------------------- urls_file


def _read_urls_file(path: Path) -> list[_Item]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError("the urls_file does not exist", key="sources.urls_file", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        message = f"cannot read the urls_file: {e}"
        raise ConfigError(message, key="sources.urls_file", file=str(path)) from None
    return list(_parse_lines(lines, path))


def _parse_lines(lines: list[str], path: Path) -> Iterator[_Item]:
    for n, raw in enumerate(lines, start=1):
        # '#' starts a comment anywhere: a URL fragment is never sent to the server anyway.
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{n}"
        if len(fields) > 2:
            raise ConfigError(
                f"expected 'URL [sha256 | md5:<hex>]', got {len(fields)} fields: "
                f"{' '.join(redact_url(f) for f in fields)!r}",
                key="sources.urls_file",
                file=where,
            )
        url = fields[0]
        sha256, md5 = _parse_checksum(fields[1], where) if len(fields) == 2 else (None, None)
        if _is_remote(url):
            _check_url(url, "sources.urls_file", where)
            url = _lower_scheme(url)
        else:
            url = _local_path(url, path.parent)
            if not os.path.isfile(url):
                raise ConfigError(f"local file not found: {url}", key="sources.urls_file", file=where)
        yield _Item(url, where, where, sha256, md5)


def _parse_checksum(text: str, where: str) -> tuple[str | None, str | None]:
    if _SHA256.match(text):
        return text.lower(), None
    if m := _MD5.match(text):
        return None, m.group(1).lower()
    raise ConfigError(
        f"the second column must be a sha256 (64 hex digits) or md5:<32 hex digits>, got {text!r}",
        key="sources.urls_file",
        file=where,
    )


# -------------------------------------------------------------------- names, format


def _check_duplicates(items: list[_Item]) -> None:
    seen: dict[str, _Item] = {}
    for it in items:
        if (first := seen.get(it.url)) is not None:
            raise ConfigError(
                f"duplicate source {redact_url(it.url)} (also listed at {first.where}); each file may appear once",
                key=it.where,
                file=it.file,
            )
        seen[it.url] = it


def _check_credentials(items: list[_Item], common: dict[str, str]) -> None:
    """aiohttp refuses a request with both URL credentials and an Authorization header."""
    for it in items:
        if not _is_remote(it.url) or "@" not in urlsplit(it.url).netloc:
            continue
        names = {k.lower() for k in common} | {k.lower() for k, _ in it.headers}
        if "authorization" in names:
            raise ConfigError(
                f"{redact_url(it.url)} has credentials in the URL and an Authorization header "
                "is set too; give one or the other",
                key=it.where,
                file=it.file,
            )


def _base_name(url: str) -> str:
    path = urlsplit(url).path if _is_remote(url) else url
    name = unquote(path.rstrip("/").rsplit("/", 1)[-1])
    return _UNSAFE_NAME_CHARS.sub("_", name)


def _unique_names(items: list[_Item]) -> list[str]:
    names = []
    for it in items:
        name = _base_name(it.url)
        if name in ("", ".", ".."):
            raise ConfigError(f"{redact_url(it.url)} does not end in a file name", key=it.where, file=it.file)
        names.append(name)
    counts = Counter(names)
    return [
        f"{hashlib.sha256(it.url.encode()).hexdigest()[:8]}-{name}" if counts[name] > 1 else name
        for it, name in zip(items, names)
    ]


def _format(item: _Item, name: str, configured: Format | Literal["auto"]) -> Format:
    if configured != "auto":
        return configured
    stem = name.lower()
    for comp in _COMPRESSIONS:
        if stem.endswith(comp):
            stem = stem[: -len(comp)]
            break
    for ext, fmt in _FORMATS.items():
        if stem.endswith(ext):
            return fmt
    raise ConfigError(
        f"cannot tell the format of {name!r} from its extension; known extensions: "
        f"{', '.join(_FORMATS)}, each optionally followed by {', '.join(_COMPRESSIONS)} "
        "(or set sources.format)",
        key=item.where,
        file=item.file,
    )


def _lower(value: str | None) -> str | None:
    return value.lower() if value else None
