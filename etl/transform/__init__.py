"""The transform stage: chunks in, encoded results out (process, thread, serial or Dask executor)."""
