"""The read stage: staged files in, chunks out (reader threads)."""
