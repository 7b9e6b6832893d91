//! Hostile clients against a live gateway (lab host 0) while a well-behaved agent (host 1)
//! runs a queue. Attackers connect from host 2:
//!
//! 1. garbage bytes on a raw TCP connection;
//! 2. a TLS client (trusting the gateway CA, no client certificate) that sends a frame header
//!    announcing a 2 MiB body: over the 4 KiB pre-authentication limit;
//! 3. a stalled handshake: connect and send nothing (the gateway cuts it after its 10 s
//!    hello timeout);
//! 4. a client with a valid device certificate whose `Hello` claims the good device's id;
//! 5. a revoked device: revoked while online (its session is closed with `REVOKED` and the
//!    agent exits with an error), then started again (refused at `Hello`, exits again).
//!
//! Each is cut off by the gateway (the socket reaches EOF or reset) with a reason in the
//! gateway's log, while the good agent keeps its one session and its queue completes.

mod common;

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{now, read_log, sh, wait_exit, wait_for, AgentSpec, Gateway, Rng};
use fleetcast_daemon::admin::{OnFailureSpec, Request};
use fleetcast_lab::{Host, Lab, LabConfig};
use fleetcast_wire::session::{AgentEvent, AgentSession, FirstMessage};
use fleetcast_wire::{CloseCode, Hello, Instant as WireInstant, SessionConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};

#[test]
fn agent_role() {
    common::agent_role();
}

const WAIT: Duration = Duration::from_secs(60);
/// How long a cut-off may take: the gateway's hello timeout (10 s) plus slack.
const CUT: Duration = Duration::from_secs(30);

fn tls_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).expect("CA PEM"))
        .expect("CA as root");
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(cert).expect("device cert")],
                PrivateKeyDer::from_pem_file(key).expect("device key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![fleetcast_daemon::pki::ALPN.to_vec()];
    Arc::new(cfg)
}

/// A TLS session to the gateway from `host`, handshake completed.
fn tls_connect(
    host: Host<'_>,
    gw: &Gateway<'_>,
    cfg: Arc<ClientConfig>,
) -> StreamOwned<ClientConnection, TcpStream> {
    let sock = host
        .tcp_connect(gw.addr, Duration::from_secs(5))
        .expect("connect");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let name = ServerName::try_from(gw.addr.ip().to_string()).expect("server name");
    let conn = ClientConnection::new(cfg, name).expect("client connection");
    let mut s = StreamOwned::new(conn, sock);
    let start = now();
    while s.conn.is_handshaking() {
        match s.conn.complete_io(&mut s.sock) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("TLS handshake failed: {e}\n{}", gw.diag()),
        }
        assert!(start.elapsed() < CUT, "TLS handshake did not finish");
    }
    s
}

/// Reads until the peer closes (EOF, close_notify, reset, or a TLS alert) and returns the
/// bytes received and how it ended; panics if it stays open for [`CUT`].
fn wait_closed(
    mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
    what: &str,
    diag: &dyn Fn() -> String,
) -> (Vec<u8>, String) {
    let start = now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match read(&mut buf) {
            Ok(0) => return (got, "eof".into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (got, format!("{:?}: {e}", e.kind())),
        }
        if start.elapsed() > CUT {
            panic!(
                "{what}: the gateway did not close the connection within {CUT:?}\n{}",
                diag()
            );
        }
    }
}

/// Waits until the gateway's stderr after byte `from` contains `needle`.
fn wait_logged(gw: &Gateway<'_>, from: usize, needle: &str) {
    wait_for(
        &format!("the gateway to log `{needle}`"),
        Duration::from_secs(10),
        || {
            gw.stderr()
                .get(from..)
                .is_some_and(|s| s.contains(needle))
                .then_some(())
        },
        || gw.diag(),
    );
}

