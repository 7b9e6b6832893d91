//! `fleetcastd` is safe by default, from the outside: one gateway per data directory, print
//! commands that write nothing, logs that cannot take the gateway down and read well in a
//! file, and a data directory private to its owner whatever the umask.
//!
//! Every gateway listens on 127.0.0.1 (port 0); nothing is multicast. Each child is killed by
//! its PID and reaped on drop.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use fleetcast_daemon::admin::{self, Request};

const GATEWAYD: &str = env!("CARGO_BIN_EXE_fleetcastd");

#[allow(clippy::disallowed_methods)] // Test deadlines: the file's one clock read.
fn now() -> Instant {
    Instant::now()
}

/// A running gateway: killed by its PID and reaped on drop.
struct Gw {
    child: Child,
    _stdout: BufReader<ChildStdout>,
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gw {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    #[track_caller]
    fn assert_running(&mut self, what: &str) {
        let st = self.child.try_wait().unwrap();
        assert!(st.is_none(), "the gateway exited ({st:?}) {what}");
    }
}

fn gateway_command(data: &Path) -> Command {
    let mut c = Command::new(GATEWAYD);
    c.arg("--data-dir")
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--server-name", "127.0.0.1"])
        .env_remove("FLEETCAST_DATA_DIR")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

/// Starts `c` and waits for its `ready` line.
fn start(mut c: Command) -> Gw {
    let mut child = c.spawn().expect("spawn fleetcastd");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let _ = out.read_line(&mut line);
    let mut gw = Gw {
        child,
        _stdout: out,
    };
    if !line.starts_with("ready ") {
        let st = gw.child.try_wait().unwrap();
        panic!("no ready line (got {line:?}; exit {st:?})");
    }
    gw
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `c` to its end, killing it (by PID) if it is still running after 20 s.
fn run_bounded(mut c: Command) -> Run {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "still running after 20 s; stderr:\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    Run {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Asks the gateway of `data` over its admin socket, as the operator CLI does (the CLI is
/// another package's binary; its own tests are in `cli/tests/`), and checks that it answered
/// `ok`.
#[track_caller]
fn admin_ok(data: &Path, req: Request) {
    match admin::request(data, &req) {
        Ok(r) => assert!(r.ok, "{req:?}: refused: {:?}", r.error),
        Err(e) => panic!("{req:?}: {e}"),
    }
}

fn status(data: &Path) {
    admin_ok(data, Request::Status);
}

fn device_add(data: &Path, name: &str) {
    admin_ok(
        data,
        Request::DeviceAdd {
            name: name.into(),
            groups: vec![],
        },
    );
}

/// What is compared of one entry: kind, mode, size, mtime in ns, inode, content of a file.
type Entry = (char, u32, u64, i128, u64, Vec<u8>);

/// Every entry under `dir`.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let kind = if m.is_dir() {
                todo.push(p.clone());
                'd'
            } else if m.is_file() {
                'f'
            } else {
                'o'
            };
            let content = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
            out.insert(
                p,
                (kind, m.mode() & 0o7777, m.len(), mtime, m.ino(), content),
            );
        }
    }
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_second_gateway_on_the_same_data_directory_is_refused_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = start(gateway_command(&data));
    status(&data);
    // The store's files change under a live gateway (LMDB's reader table); everything else
    // must stay exactly as it is.
    let outside_store = |m: BTreeMap<PathBuf, _>| -> BTreeMap<PathBuf, _> {
        m.into_iter()
            .filter(|(p, _)| !p.starts_with(data.join("store/")))
            .collect()
    };
    let before = outside_store(snapshot(&data));
    assert!(before.contains_key(&data.join("admin.sock")));
    let mut second = gateway_command(&data);
    second.args(["--server-name", "other.example"]);
    let r = run_bounded(second);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("in use by another fleetcastd")
            && r.stderr.contains(&format!("pid {}", first.pid())),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert_eq!(outside_store(snapshot(&data)), before);
    // The first gateway is still the one the admin socket reaches.
    device_add(&data, "web1");
    first.stop();
    // Once it is gone the lock goes with it: the next gateway starts.
    let again = start(gateway_command(&data));
    status(&data);
    again.stop();
}

