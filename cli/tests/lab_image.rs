//! Imaging in the lab: a real gateway (host 0) pushes one 12 MiB disk image (data with runs of
//! zeros between) to 8 devices (hosts 1..8), each dropping 2% of the multicast stream, with
//! `fleetcast push --target`, as raw, sparse and compressed. Each device's target is a loop
//! device when the test runs as root with `losetup` (CI does), else a regular file, named by
//! partition label either way (`partlabel=rack-os`): the same code path from the announce to
//! the read-back. The label comes from a root directory of each agent's own
//! (`--report-root`): for a loop device the machine's `/sys` and mount table plus the
//! `/dev/disk/by-partlabel` link udev would have made (the test never touches the machine's
//! `/dev`); for a file, a small sysfs of its own that gives the file's size.
//!
//! `a_raw_a_sparse_and_a_compressed_image_reach_eight_disks`: before each push every target
//! is filled with other bytes, so a hole left unzeroed shows. After each: the task table
//! says `completed` for all 8, every target read back holds the image (its SHA-256), and the
//! task's size is the form's stream (the image, its data, its compressed chunks). During the
//! raw push `n1` is killed once it holds a third of the image and its record is on disk;
//! restarted, it resumes from the record (its log says so) and completes.
//!
//! `bad_targets_are_refused_with_their_reason_before_anything_is_written`: a target no device
//! has, `slot=inactive` on agents without slots, and (as root) a loop device too small and
//! one that is mounted: each row of the task table is `failed` with the reason, and the
//! small and mounted devices still hold their bytes.

// The lab harness of the daemon's tests, one file shared by both packages.
#[path = "../../daemon/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{read_log, status_of, wait_for, AgentSpec, Gateway};
use fleetcast_daemon::admin::Request;
use fleetcast_lab::{Lab, LabChild, LabConfig};
use serde_json::Value;

#[test]
fn agent_role() {
    common::agent_role();
}

const WAIT: Duration = Duration::from_secs(90);
const MCAST_PORT: u16 = 7301;
const DEVICES: usize = 8;
const MIB: usize = 1 << 20;
const IMAGE: usize = 12 * MIB;

fn sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The image: 64 KiB stretches of data (seeded, half of them compressible text) in 3 of every
/// 5, zeros in the others, so the sparse form sends about 60% and zstd less.
fn image() -> Vec<u8> {
    let mut v = vec![0u8; IMAGE];
    let mut x = 0x9e37_79b9u32;
    for (i, b) in v.iter_mut().enumerate() {
        let stretch = i >> 16;
        if stretch % 5 >= 3 {
            continue;
        }
        *b = if stretch % 2 == 0 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        } else {
            b"fleetcast imaging line\n"[i % 23]
        };
    }
    v
}

/// A loop device attached to a backing file (root with `losetup` only), detached on drop.
struct Loop {
    node: PathBuf,
}

impl Loop {
    /// `FLEETCAST_TEST_FILE_TARGETS=1` runs the file variant as root too.
    fn attach(backing: &Path) -> Option<Loop> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0
            || std::env::var_os("FLEETCAST_TEST_FILE_TARGETS").is_some()
        {
            return None;
        }
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let node = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(Loop { node })
    }

    fn name(&self) -> String {
        self.node
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.node).status();
    }
}

/// One device's disks: `rack-os` (the image's target) and, for `n1`, `tiny` (too small) and
/// `busy` (mounted), each a loop device or a file, labelled in the agent's root.
struct Disks {
    /// The agent's `--report-root`.
    root: PathBuf,
    /// Label, what to read back, its loop device (if one).
    disks: Vec<(String, PathBuf, Option<Loop>)>,
}

impl Disks {
    fn path(&self, label: &str) -> &Path {
        &self.disks.iter().find(|d| d.0 == label).expect("label").1
    }
}

