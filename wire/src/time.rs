//! Time as an input.
//!
//! The sans-IO cores never read a clock. Drivers read their monotonic clock once per event-loop
//! iteration and pass the result in as an [`Instant`]: microseconds since an epoch the driver
//! chose (usually the driver's start). Tests and simulations start at [`Instant::ZERO`] and move
//! time forward explicitly, so every run with the same seed is the same run.
//!
//! Invariant: a driver never passes an `Instant` earlier than one it passed before (monotonic).

use core::ops::{Add, AddAssign, Sub};
use core::time::Duration;

/// A point on the driver's monotonic clock, in microseconds since the driver's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// The driver's epoch.
    pub const ZERO: Instant = Instant(0);
    /// Later than every instant a driver will ever pass (about 584,000 years after the epoch).
    pub const FAR_FUTURE: Instant = Instant(u64::MAX);

    /// An instant `micros` microseconds after the epoch.
    pub const fn from_micros(micros: u64) -> Self {
        Instant(micros)
    }

    /// Microseconds since the epoch.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// `self - earlier`, or zero if `earlier` is later than `self`.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }

    /// `self + d`, saturating at [`Instant::FAR_FUTURE`].
    pub fn saturating_add(self, d: Duration) -> Instant {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(micros))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        self.saturating_add(d)
    }
}

impl AddAssign<Duration> for Instant {
    fn add_assign(&mut self, d: Duration) {
        *self = self.saturating_add(d);
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;
    fn sub(self, earlier: Instant) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Instant::from_micros(5);
        assert_eq!(t + Duration::from_micros(7), Instant::from_micros(12));
        assert_eq!(Instant::from_micros(12) - t, Duration::from_micros(7));
        assert_eq!(t - Instant::from_micros(12), Duration::ZERO);
        assert_eq!(
            Instant::FAR_FUTURE + Duration::from_secs(1),
            Instant::FAR_FUTURE
        );
        assert_eq!(t + Duration::MAX, Instant::FAR_FUTURE);
    }
}
