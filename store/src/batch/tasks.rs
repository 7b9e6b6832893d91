//! Distribution tasks: creation, targets, and each target's progress to completion.

use super::tables::Counter;
use super::{Cx, Exec};
use crate::engine::TaskOps;
use crate::error::{Error, Illegal, Missing, Result};
use crate::types::{BlockSet, DeviceId, Task, TaskDeviceStatus, TaskFollow, TaskId};

impl<B: Exec> TaskOps for B {
    fn create_task(&mut self, task: Task, targets: &[DeviceId]) -> Result<TaskId> {
        let targets = targets.to_vec();
        self.exec(move |cx| create_task(cx, &task, &targets))
            .map(TaskId)
    }

    fn task_pass_done(&mut self, task: TaskId) -> Result<()> {
        self.exec(move |cx| {
            let mut t =
                cx.t.task(task)?
                    .ok_or(Error::NotFound(Missing::Task(task)))?;
            if t.plan.pass_done {
                return Ok(());
            }
            t.plan.pass_done = true;
            cx.t.put_task(task, &t)
        })
    }

    fn task_unfollow(&mut self, task: TaskId) -> Result<bool> {
        // A task that follows nothing writes nothing, so it is not recorded for replay.
        self.exec_if(
            move |cx| {
                let mut t =
                    cx.t.task(task)?
                        .ok_or(Error::NotFound(Missing::Task(task)))?;
                if t.follow.is_default() {
                    return Ok(false);
                }
                t.follow = TaskFollow::default();
                cx.t.put_task(task, &t).map(|()| true)
            },
            |wrote| *wrote,
        )
    }

    fn add_task_target(&mut self, task: TaskId, dev: DeviceId) -> Result<()> {
        self.exec(move |cx| {
            cx.t.task(task)?
                .ok_or(Error::NotFound(Missing::Task(task)))?;
            cx.device(dev)?;
            if cx.t.task_status(task, dev)?.is_none() {
                cx.set_task_entry(task, dev, &TaskDeviceStatus::Pending)?;
            }
            Ok(())
        })
    }

    fn task_progress(&mut self, task: TaskId, dev: DeviceId, blocks: BlockSet) -> Result<()> {
        self.exec(move |cx| task_progress(cx, task, dev, &blocks))
    }

    fn task_reported(&mut self, task: TaskId, dev: DeviceId, blocks: BlockSet) -> Result<()> {
        self.exec(move |cx| {
            match cx.task_entry(task, dev)? {
                TaskDeviceStatus::Pending | TaskDeviceStatus::InProgress(_) => {}
                other => return Err(task_illegal("task_reported", &other)),
            }
            if blocks.count() == 0 {
                return cx.set_task_entry(task, dev, &TaskDeviceStatus::Pending);
            }
            check_blocks(cx, task, dev, &blocks)?;
            cx.set_task_entry(task, dev, &TaskDeviceStatus::InProgress(blocks.clone()))
        })
    }

    fn task_completed(&mut self, task: TaskId, dev: DeviceId) -> Result<bool> {
        // A repeat writes nothing, so it is not recorded for replay either.
        self.exec_if(
            move |cx| match cx.task_entry(task, dev)? {
                TaskDeviceStatus::Pending | TaskDeviceStatus::InProgress(_) => cx
                    .set_task_entry(task, dev, &TaskDeviceStatus::Completed)
                    .map(|()| true),
                TaskDeviceStatus::Completed => Ok(false),
                other => Err(task_illegal("task_completed", &other)),
            },
            |recorded| *recorded,
        )
    }

    fn task_failed(&mut self, task: TaskId, dev: DeviceId, reason: &str) -> Result<()> {
        let reason = reason.to_owned();
        self.exec(move |cx| match cx.task_entry(task, dev)? {
            TaskDeviceStatus::Pending | TaskDeviceStatus::InProgress(_) => {
                cx.set_task_entry(task, dev, &TaskDeviceStatus::Failed(reason.clone()))
            }
            other => Err(task_illegal("task_failed", &other)),
        })
    }

    fn task_retry(&mut self, task: TaskId, dev: DeviceId) -> Result<()> {
        self.exec(move |cx| match cx.task_entry(task, dev)? {
            TaskDeviceStatus::Failed(_) | TaskDeviceStatus::Cancelled => {
                cx.set_task_entry(task, dev, &TaskDeviceStatus::Pending)
            }
            other => Err(task_illegal("task_retry", &other)),
        })
    }

