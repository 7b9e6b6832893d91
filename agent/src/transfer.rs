//! One multicast download on a worker thread: UDP socket joined to the announced group,
//! blocks checked (CRC by the parser, session, length, then their digest in a manifest the
//! announce's Merkle root vouches for: `verify.rs`) and written in place with `pwrite`, the
//! sans-IO [`McastReceiver`] driven on the worker's clock, NACKs sent to the gateway,
//! progress persisted, file renamed into place.
//!
//! # Files (in the downloads directory)
//! - `<name>.part`: the file being received, written at `block × block_size`.
//! - `.<name>.task-<id>.rec`: the received-block record ([`TransferRecord`]: task geometry
//!   and digest, then ranges, in the wire codec with a CRC-32; [`crate::record`]), rewritten
//!   atomically ([`fleetcast_os::write_atomic`]: temporary file, fsync, rename, directory
//!   fsync) on every `PersistDue` and on stop, always after the data it names is durable. A
//!   restarted agent resumes from it instead of starting over; a record of another geometry
//!   or digest, or one that does not decode, is ignored (the transfer starts over). A record
//!   of the layout of before (no envelope) is read too (`legacy.rs`).
//! - `<name>`: the verified file (renamed from `.part` once every block was verified by
//!   digest, or, for a copy resumed from a record or an announce without digests, once the
//!   whole file's SHA-256 matched: blocks written by an earlier run are read back once).
//! - `.<name>.task-<id>.done`: written after the rename; a repeated announce of a finished
//!   task re-verifies `<name>` and reports at once.
//!
//! # Invariants
//! - A block is written and handed to the core only if it parsed (CRC), names this session,
//!   has exactly the block's length and matches its digest (when the announce has a root);
//!   a block whose manifest is missing waits in a bounded buffer until it comes. Every other
//!   datagram is counted by its reason ([`Dropped`]) and the counts are logged on stderr
//!   when the transfer ends (`fleetcast-agent: transfer <task>: dropped crc=N session=N
//!   tag=N length=N malformed=N unverified=N`; `tag` counts what failed authentication: a
//!   block or rebuilt group whose digest does not match, a manifest whose path does not
//!   lead to the root, a probe without a valid tag).
//! - [`Transfer::status`] reports the worker's block counts (received, total) for the
//!   control session's periodic `TransferStatus`; the count only grows.
//! - The worker stops within one receive timeout (at most 100 ms) of [`Transfer::stop`].
//! - `Data` arrives on the shared group port; NACKs leave from, and `Repair`s and `Probe`s
//!   arrive on, a unicast socket of this transfer alone.
//! - NACKs carry a tag under this device's own NACK key (from the announce; a later announce
//!   replaces it, [`Transfer::set_nack_key`]); a `Probe` counts
//!   only with a valid tag under that key, and its cookie is then echoed in the NACKs.

use std::fs::File;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use fleetcast_wire::mcast::{
    OverflowReporter, ReceiverConfig, ReceiverEvent, DEFAULT_OVERFLOW_INTERVAL,
};
use fleetcast_wire::{
    Announce, DataBlock, DigestRoot, Error as WireError, Frame, Instant, Kind, Manifest,
    McastReceiver, Message, Outcome, Parity, Probe, Ranges, TransferState, TransferStatus, TAG_LEN,
};
use ring::hmac;

use crate::imaging::ImagePlan;
use crate::legacy;
use crate::record::{self, Corrupt, TransferRecord, TRANSFER_MAGIC, TRANSFER_VERSION};
use crate::verify::{Verdict, Verifier};

mod dest;
use dest::Dest;

/// Longest receive wait, so a stop request is seen promptly.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// Datagrams read from one socket per turn before timers run again.
const DRAIN: usize = 256;
/// While datagrams stream in, a receiver that drained its sockets sleeps this long instead
/// of waiting in `epoll`, so the kernel queues a batch rather than waking it for nearly
/// every datagram: each wake is a context switch here and, at the sender, a wake-up per
/// receiver per datagram in the softirq that delivers it (with 16 receivers, most of both
/// sides' CPU). 0.5 ms is 44 KB at 700 Mbit/s, far inside the socket buffers (8 MiB asked,
/// at least the kernel's default of about 200 KiB given).
const COALESCE: Duration = Duration::from_micros(500);
/// Times a copy whose digest does not match is received again before the mismatch is
/// reported.
const MISMATCH_RETRIES: u32 = 2;
/// Whether this build takes part in FEC repair (cargo feature `fec`, on by default).
const FEC: bool = cfg!(feature = "fec");

/// The parity codec: Reed–Solomon with the `fec` feature.
#[cfg(feature = "fec")]
type Codec = fleetcast_wire::mcast::ReedSolomon;

/// Without the `fec` feature no parity is accepted ([`FEC`]), so the receiver core never
/// hands out a decode job; this stands in for the codec on that path, and the codec crate is
/// not compiled at all.
#[cfg(not(feature = "fec"))]
#[derive(Debug, Default)]
struct Codec;

#[cfg(not(feature = "fec"))]
impl fleetcast_wire::mcast::Fec for Codec {
    fn encode(
        &mut self,
        _: &[&[u8]],
        _: &mut [&mut [u8]],
    ) -> Result<(), fleetcast_wire::mcast::FecError> {
        Err(fleetcast_wire::mcast::FecError::Unsupported)
    }

    fn decode(
        &mut self,
        _: &[Option<&[u8]>],
        _: usize,
        _: &[(usize, &[u8])],
        _: &mut [&mut [u8]],
    ) -> Result<(), fleetcast_wire::mcast::FecError> {
        Err(fleetcast_wire::mcast::FecError::Unsupported)
    }
}
/// Datagrams per `recvmmsg` call.
const BATCH: usize = 32;

/// Caller-owned buffers for receiving up to [`BATCH`] datagrams with one `recvmmsg`.
struct RecvBatch {
    /// `BATCH` slots of `slot` bytes.
    bufs: Vec<u8>,
    slot: usize,
    lens: [usize; BATCH],
    /// The slot's datagram was longer than the slot (cut: never a valid block).
    truncated: [bool; BATCH],
    from: [libc::sockaddr_in; BATCH],
    /// Ancillary data per slot: room for the `SO_RXQ_OVFL` drop count.
    control: [[u64; CONTROL_WORDS]; BATCH],
    /// The highest drop count the last call's datagrams carried (`SO_RXQ_OVFL`: the socket's
    /// cumulative count when the datagram was queued; 0 if none carried one).
    drops: u32,
}

/// `u64` words of ancillary data per datagram: `CMSG_SPACE(4)` is 16 bytes on 64-bit Linux
/// and 12 on 32-bit; 4 words leave room for one more unexpected message.
const CONTROL_WORDS: usize = 4;

impl RecvBatch {
    /// Slots fit a whole datagram of `block_size` (and a little more, so an oversized one is
    /// seen as truncated rather than cut silently into a valid-looking length).
    fn new(block_size: u32) -> RecvBatch {
        let slot = block_size as usize + 256;
        RecvBatch {
            bufs: vec![0; slot * BATCH],
            slot,
            lens: [0; BATCH],
            truncated: [false; BATCH],
            // SAFETY: sockaddr_in is plain data; all-zero is valid.
            from: [unsafe { std::mem::zeroed() }; BATCH],
            control: [[0; CONTROL_WORDS]; BATCH],
            drops: 0,
        }
    }

