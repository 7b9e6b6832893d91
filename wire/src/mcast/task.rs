//! The distribution policy of one task: [`McastTask`], a sans-IO core that owns the task's
//! group [`McastSender`] and its unicast catch-up senders, and decides when the multicast
//! starts, who is handed off to catch-up, and when the task is over. The gateway drives one
//! per live task (`daemon/src/distribution.rs`); a relay or the simulator drives the same core.
//!
//! # Policy
//! - **Trigger gate** ([`Trigger`]): nothing is sent before a scheduled delay from the task's
//!   creation; then, if a quorum is set, until that many receivers reported joining
//!   ([`McastTask::handle_ready`]) or the deadline passed; without a quorum the first pass
//!   starts after [`TaskConfig::warmup`] (so the receivers have joined the group: blocks sent
//!   earlier would all be repaired). The gate is looked at from the first call *after* the
//!   creating instant (the creating call's clock reading predates the file hash and the task
//!   commit, which would eat the warm-up before any announce left).
//! - **Joining**: an announced device ([`McastTask::handle_announce`]) joins the multicast
//!   while its first pass runs; after that (or in a task created with no group, only to catch
//!   devices up) it gets a catch-up sender of its own.
//! - **Demotion hand-off**: the group sender demotes a receiver missing more than a fifth of
//!   the file two rounds running after the first pass; the task then starts a catch-up sender
//!   for it that inherits its NACK key, sequence, address and spent repair budget, so the
//!   group's repairs stop waiting for it.
//! - **Shared catch-up budget**: every catch-up sender of every task draws from one
//!   [`CatchUpBudget`] (a token bucket in bytes), on top of its own pacing: [`CATCH_UP_RATE`]
//!   when no multicast first pass runs anywhere, a quarter of it while one does, so catch-up
//!   never starves a group. The budget spans tasks, so it is a small object the *driver* owns
//!   and lends to the task it drives ([`McastTask::poll_transmit`]): the core stays free of
//!   shared state (no `Rc`, no locks), and the driver decides its scope (one per gateway
//!   socket; one per relay; one per simulated group).
//! - **Linger and end of task**: every sender finishes when all its receivers reported, or
//!   after [`TaskConfig::linger`] without traffic; a catch-up sender that finished is
//!   dropped ([`TaskEvent::CatchUpFinished`]); the task is over ([`McastTask::is_over`]) when
//!   its group sender (if any) has finished and no catch-up sender is left.
//!
//! # Driving contract
//! - Time is an input and must be monotonic across calls to one task.
//! - Inputs: [`McastTask::handle_announce`], [`McastTask::handle_ready`],
//!   [`McastTask::handle_done`], [`McastTask::handle_nack`] (then drain
//!   [`McastTask::poll_probe`]) and [`McastTask::handle_timeout`] (when the instant from
//!   `poll_timeout` has been reached; calling it early is harmless).
//! - **After every one of those calls**, in this order:
//!   1. drain [`McastTask::poll_transmit`] until `None` (or until the socket refuses more: keep
//!      the refused datagrams and send them first next time; the core has counted them sent);
//!   2. drain [`McastTask::poll_event`] until `None` (this is also where demoted receivers are
//!      handed to their catch-up sender and finished catch-up senders are dropped);
//!   3. re-arm the task's one timer from [`McastTask::poll_timeout`], and if
//!      [`McastTask::is_over`], drop the task.
//! - The [`CatchUpBudget`] is refilled by the driver once per turn
//!   ([`CatchUpBudget::refill`]), told whether any of its tasks' first passes runs
//!   ([`McastTask::group_running`]).
//!
//! # Timers (all folded into [`McastTask::poll_timeout`])
//! | timer | armed | fires |
//! |---|---|---|
//! | gate look | not started | the creating instant (look again at once), the scheduled start, the quorum deadline |
//! | warm-up | gate open, no quorum | [`TaskConfig::warmup`] after the gate opened |
//! | group sender | started | next paced send, round close, linger ([`McastSender::poll_timeout`]) |
//! | catch-up senders | started | the earliest of theirs; no sooner than 1 ms while the shared budget is short |

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;
use core::net::{IpAddr, SocketAddr};
use core::ops::Bound;
use core::time::Duration;

use super::{
    ConfigError, McastSender, NackMac, NackVerdict, SenderConfig, SenderEvent, SenderStats,
    Transmit,
};
use crate::data::DATA_PREFIX_LEN;
use crate::header::{Frame, TAG_LEN};
use crate::msg::{Nack, Overflow};
use crate::time::Instant;

