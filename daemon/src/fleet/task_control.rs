//! The operator's controls of a push task: `task cancel` and `task retry`, for one target or
//! for the whole task.
//!
//! # Invariants
//! - The task table alone decides who is served. A cancelled row leaves the device's announce
//!   list (the store's `incomplete_tasks`), so it is neither announced on `Hello` nor caught
//!   up; a retried row (`failed` or `cancelled` → `pending`) joins it again: an online device
//!   is announced at once (the task's sender, or a sender re-created from the table, serves it
//!   by unicast catch-up), an offline one on its next `Welcome`.
//! - The wire has no message that stops a receiver, so a cancelled device's agent is not told:
//!   the task's senders are (as for a failure) and stop serving it, and whatever the device
//!   reports later is refused by its row (`cancelled` takes no progress, completion or
//!   failure), so no follow-up command is ever queued for it.
//! - Each changed row is one store transition and one event-log entry, in the request's batch.
//! - A whole-task cancel also ends the task's following of its group (`push --follow-group`,
//!   `--when-online`): devices that join the group later are not made targets of it.

use super::admin::{device_id, device_name, AdminError};
use super::responses::TaskChanged;
use super::*;

/// Which control (`task cancel` or `task retry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TaskControl {
    /// `pending`/`in_progress` → `cancelled`.
    Cancel,
    /// `failed`/`cancelled` → `pending`.
    Retry,
}

impl TaskControl {
    fn verb(self) -> &'static str {
        match self {
            TaskControl::Cancel => "cancel",
            TaskControl::Retry => "retry",
        }
    }

    fn done(self) -> &'static str {
        match self {
            TaskControl::Cancel => "cancelled",
            TaskControl::Retry => "retried",
        }
    }

    /// Whether the whole-task form changes a row in `st` (the others are left as they are).
    fn applies(self, st: &store::TaskDeviceStatus) -> bool {
        match self {
            TaskControl::Cancel => st.is_incomplete(),
            TaskControl::Retry => matches!(
                st,
                store::TaskDeviceStatus::Failed(_) | store::TaskDeviceStatus::Cancelled
            ),
        }
    }
}

impl Cx<'_> {
    /// `task cancel|retry TASK [--device NAME]`: one named target (refused with the reason
    /// when its row's state does not allow it), or every target the control applies to (refused
    /// when there is none).
    pub(super) fn task_control(
        &mut self,
        op: TaskControl,
        task: u64,
        device: Option<&str>,
    ) -> Result<TaskChanged, AdminError> {
        let id = store::TaskId(task);
        let t = self.b.task(id)?.ok_or(AdminError::NoSuchTask(task))?;
        // A whole task cancelled takes no more devices as they join its group (nor waits
        // for them); a retry brings its rows back, not the following: push again for that.
        let unfollowed =
            op == TaskControl::Cancel && device.is_none() && self.b.task_unfollow(id)?;
        if unfollowed {
            let _ = self.b.append_event(event(
                self.now_ms,
                None,
                EventKind::Operator,
                format!(
                    "task {task} no longer follows group {} (cancelled by the operator)",
                    t.group.as_deref().unwrap_or("-")
                ),
            ));
        }
        let rows: Vec<DeviceId> = match device {
            Some(name) => {
                let dev = device_id(&*self.b, name)?;
                if self.b.task_status(id, dev)?.is_none() {
                    return Err(AdminError::NotATarget {
                        task,
                        device: name.to_string(),
                    });
                }
                vec![dev]
            }
            None => self
                .b
                .task_statuses(id)?
                .into_iter()
                .filter(|(_, st)| op.applies(st))
                .map(|(d, _)| d)
                .collect(),
        };
        if rows.is_empty() && !unfollowed {
            return Err(AdminError::NothingToChange {
                task,
                op: op.verb(),
            });
        }
        let mut names = Vec::with_capacity(rows.len());
        for dev in rows {
            let name = device_name(&*self.b, dev).unwrap_or_else(|_| dev.0.to_string());
            match op {
                TaskControl::Cancel => self.b.task_cancel(id, dev),
                TaskControl::Retry => self.b.task_retry(id, dev),
            }
            .map_err(|source| AdminError::Task {
                device: name.clone(),
                source,
            })?;
            let _ = self.b.append_event(event(
                self.now_ms,
                Some(dev),
                EventKind::Operator,
                format!("task {task} {} for {name} by the operator", op.done()),
            ));
            let conn = self.online.get(&dev).map(|o| o.conn);
            self.actions.push(match (op, conn) {
                // The senders stop serving it as they do a failed receiver (an offline
                // device may be a receiver too: a scheduled push holds its targets). Without
                // a session the connection is not used (see `gateway::actions`).
                (TaskControl::Cancel, conn) => Action::TransferDone {
                    conn: conn.unwrap_or(0),
                    device: dev,
                    task: id,
                    verified: false,
                },
                (TaskControl::Retry, Some(conn)) => Action::Announce {
                    conn,
                    device: dev,
                    task: id,
                },
                // Offline: announced after its next `Welcome` (it is pending again).
                (TaskControl::Retry, None) => {
                    names.push(name);
                    continue;
                }
            });
            names.push(name);
        }
        Ok(TaskChanged {
            task,
            done: op.done(),
            devices: names.join(","),
        })
    }
}

