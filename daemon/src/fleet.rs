//! The gateway's fleet logic: what to do with each session event and admin request, written
//! against the store alone and free of sockets, so it is tested without a network.
//!
//! # Driving contract (one loop iteration)
//! 1. The loop turns session events and admin requests into [`Input`]s and calls
//!    [`Fleet::process`] once with all of them and the current wall time.
//! 2. `process` applies every transition in **one** store batch, fires expired command and
//!    reboot deadlines, picks the next command for every device that became free, and commits
//!    once (group commit: one fsync for the whole iteration).
//! 3. Only when the commit succeeded does it return the [`Action`]s (welcomes, acks,
//!    dispatches, admin replies). If the commit fails nothing is acknowledged: every session
//!    touched by the batch is closed (its agent reconnects and resynchronises from the store)
//!    and admin requests get the error.
//!
//! # Invariants
//! - A device is sent its next command only after the previous result is durable (the ack and
//!   the next dispatch leave in the same post-commit action list, after the commit).
//! - At most one command is in flight per device, and the store's cursor names it.
//! - Restart rebuilds everything here from the store ([`Fleet::new`] scans the queues for
//!   deadlines); nothing in memory is needed for correctness, only for speed.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

use fleetcast_store::prelude::*;
use fleetcast_store::{
    self as store, Command, DeviceId, EnrolmentToken, Event, EventKind, Illegal, QueueStatus,
};
use fleetcast_wire::{CloseCode, Welcome};
use serde_json::json;

use crate::admin::{OnFailureSpec, Request, Response, StepSpec};
use crate::convert::{hex, sha256};
use crate::pki::Pki;

/// Identifies a connection (agent session or admin client) for the life of the process.
pub type ConnId = u64;

/// Fleet policy.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Heartbeat interval the agents are told to use.
    pub heartbeat_ms: u32,
    /// How long a device may take to come back from a reboot.
    pub reboot_timeout_ms: u64,
    /// Extra time the gateway waits past a command's own timeout before it gives up on the
    /// session (the agent enforces the timeout itself and reports `TimedOut`).
    pub result_grace_ms: u64,
    /// Lifetime of an enrolment token.
    pub token_ttl_ms: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            heartbeat_ms: 15_000,
            reboot_timeout_ms: 15 * 60_000,
            result_grace_ms: 30_000,
            token_ttl_ms: 7 * 24 * 3_600_000,
        }
    }
}

/// What an agent's `Hello` says it executed last.
#[derive(Debug, Clone, PartialEq)]
pub struct LastSeen {
    /// The command.
    pub seq: u64,
    /// The attempt of it.
    pub attempt: u32,
    /// Still executing it (or rebooting for it).
    pub executing: bool,
    /// Its result, not yet acknowledged.
    pub result: Option<store::CommandResult>,
    /// The configuration report inside that result (from a `report` step).
    pub report: Option<store::ConfigReport>,
}

/// Something that happened, for [`Fleet::process`].
#[derive(Debug, Clone)]
pub enum Input {
    /// An authenticated agent said hello.
    Hello {
        /// Its connection.
        conn: ConnId,
        /// Device id from its certificate (and its Hello).
        device: DeviceId,
        /// SHA-256 of the public key in its certificate.
        key_hash: [u8; 32],
        /// The boot it is on (`Hello.boot_id`).
        boot_id: [u8; 16],
        /// The last command (and attempt) it executed, and that command's unacknowledged
        /// result.
        last: Option<LastSeen>,
        /// The rung of the transport ladder the agent says it came over (`None`: not said).
        transport: Option<store::Transport>,
    },
    /// A new device presents an enrolment token.
    Enrol {
        /// Its connection.
        conn: ConnId,
        /// The token as sent.
        token: Vec<u8>,
        /// The name it claims.
        name: String,
        /// Its public key (SPKI DER).
        spki: Vec<u8>,
    },
    /// A command's result.
    Result {
        /// Connection.
        conn: ConnId,
        /// Device.
        device: DeviceId,
        /// Command.
        seq: u64,
        /// Which attempt of it.
        attempt: u32,
        /// Outcome.
        result: store::CommandResult,
        /// The configuration report inside the result (from a `report` step).
        report: Option<store::ConfigReport>,
    },
    /// The agent's configuration report on its own (`Report`).
    Report {
        /// Connection.
        conn: ConnId,
        /// Device.
        device: DeviceId,
        /// The report.
        report: store::ConfigReport,
    },
    /// The agent is rebooting for command `seq`.
    RebootStarting {
        /// Connection.
        conn: ConnId,
        /// Device.
        device: DeviceId,
        /// Command.
        seq: u64,
        /// The boot it is leaving (`RebootStarting.boot_id`).
        boot_id: [u8; 16],
    },
    /// The agent is back from a reboot, on a new session.
    RebootComplete {
        /// Connection.
        conn: ConnId,
        /// Device.
        device: DeviceId,
        /// The reboot command.
        seq: u64,
        /// The attempt of it the device rebooted for.
        attempt: u32,
        /// Its configuration after the reboot.
        report: store::ConfigReport,
        /// The reboot command's result: the steps before the reboot, as the device ran them.
        result: store::CommandResult,
    },
    /// A session ended.
    Disconnected {
        /// Connection.
        conn: ConnId,
        /// Device, if it had said hello.
        device: Option<DeviceId>,
        /// Why (for the event log).
        reason: String,
    },
    /// An operator request.
    Admin {
        /// Admin connection.
        conn: ConnId,
        /// The request.
        req: Request,
    },
    /// An operator publishes a file to a group (the loop has mapped and hashed it already):
    /// create the task and announce it.
    Push {
        /// Admin connection.
        conn: ConnId,
        /// The task to create (`group` names the targets).
        task: store::Task,
    },
    /// A receiver's final word on a task (`Completion` over its control session).
    Completion {
        /// Connection.
        conn: ConnId,
        /// Device.
        device: DeviceId,
        /// The task.
        task: u64,
        /// Whether the receiver verified the digest.
        verified: bool,
        /// Outcome name and the receiver's reason, for the table and the log.
        reason: String,
    },
    /// A receiver's periodic progress (`TransferStatus` over its control session): recorded
    /// as the task table's `in_progress` (see [`progress_blocks`]).
    TransferProgress {
        /// Connection.
        conn: ConnId,
        /// Device.
        device: DeviceId,
        /// The task.
        task: u64,
        /// Blocks received and written.
        received: u32,
        /// Blocks in the file, as the receiver counts them.
        total: u32,
    },
}

