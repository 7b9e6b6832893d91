//! Where a push lands on the device, and whether it may: a file path (as today), a block
//! device or partition named by a stable id, or an A/B slot; and the refusals that keep an
//! image off a disk in use.
//!
//! A target is written as one of
//! - an absolute file path (`/var/lib/images/os.img`), never under `/dev/`;
//! - `serial=ID` or `wwn=ID`: the disk whose sysfs attributes say so (the ids
//!   [`inventory::block_devices`](crate::inventory::block_devices) reports), else the
//!   `/dev/disk/by-id/` link ending in `_ID` (serial) or named `wwn-ID`;
//! - `partlabel=L`, `partuuid=U`, `uuid=U`: the `/dev/disk/by-partlabel`, `by-partuuid`,
//!   `by-uuid` link;
//! - `slot=a` or `slot=b`: the target the agent's configuration gives that slot; `slot=inactive`:
//!   the one of the two the device does not run now (read from the running-slot source).
//!
//! A bare `/dev/sdX` is refused: kernel names move between boots and between identical
//! machines, and an image written to the wrong disk is not undone.
//!
//! Everything reads under a root directory (`/` on a device) — `sys/`, `dev/disk/`,
//! `proc/self/mountinfo` — like `inventory.rs`, so tests build a fake tree. The one thing a
//! fake tree cannot have is a device node: a target whose node is a real block device has its
//! size from `BLKGETSIZE64`; in a fake tree, from sysfs `size`.
//!
//! Refusals ([`Refusal`], checked by [`Host::check`] before anything is written): the target
//! or any partition of it is mounted or held (device-mapper, md); it is the device `/` is on,
//! or that device's disk; it is smaller than the image.

use std::fs;
use std::path::{Path, PathBuf};

use crate::inventory::{attr, names};

/// The stable-id kinds a target may name, as written before `=` (for the error that lists
/// them).
pub const ID_KINDS: &str = "serial, wwn, partlabel, partuuid, uuid, slot (a, b or inactive)";

/// An A/B slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Slot `a`.
    A,
    /// Slot `b`.
    B,
}

impl Slot {
    /// `a` or `b`.
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `a` or `b` (exactly).
    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

/// A push target as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// A regular file.
    File(PathBuf),
    /// The disk with this serial number.
    Serial(String),
    /// The disk with this World Wide Name.
    Wwn(String),
    /// The partition with this GPT partition label.
    PartLabel(String),
    /// The partition with this partition UUID.
    PartUuid(String),
    /// The device holding the file system with this UUID.
    Uuid(String),
    /// A slot of the agent's configuration.
    Slot(Slot),
    /// The slot the device does not run now (`slot=inactive`: an update's target, the same
    /// push for devices that run different slots). The driver turns it into [`TargetSpec::Slot`]
    /// once it has read the running slot; [`Host::resolve`] refuses it.
    InactiveSlot,
}

