//! The transport ladder in the lab: real firewalls (nftables), a real proxy (tinyproxy), the
//! real gateway (host 0, listening on 7300 and on 443) and real agents.
//!
//! `every_profile_reaches_the_gateway`: one agent per network profile, all at once:
//!
//! | host | network | proxy | rung that must win |
//! |---|---|---|---|
//! | 1 | open | — | `native` |
//! | 2 | only TCP to port 443 out | — | `443` |
//! | 3 | nothing out but proxy A | A allows CONNECT to 443, Basic auth | `connect` |
//! | 4 | nothing out but proxy B | B denies CONNECT (403) | `longpoll` (forwarded by B) |
//! | 5 | nothing out but proxy C | C (in this test) answers CONNECT 200, then drops the tunnel; other requests go to B | `longpoll` |
//! | 11 | nothing out but proxy D | D (in this test) tunnels CONNECT to the gateway through the TLS handshake, then discards all the gateway sends (no `Welcome`, no close); other requests go to B | `longpoll` |
//! | 9 | open, `--rungs upgrade` | — | `upgrade` |
//! | 10 | open, `--rungs longpoll`, no proxy | — | `longpoll` (direct) |
//!
//! Blocked traffic is dropped (not rejected), so a blocked rung costs its whole timeout.
//! For each agent: it enrols and connects (the time is printed; only a generous sanity bound
//! is asserted), `fleetcast status` shows its rung, a queue `one`, `reboot`, `two` runs to
//! completion exactly once in order, and after the reboot (a new process, a new boot id) the
//! remembered rung is the first one tried and wins without failing first.
//!
//! `hostile_http_is_cut_off_while_an_agent_is_served`: malformed HTTP, oversized heads, too
//! many fields, a slowloris and an unknown long-poll session, both as plain HTTP and inside
//! TLS (the Upgrade rung), are answered with a status and cut off with a logged reason while
//! a good agent's queue completes on its one session.

// The lab harness of the daemon's tests, one file shared by both packages.
#[path = "../../daemon/tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::SocketAddrV4;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{now, read_log, sh, wait_exit, wait_for, AgentSpec, Gateway, REBOOT_EXIT};
use fleetcast_daemon::admin::OnFailureSpec;
use fleetcast_lab::{Host, Lab, LabConfig, Profile, ProxyConfig};
use fleetcast_wire::Step;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};

#[test]
fn agent_role() {
    common::agent_role();
}

const ALT: u16 = 443;
const WAIT: Duration = Duration::from_secs(120);
/// Sanity bound on connecting (enrolment plus the climb); the measured times are printed.
const CONNECT_BOUND: Duration = Duration::from_secs(90);
/// Per-rung timeout given to the agents.
const RUNG_TIMEOUT_MS: &str = "3000";

struct Case {
    name: &'static str,
    host: usize,
    want: &'static str,
    transport: &'static str,
    extra: Vec<String>,
}

/// A test-local "proxy" that accepts `CONNECT` and answers 200, then either drops the tunnel
/// (`tunnel_to: None`) or, with `Some(gateway)`, tunnels to the gateway until the TLS
/// handshake is done and then silently discards everything the gateway sends (the `Welcome`
/// never arrives, nothing is closed). Any other request is passed byte for byte to
/// `upstream` (a real forwarding proxy).
fn dropping_proxy(
    host: Host<'_>,
    port: u16,
    upstream: SocketAddrV4,
    tunnel_to: Option<SocketAddrV4>,
    stop: &AtomicBool,
    connects: &AtomicUsize,
) {
    let l = host.tcp_listener(port).expect("listener");
    l.set_nonblocking(true).expect("nonblocking");
    std::thread::scope(|s| {
        while !stop.load(Ordering::Relaxed) {
            let mut c = match l.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => panic!("accept: {e}"),
            };
            s.spawn(move || {
                c.set_nonblocking(false).expect("blocking");
                c.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match c.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                if head.starts_with(b"CONNECT ") {
                    connects.fetch_add(1, Ordering::Relaxed);
                    let _ = c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                    if let Some(gw) = tunnel_to {
                        blackhole_after_handshake(host, c, gw);
                    }
                    return; // Dropped: the tunnel closes.
                }
                let Ok(mut up) = host.tcp_connect(upstream, Duration::from_secs(5)) else {
                    return;
                };
                let _ = up.write_all(&head);
                let (mut c2, mut up2) = (
                    c.try_clone().expect("clone"),
                    up.try_clone().expect("clone"),
                );
                let t = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut up2);
                    let _ = up2.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut up, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Both);
                let _ = up.shutdown(std::net::Shutdown::Both);
                let _ = t.join();
            });
        }
    });
}

/// Relays a TLS client to `gw`; everything the gateway sends after the client's second
/// flight (its handshake finish, then `Hello`) is discarded.
fn blackhole_after_handshake(host: Host<'_>, mut c: std::net::TcpStream, gw: SocketAddrV4) {
    let Ok(mut up) = host.tcp_connect(gw, Duration::from_secs(5)) else {
        return;
    };
    // The ClientHello: exactly one TLS record.
    let mut hdr = [0u8; 5];
    if c.read_exact(&mut hdr).is_err() {
        return;
    }
    let mut hello = vec![0u8; usize::from(u16::from_be_bytes([hdr[3], hdr[4]]))];
    if c.read_exact(&mut hello).is_err() {
        return;
    }
    let _ = up.write_all(&hdr);
    let _ = up.write_all(&hello);
    let blackhole = Arc::new(AtomicBool::new(false));
    let (mut c2, mut up2) = (
        c.try_clone().expect("clone"),
        up.try_clone().expect("clone"),
    );
    let bh = blackhole.clone();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n @ 1..) = up2.read(&mut buf) {
            if !bh.load(Ordering::SeqCst) && c2.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n @ 1..) = c.read(&mut buf) {
        // The client's second flight comes only after the gateway's first: from here on,
        // nothing reaches the client.
        blackhole.store(true, Ordering::SeqCst);
        if up.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = up.shutdown(std::net::Shutdown::Both);
    let _ = c.shutdown(std::net::Shutdown::Both);
    let _ = t.join();
}