    /// Receives up to `max` datagrams without blocking; returns how many (0: would block).
    fn recv(&mut self, fd: i32, max: usize) -> io::Result<usize> {
        let n = max.min(BATCH);
        let mut iovs: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let base = self.bufs.as_mut_ptr();
        for i in 0..n {
            // SAFETY: slot i lies within `bufs` (BATCH slots of `slot` bytes).
            iovs[i].iov_base = unsafe { base.add(i * self.slot) }.cast();
            iovs[i].iov_len = self.slot;
            let h = &mut hdrs[i].msg_hdr;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_name = (&mut self.from[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_control = self.control[i].as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of::<[u64; CONTROL_WORDS]>() as _;
        }
        loop {
            // SAFETY: every header points at live buffers of `self` and `iovs` for the call.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    // glibc declares the flags `int`, musl `unsigned int`.
                    libc::MSG_DONTWAIT as _,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                let got = r as usize;
                self.drops = 0;
                for (i, h) in hdrs.iter().enumerate().take(got) {
                    self.lens[i] = (h.msg_len as usize).min(self.slot);
                    self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
                    self.drops = self.drops.max(rxq_ovfl(&h.msg_hdr));
                }
                return Ok(got);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        }
    }

    /// The highest drop count the last call's datagrams carried.
    fn drops(&self) -> u32 {
        self.drops
    }

    /// Datagram `i` of the last call and its source.
    fn get(&self, i: usize) -> (&[u8], SocketAddrV4) {
        let f = &self.from[i];
        let from = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(f.sin_addr.s_addr)),
            u16::from_be(f.sin_port),
        );
        (
            &self.bufs[i * self.slot..i * self.slot + self.lens[i]],
            from,
        )
    }
}

/// The `SO_RXQ_OVFL` count a received message's ancillary data carries, or 0 (the kernel
/// attaches it only once the socket has dropped something).
fn rxq_ovfl(h: &libc::msghdr) -> u32 {
    let mut drops = 0;
    // SAFETY: `h` is a header the kernel filled in by `recvmmsg`, its control pointer and
    // length describing a live buffer of the batch; the CMSG macros walk only within it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_RXQ_OVFL {
                drops = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>());
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    drops
}

/// Asks the kernel for the socket's drop count with every datagram (`SO_RXQ_OVFL`); the
/// overflow reports depend on it, the transfer does not.
fn want_drop_counts(s: &socket2::Socket) {
    set_int_option(s, libc::SO_RXQ_OVFL, 1);
}

/// Sets the `SOL_SOCKET` option `name` to `v`; whether the kernel took it.
fn set_int_option(s: &socket2::Socket, name: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: setsockopt reads a c_int from a live local for the given length.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// What an announce asks this device to receive: the announce itself (owned), and where this
/// device receives it.
#[derive(Debug, Clone)]
pub struct TransferSpec {
    /// The announce, as received. Its group must be IPv4 (checked by [`Transfer::spawn`]); its
    /// name is reduced to one path component ([`safe_name`]) before it names a file.
    pub announce: Announce<'static>,
    /// This device (carried in NACKs).
    pub device_id: u64,
    /// Local address of the control connection: the interface to join the group on.
    pub local: Ipv4Addr,
    /// Where NACKs go until a block reveals the sender's address.
    pub gateway: SocketAddrV4,
    /// Downloads directory.
    pub dir: PathBuf,
    /// An image push's checked plan (`imaging::plan`): the blocks go to its target, not to
    /// a file in `dir` (which still holds the record and the markers).
    pub image: Option<ImagePlan>,
}

impl TransferSpec {
    /// The file name: the announce's, as one safe path component.
    fn name(&self) -> String {
        safe_name(&self.announce.name, self.announce.task_id)
    }
}

/// How a transfer ended, for the `Completion` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferDone {
    /// Task id.
    pub task_id: u64,
    /// Session id.
    pub session: u32,
    /// Verified, or why not.
    pub outcome: Outcome,
    /// Digest of the received copy (zero if it could not be computed).
    pub sha256: [u8; 32],
    /// Detail for failures.
    pub reason: String,
}

/// A running transfer.
#[derive(Debug)]
pub struct Transfer {
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    task_id: u64,
    session: u32,
    rx: mpsc::Receiver<TransferDone>,
    handle: Option<JoinHandle<()>>,
    digests: Option<DigestRoot>,
    /// The NACK key the worker tags with (replaced by a later announce).
    nack_key: Arc<Mutex<Option<[u8; 32]>>>,
}

/// Block counts the worker publishes for the control session's `TransferStatus` reports
/// (written by the worker, read by the driver; counts only, no positions).
#[derive(Debug, Default)]
struct Progress {
    received: AtomicU32,
    total: AtomicU32,
    /// The next NACK's sequence number, kept across receptions of one transfer (the gateway
    /// takes a number it has seen for a replay).
    nack_seq: AtomicU32,
    /// The drops the kernel counted on this transfer's sockets so far, over every reception
    /// (the overflow reports' count only grows).
    drops: AtomicU64,
}

/// A file name from an announce reduced to one safe path component.
pub fn safe_name(name: &str, task_id: u64) -> String {
    let base = name.rsplit('/').next().unwrap_or("");
    if base.is_empty() || base == "." || base == ".." || base.contains('\0') {
        format!("task-{task_id}")
    } else {
        base.to_string()
    }
}

impl Transfer {
    /// Opens the socket (errors surface here) and starts the worker.
    pub fn spawn(spec: TransferSpec) -> io::Result<Transfer> {
        std::fs::create_dir_all(&spec.dir)?;
        let socks = open_sockets(&spec)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let digests = spec.announce.digests;
        let nack_key = Arc::new(Mutex::new(spec.announce.nack_key));
        let worker_key = nack_key.clone();
        let (task_id, session) = (spec.announce.task_id, spec.announce.session);
        let flag = stop.clone();
        let progress = Arc::new(Progress::default());
        let published = progress.clone();
        let handle = std::thread::Builder::new()
            .name(format!("transfer-{}", spec.announce.task_id))
            .spawn(move || {
                let shared = (&*published, &*worker_key);
                let done = run(&spec, socks, &flag, shared).unwrap_or_else(|e| TransferDone {
                    task_id: spec.announce.task_id,
                    session: spec.announce.session,
                    outcome: Outcome::WriteFailed,
                    sha256: [0; 32],
                    reason: e.to_string(),
                });
                if !flag.load(Ordering::Relaxed) {
                    let _ = tx.send(done);
                }
            })?;
        Ok(Transfer {
            stop,
            progress,
            task_id,
            session,
            rx,
            handle: Some(handle),
            digests,
            nack_key,
        })
    }

    /// The result, once the worker has finished.
    pub fn try_finish(&mut self) -> Option<TransferDone> {
        let d = self.rx.try_recv().ok()?;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        Some(d)
    }

    /// Progress for a `TransferStatus` report: blocks received and written so far, of the
    /// file's total (`InProgress`; both zero until the worker has opened its record).
    pub fn status(&self) -> TransferStatus {
        TransferStatus {
            task_id: self.task_id,
            session: self.session,
            state: TransferState::InProgress,
            received: self.progress.received.load(Ordering::Relaxed),
            total: self.progress.total.load(Ordering::Relaxed),
        }
    }

    /// The Merkle root (and manifest size) this transfer checks blocks against.
    pub fn digests(&self) -> Option<DigestRoot> {
        self.digests
    }

    /// The NACK key of a later announce (a new control session): the worker tags its NACKs
    /// with it from now on (the gateway no longer accepts the old one).
    pub fn set_nack_key(&self, key: Option<[u8; 32]>) {
        if let Ok(mut k) = self.nack_key.lock() {
            *k = key;
        }
    }

