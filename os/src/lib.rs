//! What the gateway, the agent and the store need from the operating system, written once.
//!
//! - [`AtomicFile`] / [`write_atomic`]: replace a file so that after a crash it holds either
//!   its old or its new contents, never a mix (temporary file in the same directory, fsync,
//!   rename, fsync of the directory).
//! - [`create_private_dir`], [`private_dir`], [`tighten`]: directories only their owner may
//!   enter (0700) and files only their owner may read (0600), whatever the umask, existing
//!   ones included (a restored backup may be world-readable).
//! - [`retry_interrupted`]: repeat a call a signal interrupted before it did anything.
//!
//! Invariants: nothing here reads a clock or spawns a thread; every function returns the
//! operating system's own `io::Error` (callers add the path or the purpose to it in their own
//! typed errors); no `unsafe`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod atomic;
mod private;

pub use atomic::{sync_dir, write_atomic, AtomicFile};
pub use private::{
    create_private_dir, private_dir, tighten, Tightened, PRIVATE_DIR_MODE, PRIVATE_FILE_MODE,
};

use std::io;

/// Calls `f` again while it fails with [`io::ErrorKind::Interrupted`], each time after
/// `again()` allowed it (an `Err` from `again`, a deadline passed say, is returned instead).
///
/// A signal arriving while a call blocks (a command's child exiting, say) interrupts it before
/// it did anything, so the call is simply repeated: giving up instead would abandon an
/// exchange whose request was already sent. `again` bounds the repeats in time for callers
/// that have a deadline; `|| Ok::<_, io::Error>(())` repeats for as long as signals come.
pub fn retry_interrupted<T, E: From<io::Error>>(
    mut f: impl FnMut() -> io::Result<T>,
    mut again: impl FnMut() -> Result<(), E>,
) -> Result<T, E> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => again()?,
            r => return r.map_err(E::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Interrupted calls are repeated while `again` allows; its refusal is the error; any
    /// other outcome is returned at once.
    #[test]
    fn interrupted_calls_are_repeated_until_refused() {
        let mut calls = 0;
        let r: io::Result<u32> = retry_interrupted(
            || {
                calls += 1;
                if calls < 5 {
                    Err(io::ErrorKind::Interrupted.into())
                } else {
                    Ok(7)
                }
            },
            || Ok::<_, io::Error>(()),
        );
        assert_eq!((r.unwrap(), calls), (7, 5));

        let mut allowed = 2;
        let mut calls = 0;
        let r: Result<(), Deadline> = retry_interrupted(
            || {
                calls += 1;
                Err(io::ErrorKind::Interrupted.into())
            },
            || {
                if allowed == 0 {
                    return Err(Deadline::Passed);
                }
                allowed -= 1;
                Ok(())
            },
        );
        assert_eq!((r, calls), (Err(Deadline::Passed), 3));

        // Any other error is the caller's, converted, without asking `again`.
        let r: Result<(), Deadline> = retry_interrupted(
            || Err(io::ErrorKind::WouldBlock.into()),
            || panic!("not interrupted: no retry"),
        );
        assert_eq!(r, Err(Deadline::Io(io::ErrorKind::WouldBlock)));
    }

    /// A caller's own error type, as the agent's ladder has one.
    #[derive(Debug, PartialEq)]
    enum Deadline {
        Passed,
        Io(io::ErrorKind),
    }
    impl From<io::Error> for Deadline {
        fn from(e: io::Error) -> Self {
            Deadline::Io(e.kind())
        }
    }
}
