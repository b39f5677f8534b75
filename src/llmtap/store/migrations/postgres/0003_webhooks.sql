-- webhook endpoints and outbox
--
-- Webhook endpoints and the outbox: the same columns as SQLite's version 4, times in
-- microseconds since the epoch.

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
