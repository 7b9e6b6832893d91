//! `fleetcastd` built inside the benches crate, so the load test (`tests/scale.rs`) and
//! `loadgen` can start a real gateway process (`CARGO_BIN_EXE_bench-gateway`).
//!
//! One addition for measurement: a counting global allocator (one relaxed atomic add per
//! allocation and free). Every 500 ms a thread writes the live heap bytes to
//! `DATA_DIR/heap-live`, which `loadgen` reads to report heap bytes per session next to RSS.
//!
//! An experiment switch: with `BENCH_GATEWAY_BACKLOG=N`, once the gateway listens, its
//! listening TCP socket gets `listen(fd, N)` again (Linux resizes the accept queue of a
//! listening socket). This measures the proposed fix to `Gateway::bind` (mio's
//! `TcpListener::bind` uses a backlog of 128) without changing the daemon.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call forwards to `System` unchanged; the counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::dealloc`'s contract.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as i64 - l.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(dir) = args
        .iter()
        .position(|a| a == "--data-dir")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from)
    {
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let tmp = dir.join("heap-live.tmp");
            let live = LIVE.load(Ordering::Relaxed).to_string();
            if std::fs::write(&tmp, live).is_err()
                || std::fs::rename(&tmp, dir.join("heap-live")).is_err()
            {
                return;
            }
        });
    }
    if let Some(n) = std::env::var("BENCH_GATEWAY_BACKLOG")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        std::thread::spawn(move || {
            for _ in 0..200 {
                std::thread::sleep(Duration::from_millis(25));
                if relisten(n) {
                    return;
                }
            }
        });
    }
    fleetcast_daemon::daemon_main::main_with_args(args)
}

/// Calls `listen(fd, backlog)` on every listening TCP socket of this process. True if any.
fn relisten(backlog: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return false;
    };
    let mut done = false;
    for e in dir.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let mut accepting: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let mut ty: libc::c_int = 0;
        let mut tlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `getsockopt` writes at most `len` bytes into the valid locals; a non-socket
        // fd just fails with ENOTSOCK.
        let ok = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
                (&mut accepting as *mut libc::c_int).cast(),
                &mut len,
            ) == 0
                && libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_TYPE,
                    (&mut ty as *mut libc::c_int).cast(),
                    &mut tlen,
                ) == 0
        };
        // SAFETY: all-zero bytes are a valid `sockaddr_storage` (a plain C struct).
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut alen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `addr` is a valid, writable sockaddr_storage of `alen` bytes.
        let named = unsafe {
            libc::getsockname(
                fd,
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut alen,
            )
        } == 0;
        if ok && named && accepting == 1 && ty == libc::SOCK_STREAM
            && i32::from(addr.ss_family) == libc::AF_INET
            // SAFETY: `listen` on a socket this process owns only resizes its accept queue.
            && unsafe { libc::listen(fd, backlog) } == 0
        {
            done = true;
        }
    }
    done
}
