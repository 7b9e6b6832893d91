//! Lab test of multicast distribution end to end: a real `fleetcastd` on host 0 pushes a
//! generated file to a group of four agents (hosts 1..4), each dropping 5% of the datagrams
//! it receives on the multicast port (nftables); a fifth group member (host 5) is offline
//! during the multicast and catches up by unicast repair when it comes back.
//!
//! Checked: every copy is byte-identical to the source, `task show` says `completed` for all
//! five, and the late device was served by unicast repairs (the gateway's finish line counts
//! at least one file's worth of them) from the sender that was still alive, not by a
//! re-created one.

// The lab harness of the daemon's tests, one file shared by both packages.
#[path = "../../daemon/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{now, read_log, status_of, wait_for, AgentSpec, Gateway, Rng};
use fleetcast_daemon::admin::Request;
use fleetcast_lab::{Lab, LabConfig};
use serde_json::Value;

#[test]
fn agent_role() {
    common::agent_role();
}

const WAIT: Duration = Duration::from_secs(45);
const MCAST_PORT: u16 = 7301;
const BLOCK: u32 = 1400;

/// Runs the operator CLI against `gw`; returns its stdout (it must succeed).
fn cli(gw: &Gateway<'_>, args: &[&str]) -> String {
    gw.cli(env!("CARGO_BIN_EXE_fleetcast"), args)
}

/// A gateway (multicast on) on host 0 and enrolled, online agents `n1`, `n2` (group `fleet`)
/// on hosts 1 and 2.
fn gateway_and_two_agents<'lab>(
    lab: &'lab Lab,
    dir: &std::path::Path,
) -> (
    Gateway<'lab>,
    Vec<AgentSpec>,
    Vec<fleetcast_lab::LabChild<'lab>>,
) {
    gateway_with_two_agents(lab, dir, &[])
}

/// [`gateway_and_two_agents`] with more `fleetcastd` arguments.
fn gateway_with_two_agents<'lab>(
    lab: &'lab Lab,
    dir: &std::path::Path,
    extra: &[&str],
) -> (
    Gateway<'lab>,
    Vec<AgentSpec>,
    Vec<fleetcast_lab::LabChild<'lab>>,
) {
    let gw_addr = lab.host(0).addr().to_string();
    let mut args = vec!["--mcast-addr", &gw_addr];
    args.extend_from_slice(extra);
    let gw = Gateway::start(lab.host(0), dir, &args);
    let (specs, agents) = gw.enrol_agents(lab, dir, 2);
    (gw, specs, agents)
}

/// `fleetcast --json push SRC --group fleet EXTRA...` as an operator runs it; the task id.
fn push_cli(gw: &Gateway<'_>, src: &std::path::Path, extra: &[&str]) -> u64 {
    let src = src.display().to_string();
    let mut args = vec!["--json", "push", &src, "--group", "fleet"];
    args.extend_from_slice(extra);
    let out = cli(gw, &args);
    serde_json::from_str::<Value>(&out).expect("json")["data"]["task"]
        .as_u64()
        .expect("task id")
}

/// Waits until every device in `names` has a verified copy of `task`.
fn wait_completed(gw: &Gateway<'_>, specs: &[AgentSpec], task: u64, names: &[&str]) {
    wait_for(
        &format!("{names:?} to complete task {task}"),
        WAIT,
        || {
            let rows = gw.task_rows(task);
            names
                .iter()
                .all(|n| status_of(&rows, n) == "completed")
                .then_some(())
        },
        || gw.task_report(specs, task),
    );
}

