//! Operator requests: devices, groups, queues, status and events.

use super::*;

/// Validated queue commands from their admin form: every command has a step, and a
/// `reboot` only as its last step.
pub fn commands_from_specs(
    commands: &[Vec<StepSpec>],
    timeout_ms: u64,
    max_attempts: u32,
    on_failure: OnFailureSpec,
) -> Result<Vec<Command>, String> {
    let mut cmds = Vec::new();
    for steps in commands {
        let steps = to_store_steps(steps)?;
        if steps.is_empty() {
            return Err("a command needs at least one step".into());
        }
        if let Some(i) = steps.iter().position(|s| matches!(s, store::Step::Reboot)) {
            if i + 1 != steps.len() {
                return Err(
                    "`reboot` must be the last step of its command: queue the steps after it as a new command (or use --each)".into(),
                );
            }
        }
        cmds.push(Command {
            steps,
            timeout_ms,
            max_attempts: max_attempts.max(1),
            on_failure: match on_failure {
                OnFailureSpec::Stop => store::OnFailure::Stop,
                OnFailureSpec::Continue => store::OnFailure::Continue,
            },
        });
    }
    Ok(cmds)
}

fn to_store_steps(steps: &[StepSpec]) -> Result<Vec<store::Step>, String> {
    steps
        .iter()
        .map(|s| {
            Ok(match s {
                StepSpec::Fetch { url, path } => store::Step::Fetch {
                    url: url.clone(),
                    path: path.clone(),
                },
                StepSpec::Verify { path, sha256 } => store::Step::Verify {
                    path: path.clone(),
                    sha256: crate::admin::parse_sha256(sha256)?,
                },
                StepSpec::Write {
                    path,
                    mode,
                    contents,
                } => store::Step::Write {
                    path: path.clone(),
                    mode: *mode,
                    contents: contents.clone().into_bytes(),
                },
                StepSpec::Exec { argv } => store::Step::Exec { argv: argv.clone() },
                StepSpec::Reboot => store::Step::Reboot,
                StepSpec::Report => store::Step::Report,
            })
        })
        .collect()
}

fn device_id(b: &dyn StoreBatch, name: &str) -> Result<DeviceId, Response> {
    match b.device_by_name(name) {
        Ok(Some(d)) => Ok(d.id),
        Ok(None) => Err(Response::not_found(format!(
            "no device named `{name}`: `fleetcast device list` shows the enrolled ones"
        ))),
        Err(e) => Err(Response::err(e.to_string())),
    }
}

fn queue_json(q: &store::QueueState) -> serde_json::Value {
    json!({
        "status": q.status.name(),
        "cursor": q.cursor,
        "completed_through": q.completed_through,
        "pending": q.next_seq.saturating_sub(1).saturating_sub(q.completed_through),
        "attempts": q.attempts,
        "attempt": q.attempt,
        "failure": q.failure.map(|f| format!("{f:?}")),
    })
}

