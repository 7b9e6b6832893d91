//! Store-level tests of every transition through real LMDB transactions.

use fleetcast_wire::{self as wire, Step};
use proptest::prelude::*;

use super::*;

fn cmd(steps: Vec<Step<'static>>, max_attempts: u32, on_failure: OnFailure) -> Command {
    Command {
        target: None,
        steps,
        timeout_ms: 1000,
        max_attempts,
        on_failure,
    }
}
fn exec() -> Command {
    cmd(
        vec![Step::Exec {
            argv: vec!["true".into()],
        }],
        1,
        OnFailure::Stop,
    )
}
fn reboot_cmd() -> Command {
    cmd(vec![Step::Reboot, Step::Report], 1, OnFailure::Stop)
}
fn ok() -> Received {
    Received {
        result: wire::CommandResult {
            command_id: 1,
            seq: 1,
            attempt: 1,
            exit_code: 0,
            steps: vec![wire::StepResult {
                status: wire::StepStatus::Ok,
                exit_code: 0,
                duration_ms: 1,
            }],
            output: b"done".into(),
            report: None,
        },
        at_ms: 2,
    }
}
fn failed() -> Received {
    let mut r = ok();
    r.result.steps[0].status = wire::StepStatus::Failed;
    r.result.steps[0].exit_code = 1;
    r.result.exit_code = 1;
    r
}
/// A test boot id from a readable name.
fn boot_id(name: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (o, c) in b.iter_mut().zip(name.bytes()) {
        *o = c;
    }
    b
}
/// The boot as queue records keep it.
fn boot(name: &str) -> String {
    boot_hex(&boot_id(name))
}
fn report(boot: &str) -> wire::ConfigReport<'static> {
    wire::ConfigReport {
        boot_id: boot_id(boot),
        os: "Debian 13".into(),
        kernel: "6.12".into(),
        hostname: "dev".into(),
        agent_version: "0.1.0".into(),
        addresses: vec!["10.0.0.2".into()],
        software: vec![wire::Package {
            name: "openssl".into(),
            version: "3.5".into(),
        }],
        ..Default::default()
    }
}
fn setup() -> (tempfile::TempDir, Store, DeviceId) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path()).unwrap();
    let mut b = s.batch().unwrap();
    let d = b.add_device("dev-1", [7; 32], 100).unwrap();
    b.commit().unwrap();
    (dir, s, d)
}
fn illegal(e: Error) -> Illegal {
    match e {
        Error::IllegalTransition { kind, .. } => kind,
        other => panic!("expected illegal transition, got {other:?}"),
    }
}

#[test]
fn round_trip_survives_reopen() {
    let (dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    assert_eq!(b.enqueue(d, exec()).unwrap(), 1);
    assert_eq!(b.enqueue(d, exec()).unwrap(), 2);
    assert_eq!(b.next_to_dispatch(d).unwrap().unwrap().0, 1);
    b.mark_transmitted(d, 1, 10).unwrap();
    assert_eq!(
        b.record_result(d, 1, 1, ok()).unwrap(),
        Recorded::Stored(QueueStatus::Running)
    );
    let c = b.commit().unwrap();
    assert_eq!(c.operations, 4);
    drop(s);
    let s = Store::open(dir.path()).unwrap();
    let snap = s.snapshot().unwrap();
    let q = snap.queue(d).unwrap().unwrap();
    assert_eq!(
        (q.status, q.completed_through, q.cursor),
        (QueueStatus::Running, 1, Some(1))
    );
    assert_eq!(
        snap.result(d, 1).unwrap(),
        Some(StoredResult::Received(ok()))
    );
    assert_eq!(snap.next_to_dispatch(d).unwrap().unwrap().0, 2);
    assert_eq!(snap.commit_seq().unwrap(), c.commit_seq);
    assert_eq!(snap.commands(d, 0, 10).unwrap().len(), 2);
}

#[test]
fn illegal_transitions_are_typed_and_do_not_poison() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    b.enqueue(d, reboot_cmd()).unwrap();
    assert_eq!(
        illegal(b.record_result(d, 1, 1, ok()).unwrap_err()),
        Illegal::NotTransmitted { seq: 1 }
    );
    assert!(matches!(
        illegal(b.mark_transmitted(d, 2, 0).unwrap_err()),
        Illegal::NotNextCommand { .. }
    ));
    b.mark_transmitted(d, 1, 0).unwrap();
    b.reboot_started(d, 1, 5_000, &boot("boot-a")).unwrap();
    assert!(matches!(
        illegal(b.mark_transmitted(d, 1, 1).unwrap_err()),
        Illegal::WrongStatus {
            status: QueueStatus::Rebooting,
            ..
        }
    ));
    assert!(matches!(
        illegal(b.record_result(d, 1, 1, ok()).unwrap_err()),
        Illegal::WrongStatus {
            status: QueueStatus::Rebooting,
            ..
        }
    ));
    assert!(matches!(
        b.enqueue(DeviceId(99), exec()),
        Err(Error::NotFound(Missing::Device(_)))
    ));
    b.commit().unwrap();
    assert_eq!(
        s.snapshot().unwrap().queue(d).unwrap().unwrap().status,
        QueueStatus::Rebooting
    );
}

#[test]
fn reboot_cycle() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    b.set_report(d, report("boot-a"), 1).unwrap();
    b.enqueue(d, reboot_cmd()).unwrap();
    b.enqueue(d, exec()).unwrap();
    b.mark_transmitted(d, 1, 10).unwrap();
    b.reboot_started(d, 1, 10_000, &boot("boot-a")).unwrap();
    b.commit().unwrap();
    let mut b = s.batch().unwrap();
    assert_eq!(
        illegal(
            b.reboot_completed(d, 1, 1, report("boot-a"), ok(), 50)
                .unwrap_err()
        ),
        Illegal::BootIdUnchanged
    );
    assert_eq!(
        illegal(b.reboot_deadline_missed(d, 9_999).unwrap_err()),
        Illegal::DeadlineNotReached {
            deadline_ms: 10_000
        }
    );
    assert_eq!(
        b.reboot_completed(d, 1, 1, report("boot-b"), ok(), 60)
            .unwrap(),
        QueueStatus::Running
    );
    assert!(
        illegal(
            b.reboot_completed(d, 1, 1, report("boot-c"), ok(), 61)
                .unwrap_err()
        ) != Illegal::BootIdUnchanged
    );
    b.commit().unwrap();
    let snap = s.snapshot().unwrap();
    let dev = snap.device(d).unwrap().unwrap();
    assert_eq!(dev.report.unwrap().boot_id, boot_id("boot-b"));
    assert_eq!(dev.last_seen_ms, Some(60));
    assert_eq!(snap.next_to_dispatch(d).unwrap().unwrap().0, 2);
    drop(snap);
    // Missing the deadline fails the queue; retry dispatches the reboot command again.
    let mut b = s.batch().unwrap();
    b.enqueue(d, reboot_cmd()).unwrap();
    b.mark_transmitted(d, 2, 100).unwrap();
    b.record_result(d, 2, 1, ok()).unwrap();
    b.mark_transmitted(d, 3, 100).unwrap();
    b.reboot_started(d, 3, 200, &boot("boot-a")).unwrap();
    b.reboot_deadline_missed(d, 200).unwrap();
    let q = b.queue(d).unwrap().unwrap();
    assert_eq!(
        (q.status, q.failure),
        (QueueStatus::Failed, Some(FailReason::RebootDeadlineMissed))
    );
    b.retry(d).unwrap();
    assert_eq!(b.next_to_dispatch(d).unwrap().unwrap().0, 3);
    b.commit().unwrap();
}

