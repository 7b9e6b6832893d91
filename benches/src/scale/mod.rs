//! The gateway at scale: a harness that runs `fleetcastd` (as the `bench-gateway` process),
//! provisions and enrols thousands of simulated agents ([`swarm`]), and measures the figures
//! of `docs/performance.md` ("Gateway at scale"):
//!
//! 1. **provision**: `DeviceAdd` × N (pipelined admin requests), every agent enrols over TLS;
//! 2. **hold**: the gateway is killed and restarted (a clean heap), its RSS is sampled with 0
//!    sessions, every agent connects with mutual TLS, RSS is sampled with N idle sessions;
//! 3. **idle**: gateway CPU over a fixed window while only heartbeats flow;
//! 4. **throughput**: K commands queued on every agent, time until all N×K results are stored;
//! 5. **latency**: probes queued at a fixed rate on rotating groups; enqueue to `ResultAck`;
//! 6. **storm**: `kill -9` of the gateway, restart on the same data directory, time until every
//!    agent is welcomed again and a command queued after the restart has round-tripped on each.
//!
//! Every phase is bounded in time; a phase that does not finish makes [`run`] fail and say
//! which. The gateway is always started and killed by the PID this harness owns. Loopback only.

pub use fleetcast_agent::swarm;
pub use fleetcast_agent::swarm::{raise_nofile, Clock};

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetcast_daemon::admin::{OnFailureSpec, Request, Response};
use fleetcast_wire::Instant;
use fleetcast_wire::Step;

use swarm::{Swarm, SwarmConfig, LATENCY_TAG};

/// Memory and CPU of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// `VmRSS`, kB.
    pub rss_kb: u64,
    /// `RssAnon` (heap, stacks; not the LMDB map or the binary), kB.
    pub anon_kb: u64,
    /// user + system CPU, clock ticks.
    pub cpu_ticks: u64,
}

/// Reads `/proc/PID/status` and `/proc/PID/stat`.
pub fn sample(pid: u32) -> io::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`: state is field 3; utime, stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok(ProcSample {
        rss_kb: field("VmRSS:"),
        anon_kb: field("RssAnon:"),
        cpu_ticks: num(11) + num(12),
    })
}

/// Clock ticks per second (`_SC_CLK_TCK`).
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// A gateway process this harness started (and alone may kill, by its PID).
#[derive(Debug)]
pub struct GatewayProc {
    child: Child,
    /// Where agents connect.
    pub addr: SocketAddr,
}

impl GatewayProc {
    /// Starts `bin --data-dir DIR --listen LISTEN --heartbeat H` and waits for `ready ADDR`.
    pub fn spawn(bin: &Path, data: &Path, listen: SocketAddr, heartbeat: u32) -> io::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("gateway.log"))?;
        let mut child = Command::new(bin)
            .arg("--data-dir")
            .arg(data)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--heartbeat")
            .arg(heartbeat.to_string())
            .env(
                "RUST_LOG",
                std::env::var("GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "gateway not ready in 60 s",
                ));
            }
        };
        let addr = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("gateway said {line:?}, not `ready ADDR` (see gateway.log)"),
                )
            })?;
        Ok(GatewayProc { child, addr })
    }

    /// The gateway's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9` and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A persistent admin connection that pipelines requests (one gateway batch per burst).
#[derive(Debug)]
pub struct AdminPipe {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl AdminPipe {
    /// Connects to the gateway's admin socket in `data`.
    pub fn connect(data: &Path) -> io::Result<Self> {
        let w = UnixStream::connect(data.join(fleetcast_daemon::admin::SOCKET_NAME))?;
        w.set_read_timeout(Some(Duration::from_secs(120)))?;
        let r = BufReader::new(w.try_clone()?);
        Ok(AdminPipe { w, r })
    }

