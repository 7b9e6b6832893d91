//! The control-session core, both ends: [`GatewaySession`] and [`AgentSession`].
//!
//! A control session carries the command-queue protocol over one ordered byte stream (TLS
//! plaintext; TLS itself is the driver's business). Both cores are sans-IO state machines: no
//! sockets, no threads, no clock. They take bytes and [`Instant`]s in, and hand bytes, events
//! and deadlines out.
//!
//! # Protocol (docs/wire.md, ARCHITECTURE.md "Control session")
//! 1. The agent dials out and sends `Hello` (enrolled device) or `Enrol` (first contact).
//! 2. The gateway driver consults its store and answers `Welcome` ([`GatewaySession::accept`])
//!    or `Close` ([`GatewaySession::close`]); for `Enrol`, `Enrolled` followed by a normal
//!    `Close` ([`GatewaySession::send_enrolled`]). When TLS authenticated a device id, the core
//!    itself closes `UNAUTHENTICATED` a `Hello` naming another device; a session without one may
//!    only `Enrol`.
//! 3. At most one command is in flight per session: `Dispatch{seq, attempt}` →
//!    `Result{seq, attempt}` → the driver stores it durably and calls
//!    [`GatewaySession::ack_result`] → `ResultAck{seq}`; only then may the next `Dispatch` go
//!    ([`SessionError::AlreadyInFlight`] otherwise). The next may be the same seq with a higher
//!    attempt (a retry); the agent refuses a `(seq, attempt)` it already executed
//!    ([`SessionError::StaleDispatch`]).
//!    A result the agent still holds unacknowledged from an earlier session travels in
//!    `Hello.last` and counts as in flight until acked (by `ack_result`, or by
//!    `Welcome.acked_seq` reaching its seq).
//! 4. For a command with a `Reboot` step the agent answers `RebootStarting` and closes; on a
//!    new session it sends `Hello` (new boot id) and, once welcomed, `RebootComplete` (the new
//!    configuration and the results of the steps before the reboot).
//! 5. The agent may send a `Report` (its configuration) at any time once established.
//! 6. Once established the agent sends `Heartbeat` every `Welcome.heartbeat_ms` when it has
//!    sent nothing or heard nothing for that long; either end echoes a heartbeat request.
//!    Each end closes `TIMEOUT` after hearing nothing for [`Config::idle_timeout`] until the
//!    session is established, and from then on for [`DEAD_AFTER_HEARTBEATS`] heartbeat
//!    intervals (when `Welcome.heartbeat_ms` is not 0): a live peer is heard at least once an
//!    interval, so a path that silently stopped forwarding is noticed within about three
//!    intervals on both ends, whatever idle timeout the driver configured. The gateway also
//!    closes after [`Config::hello_timeout`] without `Hello`/`Enrol`.
//! 7. Any malformed frame or message not allowed in the current [`Phase`] makes the core queue
//!    `Close{PROTOCOL, reason}` (the reason is the error's `Display`), close, and return a
//!    sticky [`SessionError`] from this and every later `handle_input`.
//! 8. Distribution messages ride along once established: `Announce`, `TransferStatus` and
//!    `TaskAnswer` from the gateway; `Completion`, `TransferStatus`, `TaskAsk` and `Nack` from
//!    the agent (a `TaskAsk` must name the session's own device). The cores only pass
//!    them through as events.
//!
//! # Driving contract
//! - Time is an input and must be monotonic: never pass an `Instant` earlier than one passed
//!   before to the same session.
//! - Inputs are `handle_input(now, bytes)` (any chunking: a stream delivered whole or byte by
//!   byte produces the same events in the same order), `handle_timeout(now)` (call it when the
//!   instant from `poll_timeout` has been reached; calling it early is harmless) and the
//!   driver operations (`accept`, `dispatch`, `send_result`, ...).
//! - **After every one of those calls**, in this order:
//!   1. drain `poll_transmit(now, &mut buf)` until `None` and write the bytes to the stream;
//!   2. drain `poll_event()` until `None` and act on each event (store, queue, log);
//!   3. re-arm the connection's timer from `poll_timeout()` (`None`: no timer).
//!
//!   Acting on an event usually calls another operation; loop back to step 1 after it.
//! - When `is_closed()` is true and `poll_transmit` is drained, shut the connection down. A
//!   session emits exactly one `Closed` event, whoever closed it.
//! - A [`SessionError`] from `handle_input` means the session is closed (the `Close` frame
//!   naming the error is already queued): log it, flush, and close that connection only.
//!   Errors from driver operations (`AlreadyInFlight`, `NotInFlight`, `NotEstablished`,
//!   `Emit`, ...) are the driver's mistakes: nothing was sent and the session is unchanged.
//!
//! # Memory
//! An idle session holds no heap buffers: input is released once no partial frame is pending
//! and output once it has been flushed (a small output buffer is kept for heartbeats).
//! Events own the bytes of the frame they report ([`ReceivedFrame`]) so the queue borrows
//! nothing.

