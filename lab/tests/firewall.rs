//! Firewall profiles block what they claim and allow what they claim.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use fleetcast_lab::{Action, Host, Lab, LabConfig, Match, Profile};

const PATIENCE: Duration = Duration::from_millis(400);

/// Whether `from` can open a TCP connection to `to` and get one echoed message back.
fn tcp_ok(from: Host<'_>, to: SocketAddrV4) -> bool {
    let Ok(mut c) = from.tcp_connect(to, PATIENCE) else {
        return false;
    };
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 4];
    c.write_all(b"ping").is_ok() && c.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

/// Whether a datagram from `from` reaches `rx` (bound on `to`).
fn udp_ok(from: Host<'_>, rx: &UdpSocket, to: SocketAddrV4) -> bool {
    let tx = from.udp_socket(0).unwrap();
    rx.set_read_timeout(Some(PATIENCE)).unwrap();
    let tag = [from.index() as u8, to.port() as u8, 0x5a];
    let _ = tx.send_to(&tag, to);
    let mut buf = [0u8; 8];
    matches!(rx.recv(&mut buf), Ok(3) if buf[..3] == tag)
}

#[test]
fn profiles_block_and_allow_what_they_claim() {
    let lab = Lab::new(LabConfig::hosts(3)).unwrap();
    let (server, client, other) = (lab.host(0), lab.host(1), lab.host(2));
    let at = |h: Host<'_>, port| SocketAddrV4::new(h.addr(), port);
    let server_tcp: Vec<_> = [443, 8080].map(|p| server.tcp_listener(p).unwrap()).into();
    let client_tcp = [client.tcp_listener(9000).unwrap()];
    let other_tcp = [other.tcp_listener(3128).unwrap()];
    let udp5000 = server.udp_socket(5000).unwrap();
    let udp5001 = server.udp_socket(5001).unwrap();
    let stop = AtomicBool::new(false);
    let peers = Mutex::new(Vec::new());

    std::thread::scope(|s| {
        for ls in [&server_tcp[..], &client_tcp[..], &other_tcp[..]] {
            let (stop, peers) = (&stop, &peers);
            s.spawn(move || common::serve(ls, stop, peers, common::echo_or_page));
        }
        let everything_open = || {
            assert!(tcp_ok(client, at(server, 443)), "tcp 443 out");
            assert!(tcp_ok(client, at(server, 8080)), "tcp 8080 out");
            assert!(tcp_ok(client, at(other, 3128)), "tcp to the proxy host");
            assert!(tcp_ok(server, at(client, 9000)), "tcp in");
            assert!(udp_ok(client, &udp5000, at(server, 5000)), "udp 5000 out");
            assert!(udp_ok(client, &udp5001, at(server, 5001)), "udp 5001 out");
        };
        // Without a firewall everything works, so each block below is the profile's doing.
        everything_open();

        // "Only TCP 443 out".
        client.firewall(&Profile::OnlyTcpOut(vec![443])).unwrap();
        assert!(tcp_ok(client, at(server, 443)), "443 must stay allowed");
        assert!(!tcp_ok(client, at(server, 8080)), "8080 must be blocked");
        assert!(!tcp_ok(client, at(other, 3128)), "3128 must be blocked");
        assert!(
            !tcp_ok(server, at(client, 9000)),
            "incoming connections must be blocked"
        );
        assert!(
            !udp_ok(client, &udp5000, at(server, 5000)),
            "udp must be blocked"
        );
        // Dropped means a timeout; with Reject the failure is immediate and not a timeout.
        let err = client.tcp_connect(at(server, 8080), PATIENCE).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        client
            .firewall_with(&Profile::OnlyTcpOut(vec![443]), Action::Reject)
            .unwrap();
        let err = client.tcp_connect(at(server, 8080), PATIENCE).unwrap_err();
        assert_ne!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(
            tcp_ok(client, at(server, 443)),
            "443 must stay allowed under Reject"
        );

        client.clear_firewall().unwrap();
        everything_open();

        // "Nothing out but the proxy".
        client.firewall(&Profile::OnlyTo(at(other, 3128))).unwrap();
        assert!(
            tcp_ok(client, at(other, 3128)),
            "the proxy must stay reachable"
        );
        assert!(!tcp_ok(client, at(server, 443)), "443 must be blocked");
        assert!(
            !udp_ok(client, &udp5000, at(server, 5000)),
            "udp must be blocked"
        );

        // Block one UDP port only (replaces the previous profile).
        client
            .firewall(&Profile::Block(vec![Match::Udp(Some(5000))]))
            .unwrap();
        assert!(
            !udp_ok(client, &udp5000, at(server, 5000)),
            "udp 5000 must be blocked"
        );
        assert!(
            udp_ok(client, &udp5001, at(server, 5001)),
            "udp 5001 must pass"
        );
        assert!(tcp_ok(client, at(server, 443)), "tcp must pass");
        assert!(tcp_ok(client, at(server, 8080)), "tcp must pass");

        client.clear_firewall().unwrap();
        everything_open();
        stop.store(true, Ordering::Relaxed);
    });
}
