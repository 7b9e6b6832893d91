//! Other multicast file senders run by `fleetcast bench --peers udpcast,uftp`, so that a
//! fleetcast figure stands beside what established tools do with the same bytes: the same lab
//! (the same namespaces and veths), the same receivers, the same loss rule (each receiver
//! drops the same share of the datagrams of the tool's multicast data stream), the same file
//! and the same rate ceiling (the raw UDP ceiling measured in the run; udpcast's capped at
//! 2,147 Mbit/s, the most its counter holds).
//!
//! Every process runs inside a lab host (`Host::spawn`), with its interface named explicitly
//! and its multicast groups in 239.77.0.0/16 at TTL 1, on ports apart from fleetcast's
//! (7300–7301) and the blast's (7399). Each run is bounded by the plan's timeout; whatever is
//! still running then is killed by its own handle, and the row is reported as failed.
//!
//! A peer's time runs from starting its sender until the sender exits, which both tools do
//! only once every receiver has confirmed its copy (udpcast's final ACK, UFTP's COMPLETE);
//! every copy is then checked against the source's SHA-256, and a row with any copy missing
//! or different is a failure, not a figure.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use fleetcast_daemon::distribution::sha256_file;
use fleetcast_daemon::gateway::Clock;
use fleetcast_lab::{Lab, LabChild};
use serde_json::{json, Value};

use super::{at, cpu_seconds, round, BenchError, FlagError};

/// udpcast's port base (it uses this port and the next; it must be even): apart from
/// fleetcast's and the blast's.
const UDPCAST_PORTBASE: u16 = 7310;
/// udpcast's data and rendez-vous groups (explicit: its defaults derive a 232/8 address from
/// the sender's IP and use broadcast for the rendez-vous).
const UDPCAST_DATA_GROUP: Ipv4Addr = Ipv4Addr::new(239, 77, 10, 1);
const UDPCAST_RDV_GROUP: Ipv4Addr = Ipv4Addr::new(239, 77, 10, 2);
/// The highest `--max-bitrate` udp-sender takes, kbit/s: it holds the rate in a signed 32-bit
/// count of bits per second, and a larger value wraps (a 7 Gbit/s ceiling became a negative
/// rate and the sender slept for ever before its first hello).
const UDPCAST_MAX_KBPS: u64 = i32::MAX as u64 / 1000;
/// UFTP's port, and its public (announce) and private (data) groups.
const UFTP_PORT: u16 = 7320;
const UFTP_PUBLIC_GROUP: Ipv4Addr = Ipv4Addr::new(239, 77, 11, 1);
const UFTP_PRIVATE_GROUP: Ipv4Addr = Ipv4Addr::new(239, 77, 11, 2);
/// How long a receiver may take to wind down after its sender exited (udpcast's receivers
/// linger 500 ms for a lost final ACK).
const WIND_DOWN: Duration = Duration::from_secs(5);

/// A peer tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// udpcast (`udp-sender`, `udp-receiver`).
    Udpcast,
    /// UFTP (`uftp`, `uftpd`).
    Uftp,
}

impl Peer {
    /// The name used by `--peers` and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Udpcast => "udpcast",
            Peer::Uftp => "uftp",
        }
    }

    /// The Debian package that holds its binaries.
    pub fn package(self) -> &'static str {
        match self {
            Peer::Udpcast => "udpcast",
            Peer::Uftp => "uftp",
        }
    }

    /// (sender, receiver) binaries.
    fn binaries(self) -> [&'static str; 2] {
        match self {
            Peer::Udpcast => ["udp-sender", "udp-receiver"],
            Peer::Uftp => ["uftp", "uftpd"],
        }
    }

    /// The multicast group its file data goes to: the loss rule's target.
    fn data_group(self) -> Ipv4Addr {
        match self {
            Peer::Udpcast => UDPCAST_DATA_GROUP,
            Peer::Uftp => UFTP_PRIVATE_GROUP,
        }
    }

    fn from_name(name: &str) -> Option<Peer> {
        [Peer::Udpcast, Peer::Uftp]
            .into_iter()
            .find(|p| p.name() == name)
    }
}

/// Parses `--peers` (`"udpcast,uftp"`; empty: none).
pub fn parse_peers(s: &str) -> Result<Vec<Peer>, FlagError> {
    let mut peers = Vec::new();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let p = Peer::from_name(name).ok_or_else(|| FlagError {
            flag: "--peers",
            value: s.to_string(),
            why: format!("`{name}` is not a peer this bench runs (udpcast, uftp)"),
        })?;
        if !peers.contains(&p) {
            peers.push(p);
        }
    }
    Ok(peers)
}

