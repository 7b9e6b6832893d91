//! Lab tests of pushes that follow their group: a real `fleetcastd` on host 0 and agents on
//! hosts 1.., driven with the operator CLI as a person would.
//!
//! - `push --follow-group` to a group of one: a device added with `group add` afterwards
//!   gets the file too (the multicast is over by then: unicast catch-up).
//! - `push --follow-group` to an empty group is accepted (and multicasts nothing to nobody);
//!   a device that enrols into the group and one added to it later both complete it.
//! - `push --when-online 2 --max-wait 60` with one of two devices up: `task show` and
//!   `status` say "1 of 2" and nothing is multicast; the second device comes up, the
//!   multicast starts with both joined, and both complete.
//!
//! Every copy is checked byte for byte against the source.

// The lab harness of the daemon's tests, one file shared by both packages.
#[path = "../../daemon/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{now, status_of, wait_for, AgentSpec, Gateway, Rng};
use fleetcast_daemon::admin::Request;
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

/// A gateway (multicast on) on host 0 and `n` enrolled, online agents `n1..` (group
/// `fleet`) on hosts 1..=n.
fn gateway_and_agents<'lab>(
    lab: &'lab Lab,
    dir: &std::path::Path,
    n: usize,
) -> (
    Gateway<'lab>,
    Vec<AgentSpec>,
    Vec<fleetcast_lab::LabChild<'lab>>,
) {
    let gw_addr = lab.host(0).addr().to_string();
    let gw = Gateway::start(lab.host(0), dir, &["--mcast-addr", &gw_addr]);
    let (specs, agents) = gw.enrol_agents(lab, dir, n);
    (gw, specs, agents)
}

/// `fleetcast --json push SRC --group GROUP EXTRA...` as an operator runs it; the task id.
fn push_cli(gw: &Gateway<'_>, src: &std::path::Path, group: &str, extra: &[&str]) -> u64 {
    let src = src.display().to_string();
    let mut args = vec!["--json", "push", &src, "--group", group];
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

/// A seeded random file of `size` bytes at `dir/name`; its contents.
fn source(dir: &std::path::Path, name: &str, size: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size];
    Rng::from_env(seed).fill(&mut data);
    std::fs::write(dir.join(name), &data).expect("write source");
    data
}

/// Asserts that `spec`'s agent holds a copy of `name` identical to `data`.
fn assert_copy(spec: &AgentSpec, name: &str, data: &[u8]) {
    let got = std::fs::read(spec.state.join("downloads").join(name))
        .unwrap_or_else(|e| panic!("no received {name}: {e}\n{}", spec.output()));
    assert!(got == data, "{name}: received file differs from the source");
}

/// `fleetcast push FILE ARGS...` as a person runs it (following the task), its output read
/// as it comes.
struct FollowedPush {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl FollowedPush {
    fn start(gw: &Gateway<'_>, src: &std::path::Path, args: &[&str]) -> FollowedPush {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
            .arg("--data-dir")
            .arg(&gw.data)
            .arg("push")
            .arg(src)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run fleetcast push");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let (out, sink) = (child.stdout.take().expect("stdout"), lines.clone());
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        FollowedPush {
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The first line printed so far that contains `what`.
    fn printed(&self, what: &str) -> Option<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(what))
            .cloned()
    }

    fn wait_printed(&self, what: &str, gw: &Gateway<'_>) -> String {
        wait_for(
            &format!("the push to print {what:?}"),
            WAIT,
            || self.printed(what),
            || format!("{}\n{}", self.output(), gw.diag()),
        )
    }

    /// The task id the push printed (`task: N`).
    fn task(&self, gw: &Gateway<'_>) -> u64 {
        let line = self.wait_printed("task: ", gw);
        line.trim()
            .strip_prefix("task: ")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no task id in {line:?}"))
    }

    /// Waits for the push to end successfully, having printed `last`.
    fn wait_success(mut self, last: &str) {
        let lines = self.lines.clone();
        let status = wait_for(
            "the push to end",
            WAIT,
            || self.child.try_wait().expect("wait fleetcast push"),
            || lines.lock().unwrap().join("\n"),
        );
        if let Some(r) = self.reader.take() {
            r.join().expect("output reader");
        }
        assert!(status.success(), "{}", self.output());
        assert!(self.printed(last).is_some(), "{}", self.output());
    }
}

impl Drop for FollowedPush {
    fn drop(&mut self) {
        // A failed test leaves no follower behind (the one this test started).
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Event messages that contain `text`.
fn events_with(gw: &Gateway<'_>, text: &str) -> Vec<String> {
    gw.events()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.contains(text))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_device_added_to_the_group_after_a_following_push_completes_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let (gw, specs, _agents) = gateway_and_agents(&lab, dir, 2);
    let data = source(dir, "solo.bin", 2 << 20, 0x5eed_0f01);
    cli(&gw, &["group", "add", "solo", "n1"]);

    let task = push_cli(&gw, &dir.join("solo.bin"), "solo", &["--follow-group"]);
    wait_completed(&gw, &specs, task, &["n1"]);
    let rows = gw.task_rows(task);
    assert_eq!(rows.len(), 1, "only n1 was in the group: {rows:#?}");

    // n2 joins the group after the multicast: it becomes a target and is served at once.
    cli(&gw, &["group", "add", "solo", "n2"]);
    wait_completed(&gw, &specs, task, &["n1", "n2"]);
    assert_copy(&specs[0], "solo.bin", &data);
    assert_copy(&specs[1], "solo.bin", &data);
    let shown = cli(&gw, &["task", "show", &task.to_string()]);
    assert!(shown.contains("following group solo"), "{shown}");
    assert_eq!(shown.matches("status=completed").count(), 2, "{shown}");
    assert_eq!(
        events_with(
            &gw,
            &format!("task {task}: n2 joined by following group solo")
        )
        .len(),
        1,
        "{:#?}",
        gw.events()
    );
}

#[test]
fn a_following_push_to_an_empty_group_reaches_devices_as_they_enrol_into_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let (gw, mut specs, _agents) = gateway_and_agents(&lab, dir, 1);
    let data = source(dir, "new.bin", 2 << 20, 0x5eed_0f02);

