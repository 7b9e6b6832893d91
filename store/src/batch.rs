//! Write batches: group commit of many transitions in one LMDB write transaction.
//!
//! # Driving contract (the daemon's loop)
//! 1. Once per loop iteration, `let mut b = store.batch()?`.
//! 2. Apply every transition the iteration produced (`b.mark_transmitted(..)`,
//!    `b.record_result(..)`, ...). Each call validates first and returns a typed refusal
//!    ([`Error::IllegalTransition`], [`Error::NotFound`]) *without writing anything*; the
//!    batch stays usable and the other transitions still commit. Reads on the batch see its
//!    own uncommitted writes.
//! 3. `b.commit()?` writes everything with one fsync (LMDB's default durable commit). When it
//!    returns `Ok`, every transition of the batch is durable: only now send the acks/messages
//!    that depend on them. Each peer thus waits for exactly one fsync, the one of the batch
//!    holding its change, never for a queue of other peers' fsyncs.
//! 4. If `commit` fails, *nothing* of the batch was written (LMDB commits atomically) and
//!    everything committed before is intact; the caller must not ack. [`Error::DiskFull`] is
//!    the full-file-system case.
//!
//! # Replay on map growth
//! Each successful operation is recorded (it owns its arguments). If LMDB reports
//! `MDB_MAP_FULL` — during an operation or during the commit itself — the transaction is
//! aborted, the map doubled, a fresh transaction begun and the recorded operations applied
//! again; they are deterministic functions of the committed state, so they produce the same
//! results the caller already saw. Callers never see "map full".
//!
//! Other storage errors (I/O, corruption) poison the batch: later calls and `commit` return
//! [`Error::Poisoned`] (the first call returned the cause).

use std::path::Path;

use lmdb::{Environment, RwTransaction, Transaction, WriteFlags};

use crate::codec::Record;
use crate::env::{self, key2, Dbs};
use crate::error::{Error, Illegal, Missing, Result};
use crate::queue::AfterFailure;
use crate::read::{self, read_methods};
use crate::types::{
    BlockSet, Command, CommandPolicy, CommandResult, ConfigReport, Device, DeviceId,
    EnrolmentToken, Event, EventId, FailReason, QueueState, QueueStatus, StepOutcome, StepResult,
    Task, TaskDeviceStatus, TaskId, Transport,
};

/// What [`Batch::record_result`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The result was stored; the queue is now in this status.
    Stored(QueueStatus),
    /// The same result was already stored (a retransmission): nothing changed. Ack it again.
    Duplicate,
}

/// A successful commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Number of batches committed in this environment, this one included (an empty batch
    /// is not committed: the count is unchanged).
    pub commit_seq: u64,
    /// Operations (transitions) made durable by this commit.
    pub operations: usize,
}

#[derive(Debug)]
enum Op {
    AddToken {
        hash: [u8; 32],
        token: EnrolmentToken,
    },
    Enrol {
        hash: [u8; 32],
        credential: [u8; 32],
        now: u64,
    },
    AddDevice {
        name: String,
        credential: [u8; 32],
        now: u64,
    },
    Revoke(DeviceId),
    Seen {
        dev: DeviceId,
        now: u64,
        transport: Option<Transport>,
    },
    Report {
        dev: DeviceId,
        report: ConfigReport,
        now: u64,
    },
    JoinGroup {
        group: String,
        dev: DeviceId,
    },
    LeaveGroup {
        group: String,
        dev: DeviceId,
    },
    Enqueue {
        dev: DeviceId,
        cmd: Command,
    },
    EnqueueGroup {
        group: String,
        cmd: Command,
    },
    Transmitted {
        dev: DeviceId,
        seq: u64,
        now: u64,
    },
    Redeliver {
        dev: DeviceId,
        seq: u64,
        now: u64,
    },
    Result {
        dev: DeviceId,
        seq: u64,
        attempt: u32,
        result: CommandResult,
    },
    TimedOut {
        dev: DeviceId,
        seq: u64,
        now: u64,
    },
    RebootStarted {
        dev: DeviceId,
        seq: u64,
        deadline: u64,
        boot: String,
    },
    BootAtDispatch {
        dev: DeviceId,
        seq: u64,
        boot: String,
    },
    RebootCompleted {
        dev: DeviceId,
        seq: u64,
        attempt: u32,
        report: ConfigReport,
        result: CommandResult,
        now: u64,
    },
    RebootMissed {
        dev: DeviceId,
        now: u64,
    },
    Pause(DeviceId),
    Resume(DeviceId),
    Retry(DeviceId),
    Skip(DeviceId),
    Cancel(DeviceId),
    CreateTask {
        task: Task,
        targets: Vec<DeviceId>,
    },
    AddTarget {
        task: TaskId,
        dev: DeviceId,
    },
    TaskProgress {
        task: TaskId,
        dev: DeviceId,
        blocks: BlockSet,
    },
    TaskCompleted {
        task: TaskId,
        dev: DeviceId,
    },
    TaskFailed {
        task: TaskId,
        dev: DeviceId,
        reason: String,
    },
    TaskRetry {
        task: TaskId,
        dev: DeviceId,
    },
    Event(Event),
    PruneEvents {
        older_than: u64,
        keep_max: u64,
        limit: usize,
    },
    PruneResults {
        from: DeviceId,
        keep: u64,
        limit: usize,
    },
}

#[derive(Debug)]
enum Out {
    Unit,
    U64(u64),
    Status(QueueStatus),
    Recorded(Recorded),
    Pairs(Vec<(DeviceId, u64)>),
    /// Entries deleted, and where a bounded scan stopped (`None`: at the end).
    Pruned(usize, Option<DeviceId>),
}

impl Out {
    /// Whether the operation wrote anything: a prune that found nothing to delete is not
    /// recorded, so a batch holding only such prunes stays empty and is not committed.
    fn wrote(&self) -> bool {
        !matches!(self, Out::Pruned(0, _))
    }
}

