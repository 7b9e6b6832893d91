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
//!
//! # Layout
//! This file holds the struct, `bind` and the iteration; the siblings hold one concern each:
//! `agents` (agent connections and their session cores), `admin_conn`, `artifact_conn`,
//! `ladder` (the transport ladder's HTTP rungs and long-poll relays), `actions` (applying the
//! fleet's actions), `push` (routing pushes: the fleet's `PreparePush` to the distributor,
//! digests back to the fleet; the watched directory; driving distributions), `clock`
//! (the clock, the poll timeout, connection timers), `flush` (writing and removing
//! connections), `local` (metrics and backup), `limits` (connection caps), `store_thread`
//! and `config`. Tokens are [`crate::token::Tok`].
//!
//! Every admin request is the fleet's (push included: it validates, asks for the file to be
//! prepared, creates the task, answers) except `metrics` and `backup`, which need the loop's
//! own state (its counters and connections, the store's environment while the loop waits)
//! and are served here (`local`).

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
use fleetcast_wire::{Dispatch, Enrolled, Instant, Message, Step};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};
use rustls::ServerConfig;

use crate::admin::{self, Request, Response};
use crate::artifacts;
use crate::distribution::{DistEvent, Distributor, McastConfig};
use crate::fleet::{Action, ConnId, Fleet, Input, LastSeen, Origin, PushSpec};
use crate::metrics;
use crate::pki::sha256;
use crate::tlsconn::TlsConn;
use crate::token::Tok;
use crate::watch::{DirWatch, WatchConfig};

mod actions;
mod admin_conn;
mod agents;
mod artifact_conn;
mod clock;
mod config;
mod flush;
mod ladder;
mod limits;
mod local;
mod push;
mod store_thread;

use admin_conn::AdminConn;
use agents::AgentConn;
use artifact_conn::{artifact_write, ArtifactConn};
pub use clock::Clock;
pub use config::{ArtifactsConfig, GatewayConfig};

pub use limits::Budget;
use limits::Class;

// The wake-up (`Tok::Wake`) comes from the loop's threads: the store thread committed a
// batch, or a pushed file's digest is ready. mio allows one `Waker` per `Poll`, so both share
// it; a wake-up makes the loop look at both (taking a finished batch or digest is cheap when
// there is none).

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

/// The sockets the loop accepts connections from.
struct Listeners {
    /// Where agents connect.
    agent: TcpListener,
    /// The second agent address, when configured.
    extra: Option<TcpListener>,
    /// The admin socket.
    admin: UnixListener,
    /// The artifact endpoint, when configured.
    artifacts: Option<TcpListener>,
}

/// The metrics endpoint and the loop's counters.
struct Telemetry {
    /// The endpoint (`GET /metrics`), when configured.
    endpoint: Option<metrics::Server>,
    /// What the loop counts (since start).
    counters: metrics::Counters,
}

/// What the loop has to do for its connections: slab indices, each entry checked against
/// the slot when it is taken (a slot may have been freed, or reused by a new connection).
#[derive(Default)]
struct Work {
    /// Connection timers, earliest first: `(deadline, index, id)`; an entry whose id no
    /// longer matches its slot is stale and skipped.
    timers: BinaryHeap<Reverse<(Instant, usize, ConnId)>>,
    /// Connections to read this iteration (`usize::MAX`: accept more agents).
    ready: VecDeque<usize>,
    /// Connections with something to write or to close, flushed at the end of the iteration.
    touched: Vec<usize>,
}

/// Multicast: the distributor, what the loop noticed for it, and the watched directory.
struct Multicast {
    /// The distributor, when multicast is on (`--mcast-addr`).
    dist: Option<Distributor>,
    /// The multicast socket may hold more NACKs than one turn's budget read.
    socket_ready: bool,
    /// A pushed file's digest is ready ([`Distributor::take_hashed`]).
    hashed_ready: bool,
    /// The watched directory, when configured.
    watch: Option<Watched>,
}

/// The watched directory: its configuration, memory, next scan, and how many pushes it has
/// made (each push's [`Origin::Watch`] number).
struct Watched {
    cfg: WatchConfig,
    dir: DirWatch,
    next_scan: Instant,
    pushes: u64,
}

