use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};

use super::*;
use crate::config::{expand, Expanded};

const GOOD: &str = r#"gateway = "gw:7300"
state_dir = "/s"

[slot]
# The two root partitions.
a = "partlabel=rootfs-a"
b = "partlabel=rootfs-b"
a_name = "0"
b_name = "1"
running_command = ["fw_printenv", "-n", "slot"]
boot_once = ["fw_setenv", "boot_once", "{slot}"]
set_default = ["fw_setenv", "slot", "{slot}"]
health_check = ["/opt/health", "--quick"]
health_deadline_secs = "300"
"#;

fn good() -> SlotConfig {
    parse_section(GOOD).unwrap().unwrap()
}

/// A machine under a temp root: `sda` with two partitions labelled rootfs-a and rootfs-b, and
/// a `bin/` with the programs GOOD names (executable scripts that do nothing).
fn machine() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    for p in ["sda1", "sda2"] {
        fs::create_dir_all(r.join("sys/block/sda").join(p)).unwrap();
        fs::write(r.join("sys/block/sda").join(p).join("partition"), "1").unwrap();
        fs::create_dir_all(r.join("dev")).unwrap();
        fs::write(r.join("dev").join(p), "").unwrap();
    }
    fs::create_dir_all(r.join("dev/disk/by-partlabel")).unwrap();
    symlink("../../sda1", r.join("dev/disk/by-partlabel/rootfs-a")).unwrap();
    symlink("../../sda2", r.join("dev/disk/by-partlabel/rootfs-b")).unwrap();
    symlink("../../sda2", r.join("dev/disk/by-partlabel/also-b")).unwrap();
    let bin = r.join("bin");
    fs::create_dir_all(&bin).unwrap();
    for p in ["fw_printenv", "fw_setenv", "health"] {
        fs::write(bin.join(p), "#!/bin/sh\n").unwrap();
        fs::set_permissions(bin.join(p), fs::Permissions::from_mode(0o755)).unwrap();
    }
    (d, bin)
}

/// GOOD with `/opt/health` moved into the machine's `bin/`.
fn good_on(bin: &Path) -> SlotConfig {
    let mut c = good();
    c.health_check[0] = bin.join("health").display().to_string();
    c
}

#[test]
fn a_good_section_parses_to_its_settings() {
    let c = good();
    assert_eq!(c.targets.a, TargetSpec::PartLabel("rootfs-a".into()));
    assert_eq!(c.targets.b, TargetSpec::PartLabel("rootfs-b".into()));
    assert_eq!(c.names, ["0".to_string(), "1".to_string()]);
    assert_eq!(
        c.running,
        Running::Command(vec!["fw_printenv".into(), "-n".into(), "slot".into()])
    );
    assert_eq!(c.health_deadline_secs, 300);
    assert_eq!(
        c.command_for(&c.boot_once, Slot::B),
        ["fw_setenv", "boot_once", "1"]
    );
    assert_eq!(c.running_slot("1\n"), Ok(Slot::B));
    assert_eq!(c.running_slot(" 0"), Ok(Slot::A));
    assert!(matches!(
        c.running_slot("2"),
        Err(SlotError::UnknownRunning { .. })
    ));
    // Defaults: names a and b, deadline 600 s; a running file instead of a command.
    let minimal = "[slot]\na = \"/srv/a.img\"\nb = \"/srv/b.img\"\nrunning_file = \"/run/slot\"\n\
                   boot_once = [\"grub-reboot\", \"{slot}\"]\nset_default = [\"grub-set-default\", \"{slot}\"]\n\
                   health_check = [\"true\"]\n";
    let m = parse_section(minimal).unwrap().unwrap();
    assert_eq!(m.names, ["a".to_string(), "b".to_string()]);
    assert_eq!(m.running, Running::File("/run/slot".into()));
    assert_eq!(m.health_deadline_secs, DEFAULT_HEALTH_DEADLINE_SECS);
    assert_eq!(
        m.command_for(&m.set_default, Slot::A),
        ["grub-set-default", "a"]
    );
    assert_eq!(parse_section("gateway = \"g:1\"\n").unwrap(), None);
}