/// What the loop must do after a successful commit, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Accept a session.
    Welcome {
        /// Connection.
        conn: ConnId,
        /// The welcome to send.
        welcome: Welcome,
        /// A command the agent is still executing from an earlier session:
        /// (seq, attempt, command id, has a reboot step).
        resume: Option<(u64, u32, u64, bool)>,
    },
    /// Send the issued certificate to an enrolling device (then close normally).
    Enrolled {
        /// Connection.
        conn: ConnId,
        /// New device id.
        device: DeviceId,
        /// Its certificate (DER).
        cert: Vec<u8>,
    },
    /// Acknowledge a durably stored result.
    Ack {
        /// Connection.
        conn: ConnId,
        /// Command.
        seq: u64,
    },
    /// Send a command.
    Dispatch {
        /// Connection.
        conn: ConnId,
        /// Gateway-wide command id.
        command_id: u64,
        /// Queue position.
        seq: u64,
        /// Attempt number (a redelivery repeats the attempt it redelivers).
        attempt: u32,
        /// The command.
        cmd: Command,
    },
    /// Close a session with a reason.
    Close {
        /// Connection.
        conn: ConnId,
        /// Machine-readable reason.
        code: CloseCode,
        /// Human-readable reason.
        reason: String,
    },
    /// Answer an admin request.
    Reply {
        /// Admin connection.
        conn: ConnId,
        /// The answer.
        resp: Response,
    },
    /// A push created a task: the loop binds the file it mapped for `conn` to `task` (before
    /// the announces that follow in the same action list).
    TaskCreated {
        /// The admin connection that pushed.
        conn: ConnId,
        /// The new task.
        task: store::TaskId,
        /// Its targets.
        targets: Vec<DeviceId>,
    },
    /// Announce `task` over the session of `device`.
    Announce {
        /// The device's connection.
        conn: ConnId,
        /// The device.
        device: DeviceId,
        /// The task.
        task: store::TaskId,
    },
    /// The task table recorded `device`'s completion: tell the task's sender.
    TransferDone {
        /// The device's connection.
        conn: ConnId,
        /// The device.
        device: DeviceId,
        /// The task.
        task: store::TaskId,
        /// Digest verified.
        verified: bool,
    },
}

impl Action {
    /// The connection the action is for.
    pub fn conn(&self) -> ConnId {
        match self {
            Action::Welcome { conn, .. }
            | Action::Enrolled { conn, .. }
            | Action::Ack { conn, .. }
            | Action::Dispatch { conn, .. }
            | Action::Close { conn, .. }
            | Action::Reply { conn, .. }
            | Action::TaskCreated { conn, .. }
            | Action::Announce { conn, .. }
            | Action::TransferDone { conn, .. } => *conn,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Deadline {
    Result { seq: u64 },
    Reboot,
}

#[derive(Debug)]
struct Online {
    conn: ConnId,
    /// The command this session is executing (dispatched, or reported executing in
    /// `Hello.last`, even one the queue no longer has): nothing else is sent until it reports.
    in_flight: Option<u64>,
    /// The boot the session runs on (hex, as in reports).
    boot_id: String,
}

/// What one input's handling may change besides the batch.
struct Cx<'a> {
    online: &'a mut HashMap<DeviceId, Online>,
    actions: &'a mut Vec<Action>,
    dirty: &'a mut BTreeSet<DeviceId>,
    reboots: &'a mut Vec<(u64, DeviceId)>,
    recent_enrolments: &'a mut HashMap<[u8; 32], (DeviceId, u64)>,
}

/// The fleet: store, CA, who is online, and deadlines.
pub struct Fleet {
    /// The storage engine (LMDB by default; see `fleetcast_store::Engine`).
    store: Box<dyn Engine>,
    pki: Pki,
    cfg: FleetConfig,
    online: HashMap<DeviceId, Online>,
    deadlines: BinaryHeap<Reverse<(u64, DeviceId, Deadline)>>,
    /// Tokens consumed lately (token hash → device, ms): an `Enrol` repeated because its
    /// `Enrolled` was lost on the way (a transport rung that swallows answers) gets the
    /// certificate again instead of "used token" (same token, same key, not revoked).
    recent_enrolments: HashMap<[u8; 32], (DeviceId, u64)>,
}

/// How long a consumed token can be repeated (see `Fleet::recent_enrolments`).
const ENROL_REPEAT_MS: u64 = 10 * 60 * 1000;

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("online", &self.online.len())
            .finish_non_exhaustive()
    }
}

