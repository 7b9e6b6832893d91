//! The PostgreSQL engine runs the store's operations as LMDB does: one scenario (enrolment,
//! groups, queues with results, duplicates, refusals, timeouts, reboots, cancel, tasks,
//! events and both prunes) is driven through `Engine` on each, and everything it observes,
//! answers and refusals alike, must be the same. Then what only a shared database adds: a
//! second connection sees a batch only once it commits, and a failed batch leaves nothing.

use fleetcast_lab::Postgres;
use fleetcast_store::pg::PgStore;
use fleetcast_store::prelude::*;
use fleetcast_store::{
    BlockSet, Command, DeviceId, EnrolmentToken, Event, EventKind, OnFailure, Received, Store, Task,
};
use fleetcast_wire::{self as wire, Step};

fn cmd(steps: Vec<Step<'static>>, max_attempts: u32) -> Command {
    Command {
        target: None,
        steps,
        timeout_ms: 1000,
        max_attempts,
        on_failure: OnFailure::Stop,
    }
}

fn exec(max_attempts: u32) -> Command {
    cmd(
        vec![Step::Exec {
            argv: vec!["true".into()],
        }],
        max_attempts,
    )
}

fn received(seq: u64, attempt: u32, exit_code: i32) -> Received {
    Received {
        result: wire::CommandResult {
            command_id: 1,
            seq,
            attempt,
            exit_code,
            steps: vec![wire::StepResult {
                status: if exit_code == 0 {
                    wire::StepStatus::Ok
                } else {
                    wire::StepStatus::Failed
                },
                exit_code,
                duration_ms: 1,
            }],
            output: b"done".into(),
            report: None,
        },
        at_ms: 2,
    }
}

fn report(boot: u8) -> wire::ConfigReport<'static> {
    wire::ConfigReport {
        boot_id: [boot; 16],
        os: "Debian 13".into(),
        hostname: "dev".into(),
        ..Default::default()
    }
}

fn task(size: u64) -> Task {
    Task {
        path: "/srv/img.bin".into(),
        size,
        block_size: 1024,
        sha256: [5; 32],
        group: Some("web".into()),
        trigger: "publish".into(),
        created_ms: 7,
        then: Vec::new(),
        plan: Default::default(),
        follow: Default::default(),
        image: None,
    }
}

/// Appends what `v` says to the transcript (and prints it with `SAY=1`, to compare by eye).
macro_rules! say {
    ($t:expr, $($v:tt)*) => {{ let s = format!($($v)*); if std::env::var_os("SAY").is_some() { eprintln!("{s}"); } $t.push(s) }};
}

