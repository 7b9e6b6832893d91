//! Push tasks: creation and announce, receivers' progress and completions' follow-ups, and
//! `task show`.

use super::admin::{device_name, AdminError};
use super::responses::*;
use super::*;

/// A push's file is prepared (or could not be): creates its task for the members of
/// `task.group` and announces it to those online. An operator is answered last, on their
/// connection; a watched-directory push is answered to no one, its failure logged. A push
/// that gets no task has its mapping dropped.
pub(super) fn push(
    b: &mut dyn StoreBatch,
    online: &HashMap<DeviceId, Online>,
    now_ms: u64,
    origin: Origin,
    result: &Result<store::Task, PrepareError>,
    actions: &mut Vec<Action>,
) {
    let r = match result {
        Ok(task) => create_task(b, online, now_ms, origin, task, actions),
        Err(e) => Err(AdminError::NotPrepared(Arc::clone(e))),
    };
    if r.is_err() {
        actions.push(Action::PushRefused { origin });
    }
    match (origin.conn(), r) {
        (Some(conn), r) => {
            if let Err(e) = &r {
                tracing::warn!(%origin, error = %e, "push refused");
            }
            let resp = r.map_or_else(Response::from, |pushed| reply(&pushed));
            actions.push(Action::Reply { conn, resp });
        }
        (None, Ok(pushed)) => {
            tracing::info!(%origin, task = pushed.task, targets = %pushed.targets, "watched file: task created");
        }
        (None, Err(e)) => {
            let file = result.as_ref().map_or("", |t| t.path.as_str());
            tracing::warn!(%origin, file, error = %e, "watched file not pushed");
        }
    }
}

fn create_task(
    b: &mut dyn StoreBatch,
    online: &HashMap<DeviceId, Online>,
    now_ms: u64,
    origin: Origin,
    task: &store::Task,
    actions: &mut Vec<Action>,
) -> Result<Pushed, AdminError> {
    let group = task.group.clone().unwrap_or_default();
    let targets = b.group_members(&group)?;
    // A task that follows its group may start with none: its devices come as they join.
    if targets.is_empty() && !task.follow.group {
        return Err(AdminError::EmptyGroup(group));
    }
    let id = b.create_task(task.clone(), &targets)?;
    let _ = b.append_event(event(
        now_ms,
        None,
        EventKind::TaskStatus,
        format!(
            "task {}: {} ({} bytes) to group {group}, {} targets{} ({})",
            id.0,
            task.path,
            task.size,
            targets.len(),
            if task.follow.group {
                " so far, more as they join the group"
            } else {
                ""
            },
            task.trigger
        ),
    ));
    // A name the store cannot read is shown as the device's id: the task exists either way.
    let names: Vec<String> = targets
        .iter()
        .map(|d| device_name(&*b, *d).unwrap_or_else(|_| d.0.to_string()))
        .collect();
    actions.push(Action::TaskCreated {
        origin,
        task: id,
        targets: targets.clone(),
    });
    for dev in &targets {
        if let Some(o) = online.get(dev) {
            actions.push(Action::Announce {
                conn: o.conn,
                device: *dev,
                task: id,
            });
        }
    }
    Ok(Pushed {
        task: id.0,
        size: task.size,
        blocks: task.blocks(),
        sha256: hex(&task.sha256),
        targets: names.join(","),
    })
}

/// The task table's `in_progress` set for a receiver's progress report.
///
/// `TransferStatus` carries counts only, so `received` blocks are recorded as the prefix
/// `0..received`: the count `task show` prints is exact, the positions are not (the store's
/// set is the union of every report, so it only grows, as the receiver's count does). `None`
/// when the report's `total` is not the task's block count (a report of another geometry),
/// or nothing was received yet (the device stays `pending`).
pub fn progress_blocks(received: u32, total: u32, blocks: u32) -> Option<store::BlockSet> {
    if total != blocks || received == 0 {
        return None;
    }
    let mut set = store::BlockSet::new();
    set.insert(0, received.min(blocks));
    Some(set)
}

