//! One direction of one simulated link: its impairment configuration, state and counters.
//!
//! A datagram offered to a link at time `t` goes through these stages, in this order:
//! 0. **MTU**: a datagram longer than [`LinkConfig::mtu`] is dropped
//!    ([`LinkStats::dropped_oversize`]); it catches cores that emit oversized datagrams.
//! 1. **Rate limit** ([`RateLimit`]): a drop-tail byte queue in front of a serializer running at
//!    `bits_per_sec`. If the bytes still waiting (including the one on the wire) plus this
//!    datagram exceed `queue_bytes`, it is dropped ([`LinkStats::dropped_queue`]). Otherwise it
//!    leaves the serializer at `max(t, busy_until) + len * 8 / rate`.
//! 2. **Burst loss** ([`GilbertElliott`]): the two-state chain takes one step per datagram, then
//!    the datagram is lost with the loss probability of the new state
//!    ([`LinkStats::dropped_burst`]).
//! 3. **Random loss**: independent loss with probability [`LinkConfig::loss`]
//!    ([`LinkStats::dropped_loss`]).
//! 4. **Delay**: `delay + U[0, jitter]`, plus `reorder.extra_delay` with probability
//!    `reorder.probability`. Jitter alone may reorder datagrams (as netem does by default).
//! 5. **Duplication**: with probability [`LinkConfig::duplicate`], a second copy is delivered
//!    with its own jitter sample. The copy is made after the bottleneck (it costs no rate).
//!
//! Invariants:
//! - Every impairment draws from the link's own [`Rng`] stream, and a disabled impairment draws
//!   nothing: a link with the default config is a perfect, fixed-delay pipe.
//! - A datagram is never delivered earlier than `t + delay` (plus its serialization time).
//! - Counter identity once nothing is in flight:
//!   `delivered = sent - dropped() + duplicated`, where [`LinkStats::dropped`] sums the drops
//!   of every cause.

use core::time::Duration;

use super::rng::Rng;
use crate::time::Instant;

/// Burst loss as a Gilbert–Elliott two-state Markov chain, stepped once per datagram.
///
/// With `loss_in_bad = 1` and `loss_in_good = 0` the mean burst length is `1 / p_bad_to_good`
/// and the long-run loss rate is `p_good_to_bad / (p_good_to_bad + p_bad_to_good)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    /// Probability of moving from the good to the bad state at each datagram.
    pub p_good_to_bad: f64,
    /// Probability of moving from the bad to the good state at each datagram.
    pub p_bad_to_good: f64,
    /// Loss probability while in the bad state.
    pub loss_in_bad: f64,
    /// Loss probability while in the good state.
    pub loss_in_good: f64,
}

/// Reordering: some datagrams are held back by an extra delay so later ones overtake them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reorder {
    /// Probability that a datagram is held back.
    pub probability: f64,
    /// How long a held-back datagram waits on top of the normal delay.
    pub extra_delay: Duration,
}

/// A bottleneck: a serializer at `bits_per_sec` behind a drop-tail queue of `queue_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Serialization rate in bits per second (must be non-zero).
    pub bits_per_sec: u64,
    /// Queue capacity in bytes, counting the datagram being serialized; a datagram that would
    /// not fit is dropped. Should be at least one maximum-size datagram.
    pub queue_bytes: u64,
}

/// The impairments of one direction of one link. The default is a perfect pipe with no delay.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkConfig {
    /// Fixed one-way propagation delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `[0, jitter]` per datagram.
    pub jitter: Duration,
    /// Independent random loss probability.
    pub loss: f64,
    /// Burst loss model, applied before random loss.
    pub gilbert_elliott: Option<GilbertElliott>,
    /// Probability that a delivered datagram is delivered twice.
    pub duplicate: f64,
    /// Reordering by holding some datagrams back.
    pub reorder: Option<Reorder>,
    /// Bandwidth limit with a drop-tail queue.
    pub rate: Option<RateLimit>,
    /// Largest datagram the link carries; longer ones are dropped. `None`: no limit.
    pub mtu: Option<usize>,
}

impl LinkConfig {
    /// A perfect pipe with a fixed one-way `delay`.
    pub fn with_delay(delay: Duration) -> Self {
        LinkConfig {
            delay,
            ..LinkConfig::default()
        }
    }
}

