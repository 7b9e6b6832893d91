//! The only `unsafe` in the lab: namespace system calls.
//!
//! Invariants:
//! - Namespaces are created by short-lived forked children that hand back file descriptors over
//!   a `socketpair` (`SCM_RIGHTS`) and `_exit` at once. The test process then holds every lab
//!   namespace *only* through those descriptors, so the kernel frees them when the descriptors
//!   close, which also happens when the test process is killed with SIGKILL.
//! - Code that runs in a forked child of this (multi-threaded) process only makes raw system
//!   calls on memory prepared before the fork: no allocation, no locks, no panics.
//! - Processes started inside a host get `PR_SET_PDEATHSIG(SIGKILL)`; the parent pid is checked
//!   after setting it, closing the race where the parent died first.

use std::ffi::CStr;
use std::io;
use std::net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Which step a forked namespace helper failed at, so the parent can name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Step {
    Unshare = 1,
    Setgroups,
    UidMap,
    GidMap,
    SetnsUser,
    SetnsNet,
    OpenNs,
    Socket,
}

impl Step {
    fn from_u32(v: u32) -> Option<Step> {
        Some(match v {
            1 => Step::Unshare,
            2 => Step::Setgroups,
            3 => Step::UidMap,
            4 => Step::GidMap,
            5 => Step::SetnsUser,
            6 => Step::SetnsNet,
            7 => Step::OpenNs,
            8 => Step::Socket,
            _ => return None,
        })
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Step::Unshare => "unshare(CLONE_NEWUSER|CLONE_NEWNET)",
            Step::Setgroups => "write /proc/self/setgroups",
            Step::UidMap => "write /proc/self/uid_map",
            Step::GidMap => "write /proc/self/gid_map",
            Step::SetnsUser => "setns(user namespace)",
            Step::SetnsNet => "setns(network namespace)",
            Step::OpenNs => "open /proc/self/ns/* or /proc/self/net/*",
            Step::Socket => "socket()",
        }
    }
}

/// A failure inside a forked helper: the step and the OS error.
#[derive(Debug)]
pub(crate) struct ForkError {
    pub step: Option<Step>,
    pub err: io::Error,
}

type ChildResult<const N: usize> = Result<[RawFd; N], (Step, i32)>;

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Forks, runs `child` in the child and returns the `N` descriptors it produced.
///
/// # Safety
/// `child` runs in a forked copy of a multi-threaded process: it must only make
/// async-signal-safe calls (raw system calls on memory prepared before the fork) and must not
/// panic or allocate.
unsafe fn fork_with<const N: usize>(
    child: impl FnOnce() -> ChildResult<N>,
) -> Result<[OwnedFd; N], ForkError> {
    let os = |step| move |err| ForkError { step, err };
    let mut pair = [0 as RawFd; 2];
    // SAFETY: plain system call writing two ints into `pair`.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    } < 0
    {
        return Err(os(None)(io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    // Everything the child touches is allocated before the fork.
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((N * size_of::<RawFd>()) as u32) } as usize;
    let mut send_cmsg = vec![0u64; space.div_ceil(8)];
    let mut recv_cmsg = vec![0u64; space.div_ceil(8)];
    let theirs_raw = theirs.as_raw_fd();

    // SAFETY: fork in a multi-threaded process; the child branch below only makes raw system
    // calls on pre-allocated memory (the caller guarantees the same for `child`) and `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os(None)(io::Error::last_os_error()));
    }
    if pid == 0 {
        let result = child();
        let payload = match result {
            Ok(_) => [0u32; 2],
            Err((step, e)) => [step as u32, e as u32],
        };
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: size_of_val(&payload),
        };
        // SAFETY: zeroed msghdr is a valid empty message header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Ok(fds) = result {
            {
                msg.msg_control = send_cmsg.as_mut_ptr().cast();
                msg.msg_controllen = space as _;
                // SAFETY: the control buffer is `space` bytes, enough for one header + N fds.
                unsafe {
                    let cmsg = libc::CMSG_FIRSTHDR(&msg);
                    (*cmsg).cmsg_level = libc::SOL_SOCKET;
                    (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                    (*cmsg).cmsg_len = libc::CMSG_LEN((N * size_of::<RawFd>()) as u32) as _;
                    std::ptr::copy_nonoverlapping(
                        fds.as_ptr().cast::<u8>(),
                        libc::CMSG_DATA(cmsg),
                        N * size_of::<RawFd>(),
                    );
                }
            }
        }
        // SAFETY: sendmsg on our end of the pair, then leave without running any destructor.
        unsafe {
            libc::sendmsg(theirs_raw, &msg, 0);
            libc::_exit(0);
        }
    }
    drop(theirs);
    drop(send_cmsg);

    let mut payload = [0u32; 2];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: size_of_val(&payload),
    };
    // SAFETY: zeroed msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = recv_cmsg.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: msg points at live buffers of the stated sizes.
        let n = unsafe { libc::recvmsg(ours.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 || errno() != libc::EINTR {
            break n;
        }
    };
    let recv_err = io::Error::last_os_error();
    let mut status = 0;
    // SAFETY: reaping the child we forked.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 && errno() == libc::EINTR {}
    if n < 0 {
        return Err(os(None)(recv_err));
    }
    if n == 0 {
        return Err(os(None)(io::Error::other(format!(
            "namespace helper died without answering (wait status {status})"
        ))));
    }
    if payload[0] != 0 {
        return Err(ForkError {
            step: Step::from_u32(payload[0]),
            err: io::Error::from_raw_os_error(payload[1] as i32),
        });
    }
    // SAFETY: the kernel filled `msg`'s control buffer; we read one SCM_RIGHTS header.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
            || (*cmsg).cmsg_len as usize != libc::CMSG_LEN((N * size_of::<RawFd>()) as u32) as usize
        {
            return Err(os(None)(io::Error::other(
                "namespace helper sent no descriptors",
            )));
        }
        let mut fds = [0 as RawFd; N];
        std::ptr::copy_nonoverlapping(
            libc::CMSG_DATA(cmsg),
            fds.as_mut_ptr().cast::<u8>(),
            N * size_of::<RawFd>(),
        );
        Ok(fds.map(|fd| OwnedFd::from_raw_fd(fd)))
    }
}

