//! Multicast distribution, the gateway's side: the file mapping, the UDP socket, the digest
//! thread, the tags, `sendmmsg` and the parity cache, driving one [`McastTask`] core per live
//! task (ARCHITECTURE.md "Multicast distribution"). The policy (trigger gate, demotion
//! hand-off, shared catch-up budget, linger, end of task) is the core's
//! (`fleetcast_wire::mcast::task`); each task has one entry in [`Distributor`]'s timer set, so
//! a loop turn visits only the tasks that are due or that an input touched.
//!
//! # Shape
//! - A push the fleet accepted (its `PreparePush` action) maps the file read-only
//!   ([`Mapped`]) and hashes it *before* the fleet creates the task
//!   ([`Distributor::prepare_push`]); the digest goes back to the fleet (`Input::Hashed`),
//!   keyed, like the mapping, by the push's [`Origin`]; the fleet's `TaskCreated` action
//!   binds the mapping to the new task ([`Distributor::task_created`]), whose [`Distribution`] owns the task
//!   core; its group sender has every target registered as a receiver (offline ones too: it
//!   stays alive until they report or [`McastConfig::linger`] passes without traffic).
//! - Announces go over each target's control session; a device that connects later is
//!   announced when its agent asks (`TaskAsk`, after `Welcome`); after the first pass it
//!   catches up through a catch-up sender of its own (the core's): it NACKs what it misses, and the sender answers with
//!   unicast `Repair`s to the
//!   device's repair address (the IP of the control session that carried its announce, or an
//!   address it proved; never merely where a NACK came from, see `nack.rs`). A task whose
//!   sender has finished is re-created from the task table on demand (it then catches its
//!   devices up by unicast).
//! - One UDP socket serves every task: bound to the gateway's unicast address (never a
//!   wildcard), multicast interface set to that address, TTL 1, loopback off (and, from the
//!   first push by broadcast, `SO_BROADCAST`: see `broadcast.rs`). NACKs arrive on
//!   it; blocks leave it in `sendmmsg` batches whose payload iovec points into the mapping
//!   (zero copy: the kernel reads the file's pages).
//!
//! # Invariants
//! - The session id of task `t` is `t as u32`; NACKs and blocks name it.
//! - Blocks, repairs and parity carry no tag: receivers check each block against its digest
//!   in a manifest the announce's Merkle root vouches for (`digests.rs`). A NACK counts only with a valid tag under the named device's own
//!   key (a new one with every announce to it) and a sequence above the device's last
//!   accepted one; the sender cores check both (`nack.rs`).
//! - A datagram the kernel refused with `EAGAIN` (block, symbol or manifest) is kept in the
//!   task's backlog and sent first on the next turn, so pacing never turns into silent loss
//!   at the sender.
//! - The task key is derived from a per-process secret and the task id, so every announce of
//!   one process names the same key; a restarted gateway announces a new one. Device NACK
//!   keys and the probe-cookie key are derived from the same secret, and never leave the
//!   gateway except each device's own key, in its own announce.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetcast_store::{self as store, DeviceId, TaskId};

mod broadcast;
mod digests;
mod gso;
mod image;
mod nack;

pub use broadcast::{
    directed_broadcast, resolve as resolve_broadcast, BroadcastError, BroadcastKeyError, Iface,
};
pub use digests::{BlockDigests, DigestsError, RingSha};
use gso::Gso;
pub use image::ImageError;
use nack::NackKeys;

use crate::admin::Delivery;
use crate::fleet::{Origin, PushSpec};
use fleetcast_wire::mcast::digest::{ManifestSchedule, DEFAULT_MANIFEST_REPEAT};
use fleetcast_wire::mcast::task::CATCH_UP_RATE;
use fleetcast_wire::mcast::{
    CatchUpBudget, ConfigError, Dest, Fec, McastTask, ReedSolomon, SendParity, SenderConfig,
    SenderStats, TaskConfig, TaskEvent, Transmit, Trigger,
};
use fleetcast_wire::{
    data_prefix, Announce, Frame, ImageTarget, Instant, McastSender, Parity, DATA_PREFIX_LEN,
    PARITY_PREFIX_LEN, TAG_LEN,
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
    /// FEC group size in blocks (parity repair); 0: repair by re-multicast and unicast only;
    /// `None`: groups of about 720 KiB for each push's block size
    /// ([`fleetcast_wire::mcast::fec_group_for`]).
    pub fec_group: Option<u32>,
    /// Pushes go by broadcast to this address unless they ask for multicast
    /// (`mcast.broadcast`; checked against the interface of `addr` at start); `None`:
    /// multicast unless a push asks for broadcast.
    pub broadcast: Option<Ipv4Addr>,
}

