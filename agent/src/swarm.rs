//! A swarm of simulated agents in one `mio` loop: real TLS (rustls client) and the real agent
//! session core ([`AgentSession`]) per device, one TCP connection each, source addresses
//! spread over 127.0.0.0/8.
//!
//! A simulated agent speaks the same wire protocol as `fleetcast-agent` (enrolment without a
//! client certificate, then mutual TLS and `Hello` with `last`), but executes nothing: every
//! `Dispatch` is answered at once with a `Result` whose steps are all `Ok`. It keeps what
//! exactly-once needs across reconnects (the last executed seq and the unacknowledged result,
//! both sent in `Hello.last`) and reconnects with the real agent's jittered exponential
//! back-off.
//!
//! A swarm may be given several gateways of one cell: each simulated agent then moves between
//! them as the real agent does ([`Gateways`]: its own rendezvous order, the next gateway at
//! once when one cannot be reached, a `redirect` close followed to the device's owner).
//!
//! For the checks of a cell under failure, each agent counts the commands it ran and the
//! dispatches of a seq it had already run (a command run twice, or out of order): see
//! [`SimAgent::executed`] and [`SimAgent::repeats`].
//!
//! Invariants: every agent has at most one link; timers are `(deadline, agent, link gen)`
//! entries in one heap, and an entry whose generation is stale is ignored.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use fleetcast_wire::session::{AgentEvent, AgentSession, FirstMessage};
use fleetcast_wire::{
    CloseCode, CommandResult, Enrol, Hello, Instant, LastExecuted, Message, SessionConfig, Step,
    StepResult, StepStatus,
};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection};

use crate::gateways::{Gateways, Next, REDIRECT_PAUSE_MS};
use crate::tls::{self, DeviceKey};

/// The swarm's clock: the one place its drivers read time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: std::time::Instant,
}

impl Clock {
    /// Starts the epoch now.
    #[allow(clippy::disallowed_methods)] // The load generator's driver clock.
    pub fn new() -> Self {
        Clock {
            epoch: std::time::Instant::now(),
        }
    }

    /// Monotonic time since the epoch.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as u64)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to its hard limit (children inherit it):
/// a swarm needs one descriptor per agent. Returns the new soft limit.
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit; raising the soft limit up to the hard one is allowed.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// Program name that marks a latency probe: `exec:lat <micros since the swarm clock epoch>`.
pub const LATENCY_TAG: &str = "lat";

/// Swarm parameters.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// The gateways' agent addresses, `IP:PORT`, comma-separated (several: one cell).
    pub gateways: String,
    /// Bind each agent's socket to its own source address in 127.0.0.0/8 (on loopback, so
    /// that thousands of connections to one gateway do not run out of ports); off where the
    /// swarm has one real address (a lab host).
    pub spread_sources: bool,
    /// Name in the gateways' certificates (`None`: the host of the gateway tried, as the
    /// agent's default).
    pub server_name: Option<String>,
    /// Most connections between `connect` and `Welcome`/`Enrolled` at once (0: no limit, as
    /// with real agents on separate machines).
    pub max_connecting: usize,
    /// First reconnect back-off (jittered ×0.5–1.5, doubled per failure, like the agent).
    pub backoff_min: Duration,
    /// Longest back-off.
    pub backoff_max: Duration,
    /// A link that has not reached `Welcome`/`Enrolled` this soon is dropped and retried.
    pub handshake_timeout: Duration,
    /// Seed of the back-off jitter.
    pub seed: u64,
}

/// Counters (monotonic unless noted).
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Agents currently past `Welcome` (a gauge).
    pub established: usize,
    /// `Welcome`s received.
    pub welcomes: u64,
    /// Enrolments completed.
    pub enrolled: u64,
    /// Results sent.
    pub results: u64,
    /// Results acknowledged (stored by the gateway).
    pub acks: u64,
    /// TCP connects started.
    pub connects: u64,
    /// Links that failed or closed.
    pub drops: u64,
    /// Dispatch-to-stored latencies of tagged commands, µs (enqueue to `ResultAck`).
    pub latencies_us: Vec<u64>,
    /// Dispatches of a seq an agent had already run (every agent's [`SimAgent::repeats`]).
    pub repeats: u64,
    /// `redirect` closes followed.
    pub redirects: u64,
}

