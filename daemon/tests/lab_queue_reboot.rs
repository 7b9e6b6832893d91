//! A queue with a reboot in the middle, on three devices of a lab network: the real gateway on
//! host 0, the real agent on hosts 1..3.
//!
//! Each device gets five commands: (1) append `one` to its log, (2) write a file and append
//! its contents, (3) reboot, (4) append `four`, (5) a configuration report. The agent
//! simulates the reboot by exiting with [`REBOOT_EXIT`]; the test then gives it a new boot id
//! and starts it again, which is what a reboot looks like from the gateway. Checked: every
//! command ran exactly once and in order (the log), all five results are stored and `ok`, the
//! queue went through `rebooting`, came back on a new session, and the stored report carries
//! the new boot id.

mod common;

use std::time::Duration;

use common::{sh, wait_exit, wait_for, AgentSpec, Gateway, REBOOT_EXIT};
use fleetcast_daemon::admin::OnFailureSpec;
use fleetcast_lab::{Lab, LabConfig};
use fleetcast_wire::Step;
use serde_json::Value;

#[test]
fn agent_role() {
    common::agent_role();
}

const DEVICES: usize = 3;
const WAIT: Duration = Duration::from_secs(60);

fn kinds_for(events: &[Value], dev: u64) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["device"] == dev)
        .map(|e| e["kind"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn three_devices_run_a_queue_through_a_reboot_exactly_once_in_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    queue_through_a_reboot(tmp.path(), &[], false);
}

/// The same on a gateway whose state is in PostgreSQL (`store.engine = "postgres"`), killed
/// with SIGKILL and started again while every device is rebooting: the queues, their reboot
/// suspension and the results so far are the database's, and nothing is lost or run twice.
#[test]
fn on_postgres_a_queue_survives_a_gateway_killed_during_the_reboot() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pg = fleetcast_lab::Postgres::start().expect("PostgreSQL (Debian package postgresql)");
    pg.create_database("fleet").expect("createdb");
    let cfg = tmp.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[store]\nengine = \"postgres\"\nurl = \"{}\"\n",
            pg.url("fleet")
        ),
    )
    .expect("config");
    let cfg = cfg.display().to_string();
    let gw_data = queue_through_a_reboot(tmp.path(), &["--config", &cfg], true);
    assert!(
        !gw_data.join("store").exists(),
        "no LMDB store next to a PostgreSQL one"
    );
}

