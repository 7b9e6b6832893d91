//! Pacing that follows the receivers: the token bucket's rate backs off when a receiver's
//! socket overflows and probes back up while none does.
//!
//! A fixed rate that one receiver's socket cannot absorb loses the same datagrams at every
//! such receiver, and everything lost is repaired: at 4 receivers and 1% loss the sender sent
//! 1.23 datagram bytes per file byte, most of it repairs of overflow, not of the link's loss.
//! Receivers report their kernel's cumulative drop count on the group socket
//! ([`crate::Overflow`], tagged under the device's NACK key like a NACK); the rules:
//! - A report counts only if its tag verifies under the named device's key, the device is an
//!   active (not demoted, not done) receiver, and its count is above the last one accepted
//!   from it: the count only grows, so it is its own freshness counter, and a replay moves
//!   nothing.
//! - New drops cut the rate to [`CUT_PERMILLE`] of what was sent in the last interval (or of
//!   the rate, if less: a sender held back by its CPU sends below its rate), at most once per
//!   [`super::SenderConfig::pace_interval`] (a cut needs about a feedback delay to show: the
//!   reports of drops that happened before it are still on their way), never below the
//!   floor ([`super::SenderConfig::pace_floor_permille`] of the configured rate).
//! - While no report cuts it, the rate grows by [`STEP_PER_MILLE`] of what the last cut
//!   started from every interval, and beyond that level by a step that doubles every
//!   interval, up to the configured rate: it probes for what the receivers absorb now (their
//!   load changes), and the configured rate stays the ceiling.
//! - A receiver that keeps overflowing at the floor ([`FLOOR_STRIKES`] reports that leave the
//!   rate there) no longer
//!   moves the rate: it cannot keep up at any rate the others should be held to, so it is
//!   left to the demotion rules (repairs above the bar demote it), and the rate probes back up
//!   for the others.
//!
//! Multiplicative decrease and additive increase, as in TCP (with a faster probe past the
//! last level, as CUBIC's): the fleet converges near what its
//! slowest non-demoted receiver absorbs, and a cut costs a few intervals of probing back.

use core::time::Duration;

use super::{McastSender, NackVerdict, Status};
use crate::header::Frame;
use crate::mcast::NackMac;
use crate::msg::Overflow;
use crate::time::Instant;

/// A cut leaves this much of the rate sent, in thousandths: gentler than TCP's half, because
/// the loss it answers is a receiver's queue, which a smaller step already drains, and every
/// cut slows the whole fleet.
pub(super) const CUT_PERMILLE: u64 = 750;
/// Per interval without a cut the rate grows by this much of what it was cut from, in
/// thousandths: back to it in about 10 intervals (0.5 s at 50 ms), then on, linearly.
pub(super) const STEP_PER_MILLE: u64 = 25;
/// Reports at the floor after which a receiver no longer moves the rate.
pub(super) const FLOOR_STRIKES: u32 = 4;

/// The sender's current rate and its history.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pacing {
    /// The configured rate: the ceiling.
    ceiling: u64,
    /// Least rate a cut leaves.
    floor: u64,
    rate: u64,
    interval: Duration,
    /// When the rate was last cut (no second cut within an interval of it).
    last_cut: Option<Instant>,
    /// Start of the interval that ends with the next increase.
    step_from: Instant,
    /// Bytes per increase step: a share of what the last cut started from.
    step: u64,
    /// What the last cut started from.
    cut_from: u64,
    /// The current measuring window of what was sent: its start and bytes.
    window: (Instant, u64),
    /// Bytes per second sent in the last whole window, if one closed.
    measured: Option<u64>,
}

impl Pacing {
    /// Pacing at `ceiling` bytes per second, cut no lower than `floor_permille` of it, moved
    /// at most once per `interval`.
    pub(super) fn new(ceiling: u64, floor_permille: u32, interval: Duration, now: Instant) -> Self {
        let floor = u128::from(ceiling) * u128::from(floor_permille.min(1000)) / 1000;
        Pacing {
            ceiling,
            floor: (floor as u64).max(1),
            rate: ceiling,
            interval: interval.max(Duration::from_millis(1)),
            last_cut: None,
            step_from: now,
            step: 1,
            cut_from: ceiling,
            window: (now, 0),
            measured: None,
        }
    }

    /// The rate now, in bytes per second (as of the last [`Pacing::advance`]).
    pub(super) fn rate(&self) -> u64 {
        self.rate
    }

    /// Whether the rate is at the floor.
    pub(super) fn at_floor(&self) -> bool {
        self.rate <= self.floor
    }

