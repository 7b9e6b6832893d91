//! The agent end of a control session.
//!
//! Invariants:
//! - The first message (`Hello` or `Enrol`) is queued by [`AgentSession::new`]; nothing else is
//!   sent before `Welcome`.
//! - At most one command is in flight: executing (dispatched, no result sent) or awaiting its
//!   `ResultAck`. A result carried in `Hello.last` awaits its ack from the start, and is acked
//!   by a `ResultAck` or by `Welcome.acked_seq` reaching it. A second `Dispatch` while one is
//!   in flight is a protocol error, and so is a `Dispatch` whose `(seq, attempt)` is at or
//!   below one already executed (`Hello.last` or an earlier dispatch): running it would break
//!   exactly-once. The same seq with a higher attempt is a deliberate retry and runs.
//! - Once established, a heartbeat request goes out when nothing has been sent, or nothing
//!   heard, for `Welcome.heartbeat_ms` (0 disables heartbeats), and at most one per interval.
//! - After `RebootStarting` the session closes normally; the post-reboot `RebootComplete` goes
//!   on a new session, after its `Welcome`.

use alloc::borrow::Cow;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::time::Duration;

use super::timer::Timer;
use super::{
    millis, CloseInfo, Config, Conn, Input, Phase, ReceivedFrame, SessionError, TimeoutKind,
};
use crate::error::Error;
use crate::header::Frame;
use crate::msg::{
    CloseCode, CommandResult, Completion, ConfigReport, Enrol, Heartbeat, Hello, Message, Nack,
    RebootComplete, RebootStarting, Step, TaskAnswer, TaskAsk, TransferStatus, Welcome,
};
use crate::time::Instant;

/// The agent's first message on a session.
// A `Hello` carries a whole result (with its report) inline; the value is built once per
// session and moved once, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstMessage<'a> {
    /// An enrolled device connects (with its client certificate).
    Hello(Hello<'a>),
    /// A device not yet enrolled asks for a certificate (no client certificate).
    Enrol(Enrol<'a>),
}

/// What the agent core reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// The gateway accepted the `Hello`; commands may flow.
    Welcomed(Welcome),
    /// The gateway issued a certificate; it closes the session next. The driver stores the
    /// certificate and reconnects with it.
    Enrolled {
        /// The device's assigned id.
        device_id: u64,
        /// The `Enrolled` message (with the certificate).
        frame: ReceivedFrame,
    },
    /// A command to execute. The driver persists "executing seq, attempt" before running it,
    /// then calls [`AgentSession::send_result`] (or [`AgentSession::send_reboot_starting`] at a
    /// reboot step).
    Dispatch {
        /// The command's seq.
        seq: u64,
        /// Which attempt of it.
        attempt: u32,
        /// The command's id.
        command_id: u64,
        /// Whether its steps include `Reboot`.
        reboot: bool,
        /// The `Dispatch` message (with the steps).
        frame: ReceivedFrame,
    },
    /// The gateway stored the result of `seq` durably; the driver may forget it.
    ResultAcked {
        /// The acknowledged seq.
        seq: u64,
    },
    /// A distribution task for this device.
    Announce(ReceivedFrame),
    /// The gateway's view of a transfer.
    TransferStatus(TransferStatus),
    /// The gateway's answer to a `TaskAsk`.
    TaskAnswer(TaskAnswer),
    /// The session closed (exactly once per session, whoever closed it).
    Closed(CloseInfo),
}

/// The command slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Idle,
    /// Dispatched; no result sent yet.
    Executing {
        seq: u64,
        attempt: u32,
        command_id: u64,
        reboot: bool,
    },
    /// Result sent (or carried by `Hello.last`); waiting for its ack.
    AwaitingAck {
        seq: u64,
    },
}

impl Slot {
    fn seq(self) -> Option<u64> {
        match self {
            Slot::Idle => None,
            Slot::Executing { seq, .. } | Slot::AwaitingAck { seq } => Some(seq),
        }
    }
}

/// The agent end of one control session. See the [module docs](super) for the driving
/// contract: after every `handle_*` call or driver operation, drain
/// [`poll_transmit`](Self::poll_transmit), then [`poll_event`](Self::poll_event), then re-arm
/// from [`poll_timeout`](Self::poll_timeout).
#[derive(Debug)]
pub struct AgentSession {
    input: Input,
    core: Core,
}