/// Child side: write `data` to the file at `path` (async-signal-safe).
fn write_file(path: &CStr, data: &[u8]) -> Result<(), i32> {
    // SAFETY: raw open/write/close on a NUL-terminated path and a live buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(errno());
        }
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        let e = errno();
        libc::close(fd);
        if n as usize != data.len() {
            return Err(e);
        }
    }
    Ok(())
}

/// Child side: open a file read-only with close-on-exec.
fn open_ro(path: &CStr) -> Result<RawFd, (Step, i32)> {
    // SAFETY: raw open on a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        Err((Step::OpenNs, errno()))
    } else {
        Ok(fd)
    }
}

/// Child side: turn IPv6 off in the current network namespace so the lab's links carry only
/// what the test sends (no router solicitations, no MLD). Best effort: a kernel without IPv6
/// has nothing to turn off.
fn disable_ipv6() {
    let _ = write_file(c"/proc/sys/net/ipv6/conf/all/disable_ipv6", b"1");
    let _ = write_file(c"/proc/sys/net/ipv6/conf/default/disable_ipv6", b"1");
}

/// Descriptors of the lab's private user namespace and its first ("hub") network namespace.
#[derive(Debug)]
pub(crate) struct UserNet {
    pub user: OwnedFd,
    pub net: OwnedFd,
}

/// Creates a new user namespace (our uid and gid mapped to 0) with a new network namespace.
pub(crate) fn new_user_net() -> Result<UserNet, ForkError> {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let uid_map = format!("0 {uid} 1\n");
    let gid_map = format!("0 {gid} 1\n");
    // SAFETY: the closure only makes raw system calls on the maps formatted above.
    let [user, net] = unsafe {
        fork_with(|| {
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) < 0 {
                return Err((Step::Unshare, errno()));
            }
            write_file(c"/proc/self/setgroups", b"deny").map_err(|e| (Step::Setgroups, e))?;
            write_file(c"/proc/self/uid_map", uid_map.as_bytes()).map_err(|e| (Step::UidMap, e))?;
            write_file(c"/proc/self/gid_map", gid_map.as_bytes()).map_err(|e| (Step::GidMap, e))?;
            disable_ipv6();
            Ok([
                open_ro(c"/proc/self/ns/user")?,
                open_ro(c"/proc/self/ns/net")?,
            ])
        })?
    };
    Ok(UserNet { user, net })
}

/// Descriptors of one host's network namespace and of its `/proc/net` tables.
#[derive(Debug)]
pub(crate) struct HostNs {
    pub net: OwnedFd,
    /// `/proc/net/dev` of the host, opened from inside it (re-read with `pread`).
    pub dev: OwnedFd,
    /// `/proc/net/tcp` of the host.
    pub tcp: OwnedFd,
}

/// Child side: enter the lab's user namespace and then `net`.
///
/// # Safety
/// Only for a single-threaded (forked) process.
unsafe fn enter(user: RawFd, net: Option<RawFd>) -> Result<(), (Step, i32)> {
    // SAFETY: raw setns calls on descriptors the caller keeps open.
    unsafe {
        // Joining a user namespace one is already in fails (EINVAL); a command built by
        // `Host::command` and then passed to `Host::spawn` enters twice.
        if !member_of(user, c"/proc/self/ns/user") && libc::setns(user, libc::CLONE_NEWUSER) < 0 {
            return Err((Step::SetnsUser, errno()));
        }
        if let Some(net) = net {
            if !member_of(net, c"/proc/self/ns/net") && libc::setns(net, libc::CLONE_NEWNET) < 0 {
                return Err((Step::SetnsNet, errno()));
            }
        }
    }
    Ok(())
}

