"""``python -m etl …``: the same command line as ``python run.py …``."""

from etl.cli import run_and_exit

if __name__ == "__main__":
    run_and_exit(prog="python -m etl")
