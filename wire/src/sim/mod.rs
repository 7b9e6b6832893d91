//! A seeded, deterministic in-memory network for driving sans-IO cores on virtual time.
//!
//! A [`Group`] holds one sender and N receivers, each behind an [`Endpoint`] adapter, and the
//! links between them. Every direction of every link has its own [`LinkConfig`] (delay, jitter,
//! random loss, Gilbert–Elliott burst loss, duplication, reordering, rate limit with a drop-tail
//! queue; see [`link`] for the order in which they apply) and its own random stream derived from
//! the group's seed. Multicast goes to every other node, each copy through its own link; the
//! payload is shared (one `Rc<[u8]>` per transmit), not copied per receiver.
//!
//! Node ids: the sender is [`NodeId::SENDER`] (0), receiver `i` is [`NodeId::receiver`]`(i)`
//! (`i + 1`). Sender→receiver and receiver→sender links are configured separately
//! ([`Group::new`], [`Group::set_link`]); receiver→receiver links are created on first use with
//! the peer configuration ([`Group::set_peer_links`]).
//!
//! # Driving contract
//! The group plays the role a daemon's event loop plays for a real core:
//! 1. After every call that may change an endpoint (`handle_datagram`, `handle_timeout`, and
//!    any access through [`Group::sender_mut`] / [`Group::receiver_mut`]), the group drains
//!    `poll_transmit(now, buf)` until it returns `None` (`buf` is cleared before each call and
//!    holds the datagram when `Some(dest)` is returned), then re-arms the endpoint's one timer
//!    from `poll_timeout()`. A deadline in the past fires at the current time.
//! 2. [`Group::step`] processes exactly one event, the earliest by `(time, scheduling order)`:
//!    a delivery (`handle_datagram`) or an expired timer (`handle_timeout`), then flushes that
//!    endpoint as in 1. Timers superseded by a re-arm are skipped, never fired.
//! 3. Virtual time starts at [`Instant::ZERO`], only moves forward, and only the group moves
//!    it. `poll_transmit` must eventually return `None` at a fixed `now`.
//!
//! # Invariants
//! - Determinism: the same seed, endpoints and calls give the same sequence of events, the
//!   same counters and the same [`Group::digest`]. Ties in time are broken by the order in
//!   which events were scheduled; nodes and multicast copies are visited in node-id order.
//!   Nothing reads a clock, spawns a thread or iterates a hash map.
//! - Each link draws only from its own random stream, keyed by `(seed, from, to)`, so changing
//!   one link's traffic or configuration never perturbs another link.
//! - Counters add up (per link, once nothing is in flight):
//!   `delivered = sent - dropped + duplicated`.

pub mod link;
mod queue;
pub mod rng;

use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

pub use link::{DropReason, GilbertElliott, LinkConfig, LinkStats, RateLimit, Reorder};
pub use rng::Rng;

use crate::time::Instant;
use link::{Fate, Link};
use queue::EventQueue;

/// A node of a simulated [`Group`]: 0 is the sender, `i + 1` is receiver `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl NodeId {
    /// The group's sender.
    pub const SENDER: NodeId = NodeId(0);

    /// Receiver number `index` (0-based).
    pub fn receiver(index: usize) -> NodeId {
        NodeId(u32::try_from(index + 1).expect("receiver index fits in u32"))
    }

    /// The 0-based receiver index, or `None` for the sender.
    pub fn receiver_index(self) -> Option<usize> {
        (self.0 as usize).checked_sub(1)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.receiver_index() {
            None => f.write_str("sender"),
            Some(i) => write!(f, "receiver {i}"),
        }
    }
}

/// Where a transmitted datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    /// To one node.
    Unicast(NodeId),
    /// To every other node of the group, each copy through its own link.
    Multicast,
}

/// The adapter between a sans-IO core and the simulated network.
///
/// It mirrors the cores' vocabulary (see the module docs for the driving contract). Events a
/// core produces (`poll_event`) are the adapter's business: drain them inside
/// `handle_datagram`/`handle_timeout` and keep whatever the test needs to inspect.
pub trait Endpoint {
    /// A datagram from `from` arrived at `now`.
    fn handle_datagram(&mut self, now: Instant, from: NodeId, data: &[u8]);
    /// The deadline last returned by [`Endpoint::poll_timeout`] has passed.
    fn handle_timeout(&mut self, now: Instant);
    /// Writes the next datagram to send at `now` into `buf` (empty on entry) and returns its
    /// destination, or `None` when there is nothing to send now.
    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Dest>;
    /// The next instant at which [`Endpoint::handle_timeout`] should be called, if any.
    fn poll_timeout(&mut self) -> Option<Instant>;
}