/// Why a target could not be named or found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Nothing written.
    #[error("the target is empty; it takes an absolute file path or KIND=ID with KIND one of {ID_KINDS}")]
    Empty,
    /// `KIND=…` with a kind that is not one of [`ID_KINDS`].
    #[error("`{0}=` is not a kind of target id; it takes {ID_KINDS}, or an absolute file path")]
    UnknownKind(String),
    /// `KIND=` with nothing after it.
    #[error("`{0}=` needs an id after it")]
    EmptyId(&'static str),
    /// A path under `/dev`.
    #[error("{0} is a kernel device name; name a disk or partition by a stable id instead ({ID_KINDS}), e.g. partlabel=rootfs-b")]
    BareDevice(PathBuf),
    /// A relative path.
    #[error("{0} is a relative path; a file target is an absolute path")]
    RelativePath(PathBuf),
    /// A file path that is (or links to) a block device.
    #[error("{path} is the block device {device}; name it by a stable id instead ({ID_KINDS})")]
    LinksToDevice {
        /// As written.
        path: PathBuf,
        /// What it resolves to.
        device: PathBuf,
    },
    /// `slot=` with another value than `a`, `b` or `inactive`.
    #[error("`slot={0}`: a slot is a, b or inactive")]
    BadSlot(String),
    /// `slot=…` on an agent with no slots configured.
    #[error("`slot={0}`: this agent has no A/B slots configured (slot_a, slot_b)")]
    NoSlots(&'static str),
    /// `slot=inactive` before the running slot was read (a driver's mistake: it reads the
    /// running slot first).
    #[error("`slot=inactive` names a slot only once the running slot is known")]
    InactiveUnread,
    /// A slot whose target is itself a slot.
    #[error("slot {0}'s target is a slot; a slot's target is a file path or a stable id")]
    SlotOfSlot(&'static str),
    /// No device has the id.
    #[error("no device has {spec} (looked in {looked})")]
    NotFound {
        /// The target as written.
        spec: String,
        /// Where it was looked for.
        looked: String,
    },
    /// More than one device has the id.
    #[error("{spec} names more than one device: {devices}")]
    Ambiguous {
        /// The target as written.
        spec: String,
        /// Their kernel names.
        devices: String,
    },
}

impl TargetSpec {
    /// Parses a target as written (see the module doc).
    pub fn parse(s: &str) -> Result<TargetSpec, ResolveError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ResolveError::Empty);
        }
        if s.starts_with('/') {
            let p = PathBuf::from(s);
            if p.starts_with("/dev") {
                return Err(ResolveError::BareDevice(p));
            }
            return Ok(TargetSpec::File(p));
        }
        let Some((kind, id)) = s.split_once('=') else {
            return Err(ResolveError::RelativePath(s.into()));
        };
        let kind_name = match kind {
            "serial" => "serial",
            "wwn" => "wwn",
            "partlabel" => "partlabel",
            "partuuid" => "partuuid",
            "uuid" => "uuid",
            "slot" => "slot",
            other => return Err(ResolveError::UnknownKind(other.into())),
        };
        if id.is_empty() {
            return Err(ResolveError::EmptyId(kind_name));
        }
        let id = id.to_owned();
        Ok(match kind_name {
            "serial" => TargetSpec::Serial(id),
            "wwn" => TargetSpec::Wwn(id),
            "partlabel" => TargetSpec::PartLabel(id),
            "partuuid" => TargetSpec::PartUuid(id),
            "uuid" => TargetSpec::Uuid(id),
            _ if id == "inactive" => TargetSpec::InactiveSlot,
            _ => TargetSpec::Slot(Slot::parse(&id).ok_or(ResolveError::BadSlot(id))?),
        })
    }
}

impl std::fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetSpec::File(p) => write!(f, "{}", p.display()),
            TargetSpec::Serial(s) => write!(f, "serial={s}"),
            TargetSpec::Wwn(s) => write!(f, "wwn={s}"),
            TargetSpec::PartLabel(s) => write!(f, "partlabel={s}"),
            TargetSpec::PartUuid(s) => write!(f, "partuuid={s}"),
            TargetSpec::Uuid(s) => write!(f, "uuid={s}"),
            TargetSpec::Slot(s) => write!(f, "slot={}", s.name()),
            TargetSpec::InactiveSlot => f.write_str("slot=inactive"),
        }
    }
}

/// The two slots' targets (from the agent's configuration), for `slot=` targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotTargets {
    /// Slot a's target.
    pub a: TargetSpec,
    /// Slot b's target.
    pub b: TargetSpec,
}

impl SlotTargets {
    /// The target of `slot`.
    pub fn get(&self, slot: Slot) -> &TargetSpec {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }
}

/// A resolved target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A regular file (it may not exist yet).
    File(PathBuf),
    /// A block device: its node and kernel name, and its disk's when it is a partition.
    Device {
        /// Its node (`<root>/dev/NAME`).
        node: PathBuf,
        /// Its kernel name (`sda2`).
        name: String,
        /// The disk it is a partition of (`sda`), `None` for a whole disk.
        disk: Option<String>,
    },
}

