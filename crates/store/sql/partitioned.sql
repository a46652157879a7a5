-- The partitioned layout of `database.partitions = N` (docs/STORAGE.md):
-- `conversations` and `conversation_chunks` as they stand after the
-- migrations up to 0008, `PARTITION BY HASH (user_id)`. `store::layout`
-- runs this on an empty database after the migrations, in place of the
-- plain tables they created, then creates the N partitions of each.
--
-- Keep it equal to what the migrations make (columns, defaults, checks,
-- keys, indexes): the test `partitioned_layout_matches_the_migrations`
-- (crates/daemon/tests/store_write.rs) compares the two. A later migration
-- that alters these tables alters the partitioned parents the same way.

DROP TABLE conversation_chunks;
DROP TABLE conversations;

CREATE TABLE conversations (
    id               uuid        NOT NULL,
    client_id        text,
    user_id          text        NOT NULL,
    channel          text        NOT NULL,
    summary          text,
    transcript       text        NOT NULL,
    messages         jsonb,
    metadata         jsonb       NOT NULL DEFAULT '{}',
    created_at       timestamptz,
    received_at      timestamptz NOT NULL,
    stored_at        timestamptz NOT NULL DEFAULT now(),
    embedding_status text        NOT NULL
        CHECK (embedding_status IN ('embedded', 'pending', 'failed')),
    version_stamp    bigint      NOT NULL DEFAULT 0,
    versions         integer     NOT NULL DEFAULT 1 CHECK (versions >= 1),
    content_sha      bytea       CHECK (length(content_sha) = 32),
    posted_sha       bytea       CHECK (length(posted_sha) = 32),
    updated_at       timestamptz,
    CHECK (jsonb_typeof(metadata) = 'object'),
    CONSTRAINT conversations_pkey PRIMARY KEY (user_id, id),
    CONSTRAINT conversations_user_id_client_id_key UNIQUE (user_id, client_id)
) PARTITION BY HASH (user_id);

CREATE INDEX conversations_user_id_received_at_idx ON conversations (user_id, received_at);
CREATE INDEX conversations_channel_received_at_idx ON conversations (channel, received_at);
CREATE INDEX conversations_received_at_idx ON conversations (received_at);
CREATE INDEX conversations_created_at_idx ON conversations (created_at);
CREATE INDEX conversations_metadata_idx ON conversations USING gin (metadata jsonb_path_ops);
CREATE INDEX conversations_not_embedded_idx ON conversations (embedding_status)
    WHERE embedding_status <> 'embedded';
CREATE INDEX conversations_age_idx
    ON conversations ((coalesce(created_at, received_at)));
CREATE INDEX conversations_channel_age_idx
    ON conversations (channel, (coalesce(created_at, received_at)));
CREATE INDEX conversations_id_idx ON conversations (id);
CREATE INDEX conversations_client_id_idx ON conversations (client_id);

CREATE TABLE conversation_chunks (
    conversation_id  uuid        NOT NULL,
    seq              integer     NOT NULL CHECK (seq >= 0),
    content          text        NOT NULL,
    content_hash     bytea       NOT NULL CHECK (length(content_hash) = 32),
    model            text        NOT NULL,
    embedding        vector,
    embedding_status text        NOT NULL
        CHECK (embedding_status IN ('embedded', 'pending', 'failed')),
    error            text,
    embedded_at      timestamptz,
    embed_attempts   integer     NOT NULL DEFAULT 0 CHECK (embed_attempts >= 0),
    next_attempt_at  timestamptz,
    user_id          text        NOT NULL,
    content_tsv      tsvector
        GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, content)) STORED,
    CHECK ((embedding_status = 'embedded') = (embedding IS NOT NULL)),
    CONSTRAINT conversation_chunks_pkey PRIMARY KEY (user_id, conversation_id, seq),
    CONSTRAINT conversation_chunks_conversation_fkey FOREIGN KEY (user_id, conversation_id)
        REFERENCES conversations (user_id, id) ON DELETE CASCADE
) PARTITION BY HASH (user_id);

CREATE INDEX conversation_chunks_pending_idx ON conversation_chunks (conversation_id, seq)
    WHERE embedding_status = 'pending';
CREATE INDEX conversation_chunks_failed_idx ON conversation_chunks (conversation_id, seq)
    WHERE embedding_status = 'failed';
CREATE INDEX conversation_chunks_content_fts_idx
    ON conversation_chunks USING gin (content_tsv);
