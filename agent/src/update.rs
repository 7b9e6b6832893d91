//! The A/B update of one device, as pure transitions on [`Update`] (the shape of
//! `store/src/queue.rs`): the driver performs each step (writes the image, runs the bootloader
//! commands, reboots, runs the health check), then tells the machine what happened; the
//! machine says what state that leaves, or refuses an input that does not fit the state, and
//! changes nothing when it refuses. Time is an input (milliseconds of wall time, the only
//! clock that survives the reboot in the middle).
//!
//! Driven by the queue's `slot_switch` and `slot_commit` steps (`exec/slot.rs`), which keep
//! it in the agent's state directory across the reboot ([`Update::encode`] /
//! [`Update::decode`], one `key=value` line each).
//!
//! Transitions:
//! ```text
//! start(running) ──▶ Chosen { from: running, to: the other slot }
//! Chosen      --written-->                 Written
//! Written     --verified(true)-->          Verified
//! Written     --verified(false)-->         Aborted(VerifyFailed)
//! Verified    --boot_once_set(true)-->     BootOnceSet
//! Verified    --boot_once_set(false)-->    Aborted(BootOnceFailed)
//! BootOnceSet --reboot_started(now)-->     Rebooting { deadline: now + health deadline }
//! Rebooting   --booted(to)-->              BootedNew { deadline, health: ?, gateway: no }
//! Rebooting   --booted(from)-->            RolledBack(BootedOldSlot)
//! BootedNew   --gateway_reached-->         BootedNew { gateway: yes }
//! BootedNew   --health_checked(true)-->    BootedNew { health: passed }
//! BootedNew   (health passed, gateway yes) ──▶ Healthy        (whichever came last)
//! BootedNew   --health_checked(false)-->   RolledBack(HealthCheckFailed)
//! Healthy     --committed(true)-->         Committed
//! Healthy     --committed(false)-->        RolledBack(SetDefaultFailed)
//! Rebooting | BootedNew --timeout(now ≥ deadline)--> RolledBack(DeadlinePassed)
//! ```
//!
//! Invariants:
//! - `from != to`, and neither changes after `start`.
//! - Before `BootOnceSet` nothing the bootloader reads has changed: a failure there is
//!   `Aborted` (the running slot stays as it was, nothing to roll back).
//! - From `BootOnceSet` on, the default is still `from` until `Committed`: every rollback is
//!   "boot the default" (the one-time boot is spent), so `RolledBack` tells the driver to
//!   reboot unless the device already runs `from` (`BootedOldSlot`).
//! - The deadline runs from the reboot through the health check; `timeout` before it is a
//!   no-op (so the driver may call it on every timer tick).
//! - `Committed`, `RolledBack` and `Aborted` are final: every input is refused.

use crate::target::Slot;

/// Why an update was abandoned before the device switched slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// What was read back from the inactive slot is not the image.
    VerifyFailed,
    /// The bootloader's one-time boot command failed.
    BootOnceFailed,
}

/// Why an update went back to the old slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackReason {
    /// The health check failed on the new slot.
    HealthCheckFailed,
    /// The device did not come back healthy on the new slot before the deadline.
    DeadlinePassed,
    /// The device came back on the old slot (the bootloader did not take the new one).
    BootedOldSlot,
    /// The new slot was healthy but making it the default failed.
    SetDefaultFailed,
}

impl RollbackReason {
    /// How the task table says it.
    pub fn as_str(self) -> &'static str {
        match self {
            RollbackReason::HealthCheckFailed => "health check failed",
            RollbackReason::DeadlinePassed => "deadline passed",
            RollbackReason::BootedOldSlot => "booted the old slot",
            RollbackReason::SetDefaultFailed => "making the new slot the default failed",
        }
    }
}

/// Where an update is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The inactive slot is chosen; the image is being written to it.
    Chosen,
    /// Written; being read back.
    Written,
    /// Read back and verified; the one-time boot is being set.
    Verified,
    /// The bootloader will try the new slot once; the device is about to reboot.
    BootOnceSet,
    /// Rebooting.
    Rebooting,
    /// Running on the new slot; waiting for the health check and the gateway.
    BootedNew {
        /// The health check passed.
        health: bool,
        /// The agent reached the gateway from the new slot.
        gateway: bool,
    },
    /// Healthy on the new slot; being made the default.
    Healthy,
    /// The new slot is the default. Final.
    Committed,
    /// Back to the old slot. Final.
    RolledBack(RollbackReason),
    /// Given up before switching. Final.
    Aborted(AbortReason),
}

