//! Runs every scan path of the public API in a child process under valgrind (memcheck) and
//! fails on any invalid read: the check that no LMDB iterator outlives its cursor (lmdb-rkv
//! 0.14 lets safe code do that, and it reads freed memory). A deliberately broken scan
//! (iterator kept after its cursor is dropped) makes memcheck report "Invalid read" here.
//!
//! Needs `valgrind` on PATH; without it the test says so and checks nothing else.

use std::process::Command as Proc;

use fleetcast_store::prelude::*;
use fleetcast_store::{
    Command, DeviceId, Event, EventKind, OnFailure, Store, Task, TaskDeviceStatus,
};
use fleetcast_wire::Step;

const ROLE: &str = "FLEETCAST_STORE_VALGRIND_CHILD";

fn exercise() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path()).unwrap();
    let cmd = Command {
        target: None,
        steps: vec![Step::Exec {
            argv: vec!["x".repeat(40).into()],
        }],
        timeout_ms: 1,
        max_attempts: 1,
        on_failure: OnFailure::Stop,
    };
    let mut ids: Vec<DeviceId> = Vec::new();
    for round in 0..4u64 {
        let mut b = s.batch().unwrap();
        for i in 0..50 {
            let d = b.add_device(&format!("d{round}-{i}"), [0; 32], 0).unwrap();
            b.join_group("g", d).unwrap();
            ids.push(d);
        }
        for (k, d) in ids.iter().enumerate() {
            b.enqueue(*d, cmd.clone()).unwrap();
            if k % 7 == 0 {
                // Scans inside the write transaction, between writes.
                assert!(b.next_to_dispatch(*d).unwrap().is_some());
                assert!(!b.commands(*d, 0, usize::MAX).unwrap().is_empty());
            }
            let ev = Event {
                time_ms: 0,
                device: Some(*d),
                kind: EventKind::Other,
                message: "e".repeat(30),
            };
            b.append_event(ev).unwrap();
        }
        let task = Task {
            path: "/f".into(),
            size: 10,
            block_size: 1,
            sha256: [0; 32],
            group: Some("g".into()),
            trigger: "t".into(),
            created_ms: 0,
            then: Vec::new(),
            plan: Default::default(),
            follow: Default::default(),
            image: None,
        };
        let t = b.create_task(task, &ids).unwrap();
        assert_eq!(b.group_members("g").unwrap().len(), ids.len());
        assert_eq!(b.incomplete_tasks(ids[0]).unwrap().len() as u64, round + 1);
        b.cancel(ids[0]).unwrap();
        b.commit().unwrap();
        let snap = s.snapshot().unwrap();
        assert_eq!(snap.devices().unwrap().len(), ids.len());
        assert_eq!(snap.queues().unwrap().len(), ids.len());
        assert!(snap
            .task_statuses(t)
            .unwrap()
            .iter()
            .all(|(_, st)| *st == TaskDeviceStatus::Pending));
        assert_eq!(snap.tasks().unwrap().len() as u64, round + 1);
        let last = snap.last_event_id().unwrap();
        assert_eq!(
            snap.events_from(last.saturating_sub(9), 100).unwrap().len(),
            10
        );
    }
}

#[test]
fn scans_are_memcheck_clean() {
    if std::env::var_os(ROLE).is_some() {
        exercise();
        return;
    }
    if Proc::new("valgrind").arg("--version").output().is_err() {
        eprintln!("valgrind not installed: scans_are_memcheck_clean checked nothing");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Proc::new("valgrind")
        .args(["--error-exitcode=99", "--leak-check=no", "-q"])
        .arg(exe)
        .args(["--exact", "scans_are_memcheck_clean", "--test-threads=1"])
        .env(ROLE, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "memcheck failed ({:?}):\n{stderr}",
        out.status
    );
}
