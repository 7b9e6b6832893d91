//! Lab test of a planned multicast across a gateway crash: a push scheduled ahead, the
//! gateway killed (SIGKILL) and restarted before its time, and the multicast still runs at
//! its time, at its rate, to both devices, from the plan the task table kept (before plans
//! were kept, the restart turned it into unicast catch-up for everyone, at once).
//!
//! Checked: the restarted gateway's trigger fires no earlier than the schedule, it says it
//! re-created the task as planned (not for catch-up), the first pass is a multicast one, and
//! both copies are byte-identical to the source.

// The lab harness of the daemon's tests, one file shared by both packages.
#[path = "../../daemon/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{now, status_of, wait_for, Gateway, Rng};
use fleetcast_lab::{Lab, LabConfig};
use serde_json::Value;

#[test]
fn agent_role() {
    common::agent_role();
}

const WAIT: Duration = Duration::from_secs(45);

/// Runs the operator CLI against `gw`; returns its stdout (it must succeed).
fn cli(gw: &Gateway<'_>, args: &[&str]) -> String {
    gw.cli(env!("CARGO_BIN_EXE_fleetcast"), args)
}

#[test]
fn a_scheduled_push_still_multicasts_at_its_time_after_the_gateway_is_killed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let gw_addr = lab.host(0).addr().to_string();
    let mut gw = Gateway::start(lab.host(0), dir, &["--mcast-addr", &gw_addr]);
    let (specs, _agents) = gw.enrol_agents(&lab, dir, 2);
    let mut data = vec![0u8; 3 << 20];
    Rng::from_env(0x5eed_0016).fill(&mut data);
    let src = dir.join("planned.bin");
    std::fs::write(&src, &data).expect("write source");

    // Scheduled 8 s ahead, at 40 Mbit/s (a first pass of about 0.6 s).
    let asked = now();
    let out = cli(
        &gw,
        &[
            "--json",
            "push",
            &src.display().to_string(),
            "--group",
            "fleet",
            "--in",
            "8",
            "--rate",
            "40",
            "--no-follow",
        ],
    );
    let pushed = serde_json::from_str::<Value>(&out).expect("json");
    let task = pushed["data"]["task"].as_u64().expect("task id");
    // No --block-size: the block fills a frame of the lab's MTU 1500 (1,444 bytes).
    assert_eq!(
        pushed["data"]["blocks"].as_u64(),
        Some((3u64 << 20).div_ceil(1444)),
        "{pushed:#}"
    );
    // Both devices joined and wait (their progress rows exist), then the gateway dies.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        gw.stderr().matches("trigger fired").count(),
        0,
        "{}",
        gw.diag()
    );
    gw.kill();
    let before = gw.stderr().len();
    gw.restart();
    wait_for(
        "the planned start after the restart",
        WAIT,
        || {
            gw.stderr()[before..]
                .contains("trigger fired")
                .then_some(())
        },
        || gw.task_report(&specs, task),
    );
    let fired = asked.elapsed();
    assert!(
        fired >= Duration::from_millis(7900),
        "the multicast started {fired:?} after an 8 s schedule\n{}",
        gw.diag()
    );
    wait_for(
        "both copies",
        WAIT,
        || {
            let rows = gw.task_rows(task);
            ["n1", "n2"]
                .iter()
                .all(|n| status_of(&rows, n) == "completed")
                .then_some(())
        },
        || gw.task_report(&specs, task),
    );
    let log = gw.stderr()[before..].to_string();
    assert!(log.contains("re-created as planned"), "{log}");
    assert!(!log.contains("re-created for catch-up"), "{log}");
    assert!(log.contains("first pass done"), "{log}");
    for (i, s) in specs.iter().enumerate() {
        let got = std::fs::read(s.state.join("downloads").join("planned.bin")).expect("copy");
        assert!(got == data, "n{}: copy differs", i + 1);
    }
}

/// `watch.then`: a file dropped into the watched directory is pushed, and each device runs
/// the configured follow-up on its verified copy, with `{file}` its name (one with a space
/// and a quote here, which reaches the script as its `$1`, not as shell text).
#[test]
fn a_watched_push_runs_the_configured_follow_up_on_each_verified_copy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let drop_dir = dir.join("drop");
    std::fs::create_dir_all(&drop_dir).expect("drop dir");
    let config = dir.join("fleetcastd.toml");
    std::fs::write(
        &config,
        "[watch]\nthen = [\"sh:echo installed {file}\", \"report\"]\n",
    )
    .expect("config");
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let gw_addr = lab.host(0).addr().to_string();
    let (drop_arg, config_arg) = (drop_dir.display().to_string(), config.display().to_string());
    let gw = Gateway::start(
        lab.host(0),
        dir,
        &[
            "--mcast-addr",
            &gw_addr,
            "--config",
            &config_arg,
            "--watch-dir",
            &drop_arg,
            "--watch-group",
            "fleet",
        ],
    );
    let (specs, _agents) = gw.enrol_agents(&lab, dir, 2);
    let mut data = vec![0u8; 1 << 20];
    Rng::from_env(0x5eed_0017).fill(&mut data);
    let name = "pkg one's.bin";
    std::fs::write(drop_dir.join(format!("{name}.tmp")), &data).expect("write");
    std::fs::rename(drop_dir.join(format!("{name}.tmp")), drop_dir.join(name)).expect("rename");
    for (i, spec) in specs.iter().enumerate() {
        let dev = format!("n{}", i + 1);
        let q = gw.wait_done(&dev, WAIT, || gw.diag());
        let cmds = q["commands"].as_array().expect("commands");
        assert_eq!(cmds.len(), 2, "one command per step: {q:#}");
        assert_eq!(cmds[0]["state"], "ok", "{q:#}");
        assert_eq!(
            cmds[0]["output"].as_str().map(str::trim_end),
            Some(format!("installed {name}").as_str()),
            "{q:#}"
        );
        assert_eq!(cmds[1]["state"], "ok", "{q:#}");
        let got = std::fs::read(spec.state.join("downloads").join(name)).expect("copy");
        assert!(got == data, "{dev}: copy differs");
    }
}