/// The scenario, on any engine; returns everything it observed.
fn scenario(e: &mut dyn Engine) -> Vec<String> {
    let mut t = Vec::new();
    // Enrolment, devices, groups.
    let mut b = e.batch().unwrap();
    let token = EnrolmentToken {
        name: "web-1".into(),
        expires_ms: 1000,
        groups: vec!["web".into()],
    };
    b.add_enrolment_token([1; 32], token.clone()).unwrap();
    b.add_enrolment_token(
        [2; 32],
        EnrolmentToken {
            expires_ms: 5,
            ..token
        },
    )
    .unwrap();
    let d1 = b.enrol([1; 32], [9; 32], 10).unwrap();
    say!(
        t,
        "enrol again: {:?}",
        b.enrol([1; 32], [9; 32], 10).map_err(|e| e.to_string())
    );
    say!(
        t,
        "expired: {:?}",
        b.enrol([2; 32], [9; 32], 10).map_err(|e| e.to_string())
    );
    let d2 = b.add_device("web-2", [8; 32], 11).unwrap();
    say!(
        t,
        "name taken: {:?}",
        b.add_device("web-2", [8; 32], 11)
            .map_err(|e| e.to_string())
    );
    b.join_group("web", d2).unwrap();
    b.join_group("db", d2).unwrap();
    b.leave_group("db", d2).unwrap();
    b.device_seen(d1, 20, None).unwrap();
    b.set_report(d1, report(1), 21).unwrap();
    say!(t, "batch len {}", b.len());
    let c = b.commit().unwrap();
    say!(t, "commit {} ops {}", c.commit_seq, c.operations);

    // Queues: enqueue, transmit, results, duplicates, refusals that leave the batch usable.
    let mut b = e.batch().unwrap();
    let s1 = b.enqueue(d1, exec(1)).unwrap();
    let s2 = b
        .enqueue(d1, cmd(vec![Step::Reboot, Step::Report], 1))
        .unwrap();
    let group = b.enqueue_group("web", exec(2)).unwrap();
    say!(t, "enqueued {s1} {s2} {group:?}");
    say!(
        t,
        "no group: {:?}",
        b.enqueue_group("none", exec(1)).map_err(|e| e.to_string())
    );
    say!(
        t,
        "out of order: {:?}",
        b.mark_transmitted(d1, s2, 30).map_err(|e| e.to_string())
    );
    let a = b.mark_transmitted(d1, s1, 30).unwrap();
    say!(
        t,
        "record {:?}",
        b.record_result(d1, s1, a, received(s1, a, 0))
    );
    say!(
        t,
        "again {:?}",
        b.record_result(d1, s1, a, received(s1, a, 0))
    );
    say!(
        t,
        "conflict {:?}",
        b.record_result(d1, s1, a, received(s1, a, 3))
            .map_err(|e| e.to_string())
    );
    let a = b.mark_transmitted(d1, s2, 31).unwrap();
    b.reboot_started(d1, s2, 10_000, &fleetcast_store::boot_hex(&[1; 16]))
        .unwrap();
    say!(
        t,
        "same boot: {:?}",
        b.reboot_completed(d1, s2, a, report(1), received(s2, a, 0), 40)
            .map_err(|e| e.to_string())
    );
    say!(
        t,
        "rebooted {:?}",
        b.reboot_completed(d1, s2, a, report(2), received(s2, a, 0), 41)
    );
    // d2: its group command times out twice (two attempts), then fails the queue.
    let s = group.iter().find(|(d, _)| *d == d2).unwrap().1;
    let a = b.mark_transmitted(d2, s, 50).unwrap();
    say!(
        t,
        "early timeout: {:?}",
        b.command_timed_out(d2, s, 60).map_err(|e| e.to_string())
    );
    say!(t, "timeout {:?}", b.command_timed_out(d2, s, 50 + 1001));
    say!(
        t,
        "redeliver {:?}",
        b.redeliver(d2, s, 1100).map_err(|e| e.to_string())
    );
    let a2 = b.mark_transmitted(d2, s, 1100).map_err(|e| e.to_string());
    say!(t, "attempts {a} {a2:?}");
    say!(
        t,
        "timeout {:?}",
        b.command_timed_out(d2, s, 1100 + 1001)
            .map_err(|e| e.to_string())
    );
    b.enqueue(d2, exec(1)).unwrap();
    say!(t, "skip {:?}", b.skip(d2).map_err(|e| e.to_string()));
    say!(t, "pause {:?}", b.pause(d2).map_err(|e| e.to_string()));
    say!(t, "resume {:?}", b.resume(d2).map_err(|e| e.to_string()));
    say!(t, "cancelled {:?}", b.cancel(d2));
    say!(t, "next {:?}", b.next_to_dispatch(d1).unwrap());
    let c = b.commit().unwrap();
    say!(t, "commit {} ops {}", c.commit_seq, c.operations);

    // Tasks and the task table.
    let mut b = e.batch().unwrap();
    let tk = b.create_task(task(10 * 1024 + 1), &[d1, d2]).unwrap();
    b.task_pass_done(tk).unwrap();
    let mut blocks = BlockSet::new();
    blocks.insert(0, 4);
    b.task_progress(tk, d1, blocks.clone()).unwrap();
    let mut past = blocks.clone();
    past.insert(6, 12);
    say!(
        t,
        "past: {:?}",
        b.task_progress(tk, d1, past).map_err(|e| e.to_string())
    );
    say!(
        t,
        "done {:?} {:?}",
        b.task_completed(tk, d1),
        b.task_completed(tk, d1)
    );
    b.task_failed(tk, d2, "disk full").unwrap();
    say!(t, "incomplete {:?}", b.incomplete_tasks(d2).unwrap());
    b.task_retry(tk, d2).unwrap();
    b.task_reported(tk, d2, blocks).unwrap();
    say!(t, "incomplete {:?}", b.incomplete_tasks(d2).unwrap());
    say!(t, "unfollow {:?}", b.task_unfollow(tk));
    // Events, and both prunes.
    // Times not in id order (clocks of different gateways): event 7 is older than event 4.
    for (k, time_ms) in [100, 101, 102, 103, 104, 105, 1, 200]
        .into_iter()
        .enumerate()
    {
        let ev = Event {
            time_ms,
            device: Some(d1),
            kind: EventKind::Operator,
            message: format!("event {k}"),
        };
        say!(t, "event id {:?}", b.append_event(ev));
    }
    say!(t, "pruned events {:?}", b.prune_events(103, 0, 10));
    say!(t, "pruned events {:?}", b.prune_events(0, 2, 10));
    say!(
        t,
        "pruned results {:?}",
        b.prune_results(DeviceId(0), 1, 10)
    );
    let c = b.commit().unwrap();
    say!(t, "commit {} ops {}", c.commit_seq, c.operations);
    // An empty batch commits nothing.
    let c = e.batch().unwrap().commit().unwrap();
    say!(t, "empty commit {} ops {}", c.commit_seq, c.operations);

    // Everything as a snapshot sees it.
    let s = e.snapshot().unwrap();
    for d in s.devices().unwrap() {
        say!(t, "device {d:?}");
    }
    say!(
        t,
        "by name {:?}",
        s.device_by_name("web-2").unwrap().map(|d| d.id)
    );
    say!(t, "queues {:?}", s.queues().unwrap());
    for d in [d1, d2] {
        say!(t, "commands {:?}", s.commands(d, 0, 10).unwrap());
        for seq in 0..6 {
            say!(t, "result {d:?} {seq} {:?}", s.result(d, seq).unwrap());
        }
    }
    say!(t, "groups {:?}", s.groups().unwrap());
    say!(t, "tasks {:?}", s.tasks().unwrap());
    say!(t, "statuses {:?}", s.task_statuses(tk).unwrap());
    say!(t, "events {:?}", s.events_from(0, 100).unwrap());
    say!(t, "last event {:?}", s.last_event_id().unwrap());
    say!(t, "commit seq {:?}", s.commit_seq().unwrap());
    t
}

