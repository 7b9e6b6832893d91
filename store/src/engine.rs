//! The interface to durable state: what the gateway needs from a storage engine, so that a
//! second engine (a networked database shared by several gateways) can stand in for the
//! embedded LMDB one ([`Store`](crate::Store)) without the fleet logic changing.
//!
//! # Shape
//! - [`Engine`]: opens write batches and read snapshots, reports its size, backs itself up.
//! - [`Reads`]: every read, on a snapshot (committed state) or on a batch (its own
//!   uncommitted writes included: the fleet reads the next command to dispatch right after
//!   recording a result in the same batch).
//! - [`StoreBatch`]: one atomic group of transitions, split by concern into [`DeviceOps`],
//!   [`QueueOps`], [`TaskOps`] and [`EventOps`]; [`StoreBatch::commit`] makes all of them
//!   durable at once or none. The contract of every operation (validate first, a refusal
//!   writes nothing and leaves the batch usable, any other error poisons it) is the one the
//!   LMDB batch documents in its module docs.
//!
//! The fleet holds `Box<dyn Engine>` and drives `&mut dyn StoreBatch`: the engine is chosen at
//! run time from configuration, one virtual call per operation costs nothing next to the
//! commit's fsync, and the fleet and gateway stay free of a type parameter.
//!
//! The traits are object-safe; callers bring them into scope with
//! `use fleetcast_store::prelude::*`.

use std::path::Path;

use fleetcast_wire as wire;

use crate::error::Result;
use crate::types::{
    BlockSet, Command, Device, DeviceId, EnrolmentToken, Event, EventId, QueueState, QueueStatus,
    Received, StoredResult, Task, TaskDeviceStatus, TaskId, Transport,
};
use crate::{Committed, Recorded};

/// A storage engine: the gateway's one way to durable state.
pub trait Engine: Send {
    /// Begins a write batch (group commit).
    fn batch(&mut self) -> Result<Box<dyn StoreBatch + '_>>;
    /// A consistent read view of the committed state.
    fn snapshot(&self) -> Result<Box<dyn Reads + '_>>;
    /// A consistent copy of the committed state into directory `dest`.
    fn backup(&self, dest: &Path) -> Result<()>;
    /// Keeps this gateway's lease in its cell alive; the gateway calls it about once a
    /// second. An engine without a cell (LMDB: one gateway owns every device) has nothing to
    /// renew. [`Lease::Rejoined`] says the lease had lapsed: every device this gateway held
    /// may have been re-homed, so its sessions must be closed (their agents come back and
    /// claim again). `Err`: the database could not be reached; the lease may still be live,
    /// and the next call tries again.
    fn keep_lease(&mut self) -> Result<Lease> {
        Ok(Lease::Held)
    }
    /// Gives the lease up at once (a clean stop): the cell's other gateways may claim this
    /// one's devices without waiting for the lease to run out.
    fn leave_cell(&mut self) -> Result<()> {
        Ok(())
    }
    /// Devices another gateway of the cell changed by operator request since the last call
    /// ([`StoreBatch::operator_writes`]): the ones online here may have a command to send.
    /// Best effort and possibly late: it returns what the engine's connection received while
    /// it last talked to the database (a renewal, a batch), so about a second at most in a
    /// gateway; empty without a cell.
    fn changed_elsewhere(&mut self) -> Vec<DeviceId> {
        Vec::new()
    }
}

/// What [`Engine::keep_lease`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// The lease is renewed (or there is none to renew).
    Held,
    /// No renewal reached the database for a whole lease (by this gateway's clock): the
    /// lease may have lapsed and other gateways may be taking its devices. Reported once;
    /// the gateway stops serving its sessions (their agents go to another gateway) and its
    /// batches fail until the lease is renewed or joined again.
    Lapsed,
    /// The lease had lapsed: the gateway joined the cell again as a new incarnation and owns
    /// no device until it claims them again.
    Rejoined {
        /// The new incarnation.
        incarnation: i64,
    },
}

/// Who holds a device in a cell of gateways ([`StoreBatch::claim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// This gateway: its batches may write for the device.
    Ours,
    /// Another live gateway of the cell: the agent is sent there.
    Elsewhere {
        /// That gateway's id.
        gateway: String,
        /// Where agents reach it (HOST:PORT).
        addr: String,
    },
}

