//! The hardware part of the configuration report: CPU, memory and attached devices (block
//! devices, network interfaces, USB devices, serial ports), read from `/proc`, `/sys` and
//! `/dev` under a root directory, so tests read a fake tree and never the machine's hardware.
//!
//! Invariants:
//! - Every string fits the wire's [`MAX_NAME`](fleetcast_wire::msg::limits::MAX_NAME) and at most [`MAX_DEVICES`] devices are listed,
//!   so the report always encodes.
//! - Nothing here fails: a missing or unreadable source is left out (an empty list, a zero),
//!   because a report with less in it is better than no report.
//! - Devices are listed in a stable order (by kind, then kernel name), so two reports of an
//!   unchanged machine are equal.

use std::fs;
use std::io::{BufRead, BufReader, Read as _};
use std::path::Path;

use fleetcast_wire::msg::limits::MAX_DEVICES;
use fleetcast_wire::{Attached, AttachedKind};

use crate::report::bounded;

/// Most bytes of a `/sys` attribute or of `proc/meminfo` read: attributes are one short
/// line, and `MemTotal` is meminfo's first. (`proc/cpuinfo` is read line by line instead: it
/// has a block per processor, and all are counted.)
const MAX_ATTR: u64 = 4096;

/// CPU model (the first `model name`, else `Model`/`Hardware` as ARM kernels say it) and the
/// number of processors in `proc/cpuinfo` under `root`.
pub fn cpu(root: &Path) -> (String, u16) {
    let Ok(f) = fs::File::open(root.join("proc/cpuinfo")) else {
        return (String::new(), 0);
    };
    let mut model = None;
    let mut fallback = None;
    let mut count: u16 = 0;
    for line in BufReader::new(f).lines() {
        let Ok(line) = line else { break };
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "processor" => count = count.saturating_add(1),
            "model name" if model.is_none() => model = Some(v.to_owned()),
            "Model" | "Hardware" | "cpu model" if fallback.is_none() => {
                fallback = Some(v.to_owned())
            }
            _ => {}
        }
    }
    (bounded(&model.or(fallback).unwrap_or_default()), count)
}

/// `MemTotal` of `proc/meminfo` under `root`, in bytes (0 when unknown).
pub fn memory(root: &Path) -> u64 {
    let text = read_attr(&root.join("proc/meminfo")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map_or(0, |kb| kb.saturating_mul(1024))
}

/// Every attached device under `root`, at most [`MAX_DEVICES`].
pub fn devices(root: &Path) -> Vec<Attached<'static>> {
    let mut out = block_devices(root);
    out.extend(net_interfaces(root));
    out.extend(usb_devices(root));
    out.extend(serial_ports(root));
    out.truncate(MAX_DEVICES);
    out
}

/// `sys/block/*` with size (`size` counts 512-byte sectors whatever the logical block size),
/// `device/model`, `device/serial` (else `device/vpd_pg80`) and `wwid` (else `device/wwid`).
/// Virtual devices (loop, ram, zram, device-mapper) have no `device` link and are left out:
/// nobody targets them as hardware.
pub fn block_devices(root: &Path) -> Vec<Attached<'static>> {
    let dir = root.join("sys/block");
    names(&dir)
        .into_iter()
        .filter(|n| dir.join(n).join("device").exists())
        .map(|name| {
            let d = dir.join(&name);
            let serial = attr(&d.join("device/serial"))
                .or_else(|| attr(&d.join("device/vpd_pg80")))
                .unwrap_or_default();
            let wwn = attr(&d.join("wwid"))
                .or_else(|| attr(&d.join("device/wwid")))
                .unwrap_or_default();
            let size = attr(&d.join("size"))
                .and_then(|s| s.parse::<u64>().ok())
                .map_or(0, |sectors| sectors.saturating_mul(512));
            Attached {
                kind: AttachedKind::Disk,
                id: bounded(if serial.is_empty() { &wwn } else { &serial }).into(),
                wwn: bounded(&wwn).into(),
                model: bounded(&attr(&d.join("device/model")).unwrap_or_default()).into(),
                name: bounded(&name).into(),
                size,
            }
        })
        .collect()
}