use alloc::borrow::Cow;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::time::Duration;

use zerocopy::IntoBytes;

use crate::deframer::Deframer;
use crate::error::Error;
use crate::header::{Frame, HEADER_LEN, MAX_PRE_AUTH_BODY, MAX_STREAM_BODY};
use crate::msg::limits::MAX_REASON;
use crate::msg::{Close, CloseCode, Message};
use crate::msg_kind::Kind;
use crate::time::Instant;

mod agent;
mod gateway;
mod timer;

pub use agent::{AgentEvent, AgentSession, FirstMessage};
pub use gateway::{GatewayEvent, GatewaySession};

use timer::TimerTable;

/// Output capacity kept across flushes (a heartbeat frame is 21 bytes); more is released.
const KEEP_OUT_CAPACITY: usize = 64;

/// Once heartbeats are agreed (`Welcome.heartbeat_ms` > 0), an established session whose peer
/// has been silent for this many heartbeat intervals is dead (closed `TIMEOUT`). A live agent
/// sends something at least once an interval and the gateway echoes each request, so three
/// intervals leave room for one late or lost heartbeat without waiting for minutes.
pub const DEAD_AFTER_HEARTBEATS: u32 = 3;

/// Session parameters, shared by both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Close with `TIMEOUT` after hearing nothing from the peer for this long, until the
    /// session is established with heartbeats; from then on the limit is
    /// [`DEAD_AFTER_HEARTBEATS`] × `Welcome.heartbeat_ms` (this value stays in force when the
    /// `Welcome` turns heartbeats off).
    pub idle_timeout: Duration,
    /// Gateway: close with `TIMEOUT` when neither `Hello` nor `Enrol` arrives this soon after
    /// the session starts. Unused by the agent.
    pub hello_timeout: Duration,
    /// Largest frame body accepted from the peer.
    pub max_frame_body: u32,
    /// Gateway: largest frame body accepted from a peer TLS did not authenticate (it may
    /// only enrol); checked on the header, before any of the body is buffered. Unused by the
    /// agent.
    pub pre_auth_max_frame_body: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            idle_timeout: Duration::from_secs(90),
            hello_timeout: Duration::from_secs(10),
            max_frame_body: MAX_STREAM_BODY,
            pre_auth_max_frame_body: MAX_PRE_AUTH_BODY,
        }
    }
}

/// Where a session is in its life. Gateway and agent use different subsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Gateway: waiting for the agent's first message.
    AwaitingHello,
    /// Gateway: `Hello` received; the driver must [`GatewaySession::accept`] or close.
    AwaitingAccept,
    /// Gateway: `Enrol` received; the driver must [`GatewaySession::send_enrolled`] or close.
    AwaitingEnrolDecision,
    /// Agent: `Hello` sent, waiting for `Welcome`.
    AwaitingWelcome,
    /// Agent: `Enrol` sent, waiting for `Enrolled`.
    AwaitingEnrolled,
    /// Agent: `Enrolled` received; waiting for the gateway's `Close`.
    Enrolled,
    /// `Welcome` sent (gateway) or received (agent): commands may flow.
    Established,
    /// Closed by either end; nothing more is accepted.
    Closed,
}

