//! Both session ends driven against each other on virtual time.
//!
//! [`Pair`] connects a [`GatewaySession`] and an [`AgentSession`] with two in-memory byte
//! pipes (fixed latency, configurable chunking on delivery) and follows the driving contract:
//! after every input it drains transmits and events and fires due timers. The tests play the
//! drivers' part (accept, dispatch, ack, ...) between `drive()` calls.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::time::Duration;

use super::*;
use crate::msg::{
    Announce, CommandResult, Completion, ConfigReport, Dispatch, Enrol, Enrolled, Heartbeat, Hello,
    LastExecuted, Nack, Outcome, Package, RebootComplete, Step, StepResult, StepStatus,
    TransferState, TransferStatus, Welcome,
};
use crate::ranges::Ranges;

const DEVICE: u64 = 42;
const BOOT_A: [u8; 16] = [0xA1; 16];
const BOOT_B: [u8; 16] = [0xB2; 16];
const MS: Duration = Duration::from_millis(1);

/// How the pipes cut the bytes they deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunking {
    /// Everything due at once.
    Whole,
    /// One byte per `handle_input`.
    Bytes,
    /// Seeded random chunk sizes in `1..=max`.
    Random { seed: u64, max: usize },
}

/// A tiny seeded generator (xorshift64*) for chunk sizes.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

/// One direction: bytes in flight with their arrival times.
#[derive(Debug, Default)]
struct Pipe {
    queue: VecDeque<(Instant, Vec<u8>)>,
}

impl Pipe {
    fn next_arrival(&self) -> Option<Instant> {
        self.queue.front().map(|(t, _)| *t)
    }

    fn take_due(&mut self, now: Instant) -> Vec<u8> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, bytes)) = self.queue.pop_front() {
                out.extend_from_slice(&bytes);
            }
        }
        out
    }
}

fn config() -> Config {
    Config {
        idle_timeout: Duration::from_secs(30),
        hello_timeout: Duration::from_secs(5),
        max_frame_body: crate::header::MAX_STREAM_BODY,
        pre_auth_max_frame_body: crate::header::MAX_PRE_AUTH_BODY,
    }
}

/// Gateway and agent on virtual time.
#[derive(Debug)]
struct Pair {
    now: Instant,
    latency: Duration,
    chunking: Chunking,
    rng: Rng,
    /// While set, both pipes drop everything (a silent network).
    partitioned: bool,
    gw: GatewaySession,
    ag: AgentSession,
    to_gw: Pipe,
    to_ag: Pipe,
    gw_events: Vec<GatewayEvent>,
    ag_events: Vec<AgentEvent>,
    gw_errors: Vec<SessionError>,
    ag_errors: Vec<SessionError>,
}

impl Pair {
    fn new(authenticated: Option<u64>, first: FirstMessage<'_>) -> Self {
        Self::with(Instant::ZERO, authenticated, first, Chunking::Whole)
    }

    fn with(
        now: Instant,
        authenticated: Option<u64>,
        first: FirstMessage<'_>,
        chunking: Chunking,
    ) -> Self {
        let seed = match chunking {
            Chunking::Random { seed, .. } => seed | 1,
            _ => 1,
        };
        Pair {
            now,
            latency: 10 * MS,
            chunking,
            rng: Rng(seed),
            partitioned: false,
            gw: GatewaySession::new(now, config(), authenticated),
            ag: AgentSession::new(now, config(), first).unwrap(),
            to_gw: Pipe::default(),
            to_ag: Pipe::default(),
            gw_events: Vec::new(),
            ag_events: Vec::new(),
            gw_errors: Vec::new(),
            ag_errors: Vec::new(),
        }
    }

    fn chunks(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = match self.chunking {
                Chunking::Whole => rest.len(),
                Chunking::Bytes => 1,
                Chunking::Random { max, .. } => 1 + self.rng.below(max),
            }
            .min(rest.len());
            out.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
        out
    }

    /// Moves transmits into the pipes and events into the logs; returns whether anything moved.
    fn flush(&mut self) -> bool {
        let mut moved = false;
        let arrival = self.now + self.latency;
        let mut buf = Vec::new();
        while self.gw.poll_transmit(self.now, &mut buf).is_some() {}
        if !buf.is_empty() {
            moved = true;
            if !self.partitioned {
                self.to_ag
                    .queue
                    .push_back((arrival, core::mem::take(&mut buf)));
            }
        }
        buf.clear();
        while self.ag.poll_transmit(self.now, &mut buf).is_some() {}
        if !buf.is_empty() {
            moved = true;
            if !self.partitioned {
                self.to_gw.queue.push_back((arrival, buf));
            }
        }
        while let Some(e) = self.gw.poll_event() {
            self.gw_events.push(e);
            moved = true;
        }
        while let Some(e) = self.ag.poll_event() {
            self.ag_events.push(e);
            moved = true;
        }
        moved
    }

    /// Delivers what is due, fires due timers, flushes; returns whether anything happened.
    fn step(&mut self) -> bool {
        let mut progress = self.flush();
        let to_gw = self.to_gw.take_due(self.now);
        for chunk in self.chunks(&to_gw) {
            // A driver drops the connection once its session is closed.
            if !self.gw.is_closed() {
                if let Err(e) = self.gw.handle_input(self.now, &chunk) {
                    self.gw_errors.push(e);
                }
            }
            progress = true;
        }
        let to_ag = self.to_ag.take_due(self.now);
        for chunk in self.chunks(&to_ag) {
            if !self.ag.is_closed() {
                if let Err(e) = self.ag.handle_input(self.now, &chunk) {
                    self.ag_errors.push(e);
                }
            }
            progress = true;
        }
        if self.gw.poll_timeout().is_some_and(|t| t <= self.now) {
            self.gw.handle_timeout(self.now);
            progress = true;
        }
        if self.ag.poll_timeout().is_some_and(|t| t <= self.now) {
            self.ag.handle_timeout(self.now);
            progress = true;
        }
        self.flush() || progress
    }

