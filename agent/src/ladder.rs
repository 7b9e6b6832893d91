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
//! This module owns the carriers ([`Pipe`]), the proxy settings ([`Proxy`]), the per-network
//! memory of the winning rung ([`Memory`]) and deadlines ([`Deadline`]); the driver decides
//! when a rung has won (a `Welcome` answered the `Hello`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use rustls::ClientConnection;

/// One way to reach the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rung {
    /// Binary framing over TLS to the gateway's port.
    Native,
    /// The same on the alternative port (443 by default).
    Port443,
    /// HTTP/1.1 `Upgrade: fleetcast` inside TLS on the alternative port.
    Upgrade,
    /// An HTTP `CONNECT` tunnel through the proxy to the alternative port.
    Connect,
    /// HTTP long-poll carrying the TLS stream, direct or through the proxy.
    LongPoll,
}

/// The ladder, best first.
pub const LADDER: [Rung; 5] = [
    Rung::Native,
    Rung::Port443,
    Rung::Upgrade,
    Rung::Connect,
    Rung::LongPoll,
];

impl Rung {
    /// Short name (logs, the state file, `fleetcast status`).
    pub fn name(self) -> &'static str {
        match self {
            Rung::Native => "native",
            Rung::Port443 => "443",
            Rung::Upgrade => "upgrade",
            Rung::Connect => "connect",
            Rung::LongPoll => "longpoll",
        }
    }

    /// Parses [`Rung::name`].
    pub fn parse(s: &str) -> Option<Rung> {
        LADDER.into_iter().find(|r| r.name() == s)
    }

    /// Position in [`LADDER`] (0 is best).
    pub fn rank(self) -> usize {
        LADDER
            .iter()
            .position(|r| *r == self)
            .unwrap_or(LADDER.len())
    }
}

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

    fn check(&self, what: &str) -> io::Result<Duration> {
        let left = self.remaining();
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what}: rung timeout"),
            ));
        }
        Ok(left)
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

/// Parses a proxy URL: `http://` (or no scheme), optional `user:password@` (percent-encoded),
/// `host:port` (port 80 when absent), an optional trailing `/`.
pub fn parse_proxy(url: &str) -> Result<Proxy, String> {
    let url = url.trim();
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "proxy scheme {scheme}:// is not supported (use http://)"
            ))
        }
        None => url,
    };
    let rest = rest.trim_end_matches('/');
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    if hostport.is_empty() || hostport.contains('/') {
        return Err(format!("bad proxy address in {url:?}"));
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
            let decoded = percent_decode(u).ok_or("bad percent-encoding in the proxy user")?;
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
) -> Option<Result<Proxy, String>> {
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
    pub fn parse(gateway: &str, alt_port: u16, proxy: Option<Proxy>) -> io::Result<Target> {
        let (host, port) = gateway
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse().ok()?)))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "gateway must be HOST:PORT")
            })?;
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
    pub fn gateway_addr(&self) -> io::Result<SocketAddr> {
        self.hostport(self.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "gateway resolves to nothing"))
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
                p.wait = d.unwrap_or(MAX_WAIT).clamp(MIN_WAIT, MAX_WAIT);
                Ok(())
            }
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
            Pipe::Poll(p) => p.read(buf),
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

/// Longest hold a long-poll request asks for (below the gateway's 25 s cap).
const MAX_WAIT: Duration = Duration::from_secs(20);
/// Shortest hold a long-poll request asks for (the gateway answers at once when it has bytes).
const MIN_WAIT: Duration = Duration::from_millis(250);
/// Largest HTTP response head the agent reads.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Largest long-poll request body the agent sends (the gateway accepts 256 KiB).
const MAX_REQUEST_BODY: usize = 128 * 1024;
/// Largest long-poll response body the agent accepts.
const MAX_RESPONSE_BODY: usize = 2 << 20;

/// Opens the carrier of `rung` (TCP, CONNECT tunnel or long-poll) within `deadline`.
/// TLS (and the Upgrade request) come after, in [`handshake`] and [`http_upgrade`].
pub fn open(rung: Rung, t: &Target, deadline: &Deadline) -> io::Result<Pipe> {
    match rung {
        Rung::Native => Ok(Pipe::Tcp(tcp(&t.hostport(t.port), deadline)?)),
        Rung::Port443 | Rung::Upgrade => Ok(Pipe::Tcp(tcp(&t.hostport(t.alt_port), deadline)?)),
        Rung::Connect => {
            let p = t
                .proxy
                .as_ref()
                .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "no proxy configured"))?;
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
        }))),
    }
}