impl Phase {
    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::AwaitingHello => "awaiting-hello",
            Phase::AwaitingAccept => "awaiting-accept",
            Phase::AwaitingEnrolDecision => "awaiting-enrol-decision",
            Phase::AwaitingWelcome => "awaiting-welcome",
            Phase::AwaitingEnrolled => "awaiting-enrolled",
            Phase::Enrolled => "enrolled",
            Phase::Established => "established",
            Phase::Closed => "closed",
        }
    }
}

/// Which silence timed a session out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeoutKind {
    /// Nothing heard from the peer for [`Config::idle_timeout`].
    Idle,
    /// No `Hello` or `Enrol` within [`Config::hello_timeout`] (gateway).
    Hello,
}

/// Why a session operation failed or a session closed.
///
/// Variants up to and including [`SessionError::TimedOut`] are *fatal*: the core has queued a
/// `Close` and every later `handle_input` returns the same error. The rest are returned by
/// driver operations, which then change nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    /// The peer sent bytes that are not a valid frame or message (deframer or parser error).
    Wire(Error),
    /// The peer sent a message that its role may not send in the session's current phase.
    UnexpectedMessage {
        /// The message's kind.
        kind: Kind,
        /// The phase it arrived in.
        phase: Phase,
    },
    /// A `Result`, `RebootStarting` or `ResultAck` named a sequence number that is not the
    /// one in flight (and, for a `Result`, not one already acknowledged in this session).
    SeqMismatch {
        /// The message's kind.
        kind: Kind,
        /// The sequence number it carried.
        got: u64,
        /// The sequence number in flight, if any.
        expected: Option<u64>,
    },
    /// A message named the in-flight sequence number with another command id.
    CommandIdMismatch {
        /// The sequence number.
        seq: u64,
        /// The command id the message carried.
        got: u64,
        /// The command id that was dispatched.
        expected: u64,
    },
    /// A `Result` or `Hello.last` named the in-flight (or its own) sequence number with
    /// another attempt number.
    AttemptMismatch {
        /// The sequence number.
        seq: u64,
        /// The attempt the message carried.
        got: u32,
        /// The attempt that was dispatched (or that `Hello.last` named).
        expected: u32,
    },
    /// `RebootStarting` for a command without a `Reboot` step (from the agent: fatal; from the
    /// agent driver's `send_reboot_starting`: refused).
    NotARebootCommand {
        /// The command's sequence number.
        seq: u64,
    },
    /// Agent: the gateway dispatched while another command was still in flight.
    DispatchWhileBusy {
        /// The new dispatch's sequence number.
        seq: u64,
        /// The command in flight.
        in_flight: u64,
    },
    /// Agent: the gateway dispatched a `(seq, attempt)` at or below one already executed: a
    /// redelivery that running would turn into a second execution.
    StaleDispatch {
        /// The dispatch's sequence number.
        seq: u64,
        /// The dispatch's attempt.
        attempt: u32,
        /// The highest `(seq, attempt)` already executed.
        last: (u64, u32),
    },
    /// Gateway: `Hello.device_id` differs from the device TLS authenticated (closes
    /// `UNAUTHENTICATED`).
    DeviceMismatch {
        /// The id in `Hello`.
        claimed: u64,
        /// The id from the client certificate.
        authenticated: u64,
    },
    /// Gateway: a `TaskAsk` names another device than the session's `Hello` (closes
    /// `UNAUTHENTICATED`): a device asks for its own tasks only.
    ForeignAsk {
        /// The id in the ask.
        claimed: u64,
        /// The session's device.
        session: u64,
    },
    /// Gateway: `Hello` on a session whose TLS layer authenticated no device; such a session
    /// may only `Enrol` (closes `UNAUTHENTICATED`).
    Unauthenticated,
    /// Gateway: a frame header on a session TLS did not authenticate declares a body over
    /// [`Config::pre_auth_max_frame_body`] (closes `PROTOCOL`; nothing of the body is kept).
    PreAuthFrameTooLarge {
        /// Declared body length.
        len: u32,
        /// The pre-authentication limit.
        max: u32,
    },
    /// The peer stayed silent too long (closes `TIMEOUT`).
    TimedOut(TimeoutKind),
    /// Gateway driver: `dispatch` while a command is in flight (dispatched and not answered,
    /// answered and not acked, or rebooting).
    AlreadyInFlight {
        /// The sequence number in flight.
        in_flight: u64,
    },
    /// Driver: the operation names a sequence number that is not in the state it requires
    /// (`ack_result` of a result not received, `send_result` of a command not dispatched, ...).
    NotInFlight {
        /// The sequence number the driver gave.
        seq: u64,
    },
    /// Driver: the operation needs an established session.
    NotEstablished {
        /// The session's phase.
        phase: Phase,
    },
    /// Driver: `accept` or `send_enrolled` without the matching request pending.
    NoPendingDecision {
        /// The session's phase.
        phase: Phase,
    },
    /// Driver: the message could not be encoded (a field over its limit); nothing was sent.
    Emit(Error),
    /// The session is closed (by the peer or by the driver).
    Closed,
}