/// Lets one group mix receiver types: `Group<S, Box<dyn Endpoint>>`.
impl<E: Endpoint + ?Sized> Endpoint for Box<E> {
    fn handle_datagram(&mut self, now: Instant, from: NodeId, data: &[u8]) {
        (**self).handle_datagram(now, from, data);
    }
    fn handle_timeout(&mut self, now: Instant) {
        (**self).handle_timeout(now);
    }
    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Dest> {
        (**self).poll_transmit(now, buf)
    }
    fn poll_timeout(&mut self) -> Option<Instant> {
        (**self).poll_timeout()
    }
}

/// Counters of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeStats {
    /// Datagrams returned by `poll_transmit` (a multicast counts once).
    pub transmits: u64,
    /// Of which multicast.
    pub multicasts: u64,
    /// Bytes returned by `poll_transmit` (a multicast counts once).
    pub bytes_transmitted: u64,
    /// Datagrams handed to `handle_datagram`.
    pub received: u64,
    /// Bytes handed to `handle_datagram`.
    pub bytes_received: u64,
    /// Calls to `handle_timeout`.
    pub timeouts: u64,
    /// Unicasts to the node itself or to a node that does not exist (discarded).
    pub unroutable: u64,
}

/// One recorded simulator event (see [`Group::enable_trace`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TraceEvent {
    /// `from` transmitted `len` bytes to `dest`.
    Transmit {
        /// Transmitting node.
        from: NodeId,
        /// Destination.
        dest: Dest,
        /// Datagram length.
        len: usize,
    },
    /// A link dropped a copy.
    Drop {
        /// Link source.
        from: NodeId,
        /// Link destination.
        to: NodeId,
        /// Datagram length.
        len: usize,
        /// Cause.
        reason: DropReason,
    },
    /// A copy was handed to `to`.
    Deliver {
        /// Link source.
        from: NodeId,
        /// Receiving node.
        to: NodeId,
        /// Datagram length.
        len: usize,
    },
    /// A node's timer fired.
    Timeout {
        /// The node.
        node: NodeId,
    },
}

/// [`Group::run_until_idle`] hit its step limit with events still pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimit {
    /// Steps taken.
    pub steps: u64,
    /// Virtual time when the limit was hit.
    pub time: Instant,
}

impl fmt::Display for StepLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "simulation not idle after {} steps (virtual time {} us)",
            self.steps,
            self.time.as_micros()
        )
    }
}

impl std::error::Error for StepLimit {}

#[derive(Debug)]
enum EventKind {
    Deliver {
        from: u32,
        to: u32,
        data: Rc<[u8]>,
    },
    /// Fires only if `gen` is still the node's armed generation.
    Timer {
        node: u32,
        gen: u64,
    },
}

#[derive(Debug, Clone, Default)]
struct NodeState {
    stats: NodeStats,
    /// The armed timer: deadline and generation.
    timer: Option<(Instant, u64)>,
    gen: u64,
    dirty: bool,
}

/// Borrows node `$n` of group `$g` as `&mut dyn Endpoint` (a macro so the borrow stays on the
/// endpoint fields and the other fields of the group remain usable).
macro_rules! endpoint {
    ($g:expr, $n:expr) => {{
        let n = $n as usize;
        let ep: &mut dyn Endpoint = if n == 0 {
            &mut $g.sender
        } else {
            &mut $g.receivers[n - 1]
        };
        ep
    }};
}

/// One sender and N receivers on a simulated network, driven on virtual time.
/// See the module docs for the driving contract and invariants.
pub struct Group<S, R> {
    time: Instant,
    seed: u64,
    sender: S,
    receivers: Vec<R>,
    /// Sender → receiver `i`.
    down: Vec<Link>,
    /// Receiver `i` → sender.
    up: Vec<Link>,
    /// Receiver → receiver, created on first use.
    peers: BTreeMap<(u32, u32), Link>,
    peer_config: LinkConfig,
    nodes: Vec<NodeState>,
    queue: EventQueue<EventKind>,
    dirty: Vec<u32>,
    buf: Vec<u8>,
    trace: Option<Vec<(Instant, TraceEvent)>>,
    digest: u64,
    steps: u64,
}

impl<S, R> fmt::Debug for Group<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("time", &self.time)
            .field("seed", &self.seed)
            .field("receivers", &self.receivers.len())
            .field("pending_events", &self.queue.len())
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