    /// Sends every request, then reads one answer per request (in order).
    pub fn call_many(&mut self, reqs: &[Request]) -> io::Result<Vec<Response>> {
        let mut buf = Vec::new();
        for r in reqs {
            serde_json::to_writer(&mut buf, r).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        self.w.write_all(&buf)?;
        let mut out = Vec::with_capacity(reqs.len());
        let mut line = String::new();
        for _ in reqs {
            line.clear();
            if self.r.read_line(&mut line)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "admin closed"));
            }
            out.push(serde_json::from_str(&line).map_err(io::Error::other)?);
        }
        Ok(out)
    }

    /// One request; an error answer becomes `Err`.
    pub fn call(&mut self, req: Request) -> io::Result<serde_json::Value> {
        let r = self.call_many(&[req])?.pop().expect("one answer");
        if r.ok {
            Ok(r.data)
        } else {
            Err(io::Error::other(r.error.unwrap_or_default()))
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ScaleConfig {
    /// Simulated agents.
    pub agents: usize,
    /// Heartbeat interval the gateway announces, s.
    pub heartbeat: u32,
    /// Idle CPU window, s.
    pub idle_secs: u64,
    /// Commands queued per agent in the throughput phase (0 skips it).
    pub commands: usize,
    /// Latency probes per second (0 skips the phase).
    pub lat_rate: u64,
    /// Latency phase length, s.
    pub lat_secs: u64,
    /// Latency probe groups (each agent is in `g<i % groups>`).
    pub groups: usize,
    /// Handshakes in flight while provisioning and connecting (0: unlimited).
    pub max_connecting: usize,
    /// Run the reconnect storm.
    pub storm: bool,
    /// Agents' longest reconnect back-off.
    pub backoff_max: Duration,
    /// Whole run's limit.
    pub deadline: Duration,
    /// The gateway binary.
    pub gateway_bin: PathBuf,
    /// Data directory (a fresh temporary one if `None`).
    pub data_dir: Option<PathBuf>,
    /// Jitter seed.
    pub seed: u64,
}

/// The figures of one run.
#[derive(Debug, Clone, Default)]
pub struct ScaleReport {
    /// Agents.
    pub agents: usize,
    /// Provisioning (DeviceAdd) time, s.
    pub provision_s: f64,
    /// Enrolment of all agents, s.
    pub enrol_s: f64,
    /// All agents connected with mTLS and welcomed (from a fresh gateway), s.
    pub connect_s: f64,
    /// Gateway / loadgen CPU share (1.0 = one core) while connecting.
    pub connect_cpu: (f64, f64),
    /// Gateway / loadgen CPU share during the storm (kill to done).
    pub storm_cpu: (f64, f64),
    /// Listen-queue overflows (machine-wide counter) while connecting / during the storm.
    pub overflows: (u64, u64),
    /// Sessions the gateway reports online.
    pub gateway_online: u64,
    /// Gateway with 0 sessions.
    pub mem0: ProcSample,
    /// Gateway with N idle sessions.
    pub mem_n: ProcSample,
    /// Live heap bytes of the gateway (counting allocator of `bench-gateway`) with 0 / N
    /// sessions (0 when the gateway binary does not write `heap-live`).
    pub heap: (i64, i64),
    /// Gateway CPU during the idle window, ms of CPU per s of wall time.
    pub idle_cpu_ms_per_s: f64,
    /// Heartbeats per second implied by the interval (agent requests).
    pub idle_secs: f64,
    /// Throughput: commands stored per second.
    pub cmds_per_s: f64,
    /// Throughput: commands.
    pub cmds: u64,
    /// Gateway CPU share during the throughput phase (1.0 = one core).
    pub tput_gateway_cpu: f64,
    /// Loadgen CPU share during the throughput phase.
    pub tput_loadgen_cpu: f64,
    /// Latency probes measured.
    pub lat_n: usize,
    /// Latency percentiles, µs.
    pub lat_p50_us: u64,
    /// p99, µs.
    pub lat_p99_us: u64,
    /// max, µs.
    pub lat_max_us: u64,
    /// Storm: kill to ready of the new gateway, s.
    pub storm_restart_s: f64,
    /// Storm: kill to all agents welcomed, s.
    pub storm_welcomed_s: f64,
    /// Storm: kill to a post-restart command stored on every agent, s.
    pub storm_done_s: f64,
    /// Storm: TCP connects made by the swarm during the storm.
    pub storm_connects: u64,
}

impl ScaleReport {
    /// Gateway anonymous memory per idle session, bytes.
    pub fn anon_per_session(&self) -> f64 {
        (self.mem_n.anon_kb as f64 - self.mem0.anon_kb as f64) * 1024.0 / self.agents as f64
    }
}

impl std::fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.agents as f64;
        writeln!(f, "agents                      {}", self.agents)?;
        writeln!(f, "provision (DeviceAdd)       {:.2} s", self.provision_s)?;
        writeln!(f, "enrol all                   {:.2} s", self.enrol_s)?;
        writeln!(
            f,
            "connect all (mTLS, fresh)   {:.2} s ({:.0} handshakes/s; gateway CPU {:.2}, loadgen CPU {:.2}; {} listen overflows)",
            self.connect_s,
            n / self.connect_s,
            self.connect_cpu.0,
            self.connect_cpu.1,
            self.overflows.0
        )?;
        writeln!(f, "gateway online              {}", self.gateway_online)?;
        writeln!(
            f,
            "gateway RSS 0 / N sessions  {} kB / {} kB (anon {} kB / {} kB)",
            self.mem0.rss_kb, self.mem_n.rss_kb, self.mem0.anon_kb, self.mem_n.anon_kb
        )?;
        writeln!(
            f,
            "anon per idle session       {:.0} B (VmRSS {:.0} B)",
            self.anon_per_session(),
            (self.mem_n.rss_kb as f64 - self.mem0.rss_kb as f64) * 1024.0 / n
        )?;
        writeln!(
            f,
            "heap live 0 / N sessions    {} B / {} B: {:.0} B per session",
            self.heap.0,
            self.heap.1,
            (self.heap.1 - self.heap.0) as f64 / n
        )?;
        writeln!(
            f,
            "idle CPU                    {:.1} ms/s total, {:.2} ms/s per 1000 sessions ({:.0} s window)",
            self.idle_cpu_ms_per_s,
            self.idle_cpu_ms_per_s * 1000.0 / n,
            self.idle_secs
        )?;
        writeln!(
            f,
            "throughput                  {:.0} commands/s ({} commands; gateway CPU {:.2}, loadgen CPU {:.2})",
            self.cmds_per_s, self.cmds, self.tput_gateway_cpu, self.tput_loadgen_cpu
        )?;
        writeln!(
            f,
            "latency enqueue->stored     p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} probes)",
            self.lat_p50_us as f64 / 1000.0,
            self.lat_p99_us as f64 / 1000.0,
            self.lat_max_us as f64 / 1000.0,
            self.lat_n
        )?;
        write!(
            f,
            "storm (from kill -9)        ready {:.2} s, all welcomed {:.2} s, all ran a command {:.2} s ({} connects; gateway CPU {:.2}, loadgen CPU {:.2}; {} listen overflows)",
            self.storm_restart_s,
            self.storm_welcomed_s,
            self.storm_done_s,
            self.storm_connects,
            self.storm_cpu.0,
            self.storm_cpu.1,
            self.overflows.1
        )
    }
}