struct Link {
    sock: TcpStream,
    tls: ClientConnection,
    session: AgentSession,
    connected: bool,
    writable_armed: bool,
    /// Deadline last pushed on the timer heap (avoid duplicates).
    armed: Option<Instant>,
    started: Instant,
    enrolling: bool,
}

/// One simulated device.
pub struct SimAgent {
    /// Device name.
    pub name: String,
    token: Option<String>,
    key: DeviceKey,
    /// Enrolled id (0 until enrolled).
    pub device_id: u64,
    cert_fp: [u8; 32],
    config: Option<Arc<ClientConfig>>,
    link: Option<Box<Link>>,
    gen: u32,
    backoff: Duration,
    /// The last command executed: (seq, attempt).
    last_seq: Option<(u64, u32)>,
    unacked: Option<CommandResult<'static>>,
    tag: Option<(u64, u64)>,
    /// Whether it is past `Welcome` on its current link.
    pub welcomed: bool,
    /// Highest seq acknowledged by the gateway.
    pub last_acked: u64,
    /// `Welcome`s received over the agent's life.
    pub sessions: u32,
    /// Whether it should (re)connect when its link drops.
    pub want_connected: bool,
    boot_id: [u8; 16],
    gateways: Gateways,
    /// Commands run: dispatches of a seq above the last one run.
    pub executed: u64,
    /// Dispatches of a seq at or below the last one run (zero when every command runs once,
    /// in order).
    pub repeats: u64,
}

