//! Conversions between the wire's borrowed messages and the store's owned records.

use fleetcast_store as store;
use fleetcast_wire as wire;
use std::borrow::Cow;

/// Wall-clock milliseconds plus a duration, saturating.
pub fn ms_after(now_ms: u64, ms: u64) -> u64 {
    now_ms.saturating_add(ms)
}

/// A stored command as the wire's step list (borrowing from `cmd`).
pub fn steps_to_wire(cmd: &store::Command) -> Vec<wire::Step<'_>> {
    cmd.steps
        .iter()
        .map(|s| match s {
            store::Step::Fetch { url, path } => wire::Step::Fetch {
                url: Cow::Borrowed(url),
                path: Cow::Borrowed(path),
            },
            store::Step::Verify { path, sha256 } => wire::Step::Verify {
                path: Cow::Borrowed(path),
                sha256: *sha256,
            },
            store::Step::Write {
                path,
                mode,
                contents,
            } => wire::Step::Write {
                path: Cow::Borrowed(path),
                mode: *mode,
                contents: Cow::Borrowed(contents),
            },
            store::Step::Exec { argv } => wire::Step::Exec {
                argv: argv.iter().map(|a| Cow::Borrowed(a.as_str())).collect(),
            },
            store::Step::Reboot => wire::Step::Reboot,
            store::Step::Report => wire::Step::Report,
        })
        .collect()
}

/// A wire result as the store's record. Step timings are laid end to end from `now_ms` back;
/// the combined output excerpt goes with the last reported step.
pub fn result_from_wire(r: &wire::CommandResult<'_>, now_ms: u64) -> store::CommandResult {
    let total: u64 = r.steps.iter().map(|s| u64::from(s.duration_ms)).sum();
    let mut t = now_ms.saturating_sub(total);
    let n = r.steps.len();
    let steps = r
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let started = t;
            t = t.saturating_add(u64::from(s.duration_ms));
            store::StepResult {
                outcome: match s.status {
                    wire::StepStatus::Ok => store::StepOutcome::Ok,
                    wire::StepStatus::Failed | wire::StepStatus::TimedOut => {
                        store::StepOutcome::Failed
                    }
                    wire::StepStatus::Skipped => store::StepOutcome::Skipped,
                },
                exit_code: Some(s.exit_code),
                output: if i + 1 == n {
                    r.output.to_vec()
                } else {
                    Vec::new()
                },
                started_ms: started,
                finished_ms: t,
            }
        })
        .collect();
    store::CommandResult { steps }
}

/// A wire configuration report as the store's record.
pub fn report_from_wire(r: &wire::ConfigReport<'_>) -> store::ConfigReport {
    store::ConfigReport {
        os: r.os.to_string(),
        kernel: r.kernel.to_string(),
        hostname: r.hostname.to_string(),
        addresses: r.addresses.iter().map(|a| a.to_string()).collect(),
        software: r
            .software
            .iter()
            .map(|p| (p.name.to_string(), p.version.to_string()))
            .collect(),
        agent_version: r.agent_version.to_string(),
        boot_id: hex(&r.boot_id),
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_conversion_keeps_outcomes_and_output() {
        let r = wire::CommandResult {
            command_id: 1,
            seq: 2,
            attempt: 1,
            exit_code: 3,
            steps: vec![
                wire::StepResult {
                    status: wire::StepStatus::Ok,
                    exit_code: 0,
                    duration_ms: 100,
                },
                wire::StepResult {
                    status: wire::StepStatus::TimedOut,
                    exit_code: 137,
                    duration_ms: 50,
                },
                wire::StepResult {
                    status: wire::StepStatus::Skipped,
                    exit_code: 0,
                    duration_ms: 0,
                },
            ],
            output: b"tail".into(),
            report: None,
        };
        let s = result_from_wire(&r, 10_000);
        assert_eq!(s.steps.len(), 3);
        assert_eq!(s.steps[0].outcome, store::StepOutcome::Ok);
        assert_eq!(s.steps[1].outcome, store::StepOutcome::Failed);
        assert_eq!(s.steps[1].exit_code, Some(137));
        assert_eq!(s.steps[2].outcome, store::StepOutcome::Skipped);
        assert_eq!(s.steps[2].output, b"tail");
        assert_eq!(
            (s.steps[0].started_ms, s.steps[1].finished_ms),
            (9_850, 10_000)
        );
        assert!(!s.succeeded());
    }

    #[test]
    fn steps_round_trip_to_wire() {
        let cmd = store::Command {
            steps: vec![
                store::Step::Fetch {
                    url: "http://x/a".into(),
                    path: "/tmp/a".into(),
                },
                store::Step::Verify {
                    path: "/tmp/a".into(),
                    sha256: [1; 32],
                },
                store::Step::Write {
                    path: "/etc/x".into(),
                    mode: 0o600,
                    contents: b"x".to_vec(),
                },
                store::Step::Exec {
                    argv: vec!["true".into()],
                },
                store::Step::Reboot,
                store::Step::Report,
            ],
            timeout_ms: 1000,
            max_attempts: 1,
            on_failure: store::OnFailure::Stop,
        };
        let w = steps_to_wire(&cmd);
        assert_eq!(
            w[2],
            wire::Step::Write {
                path: "/etc/x".into(),
                mode: 0o600,
                contents: b"x".into()
            }
        );
        assert_eq!(
            w[3],
            wire::Step::Exec {
                argv: vec!["true".into()]
            }
        );
        assert_eq!(w.len(), 6);
    }
}
