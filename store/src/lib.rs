//! fleetcast's durable state on LMDB: devices, command queues, results, distribution tasks and
//! the event log. Everything fleetcast must not lose lives here, so a gateway restarted at any
//! instant continues exactly where it was.
//!
//! # Shape
//! - [`Store::open`] opens (or creates) the environment, checks the schema version (a newer one
//!   is refused with [`Error::SchemaTooNew`]) and does no work proportional to the data: open
//!   time does not depend on how many commands are queued.
//! - [`Store::snapshot`] is a consistent read view ([`Snapshot`]).
//! - [`Store::batch`] is a write transaction that collects many transitions and commits them
//!   with one fsync ([`Batch`]; its module docs give the driving contract for the daemon's
//!   loop: apply transitions, `commit`, and only then ack peers).
//!
//! # Invariants
//! - Every protocol transition is one validated operation; illegal transitions are typed
//!   errors ([`Error::IllegalTransition`] with an [`Illegal`] reason) and write nothing.
//! - A batch is atomic: after a crash either all of its transitions are present or none.
//! - No LMDB cursor, iterator or borrowed slice leaves the crate (see `env`), so the
//!   lmdb-rkv 0.14 iterator-outlives-cursor use-after-free cannot be reached from this API.
//! - The map grows on demand; a full file system is [`Error::DiskFull`] and loses nothing
//!   committed.
//! - The store never reads the clock: every time is a `u64` of ms since the UNIX epoch passed
//!   in by the caller.
//!
//! # Concurrency
//! One writer (the daemon's store thread). `batch` takes `&mut self`, snapshots borrow `&self`, so a
//! map resize can never race an open transaction of this process. Another process (e.g. the
//! CLI tailing events) may open the same environment through its own `Store`; LMDB's lock
//! file serialises writers across processes, and a map grown by the other process is adopted
//! by `batch` automatically and by [`Store::adopt_map_size`] for readers.
//!
//! # Checking the cursor discipline under valgrind
//! The test `scans_never_outlive_cursors` drives every scan path across many pages with writes
//! in between. Run it under valgrind (an iterator reading a freed cursor is an invalid read):
//! ```text
//! CARGO_TARGET_DIR=/work/targets/store cargo test -p fleetcast-store --lib --no-run
//! valgrind --error-exitcode=1 /work/targets/store/debug/deps/fleetcast_store-<hash> \
//!     --test-threads=1 scans_never_outlive_cursors
//! ```

mod batch;
mod codec;
mod engine;
mod env;
mod error;
mod ids;
mod legacy;
mod queue;
mod read;
mod result;
mod types;

#[cfg(feature = "postgres")]
pub mod pg;

use std::path::{Path, PathBuf};

use lmdb::{Environment, RoTransaction};

pub use batch::{Batch, Committed, Recorded};
pub use engine::{
    Claimed, DeviceOps, Engine, EventOps, Lease, QueueOps, Reads, StoreBatch, TaskOps,
};
pub use env::{INITIAL_MAP_SIZE, SCHEMA_VERSION};
pub use error::{Error, Illegal, Missing, Result};
pub use types::{
    boot_hex, BlockSet, Command, Device, DeviceId, EnrolmentToken, Event, EventId, EventKind,
    FailReason, OnFailure, QueueState, QueueStatus, Received, StoredResult, Task, TaskDeviceStatus,
    TaskFollow, TaskId, TaskImage, TaskPlan, Transport, OUTPUT_EXCERPT_MAX,
};

use env::Dbs;
use read::read_methods;

