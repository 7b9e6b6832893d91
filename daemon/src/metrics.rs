//! Metrics: what the gateway counts, its Prometheus text rendering, and the small HTTP
//! endpoint (`admin.metrics_listen`) that serves it inside the gateway's `mio` loop.
//!
//! Invariants:
//! - A scrape reads the store through one snapshot (one consistent commit) plus the loop's
//!   in-memory counters; it never writes.
//! - Counters (`*_total`) only grow while the gateway runs and restart at 0 with it; gauges
//!   are read at scrape time.
//! - The endpoint answers `GET /metrics` only (404 for other paths, 405 for other methods,
//!   400 for malformed requests, 431 past [`MAX_HEAD`] bytes of request head), one request
//!   per connection, then closes. At most [`MAX_CONNS`] connections are open: one more
//!   evicts the oldest, so a client that never sends cannot hold the endpoint; and a
//!   connection is closed [`IDLE`] after it was accepted whatever it did (a scraper that
//!   reads its answer slowly, or a client that sends a byte a minute, holds a slot no longer).
//! - The endpoint has no authentication: bind it to loopback or a management network.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};

use fleetcast_store::prelude::*;
use fleetcast_store::QueueStatus;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use fleetcast_wire::Instant;
use std::time::Duration;

use crate::distribution::McastTotals;
use crate::token::Tok;

/// Most connections open at once.
pub const MAX_CONNS: usize = 16;
/// How long a connection may stay open from its accept (request, answer and all); a scrape
/// takes milliseconds.
pub const IDLE: Duration = Duration::from_secs(10);
/// Largest request head read.
pub const MAX_HEAD: usize = 8 * 1024;

/// Counters the gateway loop keeps (since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Commands sent to devices (each transmission, retries included).
    pub dispatched: u64,
    /// Command results received from devices (each completes a command attempt).
    pub results: u64,
    /// Admin requests served.
    pub admin_requests: u64,
}

/// The gateway state a scrape reports besides the store.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    /// Devices with an authenticated session now.
    pub sessions: usize,
    /// Open connections of every kind (agents, admin, artifact downloads).
    pub connections: usize,
    /// Loop counters.
    pub counters: Counters,
    /// Multicast counters (`None`: multicast is off).
    pub mcast: Option<McastTotals>,
}