/// The random stream of link `from → to`.
fn link_stream(from: u32, to: u32) -> u64 {
    (u64::from(from) << 32) | u64::from(to)
}

const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;

impl<S: Endpoint, R: Endpoint> Group<S, R> {
    /// A group at [`Instant::ZERO`] where every sender→receiver direction uses `down` and every
    /// receiver→sender direction uses `up`. Receiver→receiver links default to `down`.
    pub fn new(seed: u64, sender: S, receivers: Vec<R>, down: LinkConfig, up: LinkConfig) -> Self {
        let n = receivers.len();
        assert!(
            u32::try_from(n).is_ok_and(|n| n < u32::MAX),
            "too many receivers"
        );
        let down_links = (0..n)
            .map(|i| {
                let to = NodeId::receiver(i).0;
                Link::new(down, Rng::stream(seed, link_stream(0, to)))
            })
            .collect();
        let up_links = (0..n)
            .map(|i| {
                let from = NodeId::receiver(i).0;
                Link::new(up, Rng::stream(seed, link_stream(from, 0)))
            })
            .collect();
        let nodes = vec![
            NodeState {
                dirty: true,
                ..NodeState::default()
            };
            n + 1
        ];
        Group {
            time: Instant::ZERO,
            seed,
            sender,
            receivers,
            down: down_links,
            up: up_links,
            peers: BTreeMap::new(),
            peer_config: down,
            nodes,
            queue: EventQueue::new(),
            dirty: (0..=n as u32).collect(),
            buf: Vec::with_capacity(2048),
            trace: None,
            digest: 0xCBF2_9CE4_8422_2325,
            steps: 0,
        }
    }

    /// Sets the configuration of receiver→receiver links, including ones already created.
    pub fn set_peer_links(&mut self, config: LinkConfig) {
        self.peer_config = config;
        for link in self.peers.values_mut() {
            link.config = config;
        }
    }

    /// Sets the configuration of the direction `from → to` (counters and state are kept).
    ///
    /// # Panics
    /// If either node does not exist or `from == to`.
    pub fn set_link(&mut self, from: NodeId, to: NodeId, config: LinkConfig) {
        assert!(self.routable(from.0, to.0), "no link {from} -> {to}");
        self.link_mut(from.0, to.0).config = config;
    }

    /// Starts recording every transmit, drop, delivery and timeout (costs memory; the
    /// [`Group::digest`] is kept either way).
    pub fn enable_trace(&mut self) {
        self.trace.get_or_insert_with(Vec::new);
    }

    /// The recorded events, if [`Group::enable_trace`] was called.
    pub fn trace(&self) -> Option<&[(Instant, TraceEvent)]> {
        self.trace.as_deref()
    }

    /// A running hash of every drop, delivery and timeout with its time: two runs that agree
    /// on it almost surely took the same course.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Current virtual time.
    pub fn time(&self) -> Instant {
        self.time
    }

    /// Events processed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The sender.
    pub fn sender(&self) -> &S {
        &self.sender
    }

    /// The sender, for injecting input; it is flushed before the next event.
    pub fn sender_mut(&mut self) -> &mut S {
        self.mark_dirty(0);
        &mut self.sender
    }

    /// Receiver `i`.
    pub fn receiver(&self, i: usize) -> &R {
        &self.receivers[i]
    }

    /// Receiver `i`, for injecting input; it is flushed before the next event.
    pub fn receiver_mut(&mut self, i: usize) -> &mut R {
        self.mark_dirty(NodeId::receiver(i).0);
        &mut self.receivers[i]
    }

    /// All receivers.
    pub fn receivers(&self) -> &[R] {
        &self.receivers
    }

    /// Counters of `node`.
    pub fn node_stats(&self, node: NodeId) -> &NodeStats {
        &self.nodes[node.0 as usize].stats
    }

    /// Counters of the direction `from → to`, if that link exists (receiver→receiver links
    /// exist once used or configured).
    pub fn link_stats(&self, from: NodeId, to: NodeId) -> Option<&LinkStats> {
        let (f, t) = (from.0, to.0);
        if !self.routable(f, t) {
            return None;
        }
        if f == 0 {
            Some(&self.down[t as usize - 1].stats)
        } else if t == 0 {
            Some(&self.up[f as usize - 1].stats)
        } else {
            self.peers.get(&(f, t)).map(|l| &l.stats)
        }
    }

    /// Sum of the counters of all sender→receiver links.
    pub fn down_stats(&self) -> LinkStats {
        let mut total = LinkStats::default();
        self.down.iter().for_each(|l| total.accumulate(&l.stats));
        total
    }

