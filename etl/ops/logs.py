"""Logging set-up: readable lines by default, one JSON object per line with ``--log-format json``.

Every record may carry ``stage`` and ``source`` (pass them in ``extra=``); the run id is
added to every record by a filter, so a JSON log line always says which run wrote it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

LogFormat = Literal["text", "json"]


class _RunContext(logging.Filter):
    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = self.run_id
        record.stage = getattr(record, "stage", "")
        record.source = getattr(record, "source", "")
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "stage": record.stage,  # type: ignore[attr-defined]  # set on every record by _RunContext; LogRecord does not declare it
            "source": record.source,  # type: ignore[attr-defined]  # set on every record by _RunContext; LogRecord does not declare it
            "message": record.getMessage(),
            "run_id": record.run_id,  # type: ignore[attr-defined]  # set on every record by _RunContext; LogRecord does not declare it
            "logger": record.name,
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(where)s%(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        stage, source = getattr(record, "stage", ""), getattr(record, "source", "")
        record.where = (f"[{stage}] " if stage else "") + (f"{source}: " if source else "")
        return super().format(record)


def setup_logging(level: str = "INFO", fmt: LogFormat = "text", log_file: Path | None = None, run_id: str = "") -> None:
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RunContext(run_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