/// Why a resolved target must not be written.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// It, or a partition of it, is mounted.
    #[error("{device} is mounted on {mount_point}")]
    Mounted {
        /// The mounted device (the target or a partition of it).
        device: String,
        /// Where.
        mount_point: String,
    },
    /// It, or a partition of it, is in use by another block device (device-mapper, md).
    #[error("{device} is in use by {holder}")]
    Held {
        /// The held device.
        device: String,
        /// What holds it (`dm-0`).
        holder: String,
    },
    /// It is the device `/` is on, or that device's disk.
    #[error(
        "{device} holds the running system's root file system (on {root}); write the other slot"
    )]
    BootDevice {
        /// The target.
        device: String,
        /// The device `/` is mounted from.
        root: String,
    },
    /// It is smaller than the image.
    #[error("{target} has room for {have} bytes; the image is {need} bytes")]
    TooSmall {
        /// The target.
        target: String,
        /// The image's size.
        need: u64,
        /// The target's size (a file: its length plus the free space of its file system).
        have: u64,
    },
    /// Its size could not be read.
    #[error("cannot read the size of {path}: {source}")]
    Size {
        /// The node or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// One line of `mountinfo`: the device (major:minor and source) and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` as the kernel writes it.
    pub dev: String,
    /// Mount point (octal escapes decoded).
    pub mount_point: String,
    /// The mount source (`/dev/sda1`), after the ` - ` separator and the fs type.
    pub source: String,
}

/// Parses `/proc/self/mountinfo` (proc(5)): `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS
/// [OPTIONAL…] - FSTYPE SOURCE SUPEROPTS`. Lines that do not parse are skipped (a kernel adding
/// a field must not make every target look unmounted — it only drops that line).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let f: Vec<&str> = head.split(' ').collect();
            let mut t = tail.split(' ');
            let _fstype = t.next()?;
            Some(Mount {
                dev: (*f.get(2)?).to_owned(),
                mount_point: unescape(f.get(4)?),
                source: unescape(t.next()?),
            })
        })
        .collect()
}

/// Decodes mountinfo's `\NNN` octal escapes (space, tab, newline, backslash).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The machine as seen under a root directory.
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
}

