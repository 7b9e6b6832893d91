//! The lab proxy (tinyproxy) really forwards, and its CONNECT-deny setting really denies.

mod common;

use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use fleetcast_lab::{Host, Lab, LabConfig, Proxy, ProxyConfig};

/// Sends `request` to `proxy` from `client`; returns the response header block and the bytes
/// after it (read until close or 2 s).
fn ask(
    client: Host<'_>,
    proxy: &Proxy,
    request: &str,
    then_send: Option<&[u8]>,
) -> (String, Vec<u8>) {
    let mut c = client
        .tcp_connect(proxy.addr, Duration::from_secs(2))
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        let n = c.read(&mut buf).unwrap_or(0);
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(
            n > 0,
            "proxy closed before a full response header: {:?}",
            String::from_utf8_lossy(&got)
        );
    };
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    let mut rest = got[end..].to_vec();
    if let Some(data) = then_send {
        c.write_all(data).unwrap();
    }
    while let Ok(n) = c.read(&mut buf) {
        if n == 0 || rest.len() > 4096 {
            break;
        }
        rest.extend_from_slice(&buf[..n]);
        if then_send.is_some_and(|d| rest.len() >= d.len()) {
            break;
        }
    }
    (head, rest)
}

fn status(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn proxy_forwards_and_connect_deny_denies() {
    let lab = Lab::new(LabConfig::hosts(5)).unwrap();
    let (server, client) = (lab.host(0), lab.host(1));
    let open = lab.proxy(2, ProxyConfig::default()).unwrap();
    let no_connect = lab
        .proxy(
            3,
            ProxyConfig {
                allow_connect: false,
                ..Default::default()
            },
        )
        .unwrap();
    let auth = lab
        .proxy(
            4,
            ProxyConfig {
                basic_auth: Some(("lab".into(), "secret".into())),
                ..Default::default()
            },
        )
        .unwrap();
    let listeners = [
        server.tcp_listener(80).unwrap(),
        server.tcp_listener(443).unwrap(),
    ];
    let stop = AtomicBool::new(false);
    let peers = Mutex::new(Vec::new());
    let peer_ips = || {
        peers
            .lock()
            .unwrap()
            .iter()
            .map(|p: &std::net::SocketAddr| p.ip())
            .collect::<Vec<_>>()
    };
    let get = format!(
        "GET http://{0}/hello HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
        server.addr()
    );
    let connect = format!(
        "CONNECT {0}:443 HTTP/1.1\r\nHost: {0}:443\r\n\r\n",
        server.addr()
    );

    std::thread::scope(|s| {
        s.spawn(|| common::serve(&listeners, &stop, &peers, common::echo_or_page));

        // Plain HTTP through the proxy: the page arrives, and the server saw the proxy's
        // address, not the client's: the proxy really forwarded.
        let (head, body) = ask(client, &open, &get, None);
        assert_eq!(status(&head), 200, "{head}");
        assert_eq!(body, b"hello from lab");
        assert_eq!(peer_ips(), [IpAddr::V4(lab.host(2).addr())]);

        // CONNECT tunnel: bytes go through to the echo server on 443 and back.
        let (head, echoed) = ask(client, &open, &connect, Some(b"tunnelled bytes"));
        assert_eq!(status(&head), 200, "{head}");
        assert_eq!(echoed, b"tunnelled bytes");
        assert_eq!(peers.lock().unwrap().len(), 2);

        // The CONNECT-deny proxy refuses the tunnel and never contacts the server...
        let (head, _) = ask(client, &no_connect, &connect, None);
        assert_eq!(status(&head), 403, "{head}");
        assert_eq!(
            peers.lock().unwrap().len(),
            2,
            "a denied CONNECT reached the server"
        );
        // ...but is a working proxy for plain HTTP.
        let (head, body) = ask(client, &no_connect, &get, None);
        assert_eq!(status(&head), 200, "{head}");
        assert_eq!(body, b"hello from lab");
        assert_eq!(peer_ips().last(), Some(&IpAddr::V4(lab.host(3).addr())));

        // Basic authentication: 407 without credentials, 200 with them.
        let (head, _) = ask(client, &auth, &get, None);
        assert_eq!(status(&head), 407, "{head}");
        let with_auth = get.replacen(
            "\r\n\r\n",
            "\r\nProxy-Authorization: Basic bGFiOnNlY3JldA==\r\n\r\n",
            1,
        );
        let (head, body) = ask(client, &auth, &with_auth, None);
        assert_eq!(status(&head), 200, "{head}");
        assert_eq!(body, b"hello from lab");
        stop.store(true, Ordering::Relaxed);
    });
}
