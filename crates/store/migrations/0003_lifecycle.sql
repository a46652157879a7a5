-- Conversation lifecycle (issue 16, docs/LIFECYCLE.md): versions that
-- replace and append, deletes and user erasure that never come back, and
-- retention.
--
-- Every change a client makes (a post, an append) is stamped when it is
-- acknowledged: microseconds since the epoch, made strictly increasing per
-- instance (a hybrid logical clock). A row remembers the stamp of the last
-- change applied to it, so a change acknowledged earlier never overwrites
-- one acknowledged later, whatever batch, worker or instance carries it.
ALTER TABLE conversations
    -- Stamp of the last change applied; 0 for rows written before this.
    ADD COLUMN version_stamp bigint      NOT NULL DEFAULT 0,
    -- How many changes made this row what it is (1 = as first posted).
    ADD COLUMN versions      integer     NOT NULL DEFAULT 1 CHECK (versions >= 1),
    -- sha256 of the stored content (canonical JSON of what a post carries):
    -- a post with the same content is a retry and changes nothing.
    ADD COLUMN content_sha   bytea       CHECK (length(content_sha) = 32),
    -- sha256 of the content of the last *post* (before later appends): a
    -- late retry of that post is still a retry, not a rollback of appends.
    ADD COLUMN posted_sha    bytea       CHECK (length(posted_sha) = 32),
    ADD COLUMN updated_at    timestamptz;

-- What was deleted or erased, so that nothing acknowledged before the
-- delete can bring it back: not a queued or journaled change, not a late
-- append, not another instance. Keyed by sha256 of the client id or user
-- id, never the id itself (an erased user's id is not kept). A change is
-- discarded at write time when its stamp is not above the tombstone's.
CREATE TABLE tombstones (
    kind       text        NOT NULL CHECK (kind IN ('conversation', 'user')),
    key_sha    bytea       NOT NULL CHECK (length(key_sha) = 32),
    stamp      bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key_sha)
);
-- The reaper drops tombstones older than retention.tombstone_max_age.
CREATE INDEX tombstones_created_at_idx ON tombstones (created_at);

-- Retention ages a conversation by created_at, else received_at: the
-- reaper walks these in bounded batches instead of scanning the table.
CREATE INDEX conversations_age_idx
    ON conversations ((coalesce(created_at, received_at)));
CREATE INDEX conversations_channel_age_idx
    ON conversations (channel, (coalesce(created_at, received_at)));
