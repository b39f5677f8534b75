-- rollups per tenant x grain x bucket x dimension, with DDSketch latency/TTFT sketches
--
-- Rollups (see llmtap.store.rollup). `rollup_dims` says since when each dimension is rolled
-- up: 0 when the store held no request at that time, else the next minute (older ranges are
-- answered from raw rows). Keys (user ids, property values) may be long: unique by hash, as
-- in version 2.

CREATE TABLE rollups (
    tenant             text COLLATE "C" NOT NULL,
    grain              text COLLATE "C" NOT NULL,   -- minute | hour | day
    bucket             bigint NOT NULL,  -- bucket start, microseconds since the epoch, UTC
    dim                text COLLATE "C" NOT NULL, -- '', model, provider, status, property.<name>
    key                text COLLATE "C" NOT NULL,   -- '' for NULL, else '=' || value
    count              bigint NOT NULL,
    error_count        bigint NOT NULL,
    prompt_tokens      bigint NOT NULL,
    completion_tokens  bigint NOT NULL,
    total_tokens       bigint NOT NULL,
    cached_tokens      bigint NOT NULL,
    cache_write_tokens bigint NOT NULL,
    reasoning_tokens   bigint NOT NULL,
    cost_nanos         bigint NOT NULL,
    unpriced_count     bigint NOT NULL,
    first_at           bigint,
    last_at            bigint,
    latency            bytea,            -- llmtap.store.sketch wire format (DDSketch bins)
    ttft               bytea
);
CREATE UNIQUE INDEX rollups_key ON rollups (tenant, grain, dim, bucket, llmtap_hash(key));
CREATE TABLE rollup_dims (dim text PRIMARY KEY, since bigint NOT NULL);
INSERT INTO rollup_dims (dim, since)
    SELECT d, CASE WHEN EXISTS (SELECT 1 FROM request_keys)
        THEN (floor(extract(epoch FROM now()) / 60)::bigint + 1) * 60000000 ELSE 0 END
    FROM unnest(ARRAY['', 'model', 'provider', 'status']) AS d;
