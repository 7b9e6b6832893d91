//! The command-queue state machine, as pure functions on [`QueueState`].
//!
//! The batch layer reads the facts a transition needs (the first pending command, whether
//! another command follows it, the command's policy), calls one of these functions, and only
//! writes if it returned `Ok`. So a refused transition never writes anything.
//!
//! Invariants (checked by the property and crash tests):
//! - `next_seq` is greater than every sequence number ever enqueued for the device.
//! - A command is *pending* iff its seq is greater than `completed_through` and it still exists.
//!   Every command with seq ≤ `completed_through` that still exists has a result (retention,
//!   `Batch::prune_results`, deletes old finished commands together with their results).
//! - `Running` ⇒ a pending command exists, none is in flight.
//! - `AwaitingResult` / `Rebooting` ⇒ `cursor` is the first pending command and `attempts ≥ 1`.
//! - `attempt` numbers the cursor command's transmissions that count (1, 2, …): it grows by
//!   one with every one of them and is never reset while the cursor stays on the command
//!   (an operator's retry resets `attempts`, the policy's count, not `attempt`), so every
//!   attempt the device is sent has a number it never saw before. A redelivery keeps it.
//!   Only a result (or reboot completion) of the current `attempt` is accepted.
//! - `Idle` / `Done` ⇒ nothing pending. `Failed` ⇒ `failure` is set and `cursor` is the
//!   first pending command (the one that failed).
//! - At most one command is in flight per device.
//!
//! Transitions:
//! ```text
//! Idle|Done --enqueue--> Running --mark_transmitted--> AwaitingResult
//! AwaitingResult --record_result(ok | failed & Continue)--> Running | Done   (next / none)
//! AwaitingResult --record_result(failed), attempts < max--> Running (same seq again)
//! AwaitingResult --record_result(failed & Stop), attempts = max--> Failed(CommandFailed)
//! AwaitingResult --command_timed_out--> Running (retry) | Failed(AttemptsExhausted) | next
//! AwaitingResult --reboot_started--> Rebooting --reboot_completed--> as record_result
//! Rebooting --reboot_deadline_missed--> Failed(RebootDeadlineMissed)
//! Idle|Running|Done --pause--> Paused --resume--> Idle|Running|Done
//! AwaitingResult|Rebooting --pause--> (same, pause_requested) --command ends--> Paused
//! Failed --retry--> Running (same seq, attempts reset; its next transmission is a new attempt)
//! Failed --skip--> Running | Done
//! any --cancel--> Idle | Done | Paused (every pending command dropped, the one in flight too)
//! ```

use crate::error::Illegal;
use crate::types::{CommandPolicy, FailReason, OnFailure, QueueState, QueueStatus};

type R<T = ()> = std::result::Result<T, Illegal>;

fn wrong(op: &'static str, status: QueueStatus) -> Illegal {
    Illegal::WrongStatus { op, status }
}

/// What happens after a command attempt ended in failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterFailure {
    /// The same command will be transmitted again.
    Retry,
    /// The queue stopped.
    Stopped,
    /// The command is finished (as failed) and the queue moved on.
    MovedOn,
}

impl QueueState {
    /// Status when nothing is in flight, given whether a command is pending.
    fn settle(&mut self, pending: bool) {
        let base = if pending {
            QueueStatus::Running
        } else if self.completed_through > 0 {
            QueueStatus::Done
        } else {
            QueueStatus::Idle
        };
        if self.pause_requested {
            self.pause_requested = false;
            self.paused_from = base;
            self.status = QueueStatus::Paused;
        } else {
            self.status = base;
        }
    }

    /// A command was appended; returns its sequence number.
    pub(crate) fn enqueue(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        match self.status {
            QueueStatus::Idle | QueueStatus::Done => self.status = QueueStatus::Running,
            QueueStatus::Paused => self.paused_from = QueueStatus::Running,
            _ => {}
        }
        seq
    }

    /// The command in flight is sent again to a device that proved it never received it
    /// (its `Hello` names an older command or attempt): not a new attempt, so `attempts` and
    /// `attempt` are unchanged; only the transmission time moves (the result deadline
    /// restarts). Returns the attempt being redelivered.
    pub(crate) fn redeliver(&mut self, seq: u64, now_ms: u64) -> R<u32> {
        match self.status {
            QueueStatus::AwaitingResult if self.cursor == Some(seq) => {
                self.transmitted_ms = now_ms;
                Ok(self.attempt)
            }
            QueueStatus::AwaitingResult => Err(Illegal::NotNextCommand {
                expected: self.cursor,
                found: seq,
            }),
            s => Err(wrong("redeliver", s)),
        }
    }