#[test]
fn duplicate_and_conflicting_results() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    b.enqueue(d, exec()).unwrap();
    b.mark_transmitted(d, 1, 0).unwrap();
    assert_eq!(
        b.record_result(d, 1, 1, ok()).unwrap(),
        Recorded::Stored(QueueStatus::Done)
    );
    b.commit().unwrap();
    let mut b = s.batch().unwrap();
    assert_eq!(b.record_result(d, 1, 1, ok()).unwrap(), Recorded::Duplicate);
    assert_eq!(
        illegal(b.record_result(d, 1, 1, failed()).unwrap_err()),
        Illegal::ConflictingResult { seq: 1 }
    );
    assert_eq!(
        illegal(b.record_result(d, 2, 1, ok()).unwrap_err()),
        Illegal::NotTransmitted { seq: 2 }
    );
}

#[test]
fn output_excerpt_is_bounded_to_tail() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    b.enqueue(d, exec()).unwrap();
    b.mark_transmitted(d, 1, 0).unwrap();
    let mut r = ok();
    r.result.output = (0..10_000u32).map(|i| i as u8).collect::<Vec<u8>>().into();
    let tail = r.result.output[10_000 - OUTPUT_EXCERPT_MAX..].to_vec();
    b.record_result(d, 1, 1, r.clone()).unwrap();
    let Some(StoredResult::Received(stored)) = b.result(d, 1).unwrap() else {
        panic!("a received result")
    };
    assert_eq!(*stored.result.output, *tail);
    // The same result again, received later, is the same result.
    r.at_ms += 1_000;
    assert_eq!(b.record_result(d, 1, 1, r).unwrap(), Recorded::Duplicate);
}

#[test]
fn timeouts_retries_and_policies() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    b.enqueue(d, cmd(vec![Step::Report], 2, OnFailure::Continue))
        .unwrap();
    b.enqueue(d, cmd(vec![Step::Report], 1, OnFailure::Stop))
        .unwrap();
    b.enqueue(d, exec()).unwrap();
    b.mark_transmitted(d, 1, 0).unwrap();
    assert!(matches!(
        illegal(b.command_timed_out(d, 1, 999).unwrap_err()),
        Illegal::DeadlineNotReached { .. }
    ));
    assert_eq!(
        b.command_timed_out(d, 1, 1000).unwrap(),
        QueueStatus::Running
    );
    b.mark_transmitted(d, 1, 2000).unwrap();
    assert_eq!(b.queue(d).unwrap().unwrap().attempts, 2);
    assert_eq!(
        illegal(b.mark_transmitted(d, 1, 2001).unwrap_err()),
        Illegal::AttemptsExhausted { seq: 1 }
    );
    // Continue: exhausted attempts store a synthetic failed result and move on.
    assert_eq!(
        b.command_timed_out(d, 1, 3000).unwrap(),
        QueueStatus::Running
    );
    assert!(!b.result(d, 1).unwrap().unwrap().succeeded());
    b.mark_transmitted(d, 2, 3000).unwrap();
    assert_eq!(
        b.record_result(d, 2, 1, failed()).unwrap(),
        Recorded::Stored(QueueStatus::Failed)
    );
    assert!(matches!(
        illegal(b.mark_transmitted(d, 3, 3001).unwrap_err()),
        Illegal::WrongStatus { .. }
    ));
    assert!(b.next_to_dispatch(d).unwrap().is_none());
    b.skip(d).unwrap();
    assert_eq!(b.next_to_dispatch(d).unwrap().unwrap().0, 3);
    b.commit().unwrap();
}

#[test]
fn pause_resume_cancel() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    for _ in 0..3 {
        b.enqueue(d, exec()).unwrap();
    }
    b.mark_transmitted(d, 1, 0).unwrap();
    b.pause(d).unwrap();
    assert_eq!(
        b.record_result(d, 1, 1, ok()).unwrap(),
        Recorded::Stored(QueueStatus::Paused)
    );
    assert!(b.next_to_dispatch(d).unwrap().is_none());
    assert!(b.mark_transmitted(d, 2, 1).is_err());
    b.resume(d).unwrap();
    b.mark_transmitted(d, 2, 1).unwrap();
    // Cancel drops the command in flight too: the queue is free at once, and the command's
    // late result is refused.
    assert_eq!(b.cancel(d).unwrap(), 2);
    assert!(b.command(d, 2).unwrap().is_none());
    assert!(b.command(d, 3).unwrap().is_none());
    let q = b.queue(d).unwrap().unwrap();
    assert_eq!(
        (q.status, q.cursor, q.attempts),
        (QueueStatus::Done, None, 0)
    );
    assert_eq!(
        illegal(b.record_result(d, 2, 1, ok()).unwrap_err()),
        Illegal::NotTransmitted { seq: 2 }
    );
    assert_eq!(
        b.enqueue(d, exec()).unwrap(),
        4,
        "sequence numbers are never reused"
    );
    b.commit().unwrap();
}

#[test]
fn devices_enrolment_groups() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path()).unwrap();
    let mut b = s.batch().unwrap();
    let token = EnrolmentToken {
        name: "edge-1".into(),
        expires_ms: 1000,
        groups: vec!["edge".into()],
    };
    b.add_enrolment_token([1; 32], token.clone()).unwrap();
    b.add_enrolment_token([2; 32], token).unwrap();
    let d = b.enrol([1; 32], [9; 32], 500).unwrap();
    assert!(matches!(
        b.enrol([1; 32], [9; 32], 500),
        Err(Error::NotFound(Missing::EnrolmentToken))
    ));
    assert!(matches!(
        illegal(b.enrol([2; 32], [9; 32], 500).unwrap_err()),
        Illegal::NameTaken
    ));
    let d2 = b.add_device("edge-2", [3; 32], 500).unwrap();
    b.join_group("edge", d2).unwrap();
    b.device_seen(d2, 600, Some(Transport::HttpConnect))
        .unwrap();
    let seqs = b.enqueue_group("edge", exec()).unwrap();
    assert_eq!(seqs, vec![(d, 1), (d2, 1)]);
    b.revoke(d).unwrap();
    assert_eq!(illegal(b.enqueue(d, exec()).unwrap_err()), Illegal::Revoked);
    assert_eq!(b.enqueue_group("edge", exec()).unwrap(), vec![(d2, 2)]);
    b.leave_group("edge", d2).unwrap();
    assert_eq!(b.group_members("edge").unwrap(), vec![d]);
    b.commit().unwrap();
    let snap = s.snapshot().unwrap();
    let dev = snap.device_by_name("edge-2").unwrap().unwrap();
    assert_eq!(
        (dev.id, dev.transport, dev.last_seen_ms),
        (d2, Some(Transport::HttpConnect), Some(600))
    );
    assert_eq!(snap.devices().unwrap().len(), 2);
    assert_eq!(snap.queues().unwrap().len(), 2);
}

