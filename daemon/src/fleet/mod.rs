//! The gateway's fleet logic: what to do with each session event and admin request, written
//! against the store alone and free of sockets, so it is tested without a network.
//!
//! # Driving contract (one loop iteration)
//! 1. The loop turns session events, admin requests and pushed files' digests into
//!    [`Input`]s and calls [`Fleet::process`] once with all of them and the current wall
//!    time. Every admin request is the fleet's but `metrics` and `backup` (the loop's own
//!    state); a push comes back as [`Input::Hashed`] after the loop prepared its file
//!    ([`Action::PreparePush`]), carrying its [`Origin`] throughout.
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
use std::sync::Arc;

use fleetcast_store::prelude::*;
use fleetcast_store::{
    self as store, Command, DeviceId, EnrolmentToken, Event, EventKind, Illegal, QueueStatus,
};
use fleetcast_wire::{self as wire, hex, CloseCode, Welcome};

use crate::admin::{OnFailureSpec, PushTrigger, Request, Response};
use crate::pki::{sha256, Pki};

mod admin;
mod deadlines;
mod finisher;
mod follow;
mod responses;
#[cfg(test)]
mod rig;
mod session;
mod task_control;
mod tasks;

pub use admin::{commands_from_specs, AdminError, CommandError, FOLLOW_UP_TIMEOUT_MS};
use deadlines::Deadline;
use task_control::TaskControl;
pub use tasks::progress_blocks;
use tasks::{push, record_progress, task_show};

/// Identifies a connection (agent session or admin client) for the life of the process.
pub type ConnId = u64;

/// Who asked for a push, and so who hears how it went. It travels with the push from the
/// request to the task: [`Action::PreparePush`], the distributor's prepared file,
/// [`Input::Hashed`], [`Action::TaskCreated`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// An operator's `push` over this admin connection: every outcome is answered there.
    Operator(ConnId),
    /// A file that settled in the watched directory: answered to no one (its failures are
    /// logged). `push` numbers the watch's pushes since the gateway started, so two pushes
    /// of it in flight at once (the same file changed again while hashing) stay apart.
    Watch {
        /// The watch's push number.
        push: u64,
    },
}

impl Origin {
    /// The admin connection to answer, if any.
    pub fn conn(self) -> Option<ConnId> {
        match self {
            Origin::Operator(conn) => Some(conn),
            Origin::Watch { .. } => None,
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Operator(conn) => write!(f, "admin connection {conn}"),
            Origin::Watch { push } => write!(f, "watched-directory push {push}"),
        }
    }
}

/// A push to prepare: what the distributor maps and hashes before the fleet creates the
/// task (validated already: its trigger and follow-up commands keep the rules).
#[derive(Debug, Clone, PartialEq)]
pub struct PushSpec {
    /// The file, as the gateway opens it.
    pub path: String,
    /// Target group.
    pub group: String,
    /// Payload bytes per datagram.
    pub block_size: u32,
    /// Rate ceiling, Mbit/s.
    pub rate_mbps: u64,
    /// What asked for it, in words (the task table's trigger starts with this).
    pub reason: String,
    /// When the multicast starts.
    pub trigger: PushTrigger,
    /// Follow-up commands per verified device.
    pub then: Vec<Command>,
    /// Multicast group or broadcast (the distributor resolves and checks it).
    pub delivery: crate::admin::Delivery,
    /// Devices beyond the group's members now, and the online gate (kept in the task row).
    pub follow: store::TaskFollow,
    /// An image's target and map (the distributor reads and checks the map).
    pub image: Option<crate::admin::PushImage>,
}

