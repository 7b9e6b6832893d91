//! Multicast distribution, the gateway's side: the file mapping, the UDP socket, and one
//! [`McastSender`] core per live task (ARCHITECTURE.md "Multicast distribution").
//!
//! # Shape
//! - A push maps the file read-only ([`Mapped`]) and hashes it *before* the fleet creates the
//!   task ([`Distributor::prepare_push`]); the fleet's `TaskCreated` action binds the mapping
//!   to the new task ([`Distributor::task_created`]), whose [`Distribution`] owns the sender
//!   core with every target registered as a receiver (offline ones too: the sender stays
//!   alive until they report or [`McastConfig::linger`] passes without traffic).
//! - Announces go over each target's control session; a device that connects later is
//!   announced again on `Welcome` and catches up through the same sender: it NACKs what it
//!   misses, and with a single requester the sender answers with unicast `Repair`s to the
//!   address the NACK came from. A task whose sender has finished is re-created from the task
//!   table on demand (it then runs a new first pass).
//! - One UDP socket serves every task: bound to the gateway's unicast address (never a
//!   wildcard), multicast interface set to that address, TTL 1, loopback off. NACKs arrive on
//!   it; blocks leave it in `sendmmsg` batches whose payload iovec points into the mapping
//!   (zero copy: the kernel reads the file's pages).
//!
//! # Invariants
//! - The session id of task `t` is `t as u32`; NACKs and blocks name it.
//! - With authentication on (always, here), every block carries a 16-byte HMAC-SHA256 tag
//!   under the task's key, and a NACK without a valid tag is dropped.
//! - A block the kernel refused with `EAGAIN` is kept in the task's backlog and sent first on
//!   the next turn, so pacing never turns into silent loss at the sender.
//! - The task key is derived from a per-process secret and the task id, so every announce of
//!   one process names the same key; a restarted gateway announces a new one.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetcast_store::{self as store, DeviceId, TaskId};
use fleetcast_wire::data::data_mac_prefix;
use fleetcast_wire::mcast::{Dest, SendBlock, SenderConfig, SenderEvent, SenderStats};
use fleetcast_wire::{
    data_prefix, Announce, Frame, Instant, Kind, McastSender, Message, DATA_PREFIX_LEN, TAG_LEN,
};
use ring::hmac;

/// Datagrams per `sendmmsg` call.
const BATCH: usize = 64;
/// NACK datagrams read per loop turn (the rest wait for the next turn).
const NACK_BUDGET: usize = 256;

/// The multicast set-up of a gateway.
#[derive(Debug, Clone)]
pub struct McastConfig {
    /// The gateway's unicast address: the socket binds to it and multicasts from it.
    pub addr: Ipv4Addr,
    /// UDP port (source of blocks, destination of NACKs, port of the group).
    pub port: u16,
    /// Multicast group.
    pub group: Ipv4Addr,
    /// How long a sender with nothing to do waits for receivers that have not reported.
    pub linger: Duration,
    /// Delay between a push's announces and its first block, so the receivers have joined
    /// the group when the first pass starts (blocks sent earlier would all be repaired).
    pub warmup: Duration,
}

/// Why a push cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The file cannot be opened or mapped.
    #[error("cannot map {path}: {source}")]
    Map {
        /// The file.
        path: String,
        /// Cause.
        source: io::Error,
    },
    /// The sender core refused the geometry or rate.
    #[error("cannot distribute {path}: {why}")]
    Config {
        /// The file.
        path: String,
        /// What the core said.
        why: String,
    },
    /// The file changed size since the task was created.
    #[error("{path} is {now} bytes now, the task says {task}")]
    Changed {
        /// The file.
        path: String,
        /// Size now.
        now: u64,
        /// Size in the task table.
        task: u64,
    },
}

/// A file mapped read-only (an empty file maps nothing).
pub struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
    path: PathBuf,
    _file: File,
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapped")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish()
    }
}