/// Where each peer's binaries are, or the first missing one named with its package.
pub(crate) fn find_binaries(peers: &[Peer]) -> Result<Vec<(Peer, [PathBuf; 2])>, BenchError> {
    find_binaries_with(peers, |tool, package| {
        fleetcast_lab::tool_path(tool, package).ok()
    })
}

/// [`find_binaries`] with `lookup(tool, package)` in place of the search of `PATH`.
fn find_binaries_with(
    peers: &[Peer],
    lookup: impl Fn(&'static str, &'static str) -> Option<PathBuf>,
) -> Result<Vec<(Peer, [PathBuf; 2])>, BenchError> {
    peers
        .iter()
        .map(|&p| {
            let find = |tool| {
                lookup(tool, p.package()).ok_or(BenchError::PeerMissing {
                    tool,
                    package: p.package(),
                })
            };
            let [s, r] = p.binaries();
            Ok((p, [find(s)?, find(r)?]))
        })
        .collect()
}

/// What a peer measured when every copy verified.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerFigures {
    /// File bits / time to the sender's exit (every copy confirmed), Mbit/s.
    pub goodput_mbps: f64,
    /// Bytes the sender's interface sent per file byte.
    pub sender_bytes_per_byte: f64,
    /// Bytes all receivers' interfaces sent per file byte.
    pub feedback_per_byte: f64,
    /// Time from starting the sender to its exit, seconds.
    pub slowest_s: f64,
    /// Sender CPU seconds.
    pub cpu_sender_s: f64,
    /// Receivers' CPU seconds, summed.
    pub cpu_receivers_s: f64,
}

/// Why a peer's row is a failure rather than a figure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PeerFailure {
    /// The sender had not exited within the plan's timeout (everything was killed).
    #[error("not done within {0:?}")]
    TimedOut(Duration),
    /// The sender exited unsuccessfully.
    #[error("{tool} exited with {status} (see {})", log.display())]
    SenderFailed {
        /// The sender binary.
        tool: &'static str,
        /// Its exit status.
        status: ExitStatus,
        /// Its log.
        log: PathBuf,
    },
    /// A receiver's copy is missing.
    #[error("receiver {receiver} has no copy ({why})")]
    NoCopy {
        /// Receiver (lab host index).
        receiver: usize,
        /// The error reading it.
        why: String,
    },
    /// A receiver's copy is not byte-identical to the source.
    #[error("receiver {receiver}'s copy differs from the source (SHA-256)")]
    Differs {
        /// Receiver (lab host index).
        receiver: usize,
    },
    /// A failure as an earlier report recorded it (`--from-json`).
    #[error("{0}")]
    Recorded(String),
}

/// One peer's run in one (mtu, receivers, loss) cell.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRow {
    /// The tool.
    pub peer: Peer,
    /// Lab MTU.
    pub mtu: u32,
    /// Receivers.
    pub receivers: usize,
    /// Loss per receiver, percent.
    pub loss: f64,
    /// The same raw UDP ceiling as fleetcast's row, Mbit/s.
    pub ceiling_mbps: f64,
    /// The figures, or why there are none.
    pub outcome: Result<PeerFigures, PeerFailure>,
}

impl PeerRow {
    /// Goodput as a share of the ceiling (`None` for a failed row).
    pub fn fraction(&self) -> Option<f64> {
        let f = self.outcome.as_ref().ok()?;
        Some(if self.ceiling_mbps > 0.0 {
            f.goodput_mbps / self.ceiling_mbps
        } else {
            0.0
        })
    }

    /// The log line of the row.
    pub(crate) fn describe(&self) -> String {
        let head = format!(
            "mtu {}, {} receivers, {}% loss, {}",
            self.mtu,
            self.receivers,
            self.loss,
            self.peer.name()
        );
        match &self.outcome {
            Ok(f) => format!(
                "{head}: {:.0} Mbit/s = {:.2} of the ceiling, sender {:.3} B/B on the wire, \
                 feedback {:.5} B/B, slowest {:.1} s, cpu {:.1}+{:.1} s, every copy verified",
                f.goodput_mbps,
                self.fraction().unwrap_or(0.0),
                f.sender_bytes_per_byte,
                f.feedback_per_byte,
                f.slowest_s,
                f.cpu_sender_s,
                f.cpu_receivers_s
            ),
            Err(e) => format!("{head}: FAILED: {e}"),
        }
    }

