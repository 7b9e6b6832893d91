//! The end-to-end distribution benchmark (`fleetcast bench`, issue #8): in a private lab
//! network, one gateway pushes a generated file to {1, 4, 16} receivers at {0, 1, 5}% random
//! loss per receiver, at MTU 1500 and 9000, and each figure is set against a ceiling
//! measured in the same run on the same topology: a raw UDP blast of the same bytes from the
//! same sender namespace to the same receivers, with no protocol at all.
//!
//! Per row: goodput (file bits / time from the push to the slowest verified copy) and its
//! ratio to the ceiling, bytes the sender's interface sent per file byte, bytes all receivers
//! sent back (NACKs and the control sessions) per file byte, the slowest completion time,
//! and the CPU seconds of the gateway and of the agents (from `/proc/<pid>/stat`).
//!
//! With `--peers udpcast,uftp`, each cell also runs those tools after fleetcast's push, in the
//! same lab, on the same file, loss and rate ceiling, and the report sets them side by side
//! (see [`peers`]).
//!
//! Processes run as this binary re-executed in a role (`__gateway`, `__agent`), or as the
//! peers' own binaries, inside lab hosts; nothing leaves the lab's namespaces. Every run is
//! bounded in time.

use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetcast_daemon::admin::{self, Request};
use fleetcast_daemon::gateway::Clock;
use fleetcast_lab::{Lab, LabChild, LabConfig, LabError};
use fleetcast_wire::DATA_PREFIX_LEN;
use serde_json::{json, Value};

pub mod image;
pub mod peers;
use peers::{Peer, PeerRow};

/// The gateway's control port in the lab.
const PORT: u16 = 7300;
/// The multicast port (the gateway's default).
const MCAST_PORT: u16 = 7301;
/// The blast's group and port (apart from the protocol's).
const BLAST_GROUP: Ipv4Addr = Ipv4Addr::new(239, 77, 9, 9);
const BLAST_PORT: u16 = 7399;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Receiver counts.
    pub receivers: Vec<usize>,
    /// Loss percentages (each receiver drops this share of multicast-port datagrams).
    pub loss: Vec<f64>,
    /// MTUs of the lab network.
    pub mtus: Vec<u32>,
    /// File size in MiB.
    pub mib: usize,
    /// Longest wait for one push to complete.
    pub timeout: Duration,
    /// This binary (re-executed as `__gateway` / `__agent`).
    pub exe: PathBuf,
    /// Scratch directory (file, gateway data, agent state); removed by the caller.
    pub work: PathBuf,
}

/// One measured configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Lab MTU.
    pub mtu: u32,
    /// Receivers.
    pub receivers: usize,
    /// Loss per receiver, percent.
    pub loss: f64,
    /// Raw UDP blast to the same receivers, slowest receiver, Mbit/s.
    pub ceiling_mbps: f64,
    /// File bits / time to the slowest verified copy, Mbit/s.
    pub goodput_mbps: f64,
    /// Bytes the sender's interface sent per file byte (Ethernet, IP and UDP headers and
    /// the control sessions included: about 1.08 at MTU 1500 with no repair at all).
    pub sender_bytes_per_byte: f64,
    /// Datagram bytes the multicast senders handed out (prefix + payload, first pass and
    /// repairs, no lower-layer headers) per file byte: the protocol's own overhead.
    pub datagram_bytes_per_byte: f64,
    /// Bytes all receivers sent per file byte (NACKs + control sessions).
    pub feedback_per_byte: f64,
    /// Time from the push to the slowest verified copy, seconds.
    pub slowest_s: f64,
    /// Duration of the multicast first pass (the gateway's log), seconds.
    pub first_pass_s: f64,
    /// Gateway CPU seconds during the push.
    pub cpu_sender_s: f64,
    /// Agents' CPU seconds during the push, summed.
    pub cpu_receivers_s: f64,
}

impl Row {
    /// Goodput as a share of the ceiling.
    pub fn fraction(&self) -> f64 {
        if self.ceiling_mbps > 0.0 {
            self.goodput_mbps / self.ceiling_mbps
        } else {
            0.0
        }
    }

    /// The row as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "mtu": self.mtu,
            "receivers": self.receivers,
            "loss_percent": self.loss,
            "ceiling_mbps": round(self.ceiling_mbps, 1),
            "goodput_mbps": round(self.goodput_mbps, 1),
            "fraction_of_ceiling": round(self.fraction(), 3),
            "sender_bytes_per_file_byte": round(self.sender_bytes_per_byte, 4),
            "datagram_bytes_per_file_byte": round(self.datagram_bytes_per_byte, 4),
            "feedback_bytes_per_file_byte": round(self.feedback_per_byte, 6),
            "slowest_completion_s": round(self.slowest_s, 2),
            "first_pass_s": round(self.first_pass_s, 2),
            "cpu_sender_s": round(self.cpu_sender_s, 2),
            "cpu_receivers_s": round(self.cpu_receivers_s, 2),
        })
    }
}

pub(crate) fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

