//! The agent's driver: dials the gateway, speaks TLS, and drives the sans-IO
//! [`AgentSession`] core, the [`exec`] worker and the durable [`State`].
//!
//! One thread owns the socket and the core; a command runs on the executor's worker thread
//! and survives a dropped connection (its result goes out on the next session). The loop is
//! blocking with a read timeout: an agent has one connection, so a poller buys nothing here.
//!
//! # Exactly once
//! Before a command runs, `State::record_executing` is durable; its result is durable
//! (`record_result`) before it is sent and forgotten only when acknowledged. A reboot is
//! recorded (`record_reboot`) before `RebootStarting` goes out and before the reboot; the
//! record is dropped only once the gateway's `Welcome.acked_seq` covers the reboot command.

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleetcast_wire::ranges::MAX_NACK_RANGES;
use fleetcast_wire::session::{AgentEvent, AgentSession, FirstMessage};
use fleetcast_wire::{
    CloseCode, Completion, Enrol, Hello, Instant, Message, RebootComplete, SessionConfig, TaskAsk,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection};

use crate::exec::{self, ExecConfig, Job, Running};
use crate::gateways::{Gateways, Next, REDIRECT_PAUSE_MS};
use crate::ladder::{self, Deadline, LadderError, Memory, Pipe, Rung, Target};
use crate::report::{self, AGENT_VERSION};
use crate::state::{Identity, RebootRecord, State};
use crate::tls::{self, DeviceKey};
use crate::transfer::{Transfer, TransferDone, TransferSpec};

/// Transfer progress goes to the gateway 1 s after a transfer starts, then after twice the
/// previous wait, up to `PROGRESS_MAX`: the task table shows `in_progress` within a second,
/// and a long transfer's reports stop costing feedback (issue 17: at 16 receivers and 1% loss
/// a 64 MiB push took 8 s, so one report a second, a ~120-byte TCP segment each, came to
/// about 16 KB of the 160 KB the receivers sent; estimated, not measured apart).
const PROGRESS_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two progress reports.
const PROGRESS_MAX: Duration = Duration::from_secs(8);

/// How the agent trusts the gateway before it has a CA certificate stored.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// A CA certificate file (PEM).
    File(PathBuf),
    /// The CA certificate's SHA-256 fingerprint; the CA itself is learnt from the handshake.
    Fingerprint([u8; 32]),
    /// Only what enrolment stored in the state directory.
    Stored,
}

/// What a `reboot` step does.
#[derive(Debug, Clone)]
pub enum RebootAction {
    /// Run this program (e.g. `systemctl reboot`) and wait to be killed by the reboot.
    Command(Vec<String>),
    /// Exit the agent process with this code (the lab and tests restart it with a new boot
    /// id, which is what a reboot looks like from the gateway).
    Exit(i32),
}

/// Agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Gateway address (`host:port`), or several of one cell, comma-separated
    /// ([`crate::gateways`]).
    pub gateway: String,
    /// Name in the gateway's certificate (`None`: the host part of the gateway tried).
    pub server_name: Option<String>,
    /// State directory.
    pub state_dir: PathBuf,
    /// Where pushed files land (and their progress records).
    pub downloads: PathBuf,
    /// Trust anchor before enrolment.
    pub ca: CaSource,
    /// One-time enrolment token and the device name it was issued for.
    pub enrol: Option<(String, String)>,
    /// Executor settings (report sources, fetch limits).
    pub exec: ExecConfig,
    /// What `reboot` does.
    pub reboot: RebootAction,
    /// The transport ladder.
    pub ladder: LadderConfig,
    /// Longest back-off between reconnects.
    pub max_backoff: Duration,
    /// Stop after this many sessions (tests); `None`: forever.
    pub max_sessions: Option<u32>,
    /// The A/B slots (`--slots`, checked at start), for `slot=` push targets and updates.
    pub slots: Option<crate::slots::SlotConfig>,
}

/// How the agent climbs the transport ladder ([`crate::ladder`]).
#[derive(Debug, Clone)]
pub struct LadderConfig {
    /// The rungs allowed (tried best first, the remembered winner before them).
    pub rungs: Vec<Rung>,
    /// The alternative port (443 rung, Upgrade, CONNECT target, long-poll).
    pub alt_port: u16,
    /// HTTP proxy for the CONNECT and long-poll rungs.
    pub proxy: Option<ladder::Proxy>,
    /// Time a rung has to open its carrier (TCP, proxy, TLS, Upgrade), and again for the
    /// gateway's `Welcome`.
    pub rung_timeout: Duration,
    /// Delay between starting one rung and the next (they overlap).
    pub stagger: Duration,
    /// While on a rung worse than the best allowed one, retry the better ones this often.
    pub upgrade_after: Duration,
}

