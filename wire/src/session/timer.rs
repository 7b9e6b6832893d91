//! The session's timers: a fixed [`Timer`] enum indexing an array of deadlines.
//!
//! Invariants: a session has at most one deadline per [`Timer`]; `next()` is the minimum of the
//! armed deadlines and is what `poll_timeout` returns; a closed session has none armed.

use crate::time::Instant;

/// Every timer a control session can arm. Not every end uses every timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// Nothing heard from the peer for `idle_timeout`, or for `DEAD_AFTER_HEARTBEATS`
    /// heartbeat intervals once established: close with `TIMEOUT` (both ends).
    Idle = 0,
    /// No `Hello`/`Enrol` within `hello_timeout` of the connection (gateway).
    Hello = 1,
    /// Time to send a heartbeat request (agent, once established).
    Heartbeat = 2,
}

impl Timer {
    /// Every timer, in index order.
    pub(super) const ALL: [Timer; 3] = [Timer::Idle, Timer::Hello, Timer::Heartbeat];
}

/// One optional deadline per [`Timer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct TimerTable {
    data: [Option<Instant>; Timer::ALL.len()],
}

impl TimerTable {
    /// Arms (`Some`) or disarms (`None`) `timer`.
    pub(super) fn set(&mut self, timer: Timer, deadline: Option<Instant>) {
        self.data[timer as usize] = deadline;
    }

    /// The deadline of `timer`, if armed.
    pub(super) fn get(&self, timer: Timer) -> Option<Instant> {
        self.data[timer as usize]
    }

    /// Whether `timer` is armed and due at `now`.
    pub(super) fn is_expired(&self, timer: Timer, now: Instant) -> bool {
        self.get(timer).is_some_and(|t| t <= now)
    }

    /// Disarms every timer.
    pub(super) fn clear(&mut self) {
        self.data = [None; Timer::ALL.len()];
    }

    /// The earliest armed deadline.
    pub(super) fn next(&self) -> Option<Instant> {
        self.data.iter().flatten().copied().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_the_minimum_of_armed_timers() {
        let mut t = TimerTable::default();
        assert_eq!(t.next(), None);
        t.set(Timer::Heartbeat, Some(Instant::from_micros(30)));
        t.set(Timer::Idle, Some(Instant::from_micros(90)));
        assert_eq!(t.next(), Some(Instant::from_micros(30)));
        assert!(t.is_expired(Timer::Heartbeat, Instant::from_micros(30)));
        assert!(!t.is_expired(Timer::Idle, Instant::from_micros(30)));
        assert!(!t.is_expired(Timer::Hello, Instant::FAR_FUTURE));
        t.set(Timer::Heartbeat, None);
        assert_eq!(t.next(), Some(Instant::from_micros(90)));
        t.clear();
        assert_eq!(t.next(), None);
    }
}