/// Reads, on a snapshot or on a batch (which sees its own writes).
pub trait Reads {
    /// The device with this id.
    fn device(&self, id: DeviceId) -> Result<Option<Device>>;
    /// The device with this name.
    fn device_by_name(&self, name: &str) -> Result<Option<Device>>;
    /// All devices, by id.
    fn devices(&self) -> Result<Vec<Device>>;
    /// The queue state of a device (`None` if the device does not exist).
    fn queue(&self, id: DeviceId) -> Result<Option<QueueState>>;
    /// Every queue, by device id: what the daemon loads on start.
    fn queues(&self) -> Result<Vec<(DeviceId, QueueState)>>;
    /// One queued command.
    fn command(&self, id: DeviceId, seq: u64) -> Result<Option<Command>>;
    /// Up to `limit` commands of a device with seq ≥ `from`, in queue order.
    fn commands(&self, id: DeviceId, from: u64, limit: usize) -> Result<Vec<(u64, Command)>>;
    /// The command to transmit next, if the queue is `running`.
    fn next_to_dispatch(&self, id: DeviceId) -> Result<Option<(u64, Command)>>;
    /// The recorded result of a command.
    fn result(&self, id: DeviceId, seq: u64) -> Result<Option<StoredResult>>;
    /// Members of a group, by id.
    fn group_members(&self, group: &str) -> Result<Vec<DeviceId>>;
    /// Every group and its members.
    fn groups(&self) -> Result<Vec<(String, Vec<DeviceId>)>>;
    /// One distribution task.
    fn task(&self, id: TaskId) -> Result<Option<Task>>;
    /// Every task, by id.
    fn tasks(&self) -> Result<Vec<(TaskId, Task)>>;
    /// Status of one device within a task.
    fn task_status(&self, task: TaskId, dev: DeviceId) -> Result<Option<TaskDeviceStatus>>;
    /// The task status table of one task, by device id.
    fn task_statuses(&self, task: TaskId) -> Result<Vec<(DeviceId, TaskDeviceStatus)>>;
    /// Tasks still pending or in progress for a device (catch-up on reconnect).
    fn incomplete_tasks(&self, dev: DeviceId) -> Result<Vec<TaskId>>;
    /// Up to `limit` events with id ≥ `from`, in order (tail the log with
    /// `from = last seen + 1`).
    fn events_from(&self, from: EventId, limit: usize) -> Result<Vec<(EventId, Event)>>;
    /// Id of the newest event, 0 if the log is empty.
    fn last_event_id(&self) -> Result<EventId>;
    /// Number of batches committed so far.
    fn commit_seq(&self) -> Result<u64>;
}

/// One atomic group of transitions (see the module docs).
pub trait StoreBatch: Reads + DeviceOps + QueueOps + TaskOps + EventOps {
    /// Number of transitions applied so far.
    fn len(&self) -> usize;
    /// True if no transition was applied.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Takes `dev` for this gateway, in this batch, if no other live gateway of the cell
    /// holds it; committed with the batch. The first thing a session's batch does, before
    /// any write for the device (those are fenced by the ownership this takes). An engine
    /// without a cell owns every device: [`Claimed::Ours`].
    fn claim(&mut self, dev: DeviceId) -> Result<Claimed> {
        let _ = dev;
        Ok(Claimed::Ours)
    }
    /// Gives `dev` up at the end of this batch's work for it (committed with the batch): the
    /// gateway its agent next says hello to claims it. A device enrolled here is released so
    /// that it settles on the gateway its agent prefers, not on the one that enrolled it.
    /// Nothing to give up without a cell.
    fn release(&mut self, dev: DeviceId) -> Result<()> {
        let _ = dev;
        Ok(())
    }
    /// Operator requests (queue, cancel, retry, skip, pause, resume, revoke, groups) act on
    /// any device of the cell. While `on`, an operation on a device another gateway owns is
    /// not refused: the device's row is locked, so it is serialized with that owner's
    /// batches, and the owner is told once this batch commits
    /// ([`Engine::changed_elsewhere`]), so it dispatches what was queued. Dispatches,
    /// results, reboots and deadlines are the owner's alone and stay fenced. Without a cell
    /// there is nothing to switch.
    fn operator_writes(&mut self, on: bool) {
        let _ = on;
    }
    /// Commits every transition of the batch durably. When it returns `Ok`, every transition
    /// is durable: only now may acknowledgements that depend on them go out. On `Err`
    /// nothing of the batch was written. A batch in which no transition succeeded changes
    /// nothing and costs no write (`operations: 0`, `commit_seq` unchanged).
    fn commit(self: Box<Self>) -> Result<Committed>;
}