/// One metric family: a name, its help and type, and its samples (label pairs, value).
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// Metric name.
    pub name: &'static str,
    /// `# HELP` text.
    pub help: &'static str,
    /// `counter` or `gauge`.
    pub kind: &'static str,
    /// Samples: labels and value.
    pub samples: Vec<(Vec<(&'static str, String)>, u64)>,
}

fn one(name: &'static str, kind: &'static str, help: &'static str, v: u64) -> Family {
    Family {
        name,
        help,
        kind,
        samples: vec![(vec![], v)],
    }
}

/// Every queue state's label value, in a fixed order (each is reported, 0 included).
const QUEUE_STATES: [(QueueStatus, &str); 7] = [
    (QueueStatus::Idle, "idle"),
    (QueueStatus::Running, "running"),
    (QueueStatus::AwaitingResult, "awaiting_result"),
    (QueueStatus::Rebooting, "rebooting"),
    (QueueStatus::Paused, "paused"),
    (QueueStatus::Failed, "failed"),
    (QueueStatus::Done, "done"),
];

/// Gathers every metric: the store through one snapshot, the rest from `live`.
pub fn gather(store: &dyn Engine, live: &Live) -> Result<Vec<Family>, fleetcast_store::Error> {
    let snap = store.snapshot()?;
    let devices = snap.devices()?;
    let revoked = devices.iter().filter(|d| d.revoked).count() as u64;
    let mut queues = [0u64; QUEUE_STATES.len()];
    let mut pending = 0u64;
    for (_, q) in snap.queues()? {
        if let Some(i) = QUEUE_STATES.iter().position(|(s, _)| *s == q.status) {
            queues[i] += 1;
        }
        pending += q
            .next_seq
            .saturating_sub(1)
            .saturating_sub(q.completed_through);
    }
    let (receivers, active, finished) = task_counts(&*snap)?;
    let c = live.counters;
    let mut out = vec![
        Family {
            name: "fleetcast_build_info",
            help: "Always 1; the version label is the gateway's.",
            kind: "gauge",
            samples: vec![(vec![("version", env!("CARGO_PKG_VERSION").into())], 1)],
        },
        one(
            "fleetcast_sessions_connected",
            "gauge",
            "Devices with an authenticated session.",
            live.sessions as u64,
        ),
        one(
            "fleetcast_connections",
            "gauge",
            "Open connections (agents, admin clients, artifact downloads).",
            live.connections as u64,
        ),
        Family {
            name: "fleetcast_devices",
            help: "Enrolled devices, by whether they are revoked.",
            kind: "gauge",
            samples: vec![
                (
                    vec![("state", "active".into())],
                    devices.len() as u64 - revoked,
                ),
                (vec![("state", "revoked".into())], revoked),
            ],
        },
        Family {
            name: "fleetcast_queues",
            help: "Device command queues by state.",
            kind: "gauge",
            samples: QUEUE_STATES
                .iter()
                .zip(queues)
                .map(|((_, l), n)| (vec![("state", (*l).into())], n))
                .collect(),
        },
        one(
            "fleetcast_commands_pending",
            "gauge",
            "Commands queued and not completed, over every queue.",
            pending,
        ),
        one(
            "fleetcast_commands_dispatched_total",
            "counter",
            "Command transmissions to devices since the gateway started (retries included).",
            c.dispatched,
        ),
        one(
            "fleetcast_commands_completed_total",
            "counter",
            "Command results received from devices since the gateway started.",
            c.results,
        ),
        one(
            "fleetcast_admin_requests_total",
            "counter",
            "Admin requests served since the gateway started.",
            c.admin_requests,
        ),
        Family {
            name: "fleetcast_tasks",
            help: "Distribution tasks: active (a receiver pending or in progress) or finished.",
            kind: "gauge",
            samples: vec![
                (vec![("state", "active".into())], active),
                (vec![("state", "finished".into())], finished),
            ],
        },
        Family {
            name: "fleetcast_task_receivers",
            help: "Receivers of every task, by state.",
            kind: "gauge",
            samples: receivers
                .into_iter()
                .map(|(l, n)| (vec![("state", l.to_string())], n))
                .collect(),
        },
    ];
    out.extend(mcast_families(live.mcast));
    Ok(out)
}

/// Receivers of every task by state, and how many tasks are active (a receiver pending or
/// in progress) and finished.
fn task_counts(
    snap: &dyn Reads,
) -> Result<(BTreeMap<&'static str, u64>, u64, u64), fleetcast_store::Error> {
    // The label values are `TaskDeviceStatus::name()`s.
    let mut receivers: BTreeMap<&'static str, u64> = [
        ("pending", 0),
        ("in_progress", 0),
        ("completed", 0),
        ("failed", 0),
        ("cancelled", 0),
    ]
    .into_iter()
    .collect();
    let (mut active, mut finished) = (0u64, 0u64);
    for (id, _) in snap.tasks()? {
        let mut incomplete = false;
        for (_, st) in snap.task_statuses(id)? {
            incomplete |= st.is_incomplete();
            *receivers.entry(st.name()).or_default() += 1;
        }
        if incomplete {
            active += 1;
        } else {
            finished += 1;
        }
    }
    Ok((receivers, active, finished))
}

/// The multicast sender's families (zeros when multicast is off).
fn mcast_families(mcast: Option<McastTotals>) -> Vec<Family> {
    let m = mcast.unwrap_or_default();
    vec![
        one(
            "fleetcast_mcast_enabled",
            "gauge",
            "1 when multicast distribution is configured (mcast.addr).",
            u64::from(mcast.is_some()),
        ),
        one(
            "fleetcast_mcast_distributions_active",
            "gauge",
            "Multicast senders running now.",
            m.live,
        ),
        one(
            "fleetcast_mcast_distributions_finished_total",
            "counter",
            "Multicast senders that have ended.",
            m.finished,
        ),
        one(
            "fleetcast_mcast_bytes_sent_total",
            "counter",
            "Datagram bytes sent by multicast senders (multicast and unicast repairs).",
            m.bytes,
        ),
        one(
            "fleetcast_mcast_goodput_bytes_total",
            "counter",
            "File bytes multicast in first passes (rate() of it is the goodput).",
            m.goodput_bytes,
        ),
        one(
            "fleetcast_mcast_first_pass_blocks_total",
            "counter",
            "Blocks multicast in first passes.",
            m.first_pass_blocks,
        ),
        Family {
            name: "fleetcast_mcast_repairs_total",
            help: "Blocks sent again as repairs, by transport.",
            kind: "counter",
            samples: vec![
                (vec![("kind", "multicast".into())], m.multicast_repairs),
                (vec![("kind", "unicast".into())], m.unicast_repairs),
                (vec![("kind", "parity".into())], m.parity_symbols),
            ],
        },
        one(
            "fleetcast_mcast_nacks_total",
            "counter",
            "NACKs received (valid tag, live task).",
            m.nacks,
        ),
        one(
            "fleetcast_mcast_nacks_ignored_total",
            "counter",
            "NACKs the sender ignored (unknown, demoted or finished receiver).",
            m.nacks_ignored,
        ),
        one(
            "fleetcast_mcast_demotions_total",
            "counter",
            "Receivers demoted from multicast.",
            m.demoted,
        ),
    ]
}