pub(super) fn admin(
    b: &mut dyn StoreBatch,
    online: &mut HashMap<DeviceId, Online>,
    cfg: &FleetConfig,
    now_ms: u64,
    req: &Request,
    dirty: &mut BTreeSet<DeviceId>,
    closes: &mut Vec<Action>,
) -> Response {
    let r = (|| -> Result<Response, Response> {
        let err = |e: store::Error| Response::err(e.to_string());
        Ok(match req {
            Request::DeviceAdd { name, groups } => {
                if name.is_empty()
                    || name.len() > 128
                    || name.chars().any(|c| c.is_control() || c.is_whitespace())
                {
                    return Err(Response::err(
                        "device names are 1-128 characters without spaces",
                    ));
                }
                if b.device_by_name(name).map_err(err)?.is_some() {
                    return Err(Response::err(format!(
                        "a device named `{name}` exists already"
                    )));
                }
                let token =
                    random_token().map_err(|e| Response::err(format!("no randomness: {e}")))?;
                let expires_ms = now_ms + cfg.token_ttl_ms;
                b.add_enrolment_token(
                    sha256(token.as_bytes()),
                    EnrolmentToken {
                        name: name.clone(),
                        expires_ms,
                        groups: groups.clone(),
                    },
                )
                .map_err(err)?;
                let _ = b.append_event(event(
                    now_ms,
                    None,
                    EventKind::Operator,
                    format!("enrolment token issued for {name}"),
                ));
                Response::ok(json!({ "name": name, "token": token, "expires_ms": expires_ms }))
            }
            Request::DeviceList => {
                let mut rows = Vec::new();
                for d in b.devices().map_err(err)? {
                    let q = b.queue(d.id).map_err(err)?.unwrap_or_default();
                    rows.push(json!({
                        "name": d.name,
                        "id": d.id.0,
                        "online": online.contains_key(&d.id),
                        "revoked": d.revoked,
                        "queue": q.status.name(),
                        "last_seen_ms": d.last_seen_ms,
                        "transport": d.transport.map(|t| format!("{t:?}").to_lowercase()),
                        "boot_id": d.report.as_ref().map(|r| r.boot_id.clone()),
                    }));
                }
                Response::ok(json!({ "devices": rows }))
            }
            Request::DeviceRevoke { name } => {
                let id = device_id(b, name)?;
                b.revoke(id).map_err(err)?;
                let _ = b.append_event(event(
                    now_ms,
                    Some(id),
                    EventKind::Operator,
                    format!("{name} revoked"),
                ));
                if let Some(o) = online.remove(&id) {
                    closes.push(close(
                        o.conn,
                        CloseCode::REVOKED,
                        "device was revoked by the operator",
                    ));
                }
                Response::ok(json!({ "revoked": name }))
            }
            Request::GroupAdd { group, devices } => {
                for name in devices {
                    let id = device_id(b, name)?;
                    b.join_group(group, id).map_err(err)?;
                }
                Response::ok(json!({ "group": group, "added": devices }))
            }
            Request::GroupList => {
                let mut rows = Vec::new();
                for (group, members) in b.groups().map_err(err)? {
                    let mut names = Vec::new();
                    for id in members {
                        names.push(
                            b.device(id)
                                .map_err(err)?
                                .map_or_else(|| id.0.to_string(), |d| d.name),
                        );
                    }
                    rows.push(json!({ "group": group, "members": names.join(",") }));
                }
                Response::ok(json!({ "groups": rows }))
            }
            Request::QueueAdd {
                target,
                commands,
                timeout_ms,
                max_attempts,
                on_failure,
            } => {
                let cmds = commands_from_specs(commands, *timeout_ms, *max_attempts, *on_failure)
                    .map_err(Response::err)?;
                let mut queued = Vec::new();
                match b.device_by_name(target).map_err(err)? {
                    Some(d) => {
                        for c in cmds {
                            queued.push(json!({ "device": target, "seq": b.enqueue(d.id, c).map_err(err)? }));
                        }
                        dirty.insert(d.id);
                    }
                    None => {
                        let members = b.group_members(target).map_err(err)?;
                        if members.is_empty() {
                            return Err(Response::not_found(format!(
                                "`{target}` is neither a device nor a group with members: see `fleetcast device list`"
                            )));
                        }
                        for c in cmds {
                            for (dev, seq) in b.enqueue_group(target, c).map_err(err)? {
                                queued.push(json!({ "device_id": dev.0, "seq": seq }));
                                dirty.insert(dev);
                            }
                        }
                    }
                }
                let _ = b.append_event(event(
                    now_ms,
                    None,
                    EventKind::Operator,
                    format!("{} command(s) queued for {target}", queued.len()),
                ));
                Response::ok(json!({ "queued": queued }))
            }
            Request::QueueShow { device } => {
                let id = device_id(b, device)?;
                let q = b.queue(id).map_err(err)?.unwrap_or_default();
                let mut cmds = Vec::new();
                for (seq, c) in b.commands(id, 1, 10_000).map_err(err)? {
                    let result = b.result(id, seq).map_err(err)?;
                    cmds.push(json!({
                        "seq": seq,
                        "steps": c.steps.len(),
                        "state": match &result {
                            Some(r) if r.succeeded() => "ok",
                            Some(_) => "failed",
                            None if q.cursor == Some(seq) && q.status == QueueStatus::Rebooting => "rebooting",
                            None if q.cursor == Some(seq) && q.status == QueueStatus::AwaitingResult => "running",
                            None => "pending",
                        },
                        "exit_code": result.as_ref().and_then(|r| r.steps.iter().rev().find_map(|s| s.exit_code)),
                        "output": result.as_ref().and_then(|r| r.steps.iter().rev().find(|s| !s.output.is_empty()))
                            .map(|s| String::from_utf8_lossy(&s.output).into_owned()),
                    }));
                }
                Response::ok(json!({ "device": device, "queue": queue_json(&q), "commands": cmds }))
            }
            Request::QueuePause { device }
            | Request::QueueResume { device }
            | Request::QueueCancel { device }
            | Request::QueueRetry { device }
            | Request::QueueSkip { device } => {
                let id = device_id(b, device)?;
                let what = match req {
                    Request::QueuePause { .. } => b.pause(id).map(|_| "paused".to_string()),
                    Request::QueueResume { .. } => b.resume(id).map(|_| "resumed".to_string()),
                    Request::QueueCancel { .. } => {
                        b.cancel(id).map(|n| format!("cancelled {n} command(s)"))
                    }
                    Request::QueueRetry { .. } => b.retry(id).map(|_| "retrying".to_string()),
                    _ => b.skip(id).map(|_| "skipped".to_string()),
                }
                .map_err(|e| Response::err(format!("{device}: {e}")))?;
                let _ = b.append_event(event(
                    now_ms,
                    Some(id),
                    EventKind::Operator,
                    format!("queue {what}"),
                ));
                dirty.insert(id);
                let q = b.queue(id).map_err(err)?.unwrap_or_default();
                Response::ok(json!({ "device": device, "done": what, "queue": queue_json(&q) }))
            }
            Request::Status => {
                let mut by_status: HashMap<String, u64> = HashMap::new();
                let mut rows = Vec::new();
                for d in b.devices().map_err(err)? {
                    let q = b.queue(d.id).map_err(err)?.unwrap_or_default();
                    *by_status.entry(q.status.name().to_string()).or_default() += 1;
                    let r = d.report.as_ref();
                    rows.push(json!({
                        "name": d.name,
                        "online": online.contains_key(&d.id),
                        "revoked": d.revoked,
                        "queue": q.status.name(),
                        "cursor": q.cursor,
                        "done": q.completed_through,
                        "pending": q.next_seq.saturating_sub(1).saturating_sub(q.completed_through),
                        "transport": d.transport.map(|t| format!("{t:?}").to_lowercase()),
                        "last_seen_ms": d.last_seen_ms,
                        "hostname": r.map(|r| r.hostname.clone()),
                        "os": r.map(|r| r.os.clone()),
                        "kernel": r.map(|r| r.kernel.clone()),
                        "agent": r.map(|r| r.agent_version.clone()),
                        "boot_id": r.map(|r| r.boot_id.clone()),
                        "addresses": r.map(|r| r.addresses.join(",")),
                        "packages": r.map(|r| r.software.len()),
                    }));
                }
                Response::ok(json!({
                    "online": online.len(),
                    "queues": by_status,
                    "last_event": b.last_event_id().map_err(err)?,
                    "devices": rows,
                }))
            }
            Request::Push { .. } | Request::Metrics | Request::Backup { .. } => {
                return Err(Response::err(
                    "push, metrics and backup are served by the gateway loop",
                ))
            }
            Request::TaskShow { task } => return task_show(b, *task),
            Request::Events { from, limit } => {
                let rows: Vec<_> = b
                    .events_from(*from, (*limit).min(10_000))
                    .map_err(err)?
                    .into_iter()
                    .map(|(id, e)| {
                        json!({
                            "id": id,
                            "time_ms": e.time_ms,
                            "device": e.device.map(|d| d.0),
                            "kind": format!("{:?}", e.kind).to_lowercase(),
                            "message": e.message,
                        })
                    })
                    .collect();
                Response::ok(json!({ "events": rows }))
            }
        })
    })();
    r.unwrap_or_else(|e| e)
}