    fn next_wakeup(&self) -> Option<Instant> {
        [
            self.to_gw.next_arrival(),
            self.to_ag.next_arrival(),
            self.gw.poll_timeout(),
            self.ag.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs until no bytes are in flight (timers may still be armed).
    fn drive(&mut self) {
        for _ in 0..100_000 {
            while self.step() {}
            if self.to_gw.queue.is_empty() && self.to_ag.queue.is_empty() {
                return;
            }
            self.now = self.next_wakeup().unwrap_or(self.now).max(self.now);
        }
        panic!("drive did not settle");
    }

    /// Runs everything (bytes and timers) until `until`.
    fn run_until(&mut self, until: Instant) {
        for _ in 0..1_000_000 {
            while self.step() {}
            match self.next_wakeup() {
                Some(t) if t <= until => self.now = t.max(self.now),
                _ => {
                    self.now = until;
                    while self.step() {}
                    return;
                }
            }
        }
        panic!("run_until did not reach its end");
    }

    fn take_gw(&mut self) -> Vec<GatewayEvent> {
        core::mem::take(&mut self.gw_events)
    }

    fn take_ag(&mut self) -> Vec<AgentEvent> {
        core::mem::take(&mut self.ag_events)
    }

    fn establish(&mut self, welcome: Welcome) {
        self.drive();
        assert!(matches!(self.take_gw()[..], [GatewayEvent::Hello { .. }]));
        self.gw.accept(&welcome).unwrap();
        self.drive();
        let mut ev = self.take_ag();
        assert!(
            matches!(ev.first(), Some(AgentEvent::Welcomed(_))),
            "{ev:?}"
        );
        ev.remove(0);
        self.ag_events = ev;
    }
}

fn hello(boot_id: [u8; 16], last: Option<LastExecuted<'static>>) -> Hello<'static> {
    Hello {
        device_id: DEVICE,
        credential: b"sha256:fingerprint".into(),
        agent_version: "0.1.0".into(),
        boot_id,
        last,
    }
}

fn welcome(acked_seq: u64) -> Welcome {
    Welcome {
        session_id: 9,
        server_time_ms: 1_700_000_000_000,
        heartbeat_ms: 10_000,
        acked_seq,
        pending_commands: 1,
        pending_transfers: 0,
    }
}

fn exec(seq: u64) -> Dispatch<'static> {
    Dispatch {
        command_id: 1000 + seq,
        seq,
        attempt: 1,
        timeout_ms: 60_000,
        steps: vec![Step::Exec {
            argv: vec!["/bin/true".into()],
        }],
    }
}

fn reboot_cmd(seq: u64) -> Dispatch<'static> {
    Dispatch {
        command_id: 1000 + seq,
        seq,
        attempt: 1,
        timeout_ms: 0,
        steps: vec![
            Step::Write {
                path: "/etc/motd".into(),
                mode: 0o644,
                contents: b"hi".into(),
            },
            Step::Reboot,
        ],
    }
}

fn result(seq: u64) -> CommandResult<'static> {
    CommandResult {
        command_id: 1000 + seq,
        seq,
        attempt: 1,
        exit_code: 0,
        steps: vec![StepResult {
            status: StepStatus::Ok,
            exit_code: 0,
            duration_ms: 5,
        }],
        output: b"ok\n".into(),
        report: None,
    }
}

fn report(boot_id: [u8; 16]) -> ConfigReport<'static> {
    ConfigReport {
        boot_id,
        os: "Debian GNU/Linux 12".into(),
        kernel: "6.1.0-18-amd64".into(),
        hostname: "rack4-node17".into(),
        agent_version: "0.1.0".into(),
        addresses: vec!["10.77.0.17/16".into()],
        software: vec![Package {
            name: "nginx".into(),
            version: "1.22.1-9".into(),
        }],
    }
}

fn closed_gw(events: &[GatewayEvent]) -> Option<&CloseInfo> {
    events.iter().find_map(|e| match e {
        GatewayEvent::Closed(c) => Some(c),
        _ => None,
    })
}

fn closed_ag(events: &[AgentEvent]) -> Option<&CloseInfo> {
    events.iter().find_map(|e| match e {
        AgentEvent::Closed(c) => Some(c),
        _ => None,
    })
}

/// Emits `msgs` as one stream.
fn stream(msgs: &[Message<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        m.emit_to_vec(&mut out).unwrap();
    }
    out
}

/// Parses every frame in `bytes`.
fn frames(bytes: &[u8]) -> Vec<Message<'_>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (f, tail) = Frame::parse_prefix(rest, u32::MAX).unwrap();
        out.push(Message::parse(&f).unwrap());
        rest = tail;
    }
    out
}

#[test]
fn enrolment_issues_a_certificate_then_closes_normally() {
    let enrol = Enrol {
        token: b"one-time-token".into(),
        name: "rack4-node17".into(),
        spki: b"spki-der".into(),
    };
    let mut p = Pair::new(None, FirstMessage::Enrol(enrol.clone()));
    p.drive();
    let ev = p.take_gw();
    let [GatewayEvent::Enrol(frame)] = &ev[..] else {
        panic!("{ev:?}")
    };
    assert_eq!(frame.message(), Message::Enrol(enrol));
    assert_eq!(p.gw.phase(), Phase::AwaitingEnrolDecision);
    // Only enrolment decisions are possible now.
    assert_eq!(
        p.gw.accept(&welcome(0)),
        Err(SessionError::NoPendingDecision {
            phase: Phase::AwaitingEnrolDecision
        })
    );
    p.gw.send_enrolled(&Enrolled {
        device_id: DEVICE,
        certificate: b"cert-der".into(),
    })
    .unwrap();
    p.drive();
    assert!(p.gw.is_closed() && p.ag.is_closed());
    let ev = p.take_ag();
    match &ev[..] {
        [AgentEvent::Enrolled { device_id, frame }, AgentEvent::Closed(c)] => {
            assert_eq!(*device_id, DEVICE);
            assert!(
                matches!(frame.message(), Message::Enrolled(e) if *e.certificate == *b"cert-der")
            );
            assert_eq!((c.code, c.by_peer), (CloseCode::NORMAL, true));
        }
        other => panic!("{other:?}"),
    }
    assert!(p.gw_errors.is_empty() && p.ag_errors.is_empty());
}

#[test]
fn bad_enrolment_token_is_refused() {
    let enrol = Enrol {
        token: b"stale".into(),
        name: "n".into(),
        spki: b"k".into(),
    };
    let mut p = Pair::new(None, FirstMessage::Enrol(enrol));
    p.drive();
    p.gw.close(CloseCode::BAD_TOKEN, "token already used")
        .unwrap();
    p.drive();
    let c = closed_ag(&p.ag_events).unwrap();
    assert_eq!(
        (c.code, c.reason.as_str(), c.by_peer),
        (CloseCode::BAD_TOKEN, "token already used", true)
    );
}

