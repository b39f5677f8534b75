"""Schema migrations, versioned and forward-only: `(version, description, sql)`.

Kept as Python strings (not .sql files) so they ship inside the wheel with no package-data
configuration. Append new versions; never edit an applied one.

Both schemas have the same columns. PostgreSQL differences:

- `requests` and `request_properties` are range-partitioned by `created_at` (one partition per
  month, created on demand by the writer) so that list queries on recent data touch small indexes
  and retention drops whole partitions instead of deleting rows one by one.
- A unique index on a partitioned table must include the partition key, so `(tenant, id)`
  uniqueness — one row per request id — lives in the small unpartitioned `request_keys` table;
  the writer inserts there first and only rows whose key was new reach `requests`.
- Text columns that are sorted or grouped use the "C" collation so ordering is bytewise, exactly
  as SQLite's BINARY collation (the two stores must give the same answers).
- Since version 2, client-chosen text (request id, user and session id, model, property names
  and values) is indexed by `llmtap_hash(value)`, never by the value itself: a B-tree entry is
  limited to ~2.7 KB, and a longer value failed the insert, sending its record to the dead-letter
  queue for good. Queries compare the hash (index) *and* the value (exactness). SQLite has no
  such limit (long keys overflow to other pages), so its indexes keep the values.
"""

from __future__ import annotations

POSTGRES: list[tuple[int, str, str]] = [
    (
        1,
        "requests, request keys, properties side table, API keys",
        """
CREATE TABLE request_keys (
    tenant      text COLLATE "C" NOT NULL,
    id          text COLLATE "C" NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX request_keys_created ON request_keys (created_at);

CREATE TABLE requests (
    tenant             text COLLATE "C" NOT NULL,
    id                 text COLLATE "C" NOT NULL,
    created_at         timestamptz NOT NULL,
    provider           text COLLATE "C" NOT NULL,
    model              text COLLATE "C",
    method             text NOT NULL,
    path               text NOT NULL,
    target_url         text NOT NULL,
    status             integer,
    outcome            text COLLATE "C" NOT NULL,
    error              text,
    streamed           boolean NOT NULL,
    latency_ms         double precision NOT NULL,
    ttft_ms            double precision,
    prompt_tokens      bigint,
    completion_tokens  bigint,
    total_tokens       bigint,
    cached_tokens      bigint,
    cache_write_tokens bigint,
    reasoning_tokens   bigint,
    usage_source       text NOT NULL,
    cost_nanos         bigint,
    price_version      text,
    user_id            text COLLATE "C",
    session_id         text COLLATE "C",
    properties         jsonb NOT NULL,
    request_headers    jsonb NOT NULL,
    response_headers   jsonb NOT NULL,
    request_body       jsonb,
    response_body      jsonb,
    response_events    jsonb,
    route              text NOT NULL,
    first_byte_at      timestamptz,
    ended_at           timestamptz,
    gateway            text
) PARTITION BY RANGE (created_at);
CREATE INDEX requests_tenant_created ON requests (tenant, created_at DESC, id DESC);
CREATE INDEX requests_tenant_user ON requests (tenant, user_id, created_at DESC, id DESC);
CREATE INDEX requests_tenant_session ON requests (tenant, session_id, created_at DESC, id DESC);
CREATE INDEX requests_tenant_model ON requests (tenant, model, created_at DESC, id DESC);
-- retention deletes by age across tenants inside the partition that straddles the cutoff
CREATE INDEX requests_created_brin ON requests USING brin (created_at);

CREATE TABLE request_properties (
    tenant      text COLLATE "C" NOT NULL,
    request_id  text COLLATE "C" NOT NULL,
    created_at  timestamptz NOT NULL,
    name        text COLLATE "C" NOT NULL,
    value       text COLLATE "C" NOT NULL
) PARTITION BY RANGE (created_at);
CREATE INDEX request_properties_lookup
    ON request_properties (tenant, name, value, created_at DESC, request_id DESC);

CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    tenant      text COLLATE "C" NOT NULL,
    name        text,
    prefix      text NOT NULL,
    key_hash    text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant, created_at);
""",
    ),
]

