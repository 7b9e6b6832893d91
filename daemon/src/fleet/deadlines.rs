//! Deadlines: a command result that is overdue, a device that does not come back from its
//! reboot in time.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Deadline {
    Result { seq: u64 },
    Reboot,
}

impl Fleet {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fire(
        b: &mut dyn StoreBatch,
        online: &mut HashMap<DeviceId, Online>,
        _cfg: &FleetConfig,
        now_ms: u64,
        dev: DeviceId,
        what: Deadline,
        actions: &mut Vec<Action>,
        dirty: &mut BTreeSet<DeviceId>,
    ) {
        // In a cell, the deadline is the owner's to fire. A device whose gateway died is
        // claimed by whichever gateway's deadline comes due (a device that never comes back
        // still fails its command or reboot); one another live gateway owns is left to it.
        match b.claim(dev) {
            Ok(store::Claimed::Ours) => {}
            Ok(store::Claimed::Elsewhere { .. }) => return,
            Err(e) => {
                tracing::debug!(device = dev.0, error = %e, "deadline not fired: device not claimed");
                return;
            }
        }
        let Ok(Some(q)) = b.queue(dev) else { return };
        match what {
            Deadline::Result { seq }
                if q.status == QueueStatus::AwaitingResult && q.cursor == Some(seq) =>
            {
                match b.command_timed_out(dev, seq, now_ms) {
                    Ok(status) => {
                        let _ = b.append_event(event(
                            now_ms,
                            Some(dev),
                            EventKind::Other,
                            format!("command {seq} timed out (queue {status})"),
                        ));
                        // The session did not deliver a result in time: drop it; the agent
                        // resynchronises from Hello when it comes back.
                        if let Some(o) = online.remove(&dev) {
                            actions.push(close(
                                o.conn,
                                CloseCode::TIMEOUT,
                                "command result overdue",
                            ));
                        }
                        dirty.insert(dev);
                    }
                    Err(store::Error::IllegalTransition {
                        kind: Illegal::DeadlineNotReached { .. },
                        ..
                    }) => {}
                    Err(e) => {
                        tracing::warn!(device = dev.0, seq, error = %e, "timeout not applied")
                    }
                }
            }
            // A cancelled command the session was still running is overdue: stop waiting for
            // it there (the agent resynchronises from Hello), so the queue's next command can
            // go.
            Deadline::Result { seq }
                if online.get(&dev).is_some_and(|o| o.in_flight == Some(seq))
                    && b.command(dev, seq).ok().flatten().is_none() =>
            {
                if let Some(o) = online.remove(&dev) {
                    actions.push(close(
                        o.conn,
                        CloseCode::TIMEOUT,
                        "result of a cancelled command overdue",
                    ));
                }
            }
            Deadline::Reboot
                if q.status == QueueStatus::Rebooting
                    && q.reboot_deadline_ms <= now_ms
                    && b.reboot_deadline_missed(dev, now_ms).is_ok() =>
            {
                let _ = b.append_event(event(
                    now_ms,
                    Some(dev),
                    EventKind::QueueFailed,
                    "device did not come back before its reboot deadline".into(),
                ));
            }
            _ => {}
        }
    }
}

