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
use fleetcast_daemon::admin::{OnFailureSpec, StepSpec};
use fleetcast_lab::{Lab, LabConfig};
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
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(DEVICES + 1)).expect("lab (see docs/lab.md)");
    let gw = Gateway::start(lab.host(0), dir, &[]);

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
                StepSpec::Write {
                    path: two.clone(),
                    mode: 0o644,
                    contents: "two\n".into(),
                },
                sh(&format!("cat {two} >> {log}")),
            ],
            vec![StepSpec::Reboot],
            vec![sh(&format!("echo four >> {log}"))],
            vec![StepSpec::Report],
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
    drop(gw);
}