impl Mapped {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> io::Result<Mapped> {
        let file = File::open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
        let ptr = if len == 0 {
            std::ptr::null_mut()
        } else {
            // SAFETY: a fresh read-only private mapping of an open file; the kernel picks the
            // address. The result is checked against MAP_FAILED before use.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE,
                    file.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            p
        };
        Ok(Mapped {
            ptr,
            len,
            path: path.to_path_buf(),
            _file: file,
        })
    }

    /// The file's bytes. A file truncated by someone else while mapped raises SIGBUS on
    /// access; the operator must not rewrite a file during its push (documented in the CLI).
    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is a live PROT_READ mapping of `len` bytes owned by `self` (unmapped
        // only in Drop), and the slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    /// The mapped path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping `open` created; no slice outlives `self`.
            unsafe {
                libc::munmap(self.ptr, self.len);
            }
        }
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The 16-byte tag of a data block, over what [`Frame::mac_input`] gives the receiver.
pub fn block_tag(
    key: &hmac::Key,
    kind: Kind,
    session: u32,
    block: u32,
    payload: &[u8],
) -> [u8; TAG_LEN] {
    let mp = data_mac_prefix(kind, session, block, payload.len());
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(&mp[..8]);
    ctx.update(&mp[12..]);
    ctx.update(payload);
    let sig = ctx.sign();
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&sig.as_ref()[..TAG_LEN]);
    tag
}

/// Whether `frame` carries a valid tag under `key`.
pub fn verify_tag(key: &hmac::Key, frame: &Frame<'_>) -> bool {
    let Some(tag) = frame.tag else { return false };
    let (h8, body) = frame.mac_input();
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(h8);
    ctx.update(body);
    let sig = ctx.sign();
    // Constant-time comparison of the truncated tag.
    sig.as_ref()[..TAG_LEN]
        .iter()
        .zip(tag.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// One task being distributed.
pub struct Distribution {
    task: TaskId,
    session: u32,
    map: Mapped,
    name: String,
    block_size: u32,
    sha256: [u8; 32],
    key_bytes: [u8; 32],
    key: hmac::Key,
    sender: McastSender,
    /// Where each device's NACKs came from: the destination of its unicast repairs.
    addrs: HashMap<u64, SocketAddrV4>,
    backlog: VecDeque<SendBlock>,
    /// Unicast repairs dropped because the device's address was unknown.
    no_addr: u64,
    /// The loop iteration that created this distribution (its clock reading).
    created: Instant,
    /// Nothing is sent before this instant (see [`McastConfig::warmup`]). Set on the first
    /// loop iteration after creation: the creating iteration's clock reading predates the
    /// file hash and the task commit, which would eat the warm-up before any announce left.
    start_at: Option<Instant>,
    /// Datagrams the kernel refused for now (sent again later).
    deferred: u64,
    /// Datagrams the kernel refused for good.
    send_errors: u64,
}

impl std::fmt::Debug for Distribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distribution")
            .field("task", &self.task)
            .field("map", &self.map)
            .finish_non_exhaustive()
    }
}

