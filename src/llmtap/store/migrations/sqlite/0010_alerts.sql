-- alert rules, their state per group, and a payload format per webhook endpoint
--
-- The same columns as PostgreSQL's version 9; times in microseconds since the epoch. (Written
-- beside version 9, the user rollups, on another branch: see `llmtap.store.migrations` on gaps.)
--
-- alert_rules.next_eval_at is the claim: an evaluator takes a rule for one interval with a
-- conditional update, so several servers evaluate each rule once per interval. alert_states
-- holds one row per rule x group that ever fired; its state changes only by conditional
-- updates (firing -> resolved, anything else -> firing), which is what makes an alert fire and
-- resolve once however many evaluators run.

CREATE TABLE alert_rules (
    id            text PRIMARY KEY,
    tenant        text NOT NULL,
    name          text,
    metric        text NOT NULL,
    op            text NOT NULL,
    threshold     double precision NOT NULL,
    window_s      integer NOT NULL,
    group_by      text,
    min_requests  integer NOT NULL,
    created_at    bigint NOT NULL,
    next_eval_at  bigint NOT NULL,
    evaluated_at  bigint
);
CREATE INDEX alert_rules_tenant ON alert_rules (tenant, created_at);
CREATE TABLE alert_states (
    rule_id      text NOT NULL,
    group_key    text NOT NULL,
    tenant       text NOT NULL,
    state        text NOT NULL,
    episode      integer NOT NULL,
    value        double precision,
    count        bigint,
    fired_at     bigint NOT NULL,
    resolved_at  bigint,
    clear_since  bigint,
    updated_at   bigint NOT NULL,
    PRIMARY KEY (rule_id, group_key)
);
ALTER TABLE webhook_endpoints ADD COLUMN format text NOT NULL DEFAULT 'standard'