/// Child side: whether namespace descriptor `fd` is the namespace at `own` (`/proc/self/ns/*`).
fn member_of(fd: RawFd, own: &CStr) -> bool {
    // SAFETY: all-zero is a valid `stat`; fstat/stat write into the live structs.
    unsafe {
        let (mut a, mut b): (libc::stat, libc::stat) = (std::mem::zeroed(), std::mem::zeroed());
        libc::fstat(fd, &mut a) == 0
            && libc::stat(own.as_ptr(), &mut b) == 0
            && a.st_ino == b.st_ino
            && a.st_dev == b.st_dev
    }
}

/// Identity (device, inode) of a namespace descriptor, for leak checks.
pub(crate) fn ns_id(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    // SAFETY: all-zero is a valid `stat`; fstat writes into it.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        cvt(libc::fstat(fd.as_raw_fd(), &mut st))?;
        Ok((st.st_dev, st.st_ino))
    }
}

/// Creates a new network namespace owned by the lab's user namespace `user`.
pub(crate) fn new_host_ns(user: &OwnedFd) -> Result<HostNs, ForkError> {
    let user = user.as_raw_fd();
    // SAFETY: the closure only makes raw system calls.
    let [net, dev, tcp] = unsafe {
        fork_with(|| {
            enter(user, None)?;
            if libc::unshare(libc::CLONE_NEWNET) < 0 {
                return Err((Step::Unshare, errno()));
            }
            disable_ipv6();
            Ok([
                open_ro(c"/proc/self/ns/net")?,
                open_ro(c"/proc/self/net/dev")?,
                open_ro(c"/proc/self/net/tcp")?,
            ])
        })?
    };
    Ok(HostNs { net, dev, tcp })
}

/// Creates a socket inside network namespace `net`. Everything else (bind, connect, options)
/// can then be done from here: those calls act in the socket's own namespace.
pub(crate) fn socket_in(user: &OwnedFd, net: &OwnedFd, ty: i32) -> Result<OwnedFd, ForkError> {
    socket_of(user, net, (libc::AF_INET, ty, 0))
}

/// [`socket_in`] of any `(domain, type, protocol)`, e.g. a packet socket for captures.
pub(crate) fn socket_of(
    user: &OwnedFd,
    net: &OwnedFd,
    (domain, ty, proto): (i32, i32, i32),
) -> Result<OwnedFd, ForkError> {
    let (user, net) = (user.as_raw_fd(), net.as_raw_fd());
    // SAFETY: the closure only makes raw system calls.
    let [sock] = unsafe {
        fork_with(|| {
            enter(user, Some(net))?;
            let fd = libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto);
            if fd < 0 {
                return Err((Step::Socket, errno()));
            }
            Ok([fd])
        })?
    };
    Ok(sock)
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
    sa
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, value: T) -> io::Result<()> {
    // SAFETY: `value` is a live plain-data option value of the stated size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn bind(fd: &OwnedFd, addr: SocketAddrV4) -> io::Result<()> {
    let sa = sockaddr(addr);
    // SAFETY: `sa` is a valid sockaddr_in of the stated size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Makes `sock` (a fresh UDP socket) a UDP socket bound to `addr` whose multicast goes out of
/// `mcast_if`.
pub(crate) fn udp_bind(
    sock: OwnedFd,
    addr: SocketAddrV4,
    mcast_if: std::net::Ipv4Addr,
) -> io::Result<UdpSocket> {
    setsockopt(
        &sock,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        1 as libc::c_int,
    )?;
    let ifaddr = libc::in_addr {
        s_addr: u32::from(mcast_if).to_be(),
    };
    setsockopt(&sock, libc::IPPROTO_IP, libc::IP_MULTICAST_IF, ifaddr)?;
    bind(&sock, addr)?;
    Ok(UdpSocket::from(sock))
}

/// Makes `sock` (a fresh UDP socket) one that may bind to and send from `src` even if it is
/// not an address of its host (`IP_TRANSPARENT`, which the lab's user namespace allows):
/// spoofed sources, inside the lab only.
pub(crate) fn udp_spoofing(sock: OwnedFd, src: SocketAddrV4) -> io::Result<UdpSocket> {
    setsockopt(&sock, libc::SOL_IP, libc::IP_TRANSPARENT, 1 as libc::c_int)?;
    bind(&sock, src)?;
    Ok(UdpSocket::from(sock))
}

/// An IPv4 UDP datagram seen by a packet socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedUdp {
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

/// Parses an IPv4 packet (as a `SOCK_DGRAM` packet socket delivers it: no link header) holding
/// an unfragmented UDP datagram.
pub(crate) fn parse_udp(packet: &[u8]) -> Option<CapturedUdp> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    let frag = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x3fff;
    if packet[0] >> 4 != 4 || *packet.get(9)? != 17 || ihl < 20 || frag != 0 {
        return None;
    }
    let ip = |at: usize| -> Option<std::net::Ipv4Addr> {
        Some(std::net::Ipv4Addr::new(
            *packet.get(at)?,
            *packet.get(at + 1)?,
            *packet.get(at + 2)?,
            *packet.get(at + 3)?,
        ))
    };
    let udp = packet.get(ihl..total.min(packet.len()))?;
    let port =
        |at: usize| -> Option<u16> { Some(u16::from_be_bytes([*udp.get(at)?, *udp.get(at + 1)?])) };
    Some(CapturedUdp {
        src: SocketAddrV4::new(ip(12)?, port(0)?),
        dst: SocketAddrV4::new(ip(16)?, port(2)?),
        payload: udp.get(8..)?.to_vec(),
    })
}

