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

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use fleetcast_daemon::admin::{self, OnFailureSpec, PushTrigger, Request};
use fleetcast_daemon::gateway::Clock;
use fleetcast_daemon::{errln, outln};
use fleetcast_lab::{Lab, LabChild, LabConfig};
use fleetcast_wire::Step;
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
    ) -> Result<Running<'_>, String> {
        match &self.lab {
            Some(l) => l
                .host(i)
                .spawn(exe, configure)
                .map(Running::Lab)
                .map_err(|e| e.to_string()),
            None => {
                let mut c = Command::new(exe);
                configure(&mut c);
                c.spawn().map(Running::Local).map_err(|e| e.to_string())
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

fn req(data: &Path, r: &Request) -> Result<Value, String> {
    match admin::request(data, r) {
        Ok(resp) if resp.ok => Ok(resp.data),
        Ok(resp) => Err(resp.error.unwrap_or_default()),
        Err(e) => Err(e.to_string()),
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

#[allow(clippy::too_many_lines)]
fn demo(n: usize) -> Result<(), String> {
    let clock = Clock::new();
    let (t0, _) = clock.read();
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let tmp = std::env::temp_dir().join(format!("fleetcast-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
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
    let gw_ip = net.addr(0);
    let listen = format!("{gw_ip}:{}", if net.lab.is_some() { PORT } else { 0 });

    // 1. The gateway.
    let log_file = std::fs::File::create(tmp.join("gateway.log")).map_err(|e| e.to_string())?;
    let mut gw = net.spawn(0, &exe, |c| {
        c.args(["__gateway", "--", "--data-dir"])
            .arg(&data)
            .args(["--listen", &listen, "--server-name", &gw_ip.to_string()])
            .args(["--heartbeat", "5", "--reboot-timeout", "60"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log_file);
        if net.lab.is_some() {
            c.args(["--mcast-addr", &gw_ip.to_string(), "--mcast-linger", "300"]);
        }
    })?;
    let stdout = match &mut gw {
        Running::Lab(c) => c.child().stdout.take(),
        Running::Local(c) => c.stdout.take(),
    };
    let mut line = String::new();
    BufReader::new(stdout.ok_or("no gateway stdout")?)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let addr = line
        .trim()
        .strip_prefix("ready ")
        .ok_or_else(|| {
            format!(
                "gateway did not start (see {})",
                tmp.join("gateway.log").display()
            )
        })?
        .to_string();
    outln!("  gateway listening on {addr} (TLS, its own CA, embedded LMDB store)");

    // 2. Enrol the agents.
    let names: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
    let mut agents: Vec<Option<Running<'_>>> = Vec::new();
    let mut boots = vec![0u32; n];
    let ctx = Ctx {
        exe: exe.clone(),
        tmp: tmp.clone(),
        data: data.clone(),
        addr: addr.clone(),
        names: names.clone(),
    };
    let start_agent =
        |i: usize, token: Option<&str>, boot: &Path| start_agent(&net, &ctx, i, token, boot);
    for (i, name) in names.iter().enumerate() {
        let d = req(
            &data,
            &Request::DeviceAdd {
                name: name.clone(),
                groups: vec!["demo".into()],
            },
        )?;
        let token = d["token"].as_str().ok_or("no token")?.to_string();
        let boot = new_boot_id(&tmp, name, boots[i], &clock).map_err(|e| e.to_string())?;
        agents.push(Some(start_agent(i, Some(&token), &boot)?));
    }
    outln!("  {n} agents started; enrolling with one-time tokens, then mutual TLS");
    let enrol_deadline = t0 + Duration::from_secs(60);
    loop {
        let st = req(&data, &Request::Status)?;
        let online = st["devices"]
            .as_array()
            .map_or(0, |d| d.iter().filter(|d| d["online"] == true).count());
        if online == n {
            break;
        }
        if clock.read().0 > enrol_deadline {
            return Err(format!("only {online} of {n} agents enrolled within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (t_enrolled, _) = clock.read();
    outln!(
        "  {n} devices enrolled and online in {:.2} s",
        (t_enrolled - t0).as_secs_f64()
    );

    // 3. Queue: five commands with a reboot in the middle.
    let log = |name: &str| tmp.join(format!("{name}.log"));
    for name in &names {
        let l = log(name).display().to_string();
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
        req(
            &data,
            &Request::QueueAdd {
                target: name.clone(),
                commands: cmds,
                timeout_ms: 30_000,
                max_attempts: 1,
                on_failure: OnFailureSpec::Stop,
            },
        )?;
    }
    outln!("  queued 5 commands per device: exec, write, exec+reboot, exec, report");

    let mut progress = Progress::new();
    let deadline = t0 + Duration::from_secs(180);
    loop {
        if clock.read().0 > deadline {
            return Err("timed out; see the gateway log".into());
        }
        // The machine's part in reboots: an agent that exits with REBOOT_EXIT gets a new
        // boot id and starts again; any other exit is an error.
        for i in 0..n {
            let exited = match agents[i].as_mut() {
                Some(p) => p.try_wait().map_err(|e| e.to_string())?,
                None => None,
            };
            if let Some(status) = exited {
                agents[i] = None;
                if status.code() != Some(REBOOT_EXIT) {
                    return Err(format!("agent {} exited: {status}", names[i]));
                }
                boots[i] += 1;
                let boot =
                    new_boot_id(&tmp, &names[i], boots[i], &clock).map_err(|e| e.to_string())?;
                agents[i] = Some(start_agent(i, None, &boot)?);
            }
        }
        let st = req(&data, &Request::Status)?;
        let rows = st["devices"].as_array().cloned().unwrap_or_default();
        progress.show(
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
    progress.done();
    let (t1, _) = clock.read();
    outln!(
        "all {n} queues done {:.2} s after queueing (5 commands each, one reboot each)",
        (t1 - t_enrolled).as_secs_f64()
    );
    let st = req(&data, &Request::Status)?;
    for d in st["devices"].as_array().into_iter().flatten() {
        let name = d["name"].as_str().unwrap_or("?");
        let ran = std::fs::read_to_string(log(name))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(",");
        // Commands 1, 3 and 4 append their number to the device's log: each exactly once,
        // in queue order, is the whole claim; check it rather than assume it.
        if ran != "1,3,4" {
            return Err(format!(
                "{name}: the commands' log reads [{ran}], expected [1,3,4]"
            ));
        }
        let results = req(
            &data,
            &Request::QueueShow {
                device: name.to_string(),
            },
        )?;
        let ok = results["commands"]
            .as_array()
            .map_or(0, |c| c.iter().filter(|c| c["state"] == "ok").count());
        if ok != 5 {
            return Err(format!("{name}: {ok} of 5 results are ok"));
        }
        outln!(
            "  {name}: 5/5 results ok; side effects ran [{ran}], once each, in order; back from reboot with boot id {}; report: {} / {} / {} packages",
            d["boot_id"].as_str().unwrap_or("-"),
            d["os"].as_str().unwrap_or("-"),
            d["kernel"].as_str().unwrap_or("-"),
            d["packages"]
        );
    }

    // 4. Multicast with loss, and an offline device caught up by unicast.
    if let Some(lab) = &net.lab {
        let late = n - 1;
        // Dropping it ends the process (by PID).
        drop(agents[late].take());
        let off_deadline = clock.read().0 + Duration::from_secs(30);
        while req(&data, &Request::Status)?["devices"]
            .as_array()
            .is_some_and(|d| {
                d.iter()
                    .any(|d| d["name"] == names[late] && d["online"] == true)
            })
        {
            if clock.read().0 > off_deadline {
                return Err(format!("{} did not go offline", names[late]));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for i in 1..=n {
            lab.host(i)
                .loss_in(&[7301], LOSS)
                .map_err(|e| format!("loss rule: {e}"))?;
        }
        let image = tmp.join("image.bin");
        let bytes = generate(IMAGE_MIB << 20);
        std::fs::write(&image, &bytes).map_err(|e| e.to_string())?;
        outln!(
            "\npushing a {IMAGE_MIB} MiB image to group `demo` by multicast: {} online receivers each dropping {LOSS}% of the datagrams, {} offline",
            n - 1,
            names[late]
        );
        let (tp, _) = clock.read();
        let r = req(
            &data,
            &Request::Push {
                path: image.display().to_string(),
                group: "demo".into(),
                block_size: 1400,
                rate_mbps: 300,
                trigger: PushTrigger::default(),
                then: vec![],
            },
        )?;
        let task = r["task"].as_u64().ok_or("no task id")?;
        let all_online = |rows: &[Value]| {
            rows.iter()
                .filter(|r| r["device"] != names[late].as_str())
                .all(|r| r["status"] == "completed")
        };
        let rows = follow(&data, task, &clock, &mut progress, all_online)?;
        let (tm, _) = clock.read();
        let took = (tm - tp).as_secs_f64();
        outln!(
            "{} online copies verified in {took:.2} s from the push ({:.0} Mbit/s per receiver); {} pending",
            n - 1,
            (IMAGE_MIB << 20) as f64 * 8.0 / took / 1e6,
            names[late]
        );
        if rows
            .iter()
            .any(|r| r["device"] == names[late].as_str() && r["status"] == "completed")
        {
            return Err(format!("{} completed while offline?", names[late]));
        }
        outln!("bringing {} back: unicast catch-up", names[late]);
        boots[late] += 1;
        let boot =
            new_boot_id(&tmp, &names[late], boots[late], &clock).map_err(|e| e.to_string())?;
        agents[late] = Some(start_agent(late, None, &boot)?);
        let (tl, _) = clock.read();
        follow(&data, task, &clock, &mut progress, |rows| {
            rows.iter().all(|r| r["status"] == "completed")
        })?;
        let (tc, _) = clock.read();
        outln!(
            "{} caught up by unicast in {:.2} s from its restart (no second multicast)",
            names[late],
            (tc - tl).as_secs_f64()
        );
        // Check every copy rather than trust the reports.
        for name in &names {
            let got = std::fs::read(tmp.join(name).join("downloads/image.bin"))
                .map_err(|e| format!("{name}: no copy: {e}"))?;
            if got != bytes {
                return Err(format!("{name}: the copy differs from the image"));
            }
        }
        outln!("  all {n} copies byte-identical to the image (checked here, and by each device's SHA-256)");
        let m = req(&data, &Request::Metrics)?;
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
    }

    let ev = req(
        &data,
        &Request::Events {
            from: 1,
            limit: 10_000,
        },
    )?;
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
        (clock.read().0 - t0).as_secs_f64(),
        tmp.display()
    );
    drop(agents);
    drop(gw);
    drop(cleanup);
    Ok(())
}

/// Follows task `task` with a bar per device until `done(rows)`; returns the last rows.
fn follow(
    data: &Path,
    task: u64,
    clock: &Clock,
    progress: &mut Progress,
    done: impl Fn(&[Value]) -> bool,
) -> Result<Vec<Value>, String> {
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
            return Err(format!("a copy failed: {f}"));
        }
        if done(&rows) {
            progress.done();
            return Ok(rows);
        }
        if clock.read().0 > deadline {
            return Err("the push did not finish within 180 s; see the gateway log".into());
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
) -> Result<Running<'a>, String> {
    let name = &ctx.names[i];
    let log = std::fs::File::create(ctx.tmp.join(format!("{name}.agent.log")))
        .map_err(|e| e.to_string())?;
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
    .map_err(|e| format!("cannot start agent {name}: {e}"))
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
