//! The agent's log never takes the agent down: with stderr on a full disk (`/dev/full`) it
//! keeps retrying its gateway instead of panicking on the first line it cannot write. Only
//! 127.0.0.1 is dialled, on a port this test bound and released (so nothing answers).

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

const AGENT: &str = env!("CARGO_BIN_EXE_fleetcast-agent");

#[test]
fn a_full_disk_under_the_log_does_not_stop_the_agent() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let mut child = Command::new(AGENT)
        .args(["--gateway", &format!("127.0.0.1:{port}")])
        .args(["--state-dir", dir.path().join("state").to_str().unwrap()])
        .args(["--token", "t", "--name", "n1"])
        .args(["--ca-fingerprint", &"0".repeat(64)])
        .env("FLEETCAST_AGENT_ALT_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(full)
        .spawn()
        .expect("spawn fleetcast-agent");
    // Every rung fails at once and each failure is logged, so within a second the agent has
    // written (and lost) several lines; it must still be running, retrying.
    let mut exited = None;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(50));
        exited = child.try_wait().expect("try_wait");
        if exited.is_some() {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(exited, None, "the agent exited with its log on a full disk");
}