#[derive(Debug)]
struct Core {
    conn: Conn,
    boot_id: [u8; 16],
    /// `Welcome.heartbeat_ms`, once established (`None`: heartbeats off).
    heartbeat: Option<Duration>,
    /// When the last heartbeat request was queued (or the session was established).
    last_ping: Instant,
    next_nonce: u64,
    slot: Slot,
    /// Highest `(seq, attempt)` executed: `Hello.last` or a dispatch of this session.
    last: Option<(u64, u32)>,
    /// Highest seq acknowledged in this session.
    acked: Option<u64>,
    events: VecDeque<AgentEvent>,
}

impl AgentSession {
    /// A session on a connection the agent opened at `now`; queues `first`.
    ///
    /// Fails with [`SessionError::Emit`] when `first` cannot be encoded.
    pub fn new(
        now: Instant,
        config: Config,
        first: FirstMessage<'_>,
    ) -> Result<Self, SessionError> {
        let (msg, phase, boot_id, last, slot) = match first {
            FirstMessage::Hello(h) => {
                let last = h.last.as_ref().map(|l| (l.seq, l.attempt));
                let slot = match &h.last {
                    Some(l) if l.result.is_some() => Slot::AwaitingAck { seq: l.seq },
                    _ => Slot::Idle,
                };
                let boot_id = h.boot_id;
                (
                    Message::Hello(h),
                    Phase::AwaitingWelcome,
                    boot_id,
                    last,
                    slot,
                )
            }
            FirstMessage::Enrol(e) => (
                Message::Enrol(e),
                Phase::AwaitingEnrolled,
                [0; 16],
                None,
                Slot::Idle,
            ),
        };
        let mut core = Core {
            conn: Conn::new(now, config, phase),
            boot_id,
            heartbeat: None,
            last_ping: now,
            next_nonce: 0,
            slot,
            last,
            acked: None,
            events: VecDeque::new(),
        };
        core.conn.queue(&msg)?;
        core.rearm();
        Ok(AgentSession {
            input: Input::new(config.max_frame_body),
            core,
        })
    }

