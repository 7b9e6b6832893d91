//! The task finisher, the gateway's side: a device asks for each task it holds a record of
//! (or was told of and has not finished), saying what it holds, and once more "from zero"
//! for every other task of its own; the answer comes from the task table alone.
//!
//! # Rules
//! - The table is the only source of truth: a `completed` row answers "nothing to do"
//!   whatever the device says it holds; a `failed` or `cancelled` row, or no row (not this
//!   device's task, or no such task), answers "closed" and serves nothing.
//! - A `pending` or `in_progress` row takes the device's account of its blocks as the row's
//!   (replacing, not merging: a device that lost its record holds nothing, and the row says
//!   `pending` again), and the task is announced over the asking session: the device is
//!   caught up by unicast from exactly the blocks its NACKs name, which come from the same
//!   record its ask reported (nothing when it holds everything, everything when it holds
//!   nothing). An account of another geometry (`total` is not the task's block count) is
//!   taken as "nothing": the agent drops such a record and starts over.
//! - A from-zero ask (`task` 0) serves every incomplete task of the device that this session
//!   has not been asked about already, each as above with nothing held.

use super::*;

impl Cx<'_> {
    /// The device's finisher asks for `task` (0: every other task of its own), holding `have`
    /// of the `total` blocks it knows the file to have.
    pub(super) fn task_ask(
        &mut self,
        conn: ConnId,
        device: DeviceId,
        task: u64,
        total: u32,
        have: &store::BlockSet,
    ) {
        if task == 0 {
            return self.ask_from_zero(conn, device);
        }
        if let Some(o) = self.online.get_mut(&device) {
            o.asked.insert(task);
        }
        let id = store::TaskId(task);
        let verdict = match self.b.task_status(id, device) {
            Ok(Some(store::TaskDeviceStatus::Completed)) => wire::TaskVerdict::Completed,
            Ok(Some(store::TaskDeviceStatus::Pending | store::TaskDeviceStatus::InProgress(_))) => {
                let blocks = self.b.task(id).ok().flatten().map_or(0, |t| t.blocks());
                let held = if total == blocks {
                    have.clone()
                } else {
                    store::BlockSet::new()
                };
                self.serve(conn, device, id, held);
                wire::TaskVerdict::Serving
            }
            Ok(_) => wire::TaskVerdict::Closed,
            Err(e) => {
                tracing::warn!(device = device.0, task, error = %e, "task ask not answered");
                return;
            }
        };
        self.answer(conn, task, verdict);
    }

    fn ask_from_zero(&mut self, conn: ConnId, device: DeviceId) {
        let asked = self
            .online
            .get(&device)
            .map(|o| o.asked.clone())
            .unwrap_or_default();
        let tasks: Vec<store::TaskId> = match self.b.incomplete_tasks(device) {
            Ok(t) => t.into_iter().filter(|t| !asked.contains(&t.0)).collect(),
            Err(e) => {
                tracing::warn!(device = device.0, error = %e, "task ask not answered");
                return;
            }
        };
        if tasks.is_empty() {
            return self.answer(conn, 0, wire::TaskVerdict::Completed);
        }
        for id in tasks {
            if let Some(o) = self.online.get_mut(&device) {
                o.asked.insert(id.0);
            }
            self.serve(conn, device, id, store::BlockSet::new());
            self.answer(conn, id.0, wire::TaskVerdict::Serving);
        }
    }

    /// Records what the device holds as its row, and announces the task to it.
    fn serve(
        &mut self,
        conn: ConnId,
        device: DeviceId,
        task: store::TaskId,
        held: store::BlockSet,
    ) {
        let count = held.count();
        let held = match self.b.task_reported(task, device, held) {
            Ok(()) => count,
            Err(e) => {
                // Blocks past the file's end: the account is wrong, so it counts as nothing.
                tracing::info!(device = device.0, task = task.0, error = %e, "account not taken");
                let _ = self.b.task_reported(task, device, store::BlockSet::new());
                0
            }
        };
        let blocks = self.b.task(task).ok().flatten().map_or(0, |t| t.blocks());
        let _ = self.b.append_event(event(
            self.now_ms,
            Some(device),
            EventKind::TaskStatus,
            format!(
                "task {}: device asks, holds {held}/{blocks} blocks: served by unicast",
                task.0
            ),
        ));
        self.actions.push(Action::Announce { conn, device, task });
    }

    fn answer(&mut self, conn: ConnId, task_id: u64, verdict: wire::TaskVerdict) {
        self.actions.push(Action::TaskAnswer {
            conn,
            answer: wire::TaskAnswer { task_id, verdict },
        });
    }
}

#[cfg(test)]
mod tests {
    //! The finisher's answers, from the table.

    use crate::fleet::rig::*;
    use crate::fleet::*;