/// Counters of one direction of one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    /// Datagrams offered to the link.
    pub sent: u64,
    /// Bytes offered to the link.
    pub bytes_sent: u64,
    /// Datagrams handed to the receiving endpoint (duplicates included).
    pub delivered: u64,
    /// Bytes handed to the receiving endpoint.
    pub bytes_delivered: u64,
    /// Dropped by independent random loss.
    pub dropped_loss: u64,
    /// Dropped by the Gilbert–Elliott burst model.
    pub dropped_burst: u64,
    /// Dropped because the rate-limit queue was full.
    pub dropped_queue: u64,
    /// Extra copies created by duplication.
    pub duplicated: u64,
    /// Datagrams held back by the reorder impairment.
    pub reordered: u64,
    /// Dropped because longer than the link's MTU.
    pub dropped_oversize: u64,
}

impl LinkStats {
    /// All drops, whatever the cause.
    pub fn dropped(&self) -> u64 {
        self.dropped_loss + self.dropped_burst + self.dropped_queue + self.dropped_oversize
    }

    /// Adds `other` into `self` field by field.
    pub fn accumulate(&mut self, other: &LinkStats) {
        self.sent += other.sent;
        self.bytes_sent += other.bytes_sent;
        self.delivered += other.delivered;
        self.bytes_delivered += other.bytes_delivered;
        self.dropped_loss += other.dropped_loss;
        self.dropped_burst += other.dropped_burst;
        self.dropped_queue += other.dropped_queue;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.dropped_oversize += other.dropped_oversize;
    }
}

/// Why a link dropped a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Independent random loss.
    Loss,
    /// Gilbert–Elliott burst loss.
    Burst,
    /// The rate-limit queue was full.
    Queue,
    /// Longer than the link's MTU.
    Oversize,
}

/// What a link does with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Dropped.
    Drop(DropReason),
    /// Delivered at the first instant, and a duplicate at the second if present.
    Deliver(Instant, Option<Instant>),
}

/// State of one direction of one link.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) config: LinkConfig,
    pub(crate) stats: LinkStats,
    rng: Rng,
    /// Gilbert–Elliott state: `true` while bad.
    bad: bool,
    /// When the serializer finishes its backlog, in nanoseconds since the epoch (nanoseconds so
    /// that small datagrams at high rates do not accumulate rounding error).
    busy_until_ns: u64,
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

impl Link {
    pub(crate) fn new(config: LinkConfig, rng: Rng) -> Self {
        Link {
            config,
            stats: LinkStats::default(),
            rng,
            bad: false,
            busy_until_ns: 0,
        }
    }

    /// Offers a datagram of `len` bytes at `now`; updates the counters of everything decided
    /// now (all but `delivered`, which the driver counts at delivery time).
    pub(crate) fn offer(&mut self, now: Instant, len: usize) -> Fate {
        let len64 = len as u64;
        self.stats.sent += 1;
        self.stats.bytes_sent += len64;
        if self.config.mtu.is_some_and(|mtu| len > mtu) {
            self.stats.dropped_oversize += 1;
            return Fate::Drop(DropReason::Oversize);
        }
        let mut depart = now;
        if let Some(rate) = self.config.rate {
            let now_ns = now.as_micros().saturating_mul(1000);
            let start_ns = self.busy_until_ns.max(now_ns);
            let bps = u128::from(rate.bits_per_sec.max(1));
            // Bytes not yet serialized at `now`: backlog time * rate.
            let backlog_bytes = (u128::from(start_ns - now_ns) * bps / 8 / NANOS_PER_SEC) as u64;
            if backlog_bytes.saturating_add(len64) > rate.queue_bytes {
                self.stats.dropped_queue += 1;
                return Fate::Drop(DropReason::Queue);
            }
            let ser_ns = (u128::from(len64) * 8 * NANOS_PER_SEC).div_ceil(bps);
            let end_ns = start_ns.saturating_add(u64::try_from(ser_ns).unwrap_or(u64::MAX));
            self.busy_until_ns = end_ns;
            depart = Instant::from_micros(end_ns.div_ceil(1000));
        }
        if let Some(ge) = self.config.gilbert_elliott {
            let flip = if self.bad {
                ge.p_bad_to_good
            } else {
                ge.p_good_to_bad
            };
            if self.rng.chance(flip) {
                self.bad = !self.bad;
            }
            let p = if self.bad {
                ge.loss_in_bad
            } else {
                ge.loss_in_good
            };
            if self.rng.chance(p) {
                self.stats.dropped_burst += 1;
                return Fate::Drop(DropReason::Burst);
            }
        }
        if self.rng.chance(self.config.loss) {
            self.stats.dropped_loss += 1;
            return Fate::Drop(DropReason::Loss);
        }
        let first = self.arrival(depart, true);
        let dup = if self.rng.chance(self.config.duplicate) {
            self.stats.duplicated += 1;
            Some(self.arrival(depart, false))
        } else {
            None
        };
        Fate::Deliver(first, dup)
    }

