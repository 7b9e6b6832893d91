//! Artifact downloads: the gateway serves the files in `<data-dir>/artifacts/` over plain
//! HTTP/1.1 GET (read-only, one flat directory), so a `fetch` step can name
//! `gateway:NAME`. Integrity does not rest on the transport: queue a `verify` step with the
//! artifact's SHA-256 after the `fetch` (the CLI's `fetch:PATH=gateway:NAME` plus
//! `verify:PATH=SHA256`).
//!
//! This module is the request side only, without sockets: [`parse_request`] turns buffered
//! request bytes into a decision, and the event loop streams the file with `sendfile(2)` so
//! the bytes go from the page cache to the socket without a user-space copy.

use std::fs::File;
use std::path::{Path, PathBuf};

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
            let p: PathBuf = root.join(name);
            match File::open(&p).and_then(|f| f.metadata().map(|m| (f, m))) {
                Ok((f, m)) if m.is_file() => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        m.len()
                    );
                    Decision::Respond {
                        head: head.into_bytes(),
                        file: Some((f, m.len())),
                    }
                }
                _ => respond("404 Not Found", "no such artifact\n"),
            }
        }
    }
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