    /// Bytes from the gateway, in any chunking. `Err` is the sticky fatal error: the session
    /// is closed and a `Close` naming the error is queued.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) -> Result<(), SessionError> {
        self.core.conn.check_open()?;
        if !data.is_empty() {
            self.core.conn.last_rx = now;
        }
        let core = &mut self.core;
        self.input.feed(data, |frame| core.on_frame(now, frame));
        self.core.rearm();
        self.core.conn.error.map_or(Ok(()), Err)
    }

    /// Fires the timers due at `now` (idle timeout, heartbeat).
    pub fn handle_timeout(&mut self, now: Instant) {
        let c = &mut self.core;
        if c.conn.phase == Phase::Closed {
            return;
        }
        if c.conn.timers.is_expired(Timer::Idle, now) {
            let info = c.conn.fail(SessionError::TimedOut(TimeoutKind::Idle));
            c.events.push_back(AgentEvent::Closed(info));
        } else if c.conn.timers.is_expired(Timer::Heartbeat, now) {
            let nonce = c.next_nonce;
            c.next_nonce = c.next_nonce.wrapping_add(1);
            // A heartbeat is a fixed-size message: it always encodes.
            let _ = c
                .conn
                .queue(&Message::Heartbeat(Heartbeat { nonce, echo: false }));
            c.last_ping = now;
        }
        c.rearm();
    }

    /// Appends pending bytes for the gateway to `buf`; returns how many, or `None` when there
    /// are none.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<usize> {
        let n = self.core.conn.poll_transmit(now, buf);
        self.core.rearm();
        n
    }

    /// The earliest instant at which [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.conn.timers.next()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        let e = self.core.events.pop_front();
        if e.is_none() && self.core.events.capacity() > 0 {
            self.core.events = VecDeque::new();
        }
        e
    }

    /// Whether the session is closed (flush `poll_transmit`, then shut the connection).
    pub fn is_closed(&self) -> bool {
        self.core.conn.phase == Phase::Closed
    }

    /// The session's phase.
    pub fn phase(&self) -> Phase {
        self.core.conn.phase
    }

    /// The sticky fatal error, if the session failed.
    pub fn error(&self) -> Option<SessionError> {
        self.core.conn.error
    }

    /// The seq of the command in flight (executing or awaiting its ack), if any.
    pub fn in_flight(&self) -> Option<u64> {
        self.core.slot.seq()
    }

    /// Declares that the driver is still executing attempt `attempt` of command `seq`,
    /// dispatched on an earlier session (this session's `Hello.last` named it without a
    /// result): its result may be sent on this session. Refused unless established with
    /// nothing in flight.
    pub fn resume_executing(
        &mut self,
        seq: u64,
        attempt: u32,
        command_id: u64,
        reboot: bool,
    ) -> Result<(), SessionError> {
        let c = &mut self.core;
        c.conn.check_established()?;
        if let Some(in_flight) = c.slot.seq() {
            return Err(SessionError::AlreadyInFlight { in_flight });
        }
        c.slot = Slot::Executing {
            seq,
            attempt,
            command_id,
            reboot,
        };
        Ok(())
    }

    /// Sends the result of the command being executed; it then awaits its ack.
    pub fn send_result(&mut self, result: &CommandResult<'_>) -> Result<(), SessionError> {
        let c = &mut self.core;
        c.conn.check_established()?;
        let Slot::Executing {
            seq,
            attempt,
            command_id,
            ..
        } = c.slot
        else {
            return Err(SessionError::NotInFlight { seq: result.seq });
        };
        if seq != result.seq {
            return Err(SessionError::NotInFlight { seq: result.seq });
        }
        if command_id != result.command_id {
            return Err(SessionError::CommandIdMismatch {
                seq,
                got: result.command_id,
                expected: command_id,
            });
        }
        if attempt != result.attempt {
            return Err(SessionError::AttemptMismatch {
                seq,
                got: result.attempt,
                expected: attempt,
            });
        }
        c.conn.queue(&Message::Result(result.clone()))?;
        c.slot = Slot::AwaitingAck { seq };
        Ok(())
    }

    /// Reports that the device is about to reboot for command `seq` (which must be executing
    /// and contain a `Reboot` step), then closes the session normally. The driver flushes the
    /// bytes before rebooting; the next session sends `RebootComplete`.
    pub fn send_reboot_starting(&mut self, seq: u64) -> Result<(), SessionError> {
        let c = &mut self.core;
        c.conn.check_established()?;
        let Slot::Executing {
            seq: s,
            command_id,
            reboot,
            ..
        } = c.slot
        else {
            return Err(SessionError::NotInFlight { seq });
        };
        if s != seq {
            return Err(SessionError::NotInFlight { seq });
        }
        if !reboot {
            return Err(SessionError::NotARebootCommand { seq });
        }
        c.conn.queue(&Message::RebootStarting(RebootStarting {
            command_id,
            seq,
            boot_id: c.boot_id,
        }))?;
        c.slot = Slot::Idle;
        let info = c.conn.close(CloseCode::NORMAL, "rebooting", false);
        c.events.push_back(AgentEvent::Closed(info));
        Ok(())
    }

    /// Reports the end of a reboot with the new configuration (first thing after `Welcome` on
    /// the post-reboot session).
    pub fn send_reboot_complete(&mut self, rc: &RebootComplete<'_>) -> Result<(), SessionError> {
        let c = &mut self.core;
        c.conn.check_established()?;
        if let Some(in_flight) = c.slot.seq() {
            return Err(SessionError::AlreadyInFlight { in_flight });
        }
        c.conn.queue(&Message::RebootComplete(rc.clone()))
    }

    /// Sends the device's configuration report on its own (e.g. after enrolment).
    pub fn send_report(&mut self, report: &ConfigReport<'_>) -> Result<(), SessionError> {
        self.core.conn.check_established()?;
        self.core.conn.queue(&Message::Report(report.clone()))
    }

    /// Reports the end of a distribution task.
    pub fn send_completion(&mut self, completion: &Completion<'_>) -> Result<(), SessionError> {
        self.core.conn.check_established()?;
        // Reborrows the reason: queueing encodes at once, nothing is copied.
        self.core.conn.queue(&Message::Completion(Completion {
            reason: Cow::Borrowed(&completion.reason),
            ..*completion
        }))
    }

    /// Reports transfer progress (the task table's `in_progress`; asking for completion is
    /// [`AgentSession::send_task_ask`]).
    pub fn send_transfer_status(&mut self, status: &TransferStatus) -> Result<(), SessionError> {
        self.core.conn.check_established()?;
        self.core.conn.queue(&Message::TransferStatus(*status))
    }

    /// The task finisher: asks the gateway to finish a task (or, with `task_id` 0, every task
    /// of this device), saying what the device holds.
    pub fn send_task_ask(&mut self, ask: &TaskAsk) -> Result<(), SessionError> {
        self.core.conn.check_established()?;
        self.core.conn.queue(&Message::TaskAsk(ask.clone()))
    }

    /// Sends a NACK over the control session.
    pub fn send_nack(&mut self, nack: &Nack) -> Result<(), SessionError> {
        self.core.conn.check_established()?;
        self.core.conn.queue(&Message::Nack(nack.clone()))
    }

    /// Closes the session with `code` and `reason` (truncated to the wire limit).
    pub fn close(&mut self, code: CloseCode, reason: &str) -> Result<(), SessionError> {
        let c = &mut self.core;
        c.conn.check_open()?;
        let info = c.conn.close(code, reason, false);
        c.events.push_back(AgentEvent::Closed(info));
        Ok(())
    }
}

