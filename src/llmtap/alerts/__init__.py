"""Alerts: rules over the stats of a recent window, evaluated by `llmtap server`, announced as
`alert.firing` / `alert.resolved` webhook events through the outbox.

- `rules`: what a rule is, its checks (one sentence per mistake), how its value is read from a
  stats answer.
- `db`: rules and per-group state in the store; the conditional updates that decide, among any
  number of evaluators, who fires or resolves an alert (and write its events in that same
  transaction).
- `evaluator`: the periodic evaluation, on the store's `stats` (rollups where they answer).
"""
