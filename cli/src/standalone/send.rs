//! `fleetcast send`: the gateway's [`Distributor`] for one file, with the control session
//! replaced by the datagrams of [`fleetcast_wire::mcast::standalone`] (see the module above).

use std::borrow::Cow;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use fleetcast_daemon::distribution::{sha256_file, DistEvent, Distributor, McastConfig};
use fleetcast_store::{DeviceId, TaskId};
use fleetcast_wire::mcast::standalone::{Join, SendRules, SendVerdict};
use fleetcast_wire::mcast::Trigger;
use fleetcast_wire::{Announce, Instant, Message, TaskAnswer, TaskVerdict};

use super::{io_err, Keys, StandaloneError};

/// How long the sender keeps answering repeated `Completion`s after its task is over (an
/// answer may have been lost; the receiver repeats for 5 s, but its copy is verified anyway).
const ANSWER_LINGER: Duration = Duration::from_secs(1);
/// How long a sender with nothing to do waits for receivers that have not reported.
const LINGER: Duration = Duration::from_secs(30);

/// What `fleetcast send` was asked.
#[derive(Debug, Clone, clap::Args)]
pub struct SendOpts {
    /// The file.
    pub file: PathBuf,
    /// The interface to multicast out of (required: never where routing points).
    #[arg(long, value_name = "IF")]
    pub iface: Option<String>,
    /// Multicast group and port (default port 7301; announces go to port + 1).
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub group: String,
    /// Pre-shared key, 64 hex digits; without it a one-time key is printed, with the
    /// `fleetcast receive` line to paste.
    #[arg(long, value_name = "HEX")]
    pub key: Option<String>,
    /// Rate ceiling, megabits per second.
    #[arg(long = "rate", default_value_t = 200, value_name = "MBPS")]
    pub rate_mbps: u64,
    /// Payload bytes per datagram (default: fill the interface's MTU).
    #[arg(long)]
    pub block_size: Option<u32>,
    /// FEC group size in blocks (0: repair by retransmission only). Default: about 720 KiB
    /// of blocks (512 at MTU 1500, 82 at 9000).
    #[arg(long)]
    pub fec_group: Option<u32>,
    /// Receivers to wait for before the first pass.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub min_receivers: usize,
    /// Longest wait for them, seconds (then it starts with those that joined).
    #[arg(long, value_name = "S")]
    pub max_wait: Option<u64>,
}

/// The summary of a send.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SendSummary {
    /// File bytes.
    pub size: u64,
    /// Seconds from the first block to the last receiver's verified copy.
    pub seconds: f64,
    /// File bytes over that time, Mbit/s.
    pub goodput_mbit_s: f64,
    /// Receivers that joined.
    pub receivers: usize,
    /// Receivers that reported a verified copy.
    pub verified: usize,
    /// Datagram bytes sent per file byte.
    pub bytes_per_file_byte: f64,
    /// Blocks re-multicast.
    pub multicast_repairs: u64,
    /// Blocks unicast.
    pub unicast_repairs: u64,
    /// Parity symbols multicast.
    pub parity_symbols: u64,
    /// NACKs that counted.
    pub nacks: u64,
    /// Feedback bytes received (NACKs, joins, completions).
    pub feedback_bytes: u64,
    /// Datagrams dropped as forged (tag missing or invalid).
    pub forged: u64,
    /// Block size used.
    pub block_size: u32,
}

impl std::fmt::Display for SendSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} bytes to {} receivers ({} verified) in {:.2} s: goodput {:.1} Mbit/s, \
             {:.3} datagram bytes per file byte, repairs {} multicast {} unicast, {} parity \
             symbols, {} NACKs, {} feedback bytes, {} forged datagrams dropped, block size {}",
            self.size,
            self.receivers,
            self.verified,
            self.seconds,
            self.goodput_mbit_s,
            self.bytes_per_file_byte,
            self.multicast_repairs,
            self.unicast_repairs,
            self.parity_symbols,
            self.nacks,
            self.feedback_bytes,
            self.forged,
            self.block_size
        )
    }
}

/// How a send that ran ended: its summary, and why it did not verify, if it did not.
#[derive(Debug)]
pub struct SendOutcome {
    /// The summary.
    pub summary: SendSummary,
    /// `None`: every receiver that joined reported a verified copy.
    pub error: Option<StandaloneError>,
}

/// The sender's state between turns.
struct Sender {
    dist: Distributor,
    ctl: UdpSocket,
    keys: Keys,
    task: TaskId,
    /// The announce, and as a tagged datagram.
    announce: Announce<'static>,
    announce_bytes: Vec<u8>,
    announce_to: SocketAddr,
    rules: SendRules,
    size: u64,
    n_blocks: u64,
    block_size: u32,
    /// When the first pass started, and when the last receiver reported.
    started_at: Option<Instant>,
    over_at: Option<Instant>,
    /// Bytes of the joins and completions read.
    control_bytes: u64,
    buf: Vec<u8>,
}

