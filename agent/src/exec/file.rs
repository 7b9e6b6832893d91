//! The file steps: `write` (atomic replacement with a mode) and `verify` (SHA-256 of a file,
//! checked against the command's deadline between reads). Paths must be absolute.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::path::Path;
use std::time::Instant;

use fleetcast_os::AtomicFile;

use super::{expired, StepError, CHUNK};

/// Why a file step (or a fetch's destination) failed. Each message starts with the path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// Step paths are absolute: the agent's working directory is no contract.
    #[error("{path}: path must be absolute")]
    NotAbsolute {
        /// The path given.
        path: String,
    },
    /// Opening, reading, writing or committing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
    /// `verify`: the file's digest is not the expected one.
    #[error(
        "{path}: sha256 mismatch: expected {}, got {}",
        hex(expected),
        hex(got)
    )]
    Mismatch {
        /// The file.
        path: String,
        /// The digest the step expects.
        expected: [u8; 32],
        /// The file's digest.
        got: [u8; 32],
    },
}

pub(super) fn absolute(path: &str) -> Result<&Path, FileError> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(FileError::NotAbsolute { path: path.into() })
    }
}

pub(super) fn with_path(path: &str) -> impl Fn(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.into(),
        source,
    }
}

pub(super) fn write(path: &str, mode: u32, contents: &[u8]) -> Result<(), StepError> {
    let p = absolute(path)?;
    let mut f = AtomicFile::create(p, mode).map_err(with_path(path))?;
    f.write_all(contents).map_err(with_path(path))?;
    Ok(f.commit().map_err(with_path(path))?)
}

pub(super) fn verify(
    path: &str,
    expected: &[u8; 32],
    deadline: Option<Instant>,
) -> Result<(), StepError> {
    let p = absolute(path)?;
    let mut f = File::open(p).map_err(with_path(path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(with_path(path)(e).into()),
        };
        ctx.update(&buf[..n]);
        if expired(deadline) {
            return Err(StepError::TimedOut);
        }
    }
    let mut got = [0u8; 32];
    got.copy_from_slice(ctx.finish().as_ref());
    if &got == expected {
        Ok(())
    } else {
        Err(FileError::Mismatch {
            path: path.into(),
            expected: *expected,
            got,
        }
        .into())
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn write_is_atomic_with_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("conf");
        fs::write(&p, "old contents").unwrap();
        let path = p.to_str().unwrap().to_owned();
        let done = run(
            &job(
                0,
                vec![Step::Write {
                    path: path.clone().into(),
                    mode: 0o640,
                    contents: b"new".into(),
                }],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(statuses(&done), [StepStatus::Ok]);
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left"
        );

        // Failure (missing parent, relative path) leaves nothing behind.
        for bad in [format!("{path}.d/missing/x"), "relative/x".to_owned()] {
            let done = run(
                &job(
                    0,
                    vec![Step::Write {
                        path: bad.clone().into(),
                        mode: 0o644,
                        contents: b"x".into(),
                    }],
                ),
                &ExecConfig::default(),
            );
            assert_eq!(done.result.exit_code, EXIT_FAILED);
            assert!(output(&done).contains(&bad), "{}", output(&done));
        }
        assert_eq!(fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn verify_ok_and_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        fs::write(&p, &data).unwrap();
        let path = p.to_str().unwrap().to_owned();
        let ok = run(
            &job(
                0,
                vec![Step::Verify {
                    path: path.clone().into(),
                    sha256: sha256(&data),
                }],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(statuses(&ok), [StepStatus::Ok]);
        let bad = run(
            &job(
                0,
                vec![Step::Verify {
                    path: path.clone().into(),
                    sha256: [0xab; 32],
                }],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(statuses(&bad), [StepStatus::Failed]);
        assert_eq!(bad.result.exit_code, EXIT_FAILED);
        let out = output(&bad);
        assert!(out.contains("sha256 mismatch"), "{out}");
        assert!(out.contains(&hex(&sha256(&data))), "{out}");
        let missing = run(
            &job(
                0,
                vec![Step::Verify {
                    path: format!("{path}.missing").into(),
                    sha256: [0; 32],
                }],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(statuses(&missing), [StepStatus::Failed]);
    }
}
