//! The multicast receiver core: block bitmap, gap detection, NACK timing, persistence cues.
//!
//! Invariants:
//! - A block is `New` exactly once; blocks from the initial record are never `New` and never
//!   NACKed.
//! - A NACK never names a block the receiver has, carries at most `max_ranges` ranges and
//!   `max_nack_bytes` of blocks (the lowest missing ones), and NACKs are at least
//!   `min_nack_interval` apart.
//! - NACK sequence numbers start at 1 and grow by one per NACK emitted; every NACK after a
//!   probe echoes its cookie.
//! - A block is NACKed only once it is older than the reorder window: it lies below the highest
//!   block seen at least `reorder_window` ago, or the first pass has ended.
//! - `Complete` is emitted once, when every block is present; then no timer stays armed.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec;
use alloc::vec::Vec;
use core::time::Duration;

use super::fec::{Fec, FecError};
use super::{block_count, nack_block_cap, push_span, subtract, take_blocks, ConfigError, Prng};
use crate::msg::{Message, Nack, Parity, COOKIE_LEN};
use crate::ranges::{Ranges, MAX_NACK_RANGES};
use crate::time::Instant;

/// Default for [`ReceiverConfig::max_ranges`]: a 128-range NACK is at most
/// 12 + 14 + 128 × 10 = 1306 bytes, under a 1400-byte datagram even with 5-byte varints.
pub const DEFAULT_MAX_RANGES: usize = 128;

/// Receiver parameters. [`ReceiverConfig::new`] fills in timing with defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// The multicast session.
    pub session: u32,
    /// This device (carried in every NACK).
    pub device_id: u64,
    /// File size in bytes.
    pub file_size: u64,
    /// Bytes per block.
    pub block_size: u32,
    /// How late a block may be before its absence counts as loss.
    pub reorder_window: Duration,
    /// Random extra delay, uniform in `[0, nack_backoff]`, before every NACK: receivers that
    /// lost the same block do not all NACK at once.
    pub nack_backoff: Duration,
    /// Base interval before a NACK is repeated while nothing new arrives; doubles after each
    /// repeat that brought nothing, up to `nack_repeat_max`.
    pub nack_repeat: Duration,
    /// Cap of the repeat interval.
    pub nack_repeat_max: Duration,
    /// Most ranges per NACK (1..=[`MAX_NACK_RANGES`]).
    pub max_ranges: usize,
    /// Most payload bytes of blocks one NACK asks for (at least one block): the sender's
    /// [`super::SenderConfig::max_nack_bytes`], beyond which it ignores a request. A NACK cut
    /// here is followed by the next part as soon as its repairs stop arriving.
    pub max_nack_bytes: u64,
    /// Least time between two NACKs.
    pub min_nack_interval: Duration,
    /// No block for this long means the sender's first pass ended.
    pub silence: Duration,
    /// `PersistDue` at most this often while new blocks arrive.
    pub persist_interval: Duration,
    /// Seed of the back-off randomness.
    pub seed: u64,
    /// The sender's FEC group size K, or 0 (the default) when the sender sends no parity.
    /// With K > 0 a block is NACKed only once the first pass is past its whole group (parity
    /// repairs whole groups), and a NACK that would repeat the previous one word for word is
    /// held back until the repeat interval. Parity datagrams are accepted either way.
    pub fec_group: u32,
    /// With FEC, how many more groups the first pass must leave behind a group before it is
    /// NACKed: the sender's proactive parity for a group follows its last block, interleaved
    /// with the next group's blocks at the repair share of the rate
    /// ([`super::SenderConfig::fec_proactive`]), and a NACK that waits for it names only what
    /// the parity left short (most groups then need no NACK). Also, the NACK after the pass's
    /// last block waits a reorder window, for the last group's parity. Default 1; 0 NACKs a
    /// group as soon as the pass leaves it.
    pub parity_lag: u32,
    /// Sequence number of the first NACK (at least 1). A driver that starts a new receiver
    /// under the same NACK key (a transfer received again after a digest mismatch) continues
    /// from the last one's [`McastReceiver::next_seq`], or the sender takes its NACKs for
    /// replays.
    pub first_seq: u32,
}

impl ReceiverConfig {
    /// Defaults: reorder window 20 ms, back-off up to 20 ms, repeats from 100 ms up to 2 s,
    /// 128 ranges and [`super::DEFAULT_MAX_NACK_BYTES`] per NACK, NACKs at least 20 ms apart, 250 ms silence, persist every second.
    pub fn new(session: u32, device_id: u64, file_size: u64, block_size: u32, seed: u64) -> Self {
        ReceiverConfig {
            session,
            device_id,
            file_size,
            block_size,
            reorder_window: Duration::from_millis(20),
            nack_backoff: Duration::from_millis(20),
            nack_repeat: Duration::from_millis(100),
            nack_repeat_max: Duration::from_secs(2),
            max_ranges: DEFAULT_MAX_RANGES,
            max_nack_bytes: super::DEFAULT_MAX_NACK_BYTES,
            min_nack_interval: Duration::from_millis(20),
            silence: Duration::from_millis(250),
            persist_interval: Duration::from_secs(1),
            seed,
            fec_group: 0,
            parity_lag: 1,
            first_seq: 1,
        }
    }
}

/// What [`McastReceiver::handle_block`] made of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockVerdict {
    /// First copy: the driver keeps the write.
    New,
    /// Already had it.
    Duplicate,
    /// Past the end of the file (the driver must not write it).
    OutOfRange,
}

/// What the receiver reports to its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReceiverEvent {
    /// Every block is present: verify the digest and report completion.
    Complete,
    /// Time to persist [`McastReceiver::received`] (after making the written blocks durable).
    PersistDue,
}

/// Counters, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReceiverStats {
    /// New blocks.
    pub new_blocks: u64,
    /// Duplicate blocks.
    pub duplicates: u64,
    /// NACKs emitted.
    pub nacks: u64,
    /// Bytes of NACK datagrams emitted.
    pub nack_bytes: u64,
    /// Parity symbols kept (useful when they arrived).
    pub parity_kept: u64,
    /// Parity symbols dropped: group complete, symbol held already, or enough held.
    pub parity_useless: u64,
    /// Blocks rebuilt from parity.
    pub recovered: u64,
}

/// A group that can be rebuilt: see [`McastReceiver::poll_decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodeJob {
    /// Group index.
    pub group: u32,
    /// First block of the group.
    pub first_block: u32,
    /// Blocks in the group.
    pub blocks: u32,
    /// Bytes per block slot in the decode buffer.
    pub block_size: u32,
}

