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
//! Failed --retry--> Running (same seq, attempts reset);  Failed --skip--> Running | Done
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

    /// `seq` is being transmitted at `now_ms`. `first_pending` is the first pending command.
    /// The command in flight is sent again to a device that proved it never received it
    /// (its `Hello` names an older command): not a new attempt, so `attempts` is unchanged;
    /// only the transmission time moves (the result deadline restarts).
    pub(crate) fn redeliver(&mut self, seq: u64, now_ms: u64) -> R {
        match self.status {
            QueueStatus::AwaitingResult if self.cursor == Some(seq) => {
                self.transmitted_ms = now_ms;
                Ok(())
            }
            QueueStatus::AwaitingResult => Err(Illegal::NotNextCommand {
                expected: self.cursor,
                found: seq,
            }),
            s => Err(wrong("redeliver", s)),
        }
    }

    pub(crate) fn mark_transmitted(
        &mut self,
        seq: u64,
        first_pending: Option<u64>,
        max_attempts: u32,
        now_ms: u64,
    ) -> R {
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
        self.cursor = Some(seq);
        self.transmitted_ms = now_ms;
        self.status = QueueStatus::AwaitingResult;
        Ok(())
    }

    /// True if a result for `seq` may be recorded now (it is the command in flight, or was
    /// requeued after a timeout and the late result arrives before the retransmission).
    pub(crate) fn accepts_result(&self, seq: u64) -> bool {
        self.cursor == Some(seq)
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

    /// The agent announced that `seq` is rebooting the device.
    pub(crate) fn reboot_started(&mut self, seq: u64, has_reboot: bool, deadline_ms: u64) -> R {
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
        Ok(())
    }

    /// Checks that the reboot of `seq` (a command with a reboot step when `has_reboot`) may
    /// complete. Besides the normal `rebooting` case, two others are a device that really did
    /// reboot and must not be refused (the boot id check still applies):
    /// - `awaiting_result` for a reboot command: the agent's `RebootStarting` was never stored
    ///   (the gateway died first); the completion implies the start.
    /// - `failed` with `RebootDeadlineMissed`: the device came back late; the reboot completed
    ///   after all and the queue goes on (the failure stays in the event log).
    pub(crate) fn check_reboot_completed(&self, seq: u64, has_reboot: bool) -> R {
        let late = self.status == QueueStatus::Failed
            && self.failure == Some(FailReason::RebootDeadlineMissed);
        let lost_start = self.status == QueueStatus::AwaitingResult && has_reboot;
        if self.status != QueueStatus::Rebooting && !late && !lost_start {
            return Err(wrong("reboot_completed", self.status));
        }
        if self.cursor != Some(seq) {
            return Err(Illegal::NotTransmitted { seq });
        }
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

    /// Operator retry of a failed queue: the failed command is transmitted again.
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

    /// Operator cancel: every pending command not in flight is dropped (the caller deletes
    /// them). Returns the in-flight command to keep, if any.
    pub(crate) fn cancel(&mut self) -> Option<u64> {
        match self.status {
            QueueStatus::AwaitingResult | QueueStatus::Rebooting => self.cursor,
            QueueStatus::Paused => {
                self.paused_from = if self.completed_through > 0 {
                    QueueStatus::Done
                } else {
                    QueueStatus::Idle
                };
                None
            }
            _ => {
                self.failure = None;
                self.attempts = 0;
                self.settle(false);
                None
            }
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
        assert!(q.accepts_result(1));
        assert!(!q.accepts_result(2));
        q.command_succeeded(true);
        assert_eq!((q.status, q.completed_through), (QueueStatus::Running, 1));
        q.mark_transmitted(2, Some(2), 1, 6).unwrap();
        q.command_succeeded(false);
        assert_eq!(q.status, QueueStatus::Done);
        assert!(!q.accepts_result(2));
    }

    #[test]
    fn reboot_cycle_and_deadline() {
        let mut q = QueueState::default();
        q.enqueue();
        assert!(matches!(
            q.reboot_started(1, true, 10),
            Err(Illegal::WrongStatus { .. })
        ));
        q.mark_transmitted(1, Some(1), 1, 0).unwrap();
        assert_eq!(
            q.reboot_started(1, false, 10),
            Err(Illegal::NotARebootCommand { seq: 1 })
        );
        q.reboot_started(1, true, 10).unwrap();
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
        late.check_reboot_completed(1, true).unwrap();
        late.command_succeeded(false);
        assert_eq!((late.status, late.failure), (QueueStatus::Done, None));
        q.check_reboot_completed(1, true).unwrap();
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
        assert_eq!((q.status, q.attempts), (QueueStatus::Running, 0));
        q.mark_transmitted(1, Some(1), 2, 300).unwrap();
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