/// Why a bench run (or drawing its report again) stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file or directory of the run could not be made, written or read.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A report to draw again is not JSON.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
    /// The lab network could not be built.
    #[error("cannot build the lab network (see docs/lab.md): {0}")]
    Lab(#[source] LabError),
    /// A lab host's socket or counters could not be set up or read.
    #[error("lab host: {0}")]
    Host(#[source] io::Error),
    /// A loss rule could not be set or cleared.
    #[error("loss rule: {0}")]
    Loss(#[source] LabError),
    /// A raw-ceiling receiver thread panicked.
    #[error("blast receiver panicked")]
    ReceiverPanicked,
    /// The raw-ceiling sender failed.
    #[error("blast sendmmsg: {0}")]
    Blast(#[source] io::Error),
    /// A process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which process.
        what: String,
        /// Cause.
        source: io::Error,
    },
    /// The gateway's first line could not be read.
    #[error("the gateway's output: {0}")]
    GatewayOutput(#[source] io::Error),
    /// The gateway's first line is not `ready ADDR`.
    #[error("the gateway did not start (see {})", log.display())]
    GatewayNotStarted {
        /// Its log.
        log: PathBuf,
    },
    /// Not every agent came online.
    #[error("only {online} of {n} agents online within 60 s")]
    NotOnline {
        /// Online.
        online: usize,
        /// Started.
        n: usize,
    },
    /// The admin socket did not answer.
    #[error(transparent)]
    Admin(#[from] admin::ClientError),
    /// The gateway refused a request (its own words).
    #[error("{0}")]
    Refused(String),
    /// An image push of `--image` could not be asked for (its form not prepared).
    #[error("{0}")]
    Image(#[from] Box<crate::image::PushImageError>),
    /// An answer or the gateway's output lacks something the bench needs.
    #[error("no {0}")]
    Missing(&'static str),
    /// A receiver's row says failed.
    #[error("a receiver failed: {0}")]
    ReceiverFailed(Value),
    /// Not every copy was verified in time.
    #[error("{done} of {n} copies verified within {timeout:?}")]
    TimedOut {
        /// Copies verified.
        done: usize,
        /// Receivers.
        n: usize,
        /// The plan's timeout.
        timeout: Duration,
    },
    /// A row of `report.json` lacks a number.
    #[error("report.json: a row has no number `{0}`")]
    RowField(&'static str),
    /// `report.json` lacks a field.
    #[error("report.json: no `{0}`")]
    ReportField(&'static str),
    /// A `--peers` tool is not installed.
    #[error("--peers needs `{tool}`: install the Debian package `{package}`")]
    PeerMissing {
        /// The binary.
        tool: &'static str,
        /// Its package.
        package: &'static str,
    },
}

/// `path` as the context of an I/O error.
pub(crate) fn at(path: &Path) -> impl FnOnce(io::Error) -> BenchError + '_ {
    move |source| BenchError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// Payload bytes per datagram at `mtu`: the block, its prefix (blocks carry no tag), UDP and
/// IPv4 headers fill one frame exactly (the gateway's default block).
pub fn block_size_for(mtu: u32) -> u32 {
    mtu - 28 - DATA_PREFIX_LEN as u32
}

/// What a run measured: fleetcast's rows and the peers' rows, each in plan order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measured {
    /// fleetcast, one row per (mtu, receivers, loss).
    pub rows: Vec<Row>,
    /// Each `--peers` tool, one row per (mtu, receivers, loss) and tool.
    pub peers: Vec<PeerRow>,
}

/// Runs the plan; `log` gets a line per step. Rows come in plan order.
pub fn run(plan: &Plan, log: &mut dyn FnMut(&str)) -> Result<Vec<Row>, BenchError> {
    run_with_peers(plan, &[], log).map(|m| m.rows)
}

/// Runs the plan, and `peers` in each cell right after fleetcast's push (`--peers`); `log`
/// gets a line per step. Rows come in plan order.
pub fn run_with_peers(
    plan: &Plan,
    peers: &[Peer],
    log: &mut dyn FnMut(&str),
) -> Result<Measured, BenchError> {
    // Before any lab is built: a missing peer is the user's to install, not a failed row.
    let peer_bins = peers::find_binaries(peers)?;
    let clock = Clock::new();
    std::fs::create_dir_all(&plan.work).map_err(at(&plan.work))?;
    let src = plan.work.join("image.bin");
    write_file(&src, plan.mib << 20)?;
    let src_sha = fleetcast_daemon::distribution::sha256_file(&src).map_err(at(&src))?;
    let max_n = plan.receivers.iter().copied().max().unwrap_or(1);
    let mut rows = Vec::new();
    let mut peer_rows = Vec::new();
    for &mtu in &plan.mtus {
        let lab = Lab::new(LabConfig {
            mtu,
            ..LabConfig::hosts(max_n + 1)
        })
        .map_err(BenchError::Lab)?;
        for &n in &plan.receivers {
            let ceiling = blast(&lab, n, mtu, plan.mib << 20, &clock)?;
            log(&format!(
                "mtu {mtu}, {n} receivers: raw UDP ceiling {ceiling:.0} Mbit/s"
            ));
            let dir = plan.work.join(format!("mtu{mtu}-n{n}"));
            let fleet = Fleet::start(&lab, plan, &dir, n, &clock)?;
            for &loss in &plan.loss {
                let row = fleet.push(&lab, plan, &src, mtu, loss, ceiling, &clock)?;
                log(&format!(
                    "mtu {mtu}, {n} receivers, {loss}% loss: {:.0} Mbit/s = {:.2} of the ceiling, \
                     sender {:.3} B/B on the wire, {:.3} in datagrams, feedback {:.5} B/B, \
                     slowest {:.1} s (first pass {:.1} s), cpu {:.1}+{:.1} s",
                    row.goodput_mbps,
                    row.fraction(),
                    row.sender_bytes_per_byte,
                    row.datagram_bytes_per_byte,
                    row.feedback_per_byte,
                    row.slowest_s,
                    row.first_pass_s,
                    row.cpu_sender_s,
                    row.cpu_receivers_s
                ));
                rows.push(row);
                for (peer, bins) in &peer_bins {
                    let cell = peers::Cell {
                        lab: &lab,
                        mtu,
                        receivers: n,
                        loss,
                        ceiling_mbps: ceiling,
                        src: &src,
                        src_sha,
                        timeout: plan.timeout,
                        dir: dir.join(peer.name()),
                        clock: &clock,
                    };
                    let r = peers::run_peer(*peer, bins, &cell)?;
                    log(&r.describe());
                    peer_rows.push(r);
                }
            }
            drop(fleet);
            if std::env::var_os("FLEETCAST_BENCH_KEEP").is_none() {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    Ok(Measured {
        rows,
        peers: peer_rows,
    })
}

/// A seeded, incompressible file of `len` bytes.
fn write_file(path: &Path, len: usize) -> Result<(), BenchError> {
    let mut x: u64 = 0x5eed_0008;
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    std::fs::write(path, &data).map_err(at(path))
}

/// The raw ceiling: host 0 blasts `len` bytes in datagrams of the protocol's size to a group
/// joined by hosts 1..=n, as fast as `sendmmsg` goes; each receiver counts with `recvmmsg`.
/// Returns the slowest receiver's rate in Mbit/s (bytes it got / first-to-last arrival).
fn blast(lab: &Lab, n: usize, mtu: u32, len: usize, clock: &Clock) -> Result<f64, BenchError> {
    let dgram = block_size_for(mtu) as usize + DATA_PREFIX_LEN;
    let stop = Arc::new(AtomicBool::new(false));
    let mut rxs = Vec::new();
    for i in 1..=n {
        let h = lab.host(i);
        let s = h.udp_socket(BLAST_PORT).map_err(BenchError::Host)?;
        let s2 = socket2::Socket::from(s);
        s2.join_multicast_v4(&BLAST_GROUP, &h.addr())
            .map_err(BenchError::Host)?;
        let _ = s2.set_recv_buffer_size(8 << 20);
        s2.set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(BenchError::Host)?;
        let sock: UdpSocket = s2.into();
        let stop = stop.clone();
        let clock = *clock;
        rxs.push(std::thread::spawn(move || {
            count(&sock, dgram, &stop, &clock)
        }));
    }
    let tx = lab.host(0).udp_socket(0).map_err(BenchError::Host)?;
    let tx2 = socket2::Socket::from(tx);
    tx2.set_multicast_if_v4(&lab.host(0).addr())
        .map_err(BenchError::Host)?;
    tx2.set_multicast_ttl_v4(1).map_err(BenchError::Host)?;
    let _ = tx2.set_send_buffer_size(4 << 20);
    let tx: UdpSocket = tx2.into();
    std::thread::sleep(Duration::from_millis(200));
    send_blast(&tx, SocketAddrV4::new(BLAST_GROUP, BLAST_PORT), dgram, len)?;
    // Let the receivers drain, then stop them.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let mut slowest = f64::MAX;
    for r in rxs {
        let (bytes, secs) = r.join().map_err(|_| BenchError::ReceiverPanicked)?;
        let mbps = if secs > 0.0 {
            bytes as f64 * 8.0 / secs / 1e6
        } else {
            0.0
        };
        slowest = slowest.min(mbps);
    }
    Ok(if slowest == f64::MAX { 0.0 } else { slowest })
}

/// Sends `len` bytes in `dgram`-byte datagrams with `sendmmsg`, 64 at a time, blocking.
fn send_blast(
    tx: &UdpSocket,
    to: SocketAddrV4,
    dgram: usize,
    len: usize,
) -> Result<(), BenchError> {
    const B: usize = 64;
    let payload = vec![0xa5u8; dgram];
    let addr = socket2::SockAddr::from(SocketAddr::V4(to));
    let mut sent = 0usize;
    while sent < len {
        let k = (len - sent).div_ceil(dgram).min(B);
        let mut iovs: Vec<libc::iovec> = (0..k)
            .map(|_| libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: dgram,
            })
            .collect();
        // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
        let mut hdrs: Vec<libc::mmsghdr> = (0..k).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (h, iov) in hdrs.iter_mut().zip(iovs.iter_mut()) {
            h.msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_namelen = addr.len();
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the headers point at `iovs`, `payload` and `addr`, all alive for the call;
        // the kernel only reads them.
        let r = unsafe { libc::sendmmsg(tx.as_raw_fd(), hdrs.as_mut_ptr(), k as u32, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted
                || e.raw_os_error() == Some(libc::ENOBUFS)
            {
                continue;
            }
            return Err(BenchError::Blast(e));
        }
        sent += r as usize * dgram;
    }
    Ok(())
}

/// Counts bytes until `stop`; returns (bytes, seconds from the first to the last datagram).
fn count(sock: &UdpSocket, dgram: usize, stop: &AtomicBool, clock: &Clock) -> (u64, f64) {
    let mut buf = vec![0u8; dgram + 64];
    let (mut bytes, mut first, mut last) = (0u64, None, None);
    while !stop.load(Ordering::Relaxed) {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let t = clock.read().0;
                first.get_or_insert(t);
                last = Some(t);
                bytes += n as u64;
            }
            Err(_) => continue,
        }
    }
    match (first, last) {
        (Some(f), Some(l)) if l > f => (bytes, (l - f).as_secs_f64()),
        _ => (bytes, 0.0),
    }
}

/// The bench's push of `path` to its `n` receivers: started as soon as every receiver has
/// joined (no fixed warm-up), as an operator imaging a known set of machines would.
fn push_request(
    path: &Path,
    mtu: u32,
    n: usize,
    rate_mbps: u64,
    image: Option<admin::PushImage>,
) -> Request {
    Request::Push {
        path: path.display().to_string(),
        group: "bench".into(),
        block_size: block_size_for(mtu),
        rate_mbps,
        trigger: admin::PushTrigger {
            at_ms: None,
            min_ready: Some(n as u32),
            max_wait_s: Some(10),
        },
        then: vec![],
        delivery: Default::default(),
        follow: Default::default(),
        image,
    }
}

/// A gateway on host 0 and `n` enrolled agents on hosts 1..=n.
struct Fleet<'lab> {
    data: PathBuf,
    log: PathBuf,
    gateway: LabChild<'lab>,
    agents: Vec<(LabChild<'lab>, PathBuf)>,
}

impl<'lab> Fleet<'lab> {
    fn start(
        lab: &'lab Lab,
        plan: &Plan,
        dir: &Path,
        n: usize,
        clock: &Clock,
    ) -> Result<Fleet<'lab>, BenchError> {
        Self::start_with_disks(lab, plan, dir, n, clock, None)
    }

    /// [`Fleet::start`], each agent with a disk of `disk` bytes labelled
    /// [`image::LABEL`] when asked (a file, see [`image::disk_root`]).
    fn start_with_disks(
        lab: &'lab Lab,
        plan: &Plan,
        dir: &Path,
        n: usize,
        clock: &Clock,
        disk: Option<u64>,
    ) -> Result<Fleet<'lab>, BenchError> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(at(dir))?;
        let data = dir.join("gateway");
        let gw_addr = lab.host(0).addr();
        let listen = SocketAddrV4::new(gw_addr, PORT);
        let log = dir.join("gateway.log");
        let gw_log = std::fs::File::create(&log).map_err(at(&log))?;
        let mut gateway = lab
            .host(0)
            .spawn(&plan.exe, |c| {
                c.args(["__gateway", "--", "--data-dir"])
                    .arg(&data)
                    .args(["--listen", &listen.to_string()])
                    .args(["--server-name", &gw_addr.to_string()])
                    .args(["--mcast-addr", &gw_addr.to_string()])
                    .args(["--mcast-linger", "600"])
                    .env("RUST_LOG", "info")
                    .env("NO_COLOR", "1")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(gw_log);
            })
            .map_err(|source| BenchError::Spawn {
                what: "the gateway".into(),
                source,
            })?;
        let mut line = String::new();
        let out = gateway
            .child()
            .stdout
            .take()
            .ok_or(BenchError::Missing("gateway stdout"))?;
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(BenchError::GatewayOutput)?;
        if !line.starts_with("ready ") {
            return Err(BenchError::GatewayNotStarted { log });
        }
        let mut fleet = Fleet {
            data,
            log,
            gateway,
            agents: Vec::new(),
        };
        for i in 1..=n {
            let name = format!("r{i}");
            let d = fleet.admin(&Request::DeviceAdd {
                name: name.clone(),
                groups: vec!["bench".into()],
            })?;
            let token = d["token"]
                .as_str()
                .ok_or(BenchError::Missing("token"))?
                .to_string();
            let state = dir.join(&name);
            std::fs::create_dir_all(&state).map_err(at(&state))?;
            let boot = state.join("boot_id");
            std::fs::write(&boot, "00000000-0000-4000-8000-000000000001\n").map_err(at(&boot))?;
            let ca = fleet.data.join("pki/ca.pem");
            let agent_log_path = state.join("agent.log");
            let agent_log = std::fs::File::create(&agent_log_path).map_err(at(&agent_log_path))?;
            let mut extra = Vec::new();
            if let Some(size) = disk {
                let root = state.join("root");
                image::disk_root(&root, &state.join("disk.img"), size)?;
                extra = vec!["--report-root".to_string(), root.display().to_string()];
            }
            let child = lab
                .host(i)
                .spawn(&plan.exe, |c| {
                    c.args(["__agent", "--", "--gateway", &listen.to_string()])
                        .arg("--state-dir")
                        .arg(state.join("state"))
                        .arg("--ca")
                        .arg(&ca)
                        .arg("--boot-id-file")
                        .arg(&boot)
                        .args(["--token", &token, "--name", &name])
                        .args(&extra)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(agent_log);
                })
                .map_err(|source| BenchError::Spawn {
                    what: format!("agent {name}"),
                    source,
                })?;
            fleet.agents.push((child, state.join("state")));
        }
        let deadline = clock.read().0 + Duration::from_secs(60);
        loop {
            let st = fleet.admin(&Request::Status)?;
            let online = st["devices"]
                .as_array()
                .map_or(0, |d| d.iter().filter(|d| d["online"] == true).count());
            if online == n {
                return Ok(fleet);
            }
            if clock.read().0 > deadline {
                return Err(BenchError::NotOnline { online, n });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn admin(&self, req: &Request) -> Result<Value, BenchError> {
        let r = admin::request(&self.data, req)?;
        if r.ok {
            Ok(r.data)
        } else {
            Err(BenchError::Refused(
                r.error.unwrap_or_else(|| "refused".into()),
            ))
        }
    }

    /// The gateway's multicast datagram byte counter (its metrics, over the admin socket).
    fn datagram_bytes(&self) -> Result<u64, BenchError> {
        let m = self.admin(&Request::Metrics)?;
        m["samples"]["fleetcast_mcast_bytes_sent_total"]
            .as_u64()
            .ok_or(BenchError::Missing(
                "fleetcast_mcast_bytes_sent_total in the metrics",
            ))
    }

    /// The `ms=` of the gateway's latest "first pass done" line (0 if none).
    fn last_first_pass_ms(&self) -> u64 {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .rev()
            .find(|l| l.contains("first pass done"))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("ms="))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Waits until all `n` rows of `task` are completed (a failed row or the deadline end it).
    fn wait_completed(
        &self,
        task: u64,
        n: usize,
        deadline: fleetcast_wire::Instant,
        timeout: Duration,
        clock: &Clock,
    ) -> Result<(), BenchError> {
        loop {
            let t = self.admin(&Request::TaskShow { task: Some(task) })?;
            let rows = t["devices"].as_array().cloned().unwrap_or_default();
            let done = rows.iter().filter(|r| r["status"] == "completed").count();
            if done == n {
                return Ok(());
            }
            if let Some(f) = rows.iter().find(|r| r["status"] == "failed") {
                return Err(BenchError::ReceiverFailed(f.clone()));
            }
            if clock.read().0 > deadline {
                return Err(BenchError::TimedOut { done, n, timeout });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn cpu(&self) -> (f64, f64) {
        let gw = cpu_seconds(self.gateway.id());
        let agents = self.agents.iter().map(|(c, _)| cpu_seconds(c.id())).sum();
        (gw, agents)
    }

    /// One push at `loss`%, measured.
    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        lab: &Lab,
        plan: &Plan,
        src: &Path,
        mtu: u32,
        loss: f64,
        ceiling: f64,
        clock: &Clock,
    ) -> Result<Row, BenchError> {
        let n = self.agents.len();
        for i in 1..=n {
            let h = lab.host(i);
            h.clear_loss().map_err(BenchError::Loss)?;
            if loss > 0.0 {
                h.loss_in(&[MCAST_PORT], loss).map_err(BenchError::Loss)?;
            }
            // A fresh copy each time: the previous push's file would be re-verified, not sent.
            let downloads = self.agents[i - 1].1.join("downloads");
            let _ = std::fs::remove_dir_all(&downloads);
        }
        let size = std::fs::metadata(src).map_err(at(src))?.len();
        let ifs = |i: usize| lab.host(i).counters().map_err(BenchError::Host);
        let tx0 = ifs(0)?.tx_bytes;
        let fb0: u64 = (1..=n)
            .map(|i| ifs(i).map(|c| c.tx_bytes))
            .sum::<Result<_, _>>()?;
        let (cpu_g0, cpu_a0) = self.cpu();
        let dg0 = self.datagram_bytes()?;
        let t0 = clock.read().0;
        // The rate ceiling is the measured raw ceiling: the protocol may use what the
        // network carries, no more.
        let rate = (ceiling.max(10.0)) as u64;
        let r = self.admin(&push_request(src, mtu, n, rate, None))?;
        let task = r["task"].as_u64().ok_or(BenchError::Missing("task id"))?;
        self.wait_completed(task, n, t0 + plan.timeout, plan.timeout, clock)?;
        let secs = (clock.read().0 - t0).as_secs_f64();
        let (cpu_g1, cpu_a1) = self.cpu();
        let dg1 = self.datagram_bytes()?;
        let tx1 = ifs(0)?.tx_bytes;
        let fb1: u64 = (1..=n)
            .map(|i| ifs(i).map(|c| c.tx_bytes))
            .sum::<Result<_, _>>()?;
        Ok(Row {
            mtu,
            receivers: n,
            loss,
            ceiling_mbps: ceiling,
            goodput_mbps: size as f64 * 8.0 / secs / 1e6,
            sender_bytes_per_byte: (tx1 - tx0) as f64 / size as f64,
            datagram_bytes_per_byte: dg1.saturating_sub(dg0) as f64 / size as f64,
            feedback_per_byte: (fb1 - fb0) as f64 / size as f64,
            slowest_s: secs,
            first_pass_s: self.last_first_pass_ms() as f64 / 1000.0,
            cpu_sender_s: cpu_g1 - cpu_g0,
            cpu_receivers_s: cpu_a1 - cpu_a0,
        })
    }
}

/// User + system CPU seconds of process `pid` (0 if it is gone).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = f
        .get(11..13)
        .map_or(0, |v| v.iter().filter_map(|x| x.parse::<u64>().ok()).sum());
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

/// A Markdown table of the rows.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| MTU | receivers | loss % | ceiling Mbit/s | goodput Mbit/s | of ceiling | sender wire B/B | sender datagram B/B | feedback B/B | slowest s | CPU sender s | CPU receivers s |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.3} | {:.3} | {:.5} | {:.1} | {:.1} | {:.1} |\n",
            r.mtu,
            r.receivers,
            r.loss,
            r.ceiling_mbps,
            r.goodput_mbps,
            r.fraction(),
            r.sender_bytes_per_byte,
            r.datagram_bytes_per_byte,
            r.feedback_per_byte,
            r.slowest_s,
            r.cpu_sender_s,
            r.cpu_receivers_s
        ));
    }
    s
}

/// An SVG line chart: one series per key, points (x, y).
pub fn svg_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let (w, h, m) = (640.0, 400.0, 56.0);
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0));
    let ys = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1));
    let x_max = xs.fold(0.0f64, f64::max).max(1e-9);
    let y_max = ys.fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let px = |x: f64| m + x / x_max * (w - 2.0 * m);
    let py = |y: f64| h - m - y / y_max * (h - 2.0 * m);
    let colours = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">{}</text>\n",
        w / 2.0,
        esc(title),
        h - m,
        w - m,
        h - m,
        h - m,
        w / 2.0,
        h - 12.0,
        esc(x_label),
        h / 2.0,
        h / 2.0,
        esc(y_label)
    );
    for i in 0..=4 {
        let xv = x_max * f64::from(i) / 4.0;
        let yv = y_max * f64::from(i) / 4.0;
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            px(xv),
            h - m + 16.0,
            fmt_num(xv),
            m - 4.0,
            py(yv) + 4.0,
            fmt_num(yv)
        ));
    }
    // One colour per cell, one dash per tool: fleetcast's line and the peers' for the same
    // cell share a colour, so the plot reads side by side.
    let mut cells: Vec<&str> = Vec::new();
    for (k, (name, pts)) in series.iter().enumerate() {
        let (cell, dash) = series_style(name);
        let i = cells.iter().position(|c| *c == cell).unwrap_or_else(|| {
            cells.push(cell);
            cells.len() - 1
        });
        let c = colours[i % colours.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let dash = if dash.is_empty() {
            String::new()
        } else {
            format!(" stroke-dasharray=\"{dash}\"")
        };
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n",
            path.join(" ")
        ));
        for &(x, y) in pts {
            s.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>\n",
                px(x),
                py(y)
            ));
        }
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{c}\">{}</text>\n",
            w - m - 150.0,
            m + 16.0 * k as f64,
            esc(name)
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// A series' cell (its name without the tool) and its dash pattern: a peer's series is named
/// `udpcast, …` or `uftp, …` by [`plots`]; fleetcast's is solid.
fn series_style(name: &str) -> (&str, &'static str) {
    for (tool, dash) in [("udpcast, ", "6 3"), ("uftp, ", "2 3")] {
        if let Some(cell) = name.strip_prefix(tool) {
            return (cell, dash);
        }
    }
    (name.strip_prefix("fleetcast, ").unwrap_or(name), "")
}

