//! Sessions: what becomes of a device's results, and which command goes to it next.

use super::*;

impl Fleet {
    pub(super) fn next_dispatch(
        b: &mut dyn StoreBatch,
        online: &mut HashMap<DeviceId, Online>,
        now_ms: u64,
        dev: DeviceId,
    ) -> Option<Action> {
        let o = online.get_mut(&dev)?;
        if o.in_flight.is_some() {
            return None;
        }
        let q = b.queue(dev).ok()??;
        // The command in flight with no session executing it: the agent's `Hello` proved it
        // never received this attempt (e.g. the gateway died between commit and send), so it
        // goes again as the same attempt, not counted. Otherwise the next pending command (or
        // the same one again, retried), as a new attempt.
        let (seq, cmd, sent) = match (q.status, q.cursor) {
            (QueueStatus::AwaitingResult, Some(c)) => {
                (c, b.command(dev, c).ok()??, b.redeliver(dev, c, now_ms))
            }
            (QueueStatus::Running | QueueStatus::Idle | QueueStatus::Done, _) => {
                let (seq, cmd) = b.next_to_dispatch(dev).ok()??;
                (seq, cmd, b.mark_transmitted(dev, seq, now_ms))
            }
            _ => return None,
        };
        // A reboot must come back on another boot than this session's, even if the device's
        // `RebootStarting` never reaches the store.
        let sent = sent.and_then(|attempt| {
            if cmd.has_reboot() {
                b.boot_at_dispatch(dev, seq, &o.boot_id)?;
            }
            Ok(attempt)
        });
        match sent {
            Ok(attempt) => {
                o.in_flight = Some(seq);
                let message = match attempt {
                    0 | 1 => format!("command {seq}"),
                    n => format!("command {seq} attempt {n}"),
                };
                let _ = b.append_event(event(now_ms, Some(dev), EventKind::CommandSent, message));
                Some(Action::Dispatch {
                    conn: o.conn,
                    command_id: command_id(dev, seq),
                    seq,
                    attempt,
                    cmd,
                })
            }
            Err(e) if illegal_status(&e) => None,
            Err(e) => {
                tracing::warn!(device = dev.0, seq, error = %e, "dispatch refused by the store");
                None
            }
        }
    }
}

/// What became of a device's result ([`store_result`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored {
    /// Stored, or discarded as obsolete (with an event saying why): the agent may forget it.
    Answered,
    /// A result of a command never sent to the device: a protocol error.
    NeverSent,
    /// The store failed; the batch will not commit.
    Failed,
}

/// Stores a device's result of attempt `attempt` of `seq` (with an event), and the
/// configuration report it carries, in the same batch; or, when the queue no longer wants it
/// — the command was cancelled, the attempt was superseded by a retry, the queue gave up on
/// it — records why it was discarded. `how` says how it arrived, for the event (empty: on its
/// session).
pub(super) fn store_result(
    b: &mut dyn StoreBatch,
    now_ms: u64,
    dev: DeviceId,
    seq: u64,
    attempt: u32,
    result: &store::Received,
    how: &str,
) -> Stored {
    let how = if how.is_empty() {
        String::new()
    } else {
        format!("{how}; ")
    };
    let message = match b.record_result(dev, seq, attempt, result.clone()) {
        Ok(store::Recorded::Stored(status)) => format!(
            "command {seq} {} ({how}queue {status})",
            if result.succeeded() {
                "succeeded"
            } else {
                "failed"
            }
        ),
        Ok(store::Recorded::Duplicate) => return Stored::Answered,
        Err(store::Error::IllegalTransition { kind, .. }) => {
            let q = b.queue(dev).ok().flatten().unwrap_or_default();
            let exists = b.command(dev, seq).ok().flatten().is_some();
            let why = match kind {
                Illegal::NotTransmitted { .. } if exists || seq >= q.next_seq => {
                    tracing::warn!(device = dev.0, seq, "result of a command never sent");
                    return Stored::NeverSent;
                }
                _ if !exists => {
                    format!("result of cancelled command {seq} discarded ({how}attempt {attempt})")
                }
                Illegal::StaleAttempt { current, .. } => format!(
                    "result of command {seq} attempt {attempt} discarded ({how}attempt \
                     {current} is the current one)"
                ),
                Illegal::ConflictingResult { .. } => {
                    format!("a second result of command {seq} discarded ({how}attempt {attempt})")
                }
                kind => {
                    format!("result of command {seq} attempt {attempt} discarded ({how}{kind:?})")
                }
            };
            tracing::info!(device = dev.0, seq, attempt, "{why}");
            let _ = b.append_event(event(now_ms, Some(dev), EventKind::Other, why));
            return Stored::Answered;
        }
        Err(e) => {
            tracing::warn!(device = dev.0, seq, error = %e, "result not stored");
            return Stored::Failed;
        }
    };
    let _ = b.append_event(event(now_ms, Some(dev), EventKind::CommandResult, message));
    if let Some(report) = &result.result.report {
        if let Err(e) = b.set_report(dev, report.clone(), now_ms) {
            tracing::warn!(device = dev.0, seq, error = %e, "report of a result not stored");
        }
    }
    Stored::Answered
}