/// Rate of unicast catch-up, all catch-up senders together (bytes per second), when no
/// multicast first pass runs; a quarter of it while one does, so catch-up never starves a
/// group. Also the rate of a task created only for catch-up.
pub const CATCH_UP_RATE: u64 = 25_000_000;
/// Depth of the shared catch-up bucket, in bytes.
pub const CATCH_UP_BURST: u64 = 96 * 1024;
/// Aggregation round of a catch-up sender: one device asks, so there is nothing to wait for.
const CATCH_UP_ROUND: Duration = Duration::from_millis(2);
/// Below this many bytes in the shared bucket a catch-up sender is looked at again only after
/// a millisecond (the bucket earns about 6 KB a millisecond at a quarter rate).
const THROTTLED_BELOW: u64 = 2048;
/// Most file bytes in one FEC group: bounds what a receiver reads back to rebuild one
/// (512 jumbo blocks would be 4.5 MB).
pub const FEC_GROUP_BYTES: u32 = 1 << 20;

/// The shared token bucket of every catch-up sender a driver runs (see the module docs).
#[derive(Debug, Clone)]
pub struct CatchUpBudget {
    tokens: u64,
    at: Instant,
}

impl Default for CatchUpBudget {
    fn default() -> Self {
        CatchUpBudget {
            tokens: CATCH_UP_BURST,
            at: Instant::ZERO,
        }
    }
}

impl CatchUpBudget {
    /// A full bucket.
    pub fn new() -> Self {
        Self::default()
    }

    /// Refills for the time since the last refill: [`CATCH_UP_RATE`], a quarter of it while
    /// `first_pass_running` (any multicast first pass of the driver's tasks runs).
    pub fn refill(&mut self, now: Instant, first_pass_running: bool) {
        let rate = if first_pass_running {
            CATCH_UP_RATE / 4
        } else {
            CATCH_UP_RATE
        };
        let us = (now - self.at).as_micros() as u64;
        self.at = self.at.max(now);
        let add = u64::try_from(u128::from(us) * u128::from(rate) / 1_000_000).unwrap_or(u64::MAX);
        self.tokens = self.tokens.saturating_add(add).min(CATCH_UP_BURST);
    }

    /// Bytes in the bucket.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Whether a catch-up sender should wait a millisecond before it is looked at again.
    pub fn throttled(&self) -> bool {
        self.tokens < THROTTLED_BELOW
    }
}

/// When a task's first pass may start (the push's trigger). The default starts at once,
/// after the warm-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trigger {
    /// From the task's creation.
    pub delay: Duration,
    /// (receivers, deadline from creation): start when that many joined, or at the deadline.
    pub quorum: Option<(usize, Duration)>,
}

/// The set-up of one task.
#[derive(Debug, Clone, Copy)]
pub struct TaskConfig {
    /// Session id carried in every datagram.
    pub session: u32,
    /// File size in bytes.
    pub file_size: u64,
    /// Bytes per block.
    pub block_size: u32,
    /// Rate ceiling of the group sender, datagram bytes per second.
    pub rate: u64,
    /// How long a sender with nothing to do waits for receivers that have not reported.
    pub linger: Duration,
    /// Delay between the gate opening (without a quorum) and the first block.
    pub warmup: Duration,
    /// FEC group size in blocks; 0: repair by re-multicast and unicast only.
    pub fec_group: u32,
    /// When the first pass starts.
    pub trigger: Trigger,
    /// Key of the probe cookies (the driver's secret).
    pub probe_key: [u8; 32],
}

