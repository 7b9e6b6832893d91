//! Reliable multicast distribution cores: [`McastSender`] (gateway) and [`McastReceiver`]
//! (agent). ARCHITECTURE.md "Multicast distribution"; issue 7.
//!
//! Both cores are sans-IO and never touch file bytes: zero-copy stays in the drivers.
//! - The sender core decides *what* to send and *when*: [`McastSender::poll_transmit`] returns
//!   a [`SendBlock`] (block index, [`Dest`], and the frame [`crate::Kind`]: `Data` for the group,
//!   `Repair` for unicast); the driver reads the block from its mapping and sends it behind a
//!   [`crate::data_prefix`].
//! - The receiver core is told which *valid* blocks arrived ([`McastReceiver::handle_block`];
//!   the driver has already checked CRC, tag and session and written the payload) and emits
//!   `Nack` datagrams ([`crate::Nack`]) into a caller buffer.
//! - With FEC (opt-in, [`SenderConfig::fec_group`]) the sender also hands out parity symbols
//!   ([`McastSender::poll_send`] → [`Transmit::Parity`]); the driver encodes them with a
//!   [`Fec`] codec ([`ReedSolomon`] with feature `fec`) and sends [`crate::Parity`] datagrams.
//!   The receiver keeps useful symbols ([`McastReceiver::handle_parity`], the only file bytes
//!   it ever holds: at most one symbol per missing block) and, once a group has as many data
//!   blocks and symbols as it has blocks, asks the driver for the group's present blocks in a
//!   caller buffer and rebuilds the missing ones in place ([`McastReceiver::poll_decode`],
//!   [`McastReceiver::decode`]); the driver writes them like received blocks.
//!
//! # Protocol
//! 1. First pass: the sender multicasts blocks `0..n` in order, paced by a token bucket at
//!    [`SenderConfig::rate`] (datagram bytes per second, prefix included).
//! 2. A receiver that sees a gap waits [`ReceiverConfig::reorder_window`] plus a random
//!    back-off and NACKs the missing blocks below the highest block it had seen when it noticed
//!    the gap. The end of the first pass (the last block arrives, the sender falls silent for
//!    [`ReceiverConfig::silence`], or the driver calls [`McastReceiver::handle_sender_idle`])
//!    makes every missing block NACK-able. NACKs repeat, with exponential back-off while nothing
//!    arrives, until the blocks arrive; each carries at most [`ReceiverConfig::max_ranges`]
//!    ranges and [`ReceiverConfig::max_nack_bytes`] of blocks (the lowest missing ones) and
//!    they are at least [`ReceiverConfig::min_nack_interval`] apart. Every NACK carries the device's sequence number (from 1, one more per NACK) and, after a
//!    [`crate::Probe`] ([`McastReceiver::handle_probe`]), the probe's cookie.
//! 3. The sender counts a NACK only if it is the named device's own and new
//!    ([`McastSender::handle_nack`]: a tag under the device's key, checked with the driver's
//!    [`NackMac`]; a sequence above the device's last), cuts its request to
//!    [`SenderConfig::max_nack_bytes`], and sends the device's unicast repairs only to its
//!    repair address ([`McastSender::repair_addr`]: the control session's IP, or an address
//!    the device proved by echoing a probe's cookie), within
//!    [`SenderConfig::repair_budget`]; see `sender/auth.rs`. It aggregates NACKs per *round*
//!    ([`SenderConfig::round`], opened by the first NACK after the previous round closed). A device's latest NACK in a round replaces its earlier
//!    ones, so repeated or duplicated NACKs never count twice. At the round's end it sweeps the
//!    requested ranges into a range → requester-count map: blocks wanted by at least
//!    [`SenderConfig::multicast_threshold`] devices are re-multicast, the rest are unicast as
//!    `Repair` to each requester. During the first pass repairs get at most
//!    [`SenderConfig::repair_share_permille`] of the rate (a second token bucket), so they never
//!    starve the first pass; afterwards they get all of it.
//!
//!    With FEC (`fec_group` = K > 0) the round's requests are split per group of K blocks
//!    and each group gets what its measured need makes cheapest (see `plan.rs`): one device
//!    → unicast; devices missing the same few blocks → re-multicast them; devices missing
//!    different blocks → `need + fec_margin` *fresh* parity symbols (`need` = the most any
//!    one device lacks in the group; a symbol index is never sent twice), falling back to
//!    re-multicast when the group's M symbols run out. Only groups the first pass has fully
//!    sent are repaired. Parity queued or sent within [`SenderConfig::fec_holdoff`] of the
//!    round is credited against each device's count (its NACK may predate the parity). A FEC
//!    receiver ([`ReceiverConfig::fec_group`]) NACKs a block only once the pass has left its
//!    group, leaves out of its NACK as many of a group's missing blocks as it holds symbols
//!    for, and never repeats a NACK word for word before [`ReceiverConfig::nack_repeat`].
//!
//!    *Proactive parity* ([`SenderConfig::fec_proactive`], `sender/proactive.rs`): as the
//!    first pass leaves a group, the sender queues fresh symbols for it unasked, ahead of every
//!    other repair, as many as earlier groups needed: a smoothed level, moved halfway towards
//!    one less than each group took (its proactive symbols plus the largest count any
//!    receiver still NACKed there; receivers over the demotion bar are left out) or one less
//!    than it was sent when nobody NACKed it. It starts at 0, so a clean network pays
//!    nothing. These symbols are not credited against later NACKs (the receivers waited for
//!    them, and their NACKs already leave out what they hold). A receiver NACKs a group only
//!    once the pass has also left the next [`ReceiverConfig::parity_lag`] groups (1), the time
//!    the proactive symbols take at the repair share, and its NACK after the pass's last block
//!    waits a reorder window for the last group's: a receiver whose losses the proactive
//!    symbols cover never NACKs the group, and the rest NACK what is left short, topped up by
//!    the round's plan as before. A NACK still names every short group below its limit.
//!    Demotion is unchanged: a lossy receiver's NACKs come one group later, and it is judged
//!    on what they name.
//! 4. Demotion: after the first pass, a device whose estimated missing count stays above
//!    [`SenderConfig::demote_missing_percent`] of the file for
//!    [`SenderConfig::demote_after_rounds`] consecutive rounds, or that sends more than
//!    [`SenderConfig::max_nacks_per_round`] NACKs in one round, is demoted: its repairs stop and
//!    the driver catches it up by unicast later ([`SenderEvent::Demoted`]).
//! 5. Completion arrives over the control session; the driver reports it with
//!    [`McastSender::receiver_done`]. The sender finishes ([`SenderEvent::Finished`]) when the
//!    first pass is done, no repair is pending, and every non-demoted receiver has reported, or
//!    after [`SenderConfig::idle_timeout`] without NACKs. Receivers that did not report a
//!    verified copy are listed as unfinished, never as done.
//!
//! # Repair overhead
//! Without coding, every block that *some* receiver lost must be sent again, so the sender's
//! total is at least `1 + (1 - (1 - p)^N)` bytes per file byte for N receivers at loss `p`
//! (about 2 for 1000 receivers at 1%), while each receiver's link carries about
//! `1 + p + P(at least multicast_threshold receivers lost a block)`. Only a single receiver
//! gets `1 + p`. Fresh FEC parity as multicast repair brings the total near `1 + p` at scale:
//! per group, the largest loss of any one receiver (plus the margin), 1.028 at 1000 receivers
//! and 1% in the simulator (docs/performance.md "Repair at scale (simulator)"); `tests.rs`
//! measures and bounds these figures.
//!
//! # Driving contract (both cores)
//! - Time is an input and must be monotonic: never pass an `Instant` earlier than one passed
//!   before to the same core.
//! - Inputs: `handle_*` calls and `handle_timeout(now)` (call it once the instant from
//!   `poll_timeout` is reached; calling it early is harmless). The control plane's inputs to
//!   the sender: `add_receiver`, then `bind_receiver` with each announce (the device's new
//!   NACK key and its session's IP); only they create or key receivers.
//! - **After every input**, in this order: drain `poll_transmit(now, ..)` until `None` and send
//!   each datagram (a FEC sender: `poll_send`); a receiver then drains `poll_decode()` until
//!   `None`, decoding and writing each group; a sender drains `poll_probe` after every
//!   `handle_nack`; drain `poll_event()` until `None` and act on
//!   each event; re-arm the timer from `poll_timeout()` (`None`: no timer). The sender's `poll_transmit` returns `None` when
//!   the rate ceiling is reached; `poll_timeout` then names the next send time, so a driver that
//!   follows this loop is paced without any extra logic.
//!
//! # Memory
//! The sender holds per receiver a few counters, its NACK key, last sequence and addresses, the
//! device's latest NACK of the open round and its pending unicast repairs (all range lists),
//! only for receivers the control plane added; per block it holds nothing, per FEC group two
//! counters. The receiver holds one bit per block, plus the parity symbols it keeps for groups
//! not yet decodable (at most one per missing block).

