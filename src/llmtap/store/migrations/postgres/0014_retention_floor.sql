-- Retention releases the rows of months wholly past the cutoff (deletes their keys, takes them
-- out of the rollups) before it drops those months' partitions. A record redelivered in
-- between (a replayed dead letter, an old spool) took its key again: two rows for one id, its
-- contributions subtracted twice, and every later purge failed on a negative count. While
-- such a purge is under way, records older than `before` are not stored (retention would
-- remove them anyway).
CREATE TABLE retention_floor (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    before timestamptz NOT NULL
);
