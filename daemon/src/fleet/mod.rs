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

mod admin;
mod deadlines;
#[cfg(test)]
mod rig;
mod session;
mod tasks;

use admin::admin;
pub use admin::commands_from_specs;
use deadlines::Deadline;
use session::{store_result, Stored};
pub use tasks::progress_blocks;
use tasks::{push, queue_follow_up, record_progress, task_show};

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