    /// `seq` is being transmitted at `now_ms` as a new attempt; returns its attempt number.
    /// `first_pending` is the first pending command.
    pub(crate) fn mark_transmitted(
        &mut self,
        seq: u64,
        first_pending: Option<u64>,
        max_attempts: u32,
        now_ms: u64,
    ) -> R<u32> {
        match self.status {
            QueueStatus::Running => {
                if first_pending != Some(seq) {
                    return Err(Illegal::NotNextCommand {
                        expected: first_pending,
                        found: seq,
                    });
                }
                self.attempts = if self.cursor == Some(seq) {
                    self.attempts.saturating_add(1)
                } else {
                    1
                };
            }
            // Retransmission of the command in flight (e.g. after a reconnect).
            QueueStatus::AwaitingResult if self.cursor == Some(seq) => {
                self.attempts = self.attempts.saturating_add(1);
            }
            QueueStatus::AwaitingResult => {
                return Err(Illegal::NotNextCommand {
                    expected: self.cursor,
                    found: seq,
                })
            }
            s => return Err(wrong("mark_transmitted", s)),
        }
        // Never exceed the policy: a retransmission beyond it is a bug in the caller.
        if self.attempts > max_attempts.max(1) {
            return Err(Illegal::AttemptsExhausted { seq });
        }
        self.attempt = if self.cursor == Some(seq) {
            self.attempt.saturating_add(1)
        } else {
            1
        };
        // Which boot the device runs this attempt on is recorded with it (reboot commands).
        self.boot_left = None;
        self.cursor = Some(seq);
        self.transmitted_ms = now_ms;
        self.status = QueueStatus::AwaitingResult;
        Ok(self.attempt)
    }

    /// True if a result for attempt `attempt` of `seq` may be recorded now (it is the command
    /// in flight, or was requeued after a timeout and the late result arrives before the
    /// retransmission), and it is the current attempt.
    pub(crate) fn accepts_result(&self, seq: u64, attempt: u32) -> bool {
        self.cursor == Some(seq)
            && attempt == self.attempt
            && seq > self.completed_through
            && matches!(
                self.status,
                QueueStatus::AwaitingResult | QueueStatus::Running | QueueStatus::Paused
            )
    }

    /// The command at the cursor finished successfully.
    pub(crate) fn command_succeeded(&mut self, more_pending: bool) {
        if let Some(c) = self.cursor {
            self.completed_through = c;
        }
        self.attempts = 0;
        self.failure = None;
        self.settle(more_pending);
    }

    /// An attempt of the command at the cursor failed (`reason`). Applies the policy.
    pub(crate) fn command_failed(
        &mut self,
        cmd: &CommandPolicy,
        reason: FailReason,
        more_pending: bool,
    ) -> AfterFailure {
        if self.attempts < cmd.max_attempts {
            self.settle(true);
            return AfterFailure::Retry;
        }
        match cmd.on_failure {
            OnFailure::Stop => {
                self.status = QueueStatus::Failed;
                self.failure = Some(reason);
                self.pause_requested = false;
                AfterFailure::Stopped
            }
            OnFailure::Continue => {
                self.command_succeeded(more_pending);
                AfterFailure::MovedOn
            }
        }
    }

    /// Checks that `seq` in flight may time out at `now_ms`.
    pub(crate) fn check_timeout(&self, seq: u64, timeout_ms: u64, now_ms: u64) -> R {
        if self.status != QueueStatus::AwaitingResult {
            return Err(wrong("command_timed_out", self.status));
        }
        if self.cursor != Some(seq) {
            return Err(Illegal::NotTransmitted { seq });
        }
        let deadline_ms = self.transmitted_ms.saturating_add(timeout_ms);
        if now_ms < deadline_ms {
            return Err(Illegal::DeadlineNotReached { deadline_ms });
        }
        Ok(())
    }

