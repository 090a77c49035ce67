#!/usr/bin/env python3
"""Entry point: ``python run.py --config job.toml`` (see ``python run.py --help``)."""

import sys

from etl.cli import main

if __name__ == "__main__":
    sys.exit(main())
