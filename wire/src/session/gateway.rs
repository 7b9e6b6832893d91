//! The gateway end of a control session.
//!
//! Invariants:
//! - At most one command is in flight ([`Slot`]): dispatched and unanswered, answered and not
//!   yet acked, or rebooting. `dispatch` refuses another with
//!   [`SessionError::AlreadyInFlight`].
//! - A `Result` is accepted only for the dispatched seq, command id and attempt. A `Result`
//!   for a seq at or below the highest acknowledged in this session (by `ack_result` or by
//!   `Welcome.acked_seq`) is a harmless duplicate: the gateway has it durably, so the core
//!   re-acks it and reports [`GatewayEvent::DuplicateResult`]. Any other seq is a protocol error.
//! - A `Hello` is accepted only when TLS authenticated the same device id; an unauthenticated
//!   session may only `Enrol`. An authenticated session may `Enrol` too (re-enrolment, e.g. a
//!   key rotation): the driver decides.
//! - Nothing but `Close` is accepted while the driver decides on a `Hello` or `Enrol`.
//! - A `RebootComplete` for the dispatched reboot command ends it only when it names the
//!   dispatched attempt; one of an earlier attempt (the device is back from a reboot the queue
//!   has since retried) is passed to the driver and leaves the command in flight.

use alloc::collections::VecDeque;

use super::timer::Timer;
use super::{CloseInfo, Config, Conn, Input, Phase, ReceivedFrame, SessionError, TimeoutKind};
use crate::error::Error;
use crate::header::Frame;
use crate::msg::{
    Announce, CloseCode, Dispatch, Enrolled, Heartbeat, LastExecuted, Message, Nack,
    RebootStarting, ResultAck, Step, TaskAnswer, TaskAsk, TransferStatus, Welcome,
};
use crate::time::Instant;

/// What the gateway core reports to its driver. Each event that carries a [`ReceivedFrame`]
/// gives the whole message through [`ReceivedFrame::message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    /// The agent said `Hello` and the device id matches TLS. The driver consults its store
    /// (revoked? queue `rebooting` and boot id changed? result in `Hello.last` to store?) and
    /// calls [`GatewaySession::accept`] or [`GatewaySession::close`].
    Hello {
        /// The device.
        device_id: u64,
        /// Its current boot.
        boot_id: [u8; 16],
        /// `Hello.last.seq`: the last command the agent executed.
        last_seq: Option<u64>,
        /// `Hello.last.result` is present: the agent holds a result the gateway has not
        /// acknowledged; it is in flight until acked.
        unacked_result: bool,
        /// The `Hello` message.
        frame: ReceivedFrame,
    },
    /// The agent asks to enrol. The driver checks the token and calls
    /// [`GatewaySession::send_enrolled`] or closes (`BAD_TOKEN`).
    Enrol(ReceivedFrame),
    /// The result of the command in flight. The driver stores it durably, then calls
    /// [`GatewaySession::ack_result`].
    Result {
        /// The command's seq.
        seq: u64,
        /// The command's id.
        command_id: u64,
        /// The `Result` message.
        frame: ReceivedFrame,
    },
    /// A result for a seq already acknowledged in this session arrived again; the core has
    /// re-acked it and nothing else changed.
    DuplicateResult {
        /// Its seq.
        seq: u64,
    },
    /// The agent is rebooting for the command in flight; the session will end. The driver
    /// puts the queue into `rebooting`.
    RebootStarting(RebootStarting),
    /// The agent is back from a reboot (sent after `Hello` on a new session). The driver
    /// checks that the boot id changed, stores the report and the command's result, and
    /// clears `rebooting`.
    RebootComplete {
        /// The reboot command's seq.
        seq: u64,
        /// The boot id in the report.
        boot_id: [u8; 16],
        /// The `RebootComplete` message (with the configuration report).
        frame: ReceivedFrame,
    },
    /// The agent's configuration report (the `Report` message).
    Report(ReceivedFrame),
    /// A receiver's final word on a distribution task.
    Completion(ReceivedFrame),
    /// A receiver's progress on a distribution task.
    TransferStatus(TransferStatus),
    /// Blocks a receiver is missing.
    Nack(Nack),
    /// The device's task finisher asks for a task's completion (its `device_id` is the
    /// session's: the core checked it).
    TaskAsk(TaskAsk),
    /// The session closed (exactly once per session, whoever closed it).
    Closed(CloseInfo),
}