/// The agent log after byte `from`.
fn log_since(spec: &AgentSpec, from: usize) -> String {
    read_log(&spec.log).get(from..).unwrap_or("").to_string()
}

/// `(rung, climb ms, ms since the agent started)` of the first "connected via rung" line.
fn connected(log: &str) -> Option<(String, u64, u64)> {
    let line = log.lines().find(|l| l.contains("connected via rung "))?;
    let rest = line.split("connected via rung ").nth(1)?;
    let mut w = rest.split_whitespace();
    let rung = w.next()?.to_string();
    let _in = w.next()?;
    let ms = w.next()?.parse().ok()?;
    let since = rest
        .split('(')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((rung, ms, since))
}

#[test]
fn every_profile_reaches_the_gateway() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(12)).expect("lab (see docs/lab.md)");
    let gw_alt = format!("{}:{ALT}", lab.host(0).addr());
    let gw = Gateway::start(lab.host(0), dir, &["--listen-extra", &gw_alt]);

    let proxy_a = lab
        .proxy(
            6,
            ProxyConfig {
                allow_connect: true,
                connect_ports: vec![ALT],
                basic_auth: Some(("fleet".into(), "s3cret".into())),
                ..Default::default()
            },
        )
        .expect("proxy A");
    let proxy_b = lab
        .proxy(
            7,
            ProxyConfig {
                allow_connect: false,
                ..Default::default()
            },
        )
        .expect("proxy B");
    let proxy_c = SocketAddrV4::new(lab.host(8).addr(), 3129);
    let proxy_d = SocketAddrV4::new(lab.host(8).addr(), 3130);
    let gw_alt_addr = SocketAddrV4::new(lab.host(0).addr(), ALT);
    let stop = AtomicBool::new(false);
    let dropped_connects = AtomicUsize::new(0);
    let silent_connects = AtomicUsize::new(0);

    let common_extra = |v: &[&str]| -> Vec<String> {
        let mut e = vec![
            "--alt-port".to_string(),
            ALT.to_string(),
            "--rung-timeout-ms".into(),
            RUNG_TIMEOUT_MS.into(),
        ];
        e.extend(v.iter().map(|s| s.to_string()));
        e
    };
    let cases = vec![
        Case {
            name: "open",
            host: 1,
            want: "native",
            transport: "native",
            extra: common_extra(&["--proxy", "none"]),
        },
        Case {
            name: "only443",
            host: 2,
            want: "443",
            transport: "native443",
            extra: common_extra(&["--proxy", "none", "--upgrade-after", "2"]),
        },
        Case {
            name: "connect",
            host: 3,
            want: "connect",
            transport: "httpconnect",
            extra: common_extra(&["--proxy", &format!("http://fleet:s3cret@{}", proxy_a.addr)]),
        },
        Case {
            name: "denied",
            host: 4,
            want: "longpoll",
            transport: "longpoll",
            extra: common_extra(&["--proxy", &format!("http://{}", proxy_b.addr)]),
        },
        Case {
            name: "dropped",
            host: 5,
            want: "longpoll",
            transport: "longpoll",
            extra: common_extra(&["--proxy", &format!("http://{proxy_c}")]),
        },
        Case {
            name: "silent",
            host: 11,
            want: "longpoll",
            transport: "longpoll",
            extra: common_extra(&["--proxy", &format!("http://{proxy_d}")]),
        },
        Case {
            name: "upgrade",
            host: 9,
            want: "upgrade",
            transport: "httpupgrade",
            extra: common_extra(&["--proxy", "none", "--rungs", "upgrade"]),
        },
        Case {
            name: "polldirect",
            host: 10,
            want: "longpoll",
            transport: "longpoll",
            extra: common_extra(&["--proxy", "none", "--rungs", "longpoll"]),
        },
    ];
    lab.host(2)
        .firewall(&Profile::OnlyTcpOut(vec![ALT]))
        .expect("fw 2");
    lab.host(3)
        .firewall(&Profile::OnlyTo(proxy_a.addr))
        .expect("fw 3");
    lab.host(4)
        .firewall(&Profile::OnlyTo(proxy_b.addr))
        .expect("fw 4");
    lab.host(5)
        .firewall(&Profile::OnlyTo(proxy_c))
        .expect("fw 5");
    lab.host(11)
        .firewall(&Profile::OnlyTo(proxy_d))
        .expect("fw 11");

    std::thread::scope(|scope| {
        let fake = scope.spawn(|| {
            let h = lab.host(8);
            dropping_proxy(h, 3129, proxy_b.addr, None, &stop, &dropped_connects)
        });
        let silent = scope.spawn(|| {
            let h = lab.host(8);
            let gw = Some(gw_alt_addr);
            dropping_proxy(h, 3130, proxy_b.addr, gw, &stop, &silent_connects)
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_cases(&lab, &gw, dir, &cases)
        }));
        stop.store(true, Ordering::Relaxed);
        fake.join().expect("dropping proxy");
        silent.join().expect("silent proxy");
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    });
    assert!(
        dropped_connects.load(Ordering::Relaxed) >= 1,
        "the dropping proxy never saw a CONNECT"
    );
    assert!(
        silent_connects.load(Ordering::Relaxed) >= 1,
        "the silent proxy never saw a CONNECT"
    );
}

