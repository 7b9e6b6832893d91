//! The executor: runs one command's steps in order and produces its result.
//!
//! This module holds the command's model and the step loop ([`run`]) with its worker thread
//! ([`spawn`]); each kind of step lives in a file of its own: [`process`] (`exec`), [`fetch`],
//! [`file`] (`write`, `verify`) and [`output`] (the output ring). The step files depend on
//! this module, never on each other's internals, and nothing here depends on the agent's
//! durable state ([`crate::state`] uses the exit codes defined here, not the reverse).
//!
//! # Threading: a worker thread and a channel
//! Steps block: child processes, pipes, file hashing, DNS and HTTP. Making each of them
//! pollable (non-blocking HTTP client, SIGCHLD/pidfd reaping, chunked hashing) would put a
//! second event loop's worth of code into a size-constrained agent for no gain, since the
//! gateway sends one command at a time. So [`spawn`] runs [`run`] on one worker thread that
//! owns everything it touches ([`Job`] is owned); the result comes back over an `mpsc`
//! channel, and a caller-supplied `notify` closure (e.g. `mio::Waker::wake`) wakes the
//! driver's poll so it calls [`Running::try_finish`]. The driver stays single-threaded.
//!
//! # Semantics
//! - Steps run in order; after a step that fails or times out, the rest are `Skipped`.
//!   Overall `exit_code` is the first failing step's, or 0.
//! - `timeout_ms` (0: none) bounds the whole command: a running `exec` is killed with its
//!   whole process group (each exec starts a new group), a fetch or verify stops between
//!   reads; that step is `TimedOut` ([`EXIT_TIMED_OUT`]).
//! - Output: the combined stdout+stderr of every `exec` (one pipe, so the interleaving is
//!   the program's own) plus one `fleetcast-agent: …` line per failure, kept as the last
//!   [`MAX_OUTPUT`] bytes in a ring ([`TailBuffer`]): memory is bounded however much a
//!   program prints.
//! - `exec` runs `argv` directly (no shell), stdin `/dev/null`, working directory `/`, the
//!   agent's environment. Exit code: the program's, `128 + n` if killed by signal `n`,
//!   [`EXIT_NOT_FOUND`]/[`EXIT_CANNOT_EXECUTE`] if it could not be started.
//! - `write` and `fetch` replace their destination atomically ([`AtomicFile`]: temporary file
//!   in the same directory, fsync, rename, directory fsync): a crash leaves the old file or
//!   the new one. Paths must be absolute; parent directories are not created.
//! - `fetch` accepts `file:///path` (no percent-decoding) and `http://host[:port]/path` (HTTP/1.1 GET, no TLS, no
//!   redirects, status 200 only; body by `Content-Length`, chunked, or read to close; the
//!   response header is bounded by [`ExecConfig::max_header_bytes`]; each read or connect
//!   waits at most [`ExecConfig::io_timeout`]).
//! - `reboot` is not executed here: the executor stops, marks the reboot step `Ok` and the
//!   later ones `Skipped`, and returns [`Completed::reboot_at`]; the driver records the
//!   reboot, sends `RebootStarting` and reboots. Work that must follow a reboot is a later
//!   command in the queue.
//! - `report` collects a configuration report ([`crate::report`]) into the result's
//!   `report`: it goes to the gateway inside the result, so it is delivered exactly when the
//!   result is (also in a later `Hello`, from the durable ledger).
//! - A command with a target (`Dispatch::target`, `KIND:ID`) runs only if the attached
//!   devices the report would list ([`crate::inventory::devices`]) include it: otherwise its
//!   first step fails with [`EXIT_TARGET_MISSING`] and the output says which target is missing
//!   and what of its kind is attached, and nothing runs. When it is there, the output's first
//!   line names it, and every `exec` gets `FLEETCAST_TARGET` (`KIND:ID`),
//!   `FLEETCAST_TARGET_NAME` (the kernel's name: `sda`) and `FLEETCAST_TARGET_PATH` (`/dev/sda`;
//!   for a network interface or USB device, its `/sys` directory) in its environment.
//! - The result is the wire message itself, owned ([`CommandResult<'static>`]): what the
//!   executor produces is what the ledger keeps and the session sends, with no copy type.

