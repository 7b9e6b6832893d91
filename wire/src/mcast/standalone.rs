//! The rules of one standalone transfer (`fleetcast send` and `fleetcast receive`: no gateway,
//! no enrolment, a pre-shared key), which replace the control session by tagged datagrams:
//! when the sender repeats its `Announce`, when a receiver's join counts, how long a
//! receiver repeats its `Completion`, when a receiver gives up, and what the sender's exit
//! says. Sans-IO: time and parsed, verified datagrams are inputs; the drivers
//! (`cli/src/standalone/`) own the sockets, the tags and the clock.
//!
//! # Exchange
//! - The sender multicasts its `Announce` every [`ANNOUNCE_WAITING`] until the first pass
//!   starts, then every [`ANNOUNCE_RUNNING`]: a receiver started late still joins while the
//!   sender runs (during the first pass it joins the multicast and its missing blocks are
//!   repaired; after it, it is caught up by unicast).
//! - A receiver that verified an announce joins: a `TaskAsk` (it names the receiver's random
//!   device id) to the announce's source, at once and then every [`JOIN_EVERY`] while it
//!   receives (a lost join is repeated; the sender counts the first, per address).
//! - When its copy is verified (or failed), the receiver sends a `Completion` every
//!   [`COMPLETION_EVERY`] until the sender answers with a `TaskAnswer` or [`COMPLETION_FOR`]
//!   passed. The sender takes the first `Completion` from a joined address as that device's
//!   outcome; every one gets an answer.
//! - A receiver that saw only forged announces for [`FORGED_GIVE_UP`] stops (a wrong key), and
//!   says how many it dropped; one that is receiving and hears no announce for
//!   [`SENDER_GONE`] takes the sender for gone and stops.

use alloc::collections::BTreeMap;
use core::net::SocketAddr;
use core::time::Duration;

use crate::Instant;

/// Announce period before the first pass starts (receivers waiting to join).
pub const ANNOUNCE_WAITING: Duration = Duration::from_millis(500);
/// Announce period once the first pass runs: a receiver started late still joins within a
/// second (its missing blocks are repaired), at about 100 bytes a second.
pub const ANNOUNCE_RUNNING: Duration = Duration::from_secs(1);
/// A receiver's join (and keep-alive) period.
pub const JOIN_EVERY: Duration = Duration::from_secs(1);
/// A receiver's `Completion` period until it is answered.
pub const COMPLETION_EVERY: Duration = Duration::from_millis(250);
/// How long a receiver repeats its `Completion` without an answer.
pub const COMPLETION_FOR: Duration = Duration::from_secs(5);
/// How long a receiver listens to forged announces only before it stops.
pub const FORGED_GIVE_UP: Duration = Duration::from_secs(3);
/// How long a receiver that is receiving goes without an announce before it takes the
/// sender for gone (it announces every [`ANNOUNCE_RUNNING`] while it runs).
pub const SENDER_GONE: Duration = Duration::from_secs(30);

/// What a join datagram did at the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// A new receiver: announce the task to it and count it ready.
    New,
    /// A repeat of a join already counted.
    Repeat,
    /// A second device id from an address that already joined as another (ignored).
    Conflict,
}

/// A receiver as the sender knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Joined {
    device: u64,
    /// Its outcome, once its first `Completion` came (`true`: verified).
    verified: Option<bool>,
}

/// How a standalone send ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendVerdict {
    /// Every receiver that joined reported a verified copy.
    Verified {
        /// Receivers.
        receivers: usize,
    },
    /// No receiver joined.
    NoReceiver,
    /// Some receivers failed or never reported.
    Unverified {
        /// Receivers that reported a failure.
        failed: usize,
        /// Receivers that never reported.
        silent: usize,
    },
}

/// The sender's side of the exchange.
#[derive(Debug, Clone)]
pub struct SendRules {
    next_announce: Instant,
    by_addr: BTreeMap<SocketAddr, Joined>,
    /// Datagrams dropped: tag missing or invalid.
    pub forged: u64,
    /// Datagrams dropped: valid, but about another task or from an address that never
    /// joined.
    pub foreign: u64,
}

impl SendRules {
    /// The rules of a send starting at `now` (its first announce is due at once).
    pub fn new(now: Instant) -> Self {
        SendRules {
            next_announce: now,
            by_addr: BTreeMap::new(),
            forged: 0,
            foreign: 0,
        }
    }