/// What a `Welcome` tells `device` is pending (and `fleetcast status` shows): the commands
/// the gateway is to send it, the one in flight included (none while its queue is paused or
/// stopped on a failure: nothing comes until an operator acts), and the tasks it has not
/// completed (pending or in progress; not failed or cancelled ones). The agent polls at once
/// while either is non-zero (see the agent's `driver::Pending`).
pub(super) fn pending_actions(
    b: &dyn StoreBatch,
    device: DeviceId,
    q: &store::QueueState,
) -> (u32, u32) {
    let commands = match q.status {
        QueueStatus::Paused | QueueStatus::Failed => 0,
        _ => q
            .next_seq
            .saturating_sub(1)
            .saturating_sub(q.completed_through),
    };
    // A store error counts nothing: the count only hurries the agent, it is never trusted.
    let transfers = b.incomplete_tasks(device).map_or(0, |t| t.len());
    (
        u32::try_from(commands).unwrap_or(u32::MAX),
        u32::try_from(transfers).unwrap_or(u32::MAX),
    )
}

impl Cx<'_> {
    /// An authenticated agent said hello: welcome it, with what it carries and what it missed.
    pub(super) fn hello(
        &mut self,
        conn: ConnId,
        device: DeviceId,
        key_hash: &[u8; 32],
        boot_id: &[u8; 16],
        last: &Option<LastSeen>,
        transport: Option<store::Transport>,
    ) {
        if !self.admit(conn, device, key_hash) {
            return;
        }
        let now_ms = self.now_ms;
        let Cx {
            b,
            cfg,
            online,
            actions,
            dirty,
            cell,
            ..
        } = self;
        if let Some(old) = online.remove(&device) {
            actions.push(close(
                old.conn,
                CloseCode::NORMAL,
                "replaced by a newer session",
            ));
        }
        let _ = b.device_seen(
            device,
            now_ms,
            Some(transport.unwrap_or(store::Transport::Native)),
        );
        let _ = b.append_event(event(
            now_ms,
            Some(device),
            EventKind::Connected,
            match cell {
                Some(gw) => format!("session {conn} on gateway {gw}"),
                None => format!("session {conn}"),
            },
        ));
        // A result the agent still holds: store it (or, when it is obsolete, tell why
        // it is not); either way the agent may forget it, acknowledged below.
        if let Some(LastSeen {
            seq,
            attempt,
            result: Some(result),
            ..
        }) = last
        {
            // Acknowledged whatever became of it: an agent re-sending it in every Hello
            // would hold its session's command slot forever.
            let how = format!("delivered on reconnect, attempt {attempt}");
            let _ = store_result(&mut **b, now_ms, device, *seq, *attempt, result, &how);
        }
        let q = b.queue(device).ok().flatten().unwrap_or_default();
        let (in_flight, resume) = match last {
            Some(l) if l.executing && l.seq > q.completed_through => {
                // The agent is still executing it, or back from its reboot: this session
                // carries its answer, and nothing else goes to it until then. An attempt
                // the queue has given up on (retried, cancelled) is answered too, and
                // its result discarded.
                let reboot = b
                    .command(device, l.seq)
                    .ok()
                    .flatten()
                    .is_none_or(|c| c.has_reboot());
                (
                    Some(l.seq),
                    Some((l.seq, l.attempt, command_id(device, l.seq), reboot)),
                )
            }
            _ => (None, None),
        };
        // A carried result the welcome does not acknowledge (a failure that stopped
        // the queue, an obsolete attempt) is acknowledged on its own.
        let ack = last
            .as_ref()
            .filter(|l| l.result.is_some() && l.seq > q.completed_through)
            .map(|l| l.seq);
        let (pending_commands, pending_transfers) = pending_actions(&**b, device, &q);
        actions.push(Action::Welcome {
            conn,
            welcome: Welcome {
                session_id: conn,
                server_time_ms: now_ms,
                heartbeat_ms: cfg.heartbeat_ms,
                acked_seq: q.completed_through,
                pending_commands,
                pending_transfers,
            },
            resume,
        });
        if let Some(seq) = ack {
            actions.push(Action::Ack { conn, seq });
        }
        // No announce here: the device's task finisher asks for every task it holds or
        // misses after the welcome (`TaskAsk`, `finisher.rs`), and is served from the table.
        online.insert(
            device,
            Online {
                conn,
                in_flight,
                boot_id: hex(boot_id),
                asked: BTreeSet::new(),
            },
        );
        dirty.insert(device);
    }

    /// Whether `device` may open a session with the key `key_hash`; if not, its connection is
    /// closed with the reason.
    fn admit(&mut self, conn: ConnId, device: DeviceId, key_hash: &[u8; 32]) -> bool {
        // In a cell, the session's batch takes the device first: every write for it below
        // is fenced by that ownership.
        match self.b.claim(device) {
            Ok(store::Claimed::Ours) => {}
            Ok(store::Claimed::Elsewhere { gateway, addr }) => {
                tracing::debug!(device = device.0, %gateway, %addr, "device owned elsewhere: redirected");
                return self.refuse(close(conn, CloseCode::REDIRECT, &addr));
            }
            // Our lease lapsed: the next renewal joins the cell again. Retry later.
            Err(e @ store::Error::LeaseLost { .. }) => {
                return self.refuse(close(conn, CloseCode::OVERLOADED, &e.to_string()))
            }
            Err(store::Error::NotFound(_)) => {
                return self.refuse(close(
                    conn,
                    CloseCode::UNKNOWN_DEVICE,
                    "device is not enrolled",
                ))
            }
            Err(e) => return self.refuse(close(conn, CloseCode::INTERNAL, &e.to_string())),
        }
        let dev = match self.b.device(device) {
            Ok(Some(d)) => d,
            Ok(None) => {
                return self.refuse(close(
                    conn,
                    CloseCode::UNKNOWN_DEVICE,
                    "device is not enrolled",
                ))
            }
            Err(e) => return self.refuse(close(conn, CloseCode::INTERNAL, &e.to_string())),
        };
        if dev.revoked {
            return self.refuse(close(
                conn,
                CloseCode::REVOKED,
                "device was revoked by the operator",
            ));
        }
        if dev.credential_hash != *key_hash {
            return self.refuse(close(
                conn,
                CloseCode::UNAUTHENTICATED,
                "certificate key does not match the enrolled key",
            ));
        }
        // A device re-homed here from another gateway brings its deadline (a command
        // in flight, a reboot): this gateway fires it from now on. The heap ignores an entry
        // the queue no longer waits on, so a second one for a device that never left is
        // harmless.
        if self.cell.is_none() {
            return true;
        }
        if let Ok(Some(q)) = self.b.queue(device) {
            if let Ok(Some((at, what))) = deadline_of(&*self.b, self.cfg, device, &q) {
                self.armed.push((at, device, what));
            }
        }
        true
    }

    /// Refuses a session with `close`: `false`, for [`Cx::admit`].
    fn refuse(&mut self, close: Action) -> bool {
        self.actions.push(close);
        false
    }

    /// A new device presents an enrolment token: certify its key.
    pub(super) fn enrol(&mut self, conn: ConnId, token: &[u8], name: &str, spki: &[u8]) {
        let now_ms = self.now_ms;
        let Cx {
            b,
            pki,
            actions,
            recent_enrolments,
            ..
        } = self;
        let token_hash = sha256(token);
        let key_hash = sha256(spki);
        let repeated = recent_enrolments.get(&token_hash).and_then(|(id, _)| {
            let d = b.device(*id).ok().flatten()?;
            (d.credential_hash == key_hash && !d.revoked).then_some(*id)
        });
        let id = match b.enrol(token_hash, key_hash, now_ms) {
            Ok(id) => {
                recent_enrolments.insert(token_hash, (id, now_ms));
                id
            }
            Err(store::Error::NotFound(_)) => match repeated {
                Some(id) => {
                    tracing::info!(device = id.0, "enrolment repeated: certificate sent again");
                    id
                }
                None => {
                    return actions.push(close(
                        conn,
                        CloseCode::BAD_TOKEN,
                        "unknown, used or expired enrolment token",
                    ))
                }
            },
            Err(e) => return actions.push(close(conn, CloseCode::BAD_TOKEN, &e.to_string())),
        };
        let stored_name = b
            .device(id)
            .ok()
            .flatten()
            .map(|d| d.name)
            .unwrap_or_default();
        if stored_name != *name {
            tracing::info!(device = id.0, claimed = %name, name = %stored_name, "device enrolled under the token's name");
        }
        match pki.issue_device_cert(id.0, &stored_name, spki, wall(now_ms)) {
            Ok(cert) => {
                let _ = b.append_event(event(
                    now_ms,
                    Some(id),
                    EventKind::Enrolled,
                    format!("enrolled as {stored_name}"),
                ));
                actions.push(Action::Enrolled {
                    conn,
                    device: id,
                    cert: cert.to_vec(),
                });
                // Its groups' following tasks: served once it connects (its finisher asks).
                if let Err(e) = self.follow_enrolled(id) {
                    tracing::warn!(device = id.0, error = %e, "following tasks not joined");
                }
                // In a cell, the device settles on the gateway its agent prefers: the first
                // one it says hello to takes it.
                if let Err(e) = self.b.release(id) {
                    tracing::warn!(device = id.0, error = %e, "enrolled device not released");
                }
            }
            Err(e) => {
                // The batch must not keep the enrolment: refuse the whole connection;
                // the token was consumed only if the batch commits, so abort is not
                // available per operation — record the failure visibly instead.
                let _ = b.append_event(event(
                    now_ms,
                    Some(id),
                    EventKind::Other,
                    format!("certificate issue failed: {e}"),
                ));
                actions.push(close(
                    conn,
                    CloseCode::UNAUTHENTICATED,
                    &format!("cannot certify this key: {e}"),
                ));
            }
        }
    }

    /// A command's result: acknowledged once stored.
    pub(super) fn result(
        &mut self,
        conn: ConnId,
        device: DeviceId,
        seq: u64,
        attempt: u32,
        result: &store::Received,
    ) {
        let now_ms = self.now_ms;
        let Cx {
            b,
            online,
            actions,
            dirty,
            ..
        } = self;
        match store_result(&mut **b, now_ms, device, seq, attempt, result, "") {
            Stored::Answered => actions.push(Action::Ack { conn, seq }),
            Stored::NeverSent => actions.push(close(
                conn,
                CloseCode::PROTOCOL,
                &format!("result of command {seq}, which was never sent"),
            )),
            Stored::Failed => actions.push(close(
                conn,
                CloseCode::INTERNAL,
                &format!("result of command {seq} not stored"),
            )),
        }
        if let Some(o) = online.get_mut(&device) {
            if o.in_flight == Some(seq) {
                o.in_flight = None;
            }
        }
        dirty.insert(device);
    }

    /// The agent's configuration report on its own.
    pub(super) fn report(&mut self, device: DeviceId, report: &wire::ConfigReport<'static>) {
        let now_ms = self.now_ms;
        let Cx { b, .. } = self;
        if let Err(e) = b.set_report(device, report.clone(), now_ms) {
            tracing::warn!(device = device.0, error = %e, "report not stored");
        }
    }

    /// A session ended.
    pub(super) fn disconnected(&mut self, conn: ConnId, device: Option<&DeviceId>, reason: &str) {
        let now_ms = self.now_ms;
        let Cx { b, online, .. } = self;
        if let Some(dev) = device {
            if online.get(dev).is_some_and(|o| o.conn == conn) {
                online.remove(dev);
                let _ = b.append_event(event(
                    now_ms,
                    Some(*dev),
                    EventKind::Disconnected,
                    reason.to_string(),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Hello, enrolment, results and reports.

    use crate::fleet::rig::*;
    use crate::fleet::*;

    /// A gateway whose cell lease may have lapsed closes its sessions and refuses new ones
    /// at once, without opening a batch (which would wait out the database's timeouts while
    /// the agents could be moving to another gateway); renewed, it serves again.
    #[test]
    fn a_lapsed_lease_refuses_sessions_at_once_without_a_batch() {
        let (mut rig, lease) = Rig::in_cell();
        let (dev, key) = rig.enrol("n1", 1);
        let a = rig.hello(2, dev, key, None);
        assert!(
            !a.iter().any(|a| matches!(a, Action::Close { .. })),
            "{a:?}"
        );
        assert_eq!(rig.fleet.online(), 1);

        lease.set_lapsed(true);
        let before = lease.batches();
        let a = rig.run(vec![]);
        assert!(
            matches!(
                &a[..],
                [Action::Close {
                    conn: 2,
                    code: CloseCode::OVERLOADED,
                    ..
                }]
            ),
            "{a:?}"
        );
        assert_eq!(rig.fleet.online(), 0);
        // The agent comes back while the lease is still lapsed.
        let a = rig.hello(3, dev, key, None);
        assert!(
            matches!(
                &a[..],
                [Action::Close {
                    conn: 3,
                    code: CloseCode::OVERLOADED,
                    ..
                }]
            ),
            "{a:?}"
        );
        let a = rig.run(vec![Input::Admin {
            conn: 999,
            req: Request::QueueShow {
                device: "n1".into(),
            },
        }]);
        assert!(
            matches!(&a[..], [Action::Reply { resp, .. }] if !resp.ok),
            "{a:?}"
        );
        assert_eq!(
            lease.batches(),
            before,
            "a batch was opened on a lapsed lease"
        );

        lease.set_lapsed(false);
        let a = rig.hello(4, dev, key, None);
        assert!(
            !a.iter().any(|a| matches!(a, Action::Close { .. })),
            "{a:?}"
        );
        assert_eq!(rig.fleet.online(), 1);
        assert!(lease.batches() > before);
    }

    #[test]
    fn unknown_device_and_bad_token_are_refused_with_reasons() {
        let mut rig = Rig::new();
        let a = rig.hello(1, DeviceId(77), [0; 32], None);
        assert!(
            matches!(
                &a[..],
                [Action::Close {
                    code: CloseCode::UNKNOWN_DEVICE,
                    ..
                }]
            ),
            "{a:?}"
        );
        let a = rig.run(vec![Input::Enrol {
            conn: 2,
            token: b"nope".to_vec(),
            name: "x".into(),
            spki: vec![1],
        }]);
        assert!(
            matches!(
                &a[..],
                [Action::Close {
                    code: CloseCode::BAD_TOKEN,
                    ..
                }]
            ),
            "{a:?}"
        );
    }

    #[test]
    fn a_token_enrols_once() {
        let mut rig = Rig::new();
        let r = rig.admin(Request::DeviceAdd {
            name: "n1".into(),
            groups: vec![],
        });
        let token = r.data["token"].as_str().unwrap().as_bytes().to_vec();
        let spki = device_spki();
        let a = rig.run(vec![Input::Enrol {
            conn: 1,
            token: token.clone(),
            name: "n1".into(),
            spki: spki.clone(),
        }]);
        let first = match &a[..] {
            [Action::Enrolled { device, .. }] => *device,
            other => panic!("{other:?}"),
        };
        // The token again with another key: refused.
        let other = device_spki();
        let a = rig.run(vec![Input::Enrol {
            conn: 2,
            token: token.clone(),
            name: "n1".into(),
            spki: other,
        }]);
        assert!(
            matches!(
                &a[..],
                [Action::Close {
                    code: CloseCode::BAD_TOKEN,
                    ..
                }]
            ),
            "{a:?}"
        );
        // The same token and key again (its `Enrolled` was lost): the same device, certified
        // again; no second device.
        let a = rig.run(vec![Input::Enrol {
            conn: 4,
            token: token.clone(),
            name: "n1".into(),
            spki: spki.clone(),
        }]);
        assert!(
            matches!(&a[..], [Action::Enrolled { device, .. }] if *device == first),
            "{a:?}"
        );
        // Once the repeat window has passed: refused.
        rig.now += ENROL_REPEAT_MS;
        let a = rig.run(vec![Input::Enrol {
            conn: 5,
            token,
            name: "n1".into(),
            spki,
        }]);
        assert!(
            matches!(
                &a[..],
                [Action::Close {
                    code: CloseCode::BAD_TOKEN,
                    ..
                }]
            ),
            "{a:?}"
        );
        // A key other than the enrolled one is refused.
        let dev = rig
            .fleet
            .store()
            .snapshot()
            .unwrap()
            .device_by_name("n1")
            .unwrap()
            .unwrap()
            .id;
        let a = rig.hello(3, dev, [9; 32], None);
        assert!(
            matches!(
                &a[..],
                [Action::Close {
                    code: CloseCode::UNAUTHENTICATED,
                    ..
                }]
            ),
            "{a:?}"
        );
    }

    #[test]
    fn next_command_goes_only_after_the_result_is_stored() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        let a = rig.hello(2, dev, key, None);
        assert!(
            matches!(&a[..], [Action::Welcome { resume: None, .. }]),
            "{a:?}"
        );
        let a = add(&mut rig, "n1", vec![exec("a"), exec("b"), exec("c")]);
        assert_eq!(dispatched(&a), vec![1], "one command in flight: {a:?}");
        for seq in 1..=3u64 {
            assert_eq!(rig.queue(dev).cursor, Some(seq));
            let a = rig.run(vec![Input::Result {
                conn: 2,
                device: dev,
                seq,
                attempt: 1,
                result: ok_result(1),
            }]);
            // The ack and the next dispatch leave together, after the commit.
            assert!(
                matches!(a[0], Action::Ack { seq: s, .. } if s == seq),
                "{a:?}"
            );
            assert_eq!(dispatched(&a), if seq < 3 { vec![seq + 1] } else { vec![] });
        }
        assert_eq!(rig.queue(dev).status, QueueStatus::Done);
        // The event log names queue states as operators see them, not as Rust debug text.
        let last = {
            let snap = rig.fleet.store().snapshot().unwrap();
            let events = snap.events_from(0, 100).unwrap();
            events.last().expect("events").1.message.clone()
        };
        assert!(last.ends_with("(queue done)"), "{last}");
        // A result for a command that was never sent closes the session.
        let a = rig.run(vec![Input::Result {
            conn: 2,
            device: dev,
            seq: 9,
            attempt: 1,
            result: ok_result(1),
        }]);
        assert!(
            a.iter().any(|x| matches!(
                x,
                Action::Close {
                    code: CloseCode::PROTOCOL,
                    ..
                }
            )),
            "{a:?}"
        );
    }

    #[test]
    fn reconnect_resumes_redelivers_or_takes_the_result_from_hello() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        rig.hello(2, dev, key, None);
        add(&mut rig, "n1", vec![exec("a"), exec("b"), exec("c")]);
        rig.run(vec![Input::Disconnected {
            conn: 2,
            device: Some(dev),
            reason: "cut".into(),
        }]);
        // The agent never got command 1 (its Hello names nothing): redelivered, not counted.
        let a = rig.hello(3, dev, key, None);
        assert_eq!(dispatched(&a), vec![1]);
        assert_eq!(rig.queue(dev).attempts, 1);
        rig.run(vec![Input::Disconnected {
            conn: 3,
            device: Some(dev),
            reason: "cut".into(),
        }]);
        // The agent is still executing command 1: the new session resumes it, sends nothing.
        let a = rig.hello(4, dev, key, last(1, 1, None));
        assert!(
            matches!(
                &a[..],
                [Action::Welcome {
                    resume: Some((1, 1, _, false)),
                    ..
                }]
            ),
            "{a:?}"
        );
        rig.run(vec![Input::Disconnected {
            conn: 4,
            device: Some(dev),
            reason: "cut".into(),
        }]);
        // The agent finished command 1 while disconnected: its Hello carries the result, the
        // Welcome acknowledges it, and command 2 follows.
        let a = rig.hello(5, dev, key, last(1, 1, Some(ok_result(1))));
        match &a[..] {
            [Action::Welcome {
                welcome,
                resume: None,
                ..
            }, Action::Dispatch { seq: 2, .. }] => {
                assert_eq!(welcome.acked_seq, 1)
            }
            other => panic!("{other:?}"),
        }
    }

    /// A retry is a new attempt of the same command, also after a gateway restart; the
    /// agent's `Hello` tells a redelivery of that attempt from one still running, and only
    /// the current attempt's result counts.
    #[test]
    fn a_retry_is_a_new_attempt_and_only_its_result_counts() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        rig.hello(2, dev, key, None);
        let a = add(&mut rig, "n1", vec![exec("a"), exec("b")]);
        assert_eq!(attempt_of(&a, 1), Some(1), "{a:?}");
        let a = rig.run(vec![result_input(2, dev, 1, 1, false)]);
        assert!(matches!(a[..], [Action::Ack { seq: 1, .. }]), "{a:?}");
        assert_eq!(rig.queue(dev).status, QueueStatus::Failed);
        let a = rig.run(vec![Input::Admin {
            conn: 999,
            req: Request::QueueRetry {
                device: "n1".into(),
            },
        }]);
        assert_eq!(attempt_of(&a, 1), Some(2), "the retry is attempt 2: {a:?}");
        rig.run(vec![Input::Disconnected {
            conn: 2,
            device: Some(dev),
            reason: "cut".into(),
        }]);

        // The device never got attempt 2 and re-sends a result of attempt 1 (one the gateway
        // has not got byte for byte): not attempt 2's, so it is discarded (and acknowledged,
        // so the agent can forget it), and attempt 2 goes again.
        let mut again = failed_result();
        again.result.output = b"attempt 1 once more".into();
        let a = rig.hello(3, dev, key, last(1, 1, Some(again)));
        assert!(matches!(a[1], Action::Ack { conn: 3, seq: 1 }), "{a:?}");
        assert_eq!(attempt_of(&a, 1), Some(2), "{a:?}");
        assert_eq!(events_with(&mut rig, "attempt 2 is the current one"), 1);
        rig.run(vec![Input::Disconnected {
            conn: 3,
            device: Some(dev),
            reason: "cut".into(),
        }]);

        // The gateway restarts before the device got attempt 2: its Hello names attempt 1,
        // done, so attempt 2 is redelivered, still attempt 2 and not counted again.
        rig.restart();
        let done = last(1, 1, None).map(|l| LastSeen {
            executing: false,
            ..l
        });
        let a = rig.hello(4, dev, key, done);
        assert_eq!(attempt_of(&a, 1), Some(2), "{a:?}");
        assert_eq!((rig.queue(dev).attempts, rig.queue(dev).attempt), (1, 2));
        rig.run(vec![Input::Disconnected {
            conn: 4,
            device: Some(dev),
            reason: "cut".into(),
        }]);

        // Another reconnect, the device now running attempt 2: resumed, nothing sent.
        let a = rig.hello(5, dev, key, last(1, 2, None));
        assert!(
            matches!(
                &a[..],
                [Action::Welcome {
                    resume: Some((1, 2, _, false)),
                    ..
                }]
            ),
            "{a:?}"
        );
        let a = rig.run(vec![result_input(5, dev, 1, 2, true)]);
        assert_eq!(attempt_of(&a, 2), Some(1), "{a:?}");
    }

    /// A result carried by `Hello` that stopped the queue is not covered by
    /// `Welcome.acked_seq`: it is acknowledged on its own, or the agent would re-send it
    /// forever and its session's command slot would never free (a retry could not be sent).
    #[test]
    fn a_hello_result_that_fails_the_queue_is_acknowledged() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        rig.hello(2, dev, key, None);
        add(&mut rig, "n1", vec![exec("a")]);
        rig.run(vec![Input::Disconnected {
            conn: 2,
            device: Some(dev),
            reason: "cut".into(),
        }]);
        let a = rig.hello(3, dev, key, last(1, 1, Some(failed_result())));
        match &a[..] {
            [Action::Welcome { welcome, .. }, Action::Ack { conn: 3, seq: 1 }] => {
                assert_eq!(welcome.acked_seq, 0)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rig.queue(dev).status, QueueStatus::Failed);
    }

    /// Reports reach the device record without a reboot: on their own (after the agent
    /// starts), inside a `report` step's result, and inside a result carried by `Hello`.
    #[test]
    fn reports_are_stored_from_report_messages_and_results() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        rig.hello(2, dev, key, None);
        assert_eq!(stored_report(&rig, dev), None);
        rig.run(vec![Input::Report {
            conn: 2,
            device: dev,
            report: report_with("Debian 12", boot_named("b1")),
        }]);
        assert_eq!(stored_report(&rig, dev).unwrap().os, "Debian 12");

        add(
            &mut rig,
            "n1",
            vec![vec![wire::Step::Report], vec![wire::Step::Report]],
        );
        let a = rig.run(vec![Input::Result {
            conn: 2,
            device: dev,
            seq: 1,
            attempt: 1,
            result: with_report(ok_result(1), report_with("Debian 13", boot_named("b1"))),
        }]);
        assert!(matches!(a[0], Action::Ack { seq: 1, .. }), "{a:?}");
        assert_eq!(stored_report(&rig, dev).unwrap().os, "Debian 13");

        rig.run(vec![Input::Disconnected {
            conn: 2,
            device: Some(dev),
            reason: "cut".into(),
        }]);
        let report = report_with("Debian 14", boot_named("b1"));
        let carried = last(2, 1, Some(with_report(ok_result(1), report)));
        rig.hello(3, dev, key, carried);
        assert_eq!(rig.queue(dev).status, QueueStatus::Done);
        assert_eq!(stored_report(&rig, dev).unwrap().os, "Debian 14");
    }
}