#[test]
fn push_reaches_four_lossy_receivers_and_a_late_one_by_unicast_catch_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(6)).expect("lab (see docs/lab.md)");
    let gw_addr = lab.host(0).addr().to_string();
    let gw = Gateway::start(
        lab.host(0),
        dir,
        &["--mcast-addr", &gw_addr, "--mcast-linger", "120"],
    );

    // Five devices in group `fleet`; all enrol, then n5 goes offline before the push.
    let (specs, agents) = gw.enrol_agents(&lab, dir, 5);
    let mut agents: Vec<_> = agents.into_iter().map(Some).collect();
    let mut n5 = agents[4].take().expect("n5");
    n5.kill().expect("kill n5");
    drop(n5);
    wait_for(
        "n5 to be offline",
        WAIT,
        || gw.device("n5").filter(|r| r["online"] == false),
        || gw.diag(),
    );
    for i in 1..=5 {
        lab.host(i)
            .loss_in(&[MCAST_PORT], 5.0)
            .expect("nft loss rule");
    }

    // A random file of 8..32 MiB (seeded).
    let mut rng = Rng::from_env(0x5eed_0007);
    let size = rng.range(8 << 20, 32 << 20) as usize;
    let mut data = vec![0u8; size];
    rng.fill(&mut data);
    let src = dir.join("image.bin");
    std::fs::write(&src, &data).expect("write source");

    let started = now();
    // The operator CLI, as a person would run it.
    let out = cli(
        &gw,
        &[
            "--json",
            "push",
            &src.display().to_string(),
            "--group",
            "fleet",
            "--block-size",
            &BLOCK.to_string(),
            "--rate",
            "400",
        ],
    );
    let r: Value = serde_json::from_str(&out).expect("push --json answer");
    let task = r["data"]["task"].as_u64().expect("task id");
    let blocks = u64::from(size.div_ceil(BLOCK as usize) as u32);
    let diag = |specs: &[AgentSpec]| {
        let mut s = format!("task show: {:#?}\n", gw.task_rows(task));
        for a in specs {
            s.push_str(&a.output());
            s.push('\n');
        }
        s.push_str(&gw.diag());
        s
    };

    // The four online receivers complete despite 5% loss.
    wait_for(
        "n1..n4 to complete the push",
        WAIT,
        || {
            let rows = gw.task_rows(task);
            (1..=4)
                .all(|i| status_of(&rows, &format!("n{i}")) == "completed")
                .then_some(())
        },
        || diag(&specs),
    );
    eprintln!(
        "{size} bytes to 4 receivers at 5% loss: {:?} from push to the last completion (20 ms polls)",
        started.elapsed()
    );
    assert_eq!(status_of(&gw.task_rows(task), "n5"), "pending");
    let late = now();

    // n5 comes back after the multicast ended: announced on welcome, caught up by unicast.
    agents[4] = Some(specs[4].spawn(lab.host(5)));
    wait_for(
        "n5 to catch up",
        WAIT,
        || (status_of(&gw.task_rows(task), "n5") == "completed").then_some(()),
        || diag(&specs),
    );
    eprintln!(
        "late device: {:?} from its restart to its completion (enrolled session, announce, unicast)",
        late.elapsed()
    );

    for (i, s) in specs.iter().enumerate() {
        let got = std::fs::read(s.state.join("downloads").join("image.bin"))
            .unwrap_or_else(|e| panic!("n{}: no received file: {e}\n{}", i + 1, diag(&specs)));
        assert!(
            got == data,
            "n{}: received file differs from the source",
            i + 1
        );
    }
    let rows = gw.task_rows(task);
    for i in 1..=5 {
        assert_eq!(status_of(&rows, &format!("n{i}")), "completed", "{rows:#?}");
    }
    let table = cli(&gw, &["task", "show", &task.to_string()]);
    assert_eq!(
        table.matches("status=completed").count(),
        5,
        "fleetcast task show:\n{table}"
    );
    assert!(cli(&gw, &["task", "show"]).contains("completed=5"));

    // Every receiver reported, so the sender has finished; the late device was served by its
    // own unicast catch-up sender (at least the whole file), with no re-created sender and no
    // second multicast.
    let line = wait_for(
        "the sender's finish line",
        WAIT,
        || {
            read_log(&dir.join("gateway.stderr"))
                .lines()
                .find(|l| l.contains("distribution finished"))
                .map(str::to_string)
        },
        || gw.diag(),
    );
    eprintln!("{line}");
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in `{line}`"))
    };
    assert_eq!(field("completed"), 5, "{line}");
    assert_eq!(field("first_pass"), blocks, "{line}");
    let catch_up = read_log(&dir.join("gateway.stderr"))
        .lines()
        .find(|l| l.contains("catch-up finished"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no catch-up line\n{}", gw.diag()));
    let repairs: u64 = catch_up
        .split_whitespace()
        .find_map(|w| w.strip_prefix("repairs="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no repairs= in `{catch_up}`"));
    assert!(catch_up.contains("verified=true"), "{catch_up}");
    assert!(repairs >= blocks, "{catch_up}");
    assert!(
        !gw.stderr().contains("re-created"),
        "the late device must be caught up by the live sender\n{}",
        gw.diag()
    );
}

/// Measurement, not a check (run with `--ignored --nocapture`): a 32 MiB push to four
/// lossless receivers at `FLEETCAST_PUSH_RATE` Mbit/s (default 1000), warm-up
/// `FLEETCAST_PUSH_WARMUP_MS` (default 300); prints the time from the push request to the
/// last completion and the sender's summary.
#[test]
#[ignore = "measurement; run by hand"]
fn push_throughput() {
    let rate: u64 = std::env::var("FLEETCAST_PUSH_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(5)).expect("lab (see docs/lab.md)");
    let gw_addr = lab.host(0).addr().to_string();
    let warmup = std::env::var("FLEETCAST_PUSH_WARMUP_MS").unwrap_or_else(|_| "300".into());
    let gw = Gateway::start(
        lab.host(0),
        dir,
        &["--mcast-addr", &gw_addr, "--mcast-warmup-ms", &warmup],
    );
    let (_specs, agents) = gw.enrol_agents(&lab, dir, 4);
    let mut rng = Rng::from_env(1);
    let mut data = vec![0u8; 32 << 20];
    rng.fill(&mut data);
    let src = dir.join("big.bin");
    std::fs::write(&src, &data).expect("write source");
    let started = now();
    let r = gw.admin(&Request::Push {
        path: src.display().to_string(),
        group: "fleet".into(),
        block_size: BLOCK,
        rate_mbps: rate,
        trigger: Default::default(),
        then: vec![],
        delivery: Default::default(),
        follow: Default::default(),
        image: None,
    });
    let task = r["task"].as_u64().expect("task id");
    wait_for(
        "all four to complete",
        Duration::from_secs(120),
        || {
            let rows = gw.task_rows(task);
            (1..=4)
                .all(|i| status_of(&rows, &format!("n{i}")) == "completed")
                .then_some(())
        },
        || gw.diag(),
    );
    let took = started.elapsed();
    let line = wait_for(
        "the finish line",
        WAIT,
        || {
            read_log(&dir.join("gateway.stderr"))
                .lines()
                .find(|l| l.contains("distribution finished"))
                .map(str::to_string)
        },
        || gw.diag(),
    );
    for l in read_log(&dir.join("gateway.stderr"))
        .lines()
        .filter(|l| l.contains("first pass done"))
    {
        eprintln!("{l}");
    }
    eprintln!(
        "rate ceiling {rate} Mbit/s: 32 MiB to 4 receivers in {took:?} = {:.0} Mbit/s goodput\n{line}",
        (32u64 << 20) as f64 * 8.0 / took.as_secs_f64() / 1e6
    );
    drop(agents);
}

#[test]
fn transfers_resume_across_agent_and_gateway_restarts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let gw_addr = lab.host(0).addr().to_string();
    let mut gw = Gateway::start(lab.host(0), dir, &["--mcast-addr", &gw_addr]);
    let (specs, mut agents) = gw.enrol_agents(&lab, dir, 2);
    let mut rng = Rng::from_env(0x5eed_0008);
    let mut data = vec![0u8; 12 << 20];
    rng.fill(&mut data);
    let src = dir.join("slow.bin");
    std::fs::write(&src, &data).expect("write source");
    let downloads = |i: usize| specs[i].state.join("downloads");

    // 1. The agent dies mid-transfer (after a progress record) and resumes from the record.
    // 12 MiB at 30 Mbit/s: a first pass of about 3.4 s.
    let push = |gw: &Gateway<'_>| {
        gw.admin(&Request::Push {
            path: src.display().to_string(),
            group: "fleet".into(),
            block_size: BLOCK,
            rate_mbps: 30,
            trigger: Default::default(),
            then: vec![],
            delivery: Default::default(),
            follow: Default::default(),
            image: None,
        })["task"]
            .as_u64()
            .expect("task id")
    };
    let task = push(&gw);
    let rec = downloads(0).join(format!(".slow.bin.task-{task}.rec"));
    wait_for(
        "n1's progress record",
        WAIT,
        || rec.exists().then_some(()),
        || gw.task_report(&specs, task),
    );
    agents[0].kill().expect("kill n1");
    agents[0] = specs[0].spawn(lab.host(1));
    wait_completed(&gw, &specs, task, &["n1", "n2"]);
    assert!(
        read_log(&specs[0].log).contains(&format!("task {task}: resuming with")),
        "n1 must resume from its record\n{}",
        specs[0].output()
    );

    // 2. The gateway dies mid-transfer: after its restart the agents are announced the task
    //    again (new key), the sender is re-created from the task table, and both complete.
    std::fs::remove_file(downloads(0).join("slow.bin")).expect("rm n1 copy");
    std::fs::remove_file(downloads(1).join("slow.bin")).expect("rm n2 copy");
    let task2 = push(&gw);
    let rec2 = downloads(1).join(format!(".slow.bin.task-{task2}.rec"));
    wait_for(
        "n2's progress record of task 2",
        WAIT,
        || rec2.exists().then_some(()),
        || gw.task_report(&specs, task2),
    );
    gw.kill();
    gw.restart();
    wait_completed(&gw, &specs, task2, &["n1", "n2"]);
    assert!(gw.stderr().contains("re-created"), "{}", gw.diag());
    for (i, s) in specs.iter().enumerate() {
        let got = std::fs::read(s.state.join("downloads").join("slow.bin")).expect("copy");
        assert!(got == data, "n{}: copy differs", i + 1);
    }
}

#[test]
fn two_concurrent_pushes_to_the_same_devices_both_complete() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let (gw, specs, _agents) = gateway_and_two_agents(&lab, dir);
    for i in 1..=specs.len() {
        lab.host(i)
            .loss_in(&[MCAST_PORT], 5.0)
            .expect("nft loss rule");
    }
    // Both transfers share the group port on each device; their unicast repairs must each
    // reach the right one. `b` is slow (about 3.4 s of first pass), so `a` must complete
    // while `b` still runs: repairs of `a` lost to `b`'s socket would hold `a` back until `b`
    // ended and closed its socket.
    let mut rng = Rng::from_env(0x5eed_0009);
    let mut files = Vec::new();
    let mut tasks = Vec::new();
    for (name, rate_mbps) in [("a.bin", 100), ("b.bin", 10)] {
        let mut data = vec![0u8; 4 << 20];
        rng.fill(&mut data);
        let p = dir.join(name);
        std::fs::write(&p, &data).expect("write source");
        let r = gw.admin(&Request::Push {
            path: p.display().to_string(),
            group: "fleet".into(),
            block_size: BLOCK,
            rate_mbps,
            trigger: Default::default(),
            then: vec![],
            delivery: Default::default(),
            follow: Default::default(),
            image: None,
        });
        tasks.push(r["task"].as_u64().expect("task id"));
        files.push((name, data));
    }
    let both = |task: u64| {
        let rows = gw.task_rows(task);
        status_of(&rows, "n1") == "completed" && status_of(&rows, "n2") == "completed"
    };
    wait_for(
        "task a to complete on both",
        WAIT,
        || both(tasks[0]).then_some(()),
        || gw.task_report(&specs, tasks[0]),
    );
    assert!(
        !both(tasks[1]),
        "the slow task b finished before a: a's repairs were held up\n{}",
        gw.task_report(&specs, tasks[1])
    );
    for &task in &tasks {
        wait_for(
            &format!("task {task} to complete on both"),
            WAIT,
            || {
                let rows = gw.task_rows(task);
                (status_of(&rows, "n1") == "completed" && status_of(&rows, "n2") == "completed")
                    .then_some(())
            },
            || gw.task_report(&specs, task),
        );
    }
    for s in &specs {
        for (name, data) in &files {
            let got = std::fs::read(s.state.join("downloads").join(name)).expect("copy");
            assert!(got == *data, "{name} differs on {}", s.log.display());
        }
    }
}

/// `fleetcast push` (without `--json`) follows the task: a line per receiver whenever its
/// state changes, then a summary, exit code 0 when every copy is verified.
#[test]
fn push_follows_each_receiver_until_every_copy_is_verified() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let (gw, specs, _agents) = gateway_and_two_agents(&lab, dir);
    let mut rng = Rng::from_env(0x5eed_000b);
    let mut data = vec![0u8; 3 << 20];
    rng.fill(&mut data);
    let src = dir.join("follow.bin");
    std::fs::write(&src, &data).expect("write source");
    // 3 MiB at 10 Mbit/s: about 2.5 s, long enough for progress reports to show.
    let out = cli(
        &gw,
        &[
            "push",
            &src.display().to_string(),
            "--group",
            "fleet",
            "--rate",
            "10",
        ],
    );
    assert!(
        out.contains("2 of 2 receivers have a verified copy"),
        "{out}"
    );
    for n in ["n1", "n2"] {
        assert!(out.contains(&format!("  {n}: completed")), "{out}");
    }
    for s in &specs {
        let got = std::fs::read(s.state.join("downloads").join("follow.bin")).expect("copy");
        assert!(got == data, "{} differs", s.state.display());
    }
}

