//! The answers to operator requests, as typed structs: each serializes to the JSON object the
//! CLI reads (`Response::data`), field for field, so the shape of an answer is written once,
//! here, and the CLI's rendering of it stays in `cli/`.
//!
//! # Invariants
//! - A field that the request has no value for is `null`, never absent (the CLI tells "not
//!   known" from "not sent" by the key alone).
//! - Fields are declared in the order the answers always had, for a JSON map that keeps order.

use std::collections::HashMap;

use fleetcast_store::{self as store, EventId};
use serde::Serialize;

use crate::admin::Response;

/// A successful answer carrying `data`.
pub(super) fn reply(data: &impl Serialize) -> Response {
    match serde_json::to_value(data) {
        Ok(v) => Response::ok(v),
        // Only a map with non-string keys fails, and no answer here has one.
        Err(e) => Response::err(format!("answer not encodable: {e}")),
    }
}

/// `device add`: the enrolment token issued.
#[derive(Debug, Serialize)]
pub(super) struct DeviceAdded {
    pub name: String,
    pub token: String,
    pub expires_ms: u64,
}

/// `device list`.
#[derive(Debug, Serialize)]
pub(super) struct DeviceList {
    pub devices: Vec<DeviceRow>,
}

/// One device in `device list`.
#[derive(Debug, Serialize)]
pub(super) struct DeviceRow {
    pub name: String,
    pub id: u64,
    pub online: bool,
    pub revoked: bool,
    pub queue: &'static str,
    pub last_seen_ms: Option<u64>,
    pub transport: Option<String>,
    pub boot_id: Option<String>,
}

/// `device show NAME`: the device and its latest configuration report.
#[derive(Debug, Serialize)]
pub(super) struct DeviceShown {
    pub name: String,
    pub id: u64,
    pub online: bool,
    pub revoked: bool,
    pub enrolled_ms: u64,
    pub last_seen_ms: Option<u64>,
    pub transport: Option<String>,
    /// When the report was stored (`null`: no report, or one kept from before the time was).
    pub report_ms: Option<u64>,
    /// The last A/B update: `command 7: committed slot b`, `command 7: rolled back: health
    /// check failed; …`, `command 6: rebooting into the new slot` (none: never updated).
    pub update: Option<String>,
    pub report: Option<ReportView>,
}

/// A configuration report, every field of it.
#[derive(Debug, Serialize)]
pub(super) struct ReportView {
    pub boot_id: String,
    pub os: String,
    pub kernel: String,
    pub hostname: String,
    pub agent_version: String,
    pub addresses: Vec<String>,
    pub cpu_model: String,
    pub cpus: u16,
    pub memory: u64,
    pub package_manager: &'static str,
    pub software: Vec<PackageRow>,
    pub devices: Vec<AttachedRow>,
}

/// One installed package.
#[derive(Debug, Serialize)]
pub(super) struct PackageRow {
    pub name: String,
    pub version: String,
}

/// One attached device; `target` is what `queue add --target` takes to name it.
#[derive(Debug, Serialize)]
pub(super) struct AttachedRow {
    pub kind: &'static str,
    pub name: String,
    pub id: String,
    pub wwn: String,
    pub model: String,
    pub size: u64,
    pub target: String,
}

impl ReportView {
    pub(super) fn of(r: &fleetcast_wire::ConfigReport<'_>) -> Self {
        ReportView {
            boot_id: fleetcast_wire::hex(&r.boot_id),
            os: r.os.to_string(),
            kernel: r.kernel.to_string(),
            hostname: r.hostname.to_string(),
            agent_version: r.agent_version.to_string(),
            addresses: r.addresses.iter().map(|a| a.to_string()).collect(),
            cpu_model: r.cpu_model.to_string(),
            cpus: r.cpus,
            memory: r.memory,
            package_manager: r.package_manager.name(),
            software: r
                .software
                .iter()
                .map(|p| PackageRow {
                    name: p.name.to_string(),
                    version: p.version.to_string(),
                })
                .collect(),
            devices: r
                .devices
                .iter()
                .map(|d| AttachedRow {
                    kind: d.kind.name(),
                    name: d.name.to_string(),
                    id: d.id.to_string(),
                    wwn: d.wwn.to_string(),
                    model: d.model.to_string(),
                    size: d.size,
                    target: format!("{}:{}", d.kind.name(), d.id),
                })
                .collect(),
        }
    }
}

/// `device revoke`.
#[derive(Debug, Serialize)]
pub(super) struct Revoked {
    pub revoked: String,
}

/// `group add`.
#[derive(Debug, Serialize)]
pub(super) struct GroupAdded {
    pub group: String,
    pub added: Vec<String>,
}

/// `group list`.
#[derive(Debug, Serialize)]
pub(super) struct GroupList {
    pub groups: Vec<GroupRow>,
}

/// One group: its members' names, comma-separated.
#[derive(Debug, Serialize)]
pub(super) struct GroupRow {
    pub group: String,
    pub members: String,
}

/// `queue add`: every command queued, for a device or for each member of a group.
#[derive(Debug, Serialize)]
pub(super) struct Queued {
    pub queued: Vec<QueuedRow>,
}

/// One queued command.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(super) enum QueuedRow {
    /// Queued for the device named in the request.
    Device { device: String, seq: u64 },
    /// Queued for a member of the group named in the request.
    Member { device_id: u64, seq: u64 },
}

