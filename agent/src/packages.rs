//! The software part of the configuration report: the installed packages, from the package
//! manager the device actually has (dpkg, rpm, apk or opkg, in that order of detection), read
//! under a root directory so tests use a fake tree.
//!
//! Invariants:
//! - At most [`MAX_SOFTWARE`] packages, every string within the wire's name limit
//!   (`report::bounded`): the report encodes.
//! - Memory is bounded by those caps: a database (megabytes on a full system) is streamed line
//!   by line, keeping only the current entry.
//! - Nothing here fails: an unreadable database (or an `rpm` that will not run) gives the
//!   detected manager with an empty list, so the operator sees which manager it was.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use fleetcast_wire::msg::limits::MAX_SOFTWARE;
use fleetcast_wire::{Package, PackageManager};

use crate::report::bounded;

/// dpkg's status database, under the root.
const DPKG_STATUS: &str = "var/lib/dpkg/status";
/// rpm's database directories (the classic one, and the one newer distributions moved to).
const RPM_DBS: [&str; 2] = ["var/lib/rpm", "usr/lib/sysimage/rpm"];
/// apk's installed database.
const APK_INSTALLED: &str = "lib/apk/db/installed";
/// opkg's status databases (OpenWrt's, then the one opkg's own default names).
const OPKG_STATUS: [&str; 2] = ["usr/lib/opkg/status", "var/lib/opkg/status"];

/// The installed software under `root`: the first package manager found and its packages.
/// `dpkg_status`, when given, is dpkg's database instead of the one under `root` (the lab
/// gives each agent its own): dpkg is then the manager, whatever `root` holds.
pub fn installed(
    root: &Path,
    dpkg_status: Option<&Path>,
) -> (PackageManager, Vec<Package<'static>>) {
    if let Some(own) = dpkg_status {
        return (PackageManager::Dpkg, read_with(own, parse_dpkg_status));
    }
    let dpkg = root.join(DPKG_STATUS);
    if dpkg.is_file() {
        return (PackageManager::Dpkg, read_with(&dpkg, parse_dpkg_status));
    }
    if RPM_DBS.iter().any(|d| root.join(d).is_dir()) {
        return (PackageManager::Rpm, rpm_query(root).unwrap_or_default());
    }
    let apk = root.join(APK_INSTALLED);
    if apk.is_file() {
        return (PackageManager::Apk, read_with(&apk, parse_apk_installed));
    }
    if let Some(opkg) = OPKG_STATUS
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
    {
        return (PackageManager::Opkg, read_with(&opkg, parse_dpkg_status));
    }
    (PackageManager::None, Vec::new())
}

fn read_with(
    path: &Path,
    parse: fn(BufReader<File>) -> io::Result<Vec<Package<'static>>>,
) -> Vec<Package<'static>> {
    File::open(path)
        .and_then(|f| parse(BufReader::new(f)))
        .unwrap_or_default()
}

/// The `rpm -qa` query format: name, tab, version-release (and epoch when set), a line each.
const RPM_QUERY: &str = "%{NAME}\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\n";

/// Runs `rpm -qa` (against `root`'s database when `root` is not `/`) and parses its output.
/// rpm's database is not a file format to read by hand (Berkeley DB, NDB or SQLite by
/// version), so its own query tool is the reader.
fn rpm_query(root: &Path) -> io::Result<Vec<Package<'static>>> {
    let mut cmd = Command::new("rpm");
    if root != Path::new("/") {
        cmd.arg("--root").arg(root);
    }
    let mut child = cmd
        .args(["-qa", "--qf", RPM_QUERY])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = child.stdout.take().map(BufReader::new);
    let pkgs = match out {
        Some(r) => parse_rpm_query(r),
        None => Ok(Vec::new()),
    };
    // Reaped whatever the parse did (it stops reading at the cap; rpm then gets EPIPE).
    let _ = child.kill();
    child.wait()?;
    pkgs
}

/// Parses `rpm -qa --qf '%{NAME}\t...%{VERSION}-%{RELEASE}\n'` output, at most
/// [`MAX_SOFTWARE`] packages; lines without a tab are skipped.
pub fn parse_rpm_query(mut r: impl BufRead) -> io::Result<Vec<Package<'static>>> {
    let mut out = Vec::new();
    let mut line = String::new();
    while out.len() < MAX_SOFTWARE {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        if let Some((name, version)) = line.trim_end().split_once('\t') {
            if !name.is_empty() {
                out.push(package(name, version));
            }
        }
    }
    Ok(out)
}

