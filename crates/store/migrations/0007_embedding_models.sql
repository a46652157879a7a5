-- Which embedding model's vectors are where (docs/SEARCH.md "Changing the
-- model"). One row per role:
--
-- - `current`: the configured model; its vectors are in
--   `conversation_chunks.embedding` (typed `vector(dimensions)`).
-- - `previous`: the model before the last change, while it is kept; its
--   vectors are in `previous_chunk_embeddings` (created by start-up when the
--   model changes, `store::models`). `retired_at` is NULL while search
--   still reads them (the current model does not yet cover every chunk),
--   and set when search switched to the current model.
--
-- Filled by start-up (`store::models::prepare_vectors`); a database from
-- before this migration gets its `current` row from the stored chunks.
CREATE TABLE embedding_models (
    role       text        PRIMARY KEY CHECK (role IN ('current', 'previous')),
    model      text        NOT NULL,
    dimensions integer     NOT NULL CHECK (dimensions > 0),
    since      timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz,
    CHECK (role = 'previous' OR retired_at IS NULL)
);