    fn task_cancel(&mut self, task: TaskId, dev: DeviceId) -> Result<()> {
        self.exec(move |cx| match cx.task_entry(task, dev)? {
            TaskDeviceStatus::Pending | TaskDeviceStatus::InProgress(_) => {
                cx.set_task_entry(task, dev, &TaskDeviceStatus::Cancelled)
            }
            other => Err(task_illegal("task_cancel", &other)),
        })
    }
}

fn create_task(cx: &mut Cx<'_>, task: &Task, targets: &[DeviceId]) -> Result<u64> {
    if task.block_size == 0 {
        return Err(Error::IllegalTransition {
            device: None,
            kind: Illegal::Invalid("block size is 0"),
        });
    }
    for dev in targets {
        cx.device(*dev)?;
    }
    let id = cx.t.next_id(Counter::Task)?;
    cx.t.put_task(TaskId(id), task)?;
    for dev in targets {
        cx.set_task_entry(TaskId(id), *dev, &TaskDeviceStatus::Pending)?;
    }
    Ok(id)
}

fn task_progress(cx: &mut Cx<'_>, task: TaskId, dev: DeviceId, blocks: &BlockSet) -> Result<()> {
    let st = cx.task_entry(task, dev)?;
    check_blocks(cx, task, dev, blocks)?;
    let next = match st {
        TaskDeviceStatus::Pending => TaskDeviceStatus::InProgress(blocks.clone()),
        TaskDeviceStatus::InProgress(mut b) => {
            b.union(blocks);
            TaskDeviceStatus::InProgress(b)
        }
        other => return Err(task_illegal("task_progress", &other)),
    };
    cx.set_task_entry(task, dev, &next)
}

/// Refuses blocks past the end of the task's file.
fn check_blocks(cx: &Cx<'_>, task: TaskId, dev: DeviceId, blocks: &BlockSet) -> Result<()> {
    let info =
        cx.t.task(task)?
            .ok_or(Error::NotFound(Missing::Task(task)))?;
    if blocks.end() > info.blocks() {
        return Err(Error::IllegalTransition {
            device: Some(dev),
            kind: Illegal::BlockOutOfRange {
                block: info.blocks(),
                blocks: info.blocks(),
            },
        });
    }
    Ok(())
}

fn task_illegal(op: &'static str, st: &TaskDeviceStatus) -> Error {
    Error::IllegalTransition {
        device: None,
        kind: Illegal::TaskStatus {
            op,
            current: st.name(),
        },
    }
}

#[cfg(test)]
mod tests {
    //! `task_unfollow`.

    use crate::prelude::*;
    use crate::{Error, Store, Task, TaskDeviceStatus, TaskFollow, TaskId, TaskPlan};

    #[test]
    fn a_task_unfollowed_keeps_its_targets_and_follows_nothing_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let mut b = s.batch().unwrap();
        let d = b.add_device("dev-1", [7; 32], 100).unwrap();
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
                max_wait_s: Some(60),
                ..Default::default()
            },
            follow: TaskFollow {
                group: true,
                when_online: Some(20),
            },
            image: None,
        };
        let t = b.create_task(task.clone(), &[d]).unwrap();
        b.commit().unwrap();
        let mut b = s.batch().unwrap();
        assert!(b.task_unfollow(t).unwrap());
        assert!(!b.task_unfollow(t).unwrap(), "idempotent");
        assert!(matches!(
            b.task_unfollow(TaskId(t.0 + 1)).unwrap_err(),
            Error::NotFound(_)
        ));
        b.commit().unwrap();
        // A second unfollow alone writes nothing: the batch is not committed.
        let mut b = s.batch().unwrap();
        assert!(!b.task_unfollow(t).unwrap());
        assert_eq!(b.commit().unwrap().operations, 0);
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let snap = s.snapshot().unwrap();
        let back = snap.task(t).unwrap().unwrap();
        assert!(back.follow.is_default());
        assert_eq!(back.plan, task.plan);
        assert_eq!(back.trigger, task.trigger);
        assert_eq!(
            snap.task_status(t, d).unwrap(),
            Some(TaskDeviceStatus::Pending)
        );
    }
}
