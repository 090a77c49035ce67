"""The operator surface beside the CLI: cron lines, reports, logs, progress, bench, test data and server."""