#[test]
fn hello_welcome_establishes_both_ends() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.drive();
    let ev = p.take_gw();
    match &ev[..] {
        [GatewayEvent::Hello {
            device_id,
            boot_id,
            last_seq,
            unacked_result,
            frame,
        }] => {
            assert_eq!(
                (*device_id, *boot_id, *last_seq, *unacked_result),
                (DEVICE, BOOT_A, None, false)
            );
            assert_eq!(frame.message(), Message::Hello(hello(BOOT_A, None)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.gw.device_id(), Some(DEVICE));
    // Nothing may be dispatched before the driver accepts.
    assert_eq!(
        p.gw.dispatch(&exec(1)),
        Err(SessionError::NotEstablished {
            phase: Phase::AwaitingAccept
        })
    );
    p.gw.accept(&welcome(0)).unwrap();
    p.drive();
    assert_eq!(p.take_ag(), vec![AgentEvent::Welcomed(welcome(0))]);
    assert_eq!(
        (p.gw.phase(), p.ag.phase()),
        (Phase::Established, Phase::Established)
    );
}

#[test]
fn dispatch_result_ack_then_next_dispatch_in_order() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    for seq in 1..=3 {
        p.gw.dispatch(&exec(seq)).unwrap();
        p.drive();
        let ev = p.take_ag();
        match &ev[..] {
            [AgentEvent::Dispatch {
                seq: s,
                attempt: 1,
                command_id,
                reboot: false,
                frame,
            }] => {
                assert_eq!((*s, *command_id), (seq, 1000 + seq));
                assert_eq!(frame.message(), Message::Dispatch(exec(seq)));
            }
            other => panic!("{other:?}"),
        }
        p.ag.send_result(&result(seq)).unwrap();
        p.drive();
        let ev = p.take_gw();
        match &ev[..] {
            [GatewayEvent::Result {
                seq: s,
                command_id,
                frame,
            }] => {
                assert_eq!((*s, *command_id), (seq, 1000 + seq));
                assert_eq!(frame.message(), Message::Result(result(seq)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.ag.in_flight(), Some(seq));
        p.gw.ack_result(seq).unwrap();
        p.drive();
        assert_eq!(p.take_ag(), vec![AgentEvent::ResultAcked { seq }]);
        assert_eq!((p.gw.in_flight(), p.ag.in_flight()), (None, None));
    }
    assert!(p.gw_errors.is_empty() && p.ag_errors.is_empty());
}

#[test]
fn one_command_in_flight() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    p.gw.dispatch(&exec(1)).unwrap();
    assert_eq!(
        p.gw.dispatch(&exec(2)),
        Err(SessionError::AlreadyInFlight { in_flight: 1 })
    );
    assert_eq!(
        p.gw.ack_result(1),
        Err(SessionError::NotInFlight { seq: 1 })
    );
    p.drive();
    // The agent refuses a result for another command.
    assert_eq!(
        p.ag.send_result(&result(2)),
        Err(SessionError::NotInFlight { seq: 2 })
    );
    p.ag.send_result(&result(1)).unwrap();
    p.drive();
    // Result received, not acked: still in flight.
    assert_eq!(
        p.gw.dispatch(&exec(2)),
        Err(SessionError::AlreadyInFlight { in_flight: 1 })
    );
    p.gw.ack_result(1).unwrap();
    assert_eq!(
        p.gw.ack_result(1),
        Err(SessionError::NotInFlight { seq: 1 })
    );
    p.gw.dispatch(&exec(2)).unwrap();
    p.drive();
    assert!(p.gw_errors.is_empty() && p.ag_errors.is_empty());
}

#[test]
fn agent_rejects_a_dispatch_while_busy() {
    let mut ag = AgentSession::new(
        Instant::ZERO,
        config(),
        FirstMessage::Hello(hello(BOOT_A, None)),
    )
    .unwrap();
    let bytes = stream(&[
        Message::Welcome(welcome(0)),
        Message::Dispatch(exec(1)),
        Message::Dispatch(exec(2)),
    ]);
    let err = SessionError::DispatchWhileBusy {
        seq: 2,
        in_flight: 1,
    };
    assert_eq!(ag.handle_input(Instant::ZERO, &bytes), Err(err));
    assert!(ag.is_closed());
    let mut out = Vec::new();
    ag.poll_transmit(Instant::ZERO, &mut out).unwrap();
    let sent = frames(&out);
    assert!(matches!(
        sent.last(),
        Some(Message::Close(c)) if c.code == CloseCode::PROTOCOL && c.reason.contains("seq 2")
    ));
}

#[test]
fn agent_rejects_a_dispatch_it_already_executed() {
    let last = LastExecuted {
        seq: 5,
        attempt: 1,
        executing: false,
        result: None,
    };
    let mut ag = AgentSession::new(
        Instant::ZERO,
        config(),
        FirstMessage::Hello(hello(BOOT_A, Some(last))),
    )
    .unwrap();
    let bytes = stream(&[Message::Welcome(welcome(5)), Message::Dispatch(exec(5))]);
    assert_eq!(
        ag.handle_input(Instant::ZERO, &bytes),
        Err(SessionError::StaleDispatch {
            seq: 5,
            attempt: 1,
            last: (5, 1)
        })
    );
}

#[test]
fn reboot_suspends_across_sessions() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    p.gw.dispatch(&reboot_cmd(7)).unwrap();
    p.drive();
    let ev = p.take_ag();
    assert!(matches!(
        ev[..],
        [AgentEvent::Dispatch {
            seq: 7,
            reboot: true,
            ..
        }]
    ));
    p.ag.send_reboot_starting(7).unwrap();
    assert!(p.ag.is_closed());
    p.drive();
    let ev = p.take_gw();
    match &ev[..] {
        [GatewayEvent::RebootStarting(rs), GatewayEvent::Closed(c)] => {
            assert_eq!((rs.seq, rs.command_id, rs.boot_id), (7, 1007, BOOT_A));
            assert_eq!((c.code, c.by_peer), (CloseCode::NORMAL, true));
        }
        other => panic!("{other:?}"),
    }
    assert!(p.gw.is_closed());

    // The device reboots and reconnects on a new session with a new boot id.
    let last = LastExecuted {
        seq: 7,
        attempt: 1,
        executing: true,
        result: None,
    };
    let mut p = Pair::with(
        p.now + Duration::from_secs(40),
        Some(DEVICE),
        FirstMessage::Hello(hello(BOOT_B, Some(last))),
        Chunking::Whole,
    );
    p.drive();
    let ev = p.take_gw();
    assert!(matches!(
        ev[..],
        [GatewayEvent::Hello {
            boot_id: BOOT_B,
            last_seq: Some(7),
            unacked_result: false,
            ..
        }]
    ));
    p.gw.accept(&welcome(7)).unwrap();
    p.drive();
    p.take_ag();
    let rc = RebootComplete {
        seq: 7,
        report: report(BOOT_B),
        result: result(7),
    };
    p.ag.send_reboot_complete(&rc).unwrap();
    p.drive();
    let ev = p.take_gw();
    match &ev[..] {
        [GatewayEvent::RebootComplete {
            seq: 7,
            boot_id,
            frame,
        }] => {
            assert_eq!(*boot_id, BOOT_B);
            assert_eq!(frame.message(), Message::RebootComplete(rc));
        }
        other => panic!("{other:?}"),
    }
    // The queue resumes.
    p.gw.dispatch(&exec(8)).unwrap();
    p.drive();
    assert!(matches!(
        p.take_ag()[..],
        [AgentEvent::Dispatch { seq: 8, .. }]
    ));
}

#[test]
fn reboot_starting_needs_a_reboot_command() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    p.gw.dispatch(&exec(1)).unwrap();
    p.drive();
    assert_eq!(
        p.ag.send_reboot_starting(1),
        Err(SessionError::NotARebootCommand { seq: 1 })
    );
    assert_eq!(
        p.ag.send_reboot_starting(2),
        Err(SessionError::NotInFlight { seq: 2 })
    );
    // The gateway enforces the same rule on the wire.
    let mut gw = GatewaySession::new(Instant::ZERO, config(), Some(DEVICE));
    gw.handle_input(
        Instant::ZERO,
        &stream(&[Message::Hello(hello(BOOT_A, None))]),
    )
    .unwrap();
    gw.accept(&welcome(0)).unwrap();
    gw.dispatch(&exec(1)).unwrap();
    let rs = Message::RebootStarting(crate::msg::RebootStarting {
        command_id: 1001,
        seq: 1,
        boot_id: BOOT_A,
    });
    assert_eq!(
        gw.handle_input(Instant::ZERO, &stream(&[rs])),
        Err(SessionError::NotARebootCommand { seq: 1 })
    );
}

#[test]
fn unacked_result_is_resent_in_hello_and_acked_once() {
    // Session 1: the result reaches the gateway, which stores it but dies before acking.
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    p.gw.dispatch(&exec(3)).unwrap();
    p.drive();
    p.ag.send_result(&result(3)).unwrap();
    p.drive();
    assert!(matches!(
        p.take_gw()[..],
        [GatewayEvent::Result { seq: 3, .. }]
    ));
    p.gw.close(CloseCode::SHUTDOWN, "restarting").unwrap();
    p.drive();
    assert!(p.ag.is_closed());

    // Session 2: the agent still holds the result and sends it in Hello.last.
    let r = result(3);
    let last = LastExecuted {
        seq: 3,
        attempt: 1,
        executing: false,
        result: Some(r.clone()),
    };
    let mut p = Pair::new(
        Some(DEVICE),
        FirstMessage::Hello(hello(BOOT_A, Some(last.clone()))),
    );
    assert_eq!(p.ag.in_flight(), Some(3));
    p.drive();
    let ev = p.take_gw();
    match &ev[..] {
        [GatewayEvent::Hello {
            last_seq: Some(3),
            unacked_result: true,
            frame,
            ..
        }] => {
            let Message::Hello(h) = frame.message() else {
                panic!()
            };
            assert_eq!(h.last, Some(last.clone()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.gw.in_flight(), Some(3));
    // The driver finds seq 3 already stored (idempotent put), welcomes with an older
    // acked_seq and acks explicitly.
    p.gw.accept(&welcome(2)).unwrap();
    assert_eq!(
        p.gw.dispatch(&exec(4)),
        Err(SessionError::AlreadyInFlight { in_flight: 3 })
    );
    p.gw.ack_result(3).unwrap();
    p.drive();
    assert_eq!(
        p.take_ag(),
        vec![
            AgentEvent::Welcomed(welcome(2)),
            AgentEvent::ResultAcked { seq: 3 }
        ]
    );

    // Session 3 variant: Welcome.acked_seq covering the result acks it.
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, Some(last))));
    p.establish(welcome(3));
    assert_eq!(p.take_ag(), vec![AgentEvent::ResultAcked { seq: 3 }]);
    assert_eq!((p.gw.in_flight(), p.ag.in_flight()), (None, None));
    p.gw.dispatch(&exec(4)).unwrap();
    p.drive();
    assert!(p.gw_errors.is_empty() && p.ag_errors.is_empty());
}

#[test]
fn duplicate_result_of_an_acked_seq_is_reacked_and_ignored() {
    let mut gw = GatewaySession::new(Instant::ZERO, config(), Some(DEVICE));
    let t = Instant::ZERO;
    gw.handle_input(t, &stream(&[Message::Hello(hello(BOOT_A, None))]))
        .unwrap();
    gw.accept(&welcome(0)).unwrap();
    gw.dispatch(&exec(1)).unwrap();
    gw.handle_input(t, &stream(&[Message::Result(result(1))]))
        .unwrap();
    gw.ack_result(1).unwrap();
    let mut out = Vec::new();
    while gw.poll_transmit(t, &mut out).is_some() {}
    while gw.poll_event().is_some() {}
    // The same result again: re-acked, no new Result event, no error.
    gw.handle_input(t, &stream(&[Message::Result(result(1))]))
        .unwrap();
    assert_eq!(
        gw.poll_event(),
        Some(GatewayEvent::DuplicateResult { seq: 1 })
    );
    out.clear();
    gw.poll_transmit(t, &mut out).unwrap();
    assert_eq!(
        frames(&out),
        vec![Message::ResultAck(crate::msg::ResultAck { seq: 1 })]
    );
    // A result for a seq never dispatched is a protocol error.
    assert_eq!(
        gw.handle_input(t, &stream(&[Message::Result(result(9))])),
        Err(SessionError::SeqMismatch {
            kind: Kind::Result,
            got: 9,
            expected: None
        })
    );
}

#[test]
fn heartbeats_keep_an_idle_session_alive_and_silence_times_out_both_ends() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    let start = p.now;
    // Ten virtual minutes with heartbeats every 10 s and a 30 s idle timeout.
    p.run_until(start + Duration::from_secs(600));
    assert!(!p.gw.is_closed() && !p.ag.is_closed());
    assert!(p.gw_events.is_empty() && p.ag_events.is_empty());
    assert!(p.ag.poll_timeout().is_some_and(|t| t > p.now));

    // The network goes silent: both ends time out on their own.
    p.partitioned = true;
    p.run_until(p.now + Duration::from_secs(60));
    assert!(p.gw.is_closed() && p.ag.is_closed());
    for c in [
        closed_gw(&p.gw_events).unwrap(),
        closed_ag(&p.ag_events).unwrap(),
    ] {
        assert_eq!((c.code, c.by_peer), (CloseCode::TIMEOUT, false));
    }
    let idle = SessionError::TimedOut(TimeoutKind::Idle);
    assert_eq!((p.gw.error(), p.ag.error()), (Some(idle), Some(idle)));
    assert_eq!(p.gw.poll_timeout(), None);
    assert_eq!(p.gw.handle_input(p.now, b"x"), Err(idle));
}