/// One write transaction collecting many transitions. See the module docs for the contract.
/// Dropping a batch without committing aborts it.
pub struct Batch<'s> {
    env: &'s Environment,
    path: &'s Path,
    dbs: &'s Dbs,
    txn: Option<RwTransaction<'s>>,
    ops: Vec<Op>,
    buf: Vec<u8>,
    poisoned: bool,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("operations", &self.ops.len())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

fn is_map_full(e: &Error) -> bool {
    matches!(e, Error::Lmdb(lmdb::Error::MapFull))
}

impl<'s> Batch<'s> {
    pub(crate) fn begin(env: &'s Environment, path: &'s Path, dbs: &'s Dbs) -> Result<Self> {
        env::grow_if_needed(env)?;
        Ok(Batch {
            env,
            path,
            dbs,
            txn: Some(begin_rw(env)?),
            ops: Vec::new(),
            buf: Vec::with_capacity(256),
            poisoned: false,
        })
    }

    fn read_parts(&self) -> Result<(&RwTransaction<'s>, &Dbs)> {
        match &self.txn {
            Some(t) if !self.poisoned => Ok((t, self.dbs)),
            _ => Err(Error::Poisoned),
        }
    }

    read_methods!();

    /// Number of transitions applied so far.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True if no transition was applied.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn poison(&mut self, e: Error) -> Error {
        self.poisoned = true;
        self.txn = None;
        e
    }

    /// Aborts the transaction, doubles the map and re-applies the recorded operations.
    fn grow_and_replay(&mut self) -> Result<()> {
        loop {
            self.txn = None;
            if let Err(e) = env::grow(self.env) {
                return Err(self.poison(e));
            }
            let mut txn = match self.env.begin_rw_txn() {
                Ok(t) => t,
                Err(e) => return Err(self.poison(e.into())),
            };
            let mut full = false;
            for op in &self.ops {
                match apply(&mut txn, self.dbs, &mut self.buf, op) {
                    Ok(_) => {}
                    Err(e) if is_map_full(&e) => {
                        full = true;
                        break;
                    }
                    Err(e) => {
                        drop(txn);
                        return Err(self.poison(e));
                    }
                }
            }
            self.txn = Some(txn);
            if !full {
                return Ok(());
            }
        }
    }

    fn exec(&mut self, op: Op) -> Result<Out> {
        loop {
            if self.poisoned {
                return Err(Error::Poisoned);
            }
            let Some(txn) = self.txn.as_mut() else {
                return Err(Error::Poisoned);
            };
            match apply(txn, self.dbs, &mut self.buf, &op) {
                Ok(out) => {
                    if out.wrote() {
                        self.ops.push(op);
                    }
                    return Ok(out);
                }
                Err(e) if e.is_refusal() => return Err(e),
                Err(e) if is_map_full(&e) => self.grow_and_replay()?,
                Err(e) => {
                    let e = e.classify_io(self.path);
                    return Err(self.poison(e));
                }
            }
        }
    }

    /// Commits every transition of the batch durably (one fsync). See the module docs.
    ///
    /// A batch in which no transition succeeded (nothing applied, or every call refused) is
    /// not committed at all: it changed nothing, so it costs no write and no fsync (a storm of
    /// bad enrolment tokens must not turn into a storm of disk syncs). `Committed` then has
    /// `operations: 0` and the unchanged `commit_seq`.
    pub fn commit(mut self) -> Result<Committed> {
        if self.ops.is_empty() && !self.poisoned {
            if let Some(txn) = self.txn.take() {
                let seq = env::meta_u64(&txn, self.dbs.meta, env::META_COMMIT_SEQ)?;
                txn.abort();
                return Ok(Committed {
                    commit_seq: seq,
                    operations: 0,
                });
            }
        }
        loop {
            if self.poisoned {
                return Err(Error::Poisoned);
            }
            let Some(mut txn) = self.txn.take() else {
                return Err(Error::Poisoned);
            };
            let seq = match bump_commit_seq(&mut txn, self.dbs) {
                Ok(s) => s,
                Err(e) if is_map_full(&e) => {
                    drop(txn);
                    self.grow_and_replay()?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match txn.commit() {
                Ok(()) => {
                    return Ok(Committed {
                        commit_seq: seq,
                        operations: self.ops.len(),
                    })
                }
                // mdb_txn_commit frees the transaction on failure.
                Err(lmdb::Error::MapFull) => self.grow_and_replay()?,
                Err(e) => return Err(Error::from(e).classify_io(self.path)),
            }
        }
    }

    /// Discards the batch.
    pub fn abort(self) {}

    // ---- devices ----

    /// Stores a one-time enrolment token under the hash of its secret.
    pub fn add_enrolment_token(&mut self, hash: [u8; 32], token: EnrolmentToken) -> Result<()> {
        self.exec(Op::AddToken { hash, token }).map(drop)
    }

    /// Enrols a device with a one-time token (consumed): the device gets the token's name and
    /// groups and the given credential hash.
    pub fn enrol(
        &mut self,
        token_hash: [u8; 32],
        credential: [u8; 32],
        now_ms: u64,
    ) -> Result<DeviceId> {
        match self.exec(Op::Enrol {
            hash: token_hash,
            credential,
            now: now_ms,
        })? {
            Out::U64(id) => Ok(DeviceId(id)),
            _ => unreachable_out(),
        }
    }

    /// Adds a device directly (operator action, no token).
    pub fn add_device(
        &mut self,
        name: &str,
        credential: [u8; 32],
        now_ms: u64,
    ) -> Result<DeviceId> {
        let op = Op::AddDevice {
            name: name.to_owned(),
            credential,
            now: now_ms,
        };
        match self.exec(op)? {
            Out::U64(id) => Ok(DeviceId(id)),
            _ => unreachable_out(),
        }
    }

    /// Revokes a device: no more enqueues or transmissions.
    pub fn revoke(&mut self, dev: DeviceId) -> Result<()> {
        self.exec(Op::Revoke(dev)).map(drop)
    }

    /// Records that the device was heard from (and over which transport, if known).
    pub fn device_seen(
        &mut self,
        dev: DeviceId,
        now_ms: u64,
        transport: Option<Transport>,
    ) -> Result<()> {
        self.exec(Op::Seen {
            dev,
            now: now_ms,
            transport,
        })
        .map(drop)
    }

    /// Stores a configuration report.
    pub fn set_report(&mut self, dev: DeviceId, report: ConfigReport, now_ms: u64) -> Result<()> {
        self.exec(Op::Report {
            dev,
            report,
            now: now_ms,
        })
        .map(drop)
    }

    /// Adds a device to a group.
    pub fn join_group(&mut self, group: &str, dev: DeviceId) -> Result<()> {
        self.exec(Op::JoinGroup {
            group: group.to_owned(),
            dev,
        })
        .map(drop)
    }

    /// Removes a device from a group (no-op if not a member).
    pub fn leave_group(&mut self, group: &str, dev: DeviceId) -> Result<()> {
        self.exec(Op::LeaveGroup {
            group: group.to_owned(),
            dev,
        })
        .map(drop)
    }

    // ---- queues ----

    /// Appends a command to a device's queue; returns its sequence number.
    pub fn enqueue(&mut self, dev: DeviceId, cmd: Command) -> Result<u64> {
        match self.exec(Op::Enqueue { dev, cmd })? {
            Out::U64(s) => Ok(s),
            _ => unreachable_out(),
        }
    }

    /// Appends a command to the queue of every non-revoked member of a group.
    pub fn enqueue_group(&mut self, group: &str, cmd: Command) -> Result<Vec<(DeviceId, u64)>> {
        match self.exec(Op::EnqueueGroup {
            group: group.to_owned(),
            cmd,
        })? {
            Out::Pairs(p) => Ok(p),
            _ => unreachable_out(),
        }
    }

    /// The command `seq` is being transmitted at `now_ms` as a new attempt: cursor = `seq`,
    /// status `awaiting_result`, attempts + 1; returns the attempt number to send (see
    /// [`QueueState::attempt`]). Only the next pending command may be transmitted, or the one
    /// in flight again (a retransmission, still counted against `max_attempts`).
    pub fn mark_transmitted(&mut self, dev: DeviceId, seq: u64, now_ms: u64) -> Result<u32> {
        match self.exec(Op::Transmitted {
            dev,
            seq,
            now: now_ms,
        })? {
            Out::U64(a) => Ok(a as u32),
            _ => unreachable_out(),
        }
    }

    /// The command in flight (`seq`, the cursor) is sent again to a device whose `Hello`
    /// proves it never received it (it names an older command): unlike
    /// [`mark_transmitted`](Self::mark_transmitted) this is not counted as an attempt — the
    /// device never saw the earlier transmission (e.g. the gateway died between commit and
    /// send). Only the transmission time (and so the result deadline) moves; the attempt
    /// number it returns is the one already sent.
    pub fn redeliver(&mut self, dev: DeviceId, seq: u64, now_ms: u64) -> Result<u32> {
        match self.exec(Op::Redeliver {
            dev,
            seq,
            now: now_ms,
        })? {
            Out::U64(a) => Ok(a as u32),
            _ => unreachable_out(),
        }
    }

    /// Records the result of attempt `attempt` of `seq`. A retransmitted identical result
    /// returns [`Recorded::Duplicate`]; a different one for a finished command is
    /// [`Illegal::ConflictingResult`]; one of an attempt other than the current one is
    /// [`Illegal::StaleAttempt`]; a result for a command never transmitted is
    /// [`Illegal::NotTransmitted`]. A failed result is retried while attempts remain, then the
    /// command's failure policy applies. Output excerpts are cut to their last 4 KiB.
    pub fn record_result(
        &mut self,
        dev: DeviceId,
        seq: u64,
        attempt: u32,
        mut result: CommandResult,
    ) -> Result<Recorded> {
        result.bound();
        match self.exec(Op::Result {
            dev,
            seq,
            attempt,
            result,
        })? {
            Out::Recorded(r) => Ok(r),
            _ => unreachable_out(),
        }
    }

    /// The command in flight got no result by `transmitted + timeout`: retried while attempts
    /// remain, else the failure policy applies (`Continue` stores a synthetic failed result).
    pub fn command_timed_out(
        &mut self,
        dev: DeviceId,
        seq: u64,
        now_ms: u64,
    ) -> Result<QueueStatus> {
        match self.exec(Op::TimedOut {
            dev,
            seq,
            now: now_ms,
        })? {
            Out::Status(s) => Ok(s),
            _ => unreachable_out(),
        }
    }

    /// The agent announced that `seq` (a command with a `Reboot` step) is rebooting the device,
    /// leaving boot `boot_id` (`RebootStarting.boot_id`): the reboot completes only on another.
    pub fn reboot_started(
        &mut self,
        dev: DeviceId,
        seq: u64,
        deadline_ms: u64,
        boot_id: &str,
    ) -> Result<()> {
        self.exec(Op::RebootStarted {
            dev,
            seq,
            deadline: deadline_ms,
            boot: boot_id.to_owned(),
        })
        .map(drop)
    }

    /// The command in flight, `seq`, was sent to the device's session on boot `boot_id`: a
    /// reboot it does must come back on another boot, also when its `RebootStarting` never
    /// reaches the store (then this is the only record of the boot it left).
    pub fn boot_at_dispatch(&mut self, dev: DeviceId, seq: u64, boot_id: &str) -> Result<()> {
        self.exec(Op::BootAtDispatch {
            dev,
            seq,
            boot: boot_id.to_owned(),
        })
        .map(drop)
    }

    /// The device is back from the reboot of attempt `attempt` of `seq` with a *new* boot id:
    /// stores its report and the reboot command's result, and moves the queue on (as
    /// [`record_result`](Self::record_result)).
    pub fn reboot_completed(
        &mut self,
        dev: DeviceId,
        seq: u64,
        attempt: u32,
        report: ConfigReport,
        mut result: CommandResult,
        now_ms: u64,
    ) -> Result<QueueStatus> {
        result.bound();
        match self.exec(Op::RebootCompleted {
            dev,
            seq,
            attempt,
            report,
            result,
            now: now_ms,
        })? {
            Out::Status(s) => Ok(s),
            _ => unreachable_out(),
        }
    }

    /// The reboot deadline passed: the queue fails with `RebootDeadlineMissed`.
    pub fn reboot_deadline_missed(&mut self, dev: DeviceId, now_ms: u64) -> Result<()> {
        self.exec(Op::RebootMissed { dev, now: now_ms }).map(drop)
    }

    /// Pauses the queue (after the command in flight, if any).
    pub fn pause(&mut self, dev: DeviceId) -> Result<()> {
        self.exec(Op::Pause(dev)).map(drop)
    }

    /// Resumes a paused queue (or withdraws a pending pause request).
    pub fn resume(&mut self, dev: DeviceId) -> Result<()> {
        self.exec(Op::Resume(dev)).map(drop)
    }

    /// Retries the failed command of a `failed` queue (attempts reset).
    pub fn retry(&mut self, dev: DeviceId) -> Result<()> {
        self.exec(Op::Retry(dev)).map(drop)
    }

    /// Skips the failed command of a `failed` queue (a `skipped` result is stored if none).
    pub fn skip(&mut self, dev: DeviceId) -> Result<()> {
        self.exec(Op::Skip(dev)).map(drop)
    }

    /// Drops every pending command, the one in flight too (the queue is released at once; a
    /// late result of it is refused); returns how many.
    pub fn cancel(&mut self, dev: DeviceId) -> Result<u64> {
        match self.exec(Op::Cancel(dev))? {
            Out::U64(n) => Ok(n),
            _ => unreachable_out(),
        }
    }

    // ---- tasks ----

    /// Creates a distribution task with every target `pending`; returns its id.
    pub fn create_task(&mut self, task: Task, targets: &[DeviceId]) -> Result<TaskId> {
        match self.exec(Op::CreateTask {
            task,
            targets: targets.to_vec(),
        })? {
            Out::U64(id) => Ok(TaskId(id)),
            _ => unreachable_out(),
        }
    }

    /// Adds a target to a task (`pending`); no-op if it already is one.
    pub fn add_task_target(&mut self, task: TaskId, dev: DeviceId) -> Result<()> {
        self.exec(Op::AddTarget { task, dev }).map(drop)
    }

    /// Merges received blocks: `pending`/`in_progress` → `in_progress`.
    pub fn task_progress(&mut self, task: TaskId, dev: DeviceId, blocks: BlockSet) -> Result<()> {
        self.exec(Op::TaskProgress { task, dev, blocks }).map(drop)
    }

    /// `pending`/`in_progress` → `completed` (idempotent on `completed`).
    pub fn task_completed(&mut self, task: TaskId, dev: DeviceId) -> Result<()> {
        self.exec(Op::TaskCompleted { task, dev }).map(drop)
    }

    /// `pending`/`in_progress` → `failed(reason)`.
    pub fn task_failed(&mut self, task: TaskId, dev: DeviceId, reason: &str) -> Result<()> {
        let op = Op::TaskFailed {
            task,
            dev,
            reason: reason.to_owned(),
        };
        self.exec(op).map(drop)
    }

    /// `failed` → `pending`.
    pub fn task_retry(&mut self, task: TaskId, dev: DeviceId) -> Result<()> {
        self.exec(Op::TaskRetry { task, dev }).map(drop)
    }

    // ---- events ----

    /// Appends to the event log; returns the event's id.
    pub fn append_event(&mut self, event: Event) -> Result<EventId> {
        match self.exec(Op::Event(event))? {
            Out::U64(id) => Ok(id),
            _ => unreachable_out(),
        }
    }

    // ---- retention ----

    /// Deletes the oldest events while there are more than `keep_max` (0: no count limit) or
    /// the oldest is older than `older_than_ms` (0: no age limit), at most `limit` of them
    /// (bounded work: call again while it returns `limit`). The newest event is never
    /// deleted, so event ids keep increasing and `fleetcast watch` followers never see an id
    /// reused. Returns how many were deleted.
    pub fn prune_events(
        &mut self,
        older_than_ms: u64,
        keep_max: u64,
        limit: usize,
    ) -> Result<usize> {
        match self.exec(Op::PruneEvents {
            older_than: older_than_ms,
            keep_max,
            limit,
        })? {
            Out::Pruned(n, _) => Ok(n),
            _ => unreachable_out(),
        }
    }

    /// Deletes the commands (and their results) of finished commands older than the last
    /// `keep` queue positions of each device (`seq + keep <= completed_through`; pending and
    /// in-flight commands are never touched), visiting devices from `from` upwards. The work
    /// is bounded by `limit` steps (one per deleted command, one per device visited).
    /// Returns how many commands were deleted and the device to resume from (`None`: the
    /// scan reached the last device). `keep == 0` deletes nothing.
    pub fn prune_results(
        &mut self,
        from: DeviceId,
        keep: u64,
        limit: usize,
    ) -> Result<(usize, Option<DeviceId>)> {
        match self.exec(Op::PruneResults { from, keep, limit })? {
            Out::Pruned(n, next) => Ok((n, next)),
            _ => unreachable_out(),
        }
    }
}

/// `exec` returns the `Out` variant matching its `Op`; a mismatch is a bug in this file.
#[allow(clippy::panic)]
fn unreachable_out<T>() -> T {
    panic!("store: operation returned the wrong output kind")
}

/// Begins a write transaction, adopting a map grown by another process (`MDB_MAP_RESIZED`).
/// Safe because the caller holds `&mut Store`: no other transaction of this process is open.
fn begin_rw(env: &Environment) -> Result<RwTransaction<'_>> {
    match env.begin_rw_txn() {
        Err(lmdb::Error::MapResized) => {
            env.set_map_size(0)?;
            Ok(env.begin_rw_txn()?)
        }
        other => Ok(other?),
    }
}

