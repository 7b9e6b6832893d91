//! Retries and cancels of a device's queue, end to end on a lab network (the real gateway on
//! host 0, the real agent on host 1).
//!
//! - `queue retry` after a failed command runs it again, exactly once, and the queue goes on;
//!   also when the gateway was restarted between the failure and the retry.
//! - A command with `--attempts 2` whose first attempt fails runs a second time by itself.
//! - `queue cancel` releases a queue whose command is still in flight: the queue is free at
//!   once, and the next command runs once the device has finished the cancelled one.
//!
//! Every wait is shorter than the command timeout plus the gateway's grace (90 s), so a queue
//! that sits in `awaitingresult` until the timeout fails the test instead of passing late.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{sh, wait_for, AgentSpec, Gateway};
use fleetcast_daemon::admin::{OnFailureSpec, Request};
use fleetcast_lab::{Lab, LabConfig};
use fleetcast_wire::Step;
use serde_json::Value;

#[test]
fn agent_role() {
    common::agent_role();
}

const WAIT: Duration = Duration::from_secs(45);

/// A step that fails the first time it runs (exit 3) and succeeds afterwards; every run
/// appends a line to `log` (`first`, then `again`).
fn fails_once(dir: &Path, log: &Path) -> Step<'static> {
    let flag = dir.join("ran-once");
    sh(&format!(
        "if [ -e {flag} ]; then echo again >> {log}; else touch {flag}; echo first >> {log}; \
         echo failing on purpose; exit 3; fi",
        flag = flag.display(),
        log = log.display()
    ))
}

fn echo(word: &str, log: &Path) -> Vec<Step<'static>> {
    vec![sh(&format!("echo {word} >> {}", log.display()))]
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

fn wait_status(gw: &Gateway<'_>, name: &str, status: &str, diag: impl Fn() -> String) -> Value {
    wait_for(
        &format!("{name}'s queue to be {status}"),
        WAIT,
        || {
            let q = gw.queue(name);
            (q["queue"]["status"] == status).then_some(q)
        },
        || format!("{:#}\n{}\n{}", gw.queue(name), diag(), gw.diag()),
    )
}

struct Rig<'lab> {
    gw: Gateway<'lab>,
    spec: AgentSpec,
    _agent: fleetcast_lab::LabChild<'lab>,
    log: PathBuf,
}

fn rig<'lab>(lab: &'lab Lab, dir: &Path, name: &str) -> Rig<'lab> {
    let gw = Gateway::start(lab.host(0), dir, &[]);
    let spec = AgentSpec::new(&gw, dir, name, Some(gw.device_add(name)));
    let agent = spec.spawn(lab.host(1));
    gw.wait_online(name, WAIT, || spec.output());
    let log = dir.join(name).join("commands.log");
    Rig {
        gw,
        spec,
        _agent: agent,
        log,
    }
}

/// Fails command 1, optionally restarts the gateway, retries: command 1 runs once more and
/// succeeds, command 2 runs once, and the stored result is the second attempt's.
fn retry_runs_the_command_again(restart_gateway: bool) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let mut r = rig(&lab, dir, "r1");
    let d = dir.join("r1");
    r.gw.queue_add(
        "r1",
        vec![vec![fails_once(&d, &r.log)], echo("two", &r.log)],
        OnFailureSpec::Stop,
    );
    let diag = || format!("{}\nlog: {:?}", r.spec.output(), read(&r.log));
    let q = wait_status(&r.gw, "r1", "failed", diag);
    assert_eq!(q["queue"]["failure"], "CommandFailed", "{q:#}");
    assert_eq!(q["commands"][0]["exit_code"], 3, "{q:#}");
    assert_eq!(read(&r.log), "first\n");

    if restart_gateway {
        r.gw.kill();
        r.gw.restart();
        r.gw.wait_online("r1", WAIT, || r.spec.output());
    }
    let resp = r.gw.admin(&Request::QueueRetry {
        device: "r1".into(),
    });
    assert_eq!(resp["done"], "retrying", "{resp:#}");
    let q = r.gw.wait_done("r1", WAIT, || {
        format!("{}\nlog: {:?}", r.spec.output(), read(&r.log))
    });
    assert_eq!(read(&r.log), "first\nagain\ntwo\n", "{q:#}");
    for c in q["commands"].as_array().expect("commands") {
        assert_eq!(c["state"], "ok", "{q:#}");
    }
    assert_eq!(q["commands"][0]["exit_code"], 0, "{q:#}");
    assert_eq!(
        q["queue"]["attempt"], 1,
        "the cursor is on command 2: {q:#}"
    );
    // Nothing was refused on the way.
    let err = r.gw.stderr();
    assert!(!err.contains("already executed"), "{err}");
    assert!(
        !r.spec.output().contains("already executed"),
        "{}",
        r.spec.output()
    );
}

