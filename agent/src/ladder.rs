//! The transport ladder: the ways an agent reaches its gateway through firewalls and
//! proxies, tried in order until one carries a full application round trip.
//!
//! | rung | carrier | gateway sees |
//! |---|---|---|
//! | [`Rung::Native`] | TCP to the gateway port, TLS, binary framing | TLS, binary |
//! | [`Rung::Port443`] | the same to the alternative port (443) | TLS, binary |
//! | [`Rung::Upgrade`] | TCP to the alternative port, TLS, `GET /fleetcast` + `Upgrade: fleetcast` → `101`, binary framing | TLS, HTTP, then binary |
//! | [`Rung::Connect`] | TCP to the proxy, `CONNECT host:443`, TLS inside the tunnel, binary framing | TLS (from the proxy), binary |
//! | [`Rung::LongPoll`] | `POST /fleetcast/poll` (plain HTTP, direct or forwarded by the proxy); bodies carry the agent's TLS stream | plain HTTP |
//!
//! Every rung carries the same TLS session (mutual authentication, the device certificate)
//! and the same binary session inside it, so queues, reboot suspension and catch-up do not
//! know which rung they run on. Long-poll keeps no sticky state: every request names its
//! session with the token the gateway handed out, and any TCP connection may carry it.
//!
//! The HTTP protocol itself (paths, fields, limits, the request heads sent and the response
//! heads read, the stream offsets) is [`fleetcast_wire::ladder`], shared with the gateway;
//! this module owns the carriers ([`Pipe`]), the proxy settings ([`Proxy`]), the per-network
//! memory of the winning rung and of the long-poll hold ([`Memory`]), deadlines ([`Deadline`])
//! and the typed causes of a failed rung ([`LadderError`]) and climb ([`ClimbError`]); the
//! driver decides when a rung has won (a `Welcome` answered the `Hello`). Every blocking call
//! here and in the driver repeats an interrupted call ([`retry_interrupted`]): a signal must
//! not abandon an exchange.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use fleetcast_wire::ladder::{self as proto, status, MalformedResponse, PollRequest};
pub use fleetcast_wire::ladder::{Rung, DOWN_HEADER, LADDER, UP_HEADER};
use rustls::ClientConnection;

/// A deadline on the agent's monotonic epoch (the agent reads no clock but its epoch).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    epoch: std::time::Instant,
    at: Duration,
}

impl Deadline {
    /// `d` from now.
    pub fn after(epoch: std::time::Instant, d: Duration) -> Deadline {
        Deadline {
            epoch,
            at: epoch.elapsed() + d,
        }
    }

    /// Time left (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_sub(self.epoch.elapsed())
    }

    /// Whether it has passed.
    pub fn expired(&self) -> bool {
        self.remaining().is_zero()
    }

    /// The time left, or [`LadderError::RungTimeout`] naming `what` once it has passed.
    pub fn check(&self, what: &str) -> Result<Duration, LadderError> {
        let left = self.remaining();
        if left.is_zero() {
            return Err(LadderError::RungTimeout(what.into()));
        }
        Ok(left)
    }
}

/// Calls `f` again while it fails with `Interrupted`, until `deadline`
/// ([`fleetcast_os::retry_interrupted`]): a signal arriving while a call blocks (a command's
/// child exiting, say) interrupts it before it did anything, so the call is simply repeated.
pub fn retry_interrupted<T>(
    deadline: &Deadline,
    what: &str,
    f: impl FnMut() -> io::Result<T>,
) -> Result<T, LadderError> {
    fleetcast_os::retry_interrupted(f, || deadline.check(what).map(drop))
}

/// Why a rung (its carrier, its TLS handshake, its Upgrade, a long-poll exchange, or the
/// round trip the driver waits for) failed: one variant per broken rule. [`LadderError::kind`]
/// is the `io::ErrorKind` the failure has always had; a long-poll carrier's reads carry the
/// error inside an `io::Error` (the `Read` trait's type) and [`From<io::Error>`] takes it out
/// again, so the cause stays typed across the TLS layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LadderError {
    /// The rung's deadline passed while `.0` was under way.
    #[error("{0}: rung timeout")]
    RungTimeout(String),
    /// A proxy asked for credentials, or refused the ones given.
    #[error(transparent)]
    ProxyAuth(ProxyAuthRefused),
    /// The CONNECT rung without a proxy.
    #[error("no proxy configured")]
    NoProxy,
    /// The gateway is not given as `HOST:PORT`.
    #[error("gateway must be HOST:PORT")]
    GatewayAddress,
    /// A name resolved to no address.
    #[error("{0} resolves to nothing")]
    Unresolved(String),
    /// A name could not be resolved.
    #[error("{addr}: {source}")]
    Resolve {
        /// The name (`host:port`).
        addr: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// A TCP connect failed.
    #[error("connect {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// The system's error.
        source: io::Error,
    },
    /// No complete HTTP response came in time.
    #[error("no complete HTTP response in time")]
    ResponseTimeout,
    /// A response head over [`proto::MAX_RESPONSE_HEAD`].
    #[error("HTTP response head too large")]
    ResponseHeadTooLarge,
    /// The connection ended inside a response head.
    #[error("closed before a complete HTTP response head")]
    ClosedBeforeHead,
    /// The connection ended inside a response body.
    #[error("closed before the whole HTTP response body")]
    ClosedBeforeBody,
    /// A response head that is not HTTP.
    #[error(transparent)]
    Malformed(#[from] MalformedResponse),
    /// The proxy answered CONNECT with something else than 2xx.
    #[error("the proxy refused CONNECT {target}: HTTP {status}")]
    ConnectRefused {
        /// The tunnel asked for.
        target: String,
        /// The proxy's status.
        status: u16,
    },
    /// The connection ended during the TLS handshake.
    #[error("closed during the TLS handshake")]
    ClosedInHandshake,
    /// TLS failed (a certificate refused, a bad record) or could not be set up.
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    /// The name to verify the gateway's certificate against is not a valid name.
    #[error(transparent)]
    ServerName(#[from] rustls::pki_types::InvalidDnsNameError),
    /// The gateway sent bytes after its `101` before the agent's first frame.
    #[error("bytes after the 101 answer")]
    BytesAfterUpgrade,
    /// The gateway answered the Upgrade request with another status than `101`.
    #[error("the gateway refused the Upgrade: HTTP {0}")]
    UpgradeRefused(u16),
    /// The connection ended before the Upgrade answer.
    #[error("closed before the Upgrade answer")]
    ClosedBeforeUpgrade,
    /// A long-poll `200` without `Content-Length`.
    #[error("long-poll: no Content-Length")]
    PollNoLength,
    /// A long-poll body over [`proto::MAX_RESPONSE_BODY`].
    #[error("long-poll: response too large")]
    PollTooLarge,
    /// The first long-poll answer handed out no session token.
    #[error("long-poll: no session token")]
    PollNoToken,
    /// A long-poll answer that starts past the bytes received ([`proto::fresh_part`]).
    #[error("long-poll: the gateway skipped bytes of the stream")]
    PollGap,
    /// Something on the path (a proxy) answered a status worth repeating the exchange for.
    #[error("long-poll: HTTP {0} from the path")]
    PathStatus(u16),
    /// The long-poll request was refused.
    #[error("long-poll: HTTP {0}")]
    PollRefused(u16),
    /// Every long-poll exchange failed for `secs` seconds.
    #[error("long-poll: every exchange failed for {secs} s, the last: {last}")]
    GaveUp {
        /// How long they failed.
        secs: u64,
        /// The last failure.
        last: Box<LadderError>,
    },
    /// The session core cannot send the rung's first message (`Hello` or `Enrol`).
    #[error(transparent)]
    Session(fleetcast_wire::SessionError),
    /// The rung's session closed before the gateway answered (`Enrolled` or `Welcome`).
    #[error("closed before {0}")]
    ClosedBefore(&'static str),
    /// The gateway's `Welcome` did not come within the rung timeout.
    #[error("no Welcome within the rung timeout")]
    NoWelcome,
    /// Another rung won before this one started.
    #[error("race already won")]
    RaceWon,
    /// The system refused an operation (a socket option, a read, a thread).
    #[error(transparent)]
    Io(io::Error),
}

impl LadderError {
    /// The `io::ErrorKind` of the failure (how the driver tells a timeout or a would-block
    /// from a refusal).
    pub fn kind(&self) -> io::ErrorKind {
        use io::ErrorKind as K;
        match self {
            LadderError::RungTimeout(_)
            | LadderError::ResponseTimeout
            | LadderError::PathStatus(_)
            | LadderError::NoWelcome => K::TimedOut,
            LadderError::ProxyAuth(_) => K::PermissionDenied,
            LadderError::NoProxy => K::Unsupported,
            LadderError::GatewayAddress | LadderError::ServerName(_) | LadderError::Session(_) => {
                K::InvalidInput
            }
            LadderError::Unresolved(_) => K::NotFound,
            LadderError::Resolve { source, .. } | LadderError::Connect { source, .. } => {
                source.kind()
            }
            LadderError::ResponseHeadTooLarge
            | LadderError::Malformed(_)
            | LadderError::Tls(_)
            | LadderError::BytesAfterUpgrade
            | LadderError::PollNoLength
            | LadderError::PollTooLarge
            | LadderError::PollNoToken
            | LadderError::PollGap => K::InvalidData,
            LadderError::ClosedBeforeHead
            | LadderError::ClosedBeforeBody
            | LadderError::ClosedInHandshake
            | LadderError::ClosedBeforeUpgrade => K::UnexpectedEof,
            LadderError::ConnectRefused { .. }
            | LadderError::UpgradeRefused(_)
            | LadderError::PollRefused(_) => K::ConnectionRefused,
            LadderError::ClosedBefore(_) => K::ConnectionAborted,
            LadderError::GaveUp { last, .. } => last.kind(),
            LadderError::RaceWon => K::Other,
            LadderError::Io(e) => e.kind(),
        }
    }

    /// The proxy's refusal of its credentials, if that is what this is.
    pub fn proxy_auth(&self) -> Option<&ProxyAuthRefused> {
        match self {
            LadderError::ProxyAuth(p) => Some(p),
            _ => None,
        }
    }
}

impl From<io::Error> for LadderError {
    /// An `io::Error` that carries a ladder error (a long-poll read, through TLS) or a TLS
    /// error gives it back; any other is [`LadderError::Io`].
    fn from(e: io::Error) -> Self {
        match e.downcast::<LadderError>() {
            Ok(l) => l,
            Err(e) => match e.downcast::<rustls::Error>() {
                Ok(t) => LadderError::Tls(t),
                Err(e) => LadderError::Io(e),
            },
        }
    }
}

impl From<LadderError> for io::Error {
    fn from(e: LadderError) -> Self {
        match e {
            LadderError::Io(e) => e,
            e => io::Error::new(e.kind(), e),
        }
    }
}

/// The proxy asked for credentials or refused the ones given (`407 Proxy Authentication
/// Required`; tinyproxy answers wrong ones with `401`): a configuration error, not a network
/// one, reported as such however the other rungs failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the proxy {proxy} {} (HTTP {status})", if *.sent_credentials {
    "refused the user and password given in the proxy URL"
} else {
    "needs a user and password: give them in the proxy URL, http://USER:PASSWORD@HOST:PORT"
})]
pub struct ProxyAuthRefused {
    /// The proxy (`host:port`).
    pub proxy: String,
    /// Whether the request carried `Proxy-Authorization`.
    pub sent_credentials: bool,
    /// The proxy's status (407, or 401).
    pub status: u16,
}

