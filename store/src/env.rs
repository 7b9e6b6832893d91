//! The LMDB environment: opening, schema check, map growth, key layout, and the only code that
//! touches cursors.
//!
//! Key layout (all integers big-endian so LMDB's byte order is numeric order):
//!
//! | table          | key                                  | value                    |
//! |----------------|--------------------------------------|--------------------------|
//! | `meta`         | `schema`, `commit_seq`, `next_device`, `next_task` | little-endian u32/u64 |
//! | `devices`      | device id (8)                        | [`Device`](crate::Device)               |
//! | `device_names` | name bytes                           | device id (8)            |
//! | `enrol_tokens` | token hash (32)                      | [`EnrolmentToken`](crate::EnrolmentToken)       |
//! | `groups`       | name length (2) ++ name ++ device (8) | empty                   |
//! | `queues`       | device id (8)                        | [`QueueState`](crate::QueueState)           |
//! | `commands`     | device (8) ++ seq (8)                | [`Command`](crate::Command)              |
//! | `results`      | device (8) ++ seq (8)                | [`CommandResult`](crate::CommandResult)        |
//! | `tasks`        | task id (8)                          | [`Task`](crate::Task)                 |
//! | `task_status`  | task (8) ++ device (8)               | [`TaskDeviceStatus`](crate::TaskDeviceStatus)     |
//! | `device_tasks` | device (8) ++ task (8), only while the status is incomplete | empty |
//! | `events`       | event id (8)                         | [`Event`](crate::Event)                |
//!
//! So a range scan over `commands` from `(device, s)` yields the device's queue in order.
//!
//! Cursor safety: lmdb-rkv 0.14's `Iter<'txn>` is tied to the transaction, not to the cursor
//! that produced it, so safe code can keep iterating after the cursor was freed (a
//! use-after-free). Here every cursor lives inside [`scan`] or [`last_key`]: the iterator is
//! created, drained and dropped before the cursor in the same function, and the visitor only
//! sees slices borrowed for the duration of one call. No cursor, iterator or LMDB slice leaves
//! this module; every public API returns owned, decoded values.
//!
//! Map growth: the environment starts at [`INITIAL_MAP_SIZE`]. Before each write batch the
//! store doubles the map while more than half of it is in use; a batch that still hits
//! `MDB_MAP_FULL` is aborted, the map doubled, and the batch's recorded operations replayed
//! (see `batch`). Growing needs no open transaction in this process: that is guaranteed by
//! `Store::batch` taking `&mut self` while snapshots borrow `&self`.

use std::path::Path;

use lmdb::{Cursor, Database, DatabaseFlags, Environment, Transaction};

use crate::codec::Record;
use crate::error::{Error, Result};
use crate::types::DeviceId;

/// Schema version written by this build. 2: records embed wire values (record format 2, see
/// `codec`); a schema-1 store is upgraded on open (its format-1 records stay readable and are
/// rewritten as they change), and a build that knows only schema 1 refuses the upgraded store
/// with [`Error::SchemaTooNew`] instead of misreading format-2 records. 3: a task status may
/// be `cancelled` (tag 4, see `TaskDeviceStatus`); every schema-2 record reads unchanged, so
/// the upgrade only writes the new version, and a schema-2 build refuses the store rather
/// than take a cancelled row for a corrupt one. 4: device records of format 3 keep the time
/// their report came (`Device::report_ms`); older records read unchanged (that time unknown),
/// and a schema-3 build refuses the store rather than take a format-3 record for a corrupt one.
/// 5: a task record may end in tagged extensions (its plan and what it follows, see `Task`);
/// every schema-4 record reads unchanged, and a schema-4 build, which would take the
/// extensions for trailing bytes, refuses the store.
pub const SCHEMA_VERSION: u32 = 5;
/// Initial map size (grows on demand).
pub const INITIAL_MAP_SIZE: usize = 64 << 20;
/// Map size ceiling: growth beyond this reports `DiskFull` instead.
pub(crate) const MAX_MAP_SIZE: usize = 1 << 40;

const MDB_LAST: u32 = 6; // lmdb.h MDB_cursor_op::MDB_LAST