#[cfg(test)]
mod tests {
    //! `task cancel` / `task retry` and repeated completions, through the fleet.

    use crate::fleet::rig::*;
    use crate::fleet::*;

    /// A task to group `g` whose follow-up runs `/bin/true` where the copy verified.
    fn task_with_follow_up() -> store::Task {
        store::Task {
            path: "/srv/image.bin".into(),
            size: 3000,
            block_size: 1000,
            sha256: [7; 32],
            group: Some("g".into()),
            trigger: "publish by operator".into(),
            created_ms: T0,
            then: vec![Command {
                target: None,
                steps: exec("/bin/true"),
                timeout_ms: 1000,
                max_attempts: 1,
                on_failure: store::OnFailure::Stop,
            }],
            plan: Default::default(),
            follow: Default::default(),
            image: None,
        }
    }

    fn push(rig: &mut Rig) -> store::TaskId {
        let a = rig.run(vec![Input::Hashed {
            origin: Origin::Operator(900),
            result: Ok(task_with_follow_up()),
        }]);
        a.iter()
            .find_map(|a| match a {
                Action::TaskCreated { task, .. } => Some(*task),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{a:?}"))
    }

    fn completion(conn: ConnId, device: DeviceId, task: store::TaskId, ok: bool) -> Input {
        Input::Completion {
            conn,
            device,
            task: task.0,
            verified: ok,
            reason: if ok {
                String::new()
            } else {
                "DigestMismatch".into()
            },
        }
    }

    fn commands(rig: &mut Rig, name: &str) -> usize {
        rig.admin(Request::QueueShow {
            device: name.into(),
        })
        .data["commands"]
            .as_array()
            .map_or(0, Vec::len)
    }

    fn statuses(rig: &mut Rig, task: store::TaskId) -> Vec<String> {
        let r = rig.admin(Request::TaskShow { task: Some(task.0) });
        r.data["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["status"].as_str().unwrap().to_string())
            .collect()
    }

    fn announced(a: &[Action]) -> Vec<(ConnId, DeviceId)> {
        a.iter()
            .filter_map(|a| match a {
                Action::Announce { conn, device, .. } => Some((*conn, *device)),
                _ => None,
            })
            .collect()
    }

    /// The regression: a second `Completion` for a row already completed (the agent repeats
    /// its completion whenever the task is announced again), in a later batch or in the same
    /// one, queued the follow-up commands again. Now it records nothing.
    #[test]
    fn a_repeated_completion_queues_the_follow_up_once() {
        let mut rig = Rig::new();
        let (d1, k1) = rig.enrol("n1", 1);
        rig.hello(3, d1, k1, None);
        let task = push(&mut rig);
        rig.run(vec![completion(3, d1, task, true)]);
        assert_eq!(commands(&mut rig, "n1"), 1);
        // Again later, and twice in one batch.
        rig.run(vec![completion(3, d1, task, true)]);
        rig.run(vec![
            completion(3, d1, task, true),
            completion(3, d1, task, true),
        ]);
        assert_eq!(commands(&mut rig, "n1"), 1, "the follow-up is queued once");
        assert_eq!(events_with(&mut rig, "follow-up: 1 command(s) queued"), 1);
        assert_eq!(events_with(&mut rig, "completed (digest verified)"), 1);
        assert_eq!(statuses(&mut rig, task), ["completed"]);
    }

    #[test]
    fn cancel_one_device_stops_serving_it_and_refuses_its_late_word() {
        let mut rig = Rig::new();
        let (d1, k1) = rig.enrol("n1", 1);
        let (d2, k2) = rig.enrol("n2", 2);
        rig.hello(3, d1, k1, None);
        let task = push(&mut rig);
        let a = rig.run(vec![Input::Admin {
            conn: 950,
            req: Request::TaskCancel {
                task: task.0,
                device: Some("n1".into()),
            },
        }]);
        // The sender is told (the device is online on 3), then the operator is answered.
        match &a[..] {
            [Action::TransferDone {
                conn: 3,
                device,
                task: t,
                verified: false,
            }, Action::Reply { resp, .. }] => {
                assert_eq!((device, t), (&d1, &task));
                assert!(resp.ok, "{resp:?}");
                assert_eq!(resp.data["done"], "cancelled");
                assert_eq!(resp.data["devices"], "n1");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(statuses(&mut rig, task), ["cancelled", "pending"]);
        assert_eq!(events_with(&mut rig, "cancelled for n1 by the operator"), 1);
        // Not announced again on a new session (n2, still pending, is).
        let a = rig.connect(4, d1, k1);
        assert_eq!(announced(&a), []);
        let a = rig.connect(5, d2, k2);
        assert_eq!(announced(&a), [(5, d2)]);
        // The Welcome counts it no more.
        let pending_transfers = |a: &[Action]| {
            a.iter()
                .find_map(|a| match a {
                    Action::Welcome { welcome, .. } => Some(welcome.pending_transfers),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{a:?}"))
        };
        assert_eq!(pending_transfers(&rig.hello(6, d1, k1, None)), 0);
        // A late verified copy from the multicast still running is not recorded: no
        // follow-up is queued for a cancelled device.
        rig.run(vec![
            Input::TransferProgress {
                conn: 6,
                device: d1,
                task: task.0,
                received: 2,
                total: 3,
            },
            completion(6, d1, task, true),
        ]);
        assert_eq!(statuses(&mut rig, task), ["cancelled", "pending"]);
        assert_eq!(commands(&mut rig, "n1"), 0);
        // Cancelling it again says why not; so does a device that is no target, or none.
        let r = rig.admin(Request::TaskCancel {
            task: task.0,
            device: Some("n1".into()),
        });
        assert!(!r.ok);
        assert_eq!(
            r.error.as_deref(),
            Some("n1: task cancel is not allowed while the task is cancelled")
        );
        rig.admin(Request::DeviceAdd {
            name: "n3".into(),
            groups: vec![],
        });
        let r = rig.admin(Request::TaskCancel {
            task: task.0,
            device: Some("n3".into()),
        });
        assert_eq!(r.kind, Some(crate::admin::ErrorKind::NotFound), "{r:?}");
        let r = rig.admin(Request::TaskCancel {
            task: 99,
            device: None,
        });
        assert_eq!(r.kind, Some(crate::admin::ErrorKind::NotFound), "{r:?}");
    }

    #[test]
    fn cancel_and_retry_the_whole_task() {
        let mut rig = Rig::new();
        let (d1, k1) = rig.enrol("n1", 1);
        let (d2, _) = rig.enrol("n2", 2);
        let (d3, k3) = rig.enrol("n3", 3);
        rig.hello(11, d1, k1, None);
        rig.hello(13, d3, k3, None);
        let task = push(&mut rig);
        // n3 completes; the whole-task cancel takes the other two (n2 is offline: its
        // sender is told all the same) and leaves n3's copy alone.
        rig.run(vec![completion(13, d3, task, true)]);
        let a = rig.run(vec![Input::Admin {
            conn: 950,
            req: Request::TaskCancel {
                task: task.0,
                device: None,
            },
        }]);
        let told: Vec<DeviceId> = a
            .iter()
            .filter_map(|a| match a {
                Action::TransferDone {
                    device,
                    verified: false,
                    ..
                } => Some(*device),
                _ => None,
            })
            .collect();
        assert_eq!(told, [d1, d2]);
        assert_eq!(
            statuses(&mut rig, task),
            ["cancelled", "cancelled", "completed"]
        );
        let r = rig.admin(Request::TaskShow { task: None });
        assert_eq!(r.data["tasks"][0]["cancelled"], 2);
        assert_eq!(r.data["tasks"][0]["completed"], 1);
        // Nothing is left to cancel.
        let r = rig.admin(Request::TaskCancel {
            task: task.0,
            device: None,
        });
        assert!(!r.ok);
        assert!(
            r.error.as_deref().unwrap().contains("nothing to cancel"),
            "{r:?}"
        );
        // Retry the whole task: both cancelled rows are pending again; the online one is
        // announced at once, the offline one on its Welcome. The completed one is untouched.
        let a = rig.run(vec![Input::Admin {
            conn: 950,
            req: Request::TaskRetry {
                task: task.0,
                device: None,
            },
        }]);
        assert_eq!(announced(&a), [(11, d1)]);
        match a.last() {
            Some(Action::Reply { resp, .. }) => {
                assert_eq!(resp.data["done"], "retried");
                assert_eq!(resp.data["devices"], "n1,n2");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            statuses(&mut rig, task),
            ["pending", "pending", "completed"]
        );
        assert_eq!(events_with(&mut rig, "retried for n2 by the operator"), 1);
        // Served again: n1's copy verifies now and its follow-up is queued (once).
        rig.run(vec![completion(11, d1, task, true)]);
        assert_eq!(commands(&mut rig, "n1"), 1);
        assert_eq!(commands(&mut rig, "n3"), 1);
        // Nothing left to retry.
        let r = rig.admin(Request::TaskRetry {
            task: task.0,
            device: None,
        });
        assert!(
            r.error.as_deref().unwrap().contains("nothing to retry"),
            "{r:?}"
        );
    }

    #[test]
    fn retry_of_a_failed_device_announces_it_again() {
        let mut rig = Rig::new();
        let (d1, k1) = rig.enrol("n1", 1);
        rig.hello(3, d1, k1, None);
        let task = push(&mut rig);
        rig.run(vec![completion(3, d1, task, false)]);
        assert_eq!(statuses(&mut rig, task), ["failed"]);
        assert_eq!(announced(&rig.hello(4, d1, k1, None)), []);
        // Retried while online: pending again and announced at once.
        let a = rig.run(vec![Input::Admin {
            conn: 950,
            req: Request::TaskRetry {
                task: task.0,
                device: Some("n1".into()),
            },
        }]);
        assert_eq!(announced(&a), [(4, d1)]);
        assert!(
            matches!(a.last(), Some(Action::Reply { resp, .. }) if resp.ok),
            "{a:?}"
        );
        assert_eq!(statuses(&mut rig, task), ["pending"]);
        // A row that has not failed cannot be retried: said, and nothing changes.
        let r = rig.admin(Request::TaskRetry {
            task: task.0,
            device: Some("n1".into()),
        });
        assert_eq!(
            r.error.as_deref(),
            Some("n1: task retry is not allowed while the task is pending")
        );
        // Pending again: announced on the next session, and it completes this time.
        assert_eq!(announced(&rig.connect(5, d1, k1)), [(5, d1)]);
        rig.run(vec![completion(5, d1, task, true)]);
        assert_eq!(statuses(&mut rig, task), ["completed"]);
        assert_eq!(commands(&mut rig, "n1"), 1);
    }
}
