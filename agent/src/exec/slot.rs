//! The A/B update's two queue steps, driving [`Update`] (its rules, not copies of them):
//!
//! - `slot_switch` (followed by `reboot` in its command; the gateway refuses it otherwise):
//!   reads the running slot, starts an update of the other one, runs `boot_once` for it, and
//!   records the update in the ledger (`<state dir>/update`) with its deadline before the
//!   reboot step runs. A failed `boot_once` aborts: nothing the bootloader reads changed.
//! - `slot_commit` (the next command, after the device is back): the deadline first, then the
//!   running slot (back on the old one: rolled back), the gateway (reached: this step came
//!   from it on this boot), the health check, `set_default` for the new slot. Committed: the
//!   step is ok ("committed slot b"). Rolled back: the step fails with the reason, and when the
//!   device still runs the new slot the executor asks the driver to reboot once the result is
//!   recorded ([`super::Completed::reboot_after`]): the default is still the old slot, so the
//!   device comes back on it.
//!
//! Invariants: the ledger is replaced atomically (`fleetcast_os::write_atomic`) after every
//! transition that changes what the bootloader does, so a crash between the bootloader command
//! and the record at worst repeats a command the bootloader takes twice (both are idempotent
//! in every bootloader the docs name). The image itself is not read again here: the queue
//! runs `slot_switch` only after the push verified the slot by reading it back (a push's
//! `then` commands are queued per device once its copy verified).

use std::borrow::Cow;
use std::io;
use std::path::{Path, PathBuf};

use crate::slots::{SlotConfig, SlotError};
use crate::target::Slot;
use crate::update::{Illegal, Phase, RecordError, RollbackReason, Update};

use super::{process, Outcome, TailBuffer};

/// The ledger's file name in the agent's state directory.
pub const LEDGER: &str = "update";

/// What the update steps need from the agent: its checked slots and its state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateSetup {
    /// The `[slot]` configuration.
    pub slots: SlotConfig,
    /// The ledger (`<state dir>/update`).
    pub ledger: PathBuf,
}

