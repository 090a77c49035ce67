"""Running the download stage in tests: a fast config, payloads, and the stage run to its end
(every staged file) or to its error."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from etl.core.config import DownloadConfig, Retry, Timeout
from etl.core.errors import SourceError
from etl.core.queues import BoundedQueue
from etl.core.records import Source, StagedFile
from etl.download.fetch import DownloadStats
from etl.download.stage import download_stage

FAST = DownloadConfig(
    retry=Retry(attempts=5, backoff=0.01, backoff_max=0.05, max_time=20),
    timeout=Timeout(connect=2, read=2, total=20),
    chunk_bytes=4096,
)


def payload(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remote(url: str, name: str, index: int = 0, **kw: object) -> Source:
    return Source(index=index, url=url, name=name, format="csv", **kw)  # type: ignore[arg-type]


class Sink:
    def __init__(self) -> None:
        self.items = 0
        self.nbytes = 0

    def update(self, items: int = 0, nbytes: int = 0) -> None:
        self.items += items
        self.nbytes += nbytes


async def run(
    sources: list[Source], staging: Path, cfg: DownloadConfig = FAST, **kw: object
) -> tuple[DownloadStats, list[StagedFile]]:
    out: BoundedQueue[StagedFile] = BoundedQueue("files", 100, 1 << 40)
    stats = await download_stage(sources, cfg, staging, out, **kw)  # type: ignore[arg-type]
    return stats, [f async for f in out]  # ends only because the stage closed the queue


async def fails(
    sources: list[Source], staging: Path, cfg: DownloadConfig = FAST, **kw: object
) -> tuple[SourceError, BoundedQueue[StagedFile]]:
    out: BoundedQueue[StagedFile] = BoundedQueue("files", 100, 1 << 40)
    with pytest.raises(SourceError) as info:
        await download_stage(sources, cfg, staging, out, **kw)  # type: ignore[arg-type]
    return info.value, out


def retry_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "etl.download" and hasattr(r, "delay")]