#[test]
fn scheduled_and_quorum_triggers_start_the_multicast_when_they_say() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let (gw, specs, _agents) = gateway_and_two_agents(&lab, dir);
    let mut data = vec![0u8; 2 << 20];
    Rng::from_env(0x5eed_0009).fill(&mut data);
    let src = dir.join("sched.bin");
    std::fs::write(&src, &data).expect("write source");
    let fired = |gw: &Gateway<'_>| gw.stderr().matches("trigger fired").count();

    // 1. A schedule: `push --in 3` starts the multicast no earlier than 3 s later, and the
    //    task table records the trigger.
    let asked = now();
    let task = push_cli(&gw, &src, &["--in", "3"]);
    wait_for(
        "the scheduled start",
        WAIT,
        || (fired(&gw) == 1).then_some(()),
        || gw.task_report(&specs, task),
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(2900),
        "started {:?} after a 3 s schedule",
        asked.elapsed()
    );
    wait_completed(&gw, &specs, task, &["n1", "n2"]);
    let shown = cli(&gw, &["task", "show", &task.to_string()]);
    assert!(shown.contains("scheduled at"), "{shown}");

    // 2. A quorum: both online devices join at once, so "2 ready or 60 s" starts long before
    //    the deadline.
    for s in &specs {
        std::fs::remove_file(s.state.join("downloads").join("sched.bin")).expect("rm copy");
    }
    let asked = now();
    let r = gw.admin(&Request::Push {
        path: src.display().to_string(),
        group: "fleet".into(),
        block_size: BLOCK,
        rate_mbps: 100,
        trigger: fleetcast_daemon::admin::PushTrigger {
            at_ms: None,
            min_ready: Some(2),
            max_wait_s: Some(60),
        },
        then: vec![],
        delivery: Default::default(),
        follow: Default::default(),
        image: None,
    });
    let task2 = r["task"].as_u64().expect("task id");
    wait_for(
        "the quorum start",
        WAIT,
        || (fired(&gw) == 2).then_some(()),
        || gw.task_report(&specs, task2),
    );
    let line = gw
        .stderr()
        .lines()
        .filter(|l| l.contains("trigger fired"))
        .nth(1)
        .map(str::to_string)
        .expect("second trigger line");
    assert!(line.contains("ready=2"), "{line}");
    assert!(asked.elapsed() < Duration::from_secs(60), "{line}");
    wait_completed(&gw, &specs, task2, &["n1", "n2"]);

    // 3. A contradiction is refused with what to do instead.
    let err = gw
        .try_admin(&Request::Push {
            path: src.display().to_string(),
            group: "fleet".into(),
            block_size: BLOCK,
            rate_mbps: 100,
            trigger: fleetcast_daemon::admin::PushTrigger {
                at_ms: None,
                min_ready: None,
                max_wait_s: Some(5),
            },
            then: vec![],
            delivery: Default::default(),
            follow: Default::default(),
            image: None,
        })
        .unwrap_err();
    assert!(err.contains("give both"), "{err}");
}