/// `name`'s disks under `dir/name`, of `sizes` (label, bytes, mounted), filled with 0x5a.
fn disks(dir: &Path, name: &str, sizes: &[(&str, usize, bool)]) -> Disks {
    let root = dir.join(name).join("root");
    std::fs::create_dir_all(root.join("dev/disk/by-partlabel")).unwrap();
    std::fs::create_dir_all(root.join("proc/self")).unwrap();
    let mut out = Vec::new();
    let mut mounts = String::new();
    for (k, &(label, size, mounted)) in sizes.iter().enumerate() {
        let backing = dir.join(format!("{name}-{label}.img"));
        std::fs::write(&backing, vec![0x5a; size]).unwrap();
        let (dev_name, path, lp, majmin) = match Loop::attach(&backing) {
            Some(l) => {
                let n = l.name();
                let _ = std::os::unix::fs::symlink(&l.node, root.join("dev").join(&n));
                let majmin = std::fs::read_to_string(format!("/sys/block/{n}/dev"))
                    .unwrap()
                    .trim()
                    .to_string();
                (n, l.node.clone(), Some(l), majmin)
            }
            None => {
                // A disk of the agent's own sysfs: its node is the file itself.
                let n = format!("fake{k}");
                let sys = root.join("sys/block").join(&n);
                std::fs::create_dir_all(&sys).unwrap();
                std::fs::write(sys.join("size"), format!("{}\n", size / 512)).unwrap();
                let majmin = format!("250:{k}");
                std::fs::write(sys.join("dev"), format!("{majmin}\n")).unwrap();
                std::fs::rename(&backing, root.join("dev").join(&n)).unwrap();
                (n.clone(), root.join("dev").join(&n), None, majmin)
            }
        };
        let _ = std::os::unix::fs::symlink(
            format!("../../{dev_name}"),
            root.join("dev/disk/by-partlabel").join(label),
        );
        if mounted {
            mounts.push_str(&format!(
                "901 1 {majmin} / /mnt/{label} rw - ext4 /dev/{dev_name} rw\n"
            ));
        }
        out.push((label.to_string(), path, lp));
    }
    let on_loop = out.iter().any(|d| d.2.is_some());
    if on_loop {
        let _ = std::os::unix::fs::symlink("/sys", root.join("sys"));
        let mut real = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        real.push_str(&mounts);
        mounts = real;
    } else {
        mounts.insert_str(0, "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n");
    }
    std::fs::write(root.join("proc/self/mountinfo"), mounts).unwrap();
    Disks { root, disks: out }
}

/// Fills `path` with `byte` (`len` bytes from 0) and makes it durable.
fn fill(path: &Path, byte: u8, len: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![byte; len], 0).unwrap();
    f.sync_all().unwrap();
}

/// The first `len` bytes of `path`, read past the page cache's stale view of a loop device.
fn read_back(path: &Path, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

/// Runs the operator CLI against `gw`; returns its stdout (it must succeed).
fn cli(gw: &Gateway<'_>, args: &[&str]) -> String {
    gw.cli(env!("CARGO_BIN_EXE_fleetcast"), args)
}

/// `fleetcast --json push SRC --group fleet EXTRA...`; the task id.
fn push(gw: &Gateway<'_>, src: &Path, extra: &[&str]) -> u64 {
    let src = src.display().to_string();
    let mut args = vec!["--json", "push", &src, "--group", "fleet"];
    args.extend_from_slice(extra);
    let out = cli(gw, &args);
    serde_json::from_str::<Value>(&out).expect("json")["data"]["task"]
        .as_u64()
        .expect("task id")
}

/// Enrols `n1..nN` (group `fleet`), each with its disks' root as its report root.
fn enrol<'lab>(
    gw: &Gateway<'lab>,
    lab: &'lab Lab,
    dir: &Path,
    roots: &[&Path],
) -> (Vec<AgentSpec>, Vec<Option<LabChild<'lab>>>) {
    let mut specs = Vec::new();
    let mut agents = Vec::new();
    for (i, root) in roots.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let d = gw.admin(&Request::DeviceAdd {
            name: name.clone(),
            groups: vec!["fleet".into()],
        });
        let token = d["token"].as_str().expect("token").to_string();
        let mut spec = AgentSpec::new(gw, dir, &name, Some(token));
        spec.extra
            .extend(["--report-root".into(), root.display().to_string()]);
        agents.push(Some(spec.spawn(lab.host(i + 1))));
        specs.push(spec);
    }
    for (i, s) in specs.iter().enumerate() {
        gw.wait_online(&format!("n{}", i + 1), WAIT, || s.output());
    }
    (specs, agents)
}