    // Without --follow-group the empty group is refused; with it the task exists, targetless.
    let src = dir.join("new.bin").display().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .arg("--data-dir")
        .arg(&gw.data)
        .args(["push", &src, "--group", "new"])
        .output()
        .expect("run fleetcast");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no members"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let push = FollowedPush::start(
        &gw,
        &dir.join("new.bin"),
        &["--group", "new", "--follow-group"],
    );
    let task = push.task(&gw);
    push.wait_printed("no targets yet: devices joining group new get it", &gw);
    assert!(gw.task_rows(task).is_empty(), "{:#?}", gw.task_rows(task));

    // A device enrols into `new` (its token names the group) and completes the task.
    let d = gw.admin(&Request::DeviceAdd {
        name: "n2".into(),
        groups: vec!["new".into()],
    });
    let token = d["token"].as_str().expect("token").to_string();
    specs.push(AgentSpec::new(&gw, dir, "n2", Some(token)));
    let _n2 = specs[1].spawn(lab.host(2));
    wait_completed(&gw, &specs, task, &["n2"]);
    assert_copy(&specs[1], "new.bin", &data);
    // Nothing was multicast to the empty group: n2 was caught up by unicast from a
    // distribution made for it.
    assert!(
        gw.stderr().contains("distribution re-created for catch-up"),
        "{}",
        gw.diag()
    );
    // The operator's push followed it to the end: every target so far has its copy.
    push.wait_success(&format!(
        "task {task}: 1 of 1 receivers have a verified copy"
    ));

    // An enrolled device added to the group later completes it too.
    cli(&gw, &["group", "add", "new", "n1"]);
    wait_completed(&gw, &specs, task, &["n1", "n2"]);
    assert_copy(&specs[0], "new.bin", &data);
    for n in ["n1", "n2"] {
        assert_eq!(
            events_with(
                &gw,
                &format!("task {task}: {n} joined by following group new")
            )
            .len(),
            1,
            "{:#?}",
            gw.events()
        );
    }
}

#[test]
fn when_online_waits_for_the_devices_then_multicasts_to_them_together() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let (gw, specs, agents) = gateway_and_agents(&lab, dir, 2);
    let mut agents: Vec<_> = agents.into_iter().map(Some).collect();
    let mut n2 = agents[1].take().expect("n2");
    n2.kill().expect("kill n2");
    drop(n2);
    wait_for(
        "n2 to be offline",
        WAIT,
        || gw.device("n2").filter(|r| r["online"] == false),
        || gw.diag(),
    );
    let data = source(dir, "rack.bin", 2 << 20, 0x5eed_0f03);
    let fired = |gw: &Gateway<'_>| gw.stderr().matches("trigger fired").count();

    // The push as a person runs it: it follows the task, saying what it waits for.
    let asked = now();
    let push = FollowedPush::start(
        &gw,
        &dir.join("rack.bin"),
        &["--group", "fleet", "--when-online", "2", "--max-wait", "60"],
    );
    let task = push.task(&gw);
    push.wait_printed("waiting: 1 of 2 devices of fleet online", &gw);
    let waiting = |gw: &Gateway<'_>| {
        gw.try_admin(&Request::TaskShow { task: Some(task) })
            .ok()
            .and_then(|d| d["waiting"].as_str().map(str::to_string))
    };
    assert_eq!(
        waiting(&gw).as_deref(),
        Some("1 of 2 devices of fleet online"),
        "{}",
        gw.task_report(&specs, task)
    );
    // Long enough for a multicast to have started and reached n1 if the gate were open.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fired(&gw), 0, "{}", gw.task_report(&specs, task));
    let rows = gw.task_rows(task);
    assert_eq!(status_of(&rows, "n1"), "pending", "{rows:#?}");
    // 2 MiB in blocks that fill the lab's MTU 1500 (1,444 bytes), none received yet.
    assert_eq!(
        rows[0]["blocks"],
        format!("0/{}", (2u64 << 20).div_ceil(1444)),
        "{rows:#?}"
    );
    let shown = cli(&gw, &["task", "show", &task.to_string()]);
    assert!(
        shown.contains("waiting: 1 of 2 devices of fleet online"),
        "{shown}"
    );
    assert!(
        shown.contains("when 2 devices of group fleet are online or 60 s passed"),
        "{shown}"
    );
    let status = cli(&gw, &["status"]);
    assert!(
        status.contains("waiting=1 of 2 devices of fleet online"),
        "{status}"
    );

    // The second device comes up: both joined, the multicast starts, well before 60 s.
    agents[1] = Some(specs[1].spawn(lab.host(2)));
    wait_completed(&gw, &specs, task, &["n1", "n2"]);
    assert!(asked.elapsed() < Duration::from_secs(60));
    let line = gw
        .stderr()
        .lines()
        .find(|l| l.contains("trigger fired"))
        .map(str::to_string)
        .expect("trigger line");
    assert!(line.contains("ready=2"), "{line}");
    assert_eq!(waiting(&gw), None);
    assert_copy(&specs[0], "rack.bin", &data);
    assert_copy(&specs[1], "rack.bin", &data);
    // The following push ends with both copies verified (exit 0).
    push.wait_success(&format!(
        "task {task}: 2 of 2 receivers have a verified copy"
    ));
}
