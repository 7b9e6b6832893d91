//! Every fleetcast message: one [`Message`] enum with `parse`, `emit` and `buffer_len`.
//!
//! # Contract
//! - Parsing borrows from the input (strings and byte strings are `Cow::Borrowed` slices of
//!   it); only lists allocate, and only after their count has been checked against the bytes
//!   remaining, so a frame of `n` bytes never makes the parser allocate more than a small
//!   multiple of `n`.
//! - Every message with a lifetime has `into_owned(self) -> Self<'static>` (the rustls
//!   `Payload<'a>` idea): the same type, borrowed on the hot path, owned where it is kept (the
//!   store's records, the agent's state, queues between threads). There is one type per
//!   message, never a parallel "owned" struct. Data blocks, repairs, parity symbols and manifests stay
//!   plain slices: they are never kept, and a `Cow` would only slow the multicast path, so
//!   [`Message`] itself has no `into_owned`.
//! - No input can panic, loop or allocate unboundedly; every declared length is checked before
//!   use; unknown versions, kinds and enum values are typed errors; a body must be consumed
//!   exactly ([`Error::TrailingBytes`] otherwise).
//! - `emit` writes exactly `buffer_len()` bytes; `parse(emit(m)) == m` for every message that
//!   `emit` accepts (tested by property tests and the `roundtrip` fuzz target).

use alloc::borrow::{Cow, ToOwned};
use alloc::string::String;
use alloc::vec::Vec;

use crate::codec::{Counter, Reader, Sink, SliceWriter};
use crate::data::DataBlock;
use crate::error::{Error, Result};
use crate::header::{frame_crc, Frame, FLAG_AUTH, HEADER_LEN, MAGIC, TAG_LEN, VERSION};
use crate::msg_kind::Kind;

mod control;
pub mod limits;
mod mcast;
mod report;
pub mod samples;
#[cfg(feature = "serde")]
mod serde_steps;

pub use control::{
    Close, CloseCode, CommandResult, ConfigReport, Dispatch, Enrol, Enrolled, Heartbeat, Hello,
    LastExecuted, Package, RebootComplete, RebootStarting, ResultAck, Step, StepResult, StepStatus,
    Welcome,
};
pub use mcast::{
    Announce, Completion, DigestRoot, ImageTarget, Manifest, Nack, Outcome, Overflow, Parity,
    ParityHeader, Probe, TaskAnswer, TaskAsk, TaskVerdict, TransferState, TransferStatus,
    COOKIE_LEN, MAX_MANIFEST_DIGESTS, PARITY_PREFIX_LEN,
};
pub use report::{Attached, AttachedKind, PackageManager, Target};