impl SessionError {
    /// The close code a fatal error is reported to the peer with.
    pub fn close_code(&self) -> CloseCode {
        match self {
            SessionError::DeviceMismatch { .. }
            | SessionError::ForeignAsk { .. }
            | SessionError::Unauthenticated => CloseCode::UNAUTHENTICATED,
            SessionError::TimedOut(_) => CloseCode::TIMEOUT,
            _ => CloseCode::PROTOCOL,
        }
    }
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SessionError::Wire(e) => write!(f, "malformed frame: {e}"),
            SessionError::UnexpectedMessage { kind, phase } => {
                write!(f, "unexpected {kind:?} while {}", phase.name())
            }
            SessionError::SeqMismatch {
                kind,
                got,
                expected: Some(e),
            } if got == e => write!(f, "{kind:?} for seq {got}, which was already answered"),
            SessionError::SeqMismatch {
                kind,
                got,
                expected: Some(e),
            } => write!(f, "{kind:?} for seq {got}, but seq {e} is in flight"),
            SessionError::SeqMismatch {
                kind,
                got,
                expected: None,
            } => write!(f, "{kind:?} for seq {got}, but no command is in flight"),
            SessionError::CommandIdMismatch { seq, got, expected } => write!(
                f,
                "seq {seq} carries command id {got}, but command {expected} was dispatched"
            ),
            SessionError::AttemptMismatch { seq, got, expected } => write!(
                f,
                "seq {seq} carries attempt {got}, but attempt {expected} was dispatched"
            ),
            SessionError::NotARebootCommand { seq } => {
                write!(f, "reboot starting for seq {seq}, which has no reboot step")
            }
            SessionError::DispatchWhileBusy { seq, in_flight } => {
                write!(
                    f,
                    "dispatch of seq {seq} while seq {in_flight} is in flight"
                )
            }
            SessionError::StaleDispatch {
                seq,
                attempt,
                last: (last, last_attempt),
            } => {
                write!(
                    f,
                    "dispatch of seq {seq} attempt {attempt}, but seq {last} attempt \
                     {last_attempt} was already executed"
                )
            }
            SessionError::DeviceMismatch {
                claimed,
                authenticated,
            } => write!(
                f,
                "hello for device {claimed} on a session authenticated as device {authenticated}"
            ),
            SessionError::ForeignAsk { claimed, session } => write!(
                f,
                "task ask for device {claimed} on the session of device {session}"
            ),
            SessionError::Unauthenticated => {
                f.write_str("hello without a client certificate (only enrolment is allowed)")
            }
            SessionError::PreAuthFrameTooLarge { len, max } => write!(
                f,
                "frame body of {len} bytes before authentication exceeds the pre-authentication limit of {max} (only an enrolment is accepted)"
            ),
            SessionError::TimedOut(TimeoutKind::Idle) => f.write_str("peer silent too long"),
            SessionError::TimedOut(TimeoutKind::Hello) => f.write_str("no hello in time"),
            SessionError::AlreadyInFlight { in_flight } => {
                write!(f, "seq {in_flight} is still in flight")
            }
            SessionError::NotInFlight { seq } => write!(f, "seq {seq} is not in flight"),
            SessionError::NotEstablished { phase } => {
                write!(f, "session not established ({})", phase.name())
            }
            SessionError::NoPendingDecision { phase } => {
                write!(f, "no matching request pending ({})", phase.name())
            }
            SessionError::Emit(e) => write!(f, "cannot encode message: {e}"),
            SessionError::Closed => f.write_str("session closed"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for SessionError {}

/// How a session ended (carried by both ends' `Closed` event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The close code sent or received.
    pub code: CloseCode,
    /// Its human-readable reason.
    pub reason: String,
    /// Whether the peer closed (`Close` received) rather than this end.
    pub by_peer: bool,
}

/// A complete, validated frame as received, owned so that it can wait in an event queue.
/// [`ReceivedFrame::message`] borrows the parsed message from it.
#[derive(Clone, PartialEq, Eq)]
pub struct ReceivedFrame {
    /// Header, body and tag, exactly as received; parsing is known to succeed.
    bytes: Vec<u8>,
}

impl ReceivedFrame {
    fn new(frame: &Frame<'_>) -> Self {
        let tag = frame.tag.map_or(&[][..], |t| &t[..]);
        let mut bytes = Vec::with_capacity(HEADER_LEN + frame.body.len() + tag.len());
        bytes.extend_from_slice(frame.header.as_bytes());
        bytes.extend_from_slice(frame.body);
        bytes.extend_from_slice(tag);
        ReceivedFrame { bytes }
    }

