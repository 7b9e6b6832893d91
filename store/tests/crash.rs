//! Crash test with real processes: a child performs random transitions in group-committed
//! batches and is killed with SIGKILL at random (seeded) moments; after each kill the parent
//! reopens the store and checks that nothing committed was lost, that no transition is
//! half-applied and that every queue's cursor is consistent with the results.
//!
//! The child re-executes this test binary (role selected by an environment variable) and,
//! when it starts and after each successful commit, appends `commit_seq enqueued results` to
//! an fsync'd side log: only what the store confirmed durable. The parent's checks:
//! - the store's `commit_seq` equals the last logged one, or is one more (killed between the
//!   commit and the log write);
//! - at the logged commit the store's totals equal the logged totals exactly (nothing lost,
//!   nothing extra); one commit later they are at least the logged ones;
//! - the queue invariants of the `queue` module hold for every device.

use std::io::Write;
use std::path::Path;
use std::process::Command as Proc;
use std::time::Duration;

use fleetcast_store::prelude::*;
use fleetcast_store::{
    boot_hex, BlockSet, Command, DeviceId, Event, EventKind, OnFailure, QueueStatus, Received,
    Snapshot, Store, Task, TaskId,
};
use fleetcast_wire::{self as wire, Step};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const ROLE: &str = "FLEETCAST_STORE_CRASH_CHILD";
const DEVICES: u64 = 16;
const ROUNDS: u64 = 40;

fn totals(s: &Snapshot<'_>) -> (u64, u64) {
    let mut enq = 0;
    let mut res = 0;
    for (d, q) in s.queues().unwrap() {
        enq += q.next_seq - 1;
        for (seq, _) in s.commands(d, 0, usize::MAX).unwrap() {
            res += u64::from(s.result(d, seq).unwrap().is_some());
        }
    }
    (enq, res)
}

fn result(ok: bool, now: u64) -> Received {
    Received {
        result: wire::CommandResult {
            command_id: 1,
            seq: 1,
            attempt: 1,
            exit_code: i32::from(!ok),
            steps: vec![wire::StepResult {
                status: if ok {
                    wire::StepStatus::Ok
                } else {
                    wire::StepStatus::Failed
                },
                exit_code: i32::from(!ok),
                duration_ms: 1,
            }],
            output: format!("at {now}").into_bytes().into(),
            report: None,
        },
        at_ms: now + 1,
    }
}

fn child(dir: &Path, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut store = Store::open(dir).unwrap();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("side.log"))
        .unwrap();
    if store.snapshot().unwrap().devices().unwrap().is_empty() {
        let mut b = store.batch().unwrap();
        let mut ids = Vec::new();
        for i in 0..DEVICES {
            ids.push(b.add_device(&format!("d{i}"), [i as u8; 32], 0).unwrap());
        }
        let task = Task {
            path: "/f".into(),
            size: 1 << 20,
            block_size: 1024,
            sha256: [0; 32],
            group: None,
            trigger: "crash test".into(),
            created_ms: 0,
            then: Vec::new(),
            plan: Default::default(),
            follow: Default::default(),
            image: None,
        };
        b.create_task(task, &ids).unwrap();
        b.commit().unwrap();
    }
    let (mut enq, mut res) = {
        let snap = store.snapshot().unwrap();
        let (enq, res) = totals(&snap);
        // The starting point is durable too: logging it first keeps the log at most one
        // commit behind even when the previous child was killed after a commit and before
        // its log line, and this one is killed the same way.
        writeln!(log, "{} {enq} {res}", snap.commit_seq().unwrap()).unwrap();
        log.sync_data().unwrap();
        (enq, res)
    };
    let mut now = seed * 1_000_000;
    for _ in 0..100_000 {
        let mut b = store.batch().unwrap();
        for _ in 0..rng.gen_range(1..64) {
            now += 1;
            let d = DeviceId(rng.gen_range(1..=DEVICES));
            let q = b.queue(d).unwrap().unwrap();
            match q.status {
                QueueStatus::Idle | QueueStatus::Done => {}
                QueueStatus::Running => {
                    let (seq, _) = b.next_to_dispatch(d).unwrap().unwrap();
                    b.mark_transmitted(d, seq, now).unwrap();
                }
                QueueStatus::AwaitingResult => {
                    let seq = q.cursor.unwrap();
                    let cmd = b.command(d, seq).unwrap().unwrap();
                    if cmd.has_reboot() {
                        b.reboot_started(d, seq, now + 10_000, &boot_hex(&[0xbe; 16]))
                            .unwrap();
                    } else {
                        let ok = rng.gen_bool(0.9);
                        // A retried command overwrites its earlier (failed) result.
                        res += u64::from(b.result(d, seq).unwrap().is_none());
                        b.record_result(d, seq, q.attempt, result(ok, now)).unwrap();
                    }
                }
                QueueStatus::Rebooting => {
                    let seq = q.cursor.unwrap();
                    let mut boot_id = [0u8; 16];
                    boot_id[..8].copy_from_slice(&now.to_be_bytes());
                    let report = wire::ConfigReport {
                        boot_id,
                        os: "".into(),
                        kernel: "".into(),
                        hostname: "".into(),
                        agent_version: "".into(),
                        addresses: Vec::new(),
                        software: Vec::new(),
                        ..Default::default()
                    };
                    res += u64::from(b.result(d, seq).unwrap().is_none());
                    b.reboot_completed(d, seq, q.attempt, report, result(true, now), now)
                        .unwrap();
                }
                QueueStatus::Failed => {
                    if rng.gen_bool(0.5) {
                        b.retry(d).unwrap();
                    } else {
                        let seq = q.cursor.unwrap();
                        res += u64::from(b.result(d, seq).unwrap().is_none());
                        b.skip(d).unwrap();
                    }
                }
                QueueStatus::Paused => b.resume(d).unwrap(),
            }
            if rng.gen_bool(0.4) {
                let steps = if rng.gen_bool(0.2) {
                    vec![Step::Reboot]
                } else if rng.gen_bool(0.02) {
                    // Large commands make the store cross the map-growth threshold (32 MiB
                    // of the initial 64 MiB) during the rounds, so kills also hit growth.
                    vec![Step::Write {
                        path: "/big".into(),
                        mode: 0o644,
                        contents: vec![0x5a; 256 * 1024].into(),
                    }]
                } else {
                    vec![Step::Exec {
                        argv: vec!["x".into()],
                    }]
                };
                let cmd = Command {
                    target: None,
                    steps,
                    timeout_ms: 1000,
                    max_attempts: 1,
                    on_failure: OnFailure::Stop,
                };
                b.enqueue(d, cmd).unwrap();
                enq += 1;
            }
            if rng.gen_bool(0.1) {
                let start = rng.gen_range(0..1000);
                let mut blocks = BlockSet::new();
                blocks.insert(start, start + 24);
                // Completed entries refuse progress; that refusal must not poison the batch.
                let _ = b.task_progress(TaskId(1), d, blocks);
            }
            if rng.gen_bool(0.05) {
                let ev = Event {
                    time_ms: now,
                    device: Some(d),
                    kind: EventKind::Other,
                    message: "tick".into(),
                };
                b.append_event(ev).unwrap();
            }
        }
        let c = b.commit().unwrap();
        writeln!(log, "{} {} {}", c.commit_seq, enq, res).unwrap();
        log.sync_data().unwrap();
    }
}

