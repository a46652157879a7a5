-- Citus-shaped keys (docs/STORAGE.md "Distributing the database with
-- Citus"): every primary and unique key contains the distribution column
-- `user_id`, and `conversation_chunks` carries `user_id` so that it can be
-- colocated with `conversations` (and, with `database.partitions = N`,
-- hash-partitioned by it: PostgreSQL enforces the same key rules for
-- partitioned tables that Citus does for distributed ones).
--
-- What uniqueness means after this migration:
-- - `conversations (user_id, id)` is the primary key and
--   `(user_id, client_id)` is unique: what the database can enforce on a
--   table split by user.
-- - A client id is still ONE conversation, whoever posts it, and a row id
--   still names one row: the writer enforces both under the client id's
--   advisory lock (`store::write`), and looks rows up by client id or row
--   id through the plain indexes below. A conversation whose new version
--   belongs to another user moves (its row and chunks are deleted under
--   the old user and written under the new one, same row id).
--
-- On an existing database this rewrites `conversation_chunks` (one UPDATE
-- fills `user_id`), rebuilds the keys and (at the next start) the HNSW
-- index: it takes a while on large tables and holds exclusive locks while
-- it runs; run `convstore migrate` in a maintenance window. Nothing is lost: every chunk
-- belongs to a conversation (the old foreign key made sure of it).

-- The HNSW index would take an insert for every rewritten chunk row (a
-- few milliseconds each); dropped here, start-up builds it again
-- (`store::schema::ensure_vector_column`, also run by `convstore migrate`),
-- which is many times faster than maintaining it row by row.
DROP INDEX IF EXISTS conversation_chunks_embedding_hnsw_idx;

ALTER TABLE conversation_chunks ADD COLUMN user_id text;
UPDATE conversation_chunks AS k SET user_id = c.user_id
    FROM conversations AS c WHERE c.id = k.conversation_id;
ALTER TABLE conversation_chunks ALTER COLUMN user_id SET NOT NULL;

ALTER TABLE conversation_chunks DROP CONSTRAINT conversation_chunks_conversation_id_fkey;
ALTER TABLE conversation_chunks DROP CONSTRAINT conversation_chunks_pkey;
ALTER TABLE conversations DROP CONSTRAINT conversations_client_id_key;
ALTER TABLE conversations DROP CONSTRAINT conversations_pkey;

ALTER TABLE conversations
    ADD CONSTRAINT conversations_pkey PRIMARY KEY (user_id, id),
    ADD CONSTRAINT conversations_user_id_client_id_key UNIQUE (user_id, client_id);
-- Look-ups by row id or by client id alone (GET, append, delete, the
-- writer's checks): not unique in the database, kept unique by the writer.
CREATE INDEX conversations_id_idx ON conversations (id);
CREATE INDEX conversations_client_id_idx ON conversations (client_id);

ALTER TABLE conversation_chunks
    ADD CONSTRAINT conversation_chunks_pkey PRIMARY KEY (user_id, conversation_id, seq),
    ADD CONSTRAINT conversation_chunks_conversation_fkey FOREIGN KEY (user_id, conversation_id)
        REFERENCES conversations (user_id, id) ON DELETE CASCADE;
