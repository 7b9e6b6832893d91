//! Distribution messages: announce over the control session, data blocks and NACKs as
//! datagrams, FEC parity as multicast repair, unicast repair, completion and transfer status.

use alloc::borrow::Cow;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::control::wire_enum;
use super::limits::*;
use super::{borrowed_str16, owned};
use crate::codec::{Reader, Sink};
use crate::error::{Error, Result};
use crate::header::{Frame, FLAG_AUTH, HEADER_LEN, MAGIC, TAG_LEN, VERSION};
use crate::msg_kind::Kind;
use crate::ranges::{Ranges, MAX_NACK_RANGES};

/// `Announce`: a distribution task for this device (gateway → agent, control session).
///
/// Fields: `task_id u64`, `session u32`, `group addr`, `port u16`, `size u64`,
/// `block_size u32`, `fec_group u32`, `sha256 [32]`, `digests option<root [32], per_manifest
/// u16 (≥ 1)>`, `nack_key option<[32]>`, `name str16`, `image option<target str16, map
/// bytes32>` (version 6), where `addr` is `u8 family (4|6)` then 4 or 16 address bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Blocks per FEC group of the parity this device's sender repairs with, or 0 when it
    /// sends none (a device caught up by unicast). Knowing it from the start, a receiver
    /// NACKs whole groups once the first pass is past them, and never the same NACK twice
    /// before its repeat interval, instead of every gap as it opens.
    pub fec_group: u32,
    /// SHA-256 of the whole file.
    pub sha256: [u8; 32],
    /// How blocks are authenticated: the Merkle root over the task's manifests and their size
    /// (`mcast::digest`); every block a receiver writes must match its digest in a manifest
    /// whose path leads to the root. `None`: blocks are not authenticated (tests and
    /// simulations only; a gateway always sends one).
    pub digests: Option<DigestRoot>,
    /// This device's own key for the `Nack`s it sends and the `Probe`s it receives, when they
    /// carry tags. The gateway derives one per device and per announce, so no other receiver
    /// can tag a NACK in this device's name, and a new announce (a new control session)
    /// makes every earlier NACK of the device invalid.
    pub nack_key: Option<[u8; 32]>,
    /// File name (the agent decides where it lands).
    pub name: Cow<'a, str>,
    /// Where the file goes when it is an image for a disk, a partition or a slot, and how
    /// the stream relates to the image; `None`: an ordinary file for the downloads directory.
    pub image: Option<ImageTarget<'a>>,
}

/// An image push's target and form ([`Announce::image`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct ImageTarget<'a> {
    /// The target as the operator named it: an absolute file path, `KIND=ID` of a disk or a
    /// partition (`serial`, `wwn`, `partlabel`, `partuuid`, `uuid`) or a slot (`slot=a`,
    /// `slot=b`, `slot=inactive`). The agent resolves and checks it; never a bare `/dev` name.
    pub target: Cow<'a, str>,
    /// The image map (`image::ImageMap`, encoded) when the stream is the image's data extents
    /// (sparse) or its compressed chunks; empty when the stream is the image itself (raw).
    /// Kept as bytes here: the agent decodes and checks it, and refuses the task (naming why)
    /// if it does not decode, so a bad map never closes the control session.
    pub map: Cow<'a, [u8]>,
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
        s.u32(self.fec_group)?;
        s.put(&self.sha256)?;
        s.present(self.digests.is_some())?;
        if let Some(d) = &self.digests {
            d.check()?;
            s.put(&d.root)?;
            s.u16(d.per_manifest)?;
        }
        s.present(self.nack_key.is_some())?;
        if let Some(k) = &self.nack_key {
            s.put(k)?;
        }
        s.str16(&self.name, MAX_NAME)?;
        s.present(self.image.is_some())?;
        if let Some(i) = &self.image {
            s.str16(&i.target, MAX_PATH)?;
            s.bytes32(&i.map, MAX_IMAGE_MAP)?;
        }
        Ok(())
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
        let fec_group = r.u32()?;
        let sha256 = r.array()?;
        let digests = if r.present()? {
            let d = DigestRoot {
                root: r.array()?,
                per_manifest: r.u16()?,
            };
            d.check()?;
            Some(d)
        } else {
            None
        };
        let nack_key = if r.present()? { Some(r.array()?) } else { None };
        let name = borrowed_str16(r, MAX_NAME)?;
        let image = if r.present()? {
            Some(ImageTarget {
                target: borrowed_str16(r, MAX_PATH)?,
                map: Cow::Borrowed(r.bytes32(MAX_IMAGE_MAP)?),
            })
        } else {
            None
        };
        Ok(Announce {
            task_id,
            session,
            group,
            port,
            size,
            block_size,
            fec_group,
            sha256,
            digests,
            nack_key,
            name,
            image,
        })
    }
}