#[test]
fn a_task_plan_is_kept_and_its_pass_marked_done_once() {
    let (dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    let task = Task {
        path: "/srv/img.bin".into(),
        size: 4096,
        block_size: 1024,
        sha256: [5; 32],
        group: Some("rack7".into()),
        trigger: "publish".into(),
        created_ms: 7,
        then: Vec::new(),
        plan: TaskPlan {
            at_ms: Some(9_000),
            rate: 1_000_000,
            ..Default::default()
        },
        follow: TaskFollow {
            group: true,
            when_online: None,
        },
        image: None,
    };
    let t = b.create_task(task.clone(), &[]).unwrap();
    b.add_task_target(t, d).unwrap();
    b.commit().unwrap();
    assert!(s
        .snapshot()
        .unwrap()
        .task(t)
        .unwrap()
        .unwrap()
        .plan
        .multicast_pending());
    let mut b = s.batch().unwrap();
    b.task_pass_done(t).unwrap();
    b.task_pass_done(t).unwrap();
    assert!(matches!(
        b.task_pass_done(TaskId(t.0 + 1)).unwrap_err(),
        Error::NotFound(_)
    ));
    b.commit().unwrap();
    drop(s);
    // After a reopen: the same task, its pass over, its target still pending.
    let s = Store::open(dir.path()).unwrap();
    let snap = s.snapshot().unwrap();
    let back = snap.task(t).unwrap().unwrap();
    assert_eq!(back.plan.at_ms, Some(9_000));
    assert!(back.plan.pass_done && !back.plan.multicast_pending());
    assert_eq!(back.follow, task.follow);
    assert_eq!(
        snap.task_status(t, d).unwrap(),
        Some(TaskDeviceStatus::Pending)
    );
}

#[test]
fn task_table() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    let d2 = b.add_device("dev-2", [0; 32], 0).unwrap();
    let task = img_task(10 * 1024 + 1);
    assert_eq!(task.blocks(), 11);
    let t = b.create_task(task, &[d, d2]).unwrap();
    assert_eq!(b.incomplete_tasks(d).unwrap(), vec![t]);
    let mut blocks = BlockSet::new();
    blocks.insert(0, 4);
    b.task_progress(t, d, blocks.clone()).unwrap();
    blocks.insert(6, 12);
    assert!(matches!(
        illegal(b.task_progress(t, d, blocks).unwrap_err()),
        Illegal::BlockOutOfRange { .. }
    ));
    let mut more = BlockSet::new();
    more.insert(4, 11);
    b.task_progress(t, d, more).unwrap();
    match b.task_status(t, d).unwrap().unwrap() {
        TaskDeviceStatus::InProgress(b) => assert_eq!(b.ranges(), &[(0, 11)]),
        other => panic!("{other:?}"),
    }
    assert!(b.task_completed(t, d).unwrap(), "recorded");
    assert!(!b.task_completed(t, d).unwrap(), "a repeat records nothing");
    assert!(b.incomplete_tasks(d).unwrap().is_empty());
    assert!(matches!(
        illegal(b.task_progress(t, d, BlockSet::new()).unwrap_err()),
        Illegal::TaskStatus { .. }
    ));
    b.task_failed(t, d2, "digest mismatch").unwrap();
    assert!(b.incomplete_tasks(d2).unwrap().is_empty());
    assert!(matches!(
        illegal(b.task_completed(t, d2).unwrap_err()),
        Illegal::TaskStatus { .. }
    ));
    b.task_retry(t, d2).unwrap();
    // The finisher's report replaces what the row held: fewer blocks than before, then
    // nothing at all (a device that lost its records is `pending` again).
    let mut lots = BlockSet::new();
    lots.insert(0, 9);
    b.task_progress(t, d2, lots).unwrap();
    let mut few = BlockSet::new();
    few.insert(2, 5);
    b.task_reported(t, d2, few).unwrap();
    match b.task_status(t, d2).unwrap().unwrap() {
        TaskDeviceStatus::InProgress(b) => assert_eq!(b.ranges(), &[(2, 5)]),
        other => panic!("{other:?}"),
    }
    let mut past = BlockSet::new();
    past.insert(0, 12);
    assert!(matches!(
        illegal(b.task_reported(t, d2, past).unwrap_err()),
        Illegal::BlockOutOfRange { .. }
    ));
    b.task_reported(t, d2, BlockSet::new()).unwrap();
    assert_eq!(
        b.task_status(t, d2).unwrap(),
        Some(TaskDeviceStatus::Pending)
    );
    // A completed row takes no report.
    assert!(matches!(
        illegal(b.task_reported(t, d, BlockSet::new()).unwrap_err()),
        Illegal::TaskStatus { .. }
    ));
    assert_eq!(b.incomplete_tasks(d2).unwrap(), vec![t]);
    b.commit().unwrap();
    let st = s.snapshot().unwrap().task_statuses(t).unwrap();
    assert_eq!(
        st,
        vec![
            (d, TaskDeviceStatus::Completed),
            (d2, TaskDeviceStatus::Pending)
        ]
    );
}