POSTGRES.append(
    (
        2,
        "index client-chosen text by hash (any length storable); property names lowercased",
        # `llmtap_hash` is declared IMMUTABLE although convert_to is only STABLE: converting to
        # UTF8 is fixed for a database (its encoding cannot change), which is what an index
        # expression needs. 16 bytes of SHA-256: uniqueness of request ids rests on it.
        """
CREATE OR REPLACE FUNCTION llmtap_hash(text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT substring(sha256(convert_to($1, 'UTF8')) FROM 1 FOR 16) $$;

CREATE UNIQUE INDEX request_keys_tenant_id_hash ON request_keys (tenant, llmtap_hash(id));
ALTER TABLE request_keys DROP CONSTRAINT request_keys_pkey;

DROP INDEX requests_tenant_created;
CREATE INDEX requests_tenant_created ON requests (tenant, created_at DESC);
DROP INDEX requests_tenant_user;
CREATE INDEX requests_tenant_user ON requests (tenant, llmtap_hash(user_id), created_at DESC);
DROP INDEX requests_tenant_session;
CREATE INDEX requests_tenant_session ON requests (tenant, llmtap_hash(session_id), created_at DESC);
DROP INDEX requests_tenant_model;
CREATE INDEX requests_tenant_model ON requests (tenant, llmtap_hash(model), created_at DESC);

DROP INDEX request_properties_lookup;
CREATE INDEX request_properties_lookup
    ON request_properties (tenant, llmtap_hash(name), llmtap_hash(value), created_at DESC);

-- Names are case-insensitive (the gateway lowercases them; ingested records may not have).
UPDATE request_properties SET name = lower(name) WHERE name <> lower(name);
UPDATE requests SET properties = (
    SELECT jsonb_object_agg(k, v) FROM (
        SELECT DISTINCT ON (lower(key)) lower(key) AS k, value AS v
        FROM jsonb_each(properties) ORDER BY lower(key), key <> lower(key), key
    ) AS lowered
) WHERE EXISTS (SELECT 1 FROM jsonb_object_keys(properties) AS n WHERE n <> lower(n));
""",
    )
)

SQLITE: list[tuple[int, str, str]] = [
    (
        1,
        "requests, properties side table, API keys",
        """
CREATE TABLE requests (
    tenant             TEXT NOT NULL,
    id                 TEXT NOT NULL,
    created_at         INTEGER NOT NULL,  -- microseconds since the epoch, UTC
    provider           TEXT NOT NULL,
    model              TEXT,
    method             TEXT NOT NULL,
    path               TEXT NOT NULL,
    target_url         TEXT NOT NULL,
    status             INTEGER,
    outcome            TEXT NOT NULL,
    error              TEXT,
    streamed           INTEGER NOT NULL,
    latency_ms         REAL NOT NULL,
    ttft_ms            REAL,
    prompt_tokens      INTEGER,
    completion_tokens  INTEGER,
    total_tokens       INTEGER,
    cached_tokens      INTEGER,
    cache_write_tokens INTEGER,
    reasoning_tokens   INTEGER,
    usage_source       TEXT NOT NULL,
    cost_nanos         INTEGER,
    price_version      TEXT,
    user_id            TEXT,
    session_id         TEXT,
    properties         TEXT NOT NULL,
    request_headers    TEXT NOT NULL,
    response_headers   TEXT NOT NULL,
    request_body       TEXT,
    response_body      TEXT,
    response_events    TEXT,
    route              TEXT NOT NULL,
    first_byte_at      INTEGER,
    ended_at           INTEGER,
    gateway            TEXT,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX requests_tenant_created ON requests (tenant, created_at DESC, id DESC);
CREATE INDEX requests_tenant_user ON requests (tenant, user_id, created_at DESC, id DESC);
CREATE INDEX requests_tenant_session ON requests (tenant, session_id, created_at DESC, id DESC);
CREATE INDEX requests_tenant_model ON requests (tenant, model, created_at DESC, id DESC);
CREATE INDEX requests_created ON requests (created_at);

CREATE TABLE request_properties (
    tenant      TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    name        TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (tenant, request_id, name)
) WITHOUT ROWID;
CREATE INDEX request_properties_lookup
    ON request_properties (tenant, name, value, created_at DESC, request_id DESC);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    name        TEXT,
    prefix      TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
CREATE INDEX api_keys_tenant ON api_keys (tenant, created_at);
""",
    ),
    (
        2,
        "request_properties as one B-tree keyed the way filters probe it",
        # The lookup key is unique per row (a request has each property once), so it can be the
        # primary key of a WITHOUT ROWID table: one B-tree per property row instead of two, and
        # inserts of time-ordered records land at the end of each (name, value) range.
        """
CREATE TABLE request_properties_v2 (
    tenant      TEXT NOT NULL,
    name        TEXT NOT NULL,
    value       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    request_id  TEXT NOT NULL,
    PRIMARY KEY (tenant, name, value, created_at, request_id)
) WITHOUT ROWID;
INSERT INTO request_properties_v2 (tenant, name, value, created_at, request_id)
    SELECT tenant, name, value, created_at, request_id FROM request_properties;
DROP TABLE request_properties;
ALTER TABLE request_properties_v2 RENAME TO request_properties;
""",
    ),
    (
        3,
        "property names lowercased (case-insensitive, as PostgreSQL's version 2)",
        # Rows the gateway wrote are lowercase already; records ingested with another case are
        # renamed, and a name already present in lowercase for the same request wins.
        """
INSERT OR IGNORE INTO request_properties (tenant, name, value, created_at, request_id)
    SELECT tenant, lower(name), value, created_at, request_id FROM request_properties
    WHERE name <> lower(name);
DELETE FROM request_properties WHERE name <> lower(name);
UPDATE requests SET properties = (
    SELECT json_group_object(k, v) FROM (
        -- a bare column beside max() comes from the row of the max: the lowercase name's value
        SELECT lower(key) AS k, value AS v, max(key = lower(key)) FROM json_each(requests.properties)
        GROUP BY lower(key)
    )
) WHERE EXISTS (SELECT 1 FROM json_each(requests.properties) WHERE key <> lower(key))
""",
    ),
]