/// Runs the scenario of the module docs; with `kill_gateway`, the gateway is SIGKILLed and
/// restarted once every queue waits in `rebooting`. Returns the gateway's data directory.
fn queue_through_a_reboot(
    dir: &std::path::Path,
    extra: &[&str],
    kill_gateway: bool,
) -> std::path::PathBuf {
    let lab = Lab::new(LabConfig::hosts(DEVICES + 1)).expect("lab (see docs/lab.md)");
    let mut gw = Gateway::start(lab.host(0), dir, extra);

    // Enrol all three.
    let mut specs = Vec::new();
    let mut agents = Vec::new();
    for i in 1..=DEVICES {
        let name = format!("n{i}");
        let token = gw.device_add(&name);
        let spec = AgentSpec::new(&gw, dir, &name, Some(token));
        agents.push(spec.spawn(lab.host(i)));
        specs.push(spec);
    }
    let ids: Vec<u64> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| gw.wait_online(&format!("n{}", i + 1), WAIT, || s.output()))
        .collect();

    // Five commands per device; the log and the written file are the device's own.
    for (i, spec) in specs.iter().enumerate() {
        let d = spec.log.parent().expect("agent dir");
        let log = d.join("commands.log").display().to_string();
        let two = d.join("two.txt").display().to_string();
        let cmds = vec![
            vec![sh(&format!("echo one >> {log}"))],
            vec![
                Step::Write {
                    path: two.clone().into(),
                    mode: 0o644,
                    contents: b"two\n".into(),
                },
                sh(&format!("cat {two} >> {log}")),
            ],
            vec![Step::Reboot],
            vec![sh(&format!("echo four >> {log}"))],
            vec![Step::Report],
        ];
        gw.queue_add(&format!("n{}", i + 1), cmds, OnFailureSpec::Stop);
    }

    // Each agent reboots at command 3: it exits with the reboot code, and the queue waits in
    // `rebooting` until the device is back.
    for (i, (agent, spec)) in agents.iter_mut().zip(&specs).enumerate() {
        let name = format!("n{}", i + 1);
        let st = wait_exit(agent, WAIT, || {
            format!("{}\n{:#}\n{}", spec.output(), gw.queue(&name), gw.diag())
        });
        assert_eq!(
            st.code(),
            Some(REBOOT_EXIT),
            "agent {name} should exit with the reboot code\n{}",
            spec.output()
        );
        let q = wait_for(
            &format!("{name}'s queue to be rebooting at command 3"),
            WAIT,
            || {
                let q = gw.queue(&name);
                (q["queue"]["status"] == "rebooting").then_some(q)
            },
            || format!("{:#}\n{}", gw.queue(&name), gw.diag()),
        );
        assert_eq!(q["queue"]["cursor"], 3, "{q:#}");
        assert_eq!(q["commands"][2]["state"], "rebooting", "{q:#}");
        for c in 0..2 {
            assert_eq!(q["commands"][c]["state"], "ok", "{q:#}");
        }
        for c in 3..5 {
            assert_eq!(q["commands"][c]["state"], "pending", "{q:#}");
        }
        assert_eq!(gw.device(&name).expect("row")["online"], false);
    }

    if kill_gateway {
        gw.kill();
        gw.restart();
        for i in 1..=DEVICES {
            let q = gw.queue(&format!("n{i}"));
            assert_eq!(
                q["queue"]["status"], "rebooting",
                "after the restart: {q:#}"
            );
        }
    }

    // Back from the reboot with a new boot id.
    let new_boot: Vec<String> = (1..=DEVICES)
        .map(|i| format!("{i:08x}-b007-4000-8000-00000000beef"))
        .collect();
    let mut agents2 = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        spec.set_boot_id(&new_boot[i]);
        agents2.push(spec.spawn(lab.host(i + 1)));
    }
    for (i, spec) in specs.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let q = gw.wait_done(&name, WAIT, || spec.output());
        let cmds = q["commands"].as_array().expect("commands");
        assert_eq!(cmds.len(), 5, "{q:#}");
        for (k, c) in cmds.iter().enumerate() {
            assert_eq!(c["seq"], k as u64 + 1, "{q:#}");
            assert_eq!(c["state"], "ok", "command {} of {name}: {q:#}", k + 1);
        }
        assert_eq!(q["queue"]["completed_through"], 5, "{q:#}");
        assert_eq!(q["queue"]["pending"], 0, "{q:#}");

        // Exactly once, in order.
        let log = spec.log.parent().expect("dir").join("commands.log");
        let text = std::fs::read_to_string(&log).expect("commands.log");
        assert_eq!(text, "one\ntwo\nfour\n", "{name}: {}", spec.output());

        // The report: the device row shows the new boot id.
        let row = gw.device(&name).expect("device row");
        let want = new_boot[i].replace('-', "");
        assert_eq!(row["boot_id"], want.as_str(), "{row:#}");
        assert_eq!(row["online"], true, "{row:#}");
    }

    // The event log: per device one reboot started, one completed, and the completion came on
    // a session opened after the reboot started (a new TLS session).
    let events = gw.events();
    for (i, id) in ids.iter().enumerate() {
        let kinds = kinds_for(&events, *id);
        let count = |k: &str| kinds.iter().filter(|x| *x == k).count();
        assert_eq!(count("enrolled"), 1, "n{}: {kinds:?}", i + 1);
        assert_eq!(count("rebootstarted"), 1, "n{}: {kinds:?}", i + 1);
        assert_eq!(count("rebootcompleted"), 1, "n{}: {kinds:?}", i + 1);
        assert_eq!(count("commandresult"), 4, "n{}: {kinds:?}", i + 1);
        let started = kinds
            .iter()
            .position(|k| k == "rebootstarted")
            .expect("started");
        let done = kinds
            .iter()
            .position(|k| k == "rebootcompleted")
            .expect("done");
        let reconnect = kinds[started..]
            .iter()
            .position(|k| k == "connected")
            .map(|p| p + started)
            .unwrap_or_else(|| panic!("n{}: no session after the reboot: {kinds:?}", i + 1));
        assert!(reconnect < done, "n{}: {kinds:?}", i + 1);
        let msg = events
            .iter()
            .find(|e| e["device"] == *id && e["kind"] == "rebootcompleted")
            .and_then(|e| e["message"].as_str())
            .unwrap_or("");
        assert!(
            msg.contains(&new_boot[i].replace('-', "")),
            "reboot completion should name the new boot id: {msg}"
        );
    }
    // Sessions before and after the reboot are different connections.
    let sessions: Vec<&str> = events
        .iter()
        .filter(|e| e["device"] == ids[0] && e["kind"] == "connected")
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(sessions.len() >= 2, "{sessions:?}");
    assert_ne!(sessions[0], sessions[sessions.len() - 1], "{sessions:?}");
    drop(agents2);
    let data = gw.data.clone();
    drop(gw);
    data
}

