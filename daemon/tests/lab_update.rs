//! A/B updates in the lab (issue 18): the real gateway on host 0, real agents on hosts 1..5,
//! one update of group `fleet` composed as `fleetcast update` composes it (a push to
//! `slot=inactive` whose `then` commands are `admin::update_commands`).
//!
//! Each device's slots are files in its directory (`slot-a`, `slot-b`); its bootloader is a
//! shell script writing the slot to try once (`next`) or to keep (`default`) into files; a
//! "reboot" is the agent exiting with [`REBOOT_EXIT`], after which the test plays the
//! firmware: the running slot becomes `next` (spent) or else `default`, the boot id changes,
//! and the agent starts again. The devices:
//! - n1, n2: healthy; the update commits on both (new slot the default, `committed slot b`).
//! - n3: its health check exits 1; the update rolls back by itself: the commit fails with the
//!   reason, the agent reboots into the default slot and comes back on slot a.
//! - n4: never comes back from its reboot; failed at the update's deadline (10 s, far below
//!   the gateway's 900 s reboot timeout), `RebootDeadlineMissed`.
//! - n5: no `[slot]` section: the push is refused before anything is written, nothing queued.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{status_of, wait_exit, wait_for, AgentSpec, Gateway, Rng, REBOOT_EXIT};
use fleetcast_daemon::admin::{self, PushImage, Request};
use fleetcast_lab::{Lab, LabChild, LabConfig};
use serde_json::Value;

#[test]
fn agent_role() {
    common::agent_role();
}

const WAIT: Duration = Duration::from_secs(60);
const DEADLINE_SECS: u32 = 10;
const IMAGE: usize = 96 * 1024;
const SLOT: usize = 256 * 1024;

/// One device's simulated slots and bootloader.
struct Slots {
    dir: PathBuf,
}

impl Slots {
    /// Slots a (running, default) and b, both holding the old system; `healthy` decides the
    /// health check's exit.
    fn new(dir: &Path, healthy: bool) -> Slots {
        let d = dir.to_owned();
        fs::write(d.join("slot-a"), vec![b'A'; SLOT]).expect("slot a");
        fs::write(d.join("slot-b"), vec![b'A'; SLOT]).expect("slot b");
        fs::write(d.join("running"), "a\n").expect("running");
        fs::write(d.join("default"), "a\n").expect("default");
        let script = |name: &str, body: String| {
            use std::os::unix::fs::PermissionsExt;
            let p = d.join(name);
            fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("script");
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
            p.display().to_string()
        };
        let boot = script(
            "bootloader",
            format!("echo \"$2\" > {}/\"$1\"", d.display()),
        );
        let health = script(
            "healthy",
            format!(
                "echo health check ran >> {}/health.log; exit {}",
                d.display(),
                if healthy { 0 } else { 1 }
            ),
        );
        fs::write(
            d.join("slots.conf"),
            format!(
                "[slot]\na = \"{d}/slot-a\"\nb = \"{d}/slot-b\"\nrunning_file = \"{d}/running\"\n\
                 boot_once = [\"{boot}\", \"next\", \"{{slot}}\"]\n\
                 set_default = [\"{boot}\", \"default\", \"{{slot}}\"]\n\
                 health_check = [\"{health}\"]\n",
                d = d.display()
            ),
        )
        .expect("slots.conf");
        Slots { dir: d }
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(name))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// The firmware at a reboot: the one-time slot if one is set (and spent), else the
    /// default. Returns the slot booted.
    fn reboot(&self) -> String {
        let next = self.read("next");
        let slot = if next.is_empty() {
            self.read("default")
        } else {
            next
        };
        let _ = fs::remove_file(self.dir.join("next"));
        fs::write(self.dir.join("running"), format!("{slot}\n")).expect("running");
        slot
    }
}