impl Cx<'_> {
    /// The agent is rebooting for command `seq`: its deadline starts.
    pub(super) fn reboot_starting(
        &mut self,
        conn: ConnId,
        device: DeviceId,
        seq: u64,
        boot_id: &[u8; 16],
    ) {
        let now_ms = self.now_ms;
        let Cx {
            b,
            cfg,
            online,
            actions,
            armed,
            ..
        } = self;
        // An A/B switch bounds its reboot by its own deadline (the update's, from the reboot
        // to a healthy new slot): a device that does not come back fails then, not at the
        // gateway's general reboot timeout.
        let switch_ms = b.command(device, seq).ok().flatten().and_then(|c| {
            c.steps.iter().find_map(|s| match s {
                wire::Step::SlotSwitch { deadline_secs } if *deadline_secs > 0 => {
                    Some(u64::from(*deadline_secs) * 1000)
                }
                _ => None,
            })
        });
        let deadline = now_ms + switch_ms.unwrap_or(cfg.reboot_timeout_ms);
        match b.reboot_started(device, seq, deadline, &hex(boot_id)) {
            Ok(()) => {
                let _ = b.append_event(event(
                    now_ms,
                    Some(device),
                    EventKind::RebootStarted,
                    format!("command {seq}"),
                ));
                armed.push((deadline, device, Deadline::Reboot));
            }
            Err(e) => actions.push(close(
                conn,
                CloseCode::PROTOCOL,
                &format!("reboot refused: {e}"),
            )),
        }
        if let Some(o) = online.get_mut(&device) {
            o.in_flight = None;
        }
    }

    /// The agent is back from a reboot, on a new session.
    pub(super) fn reboot_complete(
        &mut self,
        device: DeviceId,
        seq: u64,
        attempt: u32,
        report: &wire::ConfigReport<'static>,
        result: &store::Received,
    ) {
        let now_ms = self.now_ms;
        let Cx {
            b, online, dirty, ..
        } = self;
        // The result is the device's own: the steps before the reboot as they ran.
        let r = result.clone();
        match b.reboot_completed(device, seq, attempt, report.clone(), r, now_ms) {
            Ok(status) => {
                let _ = b.append_event(event(
                    now_ms,
                    Some(device),
                    EventKind::RebootCompleted,
                    format!(
                        "command {seq}: back with boot id {} (queue {status})",
                        hex(&report.boot_id)
                    ),
                ));
            }
            Err(e) => {
                // Not the agent's fault (e.g. the operator skipped the command while
                // the device was away): keep the session, record why. Closing would
                // only make the agent reconnect and report the same thing again.
                tracing::warn!(device = device.0, seq, error = %e, "reboot completion not applied");
                let _ = b.append_event(event(
                    now_ms,
                    Some(device),
                    EventKind::Other,
                    format!("reboot completion for command {seq} not applied: {e}"),
                ));
            }
        }
        // Applied or not, the device is done with that command.
        if let Some(o) = online.get_mut(&device) {
            if o.in_flight == Some(seq) {
                o.in_flight = None;
            }
        }
        dirty.insert(device);
    }
}

#[cfg(test)]
mod tests {
    //! Reboots and their deadlines.

    use crate::fleet::rig::*;
    use crate::fleet::*;

