//! The multicast sender core: first pass, paced repairs, NACK aggregation, demotion.
//!
//! Invariants:
//! - Every block of the first pass is sent exactly once, in order, as `Data` to the group.
//! - Sends never exceed the token bucket (burst, and the pacing rate: `rate` unless receivers'
//!   overflow reports cut it, `sender/pacing.rs`); during the first pass repairs also
//!   draw from a second bucket refilled at `repair_share_permille` of the rate.
//! - A device counts at most once per block per round (its latest NACK in a round replaces the
//!   earlier ones); blocks still to come in the first pass are never repaired.
//! - A block queued for re-multicast is not also queued for unicast.
//! - `Finished` is emitted once; a device is listed as completed only after a verified
//!   [`McastSender::receiver_done`]. After `Finished` the core sends nothing and ignores NACKs.
//! - Only the control plane adds receivers ([`McastSender::add_receiver`]); a NACK never adds
//!   an entry. A NACK counts only if its tag verifies under the device's own key, its sequence
//!   is above every one accepted before, and it asks for at most `max_nack_bytes`; a device's
//!   unicast repairs go only to its control session's address or one it proved (`auth.rs`),
//!   and stop once they cost `repair_budget`.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::net::SocketAddr;
use core::time::Duration;

use super::plan::{plan, Inputs};
use super::{
    block_count, block_len, clip_below, nack_block_cap, subtract, take_blocks, union, BlockQueue,
    ConfigError,
};
use crate::data::DATA_PREFIX_LEN;
use crate::msg::PARITY_PREFIX_LEN;
use crate::msg_kind::Kind;
use crate::ranges::Ranges;
use crate::time::Instant;

/// During the first pass, a device's share of missing blocks is judged for demotion only
/// once this many blocks have been sent.
const JUDGE_AFTER_BLOCKS: u32 = 256;
/// Token-bucket units per byte: tokens accrue `rate` units per microsecond.
const UNITS_PER_BYTE: u128 = 1_000_000;

mod auth;
mod pacing;
mod proactive;
pub use auth::{NackVerdict, ReceiverAuth};
use pacing::Pacing;
use proactive::Proactive;

/// Sender parameters. [`SenderConfig::new`] fills in the tuning knobs with defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderConfig {
    /// Session id carried in every block.
    pub session: u32,
    /// File size in bytes.
    pub file_size: u64,
    /// Bytes per block (the last may be shorter).
    pub block_size: u32,
    /// Rate ceiling in datagram bytes per second (prefix included; IP/UDP headers not).
    pub rate: u64,
    /// Bucket depth in full-size datagrams (how many may leave back to back).
    pub burst: u32,
    /// Share of the rate repairs may use while the first pass runs, in thousandths.
    pub repair_share_permille: u32,
    /// A block requested by at least this many devices in a round is re-multicast; below it,
    /// it is unicast to each requester. 0 acts as 1 (always multicast).
    pub multicast_threshold: u32,
    /// Demote a device whose estimated missing count, or the count of blocks unicast to it
    /// alone, is above this percentage of the file (during the first pass: of the blocks
    /// sent so far, once 256 have been) ...
    pub demote_missing_percent: u32,
    /// ... for this many consecutive rounds.
    pub demote_after_rounds: u32,
    /// Demote a device that sends more NACKs than this within one round (asks too often).
    pub max_nacks_per_round: u32,
    /// The receivers' [`super::ReceiverConfig::max_ranges`]: a NACK with this many ranges is
    /// taken as truncated, and its missing count is extrapolated from its density.
    pub nack_ranges_cap: usize,
    /// How long NACKs are aggregated before repairs are chosen.
    pub round: Duration,
    /// Finish this long after the last NACK or send once nothing is pending, even if some
    /// receivers never reported (they are listed as unfinished).
    pub idle_timeout: Duration,
    /// FEC group size K in blocks: 0 (the default) turns FEC parity off. With K > 0 repairs
    /// are chosen per group of K blocks (parity, re-multicast or unicast, see
    /// the module docs) and the driver must use [`McastSender::poll_send`], which also
    /// hands out parity symbols. At most 32768.
    pub fec_group: u32,
    /// Parity symbols the code defines per group (M), 1..=32768 when FEC is on; each symbol
    /// is sent at most once, so this bounds parity per group (then it falls back to
    /// re-multicast). The driver's codec must be built for the same M.
    pub fec_parity: u32,
    /// Parity symbols sent beyond the largest need of any one receiver in the group (covers
    /// the loss of the parity itself).
    pub fec_margin: u32,
    /// How long parity sent for a group still counts as on its way: NACKs arriving within it
    /// (measured from the start of their round) are credited with it. At least one
    /// round-trip time.
    pub fec_holdoff: Duration,
    /// Whether a group gets fresh parity unasked as soon as the first pass leaves it, as many
    /// symbols as earlier groups needed (`sender/proactive.rs`; none until a group needed
    /// some). Receivers wait for it ([`super::ReceiverConfig::parity_lag`]) before they
    /// NACK, so most groups cost no NACK at all. On by default.
    pub fec_proactive: bool,
    /// Whether NACKs are authenticated (the default): each must carry a valid tag under its
    /// device's own key ([`McastSender::bind_receiver`]), and a device's unicast repairs go
    /// only to its control session's address or an address it proved. Off only where NACKs
    /// are untagged and their source is trusted (the simulator and unit tests).
    pub nack_auth: bool,
    /// Most repair bytes one NACK can ask for: its request is cut to its lowest blocks worth
    /// this many payload bytes (at least one block). Receivers cut their NACKs the same way
    /// ([`super::ReceiverConfig::max_nack_bytes`]) and ask for the rest in their next NACK.
    pub max_nack_bytes: u64,
    /// Most unicast repair bytes (datagrams) one device may cost this sender; its unicast
    /// repairs stop there (it is then listed as unfinished unless it completes anyway).
    pub repair_budget: u64,
    /// Least time between two [`crate::Probe`]s to one device.
    pub probe_interval: Duration,
    /// Whether the rate follows the receivers (`sender/pacing.rs`): new drops an active
    /// receiver reports ([`McastSender::handle_overflow`]) cut it, and it probes back up to
    /// `rate` while none are reported. On by default; off, `rate` is a fixed pace.
    pub pace_follow: bool,
    /// The least the rate is cut to, in thousandths of `rate` (at most 1000).
    pub pace_floor_permille: u32,
    /// Least time between two cuts of the rate, and the period of its increase steps: about
    /// a feedback round-trip, so a cut shows in the reports before the next one.
    pub pace_interval: Duration,
}

impl SenderConfig {
    /// A configuration with default tuning: burst 8, repairs 25% of the rate during the first
    /// pass, re-multicast at 2 requesters, demotion above 20% missing in the first round after
    /// the first pass or above 8
    /// NACKs per round, 128-range NACKs, 50 ms rounds, 5 s idle timeout; authenticated NACKs
    /// of at most [`super::DEFAULT_MAX_NACK_BYTES`] each, a repair budget of twice the file
    /// (plus one NACK's worth) per device, a probe per device at most every 100 ms.
    pub fn new(session: u32, file_size: u64, block_size: u32, rate: u64) -> Self {
        SenderConfig {
            session,
            file_size,
            block_size,
            rate,
            burst: 8,
            repair_share_permille: 250,
            multicast_threshold: 2,
            demote_missing_percent: 20,
            demote_after_rounds: 1,
            max_nacks_per_round: 8,
            nack_ranges_cap: super::receiver::DEFAULT_MAX_RANGES,
            round: Duration::from_millis(50),
            idle_timeout: Duration::from_secs(5),
            fec_group: 0,
            fec_parity: 0,
            fec_margin: 1,
            fec_holdoff: Duration::from_millis(50),
            fec_proactive: true,
            nack_auth: true,
            max_nack_bytes: super::DEFAULT_MAX_NACK_BYTES,
            repair_budget: file_size
                .saturating_mul(2)
                .saturating_add(super::DEFAULT_MAX_NACK_BYTES),
            probe_interval: Duration::from_millis(100),
            pace_follow: true,
            pace_floor_permille: 50,
            pace_interval: Duration::from_millis(50),
        }
    }

    /// This configuration with FEC parity over groups of `group` blocks and a code of
    /// `group / 4` (at least 8) parity symbols per group.
    pub fn with_fec(self, group: u32) -> Self {
        SenderConfig {
            fec_group: group,
            fec_parity: (group / 4).clamp(8, MAX_FEC),
            ..self
        }
    }
}

/// Largest FEC group and parity count (what `reed-solomon-simd` supports in any combination).
const MAX_FEC: u32 = 32768;

/// Where a block goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    /// The multicast group.
    Group,
    /// One device, at [`McastSender::repair_addr`] (its control session's address or one it
    /// proved; never merely where a NACK came from).
    Unicast(u64),
}

