//! Operator requests: devices, groups, queues, status and events. Each request has its own
//! handler on [`Cx`], which answers with a typed response (see `responses`) or says which
//! rule the request broke ([`AdminError`]).

use super::responses::*;
use super::*;
use crate::admin::TriggerError;

/// Time allowed for one follow-up command of a push (an install, typically).
pub const FOLLOW_UP_TIMEOUT_MS: u64 = 600_000;

/// Why a queue command was refused (one variant per broken rule).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A command with no step.
    #[error("a command needs at least one step")]
    NoSteps,
    /// A `reboot` before another step: the steps after it would run on the boot left.
    #[error(
        "`reboot` must be the last step of its command: queue the steps after it as a new command (or use --each)"
    )]
    RebootNotLast,
    /// A `slot-switch` not directly followed by the command's `reboot`: the one-time boot it
    /// sets is only safe when the reboot that spends it comes next.
    #[error(
        "`slot-switch` must be followed by `reboot`, its command's last step (slot-switch reboot)"
    )]
    SwitchWithoutReboot,
    /// An attached-device target that is not `KIND:ID` with a known kind.
    #[error("target {0:?} is not KIND:ID with KIND one of disk, net, usb, serial (e.g. disk:S3Z9NB0K123456, serial:/dev/ttyUSB0)")]
    BadTarget(String),
}

/// Why an operator request was refused (one variant per broken rule). The message says what
/// to do next; the not-found variants let the CLI pick its exit code.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The store failed (the batch will not commit).
    #[error("{0}")]
    Store(#[from] store::Error),
    /// A device name that is empty, too long or has spaces or control characters.
    #[error("device names are 1-128 characters without spaces")]
    BadName,
    /// `device add` of a name in use.
    #[error("a device named `{0}` exists already")]
    NameTaken(String),
    /// The system's random source failed (no token can be issued).
    #[error("no randomness: {0}")]
    NoRandomness(ring::error::Unspecified),
    /// No device has the name given.
    #[error("no device named `{0}`: `fleetcast device list` shows the enrolled ones")]
    NoSuchDevice(String),
    /// `queue add` to a name that is neither a device nor a group with members.
    #[error("`{0}` is neither a device nor a group with members: see `fleetcast device list`")]
    NoSuchTarget(String),
    /// `task show` of a task that does not exist.
    #[error("no task {0}: `fleetcast task show` lists the tasks")]
    NoSuchTask(u64),
    /// `task cancel|retry --device` of a device the task does not target.
    #[error(
        "device `{device}` is not a target of task {task}: `fleetcast task show {task}` lists them"
    )]
    NotATarget {
        /// The task.
        task: u64,
        /// The device named.
        device: String,
    },
    /// A whole-task `task cancel|retry` that finds no target to change.
    #[error(
        "task {task}: nothing to {op} (`fleetcast task show {task}` says the state of each target)"
    )]
    NothingToChange {
        /// The task.
        task: u64,
        /// `cancel` or `retry`.
        op: &'static str,
    },
    /// A task control the target's row does not allow (e.g. `retry` of a completed copy).
    #[error("{device}: {source}")]
    Task {
        /// The device named.
        device: String,
        /// The store's refusal.
        source: store::Error,
    },
    /// `push` to a group without members.
    #[error("group `{0}` has no members: `fleetcast group add {0} DEVICE...` first")]
    EmptyGroup(String),
    /// A queue control the queue's state does not allow (e.g. `retry` of a running queue).
    #[error("{device}: {source}")]
    Queue {
        /// The device named.
        device: String,
        /// The store's refusal.
        source: store::Error,
    },
    /// A command of `queue add` that breaks a rule.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// A request the gateway loop serves itself, sent to the fleet.
    #[error("metrics and backup are served by the gateway loop")]
    NotFleet,
    /// `push` while the gateway has no distributor.
    #[error(
        "multicast is off: start fleetcastd with --mcast-addr ADDRESS (its unicast address on the devices' network)"
    )]
    MulticastOff,
    /// A push trigger that contradicts itself.
    #[error(transparent)]
    Trigger(#[from] TriggerError),
    /// A follow-up command of `push --then` that breaks a rule.
    #[error("--then: {0}")]
    Then(CommandError),
    /// The distributor could not prepare the push's file.
    #[error("{0}")]
    NotPrepared(PrepareError),
}

impl From<AdminError> for Response {
    fn from(e: AdminError) -> Response {
        match e {
            AdminError::NoSuchDevice(_)
            | AdminError::NoSuchTarget(_)
            | AdminError::NoSuchTask(_)
            | AdminError::NotATarget { .. } => Response::not_found(e.to_string()),
            e => Response::err(e.to_string()),
        }
    }
}