impl Default for LadderConfig {
    fn default() -> Self {
        LadderConfig {
            rungs: ladder::LADDER.to_vec(),
            alt_port: 443,
            proxy: None,
            rung_timeout: Duration::from_secs(4),
            stagger: Duration::from_millis(250),
            upgrade_after: Duration::from_secs(600),
        }
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A state-directory problem.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// A TLS/key problem.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Not enrolled and no token given.
    #[error("this device is not enrolled: run with --token TOKEN --name NAME (from `fleetcast device add NAME`)")]
    NotEnrolled,
    /// The gateway refused us for good (revoked, unknown, unauthenticated).
    #[error("the gateway refused this device: {}: {reason}", .code.name().unwrap_or("?"))]
    Refused {
        /// The gateway's close code.
        code: CloseCode,
        /// The gateway's reason.
        reason: String,
    },
    /// The gateway refused the enrolment for another reason than the token: final.
    #[error("the gateway refused this device: enrolment refused ({}): {reason}", .code.name().unwrap_or("?"))]
    EnrolRefused {
        /// The gateway's close code.
        code: CloseCode,
        /// The gateway's reason.
        reason: String,
    },
    /// The gateway's chain holds no CA with the fingerprint the agent was given.
    #[error("the gateway refused this device: gateway sent no CA matching the fingerprint")]
    NoPinnedCa,
    /// The gateway refused the enrolment token (unknown, used or expired): final.
    #[error("the gateway refused the enrolment token for {name:?}: {reason}. A token works once and expires: ask for a new one (`fleetcast device add`)")]
    BadToken {
        /// The device name the token was given for.
        name: String,
        /// The gateway's reason.
        reason: String,
    },
    /// No rung carried a session; the most telling cause (retried after a back-off).
    #[error(transparent)]
    Connect(#[from] ladder::ClimbError),
    /// The boot id could not be read.
    #[error(transparent)]
    Report(#[from] crate::report::ReportError),
    /// A rung's carrier, TLS or round trip failed (the next rung may do better).
    #[error(transparent)]
    Link(#[from] LadderError),
    /// I/O outside a session.
    #[error("io: {0}")]
    Io(#[from] io::Error),
}

impl AgentError {
    /// The failure of the current rung, when that is what this is (else the error itself):
    /// the climb goes on to the next rung.
    fn rung_failure(self) -> Result<LadderError, AgentError> {
        match self {
            AgentError::Io(e) => Ok(e.into()),
            AgentError::Link(e) => Ok(e),
            e => Err(e),
        }
    }
}

/// How a session ended.
enum End {
    /// Reconnect (after back-off unless `immediately`).
    Reconnect { immediately: bool },
    /// Another gateway of the cell owns the device: the next session goes to this address.
    Redirect(String),
    /// The gateway cannot serve now (`overloaded`, `internal`: its store or its cell lease is
    /// gone): in a cell, the next gateway at once, as when it cannot be reached; alone, the
    /// back-off.
    Unavailable,
    /// The reboot action says: leave the process.
    Exit(i32),
}

/// A pseudo-random number of milliseconds below `range` from the clock's nanoseconds: a
/// fleet's agents do not retry in lockstep.
fn jitter_ms(epoch: &std::time::Instant, range: u64) -> u64 {
    u64::from(epoch.elapsed().subsec_nanos()) % range.max(1)
}

/// The agent.
pub struct Agent {
    cfg: AgentConfig,
    state: State,
    running: Option<(Running, bool, u64)>,
    epoch: std::time::Instant,
    /// Multicast downloads in progress, by task.
    transfers: std::collections::HashMap<u64, Transfer>,
    /// Finished downloads, by task: their completion is repeated if the task is announced
    /// again (the gateway serves an asked task until it has recorded the completion).
    finished: std::collections::HashMap<u64, TransferDone>,
    /// This session's device id, local and gateway addresses (for transfers).
    link: Option<(u64, std::net::IpAddr, SocketAddr)>,
    /// When transfer progress was last reported (for the gateway's task table).
    progress_sent: Instant,
    /// The wait before the next progress report: see `PROGRESS_FIRST`.
    progress_every: Duration,
    /// Where the rungs go.
    target: Target,
    /// The gateways the agent knows; `target` is the one tried now.
    gateways: Gateways,
    /// The rung carrying the current session, and the network it was chosen on.
    rung: Option<(Rung, String)>,
    /// Until `Welcome`, the current rung's deadline (the rung has not won yet).
    probe: Option<Deadline>,
    /// When this climb started (connect time is measured from here).
    climb_start: Duration,
    /// Next time to retry better rungs (`None`: on the best one).
    upgrade_at: Option<Instant>,
    /// The next climb ignores the remembered rung (retrying better ones).
    climb_from_top: bool,
    /// The rung enrolment went through (tried first by the session that follows).
    hint: Option<Rung>,
    /// The carriers of the current climb (dropped, closing the losers, once a rung wins).
    racing: Option<Race>,
    /// The session's TLS configuration (for background retries of better rungs).
    client_config: Option<Arc<ClientConfig>>,
    /// A background retry of better rungs in progress.
    upgrade_probe: Option<Race>,
    /// A better rung opened: end the session when idle and climb from the top.
    better_found: bool,
    /// The session since the last back-off reached `Welcome` (the back-off starts over).
    welcomed: bool,
    /// A configuration report is to go out after the next `Welcome` (set when the agent
    /// starts, so also right after enrolment; a reboot completion carries one instead).
    report_due: bool,
    /// What the session's `Welcome` said is pending, counted down as it arrives.
    pending: Pending,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("state_dir", &self.cfg.state_dir)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Opens the state directory.
    #[allow(clippy::disallowed_methods)] // The agent driver's clock epoch.
    pub fn new(cfg: AgentConfig) -> Result<Agent, AgentError> {
        let state = State::open(&cfg.state_dir)?;
        let mut gateways =
            Gateways::parse(&cfg.gateway, cfg.ladder.alt_port, cfg.ladder.proxy.clone())?;
        if let Ok(Some(id)) = state.load_identity() {
            gateways.prefer(id.device_id);
        }
        let target = gateways.target();
        ladder::epoch(); // Starts the epoch connect times are measured from.
        Ok(Agent {
            cfg,
            state,
            running: None,
            epoch: std::time::Instant::now(),
            transfers: std::collections::HashMap::new(),
            finished: std::collections::HashMap::new(),
            link: None,
            progress_sent: Instant::ZERO,
            progress_every: PROGRESS_FIRST,
            target,
            gateways,
            rung: None,
            probe: None,
            climb_start: Duration::ZERO,
            upgrade_at: None,
            climb_from_top: false,
            hint: None,
            racing: None,
            client_config: None,
            upgrade_probe: None,
            better_found: false,
            welcomed: false,
            report_due: true,
            pending: Pending::default(),
        })
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as u64)
    }

    /// Runs until the reboot action exits, the gateway refuses the device, or
    /// `max_sessions` is reached. Returns the process exit code.
    pub fn run(&mut self) -> Result<i32, AgentError> {
        const FIRST_BACKOFF: Duration = Duration::from_millis(200);
        let mut backoff = FIRST_BACKOFF;
        let mut sessions = 0u32;
        loop {
            if self.cfg.max_sessions.is_some_and(|m| sessions >= m) {
                return Ok(0);
            }
            sessions += 1;
            let end = match self.state.load_identity()? {
                None => self.enrol(),
                Some(id) => self.session(&id),
            };
            let failed = match end {
                Ok(End::Exit(code)) => return Ok(code),
                Ok(End::Reconnect { immediately: true }) => {
                    backoff = FIRST_BACKOFF;
                    self.welcomed = false;
                    // Enrolled: from now on the device's own order of gateways.
                    if let Ok(Some(id)) = self.state.load_identity() {
                        self.gateways.prefer(id.device_id);
                        self.target = self.gateways.target();
                    }
                    continue;
                }
                Ok(End::Redirect(addr)) => {
                    if self.gateways.redirect(&addr) {
                        crate::say!("this device is served by gateway {addr}: going there");
                        self.target = self.gateways.target();
                        continue;
                    }
                    crate::say!("redirect to `{addr}` not followed: backing off");
                    false
                }
                Ok(End::Reconnect { immediately: false }) => false,
                Ok(End::Unavailable) => true,
                Err(AgentError::Io(e)) => {
                    crate::say!("connection failed: {e}");
                    true
                }
                Err(AgentError::Link(e)) => {
                    crate::say!("connection failed: {e}");
                    true
                }
                Err(AgentError::Connect(e)) => {
                    crate::say!("connection failed: {e}");
                    true
                }
                Err(e) => return Err(e),
            };
            if failed && self.gateways.several() {
                let next = self.gateways.failed();
                self.target = self.gateways.target();
                let (host, port) = (&self.target.host, self.target.port);
                match next {
                    Next::Now => {
                        crate::say!("trying gateway {host}:{port}");
                        continue;
                    }
                    Next::Pause => {
                        let ms = REDIRECT_PAUSE_MS / 2 + jitter_ms(&self.epoch, REDIRECT_PAUSE_MS);
                        crate::say!("back to gateway {host}:{port} in {ms} ms");
                        std::thread::sleep(Duration::from_millis(ms));
                        continue;
                    }
                    Next::BackOff => {}
                }
            }
            // A session that reached `Welcome` was a good one: whatever ended it (a proxy
            // that cuts tunnels every 30 s), the back-off starts over instead of growing
            // across good sessions.
            if std::mem::take(&mut self.welcomed) {
                backoff = FIRST_BACKOFF;
            }
            // Jittered exponential back-off, so a fleet does not reconnect in lockstep.
            let jitter = (self.epoch.elapsed().subsec_nanos() as u64 % 1000) as f64 / 1000.0;
            let pause = backoff.mul_f64(0.5 + jitter);
            crate::say!("reconnecting in {} ms", pause.as_millis());
            std::thread::sleep(pause);
            backoff = (backoff * 2).min(self.cfg.max_backoff);
        }
    }

    /// The rungs to try on this network, the remembered winner first.
    fn climb_order(&mut self) -> (Vec<Rung>, String) {
        let network = self.target.network_key();
        let remembered = if std::mem::take(&mut self.climb_from_top) {
            None
        } else {
            Memory::new(&self.cfg.state_dir)
                .get(&network)
                .or(self.hint.take())
        };
        let mut order = ladder::order(&self.cfg.ladder.rungs, remembered);
        if self.target.proxy.is_none() {
            order.retain(|r| *r != Rung::Connect); // Nothing to tunnel through.
        }
        (order, network)
    }

    /// Starts opening every rung of `order`, the i-th after `i × stagger` (a blocked rung
    /// costs the others no more than the stagger); carriers arrive in the order they are
    /// ready. Each attempt is bounded by the rung timeout, so the race always ends.
    fn race(&self, order: &[Rung], config: &Arc<ClientConfig>) -> Race {
        let (tx, rx) = std::sync::mpsc::channel();
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for (i, &rung) in order.iter().enumerate() {
            let stop = cancelled.clone();
            let txc = tx.clone();
            let target = self.target.clone();
            let name = self
                .cfg
                .server_name
                .clone()
                .unwrap_or_else(|| self.target.host.clone());
            let config = config.clone();
            let delay = self.cfg.ladder.stagger * i as u32;
            let timeout = self.cfg.ladder.rung_timeout;
            let spawned = std::thread::Builder::new()
                .name(format!("rung-{}", rung.name()))
                .spawn(move || {
                    std::thread::sleep(delay);
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = txc.send((rung, Err(LadderError::RaceWon)));
                        return;
                    }
                    let deadline = Deadline::after(ladder::epoch(), timeout);
                    let r = open_rung(rung, &target, name, config, &deadline);
                    let _ = txc.send((rung, r));
                });
            if let Err(e) = spawned {
                let _ = tx.send((rung, Err(LadderError::Io(e))));
            }
        }
        Race {
            rx,
            outstanding: order.len(),
            cancelled,
        }
    }

    fn enrol(&mut self) -> Result<End, AgentError> {
        let Some((token, name)) = self.cfg.enrol.clone() else {
            return Err(AgentError::NotEnrolled);
        };
        let (config, pin) = match &self.cfg.ca {
            CaSource::File(p) => (
                tls::client_config(tls::load_cert_pem(p)?.as_ref(), None)?,
                None,
            ),
            CaSource::Fingerprint(fp) => (tls::client_config_pinned(*fp)?, Some(*fp)),
            CaSource::Stored => (
                tls::client_config(tls::load_cert_pem(&self.state.ca_path())?.as_ref(), None)?,
                None,
            ),
        };
        let key = match DeviceKey::load_pem(&self.state.key_path()) {
            Ok(k) => k,
            Err(_) => {
                let k = DeviceKey::generate()?;
                k.save_pem(&self.state.key_path())?;
                k
            }
        };
        let spki = key.spki_der();
        // The same climb as a session: a rung wins when `Enrol` is answered by `Enrolled`
        // (a refusal sent by the gateway is final; silence or a lost stream tries the next).
        let (order, _) = self.climb_order();
        let mut race = self.race(&order, &config);
        let mut failures = Vec::new();
        let mut won = None;
        while let Some((rung, r)) = race.next() {
            let mut io = match r {
                Ok(io) => io,
                Err(e) => {
                    crate::say!("rung {} failed: {e}", rung.name());
                    failures.push((rung, e));
                    continue;
                }
            };
            let first = FirstMessage::Enrol(Enrol {
                token: token.as_bytes().into(),
                name: Cow::Borrowed(&name),
                spki: Cow::Borrowed(&spki),
            });
            let now = self.now();
            let mut s = AgentSession::new(now, SessionConfig::default(), first)
                .map_err(LadderError::Session)?;
            let mut enrolled = None;
            let mut closed = None;
            self.probe = Some(Deadline::after(
                ladder::epoch(),
                self.cfg.ladder.rung_timeout,
            ));
            let r = self.pump(&mut io, &mut s, |agent, _s, ev| {
                match ev {
                    AgentEvent::Enrolled { device_id, frame } => {
                        agent.probe = None;
                        if let Message::Enrolled(e) = frame.message() {
                            enrolled = Some((device_id, e.certificate.to_vec()));
                        }
                    }
                    AgentEvent::Closed(info) => closed = Some(info),
                    _ => {}
                }
                Ok(None)
            });
            self.probe = None;
            match (enrolled, closed, r) {
                (Some(e), _, _) => {
                    self.hint = Some(rung);
                    won = Some((e, io));
                    break;
                }
                // "Retry later" (a rate limit on this source, a gateway shutting down or out
                // of room) is not a verdict on the token: back off and enrol again.
                (None, Some(c), _) if c.by_peer && retry_later(c.code) => {
                    crate::say!(
                        "enrolment deferred by the gateway ({}): {}",
                        c.code.name().unwrap_or("?"),
                        c.reason
                    );
                    return Ok(End::Reconnect { immediately: false });
                }
                (None, Some(c), _) if c.by_peer => {
                    return Err(match c.code {
                        CloseCode::BAD_TOKEN => AgentError::BadToken {
                            name,
                            reason: c.reason,
                        },
                        code => AgentError::EnrolRefused {
                            code,
                            reason: c.reason,
                        },
                    });
                }
                (None, _, Err(e)) => {
                    let e = e.rung_failure()?;
                    crate::say!("rung {} failed: {e}", rung.name());
                    failures.push((rung, e));
                }
                (None, _, Ok(_)) => {
                    crate::say!("rung {} closed before Enrolled", rung.name());
                    failures.push((rung, LadderError::ClosedBefore("Enrolled")));
                }
            }
        }
        drop(race);
        let Some(((device_id, cert), io)) = won else {
            return Err(ladder::ClimbError::from_failures(failures).into());
        };
        let ca_der: CertificateDer<'static> = match (&self.cfg.ca, pin) {
            (_, Some(fp)) => {
                let chain = io.tls.peer_certificates().unwrap_or(&[]);
                tls::pinned_ca(chain, fp).ok_or(AgentError::NoPinnedCa)?
            }
            (CaSource::File(p), None) => tls::load_cert_pem(p)?,
            _ => tls::load_cert_pem(&self.state.ca_path())?,
        };
        let cert = CertificateDer::from(cert);
        tls::save_cert_pem(&self.state.cert_path(), &cert)?;
        tls::save_cert_pem(&self.state.ca_path(), &ca_der)?;
        let cert_pem = std::fs::read_to_string(self.state.cert_path())?;
        let ca_pem = std::fs::read_to_string(self.state.ca_path())?;
        self.state.save_identity(&Identity {
            device_id,
            cert_pem,
            ca_pem,
        })?;
        crate::say!("enrolled as device {device_id}");
        Ok(End::Reconnect { immediately: true })
    }

    fn session(&mut self, id: &Identity) -> Result<End, AgentError> {
        let key = DeviceKey::load_pem(&self.state.key_path())?;
        let cert = tls::load_cert_pem(&self.state.cert_path())?;
        let ca = tls::load_cert_pem(&self.state.ca_path())?;
        let config = tls::client_config(ca.as_ref(), Some((&cert, &key)))?;
        let boot_id = report::read_boot_id(&self.cfg.exec.report.boot_id)?;
        let fingerprint = tls::cert_fingerprint_sha256(cert.as_ref());
        if let (Some(local), Ok(gw)) = (self.target.local_ip(), self.target.gateway_addr()) {
            self.link = Some((id.device_id, local, gw));
        }
        // Climb: each rung in turn until one carries Hello → Welcome within its timeout.
        self.client_config = Some(config.clone());
        self.upgrade_probe = None;
        self.better_found = false;
        let (order, network) = self.climb_order();
        let names: Vec<&str> = order.iter().map(|r| r.name()).collect();
        crate::say!("trying rungs {}", names.join(","));
        self.climb_start = ladder::epoch().elapsed();
        let mut failures = Vec::new();
        self.racing = Some(self.race(&order, &config));
        let memory = Memory::new(&self.cfg.state_dir);
        while let Some((rung, r)) = self.racing.as_mut().and_then(Race::next) {
            let mut io = match r {
                Ok(io) => io,
                Err(e) => {
                    crate::say!("rung {} failed: {e}", rung.name());
                    failures.push((rung, e));
                    continue;
                }
            };
            if let (Rung::LongPoll, Some(hold)) = (rung, memory.hold(&network)) {
                crate::say!(
                    "long-poll: holding at most {} ms (remembered for this network)",
                    hold.as_millis()
                );
                io.pipe.set_max_hold(hold);
            }
            // The round trip gets its own rung timeout: the carrier may have waited while
            // a better one was tried.
            self.probe = Some(Deadline::after(
                ladder::epoch(),
                self.cfg.ladder.rung_timeout,
            ));
            self.rung = Some((rung, network.clone()));
            let r = self.run_session(id, io, boot_id, &fingerprint);
            let won = self.probe.take().is_none();
            match r {
                // A redirect is the gateway's answer to the Hello: the rung works, and the
                // device is to go elsewhere, not to another rung of this gateway.
                Ok(end)
                    if won || matches!(end, End::Exit(_) | End::Redirect(_) | End::Unavailable) =>
                {
                    return Ok(end)
                }
                Err(e) if won => return Err(e),
                Ok(_) => {
                    crate::say!("rung {} closed before Welcome", rung.name());
                    failures.push((rung, LadderError::ClosedBefore("Welcome")));
                }
                Err(e) => match e.rung_failure() {
                    Ok(e) => {
                        crate::say!("rung {} failed: {e}", rung.name());
                        failures.push((rung, e));
                    }
                    Err(e) => {
                        self.racing = None;
                        return Err(e);
                    }
                },
            }
        }
        self.racing = None;
        Err(ladder::ClimbError::from_failures(failures).into())
    }

    /// One session over an opened rung.
    fn run_session(
        &mut self,
        id: &Identity,
        mut io: Io,
        boot_id: [u8; 16],
        fingerprint: &[u8; 32],
    ) -> Result<End, AgentError> {
        let version = match &self.rung {
            // The rung rides in the version's build metadata (SemVer 2.0 §10), which the
            // gateway shows per device.
            Some((r, _)) => format!("{AGENT_VERSION}+{}", r.name()),
            None => AGENT_VERSION.to_string(),
        };
        let hello_last = self
            .state
            .last_executed()
            .map(|l| (l.seq, l.attempt, l.result.is_some()));
        let now = self.now();
        let mut s = {
            let last = self.state.last_executed();
            let hello = Hello {
                device_id: id.device_id,
                credential: fingerprint.into(),
                agent_version: Cow::Borrowed(&version),
                boot_id,
                last,
            };
            AgentSession::new(now, SessionConfig::default(), FirstMessage::Hello(hello))
                .map_err(LadderError::Session)?
        };
        let end = self.pump(&mut io, &mut s, |agent, s, ev| {
            agent.on_event(s, ev, boot_id, hello_last)
        })?;
        Ok(end.unwrap_or(End::Reconnect { immediately: false }))
    }

    /// Handles one session event; `Some(end)` stops the session.
    fn on_event(
        &mut self,
        s: &mut AgentSession,
        ev: AgentEvent,
        boot_id: [u8; 16],
        hello_last: Option<(u64, u32, bool)>,
    ) -> Result<Option<End>, AgentError> {
        match ev {
            AgentEvent::Welcomed(w) => {
                self.welcomed = true;
                self.gateways.welcomed();
                if self.probe.take().is_some() {
                    self.rung_won();
                }
                self.pending = Pending::welcomed(self.now(), &w);
                if self.pending.is_pending(self.now()) {
                    crate::say!(
                        "pending at the gateway: {} command(s), {} transfer(s)",
                        w.pending_commands,
                        w.pending_transfers
                    );
                }
                self.state.ack(w.acked_seq)?;
                let mut reported = false;
                if let Some(r) = self.state.reboot() {
                    if w.acked_seq >= r.seq {
                        self.state.take_reboot()?;
                    } else if r.old_boot_id != boot_id {
                        let rep = report::collect(&self.cfg.exec.report)?;
                        reported = true;
                        let result = self.state.reboot_result().unwrap_or_else(|| {
                            // Recorded by an agent of version 1, which kept no result.
                            fleetcast_wire::CommandResult {
                                command_id: r.command_id,
                                seq: r.seq,
                                attempt: r.attempt,
                                exit_code: 0,
                                steps: Vec::new(),
                                output: b"fleetcast-agent: the results of the steps before \
                                          the reboot were not recorded (older agent)\n"
                                    .into(),
                                report: None,
                            }
                        });
                        let _ = s.send_reboot_complete(&RebootComplete {
                            seq: r.seq,
                            report: rep,
                            result,
                        });
                    } else {
                        // Same boot: the reboot did not happen. Rebooting again is safe.
                        return Ok(Some(self.do_reboot()));
                    }
                }
                // The gateway learns the device's configuration when the agent starts (so also
                // after enrolment), not only after a reboot or a `report` step. Best effort: a
                // report lost with its session is not repeated before the next start.
                if std::mem::take(&mut self.report_due) && !reported {
                    let rep = report::collect(&self.cfg.exec.report)?;
                    let _ = s.send_report(&rep);
                }
                self.ask_tasks(s);
                // A command from an earlier session still running, or finished while we were
                // between sessions: this session carries its result.
                if let Some((seq, attempt, false)) = hello_last {
                    if let Some((run, reboot, command_id)) = &self.running {
                        if (run.seq(), run.attempt()) == (seq, attempt) {
                            let _ = s.resume_executing(seq, attempt, *command_id, *reboot);
                        }
                    } else if let Some(r) = self.state.pending_result() {
                        if (r.seq, r.attempt) == (seq, attempt)
                            && s.resume_executing(seq, attempt, r.command_id, false)
                                .is_ok()
                        {
                            let _ = s.send_result(r);
                        }
                    }
                }
            }
            AgentEvent::Dispatch {
                seq,
                attempt,
                command_id,
                reboot,
                frame,
            } => {
                self.pending.dispatched();
                // A redelivery of an attempt already run is refused by the session core; the
                // ledger is the durable second line.
                if !self.state.should_run(seq, attempt) || self.running.is_some() {
                    return Ok(None);
                }
                let Message::Dispatch(d) = frame.message() else {
                    return Ok(None);
                };
                let job: Job = d.into_owned();
                self.state
                    .record_executing(seq, attempt, command_id, job.steps.len())?;
                let cfg = ExecConfig {
                    update: self.cfg.slots.clone().map(|slots| exec::UpdateSetup {
                        slots,
                        ledger: self.cfg.state_dir.join(exec::UPDATE_LEDGER),
                    }),
                    ..self.cfg.exec.clone()
                };
                let run = exec::spawn(job, cfg, || {})?;
                self.running = Some((run, reboot, command_id));
            }
            AgentEvent::ResultAcked { seq } => {
                self.state.ack(seq)?;
            }
            AgentEvent::Closed(info) => {
                crate::say!(
                    "session closed by the {} ({}): {}",
                    if info.by_peer { "gateway" } else { "agent" },
                    info.code.name().unwrap_or("?"),
                    info.reason
                );
                match info.code {
                    CloseCode::REVOKED | CloseCode::UNKNOWN_DEVICE | CloseCode::UNAUTHENTICATED => {
                        return Err(AgentError::Refused {
                            code: info.code,
                            reason: info.reason,
                        });
                    }
                    CloseCode::REDIRECT if info.by_peer => {
                        return Ok(Some(End::Redirect(info.reason)));
                    }
                    CloseCode::OVERLOADED | CloseCode::INTERNAL if info.by_peer => {
                        return Ok(Some(End::Unavailable));
                    }
                    _ => {}
                }
                let immediately =
                    info.code == CloseCode::NORMAL && info.reason.contains("replaced");
                return Ok(Some(End::Reconnect { immediately }));
            }
            AgentEvent::Announce(frame) => {
                self.pending.announced();
                if let Message::Announce(a) = frame.message() {
                    self.on_announce(s, &a);
                }
            }
            AgentEvent::TaskAnswer(a) => {
                match a.verdict {
                    fleetcast_wire::TaskVerdict::Completed if a.task_id != 0 => crate::say!(
                        "task {}: completed at the gateway, nothing to do",
                        a.task_id
                    ),
                    fleetcast_wire::TaskVerdict::Closed => crate::say!(
                        "task {}: not served (failed, cancelled or not this device's)",
                        a.task_id
                    ),
                    // Served: its announce came first and the transfer says the rest.
                    _ => return Ok(None),
                }
                self.retire(a.task_id);
            }
            AgentEvent::Enrolled { .. } | AgentEvent::TransferStatus(_) => {}
        }
        Ok(None)
    }

    /// Drops what the agent keeps of `task` once the gateway said nothing more comes for it:
    /// its held record and partial file (unless a transfer of it runs: that one ends on its
    /// own), so the next connect does not ask about it again.
    fn retire(&mut self, task: u64) {
        if task == 0 || self.transfers.contains_key(&task) {
            return;
        }
        match crate::transfer::retire_record(&self.cfg.downloads, task) {
            Ok(0) => {}
            Ok(n) => crate::say!("task {task}: dropped {n} held record(s) and partial file"),
            Err(e) => crate::say!("task {task}: could not drop its held record: {e}"),
        }
    }

    /// The task finisher, after every `Welcome` (so on every connect, and after the agent
    /// rejoined a network): one `TaskAsk` for every transfer record it holds (with the blocks
    /// it names), one for every task it was told of and has no record of yet, then one from
    /// zero for every other task of its own. The gateway answers each from its task table.
    fn ask_tasks(&mut self, s: &mut AgentSession) {
        let Some((device_id, ..)) = self.link else {
            return;
        };
        let mut asked = std::collections::BTreeSet::new();
        for rec in crate::transfer::held_records(&self.cfg.downloads) {
            let blocks = rec.size.div_ceil(u64::from(rec.block_size.max(1)));
            // Over the wire limit, the first ranges: an understatement is safe (the gateway
            // serves what the NACKs name, and they come from the whole record).
            let mut have = fleetcast_wire::Ranges::new();
            for r in rec.received.as_slice().iter().take(MAX_NACK_RANGES) {
                let _ = have.push(r.start, r.len);
            }
            asked.insert(rec.task_id);
            let _ = s.send_task_ask(&TaskAsk {
                device_id,
                task_id: rec.task_id,
                total: u32::try_from(blocks).unwrap_or(u32::MAX),
                have,
            });
        }
        for task in self.transfers.keys().filter(|t| !asked.contains(*t)) {
            let _ = s.send_task_ask(&TaskAsk {
                device_id,
                task_id: *task,
                total: 0,
                have: fleetcast_wire::Ranges::new(),
            });
        }
        let _ = s.send_task_ask(&TaskAsk {
            device_id,
            task_id: 0,
            total: 0,
            have: fleetcast_wire::Ranges::new(),
        });
    }

    /// Starts (or answers) the transfer an announce names.
    fn on_announce(&mut self, s: &mut AgentSession, a: &fleetcast_wire::Announce<'_>) {
        match self.finished.get(&a.task_id) {
            Some(d) if d.outcome == fleetcast_wire::Outcome::Verified => {
                send_completion(s, d);
                return;
            }
            // A failed task announced again: the gateway records no failure twice, so the
            // operator retried it (`task retry`), or the failure never reached the table.
            // Either way it is received again.
            Some(_) => {
                self.finished.remove(&a.task_id);
            }
            None => {}
        }
        if let Some(t) = self.transfers.get(&a.task_id) {
            if t.digests() == a.digests {
                // Already receiving; a new announce (session) brings a new NACK key. A gateway
                // that restarted computes the same root from the same file: the transfer goes
                // on (before version 5 its new data key made it restart from the record).
                t.set_nack_key(a.nack_key);
                return;
            }
            // Another root (the file or its block size changed): restart from the record.
            if let Some(t) = self.transfers.remove(&a.task_id) {
                t.stop();
            }
        }
        let (
            Some((device_id, std::net::IpAddr::V4(local), SocketAddr::V4(gw))),
            std::net::IpAddr::V4(_),
        ) = (self.link, a.group)
        else {
            crate::say!("task {}: only IPv4 multicast is supported", a.task_id);
            return;
        };
        // An image is checked before anything is written; a refusal is the device's final
        // word on the task (the task table shows its reason), not a transfer.
        let host = crate::target::Host::new(&self.cfg.exec.report.root);
        let downloads = &self.cfg.downloads;
        let image = match crate::imaging::plan(a, &host, self.cfg.slots.as_ref(), downloads) {
            None => None,
            Some(Ok(plan)) => Some(plan),
            Some(Err(e)) => {
                crate::say!("task {}: refused: {e}", a.task_id);
                let d = TransferDone {
                    task_id: a.task_id,
                    session: a.session,
                    outcome: fleetcast_wire::Outcome::Refused,
                    sha256: [0; 32],
                    reason: e.to_string(),
                };
                send_completion(s, &d);
                self.finished.insert(a.task_id, d);
                return;
            }
        };
        let spec = TransferSpec {
            announce: a.clone().into_owned(),
            device_id,
            local,
            gateway: std::net::SocketAddrV4::new(*gw.ip(), a.port),
            dir: self.cfg.downloads.clone(),
            image,
        };
        match Transfer::spawn(spec) {
            Ok(t) => {
                crate::say!("receiving task {} ({} bytes)", a.task_id, a.size);
                // Joined: tell the gateway at once (a `min_ready` trigger counts these).
                let _ = s.send_transfer_status(&t.status());
                self.progress_every = PROGRESS_FIRST;
                self.transfers.insert(a.task_id, t);
            }
            Err(e) => {
                let d = TransferDone {
                    task_id: a.task_id,
                    session: a.session,
                    outcome: fleetcast_wire::Outcome::WriteFailed,
                    sha256: [0; 32],
                    reason: format!("cannot start the transfer: {e}"),
                };
                send_completion(s, &d);
            }
        }
    }

    /// Reports finished transfers over the session.
    fn poll_transfers(&mut self, s: &mut AgentSession) {
        let mut ended = Vec::new();
        for (task, t) in &mut self.transfers {
            if let Some(d) = t.try_finish() {
                ended.push((*task, d));
            }
        }
        // Progress of the running ones, so `fleetcast task show` can tell `in_progress` from
        // `pending` (and roughly how far): see `PROGRESS_FIRST`.
        let now = self.now();
        if now - self.progress_sent >= self.progress_every {
            self.progress_sent = now;
            let mut sent = false;
            for (task, t) in &self.transfers {
                let st = t.status();
                if st.received > 0 && !ended.iter().any(|(k, _)| k == task) {
                    let _ = s.send_transfer_status(&st);
                    sent = true;
                }
            }
            if sent {
                self.progress_every = (self.progress_every * 2).min(PROGRESS_MAX);
            }
        }
        for (task, d) in ended {
            self.transfers.remove(&task);
            crate::say!("task {task}: {} {}", d.outcome, d.reason);
            send_completion(s, &d);
            self.finished.insert(task, d);
        }
    }

    /// Checks the executor; sends a finished command's result or starts its reboot.
    fn poll_exec(
        &mut self,
        s: &mut AgentSession,
        boot_id: [u8; 16],
    ) -> Result<Option<End>, AgentError> {
        let Some((run, _, _)) = self.running.as_mut() else {
            return Ok(None);
        };
        let Some(done) = run.try_finish() else {
            return Ok(None);
        };
        self.running = None;
        if done.reboot_at.is_some() {
            let rec = RebootRecord {
                seq: done.result.seq,
                attempt: done.result.attempt,
                command_id: done.result.command_id,
                old_boot_id: boot_id,
            };
            // The steps before the reboot ran: their real results go with the reboot record
            // (durable before anything is sent or rebooted) and reach the gateway in
            // `RebootComplete`, after the reboot.
            self.state.record_reboot(rec, &done.result)?;
            if s.send_reboot_starting(rec.seq).is_err() {
                // Not on a session that knows the command: the reboot is recorded, and the
                // next session reports its completion.
            }
            return Ok(Some(End::Exit(i32::MIN)));
        }
        self.state.record_result(&done.result)?;
        let _ = s.send_result(&done.result);
        if done.reboot_after {
            // A rolled-back update on the new slot: the result is durable (a later Hello
            // carries it if this session loses it) and goes out before the reboot into the
            // default slot.
            crate::say!("rebooting into the default slot after a rollback");
            return Ok(Some(End::Exit(i32::MIN)));
        }
        Ok(None)
    }

    fn do_reboot(&mut self) -> End {
        match &self.cfg.reboot {
            RebootAction::Exit(code) => End::Exit(*code),
            RebootAction::Command(argv) => {
                if let Some((prog, args)) = argv.split_first() {
                    match std::process::Command::new(prog).args(args).status() {
                        Ok(st) => crate::say!("reboot command `{prog}` finished: {st}"),
                        Err(e) => crate::say!("reboot command `{prog}` failed to start: {e}"),
                    }
                }
                // Still alive: wait for the machine to go down, reconnect if it does not.
                std::thread::sleep(Duration::from_secs(60));
                End::Reconnect { immediately: false }
            }
        }
    }

    /// The current rung carried Hello → Welcome: it wins on this network.
    fn rung_won(&mut self) {
        self.racing = None;
        let Some((rung, network)) = self.rung.clone() else {
            return;
        };
        let since_start = ladder::epoch().elapsed();
        let ms = since_start.saturating_sub(self.climb_start).as_millis();
        crate::say!(
            "connected via rung {} in {ms} ms ({} ms since start; network {network})",
            rung.name(),
            since_start.as_millis()
        );
        if let Err(e) = Memory::new(&self.cfg.state_dir).set(&network, rung) {
            crate::say!("cannot remember the rung: {e}");
        }
        let best = self.cfg.ladder.rungs.iter().map(|r| r.rank()).min();
        self.upgrade_at = (best.is_some_and(|b| b < rung.rank()))
            .then(|| self.now() + self.cfg.ladder.upgrade_after);
    }

    /// The long-poll path cut a held request: remember the shorter hold for this network.
    fn remember_hold(&mut self, hold: Duration) {
        let Some((_, network)) = &self.rung else {
            return;
        };
        if let Err(e) = Memory::new(&self.cfg.state_dir).set_hold(network, hold) {
            crate::say!("cannot remember the long-poll hold: {e}");
        }
    }

    /// Retrying better rungs in the background: past the retry time, the rungs better than
    /// the current one are opened (TCP, proxy, TLS) on their own threads while the session
    /// goes on. When one opens, the session ends as soon as nothing is running and the next
    /// climb starts from the top (the full round trip still decides); when none opens, the
    /// retry is scheduled again. Returns whether to end the session now.
    fn poll_upgrade(&mut self) -> bool {
        if let Some(race) = self.upgrade_probe.as_mut() {
            loop {
                match race.try_next() {
                    Ok(Some((rung, Ok(_carrier)))) => {
                        crate::say!("rung {} passes again: moving up", rung.name());
                        self.upgrade_probe = None;
                        self.better_found = true;
                        break;
                    }
                    Ok(Some((_, Err(_)))) => continue,
                    Ok(None) => break,
                    Err(()) => {
                        self.upgrade_probe = None;
                        self.upgrade_at = Some(self.now() + self.cfg.ladder.upgrade_after);
                        break;
                    }
                }
            }
        }
        if self.upgrade_probe.is_none()
            && !self.better_found
            && self.upgrade_at.is_some_and(|t| self.now() >= t)
        {
            self.upgrade_at = None;
            let current = self.rung.as_ref().map_or(0, |(r, _)| r.rank());
            let better: Vec<Rung> = ladder::order(&self.cfg.ladder.rungs, None)
                .into_iter()
                .filter(|r| r.rank() < current)
                .filter(|r| *r != Rung::Connect || self.target.proxy.is_some())
                .collect();
            if let Some(config) = self.client_config.clone() {
                if !better.is_empty() {
                    self.upgrade_probe = Some(self.race(&better, &config));
                }
            }
        }
        let end = self.better_found
            && self.running.is_none()
            && self.transfers.is_empty()
            && self.probe.is_none();
        if end {
            self.better_found = false;
            self.climb_from_top = true;
        }
        end
    }

    /// The I/O loop of one session: TLS bytes ↔ core, events to `on_event`, the executor.
    fn pump(
        &mut self,
        io: &mut Io,
        s: &mut AgentSession,
        mut on_event: impl FnMut(
            &mut Agent,
            &mut AgentSession,
            AgentEvent,
        ) -> Result<Option<End>, AgentError>,
    ) -> Result<Option<End>, AgentError> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let boot_id = report::read_boot_id(&self.cfg.exec.report.boot_id).unwrap_or([0; 16]);
        let mut eof = false;
        loop {
            // 1. Bytes out.
            while s.poll_transmit(self.now(), &mut out).is_some() {}
            if !out.is_empty() {
                io.tls.writer().write_all(&out)?;
                out.clear();
            }
            io.flush()?;
            // 2. Events.
            while let Some(ev) = s.poll_event() {
                if let Some(end) = on_event(self, s, ev)? {
                    while s.poll_transmit(self.now(), &mut out).is_some() {}
                    io.tls.writer().write_all(&out)?;
                    io.flush()?;
                    return Ok(Some(end));
                }
            }
            // 3. Transfers, then the executor (what they produce goes out at the top of the
            //    loop).
            let transferring = self.transfers.len();
            self.poll_transfers(s);
            if self.transfers.len() != transferring {
                continue;
            }
            let was_running = self.running.is_some();
            let exec_end = self.poll_exec(s, boot_id)?;
            if was_running && self.running.is_none() && exec_end.is_none() {
                continue;
            }
            if let Some(End::Exit(i32::MIN)) = exec_end {
                while s.poll_transmit(self.now(), &mut out).is_some() {}
                io.tls.writer().write_all(&out)?;
                io.flush()?;
                return Ok(Some(self.do_reboot()));
            }
            if s.is_closed() || eof {
                if !s.is_closed() {
                    crate::say!("the connection ended without a Close");
                }
                return Ok(None);
            }
            // 4. Flush what handling events produced, then wait for bytes, a timer, or
            //    (while executing) the executor.
            while s.poll_transmit(self.now(), &mut out).is_some() {}
            if !out.is_empty() {
                io.tls.writer().write_all(&out)?;
                out.clear();
                continue;
            }
            io.flush()?;
            let now = self.now();
            let mut wait = s
                .poll_timeout()
                .map_or(Duration::from_secs(60), |t| t - now);
            if self.running.is_some() || !self.transfers.is_empty() {
                wait = wait.min(Duration::from_millis(20));
            }
            // Long-poll: while the Welcome's work is on its way, every request asks for the
            // shortest hold (see `Pending`); a TCP read returns as bytes come anyway.
            if matches!(self.rung, Some((Rung::LongPoll, _))) {
                wait = self.pending.read_wait(now, wait);
                if self.pending.take_relaxed(now) {
                    crate::say!("long-poll: the pending work has come; normal holds again");
                }
            }
            if let Some(d) = &self.probe {
                if d.expired() {
                    return Err(LadderError::NoWelcome.into());
                }
                wait = wait.min(d.remaining());
            }
            if self.poll_upgrade() {
                return Ok(Some(End::Reconnect { immediately: true }));
            }
            if self.upgrade_probe.is_some() || self.better_found {
                wait = wait.min(Duration::from_millis(100));
            } else if let Some(t) = self.upgrade_at {
                wait = wait.min(t - self.now());
            }
            io.pipe
                .set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
            let read = io.tls.read_tls(&mut io.pipe);
            if let Some(hold) = io.pipe.take_learned_hold() {
                self.remember_hold(hold);
            }
            match read {
                Ok(0) => eof = true,
                Ok(_) => {
                    let state = io.tls.process_new_packets().map_err(LadderError::Tls)?;
                    let mut n = state.plaintext_bytes_to_read();
                    while n > 0 {
                        let k = io.tls.reader().read(&mut buf[..n.min(16 * 1024)])?;
                        if k == 0 {
                            break;
                        }
                        let _ = s.handle_input(self.now(), &buf[..k]);
                        n -= k;
                    }
                    // Events of the last bytes are handled before the session ends.
                    eof |= state.peer_has_closed();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => eof = true,
                Err(e) => return Err(e.into()),
            }
            s.handle_timeout(self.now());
        }
    }
}

/// What the last `Welcome` said is pending for this device (`pending_commands`,
/// `pending_transfers`), counted down as the commands (`Dispatch`) and tasks (`Announce`)
/// arrive.
///
/// The agent acts on it on the long-poll rung, where it decides when the next exchange is
/// made and how long the gateway may hold it ([`ladder::Pipe::set_read_timeout`]): while work
/// is pending every request asks for the shortest hold ([`ladder::MIN_WAIT`]), so requests
/// follow each other at once and what the agent answers to the work (a result, a joining
/// transfer's status) never waits behind a held one; when none is (the counts reached zero,
/// or [`Pending::WINDOW`] passed) it relaxes to its normal hold (up to the next heartbeat,
/// at most [`ladder::MAX_WAIT`] or the hold remembered for the network). The window bounds a
/// count that never reaches zero (a command the agent is already running is counted but not
/// dispatched again; a queue paused after the Welcome), so no miscount keeps it polling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Pending {
    commands: u32,
    transfers: u32,
    /// When the Welcome's counts stop counting (`None`: nothing was pending, or the agent
    /// relaxed already).
    until: Option<Instant>,
}

impl Pending {
    /// How long the Welcome's counts are acted on at most.
    pub(crate) const WINDOW: Duration = Duration::from_secs(10);