#[test]
fn print_ca_fingerprint_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let print = |extra: &[&str]| {
        let mut c = Command::new(GATEWAYD);
        c.arg("--data-dir")
            .arg(&data)
            .arg("--print-ca-fingerprint")
            .args(extra)
            .env_remove("FLEETCAST_DATA_DIR");
        run_bounded(c)
    };
    // No CA yet: a clear error, and nothing created.
    let r = print(&[]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("no CA yet"), "{}", r.stderr);
    assert!(!data.exists(), "the print created the data directory");
    // A running gateway does not stand in the way of a print.
    let gw = start(gateway_command(&data));
    let live = print(&[]);
    assert_eq!(live.code, Some(0), "{}", live.stderr);
    let fp = live.stdout.trim();
    assert!(
        fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit()),
        "{fp}"
    );
    gw.stop();
    // The gateway made its certificate for 127.0.0.1 only; the prints are given other names
    // (without --server-name, the defaults): nothing may be re-issued, nothing written.
    let before = snapshot(&data);
    for extra in [&[][..], &["--server-name", "elsewhere.example"][..]] {
        let r = print(extra);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert_eq!(r.stdout, live.stdout);
        assert!(
            snapshot(&data) == before,
            "{extra:?}: the print changed the data directory"
        );
    }
}

#[test]
fn a_full_disk_under_the_log_does_not_stop_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let full = File::options().write(true).open("/dev/full").unwrap();
    let mut c = gateway_command(&data);
    c.args(["--log-level", "debug"]).stderr(full);
    let mut gw = start(c);
    // Each of these logs lines, all of them lost.
    for i in 0..5 {
        device_add(&data, &format!("dev{i}"));
        status(&data);
        gw.assert_running("with its log on a full disk");
    }
}

#[test]
fn logs_in_a_file_are_plain_text_with_plain_values() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for format in ["text", "json"] {
        let log = dir.path().join(format!("{format}.log"));
        let mut c = gateway_command(&data);
        c.args(["--log-format", format, "--metrics-listen", "127.0.0.1:0"])
            .stderr(File::create(&log).unwrap());
        let gw = start(c);
        status(&data);
        gw.stop();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("fleetcastd ready"), "{text}");
        assert!(!text.contains('\u{1b}'), "colour codes in a file:\n{text}");
        for debug in ["None", "Some(", "\\\"", "{ "] {
            assert!(
                !text.contains(debug),
                "Rust debug text {debug:?} in the log:\n{text}"
            );
        }
        if format == "json" {
            let mut saw_metrics = false;
            for l in text.lines() {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
                let f = &v["fields"];
                if f["message"] == "fleetcastd ready" {
                    assert!(
                        f["listen"].as_str().unwrap().starts_with("127.0.0.1:"),
                        "{v}"
                    );
                }
                if f["message"] == "serving metrics" {
                    let url = f["url"].as_str().unwrap();
                    assert!(url.starts_with("http://127.0.0.1:"), "{v}");
                    saw_metrics = true;
                }
            }
            assert!(saw_metrics, "{text}");
        }
    }
}

#[test]
fn the_data_directory_is_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The most permissive umask: only fleetcastd's own modes stand between the store and
    // other users.
    let umasked = || {
        let g = gateway_command(&data);
        let mut c = Command::new("sh");
        c.args(["-c", "umask 000 && exec \"$0\" \"$@\""])
            .arg(g.get_program())
            .args(g.get_args())
            .env_remove("FLEETCAST_DATA_DIR")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        c
    };
    let log = dir.path().join("gateway.log");
    let mut c = umasked();
    c.stderr(File::create(&log).unwrap());
    let gw = start(c);
    let private = |what: &str| {
        for (p, want) in [
            ("", 0o700),
            ("store", 0o700),
            ("store/data.mdb", 0o600),
            ("store/lock.mdb", 0o600),
            ("pki", 0o700),
            ("pki/ca.key", 0o600),
            ("pki/server.key", 0o600),
            ("fleetcastd.lock", 0o600),
            ("admin.sock", 0o600),
        ] {
            let got = mode(&data.join(p));
            assert_eq!(got, want, "{what}: {p} is {got:03o}, want {want:03o}");
        }
    };
    private("created under umask 000");
    gw.stop();
    // An existing directory open to others (an older build, a hand-made one) is tightened,
    // and the log says so.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(data.join("store"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        data.join("store/data.mdb"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut c = umasked();
    c.stderr(File::create(&log).unwrap());
    let gw = start(c);
    private("an open directory restarted");
    gw.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("open to other users") && text.contains("755"),
        "{text}"
    );
}
