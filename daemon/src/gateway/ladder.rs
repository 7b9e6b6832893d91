//! The gateway's side of the agent's transport ladder, inside the one mio loop.
//!
//! The protocol itself (paths, fields, limits, refusals, the sniffing of first bytes, the
//! stream offsets) is [`fleetcast_wire::ladder`], shared with the agent; this module is the
//! I/O around it. Every accepted agent connection starts in [`Sniffing::Outer`]; its first
//! byte (peeked, not consumed) picks the layer ([`sniff`]):
//! - TLS → after the handshake the first plaintext byte picks binary framing (native, port 443
//!   and CONNECT rungs) or an HTTP head (`GET /fleetcast` + `Upgrade: fleetcast` → `101`, then
//!   binary framing). The session core is created only once binary framing starts.
//! - plain HTTP → a long-poll request (`POST /fleetcast/poll`, one request per connection).
//!   Its body is the agent's inner TLS stream; the gateway relays it to *its own listener* over
//!   a loopback connection ([`RelayConn`]), so the long-poll agent gets an ordinary
//!   [`AgentConn`] with the same TLS, identity and session core as every other rung. A relay is
//!   named by a random 128-bit token handed out in `X-Fleetcast-Session`; it lives until its
//!   agent connection closes or no request names it for [`proto::RELAY_IDLE`]. Its [`PollStream`]
//!   makes a repeated exchange (an answer lost to a proxy's timeout or a cut connection)
//!   harmless: body bytes are taken once by offset, answers are kept until acknowledged.
//!
//! Limits: HTTP heads are bounded by [`proto::MAX_HEAD`] bytes and [`proto::MAX_HEADERS`] fields,
//! and must be complete (with the body) within `GatewayConfig::http_timeout` of the first
//! byte; a cut is logged with its reason and answered with a status when possible. None of
//! this blocks or costs a thread: it is readiness, buffers and one timer per connection.

use super::*;
use fleetcast_wire::ladder::sniff::{self, Inner, Outer};
use fleetcast_wire::ladder::{self as proto, status, Parsed, PollStream, Refusal, Route, Rung};
use std::collections::HashMap;

/// A relay no long-poll request has named for this long is closed (and its session with it).
const RELAY_IDLE: Duration = proto::RELAY_IDLE;
/// Most gateway bytes a relay buffers for its agent (reading stops above this).
const MAX_PENDING: usize = proto::RELAY_BUFFER;

/// Why a long-poll relay could not be opened (the request is answered `503`).
#[derive(Debug, thiserror::Error)]
pub(super) enum RelayError {
    /// The connection budget keeps no room for another relay.
    #[error("the long-poll relay budget is full (see the connection budget in the log)")]
    BudgetFull,
    /// The loopback connection to the gateway's own listener failed.
    #[error("loopback connection to the gateway's listener: {0}")]
    Loopback(#[from] io::Error),
    /// The system random number generator failed.
    #[error("no randomness for a session token")]
    NoRandomness,
    /// The connection table refused the relay's connection.
    #[error("relay not registered")]
    NotRegistered,
}

/// Where an agent connection is in the sniffing of its layers.
pub(super) enum Sniffing {
    /// Nothing seen yet.
    Outer,
    /// TLS; the first plaintext byte is awaited.
    Inner,
    /// TLS carrying an HTTP head (Upgrade rung), to be complete by this deadline.
    UpgradeHead(Instant),
    /// Binary framing (the session core runs).
    Binary,
    /// Plain HTTP (long-poll): the TLS state is unused.
    Plain(Box<PlainHttp>),
}

/// One plain-HTTP long-poll request on an agent connection.
pub(super) struct PlainHttp {
    inbuf: Vec<u8>,
    out: Vec<u8>,
    state: PlainState,
    /// Request deadline (head and body), then the hold deadline.
    deadline: Instant,
}

enum PlainState {
    Request,
    Holding { token: [u8; 16] },
    Responded,
}

/// The gateway end of a long-poll session: a loopback TCP connection to the gateway's own
/// listener, carrying the agent's TLS bytes.
pub(super) struct RelayConn {
    pub(super) sock: TcpStream,
    token: [u8; 16],
    connected: bool,
    to_gw: Vec<u8>,
    from_gw: Vec<u8>,
    stream: PollStream,
    /// The request held for this session, if any.
    waiter: Option<(usize, ConnId)>,
    eof: bool,
    expired: bool,
    last_poll: Instant,
    pub(super) writable_armed: bool,
    /// The session it carries authenticated with a client certificate: its long-poll
    /// requests count as an authenticated agent's.
    pub(super) authenticated: bool,
}

/// Long-poll sessions by token.
#[derive(Default)]
pub(super) struct Relays {
    by_token: HashMap<[u8; 16], (usize, ConnId)>,
    /// A relay's loopback address (its local end) → the address of the agent whose request
    /// opened it, and the relay: the gateway's own listener sees the relay's connection come
    /// from loopback, and enrolment limits go by the real source.
    origins: HashMap<SocketAddr, (std::net::IpAddr, usize, ConnId)>,
}

impl Relays {
    pub(super) fn forget(&mut self, r: &RelayConn) {
        self.by_token.remove(&r.token);
        if let Ok(local) = r.sock.local_addr() {
            self.origins.remove(&local);
        }
    }