/// The agent comes back from a "reboot" with the same boot id (the reboot command returned
/// without rebooting): it must reboot again rather than report completion, and the queue stays
/// `rebooting` until a real reboot (a new boot id) happens. Nothing runs twice.
#[test]
fn a_reboot_that_did_not_change_the_boot_id_is_done_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let gw = Gateway::start(lab.host(0), dir, &[]);
    let spec = AgentSpec::new(&gw, dir, "r1", Some(gw.device_add("r1")));
    let mut agent = spec.spawn(lab.host(1));
    gw.wait_online("r1", WAIT, || spec.output());
    let log = dir.join("r1").join("commands.log").display().to_string();
    gw.queue_add(
        "r1",
        vec![
            vec![sh(&format!("echo one >> {log}"))],
            vec![Step::Reboot],
            vec![sh(&format!("echo three >> {log}"))],
        ],
        OnFailureSpec::Stop,
    );
    let diag = || format!("{}\n{:#}\n{}", spec.output(), gw.queue("r1"), gw.diag());
    for round in 0..2 {
        let st = wait_exit(&mut agent, WAIT, diag);
        assert_eq!(st.code(), Some(REBOOT_EXIT), "round {round}\n{}", diag());
        wait_for(
            "the queue to be rebooting",
            WAIT,
            || (gw.queue("r1")["queue"]["status"] == "rebooting").then_some(()),
            diag,
        );
        // Same boot id as before: the reboot did not happen.
        agent = spec.spawn(lab.host(1));
    }
    let st = wait_exit(&mut agent, WAIT, diag);
    assert_eq!(st.code(), Some(REBOOT_EXIT), "{}", diag());
    let q = gw.queue("r1");
    assert_eq!(q["queue"]["status"], "rebooting", "{q:#}");
    assert_eq!(q["commands"][2]["state"], "pending", "{q:#}");

    spec.set_boot_id("11111111-2222-4333-8444-555555555555");
    let _agent = spec.spawn(lab.host(1));
    let q = gw.wait_done("r1", WAIT, || spec.output());
    for c in q["commands"].as_array().expect("commands") {
        assert_eq!(c["state"], "ok", "{q:#}");
    }
    let text = std::fs::read_to_string(&log).expect("log");
    assert_eq!(text, "one\nthree\n");
    let row = gw.device("r1").expect("row");
    assert_eq!(
        row["boot_id"], "11111111222243338444555555555555",
        "{row:#}"
    );
}

