-- property names lowercased (case-insensitive, as PostgreSQL's version 2)
--
-- Rows the gateway wrote are lowercase already. Records ingested with another case are
-- renamed, and a name already present in lowercase for the same request wins.

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