/// `task cancel` and `task retry`: which states each leaves, what the device-task index (the
/// announce list) says after each, and that a cancelled row takes no late word from the device.
#[test]
fn task_cancel_and_retry() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    let d2 = b.add_device("dev-2", [0; 32], 0).unwrap();
    let d3 = b.add_device("dev-3", [0; 32], 0).unwrap();
    let task = img_task(4096);
    let t = b.create_task(task, &[d, d2, d3]).unwrap();
    let mut blocks = BlockSet::new();
    blocks.insert(0, 2);
    b.task_progress(t, d2, blocks).unwrap();
    // Pending and in progress can be cancelled; both leave the announce list.
    b.task_cancel(t, d).unwrap();
    b.task_cancel(t, d2).unwrap();
    assert!(b.incomplete_tasks(d).unwrap().is_empty());
    assert!(b.incomplete_tasks(d2).unwrap().is_empty());
    assert_eq!(
        b.task_status(t, d).unwrap(),
        Some(TaskDeviceStatus::Cancelled)
    );
    // A cancelled row refuses a second cancel and the device's late progress, completion
    // or failure.
    for (e, op) in [
        (b.task_cancel(t, d).unwrap_err(), "task_cancel"),
        (
            b.task_progress(t, d, BlockSet::new()).unwrap_err(),
            "task_progress",
        ),
        (b.task_completed(t, d).unwrap_err(), "task_completed"),
        (b.task_failed(t, d, "late").unwrap_err(), "task_failed"),
    ] {
        assert_eq!(
            illegal(e),
            Illegal::TaskStatus {
                op,
                current: "cancelled"
            }
        );
    }
    // Completed and failed rows cannot be cancelled; completed and pending cannot be retried.
    assert!(b.task_completed(t, d3).unwrap());
    assert!(matches!(
        illegal(b.task_cancel(t, d3).unwrap_err()),
        Illegal::TaskStatus {
            op: "task_cancel",
            current: "completed"
        }
    ));
    assert!(matches!(
        illegal(b.task_retry(t, d3).unwrap_err()),
        Illegal::TaskStatus {
            op: "task_retry",
            current: "completed"
        }
    ));
    // Retry: cancelled (and failed, see `task_table`) back to pending, on the announce list
    // again, from no blocks.
    b.task_retry(t, d2).unwrap();
    assert_eq!(b.incomplete_tasks(d2).unwrap(), vec![t]);
    assert!(matches!(
        illegal(b.task_retry(t, d2).unwrap_err()),
        Illegal::TaskStatus {
            op: "task_retry",
            current: "pending"
        }
    ));
    b.commit().unwrap();
    let st = s.snapshot().unwrap().task_statuses(t).unwrap();
    assert_eq!(
        st,
        vec![
            (d, TaskDeviceStatus::Cancelled),
            (d2, TaskDeviceStatus::Pending),
            (d3, TaskDeviceStatus::Completed)
        ]
    );
}

#[test]
fn event_log_tail() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    for i in 0..5 {
        let ev = Event {
            time_ms: i,
            device: Some(d),
            kind: EventKind::CommandSent,
            message: format!("m{i}"),
        };
        assert_eq!(b.append_event(ev).unwrap(), i + 1);
    }
    b.commit().unwrap();
    let snap = s.snapshot().unwrap();
    assert_eq!(snap.last_event_id().unwrap(), 5);
    let tail = snap.events_from(3, 10).unwrap();
    assert_eq!(
        tail.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!(tail[0].1.message, "m2");
}

#[test]
fn schema_too_new_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        use lmdb::Transaction;
        let mut t = s.env.begin_rw_txn().unwrap();
        t.put(
            s.dbs.meta,
            &env::META_SCHEMA,
            &(SCHEMA_VERSION + 1).to_le_bytes(),
            lmdb::WriteFlags::empty(),
        )
        .unwrap();
        t.commit().unwrap();
    }
    match Store::open(dir.path()) {
        Err(Error::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("{other:?}"),
    }
}

/// A schema-2 store (before `cancelled` existed) opens as schema 3 with its task rows read as
/// they were written: the bytes below are what schema 2 wrote for each status.
#[test]
fn a_schema2_task_table_opens_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (t, devs) = {
        let mut s = Store::open(dir.path()).unwrap();
        let mut b = s.batch().unwrap();
        let devs: Vec<DeviceId> = (0..4)
            .map(|i| b.add_device(&format!("d{i}"), [0; 32], 0).unwrap())
            .collect();
        let task = img_task(4096);
        let t = b.create_task(task, &devs).unwrap();
        b.commit().unwrap();
        use lmdb::Transaction;
        let old: [&[u8]; 4] = [
            &[2, 0],                                     // pending
            &[2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0], // in progress: blocks 0..3
            &[2, 2],                                     // completed
            &[2, 3, 3, 0, 0, 0, b'b', b'a', b'd'],       // failed: "bad"
        ];
        let mut txn = s.env.begin_rw_txn().unwrap();
        for (dev, bytes) in devs.iter().zip(old) {
            txn.put(
                s.dbs.task_status,
                &env::key2(t.0, dev.0),
                &bytes,
                lmdb::WriteFlags::empty(),
            )
            .unwrap();
        }
        txn.put(
            s.dbs.meta,
            &env::META_SCHEMA,
            &2u32.to_le_bytes(),
            lmdb::WriteFlags::empty(),
        )
        .unwrap();
        txn.commit().unwrap();
        (t, devs)
    };
    let s = Store::open(dir.path()).unwrap();
    {
        use lmdb::Transaction;
        let txn = s.env.begin_ro_txn().unwrap();
        assert_eq!(
            txn.get(s.dbs.meta, &env::META_SCHEMA).unwrap(),
            SCHEMA_VERSION.to_le_bytes()
        );
    }
    assert_eq!(SCHEMA_VERSION, 5);
    let mut blocks = BlockSet::new();
    blocks.insert(0, 3);
    assert_eq!(
        s.snapshot().unwrap().task_statuses(t).unwrap(),
        vec![
            (devs[0], TaskDeviceStatus::Pending),
            (devs[1], TaskDeviceStatus::InProgress(blocks)),
            (devs[2], TaskDeviceStatus::Completed),
            (devs[3], TaskDeviceStatus::Failed("bad".into())),
        ]
    );
    // What schema 3 adds is one more tag, beside the old ones.
    use codec::Record;
    let mut buf = Vec::new();
    TaskDeviceStatus::Cancelled.encode(&mut buf).unwrap();
    // (Written in today's record format, 3, whose task status layout is format 2's.)
    assert_eq!(buf, [3, 4]);
}

#[test]
fn map_grows_during_a_batch() {
    let (_dir, mut s, d) = setup();
    let before = s.map_size().unwrap();
    let big = cmd(
        vec![Step::Write {
            path: "/x".into(),
            mode: 0o644,
            contents: vec![0xab; 64 * 1024].into(),
        }],
        1,
        OnFailure::Stop,
    );
    // One batch much larger than the initial map: forces MDB_MAP_FULL and a replay.
    let mut b = s.batch().unwrap();
    let n = (2 * before / (64 * 1024)) as u64;
    for i in 1..=n {
        assert_eq!(b.enqueue(d, big.clone()).unwrap(), i);
    }
    b.commit().unwrap();
    assert!(s.map_size().unwrap() > before);
    let snap = s.snapshot().unwrap();
    assert_eq!(snap.queue(d).unwrap().unwrap().next_seq, n + 1);
    assert_eq!(snap.command(d, n).unwrap().unwrap(), big);
}

#[test]
fn corrupt_records_are_errors_not_panics() {
    use codec::Record;
    let mut buf = Vec::new();
    let c = cmd(
        vec![
            Step::Exec {
                argv: vec!["a".into()],
            },
            Step::Verify {
                path: "/x".into(),
                sha256: [1; 32],
            },
        ],
        3,
        OnFailure::Continue,
    );
    c.encode(&mut buf).unwrap();
    assert_eq!(Command::decode(&buf).unwrap(), c);
    for cut in 0..buf.len() {
        assert!(Command::decode(&buf[..cut]).is_err());
    }
    let mut extra = buf.clone();
    extra.push(0);
    assert!(matches!(
        Command::decode(&extra),
        Err(Error::Corrupt { .. })
    ));
}