/// A device rebooting with a 1 s reboot deadline that comes back late, with a new boot id.
/// Returns the lab pieces after the queue `[reboot, echo two]` has failed with
/// `RebootDeadlineMissed` and the agent has been restarted.
fn late_return<'lab>(
    lab: &'lab Lab,
    dir: &std::path::Path,
    come_back: bool,
) -> (
    Gateway<'lab>,
    AgentSpec,
    Option<fleetcast_lab::LabChild<'lab>>,
    String,
) {
    let gw = Gateway::start(lab.host(0), dir, &["--reboot-timeout", "1"]);
    let spec = AgentSpec::new(&gw, dir, "t1", Some(gw.device_add("t1")));
    let mut agent = spec.spawn(lab.host(1));
    gw.wait_online("t1", WAIT, || spec.output());
    let log = dir.join("t1").join("commands.log").display().to_string();
    gw.queue_add(
        "t1",
        vec![vec![Step::Reboot], vec![sh(&format!("echo two >> {log}"))]],
        OnFailureSpec::Stop,
    );
    let st = wait_exit(&mut agent, WAIT, || spec.output());
    assert_eq!(st.code(), Some(REBOOT_EXIT), "{}", spec.output());
    let q = wait_for(
        "the reboot deadline to fail the queue",
        WAIT,
        || {
            let q = gw.queue("t1");
            (q["queue"]["status"] == "failed").then_some(q)
        },
        || format!("{:#}\n{}", gw.queue("t1"), gw.diag()),
    );
    assert_eq!(q["queue"]["failure"], "RebootDeadlineMissed", "{q:#}");
    assert!(gw.events().iter().any(|e| e["kind"] == "queuefailed"));
    spec.set_boot_id("11111111-2222-4333-8444-555555555555");
    let agent = come_back.then(|| spec.spawn(lab.host(1)));
    (gw, spec, agent, log)
}

fn not_applied(gw: &Gateway<'_>) -> usize {
    gw.events()
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("not applied"))
                && e["kind"] == "other"
        })
        .count()
}

/// Late return: the device comes back after its reboot deadline failed the queue. The reboot
/// did complete, so the gateway accepts the completion (new boot id), the failure stays in the
/// event log, and the rest of the queue runs once. No reconnect loop, no operator action.
#[test]
fn late_return_after_the_reboot_deadline_completes_the_reboot_and_the_queue() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let (gw, spec, _agent, log) = late_return(&lab, tmp.path(), true);
    let q = gw.wait_done("t1", WAIT, || spec.output());
    assert_eq!(q["commands"][0]["state"], "ok", "{q:#}");
    assert_eq!(q["commands"][1]["state"], "ok", "{q:#}");
    assert_eq!(std::fs::read_to_string(&log).expect("log"), "two\n");
    let ev = gw.events();
    assert!(
        ev.iter().any(|e| e["kind"] == "queuefailed"),
        "the failure stays visible"
    );
    assert!(ev.iter().any(|e| e["kind"] == "rebootcompleted"));
    assert_eq!(not_applied(&gw), 0, "{}", gw.diag());
    let row = gw.device("t1").expect("row");
    assert_eq!(
        row["boot_id"], "11111111222243338444555555555555",
        "{row:#}"
    );
}

/// The operator skips the reboot command while the device is away; when it comes back its
/// completion no longer applies: recorded once (no reconnect loop), and the rest of the queue
/// runs once.
#[test]
fn skip_while_away_then_late_return_is_recorded_once_and_the_queue_completes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let (gw, spec, _none, log) = late_return(&lab, tmp.path(), false);
    gw.admin(&fleetcast_daemon::admin::Request::QueueSkip {
        device: "t1".into(),
    });
    let _agent = spec.spawn(lab.host(1));
    let q = gw.wait_done("t1", WAIT, || spec.output());
    assert_eq!(q["commands"][0]["output"], "skipped", "{q:#}");
    assert_eq!(q["commands"][1]["state"], "ok", "{q:#}");
    assert_eq!(std::fs::read_to_string(&log).expect("log"), "two\n");
    std::thread::sleep(Duration::from_secs(3));
    assert!(not_applied(&gw) <= 1, "a reconnect loop\n{}", gw.diag());
}