/// The task's rows once every device of `n1..nN` has `status`.
fn rows_all(gw: &Gateway<'_>, task: u64, n: usize, status: &str) -> Option<Vec<Value>> {
    let rows = gw.task_rows(task);
    (1..=n)
        .all(|i| status_of(&rows, &format!("n{i}")) == status)
        .then_some(rows)
}

/// Blocks received and total of `name`'s row (`blocks`: `"N/M"`).
fn received(rows: &[Value], name: &str) -> (u64, u64) {
    let row = rows.iter().find(|r| r["device"] == name);
    let s = row.and_then(|r| r["blocks"].as_str()).unwrap_or("0/1");
    let (a, b) = s.split_once('/').unwrap_or(("0", "1"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(1))
}

fn start<'lab>(lab: &'lab Lab, dir: &Path) -> Gateway<'lab> {
    let gw_addr = lab.host(0).addr().to_string();
    Gateway::start(
        lab.host(0),
        dir,
        &["--mcast-addr", &gw_addr, "--mcast-linger", "120"],
    )
}

#[test]
fn a_raw_a_sparse_and_a_compressed_image_reach_eight_disks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(DEVICES + 1)).expect("lab (see docs/lab.md)");
    let gw = start(&lab, dir);
    let all: Vec<Disks> = (1..=DEVICES)
        .map(|i| disks(dir, &format!("n{i}"), &[("rack-os", IMAGE + MIB, false)]))
        .collect();
    let on_loop = all[0].disks[0].2.is_some();
    eprintln!(
        "targets: {}",
        if on_loop {
            "loop devices"
        } else {
            "regular files (not root, or no losetup)"
        }
    );
    let roots: Vec<&Path> = all.iter().map(|d| d.root.as_path()).collect();
    let (specs, mut agents) = enrol(&gw, &lab, dir, &roots);
    for i in 1..=DEVICES {
        lab.host(i)
            .loss_in(&[MCAST_PORT], 2.0)
            .expect("nft loss rule");
    }
    let img = image();
    let want = sha256(&img);
    let src = dir.join("os.img");
    std::fs::write(&src, &img).expect("write image");
    let data: usize = img
        .chunks(4096)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count()
        * 4096;

    for form in ["raw", "sparse", "compressed"] {
        for d in &all {
            fill(d.path("rack-os"), 0xa5, IMAGE + MIB);
        }
        // The raw push goes slowly enough to catch n1 a third of the way through.
        let rate = if form == "raw" { "30" } else { "200" };
        let args = [
            "--target",
            "partlabel=rack-os",
            "--form",
            form,
            "--rate",
            rate,
        ];
        let task = push(&gw, &src, &args);
        let show = gw.admin(&Request::TaskShow { task: Some(task) });
        let size = show["size"].as_u64().unwrap_or(0) as usize;
        match form {
            "raw" => assert_eq!(size, IMAGE, "{show:#}"),
            "sparse" => assert_eq!(size, data, "{show:#}"),
            _ => assert!(
                size < data * 3 / 4,
                "compressed stream of {size} bytes: {show:#}"
            ),
        }
        eprintln!(
            "{form}: {size} bytes on the wire for a {IMAGE}-byte image with {data} data bytes"
        );
        if form == "raw" {
            // n1 killed once it holds a third and its record is on disk; then restarted.
            let downloads = specs[0].state.join("downloads");
            let rec = downloads.join(format!(".os.img.task-{task}.rec"));
            wait_for(
                "n1 to hold a third of the image, recorded",
                WAIT,
                || {
                    let (got, total) = received(&gw.task_rows(task), "n1");
                    (got * 3 >= total && rec.exists()).then_some(())
                },
                || gw.task_report(&specs, task),
            );
            let mut n1 = agents[0].take().expect("n1");
            n1.kill().expect("kill n1");
            drop(n1);
            agents[0] = Some(specs[0].spawn(lab.host(1)));
        }
        let rows = wait_for(
            &format!("every device to complete the {form} image"),
            WAIT,
            || rows_all(&gw, task, DEVICES, "completed"),
            || gw.task_report(&specs, task),
        );
        assert_eq!(rows.len(), DEVICES, "{rows:#?}");
        for (i, d) in all.iter().enumerate() {
            let got = read_back(d.path("rack-os"), IMAGE);
            assert_eq!(
                sha256(&got),
                want,
                "n{}'s disk after the {form} push",
                i + 1
            );
            // Past the image the disk is as it was.
            let tail = read_back(d.path("rack-os"), IMAGE + MIB);
            assert!(
                tail[IMAGE..].iter().all(|&b| b == 0xa5),
                "n{} past the image",
                i + 1
            );
        }
        if form == "raw" {
            let log = read_log(&specs[0].log);
            assert!(
                log.contains(&format!("task {task}: resuming with")),
                "n1 did not resume from its record:\n{log}"
            );
        }
    }
}