/// The store: one LMDB environment in a directory.
pub struct Store {
    env: Environment,
    dbs: Dbs,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens or creates the store in directory `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        let path = path.as_ref().to_path_buf();
        let (env, dbs) = env::open_env(&path)?;
        Ok(Store { env, dbs, path })
    }

    /// Begins a write batch (group commit). See [`Batch`].
    pub fn batch(&mut self) -> Result<Batch<'_>> {
        Batch::begin(&self.env, &self.path, &self.dbs)
    }

    /// A consistent read view of the committed state.
    ///
    /// If another process (the daemon, when this is the CLI) grew the map since this store was
    /// opened, this fails with `Error::Lmdb(lmdb::Error::MapResized)`; call
    /// [`adopt_map_size`](Self::adopt_map_size) (which needs `&mut self`, so no snapshot is
    /// open) and retry, or simply reopen the store (opening is cheap).
    pub fn snapshot(&self) -> Result<Snapshot<'_>> {
        Ok(Snapshot {
            txn: self.env.begin_ro_txn()?,
            dbs: &self.dbs,
        })
    }

    /// Adopts a map size grown by another process.
    pub fn adopt_map_size(&mut self) -> Result<()> {
        self.env.set_map_size(0)?;
        Ok(())
    }

    /// Current map size in bytes (grows on demand).
    pub fn map_size(&self) -> Result<usize> {
        Ok(self.env.info()?.map_size())
    }

    /// Writes a consistent, compacted copy of the committed state into directory `dest`
    /// (created if missing; it must not already hold a store): LMDB's `mdb_env_copy2` with
    /// `MDB_CP_COMPACT`, inside one read transaction, so writers go on while it copies and the
    /// copy is the state of one commit. Free pages are left out. The copy opens with
    /// [`Store::open`] like any store directory.
    ///
    /// The copy is as private as the store: a directory it creates is 0700 and `data.mdb` is
    /// 0600 (LMDB creates it subject to the umask; it is tightened once written).
    pub fn backup(&self, dest: impl AsRef<Path>) -> Result<()> {
        let dest = dest.as_ref();
        env::make_private(dest, env::DIR_MODE, true)?;
        if dest.join("data.mdb").exists() {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} already holds a store", dest.display()),
            )));
        }
        let c_path = std::ffi::CString::new(dest.as_os_str().as_encoded_bytes()).map_err(|_| {
            Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "backup path contains a NUL byte",
            ))
        })?;
        // The copy runs on a thread of its own: LMDB gives each thread one reader slot, and
        // the copy's read transaction must not collide with a snapshot this thread holds
        // (`MDB_BAD_RSLOT`).
        let env = &self.env;
        let rc = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: `env.env()` is the live environment handle owned by `self`, valid
                    // for this borrow (the scope joins before it ends); `c_path` is a
                    // NUL-terminated string that outlives the call; LMDB copies through its own
                    // read transaction and keeps neither pointer.
                    unsafe {
                        lmdb_sys::mdb_env_copy2(
                            env.env(),
                            c_path.as_ptr(),
                            lmdb_sys::MDB_CP_COMPACT,
                        )
                    }
                })
                .join()
                .unwrap_or(libc::EIO)
        });
        if rc == 0 {
            env::make_private(&dest.join("data.mdb"), env::FILE_MODE, false)
        } else if rc > 0 {
            // LMDB returns errno values for file system failures.
            Err(Error::Io(std::io::Error::from_raw_os_error(rc)))
        } else {
            Err(Error::Lmdb(lmdb::Error::from_err_code(rc)))
        }
    }
}

/// A read-only, consistent view of the committed state.
pub struct Snapshot<'s> {
    txn: RoTransaction<'s>,
    dbs: &'s Dbs,
}

impl std::fmt::Debug for Snapshot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

impl<'s> Snapshot<'s> {
    fn read_parts(&self) -> Result<(&RoTransaction<'s>, &Dbs)> {
        Ok((&self.txn, self.dbs))
    }
}

impl Reads for Snapshot<'_> {
    read_methods!();
}

/// The store's traits, for `use fleetcast_store::prelude::*`: the methods of batches and
/// snapshots are trait methods (see [`Engine`]).
pub mod prelude {
    pub use crate::engine::{DeviceOps, Engine, EventOps, QueueOps, Reads, StoreBatch, TaskOps};
}

impl Engine for Store {
    fn batch(&mut self) -> Result<Box<dyn StoreBatch + '_>> {
        Ok(Box::new(Store::batch(self)?))
    }

    fn snapshot(&self) -> Result<Box<dyn Reads + '_>> {
        Ok(Box::new(Store::snapshot(self)?))
    }

    fn backup(&self, dest: &Path) -> Result<()> {
        Store::backup(self, dest)
    }
}

#[cfg(test)]
mod tests;