    /// The row as JSON: a failed row carries `failed` and no figures.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "tool": self.peer.name(),
            "mtu": self.mtu,
            "receivers": self.receivers,
            "loss_percent": self.loss,
            "ceiling_mbps": round(self.ceiling_mbps, 1),
        });
        match &self.outcome {
            Ok(f) => {
                let figures = json!({
                    "verified": true,
                    "goodput_mbps": round(f.goodput_mbps, 1),
                    "fraction_of_ceiling": round(self.fraction().unwrap_or(0.0), 3),
                    "sender_bytes_per_file_byte": round(f.sender_bytes_per_byte, 4),
                    "feedback_bytes_per_file_byte": round(f.feedback_per_byte, 6),
                    "slowest_completion_s": round(f.slowest_s, 2),
                    "cpu_sender_s": round(f.cpu_sender_s, 2),
                    "cpu_receivers_s": round(f.cpu_receivers_s, 2),
                });
                if let (Some(o), Some(fig)) = (v.as_object_mut(), figures.as_object()) {
                    o.extend(fig.clone());
                }
            }
            Err(e) => {
                v["verified"] = json!(false);
                v["failed"] = json!(e.to_string());
            }
        }
        v
    }
}

/// Peer rows of a report's `report.json`; a report from before `--peers` has none.
pub fn peer_rows_from_json(v: &Value) -> Result<Vec<PeerRow>, BenchError> {
    let Some(rows) = v.get("peer_rows") else {
        return Ok(Vec::new());
    };
    let f = |r: &Value, k: &'static str| r[k].as_f64().ok_or(BenchError::RowField(k));
    let mut out = Vec::new();
    for r in rows
        .as_array()
        .ok_or(BenchError::ReportField("peer_rows"))?
    {
        let peer = r["tool"]
            .as_str()
            .and_then(Peer::from_name)
            .ok_or(BenchError::RowField("tool"))?;
        let outcome = match r["failed"].as_str() {
            Some(why) => Err(PeerFailure::Recorded(why.to_string())),
            None => Ok(PeerFigures {
                goodput_mbps: f(r, "goodput_mbps")?,
                sender_bytes_per_byte: f(r, "sender_bytes_per_file_byte")?,
                feedback_per_byte: f(r, "feedback_bytes_per_file_byte")?,
                slowest_s: f(r, "slowest_completion_s")?,
                cpu_sender_s: f(r, "cpu_sender_s")?,
                cpu_receivers_s: f(r, "cpu_receivers_s")?,
            }),
        };
        out.push(PeerRow {
            peer,
            mtu: f(r, "mtu")? as u32,
            receivers: f(r, "receivers")? as usize,
            loss: f(r, "loss_percent")?,
            ceiling_mbps: f(r, "ceiling_mbps")?,
            outcome,
        });
    }
    Ok(out)
}

/// One (mtu, receivers, loss) cell of the plan, as a peer sees it: hosts 1..=receivers
/// receive from host 0.
pub(crate) struct Cell<'a> {
    pub lab: &'a Lab,
    pub mtu: u32,
    pub receivers: usize,
    pub loss: f64,
    pub ceiling_mbps: f64,
    /// The pushed file and its SHA-256.
    pub src: &'a Path,
    pub src_sha: [u8; 32],
    pub timeout: Duration,
    /// Scratch directory of this run (removed and made again).
    pub dir: PathBuf,
    pub clock: &'a Clock,
}

/// A peer process in a lab host, watched until it exits: its CPU seconds are read from
/// `/proc/PID/stat` while it is alive or a zombie (reaping it would lose them).
struct Watched<'lab> {
    child: LabChild<'lab>,
    cpu_s: f64,
    exit: Option<ExitStatus>,
}

impl<'lab> Watched<'lab> {
    fn new(child: LabChild<'lab>) -> Self {
        Watched {
            child,
            cpu_s: 0.0,
            exit: None,
        }
    }

    /// Samples its CPU; reaps it if it has exited. True once it has.
    fn poll(&mut self) -> Result<bool, BenchError> {
        if self.exit.is_some() {
            return Ok(true);
        }
        let cpu = cpu_seconds(self.child.id());
        // 0 means /proc had nothing to say (a race with the exit): keep the last sample.
        if cpu > 0.0 {
            self.cpu_s = cpu;
        }
        // Reaped only once dead (`Z`, `X`), or if /proc no longer knows it (then nothing is
        // lost by reaping, and waiting for a state that never comes would hang to the timeout).
        if matches!(proc_state(self.child.id()), Some('Z' | 'X') | None) {
            self.exit = self.child.try_wait().map_err(BenchError::Host)?;
        }
        Ok(self.exit.is_some())
    }

