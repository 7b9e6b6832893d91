//! `fleetcastd` built inside the benches crate, so the load test (`tests/scale.rs`) and
//! `loadgen` can start a real gateway process (`CARGO_BIN_EXE_bench-gateway`).
//!
//! One addition for measurement: a counting global allocator (one relaxed atomic add per
//! allocation and free). Every 500 ms a thread writes the live heap bytes to
//! `DATA_DIR/heap-live`, which `loadgen` reads to report heap bytes per session next to RSS.

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
    fleetcast_daemon::daemon_main::main_with_args(args)
}