impl Announce<'_> {
    /// This message, owning its name (to keep in a task table or a store record).
    pub fn into_owned(self) -> Announce<'static> {
        Announce {
            name: owned(self.name),
            image: self.image.map(|i| ImageTarget {
                target: owned(i.target),
                map: owned(i.map),
            }),
            ..self
        }
    }

    /// This message borrowing its name and image from `self` (to queue it: queueing encodes
    /// at once, nothing is copied).
    pub fn reborrow(&self) -> Announce<'_> {
        Announce {
            task_id: self.task_id,
            session: self.session,
            group: self.group,
            port: self.port,
            size: self.size,
            block_size: self.block_size,
            fec_group: self.fec_group,
            sha256: self.sha256,
            digests: self.digests,
            nack_key: self.nack_key,
            name: Cow::Borrowed(&self.name),
            image: self.image.as_ref().map(|i| ImageTarget {
                target: Cow::Borrowed(&i.target),
                map: Cow::Borrowed(&i.map),
            }),
        }
    }
}

/// The block authentication an [`Announce`] carries: the Merkle root over the task's
/// manifests and how many block digests each lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct DigestRoot {
    /// The root (SHA-256, `mcast::digest::MerkleTree`).
    pub root: [u8; 32],
    /// Digests per manifest, at least 1 (the receiver refuses a geometry it cannot hold:
    /// above `mcast::digest::MAX_PER_MANIFEST`).
    pub per_manifest: u16,
}

impl DigestRoot {
    fn check(&self) -> Result<()> {
        if self.per_manifest == 0 {
            return Err(Error::InvalidValue);
        }
        Ok(())
    }
}

/// Length of the address-proof cookie a [`Probe`] carries and a [`Nack`] echoes.
pub const COOKIE_LEN: usize = 8;

/// `Nack`: blocks a receiver is missing (agent → gateway, datagram or control session).
///
/// Fields: `session u32`, `device_id varint64`, `seq varint`, `echo option<[8]>`, `missing
/// ranges` (see [`Ranges`]). As a datagram it carries a tag under the device's own key
/// ([`Announce::nack_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Nack {
    /// The multicast session.
    pub session: u32,
    /// Who is missing the blocks (counted per device by the sender).
    pub device_id: u64,
    /// This device's NACK counter, from 1, one more for every NACK it sends under its current
    /// key: the sender accepts a NACK only if its `seq` is above every one accepted before, so
    /// a replay (or a stale, reordered NACK, which a newer one supersedes anyway) counts
    /// nothing.
    pub seq: u32,
    /// The cookie of the last [`Probe`] the device received, echoed to prove it receives at
    /// the address this NACK comes from.
    pub echo: Option<[u8; COOKIE_LEN]>,
    /// Missing blocks.
    pub missing: Ranges,
}

impl Nack {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u32(self.session)?;
        s.varint64(self.device_id)?;
        s.varint(self.seq)?;
        s.present(self.echo.is_some())?;
        if let Some(c) = &self.echo {
            s.put(c)?;
        }
        self.missing.encode(s, MAX_NACK_RANGES)
    }
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(Nack {
            session: r.u32()?,
            device_id: r.varint64()?,
            seq: r.varint()?,
            echo: if r.present()? { Some(r.array()?) } else { None },
            missing: Ranges::decode(r, MAX_NACK_RANGES)?,
        })
    }
}

