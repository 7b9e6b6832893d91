//! Shared harness of the lab integration tests: a real `fleetcastd` and real agents in the
//! namespaces of a [`fleetcast_lab::Lab`]. One file for two packages: the daemon's lab tests
//! use it as `mod common`, the CLI's (`cli/tests/lab_*.rs`, the ones that run the operator
//! CLI) include it by path.
//!
//! - The gateway is the daemon package's `fleetcastd` binary (in the cli package, which
//!   cannot name another package's binary, the same `daemon_main` run as
//!   `fleetcast __gateway --`; see [`gateway_program`]), run on a lab host with its stdout and
//!   stderr appended to files of the test's temporary directory (one file each across
//!   restarts, so a failure message shows the whole history).
//! - The agent has no binary this package can name, so the test binary re-executes itself in
//!   the host: `<test exe> --exact agent_role` with [`ROLE_ENV`]` = agent` and the agent's
//!   arguments as a JSON list in [`ARGS_ENV`]; each test file has a `#[test] fn agent_role()`
//!   that calls [`agent_role`], which runs `fleetcast_agent::cli::main_with_args` and exits
//!   with its code (and does nothing in an ordinary test run).
//! - The admin socket is a Unix socket in the gateway's data directory: the namespaces isolate
//!   the network, not the file system, so the test process talks to it directly.
//! - Every wait is a poll loop with a deadline whose failure message carries the gateway's
//!   stderr and whatever state the caller adds.
//! - Every process is a [`LabChild`] (killed and reaped on drop, and by the lab on any exit).
#![allow(dead_code)] // Each test file uses a different part of the harness.

pub mod cell;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fleetcast_daemon::admin::{self, OnFailureSpec, Request};
use fleetcast_lab::{Host, LabChild};
use fleetcast_wire::Step;
use serde_json::Value;

/// Environment variable that turns the test binary into an agent.
pub const ROLE_ENV: &str = "FLEETCAST_TEST_ROLE";
/// The agent's arguments, a JSON list of strings.
pub const ARGS_ENV: &str = "FLEETCAST_AGENT_ARGS";
/// The port the gateway listens on inside its lab host.
pub const PORT: u16 = 7300;
/// The exit code the agents use for a simulated reboot (`--reboot-exit`).
pub const REBOOT_EXIT: i32 = 75;

/// Body of every test file's `agent_role` test: when [`ROLE_ENV`] says so, run the agent and
/// exit with its code; otherwise return at once.
pub fn agent_role() {
    if std::env::var(ROLE_ENV).as_deref() != Ok("agent") {
        return;
    }
    let args: Vec<String> = serde_json::from_str(
        &std::env::var(ARGS_ENV)
            .expect("the agent role needs its arguments in FLEETCAST_AGENT_ARGS"),
    )
    .expect("FLEETCAST_AGENT_ARGS is a JSON list of strings");
    let code = fleetcast_agent::cli::main_with_args(args);
    // `ExitCode` has no stable accessor; it does have equality.
    let n = (0..=255u8)
        .find(|n| ExitCode::from(*n) == code)
        .map_or(1, i32::from);
    std::process::exit(n);
}

/// Makes `c`, a command that runs this test binary, the agent with `args` (see
/// [`agent_role`]).
pub fn as_agent<'c>(c: &'c mut Command, args: &[String]) -> &'c mut Command {
    c.args(["--exact", "agent_role", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, "agent")
        .env(ARGS_ENV, serde_json::to_string(args).expect("args json"))
}

/// The agent with `args` on this machine (the loopback tests): this test binary in the agent
/// role. The test file needs the `agent_role` test.
pub fn agent_command(args: &[String]) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("current exe"));
    as_agent(&mut c, args);
    c
}