/// The command slot: at most one command in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Idle,
    /// Dispatched, no answer yet.
    Dispatched {
        seq: u64,
        attempt: u32,
        command_id: u64,
        reboot: bool,
    },
    /// Result received (or carried by `Hello.last`), not yet acked by the driver.
    ResultPending {
        seq: u64,
    },
    /// `RebootStarting` received; the session is about to end.
    Rebooting {
        seq: u64,
    },
}

impl Slot {
    fn seq(self) -> Option<u64> {
        match self {
            Slot::Idle => None,
            Slot::Dispatched { seq, .. }
            | Slot::ResultPending { seq }
            | Slot::Rebooting { seq } => Some(seq),
        }
    }
}

/// The gateway end of one control session. See the [module docs](super) for the driving
/// contract: after every `handle_*` call or driver operation, drain
/// [`poll_transmit`](Self::poll_transmit), then [`poll_event`](Self::poll_event), then re-arm
/// from [`poll_timeout`](Self::poll_timeout).
#[derive(Debug)]
pub struct GatewaySession {
    input: Input,
    core: Core,
}

#[derive(Debug)]
struct Core {
    conn: Conn,
    started: Instant,
    authenticated: Option<u64>,
    device_id: Option<u64>,
    slot: Slot,
    /// Highest seq acknowledged in this session (by `ack_result` or `Welcome.acked_seq`).
    acked: Option<u64>,
    events: VecDeque<GatewayEvent>,
}

impl GatewaySession {
    /// A session on a connection accepted at `now`. `authenticated_device` is the device id
    /// TLS took from the client certificate, or `None` (then the peer may only enrol).
    pub fn new(now: Instant, config: Config, authenticated_device: Option<u64>) -> Self {
        let mut core = Core {
            conn: Conn::new(now, config, Phase::AwaitingHello),
            started: now,
            authenticated: authenticated_device,
            device_id: None,
            slot: Slot::Idle,
            acked: None,
            events: VecDeque::new(),
        };
        core.rearm();
        // A peer without a client certificate may only enrol: its frames are cut at the
        // small pre-authentication limit, so it cannot make the gateway buffer a 1 MiB body.
        let max_body = match authenticated_device {
            Some(_) => config.max_frame_body,
            None => config.max_frame_body.min(config.pre_auth_max_frame_body),
        };
        GatewaySession {
            input: Input::new(max_body),
            core,
        }
    }

