-- fleetcast cell schema, version 1: the durable state several gateways share.
--
-- Rows hold what is queried, ordered or fenced in columns; nested protocol values (a
-- command's steps, a configuration report, a task's plan, a block set) are bytea in the
-- store's own encoding (fleetcast-store's codec, the same bytes LMDB keeps), versioned by
-- their tags, so both engines read and write one data model.

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

CREATE SEQUENCE device_ids AS bigint START 1;

CREATE TABLE devices (
    id              bigint PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    credential_hash bytea NOT NULL CHECK (length(credential_hash) = 32),
    revoked         boolean NOT NULL DEFAULT false,
    enrolled_ms     bigint NOT NULL,
    last_seen_ms    bigint,
    transport       smallint,
    report          bytea,
    report_ms       bigint,
    -- The gateway that owns the device now, and its incarnation (the fence).
    owner_gw        text REFERENCES gateways (id),
    owner_inc       bigint,
    CHECK ((owner_gw IS NULL) = (owner_inc IS NULL))
);
CREATE INDEX devices_owner ON devices (owner_gw);

-- Revoked certificates outlive their device rows.
CREATE TABLE revocations (
    credential_hash bytea PRIMARY KEY CHECK (length(credential_hash) = 32),
    revoked_ms      bigint NOT NULL
);

-- One-time enrolment tokens, by the SHA-256 of the token (the token itself is never kept).
CREATE TABLE enrolment_tokens (
    hash       bytea PRIMARY KEY CHECK (length(hash) = 32),
    name       text NOT NULL,
    expires_ms bigint NOT NULL,
    groups     text[] NOT NULL DEFAULT '{}'
);

CREATE TABLE group_members (
    grp    text NOT NULL,
    device bigint NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    PRIMARY KEY (grp, device)
);
CREATE INDEX group_members_device ON group_members (device);

-- Each device's queue state: one row, the store's QueueState (status, cursor, attempts,
-- reboot suspension), updated with the command it concerns in one transaction.
CREATE TABLE queues (
    device bigint PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    state  bytea NOT NULL
);

-- Commands in queue order: (device, seq) is the order, seq assigned from the queue's
-- next_seq in the same transaction as the insert.
CREATE TABLE commands (
    device  bigint NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    seq     bigint NOT NULL,
    command bytea NOT NULL,
    PRIMARY KEY (device, seq)
);

CREATE TABLE results (
    device      bigint NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    seq         bigint NOT NULL,
    recorded_ms bigint NOT NULL,
    result      bytea NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE INDEX results_age ON results (recorded_ms);

CREATE SEQUENCE task_ids AS bigint START 1;

CREATE TABLE tasks (
    id         bigint PRIMARY KEY,
    created_ms bigint NOT NULL,
    task       bytea NOT NULL
);

-- The task table: one row per (task, device). `incomplete` is indexed by device, for the
-- tasks a device that returns must still finish.
CREATE TABLE task_devices (
    task       bigint NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    device     bigint NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    status     text NOT NULL CHECK (status IN ('pending', 'in_progress', 'completed', 'failed', 'cancelled')),
    detail     bytea,
    PRIMARY KEY (task, device)
);
CREATE INDEX task_devices_incomplete ON task_devices (device)
    WHERE status IN ('pending', 'in_progress');

-- The event log, in id order, pruned by age and count (`store.events_keep_days`,
-- `store.events_max`) in bounded deletes; ids come from one sequence, so every gateway's
-- events interleave in one order.
CREATE SEQUENCE event_ids AS bigint START 1;

CREATE TABLE events (
    id      bigint PRIMARY KEY,
    time_ms bigint NOT NULL,
    device  bigint,
    kind    smallint NOT NULL,
    message text NOT NULL,
    -- Who did it: the gateway, and for operator actions the operator.
    gateway text,
    actor   text
);
CREATE INDEX events_age ON events (time_ms);
