//! Artifact downloads: the gateway serves the files in `<data-dir>/artifacts/` over plain
//! HTTP/1.1 GET (read-only, one flat directory), so a `fetch` step can name
//! `gateway:NAME`. Integrity does not rest on the transport: queue a `verify` step with the
//! artifact's SHA-256 after the `fetch` (the CLI's `fetch:PATH=gateway:NAME` plus
//! `verify:PATH=SHA256`).
//!
//! This module is the request side only, without sockets: [`parse_request`] turns buffered
//! request bytes into a decision, and the event loop streams the file with `sendfile(2)` so
//! the bytes go from the page cache to the socket without a user-space copy.
//!
//! # What is served ([`open_artifact`])
//! Only regular files directly inside the directory: the directory itself is opened with
//! `O_NOFOLLOW` (a symlinked `artifacts/` is refused), the name is one path component
//! (`valid_name`) opened relative to it with `openat(O_NOFOLLOW)` (a symlink inside it is
//! refused, so nothing resolves outside), and the type is checked twice without blocking:
//! `fstatat(AT_SYMLINK_NOFOLLOW)` before opening (a FIFO, socket or device is never opened)
//! and `fstat` of the `O_NONBLOCK` descriptor after (same inode, still a regular file), so a
//! FIFO swapped in between cannot stall the gateway's loop in `open(2)`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Largest request header accepted.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// What to do with the bytes received so far on an artifact connection.
#[derive(Debug)]
pub enum Decision {
    /// The request head is not complete yet.
    NeedMore,
    /// Send `head`, then `len` bytes of `file` (if any), then close.
    Respond {
        /// Status line and headers.
        head: Vec<u8>,
        /// The body, when the request was for an existing artifact.
        file: Option<(File, u64)>,
    },
}

/// An artifact name: one path component of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn respond(status: &str, body: &str) -> Decision {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    Decision::Respond {
        head: head.into_bytes(),
        file: None,
    }
}

/// Decides what to answer to the request bytes in `buf`, serving files from `root`.
pub fn parse_request(root: &Path, buf: &[u8]) -> Decision {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_HEAD => Decision::NeedMore,
        Ok(httparse::Status::Partial) => {
            respond("431 Request Header Fields Too Large", "too large\n")
        }
        Err(_) => respond("400 Bad Request", "malformed request\n"),
        Ok(httparse::Status::Complete(_)) => {
            if let Some(reason) = crate::http::repeated_field(req.headers) {
                return respond("400 Bad Request", &format!("{reason}\n"));
            }
            if req.method != Some("GET") {
                return respond("405 Method Not Allowed", "only GET\n");
            }
            let path = req.path.unwrap_or("");
            let Some(name) = path.strip_prefix('/').filter(|n| valid_name(n)) else {
                return respond("404 Not Found", "no such artifact\n");
            };
            match open_artifact(root, name) {
                Ok((f, len)) => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                    );
                    Decision::Respond {
                        head: head.into_bytes(),
                        file: Some((f, len)),
                    }
                }
                Err(Refused::Missing) => respond("404 Not Found", "no such artifact\n"),
                Err(e) => {
                    tracing::warn!(artifact = name, reason = %e, "artifact request refused");
                    respond("404 Not Found", "no such artifact\n")
                }
            }
        }
    }
}

/// Why [`open_artifact`] served nothing.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// No such file (the ordinary 404).
    #[error("no such file")]
    Missing,
    /// The artifact directory is not a real directory (e.g. a symlink).
    #[error("the artifact directory is not a plain directory (a symlink?): {0}")]
    Root(io::Error),
    /// The name is a symlink.
    #[error("a symlink: only regular files inside the directory are served")]
    Symlink,
    /// Not a regular file (FIFO, socket, device, directory).
    #[error("not a regular file (mode {0:o}): only regular files are served")]
    NotRegular(u32),
    /// The file changed between the checks.
    #[error("replaced while being opened")]
    Replaced,
    /// Any other failure.
    #[error("{0}")]
    Io(io::Error),
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: `stat` is plain old data; all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor and `st` a valid, exclusively borrowed buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(last_err());
    }
    Ok(st)
}

