-- requests, request keys, properties side table, API keys
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