/// One block the driver must send now: read it from the file, build the prefix with
/// [`crate::data_prefix`]`(kind, session, block, payload, tag)` and send to `dest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SendBlock {
    /// Block index.
    pub block: u32,
    /// Destination.
    pub dest: Dest,
    /// [`Kind::Data`] for the group (first pass and re-multicast), [`Kind::Repair`] for
    /// unicast.
    pub kind: Kind,
}

/// One parity symbol the driver must multicast now: encode group `group` (blocks
/// `first_block .. first_block + blocks`, the last zero-padded to `block_size`) with a code of
/// `parity_count` symbols ([`super::Fec::encode`]), take symbol `index`, and send it as a
/// [`crate::Parity`] datagram to the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SendParity {
    /// Group index.
    pub group: u32,
    /// Symbol index, below `parity_count`; never handed out twice for a group.
    pub index: u16,
    /// First block of the group.
    pub first_block: u32,
    /// Blocks in this group (K, or fewer for the last group).
    pub blocks: u32,
    /// K, as carried in the datagram.
    pub group_size: u16,
    /// M, as carried in the datagram.
    pub parity_count: u16,
}

/// What [`McastSender::poll_send`] hands the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transmit {
    /// A data block (first pass, re-multicast or unicast repair).
    Block(SendBlock),
    /// A parity symbol for the group.
    Parity(SendParity),
}

/// What the sender reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// Every block has been multicast once.
    FirstPassDone,
    /// The device is too lossy or too demanding: its repairs stopped; catch it up by unicast.
    Demoted(u64),
    /// The device reported a verified copy.
    Completed(u64),
    /// The distribution is over (emitted once).
    Finished {
        /// Devices that reported a verified copy, by id.
        completed: Vec<u64>,
        /// Every other device (never reported, demoted, or failed verification), by id: the
        /// driver marks them pending or failed in the task table.
        unfinished: Vec<u64>,
    },
}

/// Counters, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SenderStats {
    /// First-pass blocks sent.
    pub first_pass_blocks: u64,
    /// Blocks re-multicast.
    pub multicast_repairs: u64,
    /// Blocks unicast.
    pub unicast_repairs: u64,
    /// Parity symbols multicast.
    pub parity_symbols: u64,
    /// Datagram bytes handed out (prefix + payload; a multicast counts once).
    pub bytes: u64,
    /// NACKs received.
    pub nacks: u64,
    /// NACKs ignored (unknown, demoted, done or over-budget device, forged, replayed, or
    /// after `Finished`).
    pub nacks_ignored: u64,
    /// NACKs ignored because their tag did not verify under the named device's key (or they
    /// had none, or named another session).
    pub nacks_forged: u64,
    /// NACKs ignored because their sequence was not above the device's last accepted one.
    pub nacks_replayed: u64,
    /// Address probes handed out.
    pub probes: u64,
    /// Repair rounds closed.
    pub rounds: u64,
    /// Devices demoted.
    pub demoted: u64,
    /// Rounds in which a device over a demotion bar was kept because its own overflow
    /// reports account for its losses (see `close_round`).
    pub demotions_withheld: u64,
    /// [`crate::Overflow`] reports received (counted like `nacks`, whatever became of them).
    pub overflow_reports: u64,
    /// Times the rate was cut for a receiver's overflow.
    pub rate_cuts: u64,
    /// The pacing rate now, in datagram bytes per second (the configured rate unless
    /// overflows cut it).
    pub rate: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Active,
    Demoted,
    Done { verified: bool },
}

#[derive(Debug, Clone, Copy)]
struct Rx {
    status: Status,
    /// Consecutive rounds after the first pass with the missing estimate above the bar.
    over_rounds: u32,
    nacks_in_round: u32,
    /// Blocks unicast to this device alone: what its losses have cost the sender.
    repaired: u64,
    /// Authentication, replay and address state (`auth.rs`).
    auth: ReceiverAuth,
    /// When it was last sent a probe.
    probed: Option<Instant>,
    /// The highest drop count it reported ([`crate::Overflow`]).
    drops: u64,
    /// Its reports of new drops while the rate was at the floor (`sender/pacing.rs`).
    floor_strikes: u32,
}