    /// Bytes from the agent, in any chunking. `Err` is the sticky fatal error: the session is
    /// closed and a `Close` naming the error is queued.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) -> Result<(), SessionError> {
        self.core.conn.check_open()?;
        if !data.is_empty() {
            self.core.conn.last_rx = now;
        }
        let core = &mut self.core;
        self.input.feed(data, |frame| core.on_frame(frame));
        self.core.rearm();
        self.core.conn.error.map_or(Ok(()), Err)
    }

    /// Fires the timers due at `now` (hello timeout, idle timeout).
    pub fn handle_timeout(&mut self, now: Instant) {
        let c = &mut self.core;
        if c.conn.phase == Phase::Closed {
            return;
        }
        let fired = if c.conn.timers.is_expired(Timer::Hello, now) {
            Some(TimeoutKind::Hello)
        } else if c.conn.timers.is_expired(Timer::Idle, now) {
            Some(TimeoutKind::Idle)
        } else {
            None
        };
        if let Some(kind) = fired {
            c.fail(SessionError::TimedOut(kind));
        }
        c.rearm();
    }

    /// Appends pending bytes for the agent to `buf`; returns how many, or `None` when there
    /// are none.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut alloc::vec::Vec<u8>) -> Option<usize> {
        let n = self.core.conn.poll_transmit(now, buf);
        self.core.rearm();
        n
    }

    /// The earliest instant at which [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.conn.timers.next()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<GatewayEvent> {
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

    /// The device id from the accepted-for-consideration `Hello`.
    pub fn device_id(&self) -> Option<u64> {
        self.core.device_id
    }

    /// The seq of the command in flight, if any.
    pub fn in_flight(&self) -> Option<u64> {
        self.core.slot.seq()
    }

    /// Accepts the pending `Hello`: sends `Welcome` and establishes the session. A result
    /// carried by `Hello.last` with a seq at or below `welcome.acked_seq` counts as acked.
    pub fn accept(&mut self, welcome: &Welcome) -> Result<(), SessionError> {
        let c = &mut self.core;
        c.conn.check_open()?;
        if c.conn.phase != Phase::AwaitingAccept {
            return Err(SessionError::NoPendingDecision {
                phase: c.conn.phase,
            });
        }
        c.conn.queue(&Message::Welcome(*welcome))?;
        c.conn.phase = Phase::Established;
        c.conn.heartbeats_agreed(welcome.heartbeat_ms);
        c.acked = Some(welcome.acked_seq);
        if let Slot::ResultPending { seq } = c.slot {
            if seq <= welcome.acked_seq {
                c.slot = Slot::Idle;
            }
        }
        c.rearm();
        Ok(())
    }

    /// Answers the pending `Enrol`: sends `Enrolled`, then closes normally (the agent
    /// reconnects with its new certificate).
    pub fn send_enrolled(&mut self, enrolled: &Enrolled<'_>) -> Result<(), SessionError> {
        let c = &mut self.core;
        c.conn.check_open()?;
        if c.conn.phase != Phase::AwaitingEnrolDecision {
            return Err(SessionError::NoPendingDecision {
                phase: c.conn.phase,
            });
        }
        c.conn.queue(&Message::Enrolled(enrolled.clone()))?;
        let info = c.conn.close(CloseCode::NORMAL, "enrolled", false);
        c.events.push_back(GatewayEvent::Closed(info));
        Ok(())
    }

    /// Sends a command. Refused while another is in flight.
    pub fn dispatch(&mut self, dispatch: &Dispatch<'_>) -> Result<(), SessionError> {
        let c = &mut self.core;
        c.conn.check_established()?;
        if let Some(in_flight) = c.slot.seq() {
            return Err(SessionError::AlreadyInFlight { in_flight });
        }
        // `Message` owns its `Dispatch`: the clone copies the step list, not the bytes the
        // steps borrow.
        c.conn.queue(&Message::Dispatch(dispatch.clone()))?;
        c.slot = Slot::Dispatched {
            seq: dispatch.seq,
            attempt: dispatch.attempt,
            command_id: dispatch.command_id,
            reboot: dispatch.steps.iter().any(|s| matches!(s, Step::Reboot)),
        };
        Ok(())
    }

    /// Records that the agent is still executing attempt `attempt` of command `seq` from an
    /// earlier session (its `Hello.last` says so): its `Result` or `RebootStarting` may
    /// arrive on this session without a new `Dispatch`. Refused unless the session is
    /// established with nothing in flight.
    pub fn resume_in_flight(
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
        c.slot = Slot::Dispatched {
            seq,
            attempt,
            command_id,
            reboot,
        };
        Ok(())
    }

    /// Acknowledges the result of `seq` once the driver has stored it durably; the next
    /// command may then be dispatched.
    pub fn ack_result(&mut self, seq: u64) -> Result<(), SessionError> {
        let c = &mut self.core;
        c.conn.check_established()?;
        if c.slot != (Slot::ResultPending { seq }) {
            return Err(SessionError::NotInFlight { seq });
        }
        c.conn.queue(&Message::ResultAck(ResultAck { seq }))?;
        c.slot = Slot::Idle;
        c.acked = Some(c.acked.map_or(seq, |a| a.max(seq)));
        Ok(())
    }

    /// Announces a distribution task.
    pub fn announce(&mut self, announce: &Announce<'_>) -> Result<(), SessionError> {
        self.core.conn.check_established()?;
        self.core
            .conn
            .queue(&Message::Announce(announce.reborrow()))
    }

    /// Sends the gateway's view of a transfer (answer to the agent's report).
    pub fn send_transfer_status(&mut self, status: &TransferStatus) -> Result<(), SessionError> {
        self.core.conn.check_established()?;
        self.core.conn.queue(&Message::TransferStatus(*status))
    }

    /// Answers a device's `TaskAsk` from the task table.
    pub fn send_task_answer(&mut self, answer: &TaskAnswer) -> Result<(), SessionError> {
        self.core.conn.check_established()?;
        self.core.conn.queue(&Message::TaskAnswer(*answer))
    }

    /// Closes the session with `code` and `reason` (truncated to the wire limit).
    pub fn close(&mut self, code: CloseCode, reason: &str) -> Result<(), SessionError> {
        let c = &mut self.core;
        c.conn.check_open()?;
        let info = c.conn.close(code, reason, false);
        c.events.push_back(GatewayEvent::Closed(info));
        Ok(())
    }
}