/// A path that silently stops forwarding is noticed within about three heartbeat intervals
/// by both ends, although both were configured with a much longer idle timeout: the agreed
/// heartbeat decides, not the drivers' defaults.
#[test]
fn a_silent_path_is_noticed_within_three_heartbeats_whatever_the_idle_timeout() {
    let slow = Config {
        idle_timeout: Duration::from_secs(90),
        ..config()
    };
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.gw = GatewaySession::new(p.now, slow, Some(DEVICE));
    p.ag = AgentSession::new(p.now, slow, FirstMessage::Hello(hello(BOOT_A, None))).unwrap();
    let hb = Duration::from_secs(2);
    p.establish(Welcome {
        heartbeat_ms: 2_000,
        ..welcome(0)
    });
    // Alive: a minute of idle heartbeats keeps both ends open.
    p.run_until(p.now + Duration::from_secs(60));
    assert!(!p.gw.is_closed() && !p.ag.is_closed());
    let cut = p.now;
    p.partitioned = true;
    // Both ends close within three intervals of the cut (plus one interval of slack for
    // where the cut fell between two heartbeats), far before the 90 s idle timeout.
    p.run_until(cut + hb * (DEAD_AFTER_HEARTBEATS + 1));
    assert!(
        p.gw.is_closed() && p.ag.is_closed(),
        "{:?} {:?}",
        p.gw.phase(),
        p.ag.phase()
    );
    let idle = SessionError::TimedOut(TimeoutKind::Idle);
    assert_eq!((p.gw.error(), p.ag.error()), (Some(idle), Some(idle)));
    for c in [
        closed_gw(&p.gw_events).unwrap(),
        closed_ag(&p.ag_events).unwrap(),
    ] {
        assert_eq!((c.code, c.by_peer), (CloseCode::TIMEOUT, false));
    }
}