#[cfg(test)]
impl McastConfig {
    /// Multicast from 127.0.0.1 on an ephemeral port, no parity, a 1 s linger: for the
    /// daemon's unit tests, which send nothing or only to loopback.
    pub(crate) fn loopback() -> McastConfig {
        McastConfig {
            addr: Ipv4Addr::LOCALHOST,
            port: 0,
            group: Ipv4Addr::new(239, 77, 9, 9),
            linger: Duration::from_secs(1),
            warmup: Duration::ZERO,
            fec_group: Some(0),
            broadcast: None,
        }
    }
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
        /// The rule the core found broken.
        why: ConfigError,
    },
    /// An announce names a task the task table does not hold.
    #[error("cannot distribute: task {task} is not in the task table")]
    NoTask {
        /// The task id.
        task: u64,
    },
    /// A push by broadcast that the interface of `mcast.addr` cannot carry.
    #[error("cannot broadcast: {0}")]
    Broadcast(#[from] BroadcastError),
    /// The block digests (data authentication) could not be computed.
    #[error("cannot compute the block digests of {path}: {why}")]
    Digests {
        /// The file.
        path: String,
        /// Cause.
        why: DigestsError,
    },
    /// An image push's target or map cannot be used.
    #[error("cannot push {path} as an image: {why}")]
    Image {
        /// The pushed file.
        path: String,
        /// Why.
        why: ImageError,
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

/// SHA-256 of the file at `path`, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> io::Result<[u8; 32]> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
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
    /// Every block's digest and the Merkle tree over the manifests (data authentication).
    digests: std::sync::Arc<BlockDigests>,
    /// When each manifest goes out, ahead of and alongside its blocks.
    manifests: ManifestSchedule,
    /// The task's distribution policy: its group sender and catch-up senders, the trigger
    /// gate, the hand-off of demoted receivers, the linger and the end of the task.
    core: McastTask,
    /// The task's NACK keys (per device, per announce) and probe-cookie key.
    nack_keys: NackKeys,
    /// Datagrams the kernel refused with `EAGAIN`, in order, sent first next time.
    backlog: VecDeque<Queued>,
    /// Bytes of the manifest datagrams sent (the sender core counts only blocks and parity).
    manifest_bytes: u64,
    /// Parity of the groups being repaired by FEC.
    fec: FecCache,
    /// Unicast repairs dropped because the device's address was unknown.
    no_addr: u64,
    /// Datagrams the kernel refused for now (sent again later).
    deferred: u64,
    /// Datagrams the kernel refused for good.
    send_errors: u64,
    /// Where its group datagrams go: the multicast group or the subnet's broadcast.
    dest: Ipv4Addr,
    /// An image task's target and map, for its announces.
    image: Option<store::TaskImage>,
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
    /// A distribution of `map` as `task`, to `targets`, starting as `trigger` says.
    /// With `targets == None` no multicast runs: the task only catches devices up.
    #[allow(clippy::too_many_arguments)]
    fn new(
        task: TaskId,
        map: Mapped,
        (block_size, rate_bytes): (u32, u64),
        sha256: [u8; 32],
        digests: std::sync::Arc<BlockDigests>,
        nack_keys: NackKeys,
        mcast: &McastConfig,
        trigger: Trigger,
        targets: Option<&[DeviceId]>,
        now: Instant,
    ) -> Result<Distribution, DistError> {
        let session = task.0 as u32;
        let name = map.path.file_name().map_or_else(
            || format!("task-{}", task.0),
            |n| n.to_string_lossy().into_owned(),
        );
        let cfg = TaskConfig {
            session,
            file_size: map.len as u64,
            block_size,
            rate: rate_bytes,
            linger: mcast.linger,
            warmup: mcast.warmup,
            fec_group: mcast
                .fec_group
                .unwrap_or_else(|| fleetcast_wire::mcast::fec_group_for(block_size)),
            trigger,
            probe_key: nack_keys.probe_key(),
        };
        let core = match targets {
            Some(targets) => {
                let ids: Vec<u64> = targets.iter().map(|t| t.0).collect();
                McastTask::new(cfg, &ids, now).map_err(|e| DistError::Config {
                    path: map.path.display().to_string(),
                    why: e,
                })?
            }
            None => McastTask::catch_up_only(cfg, now),
        };
        Ok(Distribution {
            task,
            session,
            manifests: ManifestSchedule::new(*digests.geometry(), DEFAULT_MANIFEST_REPEAT),
            digests,
            map,
            name,
            block_size,
            sha256,
            core,
            nack_keys,
            backlog: VecDeque::new(),
            manifest_bytes: 0,
            fec: FecCache::default(),
            no_addr: 0,
            deferred: 0,
            send_errors: 0,
            // The gateway's default; a push's own choice replaces it (`task_created`). A
            // re-created, catch-up-only task sends nothing there: it only names it.
            dest: mcast.broadcast.unwrap_or(mcast.group),
            image: None,
        })
    }

    /// The group sender's counters (zero for a catch-up-only task).
    pub fn stats(&self) -> SenderStats {
        self.core.stats()
    }

    /// Where `device`'s unicast repairs go, as the sender serving it knows.
    fn repair_addr(&self, device: u64) -> Option<SocketAddrV4> {
        match self.core.repair_addr(device)? {
            SocketAddr::V4(a) => Some(a),
            SocketAddr::V6(_) => None,
        }
    }

    /// When the task's one timer must fire: in a millisecond while the kernel holds back
    /// its backlog, else when the core asks.
    fn next_timer(&self, now: Instant, budget: &CatchUpBudget) -> Option<Instant> {
        if !self.backlog.is_empty() {
            return Some(now + Duration::from_millis(1));
        }
        self.core.poll_timeout(budget)
    }
}

/// The keys of a distribution started from a pre-shared key
/// ([`Distributor::start_standalone`]).
#[derive(Debug, Clone, Copy)]
pub struct ExplicitKeys {
    /// The tag key of every receiver's NACKs (and of the probes sent to them).
    pub nack: [u8; 32],
}

/// A push mapped and hashed, waiting for its task.
#[derive(Debug)]
struct Prepared {
    map: Mapped,
    digest: [u8; 32],
    /// The block digests, once the hashing thread has them.
    blocks: Option<std::sync::Arc<BlockDigests>>,
    block_size: u32,
    rate: u64,
    trigger: Trigger,
    /// The push's destination (group or broadcast).
    dest: Ipv4Addr,
    /// The task row, until its digest is known and it goes to the fleet.
    task: Option<store::Task>,
    /// The file's identity when it was mapped (for the digest cache).
    key: Option<FileKey>,
    /// An image push's target and map.
    image: Option<store::TaskImage>,
}

/// A file's identity for the digest cache: path, device, inode, size, modification time.
type FileKey = (PathBuf, u64, u64, u64, i128);

/// Block size of a push that names none when the interface's MTU is unknown (fits any
/// Ethernet path with room to spare).
const FALLBACK_BLOCK_SIZE: u32 = 1400;

/// Digests remembered (the cache is cleared when full).
const DIGEST_CACHE: usize = 256;

fn file_key(path: &Path) -> Option<FileKey> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
    Some((path.to_path_buf(), m.dev(), m.ino(), m.len(), mtime))
}

/// What a push's hashing thread finds: the file's SHA-256 (`None` when the digest cache had
/// it) and its block digests.
type Hashed = Result<(Option<[u8; 32]>, BlockDigests), DigestsError>;

