-- per-user day totals in the rollups (dimension user_id, no sketches)
--
-- As SQLite's version 9: from this version the writer adds each new request to a `rollups`
-- row of dimension `user_id` at the day grain (totals only: latency and ttft are NULL), and
-- retention subtracts it (see llmtap.store.rollup.USER_DIM). Its coverage starts now: 0 when
-- the store holds no request, else the next minute (older ranges are answered from raw rows).
-- `rollups_users` holds those rows' values in (tenant, bucket) order, so the sums per user of a
-- range are an index-only scan (30 days of 10k users: ~300k entries, 45 MB; measured at 1M
-- requests: 0.7 s through the table, 0.3 s through this index). An index entry is limited to
-- ~2.7 KB and the key is a client's user id: keys over 1024 bytes (llmtap.store.rollup.
-- USERS_INDEX_MAX_KEY) are left to `rollups_users_long`, which holds the few rows that have
-- them (no insert can fail on a long user id; see version 2).

INSERT INTO rollup_dims (dim, since)
    SELECT 'user_id', CASE WHEN EXISTS (SELECT 1 FROM request_keys)
        THEN (floor(extract(epoch FROM now()) / 60)::bigint + 1) * 60000000 ELSE 0 END
ON CONFLICT DO NOTHING;
CREATE INDEX rollups_users ON rollups (tenant, bucket) INCLUDE (key, count, error_count,
    prompt_tokens, completion_tokens, total_tokens, cached_tokens, cache_write_tokens,
    reasoning_tokens, cost_nanos, unpriced_count, first_at, last_at)
    WHERE grain = 'day' AND dim = 'user_id' AND octet_length(key) <= 1024;
CREATE INDEX rollups_users_long ON rollups (tenant, bucket)
    WHERE grain = 'day' AND dim = 'user_id' AND octet_length(key) > 1024;
