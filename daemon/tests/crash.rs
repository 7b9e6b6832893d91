//! Crashes in the middle of a queue, on a lab network (gateway on host 0, agent on host 1).
//!
//! - The gateway is SIGKILLed at seeded random moments while a queue of short commands runs,
//!   and restarted each time with the same data directory and port: the queue still finishes
//!   with every command run exactly once, in order.
//! - The agent is SIGKILLed while a command runs (seeded choice of commands and moments) and
//!   restarted: the interrupted command is reported failed ("agent restarted while
//!   executing"), never run again, and the queue (`on_failure: continue`) goes on.
//!
//! Replay another schedule with `FLEETCAST_TEST_SEED=<n>`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{sh, wait_for, AgentSpec, Gateway, Rng};
use fleetcast_daemon::admin::OnFailureSpec;
use fleetcast_lab::{Lab, LabConfig};

#[test]
fn agent_role() {
    common::agent_role();
}

const WAIT: Duration = Duration::from_secs(60);

/// Lines of a log file.
fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn gateway_sigkill_mid_queue_loses_and_repeats_nothing() {
    const COMMANDS: u64 = 20;
    const KILLS: usize = 5;
    let mut rng = Rng::from_env(0x5eed_0001);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let mut gw = Gateway::start(lab.host(0), dir, &[]);
    let token = gw.device_add("c1");
    let spec = AgentSpec::new(&gw, dir, "c1", Some(token));
    let mut agent = spec.spawn(lab.host(1));
    gw.wait_online("c1", WAIT, || spec.output());

    let log = dir.join("c1").join("seq.log");
    let cmds = (1..=COMMANDS)
        .map(|n| vec![sh(&format!("sleep 0.1; echo {n} >> {}", log.display()))])
        .collect();
    gw.queue_add("c1", cmds, OnFailureSpec::Stop);

    let mut mid_queue = 0;
    for k in 0..KILLS {
        let ms = rng.range(50, 900);
        std::thread::sleep(Duration::from_millis(ms));
        let before = lines(&log).len();
        let q = gw.queue("c1");
        let done = q["queue"]["status"] == "done";
        gw.kill();
        eprintln!(
            "kill {k}: after {ms} ms, {before} commands logged, queue {}",
            q["queue"]
        );
        if !done {
            mid_queue += 1;
        }
        gw.restart();
    }
    assert!(
        mid_queue > 0,
        "no kill landed before the queue finished: make the queue longer"
    );

    let q = gw.wait_done("c1", WAIT, || {
        format!("{}\nlog: {:?}", spec.output(), lines(&log))
    });
    let cmds = q["commands"].as_array().expect("commands");
    assert_eq!(cmds.len() as u64, COMMANDS, "{q:#}");
    for c in cmds {
        assert_eq!(c["state"], "ok", "{q:#}");
    }
    let want: Vec<String> = (1..=COMMANDS).map(|n| n.to_string()).collect();
    assert_eq!(
        lines(&log),
        want,
        "each command once, in order\n{}",
        gw.diag()
    );
    assert!(
        agent.try_wait().expect("try_wait").is_none(),
        "the agent survives gateway crashes\n{}",
        spec.output()
    );
    assert_eq!(
        gw.stderr().matches("fleetcastd ready").count(),
        KILLS + 1,
        "{}",
        gw.diag()
    );
}