/// A gateway-wide command id: device id in the high 24 bits, queue position in the low 40.
pub fn command_id(dev: DeviceId, seq: u64) -> u64 {
    (dev.0 << 40) | (seq & ((1 << 40) - 1))
}

fn illegal_status(e: &store::Error) -> bool {
    matches!(
        e,
        store::Error::IllegalTransition {
            kind: Illegal::WrongStatus { .. }
                | Illegal::NotNextCommand { .. }
                | Illegal::AttemptsExhausted { .. },
            ..
        }
    )
}

impl Fleet {
    /// Opens the fleet over a store, rebuilding deadlines from the queues.
    pub fn new(store: impl Engine + 'static, pki: Pki, cfg: FleetConfig) -> store::Result<Fleet> {
        let mut deadlines = BinaryHeap::new();
        {
            let snap = store.snapshot()?;
            for (dev, q) in snap.queues()? {
                match q.status {
                    QueueStatus::AwaitingResult => {
                        if let Some(seq) = q.cursor {
                            let timeout = snap.command(dev, seq)?.map_or(0, |c| c.timeout_ms);
                            let at = q.transmitted_ms + timeout + cfg.result_grace_ms;
                            deadlines.push(Reverse((at, dev, Deadline::Result { seq })));
                        }
                    }
                    QueueStatus::Rebooting => {
                        deadlines.push(Reverse((q.reboot_deadline_ms, dev, Deadline::Reboot)));
                    }
                    _ => {}
                }
            }
        }
        Ok(Fleet {
            store: Box::new(store),
            pki,
            cfg,
            online: HashMap::new(),
            deadlines,
            recent_enrolments: HashMap::new(),
        })
    }

    /// The store (read access for status pages).
    pub fn store(&self) -> &dyn Engine {
        &*self.store
    }

    /// The store for maintenance outside the fleet's batches (retention pruning deletes only
    /// finished commands and old events, which no fleet state refers to).
    pub fn store_mut(&mut self) -> &mut dyn Engine {
        &mut *self.store
    }

    /// The CA and server identity.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// Devices with a live session.
    pub fn online(&self) -> usize {
        self.online.len()
    }