    /// The source to count a connection from `peer` against (the agent behind a relay, else
    /// `peer` itself) and the relay it comes from, if any.
    pub(super) fn origin(&self, peer: SocketAddr) -> (std::net::IpAddr, Option<(usize, ConnId)>) {
        match self.origins.get(&peer) {
            Some(&(ip, idx, id)) => (ip, Some((idx, id))),
            None => (peer.ip(), None),
        }
    }
}

/// The rung an agent reports in its version's build metadata (`0.1.0+connect`,
/// [`Rung::of_version`]), as the store records it.
pub(super) fn rung_of(agent_version: &str) -> Option<fleetcast_store::Transport> {
    use fleetcast_store::Transport;
    Some(match Rung::of_version(agent_version)? {
        Rung::Native => Transport::Native,
        Rung::Port443 => Transport::Native443,
        Rung::Upgrade => Transport::HttpUpgrade,
        Rung::Connect => Transport::HttpConnect,
        Rung::LongPoll => Transport::LongPoll,
    })
}

/// Decides, once the TLS handshake is done, whether binary framing may start on `c`
/// (handling the Upgrade head when there is one). On `true`, `c.plain` holds the first
/// binary bytes (possibly none).
pub(super) fn inner_ready(
    c: &mut AgentConn,
    idx: usize,
    id: ConnId,
    now: Instant,
    http_timeout: Duration,
    timers: &mut BinaryHeap<Reverse<(Instant, usize, ConnId)>>,
) -> bool {
    loop {
        match c.sniff {
            Sniffing::Binary => return true,
            Sniffing::Outer | Sniffing::Plain(_) => return false,
            Sniffing::Inner => match sniff::sniff_inner(&c.plain) {
                Inner::NeedMore => return false,
                Inner::Binary => c.sniff = Sniffing::Binary,
                Inner::Http => {
                    c.sniff = Sniffing::UpgradeHead(now + http_timeout);
                    timers.push(Reverse((now + http_timeout, idx, id)));
                }
                Inner::Unknown(b) => {
                    tracing::info!(
                        conn = id,
                        first_byte = b,
                        "connection closed: inside TLS neither binary framing nor HTTP"
                    );
                    c.closing = true;
                    return false;
                }
            },
            Sniffing::UpgradeHead(_) => match proto::parse_request(&c.plain, true) {
                Parsed::Partial => return false,
                Parsed::Request {
                    route: Route::Upgrade,
                    head_len,
                } => {
                    c.plain.drain(..head_len);
                    if let Err(e) = c.tls.write_plain(proto::SWITCHING) {
                        tracing::warn!(conn = id, error = %e, "TLS write failed");
                        c.closing = true;
                        return false;
                    }
                    tracing::debug!(conn = id, "HTTP Upgrade: binary framing follows");
                    c.sniff = Sniffing::Binary;
                }
                Parsed::Request { .. } => {
                    refuse_in_tls(c, id, Refusal::NoSuchEndpoint);
                    return false;
                }
                Parsed::Reject(r) => {
                    refuse_in_tls(c, id, r);
                    return false;
                }
            },
        }
    }
}

fn refuse_in_tls(c: &mut AgentConn, id: ConnId, r: Refusal) {
    tracing::info!(
        conn = id,
        status = r.status(),
        reason = r.reason(),
        "HTTP request inside TLS refused"
    );
    let mut out = Vec::new();
    proto::refuse(&mut out, r);
    let _ = c.tls.write_plain(&out);
    c.closing = true;
}

/// A timer of an agent connection without a session. Returns whether it changed anything.
pub(super) fn unsessioned_timer(c: &mut AgentConn, id: ConnId, now: Instant) -> bool {
    match &mut c.sniff {
        Sniffing::Plain(p) => {
            if now < p.deadline {
                return false;
            }
            match p.state {
                PlainState::Request => {
                    tracing::info!(
                        conn = id,
                        received = p.inbuf.len(),
                        "HTTP request not complete in time: cut off (slowloris)"
                    );
                    proto::refuse(&mut p.out, Refusal::RequestTimeout);
                    p.state = PlainState::Responded;
                }
                PlainState::Holding { token } => {
                    // Nothing came during the hold: an empty answer (no offset, no bytes).
                    proto::respond(&mut p.out, status::OK, Some(&token), b"");
                    p.state = PlainState::Responded;
                }
                PlainState::Responded => c.closing = true,
            }
            true
        }
        Sniffing::UpgradeHead(deadline) => {
            if now < *deadline {
                return false;
            }
            tracing::info!(
                conn = id,
                received = c.plain.len(),
                "HTTP Upgrade head not complete in time: cut off (slowloris)"
            );
            let mut out = Vec::new();
            proto::refuse(&mut out, Refusal::HeadTimeout);
            let _ = c.tls.write_plain(&out);
            c.closing = true;
            true
        }
        Sniffing::Outer | Sniffing::Inner | Sniffing::Binary => {
            tracing::info!(
                conn = id,
                "TLS handshake timed out (or nothing sent after it)"
            );
            c.closing = true;
            true
        }
    }
}

/// Writes a plain-HTTP connection's response; returns whether the connection is done.
pub(super) fn flush_plain(c: &mut AgentConn, registry: &mio::Registry, token: Token) -> bool {
    let Sniffing::Plain(p) = &mut c.sniff else {
        return c.closing;
    };
    while !p.out.is_empty() {
        match c.tls.sock.write(&p.out) {
            Ok(0) => {
                c.closing = true;
                break;
            }
            Ok(n) => {
                p.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                c.closing = true;
                break;
            }
        }
    }
    let pending = !p.out.is_empty();
    arm_writable(
        registry,
        &mut c.tls.sock,
        token,
        pending && !c.closing,
        &mut c.writable_armed,
    );
    c.closing || (matches!(p.state, PlainState::Responded) && !pending)
}

/// Reads and drops what the peer sent but nobody read (bounded), so closing sends FIN rather
/// than RST: a RST could destroy a final answer (`408`, `431`, a `Close` frame) before the
/// peer reads it (RFC 9112 §9.6 asks servers to close in stages for this reason).
pub(super) fn discard_input(sock: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match sock.read(&mut buf) {
            Ok(n) if n > 0 => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

/// Writes pending agent bytes into the relay; returns whether bytes (or the connect) remain.
pub(super) fn flush_relay(r: &mut RelayConn) -> bool {
    if !r.connected {
        return !r.eof;
    }
    while !r.to_gw.is_empty() {
        match r.sock.write(&r.to_gw) {
            Ok(0) => {
                r.eof = true;
                break;
            }
            Ok(n) => {
                r.to_gw.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                r.eof = true;
                break;
            }
        }
    }
    !r.to_gw.is_empty() && !r.eof
}

/// Whether a relay can be dropped (once closed, only after the agent has everything).
pub(super) fn relay_done(r: &RelayConn) -> bool {
    r.expired || (r.eof && r.from_gw.is_empty() && r.stream.unacked() == 0)
}

/// Answers a held (or new) long-poll request from the relay's buffer.
fn respond_from_relay(p: &mut PlainHttp, r: &mut RelayConn) {
    if r.from_gw.is_empty() && r.stream.unacked() == 0 && r.eof {
        proto::refuse(&mut p.out, Refusal::SessionClosed);
    } else {
        let n = r.from_gw.len().min(MAX_PENDING);
        let fresh: Vec<u8> = r.from_gw.drain(..n).collect();
        let (down, body) = r.stream.answer(&fresh);
        proto::respond_poll(&mut p.out, &r.token, down, &body);
    }
    p.state = PlainState::Responded;
}

impl Gateway {
    /// Before TLS reads: the outer sniff, and plain-HTTP connections. `Some(more)` ends the
    /// servicing of this connection (with the read-budget flag).
    pub(super) fn ladder_pre_read(&mut self, idx: usize, now: Instant) -> Option<bool> {
        let http_timeout = self.cfg.http_timeout;
        let slot = &mut self.conns[idx];
        let id = slot.id;
        let Conn::Agent(c) = &mut slot.conn else {
            return Some(false);
        };
        if let Sniffing::Outer = c.sniff {
            let mut b = [0u8; 1];
            match c.tls.sock.peek(&mut b) {
                Ok(0) => {
                    c.closing = true;
                    return Some(false);
                }
                Ok(_) => match sniff::sniff_outer(&b) {
                    Outer::Tls => c.sniff = Sniffing::Inner,
                    Outer::Http => {
                        c.sniff = Sniffing::Plain(Box::new(PlainHttp {
                            inbuf: Vec::new(),
                            out: Vec::new(),
                            state: PlainState::Request,
                            deadline: now + http_timeout,
                        }));
                        self.work
                            .timers
                            .push(Reverse((now + http_timeout, idx, id)));
                    }
                    Outer::NeedMore => return Some(false),
                    Outer::Unknown(b) => {
                        tracing::info!(
                            conn = id,
                            first_byte = b,
                            "connection closed: TLS/socket error: the first byte is neither TLS nor HTTP"
                        );
                        c.closing = true;
                        return Some(false);
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Some(true),
                Err(_) => {
                    c.closing = true;
                    return Some(false);
                }
            }
        }
        match c.sniff {
            Sniffing::Plain(_) => Some(self.service_plain(idx, now)),
            _ => None,
        }
    }

    /// Reads a plain-HTTP long-poll request; once complete, hands it to its relay.
    fn service_plain(&mut self, idx: usize, now: Instant) -> bool {
        let slot = &mut self.conns[idx];
        let id = slot.id;
        let Conn::Agent(c) = &mut slot.conn else {
            return false;
        };
        let Sniffing::Plain(p) = &mut c.sniff else {
            return false;
        };
        let mut buf = [0u8; 16 * 1024];
        let mut eof = false;
        let limit = proto::MAX_HEAD + proto::MAX_BODY;
        loop {
            match c.tls.sock.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    // Bytes after the request (or after the response started) are ignored:
                    // one request per connection.
                    if matches!(p.state, PlainState::Request) {
                        p.inbuf.extend_from_slice(&buf[..n]);
                        if p.inbuf.len() > limit {
                            break;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        if !matches!(p.state, PlainState::Request) {
            // A client gone while its request is held: nothing to answer.
            if eof && matches!(p.state, PlainState::Holding { .. }) {
                c.closing = true;
            }
            return false;
        }
        let (session, wait_ms, body, offsets) = match proto::parse_request(&p.inbuf, false) {
            Parsed::Partial => {
                if eof {
                    tracing::info!(conn = id, "HTTP client closed before a complete head");
                    c.closing = true;
                }
                return false;
            }
            Parsed::Reject(r) => {
                tracing::info!(
                    conn = id,
                    status = r.status(),
                    reason = r.reason(),
                    "HTTP request refused"
                );
                proto::refuse(&mut p.out, r);
                p.state = PlainState::Responded;
                p.inbuf = Vec::new();
                return false;
            }
            Parsed::Request {
                route:
                    Route::Poll {
                        session,
                        wait_ms,
                        body_len,
                        up,
                        down,
                    },
                head_len,
            } => {
                if p.inbuf.len() < head_len + body_len {
                    if eof {
                        tracing::info!(conn = id, "HTTP client closed before the whole body");
                        c.closing = true;
                    }
                    return false;
                }
                let body = p.inbuf[head_len..head_len + body_len].to_vec();
                p.inbuf = Vec::new();
                (session, wait_ms, body, (up, down))
            }
            Parsed::Request { .. } => {
                proto::refuse(&mut p.out, Refusal::NoSuchEndpoint);
                p.state = PlainState::Responded;
                return false;
            }
        };
        self.poll_request(idx, id, session, wait_ms, body, offsets, now);
        false
    }

    /// One complete long-poll request: its body goes to the session's relay (what it had
    /// not taken yet, by the `(up, down)` stream offsets); the answer is the relay's pending
    /// bytes, now or when they arrive (or empty at the hold deadline).
    #[allow(clippy::too_many_arguments)] // One request's fields, taken apart once.
    fn poll_request(
        &mut self,
        idx: usize,
        id: ConnId,
        session: Option<[u8; 16]>,
        wait_ms: u32,
        body: Vec<u8>,
        (up, down): (Option<u64>, Option<u64>),
        now: Instant,
    ) {
        let origin = match &self.conns[idx].conn {
            Conn::Agent(c) => c.peer,
            _ => return,
        };
        let found = match session {
            None => self.open_relay(now, origin).map_err(|e| {
                tracing::warn!(conn = id, error = %e, "long-poll relay not opened");
                Refusal::CannotOpenSession
            }),
            Some(t) => match self.relays.by_token.get(&t) {
                Some(&(ri, rid)) if self.conns.get(ri).is_some_and(|s| s.id == rid) => Ok(ri),
                _ => Err(Refusal::UnknownSession),
            },
        };
        let ridx = match found {
            Ok(r) => r,
            Err(refusal) => {
                if let Conn::Agent(c) = &mut self.conns[idx].conn {
                    if let Sniffing::Plain(p) = &mut c.sniff {
                        proto::refuse(&mut p.out, refusal);
                        p.state = PlainState::Responded;
                    }
                }
                self.work.touched.push(idx);
                return;
            }
        };
        let Some((hslot, rslot)) = self.conns.get2_mut(idx, ridx) else {
            return;
        };
        let (Conn::Agent(c), Conn::Relay(r)) = (&mut hslot.conn, &mut rslot.conn) else {
            return;
        };
        if r.authenticated && !self.limits.authenticate(c, id) {
            c.closing = true;
            return;
        }
        let Sniffing::Plain(p) = &mut c.sniff else {
            return;
        };
        r.last_poll = now;
        match r.stream.ack(down).and_then(|()| r.stream.take(up, &body)) {
            Ok(fresh) => r.to_gw.extend_from_slice(fresh),
            Err(e) => {
                tracing::info!(
                    conn = id,
                    reason = e.reason(),
                    "long-poll request refused: bad stream offset"
                );
                proto::refuse(&mut p.out, Refusal::Stream(e));
                p.state = PlainState::Responded;
                self.work.touched.push(idx);
                return;
            }
        }
        // An older request of this session still held answers empty at its own deadline.
        r.waiter = None;
        // Bytes not acknowledged (an answer lost on the way) go again at once.
        if !r.from_gw.is_empty() || r.stream.unacked() != 0 || r.eof || wait_ms == 0 {
            respond_from_relay(p, r);
        } else {
            let deadline = now + Duration::from_millis(u64::from(wait_ms));
            r.waiter = Some((idx, id));
            p.state = PlainState::Holding { token: r.token };
            p.deadline = deadline;
            self.work.timers.push(Reverse((deadline, idx, id)));
        }
        self.work.touched.push(idx);
        self.work.touched.push(ridx);
        // Reading stops at MAX_PENDING and readiness is edge-triggered: read again now that
        // the buffer may have drained.
        if !self.work.ready.contains(&ridx) {
            self.work.ready.push_back(ridx);
        }
    }

    /// Opens a relay: a non-blocking loopback connection to this gateway's own listener, on
    /// behalf of the agent at `origin`.
    fn open_relay(&mut self, now: Instant, origin: std::net::IpAddr) -> Result<usize, RelayError> {
        if !self.limits.has_room(limits::Class::Relay) {
            return Err(RelayError::BudgetFull);
        }
        let mut addr = self.listeners.agent.local_addr()?;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let sock = TcpStream::connect(addr)?;
        let local = sock.local_addr()?;
        let mut token = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut token)
            .map_err(|_| RelayError::NoRandomness)?;
        let (ridx, rid) = self
            .add_conn(sock, now, |sock| {
                Conn::Relay(Box::new(RelayConn {
                    sock,
                    token,
                    connected: false,
                    to_gw: Vec::new(),
                    from_gw: Vec::new(),
                    stream: PollStream::default(),
                    waiter: None,
                    eof: false,
                    expired: false,
                    last_poll: now,
                    writable_armed: false,
                    authenticated: false,
                }))
            })
            .ok_or(RelayError::NotRegistered)?;
        self.relays.by_token.insert(token, (ridx, rid));
        self.relays.origins.insert(local, (origin, ridx, rid));
        // One idle timer per relay, re-armed from the last request when it fires.
        self.work
            .timers
            .push(Reverse((now + RELAY_IDLE, ridx, rid)));
        tracing::debug!(relay = rid, "long-poll session opened");
        Ok(ridx)
    }

    /// Services a relay: completes its connect, reads the gateway's bytes, answers the held
    /// request.
    pub(super) fn service_relay(&mut self, idx: usize) -> bool {
        let Conn::Relay(r) = &mut self.conns[idx].conn else {
            return false;
        };
        if !r.connected {
            match r.sock.peer_addr() {
                Ok(_) => r.connected = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    if let Ok(Some(_)) | Err(_) = r.sock.take_error() {
                        r.eof = true;
                    }
                }
                Err(_) => r.eof = true,
            }
        }
        let mut buf = [0u8; 16 * 1024];
        while r.connected && !r.eof && r.from_gw.len() + r.stream.unacked() < MAX_PENDING {
            match r.sock.read(&mut buf) {
                Ok(0) => r.eof = true,
                Ok(n) => r.from_gw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => r.eof = true,
            }
        }
        if r.from_gw.is_empty() && !r.eof {
            return false;
        }
        let Some((widx, wid)) = r.waiter.take() else {
            return false;
        };
        let Some((rslot, hslot)) = self.conns.get2_mut(idx, widx) else {
            return false;
        };
        if hslot.id != wid {
            return false;
        }
        if let (Conn::Relay(r), Conn::Agent(c)) = (&mut rslot.conn, &mut hslot.conn) {
            if let Sniffing::Plain(p) = &mut c.sniff {
                if matches!(p.state, PlainState::Holding { .. }) {
                    respond_from_relay(p, r);
                    self.work.touched.push(widx);
                }
            }
        }
        false
    }

    /// A relay's idle timer: closes a relay no request named for [`RELAY_IDLE`].
    pub(super) fn relay_timer(&mut self, idx: usize, now: Instant) {
        let slot = &mut self.conns[idx];
        let id = slot.id;
        let Conn::Relay(r) = &mut slot.conn else {
            return;
        };
        if now - r.last_poll >= RELAY_IDLE {
            tracing::info!(relay = id, "long-poll session idle: closed");
            r.expired = true;
            self.work.touched.push(idx);
        } else {
            self.work
                .timers
                .push(Reverse((r.last_poll + RELAY_IDLE, idx, id)));
        }
    }
}
