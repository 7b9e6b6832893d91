//! Subnet-directed broadcast as a push's destination, instead of the multicast group.
//!
//! Invariants:
//! - A broadcast goes only through the interface that holds `mcast.addr` (the socket is bound
//!   to that address), and only to that interface's own directed broadcast (`net | !mask`):
//!   any other address is refused ([`Iface::broadcast`]), so a push never reaches another
//!   subnet or the limited broadcast 255.255.255.255.
//! - `SO_BROADCAST` is set on the socket only when the first broadcast push is accepted.

use std::net::Ipv4Addr;

/// The interface that holds the gateway's multicast address, as `getifaddrs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// Interface name (e.g. `eth0`).
    pub name: String,
    /// The gateway's address on it.
    pub addr: Ipv4Addr,
    /// Prefix length of that address.
    pub prefix: u8,
    /// Whether the interface can broadcast (`IFF_BROADCAST`).
    pub can_broadcast: bool,
}

/// Why a push cannot go by broadcast.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BroadcastError {
    /// No interface holds the gateway's multicast address.
    #[error("no interface holds {0} (mcast.addr), so there is no subnet to broadcast on")]
    NoInterface(Ipv4Addr),
    /// The interface has no broadcast (loopback, point-to-point, a /31 or /32).
    #[error("interface {iface} ({addr}/{prefix}) has no broadcast address: push by multicast")]
    Unsupported {
        /// Interface name.
        iface: String,
        /// The gateway's address on it.
        addr: Ipv4Addr,
        /// Its prefix length.
        prefix: u8,
    },
    /// The socket refused `SO_BROADCAST`.
    #[error("the socket refused SO_BROADCAST ({0})")]
    Socket(std::io::ErrorKind),
    /// An address that is not the interface's directed broadcast.
    #[error(
        "{asked} is not the broadcast address of interface {iface} ({addr}/{prefix}): use {expected}, or --broadcast without an address"
    )]
    NotOnSubnet {
        /// The address asked for.
        asked: Ipv4Addr,
        /// Interface name.
        iface: String,
        /// The gateway's address on it.
        addr: Ipv4Addr,
        /// Its prefix length.
        prefix: u8,
        /// The interface's directed broadcast.
        expected: Ipv4Addr,
    },
}

/// `mcast.broadcast` that the interface of `mcast.addr` cannot carry (at start).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key `mcast.broadcast`: {0}")]
pub struct BroadcastKeyError(pub BroadcastError);

/// The directed broadcast of `addr/prefix` (`None` for a /31 or /32, which have none).
pub fn directed_broadcast(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Addr> {
    if prefix >= 31 {
        return None;
    }
    let host_bits = u32::MAX >> prefix;
    Some(Ipv4Addr::from(u32::from(addr) | host_bits))
}

impl Iface {
    /// The interface that holds `addr`, if any.
    pub fn holding(addr: Ipv4Addr) -> Option<Iface> {
        list().into_iter().find(|i| i.addr == addr)
    }

    /// The first IPv4 address of the interface called `name`, if it has one (the standalone
    /// `fleetcast send` and `receive` bind and join there, never where routing points).
    pub fn named(name: &str) -> Option<Iface> {
        list().into_iter().find(|i| i.name == name)
    }

    /// The interface's MTU, asked through the socket `fd` (an ioctl answers for the socket's
    /// own network namespace, which `/sys/class/net` does not always show); `None` if the
    /// kernel does not say.
    pub fn mtu(&self, fd: std::os::fd::RawFd) -> Option<u32> {
        let name = self.name.as_bytes();
        if name.len() >= libc::IFNAMSIZ {
            return None;
        }
        // SAFETY: ifreq is plain data (a name and a union of integers and addresses); all
        // zero is a valid request with an empty name.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, &b) in req.ifr_name.iter_mut().zip(name) {
            *d = b as libc::c_char;
        }
        // SAFETY: SIOCGIFMTU reads the NUL-terminated name and writes `ifru_mtu` of `req`,
        // which lives across the call.
        let r = unsafe { libc::ioctl(fd, libc::SIOCGIFMTU, &mut req) };
        if r != 0 {
            return None;
        }
        // SAFETY: on success the kernel wrote the MTU member of the union.
        u32::try_from(unsafe { req.ifr_ifru.ifru_mtu }).ok()
    }

    /// The broadcast address a push may use: `asked` if it is this interface's directed
    /// broadcast, or (`asked == None`) that address itself.
    pub fn broadcast(&self, asked: Option<Ipv4Addr>) -> Result<Ipv4Addr, BroadcastError> {
        let expected = directed_broadcast(self.addr, self.prefix)
            .filter(|_| self.can_broadcast)
            .ok_or_else(|| BroadcastError::Unsupported {
                iface: self.name.clone(),
                addr: self.addr,
                prefix: self.prefix,
            })?;
        match asked {
            Some(a) if a != expected => Err(BroadcastError::NotOnSubnet {
                asked: a,
                iface: self.name.clone(),
                addr: self.addr,
                prefix: self.prefix,
                expected,
            }),
            _ => Ok(expected),
        }
    }
}