impl TaskConfig {
    /// The group sender's configuration: the task's geometry and rate, with the policy's
    /// pacing, FEC and demotion settings.
    pub fn group_sender(&self) -> SenderConfig {
        let bs = self.block_size;
        let mut cfg = SenderConfig::new(self.session, self.file_size, bs, self.rate);
        if self.fec_group > 0 {
            // Parity over groups of `fec_group` blocks heals different losses at different
            // receivers at once ("Repair at scale" in docs/performance.md). A group holds at
            // most FEC_GROUP_BYTES. Measured with 4 receivers at MTU 9000, the cap did not
            // change the repair overhead (1.44 / 1.59 B/B at 1 / 5% with it, 1.43 / 1.75
            // without): those runs are limited by overrun receivers, not rebuilds.
            let k = self.fec_group.min((FEC_GROUP_BYTES / bs.max(1)).max(32));
            cfg = cfg.with_fec(k);
        }
        // A driver wakes at millisecond granularity (and a little later): the bucket holds
        // about 2 ms of the rate so one wake-up can send what a millisecond earned, between 8
        // and 256 datagrams.
        let datagram = DATA_PREFIX_LEN as u64 + u64::from(bs) + TAG_LEN as u64;
        cfg.burst = (self.rate / 500 / datagram.max(1)).clamp(8, 256) as u32;
        // A receiver missing more than a fifth of the file after the first pass, two rounds
        // running, is demoted to its own unicast catch-up sender: the group's repairs stop
        // waiting for it. The NACK-rate demotion is off: a loop stalled for a few rounds
        // reads several NACKs of one device at once and would demote it for our delay, not
        // its behaviour.
        cfg.demote_missing_percent = 20;
        cfg.demote_after_rounds = 2;
        cfg.max_nacks_per_round = u32::MAX;
        cfg.idle_timeout = self.linger;
        cfg
    }

    /// Rate of this task's catch-up senders.
    fn catch_up_rate(&self) -> u64 {
        self.rate.min(CATCH_UP_RATE)
    }
}

/// What a task reports to its driver (logs, the task table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    /// A non-default trigger opened: the multicast starts.
    TriggerFired {
        /// Receivers that had reported joining.
        ready: usize,
    },
    /// The group's first pass is over, `elapsed` after it started.
    FirstPassDone {
        /// From the start of the first pass.
        elapsed: Duration,
    },
    /// A receiver was demoted from the group and handed to a catch-up sender of its own.
    Demoted(u64),
    /// A catch-up sender could not be started (the core refused its configuration).
    CatchUpRefused {
        /// The device.
        device: u64,
        /// Why.
        error: ConfigError,
    },
    /// A device's catch-up sender finished and was dropped.
    CatchUpFinished {
        /// The device.
        device: u64,
        /// Whether it reported a verified copy.
        verified: bool,
        /// Blocks unicast to it.
        repairs: u64,
    },
    /// The group sender finished (emitted once; catch-up senders may still run).
    Finished {
        /// Devices that reported a verified copy to the group.
        completed: Vec<u64>,
        /// Every other device of the group.
        unfinished: Vec<u64>,
        /// The group sender's counters.
        stats: SenderStats,
    },
}

/// One task's distribution policy. See the [module docs](self).
#[derive(Debug)]
pub struct McastTask {
    cfg: TaskConfig,
    /// The multicast sender (first pass and group repairs); `None` for a task created only to
    /// catch devices up.
    group: Option<McastSender>,
    /// Unicast catch-up senders, one per device demoted from the group or arriving after its
    /// first pass. Their NACKs go here, not to `group`.
    catch_up: BTreeMap<u64, McastSender>,
    /// The catch-up sender served last (round-robin across calls).
    cursor: u64,
    /// Counters of this task's catch-up senders that have ended.
    catch_up_done: SenderStats,
    created: Instant,
    now: Instant,
    /// Nothing is sent before this instant; set when the gate opens.
    start_at: Option<Instant>,
    /// Devices that reported joining (for a quorum).
    ready: BTreeSet<u64>,
    /// The device whose sender took the last NACK (its probes are drained next).
    probing: Option<u64>,
    events: VecDeque<TaskEvent>,
}

impl McastTask {
    /// A task created at `now` whose group multicasts to `targets` (every target is a
    /// receiver, offline ones too: the group sender stays alive until they report or the
    /// linger passes without traffic).
    ///
    /// With no target, no quorum and no scheduled delay there is no one for a first pass to
    /// reach, nor any wait for one to join (a push that follows an empty group): the task
    /// starts catch-up only, and the devices that join the group later are caught up by
    /// unicast instead of a whole file multicast to nobody.
    pub fn new(cfg: TaskConfig, targets: &[u64], now: Instant) -> Result<Self, ConfigError> {
        // The geometry is checked either way.
        let mut sender = McastSender::new(cfg.group_sender(), now)?;
        if targets.is_empty() && cfg.trigger == Trigger::default() {
            return Ok(Self::catch_up_only(cfg, now));
        }
        sender.set_probe_key(cfg.probe_key);
        for &t in targets {
            sender.add_receiver(t);
        }
        let mut task = Self::catch_up_only(cfg, now);
        task.group = Some(sender);
        Ok(task)
    }