/// Devices: enrolment tokens, enrolment, revocation, liveness, reports and groups.
pub trait DeviceOps {
    /// Stores a one-time enrolment token under the hash of its secret.
    fn add_enrolment_token(&mut self, hash: [u8; 32], token: EnrolmentToken) -> Result<()>;
    /// Enrols a device with a one-time token (consumed): the device gets the token's name and
    /// groups and the given credential hash.
    fn enrol(
        &mut self,
        token_hash: [u8; 32],
        credential: [u8; 32],
        now_ms: u64,
    ) -> Result<DeviceId>;
    /// Adds a device directly (operator action, no token).
    fn add_device(&mut self, name: &str, credential: [u8; 32], now_ms: u64) -> Result<DeviceId>;
    /// Revokes a device: no more enqueues or transmissions.
    fn revoke(&mut self, dev: DeviceId) -> Result<()>;
    /// Records that the device was heard from (and over which transport, if known).
    fn device_seen(
        &mut self,
        dev: DeviceId,
        now_ms: u64,
        transport: Option<Transport>,
    ) -> Result<()>;
    /// Stores a configuration report.
    fn set_report(
        &mut self,
        dev: DeviceId,
        report: wire::ConfigReport<'static>,
        now_ms: u64,
    ) -> Result<()>;
    /// Adds a device to a group.
    fn join_group(&mut self, group: &str, dev: DeviceId) -> Result<()>;
    /// Removes a device from a group (no-op if not a member).
    fn leave_group(&mut self, group: &str, dev: DeviceId) -> Result<()>;
}

/// Command queues: enqueue, transmission, results, timeouts, reboots and operator actions.
pub trait QueueOps {
    /// Appends a command to a device's queue; returns its sequence number.
    fn enqueue(&mut self, dev: DeviceId, cmd: Command) -> Result<u64>;
    /// Appends a command to the queue of every non-revoked member of a group.
    fn enqueue_group(&mut self, group: &str, cmd: Command) -> Result<Vec<(DeviceId, u64)>>;
    /// The command `seq` is being transmitted at `now_ms` as a new attempt: cursor = `seq`,
    /// status `awaiting_result`, attempts + 1; returns the attempt number to send (see
    /// [`QueueState::attempt`]). Only the next pending command may be transmitted, or the one
    /// in flight again (a retransmission, still counted against `max_attempts`).
    fn mark_transmitted(&mut self, dev: DeviceId, seq: u64, now_ms: u64) -> Result<u32>;
    /// The command in flight (`seq`, the cursor) is sent again to a device whose `Hello`
    /// proves it never received it (it names an older command): unlike
    /// [`mark_transmitted`](Self::mark_transmitted) this is not counted as an attempt — the
    /// device never saw the earlier transmission (e.g. the gateway died between commit and
    /// send). Only the transmission time (and so the result deadline) moves; the attempt
    /// number it returns is the one already sent.
    fn redeliver(&mut self, dev: DeviceId, seq: u64, now_ms: u64) -> Result<u32>;
    /// Records the result of attempt `attempt` of `seq`. A retransmitted identical result
    /// returns [`Recorded::Duplicate`]; a different one for a finished command is
    /// [`Illegal::ConflictingResult`](crate::Illegal::ConflictingResult); one of an attempt
    /// other than the current one is [`Illegal::StaleAttempt`](crate::Illegal::StaleAttempt);
    /// a result for a command never transmitted is
    /// [`Illegal::NotTransmitted`](crate::Illegal::NotTransmitted). A failed result is retried
    /// while attempts remain, then the command's failure policy applies. Output excerpts are
    /// cut to their last 4 KiB. Whether a result is the one already stored ignores when each
    /// was received. A result over the wire's limits is
    /// [`Illegal::Invalid`](crate::Illegal::Invalid).
    fn record_result(
        &mut self,
        dev: DeviceId,
        seq: u64,
        attempt: u32,
        result: Received,
    ) -> Result<Recorded>;
    /// The command in flight got no result by `transmitted + timeout`: retried while attempts
    /// remain, else the failure policy applies (`Continue` stores a synthetic failed result).
    fn command_timed_out(&mut self, dev: DeviceId, seq: u64, now_ms: u64) -> Result<QueueStatus>;
    /// The agent announced that `seq` (a command with a `Reboot` step) is rebooting the device,
    /// leaving boot `boot_id` (`RebootStarting.boot_id`): the reboot completes only on another.
    fn reboot_started(
        &mut self,
        dev: DeviceId,
        seq: u64,
        deadline_ms: u64,
        boot_id: &str,
    ) -> Result<()>;
    /// The command in flight, `seq`, was sent to the device's session on boot `boot_id`: a
    /// reboot it does must come back on another boot, also when its `RebootStarting` never
    /// reaches the store (then this is the only record of the boot it left).
    fn boot_at_dispatch(&mut self, dev: DeviceId, seq: u64, boot_id: &str) -> Result<()>;
    /// The device is back from the reboot of attempt `attempt` of `seq` with a *new* boot id:
    /// stores its report and the reboot command's result, and moves the queue on (as
    /// [`record_result`](Self::record_result)).
    fn reboot_completed(
        &mut self,
        dev: DeviceId,
        seq: u64,
        attempt: u32,
        report: wire::ConfigReport<'static>,
        result: Received,
        now_ms: u64,
    ) -> Result<QueueStatus>;
    /// The reboot deadline passed: the queue fails with `RebootDeadlineMissed`.
    fn reboot_deadline_missed(&mut self, dev: DeviceId, now_ms: u64) -> Result<()>;
    /// Pauses the queue (after the command in flight, if any).
    fn pause(&mut self, dev: DeviceId) -> Result<()>;
    /// Resumes a paused queue (or withdraws a pending pause request).
    fn resume(&mut self, dev: DeviceId) -> Result<()>;
    /// Retries the failed command of a `failed` queue (attempts reset).
    fn retry(&mut self, dev: DeviceId) -> Result<()>;
    /// Skips the failed command of a `failed` queue (a `skipped` result is stored if none).
    fn skip(&mut self, dev: DeviceId) -> Result<()>;
    /// Drops every pending command, the one in flight too (the queue is released at once; a
    /// late result of it is refused); returns how many.
    fn cancel(&mut self, dev: DeviceId) -> Result<u64>;
}