/// `Probe`: an address check (gateway → one agent, datagram, always tagged under the device's
/// NACK key, which names the device and the task). A NACK whose source is not on the IP the
/// device's control session came from gets one back, to that source; the device proves it
/// receives there by echoing the cookie in its next NACKs ([`Nack::echo`]). Only then do its
/// unicast repairs go there. With its tag it is 36 bytes, less than any tagged NACK, so a
/// probe never amplifies what caused it.
///
/// Fields: `cookie [8]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Probe {
    /// What the device echoes: a MAC, under a key only the gateway holds, of the session,
    /// the device and the address the probe was sent to.
    pub cookie: [u8; COOKIE_LEN],
}

impl Probe {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.put(&self.cookie)
    }
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(Probe { cookie: r.array()? })
    }
}

/// `Overflow`: the kernel dropped datagrams on a receiver's group socket (agent → gateway,
/// datagram, tagged under the device's NACK key like a [`Nack`]). The sender paces down when a
/// receiver that is not demoted reports new drops (`mcast/sender/pacing.rs`), instead of
/// losing the same datagrams at every receiver whose socket cannot keep up.
///
/// Fields: `session u32`, `device_id varint64`, `drops varint64`: the socket's cumulative
/// drop count for this task (`SO_RXQ_OVFL`), over every socket the device opened for it. It
/// only grows, so it is its own freshness counter: a report not above the last one accepted
/// (a replay, a duplicate, a reordered one) says nothing new and moves nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Overflow {
    /// The multicast session.
    pub session: u32,
    /// The reporting device.
    pub device_id: u64,
    /// Datagrams the kernel dropped on the device's group socket for this task, so far.
    pub drops: u64,
}

impl Overflow {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u32(self.session)?;
        s.varint64(self.device_id)?;
        s.varint64(self.drops)
    }
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(Overflow {
            session: r.u32()?,
            device_id: r.varint64()?,
            drops: r.varint64()?,
        })
    }
}

wire_enum! {
    /// How a transfer ended on a receiver.
    Outcome { Verified = 0, DigestMismatch = 1, WriteFailed = 2, Aborted = 3, Refused = 4 }
}

impl core::fmt::Display for Outcome {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Outcome::Verified => "verified",
            Outcome::DigestMismatch => "digest mismatch",
            Outcome::WriteFailed => "write failed",
            Outcome::Aborted => "aborted",
            Outcome::Refused => "refused",
        })
    }
}

/// `Completion`: a receiver's final word on a task (agent → gateway, control session).
///
/// Fields: `task_id u64`, `session u32`, `outcome u8`, `sha256 [32]` (what the receiver
/// computed), `reason str16`.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub reason: Cow<'a, str>,
}

impl<'a> Completion<'a> {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.task_id)?;
        s.u32(self.session)?;
        s.u8(self.outcome as u8)?;
        s.put(&self.sha256)?;
        s.str16(&self.reason, MAX_REASON)
    }
    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self> {
        Ok(Completion {
            task_id: r.u64()?,
            session: r.u32()?,
            outcome: Outcome::from_u8(r.u8()?)?,
            sha256: r.array()?,
            reason: borrowed_str16(r, MAX_REASON)?,
        })
    }
}

impl Completion<'_> {
    /// This message, owning its reason.
    pub fn into_owned(self) -> Completion<'static> {
        Completion {
            reason: owned(self.reason),
            ..self
        }
    }
}

wire_enum! {
    /// A device's state in a task's status table.
    TransferState { Pending = 0, InProgress = 1, Completed = 2, Failed = 3 }
}

/// `TransferStatus`: progress of one task on one device, in either direction: an agent
/// reports it while it receives; the gateway may answer with its view. (A device asks for
/// completion with [`TaskAsk`].)
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