impl Rx {
    fn new(auth: ReceiverAuth) -> Rx {
        Rx {
            status: Status::Active,
            over_rounds: 0,
            nacks_in_round: 0,
            repaired: 0,
            auth,
            probed: None,
            drops: 0,
            floor_strikes: 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Candidate {
    First(u32),
    Multicast(u32),
    Unicast(u64, u32),
    /// A parity symbol of this group.
    Parity(u32),
}

/// Per FEC group: the next fresh symbol and how many are queued.
#[derive(Debug, Clone, Copy, Default)]
struct GroupTx {
    next_index: u32,
    queued: u32,
    /// Symbols sent unasked when the first pass left it.
    proactive: u32,
    /// Its verdict (NACKed or clean) has moved the proactive level.
    judged: bool,
}

/// The sender core. See the [module docs](super) for the protocol and driving contract.
#[derive(Debug)]
pub struct McastSender {
    config: SenderConfig,
    n_blocks: u32,
    next_first: u32,
    first_pass_done: bool,
    now: Instant,
    /// Token buckets, in `UNITS_PER_BYTE` per byte.
    tokens: u128,
    repair_tokens: u128,
    bucket_cap: u128,
    last_refill: Instant,
    /// The bucket's rate, following the receivers' overflows (`sender/pacing.rs`).
    pacing: Pacing,
    receivers: BTreeMap<u64, Rx>,
    /// Latest NACK per device in the open round.
    requests: BTreeMap<u64, Ranges>,
    round_deadline: Option<Instant>,
    multicast: BlockQueue,
    unicast: BTreeMap<u64, BlockQueue>,
    /// Devices with pending unicast repairs, served round-robin.
    unicast_order: VecDeque<u64>,
    /// FEC groups (empty without FEC).
    groups: Vec<GroupTx>,
    /// Parity to send: `(group, symbols, proactive)`, in order; proactive entries first.
    parity_queue: VecDeque<(u32, u32, bool)>,
    /// How much parity groups get unasked.
    proactive: Proactive,
    /// Parity symbols sent within the hold-off: `(time, group)`, oldest first.
    recent_parity: VecDeque<(Instant, u32)>,
    /// Probes to send: `(device, address)`, at most one per device per probe interval.
    probes: VecDeque<(u64, SocketAddr)>,
    /// Key of the probe cookies (only the gateway holds it); `None`: no probes, so only the
    /// control session's address can receive a device's repairs.
    probe_key: Option<[u8; 32]>,
    last_activity: Instant,
    finished: bool,
    events: VecDeque<SenderEvent>,
    stats: SenderStats,
}

impl McastSender {
    /// A sender starting at `now` with full token buckets.
    pub fn new(config: SenderConfig, now: Instant) -> Result<Self, ConfigError> {
        let n_blocks = block_count(config.file_size, config.block_size)?;
        if config.rate == 0 {
            return Err(ConfigError::ZeroRate);
        }
        let n_groups = if config.fec_group == 0 {
            0
        } else {
            // A parity datagram's sub-header is 8 bytes longer than a data block's.
            let parity_fits = config.block_size as usize + PARITY_PREFIX_LEN
                <= super::MAX_BLOCK_SIZE as usize + DATA_PREFIX_LEN;
            if config.fec_group > MAX_FEC
                || config.fec_parity == 0
                || config.fec_parity > MAX_FEC
                || !parity_fits
            {
                return Err(ConfigError::Fec);
            }
            n_blocks.div_ceil(config.fec_group) as usize
        };
        // The bucket must hold the largest datagram: with FEC, a parity one.
        let prefix = if n_groups > 0 {
            PARITY_PREFIX_LEN
        } else {
            DATA_PREFIX_LEN
        };
        let full = (prefix as u128 + u128::from(config.block_size)) * UNITS_PER_BYTE;
        let bucket_cap = full * u128::from(config.burst.max(1));
        let mut s = McastSender {
            config,
            n_blocks,
            next_first: 0,
            first_pass_done: false,
            now,
            tokens: bucket_cap,
            repair_tokens: bucket_cap,
            bucket_cap,
            last_refill: now,
            pacing: Pacing::new(
                config.rate,
                config.pace_floor_permille,
                config.pace_interval,
                now,
            ),
            receivers: BTreeMap::new(),
            requests: BTreeMap::new(),
            round_deadline: None,
            multicast: BlockQueue::default(),
            unicast: BTreeMap::new(),
            unicast_order: VecDeque::new(),
            groups: alloc::vec![GroupTx::default(); n_groups],
            parity_queue: VecDeque::new(),
            proactive: Proactive::default(),
            recent_parity: VecDeque::new(),
            probes: VecDeque::new(),
            probe_key: None,
            last_activity: now,
            finished: false,
            events: VecDeque::new(),
            stats: SenderStats {
                rate: config.rate,
                ..SenderStats::default()
            },
        };
        if n_blocks == 0 {
            s.first_pass_done = true;
            s.events.push_back(SenderEvent::FirstPassDone);
        }
        Ok(s)
    }

    /// A sender for catch-up only: no first pass (the file counts as sent), so it sends
    /// nothing until NACKs ask for blocks. With `multicast_threshold = u32::MAX` every repair
    /// is unicast: this serves a device that was demoted from, or arrived after, a multicast.
    /// A catch-up sender never demotes (there is nothing slower to fall back to).
    pub fn new_catch_up(mut config: SenderConfig, now: Instant) -> Result<Self, ConfigError> {
        config.demote_missing_percent = u32::MAX;
        config.max_nacks_per_round = u32::MAX;
        let mut s = Self::new(config, now)?;
        s.next_first = s.n_blocks;
        s.first_pass_done = true;
        s.events.clear();
        Ok(s)
    }

    /// The configuration.
    pub fn config(&self) -> &SenderConfig {
        &self.config
    }

    /// Blocks in the file.
    pub fn n_blocks(&self) -> u32 {
        self.n_blocks
    }

    /// Counters.
    pub fn stats(&self) -> &SenderStats {
        &self.stats
    }

    /// Whether every block has been sent once (always, for a catch-up sender).
    pub fn first_pass_done(&self) -> bool {
        self.first_pass_done
    }

    /// Whether `Finished` has been emitted (or is queued).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Registers a receiver (announce accepted). Idempotent: a repeated join changes nothing
    /// and returns `false`; so does a join after `Finished`.
    pub fn add_receiver(&mut self, device: u64) -> bool {
        if self.finished || self.receivers.contains_key(&device) {
            return false;
        }
        self.receivers
            .insert(device, Rx::new(ReceiverAuth::default()));
        true
    }

    /// Whether `device` gave this sender its final word ([`McastSender::receiver_done`]).
    pub fn receiver_is_done(&self, device: u64) -> bool {
        self.receivers
            .get(&device)
            .is_some_and(|rx| matches!(rx.status, Status::Done { .. }))
    }

    /// Receivers registered (by the control plane only: NACKs never add one).
    pub fn receiver_count(&self) -> usize {
        self.receivers.len()
    }

    /// Records an authenticated, fresh NACK's request: at most `max_nack_bytes` of its lowest
    /// blocks count, and it replaces the device's earlier request of the open round.
    fn accept_request(&mut self, now: Instant, device: u64, missing: &Ranges) -> NackVerdict {
        let limit = self.config.max_nacks_per_round;
        let budget = self.config.repair_budget;
        let rx = match self.receivers.get_mut(&device) {
            Some(rx) if !self.finished && rx.status == Status::Active => rx,
            _ => return NackVerdict::Inactive,
        };
        if rx.auth.spent >= budget {
            return NackVerdict::OverBudget;
        }
        self.last_activity = now;
        rx.nacks_in_round += 1;
        if rx.nacks_in_round > limit {
            self.demote(device);
            return NackVerdict::Accepted;
        }
        let cap = nack_block_cap(self.config.max_nack_bytes, self.config.block_size);
        let req = take_blocks(&clip_below(missing, self.n_blocks), cap);
        self.requests.insert(device, req);
        if self.round_deadline.is_none() {
            self.round_deadline = Some(now + self.config.round);
        }
        NackVerdict::Accepted
    }

    /// The control session reported `device`'s completion: `verified` is whether its digest
    /// matched. A verified device is [`SenderEvent::Completed`]; an unverified one is listed
    /// as unfinished. Either way its repairs stop. Reports after the first are ignored.
    pub fn receiver_done(&mut self, device: u64, verified: bool) {
        if self.finished {
            return;
        }
        let rx = self
            .receivers
            .entry(device)
            .or_insert(Rx::new(ReceiverAuth::default()));
        if matches!(rx.status, Status::Done { .. }) {
            return;
        }
        rx.status = Status::Done { verified };
        self.drop_repairs(device);
        if verified {
            self.events.push_back(SenderEvent::Completed(device));
        }
        let now = self.now;
        self.check_finished(now);
    }

    /// A timer deadline passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tick(now);
        if self.round_deadline.is_some_and(|d| d <= now) {
            self.close_round();
        }
        self.check_finished(now);
    }

    /// The next block to send at `now`, or `None` when nothing is due (pacing, or nothing
    /// pending). Drain until `None` after every input. For a sender without FEC
    /// (`fec_group == 0`); with FEC use [`McastSender::poll_send`] (this method never hands
    /// out parity, so parity would stay pending).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<SendBlock> {
        match self.poll_next(now, false)? {
            Transmit::Block(b) => Some(b),
            // Not reached: parity candidates are skipped when `parity` is false.
            Transmit::Parity(_) => None,
        }
    }

    /// The next datagram to send at `now`, data block or parity symbol, or `None` when
    /// nothing is due. Drain until `None` after every input. Works with or without FEC.
    pub fn poll_send(&mut self, now: Instant) -> Option<Transmit> {
        self.poll_next(now, true)
    }

    fn poll_next(&mut self, now: Instant, parity: bool) -> Option<Transmit> {
        self.tick(now);
        if self.finished {
            return None;
        }
        if let Some(c) = self
            .next_repair()
            .filter(|c| parity || !matches!(c, Candidate::Parity(_)))
        {
            let cost = self.cost(c);
            if self.tokens >= cost && (self.first_pass_done || self.repair_tokens >= cost) {
                self.tokens -= cost;
                if !self.first_pass_done {
                    self.repair_tokens -= cost;
                }
                return Some(self.commit(now, c, cost));
            }
        }
        if !self.first_pass_done {
            let c = Candidate::First(self.next_first);
            let cost = self.cost(c);
            if self.tokens >= cost {
                self.tokens -= cost;
                return Some(self.commit(now, c, cost));
            }
        }
        self.check_finished(now);
        None
    }

    /// When to call [`McastSender::handle_timeout`] (or `poll_transmit`: the next send time
    /// is included).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.finished {
            return None;
        }
        let mut next = self.round_deadline;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        if !self.first_pass_done {
            let cost = self.cost(Candidate::First(self.next_first));
            consider(Some(self.when(self.tokens, cost, self.pacing.rate())));
        }
        if let Some(c) = self.next_repair() {
            let cost = self.cost(c);
            let main = self.when(self.tokens, cost, self.pacing.rate());
            if self.first_pass_done {
                consider(Some(main));
            } else {
                let share = self.repair_rate();
                if share > 0 {
                    consider(Some(main.max(self.when(self.repair_tokens, cost, share))));
                }
            }
        }
        if self.first_pass_done && self.nothing_pending() {
            consider(Some(self.last_activity + self.config.idle_timeout));
        }
        next
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    fn repair_rate(&self) -> u64 {
        let share = u128::from(self.pacing.rate()) * u128::from(self.config.repair_share_permille);
        u64::try_from(share / 1000).unwrap_or(u64::MAX)
    }

    /// Advances time and refills the buckets.
    fn tick(&mut self, now: Instant) {
        self.now = self.now.max(now);
        let us = u128::from((self.now - self.last_refill).as_micros() as u64);
        self.last_refill = self.now;
        // The elapsed time refills at the rate it began with; then the rate steps up.
        let add = us * u128::from(self.pacing.rate());
        self.tokens = (self.tokens + add).min(self.bucket_cap);
        let add = us * u128::from(self.repair_rate());
        self.repair_tokens = (self.repair_tokens + add).min(self.bucket_cap);
        self.pacing.advance(self.now);
        self.stats.rate = self.pacing.rate();
    }

    /// The instant a bucket holding `tokens` reaches `cost` at `rate` units per microsecond.
    fn when(&self, tokens: u128, cost: u128, rate: u64) -> Instant {
        if tokens >= cost {
            return self.last_refill;
        }
        let us = (cost - tokens).div_ceil(u128::from(rate.max(1)));
        self.last_refill + Duration::from_micros(u64::try_from(us).unwrap_or(u64::MAX))
    }

    fn cost(&self, c: Candidate) -> u128 {
        let (cfg, b) = (
            &self.config,
            match c {
                Candidate::First(b) | Candidate::Multicast(b) | Candidate::Unicast(_, b) => b,
                Candidate::Parity(_) => {
                    let len = PARITY_PREFIX_LEN as u128 + u128::from(self.config.block_size);
                    return len * UNITS_PER_BYTE;
                }
            },
        );
        let len = block_len(cfg.file_size, cfg.block_size, b);
        (DATA_PREFIX_LEN as u128 + u128::from(len)) * UNITS_PER_BYTE
    }

    fn next_repair(&self) -> Option<Candidate> {
        // Proactive parity first: receivers hold their NACKs for it (one group's time).
        if let Some(&(g, _, true)) = self.parity_queue.front() {
            return Some(Candidate::Parity(g));
        }
        if let Some(b) = self.multicast.peek() {
            return Some(Candidate::Multicast(b));
        }
        if let Some(&(g, _, _)) = self.parity_queue.front() {
            return Some(Candidate::Parity(g));
        }
        let dev = *self.unicast_order.front()?;
        let b = self.unicast.get(&dev)?.peek()?;
        Some(Candidate::Unicast(dev, b))
    }