/// The clock of the tests' deadlines (test-side, not protocol time).
#[allow(clippy::disallowed_methods)] // Test deadlines: the harness's one clock read.
pub fn now() -> Instant {
    Instant::now()
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout` with `what` and
/// the diagnostics `diag` returns then.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    diag: impl FnOnce() -> String,
) -> T {
    let start = now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out after {:?} waiting for {what}\n{}",
                timeout,
                diag()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A seeded random source (SplitMix64): every random choice of a test comes from it, and the
/// seed is printed so a failure can be replayed with `FLEETCAST_TEST_SEED`.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The seed from `FLEETCAST_TEST_SEED`, else `default`; printed.
    pub fn from_env(default: u64) -> Rng {
        let seed = std::env::var("FLEETCAST_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default);
        eprintln!("seed {seed} (set FLEETCAST_TEST_SEED to replay another)");
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }

    /// Random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next_u64() as u8;
        }
    }
}

/// Reads a log file, without ANSI colour sequences; empty if missing.
pub fn read_log(path: &Path) -> String {
    let raw = std::fs::read(path).unwrap_or_default();
    strip_ansi(&String::from_utf8_lossy(&raw))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn append(path: &Path) -> File {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}

/// The program that runs the gateway and the arguments that come before `fleetcastd`'s own:
/// `fleetcastd` itself in the daemon package; in the cli package the operator CLI's internal
/// `__gateway` mode (the same `daemon_main`, as `fleetcast demo` runs it). Cargo gives an
/// integration test the paths of its own package's binaries only, hence `option_env!`.
pub fn gateway_program() -> (&'static str, &'static [&'static str]) {
    match (
        option_env!("CARGO_BIN_EXE_fleetcastd"),
        option_env!("CARGO_BIN_EXE_fleetcast"),
    ) {
        (Some(daemon), _) => (daemon, &[]),
        (None, Some(cli)) => (cli, &["__gateway", "--"]),
        (None, None) => panic!("this package builds neither fleetcastd nor fleetcast"),
    }
}

/// A `fleetcastd` on a lab host, restartable with the same data directory and port.
pub struct Gateway<'lab> {
    host: Host<'lab>,
    child: Option<LabChild<'lab>>,
    /// The data directory (store, PKI, admin socket).
    pub data: PathBuf,
    /// Where agents connect.
    pub addr: SocketAddrV4,
    out: PathBuf,
    err: PathBuf,
    extra: Vec<String>,
    starts: usize,
}

impl<'lab> Gateway<'lab> {
    /// Starts `fleetcastd` on `host` with its data and logs under `dir`, and waits until it
    /// prints `ready`.
    pub fn start(host: Host<'lab>, dir: &Path, extra: &[&str]) -> Gateway<'lab> {
        let mut gw = Gateway {
            host,
            child: None,
            data: dir.join("gateway"),
            addr: SocketAddrV4::new(host.addr(), PORT),
            out: dir.join("gateway.stdout"),
            err: dir.join("gateway.stderr"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            starts: 0,
        };
        gw.restart();
        gw
    }

    /// Starts the gateway again (after [`Gateway::kill`] or an exit) and waits for `ready`.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the gateway is still running");
        let host = self.host.addr().to_string();
        let (out, err) = (append(&self.out), append(&self.err));
        let (program, lead) = gateway_program();
        let child = self
            .host
            .spawn(program, |c| {
                c.args(lead)
                    .arg("--data-dir")
                    .arg(&self.data)
                    .args(["--listen", &self.addr.to_string()])
                    .args(["--server-name", &host])
                    .args(&self.extra)
                    .env("NO_COLOR", "1")
                    .env("RUST_LOG", "info")
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err);
            })
            .expect("spawn fleetcastd");
        self.starts += 1;
        let want = self.starts;
        let child = self.child.insert(child);
        let (out, err) = (&self.out, &self.err);
        wait_for(
            "fleetcastd to print `ready`",
            Duration::from_secs(60),
            || {
                if let Some(st) = child.try_wait().ok().flatten() {
                    panic!("fleetcastd exited with {st}\nstderr:\n{}", read_log(err));
                }
                let ready = read_log(out)
                    .lines()
                    .filter(|l| l.starts_with("ready "))
                    .count();
                (ready >= want).then_some(())
            },
            || format!("--- gateway stderr ---\n{}", read_log(err)),
        );
    }

    /// SIGKILLs the gateway and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill fleetcastd");
        }
    }

    /// The running gateway's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(LabChild::id)
    }

    /// Whether the gateway process has exited, and how.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The gateway's stderr so far (all runs).
    pub fn stderr(&self) -> String {
        read_log(&self.err)
    }

    /// The CA certificate agents are given.
    pub fn ca(&self) -> PathBuf {
        self.data.join("pki").join("ca.pem")
    }

    /// Diagnostics for a failure message: the gateway's stderr.
    pub fn diag(&self) -> String {
        format!("--- gateway stderr ---\n{}", self.stderr())
    }

    /// One admin request; `Err` with the gateway's message if refused or unreachable.
    pub fn try_admin(&self, req: &Request) -> Result<Value, String> {
        match admin::request(&self.data, req) {
            Ok(r) if r.ok => Ok(r.data),
            Ok(r) => Err(r
                .error
                .unwrap_or_else(|| "refused without a message".into())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// One admin request that must succeed.
    pub fn admin(&self, req: &Request) -> Value {
        self.try_admin(req)
            .unwrap_or_else(|e| panic!("admin request {req:?} failed: {e}\n{}", self.diag()))
    }

    /// Issues an enrolment token for `name`.
    pub fn device_add(&self, name: &str) -> String {
        let d = self.admin(&Request::DeviceAdd {
            name: name.into(),
            groups: vec![],
        });
        d["token"]
            .as_str()
            .expect("token in device_add")
            .to_string()
    }

    /// The device list's row for `name`, if it is enrolled.
    pub fn device(&self, name: &str) -> Option<Value> {
        let d = self.try_admin(&Request::DeviceList).ok()?;
        d["devices"]
            .as_array()?
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
    }

    /// Waits until `name` is enrolled and online; returns its device id.
    pub fn wait_online(&self, name: &str, timeout: Duration, diag: impl Fn() -> String) -> u64 {
        wait_for(
            &format!("device {name} to be enrolled and online"),
            timeout,
            || {
                self.device(name)
                    .filter(|r| r["online"] == true)
                    .and_then(|r| r["id"].as_u64())
            },
            || format!("{}\n{}", diag(), self.diag()),
        )
    }

    /// `queue show` of a device (`Null` while the gateway is unreachable).
    pub fn queue(&self, name: &str) -> Value {
        self.try_admin(&Request::QueueShow {
            device: name.into(),
        })
        .unwrap_or(Value::Null)
    }

    /// Queues one command per element of `commands` for `target`.
    pub fn queue_add(
        &self,
        target: &str,
        commands: Vec<Vec<Step<'static>>>,
        on_failure: OnFailureSpec,
    ) {
        self.admin(&Request::QueueAdd {
            attached: None,
            target: target.into(),
            commands,
            timeout_ms: 60_000,
            max_attempts: 1,
            on_failure,
        });
    }

    /// The whole event log.
    pub fn events(&self) -> Vec<Value> {
        self.try_admin(&Request::Events {
            from: 0,
            limit: 10_000,
        })
        .ok()
        .and_then(|d| d["events"].as_array().cloned())
        .unwrap_or_default()
    }

    /// Every event in the log, oldest first (paged: one request returns at most 10,000).
    pub fn all_events(&self) -> Vec<Value> {
        let mut all: Vec<Value> = Vec::new();
        loop {
            let from = all
                .last()
                .and_then(|e| e["id"].as_u64())
                .map_or(0, |id| id + 1);
            let page = self
                .try_admin(&Request::Events {
                    from,
                    limit: 10_000,
                })
                .ok()
                .and_then(|d| d["events"].as_array().cloned())
                .unwrap_or_default();
            let short = page.len() < 10_000;
            all.extend(page);
            if short {
                return all;
            }
        }
    }

    /// Enrols devices `n1..=nN` in group `fleet`, starts their agents on lab hosts 1..=N and
    /// waits until every one is online.
    pub fn enrol_agents(
        &self,
        lab: &'lab fleetcast_lab::Lab,
        dir: &Path,
        n: usize,
    ) -> (Vec<AgentSpec>, Vec<LabChild<'lab>>) {
        let mut specs = Vec::new();
        let mut agents = Vec::new();
        for i in 1..=n {
            let name = format!("n{i}");
            let d = self.admin(&Request::DeviceAdd {
                name: name.clone(),
                groups: vec!["fleet".into()],
            });
            let token = d["token"].as_str().expect("token").to_string();
            let spec = AgentSpec::new(self, dir, &name, Some(token));
            agents.push(spec.spawn(lab.host(i)));
            specs.push(spec);
        }
        for (i, s) in specs.iter().enumerate() {
            self.wait_online(&format!("n{}", i + 1), Duration::from_secs(60), || {
                s.output()
            });
        }
        (specs, agents)
    }

    /// Runs the operator CLI `exe` (a cli test's `env!("CARGO_BIN_EXE_fleetcast")`) against
    /// this gateway, as an operator would; its stdout (it must succeed).
    pub fn cli(&self, exe: &str, args: &[&str]) -> String {
        let out = Command::new(exe)
            .arg("--data-dir")
            .arg(&self.data)
            .args(args)
            .output()
            .expect("run fleetcast");
        assert!(
            out.status.success(),
            "fleetcast {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.diag()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A task's status table (`task show`), one row per device; empty while unreachable.
    pub fn task_rows(&self, task: u64) -> Vec<Value> {
        self.try_admin(&Request::TaskShow { task: Some(task) })
            .ok()
            .and_then(|d| d["devices"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Diagnostics of a push: the task table, every agent's log, the gateway's stderr.
    pub fn task_report(&self, specs: &[AgentSpec], task: u64) -> String {
        let mut s = format!("task show: {:#?}\n", self.task_rows(task));
        for a in specs {
            s.push_str(&a.output());
            s.push('\n');
        }
        s.push_str(&self.diag());
        s
    }

    /// Waits until `name`'s queue is `done`; returns its `queue show`.
    pub fn wait_done(&self, name: &str, timeout: Duration, diag: impl Fn() -> String) -> Value {
        wait_for(
            &format!("the queue of {name} to be done"),
            timeout,
            || {
                let q = self.queue(name);
                (q["queue"]["status"] == "done").then_some(q)
            },
            || {
                format!(
                    "queue show {name}: {:#}\n{}\n{}",
                    self.queue(name),
                    diag(),
                    self.diag()
                )
            },
        )
    }
}

/// `sh:SCRIPT` as a step.
pub fn sh(script: &str) -> Step<'static> {
    admin::parse_step(&format!("sh:{script}")).expect("sh step")
}

/// Arguments and files of one agent.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// The gateway (`host:port`).
    pub gateway: String,
    /// Its state directory.
    pub state: PathBuf,
    /// Its boot id file.
    pub boot_id: PathBuf,
    /// Its stdout and stderr (appended across runs).
    pub log: PathBuf,
    /// The gateway CA.
    pub ca: PathBuf,
    /// A small dpkg status file for its reports.
    pub dpkg: PathBuf,
    /// Enrolment token and name.
    pub enrol: Option<(String, String)>,
    /// Extra arguments.
    pub extra: Vec<String>,
}

impl AgentSpec {
    /// An agent of `gw` whose files live in `dir/<name>/`; writes a first boot id.
    pub fn new(gw: &Gateway<'_>, dir: &Path, name: &str, token: Option<String>) -> AgentSpec {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).expect("agent dir");
        let dpkg = d.join("dpkg-status");
        std::fs::write(
            &dpkg,
            "Package: fleetcast-test\nStatus: install ok installed\nVersion: 1.0\n\n\
             Package: busybox\nStatus: install ok installed\nVersion: 1:1.36\n\n",
        )
        .expect("dpkg status");
        let spec = AgentSpec {
            gateway: gw.addr.to_string(),
            state: d.join("state"),
            boot_id: d.join("boot_id"),
            log: d.join("agent.log"),
            ca: gw.ca(),
            dpkg,
            enrol: token.map(|t| (t, name.to_string())),
            extra: vec!["--reboot-exit".into(), REBOOT_EXIT.to_string()],
        };
        spec.set_boot_id(&format!("00000000-0000-4000-8000-{:012x}", 1));
        spec
    }

    /// Writes a new boot id (what a reboot changes).
    pub fn set_boot_id(&self, uuid: &str) {
        std::fs::write(&self.boot_id, format!("{uuid}\n")).expect("boot id");
    }

    /// The command-line arguments.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--gateway".into(),
            self.gateway.clone(),
            "--state-dir".into(),
            self.state.display().to_string(),
            "--ca".into(),
            self.ca.display().to_string(),
            "--boot-id-file".into(),
            self.boot_id.display().to_string(),
            "--dpkg-status".into(),
            self.dpkg.display().to_string(),
        ];
        if let Some((t, n)) = &self.enrol {
            a.extend(["--token".into(), t.clone(), "--name".into(), n.clone()]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    /// Runs the agent (this test binary in the agent role) on `host`.
    pub fn spawn<'lab>(&self, host: Host<'lab>) -> LabChild<'lab> {
        let (out, err) = (append(&self.log), append(&self.log));
        host.spawn(std::env::current_exe().expect("current exe"), |c| {
            as_agent(c, &self.args())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
        })
        .expect("spawn agent")
    }

    /// The agent's output so far.
    pub fn output(&self) -> String {
        format!(
            "--- agent log {} ---\n{}",
            self.log.display(),
            read_log(&self.log)
        )
    }
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_exit(
    child: &mut LabChild<'_>,
    timeout: Duration,
    diag: impl FnOnce() -> String,
) -> ExitStatus {
    match child.wait_timeout(timeout).expect("wait") {
        Some(s) => s,
        None => panic!("process did not exit within {timeout:?}\n{}", diag()),
    }
}

/// The host part of a lab address, for messages.
pub fn ip(a: SocketAddrV4) -> Ipv4Addr {
    *a.ip()
}

/// The `status` of `name`'s row in a task table ("?" when it has none).
pub fn status_of(rows: &[Value], name: &str) -> String {
    rows.iter()
        .find(|r| r["device"] == name)
        .and_then(|r| r["status"].as_str())
        .unwrap_or("?")
        .to_string()
}
