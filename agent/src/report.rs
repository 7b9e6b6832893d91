//! The device's configuration report (Linux): OS, kernel, hostname, addresses, boot id,
//! agent version, CPU and memory, attached devices ([`crate::inventory`]) and installed
//! software from the package manager the device has ([`crate::packages`]).
//!
//! Invariants:
//! - Every string fits the wire's [`MAX_NAME`] (cut at a character boundary) and the lists
//!   are capped at [`MAX_ADDRESSES`], [`MAX_SOFTWARE`] and [`MAX_DEVICES`], so a collected
//!   report always encodes.
//! - The report is the wire message itself, owned ([`ConfigReport<'static>`]): it goes into a
//!   command's result, a `Report` or a `RebootComplete` as it is, with no copy type.
//! - Paths come from [`ReportConfig`]: tests and the lab point them at fixtures (a fake root
//!   for `/proc`, `/sys`, `/dev` and the package databases), and simulate a reboot by giving
//!   the agent a different boot id file.
//! - The only fallible source is the boot id, which the control protocol cannot do without;
//!   everything else degrades to `"unknown"`, zero or an empty list.
//!
//! [`MAX_SOFTWARE`]: fleetcast_wire::msg::limits::MAX_SOFTWARE
//! [`MAX_DEVICES`]: fleetcast_wire::msg::limits::MAX_DEVICES

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use fleetcast_wire::msg::limits::{MAX_ADDRESSES, MAX_NAME};
use fleetcast_wire::ConfigReport;

use crate::{inventory, packages};

/// The agent's version, as reported to the gateway.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the report's sources live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportConfig {
    /// `os-release(5)` file (its `PRETTY_NAME`).
    pub os_release: PathBuf,
    /// The boot id: a UUID in text form.
    pub boot_id: PathBuf,
    /// The root under which `proc/`, `sys/`, `dev/` and the package databases are read
    /// (`/`; a fake tree in tests).
    pub root: PathBuf,
    /// dpkg's status database instead of the one under `root` (the lab gives each agent its
    /// own); `None`: detect the package manager under `root`.
    pub dpkg_status: Option<PathBuf>,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig {
            os_release: PathBuf::from("/etc/os-release"),
            boot_id: PathBuf::from("/proc/sys/kernel/random/boot_id"),
            root: PathBuf::from("/"),
            dpkg_status: None,
        }
    }
}

/// Errors collecting a report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The boot id file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The boot id file does not hold a UUID.
    #[error("{path}: not a boot id (expected a UUID)")]
    BadBootId {
        /// The file.
        path: PathBuf,
    },
}

/// Collects the report.
pub fn collect(cfg: &ReportConfig) -> Result<ConfigReport<'static>, ReportError> {
    let boot_id = read_boot_id(&cfg.boot_id)?;
    let uname = uname();
    let os = read_os_release(&cfg.os_release)
        .or_else(|| uname.as_ref().map(|u| u.sysname.clone()))
        .unwrap_or_else(|| "unknown".into());
    let (kernel, hostname) = match uname {
        Some(u) => (u.release, u.nodename),
        None => ("unknown".into(), "unknown".into()),
    };
    let (package_manager, software) = packages::installed(&cfg.root, cfg.dpkg_status.as_deref());
    let (cpu_model, cpus) = inventory::cpu(&cfg.root);
    Ok(ConfigReport {
        boot_id,
        os: bounded(&os).into(),
        kernel: bounded(&kernel).into(),
        hostname: bounded(&hostname).into(),
        agent_version: bounded(AGENT_VERSION).into(),
        addresses: interface_addresses().into_iter().map(Into::into).collect(),
        software,
        package_manager,
        cpu_model: cpu_model.into(),
        cpus,
        memory: inventory::memory(&cfg.root),
        devices: inventory::devices(&cfg.root),
    })
}

/// Reads a boot id file (`/proc/sys/kernel/random/boot_id`: a UUID, hyphens optional).
pub fn read_boot_id(path: &Path) -> Result<[u8; 16], ReportError> {
    let mut text = Vec::with_capacity(40);
    File::open(path)
        .and_then(|f| f.take(128).read_to_end(&mut text))
        .map_err(|source| ReportError::Io {
            path: path.to_owned(),
            source,
        })?;
    parse_uuid(&text).ok_or_else(|| ReportError::BadBootId {
        path: path.to_owned(),
    })
}

