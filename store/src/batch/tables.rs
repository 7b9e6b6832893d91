//! What a batch operation reads and writes, typed: the one interface the operations in
//! `devices`, `queue`, `tasks` and `events` use ([`Tables`]), and LMDB's implementation of it
//! ([`Lmdb`]).
//!
//! The operations (validation, the queue's pure transitions, the task table's rules) are
//! written once, over `&mut dyn Tables`; an engine supplies only the storage of each record
//! kind and the bounded prune of old events, a scan in LMDB and one statement elsewhere. A
//! second engine (PostgreSQL, `pg/`, issue 19) implements this trait and runs the same
//! operations.
//!
//! Every method is of committed state plus the transaction's own writes; none commits.

use lmdb::{RwTransaction, Transaction, WriteFlags};

use crate::codec::Record;
use crate::env::{self, key2, Dbs};
use crate::error::Result;
use crate::read;
use crate::types::{
    Command, CommandPolicy, Device, DeviceId, EnrolmentToken, Event, EventId, QueueState,
    StoredResult, Task, TaskDeviceStatus, TaskId,
};

/// Which id a [`Tables::next_id`] draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counter {
    /// Device ids.
    Device,
    /// Task ids.
    Task,
}

/// The typed storage one write transaction offers the batch operations.
pub(crate) trait Tables {
    /// The device with this id.
    fn device(&self, id: DeviceId) -> Result<Option<Device>>;
    /// Whether a device has this name.
    fn name_taken(&self, name: &str) -> Result<bool>;
    /// Stores a device (its name must not change once stored).
    fn put_device(&mut self, dev: &Device) -> Result<()>;
    /// Stores a new device's name index.
    fn put_device_name(&mut self, name: &str, id: DeviceId) -> Result<()>;
    /// The next id of `counter` (one above the last drawn; the draw is part of the batch).
    fn next_id(&mut self, counter: Counter) -> Result<u64>;
    /// An enrolment token, by its hash.
    fn token(&self, hash: &[u8; 32]) -> Result<Option<EnrolmentToken>>;
    /// Stores an enrolment token.
    fn put_token(&mut self, hash: &[u8; 32], token: &EnrolmentToken) -> Result<()>;
    /// Removes an enrolment token.
    fn del_token(&mut self, hash: &[u8; 32]) -> Result<()>;
    /// A device's queue state.
    fn queue(&self, id: DeviceId) -> Result<Option<QueueState>>;
    /// Stores a device's queue state.
    fn put_queue(&mut self, id: DeviceId, q: &QueueState) -> Result<()>;
    /// One command.
    fn command(&self, dev: DeviceId, seq: u64) -> Result<Option<Command>>;
    /// One command's policy (without decoding its steps).
    fn command_policy(&self, dev: DeviceId, seq: u64) -> Result<Option<CommandPolicy>>;
    /// The first command of `dev` with seq > `after`.
    fn first_after(&self, dev: DeviceId, after: u64) -> Result<Option<u64>>;
    /// The seqs of `dev`'s commands from `from` on, in order.
    fn command_seqs_from(&self, dev: DeviceId, from: u64) -> Result<Vec<u64>>;
    /// Stores a command.
    fn put_command(&mut self, dev: DeviceId, seq: u64, cmd: &Command) -> Result<()>;
    /// Removes a command and its result.
    fn del_command(&mut self, dev: DeviceId, seq: u64) -> Result<()>;
    /// A stored result.
    fn result(&self, dev: DeviceId, seq: u64) -> Result<Option<StoredResult>>;
    /// Hands a stored result's encoding, as kept, to `f` (duplicate results are recognised
    /// by it, without decoding or copying it); whether there was one.
    fn with_result_bytes(&self, dev: DeviceId, seq: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool>;
    /// Stores a result.
    fn put_result(&mut self, dev: DeviceId, seq: u64, r: &StoredResult) -> Result<()>;
    /// The members of a group, by id.
    fn group_members(&self, group: &str) -> Result<Vec<DeviceId>>;
    /// Adds a device to a group.
    fn add_member(&mut self, group: &str, dev: DeviceId) -> Result<()>;
    /// Removes a device from a group (nothing if it was not in it).
    fn del_member(&mut self, group: &str, dev: DeviceId) -> Result<()>;
    /// A task.
    fn task(&self, id: TaskId) -> Result<Option<Task>>;
    /// Stores a task.
    fn put_task(&mut self, id: TaskId, task: &Task) -> Result<()>;
    /// One target's status in a task.
    fn task_status(&self, task: TaskId, dev: DeviceId) -> Result<Option<TaskDeviceStatus>>;
    /// Stores one target's status (and keeps the index of each device's incomplete tasks).
    fn put_task_status(&mut self, task: TaskId, dev: DeviceId, st: &TaskDeviceStatus)
        -> Result<()>;
    /// The last event's id (0: none yet).
    fn last_event_id(&self) -> Result<EventId>;
    /// Appends an event under `id` (above every id before it).
    fn put_event(&mut self, id: EventId, event: &Event) -> Result<()>;
    /// Deletes up to `limit` of the oldest events (never the last one) while more than
    /// `keep_max` are kept (0: no cap) or they are older than `older_than_ms` (0: no age
    /// limit); returns how many.
    fn prune_events(&mut self, older_than_ms: u64, keep_max: u64, limit: usize) -> Result<usize>;
    /// The first device at or after `from` that has a queue, with its queue.
    fn queue_from(&self, from: DeviceId) -> Result<Option<(DeviceId, QueueState)>>;
    /// Up to `limit` seqs of `dev`'s commands at or below `upto`, in order.
    fn command_seqs_upto(&self, dev: DeviceId, upto: u64, limit: usize) -> Result<Vec<u64>>;
}

/// [`Tables`] on one LMDB write transaction.
pub(crate) struct Lmdb<'a, 't> {
    pub(crate) t: &'a mut RwTransaction<'t>,
    pub(crate) d: &'a Dbs,
    pub(crate) buf: &'a mut Vec<u8>,
}

impl Lmdb<'_, '_> {
    fn put<R: Record>(&mut self, db: lmdb::Database, key: &[u8], rec: &R) -> Result<()> {
        rec.encode(self.buf)?;
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
}

impl Tables for Lmdb<'_, '_> {
    fn device(&self, id: DeviceId) -> Result<Option<Device>> {
        read::device(&*self.t, self.d, id)
    }
    fn name_taken(&self, name: &str) -> Result<bool> {
        env::exists(&*self.t, self.d.device_names, name.as_bytes())
    }
    fn put_device(&mut self, dev: &Device) -> Result<()> {
        let db = self.d.devices;
        self.put(db, &dev.id.0.to_be_bytes(), dev)
    }
    fn put_device_name(&mut self, name: &str, id: DeviceId) -> Result<()> {
        let db = self.d.device_names;
        self.put_raw(db, name.as_bytes(), &id.0.to_be_bytes())
    }
    fn next_id(&mut self, counter: Counter) -> Result<u64> {
        let key = match counter {
            Counter::Device => env::META_NEXT_DEVICE,
            Counter::Task => env::META_NEXT_TASK,
        };
        let id = env::meta_u64(&*self.t, self.d.meta, key)? + 1;
        let db = self.d.meta;
        self.put_raw(db, key, &id.to_le_bytes())?;
        Ok(id)
    }
    fn token(&self, hash: &[u8; 32]) -> Result<Option<EnrolmentToken>> {
        env::get(&*self.t, self.d.enrol_tokens, hash)
    }
    fn put_token(&mut self, hash: &[u8; 32], token: &EnrolmentToken) -> Result<()> {
        let db = self.d.enrol_tokens;
        self.put(db, hash, token)
    }
    fn del_token(&mut self, hash: &[u8; 32]) -> Result<()> {
        let db = self.d.enrol_tokens;
        self.del(db, hash)
    }
    fn queue(&self, id: DeviceId) -> Result<Option<QueueState>> {
        read::queue(&*self.t, self.d, id)
    }
    fn put_queue(&mut self, id: DeviceId, q: &QueueState) -> Result<()> {
        let db = self.d.queues;
        self.put(db, &id.0.to_be_bytes(), q)
    }
    fn command(&self, dev: DeviceId, seq: u64) -> Result<Option<Command>> {
        read::command(&*self.t, self.d, dev, seq)
    }
    fn command_policy(&self, dev: DeviceId, seq: u64) -> Result<Option<CommandPolicy>> {
        read::command_policy(&*self.t, self.d, dev, seq)
    }
    fn first_after(&self, dev: DeviceId, after: u64) -> Result<Option<u64>> {
        read::first_after(&*self.t, self.d, dev, after)
    }
    fn command_seqs_from(&self, dev: DeviceId, from: u64) -> Result<Vec<u64>> {
        let mut seqs = Vec::new();
        let p = dev.0.to_be_bytes();
        env::scan(&*self.t, self.d.commands, &key2(dev.0, from), &p, |k, _| {
            seqs.push(env::split2(k, "commands")?.1);
            Ok(true)
        })?;
        Ok(seqs)
    }
    fn put_command(&mut self, dev: DeviceId, seq: u64, cmd: &Command) -> Result<()> {
        let db = self.d.commands;
        self.put(db, &key2(dev.0, seq), cmd)
    }
    fn del_command(&mut self, dev: DeviceId, seq: u64) -> Result<()> {
        let (c, r) = (self.d.commands, self.d.results);
        self.del(c, &key2(dev.0, seq))?;
        self.del(r, &key2(dev.0, seq))
    }
    fn result(&self, dev: DeviceId, seq: u64) -> Result<Option<StoredResult>> {
        read::result(&*self.t, self.d, dev, seq)
    }
    fn with_result_bytes(&self, dev: DeviceId, seq: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool> {
        match self.t.get(self.d.results, &key2(dev.0, seq)) {
            Ok(v) => {
                f(v);
                Ok(true)
            }
            Err(lmdb::Error::NotFound) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
    fn put_result(&mut self, dev: DeviceId, seq: u64, r: &StoredResult) -> Result<()> {
        let db = self.d.results;
        self.put(db, &key2(dev.0, seq), r)
    }
    fn group_members(&self, group: &str) -> Result<Vec<DeviceId>> {
        read::group_members(&*self.t, self.d, group)
    }
    fn add_member(&mut self, group: &str, dev: DeviceId) -> Result<()> {
        let db = self.d.groups;
        self.put_raw(db, &env::group_key(group, dev), &[])
    }
    fn del_member(&mut self, group: &str, dev: DeviceId) -> Result<()> {
        let db = self.d.groups;
        self.del(db, &env::group_key(group, dev))
    }
    fn task(&self, id: TaskId) -> Result<Option<Task>> {
        read::task(&*self.t, self.d, id)
    }
    fn put_task(&mut self, id: TaskId, task: &Task) -> Result<()> {
        let db = self.d.tasks;
        self.put(db, &id.0.to_be_bytes(), task)
    }
    fn task_status(&self, task: TaskId, dev: DeviceId) -> Result<Option<TaskDeviceStatus>> {
        read::task_status(&*self.t, self.d, task, dev)
    }
    fn put_task_status(
        &mut self,
        task: TaskId,
        dev: DeviceId,
        st: &TaskDeviceStatus,
    ) -> Result<()> {
        let (ts, dt) = (self.d.task_status, self.d.device_tasks);
        self.put(ts, &key2(task.0, dev.0), st)?;
        if st.is_incomplete() {
            self.put_raw(dt, &key2(dev.0, task.0), &[])
        } else {
            self.del(dt, &key2(dev.0, task.0))
        }
    }
    fn last_event_id(&self) -> Result<EventId> {
        read::last_event_id(&*self.t, self.d)
    }
    fn put_event(&mut self, id: EventId, event: &Event) -> Result<()> {
        event.encode(self.buf)?;
        self.t.put(
            self.d.events,
            &id.to_be_bytes(),
            &self.buf.as_slice(),
            WriteFlags::APPEND,
        )?;
        Ok(())
    }
    fn prune_events(&mut self, older_than: u64, keep_max: u64, limit: usize) -> Result<usize> {
        let d = *self.d;
        let last = read::last_event_id(&*self.t, &d)?;
        let entries = self.t.stat(d.events)?.entries() as u64;
        let mut doomed = Vec::new();
        env::scan(&*self.t, d.events, &[], &[], |k, v| {
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
            self.del(d.events, &id.to_be_bytes())?;
        }
        Ok(doomed.len())
    }
    fn queue_from(&self, from: DeviceId) -> Result<Option<(DeviceId, QueueState)>> {
        let mut next = None;
        env::scan(
            &*self.t,
            self.d.queues,
            &from.0.to_be_bytes(),
            &[],
            |k, v| {
                next = Some((DeviceId(env::be(k, "queues")?), QueueState::decode(v)?));
                Ok(false)
            },
        )?;
        Ok(next)
    }
    fn command_seqs_upto(&self, dev: DeviceId, upto: u64, limit: usize) -> Result<Vec<u64>> {
        let mut seqs = Vec::new();
        let p = dev.0.to_be_bytes();
        env::scan(&*self.t, self.d.commands, &key2(dev.0, 0), &p, |k, _| {
            let (_, seq) = env::split2(k, "commands")?;
            if seq > upto || seqs.len() >= limit {
                return Ok(false);
            }
            seqs.push(seq);
            Ok(true)
        })?;
        Ok(seqs)
    }
}