proptest! {
    #[test]
    fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        use codec::Record;
        let _ = Command::decode(&bytes);
        let _ = QueueState::decode(&bytes);
        let _ = StoredResult::decode(&bytes);
        let _ = Device::decode(&bytes);
        let _ = TaskDeviceStatus::decode(&bytes);
        let _ = Event::decode(&bytes);
        let _ = Task::decode(&bytes);
    }

    #[test]
    fn block_set_matches_model(ops in proptest::collection::vec((0u32..200, 0u32..20), 0..40)) {
        let mut set = BlockSet::new();
        let mut model = std::collections::BTreeSet::new();
        for (s, len) in ops {
            set.insert(s, s + len);
            model.extend(s..s + len);
        }
        prop_assert_eq!(set.count(), model.len() as u64);
        for b in 0..230 {
            prop_assert_eq!(set.contains(b), model.contains(&b));
        }
        for w in set.ranges().windows(2) {
            prop_assert!(w[0].1 < w[1].0);
        }
        let missing: u64 = set.missing(230).iter().map(|&(s, e)| u64::from(e - s)).sum();
        prop_assert_eq!(missing + set.count(), 230);
    }

    /// Random transitions against a simple model: every refusal leaves the state untouched and
    /// the queue invariants hold after every step.
    #[test]
    fn random_transitions_keep_invariants(ops in proptest::collection::vec((0u8..10, 0u64..6), 1..60)) {
        let (_dir, mut s, d) = setup();
        let mut b = s.batch().unwrap();
        let mut now = 1000;
        for (op, arg) in ops {
            now += 500;
            let before = b.queue(d).unwrap().unwrap();
            let r = match op {
                0 => b.enqueue(d, if arg % 2 == 0 { exec() } else { reboot_cmd() }).map(drop),
                1 => b.mark_transmitted(d, arg, now).map(drop),
                2 => b.record_result(d, arg, attempt_of(&before, arg), if arg % 3 == 0 { failed() } else { ok() }).map(drop),
                3 => b.command_timed_out(d, arg, now).map(drop),
                4 => b.reboot_started(d, arg, now + 1000, &boot("boot-a")).map(drop),
                5 => b.reboot_completed(d, arg, attempt_of(&before, arg), report(&format!("boot{now}")), ok(), now).map(drop),
                6 => b.reboot_deadline_missed(d, now).map(drop),
                7 => if arg % 2 == 0 { b.pause(d) } else { b.resume(d) },
                8 => if arg % 2 == 0 { b.retry(d) } else { b.skip(d) },
                _ => b.cancel(d).map(drop),
            };
            if let Err(e) = r {
                prop_assert!(e.is_refusal(), "{:?}", e);
                prop_assert_eq!(&before, &b.queue(d).unwrap().unwrap());
            }
            check_queue(&b, d)?;
        }
        b.commit().unwrap();
    }
}

/// The attempt a random result names: mostly the current one, sometimes the one before.
fn attempt_of(q: &QueueState, arg: u64) -> u32 {
    if arg == 5 {
        q.attempt.saturating_sub(1)
    } else {
        q.attempt
    }
}

fn check_queue(b: &Batch<'_>, d: DeviceId) -> std::result::Result<(), TestCaseError> {
    let q = b.queue(d).unwrap().unwrap();
    let cmds = b.commands(d, 0, usize::MAX).unwrap();
    let first_pending = cmds
        .iter()
        .map(|(s, _)| *s)
        .find(|&s| s > q.completed_through);
    prop_assert!(cmds.iter().all(|(s, _)| *s < q.next_seq));
    for (s, _) in &cmds {
        if *s <= q.completed_through {
            prop_assert!(
                b.result(d, *s).unwrap().is_some(),
                "finished {s} without result"
            );
        }
    }
    match q.status {
        QueueStatus::Running => prop_assert!(first_pending.is_some()),
        QueueStatus::AwaitingResult | QueueStatus::Rebooting => {
            prop_assert_eq!(q.cursor, first_pending);
            prop_assert!(q.attempts >= 1);
        }
        QueueStatus::Idle | QueueStatus::Done => prop_assert!(first_pending.is_none()),
        QueueStatus::Failed => {
            prop_assert!(q.failure.is_some());
            prop_assert_eq!(q.cursor, first_pending);
        }
        QueueStatus::Paused => {}
    }
    Ok(())
}

/// Exercises every scan path (each opens and frees an LMDB cursor) across many pages and
/// interleaved with writes in the same transaction, so a cursor freed while an iterator still
/// used it would read freed memory. Under valgrind that is an "Invalid read":
/// `valgrind --error-exitcode=1 <target>/debug/deps/fleetcast_store-<hash> --test-threads=1 scans`
#[test]
fn scans_never_outlive_cursors() {
    let (_dir, mut s, d) = setup();
    for round in 0..3u64 {
        let mut b = s.batch().unwrap();
        let d2 = b.add_device(&format!("scan-{round}"), [1; 32], 0).unwrap();
        b.join_group("all", d2).unwrap();
        for i in 0..300 {
            b.enqueue(d, exec()).unwrap();
            // Reads that scan, then a write that may split the page they just visited.
            assert_eq!(b.commands(d, 0, usize::MAX).unwrap().len() as u64, i + 1);
            assert!(b.next_to_dispatch(d).unwrap().is_some());
            let ev = Event {
                time_ms: i,
                device: None,
                kind: EventKind::Other,
                message: "x".repeat(50),
            };
            b.append_event(ev).unwrap();
        }
        let t = b
            .create_task(
                Task {
                    path: "/f".into(),
                    size: 1,
                    block_size: 1,
                    sha256: [0; 32],
                    group: None,
                    trigger: String::new(),
                    created_ms: 0,
                    then: Vec::new(),
                    plan: Default::default(),
                    follow: Default::default(),
                    image: None,
                },
                &[d, d2],
            )
            .unwrap();
        assert_eq!(b.task_statuses(t).unwrap().len(), 2);
        assert!(!b.incomplete_tasks(d).unwrap().is_empty());
        assert_eq!(b.group_members("all").unwrap().len() as u64, round + 1);
        b.cancel(d).unwrap();
        b.commit().unwrap();
        let snap = s.snapshot().unwrap();
        assert_eq!(snap.devices().unwrap().len() as u64, round + 2);
        assert_eq!(snap.queues().unwrap().len() as u64, round + 2);
        assert_eq!(
            snap.events_from(1, usize::MAX).unwrap().len() as u64,
            (round + 1) * 300
        );
        assert_eq!(snap.last_event_id().unwrap(), (round + 1) * 300);
        assert_eq!(snap.tasks().unwrap().len() as u64, round + 1);
    }
}

