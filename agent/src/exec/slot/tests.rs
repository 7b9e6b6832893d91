//! The update steps against a simulated bootloader: slots are files, the bootloader is a
//! shell script writing the next and the default slot into files, a "reboot" is the test
//! writing the running-slot file.

use std::fs;
use std::path::Path;

use fleetcast_wire::{Step, StepStatus};

use super::super::test_util::{job, output, statuses};
use super::super::{run, ExecConfig};
use super::*;

struct Bench {
    dir: tempfile::TempDir,
    cfg: ExecConfig,
}

impl Bench {
    /// Slot a running, default a, health check exiting with the contents of `health`.
    fn new() -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let script = |name: &str, body: &str| {
            use std::os::unix::fs::PermissionsExt;
            let p = d.join(name);
            fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            p.display().to_string()
        };
        let boot = script(
            "bootloader",
            &format!(
                "echo \"$2\" > {}/\"$1\"; echo \"bootloader: $1 $2\"",
                d.display()
            ),
        );
        let health = script(
            "healthy",
            &format!(
                "touch {d}/health-ran; exit $(cat {d}/health)",
                d = d.display()
            ),
        );
        fs::write(d.join("running"), "a\n").unwrap();
        fs::write(d.join("default"), "a\n").unwrap();
        fs::write(d.join("health"), "0").unwrap();
        let section = format!(
            "[slot]\na = \"{d}/slot-a\"\nb = \"{d}/slot-b\"\nrunning_file = \"{d}/running\"\n\
             boot_once = [\"{boot}\", \"next\", \"{{slot}}\"]\n\
             set_default = [\"{boot}\", \"default\", \"{{slot}}\"]\n\
             health_check = [\"{health}\"]\nhealth_deadline_secs = \"60\"\n",
            d = d.display()
        );
        let slots = crate::slots::parse_section(&section).unwrap().unwrap();
        let cfg = ExecConfig {
            update: Some(UpdateSetup {
                slots,
                ledger: d.join(LEDGER),
            }),
            ..ExecConfig::default()
        };
        Bench { dir, cfg }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.path(name))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    fn ledger(&self) -> Update {
        Update::decode(&fs::read_to_string(self.path(LEDGER)).unwrap()).unwrap()
    }

    fn switch(&self) -> super::super::Completed {
        run(
            &job(0, vec![Step::SlotSwitch { deadline_secs: 0 }, Step::Reboot]),
            &self.cfg,
        )
    }

    fn commit(&self) -> super::super::Completed {
        run(&job(0, vec![Step::SlotCommit]), &self.cfg)
    }

    /// What the simulated bootloader boots: the one-time slot if set (then spent), else the
    /// default.
    fn reboot(&self) {
        let next = self.read("next");
        let slot = if next.is_empty() {
            self.read("default")
        } else {
            next
        };
        let _ = fs::remove_file(self.path("next"));
        fs::write(self.path("running"), format!("{slot}\n")).unwrap();
    }
}

fn write_ledger(p: &Path, u: &Update) {
    fs::write(p, u.encode()).unwrap();
}

#[test]
fn a_good_update_switches_reboots_and_commits() {
    let b = Bench::new();
    let t0 = wall_ms();
    let done = b.switch();
    assert_eq!(statuses(&done), [StepStatus::Ok, StepStatus::Ok]);
    assert_eq!(done.reboot_at, Some(1));
    assert!(!done.reboot_after);
    assert_eq!(b.read("next"), "b");
    assert_eq!(
        b.read("default"),
        "a",
        "the default is kept until committed"
    );
    let u = b.ledger();
    assert_eq!(
        (u.from, u.to, u.phase),
        (Slot::A, Slot::B, Phase::Rebooting)
    );
    let deadline = u.deadline_ms.unwrap();
    assert!((t0 + 60_000..=wall_ms() + 60_000).contains(&deadline));
    assert!(
        output(&done).contains("switching slot a -> b"),
        "{}",
        output(&done)
    );

    b.reboot();
    let done = b.commit();
    assert_eq!(statuses(&done), [StepStatus::Ok], "{}", output(&done));
    assert!(!done.reboot_after);
    assert!(output(&done).ends_with("fleetcast-agent: committed slot b\n"));
    assert_eq!(b.read("default"), "b");
    assert!(b.path("health-ran").exists());
    assert_eq!(b.ledger().phase, Phase::Committed);
    // A second commit has no update to commit.
    let again = b.commit();
    assert_eq!(statuses(&again), [StepStatus::Failed]);
    assert!(
        output(&again).contains("no update is waiting"),
        "{}",
        output(&again)
    );
}