/// `TaskAsk`: the device's task finisher asks the gateway to finish one task (agent → gateway,
/// control session), saying what it already holds. It goes out after every `Welcome`, for
/// every transfer record the agent holds and every task it was told of but has not finished,
/// and once more with `task_id = 0` ("from zero": every other task of mine), which is all a
/// device that lost its records sends.
///
/// Fields: `device_id u64`, `task_id u64` (0: every task of this device), `total u32` (blocks
/// in the file as the device knows it; 0 when it knows nothing of the task), `have ranges`
/// (blocks held, see [`Ranges`]; at most [`MAX_NACK_RANGES`] ranges: a device whose record
/// has more sends its first ones, which only understates what it holds).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct TaskAsk {
    /// The asking device; the gateway refuses an ask naming another device than the
    /// session's.
    pub device_id: u64,
    /// The task, or 0 for every task of the device not asked about otherwise.
    pub task_id: u64,
    /// Blocks in the file, as the device's record says (0: no record).
    pub total: u32,
    /// Blocks the device holds (durably written).
    pub have: Ranges,
}

impl TaskAsk {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.device_id)?;
        s.u64(self.task_id)?;
        s.u32(self.total)?;
        self.have.encode(s, MAX_NACK_RANGES)
    }
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(TaskAsk {
            device_id: r.u64()?,
            task_id: r.u64()?,
            total: r.u32()?,
            have: Ranges::decode(r, MAX_NACK_RANGES)?,
        })
    }
}

wire_enum! {
    /// What the task table says of an asked task: `Completed` (nothing to do), `Serving` (the
    /// task's `Announce` follows on this session and the device is caught up by unicast from
    /// what it NACKs), `Closed` (failed, cancelled or not this device's task: not served).
    TaskVerdict { Completed = 0, Serving = 1, Closed = 2 }
}

/// `TaskAnswer`: the gateway's answer to a [`TaskAsk`], read from the task table (gateway →
/// agent, control session).
///
/// Fields: `task_id u64` (0 answers a from-zero ask that found nothing left), `verdict u8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct TaskAnswer {
    /// The task answered.
    pub task_id: u64,
    /// The table's verdict.
    pub verdict: TaskVerdict,
}

impl TaskAnswer {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.task_id)?;
        s.u8(self.verdict as u8)
    }
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(TaskAnswer {
            task_id: r.u64()?,
            verdict: TaskVerdict::from_u8(r.u8()?)?,
        })
    }
}

/// `Manifest`: the digests of consecutive blocks and the Merkle path that proves them
/// (gateway → group, or → one agent with its repairs; datagram, untagged: the path is the
/// authentication, checked against the announce's root; see `mcast::digest`).
///
/// Fields: `session u32`, `index u32` (manifest `index` lists blocks `index × per_manifest
/// ..`), `count u16` then `count` digests of 16 bytes, `path count u8` then that many
/// 32-byte siblings, from the leaf up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Manifest<'a> {
    /// The multicast session.
    pub session: u32,
    /// The manifest's index.
    pub index: u32,
    /// The block digests, back to back (a multiple of 16 bytes, at most
    /// [`MAX_MANIFEST_DIGESTS`] of them).
    pub digests: &'a [u8],
    /// The Merkle path, back to back (a multiple of 32 bytes, at most 32 of them).
    pub path: &'a [u8],
}

/// Whole digests and path entries only (random byte strings would almost never be), so
/// fuzzing and property tests reach the parser's valid side.
#[cfg(any(test, feature = "arbitrary"))]
impl<'a> arbitrary::Arbitrary<'a> for Manifest<'a> {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        use crate::mcast::digest::{DIGEST_LEN, NODE_LEN};
        let session = u.arbitrary()?;
        let index = u.arbitrary()?;
        let nd = u.int_in_range(0..=6usize)?;
        let digests = u.bytes(nd * DIGEST_LEN)?;
        let np = u.int_in_range(0..=3usize)?;
        let path = u.bytes(np * NODE_LEN)?;
        Ok(Manifest {
            session,
            index,
            digests,
            path,
        })
    }
}

/// Most digests a `Manifest` may carry (a parse limit; the geometry's own is lower).
pub const MAX_MANIFEST_DIGESTS: usize = 4096;