    /// Stops the worker (its progress is persisted) and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The group socket (`0.0.0.0:port`, joined to a multicast group, or not for a broadcast;
/// receives `Data`) and this transfer's own
/// unicast socket (ephemeral port: sends NACKs, receives the `Repair`s they ask for; a port
/// of its own, because several transfers share the group port and unicast to a shared port
/// would reach only one of them).
fn open_sockets(spec: &TransferSpec) -> io::Result<(UdpSocket, UdpSocket)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, spec.announce.port)).into())?;
    // Join on the interface of the control connection, never on whatever the routing picks.
    let IpAddr::V4(group) = spec.announce.group else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "only IPv4 multicast is supported",
        ));
    };
    // A group that is not multicast is the subnet-directed broadcast of the gateway's
    // interface (`push --broadcast`): the socket, bound to the port on every address,
    // receives it as it is; there is no group to join. The tags say what is the gateway's.
    if group.is_multicast() {
        s.join_multicast_v4(&group, &spec.local)?;
        s.set_multicast_if_v4(&spec.local)?;
    }
    let got = grow_recv_buffer(&s, RECV_BUFFER);
    if got < RECV_BUFFER_LOW {
        crate::say!(
            "task {}: receive buffer only {got} bytes (net.core.rmem_max): a fast push can overflow it; raise net.core.rmem_max to {RECV_BUFFER}",
            spec.announce.task_id
        );
    }
    want_drop_counts(&s);
    s.set_nonblocking(true)?;
    let u = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    u.bind(&SocketAddr::V4(SocketAddrV4::new(spec.local, 0)).into())?;
    grow_recv_buffer(&u, RECV_BUFFER);
    want_drop_counts(&u);
    u.set_nonblocking(true)?;
    Ok((s.into(), u.into()))
}

/// Receive buffer asked for: 8 MiB holds some 30 ms of a 2 Gbit/s push, enough to ride out a
/// scheduling hiccup of the receiving thread (a jumbo datagram takes 12 KiB or more of
/// buffer, so the kernel's default of about 200 KiB holds a mere 16 of them).
const RECV_BUFFER: usize = 8 << 20;
/// Below this the agent says the buffer is small (and how to raise it).
const RECV_BUFFER_LOW: usize = 2 << 20;

/// Sets the socket's receive buffer to `bytes`: beyond `net.core.rmem_max` when the agent
/// may (`SO_RCVBUFFORCE`, with `CAP_NET_ADMIN`, as a root agent has), else up to that limit.
/// Returns the size the kernel gives (it counts its own overhead: about twice the request).
fn grow_recv_buffer(s: &socket2::Socket, bytes: usize) -> usize {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let forced = set_int_option(s, libc::SO_RCVBUFFORCE, v);
    if !forced {
        let _ = s.set_recv_buffer_size(bytes);
    }
    s.recv_buffer_size().unwrap_or(0)
}

/// Why a datagram on a transfer's sockets was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    /// The frame's CRC did not match.
    Crc,
    /// Not a data or repair frame, or too short to be one (CRC aside).
    Malformed,
    /// A block of another session (another task, or one replayed from an earlier push).
    Session,
    /// Failed authentication: a block (or rebuilt group) whose digest does not match, a
    /// manifest whose path does not lead to the root, a probe without a valid tag.
    Tag,
    /// Outside the file, or not the block's exact length.
    Length,
}

/// Datagrams a transfer dropped, by reason; logged once when the transfer ends.
///
/// The group port is shared by every transfer of a device, so blocks of a concurrent task
/// count under `session` too.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Failed the CRC check.
    pub crc: u64,
    /// Not a data or repair frame.
    pub malformed: u64,
    /// Named another session.
    pub session: u64,
    /// Failed authentication (see [`Reject::Tag`]).
    pub tag: u64,
    /// Outside the file or of the wrong length.
    pub length: u64,
    /// Blocks whose manifest was missing and that the bounded buffer could not hold (they
    /// stay missing and are NACKed); not forged as far as anyone can tell.
    pub unverified: u64,
}

impl Dropped {
    fn count(&mut self, why: Reject) {
        let c = match why {
            Reject::Crc => &mut self.crc,
            Reject::Malformed => &mut self.malformed,
            Reject::Session => &mut self.session,
            Reject::Tag => &mut self.tag,
            Reject::Length => &mut self.length,
        };
        *c += 1;
    }
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "crc={} session={} tag={} length={} malformed={} unverified={}",
            self.crc, self.session, self.tag, self.length, self.malformed, self.unverified
        )
    }
}

/// The block a datagram carries, if it is well-formed for this transfer: it parsed (CRC),
/// names the session and has the block's exact length. Checked in that order; the first
/// failure is the reason. (Whether it is the block is its digest's business.)
fn accept_block<'a>(
    spec: &TransferSpec,
    datagram: &'a [u8],
) -> Result<(Kind, u32, &'a [u8]), Reject> {
    let (kind, block, _) = DataBlock::parse(datagram).map_err(|e| match e {
        WireError::Checksum => Reject::Crc,
        _ => Reject::Malformed,
    })?;
    if block.session != spec.announce.session {
        return Err(Reject::Session);
    }
    let bs = u64::from(spec.announce.block_size);
    let off = u64::from(block.block) * bs;
    let want = spec.announce.size.saturating_sub(off).min(bs);
    if off >= spec.announce.size || block.payload.len() as u64 != want {
        return Err(Reject::Length);
    }
    Ok((kind, block.block, block.payload))
}

/// The cookie a `Probe` datagram carries, if it parsed (CRC) and carries a valid tag under
/// this device's NACK key (which names the task and the device).
fn accept_probe(nack_key: Option<&hmac::Key>, datagram: &[u8]) -> Result<Probe, Reject> {
    let (msg, frame) = Message::parse_datagram(datagram).map_err(|e| match e {
        WireError::Checksum => Reject::Crc,
        _ => Reject::Malformed,
    })?;
    let Message::Probe(p) = msg else {
        return Err(Reject::Malformed);
    };
    match nack_key {
        Some(k) if verify_tag(k, &frame) => Ok(p),
        _ => Err(Reject::Tag),
    }
}

/// Emits the receiver's due NACKs and overflow reports to `dest`, tagged under the current
/// NACK key.
fn send_nacks(
    (rx, reporter): (&mut McastReceiver, &mut OverflowReporter),
    now: impl Fn() -> Instant,
    nack_key: &Mutex<Option<[u8; 32]>>,
    bufs: (&mut Vec<u8>, &mut Vec<u8>),
    sock: &mio::net::UdpSocket,
    dest: SocketAddrV4,
) {
    let (nack, tagged) = bufs;
    let key = nack_key
        .lock()
        .ok()
        .and_then(|k| *k)
        .map(|k| hmac::Key::new(hmac::HMAC_SHA256, &k));
    loop {
        nack.clear();
        if rx.poll_transmit(now(), nack).is_none() {
            break;
        }
        send_tagged(nack, key.as_ref(), tagged, sock, dest);
    }
    loop {
        nack.clear();
        if reporter.poll_transmit(now(), nack).is_none() {
            return;
        }
        send_tagged(nack, key.as_ref(), tagged, sock, dest);
    }
}

/// Sends the feedback datagram `raw` (a NACK or an overflow report) to `dest`, tagged under
/// `key` when there is one.
fn send_tagged(
    raw: &[u8],
    key: Option<&hmac::Key>,
    tagged: &mut Vec<u8>,
    sock: &mio::net::UdpSocket,
    dest: SocketAddrV4,
) {
    let out: &[u8] = match key {
        Some(k) => {
            let Ok((msg, _)) = Message::parse_datagram(raw) else {
                return;
            };
            let need = msg.buffer_len().unwrap_or(0) + TAG_LEN;
            if tagged.len() < need {
                tagged.resize(need, 0);
            }
            match msg.emit_authenticated(tagged, |h, b| {
                let mut ctx = hmac::Context::with_key(k);
                ctx.update(h);
                ctx.update(b);
                let mut tag = [0u8; TAG_LEN];
                tag.copy_from_slice(&ctx.sign().as_ref()[..TAG_LEN]);
                tag
            }) {
                Ok(n) => &tagged[..n],
                Err(_) => return,
            }
        }
        None => raw,
    };
    let _ = sock.send_to(out, SocketAddr::V4(dest));
}