    /// A task created at `now` with no multicast: it only catches announced devices up
    /// (a task re-created from the task table after its group sender was gone).
    pub fn catch_up_only(cfg: TaskConfig, now: Instant) -> Self {
        McastTask {
            cfg,
            group: None,
            catch_up: BTreeMap::new(),
            cursor: 0,
            catch_up_done: SenderStats::default(),
            created: now,
            now,
            start_at: None,
            ready: BTreeSet::new(),
            probing: None,
            events: VecDeque::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &TaskConfig {
        &self.cfg
    }

    /// Blocks in the file (0 for a catch-up-only task).
    pub fn n_blocks(&self) -> u32 {
        self.group.as_ref().map_or(0, McastSender::n_blocks)
    }

    /// The group sender, if any.
    pub fn group(&self) -> Option<&McastSender> {
        self.group.as_ref()
    }

    /// `device`'s catch-up sender, if it has one.
    pub fn catch_up(&self, device: u64) -> Option<&McastSender> {
        self.catch_up.get(&device)
    }

    /// Live catch-up senders.
    pub fn catch_up_count(&self) -> usize {
        self.catch_up.len()
    }

    /// The group sender's counters (zero for a catch-up-only task).
    pub fn stats(&self) -> SenderStats {
        self.group.as_ref().map(|g| *g.stats()).unwrap_or_default()
    }

    /// Counters of every catch-up sender of this task, live and ended (bytes, unicast
    /// repairs, NACKs and ignored NACKs).
    pub fn catch_up_stats(&self) -> SenderStats {
        let mut t = self.catch_up_done;
        for c in self.catch_up.values() {
            add_catch_up(&mut t, c.stats());
        }
        t
    }

    /// Whether the multicast first pass still runs.
    pub fn group_running(&self) -> bool {
        self.group
            .as_ref()
            .is_some_and(|g| !g.is_finished() && !g.first_pass_done())
    }

    /// Whether the first pass has started (the gate opened and the warm-up passed) at `now`.
    pub fn started(&self, now: Instant) -> bool {
        self.start_at.is_some_and(|t| now >= t)
    }

    /// Whether nothing is left to do: drop the task.
    pub fn is_over(&self) -> bool {
        self.group.as_ref().is_none_or(McastSender::is_finished) && self.catch_up.is_empty()
    }

    /// Where `device`'s unicast repairs go, as the sender serving it knows.
    pub fn repair_addr(&self, device: u64) -> Option<SocketAddr> {
        self.catch_up
            .get(&device)
            .or(self.group.as_ref())?
            .repair_addr(device)
    }

    /// The task was announced to `device` over a control session from `peer`, with the
    /// device's new NACK key: it joins the multicast while the first pass runs, else it is
    /// caught up by unicast. Returns whether it joined the group. A device the group sender
    /// already counts as done (it failed, or an operator cancelled it, and was then retried)
    /// is caught up by unicast too: the group takes no second word from a receiver.
    pub fn handle_announce(
        &mut self,
        now: Instant,
        device: u64,
        peer: Option<IpAddr>,
        nack_key: [u8; 32],
    ) -> bool {
        self.now = self.now.max(now);
        let joined = match self.group.as_mut() {
            Some(g) if !g.is_finished() && !g.first_pass_done() && !g.receiver_is_done(device) => {
                g.add_receiver(device);
                true
            }
            _ => false,
        };
        if !joined {
            self.start_catch_up(device);
        }
        if let Some(s) = self.sender_of(device) {
            s.bind_receiver(device, peer, Some(nack_key));
        }
        joined
    }

    /// `device` reported joining (its first transfer status): it counts towards a quorum.
    pub fn handle_ready(&mut self, device: u64) {
        self.ready.insert(device);
    }

    /// The control plane recorded `device`'s completion (`verified`: its digest matched).
    pub fn handle_done(&mut self, device: u64, verified: bool) {
        if let Some(g) = self.group.as_mut() {
            g.receiver_done(device, verified);
        }
        if let Some(c) = self.catch_up.get_mut(&device) {
            c.receiver_done(device, verified);
        }
    }

    /// A NACK datagram from `from` naming this task's session, parsed: the sender serving the
    /// device it names decides whether it counts. Drain [`McastTask::poll_probe`] after it.
    pub fn handle_nack(
        &mut self,
        now: Instant,
        from: SocketAddr,
        frame: &Frame<'_>,
        nack: &Nack,
        mac: &dyn NackMac,
    ) -> NackVerdict {
        self.now = self.now.max(now);
        self.probing = Some(nack.device_id);
        let Some(sender) = self.sender_of(nack.device_id) else {
            return NackVerdict::Inactive;
        };
        // Close a round that is due before this NACK counts in it.
        if sender.poll_timeout().is_some_and(|t| t <= now) {
            sender.handle_timeout(now);
        }
        sender.handle_nack(now, from, frame, nack, mac)
    }

    /// An [`Overflow`] datagram from `from` naming this task's session, parsed: the sender
    /// serving the device it names decides whether it moves that sender's rate
    /// ([`McastSender::handle_overflow`]).
    pub fn handle_overflow(
        &mut self,
        now: Instant,
        frame: &Frame<'_>,
        report: &Overflow,
        mac: &dyn NackMac,
    ) -> NackVerdict {
        self.now = self.now.max(now);
        let Some(sender) = self.sender_of(report.device_id) else {
            return NackVerdict::Inactive;
        };
        sender.handle_overflow(now, frame, report, mac)
    }

    /// The next address probe the last NACK asked for: appends its datagram to `buf` and
    /// returns where to send it.
    pub fn poll_probe(&mut self, mac: &dyn NackMac, buf: &mut Vec<u8>) -> Option<SocketAddr> {
        let device = self.probing?;
        let to = self.sender_of(device)?.poll_probe(mac, buf);
        if to.is_none() {
            self.probing = None;
        }
        to
    }

    /// A timer deadline passed: looks at the gate, then fires the senders' due timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        let Some(start) = self.open_gate(now) else {
            return;
        };
        if now < start {
            return;
        }
        for c in self.group.iter_mut().chain(self.catch_up.values_mut()) {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
        }
    }