fn tcp(addr: &str, deadline: &Deadline) -> io::Result<TcpStream> {
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{addr} resolves to nothing"),
    );
    for a in addr.to_socket_addrs()? {
        let left = deadline.check(&format!("connect {a}"))?;
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = io::Error::new(e.kind(), format!("connect {a}: {e}")),
        }
    }
    Err(last)
}

/// Reads an HTTP response head byte by byte (so no tunnel byte after it is consumed).
fn read_head(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(256);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "HTTP response head too large",
            ));
        }
        match r.read(&mut b)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before a complete HTTP response head",
                ))
            }
            _ => head.push(b[0]),
        }
    }
    Ok(head)
}

/// A parsed response head: status, `Content-Length`, session token.
struct ResponseHead {
    status: u16,
    content_length: Option<usize>,
    session: Option<String>,
}

fn parse_response(head: &[u8]) -> io::Result<ResponseHead> {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut fields);
    match r.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed HTTP response",
            ))
        }
    }
    let field = |name: &str| {
        r.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(|v| v.trim().to_string())
    };
    Ok(ResponseHead {
        status: r.code.unwrap_or(0),
        content_length: field("Content-Length").and_then(|v| v.parse().ok()),
        session: field("X-Fleetcast-Session"),
    })
}

/// Asks the proxy for a tunnel to `target`; `Ok` once it answered 2xx.
fn connect_tunnel(
    s: &mut TcpStream,
    target: &str,
    p: &Proxy,
    deadline: &Deadline,
) -> io::Result<()> {
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = &p.auth {
        req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    s.set_write_timeout(Some(deadline.check("CONNECT")?))?;
    s.write_all(req.as_bytes())?;
    s.set_read_timeout(Some(deadline.check("CONNECT")?))?;
    let head = read_head(s)?;
    let r = parse_response(&head)?;
    if !(200..300).contains(&r.status) {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("the proxy refused CONNECT {target}: HTTP {}", r.status),
        ));
    }
    Ok(())
}

/// Completes the TLS handshake over `pipe` within `deadline`.
pub fn handshake(
    tls: &mut ClientConnection,
    pipe: &mut Pipe,
    deadline: &Deadline,
) -> io::Result<()> {
    loop {
        pipe.set_write_timeout(Some(deadline.check("TLS handshake")?))?;
        while tls.wants_write() {
            tls.write_tls(pipe)?;
        }
        if !tls.is_handshaking() {
            return Ok(());
        }
        pipe.set_read_timeout(Some(deadline.check("TLS handshake")?))?;
        match tls.read_tls(pipe) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed during the TLS handshake",
                ))
            }
            Ok(_) => {
                tls.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Sends `GET /fleetcast` with `Upgrade: fleetcast` inside TLS and waits for `101`.
pub fn http_upgrade(
    tls: &mut ClientConnection,
    pipe: &mut Pipe,
    host: &str,
    deadline: &Deadline,
) -> io::Result<()> {
    let req = format!(
        "GET /fleetcast HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: fleetcast\r\n\r\n"
    );
    tls.writer().write_all(req.as_bytes())?;
    let mut plain = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        pipe.set_write_timeout(Some(deadline.check("Upgrade")?))?;
        while tls.wants_write() {
            tls.write_tls(pipe)?;
        }
        if let Some(end) = plain.windows(4).position(|w| w == b"\r\n\r\n") {
            if end + 4 != plain.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bytes after the 101 answer",
                ));
            }
            let r = parse_response(&plain)?;
            if r.status != 101 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("the gateway refused the Upgrade: HTTP {}", r.status),
                ));
            }
            return Ok(());
        }
        if plain.len() > MAX_RESPONSE_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "HTTP response head too large",
            ));
        }
        pipe.set_read_timeout(Some(deadline.check("Upgrade")?))?;
        match tls.read_tls(pipe) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the Upgrade answer",
                ))
            }
            Ok(_) => {
                let st = tls
                    .process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
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
            Err(e) => return Err(e),
        }
    }
}

