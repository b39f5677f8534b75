-- indexes for the list's cost and latency sorts
-- The list's cost and latency sorts walk an index in their keyset order instead of sorting every
-- row of the range (measured at 1M rows: 1.2 s and 0.9 s for a page, each a full scan and top-N
-- sort). The expression is the one `llmtap.store.sql.SORT_KEYS` orders by. Ids stay out of the
-- index (client-chosen text, see version 2): ties on the sort key and created_at are put in id
-- order by an incremental sort of a few rows.

CREATE INDEX requests_tenant_cost ON requests (tenant, (coalesce(cost_nanos, -1)) DESC, created_at DESC);
CREATE INDEX requests_tenant_latency ON requests (tenant, latency_ms DESC, created_at DESC);