    /// Samples its CPU a last time, then kills and reaps it.
    fn stop(&mut self) -> Result<(), BenchError> {
        self.poll()?;
        if self.exit.is_none() {
            self.child.kill().map_err(BenchError::Host)?;
        }
        Ok(())
    }
}

/// The nftables script of a peer's loss rule: `percent`% (0.01% resolution) of the UDP
/// datagrams a receiver gets for `group` are dropped, picked by the kernel's `numgen random`.
/// It is fleetcast's rule (`Host::loss_in` on its multicast port) applied to the peer's
/// multicast stream: a first try dropped on udpcast's ports instead, which also hit its unicast
/// connect replies, a loss fleetcast's TCP control never sees, and left a receiver out. The
/// table is the lab's own (`lab_loss`), so `Host::clear_loss` removes it.
fn loss_script(group: Ipv4Addr, percent: f64) -> String {
    let threshold = (percent.clamp(0.0, 100.0) * 100.0).round() as u32;
    format!(
        "table inet lab_loss\ndelete table inet lab_loss\ntable inet lab_loss {{\n  chain input {{\n    \
         type filter hook input priority -10; policy accept;\n    \
         ip daddr {group} meta l4proto udp numgen random mod 10000 < {threshold} counter drop\n  }}\n}}\n"
    )
}