/// Checks `asked` (or derives the address) against the interface holding `addr`, which
/// `iface` is (`None`: none does).
pub fn resolve(
    iface: Option<&Iface>,
    addr: Ipv4Addr,
    asked: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, BroadcastError> {
    iface
        .ok_or(BroadcastError::NoInterface(addr))?
        .broadcast(asked)
}

/// The IPv4 addresses of this network namespace's interfaces (empty if `getifaddrs` fails:
/// then no push can broadcast, which is the safe side).
fn list() -> Vec<Iface> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list it owns into `head`; we read it and free it below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not freed yet.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: non-null sockaddr pointers of the node; the family says the layout.
        let (fam, sin, mask) = unsafe {
            (
                (*ifa.ifa_addr).sa_family,
                *(ifa.ifa_addr as *const libc::sockaddr_in),
                *(ifa.ifa_netmask as *const libc::sockaddr_in),
            )
        };
        if i32::from(fam) != libc::AF_INET {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string of the node.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        out.push(Iface {
            name: name.to_string_lossy().into_owned(),
            addr: Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            prefix: u32::from_be(mask.sin_addr.s_addr).count_ones() as u8,
            can_broadcast: ifa.ifa_flags & libc::IFF_BROADCAST as u32 != 0,
        });
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(addr: [u8; 4], prefix: u8) -> Iface {
        Iface {
            name: "eth0".into(),
            addr: Ipv4Addr::from(addr),
            prefix,
            can_broadcast: true,
        }
    }

    #[test]
    fn the_directed_broadcast_is_accepted_and_derived() {
        let i = eth([10, 77, 0, 1], 16);
        let b = Ipv4Addr::new(10, 77, 255, 255);
        assert_eq!(i.broadcast(Some(b)), Ok(b));
        assert_eq!(i.broadcast(None), Ok(b));
        assert_eq!(
            eth([192, 168, 1, 7], 24).broadcast(None),
            Ok(Ipv4Addr::new(192, 168, 1, 255))
        );
        assert_eq!(
            directed_broadcast(Ipv4Addr::new(10, 0, 0, 9), 30),
            Some(Ipv4Addr::new(10, 0, 0, 11))
        );
    }

    #[test]
    fn an_address_off_the_subnet_is_refused_with_the_one_to_use() {
        let i = eth([10, 77, 0, 1], 16);
        for asked in [
            Ipv4Addr::new(10, 77, 0, 255),
            Ipv4Addr::new(10, 78, 255, 255),
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(10, 77, 0, 2),
        ] {
            let e = i.broadcast(Some(asked)).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("{asked} is not the broadcast address of interface eth0 (10.77.0.1/16): use 10.77.255.255, or --broadcast without an address")
            );
        }
    }

    #[test]
    fn interfaces_without_broadcast_and_missing_ones_are_refused() {
        let mut lo = eth([127, 0, 0, 1], 8);
        lo.name = "lo".into();
        lo.can_broadcast = false;
        assert!(matches!(
            lo.broadcast(None),
            Err(BroadcastError::Unsupported { .. })
        ));
        assert!(matches!(
            eth([10, 0, 0, 1], 31).broadcast(None),
            Err(BroadcastError::Unsupported { .. })
        ));
        let a = Ipv4Addr::new(10, 9, 9, 9);
        assert_eq!(resolve(None, a, None), Err(BroadcastError::NoInterface(a)));
    }

    #[test]
    fn loopback_is_listed_and_cannot_broadcast() {
        // Reads this namespace's interfaces only; sends nothing.
        let lo = Iface::holding(Ipv4Addr::LOCALHOST).expect("lo holds 127.0.0.1");
        assert_eq!(lo.prefix, 8);
        assert!(!lo.can_broadcast);
    }
}