use alloc::vec::Vec;
use core::fmt;

use crate::ranges::{BlockRange, Ranges};

pub mod digest;
pub mod fec;
mod overflow;
mod plan;
mod receiver;
mod sender;
pub mod standalone;
pub mod task;

#[cfg(feature = "fec")]
pub use fec::ReedSolomon;
pub use fec::{Fec, FecError};

pub use overflow::{OverflowReporter, DEFAULT_OVERFLOW_INTERVAL};
pub use receiver::{
    BlockVerdict, DecodeError, DecodeJob, McastReceiver, ReceiverConfig, ReceiverEvent,
    ReceiverStats,
};
pub use sender::{
    Dest, McastSender, NackVerdict, ReceiverAuth, SendBlock, SendParity, SenderConfig, SenderEvent,
    SenderStats, Transmit,
};
pub use task::{CatchUpBudget, McastTask, TaskConfig, TaskEvent, Trigger};

/// Default for [`SenderConfig::max_nack_bytes`] and [`ReceiverConfig::max_nack_bytes`]: one
/// NACK asks for at most 4 MiB of repairs. Large enough that a device catching up a whole
/// file by unicast loses little to the pause between two capped NACKs (the next one leaves a
/// reorder window after the last repair of the previous), small enough that a NACK's cost is
/// bounded.
pub const DEFAULT_MAX_NACK_BYTES: u64 = 4 << 20;