/// One fleetcast message, borrowing from the bytes it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[allow(missing_docs)]
pub enum Message<'a> {
    Hello(Hello<'a>),
    Welcome(Welcome),
    Heartbeat(Heartbeat),
    Enrol(Enrol<'a>),
    Enrolled(Enrolled<'a>),
    Dispatch(Dispatch<'a>),
    Result(CommandResult<'a>),
    ResultAck(ResultAck),
    RebootStarting(RebootStarting),
    RebootComplete(RebootComplete<'a>),
    Report(ConfigReport<'a>),
    Announce(Announce<'a>),
    Data(DataBlock<'a>),
    Nack(Nack),
    Repair(DataBlock<'a>),
    Completion(Completion<'a>),
    TransferStatus(TransferStatus),
    Parity(Parity<'a>),
    Probe(Probe),
    TaskAsk(TaskAsk),
    TaskAnswer(TaskAnswer),
    Manifest(Manifest<'a>),
    Overflow(Overflow),
    Close(Close<'a>),
}

impl<'a> Message<'a> {
    /// The message's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Heartbeat(_) => Kind::Heartbeat,
            Message::Enrol(_) => Kind::Enrol,
            Message::Enrolled(_) => Kind::Enrolled,
            Message::Dispatch(_) => Kind::Dispatch,
            Message::Result(_) => Kind::Result,
            Message::ResultAck(_) => Kind::ResultAck,
            Message::RebootStarting(_) => Kind::RebootStarting,
            Message::RebootComplete(_) => Kind::RebootComplete,
            Message::Report(_) => Kind::Report,
            Message::Announce(_) => Kind::Announce,
            Message::Data(_) => Kind::Data,
            Message::Nack(_) => Kind::Nack,
            Message::Repair(_) => Kind::Repair,
            Message::Completion(_) => Kind::Completion,
            Message::TransferStatus(_) => Kind::TransferStatus,
            Message::Parity(_) => Kind::Parity,
            Message::Probe(_) => Kind::Probe,
            Message::TaskAsk(_) => Kind::TaskAsk,
            Message::TaskAnswer(_) => Kind::TaskAnswer,
            Message::Manifest(_) => Kind::Manifest,
            Message::Overflow(_) => Kind::Overflow,
            Message::Close(_) => Kind::Close,
        }
    }

    fn encode_body<S: Sink>(&self, s: &mut S) -> Result<()> {
        match self {
            Message::Hello(m) => m.encode(s),
            Message::Welcome(m) => m.encode(s),
            Message::Heartbeat(m) => m.encode(s),
            Message::Enrol(m) => m.encode(s),
            Message::Enrolled(m) => m.encode(s),
            Message::Dispatch(m) => m.encode(s),
            Message::Result(m) => m.encode(s),
            Message::ResultAck(m) => s.u64(m.seq),
            Message::RebootStarting(m) => m.encode(s),
            Message::RebootComplete(m) => {
                s.u64(m.seq)?;
                m.report.encode(s)?;
                m.result.encode(s)
            }
            Message::Report(m) => m.encode(s),
            Message::Announce(m) => m.encode(s),
            Message::Data(b) | Message::Repair(b) => {
                s.u32(b.session)?;
                s.u32(b.block)?;
                s.put(b.payload)
            }
            Message::Nack(m) => m.encode(s),
            Message::Completion(m) => m.encode(s),
            Message::TransferStatus(m) => m.encode(s),
            Message::Parity(m) => m.encode(s),
            Message::Probe(m) => m.encode(s),
            Message::TaskAsk(m) => m.encode(s),
            Message::TaskAnswer(m) => m.encode(s),
            Message::Manifest(m) => m.encode(s),
            Message::Overflow(m) => m.encode(s),
            Message::Close(m) => m.encode(s),
        }
    }

    fn decode_body(kind: Kind, body: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(body);
        let r = &mut r;
        let msg = match kind {
            Kind::Hello => Message::Hello(Hello::decode(r)?),
            Kind::Welcome => Message::Welcome(Welcome::decode(r)?),
            Kind::Heartbeat => Message::Heartbeat(Heartbeat::decode(r)?),
            Kind::Enrol => Message::Enrol(Enrol::decode(r)?),
            Kind::Enrolled => Message::Enrolled(Enrolled::decode(r)?),
            Kind::Dispatch => Message::Dispatch(Dispatch::decode(r)?),
            Kind::Result => Message::Result(CommandResult::decode(r)?),
            Kind::ResultAck => Message::ResultAck(ResultAck { seq: r.u64()? }),
            Kind::RebootStarting => Message::RebootStarting(RebootStarting::decode(r)?),
            Kind::RebootComplete => Message::RebootComplete(RebootComplete {
                seq: r.u64()?,
                report: ConfigReport::decode(r)?,
                result: CommandResult::decode(r)?,
            }),
            Kind::Report => Message::Report(ConfigReport::decode(r)?),
            Kind::Announce => Message::Announce(Announce::decode(r)?),
            Kind::Data => Message::Data(DataBlock::parse_body(r.rest())?),
            Kind::Nack => Message::Nack(Nack::decode(r)?),
            Kind::Repair => Message::Repair(DataBlock::parse_body(r.rest())?),
            Kind::Completion => Message::Completion(Completion::decode(r)?),
            Kind::TransferStatus => Message::TransferStatus(TransferStatus::decode(r)?),
            Kind::Parity => Message::Parity(Parity::parse_body(r.rest())?),
            Kind::Probe => Message::Probe(Probe::decode(r)?),
            Kind::TaskAsk => Message::TaskAsk(TaskAsk::decode(r)?),
            Kind::TaskAnswer => Message::TaskAnswer(TaskAnswer::decode(r)?),
            Kind::Manifest => Message::Manifest(Manifest::decode(r)?),
            Kind::Overflow => Message::Overflow(Overflow::decode(r)?),
            Kind::Close => Message::Close(Close::decode(r)?),
        };
        r.clone().finish()?;
        Ok(msg)
    }

    /// Parses the message carried by a checked frame.
    pub fn parse(frame: &Frame<'a>) -> Result<Self> {
        Self::decode_body(Kind::from_u8(frame.header.kind)?, frame.body)
    }

    /// Parses a datagram holding exactly one frame. Returns the message and the frame (for
    /// verifying its authentication tag, if any).
    pub fn parse_datagram(datagram: &'a [u8]) -> Result<(Self, Frame<'a>)> {
        let frame = Frame::parse_datagram(datagram)?;
        Ok((Self::parse(&frame)?, frame))
    }

    /// Length of the body alone.
    pub fn body_len(&self) -> Result<usize> {
        let mut c = Counter::default();
        self.encode_body(&mut c)?;
        Ok(c.0)
    }

    /// Length of the whole frame `emit` writes (header and body, no tag).
    pub fn buffer_len(&self) -> Result<usize> {
        Ok(HEADER_LEN + self.body_len()?)
    }

    /// Writes the whole frame into `buf`; returns the number of bytes written
    /// (= [`Message::buffer_len`]).
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        self.emit_inner(buf, None::<fn(&[u8], &[u8]) -> [u8; TAG_LEN]>)
    }

    /// Like [`Message::emit`], with a packet-authentication tag: `mac(header[..8], body)`
    /// computes it over the same bytes [`Frame::mac_input`] gives the receiver. Writes
    /// `buffer_len() + TAG_LEN` bytes.
    pub fn emit_authenticated(
        &self,
        buf: &mut [u8],
        mac: impl FnOnce(&[u8], &[u8]) -> [u8; TAG_LEN],
    ) -> Result<usize> {
        self.emit_inner(buf, Some(mac))
    }

    fn emit_inner(
        &self,
        buf: &mut [u8],
        mac: Option<impl FnOnce(&[u8], &[u8]) -> [u8; TAG_LEN]>,
    ) -> Result<usize> {
        let body_len = {
            let body = buf.get_mut(HEADER_LEN..).ok_or(Error::BufferTooSmall)?;
            let mut w = SliceWriter::new(body);
            self.encode_body(&mut w)?;
            w.position()
        };
        let tag_len = if mac.is_some() { TAG_LEN } else { 0 };
        let total_body = body_len + tag_len;
        let total = HEADER_LEN + total_body;
        if total > buf.len() {
            return Err(Error::BufferTooSmall);
        }
        let len = u32::try_from(total_body).map_err(|_| Error::FieldTooLong)?;
        buf[0] = MAGIC;
        buf[1] = VERSION;
        buf[2] = self.kind() as u8;
        buf[3] = if mac.is_some() { FLAG_AUTH } else { 0 };
        buf[4..8].copy_from_slice(&len.to_be_bytes());
        if let Some(mac) = mac {
            let (head, body) = buf.split_at_mut(HEADER_LEN);
            let tag = mac(&head[..8], &body[..body_len]);
            body[body_len..body_len + TAG_LEN].copy_from_slice(&tag);
        }
        let crc = frame_crc(&buf[..8], &buf[HEADER_LEN..total]);
        buf[8..12].copy_from_slice(&crc.to_be_bytes());
        Ok(total)
    }

    /// Emits into a growable buffer, appending; returns the frame's range in `out`.
    #[cfg(feature = "alloc")]
    pub fn emit_to_vec(&self, out: &mut alloc::vec::Vec<u8>) -> Result<core::ops::Range<usize>> {
        let start = out.len();
        let n = self.buffer_len()?;
        out.resize(start + n, 0);
        let written = self.emit(&mut out[start..])?;
        debug_assert_eq!(written, n);
        Ok(start..start + written)
    }
}

/// A message part kept outside a frame. The gateway's store records and the agent's state keep
/// wire values in this encoding (the same bytes as inside a message, without a frame), so a
/// kept value has exactly one encoding, this crate's, and is decoded with the same checks as a
/// received one.
pub trait Embed<'a>: Sized {
    /// Appends the encoding to `out` (nothing is appended on error).
    fn encode_to_vec(&self, out: &mut Vec<u8>) -> Result<()>;
    /// Decodes exactly `bytes`; trailing bytes are [`Error::TrailingBytes`].
    fn decode_exact(bytes: &'a [u8]) -> Result<Self>;
}

macro_rules! embed {
    ($($t:ident),+) => {$(
        impl<'a> Embed<'a> for $t<'a> {
            fn encode_to_vec(&self, out: &mut Vec<u8>) -> Result<()> {
                let mut c = Counter::default();
                self.encode(&mut c)?;
                let start = out.len();
                out.resize(start + c.0, 0);
                let mut w = SliceWriter::new(&mut out[start..]);
                let r = self.encode(&mut w);
                if r.is_err() {
                    out.truncate(start);
                }
                r
            }
            fn decode_exact(bytes: &'a [u8]) -> Result<Self> {
                let mut r = Reader::new(bytes);
                let v = Self::decode(&mut r)?;
                r.finish()?;
                Ok(v)
            }
        }
    )+};
}
embed!(Step, CommandResult, ConfigReport, Announce);

/// Lower-case hex: digests and boot ids as text (admin JSON, logs, the store's queue records).
pub fn hex(bytes: &[u8]) -> String {
    use core::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Why text is not a SHA-256 digest (see [`parse_sha256`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestError {
    /// Not 64 characters long (the length it has).
    Length(usize),
    /// A character that is not a hex digit, at this byte offset.
    NotHex(usize),
}

impl core::fmt::Display for DigestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            DigestError::Length(n) => {
                write!(f, "a SHA-256 is 64 hex digits, got {n} characters")
            }
            DigestError::NotHex(at) => write!(f, "character {} is not a hex digit", at + 1),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DigestError {}

/// Parses a SHA-256 digest written as 64 hex digits (either case). Each character is checked
/// itself: `u8::from_str_radix` would take a `+` sign inside a pair.
pub fn parse_sha256(hex: &str) -> core::result::Result<[u8; 32], DigestError> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return Err(DigestError::Length(hex.chars().count()));
    }
    let digit = |at: usize| -> core::result::Result<u8, DigestError> {
        let c = bytes[at];
        (c as char)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or(DigestError::NotHex(at))
    };
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = digit(2 * i)? << 4 | digit(2 * i + 1)?;
    }
    Ok(out)
}

/// Reads a `str16` as a borrowed `Cow` (decoding never copies).
fn borrowed_str16<'a>(r: &mut Reader<'a>, max: usize) -> Result<Cow<'a, str>> {
    r.str16(max).map(Cow::Borrowed)
}

/// Reads a `bytes16` as a borrowed `Cow`.
fn borrowed_bytes16<'a>(r: &mut Reader<'a>, max: usize) -> Result<Cow<'a, [u8]>> {
    r.bytes16(max).map(Cow::Borrowed)
}

/// Detaches one field from the buffer it borrows (a no-op when it is owned already).
fn owned<B: ?Sized + ToOwned + 'static>(c: Cow<'_, B>) -> Cow<'static, B> {
    Cow::Owned(c.into_owned())
}

/// Detaches a list of strings.
fn owned_list(v: Vec<Cow<'_, str>>) -> Vec<Cow<'static, str>> {
    v.into_iter().map(owned).collect()
}

#[cfg(test)]
mod tests;