/// The state letter of `/proc/PID/stat` (`R`, `S`, `Z`…), `None` if it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Runs `peer` once in `cell`; `bins` are its (sender, receiver) binaries. Setting up (files,
/// loss rules, starting processes, reading counters) failing is an error; the tool failing
/// is a failed row.
pub(crate) fn run_peer(
    peer: Peer,
    bins: &[PathBuf; 2],
    cell: &Cell,
) -> Result<PeerRow, BenchError> {
    let n = cell.receivers;
    let _ = std::fs::remove_dir_all(&cell.dir);
    for i in 1..=n {
        let d = cell.dir.join(format!("r{i}"));
        std::fs::create_dir_all(&d).map_err(at(&d))?;
        let h = cell.lab.host(i);
        h.clear_loss().map_err(BenchError::Loss)?;
        if cell.loss > 0.0 {
            h.nft(&loss_script(peer.data_group(), cell.loss))
                .map_err(BenchError::Loss)?;
        }
    }
    let size = std::fs::metadata(cell.src).map_err(at(cell.src))?.len();
    let ifs = |i: usize| cell.lab.host(i).counters().map_err(BenchError::Host);
    let feedback =
        || -> Result<u64, BenchError> { (1..=n).map(|i| ifs(i).map(|c| c.tx_bytes)).sum() };
    // Counted from before the receivers start: their joins and hellos are feedback too.
    let (tx0, fb0) = (ifs(0)?.tx_bytes, feedback()?);
    let sender_log = cell.dir.join("sender.log");
    // Whichever side listens first starts first, and is given time to open its sockets and
    // join its groups: udpcast's receivers send their connect request to a group the sender
    // must already have joined; UFTP's daemons must be listening for the sender's
    // announcement. The time runs from starting the other side.
    let mut sender = None;
    if peer == Peer::Udpcast {
        sender = Some(Watched::new(spawn_sender(
            peer,
            &bins[0],
            cell,
            &sender_log,
        )?));
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut t0 = cell.clock.read().0;
    let mut receivers = Vec::new();
    for i in 1..=n {
        let child = spawn_receiver(peer, &bins[1], cell, i)?;
        receivers.push(Watched::new(child));
    }
    let mut sender = match sender {
        Some(s) => s,
        None => {
            std::thread::sleep(Duration::from_millis(300));
            t0 = cell.clock.read().0;
            Watched::new(spawn_sender(peer, &bins[0], cell, &sender_log)?)
        }
    };
    let deadline = t0 + cell.timeout;
    let mut done_at = None;
    while done_at.is_none() {
        for r in &mut receivers {
            r.poll()?;
        }
        if sender.poll()? {
            done_at = Some(cell.clock.read().0);
        } else if cell.clock.read().0 > deadline {
            break;
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let outcome = match done_at {
        None => Err(PeerFailure::TimedOut(cell.timeout)),
        Some(t) => {
            wind_down(peer, &mut receivers, cell.clock)?;
            sender_outcome(peer, &sender, &sender_log).map(|()| (t - t0).as_secs_f64())
        }
    };
    sender.stop()?;
    for r in &mut receivers {
        r.stop()?;
    }
    let (tx1, fb1) = (ifs(0)?.tx_bytes, feedback()?);
    let outcome = outcome.and_then(|secs| {
        verify_copies(cell)?;
        Ok(PeerFigures {
            goodput_mbps: size as f64 * 8.0 / secs / 1e6,
            sender_bytes_per_byte: (tx1 - tx0) as f64 / size as f64,
            feedback_per_byte: (fb1 - fb0) as f64 / size as f64,
            slowest_s: secs,
            cpu_sender_s: sender.cpu_s,
            cpu_receivers_s: receivers.iter().map(|r| r.cpu_s).sum(),
        })
    });
    Ok(PeerRow {
        peer,
        mtu: cell.mtu,
        receivers: n,
        loss: cell.loss,
        ceiling_mbps: cell.ceiling_mbps,
        outcome,
    })
}

/// After the sender exited: udpcast's receivers exit on their own (give them a bounded
/// while); UFTP's daemons never do, and are stopped by the caller.
fn wind_down(peer: Peer, receivers: &mut [Watched], clock: &Clock) -> Result<(), BenchError> {
    if peer != Peer::Udpcast {
        return Ok(());
    }
    let until = clock.read().0 + WIND_DOWN;
    loop {
        let mut all = true;
        for r in receivers.iter_mut() {
            all &= r.poll()?;
        }
        if all || clock.read().0 > until {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sender_outcome(peer: Peer, sender: &Watched, log: &Path) -> Result<(), PeerFailure> {
    match sender.exit {
        Some(s) if !s.success() => Err(PeerFailure::SenderFailed {
            tool: peer.binaries()[0],
            status: s,
            log: log.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

/// Receiver `i`'s copy of the file.
fn copy_path(cell: &Cell, i: usize) -> PathBuf {
    let name = cell.src.file_name().unwrap_or_default();
    cell.dir.join(format!("r{i}")).join(name)
}

fn verify_copies(cell: &Cell) -> Result<(), PeerFailure> {
    for i in 1..=cell.receivers {
        let sha = sha256_file(&copy_path(cell, i)).map_err(|e| PeerFailure::NoCopy {
            receiver: i,
            why: e.to_string(),
        })?;
        if sha != cell.src_sha {
            return Err(PeerFailure::Differs { receiver: i });
        }
    }
    Ok(())
}

/// The rate ceiling every tool gets: the raw UDP ceiling of the cell (at least 10 Mbit/s,
/// as fleetcast's push uses), in kbit/s.
fn rate_kbps(cell: &Cell) -> u64 {
    (cell.ceiling_mbps.max(10.0) * 1000.0) as u64
}

/// udp-sender's `--max-bitrate` for `kbps`, capped where its counter ends.
fn udpcast_bitrate(kbps: u64) -> String {
    format!("{}k", kbps.min(UDPCAST_MAX_KBPS))
}

fn spawn_receiver<'lab>(
    peer: Peer,
    bin: &Path,
    cell: &Cell<'lab>,
    i: usize,
) -> Result<LabChild<'lab>, BenchError> {
    let h = cell.lab.host(i);
    let dir = cell.dir.join(format!("r{i}"));
    let log_path = dir.with_extension("log");
    let log = std::fs::File::create(&log_path).map_err(at(&log_path))?;
    let timeout = cell.timeout.as_secs().max(1).to_string();
    let out = copy_path(cell, i);
    h.spawn(bin, |c| {
        match peer {
            Peer::Udpcast => {
                c.args(["--interface", h.iface(), "--file"])
                    .arg(&out)
                    .args(["--portbase", &UDPCAST_PORTBASE.to_string()])
                    .args(["--mcast-rdv-address", &UDPCAST_RDV_GROUP.to_string()])
                    .args(["--ttl", "1", "--nokbd", "--no-progress"])
                    .args(["--start-timeout", &timeout]);
            }
            Peer::Uftp => {
                // -d: foreground, log to stderr (the log file); -q: no DNS look-up of the
                // sender (the lab has no resolver); a fixed UID the sender's -H names.
                c.args(["-d", "-q", "-I", h.iface(), "-D"])
                    .arg(&dir)
                    .args(["-p", &UFTP_PORT.to_string()])
                    .args(["-M", &UFTP_PUBLIC_GROUP.to_string()])
                    .args(["-U", &uftp_uid(i)]);
            }
        }
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    })
    .map_err(|source| BenchError::Spawn {
        what: format!("{} on receiver {i}", peer.binaries()[1]),
        source,
    })
}

fn uftp_uid(i: usize) -> String {
    format!("0x{:08x}", i)
}

fn spawn_sender<'lab>(
    peer: Peer,
    bin: &Path,
    cell: &Cell<'lab>,
    log_path: &Path,
) -> Result<LabChild<'lab>, BenchError> {
    let h = cell.lab.host(0);
    let log = std::fs::File::create(log_path).map_err(at(log_path))?;
    let n = cell.receivers;
    let rate = rate_kbps(cell);
    h.spawn(bin, |c| {
        match peer {
            Peer::Udpcast => {
                // --max-bitrate counts headers and retransmissions, as fleetcast's rate does.
                c.args(["--interface", h.iface(), "--file"])
                    .arg(cell.src)
                    .args(["--portbase", &UDPCAST_PORTBASE.to_string()])
                    .args(["--mcast-data-address", &UDPCAST_DATA_GROUP.to_string()])
                    .args(["--mcast-rdv-address", &UDPCAST_RDV_GROUP.to_string()])
                    .args(["--ttl", "1", "--nokbd", "--no-progress"])
                    .args(["--min-receivers", &n.to_string()])
                    // A receiver sends its connect request once at start and again only on a
                    // hello: without hellos repeated, one lost request (seen in the lab)
                    // leaves it out for good. The repeat is also how often udp-sender checks
                    // --min-receivers (2 s otherwise).
                    .args(["--rexmit-hello-interval", "100"])
                    .args(["--max-bitrate", &udpcast_bitrate(rate)])
                    // Its default, 1456, is its own fit for a 1500-byte frame: keep the same
                    // 44 bytes of headroom at every MTU.
                    .args(["--blocksize", &cell.mtu.saturating_sub(44).to_string()])
                    .args([
                        "--start-timeout",
                        &cell.timeout.as_secs().max(1).to_string(),
                    ])
                    // udp-sender still selects on stdin as its console: /dev/null is always
                    // readable, which keeps it from ever starting on --min-receivers. A pipe
                    // held open (and never written) is never readable.
                    .stdin(Stdio::piped());
            }
            Peer::Uftp => {
                let hosts: Vec<String> = (1..=n).map(uftp_uid).collect();
                // UFTP's advice: a block 100–200 bytes below the path MTU.
                let block = cell.mtu.saturating_sub(200).max(512);
                c.args(["-I", h.iface(), "-p", &UFTP_PORT.to_string()])
                    .args(["-M", &UFTP_PUBLIC_GROUP.to_string()])
                    .args(["-P", &UFTP_PRIVATE_GROUP.to_string()])
                    .args(["-t", "1", "-Y", "none", "-C", "none"])
                    .args(["-R", &rate.to_string(), "-b", &block.to_string()])
                    .args(["-H", &hosts.join(",")])
                    // No -L: it logs to stderr, which is `log_path`.
                    .arg(cell.src)
                    .stdin(Stdio::null());
            }
        }
        c.stdout(Stdio::null()).stderr(log);
    })
    .map_err(|source| BenchError::Spawn {
        what: format!("{} on the sender", peer.binaries()[0]),
        source,
    })
}

/// The Markdown table of every cell: fleetcast's row, then each peer's, with the ceiling.
pub(crate) fn side_by_side(rows: &[super::Row], peers: &[PeerRow]) -> String {
    let mut s = String::from(
        "| tool | MTU | receivers | loss % | ceiling Mbit/s | goodput Mbit/s | of ceiling | sender wire B/B | feedback B/B | slowest s | CPU sender s | CPU receivers s | copies |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| fleetcast | {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.3} | {:.5} | {:.1} | {:.1} | {:.1} | verified |\n",
            r.mtu,
            r.receivers,
            r.loss,
            // As `report.json` keeps them, so a report drawn again from it reads the same
            // (a ceiling of 3203.45 printed raw is 3203, kept as 3203.5 it is 3204).
            round(r.ceiling_mbps, 1),
            round(r.goodput_mbps, 1),
            r.fraction(),
            r.sender_bytes_per_byte,
            r.feedback_per_byte,
            r.slowest_s,
            r.cpu_sender_s,
            r.cpu_receivers_s
        ));
        let same = |p: &&PeerRow| p.mtu == r.mtu && p.receivers == r.receivers && p.loss == r.loss;
        for p in peers.iter().filter(same) {
            let lead = format!(
                "| {} | {} | {} | {} | {:.0} |",
                p.peer.name(),
                p.mtu,
                p.receivers,
                p.loss,
                round(p.ceiling_mbps, 1)
            );
            s.push_str(&match &p.outcome {
                Ok(f) => format!(
                    "{lead} {:.0} | {:.2} | {:.3} | {:.5} | {:.1} | {:.1} | {:.1} | verified |\n",
                    round(f.goodput_mbps, 1),
                    p.fraction().unwrap_or(0.0),
                    f.sender_bytes_per_byte,
                    f.feedback_per_byte,
                    f.slowest_s,
                    f.cpu_sender_s,
                    f.cpu_receivers_s
                ),
                Err(e) => format!(
                    "{lead} — | — | — | — | — | — | — | **failed**: {} |\n",
                    e.to_string().replace('|', "/")
                ),
            });
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Row;

    fn row(loss: f64) -> Row {
        Row {
            mtu: 1500,
            receivers: 2,
            loss,
            ceiling_mbps: 400.0,
            goodput_mbps: 200.0,
            sender_bytes_per_byte: 1.05,
            datagram_bytes_per_byte: 1.01,
            feedback_per_byte: 0.0002,
            slowest_s: 2.0,
            first_pass_s: 1.5,
            cpu_sender_s: 1.0,
            cpu_receivers_s: 2.0,
        }
    }

    fn peer_row(peer: Peer, loss: f64, outcome: Result<PeerFigures, PeerFailure>) -> PeerRow {
        PeerRow {
            peer,
            mtu: 1500,
            receivers: 2,
            loss,
            ceiling_mbps: 400.0,
            outcome,
        }
    }

    fn figures(goodput: f64) -> PeerFigures {
        PeerFigures {
            goodput_mbps: goodput,
            sender_bytes_per_byte: 1.3,
            feedback_per_byte: 0.004,
            slowest_s: 2.1,
            cpu_sender_s: 0.5,
            cpu_receivers_s: 0.25,
        }
    }

    #[test]
    fn peers_parse_by_name_and_an_unknown_one_names_the_flag() {
        assert_eq!(parse_peers(""), Ok(vec![]));
        assert_eq!(
            parse_peers("uftp, udpcast,uftp"),
            Ok(vec![Peer::Uftp, Peer::Udpcast])
        );
        let e = parse_peers("udpcast,rsync").unwrap_err().to_string();
        assert_eq!(
            e,
            "--peers udpcast,rsync: `rsync` is not a peer this bench runs (udpcast, uftp)"
        );
    }

    #[test]
    fn a_missing_binary_names_its_debian_package() {
        let found = find_binaries_with(&[Peer::Udpcast, Peer::Uftp], |tool, _| {
            Some(PathBuf::from("/usr/bin").join(tool))
        })
        .unwrap();
        assert_eq!(found[1].1[1], PathBuf::from("/usr/bin/uftpd"));
        let e = find_binaries_with(&[Peer::Udpcast, Peer::Uftp], |tool, _| {
            (tool != "uftpd").then(|| PathBuf::from(tool))
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--peers needs `uftpd`: install the Debian package `uftp`"
        );
        let e = find_binaries_with(&[Peer::Udpcast], |_, _| None).unwrap_err();
        assert!(e.to_string().contains("package `udpcast`"), "{e}");
    }

    #[test]
    fn a_failed_row_is_reported_as_failed_not_as_a_figure() {
        let peers = [
            peer_row(Peer::Udpcast, 0.0, Ok(figures(100.0))),
            peer_row(Peer::Uftp, 0.0, Err(PeerFailure::Differs { receiver: 2 })),
            peer_row(
                Peer::Uftp,
                5.0,
                Err(PeerFailure::TimedOut(Duration::from_secs(60))),
            ),
        ];
        let md = side_by_side(&[row(0.0), row(5.0)], &peers);
        let lines: Vec<&str> = md.lines().skip(2).collect();
        assert_eq!(lines.len(), 5, "{md}");
        assert!(
            lines[0].starts_with("| fleetcast | 1500 | 2 | 0 | 400 | 200 | 0.50 |"),
            "{md}"
        );
        assert!(
            lines[1].starts_with("| udpcast | 1500 | 2 | 0 | 400 | 100 | 0.25 |"),
            "{md}"
        );
        assert!(
            lines[2].starts_with("| uftp | 1500 | 2 | 0 | 400 | — |"),
            "{md}"
        );
        assert!(
            lines[2].ends_with("**failed**: receiver 2's copy differs from the source (SHA-256) |"),
            "{md}"
        );
        assert!(lines[3].starts_with("| fleetcast | 1500 | 2 | 5 |"), "{md}");
        assert!(lines[4].contains("**failed**: not done within 60s"), "{md}");

        let json = peers[1].to_json();
        assert_eq!(json["verified"], false);
        assert!(json.get("goodput_mbps").is_none(), "{json}");
        assert_eq!(peers[0].to_json()["fraction_of_ceiling"], 0.25);

        // Failed rows draw no point.
        let m = crate::bench::Measured {
            rows: vec![row(0.0)],
            peers: peers.to_vec(),
        };
        let plots = crate::bench::plots(&m);
        assert_eq!(
            plots.goodput.matches("<circle").count(),
            2,
            "{}",
            plots.goodput
        );
        assert!(plots.wire.contains("udpcast, 0% loss, MTU 1500"));
        // The peer's line is dashed, in the colour of fleetcast's line for the same cell.
        let stroke = |svg: &str, nth: usize| -> String {
            let line = svg
                .lines()
                .filter(|l| l.starts_with("<polyline"))
                .nth(nth)
                .unwrap();
            line.split("stroke=\"").nth(1).unwrap()[..7].to_string()
        };
        assert_eq!(
            stroke(&plots.wire, 0),
            stroke(&plots.wire, 1),
            "{}",
            plots.wire
        );
        assert_eq!(plots.wire.matches("stroke-dasharray=\"6 3\"").count(), 1);
        assert!(
            plots.goodput.contains(">fleetcast, 2 receivers, MTU 1500<"),
            "{}",
            plots.goodput
        );
        assert!(
            plots.time.contains(">fleetcast, 0% loss, MTU 1500<"),
            "{}",
            plots.time
        );
        assert!(!plots.wire.contains("uftp"));
    }

    #[test]
    fn peer_rows_read_back_and_an_older_report_has_none() {
        let peers = [
            peer_row(Peer::Udpcast, 0.0, Ok(figures(100.0))),
            peer_row(Peer::Uftp, 5.0, Err(PeerFailure::Differs { receiver: 1 })),
        ];
        let v = json!({
            "file_mib": 1,
            "rows": [row(0.0).to_json()],
            "peer_rows": peers.iter().map(PeerRow::to_json).collect::<Vec<_>>(),
        });
        let back = peer_rows_from_json(&v).unwrap();
        assert_eq!(back[0], peers[0]);
        assert_eq!(
            back[1].outcome,
            Err(PeerFailure::Recorded(
                "receiver 1's copy differs from the source (SHA-256)".into()
            ))
        );
        let older = json!({ "file_mib": 1, "rows": [row(0.0).to_json()] });
        assert_eq!(peer_rows_from_json(&older).unwrap(), vec![]);
        let (_, m) = crate::bench::measured_from_json(&older).unwrap();
        assert_eq!((m.rows.len(), m.peers.len()), (1, 0));
        let bad = json!({ "peer_rows": [{ "tool": "rsync" }] });
        assert!(matches!(
            peer_rows_from_json(&bad),
            Err(BenchError::RowField("tool"))
        ));
    }

    #[test]
    fn the_loss_rule_drops_a_share_of_the_data_group_only() {
        let s = loss_script(Peer::Uftp.data_group(), 5.0);
        assert!(
            s.starts_with("table inet lab_loss\ndelete table inet lab_loss\n"),
            "{s}"
        );
        assert!(
            s.contains(
                "ip daddr 239.77.11.2 meta l4proto udp numgen random mod 10000 < 500 counter drop"
            ),
            "{s}"
        );
        assert!(loss_script(Peer::Udpcast.data_group(), 0.25)
            .contains("239.77.10.1 meta l4proto udp numgen random mod 10000 < 25 "));
    }

    #[test]
    fn udpcast_gets_the_ceiling_up_to_what_its_counter_holds() {
        assert_eq!(udpcast_bitrate(994_000), "994000k");
        assert_eq!(udpcast_bitrate(2_147_483), "2147483k");
        // 7.1 Gbit/s wrapped to a negative rate in udp-sender.
        assert_eq!(udpcast_bitrate(7_133_000), "2147483k");
        assert!(2_147_483u64 * 1000 <= i32::MAX as u64);
    }

    #[test]
    fn a_zombie_is_seen_before_it_is_reaped() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // At most 10 s (2000 polls of 5 ms) for `true` to exit.
        for _ in 0..2000 {
            if proc_state(pid) == Some('Z') {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(proc_state(pid), Some('Z'));
        child.wait().unwrap();
        assert_eq!(proc_state(pid), None);
    }
}
