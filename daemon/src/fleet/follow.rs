//! Tasks that follow their group (`push --follow-group`, `--when-online`): a device that
//! joins the group after the push (`group add`, or an enrolment whose token names the group)
//! becomes a target of every such task, and the online gate of a task that waits for devices
//! to come online, as `task show` and `status` report it.
//!
//! # Rules
//! - A device joins a following task once: only when it has no row yet (a device the task
//!   already targets keeps its row, whatever its state, so a completed copy is not served
//!   twice and a cancelled one is not revived behind the operator's back).
//! - A joined device that is online is announced the task at once: the distributor lets it
//!   join the multicast while the first pass runs, and catches it up by unicast otherwise. One
//!   that is offline is served when it connects, by its task finisher's ask (`finisher.rs`),
//!   like any incomplete task of its own.
//! - A whole-task cancel ends the following (`task_control.rs`): the task record then follows
//!   nothing, so nothing here picks it up again.
//! - The online gate itself is the distributor's quorum (devices that reported joining):
//!   online devices of the group are announced the task, and report joining at once. The
//!   fleet only says how far it is: `waiting` while fewer than the gate's count of the
//!   group's members are online, no target has received a block and `max_wait` has not
//!   passed.

use super::admin::device_name;
use super::responses::TaskWaiting;
use super::*;

impl Cx<'_> {
    /// `dev` is now a member of `group`: it becomes a target of every task that follows the
    /// group and does not target it yet (with an event each), announced at once if online.
    pub(super) fn follow_group(&mut self, dev: DeviceId, group: &str) -> Result<(), store::Error> {
        for (id, t) in self.b.tasks()? {
            if !t.follow.group || t.group.as_deref() != Some(group) {
                continue;
            }
            if self.b.task_status(id, dev)?.is_some() {
                continue;
            }
            self.b.add_task_target(id, dev)?;
            let name = device_name(&*self.b, dev).unwrap_or_else(|_| dev.0.to_string());
            let _ = self.b.append_event(event(
                self.now_ms,
                Some(dev),
                EventKind::TaskStatus,
                format!("task {}: {name} joined by following group {group}", id.0),
            ));
            if let Some(o) = self.online.get(&dev) {
                self.actions.push(Action::Announce {
                    conn: o.conn,
                    device: dev,
                    task: id,
                });
            }
        }
        Ok(())
    }

    /// A device just enrolled: the tasks following the groups its token put it in.
    pub(super) fn follow_enrolled(&mut self, dev: DeviceId) -> Result<(), store::Error> {
        let groups: Vec<String> = self
            .b
            .groups()?
            .into_iter()
            .filter(|(_, members)| members.contains(&dev))
            .map(|(g, _)| g)
            .collect();
        for g in groups {
            self.follow_group(dev, &g)?;
        }
        Ok(())
    }
}

/// How far the online gate of `t` is at `now_ms`, if it still holds the multicast back:
/// `None` for a task without one, or once any target received a block or completed (the
/// multicast started), or once `max_wait` passed, or while enough devices are online (the
/// gate opens as they join).
pub(super) fn online_gate(
    b: &dyn StoreBatch,
    online: &HashMap<DeviceId, Online>,
    now_ms: u64,
    id: store::TaskId,
    t: &store::Task,
) -> Result<Option<TaskWaiting>, store::Error> {
    let (Some(n), Some(group)) = (t.follow.when_online, t.group.as_deref()) else {
        return Ok(None);
    };
    if t.plan.pass_done {
        return Ok(None);
    }
    if let Some(w) = t.plan.max_wait_s {
        let start = t.plan.at_ms.unwrap_or(t.created_ms).max(t.created_ms);
        if now_ms >= start.saturating_add(w.saturating_mul(1000)) {
            return Ok(None);
        }
    }
    let started = b.task_statuses(id)?.iter().any(|(_, st)| {
        matches!(
            st,
            store::TaskDeviceStatus::InProgress(_) | store::TaskDeviceStatus::Completed
        )
    });
    if started {
        return Ok(None);
    }
    let members = b.group_members(group)?;
    let up = members.iter().filter(|d| online.contains_key(d)).count();
    let up = u32::try_from(up).unwrap_or(u32::MAX);
    if up >= n {
        return Ok(None);
    }
    Ok(Some(TaskWaiting {
        task: id.0,
        online: up,
        needed: n,
        group: group.to_string(),
        waiting: format!("{up} of {n} devices of {group} online"),
    }))
}

