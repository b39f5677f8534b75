-- per-user day totals in the rollups (dimension user_id, no sketches)
--
-- From this version the writer adds each new request to a `rollups` row of dimension
-- `user_id` at the day grain (totals only: latency and ttft are NULL), and retention subtracts
-- it (see llmtap.store.rollup.USER_DIM). Its coverage starts now: 0 when the store holds no
-- request, else the next minute (older ranges are answered from raw rows).
-- `rollups_users` holds those rows' values in (tenant, bucket) order, so the sums per user of a
-- range read the index alone (30 days of 10k users: ~300k entries), no other rollup row. Grain
-- and dim are in it although constant: SQLite 3.40 reads a column its partial index's WHERE
-- fixes from the table (measured at 1M requests, all-time users: 1.3-1.8 s through the primary
-- key, 0.5-0.65 s through this index without them).

INSERT OR IGNORE INTO rollup_dims (dim, since)
    SELECT 'user_id', CASE WHEN EXISTS (SELECT 1 FROM requests)
        THEN (CAST(strftime('%s', 'now') AS INTEGER) / 60 + 1) * 60000000 ELSE 0 END;
CREATE INDEX rollups_users ON rollups (tenant, grain, dim, bucket, key, count, error_count, prompt_tokens,
    completion_tokens, total_tokens, cached_tokens, cache_write_tokens, reasoning_tokens,
    cost_nanos, unpriced_count, first_at, last_at)
    WHERE grain = 'day' AND dim = 'user_id'