    /// The message, parsed from the stored bytes.
    pub fn message(&self) -> Message<'_> {
        // Invariant: `bytes` is a frame that already parsed (CRC, header and body) when it was
        // received, and parsing is a pure function of the bytes.
        Frame::parse_prefix(&self.bytes, u32::MAX)
            .and_then(|(f, _)| Message::parse(&f))
            .expect("a ReceivedFrame holds a frame that already parsed")
    }

    /// The frame's bytes (header, body, tag).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Debug for ReceivedFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ReceivedFrame")
            .field(&self.message())
            .finish()
    }
}

/// Cuts input at frame boundaries so that each [`Deframer::push`] holds at most the end of one
/// frame. Then frames complete before a malformed header are delivered whatever the chunking
/// (a push that fails discards its complete frames).
#[derive(Debug, Default)]
struct Cutter {
    /// Header bytes 4..8 (the body length) seen so far.
    len: [u8; 4],
    /// Header bytes of the current frame seen, `0..=HEADER_LEN`.
    have: usize,
    /// Body bytes of the current frame not yet seen.
    body_left: usize,
}

impl Cutter {
    /// How many bytes of `data` (non-empty) to push next.
    fn take(&mut self, data: &[u8]) -> usize {
        if self.have < HEADER_LEN {
            let n = (HEADER_LEN - self.have).min(data.len());
            for (i, b) in data[..n].iter().enumerate() {
                if let Some(slot) = (self.have + i)
                    .checked_sub(4)
                    .and_then(|j| self.len.get_mut(j))
                {
                    *slot = *b;
                }
            }
            self.have += n;
            if self.have == HEADER_LEN {
                self.body_left = u32::from_be_bytes(self.len) as usize;
                if self.body_left == 0 {
                    self.have = 0;
                }
            }
            n
        } else {
            let n = self.body_left.min(data.len());
            self.body_left -= n;
            if self.body_left == 0 {
                self.have = 0;
            }
            n
        }
    }
}