fn fmt_num(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Adds point `p` to the series named `key`, starting it if new.
fn add_point(series: &mut Vec<(String, Vec<(f64, f64)>)>, key: String, p: (f64, f64)) {
    match series.iter_mut().find(|(n, _)| *n == key) {
        Some((_, pts)) => pts.push(p),
        None => series.push((key, vec![p])),
    }
}

/// The report's plots.
#[derive(Debug, Clone)]
pub struct Plots {
    /// Goodput (share of the ceiling) vs loss, one line per tool, receiver count and MTU.
    pub goodput: String,
    /// Slowest completion time vs receivers, one line per tool, loss and MTU.
    pub time: String,
    /// fleetcast's datagram bytes per file byte vs receivers (the peers have no such
    /// counter), one line per loss and MTU.
    pub overhead: String,
    /// Sender wire bytes per file byte vs receivers, one line per tool, loss and MTU.
    pub wire: String,
}

/// The report's plots; failed peer rows have no point.
pub fn plots(m: &Measured) -> Plots {
    let mut by_n = Vec::new();
    let mut by_loss = Vec::new();
    let mut overhead = Vec::new();
    let mut wire = Vec::new();
    // fleetcast's lines are named for their tool only when peers share the plot.
    let ours = if m.peers.is_empty() {
        ""
    } else {
        "fleetcast, "
    };
    for r in &m.rows {
        let n = r.receivers as f64;
        add_point(
            &mut by_n,
            format!("{ours}{} receivers, MTU {}", r.receivers, r.mtu),
            (r.loss, r.fraction()),
        );
        let k = format!("{}% loss, MTU {}", r.loss, r.mtu);
        add_point(&mut by_loss, format!("{ours}{k}"), (n, r.slowest_s));
        add_point(&mut overhead, k.clone(), (n, r.datagram_bytes_per_byte));
        add_point(
            &mut wire,
            format!("fleetcast, {k}"),
            (n, r.sender_bytes_per_byte),
        );
    }
    for r in &m.peers {
        let (Ok(f), Some(frac)) = (&r.outcome, r.fraction()) else {
            continue;
        };
        let (tool, n) = (r.peer.name(), r.receivers as f64);
        add_point(
            &mut by_n,
            format!("{tool}, {} receivers, MTU {}", r.receivers, r.mtu),
            (r.loss, frac),
        );
        let k = format!("{tool}, {}% loss, MTU {}", r.loss, r.mtu);
        add_point(&mut by_loss, k.clone(), (n, f.slowest_s));
        add_point(&mut wire, k, (n, f.sender_bytes_per_byte));
    }
    Plots {
        goodput: svg_chart(
            "Goodput vs loss",
            "loss per receiver (%)",
            "goodput / raw UDP ceiling",
            &by_n,
        ),
        time: svg_chart(
            "Completion time vs receivers",
            "receivers",
            "slowest verified copy (s)",
            &by_loss,
        ),
        overhead: svg_chart(
            "Sender overhead vs receivers",
            "receivers",
            "sender datagram bytes / file byte",
            &overhead,
        ),
        wire: svg_chart(
            "Sender bytes on the wire vs receivers",
            "receivers",
            "sender interface bytes / file byte",
            &wire,
        ),
    }
}

/// Rows from a report's `report.json` (to draw the report again without a new run).
pub fn rows_from_json(v: &Value) -> Result<(usize, Vec<Row>), BenchError> {
    let f = |r: &Value, k: &'static str| r[k].as_f64().ok_or(BenchError::RowField(k));
    let mut rows = Vec::new();
    for r in v["rows"]
        .as_array()
        .ok_or(BenchError::ReportField("rows"))?
    {
        rows.push(Row {
            mtu: f(r, "mtu")? as u32,
            receivers: f(r, "receivers")? as usize,
            loss: f(r, "loss_percent")?,
            ceiling_mbps: f(r, "ceiling_mbps")?,
            goodput_mbps: f(r, "goodput_mbps")?,
            sender_bytes_per_byte: f(r, "sender_bytes_per_file_byte")?,
            datagram_bytes_per_byte: f(r, "datagram_bytes_per_file_byte")?,
            feedback_per_byte: f(r, "feedback_bytes_per_file_byte")?,
            slowest_s: f(r, "slowest_completion_s")?,
            first_pass_s: f(r, "first_pass_s")?,
            cpu_sender_s: f(r, "cpu_sender_s")?,
            cpu_receivers_s: f(r, "cpu_receivers_s")?,
        });
    }
    let mib = v["file_mib"]
        .as_u64()
        .ok_or(BenchError::ReportField("file_mib"))? as usize;
    Ok((mib, rows))
}

/// Everything a report's `report.json` holds: the file size and the rows (a report from
/// before `--peers` has no peer rows).
pub fn measured_from_json(v: &Value) -> Result<(usize, Measured), BenchError> {
    let (mib, rows) = rows_from_json(v)?;
    let peers = peers::peer_rows_from_json(v)?;
    Ok((mib, Measured { rows, peers }))
}

/// Writes the report of fleetcast's rows alone (see [`write_measured`]).
pub fn write_report(rows: &[Row], plan: &Plan, dir: &Path) -> Result<String, BenchError> {
    let m = Measured {
        rows: rows.to_vec(),
        peers: Vec::new(),
    };
    write_measured(&m, plan, dir)
}

/// Writes `report.md`, `report.json`, `goodput-vs-loss.svg`, `completion-vs-receivers.svg`,
/// `overhead-vs-receivers.svg` and `wire-vs-receivers.svg` into `dir`; returns the Markdown.
pub fn write_measured(m: &Measured, plan: &Plan, dir: &Path) -> Result<String, BenchError> {
    std::fs::create_dir_all(dir).map_err(at(dir))?;
    let side = if m.peers.is_empty() {
        String::new()
    } else {
        format!(
            "## Side by side\n\nEach peer ran in the same lab, with the same receivers, file and \
             rate ceiling (udpcast's capped at 2,147 Mbit/s, the most its --max-bitrate holds), \
             right after fleetcast's push, with the same loss rule applied to its multicast data \
             group. A peer's time ends when its sender exits, once every receiver has confirmed \
             its copy; every copy was then checked against the source's SHA-256.\n\n{}\n",
            peers::side_by_side(&m.rows, &m.peers)
        )
    };
    let md = format!(
        "# fleetcast bench\n\n{} MiB file; rate ceiling of each push = the raw UDP ceiling \
         measured in the same run on the same topology.\n\n{}\n{side}\
         ![goodput vs loss](goodput-vs-loss.svg)\n![completion vs receivers](completion-vs-receivers.svg)\n\
         ![sender overhead vs receivers](overhead-vs-receivers.svg)\n\
         ![sender bytes on the wire vs receivers](wire-vs-receivers.svg)\n",
        plan.mib,
        markdown(&m.rows)
    );
    let mut json = json!({
        "file_mib": plan.mib,
        "rows": m.rows.iter().map(Row::to_json).collect::<Vec<_>>(),
    });
    if !m.peers.is_empty() {
        json["peer_rows"] = m.peers.iter().map(PeerRow::to_json).collect();
    }
    let p = plots(m);
    for (name, body) in [
        ("report.md", md.clone()),
        ("report.json", format!("{json:#}\n")),
        ("goodput-vs-loss.svg", p.goodput),
        ("completion-vs-receivers.svg", p.time),
        ("overhead-vs-receivers.svg", p.overhead),
        ("wire-vs-receivers.svg", p.wire),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, body).map_err(at(&p))?;
    }
    Ok(md)
}