#[test]
fn hostile_clients_are_cut_off_and_the_good_queue_completes() {
    const COMMANDS: u64 = 40;
    let mut rng = Rng::from_env(0x5eed_0003);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let mut gw = Gateway::start(lab.host(0), dir, &[]);
    let attacker = lab.host(2);

    // The good device and its queue.
    let good = AgentSpec::new(&gw, dir, "good", Some(gw.device_add("good")));
    let _good_agent = good.spawn(lab.host(1));
    let good_id = gw.wait_online("good", WAIT, || good.output());
    let log = dir.join("good").join("seq.log");
    let cmds = (1..=COMMANDS)
        .map(|n| vec![sh(&format!("sleep 0.25; echo {n} >> {}", log.display()))])
        .collect();
    gw.queue_add("good", cmds, OnFailureSpec::Stop);

    // A second device, enrolled and stopped: its certificate is the attacker's credential.
    let evil = AgentSpec::new(&gw, dir, "evil", Some(gw.device_add("evil")));
    let mut enrol_only = evil.clone();
    enrol_only
        .extra
        .extend(["--max-sessions".into(), "1".into()]);
    let mut e = enrol_only.spawn(attacker);
    let st = wait_exit(&mut e, WAIT, || format!("{}\n{}", evil.output(), gw.diag()));
    assert!(st.success(), "enrolment run: {st}\n{}", evil.output());
    let evil_cert = evil.state.join("device.crt");
    let evil_key = evil.state.join("device.key");
    let evil_id = gw
        .device("evil")
        .and_then(|r| r["id"].as_u64())
        .expect("evil enrolled");

    std::thread::scope(|scope| {
        // 3. The stalled handshake runs alongside the others (it takes 10 s).
        let stall = scope.spawn(|| {
            let mut s = attacker
                .tcp_connect(gw.addr, Duration::from_secs(5))
                .expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            let start = now();
            let (got, how) = wait_closed(|b| s.read(b), "stalled handshake", &|| gw.diag());
            (got, how, start.elapsed())
        });

        // 1. Garbage on raw TCP.
        let mark = gw.stderr().len();
        let mut garbage = vec![0u8; 4096];
        rng.fill(&mut garbage);
        garbage[0] = 0x99; // not a TLS record type
        let mut s = attacker
            .tcp_connect(gw.addr, Duration::from_secs(5))
            .expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        // The gateway may cut us off mid-write; that is the point.
        let _ = s.write_all(&garbage);
        let (_, how) = wait_closed(|b| s.read(b), "garbage", &|| gw.diag());
        eprintln!("garbage: closed ({how})");
        wait_logged(&gw, mark, "connection closed: TLS/socket error");

        // 2. An oversized frame header after a good handshake (no client certificate).
        let mark = gw.stderr().len();
        let mut t = tls_connect(attacker, &gw, tls_config(&gw.ca(), None));
        let mut header = [0u8; 12];
        header[0] = fleetcast_wire::MAGIC;
        header[1] = fleetcast_wire::VERSION;
        header[2] = 0x01; // Hello
        header[4..8].copy_from_slice(&(2u32 << 20).to_be_bytes()); // 2 MiB > 1 MiB
        t.write_all(&header).expect("write header");
        t.flush().expect("flush");
        let (_, how) = wait_closed(|b| t.read(b), "oversized frame", &|| gw.diag());
        eprintln!("oversized frame: closed ({how})");
        wait_logged(
            &gw,
            mark,
            "before authentication exceeds the pre-authentication limit of 4096",
        );

        // 4. A valid device certificate, a Hello claiming the good device.
        let mark = gw.stderr().len();
        let cert_der = CertificateDer::from_pem_file(&evil_cert).expect("cert");
        let fp: [u8; 32] = ring_sha256(cert_der.as_ref());
        let mut t = tls_connect(
            attacker,
            &gw,
            tls_config(&gw.ca(), Some((&evil_cert, &evil_key))),
        );
        let t0 = now();
        let wnow = || WireInstant::from_micros(t0.elapsed().as_micros() as u64);
        let mut core = AgentSession::new(
            wnow(),
            SessionConfig::default(),
            FirstMessage::Hello(Hello {
                device_id: good_id,
                credential: Cow::Borrowed(&fp),
                agent_version: "hostile".into(),
                boot_id: [7; 16],
                last: None,
            }),
        )
        .expect("core");
        let mut out = Vec::new();
        while core.poll_transmit(wnow(), &mut out).is_some() {}
        t.write_all(&out).expect("write hello");
        t.flush().expect("flush");
        let (got, how) = wait_closed(|b| t.read(b), "hello for another device", &|| gw.diag());
        eprintln!("forged hello: closed ({how}), {} bytes", got.len());
        let _ = core.handle_input(wnow(), &got);
        let mut closed = None;
        while let Some(ev) = core.poll_event() {
            match ev {
                AgentEvent::Closed(info) => closed = Some(info),
                AgentEvent::Welcomed(w) => panic!("a forged hello was welcomed: {w:?}"),
                _ => {}
            }
        }
        let info =
            closed.unwrap_or_else(|| panic!("no Close frame for the forged hello\n{}", gw.diag()));
        assert_eq!(info.code, CloseCode::UNAUTHENTICATED, "{info:?}");
        wait_logged(
            &gw,
            mark,
            &format!("hello for device {good_id} on a session authenticated as device {evil_id}"),
        );

        // 5. Revocation: while online, then again at the next connection.
        let mut ev_agent = evil.spawn(attacker);
        gw.wait_online("evil", WAIT, || evil.output());
        let mark = gw.stderr().len();
        gw.admin(&Request::DeviceRevoke {
            name: "evil".into(),
        });
        let st = wait_exit(&mut ev_agent, CUT, || {
            format!("{}\n{}", evil.output(), gw.diag())
        });
        assert_eq!(
            st.code(),
            Some(1),
            "revoked agent exits with an error\n{}",
            evil.output()
        );
        wait_logged(&gw, mark, "code=revoked");
        let mark = gw.stderr().len();
        let mut ev_agent = evil.spawn(attacker);
        let st = wait_exit(&mut ev_agent, CUT, || {
            format!("{}\n{}", evil.output(), gw.diag())
        });
        assert_eq!(
            st.code(),
            Some(1),
            "revoked agent is refused\n{}",
            evil.output()
        );
        wait_logged(&gw, mark, "code=revoked");
        let agent_log = read_log(&evil.log);
        assert_eq!(
            agent_log
                .to_lowercase()
                .matches("refused this device: revoked")
                .count(),
            2,
            "{agent_log}"
        );
        let row = gw.device("evil").expect("row");
        assert_eq!(row["revoked"], true, "{row:#}");
        assert_eq!(row["online"], false, "{row:#}");

        let (_, how, took) = stall.join().expect("stall thread");
        eprintln!("stalled handshake: closed ({how}) after {took:?}");
        assert!(
            gw.stderr().contains("TLS handshake timed out"),
            "{}",
            gw.diag()
        );
    });

    // The good device: one session throughout, its queue complete, in order, exactly once.
    let q = gw.wait_done("good", WAIT, || good.output());
    let cmds = q["commands"].as_array().expect("commands");
    assert_eq!(cmds.len() as u64, COMMANDS, "{q:#}");
    assert!(cmds.iter().all(|c| c["state"] == "ok"), "{q:#}");
    let want: Vec<String> = (1..=COMMANDS).map(|n| n.to_string()).collect();
    let got: Vec<String> = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(got, want);
    let events = gw.events();
    let kinds: Vec<&str> = events
        .iter()
        .filter(|e| e["device"] == good_id)
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "connected").count(),
        1,
        "the good agent kept its session: {kinds:?}"
    );
    assert!(!kinds.contains(&"disconnected"), "{kinds:?}");
    assert!(gw.exited().is_none(), "the gateway survived\n{}", gw.diag());
}

fn ring_sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}