fn run_cases(lab: &Lab, gw: &Gateway<'_>, dir: &Path, cases: &[Case]) {
    // Enrol and connect, all profiles at once.
    let mut specs = Vec::new();
    let mut agents = Vec::new();
    let t0 = now();
    for c in cases {
        let mut spec = AgentSpec::new(gw, dir, c.name, Some(gw.device_add(c.name)));
        spec.extra.extend(c.extra.iter().cloned());
        agents.push(spec.spawn(lab.host(c.host)));
        specs.push(spec);
    }
    let mut measured = Vec::new();
    for (c, spec) in cases.iter().zip(&specs) {
        gw.wait_online(c.name, CONNECT_BOUND, || {
            format!("{}\n{}", spec.output(), gw.diag())
        });
        let online_after = t0.elapsed();
        // Online at the gateway can precede the agent's own line by a moment.
        let (rung, ms, since) = wait_for(
            &format!("{}'s connect line", c.name),
            Duration::from_secs(10),
            || connected(&read_log(&spec.log)),
            || spec.output(),
        );
        let log = read_log(&spec.log);
        assert_eq!(rung, c.want, "{}: wrong rung\n{log}", c.name);
        let row = gw.device(c.name).expect("row");
        assert_eq!(row["transport"], c.transport, "{}: {row:#}", c.name);
        measured.push((c.name, rung, ms, since, online_after));
    }
    let silent = specs
        .iter()
        .zip(cases)
        .find(|(_, c)| c.name == "silent")
        .map(|(s, _)| read_log(&s.log))
        .expect("silent case");
    assert!(
        silent.contains("rung connect failed: no Welcome within the rung timeout"),
        "the silent tunnel must lose on the missing Welcome\n{silent}"
    );
    // Its `Enrol` went through the silent tunnel and was answered into the void: the repeat
    // over long-poll got the certificate again instead of "used token".
    assert!(
        gw.stderr()
            .contains("enrolment repeated: certificate sent again"),
        "{}",
        gw.diag()
    );
    // What the operator sees: `fleetcast status`, one line per device with its rung.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .arg("--data-dir")
        .arg(&gw.data)
        .arg("status")
        .output()
        .expect("run fleetcast status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = String::from_utf8_lossy(&out.stdout);
    eprintln!("fleetcast status:\n{status}");
    for c in cases {
        let line = status
            .lines()
            .find(|l| l.contains(&format!("name={} ", c.name)))
            .unwrap_or_else(|| panic!("{} missing from status\n{status}", c.name));
        assert!(
            line.contains(&format!("transport={} ", c.transport))
                || line.ends_with(&format!("transport={}", c.transport)),
            "{}: {line}",
            c.name
        );
    }
    for (name, rung, ms, since, online) in &measured {
        eprintln!(
            "MEASURED profile={name} rung={rung} first_start_connected_ms={since} (session climb {ms} ms after enrolment) test_saw_online_ms={}",
            online.as_millis()
        );
    }

    // The queue: one, reboot, two.
    for (c, spec) in cases.iter().zip(&specs) {
        let log = spec.log.parent().expect("dir").join("commands.log");
        let log = log.display().to_string();
        gw.queue_add(
            c.name,
            vec![
                vec![sh(&format!("echo one >> {log}"))],
                vec![Step::Reboot],
                vec![sh(&format!("echo two >> {log}"))],
            ],
            OnFailureSpec::Stop,
        );
    }
    let mut marks = Vec::new();
    for (c, (agent, spec)) in cases.iter().zip(agents.iter_mut().zip(&specs)) {
        let st = wait_exit(agent, WAIT, || {
            format!("{}\n{:#}\n{}", spec.output(), gw.queue(c.name), gw.diag())
        });
        assert_eq!(
            st.code(),
            Some(REBOOT_EXIT),
            "{}\n{}",
            c.name,
            spec.output()
        );
        marks.push(read_log(&spec.log).len());
    }
    // Back with a new boot id: the remembered rung goes first and wins.
    let mut agents2 = Vec::new();
    for (i, (c, spec)) in cases.iter().zip(&specs).enumerate() {
        spec.set_boot_id(&format!("{i:08x}-b007-4000-8000-00000000beef"));
        agents2.push(spec.spawn(lab.host(c.host)));
    }
    for ((c, spec), mark) in cases.iter().zip(&specs).zip(&marks) {
        let q = gw.wait_done(c.name, WAIT, || format!("{}\n{}", spec.output(), gw.diag()));
        let cmds = q["commands"].as_array().expect("commands");
        assert_eq!(cmds.len(), 3, "{q:#}");
        assert!(cmds.iter().all(|k| k["state"] == "ok"), "{}: {q:#}", c.name);
        let log = spec.log.parent().expect("dir").join("commands.log");
        assert_eq!(
            std::fs::read_to_string(&log).expect("commands.log"),
            "one\ntwo\n",
            "{}",
            c.name
        );
        wait_for(
            &format!("{}'s connect line after the reboot", c.name),
            Duration::from_secs(10),
            || connected(&log_since(spec, *mark)),
            || spec.output(),
        );
        let after = log_since(spec, *mark);
        let first_try = after
            .lines()
            .find_map(|l| l.split("trying rungs ").nth(1))
            .unwrap_or_else(|| panic!("{}: no climb after the reboot\n{after}", c.name));
        assert!(
            first_try.starts_with(c.want),
            "{}: remembered rung not first: {first_try}\n{after}",
            c.name
        );
        let (rung, ms, since) = connected(&after).unwrap_or_else(|| panic!("no connect\n{after}"));
        assert_eq!(rung, c.want, "{}\n{after}", c.name);
        let before_win = after.split("connected via rung").next().unwrap_or("");
        // The remembered rung itself did not fail first (the others start a stagger later
        // and may report on a loaded machine before it wins; they never win).
        assert!(
            !before_win.contains(&format!("rung {} failed", c.want))
                && !before_win.contains(&format!("rung {} closed", c.want)),
            "{}: the remembered rung failed before winning\n{after}",
            c.name
        );
        eprintln!(
            "MEASURED profile={} rung={rung} restart_connected_ms={since} (climb {ms} ms)",
            c.name
        );
    }

    // The 443-only device retries better rungs every 2 s (falling back to 443 while native
    // is blocked); once the firewall opens, it moves up to native on its own.
    let c = cases
        .iter()
        .position(|c| c.name == "only443")
        .expect("only443 case");
    lab.host(cases[c].host)
        .clear_firewall()
        .expect("clear firewall");
    wait_for(
        "only443 to upgrade to native once the firewall opened",
        WAIT,
        || (gw.device("only443")?["transport"] == "native").then_some(()),
        || format!("{}\n{}", specs[c].output(), gw.diag()),
    );
    let log = read_log(&specs[c].log);
    assert!(
        log.contains("rung native passes again: moving up"),
        "the move up came from the background retry\n{log}"
    );
}

fn tls_config(ca: &Path) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).expect("CA PEM"))
        .expect("CA as root");
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = vec![fleetcast_daemon::pki::ALPN.to_vec()];
    Arc::new(cfg)
}