/// Records a receiver's progress report. A report that arrives after the device's
/// completion or failure (or for an unknown task) is refused by the store and dropped: it is
/// informational, and the session stays.
pub(super) fn record_progress(
    b: &mut dyn StoreBatch,
    dev: DeviceId,
    task: store::TaskId,
    received: u32,
    total: u32,
) {
    let blocks = match b.task(task) {
        Ok(Some(t)) => t.blocks(),
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(device = dev.0, task = task.0, error = %e, "progress not recorded");
            return;
        }
    };
    let Some(set) = progress_blocks(received, total, blocks) else {
        return;
    };
    if let Err(e) = b.task_progress(task, dev, set) {
        tracing::debug!(device = dev.0, task = task.0, error = %e, "progress not recorded");
    }
}

/// A verified copy: the task's follow-up commands join the device's queue, in the same
/// batch as the completion (so a crash loses neither or both).
pub(super) fn queue_follow_up(
    b: &mut dyn StoreBatch,
    now_ms: u64,
    dev: DeviceId,
    task: store::TaskId,
    dirty: &mut BTreeSet<DeviceId>,
) {
    let then = match b.task(task) {
        Ok(Some(t)) => t.then,
        _ => return,
    };
    if then.is_empty() {
        return;
    }
    let n = then.len();
    for c in then {
        if let Err(e) = b.enqueue(dev, c) {
            tracing::warn!(device = dev.0, task = task.0, error = %e, "follow-up not queued");
            return;
        }
    }
    dirty.insert(dev);
    let _ = b.append_event(event(
        now_ms,
        Some(dev),
        EventKind::TaskStatus,
        format!("task {} follow-up: {n} command(s) queued", task.0),
    ));
}

/// `task show`: one task's status table (with its online gate while it waits), or every
/// task with its counts.
pub(super) fn task_show(
    b: &dyn StoreBatch,
    online: &HashMap<DeviceId, Online>,
    now_ms: u64,
    task: Option<u64>,
) -> Result<Response, AdminError> {
    Ok(match task {
        Some(id) => reply(&task_table(b, online, now_ms, id)?),
        None => reply(&task_list(b)?),
    })
}

fn task_table(
    b: &dyn StoreBatch,
    online: &HashMap<DeviceId, Online>,
    now_ms: u64,
    id: u64,
) -> Result<TaskShown, AdminError> {
    let t = b
        .task(store::TaskId(id))?
        .ok_or(AdminError::NoSuchTask(id))?;
    let waiting =
        super::follow::online_gate(b, online, now_ms, store::TaskId(id), &t)?.map(|w| w.waiting);
    let n = t.blocks();
    let devices = b
        .task_statuses(store::TaskId(id))?
        .into_iter()
        .map(|(d, st)| {
            let (blocks, reason) = match &st {
                store::TaskDeviceStatus::InProgress(set) => (
                    set.ranges()
                        .iter()
                        .map(|(s, e)| u64::from(e - s))
                        .sum::<u64>(),
                    None,
                ),
                store::TaskDeviceStatus::Completed => (u64::from(n), None),
                store::TaskDeviceStatus::Failed(r) => (0, Some(r.clone())),
                // A cancelled row keeps no blocks: a retry serves it from what it reports.
                store::TaskDeviceStatus::Pending | store::TaskDeviceStatus::Cancelled => (0, None),
            };
            TaskDeviceRow {
                device: device_name(b, d).unwrap_or_else(|_| d.0.to_string()),
                id: d.0,
                status: st.name(),
                blocks: format!("{blocks}/{n}"),
                image_bytes: t.image.as_ref().map(|i| {
                    // The stream's share received, in image bytes (exact for a raw image).
                    let done = u128::from(i.image_size) * u128::from(blocks) / u128::from(n.max(1));
                    format!("{done}/{}", i.image_size)
                }),
                reason,
            }
        })
        .collect();
    Ok(TaskShown {
        task: id,
        sha256: hex(&t.sha256),
        path: t.path,
        size: t.size,
        block_size: t.block_size,
        group: t.group,
        trigger: t.trigger,
        created_ms: t.created_ms,
        waiting,
        image: t.image.as_ref().map(image_shown),
        devices,
    })
}