use std::io;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use fleetcast_wire::msg::limits::MAX_OUTPUT;
use fleetcast_wire::{AttachedKind, CommandResult, Dispatch, Step, StepResult, StepStatus};

use crate::inventory;
use crate::report::{self, ReportConfig};

mod fetch;
mod file;
mod output;
mod process;
mod slot;
#[cfg(test)]
mod test_util;

pub use fetch::{FetchError, HttpError};
pub use file::FileError;
pub use output::TailBuffer;
pub use slot::{SlotStepError, UpdateSetup, LEDGER as UPDATE_LEDGER};

/// Exit code of a non-`exec` step that failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit code of a step stopped by the command's timeout (as `timeout(1)`).
pub const EXIT_TIMED_OUT: i32 = 124;
/// Exit code when the program exists but could not be executed (as the shell).
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// Exit code when the program was not found (as the shell).
pub const EXIT_NOT_FOUND: i32 = 127;
/// Exit code of a command the agent was running when it restarted (negative: no process
/// exits with it).
pub const EXIT_AGENT_RESTARTED: i32 = -1;
/// Exit code of a command whose worker thread died without a result.
pub const EXIT_EXECUTOR_LOST: i32 = -2;
/// Exit code of a command whose target is not attached: none of its steps ran.
pub const EXIT_TARGET_MISSING: i32 = -3;

/// Reads of a file or socket are done in chunks of this size.
const CHUNK: usize = 64 * 1024;

/// The driver's clock, read at this one call site.
#[allow(clippy::disallowed_methods)] // The executor is driver-side: step durations and the command deadline are measured in real time.
fn now() -> Instant {
    Instant::now()
}

/// A command to execute: the received [`Dispatch`], owned ([`Dispatch::into_owned`]), so the
/// worker thread keeps it after the frame's buffer is reused.
pub type Job = Dispatch<'static>;

/// The step's name in failure lines of the output.
fn kind(step: &Step<'_>) -> &'static str {
    match step {
        Step::Fetch { .. } => "fetch",
        Step::Verify { .. } => "verify",
        Step::Write { .. } => "write",
        Step::Exec { .. } => "exec",
        Step::Reboot => "reboot",
        Step::Report => "report",
        Step::SlotSwitch { .. } => "slot_switch",
        Step::SlotCommit => "slot_commit",
    }
}

/// What running a [`Job`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The result (partial when a reboot was requested: later steps `Skipped`).
    pub result: CommandResult<'static>,
    /// Index of the reboot step the executor stopped at: the driver now records the reboot,
    /// sends `RebootStarting` and reboots instead of sending the result.
    pub reboot_at: Option<usize>,
    /// Reboot once the result is recorded and sent (not a queue reboot: a `slot_commit` that
    /// rolled back on the new slot goes back to the default, old, slot).
    pub reboot_after: bool,
}

/// Executor settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecConfig {
    /// Sources of the `report` step.
    pub report: ReportConfig,
    /// Longest wait for one connect or read of a fetch.
    pub io_timeout: Duration,
    /// Largest HTTP response header accepted.
    pub max_header_bytes: usize,
    /// The A/B slots and the update ledger (`slot_switch`, `slot_commit`); `None`: the device
    /// has no slots and those steps fail saying so.
    pub update: Option<UpdateSetup>,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            report: ReportConfig::default(),
            io_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            update: None,
        }
    }
}

/// A job running on its worker thread.
#[derive(Debug)]
pub struct Running {
    rx: mpsc::Receiver<Completed>,
    thread: Option<thread::JoinHandle<()>>,
    command_id: u64,
    seq: u64,
    attempt: u32,
    steps: usize,
}

/// Starts `job` on a worker thread. `notify` is called on that thread once the result is
/// ready (wake the driver's poll with it); then [`Running::try_finish`] returns it.
pub fn spawn(
    job: Job,
    cfg: ExecConfig,
    notify: impl FnOnce() + Send + 'static,
) -> io::Result<Running> {
    let (tx, rx) = mpsc::channel();
    let (command_id, seq, attempt, steps) = (job.command_id, job.seq, job.attempt, job.steps.len());
    let thread = thread::Builder::new()
        .name("fleetcast-exec".into())
        // Buffers live on the heap; keep the stack small for embedded targets.
        .stack_size(256 * 1024)
        .spawn(move || {
            let done = run(&job, &cfg);
            // The driver may have dropped `Running` (shutting down): nothing to deliver to.
            let _ = tx.send(done);
            notify();
        })?;
    Ok(Running {
        rx,
        thread: Some(thread),
        command_id,
        seq,
        attempt,
        steps,
    })
}