    /// Sum of the counters of all receiver→sender links.
    pub fn up_stats(&self) -> LinkStats {
        let mut total = LinkStats::default();
        self.up.iter().for_each(|l| total.accumulate(&l.stats));
        total
    }

    /// Events (deliveries and live timers) still pending, counting superseded timers not yet
    /// discarded.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// When the next live event (delivery or timer) is due, after flushing endpoints changed
    /// from outside; `None` when idle.
    pub fn next_event_time(&mut self) -> Option<Instant> {
        self.flush_dirty();
        self.discard_stale_timers();
        self.queue.peek_time()
    }

    /// Processes the earliest pending event (after flushing endpoints changed from outside).
    /// Returns `false` when nothing is pending: the group is idle.
    pub fn step(&mut self) -> bool {
        self.flush_dirty();
        while let Some((time, kind)) = self.queue.pop() {
            let node = match kind {
                EventKind::Timer { node, gen } => {
                    let state = &mut self.nodes[node as usize];
                    if state.timer != Some((time, gen)) {
                        continue; // superseded
                    }
                    state.timer = None;
                    state.stats.timeouts += 1;
                    self.time = time;
                    self.record(TraceEvent::Timeout { node: NodeId(node) });
                    endpoint!(self, node).handle_timeout(time);
                    node
                }
                EventKind::Deliver { from, to, data } => {
                    self.time = time;
                    let len = data.len();
                    let link = self.link_mut(from, to);
                    link.stats.delivered += 1;
                    link.stats.bytes_delivered += len as u64;
                    let stats = &mut self.nodes[to as usize].stats;
                    stats.received += 1;
                    stats.bytes_received += len as u64;
                    self.record(TraceEvent::Deliver {
                        from: NodeId(from),
                        to: NodeId(to),
                        len,
                    });
                    endpoint!(self, to).handle_datagram(time, NodeId(from), &data);
                    to
                }
            };
            self.steps += 1;
            self.flush(node);
            return true;
        }
        false
    }

    /// Steps until nothing is pending. Returns the number of steps taken, or [`StepLimit`] if
    /// `limit` steps did not reach idle (e.g. an endpoint that re-arms a timer forever).
    pub fn run_until_idle(&mut self, limit: u64) -> Result<u64, StepLimit> {
        let start = self.steps;
        loop {
            if self.steps - start >= limit {
                self.flush_dirty();
                self.discard_stale_timers();
                if self.queue.is_empty() {
                    return Ok(self.steps - start);
                }
                return Err(StepLimit {
                    steps: self.steps - start,
                    time: self.time,
                });
            }
            if !self.step() {
                return Ok(self.steps - start);
            }
        }
    }

    /// Steps until `done(self)` holds (checked before every step) and returns `true`, or
    /// returns `false` once no pending event is due at or before `deadline`; in that case time
    /// advances to `deadline` (unless it is [`Instant::FAR_FUTURE`]), so the caller can inject
    /// input at that instant.
    pub fn drive_until(&mut self, mut done: impl FnMut(&Self) -> bool, deadline: Instant) -> bool {
        loop {
            self.flush_dirty();
            if done(self) {
                return true;
            }
            self.discard_stale_timers();
            match self.queue.peek_time() {
                Some(t) if t <= deadline => {
                    self.step();
                }
                _ => {
                    if deadline != Instant::FAR_FUTURE && deadline > self.time {
                        self.time = deadline;
                    }
                    return false;
                }
            }
        }
    }

    /// Processes every event due at or before `deadline`, then sets time to `deadline`.
    pub fn run_until(&mut self, deadline: Instant) {
        self.drive_until(|_| false, deadline);
    }

    fn mark_dirty(&mut self, node: u32) {
        let state = &mut self.nodes[node as usize];
        if !state.dirty {
            state.dirty = true;
            self.dirty.push(node);
        }
    }

    fn flush_dirty(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let dirty = std::mem::take(&mut self.dirty);
        for &node in &dirty {
            self.nodes[node as usize].dirty = false;
            self.flush(node);
        }
        // Reuse the allocation; flushing never marks nodes dirty.
        self.dirty = dirty;
        self.dirty.clear();
    }

    /// Pops superseded timers off the top of the queue so `peek` shows a live event.
    fn discard_stale_timers(&mut self) {
        while let Some((time, kind)) = self.queue.peek() {
            let EventKind::Timer { node, gen } = *kind else {
                break;
            };
            if self.nodes[node as usize].timer == Some((time, gen)) {
                break;
            }
            self.queue.pop();
        }
    }