fn paths(spec: &TransferSpec) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let d = &spec.dir;
    let n = &spec.name();
    (
        d.join(format!("{n}.part")),
        d.join(format!(".{n}.task-{}.rec", spec.announce.task_id)),
        d.join(n),
        d.join(format!(".{n}.task-{}.done", spec.announce.task_id)),
    )
}

/// The received-block record of this transfer, if `path` holds one: the blocks to resume
/// from. A record of another task, geometry or digest is not this transfer's; one that does
/// not decode is said on stderr and ignored (the blocks are received again).
fn load_record(spec: &TransferSpec, path: &Path) -> Option<Ranges> {
    let raw = std::fs::read(path).ok()?;
    let rec = match decode_record(&raw) {
        Ok(rec) => rec,
        Err(e) => {
            crate::say!(
                "task {}: ignoring the record {}: {e}",
                spec.announce.task_id,
                path.display()
            );
            return None;
        }
    };
    let a = &spec.announce;
    ((rec.task_id, rec.size, rec.block_size, rec.sha256)
        == (a.task_id, a.size, a.block_size, a.sha256))
        .then_some(rec.received)
}

/// Every received-block record in the downloads directory `dir` that decodes (the task
/// finisher's account of what the device holds, task by task). A task whose `.done` marker
/// is there is finished and left out; a record that does not decode is not an account.
pub fn held_records(dir: &Path) -> Vec<TransferRecord> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<TransferRecord> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".rec")?;
            let done = dir.join(format!("{stem}.done"));
            if !name.starts_with('.') || !stem.contains(".task-") || done.exists() {
                return None;
            }
            decode_record(&std::fs::read(e.path()).ok()?).ok()
        })
        .collect();
    out.sort_by_key(|r| r.task_id);
    out
}

/// Retires the held record of `task_id` (its `.rec` file and the partial `<name>.part` it
/// describes) once the gateway answered that there is nothing more to receive for it
/// (completed at the gateway, or closed: failed, cancelled, not this device's). Without this,
/// the finisher would ask about the same dead record on every connect. Returns how many
/// records were retired; a record that is not there is not an error.
pub fn retire_record(dir: &Path, task_id: u64) -> io::Result<usize> {
    let suffix = format!(".task-{task_id}.rec");
    let mut retired = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some(file) = name
            .strip_suffix(&suffix)
            .and_then(|stem| stem.strip_prefix('.'))
        else {
            continue;
        };
        match std::fs::remove_file(dir.join(format!("{file}.part"))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::remove_file(entry.path())?;
        retired += 1;
    }
    if retired > 0 {
        fleetcast_os::sync_dir(dir)?;
    }
    Ok(retired)
}

/// A record file of either layout: today's ([`crate::record`]) or the one of before, which
/// has no envelope (`legacy.rs`).
fn decode_record(bytes: &[u8]) -> Result<TransferRecord, Corrupt> {
    match record::open(bytes, &TRANSFER_MAGIC) {
        Ok((TRANSFER_VERSION, r)) => TransferRecord::decode(r),
        Ok((v, _)) => Err(Corrupt::UnknownVersion(v)),
        Err(Corrupt::BadMagic) => legacy::transfer_record(bytes),
        Err(e) => Err(e),
    }
}

/// Replaces the record with `received`, atomically and durably (the caller made the blocks
/// it names durable first).
fn save_record(spec: &TransferSpec, path: &Path, received: Ranges) -> io::Result<()> {
    let a = &spec.announce;
    let rec = TransferRecord {
        task_id: a.task_id,
        size: a.size,
        block_size: a.block_size,
        sha256: a.sha256,
        received,
    };
    // A `Ranges` always encodes (its invariant keeps counts and gaps in range).
    let bytes = rec
        .encode()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    fleetcast_os::write_atomic(path, &bytes, 0o644)
}

fn file_sha256(path: &Path) -> io::Result<[u8; 32]> {
    let mut f = File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// The parity symbol a datagram carries, if well-formed for this transfer: it parsed (CRC),
/// names the session and is one block long. (Untagged: what it rebuilds is checked by
/// digest.)
fn accept_parity<'a>(spec: &TransferSpec, datagram: &'a [u8]) -> Result<Parity<'a>, Reject> {
    let (p, _) = Parity::parse(datagram).map_err(|e| match e {
        WireError::Checksum => Reject::Crc,
        _ => Reject::Malformed,
    })?;
    if p.session != spec.announce.session {
        return Err(Reject::Session);
    }
    if p.payload.len() != spec.announce.block_size as usize {
        return Err(Reject::Length);
    }
    Ok(p)
}

/// The manifest a datagram carries, if it parsed (CRC) and names the session.
fn accept_manifest<'a>(spec: &TransferSpec, datagram: &'a [u8]) -> Result<Manifest<'a>, Reject> {
    let m = Manifest::parse(datagram).map_err(|e| match e {
        WireError::Checksum => Reject::Crc,
        _ => Reject::Malformed,
    })?;
    if m.session != spec.announce.session {
        return Err(Reject::Session);
    }
    Ok(m)
}