impl Running {
    /// The running command's queue sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The running attempt.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The result, if the job has finished (never blocks). If the worker died without a
    /// result, a failed result saying so ([`EXIT_EXECUTOR_LOST`]).
    pub fn try_finish(&mut self) -> Option<Completed> {
        match self.rx.try_recv() {
            Ok(done) => {
                self.join();
                Some(done)
            }
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.join();
                Some(self.lost())
            }
        }
    }

    /// Blocks until the job finishes.
    pub fn wait(mut self) -> Completed {
        let done = self.rx.recv().unwrap_or_else(|_| self.lost());
        self.join();
        done
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn lost(&self) -> Completed {
        let mut steps = vec![skipped(); self.steps];
        if let Some(first) = steps.first_mut() {
            first.status = StepStatus::Failed;
            first.exit_code = EXIT_EXECUTOR_LOST;
        }
        Completed {
            result: CommandResult {
                command_id: self.command_id,
                seq: self.seq,
                attempt: self.attempt,
                exit_code: EXIT_EXECUTOR_LOST,
                steps,
                output: b"fleetcast-agent: executor thread died without a result\n".into(),
                report: None,
            },
            reboot_at: None,
            reboot_after: false,
        }
    }
}

fn skipped() -> StepResult {
    StepResult {
        status: StepStatus::Skipped,
        exit_code: 0,
        duration_ms: 0,
    }
}

/// How one step ended.
enum Outcome {
    Ok,
    /// Failed with this exit code.
    Failed(i32),
    TimedOut,
    Reboot,
}