/// Why the distributor could not prepare a push's file (cannot map or read it, a geometry
/// the sender refuses). The distributor's own typed error, kept whole: the fleet only
/// answers and logs it, and shares it (`Arc`) because inputs are cloneable.
pub type PrepareError = Arc<dyn std::error::Error + Send + Sync>;

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
    /// Its result, not yet acknowledged (with its configuration report, from a `report`
    /// step), and when it arrived.
    pub result: Option<store::Received>,
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
        /// Outcome (with the configuration report of a `report` step), and when it arrived.
        result: store::Received,
    },
    /// The agent's configuration report on its own (`Report`).
    Report {
        /// Connection.
        conn: ConnId,
        /// Device.
        device: DeviceId,
        /// The report.
        report: wire::ConfigReport<'static>,
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
        report: wire::ConfigReport<'static>,
        /// The reboot command's result: the steps before the reboot, as the device ran them.
        result: store::Received,
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
    /// A push's file is mapped and hashed ([`Action::PreparePush`] asked for it): create the
    /// task and announce it; or the distributor could not prepare it: say why.
    Hashed {
        /// Who pushed.
        origin: Origin,
        /// The task to create (`group` names the targets), or why there is none.
        result: Result<store::Task, PrepareError>,
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
    /// A task's multicast first pass is over (or its group sender ended before one): the
    /// task table records it, so a restart catches its devices up instead of multicasting
    /// the file again.
    PassDone {
        /// The task.
        task: store::TaskId,
    },
    /// The device's task finisher asks for a task's completion (`TaskAsk`; see `finisher.rs`).
    TaskAsk {
        /// Connection.
        conn: ConnId,
        /// Device (the session core checked the ask names it).
        device: DeviceId,
        /// The task, or 0: every other task of the device.
        task: u64,
        /// Blocks in the file, as the device's record says (0: no record).
        total: u32,
        /// The blocks it holds.
        have: store::BlockSet,
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
    /// A valid push: the loop has the distributor map and hash its file, and gives the
    /// digest back as [`Input::Hashed`].
    PreparePush {
        /// Who pushed.
        origin: Origin,
        /// What to push.
        spec: PushSpec,
    },
    /// A prepared push gets no task (refused after its file was mapped): the loop forgets
    /// the mapping.
    PushRefused {
        /// Who pushed.
        origin: Origin,
    },
    /// A push created a task: the loop binds the file it mapped for `origin` to `task`
    /// (before the announces that follow in the same action list).
    TaskCreated {
        /// Who pushed.
        origin: Origin,
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
    /// The task table recorded `device`'s completion (or an operator cancelled it): tell the
    /// task's sender.
    TransferDone {
        /// The device's connection (0 when it has none: the loop does not use it).
        conn: ConnId,
        /// The device.
        device: DeviceId,
        /// The task.
        task: store::TaskId,
        /// Digest verified.
        verified: bool,
    },
    /// Answer a device's `TaskAsk` (after the task's `Announce`, when it is served).
    TaskAnswer {
        /// The device's connection.
        conn: ConnId,
        /// The answer.
        answer: wire::TaskAnswer,
    },
}

impl Input {
    /// The connection the input came from (none: a watched-directory push).
    pub fn conn(&self) -> Option<ConnId> {
        Some(match self {
            Input::Hello { conn, .. }
            | Input::Enrol { conn, .. }
            | Input::Result { conn, .. }
            | Input::Report { conn, .. }
            | Input::RebootStarting { conn, .. }
            | Input::RebootComplete { conn, .. }
            | Input::Disconnected { conn, .. }
            | Input::Admin { conn, .. }
            | Input::Completion { conn, .. }
            | Input::TransferProgress { conn, .. }
            | Input::TaskAsk { conn, .. } => *conn,
            Input::Hashed { origin, .. } => return origin.conn(),
            Input::PassDone { .. } => return None,
        })
    }
}

impl Action {
    /// The connection the action is for (none: an action for the distributor alone, of a
    /// watched-directory push).
    pub fn conn(&self) -> Option<ConnId> {
        Some(match self {
            Action::Welcome { conn, .. }
            | Action::Enrolled { conn, .. }
            | Action::Ack { conn, .. }
            | Action::Dispatch { conn, .. }
            | Action::Close { conn, .. }
            | Action::Reply { conn, .. }
            | Action::Announce { conn, .. }
            | Action::TransferDone { conn, .. }
            | Action::TaskAnswer { conn, .. } => *conn,
            Action::PreparePush { origin, .. }
            | Action::PushRefused { origin }
            | Action::TaskCreated { origin, .. } => return origin.conn(),
        })
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
    /// Tasks this session's finisher asked about (a from-zero ask serves the others).
    asked: BTreeSet<u64>,
}

/// One input's handling: the batch it writes to, what it may change besides, and the time.
struct Cx<'a> {
    b: &'a mut dyn StoreBatch,
    pki: &'a Pki,
    cfg: &'a FleetConfig,
    /// The gateway has a distributor (multicast on): pushes are possible.
    multicast: bool,
    /// The gateway's id in its cell, if it is in one (devices come and go between gateways).
    cell: Option<&'a str>,
    now_ms: u64,
    online: &'a mut HashMap<DeviceId, Online>,
    actions: &'a mut Vec<Action>,
    dirty: &'a mut BTreeSet<DeviceId>,
    /// Deadlines this batch sets (a reboot started, a device claimed from another gateway),
    /// armed once it commits.
    armed: &'a mut Vec<(u64, DeviceId, Deadline)>,
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
    /// The gateway has a distributor (see [`Fleet::set_multicast`]).
    multicast: bool,
    /// In a cell: how often the lease is renewed, and when next (wall ms).
    lease: Option<LeaseRenewal>,
}

/// When a gateway in a cell renews its lease ([`Fleet::join_cell`]).
#[derive(Debug, Clone)]
struct LeaseRenewal {
    /// The gateway's id in the cell (for the event log).
    gateway: String,
    every_ms: u64,
    due_ms: u64,
    /// The last renewal found the lease may have lapsed: nothing is committed until it is
    /// renewed or joined again.
    lapsed: bool,
}

/// Why a gateway whose lease may have lapsed closes sessions and refuses new ones.
const LAPSED: &str = "the gateway cannot reach the cell's database; reconnect";

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
                if let Some((at, what)) = deadline_of(&*snap, &cfg, dev, &q)? {
                    deadlines.push(Reverse((at, dev, what)));
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
            multicast: false,
            lease: None,
        })
    }

    /// The fleet of gateway `gateway` of a cell (its store joined the cell already): the
    /// lease is renewed every `every_ms` ([`Engine::keep_lease`]) as part of
    /// [`Fleet::process`], and [`Fleet::next_deadline`] includes the renewal.
    pub fn join_cell(&mut self, gateway: &str, every_ms: u64) {
        self.lease = Some(LeaseRenewal {
            gateway: gateway.to_string(),
            every_ms: every_ms.max(1),
            due_ms: 0,
            lapsed: false,
        });
    }

    /// Renews the lease when due (a store may renew it on a thread of its own: then this
    /// hears what that thread found). A lease that may have lapsed, or had lapsed and was
    /// joined again as a new incarnation that owns nothing: every session is closed (their
    /// agents come back and claim their devices again, here or at another gateway) and their
    /// commands are no longer in flight here.
    fn keep_lease(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(l) = &mut self.lease else { return };
        if now_ms < l.due_ms {
            return;
        }
        l.due_ms = now_ms + l.every_ms;
        match self.store.keep_lease() {
            Ok(store::Lease::Held) => {
                if std::mem::take(&mut l.lapsed) {
                    tracing::info!("the cell lease is renewed again: serving");
                }
            }
            // Other gateways may be taking this one's devices: its sessions go, so their
            // agents find a gateway that can serve them (this one refuses them until its
            // lease is renewed or joined again).
            Ok(store::Lease::Lapsed) => {
                if !std::mem::replace(&mut l.lapsed, true) {
                    tracing::warn!(
                        sessions = self.online.len(),
                        "the cell lease was not renewed for a whole lease (database \
                         unreachable?): closing every session"
                    );
                }
                self.close_every_session(LAPSED, actions);
            }
            Ok(store::Lease::Rejoined { incarnation }) => {
                l.lapsed = false;
                tracing::warn!(
                    incarnation,
                    sessions = self.online.len(),
                    "the cell lease had lapsed: joined again; closing every session"
                );
                self.close_every_session("the gateway lost its cell lease; reconnect", actions);
            }
            // The lease may still be live; the next renewal tries again. Meanwhile batches
            // fail the same way and acknowledge nothing.
            Err(e) => tracing::warn!(error = %e, "cell lease not renewed"),
        }
    }

    /// Closes every session as OVERLOADED (their agents try another gateway of the cell at
    /// once), saying `why`.
    fn close_every_session(&mut self, why: &str, actions: &mut Vec<Action>) {
        for (_, o) in self.online.drain() {
            actions.push(close(o.conn, CloseCode::OVERLOADED, why));
        }
    }

    /// Gives the cell lease up (a clean stop), so the others claim this gateway's devices at
    /// once.
    pub fn leave_cell(&mut self) {
        if self.lease.is_none() {
            return;
        }
        match self.store.leave_cell() {
            Ok(()) => tracing::info!("left the cell"),
            Err(e) => tracing::warn!(error = %e, "cell lease not given up; it runs out"),
        }
    }

    /// Whether the gateway has a distributor (multicast on: `--mcast-addr`); off until the
    /// gateway says so, and a push is refused while it is off. The gateway sets it once,
    /// from the distributor it opened, before the first batch.
    pub fn set_multicast(&mut self, on: bool) {
        self.multicast = on;
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
        let next = self.deadlines.peek().map(|Reverse((at, _, _))| *at);
        next.into_iter()
            .chain(self.lease.as_ref().map(|l| l.due_ms))
            .min()
    }

    /// Applies `inputs` and due deadlines in one batch, commits once, and returns what to send.
    pub fn process(&mut self, now_ms: u64, inputs: Vec<Input>) -> Vec<Action> {
        let mut actions = Vec::new();
        self.keep_lease(now_ms, &mut actions);
        if self.lease.as_ref().is_some_and(|l| l.lapsed) {
            // Nothing can be committed (the fence refuses a lapsed lease) and trying would
            // hold this thread for the database's timeouts: everything is refused at once,
            // so agents go to another gateway of the cell now, not after those timeouts.
            for i in &inputs {
                if let Input::Disconnected { conn, .. } = i {
                    self.online.retain(|_, o| o.conn != *conn);
                }
            }
            actions.extend(fail_all(&inputs, CloseCode::OVERLOADED, LAPSED));
            return actions;
        }
        // Devices here whose queues an operator changed through another gateway of the cell.
        let poked: BTreeSet<DeviceId> = match self.lease {
            Some(_) => self
                .store
                .changed_elsewhere()
                .into_iter()
                .filter(|d| self.online.contains_key(d))
                .collect(),
            None => BTreeSet::new(),
        };
        let due = self
            .deadlines
            .peek()
            .is_some_and(|Reverse((at, _, _))| *at <= now_ms);
        // Woken for the lease alone: no batch.
        if !inputs.is_empty() || due || !poked.is_empty() {
            actions.extend(self.process_batch(now_ms, inputs, poked));
        }
        actions
    }

    /// [`Fleet::process`]'s batch: the inputs and due deadlines, committed once; `dirty`
    /// devices may have a command to send whatever the inputs.
    fn process_batch(
        &mut self,
        now_ms: u64,
        inputs: Vec<Input>,
        mut dirty: BTreeSet<DeviceId>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut touched: Vec<ConnId> = Vec::new();
        let mut armed: Vec<(u64, DeviceId, Deadline)> = Vec::new();
        let mut b = match self.store.batch() {
            Ok(b) => b,
            Err(e) => {
                return fail_all(
                    &inputs,
                    CloseCode::INTERNAL,
                    &format!("store unavailable: {e}"),
                )
            }
        };
        for input in &inputs {
            touched.extend(input.conn());
            self.recent_enrolments
                .retain(|_, (_, at)| now_ms.saturating_sub(*at) < ENROL_REPEAT_MS);
            let mut cx = Cx {
                b: &mut *b,
                pki: &self.pki,
                cfg: &self.cfg,
                multicast: self.multicast,
                cell: self.lease.as_ref().map(|l| l.gateway.as_str()),
                now_ms,
                online: &mut self.online,
                actions: &mut actions,
                dirty: &mut dirty,
                armed: &mut armed,
                recent_enrolments: &mut self.recent_enrolments,
            };
            Self::apply(&mut cx, input);
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
                for (at, dev, what) in armed {
                    self.deadlines.push(Reverse((at, dev, what)));
                }
                actions
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; closing the sessions of this batch");
                for o in self.online.values_mut() {
                    o.in_flight = None;
                }
                self.online.retain(|_, o| !touched.contains(&o.conn));
                let mut out = fail_all(
                    &inputs,
                    CloseCode::INTERNAL,
                    &format!("store commit failed: {e}"),
                );
                touched.sort_unstable();
                touched.dedup();
                for conn in touched {
                    if !out.iter().any(|a| a.conn() == Some(conn)) {
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

    /// Routes one input to its handler (each in the module of its concern).
    fn apply(cx: &mut Cx<'_>, input: &Input) {
        match input {
            Input::Hello {
                conn,
                device,
                key_hash,
                boot_id,
                last,
                transport,
            } => cx.hello(*conn, *device, key_hash, boot_id, last, *transport),
            Input::Enrol {
                conn,
                token,
                name,
                spki,
            } => cx.enrol(*conn, token, name, spki),
            Input::Result {
                conn,
                device,
                seq,
                attempt,
                result,
            } => cx.result(*conn, *device, *seq, *attempt, result),
            Input::Report { device, report, .. } => cx.report(*device, report),
            Input::RebootStarting {
                conn,
                device,
                seq,
                boot_id,
            } => cx.reboot_starting(*conn, *device, *seq, boot_id),
            Input::RebootComplete {
                device,
                seq,
                attempt,
                report,
                result,
                ..
            } => cx.reboot_complete(*device, *seq, *attempt, report, result),
            Input::Disconnected {
                conn,
                device,
                reason,
            } => cx.disconnected(*conn, device.as_ref(), reason),
            Input::Admin { conn, req } => {
                // An operator acts on the whole fleet of a cell, not only on the devices this
                // gateway holds (see `StoreBatch::operator_writes`).
                cx.b.operator_writes(true);
                cx.admin(*conn, req);
                cx.b.operator_writes(false);
            }
            Input::Hashed { origin, result } => {
                push(cx.b, cx.online, cx.now_ms, *origin, result, cx.actions)
            }
            Input::Completion {
                conn,
                device,
                task,
                verified,
                reason,
            } => cx.completion(*conn, *device, *task, *verified, reason),
            Input::TransferProgress {
                device,
                task,
                received,
                total,
                ..
            } => record_progress(cx.b, *device, store::TaskId(*task), *received, *total),
            Input::TaskAsk {
                conn,
                device,
                task,
                total,
                have,
            } => cx.task_ask(*conn, *device, *task, *total, have),
            Input::PassDone { task } => {
                // A task gone (pruned) or a store refusal only costs a restart's second
                // multicast of the file: logged, nothing else to undo.
                if let Err(e) = cx.b.task_pass_done(*task) {
                    tracing::warn!(task = task.0, error = %e, "first pass not recorded");
                }
            }
        }
    }
}

/// The deadline a queue in state `q` waits on, if any: its command's result (with the
/// grace), or the device's return from a reboot.
fn deadline_of(
    r: &dyn Reads,
    cfg: &FleetConfig,
    dev: DeviceId,
    q: &store::QueueState,
) -> store::Result<Option<(u64, Deadline)>> {
    Ok(match q.status {
        QueueStatus::AwaitingResult => match q.cursor {
            Some(seq) => {
                let timeout = r.command(dev, seq)?.map_or(0, |c| c.timeout_ms);
                let at = q.transmitted_ms + timeout + cfg.result_grace_ms;
                Some((at, Deadline::Result { seq }))
            }
            None => None,
        },
        QueueStatus::Rebooting => Some((q.reboot_deadline_ms, Deadline::Reboot)),
        _ => None,
    })
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

fn fail_all(inputs: &[Input], code: CloseCode, msg: &str) -> Vec<Action> {
    inputs
        .iter()
        .flat_map(|i| match i {
            Input::Admin { conn, .. } => vec![Action::Reply {
                conn: *conn,
                resp: Response::err(msg),
            }],
            // No task: the mapping goes, and whoever pushed hears why.
            Input::Hashed { origin, .. } => {
                let refused = Action::PushRefused { origin: *origin };
                match origin.conn() {
                    Some(conn) => vec![
                        refused,
                        Action::Reply {
                            conn,
                            resp: Response::err(msg),
                        },
                    ],
                    None => {
                        tracing::warn!(%origin, error = msg, "watched file not pushed");
                        vec![refused]
                    }
                }
            }
            Input::Disconnected { .. } | Input::PassDone { .. } => vec![],
            Input::Hello { conn, .. }
            | Input::Enrol { conn, .. }
            | Input::Result { conn, .. }
            | Input::Report { conn, .. }
            | Input::RebootStarting { conn, .. }
            | Input::RebootComplete { conn, .. }
            | Input::Completion { conn, .. }
            | Input::TransferProgress { conn, .. }
            | Input::TaskAsk { conn, .. } => {
                vec![close(*conn, code, msg)]
            }
        })
        .collect()
}