impl ProxyAuthRefused {
    /// The proxy's answer `status`, if it is about its credentials: `407`, or `401`, which
    /// only a proxy sends on these requests (tinyproxy answers wrong credentials with it; the
    /// gateway never does).
    fn check(p: &Proxy, status: u16) -> Result<(), LadderError> {
        if status != status::PROXY_AUTH_REQUIRED && status != status::UNAUTHORIZED {
            return Ok(());
        }
        Err(LadderError::ProxyAuth(ProxyAuthRefused {
            proxy: p.addr.clone(),
            sent_credentials: p.auth.is_some(),
            status,
        }))
    }

    /// The refusal inside an I/O error from a carrier (a long-poll read), if that is what it
    /// is.
    pub fn of(e: &io::Error) -> Option<&ProxyAuthRefused> {
        e.get_ref()?.downcast_ref::<LadderError>()?.proxy_auth()
    }
}

/// Why a climb found no rung: the most telling of the rungs' failures. A proxy's `407` or a
/// certificate the agent cannot trust is a configuration problem that no retry fixes, so it
/// is named even when other rungs failed later (a blocked rung's timeout) or differently.
#[derive(Debug, thiserror::Error)]
pub enum ClimbError {
    /// A proxy asked for credentials, or refused the ones given.
    #[error(transparent)]
    ProxyAuth(ProxyAuthRefused),
    /// The gateway's chain has no CA with the fingerprint the agent was given.
    #[error(transparent)]
    CaFingerprint(crate::tls::CaPinMismatch),
    /// The gateway's certificate does not verify against the CA the agent trusts (or is not
    /// for the name it expects).
    #[error("the gateway's certificate was refused ({0}): it must be issued by the gateway CA the agent was given (--ca, --ca-fingerprint, or the one saved at enrolment) for the --server-name")]
    Certificate(rustls::Error),
    /// Nothing got through; each rung's error, in the order they failed.
    #[error("no rung reached the gateway ({})", list(.0))]
    Unreachable(Vec<(Rung, LadderError)>),
}

fn list(failures: &[(Rung, LadderError)]) -> String {
    if failures.is_empty() {
        return "no rung is allowed".into();
    }
    failures
        .iter()
        .map(|(r, e)| format!("{}: {e}", r.name()))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ClimbError {
    /// The most telling cause among the rungs' failures.
    pub fn from_failures(failures: Vec<(Rung, LadderError)>) -> ClimbError {
        if let Some(p) = failures.iter().find_map(|(_, e)| e.proxy_auth()) {
            return ClimbError::ProxyAuth(p.clone());
        }
        let certificate = failures.iter().find_map(|(_, e)| match e {
            LadderError::Tls(err @ rustls::Error::InvalidCertificate(_)) => Some(err.clone()),
            _ => None,
        });
        match certificate {
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) => {
                match o.0.downcast_ref::<crate::tls::CaPinMismatch>() {
                    Some(m) => ClimbError::CaFingerprint(m.clone()),
                    None => ClimbError::Certificate(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::Other(o),
                    )),
                }
            }
            Some(err) => ClimbError::Certificate(err),
            None => ClimbError::Unreachable(failures),
        }
    }
}

/// An HTTP proxy (`http://[user:pass@]host:port`).
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port`.
    pub addr: String,
    /// `Proxy-Authorization` value (`Basic …`), from the URL's user information.
    pub auth: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("auth", &self.auth.as_ref().map(|_| "…"))
            .finish()
    }
}

/// A proxy URL the agent cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Another scheme than `http://`.
    #[error("proxy scheme {0}:// is not supported (use http://)")]
    Scheme(String),
    /// No `host[:port]` after the scheme and the user information.
    #[error("bad proxy address in {0:?}")]
    Address(String),
    /// The user information is not valid percent-encoding.
    #[error("bad percent-encoding in the proxy user")]
    PercentEncoding,
}