impl<'a> Manifest<'a> {
    fn counts(&self) -> Result<(u16, u8)> {
        use crate::mcast::digest::{DIGEST_LEN, MAX_PATH, NODE_LEN};
        let (d, p) = (self.digests.len(), self.path.len());
        if d % DIGEST_LEN != 0 || p % NODE_LEN != 0 {
            return Err(Error::InvalidValue);
        }
        if d / DIGEST_LEN > MAX_MANIFEST_DIGESTS || p / NODE_LEN > MAX_PATH {
            return Err(Error::FieldTooLong);
        }
        Ok(((d / DIGEST_LEN) as u16, (p / NODE_LEN) as u8))
    }

    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        let (nd, np) = self.counts()?;
        s.u32(self.session)?;
        s.u32(self.index)?;
        s.u16(nd)?;
        s.put(self.digests)?;
        s.u8(np)?;
        s.put(self.path)
    }

    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self> {
        use crate::mcast::digest::{DIGEST_LEN, MAX_PATH, NODE_LEN};
        let session = r.u32()?;
        let index = r.u32()?;
        let nd = usize::from(r.u16()?);
        if nd > MAX_MANIFEST_DIGESTS {
            return Err(Error::FieldTooLong);
        }
        let digests = r.take(nd * DIGEST_LEN)?;
        let np = usize::from(r.u8()?);
        if np > MAX_PATH {
            return Err(Error::FieldTooLong);
        }
        let path = r.take(np * NODE_LEN)?;
        Ok(Manifest {
            session,
            index,
            digests,
            path,
        })
    }

    /// Parses a whole datagram that must be a `Manifest` frame.
    pub fn parse(datagram: &'a [u8]) -> Result<Manifest<'a>> {
        let frame = Frame::parse_datagram(datagram)?;
        if frame.header.kind != Kind::Manifest as u8 {
            return Err(Error::UnknownKind(frame.header.kind));
        }
        let mut r = Reader::new(frame.body);
        let m = Manifest::decode(&mut r)?;
        r.finish()?;
        Ok(m)
    }
}

/// The parity sub-header: 16 bytes after the frame header of a `Parity` datagram.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::KnownLayout,
    zerocopy::Immutable,
    zerocopy::Unaligned,
)]
#[repr(C)]
pub struct ParityHeader {
    /// The multicast session.
    pub session: zerocopy::network_endian::U32,
    /// Group index: the group covers blocks `group × group_size ..` (at most `group_size`).
    pub group: zerocopy::network_endian::U32,
    /// Blocks per group (K); the last group of a file may hold fewer.
    pub group_size: zerocopy::network_endian::U16,
    /// Parity symbols the code defines per group (M); `index < parity_count`.
    pub parity_count: zerocopy::network_endian::U16,
    /// This symbol's index.
    pub index: zerocopy::network_endian::U16,
    /// Always 0 (in version 2, as in 1).
    pub reserved: zerocopy::network_endian::U16,
}

/// Bytes before a parity payload: frame header plus [`ParityHeader`].
pub const PARITY_PREFIX_LEN: usize =
    crate::header::HEADER_LEN + core::mem::size_of::<ParityHeader>();

/// `Parity`: one FEC parity symbol over a group of blocks, multicast as repair (gateway →
/// group, datagram). Any `k` of a group's `k` data blocks and its parity symbols rebuild the
/// group, so one parity datagram heals a different lost block at every receiver.
///
/// Fields: `session u32`, `group u32`, `group_size u16`, `parity_count u16`, `index u16`,
/// `reserved u16 = 0`, then the symbol (`block_size` bytes: the code's shard; the group's
/// last block is zero-padded to `block_size` before encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Parity<'a> {
    /// The multicast session.
    pub session: u32,
    /// Group index.
    pub group: u32,
    /// Blocks per group (K), at least 1.
    pub group_size: u16,
    /// Parity symbols per group (M), at least 1.
    pub parity_count: u16,
    /// This symbol's index, below `parity_count`.
    pub index: u16,
    /// The symbol.
    pub payload: &'a [u8],
}

impl<'a> Parity<'a> {
    fn check(group_size: u16, parity_count: u16, index: u16, reserved: u16) -> Result<()> {
        if group_size == 0 || parity_count == 0 || index >= parity_count || reserved != 0 {
            return Err(Error::InvalidValue);
        }
        Ok(())
    }

