-- per-user month totals in the rollups, beside the day ones
--
-- From this version the writer adds each new request to a `rollups` row of dimension
-- `user_id` at the month grain too (bucket: the UTC calendar month's start), and retention
-- subtracts it (see llmtap.store.rollup.user_parts: a range reads whole months from these,
-- less the days outside it). Built here from the day rows, so each month row is exactly the sum
-- of its days, as the reads that subtract days from it assume.
-- `rollups_user_months` holds them as `rollups_users` holds the day rows.

INSERT INTO rollups (tenant, grain, bucket, dim, key, count, error_count, prompt_tokens,
    completion_tokens, total_tokens, cached_tokens, cache_write_tokens, reasoning_tokens,
    cost_nanos, unpriced_count, first_at, last_at, latency, ttft)
SELECT tenant, 'month',
    CAST(strftime('%s', bucket / 1000000, 'unixepoch', 'start of month') AS INTEGER) * 1000000,
    dim, key, sum(count), sum(error_count), sum(prompt_tokens), sum(completion_tokens),
    sum(total_tokens), sum(cached_tokens), sum(cache_write_tokens), sum(reasoning_tokens),
    sum(cost_nanos), sum(unpriced_count), min(first_at), max(last_at), NULL, NULL
FROM rollups WHERE grain = 'day' AND dim = 'user_id'
GROUP BY tenant, 3, dim, key;
CREATE INDEX rollups_user_months ON rollups (tenant, grain, dim, bucket, key, count, error_count,
    prompt_tokens, completion_tokens, total_tokens, cached_tokens, cache_write_tokens,
    reasoning_tokens, cost_nanos, unpriced_count, first_at, last_at)
    WHERE grain = 'month' AND dim = 'user_id'
