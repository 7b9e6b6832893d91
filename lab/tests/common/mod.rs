//! Small servers the integration tests run on lab hosts, from the test's own threads.

#![allow(dead_code)] // each test file uses a subset

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Serves connections on `listeners` until `stop` is set: each connection is answered by
/// `reply(request_bytes)` and its peer address is recorded in `peers`.
pub fn serve(
    listeners: &[TcpListener],
    stop: &AtomicBool,
    peers: &Mutex<Vec<SocketAddr>>,
    reply: impl Fn(&[u8]) -> Vec<u8>,
) {
    for l in listeners {
        l.set_nonblocking(true).unwrap();
    }
    while !stop.load(Ordering::Relaxed) {
        let mut idle = true;
        for l in listeners {
            if let Ok((mut conn, peer)) = l.accept() {
                idle = false;
                peers.lock().unwrap().push(peer);
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let req = read_request(&mut conn);
                let _ = conn.write_all(&reply(&req));
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Reads until an HTTP header end, or a short message without one (up to 4 KiB).
pub fn read_request(conn: &mut TcpStream) -> Vec<u8> {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
        if req.windows(4).any(|w| w == b"\r\n\r\n") || !req.starts_with(b"GET") || req.len() > 4096
        {
            break;
        }
    }
    req
}

/// An echo for non-HTTP requests, a small page for HTTP ones.
pub fn echo_or_page(req: &[u8]) -> Vec<u8> {
    if req.starts_with(b"GET") {
        let body = "hello from lab";
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    } else {
        req.to_vec()
    }
}