/// The gateway event loop.
pub struct Gateway {
    poll: Poll,
    listeners: Listeners,
    relays: ladder::Relays,
    server_cfg: Arc<ServerConfig>,
    cfg: GatewayConfig,
    /// The fleet, on the store thread (see [`store_thread`]).
    fleet: store_thread::StoreThread,
    /// The distributor, its readiness, the watched directory.
    mcast: Multicast,
    clock: Clock,
    conns: slab::Slab<Slot>,
    generation: u64,
    /// The connections' timers and what is to be read and written.
    work: Work,
    inputs: Vec<Input>,
    /// Wall-clock ms at the last clock read (results and events are stamped with it).
    wall_ms: u64,
    stop: bool,
    /// The metrics endpoint and what the loop counts for it.
    telemetry: Telemetry,
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
    pub fn bind(cfg: GatewayConfig, mut fleet: Fleet) -> io::Result<Gateway> {
        let poll = Poll::new()?;
        let mut listener = bind_listener(cfg.listen, cfg.listen_backlog)?;
        poll.registry()
            .register(&mut listener, Tok::Listener.encode(), Interest::READABLE)?;
        let extra = match cfg.extra_listen {
            Some(addr) => {
                let mut l = bind_listener(addr, cfg.listen_backlog)?;
                poll.registry().register(
                    &mut l,
                    Tok::ExtraListener.encode(),
                    Interest::READABLE,
                )?;
                Some(l)
            }
            None => None,
        };
        let _ = std::fs::remove_file(&cfg.admin_socket);
        let mut admin = UnixListener::bind(&cfg.admin_socket)?;
        std::fs::set_permissions(&cfg.admin_socket, std::fs::Permissions::from_mode(0o600))?;
        poll.registry()
            .register(&mut admin, Tok::Admin.encode(), Interest::READABLE)?;
        let mut cfg = cfg;
        let watch = cfg.watch.clone().map(|cfg| Watched {
            cfg,
            dir: DirWatch::new(),
            next_scan: Instant::ZERO,
            pushes: 0,
        });
        let artifacts = match &mut cfg.artifacts {
            Some(a) => {
                std::fs::create_dir_all(&a.root)?;
                if std::fs::symlink_metadata(&a.root).is_ok_and(|m| m.file_type().is_symlink()) {
                    tracing::warn!(dir = %a.root.display(), "the artifact directory is a symlink: nothing in it is served (mount the other disk there instead)");
                }
                let mut l = bind_listener(a.listen, cfg.listen_backlog)?;
                poll.registry()
                    .register(&mut l, Tok::Artifacts.encode(), Interest::READABLE)?;
                if a.base_url.is_none() {
                    a.base_url = Some(format!("http://{}", l.local_addr()?));
                }
                Some(l)
            }
            None => None,
        };
        let server_cfg = fleet.pki().server_config();
        let waker = Arc::new(mio::Waker::new(poll.registry(), Tok::Wake.encode())?);
        let dist = match &cfg.mcast {
            Some(m) => {
                let mut d = Distributor::open(m.clone())?;
                poll.registry()
                    .register(d.socket(), Tok::Mcast.encode(), Interest::READABLE)?;
                d.set_waker(Arc::clone(&waker));
                Some(d)
            }
            None => None,
        };
        // The fleet refuses pushes exactly when there is no distributor to prepare them.
        fleet.set_multicast(dist.is_some());
        let fleet = store_thread::StoreThread::spawn(fleet, Arc::clone(&waker))?;
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
            telemetry: Telemetry {
                endpoint: metrics,
                counters: metrics::Counters::default(),
            },
            poll,
            listeners: Listeners {
                agent: listener,
                extra,
                admin,
                artifacts,
            },
            relays: ladder::Relays::default(),
            server_cfg,
            cfg,
            fleet,
            mcast: Multicast {
                dist,
                socket_ready: false,
                hashed_ready: false,
                watch,
            },
            clock: Clock::new(),
            conns: slab::Slab::new(),
            generation: 0,
            work: Work::default(),
            inputs: Vec::new(),
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
        self.telemetry
            .endpoint
            .as_ref()
            .and_then(|m| m.local_addr().ok())
    }

    /// The address agents connect to (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listeners.agent.local_addr()
    }

    /// The second agent address, when configured.
    pub fn extra_addr(&self) -> Option<SocketAddr> {
        self.listeners
            .extra
            .as_ref()
            .and_then(|l| l.local_addr().ok())
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
                match Tok::decode(ev.token()) {
                    Tok::Listener | Tok::ExtraListener => self.accept_agents(now),
                    Tok::Admin => self.accept_admin(now),
                    Tok::Artifacts => self.accept_artifacts(now),
                    Tok::Mcast => self.mcast.socket_ready = true,
                    // A finished batch is taken in `process_fleet`, a digest here.
                    Tok::Wake => self.mcast.hashed_ready = true,
                    Tok::MetricsListener | Tok::MetricsConn(_) => {
                        self.metrics_event(ev.token(), now)
                    }
                    Tok::Conn(idx) => {
                        if self.conns.contains(idx) && !self.work.ready.contains(&idx) {
                            self.work.ready.push_back(idx);
                        }
                    }
                }
            }
            self.service_ready(now);
            if std::mem::take(&mut self.mcast.socket_ready) {
                if let Some(d) = self.mcast.dist.as_mut() {
                    self.mcast.socket_ready = d.handle_readable(now);
                }
            }
            self.fire_timers(now);
            if let Some(m) = self.telemetry.endpoint.as_mut() {
                m.expire(self.poll.registry(), now);
            }
            self.scan_watch(now);
            if std::mem::take(&mut self.mcast.hashed_ready) {
                self.take_hashed();
            }
            self.process_fleet(now, wall);
            self.prune(now, wall);
            self.drive_distributions(now);
            self.flush_touched();
        }
        Ok(())
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
                .register(&mut sock, Tok::Conn(idx).encode(), Interest::READABLE)
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
        let n = self.work.ready.len();
        for _ in 0..n {
            let Some(idx) = self.work.ready.pop_front() else {
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
                self.work.ready.push_back(idx);
            }
            self.work.touched.push(idx);
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

fn push_json_line(out: &mut Vec<u8>, resp: &Response) {
    if serde_json::to_writer(&mut *out, resp).is_err() {
        out.extend_from_slice(b"{\"ok\":false,\"error\":\"unencodable answer\"}");
    }
    out.push(b'\n');
}