/// The LMDB databases ("tables") of the store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dbs {
    pub meta: Database,
    pub devices: Database,
    pub device_names: Database,
    pub enrol_tokens: Database,
    pub groups: Database,
    pub queues: Database,
    pub commands: Database,
    pub results: Database,
    pub tasks: Database,
    pub task_status: Database,
    pub device_tasks: Database,
    pub events: Database,
}

pub(crate) const META_SCHEMA: &[u8] = b"schema";
pub(crate) const META_COMMIT_SEQ: &[u8] = b"commit_seq";
pub(crate) const META_NEXT_DEVICE: &[u8] = b"next_device";
pub(crate) const META_NEXT_TASK: &[u8] = b"next_task";

/// Mode of the store's directory: commands, results and outputs are nobody else's business.
pub(crate) const DIR_MODE: u32 = fleetcast_os::PRIVATE_DIR_MODE;
/// Mode of `data.mdb` and `lock.mdb`.
pub(crate) const FILE_MODE: u32 = fleetcast_os::PRIVATE_FILE_MODE;

/// Opens (creating if needed) the environment at `path` and checks its schema version.
///
/// The directory is made 0700 and the files 0600 whatever the umask, existing ones included
/// (a store restored by `cp` or created by an older build may be world-readable).
pub(crate) fn open_env(path: &Path) -> Result<(Environment, Dbs)> {
    make_private(path, DIR_MODE, true)?;
    let env = Environment::new()
        .set_max_dbs(16)
        .set_map_size(INITIAL_MAP_SIZE)
        .open_with_permissions(path, FILE_MODE as lmdb_sys::mdb_mode_t)?;
    for f in ["data.mdb", "lock.mdb"] {
        make_private(&path.join(f), FILE_MODE, false)?;
    }
    let db = |name| env.create_db(Some(name), DatabaseFlags::empty());
    let dbs = Dbs {
        meta: db("meta")?,
        devices: db("devices")?,
        device_names: db("device_names")?,
        enrol_tokens: db("enrol_tokens")?,
        groups: db("groups")?,
        queues: db("queues")?,
        commands: db("commands")?,
        results: db("results")?,
        tasks: db("tasks")?,
        task_status: db("task_status")?,
        device_tasks: db("device_tasks")?,
        events: db("events")?,
    };
    let found = {
        let txn = env.begin_ro_txn()?;
        match txn.get(dbs.meta, &META_SCHEMA) {
            Ok(v) => Some(u32::from_le_bytes(v.try_into().map_err(|_| {
                Error::Corrupt {
                    table: "meta",
                    reason: "schema version length",
                }
            })?)),
            Err(lmdb::Error::NotFound) => None,
            Err(e) => return Err(e.into()),
        }
    };
    match found {
        Some(v) if v > SCHEMA_VERSION => {
            return Err(Error::SchemaTooNew {
                found: v,
                supported: SCHEMA_VERSION,
            })
        }
        Some(v) if v == SCHEMA_VERSION => {}
        Some(_) | None => {
            let mut txn = env.begin_rw_txn()?;
            txn.put(
                dbs.meta,
                &META_SCHEMA,
                &SCHEMA_VERSION.to_le_bytes(),
                lmdb::WriteFlags::empty(),
            )?;
            txn.commit()?;
        }
    }
    Ok((env, dbs))
}

