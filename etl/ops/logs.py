"""Logging set-up: readable lines by default, one JSON object per line with ``--log-format json``.

Every record may carry ``stage`` and ``source`` (pass them in ``extra=``); the run id is
added to every record by a filter, so a JSON log line always says which run wrote it.
Every other ``extra=`` field (a retry's ``url``, ``attempt``, ``delay``, ``reason``; the
end-of-run ``summary``) becomes a key of the JSON object.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

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


# What every LogRecord carries by itself; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "where"}
_CORE_KEYS = ("time", "level", "stage", "source", "message", "run_id", "logger")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: the core keys, then every ``extra=`` field by its own
    name (a field that would shadow a core key is written as ``extra_<name>``). Values
    JSON cannot hold are written as their ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "stage": getattr(record, "stage", ""),
            "source": getattr(record, "source", ""),
            "message": record.getMessage(),
            "run_id": getattr(record, "run_id", ""),
            "logger": record.name,
        }
        for key, value in vars(record).items():
            if key in _RECORD_ATTRS or key in ("stage", "source", "run_id"):
                continue
            entry[f"extra_{key}" if key in _CORE_KEYS or key == "traceback" else key] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


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
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))  # a new log: owner only
        handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RunContext(run_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
