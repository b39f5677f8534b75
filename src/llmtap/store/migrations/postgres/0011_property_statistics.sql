-- statistics that tell the planner a property's value decides its hash
--
-- A property filter compares the hash (the index) and the value (exactness). Without statistics
-- on how the two go together the planner multiplies their selectivities as if independent: at
-- 10M requests `env=dev` (2M rows) was estimated at 48k, and a list page collected every match
-- and sorted it (29 s). With functional dependencies the estimate is right and the page walks
-- both indexes newest first (61 ms). Statistics objects belong to one table, so every month
-- partition gets its own: these here, new ones from the writer (`PostgresStore._ensure_partitions`).

DO $$
DECLARE t text;
BEGIN
    FOR t IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'request_properties'::regclass LOOP
        EXECUTE format('CREATE STATISTICS IF NOT EXISTS %I (dependencies)'
                       ' ON name, value, llmtap_hash(name), llmtap_hash(value) FROM %I', t || '_deps', t);
        EXECUTE format('ANALYZE %I', t);
    END LOOP;
END $$;
