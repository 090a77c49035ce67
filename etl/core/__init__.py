"""The shared core every stage may import: job model, errors, records, queues, stats and small helpers."""
