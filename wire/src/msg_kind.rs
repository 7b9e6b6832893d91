//! Message kinds of wire version 2 (the header's `kind` byte).

use crate::error::{Error, Result};

/// Every message kind of wire version 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    /// [`crate::Hello`]
    Hello = 0x01,
    /// [`crate::Welcome`]
    Welcome = 0x02,
    /// [`crate::Heartbeat`]
    Heartbeat = 0x03,
    /// [`crate::Enrol`]
    Enrol = 0x04,
    /// [`crate::Enrolled`]
    Enrolled = 0x05,
    /// [`crate::Dispatch`]
    Dispatch = 0x10,
    /// [`crate::CommandResult`]
    Result = 0x11,
    /// [`crate::ResultAck`]
    ResultAck = 0x12,
    /// [`crate::RebootStarting`]
    RebootStarting = 0x13,
    /// [`crate::RebootComplete`]
    RebootComplete = 0x14,
    /// [`crate::ConfigReport`] on its own (after enrolment, at agent start)
    Report = 0x15,
    /// [`crate::Announce`]
    Announce = 0x20,
    /// [`crate::DataBlock`] sent to the group
    Data = 0x21,
    /// [`crate::Nack`]
    Nack = 0x22,
    /// [`crate::DataBlock`] sent by unicast to one receiver
    Repair = 0x23,
    /// [`crate::Completion`]
    Completion = 0x24,
    /// [`crate::TransferStatus`]
    TransferStatus = 0x25,
    /// [`crate::Parity`]: an FEC parity symbol sent to the group
    Parity = 0x26,
    /// [`crate::Probe`]: an address check sent by unicast to one receiver
    Probe = 0x27,
    /// [`crate::TaskAsk`]: the device's task finisher asks for a task's completion
    TaskAsk = 0x28,
    /// [`crate::TaskAnswer`]: the gateway's answer to a `TaskAsk`, from the task table
    TaskAnswer = 0x29,
    /// [`crate::Manifest`]: block digests and their Merkle path (version 5)
    Manifest = 0x2A,
    /// [`crate::Overflow`]: a receiver's socket dropped datagrams (the sender paces down)
    Overflow = 0x2B,
    /// [`crate::Close`]
    Close = 0x3F,
}

impl Kind {
    /// Every kind, in code order.
    pub const ALL: [Kind; 24] = [
        Kind::Hello,
        Kind::Welcome,
        Kind::Heartbeat,
        Kind::Enrol,
        Kind::Enrolled,
        Kind::Dispatch,
        Kind::Result,
        Kind::ResultAck,
        Kind::RebootStarting,
        Kind::RebootComplete,
        Kind::Report,
        Kind::Announce,
        Kind::Data,
        Kind::Nack,
        Kind::Repair,
        Kind::Completion,
        Kind::TransferStatus,
        Kind::Parity,
        Kind::Probe,
        Kind::TaskAsk,
        Kind::TaskAnswer,
        Kind::Manifest,
        Kind::Overflow,
        Kind::Close,
    ];

    /// The kind for a header's kind byte.
    pub fn from_u8(v: u8) -> Result<Kind> {
        Kind::ALL
            .iter()
            .copied()
            .find(|k| *k as u8 == v)
            .ok_or(Error::UnknownKind(v))
    }
}