/// Validated queue commands from their admin form: every command has a step, and a
/// `reboot` only as its last step.
pub fn commands_from_specs(
    commands: &[Vec<wire::Step<'static>>],
    timeout_ms: u64,
    max_attempts: u32,
    on_failure: OnFailureSpec,
) -> Result<Vec<Command>, CommandError> {
    let mut cmds = Vec::new();
    for steps in commands {
        if steps.is_empty() {
            return Err(CommandError::NoSteps);
        }
        if let Some(i) = steps.iter().position(|s| matches!(s, wire::Step::Reboot)) {
            if i + 1 != steps.len() {
                return Err(CommandError::RebootNotLast);
            }
        }
        if let Some(i) = steps
            .iter()
            .position(|s| matches!(s, wire::Step::SlotSwitch { .. }))
        {
            if i + 2 != steps.len() || !matches!(steps[i + 1], wire::Step::Reboot) {
                return Err(CommandError::SwitchWithoutReboot);
            }
        }
        cmds.push(Command {
            steps: steps.clone(),
            timeout_ms,
            max_attempts: max_attempts.max(1),
            on_failure: match on_failure {
                OnFailureSpec::Stop => store::OnFailure::Stop,
                OnFailureSpec::Continue => store::OnFailure::Continue,
            },
            target: None,
        });
    }
    Ok(cmds)
}

/// `queue show`'s `exit_code`: the device's overall one; none when the gateway recorded the
/// end itself (a timeout, a skip).
fn result_exit_code(r: &store::StoredResult) -> Option<i32> {
    match r {
        store::StoredResult::Received(x) => Some(x.result.exit_code),
        store::StoredResult::TimedOut { .. } | store::StoredResult::Skipped => None,
    }
}

/// `queue show`'s `output`: the device's output excerpt (none if empty), or what the gateway
/// recorded instead.
fn result_output(r: &store::StoredResult) -> Option<String> {
    match r {
        store::StoredResult::Received(x) if x.result.output.is_empty() => None,
        store::StoredResult::Received(x) => Some(String::from_utf8_lossy(&x.result.output).into()),
        store::StoredResult::TimedOut { .. } => Some("timed out".into()),
        store::StoredResult::Skipped => Some("skipped".into()),
    }
}

/// What an operator request gets from the fleet.
enum Answer {
    /// Its answer, now.
    Now(Response),
    /// A push to prepare: answered once its task exists (or cannot).
    Prepare(PushSpec),
}

pub(super) fn device_id(b: &dyn StoreBatch, name: &str) -> Result<DeviceId, AdminError> {
    match b.device_by_name(name)? {
        Some(d) => Ok(d.id),
        None => Err(AdminError::NoSuchDevice(name.to_string())),
    }
}

/// The name a device is shown by (its id when it has no record).
pub(super) fn device_name(b: &dyn StoreBatch, d: DeviceId) -> Result<String, store::Error> {
    Ok(b.device(d)?.map_or_else(|| d.0.to_string(), |d| d.name))
}

fn transport_name(t: Option<store::Transport>) -> Option<String> {
    t.map(|t| format!("{t:?}").to_lowercase())
}

impl Cx<'_> {
    /// Answers an operator request on its connection; a valid push is answered later, once
    /// its task exists (or cannot), and asks the loop to prepare its file meanwhile.
    pub(super) fn admin(&mut self, conn: ConnId, req: &Request) {
        let resp = match self.admin_request(req) {
            Ok(Answer::Now(resp)) => resp,
            Ok(Answer::Prepare(spec)) => {
                self.actions.push(Action::PreparePush {
                    origin: Origin::Operator(conn),
                    spec,
                });
                return;
            }
            Err(e) => Response::from(e),
        };
        self.actions.push(Action::Reply { conn, resp });
    }

    fn admin_request(&mut self, req: &Request) -> Result<Answer, AdminError> {
        Ok(Answer::Now(match req {
            Request::DeviceAdd { name, groups } => reply(&self.device_add(name, groups)?),
            Request::DeviceList => reply(&self.device_list()?),
            Request::DeviceShow { name } => reply(&self.device_show(name)?),
            Request::DeviceRevoke { name } => reply(&self.device_revoke(name)?),
            Request::GroupAdd { group, devices } => reply(&self.group_add(group, devices)?),
            Request::GroupList => reply(&self.group_list()?),
            Request::QueueAdd {
                target,
                commands,
                timeout_ms,
                max_attempts,
                on_failure,
                attached,
            } => {
                let mut cmds =
                    commands_from_specs(commands, *timeout_ms, *max_attempts, *on_failure)?;
                if let Some(a) = attached {
                    let t =
                        wire::Target::parse(a).ok_or_else(|| CommandError::BadTarget(a.clone()))?;
                    for c in &mut cmds {
                        c.target = Some(t.clone().into_owned());
                    }
                }
                reply(&self.queue_add(target, cmds)?)
            }
            Request::QueueShow { device } => reply(&self.queue_show(device)?),
            Request::QueuePause { device }
            | Request::QueueResume { device }
            | Request::QueueCancel { device }
            | Request::QueueRetry { device }
            | Request::QueueSkip { device } => reply(&self.queue_control(req, device)?),
            Request::Status => reply(&self.status()?),
            Request::Push {
                path,
                group,
                block_size,
                rate_mbps,
                trigger,
                then,
                delivery,
                follow,
                image,
            } => {
                let gates = (*trigger, *follow);
                let mut spec = self.push_spec(path, group, *block_size, *rate_mbps, gates, then)?;
                spec.delivery = *delivery;
                spec.image = image.clone();
                return Ok(Answer::Prepare(spec));
            }
            // They need the gateway's own state (its counters, the store's environment
            // while the loop waits): the admin connection serves them itself.
            Request::Metrics | Request::Backup { .. } => return Err(AdminError::NotFleet),
            Request::TaskShow { task } => task_show(&*self.b, self.online, self.now_ms, *task)?,
            Request::TaskCancel { task, device } => {
                reply(&self.task_control(TaskControl::Cancel, *task, device.as_deref())?)
            }
            Request::TaskRetry { task, device } => {
                reply(&self.task_control(TaskControl::Retry, *task, device.as_deref())?)
            }
            Request::Events { from, limit } => reply(&self.events(*from, *limit)?),
        }))
    }

    /// `push`: refused while multicast is off, or with a contradicting trigger or a bad
    /// follow-up; otherwise what the distributor is to prepare (checked in this order).
    fn push_spec(
        &self,
        path: &str,
        group: &str,
        block_size: u32,
        rate_mbps: u64,
        (trigger, follow): (PushTrigger, crate::admin::PushFollow),
        then: &[Vec<wire::Step<'static>>],
    ) -> Result<PushSpec, AdminError> {
        if !self.multicast {
            return Err(AdminError::MulticastOff);
        }
        trigger.validate_with(&follow, self.now_ms)?;
        let then = commands_from_specs(then, FOLLOW_UP_TIMEOUT_MS, 1, OnFailureSpec::Stop)
            .map_err(AdminError::Then)?;
        Ok(PushSpec {
            path: path.to_string(),
            group: group.to_string(),
            block_size,
            rate_mbps,
            // The trigger text is the distributor's `describe` after this: what the push
            // follows goes here so the task table says it.
            reason: format!(
                "publish by operator{}",
                follow.describe(group, trigger.max_wait_s)
            ),
            trigger,
            then,
            delivery: Default::default(),
            follow: follow.to_task(),
            image: None,
        })
    }

    fn device_add(&mut self, name: &str, groups: &[String]) -> Result<DeviceAdded, AdminError> {
        if name.is_empty()
            || name.len() > 128
            || name.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(AdminError::BadName);
        }
        if self.b.device_by_name(name)?.is_some() {
            return Err(AdminError::NameTaken(name.to_string()));
        }
        let token = random_token().map_err(AdminError::NoRandomness)?;
        let expires_ms = self.now_ms + self.cfg.token_ttl_ms;
        self.b.add_enrolment_token(
            sha256(token.as_bytes()),
            EnrolmentToken {
                name: name.to_string(),
                expires_ms,
                groups: groups.to_vec(),
            },
        )?;
        let _ = self.b.append_event(event(
            self.now_ms,
            None,
            EventKind::Operator,
            format!("enrolment token issued for {name}"),
        ));
        Ok(DeviceAdded {
            name: name.to_string(),
            token,
            expires_ms,
        })
    }

    fn device_list(&self) -> Result<DeviceList, AdminError> {
        let mut devices = Vec::new();
        for d in self.b.devices()? {
            let q = self.b.queue(d.id)?.unwrap_or_default();
            devices.push(DeviceRow {
                online: self.online.contains_key(&d.id),
                revoked: d.revoked,
                queue: q.status.name(),
                last_seen_ms: d.last_seen_ms,
                transport: transport_name(d.transport),
                boot_id: d.report.as_ref().map(|r| hex(&r.boot_id)),
                id: d.id.0,
                name: d.name,
            });
        }
        Ok(DeviceList { devices })
    }

    fn device_show(&self, name: &str) -> Result<DeviceShown, AdminError> {
        let d = self
            .b
            .device_by_name(name)?
            .ok_or_else(|| AdminError::NoSuchDevice(name.to_string()))?;
        Ok(DeviceShown {
            update: self.last_update(d.id)?,
            online: self.online.contains_key(&d.id),
            revoked: d.revoked,
            enrolled_ms: d.enrolled_ms,
            last_seen_ms: d.last_seen_ms,
            transport: transport_name(d.transport),
            report_ms: d.report_ms,
            report: d.report.as_ref().map(ReportView::of),
            id: d.id.0,
            name: d.name,
        })
    }

    /// The device's last A/B update as its queue tells it (the slot it runs now and why it
    /// rolled back are in the update steps' results): the newest command with a slot step
    /// that has a result, or that the queue waits on.
    fn last_update(&self, id: DeviceId) -> Result<Option<String>, AdminError> {
        let q = self.b.queue(id)?.unwrap_or_default();
        let slot_step = |c: &store::Command| {
            c.steps
                .iter()
                .any(|s| matches!(s, wire::Step::SlotSwitch { .. } | wire::Step::SlotCommit))
        };
        let commands = self.b.commands(id, 1, 10_000)?;
        for (seq, _) in commands.iter().rev().filter(|(_, c)| slot_step(c)) {
            if let Some(r) = self.b.result(id, *seq)? {
                let out = result_output(&r).unwrap_or_default();
                let said = out
                    .lines()
                    .rev()
                    .filter_map(|l| l.strip_prefix("fleetcast-agent: "))
                    .find(|l| {
                        [
                            "committed slot",
                            "rolled back:",
                            "slot switch aborted",
                            "switching slot",
                        ]
                        .iter()
                        .any(|p| l.starts_with(p))
                    });
                let said = said.map_or_else(|| out.trim().to_owned(), str::to_owned);
                return Ok(Some(format!("command {seq}: {said}")));
            }
            if q.cursor == Some(*seq) {
                let now = match (q.status, q.failure) {
                    (QueueStatus::Rebooting, _) => "rebooting into the new slot",
                    (QueueStatus::Failed, Some(store::FailReason::RebootDeadlineMissed)) => {
                        "did not come back before the update's deadline (RebootDeadlineMissed)"
                    }
                    _ => continue,
                };
                return Ok(Some(format!("command {seq}: {now}")));
            }
        }
        Ok(None)
    }

    fn device_revoke(&mut self, name: &str) -> Result<Revoked, AdminError> {
        let id = device_id(&*self.b, name)?;
        self.b.revoke(id)?;
        let _ = self.b.append_event(event(
            self.now_ms,
            Some(id),
            EventKind::Operator,
            format!("{name} revoked"),
        ));
        if let Some(o) = self.online.remove(&id) {
            self.actions.push(close(
                o.conn,
                CloseCode::REVOKED,
                "device was revoked by the operator",
            ));
        }
        Ok(Revoked {
            revoked: name.to_string(),
        })
    }

    fn group_add(&mut self, group: &str, devices: &[String]) -> Result<GroupAdded, AdminError> {
        for name in devices {
            let id = device_id(&*self.b, name)?;
            self.b.join_group(group, id)?;
            self.follow_group(id, group)?;
        }
        Ok(GroupAdded {
            group: group.to_string(),
            added: devices.to_vec(),
        })
    }

    fn group_list(&self) -> Result<GroupList, AdminError> {
        let mut groups = Vec::new();
        for (group, members) in self.b.groups()? {
            let mut names = Vec::new();
            for id in members {
                names.push(device_name(&*self.b, id)?);
            }
            groups.push(GroupRow {
                group,
                members: names.join(","),
            });
        }
        Ok(GroupList { groups })
    }

    /// `queue add`: to the device named `target`, or else to every member of the group.
    fn queue_add(&mut self, target: &str, cmds: Vec<Command>) -> Result<Queued, AdminError> {
        let mut queued = Vec::new();
        match self.b.device_by_name(target)? {
            Some(d) => {
                for c in cmds {
                    queued.push(QueuedRow::Device {
                        device: target.to_string(),
                        seq: self.b.enqueue(d.id, c)?,
                    });
                }
                self.dirty.insert(d.id);
            }
            None => {
                if self.b.group_members(target)?.is_empty() {
                    return Err(AdminError::NoSuchTarget(target.to_string()));
                }
                for c in cmds {
                    for (dev, seq) in self.b.enqueue_group(target, c)? {
                        queued.push(QueuedRow::Member {
                            device_id: dev.0,
                            seq,
                        });
                        self.dirty.insert(dev);
                    }
                }
            }
        }
        let _ = self.b.append_event(event(
            self.now_ms,
            None,
            EventKind::Operator,
            format!("{} command(s) queued for {target}", queued.len()),
        ));
        Ok(Queued { queued })
    }

    fn queue_show(&self, device: &str) -> Result<QueueShown, AdminError> {
        let id = device_id(&*self.b, device)?;
        let q = self.b.queue(id)?.unwrap_or_default();
        let mut commands = Vec::new();
        for (seq, c) in self.b.commands(id, 1, 10_000)? {
            let result = self.b.result(id, seq)?;
            commands.push(CommandRow {
                seq,
                steps: c.steps.len(),
                state: match &result {
                    Some(r) if r.succeeded() => "ok",
                    Some(_) => "failed",
                    None if q.cursor == Some(seq) && q.status == QueueStatus::Rebooting => {
                        "rebooting"
                    }
                    None if q.cursor == Some(seq) && q.status == QueueStatus::AwaitingResult => {
                        "running"
                    }
                    None => "pending",
                },
                exit_code: result.as_ref().and_then(result_exit_code),
                output: result.as_ref().and_then(result_output),
                target: c.target.as_ref().map(ToString::to_string),
            });
        }
        Ok(QueueShown {
            device: device.to_string(),
            queue: QueueView::of(&q),
            commands,
        })
    }

    /// `queue pause|resume|cancel|retry|skip` (`req` says which).
    fn queue_control(&mut self, req: &Request, device: &str) -> Result<QueueChanged, AdminError> {
        let id = device_id(&*self.b, device)?;
        let b = &mut *self.b;
        let done = match req {
            Request::QueuePause { .. } => b.pause(id).map(|_| "paused".to_string()),
            Request::QueueResume { .. } => b.resume(id).map(|_| "resumed".to_string()),
            Request::QueueCancel { .. } => {
                b.cancel(id).map(|n| format!("cancelled {n} command(s)"))
            }
            Request::QueueRetry { .. } => b.retry(id).map(|_| "retrying".to_string()),
            _ => b.skip(id).map(|_| "skipped".to_string()),
        }
        .map_err(|source| AdminError::Queue {
            device: device.to_string(),
            source,
        })?;
        let _ = b.append_event(event(
            self.now_ms,
            Some(id),
            EventKind::Operator,
            format!("queue {done}"),
        ));
        self.dirty.insert(id);
        let q = b.queue(id)?.unwrap_or_default();
        Ok(QueueChanged {
            device: device.to_string(),
            done,
            queue: QueueView::of(&q),
        })
    }

    fn status(&self) -> Result<FleetStatus, AdminError> {
        let mut queues: HashMap<String, u64> = HashMap::new();
        let mut devices = Vec::new();
        for d in self.b.devices()? {
            let q = self.b.queue(d.id)?.unwrap_or_default();
            *queues.entry(q.status.name().to_string()).or_default() += 1;
            let r = d.report.as_ref();
            let (pending_commands, pending_transfers) =
                super::session::pending_actions(&*self.b, d.id, &q);
            devices.push(StatusRow {
                online: self.online.contains_key(&d.id),
                revoked: d.revoked,
                queue: q.status.name(),
                cursor: q.cursor,
                done: q.completed_through,
                pending: q
                    .next_seq
                    .saturating_sub(1)
                    .saturating_sub(q.completed_through),
                pending_commands,
                pending_transfers,
                transport: transport_name(d.transport),
                last_seen_ms: d.last_seen_ms,
                hostname: r.map(|r| r.hostname.to_string()),
                os: r.map(|r| r.os.to_string()),
                kernel: r.map(|r| r.kernel.to_string()),
                agent: r.map(|r| r.agent_version.to_string()),
                boot_id: r.map(|r| hex(&r.boot_id)),
                addresses: r.map(|r| r.addresses.join(",")),
                packages: r.map(|r| r.software.len()),
                name: d.name,
            });
        }
        Ok(FleetStatus {
            online: self.online.len(),
            queues,
            last_event: self.b.last_event_id()?,
            devices,
            waiting: super::follow::waiting_tasks(&*self.b, self.online, self.now_ms)?,
        })
    }

    fn events(&self, from: store::EventId, limit: usize) -> Result<Events, AdminError> {
        let events = self
            .b
            .events_from(from, limit.min(10_000))?
            .into_iter()
            .map(|(id, e)| EventRow {
                id,
                time_ms: e.time_ms,
                device: e.device.map(|d| d.0),
                kind: format!("{:?}", e.kind).to_lowercase(),
                message: e.message,
            })
            .collect();
        Ok(Events { events })
    }
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

    use super::FOLLOW_UP_TIMEOUT_MS;
    use crate::fleet::rig::*;
    use crate::fleet::*;

    /// `device show` answers the latest report, every field of it, and the time it was
    /// stored; before any report both are null, and an unknown name is "not found".
    #[test]
    fn device_show_has_the_latest_report_and_when_it_came() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        rig.hello(2, dev, key, None);
        let r = rig.admin(Request::DeviceShow { name: "n1".into() });
        assert!(r.ok, "{r:?}");
        assert_eq!(r.data["name"], "n1");
        assert!(r.data["report"].is_null() && r.data["report_ms"].is_null());

        let mut report = report_with("Alpine Linux v3.19", boot_named("b1"));
        report.package_manager = wire::PackageManager::Apk;
        report.cpu_model = "Fake CPU".into();
        report.cpus = 4;
        report.memory = 8 << 30;
        report.devices = vec![wire::Attached {
            kind: wire::AttachedKind::Disk,
            name: "sda".into(),
            id: "S3Z9NB0K123456".into(),
            wwn: "naa.5002538e40a1b2c3".into(),
            model: "Samsung SSD 860".into(),
            size: 500_107_862_016,
        }];
        rig.run(vec![Input::Report {
            conn: 2,
            device: dev,
            report,
        }]);
        let at = rig.now;
        let r = rig.admin(Request::DeviceShow { name: "n1".into() });
        assert_eq!(r.data["report_ms"], at);
        let rep = &r.data["report"];
        assert_eq!(rep["os"], "Alpine Linux v3.19");
        assert_eq!(rep["package_manager"], "apk");
        assert_eq!(
            (rep["cpu_model"].clone(), rep["cpus"].clone()),
            ("Fake CPU".into(), 4.into())
        );
        assert_eq!(rep["memory"], 8u64 << 30);
        assert_eq!(
            rep["software"],
            serde_json::json!([{ "name": "nginx", "version": "1.22" }])
        );
        assert_eq!(rep["devices"][0]["target"], "disk:S3Z9NB0K123456");
        assert_eq!(rep["devices"][0]["wwn"], "naa.5002538e40a1b2c3");
        assert_eq!(rep["devices"][0]["size"], 500_107_862_016u64);

        let r = rig.admin(Request::DeviceShow {
            name: "nobody".into(),
        });
        assert!(!r.ok);
        assert_eq!(r.kind, Some(crate::admin::ErrorKind::NotFound));
    }

    /// `queue add --attached KIND:ID`: every command queued keeps the target, `queue show`
    /// names it, and it goes to the agent with the command; a malformed one is refused.
    #[test]
    fn queue_add_with_an_attached_target() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        let add = |rig: &mut Rig, attached: &str| {
            rig.admin(Request::QueueAdd {
                target: "n1".into(),
                commands: vec![exec("a"), exec("b")],
                timeout_ms: 1000,
                max_attempts: 1,
                on_failure: OnFailureSpec::Stop,
                attached: Some(attached.into()),
            })
        };
        let r = add(&mut rig, "disk:S3Z9NB0K123456");
        assert!(r.ok, "{r:?}");
        for bad in ["S3Z9NB0K123456", "bmc:1", "disk:"] {
            let r = add(&mut rig, bad);
            assert!(
                r.error.as_deref().is_some_and(|e| e.contains("KIND:ID")),
                "{bad}: {r:?}"
            );
        }
        let r = rig.admin(Request::QueueShow {
            device: "n1".into(),
        });
        let targets: Vec<_> = r.data["commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["target"].clone())
            .collect();
        assert_eq!(targets, ["disk:S3Z9NB0K123456", "disk:S3Z9NB0K123456"]);
        let a = rig.hello(2, dev, key, None);
        let cmd = a
            .iter()
            .find_map(|x| match x {
                Action::Dispatch { cmd, .. } => Some(cmd.clone()),
                _ => None,
            })
            .expect("dispatched");
        assert_eq!(
            cmd.target,
            Some(wire::Target {
                kind: wire::AttachedKind::Disk,
                id: "S3Z9NB0K123456".into()
            })
        );
    }

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
            attached: None,
            target: "n1".into(),
            commands: vec![vec![wire::Step::Reboot, wire::Step::Report]],
            timeout_ms: 1,
            max_attempts: 1,
            on_failure: OnFailureSpec::Stop,
        });
        assert!(r.error.unwrap().contains("last step"));
        let r = rig.admin(Request::QueueAdd {
            attached: None,
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

    /// A push request as the CLI sends it, to group `g`, with one follow-up.
    fn push_req(trigger: PushTrigger, then: Vec<Vec<wire::Step<'static>>>) -> Request {
        Request::Push {
            path: "/srv/image.bin".into(),
            group: "g".into(),
            block_size: 1000,
            rate_mbps: 100,
            trigger,
            then,
            delivery: Default::default(),
            follow: Default::default(),
            image: None,
        }
    }

    /// The task row the distributor makes of a prepared push once its digest is known.
    fn hashed_row(spec: &PushSpec, group: &str) -> store::Task {
        store::Task {
            path: spec.path.clone(),
            size: 3000,
            block_size: spec.block_size,
            sha256: [9; 32],
            group: Some(group.into()),
            trigger: spec.trigger.describe(&spec.reason),
            created_ms: T0,
            then: spec.then.clone(),
            plan: Default::default(),
            follow: spec.follow,
            image: None,
        }
    }

    /// The distributor's refusal of a file (what the gateway hands back as the result).
    fn unreadable() -> PrepareError {
        Arc::new(crate::distribution::DistError::Map {
            path: "/srv/image.bin".into(),
            source: std::io::ErrorKind::NotFound.into(),
        })
    }

    #[test]
    fn a_push_by_broadcast_reaches_the_distributor_as_asked() {
        // The address is the distributor's to check (it knows the interface); the fleet
        // passes the choice on unchanged, and an old client's request (no `delivery`) is the
        // gateway's default.
        let mut rig = Rig::with_multicast();
        let b = std::net::Ipv4Addr::new(10, 0, 0, 255);
        let mut req = push_req(PushTrigger::default(), vec![]);
        if let Request::Push { delivery, .. } = &mut req {
            *delivery = crate::admin::Delivery::Broadcast(Some(b));
        }
        let line = serde_json::to_value(&req).unwrap();
        assert_eq!(line["op"], "push");
        assert_eq!(
            line["delivery"],
            serde_json::json!({"broadcast": "10.0.0.255"})
        );
        let a = rig.run(vec![Input::Admin { conn: 900, req }]);
        match &a[..] {
            [Action::PreparePush { spec, .. }] => {
                assert_eq!(spec.delivery, crate::admin::Delivery::Broadcast(Some(b)))
            }
            other => panic!("{other:?}"),
        }
        let mut old = line.clone();
        old.as_object_mut().unwrap().remove("delivery");
        let old: Request = serde_json::from_value(old).unwrap();
        assert!(matches!(
            old,
            Request::Push {
                delivery: crate::admin::Delivery::Default,
                ..
            }
        ));
    }

    #[test]
    fn an_operator_push_is_prepared_then_its_digest_creates_the_task_and_the_answer() {
        let mut rig = Rig::with_multicast();
        let (d1, k1) = rig.enrol("n1", 1);
        rig.hello(3, d1, k1, None);
        let a = rig.run(vec![Input::Admin {
            conn: 900,
            req: push_req(PushTrigger::default(), vec![exec("install")]),
        }]);
        // No answer yet: the loop is asked to map and hash the file.
        let spec = match &a[..] {
            [Action::PreparePush {
                origin: Origin::Operator(900),
                spec,
            }] => spec.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            spec,
            PushSpec {
                path: "/srv/image.bin".into(),
                group: "g".into(),
                block_size: 1000,
                rate_mbps: 100,
                reason: "publish by operator".into(),
                delivery: Default::default(),
                follow: Default::default(),
                trigger: PushTrigger::default(),
                then: vec![Command {
                    target: None,
                    steps: exec("install"),
                    timeout_ms: FOLLOW_UP_TIMEOUT_MS,
                    max_attempts: 1,
                    on_failure: store::OnFailure::Stop,
                }],
                image: None,
            }
        );
        // Nothing is stored before the digest is known.
        let r = rig.admin(Request::TaskShow { task: None });
        assert_eq!(r.data["tasks"], serde_json::json!([]));
        // The digest: the task is created, bound, announced, and the operator answered.
        let a = rig.run(vec![Input::Hashed {
            origin: Origin::Operator(900),
            result: Ok(hashed_row(&spec, "g")),
        }]);
        let id = match &a[..] {
            [Action::TaskCreated {
                origin: Origin::Operator(900),
                task,
                targets,
            }, Action::Announce {
                conn: 3,
                device,
                task: announced,
            }, Action::Reply { conn: 900, resp }] => {
                assert_eq!((targets, device, announced), (&vec![d1], &d1, task));
                assert!(resp.ok, "{resp:?}");
                assert_eq!(resp.data["task"], task.0);
                assert_eq!(resp.data["targets"], "n1");
                assert_eq!(resp.data["sha256"], hex(&[9; 32]));
                *task
            }
            other => panic!("{other:?}"),
        };
        let r = rig.admin(Request::TaskShow { task: Some(id.0) });
        assert_eq!(r.data["trigger"], "publish by operator");
        assert_eq!(r.data["path"], "/srv/image.bin");
    }

    #[test]
    fn a_push_whose_file_cannot_be_prepared_is_answered_on_its_connection() {
        let mut rig = Rig::with_multicast();
        let (d1, k1) = rig.enrol("n1", 1);
        rig.hello(3, d1, k1, None);
        let a = rig.run(vec![Input::Hashed {
            origin: Origin::Operator(900),
            result: Err(unreadable()),
        }]);
        assert_eq!(
            a,
            vec![
                Action::PushRefused {
                    origin: Origin::Operator(900)
                },
                Action::Reply {
                    conn: 900,
                    resp: Response::err(unreadable().to_string()),
                },
            ]
        );
        assert!(unreadable()
            .to_string()
            .starts_with("cannot map /srv/image.bin: "));
        let r = rig.admin(Request::TaskShow { task: None });
        assert_eq!(r.data["tasks"], serde_json::json!([]));
    }

    #[test]
    fn a_watched_directory_push_is_answered_to_no_one() {
        let mut rig = Rig::with_multicast();
        let (d1, k1) = rig.enrol("n1", 1);
        rig.hello(3, d1, k1, None);
        let watch = |push| Origin::Watch { push };
        let spec = PushSpec {
            path: "/srv/drop/image.bin".into(),
            group: "g".into(),
            block_size: 1000,
            rate_mbps: 100,
            reason: "change in watched directory /srv/drop".into(),
            trigger: PushTrigger::default(),
            then: vec![],
            delivery: Default::default(),
            follow: Default::default(),
            image: None,
        };
        // A file that cannot be read, and a group without members: the mapping goes, and no
        // connection hears of it (the fleet logs it).
        let a = rig.run(vec![
            Input::Hashed {
                origin: watch(1),
                result: Err(unreadable()),
            },
            Input::Hashed {
                origin: watch(2),
                result: Ok(hashed_row(&spec, "nobody")),
            },
        ]);
        assert_eq!(
            a,
            vec![
                Action::PushRefused { origin: watch(1) },
                Action::PushRefused { origin: watch(2) },
            ]
        );
        // Its task is created and announced like an operator's, with no answer.
        let a = rig.run(vec![Input::Hashed {
            origin: watch(3),
            result: Ok(hashed_row(&spec, "g")),
        }]);
        assert!(
            matches!(
                &a[..],
                [Action::TaskCreated { origin, targets, .. }, Action::Announce { conn: 3, .. }]
                    if *origin == watch(3) && targets == &vec![d1]
            ),
            "{a:?}"
        );
        let r = rig.admin(Request::TaskShow { task: None });
        assert_eq!(r.data["tasks"][0]["path"], "/srv/drop/image.bin");
    }

    #[test]
    fn a_push_is_refused_while_multicast_is_off_or_when_it_breaks_a_rule() {
        let mut rig = Rig::new();
        let past = PushTrigger {
            at_ms: Some(T0 - 60_000),
            ..PushTrigger::default()
        };
        // Multicast off is said first, whatever else the request gets wrong.
        for req in [
            push_req(PushTrigger::default(), vec![]),
            push_req(past, vec![vec![]]),
        ] {
            assert_eq!(
                rig.admin(req),
                Response::err(
                    "multicast is off: start fleetcastd with --mcast-addr ADDRESS (its unicast address on the devices' network)"
                )
            );
        }
        rig.fleet.set_multicast(true);
        let refusals = [
            (
                push_req(past, vec![]),
                "the scheduled start is in the past: give a future time",
            ),
            (
                push_req(PushTrigger::default(), vec![vec![]]),
                "--then: a command needs at least one step",
            ),
            (
                push_req(
                    PushTrigger::default(),
                    vec![vec![wire::Step::Reboot, exec("x").remove(0)]],
                ),
                "--then: `reboot` must be the last step of its command: queue the steps after it as a new command (or use --each)",
            ),
            (
                push_req(
                    PushTrigger::default(),
                    vec![vec![wire::Step::SlotSwitch { deadline_secs: 0 }]],
                ),
                "--then: `slot-switch` must be followed by `reboot`, its command's last step (slot-switch reboot)",
            ),
        ];
        for (req, error) in refusals {
            assert_eq!(rig.admin(req), Response::err(error));
        }
        let r = rig.admin(Request::TaskShow { task: None });
        assert_eq!(r.data["tasks"], serde_json::json!([]));
    }

    /// A store that cannot begin a batch (reads still work).
    struct NoBatches(fleetcast_store::Store);

    impl Engine for NoBatches {
        fn batch(&mut self) -> store::Result<Box<dyn StoreBatch + '_>> {
            Err(store::Error::DiskFull)
        }
        fn snapshot(&self) -> store::Result<Box<dyn Reads + '_>> {
            Engine::snapshot(&self.0)
        }
        fn backup(&self, dest: &std::path::Path) -> store::Result<()> {
            Engine::backup(&self.0, dest)
        }
    }

    #[test]
    fn a_push_the_store_cannot_take_is_refused_to_its_operator_only() {
        let rig = Rig::with_multicast();
        let dir = rig._dir.path();
        let pki = Pki::load_or_create(&dir.join("pki"), &["localhost".into()], wall(T0)).unwrap();
        let store = fleetcast_store::Store::open(dir.join("other")).unwrap();
        let mut fleet = Fleet::new(NoBatches(store), pki, FleetConfig::default()).unwrap();
        fleet.set_multicast(true);
        let row = store::Task {
            path: "/srv/image.bin".into(),
            size: 3000,
            block_size: 1000,
            sha256: [9; 32],
            group: Some("g".into()),
            trigger: "publish by operator".into(),
            created_ms: T0,
            then: vec![],
            plan: Default::default(),
            follow: Default::default(),
            image: None,
        };
        let a = fleet.process(
            T0,
            vec![
                Input::Hashed {
                    origin: Origin::Operator(900),
                    result: Ok(row.clone()),
                },
                Input::Hashed {
                    origin: Origin::Watch { push: 1 },
                    result: Ok(row),
                },
            ],
        );
        let error = format!("store unavailable: {}", store::Error::DiskFull);
        assert_eq!(
            a,
            vec![
                Action::PushRefused {
                    origin: Origin::Operator(900)
                },
                Action::Reply {
                    conn: 900,
                    resp: Response::err(error),
                },
                Action::PushRefused {
                    origin: Origin::Watch { push: 1 }
                },
            ]
        );
    }

    /// `status` shows per device what its `Welcome` says is pending: the commands the
    /// gateway is to send (none while paused) and the tasks not completed.
    #[test]
    fn status_shows_what_the_welcome_says_is_pending() {
        let mut rig = Rig::new();
        let (d1, k1) = rig.enrol("n1", 1);
        add(&mut rig, "n1", vec![exec("a"), exec("b")]);
        let a = rig.run(vec![Input::Hashed {
            origin: Origin::Operator(900),
            result: Ok(store::Task {
                path: "/srv/image.bin".into(),
                size: 3000,
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
        assert!(
            matches!(a.last(), Some(Action::Reply { resp, .. }) if resp.ok),
            "{a:?}"
        );
        let pending = |rig: &mut Rig| {
            let r = rig.admin(Request::Status);
            let row = &r.data["devices"][0];
            (
                row["pending"].as_u64().unwrap(),
                row["pending_commands"].as_u64().unwrap(),
                row["pending_transfers"].as_u64().unwrap(),
            )
        };
        assert_eq!(pending(&mut rig), (2, 2, 1));
        // Paused: the commands are queued, but none is coming.
        rig.admin(Request::QueuePause {
            device: "n1".into(),
        });
        assert_eq!(pending(&mut rig), (2, 0, 1));
        rig.admin(Request::QueueResume {
            device: "n1".into(),
        });
        // The Welcome carries the same counts.
        let a = rig.hello(3, d1, k1, None);
        let w = a
            .iter()
            .find_map(|a| match a {
                Action::Welcome { welcome, .. } => Some(*welcome),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{a:?}"));
        assert_eq!((w.pending_commands, w.pending_transfers), (2, 1));
        assert_eq!(pending(&mut rig), (2, 2, 1));
        let r = rig.admin(Request::TaskShow { task: None });
        let task = r.data["tasks"][0]["task"].as_u64().unwrap();
        rig.run(vec![Input::Completion {
            conn: 3,
            device: d1,
            task,
            verified: true,
            reason: String::new(),
        }]);
        assert_eq!(pending(&mut rig), (2, 2, 0));
    }
}