/// Renders families in the Prometheus text exposition format (version 0.0.4).
pub fn render(families: &[Family]) -> String {
    let mut s = String::new();
    for f in families {
        let _ = writeln!(s, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(s, "# TYPE {} {}", f.name, f.kind);
        for (labels, v) in &f.samples {
            s.push_str(f.name);
            if !labels.is_empty() {
                s.push('{');
                for (i, (k, val)) in labels.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    let esc = val
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    let _ = write!(s, "{k}=\"{esc}\"");
                }
                s.push('}');
            }
            let _ = writeln!(s, " {v}");
        }
    }
    s
}

/// The samples as a JSON object `{"name{label=\"v\"}": value}` (for `fleetcast metrics
/// --json`).
pub fn to_json(families: &[Family]) -> serde_json::Value {
    let text = render(families);
    let map: serde_json::Map<String, serde_json::Value> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse::<u64>().ok()?.into())))
        .collect();
    serde_json::Value::Object(map)
}

struct Conn {
    sock: TcpStream,
    head: Vec<u8>,
    out: Vec<u8>,
    answered: bool,
    writable: bool,
    /// Accept order, for eviction.
    serial: u64,
    /// Closed at this instant, whatever state it is in ([`IDLE`] after its accept).
    deadline: Instant,
}