#[test]
fn agent_sigkill_mid_command_reports_failure_and_never_reruns() {
    const COMMANDS: u64 = 12;
    const KILLS: usize = 3;
    let mut rng = Rng::from_env(0x5eed_0002);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let gw = Gateway::start(lab.host(0), dir, &[]);
    let token = gw.device_add("c2");
    let spec = AgentSpec::new(&gw, dir, "c2", Some(token));
    let mut agent = spec.spawn(lab.host(1));
    gw.wait_online("c2", WAIT, || spec.output());

    // Victims: distinct seeded commands.
    let mut victims = BTreeSet::new();
    while victims.len() < KILLS {
        victims.insert(rng.range(1, COMMANDS + 1));
    }
    eprintln!("interrupting commands {victims:?}");

    let log = dir.join("c2").join("seq.log");
    let cmds = (1..=COMMANDS)
        .map(|n| {
            vec![sh(&format!(
                "echo start {n} >> {l}; sleep 0.6; echo end {n} >> {l}",
                l = log.display()
            ))]
        })
        .collect();
    gw.queue_add("c2", cmds, OnFailureSpec::Continue);

    for &n in &victims {
        let started = format!("start {n}");
        wait_for(
            &format!("command {n} to start"),
            WAIT,
            || lines(&log).contains(&started).then_some(()),
            || format!("log {:?}\n{}\n{}", lines(&log), spec.output(), gw.diag()),
        );
        // The command sleeps 0.6 s after `start`: kill within its first half.
        std::thread::sleep(Duration::from_millis(rng.range(0, 300)));
        let q = gw.queue("c2");
        let ended = lines(&log).contains(&format!("end {n}"));
        agent.kill().expect("kill agent");
        assert!(
            !ended,
            "command {n} ended before the kill: the test's timing is off"
        );
        assert_eq!(q["queue"]["cursor"], n, "running at the kill: {q:#}");
        assert_eq!(q["commands"][n as usize - 1]["state"], "running", "{q:#}");
        agent = spec.spawn(lab.host(1));
    }

    let q = gw.wait_done("c2", WAIT, || {
        format!("{}\nlog: {:?}", spec.output(), lines(&log))
    });
    let cmds = q["commands"].as_array().expect("commands");
    assert_eq!(cmds.len() as u64, COMMANDS, "{q:#}");
    let failed: BTreeSet<u64> = cmds
        .iter()
        .filter(|c| c["state"] == "failed")
        .map(|c| c["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(failed, victims, "failed = interrupted: {q:#}");
    for c in cmds {
        let seq = c["seq"].as_u64().expect("seq");
        if victims.contains(&seq) {
            assert_eq!(c["exit_code"], -1, "{c:#}");
            let out = c["output"].as_str().unwrap_or("");
            assert!(
                out.contains("agent restarted while executing"),
                "seq {seq}: {out}"
            );
        } else {
            assert_eq!(c["state"], "ok", "{q:#}");
        }
    }

    // Never run twice: each `start` once, in queue order. An interrupted command's shell
    // outlives the killed agent (its effects are "unknown", as the result says), so its `end`
    // may or may not appear; every other command's `end` appears exactly once.
    let got = lines(&log);
    let starts: Vec<u64> = got
        .iter()
        .filter_map(|l| l.strip_prefix("start "))
        .map(|s| s.parse().expect("seq"))
        .collect();
    assert_eq!(
        starts,
        (1..=COMMANDS).collect::<Vec<_>>(),
        "each command started once, in order: {got:?}"
    );
    for n in 1..=COMMANDS {
        let ends = got.iter().filter(|l| **l == format!("end {n}")).count();
        if victims.contains(&n) {
            assert!(ends <= 1, "{got:?}");
        } else {
            assert_eq!(ends, 1, "command {n}: {got:?}");
        }
    }
}

/// The gateway dies while a device is rebooting, and again right after the device is back:
/// the `rebooting` state and the reboot command are durable, and the queue completes once.
#[test]
fn gateway_sigkill_while_a_device_reboots() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let mut gw = Gateway::start(lab.host(0), dir, &[]);
    let spec = AgentSpec::new(&gw, dir, "c3", Some(gw.device_add("c3")));
    let mut agent = spec.spawn(lab.host(1));
    gw.wait_online("c3", WAIT, || spec.output());
    let log = dir.join("c3").join("seq.log");
    let l = log.display();
    gw.queue_add(
        "c3",
        vec![
            vec![sh(&format!("echo 1 >> {l}"))],
            vec![fleetcast_wire::Step::Reboot],
            vec![sh(&format!("echo 3 >> {l}"))],
            vec![sh(&format!("echo 4 >> {l}"))],
        ],
        OnFailureSpec::Stop,
    );
    let st = common::wait_exit(&mut agent, WAIT, || {
        format!("{}\n{}", spec.output(), gw.diag())
    });
    assert_eq!(st.code(), Some(common::REBOOT_EXIT), "{}", spec.output());
    wait_for(
        "rebooting",
        WAIT,
        || (gw.queue("c3")["queue"]["status"] == "rebooting").then_some(()),
        || gw.diag(),
    );
    gw.kill();
    gw.restart();
    let q = gw.queue("c3");
    assert_eq!(q["queue"]["status"], "rebooting", "after restart: {q:#}");
    assert_eq!(q["commands"][1]["state"], "rebooting", "{q:#}");

    spec.set_boot_id("99999999-0000-4000-8000-000000000001");
    let _agent = spec.spawn(lab.host(1));
    // Kill the gateway as soon as the device is back (mid-completion or just after).
    wait_for(
        "the device to reconnect",
        WAIT,
        || gw.device("c3").filter(|r| r["online"] == true).map(|_| ()),
        || format!("{}\n{}", spec.output(), gw.diag()),
    );
    gw.kill();
    gw.restart();
    let q = gw.wait_done("c3", WAIT, || spec.output());
    for c in q["commands"].as_array().expect("commands") {
        assert_eq!(c["state"], "ok", "{q:#}");
    }
    assert_eq!(lines(&log), ["1", "3", "4"], "{}", gw.diag());
    let row = gw.device("c3").expect("row");
    assert_eq!(
        row["boot_id"], "99999999000040008000000000000001",
        "{row:#}"
    );
}

/// Gateway SIGKILLs at seeded random moments over a queue with three reboots: the agent is
/// restarted with a new boot id whenever it "reboots", the gateway whenever it is killed. At
/// the end every command ran once, in order, every reboot completed, and the stored boot id is
/// the last one.
#[test]
fn gateway_sigkills_around_reboots() {
    const COMMANDS: u64 = 12;
    const KILLS: usize = 6;
    let mut rng = Rng::from_env(0x5eed_0004);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let mut gw = Gateway::start(lab.host(0), dir, &[]);
    let spec = AgentSpec::new(&gw, dir, "c4", Some(gw.device_add("c4")));
    let mut agent = spec.spawn(lab.host(1));
    gw.wait_online("c4", WAIT, || spec.output());
    let log = dir.join("c4").join("seq.log");
    let is_reboot = |n: u64| n % 4 == 0;
    let cmds = (1..=COMMANDS)
        .map(|n| {
            if is_reboot(n) {
                vec![fleetcast_wire::Step::Reboot]
            } else {
                vec![sh(&format!("sleep 0.05; echo {n} >> {}", log.display()))]
            }
        })
        .collect();
    gw.queue_add("c4", cmds, OnFailureSpec::Stop);

    let mut boots = 0u32;
    let mut kills = 0;
    let mut next_kill = common::now() + Duration::from_millis(rng.range(20, 600));
    let start = common::now();
    loop {
        if let Some(st) = agent.try_wait().expect("try_wait") {
            assert_eq!(
                st.code(),
                Some(common::REBOOT_EXIT),
                "agent exit\n{}\n{}",
                spec.output(),
                gw.diag()
            );
            boots += 1;
            spec.set_boot_id(&format!("{boots:08x}-0000-4000-8000-000000000000"));
            agent = spec.spawn(lab.host(1));
        }
        if kills < KILLS && common::now() >= next_kill {
            gw.kill();
            gw.restart();
            kills += 1;
            next_kill = common::now() + Duration::from_millis(rng.range(20, 600));
        }
        if kills == KILLS && gw.queue("c4")["queue"]["status"] == "done" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "queue not done: {:#}\nlog {:?}\n{}\n{}",
            gw.queue("c4"),
            lines(&log),
            spec.output(),
            gw.diag()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let q = gw.queue("c4");
    for c in q["commands"].as_array().expect("commands") {
        assert_eq!(c["state"], "ok", "{q:#}");
    }
    let want: Vec<String> = (1..=COMMANDS)
        .filter(|n| !is_reboot(*n))
        .map(|n| n.to_string())
        .collect();
    assert_eq!(lines(&log), want, "{}", gw.diag());
    assert_eq!(boots, 3, "one restart per reboot\n{}", spec.output());
    let row = gw.device("c4").expect("row");
    assert_eq!(
        row["boot_id"],
        format!("{boots:08x}000040008000000000000000"),
        "{row:#}"
    );
    let completed = gw
        .events()
        .iter()
        .filter(|e| e["kind"] == "rebootcompleted")
        .count();
    assert_eq!(completed, 3, "{}", gw.diag());
}

/// Deterministic form of what `gateway_sigkills_around_reboots` hits at random: the gateway
/// dispatches a reboot command, then dies before it stores the agent's `RebootStarting`
/// (frozen with SIGSTOP so the message sits unread in its socket, then SIGKILLed). The agent
/// reboots and comes back with a new boot id. The gateway restarts with the queue still
/// awaiting the reboot command's result; the agent's `Hello.last` is (seq, no result), so the
/// gateway resumes the command as still running (fleet.rs, Hello: `resume`) and its session
/// core then refuses the agent's `RebootComplete` as a seq mismatch ("RebootComplete for seq
/// 2, which was already answered", wire/src/session/gateway.rs, `Message::RebootComplete`
/// with a slot in flight), closing the session with PROTOCOL. The agent reconnects and
/// repeats, until the command's result deadline fails the queue.
#[test]
fn lost_reboot_starting_then_reboot_complete_is_accepted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let mut gw = Gateway::start(lab.host(0), dir, &[]);
    let spec = AgentSpec::new(&gw, dir, "c5", Some(gw.device_add("c5")));
    let mut agent = spec.spawn(lab.host(1));
    gw.wait_online("c5", WAIT, || spec.output());
    let log = dir.join("c5").join("seq.log");
    let l = log.display();
    gw.queue_add(
        "c5",
        vec![
            vec![sh(&format!("echo 1 >> {l}"))],
            vec![
                sh(&format!("echo pre-reboot >> {l}; sleep 1")),
                fleetcast_wire::Step::Reboot,
            ],
            vec![sh(&format!("echo 3 >> {l}"))],
        ],
        OnFailureSpec::Stop,
    );
    wait_for(
        "the reboot command to start",
        WAIT,
        || {
            lines(&log)
                .contains(&"pre-reboot".to_string())
                .then_some(())
        },
        || format!("{}\n{}", spec.output(), gw.diag()),
    );
    let q = gw.queue("c5");
    assert_eq!(q["queue"]["cursor"], 2, "{q:#}");
    let pid = gw.pid().expect("gateway running");
    // SAFETY: kill(2) on the gateway this test started (its LabChild is alive, not reaped).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    let st = common::wait_exit(&mut agent, WAIT, || spec.output());
    assert_eq!(st.code(), Some(common::REBOOT_EXIT), "{}", spec.output());
    gw.kill(); // SIGKILL ends a stopped process too.
    gw.restart();
    let q = gw.queue("c5");
    assert_eq!(q["queue"]["status"], "awaitingresult", "{q:#}");

    spec.set_boot_id("55555555-0000-4000-8000-000000000002");
    let _agent = spec.spawn(lab.host(1));
    let q = gw.wait_done("c5", WAIT, || spec.output());
    for c in q["commands"].as_array().expect("commands") {
        assert_eq!(c["state"], "ok", "{q:#}");
    }
    assert_eq!(lines(&log), ["1", "pre-reboot", "3"]);
    let row = gw.device("c5").expect("row");
    assert_eq!(
        row["boot_id"], "55555555000040008000000000000002",
        "{row:#}"
    );
}