    /// Drains `node`'s transmits at the current time, then re-arms its timer.
    fn flush(&mut self, node: u32) {
        let now = self.time;
        loop {
            self.buf.clear();
            let Some(dest) = endpoint!(self, node).poll_transmit(now, &mut self.buf) else {
                break;
            };
            self.route(node, dest);
        }
        let deadline = endpoint!(self, node).poll_timeout().map(|d| d.max(now));
        let state = &mut self.nodes[node as usize];
        match deadline {
            None => state.timer = None,
            Some(d) if state.timer.map(|(t, _)| t) == Some(d) => {}
            Some(d) => {
                state.gen += 1;
                let gen = state.gen;
                state.timer = Some((d, gen));
                self.push(d, EventKind::Timer { node, gen });
            }
        }
    }

    /// Sends the datagram in `self.buf` from `from` to `dest` through the links.
    fn route(&mut self, from: u32, dest: Dest) {
        let len = self.buf.len();
        let stats = &mut self.nodes[from as usize].stats;
        stats.transmits += 1;
        stats.bytes_transmitted += len as u64;
        if dest == Dest::Multicast {
            stats.multicasts += 1;
        }
        self.record(TraceEvent::Transmit {
            from: NodeId(from),
            dest,
            len,
        });
        let mut shared: Option<Rc<[u8]>> = None;
        match dest {
            Dest::Unicast(NodeId(to)) => {
                if self.routable(from, to) {
                    self.offer(from, to, &mut shared);
                } else {
                    self.nodes[from as usize].stats.unroutable += 1;
                }
            }
            Dest::Multicast => {
                for to in 0..self.nodes.len() as u32 {
                    if to != from {
                        self.offer(from, to, &mut shared);
                    }
                }
            }
        }
    }

    /// Offers `self.buf` to link `from → to`; `shared` holds the payload once a copy survives.
    fn offer(&mut self, from: u32, to: u32, shared: &mut Option<Rc<[u8]>>) {
        let now = self.time;
        let len = self.buf.len();
        match self.link_mut(from, to).offer(now, len) {
            Fate::Drop(reason) => self.record(TraceEvent::Drop {
                from: NodeId(from),
                to: NodeId(to),
                len,
                reason,
            }),
            Fate::Deliver(at, dup) => {
                let data = shared.get_or_insert_with(|| Rc::from(&self.buf[..]));
                let copy = dup.map(|d| (d, Rc::clone(data)));
                let data = Rc::clone(data);
                self.push(at, EventKind::Deliver { from, to, data });
                if let Some((d, data)) = copy {
                    self.push(d, EventKind::Deliver { from, to, data });
                }
            }
        }
    }

    fn push(&mut self, time: Instant, kind: EventKind) {
        self.queue.push(time, kind);
    }

    fn routable(&self, from: u32, to: u32) -> bool {
        let n = self.nodes.len() as u32;
        from != to && from < n && to < n
    }

    /// Link `from → to`; both must be routable.
    fn link_mut(&mut self, from: u32, to: u32) -> &mut Link {
        if from == 0 {
            &mut self.down[to as usize - 1]
        } else if to == 0 {
            &mut self.up[from as usize - 1]
        } else {
            let (seed, config) = (self.seed, self.peer_config);
            self.peers
                .entry((from, to))
                .or_insert_with(|| Link::new(config, Rng::stream(seed, link_stream(from, to))))
        }
    }

    /// Folds `event` into the digest and, if enabled, the trace. Transmits are only traced:
    /// they are determined by the deliveries and timeouts that caused them.
    fn record(&mut self, event: TraceEvent) {
        let words: [u64; 4] = match event {
            TraceEvent::Transmit { .. } => [0; 4],
            TraceEvent::Drop {
                from,
                to,
                len,
                reason,
            } => [1 + reason as u64, from.0.into(), to.0.into(), len as u64],
            TraceEvent::Deliver { from, to, len } => [16, from.0.into(), to.0.into(), len as u64],
            TraceEvent::Timeout { node } => [17, node.0.into(), 0, 0],
        };
        if words[0] != 0 {
            let mut h = self.digest;
            for w in [
                self.time.as_micros(),
                words[0],
                words[1],
                words[2],
                words[3],
            ] {
                h = (h ^ w).wrapping_mul(FNV_PRIME);
            }
            self.digest = h;
        }
        if let Some(trace) = &mut self.trace {
            trace.push((self.time, event));
        }
    }
}

#[cfg(test)]
mod tests;