/// `fleetcast status`'s row for `name`.
fn status_row(gw: &Gateway<'_>, name: &str) -> Value {
    let st = gw.admin(&fleetcast_daemon::admin::Request::Status);
    st["devices"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

/// The configuration report reaches the gateway on a device that never reboots: once after
/// enrolment, and again from a `report` step (after the device's software changed).
#[test]
fn reports_arrive_after_enrolment_and_from_a_report_step() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let gw = Gateway::start(lab.host(0), dir, &[]);
    let spec = AgentSpec::new(&gw, dir, "p1", Some(gw.device_add("p1")));
    let _agent = spec.spawn(lab.host(1));
    gw.wait_online("p1", WAIT, || spec.output());
    let row = wait_for(
        "the report sent after enrolment",
        WAIT,
        || {
            let r = status_row(&gw, "p1");
            (r["packages"] == 2).then_some(r)
        },
        || {
            format!(
                "{:#}\n{}\n{}",
                status_row(&gw, "p1"),
                spec.output(),
                gw.diag()
            )
        },
    );
    assert!(row["os"].as_str().is_some_and(|s| !s.is_empty()), "{row:#}");
    assert!(
        row["kernel"].as_str().is_some_and(|s| !s.is_empty()),
        "{row:#}"
    );
    assert_eq!(
        row["boot_id"], "00000000000040008000000000000001",
        "{row:#}"
    );

    // A package is installed; a `report` step tells the gateway.
    let mut dpkg = std::fs::read_to_string(&spec.dpkg).expect("dpkg status");
    dpkg.push_str("Package: nginx\nStatus: install ok installed\nVersion: 1.22.1-9\n\n");
    std::fs::write(&spec.dpkg, dpkg).expect("dpkg status");
    gw.queue_add("p1", vec![vec![Step::Report]], OnFailureSpec::Stop);
    let q = gw.wait_done("p1", WAIT, || spec.output());
    assert_eq!(q["commands"][0]["state"], "ok", "{q:#}");
    let row = status_row(&gw, "p1");
    assert_eq!(row["packages"], 3, "{row:#}\n{}", gw.diag());
}

/// A command whose last step is `reboot`: the results of the steps before it are the ones
/// the device produced (exit codes, output), kept by the agent across the reboot, not an
/// invented "all OK, no output".
#[test]
fn a_reboot_command_keeps_the_real_results_of_its_earlier_steps() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let gw = Gateway::start(lab.host(0), dir, &[]);
    let spec = AgentSpec::new(&gw, dir, "k1", Some(gw.device_add("k1")));
    let mut agent = spec.spawn(lab.host(1));
    gw.wait_online("k1", WAIT, || spec.output());
    gw.queue_add(
        "k1",
        vec![vec![
            sh("echo preparing the upgrade; sleep 0.2"),
            sh("echo kernel installed"),
            Step::Reboot,
        ]],
        OnFailureSpec::Stop,
    );
    let st = wait_exit(&mut agent, WAIT, || spec.output());
    assert_eq!(st.code(), Some(REBOOT_EXIT), "{}", spec.output());
    spec.set_boot_id("22222222-3333-4444-8555-666666666666");
    let _agent = spec.spawn(lab.host(1));
    let q = gw.wait_done("k1", WAIT, || spec.output());
    let c = &q["commands"][0];
    assert_eq!(c["state"], "ok", "{q:#}");
    let out = c["output"].as_str().unwrap_or("");
    assert!(
        out.contains("preparing the upgrade\n") && out.contains("kernel installed\n"),
        "the real output of the steps before the reboot: {q:#}"
    );
    assert_eq!(c["steps"], 3, "{q:#}");
}
