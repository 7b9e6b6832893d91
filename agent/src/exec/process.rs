//! The `exec` step: process control. The program runs without a shell in a process group of
//! its own (so a timeout kills its descendants too), stdin `/dev/null`, stdout and stderr on
//! one close-on-exec pipe read into the output ring.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Read as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{expired, now, Outcome, TailBuffer, EXIT_CANNOT_EXECUTE, EXIT_FAILED, EXIT_NOT_FOUND};

/// While a program runs, its status is checked at least this often (a grandchild may keep
/// the output pipe open after the program exits).
const EXEC_POLL: Duration = Duration::from_millis(100);

/// A pipe whose ends are close-on-exec (the child gets dup2'd copies only).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Waits up to `timeout` for `fd` to be readable (or hung up). EINTR counts as "not yet".
fn poll_readable(fd: &File, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `p` is one valid pollfd.
    match unsafe { libc::poll(&mut p, 1, ms) } {
        -1 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// Reads once from a readable pipe into `out`; `Ok(false)` at end of file.
fn read_into(pipe: &mut File, buf: &mut [u8], out: &mut TailBuffer) -> io::Result<bool> {
    match pipe.read(buf) {
        Ok(0) => Ok(false),
        Ok(n) => {
            out.push(&buf[..n]);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(e) => Err(e),
    }
}

/// Reads what is already buffered in the pipe (bounded: a grandchild may keep writing).
fn drain(pipe: &mut File, buf: &mut [u8], out: &mut TailBuffer) {
    for _ in 0..256 {
        match poll_readable(pipe, Duration::ZERO) {
            Ok(true) => {
                if !matches!(read_into(pipe, buf, out), Ok(true)) {
                    return;
                }
            }
            _ => return,
        }
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(EXIT_FAILED)
}

pub(super) fn exec(
    argv: &[Cow<'_, str>],
    deadline: Option<Instant>,
    env: &[(&str, String)],
    out: &mut TailBuffer,
) -> Outcome {
    let Some(program) = argv.first() else {
        out.push(b"fleetcast-agent: exec: empty argv\n");
        return Outcome::Failed(EXIT_NOT_FOUND);
    };
    let spawned = pipe().and_then(|(r, w)| {
        let w2 = w.try_clone()?;
        // The Command (holding the parent's copies of the write end) is dropped at the end of
        // this closure, so end of file arrives when the child side closes.
        let child = Command::new(&**program)
            .args(argv[1..].iter().map(|a| &**a))
            .stdin(Stdio::null())
            .stdout(Stdio::from(w))
            .stderr(Stdio::from(w2))
            .current_dir("/")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .process_group(0)
            .spawn()?;
        Ok((child, File::from(r)))
    });
    let (mut child, mut pipe) = match spawned {
        Ok(c) => c,
        Err(e) => {
            out.push(format!("fleetcast-agent: exec {program}: {e}\n").as_bytes());
            return Outcome::Failed(if e.kind() == io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_EXECUTE
            });
        }
    };
    let mut buf = vec![0u8; 4096];
    let mut eof = false;
    let result = loop {
        let wait = match deadline {
            None => EXEC_POLL,
            Some(d) => d.saturating_duration_since(now()).min(EXEC_POLL),
        };
        if !eof {
            match poll_readable(&pipe, wait) {
                Ok(true) => match read_into(&mut pipe, &mut buf, out) {
                    Ok(more) => eof = !more,
                    Err(e) => break Err(e),
                },
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                drain(&mut pipe, &mut buf, out);
                break Ok(Some(status));
            }
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        if expired(deadline) {
            break Ok(None);
        }
        if eof {
            // The program closed its output but runs on: wait for it.
            match deadline {
                None => break child.wait().map(Some),
                Some(_) => thread::sleep(wait.min(Duration::from_millis(5))),
            }
        }
    };
    match result {
        Ok(Some(status)) => match exit_code(status) {
            0 => Outcome::Ok,
            code => Outcome::Failed(code),
        },
        Ok(None) => {
            kill_group(&mut child);
            drain(&mut pipe, &mut buf, out);
            Outcome::TimedOut
        }
        Err(e) => {
            kill_group(&mut child);
            out.push(format!("fleetcast-agent: exec {program}: {e}\n").as_bytes());
            Outcome::Failed(EXIT_FAILED)
        }
    }
}

/// Kills the child's whole process group and reaps the child.
fn kill_group(child: &mut std::process::Child) {
    if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: plain syscall. The child is not yet reaped, so its pid (= its process
        // group id, set by `process_group(0)`) cannot have been reused.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use std::fs;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn exec_exit_code_and_output() {
        let done = run(
            &job(0, vec![sh("echo hi; echo err >&2; exit 3")]),
            &ExecConfig::default(),
        );
        assert_eq!(statuses(&done), [StepStatus::Failed]);
        assert_eq!(done.result.exit_code, 3);
        assert_eq!(done.result.steps[0].exit_code, 3);
        assert_eq!(output(&done), "hi\nerr\n");
        assert_eq!((done.result.seq, done.result.command_id), (3, 77));
        assert_eq!(done.reboot_at, None);

        let done = run(&job(0, vec![sh("true")]), &ExecConfig::default());
        assert_eq!(statuses(&done), [StepStatus::Ok]);
        assert_eq!(done.result.exit_code, 0);
    }

    #[test]
    fn exec_signal_not_found_and_stdin_null() {
        let done = run(&job(0, vec![sh("kill -TERM $$")]), &ExecConfig::default());
        assert_eq!(done.result.exit_code, 128 + libc::SIGTERM);
        let done = run(
            &job(
                0,
                vec![Step::Exec {
                    argv: vec!["/nonexistent/program".into()],
                }],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(done.result.exit_code, EXIT_NOT_FOUND);
        assert!(output(&done).contains("/nonexistent/program"));
        let done = run(
            &job(0, vec![Step::Exec { argv: vec![] }]),
            &ExecConfig::default(),
        );
        assert_eq!(done.result.exit_code, EXIT_NOT_FOUND);
        // No shell: metacharacters are plain arguments. stdin is /dev/null: `cat` ends at once.
        let done = run(
            &job(
                0,
                vec![
                    Step::Exec {
                        argv: vec!["echo".into(), "$HOME;".into(), "|x".into()],
                    },
                    Step::Exec {
                        argv: vec!["cat".into()],
                    },
                ],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(statuses(&done), [StepStatus::Ok, StepStatus::Ok]);
        assert_eq!(output(&done), "$HOME; |x\n");
    }

    #[test]
    fn background_process_holding_the_pipe_does_not_block() {
        // The program exits at once; its background child keeps the output pipe open. The
        // step must end with the program (Ok), not wait for the pipe (which would hit the
        // command timeout: TimedOut).
        let done = run(
            &job(10_000, vec![sh("sleep 30 & echo $!; echo started")]),
            &ExecConfig::default(),
        );
        let out = output(&done);
        let pid: libc::pid_t = out.lines().next().unwrap().trim().parse().unwrap();
        // SAFETY: plain syscall on the pid the test's own shell started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(statuses(&done), [StepStatus::Ok], "{out}");
        assert!(out.ends_with("started\n"), "{out}");
    }

    #[test]
    fn timeout_kills_the_process_group() {
        // The shell starts a grandchild and prints its pid; both must die.
        let done = run(
            &job(
                200,
                vec![
                    sh("sleep 10 & echo $!; sleep 10; echo never"),
                    sh("echo skipped"),
                ],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(statuses(&done), [StepStatus::TimedOut, StepStatus::Skipped]);
        assert_eq!(done.result.exit_code, EXIT_TIMED_OUT);
        let out = output(&done);
        assert!(!out.contains("never") && !out.contains("skipped"), "{out}");
        assert!(out.contains("timed out after 200 ms"), "{out}");
        let pid: u32 = out.lines().next().unwrap().trim().parse().unwrap();
        // The killed grandchild is reparented and reaped by init; wait (bounded) for that.
        let stat = format!("/proc/{pid}/stat");
        let mut alive = true;
        for _ in 0..500 {
            match fs::read_to_string(&stat) {
                Err(_) => {
                    alive = false;
                    break;
                }
                // Dead but not yet reaped counts as killed.
                Ok(s) if s.rsplit(')').next().unwrap().trim_start().starts_with('Z') => {
                    alive = false;
                    break;
                }
                Ok(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
        assert!(!alive, "grandchild {pid} survived the timeout");
    }
}