/// Every live distribution of the gateway and their socket.
pub struct Distributor {
    cfg: McastConfig,
    sock: mio::net::UdpSocket,
    secret: [u8; 32],
    dists: HashMap<u32, Distribution>,
    /// Pushes mapped and hashed, waiting for the fleet to create their task.
    prepared: HashMap<Origin, Prepared>,
    buf: Vec<u8>,
    /// Digests computed off the loop: (who pushed, result).
    hashed_tx: std::sync::mpsc::Sender<(Origin, Hashed)>,
    hashed_rx: std::sync::mpsc::Receiver<(Origin, Hashed)>,
    waker: Option<std::sync::Arc<mio::Waker>>,
    /// Digests of files pushed before, while they stay unchanged.
    digests: HashMap<FileKey, [u8; 32]>,
    /// Shared bucket of every catch-up sender of every task (lent to the task being driven).
    budget: CatchUpBudget,
    /// Each live task's one timer, ordered by deadline: `(deadline, session)`, and the
    /// deadline each session holds there. [`Distributor::drive`] visits only the tasks due
    /// and those an input touched, never every task.
    timers: BTreeSet<(Instant, u32)>,
    armed: HashMap<u32, Instant>,
    /// Tasks an input touched since the last [`Distributor::drive`].
    touched: BTreeSet<u32>,
    /// Tasks whose multicast first pass runs (the shared budget refills slower then).
    running: HashSet<u32>,
    /// Counters of the distributions that have ended (for [`Distributor::totals`]).
    finished: McastTotals,
    /// The interface holding `cfg.addr`, for broadcast pushes (`None`: none does).
    iface: Option<Iface>,
    /// Whether `SO_BROADCAST` is on (set at the first broadcast push).
    broadcast_on: bool,
    /// Whether runs of datagrams go as UDP GSO messages (`gso.rs`).
    gso: Gso,
    /// Tasks created with no multicast to run (no target and nothing to wait for): their
    /// pass is over from the start, reported by the next [`Distributor::drive`].
    passless: Vec<TaskId>,
    /// Bytes of the NACK datagrams read (the receivers' feedback, for `fleetcast send`'s
    /// summary).
    nack_bytes: u64,
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
    /// FEC parity symbols multicast as repairs.
    pub parity_symbols: u64,
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
        let st = d.stats();
        self.bytes += st.bytes + d.manifest_bytes;
        self.goodput_bytes +=
            (st.first_pass_blocks * u64::from(d.block_size)).min(d.map.len as u64);
        self.first_pass_blocks += st.first_pass_blocks;
        self.multicast_repairs += st.multicast_repairs;
        self.unicast_repairs += st.unicast_repairs;
        self.parity_symbols += st.parity_symbols;
        self.nacks += st.nacks;
        self.nacks_ignored += st.nacks_ignored;
        self.demoted += st.demoted;
        let c = d.core.catch_up_stats();
        self.bytes += c.bytes;
        self.unicast_repairs += c.unicast_repairs;
        self.nacks += c.nacks;
        self.nacks_ignored += c.nacks_ignored;
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

/// A sender event the loop reports (logs, and the task table's record of a first pass).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DistEvent {
    /// A task's multicast first pass is over.
    PassDone {
        /// The task.
        task: TaskId,
    },
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
        let iface = Iface::holding(cfg.addr);
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::V4(SocketAddrV4::new(cfg.addr, cfg.port)).into())?;
        // Explicit interface: never let the routing table pick where multicast goes.
        s.set_multicast_if_v4(&cfg.addr)?;
        s.set_multicast_ttl_v4(1)?;
        s.set_multicast_loop_v4(false)?;
        // Beyond net.core.wmem_max/rmem_max when the gateway may (CAP_NET_ADMIN): a batch of
        // jumbo datagrams to the group fills the default 200 KiB at once.
        force_buffer(
            &s,
            libc::SO_SNDBUFFORCE,
            4 << 20,
            Socket::set_send_buffer_size,
        );
        force_buffer(
            &s,
            libc::SO_RCVBUFFORCE,
            1 << 20,
            Socket::set_recv_buffer_size,
        );
        s.set_nonblocking(true)?;
        let sock = mio::net::UdpSocket::from_std(s.into());
        let (hashed_tx, hashed_rx) = std::sync::mpsc::channel();
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
            hashed_tx,
            hashed_rx,
            waker: None,
            digests: HashMap::new(),
            budget: CatchUpBudget::new(),
            timers: BTreeSet::new(),
            armed: HashMap::new(),
            touched: BTreeSet::new(),
            running: HashSet::new(),
            finished: McastTotals::default(),
            iface,
            broadcast_on: false,
            gso: Gso::default(),
            passless: Vec::new(),
            nack_bytes: 0,
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

    /// Maps the file of `origin`'s push and starts hashing it; its task row comes out of
    /// [`Distributor::take_hashed`] once the digest is known.
    pub fn prepare_push(
        &mut self,
        origin: Origin,
        push: PushSpec,
        wall_ms: u64,
    ) -> Result<(), DistError> {
        let PushSpec {
            path,
            group,
            mut block_size,
            rate_mbps,
            reason,
            trigger,
            then,
            delivery,
            follow,
            image,
        } = push;
        let dest = self.destination(delivery)?;
        if block_size == 0 {
            block_size = self.default_block_size();
        }
        let reason = if dest == self.cfg.group {
            reason
        } else {
            format!("{reason}, by broadcast to {dest}")
        };
        let path = path.as_str();
        let map = Mapped::open(Path::new(path)).map_err(|source| DistError::Map {
            path: path.into(),
            source,
        })?;
        let image = match &image {
            Some(i) => {
                Some(
                    image::task_image(i, map.len as u64).map_err(|why| DistError::Image {
                        path: path.into(),
                        why,
                    })?,
                )
            }
            None => None,
        };
        let rate = rate_mbps.saturating_mul(1_000_000) / 8;
        // Let the core check the geometry now, so a bad push fails before the task exists.
        McastSender::new(
            SenderConfig::new(0, map.len as u64, block_size, rate),
            Instant::ZERO,
        )
        .map_err(|e| DistError::Config {
            path: path.into(),
            why: e,
        })?;
        // The digest is computed off the loop (a multi-GiB image takes seconds), by reading
        // the file on a thread of its own; the task is created when it is known
        // (`take_hashed`). Reading rather than sharing the mapping keeps the thread free of
        // raw pointers; an edit between the two is caught by the receivers' digest check.
        let plan = store::TaskPlan {
            at_ms: trigger.at_ms,
            min_ready: trigger.min_ready,
            max_wait_s: trigger.max_wait_s,
            rate,
            broadcast: (dest != self.cfg.group).then_some(dest),
            pass_done: false,
        };
        let task = store::Task {
            path: path.into(),
            size: map.len as u64,
            block_size,
            sha256: [0; 32],
            group: Some(group),
            trigger: trigger.describe(&reason),
            created_ms: wall_ms,
            then,
            plan,
            follow,
            image: image.clone(),
        };
        let (tx, waker, file) = (
            self.hashed_tx.clone(),
            self.waker.clone(),
            PathBuf::from(path),
        );
        let key = file_key(&file);
        // The same file, unchanged since it was last hashed: its SHA-256 is not computed
        // again. The block digests always are (in the same pass when both are needed): they
        // depend on the push's block size, and caching them would hold 16 bytes per block of
        // every file pushed.
        let cached = key.as_ref().and_then(|k| self.digests.get(k)).copied();
        let size = map.len as u64;
        std::thread::Builder::new()
            .name("fleetcast-hash".into())
            .spawn(move || {
                let r = BlockDigests::of_file(&file, size, block_size, cached.is_none());
                let _ = tx.send((origin, r));
                if let Some(w) = waker {
                    let _ = w.wake();
                }
            })
            .map_err(|source| DistError::Map {
                path: path.into(),
                source,
            })?;
        let trigger = core_trigger(&plan, &follow, wall_ms, wall_ms);
        self.prepared.insert(
            origin,
            Prepared {
                map,
                digest: cached.unwrap_or([0; 32]),
                blocks: None,
                block_size,
                rate,
                trigger,
                dest,
                task: Some(task),
                key,
                image,
            },
        );
        Ok(())
    }

    /// The block size of a push that names none: one that fills a frame of `mcast.addr`'s
    /// interface (1,444 bytes at MTU 1,500), or 1,400 when the interface or its MTU is unknown.
    pub fn default_block_size(&self) -> u32 {
        self.iface
            .as_ref()
            .and_then(|i| i.mtu(self.sock.as_raw_fd()))
            .and_then(fleetcast_wire::mcast::block_size_for_mtu)
            .unwrap_or(FALLBACK_BLOCK_SIZE)
    }

    /// Where a push's group datagrams go. A broadcast is checked against the interface of
    /// `mcast.addr` (its directed broadcast only), and turns `SO_BROADCAST` on at the first
    /// one: a gateway that never broadcasts never has it.
    fn destination(&mut self, delivery: Delivery) -> Result<Ipv4Addr, BroadcastError> {
        let asked = match (delivery, self.cfg.broadcast) {
            (Delivery::Multicast, _) | (Delivery::Default, None) => return Ok(self.cfg.group),
            (Delivery::Default, Some(b)) => Some(b),
            (Delivery::Broadcast(a), dflt) => a.or(dflt),
        };
        let b = broadcast::resolve(self.iface.as_ref(), self.cfg.addr, asked)?;
        if !self.broadcast_on {
            socket2::SockRef::from(&self.sock)
                .set_broadcast(true)
                .map_err(|e| BroadcastError::Socket(e.kind()))?;
            self.broadcast_on = true;
        }
        Ok(b)
    }

    /// Wakes the loop when a file's digest is ready.
    pub fn set_waker(&mut self, waker: std::sync::Arc<mio::Waker>) {
        self.waker = Some(waker);
    }

    /// Pushes whose digest is now known: their task rows, ready for the fleet (or why the
    /// file could not be read).
    pub fn take_hashed(&mut self) -> Vec<(Origin, Result<store::Task, DistError>)> {
        let mut out = Vec::new();
        while let Ok((origin, r)) = self.hashed_rx.try_recv() {
            let Some(p) = self.prepared.get_mut(&origin) else {
                continue;
            };
            match r {
                Ok((whole, blocks)) => {
                    let digest = whole.unwrap_or(p.digest);
                    p.digest = digest;
                    p.blocks = Some(std::sync::Arc::new(blocks));
                    if let Some(k) = p.key.clone() {
                        if self.digests.len() >= DIGEST_CACHE {
                            self.digests.clear();
                        }
                        self.digests.insert(k, digest);
                    }
                    if let Some(mut t) = p.task.take() {
                        t.sha256 = digest;
                        out.push((origin, Ok(t)));
                    }
                }
                Err(why) => {
                    let path = p.map.path.display().to_string();
                    self.prepared.remove(&origin);
                    out.push((origin, Err(DistError::Digests { path, why })));
                }
            }
        }
        out
    }

    /// Pushes prepared and waiting for their task (tests check none is left behind).
    #[cfg(test)]
    pub(crate) fn prepared(&self) -> usize {
        self.prepared.len()
    }

    /// Forgets a prepared push whose task was not created.
    pub fn drop_prepared(&mut self, origin: Origin) {
        self.prepared.remove(&origin);
    }

    /// The fleet created `task` for the push of `origin`: start its distribution.
    pub fn task_created(
        &mut self,
        origin: Origin,
        task: TaskId,
        targets: &[DeviceId],
        now: Instant,
    ) {
        let Some(Prepared {
            map,
            digest,
            blocks: Some(blocks),
            block_size: bs,
            rate,
            trigger,
            dest,
            image,
            ..
        }) = self.prepared.remove(&origin)
        else {
            return;
        };
        match Distribution::new(
            task,
            map,
            (bs, rate),
            digest,
            blocks,
            NackKeys::new(&self.secret, task),
            &self.cfg,
            trigger,
            Some(targets),
            now,
        ) {
            Ok(mut d) => {
                d.dest = dest;
                d.image = image;
                if d.core.group().is_none() {
                    self.passless.push(task);
                }
                tracing::info!(
                    task = task.0,
                    blocks = d.core.n_blocks(),
                    %dest,
                    "distribution started"
                );
                self.touched.insert(d.session);
                self.dists.insert(d.session, d);
            }
            Err(e) => tracing::error!(task = task.0, error = %e, "distribution not started"),
        }
    }

    /// The announce of `task` for `device`, to go over the device's control session from
    /// `peer` (that session's address). A device joins the multicast while its first pass
    /// runs; after that it is caught up by unicast, without a new multicast. When the task's
    /// sender is gone (a gateway restart), it is re-created from the task table: `row`
    /// gives the task and its targets still pending. A task whose first pass had not ended
    /// gets its multicast back as planned (its time, quorum, rate and destination, counted
    /// on the wall clock `wall_ms`), any other is caught up by unicast. Every announce gives
    /// the device a new NACK key and binds its repairs to `peer` (or an address it proves).
    pub fn announce_for(
        &mut self,
        task: TaskId,
        device: DeviceId,
        peer: Option<IpAddr>,
        row: impl FnOnce() -> Option<(store::Task, Vec<DeviceId>)>,
        (now, wall_ms): (Instant, u64),
    ) -> Result<Announce<'static>, DistError> {
        let session = task.0 as u32;
        if !self.dists.contains_key(&session) {
            let Some((t, pending)) = row() else {
                return Err(DistError::NoTask { task: task.0 });
            };
            let d = self.recreate(task, &t, &pending, now, wall_ms)?;
            self.touched.insert(session);
            self.dists.insert(session, d);
        }
        let d = self.dists.get_mut(&session).expect("inserted above");
        let nack_key = d.nack_keys.next_device_key(device.0);
        let joined = d.core.handle_announce(now, device.0, peer, nack_key);
        self.touched.insert(session);
        Ok(Announce {
            task_id: task.0,
            session,
            group: d.dest.into(),
            port: self.cfg.port,
            size: d.map.len as u64,
            block_size: d.block_size,
            // Parity comes from the group sender only: a device caught up by unicast is
            // repaired block by block, and NACKs gaps as they open.
            fec_group: if joined { d.core.config().fec_group } else { 0 },
            sha256: d.sha256,
            digests: Some(d.digests.root()),
            nack_key: Some(nack_key),
            name: Cow::Owned(d.name.clone()),
            image: d.image.as_ref().map(|i| ImageTarget {
                target: Cow::Owned(i.target.clone()),
                map: Cow::Owned(i.map.clone()),
            }),
        })
    }

    /// The distribution of a task whose sender is gone, from its row: as planned while its
    /// first pass is still to run, catch-up only otherwise.
    fn recreate(
        &mut self,
        task: TaskId,
        t: &store::Task,
        pending: &[DeviceId],
        now: Instant,
        wall_ms: u64,
    ) -> Result<Distribution, DistError> {
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
        // A broadcast is checked again: the interface may have changed since the push. If it
        // no longer holds, the devices are caught up by unicast (never a broadcast elsewhere).
        let dest = match t.plan.broadcast {
            None => Ok(self.cfg.group),
            Some(b) => self.destination(Delivery::Broadcast(Some(b))),
        };
        let planned = match dest {
            Ok(dest) if t.plan.multicast_pending() => Some(dest),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(task = task.0, error = %e, "planned broadcast no longer possible: catching up by unicast");
                None
            }
        };
        // The digest is the table's: a file edited in place is caught by the receivers
        // (the whole file's SHA-256 in the announce is the table's, the block digests are
        // the file's as it is now: they disagree, so no copy verifies). The block digests
        // are computed here, on the loop, from the mapping: one SHA-256 pass over the file
        // (about 2 s per GiB on a core without SHA extensions) before the announce goes.
        let blocks =
            std::sync::Arc::new(BlockDigests::of_bytes(map.bytes(), t.block_size).map_err(
                |why| DistError::Digests {
                    path: t.path.clone(),
                    why,
                },
            )?);
        let nack_keys = NackKeys::new(&self.secret, task);
        let mut d = match planned {
            Some(dest) => {
                let trigger = core_trigger(&t.plan, &t.follow, t.created_ms, wall_ms);
                let mut d = Distribution::new(
                    task,
                    map,
                    (t.block_size, t.plan.rate),
                    t.sha256,
                    blocks,
                    nack_keys,
                    &self.cfg,
                    trigger,
                    Some(pending),
                    now,
                )?;
                d.dest = dest;
                if d.core.group().is_none() {
                    self.passless.push(task);
                }
                tracing::info!(
                    task = task.0,
                    targets = pending.len(),
                    in_ms = trigger.delay.as_millis() as u64,
                    %dest,
                    "distribution re-created as planned: its multicast has not run"
                );
                d
            }
            None => {
                let d = Distribution::new(
                    task,
                    map,
                    (t.block_size, CATCH_UP_RATE),
                    t.sha256,
                    blocks,
                    nack_keys,
                    &self.cfg,
                    Trigger::default(),
                    None,
                    now,
                )?;
                tracing::info!(task = task.0, "distribution re-created for catch-up");
                d
            }
        };
        d.image = t.image.clone();
        Ok(d)
    }

    /// Starts the distribution of the file at `path` as `task` with no fleet behind it
    /// (`fleetcast send`): its blocks are authenticated by digest (the root goes in its
    /// PSK-tagged announce) and every receiver NACKs
    /// under `keys.nack` (both from a pre-shared key), and its multicast starts as `trigger`
    /// says (a quorum of receivers: with none, nobody would be there to join). Receivers
    /// join through [`Distributor::announce_for`] (its row is never needed: the task is
    /// live) and [`Distributor::receiver_ready`].
    pub fn start_standalone(
        &mut self,
        task: TaskId,
        path: &Path,
        (block_size, rate_bytes, sha256): (u32, u64, [u8; 32]),
        keys: ExplicitKeys,
        trigger: Trigger,
        now: Instant,
    ) -> Result<(), DistError> {
        let map = Mapped::open(path).map_err(|source| DistError::Map {
            path: path.display().to_string(),
            source,
        })?;
        let nack_keys = NackKeys::shared(&self.secret, task, keys.nack);
        let blocks =
            BlockDigests::of_bytes(map.bytes(), block_size).map_err(|why| DistError::Digests {
                path: path.display().to_string(),
                why,
            })?;
        let d = Distribution::new(
            task,
            map,
            (block_size, rate_bytes),
            sha256,
            std::sync::Arc::new(blocks),
            nack_keys,
            &self.cfg,
            trigger,
            Some(&[]),
            now,
        )?;
        self.touched.insert(d.session);
        self.dists.insert(d.session, d);
        Ok(())
    }

    /// The Merkle root (and manifest size) of a live `task`, for an announce built outside
    /// [`Distributor::announce_for`] (a standalone sender's).
    pub fn digests_of(&self, task: TaskId) -> Option<fleetcast_wire::DigestRoot> {
        Some(self.dists.get(&(task.0 as u32))?.digests.root())
    }

    /// The group and catch-up counters of a live `task`, and whether its first pass has
    /// started at `now`.
    pub fn task_stats(
        &self,
        task: TaskId,
        now: Instant,
    ) -> Option<(SenderStats, SenderStats, bool)> {
        let d = self.dists.get(&(task.0 as u32))?;
        Some((d.core.stats(), d.core.catch_up_stats(), d.core.started(now)))
    }

    /// Bytes of the NACK datagrams read so far.
    pub fn nack_bytes(&self) -> u64 {
        self.nack_bytes
    }

    /// `device` joined `task` (its first transfer status arrived): it counts towards a
    /// `min_ready` trigger.
    pub fn receiver_ready(&mut self, task: u64, device: u64) {
        if let Some(d) = self.dists.get_mut(&(task as u32)) {
            d.core.handle_ready(device);
            self.touched.insert(d.session);
        }
    }

    /// The task table recorded a device's completion.
    pub fn transfer_done(&mut self, task: TaskId, device: DeviceId, verified: bool) {
        if let Some(d) = self.dists.get_mut(&(task.0 as u32)) {
            d.core.handle_done(device.0, verified);
            self.touched.insert(d.session);
        }
    }

    /// Drives the tasks that are due or were touched by an input since the last call:
    /// timers, sends, events; re-arms each one's timer and drops the tasks that are over.
    /// Call after any input and at [`Distributor::poll_timeout`].
    pub fn drive(&mut self, now: Instant) -> Vec<DistEvent> {
        let mut out: Vec<DistEvent> = self
            .passless
            .drain(..)
            .map(|task| DistEvent::PassDone { task })
            .collect();
        let port = self.cfg.port;
        let fd = self.sock.as_raw_fd();
        self.budget.refill(now, !self.running.is_empty());
        let mut due = std::mem::take(&mut self.touched);
        while let Some(&(t, session)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            self.armed.remove(&session);
            due.insert(session);
        }
        for session in due {
            let Some(d) = self.dists.get_mut(&session) else {
                continue;
            };
            d.core.handle_timeout(now);
            let group = SocketAddrV4::new(d.dest, port);
            send_all((fd, &mut self.gso), d, now, group, &mut self.budget);
            while let Some(ev) = d.core.poll_event() {
                if let Some(e) = log_event(d, ev) {
                    out.push(e);
                }
            }
            if d.core.group_running() {
                self.running.insert(session);
            } else {
                self.running.remove(&session);
            }
            let next = if d.core.is_over() {
                self.finished.add(d);
                self.finished.finished += 1;
                if d.no_addr > 0 {
                    tracing::warn!(
                        task = d.task.0,
                        dropped = d.no_addr,
                        "repairs without a known address"
                    );
                }
                self.dists.remove(&session);
                None
            } else {
                d.next_timer(now, &self.budget)
            };
            self.arm(session, next);
        }
        out
    }

    /// Sets `session`'s one timer to `at` (`None`: none).
    fn arm(&mut self, session: u32, at: Option<Instant>) {
        if let Some(old) = self.armed.remove(&session) {
            self.timers.remove(&(old, session));
        }
        if let Some(t) = at {
            self.timers.insert((t, session));
            self.armed.insert(session, t);
        }
    }

    /// When [`Distributor::drive`] must run next: the earliest task timer (at once if an
    /// input touched a task since the last drive).
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        if !self.touched.is_empty() {
            return Some(now);
        }
        self.timers.first().map(|&(t, _)| t)
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