    /// The counts of the Welcome received at `now`.
    pub(crate) fn welcomed(now: Instant, w: &fleetcast_wire::Welcome) -> Pending {
        let any = w.pending_commands > 0 || w.pending_transfers > 0;
        Pending {
            commands: w.pending_commands,
            transfers: w.pending_transfers,
            until: any.then(|| now + Self::WINDOW),
        }
    }

    /// `true` once, at the first `now` the Welcome's pending work no longer counts (it
    /// arrived, or the window passed); never for a Welcome with nothing pending.
    pub(crate) fn take_relaxed(&mut self, now: Instant) -> bool {
        if self.until.is_some() && !self.is_pending(now) {
            self.until = None;
            return true;
        }
        false
    }

    /// A command arrived.
    pub(crate) fn dispatched(&mut self) {
        self.commands = self.commands.saturating_sub(1);
    }

    /// A task was announced.
    pub(crate) fn announced(&mut self) {
        self.transfers = self.transfers.saturating_sub(1);
    }

    /// Whether work the Welcome announced is still on its way at `now`.
    pub(crate) fn is_pending(&self, now: Instant) -> bool {
        (self.commands > 0 || self.transfers > 0) && self.until.is_some_and(|t| now < t)
    }

    /// The longest the next read may wait at `now`, given the loop's own `normal` wait.
    pub(crate) fn read_wait(&self, now: Instant, normal: Duration) -> Duration {
        if self.is_pending(now) {
            normal.min(ladder::MIN_WAIT)
        } else {
            normal
        }
    }
}

fn send_completion(s: &mut AgentSession, d: &TransferDone) {
    let _ = s.send_completion(&Completion {
        task_id: d.task_id,
        session: d.session,
        outcome: d.outcome,
        sha256: d.sha256,
        reason: Cow::Borrowed(&d.reason),
    });
}

/// One rung's outcome in a [`Race`]: its opened carrier, or why it failed.
type Entrant = (Rung, Result<Io, LadderError>);

/// Carriers of a [`Agent::race`], as they become ready.
struct Race {
    rx: std::sync::mpsc::Receiver<Entrant>,
    outstanding: usize,
    /// Rungs not started yet do not start once the race is dropped (a carrier that opens
    /// anyway is closed when its send fails).
    cancelled: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Race {
    fn drop(&mut self) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Race {
    /// Without waiting: a carrier (or failure), `Ok(None)` when none is ready yet, `Err(())`
    /// once every rung has reported.
    fn try_next(&mut self) -> Result<Option<Entrant>, ()> {
        if self.outstanding == 0 {
            return Err(());
        }
        match self.rx.try_recv() {
            Ok(x) => {
                self.outstanding -= 1;
                Ok(Some(x))
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => Ok(None),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Err(()),
        }
    }

    /// The next carrier (or failure); `None` once every rung has reported.
    fn next(&mut self) -> Option<Entrant> {
        if self.outstanding == 0 {
            return None;
        }
        self.outstanding -= 1;
        self.rx.recv().ok()
    }
}

/// Opens `rung` up to a running TLS session (and the `101` of the Upgrade rung).
fn open_rung(
    rung: Rung,
    target: &Target,
    server_name: String,
    config: Arc<ClientConfig>,
    deadline: &Deadline,
) -> Result<Io, LadderError> {
    let mut pipe = ladder::open(rung, target, deadline)?;
    let name = ServerName::try_from(server_name)?;
    let mut tls = ClientConnection::new(config, name)?;
    ladder::handshake(&mut tls, &mut pipe, deadline)?;
    if rung == Rung::Upgrade {
        ladder::http_upgrade(&mut tls, &mut pipe, &target.host, deadline)?;
    }
    Ok(Io { pipe, tls })
}

struct Io {
    pipe: Pipe,
    tls: ClientConnection,
}

impl Io {
    fn flush(&mut self) -> Result<(), LadderError> {
        const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
        self.pipe.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let deadline = Deadline::after(ladder::epoch(), WRITE_TIMEOUT);
        while self.tls.wants_write() {
            ladder::retry_interrupted(&deadline, "write", || self.tls.write_tls(&mut self.pipe))?;
        }
        Ok(())
    }
}

/// Close codes by which the gateway defers an enrolment instead of refusing it: the token is
/// not spent or judged, so the agent tries again after its back-off.
fn retry_later(code: CloseCode) -> bool {
    matches!(
        code,
        CloseCode::OVERLOADED | CloseCode::SHUTDOWN | CloseCode::TIMEOUT | CloseCode::INTERNAL
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A Welcome with these pending counts.
    pub(crate) fn welcome(
        pending_commands: u32,
        pending_transfers: u32,
    ) -> fleetcast_wire::Welcome {
        fleetcast_wire::Welcome {
            session_id: 1,
            server_time_ms: 0,
            heartbeat_ms: 15_000,
            acked_seq: 0,
            pending_commands,
            pending_transfers,
        }
    }

    /// Work the Welcome says is pending cuts the long-poll wait to the shortest hold until it
    /// arrived (or the window passed); none leaves the normal wait.
    #[test]
    fn pending_work_asks_at_once_and_none_relaxes() {
        let t0 = Instant::ZERO + Duration::from_secs(1);
        let normal = Duration::from_secs(15);
        let idle = Pending::welcomed(t0, &welcome(0, 0));
        assert!(!idle.is_pending(t0));
        assert_eq!(idle.read_wait(t0, normal), normal);
        assert_eq!(Pending::default().read_wait(t0, normal), normal);

        let mut p = Pending::welcomed(t0, &welcome(2, 1));
        assert_eq!(p.read_wait(t0, normal), ladder::MIN_WAIT);
        // A shorter wait of the loop's own (a command running) stays.
        let short = Duration::from_millis(20);
        assert_eq!(p.read_wait(t0, short), short);
        p.dispatched();
        p.announced();
        assert_eq!(
            p.read_wait(t0, normal),
            ladder::MIN_WAIT,
            "one command to come"
        );
        assert!(!p.take_relaxed(t0), "still pending");
        p.announced(); // more announces than counted (a re-announce) do not underflow
        p.dispatched();
        assert_eq!(p.read_wait(t0, normal), normal, "everything arrived");
        assert!(p.take_relaxed(t0), "relaxed, said once");
        assert!(!p.take_relaxed(t0));
        let mut idle = idle;
        assert!(
            !idle.take_relaxed(t0),
            "nothing was pending: nothing to relax from"
        );

        // A count that never reaches zero is acted on for the window only.
        let p = Pending::welcomed(t0, &welcome(5, 0));
        let almost = t0 + (Pending::WINDOW - Duration::from_millis(1));
        assert_eq!(p.read_wait(almost, normal), ladder::MIN_WAIT);
        assert_eq!(p.read_wait(t0 + Pending::WINDOW, normal), normal);
    }
}
