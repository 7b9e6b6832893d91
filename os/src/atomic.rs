//! Replacing a file atomically and durably.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file written in place of `dest` only when [`AtomicFile::commit`] succeeds: the data goes
/// to a temporary file in the same directory (so the rename cannot cross file systems),
/// which is fsynced, renamed over `dest`, and the directory fsynced. Dropped uncommitted, the
/// temporary file is removed and `dest` is untouched.
///
/// The temporary file's name is unique (`.NAME.tmp.PID.N`), so two writers of the same
/// destination never share one, and it is created 0600 before its mode is set: its bytes are
/// never readable by others while they are written, even when `dest` is to be public.
#[derive(Debug)]
pub struct AtomicFile {
    /// `None` once committed.
    file: Option<File>,
    /// Empty once renamed (nothing to clean up).
    tmp: PathBuf,
    dest: PathBuf,
}

impl AtomicFile {
    /// Creates the temporary file for `dest`, with permission bits `mode` (set explicitly,
    /// not filtered by the umask).
    pub fn create(dest: &Path, mode: u32) -> io::Result<AtomicFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = dest
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
        let dir = parent_dir(dest);
        let mut attempt = 0;
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(".tmp.{}.{n}", std::process::id()));
            let tmp = dir.join(tmp_name);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
            {
                Ok(file) => {
                    file.set_permissions(Permissions::from_mode(mode & 0o7777))?;
                    return Ok(AtomicFile {
                        file: Some(file),
                        tmp,
                        dest: dest.to_owned(),
                    });
                }
                // A leftover of a crashed earlier process with the same pid: try another name.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The destination this file replaces.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Flushes the data to disk and replaces `dest` with it, durably.
    pub fn commit(mut self) -> io::Result<()> {
        let Some(file) = self.file.take() else {
            return Err(io::ErrorKind::NotFound.into());
        };
        file.sync_all()?;
        drop(file);
        fs::rename(&self.tmp, &self.dest)?;
        // Renamed: nothing left to clean up, even if the directory sync fails.
        self.tmp = PathBuf::new();
        sync_dir(&parent_dir(&self.dest))
    }

    fn file(&mut self) -> io::Result<&mut File> {
        self.file
            .as_mut()
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file()?.write(buf)
    }

    /// Nothing to do: [`AtomicFile::commit`] makes the data durable.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Replaces `dest` with `bytes` atomically and durably (see [`AtomicFile`]); `mode` is set
/// exactly, whatever the umask.
pub fn write_atomic(dest: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = AtomicFile::create(dest, mode)?;
    f.write_all(bytes)?;
    f.commit()
}

/// Makes a directory's entries (creations, renames) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o640).unwrap();
        assert_eq!(mode(&p), 0o640);
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode(&p), 0o600);
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn uncommitted_atomic_file_leaves_destination_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"old", 0o644).unwrap();
        let mut f = AtomicFile::create(&p, 0o644).unwrap();
        f.write_all(b"new, never committed").unwrap();
        assert_eq!(f.dest(), p);
        drop(f);
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A leftover temporary file of a crashed writer (another mode, other contents) neither
    /// blocks the next write nor leaks into it.
    #[test]
    fn a_crashed_writers_leftover_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        let f = AtomicFile::create(&p, 0o600).unwrap();
        // What a crash leaves: the temporary file stays (no Drop ran).
        std::mem::forget(f);
        write_atomic(&p, b"secret", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"secret");
        assert_eq!(mode(&p), 0o600);
    }

    #[test]
    fn a_path_without_a_file_name_is_refused() {
        let e = AtomicFile::create(Path::new("/"), 0o600).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