/// Why a non-exec step stopped early.
#[derive(Debug, thiserror::Error)]
enum StepError {
    /// The command's deadline passed (the step becomes `TimedOut`, not `Failed`).
    #[error("command timed out")]
    TimedOut,
    /// A `write` or `verify`, or a fetch's destination file.
    #[error(transparent)]
    File(#[from] file::FileError),
    /// A `fetch` source.
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
}

/// Checks `job`'s target against the attached devices: the environment its `exec` steps get
/// (empty without a target), or the failed result when the target is not attached.
fn resolve_target(
    job: &Job,
    cfg: &ExecConfig,
    out: &mut TailBuffer,
) -> Result<Vec<(&'static str, String)>, Box<Completed>> {
    let Some(t) = &job.target else {
        return Ok(Vec::new());
    };
    let attached = inventory::devices(&cfg.report.root);
    let Some(d) = attached.iter().find(|d| d.matches(t.kind, &t.id)) else {
        let same: Vec<String> = attached
            .iter()
            .filter(|d| d.kind == t.kind)
            .map(|d| format!("{}:{} ({})", d.kind.name(), d.id, d.name))
            .collect();
        let have = match same.is_empty() {
            true => format!("no {} is attached", t.kind.name()),
            false => format!("attached: {}", same.join(", ")),
        };
        out.push(
            format!("fleetcast-agent: target {t} is not attached to this device ({have}); no step ran\n")
                .as_bytes(),
        );
        let mut steps = vec![skipped(); job.steps.len()];
        if let Some(first) = steps.first_mut() {
            first.status = StepStatus::Failed;
            first.exit_code = EXIT_TARGET_MISSING;
        }
        return Err(Box::new(Completed {
            result: CommandResult {
                command_id: job.command_id,
                seq: job.seq,
                attempt: job.attempt,
                exit_code: EXIT_TARGET_MISSING,
                steps,
                output: out.to_vec().into(),
                report: None,
            },
            reboot_at: None,
            reboot_after: false,
        }));
    };
    let path = match d.kind {
        AttachedKind::Disk | AttachedKind::Serial => format!("/dev/{}", d.name),
        AttachedKind::Net => format!("/sys/class/net/{}", d.name),
        AttachedKind::Usb => format!("/sys/bus/usb/devices/{}", d.name),
    };
    out.push(format!("fleetcast-agent: target {t} is {path}\n").as_bytes());
    Ok(vec![
        ("FLEETCAST_TARGET", t.to_string()),
        ("FLEETCAST_TARGET_NAME", d.name.to_string()),
        ("FLEETCAST_TARGET_PATH", path),
    ])
}

/// Runs `job` to completion on the calling thread (blocking).
pub fn run(job: &Job, cfg: &ExecConfig) -> Completed {
    let start = now();
    let deadline =
        (job.timeout_ms > 0).then(|| start + Duration::from_millis(job.timeout_ms.into()));
    let mut out = TailBuffer::new(MAX_OUTPUT);
    let env = match resolve_target(job, cfg, &mut out) {
        Ok(env) => env,
        Err(missing) => return *missing,
    };
    let mut steps = Vec::with_capacity(job.steps.len());
    let mut exit_code = 0;
    let mut reboot_at = None;
    let mut reboot_after = false;
    let mut report = None;
    let mut stopped = false;
    for (i, step) in job.steps.iter().enumerate() {
        if stopped {
            steps.push(skipped());
            continue;
        }
        let t0 = now();
        let outcome = if expired(deadline) {
            Outcome::TimedOut
        } else {
            match step {
                Step::Exec { argv } => process::exec(argv, deadline, &env, &mut out),
                Step::Reboot => Outcome::Reboot,
                Step::Report => match report::collect(&cfg.report) {
                    Ok(r) => {
                        report = Some(r);
                        Outcome::Ok
                    }
                    Err(e) => fail(&mut out, i, step, &e.to_string()),
                },
                Step::Fetch { url, path } => {
                    file_step(&mut out, i, step, fetch::fetch(url, path, deadline, cfg))
                }
                Step::Verify { path, sha256 } => {
                    file_step(&mut out, i, step, file::verify(path, sha256, deadline))
                }
                Step::Write {
                    path,
                    mode,
                    contents,
                } => file_step(&mut out, i, step, file::write(path, *mode, contents)),
                Step::SlotSwitch { deadline_secs } => {
                    let r = slot::switch(
                        cfg.update.as_ref(),
                        *deadline_secs,
                        slot::wall_ms(),
                        &mut out,
                    );
                    slot_step(&mut out, i, step, r, &mut reboot_after)
                }
                Step::SlotCommit => {
                    let r = slot::commit(cfg.update.as_ref(), slot::wall_ms(), &mut out);
                    slot_step(&mut out, i, step, r, &mut reboot_after)
                }
            }
        };
        let duration_ms = u32::try_from(now().duration_since(t0).as_millis()).unwrap_or(u32::MAX);
        let (status, code) = match outcome {
            Outcome::Ok => (StepStatus::Ok, 0),
            Outcome::Reboot => {
                reboot_at = Some(i);
                stopped = true;
                (StepStatus::Ok, 0)
            }
            Outcome::Failed(code) => {
                stopped = true;
                (StepStatus::Failed, code)
            }
            Outcome::TimedOut => {
                out.push(
                    format!(
                        "fleetcast-agent: step {i} ({}): command timed out after {} ms\n",
                        kind(step),
                        job.timeout_ms
                    )
                    .as_bytes(),
                );
                stopped = true;
                (StepStatus::TimedOut, EXIT_TIMED_OUT)
            }
        };
        if status != StepStatus::Ok && exit_code == 0 {
            exit_code = code;
        }
        steps.push(StepResult {
            status,
            exit_code: code,
            duration_ms,
        });
    }
    Completed {
        result: CommandResult {
            command_id: job.command_id,
            seq: job.seq,
            attempt: job.attempt,
            exit_code,
            steps,
            output: out.to_vec().into(),
            report,
        },
        reboot_at,
        reboot_after,
    }
}

fn slot_step(
    out: &mut TailBuffer,
    i: usize,
    step: &Step<'_>,
    r: Result<slot::Done, SlotStepError>,
    reboot_after: &mut bool,
) -> Outcome {
    match r {
        Ok(done) => {
            *reboot_after |= done.reboot_after;
            done.outcome
        }
        Err(e) => fail(out, i, step, &e.to_string()),
    }
}

fn expired(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| now() >= d)
}

