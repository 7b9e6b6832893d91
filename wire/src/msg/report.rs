//! The configuration report: what a device says about itself (inside `Result`, `Report` and
//! `RebootComplete`), and the attached devices a step can target.
//!
//! Two layouts are read: wire version 3's (this one, [`ConfigReport::decode`]) and version
//! 2's ([`ConfigReport::decode_v2`], for the records the gateway's store and the agent's ledger
//! kept before version 3). Version 2 lacked everything after `software`; it reads as
//! "unknown": empty CPU model, zero CPUs and memory, [`PackageManager::None`], no devices.

use alloc::borrow::Cow;
use alloc::vec::Vec;

use super::control::wire_enum;
use super::limits::*;
use super::{borrowed_str16, owned, owned_list};
use crate::codec::{Reader, Sink};
use crate::error::{Error, Result};

/// An installed package in a [`ConfigReport`]. Fields: `name str16`, `version str16`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Package<'a> {
    /// Package name.
    pub name: Cow<'a, str>,
    /// Installed version.
    pub version: Cow<'a, str>,
}

wire_enum! {
    /// The package manager whose database the software list came from.
    PackageManager { None = 0, Dpkg = 1, Rpm = 2, Apk = 3, Opkg = 4 }
}

// `wire_enum!` fixes the derives of the enums it makes, so `Default` is written out.
#[allow(clippy::derivable_impls)]
impl Default for PackageManager {
    fn default() -> Self {
        PackageManager::None
    }
}

impl PackageManager {
    /// Its name as operators know it (`none` when the device has none the agent reads).
    pub fn name(self) -> &'static str {
        match self {
            PackageManager::None => "none",
            PackageManager::Dpkg => "dpkg",
            PackageManager::Rpm => "rpm",
            PackageManager::Apk => "apk",
            PackageManager::Opkg => "opkg",
        }
    }
}

wire_enum! {
    /// What kind of hardware an [`Attached`] device is.
    AttachedKind { Disk = 1, Net = 2, Usb = 3, Serial = 4 }
}

impl AttachedKind {
    /// The kind's name, as a step target spells it (`disk:SERIAL`).
    pub fn name(self) -> &'static str {
        match self {
            AttachedKind::Disk => "disk",
            AttachedKind::Net => "net",
            AttachedKind::Usb => "usb",
            AttachedKind::Serial => "serial",
        }
    }
    /// The kind of a wire code (`None` for a code no version defines).
    pub fn from_code(code: u8) -> Option<Self> {
        Self::from_u8(code).ok()
    }
    /// The kind a target's prefix names.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "disk" => AttachedKind::Disk,
            "net" => AttachedKind::Net,
            "usb" => AttachedKind::Usb,
            "serial" => AttachedKind::Serial,
            _ => return None,
        })
    }
}

/// What a command runs against: an attached device named by kind and stable id, written
/// `KIND:ID` (`disk:S3Z9NB0K123456`, `serial:/dev/ttyUSB0`). The agent checks that its report
/// lists it ([`Attached::matches`]) before it runs any step.
///
/// Fields: `kind u8` (an [`AttachedKind`]), `id str16` (non-empty).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Target<'a> {
    /// The kind of device.
    pub kind: AttachedKind,
    /// Its id, WWN or kernel name.
    pub id: Cow<'a, str>,
}

impl<'a> Target<'a> {
    /// Parses `KIND:ID`; `None` for an unknown kind or an empty or over-long id.
    pub fn parse(text: &'a str) -> Option<Self> {
        let (kind, id) = text.split_once(':')?;
        let kind = AttachedKind::from_name(kind)?;
        (!id.is_empty() && id.len() <= MAX_NAME).then_some(Target {
            kind,
            id: Cow::Borrowed(id),
        })
    }

    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        // An empty id names nothing: refused both ways, so what emits parses back.
        if self.id.is_empty() {
            return Err(Error::InvalidValue);
        }
        s.u8(self.kind as u8)?;
        s.str16(&self.id, MAX_NAME)
    }

    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self> {
        let kind = AttachedKind::from_u8(r.u8()?)?;
        let id = borrowed_str16(r, MAX_NAME)?;
        if id.is_empty() {
            return Err(Error::InvalidValue);
        }
        Ok(Target { kind, id })
    }

    /// This value, owning its id.
    pub fn into_owned(self) -> Target<'static> {
        Target {
            kind: self.kind,
            id: owned(self.id),
        }
    }
}

