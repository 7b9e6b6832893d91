//! The distribution proof at fleet size: a real `fleetcastd` on lab host 0 pushes a 256 MiB
//! generated file (`FLEETCAST_PROOF_MIB` overrides the size) to sixteen agents on hosts
//! 1..=16, each dropping a share of the datagrams it receives on the multicast port
//! (nftables), at 0%, 1% and 5%:
//!
//! - 0%: one receiver is offline during the multicast and completes afterwards by unicast
//!   catch-up (no second multicast); one is killed mid-transfer and restarted, and resumes
//!   from its persisted record (its log names how many blocks it kept, and it needed fewer
//!   than the whole file again).
//! - 1%: every receiver completes.
//! - 5%, with one receiver at 30%: that one is demoted to its own unicast catch-up sender
//!   (the group's repairs stop serving it), and every receiver completes.
//!
//! In every scenario every copy is byte-identical to the source and `fleetcast task show`
//! lists sixteen `completed` rows. The scenarios run one at a time (the lab is CPU-bound).
//! Timings are printed, not asserted (see docs/performance.md).

// The lab harness of the daemon's tests, one file shared by both packages.
#[path = "../../daemon/tests/common/mod.rs"]
mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::{now, read_log, status_of, wait_for, AgentSpec, Gateway, Rng};
use fleetcast_daemon::admin::Request;
use fleetcast_lab::{Lab, LabChild, LabConfig};
use serde_json::Value;

#[test]
fn agent_role() {
    common::agent_role();
}

/// One scenario at a time: each takes the whole machine.
static SERIAL: Mutex<()> = Mutex::new(());

const RECEIVERS: usize = 16;
const MCAST_PORT: u16 = 7301;
const BLOCK: u32 = 1400;
/// The sending rate ceiling, under what this lab carries to sixteen namespaces.
const RATE_MBPS: &str = "150";
const WAIT: Duration = Duration::from_secs(300);

fn size() -> usize {
    std::env::var("FLEETCAST_PROOF_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(256)
        << 20
}

fn row<'a>(rows: &'a [Value], name: &str) -> Option<&'a Value> {
    rows.iter().find(|r| r["device"] == name)
}

