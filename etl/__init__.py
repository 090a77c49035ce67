"""Batch ETL: async downloads, threaded disk I/O and multiprocess pandas transforms.

The public Python API (``etl.api``)::

    import etl

    result = etl.run_job("job.toml", overrides=["transform.workers=2"])
    print(result.exit_code, result.summary.rows_out if result.summary else result.error)

Names are imported on first use, so ``import etl`` stays cheap for worker processes,
which import only what a chunk needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

__all__ = [
    "ConfigError",
    "ETLError",
    "ExitCode",
    "JobConfig",
    "RunResult",
    "__version__",
    "load_job",
    "run_job",
]

_WHERE = {
    "run_job": "etl.api",
    "RunResult": "etl.api",
    "load_job": "etl.core.config",
    "JobConfig": "etl.core.config",
    "ETLError": "etl.core.errors",
    "ConfigError": "etl.core.errors",
    "ExitCode": "etl.core.errors",
}

if TYPE_CHECKING:
    from etl.api import RunResult, run_job
    from etl.core.config import JobConfig, load_job
    from etl.core.errors import ConfigError, ETLError, ExitCode


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'etl' has no attribute {name!r}")
