-- Dead letters of the shared intake (issue 17, docs/SCALING.md): a change
-- pulled from NATS JetStream that can never be applied (the database
-- refuses it for good, or its payload is not a change) is terminated in
-- the stream and kept here, whole, for an operator to read and re-send.
-- Keyed by user_id first, as every table (Citus-shaped: distributable by
-- user_id); an erasure deletes the user's dead letters too.
CREATE TABLE dead_letters (
    -- '' when the payload could not be read as a change.
    user_id          text        NOT NULL,
    id               bigint      GENERATED ALWAYS AS IDENTITY,
    -- The conversation's key (client id or assigned id), when readable.
    conversation_key text,
    -- Where it came from: the stream and its sequence there.
    stream           text        NOT NULL,
    stream_sequence  bigint      NOT NULL,
    deliveries       integer     NOT NULL,
    payload          bytea       NOT NULL,
    reason           text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id)
);
CREATE INDEX dead_letters_created_at_idx ON dead_letters (created_at);