/// A device's queue state, in `queue show` and the answers of the queue controls.
#[derive(Debug, Serialize)]
pub(super) struct QueueView {
    pub status: &'static str,
    pub cursor: Option<u64>,
    pub completed_through: u64,
    pub pending: u64,
    pub attempts: u32,
    pub attempt: u32,
    pub failure: Option<String>,
}

impl QueueView {
    pub(super) fn of(q: &store::QueueState) -> QueueView {
        QueueView {
            status: q.status.name(),
            cursor: q.cursor,
            completed_through: q.completed_through,
            pending: q
                .next_seq
                .saturating_sub(1)
                .saturating_sub(q.completed_through),
            attempts: q.attempts,
            attempt: q.attempt,
            failure: q.failure.map(|f| format!("{f:?}")),
        }
    }
}

/// `queue show`.
#[derive(Debug, Serialize)]
pub(super) struct QueueShown {
    pub device: String,
    pub queue: QueueView,
    pub commands: Vec<CommandRow>,
}

/// One command in `queue show`.
#[derive(Debug, Serialize)]
pub(super) struct CommandRow {
    pub seq: u64,
    pub steps: usize,
    pub state: &'static str,
    pub exit_code: Option<i32>,
    pub output: Option<String>,
    /// The attached device the command operates on (`KIND:ID`), if it names one.
    pub target: Option<String>,
}

/// `queue pause|resume|cancel|retry|skip`.
#[derive(Debug, Serialize)]
pub(super) struct QueueChanged {
    pub device: String,
    pub done: String,
    pub queue: QueueView,
}

/// `status`.
#[derive(Debug, Serialize)]
pub(super) struct FleetStatus {
    pub online: usize,
    pub queues: HashMap<String, u64>,
    pub last_event: EventId,
    pub devices: Vec<StatusRow>,
    /// Tasks whose multicast waits for devices of their group to come online.
    pub waiting: Vec<TaskWaiting>,
}

/// A task held back by its online gate (`push --when-online`; see `follow.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(super) struct TaskWaiting {
    pub task: u64,
    pub group: String,
    /// Members of the group online now.
    pub online: u32,
    /// Devices the gate waits for.
    pub needed: u32,
    /// In words: "7 of 20 devices of rack7 online".
    pub waiting: String,
}

/// One device in `status`, with its last configuration report.
#[derive(Debug, Serialize)]
pub(super) struct StatusRow {
    pub name: String,
    pub online: bool,
    pub revoked: bool,
    pub queue: &'static str,
    pub cursor: Option<u64>,
    pub done: u64,
    pub pending: u64,
    /// What the device's `Welcome` says is pending (see `session::pending_actions`).
    pub pending_commands: u32,
    pub pending_transfers: u32,
    pub transport: Option<String>,
    pub last_seen_ms: Option<u64>,
    pub hostname: Option<String>,
    pub os: Option<String>,
    pub kernel: Option<String>,
    pub agent: Option<String>,
    pub boot_id: Option<String>,
    pub addresses: Option<String>,
    pub packages: Option<usize>,
}

/// `events`.
#[derive(Debug, Serialize)]
pub(super) struct Events {
    pub events: Vec<EventRow>,
}

/// One event.
#[derive(Debug, Serialize)]
pub(super) struct EventRow {
    pub id: EventId,
    pub time_ms: u64,
    pub device: Option<u64>,
    pub kind: String,
    pub message: String,
}

/// `push`: the task created.
#[derive(Debug, Serialize)]
pub(super) struct Pushed {
    pub task: u64,
    pub size: u64,
    pub blocks: u32,
    pub sha256: String,
    pub targets: String,
}

/// `task show TASK`: one task and every target's status.
#[derive(Debug, Serialize)]
pub(super) struct TaskShown {
    pub task: u64,
    pub path: String,
    pub size: u64,
    pub block_size: u32,
    pub sha256: String,
    pub group: Option<String>,
    pub trigger: String,
    pub created_ms: u64,
    /// While the online gate holds the multicast back: "7 of 20 devices of rack7 online".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// An image task's target and form (absent for a file task).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<TaskImageShown>,
    pub devices: Vec<TaskDeviceRow>,
}

/// An image task in `task show`.
#[derive(Debug, Serialize)]
pub(super) struct TaskImageShown {
    /// As the operator named it.
    pub target: String,
    /// `raw`, `sparse` or `compressed`.
    pub form: &'static str,
    /// Bytes of the image on each target.
    pub image_bytes: u64,
    /// Its data bytes (what a sparse push sends).
    pub data_bytes: u64,
}

/// One target of a task.
#[derive(Debug, Serialize)]
pub(super) struct TaskDeviceRow {
    pub device: String,
    pub id: u64,
    pub status: &'static str,
    pub blocks: String,
    /// An image task: image bytes received of the image's (the stream's share).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_bytes: Option<String>,
    pub reason: Option<String>,
}

/// `task show`: every task with its counts.
#[derive(Debug, Serialize)]
pub(super) struct TaskList {
    pub tasks: Vec<TaskRow>,
}

/// One task in `task show`.
#[derive(Debug, Serialize)]
pub(super) struct TaskRow {
    pub task: u64,
    pub path: String,
    pub size: u64,
    pub group: Option<String>,
    pub completed: u64,
    pub in_progress: u64,
    pub pending: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// `task cancel|retry`: the targets changed, comma-separated.
#[derive(Debug, Serialize)]
pub(super) struct TaskChanged {
    pub task: u64,
    pub done: &'static str,
    pub devices: String,
}
