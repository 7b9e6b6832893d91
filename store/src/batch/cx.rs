//! The helpers every operation shares, over the transaction's [`Tables`].

use super::tables::{Counter, Tables};
use crate::error::{Error, Illegal, Missing, Result};
use crate::types::{
    CommandPolicy, Device, DeviceId, FailReason, QueueState, StoredResult, TaskDeviceStatus, TaskId,
};

/// One operation's view of its transaction.
pub(crate) struct Cx<'a> {
    pub(crate) t: &'a mut dyn Tables,
    /// A buffer an operation may encode into (kept by the batch across operations).
    pub(crate) scratch: &'a mut Vec<u8>,
}

impl<'a> Cx<'a> {
    pub(crate) fn new(t: &'a mut dyn Tables, scratch: &'a mut Vec<u8>) -> Self {
        Cx { t, scratch }
    }
    pub(super) fn queue(&self, dev: DeviceId) -> Result<QueueState> {
        self.t
            .queue(dev)?
            .ok_or(Error::NotFound(Missing::Device(dev)))
    }
    pub(super) fn device(&self, dev: DeviceId) -> Result<Device> {
        self.t
            .device(dev)?
            .ok_or(Error::NotFound(Missing::Device(dev)))
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
        self.t.put_queue(dev, q)
    }
    pub(super) fn first_after(&self, dev: DeviceId, after: u64) -> Result<Option<u64>> {
        self.t.first_after(dev, after)
    }
    pub(super) fn cursor_policy(&self, dev: DeviceId, seq: u64) -> Result<CommandPolicy> {
        self.t.command_policy(dev, seq)?.ok_or(Error::Corrupt {
            table: "commands",
            reason: "queue cursor names a missing command",
        })
    }
    pub(super) fn task_entry(&self, task: TaskId, dev: DeviceId) -> Result<TaskDeviceStatus> {
        self.t
            .task_status(task, dev)?
            .ok_or(Error::NotFound(Missing::TaskTarget { task, device: dev }))
    }
    pub(super) fn set_task_entry(
        &mut self,
        task: TaskId,
        dev: DeviceId,
        st: &TaskDeviceStatus,
    ) -> Result<()> {
        self.t.put_task_status(task, dev, st)
    }
    pub(super) fn new_device(
        &mut self,
        name: &str,
        credential: [u8; 32],
        now: u64,
        groups: &[String],
    ) -> Result<u64> {
        let id = self.t.next_id(Counter::Device)?;
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
        self.t.put_device(&dev)?;
        self.t.put_device_name(name, DeviceId(id))?;
        self.put_queue(DeviceId(id), &QueueState::default())?;
        for g in groups {
            self.t.add_member(g, DeviceId(id))?;
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
        self.t.put_result(dev, seq, result)?;
        self.put_queue(dev, q)
    }
}
