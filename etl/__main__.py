"""``python -m etl …``: the same command line as ``python run.py …``."""

import sys

from etl.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m etl"))
