//! `fleetcastd`'s event loop: one `mio` poll owning every socket — the TLS listener, agent
//! sessions, the admin socket — and driving the sans-IO session cores and the [`Fleet`].
//!
//! # One iteration
//! 1. Poll timeout: 0 if work is queued, else the earliest session timer or fleet deadline.
//! 2. `poll` (EINTR retried), then read the clock **once** ([`Clock::read`], the only call site).
//! 3. Accept new connections (at most [`GatewayConfig::accept_budget`] per iteration, so a
//!    reconnect storm cannot starve established sessions); read ready connections (at most
//!    [`GatewayConfig::read_budget`] bytes each, re-queued when the budget cuts them).
//! 4. Feed plaintext to each session core, fire due timers, and drain every core in its
//!    documented order: `poll_transmit` into TLS, `poll_event` into fleet [`Input`]s,
//!    `poll_timeout` into the timer heap.
//! 5. The fleet runs on the store thread (`store_thread`): when the batch in flight is
//!    committed its acks, dispatches and replies go back into the cores (step 4 again), and
//!    the inputs gathered meanwhile go to the thread as the next batch: one
//!    [`Fleet::process`] call, one store batch, one fsync, off this thread.
//! 6. Write TLS until `WouldBlock`, asking for `WRITABLE` only while bytes are pending.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleetcast_store::DeviceId;
use fleetcast_wire::session::{self, GatewayEvent, GatewaySession};
use fleetcast_wire::{Dispatch, Enrolled, Instant, Message};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};
use rustls::ServerConfig;

use crate::admin::{self, Request, Response};
use crate::artifacts;
use crate::convert::{report_from_wire, result_from_wire, sha256, steps_to_wire};
use crate::distribution::{DistEvent, Distributor, McastConfig, PushSpec};
use crate::fleet::{Action, ConnId, Fleet, Input, LastSeen};
use crate::metrics;
use crate::tlsconn::TlsConn;
use crate::watch::{DirWatch, WatchConfig};

mod admin_conn;
mod artifact_conn;
mod ladder;
mod limits;
mod store_thread;

use admin_conn::AdminConn;
use artifact_conn::{artifact_write, ArtifactConn};

pub use limits::Budget;
use limits::Class;

const LISTENER: Token = Token(0);
const ADMIN: Token = Token(1);
const MCAST: Token = Token(2);
const ARTIFACTS: Token = Token(3);
/// Wakes the loop from its threads: the store thread committed a batch, or a pushed file's
/// digest is ready. mio allows one `Waker` per `Poll`, so both share it; a wake-up makes the
/// loop look at both (taking a finished batch or digest is cheap when there is none).
const WAKE: Token = Token(usize::MAX - 3);
const FIRST_CONN: usize = 4;
// Every fixed token is distinct, the metrics endpoint's included.
const _: () = assert!(
    WAKE.0 != metrics::LISTENER.0
        && EXTRA_LISTENER.0 != metrics::LISTENER.0
        && WAKE.0 != EXTRA_LISTENER.0
);
/// The optional second agent listener (e.g. port 443), far from the connection tokens.
/// (`usize::MAX - 1` is the metrics listener's: [`metrics::LISTENER`].)
const EXTRA_LISTENER: Token = Token(usize::MAX - 2);

/// Loop parameters.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where agents connect.
    pub listen: SocketAddr,
    /// A second address served identically (e.g. port 443 for agents behind firewalls).
    pub extra_listen: Option<SocketAddr>,
    /// Time an HTTP request (Upgrade head, long-poll request) has to arrive complete.
    pub http_timeout: Duration,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Session core parameters.
    pub session: session::Config,
    /// New connections accepted per iteration.
    pub accept_budget: usize,
    /// Ciphertext bytes read from one connection per iteration.
    pub read_budget: usize,
    /// Most connections at once (agents and admin clients).
    pub max_connections: usize,
    /// Listen backlog: a reconnect storm of thousands of agents overflows the default 128 and
    /// turns into TCP retry waits (measured: 10,000-agent storm 11.8 s → 7.4 s at 4096).
    /// The kernel caps it at `net.core.somaxconn`.
    pub listen_backlog: i32,
    /// Readiness events taken per `poll`: bounds how many results one iteration (one store
    /// commit, one fsync) can gather.
    pub events_capacity: usize,
    /// Artifact downloads over HTTP (`fetch` steps naming `gateway:NAME`); `None`: off.
    pub artifacts: Option<ArtifactsConfig>,
    /// Multicast distribution; `None`: pushes are refused.
    pub mcast: Option<McastConfig>,
    /// A directory whose new or changed files are pushed (needs `mcast`); `None`: off.
    pub watch: Option<WatchConfig>,
    /// Where the Prometheus metrics endpoint listens (`GET /metrics`); `None`: off.
    pub metrics_listen: Option<SocketAddr>,
    /// What the event log and the results keep (pruned incrementally by the loop).
    pub retention: crate::retention::RetentionConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:7300".parse().expect("literal address"),
            extra_listen: None,
            http_timeout: Duration::from_secs(5),
            admin_socket: PathBuf::from("admin.sock"),
            session: session::Config::default(),
            accept_budget: 256,
            read_budget: 64 * 1024,
            max_connections: 100_000,
            listen_backlog: 4096,
            events_capacity: 8192,
            artifacts: None,
            mcast: None,
            watch: None,
            metrics_listen: None,
            retention: crate::retention::RetentionConfig::default(),
        }
    }
}