/// The input half of a session: reassembles frames from the stream.
#[derive(Debug)]
struct Input {
    deframer: Deframer,
    cutter: Cutter,
}

impl Input {
    fn new(max_body: u32) -> Self {
        Input {
            deframer: Deframer::new(max_body),
            cutter: Cutter::default(),
        }
    }

    /// Feeds `data`, calling `on_frame` for every complete frame (or the first framing error)
    /// in stream order, until it returns `false` (the session closed).
    fn feed(&mut self, data: &[u8], mut on_frame: impl FnMut(Result<Frame<'_>, Error>) -> bool) {
        let mut rest = data;
        'outer: while !rest.is_empty() {
            let (piece, tail) = rest.split_at(self.cutter.take(rest));
            rest = tail;
            if let Err(e) = self.deframer.push(piece) {
                on_frame(Err(e));
                break;
            }
            while let Some(frame) = self.deframer.next_frame() {
                let ok = frame.is_ok();
                if !on_frame(frame) || !ok {
                    break 'outer;
                }
            }
        }
        self.deframer.shrink();
    }
}

/// The state both ends share: output buffer, timers, liveness clocks, phase, sticky error.
#[derive(Debug)]
struct Conn {
    config: Config,
    out: Vec<u8>,
    timers: TimerTable,
    /// When bytes last arrived from the peer.
    last_rx: Instant,
    /// When bytes were last handed to the driver.
    last_tx: Instant,
    /// Silence after which the peer counts as gone: `config.idle_timeout`, then
    /// [`DEAD_AFTER_HEARTBEATS`] heartbeat intervals once they are agreed.
    idle: Duration,
    phase: Phase,
    error: Option<SessionError>,
}

impl Conn {
    fn new(now: Instant, config: Config, phase: Phase) -> Self {
        Conn {
            config,
            out: Vec::new(),
            timers: TimerTable::default(),
            last_rx: now,
            last_tx: now,
            idle: config.idle_timeout,
            phase,
            error: None,
        }
    }

    /// The `Welcome` (sent or received) agreed on heartbeats every `heartbeat_ms` (0: none):
    /// from now on, a peer silent for [`DEAD_AFTER_HEARTBEATS`] intervals is gone.
    fn heartbeats_agreed(&mut self, heartbeat_ms: u32) {
        if heartbeat_ms > 0 {
            self.idle = millis(heartbeat_ms).saturating_mul(DEAD_AFTER_HEARTBEATS);
        }
    }

    /// `Err` with the sticky error, or [`SessionError::Closed`], once closed.
    fn check_open(&self) -> Result<(), SessionError> {
        match (self.error, self.phase) {
            (Some(e), _) => Err(e),
            (None, Phase::Closed) => Err(SessionError::Closed),
            _ => Ok(()),
        }
    }

    /// `Err(NotEstablished)` unless established (or the closed-session error).
    fn check_established(&self) -> Result<(), SessionError> {
        self.check_open()?;
        if self.phase == Phase::Established {
            Ok(())
        } else {
            Err(SessionError::NotEstablished { phase: self.phase })
        }
    }

    /// Appends `msg` to the output; on an encoding error nothing is appended.
    fn queue(&mut self, msg: &Message<'_>) -> Result<(), SessionError> {
        let start = self.out.len();
        msg.emit_to_vec(&mut self.out).map(|_| ()).map_err(|e| {
            self.out.truncate(start);
            SessionError::Emit(e)
        })
    }