/// The MAC a sender core checks NACK tags and makes probe cookies with: the driver's
/// cryptography (fleetcast's is HMAC-SHA-256 truncated to 16 bytes, from `ring`), so the
/// rules stay here and the crypto library stays out of this crate.
pub trait NackMac {
    /// The tag of `h8 ‖ body` under `key`: for a frame, the two parts
    /// [`crate::Frame::mac_input`] gives.
    fn tag(&self, key: &[u8; 32], h8: &[u8], body: &[u8]) -> [u8; crate::header::TAG_LEN];
}

/// Blocks one NACK may ask for: `max_nack_bytes` of payload, at least one block.
pub(crate) fn nack_block_cap(max_nack_bytes: u64, block_size: u32) -> u64 {
    (max_nack_bytes / u64::from(block_size.max(1))).max(1)
}

/// The lowest `max` blocks of `a`.
pub(crate) fn take_blocks(a: &Ranges, max: u64) -> Ranges {
    let mut out = Ranges::new();
    let mut left = max;
    for r in a.as_slice() {
        if left == 0 {
            break;
        }
        let n = u64::from(r.len).min(left);
        push_span(&mut out, u64::from(r.start), u64::from(r.start) + n);
        left -= n;
    }
    out
}

/// A configuration a core refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// `block_size` is zero or larger than one datagram can carry.
    BlockSize,
    /// The file has more blocks than a `u32` block index can name.
    TooManyBlocks,
    /// The sender's rate is zero.
    ZeroRate,
    /// A receiver's `max_ranges` is zero or above [`crate::ranges::MAX_NACK_RANGES`].
    MaxRanges,
    /// The initial received record names blocks past the end of the file.
    RecordOutOfRange,
    /// FEC group size or parity count out of bounds (1..=32768 each when FEC is on), or a
    /// block too large for a parity datagram (8 bytes less than [`MAX_BLOCK_SIZE`]).
    Fec,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigError::BlockSize => "block size is zero or exceeds a datagram",
            ConfigError::TooManyBlocks => "file has more blocks than a u32 can index",
            ConfigError::ZeroRate => "sender rate is zero",
            ConfigError::MaxRanges => "max NACK ranges out of bounds",
            ConfigError::RecordOutOfRange => "received record names blocks past the file end",
            ConfigError::Fec => "FEC group size or parity count out of bounds",
        })
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ConfigError {}