fn fail(out: &mut TailBuffer, i: usize, step: &Step<'_>, msg: &str) -> Outcome {
    out.push(format!("fleetcast-agent: step {i} ({}): {msg}\n", kind(step)).as_bytes());
    Outcome::Failed(EXIT_FAILED)
}

fn file_step(out: &mut TailBuffer, i: usize, step: &Step<'_>, r: Result<(), StepError>) -> Outcome {
    match r {
        Ok(()) => Outcome::Ok,
        Err(StepError::TimedOut) => Outcome::TimedOut,
        Err(e) => fail(out, i, step, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use std::borrow::Cow;
    use std::fs;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn steps_after_a_failure_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("never");
        let done = run(
            &job(
                0,
                vec![
                    sh("true"),
                    sh("exit 5"),
                    Step::Write {
                        path: target.to_str().unwrap().to_owned().into(),
                        mode: 0o644,
                        contents: b"x".into(),
                    },
                    sh("echo nope"),
                ],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(
            statuses(&done),
            [
                StepStatus::Ok,
                StepStatus::Failed,
                StepStatus::Skipped,
                StepStatus::Skipped
            ]
        );
        assert_eq!(done.result.exit_code, 5);
        assert!(!target.exists());
        assert!(!output(&done).contains("nope"));
    }

    #[test]
    fn reboot_stops_the_executor() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("after");
        let done = run(
            &job(
                0,
                vec![
                    sh("echo before"),
                    Step::Reboot,
                    sh(&format!("touch {}", marker.display())),
                ],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(done.reboot_at, Some(1));
        assert_eq!(
            statuses(&done),
            [StepStatus::Ok, StepStatus::Ok, StepStatus::Skipped]
        );
        assert_eq!(done.result.exit_code, 0);
        assert!(!marker.exists());
    }

    /// A command whose target the fake tree has runs, with the target in its environment
    /// and named in its output; one whose target is missing runs nothing and says why.
    #[test]
    fn a_target_is_checked_before_any_step_runs() {
        let dir = tempfile::tempdir().unwrap();
        crate::inventory::tests::fake_tree(dir.path());
        let cfg = ExecConfig {
            report: ReportConfig {
                root: dir.path().to_owned(),
                ..ReportConfig::default()
            },
            ..ExecConfig::default()
        };
        let marker = dir.path().join("ran");
        let touch = sh(&format!(
            "echo \"$FLEETCAST_TARGET $FLEETCAST_TARGET_NAME $FLEETCAST_TARGET_PATH\"; touch {}",
            marker.display()
        ));
        let target = |t: &str| Some(fleetcast_wire::Target::parse(t).unwrap().into_owned());

        // Present, by serial (and by WWN): runs.
        let mut j = job(0, vec![touch.clone(), sh("true")]);
        j.target = target("disk:S3Z9NB0K123456");
        let done = run(&j, &cfg);
        assert_eq!(statuses(&done), [StepStatus::Ok, StepStatus::Ok]);
        assert_eq!(
            output(&done),
            "fleetcast-agent: target disk:S3Z9NB0K123456 is /dev/sda\n\
             disk:S3Z9NB0K123456 sda /dev/sda\n"
        );
        assert!(marker.exists());
        std::fs::remove_file(&marker).unwrap();
        j.target = target("serial:/dev/ttyUSB0");
        assert_eq!(run(&j, &cfg).result.exit_code, 0);
        std::fs::remove_file(&marker).unwrap();

        // Missing: the first step fails with the reason, the rest are skipped, nothing ran.
        j.target = target("disk:NOT-HERE");
        let done = run(&j, &cfg);
        assert_eq!(statuses(&done), [StepStatus::Failed, StepStatus::Skipped]);
        assert_eq!(done.result.exit_code, EXIT_TARGET_MISSING);
        assert_eq!(done.result.steps[0].exit_code, EXIT_TARGET_MISSING);
        assert_eq!(
            output(&done),
            "fleetcast-agent: target disk:NOT-HERE is not attached to this device (attached: \
             disk:eui.0025388b91b0a1c2 (nvme0n1), disk:S3Z9NB0K123456 (sda)); no step ran\n"
        );
        assert!(!marker.exists());
        // A kind with nothing attached says so; a phantom ttyS (no UART) is not attached.
        j.target = target("serial:/dev/ttyS1");
        let done = run(&j, &cfg);
        assert_eq!(done.result.exit_code, EXIT_TARGET_MISSING);
        assert!(
            output(&done)
                .contains("attached: serial:/dev/ttyS0 (ttyS0), serial:/dev/ttyUSB0 (ttyUSB0)"),
            "{}",
            output(&done)
        );
        let empty = ExecConfig {
            report: ReportConfig {
                root: dir.path().join("nothing"),
                ..ReportConfig::default()
            },
            ..ExecConfig::default()
        };
        j.target = target("usb:0403:6001");
        assert!(output(&run(&j, &empty)).contains("(no usb is attached)"));
        assert!(!marker.exists());
    }

    #[test]
    fn report_step_and_worker_thread() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot_id");
        fs::write(&boot, "00112233-4455-6677-8899-aabbccddeeff\n").unwrap();
        let cfg = ExecConfig {
            report: ReportConfig {
                os_release: dir.path().join("missing-os-release"),
                boot_id: boot,
                root: dir.path().join("empty-root"),
                dpkg_status: None,
            },
            ..ExecConfig::default()
        };
        let (tx, rx) = mpsc::channel();
        let mut running = spawn(
            job(0, vec![sh("echo working"), Step::Report]),
            cfg.clone(),
            move || tx.send(()).unwrap(),
        )
        .unwrap();
        assert_eq!(running.seq(), 3);
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
        let done = running.try_finish().expect("notified, so finished");
        assert_eq!(statuses(&done), [StepStatus::Ok, StepStatus::Ok]);
        let report = done.result.report.clone().unwrap();
        assert_eq!(report.boot_id[1], 0x11);
        assert!(report.software.is_empty());
        // The report travels inside the result, which is the wire message: it emits as one.
        let msg = fleetcast_wire::Message::Result(done.result.clone());
        let mut frame = Vec::new();
        msg.emit_to_vec(&mut frame).unwrap();
        let (parsed, _) =
            fleetcast_wire::Frame::parse_prefix(&frame, fleetcast_wire::header::MAX_STREAM_BODY)
                .unwrap();
        match fleetcast_wire::Message::parse(&parsed).unwrap() {
            fleetcast_wire::Message::Result(r) => assert_eq!(r.report, Some(report)),
            other => panic!("not a Result: {other:?}"),
        }
        assert_eq!(output(&done), "working\n");

        // A failing report step (bad boot id file) is a failed step with a message.
        let bad = ExecConfig {
            report: ReportConfig {
                boot_id: dir.path().join("nope"),
                ..cfg.report
            },
            ..ExecConfig::default()
        };
        let done = spawn(job(0, vec![Step::Report]), bad, || {})
            .unwrap()
            .wait();
        assert_eq!(statuses(&done), [StepStatus::Failed]);
        assert!(output(&done).contains("nope"));
        assert_eq!(done.result.report, None);
    }

    #[test]
    fn job_from_dispatch_is_owned() {
        // Borrowed from a buffer that is gone before the job runs.
        let frame = String::from("a");
        let d = Dispatch {
            target: None,
            command_id: 1,
            seq: 2,
            attempt: 5,
            timeout_ms: 3,
            steps: vec![
                Step::Exec {
                    argv: vec![Cow::Borrowed(frame.as_str()), "b".into()],
                },
                Step::Write {
                    path: "/p".into(),
                    mode: 0o600,
                    contents: b"c".into(),
                },
                Step::Verify {
                    path: "/p".into(),
                    sha256: [1; 32],
                },
                Step::Fetch {
                    url: "file:///x".into(),
                    path: "/y".into(),
                },
                Step::Reboot,
                Step::Report,
            ],
        };
        let j: Job = d.clone().into_owned();
        drop(d);
        drop(frame);
        assert_eq!((j.command_id, j.seq, j.attempt, j.timeout_ms), (1, 2, 5, 3));
        assert_eq!(
            j.steps[0],
            Step::Exec {
                argv: vec!["a".into(), "b".into()]
            }
        );
        assert_eq!(j.steps.len(), 6);
    }
}
