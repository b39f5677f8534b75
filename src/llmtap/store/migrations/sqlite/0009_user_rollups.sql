-- per-user day totals in the rollups (dimension user_id, no sketches)
--
-- From this version the writer adds each new request to a `rollups` row of dimension
-- `user_id` at the day grain (totals only: latency and ttft are NULL), and retention subtracts
-- it (see llmtap.store.rollup.USER_DIM). Its coverage starts now: 0 when the store holds no
-- request, else the next minute (older ranges are answered from raw rows). No new table: the
-- rollups' primary key (tenant, grain, dim, bucket, key) reads a range of user days in order.

INSERT OR IGNORE INTO rollup_dims (dim, since)
    SELECT 'user_id', CASE WHEN EXISTS (SELECT 1 FROM requests)
        THEN (CAST(strftime('%s', 'now') AS INTEGER) / 60 + 1) * 60000000 ELSE 0 END
