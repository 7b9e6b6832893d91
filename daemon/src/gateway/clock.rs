//! Time in the loop: the driver's [`Clock`] (the one place the daemon reads time), the
//! poll timeout (the earliest of every deadline), and the connection timer heap
//! (`(deadline, index, id)`; an entry whose id no longer matches its slot is stale and skipped).

use super::*;

/// The driver's clock: the only place the daemon reads time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: std::time::Instant,
}

impl Clock {
    /// Starts the monotonic epoch now.
    #[allow(clippy::disallowed_methods)] // The driver's clock: the one place time is read.
    pub fn new() -> Self {
        Clock {
            epoch: std::time::Instant::now(),
        }
    }

    /// (monotonic instant for the cores, wall-clock ms since the UNIX epoch for the store).
    #[allow(clippy::disallowed_methods)] // The driver's clock: the one place time is read.
    pub fn read(&self) -> (Instant, u64) {
        let mono = Instant::from_micros(self.epoch.elapsed().as_micros() as u64);
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        (mono, wall)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Gateway {
    pub(super) fn poll_timeout(&self, now: Instant, wall: u64, limit: Option<Instant>) -> Duration {
        // Inputs wait while a batch is in flight: its commit wakes the loop (`WAKE`).
        let inputs = !self.inputs.is_empty() && !self.fleet.busy();
        if !self.work.ready.is_empty() || inputs || self.mcast.socket_ready {
            return Duration::ZERO;
        }
        let mut next = limit.unwrap_or(now + Duration::from_secs(3600));
        if let Some(t) = self.mcast.dist.as_ref().and_then(|d| d.poll_timeout(now)) {
            next = next.min(t.max(now));
        }
        if let Some(w) = &self.mcast.watch {
            next = next.min(w.next_scan.max(now));
        }
        if let Some(Reverse((t, _, _))) = self.work.timers.peek() {
            next = next.min(*t);
        }
        if let Some(d) = self.fleet.next_deadline().filter(|_| !self.fleet.busy()) {
            next = next.min(now + Duration::from_millis(d.saturating_sub(wall)));
        }
        if let Some(t) = self
            .telemetry
            .endpoint
            .as_ref()
            .and_then(|m| m.next_deadline())
        {
            next = next.min(t.max(now));
        }
        if let Some(t) = self.limits.next_retry() {
            next = next.min(t.max(now));
        }
        next = next.min(self.pruner.next_due().max(now));
        // Round up to whole milliseconds so we never spin on a sub-ms timer.
        let d = next - now;
        Duration::from_millis(d.as_micros().div_ceil(1000) as u64)
    }

    pub(super) fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, idx, id))) = self.work.timers.peek().copied() {
            if t > now {
                break;
            }
            self.work.timers.pop();
            let Some(slot) = self.conns.get_mut(idx) else {
                continue;
            };
            if slot.id != id {
                continue; // A stale timer of a connection that is gone.
            }
            let c = match &mut slot.conn {
                Conn::Agent(c) => c,
                Conn::Relay(_) => {
                    self.relay_timer(idx, now);
                    continue;
                }
                Conn::Artifact(_) => {
                    self.artifact_timer(idx, now);
                    continue;
                }
                Conn::Admin(_) => continue,
            };
            match c.session.as_mut() {
                Some(s) => {
                    // Stale entries are harmless: the core ignores early calls.
                    if s.poll_timeout().is_some_and(|d| d <= now) {
                        s.handle_timeout(now);
                        self.drain_session(idx, now);
                    }
                }
                None => {
                    if ladder::unsessioned_timer(c, id, now) {
                        self.work.touched.push(idx);
                    }
                }
            }
        }
    }
}