impl Core {
    fn rearm(&mut self) {
        if self.conn.phase == Phase::Closed {
            self.conn.timers.clear();
            return;
        }
        let idle = self.conn.last_rx + self.conn.idle;
        self.conn.timers.set(Timer::Idle, Some(idle));
        let hb = match (self.conn.phase, self.heartbeat) {
            // Quiet in either direction for an interval, and no request in the last one.
            (Phase::Established, Some(hb)) => {
                let quiet = self.conn.last_tx.min(self.conn.last_rx);
                Some(quiet.max(self.last_ping) + hb)
            }
            _ => None,
        };
        self.conn.timers.set(Timer::Heartbeat, hb);
    }

    fn on_frame(&mut self, now: Instant, frame: Result<Frame<'_>, Error>) -> bool {
        let res = frame.map_err(SessionError::Wire).and_then(|frame| {
            let msg = Message::parse(&frame).map_err(SessionError::Wire)?;
            self.on_message(now, &frame, msg)
        });
        if let Err(e) = res {
            let info = self.conn.fail(e);
            self.events.push_back(AgentEvent::Closed(info));
        }
        self.conn.phase != Phase::Closed
    }

    fn on_message(
        &mut self,
        now: Instant,
        frame: &Frame<'_>,
        msg: Message<'_>,
    ) -> Result<(), SessionError> {
        match (self.conn.phase, msg) {
            (_, Message::Close(close)) => {
                let info = self.conn.close(close.code, &close.reason, true);
                self.events.push_back(AgentEvent::Closed(info));
            }
            (Phase::AwaitingWelcome, Message::Welcome(w)) => {
                self.conn.phase = Phase::Established;
                self.heartbeat = (w.heartbeat_ms > 0).then(|| millis(w.heartbeat_ms));
                self.conn.heartbeats_agreed(w.heartbeat_ms);
                self.last_ping = now;
                self.acked = Some(w.acked_seq);
                self.events.push_back(AgentEvent::Welcomed(w));
                if let Slot::AwaitingAck { seq } = self.slot {
                    if seq <= w.acked_seq {
                        self.slot = Slot::Idle;
                        self.events.push_back(AgentEvent::ResultAcked { seq });
                    }
                }
            }
            (Phase::AwaitingEnrolled, Message::Enrolled(e)) => {
                self.conn.phase = Phase::Enrolled;
                self.events.push_back(AgentEvent::Enrolled {
                    device_id: e.device_id,
                    frame: ReceivedFrame::new(frame),
                });
            }
            (Phase::Established, msg) => self.on_established(frame, msg)?,
            (phase, msg) => {
                return Err(SessionError::UnexpectedMessage {
                    kind: msg.kind(),
                    phase,
                })
            }
        }
        Ok(())
    }

