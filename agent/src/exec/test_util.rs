//! Helpers shared by the executor's unit tests (one per concern file).

use super::{Completed, Job};
use fleetcast_wire::{Step, StepStatus};

pub(super) fn sh(script: &str) -> Step<'static> {
    Step::Exec {
        argv: vec!["sh".into(), "-c".into(), script.to_owned().into()],
    }
}

pub(super) fn job(timeout_ms: u32, steps: Vec<Step<'static>>) -> Job {
    Job {
        target: None,
        command_id: 77,
        seq: 3,
        attempt: 1,
        timeout_ms,
        steps,
    }
}

pub(super) fn statuses(done: &Completed) -> Vec<StepStatus> {
    done.result.steps.iter().map(|s| s.status).collect()
}

pub(super) fn output(done: &Completed) -> String {
    String::from_utf8_lossy(&done.result.output).into_owned()
}

pub(super) fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}
