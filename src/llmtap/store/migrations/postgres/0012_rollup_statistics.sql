-- statistics that tell the planner which rollup grains hold which dimensions
--
-- Every rollup read names a grain and a dimension. Alone each is common (day rows are mostly
-- per-user ones, `model` rows mostly per-minute ones), so the planner, multiplying the two as
-- if independent, estimated the 30-day overview's 527 day rows of `''` and `model` at 174k out
-- of 2.1M (10M requests) and chose a parallel scan of the whole table: 330-830 ms instead of
-- 8 ms through `rollups_key`. The pairs are few (about 20), so their most common values list
-- holds every one of them exactly.
CREATE STATISTICS IF NOT EXISTS rollups_grain_dim (mcv) ON grain, dim FROM rollups;
ANALYZE rollups;