/// Sends `req` (in pieces `pause` apart when given) and returns what came back until EOF.
fn exchange(mut s: impl Read + Write, req: &[u8], pause: Option<Duration>) -> (Vec<u8>, Duration) {
    let start = now();
    match pause {
        None => {
            let _ = s.write_all(req);
            let _ = s.flush();
        }
        Some(p) => {
            for b in req {
                if s.write_all(&[*b]).and_then(|()| s.flush()).is_err() {
                    break;
                }
                std::thread::sleep(p);
                if start.elapsed() > Duration::from_secs(20) {
                    break;
                }
            }
        }
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(30) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    (got, start.elapsed())
}

#[test]
fn hostile_http_is_cut_off_while_an_agent_is_served() {
    const COMMANDS: u64 = 30;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let gw = Gateway::start(lab.host(0), dir, &["--http-timeout", "2"]);
    let attacker = lab.host(2);

    let good = AgentSpec::new(&gw, dir, "good", Some(gw.device_add("good")));
    let _agent = good.spawn(lab.host(1));
    gw.wait_online("good", WAIT, || good.output());
    let log = dir.join("good").join("seq.log");
    let cmds = (1..=COMMANDS)
        .map(|n| vec![sh(&format!("sleep 0.2; echo {n} >> {}", log.display()))])
        .collect();
    gw.queue_add("good", cmds, OnFailureSpec::Stop);

    let plain = || {
        let s = attacker
            .tcp_connect(gw.addr, Duration::from_secs(5))
            .expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        s
    };
    let cfg = tls_config(&gw.ca());
    let tls = || {
        let s = plain();
        let name = ServerName::try_from(gw.addr.ip().to_string()).expect("name");
        let mut t = StreamOwned::new(ClientConnection::new(cfg.clone(), name).expect("tls"), s);
        while t.conn.is_handshaking() {
            t.conn.complete_io(&mut t.sock).expect("handshake");
        }
        t
    };
    let mut oversized = b"GET /fleetcast HTTP/1.1\r\nX-Pad: ".to_vec();
    oversized.resize(20 * 1024, b'a');
    let mut many = b"GET /fleetcast HTTP/1.1\r\n".to_vec();
    for i in 0..40 {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let post_oversized = [b"POST".as_slice(), &oversized[3..]].concat();
    let post_many = [b"POST /fleetcast/poll".as_slice(), &many[14..]].concat();
    let slow = b"POST /fleetcast/poll HTTP/1.1\r\nHost: gw\r\nX-Slow: 1\r\nX-Slower: 2\r\n\r\n";
    let slow_tls = b"GET /fleetcast HTTP/1.1\r\nHost: gw\r\nX-Slow: 1\r\nX-Slower: 2\r\n\r\n";

    type Attack<'a> = (&'a str, bool, &'a [u8], Option<Duration>, &'a str, &'a str);
    let attacks: Vec<Attack<'_>> = vec![
        // (name, inside TLS, request, pause between bytes, status, log needle)
        ("malformed", false, b"GET\x01/ HTTP/1.1\r\n\r\n", None, "400", "status=400"),
        ("oversized head", false, &post_oversized, None, "431", "status=431"),
        ("too many fields", false, &post_many, None, "431", "status=431"),
        ("slowloris", false, slow, Some(Duration::from_millis(150)), "408", "slowloris"),
        (
            "unknown session",
            false,
            b"POST /fleetcast/poll HTTP/1.1\r\nContent-Length: 0\r\nX-Fleetcast-Session: 00112233445566778899aabbccddeeff\r\n\r\n",
            None,
            "410",
            "",
        ),
        ("no upgrade header (TLS)", true, b"GET /fleetcast HTTP/1.1\r\nHost: gw\r\n\r\n", None, "426", "status=426"),
        ("malformed (TLS)", true, b"GET\x01/ HTTP/1.1\r\n\r\n", None, "400", "status=400"),
        ("oversized head (TLS)", true, &oversized, None, "431", "status=431"),
        ("too many fields (TLS)", true, &many, None, "431", "status=431"),
        ("slowloris (TLS)", true, slow_tls, Some(Duration::from_millis(150)), "408", "slowloris"),
    ];
    for (name, in_tls, req, pause, status, needle) in attacks {
        let mark = gw.stderr().len();
        let (got, took) = if in_tls {
            exchange(tls(), req, pause)
        } else {
            exchange(plain(), req, pause)
        };
        let text = String::from_utf8_lossy(&got);
        eprintln!("{name}: answered {:?} after {took:?}", text.lines().next());
        // A slowloris is still writing when it is cut off, so the gateway's close may reset
        // the connection before the client reads the 408: either is a cut.
        let cut_quietly = pause.is_some() && got.is_empty();
        assert!(
            cut_quietly || text.starts_with(&format!("HTTP/1.1 {status} ")),
            "{name}: {text}\n{}",
            gw.diag()
        );
        if !needle.is_empty() {
            wait_for(
                &format!("the gateway to log {needle} for {name}"),
                Duration::from_secs(10),
                || {
                    gw.stderr()
                        .get(mark..)
                        .is_some_and(|s| s.contains(needle))
                        .then_some(())
                },
                || gw.diag(),
            );
        }
    }

    // The good agent: its queue complete, in order, on its one session.
    let q = gw.wait_done("good", WAIT, || good.output());
    let cmds = q["commands"].as_array().expect("commands");
    assert_eq!(cmds.len() as u64, COMMANDS, "{q:#}");
    assert!(cmds.iter().all(|c| c["state"] == "ok"), "{q:#}");
    let got: Vec<String> = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .map(str::to_string)
        .collect();
    let want: Vec<String> = (1..=COMMANDS).map(|n| n.to_string()).collect();
    assert_eq!(got, want);
    let agent_log = read_log(&good.log);
    assert_eq!(
        agent_log.matches("connected via rung").count(),
        1,
        "one session throughout\n{agent_log}"
    );
}

/// `(head, body)` of one HTTP message read from `s` (`Content-Length` bodies only); `None`
/// when the peer closed or sent garbage.
fn read_message(s: &mut std::net::TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 || s.read(&mut b).ok()? != 1 {
            return None;
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(Some(0), |v| v.trim().parse().ok())?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((head, body))
}

/// A test-local forwarding proxy for long-poll requests that loses answers: every third
/// answer of a session that carries bytes is read from the gateway and then not delivered
/// (the client's connection is closed), as when a proxy gives up on a request the gateway
/// has already answered. `lost` counts them.
fn lossy_proxy(
    host: Host<'_>,
    port: u16,
    gateway: SocketAddrV4,
    stop: &AtomicBool,
    lost: &AtomicUsize,
) {
    let l = host.tcp_listener(port).expect("listener");
    l.set_nonblocking(true).expect("nonblocking");
    let answers = AtomicUsize::new(0);
    std::thread::scope(|s| {
        while !stop.load(Ordering::Relaxed) {
            let mut c = match l.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => panic!("accept: {e}"),
            };
            let answers = &answers;
            s.spawn(move || {
                c.set_nonblocking(false).expect("blocking");
                c.set_read_timeout(Some(Duration::from_secs(40)))
                    .expect("timeout");
                let Some((head, body)) = read_message(&mut c) else {
                    return;
                };
                let Ok(mut up) = host.tcp_connect(gateway, Duration::from_secs(5)) else {
                    return;
                };
                up.set_read_timeout(Some(Duration::from_secs(40)))
                    .expect("timeout");
                if up
                    .write_all(&head)
                    .and_then(|()| up.write_all(&body))
                    .is_err()
                {
                    return;
                }
                let mut answer = Vec::new();
                let _ = up.read_to_end(&mut answer);
                let in_session = String::from_utf8_lossy(&head)
                    .to_ascii_lowercase()
                    .contains("x-fleetcast-session:");
                let carries = !answer.ends_with(b"\r\n\r\n");
                if in_session && carries && answers.fetch_add(1, Ordering::Relaxed) % 3 == 2 {
                    lost.fetch_add(1, Ordering::Relaxed);
                    return; // Dropped: the client sees its connection close, no answer.
                }
                let _ = c.write_all(&answer);
            });
        }
    });
}

/// A test-local TCP relay to `to` that cuts every connection `period` after accepting it
/// (a proxy that closes tunnels every few seconds); `accepted` counts connections.
fn cutting_relay(
    host: Host<'_>,
    port: u16,
    to: SocketAddrV4,
    period: Duration,
    stop: &AtomicBool,
    accepted: &AtomicUsize,
) {
    let l = host.tcp_listener(port).expect("listener");
    l.set_nonblocking(true).expect("nonblocking");
    std::thread::scope(|s| {
        while !stop.load(Ordering::Relaxed) {
            let c = match l.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => panic!("accept: {e}"),
            };
            accepted.fetch_add(1, Ordering::Relaxed);
            s.spawn(move || {
                c.set_nonblocking(false).expect("blocking");
                let Ok(up) = host.tcp_connect(to, Duration::from_secs(5)) else {
                    return;
                };
                let pipe = |mut a: std::net::TcpStream, mut b: std::net::TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                    })
                };
                let t1 = pipe(
                    c.try_clone().expect("clone"),
                    up.try_clone().expect("clone"),
                );
                let t2 = pipe(
                    up.try_clone().expect("clone"),
                    c.try_clone().expect("clone"),
                );
                let start = now();
                while start.elapsed() < period && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = c.shutdown(std::net::Shutdown::Both);
                let _ = up.shutdown(std::net::Shutdown::Both);
                let _ = t1.join();
                let _ = t2.join();
            });
        }
    });
}