/// The core's trigger for a task planned as `plan` (with `follow`'s online gate), pushed at
/// `created_ms`, as of the wall-clock time `wall_ms`: a schedule and a quorum's longest wait
/// are wall-clock instants, so a task re-created after a restart keeps them. The wait counts
/// from the scheduled time, or the push.
fn core_trigger(
    plan: &store::TaskPlan,
    follow: &store::TaskFollow,
    created_ms: u64,
    wall_ms: u64,
) -> Trigger {
    let delay_ms = plan.at_ms.map_or(0, |t| t.saturating_sub(wall_ms));
    let quorum = plan.min_ready.or(follow.when_online).map(|n| {
        let deadline = match plan.max_wait_s {
            Some(w) => {
                let from = plan.at_ms.unwrap_or(created_ms);
                let at = from.saturating_add(w.saturating_mul(1000));
                Duration::from_millis(at.saturating_sub(wall_ms).max(delay_ms))
            }
            None => Duration::from_secs(u64::MAX / 4),
        };
        (n as usize, deadline)
    });
    Trigger {
        delay: Duration::from_millis(delay_ms),
        quorum,
    }
}

/// Sets a socket buffer to `bytes` with the `*BUFFORCE` option `force` (past the system's
/// maximum, which needs `CAP_NET_ADMIN`), or else with `fallback` (up to that maximum).
fn force_buffer(
    s: &socket2::Socket,
    force: libc::c_int,
    bytes: usize,
    fallback: fn(&socket2::Socket, usize) -> io::Result<()>,
) {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads a c_int from a live local for the given length.
    let forced = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            force,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        let _ = fallback(s, bytes);
    }
}