impl Host {
    /// The machine under `root` (`/` on a device; a fake tree in tests).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Host { root: root.into() }
    }

    /// Resolves `spec`; `slots` are the configured slots (for `slot=`).
    pub fn resolve(
        &self,
        spec: &TargetSpec,
        slots: Option<&SlotTargets>,
    ) -> Result<Target, ResolveError> {
        match spec {
            TargetSpec::File(p) => self.file(p),
            TargetSpec::InactiveSlot => Err(ResolveError::InactiveUnread),
            TargetSpec::Slot(s) => {
                let slots = slots.ok_or(ResolveError::NoSlots(s.name()))?;
                match slots.get(*s) {
                    TargetSpec::Slot(_) => Err(ResolveError::SlotOfSlot(s.name())),
                    inner => self.resolve(inner, None),
                }
            }
            TargetSpec::Serial(id) => {
                self.disk_by(spec, id, &["device/serial", "device/vpd_pg80"], |n| {
                    n.rsplit_once('_').is_some_and(|(_, tail)| tail == id)
                })
            }
            TargetSpec::Wwn(id) => self.disk_by(spec, id, &["wwid", "device/wwid"], |n| {
                n.strip_prefix("wwn-").is_some_and(|w| w == id)
            }),
            TargetSpec::PartLabel(id) => self.by_link(spec, "by-partlabel", id),
            TargetSpec::PartUuid(id) => self.by_link(spec, "by-partuuid", id),
            TargetSpec::Uuid(id) => self.by_link(spec, "by-uuid", id),
        }
    }

    fn file(&self, p: &Path) -> Result<Target, ResolveError> {
        use std::os::unix::fs::FileTypeExt;
        // A path that leads to a block device (a symlink into /dev) is a bare device name
        // in disguise.
        if let Ok(real) = fs::canonicalize(p) {
            let dev = fs::metadata(&real).is_ok_and(|m| m.file_type().is_block_device());
            if dev || real.starts_with("/dev") {
                return Err(ResolveError::LinksToDevice {
                    path: p.to_owned(),
                    device: real,
                });
            }
        }
        Ok(Target::File(p.to_owned()))
    }

    /// The disk whose sysfs `attrs` (first present) equal `id`, else the one
    /// `/dev/disk/by-id` entry `link_matches` picks.
    fn disk_by(
        &self,
        spec: &TargetSpec,
        id: &str,
        attrs: &[&str],
        link_matches: impl Fn(&str) -> bool,
    ) -> Result<Target, ResolveError> {
        let block = self.root.join("sys/block");
        let mut found: Vec<String> = names(&block)
            .into_iter()
            .filter(|d| {
                attrs
                    .iter()
                    .find_map(|a| attr(&block.join(d).join(a)))
                    .is_some_and(|v| v == id)
            })
            .collect();
        if found.is_empty() {
            let by_id = self.root.join("dev/disk/by-id");
            found = names(&by_id)
                .into_iter()
                .filter(|n| link_matches(n))
                .filter_map(|n| link_name(&by_id.join(n)))
                .collect();
            found.sort();
            found.dedup();
        }
        self.one(spec, found, "sys/block/*/{serial,wwid} and dev/disk/by-id")
    }

    fn by_link(&self, spec: &TargetSpec, dir: &str, id: &str) -> Result<Target, ResolveError> {
        let found = link_name(&self.root.join("dev/disk").join(dir).join(id))
            .into_iter()
            .collect();
        self.one(spec, found, &format!("dev/disk/{dir}"))
    }

    fn one(
        &self,
        spec: &TargetSpec,
        found: Vec<String>,
        looked: &str,
    ) -> Result<Target, ResolveError> {
        match found.as_slice() {
            [] => Err(ResolveError::NotFound {
                spec: spec.to_string(),
                looked: looked.to_owned(),
            }),
            [name] => Ok(Target::Device {
                node: self.root.join("dev").join(name),
                disk: self.disk_of(name),
                name: name.clone(),
            }),
            many => Err(ResolveError::Ambiguous {
                spec: spec.to_string(),
                devices: many.join(", "),
            }),
        }
    }

    /// The disk `name` is a partition of (`sys/block/DISK/NAME/partition` exists).
    fn disk_of(&self, name: &str) -> Option<String> {
        let block = self.root.join("sys/block");
        names(&block)
            .into_iter()
            .find(|d| block.join(d).join(name).join("partition").exists())
    }

    /// The partitions of disk `name`.
    fn partitions(&self, disk: &str) -> Vec<String> {
        let d = self.root.join("sys/block").join(disk);
        names(&d)
            .into_iter()
            .filter(|p| d.join(p).join("partition").exists())
            .collect()
    }

    /// A device's sysfs directory (a disk's or a partition's).
    fn sys_dir(&self, name: &str) -> PathBuf {
        match self.disk_of(name) {
            Some(disk) => self.root.join("sys/block").join(disk).join(name),
            None => self.root.join("sys/block").join(name),
        }
    }

    fn mounts(&self) -> Vec<Mount> {
        fs::read_to_string(self.root.join("proc/self/mountinfo"))
            .map(|t| parse_mountinfo(&t))
            .unwrap_or_default()
    }

    /// Whether device `name` is the source of mount `m` (by major:minor, or by the source's
    /// kernel name for file systems whose mounts show another device number, like btrfs).
    fn is_source(&self, name: &str, m: &Mount) -> bool {
        let dev = attr(&self.sys_dir(name).join("dev"));
        dev.is_some_and(|d| d == m.dev) || m.source.strip_prefix("/dev/").is_some_and(|s| s == name)
    }

    /// The device `/` is mounted from (kernel name), when it is a block device here.
    fn root_device(&self, mounts: &[Mount]) -> Option<String> {
        let m = mounts.iter().rev().find(|m| m.mount_point == "/")?;
        let block = self.root.join("sys/block");
        names(&block)
            .into_iter()
            .flat_map(|d| {
                let mut v = self.partitions(&d);
                v.push(d);
                v
            })
            .find(|n| self.is_source(n, m))
    }

    /// Checks that `target` may take an image of `image_size` bytes (see [`Refusal`]).
    pub fn check(&self, target: &Target, image_size: u64) -> Result<(), Refusal> {
        match target {
            Target::File(p) => check_file(p, image_size),
            Target::Device { node, name, disk } => {
                self.check_device(node, name, disk.as_deref(), image_size)
            }
        }
    }

    /// The device rules, in the order a person would want to hear them: in use first (the
    /// reason that does not go away with a bigger disk), then size.
    pub fn check_device(
        &self,
        node: &Path,
        name: &str,
        disk: Option<&str>,
        image_size: u64,
    ) -> Result<(), Refusal> {
        let mounts = self.mounts();
        // The target and, for a whole disk, every partition of it.
        let mut covered = vec![name.to_owned()];
        if disk.is_none() {
            covered.extend(self.partitions(name));
        }
        if let Some(root) = self.root_device(&mounts) {
            let root_disk = self.disk_of(&root);
            if root == name || root_disk.as_deref() == Some(name) {
                return Err(Refusal::BootDevice {
                    device: name.to_owned(),
                    root,
                });
            }
        }
        for dev in &covered {
            if let Some(m) = mounts.iter().find(|m| self.is_source(dev, m)) {
                return Err(Refusal::Mounted {
                    device: dev.clone(),
                    mount_point: m.mount_point.clone(),
                });
            }
            if let Some(holder) = names(&self.sys_dir(dev).join("holders")).into_iter().next() {
                return Err(Refusal::Held {
                    device: dev.clone(),
                    holder,
                });
            }
        }
        let have = self.device_size(node, name)?;
        if have < image_size {
            return Err(Refusal::TooSmall {
                target: name.to_owned(),
                need: image_size,
                have,
            });
        }
        Ok(())
    }

    /// A device's size: `BLKGETSIZE64` when its node is a real block device, else sysfs
    /// `size` (512-byte sectors whatever the logical block size).
    fn device_size(&self, node: &Path, name: &str) -> Result<u64, Refusal> {
        use std::os::unix::fs::FileTypeExt;
        let size_err = |source| Refusal::Size {
            path: node.to_owned(),
            source,
        };
        if fs::metadata(node).is_ok_and(|m| m.file_type().is_block_device()) {
            let f = fs::File::open(node).map_err(size_err)?;
            return blk_size(&f).map_err(size_err);
        }
        attr(&self.sys_dir(name).join("size"))
            .and_then(|s| s.parse::<u64>().ok())
            .map(|sectors| sectors.saturating_mul(512))
            .ok_or_else(|| size_err(std::io::ErrorKind::NotFound.into()))
    }
}

