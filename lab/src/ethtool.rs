//! Turning one offload feature of an interface off, by name, with the `SIOCETHTOOL` ioctl
//! on a socket in the interface's namespace: what `ethtool -K IFACE FEATURE off` does, without
//! needing the `ethtool` program.
//!
//! The kernel names its features in a string set (`ETH_SS_FEATURES`) whose order is its own:
//! the feature's bit is its index there, read each time (`ETHTOOL_GSSET_INFO`, then
//! `ETHTOOL_GSTRINGS`), never a constant.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_SFEATURES: u32 = 0x3b;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// `ioctl(fd, SIOCETHTOOL)` on `iface` with the command buffer `buf` (its first word the
/// command).
fn ethtool(sock: &OwnedFd, iface: &str, buf: &mut [u32]) -> io::Result<()> {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: buf.as_mut_ptr().cast(),
        _pad: [0; 16],
    };
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    req.name[..name.len()].copy_from_slice(name);
    // SAFETY: `req` names a NUL-terminated interface and points at `buf`, which is as long
    // as the command it holds says (the callers size it for the kernel's reply).
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turns `feature` (as `ethtool -k` names it, e.g. `tx-udp-segmentation`) of `iface` off.
pub(crate) fn feature_off(sock: &OwnedFd, iface: &str, feature: &str) -> io::Result<()> {
    // How many features the kernel names: struct ethtool_sset_info {cmd, reserved,
    // sset_mask: u64, data[1]}.
    let mut info = [ETHTOOL_GSSET_INFO, 0, 1 << ETH_SS_FEATURES, 0, 0];
    ethtool(sock, iface, &mut info)?;
    let count = info[4] as usize;
    // Their names: struct ethtool_gstrings {cmd, string_set, len, data[len * 32]}.
    let mut strings = vec![0u32; 3 + count * ETH_GSTRING_LEN / 4];
    strings[..3].copy_from_slice(&[ETHTOOL_GSTRINGS, ETH_SS_FEATURES, count as u32]);
    ethtool(sock, iface, &mut strings)?;
    let bytes: Vec<u8> = strings[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let bit = bytes
        .chunks(ETH_GSTRING_LEN)
        .position(|s| s.split(|&b| b == 0).next() == Some(feature.as_bytes()))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{iface} has no feature {feature}"),
            )
        })?;
    // struct ethtool_sfeatures {cmd, size, features[size] {valid, requested}}: valid says
    // which bits to change, requested (0) what to.
    let blocks = count.div_ceil(32);
    let mut set = vec![0u32; 2 + 2 * blocks];
    set[0] = ETHTOOL_SFEATURES;
    set[1] = blocks as u32;
    set[2 + 2 * (bit / 32)] = 1 << (bit % 32);
    ethtool(sock, iface, &mut set)
}