    fn commit(&mut self, now: Instant, c: Candidate, cost: u128) -> Transmit {
        self.last_activity = now;
        let bytes = u64::try_from(cost / UNITS_PER_BYTE).unwrap_or(u64::MAX);
        self.stats.bytes += bytes;
        self.pacing.sent(now, bytes);
        let (block, dest, kind) = match c {
            Candidate::First(b) => {
                self.next_first += 1;
                self.stats.first_pass_blocks += 1;
                let k = self.config.fec_group;
                if k > 0 && (self.next_first % k == 0 || self.next_first == self.n_blocks) {
                    self.leave_group(now, b / k);
                }
                if self.next_first == self.n_blocks {
                    self.first_pass_done = true;
                    self.events.push_back(SenderEvent::FirstPassDone);
                }
                (b, Dest::Group, Kind::Data)
            }
            Candidate::Multicast(b) => {
                self.multicast.pop();
                self.stats.multicast_repairs += 1;
                (b, Dest::Group, Kind::Data)
            }
            Candidate::Unicast(dev, b) => {
                self.unicast_order.pop_front();
                if let Some(q) = self.unicast.get_mut(&dev) {
                    q.pop();
                    if q.is_empty() {
                        self.unicast.remove(&dev);
                    } else {
                        self.unicast_order.push_back(dev);
                    }
                }
                self.stats.unicast_repairs += 1;
                let budget = self.config.repair_budget;
                let spent_all = self.receivers.get_mut(&dev).is_some_and(|rx| {
                    rx.repaired += 1;
                    rx.auth.spent = rx
                        .auth
                        .spent
                        .saturating_add(u64::try_from(cost / UNITS_PER_BYTE).unwrap_or(u64::MAX));
                    rx.auth.spent >= budget
                });
                if spent_all {
                    // The device's budget is spent: no more unicast repairs for it.
                    self.drop_repairs(dev);
                }
                (b, Dest::Unicast(dev), Kind::Repair)
            }
            Candidate::Parity(g) => return Transmit::Parity(self.commit_parity(now, g)),
        };
        Transmit::Block(SendBlock { block, dest, kind })
    }

    fn commit_parity(&mut self, now: Instant, g: u32) -> SendParity {
        let mut proactive = false;
        if let Some(front) = self.parity_queue.front_mut() {
            front.1 -= 1;
            proactive = front.2;
            if front.1 == 0 {
                self.parity_queue.pop_front();
            }
        }
        let k = self.config.fec_group;
        let gt = &mut self.groups[g as usize];
        let index = gt.next_index;
        gt.next_index += 1;
        gt.queued = gt.queued.saturating_sub(1);
        // Receivers NACK a group only after its proactive parity (they leave out of a NACK
        // what their symbols cover), so a later NACK is not credited with it again.
        if !proactive {
            self.recent_parity.push_back((now, g));
        }
        self.stats.parity_symbols += 1;
        let first_block = g * k;
        SendParity {
            group: g,
            // Both below MAX_FEC (checked in `new`; `plan` never exceeds the fresh symbols).
            index: index as u16,
            first_block,
            blocks: k.min(self.n_blocks - first_block),
            group_size: k as u16,
            parity_count: self.config.fec_parity as u16,
        }
    }

    /// The first pass left group `g` at `now`: judge the groups left long enough ago that
    /// nobody NACKed, then queue `g`'s proactive parity, behind other groups' proactive
    /// parity and ahead of everything else.
    fn leave_group(&mut self, now: Instant, g: u32) {
        if !self.config.fec_proactive {
            return;
        }
        let k = self.config.fec_group;
        while let Some(done) = self.proactive.due(now, self.next_first, k) {
            let gt = &mut self.groups[done as usize];
            if !gt.judged {
                gt.judged = true;
                self.proactive.clean(gt.proactive);
            }
        }
        self.proactive.left(now, g);
        let m = self.config.fec_parity;
        let gt = &mut self.groups[g as usize];
        let n = self
            .proactive
            .symbols()
            .min(m.saturating_sub(gt.next_index + gt.queued));
        if n == 0 {
            return;
        }
        gt.queued += n;
        gt.proactive = n;
        let at = self.parity_queue.iter().take_while(|e| e.2).count();
        self.parity_queue.insert(at, (g, n, true));
    }

    /// Moves the proactive level by the groups this round's NACKs name for the first time
    /// (once their proactive parity is all sent): by the largest count any receiver that is
    /// not an `outlier` still lacks there.
    fn judge_needed(&mut self, wanted: &[(u64, Ranges)], outliers: &[u64]) {
        let k = self.config.fec_group.max(1);
        let mut tops: BTreeMap<u32, u32> = BTreeMap::new();
        for (dev, req) in wanted {
            if outliers.contains(dev) {
                continue;
            }
            let mut per: BTreeMap<u32, u32> = BTreeMap::new();
            for r in req.as_slice() {
                let (mut s, e) = (r.start, r.end() as u32);
                while s < e {
                    let g = s / k;
                    let end = e.min((g + 1).saturating_mul(k));
                    *per.entry(g).or_default() += end - s;
                    s = end;
                }
            }
            for (g, n) in per {
                let top = tops.entry(g).or_default();
                *top = (*top).max(n);
            }
        }
        for (g, top) in tops {
            let Some(gt) = self.groups.get_mut(g as usize) else {
                continue;
            };
            if gt.judged || gt.queued > 0 {
                continue;
            }
            gt.judged = true;
            self.proactive.needed(gt.proactive, top);
        }
    }

    fn nothing_pending(&self) -> bool {
        self.round_deadline.is_none()
            && self.multicast.is_empty()
            && self.unicast.is_empty()
            && self.parity_queue.is_empty()
    }

    fn drop_repairs(&mut self, device: u64) {
        self.requests.remove(&device);
        if self.unicast.remove(&device).is_some() {
            self.unicast_order.retain(|&d| d != device);
        }
    }

    fn demote(&mut self, device: u64) {
        if let Some(rx) = self.receivers.get_mut(&device) {
            rx.status = Status::Demoted;
        }
        self.drop_repairs(device);
        self.stats.demoted += 1;
        self.events.push_back(SenderEvent::Demoted(device));
    }

    /// Estimated blocks `device` misses below `horizon` (the file, or what the first pass
    /// has sent), from its NACK: exact unless the NACK hit the range cap, in which case its
    /// density over the span it covers is extrapolated up to `horizon` (a NACK names the lowest missing blocks: below its first range the device
    /// has everything, so repairs already received do not dilute the estimate).
    fn estimate_missing(&self, req: &Ranges, horizon: u32) -> u64 {
        let listed = req.blocks();
        match (req.as_slice().first(), req.as_slice().last()) {
            (Some(first), Some(last)) if req.len() >= self.config.nack_ranges_cap.max(1) => {
                let span = (last.end() - u64::from(first.start)).max(1);
                let rest = u64::from(horizon).saturating_sub(last.end());
                listed + (u128::from(listed) * u128::from(rest) / u128::from(span)) as u64
            }
            _ => listed,
        }
    }

    /// Whether the rate follows the receivers and most active receivers' sockets have
    /// overflowed: then the pass outran the fleet, not one slow device (see the demotion
    /// checks of `close_round`).
    fn fleet_overflowed(&self) -> bool {
        let (active, overflowed) = self
            .receivers
            .values()
            .filter(|r| r.status == Status::Active)
            .fold((0usize, 0usize), |(a, o), r| {
                (a + 1, o + usize::from(r.drops > 0))
            });
        self.config.pace_follow && overflowed * 2 > active
    }