    fn header(&self) -> ParityHeader {
        use zerocopy::network_endian::{U16, U32};
        ParityHeader {
            session: U32::new(self.session),
            group: U32::new(self.group),
            group_size: U16::new(self.group_size),
            parity_count: U16::new(self.parity_count),
            index: U16::new(self.index),
            reserved: U16::ZERO,
        }
    }

    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        use zerocopy::IntoBytes;
        Self::check(self.group_size, self.parity_count, self.index, 0)?;
        s.put(self.header().as_bytes())?;
        s.put(self.payload)
    }

    /// Parses a frame body (tag already split off by [`Frame`]).
    pub fn parse_body(body: &'a [u8]) -> Result<Self> {
        use zerocopy::FromBytes;
        let (h, payload) = ParityHeader::ref_from_prefix(body).map_err(|_| Error::Truncated)?;
        let (group_size, parity_count, index) =
            (h.group_size.get(), h.parity_count.get(), h.index.get());
        Self::check(group_size, parity_count, index, h.reserved.get())?;
        Ok(Parity {
            session: h.session.get(),
            group: h.group.get(),
            group_size,
            parity_count,
            index,
            payload,
        })
    }

    /// Parses a whole datagram that must be a `Parity` frame; returns the frame too (for tag
    /// verification, as for data blocks).
    pub fn parse(datagram: &'a [u8]) -> Result<(Parity<'a>, Frame<'a>)> {
        let frame = Frame::parse_datagram(datagram)?;
        if frame.header.kind != Kind::Parity as u8 {
            return Err(Error::UnknownKind(frame.header.kind));
        }
        Ok((Parity::parse_body(frame.body)?, frame))
    }

    /// Builds the 28-byte prefix of this parity datagram (its payload and optional tag follow
    /// in separate buffers), computing the CRC over all of them without copying any; the same
    /// scheme as [`crate::data_prefix`].
    pub fn prefix(&self, tag: Option<&[u8; TAG_LEN]>) -> Result<[u8; PARITY_PREFIX_LEN]> {
        let mut out = self.mac_prefix_with(tag.is_some())?;
        let mut h = crc32fast::Hasher::new();
        h.update(&out[..8]);
        h.update(&out[HEADER_LEN..]);
        h.update(self.payload);
        if let Some(t) = tag {
            h.update(t);
        }
        out[8..12].copy_from_slice(&h.finalize().to_be_bytes());
        Ok(out)
    }

    /// The bytes this datagram's tag covers, before the payload: header bytes 0..8 (final
    /// length, `FLAG_AUTH`) and the sub-header; feed `mac(p[..8])`, `mac(p[12..])`,
    /// `mac(payload)` as for [`crate::data::data_mac_prefix`]. Bytes 8..12 are zero.
    pub fn mac_prefix(&self) -> Result<[u8; PARITY_PREFIX_LEN]> {
        self.mac_prefix_with(true)
    }

    fn mac_prefix_with(&self, tagged: bool) -> Result<[u8; PARITY_PREFIX_LEN]> {
        use zerocopy::IntoBytes;
        Self::check(self.group_size, self.parity_count, self.index, 0)?;
        let body_len = core::mem::size_of::<ParityHeader>()
            + self.payload.len()
            + if tagged { TAG_LEN } else { 0 };
        if body_len > crate::header::MAX_DATAGRAM_BODY as usize {
            return Err(Error::FieldTooLong);
        }
        let mut out = [0u8; PARITY_PREFIX_LEN];
        out[0] = MAGIC;
        out[1] = VERSION;
        out[2] = Kind::Parity as u8;
        out[3] = if tagged { FLAG_AUTH } else { 0 };
        out[4..8].copy_from_slice(&(body_len as u32).to_be_bytes());
        out[HEADER_LEN..].copy_from_slice(self.header().as_bytes());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use proptest::prelude::*;

    use super::*;
    use crate::msg::Message;

    fn sample(payload: &[u8]) -> Parity<'_> {
        Parity {
            session: 0xCAFE,
            group: 9,
            group_size: 512,
            parity_count: 64,
            index: 63,
            payload,
        }
    }

    /// A datagram from `prefix` + payload (+ tag), as a sender hands it to the kernel.
    fn assemble(prefix: &[u8], payload: &[u8], tag: Option<&[u8; TAG_LEN]>) -> Vec<u8> {
        let mut d = prefix.to_vec();
        d.extend_from_slice(payload);
        if let Some(t) = tag {
            d.extend_from_slice(t);
        }
        d
    }

    #[test]
    fn prefix_matches_message_emit_and_parses_back() {
        let payload: Vec<u8> = (0..100u8).collect();
        let p = sample(&payload);
        let dgram = assemble(&p.prefix(None).unwrap(), &payload, None);
        let mut emitted = Vec::new();
        Message::Parity(p).emit_to_vec(&mut emitted).unwrap();
        assert_eq!(dgram, emitted, "zero-copy prefix and Message::emit agree");
        assert_eq!(&dgram[12..16], &0xCAFEu32.to_be_bytes());
        assert_eq!(&dgram[16..28], &[0, 0, 0, 9, 2, 0, 0, 64, 0, 63, 0, 0]);
        let (q, f) = Parity::parse(&dgram).unwrap();
        assert_eq!(q, p);
        assert!(f.tag.is_none());
        let (m, _) = Message::parse_datagram(&dgram).unwrap();
        assert_eq!(m, Message::Parity(p));
        let mut bad = dgram.clone();
        bad[40] ^= 1;
        assert_eq!(Parity::parse(&bad).unwrap_err(), Error::Checksum);
    }

    #[test]
    fn tagged_parity_mac_input_matches_the_receivers() {
        let payload = [7u8; 33];
        let p = sample(&payload);
        let tag = [0xA5; TAG_LEN];
        let dgram = assemble(&p.prefix(Some(&tag)).unwrap(), &payload, Some(&tag));
        let (q, f) = Parity::parse(&dgram).unwrap();
        assert_eq!(q, p);
        assert_eq!(f.tag, Some(&tag));
        let mp = p.mac_prefix().unwrap();
        let (h8, body) = f.mac_input();
        assert_eq!(h8, &mp[..8]);
        assert_eq!(&body[..16], &mp[12..]);
        assert_eq!(&body[16..], &payload);
    }

    #[test]
    fn invalid_fields_are_rejected_both_ways() {
        let payload = [0u8; 4];
        for (k, m, i) in [(0, 4, 0), (4, 0, 0), (4, 4, 4)] {
            let p = Parity {
                group_size: k,
                parity_count: m,
                index: i,
                ..sample(&payload)
            };
            assert_eq!(p.prefix(None).unwrap_err(), Error::InvalidValue);
            assert_eq!(
                Message::Parity(p).buffer_len().unwrap_err(),
                Error::InvalidValue
            );
        }
        let good = sample(&payload);
        let mut dgram = assemble(&good.prefix(None).unwrap(), &payload, None);
        // Reserved bits set: one encoding per value.
        dgram[27] = 1;
        let crc = crate::header::frame_crc(&dgram[..8], &dgram[12..]);
        dgram[8..12].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(Parity::parse(&dgram).unwrap_err(), Error::InvalidValue);
        assert_eq!(Parity::parse_body(&[0; 15]).unwrap_err(), Error::Truncated);
        // A data datagram is not a parity datagram.
        let d = crate::data_prefix(Kind::Data, 1, 2, &[], None).unwrap();
        assert_eq!(
            Parity::parse(&d).unwrap_err(),
            Error::UnknownKind(Kind::Data as u8)
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_reemits_what_it_accepts(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = Parity::parse_body(&body) {
                let mut out = Vec::new();
                Message::Parity(p).emit_to_vec(&mut out).unwrap();
                prop_assert_eq!(&out[HEADER_LEN..], &body[..]);
            }
        }

        #[test]
        fn round_trip(session: u32, group: u32, k in 1u16.., m in 1u16.., i: u16,
                      payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let p = Parity { session, group, group_size: k, parity_count: m, index: i % m, payload: &payload };
            let d = assemble(&p.prefix(None).unwrap(), &payload, None);
            prop_assert_eq!(Parity::parse(&d).unwrap().0, p);
        }
    }
}
