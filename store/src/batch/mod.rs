//! Write batches: group commit of many transitions in one LMDB write transaction.
//!
//! # Driving contract (the daemon's store thread)
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
//! Each successful operation is recorded: the closure that applied it, owning its arguments. If LMDB reports
//! `MDB_MAP_FULL` — during an operation or during the commit itself — the transaction is
//! aborted, the map doubled, a fresh transaction begun and the recorded operations applied
//! again; they are deterministic functions of the committed state, so they produce the same
//! results the caller already saw. Callers never see "map full".
//!
//! Other storage errors (I/O, corruption) poison the batch: later calls and `commit` return
//! [`Error::Poisoned`] (the first call returned the cause).

//!
//! # Layout
//! One file per concern (`devices`, `queue`, `tasks`, `events`); each operation is one small
//! function over a [`Cx`] (the helpers of one transaction, over its typed [`tables::Tables`],
//! which `tables.rs` implements on LMDB) plus the public method that hands it to
//! [`Exec::exec`]. Nothing lists the operations a second time: the recorded form
//! of an operation is the closure itself.

mod cx;
mod devices;
mod events;
mod queue;
pub(crate) mod tables;
mod tasks;

use std::path::Path;

use lmdb::{Environment, RwTransaction, Transaction, WriteFlags};

use crate::engine::{Reads, StoreBatch};
use crate::env::{self, Dbs};
use crate::error::{Error, Result};
use crate::read::{self, read_methods};
use crate::types::{
    Command, Device, DeviceId, Event, EventId, QueueState, QueueStatus, StoredResult, Task,
    TaskDeviceStatus, TaskId,
};

pub(crate) use cx::Cx;
use tables::Lmdb;

/// What [`QueueOps::record_result`](crate::QueueOps::record_result) did.
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

/// A recorded operation: applied again, in order, on a fresh transaction after the map grew.
type Op = Box<dyn Fn(&mut Cx<'_>) -> Result<()>>;

/// One write transaction collecting many transitions. See the module docs for the contract.
/// Dropping a batch without committing aborts it.
pub struct Batch<'s> {
    env: &'s Environment,
    path: &'s Path,
    dbs: &'s Dbs,
    txn: Option<RwTransaction<'s>>,
    ops: Vec<Op>,
    buf: Vec<u8>,
    /// The operations' own encoding buffer ([`Cx::scratch`]).
    scratch: Vec<u8>,
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
            scratch: Vec::with_capacity(256),
            poisoned: false,
        })
    }

    fn read_parts(&self) -> Result<(&RwTransaction<'s>, &Dbs)> {
        match &self.txn {
            Some(t) if !self.poisoned => Ok((t, self.dbs)),
            _ => Err(Error::Poisoned),
        }
    }

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
                let mut t = Lmdb {
                    t: &mut txn,
                    d: self.dbs,
                    buf: &mut self.buf,
                };
                match op(&mut Cx::new(&mut t, &mut self.scratch)) {
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
}

/// How an engine's batch applies one operation: the operations of `devices`, `queue`, `tasks`
/// and `events` are written once, for every type that implements this (LMDB's [`Batch`];
/// the PostgreSQL engine's, `pg/`).
pub(crate) trait Exec {
    /// Applies `op` on the batch's transaction; `wrote(&output)` says whether it changed
    /// anything (an engine that replays operations records only those). A refusal
    /// ([`Error::is_refusal`]) wrote nothing and leaves the batch usable; any other error
    /// poisons it.
    fn exec_if<T>(
        &mut self,
        op: impl Fn(&mut Cx<'_>) -> Result<T> + 'static,
        wrote: impl Fn(&T) -> bool,
    ) -> Result<T>;

    /// As [`Exec::exec_if`], for an operation that always writes.
    fn exec<T>(&mut self, op: impl Fn(&mut Cx<'_>) -> Result<T> + 'static) -> Result<T> {
        self.exec_if(op, |_| true)
    }
}

impl Exec for Batch<'_> {
    /// Applies one operation and records it for replay (see the module docs); one that did
    /// not write (`wrote` false: a prune that found nothing to delete) is not recorded, so a
    /// batch holding only such prunes stays empty and is not committed.
    fn exec_if<T>(
        &mut self,
        op: impl Fn(&mut Cx<'_>) -> Result<T> + 'static,
        wrote: impl Fn(&T) -> bool,
    ) -> Result<T> {
        loop {
            if self.poisoned {
                return Err(Error::Poisoned);
            }
            let Some(txn) = self.txn.as_mut() else {
                return Err(Error::Poisoned);
            };
            let mut t = Lmdb {
                t: txn,
                d: self.dbs,
                buf: &mut self.buf,
            };
            match op(&mut Cx::new(&mut t, &mut self.scratch)) {
                Ok(out) => {
                    if wrote(&out) {
                        self.ops.push(Box::new(move |cx| op(cx).map(drop)));
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
}

impl Reads for Batch<'_> {
    read_methods!();
}

impl StoreBatch for Batch<'_> {
    fn len(&self) -> usize {
        Batch::len(self)
    }

    fn commit(self: Box<Self>) -> Result<Committed> {
        Batch::commit(*self)
    }
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