/// `sys/class/net/*` except loopback, identified by MAC address (`address`), with the
/// driver's name (the `device/driver` link's target) as model when there is a device.
pub fn net_interfaces(root: &Path) -> Vec<Attached<'static>> {
    let dir = root.join("sys/class/net");
    names(&dir)
        .into_iter()
        .filter(|n| n != "lo")
        .map(|name| {
            let d = dir.join(&name);
            let driver = fs::read_link(d.join("device/driver"))
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
                .unwrap_or_default();
            Attached {
                kind: AttachedKind::Net,
                id: bounded(&attr(&d.join("address")).unwrap_or_default()).into(),
                wwn: "".into(),
                model: bounded(&driver).into(),
                name: bounded(&name).into(),
                size: 0,
            }
        })
        .collect()
}

/// `sys/bus/usb/devices/*` that are devices (they have `idVendor`; interfaces like `1-1:1.0`
/// do not), identified as `vendor:product` plus `:serial` when the device has one, with
/// `manufacturer product` as model.
pub fn usb_devices(root: &Path) -> Vec<Attached<'static>> {
    let dir = root.join("sys/bus/usb/devices");
    names(&dir)
        .into_iter()
        .filter_map(|name| {
            let d = dir.join(&name);
            let vendor = attr(&d.join("idVendor"))?;
            let product = attr(&d.join("idProduct")).unwrap_or_default();
            let mut id = format!("{vendor}:{product}");
            if let Some(serial) = attr(&d.join("serial")) {
                id.push(':');
                id.push_str(&serial);
            }
            let model = [attr(&d.join("manufacturer")), attr(&d.join("product"))]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ");
            Some(Attached {
                kind: AttachedKind::Usb,
                id: bounded(&id).into(),
                wwn: "".into(),
                model: bounded(&model).into(),
                name: bounded(&name).into(),
                size: 0,
            })
        })
        .collect()
}

/// `dev/ttyS*`, `dev/ttyUSB*` and `dev/ttyACM*`, identified by their path on the device
/// (`/dev/ttyUSB0`, whatever `root` is). Legacy `ttyS` ports the kernel always creates are
/// listed only when `sys/class/tty/NAME/device` exists (a real UART behind them), when `sys`
/// is there to ask.
pub fn serial_ports(root: &Path) -> Vec<Attached<'static>> {
    let tty = root.join("sys/class/tty");
    let check_uart = tty.is_dir();
    names(&root.join("dev"))
        .into_iter()
        .filter(|n| {
            let numbered = |p: &str| {
                n.strip_prefix(p).is_some_and(|rest| {
                    !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())
                })
            };
            match () {
                _ if numbered("ttyUSB") || numbered("ttyACM") => true,
                _ if numbered("ttyS") => !check_uart || real_uart(&tty.join(n)),
                _ => false,
            }
        })
        .map(|name| Attached {
            kind: AttachedKind::Serial,
            id: bounded(&format!("/dev/{name}")).into(),
            wwn: "".into(),
            model: "".into(),
            name: bounded(&name).into(),
            size: 0,
        })
        .collect()
}

/// Whether a `ttyS` port has a UART: its `device` exists and the kernel says a port type
/// (`type` 0 is `PORT_UNKNOWN`: nothing there).
fn real_uart(class: &Path) -> bool {
    class.join("device").exists() && attr(&class.join("type")).is_none_or(|t| t != "0")
}

