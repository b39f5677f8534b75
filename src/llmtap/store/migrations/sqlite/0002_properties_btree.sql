-- request_properties as one B-tree keyed the way filters probe it
--
-- The lookup key is unique per row (a request has each property once), so it can be the
-- primary key of a WITHOUT ROWID table: one B-tree per property row instead of two, and
-- inserts of time-ordered records land at the end of each (name, value) range.

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
