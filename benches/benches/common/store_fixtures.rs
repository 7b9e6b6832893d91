//! What the store benches (`store.rs` on LMDB, `store_pg.rs` on PostgreSQL) put in their
//! batches, so both engines are measured on the same records.

use fleetcast_store::{Command, OnFailure, Received};
use fleetcast_wire::{self as wire, Step};

/// Transitions per committed batch.
pub const BATCH: u64 = 1000;
/// Devices the transitions of a batch are spread over, round-robin.
pub const SIZES: [u64; 3] = [1, 100, 10_000];

/// A one-step command of a typical size.
pub fn cmd() -> Command {
    Command {
        target: None,
        steps: vec![Step::Exec {
            argv: vec![
                "/usr/bin/apt-get".into(),
                "install".into(),
                "-y".into(),
                "pkg".into(),
            ],
        }],
        timeout_ms: 60_000,
        max_attempts: 3,
        on_failure: OnFailure::Stop,
    }
}

/// A successful result with 200 bytes of output.
pub fn ok() -> Received {
    Received {
        result: wire::CommandResult {
            command_id: 1,
            seq: 1,
            attempt: 1,
            exit_code: 0,
            steps: vec![wire::StepResult {
                status: wire::StepStatus::Ok,
                exit_code: 0,
                duration_ms: 1,
            }],
            output: vec![b'.'; 200].into(),
            report: None,
        },
        at_ms: 2,
    }
}
