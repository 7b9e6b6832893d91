//! The gateway's limits against hostile local clients, with a real `fleetcastd` on
//! 127.0.0.1 (every byte stays on the loopback interface):
//!
//! - an admin request line over the size limit is refused with an error line and not
//!   executed, and the connection goes on serving the next line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleetcast_daemon::admin::{self, Request};

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
