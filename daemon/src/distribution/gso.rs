//! Handing a batch of datagrams to the kernel: one `sendmmsg` per batch, with each run of
//! equal-sized datagrams to one destination sent as one UDP GSO message (`UDP_SEGMENT`).
//!
//! The kernel then builds one socket buffer per run instead of one per datagram and cuts it
//! into datagrams at the device (in the NIC where it segments UDP, else in software just
//! before the driver), so a 1,500-byte first pass crosses the socket, the routing and the
//! netfilter hooks of the output path about 44 times less often (7 times at MTU 9000: a run
//! holds at most 64 KiB). What reaches the wire is the same datagrams as without it.
//!
//! Only datagrams no longer than a full data block's go in runs: a GSO segment must fit the
//! path's MTU unfragmented, and a block fills it (parity symbols and manifests, a few bytes
//! longer, may be fragmented as plain datagrams can). A kernel or device that refuses GSO
//! (`EIO`: no checksum offload on the device; `EINVAL` or `ENOPROTOOPT`: a kernel before
//! 4.18; `EMSGSIZE`: blocks configured larger than the MTU) turns it off for the socket: the
//! datagrams not yet sent go back to the caller, who sends them again next turn, one message
//! each.

use std::io;
use std::net::SocketAddrV4;

/// Most datagrams in one GSO message: 64, the kernel's `UDP_MAX_SEGMENTS` since UDP GSO
/// appeared (4.18), so every kernel that does GSO takes it.
const MAX_SEGMENTS: usize = 64;
/// Most UDP payload bytes in one GSO message: what fits an IPv4 datagram's 16-bit length.
const MAX_GSO_BYTES: usize = 65_507;
/// `u64` words of ancillary data per message: `CMSG_SPACE(2)` is 24 bytes on 64-bit Linux
/// (a 16-byte header, the data padded to 8) and 16 on 32-bit.
const CONTROL_WORDS: usize = 3;

/// Whether runs go as GSO messages: on until the kernel refuses one.
#[derive(Debug)]
pub(super) struct Gso {
    on: bool,
}

impl Default for Gso {
    fn default() -> Self {
        Gso { on: true }
    }
}

/// One run of datagrams: `len` of them from `start`, each `seg` bytes but the last (which
/// may be shorter), all to one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start: usize,
    len: usize,
    seg: usize,
}

/// Cuts datagrams of lengths `lens` to `dests` into runs a GSO message can carry: same
/// destination, every datagram as long as the run's first (at most `max_seg`) except its
/// last, at most [`MAX_SEGMENTS`] and [`MAX_GSO_BYTES`]. With `max_seg` 0 every datagram is
/// its own run.
fn runs(lens: &[usize], dests: &[SocketAddrV4], max_seg: usize) -> Vec<Run> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lens.len() {
        let seg = lens[i];
        let mut len = 1;
        let mut bytes = seg;
        let mut j = i + 1;
        let groups = seg > 0 && seg <= max_seg;
        while groups
            && j < lens.len()
            && dests[j] == dests[i]
            && lens[j] <= seg
            && len < MAX_SEGMENTS
            && bytes + lens[j] <= MAX_GSO_BYTES
        {
            len += 1;
            bytes += lens[j];
            j += 1;
            // A shorter datagram can only end a run (the kernel cuts at `seg`).
            if lens[j - 1] < seg {
                break;
            }
        }
        out.push(Run { start: i, len, seg });
        i += len;
    }
    out
}

impl Gso {
    /// Sends the datagrams whose two iovecs (prefix, payload) are `iovs[i]` to `dests[i]`
    /// until every one is through or the kernel pushes back (`EAGAIN`, `ENOBUFS`, or a
    /// refused GSO message); runs are of datagrams of at most `max_seg` bytes (a full data
    /// block's). Returns how many, from the first, are through (the rest are the caller's to
    /// keep for the next turn) and how many of those failed on their own (lost like network
    /// loss).
    pub(super) fn send(
        &mut self,
        fd: i32,
        (iovs, dests): (&mut [[libc::iovec; 2]], &[SocketAddrV4]),
        max_seg: usize,
    ) -> (usize, u64) {
        let lens: Vec<usize> = iovs.iter().map(|v| v[0].iov_len + v[1].iov_len).collect();
        let runs = runs(&lens, dests, if self.on { max_seg } else { 0 });
        let mut addrs: Vec<libc::sockaddr_in> =
            runs.iter().map(|r| sockaddr(dests[r.start])).collect();
        let mut control: Vec<[u64; CONTROL_WORDS]> = vec![[0; CONTROL_WORDS]; runs.len()];
        // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
        let mut hdrs: Vec<libc::mmsghdr> = (0..runs.len())
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for (k, (h, r)) in hdrs.iter_mut().zip(&runs).enumerate() {
            let m = &mut h.msg_hdr;
            m.msg_name = (&mut addrs[k] as *mut libc::sockaddr_in).cast();
            m.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // `iovs` is contiguous: a run's datagrams are 2 × len iovecs in a row.
            m.msg_iov = iovs[r.start].as_mut_ptr();
            m.msg_iovlen = (2 * r.len) as _;
            if r.len > 1 {
                set_segment(m, &mut control[k], r.seg as u16);
            }
        }
        let (through, errors) = self.sendmmsg(fd, &mut hdrs, &runs);
        let sent = runs[..through].iter().map(|r| r.len).sum();
        (sent, errors)
    }

