-- Lexical search (docs/SEARCH.md "Modes"): a GIN full-text index over the
-- chunks' text, for PostgreSQL's text search configuration `simple` (the
-- default of `search.language`: every word, id, order code or CJK run is
-- a lower-cased token, no stemming, no stop words).
--
-- An expression index rather than a stored `tsvector` column: nothing is
-- rewritten and no row grows. The query repeats the expression exactly
-- (`to_tsvector('simple'::regconfig, content)`), which is how the planner
-- matches it to the index. Another `search.language` is a configuration
-- choice, like the vector dimension: start-up
-- (`store::schema::ensure_text_index`, also run by `convstore migrate`)
-- rebuilds this index for it.
CREATE INDEX conversation_chunks_content_fts_idx
    ON conversation_chunks USING gin (to_tsvector('simple'::regconfig, content));