/// Logs a task core's event; the end of its group sender goes to the loop.
fn log_event(d: &Distribution, ev: TaskEvent) -> Option<DistEvent> {
    let task = d.task.0;
    match ev {
        TaskEvent::TriggerFired { ready } => {
            tracing::info!(task, ready, "trigger fired: multicast starts");
        }
        TaskEvent::FirstPassDone { elapsed } => {
            let ms = elapsed.as_millis() as u64;
            let mbit = (d.map.len as u64 * 8 / 1000).checked_div(ms).unwrap_or(0);
            tracing::info!(task, ms, mbit_per_s = mbit, "first pass done");
            return Some(DistEvent::PassDone { task: d.task });
        }
        TaskEvent::Demoted(device) => {
            tracing::info!(task, device, "receiver demoted to unicast catch-up");
        }
        TaskEvent::CatchUpRefused { device, error } => {
            tracing::error!(task, device, error = %error, "catch-up not started");
        }
        TaskEvent::CatchUpFinished {
            device,
            verified,
            repairs,
        } => tracing::info!(task, device, verified, repairs, "catch-up finished"),
        TaskEvent::Finished {
            completed,
            unfinished,
            stats,
        } => {
            return Some(DistEvent::Finished {
                task: d.task,
                completed: completed.len(),
                unfinished: unfinished.len(),
                stats,
                deferred: d.deferred,
                send_errors: d.send_errors,
            })
        }
    }
    None
}