    /// `sendmmsg` until every message is through or the kernel pushes back; returns the
    /// messages through and the datagrams of those that failed on their own.
    fn sendmmsg(&mut self, fd: i32, hdrs: &mut [libc::mmsghdr], runs: &[Run]) -> (usize, u64) {
        let n = hdrs.len();
        let mut errors = 0u64;
        let mut sent = 0usize;
        while sent < n {
            // SAFETY: `hdrs[sent..n]` point at live buffers (prefixes, addrs, iovs, control,
            // and the mapping or parity cache the payload iovecs borrow), all outliving the
            // call, which only reads them.
            let r = unsafe {
                libc::sendmmsg(fd, hdrs[sent..].as_mut_ptr(), (n - sent) as libc::c_uint, 0)
            };
            if r >= 0 {
                sent += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS) {
                return (sent, errors);
            }
            let refused = matches!(
                e.raw_os_error(),
                Some(
                    libc::EIO
                        | libc::EINVAL
                        | libc::EMSGSIZE
                        | libc::ENOPROTOOPT
                        | libc::EOPNOTSUPP
                )
            );
            if runs[sent].len > 1 && refused {
                tracing::info!(error = %e, "UDP GSO refused: sending one datagram per message");
                self.on = false;
                return (sent, errors);
            }
            // Anything else fails this message only: lost like network loss.
            tracing::debug!(error = %e, "sendmmsg failed");
            errors += runs[sent].len as u64;
            sent += 1;
        }
        (sent, errors)
    }
}

/// Points `m`'s ancillary data at `buf`, holding one `UDP_SEGMENT` message of `seg`.
fn set_segment(m: &mut libc::msghdr, buf: &mut [u64; CONTROL_WORDS], seg: u16) {
    m.msg_control = buf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    assert!(space <= std::mem::size_of_val(buf));
    m.msg_controllen = space as _;
    // SAFETY: `m`'s control buffer is `buf`, `space` bytes of it in use: CMSG_FIRSTHDR
    // returns its start, which holds a header and 2 data bytes (`space` counts both).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(m);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn at(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(239, 1, 1, 1), port)
    }

    fn shape(rs: &[Run]) -> Vec<(usize, usize)> {
        rs.iter().map(|r| (r.start, r.len)).collect()
    }

    #[test]
    fn runs_break_at_destinations_lengths_and_limits() {
        let g = at(1);
        // Equal blocks to the group, a shorter last block, then a unicast repair.
        let lens = [1472, 1472, 1472, 900, 1472, 1472];
        let dests = [g, g, g, g, at(2), at(2)];
        assert_eq!(shape(&runs(&lens, &dests, 1472)), [(0, 4), (4, 2)]);
        // A longer datagram starts a run of its own.
        let lens = [1000, 1000, 1200, 1200];
        assert_eq!(shape(&runs(&lens, &[g; 4], 1472)), [(0, 2), (2, 2)]);
        // Datagrams longer than a block (parity symbols) go one by one.
        let lens = [1472, 1472, 1490, 1490, 1490];
        let want = [(0, 2), (2, 1), (3, 1), (4, 1)];
        assert_eq!(shape(&runs(&lens, &[g; 5], 1472)), want);
        // 64 KiB: 7 jumbo datagrams, then the next run.
        let lens = [8972; 9];
        assert_eq!(shape(&runs(&lens, &[g; 9], 8972)), [(0, 7), (7, 2)]);
        // Never more than MAX_SEGMENTS, however small.
        let lens = [100; 70];
        assert_eq!(shape(&runs(&lens, &[g; 70], 1472)), [(0, 64), (64, 6)]);
        // Off: one message per datagram.
        let want = [(0, 1), (1, 1), (2, 1)];
        assert_eq!(shape(&runs(&[1472; 3], &[g; 3], 0)), want);
        assert!(runs(&[], &[], 1472).is_empty());
    }

    #[test]
    fn every_datagram_arrives_whole_through_loopback() {
        // 127.0.0.1 only: a receiving socket and GSO runs of 3 + 1 datagrams to it.
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = match rx.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let heads: Vec<[u8; 4]> = (0..4u8).map(|i| [i; 4]).collect();
        let body = vec![7u8; 996];
        let mut iovs: Vec<[libc::iovec; 2]> = heads
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let n = if i == 2 { 500 } else { body.len() };
                [
                    libc::iovec {
                        iov_base: h.as_ptr() as *mut libc::c_void,
                        iov_len: h.len(),
                    },
                    libc::iovec {
                        iov_base: body.as_ptr() as *mut libc::c_void,
                        iov_len: n,
                    },
                ]
            })
            .collect();
        let mut gso = Gso::default();
        use std::os::fd::AsRawFd;
        let (sent, errors) = gso.send(tx.as_raw_fd(), (&mut iovs, &[to; 4]), 1000);
        assert_eq!((sent, errors), (4, 0));
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        for _ in 0..4 {
            let n = rx.recv(&mut buf).unwrap();
            got.push((buf[0], n));
        }
        assert_eq!(got, [(0, 1000), (1, 1000), (2, 504), (3, 1000)]);
    }
}