impl DecodeJob {
    /// Length of the buffer [`McastReceiver::decode`] takes: `blocks × block_size`.
    pub fn buf_len(&self) -> usize {
        self.blocks as usize * self.block_size as usize
    }
}

/// Why [`McastReceiver::decode`] did not rebuild a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The group is not (or no longer) decodable: see [`McastReceiver::poll_decode`].
    NotReady,
    /// The buffer is not [`DecodeJob::buf_len`] bytes long.
    BufferLength,
    /// The codec failed (its parity is dropped; the blocks will be NACKed again).
    Fec(FecError),
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::NotReady => f.write_str("group is not decodable"),
            DecodeError::BufferLength => f.write_str("decode buffer has the wrong length"),
            DecodeError::Fec(e) => write!(f, "FEC decode failed: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DecodeError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Nack = 0,
    Silence = 1,
    Persist = 2,
}

/// Why the NACK timer is armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NackReason {
    /// A gap or the end of the pass: fires on time.
    Gap,
    /// A repeat: pushed back while new blocks keep arriving.
    Repeat,
}

/// The receiver core. See the [module docs](super) for the protocol and driving contract.
#[derive(Debug)]
pub struct McastReceiver {
    config: ReceiverConfig,
    n_blocks: u32,
    bits: Vec<u64>,
    have: u32,
    highest: Option<u32>,
    /// Detected gaps, oldest first: `(time, limit)` means blocks below `limit` were missing
    /// and overtaken at `time`.
    horizon: VecDeque<(Instant, u32)>,
    /// Blocks below this are old enough to NACK.
    stable_limit: u32,
    end_of_pass: bool,
    timers: [Option<Instant>; 3],
    nack_reason: NackReason,
    nack_due: bool,
    last_nack: Option<Instant>,
    repeat_exp: u32,
    progressed: bool,
    /// The last NACK hit `max_ranges`: more is missing than it named.
    truncated: bool,
    rng: Prng,
    complete: bool,
    events: VecDeque<ReceiverEvent>,
    record: Ranges,
    record_dirty: bool,
    stats: ReceiverStats,
    /// FEC geometry `(K, M)`, from the config or the first parity symbol.
    fec: Option<(u32, u16)>,
    /// Parity symbols held per incomplete group: `(index, symbol)`.
    held: BTreeMap<u32, Vec<(u16, Vec<u8>)>>,
    /// Groups with enough data and parity to decode, oldest first.
    decodable: VecDeque<u32>,
    /// The last NACK's ranges (FEC mode holds back word-for-word repeats).
    last_nack_missing: Option<Ranges>,
    /// The next NACK's sequence number.
    next_seq: u32,
    /// The last probe's cookie, echoed in every NACK.
    cookie: Option<[u8; COOKIE_LEN]>,
    /// A probe arrived since the last NACK: the next one goes out even if it repeats the last.
    probed: bool,
}

impl McastReceiver {
    /// A receiver starting at `now`, resuming from `initial` (blocks already on disk) if given.
    pub fn new(
        config: ReceiverConfig,
        initial: Option<&Ranges>,
        now: Instant,
    ) -> Result<Self, ConfigError> {
        let n_blocks = block_count(config.file_size, config.block_size)?;
        if config.max_ranges == 0 || config.max_ranges > MAX_NACK_RANGES {
            return Err(ConfigError::MaxRanges);
        }
        let mut r = McastReceiver {
            config,
            n_blocks,
            bits: vec![0; n_blocks.div_ceil(64) as usize],
            have: 0,
            highest: None,
            horizon: VecDeque::new(),
            stable_limit: 0,
            end_of_pass: false,
            timers: [None; 3],
            nack_reason: NackReason::Gap,
            nack_due: false,
            last_nack: None,
            repeat_exp: 0,
            progressed: false,
            truncated: false,
            rng: Prng::new(config.seed),
            complete: false,
            events: VecDeque::new(),
            record: Ranges::new(),
            record_dirty: true,
            stats: ReceiverStats::default(),
            fec: None,
            held: BTreeMap::new(),
            decodable: VecDeque::new(),
            last_nack_missing: None,
            next_seq: config.first_seq.max(1),
            cookie: None,
            probed: false,
        };
        if let Some(rec) = initial {
            if rec
                .as_slice()
                .last()
                .is_some_and(|l| l.end() > u64::from(n_blocks))
            {
                return Err(ConfigError::RecordOutOfRange);
            }
            for range in rec.as_slice() {
                for b in range.start..range.start + range.len {
                    r.set(b);
                }
            }
            // Gaps in the record are old: NACK-able at once.
            if let Some(last) = rec.as_slice().last() {
                let end = (last.end() as u32).saturating_sub(1);
                r.highest = Some(end);
                r.stable_limit = end + 1;
            }
        }
        r.check_complete();
        if !r.complete {
            r.timers[Timer::Silence as usize] = Some(now + config.silence);
        }
        Ok(r)
    }

    /// The configuration.
    pub fn config(&self) -> &ReceiverConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> &ReceiverStats {
        &self.stats
    }

    /// Blocks in the file.
    pub fn n_blocks(&self) -> u32 {
        self.n_blocks
    }

    /// The sequence number the next NACK will carry.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Blocks present.
    pub fn blocks_received(&self) -> u32 {
        self.have
    }

    /// Whether every block is present.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Whether `block` is present.
    pub fn has(&self, block: u32) -> bool {
        block < self.n_blocks && self.bits[(block / 64) as usize] >> (block % 64) & 1 == 1
    }