fn server_name(name: String) -> io::Result<ServerName<'static>> {
    ServerName::try_from(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Why a link ends, which decides when and where the agent connects next.
#[derive(Debug)]
enum End {
    /// Enrolled: reconnect at once with the new certificate.
    Enrolled,
    /// The gateway could not be reached, or the link broke (a killed gateway): the next
    /// gateway of a cell at once, else the back-off.
    Failed,
    /// The gateway closed the session (other than as unable to serve): the back-off.
    Closed,
    /// The gateway named the device's owner.
    Redirect(String),
}

impl std::fmt::Debug for SimAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimAgent")
            .field("name", &self.name)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

enum TimerKind {
    Session,
    Reconnect,
}

/// The swarm: every simulated agent, one poll.
pub struct Swarm {
    cfg: SwarmConfig,
    poll: Poll,
    events: Events,
    ca: CertificateDer<'static>,
    enrol_config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
    clock: Clock,
    /// The agents, indexed by token.
    pub agents: Vec<SimAgent>,
    timers: BinaryHeap<Reverse<(Instant, usize, u32, u8)>>,
    queue: VecDeque<usize>,
    connecting: usize,
    /// Counters.
    pub stats: Stats,
    /// After enrolling, stay down instead of reconnecting with the new certificate.
    pub enrol_only: bool,
    rng: u64,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl std::fmt::Debug for Swarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm")
            .field("agents", &self.agents.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Swarm {
    /// A swarm of agents named `names` holding the enrolment `tokens`, trusting `ca`.
    pub fn new(
        cfg: SwarmConfig,
        clock: Clock,
        ca: CertificateDer<'static>,
        devices: Vec<(String, String)>,
    ) -> io::Result<Swarm> {
        let enrol_config = tls::client_config(ca.as_ref(), None).map_err(io::Error::other)?;
        let gateways = Gateways::parse(&cfg.gateways, 443, None)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let server_name = cfg.server_name.clone().map(server_name).transpose()?;
        let mut agents = Vec::with_capacity(devices.len());
        for (i, (name, token)) in devices.into_iter().enumerate() {
            let mut boot_id = [0u8; 16];
            boot_id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            boot_id[8..].copy_from_slice(&cfg.seed.to_le_bytes());
            agents.push(SimAgent {
                name,
                token: Some(token),
                key: DeviceKey::generate().map_err(io::Error::other)?,
                device_id: 0,
                cert_fp: [0; 32],
                config: None,
                link: None,
                gen: 0,
                backoff: cfg.backoff_min,
                last_seq: None,
                unacked: None,
                tag: None,
                welcomed: false,
                last_acked: 0,
                sessions: 0,
                want_connected: false,
                boot_id,
                gateways: gateways.clone(),
                executed: 0,
                repeats: 0,
            });
        }
        Ok(Swarm {
            rng: cfg.seed | 1,
            cfg,
            poll: Poll::new()?,
            events: Events::with_capacity(4096),
            ca,
            enrol_config,
            server_name,
            clock,
            agents,
            timers: BinaryHeap::new(),
            queue: VecDeque::new(),
            connecting: 0,
            stats: Stats::default(),
            enrol_only: false,
            buf: vec![0; 64 * 1024],
            out: Vec::new(),
        })
    }

    /// Asks every agent to connect (enrol first if it has no certificate) and to stay connected.
    pub fn connect_all(&mut self) {
        for i in 0..self.agents.len() {
            self.agents[i].want_connected = true;
            if self.agents[i].link.is_none() {
                self.queue.push_back(i);
            }
        }
    }

    /// Asks agents to stop reconnecting (current links stay up).
    pub fn stay_down(&mut self) {
        for a in &mut self.agents {
            a.want_connected = false;
        }
    }

    /// Changes the gateway address (a restarted gateway).
    pub fn set_gateway(&mut self, addr: SocketAddr) -> io::Result<()> {
        let gateways = Gateways::parse(&addr.to_string(), 443, None)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.cfg.gateways = addr.to_string();
        for a in &mut self.agents {
            a.gateways = gateways.clone();
        }
        Ok(())
    }

    /// Sets the connect admission limit.
    pub fn set_max_connecting(&mut self, n: usize) {
        self.cfg.max_connecting = n;
    }

    /// Drives the swarm until `done(self)` holds or `deadline` passes. Returns whether `done`.
    pub fn run_until(&mut self, deadline: Instant, mut done: impl FnMut(&Swarm) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            let now = self.clock.now();
            if now >= deadline {
                return false;
            }
            self.step(deadline.min(now + Duration::from_millis(50)));
        }
    }

    /// One poll iteration, waiting at most until `until`.
    pub fn step(&mut self, until: Instant) {
        let now = self.clock.now();
        self.admit(now);
        let mut wake = until;
        if let Some(Reverse((t, ..))) = self.timers.peek() {
            wake = wake.min(*t);
        }
        let timeout = if wake > now {
            wake - now
        } else {
            Duration::ZERO
        };
        let mut events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                eprintln!("swarm: poll failed: {e}");
            }
        }
        let now = self.clock.now();
        for ev in events.iter() {
            let i = ev.token().0;
            if i < self.agents.len() {
                self.service(i, now);
            }
        }
        self.events = events;
        self.fire_timers(now);
    }

    fn admit(&mut self, now: Instant) {
        while let Some(&i) = self.queue.front() {
            if self.cfg.max_connecting != 0 && self.connecting >= self.cfg.max_connecting {
                return;
            }
            self.queue.pop_front();
            let a = &self.agents[i];
            if a.link.is_some() || !a.want_connected {
                continue;
            }
            if let Err(e) = self.connect(i, now) {
                self.stats.drops += 1;
                if self.stats.drops < 5 {
                    eprintln!("swarm: connect failed: {e}");
                }
                self.next_gateway(i, now);
            }
        }
    }

    fn source_addr(i: usize) -> Ipv4Addr {
        // 127.1.0.1 ... : 250 agents per /24, so each (source, gateway) pair has few sockets.
        Ipv4Addr::new(
            127,
            1 + (i / 62_500) as u8,
            ((i / 250) % 250) as u8,
            1 + (i % 250) as u8,
        )
    }

    fn connect(&mut self, i: usize, now: Instant) -> io::Result<()> {
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        if self.cfg.spread_sources {
            let src = SocketAddrV4::new(Self::source_addr(i), 0);
            sock.bind(&src.into())?;
        }
        let target = self.agents[i].gateways.target();
        // A swarm is given addresses, not names: nothing to resolve (IPv6 too).
        let ip: std::net::IpAddr = target
            .host
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let gateway = SocketAddr::new(ip, target.port);
        match sock.connect(&gateway.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut sock = TcpStream::from_std(std::net::TcpStream::from(sock));
        self.poll.registry().register(
            &mut sock,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let a = &mut self.agents[i];
        let (config, first_enrol) = match &a.config {
            Some(c) => (c.clone(), false),
            None => (self.enrol_config.clone(), true),
        };
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => server_name(target.host)?,
        };
        let tls = ClientConnection::new(config, name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let scfg = SessionConfig::default();
        let session = if first_enrol {
            let spki = a.key.spki_der();
            let token = a.token.as_deref().unwrap_or("");
            AgentSession::new(
                now,
                scfg,
                FirstMessage::Enrol(Enrol {
                    token: token.as_bytes().into(),
                    name: Cow::Borrowed(&a.name),
                    spki: Cow::Borrowed(&spki),
                }),
            )
        } else {
            let last = a.last_seq.map(|(seq, attempt)| LastExecuted {
                seq,
                attempt,
                executing: false,
                result: a.unacked.clone(),
            });
            AgentSession::new(
                now,
                scfg,
                FirstMessage::Hello(Hello {
                    device_id: a.device_id,
                    credential: Cow::Borrowed(&a.cert_fp),
                    agent_version: "loadgen".into(),
                    boot_id: a.boot_id,
                    last,
                }),
            )
        }
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        a.gen = a.gen.wrapping_add(1);
        a.welcomed = false;
        a.link = Some(Box::new(Link {
            sock,
            tls,
            session,
            connected: false,
            writable_armed: true,
            armed: None,
            started: now,
            enrolling: first_enrol,
        }));
        self.connecting += 1;
        self.stats.connects += 1;
        let gen = a.gen;
        self.timers.push(Reverse((
            now + self.cfg.handshake_timeout,
            i,
            gen,
            TimerKind::Session as u8,
        )));
        Ok(())
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64: seeded, so runs are repeatable.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        0.5 + (self.rng % 1000) as f64 / 1000.0
    }

    fn schedule_reconnect(&mut self, i: usize, now: Instant) {
        if !self.agents[i].want_connected {
            return;
        }
        let j = self.jitter();
        let a = &mut self.agents[i];
        let wait = a.backoff.mul_f64(j);
        a.backoff = (a.backoff * 2).min(self.cfg.backoff_max);
        let gen = a.gen;
        self.timers
            .push(Reverse((now + wait, i, gen, TimerKind::Reconnect as u8)));
    }

    /// Agent `i`'s gateway could not be reached: what the real agent does next.
    fn next_gateway(&mut self, i: usize, now: Instant) {
        let a = &mut self.agents[i];
        if !a.gateways.several() {
            return self.schedule_reconnect(i, now);
        }
        match a.gateways.failed() {
            Next::Now => {
                if a.want_connected {
                    self.queue.push_back(i);
                }
            }
            Next::Pause => {
                let wait = Duration::from_millis(REDIRECT_PAUSE_MS).mul_f64(self.jitter());
                let gen = self.agents[i].gen;
                self.timers
                    .push(Reverse((now + wait, i, gen, TimerKind::Reconnect as u8)));
            }
            Next::BackOff => self.schedule_reconnect(i, now),
        }
    }

    /// Drops agent `i`'s link; reconnects (now or later) if it should.
    fn drop_link(&mut self, i: usize, now: Instant, end: End) {
        let a = &mut self.agents[i];
        let Some(mut link) = a.link.take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut link.sock);
        if a.welcomed {
            self.stats.established -= 1;
        } else {
            self.connecting -= 1;
        }
        a.welcomed = false;
        a.gen = a.gen.wrapping_add(1);
        match end {
            End::Enrolled => {
                if a.want_connected {
                    self.queue.push_back(i);
                }
            }
            End::Redirect(addr) => {
                if a.gateways.redirect(&addr) {
                    self.stats.redirects += 1;
                    if a.want_connected {
                        self.queue.push_back(i);
                    }
                } else {
                    self.stats.drops += 1;
                    self.schedule_reconnect(i, now);
                }
            }
            End::Failed => {
                self.stats.drops += 1;
                self.next_gateway(i, now);
            }
            End::Closed => {
                self.stats.drops += 1;
                self.schedule_reconnect(i, now);
            }
        }
    }

    fn service(&mut self, i: usize, now: Instant) {
        let Some(link) = self.agents[i].link.as_mut() else {
            return;
        };
        if !link.connected {
            match link.sock.take_error() {
                Ok(Some(_)) | Err(_) => return self.drop_link(i, now, End::Failed),
                Ok(None) => {}
            }
            match link.sock.peer_addr() {
                Ok(_) => link.connected = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(_) => return self.drop_link(i, now, End::Failed),
            }
        }
        let mut eof = false;
        let mut failed = false;
        loop {
            match link.tls.read_tls(&mut link.sock) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(_) => {
                    let state = match link.tls.process_new_packets() {
                        Ok(s) => s,
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    };
                    let mut n = state.plaintext_bytes_to_read();
                    let closed = state.peer_has_closed();
                    while n > 0 {
                        let k = match link.tls.reader().read(&mut self.buf[..n.min(64 * 1024)]) {
                            Ok(k) if k > 0 => k,
                            _ => break,
                        };
                        let _ = link.session.handle_input(now, &self.buf[..k]);
                        n -= k;
                    }
                    if closed {
                        eof = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        self.drain(i, now);
        if (failed || eof) && self.agents[i].link.is_some() {
            self.drop_link(i, now, End::Failed);
        }
    }

    /// Drains agent `i`'s core: transmit, events (answering dispatches), transmit, flush.
    fn drain(&mut self, i: usize, now: Instant) {
        let mut end: Option<End> = None;
        loop {
            let a = &mut self.agents[i];
            let Some(link) = a.link.as_mut() else { return };
            self.out.clear();
            while link.session.poll_transmit(now, &mut self.out).is_some() {}
            if !self.out.is_empty() && link.tls.writer().write_all(&self.out).is_err() {
                end = Some(End::Failed);
            }
            let Some(ev) = link.session.poll_event() else {
                break;
            };
            match ev {
                AgentEvent::Welcomed(_) => {
                    a.welcomed = true;
                    a.sessions += 1;
                    a.backoff = self.cfg.backoff_min;
                    a.gateways.welcomed();
                    self.connecting -= 1;
                    self.stats.established += 1;
                    self.stats.welcomes += 1;
                }
                AgentEvent::Enrolled { device_id, frame } => {
                    if let Message::Enrolled(e) = frame.message() {
                        let cert = CertificateDer::from(e.certificate.to_vec());
                        a.cert_fp = tls::cert_fingerprint_sha256(cert.as_ref());
                        match tls::client_config(self.ca.as_ref(), Some((&cert, &a.key))) {
                            Ok(c) => {
                                a.config = Some(c);
                                a.device_id = device_id;
                                a.token = None;
                                a.gateways.prefer(device_id);
                                if self.enrol_only {
                                    a.want_connected = false;
                                }
                                self.stats.enrolled += 1;
                                end = Some(End::Enrolled);
                            }
                            Err(e) => eprintln!("swarm: bad device certificate: {e}"),
                        }
                    }
                }
                AgentEvent::Dispatch {
                    seq,
                    attempt,
                    command_id,
                    frame,
                    ..
                } => {
                    let Message::Dispatch(d) = frame.message() else {
                        continue;
                    };
                    if a.last_seq.is_none_or(|(last, _)| seq > last) {
                        a.executed += 1;
                    } else {
                        a.repeats += 1;
                        self.stats.repeats += 1;
                    }
                    if let Some(Step::Exec { argv }) = d.steps.first() {
                        if argv.first().map(|a| &**a) == Some(LATENCY_TAG) {
                            if let Some(t) = argv.get(1).and_then(|t| t.parse().ok()) {
                                a.tag = Some((seq, t));
                            }
                        }
                    }
                    let result = CommandResult {
                        command_id,
                        seq,
                        attempt,
                        exit_code: 0,
                        steps: vec![
                            StepResult {
                                status: StepStatus::Ok,
                                exit_code: 0,
                                duration_ms: 0,
                            };
                            d.steps.len()
                        ],
                        output: Cow::Borrowed(&[]),
                        report: None,
                    };
                    if link.session.send_result(&result).is_ok() {
                        a.last_seq = Some((seq, attempt));
                        a.unacked = Some(result);
                        self.stats.results += 1;
                    }
                }
                AgentEvent::ResultAcked { seq } => {
                    self.stats.acks += 1;
                    a.last_acked = a.last_acked.max(seq);
                    if a.unacked.as_ref().is_some_and(|r| r.seq <= seq) {
                        a.unacked = None;
                    }
                    if let Some((s, t)) = a.tag {
                        if s == seq {
                            a.tag = None;
                            let now_us = now.as_micros();
                            self.stats.latencies_us.push(now_us.saturating_sub(t));
                        }
                    }
                }
                AgentEvent::Closed(info) => {
                    end = Some(match end {
                        Some(e) => e,
                        None if info.by_peer && info.code == CloseCode::REDIRECT => {
                            End::Redirect(info.reason)
                        }
                        // The gateway cannot serve now: the next one of a cell, as the agent.
                        None if info.by_peer
                            && matches!(info.code, CloseCode::OVERLOADED | CloseCode::INTERNAL) =>
                        {
                            End::Failed
                        }
                        None => End::Closed,
                    })
                }
                AgentEvent::Announce(_)
                | AgentEvent::TransferStatus(_)
                | AgentEvent::TaskAnswer(_) => {}
            }
        }
        self.flush(i, now);
        if let Some(end) = end {
            let enrolled = self.agents[i]
                .link
                .as_ref()
                .is_some_and(|l| l.enrolling && self.agents[i].config.is_some());
            self.drop_link(i, now, if enrolled { End::Enrolled } else { end });
        }
    }

    fn flush(&mut self, i: usize, _now: Instant) {
        let a = &mut self.agents[i];
        let Some(link) = a.link.as_mut() else { return };
        if link.connected {
            while link.tls.wants_write() {
                match link.tls.write_tls(&mut link.sock) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        let pending = !link.connected || link.tls.wants_write();
        if pending != link.writable_armed {
            let interest = if pending {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let _ = self
                .poll
                .registry()
                .reregister(&mut link.sock, Token(i), interest);
            link.writable_armed = pending;
        }
        if let Some(t) = link.session.poll_timeout() {
            if link.armed != Some(t) {
                link.armed = Some(t);
                self.timers
                    .push(Reverse((t, i, a.gen, TimerKind::Session as u8)));
            }
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, i, gen, kind))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let a = &mut self.agents[i];
            if a.gen != gen {
                continue;
            }
            if kind == TimerKind::Reconnect as u8 {
                if a.link.is_none() && a.want_connected {
                    self.queue.push_back(i);
                }
                continue;
            }
            let Some(link) = a.link.as_mut() else {
                continue;
            };
            if !a.welcomed
                && (!link.enrolling || a.config.is_none())
                && now - link.started >= self.cfg.handshake_timeout
            {
                self.drop_link(i, now, End::Failed);
                continue;
            }
            if link.armed == Some(t) {
                link.armed = None;
            }
            if link.session.poll_timeout().is_some_and(|d| d <= now) {
                link.session.handle_timeout(now);
                self.drain(i, now);
            }
        }
        self.admit(now);
    }
}