fn pg_store(pg: &Postgres, db: &str) -> PgStore {
    pg.create_database(db).unwrap();
    PgStore::connect(&pg.url(db), None).unwrap().0
}

#[test]
fn postgres_runs_the_store_operations_as_lmdb_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut lmdb = Store::open(dir.path()).unwrap();
    let want = scenario(&mut lmdb);
    let pg = Postgres::start().expect("PostgreSQL (Debian package postgresql)");
    let got = scenario(&mut pg_store(&pg, "cell"));
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w, g, "line {i} of the transcript");
    }
    assert_eq!(want.len(), got.len());
    // The scenario did reach what it claims to check.
    let text = want.join("\n");
    for needle in [
        "Duplicate",
        "already has a different result",
        "is not the next one",
    ] {
        assert!(text.contains(needle), "{needle} not in\n{text}");
    }
}

#[test]
fn a_batch_is_seen_only_once_committed_and_a_failed_one_leaves_nothing() {
    let pg = Postgres::start().expect("PostgreSQL (Debian package postgresql)");
    let mut a = pg_store(&pg, "cell");
    let mut other = PgStore::connect(&pg.url("cell"), None).unwrap().0;
    let mut b = a.batch().unwrap();
    let d = b.add_device("dev", [1; 32], 0).unwrap();
    b.enqueue(d, exec(1)).unwrap();
    // Not committed: another gateway's connection sees nothing yet.
    assert!(other.snapshot().unwrap().devices().unwrap().is_empty());
    b.commit().unwrap();
    assert_eq!(other.snapshot().unwrap().devices().unwrap().len(), 1);
    // A batch dropped without commit rolls back.
    let mut b = a.batch().unwrap();
    b.enqueue(d, exec(1)).unwrap();
    drop(b);
    assert_eq!(
        other.snapshot().unwrap().commands(d, 0, 10).unwrap().len(),
        1
    );
    // A batch whose database goes away under it is poisoned and commits nothing; once the
    // server is back the same store connects again and finds what was committed before,
    // and nothing of the failed batch.
    let mut pg = pg;
    let mut b = other.batch().unwrap();
    b.enqueue(d, exec(1)).unwrap();
    pg.stop().unwrap();
    let e = b.enqueue(d, exec(1)).unwrap_err();
    assert!(e.to_string().starts_with("PostgreSQL"), "{e}");
    assert!(b.commit().is_err());
    assert!(other.batch().is_err(), "no server: no batch");
    pg.start_server().unwrap();
    let s = other.snapshot().unwrap();
    assert_eq!(s.commands(d, 0, 10).unwrap().len(), 1);
    drop(s);
    let mut b = other.batch().unwrap();
    b.enqueue(d, exec(1)).unwrap();
    assert_eq!(b.commit().unwrap().operations, 1);
    drop(a);
}
