//! The store's typed errors.
//!
//! Invariants:
//! - An [`Error::IllegalTransition`] is returned *before* anything was written: the batch it
//!   happened in stays valid and every other operation of that batch still commits.
//! - Any other error raised inside a [`Batch`](crate::Batch) operation (LMDB failure, corrupt
//!   record, full disk) poisons the batch: [`Batch::commit`](crate::Batch::commit) refuses with
//!   [`Error::Poisoned`] and nothing of the batch is written. What was committed earlier is
//!   untouched.

use crate::ids::{DeviceId, QueueStatus, TaskId};

/// What a [`Error::NotFound`] did not find.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Missing {
    /// No device with this id.
    Device(DeviceId),
    /// No device with this name.
    DeviceName(String),
    /// No unused enrolment token with this hash.
    EnrolmentToken,
    /// No command with this sequence number in the device's queue.
    Command {
        /// Device whose queue was searched.
        device: DeviceId,
        /// Sequence number looked for.
        seq: u64,
    },
    /// No distribution task with this id.
    Task(TaskId),
    /// The device is not a target of the task.
    TaskTarget {
        /// The task.
        task: TaskId,
        /// The device.
        device: DeviceId,
    },
    /// No group with this name (or it has no members).
    Group(String),
}

/// Why a transition was refused. Each variant names the precise rule that was broken.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Illegal {
    /// The queue is not in a status that allows this transition.
    WrongStatus {
        /// The transition attempted (a static name such as `"mark_transmitted"`).
        op: &'static str,
        /// The queue's status at the time.
        status: QueueStatus,
    },
    /// Only the next pending command may be transmitted (one command in flight per device).
    NotNextCommand {
        /// The command that would be next, if any.
        expected: Option<u64>,
        /// The command the caller named.
        found: u64,
    },
    /// A result (or reboot notice) for a command that was never transmitted.
    NotTransmitted {
        /// The command named.
        seq: u64,
    },
    /// A result (or reboot completion) of an attempt that is no longer the current one: the
    /// command was sent again since (a retry), or the attempt was never sent.
    StaleAttempt {
        /// The command named.
        seq: u64,
        /// The attempt the result is of.
        attempt: u32,
        /// The command's current attempt.
        current: u32,
    },
    /// A second, different result for a command whose result is already recorded.
    ConflictingResult {
        /// The command named.
        seq: u64,
    },
    /// Another transmission would exceed the command's `max_attempts`.
    AttemptsExhausted {
        /// The command named.
        seq: u64,
    },
    /// `reboot_started` for a command that has no `Reboot` step.
    NotARebootCommand {
        /// The command named.
        seq: u64,
    },
    /// `reboot_completed` with the boot id of the boot before the reboot.
    BootIdUnchanged,
    /// `reboot_deadline_missed` or `command_timed_out` called before the deadline.
    DeadlineNotReached {
        /// The deadline, ms since the UNIX epoch.
        deadline_ms: u64,
    },
    /// The enrolment name is already used by another device.
    NameTaken,
    /// The device is revoked and cannot take part in the protocol.
    Revoked,
    /// The task-status transition is not allowed from the current task status.
    TaskStatus {
        /// The transition attempted.
        op: &'static str,
        /// Name of the current status (`pending`, `in_progress`, `completed`, `failed`,
        /// `cancelled`).
        current: &'static str,
    },
    /// A block range outside the task's block count.
    BlockOutOfRange {
        /// The first block past the end that was named.
        block: u32,
        /// Number of blocks of the task.
        blocks: u32,
    },
    /// An argument out of bounds (no steps, `max_attempts` 0, block size 0).
    Invalid(&'static str),
    /// The enrolment token has expired.
    TokenExpired,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The environment was written by a newer fleetcast; refusing to touch it.
    #[error(
        "store schema version {found} is newer than this build supports ({supported}); \
         upgrade fleetcast or open a different data directory"
    )]
    SchemaTooNew {
        /// Version found in the environment.
        found: u32,
        /// Highest version this build understands.
        supported: u32,
    },
    /// A protocol rule forbids this transition for `device` (or the task).
    #[error("{kind}")]
    IllegalTransition {
        /// The device concerned (`None` for task-only rules).
        device: Option<DeviceId>,
        /// The rule that was broken.
        kind: Illegal,
    },
    /// A record the operation needs does not exist.
    #[error("{0}")]
    NotFound(Missing),
    /// The file system is full (ENOSPC, EDQUOT or EFBIG). The failed batch is not committed;
    /// everything committed before is intact.
    #[error("disk full: the batch was not committed (everything committed earlier is intact)")]
    DiskFull,
    /// A stored record could not be decoded.
    #[error("corrupt record in table {table}: {reason}")]
    Corrupt {
        /// Table (LMDB database) holding the record.
        table: &'static str,
        /// What was wrong.
        reason: &'static str,
    },
    /// A record would embed a wire value over a wire limit (a step, result or report the
    /// protocol cannot carry); nothing was written.
    #[error("a {table} record does not encode: {error}")]
    Unencodable {
        /// Table the record was for.
        table: &'static str,
        /// The wire limit broken.
        error: fleetcast_wire::Error,
    },
    /// An earlier operation of this batch failed with a storage error; the batch cannot commit.
    #[error("batch poisoned by an earlier storage error; nothing of it was committed")]
    Poisoned,
    /// As [`Error::Poisoned`], naming the first failure (an engine that keeps it: PostgreSQL).
    #[error("batch poisoned by an earlier storage error ({cause}); nothing of it was committed")]
    PoisonedBy {
        /// The first failure, as it read.
        cause: String,
    },
    /// An LMDB error not covered above.
    #[error("lmdb: {0}")]
    Lmdb(lmdb::Error),
    /// An I/O error while preparing the environment directory.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The device is owned by another gateway of the cell (or this gateway's lease lapsed
    /// since it claimed it): the operation wrote nothing. The agent belongs elsewhere.
    #[error("device {} is owned by another gateway of the cell", .0 .0)]
    NotOwner(DeviceId),
    /// This gateway's lease in its cell lapsed (a stall or a cut from the database longer
    /// than the lease): it owns no device until [`crate::Engine::keep_lease`] joins the cell
    /// again, so the claim wrote nothing.
    #[error("this gateway's cell lease (incarnation {incarnation}) lapsed: it owns no device until it joins again")]
    LeaseLost {
        /// The incarnation whose lease lapsed.
        incarnation: i64,
    },
    /// The engine does not do this (e.g. a directory backup of a PostgreSQL store).
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// PostgreSQL refused a statement or the connection failed; the batch it happened in is
    /// poisoned (PostgreSQL aborted its transaction) and nothing of it was committed.
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL: {}", crate::pg::describe(.0))]
    Postgres(#[from] postgres::Error),
}

