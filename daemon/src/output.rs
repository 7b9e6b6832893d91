//! Output of the command-line programs without the panics of `print!` and `eprint!`.
//!
//! `println!` panics when stdout cannot be written: `fleetcast ... --json | head -1` (the
//! reader closed the pipe), `> /dev/full`, a full disk. Here a write failure is remembered
//! instead: the rest of the output is dropped, loops that only print (`watch`) see
//! [`stdout_gone`] and stop, and [`exit_code`] turns a real failure (not a reader that went
//! away, which is the reader's choice) into exit 1. Lines on stderr that cannot be written are
//! lost, never a panic.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::exit::Exit;

const OK: u8 = 0;
const READER_GONE: u8 = 1;
const FAILED: u8 = 2;

static STDOUT: AtomicU8 = AtomicU8::new(OK);

/// Writes `text` to stdout (nothing once a write has failed).
pub fn out(text: &str) {
    if stdout_gone() {
        return;
    }
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        let state = if e.kind() == std::io::ErrorKind::BrokenPipe {
            READER_GONE
        } else {
            let prog = std::env::args_os()
                .next()
                .map(std::path::PathBuf::from)
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            err(&format!("{prog}: cannot write the output: {e}"));
            FAILED
        };
        STDOUT.store(state, Ordering::Relaxed);
    }
}

/// Writes a line to stderr; lost if stderr cannot be written.
pub fn err(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = e.write_all(line.as_bytes());
    let _ = e.write_all(b"\n");
}

/// True once a write to stdout has failed: nothing more will be printed.
pub fn stdout_gone() -> bool {
    STDOUT.load(Ordering::Relaxed) != OK
}

/// `code`, unless the output could not be written for another reason than its reader leaving:
/// then exit 1 (the command's output is lost).
pub fn exit_code(code: ExitCode) -> ExitCode {
    if STDOUT.load(Ordering::Relaxed) == FAILED {
        Exit::Failed.into()
    } else {
        code
    }
}

/// `println!` through [`out`].
#[macro_export]
macro_rules! outln {
    () => { $crate::output::out("\n") };
    ($($arg:tt)*) => { $crate::output::out(&format!("{}\n", format_args!($($arg)*))) };
}

/// `eprintln!` through [`err`].
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => { $crate::output::err(&format!($($arg)*)) };
}