/// The kernel name a `/dev/disk/by-*` link points at (`../../sda2` → `sda2`).
fn link_name(link: &Path) -> Option<String> {
    let t = fs::read_link(link).ok()?;
    Some(t.file_name()?.to_string_lossy().into_owned())
}

/// A file target: its length, or its length plus the free space of its file system (the
/// file grows into it), must hold the image.
fn check_file(p: &Path, image_size: u64) -> Result<(), Refusal> {
    let len = fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    if len >= image_size {
        return Ok(());
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("/"),
    };
    let free = free_space(dir).map_err(|source| Refusal::Size {
        path: dir.to_owned(),
        source,
    })?;
    let have = len.saturating_add(free);
    if have < image_size {
        return Err(Refusal::TooSmall {
            target: p.display().to_string(),
            need: image_size,
            have,
        });
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on `dir`'s file system (`statvfs`'s `f_bavail`).
fn free_space(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs only writes the struct we pass, which is ours and zeroed; `c` is a
    // NUL-terminated path that outlives the call.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // `fsblkcnt_t` and `c_ulong` are 32 bits on 32-bit targets, 64 here.
    #[allow(clippy::useless_conversion)]
    let (avail, frsize) = (u64::from(s.f_bavail), u64::from(s.f_frsize));
    Ok(avail.saturating_mul(frsize))
}

/// `BLKGETSIZE64` (`_IOR(0x12, 114, size_t)`), which libc does not export: the ioctl number
/// encodes the direction differently on a few architectures.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: u64 = 0x4008_1272;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: u64 = 0x8008_1272;

/// A block device's size in bytes.
pub fn blk_size(f: &fs::File) -> std::io::Result<u64> {
    use std::os::unix::io::AsRawFd;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`; the
    // descriptor is open for the call's duration.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests;