    /// The agent announced that `seq` is rebooting the device, leaving boot `boot_id`.
    pub(crate) fn reboot_started(
        &mut self,
        seq: u64,
        has_reboot: bool,
        deadline_ms: u64,
        boot_id: &str,
    ) -> R {
        if self.status != QueueStatus::AwaitingResult {
            return Err(wrong("reboot_started", self.status));
        }
        if self.cursor != Some(seq) {
            return Err(Illegal::NotTransmitted { seq });
        }
        if !has_reboot {
            return Err(Illegal::NotARebootCommand { seq });
        }
        self.status = QueueStatus::Rebooting;
        self.reboot_deadline_ms = deadline_ms;
        self.boot_left = Some(boot_id.to_owned());
        Ok(())
    }

    /// Checks that the reboot of `seq` (a command with a reboot step when `has_reboot`) may
    /// complete. Besides the normal `rebooting` case, two others are a device that really did
    /// reboot and must not be refused (the boot id check still applies):
    /// - `awaiting_result` for a reboot command: the agent's `RebootStarting` was never stored
    ///   (the gateway died first); the completion implies the start.
    /// - `failed` with `RebootDeadlineMissed`: the device came back late; the reboot completed
    ///   after all and the queue goes on (the failure stays in the event log).
    ///
    /// The completion must be of the current attempt ([`Illegal::StaleAttempt`] otherwise) and
    /// on a boot other than the one the device left ([`Illegal::BootIdUnchanged`]), when that
    /// one is known ([`QueueState::boot_left`]).
    pub(crate) fn check_reboot_completed(
        &self,
        seq: u64,
        attempt: u32,
        has_reboot: bool,
        boot_id: &str,
    ) -> R {
        let late = self.status == QueueStatus::Failed
            && self.failure == Some(FailReason::RebootDeadlineMissed);
        let lost_start = self.status == QueueStatus::AwaitingResult && has_reboot;
        if self.status != QueueStatus::Rebooting && !late && !lost_start {
            return Err(wrong("reboot_completed", self.status));
        }
        if self.cursor != Some(seq) {
            return Err(Illegal::NotTransmitted { seq });
        }
        if attempt != self.attempt {
            return Err(Illegal::StaleAttempt {
                seq,
                attempt,
                current: self.attempt,
            });
        }
        if self.boot_left.as_deref() == Some(boot_id) {
            return Err(Illegal::BootIdUnchanged);
        }
        Ok(())
    }

    /// The device runs the cursor command `seq` on boot `boot_id` (its session's): a reboot
    /// it does must come back on another, even if its `RebootStarting` is never stored.
    pub(crate) fn boot_at_dispatch(&mut self, seq: u64, boot_id: &str) -> R {
        if self.status != QueueStatus::AwaitingResult {
            return Err(wrong("boot_at_dispatch", self.status));
        }
        if self.cursor != Some(seq) {
            return Err(Illegal::NotTransmitted { seq });
        }
        self.boot_left = Some(boot_id.to_owned());
        Ok(())
    }

    /// The device did not come back by the deadline.
    pub(crate) fn reboot_deadline_missed(&mut self, now_ms: u64) -> R {
        if self.status != QueueStatus::Rebooting {
            return Err(wrong("reboot_deadline_missed", self.status));
        }
        if now_ms < self.reboot_deadline_ms {
            return Err(Illegal::DeadlineNotReached {
                deadline_ms: self.reboot_deadline_ms,
            });
        }
        self.status = QueueStatus::Failed;
        self.failure = Some(FailReason::RebootDeadlineMissed);
        self.pause_requested = false;
        Ok(())
    }

    /// Operator pause.
    pub(crate) fn pause(&mut self) -> R {
        match self.status {
            QueueStatus::Idle | QueueStatus::Running | QueueStatus::Done => {
                self.paused_from = self.status;
                self.status = QueueStatus::Paused;
            }
            QueueStatus::AwaitingResult | QueueStatus::Rebooting => self.pause_requested = true,
            QueueStatus::Paused => {}
            QueueStatus::Failed => return Err(wrong("pause", self.status)),
        }
        Ok(())
    }

    /// Operator resume. `pending`: a command is pending.
    pub(crate) fn resume(&mut self, pending: bool) -> R {
        match self.status {
            QueueStatus::Paused => self.settle(pending),
            QueueStatus::AwaitingResult | QueueStatus::Rebooting if self.pause_requested => {
                self.pause_requested = false;
            }
            s => return Err(wrong("resume", s)),
        }
        Ok(())
    }

    /// Operator retry of a failed queue: the failed command is transmitted again, as a new
    /// attempt (`attempt` goes on counting), with the policy's `attempts` reset.
    pub(crate) fn retry(&mut self) -> R {
        if self.status != QueueStatus::Failed {
            return Err(wrong("retry", self.status));
        }
        self.status = QueueStatus::Running;
        self.attempts = 0;
        self.failure = None;
        Ok(())
    }