/// The last `running slot X` the agent said at a start.
fn last_running(spec: &AgentSpec) -> Option<String> {
    let log = common::read_log(&spec.log);
    log.lines()
        .rev()
        .find_map(|l| l.split("A/B slots: running slot ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
}

/// `device show NAME`'s `update`: the last A/B update as the gateway records it.
fn shown_update(gw: &Gateway<'_>, name: &str) -> String {
    gw.admin(&Request::DeviceShow { name: name.into() })["update"]
        .as_str()
        .unwrap_or("-")
        .to_owned()
}

fn command_output(q: &Value, i: usize) -> String {
    q["commands"][i]["output"].as_str().unwrap_or("").to_owned()
}

/// The boot id of `host`'s `n`th boot.
fn boot_id(host: usize, n: u32) -> String {
    format!("{n:08x}-b007-4000-8000-{host:012x}")
}

/// Restarts `spec`'s agent after a reboot into what `slots` boots, on its `n`th boot id.
fn boot<'lab>(
    lab: &'lab Lab,
    host: usize,
    spec: &AgentSpec,
    slots: &Slots,
    n: u32,
) -> (String, LabChild<'lab>) {
    let slot = slots.reboot();
    spec.set_boot_id(&boot_id(host, n));
    (slot, spec.spawn(lab.host(host)))
}

#[test]
fn an_update_commits_rolls_back_and_fails_at_its_deadline() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(6)).expect("lab (see docs/lab.md)");
    let gw_addr = lab.host(0).addr().to_string();
    let gw = Gateway::start(lab.host(0), dir, &["--mcast-addr", &gw_addr]);

    let mut specs = Vec::new();
    let mut slots = Vec::new();
    let mut agents = Vec::new();
    for i in 1..=5 {
        let name = format!("n{i}");
        let d = gw.admin(&Request::DeviceAdd {
            name: name.clone(),
            groups: vec!["fleet".into()],
        });
        let token = d["token"].as_str().expect("token").to_string();
        let mut spec = AgentSpec::new(&gw, dir, &name, Some(token));
        let d = dir.join(&name);
        if i <= 4 {
            slots.push(Slots::new(&d, i != 3));
            spec.extra
                .extend(["--slots".into(), d.join("slots.conf").display().to_string()]);
        }
        agents.push(Some(spec.spawn(lab.host(i))));
        specs.push(spec);
    }
    for (i, s) in specs.iter().enumerate() {
        gw.wait_online(&format!("n{}", i + 1), WAIT, || s.output());
    }
    for s in &specs[..4] {
        assert_eq!(last_running(s).as_deref(), Some("a"), "{}", s.output());
    }

    // The image, and the update exactly as `fleetcast update IMG --group fleet --deadline 10`
    // sends it.
    let mut image = vec![0u8; IMAGE];
    Rng::from_env(0x5107_0018).fill(&mut image);
    let img = dir.join("system-v2.img");
    fs::write(&img, &image).expect("image");
    let task = gw.admin(&Request::Push {
        path: img.display().to_string(),
        group: "fleet".into(),
        block_size: 0,
        rate_mbps: 200,
        trigger: Default::default(),
        then: admin::update_commands(DEADLINE_SECS),
        delivery: Default::default(),
        follow: Default::default(),
        image: Some(PushImage {
            target: admin::UPDATE_TARGET.into(),
            map: None,
        }),
    })["task"]
        .as_u64()
        .expect("task id");

    // n1..n4: written to slot b, verified, switched (one-time boot of b), rebooting.
    for (i, (agent, spec)) in agents.iter_mut().zip(&specs).take(4).enumerate() {
        let name = format!("n{}", i + 1);
        let st = wait_exit(agent.as_mut().expect("agent"), WAIT, || {
            format!("{:#}\n{}", gw.queue(&name), gw.task_report(&specs, task))
        });
        assert_eq!(st.code(), Some(REBOOT_EXIT), "{name}\n{}", spec.output());
        let s = &slots[i];
        let b = fs::read(s.dir.join("slot-b")).expect("slot b");
        assert!(b[..IMAGE] == image[..], "{name}: slot b holds the image");
        assert!(
            b[IMAGE..].iter().all(|&x| x == b'A'),
            "{name}: past the image"
        );
        assert!(fs::read(s.dir.join("slot-a"))
            .expect("a")
            .iter()
            .all(|&x| x == b'A'));
        assert_eq!(
            (s.read("next"), s.read("default")),
            ("b".into(), "a".into())
        );
        let q = gw.queue(&name);
        assert_eq!(q["commands"][0]["state"], "rebooting", "{q:#}");
    }
    // The task table: n1..n4 verified their copies; n5 (no slots) refused before writing.
    let rows = gw.task_rows(task);
    for n in ["n1", "n2", "n3", "n4"] {
        assert_eq!(status_of(&rows, n), "completed", "{rows:#?}");
    }
    let n5 = rows.iter().find(|r| r["device"] == "n5").expect("n5 row");
    assert_eq!(n5["status"], "failed", "{rows:#?}");
    let why = n5["reason"].as_str().unwrap_or("");
    assert!(
        why.starts_with("refused") && why.contains("no A/B slots"),
        "n5's refusal names the slots: {why}"
    );
    assert!(
        n5["blocks"].as_str().is_some_and(|b| b.starts_with("0/")),
        "nothing written: {rows:#?}"
    );
    let q5 = gw.queue("n5");
    assert_eq!(
        q5["commands"],
        serde_json::json!([]),
        "nothing queued on n5: {q5:#}"
    );

    // n1..n3 come back (n4 never does).
    let mut back = Vec::new();
    for i in 0..3 {
        let (slot, child) = boot(&lab, i + 1, &specs[i], &slots[i], 2);
        assert_eq!(slot, "b");
        back.push(child);
    }

    // n1, n2: committed on slot b.
    for i in 0..2 {
        let name = format!("n{}", i + 1);
        let q = gw.wait_done(&name, WAIT, || specs[i].output());
        for c in 0..2 {
            assert_eq!(q["commands"][c]["state"], "ok", "{q:#}");
        }
        assert!(
            command_output(&q, 0).contains("switching slot a -> b"),
            "{q:#}"
        );
        assert!(command_output(&q, 1).contains("committed slot b"), "{q:#}");
        assert_eq!(slots[i].read("default"), "b", "{name}");
        assert_eq!(slots[i].read("health.log"), "health check ran");
        assert_eq!(last_running(&specs[i]).as_deref(), Some("b"));
        assert_eq!(shown_update(&gw, &name), "command 2: committed slot b");
    }

    // n3: the health check failed; rolled back by itself and rebooted into slot a.
    let q = wait_for(
        "n3's update to roll back",
        WAIT,
        || {
            let q = gw.queue("n3");
            (q["queue"]["status"] == "failed").then_some(q)
        },
        || format!("{:#}\n{}", gw.queue("n3"), specs[2].output()),
    );
    assert_eq!(q["commands"][0]["state"], "ok", "{q:#}");
    assert_eq!(q["commands"][1]["state"], "failed", "{q:#}");
    let out = command_output(&q, 1);
    assert!(
        out.contains("rolled back: health check failed; rebooting into slot a (the default)"),
        "{q:#}"
    );
    let st = wait_exit(&mut back[2], WAIT, || specs[2].output());
    assert_eq!(st.code(), Some(REBOOT_EXIT), "{}", specs[2].output());
    assert_eq!(slots[2].read("default"), "a", "set_default never ran");
    let (slot, _n3) = boot(&lab, 3, &specs[2], &slots[2], 3);
    assert_eq!(slot, "a");
    wait_for(
        "n3 back on its old slot",
        WAIT,
        || {
            let row = gw.device("n3")?;
            let want = boot_id(3, 3).replace('-', "");
            (row["online"] == true && row["boot_id"] == want.as_str()).then_some(())
        },
        || format!("{:?}\n{}", gw.device("n3"), specs[2].output()),
    );
    assert_eq!(last_running(&specs[2]).as_deref(), Some("a"));
    assert_eq!(
        shown_update(&gw, "n3"),
        "command 2: rolled back: health check failed; rebooting into slot a (the default)"
    );

    // n4: never came back; failed at the update's deadline (`device show` said rebooting
    // until then).
    let early = shown_update(&gw, "n4");
    assert!(
        early == "command 1: rebooting into the new slot" || early.contains("did not come back"),
        "{early}"
    );
    let q = wait_for(
        "n4's reboot deadline",
        Duration::from_secs(u64::from(DEADLINE_SECS) + 30),
        || {
            let q = gw.queue("n4");
            (q["queue"]["status"] == "failed").then_some(q)
        },
        || format!("{:#}\n{}", gw.queue("n4"), gw.diag()),
    );
    assert_eq!(q["queue"]["failure"], "RebootDeadlineMissed", "{q:#}");
    assert_eq!(slots[3].read("default"), "a");
    assert_eq!(
        shown_update(&gw, "n4"),
        "command 1: did not come back before the update's deadline (RebootDeadlineMissed)"
    );
    assert_eq!(shown_update(&gw, "n5"), "-", "never updated");
    drop(back);
    drop(agents);
}