/// One datagram of a batch: a block or parity symbol (its prefix and where its payload lies),
/// or a manifest (built whole in a buffer of the batch).
enum Out<'a> {
    Item {
        t: Transmit,
        prefix: [u8; PARITY_PREFIX_LEN],
        prefix_len: usize,
        payload: &'a [u8],
        dest: SocketAddrV4,
    },
    Manifest {
        m: u32,
        buf: usize,
        dest: SocketAddrV4,
    },
}

/// A datagram the kernel refused with `EAGAIN`, kept for the next turn as the batch had it:
/// a block or parity symbol, or a manifest and where it was going. A kept block is not put to
/// the manifest schedule again (its manifests are kept with it), so a refused datagram costs
/// no extra manifest and a refused manifest is not lost.
#[derive(Debug, Clone, Copy)]
enum Queued {
    Item(Transmit),
    Manifest(u32, SocketAddrV4),
}

/// Sends the backlog, then what the task core releases, in `sendmmsg` batches; datagrams the
/// kernel refuses with `EAGAIN` go back to the backlog, manifests included (measured:
/// dropping refused manifests, at the push's full rate with 1% loss, left receivers holding
/// up to 1,600 blocks each for manifests that never came before their repairs). Each new
/// datagram is preceded by the manifests the task's schedule says are due
/// (`mcast::digest::ManifestSchedule`), asked once per datagram.
/// Catch-up senders draw from the shared `budget` on top of their own pacing.
fn send_all(
    (fd, gso): (i32, &mut Gso),
    d: &mut Distribution,
    now: Instant,
    group: SocketAddrV4,
    budget: &mut CatchUpBudget,
) {
    let mut manifests: Vec<Vec<u8>> = Vec::new();
    let mut scratch = Vec::new();
    let mut due: Vec<u32> = Vec::new();
    loop {
        let (batch, kept) = next_batch(d, now, budget);
        if batch.is_empty() {
            return;
        }
        // Parity symbols come from the group's encoding (computed once per group, kept for
        // the few groups being repaired).
        for q in &batch {
            if let Queued::Item(Transmit::Parity(p)) = q {
                d.fec.encode_group(&d.map, d.block_size, p);
            }
        }
        let mut out: Vec<Out<'_>> = Vec::with_capacity(2 * BATCH);
        let mut bufs = (&mut manifests, &mut scratch, 0usize);
        for (i, q) in batch.iter().enumerate() {
            let t = match *q {
                Queued::Manifest(m, dest) => {
                    push_manifest(&d.digests, d.session, (m, dest), &mut bufs, &mut out);
                    continue;
                }
                Queued::Item(t) => t,
            };
            let dest = match t {
                Transmit::Block(b) => match b.dest {
                    Dest::Group => group,
                    Dest::Unicast(dev) => match d.repair_addr(dev) {
                        Some(a) => a,
                        None => {
                            d.no_addr += 1;
                            continue;
                        }
                    },
                },
                Transmit::Parity(_) => group,
            };
            let Some(item) = prepare((&d.map, &d.fec), (d.session, d.block_size), &t, dest) else {
                continue;
            };
            if i >= kept {
                due.clear();
                match t {
                    Transmit::Block(b) => d.manifests.for_block(now, b.dest, b.block, &mut due),
                    Transmit::Parity(p) => {
                        let span = p.first_block..p.first_block.saturating_add(p.blocks);
                        d.manifests.for_span(now, span, &mut due);
                    }
                }
                for &m in &due {
                    push_manifest(&d.digests, d.session, (m, dest), &mut bufs, &mut out);
                }
            }
            out.push(item);
        }
        let n = out.len();
        let mut dests: Vec<SocketAddrV4> = Vec::with_capacity(n);
        let mut iovs: Vec<[libc::iovec; 2]> = Vec::with_capacity(n);
        for o in out.iter_mut() {
            let (dest, head, payload): (_, &mut [u8], &[u8]) = match o {
                Out::Item {
                    prefix,
                    prefix_len,
                    payload,
                    dest,
                    ..
                } => (*dest, &mut prefix[..*prefix_len], payload),
                Out::Manifest { buf, dest, .. } => (*dest, &mut manifests[*buf][..], &[]),
            };
            dests.push(dest);
            iovs.push([
                libc::iovec {
                    iov_base: head.as_mut_ptr().cast(),
                    iov_len: head.len(),
                },
                libc::iovec {
                    // The kernel only reads through this pointer (sendmmsg), never writes.
                    iov_base: payload.as_ptr() as *mut libc::c_void,
                    iov_len: payload.len(),
                },
            ]);
        }
        let block_dgram = DATA_PREFIX_LEN + d.block_size as usize;
        let (sent, errors) = gso.send(fd, (&mut iovs, &dests), block_dgram);
        d.send_errors += errors;
        d.manifest_bytes += iovs[..sent]
            .iter()
            .zip(&out)
            .filter(|(_, o)| matches!(o, Out::Manifest { .. }))
            .map(|(v, _)| v[0].iov_len as u64)
            .sum::<u64>();
        if sent < n {
            // A full socket buffer or device queue: keep the rest for the next turn.
            d.deferred += (n - sent) as u64;
            for o in out[sent..].iter().rev() {
                d.backlog.push_front(match o {
                    Out::Item { t, .. } => Queued::Item(*t),
                    Out::Manifest { m, dest, .. } => Queued::Manifest(*m, *dest),
                });
            }
            return;
        }
        if batch.len() < BATCH {
            return;
        }
    }
}

/// Builds manifest `m` for `dest` into the batch's next manifest buffer (`bufs`: the buffers,
/// grown as needed and reused across batches, a scratch buffer, and how many are in use) and
/// appends it to `out`.
fn push_manifest(
    digests: &BlockDigests,
    session: u32,
    (m, dest): (u32, SocketAddrV4),
    (manifests, scratch, used): &mut (&mut Vec<Vec<u8>>, &mut Vec<u8>, usize),
    out: &mut Vec<Out<'_>>,
) {
    if *used == manifests.len() {
        manifests.push(Vec::new());
    }
    let buf = *used;
    if digests
        .manifest_datagram(session, m, scratch, &mut manifests[buf])
        .is_some()
    {
        *used += 1;
        out.push(Out::Manifest { m, buf, dest });
    }
}