/// Largest payload a data block may carry (datagram body minus the 8-byte data header and an
/// optional 16-byte tag).
pub const MAX_BLOCK_SIZE: u32 = crate::header::MAX_DATAGRAM_BODY
    - core::mem::size_of::<crate::data::DataHeader>() as u32
    - crate::header::TAG_LEN as u32;

/// Bytes of IPv4 and UDP headers in front of every datagram (no IP options).
pub const IPV4_UDP_HEADERS: u32 = 28;

/// The block size whose *parity* datagram exactly fills a frame of `mtu` (1,444 bytes at the
/// Ethernet MTU of 1,500; since version 5 blocks carry no tag), so a data datagram is 8 bytes
/// short of the frame; `None` for an MTU too small to carry a useful block (under 576, the
/// least every IPv4 host takes).
///
/// A parity symbol is a block long and its prefix is 8 bytes longer than a data block's: a
/// block that filled the frame as data (1,452) made every parity datagram 1,508 bytes, sent
/// as two IP fragments, each lost on its own (either loss loses the symbol) and reassembled
/// by every receiver. 8 bytes of each data frame (0.55%) are cheaper.
pub fn block_size_for_mtu(mtu: u32) -> Option<u32> {
    if mtu < 576 {
        return None;
    }
    let fit = mtu - IPV4_UDP_HEADERS - crate::msg::PARITY_PREFIX_LEN as u32;
    Some(fit.min(MAX_BLOCK_SIZE - 8))
}

/// Bytes of file data a parity group spans by default: 512 blocks of 1,436 bytes (the Ethernet
/// MTU's tagged block before version 5), where the group size was first tuned; 509 blocks of
/// today's 1,444.
pub const FEC_GROUP_BYTES: u32 = 512 * 1436;

/// The default FEC group size for blocks of `block_size`: groups of about
/// [`FEC_GROUP_BYTES`], between 32 and 512 blocks. A group of 512 jumbo blocks (4.5 MB) made
/// every repair round wait for a whole group and sized parity to the worst of many losses:
/// at MTU 9000, 5% loss, 4 receivers, 82-block groups took 1.25 datagram bytes per file byte
/// where 512-block groups took 1.59 (`docs/performance.md`).
pub fn fec_group_for(block_size: u32) -> u32 {
    (FEC_GROUP_BYTES / block_size.max(1)).clamp(32, 512)
}

/// Number of blocks of a file, validated.
pub(crate) fn block_count(file_size: u64, block_size: u32) -> Result<u32, ConfigError> {
    if block_size == 0 || block_size > MAX_BLOCK_SIZE {
        return Err(ConfigError::BlockSize);
    }
    let n = file_size.div_ceil(u64::from(block_size));
    // Ranges must end at or before u32::MAX.
    u32::try_from(n)
        .ok()
        .filter(|&n| n < u32::MAX)
        .ok_or(ConfigError::TooManyBlocks)
}

/// Payload length of `block` (the last block may be shorter).
pub(crate) fn block_len(file_size: u64, block_size: u32, block: u32) -> u32 {
    let start = u64::from(block) * u64::from(block_size);
    let len = file_size.saturating_sub(start).min(u64::from(block_size));
    len as u32
}

/// Pushes `start..end` (u64 bounds within u32 range) onto `out`; empty ranges are skipped.
fn push_span(out: &mut Ranges, start: u64, end: u64) {
    if end > start {
        // Bounds come from valid Ranges, so they fit and are increasing.
        let _ = out.push(start as u32, (end - start) as u32);
    }
}