#[test]
fn a_follow_up_command_runs_after_the_verified_copy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let (gw, specs, _agents) = gateway_and_two_agents(&lab, dir);
    let mut data = vec![0u8; 1 << 20];
    Rng::from_env(0x5eed_000a).fill(&mut data);
    let src = dir.join("pkg.bin");
    std::fs::write(&src, &data).expect("write source");
    let task = push_cli(&gw, &src, &["--then", "sh:echo installed"]);
    for i in 0..specs.len() {
        let name = format!("n{}", i + 1);
        let q = gw.wait_done(&name, WAIT, || gw.task_report(&specs, task));
        let cmds = q["commands"].as_array().expect("commands");
        assert_eq!(cmds.len(), 1, "{q:#}");
        assert_eq!(cmds[0]["state"], "ok", "{q:#}");
        assert!(
            cmds[0]["output"]
                .as_str()
                .unwrap_or("")
                .contains("installed"),
            "{q:#}"
        );
        assert_eq!(status_of(&gw.task_rows(task), &name), "completed");
    }
    // The event log shows the order: the verified copy, then the follow-up queued.
    let events: Vec<String> = gw
        .events()
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect();
    let at = |what: &str| {
        events
            .iter()
            .position(|t| t.contains(what))
            .unwrap_or_else(|| panic!("no `{what}` in {events:#?}"))
    };
    assert!(at("completed (digest verified)") < at("follow-up: 1 command(s) queued"));
}