impl Distribution {
    /// A distribution of `map` as `task`, to `targets`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        task: TaskId,
        map: Mapped,
        block_size: u32,
        rate_bytes: u64,
        sha256: [u8; 32],
        key_bytes: [u8; 32],
        linger: Duration,
        targets: &[DeviceId],
        now: Instant,
    ) -> Result<Distribution, DistError> {
        let session = task.0 as u32;
        let mut cfg = SenderConfig::new(session, map.len as u64, block_size, rate_bytes);
        // The loop wakes at millisecond granularity (and a little later): the bucket holds
        // about 2 ms of the rate so one wake-up can send what a millisecond earned, between 8
        // and 256 datagrams.
        let datagram = DATA_PREFIX_LEN as u64 + u64::from(block_size) + TAG_LEN as u64;
        cfg.burst = (rate_bytes / 500 / datagram.max(1)).clamp(8, 256) as u32;
        // A receiver far behind (late joiner, heavy loss) is caught up here by unicast repair
        // rather than demoted: demotion would leave it to a catch-up path this driver does
        // not have (a demoted device would wait for the sender to finish and be re-created).
        // The NACK-rate demotion is off too: a loop stalled for a few rounds reads several
        // NACKs of one device at once and would demote it for our delay, not its behaviour.
        // Repairs stay bounded by the rate ceiling either way.
        cfg.demote_missing_percent = 100;
        cfg.max_nacks_per_round = u32::MAX;
        cfg.idle_timeout = linger;
        let mut sender = McastSender::new(cfg, now).map_err(|e| DistError::Config {
            path: map.path.display().to_string(),
            why: e.to_string(),
        })?;
        for t in targets {
            sender.add_receiver(t.0);
        }
        let name = map.path.file_name().map_or_else(
            || format!("task-{}", task.0),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok(Distribution {
            task,
            session,
            key: hmac::Key::new(hmac::HMAC_SHA256, &key_bytes),
            key_bytes,
            map,
            name,
            block_size,
            sha256,
            sender,
            addrs: HashMap::new(),
            backlog: VecDeque::new(),
            no_addr: 0,
            created: now,
            start_at: None,
            deferred: 0,
            send_errors: 0,
        })
    }

    /// The sender's counters.
    pub fn stats(&self) -> &SenderStats {
        self.sender.stats()
    }
}

/// Every live distribution of the gateway and their socket.
pub struct Distributor {
    cfg: McastConfig,
    sock: mio::net::UdpSocket,
    secret: [u8; 32],
    dists: HashMap<u32, Distribution>,
    /// Pushes mapped and hashed, waiting for the fleet to create their task.
    prepared: HashMap<u64, (Mapped, [u8; 32], u32, u64)>,
    buf: Vec<u8>,
    /// Counters of the distributions that have ended (for [`Distributor::totals`]).
    finished: McastTotals,
}

/// Multicast counters since the gateway started, over every distribution live or ended (the
/// metrics endpoint's source).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct McastTotals {
    /// Datagram bytes sent (multicast and unicast repair; a multicast counts once).
    pub bytes: u64,
    /// File bytes multicast in first passes (each byte of each file once): the goodput.
    pub goodput_bytes: u64,
    /// First-pass blocks.
    pub first_pass_blocks: u64,
    /// Blocks re-multicast as repairs.
    pub multicast_repairs: u64,
    /// Blocks unicast as repairs.
    pub unicast_repairs: u64,
    /// NACKs received (valid tag, live task).
    pub nacks: u64,
    /// NACKs ignored by the sender.
    pub nacks_ignored: u64,
    /// Receivers demoted.
    pub demoted: u64,
    /// Distributions that have ended.
    pub finished: u64,
    /// Distributions live now.
    pub live: u64,
}

impl McastTotals {
    fn add(&mut self, d: &Distribution) {
        let st = d.sender.stats();
        self.bytes += st.bytes;
        self.goodput_bytes +=
            (st.first_pass_blocks * u64::from(d.block_size)).min(d.map.len as u64);
        self.first_pass_blocks += st.first_pass_blocks;
        self.multicast_repairs += st.multicast_repairs;
        self.unicast_repairs += st.unicast_repairs;
        self.nacks += st.nacks;
        self.nacks_ignored += st.nacks_ignored;
        self.demoted += st.demoted;
    }
}

impl std::fmt::Debug for Distributor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distributor")
            .field("cfg", &self.cfg)
            .field("tasks", &self.dists.len())
            .finish_non_exhaustive()
    }
}

/// A sender event the loop reports (logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DistEvent {
    /// A distribution ended.
    Finished {
        /// The task.
        task: TaskId,
        /// Devices that verified.
        completed: usize,
        /// Devices that did not.
        unfinished: usize,
        /// The sender's counters.
        stats: SenderStats,
        /// Datagrams deferred by a full socket buffer or device queue (sent later).
        deferred: u64,
        /// Datagrams lost to send errors.
        send_errors: u64,
    },
}