# Webhook endpoints and the outbox (same columns in both stores; times in microseconds).
_WEBHOOKS = """
CREATE TABLE webhook_endpoints (
    id               text PRIMARY KEY,
    tenant           text NOT NULL,
    url              text NOT NULL,
    secret           text NOT NULL,
    previous_secret  text,
    events           text NOT NULL,
    filters          text NOT NULL,
    sample           double precision NOT NULL,
    include_bodies   integer NOT NULL,
    created_at       bigint NOT NULL,
    disabled_at      bigint,
    failing_since    bigint,
    retry_at         bigint,
    failures         integer NOT NULL
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant, created_at);
CREATE TABLE webhook_deliveries (
    id           text PRIMARY KEY,
    endpoint_id  text NOT NULL,
    tenant       text NOT NULL,
    event        text NOT NULL,
    subject      text NOT NULL,
    payload      text NOT NULL,
    status       text NOT NULL,
    attempts     integer NOT NULL,
    next_at      bigint NOT NULL,
    lease_until  bigint,
    last_status  integer,
    last_error   text,
    created_at   bigint NOT NULL,
    delivered_at bigint
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (endpoint_id, status, next_at);
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (tenant, created_at)
"""
POSTGRES.append((3, "webhook endpoints and outbox", _WEBHOOKS))
SQLITE.append((4, "webhook endpoints and outbox", _WEBHOOKS))

# Rollups (see llmtap.store.rollup). `rollup_dims` says since when each dimension is rolled up:
# 0 when the store held no request at that time, else the next minute (older ranges are answered
# from raw rows).
SQLITE.append(
    (
        5,
        "rollups per tenant x grain x bucket x dimension, with DDSketch latency/TTFT sketches",
        """
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
""",
    )
)

# Searchable text of bodies (llmtap.store.search), case-folded at write: a trigram index
# (case_sensitive 1: folding is done once, in Python, the same way for both stores; detail none:
# ~30% cheaper to write, and GLOB, which the index answers, re-checks each candidate's text).
# A document is tied to its request through `request_search.docid`, an INTEGER PRIMARY KEY
# (VACUUM keeps those; it may renumber the implicit rowids of `requests`).
SQLITE.append(
    (
        6,
        "request_text: FTS5 trigram index of the searchable text of bodies",
        """
CREATE TABLE request_search (
    docid   INTEGER PRIMARY KEY,
    tenant  TEXT NOT NULL,
    id      TEXT NOT NULL,
    UNIQUE (tenant, id)
);
CREATE VIRTUAL TABLE request_text USING fts5(text, tokenize = 'trigram case_sensitive 1', detail = none)
""",
    )
)

POSTGRES.append(
    (
        4,
        "rollups per tenant x grain x bucket x dimension, with DDSketch latency/TTFT sketches",
        # Keys (user ids, property values) may be long: unique by hash, as in version 2.
        """
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
""",
    )
)

POSTGRES.append(
    (
        5,
        "requests.search_text with a pg_trgm GIN index (substring search over bodies)",
        # pg_trgm is a trusted extension (PostgreSQL 13+): a database owner may create it.
        """
CREATE EXTENSION IF NOT EXISTS pg_trgm;
ALTER TABLE requests ADD COLUMN search_text text;
CREATE INDEX requests_search ON requests USING gin (search_text gin_trgm_ops);
""",
    )
)
