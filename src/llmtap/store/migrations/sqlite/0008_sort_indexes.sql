-- indexes for the list's cost and latency sorts
-- As PostgreSQL's version 7: the cost and latency sorts walk an index in their keyset order.

CREATE INDEX requests_tenant_cost ON requests (tenant, coalesce(cost_nanos, -1) DESC, created_at DESC, id DESC);
CREATE INDEX requests_tenant_latency ON requests (tenant, latency_ms DESC, created_at DESC, id DESC)