/// Opens artifact `name` (one path component, see [`valid_name`]) of directory `root`: a
/// regular file directly inside `root`, never through a symlink, never blocking (see the
/// module docs). Returns the file and its length.
pub fn open_artifact(root: &Path, name: &str) -> Result<(File, u64), Refused> {
    if !valid_name(name) {
        return Err(Refused::Missing);
    }
    let c_root = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| Refused::Root(io::ErrorKind::InvalidInput.into()))?;
    let c_name = CString::new(name).map_err(|_| Refused::Missing)?;
    let dir_flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `c_root` is a NUL-terminated path that outlives the call.
    let dir = unsafe { libc::open(c_root.as_ptr(), dir_flags) };
    if dir < 0 {
        return Err(Refused::Root(last_err()));
    }
    // SAFETY: `dir` was just opened and is owned by nothing else.
    let dir = unsafe { OwnedFd::from_raw_fd(dir) };
    // SAFETY: `stat` is plain old data; all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is open, `c_name` NUL-terminated, `st` a valid exclusive buffer.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c_name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        let e = last_err();
        return Err(match e.kind() {
            io::ErrorKind::NotFound => Refused::Missing,
            _ => Refused::Io(e),
        });
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {}
        libc::S_IFLNK => return Err(Refused::Symlink),
        other => return Err(Refused::NotRegular(other)),
    }
    let flags =
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: `dir` is open and `c_name` NUL-terminated; the result is checked.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c_name.as_ptr(), flags) };
    if fd < 0 {
        let e = last_err();
        return Err(match e.raw_os_error() {
            Some(libc::ELOOP) => Refused::Symlink,
            Some(libc::ENOENT) => Refused::Missing,
            _ => Refused::Io(e),
        });
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let now = fstat(&fd).map_err(Refused::Io)?;
    if now.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Refused::NotRegular(now.st_mode & libc::S_IFMT));
    }
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
        return Err(Refused::Replaced);
    }
    Ok((File::from(fd), now.st_size as u64))
}