fn verify_tag(key: &hmac::Key, frame: &Frame<'_>) -> bool {
    let Some(tag) = frame.tag else { return false };
    let (h8, body) = frame.mac_input();
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(h8);
    ctx.update(body);
    let sig = ctx.sign();
    sig.as_ref()[..TAG_LEN]
        .iter()
        .zip(tag.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// Writes the new blocks of one received batch, each run of blocks that follow one another
/// in the stream with one vectored write from the receive buffers (a first pass arrives in
/// order: one call per batch instead of one per block). `writes` are (block, slot of
/// `batch`, payload start in the datagram, length), in arrival order.
fn write_blocks(
    dest: &mut Dest,
    block_size: u32,
    batch: &RecvBatch,
    writes: &[(u32, usize, usize, usize)],
) -> io::Result<()> {
    let mut run: Vec<&[u8]> = Vec::with_capacity(BATCH);
    let mut i = 0;
    while i < writes.len() {
        run.clear();
        let first = writes[i].0;
        while let Some(&(_, j, at, len)) = writes
            .get(i + run.len())
            .filter(|w| u64::from(w.0) == u64::from(first) + run.len() as u64)
        {
            let (dgram, _) = batch.get(j);
            run.push(&dgram[at..at + len]);
        }
        dest.write_run(first, block_size, &run)?;
        i += run.len();
    }
    Ok(())
}

/// Length of block `b` of the transfer's file.
fn block_len(spec: &TransferSpec, b: u32) -> usize {
    let bs = u64::from(spec.announce.block_size);
    spec.announce.size.saturating_sub(u64::from(b) * bs).min(bs) as usize
}

/// Writes the blocks that waited for a manifest just verified, those whose digest matches
/// and that the core does not hold already; returns how many were forged.
fn write_held(
    spec: &TransferSpec,
    dest: &mut Dest,
    rx: &mut McastReceiver,
    verifier: &mut Verifier,
    held: Vec<(u32, Vec<u8>)>,
    now: Instant,
) -> io::Result<u64> {
    let mut forged = 0;
    for (b, payload) in held {
        if rx.has(b) {
            continue;
        }
        match verifier.block(b, &payload) {
            Verdict::Write => {
                dest.write_run(b, spec.announce.block_size, &[&payload])?;
                verifier.written(b);
                // A held block says nothing of how far the first pass has got.
                rx.handle_repair(now, b);
            }
            _ => forged += 1,
        }
    }
    Ok(forged)
}

/// What [`decode_groups`] did.
#[derive(Debug, Default)]
struct Decoded {
    groups: usize,
    rebuilt: u64,
    forged: u64,
    unverified: u64,
}

/// Rebuilds every group parity made whole: reads its present blocks back, decodes, checks
/// each rebuilt block against its digest and writes it. A group with a rebuilt block that
/// does not match (parity is untagged: a forged symbol rebuilds garbage) is discarded whole
/// and NACKed again ([`McastReceiver::discard_rebuilt`]); a rebuilt block whose manifest is
/// missing waits for it like a received one.
fn decode_groups(
    spec: &TransferSpec,
    dest: &mut Dest,
    rx: &mut McastReceiver,
    verifier: &mut Verifier,
    codec: &mut Codec,
    now: impl Fn() -> Instant,
) -> io::Result<Decoded> {
    let mut out = Decoded::default();
    let mut buf = Vec::new();
    while let Some(job) = rx.poll_decode().filter(|_| FEC) {
        buf.clear();
        buf.resize(job.buf_len(), 0);
        let bs = job.block_size as usize;
        for k in 0..job.blocks {
            let b = job.first_block + k;
            if rx.has(b) {
                let at = k as usize * bs;
                let len = block_len(spec, b);
                dest.read_block(b, job.block_size, &mut buf[at..at + len])?;
            }
        }
        let rebuilt = match rx.decode(now(), codec, job.group, &mut buf) {
            Ok(r) => r,
            Err(e) => {
                crate::say!(
                    "task {}: group {} not rebuilt: {e}",
                    spec.announce.task_id,
                    job.group
                );
                break;
            }
        };
        out.groups += 1;
        let slot = |b: u32| {
            let at = (b - job.first_block) as usize * bs;
            at..at + block_len(spec, b)
        };
        let blocks = || {
            rebuilt
                .as_slice()
                .iter()
                .flat_map(|r| r.start..r.start + r.len)
        };
        if blocks().any(|b| verifier.rebuilt(b, &buf[slot(b)]) == Some(false)) {
            out.forged += 1;
            rx.discard_rebuilt(now(), &rebuilt);
            continue;
        }
        let mut waiting = Ranges::new();
        for b in blocks() {
            if verifier.rebuilt(b, &buf[slot(b)]).is_none() {
                if !verifier.hold(b, &buf[slot(b)]) {
                    out.unverified += 1;
                }
                let _ = waiting.push(b, 1);
                continue;
            }
            dest.write_run(b, job.block_size, &[&buf[slot(b)]])?;
            verifier.written(b);
            out.rebuilt += 1;
        }
        if !waiting.is_empty() {
            rx.discard_rebuilt(now(), &waiting);
        }
    }
    Ok(out)
}

fn done(spec: &TransferSpec, outcome: Outcome, sha256: [u8; 32], reason: String) -> TransferDone {
    TransferDone {
        task_id: spec.announce.task_id,
        session: spec.announce.session,
        outcome,
        sha256,
        reason,
    }
}

/// The worker: receive until complete (or stopped), then verify and rename.
/// Receives, and repairs a copy whose digest does not match by receiving it again from
/// scratch (at most [`MISMATCH_RETRIES`] times) rather than reporting it: only a verified copy,
/// or a mismatch that persists, is reported.
fn run(
    spec: &TransferSpec,
    socks: (UdpSocket, UdpSocket),
    stop: &AtomicBool,
    (progress, nack_key): (&Progress, &Mutex<Option<[u8; 32]>>),
) -> io::Result<TransferDone> {
    let mut attempt = 0;
    loop {
        let d = run_once(
            spec,
            (socks.0.try_clone()?, socks.1.try_clone()?),
            stop,
            (progress, nack_key),
        )?;
        if d.outcome != Outcome::DigestMismatch
            || attempt >= MISMATCH_RETRIES
            || stop.load(Ordering::Relaxed)
        {
            return Ok(d);
        }
        attempt += 1;
        crate::say!(
            "task {}: {} — receiving it again (attempt {attempt} of {MISMATCH_RETRIES})",
            spec.announce.task_id,
            d.reason
        );
        progress.received.store(0, Ordering::Relaxed);
    }
}

#[allow(clippy::disallowed_methods)] // The transfer worker's clock: its one time source.
fn run_once(
    spec: &TransferSpec,
    (group_sock, unicast): (UdpSocket, UdpSocket),
    stop: &AtomicBool,
    (progress, nack_key): (&Progress, &Mutex<Option<[u8; 32]>>),
) -> io::Result<TransferDone> {
    let (part, rec, fin, marker) = paths(spec);
    // A task finished before (agent restarted, or the completion was lost): re-verify.
    if let Some(d) = verify_finished(spec, &fin, &marker)? {
        return Ok(d);
    }
    let epoch = std::time::Instant::now();
    let now = || Instant::from_micros(epoch.elapsed().as_micros() as u64);
    let mut dest = Dest::open(
        spec.image.as_ref(),
        &part,
        spec.announce.size,
        spec.announce.block_size,
    )?;
    let initial = load_record(spec, &rec);
    if let Some(r) = &initial {
        dest.resume(r)?;
    }
    let seed =
        spec.device_id ^ spec.announce.task_id.rotate_left(32) ^ epoch.elapsed().as_nanos() as u64;
    let cfg = ReceiverConfig {
        first_seq: progress.nack_seq.load(Ordering::Relaxed).max(1),
        fec_group: spec.announce.fec_group,
        ..ReceiverConfig::new(
            spec.announce.session,
            spec.device_id,
            spec.announce.size,
            spec.announce.block_size,
            seed,
        )
    };
    let mut rx = McastReceiver::new(cfg, initial.as_ref(), now())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    // The kernel's drops on this reception's sockets (each count from 0), above the earlier
    // receptions' total.
    let drops_base = progress.drops.load(Ordering::Relaxed);
    let mut sock_drops = [0u64; 2];
    let mut reporter = OverflowReporter::new(
        spec.announce.session,
        spec.device_id,
        drops_base,
        DEFAULT_OVERFLOW_INTERVAL,
    );
    let publish = |rx: &McastReceiver| {
        progress
            .received
            .store(rx.blocks_received(), Ordering::Relaxed);
    };
    progress.total.store(rx.n_blocks(), Ordering::Relaxed);
    publish(&rx);
    if initial.is_some() {
        crate::say!(
            "task {}: resuming with {} of {} blocks from the record",
            spec.announce.task_id,
            rx.blocks_received(),
            rx.n_blocks()
        );
    }
    let mut verifier = Verifier::new(&spec.announce, rx.n_blocks())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut poll = mio::Poll::new()?;
    let mut events = mio::Events::with_capacity(4);
    let mut group_sock = mio::net::UdpSocket::from_std(group_sock);
    let mut unicast = mio::net::UdpSocket::from_std(unicast);
    poll.registry()
        .register(&mut group_sock, mio::Token(0), mio::Interest::READABLE)?;
    poll.registry()
        .register(&mut unicast, mio::Token(1), mio::Interest::READABLE)?;
    let mut nack_dest = spec.gateway;
    let mut batch = RecvBatch::new(spec.announce.block_size);
    let (persist_tx, persist_rx) = mpsc::sync_channel::<Ranges>(1);
    let persister = {
        let (files, spec, rec) = (dest.handles()?, spec.clone(), rec.clone());
        std::thread::Builder::new()
            .name(format!("fleetcast-persist-{}", spec.announce.task_id))
            .spawn(move || {
                for snapshot in persist_rx {
                    if files.iter().all(|f| f.sync_data().is_ok()) {
                        let _ = save_record(&spec, &rec, snapshot);
                    }
                }
            })?
    };
    // One expression for both codecs (without `fec` the stand-in is a unit struct).
    #[allow(clippy::default_constructed_unit_structs)]
    let mut codec = Codec::default();
    let mut rebuilt_blocks = 0u64;
    let mut nack = Vec::new();
    let mut tagged = vec![0u8; 4096];
    // New blocks of the batch being read: (file offset, slot, payload start, length).
    let mut writes: Vec<(u32, usize, usize, usize)> = Vec::with_capacity(BATCH);
    let mut complete = rx.is_complete();
    // Whether the last turn that read anything was the one before (see COALESCE).
    let mut streaming = false;
    let mut dropped = Dropped::default();
    let log_dropped = |d: &Dropped| {
        crate::say!("transfer {}: dropped {d}", spec.announce.task_id);
    };
    while !complete {
        if stop.load(Ordering::Relaxed) {
            log_dropped(&dropped);
            // The persister first (so no older snapshot lands after this one), then the
            // final record, after the data.
            drop(persist_tx);
            let _ = persister.join();
            dest.sync()?;
            save_record(spec, &rec, rx.received().clone())?;
            return Ok(done(spec, Outcome::Aborted, [0; 32], "stopped".into()));
        }
        let t = now();
        if rx.poll_timeout().is_some_and(|d| d <= t) {
            rx.handle_timeout(t);
        }
        // Drive the core: NACKs out, then events.
        let bufs = (&mut nack, &mut tagged);
        send_nacks(
            (&mut rx, &mut reporter),
            now,
            nack_key,
            bufs,
            &unicast,
            nack_dest,
        );
        progress.nack_seq.store(rx.next_seq(), Ordering::Relaxed);
        while let Some(ev) = rx.poll_event() {
            match ev {
                ReceiverEvent::PersistDue => {
                    // The record may only name blocks that are durable: the persister makes
                    // the file durable, then writes this snapshot (its blocks were all
                    // written before it was taken). Off this thread, so an fdatasync of a
                    // second's worth of data never stalls the sockets; if the persister is
                    // still busy, this round is skipped (the next record covers it).
                    let _ = persist_tx.try_send(rx.received().clone());
                }
                ReceiverEvent::Complete => complete = true,
            }
        }
        if complete {
            break;
        }
        // Drain both sockets (bounded per turn, so timers run); sleep only when both are
        // empty (mio is edge-triggered: a socket is polled only after it said WouldBlock).
        let mut got = 0usize;
        for (i, sock) in [&group_sock, &unicast].into_iter().enumerate() {
            let mut n_read = 0;
            while n_read < DRAIN {
                let got = batch.recv(sock.as_raw_fd(), DRAIN - n_read)?;
                if got == 0 {
                    break;
                }
                n_read += got;
                sock_drops[i] = sock_drops[i].max(u64::from(batch.drops()));
                let t = now();
                writes.clear();
                for j in 0..got {
                    let (dgram, from) = batch.get(j);
                    // Parity (FEC repair) only in builds with the `fec` feature (the default):
                    // without it the codec is not built and parity counts as malformed.
                    if i == 1 && !batch.truncated[j] && dgram.get(2) == Some(&(Kind::Probe as u8)) {
                        // The gateway asks us to prove we receive here: echo its cookie.
                        let k = nack_key.lock().ok().and_then(|k| *k);
                        let k = k.map(|k| hmac::Key::new(hmac::HMAC_SHA256, &k));
                        match accept_probe(k.as_ref(), dgram) {
                            Ok(p) => rx.handle_probe(t, p.cookie),
                            Err(why) => dropped.count(why),
                        }
                        continue;
                    }
                    if !batch.truncated[j] && dgram.get(2) == Some(&(Kind::Manifest as u8)) {
                        let r = accept_manifest(spec, dgram).and_then(|m| {
                            let held = verifier.manifest(&m, |b| rx.has(b));
                            held.map_err(|_| Reject::Tag)
                        });
                        match r {
                            Ok(held) => {
                                write_held(spec, &mut dest, &mut rx, &mut verifier, held, t)
                                    .map(|forged| dropped.tag += forged)?;
                            }
                            Err(why) => dropped.count(why),
                        }
                        continue;
                    }
                    if FEC && !batch.truncated[j] && dgram.get(2) == Some(&(Kind::Parity as u8)) {
                        match accept_parity(spec, dgram) {
                            Ok(p) => {
                                rx.handle_parity(t, &p);
                            }
                            Err(why) => dropped.count(why),
                        }
                        continue;
                    }
                    let accepted = if batch.truncated[j] {
                        Err(Reject::Length)
                    } else {
                        accept_block(spec, dgram)
                    };
                    let (kind, block, payload) = match accepted {
                        Ok(b) => b,
                        Err(why) => {
                            dropped.count(why);
                            continue;
                        }
                    };
                    if i == 0 {
                        nack_dest = SocketAddrV4::new(*from.ip(), spec.announce.port);
                    }
                    if !rx.has(block) {
                        match verifier.block(block, payload) {
                            Verdict::Write => verifier.written(block),
                            Verdict::Forged => {
                                dropped.count(Reject::Tag);
                                continue;
                            }
                            Verdict::Held => continue,
                            Verdict::NotHeld => {
                                dropped.unverified += 1;
                                continue;
                            }
                        }
                        // Written with the batch's other new blocks (below), before anything
                        // reads the file back (parity decoding) or makes it durable.
                        let at = payload.as_ptr() as usize - dgram.as_ptr() as usize;
                        writes.push((block, j, at, payload.len()));
                        match kind {
                            Kind::Repair => rx.handle_repair(t, block),
                            _ => rx.handle_block(t, block),
                        };
                    }
                }
                write_blocks(&mut dest, spec.announce.block_size, &batch, &writes)?;
            }
            // Groups that parity made whole: read their present blocks back, rebuild the
            // missing ones, check and write them.
            let decoded = decode_groups(spec, &mut dest, &mut rx, &mut verifier, &mut codec, now)?;
            rebuilt_blocks += decoded.rebuilt;
            dropped.tag += decoded.forged;
            dropped.unverified += decoded.unverified;
            n_read += decoded.groups;
            if n_read > 0 {
                publish(&rx);
            }
            got += n_read;
        }
        reporter.observe(drops_base + sock_drops[0] + sock_drops[1]);
        progress.drops.store(reporter.drops(), Ordering::Relaxed);
        if got > 0 {
            streaming = true;
        } else if !rx.is_complete() {
            let t = now();
            let due = rx
                .poll_timeout()
                .into_iter()
                .chain(reporter.poll_timeout())
                .min()
                .map_or(MAX_WAIT, |d| d.saturating_duration_since(t));
            if streaming && due > COALESCE {
                // Data came in the last turn: let the next batch gather (see COALESCE). A
                // turn that then finds nothing goes back to waiting in `epoll`.
                streaming = false;
                std::thread::sleep(COALESCE);
            } else {
                let wait = due.clamp(Duration::from_millis(1), MAX_WAIT);
                match poll.poll(&mut events, Some(wait)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        complete = rx.is_complete();
    }
    log_dropped(&dropped);
    drop(persist_tx);
    let _ = persister.join();
    if rebuilt_blocks > 0 {
        crate::say!(
            "transfer {}: rebuilt {rebuilt_blocks} blocks from parity",
            spec.announce.task_id
        );
    }
    dest.sync()?;
    if let Some(plan) = &spec.image {
        return finish_image(spec, plan, &dest, (&rec, &marker));
    }
    drop(dest);
    // Every block of a copy received in this run was checked against its digest before it
    // was written, and the digests against the announce's root: the copy is the gateway's
    // file, whose SHA-256 the announce names, without reading it back. A copy resumed from
    // a record holds blocks of an earlier run, which were written before this run checked
    // anything (and may predate digests): it is read back once, whole.
    let digest = if verifier.checks() && initial.is_none() {
        spec.announce.sha256
    } else {
        file_sha256(&part)?
    };
    if digest != spec.announce.sha256 {
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_file(&rec);
        return Ok(done(
            spec,
            Outcome::DigestMismatch,
            digest,
            "SHA-256 of the received file differs from the announce".into(),
        ));
    }
    std::fs::rename(&part, &fin)?;
    File::create(&marker)?.sync_all()?;
    let _ = std::fs::remove_file(&rec);
    Ok(done(spec, Outcome::Verified, digest, String::new()))
}

/// An image received whole: its holes zeroed, the target read back (the digest of what the
/// disk holds, not of what was received), the marker written once it matches. A mismatch
/// drops the record (and the staged stream), so the next attempt receives it all again.
fn finish_image(
    spec: &TransferSpec,
    plan: &ImagePlan,
    dest: &Dest,
    (rec, marker): (&Path, &Path),
) -> io::Result<TransferDone> {
    let digest = dest.read_back_image()?.unwrap_or([0; 32]);
    if digest != plan.image_sha256 {
        let _ = std::fs::remove_file(rec);
        if let Some(stage) = &plan.stage {
            let _ = std::fs::remove_file(stage);
        }
        return Ok(done(
            spec,
            Outcome::DigestMismatch,
            digest,
            format!(
                "SHA-256 of the image read back from {} differs from the image's",
                plan.shown
            ),
        ));
    }
    File::create(marker)?.sync_all()?;
    let _ = std::fs::remove_file(rec);
    if let Some(stage) = &plan.stage {
        let _ = std::fs::remove_file(stage);
    }
    crate::say!(
        "task {}: image verified on {} (read back)",
        spec.announce.task_id,
        plan.shown
    );
    Ok(done(spec, Outcome::Verified, digest, String::new()))
}

/// The answer for a task finished before (the agent restarted, or its completion was
/// lost), if its marker is there: its copy (the file, or the image on its target) is
/// checked again. `None`: not finished, receive it.
fn verify_finished(
    spec: &TransferSpec,
    fin: &Path,
    marker: &Path,
) -> io::Result<Option<TransferDone>> {
    if !marker.exists() {
        return Ok(None);
    }
    let (digest, want) = match &spec.image {
        None if fin.exists() => (file_sha256(fin)?, spec.announce.sha256),
        None => return Ok(None),
        Some(plan) => {
            // Opened without its staging file: reading a finished image needs none.
            let block = spec.announce.block_size;
            let digest = crate::sink::Sink::open(&plan.path, None, plan.form.clone(), block)
                .and_then(|s| s.read_back())
                .map_err(|e| io::Error::other(e.to_string()))?;
            (digest, plan.image_sha256)
        }
    };
    if digest == want {
        return Ok(Some(done(spec, Outcome::Verified, digest, String::new())));
    }
    // Receive it again: the marker goes, so the next attempt starts from scratch.
    let _ = std::fs::remove_file(marker);
    Ok(Some(done(
        spec,
        Outcome::DigestMismatch,
        digest,
        "the copy changed since it was received".into(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// The finisher's account: every record that decodes, by task, without finished tasks
    /// (their `.done` marker is there) or files that are not records.
    #[test]
    fn held_records_are_the_decodable_unfinished_ones() {
        let dir = tempfile::tempdir().unwrap();
        let rec = |task_id| {
            let mut received = Ranges::new();
            received.push(0, 3).unwrap();
            TransferRecord {
                task_id,
                size: 10_000,
                block_size: 1000,
                sha256: [task_id as u8; 32],
                received,
            }
        };
        let put = |name: &str, bytes: &[u8]| fs::write(dir.path().join(name), bytes).unwrap();
        put(".b.bin.task-9.rec", &rec(9).encode().unwrap());
        put(".a.bin.task-4.rec", &rec(4).encode().unwrap());
        put(".c.bin.task-5.rec", &rec(5).encode().unwrap());
        put(".c.bin.task-5.done", b"");
        put(".d.bin.task-6.rec", b"not a record");
        put("e.rec", &rec(7).encode().unwrap());
        assert_eq!(held_records(dir.path()), vec![rec(4), rec(9)]);
        assert!(held_records(&dir.path().join("gone")).is_empty());
    }

    #[test]
    fn a_retired_record_is_gone_with_its_partial_file_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let rec = |task_id| {
            let mut received = Ranges::new();
            received.push(0, 3).unwrap();
            TransferRecord {
                task_id,
                size: 10_000,
                block_size: 1000,
                sha256: [task_id as u8; 32],
                received,
            }
        };
        let put = |name: &str, bytes: &[u8]| fs::write(dir.path().join(name), bytes).unwrap();
        put(".b.bin.task-9.rec", &rec(9).encode().unwrap());
        put("b.bin.part", b"partial");
        put(".a.bin.task-19.rec", &rec(19).encode().unwrap());
        put("a.bin.part", b"partial");
        put("b.bin", b"a verified file of another task stays");
        assert_eq!(retire_record(dir.path(), 9).unwrap(), 1);
        assert_eq!(held_records(dir.path()), vec![rec(19)]);
        assert!(!dir.path().join("b.bin.part").exists());
        assert!(dir.path().join("a.bin.part").exists());
        assert!(dir.path().join("b.bin").exists());
        // Again: nothing left to retire, and that is not an error.
        assert_eq!(retire_record(dir.path(), 9).unwrap(), 0);
    }

    /// A batch's new blocks land where they belong whatever their order: runs that follow
    /// one another go in one call, gaps and blocks out of order in calls of their own.
    #[test]
    fn batch_writes_put_every_block_at_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bs = 100usize;
        let mut dest = Dest::open(None, &path, 10 * bs as u64, bs as u32).unwrap();
        let mut batch = RecvBatch::new(bs as u32);
        // Datagrams of 7 header bytes then the block filled with its number.
        let order = [2u8, 3, 4, 0, 7, 8, 5];
        let mut writes = Vec::new();
        for (j, &b) in order.iter().enumerate() {
            let slot = &mut batch.bufs[j * batch.slot..(j + 1) * batch.slot];
            slot[..7].fill(0xee);
            slot[7..7 + bs].fill(b + 1);
            batch.lens[j] = 7 + bs;
            writes.push((u32::from(b), j, 7, bs));
        }
        write_blocks(&mut dest, bs as u32, &batch, &writes).unwrap();
        let got = std::fs::read(&path).unwrap();
        for b in 0..10u8 {
            let want = if order.contains(&b) { b + 1 } else { 0 };
            assert!(
                got[b as usize * bs..(b as usize + 1) * bs]
                    .iter()
                    .all(|&x| x == want),
                "block {b}"
            );
        }
    }

    #[test]
    fn names_are_one_component() {
        assert_eq!(safe_name("a/b/../c.bin", 3), "c.bin");
        assert_eq!(safe_name("..", 3), "task-3");
        assert_eq!(safe_name("", 3), "task-3");
        assert_eq!(safe_name("x/", 4), "task-4");
    }

    fn spec(dir: &Path) -> TransferSpec {
        TransferSpec {
            announce: Announce {
                task_id: 1,
                session: 1,
                group: Ipv4Addr::new(239, 77, 0, 1).into(),
                port: 7301,
                size: 10_000,
                block_size: 1000,
                fec_group: 0,
                sha256: [3; 32],
                digests: None,
                nack_key: None,
                name: "f".into(),
                image: None,
            },
            device_id: 9,
            local: Ipv4Addr::LOCALHOST,
            gateway: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7301),
            dir: dir.into(),
            image: None,
        }
    }

    /// An untagged data datagram.
    fn datagram(session: u32, block: u32, payload: &[u8]) -> Vec<u8> {
        use fleetcast_wire::data::data_prefix;
        use fleetcast_wire::Kind;
        let mut d = data_prefix(Kind::Data, session, block, payload, None)
            .unwrap()
            .to_vec();
        d.extend_from_slice(payload);
        d
    }

    /// Framing rejects by reason; then a well-formed block is written only if its digest,
    /// from a manifest the root vouches for, matches; before its manifest it is held.
    #[test]
    fn forged_datagrams_are_rejected_by_reason() {
        use crate::verify::RingSha;
        use fleetcast_wire::mcast::digest::{block_digest, ManifestGeometry, MerkleTree};
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path());
        let file: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let digests: Vec<_> = file
            .chunks(1000)
            .enumerate()
            .map(|(b, p)| block_digest(&mut RingSha, b as u32, p))
            .collect();
        let geom = ManifestGeometry::new(10, 2).unwrap();
        let tree = MerkleTree::build(&mut RingSha, &geom, &digests);
        spec.announce.digests = Some(DigestRoot {
            root: tree.root(),
            per_manifest: 2,
        });
        let block = &file[1000..2000];
        let good = datagram(1, 1, block);
        let (k, b, p) = accept_block(&spec, &good).unwrap();
        assert_eq!((k, b, p), (Kind::Data, 1, block));

        let mut crc = good.clone();
        crc[100] ^= 1;
        let cases = [
            (crc, Reject::Crc),
            (datagram(2, 1, block), Reject::Session),
            (datagram(1, 1, &block[..999]), Reject::Length),
            (datagram(1, 10, block), Reject::Length),
            (good[..10].to_vec(), Reject::Malformed),
        ];
        let mut dropped = Dropped::default();
        for (d, why) in cases {
            let got = accept_block(&spec, &d).map(|_| ());
            assert_eq!(got, Err(why));
            dropped.count(why);
        }
        let mut v = Verifier::new(&spec.announce, 10).unwrap();
        assert!(v.checks());
        let forged = [0x5a; 1000];
        assert_eq!(v.block(1, &forged), Verdict::Held, "no manifest yet: held");
        assert_eq!(v.block(1, block), Verdict::Held);
        let mut path = Vec::new();
        tree.path_into(0, &mut path);
        let list = digests[..2].as_flattened();
        let m = Manifest {
            session: 1,
            index: 0,
            digests: list,
            path: &path,
        };
        let mut bad = list.to_vec();
        bad[0] ^= 1;
        let forged_m = Manifest { digests: &bad, ..m };
        assert!(v.manifest(&forged_m, |_| false).is_err());
        dropped.count(Reject::Tag);
        let held = v.manifest(&m, |_| false).unwrap();
        let verdicts: Vec<Verdict> = held.iter().map(|(b, p)| v.block(*b, p)).collect();
        assert_eq!(verdicts, [Verdict::Forged, Verdict::Write]);
        assert_eq!(v.block(0, &forged), Verdict::Forged);
        assert_eq!(v.block(0, &file[..1000]), Verdict::Write);
        // Far ahead, but within what the 2 MiB buffer holds of whole manifests: held.
        assert_eq!(v.block(9, &file[9000..]), Verdict::Held);
        dropped.count(Reject::Tag);
        dropped.unverified += 1;
        assert_eq!(
            dropped.to_string(),
            "crc=1 session=1 tag=2 length=2 malformed=1 unverified=1"
        );
        // An announce without a root authenticates nothing (tests and simulations only).
        spec.announce.digests = None;
        let mut none = Verifier::new(&spec.announce, 10).unwrap();
        assert!(!none.checks());
        assert_eq!(none.block(1, &forged), Verdict::Write);
    }

    /// `msg` as a datagram, tagged under `key` if given.
    fn emit(msg: &Message<'_>, key: Option<&hmac::Key>) -> Vec<u8> {
        let mut buf = vec![0u8; msg.buffer_len().unwrap() + TAG_LEN];
        let n = match key {
            Some(k) => msg
                .emit_authenticated(&mut buf, |h, b| {
                    let mut ctx = hmac::Context::with_key(k);
                    ctx.update(h);
                    ctx.update(b);
                    let mut tag = [0u8; TAG_LEN];
                    tag.copy_from_slice(&ctx.sign().as_ref()[..TAG_LEN]);
                    tag
                })
                .unwrap(),
            None => msg.emit(&mut buf).unwrap(),
        };
        buf.truncate(n);
        buf
    }

    #[test]
    fn probes_count_only_under_the_devices_nack_key() {
        let mine = hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]);
        let other = hmac::Key::new(hmac::HMAC_SHA256, &[8; 32]);
        let probe = Message::Probe(Probe { cookie: [0xC0; 8] });
        let good = emit(&probe, Some(&mine));
        assert_eq!(good.len(), 36, "a probe is smaller than any tagged NACK");
        assert_eq!(
            accept_probe(Some(&mine), &good),
            Ok(Probe { cookie: [0xC0; 8] })
        );
        // Anyone may send us a probe; only the gateway's (under our key) is echoed.
        assert_eq!(accept_probe(Some(&other), &good), Err(Reject::Tag));
        assert_eq!(
            accept_probe(Some(&mine), &emit(&probe, Some(&other))),
            Err(Reject::Tag)
        );
        assert_eq!(
            accept_probe(Some(&mine), &emit(&probe, None)),
            Err(Reject::Tag)
        );
        assert_eq!(accept_probe(None, &good), Err(Reject::Tag));
        let mut crc = good.clone();
        crc[14] ^= 1;
        assert_eq!(accept_probe(Some(&mine), &crc), Err(Reject::Crc));
        let nack = Message::Nack(fleetcast_wire::Nack {
            session: 1,
            device_id: 9,
            seq: 1,
            echo: None,
            missing: Ranges::new(),
        });
        assert_eq!(
            accept_probe(Some(&mine), &emit(&nack, Some(&mine))),
            Err(Reject::Malformed)
        );
    }

    #[test]
    fn records_round_trip_and_reject_other_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        let p = dir.path().join("rec");
        let mut r = Ranges::new();
        r.push(0, 3).unwrap();
        r.push(5, 2).unwrap();
        save_record(&spec, &p, r.clone()).unwrap();
        assert_eq!(&fs::read(&p).unwrap()[..5], b"FCTR\x02");
        assert_eq!(load_record(&spec, &p), Some(r.clone()));
        let mut other = spec.clone();
        other.announce.sha256 = [4; 32];
        assert_eq!(load_record(&other, &p), None);
        let mut other = spec.clone();
        other.announce.block_size += 1;
        assert_eq!(load_record(&other, &p), None);

        // A record written by the release before (no envelope) still resumes the transfer;
        // the next save writes today's layout.
        let a = &spec.announce;
        let mut old = a.task_id.to_be_bytes().to_vec();
        old.extend_from_slice(&a.size.to_be_bytes());
        old.extend_from_slice(&a.block_size.to_be_bytes());
        old.extend_from_slice(&a.sha256);
        for (start, len) in [(0u32, 3u32), (5, 2)] {
            old.extend_from_slice(&start.to_be_bytes());
            old.extend_from_slice(&len.to_be_bytes());
        }
        fs::write(&p, &old).unwrap();
        assert_eq!(load_record(&spec, &p), Some(r.clone()));
        assert_eq!(load_record(&other, &p), None);

        // A damaged record is ignored, not resumed from.
        save_record(&spec, &p, r).unwrap();
        let mut bytes = fs::read(&p).unwrap();
        let last = bytes.len() - 5;
        bytes[last] ^= 1;
        fs::write(&p, &bytes).unwrap();
        assert_eq!(load_record(&spec, &p), None);
        assert!(matches!(decode_record(&bytes), Err(Corrupt::Checksum)));
        assert!(matches!(
            decode_record(b"FCTR\x07\0\0\0\0"),
            Err(Corrupt::Checksum)
        ));
        let mut future = b"FCTR\x07".to_vec();
        let crc = crc32fast::hash(&future);
        future.extend_from_slice(&crc.to_be_bytes());
        assert_eq!(decode_record(&future), Err(Corrupt::UnknownVersion(7)));
    }
}