/// An input the update's phase does not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("update: `{op}` is not possible while {phase:?}")]
pub struct Illegal {
    /// The input.
    pub op: &'static str,
    /// The phase it was refused in.
    pub phase: Phase,
}

/// One device's A/B update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Update {
    /// The slot running when it started (the default until committed).
    pub from: Slot,
    /// The slot being updated.
    pub to: Slot,
    /// Where it is.
    pub phase: Phase,
    /// Milliseconds from the reboot to a healthy new slot.
    pub health_deadline_ms: u64,
    /// Wall-clock milliseconds by which the new slot must be healthy (set at the reboot).
    pub deadline_ms: Option<u64>,
}

type R = Result<Phase, Illegal>;

impl Update {
    /// An update of the slot that is not `running`.
    pub fn start(running: Slot, health_deadline_ms: u64) -> Update {
        Update {
            from: running,
            to: running.other(),
            phase: Phase::Chosen,
            health_deadline_ms,
            deadline_ms: None,
        }
    }

    /// Whether the update is over.
    pub fn is_final(&self) -> bool {
        matches!(
            self.phase,
            Phase::Committed | Phase::RolledBack(_) | Phase::Aborted(_)
        )
    }

    fn refuse(&self, op: &'static str) -> Illegal {
        Illegal {
            op,
            phase: self.phase,
        }
    }

    /// Moves to `next` when the phase is `want`, else refuses `op`.
    fn step(&mut self, op: &'static str, want: Phase, next: Phase) -> R {
        if self.phase != want {
            return Err(self.refuse(op));
        }
        self.phase = next;
        Ok(next)
    }

    /// The image is written to the inactive slot.
    pub fn written(&mut self) -> R {
        self.step("written", Phase::Chosen, Phase::Written)
    }

    /// The slot was read back: `ok` when its digest is the image's.
    pub fn verified(&mut self, ok: bool) -> R {
        let next = if ok {
            Phase::Verified
        } else {
            Phase::Aborted(AbortReason::VerifyFailed)
        };
        self.step("verified", Phase::Written, next)
    }

    /// The one-time boot command ran: `ok` when it succeeded.
    pub fn boot_once_set(&mut self, ok: bool) -> R {
        let next = if ok {
            Phase::BootOnceSet
        } else {
            Phase::Aborted(AbortReason::BootOnceFailed)
        };
        self.step("boot_once_set", Phase::Verified, next)
    }

    /// The device is rebooting at `now_ms`: the health deadline starts.
    pub fn reboot_started(&mut self, now_ms: u64) -> R {
        let r = self.step("reboot_started", Phase::BootOnceSet, Phase::Rebooting)?;
        self.deadline_ms = Some(now_ms.saturating_add(self.health_deadline_ms));
        Ok(r)
    }

    /// The agent started again, on `running`.
    pub fn booted(&mut self, running: Slot) -> R {
        let next = if running == self.to {
            Phase::BootedNew {
                health: false,
                gateway: false,
            }
        } else {
            Phase::RolledBack(RollbackReason::BootedOldSlot)
        };
        self.step("booted", Phase::Rebooting, next)
    }

    /// The agent completed a round trip with the gateway on the new slot.
    pub fn gateway_reached(&mut self) -> R {
        match self.phase {
            Phase::BootedNew { health, .. } => Ok(self.booted_new(health, true)),
            _ => Err(self.refuse("gateway_reached")),
        }
    }

    /// The health check ran on the new slot: `ok` when it passed.
    pub fn health_checked(&mut self, ok: bool) -> R {
        match self.phase {
            Phase::BootedNew { gateway, .. } if ok => Ok(self.booted_new(true, gateway)),
            Phase::BootedNew { .. } => {
                self.phase = Phase::RolledBack(RollbackReason::HealthCheckFailed);
                Ok(self.phase)
            }
            _ => Err(self.refuse("health_checked")),
        }
    }

    fn booted_new(&mut self, health: bool, gateway: bool) -> Phase {
        self.phase = if health && gateway {
            Phase::Healthy
        } else {
            Phase::BootedNew { health, gateway }
        };
        self.phase
    }

    /// The command making the new slot the default ran: `ok` when it succeeded.
    pub fn committed(&mut self, ok: bool) -> R {
        let next = if ok {
            Phase::Committed
        } else {
            Phase::RolledBack(RollbackReason::SetDefaultFailed)
        };
        self.step("committed", Phase::Healthy, next)
    }