    /// A task of 10 blocks for `g` (n1, n2), created by an operator; returns its id.
    fn push(rig: &mut Rig) -> store::TaskId {
        let a = rig.run(vec![Input::Hashed {
            origin: Origin::Operator(900),
            result: Ok(store::Task {
                path: "/srv/image.bin".into(),
                size: 10_000,
                block_size: 1000,
                sha256: [7; 32],
                group: Some("g".into()),
                trigger: "publish by operator".into(),
                created_ms: T0,
                then: Vec::new(),
                plan: Default::default(),
                follow: Default::default(),
                image: None,
            }),
        }]);
        a.iter()
            .find_map(|a| match a {
                Action::TaskCreated { task, .. } => Some(*task),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{a:?}"))
    }

    fn answers(a: &[Action]) -> Vec<(u64, wire::TaskVerdict)> {
        a.iter()
            .filter_map(|a| match a {
                Action::TaskAnswer { answer, .. } => Some((answer.task_id, answer.verdict)),
                _ => None,
            })
            .collect()
    }

    fn announced(a: &[Action]) -> Vec<(u64, DeviceId)> {
        a.iter()
            .filter_map(|a| match a {
                Action::Announce { task, device, .. } => Some((task.0, *device)),
                _ => None,
            })
            .collect()
    }

    fn row(rig: &mut Rig, task: store::TaskId, dev: DeviceId) -> store::TaskDeviceStatus {
        let snap = rig.fleet.store().snapshot().unwrap();
        snap.task_status(task, dev).unwrap().unwrap()
    }

    #[test]
    fn completed_is_nothing_to_do_and_incomplete_is_served_from_what_the_device_has() {
        let mut rig = Rig::new();
        let (d1, k1) = rig.enrol("n1", 1);
        let (d2, k2) = rig.enrol("n2", 2);
        let task = push(&mut rig);
        let t = task.0;
        // n1 completes while online; on its next session its record's ask is answered
        // "completed, nothing to do" and nothing is announced.
        rig.hello(3, d1, k1, None);
        rig.run(vec![Input::Completion {
            conn: 3,
            device: d1,
            task: t,
            verified: true,
            reason: String::new(),
        }]);
        rig.hello(4, d1, k1, None);
        let a = rig.ask(4, d1, t, 10, &[(0, 10)]);
        assert_eq!(answers(&a), [(t, wire::TaskVerdict::Completed)]);
        assert_eq!(announced(&a), []);
        // The table is the truth: a completed row stays completed whatever the device says.
        let a = rig.ask(4, d1, t, 10, &[(0, 2)]);
        assert_eq!(answers(&a), [(t, wire::TaskVerdict::Completed)]);
        assert_eq!(row(&mut rig, task, d1), store::TaskDeviceStatus::Completed);
        // n2 had received 8 blocks by multicast (so the table said); its record says 0..3 and
        // 5..7: that is the row now (replaced, not merged), and the task is announced.
        rig.hello(5, d2, k2, None);
        rig.run(vec![Input::TransferProgress {
            conn: 5,
            device: d2,
            task: t,
            received: 8,
            total: 10,
        }]);
        let a = rig.ask(5, d2, t, 10, &[(0, 3), (5, 7)]);
        assert_eq!(announced(&a), [(t, d2)]);
        assert_eq!(answers(&a), [(t, wire::TaskVerdict::Serving)]);
        match row(&mut rig, task, d2) {
            store::TaskDeviceStatus::InProgress(b) => assert_eq!(b.ranges(), &[(0, 3), (5, 7)]),
            other => panic!("{other:?}"),
        }
        // The from-zero ask that follows serves nothing twice: n2 asked about the task.
        let a = rig.ask(5, d2, 0, 0, &[]);
        assert_eq!(announced(&a), []);
        assert_eq!(answers(&a), [(0, wire::TaskVerdict::Completed)]);
        // n2 loses its records: on its next session it asks from zero, is served the task,
        // and its row holds nothing again.
        rig.hello(6, d2, k2, None);
        let a = rig.ask(6, d2, 0, 0, &[]);
        assert_eq!(announced(&a), [(t, d2)]);
        assert_eq!(answers(&a), [(t, wire::TaskVerdict::Serving)]);
        assert_eq!(row(&mut rig, task, d2), store::TaskDeviceStatus::Pending);
        // A record of another geometry holds nothing of this task's file.
        let a = rig.ask(6, d2, t, 99, &[(0, 5)]);
        assert_eq!(answers(&a), [(t, wire::TaskVerdict::Serving)]);
        assert_eq!(row(&mut rig, task, d2), store::TaskDeviceStatus::Pending);
        // An account past the file's end is no account: served from nothing.
        rig.ask(6, d2, t, 10, &[(0, 2)]);
        let a = rig.ask(6, d2, t, 10, &[(0, 20)]);
        assert_eq!(announced(&a), [(t, d2)]);
        assert_eq!(row(&mut rig, task, d2), store::TaskDeviceStatus::Pending);
        // The event log says what the device held.
        let r = rig.admin(Request::Events {
            from: 0,
            limit: 500,
        });
        let said = r.data.to_string();
        assert!(said.contains("device asks, holds 5/10 blocks"), "{said}");
    }

    #[test]
    fn a_task_not_the_devices_or_cancelled_is_closed() {
        let mut rig = Rig::new();
        let (d1, k1) = rig.enrol("n1", 1);
        let (d2, k2) = rig.enrol("n2", 2);
        let task = push(&mut rig);
        rig.hello(3, d1, k1, None);
        // No such task.
        let a = rig.ask(3, d1, task.0 + 7, 10, &[(0, 1)]);
        assert_eq!(answers(&a), [(task.0 + 7, wire::TaskVerdict::Closed)]);
        assert_eq!(announced(&a), []);
        // A cancelled row: not served, from zero neither.
        let a = rig.run(vec![Input::Admin {
            conn: 999,
            req: Request::TaskCancel {
                task: task.0,
                device: Some("n2".into()),
            },
        }]);
        assert!(
            matches!(a.last(), Some(Action::Reply { resp, .. }) if resp.ok),
            "{a:?}"
        );
        rig.hello(4, d2, k2, None);
        let a = rig.ask(4, d2, task.0, 10, &[(0, 1)]);
        assert_eq!(answers(&a), [(task.0, wire::TaskVerdict::Closed)]);
        let a = rig.ask(4, d2, 0, 0, &[]);
        assert_eq!(answers(&a), [(0, wire::TaskVerdict::Completed)]);
        assert_eq!(announced(&a), []);
        assert_eq!(row(&mut rig, task, d2), store::TaskDeviceStatus::Cancelled);
    }
}