/// Parses a proxy URL: `http://` (or no scheme), optional `user:password@` (percent-encoded),
/// `host:port` (port 80 when absent), an optional trailing `/`.
pub fn parse_proxy(url: &str) -> Result<Proxy, ProxyError> {
    let url = url.trim();
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => return Err(ProxyError::Scheme(scheme.into())),
        None => url,
    };
    let rest = rest.trim_end_matches('/');
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    if hostport.is_empty() || hostport.contains('/') {
        return Err(ProxyError::Address(url.into()));
    }
    let has_port = match hostport.rsplit_once(':') {
        Some((h, p)) => !h.ends_with(':') && !p.is_empty() && p.parse::<u16>().is_ok(),
        None => false,
    };
    let addr = if has_port {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let auth = match userinfo {
        None => None,
        Some(u) => {
            let decoded = percent_decode(u).ok_or(ProxyError::PercentEncoding)?;
            let b64 = crate::tls::base64(&decoded);
            Some(format!("Basic {}", String::from_utf8_lossy(&b64)))
        }
    };
    Ok(Proxy { addr, auth })
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The proxy from `https_proxy` / `HTTPS_PROXY` unless `no_proxy` / `NO_PROXY` covers `host`
/// (entries are host names or domain suffixes, `*` covers everything). `get` reads the
/// environment (a parameter so tests need not mutate the process environment).
pub fn proxy_from_env(
    host: &str,
    get: impl Fn(&str) -> Option<String>,
) -> Option<Result<Proxy, ProxyError>> {
    let url = get("https_proxy")
        .or_else(|| get("HTTPS_PROXY"))
        .filter(|v| !v.trim().is_empty())?;
    let no_proxy = get("no_proxy")
        .or_else(|| get("NO_PROXY"))
        .unwrap_or_default();
    let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
    for entry in no_proxy.split(',') {
        let e = entry.trim().trim_start_matches('.').to_ascii_lowercase();
        let e = e.rsplit_once(':').map_or(e.as_str(), |(h, _)| h);
        if e == "*" || (!e.is_empty() && (host == e || host.ends_with(&format!(".{e}")))) {
            return None;
        }
    }
    Some(parse_proxy(&url))
}

/// Where the rungs go.
#[derive(Debug, Clone)]
pub struct Target {
    /// Gateway host (name or address).
    pub host: String,
    /// Gateway port.
    pub port: u16,
    /// The alternative port (443 rung, Upgrade, CONNECT target, long-poll).
    pub alt_port: u16,
    /// Proxy for the CONNECT and long-poll rungs.
    pub proxy: Option<Proxy>,
}

impl Target {
    /// From `host:port`.
    pub fn parse(
        gateway: &str,
        alt_port: u16,
        proxy: Option<Proxy>,
    ) -> Result<Target, LadderError> {
        let (host, port) = gateway
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse().ok()?)))
            .ok_or(LadderError::GatewayAddress)?;
        Ok(Target {
            host: host.to_string(),
            port,
            alt_port,
            proxy,
        })
    }

    fn hostport(&self, port: u16) -> String {
        if self.host.contains(':') {
            format!("[{}]:{port}", self.host)
        } else {
            format!("{}:{port}", self.host)
        }
    }

    /// The gateway's address (first resolution).
    pub fn gateway_addr(&self) -> Result<SocketAddr, LadderError> {
        let addr = self.hostport(self.port);
        resolve(&addr)?.next().ok_or(LadderError::Unresolved(addr))
    }

    /// Which network we are on, as seen from here: the gateway and the local source address
    /// the routing table picks for it (a UDP `connect` sends nothing).
    pub fn network_key(&self) -> String {
        let local = self.gateway_addr().ok().and_then(|gw| {
            let any: SocketAddr = if gw.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                ([0u16; 8], 0).into()
            };
            let s = UdpSocket::bind(any).ok()?;
            s.connect(gw).ok()?;
            Some(s.local_addr().ok()?.ip())
        });
        match local {
            Some(ip) => format!("{}:{}@{ip}", self.host, self.port),
            None => format!("{}:{}@unrouted", self.host, self.port),
        }
    }

    /// The local address this network uses (for multicast transfers).
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        let key = self.network_key();
        key.rsplit_once('@')?.1.parse().ok()
    }
}

/// The addresses `addr` (`host:port`) resolves to.
fn resolve(addr: &str) -> Result<std::vec::IntoIter<SocketAddr>, LadderError> {
    addr.to_socket_addrs()
        .map_err(|source| LadderError::Resolve {
            addr: addr.into(),
            source,
        })
}

/// A byte carrier under TLS.
#[derive(Debug)]
pub enum Pipe {
    /// A TCP stream (direct, or a CONNECT tunnel).
    Tcp(TcpStream),
    /// HTTP long-poll exchanges.
    Poll(Box<LongPoll>),
}

impl Pipe {
    /// Bounds a blocking read (for long-poll: the hold the gateway may take).
    pub fn set_read_timeout(&mut self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Pipe::Tcp(s) => s.set_read_timeout(d),
            Pipe::Poll(p) => {
                // A floor, so a busy agent (polling its executor every 20 ms) does not turn
                // into a request storm through the proxy: each exchange is a connection.
                p.wait = d.unwrap_or(MAX_WAIT).clamp(MIN_WAIT, p.max_hold);
                Ok(())
            }
        }
    }

    /// Long-poll: the longest hold to ask the gateway for (remembered per network, see
    /// [`Memory::hold`]); nothing for the other carriers.
    pub fn set_max_hold(&mut self, d: Duration) {
        if let Pipe::Poll(p) = self {
            p.max_hold = d.clamp(MIN_WAIT, MAX_WAIT);
        }
    }

    /// Long-poll: a shorter hold learnt since the last call, because the path cut a held
    /// request (to remember for this network).
    pub fn take_learned_hold(&mut self) -> Option<Duration> {
        match self {
            Pipe::Poll(p) => p.learned.take(),
            Pipe::Tcp(_) => None,
        }
    }

    /// Bounds a blocking write.
    pub fn set_write_timeout(&mut self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Pipe::Tcp(s) => s.set_write_timeout(d),
            Pipe::Poll(_) => Ok(()),
        }
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Pipe::Tcp(s) => s.read(buf),
            // The typed cause rides inside the `io::Error` (see `LadderError`).
            Pipe::Poll(p) => p.read(buf).map_err(io::Error::from),
        }
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Pipe::Tcp(s) => s.write(buf),
            Pipe::Poll(p) => {
                p.outbox.extend_from_slice(buf);
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Pipe::Tcp(s) => s.flush(),
            Pipe::Poll(_) => Ok(()),
        }
    }
}

/// Longest hold a long-poll request asks for (below the gateway's cap).
pub const MAX_WAIT: Duration = Duration::from_secs(20);
/// Shortest hold a long-poll request asks for (the gateway answers at once when it has bytes).
pub const MIN_WAIT: Duration = Duration::from_millis(250);
/// How long past its hold a long-poll response may take.
const RESPONSE_SLACK: Duration = Duration::from_secs(10);
/// A long-poll session whose exchanges have all failed for this long is given up: a little
/// before the gateway closes a relay no request reached ([`proto::RELAY_IDLE`]).
const GIVE_UP_AFTER: Duration = Duration::from_secs(proto::RELAY_IDLE.as_secs() - 5);
/// Longest pause between two attempts at a failed exchange.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(4);
/// Largest HTTP response head the agent reads.
const MAX_RESPONSE_HEAD: usize = proto::MAX_RESPONSE_HEAD;
/// Largest long-poll request body the agent sends (under the gateway's limit).
const MAX_REQUEST_BODY: usize = proto::MAX_REQUEST_BODY;
/// Largest long-poll response body the agent accepts.
const MAX_RESPONSE_BODY: usize = proto::MAX_RESPONSE_BODY;

const _: () = assert!(MAX_WAIT.as_millis() < proto::MAX_WAIT_MS as u128);

