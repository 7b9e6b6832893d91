-- fleetcast cell schema, version 1: the durable state several gateways share.
--
-- Each row keeps the record itself (`record`, bytea) in the store's own encoding: the same
-- bytes LMDB keeps, versioned by their tags and decoded by the same code, so both engines
-- hold one data model. Beside it, in columns, what SQL must order, find, join or fence on
-- (ids, names, sequence numbers, statuses, times, owners), written in the same statement.

-- Gateways of the cell and their leases. A gateway writes for a device only while it owns
-- it (devices.owner_gw / owner_inc) and its lease is live; a restart takes a new
-- incarnation, so a zombie of the old one matches no row.
CREATE TABLE gateways (
    id          text PRIMARY KEY,
    incarnation bigint NOT NULL,
    lease_until timestamptz NOT NULL,
    -- Where agents reach it, for redirects by the gateways that do not own a device.
    addr        text NOT NULL
);

-- Device and task ids. A batch that rolls back leaves a gap: ids are unique, not dense.
CREATE SEQUENCE device_ids AS bigint START 1;
CREATE SEQUENCE task_ids AS bigint START 1;

-- Counters of the whole cell (`commit_seq`: batches committed).
CREATE TABLE counters (
    name  text PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO counters VALUES ('commit_seq', 0);

CREATE TABLE devices (
    id           bigint PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    revoked      boolean NOT NULL,
    last_seen_ms bigint,
    record       bytea NOT NULL,
    -- The gateway that owns the device now, and its incarnation (the fence).
    owner_gw     text REFERENCES gateways (id),
    owner_inc    bigint,
    CHECK ((owner_gw IS NULL) = (owner_inc IS NULL))
);
CREATE INDEX devices_owner ON devices (owner_gw);

-- One-time enrolment tokens, by the SHA-256 of the token (the token itself is never kept).
CREATE TABLE enrolment_tokens (
    hash       bytea PRIMARY KEY CHECK (length(hash) = 32),
    expires_ms bigint NOT NULL,
    record     bytea NOT NULL
);

CREATE TABLE group_members (
    grp    text NOT NULL,
    device bigint NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    PRIMARY KEY (grp, device)
);
CREATE INDEX group_members_device ON group_members (device);

-- Each device's queue state (status, cursor, attempts, reboot suspension): one row,
-- updated with the command it concerns in one transaction.
CREATE TABLE queues (
    device bigint PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    record bytea NOT NULL
);

-- Commands in queue order: (device, seq) is the order, seq assigned from the queue's
-- next_seq in the same transaction as the insert.
CREATE TABLE commands (
    device bigint NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    seq    bigint NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (device, seq)
);

CREATE TABLE results (
    device bigint NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    seq    bigint NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (device, seq)
);

CREATE TABLE tasks (
    id         bigint PRIMARY KEY,
    created_ms bigint NOT NULL,
    record     bytea NOT NULL
);

-- The task table: one row per (task, device); the incomplete ones indexed by device, for
-- the tasks a device that returns must still finish.
CREATE TABLE task_devices (
    task   bigint NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    device bigint NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    status text NOT NULL CHECK (status IN ('pending', 'in_progress', 'completed', 'failed', 'cancelled')),
    record bytea NOT NULL,
    PRIMARY KEY (task, device)
);
CREATE INDEX task_devices_incomplete ON task_devices (device, task)
    WHERE status IN ('pending', 'in_progress');

-- The event log, in id order, pruned by age and count (`store.events_keep_days`,
-- `store.events_max`) in bounded deletes. Ids are given in commit order by the batch that
-- appends them, which holds the `events` lock for it (see the engine).
CREATE TABLE events (
    id      bigint PRIMARY KEY,
    time_ms bigint NOT NULL,
    device  bigint,
    record  bytea NOT NULL
);
CREATE INDEX events_age ON events (time_ms);