    /// `bytes` were sent at `now`. What was sent, not the bucket's rate, is what a cut starts
    /// from: a sender held back by its CPU or its socket sends well below the rate, and a
    /// cut of a rate it does not reach would change nothing.
    pub(super) fn sent(&mut self, now: Instant, bytes: u64) {
        let (start, n) = self.window;
        if now >= start + self.interval {
            let us = (now - start).as_micros().max(1);
            self.measured = Some(u64::try_from(u128::from(n) * 1_000_000 / us).unwrap_or(u64::MAX));
            self.window = (now, 0);
        }
        self.window.1 = self.window.1.saturating_add(bytes);
    }

    /// Advances the increase to `now`: one step per interval, of a fixed size up to the rate
    /// the last cut started from, doubling each interval beyond it (that level was absorbed
    /// then; beyond it the receivers' capacity is unknown, and a receiver left to demotion at
    /// the floor must not keep the others near it for long).
    pub(super) fn advance(&mut self, now: Instant) {
        if self.rate >= self.ceiling || now < self.step_from + self.interval {
            return;
        }
        let us = self.interval.as_micros().max(1);
        let steps = (now - self.step_from).as_micros() / us;
        // 64 doublings reach any rate: the loop is bounded whatever the gap.
        for _ in 0..steps.min(64) {
            if self.rate >= self.cut_from {
                self.step = self.step.saturating_mul(2);
            }
            self.rate = self.rate.saturating_add(self.step).min(self.ceiling);
        }
        if steps > 64 {
            self.rate = self.ceiling;
        }
        let moved = u64::try_from(steps * us).unwrap_or(u64::MAX);
        self.step_from += Duration::from_micros(moved);
    }

    /// New drops reported at `now`: cuts the rate (from what was sent, if less) unless it was
    /// cut within the interval or is at the floor. Returns whether it cut.
    pub(super) fn overflow(&mut self, now: Instant) -> bool {
        self.advance(now);
        if self.last_cut.is_some_and(|t| now < t + self.interval) || self.at_floor() {
            return false;
        }
        let from = self.measured.map_or(self.rate, |m| m.min(self.rate));
        let cut = u128::from(from) * u128::from(CUT_PERMILLE) / 1000;
        self.rate = (cut as u64).max(self.floor);
        self.step = (u128::from(from) * u128::from(STEP_PER_MILLE) / 1000).max(1) as u64;
        self.cut_from = from;
        self.last_cut = Some(now);
        // Probing restarts a whole interval after the cut.
        self.step_from = now;
        true
    }
}

impl McastSender {
    /// An [`Overflow`] datagram, parsed (`frame`, `report`; the driver routed it here by its
    /// session): the device's kernel dropped datagrams. Unlike a NACK it teaches no address
    /// (nothing is sent in answer to it). See the module docs for
    /// what makes it count and what it does. `Replayed` means its count said nothing new.
    pub fn handle_overflow(
        &mut self,
        now: Instant,
        frame: &Frame<'_>,
        report: &Overflow,
        mac: &dyn NackMac,
    ) -> NackVerdict {
        self.tick(now);
        self.stats.overflow_reports += 1;
        let verdict = self.accept_overflow(now, frame, report, mac);
        if verdict == NackVerdict::Forged {
            self.stats.nacks_forged += 1;
        }
        verdict
    }

    fn accept_overflow(
        &mut self,
        now: Instant,
        frame: &Frame<'_>,
        report: &Overflow,
        mac: &dyn NackMac,
    ) -> NackVerdict {
        if self.finished {
            return NackVerdict::Inactive;
        }
        if report.session != self.config.session {
            return NackVerdict::Forged;
        }
        if let Err(v) = self.verify_tag(report.device_id, frame, mac) {
            return v;
        }
        let Some(rx) = self.receivers.get_mut(&report.device_id) else {
            return NackVerdict::UnknownDevice;
        };
        if report.drops <= rx.drops {
            return NackVerdict::Replayed;
        }
        rx.drops = report.drops;
        if rx.status != Status::Active {
            return NackVerdict::Inactive;
        }
        // One that overflows even at the floor is the demotion rules' business.
        if rx.floor_strikes >= FLOOR_STRIKES || !self.config.pace_follow {
            return NackVerdict::Accepted;
        }
        if self.pacing.overflow(now) {
            self.stats.rate_cuts += 1;
        }
        self.stats.rate = self.pacing.rate();
        if self.pacing.at_floor() {
            rx.floor_strikes += 1;
        }
        NackVerdict::Accepted
    }
}

#[cfg(test)]
mod tests;