    /// The blocks present, as canonical ranges (what to persist for resuming). Rebuilt from
    /// the bitmap when it changed since the last call.
    pub fn received(&mut self) -> &Ranges {
        if self.record_dirty {
            let mut out = Ranges::new();
            let mut run: Option<u32> = None;
            for b in 0..self.n_blocks {
                match (self.has(b), run) {
                    (true, None) => run = Some(b),
                    (false, Some(s)) => {
                        let _ = out.push(s, b - s);
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(s) = run {
                let _ = out.push(s, self.n_blocks - s);
            }
            self.record = out;
            self.record_dirty = false;
        }
        &self.record
    }

    /// A valid block (CRC, tag and session checked by the driver) arrived, multicast (`Data`:
    /// the first pass or a re-multicast).
    pub fn handle_block(&mut self, now: Instant, block: u32) -> BlockVerdict {
        self.take_block(now, block, true)
    }

    /// A valid unicast `Repair` (checked as for [`McastReceiver::handle_block`]) arrived: as a
    /// block, except that it says nothing about how far the first pass has got (a device
    /// catching up a whole file gets its repairs in order from block 0, which must not look
    /// like a pass starting over).
    pub fn handle_repair(&mut self, now: Instant, block: u32) -> BlockVerdict {
        self.take_block(now, block, false)
    }

    fn take_block(&mut self, now: Instant, block: u32, multicast: bool) -> BlockVerdict {
        if block >= self.n_blocks {
            return BlockVerdict::OutOfRange;
        }
        if self.has(block) {
            self.stats.duplicates += 1;
            return BlockVerdict::Duplicate;
        }
        self.set(block);
        self.stats.new_blocks += 1;
        self.note_group_progress(block);
        self.progressed = true;
        if self.timers[Timer::Persist as usize].is_none() {
            self.timers[Timer::Persist as usize] = Some(now + self.config.persist_interval);
        }
        if multicast && self.highest.is_none_or(|h| block > h) {
            self.highest = Some(block);
            // The pass is still running (a silence was only a pause), unless this is the end.
            self.end_of_pass = block + 1 == self.n_blocks;
            if block > 0 && !self.has(block - 1) {
                self.sample_horizon(now, block);
                self.arm_gap(now, self.config.reorder_window);
            }
            if self.end_of_pass {
                // The last group's proactive parity follows its last block.
                let lag = self.fec_k() > 0 && self.config.parity_lag > 0;
                let wait = if lag {
                    self.config.reorder_window
                } else {
                    Duration::ZERO
                };
                self.arm_gap(now, wait);
            }
        }
        if self.nack_reason == NackReason::Repeat {
            if let Some(t) = &mut self.timers[Timer::Nack as usize] {
                *t = if self.truncated {
                    // The last NACK named only part of what is missing, and its repairs are
                    // arriving: ask for the next part as soon as they stop.
                    now + self.config.reorder_window
                } else {
                    // Repairs are flowing: hold the repeat back.
                    (*t).max(now + self.config.nack_repeat)
                };
            }
        }
        self.timers[Timer::Silence as usize] = Some(now + self.config.silence);
        self.check_complete();
        BlockVerdict::New
    }

    /// The driver learned (e.g. over the control session) that the sender's first pass is
    /// over: every missing block may be NACKed now.
    pub fn handle_sender_idle(&mut self, now: Instant) {
        if self.complete {
            return;
        }
        self.end_of_pass = true;
        self.arm_gap(now, Duration::ZERO);
    }

    /// A timer deadline passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.complete {
            return;
        }
        if self.due(Timer::Silence, now) {
            self.timers[Timer::Silence as usize] = None;
            self.end_of_pass = true;
            self.arm_gap(now, Duration::ZERO);
        }
        if self.due(Timer::Persist, now) {
            self.timers[Timer::Persist as usize] = None;
            self.events.push_back(ReceiverEvent::PersistDue);
        }
        if self.due(Timer::Nack, now) {
            let earliest = self
                .last_nack
                .map_or(now, |t| t + self.config.min_nack_interval);
            if now < earliest {
                self.timers[Timer::Nack as usize] = Some(earliest);
            } else {
                self.timers[Timer::Nack as usize] = None;
                self.nack_due = true;
            }
        }
    }

    /// Appends the next NACK datagram to `buf` and returns its length, or `None`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<usize> {
        if !core::mem::take(&mut self.nack_due) || self.complete {
            return None;
        }
        // FEC NACKs (whole groups, no early repeats) from the configured group size, or from
        // the geometry the first parity symbol taught (a sender that repairs with parity).
        let fec_k = self.fec_k();
        let fec = fec_k > 0;
        let limit = if self.end_of_pass {
            if fec {
                // Drained so that `arm_next_gap` arms no deadline already past: after the
                // pass, NACKs repeat at `nack_repeat` with back-off. (Without FEC a stale gap
                // sample re-arms the NACK at once, so it repeats every `min_nack_interval`
                // after the pass: twice the NACKs at scale, but repairs sooner; kept as is.)
                self.stable_limit_at(now);
            }
            self.n_blocks
        } else {
            let k = fec_k.max(1);
            // With FEC, whole groups, the last `parity_lag` of those passed excepted: their
            // proactive parity may still be on its way.
            let lag = if fec { self.config.parity_lag } else { 0 };
            (self.stable_limit_at(now) / k).saturating_sub(lag) * k
        };
        let mut missing = self.missing_below(limit, self.config.max_ranges);
        if !self.held.is_empty() {
            missing = self.trim_held(missing);
        }
        let range_cut = missing.len() >= self.config.max_ranges;
        let cap = nack_block_cap(self.config.max_nack_bytes, self.config.block_size);
        let block_cut = missing.blocks() > cap;
        if block_cut {
            missing = take_blocks(&missing, cap);
        }
        let repeat_too_soon = fec
            && !self.probed
            && self.last_nack_missing.as_ref() == Some(&missing)
            && self
                .last_nack
                .is_some_and(|t| now < t + self.config.nack_repeat);
        if repeat_too_soon {
            // Said already: the repeat timer says it again if nothing comes by then.
            let at = self.last_nack.map_or(now, |t| t + self.config.nack_repeat);
            self.timers[Timer::Nack as usize] = Some(at);
            self.nack_reason = NackReason::Repeat;
            return None;
        }
        if missing.is_empty() {
            // Nothing to say (held parity may cover every gap): re-arm only for gaps still
            // inside the reorder window, never in the past.
            self.stable_limit_at(now);
            self.arm_next_gap();
            return None;
        }
        self.truncated = range_cut || block_cut;
        if fec {
            self.last_nack_missing = Some(missing.clone());
        }
        let msg = Message::Nack(Nack {
            session: self.config.session,
            device_id: self.config.device_id,
            seq: self.next_seq,
            echo: self.cookie,
            missing,
        });
        // A NACK of at most MAX_NACK_RANGES ranges always encodes.
        let range = msg.emit_to_vec(buf).ok()?;
        let len = range.len();
        // Saturates: 2^32 NACKs, 20 ms apart, take 2.7 years; then the sender ignores them.
        self.next_seq = self.next_seq.saturating_add(1);
        self.probed = false;
        self.stats.nacks += 1;
        self.stats.nack_bytes += len as u64;
        self.last_nack = Some(now);
        if core::mem::take(&mut self.progressed) {
            self.repeat_exp = 0;
        } else {
            self.repeat_exp = (self.repeat_exp + 1).min(16);
        }
        let repeat = self
            .config
            .nack_repeat
            .saturating_mul(1 << self.repeat_exp)
            .min(self.config.nack_repeat_max);
        let jitter = self.jitter();
        self.timers[Timer::Nack as usize] = Some(now + repeat + jitter);
        self.nack_reason = NackReason::Repeat;
        self.arm_next_gap();
        Some(len)
    }

