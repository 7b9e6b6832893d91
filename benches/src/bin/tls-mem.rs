//! `tls-mem N`: what rustls itself keeps per idle gateway session. Builds the gateway's real
//! server configuration (`Pki::load_or_create` in a temporary directory), completes N mutual-TLS
//! handshakes in memory with enrolled-style client certificates, exchanges one small record each
//! way (like `Hello`/`Welcome`), and counts the heap bytes still live that were allocated inside
//! server-side rustls calls (a counting global allocator; client-side calls are not counted).
//! Prints the live bytes per `ServerConnection` and the allocator-level figure to compare with
//! the gateway's RSS per session from `loadgen`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use fleetcast_agent::tls::{self, DeviceKey};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
/// Live bytes in allocations of 4 KiB or more (the record buffers).
static LIVE_BIG: AtomicI64 = AtomicI64::new(0);

fn count(size: usize, delta: i64) {
    LIVE.fetch_add(delta, Ordering::Relaxed);
    if size >= 4096 {
        LIVE_BIG.fetch_add(delta, Ordering::Relaxed);
    }
}
static COUNTING: AtomicBool = AtomicBool::new(false);

// SAFETY: every call forwards to `System` unchanged; the counters have no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            count(l.size(), l.size() as i64);
        }
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            count(l.size(), -(l.size() as i64));
        }
        // SAFETY: the caller upholds `GlobalAlloc::dealloc`'s contract.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            count(l.size(), -(l.size() as i64));
            count(new, new as i64);
        }
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` with server-side counting on.
fn server<T>(f: impl FnOnce() -> T) -> T {
    COUNTING.store(true, Ordering::Relaxed);
    let r = f();
    COUNTING.store(false, Ordering::Relaxed);
    r
}

fn pump(c: &mut ClientConnection, s: &mut ServerConnection) {
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("client write");
        }
        if !buf.is_empty() {
            server(|| {
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    s.read_tls(&mut rd).expect("server read");
                    s.process_new_packets().expect("server process");
                }
            });
        }
        // Allocated outside the counted calls: the server's writes must not grow it there.
        let mut back = Vec::with_capacity(1 << 16);
        server(|| {
            while s.wants_write() {
                s.write_tls(&mut back).expect("server write");
            }
        });
        if !back.is_empty() {
            let mut rd = &back[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).expect("client read");
                c.process_new_packets().expect("client process");
            }
        }
        if buf.is_empty() && back.is_empty() && !c.is_handshaking() && !s.is_handshaking() {
            return;
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(Ok(2000), |a| a.parse())
        .map_err(|_| "usage: tls-mem [N]")?;
    let dir = tempfile::tempdir()?;
    let now = std::time::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    let pki = fleetcast_daemon::pki::Pki::load_or_create(
        &dir.path().join("pki"),
        &["localhost".to_string()],
        now,
    )?;
    let server_cfg = pki.server_config();
    let name = ServerName::try_from("localhost")?;
    let mut pairs = Vec::with_capacity(n);
    let mut after_handshake = 0i64;
    for i in 0..n {
        let start = LIVE.load(Ordering::Relaxed);
        let key = DeviceKey::generate()?;
        let cert = pki.issue_device_cert(i as u64 + 1, &format!("d{i}"), &key.spki_der(), now)?;
        let ccfg = tls::client_config(pki.ca_cert_der().as_ref(), Some((&cert, &key)))?;
        let mut c = ClientConnection::new(ccfg, name.clone())?;
        let mut s = server(|| ServerConnection::new(server_cfg.clone()))?;
        pump(&mut c, &mut s);
        after_handshake += LIVE.load(Ordering::Relaxed) - start;
        // One small record each way, read out (the gateway drains plaintext at once).
        c.writer().write_all(&[0u8; 120])?;
        pump(&mut c, &mut s);
        server(|| -> std::io::Result<()> {
            let mut sink = [0u8; 256];
            while let Ok(k) = s.reader().read(&mut sink) {
                if k == 0 {
                    break;
                }
            }
            s.writer().write_all(&[0u8; 60])
        })?;
        pump(&mut c, &mut s);
        assert!(!s.is_handshaking(), "handshake {i} did not finish");
        pairs.push((c, s));
    }
    let live = LIVE.load(Ordering::Relaxed);
    let big = LIVE_BIG.load(Ordering::Relaxed);
    println!(
        "{n} idle mTLS ServerConnections: {live} B live from server-side rustls calls, {:.0} B per session ({:.0} B of it in allocations >= 4 KiB)",
        live as f64 / n as f64,
        big as f64 / n as f64
    );
    println!(
        "  of which after the handshake alone: {:.0} B per session; size_of ServerConnection (inline, not counted above): {} B; size_of GatewaySession: {} B",
        after_handshake as f64 / n as f64,
        std::mem::size_of::<ServerConnection>(),
        std::mem::size_of::<fleetcast_wire::session::GatewaySession>()
    );
    drop(pairs);
    Ok(())
}