/// Runs `body` while `service` runs on a scoped thread; `stop` ends the service.
fn with_service<'s, T>(
    stop: &'s AtomicBool,
    service: impl FnOnce() + Send + 's,
    body: impl FnOnce() -> T,
) -> T {
    std::thread::scope(|scope| {
        let svc = scope.spawn(service);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
        stop.store(true, Ordering::Relaxed);
        svc.join().expect("service thread");
        result.unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// How many sessions the agent's log shows.
fn sessions(log: &str) -> usize {
    log.matches("connected via rung").count()
}

/// Queues `n` commands appending their number to `name`'s `seq.log` and checks they ran
/// exactly once, in order.
fn run_numbered_queue(gw: &Gateway<'_>, spec: &AgentSpec, name: &str, n: u64, step: &str) {
    let log = spec.log.parent().expect("dir").join("seq.log");
    let _ = std::fs::remove_file(&log);
    let cmds = (1..=n)
        .map(|i| vec![sh(&format!("{step}echo {i} >> {}", log.display()))])
        .collect();
    gw.queue_add(name, cmds, OnFailureSpec::Stop);
    let q = gw.wait_done(name, WAIT, || spec.output());
    let cmds = q["commands"].as_array().expect("commands");
    assert_eq!(cmds.len() as u64, n, "{q:#}");
    assert!(cmds.iter().all(|c| c["state"] == "ok"), "{q:#}");
    let got = std::fs::read_to_string(&log).expect("seq.log");
    let want: String = (1..=n).map(|i| format!("{i}\n")).collect();
    assert_eq!(got, want, "exactly once, in order");
}

/// A proxy whose read timeout (tinyproxy `Timeout 3`) is shorter than the hold the agent asks
/// for (up to the 8 s heartbeat) cuts the held long-poll requests. The agent makes the cut
/// exchange again, shortens its hold below the cut and keeps its one session; the shorter
/// hold is remembered for the network, so after a restart nothing is cut any more.
#[test]
fn a_proxy_read_timeout_shortens_the_hold_and_keeps_the_session() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let gw_alt = format!("{}:{ALT}", lab.host(0).addr());
    let gw = Gateway::start(
        lab.host(0),
        dir,
        &["--listen-extra", &gw_alt, "--heartbeat", "8"],
    );
    let proxy = lab
        .proxy(
            2,
            ProxyConfig {
                allow_connect: false,
                timeout_secs: 3,
                ..Default::default()
            },
        )
        .expect("proxy");
    lab.host(1)
        .firewall(&Profile::OnlyTo(proxy.addr))
        .expect("fw");
    let mut spec = AgentSpec::new(&gw, dir, "held", Some(gw.device_add("held")));
    spec.extra.extend(
        [
            "--alt-port",
            &ALT.to_string(),
            "--rungs",
            "longpoll",
            "--proxy",
            &format!("http://{}", proxy.addr),
        ]
        .map(String::from),
    );
    let mut agent = spec.spawn(lab.host(1));
    gw.wait_online("held", WAIT, || spec.output());
    let cut = "the path cut a request held for";
    wait_for(
        "a held request to be cut and the hold shortened",
        Duration::from_secs(60),
        || read_log(&spec.log).contains(cut).then_some(()),
        || format!("{}\n{}", spec.output(), gw.diag()),
    );
    // Idle for a few heartbeats on the shorter hold, then a queue: still the one session.
    std::thread::sleep(Duration::from_secs(15));
    run_numbered_queue(&gw, &spec, "held", 5, "");
    let log = read_log(&spec.log);
    assert_eq!(sessions(&log), 1, "one session throughout\n{log}");
    assert!(!log.contains("session closed"), "{log}");
    // Remembered for the network: `KEY RUNG HOLD-MS`, below the proxy's 3 s.
    let memory = std::fs::read_to_string(spec.state.join("ladder")).expect("ladder memory");
    let hold: u64 = memory
        .split_whitespace()
        .nth(2)
        .and_then(|h| h.parse().ok())
        .unwrap_or_else(|| panic!("no hold remembered: {memory:?}"));
    assert!((250..3000).contains(&hold), "{memory:?}");
    eprintln!("MEASURED learned hold {hold} ms under a 3 s proxy timeout");

    // A restart starts with the remembered hold: nothing is cut.
    agent.kill().expect("kill agent");
    let mark = read_log(&spec.log).len();
    let _agent = spec.spawn(lab.host(1));
    wait_for(
        "the restarted agent to connect",
        WAIT,
        || {
            log_since(&spec, mark)
                .contains("connected via rung")
                .then_some(())
        },
        || spec.output(),
    );
    std::thread::sleep(Duration::from_secs(12));
    let after = log_since(&spec, mark);
    assert!(
        after.contains(&format!(
            "holding at most {hold} ms (remembered for this network)"
        )),
        "{after}"
    );
    assert!(
        !after.contains(cut),
        "the remembered hold is short enough\n{after}"
    );
    assert_eq!(sessions(&after), 1, "{after}");
}

/// Commands queued while a long-poll device was away: its next `Welcome` says they are
/// pending, the agent polls at once (shortest holds) until they have come, then relaxes to
/// its normal hold, and the queue runs exactly once, in order.
#[test]
fn pending_work_in_the_welcome_is_fetched_then_the_hold_relaxes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let gw_alt = format!("{}:{ALT}", lab.host(0).addr());
    let gw = Gateway::start(lab.host(0), dir, &["--listen-extra", &gw_alt]);
    let mut spec = AgentSpec::new(&gw, dir, "away", Some(gw.device_add("away")));
    spec.extra
        .extend(["--alt-port", &ALT.to_string(), "--rungs", "longpoll"].map(String::from));
    let mut agent = spec.spawn(lab.host(1));
    gw.wait_online("away", WAIT, || spec.output());
    let first = read_log(&spec.log);
    assert!(
        !first.contains("pending at the gateway"),
        "nothing was queued\n{first}"
    );
    agent.kill().expect("kill agent");
    let mark = first.len();
    let seq = spec.log.parent().expect("dir").join("seq.log");
    let cmds = (1..=3)
        .map(|i| vec![sh(&format!("echo {i} >> {}", seq.display()))])
        .collect();
    gw.queue_add("away", cmds, OnFailureSpec::Stop);
    let _agent = spec.spawn(lab.host(1));
    let q = gw.wait_done("away", WAIT, || spec.output());
    assert_eq!(q["commands"].as_array().map(Vec::len), Some(3), "{q:#}");
    assert_eq!(std::fs::read_to_string(&seq).expect("seq.log"), "1\n2\n3\n");
    let relaxed = "long-poll: the pending work has come; normal holds again";
    wait_for(
        "the agent to relax its hold",
        WAIT,
        || log_since(&spec, mark).contains(relaxed).then_some(()),
        || spec.output(),
    );
    let log = log_since(&spec, mark);
    let told = log
        .find("pending at the gateway: 3 command(s), 0 transfer(s)")
        .unwrap_or_else(|| panic!("the Welcome's count is not in the log\n{log}"));
    assert!(told < log.find(relaxed).unwrap(), "{log}");
}

/// Long-poll answers lost after the gateway sent them (every third one that carries bytes)
/// cost nothing: the agent makes the exchange again, the gateway sends again what was not
/// acknowledged and drops body bytes it already has, and a queue completes exactly once, in
/// order, on one session (without the stream offsets the TLS stream inside would break).
#[test]
fn lost_long_poll_answers_lose_nothing() {
    const COMMANDS: u64 = 20;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let gw_alt = format!("{}:{ALT}", lab.host(0).addr());
    let gw = Gateway::start(lab.host(0), dir, &["--listen-extra", &gw_alt]);
    let proxy = SocketAddrV4::new(lab.host(2).addr(), 3131);
    let gw_alt_addr = SocketAddrV4::new(lab.host(0).addr(), ALT);
    let (stop, lost) = (AtomicBool::new(false), AtomicUsize::new(0));
    let mut spec = AgentSpec::new(&gw, dir, "lossy", Some(gw.device_add("lossy")));
    spec.extra.extend(
        [
            "--alt-port",
            &ALT.to_string(),
            "--rungs",
            "longpoll",
            "--proxy",
            &format!("http://{proxy}"),
        ]
        .map(String::from),
    );
    with_service(
        &stop,
        || lossy_proxy(lab.host(2), 3131, gw_alt_addr, &stop, &lost),
        || {
            let _agent = spec.spawn(lab.host(1));
            gw.wait_online("lossy", WAIT, || spec.output());
            run_numbered_queue(&gw, &spec, "lossy", COMMANDS, "");
        },
    );
    let log = read_log(&spec.log);
    let lost = lost.load(Ordering::Relaxed);
    assert!(lost >= 5, "only {lost} answers lost\n{log}");
    assert_eq!(sessions(&log), 1, "one session throughout\n{log}");
    assert!(log.contains("long-poll exchange failed"), "{log}");
    eprintln!("MEASURED {lost} long-poll answers lost, {COMMANDS} commands exactly once");
}

/// A relay that cuts every connection 2 s after accepting it: each session reaches
/// `Welcome`, so the reconnect back-off starts over each time instead of growing
/// (0.2 → 0.4 → 0.8 → … s), and a queue runs exactly once across the cuts.
#[test]
fn cut_tunnels_do_not_grow_the_back_off() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let gw = Gateway::start(lab.host(0), dir, &[]);
    let relay = SocketAddrV4::new(lab.host(2).addr(), common::PORT);
    let (stop, accepted) = (AtomicBool::new(false), AtomicUsize::new(0));
    let mut spec = AgentSpec::new(&gw, dir, "cut", Some(gw.device_add("cut")));
    spec.gateway = relay.to_string();
    spec.extra.extend(
        [
            "--server-name",
            &lab.host(0).addr().to_string(),
            "--rungs",
            "native",
            "--proxy",
            "none",
        ]
        .map(String::from),
    );
    let period = Duration::from_secs(2);
    const CUTS: usize = 8;
    with_service(
        &stop,
        || cutting_relay(lab.host(2), common::PORT, gw.addr, period, &stop, &accepted),
        || {
            let _agent = spec.spawn(lab.host(1));
            gw.wait_online("cut", WAIT, || spec.output());
            run_numbered_queue(&gw, &spec, "cut", 6, "sleep 0.5; ");
            wait_for(
                &format!("{CUTS} sessions cut by the relay"),
                Duration::from_secs(90),
                || (sessions(&read_log(&spec.log)) > CUTS).then_some(()),
                || spec.output(),
            );
        },
    );
    let log = read_log(&spec.log);
    let pauses: Vec<u64> = log
        .lines()
        .filter_map(|l| {
            l.split("reconnecting in ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(pauses.len() >= CUTS - 1, "{pauses:?}\n{log}");
    // The first back-off is 200 ms × [0.5, 1.5); one failed climb in between doubles it once.
    // Without the reset, the sixth pause alone would be at least 3.2 s.
    assert!(
        pauses.iter().all(|&p| p < 1000),
        "the back-off grew across good sessions: {pauses:?}\n{log}"
    );
    assert!(
        accepted.load(Ordering::Relaxed) > CUTS,
        "every session went through the relay"
    );
    eprintln!("MEASURED reconnect pauses after cuts every {period:?}: {pauses:?} ms");
}

/// A path that silently stops forwarding (an nftables drop added mid-session) is noticed by
/// both ends within about three heartbeats (2 s here), not after the agent's 90 s default;
/// once the path is back, the agent reconnects and is served.
#[test]
fn a_silent_path_is_noticed_within_three_heartbeats() {
    const HEARTBEAT: Duration = Duration::from_secs(2);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let gw = Gateway::start(lab.host(0), dir, &["--heartbeat", "2"]);
    let mut spec = AgentSpec::new(&gw, dir, "quiet", Some(gw.device_add("quiet")));
    spec.extra
        .extend(["--rungs", "native", "--proxy", "none"].map(String::from));
    let _agent = spec.spawn(lab.host(1));
    gw.wait_online("quiet", WAIT, || spec.output());
    // A few heartbeats on the live path first.
    std::thread::sleep(HEARTBEAT * 3);
    let mark = read_log(&spec.log).len();
    let cut = now();
    lab.host(1)
        .firewall(&Profile::Block(vec![fleetcast_lab::Match::Tcp(None)]))
        .expect("drop all TCP");
    let bound = Duration::from_secs(30);
    let (mut agent_saw, mut gateway_saw) = (None, None);
    wait_for(
        "both ends to notice the dead path",
        bound,
        || {
            if agent_saw.is_none()
                && log_since(&spec, mark).contains("session closed by the agent (timeout)")
            {
                agent_saw = Some(cut.elapsed());
            }
            if gateway_saw.is_none() && gw.device("quiet").is_some_and(|r| r["online"] == false) {
                gateway_saw = Some(cut.elapsed());
            }
            agent_saw.zip(gateway_saw)
        },
        || format!("{}\n{}", spec.output(), gw.diag()),
    );
    let (agent_saw, gateway_saw) = (agent_saw.expect("agent"), gateway_saw.expect("gateway"));
    eprintln!("MEASURED dead path noticed after {agent_saw:?} (agent), {gateway_saw:?} (gateway) with a {HEARTBEAT:?} heartbeat");
    // Three heartbeats are expected; six leave room for a loaded machine.
    for (end, took) in [("agent", agent_saw), ("gateway", gateway_saw)] {
        assert!(
            took < HEARTBEAT * 6,
            "{end} took {took:?}\n{}",
            spec.output()
        );
    }
    lab.host(1).clear_firewall().expect("clear firewall");
    gw.wait_online("quiet", WAIT, || spec.output());
    run_numbered_queue(&gw, &spec, "quiet", 2, "");
}

/// The cause is named, not the last rung's symptom: a wrong proxy password is the proxy's
/// refusal (tinyproxy's `401`; `407` elsewhere), not the timeout of a blocked rung, a wrong CA fingerprint names both fingerprints
/// (not `Connection refused` from a closed port), and a used token is a refused token (not
/// `Some("bad-token")`), which ends the agent.
#[test]
fn errors_name_the_real_cause() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(5)).expect("lab (see docs/lab.md)");
    let gw = Gateway::start(lab.host(0), dir, &[]);
    let proxy = lab
        .proxy(
            4,
            ProxyConfig {
                allow_connect: true,
                connect_ports: vec![ALT],
                basic_auth: Some(("fleet".into(), "s3cret".into())),
                ..Default::default()
            },
        )
        .expect("proxy");
    let failed = |spec: &AgentSpec, needle: &str| {
        wait_for(
            &format!("{needle:?} in the agent's log"),
            Duration::from_secs(60),
            || {
                read_log(&spec.log)
                    .lines()
                    .find(|l| l.contains("connection failed:"))
                    .map(str::to_string)
            },
            || spec.output(),
        )
        .split_once("connection failed: ")
        .map(|(_, cause)| {
            eprintln!("REPORTED {}: {cause}", spec.log.display());
            cause.to_string()
        })
        .unwrap_or_default()
    };
    let common = |name: &str, extra: &[String]| {
        let mut s = AgentSpec::new(&gw, dir, name, Some(gw.device_add(name)));
        s.extra.extend(
            ["--alt-port", "443", "--rung-timeout-ms", "2000"]
                .map(String::from)
                .into_iter()
                .chain(extra.iter().cloned()),
        );
        s
    };

    // Wrong proxy password, nothing out but the proxy.
    lab.host(1)
        .firewall(&Profile::OnlyTo(proxy.addr))
        .expect("fw");
    let badpass = common(
        "badpass",
        &[
            "--proxy".into(),
            format!("http://fleet:wrong@{}", proxy.addr),
        ],
    );
    let _a1 = badpass.spawn(lab.host(1));
    // A wrong CA fingerprint (the gateway has no 443 listener: those rungs are refused).
    let ca = CertificateDer::from_pem_file(gw.ca()).expect("CA PEM");
    let real: String = ring::digest::digest(&ring::digest::SHA256, ca.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let badpin = common(
        "badpin",
        &[
            "--ca-fingerprint".into(),
            "ab".repeat(32),
            "--proxy".into(),
            "none".into(),
        ],
    );
    let _a2 = badpin.spawn(lab.host(2));

    let line = failed(&badpass, "the proxy's refusal");
    assert!(
        line.contains(&format!(
            "the proxy {} refused the user and password given in the proxy URL",
            proxy.addr
        )),
        "{line}\n{}",
        badpass.output()
    );
    let line = failed(&badpin, "fingerprint");
    assert!(
        line.contains("does not match the fingerprint")
            && line.contains(&"ab".repeat(32))
            && line.contains(&real),
        "{line}\n{}",
        badpin.output()
    );

    // A used token: the first device enrols with it; another key then tries it.
    let token = gw.device_add("first");
    let first = AgentSpec::new(&gw, dir, "first", Some(token.clone()));
    let mut a3 = first.spawn(lab.host(3));
    gw.wait_online("first", WAIT, || first.output());
    a3.kill().expect("kill first");
    let mut again = AgentSpec::new(&gw, dir, "again", None);
    again.enrol = Some((token, "first".into()));
    let mut a4 = again.spawn(lab.host(3));
    let st = wait_exit(&mut a4, WAIT, || again.output());
    assert!(!st.success(), "a refused token ends the agent");
    let log = read_log(&again.log);
    eprintln!(
        "REPORTED {}: {}",
        again.log.display(),
        log.lines().last().unwrap_or("")
    );
    assert!(
        log.contains(
            "the gateway refused the enrolment token for \"first\": unknown, used or expired"
        ) && log.contains("ask for a new one (`fleetcast device add`)")
            && !log.contains("Some("),
        "{log}"
    );
}