#[test]
fn redelivery_to_a_device_that_never_got_the_command_is_not_an_attempt() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    // Not in flight: nothing to redeliver.
    assert!(matches!(
        b.redeliver(d, 1, 5),
        Err(Error::IllegalTransition { .. })
    ));
    b.enqueue(d, exec()).unwrap(); // max_attempts 1
    assert_eq!(b.mark_transmitted(d, 1, 10).unwrap(), 1);
    assert_eq!(b.redeliver(d, 1, 20).unwrap(), 1);
    assert_eq!(b.redeliver(d, 1, 30).unwrap(), 1);
    let q = b.queue(d).unwrap().unwrap();
    assert_eq!(
        (q.attempts, q.attempt, q.transmitted_ms, q.cursor),
        (1, 1, 30, Some(1))
    );
    // A counted retransmission would exceed max_attempts = 1.
    assert!(matches!(
        b.mark_transmitted(d, 1, 40),
        Err(Error::IllegalTransition {
            kind: Illegal::AttemptsExhausted { seq: 1 },
            ..
        })
    ));
    assert!(matches!(
        b.redeliver(d, 2, 50),
        Err(Error::IllegalTransition {
            kind: Illegal::NotNextCommand { .. },
            ..
        })
    ));
    assert_eq!(
        b.record_result(d, 1, 1, ok()).unwrap(),
        Recorded::Stored(QueueStatus::Done)
    );
    b.commit().unwrap();
}

#[test]
fn backup_is_a_consistent_store_taken_while_open() {
    let (dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    b.enqueue(d, exec()).unwrap();
    b.commit().unwrap();
    // A read view stays open during the copy, as the gateway's would.
    let snap = s.snapshot().unwrap();
    let dest = dir.path().join("backup");
    s.backup(&dest).unwrap();
    drop(snap);
    // Later writes to the original do not reach the copy.
    let mut b = s.batch().unwrap();
    b.enqueue(d, exec()).unwrap();
    b.commit().unwrap();
    let copy = Store::open(&dest).unwrap();
    let snap = copy.snapshot().unwrap();
    assert_eq!(snap.device_by_name("dev-1").unwrap().unwrap().id, d);
    assert_eq!(snap.commands(d, 0, 10).unwrap().len(), 1);
    // A second backup into the same directory is refused, not merged.
    let e = s.backup(&dest).unwrap_err();
    assert!(e.to_string().contains("already holds a store"), "{e}");
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_store_and_its_backup_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data/store");
    let s = Store::open(&path).unwrap();
    assert_eq!(mode(&path), 0o700);
    assert_eq!(mode(&path.join("data.mdb")), 0o600);
    assert_eq!(mode(&path.join("lock.mdb")), 0o600);
    let dest = dir.path().join("backup");
    s.backup(&dest).unwrap();
    assert_eq!(mode(&dest), 0o700);
    assert_eq!(mode(&dest.join("data.mdb")), 0o600);
    drop(s);
    // A store left world-readable (an older build, a careless restore) is tightened on open.
    let chmod = |p: &std::path::Path, m| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    chmod(&path, 0o755);
    chmod(&path.join("data.mdb"), 0o644);
    chmod(&path.join("lock.mdb"), 0o666);
    let _s = Store::open(&path).unwrap();
    assert_eq!(mode(&path), 0o700);
    assert_eq!(mode(&path.join("data.mdb")), 0o600);
    assert_eq!(mode(&path.join("lock.mdb")), 0o600);
}

#[test]
fn refusals_read_as_plain_text() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    let e = b.retry(d).unwrap_err().to_string();
    assert_eq!(e, "retry is not allowed while the queue is idle");
    let e = b.enqueue(d, cmd(vec![], 1, OnFailure::Stop)).unwrap_err();
    assert_eq!(e.to_string(), "command has no steps");
    let cases = [
        Error::NotFound(Missing::DeviceName("web1".into())),
        Error::NotFound(Missing::Command { device: d, seq: 5 }),
        Error::illegal(
            d,
            Illegal::NotNextCommand {
                expected: Some(4),
                found: 5,
            },
        ),
        Error::illegal(
            d,
            Illegal::TaskStatus {
                op: "record_progress",
                current: "completed",
            },
        ),
    ];
    for e in cases {
        let text = e.to_string();
        for debug in ["Some(", "None", "DeviceId", "{", "\""] {
            assert!(!text.contains(debug), "{debug:?} in {text:?}");
        }
    }
}

/// A batch that changed nothing (no operation, or only refused ones) is not committed: no
/// write transaction reaches the disk (LMDB's transaction id and our commit count stay put).
#[test]
fn an_empty_batch_is_not_committed() {
    let (_dir, mut s, d) = setup();
    let txnid = |s: &Store| s.env.info().unwrap().last_txnid();
    let before = (txnid(&s), s.snapshot().unwrap().commit_seq().unwrap());
    let c = s.batch().unwrap().commit().unwrap();
    assert_eq!((c.operations, c.commit_seq), (0, before.1));
    // Only refused operations: an unknown token, a result for nothing transmitted.
    let mut b = s.batch().unwrap();
    assert!(matches!(
        b.enrol([9; 32], [1; 32], 5),
        Err(Error::NotFound(Missing::EnrolmentToken))
    ));
    assert!(b.record_result(d, 1, 1, ok()).is_err());
    let c = b.commit().unwrap();
    assert_eq!((c.operations, c.commit_seq), (0, before.1));
    assert_eq!(
        (txnid(&s), s.snapshot().unwrap().commit_seq().unwrap()),
        before,
        "nothing was written"
    );
    // A batch with one real change is committed as before.
    let mut b = s.batch().unwrap();
    b.enqueue(d, exec()).unwrap();
    let c = b.commit().unwrap();
    assert_eq!((c.operations, c.commit_seq), (1, before.1 + 1));
    assert_eq!(txnid(&s), before.0 + 1);
}

fn ev(time_ms: u64) -> Event {
    Event {
        time_ms,
        device: None,
        kind: EventKind::Other,
        message: format!("at {time_ms}"),
    }
}