/// The datagram of one transmit to `dest`: its prefix and its payload where it lies (the
/// mapping, or the parity cache); `None` when it cannot go (a symbol not encoded).
fn prepare<'a>(
    (map, fec): (&'a Mapped, &'a FecCache),
    (session, block_size): (u32, u32),
    t: &Transmit,
    dest: SocketAddrV4,
) -> Option<Out<'a>> {
    let bs = block_size as usize;
    let mut prefix = [0u8; PARITY_PREFIX_LEN];
    let (prefix_len, payload) = match t {
        Transmit::Block(b) => {
            let bytes = map.bytes();
            let start = b.block as usize * bs;
            let end = (start + bs).min(bytes.len());
            let payload = &bytes[start.min(end)..end];
            // No tag: the block is authenticated by its digest in a manifest.
            let p = data_prefix(b.kind, session, b.block, payload, None).ok()?;
            prefix[..DATA_PREFIX_LEN].copy_from_slice(&p);
            (DATA_PREFIX_LEN, payload)
        }
        Transmit::Parity(sp) => {
            let symbol = fec.symbol(sp.group, sp.index, bs)?;
            let parity = Parity {
                session,
                group: sp.group,
                group_size: sp.group_size,
                parity_count: sp.parity_count,
                index: sp.index,
                payload: symbol,
            };
            // Untagged too: a block rebuilt from it is verified like a received one.
            prefix = parity.prefix(None).ok()?;
            (PARITY_PREFIX_LEN, symbol)
        }
    };
    Some(Out::Item {
        t: *t,
        prefix,
        prefix_len,
        payload,
        dest,
    })
}

/// Up to [`BATCH`] datagrams: the backlog first, then the group's transmits, then the
/// catch-up senders' in turn while the shared budget allows. Also returns how many came from
/// the backlog (scheduled already).
fn next_batch(
    d: &mut Distribution,
    now: Instant,
    budget: &mut CatchUpBudget,
) -> (Vec<Queued>, usize) {
    let mut batch: Vec<Queued> = Vec::with_capacity(BATCH);
    while batch.len() < BATCH {
        match d.backlog.pop_front() {
            Some(q) => batch.push(q),
            None => break,
        }
    }
    let kept = batch.len();
    // The group first, then the catch-up senders in turn while the budget allows.
    while batch.len() < BATCH {
        match d.core.poll_transmit(now, budget) {
            Some(t) => batch.push(Queued::Item(t)),
            None => break,
        }
    }
    (batch, kept)
}

/// A distribution's FEC state: the codec and the parity of the groups being repaired.
#[derive(Default)]
struct FecCache {
    codec: ReedSolomon,
    /// (group, its M symbols back to back), most recent last.
    groups: VecDeque<(u32, Vec<u8>)>,
}

impl std::fmt::Debug for FecCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FecCache")
            .field("groups", &self.groups.len())
            .finish_non_exhaustive()
    }
}

/// Groups whose parity is kept at once.
const FEC_CACHED_GROUPS: usize = 8;

impl FecCache {
    /// Encodes `p`'s group from the mapping unless its parity is cached. The file's last
    /// block is zero-padded to the block size, as the receivers pad it to decode.
    fn encode_group(&mut self, map: &Mapped, block_size: u32, p: &SendParity) {
        if self.groups.iter().any(|(g, _)| *g == p.group) {
            return;
        }
        let bs = block_size as usize;
        let bytes = map.bytes();
        let first = p.first_block as usize * bs;
        let mut last = Vec::new();
        let mut data: Vec<&[u8]> = Vec::with_capacity(p.blocks as usize);
        for b in 0..p.blocks as usize {
            let start = first + b * bs;
            let end = (start + bs).min(bytes.len());
            if end - start < bs {
                last.extend_from_slice(&bytes[start..end]);
                last.resize(bs, 0);
            } else {
                data.push(&bytes[start..end]);
            }
        }
        if !last.is_empty() {
            data.push(&last);
        }
        let m = usize::from(p.parity_count);
        let mut out = vec![0u8; m * bs];
        let mut parity: Vec<&mut [u8]> = out.chunks_mut(bs).collect();
        if let Err(e) = self.codec.encode(&data, &mut parity) {
            tracing::warn!(group = p.group, error = %e, "parity not computed");
            return;
        }
        if self.groups.len() >= FEC_CACHED_GROUPS {
            self.groups.pop_front();
        }
        self.groups.push_back((p.group, out));
    }

