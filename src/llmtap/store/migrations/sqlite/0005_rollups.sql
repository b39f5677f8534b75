-- rollups per tenant x grain x bucket x dimension, with DDSketch latency/TTFT sketches
--
-- Rollups (see llmtap.store.rollup). `rollup_dims` says since when each dimension is rolled
-- up: 0 when the store held no request at that time, else the next minute (older ranges are
-- answered from raw rows).

CREATE TABLE rollups (
    tenant             TEXT NOT NULL,
    grain              TEXT NOT NULL,   -- minute | hour | day
    bucket             INTEGER NOT NULL,  -- bucket start, microseconds since the epoch, UTC
    dim                TEXT NOT NULL, -- '' (all), model, provider, status, property.<name>
    key                TEXT NOT NULL,   -- '' for NULL, else '=' || value
    count              INTEGER NOT NULL,
    error_count        INTEGER NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    total_tokens       INTEGER NOT NULL,
    cached_tokens      INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    reasoning_tokens   INTEGER NOT NULL,
    cost_nanos         INTEGER NOT NULL,
    unpriced_count     INTEGER NOT NULL,
    first_at           INTEGER,
    last_at            INTEGER,
    latency            BLOB,            -- llmtap.store.sketch wire format (DDSketch bins)
    ttft               BLOB,
    PRIMARY KEY (tenant, grain, dim, bucket, key)
);
CREATE TABLE rollup_dims (dim TEXT PRIMARY KEY, since INTEGER NOT NULL);
INSERT INTO rollup_dims (dim, since)
    SELECT d.column1, CASE WHEN EXISTS (SELECT 1 FROM requests)
        THEN (CAST(strftime('%s', 'now') AS INTEGER) / 60 + 1) * 60000000 ELSE 0 END
    FROM (VALUES (''), ('model'), ('provider'), ('status')) AS d
