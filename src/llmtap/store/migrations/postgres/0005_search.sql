-- requests.search_text with a pg_trgm GIN index (substring search over bodies)
--
-- pg_trgm is a trusted extension (PostgreSQL 13+): a database owner may create it.

CREATE EXTENSION IF NOT EXISTS pg_trgm;
ALTER TABLE requests ADD COLUMN search_text text;
CREATE INDEX requests_search ON requests USING gin (search_text gin_trgm_ops);