/// Entry names of a directory, sorted (empty when it cannot be read).
pub(crate) fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A `/sys` attribute: trimmed, `None` when missing or empty.
pub(crate) fn attr(path: &Path) -> Option<String> {
    let text = read_attr(path)?;
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

fn read_attr(path: &Path) -> Option<String> {
    let mut buf = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_ATTR).read_to_end(&mut buf))
        .ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    /// A fake machine: two disks (one with serial and WWN, one with WWN only), a loop device,
    /// `eth0` and `lo`, a USB hub port with an interface, two serial ports and a phantom ttyS.
    pub(crate) fn fake_tree(root: &Path) {
        put(
            root,
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: Fake CPU @ 2.0GHz\n\nprocessor\t: 1\nmodel name\t: Fake CPU @ 2.0GHz\n",
        );
        put(
            root,
            "proc/meminfo",
            "MemTotal:        8048576 kB\nMemFree:  1 kB\n",
        );
        put(root, "sys/block/sda/size", "976773168\n");
        put(root, "sys/block/sda/device/model", "Samsung SSD 860 \n");
        put(root, "sys/block/sda/device/serial", "S3Z9NB0K123456\n");
        put(root, "sys/block/sda/wwid", "naa.5002538e40a1b2c3\n");
        put(root, "sys/block/nvme0n1/size", "2048\n");
        put(root, "sys/block/nvme0n1/device/model", "FakeNVMe\n");
        put(root, "sys/block/nvme0n1/wwid", "eui.0025388b91b0a1c2\n");
        put(root, "sys/block/loop0/size", "100\n");
        put(root, "sys/class/net/eth0/address", "52:54:00:12:34:56\n");
        put(root, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
        put(root, "sys/bus/usb/devices/1-1/idVendor", "0403\n");
        put(root, "sys/bus/usb/devices/1-1/idProduct", "6001\n");
        put(root, "sys/bus/usb/devices/1-1/serial", "A50285BI\n");
        put(root, "sys/bus/usb/devices/1-1/manufacturer", "FTDI\n");
        put(root, "sys/bus/usb/devices/1-1/product", "FT232R USB UART\n");
        put(root, "sys/bus/usb/devices/1-1:1.0/bInterfaceClass", "ff\n");
        put(root, "dev/ttyUSB0", "");
        put(root, "dev/ttyS0", "");
        put(root, "dev/ttyS1", "");
        put(root, "dev/ttySX", "");
        put(root, "dev/null", "");
        put(root, "sys/class/tty/ttyS0/device/uevent", "");
        put(root, "sys/class/tty/ttyS0/type", "4\n");
        put(root, "sys/class/tty/ttyS1/type", "0\n");
    }

    #[test]
    fn cpu_and_memory_from_a_fake_proc() {
        let dir = tempfile::tempdir().unwrap();
        fake_tree(dir.path());
        assert_eq!(cpu(dir.path()), ("Fake CPU @ 2.0GHz".to_owned(), 2));
        assert_eq!(memory(dir.path()), 8_048_576 * 1024);
        // ARM: no `model name`, a `Hardware` line.
        put(
            dir.path(),
            "proc/cpuinfo",
            "processor : 0\nHardware : BCM2835\n",
        );
        assert_eq!(cpu(dir.path()), ("BCM2835".to_owned(), 1));
        // Nothing there: unknown, not an error.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(cpu(empty.path()), (String::new(), 0));
        assert_eq!(memory(empty.path()), 0);
        assert!(devices(empty.path()).is_empty());
    }

    #[test]
    fn attached_devices_from_a_fake_sys_and_dev() {
        let dir = tempfile::tempdir().unwrap();
        fake_tree(dir.path());
        let devs = devices(dir.path());
        let rows: Vec<_> = devs
            .iter()
            .map(|d| (d.kind, &*d.name, &*d.id, &*d.wwn, &*d.model, d.size))
            .collect();
        assert_eq!(
            rows,
            [
                (
                    AttachedKind::Disk,
                    "nvme0n1",
                    "eui.0025388b91b0a1c2",
                    "eui.0025388b91b0a1c2",
                    "FakeNVMe",
                    2048 * 512
                ),
                (
                    AttachedKind::Disk,
                    "sda",
                    "S3Z9NB0K123456",
                    "naa.5002538e40a1b2c3",
                    "Samsung SSD 860",
                    976_773_168 * 512
                ),
                (AttachedKind::Net, "eth0", "52:54:00:12:34:56", "", "", 0),
                (
                    AttachedKind::Usb,
                    "1-1",
                    "0403:6001:A50285BI",
                    "",
                    "FTDI FT232R USB UART",
                    0
                ),
                (AttachedKind::Serial, "ttyS0", "/dev/ttyS0", "", "", 0),
                (AttachedKind::Serial, "ttyUSB0", "/dev/ttyUSB0", "", "", 0),
            ]
        );
    }
}