    /// When the first pass starts, once the gate is open (it is looked at only after the
    /// creating instant, see the module docs).
    fn open_gate(&mut self, now: Instant) -> Option<Instant> {
        if let Some(t) = self.start_at {
            return Some(t);
        }
        if now <= self.created {
            return None;
        }
        let t = self.gate_opens(now)?;
        if self.cfg.trigger != Trigger::default() {
            self.events.push_back(TaskEvent::TriggerFired {
                ready: self.ready.len(),
            });
        }
        Some(*self.start_at.insert(t))
    }

    /// When the first pass may start, if the gate is open at `now`. Joined receivers need no
    /// warm-up; a plain or scheduled start gives the others the warm-up to join.
    fn gate_opens(&self, now: Instant) -> Option<Instant> {
        let created = self.created;
        if now < created + self.cfg.trigger.delay {
            return None;
        }
        match self.cfg.trigger.quorum {
            Some((n, _)) if self.ready.len() >= n => Some(now),
            Some((_, deadline)) if now >= created + deadline => Some(now),
            Some(_) => None,
            None => Some(now + self.cfg.warmup),
        }
    }

    /// When to look at a closed gate again (joins arrive as inputs, which drive the task).
    fn gate_wake(&self, now: Instant) -> Instant {
        let created = self.created;
        if now <= created {
            // The first instant after the creating one.
            return created + Duration::from_micros(1);
        }
        let open = created + self.cfg.trigger.delay;
        if now < open {
            return open;
        }
        match self.cfg.trigger.quorum {
            Some((_, deadline)) => (created + deadline).max(now),
            None => now,
        }
    }

    /// The next datagram to send at `now`: the group's first (first pass, repairs, parity),
    /// then the catch-up senders in turn while `budget` holds a datagram's worth. `None`
    /// before the start, or when nothing is due.
    pub fn poll_transmit(&mut self, now: Instant, budget: &mut CatchUpBudget) -> Option<Transmit> {
        self.now = self.now.max(now);
        if !self.started(now) {
            return None;
        }
        if let Some(t) = self.group.as_mut().and_then(|g| g.poll_send(now)) {
            return Some(t);
        }
        let datagram = (DATA_PREFIX_LEN + self.cfg.block_size as usize + TAG_LEN) as u64;
        if budget.tokens < datagram {
            return None;
        }
        let after = (Bound::Excluded(self.cursor), Bound::Unbounded);
        let upto = (Bound::Unbounded, Bound::Included(self.cursor));
        for range in [after, upto] {
            for (dev, c) in self.catch_up.range_mut(range) {
                if let Some(b) = c.poll_transmit(now) {
                    budget.tokens -= datagram;
                    self.cursor = *dev;
                    return Some(Transmit::Block(b));
                }
            }
        }
        None
    }

