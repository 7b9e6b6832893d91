//! Directories and files that are nobody else's business.

use std::fs::{self, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;

/// Mode of a private directory: only its owner may list or enter it.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of a private file: only its owner may read or write it.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// What [`tighten`] (or [`private_dir`]) did to an existing path's mode, for the caller to
/// log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tightened {
    /// It already granted nothing beyond the mode (or was just created with it).
    No,
    /// It had these permission bits and now has the mode.
    From(u32),
}

/// Creates `dir` with mode exactly 0700 (its missing parents with the usual mode); returns
/// whether it was created. An existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> io::Result<bool> {
    if dir.is_dir() {
        return Ok(false);
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(PRIVATE_DIR_MODE).create(dir) {
        Ok(()) => {}
        // Another process created it in between: treat it as existing.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(false),
        Err(e) => return Err(e),
    }
    // The umask may have taken bits away (0700 & !umask); set exactly 0700.
    fs::set_permissions(dir, Permissions::from_mode(PRIVATE_DIR_MODE))?;
    Ok(true)
}

/// Sets `path` (a directory or a file) to `mode` when it grants an access bit (read, write,
/// execute) beyond `mode`, to group or others say; returns what it was (all its permission
/// bits). A stricter mode is left alone, and so are set-id and sticky bits that grant no
/// access. A missing `path` is `NotFound`.
pub fn tighten(path: &Path, mode: u32) -> io::Result<Tightened> {
    let current = fs::metadata(path)?.permissions().mode() & 0o7777;
    if current & 0o777 & !mode == 0 {
        return Ok(Tightened::No);
    }
    fs::set_permissions(path, Permissions::from_mode(mode))?;
    Ok(Tightened::From(current))
}

/// Makes `dir` a private directory: created 0700 when missing ([`create_private_dir`]), else
/// tightened to 0700 ([`tighten`]).
pub fn private_dir(dir: &Path) -> io::Result<Tightened> {
    if create_private_dir(dir)? {
        return Ok(Tightened::No);
    }
    tighten(dir, PRIVATE_DIR_MODE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn created_exactly_private_and_parents_made() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("a/b");
        assert!(create_private_dir(&dir).unwrap());
        assert_eq!(mode(&dir), 0o700);
        assert!(!create_private_dir(&dir).unwrap());
        fs::set_permissions(&dir, Permissions::from_mode(0o750)).unwrap();
        assert_eq!(
            tighten(&dir, PRIVATE_DIR_MODE).unwrap(),
            Tightened::From(0o750)
        );
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(tighten(&dir, PRIVATE_DIR_MODE).unwrap(), Tightened::No);
    }

    #[test]
    fn an_open_directory_is_tightened_and_a_new_one_created() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        assert_eq!(private_dir(&dir).unwrap(), Tightened::No);
        assert_eq!(mode(&dir), 0o700);
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        assert_eq!(private_dir(&dir).unwrap(), Tightened::From(0o755));
        assert_eq!(mode(&dir), 0o700);
        // A stricter mode is left alone: tightening never loosens.
        fs::set_permissions(&dir, Permissions::from_mode(0o500)).unwrap();
        assert_eq!(private_dir(&dir).unwrap(), Tightened::No);
        assert_eq!(mode(&dir), 0o500);
        fs::set_permissions(&dir, Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn files_are_tightened_and_missing_ones_reported() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("data.mdb");
        assert_eq!(
            tighten(&f, PRIVATE_FILE_MODE).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            tighten(&f, PRIVATE_FILE_MODE).unwrap(),
            Tightened::From(0o644)
        );
        assert_eq!(mode(&f), 0o600);
        assert_eq!(tighten(&f, PRIVATE_FILE_MODE).unwrap(), Tightened::No);
    }
}