/// Receives one packet from packet socket `fd`, waiting at most `timeout`; `None` on timeout.
pub(crate) fn recv_packet(
    fd: &OwnedFd,
    buf: &mut [u8],
    timeout: Duration,
) -> io::Result<Option<usize>> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: poll and recv on our descriptor with a live buffer of the stated size.
    unsafe {
        let n = loop {
            let n = libc::poll(&mut pfd, 1, ms);
            if n >= 0 || errno() != libc::EINTR {
                break n;
            }
        };
        if cvt(n)? == 0 {
            return Ok(None);
        }
        let r = libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        );
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(r as usize))
    }
}

/// Makes `sock` (a fresh TCP socket) a listener on `addr`.
pub(crate) fn tcp_listen(sock: OwnedFd, addr: SocketAddrV4) -> io::Result<TcpListener> {
    setsockopt(
        &sock,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        1 as libc::c_int,
    )?;
    bind(&sock, addr)?;
    // SAFETY: plain system call.
    cvt(unsafe { libc::listen(sock.as_raw_fd(), 1024) })?;
    Ok(TcpListener::from(sock))
}

/// Connects `sock` (a fresh TCP socket) to `addr`, giving up after `timeout`.
pub(crate) fn tcp_connect(
    sock: OwnedFd,
    addr: SocketAddrV4,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let fd = sock.as_raw_fd();
    let sa = sockaddr(addr);
    // SAFETY: fcntl and connect on our descriptor with a valid sockaddr_in.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
        let r = libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if r < 0 && errno() != libc::EINPROGRESS {
            return Err(io::Error::last_os_error());
        }
        if r < 0 {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            let n = loop {
                let n = libc::poll(&mut pfd, 1, ms);
                if n >= 0 || errno() != libc::EINTR {
                    break n;
                }
            };
            cvt(n)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {addr} timed out"),
                ));
            }
            let mut err: libc::c_int = 0;
            let mut len = size_of::<libc::c_int>() as libc::socklen_t;
            cvt(libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            ))?;
            if err != 0 {
                return Err(io::Error::from_raw_os_error(err));
            }
        }
        cvt(libc::fcntl(fd, libc::F_SETFL, flags))?;
    }
    Ok(TcpStream::from(sock))
}

/// Reads a whole `/proc` table through a descriptor opened inside a host.
pub(crate) fn pread_all(fd: &OwnedFd) -> io::Result<String> {
    let mut out = Vec::with_capacity(4096);
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a live buffer of the stated size.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                out.len() as libc::off_t,
            )
        };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
    String::from_utf8(out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The `pre_exec` hook of every process the lab starts inside a host: enter the lab's user
/// namespace and the host's network namespace, keep `keep_fd` open across `exec`, and die with
/// the parent.
///
/// # Safety
/// Runs between `fork` and `exec` (std's `pre_exec` contract): raw system calls only.
pub(crate) unsafe fn pre_exec_enter(
    user: RawFd,
    net: RawFd,
    keep_fd: Option<RawFd>,
    parent: libc::pid_t,
) -> io::Result<()> {
    // SAFETY: the caller is a freshly forked, single-threaded child.
    unsafe {
        enter(user, Some(net)).map_err(|(_, e)| io::Error::from_raw_os_error(e))?;
        if let Some(fd) = keep_fd {
            cvt(libc::fcntl(fd, libc::F_SETFD, 0))?;
        }
        cvt(libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ))?;
        if libc::getppid() != parent {
            // The parent died before PDEATHSIG was armed.
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

/// This process's id, as a forked child's `getppid()` reports it.
pub(crate) fn own_pid() -> libc::pid_t {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}
