"""The zeotwist server: StorageServer, per-connection sessions, twistd glue."""