/// Distribution tasks: creation, targets, and each target's progress to completion.
pub trait TaskOps {
    /// Creates a distribution task with every target `pending`; returns its id.
    fn create_task(&mut self, task: Task, targets: &[DeviceId]) -> Result<TaskId>;
    /// Records that the task's multicast first pass is over (a restart then catches its
    /// devices up by unicast); idempotent.
    fn task_pass_done(&mut self, task: TaskId) -> Result<()>;
    /// Stops a task from following its group and from waiting for devices to come online
    /// (an operator cancelled the whole task): `true` if it did either. Idempotent, and then
    /// `false` (nothing is written).
    fn task_unfollow(&mut self, task: TaskId) -> Result<bool>;
    /// Adds a target to a task (`pending`); no-op if it already is one.
    fn add_task_target(&mut self, task: TaskId, dev: DeviceId) -> Result<()>;
    /// Merges received blocks: `pending`/`in_progress` → `in_progress`.
    fn task_progress(&mut self, task: TaskId, dev: DeviceId, blocks: BlockSet) -> Result<()>;
    /// The device's own account of what it holds (its task finisher's ask), which replaces
    /// the row's blocks rather than merging them: `pending`/`in_progress` → `in_progress(blocks)`,
    /// or `pending` when `blocks` is empty (a device that lost its records holds nothing).
    fn task_reported(&mut self, task: TaskId, dev: DeviceId, blocks: BlockSet) -> Result<()>;
    /// `pending`/`in_progress` → `completed`: `true`. Idempotent on `completed`, and then
    /// `false`, so a caller acts on a completion (queues its follow-ups) exactly once however
    /// often the device repeats it.
    fn task_completed(&mut self, task: TaskId, dev: DeviceId) -> Result<bool>;
    /// `pending`/`in_progress` → `failed(reason)`.
    fn task_failed(&mut self, task: TaskId, dev: DeviceId, reason: &str) -> Result<()>;
    /// `failed`/`cancelled` → `pending` (the operator's `task retry`).
    fn task_retry(&mut self, task: TaskId, dev: DeviceId) -> Result<()>;
    /// `pending`/`in_progress` → `cancelled` (the operator's `task cancel`).
    fn task_cancel(&mut self, task: TaskId, dev: DeviceId) -> Result<()>;
}

/// The event log and retention.
pub trait EventOps {
    /// Appends to the event log; returns the event's id.
    fn append_event(&mut self, event: Event) -> Result<EventId>;
    /// Deletes the oldest events while there are more than `keep_max` (0: no count limit) or
    /// the oldest is older than `older_than_ms` (0: no age limit), at most `limit` of them
    /// (bounded work: call again while it returns `limit`). The newest event is never
    /// deleted, so event ids keep increasing and `fleetcast watch` followers never see an id
    /// reused. Returns how many were deleted. A prune that deletes nothing is not a
    /// transition (a batch of such prunes is not committed).
    fn prune_events(&mut self, older_than_ms: u64, keep_max: u64, limit: usize) -> Result<usize>;
    /// Deletes the commands (and their results) of finished commands older than the last
    /// `keep` queue positions of each device (`seq + keep <= completed_through`; pending and
    /// in-flight commands are never touched), visiting devices from `from` upwards. The work
    /// is bounded by `limit` steps (one per deleted command, one per device visited).
    /// Returns how many commands were deleted and the device to resume from (`None`: the
    /// scan reached the last device). `keep == 0` deletes nothing.
    fn prune_results(
        &mut self,
        from: DeviceId,
        keep: u64,
        limit: usize,
    ) -> Result<(usize, Option<DeviceId>)>;
}