impl core::fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}:{}", self.kind.name(), self.id)
    }
}

/// A device attached to the managed computer, as its agent found it.
///
/// Fields: `kind u8`, `name str16` (the kernel's: `sda`, `eth0`, `1-1.2`, `ttyUSB0`),
/// `id str16` (the stable id a step targets: a disk's serial, else its WWN; an interface's MAC
/// address; a USB device's `vendor:product` and serial; a serial port's `/dev` path), `wwn
/// str16` (a disk's WWN, else empty), `model str16`, `size u64` (a disk's bytes, else 0).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Attached<'a> {
    /// What it is.
    pub kind: AttachedKind,
    /// The kernel's name for it.
    pub name: Cow<'a, str>,
    /// Its stable id.
    pub id: Cow<'a, str>,
    /// A disk's World Wide Name (empty otherwise or when it has none).
    pub wwn: Cow<'a, str>,
    /// Model or product text (empty when unknown).
    pub model: Cow<'a, str>,
    /// A disk's size in bytes (0 otherwise).
    pub size: u64,
}

impl Attached<'_> {
    /// Whether a target `kind:value` names this device: the kind matches and `value` is its
    /// id, its WWN or its kernel name (a serial port also by its `/dev` path, which is its id).
    pub fn matches(&self, kind: AttachedKind, value: &str) -> bool {
        self.kind == kind
            && !value.is_empty()
            && (*self.id == *value || *self.wwn == *value || *self.name == *value)
    }

    /// This value, owning its strings.
    pub fn into_owned(self) -> Attached<'static> {
        Attached {
            kind: self.kind,
            name: owned(self.name),
            id: owned(self.id),
            wwn: owned(self.wwn),
            model: owned(self.model),
            size: self.size,
        }
    }
}

/// A device's configuration report. Its `Default` is the empty report (tests and the
/// layouts of earlier versions fill what they know and leave the rest unknown).
///
/// Fields: `boot_id [16]`, `os str16`, `kernel str16`, `hostname str16`, `agent_version str16`,
/// `addresses list<str16>`, `software list<Package>`, then (wire version 3) `package_manager
/// u8`, `cpu_model str16`, `cpus u16`, `memory u64`, `devices list<Attached>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct ConfigReport<'a> {
    /// The current boot's id.
    pub boot_id: [u8; 16],
    /// Operating system name and version.
    pub os: Cow<'a, str>,
    /// Kernel release.
    pub kernel: Cow<'a, str>,
    /// Host name.
    pub hostname: Cow<'a, str>,
    /// Agent software version.
    pub agent_version: Cow<'a, str>,
    /// Interface addresses, textual (`10.0.0.5/24`).
    pub addresses: Vec<Cow<'a, str>>,
    /// Installed software.
    pub software: Vec<Package<'a>>,
    /// Where `software` came from.
    pub package_manager: PackageManager,
    /// The CPU's model name (empty when unknown).
    pub cpu_model: Cow<'a, str>,
    /// Logical processors (0 when unknown).
    pub cpus: u16,
    /// Total memory in bytes (0 when unknown).
    pub memory: u64,
    /// Attached devices, at most [`MAX_DEVICES`].
    pub devices: Vec<Attached<'a>>,
}

