-- the usage dimensions that price differently: 1-hour cache writes, audio, service tier, web searches
--
-- Kept on the row (and returned by the API) so a stored cost can be checked against its usage.
-- All NULL on rows stored before: their records did not carry them.

ALTER TABLE requests ADD COLUMN cache_write_1h_tokens integer;
ALTER TABLE requests ADD COLUMN input_audio_tokens integer;
ALTER TABLE requests ADD COLUMN output_audio_tokens integer;
ALTER TABLE requests ADD COLUMN service_tier text;
ALTER TABLE requests ADD COLUMN web_search_requests integer;