#[test]
fn bad_targets_are_refused_with_their_reason_before_anything_is_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let gw = start(&lab, dir);
    let n1 = disks(
        dir,
        "n1",
        &[("tiny", MIB, false), ("busy", IMAGE + MIB, true)],
    );
    let n2 = disks(dir, "n2", &[("other", IMAGE, false)]);
    let (specs, _agents) = enrol(&gw, &lab, dir, &[&n1.root, &n2.root]);
    let src = dir.join("os.img");
    std::fs::write(&src, image()).expect("write image");
    let reason = |task: u64, name: &str| {
        let rows = wait_for(
            &format!("task {task} to fail on both devices"),
            WAIT,
            || rows_all(&gw, task, 2, "failed"),
            || gw.task_report(&specs, task),
        );
        let row = rows.iter().find(|r| r["device"] == name).expect("row");
        row["reason"].as_str().unwrap_or("").to_string()
    };
    let cases: [(&str, &str, &str); 4] = [
        (
            "partlabel=tiny",
            "n1",
            "has room for 1048576 bytes; the image is",
        ),
        ("partlabel=tiny", "n2", "no device has partlabel=tiny"),
        ("partlabel=busy", "n1", "is mounted on /mnt/busy"),
        ("slot=inactive", "n2", "no A/B slots configured"),
    ];
    for (target, name, says) in cases {
        let task = push(&gw, &src, &["--target", target]);
        let r = reason(task, name);
        assert!(r.starts_with("refused: "), "{name} on {target}: {r}");
        assert!(r.contains(says), "{name} on {target}: {r}");
    }
    for label in ["tiny", "busy"] {
        let p = n1.path(label);
        let len = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as usize;
        let len = if len == 0 { MIB } else { len.min(IMAGE) };
        assert!(
            read_back(p, len).iter().all(|&b| b == 0x5a),
            "{label} was written to"
        );
    }
    // A bare kernel name never leaves the operator's machine.
    let out = Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .arg("--data-dir")
        .arg(&gw.data)
        .args(["push", &src.display().to_string(), "--group", "fleet"])
        .args(["--target", "/dev/sda"])
        .output()
        .expect("run fleetcast");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kernel device name"), "{err}");
}
