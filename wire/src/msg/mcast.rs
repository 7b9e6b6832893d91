//! Distribution messages: announce over the control session, data blocks and NACKs as
//! datagrams, unicast repair, completion and transfer status.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::control::wire_enum;
use super::limits::*;
use crate::codec::{Reader, Sink};
use crate::error::{Error, Result};
use crate::ranges::{Ranges, MAX_NACK_RANGES};

/// `Announce`: a distribution task for this device (gateway → agent, control session).
///
/// Fields: `task_id u64`, `session u32`, `group addr`, `port u16`, `size u64`,
/// `block_size u32`, `sha256 [32]`, `auth_key option<[32]>`, `name str16`, where `addr` is
/// `u8 family (4|6)` then 4 or 16 address bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Announce<'a> {
    /// The task in the gateway's task table.
    pub task_id: u64,
    /// The multicast session id carried in every data block.
    pub session: u32,
    /// Multicast group to join.
    pub group: IpAddr,
    /// UDP port of the group.
    pub port: u16,
    /// File size in bytes.
    pub size: u64,
    /// Bytes per block (the last block may be shorter).
    pub block_size: u32,
    /// SHA-256 of the whole file.
    pub sha256: [u8; 32],
    /// Per-session packet-authentication key, when packets carry tags.
    pub auth_key: Option<[u8; 32]>,
    /// File name (the agent decides where it lands).
    pub name: &'a str,
}

impl<'a> Announce<'a> {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.task_id)?;
        s.u32(self.session)?;
        match self.group {
            IpAddr::V4(a) => {
                s.u8(4)?;
                s.put(&a.octets())?;
            }
            IpAddr::V6(a) => {
                s.u8(6)?;
                s.put(&a.octets())?;
            }
        }
        s.u16(self.port)?;
        s.u64(self.size)?;
        s.u32(self.block_size)?;
        s.put(&self.sha256)?;
        s.present(self.auth_key.is_some())?;
        if let Some(k) = &self.auth_key {
            s.put(k)?;
        }
        s.str16(self.name, MAX_NAME)
    }
    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self> {
        let task_id = r.u64()?;
        let session = r.u32()?;
        let group = match r.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
            _ => return Err(Error::InvalidValue),
        };
        let port = r.u16()?;
        let size = r.u64()?;
        let block_size = r.u32()?;
        let sha256 = r.array()?;
        let auth_key = if r.present()? { Some(r.array()?) } else { None };
        let name = r.str16(MAX_NAME)?;
        Ok(Announce {
            task_id,
            session,
            group,
            port,
            size,
            block_size,
            sha256,
            auth_key,
            name,
        })
    }
}

/// `Nack`: blocks a receiver is missing (agent → gateway, datagram or control session).
///
/// Fields: `session u32`, `device_id u64`, `missing ranges` (see [`Ranges`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Nack {
    /// The multicast session.
    pub session: u32,
    /// Who is missing the blocks (counted per device by the sender).
    pub device_id: u64,
    /// Missing blocks.
    pub missing: Ranges,
}

impl Nack {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u32(self.session)?;
        s.u64(self.device_id)?;
        self.missing.encode(s, MAX_NACK_RANGES)
    }
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(Nack {
            session: r.u32()?,
            device_id: r.u64()?,
            missing: Ranges::decode(r, MAX_NACK_RANGES)?,
        })
    }
}

wire_enum! {
    /// How a transfer ended on a receiver.
    Outcome { Verified = 0, DigestMismatch = 1, WriteFailed = 2, Aborted = 3 }
}

/// `Completion`: a receiver's final word on a task (agent → gateway, control session).
///
/// Fields: `task_id u64`, `session u32`, `outcome u8`, `sha256 [32]` (what the receiver
/// computed), `reason str16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Completion<'a> {
    /// The task.
    pub task_id: u64,
    /// The multicast session.
    pub session: u32,
    /// Verified, or why not.
    pub outcome: Outcome,
    /// Digest the receiver computed over its copy.
    pub sha256: [u8; 32],
    /// Detail for a failure (empty when verified).
    pub reason: &'a str,
}

impl<'a> Completion<'a> {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.task_id)?;
        s.u32(self.session)?;
        s.u8(self.outcome as u8)?;
        s.put(&self.sha256)?;
        s.str16(self.reason, MAX_REASON)
    }
    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self> {
        Ok(Completion {
            task_id: r.u64()?,
            session: r.u32()?,
            outcome: Outcome::from_u8(r.u8()?)?,
            sha256: r.array()?,
            reason: r.str16(MAX_REASON)?,
        })
    }
}

wire_enum! {
    /// A device's state in a task's status table.
    TransferState { Pending = 0, InProgress = 1, Completed = 2, Failed = 3 }
}

/// `TransferStatus`: progress of one task on one device, in either direction: an agent
/// reports it (and so asks for catch-up on reconnect); the gateway answers with its view.
///
/// Fields: `task_id u64`, `session u32`, `state u8`, `received u32`, `total u32` (blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct TransferStatus {
    /// The task.
    pub task_id: u64,
    /// The multicast session.
    pub session: u32,
    /// The device's state for the task.
    pub state: TransferState,
    /// Blocks received and written.
    pub received: u32,
    /// Blocks in the file.
    pub total: u32,
}

impl TransferStatus {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.task_id)?;
        s.u32(self.session)?;
        s.u8(self.state as u8)?;
        s.u32(self.received)?;
        s.u32(self.total)
    }
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(TransferStatus {
            task_id: r.u64()?,
            session: r.u32()?,
            state: TransferState::from_u8(r.u8()?)?,
            received: r.u32()?,
            total: r.u32()?,
        })
    }
}