/// An image task's target, form and sizes, for `task show`.
fn image_shown(i: &store::TaskImage) -> TaskImageShown {
    use fleetcast_wire::image::{Compression, ImageMap};
    let (form, data_bytes) = match ImageMap::decode(&i.map) {
        _ if i.map.is_empty() => ("raw", i.image_size),
        Ok(m) => match m.compression {
            Compression::None => ("sparse", m.data_bytes()),
            Compression::Zstd { .. } => ("compressed", m.data_bytes()),
        },
        // Checked when the task was made; a record damaged since says so here.
        Err(_) => ("unreadable map", 0),
    };
    TaskImageShown {
        target: i.target.clone(),
        form,
        image_bytes: i.image_size,
        data_bytes,
    }
}

fn task_list(b: &dyn StoreBatch) -> Result<TaskList, AdminError> {
    let mut tasks = Vec::new();
    for (id, t) in b.tasks()? {
        let mut counts: HashMap<&'static str, u64> = HashMap::new();
        for (_, st) in b.task_statuses(id)? {
            *counts.entry(st.name()).or_default() += 1;
        }
        let count = |name| counts.get(name).copied().unwrap_or(0);
        tasks.push(TaskRow {
            task: id.0,
            path: t.path,
            size: t.size,
            group: t.group,
            completed: count("completed"),
            in_progress: count("in_progress"),
            pending: count("pending"),
            failed: count("failed"),
            cancelled: count("cancelled"),
        });
    }
    Ok(TaskList { tasks })
}

impl Cx<'_> {
    /// A receiver's final word on a task: recorded, and the task's sender told.
    pub(super) fn completion(
        &mut self,
        conn: ConnId,
        device: DeviceId,
        task: u64,
        verified: bool,
        reason: &str,
    ) {
        let now_ms = self.now_ms;
        let Cx {
            b, actions, dirty, ..
        } = self;
        let id = store::TaskId(task);
        // `Ok(false)`: a repeated completion of a completed row (the agent repeats it when
        // the task is announced again): nothing is recorded, so nothing is queued twice.
        let r = if verified {
            b.task_completed(id, device)
        } else {
            b.task_failed(id, device, reason).map(|()| true)
        };
        match r {
            Ok(false) => {
                tracing::info!(
                    device = device.0,
                    task,
                    "repeated completion: already recorded"
                );
            }
            Ok(true) => {
                let _ = b.append_event(event(
                    now_ms,
                    Some(device),
                    EventKind::TaskStatus,
                    format!(
                        "task {task} {}",
                        if verified {
                            "completed (digest verified)".to_string()
                        } else {
                            format!("failed: {reason}")
                        }
                    ),
                ));
                if verified {
                    queue_follow_up(&mut **b, now_ms, device, id, dirty);
                }
            }
            Err(e) => {
                // A repeated completion (already completed or failed) or an unknown
                // task: nothing to record; the sender is told anyway.
                tracing::info!(device = device.0, task, error = %e, "completion not recorded");
            }
        }
        actions.push(Action::TransferDone {
            conn,
            device,
            task: id,
            verified,
        });
    }
}

#[cfg(test)]
mod tests {
    //! Push tasks and progress.

    use crate::fleet::rig::*;
    use crate::fleet::*;

    #[test]
    fn progress_counts_map_to_a_prefix_of_the_task() {
        let set = progress_blocks(5, 10, 10).unwrap();
        assert_eq!(set.ranges(), &[(0, 5)]);
        assert_eq!(set.count(), 5);
        assert_eq!(progress_blocks(10, 10, 10).unwrap().ranges(), &[(0, 10)]);
        // More than the file has (a confused receiver) is capped at the file.
        assert_eq!(progress_blocks(11, 10, 10).unwrap().ranges(), &[(0, 10)]);
        assert_eq!(progress_blocks(0, 10, 10), None);
        assert_eq!(progress_blocks(5, 12, 10), None);
    }