    /// A valid `Probe` (CRC, session, device and tag under this device's NACK key checked by
    /// the driver) arrived: the sender asks this device to prove it receives where its NACKs
    /// come from. Every later NACK echoes `cookie`, and the next one goes out soon (as after
    /// a gap), even if it would repeat the last.
    pub fn handle_probe(&mut self, now: Instant, cookie: [u8; COOKIE_LEN]) {
        self.cookie = Some(cookie);
        if self.complete {
            return;
        }
        self.probed = true;
        self.arm_gap(now, Duration::ZERO);
    }

    /// A valid parity symbol (CRC, tag and session checked by the driver) arrived. The core
    /// copies the symbol when it can help (its group lacks blocks and the symbol is new);
    /// `New` means kept, `Duplicate` not needed, `OutOfRange` a geometry that does not fit
    /// this file or the session's earlier symbols. Then drain [`McastReceiver::poll_decode`].
    pub fn handle_parity(&mut self, now: Instant, p: &Parity<'_>) -> BlockVerdict {
        let (k, m) = (u32::from(p.group_size), p.parity_count);
        let fits = match self.fec {
            Some(geom) => geom == (k, m),
            None => self.config.fec_group == 0 || self.config.fec_group == k,
        };
        let first = u64::from(p.group) * u64::from(k);
        if !fits
            || first >= u64::from(self.n_blocks)
            || p.payload.len() != self.config.block_size as usize
        {
            return BlockVerdict::OutOfRange;
        }
        self.fec = Some((k, m));
        let (start, end) = self.group_span(p.group);
        let lacking = (end - start) - self.count_present(start, end);
        let held = self.held.entry(p.group).or_default();
        if lacking == 0 || held.len() as u32 >= lacking || held.iter().any(|h| h.0 == p.index) {
            if held.is_empty() {
                self.held.remove(&p.group);
            }
            self.stats.parity_useless += 1;
            return BlockVerdict::Duplicate;
        }
        held.push((p.index, p.payload.to_vec()));
        self.stats.parity_kept += 1;
        if held.len() as u32 >= lacking && !self.decodable.contains(&p.group) {
            self.decodable.push_back(p.group);
        }
        // The sender is active: as for a block, hold back repeats and the silence timer.
        self.progressed = true;
        if self.nack_reason == NackReason::Repeat {
            if let Some(t) = &mut self.timers[Timer::Nack as usize] {
                *t = (*t).max(now + self.config.nack_repeat);
            }
        }
        if !self.complete {
            self.timers[Timer::Silence as usize] = Some(now + self.config.silence);
        }
        BlockVerdict::New
    }

    /// The next group that can be rebuilt from parity, if any. The driver fills a buffer of
    /// [`DecodeJob::buf_len`] bytes with the group's *present* blocks (block `first_block + i`
    /// at offset `i × block_size`; slots of missing blocks are ignored) and calls
    /// [`McastReceiver::decode`]. Drain until `None` after every input, before `poll_event`.
    pub fn poll_decode(&mut self) -> Option<DecodeJob> {
        while let Some(&g) = self.decodable.front() {
            if self.held.contains_key(&g) {
                let (start, end) = self.group_span(g);
                return Some(DecodeJob {
                    group: g,
                    first_block: start,
                    blocks: end - start,
                    block_size: self.config.block_size,
                });
            }
            self.decodable.pop_front();
        }
        None
    }

    /// Rebuilds the missing blocks of `group` in `buf` (see [`McastReceiver::poll_decode`]),
    /// marks them received and returns them; the driver writes those blocks from `buf` (the
    /// last block of the file only up to its length) before acting on the next events. On a
    /// codec error the group's parity is dropped and its blocks will be NACKed again.
    pub fn decode(
        &mut self,
        now: Instant,
        fec: &mut dyn Fec,
        group: u32,
        buf: &mut [u8],
    ) -> Result<Ranges, DecodeError> {
        let (Some((_, m)), Some(held)) = (self.fec, self.held.get(&group)) else {
            return Err(DecodeError::NotReady);
        };
        let (start, end) = self.group_span(group);
        let bs = self.config.block_size as usize;
        if buf.len() != (end - start) as usize * bs {
            return Err(DecodeError::BufferLength);
        }
        let lacking = (end - start) - self.count_present(start, end);
        if (held.len() as u32) < lacking {
            return Err(DecodeError::NotReady);
        }
        // The file's last block is shorter: its slot is zero-padded, as the sender encoded it.
        let last_len = (self.config.file_size - u64::from(end - 1) * bs as u64) as usize;
        if end == self.n_blocks && last_len < bs {
            let from = buf.len() - bs + last_len;
            buf[from..].fill(0);
        }
        let mut present: Vec<Option<&[u8]>> = Vec::with_capacity((end - start) as usize);
        let mut out: Vec<&mut [u8]> = Vec::with_capacity(lacking as usize);
        let mut recovered = Ranges::new();
        for (i, slot) in buf.chunks_mut(bs).enumerate() {
            let b = start + i as u32;
            if self.has(b) {
                present.push(Some(slot));
            } else {
                present.push(None);
                out.push(slot);
                push_span(&mut recovered, u64::from(b), u64::from(b) + 1);
            }
        }
        let syms: Vec<(usize, &[u8])> = held
            .iter()
            .take(lacking as usize)
            .map(|(i, p)| (usize::from(*i), &p[..]))
            .collect();
        let result = fec.decode(&present, usize::from(m), &syms, &mut out);
        self.held.remove(&group);
        result.map_err(DecodeError::Fec)?;
        for r in recovered.as_slice() {
            for b in r.start..r.start + r.len {
                self.set(b);
            }
        }
        self.stats.recovered += recovered.blocks();
        self.progressed = true;
        if self.timers[Timer::Persist as usize].is_none() {
            self.timers[Timer::Persist as usize] = Some(now + self.config.persist_interval);
        }
        self.check_complete();
        Ok(recovered)
    }

    /// The driver found blocks that [`McastReceiver::decode`] rebuilt to be wrong (their
    /// digests did not match: parity is not authenticated, so a forged symbol rebuilds
    /// garbage): `rebuilt`, what that decode returned, is missing again (the group's symbols
    /// went with the decode) and is NACKed again like any missing block. A completion the
    /// decode reported is taken back.
    pub fn discard_rebuilt(&mut self, now: Instant, rebuilt: &Ranges) {
        for r in rebuilt.as_slice() {
            for b in r.start..r.start.saturating_add(r.len).min(self.n_blocks) {
                let w = &mut self.bits[(b / 64) as usize];
                let m = 1u64 << (b % 64);
                if *w & m != 0 {
                    *w &= !m;
                    self.have -= 1;
                    self.record_dirty = true;
                }
            }
        }
        self.stats.recovered = self.stats.recovered.saturating_sub(rebuilt.blocks());
        if self.complete && self.have < self.n_blocks {
            self.complete = false;
            self.events.retain(|e| *e != ReceiverEvent::Complete);
        }
        self.arm_gap(now, Duration::ZERO);
    }