/// Runs the send; `say` gets the one-time key's lines and the progress lines (stderr).
pub fn run(opts: &SendOpts, say: &mut dyn FnMut(&str)) -> Result<SendOutcome, StandaloneError> {
    let (_, addr) = super::iface_addr(opts.iface.as_deref())?;
    let (group, port) = super::parse_group(&opts.group)?;
    let psk = match &opts.key {
        Some(k) => super::parse_key(k)?,
        None => {
            let k: [u8; 32] = super::random()?;
            say(&format!("one-time key: {}", super::hex(&k)));
            say(&format!(
                "receive with: fleetcast receive --iface IF --group {group}:{port} --key {} --out PATH",
                super::hex(&k)
            ));
            k
        }
    };
    let keys = Keys::derive(&psk);
    let sha256 =
        sha256_file(&opts.file).map_err(io_err(format!("cannot read {}", opts.file.display())))?;
    let mut dist = Distributor::open(McastConfig {
        addr,
        port,
        group,
        linger: LINGER,
        warmup: Duration::from_millis(300),
        fec_group: opts.fec_group,
        broadcast: None,
    })
    .map_err(io_err(format!(
        "cannot open the multicast socket on {addr}:{port}"
    )))?;
    // Fills a frame of the interface (its MTU asked through the socket, so in this network
    // namespace), as a push does.
    let block_size = opts.block_size.unwrap_or_else(|| dist.default_block_size());
    let now = super::clock();
    // A random task id: a capture of an earlier send names another session.
    let task = TaskId(u64::from_be_bytes(super::random()?) | 1);
    let wait = opts
        .max_wait
        .map_or(Duration::from_secs(u64::MAX / 4), Duration::from_secs);
    let trigger = Trigger {
        delay: Duration::ZERO,
        quorum: Some((opts.min_receivers.max(1), wait)),
    };
    let rate = opts.rate_mbps.saturating_mul(1_000_000) / 8;
    dist.start_standalone(
        task,
        &opts.file,
        (block_size, rate, sha256),
        keys.explicit(),
        trigger,
        now(),
    )?;
    let ctl = control_socket(addr)?;
    let size = std::fs::metadata(&opts.file).map(|m| m.len()).unwrap_or(0);
    let name = opts
        .file
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let announce = Announce {
        task_id: task.0,
        session: task.0 as u32,
        group: group.into(),
        port,
        size,
        block_size,
        // Receivers that join the multicast NACK whole parity groups from the start; after
        // the first pass the announce says 0 (see `pass_done`).
        fec_group: opts
            .fec_group
            .unwrap_or_else(|| fleetcast_wire::mcast::fec_group_for(block_size)),
        sha256,
        // The Merkle root over the file's manifests, which the sender just computed: the
        // announce is tagged under the control key, so the root is the PSK's word.
        digests: dist.digests_of(task),
        nack_key: None,
        name: Cow::Owned(name),
        image: None,
    };
    let mut s = Sender {
        announce_bytes: super::tagged(&Message::Announce(announce.clone()), &keys.control),
        announce,
        announce_to: SocketAddr::V4(SocketAddrV4::new(group, port + 1)),
        dist,
        ctl,
        keys,
        task,
        rules: SendRules::new(now()),
        size,
        n_blocks: size.div_ceil(u64::from(block_size)),
        block_size,
        started_at: None,
        over_at: None,
        control_bytes: 0,
        buf: vec![0u8; 65_536],
    };
    s.run(&now, say)
}

/// The socket of the announces (multicast, out of the interface of `addr`) and of the joins
/// and completions (unicast, on an ephemeral port of `addr`).
fn control_socket(addr: std::net::Ipv4Addr) -> Result<UdpSocket, StandaloneError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = io_err(format!("cannot open the control socket on {addr}"));
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    let set = || -> std::io::Result<()> {
        s.bind(&SocketAddr::V4(SocketAddrV4::new(addr, 0)).into())?;
        s.set_multicast_if_v4(&addr)?;
        s.set_multicast_ttl_v4(1)?;
        s.set_multicast_loop_v4(false)?;
        s.set_nonblocking(true)
    };
    set().map_err(io_err(format!(
        "cannot set up the control socket on {addr}"
    )))?;
    Ok(s.into())
}

