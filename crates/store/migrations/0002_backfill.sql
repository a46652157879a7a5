-- Backfill bookkeeping (issue 4, docs/ROUTING.md).
--
-- A backfill round that cannot embed its chunks (no backend answered within
-- embedding.max_wait_ms) leaves them pending and defers them: the next try
-- waits `backfill.interval_ms · 2^embed_attempts`, capped at
-- `backfill.max_defer_ms`. Chunks that keep failing (say, one that crashes
-- its backend with a 500 every time) so stop holding back the others and
-- are never retried in a hot loop; they stay pending (text is never given
-- up for a transient failure), while a rejection (400) marks a chunk
-- `failed` at once.
ALTER TABLE conversation_chunks
    ADD COLUMN embed_attempts  integer NOT NULL DEFAULT 0 CHECK (embed_attempts >= 0),
    ADD COLUMN next_attempt_at timestamptz;