    /// When to call [`McastReceiver::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.iter().flatten().copied().min()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }

    fn due(&self, t: Timer, now: Instant) -> bool {
        self.timers[t as usize].is_some_and(|d| d <= now)
    }

    fn jitter(&mut self) -> Duration {
        let max = u64::try_from(self.config.nack_backoff.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(self.rng.up_to(max))
    }

    /// Arms a gap NACK `wait` + back-off from now, unless one is due sooner.
    fn arm_gap(&mut self, now: Instant, wait: Duration) {
        let at = now + wait + self.jitter();
        let slot = &mut self.timers[Timer::Nack as usize];
        match (self.nack_reason, *slot) {
            (NackReason::Gap, Some(t)) if t <= at => {}
            (_, Some(t)) => *slot = Some(t.min(at)),
            (_, None) => *slot = Some(at),
        }
        self.nack_reason = NackReason::Gap;
    }

    /// The FEC group size: configured, or learnt from the first parity symbol; 0 without FEC.
    fn fec_k(&self) -> u32 {
        self.fec.map_or(self.config.fec_group, |f| f.0)
    }

    /// Blocks `start..end` of group `g` (the last group may be short).
    fn group_span(&self, g: u32) -> (u32, u32) {
        let k = self.fec.map_or(self.config.fec_group, |f| f.0).max(1);
        let start = (u64::from(g) * u64::from(k)).min(u64::from(self.n_blocks)) as u32;
        (start, start.saturating_add(k).min(self.n_blocks))
    }

    /// Blocks present in `start..end`.
    fn count_present(&self, start: u32, end: u32) -> u32 {
        let mut n = 0;
        let mut b = start;
        while b < end {
            let w = self.bits[(b / 64) as usize] >> (b % 64);
            let take = (64 - b % 64).min(end - b);
            let mask = if take == 64 {
                u64::MAX
            } else {
                (1u64 << take) - 1
            };
            n += (w & mask).count_ones();
            b += take;
        }
        n
    }

    /// A new block in a group with parity held: the group may now decode, or need it no more.
    fn note_group_progress(&mut self, block: u32) {
        let Some((k, _)) = self.fec else { return };
        let g = block / k.max(1);
        let Some(held) = self.held.get(&g) else {
            return;
        };
        let (start, end) = self.group_span(g);
        let lacking = (end - start) - self.count_present(start, end);
        if lacking == 0 {
            self.held.remove(&g);
        } else if held.len() as u32 >= lacking && !self.decodable.contains(&g) {
            self.decodable.push_back(g);
        }
    }

    /// Leaves out of a NACK, per group with parity held, as many of the group's highest
    /// missing blocks as symbols are held: the NACK then names exactly what is still needed
    /// (receiving the named blocks makes the group decodable).
    fn trim_held(&self, missing: Ranges) -> Ranges {
        let mut drop = Ranges::new();
        for (&g, held) in &self.held {
            let (start, end) = self.group_span(g);
            let mut left = held.len();
            let mut b = end;
            let mut picked: Vec<u32> = Vec::new();
            while left > 0 && b > start {
                b -= 1;
                if !self.has(b) {
                    picked.push(b);
                    left -= 1;
                }
            }
            for &b in picked.iter().rev() {
                let _ = drop.push(b, 1);
            }
        }
        subtract(&missing, &drop)
    }

    fn set(&mut self, block: u32) {
        let w = &mut self.bits[(block / 64) as usize];
        let m = 1u64 << (block % 64);
        if *w & m == 0 {
            *w |= m;
            self.have += 1;
            self.record_dirty = true;
        }
    }

    fn check_complete(&mut self) {
        if !self.complete && self.have == self.n_blocks {
            self.complete = true;
            self.timers = [None; 3];
            self.nack_due = false;
            self.events.push_back(ReceiverEvent::Complete);
        }
    }

    /// Records that blocks below `limit` were overtaken at `now`. Gaps within an eighth of the
    /// reorder window share one sample (so a block may be NACKed up to that much early).
    fn sample_horizon(&mut self, now: Instant, limit: u32) {
        let step = self.config.reorder_window / 8;
        match self.horizon.back_mut() {
            Some((t, l)) if now < *t + step => *l = (*l).max(limit),
            _ => self.horizon.push_back((now, limit)),
        }
    }

    /// Arms a gap NACK for the oldest gap not yet old enough, if any.
    fn arm_next_gap(&mut self) {
        if let Some(&(t, _)) = self.horizon.front() {
            self.arm_gap(t, self.config.reorder_window);
        }
    }

    /// Blocks below the returned limit were overtaken at least a reorder window before `now`.
    fn stable_limit_at(&mut self, now: Instant) -> u32 {
        while let Some(&(t, limit)) = self.horizon.front() {
            if t + self.config.reorder_window > now {
                break;
            }
            self.stable_limit = self.stable_limit.max(limit);
            self.horizon.pop_front();
        }
        self.stable_limit
    }

    /// The lowest missing blocks below `limit`, at most `max` ranges.
    fn missing_below(&self, limit: u32, max: usize) -> Ranges {
        let mut out = Ranges::new();
        let mut run: Option<u32> = None;
        let mut b = 0u32;
        while b < limit {
            let w = self.bits[(b / 64) as usize];
            if b % 64 == 0 && limit - b >= 64 && (w == u64::MAX || (w == 0 && run.is_some())) {
                if w == u64::MAX {
                    if let Some(s) = run.take() {
                        let _ = out.push(s, b - s);
                        if out.len() >= max {
                            return out;
                        }
                    }
                }
                b += 64;
                continue;
            }
            let present = w >> (b % 64) & 1 == 1;
            match (present, run) {
                (false, None) => run = Some(b),
                (true, Some(s)) => {
                    let _ = out.push(s, b - s);
                    run = None;
                    if out.len() >= max {
                        return out;
                    }
                }
                _ => {}
            }
            b += 1;
        }
        if let Some(s) = run {
            let _ = out.push(s, limit - s);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Instant {
        Instant::from_micros(v * 1000)
    }

    fn rs(list: &[(u32, u32)]) -> Ranges {
        let mut r = Ranges::new();
        for &(s, l) in list {
            r.push(s, l).unwrap();
        }
        r
    }

    /// 200 blocks of 100 bytes, no back-off randomness.
    fn config() -> ReceiverConfig {
        ReceiverConfig {
            nack_backoff: Duration::ZERO,
            ..ReceiverConfig::new(3, 42, 20_000, 100, 1)
        }
    }

    fn nack_of(r: &mut McastReceiver, now: Instant) -> Option<Ranges> {
        let mut buf = Vec::new();
        r.poll_transmit(now, &mut buf)?;
        let (Message::Nack(n), _) = Message::parse_datagram(&buf).unwrap() else {
            panic!("not a nack");
        };
        assert_eq!((n.session, n.device_id), (3, 42));
        Some(n.missing)
    }

    /// Fires the receiver's timer and returns its NACK, if any.
    fn fire(r: &mut McastReceiver) -> (Instant, Option<Ranges>) {
        let t = r.poll_timeout().unwrap();
        r.handle_timeout(t);
        (t, nack_of(r, t))
    }

    #[test]
    fn verdicts_and_record() {
        let mut r = McastReceiver::new(config(), None, ms(0)).unwrap();
        assert_eq!(r.handle_block(ms(1), 0), BlockVerdict::New);
        assert_eq!(r.handle_block(ms(1), 0), BlockVerdict::Duplicate);
        assert_eq!(r.handle_block(ms(1), 200), BlockVerdict::OutOfRange);
        assert_eq!(r.handle_block(ms(1), 5), BlockVerdict::New);
        assert_eq!(r.received(), &rs(&[(0, 1), (5, 1)]));
        assert_eq!(r.stats().duplicates, 1);
    }

    #[test]
    fn gap_is_nacked_after_the_reorder_window_only() {
        let mut r = McastReceiver::new(config(), None, ms(0)).unwrap();
        for b in [0, 1, 3, 4] {
            r.handle_block(ms(1), b);
        }
        // Block 2 arrives late but within the window: the NACK due at 21 ms has nothing to say.
        r.handle_block(ms(10), 2);
        for b in [5, 7] {
            r.handle_block(ms(10), b);
        }
        let (t, nack) = fire(&mut r);
        assert_eq!((t, nack), (ms(21), None));
        // 6 was overtaken at 10 ms: NACKed at 30 ms; 8 (overtaken at 25 ms) is not yet.
        r.handle_block(ms(25), 9);
        let (t, nack) = fire(&mut r);
        assert_eq!((t, nack), (ms(30), Some(rs(&[(6, 1)]))));
        // Due at 45 ms, held to 50 ms by the 20 ms NACK spacing.
        let (t, nack) = fire(&mut r);
        assert_eq!((t, nack), (ms(45), None));
        let (t, nack) = fire(&mut r);
        assert_eq!((t, nack), (ms(50), Some(rs(&[(6, 1), (8, 1)]))));
    }

    #[test]
    fn end_of_pass_by_silence_nacks_the_tail_and_repeats_back_off() {
        let mut r = McastReceiver::new(config(), None, ms(0)).unwrap();
        for b in 0..150 {
            r.handle_block(ms(1), b);
        }
        let (t, nack) = fire(&mut r);
        assert_eq!(t, ms(251), "silence after the last block");
        assert_eq!(nack, Some(rs(&[(150, 50)])));
        // Nothing arrives: repeats after 100 ms, then 200 ms (doubled) ...
        let (t2, n2) = fire(&mut r);
        assert_eq!(t2 - t, Duration::from_millis(100));
        assert_eq!(n2, Some(rs(&[(150, 50)])));
        let (t3, _) = fire(&mut r);
        assert_eq!(t3 - t2, Duration::from_millis(200));
        for b in 150..200 {
            r.handle_block(t3, b);
        }
        assert_eq!(r.poll_event(), Some(ReceiverEvent::Complete));
        assert_eq!(r.poll_timeout(), None);
    }

    #[test]
    fn nacks_are_bounded_in_size_and_rate() {
        let cfg = ReceiverConfig {
            max_ranges: 4,
            ..config()
        };
        let mut r = McastReceiver::new(cfg, None, ms(0)).unwrap();
        for b in (0..200).step_by(2) {
            r.handle_block(ms(1), b);
        }
        r.handle_sender_idle(ms(2));
        r.handle_timeout(ms(2));
        assert_eq!(
            nack_of(&mut r, ms(2)),
            Some(rs(&[(1, 1), (3, 1), (5, 1), (7, 1)]))
        );
        // A new end-of-pass signal right away cannot make a second NACK within 20 ms.
        r.handle_sender_idle(ms(3));
        r.handle_timeout(ms(3));
        assert_eq!(nack_of(&mut r, ms(3)), None);
        assert_eq!(r.poll_timeout(), Some(ms(22)));
    }

    /// The whole NACK the receiver emits now, if any.
    fn full_nack(r: &mut McastReceiver, now: Instant) -> Option<Nack> {
        let mut buf = Vec::new();
        r.poll_transmit(now, &mut buf)?;
        let (Message::Nack(n), _) = Message::parse_datagram(&buf).unwrap() else {
            panic!("not a nack");
        };
        Some(n)
    }

    #[test]
    fn nacks_count_up_ask_for_at_most_max_nack_bytes_and_echo_probes() {
        // 200 blocks of 100 bytes, at most 1000 bytes (10 blocks) per NACK.
        let cfg = ReceiverConfig {
            max_nack_bytes: 1000,
            ..config()
        };
        let mut r = McastReceiver::new(cfg, None, ms(0)).unwrap();
        r.handle_sender_idle(ms(0));
        r.handle_timeout(ms(0));
        let n = full_nack(&mut r, ms(0)).unwrap();
        assert_eq!((n.session, n.device_id, n.seq, n.echo), (3, 42, 1, None));
        assert_eq!(n.missing, rs(&[(0, 10)]), "the lowest 10 blocks only");
        // Its repairs arrive: the next part is asked a reorder window after the last one
        // (they are unicast repairs, which say nothing about a first pass).
        let t1 = ms(5);
        for b in 0..10 {
            r.handle_repair(t1, b);
        }
        let t = r.poll_timeout().unwrap();
        assert_eq!(t, t1 + Duration::from_millis(20));
        r.handle_timeout(t);
        let n = full_nack(&mut r, t).unwrap();
        assert_eq!((n.seq, n.missing), (2, rs(&[(10, 10)])));
        // A probe: the next NACK comes soon (not at the 100 ms repeat), and every NACK from
        // now on echoes the cookie.
        let tp = t + Duration::from_millis(30);
        r.handle_probe(tp, [0xC0; COOKIE_LEN]);
        assert_eq!(r.poll_timeout(), Some(tp));
        r.handle_timeout(tp);
        let n = full_nack(&mut r, tp).unwrap();
        assert_eq!((n.seq, n.echo), (3, Some([0xC0; COOKIE_LEN])));
        let (_, again) = fire(&mut r);
        assert!(again.is_some());
        assert_eq!(r.stats().nacks, 4);
        assert_eq!(r.next_seq(), 5);
        // A receiver started again under the same key continues the count.
        let cfg = ReceiverConfig {
            first_seq: r.next_seq(),
            ..config()
        };
        let mut again = McastReceiver::new(cfg, None, ms(0)).unwrap();
        again.handle_sender_idle(ms(0));
        again.handle_timeout(ms(0));
        assert_eq!(full_nack(&mut again, ms(0)).map(|n| n.seq), Some(5));
        // A probe after completion changes nothing.
        let mut done = McastReceiver::new(config(), Some(&rs(&[(0, 200)])), ms(0)).unwrap();
        done.handle_probe(ms(1), [1; COOKIE_LEN]);
        assert_eq!(done.poll_timeout(), None);
    }

    #[test]
    fn truncated_nack_asks_for_the_next_part_once_its_repairs_stop() {
        let cfg = ReceiverConfig {
            max_ranges: 4,
            ..config()
        };
        let mut r = McastReceiver::new(cfg, None, ms(0)).unwrap();
        for b in (0..200).step_by(2) {
            r.handle_block(ms(1), b);
        }
        let next_nack = |r: &mut McastReceiver| loop {
            if let (t, Some(n)) = fire(r) {
                return (t, n);
            }
        };
        let (t0, n0) = next_nack(&mut r);
        assert_eq!(n0, rs(&[(1, 1), (3, 1), (5, 1), (7, 1)]));
        // Its repairs arrive 8 ms later: the next part is asked 20 ms (the reorder window)
        // after the last one, not after the 100 ms repeat.
        let t1 = t0 + Duration::from_millis(8);
        for b in [1, 3, 5, 7] {
            r.handle_block(t1, b);
        }
        let (t, n) = next_nack(&mut r);
        assert_eq!(t, t1 + Duration::from_millis(20));
        assert_eq!(n, rs(&[(9, 1), (11, 1), (13, 1), (15, 1)]));
        // An untruncated NACK keeps the 100 ms repeat while repairs flow.
        let mut u = McastReceiver::new(config(), None, ms(0)).unwrap();
        for b in 0..190 {
            u.handle_block(ms(1), b);
        }
        u.handle_sender_idle(ms(2));
        u.handle_timeout(ms(2));
        assert_eq!(nack_of(&mut u, ms(2)), Some(rs(&[(190, 10)])));
        u.handle_block(ms(10), 190);
        assert_eq!(u.poll_timeout(), Some(ms(110)));
    }

    #[test]
    fn resume_never_requests_recorded_blocks() {
        let record = rs(&[(0, 100), (150, 10)]);
        let mut r = McastReceiver::new(config(), Some(&record), ms(0)).unwrap();
        assert_eq!(r.blocks_received(), 110);
        assert_eq!(r.handle_block(ms(1), 5), BlockVerdict::Duplicate);
        let (_, nack) = fire(&mut r);
        assert_eq!(nack, Some(rs(&[(100, 50), (160, 40)])));
        let whole = rs(&[(0, 200)]);
        let mut done = McastReceiver::new(config(), Some(&whole), ms(0)).unwrap();
        assert_eq!(done.poll_event(), Some(ReceiverEvent::Complete));
        assert_eq!(
            McastReceiver::new(config(), Some(&rs(&[(0, 201)])), ms(0)).unwrap_err(),
            ConfigError::RecordOutOfRange
        );
    }

    #[test]
    fn persist_is_due_periodically() {
        let mut r = McastReceiver::new(config(), None, ms(0)).unwrap();
        r.handle_block(ms(0), 0);
        r.handle_timeout(ms(1000));
        assert_eq!(r.poll_event(), Some(ReceiverEvent::PersistDue));
        assert_eq!(r.poll_event(), None);
    }

    /// A codec that "rebuilds" every missing block as bytes of 0xEE, recording the call: the
    /// core's bookkeeping is tested apart from any real code.
    #[derive(Default)]
    struct Fake {
        calls: Vec<(usize, usize, Vec<usize>)>,
    }

    impl Fec for Fake {
        fn encode(&mut self, _: &[&[u8]], _: &mut [&mut [u8]]) -> Result<(), FecError> {
            Ok(())
        }
        fn decode(
            &mut self,
            data: &[Option<&[u8]>],
            m: usize,
            parity: &[(usize, &[u8])],
            out: &mut [&mut [u8]],
        ) -> Result<(), FecError> {
            super::super::fec::check_decode(data, m, parity, out)?;
            let idx = parity.iter().map(|p| p.0).collect();
            self.calls.push((data.len(), out.len(), idx));
            out.iter_mut().for_each(|o| o.fill(0xEE));
            Ok(())
        }
    }

    fn parity(group: u32, index: u16, payload: &[u8]) -> Parity<'_> {
        Parity {
            session: 3,
            group,
            group_size: 50,
            parity_count: 8,
            index,
            payload,
        }
    }

    #[test]
    fn a_receiver_taught_the_group_size_by_parity_nacks_whole_groups() {
        // No configured group size. Blocks 0..130 arrive but 5 and 120; 10 ms later both
        // gaps are past the reorder window.
        let run = |teach: bool| {
            let mut r = McastReceiver::new(config(), None, ms(0)).unwrap();
            if teach {
                // A parity symbol of group 3 (blocks 150..200, nothing received there) teaches
                // K = 50 without being usable yet.
                r.handle_parity(ms(0), &parity(3, 0, &[0xAB; 100]));
            }
            for b in (0..130).filter(|&b| b != 5 && b != 120) {
                r.handle_block(ms(1), b);
            }
            r.handle_block(ms(30), 130);
            loop {
                if let (_, Some(n)) = fire(&mut r) {
                    return n;
                }
            }
        };
        // Untaught: every gap old enough. Taught: only whole groups the pass has left
        // (0..100), so block 120 waits for its group to be complete.
        assert_eq!(run(false), rs(&[(5, 1), (120, 1)]));
        assert_eq!(run(true), rs(&[(5, 1)]));
    }

    #[test]
    fn parity_fills_a_group_and_decodes_into_the_callers_buffer() {
        // 200 blocks of 100 bytes in groups of 50; group 1 (blocks 50..100) lacks 60 and 70.
        let cfg = ReceiverConfig {
            fec_group: 50,
            ..config()
        };
        let mut r = McastReceiver::new(cfg, None, ms(0)).unwrap();
        for b in (0..200).filter(|&b| b != 60 && b != 70) {
            r.handle_block(ms(1), b);
        }
        let sym = [0xAB; 100];
        assert_eq!(
            r.handle_parity(ms(2), &parity(1, 5, &sym)),
            BlockVerdict::New
        );
        assert_eq!(
            r.handle_parity(ms(2), &parity(1, 5, &sym)),
            BlockVerdict::Duplicate
        );
        // One symbol for two holes: not yet; the NACK names only what is still needed.
        assert_eq!(r.poll_decode(), None);
        r.handle_sender_idle(ms(3));
        r.handle_timeout(ms(3));
        assert_eq!(nack_of(&mut r, ms(3)), Some(rs(&[(60, 1)])));
        // Wrong geometry, wrong length, group past the file, complete group: refused.
        let other = Parity {
            group_size: 40,
            ..parity(1, 1, &sym)
        };
        assert_eq!(r.handle_parity(ms(4), &other), BlockVerdict::OutOfRange);
        assert_eq!(
            r.handle_parity(ms(4), &parity(1, 1, &sym[..99])),
            BlockVerdict::OutOfRange
        );
        assert_eq!(
            r.handle_parity(ms(4), &parity(4, 1, &sym)),
            BlockVerdict::OutOfRange
        );
        assert_eq!(
            r.handle_parity(ms(4), &parity(0, 1, &sym)),
            BlockVerdict::Duplicate
        );
        assert_eq!(
            r.handle_parity(ms(4), &parity(1, 2, &sym)),
            BlockVerdict::New
        );
        // A third symbol is not needed.
        assert_eq!(
            r.handle_parity(ms(4), &parity(1, 3, &sym)),
            BlockVerdict::Duplicate
        );
        let job = r.poll_decode().unwrap();
        assert_eq!(
            job,
            DecodeJob {
                group: 1,
                first_block: 50,
                blocks: 50,
                block_size: 100
            }
        );
        let mut fake = Fake::default();
        assert_eq!(
            r.decode(ms(5), &mut fake, 1, &mut [0; 10]),
            Err(DecodeError::BufferLength)
        );
        let mut buf = vec![0x11; job.buf_len()];
        let got = r.decode(ms(5), &mut fake, 1, &mut buf).unwrap();
        assert_eq!(got, rs(&[(60, 1), (70, 1)]));
        assert_eq!(fake.calls, [(50, 2, vec![5, 2])]);
        assert!(buf[1000..1100].iter().all(|&b| b == 0xEE));
        assert!(buf[2000..2100].iter().all(|&b| b == 0xEE));
        assert!(
            buf[..1000].iter().all(|&b| b == 0x11),
            "present blocks untouched"
        );
        assert!(r.has(60) && r.has(70) && r.is_complete());
        assert_eq!(r.poll_event(), Some(ReceiverEvent::Complete));
        assert_eq!(r.stats().recovered, 2);
        assert_eq!(r.poll_decode(), None);
        assert_eq!(
            r.decode(ms(6), &mut fake, 1, &mut buf),
            Err(DecodeError::NotReady)
        );
    }

    #[test]
    fn data_arriving_after_parity_completes_or_unlocks_the_group() {
        let cfg = ReceiverConfig {
            fec_group: 50,
            ..config()
        };
        let mut r = McastReceiver::new(cfg, None, ms(0)).unwrap();
        for b in (0..200).filter(|&b| !(10..13).contains(&b)) {
            r.handle_block(ms(1), b);
        }
        let sym = [1u8; 100];
        r.handle_parity(ms(2), &parity(0, 0, &sym));
        r.handle_parity(ms(2), &parity(0, 1, &sym));
        assert_eq!(r.poll_decode(), None, "2 symbols, 3 holes");
        // A repair of block 11 leaves 2 holes for 2 symbols: decodable.
        r.handle_block(ms(3), 11);
        assert_eq!(r.poll_decode().map(|j| j.group), Some(0));
        // Both holes repaired instead: the parity is dropped, nothing to decode.
        r.handle_block(ms(3), 10);
        r.handle_block(ms(3), 12);
        assert_eq!(r.poll_decode(), None);
        assert!(r.is_complete());
    }

    #[test]
    fn fec_receiver_nacks_whole_groups_and_holds_back_repeats() {
        // Without the wait for proactive parity (see the next test).
        let cfg = ReceiverConfig {
            fec_group: 50,
            parity_lag: 0,
            ..config()
        };
        let mut r = McastReceiver::new(cfg, None, ms(0)).unwrap();
        // Gap at 5 seen at 1 ms; the pass is still inside group 0 at 30 ms: nothing to say.
        for b in (0..40).filter(|&b| b != 5) {
            r.handle_block(ms(1), b);
        }
        let (_, nack) = fire(&mut r);
        assert_eq!(nack, None);
        // Past group 0 (gap at 55 makes the sample): block 5 is NACKed once its group is done.
        for b in (40..60).filter(|&b| b != 55) {
            r.handle_block(ms(30), b);
        }
        let (t, nack) = fire(&mut r);
        assert_eq!((t, nack), (ms(50), Some(rs(&[(5, 1)]))));
        // More gaps in group 1 fire timers, but the same NACK is not repeated before 100 ms.
        for b in (60..80).filter(|&b| b != 65) {
            r.handle_block(ms(60), b);
        }
        let (t, nack) = fire(&mut r);
        assert_eq!((t, nack), (ms(80), None));
        assert_eq!(
            r.poll_timeout(),
            Some(ms(150)),
            "the repeat: last NACK + nack_repeat"
        );
    }

    #[test]
    fn fec_receiver_waits_a_group_for_proactive_parity() {
        // Groups of 50 among 200 blocks; the default lag of one group.
        let cfg = ReceiverConfig {
            fec_group: 50,
            ..config()
        };
        let mut r = McastReceiver::new(cfg, None, ms(0)).unwrap();
        for b in (0..60).filter(|&b| b != 5) {
            r.handle_block(ms(1), b);
        }
        // The pass left group 0 but is still in group 1: group 0's parity may be on its way.
        let (_, nack) = fire(&mut r);
        assert_eq!(nack, None);
        for b in (60..120).filter(|&b| b != 105) {
            r.handle_block(ms(30), b);
        }
        // Past group 1: group 0 is NACKed, not yet group 2's gap.
        let (t, nack) = fire(&mut r);
        assert_eq!((t, nack), (ms(50), Some(rs(&[(5, 1)]))));
        // The last block: the tail is NACKed a reorder window later (the last group's
        // parity follows its last block), not at once.
        for b in 120..200 {
            r.handle_block(ms(60), b);
        }
        let (t, nack) = fire(&mut r);
        assert_eq!((t, nack), (ms(80), Some(rs(&[(5, 1), (105, 1)]))));
    }
}