/// Where artifacts are served from, and how agents reach them.
#[derive(Debug, Clone)]
pub struct ArtifactsConfig {
    /// Listening address of the HTTP artifact endpoint.
    pub listen: SocketAddr,
    /// The flat directory served (`<data-dir>/artifacts`).
    pub root: PathBuf,
    /// URL agents use for it (`gateway:NAME` in a `fetch` becomes `<base_url>/NAME`);
    /// `None`: `http://` and the bound address.
    pub base_url: Option<String>,
}

/// Ciphertext read per iteration from a connection not authenticated yet (the handshake and
/// an `Enrol` need a few KiB).
const PRE_AUTH_READ_BUDGET: usize = 16 * 1024;

/// Time allowed for one follow-up command of a push (an install, typically).
const FOLLOW_UP_TIMEOUT_MS: u64 = 600_000;

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

struct AgentConn {
    tls: TlsConn,
    session: Option<GatewaySession>,
    device: Option<DeviceId>,
    key_hash: [u8; 32],
    plain: Vec<u8>,
    out: Vec<u8>,
    /// The peer is gone or the session closed: flush and drop.
    closing: bool,
    writable_armed: bool,
    /// Which layers the first bytes picked (transport ladder).
    sniff: ladder::Sniffing,
    /// The source address (for a long-poll relay's loopback connection: the address of the
    /// agent's HTTP requests).
    peer: std::net::IpAddr,
    /// TLS authenticated a client certificate of this CA, or (a long-poll request) the
    /// relay it names carries such a session: counts as an agent, not as an unauthenticated
    /// connection.
    authenticated: bool,
    /// The long-poll relay this (loopback) connection comes from.
    relay: Option<(usize, ConnId)>,
}

enum Conn {
    Agent(Box<AgentConn>),
    Admin(AdminConn),
    Artifact(ArtifactConn),
    /// The gateway end of a long-poll session.
    Relay(Box<ladder::RelayConn>),
}

struct Slot {
    id: ConnId,
    conn: Conn,
}