/// Events go oldest first, by count and by age, in bounded steps; the newest always stays
/// (ids keep increasing); a prune that finds nothing writes nothing.
#[test]
fn events_are_pruned_by_count_and_age_in_bounded_steps() {
    let (_dir, mut s, _d) = setup();
    let mut b = s.batch().unwrap();
    for t in 1..=100 {
        b.append_event(ev(t * 1000)).unwrap();
    }
    b.commit().unwrap();
    let ids = |s: &Store| -> Vec<u64> {
        let snap = s.snapshot().unwrap();
        snap.events_from(0, 1000)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    };
    // Count: keep 60, at most 25 per call.
    let mut b = s.batch().unwrap();
    assert_eq!(b.prune_events(0, 60, 25).unwrap(), 25);
    assert_eq!(b.prune_events(0, 60, 25).unwrap(), 15);
    assert_eq!(b.prune_events(0, 60, 25).unwrap(), 0);
    b.commit().unwrap();
    assert_eq!(ids(&s), (41..=100).collect::<Vec<_>>());
    // Age: everything before t = 70 s goes.
    let mut b = s.batch().unwrap();
    assert_eq!(b.prune_events(70_000, 0, 1000).unwrap(), 29);
    b.commit().unwrap();
    assert_eq!(ids(&s), (70..=100).collect::<Vec<_>>());
    // Even when all are too old, the newest stays, and the next id follows it.
    let mut b = s.batch().unwrap();
    assert_eq!(b.prune_events(u64::MAX, 1, 1000).unwrap(), 30);
    assert_eq!(b.append_event(ev(1)).unwrap(), 101);
    b.commit().unwrap();
    assert_eq!(ids(&s), vec![100, 101]);
    // Nothing to prune: not committed.
    let seq = s.snapshot().unwrap().commit_seq().unwrap();
    let mut b = s.batch().unwrap();
    assert_eq!(b.prune_events(0, 10, 1000).unwrap(), 0);
    assert_eq!(b.commit().unwrap().operations, 0);
    assert_eq!(s.snapshot().unwrap().commit_seq().unwrap(), seq);
}

/// Only finished commands older than the last `keep` positions go (command and result);
/// pending and in-flight ones stay; the scan resumes where its budget ran out.
#[test]
fn results_are_pruned_per_device_keeping_the_last_ones() {
    let (_dir, mut s, d1) = setup();
    let mut b = s.batch().unwrap();
    let d2 = b.add_device("dev-2", [8; 32], 100).unwrap();
    for d in [d1, d2] {
        for seq in 1..=12 {
            assert_eq!(b.enqueue(d, exec()).unwrap(), seq);
        }
        // 10 finished, the 11th in flight, the 12th pending.
        for seq in 1..=10 {
            b.mark_transmitted(d, seq, seq).unwrap();
            b.record_result(d, seq, 1, ok()).unwrap();
        }
        b.mark_transmitted(d, 11, 11).unwrap();
    }
    b.commit().unwrap();
    let left = |s: &Store, d| -> (Vec<u64>, usize) {
        let snap = s.snapshot().unwrap();
        let cmds: Vec<u64> = snap
            .commands(d, 0, 100)
            .unwrap()
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();
        let results = (1..=12)
            .filter(|seq| snap.result(d, *seq).unwrap().is_some())
            .count();
        (cmds, results)
    };
    // keep 3: seqs 1..=7 of each device go. A budget of 5 stops inside device 1.
    let mut b = s.batch().unwrap();
    let (n, next) = b.prune_results(DeviceId(0), 3, 5).unwrap();
    assert_eq!((n, next), (4, Some(d1)));
    let (n, next) = b.prune_results(next.unwrap(), 3, 5).unwrap();
    assert_eq!(
        (n, next),
        (3, Some(d2)),
        "3 more of device 1, then device 2"
    );
    let (n, next) = b.prune_results(next.unwrap(), 3, 100).unwrap();
    assert_eq!((n, next), (7, None));
    b.commit().unwrap();
    for d in [d1, d2] {
        assert_eq!(left(&s, d), ((8..=12).collect(), 3), "device {d:?}");
        let q = s.snapshot().unwrap().queue(d).unwrap().unwrap();
        assert_eq!(
            (q.status, q.cursor, q.completed_through),
            (QueueStatus::AwaitingResult, Some(11), 10)
        );
    }
    // The queue goes on as before: the in-flight result is stored, the next dispatched.
    let mut b = s.batch().unwrap();
    b.record_result(d1, 11, 1, ok()).unwrap();
    assert_eq!(b.next_to_dispatch(d1).unwrap().unwrap().0, 12);
    // Again: nothing more to delete for device 2, one for device 1 (seq 8), nothing with
    // keep = 0.
    assert_eq!(b.prune_results(DeviceId(0), 3, 100).unwrap(), (1, None));
    assert_eq!(b.prune_results(DeviceId(0), 0, 100).unwrap(), (0, None));
    b.commit().unwrap();
    assert_eq!(left(&s, d1), ((9..=12).collect(), 3));
}