fn bump_commit_seq(txn: &mut RwTransaction<'_>, d: &Dbs) -> Result<u64> {
    let seq = env::meta_u64(txn, d.meta, env::META_COMMIT_SEQ)? + 1;
    txn.put(
        d.meta,
        &env::META_COMMIT_SEQ,
        &seq.to_le_bytes(),
        WriteFlags::empty(),
    )?;
    Ok(seq)
}

/// Write helpers over one transaction.
struct Cx<'a, 't> {
    t: &'a mut RwTransaction<'t>,
    d: &'a Dbs,
    buf: &'a mut Vec<u8>,
}

impl Cx<'_, '_> {
    fn put<R: Record>(&mut self, db: lmdb::Database, key: &[u8], rec: &R) -> Result<()> {
        rec.encode(self.buf);
        self.t
            .put(db, &key, &self.buf.as_slice(), WriteFlags::empty())?;
        Ok(())
    }
    fn put_raw(&mut self, db: lmdb::Database, key: &[u8], val: &[u8]) -> Result<()> {
        self.t.put(db, &key, &val, WriteFlags::empty())?;
        Ok(())
    }
    fn del(&mut self, db: lmdb::Database, key: &[u8]) -> Result<()> {
        match self.t.del(db, &key, None) {
            Ok(()) | Err(lmdb::Error::NotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    fn queue(&self, dev: DeviceId) -> Result<QueueState> {
        read::queue(&*self.t, self.d, dev)?.ok_or(Error::NotFound(Missing::Device(dev)))
    }
    fn device(&self, dev: DeviceId) -> Result<Device> {
        read::device(&*self.t, self.d, dev)?.ok_or(Error::NotFound(Missing::Device(dev)))
    }
    /// The queue of a device that is not revoked.
    fn live_queue(&self, dev: DeviceId) -> Result<QueueState> {
        let q = self.queue(dev)?;
        if q.revoked {
            return Err(Error::illegal(dev, Illegal::Revoked));
        }
        Ok(q)
    }
    fn put_queue(&mut self, dev: DeviceId, q: &QueueState) -> Result<()> {
        let d = self.d.queues;
        self.put(d, &dev.0.to_be_bytes(), q)
    }
    fn first_after(&self, dev: DeviceId, after: u64) -> Result<Option<u64>> {
        read::first_after(&*self.t, self.d, dev, after)
    }
    fn cursor_policy(&self, dev: DeviceId, seq: u64) -> Result<CommandPolicy> {
        read::command_policy(&*self.t, self.d, dev, seq)?.ok_or(Error::Corrupt {
            table: "commands",
            reason: "queue cursor names a missing command",
        })
    }
    fn task_entry(&self, task: TaskId, dev: DeviceId) -> Result<TaskDeviceStatus> {
        read::task_status(&*self.t, self.d, task, dev)?
            .ok_or(Error::NotFound(Missing::TaskTarget { task, device: dev }))
    }
    fn set_task_entry(&mut self, task: TaskId, dev: DeviceId, st: &TaskDeviceStatus) -> Result<()> {
        let (ts, dt) = (self.d.task_status, self.d.device_tasks);
        self.put(ts, &key2(task.0, dev.0), st)?;
        if st.is_incomplete() {
            self.put_raw(dt, &key2(dev.0, task.0), &[])
        } else {
            self.del(dt, &key2(dev.0, task.0))
        }
    }
    fn new_device(
        &mut self,
        name: &str,
        credential: [u8; 32],
        now: u64,
        groups: &[String],
    ) -> Result<u64> {
        let id = env::meta_u64(&*self.t, self.d.meta, env::META_NEXT_DEVICE)? + 1;
        let dev = Device {
            id: DeviceId(id),
            name: name.to_owned(),
            credential_hash: credential,
            revoked: false,
            enrolled_ms: now,
            last_seen_ms: None,
            report: None,
            transport: None,
        };
        let d = *self.d;
        self.put_raw(d.meta, env::META_NEXT_DEVICE, &id.to_le_bytes())?;
        self.put(d.devices, &id.to_be_bytes(), &dev)?;
        self.put_raw(d.device_names, name.as_bytes(), &id.to_be_bytes())?;
        self.put_queue(DeviceId(id), &QueueState::default())?;
        for g in groups {
            self.put_raw(d.groups, &env::group_key(g, DeviceId(id)), &[])?;
        }
        Ok(id)
    }
    /// Stores `result` for the cursor command and moves the queue on.
    fn finish_attempt(
        &mut self,
        dev: DeviceId,
        q: &mut QueueState,
        seq: u64,
        result: &CommandResult,
    ) -> Result<()> {
        let more = self.first_after(dev, seq)?.is_some();
        if result.succeeded() {
            q.command_succeeded(more);
        } else {
            let policy = self.cursor_policy(dev, seq)?;
            q.command_failed(&policy, FailReason::CommandFailed, more);
        }
        let r = self.d.results;
        self.put(r, &key2(dev.0, seq), result)?;
        self.put_queue(dev, q)
    }
}

fn validate_command(dev: DeviceId, cmd: &Command) -> Result<()> {
    if cmd.steps.is_empty() {
        return Err(Error::illegal(
            dev,
            Illegal::Invalid("command has no steps"),
        ));
    }
    if cmd.max_attempts == 0 {
        return Err(Error::illegal(dev, Illegal::Invalid("max_attempts is 0")));
    }
    Ok(())
}

fn synthetic(outcome: StepOutcome, note: &str, now: u64) -> CommandResult {
    CommandResult {
        steps: vec![StepResult {
            outcome,
            exit_code: None,
            output: note.as_bytes().to_vec(),
            started_ms: now,
            finished_ms: now,
        }],
    }
}

fn task_illegal(op: &'static str, st: &TaskDeviceStatus) -> Error {
    Error::IllegalTransition {
        device: None,
        kind: Illegal::TaskStatus {
            op,
            current: st.name(),
        },
    }
}

/// Applies one operation: validate (reads only), then write.
fn apply(t: &mut RwTransaction<'_>, d: &Dbs, buf: &mut Vec<u8>, op: &Op) -> Result<Out> {
    let mut cx = Cx { t, d, buf };
    match op {
        Op::AddToken { hash, token } => {
            cx.put(d.enrol_tokens, hash, token)?;
            Ok(Out::Unit)
        }
        Op::Enrol {
            hash,
            credential,
            now,
        } => {
            let token: EnrolmentToken = env::get(&*cx.t, d.enrol_tokens, hash)?
                .ok_or(Error::NotFound(Missing::EnrolmentToken))?;
            if *now > token.expires_ms {
                return Err(Error::IllegalTransition {
                    device: None,
                    kind: Illegal::TokenExpired,
                });
            }
            if env::exists(&*cx.t, d.device_names, token.name.as_bytes())? {
                return Err(Error::IllegalTransition {
                    device: None,
                    kind: Illegal::NameTaken,
                });
            }
            cx.del(d.enrol_tokens, hash)?;
            Ok(Out::U64(cx.new_device(
                &token.name,
                *credential,
                *now,
                &token.groups,
            )?))
        }
        Op::AddDevice {
            name,
            credential,
            now,
        } => {
            if env::exists(&*cx.t, d.device_names, name.as_bytes())? {
                return Err(Error::IllegalTransition {
                    device: None,
                    kind: Illegal::NameTaken,
                });
            }
            Ok(Out::U64(cx.new_device(name, *credential, *now, &[])?))
        }
        Op::Revoke(dev) => {
            let mut x = cx.device(*dev)?;
            let mut q = cx.queue(*dev)?;
            x.revoked = true;
            q.revoked = true;
            cx.put(d.devices, &dev.0.to_be_bytes(), &x)?;
            cx.put_queue(*dev, &q)?;
            Ok(Out::Unit)
        }
        Op::Seen {
            dev,
            now,
            transport,
        } => {
            let mut x = cx.device(*dev)?;
            x.last_seen_ms = Some(*now);
            if transport.is_some() {
                x.transport = *transport;
            }
            cx.put(d.devices, &dev.0.to_be_bytes(), &x)?;
            Ok(Out::Unit)
        }
        Op::Report { dev, report, now } => {
            let mut x = cx.device(*dev)?;
            x.last_seen_ms = Some(*now);
            x.report = Some(report.clone());
            cx.put(d.devices, &dev.0.to_be_bytes(), &x)?;
            Ok(Out::Unit)
        }
        Op::JoinGroup { group, dev } => {
            cx.device(*dev)?;
            cx.put_raw(d.groups, &env::group_key(group, *dev), &[])?;
            Ok(Out::Unit)
        }
        Op::LeaveGroup { group, dev } => {
            cx.del(d.groups, &env::group_key(group, *dev))?;
            Ok(Out::Unit)
        }
        Op::Enqueue { dev, cmd } => {
            validate_command(*dev, cmd)?;
            let mut q = cx.live_queue(*dev)?;
            let seq = q.enqueue();
            cx.put(d.commands, &key2(dev.0, seq), cmd)?;
            cx.put_queue(*dev, &q)?;
            Ok(Out::U64(seq))
        }
        Op::EnqueueGroup { group, cmd } => {
            let members = read::group_members(&*cx.t, d, group)?;
            if members.is_empty() {
                return Err(Error::NotFound(Missing::Group(group.clone())));
            }
            validate_command(members[0], cmd)?;
            let mut targets = Vec::with_capacity(members.len());
            for m in members {
                let q = cx.queue(m)?;
                if !q.revoked {
                    targets.push((m, q));
                }
            }
            let mut out = Vec::with_capacity(targets.len());
            for (m, mut q) in targets {
                let seq = q.enqueue();
                cx.put(d.commands, &key2(m.0, seq), cmd)?;
                cx.put_queue(m, &q)?;
                out.push((m, seq));
            }
            Ok(Out::Pairs(out))
        }
        Op::Transmitted { dev, seq, now } => {
            let mut q = cx.live_queue(*dev)?;
            let first = if q.status == QueueStatus::Running {
                cx.first_after(*dev, q.completed_through)?
            } else {
                q.cursor
            };
            let max =
                read::command_policy(&*cx.t, d, *dev, *seq)?.map_or(u32::MAX, |c| c.max_attempts);
            let attempt = q
                .mark_transmitted(*seq, first, max, *now)
                .map_err(|k| Error::illegal(*dev, k))?;
            cx.put_queue(*dev, &q)?;
            Ok(Out::U64(u64::from(attempt)))
        }
        Op::Redeliver { dev, seq, now } => {
            let mut q = cx.live_queue(*dev)?;
            let attempt = q
                .redeliver(*seq, *now)
                .map_err(|k| Error::illegal(*dev, k))?;
            cx.put_queue(*dev, &q)?;
            Ok(Out::U64(u64::from(attempt)))
        }
        Op::Result {
            dev,
            seq,
            attempt,
            result,
        } => {
            let mut q = cx.queue(*dev)?;
            // Duplicate detection compares encodings: no decode of the stored result.
            result.encode(cx.buf);
            let existing = match cx.t.get(d.results, &key2(dev.0, *seq)) {
                Ok(v) if v == cx.buf.as_slice() => return Ok(Out::Recorded(Recorded::Duplicate)),
                Ok(_) => true,
                Err(lmdb::Error::NotFound) => false,
                Err(e) => return Err(e.into()),
            };
            if !q.accepts_result(*seq, *attempt) {
                let kind = if q.accepts_result(*seq, q.attempt) {
                    Illegal::StaleAttempt {
                        seq: *seq,
                        attempt: *attempt,
                        current: q.attempt,
                    }
                } else if existing {
                    Illegal::ConflictingResult { seq: *seq }
                } else if q.cursor.is_none_or(|c| *seq > c) {
                    Illegal::NotTransmitted { seq: *seq }
                } else {
                    Illegal::WrongStatus {
                        op: "record_result",
                        status: q.status,
                    }
                };
                return Err(Error::illegal(*dev, kind));
            }
            cx.finish_attempt(*dev, &mut q, *seq, result)?;
            Ok(Out::Recorded(Recorded::Stored(q.status)))
        }
        Op::TimedOut { dev, seq, now } => {
            let mut q = cx.queue(*dev)?;
            let policy = match read::command_policy(&*cx.t, d, *dev, *seq)? {
                Some(p) => p,
                None => return Err(Error::illegal(*dev, Illegal::NotTransmitted { seq: *seq })),
            };
            q.check_timeout(*seq, policy.timeout_ms, *now)
                .map_err(|k| Error::illegal(*dev, k))?;
            let more = cx.first_after(*dev, *seq)?.is_some();
            if q.command_failed(&policy, FailReason::AttemptsExhausted, more)
                == AfterFailure::MovedOn
            {
                let r = synthetic(StepOutcome::Failed, "timed out", *now);
                cx.put(d.results, &key2(dev.0, *seq), &r)?;
            }
            cx.put_queue(*dev, &q)?;
            Ok(Out::Status(q.status))
        }
        Op::RebootStarted {
            dev,
            seq,
            deadline,
            boot,
        } => {
            let mut q = cx.queue(*dev)?;
            let has_reboot = read::command(&*cx.t, d, *dev, *seq)?.is_some_and(|c| c.has_reboot());
            q.reboot_started(*seq, has_reboot, *deadline, boot)
                .map_err(|k| Error::illegal(*dev, k))?;
            cx.put_queue(*dev, &q)?;
            Ok(Out::Unit)
        }
        Op::BootAtDispatch { dev, seq, boot } => {
            let mut q = cx.queue(*dev)?;
            q.boot_at_dispatch(*seq, boot)
                .map_err(|k| Error::illegal(*dev, k))?;
            cx.put_queue(*dev, &q)?;
            Ok(Out::Unit)
        }
        Op::RebootCompleted {
            dev,
            seq,
            attempt,
            report,
            result,
            now,
        } => {
            let mut q = cx.queue(*dev)?;
            let has_reboot = read::command(&*cx.t, d, *dev, *seq)?.is_some_and(|c| c.has_reboot());
            q.check_reboot_completed(*seq, *attempt, has_reboot, &report.boot_id)
                .map_err(|k| Error::illegal(*dev, k))?;
            let mut x = cx.device(*dev)?;
            // A record from before the boot left was kept: the last report's boot is the best
            // the store knows.
            if q.boot_left.is_none()
                && x.report
                    .as_ref()
                    .is_some_and(|r| r.boot_id == report.boot_id)
            {
                return Err(Error::illegal(*dev, Illegal::BootIdUnchanged));
            }
            x.report = Some(report.clone());
            x.last_seen_ms = Some(*now);
            cx.put(d.devices, &dev.0.to_be_bytes(), &x)?;
            cx.finish_attempt(*dev, &mut q, *seq, result)?;
            Ok(Out::Status(q.status))
        }
        Op::RebootMissed { dev, now } => {
            let mut q = cx.queue(*dev)?;
            q.reboot_deadline_missed(*now)
                .map_err(|k| Error::illegal(*dev, k))?;
            cx.put_queue(*dev, &q)?;
            Ok(Out::Unit)
        }
        Op::Pause(dev) => {
            let mut q = cx.queue(*dev)?;
            q.pause().map_err(|k| Error::illegal(*dev, k))?;
            cx.put_queue(*dev, &q)?;
            Ok(Out::Unit)
        }
        Op::Resume(dev) => {
            let mut q = cx.queue(*dev)?;
            let pending = cx.first_after(*dev, q.completed_through)?.is_some();
            q.resume(pending).map_err(|k| Error::illegal(*dev, k))?;
            cx.put_queue(*dev, &q)?;
            Ok(Out::Unit)
        }
        Op::Retry(dev) => {
            let mut q = cx.queue(*dev)?;
            q.retry().map_err(|k| Error::illegal(*dev, k))?;
            cx.put_queue(*dev, &q)?;
            Ok(Out::Unit)
        }
        Op::Skip(dev) => {
            let mut q = cx.queue(*dev)?;
            if q.status != QueueStatus::Failed {
                return Err(Error::illegal(
                    *dev,
                    Illegal::WrongStatus {
                        op: "skip",
                        status: q.status,
                    },
                ));
            }
            let cursor = q.cursor.ok_or(Error::Corrupt {
                table: "queues",
                reason: "failed queue without cursor",
            })?;
            let more = cx.first_after(*dev, cursor)?.is_some();
            q.skip(more).map_err(|k| Error::illegal(*dev, k))?;
            if read::result(&*cx.t, d, *dev, cursor)?.is_none() {
                cx.put(
                    d.results,
                    &key2(dev.0, cursor),
                    &synthetic(StepOutcome::Skipped, "skipped", 0),
                )?;
            }
            cx.put_queue(*dev, &q)?;
            Ok(Out::Unit)
        }
        Op::Cancel(dev) => {
            let mut q = cx.queue(*dev)?;
            q.cancel();
            let mut doomed = Vec::new();
            let p = dev.0.to_be_bytes();
            env::scan(
                &*cx.t,
                d.commands,
                &key2(dev.0, q.completed_through.saturating_add(1)),
                &p,
                |k, _| {
                    let (_, s) = env::split2(k, "commands")?;
                    doomed.push(s);
                    Ok(true)
                },
            )?;
            // A cancelled command can no longer be the cursor: its late result is refused.
            if q.cursor.is_some_and(|c| doomed.contains(&c)) {
                q.cursor = None;
                q.attempts = 0;
            }
            for s in &doomed {
                cx.del(d.commands, &key2(dev.0, *s))?;
                cx.del(d.results, &key2(dev.0, *s))?;
            }
            cx.put_queue(*dev, &q)?;
            Ok(Out::U64(doomed.len() as u64))
        }
        Op::CreateTask { task, targets } => {
            if task.block_size == 0 {
                return Err(Error::IllegalTransition {
                    device: None,
                    kind: Illegal::Invalid("block size is 0"),
                });
            }
            for dev in targets {
                cx.device(*dev)?;
            }
            let id = env::meta_u64(&*cx.t, d.meta, env::META_NEXT_TASK)? + 1;
            cx.put_raw(d.meta, env::META_NEXT_TASK, &id.to_le_bytes())?;
            cx.put(d.tasks, &id.to_be_bytes(), task)?;
            for dev in targets {
                cx.set_task_entry(TaskId(id), *dev, &TaskDeviceStatus::Pending)?;
            }
            Ok(Out::U64(id))
        }
        Op::AddTarget { task, dev } => {
            read::task(&*cx.t, d, *task)?.ok_or(Error::NotFound(Missing::Task(*task)))?;
            cx.device(*dev)?;
            if read::task_status(&*cx.t, d, *task, *dev)?.is_none() {
                cx.set_task_entry(*task, *dev, &TaskDeviceStatus::Pending)?;
            }
            Ok(Out::Unit)
        }
        Op::TaskProgress { task, dev, blocks } => {
            let st = cx.task_entry(*task, *dev)?;
            let info =
                read::task(&*cx.t, d, *task)?.ok_or(Error::NotFound(Missing::Task(*task)))?;
            if blocks.end() > info.blocks() {
                return Err(Error::IllegalTransition {
                    device: Some(*dev),
                    kind: Illegal::BlockOutOfRange {
                        block: info.blocks(),
                        blocks: info.blocks(),
                    },
                });
            }
            let next = match st {
                TaskDeviceStatus::Pending => TaskDeviceStatus::InProgress(blocks.clone()),
                TaskDeviceStatus::InProgress(mut b) => {
                    b.union(blocks);
                    TaskDeviceStatus::InProgress(b)
                }
                other => return Err(task_illegal("task_progress", &other)),
            };
            cx.set_task_entry(*task, *dev, &next)?;
            Ok(Out::Unit)
        }
        Op::TaskCompleted { task, dev } => {
            match cx.task_entry(*task, *dev)? {
                TaskDeviceStatus::Pending | TaskDeviceStatus::InProgress(_) => {
                    cx.set_task_entry(*task, *dev, &TaskDeviceStatus::Completed)?
                }
                TaskDeviceStatus::Completed => {}
                other => return Err(task_illegal("task_completed", &other)),
            }
            Ok(Out::Unit)
        }
        Op::TaskFailed { task, dev, reason } => {
            match cx.task_entry(*task, *dev)? {
                TaskDeviceStatus::Pending | TaskDeviceStatus::InProgress(_) => {
                    cx.set_task_entry(*task, *dev, &TaskDeviceStatus::Failed(reason.clone()))?
                }
                other => return Err(task_illegal("task_failed", &other)),
            }
            Ok(Out::Unit)
        }
        Op::TaskRetry { task, dev } => {
            match cx.task_entry(*task, *dev)? {
                TaskDeviceStatus::Failed(_) => {
                    cx.set_task_entry(*task, *dev, &TaskDeviceStatus::Pending)?
                }
                other => return Err(task_illegal("task_retry", &other)),
            }
            Ok(Out::Unit)
        }
        Op::PruneEvents {
            older_than,
            keep_max,
            limit,
        } => prune_events(&mut cx, *older_than, *keep_max, *limit),
        Op::PruneResults { from, keep, limit } => prune_results(&mut cx, *from, *keep, *limit),
        Op::Event(ev) => {
            let id = read::last_event_id(&*cx.t, d)? + 1;
            ev.encode(cx.buf);
            cx.t.put(
                d.events,
                &id.to_be_bytes(),
                &cx.buf.as_slice(),
                WriteFlags::APPEND,
            )?;
            Ok(Out::U64(id))
        }
    }
}

fn prune_events(cx: &mut Cx<'_, '_>, older_than: u64, keep_max: u64, limit: usize) -> Result<Out> {
    let d = *cx.d;
    let last = read::last_event_id(&*cx.t, &d)?;
    let entries = cx.t.stat(d.events)?.entries() as u64;
    let mut doomed = Vec::new();
    env::scan(&*cx.t, d.events, &[], &[], |k, v| {
        let id = env::be(k, "events")?;
        if id >= last || doomed.len() >= limit {
            return Ok(false);
        }
        let left = entries - doomed.len() as u64;
        let too_many = keep_max > 0 && left > keep_max;
        let too_old = !too_many && older_than > 0 && Event::decode(v)?.time_ms < older_than;
        if !(too_many || too_old) {
            return Ok(false);
        }
        doomed.push(id);
        Ok(true)
    })?;
    for id in &doomed {
        cx.del(d.events, &id.to_be_bytes())?;
    }
    Ok(Out::Pruned(doomed.len(), None))
}

fn prune_results(cx: &mut Cx<'_, '_>, from: DeviceId, keep: u64, limit: usize) -> Result<Out> {
    let d = *cx.d;
    let mut budget = limit;
    let mut deleted = 0;
    let mut dev = from.0;
    loop {
        if budget == 0 {
            return Ok(Out::Pruned(deleted, Some(DeviceId(dev))));
        }
        budget -= 1;
        // The first device at or after `dev`.
        let mut next = None;
        env::scan(&*cx.t, d.queues, &dev.to_be_bytes(), &[], |k, v| {
            next = Some((env::be(k, "queues")?, QueueState::decode(v)?));
            Ok(false)
        })?;
        let Some((id, q)) = next else {
            return Ok(Out::Pruned(deleted, None));
        };
        if keep > 0 && q.completed_through > keep {
            let upto = q.completed_through - keep;
            let mut doomed = Vec::new();
            env::scan(
                &*cx.t,
                d.commands,
                &key2(id, 0),
                &id.to_be_bytes(),
                |k, _| {
                    let (_, seq) = env::split2(k, "commands")?;
                    if seq > upto || doomed.len() >= budget {
                        return Ok(false);
                    }
                    doomed.push(seq);
                    Ok(true)
                },
            )?;
            for seq in &doomed {
                cx.del(d.commands, &key2(id, *seq))?;
                cx.del(d.results, &key2(id, *seq))?;
            }
            deleted += doomed.len();
            budget -= doomed.len();
            if budget == 0 {
                // This device may hold more: resume here.
                return Ok(Out::Pruned(deleted, Some(DeviceId(id))));
            }
        }
        match id.checked_add(1) {
            Some(n) => dev = n,
            None => return Ok(Out::Pruned(deleted, None)),
        }
    }
}