impl Core {
    fn rearm(&mut self) {
        let t = &mut self.conn.timers;
        if self.conn.phase == Phase::Closed {
            t.clear();
            return;
        }
        let cfg = &self.conn.config;
        t.set(Timer::Idle, Some(self.conn.last_rx + self.conn.idle));
        t.set(
            Timer::Hello,
            (self.conn.phase == Phase::AwaitingHello).then(|| self.started + cfg.hello_timeout),
        );
    }

    fn fail(&mut self, err: SessionError) {
        let info = self.conn.fail(err);
        self.events.push_back(GatewayEvent::Closed(info));
    }

    /// Handles one frame (or framing error); returns whether to go on.
    fn on_frame(&mut self, frame: Result<Frame<'_>, Error>) -> bool {
        let authenticated = self.authenticated.is_some();
        let res = frame
            .map_err(|e| match e {
                Error::FrameTooLarge { len, max } if !authenticated => {
                    SessionError::PreAuthFrameTooLarge { len, max }
                }
                e => SessionError::Wire(e),
            })
            .and_then(|frame| {
                let msg = Message::parse(&frame).map_err(SessionError::Wire)?;
                self.on_message(&frame, msg)
            });
        if let Err(e) = res {
            self.fail(e);
        }
        self.conn.phase != Phase::Closed
    }