/// Heartbeats turned off by the `Welcome` leave the configured idle timeout in force.
#[test]
fn without_heartbeats_the_configured_idle_timeout_stays() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(Welcome {
        heartbeat_ms: 0,
        ..welcome(0)
    });
    let start = p.now;
    p.partitioned = true;
    p.run_until(start + (config().idle_timeout - Duration::from_secs(1)));
    assert!(!p.gw.is_closed() && !p.ag.is_closed());
    p.run_until(start + (config().idle_timeout + Duration::from_secs(1)));
    assert!(p.gw.is_closed() && p.ag.is_closed());
}

#[test]
fn agent_heartbeats_go_out_only_after_a_quiet_interval() {
    let t0 = Instant::ZERO;
    let mut ag = AgentSession::new(t0, config(), FirstMessage::Hello(hello(BOOT_A, None))).unwrap();
    let mut out = Vec::new();
    ag.poll_transmit(t0, &mut out).unwrap();
    ag.handle_input(t0, &stream(&[Message::Welcome(welcome(0))]))
        .unwrap();
    let hb = Duration::from_secs(10);
    assert_eq!(ag.poll_timeout(), Some(t0 + hb));
    // Traffic in both directions pushes the heartbeat back.
    let t1 = t0 + Duration::from_secs(4);
    ag.handle_input(
        t1,
        &stream(&[Message::Heartbeat(Heartbeat {
            nonce: 1,
            echo: false,
        })]),
    )
    .unwrap();
    out.clear();
    ag.poll_transmit(t1, &mut out).unwrap();
    assert_eq!(
        frames(&out),
        vec![Message::Heartbeat(Heartbeat {
            nonce: 1,
            echo: true
        })]
    );
    assert_eq!(ag.poll_timeout(), Some(t1 + hb));
    ag.handle_timeout(t1 + hb);
    out.clear();
    ag.poll_transmit(t1 + hb, &mut out).unwrap();
    assert_eq!(
        frames(&out),
        vec![Message::Heartbeat(Heartbeat {
            nonce: 0,
            echo: false
        })]
    );
    // The gateway stays silent: one request per interval, then the idle timeout.
    assert_eq!(ag.poll_timeout(), Some(t1 + hb + hb));
    ag.handle_timeout(t1 + hb + hb);
    assert!(ag.poll_transmit(t1 + hb + hb, &mut out).is_some());
    assert_eq!(ag.poll_timeout(), Some(t1 + Duration::from_secs(30)));
}

#[test]
fn hello_timeout_closes_a_silent_connection() {
    let mut gw = GatewaySession::new(Instant::ZERO, config(), Some(DEVICE));
    let deadline = gw.poll_timeout().unwrap();
    assert_eq!(deadline, Instant::ZERO + Duration::from_secs(5));
    gw.handle_timeout(Instant::from_micros(deadline.as_micros() - 1_000));
    assert!(!gw.is_closed());
    gw.handle_timeout(deadline);
    assert!(gw.is_closed());
    assert_eq!(gw.error(), Some(SessionError::TimedOut(TimeoutKind::Hello)));
    let mut out = Vec::new();
    gw.poll_transmit(deadline, &mut out).unwrap();
    assert!(matches!(&frames(&out)[..], [Message::Close(c)] if c.code == CloseCode::TIMEOUT));
}

#[test]
fn device_id_mismatch_closes_unauthenticated() {
    let mut p = Pair::new(Some(DEVICE + 1), FirstMessage::Hello(hello(BOOT_A, None)));
    p.drive();
    let err = SessionError::DeviceMismatch {
        claimed: DEVICE,
        authenticated: DEVICE + 1,
    };
    assert_eq!(p.gw_errors, vec![err]);
    assert_eq!(p.gw.error(), Some(err));
    let c = closed_ag(&p.ag_events).unwrap();
    assert_eq!((c.code, c.by_peer), (CloseCode::UNAUTHENTICATED, true));
    assert!(!p
        .gw_events
        .iter()
        .any(|e| matches!(e, GatewayEvent::Hello { .. })));
}

#[test]
fn unauthenticated_session_may_not_hello() {
    let mut p = Pair::new(None, FirstMessage::Hello(hello(BOOT_A, None)));
    p.drive();
    assert_eq!(p.gw_errors, vec![SessionError::Unauthenticated]);
    let c = closed_ag(&p.ag_events).unwrap();
    assert_eq!((c.code, c.by_peer), (CloseCode::UNAUTHENTICATED, true));
    assert!(p.gw.is_closed() && p.ag.is_closed());
}

