//! The identifiers and the queue status: the store's leaf vocabulary. Errors name them and
//! records carry them, so they live below both `error` and `codec` (which keeps the module
//! graph free of loops: `codec` → `error` → `ids`, `types` → `codec`, `error`, `ids`).

/// Identifier of an enrolled device, allocated by the store (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub u64);

/// Identifier of a distribution task, allocated by the store (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub u64);

/// Position in the event log (monotonically increasing, starts at 1).
pub type EventId = u64;

/// Status of a device's command queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueStatus {
    /// Nothing pending and nothing ever completed (or everything was cancelled).
    Idle,
    /// Commands pending, none in flight.
    Running,
    /// The command at the cursor was transmitted; waiting for its result.
    AwaitingResult,
    /// The command at the cursor is rebooting the device; waiting for `RebootComplete`.
    Rebooting,
    /// Stopped by the operator; nothing is dispatched until resumed.
    Paused,
    /// A command failed under `OnFailure::Stop` (see [`QueueState::failure`]).
    Failed,
    /// Everything completed; nothing pending.
    Done,
}

impl std::fmt::Display for QueueStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl QueueStatus {
    /// The lower-case name operators see (`fleetcast queue show`, the event log, errors).
    pub fn name(self) -> &'static str {
        match self {
            QueueStatus::Idle => "idle",
            QueueStatus::Running => "running",
            QueueStatus::AwaitingResult => "awaitingresult",
            QueueStatus::Rebooting => "rebooting",
            QueueStatus::Paused => "paused",
            QueueStatus::Failed => "failed",
            QueueStatus::Done => "done",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            QueueStatus::Idle => 0,
            QueueStatus::Running => 1,
            QueueStatus::AwaitingResult => 2,
            QueueStatus::Rebooting => 3,
            QueueStatus::Paused => 4,
            QueueStatus::Failed => 5,
            QueueStatus::Done => 6,
        }
    }
    pub(crate) fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => QueueStatus::Idle,
            1 => QueueStatus::Running,
            2 => QueueStatus::AwaitingResult,
            3 => QueueStatus::Rebooting,
            4 => QueueStatus::Paused,
            5 => QueueStatus::Failed,
            6 => QueueStatus::Done,
            _ => return None,
        })
    }
}