/// Every task whose online gate still holds its multicast back (for `status`).
pub(super) fn waiting_tasks(
    b: &dyn StoreBatch,
    online: &HashMap<DeviceId, Online>,
    now_ms: u64,
) -> Result<Vec<TaskWaiting>, store::Error> {
    let mut out = Vec::new();
    for (id, t) in b.tasks()? {
        out.extend(online_gate(b, online, now_ms, id, &t)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! Following the group, and the online gate.

    use crate::admin::{PushFollow, PushTrigger};
    use crate::fleet::rig::*;
    use crate::fleet::*;

    /// A task row of 10 blocks for `group`, following as `follow` says, as the distributor
    /// hands it to the fleet once hashed.
    fn row(group: &str, follow: store::TaskFollow, max_wait_s: Option<u64>) -> store::Task {
        store::Task {
            path: "/srv/image.bin".into(),
            size: 10_000,
            block_size: 1000,
            sha256: [7; 32],
            group: Some(group.into()),
            trigger: "publish by operator".into(),
            created_ms: T0,
            then: Vec::new(),
            plan: store::TaskPlan {
                max_wait_s,
                ..Default::default()
            },
            follow,
            image: None,
        }
    }

    const FOLLOW: store::TaskFollow = store::TaskFollow {
        group: true,
        when_online: None,
    };

    /// Creates the task of `t`; returns the actions and its id (none if refused).
    fn create(rig: &mut Rig, t: store::Task) -> (Vec<Action>, Option<store::TaskId>) {
        let a = rig.run(vec![Input::Hashed {
            origin: Origin::Operator(900),
            result: Ok(t),
        }]);
        let id = a.iter().find_map(|a| match a {
            Action::TaskCreated { task, .. } => Some(*task),
            _ => None,
        });
        (a, id)
    }

    fn announced(a: &[Action]) -> Vec<(ConnId, store::TaskId)> {
        a.iter()
            .filter_map(|a| match a {
                Action::Announce { conn, task, .. } => Some((*conn, *task)),
                _ => None,
            })
            .collect()
    }

    fn row_of(rig: &mut Rig, task: store::TaskId, name: &str) -> Option<String> {
        let r = rig.admin(Request::TaskShow { task: Some(task.0) });
        r.data["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == name)
            .map(|d| d["status"].as_str().unwrap().to_string())
    }

    fn group_add(rig: &mut Rig, group: &str, names: &[&str]) -> Vec<Action> {
        rig.run(vec![Input::Admin {
            conn: 999,
            req: Request::GroupAdd {
                group: group.into(),
                devices: names.iter().map(|n| n.to_string()).collect(),
            },
        }])
    }

    #[test]
    fn a_device_added_to_the_group_later_gets_a_following_task_once_and_at_once_if_online() {
        let mut rig = Rig::with_multicast();
        let (d1, k1) = rig.enrol("n1", 1);
        let (d2, k2) = rig.enrol_into("n2", 2, &["other"]);
        let (d3, _) = rig.enrol_into("n3", 3, &["other"]);
        rig.hello(11, d1, k1, None);
        rig.hello(12, d2, k2, None);
        let (a, follows) = create(&mut rig, row("g", FOLLOW, None));
        let follows = follows.unwrap();
        assert_eq!(announced(&a), [(11, follows)]);
        let (_, plain) = create(&mut rig, row("g", Default::default(), None));
        let plain = plain.unwrap();

        // n2 (online) and n3 (offline) join `g`: a row of the following task each, not of
        // the plain one; n2 is announced it at once, n3 will be when it connects.
        let a = group_add(&mut rig, "g", &["n2", "n3"]);
        assert_eq!(announced(&a), [(12, follows)], "{a:?}");
        assert!(matches!(a.last(), Some(Action::Reply { resp, .. }) if resp.ok));
        assert_eq!(row_of(&mut rig, follows, "n2").as_deref(), Some("pending"));
        assert_eq!(row_of(&mut rig, follows, "n3").as_deref(), Some("pending"));
        assert_eq!(row_of(&mut rig, plain, "n2"), None);
        assert_eq!(events_with(&mut rig, "joined by following group g"), 2);
        let snap = rig.fleet.store().snapshot().unwrap();
        assert_eq!(snap.incomplete_tasks(d3).unwrap(), [follows]);
        drop(snap);

        // Added again (or to the group once more): the row stays as it is, no announce.
        rig.run(vec![Input::Completion {
            conn: 12,
            device: d2,
            task: follows.0,
            verified: true,
            reason: String::new(),
        }]);
        let a = group_add(&mut rig, "g", &["n2"]);
        assert_eq!(announced(&a), [], "{a:?}");
        assert_eq!(
            row_of(&mut rig, follows, "n2").as_deref(),
            Some("completed")
        );
        assert_eq!(events_with(&mut rig, "joined by following group g"), 2);
    }

    #[test]
    fn a_following_push_to_an_empty_group_is_accepted_and_each_enrolled_device_gets_it() {
        let mut rig = Rig::with_multicast();
        let (a, id) = create(&mut rig, row("new", FOLLOW, None));
        let id = id.expect("a task with no targets");
        assert!(
            matches!(&a[..], [Action::TaskCreated { targets, .. }, Action::Reply { resp, .. }] if targets.is_empty() && resp.ok && resp.data["targets"] == ""),
            "{a:?}"
        );
        // Without following, the same push is refused.
        let (a, none) = create(&mut rig, row("new", Default::default(), None));
        assert_eq!(none, None);
        assert!(
            matches!(&a[..], [Action::PushRefused { .. }, Action::Reply { resp, .. }] if resp.error.as_deref().is_some_and(|e| e.contains("no members"))),
            "{a:?}"
        );

        // A device enrols into `new`: a pending row at once; it is served when it connects
        // (its finisher's from-zero ask), a device of another group is not.
        let (d1, k1) = rig.enrol_into("n1", 1, &["new"]);
        let (d2, k2) = rig.enrol_into("n2", 2, &["else"]);
        assert_eq!(row_of(&mut rig, id, "n1").as_deref(), Some("pending"));
        assert_eq!(row_of(&mut rig, id, "n2"), None);
        assert_eq!(events_with(&mut rig, "n1 joined by following group new"), 1);
        let a = rig.connect(21, d1, k1);
        assert_eq!(announced(&a), [(21, id)], "{a:?}");
        let a = rig.connect(22, d2, k2);
        assert_eq!(announced(&a), [], "{a:?}");
    }

    #[test]
    fn an_online_gate_says_how_many_devices_it_waits_for_until_it_opens() {
        let mut rig = Rig::with_multicast();
        let (d1, k1) = rig.enrol("n1", 1);
        let (d2, k2) = rig.enrol("n2", 2);
        rig.hello(11, d1, k1, None);
        let gate = store::TaskFollow {
            group: true,
            when_online: Some(2),
        };
        let (a, id) = create(&mut rig, row("g", gate, Some(60)));
        let id = id.unwrap();
        // The online device is announced at once: it joins and counts towards the quorum.
        assert_eq!(announced(&a), [(11, id)]);
        let waiting = |rig: &mut Rig| {
            let r = rig.admin(Request::TaskShow { task: Some(id.0) });
            r.data["waiting"].as_str().map(str::to_string)
        };
        assert_eq!(
            waiting(&mut rig).as_deref(),
            Some("1 of 2 devices of g online")
        );
        let s = rig.admin(Request::Status);
        assert_eq!(
            s.data["waiting"],
            serde_json::json!([{"task": id.0, "group": "g", "online": 1, "needed": 2,
                "waiting": "1 of 2 devices of g online"}])
        );
        // A task without a gate never waits.
        let (_, plain) = create(&mut rig, row("g", FOLLOW, None));
        let r = rig.admin(Request::TaskShow {
            task: Some(plain.unwrap().0),
        });
        assert!(r.data.get("waiting").is_none(), "{r:?}");

        // The second device comes online: the gate opens (the distributor's quorum).
        rig.connect(12, d2, k2);
        assert_eq!(waiting(&mut rig), None);
        assert_eq!(
            rig.admin(Request::Status).data["waiting"],
            serde_json::json!([])
        );
        // It goes again: the gate is not shut again once blocks arrived.
        rig.run(vec![
            Input::TransferProgress {
                conn: 11,
                device: d1,
                task: id.0,
                received: 3,
                total: 10,
            },
            Input::Disconnected {
                conn: 12,
                device: Some(d2),
                reason: "gone".into(),
            },
        ]);
        assert_eq!(waiting(&mut rig), None);

        // A gate nobody reaches stops waiting when its max-wait passed.
        let (_, late) = create(&mut rig, row("g", gate, Some(60)));
        let late = late.unwrap();
        let r = rig.admin(Request::TaskShow { task: Some(late.0) });
        assert_eq!(r.data["waiting"], "1 of 2 devices of g online");
        rig.now = T0 + 60_000;
        let r = rig.admin(Request::TaskShow { task: Some(late.0) });
        assert!(r.data.get("waiting").is_none(), "{r:?}");
    }

    #[test]
    fn a_whole_task_cancel_stops_following_the_group_and_a_device_cancel_does_not() {
        let mut rig = Rig::with_multicast();
        let (d1, k1) = rig.enrol_into("n1", 1, &["other"]);
        rig.enrol_into("n2", 2, &["other"]);
        rig.hello(11, d1, k1, None);
        let gate = store::TaskFollow {
            group: true,
            when_online: Some(5),
        };
        let (_, empty) = create(&mut rig, row("new", gate, None));
        let empty = empty.unwrap();
        let (_, kept) = create(&mut rig, row("kept", FOLLOW, None));
        let kept = kept.unwrap();
        // The reply (a cancelled online device's sender is told first).
        let cancel = |rig: &mut Rig, task: store::TaskId, device: Option<&str>| {
            let a = rig.run(vec![Input::Admin {
                conn: 999,
                req: Request::TaskCancel {
                    task: task.0,
                    device: device.map(str::to_string),
                },
            }]);
            match a.last() {
                Some(Action::Reply { resp, .. }) => resp.clone(),
                other => panic!("{other:?}"),
            }
        };
        // Nobody joined yet, but there is something to cancel: the following and the gate.
        let r = cancel(&mut rig, empty, None);
        assert!(r.ok, "{r:?}");
        assert_eq!(events_with(&mut rig, "no longer follows group new"), 1);
        let r = rig.admin(Request::TaskShow {
            task: Some(empty.0),
        });
        assert!(r.data.get("waiting").is_none(), "{r:?}");
        let a = group_add(&mut rig, "new", &["n1"]);
        assert_eq!(announced(&a), [], "{a:?}");
        assert_eq!(row_of(&mut rig, empty, "n1"), None);
        // Cancelled again: nothing left to change.
        assert!(!cancel(&mut rig, empty, None).ok);

        // One device's cancel leaves the task following its group.
        group_add(&mut rig, "kept", &["n1"]);
        assert!(cancel(&mut rig, kept, Some("n1")).ok);
        let a = group_add(&mut rig, "kept", &["n2"]);
        assert_eq!(
            row_of(&mut rig, kept, "n2").as_deref(),
            Some("pending"),
            "{a:?}"
        );
        assert_eq!(row_of(&mut rig, kept, "n1").as_deref(), Some("cancelled"));
        assert_eq!(events_with(&mut rig, "no longer follows group kept"), 0);
    }

    fn push_req(trigger: PushTrigger, follow: PushFollow) -> Request {
        Request::Push {
            path: "/srv/image.bin".into(),
            group: "rack7".into(),
            block_size: 1000,
            rate_mbps: 100,
            trigger,
            then: vec![],
            delivery: Default::default(),
            follow,
            image: None,
        }
    }

    #[test]
    fn follow_settings_reach_the_distributor_and_contradictions_are_refused() {
        let mut rig = Rig::with_multicast();
        let gate = PushFollow {
            group: false,
            when_online: Some(20),
        };
        let wait = PushTrigger {
            max_wait_s: Some(60),
            ..PushTrigger::default()
        };
        let a = rig.run(vec![Input::Admin {
            conn: 900,
            req: push_req(wait, gate),
        }]);
        match &a[..] {
            [Action::PreparePush { spec, .. }] => {
                // The gate implies following the group; the trigger text says both.
                assert_eq!(
                    spec.follow,
                    store::TaskFollow {
                        group: true,
                        when_online: Some(20)
                    }
                );
                assert_eq!(
                    spec.trigger.describe(&spec.reason),
                    "publish by operator, when 20 devices of group rack7 are online or 60 s passed"
                );
            }
            other => panic!("{other:?}"),
        }
        let a = rig.run(vec![Input::Admin {
            conn: 900,
            req: push_req(
                PushTrigger::default(),
                PushFollow {
                    group: true,
                    when_online: None,
                },
            ),
        }]);
        match &a[..] {
            [Action::PreparePush { spec, .. }] => {
                assert_eq!(spec.follow, FOLLOW);
                assert_eq!(
                    spec.trigger.describe(&spec.reason),
                    "publish by operator, following group rack7"
                );
            }
            other => panic!("{other:?}"),
        }
        let refused = |rig: &mut Rig, t: PushTrigger, f: PushFollow| {
            let r = rig.admin(push_req(t, f));
            assert!(!r.ok);
            r.error.unwrap()
        };
        let e = refused(
            &mut rig,
            PushTrigger::default(),
            PushFollow {
                group: true,
                when_online: Some(0),
            },
        );
        assert!(e.contains("--when-online must be at least 1"), "{e}");
        let e = refused(
            &mut rig,
            PushTrigger {
                min_ready: Some(3),
                ..PushTrigger::default()
            },
            gate,
        );
        assert!(e.contains("give one"), "{e}");
        // --max-wait still needs a gate to bound.
        let e = refused(&mut rig, wait, PushFollow::default());
        assert!(e.contains("give both"), "{e}");

        // An older client sends no `follow`: it follows nothing.
        let mut old = serde_json::to_value(push_req(wait, gate)).unwrap();
        old.as_object_mut().unwrap().remove("follow");
        let old: Request = serde_json::from_value(old).unwrap();
        assert!(matches!(old, Request::Push { follow, .. } if follow == PushFollow::default()));
    }
}
