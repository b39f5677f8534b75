-- index client-chosen text by hash (any length storable); property names lowercased
--
-- `llmtap_hash` is declared IMMUTABLE although convert_to is only STABLE: converting to
-- UTF8 is fixed for a database (its encoding cannot change), which is what an index
-- expression needs. 16 bytes of SHA-256: uniqueness of request ids rests on it.

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