#[test]
fn an_operator_retry_is_a_new_attempt_and_only_its_result_counts() {
    let (dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    b.enqueue(d, exec()).unwrap();
    b.enqueue(d, exec()).unwrap();
    assert_eq!(b.mark_transmitted(d, 1, 10).unwrap(), 1);
    assert_eq!(
        b.record_result(d, 1, 1, failed()).unwrap(),
        Recorded::Stored(QueueStatus::Failed)
    );
    b.retry(d).unwrap();
    b.commit().unwrap();
    drop(s);

    // Across a restart of the gateway, the retry is still attempt 2, not 1 again.
    let mut s = Store::open(dir.path()).unwrap();
    let mut b = s.batch().unwrap();
    assert_eq!(b.next_to_dispatch(d).unwrap().unwrap().0, 1);
    assert_eq!(b.mark_transmitted(d, 1, 20).unwrap(), 2);
    let q = b.queue(d).unwrap().unwrap();
    assert_eq!(
        (q.status, q.cursor, q.attempt, q.attempts),
        (QueueStatus::AwaitingResult, Some(1), 2, 1)
    );
    // A different result of attempt 1 (the device re-sending what it had) is not attempt 2's.
    let mut late = failed();
    late.result.output = b"attempt 1, again".into();
    assert_eq!(
        illegal(b.record_result(d, 1, 1, late).unwrap_err()),
        Illegal::StaleAttempt {
            seq: 1,
            attempt: 1,
            current: 2
        }
    );
    assert_eq!(
        illegal(b.record_result(d, 1, 3, ok()).unwrap_err()),
        Illegal::StaleAttempt {
            seq: 1,
            attempt: 3,
            current: 2
        }
    );
    assert_eq!(
        b.record_result(d, 1, 2, ok()).unwrap(),
        Recorded::Stored(QueueStatus::Running)
    );
    assert_eq!(b.result(d, 1).unwrap(), Some(StoredResult::Received(ok())));
    assert_eq!(b.mark_transmitted(d, 2, 30).unwrap(), 1);
    b.commit().unwrap();
}

#[test]
fn queue_records_written_before_attempts_decode_as_attempt_zero() {
    use codec::Record;
    let q = QueueState {
        status: QueueStatus::AwaitingResult,
        cursor: Some(4),
        attempts: 1,
        attempt: 7,
        next_seq: 5,
        completed_through: 3,
        ..QueueState::default()
    };
    let mut buf = Vec::new();
    q.encode(&mut buf).unwrap();
    assert_eq!(QueueState::decode(&buf).unwrap(), q);
    // The older layout ends before the attempt.
    // Older layouts end before the boot left (1 byte when none), and before the attempt.
    let no_boot = &buf[..buf.len() - 1];
    assert_eq!(QueueState::decode(no_boot).unwrap(), q);
    let old = &buf[..buf.len() - 5];
    assert_eq!(
        QueueState::decode(old).unwrap(),
        QueueState { attempt: 0, ..q }
    );
    assert!(QueueState::decode(&buf[..buf.len() - 3]).is_err());
    let with_boot = QueueState {
        boot_left: Some("b1".into()),
        ..q
    };
    buf.clear();
    with_boot.encode(&mut buf).unwrap();
    assert_eq!(QueueState::decode(&buf).unwrap(), with_boot);
}

/// Before a device's first reboot the store has no report to compare with: the boot the
/// device left (from `RebootStarting`, or the boot of the session the command was sent on when
/// that never arrived) is what a completion must differ from.
#[test]
fn a_reboot_completes_only_on_a_boot_other_than_the_one_left() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    assert!(b.device(d).unwrap().unwrap().report.is_none());
    b.enqueue(d, reboot_cmd()).unwrap();
    b.enqueue(d, reboot_cmd()).unwrap();
    b.mark_transmitted(d, 1, 10).unwrap();
    b.boot_at_dispatch(d, 1, &boot("boot-a")).unwrap();
    b.reboot_started(d, 1, 10_000, &boot("boot-a")).unwrap();
    assert_eq!(
        illegal(
            b.reboot_completed(d, 1, 1, report("boot-a"), ok(), 50)
                .unwrap_err()
        ),
        Illegal::BootIdUnchanged
    );
    b.commit().unwrap();
    drop(s);
    let mut s = Store::open(_dir.path()).unwrap();
    let mut b = s.batch().unwrap();
    assert_eq!(
        b.queue(d).unwrap().unwrap().boot_left,
        Some(boot("boot-a")),
        "durable"
    );
    assert_eq!(
        b.reboot_completed(d, 1, 1, report("boot-b"), ok(), 60)
            .unwrap(),
        QueueStatus::Running
    );

    // The RebootStarting of command 2 never reached the store (the gateway died first): the
    // boot it was sent on still guards the completion.
    b.mark_transmitted(d, 2, 70).unwrap();
    assert_eq!(b.queue(d).unwrap().unwrap().boot_left, None);
    b.boot_at_dispatch(d, 2, &boot("boot-b")).unwrap();
    assert_eq!(
        illegal(
            b.reboot_completed(d, 2, 1, report("boot-b"), ok(), 80)
                .unwrap_err()
        ),
        Illegal::BootIdUnchanged
    );
    // Only for the command in flight.
    assert!(matches!(
        illegal(b.boot_at_dispatch(d, 1, &boot("boot-x")).unwrap_err()),
        Illegal::NotTransmitted { seq: 1 }
    ));
    assert_eq!(
        b.reboot_completed(d, 2, 1, report("boot-c"), ok(), 90)
            .unwrap(),
        QueueStatus::Done
    );
    b.commit().unwrap();
}

/// The stored result is the device's message: a timed-out step stays timed out, the overall
/// exit code and every duration are kept, and the reception time is the caller's.
#[test]
fn a_result_is_stored_as_the_device_sent_it() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    b.enqueue(d, exec()).unwrap();
    b.mark_transmitted(d, 1, 0).unwrap();
    let mut r = failed();
    r.result.exit_code = 137;
    r.result.steps = vec![
        wire::StepResult {
            status: wire::StepStatus::Ok,
            exit_code: 0,
            duration_ms: 250,
        },
        wire::StepResult {
            status: wire::StepStatus::TimedOut,
            exit_code: 137,
            duration_ms: 60_000,
        },
        wire::StepResult {
            status: wire::StepStatus::Skipped,
            exit_code: 0,
            duration_ms: 0,
        },
    ];
    r.result.report = Some(report("boot-a"));
    r.at_ms = 1_795_000_000_123;
    assert!(!r.succeeded(), "a timed-out step is not a success");
    b.record_result(d, 1, 1, r.clone()).unwrap();
    b.commit().unwrap();
    let snap = s.snapshot().unwrap();
    assert_eq!(snap.result(d, 1).unwrap(), Some(StoredResult::Received(r)));
    // The queue treated it as the failure it is.
    assert_eq!(snap.queue(d).unwrap().unwrap().status, QueueStatus::Failed);
}

#[test]
fn a_command_the_wire_cannot_carry_is_refused_before_anything_is_written() {
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    let long = Step::Exec {
        argv: vec!["x".repeat(wire::limits::MAX_PATH + 1).into()],
    };
    assert_eq!(
        illegal(
            b.enqueue(d, cmd(vec![long], 1, OnFailure::Stop))
                .unwrap_err()
        ),
        Illegal::Invalid("command over the wire's limits")
    );
    // The batch is still good.
    assert_eq!(b.enqueue(d, exec()).unwrap(), 1);
    b.commit().unwrap();
}

/// A result stored in format 2 (before an upgrade) and sent again by the device afterwards is
/// a duplicate, not a conflict, though its bytes differ from today's.
#[test]
fn a_result_kept_in_format_2_is_a_duplicate_of_the_same_result_resent() {
    use codec::Record;
    use lmdb::Transaction;
    let (_dir, mut s, d) = setup();
    let mut b = s.batch().unwrap();
    b.enqueue(d, exec()).unwrap();
    b.mark_transmitted(d, 1, 0).unwrap();
    b.record_result(d, 1, 1, ok()).unwrap();
    b.commit().unwrap();
    // Rewrite the stored record as format 2 did: version byte 2, the result in wire version
    // 2's layout (no report here, so the same body).
    let mut raw = Vec::new();
    StoredResult::Received(ok()).encode(&mut raw).unwrap();
    raw[0] = codec::FORMAT_2;
    {
        let mut t = s.env.begin_rw_txn().unwrap();
        t.put(
            s.dbs.results,
            &env::key2(d.0, 1),
            &raw,
            lmdb::WriteFlags::empty(),
        )
        .unwrap();
        t.commit().unwrap();
    }
    let mut b = s.batch().unwrap();
    assert_eq!(b.record_result(d, 1, 1, ok()).unwrap(), Recorded::Duplicate);
    assert_eq!(
        illegal(b.record_result(d, 1, 1, failed()).unwrap_err()),
        Illegal::ConflictingResult { seq: 1 }
    );
}

/// A file task of `size` bytes in 1 KiB blocks, addressed to no group.
fn img_task(size: u64) -> Task {
    Task {
        path: "/srv/img.bin".into(),
        size,
        block_size: 1024,
        sha256: [5; 32],
        group: None,
        trigger: "publish".into(),
        created_ms: 7,
        then: Vec::new(),
        plan: Default::default(),
        follow: Default::default(),
        image: None,
    }
}