/// Parses a UUID's text form (32 hex digits, hyphens anywhere, surrounding whitespace).
pub fn parse_uuid(text: &[u8]) -> Option<[u8; 16]> {
    let text = text.trim_ascii();
    let mut out = [0u8; 16];
    let mut digits = 0usize;
    for &c in text {
        if c == b'-' {
            continue;
        }
        let v = (c as char).to_digit(16)? as u8;
        let byte = out.get_mut(digits / 2)?;
        *byte = (*byte << 4) | v;
        digits += 1;
    }
    (digits == 32).then_some(out)
}

/// `PRETTY_NAME` from an os-release file, unquoted.
fn read_os_release(path: &Path) -> Option<String> {
    let f = File::open(path).ok()?;
    for line in BufReader::new(f.take(64 * 1024)).lines() {
        let line = line.ok()?;
        if let Some(v) = line.trim().strip_prefix("PRETTY_NAME=") {
            return Some(unquote(v));
        }
    }
    None
}

/// Removes os-release's shell-style quoting from a value (`"a \"b\""` → `a "b"`).
fn unquote(v: &str) -> String {
    let v = v.trim();
    let inner = match v.as_bytes() {
        [q @ (b'"' | b'\''), .., last] if last == q && v.len() >= 2 => &v[1..v.len() - 1],
        _ => v,
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `s` cut to at most [`MAX_NAME`] bytes at a character boundary.
pub(crate) fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_NAME);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

struct Uname {
    sysname: String,
    nodename: String,
    release: String,
}

fn uname() -> Option<Uname> {
    // SAFETY: `utsname` is plain old data (arrays of c_char); all-zero is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable `utsname`.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let field = |f: &[libc::c_char]| {
        // The kernel NUL-terminates every field; guard anyway by searching within the array.
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Some(Uname {
        sysname: field(&u.sysname),
        nodename: field(&u.nodename),
        release: field(&u.release),
    })
}

/// Addresses of the interfaces that are not loopback, as `addr/prefix`, deduplicated, at
/// most [`MAX_ADDRESSES`]. Empty if `getifaddrs` fails.
pub fn interface_addresses() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; on success it owns a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() && out.len() < MAX_ADDRESSES {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_flags & libc::IFF_LOOPBACK as libc::c_uint != 0 || ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: non-null addresses of the list point to sockaddrs sized for their family;
        // the netmask, when present, has the same family.
        let entry = unsafe { sockaddr_ip(ifa.ifa_addr) }.map(|addr| {
            let prefix = unsafe { sockaddr_ip(ifa.ifa_netmask) }
                .map(prefix_len)
                .unwrap_or(match addr {
                    IpAddr::V4(_) => 32,
                    IpAddr::V6(_) => 128,
                });
            format!("{addr}/{prefix}")
        });
        if let Some(e) = entry {
            if !out.contains(&e) {
                out.push(e);
            }
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The IP address in a sockaddr, for `AF_INET`/`AF_INET6`.
///
/// # Safety
/// `sa` is null or points to a sockaddr whose size matches its `sa_family`.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees `sa` points to a sockaddr of its family's size.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

/// Prefix length of a netmask (its leading one bits).
fn prefix_len(mask: IpAddr) -> u32 {
    match mask {
        IpAddr::V4(m) => u32::from(m).leading_ones(),
        IpAddr::V6(m) => u128::from(m).leading_ones(),
    }
}

/// Reads the host name alone (`uname -n`), e.g. for enrolment.
pub fn hostname() -> Option<String> {
    uname().map(|u| bounded(&u.nodename))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_parsing() {
        let id = parse_uuid(b"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n").unwrap();
        assert_eq!(
            id,
            [
                0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69, 0x78, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2,
                0xe1, 0xf0
            ]
        );
        assert_eq!(parse_uuid(b"0f1e2d3c4b5a69788796a5b4c3d2e1f0"), Some(id));
        assert_eq!(parse_uuid(b"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1"), None);
        assert_eq!(parse_uuid(b"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0ff"), None);
        assert_eq!(parse_uuid(b"zz1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), None);
    }

    #[test]
    fn os_release_quoting() {
        assert_eq!(
            unquote("\"Debian GNU/Linux 12 (bookworm)\""),
            "Debian GNU/Linux 12 (bookworm)"
        );
        assert_eq!(unquote("'Alpine'"), "Alpine");
        assert_eq!(unquote("Plain"), "Plain");
        assert_eq!(unquote(r#""say \"hi\"""#), "say \"hi\"");
        assert_eq!(unquote("\""), "\"");
    }

    #[test]
    fn bounded_cuts_at_char_boundary() {
        let s = "é".repeat(200); // 400 bytes
        let b = bounded(&s);
        assert!(b.len() <= MAX_NAME && b.len() == 254);
        assert_eq!(bounded("short"), "short");
    }

    #[test]
    fn prefix_lengths() {
        assert_eq!(prefix_len("255.255.255.0".parse().unwrap()), 24);
        assert_eq!(prefix_len("0.0.0.0".parse().unwrap()), 0);
        assert_eq!(prefix_len("ffff:ffff:ffff:ffff::".parse().unwrap()), 64);
    }

    #[test]
    fn report_on_this_machine_with_fixture_paths() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot_id");
        std::fs::write(&boot, "11111111-2222-3333-4444-555555555555\n").unwrap();
        let os = dir.path().join("os-release");
        std::fs::write(&os, "NAME=\"X\"\nPRETTY_NAME=\"Fixture OS 1\"\n").unwrap();
        let root = dir.path().join("root");
        crate::inventory::tests::fake_tree(&root);
        let dpkg = root.join("var/lib/dpkg/status");
        std::fs::create_dir_all(dpkg.parent().unwrap()).unwrap();
        std::fs::write(
            &dpkg,
            "Package: a\nStatus: install ok installed\nVersion: 1\n\n\
             Package: b\nStatus: install ok installed\nVersion: 2\n\n\
             Package: c\nStatus: install ok installed\nVersion: 3\n",
        )
        .unwrap();
        let cfg = ReportConfig {
            os_release: os,
            boot_id: boot,
            root: root.clone(),
            dpkg_status: None,
        };
        let r = collect(&cfg).unwrap();
        assert_eq!(r.boot_id[0], 0x11);
        assert_eq!(r.boot_id[15], 0x55);
        assert_eq!(r.os, "Fixture OS 1");
        assert!(!r.kernel.is_empty() && r.kernel != "unknown");
        assert!(!r.hostname.is_empty() && r.hostname != "unknown");
        assert_eq!(r.agent_version, AGENT_VERSION);
        assert_eq!(r.software.len(), 3);
        assert_eq!(r.package_manager, fleetcast_wire::PackageManager::Dpkg);
        // CPU, memory and devices come from the fake tree, never the machine's hardware.
        assert_eq!((&*r.cpu_model, r.cpus), ("Fake CPU @ 2.0GHz", 2));
        assert_eq!(r.memory, 8_048_576 * 1024);
        assert_eq!(r.devices, crate::inventory::devices(&root));
        assert_eq!(r.devices.len(), 6);
        for a in &r.addresses {
            let (ip, prefix) = a.split_once('/').unwrap();
            let ip: IpAddr = ip.parse().unwrap();
            assert!(!ip.is_loopback(), "{a}");
            prefix.parse::<u8>().unwrap();
        }
        // The wire form encodes (every field within its limit).
        let msg = fleetcast_wire::Message::Report(r.clone());
        let mut buf = vec![0; msg.buffer_len().unwrap()];
        msg.emit(&mut buf).unwrap();

        // Missing dpkg database: empty list, not an error. Missing boot id: an error.
        let cfg2 = ReportConfig {
            dpkg_status: Some(dir.path().join("nope")),
            ..cfg.clone()
        };
        assert!(collect(&cfg2).unwrap().software.is_empty());
        let cfg3 = ReportConfig {
            boot_id: dir.path().join("nope"),
            ..cfg
        };
        assert!(matches!(collect(&cfg3), Err(ReportError::Io { .. })));
        std::fs::write(dir.path().join("bad"), "not a uuid").unwrap();
        assert!(matches!(
            read_boot_id(&dir.path().join("bad")),
            Err(ReportError::BadBootId { .. })
        ));
    }

    #[test]
    fn real_system_sources_when_present() {
        // The machine's own boot id and os-release, when this runs on Linux with /proc.
        let cfg = ReportConfig::default();
        if cfg.boot_id.exists() {
            let r = collect(&cfg).unwrap();
            assert_ne!(r.boot_id, [0; 16]);
            assert!(!r.os.is_empty());
        }
    }
}