#[test]
fn every_bad_setting_is_refused_with_its_line_and_what_it_takes() {
    let with = |from: &str, to: &str| {
        assert!(GOOD.contains(from), "{from}");
        GOOD.replacen(from, to, 1)
    };
    let cases = [
        (with("a_name", "a_nmae"), 8, "unknown key `a_nmae` in [slot]; the keys are a, b, a_name, b_name, running_file, running_command, boot_once, set_default, health_check, health_deadline_secs"),
        (with("b_name = \"1\"", "b_name = \"1\"\nb_name = \"2\""), 10, "key `slot.b_name` is set twice"),
        (with("partlabel=rootfs-b", "/dev/sda2"), 7, "key `slot.b`: /dev/sda2 is a kernel device name; name a disk or partition by a stable id"),
        (with("partlabel=rootfs-b", "slot=a"), 7, "key `slot.b`: slot b's target is a slot"),
        (with("partlabel=rootfs-b", "label=x"), 7, "`label=` is not a kind of target id; it takes serial, wwn"),
        (with("b = \"partlabel=rootfs-b\"\n", ""), 4, "[slot] needs `b`"),
        (with("boot_once = [\"fw_setenv\", \"boot_once\", \"{slot}\"]\n", ""), 4, "[slot] needs `boot_once`: the command making the bootloader try a slot once, e.g. [\"grub-reboot\", \"{slot}\"]"),
        (with("health_check = [\"/opt/health\", \"--quick\"]\n", ""), 4, "[slot] needs `health_check`"),
        (with("running_command = [\"fw_printenv\", \"-n\", \"slot\"]\n", ""), 4, "[slot] needs `running_file`: running_file (a file holding the running slot's name) or running_command"),
        (with("a_name = \"0\"\n", "a_name = \"0\"\nrunning_file = \"/run/s\"\n"), 11, "takes one of running_file and running_command, not both"),
        (with("\"slot\", \"{slot}\"]", "\"slot\", \"b\"]"), 12, "key `slot.set_default`: the command must contain {slot}"),
        (with("\"300\"", "\"5\""), 14, "key `slot.health_deadline_secs`: 5 is out of range; it takes seconds from 10 to 86400"),
        (with("\"300\"", "\"soon\""), 14, "`soon` is not a whole number"),
        (with("b_name = \"1\"", "b_name = \"0\""), 4, "a_name and b_name are the same (0)"),
        (format!("{GOOD}[agent]\n"), 15, "[slot] is the last section; `[agent]` cannot follow it"),
        (with("[\"/opt/health\", \"--quick\"]", "[]"), 13, "key `slot.health_check`: needs a program"),
        (with("a = \"partlabel=rootfs-a\"", "a = partlabel=rootfs-a"), 6, "key `slot.a`: expected a double-quoted string"),
        (with("a = \"partlabel=rootfs-a\"", "a = \"x\" y"), 6, "key `slot.a`: unexpected text after the value"),
        (with("a = \"partlabel=rootfs-a\"", "just words"), 6, "expected `key = \"value\"` in [slot]"),
    ];
    for (text, line, want) in cases {
        let e = parse_section(&text).unwrap_err();
        let msg = e.problem.to_string();
        assert!(msg.contains(want), "want {want:?} in {msg:?}");
        assert_eq!(e.line, line, "{msg}");
    }
}

#[test]
fn a_section_that_fits_the_machine_passes_its_checks() {
    let (d, bin) = machine();
    let host = Host::new(d.path());
    let c = good_on(&bin);
    let [a, b] = c.check(&host, Some(bin.as_os_str())).unwrap();
    assert!(
        matches!(a, Target::Device { ref name, .. } if name == "sda1"),
        "{a:?}"
    );
    assert!(
        matches!(b, Target::Device { ref name, .. } if name == "sda2"),
        "{b:?}"
    );
}

