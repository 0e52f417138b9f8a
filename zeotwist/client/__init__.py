"""The zeotwist client: the Deferred API, its cache, and the blocking ClientStorage."""
