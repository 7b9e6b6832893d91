//! Applying the fleet's actions: to the distributor (pushes to prepare, tasks, transfers),
//! to an admin connection (a reply), or to an agent's session core (welcome, dispatch,
//! close, announce). The loop routes; the fleet decided.

use super::*;

impl Gateway {
    pub(super) fn lookup(&self, id: ConnId) -> Option<usize> {
        let idx = (id & 0xffff_ffff) as usize;
        self.conns.get(idx).filter(|s| s.id == id).map(|_| idx)
    }

    pub(super) fn apply(&mut self, action: Action, now: Instant) {
        let action = match action {
            Action::PreparePush { origin, spec } => return self.prepare_push(origin, spec),
            other => other,
        };
        match &action {
            Action::TaskCreated {
                origin,
                task,
                targets,
            } => {
                if let Some(d) = self.mcast.dist.as_mut() {
                    d.task_created(*origin, *task, targets, now);
                }
                return;
            }
            Action::PushRefused { origin } => {
                if let Some(d) = self.mcast.dist.as_mut() {
                    d.drop_prepared(*origin);
                }
                return;
            }
            Action::TransferDone {
                device,
                task,
                verified,
                ..
            } => {
                if let Some(d) = self.mcast.dist.as_mut() {
                    d.transfer_done(*task, *device, *verified);
                }
                return;
            }
            Action::Dispatch { .. } => self.telemetry.counters.dispatched += 1,
            // Only failed enrolments count against their source.
            Action::Enrolled { conn, .. } => {
                if let Some(Slot {
                    conn: Conn::Agent(c),
                    ..
                }) = self.lookup(*conn).and_then(|i| self.conns.get(i))
                {
                    self.limits.enrol.refund(c.peer);
                }
            }
            _ => {}
        }
        let Some(conn_id) = action.conn() else {
            return;
        };
        // The announce is built before the session is borrowed (it may re-create a sender
        // from the task table).
        let announce = match &action {
            Action::Announce { device, task, .. } => {
                // The device's repairs are bound to the address of the session the announce
                // goes over (its NACK key travels in it).
                let peer = match self.lookup(conn_id).map(|i| &self.conns[i].conn) {
                    Some(Conn::Agent(c)) => c.tls.sock.peer_addr().ok().map(|a| a.ip()),
                    _ => None,
                };
                let Some(d) = self.mcast.dist.as_mut() else {
                    tracing::warn!(
                        task = task.0,
                        "task not announced: multicast is off (--mcast-addr)"
                    );
                    return;
                };
                let (fleet, task_id) = (&self.fleet, *task);
                // The row and the targets still to serve, should the task's sender have to
                // be re-created (after a restart).
                let row = || fleet.call(move |f| task_to_recreate(f, task_id));
                match d.announce_for(*task, *device, peer, row, (now, self.wall_ms)) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        tracing::warn!(task = task.0, device = device.0, error = %e, "task not announced");
                        return;
                    }
                }
            }
            _ => None,
        };
        let Some(idx) = self.lookup(conn_id) else {
            return;
        };
        match (&mut self.conns[idx].conn, action) {
            (Conn::Admin(a), Action::Reply { resp, .. }) => {
                push_json_line(&mut a.out, &resp);
                self.work.touched.push(idx);
                return;
            }
            (Conn::Agent(c), action) => {
                let Some(s) = c.session.as_mut() else { return };
                let r = match action {
                    Action::Welcome {
                        welcome, resume, ..
                    } => s.accept(&welcome).and_then(|()| match resume {
                        Some((seq, attempt, command_id, reboot)) => {
                            s.resume_in_flight(seq, attempt, command_id, reboot)
                        }
                        None => Ok(()),
                    }),
                    Action::Enrolled { device, cert, .. } => s.send_enrolled(&Enrolled {
                        device_id: device.0,
                        certificate: Cow::Borrowed(&cert),
                    }),
                    Action::Ack { seq, .. } => s.ack_result(seq),
                    Action::Dispatch {
                        command_id,
                        seq,
                        attempt,
                        cmd,
                        ..
                    } => {
                        let base = self
                            .cfg
                            .artifacts
                            .as_ref()
                            .and_then(|a| a.base_url.as_deref());
                        send_dispatch(s, base, command_id, seq, attempt, &cmd)
                    }
                    Action::Close { code, reason, .. } => s.close(code, &reason),
                    Action::Announce { .. } => match &announce {
                        Some(a) => s.announce(a),
                        None => Ok(()),
                    },
                    Action::TaskAnswer { answer, .. } => s.send_task_answer(&answer),
                    Action::Reply { .. }
                    | Action::PreparePush { .. }
                    | Action::PushRefused { .. }
                    | Action::TaskCreated { .. }
                    | Action::TransferDone { .. } => Ok(()),
                };
                if let Err(e) = r {
                    tracing::warn!(conn = conn_id, error = %e, "session refused a fleet action");
                }
            }
            (Conn::Admin(_), _) | (Conn::Artifact(_), _) | (Conn::Relay(_), _) => return,
        }
        self.drain_session(idx, now);
    }
}

/// Sends a command to its session core, `gateway:NAME` fetch URLs resolved against `base`.
fn send_dispatch(
    s: &mut GatewaySession,
    base: Option<&str>,
    command_id: u64,
    seq: u64,
    attempt: u32,
    cmd: &fleetcast_store::Command,
) -> Result<(), session::SessionError> {
    // The stored steps, borrowed; only a fetch URL resolved against `base` is new text.
    let steps = cmd
        .steps
        .iter()
        .map(|st| match st {
            Step::Fetch { url, path } => Step::Fetch {
                url: Cow::Owned(artifacts::resolve_url(url, base)),
                path: Cow::Borrowed(path),
            },
            other => other.borrowed(),
        })
        .collect();
    let timeout_ms = u32::try_from(cmd.timeout_ms).unwrap_or(u32::MAX);
    s.dispatch(&Dispatch {
        command_id,
        seq,
        attempt,
        timeout_ms,
        steps,
        target: cmd.target.clone(),
    })
}

/// A task's row and its targets still pending or in progress, from a snapshot (`None`: no
/// such task, or the store failed: the announce is not sent, and logged).
fn task_to_recreate(
    f: &crate::fleet::Fleet,
    task: fleetcast_store::TaskId,
) -> Option<(fleetcast_store::Task, Vec<fleetcast_store::DeviceId>)> {
    use fleetcast_store::TaskDeviceStatus::{InProgress, Pending};
    let snap = f.store().snapshot().ok()?;
    let t = snap.task(task).ok()??;
    let pending = snap
        .task_statuses(task)
        .ok()?
        .into_iter()
        .filter(|(_, st)| matches!(st, Pending | InProgress(_)))
        .map(|(dev, _)| dev)
        .collect();
    Some((t, pending))
}