#[test]
fn missing_programs_and_unresolved_slots_are_refused() {
    let (d, bin) = machine();
    let host = Host::new(d.path());
    let path = Some(bin.as_os_str());
    // /opt/health is not on this machine (an absolute path is not looked up in PATH).
    match good().check(&host, path) {
        Err(SlotError::ProgramNotFound {
            key,
            program,
            looked,
        }) => {
            assert_eq!(
                (key, program.as_str(), looked.as_str()),
                ("health_check", "/opt/health", "that path")
            );
        }
        r => panic!("{r:?}"),
    }
    // fw_setenv found nowhere on PATH.
    let e = good_on(&bin)
        .check(&host, Some(OsStr::new("/nonexistent")))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "key `slot.boot_once`: program `fw_setenv` is not an executable file here (looked in PATH=/nonexistent)"
    );
    // A program that is there but not executable.
    fs::set_permissions(bin.join("fw_printenv"), fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        good_on(&bin).check(&host, path),
        Err(SlotError::ProgramNotFound {
            key: "running_command",
            ..
        })
    ));
    fs::set_permissions(bin.join("fw_printenv"), fs::Permissions::from_mode(0o755)).unwrap();
    // A slot that does not resolve.
    let mut c = good_on(&bin);
    c.targets.b = TargetSpec::PartLabel("rootfs-c".into());
    let e = c.check(&host, path).unwrap_err().to_string();
    assert!(
        e.starts_with(
            "slot b (partlabel=rootfs-c) does not resolve: no device has partlabel=rootfs-c"
        ),
        "{e}"
    );
    // Two slots on one partition.
    let mut c = good_on(&bin);
    c.targets.a = TargetSpec::PartLabel("also-b".into());
    assert!(matches!(
        c.check(&host, path),
        Err(SlotError::SameTarget(_))
    ));
    // A running file that is not there.
    let mut c = good_on(&bin);
    c.running = Running::File(d.path().join("run/slot"));
    assert!(matches!(
        c.check(&host, path),
        Err(SlotError::RunningFileMissing(_))
    ));
}

#[test]
fn the_agent_configuration_file_carries_its_slot_section() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("agent.toml");
    fs::write(&p, GOOD).unwrap();
    let p = p.display().to_string();
    let Expanded::Run(args) = expand(vec!["--config".into(), p.clone()], |_| None).unwrap() else {
        panic!()
    };
    let at = args.iter().position(|a| a == "--slots").expect("--slots");
    assert_eq!(args[at + 1], p);
    assert_eq!(load(Path::new(&p)).unwrap(), good());
    // A bad slot line is the slot loader's to find (at start), with the file and the line;
    // the top-level parser stops at the section.
    fs::write(&p, GOOD.replace("a_name", "a_nmae")).unwrap();
    assert!(expand(vec!["--config".into(), p.clone()], |_| None).is_ok());
    let e = load(Path::new(&p)).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{p}, line 8: unknown key `a_nmae` in [slot]")),
        "{e}"
    );
    // `slots` and a [slot] section both: which one is meant is unclear.
    fs::write(&p, format!("slots = \"/etc/other\"\n{GOOD}")).unwrap();
    let e = expand(vec!["--config".into(), p.clone()], |_| None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 5: key `slots` is set twice"), "{e}");
    // Any other section is still refused.
    fs::write(&p, "[agent]\n").unwrap();
    let e = expand(vec!["--config".into(), p.clone()], |_| None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sections are not supported"), "{e}");
    // And a file named by `slots` without the section says so.
    assert!(matches!(load(Path::new(&p)), Err(LoadError::NoSection(_))));
}

#[test]
fn load_checked_names_the_file_and_the_problem() {
    let (d, bin) = machine();
    let p = d.path().join("slots.toml");
    fs::write(&p, GOOD).unwrap();
    let e = load_checked(&p, d.path(), Some(bin.as_os_str()))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!("{}: key `slot.health_check`: program `/opt/health` is not an executable file here (looked in that path)", p.display())
    );
    fs::write(
        &p,
        GOOD.replace("/opt/health", &bin.join("health").display().to_string()),
    )
    .unwrap();
    load_checked(&p, d.path(), Some(bin.as_os_str())).unwrap();
}