    /// Whether an announce is due at `now` (`started`: the first pass has started); if so,
    /// the next one is scheduled.
    pub fn poll_announce(&mut self, now: Instant, started: bool) -> bool {
        if now < self.next_announce {
            return false;
        }
        let every = if started {
            ANNOUNCE_RUNNING
        } else {
            ANNOUNCE_WAITING
        };
        self.next_announce = now + every;
        true
    }

    /// When the next announce is due.
    pub fn poll_timeout(&self) -> Instant {
        self.next_announce
    }

    /// A verified join of `device` from `from`.
    pub fn handle_join(&mut self, from: SocketAddr, device: u64) -> Join {
        match self.by_addr.get(&from) {
            Some(j) if j.device == device => Join::Repeat,
            Some(_) => Join::Conflict,
            None => {
                self.by_addr.insert(
                    from,
                    Joined {
                        device,
                        verified: None,
                    },
                );
                Join::New
            }
        }
    }

    /// A verified `Completion` from `from`: the device and its outcome the first time (the
    /// driver reports it to the distribution), `None` for a repeat or an address that never
    /// joined (counted as foreign). Every `Completion` from a joined address is answered.
    pub fn handle_completion(&mut self, from: SocketAddr, verified: bool) -> Option<u64> {
        let Some(j) = self.by_addr.get_mut(&from) else {
            self.foreign += 1;
            return None;
        };
        if j.verified.is_some() {
            return None;
        }
        j.verified = Some(verified);
        Some(j.device)
    }

    /// Whether `from` joined (its `Completion`s get an answer).
    pub fn is_joined(&self, from: &SocketAddr) -> bool {
        self.by_addr.contains_key(from)
    }

    /// Receivers that joined.
    pub fn joined(&self) -> usize {
        self.by_addr.len()
    }

    /// Receivers that reported a verified copy.
    pub fn verified(&self) -> usize {
        self.by_addr
            .values()
            .filter(|j| j.verified == Some(true))
            .count()
    }

    /// Receivers that reported, verified or not.
    pub fn reported(&self) -> usize {
        self.by_addr
            .values()
            .filter(|j| j.verified.is_some())
            .count()
    }

    /// The send's outcome (call once the distribution is over).
    pub fn verdict(&self) -> SendVerdict {
        let receivers = self.joined();
        let verified = self.verified();
        let failed = self.reported() - verified;
        match (receivers, verified) {
            (0, _) => SendVerdict::NoReceiver,
            (n, v) if n == v => SendVerdict::Verified { receivers },
            _ => SendVerdict::Unverified {
                failed,
                silent: receivers - self.reported(),
            },
        }
    }
}

/// Where a receiver is in the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No valid announce yet.
    Listening {
        /// When the first forged announce came.
        forged_since: Option<Instant>,
    },
    /// Receiving; the next join is due then; the last announce came then.
    Joined {
        next_join: Instant,
        last_announce: Instant,
    },
    /// The copy is done; repeating the `Completion` since `since`, next at `next`.
    Completing { since: Instant, next: Instant },
    /// The sender answered, or the repeats ran out.
    Done,
}

/// Why a receiver stopped before it received anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// Only forged announces for [`FORGED_GIVE_UP`]: a key other than the sender's.
    Forged {
        /// Datagrams dropped as forged.
        dropped: u64,
    },
    /// No announce at all within the receiver's longest wait.
    NoAnnounce,
    /// Receiving, but no announce for [`SENDER_GONE`]: the sender stopped.
    SenderGone,
}

/// The receiver's side of the exchange.
#[derive(Debug, Clone)]
pub struct ReceiveRules {
    phase: Phase,
    started: Instant,
    max_wait: Option<Duration>,
    /// Datagrams dropped: tag missing or invalid.
    pub forged: u64,
}

impl ReceiveRules {
    /// A receiver started at `now`, waiting at most `max_wait` for an announce (`None`: as
    /// long as it takes).
    pub fn new(now: Instant, max_wait: Option<Duration>) -> Self {
        ReceiveRules {
            phase: Phase::Listening { forged_since: None },
            started: now,
            max_wait,
            forged: 0,
        }
    }

    /// A datagram whose tag did not verify.
    pub fn handle_forged(&mut self, now: Instant) {
        self.forged += 1;
        if let Phase::Listening { forged_since: None } = self.phase {
            self.phase = Phase::Listening {
                forged_since: Some(now),
            };
        }
    }