/// Opens the carrier of `rung` (TCP, CONNECT tunnel or long-poll) within `deadline`.
/// TLS (and the Upgrade request) come after, in [`handshake`] and [`http_upgrade`].
pub fn open(rung: Rung, t: &Target, deadline: &Deadline) -> Result<Pipe, LadderError> {
    match rung {
        Rung::Native => Ok(Pipe::Tcp(tcp(&t.hostport(t.port), deadline)?)),
        Rung::Port443 | Rung::Upgrade => Ok(Pipe::Tcp(tcp(&t.hostport(t.alt_port), deadline)?)),
        Rung::Connect => {
            let p = t.proxy.as_ref().ok_or(LadderError::NoProxy)?;
            let mut s = tcp(&p.addr, deadline)?;
            connect_tunnel(&mut s, &t.hostport(t.alt_port), p, deadline)?;
            Ok(Pipe::Tcp(s))
        }
        Rung::LongPoll => Ok(Pipe::Poll(Box::new(LongPoll {
            target: t.hostport(t.alt_port),
            proxy: t.proxy.clone(),
            token: None,
            outbox: Vec::new(),
            inbox: Vec::new(),
            pos: 0,
            wait: Duration::ZERO,
            closed: false,
            connect_timeout: deadline.remaining().max(Duration::from_secs(1)),
            sent: 0,
            received: 0,
            max_hold: MAX_WAIT,
            learned: None,
            failures: 0,
            failing_since: None,
            retry_at: None,
        }))),
    }
}

fn tcp(addr: &str, deadline: &Deadline) -> Result<TcpStream, LadderError> {
    let mut last = LadderError::Unresolved(addr.into());
    for a in resolve(addr)? {
        let left = deadline.check(&format!("connect {a}"))?;
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(source) => last = LadderError::Connect { addr: a, source },
        }
    }
    Err(last)
}

/// One blocking read from `s` by `deadline`: an interrupted read is repeated (with the time
/// left, as a repeated read restarts the socket's timeout), a timed-out one is
/// [`LadderError::ResponseTimeout`].
fn read_by(s: &mut TcpStream, buf: &mut [u8], deadline: &Deadline) -> Result<usize, LadderError> {
    loop {
        s.set_read_timeout(Some(deadline.check("HTTP response")?))?;
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(LadderError::ResponseTimeout)
            }
            r => return Ok(r?),
        }
    }
}

/// Reads an HTTP response head byte by byte (so no tunnel byte after it is consumed), by
/// `deadline`.
fn read_head(s: &mut TcpStream, deadline: &Deadline) -> Result<Vec<u8>, LadderError> {
    let mut head = Vec::with_capacity(256);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(LadderError::ResponseHeadTooLarge);
        }
        match read_by(s, &mut b, deadline)? {
            0 => return Err(LadderError::ClosedBeforeHead),
            _ => head.push(b[0]),
        }
    }
    Ok(head)
}