    /// Operator skip of the failed command.
    pub(crate) fn skip(&mut self, more_pending: bool) -> R {
        if self.status != QueueStatus::Failed {
            return Err(wrong("skip", self.status));
        }
        self.command_succeeded(more_pending);
        Ok(())
    }

    /// Operator cancel: every pending command is dropped (the caller deletes them and clears
    /// the cursor), the one in flight too, so a queue waiting for a result or a reboot is free
    /// at once. The device is not told: a command it is running finishes there, and its late
    /// result is refused (the cursor no longer names it).
    pub(crate) fn cancel(&mut self) {
        self.failure = None;
        self.attempts = 0;
        match self.status {
            QueueStatus::Paused => {
                self.paused_from = if self.completed_through > 0 {
                    QueueStatus::Done
                } else {
                    QueueStatus::Idle
                };
            }
            // A pause requested while the command was in flight takes effect now.
            _ => self.settle(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn cmd(max_attempts: u32, on_failure: OnFailure) -> CommandPolicy {
        CommandPolicy {
            timeout_ms: 100,
            max_attempts,
            on_failure,
        }
    }

    #[test]
    fn dispatch_result_next() {
        let mut q = QueueState::default();
        assert_eq!(q.enqueue(), 1);
        assert_eq!(q.enqueue(), 2);
        assert_eq!(q.status, QueueStatus::Running);
        assert_eq!(
            q.mark_transmitted(2, Some(1), 1, 5),
            Err(Illegal::NotNextCommand {
                expected: Some(1),
                found: 2
            })
        );
        q.mark_transmitted(1, Some(1), 1, 5).unwrap();
        assert_eq!(
            (q.status, q.cursor, q.attempts),
            (QueueStatus::AwaitingResult, Some(1), 1)
        );
        assert!(q.accepts_result(1, 1));
        assert!(!q.accepts_result(1, 2));
        assert!(!q.accepts_result(2, 1));
        q.command_succeeded(true);
        assert_eq!((q.status, q.completed_through), (QueueStatus::Running, 1));
        q.mark_transmitted(2, Some(2), 1, 6).unwrap();
        q.command_succeeded(false);
        assert_eq!(q.status, QueueStatus::Done);
        assert!(!q.accepts_result(2, 1));
    }

    #[test]
    fn reboot_cycle_and_deadline() {
        let mut q = QueueState::default();
        q.enqueue();
        assert!(matches!(
            q.reboot_started(1, true, 10, "b0"),
            Err(Illegal::WrongStatus { .. })
        ));
        q.mark_transmitted(1, Some(1), 1, 0).unwrap();
        assert_eq!(
            q.reboot_started(1, false, 10, "b0"),
            Err(Illegal::NotARebootCommand { seq: 1 })
        );
        q.reboot_started(1, true, 10, "b0").unwrap();
        assert_eq!(q.status, QueueStatus::Rebooting);
        assert!(matches!(
            q.mark_transmitted(1, Some(1), 1, 1),
            Err(Illegal::WrongStatus {
                status: QueueStatus::Rebooting,
                ..
            })
        ));
        assert_eq!(
            q.reboot_deadline_missed(9),
            Err(Illegal::DeadlineNotReached { deadline_ms: 10 })
        );
        let mut late = q.clone();
        late.reboot_deadline_missed(10).unwrap();
        assert_eq!(late.status, QueueStatus::Failed);
        assert_eq!(late.failure, Some(FailReason::RebootDeadlineMissed));
        // Coming back late still completes the reboot; the queue then goes on.
        late.check_reboot_completed(1, 1, true, "b1").unwrap();
        late.command_succeeded(false);
        assert_eq!((late.status, late.failure), (QueueStatus::Done, None));
        assert_eq!(
            q.check_reboot_completed(1, 1, true, "b0"),
            Err(Illegal::BootIdUnchanged),
            "back on the boot it left"
        );
        q.check_reboot_completed(1, 1, true, "b1").unwrap();
        q.command_succeeded(false);
        assert_eq!(q.status, QueueStatus::Done);
    }

    #[test]
    fn retries_then_policy() {
        let c = cmd(2, OnFailure::Stop);
        let mut q = QueueState::default();
        q.enqueue();
        q.mark_transmitted(1, Some(1), 2, 0).unwrap();
        assert_eq!(
            q.check_timeout(1, 100, 99),
            Err(Illegal::DeadlineNotReached { deadline_ms: 100 })
        );
        q.check_timeout(1, 100, 100).unwrap();
        assert_eq!(
            q.command_failed(&c, FailReason::AttemptsExhausted, false),
            AfterFailure::Retry
        );
        assert_eq!(q.status, QueueStatus::Running);
        q.mark_transmitted(1, Some(1), 2, 200).unwrap();
        assert_eq!(q.attempts, 2);
        assert!(q.mark_transmitted(1, Some(1), 2, 201).is_err());
        assert_eq!(
            q.command_failed(&c, FailReason::CommandFailed, false),
            AfterFailure::Stopped
        );
        assert_eq!(q.status, QueueStatus::Failed);
        q.retry().unwrap();
        assert_eq!(
            (q.status, q.attempts, q.attempt),
            (QueueStatus::Running, 0, 2)
        );
        // The operator's retry is a new attempt (3), counted afresh against the policy.
        assert_eq!(q.mark_transmitted(1, Some(1), 2, 300), Ok(3));
        assert_eq!((q.attempts, q.attempt), (1, 3));
        assert!(
            !q.accepts_result(1, 2),
            "a result of the attempt before the retry"
        );
        assert!(q.accepts_result(1, 3));
        let cont = cmd(1, OnFailure::Continue);
        assert_eq!(
            q.command_failed(&cont, FailReason::CommandFailed, false),
            AfterFailure::MovedOn
        );
        assert_eq!((q.status, q.completed_through), (QueueStatus::Done, 1));
    }

    #[test]
    fn pause_while_in_flight_takes_effect_after() {
        let mut q = QueueState::default();
        q.enqueue();
        q.enqueue();
        q.mark_transmitted(1, Some(1), 1, 0).unwrap();
        q.pause().unwrap();
        assert_eq!(q.status, QueueStatus::AwaitingResult);
        q.command_succeeded(true);
        assert_eq!(
            (q.status, q.paused_from),
            (QueueStatus::Paused, QueueStatus::Running)
        );
        assert!(q.mark_transmitted(2, Some(2), 1, 1).is_err());
        q.resume(true).unwrap();
        assert_eq!(q.status, QueueStatus::Running);
        assert!(q.resume(true).is_err());
    }
}

#[cfg(test)]
mod attempt_tests {
    use super::*;

    #[test]
    fn every_counted_transmission_is_a_new_attempt_and_a_redelivery_is_not() {
        let mut q = QueueState::default();
        q.enqueue();
        q.enqueue();
        assert_eq!(q.mark_transmitted(1, Some(1), 3, 0), Ok(1));
        assert_eq!(q.redeliver(1, 5), Ok(1));
        assert_eq!((q.attempt, q.attempts, q.transmitted_ms), (1, 1, 5));
        let c = CommandPolicy {
            timeout_ms: 10,
            max_attempts: 3,
            on_failure: OnFailure::Stop,
        };
        assert_eq!(
            q.command_failed(&c, FailReason::CommandFailed, true),
            AfterFailure::Retry
        );
        assert_eq!(q.mark_transmitted(1, Some(1), 3, 10), Ok(2));
        q.command_succeeded(true);
        // The next command starts at attempt 1 again.
        assert_eq!(q.mark_transmitted(2, Some(2), 3, 20), Ok(1));
        assert_eq!(
            q.check_reboot_completed(2, 2, true, "b1"),
            Err(Illegal::StaleAttempt {
                seq: 2,
                attempt: 2,
                current: 1
            })
        );
    }

    #[test]
    fn cancel_releases_a_command_in_flight() {
        for rebooting in [false, true] {
            let mut q = QueueState::default();
            q.enqueue();
            q.mark_transmitted(1, Some(1), 1, 0).unwrap();
            if rebooting {
                q.reboot_started(1, true, 100, "b0").unwrap();
            }
            q.cancel();
            assert_eq!((q.status, q.attempts), (QueueStatus::Idle, 0));
        }
        // A pause requested while in flight takes effect.
        let mut q = QueueState::default();
        q.enqueue();
        q.mark_transmitted(1, Some(1), 1, 0).unwrap();
        q.pause().unwrap();
        q.cancel();
        assert_eq!(
            (q.status, q.paused_from, q.pause_requested),
            (QueueStatus::Paused, QueueStatus::Idle, false)
        );
    }
}