    /// Closes the session: queues `Close` unless the peer closed, disarms every timer.
    fn close(&mut self, code: CloseCode, reason: &str, by_peer: bool) -> CloseInfo {
        let reason = truncate(reason, MAX_REASON);
        if !by_peer {
            // A reason within MAX_REASON always encodes.
            let _ = self.queue(&Message::Close(Close {
                code,
                reason: Cow::Borrowed(reason),
            }));
        }
        self.phase = Phase::Closed;
        self.timers.clear();
        CloseInfo {
            code,
            reason: String::from(reason),
            by_peer,
        }
    }

    /// Records the fatal `err` and closes with its code and its `Display` as the reason.
    fn fail(&mut self, err: SessionError) -> CloseInfo {
        let reason = alloc::format!("{err}");
        self.error = Some(err);
        self.close(err.close_code(), &reason, false)
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<usize> {
        if self.out.is_empty() {
            return None;
        }
        let n = self.out.len();
        buf.extend_from_slice(&self.out);
        self.out.clear();
        if self.out.capacity() > KEEP_OUT_CAPACITY {
            self.out = Vec::new();
        }
        self.last_tx = now;
        Some(n)
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A `Duration` in whole milliseconds from a wire `u32` field.
fn millis(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit_tests {
    use super::*;
    use crate::msg::Heartbeat;

    #[test]
    fn cutter_splits_at_every_frame_end() {
        let mut stream = Vec::new();
        for nonce in 0..3 {
            Message::Heartbeat(Heartbeat { nonce, echo: false })
                .emit_to_vec(&mut stream)
                .unwrap();
        }
        let frame_len = stream.len() / 3;
        let mut c = Cutter::default();
        let mut cuts = Vec::new();
        let mut pos = 0;
        while pos < stream.len() {
            pos += c.take(&stream[pos..]);
            cuts.push(pos);
        }
        assert_eq!(
            cuts,
            vec![
                HEADER_LEN,
                frame_len,
                frame_len + HEADER_LEN,
                2 * frame_len,
                2 * frame_len + HEADER_LEN,
                3 * frame_len
            ]
        );
    }

    #[test]
    fn frames_before_a_bad_header_in_one_chunk_are_delivered() {
        let mut stream = Vec::new();
        Message::Heartbeat(Heartbeat {
            nonce: 7,
            echo: false,
        })
        .emit_to_vec(&mut stream)
        .unwrap();
        stream.extend_from_slice(&[0u8; 20]);
        let mut input = Input::new(MAX_STREAM_BODY);
        let mut seen = Vec::new();
        input.feed(&stream, |f| {
            seen.push(f.and_then(|f| Message::parse(&f)).map(|m| m.kind()));
            true
        });
        assert_eq!(seen, vec![Ok(Kind::Heartbeat), Err(Error::BadMagic(0))]);
    }

    #[test]
    fn received_frame_round_trips_the_message() {
        let msg = Message::Heartbeat(Heartbeat {
            nonce: 9,
            echo: true,
        });
        let mut bytes = Vec::new();
        msg.emit_to_vec(&mut bytes).unwrap();
        let (frame, _) = Frame::parse_prefix(&bytes, MAX_STREAM_BODY).unwrap();
        let r = ReceivedFrame::new(&frame);
        assert_eq!(r.as_bytes(), &bytes[..]);
        assert_eq!(r.message(), msg);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("aé", 3), "aé");
    }

    #[test]
    fn fatal_errors_map_to_close_codes() {
        assert_eq!(
            SessionError::Wire(Error::Checksum).close_code(),
            CloseCode::PROTOCOL
        );
        assert_eq!(
            SessionError::Unauthenticated.close_code(),
            CloseCode::UNAUTHENTICATED
        );
        assert_eq!(
            SessionError::TimedOut(TimeoutKind::Idle).close_code(),
            CloseCode::TIMEOUT
        );
    }
}
