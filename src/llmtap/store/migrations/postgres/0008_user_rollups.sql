-- per-user day totals in the rollups (dimension user_id, no sketches)
--
-- As SQLite's version 9: from this version the writer adds each new request to a `rollups`
-- row of dimension `user_id` at the day grain (totals only: latency and ttft are NULL), and
-- retention subtracts it (see llmtap.store.rollup.USER_DIM). Its coverage starts now: 0 when
-- the store holds no request, else the next minute (older ranges are answered from raw rows).

INSERT INTO rollup_dims (dim, since)
    SELECT 'user_id', CASE WHEN EXISTS (SELECT 1 FROM request_keys)
        THEN (floor(extract(epoch FROM now()) / 60)::bigint + 1) * 60000000 ELSE 0 END
ON CONFLICT DO NOTHING;