impl<'a> ConfigReport<'a> {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.put(&self.boot_id)?;
        s.str16(&self.os, MAX_NAME)?;
        s.str16(&self.kernel, MAX_NAME)?;
        s.str16(&self.hostname, MAX_NAME)?;
        s.str16(&self.agent_version, MAX_NAME)?;
        s.count(self.addresses.len(), MAX_ADDRESSES)?;
        self.addresses
            .iter()
            .try_for_each(|a| s.str16(a, MAX_NAME))?;
        s.count(self.software.len(), MAX_SOFTWARE)?;
        self.software.iter().try_for_each(|p| {
            s.str16(&p.name, MAX_NAME)?;
            s.str16(&p.version, MAX_NAME)
        })?;
        s.u8(self.package_manager as u8)?;
        s.str16(&self.cpu_model, MAX_NAME)?;
        s.u16(self.cpus)?;
        s.u64(self.memory)?;
        s.count(self.devices.len(), MAX_DEVICES)?;
        self.devices.iter().try_for_each(|d| {
            s.u8(d.kind as u8)?;
            s.str16(&d.name, MAX_NAME)?;
            s.str16(&d.id, MAX_NAME)?;
            s.str16(&d.wwn, MAX_NAME)?;
            s.str16(&d.model, MAX_NAME)?;
            s.u64(d.size)
        })
    }

    /// Decodes today's layout (wire version 3).
    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self> {
        let mut rep = Self::decode_v2(r)?;
        rep.package_manager = PackageManager::from_u8(r.u8()?)?;
        rep.cpu_model = borrowed_str16(r, MAX_NAME)?;
        rep.cpus = r.u16()?;
        rep.memory = r.u64()?;
        // The smallest device: kind, four empty strings, size.
        let n = r.count(MAX_DEVICES, 1 + 4 * 2 + 8)?;
        rep.devices = Vec::with_capacity(n);
        for _ in 0..n {
            rep.devices.push(Attached {
                kind: AttachedKind::from_u8(r.u8()?)?,
                name: borrowed_str16(r, MAX_NAME)?,
                id: borrowed_str16(r, MAX_NAME)?,
                wwn: borrowed_str16(r, MAX_NAME)?,
                model: borrowed_str16(r, MAX_NAME)?,
                size: r.u64()?,
            });
        }
        Ok(rep)
    }

    /// Decodes the layout of wire version 2 (everything up to `software`), the rest unknown.
    /// For records kept before version 3 (the store's, the agent's ledger).
    pub fn decode_v2(r: &mut Reader<'a>) -> Result<Self> {
        let boot_id = r.array()?;
        let os = borrowed_str16(r, MAX_NAME)?;
        let kernel = borrowed_str16(r, MAX_NAME)?;
        let hostname = borrowed_str16(r, MAX_NAME)?;
        let agent_version = borrowed_str16(r, MAX_NAME)?;
        let n = r.count(MAX_ADDRESSES, 2)?;
        let mut addresses = Vec::with_capacity(n);
        for _ in 0..n {
            addresses.push(borrowed_str16(r, MAX_NAME)?);
        }
        let n = r.count(MAX_SOFTWARE, 4)?;
        let mut software = Vec::with_capacity(n);
        for _ in 0..n {
            software.push(Package {
                name: borrowed_str16(r, MAX_NAME)?,
                version: borrowed_str16(r, MAX_NAME)?,
            });
        }
        Ok(ConfigReport {
            boot_id,
            os,
            kernel,
            hostname,
            agent_version,
            addresses,
            software,
            package_manager: PackageManager::None,
            cpu_model: Cow::Borrowed(""),
            cpus: 0,
            memory: 0,
            devices: Vec::new(),
        })
    }

    /// Decodes exactly `bytes` in the layout of wire version 2 (see [`Self::decode_v2`]).
    pub fn decode_v2_exact(bytes: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let v = Self::decode_v2(&mut r)?;
        r.finish()?;
        Ok(v)
    }

    /// The attached device `target` names, if the report lists it.
    pub fn find(&self, target: &Target<'_>) -> Option<&Attached<'a>> {
        self.attached(target.kind, &target.id)
    }

    /// The attached device a target `kind:value` names, if the report lists it.
    pub fn attached(&self, kind: AttachedKind, value: &str) -> Option<&Attached<'a>> {
        self.devices.iter().find(|d| d.matches(kind, value))
    }

    /// This report, owning its strings.
    pub fn into_owned(self) -> ConfigReport<'static> {
        ConfigReport {
            boot_id: self.boot_id,
            os: owned(self.os),
            kernel: owned(self.kernel),
            hostname: owned(self.hostname),
            agent_version: owned(self.agent_version),
            addresses: owned_list(self.addresses),
            software: self
                .software
                .into_iter()
                .map(|p| Package {
                    name: owned(p.name),
                    version: owned(p.version),
                })
                .collect(),
            package_manager: self.package_manager,
            cpu_model: owned(self.cpu_model),
            cpus: self.cpus,
            memory: self.memory,
            devices: self.devices.into_iter().map(Attached::into_owned).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::Embed;

    fn disk() -> Attached<'static> {
        Attached {
            kind: AttachedKind::Disk,
            name: "sda".into(),
            id: "S3Z9NB0K123456".into(),
            wwn: "naa.5002538e40a1b2c3".into(),
            model: "Samsung SSD 860".into(),
            size: 500_107_862_016,
        }
    }

    #[test]
    fn version_2_layout_reads_with_the_new_fields_unknown() {
        // Version 2's bytes, by hand: boot id, four strings, one address, one package.
        let mut v2 = vec![7u8; 16];
        for s in ["Debian", "6.1", "h1", "0.1.0"] {
            v2.extend_from_slice(&(s.len() as u16).to_be_bytes());
            v2.extend_from_slice(s.as_bytes());
        }
        v2.extend_from_slice(&[0, 1, 0, 4]);
        v2.extend_from_slice(b"a/24");
        v2.extend_from_slice(&[0, 1, 0, 1, b'p', 0, 1, b'1']);
        let r = ConfigReport::decode_v2_exact(&v2).unwrap();
        assert_eq!(
            (&*r.os, &*r.hostname, r.addresses.len()),
            ("Debian", "h1", 1)
        );
        assert_eq!(&*r.software[0].name, "p");
        assert_eq!(r.package_manager, PackageManager::None);
        assert_eq!((r.cpus, r.memory, r.devices.len()), (0, 0, 0));
        // Today's decoder wants the version-3 fields: the old bytes are truncated to it.
        assert_eq!(ConfigReport::decode_exact(&v2), Err(Error::Truncated));
        // And today's bytes are not a version-2 report (the new fields are trailing bytes).
        let mut now = Vec::new();
        r.encode_to_vec(&mut now).unwrap();
        assert_eq!(&now[..v2.len()], &v2[..]);
        assert_eq!(
            ConfigReport::decode_v2_exact(&now),
            Err(Error::TrailingBytes)
        );
    }

    #[test]
    fn report_with_devices_round_trips_and_bounds_the_list() {
        let mut r = ConfigReport {
            package_manager: PackageManager::Apk,
            cpu_model: "ARM Cortex-A72".into(),
            cpus: 4,
            memory: 8 << 30,
            devices: vec![disk()],
            ..Default::default()
        };
        let mut buf = Vec::new();
        r.encode_to_vec(&mut buf).unwrap();
        assert_eq!(ConfigReport::decode_exact(&buf).unwrap(), r);
        // A bad kind code is refused.
        let kind_at = buf.len() - (1 + 2 + 3 + 2 + 14 + 2 + 20 + 2 + 15 + 8);
        assert_eq!(buf[kind_at], AttachedKind::Disk as u8);
        buf[kind_at] = 9;
        assert_eq!(ConfigReport::decode_exact(&buf), Err(Error::InvalidValue));
        r.devices = vec![disk(); MAX_DEVICES + 1];
        assert_eq!(r.encode_to_vec(&mut Vec::new()), Err(Error::FieldTooLong));
    }

    #[test]
    fn a_target_matches_by_id_wwn_or_name_of_its_kind_only() {
        let r = ConfigReport {
            devices: vec![disk()],
            ..Default::default()
        };
        for v in ["S3Z9NB0K123456", "naa.5002538e40a1b2c3", "sda"] {
            assert!(r.attached(AttachedKind::Disk, v).is_some(), "{v}");
        }
        assert!(r.attached(AttachedKind::Disk, "S3Z9").is_none());
        assert!(r.attached(AttachedKind::Disk, "").is_none());
        assert!(r.attached(AttachedKind::Usb, "sda").is_none());
        assert_eq!(
            AttachedKind::from_name("serial"),
            Some(AttachedKind::Serial)
        );
        assert_eq!(
            AttachedKind::from_name("disk").map(AttachedKind::name),
            Some("disk")
        );
        assert_eq!(AttachedKind::from_name("bmc"), None);
        let t = Target::parse("disk:naa.5002538e40a1b2c3").unwrap();
        assert_eq!(r.find(&t).map(|d| &*d.name), Some("sda"));
        assert_eq!(t.to_string(), "disk:naa.5002538e40a1b2c3");
        let port = Target::parse("serial:/dev/ttyUSB0").unwrap();
        assert_eq!(
            (port.kind, &*port.id),
            (AttachedKind::Serial, "/dev/ttyUSB0")
        );
        for bad in ["disk:", "disk", "bmc:1", ":x"] {
            assert_eq!(Target::parse(bad), None, "{bad}");
        }
    }
}
