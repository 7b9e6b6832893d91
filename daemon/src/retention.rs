//! Retention of the event log and of finished commands' results, pruned incrementally by
//! the gateway loop (sans clock: the loop passes the time).
//!
//! Each pass is one store batch deleting at most [`PASS_BUDGET`] entries (the oldest
//! events first, then finished commands with their results, device after device from where
//! the previous pass stopped), so pruning a large backlog never holds the loop: while work
//! remains the next pass is due [`BUSY_INTERVAL`] later, with every other event served in
//! between; once a sweep found nothing left, the next is due [`IDLE_INTERVAL`] later. A pass
//! that deletes nothing is not committed (no disk sync).

use std::time::Duration;

use fleetcast_store::prelude::*;
use fleetcast_store::DeviceId;
use fleetcast_wire::Instant;

/// Most entries one pass deletes (and steps it takes over the device table).
pub const PASS_BUDGET: usize = 512;
/// Between passes while a backlog remains.
pub const BUSY_INTERVAL: Duration = Duration::from_millis(50);
/// Between sweeps once nothing is left to prune.
pub const IDLE_INTERVAL: Duration = Duration::from_secs(60);

const DAY_MS: u64 = 24 * 3_600_000;

/// What is kept (`0`: no limit of that kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionConfig {
    /// Events older than this many days are deleted.
    pub events_keep_days: u64,
    /// At most this many events are kept.
    pub events_max: u64,
    /// The results (and commands) of the last this many finished commands of each device are
    /// kept; older ones are deleted. Pending and running commands are never touched.
    pub results_per_device: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            events_keep_days: 30,
            events_max: 100_000,
            results_per_device: 1000,
        }
    }
}

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Events deleted.
    pub events: usize,
    /// Finished commands deleted with their results.
    pub results: usize,
    /// Whether more work may remain (the next pass is due soon).
    pub more: bool,
}

/// The incremental pruner.
#[derive(Debug, Clone)]
pub struct Pruner {
    cfg: RetentionConfig,
    next: Instant,
    /// Where the device sweep resumes.
    cursor: DeviceId,
}

impl Pruner {
    /// A pruner whose first pass is due at once.
    pub fn new(cfg: RetentionConfig) -> Pruner {
        Pruner {
            cfg,
            next: Instant::ZERO,
            cursor: DeviceId(0),
        }
    }

    /// When the next pass is due.
    pub fn next_due(&self) -> Instant {
        self.next
    }

    /// Runs one pass if it is due at `now` (`wall_ms`: the wall clock, events carry it).
    pub fn run_due(
        &mut self,
        store: &mut dyn Engine,
        now: Instant,
        wall_ms: u64,
    ) -> Option<fleetcast_store::Result<Pass>> {
        if now < self.next {
            return None;
        }
        let r = self.pass(store, wall_ms);
        self.next = match &r {
            Ok(p) if p.more => now + BUSY_INTERVAL,
            _ => now + IDLE_INTERVAL,
        };
        Some(r)
    }

