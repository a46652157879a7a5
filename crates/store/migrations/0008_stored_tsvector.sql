-- Lexical search ranks by a stored tsvector (docs/SEARCH.md "Modes").
--
-- Ranking (`ts_rank_cd`) needs each matching chunk's tsvector. With the
-- expression index of 0006 it was computed again from the text for every
-- match: about 100 µs for a chunk of a few hundred words, so a query of
-- common words matching a few thousand chunks took hundreds of
-- milliseconds. A generated column computes it once, when the chunk is
-- written (the expression index did the same work then for its entries),
-- and the GIN index is built on the column.
--
-- The configuration is `simple`, the default of `search.language`; another
-- language is a start-up choice (`store::schema::ensure_text_index`, also
-- run by `convstore migrate`), which regenerates the column and the index.
--
-- On an existing database this rewrites `conversation_chunks` once.
ALTER TABLE conversation_chunks
    ADD COLUMN content_tsv tsvector
    GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, content)) STORED;
DROP INDEX IF EXISTS conversation_chunks_content_fts_idx;
CREATE INDEX conversation_chunks_content_fts_idx
    ON conversation_chunks USING gin (content_tsv);
