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
    LastExecuted, Nack, Outcome, Package, RebootComplete, Step, StepResult, StepStatus, TaskAnswer,
    TaskAsk, TaskVerdict, TransferState, TransferStatus, Welcome,
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
        target: None,
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
        target: None,
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
        ..Default::default()
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

mod commands;
mod establish;
mod liveness;
