-- per-user month totals in the rollups, beside the day ones
--
-- As SQLite's version 11: from this version the writer adds each new request to a `rollups`
-- row of dimension `user_id` at the month grain too (bucket: the UTC calendar month's start),
-- and retention subtracts it (see llmtap.store.rollup.user_parts: a range reads whole months
-- from these, less the days outside it). Built here from the day rows, so each month row is
-- exactly the sum of its days, as the reads that subtract days from it assume.
-- `rollups_user_months` (and `_long`, for keys over 1024 bytes) hold them as `rollups_users`
-- holds the day rows.

INSERT INTO rollups (tenant, grain, bucket, dim, key, count, error_count, prompt_tokens,
    completion_tokens, total_tokens, cached_tokens, cache_write_tokens, reasoning_tokens,
    cost_nanos, unpriced_count, first_at, last_at, latency, ttft)
SELECT tenant, 'month', m, dim, key, sum(count), sum(error_count), sum(prompt_tokens),
    sum(completion_tokens), sum(total_tokens), sum(cached_tokens), sum(cache_write_tokens),
    sum(reasoning_tokens), sum(cost_nanos), sum(unpriced_count), min(first_at), max(last_at),
    NULL, NULL
FROM (SELECT *, (extract(epoch FROM date_trunc('month', to_timestamp(bucket / 1000000)
        AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'))::bigint * 1000000 AS m
      FROM rollups WHERE grain = 'day' AND dim = 'user_id') AS d
GROUP BY tenant, m, dim, key;
CREATE INDEX rollups_user_months ON rollups (tenant, bucket) INCLUDE (key, count, error_count,
    prompt_tokens, completion_tokens, total_tokens, cached_tokens, cache_write_tokens,
    reasoning_tokens, cost_nanos, unpriced_count, first_at, last_at)
    WHERE grain = 'month' AND dim = 'user_id' AND octet_length(key) <= 1024;
CREATE INDEX rollups_user_months_long ON rollups (tenant, bucket)
    WHERE grain = 'month' AND dim = 'user_id' AND octet_length(key) > 1024;