    fn on_message(&mut self, frame: &Frame<'_>, msg: Message<'_>) -> Result<(), SessionError> {
        let phase = self.conn.phase;
        match (phase, msg) {
            (_, Message::Close(close)) => {
                let info = self.conn.close(close.code, &close.reason, true);
                self.events.push_back(GatewayEvent::Closed(info));
            }
            (Phase::AwaitingHello, Message::Hello(h)) => {
                match self.authenticated {
                    None => return Err(SessionError::Unauthenticated),
                    Some(id) if id != h.device_id => {
                        return Err(SessionError::DeviceMismatch {
                            claimed: h.device_id,
                            authenticated: id,
                        })
                    }
                    Some(_) => {}
                }
                let mut unacked_result = false;
                if let Some(LastExecuted {
                    seq,
                    attempt,
                    result: Some(r),
                    ..
                }) = &h.last
                {
                    if r.seq != *seq {
                        return Err(SessionError::SeqMismatch {
                            kind: crate::Kind::Hello,
                            got: r.seq,
                            expected: Some(*seq),
                        });
                    }
                    if r.attempt != *attempt {
                        return Err(SessionError::AttemptMismatch {
                            seq: *seq,
                            got: r.attempt,
                            expected: *attempt,
                        });
                    }
                    // The agent's unacknowledged result is in flight until acked.
                    self.slot = Slot::ResultPending { seq: *seq };
                    unacked_result = true;
                }
                self.device_id = Some(h.device_id);
                self.conn.phase = Phase::AwaitingAccept;
                self.events.push_back(GatewayEvent::Hello {
                    device_id: h.device_id,
                    boot_id: h.boot_id,
                    last_seq: h.last.as_ref().map(|l| l.seq),
                    unacked_result,
                    frame: ReceivedFrame::new(frame),
                });
            }
            (Phase::AwaitingHello, Message::Enrol(_)) => {
                self.conn.phase = Phase::AwaitingEnrolDecision;
                self.events
                    .push_back(GatewayEvent::Enrol(ReceivedFrame::new(frame)));
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
            // The gateway sends no requests, but an echo is harmless liveness.
            Message::Heartbeat(Heartbeat { echo: true, .. }) => {}
            Message::Result(r) => match self.slot {
                Slot::Dispatched {
                    seq,
                    attempt,
                    command_id,
                    ..
                } if seq == r.seq => {
                    if command_id != r.command_id {
                        return Err(SessionError::CommandIdMismatch {
                            seq,
                            got: r.command_id,
                            expected: command_id,
                        });
                    }
                    if attempt != r.attempt {
                        return Err(SessionError::AttemptMismatch {
                            seq,
                            got: r.attempt,
                            expected: attempt,
                        });
                    }
                    self.slot = Slot::ResultPending { seq };
                    self.events.push_back(GatewayEvent::Result {
                        seq,
                        command_id,
                        frame: ReceivedFrame::new(frame),
                    });
                }
                _ if self.acked.is_some_and(|a| r.seq <= a) => {
                    // Already durable: re-ack so the agent can forget it.
                    self.conn
                        .queue(&Message::ResultAck(ResultAck { seq: r.seq }))?;
                    self.events
                        .push_back(GatewayEvent::DuplicateResult { seq: r.seq });
                }
                slot => {
                    return Err(SessionError::SeqMismatch {
                        kind: crate::Kind::Result,
                        got: r.seq,
                        expected: slot.seq(),
                    })
                }
            },
            Message::RebootStarting(rs) => match self.slot {
                Slot::Dispatched {
                    seq,
                    command_id,
                    reboot,
                    ..
                } if seq == rs.seq => {
                    if command_id != rs.command_id {
                        return Err(SessionError::CommandIdMismatch {
                            seq,
                            got: rs.command_id,
                            expected: command_id,
                        });
                    }
                    if !reboot {
                        return Err(SessionError::NotARebootCommand { seq });
                    }
                    self.slot = Slot::Rebooting { seq };
                    self.events.push_back(GatewayEvent::RebootStarting(rs));
                }
                slot => {
                    return Err(SessionError::SeqMismatch {
                        kind: crate::Kind::RebootStarting,
                        got: rs.seq,
                        expected: slot.seq(),
                    })
                }
            },
            Message::RebootComplete(rc) => {
                if rc.result.seq != rc.seq {
                    return Err(SessionError::SeqMismatch {
                        kind: crate::Kind::RebootComplete,
                        got: rc.result.seq,
                        expected: Some(rc.seq),
                    });
                }
                // Sent once welcomed, before any dispatch of the new session. The one command
                // that may be in flight is the reboot itself, resumed by the driver because its
                // `RebootStarting` never reached the store: the completion implies the start.
                // A completion of an earlier attempt leaves the dispatched attempt in flight.
                match self.slot {
                    Slot::Idle => {}
                    Slot::Dispatched {
                        seq,
                        reboot: true,
                        attempt,
                        ..
                    } if seq == rc.seq => {
                        if attempt == rc.result.attempt {
                            self.slot = Slot::Idle;
                        }
                    }
                    slot => {
                        return Err(SessionError::SeqMismatch {
                            kind: crate::Kind::RebootComplete,
                            got: rc.seq,
                            expected: slot.seq(),
                        })
                    }
                }
                self.events.push_back(GatewayEvent::RebootComplete {
                    seq: rc.seq,
                    boot_id: rc.report.boot_id,
                    frame: ReceivedFrame::new(frame),
                });
            }
            Message::Report(_) => self
                .events
                .push_back(GatewayEvent::Report(ReceivedFrame::new(frame))),
            Message::Completion(_) => self
                .events
                .push_back(GatewayEvent::Completion(ReceivedFrame::new(frame))),
            Message::TransferStatus(s) => self.events.push_back(GatewayEvent::TransferStatus(s)),
            Message::Nack(n) => self.events.push_back(GatewayEvent::Nack(n)),
            Message::TaskAsk(a) => match self.device_id {
                Some(id) if id == a.device_id => self.events.push_back(GatewayEvent::TaskAsk(a)),
                Some(id) => {
                    return Err(SessionError::ForeignAsk {
                        claimed: a.device_id,
                        session: id,
                    })
                }
                // Established means a Hello was accepted, so the id is known.
                None => {
                    return Err(SessionError::UnexpectedMessage {
                        kind: crate::Kind::TaskAsk,
                        phase: Phase::Established,
                    })
                }
            },
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
    use alloc::vec::Vec;

    use super::*;
    use crate::msg::{CommandResult, Hello, StepResult, StepStatus};

    /// `Heartbeat{nonce: 1, echo: true}`, computed independently (Python `zlib.crc32`).
    const HEARTBEAT_ECHO_1: &[u8] = &[
        0xfc, 0x06, 0x03, 0x00, 0x00, 0x00, 0x00, 0x09, 0x52, 0x2a, 0xb5, 0xf7, 0, 0, 0, 0, 0, 0,
        0, 1, 1,
    ];
    /// `ResultAck{seq: 5}`.
    const RESULT_ACK_5: &[u8] = &[
        0xfc, 0x06, 0x12, 0x00, 0x00, 0x00, 0x00, 0x08, 0xa6, 0x96, 0xbc, 0xd4, 0, 0, 0, 0, 0, 0,
        0, 5,
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

    fn hello(device_id: u64) -> Message<'static> {
        Message::Hello(Hello {
            device_id,
            credential: b"fp".into(),
            agent_version: "0.1.0".into(),
            boot_id: [1; 16],
            last: None,
        })
    }

    fn welcome() -> Welcome {
        Welcome {
            session_id: 1,
            server_time_ms: 0,
            heartbeat_ms: 1000,
            acked_seq: 0,
            pending_commands: 0,
            pending_transfers: 0,
        }
    }

    fn dispatch(seq: u64) -> Dispatch<'static> {
        Dispatch {
            target: None,
            command_id: seq * 10,
            seq,
            attempt: 1,
            timeout_ms: 0,
            steps: vec![Step::Report],
        }
    }

    fn result(seq: u64, command_id: u64) -> Message<'static> {
        Message::Result(CommandResult {
            command_id,
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
        })
    }

    fn established() -> GatewaySession {
        let mut s = GatewaySession::new(t(0), Config::default(), Some(7));
        recv!(s, 1, hello(7)).unwrap();
        s.accept(&welcome()).unwrap();
        sent!(s, 1);
        while s.poll_event().is_some() {}
        s
    }

    #[test]
    fn echoes_heartbeat_requests() {
        let mut s = established();
        recv!(
            s,
            2,
            Message::Heartbeat(Heartbeat {
                nonce: 1,
                echo: false
            })
        )
        .unwrap();
        assert_eq!(sent!(s, 2), HEARTBEAT_ECHO_1);
        // Echoes need no answer.
        recv!(
            s,
            3,
            Message::Heartbeat(Heartbeat {
                nonce: 1,
                echo: true
            })
        )
        .unwrap();
        assert_eq!(sent!(s, 3), b"");
        assert_eq!(s.poll_event(), None);
    }

    #[test]
    fn ack_result_sends_result_ack() {
        let mut s = established();
        s.dispatch(&dispatch(5)).unwrap();
        sent!(s, 2);
        recv!(s, 3, result(5, 50)).unwrap();
        assert!(matches!(
            s.poll_event(),
            Some(GatewayEvent::Result {
                seq: 5,
                command_id: 50,
                ..
            })
        ));
        s.ack_result(5).unwrap();
        assert_eq!(sent!(s, 4), RESULT_ACK_5);
        assert_eq!(s.in_flight(), None);
    }

    #[test]
    fn result_with_another_command_id_is_a_protocol_error() {
        let mut s = established();
        s.dispatch(&dispatch(5)).unwrap();
        assert_eq!(
            recv!(s, 3, result(5, 51)),
            Err(SessionError::CommandIdMismatch {
                seq: 5,
                got: 51,
                expected: 50
            })
        );
        assert!(s.is_closed());
    }

    #[test]
    fn a_second_answer_for_the_same_seq_is_a_protocol_error() {
        let mut s = established();
        s.dispatch(&dispatch(5)).unwrap();
        recv!(s, 3, result(5, 50)).unwrap();
        let err = recv!(s, 4, result(5, 50)).unwrap_err();
        assert_eq!(
            err,
            SessionError::SeqMismatch {
                kind: crate::Kind::Result,
                got: 5,
                expected: Some(5)
            }
        );
        assert_eq!(
            alloc::format!("{err}"),
            "Result for seq 5, which was already answered"
        );
    }

    #[test]
    fn nothing_but_close_while_the_driver_decides() {
        let mut s = GatewaySession::new(t(0), Config::default(), Some(7));
        recv!(s, 1, hello(7)).unwrap();
        assert_eq!(s.phase(), Phase::AwaitingAccept);
        assert_eq!(
            recv!(s, 2, result(1, 10)),
            Err(SessionError::UnexpectedMessage {
                kind: crate::Kind::Result,
                phase: Phase::AwaitingAccept
            })
        );
    }

    #[test]
    fn peer_close_is_reported_once_and_closes() {
        let mut s = established();
        recv!(
            s,
            2,
            Message::Close(crate::msg::Close {
                code: CloseCode::SHUTDOWN,
                reason: "agent stopping".into()
            })
        )
        .unwrap();
        assert!(s.is_closed());
        assert_eq!(sent!(s, 2), b"", "no Close is sent back");
        assert_eq!(
            s.poll_event(),
            Some(GatewayEvent::Closed(CloseInfo {
                code: CloseCode::SHUTDOWN,
                reason: "agent stopping".into(),
                by_peer: true
            }))
        );
        assert_eq!(s.poll_event(), None);
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.close(CloseCode::NORMAL, ""), Err(SessionError::Closed));
        assert_eq!(recv!(s, 3, hello(7)), Err(SessionError::Closed));
    }