/// `a ∪ b`.
pub(crate) fn union(a: &Ranges, b: &Ranges) -> Ranges {
    let mut out = Ranges::new();
    let (mut i, mut j) = (0, 0);
    let (a, b) = (a.as_slice(), b.as_slice());
    let mut cur: Option<(u64, u64)> = None;
    while i < a.len() || j < b.len() {
        let r = if j >= b.len() || (i < a.len() && a[i].start <= b[j].start) {
            i += 1;
            a[i - 1]
        } else {
            j += 1;
            b[j - 1]
        };
        let (s, e) = (u64::from(r.start), r.end());
        cur = match cur {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                push_span(&mut out, cs, ce);
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    if let Some((cs, ce)) = cur {
        push_span(&mut out, cs, ce);
    }
    out
}

/// `a \ b`.
pub(crate) fn subtract(a: &Ranges, b: &Ranges) -> Ranges {
    let mut out = Ranges::new();
    let b = b.as_slice();
    let mut j = 0;
    for r in a.as_slice() {
        let (mut s, e) = (u64::from(r.start), r.end());
        while j < b.len() && b[j].end() <= s {
            j += 1;
        }
        let mut k = j;
        while s < e && k < b.len() && u64::from(b[k].start) < e {
            push_span(&mut out, s, u64::from(b[k].start).max(s));
            s = s.max(b[k].end());
            k += 1;
        }
        push_span(&mut out, s, e);
    }
    out
}

/// `a ∩ [0, limit)`.
pub(crate) fn clip_below(a: &Ranges, limit: u32) -> Ranges {
    let mut out = Ranges::new();
    for r in a.as_slice() {
        push_span(&mut out, u64::from(r.start), r.end().min(u64::from(limit)));
    }
    out
}

/// A FIFO of blocks in increasing order, consumed from the front, with set-style merging.
#[derive(Debug, Clone, Default)]
pub(crate) struct BlockQueue {
    ranges: Vec<BlockRange>,
    /// Index of the range being consumed.
    head: usize,
    /// Blocks of `ranges[head]` already consumed.
    off: u32,
}

impl BlockQueue {
    pub(crate) fn is_empty(&self) -> bool {
        self.head >= self.ranges.len()
    }

    /// The next block, without consuming it.
    pub(crate) fn peek(&self) -> Option<u32> {
        self.ranges.get(self.head).map(|r| r.start + self.off)
    }

    /// Consumes and returns the next block.
    pub(crate) fn pop(&mut self) -> Option<u32> {
        let r = *self.ranges.get(self.head)?;
        let b = r.start + self.off;
        self.off += 1;
        if self.off >= r.len {
            self.head += 1;
            self.off = 0;
        }
        if self.is_empty() {
            self.ranges.clear();
            self.head = 0;
        }
        Some(b)
    }

    /// The blocks not yet consumed.
    pub(crate) fn remaining(&self) -> Ranges {
        let mut out = Ranges::new();
        for (i, r) in self.ranges.iter().enumerate().skip(self.head) {
            let skip = if i == self.head { self.off } else { 0 };
            push_span(&mut out, u64::from(r.start + skip), r.end());
        }
        out
    }

    fn set(&mut self, r: Ranges) {
        self.ranges.clear();
        self.ranges.extend_from_slice(r.as_slice());
        self.head = 0;
        self.off = 0;
    }

    /// Adds `more` (blocks already queued stay queued once).
    pub(crate) fn merge(&mut self, more: &Ranges) {
        if more.is_empty() {
            return;
        }
        let r = union(&self.remaining(), more);
        self.set(r);
    }

    /// Removes `gone` from the queue.
    pub(crate) fn remove(&mut self, gone: &Ranges) {
        if gone.is_empty() || self.is_empty() {
            return;
        }
        let r = subtract(&self.remaining(), gone);
        self.set(r);
    }
}

/// The cores' seeded PRNG (splitmix64): tiny, `no_std`, and reproducible. Not cryptographic;
/// it only spreads NACK timing.
#[derive(Debug, Clone)]
pub(crate) struct Prng(u64);

impl Prng {
    pub(crate) fn new(seed: u64) -> Self {
        Prng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n]`.
    pub(crate) fn up_to(&mut self, n: u64) -> u64 {
        match n.checked_add(1) {
            Some(span) => ((u128::from(self.next_u64()) * u128::from(span)) >> 64) as u64,
            None => self.next_u64(),
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit {
    use super::*;

    fn rs(list: &[(u32, u32)]) -> Ranges {
        let mut r = Ranges::new();
        for &(s, l) in list {
            r.push(s, l).unwrap();
        }
        r
    }

    /// The default block's parity datagram fills the frame exactly, and its data datagram
    /// fits (neither is fragmented).
    #[test]
    fn the_mtu_block_size_fills_the_frame_with_parity_and_data_fits() {
        assert_eq!(block_size_for_mtu(1500), Some(1444));
        assert_eq!(block_size_for_mtu(9000), Some(8944));
        for mtu in [576, 1280, 1500, 9000] {
            let b = block_size_for_mtu(mtu).unwrap();
            let parity = b + crate::msg::PARITY_PREFIX_LEN as u32;
            assert_eq!(parity + IPV4_UDP_HEADERS, mtu, "mtu {mtu}");
            let data = b + crate::data::DATA_PREFIX_LEN as u32;
            assert!(data + IPV4_UDP_HEADERS < mtu, "mtu {mtu}");
            assert!(block_count(1, b).is_ok());
        }
        // Loopback's 65,536: as large as a parity datagram carries.
        assert_eq!(block_size_for_mtu(65_536), Some(MAX_BLOCK_SIZE - 8));
        assert_eq!(block_size_for_mtu(575), None);
    }

    #[test]
    fn the_default_fec_group_spans_about_the_same_bytes_at_every_mtu() {
        assert_eq!(fec_group_for(1436), 512);
        assert_eq!(fec_group_for(8936), 82);
        assert_eq!(fec_group_for(1444), 509, "version 5's Ethernet block");
        assert_eq!(fec_group_for(8944), 82);
        assert_eq!(fec_group_for(100), 512, "at most 512 blocks");
        assert_eq!(fec_group_for(65_000), 32, "at least 32 blocks");
        assert_eq!(fec_group_for(0), 512);
    }

    #[test]
    fn union_and_subtract() {
        let a = rs(&[(0, 3), (10, 5), (30, 1)]);
        let b = rs(&[(2, 4), (14, 2), (20, 1), (31, 1)]);
        assert_eq!(union(&a, &b), rs(&[(0, 6), (10, 6), (20, 1), (30, 2)]));
        assert_eq!(subtract(&a, &b), rs(&[(0, 2), (10, 4), (30, 1)]));
        assert_eq!(subtract(&b, &a), rs(&[(3, 3), (15, 1), (20, 1), (31, 1)]));
        assert_eq!(subtract(&a, &a), Ranges::new());
        assert_eq!(union(&a, &Ranges::new()), a);
        assert_eq!(clip_below(&a, 12), rs(&[(0, 3), (10, 2)]));
        assert_eq!(take_blocks(&a, 5), rs(&[(0, 3), (10, 2)]));
        assert_eq!(take_blocks(&a, 100), a);
        assert_eq!(take_blocks(&a, 0), Ranges::new());
        assert_eq!(nack_block_cap(4096, 1000), 4);
        assert_eq!(nack_block_cap(10, 1000), 1, "at least one block");
        // A hole punched in the middle of one range.
        assert_eq!(
            subtract(&rs(&[(0, 10)]), &rs(&[(3, 2), (7, 1)])),
            rs(&[(0, 3), (5, 2), (8, 2)])
        );
    }

    #[test]
    fn block_queue_pops_in_order_and_merges() {
        let mut q = BlockQueue::default();
        q.merge(&rs(&[(5, 2), (9, 1)]));
        assert_eq!(q.remaining().blocks(), 3);
        assert_eq!(q.pop(), Some(5));
        q.merge(&rs(&[(5, 1), (6, 1), (7, 1)]));
        // 5 was already sent: it is queued again (a new request); 6 stays queued once.
        assert_eq!(q.remaining(), rs(&[(5, 3), (9, 1)]));
        q.remove(&rs(&[(6, 1)]));
        let all: Vec<u32> = core::iter::from_fn(|| q.pop()).collect();
        assert_eq!(all, [5, 7, 9]);
        assert!(q.is_empty() && q.peek().is_none());
    }

    #[test]
    fn block_geometry() {
        assert_eq!(block_count(0, 1024), Ok(0));
        assert_eq!(block_count(1025, 1024), Ok(2));
        assert_eq!(block_len(1025, 1024, 1), 1);
        assert_eq!(block_len(1025, 1024, 0), 1024);
        assert_eq!(block_count(10, 0), Err(ConfigError::BlockSize));
        assert_eq!(block_count(u64::MAX, 1024), Err(ConfigError::TooManyBlocks));
    }

    #[test]
    fn prng_is_seeded_and_bounded() {
        let (mut a, mut b) = (Prng::new(9), Prng::new(9));
        for _ in 0..100 {
            let v = a.up_to(10);
            assert!(v <= 10);
            assert_eq!(v, b.up_to(10));
        }
        assert_ne!(Prng::new(1).next_u64(), Prng::new(2).next_u64());
    }
}