fn check(dir: &Path) {
    let store = Store::open(dir).unwrap();
    let s = store.snapshot().unwrap();
    let log = std::fs::read_to_string(dir.join("side.log")).unwrap_or_default();
    // Only complete lines were confirmed (a kill may cut the last write short).
    let last = log
        .split_inclusive('\n')
        .rfind(|l| l.ends_with('\n'))
        .map(|l| {
            let v: Vec<u64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
            (v[0], v[1], v[2])
        });
    let seq = s.commit_seq().unwrap();
    let (enq, res) = totals(&s);
    if let Some((lseq, lenq, lres)) = last {
        assert!(
            seq == lseq || seq == lseq + 1,
            "store at commit {seq}, log at {lseq}"
        );
        if seq == lseq {
            assert_eq!(
                (enq, res),
                (lenq, lres),
                "state at the logged commit differs"
            );
        } else {
            assert!(enq >= lenq && res >= lres, "committed changes lost");
        }
    }
    for (d, q) in s.queues().unwrap() {
        let cmds = s.commands(d, 0, usize::MAX).unwrap();
        assert!(cmds.iter().all(|(x, _)| *x < q.next_seq));
        let first = cmds
            .iter()
            .map(|(x, _)| *x)
            .find(|&x| x > q.completed_through);
        for (x, _) in &cmds {
            if *x <= q.completed_through {
                assert!(
                    s.result(d, *x).unwrap().is_some(),
                    "{d:?} finished {x} without result"
                );
            }
        }
        match q.status {
            QueueStatus::Running => assert!(first.is_some()),
            QueueStatus::AwaitingResult | QueueStatus::Rebooting => {
                assert_eq!(q.cursor, first, "{d:?} cursor");
                assert!(q.attempts >= 1);
            }
            QueueStatus::Idle | QueueStatus::Done => assert!(first.is_none()),
            QueueStatus::Failed => assert_eq!(q.cursor, first),
            QueueStatus::Paused => {}
        }
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    if let Ok(dir) = std::env::var(ROLE) {
        let seed = std::env::var("FLEETCAST_STORE_CRASH_SEED")
            .unwrap()
            .parse()
            .unwrap();
        child(Path::new(&dir), seed);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(0x5eed_c0de);
    let exe = std::env::current_exe().unwrap();
    let mut round_at_random = |round: u64| {
        let mut c = Proc::new(&exe)
            .args([
                "--exact",
                "sigkill_at_random_moments_loses_nothing",
                "--nocapture",
            ])
            .env(ROLE, dir.path())
            .env("FLEETCAST_STORE_CRASH_SEED", round.to_string())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..400)));
        if let Some(status) = c.try_wait().unwrap() {
            panic!("child exited on its own in round {round}: {status}");
        }
        c.kill().unwrap(); // SIGKILL on Unix
        c.wait().unwrap();
        check(dir.path());
    };
    for round in 1..=ROUNDS {
        round_at_random(round);
    }
    // The map must also grow while crashes happen. How much a child writes before its kill
    // depends on the machine's load and disk, so rounds go on (each one checked) until it
    // has grown, within a bound.
    let grown =
        || Store::open(dir.path()).unwrap().map_size().unwrap() > fleetcast_store::INITIAL_MAP_SIZE;
    let mut round = ROUNDS;
    while !grown() && round < ROUNDS * 10 {
        round += 1;
        round_at_random(round);
    }
    eprintln!("map grew by round {round}");
    let store = Store::open(dir.path()).unwrap();
    assert!(store.snapshot().unwrap().commit_seq().unwrap() > ROUNDS);
    assert!(store.map_size().unwrap() > fleetcast_store::INITIAL_MAP_SIZE);
}