/// `perf record -g` (or `perf $LOADGEN_PERF_ARGS`) of the gateway during one phase, when
/// `LOADGEN_PERF` names that phase
/// (`connect`, `idle`, `throughput`, `storm`); the profile goes to `perf-<phase>.data` in the
/// current directory. The `perf` process is one this harness started and stops by its PID.
#[derive(Debug)]
struct Profiler(Option<Child>);

impl Profiler {
    fn start(phase: &str, pid: u32) -> Profiler {
        if std::env::var("LOADGEN_PERF").ok().as_deref() != Some(phase) {
            return Profiler(None);
        }
        // `LOADGEN_PERF_ARGS` replaces the default `record -F 499 -g` (e.g. `trace -s`).
        let args = std::env::var("LOADGEN_PERF_ARGS").unwrap_or_else(|_| "record -F 499 -g".into());
        let child = Command::new("perf")
            .args(args.split_whitespace())
            .arg("-o")
            .arg(format!("perf-{phase}.data"))
            .arg("-p")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(c) => {
                std::thread::sleep(Duration::from_millis(300));
                Profiler(Some(c))
            }
            Err(e) => {
                eprintln!("loadgen: cannot start perf: {e}");
                Profiler(None)
            }
        }
    }

    fn stop(self) {
        if let Some(mut c) = self.0 {
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: signals only the `perf` child this harness spawned.
                unsafe { libc::kill(pid, libc::SIGINT) };
            }
            let _ = c.wait();
        }
    }
}

