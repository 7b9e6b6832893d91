//! The gateway's limits against hostile local clients, with a real `fleetcastd` on
//! 127.0.0.1 (every byte stays on the loopback interface):
//!
//! - an admin request line over the size limit is refused with an error line and not
//!   executed, and the connection goes on serving the next line;
//! - a gateway with only 256 descriptors, its agent port and artifact port flooded with idle
//!   and slow connections, still serves the CLI and lets an enrolled agent in, never runs
//!   out of descriptors, and closes idle and slow artifact connections at their deadline;
//! - 200 TLS clients without a certificate, each sending most of a maximum frame, are cut
//!   at the frame header with a logged reason, and the gateway's memory stays small (the
//!   figures are printed; the bound asserted is generous);
//! - a store with a large event log and many results is pruned to the `[store]` retention
//!   settings once the gateway runs;
//! - bad enrolment tokens from one source (127.0.0.2) are refused with a rate-limit reason
//!   after the burst, without a disk sync each, while a good token from another source
//!   (127.0.0.1) still enrols.

mod common;

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetcast_daemon::admin::{self, Request};

#[test]
fn agent_role() {
    common::agent_role();
}

/// A `fleetcastd` on 127.0.0.1, killed and reaped on drop.
struct Gw {
    child: Child,
    data: PathBuf,
    stderr: PathBuf,
    /// The agent listener (`ready ADDR`).
    addr: String,
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gw {
    /// Starts `fleetcastd` with its data directory under `dir` and `extra` arguments;
    /// `setup` may adjust the command (e.g. resource limits) before it is spawned.
    fn start(dir: &Path, extra: &[&str], setup: impl FnOnce(&mut Command)) -> Gw {
        let data = dir.join("gw");
        let stderr = dir.join("gw.stderr");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetcastd"));
        cmd.arg("--data-dir")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        setup(&mut cmd);
        let mut child = cmd.spawn().expect("spawn fleetcastd");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        let addr = match line.trim().strip_prefix("ready ") {
            Some(a) => a.to_string(),
            None => {
                let _ = child.kill();
                panic!(
                    "fleetcastd did not start: {line:?}\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        };
        Gw {
            child,
            data,
            stderr,
            addr,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn admin(&self, r: &Request) -> serde_json::Value {
        let resp = admin::request(&self.data, r).expect("admin request");
        assert!(resp.ok, "{r:?}: {:?}\n{}", resp.error, self.log());
        resp.data
    }

    /// The messages of the event log.
    fn event_messages(&self) -> Vec<String> {
        self.admin(&Request::Events {
            from: 0,
            limit: 10_000,
        })["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter_map(|e| e["message"].as_str().map(str::to_string))
            .collect()
    }

    /// The names `device add` issued tokens for (from the event log).
    fn tokens_issued(&self) -> Vec<String> {
        self.event_messages()
            .iter()
            .filter_map(|m| m.strip_prefix("enrolment token issued for "))
            .map(str::to_string)
            .collect()
    }
}

/// The clock of the tests' deadlines.
#[allow(clippy::disallowed_methods)] // Test deadlines, not protocol time.
fn now() -> Instant {
    Instant::now()
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout`.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    diag: impl FnOnce() -> String,
) -> T {
    let start = now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}\n{}",
            diag()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Open descriptors of process `pid`.
fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A child killed and reaped on drop.
struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `fleetcast-agent` (this test binary in the harness's agent role) against `gw`, native TLS
/// only, its state in `dir`; `token` enrols it.
fn agent(gw: &Gw, dir: &Path, token: Option<&str>) -> Kill {
    let boot = dir.join("boot_id");
    std::fs::write(&boot, "0f0e0d0c-0b0a-4908-8706-050403020100\n").expect("boot id");
    let mut args = vec![
        "--gateway".to_string(),
        gw.addr.clone(),
        "--rungs".into(),
        "native".into(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--ca".into(),
        gw.data.join("pki/ca.pem").display().to_string(),
        "--boot-id-file".into(),
        boot.display().to_string(),
    ];
    if let Some(t) = token {
        args.extend(["--token".into(), t.into(), "--name".into(), "n1".into()]);
    }
    let mut c = common::agent_command(&args);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .expect("agent log");
    c.stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    Kill(c.spawn().expect("spawn agent"))
}

/// `n` connections to `addr`, started without waiting for them to complete (non-blocking
/// connects: the ones the kernel's backlog cannot take yet keep retrying their SYN, as a
/// flooder's would).
fn flood(addr: &str, n: usize) -> Vec<TcpStream> {
    let addr: std::net::SocketAddr = addr.parse().expect("addr");
    (0..n)
        .map(|_| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.set_nonblocking(true).expect("nonblocking");
            match s.connect(&addr.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => panic!("connect: {e}"),
            }
            TcpStream::from(s)
        })
        .collect()
}

/// A completed connection to `addr`.
fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr.parse().expect("addr"), Duration::from_secs(5))
        .expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Whether the peer closed `s` (EOF or reset) by now, without waiting.
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).expect("nonblocking");
    let mut b = [0u8; 512];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            // Still connecting (in the backlog's SYN retries) or open.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

#[test]
fn floods_leave_descriptors_for_the_cli_and_enrolled_agents() {
    const LIMIT: u64 = 256;
    const AGENT_FLOOD: usize = 400;
    const ARTIFACT_IDLE: usize = 250;
    const ARTIFACT_SLOW: usize = 50;
    let tmp = tempfile::tempdir().expect("tempdir");
    let art = format!("127.0.0.1:{}", free_port());
    let gw = Gw::start(
        tmp.path(),
        &["--artifact-listen", &art, "--http-timeout", "2"],
        |c| {
            // SAFETY: between fork and exec only the async-signal-safe setrlimit runs.
            unsafe {
                c.pre_exec(|| {
                    let r = libc::rlimit {
                        rlim_cur: LIMIT,
                        rlim_max: LIMIT,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    let pid = gw.child.id();
    let diag = || {
        format!(
            "gateway descriptors: {}\n--- gateway stderr ---\n{}\n--- agent ---\n{}",
            fds_of(pid),
            gw.log(),
            std::fs::read_to_string(tmp.path().join("agent.log")).unwrap_or_default()
        )
    };
    // An enrolled device, stopped: its certificate is what lets it in later.
    let token = gw.admin(&Request::DeviceAdd {
        name: "n1".into(),
        groups: vec![],
    })["token"]
        .as_str()
        .expect("token")
        .to_string();
    let online = || {
        let st = admin::request(&gw.data, &Request::Status).ok()?;
        (st.ok && st.data["online"] == 1).then_some(())
    };
    let enrolling = agent(&gw, tmp.path(), Some(&token));
    wait_for("the agent to enrol", Duration::from_secs(60), online, diag);
    drop(enrolling);
    wait_for(
        "the agent to go offline",
        Duration::from_secs(30),
        || {
            let st = admin::request(&gw.data, &Request::Status).ok()?;
            (st.ok && st.data["online"] == 0).then_some(())
        },
        diag,
    );

    // The flood, all from 127.0.0.1: idle connections to the agent port; idle ones and
    // 1-byte-per-half-second ones to the artifact port. Far more than the gateway's 256
    // descriptors; the kernel's backlog holds what the gateway does not accept.
    let start = now();
    let mut agent_flood = flood(&gw.addr, AGENT_FLOOD);
    let mut idle = flood(&art, ARTIFACT_IDLE);
    let mut slow = flood(&art, ARTIFACT_SLOW);
    eprintln!(
        "flood: {} agent-port, {} idle and {} slow artifact-port connections started in {:?}",
        agent_flood.len(),
        idle.len(),
        slow.len(),
        start.elapsed()
    );
    let mut max_fds = 0;
    let request = b"GET /nothing HTTP/1.1\r\nHost: gw\r\n\r\n";
    let trickle = |slow: &mut Vec<TcpStream>, i: usize| {
        for s in slow.iter_mut() {
            let _ = s.write(&request[i % request.len()..][..1]);
        }
    };

    // The CLI gets in while the flood is on.
    let t = now();
    let st = gw.admin(&Request::Status);
    eprintln!("CLI answered in {:?} during the flood: {st}", t.elapsed());
    // The enrolled agent gets in while the flood is on.
    let _agent = agent(&gw, tmp.path(), None);
    let t = now();
    let mut i = 0;
    wait_for(
        "the enrolled agent to get in during the flood",
        Duration::from_secs(30),
        || {
            i += 1;
            trickle(&mut slow, i);
            max_fds = max_fds.max(fds_of(pid));
            online()
        },
        diag,
    );
    eprintln!("enrolled agent online {:?} after its start", t.elapsed());
    // Every flood connection of the artifact port, idle or slow, is closed by the gateway:
    // at its 2 s deadline or earlier, evicted to make room for newer ones.
    let t = now();
    wait_for(
        "the gateway to close every flood connection of the artifact port",
        Duration::from_secs(30),
        || {
            i += 1;
            trickle(&mut slow, i);
            max_fds = max_fds.max(fds_of(pid));
            idle.retain_mut(|s| !closed_by_peer(s));
            slow.retain_mut(|s| !closed_by_peer(s));
            if i % 40 == 0 {
                eprintln!("{} idle and {} slow still open", idle.len(), slow.len());
            }
            (idle.is_empty() && slow.is_empty()).then_some(())
        },
        diag,
    );
    eprintln!("artifact flood closed {:?} later", t.elapsed());
    assert!(
        max_fds < LIMIT as usize,
        "the gateway reached its descriptor limit: {max_fds}\n{}",
        diag()
    );
    eprintln!("gateway descriptors at most {max_fds} of {LIMIT}");
    assert_eq!(
        gw.admin(&Request::Status)["online"],
        1,
        "still online\n{}",
        diag()
    );

    // Without pressure, an idle and a slow artifact connection last until their deadline
    // (2 s), not longer.
    let mut idle = connect(&art);
    let mut slow = connect(&art);
    let t = now();
    let mut sent = 0;
    let (mut idle_closed, mut slow_closed) = (None, None);
    wait_for(
        "the deadline of an idle and a slow artifact connection",
        Duration::from_secs(10),
        || {
            if t.elapsed() >= Duration::from_millis(250 * sent as u64) {
                let _ = slow.write(&request[sent % request.len()..][..1]);
                sent += 1;
            }
            if idle_closed.is_none() && closed_by_peer(&mut idle) {
                idle_closed = Some(t.elapsed());
            }
            if slow_closed.is_none() && closed_by_peer(&mut slow) {
                slow_closed = Some(t.elapsed());
            }
            idle_closed.zip(slow_closed)
        },
        diag,
    );
    eprintln!("idle closed after {idle_closed:?}, slow after {slow_closed:?}");
    for d in [idle_closed, slow_closed].into_iter().flatten() {
        assert!(
            d >= Duration::from_millis(1500) && d <= Duration::from_millis(4000),
            "{d:?}"
        );
    }
    assert!(
        gw.log().contains("artifact request not complete in time"),
        "{}",
        gw.log()
    );
    // The agent-port flood is still held open by the test: closing it now is fine.
    agent_flood.clear();
}

/// A rustls client configuration trusting `gw`'s CA, without a client certificate.
fn client_config(gw: &Gw) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(gw.data.join("pki/ca.pem")).expect("CA"))
        .expect("root");
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![fleetcast_daemon::pki::ALPN.to_vec()];
    std::sync::Arc::new(cfg)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS session to `gw` from a socket bound to `from`, handshake done.
fn tls_connect(
    gw: &Gw,
    cfg: &std::sync::Arc<rustls::ClientConfig>,
    from: std::net::Ipv4Addr,
) -> Tls {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.bind(&std::net::SocketAddr::from((from, 0)).into())
        .expect("bind the source address");
    let addr: std::net::SocketAddr = gw.addr.parse().expect("addr");
    sock.connect(&addr.into()).expect("connect");
    let sock = TcpStream::from(sock);
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let name = rustls::pki_types::ServerName::try_from(addr.ip().to_string()).expect("name");
    let conn = rustls::ClientConnection::new(cfg.clone(), name).expect("tls");
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .unwrap_or_else(|e| panic!("TLS handshake: {e}\n{}", gw.log()));
    }
    tls
}

/// Resident memory of process `pid`, bytes.
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A frame header of kind Hello announcing a `len`-byte body.
fn frame_header(len: u32) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = fleetcast_wire::MAGIC;
    h[1] = fleetcast_wire::VERSION;
    h[2] = 0x01;
    h[4..8].copy_from_slice(&len.to_be_bytes());
    h
}

#[test]
fn unauthenticated_clients_cannot_make_the_gateway_buffer_big_frames() {
    const CLIENTS: usize = 200;
    const MIB: f64 = 1024.0 * 1024.0;
    let tmp = tempfile::tempdir().expect("tempdir");
    let gw = Gw::start(tmp.path(), &[], |_| {});
    let pid = gw.child.id();
    let cfg = client_config(&gw);
    let base = rss_of(pid);
    // Most of a maximum frame from each client, over a completed handshake.
    let body = vec![0u8; 768 * 1024];
    let mut peak = base;
    let start = now();
    let mut conns = Vec::new();
    for _ in 0..CLIENTS {
        let mut t = tls_connect(&gw, &cfg, std::net::Ipv4Addr::LOCALHOST);
        let _ = t.write_all(&frame_header(fleetcast_wire::MAX_STREAM_BODY - 16));
        let _ = t.write_all(&body);
        let _ = t.flush();
        peak = peak.max(rss_of(pid));
        conns.push(t);
    }
    std::thread::sleep(Duration::from_millis(500));
    peak = peak.max(rss_of(pid));
    eprintln!(
        "{CLIENTS} clients × 768 KiB of a 1 MiB frame in {:?}: gateway RSS {:.1} MiB → peak {:.1} MiB",
        start.elapsed(),
        base as f64 / MIB,
        peak as f64 / MIB
    );
    // Each was cut at the header, with the reason in the log.
    for (i, t) in conns.iter_mut().enumerate() {
        let mut buf = [0u8; 4096];
        let deadline = now() + Duration::from_secs(20);
        loop {
            match t.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            assert!(now() < deadline, "client {i} was not closed\n{}", gw.log());
        }
    }
    let cut = gw
        .log()
        .matches("before authentication exceeds the pre-authentication limit of 4096")
        .count();
    assert!(cut >= CLIENTS, "{cut} cuts logged\n{}", gw.log());
    drop(conns);

    // Just under the pre-authentication limit, held open: what an attacker can still make
    // the gateway keep per connection.
    let base2 = rss_of(pid);
    let mut held = Vec::new();
    for _ in 0..CLIENTS {
        let mut t = tls_connect(&gw, &cfg, std::net::Ipv4Addr::LOCALHOST);
        t.write_all(&frame_header(4000)).expect("header");
        t.write_all(&[0u8; 3900]).expect("body");
        t.flush().expect("flush");
        held.push(t);
    }
    std::thread::sleep(Duration::from_millis(500));
    let held_rss = rss_of(pid);
    eprintln!(
        "{CLIENTS} clients holding 3,900 bytes of a 4,000-byte frame: gateway RSS {:.1} MiB → {:.1} MiB ({:.1} KiB per client)",
        base2 as f64 / MIB,
        held_rss as f64 / MIB,
        held_rss.saturating_sub(base2) as f64 / 1024.0 / CLIENTS as f64
    );
    // Generous bounds (before the limit: 200 such clients took a gateway from 6 to 209 MiB).
    assert!(
        peak.saturating_sub(base) < 64 << 20,
        "peak {:.1} MiB over a base of {:.1} MiB",
        peak as f64 / MIB,
        base as f64 / MIB
    );
    assert!(held_rss.saturating_sub(base2) < 64 << 20);
}

#[test]
fn the_event_log_and_results_are_pruned_to_the_retention_settings() {
    use fleetcast_store::prelude::*;
    use fleetcast_store::{Command, Event, EventKind, OnFailure};
    use fleetcast_wire::Step;
    const EVENTS: u64 = 5000;
    const COMMANDS: u64 = 300;
    let tmp = tempfile::tempdir().expect("tempdir");
    // A store that grew for a long time: 5,000 events, 300 finished commands on a device.
    {
        let mut store = fleetcast_store::Store::open(tmp.path().join("gw/store")).expect("store");
        let mut b = store.batch().expect("batch");
        let dev = b.add_device("old", [3; 32], 1).expect("device");
        for seq in 1..=COMMANDS {
            b.enqueue(
                dev,
                Command {
                    target: None,
                    steps: vec![Step::Report],
                    timeout_ms: 1000,
                    max_attempts: 1,
                    on_failure: OnFailure::Stop,
                },
            )
            .expect("enqueue");
            let attempt = b.mark_transmitted(dev, seq, 2).expect("transmitted");
            let r = fleetcast_store::Received {
                result: fleetcast_wire::CommandResult {
                    command_id: 1,
                    seq: 1,
                    attempt: 1,
                    exit_code: 0,
                    steps: vec![fleetcast_wire::StepResult {
                        status: fleetcast_wire::StepStatus::Ok,
                        exit_code: 0,
                        duration_ms: 1,
                    }],
                    output: b"ok".into(),
                    report: None,
                },
                at_ms: 3,
            };
            b.record_result(dev, seq, attempt, r).expect("result");
        }
        for i in 0..EVENTS {
            b.append_event(Event {
                time_ms: 1_000_000_000_000 + i,
                device: None,
                kind: EventKind::Other,
                message: format!("reconnect {i}"),
            })
            .expect("event");
        }
        b.commit().expect("commit");
    }
    let config = tmp.path().join("fleetcastd.toml");
    std::fs::write(
        &config,
        "[store]\nevents_keep_days = 0\nevents_max = 100\nresults_per_device = 5\n",
    )
    .expect("config");
    let gw = Gw::start(
        tmp.path(),
        &["--config", config.to_str().expect("path")],
        |_| {},
    );
    let events = || {
        gw.admin(&Request::Events {
            from: 0,
            limit: 100_000,
        })["events"]
            .as_array()
            .map_or(0, Vec::len)
    };
    wait_for(
        "the event log to be pruned to 100",
        Duration::from_secs(30),
        || (events() <= 100).then_some(()),
        || format!("{} events left\n{}", events(), gw.log()),
    );
    let seqs = || -> Vec<u64> {
        gw.admin(&Request::QueueShow {
            device: "old".into(),
        })["commands"]
            .as_array()
            .expect("commands")
            .iter()
            .filter_map(|c| c["seq"].as_u64())
            .collect()
    };
    wait_for(
        "the results to be pruned to the last 5",
        Duration::from_secs(30),
        || (seqs().len() <= 5).then_some(()),
        || format!("{:?} left\n{}", seqs(), gw.log()),
    );
    assert_eq!(seqs(), (COMMANDS - 4..=COMMANDS).collect::<Vec<_>>());
    assert!(events() >= 100, "only what is over the limit goes");
    // The newest event is still there.
    let last = gw.admin(&Request::Events {
        from: 0,
        limit: 100_000,
    })["events"]
        .as_array()
        .and_then(|e| e.last().cloned())
        .expect("an event");
    assert_eq!(
        last["message"],
        format!("reconnect {}", EVENTS - 1),
        "{last:#}"
    );
}

/// One enrolment attempt with `token` over TLS (no client certificate) from source address
/// `from`; returns how the gateway closed the session.
fn enrol_once(gw: &Gw, from: std::net::Ipv4Addr, token: &[u8]) -> fleetcast_wire::CloseInfo {
    use fleetcast_wire::session::{AgentEvent, AgentSession, FirstMessage};
    let mut tls = tls_connect(gw, &client_config(gw), from);
    let t0 = now();
    let wnow = || fleetcast_wire::Instant::from_micros(t0.elapsed().as_micros() as u64);
    let spki = [7u8; 91];
    let mut core = AgentSession::new(
        wnow(),
        fleetcast_wire::SessionConfig::default(),
        FirstMessage::Enrol(fleetcast_wire::Enrol {
            token: Cow::Borrowed(token),
            name: "intruder".into(),
            spki: Cow::Borrowed(&spki),
        }),
    )
    .expect("core");
    let mut out = Vec::new();
    while core.poll_transmit(wnow(), &mut out).is_some() {}
    tls.write_all(&out).expect("send Enrol");
    tls.flush().expect("flush");
    let mut buf = [0u8; 4096];
    loop {
        let n = match tls.read(&mut buf) {
            Ok(n) => n,
            Err(e) => panic!("reading the answer: {e}\n{}", gw.log()),
        };
        let _ = core.handle_input(wnow(), &buf[..n]);
        while let Some(ev) = core.poll_event() {
            if let AgentEvent::Closed(info) = ev {
                return info;
            }
        }
        assert!(n > 0, "closed without a Close frame\n{}", gw.log());
    }
}

#[test]
fn failed_enrolments_are_rate_limited_per_source() {
    use fleetcast_store::prelude::*;
    use fleetcast_wire::CloseCode;
    let tmp = tempfile::tempdir().expect("tempdir");
    let gw = Gw::start(tmp.path(), &[], |_| {});
    let commits = || {
        let store = fleetcast_store::Store::open(gw.data.join("store")).expect("store");
        let seq = store
            .snapshot()
            .expect("snapshot")
            .commit_seq()
            .expect("seq");
        seq
    };
    let attacker = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let before = commits();
    let mut codes = Vec::new();
    for i in 0..15u32 {
        let info = enrol_once(&gw, attacker, format!("guess-{i}").as_bytes());
        codes.push((info.code, info.reason));
    }
    let burst = fleetcast_daemon::ratelimit::BURST as usize;
    for (i, (code, reason)) in codes.iter().enumerate() {
        if i < burst {
            assert_eq!(*code, CloseCode::BAD_TOKEN, "attempt {i}: {reason}");
        } else {
            assert_eq!(*code, CloseCode::OVERLOADED, "attempt {i}: {reason}");
            assert!(reason.contains("too many failed enrolments"), "{reason}");
        }
    }
    assert_eq!(
        commits(),
        before,
        "bad tokens cost no store commit (no disk sync)"
    );
    assert!(
        gw.log()
            .contains("enrolment refused: too many failed enrolments"),
        "{}",
        gw.log()
    );
    // Another source enrols with a good token meanwhile.
    let token = gw.admin(&Request::DeviceAdd {
        name: "n1".into(),
        groups: vec![],
    })["token"]
        .as_str()
        .expect("token")
        .to_string();
    let _agent = agent(&gw, tmp.path(), Some(&token));
    wait_for(
        "the good token to enrol",
        Duration::from_secs(60),
        || {
            let st = admin::request(&gw.data, &Request::Status).ok()?;
            (st.ok && st.data["online"] == 1).then_some(())
        },
        || gw.log(),
    );
    // The attacker is still refused without reaching the store.
    let info = enrol_once(&gw, attacker, b"one-more");
    assert_eq!(info.code, CloseCode::OVERLOADED, "{info:?}");
}

/// A good token from a source the rate limit defers (`OVERLOADED`) is not refused for good:
/// the agent backs off and enrols once the source has room again.
#[test]
fn an_agent_deferred_by_the_enrolment_limit_retries_and_enrols() {
    use fleetcast_wire::CloseCode;
    let tmp = tempfile::tempdir().expect("tempdir");
    let gw = Gw::start(tmp.path(), &[], |_| {});
    // The agent's own source address, exhausted by failures before it starts.
    let source = std::net::Ipv4Addr::LOCALHOST;
    for i in 0..=fleetcast_daemon::ratelimit::BURST {
        let _ = enrol_once(&gw, source, format!("guess-{i}").as_bytes());
    }
    let info = enrol_once(&gw, source, b"one-more");
    assert_eq!(info.code, CloseCode::OVERLOADED, "{info:?}");
    let token = gw.admin(&Request::DeviceAdd {
        name: "n1".into(),
        groups: vec![],
    })["token"]
        .as_str()
        .expect("token")
        .to_string();
    let mut agent = agent(&gw, tmp.path(), Some(&token));
    let agent_log = || std::fs::read_to_string(tmp.path().join("agent.log")).unwrap_or_default();
    wait_for(
        "the deferred agent to enrol",
        Duration::from_secs(90),
        || {
            if let Ok(Some(st)) = agent.0.try_wait() {
                panic!("the agent gave up ({st}):\n{}", agent_log());
            }
            let st = admin::request(&gw.data, &Request::Status).ok()?;
            (st.ok && st.data["online"] == 1).then_some(())
        },
        || format!("{}\n--- agent ---\n{}", gw.log(), agent_log()),
    );
    assert!(
        agent_log().contains("enrolment deferred by the gateway (overloaded)"),
        "{}",
        agent_log()
    );
}

/// A metrics client that sends half a request and then nothing is closed by the gateway
/// ([`fleetcast_daemon::metrics::IDLE`] after its accept) instead of holding a slot for ever;
/// a whole scrape afterwards is answered.
#[test]
fn a_metrics_client_that_stalls_is_closed() {
    use std::io::{Read as _, Write as _};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let tmp = tempfile::tempdir().expect("tempdir");
    let gw = Gw::start(tmp.path(), &["--metrics-listen", &addr], |_| {});
    let mut stalled = std::net::TcpStream::connect(&addr).expect("connect");
    stalled.write_all(b"GET /metr").expect("half a request");
    let limit = fleetcast_daemon::metrics::IDLE + Duration::from_secs(20);
    stalled.set_read_timeout(Some(limit)).expect("timeout");
    let mut buf = [0u8; 256];
    match stalled.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("an answer to half a request: {:?}", &buf[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed within {limit:?}: {e}\n{}", gw.log()),
    }
    let mut scrape = std::net::TcpStream::connect(&addr).expect("connect");
    scrape
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    scrape.read_to_string(&mut body).expect("answer");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("fleetcast_"), "{body}");
}

/// The admin reserve is a cap too: one connection more than it is told to retry (instead of
/// taking descriptors from the agents), and the CLI works again once they are gone.
#[test]
fn admin_connections_beyond_the_reserve_are_told_to_retry() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let gw = Gw::start(tmp.path(), &[], |_| {});
    let sock = gw.data.join(admin::SOCKET_NAME);
    let held: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&sock).expect("connect"))
        .collect();
    // Each held one is accepted (a request on it is answered).
    let mut probe = held[63].try_clone().expect("clone");
    let mut line = serde_json::to_vec(&Request::DeviceList).expect("json");
    line.push(b'\n');
    probe.write_all(&line).expect("write");
    let mut answer = String::new();
    BufReader::new(probe)
        .read_line(&mut answer)
        .expect("answer");
    assert!(answer.contains("\"ok\":true"), "{answer}");
    let extra = UnixStream::connect(&sock).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut refused = String::new();
    BufReader::new(extra)
        .read_line(&mut refused)
        .expect("refusal");
    assert!(refused.contains("too many admin connections"), "{refused}");
    drop(held);
    wait_for(
        "the CLI to get in again",
        Duration::from_secs(10),
        || {
            admin::request(&gw.data, &Request::Status)
                .ok()
                .filter(|r| r.ok)
        },
        || gw.log(),
    );
}

/// `DeviceAdd NAME` as one JSON line padded with spaces (still valid JSON) to `len` bytes,
/// the newline excluded.
fn padded_device_add(name: &str, len: usize) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Request::DeviceAdd {
        name: name.into(),
        groups: vec![],
    })
    .expect("json");
    let close = line.pop().expect("closing brace");
    line.resize(len - 1, b' ');
    line.push(close);
    line
}

#[test]
fn an_admin_line_over_the_limit_is_refused_not_executed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let gw = Gw::start(tmp.path(), &[], |_| {});
    let s = UnixStream::connect(gw.data.join(admin::SOCKET_NAME)).expect("admin socket");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // One byte over the limit, then an ordinary request on the same connection.
    let mut bytes = padded_device_add("too-big", admin::MAX_REQUEST + 1);
    bytes.push(b'\n');
    bytes.extend_from_slice(&serde_json::to_vec(&Request::DeviceList).expect("json"));
    bytes.push(b'\n');
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || w.write_all(&bytes));
    let mut r = BufReader::new(s);
    let mut first = String::new();
    r.read_line(&mut first).expect("first answer");
    let mut second = String::new();
    r.read_line(&mut second).expect("second answer");
    writer
        .join()
        .expect("writer")
        .expect("the whole request was read");
    let first: admin::Response = serde_json::from_str(&first).expect("json answer");
    assert!(!first.ok, "{first:?}");
    let why = first.error.unwrap_or_default();
    assert!(
        why.contains("longer than") && why.contains("refused"),
        "{why}"
    );
    let second: admin::Response = serde_json::from_str(&second).expect("json answer");
    assert!(second.ok, "the next line is served: {second:?}");
    assert!(
        gw.log().contains("admin request line over the size limit"),
        "{}",
        gw.log()
    );
    assert_eq!(gw.tokens_issued(), Vec::<String>::new(), "nothing executed");
    // The same request under the limit is an ordinary one.
    let mut s = UnixStream::connect(gw.data.join(admin::SOCKET_NAME)).expect("admin socket");
    let mut ok = padded_device_add("fits", admin::MAX_REQUEST - 10);
    ok.push(b'\n');
    s.write_all(&ok).expect("write");
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).expect("answer");
    assert!(answer.contains("\"ok\":true"), "{answer}");
    assert_eq!(gw.tokens_issued(), ["fits"]);
}