    /// Closes the open round: demotion checks, then the requester-count sweep that splits the
    /// requested blocks into re-multicast and per-device unicast.
    fn close_round(&mut self) {
        self.round_deadline = None;
        self.stats.rounds += 1;
        let requests = core::mem::take(&mut self.requests);
        let mut wanted: Vec<(u64, Ranges)> = Vec::with_capacity(requests.len());
        // Devices over the demotion bar this round: their losses do not size proactive parity.
        let mut outliers: Vec<u64> = Vec::new();
        let fleet_overflowed = self.fleet_overflowed();
        for (dev, req) in requests {
            let Some(rx) = self.receivers.get_mut(&dev) else {
                continue;
            };
            rx.nacks_in_round = 0;
            if rx.status != Status::Active {
                continue;
            }
            // During the first pass only blocks already sent count (the rest will come
            // anyway), and a device is judged against what has been sent so far, once that is
            // enough for a share to mean something.
            // `horizon`: what the device is judged against for its repair cost (the file, or
            // what the first pass has sent); `judged`: the blocks its NACK speaks for.
            let (req, horizon, judged) = if self.first_pass_done {
                (req, self.n_blocks, self.n_blocks)
            } else {
                // With FEC, a group is repaired once the first pass has sent all of it.
                let k = self.config.fec_group.max(1);
                let req = clip_below(&req, self.next_first / k * k);
                // A receiver that knows the groups NACKs the whole groups its own view of the
                // pass has left behind, which lags what has been sent (by its queue, and by up
                // to a pacing interval of NACKs), and has every block below its first range:
                // a whole NACK speaks for the groups from its first range's to its last's,
                // not for every block sent, or a lossy receiver on a busy machine looks a
                // fraction as lossy as it is. A NACK cut at the range cap is extrapolated
                // over all that was sent (`estimate_missing`); without groups a NACK speaks
                // for everything sent (its gaps are NACKed as they open).
                let whole = req.len() < self.config.nack_ranges_cap.max(1);
                let judged = match (req.as_slice().first(), req.as_slice().last()) {
                    (Some(first), Some(last)) if k > 1 && whole => {
                        let k = u64::from(k);
                        let from = u64::from(first.start) / k * k;
                        let reach = (last.end().div_ceil(k) * k).min(u64::from(self.next_first));
                        reach.saturating_sub(from) as u32
                    }
                    _ => self.next_first,
                };
                (req, self.next_first, judged)
            };
            if self.first_pass_done || horizon >= JUDGE_AFTER_BLOCKS {
                let estimate = self.estimate_missing(&req, horizon);
                let pct = u64::from(self.config.demote_missing_percent);
                let bar = u64::from(horizon) * pct;
                let rx = self.receivers.get_mut(&dev).expect("checked above");
                // When most of the fleet overflowed, the losses a device's own overflow
                // reports account for were caused by our rate, which pacing is already
                // cutting: they do not demote it (measured at MTU 9000: every receiver of a
                // pass that outran them all was demoted in the first round, and each fetched
                // a third of the file by unicast). One device overflowing alone is simply
                // slower than the group and is judged as before, and so is one that
                // overflows even at the floor.
                let overflowed = fleet_overflowed
                    && rx.floor_strikes < pacing::FLOOR_STRIKES
                    && rx.drops >= estimate.max(1);
                let over = estimate * 100 > u64::from(judged) * pct;
                if overflowed {
                    if over || rx.repaired * 100 > bar {
                        self.stats.demotions_withheld += 1;
                    }
                    if over {
                        outliers.push(dev);
                    }
                    rx.over_rounds = 0;
                } else if rx.repaired * 100 > bar {
                    // Repairs that keep up with a lossy device hide its losses from the
                    // estimate; what they cost does not: more unicast than the bar allows
                    // demotes at once.
                    self.demote(dev);
                    continue;
                } else if over {
                    outliers.push(dev);
                    rx.over_rounds += 1;
                    if rx.over_rounds >= self.config.demote_after_rounds.max(1) {
                        self.demote(dev);
                        continue;
                    }
                } else {
                    rx.over_rounds = 0;
                }
            }
            if !req.is_empty() {
                wanted.push((dev, req));
            }
        }
        if self.config.fec_group > 0 {
            self.plan_fec(wanted, &outliers);
            return;
        }
        // Requester count per block, as a sweep over range edges: O(ranges log ranges), no
        // per-block or per-(block, device) state.
        let mut edges: Vec<(u64, i32)> = Vec::new();
        for (_, req) in &wanted {
            for r in req.as_slice() {
                edges.push((u64::from(r.start), 1));
                edges.push((r.end(), -1));
            }
        }
        edges.sort_unstable();
        let k = i64::from(self.config.multicast_threshold.max(1));
        let mut hot = Ranges::new();
        let mut count = 0i64;
        let mut i = 0;
        while i < edges.len() {
            let pos = edges[i].0;
            while i < edges.len() && edges[i].0 == pos {
                count += i64::from(edges[i].1);
                i += 1;
            }
            if count >= k {
                if let Some(&(next, _)) = edges.get(i) {
                    super::push_span(&mut hot, pos, next);
                }
            }
        }
        if !hot.is_empty() {
            self.multicast.merge(&hot);
            for q in self.unicast.values_mut() {
                q.remove(&hot);
            }
            self.unicast.retain(|_, q| !q.is_empty());
            let unicast = &self.unicast;
            self.unicast_order.retain(|d| unicast.contains_key(d));
        }
        let queued = self.multicast.remaining();
        for (dev, req) in wanted {
            let own = subtract(&req, &queued);
            if own.is_empty() || !self.reachable(dev) {
                continue;
            }
            let q = self.unicast.entry(dev).or_default();
            if q.is_empty() {
                self.unicast_order.push_back(dev);
            }
            q.merge(&own);
        }
    }

    /// The FEC half of `close_round`: repairs chosen per group by [`plan`].
    fn plan_fec(&mut self, wanted: Vec<(u64, Ranges)>, outliers: &[u64]) {
        // The round's NACKs arrived up to a round before now: credit parity sent within the
        // hold-off before the earliest of them.
        let holdoff = self.config.fec_holdoff + self.config.round;
        let now = self.now;
        while self
            .recent_parity
            .front()
            .is_some_and(|&(t, _)| t + holdoff <= now)
        {
            self.recent_parity.pop_front();
        }
        // Blocks already queued for re-multicast will arrive: not part of anyone's need.
        let queued = self.multicast.remaining();
        let wanted: Vec<(u64, Ranges)> = wanted
            .into_iter()
            .map(|(d, r)| (d, subtract(&r, &queued)))
            .filter(|(_, r)| !r.is_empty())
            .collect();
        if self.config.fec_proactive && !self.first_pass_done {
            self.judge_needed(&wanted, outliers);
        }
        let (groups, recent) = (&self.groups, &self.recent_parity);
        let credit = |g: u32| {
            let sent = recent.iter().filter(|&&(_, rg)| rg == g).count() as u32;
            groups.get(g as usize).map_or(0, |gt| gt.queued) + sent
        };
        let m = self.config.fec_parity;
        let fresh = |g: u32| {
            groups
                .get(g as usize)
                .map_or(0, |gt| m.saturating_sub(gt.next_index + gt.queued))
        };
        let p = plan(
            &wanted,
            &Inputs {
                k: self.config.fec_group,
                margin: self.config.fec_margin,
                credit: &credit,
                fresh: &fresh,
            },
        );
        // Parity is sized to the neediest receiver of each group: what it needs beyond the
        // next neediest is its own cost, counted like unicast repairs, so the same demotion
        // rule (repairs above the bar) applies when losses are healed by parity.
        let k = self.config.fec_group;
        for &(g, n) in &p.parity {
            let (start, end) = (g * k, (g * k).saturating_add(k).min(self.n_blocks));
            let (mut top, mut second) = ((0u64, 0u32), 0u32);
            for (dev, r) in &wanted {
                let lack: u32 = r
                    .as_slice()
                    .iter()
                    .map(|x| {
                        let (a, b) = (x.start.max(start), (x.end().min(u64::from(end))) as u32);
                        b.saturating_sub(a)
                    })
                    .sum();
                if lack > top.1 {
                    second = top.1;
                    top = (*dev, lack);
                } else if lack > second {
                    second = lack;
                }
            }
            if let Some(rx) = self.receivers.get_mut(&top.0) {
                rx.repaired += u64::from((top.1 - second).min(n));
            }
        }
        // Blocks now covered by parity or re-multicast leave the unicast queues.
        let mut covered = p.multicast.clone();
        for &(g, n) in &p.parity {
            self.groups[g as usize].queued += n;
            self.parity_queue.push_back((g, n, false));
            let start = g * k;
            let mut span = Ranges::new();
            super::push_span(
                &mut span,
                u64::from(start),
                u64::from(start + k.min(self.n_blocks - start)),
            );
            covered = union(&covered, &span);
        }
        self.multicast.merge(&p.multicast);
        if !covered.is_empty() {
            for q in self.unicast.values_mut() {
                q.remove(&covered);
            }
            self.unicast.retain(|_, q| !q.is_empty());
            let unicast = &self.unicast;
            self.unicast_order.retain(|d| unicast.contains_key(d));
        }
        for (dev, own) in p.unicast {
            if !self.reachable(dev) {
                continue;
            }
            let q = self.unicast.entry(dev).or_default();
            if q.is_empty() {
                self.unicast_order.push_back(dev);
            }
            q.merge(&own);
        }
    }

    /// Whether unicast repairs can reach `dev`: its address is known (the control session's,
    /// or proved). Its requests still count for multicast and parity; the blocks it alone
    /// needs wait for its next NACK, once it is reachable.
    fn reachable(&self, dev: u64) -> bool {
        self.receivers
            .get(&dev)
            .is_some_and(|rx| rx.auth.addr.is_some())
    }