#[test]
fn retry_after_a_failure_runs_the_command_again_exactly_once() {
    retry_runs_the_command_again(false);
}

#[test]
fn retry_after_a_gateway_restart_runs_the_command_again_exactly_once() {
    retry_runs_the_command_again(true);
}

/// `--attempts 2`: the first attempt fails, the gateway sends the same command again by
/// itself and the agent runs it (the second attempt, not a redelivery of the first).
#[test]
fn a_second_attempt_of_the_policy_runs_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let r = rig(&lab, dir, "a1");
    let d = dir.join("a1");
    r.gw.admin(&Request::QueueAdd {
        attached: None,
        target: "a1".into(),
        commands: vec![vec![fails_once(&d, &r.log)], echo("two", &r.log)],
        timeout_ms: 60_000,
        max_attempts: 2,
        on_failure: OnFailureSpec::Stop,
    });
    let q = r.gw.wait_done("a1", WAIT, || {
        format!("{}\nlog: {:?}", r.spec.output(), read(&r.log))
    });
    assert_eq!(read(&r.log), "first\nagain\ntwo\n", "{q:#}");
    assert_eq!(q["commands"][0]["state"], "ok", "{q:#}");
}

/// `queue cancel` while a command is in flight releases the queue at once. The device
/// finishes the command it is running (it is not interrupted; its late result is discarded),
/// and the next command queued runs after it, once.
#[test]
fn cancel_releases_a_queue_awaiting_a_result() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let r = rig(&lab, dir, "c1");
    let log = r.log.display().to_string();
    r.gw.queue_add(
        "c1",
        vec![
            vec![sh(&format!(
                "echo started >> {log}; sleep 3; echo slept >> {log}"
            ))],
            echo("never", &r.log),
        ],
        OnFailureSpec::Stop,
    );
    let diag = || format!("{}\nlog: {:?}", r.spec.output(), read(&r.log));
    wait_for(
        "command 1 to start on the device",
        WAIT,
        || read(&r.log).contains("started").then_some(()),
        diag,
    );
    let resp = r.gw.admin(&Request::QueueCancel {
        device: "c1".into(),
    });
    assert_eq!(resp["done"], "cancelled 2 command(s)", "{resp:#}");
    assert_ne!(resp["queue"]["status"], "awaitingresult", "{resp:#}");
    let q = r.gw.queue("c1");
    assert_eq!(q["commands"].as_array().map(Vec::len), Some(0), "{q:#}");

    r.gw.queue_add("c1", vec![echo("after", &r.log)], OnFailureSpec::Stop);
    let q = r.gw.wait_done("c1", WAIT, diag);
    assert_eq!(read(&r.log), "started\nslept\nafter\n", "{q:#}");
    let cmds = q["commands"].as_array().expect("commands");
    assert_eq!(cmds.len(), 1, "only the new command is left: {q:#}");
    assert_eq!(cmds[0]["seq"], 3, "{q:#}");
    assert_eq!(cmds[0]["state"], "ok", "{q:#}");
    assert!(
        r.gw.events().iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("cancelled command 1"))),
        "the discarded result is in the event log\n{}",
        r.gw.diag()
    );
}