#[test]
fn garbage_closes_protocol_with_a_sticky_error() {
    let mut gw = GatewaySession::new(Instant::ZERO, config(), Some(DEVICE));
    let t = Instant::ZERO;
    let err = SessionError::Wire(crate::Error::BadMagic(b'G'));
    assert_eq!(gw.handle_input(t, b"GET / HTTP/1.1\r\n\r\n"), Err(err));
    assert_eq!(
        gw.handle_input(t, &stream(&[Message::Hello(hello(BOOT_A, None))])),
        Err(err)
    );
    assert_eq!(gw.error(), Some(err));
    assert_eq!(gw.accept(&welcome(0)), Err(err));
    let mut out = Vec::new();
    gw.poll_transmit(t, &mut out).unwrap();
    match &frames(&out)[..] {
        [Message::Close(c)] => {
            assert_eq!(c.code, CloseCode::PROTOCOL);
            assert!(c.reason.contains("bad magic"), "{}", c.reason);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&gw.poll_event(), Some(GatewayEvent::Closed(c)) if !c.by_peer));
    assert_eq!(gw.poll_event(), None);

    // A well-framed message the agent may not send is just as fatal.
    let mut gw = GatewaySession::new(t, config(), Some(DEVICE));
    let err = SessionError::UnexpectedMessage {
        kind: Kind::Welcome,
        phase: Phase::AwaitingHello,
    };
    assert_eq!(
        gw.handle_input(t, &stream(&[Message::Welcome(welcome(0))])),
        Err(err)
    );

    // And on the agent: a corrupted frame (CRC) from the gateway.
    let mut ag = AgentSession::new(t, config(), FirstMessage::Hello(hello(BOOT_A, None))).unwrap();
    let mut bytes = stream(&[Message::Welcome(welcome(0))]);
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    let err = SessionError::Wire(crate::Error::Checksum);
    assert_eq!(ag.handle_input(t, &bytes), Err(err));
    assert_eq!(ag.handle_input(t, &bytes), Err(err));
}

/// A full session exercising every message kind the control session carries.
fn scenario(chunking: Chunking) -> (Vec<GatewayEvent>, Vec<AgentEvent>) {
    let last = LastExecuted {
        seq: 1,
        attempt: 1,
        executing: false,
        result: Some(result(1)),
    };
    let mut p = Pair::with(
        Instant::ZERO,
        Some(DEVICE),
        FirstMessage::Hello(hello(BOOT_A, Some(last))),
        chunking,
    );
    p.drive();
    p.gw.accept(&welcome(0)).unwrap();
    p.gw.ack_result(1).unwrap();
    p.gw.announce(&Announce {
        task_id: 5,
        session: 77,
        group: core::net::IpAddr::V4(core::net::Ipv4Addr::new(239, 1, 2, 3)),
        port: 5000,
        size: 1 << 20,
        block_size: 1024,
        sha256: [7; 32],
        auth_key: None,
        nack_key: None,
        name: "image.bin".into(),
    })
    .unwrap();
    p.gw.dispatch(&exec(2)).unwrap();
    p.drive();
    p.ag.send_transfer_status(&TransferStatus {
        task_id: 5,
        session: 77,
        state: TransferState::InProgress,
        received: 10,
        total: 1024,
    })
    .unwrap();
    let mut missing = Ranges::new();
    missing.push(3, 4).unwrap();
    p.ag.send_nack(&Nack {
        session: 77,
        device_id: DEVICE,
        seq: 1,
        echo: None,
        missing,
    })
    .unwrap();
    p.ag.send_result(&result(2)).unwrap();
    p.ag.send_completion(&Completion {
        task_id: 5,
        session: 77,
        outcome: Outcome::Verified,
        sha256: [7; 32],
        reason: "".into(),
    })
    .unwrap();
    p.drive();
    p.gw.ack_result(2).unwrap();
    p.gw.send_transfer_status(&TransferStatus {
        task_id: 5,
        session: 77,
        state: TransferState::Completed,
        received: 1024,
        total: 1024,
    })
    .unwrap();
    p.run_until(p.now + Duration::from_secs(35));
    p.ag.close(CloseCode::NORMAL, "bye").unwrap();
    p.drive();
    assert!(p.gw_errors.is_empty() && p.ag_errors.is_empty());
    assert!(p.gw.is_closed() && p.ag.is_closed());
    (p.gw_events, p.ag_events)
}

#[test]
fn chunking_does_not_change_the_event_sequence() {
    let whole = scenario(Chunking::Whole);
    assert!(
        matches!(
            whole.0[..],
            [
                GatewayEvent::Hello { .. },
                GatewayEvent::TransferStatus(_),
                GatewayEvent::Nack(_),
                GatewayEvent::Result { seq: 2, .. },
                GatewayEvent::Completion(_),
                GatewayEvent::Closed(_),
            ]
        ),
        "{:?}",
        whole.0
    );
    assert!(matches!(
        whole.1[..],
        [
            AgentEvent::Welcomed(_),
            AgentEvent::ResultAcked { seq: 1 },
            AgentEvent::Announce(_),
            AgentEvent::Dispatch { seq: 2, .. },
            AgentEvent::ResultAcked { seq: 2 },
            AgentEvent::TransferStatus(_),
            AgentEvent::Closed(_),
        ]
    ));
    assert_eq!(scenario(Chunking::Bytes), whole);
    for seed in 1..=8 {
        assert_eq!(scenario(Chunking::Random { seed, max: 40 }), whole);
    }
}

mod props {
    use proptest::prelude::*;

    use super::*;

    /// A valid gateway → agent stream: Welcome, a dispatch, heartbeats, an announce.
    fn gateway_stream() -> Vec<u8> {
        stream(&[
            Message::Welcome(welcome(0)),
            Message::Heartbeat(Heartbeat {
                nonce: 3,
                echo: false,
            }),
            Message::Dispatch(reboot_cmd(4)),
            Message::Heartbeat(Heartbeat {
                nonce: 0,
                echo: true,
            }),
        ])
    }

    fn agent() -> AgentSession {
        AgentSession::new(
            Instant::ZERO,
            config(),
            FirstMessage::Hello(hello(BOOT_A, None)),
        )
        .unwrap()
    }

    /// Feeds `bytes` cut at `cuts`; returns the events, the output and the result of each call.
    fn feed(bytes: &[u8], cuts: &[usize]) -> (Vec<AgentEvent>, Vec<u8>, Option<SessionError>) {
        let mut ag = agent();
        let mut out = Vec::new();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut start = 0;
        let mut err = None;
        for end in cuts.into_iter().chain([bytes.len()]) {
            if err.is_none() {
                err = ag.handle_input(Instant::ZERO, &bytes[start..end]).err();
            }
            start = end;
        }
        while ag.poll_transmit(Instant::ZERO, &mut out).is_some() {}
        (core::iter::from_fn(|| ag.poll_event()).collect(), out, err)
    }