/// A `fleetcast bench` flag whose value cannot be measured: names the flag the user gave and
/// says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value}: {why}")]
pub struct FlagError {
    /// The flag, e.g. `--receivers`.
    pub flag: &'static str,
    /// The value given.
    pub value: String,
    /// Why it is refused and what is accepted.
    pub why: String,
}

/// Parses the comma-separated list (`"1,4,16"`) given to `flag`.
pub fn parse_list<T: std::str::FromStr>(flag: &'static str, s: &str) -> Result<Vec<T>, FlagError> {
    s.split(',')
        .map(|v| {
            v.trim().parse().map_err(|_| FlagError {
                flag,
                value: s.to_string(),
                why: format!(
                    "`{}` is not a number (expected a list like 1,4,16)",
                    v.trim()
                ),
            })
        })
        .collect()
}

/// Smallest and largest lab MTU: IPv4's minimum datagram, and jumbo frames.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 576..=9000;

impl Plan {
    /// Refuses, before any lab is built, values that cannot be measured; the error names the
    /// flag they came from.
    pub fn check(&self) -> Result<(), FlagError> {
        let bad = |flag, value: String, why: String| Err(FlagError { flag, value, why });
        let max = fleetcast_lab::MAX_HOSTS - 1;
        if let Some(n) = self.receivers.iter().find(|n| !(1..=max).contains(*n)) {
            return bad(
                "--receivers",
                n.to_string(),
                format!("a push needs at least one receiver, and the lab has room for {max}: give counts from 1 to {max}, e.g. 1,4,16"),
            );
        }
        if let Some(l) = self.loss.iter().find(|l| !(0.0..100.0).contains(*l)) {
            return bad(
                "--loss",
                l.to_string(),
                "loss is a percentage from 0 up to (not including) 100, e.g. 0,1,5".into(),
            );
        }
        if let Some(m) = self.mtus.iter().find(|m| !MTU_RANGE.contains(*m)) {
            return bad(
                "--mtu",
                m.to_string(),
                format!(
                    "the lab's MTU must be {} to {}, e.g. 1500,9000",
                    MTU_RANGE.start(),
                    MTU_RANGE.end()
                ),
            );
        }
        if !(1..=65_536).contains(&self.mib) {
            return bad(
                "--mib",
                self.mib.to_string(),
                "the pushed file is 1 to 65536 MiB".into(),
            );
        }
        if self.timeout.is_zero() {
            return bad(
                "--timeout",
                "0".into(),
                "a push needs at least 1 second".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_fills_one_frame() {
        assert_eq!(block_size_for(1500) as usize + DATA_PREFIX_LEN + 28, 1500);
        assert_eq!(block_size_for(9000) as usize + DATA_PREFIX_LEN + 28, 9000);
    }

    #[test]
    fn report_has_a_row_and_a_point_per_measurement() {
        let row = |n, loss, good| Row {
            mtu: 1500,
            receivers: n,
            loss,
            ceiling_mbps: 100.0,
            goodput_mbps: good,
            sender_bytes_per_byte: 1.1,
            datagram_bytes_per_byte: 1.02,
            feedback_per_byte: 0.0004,
            slowest_s: 3.0,
            first_pass_s: 2.5,
            cpu_sender_s: 1.0,
            cpu_receivers_s: 2.0,
        };
        let rows = [row(1, 0.0, 90.0), row(1, 5.0, 80.0), row(4, 0.0, 70.0)];
        let md = markdown(&rows);
        assert_eq!(md.lines().count(), 2 + 3);
        assert!(md.contains("| 1500 | 1 | 5 | 100 | 80 | 0.80 |"), "{md}");
        let measured = Measured {
            rows: rows.to_vec(),
            peers: vec![],
        };
        let Plots {
            goodput,
            time,
            overhead,
            wire,
        } = plots(&measured);
        assert_eq!(overhead.matches("<circle").count(), 3);
        assert_eq!(wire.matches("<circle").count(), 3);
        let back = rows_from_json(&json!({
            "file_mib": 2,
            "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        }))
        .unwrap();
        assert_eq!(back, (2, rows.to_vec()));
        assert_eq!(parse_list::<usize>("r", "1, 4,16").unwrap(), [1, 4, 16]);
        let e = parse_list::<f64>("--loss", "1,x").unwrap_err().to_string();
        assert!(e.starts_with("--loss 1,x: `x` is not a number"), "{e}");
        assert_eq!(goodput.matches("<circle").count(), 3);
        assert_eq!(goodput.matches("<polyline").count(), 2);
        assert_eq!(time.matches("<polyline").count(), 2);
        assert!(goodput.contains("1 receivers, MTU 1500"));
        assert!(!goodput.contains("stroke-dasharray"), "{goodput}");
        assert_eq!(
            series_style("uftp, 5% loss, MTU 1500"),
            ("5% loss, MTU 1500", "2 3")
        );
        assert_eq!(
            series_style("fleetcast, 5% loss, MTU 1500"),
            ("5% loss, MTU 1500", "")
        );
        assert_eq!(
            series_style("4 receivers, MTU 9000"),
            ("4 receivers, MTU 9000", "")
        );
        assert_eq!(rows[1].to_json()["fraction_of_ceiling"], 0.8);
    }

    #[test]
    fn values_that_cannot_be_measured_name_their_flag() {
        let plan = Plan {
            receivers: vec![1, 4],
            loss: vec![0.0, 5.0],
            mtus: vec![1500, 9000],
            mib: 2,
            timeout: Duration::from_secs(1),
            exe: PathBuf::new(),
            work: PathBuf::new(),
        };
        assert_eq!(plan.check(), Ok(()));
        type Change = fn(&mut Plan);
        let cases: [(Change, &str); 6] = [
            (
                |p| p.receivers = vec![4, 0],
                "--receivers 0: a push needs at least one receiver",
            ),
            (|p| p.loss = vec![100.0], "--loss 100: loss is a percentage"),
            (|p| p.loss = vec![f64::NAN], "--loss NaN"),
            (
                |p| p.mtus = vec![100],
                "--mtu 100: the lab's MTU must be 576 to 9000",
            ),
            (|p| p.mib = 0, "--mib 0"),
            (|p| p.timeout = Duration::ZERO, "--timeout 0"),
        ];
        for (change, want) in cases {
            let mut p = plan.clone();
            change(&mut p);
            let e = p.check().unwrap_err().to_string();
            assert!(e.starts_with(want), "want {want:?}, got {e:?}");
        }
    }

    #[test]
    fn cpu_seconds_of_self_is_read() {
        // Burn a little CPU so the count is visibly non-zero; `black_box` keeps a release
        // build from folding the loop away (it did, and the count read 0).
        let mut x = 0u64;
        for i in 0..30_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(x != 1);
        assert!(cpu_seconds(std::process::id()) > 0.0);
        assert_eq!(cpu_seconds(u32::MAX), 0.0);
    }
}