    #[test]
    fn hello_timer_stops_at_hello_and_idle_timer_follows_input() {
        let cfg = Config::default();
        let mut s = GatewaySession::new(t(0), cfg, Some(7));
        assert_eq!(s.poll_timeout(), Some(t(0) + cfg.hello_timeout));
        recv!(s, 100, hello(7)).unwrap();
        assert_eq!(s.poll_timeout(), Some(t(100) + cfg.idle_timeout));
        s.handle_timeout(t(100) + cfg.hello_timeout);
        assert!(!s.is_closed());
    }

    #[test]
    fn an_idle_session_holds_no_buffers() {
        let mut s = established();
        for i in 0..50 {
            s.dispatch(&dispatch(i + 1)).unwrap();
            recv!(s, 2, result(i + 1, (i + 1) * 10)).unwrap();
            s.ack_result(i + 1).unwrap();
        }
        // Input split mid-frame holds a partial frame until the rest arrives.
        let mut hb = Vec::new();
        Message::Heartbeat(Heartbeat {
            nonce: 9,
            echo: false,
        })
        .emit_to_vec(&mut hb)
        .unwrap();
        s.handle_input(t(3), &hb[..5]).unwrap();
        assert_eq!(s.input.deframer.buffered(), 5);
        s.handle_input(t(3), &hb[5..]).unwrap();
        assert_eq!(s.input.deframer.buffered(), 0);
        assert!(s.core.conn.out.capacity() > KEEP);
        sent!(s, 4);
        while s.poll_event().is_some() {}
        assert_eq!(s.core.conn.out.capacity(), 0);
        assert_eq!(s.core.events.capacity(), 0);
    }

    const KEEP: usize = super::super::KEEP_OUT_CAPACITY;
}