/// `(received, total)` blocks of `name`'s row.
fn blocks_of(rows: &[Value], name: &str) -> (u64, u64) {
    let s = row(rows, name)
        .and_then(|r| r["blocks"].as_str())
        .unwrap_or("0/0");
    let (a, b) = s.split_once('/').unwrap_or(("0", "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

fn name(i: usize) -> String {
    format!("r{i}")
}

struct Scenario<'lab> {
    gw: Gateway<'lab>,
    specs: Vec<AgentSpec>,
    agents: Vec<Option<LabChild<'lab>>>,
    data: Vec<u8>,
    src: std::path::PathBuf,
}

impl<'lab> Scenario<'lab> {
    /// A gateway on host 0 and `RECEIVERS` enrolled agents in group `fleet`, all online,
    /// `loss[i]` percent dropped on host `i + 1`; the source file generated from `seed`.
    fn start(lab: &'lab Lab, dir: &std::path::Path, loss: &[f64], seed: u64) -> Self {
        let gw_addr = lab.host(0).addr().to_string();
        let gw = Gateway::start(
            lab.host(0),
            dir,
            &["--mcast-addr", &gw_addr, "--mcast-linger", "300"],
        );
        let mut specs = Vec::new();
        let mut agents = Vec::new();
        for i in 1..=RECEIVERS {
            let d = gw.admin(&Request::DeviceAdd {
                name: name(i),
                groups: vec!["fleet".into()],
            });
            let token = d["token"].as_str().expect("token").to_string();
            let spec = AgentSpec::new(&gw, dir, &name(i), Some(token));
            agents.push(Some(spec.spawn(lab.host(i))));
            specs.push(spec);
        }
        for (i, s) in specs.iter().enumerate() {
            gw.wait_online(&name(i + 1), WAIT, || s.output());
        }
        for (i, &p) in loss.iter().enumerate() {
            if p > 0.0 {
                lab.host(i + 1)
                    .loss_in(&[MCAST_PORT], p)
                    .expect("nft loss rule");
            }
        }
        let mut rng = Rng::from_env(seed);
        let mut data = vec![0u8; size()];
        rng.fill(&mut data);
        let src = dir.join("image.bin");
        std::fs::write(&src, &data).expect("write source");
        Scenario {
            gw,
            specs,
            agents,
            data,
            src,
        }
    }

    /// `fleetcast --json push` as an operator runs it; returns the task id.
    fn push(&self) -> u64 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
            .arg("--data-dir")
            .arg(&self.gw.data)
            .args(["--json", "push"])
            .arg(&self.src)
            .args(["--group", "fleet", "--block-size", &BLOCK.to_string()])
            .args(["--rate", RATE_MBPS, "--no-follow"])
            .output()
            .expect("run fleetcast");
        assert!(
            out.status.success(),
            "push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).expect("push --json answer");
        r["data"]["task"].as_u64().expect("task id")
    }

    fn diag(&self, task: u64) -> String {
        let mut s = format!("task show: {:#?}\n", self.gw.task_rows(task));
        for a in &self.specs {
            let out = a.output();
            // The tail of each agent's log is enough to see where it stands.
            let tail: Vec<&str> = out.lines().rev().take(6).collect();
            s.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            s.push('\n');
        }
        s.push_str(&self.gw.diag());
        s
    }

    /// Waits until every device in `which` (1-based) is `completed`.
    fn wait_completed(&self, task: u64, which: impl Iterator<Item = usize> + Clone) {
        wait_for(
            "receivers to complete",
            WAIT,
            || {
                let rows = self.gw.task_rows(task);
                which
                    .clone()
                    .all(|i| status_of(&rows, &name(i)) == "completed")
                    .then_some(())
            },
            || self.diag(task),
        );
    }

    /// Every copy equals the source; the task table (as `fleetcast task show` prints it)
    /// says `completed` for all sixteen.
    fn check_copies_and_table(&self, task: u64) {
        for (i, s) in self.specs.iter().enumerate() {
            let got = std::fs::read(s.state.join("downloads").join("image.bin"))
                .unwrap_or_else(|e| panic!("{}: no received file: {e}", name(i + 1)));
            assert!(got == self.data, "{}: copy differs", name(i + 1));
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
            .arg("--data-dir")
            .arg(&self.gw.data)
            .args(["task", "show", &task.to_string()])
            .output()
            .expect("run fleetcast");
        let table = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            table.matches("status=completed").count(),
            RECEIVERS,
            "fleetcast task show:\n{table}"
        );
    }
}

fn lab() -> Lab {
    Lab::new(LabConfig::hosts(RECEIVERS + 1)).expect("lab (see docs/lab.md)")
}

fn mbit(bytes: usize, t: Duration) -> f64 {
    bytes as f64 * 8.0 / t.as_secs_f64() / 1e6
}

#[test]
fn lossless_with_a_late_receiver_and_a_restarted_one() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().expect("tempdir");
    let lab = lab();
    let mut sc = Scenario::start(&lab, tmp.path(), &[0.0; RECEIVERS], 0x5eed_0016);
    let (late, restarted) = (RECEIVERS, RECEIVERS - 1);

    // The late receiver is offline during the multicast.
    let mut off = sc.agents[late - 1].take().expect("late agent");
    off.kill().expect("kill");
    drop(off);
    wait_for(
        "the late receiver to be offline",
        WAIT,
        || sc.gw.device(&name(late)).filter(|r| r["online"] == false),
        || sc.gw.diag(),
    );

    let started = now();
    let task = sc.push();
    // Kill one receiver once it has a quarter of the file, then start it again.
    let quarter = wait_for(
        "the restarted receiver to hold a quarter of the file, recorded",
        WAIT,
        || {
            let (got, total) = blocks_of(&sc.gw.task_rows(task), &name(restarted));
            // Its progress record exists (written once a second, after the data is durable).
            let rec = sc.specs[restarted - 1]
                .state
                .join("downloads")
                .join(format!(".image.bin.task-{task}.rec"));
            (total > 0 && got * 4 >= total && rec.exists()).then_some(got)
        },
        || sc.diag(task),
    );
    let agent = sc.agents[restarted - 1].as_mut().expect("agent");
    agent.kill().expect("kill mid-transfer");
    sc.agents[restarted - 1] = Some(sc.specs[restarted - 1].spawn(lab.host(restarted)));
    sc.wait_completed(task, 1..RECEIVERS);
    let online_done = started.elapsed();

    let log = read_log(&sc.specs[restarted - 1].log);
    let kept: u64 = log
        .lines()
        .find_map(|l| {
            l.split_once(&format!("task {task}: resuming with "))
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("{} did not resume from its record:\n{log}", name(restarted)));
    let blocks = sc.size_blocks();
    assert!(
        kept > 0 && kept < blocks,
        "resumed with {kept} of {blocks} blocks"
    );

    // The late receiver comes back after the multicast: unicast catch-up only.
    let back = now();
    sc.agents[late - 1] = Some(sc.specs[late - 1].spawn(lab.host(late)));
    sc.wait_completed(task, late..=late);
    let late_took = back.elapsed();
    sc.check_copies_and_table(task);
    let first_passes = sc.gw.stderr().matches("first pass done").count();
    assert_eq!(first_passes, 1, "one multicast only\n{}", sc.gw.diag());
    assert!(
        sc.gw.stderr().contains("catch-up finished"),
        "{}",
        sc.gw.diag()
    );
    eprintln!(
        "0% loss, {} MiB, {RECEIVERS} receivers: 15 online complete in {online_done:?} ({:.0} Mbit/s); \
         restarted one resumed with {kept}/{blocks} blocks (killed at >= {quarter}); \
         late one caught up by unicast in {late_took:?}",
        size() >> 20,
        mbit(size(), online_done)
    );
}

#[test]
fn one_percent_loss_every_receiver_completes() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().expect("tempdir");
    let lab = lab();
    let sc = Scenario::start(&lab, tmp.path(), &[1.0; RECEIVERS], 0x5eed_0116);
    let started = now();
    let task = sc.push();
    sc.wait_completed(task, 1..=RECEIVERS);
    let took = started.elapsed();
    sc.check_copies_and_table(task);
    eprintln!(
        "1% loss, {} MiB, {RECEIVERS} receivers: all complete in {took:?} ({:.0} Mbit/s)",
        size() >> 20,
        mbit(size(), took)
    );
}

#[test]
fn five_percent_loss_and_a_thirty_percent_receiver_is_demoted() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().expect("tempdir");
    let lab = lab();
    let mut loss = [5.0; RECEIVERS];
    loss[RECEIVERS - 1] = 30.0;
    let sc = Scenario::start(&lab, tmp.path(), &loss, 0x5eed_0516);
    let lossy = sc
        .gw
        .device(&name(RECEIVERS))
        .and_then(|r| r["id"].as_u64())
        .expect("lossy device id");
    let started = now();
    let task = sc.push();
    sc.wait_completed(task, 1..RECEIVERS);
    let others = started.elapsed();
    let demoted = format!("device={lossy}");
    assert!(
        sc.gw.stderr().lines().any(|l| {
            l.contains("demoted to unicast catch-up") && l.split_whitespace().any(|w| w == demoted)
        }),
        "{}",
        sc.gw.diag()
    );
    sc.wait_completed(task, RECEIVERS..=RECEIVERS);
    let lossy_took = started.elapsed();
    sc.check_copies_and_table(task);
    // Its copy was finished by its own catch-up sender, not by the group's repairs.
    let caught_up = wait_for(
        "the demoted device's catch-up to finish",
        WAIT,
        || {
            sc.gw
                .stderr()
                .lines()
                .find(|l| {
                    l.contains("catch-up finished") && l.split_whitespace().any(|w| w == demoted)
                })
                .map(str::to_string)
        },
        || sc.gw.diag(),
    );
    assert!(caught_up.contains("verified=true"), "{caught_up}");
    eprintln!(
        "5% loss, {} MiB, {} receivers: complete in {others:?} ({:.0} Mbit/s); \
         the 30% receiver, demoted, completes by unicast catch-up at {lossy_took:?}: {caught_up}",
        size() >> 20,
        RECEIVERS - 1,
        mbit(size(), others)
    );
}

impl Scenario<'_> {
    fn size_blocks(&self) -> u64 {
        self.data.len().div_ceil(BLOCK as usize) as u64
    }
}