/// Parses apk's installed database: entries separated by blank lines, `P:` the name and
/// `V:` the version, at most [`MAX_SOFTWARE`]. Lines that are not UTF-8 are skipped.
pub fn parse_apk_installed(mut r: impl BufRead) -> io::Result<Vec<Package<'static>>> {
    let mut out = Vec::new();
    let (mut name, mut version) = (None::<String>, None::<String>);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        let eof = r.read_until(b'\n', &mut line)? == 0;
        let l = line.trim_ascii_end();
        if eof || l.is_empty() {
            if let (Some(n), Some(v)) = (name.take(), version.take()) {
                if out.len() < MAX_SOFTWARE {
                    out.push(package(&n, &v));
                }
            }
            if eof {
                break;
            }
            continue;
        }
        let Ok(l) = std::str::from_utf8(l) else {
            continue;
        };
        if let Some(v) = l.strip_prefix("P:") {
            name = Some(v.to_owned());
        } else if let Some(v) = l.strip_prefix("V:") {
            version = Some(v.to_owned());
        }
    }
    Ok(out)
}

fn package(name: &str, version: &str) -> Package<'static> {
    Package {
        name: bounded(name).into(),
        version: bounded(version).into(),
    }
}

/// Parses dpkg's status database (opkg's has the same form): `Package` and `Version` of each
/// entry whose `Status` wants it installed and has it installed (`install ok installed`;
/// opkg also writes `install user installed`), in file order, at most [`MAX_SOFTWARE`].
/// Lines that are not UTF-8 (descriptions in legacy encodings) are skipped.
pub fn parse_dpkg_status(mut r: impl BufRead) -> io::Result<Vec<Package<'static>>> {
    #[derive(Default)]
    struct Entry {
        name: Option<String>,
        version: Option<String>,
        installed: bool,
    }
    fn finish(e: &mut Entry, out: &mut Vec<Package<'static>>) {
        let e = std::mem::take(e);
        if let (true, Some(name), Some(version)) = (e.installed, e.name, e.version) {
            if out.len() < MAX_SOFTWARE {
                out.push(package(&name, &version));
            }
        }
    }
    let mut out = Vec::new();
    let mut entry = Entry::default();
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let l = line.trim_ascii_end();
        if l.is_empty() {
            finish(&mut entry, &mut out);
            continue;
        }
        // Continuation lines start with a space or tab.
        if l[0] == b' ' || l[0] == b'\t' {
            continue;
        }
        let Ok(l) = std::str::from_utf8(l) else {
            continue;
        };
        let Some((field, value)) = l.split_once(':') else {
            continue;
        };
        let value = value.trim();
        // Field names are case-insensitive (deb822).
        if field.eq_ignore_ascii_case("Package") {
            entry.name = Some(value.to_owned());
        } else if field.eq_ignore_ascii_case("Version") {
            entry.version = Some(value.to_owned());
        } else if field.eq_ignore_ascii_case("Status") {
            let words: Vec<&str> = value.split_ascii_whitespace().collect();
            entry.installed = matches!(words[..], ["install", "ok" | "user", "installed"]);
        }
    }
    finish(&mut entry, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DPKG_FIXTURE: &[u8] = b"\
Package: adduser
Status: install ok installed
Priority: important
Version: 3.134
Description: add and remove users and groups
 This package includes the 'adduser' and 'deluser' commands.
 .
 Version: 9.9 (a continuation line, not a field)

Package: removed-pkg
Status: deinstall ok config-files
Version: 1.0

Package: half
Status: install ok half-installed
Version: 2.0

Package: libc6
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Version: 2.36-9+deb12u4
Description: GNU C Library: Shared libraries
 Latin-1 bytes follow: \xe9\xe8

package: lowercase-fields
status: install ok installed
version: 0.1-1";

    #[test]
    fn dpkg_parser_keeps_installed_packages_only() {
        let pkgs = parse_dpkg_status(DPKG_FIXTURE).unwrap();
        let got: Vec<(&str, &str)> = pkgs.iter().map(|p| (&*p.name, &*p.version)).collect();
        assert_eq!(
            got,
            [
                ("adduser", "3.134"),
                ("libc6", "2.36-9+deb12u4"),
                ("lowercase-fields", "0.1-1")
            ]
        );
    }

    #[test]
    fn dpkg_list_is_capped_at_the_wire_limit() {
        let mut big = Vec::new();
        for i in 0..MAX_SOFTWARE + 10 {
            big.extend_from_slice(
                format!("Package: p{i}\nStatus: install ok installed\nVersion: 1\n\n").as_bytes(),
            );
        }
        assert_eq!(parse_dpkg_status(&big[..]).unwrap().len(), MAX_SOFTWARE);
    }

    const APK_FIXTURE: &[u8] = b"\
C:Q1abc=
P:musl
V:1.2.4-r2
A:x86_64
T:the musl c library

C:Q1def=
P:busybox
V:1.36.1-r5
r:busybox-initscripts

P:no-version
";

    const OPKG_FIXTURE: &[u8] = b"\
Package: busybox
Version: 1.36.1-1
Status: install user installed
Architecture: mips_24kc

Package: dropbear
Version: 2022.83-1
Status: install ok installed

Package: gone
Version: 1
Status: deinstall ok not-installed
";

    #[test]
    fn apk_rpm_and_opkg_parsers() {
        let names = |v: Vec<Package<'static>>| -> Vec<(String, String)> {
            v.into_iter()
                .map(|p| (p.name.into_owned(), p.version.into_owned()))
                .collect()
        };
        let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(
            names(parse_apk_installed(APK_FIXTURE).unwrap()),
            [pair("musl", "1.2.4-r2"), pair("busybox", "1.36.1-r5")]
        );
        assert_eq!(
            names(parse_dpkg_status(OPKG_FIXTURE).unwrap()),
            [pair("busybox", "1.36.1-1"), pair("dropbear", "2022.83-1")]
        );
        let rpm = b"bash\t5.1.8-6.el9\nkernel-core\t5.14.0-362.el9\nno tab here\nperl-Errno\t0:1.30-480.el9\n";
        assert_eq!(
            names(parse_rpm_query(&rpm[..]).unwrap()),
            [
                pair("bash", "5.1.8-6.el9"),
                pair("kernel-core", "5.14.0-362.el9"),
                pair("perl-Errno", "0:1.30-480.el9")
            ]
        );
    }

    #[test]
    fn the_package_manager_the_tree_has_is_the_one_read() {
        let put = |root: &Path, rel: &str, body: &[u8]| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        };
        let none = tempfile::tempdir().unwrap();
        assert_eq!(installed(none.path(), None), (PackageManager::None, vec![]));

        let alpine = tempfile::tempdir().unwrap();
        put(alpine.path(), APK_INSTALLED, APK_FIXTURE);
        let (pm, pkgs) = installed(alpine.path(), None);
        assert_eq!((pm, pkgs.len()), (PackageManager::Apk, 2));

        let openwrt = tempfile::tempdir().unwrap();
        put(openwrt.path(), "usr/lib/opkg/status", OPKG_FIXTURE);
        let (pm, pkgs) = installed(openwrt.path(), None);
        assert_eq!((pm, pkgs.len()), (PackageManager::Opkg, 2));

        let debian = tempfile::tempdir().unwrap();
        put(debian.path(), DPKG_STATUS, DPKG_FIXTURE);
        // dpkg wins over another manager's leftovers, and an explicit status file over the
        // tree's.
        put(debian.path(), APK_INSTALLED, APK_FIXTURE);
        let (pm, pkgs) = installed(debian.path(), None);
        assert_eq!((pm, pkgs.len()), (PackageManager::Dpkg, 3));
        let own = debian.path().join("own-status");
        std::fs::write(&own, OPKG_FIXTURE).unwrap();
        let (pm, pkgs) = installed(none.path(), Some(&own));
        assert_eq!((pm, pkgs.len()), (PackageManager::Dpkg, 2));

        // An rpm database directory means rpm; an empty root database lists nothing (or rpm
        // is not installed here): the manager is still named.
        let fedora = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(fedora.path().join("var/lib/rpm")).unwrap();
        let (pm, pkgs) = installed(fedora.path(), None);
        assert_eq!((pm, pkgs.len()), (PackageManager::Rpm, 0));
    }
}