impl Sender {
    fn run(
        &mut self,
        now: &dyn Fn() -> Instant,
        say: &mut dyn FnMut(&str),
    ) -> Result<SendOutcome, StandaloneError> {
        use std::os::fd::AsRawFd;
        let mut next_progress = now() + Duration::from_secs(1);
        let mut sent_at_last = (now(), 0u64);
        loop {
            let t = now();
            let started = self.dist.task_stats(self.task, t).is_some_and(|s| s.2);
            if started && self.started_at.is_none() {
                self.started_at = Some(t);
                if self.rules.joined() == 0 {
                    return Err(StandaloneError::NoReceiver);
                }
            }
            if self.over_at.is_none() && self.rules.poll_announce(t, started) {
                super::send(&self.ctl, &self.announce_bytes, self.announce_to);
            }
            self.read_control(t);
            while self.dist.handle_readable(now()) {}
            for ev in self.dist.drive(now()) {
                match ev {
                    DistEvent::Finished { .. } => self.over_at = Some(now()),
                    DistEvent::PassDone { .. } => self.pass_done(),
                }
            }
            if let Some(over) = self.over_at {
                if now() >= over + ANSWER_LINGER {
                    return Ok(self.finish(over));
                }
            }
            let t = now();
            if t >= next_progress {
                let totals = self.dist.totals();
                let secs = t.saturating_duration_since(sent_at_last.0).as_secs_f64();
                say(&format!(
                    "send: blocks {}/{} first pass, {:.1} Mbit/s, receivers {} joined {} verified, repairs {} multicast {} unicast {} parity",
                    totals.first_pass_blocks,
                    self.n_blocks,
                    super::mbit(totals.bytes - sent_at_last.1, secs),
                    self.rules.joined(),
                    self.rules.verified(),
                    totals.multicast_repairs,
                    totals.unicast_repairs,
                    totals.parity_symbols,
                ));
                sent_at_last = (t, totals.bytes);
                next_progress = t + Duration::from_secs(1);
            }
            let mut due = next_progress.min(self.rules.poll_timeout());
            if let Some(d) = self.dist.poll_timeout(t) {
                due = due.min(d);
            }
            let wait = due
                .saturating_duration_since(t)
                .min(Duration::from_millis(50));
            if !wait.is_zero() {
                wait_readable(
                    &[self.dist.socket().as_raw_fd(), self.ctl.as_raw_fd()],
                    wait,
                );
            }
        }
    }

    /// The first pass is over: a receiver that joins from now on is caught up by unicast,
    /// block by block, with no parity (as the gateway's `announce_for` says it), so the
    /// announce no longer names a parity group.
    fn pass_done(&mut self) {
        self.announce.fec_group = 0;
        let msg = Message::Announce(self.announce.clone());
        self.announce_bytes = super::tagged(&msg, &self.keys.control);
    }

    /// Reads the joins and completions waiting on the control socket.
    fn read_control(&mut self, now: Instant) {
        loop {
            let (n, from) = match self.ctl.recv_from(&mut self.buf) {
                Ok(x) => x,
                Err(_) => return,
            };
            self.control_bytes += n as u64;
            let Ok((msg, frame)) = Message::parse_datagram(&self.buf[..n]) else {
                self.rules.foreign += 1;
                continue;
            };
            if !super::verified(&frame, &self.keys.control) {
                self.rules.forged += 1;
                continue;
            }
            match msg {
                Message::TaskAsk(ask) if ask.task_id == self.task.0 => {
                    if self.rules.handle_join(from, ask.device_id) == Join::New {
                        // The task's core takes it as announced over a session from `from`:
                        // its repairs go there, and it counts as ready.
                        let dev = DeviceId(ask.device_id);
                        let _ = self.dist.announce_for(
                            self.task,
                            dev,
                            Some(from.ip()),
                            || None,
                            (now, 0),
                        );
                        self.dist.receiver_ready(self.task.0, ask.device_id);
                    }
                }
                Message::Completion(c) if c.task_id == self.task.0 => {
                    let verified = c.outcome == fleetcast_wire::Outcome::Verified;
                    if let Some(dev) = self.rules.handle_completion(from, verified) {
                        self.dist.transfer_done(self.task, DeviceId(dev), verified);
                    }
                    if self.rules.is_joined(&from) {
                        let answer = Message::TaskAnswer(TaskAnswer {
                            task_id: self.task.0,
                            verdict: TaskVerdict::Completed,
                        });
                        super::send(&self.ctl, &super::tagged(&answer, &self.keys.control), from);
                    }
                }
                _ => self.rules.foreign += 1,
            }
        }
    }

    fn finish(&mut self, over: Instant) -> SendOutcome {
        let totals = self.dist.totals();
        let seconds = self
            .started_at
            .map_or(0.0, |s| over.saturating_duration_since(s).as_secs_f64());
        let summary = SendSummary {
            size: self.size,
            seconds,
            goodput_mbit_s: super::mbit(self.size, seconds),
            receivers: self.rules.joined(),
            verified: self.rules.verified(),
            bytes_per_file_byte: totals.bytes as f64 / self.size.max(1) as f64,
            multicast_repairs: totals.multicast_repairs,
            unicast_repairs: totals.unicast_repairs,
            parity_symbols: totals.parity_symbols,
            nacks: totals.nacks,
            feedback_bytes: self.dist.nack_bytes() + self.control_bytes,
            forged: self.rules.forged,
            block_size: self.block_size,
        };
        let error = match self.rules.verdict() {
            SendVerdict::Verified { .. } => None,
            SendVerdict::NoReceiver => Some(StandaloneError::NoReceiver),
            SendVerdict::Unverified { failed, silent } => {
                Some(StandaloneError::ReceiversUnverified {
                    failed,
                    silent,
                    joined: self.rules.joined(),
                })
            }
        };
        SendOutcome { summary, error }
    }
}

/// Waits up to `wait` for one of `fds` to be readable.
pub(crate) fn wait_readable(fds: &[i32], wait: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = wait.as_millis().clamp(1, 1000) as libc::c_int;
    // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs for the call.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
}
