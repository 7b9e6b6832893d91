//! Read queries, shared by [`Snapshot`](crate::Snapshot) (a read transaction) and
//! [`Batch`](crate::Batch) (which sees its own uncommitted writes).
//!
//! Every query returns owned, decoded values; nothing borrowed from LMDB escapes.

use lmdb::Transaction;

use crate::codec::Record;
use crate::env::{self, be, key2, split2, Dbs};
use crate::error::{Error, Result};
use crate::types::{
    Command, CommandPolicy, Device, DeviceId, Event, EventId, QueueState, QueueStatus,
    StoredResult, Task, TaskDeviceStatus, TaskId,
};

pub(crate) fn device<T: Transaction>(t: &T, d: &Dbs, id: DeviceId) -> Result<Option<Device>> {
    env::get(t, d.devices, &id.0.to_be_bytes())
}

pub(crate) fn device_by_name<T: Transaction>(t: &T, d: &Dbs, name: &str) -> Result<Option<Device>> {
    match t.get(d.device_names, &name.as_bytes()) {
        Ok(v) => {
            let id = DeviceId(be(v, "device_names")?);
            device(t, d, id)
        }
        Err(lmdb::Error::NotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn devices<T: Transaction>(t: &T, d: &Dbs) -> Result<Vec<Device>> {
    let mut out = Vec::new();
    env::scan(t, d.devices, &[], &[], |_, v| {
        out.push(Device::decode(v)?);
        Ok(true)
    })?;
    Ok(out)
}

pub(crate) fn queue<T: Transaction>(t: &T, d: &Dbs, id: DeviceId) -> Result<Option<QueueState>> {
    env::get(t, d.queues, &id.0.to_be_bytes())
}

pub(crate) fn queues<T: Transaction>(t: &T, d: &Dbs) -> Result<Vec<(DeviceId, QueueState)>> {
    let mut out = Vec::new();
    env::scan(t, d.queues, &[], &[], |k, v| {
        out.push((DeviceId(be(k, "queues")?), QueueState::decode(v)?));
        Ok(true)
    })?;
    Ok(out)
}

pub(crate) fn command<T: Transaction>(
    t: &T,
    d: &Dbs,
    id: DeviceId,
    seq: u64,
) -> Result<Option<Command>> {
    env::get(t, d.commands, &key2(id.0, seq))
}

/// The policy of one command, without decoding its steps.
pub(crate) fn command_policy<T: Transaction>(
    t: &T,
    d: &Dbs,
    id: DeviceId,
    seq: u64,
) -> Result<Option<CommandPolicy>> {
    match t.get(d.commands, &key2(id.0, seq)) {
        Ok(v) => CommandPolicy::decode_prefix(v).map(Some),
        Err(lmdb::Error::NotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Up to `limit` commands of `id` with seq ≥ `from`, in queue order.
pub(crate) fn commands<T: Transaction>(
    t: &T,
    d: &Dbs,
    id: DeviceId,
    from: u64,
    limit: usize,
) -> Result<Vec<(u64, Command)>> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    env::scan(
        t,
        d.commands,
        &key2(id.0, from),
        &id.0.to_be_bytes(),
        |k, v| {
            let (_, seq) = split2(k, "commands")?;
            out.push((seq, Command::decode(v)?));
            Ok(out.len() < limit)
        },
    )?;
    Ok(out)
}

/// The first command of `id` with seq > `after`.
pub(crate) fn first_after<T: Transaction>(
    t: &T,
    d: &Dbs,
    id: DeviceId,
    after: u64,
) -> Result<Option<u64>> {
    let Some(start) = after.checked_add(1) else {
        return Ok(None);
    };
    let mut found = None;
    env::scan(
        t,
        d.commands,
        &key2(id.0, start),
        &id.0.to_be_bytes(),
        |k, _| {
            found = Some(split2(k, "commands")?.1);
            Ok(false)
        },
    )?;
    Ok(found)
}

pub(crate) fn next_to_dispatch<T: Transaction>(
    t: &T,
    d: &Dbs,
    id: DeviceId,
) -> Result<Option<(u64, Command)>> {
    let Some(q) = queue(t, d, id)? else {
        return Ok(None);
    };
    if q.status != QueueStatus::Running {
        return Ok(None);
    }
    let Some(seq) = first_after(t, d, id, q.completed_through)? else {
        return Ok(None);
    };
    let cmd = command(t, d, id, seq)?.ok_or(Error::Corrupt {
        table: "commands",
        reason: "scanned command vanished",
    })?;
    Ok(Some((seq, cmd)))
}

pub(crate) fn result<T: Transaction>(
    t: &T,
    d: &Dbs,
    id: DeviceId,
    seq: u64,
) -> Result<Option<StoredResult>> {
    let mut r: Option<StoredResult> = env::get(t, d.results, &key2(id.0, seq))?;
    // Format-1 records did not keep the sequence number inside: it is the key's.
    if let Some(StoredResult::Received(x)) = &mut r {
        if x.result.seq == 0 {
            x.result.seq = seq;
        }
    }
    Ok(r)
}

pub(crate) fn group_members<T: Transaction>(t: &T, d: &Dbs, name: &str) -> Result<Vec<DeviceId>> {
    let prefix = env::group_prefix(name);
    let mut out = Vec::new();
    env::scan(t, d.groups, &prefix, &prefix, |k, _| {
        let id = k.get(prefix.len()..).ok_or(Error::Corrupt {
            table: "groups",
            reason: "key length",
        })?;
        out.push(DeviceId(be(id, "groups")?));
        Ok(true)
    })?;
    Ok(out)
}

/// Every group with its members, in name order (lengths first, as keys sort).
pub(crate) fn groups<T: Transaction>(t: &T, d: &Dbs) -> Result<Vec<(String, Vec<DeviceId>)>> {
    let mut out: Vec<(String, Vec<DeviceId>)> = Vec::new();
    env::scan(t, d.groups, &[], &[], |k, _| {
        let corrupt = || Error::Corrupt {
            table: "groups",
            reason: "key layout",
        };
        let len = k.get(..2).ok_or_else(corrupt)?;
        let n = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let name = k.get(2..2 + n).ok_or_else(corrupt)?;
        let name = std::str::from_utf8(name).map_err(|_| corrupt())?;
        let id = DeviceId(be(k.get(2 + n..).ok_or_else(corrupt)?, "groups")?);
        match out.last_mut() {
            Some((g, members)) if g == name => members.push(id),
            _ => out.push((name.to_string(), vec![id])),
        }
        Ok(true)
    })?;
    Ok(out)
}

pub(crate) fn task<T: Transaction>(t: &T, d: &Dbs, id: TaskId) -> Result<Option<Task>> {
    env::get(t, d.tasks, &id.0.to_be_bytes())
}

pub(crate) fn tasks<T: Transaction>(t: &T, d: &Dbs) -> Result<Vec<(TaskId, Task)>> {
    let mut out = Vec::new();
    env::scan(t, d.tasks, &[], &[], |k, v| {
        out.push((TaskId(be(k, "tasks")?), Task::decode(v)?));
        Ok(true)
    })?;
    Ok(out)
}

pub(crate) fn task_status<T: Transaction>(
    t: &T,
    d: &Dbs,
    task: TaskId,
    dev: DeviceId,
) -> Result<Option<TaskDeviceStatus>> {
    env::get(t, d.task_status, &key2(task.0, dev.0))
}

pub(crate) fn task_statuses<T: Transaction>(
    t: &T,
    d: &Dbs,
    task: TaskId,
) -> Result<Vec<(DeviceId, TaskDeviceStatus)>> {
    let p = task.0.to_be_bytes();
    let mut out = Vec::new();
    env::scan(t, d.task_status, &p, &p, |k, v| {
        let (_, dev) = split2(k, "task_status")?;
        out.push((DeviceId(dev), TaskDeviceStatus::decode(v)?));
        Ok(true)
    })?;
    Ok(out)
}

pub(crate) fn incomplete_tasks<T: Transaction>(
    t: &T,
    d: &Dbs,
    dev: DeviceId,
) -> Result<Vec<TaskId>> {
    let p = dev.0.to_be_bytes();
    let mut out = Vec::new();
    env::scan(t, d.device_tasks, &p, &p, |k, _| {
        out.push(TaskId(split2(k, "device_tasks")?.1));
        Ok(true)
    })?;
    Ok(out)
}

pub(crate) fn events_from<T: Transaction>(
    t: &T,
    d: &Dbs,
    from: EventId,
    limit: usize,
) -> Result<Vec<(EventId, Event)>> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    env::scan(t, d.events, &from.to_be_bytes(), &[], |k, v| {
        out.push((be(k, "events")?, Event::decode(v)?));
        Ok(out.len() < limit)
    })?;
    Ok(out)
}

pub(crate) fn last_event_id<T: Transaction>(t: &T, d: &Dbs) -> Result<EventId> {
    match env::last_key(t, d.events)? {
        Some(k) => be(&k, "events"),
        None => Ok(0),
    }
}

/// Generates the public read methods on a type with `fn read_parts(&self) -> Result<(&T, &Dbs)>`.
macro_rules! read_methods {
    () => {
        fn device(&self, id: DeviceId) -> Result<Option<Device>> {
            let (t, d) = self.read_parts()?;
            read::device(t, d, id)
        }
        fn device_by_name(&self, name: &str) -> Result<Option<Device>> {
            let (t, d) = self.read_parts()?;
            read::device_by_name(t, d, name)
        }
        fn devices(&self) -> Result<Vec<Device>> {
            let (t, d) = self.read_parts()?;
            read::devices(t, d)
        }
        fn queue(&self, id: DeviceId) -> Result<Option<QueueState>> {
            let (t, d) = self.read_parts()?;
            read::queue(t, d, id)
        }
        fn queues(&self) -> Result<Vec<(DeviceId, QueueState)>> {
            let (t, d) = self.read_parts()?;
            read::queues(t, d)
        }
        fn command(&self, id: DeviceId, seq: u64) -> Result<Option<Command>> {
            let (t, d) = self.read_parts()?;
            read::command(t, d, id, seq)
        }
        fn commands(&self, id: DeviceId, from: u64, limit: usize) -> Result<Vec<(u64, Command)>> {
            let (t, d) = self.read_parts()?;
            read::commands(t, d, id, from, limit)
        }
        fn next_to_dispatch(&self, id: DeviceId) -> Result<Option<(u64, Command)>> {
            let (t, d) = self.read_parts()?;
            read::next_to_dispatch(t, d, id)
        }
        fn result(&self, id: DeviceId, seq: u64) -> Result<Option<StoredResult>> {
            let (t, d) = self.read_parts()?;
            read::result(t, d, id, seq)
        }
        fn group_members(&self, group: &str) -> Result<Vec<DeviceId>> {
            let (t, d) = self.read_parts()?;
            read::group_members(t, d, group)
        }
        fn groups(&self) -> Result<Vec<(String, Vec<DeviceId>)>> {
            let (t, d) = self.read_parts()?;
            read::groups(t, d)
        }
        fn task(&self, id: TaskId) -> Result<Option<Task>> {
            let (t, d) = self.read_parts()?;
            read::task(t, d, id)
        }
        fn tasks(&self) -> Result<Vec<(TaskId, Task)>> {
            let (t, d) = self.read_parts()?;
            read::tasks(t, d)
        }
        fn task_status(&self, task: TaskId, dev: DeviceId) -> Result<Option<TaskDeviceStatus>> {
            let (t, d) = self.read_parts()?;
            read::task_status(t, d, task, dev)
        }
        fn task_statuses(&self, task: TaskId) -> Result<Vec<(DeviceId, TaskDeviceStatus)>> {
            let (t, d) = self.read_parts()?;
            read::task_statuses(t, d, task)
        }
        fn incomplete_tasks(&self, dev: DeviceId) -> Result<Vec<TaskId>> {
            let (t, d) = self.read_parts()?;
            read::incomplete_tasks(t, d, dev)
        }
        fn events_from(&self, from: EventId, limit: usize) -> Result<Vec<(EventId, Event)>> {
            let (t, d) = self.read_parts()?;
            read::events_from(t, d, from, limit)
        }
        fn last_event_id(&self) -> Result<EventId> {
            let (t, d) = self.read_parts()?;
            read::last_event_id(t, d)
        }
        fn commit_seq(&self) -> Result<u64> {
            let (t, d) = self.read_parts()?;
            env::meta_u64(t, d.meta, env::META_COMMIT_SEQ)
        }
    };
}
pub(crate) use read_methods;