/// The gateway event loop.
pub struct Gateway {
    poll: Poll,
    listener: TcpListener,
    extra: Option<TcpListener>,
    relays: ladder::Relays,
    admin: UnixListener,
    artifacts: Option<TcpListener>,
    server_cfg: Arc<ServerConfig>,
    cfg: GatewayConfig,
    /// The fleet, on the store thread (see [`store_thread`]).
    fleet: store_thread::StoreThread,
    dist: Option<Distributor>,
    /// The multicast socket may hold more NACKs than one turn's budget read.
    mcast_ready: bool,
    /// A pushed file's digest is ready ([`Distributor::take_hashed`]).
    hashed_ready: bool,
    /// The watched directory: its configuration, memory, next scan, and the pseudo
    /// connection ids its pushes use (counting down from `u64::MAX`, never a real one).
    watch: Option<(WatchConfig, DirWatch, Instant)>,
    watch_conn: u64,
    clock: Clock,
    conns: slab::Slab<Slot>,
    generation: u64,
    timers: BinaryHeap<Reverse<(Instant, usize, ConnId)>>,
    ready: VecDeque<usize>,
    inputs: Vec<Input>,
    touched: Vec<usize>,
    /// Wall-clock ms at the last clock read (results and events are stamped with it).
    wall_ms: u64,
    stop: bool,
    /// The metrics endpoint, when configured.
    metrics: Option<metrics::Server>,
    /// What the loop counts for the metrics.
    counters: metrics::Counters,
    /// Connection caps, eviction, the enrolment limiter.
    limits: limits::Limits,
    /// Retention of events and results.
    pruner: crate::retention::Pruner,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Binds the listener and the admin socket.
    pub fn bind(cfg: GatewayConfig, fleet: Fleet) -> io::Result<Gateway> {
        let poll = Poll::new()?;
        let mut listener = bind_listener(cfg.listen, cfg.listen_backlog)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let extra = match cfg.extra_listen {
            Some(addr) => {
                let mut l = bind_listener(addr, cfg.listen_backlog)?;
                poll.registry()
                    .register(&mut l, EXTRA_LISTENER, Interest::READABLE)?;
                Some(l)
            }
            None => None,
        };
        let _ = std::fs::remove_file(&cfg.admin_socket);
        let mut admin = UnixListener::bind(&cfg.admin_socket)?;
        std::fs::set_permissions(&cfg.admin_socket, std::fs::Permissions::from_mode(0o600))?;
        poll.registry()
            .register(&mut admin, ADMIN, Interest::READABLE)?;
        let mut cfg = cfg;
        let watch = cfg
            .watch
            .clone()
            .map(|w| (w, DirWatch::new(), Instant::ZERO));
        let artifacts = match &mut cfg.artifacts {
            Some(a) => {
                std::fs::create_dir_all(&a.root)?;
                if std::fs::symlink_metadata(&a.root).is_ok_and(|m| m.file_type().is_symlink()) {
                    tracing::warn!(dir = %a.root.display(), "the artifact directory is a symlink: nothing in it is served (mount the other disk there instead)");
                }
                let mut l = bind_listener(a.listen, cfg.listen_backlog)?;
                poll.registry()
                    .register(&mut l, ARTIFACTS, Interest::READABLE)?;
                if a.base_url.is_none() {
                    a.base_url = Some(format!("http://{}", l.local_addr()?));
                }
                Some(l)
            }
            None => None,
        };
        let server_cfg = fleet.pki().server_config();
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKE)?);
        let fleet = store_thread::StoreThread::spawn(fleet, Arc::clone(&waker))?;
        let dist = match &cfg.mcast {
            Some(m) => {
                let mut d = Distributor::open(m.clone())?;
                poll.registry()
                    .register(d.socket(), MCAST, Interest::READABLE)?;
                d.set_waker(Arc::clone(&waker));
                Some(d)
            }
            None => None,
        };
        let metrics = match cfg.metrics_listen {
            Some(addr) => Some(metrics::Server::bind(addr, poll.registry())?),
            None => None,
        };
        // Everything is bound: what is left of the descriptor limit is the connections'.
        let budget = Budget::of_process();
        tracing::info!(
            descriptors = budget.descriptors,
            in_use = budget.in_use,
            agents = budget.agents,
            unauthenticated = budget.unauthenticated,
            artifacts = budget.artifacts,
            relays = budget.relays,
            admin = budget.admin,
            "connection budget"
        );
        Ok(Gateway {
            limits: limits::Limits::new(budget),
            pruner: crate::retention::Pruner::new(cfg.retention),
            metrics,
            counters: metrics::Counters::default(),
            poll,
            listener,
            extra,
            relays: ladder::Relays::default(),
            admin,
            artifacts,
            server_cfg,
            cfg,
            fleet,
            dist,
            mcast_ready: false,
            hashed_ready: false,
            watch,
            watch_conn: u64::MAX,
            clock: Clock::new(),
            conns: slab::Slab::new(),
            generation: 0,
            timers: BinaryHeap::new(),
            ready: VecDeque::new(),
            inputs: Vec::new(),
            touched: Vec::new(),
            wall_ms: 0,
            stop: false,
        })
    }

    /// The URL `fetch` steps naming `gateway:NAME` resolve against, when artifacts are served.
    pub fn artifact_base_url(&self) -> Option<&str> {
        self.cfg
            .artifacts
            .as_ref()
            .and_then(|a| a.base_url.as_deref())
    }

    /// The metrics endpoint's address, when it is on (useful with port 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    /// The metrics of this gateway now (what `GET /metrics` and `fleetcast metrics` show).
    pub fn metrics(&self) -> Result<Vec<metrics::Family>, fleetcast_store::Error> {
        let mut live = metrics::Live {
            sessions: 0,
            connections: self.conns.len(),
            counters: self.counters,
            mcast: self.dist.as_ref().map(|d| d.totals()),
        };
        self.fleet.call(move |f| {
            live.sessions = f.online();
            metrics::gather(f.store(), &live)
        })
    }

    fn metrics_event(&mut self, token: Token) {
        let Some(mut srv) = self.metrics.take() else {
            return;
        };
        srv.handle(self.poll.registry(), token, || match self.metrics() {
            Ok(f) => metrics::render(&f),
            Err(e) => format!("# metrics unavailable: {e}\n"),
        });
        self.metrics = Some(srv);
    }

    /// Requests the loop serves itself (not the fleet): metrics and backup.
    fn serve_local(&mut self, idx: usize, req: Request) {
        self.counters.admin_requests += 1;
        let resp = match req {
            Request::Metrics => match self.metrics() {
                Ok(f) => Response::ok(serde_json::json!({
                    "text": metrics::render(&f),
                    "samples": metrics::to_json(&f),
                })),
                Err(e) => Response::err(format!("cannot read the store: {e}")),
            },
            Request::Backup { dest } => self.backup(&dest),
            _ => Response::err("not a local request"),
        };
        if let Some(Slot {
            conn: Conn::Admin(a),
            ..
        }) = self.conns.get_mut(idx)
        {
            push_json_line(&mut a.out, &resp);
            self.touched.push(idx);
        }
    }

    /// `fleetcast backup`: a consistent, compacted copy of the store (the loop waits for it).
    fn backup(&self, dest: &str) -> Response {
        let path = std::path::Path::new(dest);
        if !path.is_absolute() {
            return Response::err(format!("backup destination `{dest}` must be absolute"));
        }
        if path.read_dir().is_ok_and(|mut d| d.next().is_some()) {
            return Response::err(format!(
                "backup destination {dest} is not empty: give a new directory"
            ));
        }
        let dest_path = path.to_path_buf();
        match self.fleet.call(move |f| f.store().backup(&dest_path)) {
            Ok(()) => {
                let bytes = std::fs::metadata(path.join("data.mdb")).map_or(0, |m| m.len());
                tracing::info!(dest, bytes, "store backed up");
                Response::ok(serde_json::json!({ "backup": dest, "bytes": bytes }))
            }
            Err(e) => Response::err(format!("backup to {dest} failed: {e}")),
        }
    }

    /// The address agents connect to (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The second agent address, when configured.
    pub fn extra_addr(&self) -> Option<SocketAddr> {
        self.extra.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Runs until [`Gateway::run_for`]'s limit or forever.
    pub fn run(&mut self) -> io::Result<()> {
        self.run_for(None)
    }

    /// Runs the loop, returning after `limit` (for tests) or never.
    pub fn run_for(&mut self, limit: Option<Duration>) -> io::Result<()> {
        let mut events = Events::with_capacity(self.cfg.events_capacity);
        let (start, _) = self.clock.read();
        while !self.stop {
            let (now, wall) = self.clock.read();
            if let Some(l) = limit {
                if now - start >= l {
                    return Ok(());
                }
            }
            let timeout = self.poll_timeout(now, wall, limit.map(|l| start + l));
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let (now, wall) = self.clock.read();
            self.wall_ms = wall;
            // Listeners paused because their class was full: try again.
            if self.limits.agents_paused.is_some_and(|t| t <= now) {
                self.limits.agents_paused = None;
                self.accept_agents(now);
            }
            if self.limits.artifacts_paused.is_some_and(|t| t <= now) {
                self.limits.artifacts_paused = None;
                self.accept_artifacts(now);
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER | EXTRA_LISTENER => self.accept_agents(now),
                    ADMIN => self.accept_admin(now),
                    ARTIFACTS => self.accept_artifacts(now),
                    MCAST => self.mcast_ready = true,
                    // A finished batch is taken in `process_fleet`, a digest here.
                    WAKE => self.hashed_ready = true,
                    t if metrics::Server::owns(t) => self.metrics_event(t),
                    Token(t) => {
                        let idx = t - FIRST_CONN;
                        if self.conns.contains(idx) && !self.ready.contains(&idx) {
                            self.ready.push_back(idx);
                        }
                    }
                }
            }
            self.service_ready(now);
            if std::mem::take(&mut self.mcast_ready) {
                if let Some(d) = self.dist.as_mut() {
                    self.mcast_ready = d.handle_readable(now);
                }
            }
            self.fire_timers(now);
            self.scan_watch(now);
            if std::mem::take(&mut self.hashed_ready) {
                self.take_hashed(now);
            }
            self.process_fleet(now, wall);
            self.prune(now, wall);
            self.drive_distributions(now);
            self.flush_touched();
        }
        Ok(())
    }

    /// Pushes whose file digest is ready go to the fleet (which creates their task); a file
    /// that could not be read is refused to whoever asked.
    fn take_hashed(&mut self, now: Instant) {
        let Some(d) = self.dist.as_mut() else { return };
        for (conn, r) in d.take_hashed() {
            match r {
                Ok(task) => self.inputs.push(Input::Push { conn, task }),
                Err(e) => {
                    tracing::warn!(conn, error = %e, "push refused");
                    self.apply(
                        Action::Reply {
                            conn,
                            resp: Response::err(e.to_string()),
                        },
                        now,
                    );
                }
            }
        }
    }

    /// Scans the watched directory when due and pushes what settled there.
    fn scan_watch(&mut self, now: Instant) {
        let (Some((cfg, watch, next)), Some(d)) = (self.watch.as_mut(), self.dist.as_mut()) else {
            return;
        };
        if now < *next {
            return;
        }
        *next = now + cfg.interval;
        let entries = match crate::watch::list(&cfg.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %cfg.dir.display(), error = %e, "watched directory unreadable");
                return;
            }
        };
        let origin = format!("change in watched directory {}", cfg.dir.display());
        for name in watch.scan(&entries) {
            let path = cfg.dir.join(&name);
            let conn = self.watch_conn;
            self.watch_conn -= 1;
            let spec = PushSpec {
                path: &path.display().to_string(),
                group: &cfg.group,
                block_size: cfg.block_size,
                rate_mbps: cfg.rate_mbps,
                origin: &origin,
                trigger: admin::PushTrigger::default(),
                then: Vec::new(),
            };
            match d.prepare_push(conn, spec, self.wall_ms) {
                Ok(()) => {
                    tracing::info!(file = %path.display(), group = %cfg.group, "watched file changed: pushing");
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "watched file not pushed")
                }
            }
        }
    }

    fn drive_distributions(&mut self, now: Instant) {
        let Some(d) = self.dist.as_mut() else { return };
        for ev in d.drive(now) {
            match ev {
                DistEvent::Finished {
                    task,
                    completed,
                    unfinished,
                    stats,
                    deferred,
                    send_errors,
                } => tracing::info!(
                    task = task.0,
                    completed,
                    unfinished,
                    first_pass = stats.first_pass_blocks,
                    multicast_repairs = stats.multicast_repairs,
                    parity = stats.parity_symbols,
                    unicast_repairs = stats.unicast_repairs,
                    bytes = stats.bytes,
                    nacks = stats.nacks,
                    deferred,
                    send_errors,
                    "distribution finished"
                ),
            }
        }
    }

    fn poll_timeout(&self, now: Instant, wall: u64, limit: Option<Instant>) -> Duration {
        // Inputs wait while a batch is in flight: its commit wakes the loop (`WAKE`).
        let inputs = !self.inputs.is_empty() && !self.fleet.busy();
        if !self.ready.is_empty() || inputs || self.mcast_ready {
            return Duration::ZERO;
        }
        let mut next = limit.unwrap_or(now + Duration::from_secs(3600));
        if let Some(t) = self.dist.as_ref().and_then(|d| d.poll_timeout(now)) {
            next = next.min(t.max(now));
        }
        if let Some((_, _, t)) = &self.watch {
            next = next.min((*t).max(now));
        }
        if let Some(Reverse((t, _, _))) = self.timers.peek() {
            next = next.min(*t);
        }
        if let Some(d) = self.fleet.next_deadline().filter(|_| !self.fleet.busy()) {
            next = next.min(now + Duration::from_millis(d.saturating_sub(wall)));
        }
        if let Some(t) = self.limits.next_retry() {
            next = next.min(t.max(now));
        }
        next = next.min(self.pruner.next_due().max(now));
        // Round up to whole milliseconds so we never spin on a sub-ms timer.
        let d = next - now;
        Duration::from_millis(d.as_micros().div_ceil(1000) as u64)
    }

    fn accept_agents(&mut self, now: Instant) {
        for _ in 0..self.cfg.accept_budget {
            if self.limits.agents_paused.is_some() {
                return;
            }
            // Room for one more unauthenticated connection, or leave the backlog alone.
            let Some(victim) = self.room_for(Class::Unauthenticated, now) else {
                return;
            };
            match self.accept_one() {
                Ok((sock, peer)) => {
                    if self.conns.len() >= self.cfg.max_connections {
                        drop(sock);
                        tracing::warn!("connection limit reached; refusing");
                        continue;
                    }
                    if let Some(i) = victim {
                        self.evict(Class::Unauthenticated, i, now);
                    }
                    let (peer, relay) = self.relays.origin(peer);
                    let _ = sock.set_nodelay(true);
                    let tls = match rustls::ServerConnection::new(self.server_cfg.clone()) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::error!(error = %e, "TLS setup failed");
                            continue;
                        }
                    };
                    let wrap = |sock| {
                        Conn::Agent(Box::new(AgentConn {
                            tls: TlsConn::new(sock, tls),
                            session: None,
                            device: None,
                            key_hash: [0; 32],
                            plain: Vec::new(),
                            out: Vec::new(),
                            closing: false,
                            writable_armed: false,
                            sniff: ladder::Sniffing::Outer,
                            peer,
                            authenticated: false,
                            relay,
                        }))
                    };
                    let Some((idx, id)) = self.add_conn(sock, now, wrap) else {
                        continue;
                    };
                    // Handshake timeout: the session core's hello timer starts at handshake
                    // end; until then this timer bounds a silent TLS client.
                    self.timers
                        .push(Reverse((now + self.cfg.session.hello_timeout, idx, id)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            }
        }
        // Budget exhausted: more may be waiting; come back next iteration.
        self.ready.push_back(usize::MAX);
    }

    /// Accepts from the agent listener, then from the extra one.
    fn accept_one(&self) -> io::Result<(TcpStream, SocketAddr)> {
        match (self.listener.accept(), &self.extra) {
            (Err(e), Some(l)) if e.kind() == io::ErrorKind::WouldBlock => l.accept(),
            (r, _) => r,
        }
    }

    /// Registers a new connection's socket with the poll and stores it in the slab; returns
    /// its slot index and its id (`generation << 32 | index`, never reused).
    fn add_conn<S: mio::event::Source>(
        &mut self,
        mut sock: S,
        now: Instant,
        wrap: impl FnOnce(S) -> Conn,
    ) -> Option<(usize, ConnId)> {
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut sock, Token(idx + FIRST_CONN), Interest::READABLE)
        {
            tracing::error!(error = %e, "register failed");
            return None;
        }
        self.generation += 1;
        let id = (self.generation << 32) | idx as u64;
        entry.insert(Slot {
            id,
            conn: wrap(sock),
        });
        self.count_new(idx, id, now);
        Some((idx, id))
    }

    fn service_ready(&mut self, now: Instant) {
        let n = self.ready.len();
        for _ in 0..n {
            let Some(idx) = self.ready.pop_front() else {
                break;
            };
            if idx == usize::MAX {
                self.accept_agents(now);
                continue;
            }
            if !self.conns.contains(idx) {
                continue;
            }
            let id = self.conns[idx].id;
            let more = match &mut self.conns[idx].conn {
                Conn::Agent(_) => self.service_agent(idx, now),
                Conn::Admin(_) => self.service_admin(idx, id),
                Conn::Artifact(_) => {
                    self.service_artifact(idx, now);
                    false
                }
                Conn::Relay(_) => self.service_relay(idx),
            };
            if more {
                self.ready.push_back(idx);
            }
            self.touched.push(idx);
        }
    }

    /// Reads and feeds one agent connection. Returns true if the read budget cut it short.
    fn service_agent(&mut self, idx: usize, now: Instant) -> bool {
        if let Some(more) = self.ladder_pre_read(idx, now) {
            return more;
        }
        let http_timeout = self.cfg.http_timeout;
        let slot = &mut self.conns[idx];
        let id = slot.id;
        let Conn::Agent(c) = &mut slot.conn else {
            return false;
        };
        // Before authentication a peer needs a handshake and one small Enrol: read little.
        let budget = if c.authenticated {
            self.cfg.read_budget
        } else {
            self.cfg.read_budget.min(PRE_AUTH_READ_BUDGET)
        };
        let outcome = match c.tls.read(&mut c.plain, budget) {
            Ok(o) => o,
            Err(e) => {
                tracing::info!(conn = id, error = %e, "connection closed: TLS/socket error");
                let _ = c.tls.flush();
                c.closing = true;
                if let Some(dev) = c.device {
                    self.inputs.push(Input::Disconnected {
                        conn: id,
                        device: Some(dev),
                        reason: e.to_string(),
                    });
                }
                return false;
            }
        };
        let mut relay_certified = None;
        if c.session.is_none()
            && c.tls.handshake_done()
            && ladder::inner_ready(c, idx, id, now, http_timeout, &mut self.timers)
        {
            let (device, key_hash) = peer_identity(&c.tls.tls);
            c.key_hash = key_hash;
            if device.is_some() {
                if !self.limits.authenticate(c, id) {
                    c.closing = true;
                    return false;
                }
                relay_certified = c.relay;
            }
            c.session = Some(GatewaySession::new(now, self.cfg.session, device));
        }
        if let Some(s) = c.session.as_mut() {
            if !c.plain.is_empty() {
                if let Err(e) = s.handle_input(now, &c.plain) {
                    tracing::info!(conn = id, error = %e, "session closed: protocol error");
                }
                c.plain.clear();
            }
        }
        if !c.authenticated && c.session.is_some() {
            // The core took its input: nothing buffered before authentication outlives its
            // use (before the session, `plain` holds an Upgrade head, bounded by its limit).
            c.plain = Vec::new();
        }
        if outcome.eof {
            c.closing = true;
        }
        if let Some((ri, rid)) = relay_certified {
            // The long-poll requests of this relay now carry an authenticated session.
            if let Some(Slot {
                id,
                conn: Conn::Relay(r),
            }) = self.conns.get_mut(ri)
            {
                if *id == rid {
                    r.authenticated = true;
                }
            }
        }
        self.drain_session(idx, now);
        outcome.wire_bytes >= budget
    }

    /// Drains one session core in its documented order.
    fn drain_session(&mut self, idx: usize, now: Instant) {
        let slot = &mut self.conns[idx];
        let id = slot.id;
        let Conn::Agent(c) = &mut slot.conn else {
            return;
        };
        let Some(s) = c.session.as_mut() else { return };
        transmit(s, &mut c.tls, &mut c.out, &mut c.closing, id, now);
        let mut refused = false;
        while let Some(ev) = s.poll_event() {
            if matches!(ev, GatewayEvent::Enrol(_)) && !self.limits.enrol.try_take(c.peer, now) {
                if let Some(left_out) = self.limits.enrol_log.due(now) {
                    tracing::warn!(conn = id, peer = %c.peer, left_out, "enrolment refused: too many failed enrolments from this address (rate limit)");
                }
                let _ = s.close(
                    fleetcast_wire::CloseCode::OVERLOADED,
                    "too many failed enrolments from this address: retry later",
                );
                refused = true;
                continue;
            }
            let dist = self.dist.as_mut();
            if let Some(input) =
                event_to_input(id, c.key_hash, &mut c.device, ev, self.wall_ms, dist)
            {
                self.inputs.push(input);
            }
        }
        if refused {
            // The Close frame.
            transmit(s, &mut c.tls, &mut c.out, &mut c.closing, id, now);
        }
        if s.is_closed() {
            c.closing = true;
        }
        if let Some(t) = s.poll_timeout() {
            self.timers.push(Reverse((t, idx, id)));
        }
        self.touched.push(idx);
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, idx, id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
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
                        self.touched.push(idx);
                    }
                }
            }
        }
    }

    fn lookup(&self, id: ConnId) -> Option<usize> {
        let idx = (id & 0xffff_ffff) as usize;
        self.conns.get(idx).filter(|s| s.id == id).map(|_| idx)
    }

    fn apply(&mut self, action: Action, now: Instant) {
        match &action {
            Action::TaskCreated {
                conn,
                task,
                targets,
            } => {
                if let Some(d) = self.dist.as_mut() {
                    d.task_created(*conn, *task, targets, now);
                }
                return;
            }
            Action::TransferDone {
                device,
                task,
                verified,
                ..
            } => {
                if let Some(d) = self.dist.as_mut() {
                    d.transfer_done(*task, *device, *verified);
                }
                return;
            }
            Action::Dispatch { .. } => self.counters.dispatched += 1,
            // Only failed enrolments count against their source.
            Action::Enrolled { conn, .. } => {
                if let Some(Slot {
                    conn: Conn::Agent(c),
                    ..
                }) = self.lookup(*conn).and_then(|i| self.conns.get(i))
                {
                    self.limits.enrol.refund(c.peer);
                }
            }
            Action::Reply { conn, resp } if !resp.ok => {
                // A push the fleet refused: its mapping is not needed.
                if let Some(d) = self.dist.as_mut() {
                    d.drop_prepared(*conn);
                }
            }
            _ => {}
        }
        let conn_id = action.conn();
        // The announce is built before the session is borrowed (it may re-create a sender
        // from the task table).
        let announce = match &action {
            Action::Announce { device, task, .. } => {
                // The device's repairs are bound to the address of the session the announce
                // goes over (its NACK key travels in it).
                let peer = match self.lookup(conn_id).map(|i| &self.conns[i].conn) {
                    Some(Conn::Agent(c)) => c.tls.sock.peer_addr().ok().map(|a| a.ip()),
                    _ => None,
                };
                let Some(d) = self.dist.as_mut() else {
                    tracing::warn!(
                        task = task.0,
                        "task not announced: multicast is off (--mcast-addr)"
                    );
                    return;
                };
                let (fleet, task_id) = (&self.fleet, *task);
                let row = || {
                    fleet.call(move |f| {
                        let snap = f.store().snapshot().ok()?;
                        snap.task(task_id).ok()?
                    })
                };
                match d.announce_for(*task, *device, peer, row, now) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        tracing::warn!(task = task.0, device = device.0, error = %e, "task not announced");
                        return;
                    }
                }
            }
            _ => None,
        };
        let Some(idx) = self.lookup(conn_id) else {
            return;
        };
        match (&mut self.conns[idx].conn, action) {
            (Conn::Admin(a), Action::Reply { resp, .. }) => {
                push_json_line(&mut a.out, &resp);
                self.touched.push(idx);
                return;
            }
            (Conn::Agent(c), action) => {
                let Some(s) = c.session.as_mut() else { return };
                let r = match action {
                    Action::Welcome {
                        welcome, resume, ..
                    } => s.accept(&welcome).and_then(|()| match resume {
                        Some((seq, attempt, command_id, reboot)) => {
                            s.resume_in_flight(seq, attempt, command_id, reboot)
                        }
                        None => Ok(()),
                    }),
                    Action::Enrolled { device, cert, .. } => s.send_enrolled(&Enrolled {
                        device_id: device.0,
                        certificate: Cow::Borrowed(&cert),
                    }),
                    Action::Ack { seq, .. } => s.ack_result(seq),
                    Action::Dispatch {
                        command_id,
                        seq,
                        attempt,
                        cmd,
                        ..
                    } => {
                        let base = self
                            .cfg
                            .artifacts
                            .as_ref()
                            .and_then(|a| a.base_url.as_deref());
                        let urls: Vec<String> = cmd
                            .steps
                            .iter()
                            .map(|st| match st {
                                fleetcast_store::Step::Fetch { url, .. } => {
                                    artifacts::resolve_url(url, base)
                                }
                                _ => String::new(),
                            })
                            .collect();
                        let mut steps = steps_to_wire(&cmd);
                        for (st, u) in steps.iter_mut().zip(&urls) {
                            if let fleetcast_wire::Step::Fetch { url, .. } = st {
                                *url = u.into();
                            }
                        }
                        let timeout_ms = u32::try_from(cmd.timeout_ms).unwrap_or(u32::MAX);
                        s.dispatch(&Dispatch {
                            command_id,
                            seq,
                            attempt,
                            timeout_ms,
                            steps,
                        })
                    }
                    Action::Close { code, reason, .. } => s.close(code, &reason),
                    Action::Announce { .. } => match &announce {
                        Some(a) => s.announce(&a.as_wire()),
                        None => Ok(()),
                    },
                    Action::Reply { .. }
                    | Action::TaskCreated { .. }
                    | Action::TransferDone { .. } => Ok(()),
                };
                if let Err(e) = r {
                    tracing::warn!(conn = conn_id, error = %e, "session refused a fleet action");
                }
            }
            (Conn::Admin(_), _) | (Conn::Artifact(_), _) | (Conn::Relay(_), _) => return,
        }
        self.drain_session(idx, now);
    }

    fn flush_touched(&mut self) {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        for idx in touched.drain(..) {
            let Some(slot) = self.conns.get_mut(idx) else {
                continue;
            };
            let token = Token(idx + FIRST_CONN);
            let done = match &mut slot.conn {
                Conn::Agent(c) if matches!(c.sniff, ladder::Sniffing::Plain(_)) => {
                    ladder::flush_plain(c, self.poll.registry(), token)
                }
                Conn::Relay(r) => {
                    let pending = ladder::flush_relay(r);
                    arm_writable(
                        self.poll.registry(),
                        &mut r.sock,
                        token,
                        pending,
                        &mut r.writable_armed,
                    );
                    ladder::relay_done(r)
                }
                Conn::Agent(c) => {
                    if let Err(e) = c.tls.flush() {
                        tracing::debug!(error = %e, "write failed");
                        c.closing = true;
                    }
                    if c.closing && c.tls.wants_write() && !c.tls.tls.is_handshaking() {
                        // Give a final Close frame a chance: it is already in rustls's buffer.
                        let _ = c.tls.flush();
                    }
                    let pending = c.tls.wants_write();
                    if !c.closing {
                        arm_writable(
                            self.poll.registry(),
                            &mut c.tls.sock,
                            token,
                            pending,
                            &mut c.writable_armed,
                        );
                    }
                    if !pending {
                        c.plain.shrink_to_fit();
                    }
                    c.closing
                }
                Conn::Admin(a) => {
                    while !a.out.is_empty() {
                        match a.sock.write(&a.out) {
                            Ok(0) => break,
                            Ok(n) => {
                                a.out.drain(..n);
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => {
                                a.closing = true;
                                break;
                            }
                        }
                    }
                    let pending = !a.out.is_empty();
                    arm_writable(
                        self.poll.registry(),
                        &mut a.sock,
                        token,
                        pending,
                        &mut a.writable_armed,
                    );
                    a.closing && !pending
                }
                Conn::Artifact(a) => {
                    let pending = artifact_write(a);
                    arm_writable(
                        self.poll.registry(),
                        &mut a.sock,
                        token,
                        pending,
                        &mut a.writable_armed,
                    );
                    a.closing || (a.responding && !pending)
                }
            };
            if done {
                self.remove_conn(idx);
            }
        }
        self.touched = touched;
    }

    /// Removes connection `idx` (flushing what TLS can still send) and tells the fleet when
    /// it carried a device's session.
    fn remove_conn(&mut self, idx: usize) {
        let Some(slot) = self.conns.try_remove(idx) else {
            return;
        };
        self.limits.counts.remove(Class::of(&slot.conn));
        match slot.conn {
            Conn::Agent(mut c) => {
                if !matches!(c.sniff, ladder::Sniffing::Plain(_)) {
                    c.tls.tls.send_close_notify();
                    let _ = c.tls.flush();
                }
                ladder::discard_input(&mut c.tls.sock);
                let _ = self.poll.registry().deregister(&mut c.tls.sock);
                if let Some(dev) = c.device {
                    self.inputs.push(Input::Disconnected {
                        conn: slot.id,
                        device: Some(dev),
                        reason: "connection closed".into(),
                    });
                }
            }
            Conn::Admin(mut a) => {
                let _ = self.poll.registry().deregister(&mut a.sock);
            }
            Conn::Artifact(mut a) => {
                let _ = self.poll.registry().deregister(&mut a.sock);
            }
            Conn::Relay(mut r) => {
                let _ = self.poll.registry().deregister(&mut r.sock);
                self.relays.forget(&r);
            }
        }
    }
}