    /// Symbol `index` of `group`, if encoded.
    fn symbol(&self, group: u32, index: u16, bs: usize) -> Option<&[u8]> {
        let (_, out) = self.groups.iter().find(|(g, _)| *g == group)?;
        let i = usize::from(index);
        out.get(i * bs..(i + 1) * bs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::PushTrigger;
    use crate::pki::sha256;
    use fleetcast_wire::DataBlock;

    /// A distributor on 127.0.0.1 ([`McastConfig::loopback`]): tests that drive it send
    /// nothing, or only to loopback.
    fn loopback() -> Distributor {
        Distributor::open(McastConfig::loopback()).unwrap()
    }

    /// A task re-created after a restart (its sender gone) gets back the multicast it was
    /// planned with while its first pass is still to run: its schedule and its quorum's
    /// longest wait stay wall-clock instants, its rate and targets are the row's. A task
    /// whose pass ended, a record from before plans were kept, and a broadcast the interface
    /// no longer allows are caught up by unicast. Nothing is driven: nothing is sent.
    #[test]
    fn a_planned_task_is_recreated_as_its_multicast_and_a_finished_one_for_catch_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let mut dist = loopback();
        // Pushed at 1,000,000 ms for 1,060,000 ms; the gateway is back at 1,030,000 ms.
        let planned = store::Task {
            path: path.display().to_string(),
            size: 10_000,
            block_size: 1000,
            sha256: [0; 32],
            group: Some("rack7".into()),
            trigger: String::new(),
            created_ms: 1_000_000,
            then: vec![],
            plan: store::TaskPlan {
                at_ms: Some(1_060_000),
                min_ready: Some(2),
                max_wait_s: Some(30),
                rate: 2_000_000,
                broadcast: None,
                pass_done: false,
            },
            follow: Default::default(),
            image: None,
        };
        let ip = Some(Ipv4Addr::LOCALHOST.into());
        let wall = 1_030_000;
        let targets = vec![DeviceId(1), DeviceId(2), DeviceId(3)];
        let announce = |dist: &mut Distributor, t: u64, row: &store::Task| {
            let row = row.clone();
            let targets = targets.clone();
            dist.announce_for(
                TaskId(t),
                DeviceId(1),
                ip,
                move || Some((row, targets)),
                (Instant::ZERO, wall),
            )
            .unwrap()
        };
        let a = announce(&mut dist, 5, &planned);
        assert_eq!(a.group, IpAddr::V4(Ipv4Addr::new(239, 77, 9, 9)));
        let core = &dist.dists[&5].core;
        let g = core.group().expect("the multicast is back");
        assert_eq!(g.receiver_count(), 3, "the row's pending targets");
        assert_eq!(core.config().rate, 2_000_000);
        assert_eq!(
            core.config().trigger,
            Trigger {
                delay: Duration::from_secs(30),
                quorum: Some((2, Duration::from_secs(60))),
            },
            "still at 1,060,000 ms, and at most 30 s after it"
        );
        assert!(!core.started(Instant::ZERO + Duration::from_secs(29)));

        let mut over = planned.clone();
        over.plan.pass_done = true;
        announce(&mut dist, 6, &over);
        let mut old = planned.clone();
        old.plan = store::TaskPlan::default();
        announce(&mut dist, 7, &old);
        let mut lo = planned.clone();
        lo.plan.broadcast = Some(Ipv4Addr::new(127, 255, 255, 255));
        announce(&mut dist, 8, &lo);
        for t in [6, 7, 8] {
            let core = &dist.dists[&t].core;
            assert!(core.group().is_none(), "task {t}: caught up, not multicast");
            assert_eq!(core.catch_up_count(), 1, "task {t}");
        }
        // An image task, re-created either way, announces its target and map again.
        assert_eq!(a.image, None, "a file task has no image");
        for (t, pass_done) in [(9, false), (10, true)] {
            let mut img = planned.clone();
            img.plan.pass_done = pass_done;
            img.image = Some(store::TaskImage {
                target: "partlabel=rootfs-b".into(),
                map: b"map bytes".to_vec(),
                image_size: 1 << 20,
            });
            let a = announce(&mut dist, t, &img);
            let i = a.image.expect("the image is announced again");
            assert_eq!(
                (&*i.target, &*i.map),
                ("partlabel=rootfs-b", &b"map bytes"[..])
            );
        }
    }

    /// A push that names no block size gets the one that fills a frame of the interface
    /// (on loopback, MTU 65,536: as large as a parity datagram carries), asked through the
    /// distributor's own socket.
    #[test]
    fn the_default_block_fills_the_interface_mtu() {
        let dist = loopback();
        let iface = dist.iface.as_ref().expect("loopback holds 127.0.0.1");
        let mtu = iface
            .mtu(dist.sock.as_raw_fd())
            .expect("the kernel says lo's MTU");
        let want = std::fs::read_to_string(format!("/sys/class/net/{}/mtu", iface.name))
            .ok()
            .and_then(|m| m.trim().parse::<u32>().ok());
        if let Some(w) = want {
            assert_eq!(mtu, w, "the ioctl agrees with sysfs");
        }
        assert_eq!(
            Some(dist.default_block_size()),
            fleetcast_wire::mcast::block_size_for_mtu(mtu)
        );
    }

    #[test]
    fn the_core_trigger_keeps_wall_clock_instants_across_a_restart() {
        let plan = store::TaskPlan {
            at_ms: None,
            min_ready: None,
            max_wait_s: Some(60),
            rate: 1,
            broadcast: None,
            pass_done: false,
        };
        let online = store::TaskFollow {
            group: true,
            when_online: Some(20),
        };
        // The online gate is a quorum; its wait counts from the push (no schedule).
        assert_eq!(
            core_trigger(&plan, &online, 1_000, 21_000),
            Trigger {
                delay: Duration::ZERO,
                quorum: Some((20, Duration::from_secs(40))),
            }
        );
        // Past every instant: at once.
        let late = store::TaskPlan {
            at_ms: Some(5_000),
            min_ready: Some(3),
            ..plan
        };
        assert_eq!(
            core_trigger(&late, &Default::default(), 1_000, 900_000),
            Trigger {
                delay: Duration::ZERO,
                quorum: Some((3, Duration::ZERO)),
            }
        );
        // No quorum, no wait: the schedule alone.
        let at = store::TaskPlan {
            at_ms: Some(9_000),
            max_wait_s: None,
            ..plan
        };
        assert_eq!(
            core_trigger(&at, &Default::default(), 1_000, 4_000).delay,
            Duration::from_secs(5)
        );
    }

    /// Each live task holds exactly one entry in the timer set, a turn drives only the tasks
    /// due or touched, and a task that is over leaves no timer behind (on 127.0.0.1; the
    /// tasks are catch-up-only ones and nobody NACKs, so nothing is sent).
    #[test]
    fn each_task_holds_one_timer_and_leaves_none_when_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let mut dist = loopback();
        let row = store::Task {
            path: path.display().to_string(),
            size: 10_000,
            block_size: 1000,
            sha256: [0; 32],
            group: None,
            trigger: String::new(),
            created_ms: 0,
            then: vec![],
            plan: Default::default(),
            follow: Default::default(),
            image: None,
        };
        let ip = Some(Ipv4Addr::LOCALHOST.into());
        for t in [5, 6, 7] {
            dist.announce_for(
                TaskId(t),
                DeviceId(1),
                ip,
                || Some((row.clone(), vec![])),
                (Instant::ZERO, 0),
            )
            .unwrap();
        }
        assert_eq!(dist.poll_timeout(Instant::ZERO), Some(Instant::ZERO));
        let mut now = Instant::ZERO;
        let mut turns = 0;
        while dist.live() > 0 {
            assert!(dist.drive(now).is_empty());
            assert!(dist.touched.is_empty());
            assert_eq!(dist.timers.len(), dist.live(), "one timer per task");
            assert_eq!(dist.armed.len(), dist.live());
            // Only task 6's device reports: its task ends at once, the others linger.
            if turns == 1 {
                dist.transfer_done(TaskId(6), DeviceId(1), true);
                assert_eq!(
                    dist.poll_timeout(now),
                    Some(now),
                    "a touched task is driven"
                );
                dist.drive(now);
                assert_eq!(dist.live(), 2);
                assert_eq!(dist.timers.len(), 2);
            }
            if dist.live() == 0 {
                break;
            }
            now = dist
                .poll_timeout(now)
                .expect("a live task has a timer")
                .max(now);
            turns += 1;
            assert!(turns < 100, "the tasks never ended");
        }
        assert!(
            now >= Instant::ZERO + Duration::from_secs(1),
            "they lingered"
        );
        assert!(dist.timers.is_empty() && dist.armed.is_empty());
        assert_eq!(dist.poll_timeout(now), None);
        assert_eq!(dist.totals().finished, 3);
    }

    #[test]
    fn triggers_are_validated_and_recorded() {
        let t = PushTrigger {
            at_ms: Some(10_000),
            min_ready: Some(3),
            max_wait_s: Some(60),
        };
        assert_eq!(t.validate(9_000), Ok(()));
        assert!(t.validate(20_000).unwrap_err().to_string().contains("past"));
        assert_eq!(
            t.describe("publish by alice"),
            "publish by alice, scheduled at 10000 ms (UNIX), when 3 receivers are ready or 60 s passed"
        );
        let zero = PushTrigger {
            min_ready: Some(0),
            ..PushTrigger::default()
        };
        assert!(zero.validate(0).is_err());
        let wait_alone = PushTrigger {
            max_wait_s: Some(5),
            ..PushTrigger::default()
        };
        assert!(wait_alone
            .validate(0)
            .unwrap_err()
            .to_string()
            .contains("give both"));
        assert_eq!(
            PushTrigger::default().describe("publish by operator"),
            "publish by operator"
        );
    }

    #[test]
    fn mapped_file_blocks_go_untagged_and_parse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        let data: Vec<u8> = (0..2500u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let m = Mapped::open(&p).unwrap();
        assert_eq!(m.bytes(), &data[..]);
        assert_eq!(sha256(m.bytes()), sha256(&data));
        assert_eq!(sha256_file(&p).unwrap(), sha256(&data));
        assert!(sha256_file(&dir.path().join("missing")).is_err());
        let payload = &m.bytes()[2000..];
        let prefix = data_prefix(fleetcast_wire::Kind::Data, 9, 2, payload, None).unwrap();
        let mut dgram = prefix.to_vec();
        dgram.extend_from_slice(payload);
        let (_, b, f) = DataBlock::parse(&dgram).unwrap();
        assert_eq!((b.session, b.block, b.payload), (9, 2, payload));
        assert!(f.tag.is_none());
        // An empty file maps nothing and reads as empty.
        let e = dir.path().join("empty");
        std::fs::write(&e, b"").unwrap();
        assert!(Mapped::open(&e).unwrap().bytes().is_empty());
    }
}