    /// The distributor's word that a first pass is over reaches the task table and
    /// survives a restart (which then catches the devices up instead of multicasting again).
    #[test]
    fn a_first_pass_done_is_recorded_in_the_task_and_kept_across_a_restart() {
        let mut rig = Rig::new();
        let (d1, _) = rig.enrol("n1", 1);
        let task = store::Task {
            path: "/srv/image.bin".into(),
            size: 3000,
            block_size: 1000,
            sha256: [7; 32],
            group: Some("g".into()),
            trigger: "publish by operator".into(),
            created_ms: T0,
            then: vec![],
            plan: store::TaskPlan {
                at_ms: Some(T0 + 60_000),
                rate: 1_000_000,
                ..Default::default()
            },
            follow: Default::default(),
            image: None,
        };
        let a = rig.run(vec![Input::Hashed {
            origin: Origin::Operator(900),
            result: Ok(task),
        }]);
        let Some(Action::TaskCreated {
            task: id, targets, ..
        }) = a.first()
        else {
            panic!("{a:?}")
        };
        assert_eq!(targets, &vec![d1]);
        let id = *id;
        let plan = |rig: &Rig| {
            let snap = rig.fleet.store().snapshot().unwrap();
            snap.task(id).unwrap().unwrap().plan
        };
        assert!(plan(&rig).multicast_pending());
        rig.restart();
        assert!(plan(&rig).multicast_pending(), "kept as planned");
        assert_eq!(rig.run(vec![Input::PassDone { task: id }]), vec![]);
        // Repeated (the pass ended, then the group sender): no change, no action.
        assert_eq!(rig.run(vec![Input::PassDone { task: id }]), vec![]);
        rig.restart();
        let p = plan(&rig);
        assert!(p.pass_done && !p.multicast_pending());
        assert_eq!(p.at_ms, Some(T0 + 60_000), "the rest of the plan stays");
        // A task pruned meanwhile: logged, nothing else.
        assert_eq!(
            rig.run(vec![Input::PassDone {
                task: store::TaskId(id.0 + 7)
            }]),
            vec![]
        );
    }

