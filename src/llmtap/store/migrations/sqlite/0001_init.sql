-- requests, properties side table, API keys
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
