//! The operator CLI against a real gateway on 127.0.0.1: every command, in its human and its
//! `--json` form, and the documented exit codes (`fleetcast_daemon::exit`). Also: the gateway's
//! systemd readiness datagram, its metrics endpoint, and an online backup.
//!
//! One gateway (run as `fleetcast __gateway`: the same `daemon_main` as `fleetcastd`, which
//! this package cannot name) and one real agent (run as `fleetcast __agent`) serve the whole
//! file: the steps depend on each other (a device must exist before it is grouped), so they
//! are one test. Everything listens on loopback; nothing is multicast.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const CLI: &str = env!("CARGO_BIN_EXE_fleetcast");

/// `fleetcastd`: the CLI's internal gateway mode, whose arguments are `fleetcastd`'s.
fn gatewayd() -> Command {
    let mut c = Command::new(CLI);
    c.args(["__gateway", "--"]);
    c
}

/// A child killed (by its PID) and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[allow(clippy::disallowed_methods)] // Test deadlines: the file's one clock read.
fn now() -> Instant {
    Instant::now()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", self.stdout, self.stderr))
    }
}

fn cli(data: &Path, args: &[&str]) -> Run {
    let o: Output = Command::new(CLI)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("FLEETCAST_DATA_DIR")
        .output()
        .expect("run fleetcast");
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Runs the CLI and checks its exit code; returns the run.
#[track_caller]
fn expect(data: &Path, args: &[&str], code: i32) -> Run {
    let r = cli(data, args);
    assert_eq!(
        r.code, code,
        "fleetcast {args:?}: exit {} (want {code})\nstdout:\n{}\nstderr:\n{}",
        r.code, r.stdout, r.stderr
    );
    r
}

/// `--json` form: exit code, one JSON document, `ok` as the code says.
#[track_caller]
fn expect_json(data: &Path, args: &[&str], code: i32) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let v = expect(data, &a, code).json();
    assert_eq!(v["ok"], code == 0, "{v:#}");
    v
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Gw {
    _p: Proc,
    data: PathBuf,
    addr: String,
    metrics: String,
}

/// Starts fleetcastd on loopback with metrics on, notifying readiness to `notify`.
fn start_gateway(dir: &Path, notify: &Path) -> Gw {
    let data = dir.join("gateway");
    let mut child = gatewayd()
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--server-name", "127.0.0.1"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", notify)
        .env("NO_COLOR", "1")
        .env_remove("FLEETCAST_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("gateway.stderr")).unwrap())
        .spawn()
        .expect("spawn fleetcastd");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let p = Proc(child);
    let ready = lines.next().expect("ready line").unwrap();
    let addr = ready
        .strip_prefix("ready ")
        .expect("ready line")
        .to_string();
    let m = lines.next().expect("metrics line").unwrap();
    let metrics = m
        .strip_prefix("metrics http://")
        .and_then(|m| m.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("metrics line: {m}"))
        .to_string();
    Gw {
        _p: p,
        data,
        addr,
        metrics,
    }
}

/// One HTTP request to the metrics endpoint; returns (status line, body).
fn http(addr: &str, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a response head");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of one sample in Prometheus text.
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn every_command_with_json_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let gw = start_gateway(dir.path(), &notify_path);
    let data = gw.data.as_path();

    // Readiness: systemd's datagram arrives once the gateway is listening.
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 datagram");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");

    // status
    let st = expect(data, &["status"], 0);
    assert!(st.stdout.contains("online: 0"), "{}", st.stdout);
    let st = expect_json(data, &["status"], 0);
    assert_eq!(st["data"]["online"], 0);
    // The metrics before any device: they move later.
    let (status, before) = http(&gw.metrics, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let build = format!(
        "fleetcast_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    for (name, v) in [
        ("fleetcast_sessions_connected", 0),
        ("fleetcast_commands_dispatched_total", 0),
        ("fleetcast_commands_completed_total", 0),
        ("fleetcast_mcast_nacks_total", 0),
        (build.as_str(), 1),
    ] {
        assert_eq!(sample(&before, name), Some(v), "{name}:\n{before}");
    }

    // device add (human and JSON), then a real agent enrols with the token.
    let r = expect(data, &["device", "add", "web1", "--group", "g1"], 0);
    assert!(r.stdout.contains("token: "), "{}", r.stdout);
    let v = expect_json(data, &["device", "add", "web2"], 0);
    assert!(v["data"]["token"].as_str().is_some_and(|t| !t.is_empty()));
    let token = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap()
        .to_string();
    // The agent takes its settings from a configuration file, one of them from the
    // environment, and a flag over both.
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent_toml = agent_dir.join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "gateway = \"{}\"\nstate_dir = \"/nonexistent/overridden\"\nname = \"web1\"\n\
             token = \"{token}\"\n",
            gw.addr
        ),
    )
    .unwrap();
    // Its report reads a fake root (CPU, memory, a disk, a serial port, apk's database), so
    // what `device show` must say does not depend on this machine's hardware.
    let root = agent_dir.join("root");
    for (rel, text) in [
        ("proc/cpuinfo", "processor : 0\nmodel name : Lab CPU\n"),
        ("proc/meminfo", "MemTotal: 2048 kB\n"),
        ("sys/block/vda/size", "8\n"),
        ("sys/block/vda/device/serial", "LAB-DISK-1\n"),
        ("dev/ttyUSB0", ""),
        ("lib/apk/db/installed", "P:musl\nV:1.2.4-r2\n\n"),
    ] {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let agent_log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let _agent = Proc(
        Command::new(CLI)
            .args(["__agent", "--config"])
            .arg(&agent_toml)
            .arg("--state-dir")
            .arg(agent_dir.join("state"))
            .arg("--report-root")
            .arg(&root)
            .args(["--reboot-exit", "75"])
            .env("FLEETCAST_AGENT_CA", data.join("pki/ca.pem"))
            .stdin(Stdio::null())
            .stdout(agent_log.try_clone().unwrap())
            .stderr(agent_log)
            .spawn()
            .expect("spawn agent"),
    );
    // device list
    wait_for("web1 online", || {
        let v = expect_json(data, &["device", "list"], 0);
        v["data"]["devices"]
            .as_array()?
            .iter()
            .find(|d| d["name"] == "web1" && d["online"] == true)
            .map(|_| ())
    });
    let r = expect(data, &["device", "list"], 0);
    assert!(r.stdout.contains("web1"), "{}", r.stdout);
    // device show: the report the agent sent after its Welcome, and when it came.
    let shown = wait_for("web1's report", || {
        let v = expect_json(data, &["device", "show", "web1"], 0);
        (!v["data"]["report"].is_null()).then_some(v)
    });
    let rep = &shown["data"]["report"];
    assert!(
        shown["data"]["report_ms"].as_u64().is_some_and(|t| t > 0),
        "{shown:#}"
    );
    assert_eq!(rep["cpu_model"], "Lab CPU", "{shown:#}");
    assert_eq!(
        (rep["cpus"].as_u64(), rep["memory"].as_u64()),
        (Some(1), Some(2048 * 1024))
    );
    assert_eq!(rep["package_manager"], "apk");
    assert_eq!(
        rep["software"],
        serde_json::json!([{ "name": "musl", "version": "1.2.4-r2" }])
    );
    let targets: Vec<&str> = rep["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["target"].as_str())
        .collect();
    assert_eq!(
        targets,
        ["disk:LAB-DISK-1", "serial:/dev/ttyUSB0"],
        "{shown:#}"
    );
    assert!(!rep["hostname"].as_str().unwrap_or_default().is_empty());
    let r = expect(data, &["device", "show", "web1"], 0);
    for want in [
        "report_ms: ",
        "cpu_model: Lab CPU",
        "disk:LAB-DISK-1  vda",
        "musl 1.2.4-r2",
    ] {
        assert!(r.stdout.contains(want), "{want}: {}", r.stdout);
    }
    let v = expect_json(data, &["device", "show", "nosuch"], 4);
    assert_eq!(v["kind"], "not_found");
    // queue add --attached: a target the report lists runs (and its steps see it); one it
    // does not list fails before any step, saying why.
    expect(
        data,
        &[
            "queue",
            "add",
            "web1",
            "--attached",
            "disk:LAB-DISK-1",
            "--",
            "sh:echo \"got $FLEETCAST_TARGET_PATH\"",
        ],
        0,
    );
    expect(
        data,
        &[
            "queue",
            "add",
            "web1",
            "--continue-on-failure",
            "--attached",
            "disk:NOPE",
            "--",
            "sh:echo ran",
        ],
        0,
    );
    let v = expect_json(
        data,
        &[
            "queue",
            "add",
            "web1",
            "--attached",
            "disk",
            "--",
            "exec:true",
        ],
        1,
    );
    assert!(v["error"].as_str().unwrap().contains("KIND:ID"), "{v}");
    let cmds = wait_for("the targeted commands", || {
        let v = expect_json(data, &["queue", "show", "web1"], 0);
        let cmds = v["data"]["commands"].as_array()?.clone();
        (cmds.len() == 2
            && cmds
                .iter()
                .all(|c| c["state"] != "pending" && c["state"] != "running"))
        .then_some(cmds)
    });
    assert_eq!(cmds[0]["state"], "ok", "{cmds:#?}");
    assert_eq!(cmds[0]["target"], "disk:LAB-DISK-1");
    let out0 = cmds[0]["output"].as_str().unwrap();
    assert!(
        out0.contains("target disk:LAB-DISK-1 is /dev/vda") && out0.contains("got /dev/vda"),
        "{out0}"
    );
    assert_eq!(cmds[1]["state"], "failed", "{cmds:#?}");
    assert_eq!(cmds[1]["exit_code"], -3);
    let out1 = cmds[1]["output"].as_str().unwrap();
    assert!(
        out1.contains(
            "target disk:NOPE is not attached to this device (attached: disk:LAB-DISK-1 (vda))"
        ) && !out1.lines().any(|l| l == "ran"),
        "{out1}"
    );
    // An enrolled name cannot be added again: refused, exit 1.
    let v = expect_json(data, &["device", "add", "web1"], 1);
    assert!(
        v["error"].as_str().unwrap().contains("exists already"),
        "{v}"
    );

    // group add / list
    expect(data, &["group", "add", "g2", "web1"], 0);
    let v = expect_json(data, &["group", "list"], 0);
    let text = v.to_string();
    assert!(text.contains("g1") && text.contains("g2"), "{v:#}");
    expect(data, &["group", "list"], 0);
    let v = expect_json(data, &["group", "add", "g3", "nosuch"], 4);
    assert_eq!(v["kind"], "not_found");

    // queue add / show; the command runs on the agent.
    expect(data, &["queue", "add", "web1", "--", "sh:echo from-cli"], 0);
    let v = expect_json(
        data,
        &["queue", "add", "g2", "--each", "--", "exec:true", "report"],
        0,
    );
    assert_eq!(
        v["data"]["queued"].as_array().map(Vec::len),
        Some(2),
        "{v:#}"
    );
    wait_for("web1's queue done", || {
        let v = expect_json(data, &["queue", "show", "web1"], 0);
        (v["data"]["queue"]["status"] == "done").then_some(())
    });
    let r = expect(data, &["queue", "show", "web1"], 0);
    assert!(r.stdout.contains("from-cli"), "{}", r.stdout);
    // pause / resume / cancel succeed; retry / skip of a queue that has not failed are
    // refused (1); a device that does not exist is 4.
    expect_json(data, &["queue", "pause", "web1"], 0);
    // status: per device the queue's pending count, and what its Welcome says is pending
    // (no command while the queue is paused; no task).
    expect(data, &["queue", "add", "web1", "--", "exec:true"], 0);
    let v = expect_json(data, &["status"], 0);
    let row = v["data"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "web1")
        .cloned()
        .unwrap();
    assert_eq!(
        (
            &row["pending"],
            &row["pending_commands"],
            &row["pending_transfers"]
        ),
        (&Value::from(1), &Value::from(0), &Value::from(0)),
        "{row:#}"
    );
    let r = expect(data, &["status"], 0);
    assert!(
        r.stdout
            .contains("pending=1  pending_commands=0  pending_transfers=0"),
        "{}",
        r.stdout
    );
    expect(data, &["queue", "resume", "web1"], 0);
    expect_json(data, &["queue", "cancel", "web1"], 0);
    let v = expect_json(data, &["queue", "retry", "web1"], 1);
    let refusal = v["error"].as_str().unwrap();
    assert!(
        refusal.starts_with("web1: retry is not allowed while the queue is"),
        "{v}"
    );
    assert_plain("a refusal", refusal);
    let r = expect(data, &["queue", "skip", "web1"], 1);
    assert!(r.stderr.starts_with("fleetcast: "), "{}", r.stderr);
    for sub in ["show", "pause", "resume", "cancel", "retry", "skip"] {
        let v = expect_json(data, &["queue", sub, "nosuch"], 4);
        assert!(v["error"].as_str().unwrap().contains("device list"), "{v}");
    }
    expect(data, &["queue", "add", "nosuch", "--", "exec:true"], 4);
    // Usage errors are 2: a bad step, a missing argument.
    let r = expect(data, &["queue", "add", "web1", "--", "dance"], 2);
    assert!(r.stderr.contains("unknown step"), "{}", r.stderr);
    let v = expect_json(data, &["queue", "add", "web1", "--", "dance"], 2);
    assert_eq!(v["kind"], "usage");
    expect(data, &["queue", "show"], 2);
    expect(data, &["no-such-command"], 2);
    let v = expect_json(data, &["queue", "show"], 2);
    assert!(v["error"].as_str().unwrap().contains("DEVICE"), "{v}");
    assert_eq!(v["kind"], "usage");

    // push: refused without multicast (1, and it says which setting to give); a missing file
    // is 4.
    let file = dir.path().join("payload.bin");
    std::fs::write(&file, vec![7u8; 4096]).unwrap();
    let f = file.to_str().unwrap();
    let r = expect(data, &["push", f, "--group", "g1"], 1);
    assert!(r.stderr.contains("--mcast-addr"), "{}", r.stderr);
    let v = expect_json(data, &["push", f, "--group", "g1", "--no-follow"], 1);
    assert!(
        v["error"].as_str().unwrap().contains("multicast is off"),
        "{v}"
    );
    expect_json(data, &["push", "/nonexistent/file", "--group", "g1"], 4);

    // task list / show
    let v = expect_json(data, &["task", "list"], 0);
    assert_eq!(v["data"]["tasks"], Value::Array(vec![]), "{v:#}");
    expect(data, &["task", "show"], 0);
    let v = expect_json(data, &["task", "show", "99"], 4);
    assert!(v["error"].as_str().unwrap().contains("no task 99"), "{v}");
    // task cancel / retry: of the whole task or one device; an unknown task is 4, a missing
    // id 2. (A task needs multicast, which this file does not run: the fleet's and the lab's
    // tests cancel and retry real ones.)
    for args in [
        &["task", "cancel", "99"][..],
        &["task", "cancel", "99", "--device", "web1"][..],
        &["task", "retry", "99"][..],
        &["task", "retry", "99", "--device", "web1"][..],
    ] {
        let v = expect_json(data, args, 4);
        assert_eq!(v["kind"], "not_found", "{v}");
        assert!(v["error"].as_str().unwrap().contains("no task 99"), "{v}");
    }
    let r = expect(data, &["task", "retry", "99"], 4);
    assert!(
        r.stderr.starts_with("fleetcast: no task 99"),
        "{}",
        r.stderr
    );
    expect(data, &["task", "cancel"], 2);
    expect(data, &["task", "retry", "--device", "web1"], 2);

    // events / watch
    let v = expect_json(data, &["events", "--limit", "1000"], 0);
    let events = v["data"]["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["message"].as_str().unwrap_or("").contains("web1")),
        "{v:#}"
    );
    let r = expect(data, &["events"], 0);
    assert!(r.stdout.contains("events:"), "{}", r.stdout);
    let r = expect(data, &["--json", "watch", "--from", "0", "--for", "1"], 0);
    let first = r.stdout.lines().next().expect("an event line");
    let e: Value = serde_json::from_str(first).expect("watch --json: one object per line");
    assert!(e["id"].is_u64(), "{e}");
    let r = expect(data, &["watch", "--from", "0", "--for", "1"], 0);
    assert!(r.stdout.starts_with('#'), "{}", r.stdout);
    // A reader that goes away (`| head -1`) ends the output quietly, with the command's own
    // exit code: no panic, nothing on stderr, and `watch` stops instead of polling on.
    for args in [
        &["--json", "status"][..],
        &["--json", "events", "--limit", "1000"][..],
        &["watch", "--from", "0"][..],
        &["completions", "bash"][..],
    ] {
        let mut child = Command::new(CLI)
            .arg("--data-dir")
            .arg(data)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let start = now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("{args:?} with its reader gone: still running after 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
    // Output that cannot be written for another reason (a full disk) is a failure, said once.
    let o = Command::new(CLI)
        .arg("--data-dir")
        .arg(data)
        .args(["--json", "status"])
        .stdout(
            std::fs::File::options()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("fleetcast: cannot write the output: "),
        "{err}"
    );

    // metrics: over the admin socket (text and JSON) and over HTTP.
    let r = expect(data, &["metrics"], 0);
    assert_eq!(sample(&r.stdout, "fleetcast_sessions_connected"), Some(1));
    assert!(
        sample(&r.stdout, "fleetcast_commands_dispatched_total").is_some_and(|n| n >= 3),
        "{}",
        r.stdout
    );
    let q = expect_json(data, &["queue", "show", "web1"], 0);
    let state = q["data"]["queue"]["status"].as_str().unwrap().to_string();
    let v = expect_json(data, &["metrics"], 0);
    let key = format!("fleetcast_queues{{state=\"{state}\"}}");
    assert_eq!(v["data"]["samples"][&key], 1, "{key} in {v:#}");
    let (status, body) = http(&gw.metrics, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(sample(&body, "fleetcast_sessions_connected"), Some(1));
    assert!(sample(&body, "fleetcast_commands_completed_total").is_some_and(|n| n >= 3));
    assert_eq!(sample(&body, "fleetcast_mcast_enabled"), Some(0));
    let (status, _) = http(&gw.metrics, "GET /other HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = http(&gw.metrics, "POST /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    let (status, _) = http(&gw.metrics, "\x01\x02garbage\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");

    // backup: a consistent copy that opens as a store with the data; a second run into the
    // same directory is refused.
    let dest = dir.path().join("backup");
    let v = expect_json(data, &["backup", dest.to_str().unwrap()], 0);
    assert!(v["data"]["bytes"].as_u64().unwrap() > 0, "{v}");
    use fleetcast_store::prelude::*;
    let copy = fleetcast_store::Store::open(&dest).expect("the backup opens");
    let snap = copy.snapshot().unwrap();
    assert!(snap.device_by_name("web1").unwrap().is_some());
    drop(snap);
    drop(copy);
    let r = expect(data, &["backup", dest.to_str().unwrap()], 1);
    assert!(r.stderr.contains("not empty"), "{}", r.stderr);

    // device revoke: the agent is cut off; a second revoke of an unknown name is 4.
    expect_json(data, &["device", "revoke", "web1"], 0);
    expect(data, &["device", "revoke", "nosuch"], 4);

    // completions
    for shell in ["bash", "zsh", "fish"] {
        let r = expect(data, &["completions", shell], 0);
        assert!(r.stdout.contains("fleetcast"), "{shell}");
        assert!(r.stdout.contains("backup"), "{shell}");
    }
    expect(data, &["completions", "tcsh"], 2);
    let r = expect(data, &["--help"], 0);
    assert!(r.stdout.contains("Exit codes: 0 success"), "{}", r.stdout);

    // The agent's effective configuration, and a refused one (exit 2, the key named).
    let run_agent = |args: &[&str]| {
        let o = Command::new(CLI)
            .args(["__agent", "--config"])
            .arg(&agent_toml)
            .args(args)
            .env("FLEETCAST_AGENT_DOWNLOADS", "/srv/dl")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        (o.status.code(), out, err)
    };
    let (code, out, err) = run_agent(&["--state-dir", "/flag", "--print-config"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&format!("gateway = \"{}\"\n", gw.addr)),
        "{out}"
    );
    assert!(out.contains("state_dir = \"/flag\"\n"), "{out}");
    assert!(out.contains("downloads = \"/srv/dl\"\n"), "{out}");
    std::fs::write(&agent_toml, "gateway = \"x:1\"\nstat_dir = \"/s\"\n").unwrap();
    let (code, _, err) = run_agent(&["--print-config"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("line 2: unknown key `stat_dir`"), "{err}");

    // The gateway's log of all this (a file, so no colour): plain values only.
    let log = std::fs::read_to_string(dir.path().join("gateway.stderr")).unwrap();
    assert!(log.contains("session closed"), "{log}");
    assert_plain("the gateway's log", &log);
}

/// Operator-facing text carries no Rust debug output and no colour codes.
#[track_caller]
fn assert_plain(what: &str, text: &str) {
    for debug in ["Some(", "None", "DeviceId(", "\\\"", "\u{1b}"] {
        assert!(!text.contains(debug), "{debug:?} in {what}:\n{text}");
    }
}

#[test]
fn an_unreachable_gateway_says_how_to_start_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("nowhere");
    let r = expect(&data, &["status"], 3);
    let d = data.display().to_string();
    assert!(
        r.stderr.contains(&format!("fleetcastd --data-dir {d}")),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("admin.sock"), "{}", r.stderr);
    assert!(r.stderr.contains("FLEETCAST_DATA_DIR"), "{}", r.stderr);
    let v = expect_json(&data, &["device", "list"], 3);
    assert_eq!(v["kind"], "unreachable");
    // A stale socket (nobody listening) is the same case.
    std::fs::create_dir_all(&data).unwrap();
    drop(std::os::unix::net::UnixListener::bind(data.join("admin.sock")).unwrap());
    let r = expect(&data, &["queue", "show", "x"], 3);
    assert!(r.stderr.contains("nothing listens"), "{}", r.stderr);
    expect(&data, &["watch", "--for", "1"], 3);
}

/// The command names of a `--help` text's "Commands:" list (without `help`).
fn commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect()
}

#[test]
fn every_command_is_in_the_operator_guide() {
    let doc = include_str!("../../docs/operator.md");
    let help = |args: &[&str]| {
        let o = Command::new(CLI).args(args).arg("--help").output().unwrap();
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let top = commands(&help(&[]));
    assert!(top.len() >= 12, "{top:?}");
    for c in &top {
        let subs = commands(&help(&[c]));
        if subs.is_empty() {
            assert!(
                doc.contains(&format!("| `{c}")),
                "`{c}` is not in docs/operator.md"
            );
        }
        for s in subs {
            assert!(
                doc.contains(&format!("`{c} {s}")),
                "`{c} {s}` is not in docs/operator.md"
            );
        }
    }
}

/// `fleetcast image prepare` through the binary: what it made, then the cache found.
#[test]
fn image_prepare_makes_then_finds_the_cache() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(4 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[7u8; 100_000], 1 << 20).unwrap();
    drop(f);
    let cache = d.path().join("cache");
    let run = |extra: &[&str]| {
        let mut c = Command::new(CLI);
        c.args(["image", "prepare"]).arg(&img).arg("--compress");
        c.arg("--cache-dir").arg(&cache).args(extra);
        c.env("FLEETCAST_DATA_DIR", d.path().join("no-gateway"));
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let first = run(&[]);
    assert!(first.contains("image bytes 4194304"), "{first}");
    assert!(first.contains("data bytes 102400 in 1 extents"), "{first}");
    assert!(first.contains("(built)"), "{first}");
    assert!(first.contains("CPU"), "{first}");
    let second = run(&["--json"]);
    let v: serde_json::Value = serde_json::from_str(&second).unwrap();
    assert_eq!(v["data"]["cache"], "cached", "{second}");
    assert_eq!(v["data"]["compressed"]["cache"], "cached", "{second}");
    assert_eq!(v["data"]["compressed"]["chunks"], 1, "{second}");
    assert!(
        v["data"]["compressed"]["bytes"].as_u64().unwrap() < 1000,
        "{second}"
    );
    // A missing image is "not found".
    let o = Command::new(CLI)
        .args(["image", "prepare"])
        .arg(d.path().join("missing.img"))
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read image"));
    // Bad sizes are usage errors naming the flag.
    let o = Command::new(CLI)
        .args(["image", "prepare", "x", "--chunk", "1G"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--chunk"));
}
