//! Failed enrolments per source address: a small token bucket per address in a bounded
//! table (sans-IO: the caller passes the time).
//!
//! Every `Enrol` takes a token from its source's bucket before the fleet (and the store)
//! sees it, and a successful enrolment gives it back, so only failures drain a bucket: a
//! source has [`BURST`] failures at once, then one more every [`REFILL`]. An `Enrol` from an
//! empty bucket is refused at once (`OVERLOADED`, "retry later") without touching the store,
//! so guessing tokens costs the guesser time and the gateway no disk sync.
//!
//! Sources are IPv4 addresses and IPv6 /64 prefixes (one host usually owns a whole /64).
//! The table holds at most [`MAX_SOURCES`] buckets; when it is full, buckets that have
//! refilled (the same as no bucket) are dropped first, else the one idle the longest.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use fleetcast_wire::Instant;

/// Failed enrolments a source may make at once.
pub const BURST: u32 = 10;
/// One more failed enrolment is allowed per this interval.
pub const REFILL: Duration = Duration::from_secs(6);
/// Most sources tracked at once.
pub const MAX_SOURCES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4([u8; 4]),
    /// The /64 prefix.
    V6([u8; 8]),
}

fn source(ip: IpAddr) -> Source {
    match ip {
        IpAddr::V4(a) => Source::V4(a.octets()),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => Source::V4(v4.octets()),
            None => {
                let mut p = [0u8; 8];
                p.copy_from_slice(&a.octets()[..8]);
                Source::V6(p)
            }
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u32,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, burst: u32, every: Duration) {
        if now <= self.at || every.is_zero() {
            return;
        }
        let steps = ((now - self.at).as_micros() / every.as_micros().max(1)) as u64;
        if steps == 0 {
            return;
        }
        let add = u32::try_from(steps).unwrap_or(u32::MAX);
        self.tokens = self.tokens.saturating_add(add).min(burst);
        self.at = if self.tokens == burst {
            now
        } else {
            self.at + every * add
        };
    }
}

/// The per-source enrolment limiter.
#[derive(Debug)]
pub struct EnrolLimiter {
    buckets: HashMap<Source, Bucket>,
    burst: u32,
    every: Duration,
    max_sources: usize,
}

impl Default for EnrolLimiter {
    fn default() -> Self {
        EnrolLimiter::new(BURST, REFILL, MAX_SOURCES)
    }
}

impl EnrolLimiter {
    /// A limiter allowing `burst` failures at once per source, one more per `every`,
    /// tracking at most `max_sources` sources.
    pub fn new(burst: u32, every: Duration, max_sources: usize) -> Self {
        EnrolLimiter {
            buckets: HashMap::new(),
            burst: burst.max(1),
            every,
            max_sources: max_sources.max(1),
        }
    }

    /// Takes a token for an enrolment attempt from `ip` at `now`; `false`: refuse it.
    pub fn try_take(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = source(ip);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_sources {
            self.make_room(now);
        }
        let (burst, every) = (self.burst, self.every);
        let b = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.refill(now, burst, every);
        if b.tokens == 0 {
            return false;
        }
        b.tokens -= 1;
        true
    }

    /// Gives back the token of an attempt from `ip` that succeeded.
    pub fn refund(&mut self, ip: IpAddr) {
        if let Some(b) = self.buckets.get_mut(&source(ip)) {
            b.tokens = (b.tokens + 1).min(self.burst);
        }
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn make_room(&mut self, now: Instant) {
        let (burst, every) = (self.burst, self.every);
        self.buckets.retain(|_, b| {
            b.refill(now, burst, every);
            b.tokens < burst
        });
        if self.buckets.len() >= self.max_sources {
            if let Some(k) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.at)
                .map(|(k, _)| *k)
            {
                self.buckets.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Instant {
        Instant::from_micros(secs * 1_000_000)
    }

    #[test]
    fn a_burst_then_one_per_interval_and_successes_are_free() {
        let mut l = EnrolLimiter::new(3, Duration::from_secs(6), 16);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!((0..3).all(|_| l.try_take(a, t(0))));
        assert!(!l.try_take(a, t(0)), "burst spent");
        assert!(l.try_take(b, t(0)), "another source is not affected");
        assert!(!l.try_take(a, t(5)));
        assert!(l.try_take(a, t(6)), "one more after the interval");
        assert!(!l.try_take(a, t(7)));
        assert!(l.try_take(a, t(7 + 30)) && l.try_take(a, t(37)) && l.try_take(a, t(37)));
        assert!(!l.try_take(a, t(37)), "refill is capped at the burst");
        // A success gives its token back: a device enrolling is never limited by itself.
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        for _ in 0..100 {
            assert!(l.try_take(c, t(40)));
            l.refund(c);
        }
    }

    #[test]
    fn ipv6_sources_are_their_64_prefix_and_mapped_v4_is_v4() {
        let mut l = EnrolLimiter::new(2, Duration::from_secs(60), 16);
        let x: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(l.try_take(x, t(0)) && l.try_take(y, t(0)));
        assert!(!l.try_take(x, t(0)), "same /64");
        assert!(l.try_take("2001:db8:1:3::1".parse().unwrap(), t(0)));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(l.try_take(v4, t(0)) && l.try_take(mapped, t(0)));
        assert!(!l.try_take(v4, t(0)));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut l = EnrolLimiter::new(2, Duration::from_secs(60), 8);
        for i in 0..1000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(l.try_take(ip, t(u64::from(i))));
            assert!(l.len() <= 8);
        }
        // A source still drained keeps its bucket while refilled ones are dropped first.
        let mut l = EnrolLimiter::new(2, Duration::from_secs(60), 2);
        let bad: IpAddr = "192.0.2.66".parse().unwrap();
        assert!(l.try_take(bad, t(0)) && l.try_take(bad, t(0)));
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(l.try_take(other, t(1)));
        l.refund(other);
        assert!(l.try_take("192.0.2.2".parse().unwrap(), t(2)));
        assert!(!l.try_take(bad, t(3)), "the drained bucket survived");
    }
}