    proptest! {
        #[test]
        fn any_cut_of_a_valid_stream_gives_the_same_events(
            cuts in proptest::collection::vec(any::<usize>(), 0..12)
        ) {
            let bytes = gateway_stream();
            let whole = feed(&bytes, &[]);
            prop_assert_eq!(whole.0.len(), 2);
            prop_assert_eq!(feed(&bytes, &cuts), whole);
        }

        #[test]
        fn any_corruption_is_sticky_and_never_panics(
            pos in any::<usize>(),
            xor in 1u8..,
            cuts in proptest::collection::vec(any::<usize>(), 0..8)
        ) {
            let mut bytes = gateway_stream();
            let i = pos % bytes.len();
            bytes[i] ^= xor;
            // Cut-independent: the same events, output and error for every chunking.
            let whole = feed(&bytes, &[]);
            prop_assert_eq!(&feed(&bytes, &cuts), &whole);
            let (events, out, err) = whole;
            if let Some(err) = err {
                prop_assert!(matches!(events.last(), Some(AgentEvent::Closed(c)) if !c.by_peer));
                let sent = frames(&out);
                prop_assert!(
                    matches!(sent.last(), Some(Message::Close(c)) if c.code == err.close_code())
                );
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_gateway(
            data in proptest::collection::vec(any::<u8>(), 0..256),
            authenticated in proptest::option::of(any::<u64>())
        ) {
            let mut gw = GatewaySession::new(Instant::ZERO, config(), authenticated);
            let first = gw.handle_input(Instant::ZERO, &data);
            if let Err(e) = first {
                prop_assert!(gw.is_closed());
                prop_assert_eq!(gw.handle_input(Instant::ZERO, &data), Err(e));
            }
        }
    }
}

#[test]
fn a_command_still_executing_across_a_reconnect_delivers_its_result_on_the_new_session() {
    // Session 1: dispatch seq 4, then the connection drops while the agent executes it.
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(3));
    p.gw.dispatch(&exec(4)).unwrap();
    p.drive();
    assert!(matches!(
        p.take_ag()[..],
        [AgentEvent::Dispatch { seq: 4, .. }]
    ));

    // Session 2: Hello names seq 4 without a result; both drivers resume it.
    let last = LastExecuted {
        seq: 4,
        attempt: 1,
        executing: true,
        result: None,
    };
    let mut q = Pair::with(
        p.now,
        Some(DEVICE),
        FirstMessage::Hello(hello(BOOT_A, Some(last))),
        Chunking::Whole,
    );
    q.establish(welcome(3));
    // Without resuming, the gateway would treat the result as a protocol error.
    q.gw.resume_in_flight(4, 1, 1004, false).unwrap();
    q.ag.resume_executing(4, 1, 1004, false).unwrap();
    assert_eq!(
        q.gw.resume_in_flight(4, 1, 1004, false),
        Err(SessionError::AlreadyInFlight { in_flight: 4 })
    );
    q.ag.send_result(&result(4)).unwrap();
    q.drive();
    assert!(matches!(
        q.take_gw()[..],
        [GatewayEvent::Result {
            seq: 4,
            command_id: 1004,
            ..
        }]
    ));
    q.gw.ack_result(4).unwrap();
    q.drive();
    assert_eq!(q.take_ag(), vec![AgentEvent::ResultAcked { seq: 4 }]);
    assert!(q.gw_errors.is_empty() && q.ag_errors.is_empty());
}

#[test]
fn reboot_complete_after_a_lost_reboot_starting_completes_the_resumed_reboot() {
    // The gateway resumed the reboot command as in flight (its store never saw RebootStarting);
    // the agent, back from the reboot, reports completion.
    let last = LastExecuted {
        seq: 5,
        attempt: 1,
        executing: true,
        result: None,
    };
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_B, Some(last))));
    p.establish(welcome(4));
    p.gw.resume_in_flight(5, 1, 1005, true).unwrap();
    p.ag.send_reboot_complete(&RebootComplete {
        seq: 5,
        report: report(BOOT_B),
        result: result(5),
    })
    .unwrap();
    p.drive();
    assert!(matches!(
        p.take_gw()[..],
        [GatewayEvent::RebootComplete { seq: 5, .. }]
    ));
    assert_eq!(p.gw.in_flight(), None);
    // A completion for another seq while something else is in flight is still refused.
    let mut q = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_B, None)));
    q.establish(welcome(4));
    q.gw.resume_in_flight(6, 1, 1006, false).unwrap();
    q.ag.send_reboot_complete(&RebootComplete {
        seq: 5,
        report: report(BOOT_B),
        result: result(5),
    })
    .unwrap();
    q.drive();
    assert!(
        matches!(q.gw_errors[..], [SessionError::SeqMismatch { .. }]),
        "{:?}",
        q.gw_errors
    );
}

/// A peer TLS did not authenticate may send at most `pre_auth_max_frame_body` per frame: the
/// largest possible `Enrol` fits, a bigger header is refused before any of its body is
/// buffered, and an authenticated session keeps the full limit.
#[test]
fn frames_before_authentication_are_cut_at_the_pre_auth_limit() {
    use crate::msg::limits::{MAX_NAME, MAX_SPKI, MAX_TOKEN};
    let name = "n".repeat(MAX_NAME);
    let (token, spki) = (vec![7u8; MAX_TOKEN], vec![9u8; MAX_SPKI]);
    let biggest = stream(&[Message::Enrol(Enrol {
        token: (&token).into(),
        name: (&name).into(),
        spki: (&spki).into(),
    })]);
    assert!(biggest.len() < crate::header::MAX_PRE_AUTH_BODY as usize);
    let mut gw = GatewaySession::new(Instant::ZERO, config(), None);
    gw.handle_input(Instant::ZERO, &biggest).unwrap();
    assert!(matches!(gw.poll_event(), Some(GatewayEvent::Enrol(_))));

    // A header announcing a body just over the limit, and most of that body.
    let len = crate::header::MAX_PRE_AUTH_BODY + 1;
    let mut big = vec![crate::MAGIC, crate::VERSION, 0x01, 0];
    big.extend_from_slice(&len.to_be_bytes());
    big.extend_from_slice(&[0; 4]);
    big.resize(big.len() + len as usize - 10, 0);
    let want = SessionError::PreAuthFrameTooLarge {
        len,
        max: crate::header::MAX_PRE_AUTH_BODY,
    };
    let mut gw = GatewaySession::new(Instant::ZERO, config(), None);
    assert_eq!(gw.handle_input(Instant::ZERO, &big), Err(want));
    assert!(gw.is_closed());
    match gw.poll_event() {
        Some(GatewayEvent::Closed(info)) => {
            assert_eq!(info.code, CloseCode::PROTOCOL);
            assert!(info.reason.contains("before authentication"), "{info:?}");
        }
        other => panic!("{other:?}"),
    }
    // With a client certificate the same frame is only incomplete.
    let mut gw = GatewaySession::new(Instant::ZERO, config(), Some(DEVICE));
    gw.handle_input(Instant::ZERO, &big).unwrap();
    assert!(!gw.is_closed());
}