/// Why an update step could not run at all (as opposed to an update that rolled back).
#[derive(Debug, thiserror::Error)]
pub enum SlotStepError {
    /// The agent has no `[slot]` section.
    #[error("this device has no A/B slots: start the agent with --slots FILE (a [slot] section)")]
    NoSlots,
    /// The running slot could not be read.
    #[error(transparent)]
    Running(#[from] SlotError),
    /// The ledger could not be read or written.
    #[error("update ledger {path}: {source}")]
    Ledger {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The ledger holds something else.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// `slot_commit` with no update waiting for it.
    #[error("no update is waiting to be committed ({0})")]
    NoUpdate(String),
    /// The update's machine refused an input (a step out of order).
    #[error(transparent)]
    Illegal(#[from] Illegal),
}

/// What an update step did, for the executor.
pub(super) struct Done {
    /// The step's outcome.
    pub outcome: Outcome,
    /// Reboot once the result is recorded (a rollback on the new slot).
    pub reboot_after: bool,
}

/// The wall clock in milliseconds: the update's deadline spans the reboot, which only wall
/// time survives.
#[allow(clippy::disallowed_methods)] // Driver-side (the executor's worker thread).
pub(super) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn say(out: &mut TailBuffer, line: &str) {
    out.push(format!("fleetcast-agent: {line}\n").as_bytes());
}

/// Runs a bootloader or health command (`{slot}` replaced by `slot`'s name): whether it
/// exited 0. Its output goes to the step's.
fn run(slots: &SlotConfig, cmd: &[String], slot: Slot, out: &mut TailBuffer) -> bool {
    let argv: Vec<Cow<'_, str>> = slots
        .command_for(cmd, slot)
        .into_iter()
        .map(Cow::Owned)
        .collect();
    matches!(process::exec(&argv, None, &[], out), Outcome::Ok)
}

fn save(setup: &UpdateSetup, u: &Update) -> Result<(), SlotStepError> {
    fleetcast_os::write_atomic(&setup.ledger, u.encode().as_bytes(), 0o600).map_err(|source| {
        SlotStepError::Ledger {
            path: setup.ledger.clone(),
            source,
        }
    })
}

fn load(ledger: &Path) -> Result<Option<Update>, SlotStepError> {
    match std::fs::read_to_string(ledger) {
        Ok(text) => Ok(Some(Update::decode(&text)?)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SlotStepError::Ledger {
            path: ledger.to_owned(),
            source,
        }),
    }
}

fn setup(setup: Option<&UpdateSetup>) -> Result<&UpdateSetup, SlotStepError> {
    setup.ok_or(SlotStepError::NoSlots)
}

/// `slot_switch`: see the module doc. `deadline_secs` 0 takes the slots' own.
pub(super) fn switch(
    setup_: Option<&UpdateSetup>,
    deadline_secs: u32,
    now_ms: u64,
    out: &mut TailBuffer,
) -> Result<Done, SlotStepError> {
    let setup = setup(setup_)?;
    let slots = &setup.slots;
    let secs = match deadline_secs {
        0 => slots.health_deadline_secs,
        s => u64::from(s),
    };
    let running = slots.read_running()?;
    let mut u = Update::start(running, secs * 1000);
    // Written and verified by the push whose `then` queued this step (module doc).
    u.written()?;
    u.verified(true)?;
    let ok = run(slots, &slots.boot_once, u.to, out);
    u.boot_once_set(ok)?;
    if !ok {
        save(setup, &u)?;
        say(
            out,
            &format!(
                "slot switch aborted: boot_once for slot {} failed; still on slot {}",
                u.to.name(),
                u.from.name()
            ),
        );
        return Ok(Done {
            outcome: Outcome::Failed(super::EXIT_FAILED),
            reboot_after: false,
        });
    }
    // The command's reboot step comes next (the gateway checks the order): its deadline
    // starts now.
    u.reboot_started(now_ms)?;
    save(setup, &u)?;
    say(
        out,
        &format!(
            "switching slot {} -> {}: boot_once set, rebooting (healthy within {secs} s)",
            u.from.name(),
            u.to.name()
        ),
    );
    Ok(Done {
        outcome: Outcome::Ok,
        reboot_after: false,
    })
}

/// `slot_commit`: see the module doc.
pub(super) fn commit(
    setup_: Option<&UpdateSetup>,
    now_ms: u64,
    out: &mut TailBuffer,
) -> Result<Done, SlotStepError> {
    let setup = setup(setup_)?;
    let slots = &setup.slots;
    let mut u = match load(&setup.ledger)? {
        None => return Err(SlotStepError::NoUpdate("no slot_switch ran here".into())),
        Some(u) if u.is_final() => {
            return Err(SlotStepError::NoUpdate(format!(
                "the last one ended: {:?}",
                u.phase
            )))
        }
        Some(u) => u,
    };
    u.timeout(now_ms)?;
    if u.phase == Phase::Rebooting {
        u.booted(slots.read_running()?)?;
    }
    if let Phase::BootedNew { .. } = u.phase {
        // This step came from the gateway on this boot: the new slot reached it.
        u.gateway_reached()?;
    }
    if let Phase::BootedNew { health: false, .. } = u.phase {
        let ok = run(slots, &slots.health_check, u.to, out);
        u.health_checked(ok)?;
    }
    if u.phase == Phase::Healthy {
        let ok = run(slots, &slots.set_default, u.to, out);
        u.committed(ok)?;
    }
    save(setup, &u)?;
    match u.phase {
        Phase::Committed => {
            say(out, &format!("committed slot {}", u.to.name()));
            Ok(Done {
                outcome: Outcome::Ok,
                reboot_after: false,
            })
        }
        Phase::RolledBack(reason) => {
            // Still on the new slot (any reason but the old slot booting): the default is the
            // old one, so a reboot brings it back.
            let on_new = reason != RollbackReason::BootedOldSlot
                && slots.read_running().is_ok_and(|s| s == u.to);
            let then = match on_new {
                true => format!("; rebooting into slot {} (the default)", u.from.name()),
                false => format!("; running slot {}", u.from.name()),
            };
            say(out, &format!("rolled back: {}{then}", reason.as_str()));
            Ok(Done {
                outcome: Outcome::Failed(super::EXIT_FAILED),
                reboot_after: on_new,
            })
        }
        // Every path above ends the update or refused an input (returned early).
        other => Err(SlotStepError::NoUpdate(format!("it stopped at {other:?}"))),
    }
}

#[cfg(test)]
mod tests;