    /// Arrival time of a datagram leaving the bottleneck at `depart`.
    fn arrival(&mut self, depart: Instant, may_reorder: bool) -> Instant {
        let jitter = u64::try_from(self.config.jitter.as_micros()).unwrap_or(u64::MAX);
        let mut at = depart + self.config.delay;
        at = Instant::from_micros(at.as_micros().saturating_add(self.rng.up_to(jitter)));
        if may_reorder {
            if let Some(r) = self.config.reorder {
                if self.rng.chance(r.probability) {
                    self.stats.reordered += 1;
                    at += r.extra_delay;
                }
            }
        }
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(us: u64) -> Instant {
        Instant::from_micros(us)
    }

    #[test]
    fn default_link_is_a_perfect_pipe() {
        let mut l = Link::new(
            LinkConfig::with_delay(Duration::from_millis(3)),
            Rng::new(1),
        );
        for i in 0..1000 {
            assert_eq!(
                l.offer(t(i), 100),
                Fate::Deliver(t(i + 3000), None),
                "datagram {i}"
            );
        }
        assert_eq!(l.stats.dropped(), 0);
        assert_eq!(l.stats.sent, 1000);
        assert_eq!(l.stats.bytes_sent, 100_000);
    }

    #[test]
    fn serializer_spaces_and_queue_drops_tail() {
        // 8 Mbit/s = one byte per microsecond; a 1000-byte datagram takes 1 ms on the wire.
        let cfg = LinkConfig {
            rate: Some(RateLimit {
                bits_per_sec: 8_000_000,
                queue_bytes: 3000,
            }),
            ..LinkConfig::default()
        };
        let mut l = Link::new(cfg, Rng::new(1));
        assert_eq!(l.offer(t(0), 1000), Fate::Deliver(t(1000), None));
        assert_eq!(l.offer(t(0), 1000), Fate::Deliver(t(2000), None));
        assert_eq!(l.offer(t(0), 1000), Fate::Deliver(t(3000), None));
        assert_eq!(l.offer(t(0), 1000), Fate::Drop(DropReason::Queue));
        // Half a datagram later, 2500 bytes are waiting: 500 more fit, 1000 do not.
        assert_eq!(l.offer(t(500), 1000), Fate::Drop(DropReason::Queue));
        assert_eq!(l.offer(t(500), 500), Fate::Deliver(t(3500), None));
        // Once idle, a datagram goes straight through.
        assert_eq!(l.offer(t(10_000), 1000), Fate::Deliver(t(11_000), None));
        assert_eq!(l.stats.dropped_queue, 2);
    }

    #[test]
    fn mtu_drops_oversized_datagrams_only() {
        let cfg = LinkConfig {
            mtu: Some(1200),
            ..LinkConfig::default()
        };
        let mut l = Link::new(cfg, Rng::new(1));
        assert_eq!(l.offer(t(0), 1200), Fate::Deliver(t(0), None));
        assert_eq!(l.offer(t(0), 1201), Fate::Drop(DropReason::Oversize));
        assert_eq!((l.stats.dropped_oversize, l.stats.dropped()), (1, 1));
    }

    #[test]
    fn sub_microsecond_serialization_does_not_drift() {
        // 1 Gbit/s and 100-byte datagrams: 800 ns each; 1000 of them take exactly 800 us.
        let cfg = LinkConfig {
            rate: Some(RateLimit {
                bits_per_sec: 1_000_000_000,
                queue_bytes: 1 << 20,
            }),
            ..LinkConfig::default()
        };
        let mut l = Link::new(cfg, Rng::new(1));
        let mut last = Fate::Drop(DropReason::Loss);
        for _ in 0..1000 {
            last = l.offer(t(0), 100);
        }
        assert_eq!(last, Fate::Deliver(t(800), None));
    }
}
