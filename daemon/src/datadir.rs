//! The gateway's hold on its data directory: one `fleetcastd` per directory, and the directory
//! private to the user it runs as.
//!
//! Invariants:
//! - While a gateway runs it holds an exclusive `flock` on `<data_dir>/fleetcastd.lock` (the
//!   file holds its PID, for the message a second one prints). The lock goes with the process,
//!   `kill -9` included, so there is nothing stale to clean up. A second gateway on the same
//!   directory is refused before it touches anything: not the admin socket, not the store, not
//!   the certificates.
//! - The directory is mode 0700 whatever the umask: created so, and an existing one that group
//!   or others may enter is tightened to 0700 (with a warning naming the old mode). Everything
//!   in it (the store, the CA key, the admin socket) is then out of other users' reach even
//!   where the files themselves are not 0600, as on a restored backup.

use std::fs;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "fleetcastd.lock";

/// The data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Another gateway holds the lock.
    #[error(
        "data directory {dir} is in use by another fleetcastd ({holder}); stop it first \
         (`fleetcast status` talks to it), or give this one another --data-dir"
    )]
    InUse {
        /// The data directory.
        dir: PathBuf,
        /// `pid N`, or why the PID is unknown.
        holder: String,
    },
    /// The directory or the lock file cannot be created, opened or locked.
    #[error("data directory {path}: {source}")]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// The exclusive hold on a data directory; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct DataDirLock {
    _file: fs::File,
}

/// What [`claim`] did to an existing directory's mode, for the caller to log.
pub use fleetcast_os::Tightened;

/// Creates `dir` (mode 0700) if missing, takes its lock, and makes it 0700 if group or others
/// had access. Refuses with [`DataDirError::InUse`] when another process holds the lock, before
/// changing anything.
pub fn claim(dir: &Path) -> Result<(DataDirLock, Tightened), DataDirError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DataDirError::Io { path, source }
    };
    let created = fleetcast_os::create_private_dir(dir).map_err(io_err(dir))?;
    let path = dir.join(LOCK_FILE);
    // No truncation on open: a refused second gateway must leave the holder's PID in place.
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(fleetcast_os::PRIVATE_FILE_MODE)
        .open(&path)
        .map_err(io_err(&path))?;
    if let Err(e) = try_lock(&file) {
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(io_err(&path)(e));
        }
        let mut text = String::new();
        let holder = match file.read_to_string(&mut text) {
            Ok(_) => match text.trim().parse::<u32>() {
                Ok(pid) => format!("pid {pid}"),
                Err(_) => format!("pid unknown: {} holds no PID", path.display()),
            },
            Err(e) => format!("pid unknown: {}: {e}", path.display()),
        };
        return Err(DataDirError::InUse {
            dir: dir.to_owned(),
            holder,
        });
    }
    file.set_len(0).map_err(io_err(&path))?;
    file.rewind().map_err(io_err(&path))?;
    writeln!(file, "{}", std::process::id()).map_err(io_err(&path))?;
    let tightened = if created {
        Tightened::No
    } else {
        fleetcast_os::tighten(dir, fleetcast_os::PRIVATE_DIR_MODE).map_err(io_err(dir))?
    };
    Ok((DataDirLock { _file: file }, tightened))
}

fn try_lock(file: &fs::File) -> io::Result<()> {
    fleetcast_os::retry_interrupted(
        || {
            // SAFETY: flock on a descriptor this function borrows open; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        },
        // Each repeat needs another signal: repeating for as long as they come is bounded.
        || Ok::<_, io::Error>(()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_second_claim_is_refused_with_the_holders_pid_and_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("data");
        let (lock, t) = claim(&dir).unwrap();
        assert_eq!(t, Tightened::No);
        assert_eq!(mode(&dir), 0o700);
        let pid = fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        // flock locks belong to the open file description: a second open in this process
        // conflicts like another process would.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let e = claim(&dir).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, DataDirError::InUse { .. }), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("in use by another fleetcastd"), "{msg}");
        assert_eq!(mode(&dir), 0o755, "the refused claim changed the mode");
        assert_eq!(fs::read_to_string(dir.join(LOCK_FILE)).unwrap(), pid);
        drop(lock);
        let (_lock, t) = claim(&dir).unwrap();
        assert_eq!(t, Tightened::From(0o755));
        assert_eq!(mode(&dir), 0o700);
    }
}