/// `task cancel` during a push stops serving one receiver, and whatever it reports afterwards
/// is not recorded (no follow-up runs); `task retry` serves it again, it ends with a verified
/// copy, and the follow-up runs there once. Both are in the event log.
#[test]
fn a_receiver_cancelled_during_a_push_is_served_again_on_retry() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let (gw, specs, _agents) = gateway_and_two_agents(&lab, dir);
    let mut data = vec![0u8; 6 << 20];
    Rng::from_env(0x5eed_000e).fill(&mut data);
    let src = dir.join("disk.img");
    std::fs::write(&src, &data).expect("write source");
    // 6 MiB at 16 Mbit/s: about 3 s, time to cancel n1 while it receives.
    let src_arg = src.display().to_string();
    let out = cli(
        &gw,
        &[
            "--json",
            "push",
            &src_arg,
            "--group",
            "fleet",
            "--rate",
            "16",
            "--block-size",
            &BLOCK.to_string(),
            "--then",
            "sh:echo installed",
        ],
    );
    let task = serde_json::from_str::<Value>(&out).expect("json")["data"]["task"]
        .as_u64()
        .expect("task id");
    let t = task.to_string();
    wait_for(
        "n1 to be receiving",
        WAIT,
        || (status_of(&gw.task_rows(task), "n1") == "in_progress").then_some(()),
        || gw.task_report(&specs, task),
    );
    let out = cli(&gw, &["--json", "task", "cancel", &t, "--device", "n1"]);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["data"]["done"], "cancelled", "{v:#}");
    assert_eq!(v["data"]["devices"], "n1", "{v:#}");
    wait_completed(&gw, &specs, task, &["n2"]);
    // The multicast went on for n2, so n1 may have finished its copy from it: it is not
    // recorded, and no follow-up is queued for n1.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(status_of(&gw.task_rows(task), "n1"), "cancelled");
    assert_eq!(
        gw.queue("n1")["commands"].as_array().map(Vec::len),
        Some(0),
        "{}",
        gw.task_report(&specs, task)
    );
    let out = cli(&gw, &["task", "show", &t]);
    assert!(out.contains("status=cancelled"), "{out}");
    // Retried: pending again, announced, caught up, verified; the follow-up runs once.
    let out = cli(&gw, &["--json", "task", "retry", &t, "--device", "n1"]);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["data"]["done"], "retried", "{v:#}");
    wait_completed(&gw, &specs, task, &["n1", "n2"]);
    let q = gw.wait_done("n1", WAIT, || gw.task_report(&specs, task));
    let cmds = q["commands"].as_array().expect("commands");
    assert_eq!(cmds.len(), 1, "{q:#}");
    assert!(
        cmds[0]["output"]
            .as_str()
            .unwrap_or("")
            .contains("installed"),
        "{q:#}"
    );
    for s in &specs {
        let got = std::fs::read(s.state.join("downloads").join("disk.img")).expect("copy");
        assert!(got == data, "copy differs");
    }
    let events: Vec<String> = gw
        .events()
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect();
    for what in [
        format!("task {task} cancelled for n1 by the operator"),
        format!("task {task} retried for n1 by the operator"),
    ] {
        assert!(
            events.iter().any(|e| e.contains(&what)),
            "no `{what}` in {events:#?}"
        );
    }
}

/// A receiver that failed (its downloads directory cannot be made: a file is in the way) is
/// served again by `task retry` of the whole task once the fault is fixed, by unicast
/// catch-up, and ends with a verified copy; the device that completed is left alone.
#[test]
fn a_failed_receiver_completes_after_task_retry() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let (gw, specs, _agents) = gateway_and_two_agents(&lab, dir);
    let downloads = specs[0].state.join("downloads");
    std::fs::write(&downloads, b"in the way").expect("block n1's downloads");
    let mut data = vec![0u8; 1 << 20];
    Rng::from_env(0x5eed_000f).fill(&mut data);
    let src = dir.join("pkg.bin");
    std::fs::write(&src, &data).expect("write source");
    let task = push_cli(&gw, &src, &[]);
    wait_completed(&gw, &specs, task, &["n2"]);
    wait_for(
        "n1 to fail",
        WAIT,
        || (status_of(&gw.task_rows(task), "n1") == "failed").then_some(()),
        || gw.task_report(&specs, task),
    );
    std::fs::remove_file(&downloads).expect("clear the fault");
    let t = task.to_string();
    let out = cli(&gw, &["--json", "task", "retry", &t]);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["data"]["devices"], "n1", "only the failed one: {v:#}");
    wait_completed(&gw, &specs, task, &["n1", "n2"]);
    for s in &specs {
        let got = std::fs::read(s.state.join("downloads").join("pkg.bin")).expect("copy");
        assert!(got == data, "copy differs");
    }
    assert!(
        gw.events().iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("task {task} retried for n1")))),
        "{:#?}",
        gw.events()
    );
}

#[test]
fn a_file_dropped_into_the_watched_directory_is_pushed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let drop_dir = dir.join("drop");
    std::fs::create_dir_all(&drop_dir).expect("drop dir");
    // Present at start: the baseline, never pushed.
    std::fs::write(drop_dir.join("old.bin"), b"old").expect("old file");
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let drop_arg = drop_dir.display().to_string();
    let (gw, specs, _agents) = gateway_with_two_agents(
        &lab,
        dir,
        &["--watch-dir", &drop_arg, "--watch-group", "fleet"],
    );
    let mut data = vec![0u8; 1 << 20];
    Rng::from_env(0x5eed_000b).fill(&mut data);
    // Written under a temporary name (ignored), then renamed into place.
    std::fs::write(drop_dir.join("new.bin.tmp"), &data).expect("write");
    std::fs::rename(drop_dir.join("new.bin.tmp"), drop_dir.join("new.bin")).expect("rename");
    let task = wait_for(
        "the watched file's task",
        WAIT,
        || {
            let t = gw.try_admin(&Request::TaskShow { task: None }).ok()?;
            t["tasks"].as_array()?.first()?["task"].as_u64()
        },
        || gw.diag(),
    );
    wait_completed(&gw, &specs, task, &["n1", "n2"]);
    for s in &specs {
        let got = std::fs::read(s.state.join("downloads").join("new.bin")).expect("copy");
        assert!(got == data, "copy differs");
    }
    let shown = cli(&gw, &["task", "show", &task.to_string()]);
    assert!(shown.contains("change in watched directory"), "{shown}");
    // One task only: neither the baseline file nor the temporary name was pushed.
    let all = gw.admin(&Request::TaskShow { task: None });
    assert_eq!(all["tasks"].as_array().map(Vec::len), Some(1), "{all:#}");
}

