//! `fleetcast demo`: the whole system on this machine, no configuration, no root.
//!
//! 1. Builds a private lab network (user + network namespaces, a bridge, one host per
//!    process: see docs/lab.md) and starts a gateway with an embedded store on host 0, in a
//!    fresh temporary directory. Without user namespaces it says so and runs on 127.0.0.1
//!    instead, skipping the multicast part.
//! 2. Enrols a handful of real agents (separate processes, each with its own state directory
//!    and boot id, one per lab host) with one-time tokens; every later session is mutual TLS.
//! 3. Queues five commands per device with a reboot in the middle and plays the machine's
//!    part in each reboot (the agent exits, the demo gives it a new boot id and starts it
//!    again, and it comes back on a new TLS session).
//! 4. Takes one agent offline, makes every other host drop 2% of the multicast datagrams it
//!    receives, and pushes a generated 32 MiB image by multicast; then brings the offline
//!    agent back, which completes by unicast catch-up.
//! 5. Prints what happened and the measured figures, and checks its claims (each side effect
//!    exactly once and in order; every copy byte-identical) rather than assuming them.
//!
//! Progress is live: a bar per device, redrawn in place on a terminal, plain lines when the
//! output is not a terminal. Every process it starts is ended by PID when it finishes.

use std::io::{self, BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use fleetcast_daemon::admin::{self, OnFailureSpec, PushTrigger, Request};
use fleetcast_daemon::gateway::Clock;
use fleetcast_daemon::{errln, outln};
use fleetcast_lab::{Lab, LabChild, LabConfig, LabError};
use fleetcast_wire::{Instant, Step};
use serde_json::Value;

/// Exit code with which a demo agent "reboots".
const REBOOT_EXIT: i32 = 75;
/// The gateway's port.
const PORT: u16 = 7300;
/// Size of the demo image.
const IMAGE_MIB: usize = 32;
/// Loss on every online receiver during the push, percent.
const LOSS: f64 = 2.0;

/// A process the demo started: in a lab host or on this machine.
enum Running<'lab> {
    Lab(LabChild<'lab>),
    Local(Child),
}

impl Running<'_> {
    fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self {
            Running::Lab(c) => c.try_wait(),
            Running::Local(c) => c.try_wait(),
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        // Only processes this demo started, by PID (a LabChild does this on its own drop).
        if let Running::Local(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where the demo runs.
struct Net {
    lab: Option<Lab>,
}

impl Net {
    /// The address of host `i` (0: the gateway), or loopback.
    fn addr(&self, i: usize) -> std::net::Ipv4Addr {
        match &self.lab {
            Some(l) => l.host(i).addr(),
            None => std::net::Ipv4Addr::LOCALHOST,
        }
    }

    fn spawn(
        &self,
        i: usize,
        exe: &Path,
        configure: impl FnOnce(&mut Command),
    ) -> std::io::Result<Running<'_>> {
        match &self.lab {
            Some(l) => l.host(i).spawn(exe, configure).map(Running::Lab),
            None => {
                let mut c = Command::new(exe);
                configure(&mut c);
                c.spawn().map(Running::Local)
            }
        }
    }
}

fn new_boot_id(dir: &Path, device: &str, n: u32, clock: &Clock) -> std::io::Result<PathBuf> {
    let (mono, wall) = clock.read();
    let p = dir.join(format!("{device}.boot"));
    let id = format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        wall as u32,
        n,
        mono.as_micros() & 0xffff_ffff_ffff
    );
    std::fs::write(&p, id)?;
    Ok(p)
}

fn req(data: &Path, r: &Request) -> Result<Value, DemoError> {
    let resp = admin::request(data, r)?;
    if resp.ok {
        Ok(resp.data)
    } else {
        Err(DemoError::Refused(resp.error.unwrap_or_default()))
    }
}

/// Runs the demo with `devices` agents. Returns the process exit code.
pub fn run(devices: usize) -> ExitCode {
    match demo(devices.clamp(2, 50)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("fleetcast demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Live progress: one line per device, redrawn in place on a terminal; on a pipe, the
/// lines are printed only when they change.
struct Progress {
    tty: bool,
    drawn: usize,
    last: Vec<String>,
}

impl Progress {
    fn new() -> Self {
        Progress {
            tty: std::io::stdout().is_terminal(),
            drawn: 0,
            last: Vec::new(),
        }
    }

    fn show(&mut self, lines: Vec<String>) {
        if lines == self.last {
            return;
        }
        let mut out = std::io::stdout().lock();
        if self.tty {
            if self.drawn > 0 {
                // Back up over the previous frame and redraw it.
                let _ = write!(out, "\x1b[{}A", self.drawn);
            }
            for l in &lines {
                let _ = writeln!(out, "\x1b[2K  {l}");
            }
            self.drawn = lines.len();
        } else {
            for (i, l) in lines.iter().enumerate() {
                if self.last.get(i) != Some(l) {
                    let _ = writeln!(out, "  {l}");
                }
            }
        }
        let _ = out.flush();
        self.last = lines;
    }

    /// The next output starts below the frame.
    fn done(&mut self) {
        self.drawn = 0;
        self.last.clear();
    }
}

fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        (done.min(total) as usize * width) / total as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// `current_exe` failed: the demo re-executes its own binary.
    #[error("cannot find my own binary: {0}")]
    OwnBinary(#[source] io::Error),
    /// A file or directory of the demo could not be made or read.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which process.
        what: String,
        /// Cause.
        source: io::Error,
    },
    /// Whether a started agent is still running could not be asked.
    #[error("agent {name}: {source}")]
    Wait {
        /// The device.
        name: String,
        /// Cause.
        source: io::Error,
    },
    /// The admin socket did not answer.
    #[error(transparent)]
    Admin(#[from] admin::ClientError),
    /// The gateway refused a request (its own words).
    #[error("{0}")]
    Refused(String),
    /// An answer or the gateway's output lacks something the demo needs.
    #[error("no {0}")]
    Missing(&'static str),
    /// The gateway's first line could not be read.
    #[error("the gateway's output: {0}")]
    GatewayOutput(#[source] io::Error),
    /// The gateway's first line is not `ready ADDR`.
    #[error("gateway did not start (see {})", log.display())]
    GatewayNotStarted {
        /// Its log.
        log: PathBuf,
    },
    /// Not every agent came online.
    #[error("only {online} of {n} agents enrolled within 60 s")]
    NotEnrolled {
        /// Online.
        online: usize,
        /// Started.
        n: usize,
    },
    /// The queues did not finish in time.
    #[error("timed out; see the gateway log")]
    QueuesTimedOut,
    /// An agent exited other than by "rebooting".
    #[error("agent {name} exited: {status}")]
    AgentExited {
        /// The device.
        name: String,
        /// How.
        status: ExitStatus,
    },
    /// The side effects did not run once each, in order.
    #[error("{name}: the commands' log reads [{ran}], expected [1,3,4]")]
    SideEffects {
        /// The device.
        name: String,
        /// What its log says ran.
        ran: String,
    },
    /// Not every result is ok.
    #[error("{name}: {ok} of 5 results are ok")]
    Results {
        /// The device.
        name: String,
        /// Results that are ok.
        ok: usize,
    },
    /// The device taken offline still shows online.
    #[error("{0} did not go offline")]
    StillOnline(String),
    /// The loss rule could not be installed.
    #[error("loss rule: {0}")]
    Loss(#[source] LabError),
    /// The offline device completed the push.
    #[error("{0} completed while offline?")]
    CompletedOffline(String),
    /// A device's copy is missing.
    #[error("{name}: no copy: {source}")]
    NoCopy {
        /// The device.
        name: String,
        /// Cause.
        source: io::Error,
    },
    /// A device's copy differs from the image.
    #[error("{0}: the copy differs from the image")]
    CopyDiffers(String),
    /// A receiver's row says failed.
    #[error("a copy failed: {0}")]
    CopyFailed(Value),
    /// The push did not finish in time.
    #[error("the push did not finish within 180 s; see the gateway log")]
    PushTimedOut,
}

/// `path` as the context of an I/O error.
fn at(path: &Path) -> impl FnOnce(io::Error) -> DemoError + '_ {
    move |source| DemoError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// What the demo's steps share.
struct Demo<'n> {
    clock: Clock,
    t0: Instant,
    n: usize,
    net: &'n Net,
    ctx: Ctx,
    /// Agent `i`'s process, while it runs.
    agents: Vec<Option<Running<'n>>>,
    /// Agent `i`'s boots so far.
    boots: Vec<u32>,
    progress: Progress,
}

fn demo(n: usize) -> Result<(), DemoError> {
    let clock = Clock::new();
    let (t0, _) = clock.read();
    let exe = std::env::current_exe().map_err(DemoError::OwnBinary)?;
    let tmp = std::env::temp_dir().join(format!("fleetcast-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(at(&tmp))?;
    let cleanup = TempDir(tmp.clone());
    let data = tmp.join("gateway");
    outln!("fleetcast demo: gateway data in {}", data.display());

    // 0. The network.
    let net = match Lab::new(LabConfig::hosts(n + 1)) {
        Ok(lab) => {
            outln!(
                "  private lab network: {} hosts on a bridge, built in {:.2} s (user + network namespaces, no root)",
                n + 1,
                lab.setup_time().as_secs_f64()
            );
            Net { lab: Some(lab) }
        }
        Err(e) => {
            outln!(
                "  no private lab network here ({e}); running on 127.0.0.1 without the multicast part"
            );
            Net { lab: None }
        }
    };

    // 1. The gateway.
    let (gw, addr) = start_gateway(&net, &exe, &tmp, &data)?;
    outln!("  gateway listening on {addr} (TLS, its own CA, embedded LMDB store)");

    let mut d = Demo {
        clock,
        t0,
        n,
        net: &net,
        ctx: Ctx {
            exe,
            tmp: tmp.clone(),
            data,
            addr,
            names: (1..=n).map(|i| format!("node{i}")).collect(),
        },
        agents: Vec::new(),
        boots: vec![0u32; n],
        progress: Progress::new(),
    };
    let t_enrolled = d.enrol()?;
    d.queue()?;
    d.run_queues(t_enrolled)?;
    d.check_queues()?;
    if let Some(lab) = &net.lab {
        d.push(lab)?;
    }
    d.summary()?;
    drop(d);
    drop(gw);
    drop(cleanup);
    Ok(())
}

/// Starts the gateway on host 0; returns it and the address it is ready on.
fn start_gateway<'n>(
    net: &'n Net,
    exe: &Path,
    tmp: &Path,
    data: &Path,
) -> Result<(Running<'n>, String), DemoError> {
    let gw_ip = net.addr(0);
    let listen = format!("{gw_ip}:{}", if net.lab.is_some() { PORT } else { 0 });
    let log_path = tmp.join("gateway.log");
    let log_file = std::fs::File::create(&log_path).map_err(at(&log_path))?;
    let mut gw = net
        .spawn(0, exe, |c| {
            c.args(["__gateway", "--", "--data-dir"])
                .arg(data)
                .args(["--listen", &listen, "--server-name", &gw_ip.to_string()])
                .args(["--heartbeat", "5", "--reboot-timeout", "60"])
                .env("RUST_LOG", "info")
                .stdout(Stdio::piped())
                .stderr(log_file);
            if net.lab.is_some() {
                c.args(["--mcast-addr", &gw_ip.to_string(), "--mcast-linger", "300"]);
            }
        })
        .map_err(|source| DemoError::Spawn {
            what: "the gateway".into(),
            source,
        })?;
    let stdout = match &mut gw {
        Running::Lab(c) => c.child().stdout.take(),
        Running::Local(c) => c.stdout.take(),
    };
    let mut line = String::new();
    BufReader::new(stdout.ok_or(DemoError::Missing("gateway stdout"))?)
        .read_line(&mut line)
        .map_err(DemoError::GatewayOutput)?;
    let addr = line
        .trim()
        .strip_prefix("ready ")
        .ok_or(DemoError::GatewayNotStarted { log: log_path })?
        .to_string();
    Ok((gw, addr))
}

impl<'n> Demo<'n> {
    fn req(&self, r: &Request) -> Result<Value, DemoError> {
        req(&self.ctx.data, r)
    }

    fn now(&self) -> Instant {
        self.clock.read().0
    }

    /// (Re)starts agent `i` with a new boot id (enrolling with `token` when given).
    fn boot(&mut self, i: usize, token: Option<&str>) -> Result<(), DemoError> {
        let name = &self.ctx.names[i];
        let boot = new_boot_id(&self.ctx.tmp, name, self.boots[i], &self.clock)
            .map_err(at(&self.ctx.tmp))?;
        let agent = start_agent(self.net, &self.ctx, i, token, &boot)?;
        match self.agents.get_mut(i) {
            Some(slot) => *slot = Some(agent),
            None => self.agents.push(Some(agent)),
        }
        Ok(())
    }

    /// 2. Enrols the agents; returns when every one is online.
    fn enrol(&mut self) -> Result<Instant, DemoError> {
        let n = self.n;
        for i in 0..n {
            let d = self.req(&Request::DeviceAdd {
                name: self.ctx.names[i].clone(),
                groups: vec!["demo".into()],
            })?;
            let token = d["token"]
                .as_str()
                .ok_or(DemoError::Missing("token"))?
                .to_string();
            self.boot(i, Some(&token))?;
        }
        outln!("  {n} agents started; enrolling with one-time tokens, then mutual TLS");
        let enrol_deadline = self.t0 + Duration::from_secs(60);
        loop {
            let st = self.req(&Request::Status)?;
            let online = st["devices"]
                .as_array()
                .map_or(0, |d| d.iter().filter(|d| d["online"] == true).count());
            if online == n {
                break;
            }
            if self.now() > enrol_deadline {
                return Err(DemoError::NotEnrolled { online, n });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let t_enrolled = self.now();
        outln!(
            "  {n} devices enrolled and online in {:.2} s",
            (t_enrolled - self.t0).as_secs_f64()
        );
        Ok(t_enrolled)
    }

    /// Device `name`'s side-effect log.
    fn log(&self, name: &str) -> PathBuf {
        self.ctx.tmp.join(format!("{name}.log"))
    }

    /// 3. Queues five commands per device with a reboot in the middle.
    fn queue(&self) -> Result<(), DemoError> {
        let tmp = &self.ctx.tmp;
        for name in &self.ctx.names {
            let l = self.log(name).display().to_string();
            let sh = |script: String| Step::Exec {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            };
            let cmds: Vec<Vec<Step<'static>>> = vec![
                vec![sh(format!("echo 1 >> {l}; uname -sr"))],
                vec![Step::Write {
                    path: tmp
                        .join(format!("{name}.conf"))
                        .display()
                        .to_string()
                        .into(),
                    mode: 0o644,
                    contents: format!("device={name}\n").into_bytes().into(),
                }],
                vec![sh(format!("echo 3 >> {l}")), Step::Reboot],
                vec![sh(format!("echo 4 >> {l}"))],
                vec![Step::Report],
            ];
            self.req(&Request::QueueAdd {
                attached: None,
                target: name.clone(),
                commands: cmds,
                timeout_ms: 30_000,
                max_attempts: 1,
                on_failure: OnFailureSpec::Stop,
            })?;
        }
        outln!("  queued 5 commands per device: exec, write, exec+reboot, exec, report");
        Ok(())
    }

    /// Plays the machine's part in reboots until every queue is done, with a bar per device.
    fn run_queues(&mut self, t_enrolled: Instant) -> Result<(), DemoError> {
        let n = self.n;
        let deadline = self.t0 + Duration::from_secs(180);
        loop {
            if self.now() > deadline {
                return Err(DemoError::QueuesTimedOut);
            }
            // The machine's part in reboots: an agent that exits with REBOOT_EXIT gets a new
            // boot id and starts again; any other exit is an error.
            for i in 0..n {
                let exited = match self.agents[i].as_mut() {
                    Some(p) => p.try_wait().map_err(|source| DemoError::Wait {
                        name: self.ctx.names[i].clone(),
                        source,
                    })?,
                    None => None,
                };
                if let Some(status) = exited {
                    self.agents[i] = None;
                    if status.code() != Some(REBOOT_EXIT) {
                        return Err(DemoError::AgentExited {
                            name: self.ctx.names[i].clone(),
                            status,
                        });
                    }
                    self.boots[i] += 1;
                    self.boot(i, None)?;
                }
            }
            let st = self.req(&Request::Status)?;
            let rows = st["devices"].as_array().cloned().unwrap_or_default();
            self.progress.show(
                rows.iter()
                    .map(|d| {
                        let done = d["done"].as_u64().unwrap_or(0);
                        format!(
                            "{:<8} {} {}/5 {}",
                            d["name"].as_str().unwrap_or("?"),
                            bar(done, 5, 20),
                            done,
                            d["queue"].as_str().unwrap_or("?")
                        )
                    })
                    .collect(),
            );
            if rows.len() == n && rows.iter().all(|d| d["queue"] == "done") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.progress.done();
        outln!(
            "all {n} queues done {:.2} s after queueing (5 commands each, one reboot each)",
            (self.now() - t_enrolled).as_secs_f64()
        );
        Ok(())
    }

    /// Checks every queue's claims: each side effect once, in order; every result ok.
    fn check_queues(&self) -> Result<(), DemoError> {
        let st = self.req(&Request::Status)?;
        for d in st["devices"].as_array().into_iter().flatten() {
            let name = d["name"].as_str().unwrap_or("?");
            let ran = std::fs::read_to_string(self.log(name))
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(",");
            // Commands 1, 3 and 4 append their number to the device's log: each exactly once,
            // in queue order, is the whole claim; check it rather than assume it.
            if ran != "1,3,4" {
                return Err(DemoError::SideEffects {
                    name: name.to_string(),
                    ran,
                });
            }
            let results = self.req(&Request::QueueShow {
                device: name.to_string(),
            })?;
            let ok = results["commands"]
                .as_array()
                .map_or(0, |c| c.iter().filter(|c| c["state"] == "ok").count());
            if ok != 5 {
                return Err(DemoError::Results {
                    name: name.to_string(),
                    ok,
                });
            }
            outln!(
                "  {name}: 5/5 results ok; side effects ran [{ran}], once each, in order; back from reboot with boot id {}; report: {} / {} / {} packages",
                d["boot_id"].as_str().unwrap_or("-"),
                d["os"].as_str().unwrap_or("-"),
                d["kernel"].as_str().unwrap_or("-"),
                d["packages"]
            );
        }
        Ok(())
    }

    /// 4. Multicast with loss, and an offline device caught up by unicast.
    fn push(&mut self, lab: &Lab) -> Result<(), DemoError> {
        let (n, late) = (self.n, self.n - 1);
        let late_name = self.ctx.names[late].clone();
        // Dropping it ends the process (by PID).
        drop(self.agents[late].take());
        let off_deadline = self.now() + Duration::from_secs(30);
        while self.req(&Request::Status)?["devices"]
            .as_array()
            .is_some_and(|d| {
                d.iter()
                    .any(|d| d["name"] == late_name.as_str() && d["online"] == true)
            })
        {
            if self.now() > off_deadline {
                return Err(DemoError::StillOnline(late_name));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for i in 1..=n {
            lab.host(i)
                .loss_in(&[7301], LOSS)
                .map_err(DemoError::Loss)?;
        }
        let image = self.ctx.tmp.join("image.bin");
        let bytes = generate(IMAGE_MIB << 20);
        std::fs::write(&image, &bytes).map_err(at(&image))?;
        outln!(
            "\npushing a {IMAGE_MIB} MiB image to group `demo` by multicast: {} online receivers each dropping {LOSS}% of the datagrams, {} offline",
            n - 1,
            late_name
        );
        let tp = self.now();
        let r = self.req(&Request::Push {
            path: image.display().to_string(),
            group: "demo".into(),
            block_size: 1400,
            rate_mbps: 300,
            trigger: PushTrigger::default(),
            then: vec![],
            delivery: Default::default(),
            follow: Default::default(),
            image: None,
        })?;
        let task = r["task"].as_u64().ok_or(DemoError::Missing("task id"))?;
        let all_online = |rows: &[Value]| {
            rows.iter()
                .filter(|r| r["device"] != late_name.as_str())
                .all(|r| r["status"] == "completed")
        };
        let data = self.ctx.data.clone();
        let rows = follow(&data, task, &self.clock, &mut self.progress, all_online)?;
        let took = (self.now() - tp).as_secs_f64();
        outln!(
            "{} online copies verified in {took:.2} s from the push ({:.0} Mbit/s per receiver); {} pending",
            n - 1,
            (IMAGE_MIB << 20) as f64 * 8.0 / took / 1e6,
            late_name
        );
        if rows
            .iter()
            .any(|r| r["device"] == late_name.as_str() && r["status"] == "completed")
        {
            return Err(DemoError::CompletedOffline(late_name));
        }
        outln!("bringing {} back: unicast catch-up", late_name);
        self.boots[late] += 1;
        self.boot(late, None)?;
        let tl = self.now();
        follow(&data, task, &self.clock, &mut self.progress, |rows| {
            rows.iter().all(|r| r["status"] == "completed")
        })?;
        outln!(
            "{} caught up by unicast in {:.2} s from its restart (no second multicast)",
            late_name,
            (self.now() - tl).as_secs_f64()
        );
        self.check_copies(&bytes)?;
        self.sender_figures()
    }

    /// Checks every copy rather than trust the reports.
    fn check_copies(&self, image: &[u8]) -> Result<(), DemoError> {
        for name in &self.ctx.names {
            let got = std::fs::read(self.ctx.tmp.join(name).join("downloads/image.bin")).map_err(
                |source| DemoError::NoCopy {
                    name: name.clone(),
                    source,
                },
            )?;
            if got != image {
                return Err(DemoError::CopyDiffers(name.clone()));
            }
        }
        outln!(
            "  all {} copies byte-identical to the image (checked here, and by each device's SHA-256)",
            self.n
        );
        Ok(())
    }

    /// What the sender's metrics say the push cost.
    fn sender_figures(&self) -> Result<(), DemoError> {
        let m = self.req(&Request::Metrics)?;
        let s = |k: &str| m["samples"][k].as_u64().unwrap_or(0);
        let file = (IMAGE_MIB << 20) as f64;
        outln!(
            "  sender: {:.3} datagram bytes per file byte (one file's worth of it is the late device's catch-up); {} blocks re-multicast, {} unicast repairs; {} NACKs; {} demoted",
            s("fleetcast_mcast_bytes_sent_total") as f64 / file,
            s("fleetcast_mcast_repairs_total{kind=\"multicast\"}"),
            s("fleetcast_mcast_repairs_total{kind=\"unicast\"}"),
            s("fleetcast_mcast_nacks_total"),
            s("fleetcast_mcast_demotions_total"),
        );
        Ok(())
    }

    /// 5. What the event log says happened.
    fn summary(&self) -> Result<(), DemoError> {
        let ev = self.req(&Request::Events {
            from: 1,
            limit: 10_000,
        })?;
        let count = |k: &str| {
            ev["events"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|e| e["kind"] == k).count())
        };
        outln!(
            "\nevents: {} enrolled, {} sessions, {} commands sent, {} results, {} reboots completed, {} copies verified",
            count("enrolled"),
            count("connected"),
            count("commandsent"),
            count("commandresult"),
            count("rebootcompleted"),
            ev["events"].as_array().map_or(0, |a| a
                .iter()
                .filter(|e| e["message"].as_str().is_some_and(|m| m.contains("digest verified")))
                .count())
        );
        outln!(
            "demo done in {:.1} s; every process it started is stopped and {} removed",
            (self.now() - self.t0).as_secs_f64(),
            self.ctx.tmp.display()
        );
        Ok(())
    }
}

/// Follows task `task` with a bar per device until `done(rows)`; returns the last rows.
fn follow(
    data: &Path,
    task: u64,
    clock: &Clock,
    progress: &mut Progress,
    done: impl Fn(&[Value]) -> bool,
) -> Result<Vec<Value>, DemoError> {
    let deadline = clock.read().0 + Duration::from_secs(180);
    loop {
        let t = req(data, &Request::TaskShow { task: Some(task) })?;
        let rows = t["devices"].as_array().cloned().unwrap_or_default();
        progress.show(
            rows.iter()
                .map(|r| {
                    let (got, total) = r["blocks"]
                        .as_str()
                        .and_then(|b| b.split_once('/'))
                        .map_or((0, 0), |(a, b)| {
                            (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
                        });
                    format!(
                        "{:<8} {} {:>3}% {}",
                        r["device"].as_str().unwrap_or("?"),
                        bar(got, total, 30),
                        (got * 100).checked_div(total).unwrap_or(0),
                        r["status"].as_str().unwrap_or("?")
                    )
                })
                .collect(),
        );
        if let Some(f) = rows.iter().find(|r| r["status"] == "failed") {
            return Err(DemoError::CopyFailed(f.clone()));
        }
        if done(&rows) {
            progress.done();
            return Ok(rows);
        }
        if clock.read().0 > deadline {
            return Err(DemoError::PushTimedOut);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `len` pseudo-random (incompressible) bytes: the demo's image.
fn generate(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x0f1e_e7ca_5700_0001;
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// What starting an agent needs.
struct Ctx {
    exe: PathBuf,
    tmp: PathBuf,
    data: PathBuf,
    addr: String,
    names: Vec<String>,
}

/// Starts agent `i` on its host (enrolling with `token` when given).
fn start_agent<'a>(
    net: &'a Net,
    ctx: &Ctx,
    i: usize,
    token: Option<&str>,
    boot: &Path,
) -> Result<Running<'a>, DemoError> {
    let name = &ctx.names[i];
    let log_path = ctx.tmp.join(format!("{name}.agent.log"));
    let log = std::fs::File::create(&log_path).map_err(at(&log_path))?;
    net.spawn(i + 1, &ctx.exe, |c| {
        c.args(["__agent", "--", "--gateway", &ctx.addr, "--state-dir"])
            .arg(ctx.tmp.join(name))
            .arg("--ca")
            .arg(ctx.data.join("pki/ca.pem"))
            .arg("--boot-id-file")
            .arg(boot)
            .args(["--reboot-exit", &REBOOT_EXIT.to_string()])
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(t) = token {
            c.args(["--token", t, "--name", name]);
        }
    })
    .map_err(|source| DemoError::Spawn {
        what: format!("agent {name}"),
        source,
    })
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