    /// The clock reads `now_ms`: past the deadline while rebooting or waiting for health, the
    /// update rolls back; otherwise nothing changes.
    pub fn timeout(&mut self, now_ms: u64) -> R {
        if self.is_final() {
            return Err(self.refuse("timeout"));
        }
        let waiting = matches!(self.phase, Phase::Rebooting | Phase::BootedNew { .. });
        if waiting && self.deadline_ms.is_some_and(|d| now_ms >= d) {
            self.phase = Phase::RolledBack(RollbackReason::DeadlinePassed);
        }
        Ok(self.phase)
    }
}

/// A ledger record that is not an update's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("update ledger: bad or missing `{0}`")]
pub struct RecordError(pub &'static str);

impl AbortReason {
    fn token(self) -> &'static str {
        match self {
            AbortReason::VerifyFailed => "verify_failed",
            AbortReason::BootOnceFailed => "boot_once_failed",
        }
    }
}

impl RollbackReason {
    fn token(self) -> &'static str {
        match self {
            RollbackReason::HealthCheckFailed => "health_check_failed",
            RollbackReason::DeadlinePassed => "deadline_passed",
            RollbackReason::BootedOldSlot => "booted_old_slot",
            RollbackReason::SetDefaultFailed => "set_default_failed",
        }
    }
}

impl Phase {
    fn token(self) -> String {
        match self {
            Phase::Chosen => "chosen".into(),
            Phase::Written => "written".into(),
            Phase::Verified => "verified".into(),
            Phase::BootOnceSet => "boot_once_set".into(),
            Phase::Rebooting => "rebooting".into(),
            Phase::BootedNew { health, gateway } => {
                format!("booted_new:{}:{}", u8::from(health), u8::from(gateway))
            }
            Phase::Healthy => "healthy".into(),
            Phase::Committed => "committed".into(),
            Phase::RolledBack(r) => format!("rolled_back:{}", r.token()),
            Phase::Aborted(r) => format!("aborted:{}", r.token()),
        }
    }

    fn parse(s: &str) -> Option<Phase> {
        const ROLLBACKS: [RollbackReason; 4] = [
            RollbackReason::HealthCheckFailed,
            RollbackReason::DeadlinePassed,
            RollbackReason::BootedOldSlot,
            RollbackReason::SetDefaultFailed,
        ];
        const ABORTS: [AbortReason; 2] = [AbortReason::VerifyFailed, AbortReason::BootOnceFailed];
        let flag = |c: &str| match c {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        };
        Some(match s.split_once(':') {
            None => match s {
                "chosen" => Phase::Chosen,
                "written" => Phase::Written,
                "verified" => Phase::Verified,
                "boot_once_set" => Phase::BootOnceSet,
                "rebooting" => Phase::Rebooting,
                "healthy" => Phase::Healthy,
                "committed" => Phase::Committed,
                _ => return None,
            },
            Some(("booted_new", hg)) => {
                let (h, g) = hg.split_once(':')?;
                Phase::BootedNew {
                    health: flag(h)?,
                    gateway: flag(g)?,
                }
            }
            Some(("rolled_back", r)) => {
                Phase::RolledBack(ROLLBACKS.into_iter().find(|x| x.token() == r)?)
            }
            Some(("aborted", r)) => Phase::Aborted(ABORTS.into_iter().find(|x| x.token() == r)?),
            _ => return None,
        })
    }
}

impl Update {
    /// The ledger record: `key=value` lines (text, so an operator can read what the device
    /// is doing from its state directory).
    pub fn encode(&self) -> String {
        let deadline = self.deadline_ms.map_or("none".into(), |d| d.to_string());
        format!(
            "from={}\nto={}\nphase={}\nhealth_deadline_ms={}\ndeadline_ms={deadline}\n",
            self.from.name(),
            self.to.name(),
            self.phase.token(),
            self.health_deadline_ms,
        )
    }

