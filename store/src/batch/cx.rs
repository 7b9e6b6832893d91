//! The write helpers of one transaction, shared by every operation.

use lmdb::{RwTransaction, WriteFlags};

use crate::codec::Record;
use crate::env::{self, key2, Dbs};
use crate::error::{Error, Illegal, Missing, Result};
use crate::read;
use crate::types::{
    CommandPolicy, Device, DeviceId, FailReason, QueueState, StoredResult, TaskDeviceStatus, TaskId,
};

/// Write helpers over one transaction.
pub(super) struct Cx<'a, 't> {
    pub(super) t: &'a mut RwTransaction<'t>,
    pub(super) d: &'a Dbs,
    pub(super) buf: &'a mut Vec<u8>,
}

impl<'a, 't> Cx<'a, 't> {
    pub(super) fn new(t: &'a mut RwTransaction<'t>, d: &'a Dbs, buf: &'a mut Vec<u8>) -> Self {
        Cx { t, d, buf }
    }
    pub(super) fn put<R: Record>(&mut self, db: lmdb::Database, key: &[u8], rec: &R) -> Result<()> {
        rec.encode(self.buf)?;
        self.t
            .put(db, &key, &self.buf.as_slice(), WriteFlags::empty())?;
        Ok(())
    }
    pub(super) fn put_raw(&mut self, db: lmdb::Database, key: &[u8], val: &[u8]) -> Result<()> {
        self.t.put(db, &key, &val, WriteFlags::empty())?;
        Ok(())
    }
    pub(super) fn del(&mut self, db: lmdb::Database, key: &[u8]) -> Result<()> {
        match self.t.del(db, &key, None) {
            Ok(()) | Err(lmdb::Error::NotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    pub(super) fn queue(&self, dev: DeviceId) -> Result<QueueState> {
        read::queue(&*self.t, self.d, dev)?.ok_or(Error::NotFound(Missing::Device(dev)))
    }
    pub(super) fn device(&self, dev: DeviceId) -> Result<Device> {
        read::device(&*self.t, self.d, dev)?.ok_or(Error::NotFound(Missing::Device(dev)))
    }
    /// The queue of a device that is not revoked.
    pub(super) fn live_queue(&self, dev: DeviceId) -> Result<QueueState> {
        let q = self.queue(dev)?;
        if q.revoked {
            return Err(Error::illegal(dev, Illegal::Revoked));
        }
        Ok(q)
    }
    pub(super) fn put_queue(&mut self, dev: DeviceId, q: &QueueState) -> Result<()> {
        let d = self.d.queues;
        self.put(d, &dev.0.to_be_bytes(), q)
    }
    pub(super) fn first_after(&self, dev: DeviceId, after: u64) -> Result<Option<u64>> {
        read::first_after(&*self.t, self.d, dev, after)
    }
    pub(super) fn cursor_policy(&self, dev: DeviceId, seq: u64) -> Result<CommandPolicy> {
        read::command_policy(&*self.t, self.d, dev, seq)?.ok_or(Error::Corrupt {
            table: "commands",
            reason: "queue cursor names a missing command",
        })
    }
    pub(super) fn task_entry(&self, task: TaskId, dev: DeviceId) -> Result<TaskDeviceStatus> {
        read::task_status(&*self.t, self.d, task, dev)?
            .ok_or(Error::NotFound(Missing::TaskTarget { task, device: dev }))
    }
    pub(super) fn set_task_entry(
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
    pub(super) fn new_device(
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
            report_ms: None,
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
    pub(super) fn finish_attempt(
        &mut self,
        dev: DeviceId,
        q: &mut QueueState,
        seq: u64,
        result: &StoredResult,
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