impl Distributor {
    /// Opens the multicast socket as `cfg` says.
    pub fn open(cfg: McastConfig) -> io::Result<Distributor> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::V4(SocketAddrV4::new(cfg.addr, cfg.port)).into())?;
        // Explicit interface: never let the routing table pick where multicast goes.
        s.set_multicast_if_v4(&cfg.addr)?;
        s.set_multicast_ttl_v4(1)?;
        s.set_multicast_loop_v4(false)?;
        let _ = s.set_send_buffer_size(4 << 20);
        let _ = s.set_recv_buffer_size(1 << 20);
        s.set_nonblocking(true)?;
        let sock = mio::net::UdpSocket::from_std(s.into());
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| io::Error::other("no randomness for the task keys"))?;
        Ok(Distributor {
            cfg,
            sock,
            secret,
            dists: HashMap::new(),
            prepared: HashMap::new(),
            buf: vec![0u8; 65_536],
            finished: McastTotals::default(),
        })
    }

    /// The socket, for registration with the loop's poll.
    pub fn socket(&mut self) -> &mut mio::net::UdpSocket {
        &mut self.sock
    }

    /// The configuration.
    pub fn config(&self) -> &McastConfig {
        &self.cfg
    }

    fn key_for(&self, task: TaskId) -> [u8; 32] {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &self.secret);
        let tag = hmac::sign(&k, &task.0.to_be_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Maps and hashes a file for the push of admin connection `conn`; returns the task row.
    pub fn prepare_push(
        &mut self,
        conn: u64,
        path: &str,
        group: &str,
        block_size: u32,
        rate_mbps: u64,
        wall_ms: u64,
    ) -> Result<store::Task, DistError> {
        let map = Mapped::open(Path::new(path)).map_err(|source| DistError::Map {
            path: path.into(),
            source,
        })?;
        let rate = rate_mbps.saturating_mul(1_000_000) / 8;
        // Let the core check the geometry now, so a bad push fails before the task exists.
        McastSender::new(
            SenderConfig::new(0, map.len as u64, block_size, rate),
            Instant::ZERO,
        )
        .map_err(|e| DistError::Config {
            path: path.into(),
            why: e.to_string(),
        })?;
        let digest = sha256(map.bytes());
        let task = store::Task {
            path: path.into(),
            size: map.len as u64,
            block_size,
            sha256: digest,
            group: Some(group.into()),
            trigger: "publish by operator".into(),
            created_ms: wall_ms,
        };
        self.prepared.insert(conn, (map, digest, block_size, rate));
        Ok(task)
    }

    /// Forgets a prepared push whose task was not created.
    pub fn drop_prepared(&mut self, conn: u64) {
        self.prepared.remove(&conn);
    }

    /// The fleet created `task` for the push of `conn`: start its distribution.
    pub fn task_created(&mut self, conn: u64, task: TaskId, targets: &[DeviceId], now: Instant) {
        let Some((map, digest, bs, rate)) = self.prepared.remove(&conn) else {
            return;
        };
        let key = self.key_for(task);
        match Distribution::new(
            task,
            map,
            bs,
            rate,
            digest,
            key,
            self.cfg.linger,
            targets,
            now,
        ) {
            Ok(d) => {
                tracing::info!(
                    task = task.0,
                    blocks = d.sender.n_blocks(),
                    "distribution started"
                );
                self.dists.insert(d.session, d);
            }
            Err(e) => tracing::error!(task = task.0, error = %e, "distribution not started"),
        }
    }

    /// The announce of `task` for `device`, re-creating the task's sender from the task
    /// table when it is not live. Registers the device with the sender.
    pub fn announce_for(
        &mut self,
        task: TaskId,
        device: DeviceId,
        row: impl FnOnce() -> Option<(store::Task, Vec<DeviceId>)>,
        now: Instant,
    ) -> Result<AnnounceOwned, DistError> {
        let session = task.0 as u32;
        if !self.dists.contains_key(&session) {
            let Some((t, targets)) = row() else {
                return Err(DistError::Config {
                    path: String::new(),
                    why: format!("task {} is not in the task table", task.0),
                });
            };
            let map = Mapped::open(Path::new(&t.path)).map_err(|source| DistError::Map {
                path: t.path.clone(),
                source,
            })?;
            if map.len as u64 != t.size {
                return Err(DistError::Changed {
                    path: t.path.clone(),
                    now: map.len as u64,
                    task: t.size,
                });
            }
            // The digest is the table's: a file edited in place is caught by the receivers.
            let key = self.key_for(task);
            let rate = 25_000_000;
            let d = Distribution::new(
                task,
                map,
                t.block_size,
                rate,
                t.sha256,
                key,
                self.cfg.linger,
                &targets,
                now,
            )?;
            tracing::info!(task = task.0, "distribution re-created for catch-up");
            self.dists.insert(session, d);
        }
        let d = self.dists.get_mut(&session).expect("inserted above");
        d.sender.add_receiver(device.0);
        Ok(AnnounceOwned {
            task_id: task.0,
            session,
            group: self.cfg.group,
            port: self.cfg.port,
            size: d.map.len as u64,
            block_size: d.block_size,
            sha256: d.sha256,
            auth_key: d.key_bytes,
            name: d.name.clone(),
        })
    }

    /// The task table recorded a device's completion.
    pub fn transfer_done(&mut self, task: TaskId, device: DeviceId, verified: bool) {
        if let Some(d) = self.dists.get_mut(&(task.0 as u32)) {
            d.sender.receiver_done(device.0, verified);
        }
    }

    /// Reads NACK datagrams (at most a budget per call); returns whether more may be waiting.
    pub fn handle_readable(&mut self, now: Instant) -> bool {
        for _ in 0..NACK_BUDGET {
            let (n, from) = match self.sock.recv_from(&mut self.buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "mcast socket read failed");
                    return false;
                }
            };
            let SocketAddr::V4(from) = from else { continue };
            let Ok((Message::Nack(nack), frame)) = Message::parse_datagram(&self.buf[..n]) else {
                continue;
            };
            let Some(d) = self.dists.get_mut(&nack.session) else {
                continue;
            };
            if !verify_tag(&d.key, &frame) {
                tracing::debug!(%from, "NACK without a valid tag dropped");
                continue;
            }
            d.addrs.insert(nack.device_id, from);
            // Close a round that is due before this NACK counts in it.
            if d.sender.poll_timeout().is_some_and(|t| t <= now) {
                d.sender.handle_timeout(now);
            }
            d.sender.handle_nack(now, nack.device_id, &nack.missing);
        }
        true
    }

    /// Drives every sender: timers, sends, events. Call after any input and at
    /// [`Distributor::poll_timeout`].
    pub fn drive(&mut self, now: Instant) -> Vec<DistEvent> {
        let mut out = Vec::new();
        let group = SocketAddrV4::new(self.cfg.group, self.cfg.port);
        let fd = self.sock.as_raw_fd();
        let mut done = Vec::new();
        let warmup = self.cfg.warmup;
        for (session, d) in &mut self.dists {
            let start = match d.start_at {
                Some(t) => t,
                None if now > d.created => *d.start_at.insert(now + warmup),
                None => continue,
            };
            if now < start {
                continue;
            }
            if d.sender.poll_timeout().is_some_and(|t| t <= now) {
                d.sender.handle_timeout(now);
            }
            send_all(fd, d, now, group);
            while let Some(ev) = d.sender.poll_event() {
                match ev {
                    SenderEvent::Finished {
                        completed,
                        unfinished,
                    } => {
                        out.push(DistEvent::Finished {
                            task: d.task,
                            completed: completed.len(),
                            unfinished: unfinished.len(),
                            stats: *d.sender.stats(),
                            deferred: d.deferred,
                            send_errors: d.send_errors,
                        });
                        done.push(*session);
                    }
                    SenderEvent::Demoted(dev) => {
                        tracing::info!(
                            task = d.task.0,
                            device = dev,
                            "receiver demoted (too many NACKs)"
                        );
                    }
                    SenderEvent::FirstPassDone => {
                        let ms = (now - start).as_millis() as u64;
                        let mbit = (d.map.len as u64 * 8 / 1000).checked_div(ms).unwrap_or(0);
                        tracing::info!(task = d.task.0, ms, mbit_per_s = mbit, "first pass done");
                    }
                    SenderEvent::Completed(_) => {}
                }
            }
        }
        for s in done {
            if let Some(d) = self.dists.remove(&s) {
                self.finished.add(&d);
                self.finished.finished += 1;
                if d.no_addr > 0 {
                    tracing::warn!(
                        task = d.task.0,
                        dropped = d.no_addr,
                        "repairs without a known address"
                    );
                }
            }
        }
        out
    }

    /// When [`Distributor::drive`] must run next.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        self.dists
            .values()
            .filter_map(|d| {
                if d.start_at.is_none_or(|t| now < t) {
                    // Not started: the next iteration arms the warm-up.
                    Some(d.start_at.unwrap_or(now))
                } else if d.backlog.is_empty() {
                    d.sender.poll_timeout()
                } else {
                    Some(now + Duration::from_millis(1))
                }
            })
            .min()
    }

    /// Live distributions.
    pub fn live(&self) -> usize {
        self.dists.len()
    }

    /// Counters since the gateway started, over ended and live distributions.
    pub fn totals(&self) -> McastTotals {
        let mut t = self.finished;
        for d in self.dists.values() {
            t.add(d);
        }
        t.live = self.dists.len() as u64;
        t
    }
}