/// A non-blocking agent listener with `SO_REUSEADDR` and the configured backlog.
fn bind_listener(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    sock.set_nonblocking(true)?;
    Ok(TcpListener::from_std(sock.into()))
}

/// Asks for `WRITABLE` readiness exactly while bytes are pending (re-registering only when
/// that changes).
fn arm_writable(
    registry: &mio::Registry,
    sock: &mut impl mio::event::Source,
    token: Token,
    pending: bool,
    armed: &mut bool,
) {
    if pending == *armed {
        return;
    }
    let interest = if pending {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    let _ = registry.reregister(sock, token, interest);
    *armed = pending;
}

/// Moves what a session core has to send into its TLS connection.
fn transmit(
    s: &mut GatewaySession,
    tls: &mut TlsConn,
    out: &mut Vec<u8>,
    closing: &mut bool,
    id: ConnId,
    now: Instant,
) {
    while s.poll_transmit(now, out).is_some() {}
    if !out.is_empty() {
        if let Err(e) = tls.write_plain(out) {
            tracing::warn!(conn = id, error = %e, "TLS write failed");
            *closing = true;
        }
        out.clear();
        out.shrink_to(256);
    }
}

fn push_json_line(out: &mut Vec<u8>, resp: &Response) {
    if serde_json::to_writer(&mut *out, resp).is_err() {
        out.extend_from_slice(b"{\"ok\":false,\"error\":\"unencodable answer\"}");
    }
    out.push(b'\n');
}

/// The device id and key hash of an authenticated client, if it presented a certificate.
fn peer_identity(tls: &rustls::ServerConnection) -> (Option<u64>, [u8; 32]) {
    let Some(cert) = tls.peer_certificates().and_then(|c| c.first()) else {
        return (None, [0; 32]);
    };
    let Some(id) = crate::pki::device_identity(cert) else {
        return (None, [0; 32]);
    };
    let key_hash = webpki::EndEntityCert::try_from(cert)
        .map(|ee| sha256(ee.subject_public_key_info().as_ref()))
        .unwrap_or([0; 32]);
    (Some(id.id), key_hash)
}

/// Turns a session event into fleet input (or handles it here when the fleet has no part).
fn event_to_input(
    conn: ConnId,
    key_hash: [u8; 32],
    device: &mut Option<DeviceId>,
    ev: GatewayEvent,
    wall_ms: u64,
    dist: Option<&mut Distributor>,
) -> Option<Input> {
    match ev {
        GatewayEvent::Hello {
            device_id, frame, ..
        } => {
            *device = Some(DeviceId(device_id));
            let Message::Hello(h) = frame.message() else {
                return None;
            };
            let last = h.last.map(|l| LastSeen {
                seq: l.seq,
                attempt: l.attempt,
                executing: l.executing,
                report: l
                    .result
                    .as_ref()
                    .and_then(|r| r.report.as_ref())
                    .map(report_from_wire),
                result: l.result.map(|r| result_from_wire(&r, wall_ms)),
            });
            Some(Input::Hello {
                conn,
                device: DeviceId(device_id),
                key_hash,
                boot_id: h.boot_id,
                last,
                transport: ladder::rung_of(&h.agent_version),
            })
        }
        GatewayEvent::Enrol(frame) => {
            let Message::Enrol(e) = frame.message() else {
                return None;
            };
            Some(Input::Enrol {
                conn,
                token: e.token.to_vec(),
                name: e.name.to_string(),
                spki: e.spki.to_vec(),
            })
        }
        GatewayEvent::Result { seq, frame, .. } => {
            let Message::Result(r) = frame.message() else {
                return None;
            };
            Some(Input::Result {
                conn,
                device: (*device)?,
                seq,
                attempt: r.attempt,
                result: result_from_wire(&r, wall_ms),
                report: r.report.as_ref().map(report_from_wire),
            })
        }
        GatewayEvent::DuplicateResult { .. } => None,
        GatewayEvent::Report(frame) => {
            let Message::Report(r) = frame.message() else {
                return None;
            };
            Some(Input::Report {
                conn,
                device: (*device)?,
                report: report_from_wire(&r),
            })
        }
        GatewayEvent::RebootStarting(rs) => Some(Input::RebootStarting {
            conn,
            device: (*device)?,
            seq: rs.seq,
            boot_id: rs.boot_id,
        }),
        GatewayEvent::RebootComplete { seq, frame, .. } => {
            let Message::RebootComplete(rc) = frame.message() else {
                return None;
            };
            Some(Input::RebootComplete {
                conn,
                device: (*device)?,
                seq,
                attempt: rc.result.attempt,
                report: report_from_wire(&rc.report),
                result: result_from_wire(&rc.result, wall_ms),
            })
        }
        GatewayEvent::Completion(frame) => {
            let Message::Completion(c) = frame.message() else {
                return None;
            };
            let verified = c.outcome == fleetcast_wire::Outcome::Verified;
            Some(Input::Completion {
                conn,
                device: (*device)?,
                task: c.task_id,
                verified,
                reason: if verified {
                    String::new()
                } else {
                    format!("{}: {}", c.outcome, c.reason)
                },
            })
        }
        GatewayEvent::TransferStatus(st) => {
            // A device's first status (sent as it joins) makes it count as ready.
            if let (Some(d), Some(dev)) = (dist, *device) {
                d.receiver_ready(st.task_id, dev.0);
            }
            Some(Input::TransferProgress {
                conn,
                device: (*device)?,
                task: st.task_id,
                received: st.received,
                total: st.total,
            })
        }
        GatewayEvent::Nack(_) => {
            tracing::debug!(
                conn,
                "NACK over the control session ignored (NACKs use UDP)"
            );
            None
        }
        GatewayEvent::Closed(info) => {
            let code = info
                .code
                .name()
                .map_or_else(|| info.code.0.to_string(), String::from);
            tracing::info!(conn, %code, reason = %info.reason, by_peer = info.by_peer, "session closed");
            device.map(|d| Input::Disconnected {
                conn,
                device: Some(d),
                reason: info.reason,
            })
        }
    }
}