    #[test]
    fn reboot_suspends_the_queue_until_a_new_boot_reports() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        rig.hello(2, dev, key, None);
        add(
            &mut rig,
            "n1",
            vec![vec![wire::Step::Reboot], exec("after")],
        );
        rig.run(vec![Input::RebootStarting {
            conn: 2,
            device: dev,
            seq: 1,
            boot_id: BOOT,
        }]);
        assert_eq!(rig.queue(dev).status, QueueStatus::Rebooting);
        rig.run(vec![Input::Disconnected {
            conn: 2,
            device: Some(dev),
            reason: "rebooting".into(),
        }]);
        // Back on a new session; nothing is dispatched while rebooting.
        let a = rig.hello(3, dev, key, last(1, 1, None));
        assert!(dispatched(&a).is_empty(), "{a:?}");
        let report = |boot: &str| wire::ConfigReport {
            software: vec![],
            ..report_with("Debian", boot_named(boot))
        };
        // The device's own result of the command: its output before the reboot is kept.
        let mut result = ok_result(1);
        result.result.output = b"kernel installed\n".into();
        let a = rig.run(vec![Input::RebootComplete {
            conn: 3,
            device: dev,
            seq: 1,
            attempt: 1,
            report: report("b2"),
            result: result.clone(),
        }]);
        assert_eq!(dispatched(&a), vec![2], "{a:?}");
        let snap = rig.fleet.store().snapshot().unwrap();
        let d = snap.device(dev).unwrap().unwrap();
        assert_eq!(d.report.unwrap().boot_id, boot_named("b2"));
        assert_eq!(
            snap.result(dev, 1).unwrap(),
            Some(store::StoredResult::Received(result))
        );
    }

    #[test]
    fn a_device_that_misses_its_reboot_deadline_fails_visibly() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        rig.hello(2, dev, key, None);
        add(
            &mut rig,
            "n1",
            vec![vec![wire::Step::Reboot], exec("after")],
        );
        rig.run(vec![Input::RebootStarting {
            conn: 2,
            device: dev,
            seq: 1,
            boot_id: BOOT,
        }]);
        rig.run(vec![Input::Disconnected {
            conn: 2,
            device: Some(dev),
            reason: "rebooting".into(),
        }]);
        assert!(rig.fleet.next_deadline().is_some());
        rig.now += 60_001;
        rig.run(vec![]);
        let q = rig.queue(dev);
        assert_eq!(
            (q.status, q.failure),
            (
                QueueStatus::Failed,
                Some(store::FailReason::RebootDeadlineMissed)
            )
        );
        let ev = rig
            .fleet
            .store()
            .snapshot()
            .unwrap()
            .events_from(1, 1000)
            .unwrap();
        assert!(ev.iter().any(|(_, e)| e.kind == EventKind::QueueFailed));
    }

    /// An A/B switch's reboot is bounded by its own deadline (5 s here), not by the gateway's
    /// reboot timeout (60 s in the rig).
    #[test]
    fn a_slot_switch_bounds_its_reboot_by_its_own_deadline() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        rig.hello(2, dev, key, None);
        add(
            &mut rig,
            "n1",
            vec![
                vec![
                    wire::Step::SlotSwitch { deadline_secs: 5 },
                    wire::Step::Reboot,
                ],
                vec![wire::Step::SlotCommit],
            ],
        );
        rig.run(vec![Input::RebootStarting {
            conn: 2,
            device: dev,
            seq: 1,
            boot_id: BOOT,
        }]);
        let deadline = rig.queue(dev).reboot_deadline_ms;
        assert_eq!(deadline, rig.now + 5_000);
        // `run` steps the rig's clock by 10 ms before processing.
        rig.now = deadline - 11;
        rig.run(vec![]);
        assert_eq!(rig.queue(dev).status, QueueStatus::Rebooting);
        rig.now = deadline - 10;
        rig.run(vec![]);
        let q = rig.queue(dev);
        assert_eq!(
            (q.status, q.failure),
            (
                QueueStatus::Failed,
                Some(store::FailReason::RebootDeadlineMissed)
            )
        );
    }

    /// A device that never reported (no earlier report to compare with) cannot complete a
    /// reboot on the boot it left: the one `RebootStarting` named, or, when that was lost, the
    /// boot of the session the command went out on.
    #[test]
    fn a_reboot_completion_on_the_boot_left_is_refused_before_any_report() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        rig.hello(2, dev, key, None);
        add(
            &mut rig,
            "n1",
            vec![vec![wire::Step::Reboot], vec![wire::Step::Reboot]],
        );
        assert_eq!(stored_report(&rig, dev), None);
        let complete = |conn, seq, boot: [u8; 16]| Input::RebootComplete {
            conn,
            device: dev,
            seq,
            attempt: 1,
            report: report_with("Debian", boot),
            result: ok_result(1),
        };
        rig.run(vec![Input::RebootStarting {
            conn: 2,
            device: dev,
            seq: 1,
            boot_id: BOOT,
        }]);
        let a = rig.run(vec![complete(2, 1, BOOT)]);
        assert!(dispatched(&a).is_empty(), "{a:?}");
        assert_eq!(rig.queue(dev).status, QueueStatus::Rebooting);
        assert_eq!(
            events_with(&mut rig, "came back with the boot id it had before"),
            1
        );
        let a = rig.run(vec![complete(2, 1, [0xB1; 16])]);
        assert_eq!(dispatched(&a), vec![2], "{a:?}");

        // Command 2's RebootStarting is lost (the gateway died): the completion still has to
        // come from another boot than the session's it was sent on (BOOT).
        rig.restart();
        let a = rig.hello(3, dev, key, last(2, 1, None));
        assert!(dispatched(&a).is_empty(), "{a:?}");
        let a = rig.run(vec![complete(3, 2, BOOT)]);
        assert_eq!(rig.queue(dev).status, QueueStatus::AwaitingResult, "{a:?}");
        assert_eq!(
            events_with(&mut rig, "came back with the boot id it had before"),
            2
        );
    }
}