/// 128 bits from the system's CSPRNG, hex.
fn random_token() -> Result<String, ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut b)?;
    Ok(hex(&b))
}

#[cfg(test)]
mod tests {
    //! Operator requests.

    use crate::fleet::rig::*;
    use crate::fleet::*;

    #[test]
    fn revoking_closes_the_session_and_refuses_the_next_hello() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        rig.hello(2, dev, key, None);
        let a = rig.run(vec![Input::Admin {
            conn: 999,
            req: Request::DeviceRevoke { name: "n1".into() },
        }]);
        assert!(
            a.iter().any(|x| matches!(
                x,
                Action::Close {
                    conn: 2,
                    code: CloseCode::REVOKED,
                    ..
                }
            )),
            "{a:?}"
        );
        let a = rig.hello(3, dev, key, None);
        assert!(
            matches!(
                &a[..],
                [Action::Close {
                    code: CloseCode::REVOKED,
                    ..
                }]
            ),
            "{a:?}"
        );
    }

    #[test]
    fn group_queue_reaches_every_member_and_reboot_must_be_last() {
        let mut rig = Rig::new();
        let (d1, k1) = rig.enrol("n1", 1);
        let (d2, k2) = rig.enrol("n2", 2);
        rig.hello(3, d1, k1, None);
        rig.hello(4, d2, k2, None);
        let a = add(&mut rig, "g", vec![exec("x")]);
        assert_eq!(dispatched(&a).len(), 2, "{a:?}");
        rig.admin(Request::GroupAdd {
            group: "web".into(),
            devices: vec!["n2".into()],
        });
        let r = rig.admin(Request::GroupList);
        assert_eq!(
            r.data["groups"],
            serde_json::json!([{ "group": "g", "members": "n1,n2" }, { "group": "web", "members": "n2" }])
        );
        let r = rig.admin(Request::QueueAdd {
            target: "n1".into(),
            commands: vec![vec![StepSpec::Reboot, StepSpec::Report]],
            timeout_ms: 1,
            max_attempts: 1,
            on_failure: OnFailureSpec::Stop,
        });
        assert!(r.error.unwrap().contains("last step"));
        let r = rig.admin(Request::QueueAdd {
            target: "nobody".into(),
            commands: vec![exec("x")],
            timeout_ms: 1,
            max_attempts: 1,
            on_failure: OnFailureSpec::Stop,
        });
        assert!(r.error.unwrap().contains("neither a device nor a group"));
    }

    /// `queue cancel` releases a queue whose command is in flight; the device finishes it
    /// (nothing else is sent to it meanwhile), its result is discarded, then the queue goes on.
    #[test]
    fn cancel_releases_the_command_in_flight() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        rig.hello(2, dev, key, None);
        add(&mut rig, "n1", vec![exec("a"), exec("b")]);
        let r = rig.admin(Request::QueueCancel {
            device: "n1".into(),
        });
        assert_eq!(r.data["done"], "cancelled 2 command(s)", "{r:?}");
        assert_eq!(rig.queue(dev).status, QueueStatus::Idle);
        let a = add(&mut rig, "n1", vec![exec("c")]);
        assert!(dispatched(&a).is_empty(), "the device still runs 1: {a:?}");
        let a = rig.run(vec![result_input(2, dev, 1, 1, true)]);
        assert!(matches!(a[0], Action::Ack { seq: 1, .. }), "{a:?}");
        assert_eq!(dispatched(&a), vec![3], "{a:?}");
        assert_eq!(events_with(&mut rig, "result of cancelled command 1"), 1);

        // The same after a reconnect: the device says it is still running a command the
        // queue no longer has; nothing is sent to it until it answers.
        add(&mut rig, "n1", vec![exec("d")]);
        rig.run(vec![result_input(2, dev, 3, 1, true)]);
        rig.admin(Request::QueueCancel {
            device: "n1".into(),
        });
        add(&mut rig, "n1", vec![exec("e")]);
        rig.run(vec![Input::Disconnected {
            conn: 2,
            device: Some(dev),
            reason: "cut".into(),
        }]);
        let a = rig.hello(5, dev, key, last(4, 1, None));
        assert!(
            matches!(
                &a[..],
                [Action::Welcome {
                    resume: Some((4, 1, _, _)),
                    ..
                }]
            ),
            "{a:?}"
        );
        let a = rig.run(vec![result_input(5, dev, 4, 1, false)]);
        assert_eq!(dispatched(&a), vec![5], "{a:?}");
    }
}