    /// The update a record of [`Update::encode`] holds; `from != to` is checked too.
    pub fn decode(text: &str) -> Result<Update, RecordError> {
        let get = |k: &'static str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .ok_or(RecordError(k))
        };
        let slot = |k| get(k).and_then(|v| Slot::parse(v).ok_or(RecordError(k)));
        let (from, to) = (slot("from")?, slot("to")?);
        if from == to {
            return Err(RecordError("to"));
        }
        let phase = Phase::parse(get("phase")?).ok_or(RecordError("phase"))?;
        let health_deadline_ms = get("health_deadline_ms")?
            .parse()
            .map_err(|_| RecordError("health_deadline_ms"))?;
        let deadline_ms = match get("deadline_ms")? {
            "none" => None,
            d => Some(d.parse().map_err(|_| RecordError("deadline_ms"))?),
        };
        Ok(Update {
            from,
            to,
            phase,
            health_deadline_ms,
            deadline_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: u64 = 600_000;

    fn at(phase: Phase) -> Update {
        Update {
            phase,
            deadline_ms: Some(1_000 + DEADLINE),
            ..Update::start(Slot::A, DEADLINE)
        }
    }

    fn booted_new(health: bool, gateway: bool) -> Phase {
        Phase::BootedNew { health, gateway }
    }

    #[test]
    fn start_chooses_the_inactive_slot() {
        for (running, other) in [(Slot::A, Slot::B), (Slot::B, Slot::A)] {
            let u = Update::start(running, DEADLINE);
            assert_eq!((u.from, u.to, u.phase), (running, other, Phase::Chosen));
            assert_eq!(u.deadline_ms, None);
        }
    }

    #[test]
    fn the_good_path_commits() {
        let mut u = Update::start(Slot::A, DEADLINE);
        assert_eq!(u.written(), Ok(Phase::Written));
        assert_eq!(u.verified(true), Ok(Phase::Verified));
        assert_eq!(u.boot_once_set(true), Ok(Phase::BootOnceSet));
        assert_eq!(u.reboot_started(1_000), Ok(Phase::Rebooting));
        assert_eq!(u.deadline_ms, Some(1_000 + DEADLINE));
        assert_eq!(u.booted(Slot::B), Ok(booted_new(false, false)));
        assert_eq!(u.gateway_reached(), Ok(booted_new(false, true)));
        assert_eq!(u.health_checked(true), Ok(Phase::Healthy));
        assert_eq!(u.committed(true), Ok(Phase::Committed));
        assert!(u.is_final());
        assert_eq!((u.from, u.to), (Slot::A, Slot::B));
    }

    #[test]
    fn health_then_gateway_is_healthy_too() {
        let mut u = at(booted_new(false, false));
        assert_eq!(u.health_checked(true), Ok(booted_new(true, false)));
        assert_eq!(u.gateway_reached(), Ok(Phase::Healthy));
    }

    #[test]
    fn a_bad_read_back_aborts() {
        let mut u = at(Phase::Written);
        assert_eq!(
            u.verified(false),
            Ok(Phase::Aborted(AbortReason::VerifyFailed))
        );
        assert!(u.is_final());
    }

    #[test]
    fn a_failed_boot_once_aborts() {
        let mut u = at(Phase::Verified);
        assert_eq!(
            u.boot_once_set(false),
            Ok(Phase::Aborted(AbortReason::BootOnceFailed))
        );
    }

    #[test]
    fn booting_the_old_slot_rolls_back() {
        let mut u = at(Phase::Rebooting);
        assert_eq!(
            u.booted(Slot::A),
            Ok(Phase::RolledBack(RollbackReason::BootedOldSlot))
        );
    }

    #[test]
    fn a_failed_health_check_rolls_back_whatever_the_gateway_said() {
        for gateway in [false, true] {
            let mut u = at(booted_new(false, gateway));
            assert_eq!(
                u.health_checked(false),
                Ok(Phase::RolledBack(RollbackReason::HealthCheckFailed))
            );
        }
    }

    #[test]
    fn a_failed_set_default_rolls_back() {
        let mut u = at(Phase::Healthy);
        assert_eq!(
            u.committed(false),
            Ok(Phase::RolledBack(RollbackReason::SetDefaultFailed))
        );
    }

    #[test]
    fn the_deadline_rolls_back_a_reboot_or_a_slow_health_check_only_once_passed() {
        for phase in [
            Phase::Rebooting,
            booted_new(false, true),
            booted_new(true, false),
        ] {
            let mut u = at(phase);
            assert_eq!(u.timeout(1_000 + DEADLINE - 1), Ok(phase), "{phase:?}");
            assert_eq!(
                u.timeout(1_000 + DEADLINE),
                Ok(Phase::RolledBack(RollbackReason::DeadlinePassed)),
                "{phase:?}"
            );
        }
        // Before the reboot no deadline runs.
        for phase in [
            Phase::Chosen,
            Phase::Written,
            Phase::Verified,
            Phase::BootOnceSet,
            Phase::Healthy,
        ] {
            let mut u = at(phase);
            assert_eq!(u.timeout(u64::MAX), Ok(phase), "{phase:?}");
        }
    }

    /// Every phase survives the ledger record; a broken record names what is wrong.
    #[test]
    fn the_ledger_record_round_trips_and_refuses_damage() {
        let phases = [
            Phase::Chosen,
            Phase::Written,
            Phase::Verified,
            Phase::BootOnceSet,
            Phase::Rebooting,
            booted_new(false, true),
            booted_new(true, false),
            Phase::Healthy,
            Phase::Committed,
            Phase::RolledBack(RollbackReason::HealthCheckFailed),
            Phase::RolledBack(RollbackReason::DeadlinePassed),
            Phase::RolledBack(RollbackReason::BootedOldSlot),
            Phase::RolledBack(RollbackReason::SetDefaultFailed),
            Phase::Aborted(AbortReason::VerifyFailed),
            Phase::Aborted(AbortReason::BootOnceFailed),
        ];
        for p in phases {
            let u = at(p);
            assert_eq!(Update::decode(&u.encode()), Ok(u), "{p:?}");
        }
        let fresh = Update::start(Slot::B, DEADLINE);
        assert_eq!(
            fresh.encode(),
            "from=b\nto=a\nphase=chosen\nhealth_deadline_ms=600000\ndeadline_ms=none\n"
        );
        assert_eq!(Update::decode(&fresh.encode()), Ok(fresh));
        let good = at(Phase::Rebooting).encode();
        for (from, to, key) in [
            ("phase=rebooting", "phase=sleeping", "phase"),
            ("phase=rebooting", "phase=booted_new:2:0", "phase"),
            ("to=b", "to=a", "to"),
            ("from=a", "from=c", "from"),
            ("deadline_ms=601000", "deadline_ms=soon", "deadline_ms"),
            ("health_deadline_ms=600000\n", "", "health_deadline_ms"),
        ] {
            assert_eq!(
                Update::decode(&good.replace(from, to)),
                Err(RecordError(key)),
                "{to}"
            );
        }
    }

    /// Every input in every phase that does not take it is refused, and refusing changes
    /// nothing.
    #[test]
    fn inputs_out_of_phase_are_refused_and_change_nothing() {
        type Input = (&'static str, fn(&mut Update) -> R);
        let inputs: [Input; 8] = [
            ("written", |u| u.written()),
            ("verified", |u| u.verified(true)),
            ("boot_once_set", |u| u.boot_once_set(true)),
            ("reboot_started", |u| u.reboot_started(5)),
            ("booted", |u| u.booted(Slot::B)),
            ("gateway_reached", |u| u.gateway_reached()),
            ("health_checked", |u| u.health_checked(true)),
            ("committed", |u| u.committed(true)),
        ];
        // The one phase each input is taken in (health and gateway: any BootedNew).
        let takes = |op: &str, p: Phase| match op {
            "written" => p == Phase::Chosen,
            "verified" => p == Phase::Written,
            "boot_once_set" => p == Phase::Verified,
            "reboot_started" => p == Phase::BootOnceSet,
            "booted" => p == Phase::Rebooting,
            "gateway_reached" | "health_checked" => matches!(p, Phase::BootedNew { .. }),
            "committed" => p == Phase::Healthy,
            _ => unreachable!(),
        };
        let phases = [
            Phase::Chosen,
            Phase::Written,
            Phase::Verified,
            Phase::BootOnceSet,
            Phase::Rebooting,
            booted_new(false, false),
            booted_new(true, false),
            booted_new(false, true),
            Phase::Healthy,
            Phase::Committed,
            Phase::RolledBack(RollbackReason::DeadlinePassed),
            Phase::Aborted(AbortReason::VerifyFailed),
        ];
        let mut refused = 0;
        for p in phases {
            for (op, f) in inputs {
                let mut u = at(p);
                let before = u;
                let r = f(&mut u);
                if takes(op, p) {
                    assert!(r.is_ok(), "{op} in {p:?}");
                } else {
                    assert_eq!(r, Err(Illegal { op, phase: p }), "{op} in {p:?}");
                    assert_eq!(u, before, "{op} in {p:?} changed the update");
                    refused += 1;
                }
            }
            if at(p).is_final() {
                assert_eq!(
                    at(p).timeout(0),
                    Err(Illegal {
                        op: "timeout",
                        phase: p
                    })
                );
            }
        }
        assert!(refused > 70, "{refused}");
        assert_eq!(RollbackReason::DeadlinePassed.as_str(), "deadline passed");
    }
}
