"""Batch ETL: async downloads, threaded disk I/O and multiprocess pandas transforms."""

__version__ = "0.2.0"