    /// The earliest deadline (wall ms) the loop must wake up for.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Applies `inputs` and due deadlines in one batch, commits once, and returns what to send.
    pub fn process(&mut self, now_ms: u64, inputs: Vec<Input>) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut dirty = BTreeSet::new();
        let mut touched: Vec<ConnId> = Vec::new();
        let mut reboots: Vec<(u64, DeviceId)> = Vec::new();
        let mut b = match self.store.batch() {
            Ok(b) => b,
            Err(e) => return fail_all(&inputs, &format!("store unavailable: {e}")),
        };
        for input in &inputs {
            let conn = match input {
                Input::Hello { conn, .. }
                | Input::Enrol { conn, .. }
                | Input::Result { conn, .. }
                | Input::Report { conn, .. }
                | Input::RebootStarting { conn, .. }
                | Input::RebootComplete { conn, .. }
                | Input::Disconnected { conn, .. }
                | Input::Admin { conn, .. }
                | Input::Push { conn, .. }
                | Input::Completion { conn, .. }
                | Input::TransferProgress { conn, .. } => *conn,
            };
            touched.push(conn);
            self.recent_enrolments
                .retain(|_, (_, at)| now_ms.saturating_sub(*at) < ENROL_REPEAT_MS);
            let mut cx = Cx {
                online: &mut self.online,
                actions: &mut actions,
                dirty: &mut dirty,
                reboots: &mut reboots,
                recent_enrolments: &mut self.recent_enrolments,
            };
            Self::apply(&mut *b, &mut cx, &self.pki, &self.cfg, now_ms, input);
        }
        // Deadlines.
        while let Some(Reverse((at, dev, what))) = self.deadlines.peek().copied() {
            if at > now_ms {
                break;
            }
            self.deadlines.pop();
            Self::fire(
                &mut *b,
                &mut self.online,
                &self.cfg,
                now_ms,
                dev,
                what,
                &mut actions,
                &mut dirty,
            );
        }
        // Next commands for every device that may have become free.
        for dev in dirty {
            if let Some(a) = Self::next_dispatch(&mut *b, &mut self.online, now_ms, dev) {
                if let Action::Dispatch { seq, ref cmd, .. } = a {
                    let at = now_ms + cmd.timeout_ms + self.cfg.result_grace_ms;
                    self.deadlines
                        .push(Reverse((at, dev, Deadline::Result { seq })));
                }
                actions.push(a);
            }
        }
        for a in &actions {
            if let Action::Close { conn, .. } = a {
                touched.push(*conn);
            }
        }
        match b.commit() {
            Ok(_) => {
                for (at, dev) in reboots {
                    self.deadlines.push(Reverse((at, dev, Deadline::Reboot)));
                }
                actions
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; closing the sessions of this batch");
                for o in self.online.values_mut() {
                    o.in_flight = None;
                }
                self.online.retain(|_, o| !touched.contains(&o.conn));
                let mut out = fail_all(&inputs, &format!("store commit failed: {e}"));
                touched.sort_unstable();
                touched.dedup();
                for conn in touched {
                    if !out.iter().any(|a| a.conn() == conn) {
                        out.push(Action::Close {
                            conn,
                            code: CloseCode::INTERNAL,
                            reason: "gateway store failure".into(),
                        });
                    }
                }
                out
            }
        }
    }

    fn apply(
        b: &mut dyn StoreBatch,
        cx: &mut Cx<'_>,
        pki: &Pki,
        cfg: &FleetConfig,
        now_ms: u64,
        input: &Input,
    ) {
        let Cx {
            online,
            actions,
            dirty,
            reboots,
            recent_enrolments,
        } = cx;
        match input {
            Input::Hello {
                conn,
                device,
                key_hash,
                boot_id,
                last,
                transport,
            } => {
                let conn = *conn;
                let dev = match b.device(*device) {
                    Ok(Some(d)) => d,
                    Ok(None) => {
                        return actions.push(close(
                            conn,
                            CloseCode::UNKNOWN_DEVICE,
                            "device is not enrolled",
                        ))
                    }
                    Err(e) => {
                        return actions.push(close(conn, CloseCode::INTERNAL, &e.to_string()))
                    }
                };
                if dev.revoked {
                    return actions.push(close(
                        conn,
                        CloseCode::REVOKED,
                        "device was revoked by the operator",
                    ));
                }
                if dev.credential_hash != *key_hash {
                    return actions.push(close(
                        conn,
                        CloseCode::UNAUTHENTICATED,
                        "certificate key does not match the enrolled key",
                    ));
                }
                if let Some(old) = online.remove(device) {
                    actions.push(close(
                        old.conn,
                        CloseCode::NORMAL,
                        "replaced by a newer session",
                    ));
                }
                let _ = b.device_seen(
                    *device,
                    now_ms,
                    Some(transport.unwrap_or(store::Transport::Native)),
                );
                let _ = b.append_event(event(
                    now_ms,
                    Some(*device),
                    EventKind::Connected,
                    format!("session {conn}"),
                ));
                // A result the agent still holds: store it (or, when it is obsolete, tell why
                // it is not); either way the agent may forget it, acknowledged below.
                if let Some(LastSeen {
                    seq,
                    attempt,
                    result: Some(result),
                    report,
                    ..
                }) = last
                {
                    // Acknowledged whatever became of it: an agent re-sending it in every Hello
                    // would hold its session's command slot forever.
                    let how = format!("delivered on reconnect, attempt {attempt}");
                    let r = (result, report.as_ref());
                    let _ = store_result(b, now_ms, *device, *seq, *attempt, r, &how);
                }
                let q = b.queue(*device).ok().flatten().unwrap_or_default();
                let (in_flight, resume) = match last {
                    Some(l) if l.executing && l.seq > q.completed_through => {
                        // The agent is still executing it, or back from its reboot: this session
                        // carries its answer, and nothing else goes to it until then. An attempt
                        // the queue has given up on (retried, cancelled) is answered too, and
                        // its result discarded.
                        let reboot = b
                            .command(*device, l.seq)
                            .ok()
                            .flatten()
                            .is_none_or(|c| c.has_reboot());
                        (
                            Some(l.seq),
                            Some((l.seq, l.attempt, command_id(*device, l.seq), reboot)),
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
                let pending = b.incomplete_tasks(*device).map(|t| t.len()).unwrap_or(0);
                actions.push(Action::Welcome {
                    conn,
                    welcome: Welcome {
                        session_id: conn,
                        server_time_ms: now_ms,
                        heartbeat_ms: cfg.heartbeat_ms,
                        acked_seq: q.completed_through,
                        pending_commands: u32::try_from(
                            q.next_seq
                                .saturating_sub(1)
                                .saturating_sub(q.completed_through),
                        )
                        .unwrap_or(u32::MAX),
                        pending_transfers: u32::try_from(pending).unwrap_or(u32::MAX),
                    },
                    resume,
                });
                if let Some(seq) = ack {
                    actions.push(Action::Ack { conn, seq });
                }
                // Catch-up: every task this device has not completed is announced again
                // (after the welcome, on the same session).
                for task in b.incomplete_tasks(*device).unwrap_or_default() {
                    actions.push(Action::Announce {
                        conn,
                        device: *device,
                        task,
                    });
                }
                online.insert(
                    *device,
                    Online {
                        conn,
                        in_flight,
                        boot_id: hex(boot_id),
                    },
                );
                dirty.insert(*device);
            }
            Input::Enrol {
                conn,
                token,
                name,
                spki,
            } => {
                let conn = *conn;
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
                            tracing::info!(
                                device = id.0,
                                "enrolment repeated: certificate sent again"
                            );
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
                    Err(e) => {
                        return actions.push(close(conn, CloseCode::BAD_TOKEN, &e.to_string()))
                    }
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
            Input::Result {
                conn,
                device,
                seq,
                attempt,
                result,
                report,
            } => {
                let r = (result, report.as_ref());
                match store_result(b, now_ms, *device, *seq, *attempt, r, "") {
                    Stored::Answered => actions.push(Action::Ack {
                        conn: *conn,
                        seq: *seq,
                    }),
                    Stored::NeverSent => actions.push(close(
                        *conn,
                        CloseCode::PROTOCOL,
                        &format!("result of command {seq}, which was never sent"),
                    )),
                    Stored::Failed => actions.push(close(
                        *conn,
                        CloseCode::INTERNAL,
                        &format!("result of command {seq} not stored"),
                    )),
                }
                if let Some(o) = online.get_mut(device) {
                    if o.in_flight == Some(*seq) {
                        o.in_flight = None;
                    }
                }
                dirty.insert(*device);
            }
            Input::Report {
                conn: _,
                device,
                report,
            } => {
                if let Err(e) = b.set_report(*device, report.clone(), now_ms) {
                    tracing::warn!(device = device.0, error = %e, "report not stored");
                }
            }
            Input::RebootStarting {
                conn,
                device,
                seq,
                boot_id,
            } => {
                let deadline = now_ms + cfg.reboot_timeout_ms;
                match b.reboot_started(*device, *seq, deadline, &hex(boot_id)) {
                    Ok(()) => {
                        let _ = b.append_event(event(
                            now_ms,
                            Some(*device),
                            EventKind::RebootStarted,
                            format!("command {seq}"),
                        ));
                        reboots.push((deadline, *device));
                    }
                    Err(e) => actions.push(close(
                        *conn,
                        CloseCode::PROTOCOL,
                        &format!("reboot refused: {e}"),
                    )),
                }
                if let Some(o) = online.get_mut(device) {
                    o.in_flight = None;
                }
            }
            Input::RebootComplete {
                conn: _,
                device,
                seq,
                attempt,
                report,
                result,
            } => {
                // The result is the device's own: the steps before the reboot as they ran.
                let r = result.clone();
                match b.reboot_completed(*device, *seq, *attempt, report.clone(), r, now_ms) {
                    Ok(status) => {
                        let _ = b.append_event(event(
                            now_ms,
                            Some(*device),
                            EventKind::RebootCompleted,
                            format!(
                                "command {seq}: back with boot id {} (queue {status})",
                                report.boot_id
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
                            Some(*device),
                            EventKind::Other,
                            format!("reboot completion for command {seq} not applied: {e}"),
                        ));
                    }
                }
                // Applied or not, the device is done with that command.
                if let Some(o) = online.get_mut(device) {
                    if o.in_flight == Some(*seq) {
                        o.in_flight = None;
                    }
                }
                dirty.insert(*device);
            }
            Input::Disconnected {
                conn,
                device,
                reason,
            } => {
                if let Some(dev) = device {
                    if online.get(dev).is_some_and(|o| o.conn == *conn) {
                        online.remove(dev);
                        let _ = b.append_event(event(
                            now_ms,
                            Some(*dev),
                            EventKind::Disconnected,
                            reason.clone(),
                        ));
                    }
                }
            }
            Input::Admin { conn, req } => {
                let resp = admin(b, online, cfg, now_ms, req, dirty, actions);
                actions.push(Action::Reply { conn: *conn, resp });
            }
            Input::Push { conn, task } => push(b, online, now_ms, *conn, task, actions),
            Input::Completion {
                conn,
                device,
                task,
                verified,
                reason,
            } => {
                let id = store::TaskId(*task);
                let r = if *verified {
                    b.task_completed(id, *device)
                } else {
                    b.task_failed(id, *device, reason)
                };
                match r {
                    Ok(()) => {
                        let _ = b.append_event(event(
                            now_ms,
                            Some(*device),
                            EventKind::TaskStatus,
                            format!(
                                "task {task} {}",
                                if *verified {
                                    "completed (digest verified)".to_string()
                                } else {
                                    format!("failed: {reason}")
                                }
                            ),
                        ));
                        if *verified {
                            queue_follow_up(b, now_ms, *device, id, dirty);
                        }
                    }
                    Err(e) => {
                        // A repeated completion (already completed or failed) or an unknown
                        // task: nothing to record; the sender is told anyway.
                        tracing::info!(device = device.0, task, error = %e, "completion not recorded");
                    }
                }
                actions.push(Action::TransferDone {
                    conn: *conn,
                    device: *device,
                    task: id,
                    verified: *verified,
                });
            }
            Input::TransferProgress {
                device,
                task,
                received,
                total,
                ..
            } => record_progress(b, *device, store::TaskId(*task), *received, *total),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn fire(
        b: &mut dyn StoreBatch,
        online: &mut HashMap<DeviceId, Online>,
        _cfg: &FleetConfig,
        now_ms: u64,
        dev: DeviceId,
        what: Deadline,
        actions: &mut Vec<Action>,
        dirty: &mut BTreeSet<DeviceId>,
    ) {
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

    fn next_dispatch(
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
enum Stored {
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
fn store_result(
    b: &mut dyn StoreBatch,
    now_ms: u64,
    dev: DeviceId,
    seq: u64,
    attempt: u32,
    (result, report): (&store::CommandResult, Option<&store::ConfigReport>),
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
    if let Some(report) = report {
        if let Err(e) = b.set_report(dev, report.clone(), now_ms) {
            tracing::warn!(device = dev.0, seq, error = %e, "report of a result not stored");
        }
    }
    Stored::Answered
}

fn wall(now_ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(now_ms)
}

fn close(conn: ConnId, code: CloseCode, reason: &str) -> Action {
    Action::Close {
        conn,
        code,
        reason: reason.to_string(),
    }
}

fn event(time_ms: u64, device: Option<DeviceId>, kind: EventKind, message: String) -> Event {
    Event {
        time_ms,
        device,
        kind,
        message,
    }
}

fn fail_all(inputs: &[Input], msg: &str) -> Vec<Action> {
    inputs
        .iter()
        .filter_map(|i| match i {
            Input::Admin { conn, .. } | Input::Push { conn, .. } => Some(Action::Reply {
                conn: *conn,
                resp: Response::err(msg),
            }),
            Input::Disconnected { .. } => None,
            Input::Hello { conn, .. }
            | Input::Enrol { conn, .. }
            | Input::Result { conn, .. }
            | Input::Report { conn, .. }
            | Input::RebootStarting { conn, .. }
            | Input::RebootComplete { conn, .. }
            | Input::Completion { conn, .. }
            | Input::TransferProgress { conn, .. } => {
                Some(close(*conn, CloseCode::INTERNAL, "gateway store failure"))
            }
        })
        .collect()
}

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

/// Creates a push task for the members of `task.group` and announces it to those online.
fn push(
    b: &mut dyn StoreBatch,
    online: &HashMap<DeviceId, Online>,
    now_ms: u64,
    conn: ConnId,
    task: &store::Task,
    actions: &mut Vec<Action>,
) {
    let group = task.group.clone().unwrap_or_default();
    let targets = match b.group_members(&group) {
        Ok(t) if !t.is_empty() => t,
        Ok(_) => {
            return actions.push(Action::Reply {
                conn,
                resp: Response::err(format!(
                    "group `{group}` has no members: `fleetcast group add {group} DEVICE...` first"
                )),
            })
        }
        Err(e) => {
            return actions.push(Action::Reply {
                conn,
                resp: Response::err(e.to_string()),
            })
        }
    };
    let id = match b.create_task(task.clone(), &targets) {
        Ok(id) => id,
        Err(e) => {
            return actions.push(Action::Reply {
                conn,
                resp: Response::err(e.to_string()),
            })
        }
    };
    let _ = b.append_event(event(
        now_ms,
        None,
        EventKind::TaskStatus,
        format!(
            "task {}: {} ({} bytes) to group {group}, {} targets ({})",
            id.0,
            task.path,
            task.size,
            targets.len(),
            task.trigger
        ),
    ));
    let names: Vec<String> = targets
        .iter()
        .map(|d| {
            b.device(*d)
                .ok()
                .flatten()
                .map_or_else(|| d.0.to_string(), |d| d.name)
        })
        .collect();
    actions.push(Action::TaskCreated {
        conn,
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
    actions.push(Action::Reply {
        conn,
        resp: Response::ok(json!({
            "task": id.0,
            "size": task.size,
            "blocks": task.blocks(),
            "sha256": hex(&task.sha256),
            "targets": names.join(","),
        })),
    });
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
fn record_progress(
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
fn queue_follow_up(
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

/// `task show`: one task's status table, or every task with its counts.
fn task_show(b: &dyn StoreBatch, task: Option<u64>) -> Result<Response, Response> {
    let err = |e: store::Error| Response::err(e.to_string());
    let name = |d: DeviceId| {
        b.device(d)
            .ok()
            .flatten()
            .map_or_else(|| d.0.to_string(), |d| d.name)
    };
    match task {
        Some(id) => {
            let t = b.task(store::TaskId(id)).map_err(err)?.ok_or_else(|| {
                Response::not_found(format!(
                    "no task {id}: `fleetcast task show` lists the tasks"
                ))
            })?;
            let n = t.blocks();
            let rows: Vec<_> = b
                .task_statuses(store::TaskId(id))
                .map_err(err)?
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
                        store::TaskDeviceStatus::Pending => (0, None),
                    };
                    json!({
                        "device": name(d),
                        "id": d.0,
                        "status": st.name(),
                        "blocks": format!("{blocks}/{n}"),
                        "reason": reason,
                    })
                })
                .collect();
            Ok(Response::ok(json!({
                "task": id,
                "path": t.path,
                "size": t.size,
                "block_size": t.block_size,
                "sha256": hex(&t.sha256),
                "group": t.group,
                "trigger": t.trigger,
                "created_ms": t.created_ms,
                "devices": rows,
            })))
        }
        None => {
            let mut rows = Vec::new();
            for (id, t) in b.tasks().map_err(err)? {
                let mut counts: HashMap<&'static str, u64> = HashMap::new();
                for (_, st) in b.task_statuses(id).map_err(err)? {
                    *counts.entry(st.name()).or_default() += 1;
                }
                rows.push(json!({
                    "task": id.0,
                    "path": t.path,
                    "size": t.size,
                    "group": t.group,
                    "completed": counts.get("completed").copied().unwrap_or(0),
                    "in_progress": counts.get("in_progress").copied().unwrap_or(0),
                    "pending": counts.get("pending").copied().unwrap_or(0),
                    "failed": counts.get("failed").copied().unwrap_or(0),
                }));
            }
            Ok(Response::ok(json!({ "tasks": rows })))
        }
    }
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

fn admin(
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
    //! The fleet logic without sockets: inputs in, actions out, the store checked directly.

    use super::*;
    use fleetcast_store::Store;

    /// A device's public key as an agent sends it (P-256 SubjectPublicKeyInfo, DER); made with
    /// the daemon's own certificate library, so these tests need no agent.
    fn device_spki() -> Vec<u8> {
        use rcgen::PublicKeyData as _;
        rcgen::KeyPair::generate()
            .unwrap()
            .subject_public_key_info()
    }

    const T0: u64 = 1_795_000_000_000;
    /// The boot every test device's sessions run on.
    const BOOT: [u8; 16] = [0xB0; 16];

    struct Rig {
        _dir: tempfile::TempDir,
        fleet: Fleet,
        now: u64,
    }

    impl Rig {
        fn new() -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let pki = Pki::load_or_create(&dir.path().join("pki"), &["localhost".into()], wall(T0))
                .unwrap();
            let store = Store::open(dir.path().join("store")).unwrap();
            let cfg = FleetConfig {
                reboot_timeout_ms: 60_000,
                ..FleetConfig::default()
            };
            Rig {
                fleet: Fleet::new(store, pki, cfg).unwrap(),
                _dir: dir,
                now: T0,
            }
        }

        fn run(&mut self, inputs: Vec<Input>) -> Vec<Action> {
            self.now += 10;
            self.fleet.process(self.now, inputs)
        }

        /// A gateway restart: the fleet is rebuilt from the same store and CA.
        fn restart(&mut self) {
            let dir = self._dir.path().to_owned();
            let cfg = self.fleet.cfg.clone();
            let pki =
                || Pki::load_or_create(&dir.join("pki"), &["localhost".into()], wall(T0)).unwrap();
            // The old fleet (and its store environment) is gone before the store reopens.
            let placeholder = Fleet::new(
                Store::open(dir.join("placeholder")).unwrap(),
                pki(),
                cfg.clone(),
            )
            .unwrap();
            drop(std::mem::replace(&mut self.fleet, placeholder));
            self.fleet = Fleet::new(Store::open(dir.join("store")).unwrap(), pki(), cfg).unwrap();
        }

        fn admin(&mut self, req: Request) -> Response {
            match &self.run(vec![Input::Admin { conn: 999, req }])[..] {
                [Action::Reply { resp, .. }] => resp.clone(),
                other => panic!("{other:?}"),
            }
        }

        /// Issues a token and enrols a device over connection `conn`; returns its id and key hash.
        fn enrol(&mut self, name: &str, conn: ConnId) -> (DeviceId, [u8; 32]) {
            let r = self.admin(Request::DeviceAdd {
                name: name.into(),
                groups: vec!["g".into()],
            });
            let token = r.data["token"].as_str().unwrap().to_string();
            let spki = device_spki();
            let a = self.run(vec![Input::Enrol {
                conn,
                token: token.into_bytes(),
                name: name.into(),
                spki: spki.clone(),
            }]);
            match &a[..] {
                [Action::Enrolled { device, .. }] => (*device, sha256(&spki)),
                other => panic!("{other:?}"),
            }
        }

        fn hello(
            &mut self,
            conn: ConnId,
            dev: DeviceId,
            key: [u8; 32],
            last: Option<LastSeen>,
        ) -> Vec<Action> {
            self.run(vec![Input::Hello {
                conn,
                device: dev,
                key_hash: key,
                boot_id: BOOT,
                last,
                transport: None,
            }])
        }

        fn queue(&mut self, dev: DeviceId) -> store::QueueState {
            self.fleet
                .store()
                .snapshot()
                .unwrap()
                .queue(dev)
                .unwrap()
                .unwrap_or_default()
        }
    }

    fn exec(name: &str) -> Vec<StepSpec> {
        vec![StepSpec::Exec {
            argv: vec!["echo".into(), name.into()],
        }]
    }

    fn add(rig: &mut Rig, target: &str, commands: Vec<Vec<StepSpec>>) -> Vec<Action> {
        rig.run(vec![Input::Admin {
            conn: 999,
            req: Request::QueueAdd {
                target: target.into(),
                commands,
                timeout_ms: 10_000,
                max_attempts: 1,
                on_failure: OnFailureSpec::Stop,
            },
        }])
    }

    fn ok_result(steps: usize) -> store::CommandResult {
        store::CommandResult {
            steps: (0..steps)
                .map(|_| store::StepResult {
                    outcome: store::StepOutcome::Ok,
                    exit_code: Some(0),
                    output: vec![],
                    started_ms: T0,
                    finished_ms: T0,
                })
                .collect(),
        }
    }

    /// What a `Hello` says: still executing (`result` none) or finished with `result`.
    fn last(seq: u64, attempt: u32, result: Option<store::CommandResult>) -> Option<LastSeen> {
        Some(LastSeen {
            seq,
            attempt,
            executing: result.is_none(),
            result,
            report: None,
        })
    }

    fn dispatched(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| {
                if let Action::Dispatch { seq, .. } = a {
                    Some(*seq)
                } else {
                    None
                }
            })
            .collect()
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
                report: None,
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
            report: None,
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

    #[test]
    fn reboot_suspends_the_queue_until_a_new_boot_reports() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        rig.hello(2, dev, key, None);
        add(&mut rig, "n1", vec![vec![StepSpec::Reboot], exec("after")]);
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
        let report = |boot: &str| store::ConfigReport {
            os: "Debian".into(),
            kernel: "6.1".into(),
            hostname: "n1".into(),
            addresses: vec![],
            software: vec![],
            agent_version: "0.1.0".into(),
            boot_id: boot.into(),
        };
        // The device's own result of the command: its output before the reboot is kept.
        let mut result = ok_result(1);
        result.steps[0].output = b"kernel installed\n".to_vec();
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
        assert_eq!(d.report.unwrap().boot_id, "b2");
        assert_eq!(snap.result(dev, 1).unwrap(), Some(result));
    }

    #[test]
    fn a_device_that_misses_its_reboot_deadline_fails_visibly() {
        let mut rig = Rig::new();
        let (dev, key) = rig.enrol("n1", 1);
        rig.hello(2, dev, key, None);
        add(&mut rig, "n1", vec![vec![StepSpec::Reboot], exec("after")]);
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
                steps: vec![store::Step::Exec {
                    argv: vec!["/bin/true".into()],
                }],
                timeout_ms: 1000,
                max_attempts: 1,
                on_failure: store::OnFailure::Stop,
            }],
        };
        let a = rig.run(vec![Input::Push {
            conn: 900,
            task: task.clone(),
        }]);
        let id = match &a[..] {
            [Action::TaskCreated {
                conn: 900,
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
        // n2 connects later: the welcome is followed by the announce.
        let a = rig.hello(4, d2, k2, None);
        assert!(
            matches!(&a[..], [Action::Welcome { conn: 4, .. }, Action::Announce { conn: 4, device, task }] if *device == d2 && *task == id),
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
        let a = rig.hello(5, d1, k1, None);
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
        // A push to an empty group is refused before any task exists.
        let a = rig.run(vec![Input::Push {
            conn: 901,
            task: store::Task {
                group: Some("nobody".into()),
                ..task
            },
        }]);
        assert!(
            matches!(&a[..], [Action::Reply { resp, .. }] if !resp.ok),
            "{a:?}"
        );
    }

    fn attempt_of(actions: &[Action], seq: u64) -> Option<u32> {
        actions.iter().find_map(|a| match a {
            Action::Dispatch {
                seq: s, attempt, ..
            } if *s == seq => Some(*attempt),
            _ => None,
        })
    }

    fn failed_result() -> store::CommandResult {
        let mut r = ok_result(1);
        r.steps[0].outcome = store::StepOutcome::Failed;
        r.steps[0].exit_code = Some(3);
        r
    }

    fn result_input(conn: ConnId, dev: DeviceId, seq: u64, attempt: u32, ok: bool) -> Input {
        Input::Result {
            conn,
            device: dev,
            seq,
            attempt,
            result: if ok { ok_result(1) } else { failed_result() },
            report: None,
        }
    }

    fn events_with(rig: &mut Rig, text: &str) -> usize {
        let r = rig.admin(Request::Events {
            from: 0,
            limit: 1000,
        });
        r.data["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["message"].as_str().is_some_and(|m| m.contains(text)))
            .count()
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
        again.steps[0].output = b"attempt 1 once more".to_vec();
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

    fn report_with(os: &str, boot: &str) -> store::ConfigReport {
        store::ConfigReport {
            os: os.into(),
            kernel: "6.1".into(),
            hostname: "n1".into(),
            addresses: vec![],
            software: vec![("nginx".into(), "1.22".into())],
            agent_version: "0.1.0".into(),
            boot_id: boot.into(),
        }
    }

    fn stored_report(rig: &Rig, dev: DeviceId) -> Option<store::ConfigReport> {
        let snap = rig.fleet.store().snapshot().unwrap();
        snap.device(dev).unwrap().unwrap().report
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
            report: report_with("Debian 12", "b1"),
        }]);
        assert_eq!(stored_report(&rig, dev).unwrap().os, "Debian 12");

        add(
            &mut rig,
            "n1",
            vec![vec![StepSpec::Report], vec![StepSpec::Report]],
        );
        let a = rig.run(vec![Input::Result {
            conn: 2,
            device: dev,
            seq: 1,
            attempt: 1,
            result: ok_result(1),
            report: Some(report_with("Debian 13", "b1")),
        }]);
        assert!(matches!(a[0], Action::Ack { seq: 1, .. }), "{a:?}");
        assert_eq!(stored_report(&rig, dev).unwrap().os, "Debian 13");

        rig.run(vec![Input::Disconnected {
            conn: 2,
            device: Some(dev),
            reason: "cut".into(),
        }]);
        let carried = last(2, 1, Some(ok_result(1))).map(|l| LastSeen {
            report: Some(report_with("Debian 14", "b1")),
            ..l
        });
        rig.hello(3, dev, key, carried);
        assert_eq!(rig.queue(dev).status, QueueStatus::Done);
        assert_eq!(stored_report(&rig, dev).unwrap().os, "Debian 14");
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
            vec![vec![StepSpec::Reboot], vec![StepSpec::Reboot]],
        );
        assert_eq!(stored_report(&rig, dev), None);
        let complete = |conn, seq, boot: [u8; 16]| Input::RebootComplete {
            conn,
            device: dev,
            seq,
            attempt: 1,
            report: report_with("Debian", &hex(&boot)),
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