/// Rewrites a `fetch` URL of the form `gateway:NAME` to the gateway's artifact URL base.
pub fn resolve_url(url: &str, base: Option<&str>) -> String {
    match (url.strip_prefix("gateway:"), base) {
        (Some(name), Some(base)) => format!("{}/{name}", base.trim_end_matches('/')),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(d: &Decision) -> String {
        match d {
            Decision::NeedMore => "more".into(),
            Decision::Respond { head, .. } => String::from_utf8_lossy(head)
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        }
    }

    #[test]
    fn serves_only_plain_names_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pkg-1.0.deb"), b"payload").unwrap();
        std::fs::write(dir.path().join(".hidden"), b"secret").unwrap();
        let d = parse_request(dir.path(), b"GET /pkg-1.0.deb HTTP/1.1\r\nHost: gw\r\n\r\n");
        assert_eq!(status(&d), "HTTP/1.1 200 OK");
        match d {
            Decision::Respond {
                head,
                file: Some((_, len)),
            } => {
                assert_eq!(len, 7);
                assert!(String::from_utf8_lossy(&head).contains("Content-Length: 7\r\n"));
            }
            other => panic!("{other:?}"),
        }
        for bad in ["/../etc/passwd", "/.hidden", "/a/b", "/", "/%2e%2e"] {
            let req = format!("GET {bad} HTTP/1.1\r\n\r\n");
            assert_eq!(
                status(&parse_request(dir.path(), req.as_bytes())),
                "HTTP/1.1 404 Not Found",
                "{bad}"
            );
        }
        assert_eq!(
            status(&parse_request(dir.path(), b"GET /missing HTTP/1.1\r\n\r\n")),
            "HTTP/1.1 404 Not Found"
        );
    }

    /// A symlink (to a file outside, or inside), a FIFO and a symlinked artifact directory
    /// are refused; before, the symlink served its target and the FIFO blocked in `open`.
    #[test]
    fn symlinks_fifos_and_symlinked_roots_are_refused() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("artifacts");
        std::fs::create_dir(&root).unwrap();
        let secret = base.path().join("ca.key");
        std::fs::write(&secret, b"PRIVATE KEY").unwrap();
        std::fs::write(root.join("ok.bin"), b"fine").unwrap();
        std::os::unix::fs::symlink("../ca.key", root.join("key.bin")).unwrap();
        std::os::unix::fs::symlink("ok.bin", root.join("alias.bin")).unwrap();
        let fifo = CString::new(root.join("pipe.bin").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::fs::create_dir(root.join("sub.d")).unwrap();

        assert_eq!(open_artifact(&root, "ok.bin").unwrap().1, 4);
        assert!(matches!(
            open_artifact(&root, "key.bin"),
            Err(Refused::Symlink)
        ));
        assert!(matches!(
            open_artifact(&root, "alias.bin"),
            Err(Refused::Symlink)
        ));
        // A FIFO without a writer: refused at once, never opened (the test would hang in a
        // blocking open otherwise).
        assert!(matches!(
            open_artifact(&root, "pipe.bin"),
            Err(Refused::NotRegular(libc::S_IFIFO))
        ));
        assert!(matches!(
            open_artifact(&root, "sub.d"),
            Err(Refused::NotRegular(libc::S_IFDIR))
        ));
        assert!(matches!(
            open_artifact(&root, "missing"),
            Err(Refused::Missing)
        ));
        for name in ["key.bin", "pipe.bin"] {
            let req = format!("GET /{name} HTTP/1.1\r\n\r\n");
            let d = parse_request(&root, req.as_bytes());
            assert_eq!(status(&d), "HTTP/1.1 404 Not Found", "{name}");
        }
        // The whole directory as a symlink (to the directory holding the key): refused.
        let linked = base.path().join("linked");
        std::os::unix::fs::symlink(base.path(), &linked).unwrap();
        assert!(matches!(
            open_artifact(&linked, "ca.key"),
            Err(Refused::Root(_))
        ));
        assert_eq!(
            status(&parse_request(&linked, b"GET /ca.key HTTP/1.1\r\n\r\n")),
            "HTTP/1.1 404 Not Found"
        );
    }

    #[test]
    fn partial_oversized_malformed_and_wrong_method() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            status(&parse_request(dir.path(), b"GET /x HTTP/1.1\r\nHost")),
            "more"
        );
        let big = vec![b'a'; MAX_REQUEST_HEAD + 1];
        let mut req = b"GET /x HTTP/1.1\r\nX: ".to_vec();
        req.extend_from_slice(&big);
        assert_eq!(
            status(&parse_request(dir.path(), &req)),
            "HTTP/1.1 431 Request Header Fields Too Large"
        );
        assert_eq!(
            status(&parse_request(dir.path(), b"\x00\x01garbage\r\n\r\n")),
            "HTTP/1.1 400 Bad Request"
        );
        assert_eq!(
            status(&parse_request(dir.path(), b"POST /x HTTP/1.1\r\n\r\n")),
            "HTTP/1.1 405 Method Not Allowed"
        );
    }

    /// A repeated Content-Length is refused (before, the first copy won), even for a file
    /// that exists.
    #[test]
    fn repeated_content_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.bin"), b"x").unwrap();
        let req = b"GET /a.bin HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 10\r\n\r\n";
        let d = parse_request(dir.path(), req);
        assert_eq!(status(&d), "HTTP/1.1 400 Bad Request");
        match d {
            Decision::Respond { head, file: None } => assert!(
                String::from_utf8_lossy(&head).ends_with("duplicate Content-Length header\n")
            ),
            other => panic!("{other:?}"),
        }
        let ok = b"GET /a.bin HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(status(&parse_request(dir.path(), ok)), "HTTP/1.1 200 OK");
    }

    #[test]
    fn gateway_urls_resolve_against_the_configured_base() {
        assert_eq!(
            resolve_url("gateway:a.deb", Some("http://10.77.0.1:7380/")),
            "http://10.77.0.1:7380/a.deb"
        );
        assert_eq!(resolve_url("gateway:a.deb", None), "gateway:a.deb");
        assert_eq!(resolve_url("http://x/y", Some("http://gw")), "http://x/y");
    }
}