    fn check_finished(&mut self, now: Instant) {
        if self.finished || !self.first_pass_done || !self.nothing_pending() {
            return;
        }
        let all_reported = self
            .receivers
            .values()
            .all(|rx| rx.status != Status::Active);
        if !all_reported && now < self.last_activity + self.config.idle_timeout {
            return;
        }
        self.finished = true;
        let (mut completed, mut unfinished) = (Vec::new(), Vec::new());
        for (&dev, rx) in &self.receivers {
            match rx.status {
                Status::Done { verified: true } => completed.push(dev),
                _ => unfinished.push(dev),
            }
        }
        self.events.push_back(SenderEvent::Finished {
            completed,
            unfinished,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(v: u64) -> Instant {
        Instant::from_micros(v)
    }

    fn rs(list: &[(u32, u32)]) -> Ranges {
        let mut r = Ranges::new();
        for &(s, l) in list {
            r.push(s, l).unwrap();
        }
        r
    }

    /// 10 blocks of 1000 bytes at 1020 bytes per ms (one datagram per ms), burst 1; NACKs
    /// untagged (authentication has its own tests, in `auth/tests.rs`).
    fn config() -> SenderConfig {
        SenderConfig {
            burst: 1,
            nack_auth: false,
            ..SenderConfig::new(7, 10_000, 1000, 1_020_000)
        }
    }

    /// Drives `s` from time 0 until its first pass has sent at least `blocks` blocks;
    /// returns the time it got there.
    fn first_pass_to(s: &mut McastSender, blocks: usize) -> Instant {
        let mut now = us(0);
        let mut sent = 0;
        while sent < blocks {
            sent += drain(s, now).len();
            now = s.poll_timeout().unwrap();
        }
        now
    }

    struct NoMac;

    impl crate::mcast::NackMac for NoMac {
        fn tag(&self, _: &[u8; 32], _: &[u8], _: &[u8]) -> [u8; crate::header::TAG_LEN] {
            [0; crate::header::TAG_LEN]
        }
    }

    /// An untagged NACK of `missing` from `dev` at 10.0.0.`dev`:5000, with the device's next
    /// sequence.
    fn nack(s: &mut McastSender, now: Instant, dev: u64, missing: &Ranges) -> NackVerdict {
        let seq = s.receivers.get(&dev).map_or(1, |rx| rx.auth.seq + 1);
        let msg = crate::msg::Message::Nack(crate::msg::Nack {
            session: s.config.session,
            device_id: dev,
            seq,
            echo: None,
            missing: missing.clone(),
        });
        let mut buf = Vec::new();
        msg.emit_to_vec(&mut buf).unwrap();
        let frame = crate::header::Frame::parse_datagram(&buf).unwrap();
        let from = SocketAddr::from(([10, 0, 0, dev as u8], 5000));
        let crate::msg::Message::Nack(n) = msg else {
            unreachable!()
        };
        s.handle_nack(now, from, &frame, &n, &NoMac)
    }

    fn drain(s: &mut McastSender, now: Instant) -> Vec<SendBlock> {
        core::iter::from_fn(|| s.poll_transmit(now)).collect()
    }

    fn events(s: &mut McastSender) -> Vec<SenderEvent> {
        core::iter::from_fn(|| s.poll_event()).collect()
    }

    /// Runs the first pass at the paced times; returns the time it ended.
    fn first_pass(s: &mut McastSender) -> Instant {
        let mut now = us(0);
        let mut sent = 0;
        loop {
            sent += drain(s, now).len() as u32;
            if sent == s.n_blocks() {
                return now;
            }
            now = s.poll_timeout().unwrap();
        }
    }

    #[test]
    fn catch_up_sender_sends_only_what_is_asked_by_unicast() {
        let cfg = SenderConfig {
            multicast_threshold: u32::MAX,
            ..config()
        };
        let mut s = McastSender::new_catch_up(cfg, us(0)).unwrap();
        assert!(s.add_receiver(4));
        assert_eq!(drain(&mut s, us(0)), []);
        assert!(events(&mut s).is_empty());
        nack(&mut s, us(0), 4, &rs(&[(2, 2), (8, 1)]));
        s.handle_timeout(s.poll_timeout().unwrap());
        let mut got = Vec::new();
        while got.len() < 3 {
            let now = s.poll_timeout().unwrap();
            got.extend(drain(&mut s, now));
        }
        let blocks: Vec<(u32, Dest, Kind)> =
            got.iter().map(|b| (b.block, b.dest, b.kind)).collect();
        assert_eq!(
            blocks,
            [
                (2, Dest::Unicast(4), Kind::Repair),
                (3, Dest::Unicast(4), Kind::Repair),
                (8, Dest::Unicast(4), Kind::Repair)
            ]
        );
        assert_eq!(s.stats().first_pass_blocks, 0);
        s.receiver_done(4, true);
        assert_eq!(
            events(&mut s),
            [
                SenderEvent::Completed(4),
                SenderEvent::Finished {
                    completed: vec![4],
                    unfinished: vec![]
                }
            ]
        );
    }

    #[test]
    fn first_pass_is_paced_in_order() {
        let mut s = McastSender::new(config(), us(0)).unwrap();
        let mut sent = Vec::new();
        let mut now = us(0);
        for i in 0..10 {
            let got = drain(&mut s, now);
            assert_eq!(got.len(), 1, "one datagram per ms at {now:?}");
            assert_eq!(now, us(i * 1000));
            sent.extend(got);
            if i < 9 {
                now = s.poll_timeout().unwrap();
            }
        }
        let blocks: Vec<u32> = sent.iter().map(|b| b.block).collect();
        assert_eq!(blocks, (0..10).collect::<Vec<_>>());
        assert!(sent
            .iter()
            .all(|b| b.dest == Dest::Group && b.kind == Kind::Data));
        // 1020 bytes at 1,020,000 B/s: exactly 1 ms apart; the tenth left at 9 ms.
        assert_eq!(s.stats().bytes, 10 * 1020);
        // No receivers: nobody to wait for.
        assert_eq!(
            events(&mut s),
            [
                SenderEvent::FirstPassDone,
                SenderEvent::Finished {
                    completed: vec![],
                    unfinished: vec![]
                }
            ]
        );
    }

    #[test]
    fn threshold_splits_multicast_and_unicast() {
        let mut s = McastSender::new(config(), us(0)).unwrap();
        for d in [1, 2, 3] {
            s.add_receiver(d);
        }
        let t = first_pass(&mut s);
        nack(&mut s, t, 1, &rs(&[(2, 2)]));
        nack(&mut s, t, 2, &rs(&[(3, 1), (7, 1)]));
        nack(&mut s, t, 3, &rs(&[(3, 1)]));
        let mut now = t + Duration::from_millis(50);
        s.handle_timeout(now);
        let mut sent = Vec::new();
        while sent.len() < 3 {
            sent.extend(drain(&mut s, now));
            now = s.poll_timeout().unwrap();
        }
        assert_eq!(
            sent,
            [
                SendBlock {
                    block: 3,
                    dest: Dest::Group,
                    kind: Kind::Data
                },
                SendBlock {
                    block: 2,
                    dest: Dest::Unicast(1),
                    kind: Kind::Repair
                },
                SendBlock {
                    block: 7,
                    dest: Dest::Unicast(2),
                    kind: Kind::Repair
                },
            ]
        );
        assert_eq!(s.stats().multicast_repairs, 1);
        assert_eq!(s.stats().unicast_repairs, 2);
    }

    #[test]
    fn repeated_nacks_and_joins_count_once() {
        let mut s = McastSender::new(config(), us(0)).unwrap();
        assert!(s.add_receiver(1));
        assert!(!s.add_receiver(1));
        s.add_receiver(2);
        let t = first_pass(&mut s);
        // Device 1 NACKs block 4 three times (e.g. a repeated join re-sent it): with a
        // threshold of 2 it must still be a unicast, not a multicast.
        for _ in 0..3 {
            nack(&mut s, t, 1, &rs(&[(4, 1)]));
        }
        s.handle_timeout(t + Duration::from_millis(50));
        let sent = drain(&mut s, t + Duration::from_millis(50));
        assert_eq!(
            sent,
            [SendBlock {
                block: 4,
                dest: Dest::Unicast(1),
                kind: Kind::Repair
            }]
        );
    }

    #[test]
    fn demotes_lossy_and_chatty_devices_and_finishes_honestly() {
        let mut s = McastSender::new(
            SenderConfig {
                max_nacks_per_round: 2,
                demote_after_rounds: 3,
                ..config()
            },
            us(0),
        )
        .unwrap();
        for d in [1, 2, 3] {
            s.add_receiver(d);
        }
        let mut t = first_pass(&mut s);
        events(&mut s);
        // Device 1 misses 5 of 10 blocks (> 20%) for 3 rounds.
        for round in 0..3 {
            nack(&mut s, t, 1, &rs(&[(0, 5)]));
            t += Duration::from_millis(50);
            s.handle_timeout(t);
            let ev = events(&mut s);
            assert_eq!(ev.contains(&SenderEvent::Demoted(1)), round == 2, "{ev:?}");
            t += Duration::from_millis(10);
            drain(&mut s, t);
        }
        // Device 2 asks three times in one round.
        for _ in 0..3 {
            nack(&mut s, t, 2, &rs(&[(9, 1)]));
        }
        assert_eq!(events(&mut s), [SenderEvent::Demoted(2)]);
        s.receiver_done(3, true);
        // Everything pending is drained; 1 and 2 never reported: they are unfinished.
        t += Duration::from_millis(100);
        s.handle_timeout(t);
        drain(&mut s, t);
        assert_eq!(
            events(&mut s),
            [
                SenderEvent::Completed(3),
                SenderEvent::Finished {
                    completed: vec![3],
                    unfinished: vec![1, 2]
                }
            ]
        );
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.poll_transmit(t), None);
    }

    #[test]
    fn truncated_nack_is_extrapolated_for_demotion() {
        // 1000 blocks; NACKs capped at 4 ranges. Device 1 lists 4 single blocks within the
        // first 16 (25% dense): estimated 250 missing > 20%, demoted. Device 2 lists 3 ranges
        // (not truncated) naming 3 blocks: 0.3%, kept.
        let cfg = SenderConfig {
            file_size: 1_000_000,
            nack_ranges_cap: 4,
            ..config()
        };
        let mut s = McastSender::new(cfg, us(0)).unwrap();
        s.add_receiver(1);
        s.add_receiver(2);
        let t = first_pass(&mut s);
        events(&mut s);
        s.add_receiver(3);
        nack(&mut s, t, 1, &rs(&[(1, 1), (5, 1), (9, 1), (15, 1)]));
        nack(&mut s, t, 2, &rs(&[(1, 1), (5, 1), (9, 1)]));
        // Device 3 has everything below 600 (repaired already): 25% dense over 600..616,
        // extrapolated over the 384 blocks left, about 100 missing: 10%, kept.
        nack(&mut s, t, 3, &rs(&[(600, 1), (605, 1), (609, 1), (615, 1)]));
        s.handle_timeout(t + Duration::from_millis(50));
        assert_eq!(events(&mut s), [SenderEvent::Demoted(1)]);
        // Device 2's three blocks: 1, 5 and 9 (device 1's requests were dropped with it).
        let sent: Vec<u32> = drain(&mut s, t + Duration::from_millis(50))
            .iter()
            .map(|b| b.block)
            .collect();
        assert_eq!(sent, [1]);
        assert_eq!(s.unicast.get(&2).map(|q| q.remaining().blocks()), Some(2));
    }

    #[test]
    fn a_lagging_fec_receiver_is_judged_by_the_groups_its_nack_reaches() {
        // 2000 blocks in groups of 100; the pass has sent 1000. Device 1's NACK reaches only
        // group 1 (its view lags the pass) and misses 30 of its 100 blocks: 30% of what it
        // speaks for, though 3% of all sent. Device 2 misses 5 of group 1: kept.
        let cfg = SenderConfig {
            file_size: 2_000_000,
            fec_group: 100,
            fec_parity: 100,
            nack_ranges_cap: 128,
            ..config()
        };
        let mut s = McastSender::new(cfg, us(0)).unwrap();
        s.add_receiver(1);
        s.add_receiver(2);
        let mut now = first_pass_to(&mut s, 1000);
        let gaps = |n: u32| {
            let mut r = Ranges::new();
            for b in (100..200).step_by(100 / n as usize).take(n as usize) {
                r.push(b, 1).unwrap();
            }
            r
        };
        nack(&mut s, now, 1, &gaps(30));
        nack(&mut s, now, 2, &gaps(5));
        now += Duration::from_millis(50);
        s.handle_timeout(now);
        let ev = events(&mut s);
        assert!(ev.contains(&SenderEvent::Demoted(1)), "{ev:?}");
        assert!(!ev.contains(&SenderEvent::Demoted(2)), "{ev:?}");
    }

    #[test]
    fn a_lossy_device_is_demoted_during_the_first_pass() {
        // 2000 blocks, demotion above 20% after 2 rounds. Halfway through the first pass,
        // device 1 misses every third block sent so far (33%), device 2 every twentieth (5%).
        let cfg = SenderConfig {
            file_size: 2_000_000,
            demote_after_rounds: 2,
            nack_ranges_cap: 128,
            ..config()
        };
        let mut s = McastSender::new(cfg, us(0)).unwrap();
        s.add_receiver(1);
        s.add_receiver(2);
        let mut now = first_pass_to(&mut s, 1000);
        let every = |k: u32| {
            let mut r = Ranges::new();
            for b in (0..1000).step_by(k as usize).take(128) {
                r.push(b, 1).unwrap();
            }
            r
        };
        for round in 0..2 {
            nack(&mut s, now, 1, &every(3));
            nack(&mut s, now, 2, &every(20));
            now += Duration::from_millis(50);
            s.handle_timeout(now);
            let ev = events(&mut s);
            assert_eq!(ev.contains(&SenderEvent::Demoted(1)), round == 1, "{ev:?}");
            assert!(!ev.contains(&SenderEvent::Demoted(2)), "{ev:?}");
        }
        assert!(!s.first_pass_done());
    }

    /// Devices 1 and 2 miss the same third of what the first pass sent; device 1's socket
    /// overflowed and it said so (its drops account for its losses), and so did device 3's
    /// (most of the fleet overflowed), while device 2's link loses them. Only device 2 is
    /// demoted: device 1's losses are the sender's rate, which pacing cuts, not a device too
    /// slow for the group.
    #[test]
    fn losses_a_receivers_overflow_reports_account_for_do_not_demote_it() {
        let cfg = SenderConfig {
            file_size: 2_000_000,
            demote_after_rounds: 2,
            nack_ranges_cap: 128,
            ..config()
        };
        let mut s = McastSender::new(cfg, us(0)).unwrap();
        for d in 1..=3 {
            s.add_receiver(d);
        }
        let mut now = first_pass_to(&mut s, 1000);
        for (dev, drops) in [(1, 400), (3, 20)] {
            let o = crate::Overflow {
                session: s.config.session,
                device_id: dev,
                drops,
            };
            let mut buf = Vec::new();
            crate::msg::Message::Overflow(o)
                .emit_to_vec(&mut buf)
                .unwrap();
            let frame = crate::header::Frame::parse_datagram(&buf).unwrap();
            assert_eq!(
                s.handle_overflow(now, &frame, &o, &NoMac),
                NackVerdict::Accepted
            );
        }
        let mut third = Ranges::new();
        for b in (0..1000).step_by(3).take(128) {
            third.push(b, 1).unwrap();
        }
        for round in 0..2 {
            nack(&mut s, now, 1, &third);
            nack(&mut s, now, 2, &third);
            now += Duration::from_millis(50);
            s.handle_timeout(now);
            let ev = events(&mut s);
            assert_eq!(ev.contains(&SenderEvent::Demoted(2)), round == 1, "{ev:?}");
            assert!(!ev.contains(&SenderEvent::Demoted(1)), "{ev:?}");
        }
        assert_eq!(
            s.stats().demotions_withheld,
            2,
            "one per round over the bar"
        );
        assert_eq!(s.stats().demoted, 1);
    }

    #[test]
    fn a_device_costing_too_many_unicast_repairs_is_demoted() {
        // 2000 blocks at 1 block/ms, burst 1. Device 1 NACKs a fresh third of every stretch
        // the first pass has sent and gets it repaired (the estimate stays small because
        // repairs keep up); once its unicast repairs exceed 20% of the blocks sent, it goes.
        let cfg = SenderConfig {
            file_size: 2_000_000,
            repair_share_permille: 1000,
            ..config()
        };
        let mut s = McastSender::new(cfg, us(0)).unwrap();
        s.add_receiver(1);
        s.add_receiver(2);
        let mut now = us(0);
        let mut demoted_at = None;
        let mut asked = 0u32;
        while !s.first_pass_done() && demoted_at.is_none() {
            drain(&mut s, now);
            let sent = s.next_first;
            if sent >= asked + 60 {
                let mut r = Ranges::new();
                for b in (asked..sent).step_by(3) {
                    r.push(b, 1).unwrap();
                }
                asked = sent;
                nack(&mut s, now, 1, &r);
            }
            now = s.poll_timeout().unwrap();
            s.handle_timeout(now);
            if events(&mut s).contains(&SenderEvent::Demoted(1)) {
                demoted_at = Some(s.next_first);
            }
        }
        let at = demoted_at
            .unwrap_or_else(|| panic!("not demoted: {:?} next={}", s.stats(), s.next_first));
        assert!((256..400).contains(&at), "demoted after {at} blocks");
        assert_eq!(s.stats().demoted, 1);
    }

    #[test]
    fn idle_timeout_lists_silent_receivers_as_unfinished() {
        let mut s = McastSender::new(config(), us(0)).unwrap();
        s.add_receiver(5);
        let t = first_pass(&mut s);
        drain(&mut s, t);
        let idle = s.poll_timeout().unwrap();
        assert!(idle >= t + Duration::from_secs(5));
        s.handle_timeout(idle);
        let ev = events(&mut s);
        assert_eq!(
            ev.last(),
            Some(&SenderEvent::Finished {
                completed: vec![],
                unfinished: vec![5]
            })
        );
    }

    #[test]
    fn repairs_get_at_most_their_share_during_the_first_pass() {
        let cfg = SenderConfig {
            file_size: 1000 * 1000,
            multicast_threshold: 1,
            ..config()
        };
        let mut s = McastSender::new(cfg, us(0)).unwrap();
        s.add_receiver(1);
        let mut now = us(0);
        let mut nacked = false;
        // Bounded: 2000 wake-ups, 400 sends.
        for _ in 0..2000 {
            s.handle_timeout(now);
            let sent = drain(&mut s, now).len();
            if !nacked && s.stats().first_pass_blocks >= 100 {
                // 100 blocks in, the device misses all of them.
                nack(&mut s, now, 1, &rs(&[(0, 100)]));
                nacked = true;
            }
            let st = s.stats();
            if st.first_pass_blocks + st.multicast_repairs >= 400 {
                break;
            }
            let next = s.poll_timeout().unwrap();
            assert!(
                next > now || sent > 0,
                "timer at {next:?} does not advance from {now:?}"
            );
            now = next.max(now);
        }
        let st = *s.stats();
        // Repairs start after the 50 ms round; of the ~250 sends after it, 25% may be repairs.
        assert!(
            st.multicast_repairs > 40 && st.multicast_repairs <= 70,
            "{st:?}"
        );
        assert_eq!(st.first_pass_blocks + st.multicast_repairs, 400, "{st:?}");
    }

    /// 40 blocks in groups of 10 with 4 parity symbols per group, one datagram per ms.
    fn fec_config() -> SenderConfig {
        SenderConfig {
            file_size: 40_000,
            fec_group: 10,
            fec_parity: 4,
            ..config()
        }
    }

    fn drain_all(s: &mut McastSender, now: Instant) -> Vec<Transmit> {
        core::iter::from_fn(|| s.poll_send(now)).collect()
    }

    /// Sends everything due, advancing to each pacing deadline, until `n` datagrams left.
    fn send_n(s: &mut McastSender, mut now: Instant, n: usize) -> (Instant, Vec<Transmit>) {
        let mut out = Vec::new();
        for _ in 0..10 * n + 10 {
            out.extend(drain_all(s, now));
            if out.len() >= n {
                break;
            }
            now = s.poll_timeout().unwrap();
            s.handle_timeout(now);
        }
        (now, out)
    }

    #[test]
    fn fec_round_sends_fresh_parity_credits_it_and_unicasts_stragglers() {
        let mut s = McastSender::new(fec_config(), us(0)).unwrap();
        for d in [1, 2, 3] {
            s.add_receiver(d);
        }
        let (t, first) = send_n(&mut s, us(0), 40);
        assert_eq!(first.len(), 40);
        // Group 1 (10..20): three devices miss different blocks, at most 2 each: 2 + 1 parity.
        nack(&mut s, t, 1, &rs(&[(11, 1)]));
        nack(&mut s, t, 2, &rs(&[(12, 2)]));
        nack(&mut s, t, 3, &rs(&[(15, 1), (31, 1)]));
        let t = t + Duration::from_millis(50);
        s.handle_timeout(t);
        let (t, sent) = send_n(&mut s, t, 4);
        let parity: Vec<(u32, u16)> = sent
            .iter()
            .filter_map(|x| match x {
                Transmit::Parity(p) => Some((p.group, p.index)),
                Transmit::Block(_) => None,
            })
            .collect();
        assert_eq!(parity, [(1, 0), (1, 1), (1, 2)]);
        let Transmit::Parity(p) = sent[0] else {
            panic!("parity first")
        };
        assert_eq!(
            (p.first_block, p.blocks, p.group_size, p.parity_count),
            (10, 10, 10, 4)
        );
        // Group 3: device 3 alone: its block by unicast.
        assert!(sent.contains(&Transmit::Block(SendBlock {
            block: 31,
            dest: Dest::Unicast(3),
            kind: Kind::Repair
        })));
        assert_eq!(s.stats().parity_symbols, 3);
        // A NACK sent before the parity arrived is credited with it (within the hold-off):
        // nothing more goes out for group 1.
        nack(&mut s, t, 2, &rs(&[(12, 2)]));
        let t2 = t + Duration::from_millis(50);
        s.handle_timeout(t2);
        assert!(drain_all(&mut s, t2).is_empty());
        // After the hold-off two devices still lack blocks: 2 + 1 more symbols would exceed the
        // one fresh symbol left (4 - 3), so the union is re-multicast instead.
        let t3 = t2 + Duration::from_millis(100);
        nack(&mut s, t3, 1, &rs(&[(11, 1)]));
        nack(&mut s, t3, 2, &rs(&[(12, 2)]));
        s.handle_timeout(t3 + Duration::from_millis(50));
        let (_, sent) = send_n(&mut s, t3 + Duration::from_millis(50), 3);
        let blocks: Vec<u32> = sent
            .iter()
            .map(|x| match x {
                Transmit::Block(b) => {
                    assert_eq!(b.dest, Dest::Group);
                    b.block
                }
                Transmit::Parity(p) => panic!("no fresh parity left: {p:?}"),
            })
            .collect();
        assert_eq!(blocks, [11, 12, 13]);
    }

    #[test]
    fn the_parity_a_device_alone_needs_counts_towards_its_demotion() {
        // 500 blocks in groups of 100. Each round device 1 misses 25 blocks of a new group
        // (5% of the file: under the 20% bar), devices 2 and 3 one each: parity is sized to
        // device 1, and 24 symbols a round are its own cost. After five rounds that is 120
        // blocks, over 20% of the file: its next NACK demotes it; the others stay.
        let cfg = SenderConfig {
            file_size: 500_000,
            fec_group: 100,
            fec_parity: 100,
            ..config()
        };
        let mut s = McastSender::new(cfg, us(0)).unwrap();
        for d in [1, 2, 3] {
            s.add_receiver(d);
        }
        let (mut t, first) = send_n(&mut s, us(0), 500);
        assert_eq!(first.len(), 500);
        let mut demoted = Vec::new();
        for round in 0..6u32 {
            let g = round % 5 * 100;
            nack(&mut s, t, 1, &rs(&[(g, 25)]));
            nack(&mut s, t, 2, &rs(&[(g + 50, 1)]));
            nack(&mut s, t, 3, &rs(&[(g + 60, 1)]));
            t += Duration::from_millis(50);
            s.handle_timeout(t);
            demoted.extend(events(&mut s).into_iter().filter_map(|e| match e {
                SenderEvent::Demoted(d) => Some((round, d)),
                _ => None,
            }));
            if round < 5 {
                let (t2, _) = send_n(&mut s, t, 26);
                t = t2 + Duration::from_millis(200);
            }
        }
        assert_eq!(demoted, [(5, 1)], "{:?}", s.stats());
        assert!(s.stats().parity_symbols >= 5 * 26, "{:?}", s.stats());
    }

    #[test]
    fn fec_parity_waits_for_the_whole_group_and_bad_fec_config_is_refused() {
        let mut s = McastSender::new(fec_config(), us(0)).unwrap();
        s.add_receiver(1);
        s.add_receiver(2);
        // 15 blocks out (group 1 half sent): NACKs for 3 and 12 from two devices.
        let (t, _) = send_n(&mut s, us(0), 15);
        nack(&mut s, t, 1, &rs(&[(3, 1), (12, 1)]));
        nack(&mut s, t, 2, &rs(&[(4, 1), (13, 1)]));
        s.handle_timeout(t + Duration::from_millis(50));
        // The rest of the first pass and the repairs.
        let (_, sent) = send_n(&mut s, t + Duration::from_millis(50), 25 + 2);
        let parity: Vec<u32> = sent
            .iter()
            .filter_map(|x| match x {
                Transmit::Parity(p) => Some(p.group),
                Transmit::Block(_) => None,
            })
            .collect();
        // Group 0: 1 + 1 symbols (union 2 <= 2: re-multicast is as cheap). Group 1 untouched.
        assert!(parity.is_empty(), "{sent:?}");
        assert_eq!(s.stats().multicast_repairs, 2);
        for bad in [
            SenderConfig {
                fec_parity: 0,
                ..fec_config()
            },
            SenderConfig {
                fec_group: 40_000,
                ..fec_config()
            },
            SenderConfig {
                block_size: super::super::MAX_BLOCK_SIZE,
                file_size: 1 << 20,
                ..fec_config()
            },
        ] {
            assert_eq!(McastSender::new(bad, us(0)).unwrap_err(), ConfigError::Fec);
        }
        let ok = SenderConfig::new(1, 1 << 20, 1024, 1 << 20).with_fec(1024);
        assert_eq!((ok.fec_group, ok.fec_parity), (1024, 256));
    }

    #[test]
    fn rejects_bad_config() {
        let bad = SenderConfig {
            rate: 0,
            ..config()
        };
        assert_eq!(
            McastSender::new(bad, us(0)).unwrap_err(),
            ConfigError::ZeroRate
        );
        let bad = SenderConfig {
            block_size: 0,
            ..config()
        };
        assert_eq!(
            McastSender::new(bad, us(0)).unwrap_err(),
            ConfigError::BlockSize
        );
        let mut empty = McastSender::new(
            SenderConfig {
                file_size: 0,
                ..config()
            },
            us(0),
        )
        .unwrap();
        assert_eq!(events(&mut empty), [SenderEvent::FirstPassDone]);
        empty.handle_timeout(us(0));
        assert!(empty.is_finished());
    }
}
