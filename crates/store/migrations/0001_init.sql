-- convstore schema, version 1.
--
-- Table and column names are a contract (DESIGN.md "Storage"); columns may
-- grow in later migrations, never change meaning.
--
-- The vector columns deliberately have NO fixed dimension here: the dimension
-- belongs to the configured embedding model, not to the schema version.
-- `store::schema::ensure_vector_column` fixes `conversation_chunks.embedding`
-- to `vector(embedding.dimensions)` and builds the HNSW index at start-up.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE conversations (
    id               uuid        PRIMARY KEY,
    -- The caller's idempotency key: the same client id twice stores one row.
    client_id        text        UNIQUE,
    user_id          text        NOT NULL,
    channel          text        NOT NULL,
    summary          text,
    -- The whole conversation as one text (`role: content` lines, or the
    -- caller's free-form transcript).
    transcript       text        NOT NULL,
    -- The message list as received, for GET; NULL when the caller sent a
    -- transcript instead.
    messages         jsonb,
    metadata         jsonb       NOT NULL DEFAULT '{}',
    created_at       timestamptz,
    received_at      timestamptz NOT NULL,
    stored_at        timestamptz NOT NULL DEFAULT now(),
    -- The worst of its chunks' statuses.
    embedding_status text        NOT NULL
        CHECK (embedding_status IN ('embedded', 'pending', 'failed')),
    CHECK (jsonb_typeof(metadata) = 'object')
);

-- Search filters (user, channel, time window, metadata containment).
CREATE INDEX conversations_user_id_received_at_idx ON conversations (user_id, received_at);
CREATE INDEX conversations_channel_received_at_idx ON conversations (channel, received_at);
CREATE INDEX conversations_received_at_idx ON conversations (received_at);
CREATE INDEX conversations_created_at_idx ON conversations (created_at);
CREATE INDEX conversations_metadata_idx ON conversations USING gin (metadata jsonb_path_ops);
-- Conversations still waiting for a vector: few, looked up by the backfill.
CREATE INDEX conversations_not_embedded_idx ON conversations (embedding_status)
    WHERE embedding_status <> 'embedded';

CREATE TABLE conversation_chunks (
    conversation_id  uuid        NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq              integer     NOT NULL CHECK (seq >= 0),
    content          text        NOT NULL,
    -- sha256 of `content` as sent to the model: with `model`, the cache key.
    content_hash     bytea       NOT NULL CHECK (length(content_hash) = 32),
    -- The model whose vector this is (or, while pending, should be).
    model            text        NOT NULL,
    -- Typed vector(N) at start-up; NULL until embedded.
    embedding        vector,
    embedding_status text        NOT NULL
        CHECK (embedding_status IN ('embedded', 'pending', 'failed')),
    -- Why a failed chunk failed (a dead letter; never retried automatically).
    error            text,
    embedded_at      timestamptz,
    PRIMARY KEY (conversation_id, seq),
    -- A vector exactly when embedded: search never meets a half-written row,
    -- the backfill never meets an embedded row without a vector.
    CHECK ((embedding_status = 'embedded') = (embedding IS NOT NULL))
);

-- The backfill's work list: `WHERE embedding_status = 'pending' ORDER BY
-- conversation_id, seq ... FOR UPDATE SKIP LOCKED` walks this small index
-- (UUIDv7 ids make that roughly oldest first).
CREATE INDEX conversation_chunks_pending_idx ON conversation_chunks (conversation_id, seq)
    WHERE embedding_status = 'pending';
-- Dead letters, for the API and metrics.
CREATE INDEX conversation_chunks_failed_idx ON conversation_chunks (conversation_id, seq)
    WHERE embedding_status = 'failed';

-- The shared L2 embedding cache: any instance, any restart.
CREATE TABLE embedding_cache (
    model        text        NOT NULL,
    content_hash bytea       NOT NULL CHECK (length(content_hash) = 32),
    embedding    vector      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, content_hash)
);