    /// One bounded pass: one batch, at most [`PASS_BUDGET`] deletions, one commit if any.
    pub fn pass(&mut self, store: &mut dyn Engine, wall_ms: u64) -> fleetcast_store::Result<Pass> {
        let older_than = match self.cfg.events_keep_days {
            0 => 0,
            d => wall_ms.saturating_sub(d.saturating_mul(DAY_MS)),
        };
        let mut b = store.batch()?;
        let events = if older_than == 0 && self.cfg.events_max == 0 {
            0
        } else {
            b.prune_events(older_than, self.cfg.events_max, PASS_BUDGET)?
        };
        let mut more = events == PASS_BUDGET;
        let mut results = 0;
        if self.cfg.results_per_device > 0 && !more {
            let (n, next) = b.prune_results(
                self.cursor,
                self.cfg.results_per_device,
                PASS_BUDGET - events,
            )?;
            results = n;
            match next {
                Some(d) => {
                    self.cursor = d;
                    more = true;
                }
                None => self.cursor = DeviceId(0),
            }
        }
        b.commit()?;
        Ok(Pass {
            events,
            results,
            more,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_store::Store;
    use fleetcast_store::{Command, Event, EventKind, OnFailure};
    use fleetcast_wire::Step;

    fn fill(store: &mut dyn Engine, devices: u64, commands: u64, events: u64, old_ms: u64) {
        let mut b = store.batch().unwrap();
        for d in 0..devices {
            let dev = b.add_device(&format!("d{d}"), [1; 32], 0).unwrap();
            for seq in 1..=commands {
                let cmd = Command {
                    target: None,
                    steps: vec![Step::Report],
                    timeout_ms: 1000,
                    max_attempts: 1,
                    on_failure: OnFailure::Stop,
                };
                b.enqueue(dev, cmd).unwrap();
                let attempt = b.mark_transmitted(dev, seq, 1).unwrap();
                let ok = fleetcast_store::Received {
                    result: fleetcast_wire::CommandResult {
                        command_id: 1,
                        seq: 1,
                        attempt: 1,
                        exit_code: 0,
                        steps: vec![fleetcast_wire::StepResult {
                            status: fleetcast_wire::StepStatus::Ok,
                            exit_code: 0,
                            duration_ms: 1,
                        }],
                        output: b"".into(),
                        report: None,
                    },
                    at_ms: 2,
                };
                b.record_result(dev, seq, attempt, ok).unwrap();
            }
        }
        for i in 0..events {
            b.append_event(Event {
                time_ms: old_ms + i,
                device: None,
                kind: EventKind::Other,
                message: "x".into(),
            })
            .unwrap();
        }
        b.commit().unwrap();
    }

    fn counts(store: &Store, devices: u64) -> (usize, usize) {
        let s = store.snapshot().unwrap();
        let events = s.events_from(0, usize::MAX).unwrap().len();
        let commands = s
            .devices()
            .unwrap()
            .iter()
            .take(devices as usize)
            .map(|d| s.commands(d.id, 0, usize::MAX).unwrap().len())
            .sum();
        (events, commands)
    }

    /// A backlog is pruned in passes of at most PASS_BUDGET deletions, busy-scheduled until
    /// it is gone, then idle; what is kept is what the configuration says.
    #[test]
    fn a_backlog_goes_in_bounded_passes_then_the_pruner_idles() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let day = 24 * 3_600_000;
        // 3 devices × 300 finished commands, 2,000 events of which 1,500 are 40 days old.
        fill(&mut store, 3, 300, 1500, 0);
        let now_wall = 41 * day;
        let mut b = store.batch().unwrap();
        for i in 0..500 {
            b.append_event(Event {
                time_ms: 40 * day + i,
                device: None,
                kind: EventKind::Other,
                message: "recent".into(),
            })
            .unwrap();
        }
        b.commit().unwrap();
        let cfg = RetentionConfig {
            events_keep_days: 30,
            events_max: 400,
            results_per_device: 50,
        };
        let mut p = Pruner::new(cfg);
        let mut t = Instant::ZERO;
        let mut passes = 0;
        loop {
            let pass = p.run_due(&mut store, t, now_wall).expect("due").unwrap();
            assert!(pass.events + pass.results <= PASS_BUDGET, "{pass:?}");
            passes += 1;
            assert!(passes < 100);
            if !pass.more {
                break;
            }
            assert_eq!(p.next_due(), t + BUSY_INTERVAL);
            assert!(p.run_due(&mut store, t, now_wall).is_none(), "not due yet");
            t = p.next_due();
        }
        assert_eq!(p.next_due(), t + IDLE_INTERVAL);
        // 1,600 events over the limit, 750 results: at least 5 passes.
        assert!(passes >= 5, "{passes}");
        assert_eq!(counts(&store, 3), (400, 3 * 50));
        let s = store.snapshot().unwrap();
        let kept = s.events_from(0, usize::MAX).unwrap();
        assert!(kept.iter().all(|(_, e)| e.message == "recent"));
        assert_eq!(kept.last().unwrap().0, 2000, "the newest stays");
        // Idle sweep: nothing to do, nothing committed.
        let seq = s.commit_seq().unwrap();
        drop(s);
        let pass = p.pass(&mut store, now_wall).unwrap();
        assert_eq!(pass, Pass::default());
        assert_eq!(store.snapshot().unwrap().commit_seq().unwrap(), seq);
    }

    #[test]
    fn zero_means_no_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        fill(&mut store, 2, 20, 100, 0);
        let mut p = Pruner::new(RetentionConfig {
            events_keep_days: 0,
            events_max: 0,
            results_per_device: 0,
        });
        assert_eq!(p.pass(&mut store, u64::MAX / 2).unwrap(), Pass::default());
        assert_eq!(counts(&store, 2), (100, 40));
    }
}
