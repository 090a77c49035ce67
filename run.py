#!/usr/bin/env python3
"""Entry point: ``python run.py --config job.toml`` (see ``python run.py --help``)."""

from etl.cli import run_and_exit

if __name__ == "__main__":
    run_and_exit()