/// A block damaged on the device's disk after it was verified and written: a copy received
/// in one run is made of blocks checked by digest before they were written, so only a copy
/// resumed from a record (blocks of an earlier run) is read back whole at the end. The agent
/// is restarted after the damage, resumes, finds the mismatch and receives the file again.
#[test]
fn a_resumed_copy_corrupted_on_the_device_is_received_again_not_reported() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let (gw, specs, mut agents) = gateway_and_two_agents(&lab, dir);
    let mut data = vec![0u8; 6 << 20];
    Rng::from_env(0x5eed_000c).fill(&mut data);
    let src = dir.join("disk.img");
    std::fs::write(&src, &data).expect("write source");
    // 6 MiB at 16 Mbit/s: about 3 s, time to damage n1's copy while it is received.
    let r = gw.admin(&Request::Push {
        path: src.display().to_string(),
        group: "fleet".into(),
        block_size: BLOCK,
        rate_mbps: 16,
        trigger: Default::default(),
        then: vec![],
        delivery: Default::default(),
        follow: Default::default(),
        image: None,
    });
    let task = r["task"].as_u64().expect("task id");
    let part = specs[0].state.join("downloads").join("disk.img.part");
    wait_for(
        "n1 to hold a third of the file",
        WAIT,
        || {
            let rows = gw.task_rows(task);
            let b = rows
                .iter()
                .find(|r| r["device"] == "n1")
                .and_then(|r| r["blocks"].as_str().map(str::to_string))?;
            let (got, total) = b.split_once('/')?;
            let (got, total): (u64, u64) = (got.parse().ok()?, total.parse().ok()?);
            (total > 0 && got * 3 >= total).then_some(())
        },
        || gw.task_report(&specs, task),
    );
    // n1 stops (its record names what it wrote); meanwhile a disk fault overwrites the
    // first block, already received and written; n1 starts again and resumes.
    agents[0].kill().expect("kill n1");
    let rec = specs[0]
        .state
        .join("downloads")
        .join(format!(".disk.img.task-{task}.rec"));
    wait_for(
        "n1's record",
        WAIT,
        || rec.exists().then_some(()),
        || specs[0].output(),
    );
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&part)
            .expect("n1's partial copy");
        f.write_all_at(&[0xee; 512], 0).expect("damage");
    }
    agents[0] = specs[0].spawn(lab.host(1));
    wait_completed(&gw, &specs, task, &["n1", "n2"]);
    let log = read_log(&specs[0].log);
    assert!(
        log.contains("receiving it again (attempt 1 of"),
        "n1 must have detected the damage and received the file again:\n{log}"
    );
    for s in &specs {
        let got = std::fs::read(s.state.join("downloads").join("disk.img")).expect("copy");
        assert!(got == data, "copy differs");
    }
    // Never reported as a failure on the way.
    assert!(
        !gw.events()
            .iter()
            .any(|e| e["message"].as_str().is_some_and(|m| m.contains("failed"))),
        "{:#?}",
        gw.events()
    );
}

#[test]
fn independent_losses_are_healed_by_parity() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(5)).expect("lab (see docs/lab.md)");
    let gw_addr = lab.host(0).addr().to_string();
    let gw = Gateway::start(lab.host(0), dir, &["--mcast-addr", &gw_addr]);
    let (specs, agents) = gw.enrol_agents(&lab, dir, 4);
    for i in 1..=4 {
        lab.host(i)
            .loss_in(&[MCAST_PORT], 5.0)
            .expect("nft loss rule");
    }
    // 8 MiB: 6,000 blocks, a dozen FEC groups of 512 (the default).
    let mut data = vec![0u8; 8 << 20];
    Rng::from_env(0x5eed_000d).fill(&mut data);
    let src = dir.join("fec.bin");
    std::fs::write(&src, &data).expect("write source");
    let r = gw.admin(&Request::Push {
        path: src.display().to_string(),
        group: "fleet".into(),
        block_size: BLOCK,
        rate_mbps: 100,
        trigger: Default::default(),
        then: vec![],
        delivery: Default::default(),
        follow: Default::default(),
        image: None,
    });
    let task = r["task"].as_u64().expect("task id");
    wait_completed(&gw, &specs, task, &["n1", "n2", "n3", "n4"]);
    for s in &specs {
        let got = std::fs::read(s.state.join("downloads").join("fec.bin")).expect("copy");
        assert!(got == data, "copy differs");
    }
    // The sender repaired with parity, and receivers rebuilt blocks from it.
    let line = wait_for(
        "the sender's finish line",
        WAIT,
        || {
            gw.stderr()
                .lines()
                .find(|l| l.contains("distribution finished"))
                .map(str::to_string)
        },
        || gw.diag(),
    );
    let parity: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("parity="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no parity= in `{line}`"));
    assert!(parity > 0, "{line}");
    let rebuilt = specs
        .iter()
        .filter(|s| read_log(&s.log).contains("blocks from parity"))
        .count();
    assert!(
        rebuilt > 0,
        "no receiver rebuilt a block from parity\n{line}"
    );
    drop(agents);
}