/// The client end of the long-poll rung: writes are buffered; a read with nothing buffered
/// performs one exchange (`POST` carrying the buffered bytes; the gateway may hold it up to
/// the read timeout when it has nothing to send). A read that got nothing returns
/// `WouldBlock`; a closed session (`410`) reads as end of stream.
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
}

impl LongPoll {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.inbox.len() && !self.closed {
            self.exchange()?;
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
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "long-poll: nothing yet",
        ))
    }

    fn exchange(&mut self) -> io::Result<()> {
        let via = self.proxy.as_ref().map_or(&self.target, |p| &p.addr);
        let deadline = Deadline::after(epoch(), self.connect_timeout);
        let mut s = tcp(via, &deadline)?;
        // Bodies stay well under the gateway's limit; while more is queued, ask for no hold.
        let chunk = self.outbox.len().min(MAX_REQUEST_BODY);
        let wait = if self.outbox.len() > chunk {
            Duration::ZERO
        } else {
            self.wait
        };
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        s.set_read_timeout(Some(wait + Duration::from_secs(10)))?;
        let uri = match &self.proxy {
            Some(_) => format!("http://{}/fleetcast/poll", self.target),
            None => "/fleetcast/poll".to_string(),
        };
        let mut req = format!(
            "POST {uri} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nX-Fleetcast-Wait: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.target,
            chunk,
            wait.as_millis()
        );
        if let Some(t) = &self.token {
            req.push_str(&format!("X-Fleetcast-Session: {t}\r\n"));
        }
        if let Some(a) = self.proxy.as_ref().and_then(|p| p.auth.as_ref()) {
            req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        let mut msg = req.into_bytes();
        msg.extend_from_slice(&self.outbox[..chunk]);
        s.write_all(&msg)?;
        let head = read_head(&mut s)?;
        let r = parse_response(&head)?;
        match r.status {
            200 => {
                let len = r.content_length.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "long-poll: no Content-Length")
                })?;
                if len > MAX_RESPONSE_BODY {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "long-poll: response too large",
                    ));
                }
                let mut body = vec![0u8; len];
                s.read_exact(&mut body)?;
                if self.token.is_none() {
                    self.token = Some(r.session.ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "long-poll: no session token")
                    })?);
                }
                self.outbox.drain(..chunk);
                self.inbox = body;
                self.pos = 0;
                Ok(())
            }
            410 => {
                self.closed = true;
                self.outbox.clear();
                Ok(())
            }
            code => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("long-poll: HTTP {code}"),
            )),
        }
    }
}

/// The process-wide epoch for deadlines made inside the carriers.
pub(crate) fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    #[allow(clippy::disallowed_methods)] // The agent's one epoch for carrier deadlines.
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// The winning rung per network, in the state directory (`ladder`, one `KEY RUNG` line per
/// network). Losing the file only costs a full climb.
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

    /// The rung that won last time on `network`.
    pub fn get(&self, network: &str) -> Option<Rung> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        text.lines().find_map(|l| {
            let (k, r) = l.rsplit_once(' ')?;
            (k == network).then(|| Rung::parse(r)).flatten()
        })
    }

    /// Records the winner on `network` (atomic replace).
    pub fn set(&self, network: &str, rung: Rung) -> io::Result<()> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut out: String = text
            .lines()
            .filter(|l| l.rsplit_once(' ').is_some_and(|(k, _)| k != network))
            .map(|l| format!("{l}\n"))
            .collect();
        out.push_str(&format!("{network} {}\n", rung.name()));
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, out)?;
        std::fs::rename(&tmp, &self.path)
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
    fn names_round_trip_and_rank() {
        for (i, r) in LADDER.into_iter().enumerate() {
            assert_eq!(Rung::parse(r.name()), Some(r));
            assert_eq!(r.rank(), i);
        }
        assert_eq!(Rung::parse("carrier-pigeon"), None);
    }

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
                let head = String::from_utf8(read_head(&mut c).unwrap()).unwrap();
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

    #[test]
    fn deadlines_expire() {
        let d = Deadline::after(epoch(), Duration::ZERO);
        assert!(d.expired());
        assert!(d.check("x").is_err());
        let d = Deadline::after(epoch(), Duration::from_secs(60));
        assert!(!d.expired());
    }
}