/// An [`Announce`] with owned parts, built outside the session borrow.
#[derive(Debug, Clone)]
pub struct AnnounceOwned {
    /// Task.
    pub task_id: u64,
    /// Session.
    pub session: u32,
    /// Group.
    pub group: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// Size.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
    /// Digest.
    pub sha256: [u8; 32],
    /// Tag key.
    pub auth_key: [u8; 32],
    /// File name.
    pub name: String,
}

impl AnnounceOwned {
    /// The wire message.
    pub fn as_wire(&self) -> Announce<'_> {
        Announce {
            task_id: self.task_id,
            session: self.session,
            group: self.group.into(),
            port: self.port,
            size: self.size,
            block_size: self.block_size,
            sha256: self.sha256,
            auth_key: Some(self.auth_key),
            name: &self.name,
        }
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Sends the backlog, then what the sender core releases, in `sendmmsg` batches; blocks the
/// kernel refuses with `EAGAIN` go back to the backlog.
fn send_all(fd: i32, d: &mut Distribution, now: Instant, group: SocketAddrV4) {
    let bytes = d.map.bytes();
    let bs = d.block_size as usize;
    loop {
        let mut blocks: Vec<SendBlock> = Vec::with_capacity(BATCH);
        while blocks.len() < BATCH {
            match d.backlog.pop_front() {
                Some(b) => blocks.push(b),
                None => break,
            }
        }
        while blocks.len() < BATCH {
            match d.sender.poll_transmit(now) {
                Some(b) => blocks.push(b),
                None => break,
            }
        }
        if blocks.is_empty() {
            return;
        }
        let mut prefixes = [[0u8; DATA_PREFIX_LEN]; BATCH];
        let mut tags = [[0u8; TAG_LEN]; BATCH];
        let mut addrs: Vec<libc::sockaddr_in> = Vec::with_capacity(BATCH);
        let mut sendable: Vec<(SendBlock, &[u8])> = Vec::with_capacity(BATCH);
        for b in &blocks {
            let dest = match b.dest {
                Dest::Group => group,
                Dest::Unicast(dev) => match d.addrs.get(&dev) {
                    Some(a) => *a,
                    None => {
                        d.no_addr += 1;
                        continue;
                    }
                },
            };
            let start = b.block as usize * bs;
            let end = (start + bs).min(bytes.len());
            let payload = &bytes[start.min(end)..end];
            let i = sendable.len();
            tags[i] = block_tag(&d.key, b.kind, d.session, b.block, payload);
            let Ok(p) = data_prefix(b.kind, d.session, b.block, payload, Some(&tags[i])) else {
                continue;
            };
            prefixes[i] = p;
            addrs.push(sockaddr(dest));
            sendable.push((*b, payload));
        }
        let n = sendable.len();
        let mut iovs: Vec<[libc::iovec; 3]> = Vec::with_capacity(n);
        for (i, (_, payload)) in sendable.iter().enumerate() {
            iovs.push([
                libc::iovec {
                    iov_base: prefixes[i].as_mut_ptr().cast(),
                    iov_len: DATA_PREFIX_LEN,
                },
                libc::iovec {
                    // The kernel only reads through this pointer (sendmmsg), never writes.
                    iov_base: payload.as_ptr() as *mut libc::c_void,
                    iov_len: payload.len(),
                },
                libc::iovec {
                    iov_base: tags[i].as_mut_ptr().cast(),
                    iov_len: TAG_LEN,
                },
            ]);
        }
        // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
        let mut hdrs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, h) in hdrs.iter_mut().enumerate() {
            h.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = iovs[i].as_mut_ptr();
            h.msg_hdr.msg_iovlen = 3;
        }
        let mut sent = 0usize;
        while sent < n {
            // SAFETY: `hdrs[sent..n]` point at live buffers (prefixes, tags, addrs, iovs, and
            // the mapping borrowed by `payload`), all outliving the call.
            let r = unsafe {
                libc::sendmmsg(fd, hdrs[sent..].as_mut_ptr(), (n - sent) as libc::c_uint, 0)
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // A full socket buffer or device queue: keep the rest for the next turn.
                if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS)
                {
                    d.deferred += (n - sent) as u64;
                    for (b, _) in sendable[sent..].iter().rev() {
                        d.backlog.push_front(*b);
                    }
                    return;
                }
                // Anything else fails this datagram only: it is lost like network loss.
                tracing::debug!(error = %e, "sendmmsg failed");
                d.send_errors += 1;
                sent += 1;
                continue;
            }
            sent += r as usize;
        }
        if blocks.len() < BATCH {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_wire::DataBlock;

    #[test]
    fn mapped_file_blocks_carry_tags_the_receiver_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        let data: Vec<u8> = (0..2500u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let m = Mapped::open(&p).unwrap();
        assert_eq!(m.bytes(), &data[..]);
        assert_eq!(sha256(m.bytes()), sha256(&data));
        let key = hmac::Key::new(hmac::HMAC_SHA256, &[5; 32]);
        let payload = &m.bytes()[2000..];
        let tag = block_tag(&key, Kind::Data, 9, 2, payload);
        let prefix = data_prefix(Kind::Data, 9, 2, payload, Some(&tag)).unwrap();
        let mut dgram = prefix.to_vec();
        dgram.extend_from_slice(payload);
        dgram.extend_from_slice(&tag);
        let (_, b, f) = DataBlock::parse(&dgram).unwrap();
        assert_eq!((b.session, b.block, b.payload), (9, 2, payload));
        assert!(verify_tag(&key, &f));
        let other = hmac::Key::new(hmac::HMAC_SHA256, &[6; 32]);
        assert!(!verify_tag(&other, &f));
        // An empty file maps nothing and reads as empty.
        let e = dir.path().join("empty");
        std::fs::write(&e, b"").unwrap();
        assert!(Mapped::open(&e).unwrap().bytes().is_empty());
    }
}