    #[test]
    fn push_creates_a_task_announces_online_targets_and_late_ones_on_welcome() {
        let mut rig = Rig::new();
        let (d1, k1) = rig.enrol("n1", 1);
        let (d2, k2) = rig.enrol("n2", 2);
        rig.hello(3, d1, k1, None);
        let task = store::Task {
            path: "/srv/image.bin".into(),
            size: 3000,
            block_size: 1000,
            sha256: [7; 32],
            group: Some("g".into()),
            trigger: "publish by operator".into(),
            created_ms: T0,
            // Install what was received: queued only where the copy verified.
            then: vec![Command {
                target: None,
                steps: vec![wire::Step::Exec {
                    argv: vec!["/bin/true".into()],
                }],
                timeout_ms: 1000,
                max_attempts: 1,
                on_failure: store::OnFailure::Stop,
            }],
            plan: Default::default(),
            follow: Default::default(),
            image: None,
        };
        let a = rig.run(vec![Input::Hashed {
            origin: Origin::Operator(900),
            result: Ok(task.clone()),
        }]);
        let id = match &a[..] {
            [Action::TaskCreated {
                origin: Origin::Operator(900),
                task: id,
                targets,
            }, Action::Announce {
                conn: 3,
                device,
                task: t2,
            }, Action::Reply { resp, .. }] => {
                assert_eq!(targets, &vec![d1, d2]);
                assert_eq!((device, t2), (&d1, id));
                assert_eq!(resp.data["task"], id.0);
                *id
            }
            other => panic!("{other:?}"),
        };
        // n2 connects later: its finisher's from-zero ask is answered with the announce.
        let a = rig.connect(4, d2, k2);
        assert!(
            matches!(&a[..], [Action::Welcome { conn: 4, .. }, Action::Announce { conn: 4, device, task }, Action::TaskAnswer { conn: 4, answer }] if *device == d2 && *task == id && answer.verdict == wire::TaskVerdict::Serving),
            "{a:?}"
        );
        // Progress reports: counts become a prefix of the task's blocks; a report of another
        // geometry is ignored; the recorded set only grows.
        let a = rig.run(vec![
            Input::TransferProgress {
                conn: 3,
                device: d1,
                task: id.0,
                received: 2,
                total: 3,
            },
            Input::TransferProgress {
                conn: 4,
                device: d2,
                task: id.0,
                received: 1,
                total: 9,
            },
        ]);
        assert_eq!(a, vec![]);
        let r = rig.admin(Request::TaskShow { task: Some(id.0) });
        let rows = r.data["devices"].as_array().unwrap();
        assert_eq!(rows[0]["status"], "in_progress");
        assert_eq!(rows[0]["blocks"], "2/3");
        assert_eq!(rows[1]["status"], "pending");
        assert_eq!(rows[1]["blocks"], "0/3");
        let r = rig.admin(Request::TaskShow { task: None });
        assert_eq!(r.data["tasks"][0]["in_progress"], 1);
        rig.run(vec![Input::TransferProgress {
            conn: 3,
            device: d1,
            task: id.0,
            received: 1,
            total: 3,
        }]);
        let r = rig.admin(Request::TaskShow { task: Some(id.0) });
        assert_eq!(r.data["devices"][0]["blocks"], "2/3");
        // Completions: verified, and a digest mismatch.
        let a = rig.run(vec![
            Input::Completion {
                conn: 3,
                device: d1,
                task: id.0,
                verified: true,
                reason: String::new(),
            },
            Input::Completion {
                conn: 4,
                device: d2,
                task: id.0,
                verified: false,
                reason: "DigestMismatch: bad".into(),
            },
        ]);
        assert_eq!(
            a[..2],
            [
                Action::TransferDone {
                    conn: 3,
                    device: d1,
                    task: id,
                    verified: true
                },
                Action::TransferDone {
                    conn: 4,
                    device: d2,
                    task: id,
                    verified: false
                },
            ]
        );
        // The follow-up goes to the verified device only, in the same batch.
        let dispatched: Vec<u64> = a[2..]
            .iter()
            .filter_map(|a| match a {
                Action::Dispatch { conn, .. } => Some(*conn),
                _ => None,
            })
            .collect();
        assert_eq!(dispatched, [3], "{a:?}");
        let queued = |rig: &mut Rig, n: &str| {
            rig.admin(Request::QueueShow { device: n.into() }).data["commands"]
                .as_array()
                .map(Vec::len)
        };
        assert_eq!(queued(&mut rig, "n1"), Some(1));
        assert_ne!(queued(&mut rig, "n2"), Some(1));
        let r = rig.admin(Request::TaskShow { task: Some(id.0) });
        let rows = r.data["devices"].as_array().unwrap();
        assert_eq!(rows[0]["status"], "completed");
        assert_eq!(rows[0]["blocks"], "3/3");
        assert_eq!(rows[1]["status"], "failed");
        let r = rig.admin(Request::TaskShow { task: None });
        assert_eq!(r.data["tasks"][0]["completed"], 1);
        assert_eq!(r.data["tasks"][0]["failed"], 1);
        // A completed device is not announced again.
        let a = rig.connect(5, d1, k1);
        assert!(
            !a.iter().any(|a| matches!(a, Action::Announce { .. })),
            "{a:?}"
        );
        // A late progress report does not undo the completion.
        let a = rig.run(vec![Input::TransferProgress {
            conn: 5,
            device: d1,
            task: id.0,
            received: 1,
            total: 3,
        }]);
        assert_eq!(a, vec![]);
        let r = rig.admin(Request::TaskShow { task: Some(id.0) });
        assert_eq!(r.data["devices"][0]["status"], "completed");
        // A push to an empty group is refused before any task exists (and its mapping is
        // dropped).
        let a = rig.run(vec![Input::Hashed {
            origin: Origin::Operator(901),
            result: Ok(store::Task {
                group: Some("nobody".into()),
                ..task
            }),
        }]);
        assert!(
            matches!(&a[..], [Action::PushRefused { origin: Origin::Operator(901) }, Action::Reply { conn: 901, resp }] if !resp.ok),
            "{a:?}"
        );
    }
}