    /// A verified announce of the task (the first one, or the one being received): returns
    /// whether it is the first (start receiving, then join).
    pub fn handle_announce(&mut self, now: Instant) -> bool {
        match &mut self.phase {
            Phase::Listening { .. } => {
                self.phase = Phase::Joined {
                    next_join: now,
                    last_announce: now,
                };
                true
            }
            Phase::Joined { last_announce, .. } => {
                *last_announce = now;
                false
            }
            _ => false,
        }
    }

    /// Whether a join is due at `now` (then the next one is scheduled).
    pub fn poll_join(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Joined {
                next_join,
                last_announce,
            } if now >= next_join => {
                self.phase = Phase::Joined {
                    next_join: now + JOIN_EVERY,
                    last_announce,
                };
                true
            }
            _ => false,
        }
    }

    /// The copy is finished (verified or not): the `Completion`s start.
    pub fn transfer_done(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Done) {
            self.phase = Phase::Completing {
                since: now,
                next: now,
            };
        }
    }

    /// Whether a `Completion` is due at `now` (then the next one is scheduled); after
    /// [`COMPLETION_FOR`] without an answer the exchange is over.
    pub fn poll_completion(&mut self, now: Instant) -> bool {
        let Phase::Completing { since, next } = self.phase else {
            return false;
        };
        if now >= since + COMPLETION_FOR {
            self.phase = Phase::Done;
            return false;
        }
        if now < next {
            return false;
        }
        self.phase = Phase::Completing {
            since,
            next: now + COMPLETION_EVERY,
        };
        true
    }

    /// The sender answered the `Completion`.
    pub fn handle_answer(&mut self) {
        if let Phase::Completing { .. } = self.phase {
            self.phase = Phase::Done;
        }
    }

    /// Whether the exchange is over.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Why to stop now without a copy, if so.
    pub fn give_up(&self, now: Instant) -> Option<GiveUp> {
        let forged_since = match self.phase {
            Phase::Listening { forged_since } => forged_since,
            Phase::Joined { last_announce, .. } if now >= last_announce + SENDER_GONE => {
                return Some(GiveUp::SenderGone)
            }
            _ => return None,
        };
        if forged_since.is_some_and(|t| now >= t + FORGED_GIVE_UP) {
            return Some(GiveUp::Forged {
                dropped: self.forged,
            });
        }
        if self.max_wait.is_some_and(|w| now >= self.started + w) {
            return Some(if self.forged > 0 {
                GiveUp::Forged {
                    dropped: self.forged,
                }
            } else {
                GiveUp::NoAnnounce
            });
        }
        None
    }

    /// When something is next due (`None`: only a datagram or the transfer moves it on).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Listening { forged_since } => {
                let forged = forged_since.map(|t| t + FORGED_GIVE_UP);
                let wait = self.max_wait.map(|w| self.started + w);
                match (forged, wait) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            Phase::Joined {
                next_join,
                last_announce,
            } => Some(next_join.min(last_announce + SENDER_GONE)),
            Phase::Completing { since, next } => Some(next.min(since + COMPLETION_FOR)),
            Phase::Done => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::ZERO + Duration::from_millis(ms)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn announces_are_frequent_until_the_pass_starts_then_sparse() {
        let mut s = SendRules::new(at(0));
        assert!(s.poll_announce(at(0), false));
        assert!(!s.poll_announce(at(499), false));
        assert!(s.poll_announce(at(500), false));
        assert_eq!(s.poll_timeout(), at(1000));
        assert!(s.poll_announce(at(1000), true));
        assert!(!s.poll_announce(at(1999), true));
        assert!(s.poll_announce(at(2000), true));
    }

    #[test]
    fn a_join_counts_once_per_address_and_completions_only_from_joined_ones() {
        let mut s = SendRules::new(at(0));
        assert_eq!(s.verdict(), SendVerdict::NoReceiver);
        assert_eq!(s.handle_join(addr(1), 7), Join::New);
        assert_eq!(s.handle_join(addr(1), 7), Join::Repeat);
        assert_eq!(s.handle_join(addr(1), 8), Join::Conflict);
        assert_eq!(s.handle_join(addr(2), 9), Join::New);
        assert_eq!(s.joined(), 2);
        // Someone who never joined: not counted, not answered.
        assert_eq!(s.handle_completion(addr(3), true), None);
        assert!(!s.is_joined(&addr(3)));
        assert_eq!(s.foreign, 1);
        assert_eq!(s.handle_completion(addr(1), true), Some(7));
        // A repeat (the answer was lost) changes nothing, even if it says otherwise.
        assert_eq!(s.handle_completion(addr(1), false), None);
        assert_eq!(
            s.verdict(),
            SendVerdict::Unverified {
                failed: 0,
                silent: 1
            }
        );
        assert_eq!(s.handle_completion(addr(2), false), Some(9));
        assert_eq!(
            s.verdict(),
            SendVerdict::Unverified {
                failed: 1,
                silent: 0
            }
        );
        let mut ok = SendRules::new(at(0));
        ok.handle_join(addr(1), 7);
        ok.handle_completion(addr(1), true);
        assert_eq!(ok.verdict(), SendVerdict::Verified { receivers: 1 });
    }

    #[test]
    fn a_receiver_joins_repeatedly_then_completes_until_answered_or_out_of_time() {
        let mut r = ReceiveRules::new(at(0), None);
        assert_eq!(r.poll_timeout(), None);
        assert!(!r.poll_join(at(0)), "no join before an announce");
        assert!(r.handle_announce(at(10)));
        assert!(
            !r.handle_announce(at(20)),
            "only the first starts the transfer"
        );
        assert!(r.poll_join(at(10)));
        assert!(!r.poll_join(at(500)));
        assert!(r.poll_join(at(1010)));
        r.transfer_done(at(2000));
        assert!(!r.poll_join(at(3000)), "no more joins once done");
        assert!(r.poll_completion(at(2000)));
        assert!(!r.poll_completion(at(2100)));
        assert!(r.poll_completion(at(2250)));
        r.handle_answer();
        assert!(r.is_done());
        assert!(!r.poll_completion(at(3000)));
        // Unanswered: it stops repeating after COMPLETION_FOR.
        let mut r = ReceiveRules::new(at(0), None);
        r.handle_announce(at(0));
        r.transfer_done(at(0));
        let mut sent = 0;
        for ms in (0..6000).step_by(50) {
            if r.poll_completion(at(ms)) {
                sent += 1;
            }
        }
        assert_eq!(sent, 20, "every 250 ms for 5 s");
        assert!(r.is_done());
    }

    #[test]
    fn a_receiver_gives_up_on_forged_announces_or_on_its_longest_wait() {
        let mut r = ReceiveRules::new(at(0), Some(Duration::from_secs(10)));
        assert_eq!(r.poll_timeout(), Some(at(10_000)));
        r.handle_forged(at(1000));
        r.handle_forged(at(1500));
        assert_eq!(r.poll_timeout(), Some(at(4000)));
        assert_eq!(r.give_up(at(3999)), None);
        assert_eq!(r.give_up(at(4000)), Some(GiveUp::Forged { dropped: 2 }));
        // A valid announce in time: no giving up, forged ones are still counted.
        let mut r = ReceiveRules::new(at(0), Some(Duration::from_secs(10)));
        r.handle_forged(at(1000));
        assert!(r.handle_announce(at(2000)));
        r.handle_forged(at(2500));
        assert_eq!(r.forged, 2);
        assert_eq!(r.give_up(at(31_999)), None);
        // Receiving, and the sender stops announcing: it is gone after SENDER_GONE.
        assert_eq!(r.give_up(at(32_000)), Some(GiveUp::SenderGone));
        assert!(!r.handle_announce(at(31_000)), "not a first announce");
        assert_eq!(r.give_up(at(60_999)), None, "a new announce holds it off");
        assert!(r.poll_join(at(31_000)));
        assert_eq!(
            r.poll_timeout(),
            Some(at(32_000)),
            "the next join comes first"
        );
        r.transfer_done(at(61_000));
        assert_eq!(r.give_up(at(100_000)), None, "done: nothing to give up");
        // Nothing at all.
        let r = ReceiveRules::new(at(0), Some(Duration::from_secs(10)));
        assert_eq!(r.give_up(at(9_999)), None);
        assert_eq!(r.give_up(at(10_000)), Some(GiveUp::NoAnnounce));
        assert_eq!(ReceiveRules::new(at(0), None).give_up(at(1 << 40)), None);
    }
}
