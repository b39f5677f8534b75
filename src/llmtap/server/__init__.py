"""`llmtap server`: the query API, the dashboard and the fallback ingest endpoint, over the store."""