/// Creates the directory `path` (if `dir`) and sets `path` to `mode` when it grants more than
/// that; a missing file is left missing. The rules are `fleetcast_os`'s, shared with the
/// gateway's data directory and the agent's state directory.
pub(crate) fn make_private(path: &Path, mode: u32, dir: bool) -> Result<()> {
    if dir {
        fleetcast_os::create_private_dir(path)?;
    }
    match fleetcast_os::tighten(path, mode) {
        Ok(_) => Ok(()),
        Err(e) if !dir && e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Bytes of the map in use (pages up to the last one written).
pub(crate) fn used_bytes(env: &Environment) -> Result<usize> {
    let info = env.info()?;
    let page = env.stat()?.page_size() as usize;
    Ok((info.last_pgno() + 1).saturating_mul(page))
}

/// Doubles the map size. No transaction of this process may be open.
pub(crate) fn grow(env: &Environment) -> Result<()> {
    let cur = env.info()?.map_size();
    let new = cur.saturating_mul(2);
    if new > MAX_MAP_SIZE {
        return Err(Error::DiskFull);
    }
    env.set_map_size(new)?;
    Ok(())
}

/// Grows the map while more than half of it is used.
pub(crate) fn grow_if_needed(env: &Environment) -> Result<()> {
    while used_bytes(env)?.saturating_mul(2) > env.info()?.map_size() {
        grow(env)?;
    }
    Ok(())
}

/// Visits, in key order, the entries with key ≥ `start` that begin with `prefix`, until the
/// visitor returns `false`. The slices are valid only during the call.
pub(crate) fn scan<T: Transaction>(
    txn: &T,
    db: Database,
    start: &[u8],
    prefix: &[u8],
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<bool>,
) -> Result<()> {
    let mut cursor = txn.open_ro_cursor(db)?;
    let mut outcome = Ok(());
    {
        // The iterator is confined to this block: it is dropped before the cursor below.
        // LMDB refuses a zero-length key for MDB_SET_RANGE (BadValSize).
        let iter = if start.is_empty() {
            cursor.iter_start()
        } else {
            cursor.iter_from(start)
        };
        for item in iter {
            match item {
                Ok((k, v)) => {
                    if !k.starts_with(prefix) {
                        break;
                    }
                    match visit(k, v) {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            outcome = Err(e);
                            break;
                        }
                    }
                }
                Err(e) => {
                    outcome = Err(e.into());
                    break;
                }
            }
        }
    }
    drop(cursor);
    outcome
}

/// The last key of `db`, copied out, if any.
pub(crate) fn last_key<T: Transaction>(txn: &T, db: Database) -> Result<Option<Vec<u8>>> {
    let cursor = txn.open_ro_cursor(db)?;
    let key = match cursor.get(None, None, MDB_LAST) {
        Ok((k, _)) => Ok(k.map(<[u8]>::to_vec)),
        Err(lmdb::Error::NotFound) => Ok(None),
        Err(e) => Err(e.into()),
    };
    drop(cursor);
    key
}

/// Gets and decodes a record.
pub(crate) fn get<T: Transaction, R: Record>(
    txn: &T,
    db: Database,
    key: &[u8],
) -> Result<Option<R>> {
    match txn.get(db, &key) {
        Ok(v) => R::decode(v).map(Some),
        Err(lmdb::Error::NotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// True if `key` exists in `db`.
pub(crate) fn exists<T: Transaction>(txn: &T, db: Database, key: &[u8]) -> Result<bool> {
    match txn.get(db, &key) {
        Ok(_) => Ok(true),
        Err(lmdb::Error::NotFound) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Reads a little-endian u64 from `meta`.
pub(crate) fn meta_u64<T: Transaction>(txn: &T, db: Database, key: &[u8]) -> Result<u64> {
    match txn.get(db, &key) {
        Ok(v) => Ok(u64::from_le_bytes(v.try_into().map_err(|_| {
            Error::Corrupt {
                table: "meta",
                reason: "counter length",
            }
        })?)),
        Err(lmdb::Error::NotFound) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn be(bytes: &[u8], table: &'static str) -> Result<u64> {
    let a: [u8; 8] = bytes.try_into().map_err(|_| Error::Corrupt {
        table,
        reason: "key length",
    })?;
    Ok(u64::from_be_bytes(a))
}

/// `a ++ b`, both big-endian.
pub(crate) fn key2(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

/// Splits a 16-byte composite key.
pub(crate) fn split2(k: &[u8], table: &'static str) -> Result<(u64, u64)> {
    if k.len() != 16 {
        return Err(Error::Corrupt {
            table,
            reason: "key length",
        });
    }
    Ok((be(&k[..8], table)?, be(&k[8..], table)?))
}

/// Prefix of a group's member keys.
pub(crate) fn group_prefix(name: &str) -> Vec<u8> {
    let n = u16::try_from(name.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(2 + name.len() + 8);
    k.extend_from_slice(&n.to_be_bytes());
    k.extend_from_slice(&name.as_bytes()[..usize::from(n)]);
    k
}

pub(crate) fn group_key(name: &str, device: DeviceId) -> Vec<u8> {
    let mut k = group_prefix(name);
    k.extend_from_slice(&device.0.to_be_bytes());
    k
}
