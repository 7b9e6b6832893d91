//! The receiver's overflow reports: when to tell the sender that the kernel dropped
//! datagrams on this device's sockets ([`crate::Overflow`]), so it paces down
//! (`sender/pacing.rs`) before the same datagrams are lost at every slow receiver.
//!
//! Driving contract (no clock, no socket): after every receive batch the driver passes the
//! sockets' cumulative drop count ([`OverflowReporter::observe`], e.g. from `SO_RXQ_OVFL`);
//! it drains [`OverflowReporter::poll_transmit`] and calls it again at
//! [`OverflowReporter::poll_timeout`]. The driver tags each datagram under the device's NACK
//! key, as it does NACKs.
//!
//! Rules: a new count goes out at once, then at most once per `interval` (the latest count
//! then); a count that did not grow is never sent. So the sender hears within an interval of
//! an overflow (the sender reacts at most once per its own, longer, interval), and a
//! receiver that overflows steadily costs one small datagram per interval.

use alloc::vec::Vec;
use core::time::Duration;

use crate::msg::{Message, Overflow};
use crate::time::Instant;

/// Default least time between two reports: well under the sender's reaction interval (50 ms),
/// so a cut follows an overflow within one.
pub const DEFAULT_OVERFLOW_INTERVAL: Duration = Duration::from_millis(10);

/// When to report the drop count.
#[derive(Debug, Clone)]
pub struct OverflowReporter {
    session: u32,
    device_id: u64,
    interval: Duration,
    /// The count last sent.
    sent: u64,
    /// The count last observed.
    seen: u64,
    last: Option<Instant>,
}

impl OverflowReporter {
    /// A reporter for `device_id` in `session` whose count so far is `base` (drops an earlier
    /// attempt at the same transfer reported: the count only grows).
    pub fn new(session: u32, device_id: u64, base: u64, interval: Duration) -> Self {
        OverflowReporter {
            session,
            device_id,
            interval,
            sent: base,
            seen: base,
            last: None,
        }
    }

    /// The cumulative drop count now (a smaller one than before is ignored).
    pub fn observe(&mut self, drops: u64) {
        self.seen = self.seen.max(drops);
    }

    /// The count so far (for the next attempt's `base`).
    pub fn drops(&self) -> u64 {
        self.seen
    }

    /// When a report will be due (only while one is pending).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.seen <= self.sent {
            return None;
        }
        Some(self.last.map_or(Instant::ZERO, |t| t + self.interval))
    }

    /// Appends the report due at `now`, untagged, to `buf` and returns its length, or `None`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<usize> {
        if self.poll_timeout()? > now {
            return None;
        }
        let msg = Message::Overflow(Overflow {
            session: self.session,
            device_id: self.device_id,
            drops: self.seen,
        });
        let n = msg.emit_to_vec(buf).ok()?;
        self.sent = self.seen;
        self.last = Some(now);
        Some(n.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Instant {
        Instant::from_micros(v * 1000)
    }

    fn drops_in(buf: &[u8]) -> u64 {
        match Message::parse_datagram(buf).unwrap().0 {
            Message::Overflow(o) => o.drops,
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn reports_new_drops_at_once_then_at_most_once_per_interval() {
        let mut r = OverflowReporter::new(5, 9, 0, Duration::from_millis(10));
        let mut buf = Vec::new();
        assert_eq!(
            r.poll_transmit(ms(0), &mut buf),
            None,
            "nothing dropped yet"
        );
        assert_eq!(r.poll_timeout(), None);
        r.observe(3);
        assert!(r.poll_transmit(ms(1), &mut buf).is_some());
        assert_eq!(drops_in(&buf), 3);
        assert_eq!(r.poll_transmit(ms(1), &mut buf), None, "nothing new");
        r.observe(7);
        r.observe(5);
        assert_eq!(r.poll_timeout(), Some(ms(11)));
        assert_eq!(r.poll_transmit(ms(10), &mut buf), None);
        buf.clear();
        assert!(r.poll_transmit(ms(11), &mut buf).is_some());
        assert_eq!(drops_in(&buf), 7, "the latest count, never a smaller one");
        assert_eq!(r.poll_timeout(), None);
    }

    #[test]
    fn a_later_attempt_continues_the_count() {
        let mut r = OverflowReporter::new(5, 9, 40, Duration::from_millis(10));
        let mut buf = Vec::new();
        r.observe(12);
        assert_eq!(r.poll_timeout(), None, "below what was reported before");
        r.observe(52);
        assert!(r.poll_transmit(ms(0), &mut buf).is_some());
        assert_eq!(drops_in(&buf), 52);
    }
}