fn phase_err(what: &str, swarm: &Swarm) -> Box<dyn std::error::Error> {
    format!("phase `{what}` did not finish in time: {:?}", swarm.stats).into()
}

/// The machine's `TcpExt: ListenOverflows` counter (connections dropped because a listen
/// queue was full).
pub fn listen_overflows() -> u64 {
    let Ok(t) = std::fs::read_to_string("/proc/net/netstat") else {
        return 0;
    };
    let mut lines = t.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(vals)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(vals.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The live heap bytes `bench-gateway` last wrote (0 if none).
fn heap_live(data: &Path) -> i64 {
    std::fs::read_to_string(data.join("heap-live"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn self_cpu_ticks() -> u64 {
    sample(std::process::id()).map_or(0, |s| s.cpu_ticks)
}

/// Runs every phase. Fails (after killing the gateway) when a phase does not finish in time.
pub fn run(cfg: &ScaleConfig) -> Result<ScaleReport, Box<dyn std::error::Error>> {
    let tmp;
    let data = match &cfg.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let clock = Clock::new();
    let end = clock.now() + cfg.deadline;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let gw = GatewayProc::spawn(&cfg.gateway_bin, &data, listen, cfg.heartbeat)?;
    let mut slot = Some(gw);
    let r = run_phases(cfg, &data, listen, clock, end, &mut slot);
    if let Some(gw) = slot.take() {
        gw.kill();
    }
    r
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn run_phases(
    cfg: &ScaleConfig,
    data: &Path,
    listen: SocketAddr,
    clock: Clock,
    end: Instant,
    gw: &mut Option<GatewayProc>,
) -> Result<ScaleReport, Box<dyn std::error::Error>> {
    let n = cfg.agents;
    let groups = cfg.groups.max(1);
    let mut rep = ScaleReport {
        agents: n,
        ..Default::default()
    };
    // 1. Provision: DeviceAdd in pipelined bursts of 1000 (one gateway batch each).
    let t = clock.now();
    let mut admin = AdminPipe::connect(data)?;
    let mut devices = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let reqs: Vec<Request> = chunk
            .iter()
            .map(|i| Request::DeviceAdd {
                name: format!("sim{i}"),
                groups: vec!["all".into(), format!("g{}", i % groups)],
            })
            .collect();
        for (i, r) in chunk.iter().zip(admin.call_many(&reqs)?) {
            let token = r.data["token"]
                .as_str()
                .ok_or_else(|| format!("DeviceAdd sim{i} failed: {:?}", r.error))?;
            devices.push((format!("sim{i}"), token.to_string()));
        }
    }
    rep.provision_s = secs(clock.now() - t);
    let ca = fleetcast_agent::tls::load_cert_pem(&data.join("pki").join("ca.pem"))?;
    let swarm_cfg = SwarmConfig {
        gateways: listen.to_string(),
        spread_sources: true,
        server_name: Some("localhost".into()),
        max_connecting: cfg.max_connecting,
        backoff_min: Duration::from_millis(200),
        backoff_max: cfg.backoff_max,
        handshake_timeout: Duration::from_secs(10),
        seed: cfg.seed,
    };
    let mut swarm = Swarm::new(swarm_cfg, clock, ca, devices)?;
    let t = clock.now();
    swarm.enrol_only = true;
    swarm.connect_all();
    if !swarm.run_until(end, |s| {
        s.stats.enrolled as usize >= n && s.stats.established == 0
    }) {
        return Err(phase_err("enrol", &swarm));
    }
    // Let the gateway see the enrolment connections close.
    let settle = clock.now() + Duration::from_millis(500);
    swarm.run_until(settle, |_| false);
    rep.enrol_s = secs(clock.now() - t);
    swarm.enrol_only = false;

    // 2. Hold: a fresh gateway (clean heap) with 0, then N sessions.
    drop(admin);
    gw.take().expect("running").kill();
    let g = GatewayProc::spawn(&cfg.gateway_bin, data, listen, cfg.heartbeat)?;
    let pid = g.pid();
    *gw = Some(g);
    let settle = clock.now() + Duration::from_millis(1500);
    swarm.run_until(settle, |_| false);
    rep.mem0 = sample(pid)?;
    rep.heap.0 = heap_live(data);
    let l0 = self_cpu_ticks();
    let prof = Profiler::start("connect", pid);
    let o0 = listen_overflows();
    let t = clock.now();
    swarm.connect_all();
    if !swarm.run_until(end, |s| s.stats.established >= n) {
        return Err(phase_err("connect", &swarm));
    }
    rep.connect_s = secs(clock.now() - t);
    rep.overflows.0 = listen_overflows() - o0;
    prof.stop();
    rep.connect_cpu = (
        (sample(pid)?.cpu_ticks - rep.mem0.cpu_ticks) as f64 / ticks_per_sec() / rep.connect_s,
        (self_cpu_ticks() - l0) as f64 / ticks_per_sec() / rep.connect_s,
    );
    let settle = clock.now() + Duration::from_secs(2);
    swarm.run_until(settle, |_| false);
    rep.mem_n = sample(pid)?;
    rep.heap.1 = heap_live(data);
    let mut admin = AdminPipe::connect(data)?;

    // 3. Idle CPU: heartbeats only.
    let s0 = sample(pid)?;
    let prof = Profiler::start("idle", pid);
    let t = clock.now();
    swarm.run_until(t + Duration::from_secs(cfg.idle_secs), |_| false);
    prof.stop();
    let s1 = sample(pid)?;
    let w = secs(clock.now() - t);
    rep.idle_secs = w;
    rep.idle_cpu_ms_per_s = (s1.cpu_ticks - s0.cpu_ticks) as f64 * 1000.0 / ticks_per_sec() / w;
    if swarm.stats.established < n {
        return Err(format!(
            "sessions dropped while idle: {} of {n} established",
            swarm.stats.established
        )
        .into());
    }
    let status = admin.call(Request::Status)?;
    rep.gateway_online = status["online"].as_u64().unwrap_or(0);

    // 4. Throughput: K commands on every agent.
    if cfg.commands > 0 {
        let cmd = vec![Step::Exec {
            argv: vec!["true".into()],
        }];
        let want = swarm.stats.acks + (n * cfg.commands) as u64;
        let g0 = sample(pid)?.cpu_ticks;
        let l0 = self_cpu_ticks();
        let prof = Profiler::start("throughput", pid);
        let t = clock.now();
        admin.call(Request::QueueAdd {
            attached: None,
            target: "all".into(),
            commands: vec![cmd; cfg.commands],
            timeout_ms: 600_000,
            max_attempts: 1,
            on_failure: OnFailureSpec::Continue,
        })?;
        if !swarm.run_until(end, |s| s.stats.acks >= want) {
            return Err(phase_err("throughput", &swarm));
        }
        let w = secs(clock.now() - t);
        prof.stop();
        let tps = ticks_per_sec();
        rep.cmds = (n * cfg.commands) as u64;
        rep.cmds_per_s = rep.cmds as f64 / w;
        rep.tput_gateway_cpu = (sample(pid)?.cpu_ticks - g0) as f64 / tps / w;
        rep.tput_loadgen_cpu = (self_cpu_ticks() - l0) as f64 / tps / w;
    }

    // 5. Latency: probes at a fixed rate on rotating groups.
    if cfg.lat_rate > 0 {
        swarm.stats.latencies_us.clear();
        let queued = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let (q, fin) = (queued.clone(), finished.clone());
        let (rate, lat_secs, data2) = (cfg.lat_rate, cfg.lat_secs, data.to_path_buf());
        let group_size = n.div_ceil(groups) as u64;
        let probe = std::thread::spawn(move || -> io::Result<()> {
            let r = (|| {
                let mut admin = AdminPipe::connect(&data2)?;
                let interval = Duration::from_secs_f64(group_size as f64 / rate as f64);
                let start = clock.now();
                let mut next = start;
                let mut j = 0usize;
                while clock.now() - start < Duration::from_secs(lat_secs) {
                    let now = clock.now();
                    if now < next {
                        std::thread::sleep(next - now);
                    }
                    next += interval;
                    let tag = clock.now().as_micros();
                    let data = admin.call(Request::QueueAdd {
                        attached: None,
                        target: format!("g{}", j % groups),
                        commands: vec![vec![Step::Exec {
                            argv: vec![LATENCY_TAG.into(), tag.to_string().into()],
                        }]],
                        timeout_ms: 600_000,
                        max_attempts: 1,
                        on_failure: OnFailureSpec::Continue,
                    })?;
                    let k = data["queued"].as_array().map_or(0, |a| a.len());
                    q.fetch_add(k as u64, Ordering::SeqCst);
                    j += 1;
                }
                Ok(())
            })();
            fin.store(true, Ordering::SeqCst);
            r
        });
        let ok = swarm.run_until(end, |s| {
            finished.load(Ordering::SeqCst)
                && s.stats.latencies_us.len() as u64 >= queued.load(Ordering::SeqCst)
        });
        probe.join().map_err(|_| "probe thread panicked")??;
        if !ok {
            return Err(phase_err("latency", &swarm));
        }
        let mut l = std::mem::take(&mut swarm.stats.latencies_us);
        l.sort_unstable();
        rep.lat_n = l.len();
        if !l.is_empty() {
            rep.lat_p50_us = l[l.len() / 2];
            rep.lat_p99_us = l[(l.len() * 99 / 100).min(l.len() - 1)];
            rep.lat_max_us = l[l.len() - 1];
        }
    }

    // 6. Reconnect storm.
    if cfg.storm {
        drop(admin);
        let before: Vec<u32> = swarm.agents.iter().map(|a| a.sessions).collect();
        let c0 = swarm.stats.connects;
        let l0 = self_cpu_ticks();
        let o0 = listen_overflows();
        let t = clock.now();
        gw.take().expect("running").kill();
        // Agents run their back-off while the gateway is down; restart as an init system would.
        swarm.set_max_connecting(0);
        let g = GatewayProc::spawn(&cfg.gateway_bin, data, listen, cfg.heartbeat)?;
        let pid = g.pid();
        *gw = Some(g);
        rep.storm_restart_s = secs(clock.now() - t);
        let prof = Profiler::start("storm", pid);
        let mut admin = AdminPipe::connect(data)?;
        let data = admin.call(Request::QueueAdd {
            attached: None,
            target: "all".into(),
            commands: vec![vec![Step::Exec {
                argv: vec!["true".into()],
            }]],
            timeout_ms: 600_000,
            max_attempts: 1,
            on_failure: OnFailureSpec::Continue,
        })?;
        let by_id: HashMap<u64, usize> = swarm
            .agents
            .iter()
            .enumerate()
            .map(|(i, a)| (a.device_id, i))
            .collect();
        let mut target = vec![u64::MAX; n];
        for q in data["queued"].as_array().into_iter().flatten() {
            let (Some(d), Some(seq)) = (q["device_id"].as_u64(), q["seq"].as_u64()) else {
                continue;
            };
            if let Some(&i) = by_id.get(&d) {
                target[i] = seq;
            }
        }
        let mut welcomed_at = None;
        let ok = swarm.run_until(end, |s| {
            if welcomed_at.is_none()
                && s.stats.established >= n
                && s.agents.iter().zip(&before).all(|(a, b)| a.sessions > *b)
            {
                welcomed_at = Some(clock.now());
            }
            welcomed_at.is_some()
                && s.agents
                    .iter()
                    .zip(&target)
                    .all(|(a, t)| a.last_acked >= *t)
        });
        if !ok {
            return Err(phase_err("storm", &swarm));
        }
        rep.storm_done_s = secs(clock.now() - t);
        rep.overflows.1 = listen_overflows() - o0;
        prof.stop();
        rep.storm_cpu = (
            sample(pid)?.cpu_ticks as f64 / ticks_per_sec() / rep.storm_done_s,
            (self_cpu_ticks() - l0) as f64 / ticks_per_sec() / rep.storm_done_s,
        );
        rep.storm_welcomed_s = welcomed_at.map_or(0.0, |w| secs(w - t));
        rep.storm_connects = swarm.stats.connects - c0;
    }
    Ok(rep)
}