/// The HTTP endpoint: a listener and its connections, driven by the gateway loop.
pub struct Server {
    listener: TcpListener,
    conns: slab::Slab<Conn>,
    serial: u64,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("metrics::Server")
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

/// What a request asks of the gateway.
enum Ask {
    /// Nothing yet (need more bytes, or done).
    Nothing,
    /// Render the metrics into this connection.
    Metrics,
}

impl Server {
    /// Binds `addr` and registers the listener.
    pub fn bind(addr: std::net::SocketAddr, registry: &Registry) -> io::Result<Server> {
        let mut listener = TcpListener::bind(addr)?;
        registry.register(
            &mut listener,
            Tok::MetricsListener.encode(),
            Interest::READABLE,
        )?;
        Ok(Server {
            listener,
            conns: slab::Slab::new(),
            serial: 0,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Handles a readiness event of one of the endpoint's tokens; `render` produces the
    /// metrics text when a complete `GET /metrics` has arrived.
    pub fn handle(
        &mut self,
        registry: &Registry,
        token: Token,
        now: Instant,
        render: impl FnOnce() -> String,
    ) {
        let idx = match Tok::decode(token) {
            Tok::MetricsConn(idx) => idx,
            Tok::MetricsListener => {
                self.accept(registry, now);
                return;
            }
            _ => return,
        };
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        let ask = if c.answered {
            Ask::Nothing
        } else {
            read_request(c)
        };
        if let Ask::Metrics = ask {
            let body = render();
            respond(
                c,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            );
        }
        let done = flush(c);
        if done {
            self.close(registry, idx);
        } else if let Some(c) = self.conns.get_mut(idx) {
            let want = !c.out.is_empty();
            if want != c.writable {
                let interest = if want {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                let _ = registry.reregister(&mut c.sock, token, interest);
                c.writable = want;
            }
        }
    }

    /// The earliest connection deadline, for the loop's poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.iter().map(|(_, c)| c.deadline).min()
    }

    /// Closes the connections whose deadline passed (at most [`MAX_CONNS`] to look at).
    pub fn expire(&mut self, registry: &Registry, now: Instant) {
        let due: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(i, _)| i)
            .collect();
        for idx in due {
            tracing::debug!(idx, "metrics connection closed: open for {IDLE:?}");
            self.close(registry, idx);
        }
    }

    fn accept(&mut self, registry: &Registry, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((mut sock, _)) => {
                    if self.conns.len() >= MAX_CONNS {
                        let oldest = self
                            .conns
                            .iter()
                            .min_by_key(|(_, c)| c.serial)
                            .map(|(i, _)| i);
                        if let Some(i) = oldest {
                            self.close(registry, i);
                        }
                    }
                    let entry = self.conns.vacant_entry();
                    let token = Tok::MetricsConn(entry.key()).encode();
                    if registry
                        .register(&mut sock, token, Interest::READABLE)
                        .is_err()
                    {
                        continue;
                    }
                    self.serial += 1;
                    entry.insert(Conn {
                        sock,
                        head: Vec::new(),
                        out: Vec::new(),
                        answered: false,
                        writable: false,
                        serial: self.serial,
                        deadline: now + IDLE,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    return;
                }
            }
        }
    }

    fn close(&mut self, registry: &Registry, idx: usize) {
        if let Some(mut c) = self.conns.try_remove(idx) {
            let _ = registry.deregister(&mut c.sock);
        }
    }
}

/// Reads what is available; decides the answer once the head is complete.
fn read_request(c: &mut Conn) -> Ask {
    let mut buf = [0u8; 2048];
    let mut eof = false;
    loop {
        match c.sock.read(&mut buf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                c.head.extend_from_slice(&buf[..n]);
                if c.head.len() > MAX_HEAD {
                    respond(c, "431 Request Header Fields Too Large", "text/plain", "");
                    return Ask::Nothing;
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
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&c.head) {
        Ok(httparse::Status::Complete(_)) => {
            if let Some(reason) = crate::http::repeated_field(req.headers) {
                respond(c, "400 Bad Request", "text/plain", reason);
                return Ask::Nothing;
            }
            let path = req.path.unwrap_or("");
            let path = path.split('?').next().unwrap_or("");
            match (req.method, path) {
                (Some("GET"), "/metrics") => return Ask::Metrics,
                (Some("GET"), _) => respond(c, "404 Not Found", "text/plain", "GET /metrics\n"),
                _ => respond(c, "405 Method Not Allowed", "text/plain", "GET /metrics\n"),
            }
        }
        Ok(httparse::Status::Partial) if !eof => {}
        Ok(httparse::Status::Partial) => c.answered = true, // Gone before a whole request.
        Err(_) => respond(c, "400 Bad Request", "text/plain", "GET /metrics\n"),
    }
    Ask::Nothing
}

fn respond(c: &mut Conn, status: &str, ctype: &str, body: &str) {
    let allow = if status.starts_with("405") {
        "Allow: GET\r\n"
    } else {
        ""
    };
    c.out = format!(
        "HTTP/1.1 {status}\r\n{allow}Content-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    c.answered = true;
    c.head = Vec::new();
}

/// Writes pending bytes; returns whether the connection is finished (answered and flushed,
/// or broken).
fn flush(c: &mut Conn) -> bool {
    while !c.out.is_empty() {
        match c.sock.write(&c.out) {
            Ok(0) => return true,
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
    c.answered
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_store::Store;

    /// One request through `read_request` over a real loopback socket.
    fn ask(request: &[u8]) -> (bool, String) {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        client.write_all(request).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let (sock, _) = l.accept().unwrap();
        sock.set_nonblocking(true).unwrap();
        let mut c = Conn {
            sock: TcpStream::from_std(sock),
            head: Vec::new(),
            out: Vec::new(),
            answered: false,
            writable: false,
            serial: 0,
            deadline: Instant::ZERO + IDLE,
        };
        let mut metrics = false;
        for _ in 0..200 {
            metrics = matches!(read_request(&mut c), Ask::Metrics);
            if metrics || c.answered {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        (metrics, String::from_utf8_lossy(&c.out).into_owned())
    }

    #[test]
    fn a_repeated_content_length_is_refused() {
        let (metrics, out) = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(metrics, "{out}");
        let (metrics, out) =
            ask(b"GET /metrics HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 3\r\n\r\n");
        assert!(!metrics);
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        assert!(out.ends_with("duplicate Content-Length header"), "{out}");
    }

    #[test]
    fn renders_the_text_format() {
        let f = vec![
            one("a_total", "counter", "A things.", 3),
            Family {
                name: "b",
                help: "B by state.",
                kind: "gauge",
                samples: vec![
                    (vec![("state", "x".into())], 1),
                    (vec![("state", "q\"\\\n".into())], 2),
                ],
            },
        ];
        assert_eq!(
            render(&f),
            "# HELP a_total A things.\n# TYPE a_total counter\na_total 3\n\
             # HELP b B by state.\n# TYPE b gauge\nb{state=\"x\"} 1\nb{state=\"q\\\"\\\\\\n\"} 2\n"
        );
        let j = to_json(&f);
        assert_eq!(j["a_total"], 3);
        assert_eq!(j["b{state=\"x\"}"], 1);
    }

    #[test]
    fn gathers_every_queue_state_from_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let live = Live {
            sessions: 2,
            counters: Counters {
                dispatched: 5,
                ..Counters::default()
            },
            ..Live::default()
        };
        let text = render(&gather(&store, &live).unwrap());
        for (_, s) in QUEUE_STATES {
            assert!(
                text.contains(&format!("fleetcast_queues{{state=\"{s}\"}} 0\n")),
                "{text}"
            );
        }
        assert!(text.contains("fleetcast_sessions_connected 2\n"));
        assert!(text.contains("fleetcast_commands_dispatched_total 5\n"));
        assert!(text.contains("fleetcast_mcast_enabled 0\n"));
    }
}