    /// The next event. Draining also applies the policy to the senders' own events: a
    /// demoted receiver gets its catch-up sender, a finished catch-up sender is dropped.
    pub fn poll_event(&mut self) -> Option<TaskEvent> {
        if self.events.is_empty() {
            self.pump();
        }
        self.events.pop_front()
    }

    /// Moves the senders' events into the task's, acting on them (only once started: before
    /// that the senders have not been driven).
    fn pump(&mut self) {
        let now = self.now;
        let Some(start) = self.start_at.filter(|t| now >= *t) else {
            return;
        };
        let mut demoted = Vec::new();
        if let Some(g) = self.group.as_mut() {
            while let Some(ev) = g.poll_event() {
                match ev {
                    SenderEvent::Finished {
                        completed,
                        unfinished,
                    } => self.events.push_back(TaskEvent::Finished {
                        completed,
                        unfinished,
                        stats: *g.stats(),
                    }),
                    SenderEvent::Demoted(dev) => {
                        self.events.push_back(TaskEvent::Demoted(dev));
                        demoted.push(dev);
                    }
                    SenderEvent::FirstPassDone => self.events.push_back(TaskEvent::FirstPassDone {
                        elapsed: now - start,
                    }),
                    SenderEvent::Completed(_) => {}
                }
            }
        }
        for dev in demoted {
            self.start_catch_up(dev);
        }
        let (events, done) = (&mut self.events, &mut self.catch_up_done);
        self.catch_up.retain(|&device, c| {
            let mut over = false;
            while let Some(ev) = c.poll_event() {
                if let SenderEvent::Finished { completed, .. } = ev {
                    events.push_back(TaskEvent::CatchUpFinished {
                        device,
                        verified: !completed.is_empty(),
                        repairs: c.stats().unicast_repairs,
                    });
                    over = true;
                }
            }
            if over {
                add_catch_up(done, c.stats());
            }
            !over
        });
    }

    /// When [`McastTask::handle_timeout`] must run next (see the timer table in the module
    /// docs); `budget` is the one [`McastTask::poll_transmit`] draws from.
    pub fn poll_timeout(&self, budget: &CatchUpBudget) -> Option<Instant> {
        let now = self.now;
        match self.start_at {
            None => return Some(self.gate_wake(now)),
            Some(t) if now < t => return Some(t),
            Some(_) => {}
        }
        let group = self.group.as_ref().and_then(McastSender::poll_timeout);
        let catch_up = self
            .catch_up
            .values()
            .filter_map(McastSender::poll_timeout)
            .min()
            .map(|t| {
                // Held back by the shared bucket: look again in a millisecond.
                if budget.throttled() {
                    t.max(now + Duration::from_millis(1))
                } else {
                    t
                }
            });
        group.into_iter().chain(catch_up).min()
    }

    /// Serves `device` by unicast catch-up from now on (idempotent).
    fn start_catch_up(&mut self, device: u64) {
        if self.catch_up.contains_key(&device) {
            return;
        }
        let c = &self.cfg;
        let mut cfg = SenderConfig::new(c.session, c.file_size, c.block_size, c.catch_up_rate());
        cfg.multicast_threshold = u32::MAX;
        cfg.round = CATCH_UP_ROUND;
        cfg.idle_timeout = c.linger;
        cfg.burst = 64;
        match McastSender::new_catch_up(cfg, self.now) {
            Ok(mut s) => {
                s.set_probe_key(c.probe_key);
                // A demoted device keeps its NACK sequence, address and spent budget.
                let auth = self.group.as_ref().and_then(|g| g.receiver_auth(device));
                s.add_receiver_with(device, auth.unwrap_or_default());
                self.catch_up.insert(device, s);
            }
            Err(error) => self
                .events
                .push_back(TaskEvent::CatchUpRefused { device, error }),
        }
    }

    /// The sender that takes `device`'s NACKs: its catch-up sender if it has one, else the
    /// group's.
    fn sender_of(&mut self, device: u64) -> Option<&mut McastSender> {
        match self.catch_up.get_mut(&device) {
            Some(c) => Some(c),
            None => self.group.as_mut(),
        }
    }
}

/// Adds a catch-up sender's counters (those a catch-up sender moves) to `t`.
fn add_catch_up(t: &mut SenderStats, s: &SenderStats) {
    t.bytes += s.bytes;
    t.unicast_repairs += s.unicast_repairs;
    t.nacks += s.nacks;
    t.nacks_ignored += s.nacks_ignored;
    t.overflow_reports += s.overflow_reports;
    t.rate_cuts += s.rate_cuts;
}

#[cfg(test)]
mod tests;