// Human text for the operator and the log (`fleetcast queue retry` prints it): plain values,
// no Rust debug output.
impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::Device(d) => write!(f, "no device with id {}", d.0),
            Missing::DeviceName(n) => write!(f, "no device named `{n}`"),
            Missing::EnrolmentToken => f.write_str("no such enrolment token (wrong, or used)"),
            Missing::Command { device, seq } => {
                write!(f, "no command {seq} in the queue of device {}", device.0)
            }
            Missing::Task(t) => write!(f, "no task {}", t.0),
            Missing::TaskTarget { task, device } => {
                write!(f, "device {} is not a target of task {}", device.0, task.0)
            }
            Missing::Group(g) => write!(f, "no group `{g}` (or it has no members)"),
        }
    }
}

impl std::fmt::Display for Illegal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Illegal::WrongStatus { op, status } => {
                let op = op.replace('_', " ");
                write!(f, "{op} is not allowed while the queue is {status}")
            }
            Illegal::NotNextCommand { expected, found } => match expected {
                Some(e) => write!(f, "command {found} is not the next one ({e} is)"),
                None => write!(f, "command {found} is not the next one (none is pending)"),
            },
            Illegal::NotTransmitted { seq } => write!(f, "command {seq} was never sent"),
            Illegal::StaleAttempt {
                seq,
                attempt,
                current,
            } => write!(
                f,
                "a result of attempt {attempt} of command {seq}, whose current attempt is {current}"
            ),
            Illegal::ConflictingResult { seq } => {
                write!(f, "command {seq} already has a different result")
            }
            Illegal::AttemptsExhausted { seq } => {
                write!(f, "command {seq} has used all its attempts")
            }
            Illegal::NotARebootCommand { seq } => write!(f, "command {seq} has no reboot step"),
            Illegal::BootIdUnchanged => {
                f.write_str("the device came back with the boot id it had before the reboot")
            }
            Illegal::DeadlineNotReached { deadline_ms } => write!(
                f,
                "the deadline ({deadline_ms} ms after the UNIX epoch) has not passed"
            ),
            Illegal::NameTaken => f.write_str("the name is taken by another device"),
            Illegal::Revoked => f.write_str("the device is revoked"),
            Illegal::TaskStatus { op, current } => write!(
                f,
                "{} is not allowed while the task is {current}",
                op.replace('_', " ")
            ),
            Illegal::BlockOutOfRange { block, blocks } => {
                write!(f, "block {block} is past the task's {blocks} blocks")
            }
            Illegal::Invalid(why) => f.write_str(why),
            Illegal::TokenExpired => f.write_str("the enrolment token has expired"),
        }
    }
}

impl From<lmdb::Error> for Error {
    fn from(e: lmdb::Error) -> Self {
        match e {
            lmdb::Error::Other(code)
                if code == libc::ENOSPC || code == libc::EDQUOT || code == libc::EFBIG =>
            {
                Error::DiskFull
            }
            other => Error::Lmdb(other),
        }
    }
}

/// Free space below which an `EIO` from a write is read as a full file system: LMDB reports a
/// *short* write (which is how a file system that fills up mid-write answers) as `EIO`.
const NEARLY_FULL_BYTES: u64 = 1 << 20;

/// True if the file system holding `path` has less than [`NEARLY_FULL_BYTES`] available.
fn nearly_full(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer for the call.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return false;
        }
        (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) < NEARLY_FULL_BYTES
    }
}

impl Error {
    /// Reclassifies an LMDB `EIO` as [`Error::DiskFull`] when the file system is (nearly) full.
    pub(crate) fn classify_io(self, path: &std::path::Path) -> Error {
        match self {
            Error::Lmdb(lmdb::Error::Other(code)) if code == libc::EIO && nearly_full(path) => {
                Error::DiskFull
            }
            other => other,
        }
    }

    pub(crate) fn illegal(device: DeviceId, kind: Illegal) -> Self {
        Error::IllegalTransition {
            device: Some(device),
            kind,
        }
    }

    /// True for errors that leave the batch usable (refused before anything was written).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Error::IllegalTransition { .. }
                | Error::NotFound(_)
                | Error::NotOwner(_)
                | Error::LeaseLost { .. }
        )
    }
}

/// Result alias of the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;