fn attempt<'a>(mut d: Dispatch<'a>, attempt: u32) -> Dispatch<'a> {
    d.attempt = attempt;
    d
}

fn result_of(seq: u64, attempt: u32) -> CommandResult<'static> {
    CommandResult {
        attempt,
        ..result(seq)
    }
}

/// A retry is the same seq with a higher attempt: the agent runs it; a dispatch of the
/// attempt it already executed (a redelivery) or of an older one is refused.
#[test]
fn agent_runs_a_higher_attempt_of_the_same_seq_and_refuses_a_redelivery() {
    let last = LastExecuted {
        seq: 5,
        attempt: 1,
        executing: false,
        result: None,
    };
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, Some(last))));
    p.establish(welcome(4));
    p.gw.dispatch(&attempt(exec(5), 2)).unwrap();
    p.drive();
    assert!(
        matches!(
            p.take_ag()[..],
            [AgentEvent::Dispatch {
                seq: 5,
                attempt: 2,
                ..
            }]
        ),
        "{:?}",
        p.ag_errors
    );
    // The result of attempt 2 goes through; one of attempt 1 is not the one executing.
    assert_eq!(
        p.ag.send_result(&result_of(5, 1)),
        Err(SessionError::AttemptMismatch {
            seq: 5,
            got: 1,
            expected: 2
        })
    );
    p.ag.send_result(&result_of(5, 2)).unwrap();
    p.drive();
    assert!(matches!(
        p.take_gw()[..],
        [GatewayEvent::Result { seq: 5, .. }]
    ));
    p.gw.ack_result(5).unwrap();
    p.drive();
    // In the same session, a third attempt still runs; attempt 3 again does not.
    p.gw.dispatch(&attempt(exec(5), 3)).unwrap();
    p.drive();
    assert!(p.ag_errors.is_empty(), "{:?}", p.ag_errors);
    p.ag.send_result(&result_of(5, 3)).unwrap();
    p.drive();
    p.gw.ack_result(5).unwrap();
    p.gw.dispatch(&attempt(exec(5), 3)).unwrap();
    p.drive();
    assert_eq!(
        p.ag_errors,
        vec![SessionError::StaleDispatch {
            seq: 5,
            attempt: 3,
            last: (5, 3)
        }]
    );

    // A Hello naming attempt 2: attempt 1 of the same seq is stale too.
    let last = LastExecuted {
        seq: 5,
        attempt: 2,
        executing: false,
        result: None,
    };
    let mut ag = AgentSession::new(
        Instant::ZERO,
        config(),
        FirstMessage::Hello(hello(BOOT_A, Some(last))),
    )
    .unwrap();
    let bytes = stream(&[
        Message::Welcome(welcome(4)),
        Message::Dispatch(attempt(exec(5), 1)),
    ]);
    assert!(matches!(
        ag.handle_input(Instant::ZERO, &bytes),
        Err(SessionError::StaleDispatch { attempt: 1, .. })
    ));
}

/// The gateway accepts a result only for the dispatched attempt, and a `Hello.last` whose
/// result names another attempt than the `LastExecuted` is malformed.
#[test]
fn gateway_checks_the_attempt_of_results() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    p.gw.dispatch(&attempt(exec(3), 2)).unwrap();
    p.drive();
    p.take_ag();
    // The agent core would refuse to send it: feed the gateway directly.
    let err =
        p.gw.handle_input(p.now, &stream(&[Message::Result(result_of(3, 1))]))
            .unwrap_err();
    assert_eq!(
        err,
        SessionError::AttemptMismatch {
            seq: 3,
            got: 1,
            expected: 2
        }
    );
    assert_eq!(
        alloc::format!("{err}"),
        "seq 3 carries attempt 1, but attempt 2 was dispatched"
    );

    let last = LastExecuted {
        seq: 3,
        attempt: 2,
        executing: false,
        result: Some(result_of(3, 1)),
    };
    let mut gw = GatewaySession::new(Instant::ZERO, config(), Some(DEVICE));
    let bytes = stream(&[Message::Hello(hello(BOOT_A, Some(last)))]);
    assert!(matches!(
        gw.handle_input(Instant::ZERO, &bytes),
        Err(SessionError::AttemptMismatch { seq: 3, .. })
    ));
}

/// The device is back from the reboot of attempt 1 while the gateway has dispatched attempt
/// 2 (the queue was retried): that completion is passed on but does not end attempt 2.
#[test]
fn a_reboot_completion_of_an_earlier_attempt_leaves_the_dispatched_one_in_flight() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_B, None)));
    p.establish(welcome(4));
    p.gw.dispatch(&attempt(reboot_cmd(5), 2)).unwrap();
    p.drive();
    p.take_ag();
    let stale = RebootComplete {
        seq: 5,
        report: report(BOOT_B),
        result: result_of(5, 1),
    };
    p.gw.handle_input(p.now, &stream(&[Message::RebootComplete(stale)]))
        .unwrap();
    assert!(matches!(
        p.gw.poll_event(),
        Some(GatewayEvent::RebootComplete { seq: 5, .. })
    ));
    assert_eq!(p.gw.in_flight(), Some(5));
    // Its own completion ends it.
    let own = RebootComplete {
        seq: 5,
        report: report(BOOT_B),
        result: result_of(5, 2),
    };
    p.gw.handle_input(p.now, &stream(&[Message::RebootComplete(own)]))
        .unwrap();
    assert_eq!(p.gw.in_flight(), None);
    // A completion whose result names another command is malformed.
    let bad = RebootComplete {
        seq: 5,
        report: report(BOOT_B),
        result: result_of(6, 2),
    };
    assert!(matches!(
        p.gw.handle_input(p.now, &stream(&[Message::RebootComplete(bad)])),
        Err(SessionError::SeqMismatch {
            kind: crate::Kind::RebootComplete,
            ..
        })
    ));
}

/// A configuration report on its own reaches the gateway driver once established.
#[test]
fn a_report_is_passed_to_the_gateway_driver() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    assert_eq!(
        p.ag.send_report(&report(BOOT_A)),
        Err(SessionError::NotEstablished {
            phase: Phase::AwaitingWelcome
        })
    );
    p.establish(welcome(0));
    p.ag.send_report(&report(BOOT_A)).unwrap();
    p.drive();
    match &p.take_gw()[..] {
        [GatewayEvent::Report(frame)] => {
            assert_eq!(frame.message(), Message::Report(report(BOOT_A)));
        }
        other => panic!("{other:?}"),
    }
}
