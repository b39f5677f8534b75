-- the units media calls are billed in: whisper-1's audio seconds, tts-1's input characters
--
-- Kept on the row (and returned by the API) so a transcription's or a speech call's cost shows
-- what it is for. NULL on rows stored before, and on every other call.

ALTER TABLE requests ADD COLUMN audio_seconds INTEGER;
ALTER TABLE requests ADD COLUMN input_characters INTEGER;