#[test]
fn a_failed_health_check_rolls_back_and_reboots_into_the_old_slot() {
    let b = Bench::new();
    b.switch();
    b.reboot();
    fs::write(b.path("health"), "1").unwrap();
    let done = b.commit();
    assert_eq!(statuses(&done), [StepStatus::Failed]);
    assert_eq!(done.result.exit_code, super::super::EXIT_FAILED);
    assert!(
        done.reboot_after,
        "still on the new slot: back to the default"
    );
    assert!(
        output(&done).contains("rolled back: health check failed; rebooting into slot a"),
        "{}",
        output(&done)
    );
    assert_eq!(b.read("default"), "a", "set_default never ran");
    assert_eq!(
        b.ledger().phase,
        Phase::RolledBack(RollbackReason::HealthCheckFailed)
    );
    b.reboot();
    assert_eq!(b.read("running"), "a");
}

#[test]
fn coming_back_on_the_old_slot_is_a_rollback_without_a_reboot() {
    let b = Bench::new();
    b.switch();
    // The bootloader did not take the one-time boot.
    fs::remove_file(b.path("next")).unwrap();
    b.reboot();
    let done = b.commit();
    assert_eq!(statuses(&done), [StepStatus::Failed]);
    assert!(!done.reboot_after);
    assert!(
        output(&done).contains("rolled back: booted the old slot; running slot a"),
        "{}",
        output(&done)
    );
}

#[test]
fn past_the_deadline_the_health_check_does_not_run() {
    let b = Bench::new();
    b.switch();
    b.reboot();
    let mut u = b.ledger();
    u.deadline_ms = Some(1);
    write_ledger(&b.path(LEDGER), &u);
    let done = b.commit();
    assert_eq!(statuses(&done), [StepStatus::Failed]);
    assert!(done.reboot_after);
    assert!(
        output(&done).contains("rolled back: deadline passed"),
        "{}",
        output(&done)
    );
    assert!(!b.path("health-ran").exists());
    assert_eq!(b.read("default"), "a");
}

#[test]
fn a_failed_boot_once_aborts_before_anything_changes() {
    let mut b = Bench::new();
    let slots = &mut b.cfg.update.as_mut().unwrap().slots;
    slots.boot_once = vec!["/bin/false".into(), "{slot}".into()];
    let done = b.switch();
    assert_eq!(statuses(&done), [StepStatus::Failed, StepStatus::Skipped]);
    assert_eq!(done.reboot_at, None, "no reboot after an abort");
    assert!(output(&done).contains("slot switch aborted: boot_once for slot b failed"));
    assert!(b.ledger().is_final());
}

#[test]
fn without_slots_or_a_switch_the_steps_refuse() {
    let done = run(
        &job(0, vec![Step::SlotSwitch { deadline_secs: 0 }, Step::Reboot]),
        &ExecConfig::default(),
    );
    assert_eq!(statuses(&done), [StepStatus::Failed, StepStatus::Skipped]);
    assert_eq!(done.reboot_at, None);
    assert!(
        output(&done).contains("this device has no A/B slots"),
        "{}",
        output(&done)
    );
    let b = Bench::new();
    let done = b.commit();
    assert_eq!(statuses(&done), [StepStatus::Failed]);
    assert!(output(&done).contains("no slot_switch ran here"));
    // The step's own deadline overrides the slots' default.
    run(
        &job(0, vec![Step::SlotSwitch { deadline_secs: 5 }, Step::Reboot]),
        &b.cfg,
    );
    assert_eq!(b.ledger().health_deadline_ms, 5_000);
}