/// Fills `buf` from `s` by `deadline`.
fn read_full(
    s: &mut TcpStream,
    mut buf: &mut [u8],
    deadline: &Deadline,
) -> Result<(), LadderError> {
    while !buf.is_empty() {
        match read_by(s, buf, deadline)? {
            0 => return Err(LadderError::ClosedBeforeBody),
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

/// Asks the proxy for a tunnel to `target`; `Ok` once it answered 2xx.
fn connect_tunnel(
    s: &mut TcpStream,
    target: &str,
    p: &Proxy,
    deadline: &Deadline,
) -> Result<(), LadderError> {
    let req = proto::connect_request(target, p.auth.as_deref());
    s.set_write_timeout(Some(deadline.check("CONNECT")?))?;
    s.write_all(req.as_bytes())?;
    let head = read_head(s, deadline)?;
    let r = proto::parse_response(&head)?;
    ProxyAuthRefused::check(p, r.status)?;
    if !(200..300).contains(&r.status) {
        return Err(LadderError::ConnectRefused {
            target: target.into(),
            status: r.status,
        });
    }
    Ok(())
}

/// Completes the TLS handshake over `pipe` within `deadline`.
pub fn handshake(
    tls: &mut ClientConnection,
    pipe: &mut Pipe,
    deadline: &Deadline,
) -> Result<(), LadderError> {
    loop {
        pipe.set_write_timeout(Some(deadline.check("TLS handshake")?))?;
        while tls.wants_write() {
            retry_interrupted(deadline, "TLS handshake", || tls.write_tls(pipe))?;
        }
        if !tls.is_handshaking() {
            return Ok(());
        }
        pipe.set_read_timeout(Some(deadline.check("TLS handshake")?))?;
        match tls.read_tls(pipe) {
            Ok(0) => return Err(LadderError::ClosedInHandshake),
            Ok(_) => {
                tls.process_new_packets()?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends `GET /fleetcast` with `Upgrade: fleetcast` inside TLS and waits for `101`.
pub fn http_upgrade(
    tls: &mut ClientConnection,
    pipe: &mut Pipe,
    host: &str,
    deadline: &Deadline,
) -> Result<(), LadderError> {
    tls.writer()
        .write_all(proto::upgrade_request(host).as_bytes())?;
    let mut plain = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        pipe.set_write_timeout(Some(deadline.check("Upgrade")?))?;
        while tls.wants_write() {
            retry_interrupted(deadline, "Upgrade", || tls.write_tls(pipe))?;
        }
        if let Some(end) = proto::head_len(&plain) {
            if end != plain.len() {
                return Err(LadderError::BytesAfterUpgrade);
            }
            let r = proto::parse_response(&plain)?;
            if r.status != status::SWITCHING_PROTOCOLS {
                return Err(LadderError::UpgradeRefused(r.status));
            }
            return Ok(());
        }
        if plain.len() > MAX_RESPONSE_HEAD {
            return Err(LadderError::ResponseHeadTooLarge);
        }
        pipe.set_read_timeout(Some(deadline.check("Upgrade")?))?;
        match tls.read_tls(pipe) {
            Ok(0) => return Err(LadderError::ClosedBeforeUpgrade),
            Ok(_) => {
                let st = tls.process_new_packets()?;
                let mut n = st.plaintext_bytes_to_read();
                while n > 0 {
                    let k = tls.reader().read(&mut buf[..n.min(4096)])?;
                    if k == 0 {
                        break;
                    }
                    plain.extend_from_slice(&buf[..k]);
                    n -= k;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The client end of the long-poll rung: writes are buffered; a read with nothing buffered
/// performs one exchange (`POST` carrying the buffered bytes; the gateway may hold it up to
/// the read timeout when it has nothing to send). A read that got nothing returns
/// `WouldBlock`; a closed session (`410`) reads as end of stream.
///
/// # Exchanges may be repeated
/// Each request names the stream offset of its body ([`UP_HEADER`]) and acknowledges the
/// gateway bytes received so far ([`DOWN_HEADER`]); each response names the offset of its body.
/// The gateway drops body bytes it already has and sends again whatever was not acknowledged,
/// so an exchange whose answer was lost (a proxy that gave up on a held request, a cut
/// connection) is simply made again: the TLS stream inside loses and duplicates nothing.
/// Such failures are retried (the first at once, then with growing pauses) for up to
/// [`GIVE_UP_AFTER`]; the session's own dead-peer timeout usually decides earlier.
///
/// # The hold adapts to the path
/// A held request cut after `t` means something on the path (a proxy's read timeout, a NAT)
/// does not wait that long: the longest hold asked for drops to ¾ of `t` (at most half the
/// hold that was cut), and the driver remembers it for the network
/// ([`Pipe::take_learned_hold`]).
#[derive(Debug)]
pub struct LongPoll {
    target: String,
    proxy: Option<Proxy>,
    /// The session token (a bearer name for the relay, not a credential: the TLS inside
    /// authenticates).
    token: Option<String>,
    outbox: Vec<u8>,
    inbox: Vec<u8>,
    pos: usize,
    wait: Duration,
    closed: bool,
    connect_timeout: Duration,
    /// Agent bytes the gateway has confirmed: the stream offset of `outbox[0]`.
    sent: u64,
    /// Gateway bytes received.
    received: u64,
    /// Longest hold to ask for.
    max_hold: Duration,
    /// A shorter `max_hold` learnt and not yet taken by the driver.
    learned: Option<Duration>,
    /// Failed exchanges in a row, since when (on [`epoch`]), and when to try again.
    failures: u32,
    failing_since: Option<Duration>,
    retry_at: Option<Duration>,
}

/// How a long-poll exchange failed.
enum Failure {
    /// Making the exchange again may work, and is harmless: the connect or the write failed,
    /// the connection ended or timed out before a whole answer, or a proxy answered 502, 503,
    /// 504 or 408. `held` is `(hold asked for, time waited)` when the request was sent whole
    /// and the wait for its answer was cut.
    Retry {
        error: LadderError,
        held: Option<(Duration, Duration)>,
    },
    /// Repeating cannot help: a refusal, a malformed answer.
    Fatal(LadderError),
}

impl LongPoll {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, LadderError> {
        if self.pos >= self.inbox.len() && !self.closed {
            self.poll()?;
        }
        if self.pos < self.inbox.len() {
            let n = buf.len().min(self.inbox.len() - self.pos);
            buf[..n].copy_from_slice(&self.inbox[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        if self.closed {
            return Ok(0);
        }
        // Nothing yet.
        Err(LadderError::Io(io::ErrorKind::WouldBlock.into()))
    }

    /// One exchange, or the pause before repeating a failed one (then nothing is read).
    fn poll(&mut self) -> Result<(), LadderError> {
        let mut hold = self.wait.min(self.max_hold);
        if let Some(at) = self.retry_at {
            let now = epoch().elapsed();
            if at > now {
                let pause = (at - now).min(hold);
                std::thread::sleep(pause);
                if epoch().elapsed() < at {
                    return Ok(());
                }
                hold = hold.saturating_sub(pause).max(MIN_WAIT);
            }
        }
        let error = match self.exchange(hold) {
            Ok(()) => {
                self.failures = 0;
                self.failing_since = None;
                self.retry_at = None;
                return Ok(());
            }
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry { error, held }) => {
                if let Some((asked, waited)) = held {
                    self.shorten_hold(asked, waited);
                }
                error
            }
        };
        // The first request opens the session: while climbing, its failure moves on to the
        // next rung, like any other carrier's.
        if self.token.is_none() {
            return Err(error);
        }
        let now = epoch().elapsed();
        let since = *self.failing_since.get_or_insert(now);
        if now - since >= GIVE_UP_AFTER {
            return Err(LadderError::GaveUp {
                secs: GIVE_UP_AFTER.as_secs(),
                last: Box::new(error),
            });
        }
        self.failures += 1;
        // A cut hold is retried at once; a path that keeps failing gets growing pauses.
        let pause = match self.failures {
            1 => Duration::ZERO,
            n => (MIN_WAIT * (1 << (n - 2).min(8))).min(MAX_RETRY_PAUSE),
        };
        self.retry_at = Some(now + pause);
        crate::say!(
            "long-poll exchange failed ({error}); repeating it in {} ms",
            pause.as_millis()
        );
        Ok(())
    }

    /// A request asked to be held up to `asked` was cut after `waited`.
    fn shorten_hold(&mut self, asked: Duration, waited: Duration) {
        // A short request that fails says nothing about holds, nor does an instant failure.
        if asked < Duration::from_secs(1) || waited < MIN_WAIT {
            return;
        }
        let hold = (waited * 3 / 4).min(asked / 2).max(MIN_WAIT);
        // Whole milliseconds: what the request header and the memory file carry.
        let hold = Duration::from_millis(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX));
        if hold < self.max_hold {
            crate::say!(
                "long-poll: the path cut a request held for {} ms; holding at most {} ms from now on",
                waited.as_millis(),
                hold.as_millis()
            );
            self.max_hold = hold;
            self.learned = Some(hold);
        }
    }

    /// One `POST`: sends the next chunk of the outbox (at its stream offset) and the
    /// acknowledgement of what arrived, and takes the gateway's bytes from the answer.
    fn exchange(&mut self, hold: Duration) -> Result<(), Failure> {
        let retry = |error: LadderError| Failure::Retry { error, held: None };
        let via = self.proxy.as_ref().map_or(&self.target, |p| &p.addr);
        let connect = Deadline::after(epoch(), self.connect_timeout);
        let mut s = tcp(via, &connect).map_err(retry)?;
        // Bodies stay well under the gateway's limit; while more is queued, ask for no hold.
        let chunk = self.outbox.len().min(MAX_REQUEST_BODY);
        let wait = if self.outbox.len() > chunk {
            Duration::ZERO
        } else {
            hold
        };
        let deadline = Deadline::after(epoch(), wait + RESPONSE_SLACK);
        s.set_write_timeout(Some(deadline.remaining()))
            .map_err(|e| retry(e.into()))?;
        let head = PollRequest {
            target: &self.target,
            via_proxy: self.proxy.is_some(),
            body_len: chunk,
            wait_ms: wait.as_millis(),
            up: self.sent,
            down: self.received,
            session: self.token.as_deref(),
            proxy_auth: self.proxy.as_ref().and_then(|p| p.auth.as_deref()),
        }
        .head();
        let mut msg = head.into_bytes();
        msg.extend_from_slice(&self.outbox[..chunk]);
        // `write_all` repeats interrupted writes itself.
        s.write_all(&msg).map_err(|e| retry(e.into()))?;
        let sent_at = epoch().elapsed();
        let held = || Some((wait, epoch().elapsed().saturating_sub(sent_at)));
        let head = read_head(&mut s, &deadline).map_err(|error| match error {
            // An oversized head is not the path's doing.
            LadderError::ResponseHeadTooLarge => Failure::Fatal(error),
            _ => Failure::Retry {
                error,
                held: held(),
            },
        })?;
        let r = proto::parse_response(&head).map_err(|e| Failure::Fatal(e.into()))?;
        match r.status {
            status::OK => {
                let len = r
                    .content_length
                    .ok_or(Failure::Fatal(LadderError::PollNoLength))?;
                if len > MAX_RESPONSE_BODY {
                    return Err(Failure::Fatal(LadderError::PollTooLarge));
                }
                let mut body = vec![0u8; len];
                read_full(&mut s, &mut body, &deadline).map_err(retry)?;
                if self.token.is_none() {
                    self.token = Some(r.session.ok_or(Failure::Fatal(LadderError::PollNoToken))?);
                }
                // What we already have of the body (an answer to a repeated exchange) is
                // skipped.
                let fresh = proto::fresh_part(self.received, r.down, &body)
                    .map_err(|_| Failure::Fatal(LadderError::PollGap))?;
                self.received += fresh.len() as u64;
                self.outbox.drain(..chunk);
                self.sent += chunk as u64;
                self.inbox = fresh.to_vec();
                self.pos = 0;
                Ok(())
            }
            status::GONE => {
                self.closed = true;
                self.outbox.clear();
                Ok(())
            }
            code @ (status::UNAUTHORIZED | status::PROXY_AUTH_REQUIRED) => match &self.proxy {
                Some(p) => Err(Failure::Fatal(
                    ProxyAuthRefused::check(p, code)
                        .err()
                        .unwrap_or(LadderError::PollRefused(code)),
                )),
                None => Err(Failure::Fatal(LadderError::PollRefused(code))),
            },
            code @ (status::REQUEST_TIMEOUT
            | status::BAD_GATEWAY
            | status::SERVICE_UNAVAILABLE
            | status::GATEWAY_TIMEOUT) => Err(Failure::Retry {
                error: LadderError::PathStatus(code),
                held: held(),
            }),
            code => Err(Failure::Fatal(LadderError::PollRefused(code))),
        }
    }
}

/// The process-wide epoch for deadlines made inside the carriers.
pub(crate) fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    #[allow(clippy::disallowed_methods)] // The agent's one epoch for carrier deadlines.
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// What the agent remembers per network, in the state directory (`ladder`, one
/// `KEY RUNG [HOLD-MS]` line per network): the rung that won last time (`-` while none has),
/// and the longest long-poll hold the path let through, when one was cut. Losing the file
/// only costs a full climb (and a cut hold).
#[derive(Debug, Clone)]
pub struct Memory {
    path: PathBuf,
}

impl Memory {
    /// The memory file in `state_dir`.
    pub fn new(state_dir: &std::path::Path) -> Memory {
        Memory {
            path: state_dir.join("ladder"),
        }
    }

    /// `(rung, hold)` remembered for `network`.
    fn entry(&self, network: &str) -> (Option<Rung>, Option<Duration>) {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        text.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next()? == network).then(|| {
                    let rung = w.next().and_then(Rung::parse);
                    let hold = w
                        .next()
                        .and_then(|h| h.parse().ok())
                        .map(Duration::from_millis);
                    (rung, hold)
                })
            })
            .unwrap_or((None, None))
    }

    /// Replaces the line of `network` (atomic replace of the file).
    fn put(&self, network: &str, rung: Option<Rung>, hold: Option<Duration>) -> io::Result<()> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut out: String = text
            .lines()
            .filter(|l| l.split_whitespace().next().is_some_and(|k| k != network))
            .map(|l| format!("{l}\n"))
            .collect();
        out.push_str(&format!("{network} {}", rung.map_or("-", Rung::name)));
        if let Some(h) = hold {
            out.push_str(&format!(" {}", h.as_millis()));
        }
        out.push('\n');
        fleetcast_os::write_atomic(&self.path, out.as_bytes(), 0o600)
    }

    /// The rung that won last time on `network`.
    pub fn get(&self, network: &str) -> Option<Rung> {
        self.entry(network).0
    }

    /// The longest long-poll hold that works on `network`, once one was cut there.
    pub fn hold(&self, network: &str) -> Option<Duration> {
        self.entry(network).1
    }

    /// Records the winner on `network` (keeping its hold).
    pub fn set(&self, network: &str, rung: Rung) -> io::Result<()> {
        let (_, hold) = self.entry(network);
        self.put(network, Some(rung), hold)
    }

    /// Records the longest long-poll hold that works on `network` (keeping its rung).
    pub fn set_hold(&self, network: &str, hold: Duration) -> io::Result<()> {
        let (rung, _) = self.entry(network);
        self.put(network, rung, Some(hold))
    }
}

/// The order to try: the remembered rung first, then the rest best first.
pub fn order(allowed: &[Rung], remembered: Option<Rung>) -> Vec<Rung> {
    let mut v: Vec<Rung> = Vec::with_capacity(allowed.len());
    if let Some(r) = remembered.filter(|r| allowed.contains(r)) {
        v.push(r);
    }
    for r in LADDER {
        if allowed.contains(&r) && !v.contains(&r) {
            v.push(r);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls() {
        let p = parse_proxy("http://10.0.0.1:3128").unwrap();
        assert_eq!(p.addr, "10.0.0.1:3128");
        assert_eq!(p.auth, None);
        let p = parse_proxy("proxy.example:8080/").unwrap();
        assert_eq!(p.addr, "proxy.example:8080");
        assert_eq!(parse_proxy("http://proxy").unwrap().addr, "proxy:80");
        // RFC 7617 §2 example: "Aladdin:open sesame".
        let p = parse_proxy("http://Aladdin:open%20sesame@p:3128").unwrap();
        assert_eq!(
            p.auth.as_deref(),
            Some("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")
        );
        assert!(parse_proxy("socks5://p:1080").is_err());
        assert!(parse_proxy("http://u:%zz@p:1").is_err());
        assert!(!format!("{:?}", parse_proxy("http://u:secret@p:1").unwrap()).contains("secret"));
    }

    #[test]
    fn proxy_environment_and_no_proxy() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let got = proxy_from_env("gw.corp.example", env(&[("HTTPS_PROXY", "http://p:3128")]));
        assert_eq!(got.unwrap().unwrap().addr, "p:3128");
        // Lower case wins over upper case.
        let got = proxy_from_env(
            "gw",
            env(&[("https_proxy", "http://a:1"), ("HTTPS_PROXY", "http://b:2")]),
        );
        assert_eq!(got.unwrap().unwrap().addr, "a:1");
        assert!(proxy_from_env("gw", env(&[])).is_none());
        assert!(proxy_from_env(
            "gw.corp.example",
            env(&[
                ("https_proxy", "http://p:1"),
                ("no_proxy", "localhost, .corp.example")
            ])
        )
        .is_none());
        assert!(proxy_from_env(
            "10.77.0.1",
            env(&[("https_proxy", "http://p:1"), ("NO_PROXY", "10.77.0.1")])
        )
        .is_none());
        assert!(proxy_from_env(
            "x",
            env(&[("https_proxy", "http://p:1"), ("no_proxy", "*")])
        )
        .is_none());
        // A suffix matches only at a label boundary.
        assert!(proxy_from_env(
            "evilcorp.example",
            env(&[("https_proxy", "http://p:1"), ("no_proxy", "corp.example")])
        )
        .is_some());
    }

    #[test]
    fn memory_is_per_network_and_ordering_puts_it_first() {
        let dir = tempfile::tempdir().unwrap();
        let m = Memory::new(dir.path());
        assert_eq!(m.get("a"), None);
        m.set("gw:7300@10.0.0.2", Rung::Connect).unwrap();
        m.set("gw:7300@192.168.1.5", Rung::Native).unwrap();
        m.set("gw:7300@10.0.0.2", Rung::LongPoll).unwrap();
        assert_eq!(m.get("gw:7300@10.0.0.2"), Some(Rung::LongPoll));
        assert_eq!(m.get("gw:7300@192.168.1.5"), Some(Rung::Native));
        assert_eq!(
            order(&LADDER, Some(Rung::Connect)),
            vec![
                Rung::Connect,
                Rung::Native,
                Rung::Port443,
                Rung::Upgrade,
                Rung::LongPoll
            ]
        );
        assert_eq!(
            order(&[Rung::Native, Rung::LongPoll], Some(Rung::Upgrade)),
            vec![Rung::Native, Rung::LongPoll]
        );
    }

    /// Requests a test server saw: (head, body).
    type Seen = Vec<(String, Vec<u8>)>;

    /// A one-thread HTTP server on 127.0.0.1 answering each request with `answer(i, head,
    /// body)`; returns its address and the requests it saw.
    fn server(
        n: usize,
        answer: impl Fn(usize, &str, &[u8]) -> Vec<u8> + Send + 'static,
    ) -> (SocketAddr, std::thread::JoinHandle<Seen>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for i in 0..n {
                let (mut c, _) = l.accept().unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let d = Deadline::after(epoch(), Duration::from_secs(10));
                let head = String::from_utf8(read_head(&mut c, &d).unwrap()).unwrap();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                let mut body = vec![0u8; len];
                c.read_exact(&mut body).unwrap();
                c.write_all(&answer(i, &head, &body)).unwrap();
                seen.push((head, body));
            }
            seen
        });
        (addr, t)
    }

    fn ok(token: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nX-Fleetcast-Session: {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn long_poll_chunks_carries_the_token_and_ends_on_410() {
        let (addr, t) = server(4, |i, _, body| match i {
            0..=2 => ok("t0k3n", &body[..3]),
            _ => b"HTTP/1.1 410 Gone\r\nContent-Length: 0\r\n\r\n".to_vec(),
        });
        let target = Target::parse(&addr.to_string(), addr.port(), None).unwrap();
        let d = Deadline::after(epoch(), Duration::from_secs(5));
        let mut pipe = open(Rung::LongPoll, &target, &d).unwrap();
        pipe.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let out: Vec<u8> = (0..MAX_REQUEST_BODY * 2 + 1000).map(|i| i as u8).collect();
        pipe.write_all(&out).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let seen = t.join().unwrap();
        // Three chunks, the whole stream in order, the token from the second request on, no
        // hold while more is queued.
        let sent: Vec<u8> = seen[..3].iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(sent, out);
        assert_eq!(seen[0].1.len(), MAX_REQUEST_BODY);
        assert!(!seen[0].0.contains("X-Fleetcast-Session"), "{}", seen[0].0);
        assert!(
            seen[1].0.contains("X-Fleetcast-Session: t0k3n"),
            "{}",
            seen[1].0
        );
        assert!(
            seen[0].0.contains("X-Fleetcast-Wait: 0\r\n"),
            "{}",
            seen[0].0
        );
        assert!(
            seen[2].0.contains("X-Fleetcast-Wait: 1500\r\n"),
            "{}",
            seen[2].0
        );
        assert!(seen[0].0.starts_with("POST /fleetcast/poll HTTP/1.1\r\n"));
        let m = MAX_REQUEST_BODY;
        assert_eq!(
            got,
            [&out[..3], &out[m..m + 3], &out[2 * m..2 * m + 3]].concat()
        );
    }

    #[test]
    fn connect_tunnel_sends_credentials_and_fails_on_refusal() {
        let (addr, t) = server(2, |i, _, _| match i {
            0 => b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec(),
            _ => b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n".to_vec(),
        });
        let proxy = parse_proxy(&format!("http://u:p@{addr}")).unwrap();
        let target = Target::parse("10.9.8.7:7300", 443, Some(proxy)).unwrap();
        let d = Deadline::after(epoch(), Duration::from_secs(5));
        assert!(matches!(open(Rung::Connect, &target, &d), Ok(Pipe::Tcp(_))));
        let err = open(Rung::Connect, &target, &d).unwrap_err();
        // A typed cause, naming the proxy and that it refused the credentials sent.
        assert_eq!(
            err.proxy_auth(),
            Some(&ProxyAuthRefused {
                proxy: addr.to_string(),
                sent_credentials: true,
                status: 407,
            }),
            "{err}"
        );
        assert!(err.to_string().contains("407"), "{err}");
        let seen = t.join().unwrap();
        assert!(
            seen[0].0.starts_with("CONNECT 10.9.8.7:443 HTTP/1.1\r\n"),
            "{}",
            seen[0].0
        );
        assert!(
            seen[0].0.contains("Proxy-Authorization: Basic dTpw\r\n"),
            "{}",
            seen[0].0
        );
        // Without a proxy the rung fails at once.
        let direct = Target::parse("10.9.8.7:7300", 443, None).unwrap();
        assert_eq!(
            open(Rung::Connect, &direct, &d).unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
    }

    /// Header `name`'s value in a request head.
    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
    }

    /// An answer with a body that starts at `down` of the gateway's stream.
    fn ok_at(token: &str, down: u64, body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nX-Fleetcast-Session: {token}\r\n{DOWN_HEADER}: {down}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    /// Reads from `pipe` until `n` bytes came (`WouldBlock` and `Interrupted` mean "again",
    /// as in the driver), for at most 20 s.
    fn read_n(pipe: &mut Pipe, n: usize) -> Vec<u8> {
        let start = epoch().elapsed();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < n {
            assert!(
                epoch().elapsed() - start < Duration::from_secs(20),
                "only {got:?} after 20 s"
            );
            match pipe.read(&mut buf) {
                Ok(0) => panic!("end of stream after {got:?}"),
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    fn long_poll_to(addr: SocketAddr) -> Pipe {
        let target = Target::parse(&addr.to_string(), addr.port(), None).unwrap();
        let d = Deadline::after(epoch(), Duration::from_secs(5));
        open(Rung::LongPoll, &target, &d).unwrap()
    }

    /// A held request the path cuts (a proxy answering 504, or closing without an answer,
    /// after its read timeout) is made again with the same stream offsets, so the session
    /// goes on; the hold shrinks below the cut and is reported for the network's memory.
    #[test]
    fn a_cut_held_request_is_repeated_with_a_shorter_hold() {
        for cut in [
            &b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\n\r\n"[..],
            b"",
        ] {
            let (addr, t) = server(4, move |i, _, _| match i {
                0 => ok_at("t0k3n", 0, b"A"),
                // The proxy's read timeout: 1.2 s into the hold.
                1 => {
                    std::thread::sleep(Duration::from_millis(1200));
                    cut.to_vec()
                }
                2 => ok_at("t0k3n", 1, b"B"),
                _ => ok_at("t0k3n", 2, b"C"),
            });
            let mut pipe = long_poll_to(addr);
            pipe.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            pipe.write_all(b"hello").unwrap();
            assert_eq!(read_n(&mut pipe, 1), b"A");
            pipe.write_all(b"xyz").unwrap();
            assert_eq!(read_n(&mut pipe, 1), b"B");
            let learned = pipe.take_learned_hold().expect("a shorter hold was learnt");
            assert!(
                learned < Duration::from_millis(1200) && learned >= MIN_WAIT,
                "{learned:?}"
            );
            assert_eq!(pipe.take_learned_hold(), None, "reported once");
            // The next request holds no longer than what was learnt.
            pipe.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(read_n(&mut pipe, 1), b"C");
            let seen = t.join().unwrap();
            // The cut request and its repeat carry the same body at the same offsets.
            assert_eq!(seen[1].1, b"xyz");
            assert_eq!(seen[2].1, b"xyz");
            for i in [1, 2] {
                assert_eq!(header(&seen[i].0, UP_HEADER), Some("5"), "{}", seen[i].0);
                assert_eq!(header(&seen[i].0, DOWN_HEADER), Some("1"), "{}", seen[i].0);
            }
            assert_eq!(header(&seen[1].0, "X-Fleetcast-Wait"), Some("5000"));
            let wait: u64 = header(&seen[3].0, "X-Fleetcast-Wait")
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(Duration::from_millis(wait), learned, "{}", seen[3].0);
            assert_eq!(header(&seen[3].0, UP_HEADER), Some("8"));
            assert_eq!(header(&seen[3].0, DOWN_HEADER), Some("2"));
        }
    }

    /// The driver's wait for a Welcome that says work is pending makes the next long-poll
    /// request ask for the shortest hold (an exchange at once); a Welcome with nothing
    /// pending leaves the hold the driver's normal wait asks for.
    #[test]
    fn pending_work_makes_the_long_poll_ask_at_once() {
        use crate::driver::tests::welcome;
        use crate::driver::Pending;
        let (addr, t) = server(3, |i, _, _| ok_at("t", i as u64, b"x"));
        let mut pipe = long_poll_to(addr);
        let now = fleetcast_wire::Instant::ZERO + Duration::from_secs(1);
        let normal = Duration::from_secs(5);
        let wait = |pipe: &mut Pipe, p: Pending| {
            pipe.set_read_timeout(Some(p.read_wait(now, normal)))
                .unwrap();
            read_n(pipe, 1);
        };
        wait(&mut pipe, Pending::welcomed(now, &welcome(0, 0)));
        wait(&mut pipe, Pending::welcomed(now, &welcome(3, 0)));
        wait(&mut pipe, Pending::welcomed(now, &welcome(0, 1)));
        let seen = t.join().unwrap();
        let holds: Vec<&str> = seen
            .iter()
            .map(|(head, _)| header(head, "X-Fleetcast-Wait").unwrap())
            .collect();
        assert_eq!(holds, ["5000", "250", "250"]);
        assert_eq!(MIN_WAIT, Duration::from_millis(250));
    }

    /// An answer that repeats bytes already received (the gateway sends again what was not
    /// acknowledged) yields only the new ones; one that skips bytes ends the session.
    #[test]
    fn long_poll_answers_are_taken_at_their_offset() {
        let (addr, t) = server(3, |i, _, _| match i {
            0 => ok_at("t", 0, b"AB"),
            1 => ok_at("t", 0, b"ABCD"),
            _ => ok_at("t", 9, b"Z"),
        });
        let mut pipe = long_poll_to(addr);
        pipe.set_read_timeout(Some(MIN_WAIT)).unwrap();
        assert_eq!(read_n(&mut pipe, 2), b"AB");
        assert_eq!(read_n(&mut pipe, 2), b"CD");
        let mut buf = [0u8; 8];
        let err = pipe.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        t.join().unwrap();
    }

    /// A proxy's `407` (or tinyproxy's `401`) on the long-poll rung is the typed cause, not
    /// a retry.
    #[test]
    fn long_poll_407_is_typed() {
        let (addr, t) = server(1, |_, _, _| {
            b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n".to_vec()
        });
        let proxy = parse_proxy(&format!("http://{addr}")).unwrap();
        let target = Target::parse("10.9.8.7:7300", 443, Some(proxy)).unwrap();
        let d = Deadline::after(epoch(), Duration::from_secs(5));
        let mut pipe = open(Rung::LongPoll, &target, &d).unwrap();
        pipe.write_all(b"x").unwrap();
        let err = pipe.read(&mut [0u8; 4]).unwrap_err();
        let cause = ProxyAuthRefused::of(&err).expect("typed 407");
        assert!(!cause.sent_credentials);
        t.join().unwrap();
    }

    /// Signals hitting the thread while it waits on the socket (a command's child exiting)
    /// interrupt calls, not exchanges: every exchange is made once, and no bytes are lost or
    /// sent twice.
    #[test]
    fn signals_interrupt_calls_not_exchanges() {
        static HITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        extern "C" fn on_signal(_: libc::c_int) {
            HITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: installs a handler that only bumps an atomic; no SA_RESTART, so blocking
        // calls of the signalled thread fail with EINTR (socket calls with a timeout do so
        // even with SA_RESTART).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
        }
        const EXCHANGES: usize = 4;
        let (addr, t) = server(EXCHANGES, |i, _, _| {
            // The agent waits on the socket while the signals come.
            std::thread::sleep(Duration::from_millis(300));
            ok_at("t", i as u64, &[b'a' + i as u8])
        });
        // SAFETY: the id of this thread, which lives until the signaller is joined.
        let me = unsafe { libc::pthread_self() };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let signaller = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    // SAFETY: `me` is alive (joined below before the test returns).
                    unsafe { libc::pthread_kill(me, libc::SIGUSR1) };
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let mut pipe = long_poll_to(addr);
        pipe.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut got = Vec::new();
        for i in 0..EXCHANGES {
            pipe.write_all(&[b'0' + i as u8]).unwrap();
            got.extend(read_n(&mut pipe, 1));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        signaller.join().unwrap();
        let seen = t.join().unwrap();
        assert_eq!(got, b"abcd");
        let bodies: Vec<Vec<u8>> = seen.iter().map(|(_, b)| b.clone()).collect();
        assert_eq!(bodies, [b"0", b"1", b"2", b"3"].map(|b| b.to_vec()));
        assert!(
            HITS.load(std::sync::atomic::Ordering::Relaxed) > 50,
            "the storm hit the thread"
        );
    }

    #[test]
    fn memory_keeps_the_hold_beside_the_rung() {
        let dir = tempfile::tempdir().unwrap();
        let m = Memory::new(dir.path());
        assert_eq!(m.hold("n"), None);
        m.set_hold("n", Duration::from_millis(1500)).unwrap();
        assert_eq!(
            (m.get("n"), m.hold("n")),
            (None, Some(Duration::from_millis(1500)))
        );
        m.set("n", Rung::LongPoll).unwrap();
        m.set("o", Rung::Native).unwrap();
        assert_eq!(
            m.hold("n"),
            Some(Duration::from_millis(1500)),
            "kept by set"
        );
        assert_eq!(m.get("n"), Some(Rung::LongPoll));
        m.set_hold("n", Duration::from_millis(700)).unwrap();
        assert_eq!(m.get("n"), Some(Rung::LongPoll), "kept by set_hold");
        assert_eq!(m.hold("n"), Some(Duration::from_millis(700)));
        assert_eq!((m.get("o"), m.hold("o")), (Some(Rung::Native), None));
        // A file of the earlier `KEY RUNG` format still reads.
        std::fs::write(dir.path().join("ladder"), "gw:7300@10.0.0.2 connect\n").unwrap();
        assert_eq!(m.get("gw:7300@10.0.0.2"), Some(Rung::Connect));
    }

    /// A proxy's `407` or an untrusted certificate is the cause reported, whatever the
    /// order the rungs failed in; otherwise every rung's error is listed.
    #[test]
    fn the_climb_reports_the_most_telling_failure() {
        let timeout = || {
            LadderError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "connect: timed out",
            ))
        };
        let auth = ProxyAuthRefused {
            proxy: "p:3128".into(),
            sent_credentials: true,
            status: 401,
        };
        let e = ClimbError::from_failures(vec![
            (Rung::Connect, LadderError::ProxyAuth(auth.clone())),
            (Rung::Native, timeout()),
        ]);
        assert!(matches!(&e, ClimbError::ProxyAuth(a) if *a == auth), "{e}");
        assert_eq!(
            e.to_string(),
            "the proxy p:3128 refused the user and password given in the proxy URL (HTTP 401)"
        );
        let mismatch = crate::tls::CaPinMismatch {
            expected: [1; 32],
            presented: vec![[2; 32]],
        };
        let pinned = rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
            rustls::OtherError(std::sync::Arc::new(mismatch.clone())),
        ));
        let e = ClimbError::from_failures(vec![
            (Rung::Native, LadderError::Tls(pinned)),
            (
                Rung::Port443,
                LadderError::Io(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "Connection refused",
                )),
            ),
        ]);
        assert!(
            matches!(&e, ClimbError::CaFingerprint(m) if *m == mismatch),
            "{e}"
        );
        assert!(e.to_string().contains(&"02".repeat(32)), "{e}");
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let e = ClimbError::from_failures(vec![
            (Rung::Native, LadderError::Tls(unknown)),
            (Rung::Port443, timeout()),
        ]);
        assert!(matches!(e, ClimbError::Certificate(_)), "{e}");
        let e =
            ClimbError::from_failures(vec![(Rung::Native, timeout()), (Rung::Port443, timeout())]);
        assert_eq!(
            e.to_string(),
            "no rung reached the gateway (native: connect: timed out; 443: connect: timed out)"
        );
    }

    /// A cause that travels inside an `io::Error` (a long-poll read through TLS) comes out
    /// as the same typed cause with the same kind; a TLS error is typed as such; any other
    /// error stays the system's.
    #[test]
    fn a_typed_cause_survives_the_io_layer() {
        let e = io::Error::from(LadderError::PollGap);
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            e.to_string(),
            "long-poll: the gateway skipped bytes of the stream"
        );
        assert!(matches!(LadderError::from(e), LadderError::PollGap));
        let auth = ProxyAuthRefused {
            proxy: "p:3128".into(),
            sent_credentials: false,
            status: 407,
        };
        let e = io::Error::from(LadderError::ProxyAuth(auth.clone()));
        assert_eq!(ProxyAuthRefused::of(&e), Some(&auth));
        assert_eq!(LadderError::from(e).proxy_auth(), Some(&auth));
        let tls = io::Error::new(io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert!(matches!(
            LadderError::from(tls),
            LadderError::Tls(rustls::Error::DecryptError)
        ));
        let os = LadderError::from(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(matches!(&os, LadderError::Io(_)));
        assert_eq!(os.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(
            io::Error::from(os).kind(),
            io::ErrorKind::ConnectionReset,
            "not wrapped twice"
        );
        let gave_up = LadderError::GaveUp {
            secs: 55,
            last: Box::new(LadderError::PathStatus(504)),
        };
        assert_eq!(gave_up.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            gave_up.to_string(),
            "long-poll: every exchange failed for 55 s, the last: long-poll: HTTP 504 from the path"
        );
    }

    #[test]
    fn deadlines_expire() {
        let d = Deadline::after(epoch(), Duration::ZERO);
        assert!(d.expired());
        assert!(d.check("x").is_err());
        let d = Deadline::after(epoch(), Duration::from_secs(60));
        assert!(!d.expired());
    }
}