    fn on_established(&mut self, frame: &Frame<'_>, msg: Message<'_>) -> Result<(), SessionError> {
        match msg {
            Message::Heartbeat(Heartbeat { nonce, echo: false }) => {
                self.conn
                    .queue(&Message::Heartbeat(Heartbeat { nonce, echo: true }))?;
            }
            Message::Heartbeat(Heartbeat { echo: true, .. }) => {}
            Message::Dispatch(d) => {
                if let Some(in_flight) = self.slot.seq() {
                    return Err(SessionError::DispatchWhileBusy {
                        seq: d.seq,
                        in_flight,
                    });
                }
                if let Some(last) = self.last.filter(|&l| (d.seq, d.attempt) <= l) {
                    return Err(SessionError::StaleDispatch {
                        seq: d.seq,
                        attempt: d.attempt,
                        last,
                    });
                }
                let reboot = d.steps.iter().any(|s| matches!(s, Step::Reboot));
                self.slot = Slot::Executing {
                    seq: d.seq,
                    attempt: d.attempt,
                    command_id: d.command_id,
                    reboot,
                };
                self.last = Some((d.seq, d.attempt));
                self.events.push_back(AgentEvent::Dispatch {
                    seq: d.seq,
                    attempt: d.attempt,
                    command_id: d.command_id,
                    reboot,
                    frame: ReceivedFrame::new(frame),
                });
            }
            Message::ResultAck(ack) => match self.slot {
                Slot::AwaitingAck { seq } if seq == ack.seq => {
                    self.slot = Slot::Idle;
                    self.acked = Some(self.acked.map_or(seq, |a| a.max(seq)));
                    self.events.push_back(AgentEvent::ResultAcked { seq });
                }
                // A re-ack of a result already acknowledged: nothing to do.
                _ if self.acked.is_some_and(|a| ack.seq <= a) => {}
                slot => {
                    return Err(SessionError::SeqMismatch {
                        kind: crate::Kind::ResultAck,
                        got: ack.seq,
                        expected: slot.seq(),
                    })
                }
            },
            Message::Announce(_) => self
                .events
                .push_back(AgentEvent::Announce(ReceivedFrame::new(frame))),
            Message::TransferStatus(s) => self.events.push_back(AgentEvent::TransferStatus(s)),
            Message::TaskAnswer(a) => self.events.push_back(AgentEvent::TaskAnswer(a)),
            msg => {
                return Err(SessionError::UnexpectedMessage {
                    kind: msg.kind(),
                    phase: Phase::Established,
                })
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec;

    use super::*;
    use crate::msg::{Dispatch, ResultAck, StepResult, StepStatus};

    /// `Heartbeat{nonce: 0, echo: false}`, computed independently (Python `zlib.crc32`).
    const HEARTBEAT_REQUEST_0: &[u8] = &[
        0xfc, 0x06, 0x03, 0x00, 0x00, 0x00, 0x00, 0x09, 0x3c, 0x36, 0xb4, 0x20, 0, 0, 0, 0, 0, 0,
        0, 0, 0,
    ];

    fn t(ms: u64) -> Instant {
        Instant::from_micros(ms * 1000)
    }

    /// Feeds messages to the session as one stream chunk at virtual time `$t` (ms).
    macro_rules! recv {
        ($s:expr, $t:expr, $($m:expr),+ $(,)?) => {{
            let mut bytes = Vec::new();
            $( Message::emit_to_vec(&$m, &mut bytes).unwrap(); )+
            $s.handle_input(t($t), &bytes)
        }};
    }

    /// Everything the session has to send at virtual time `$t` (ms).
    macro_rules! sent {
        ($s:expr, $t:expr) => {{
            let mut out = Vec::new();
            while $s.poll_transmit(t($t), &mut out).is_some() {}
            out
        }};
    }

    fn hello(last: Option<crate::msg::LastExecuted<'static>>) -> Hello<'static> {
        Hello {
            device_id: 7,
            credential: b"fp".into(),
            agent_version: "0.1.0".into(),
            boot_id: [1; 16],
            last,
        }
    }

    fn welcome(heartbeat_ms: u32, acked_seq: u64) -> Message<'static> {
        Message::Welcome(Welcome {
            session_id: 1,
            server_time_ms: 0,
            heartbeat_ms,
            acked_seq,
            pending_commands: 0,
            pending_transfers: 0,
        })
    }

    fn result(seq: u64) -> CommandResult<'static> {
        CommandResult {
            command_id: seq * 10,
            seq,
            attempt: 1,
            exit_code: 0,
            steps: vec![StepResult {
                status: StepStatus::Ok,
                exit_code: 0,
                duration_ms: 1,
            }],
            output: b"".into(),
            report: None,
        }
    }

    fn dispatch(seq: u64) -> Message<'static> {
        Message::Dispatch(Dispatch {
            target: None,
            command_id: seq * 10,
            seq,
            attempt: 1,
            timeout_ms: 0,
            steps: vec![Step::Report],
        })
    }

    fn session(last: Option<crate::msg::LastExecuted<'static>>) -> AgentSession {
        let mut s =
            AgentSession::new(t(0), Config::default(), FirstMessage::Hello(hello(last))).unwrap();
        let mut expected = Vec::new();
        Message::Hello(hello(None))
            .emit_to_vec(&mut expected)
            .unwrap();
        let first = sent!(s, 0);
        assert_eq!(first[..3], expected[..3], "the Hello goes out first");
        s
    }

    #[test]
    fn first_heartbeat_is_one_interval_after_welcome() {
        let mut s = session(None);
        recv!(s, 5, welcome(1000, 0)).unwrap();
        assert_eq!(
            s.poll_event(),
            Some(AgentEvent::Welcomed(Welcome {
                session_id: 1,
                server_time_ms: 0,
                heartbeat_ms: 1000,
                acked_seq: 0,
                pending_commands: 0,
                pending_transfers: 0,
            }))
        );
        assert_eq!(s.poll_timeout(), Some(t(1005)));
        s.handle_timeout(t(1005));
        assert_eq!(sent!(s, 1005), HEARTBEAT_REQUEST_0);
    }

    #[test]
    fn heartbeat_zero_disables_heartbeats() {
        let mut s = session(None);
        recv!(s, 5, welcome(0, 0)).unwrap();
        assert_eq!(
            s.poll_timeout(),
            Some(t(5) + Config::default().idle_timeout)
        );
    }

    #[test]
    fn result_ack_for_another_seq_is_a_protocol_error_and_reacks_are_ignored() {
        let mut s = session(None);
        recv!(s, 1, welcome(1000, 0), dispatch(3)).unwrap();
        s.send_result(&result(3)).unwrap();
        assert_eq!(
            recv!(s, 2, Message::ResultAck(ResultAck { seq: 4 })),
            Err(SessionError::SeqMismatch {
                kind: crate::Kind::ResultAck,
                got: 4,
                expected: Some(3)
            })
        );

        let mut s = session(None);
        recv!(s, 1, welcome(1000, 0), dispatch(3)).unwrap();
        s.send_result(&result(3)).unwrap();
        recv!(s, 2, Message::ResultAck(ResultAck { seq: 3 })).unwrap();
        // The gateway re-acks a duplicate: harmless.
        recv!(s, 3, Message::ResultAck(ResultAck { seq: 3 })).unwrap();
        let events: Vec<_> = core::iter::from_fn(|| s.poll_event()).collect();
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(events[2], AgentEvent::ResultAcked { seq: 3 });
    }

    #[test]
    fn operations_need_an_established_session() {
        let mut s = session(None);
        assert_eq!(
            s.send_result(&result(1)),
            Err(SessionError::NotEstablished {
                phase: Phase::AwaitingWelcome
            })
        );
        recv!(s, 1, welcome(1000, 0)).unwrap();
        assert_eq!(
            s.send_result(&result(1)),
            Err(SessionError::NotInFlight { seq: 1 })
        );
        assert_eq!(sent!(s, 1), b"", "refused operations send nothing");
    }

    #[test]
    fn enrol_session_accepts_only_enrolled_or_close() {
        let enrol = Enrol {
            token: b"tok".into(),
            name: "n".into(),
            spki: b"k".into(),
        };
        let mut s = AgentSession::new(t(0), Config::default(), FirstMessage::Enrol(enrol)).unwrap();
        assert_eq!(
            recv!(s, 1, welcome(1000, 0)),
            Err(SessionError::UnexpectedMessage {
                kind: crate::Kind::Welcome,
                phase: Phase::AwaitingEnrolled
            })
        );
    }

    #[test]
    fn an_unencodable_first_message_is_refused() {
        let long = [0u8; 65];
        let h = Hello {
            credential: (&long).into(),
            ..hello(None)
        };
        assert_eq!(
            AgentSession::new(t(0), Config::default(), FirstMessage::Hello(h)).err(),
            Some(SessionError::Emit(Error::FieldTooLong))
        );
    }
}
