"""Batch ETL: async downloads, threaded disk I/O and multiprocess pandas transforms."""