/// The task finisher, end to end: n1 dies during a push (12 MiB at 30 Mbit/s, a first pass
/// of about 3.4 s) and stays down until the multicast is over; then it comes back, `wipe`
/// having (or not) deleted its downloads (records and partial file). Returns the task, the
/// block count, the blocks n1 said it held when it asked (the gateway's event log), and the
/// unicast repairs its catch-up took (the gateway's `catch-up finished` line). Both copies
/// are checked byte for byte.
fn finisher_after_a_death(seed: u64, wipe: bool) -> (u64, u64, u64, u64) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let (gw, specs, mut agents) = gateway_and_two_agents(&lab, dir);
    let mut data = vec![0u8; 12 << 20];
    Rng::from_env(seed).fill(&mut data);
    let src = dir.join("slow.bin");
    std::fs::write(&src, &data).expect("write source");
    let blocks = (data.len() as u64).div_ceil(u64::from(BLOCK));
    let task = push_cli(
        &gw,
        &src,
        &["--rate", "30", "--block-size", &BLOCK.to_string()],
    );
    let downloads = specs[0].state.join("downloads");
    let rec = downloads.join(format!(".slow.bin.task-{task}.rec"));
    // A record of a good share of the file: what the device holds must count.
    wait_for(
        "n1's progress record of a third of the file",
        WAIT,
        || {
            let rows = gw.task_rows(task);
            let row = rows.iter().find(|r| r["device"] == "n1")?;
            let got: u64 = row["blocks"].as_str()?.split('/').next()?.parse().ok()?;
            (rec.exists() && got >= blocks / 3).then_some(())
        },
        || gw.task_report(&specs, task),
    );
    agents[0].kill().expect("kill n1");
    // n2 completes: the multicast's first pass is over, so n1 can only be caught up by
    // unicast.
    wait_completed(&gw, &specs, task, &["n2"]);
    if wipe {
        std::fs::remove_dir_all(&downloads).expect("rm n1 downloads");
    } else {
        assert!(rec.exists(), "n1's record");
    }
    agents[0] = specs[0].spawn(lab.host(1));
    wait_completed(&gw, &specs, task, &["n1", "n2"]);
    for (i, s) in specs.iter().enumerate() {
        let got = std::fs::read(s.state.join("downloads").join("slow.bin")).expect("copy");
        assert!(got == data, "n{}: copy differs", i + 1);
    }
    // Only n1 asks about this task (n2 was online throughout).
    let asked = format!("task {task}: device asks, holds ");
    let held: u64 = gw
        .events()
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .find_map(|m| {
            let rest = m.strip_prefix(&asked)?;
            let (held, total) = rest.split_once(' ')?.0.split_once('/')?;
            assert_eq!(total.parse::<u64>().ok(), Some(blocks), "{m}");
            held.parse().ok()
        })
        .unwrap_or_else(|| panic!("no `{asked}` in the event log\n{}", gw.diag()));
    let catch_up = wait_for(
        "n1's catch-up line",
        WAIT,
        || {
            read_log(&dir.join("gateway.stderr"))
                .lines()
                .find(|l| l.contains("catch-up finished") && l.contains(&format!("task={task} ")))
                .map(str::to_string)
        },
        || gw.diag(),
    );
    eprintln!("{catch_up} (n1 held {held} of {blocks} blocks when it asked)");
    assert!(catch_up.contains("verified=true"), "{catch_up}");
    let repairs: u64 = catch_up
        .split_whitespace()
        .find_map(|w| w.strip_prefix("repairs="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no repairs= in `{catch_up}`"));
    (task, blocks, held, repairs)
}

/// A device with a partial record reconnects after the multicast and asks: the gateway
/// takes what it holds as its row and serves, by unicast, only what is missing.
#[test]
fn a_device_with_a_partial_record_asks_and_gets_only_what_is_missing() {
    let (_task, blocks, held, repairs) = finisher_after_a_death(0x5eed_0016, false);
    assert!(
        // A partial record: how much n1 held when it died depends on the machine's load (the
        // kill follows the progress log), so only "some, not all" is asserted.
        held > 0 && held < blocks,
        "held {held} of {blocks}"
    );
    // Everything missing came by unicast, and what it held did not: measured, exactly the
    // missing count in quiet runs; 5% of the file is the slack for repairs sent twice (a
    // NACK that names a block again before its repair arrived), far below the held share.
    let missing = blocks - held;
    assert!(
        repairs >= missing,
        "{repairs} repairs, {held}/{blocks} held"
    );
    assert!(
        repairs <= missing + blocks / 20,
        "{repairs} repairs for {missing} missing blocks: more than what was missing"
    );
}

/// A device whose records were deleted asks from zero: the gateway serves the whole file by
/// unicast (the table said the task was not completed), and the copy verifies.
#[test]
fn a_device_that_lost_its_records_asks_from_zero() {
    let (_task, blocks, held, repairs) = finisher_after_a_death(0x5eed_0017, true);
    assert_eq!(held, 0, "a device without records holds nothing");
    assert!(repairs >= blocks, "{repairs} repairs for {blocks} blocks");
}

/// Runs the operator CLI against `gw` where it must fail; returns its stderr.
fn cli_fails(gw: &Gateway<'_>, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .arg("--data-dir")
        .arg(&gw.data)
        .args(args)
        .output()
        .expect("run fleetcast");
    assert!(
        !out.status.success(),
        "fleetcast {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `fleetcast push --broadcast`: the same datagrams go to the subnet-directed broadcast of
/// the gateway's interface (10.77.255.255 for the lab's 10.77.0.0/16) instead of the group,
/// to three agents that each drop 5% of what arrives on the data port; every copy verifies.
/// A receiver's capture shows the data came to the broadcast address and none to a
/// multicast group; an address that is not that subnet's broadcast is refused, naming the
/// one to use.
#[test]
fn push_by_broadcast_reaches_three_lossy_receivers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(4)).expect("lab (see docs/lab.md)");
    let gw_ip = lab.host(0).addr();
    let gw = Gateway::start(lab.host(0), dir, &["--mcast-addr", &gw_ip.to_string()]);
    let (specs, _agents) = gw.enrol_agents(&lab, dir, 3);
    for i in 1..=specs.len() {
        lab.host(i)
            .loss_in(&[MCAST_PORT], 5.0)
            .expect("nft loss rule");
    }
    let mut data = vec![0u8; 6 << 20];
    Rng::from_env(0x5eed_000b).fill(&mut data);
    let src = dir.join("bcast.bin");
    std::fs::write(&src, &data).expect("write source");
    let src_s = src.display().to_string();

    // A broadcast address of another subnet is refused before anything is sent.
    let before = cli(&gw, &["--json", "task", "list"]);
    let err = cli_fails(
        &gw,
        &[
            "push",
            &src_s,
            "--group",
            "fleet",
            "--broadcast=10.77.0.255",
        ],
    );
    assert!(
        err.contains("cannot broadcast: 10.77.0.255 is not the broadcast address of interface eth0 (10.77.0.1/16): use 10.77.255.255"),
        "{err}"
    );
    let after = cli(&gw, &["--json", "task", "list"]);
    assert_eq!(before, after, "a refused push changed the task table");

    let mut capture = lab.host(1).capture().expect("capture on n1's host");
    let task = push_cli(&gw, &src, &["--broadcast", "--rate", "100"]);
    // What n1's host receives from the gateway on the data port while the push runs (read
    // as it goes: the capture's buffer holds only a few packets; the loss rule drops after
    // the capture sees a datagram).
    let dsts = data_destinations(&mut capture, gw_ip, 200);
    wait_completed(&gw, &specs, task, &["n1", "n2", "n3"]);
    for (i, s) in specs.iter().enumerate() {
        let got = std::fs::read(s.state.join("downloads").join("bcast.bin")).expect("copy");
        assert!(got == data, "n{}: copy differs", i + 1);
    }
    let shown = cli(&gw, &["task", "show", &task.to_string()]);
    assert!(shown.contains("by broadcast to 10.77.255.255"), "{shown}");

    assert!(
        dsts.len() >= 200,
        "too few data datagrams captured: {dsts:?}"
    );
    assert!(
        dsts.iter()
            .all(|a| *a == std::net::Ipv4Addr::new(10, 77, 255, 255)),
        "{dsts:?}"
    );
}

/// The destination addresses of the first `n` datagrams from `gw` to the data port that
/// `capture` sees (fewer if they do not come within [`WAIT`]).
fn data_destinations(
    capture: &mut fleetcast_lab::Capture,
    gw: std::net::Ipv4Addr,
    n: usize,
) -> Vec<std::net::Ipv4Addr> {
    let mut dsts = Vec::new();
    let started = now();
    while dsts.len() < n && started.elapsed() < WAIT {
        if let Some(d) = capture
            .next_udp(Duration::from_millis(20))
            .expect("capture")
        {
            if *d.src.ip() == gw && d.dst.port() == MCAST_PORT {
                dsts.push(*d.dst.ip());
            }
        }
    }
    dsts
}

/// `mcast.broadcast` (here `--mcast-broadcast`) makes broadcast the default: a plain push
/// goes to the subnet's broadcast, `push --multicast` to the group; both copies verify.
#[test]
fn the_broadcast_key_is_the_default_and_multicast_can_still_be_asked_for() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let gw_ip = lab.host(0).addr();
    let (gw, specs, _agents) =
        gateway_with_two_agents(&lab, dir, &["--mcast-broadcast", "10.77.255.255"]);
    let mut data = vec![0u8; 2 << 20];
    Rng::from_env(0x5eed_000c).fill(&mut data);
    let src = dir.join("dflt.bin");
    std::fs::write(&src, &data).expect("write source");
    for (extra, want) in [
        (&[][..], std::net::Ipv4Addr::new(10, 77, 255, 255)),
        (&["--multicast"][..], std::net::Ipv4Addr::new(239, 77, 0, 1)),
    ] {
        for s in &specs {
            let _ = std::fs::remove_file(s.state.join("downloads").join("dflt.bin"));
        }
        let mut capture = lab.host(1).capture().expect("capture on n1's host");
        let mut args = vec!["--rate", "50"];
        args.extend_from_slice(extra);
        let task = push_cli(&gw, &src, &args);
        let dsts = data_destinations(&mut capture, gw_ip, 100);
        wait_completed(&gw, &specs, task, &["n1", "n2"]);
        for (i, s) in specs.iter().enumerate() {
            let got = std::fs::read(s.state.join("downloads").join("dflt.bin")).expect("copy");
            assert!(got == data, "n{}: copy differs ({extra:?})", i + 1);
        }
        assert!(dsts.len() >= 100, "{extra:?}: too few captured: {dsts:?}");
        assert!(dsts.iter().all(|a| *a == want), "{extra:?}: {dsts:?}");
    }
}
