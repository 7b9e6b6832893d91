//! The `fetch` step: `file:///path` copies and a minimal HTTP/1.1 GET client (no TLS, no
//! redirects, status 200 only), writing the destination atomically. Every read is bounded by
//! [`ExecConfig::io_timeout`] and the command's deadline; the response header by
//! [`ExecConfig::max_header_bytes`].

use std::fs::File;
use std::io::{self, BufRead as _, BufReader, Cursor, Read, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::path::Path;
use std::time::{Duration, Instant};

use fleetcast_os::AtomicFile;

use std::net::SocketAddr;

use super::file::{absolute, with_path};
use super::{expired, now, ExecConfig, StepError, CHUNK};
use crate::report;

/// Longest chunk-size or trailer line accepted in a chunked HTTP body.
const MAX_CHUNK_LINE: u64 = 1024;

/// Why a `fetch` source failed (its destination's errors are [`super::FileError`]s).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// `file://` with an authority or a relative path (RFC 8089: `file:///abs/path` only).
    #[error("{url}: only file:///absolute/path URLs are supported")]
    FileUrlNotAbsolute {
        /// The URL given.
        url: String,
    },
    /// Neither `file://` nor `http://`.
    #[error("{url}: unsupported URL (file:// and http:// only)")]
    UnsupportedScheme {
        /// The URL given.
        url: String,
    },
    /// An `http://` URL that is not `http://host[:port]/path` (or would inject request lines).
    #[error("{url}: not an http://host[:port]/path URL")]
    NotHttpUrl {
        /// The URL given.
        url: String,
    },
    /// The HTTP exchange broke a rule.
    #[error("{url}: {why}")]
    Http {
        /// The URL fetched.
        url: String,
        /// What went wrong.
        why: HttpError,
    },
    /// One read waited longer than [`ExecConfig::io_timeout`].
    #[error("read timed out")]
    ReadTimeout,
    /// Reading the source failed.
    #[error("{0}")]
    Read(io::Error),
    /// Writing the destination failed.
    #[error("{0}")]
    Write(io::Error),
    /// Setting up the socket failed.
    #[error("{0}")]
    Socket(io::Error),
}

/// What broke in an HTTP exchange (reported with the URL, [`FetchError::Http`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The host name did not resolve.
    #[error("resolving {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// No address of the host accepted a connection (the last one's error).
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The last address tried.
        addr: SocketAddr,
        /// Its error.
        source: io::Error,
    },
    /// The host resolved to no address.
    #[error("{host}: no addresses")]
    NoAddresses {
        /// The host.
        host: String,
    },
    /// A `Transfer-Encoding` value that is not UTF-8.
    #[error("bad Transfer-Encoding")]
    BadTransferEncoding,
    /// A `Content-Length` that is not a decimal number.
    #[error("bad Content-Length")]
    BadContentLength,
    /// Two `Content-Length` headers that disagree (RFC 9112 §6.3 item 5).
    #[error("conflicting Content-Length headers")]
    ConflictingLength,
    /// The response head did not parse.
    #[error("bad response header: {0}")]
    BadHeader(httparse::Error),
    /// The response head exceeds [`ExecConfig::max_header_bytes`].
    #[error("response header larger than {0} bytes")]
    HeaderTooLarge(usize),
    /// The server closed before the head was complete.
    #[error("connection closed before the response header")]
    ClosedBeforeHeader,
    /// Only `200` is accepted (no redirects).
    #[error("HTTP status {0}")]
    Status(u16),
    /// A `Content-Length` body cut short by the server.
    #[error("connection closed after {got} of {len} body bytes")]
    ShortBody {
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        len: u64,
    },
    /// A chunk-size line that does not parse.
    #[error("bad chunk size line")]
    BadChunkSize,
    /// The server closed inside a chunk.
    #[error("connection closed inside a chunk")]
    ClosedInChunk,
    /// A chunk's data not followed by CRLF.
    #[error("chunk not followed by CRLF")]
    NoCrlfAfterChunk,
    /// A chunk-size or trailer line over [`MAX_CHUNK_LINE`] bytes, or the close inside one.
    #[error("connection closed or line too long in chunked body")]
    BadChunkLine,
    /// One read of a chunked body waited longer than [`ExecConfig::io_timeout`].
    #[error("read timed out")]
    ReadTimeout,
    /// Reading a chunked body failed.
    #[error("{0}")]
    Read(io::Error),
    /// Writing a chunked body to the destination failed.
    #[error("{0}")]
    Write(io::Error),
}

fn http(url: &str, why: HttpError) -> StepError {
    FetchError::Http {
        url: url.into(),
        why,
    }
    .into()
}

/// A chunked body's read and write errors are reported with the URL (as its framing errors
/// are); a timeout stays a timeout.
fn in_url(url: &str, e: StepError) -> StepError {
    let why = match e {
        StepError::Fetch(FetchError::ReadTimeout) => HttpError::ReadTimeout,
        StepError::Fetch(FetchError::Read(e)) => HttpError::Read(e),
        StepError::Fetch(FetchError::Write(e)) => HttpError::Write(e),
        other => return other,
    };
    http(url, why)
}

pub(super) fn fetch(
    url: &str,
    path: &str,
    deadline: Option<Instant>,
    cfg: &ExecConfig,
) -> Result<(), StepError> {
    let dest = absolute(path)?;
    if let Some(src) = url.strip_prefix("file://") {
        // `file:///abs/path` (RFC 8089: empty authority).
        if !src.starts_with('/') {
            return Err(FetchError::FileUrlNotAbsolute { url: url.into() }.into());
        }
        let mut input = File::open(src).map_err(with_path(src))?;
        let mut f = AtomicFile::create(dest, 0o644).map_err(with_path(path))?;
        copy(&mut input, &mut f, None, deadline)?;
        return Ok(f.commit().map_err(with_path(path))?);
    }
    if url.starts_with("http://") {
        return http_get(url, dest, deadline, cfg);
    }
    Err(FetchError::UnsupportedScheme { url: url.into() }.into())
}

/// Copies `input` to `out` (at most `limit` bytes if given), checking `deadline` between
/// reads. Returns the bytes copied.
fn copy(
    input: &mut impl Read,
    out: &mut AtomicFile,
    limit: Option<u64>,
    deadline: Option<Instant>,
) -> Result<u64, StepError> {
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    loop {
        let want = match limit {
            Some(l) if l - done < CHUNK as u64 => (l - done) as usize,
            _ => CHUNK,
        };
        if want == 0 {
            return Ok(done);
        }
        let n = match input.read(&mut buf[..want]) {
            Ok(0) => return Ok(done),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(e, deadline)),
        };
        out.write_all(&buf[..n]).map_err(FetchError::Write)?;
        done += n as u64;
        if expired(deadline) {
            return Err(StepError::TimedOut);
        }
    }
}

fn read_error(e: io::Error, deadline: Option<Instant>) -> StepError {
    if expired(deadline) {
        StepError::TimedOut
    } else if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        FetchError::ReadTimeout.into()
    } else {
        FetchError::Read(e).into()
    }
}

/// The parts of an `http://` URL.
#[derive(Debug, PartialEq, Eq)]
struct HttpUrl<'a> {
    /// Host without IPv6 brackets (for resolving).
    host: &'a str,
    port: u16,
    /// `host[:port]` as written (for the `Host` header).
    authority: &'a str,
    /// Path and query, starting with `/`.
    target: &'a str,
}

fn parse_http_url(url: &str) -> Option<HttpUrl<'_>> {
    let rest = url.strip_prefix("http://")?;
    let rest = rest.split('#').next().unwrap_or(rest);
    let (authority, target) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], &rest[i..]),
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || target.starts_with('?') {
        return None;
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        let port = match after {
            "" => 80,
            p => p.strip_prefix(':')?.parse().ok()?,
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (authority, 80),
        }
    };
    // No spaces or control characters: they would let a URL inject request lines.
    let clean = |t: &str| t.bytes().all(|b| b.is_ascii_graphic());
    if host.is_empty() || !clean(authority) || !clean(target) {
        return None;
    }
    Some(HttpUrl {
        host,
        port,
        authority,
        target,
    })
}

/// A socket whose every read waits at most `min(io_timeout, time to the deadline)`.
struct TimedStream {
    stream: TcpStream,
    io_timeout: Duration,
    deadline: Option<Instant>,
}

impl TimedStream {
    fn wait(&self) -> io::Result<Duration> {
        let Some(d) = self.deadline else {
            return Ok(self.io_timeout);
        };
        match d.checked_duration_since(now()) {
            Some(left) if !left.is_zero() => Ok(left.min(self.io_timeout)),
            _ => Err(io::ErrorKind::TimedOut.into()),
        }
    }
}

impl Read for TimedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let wait = self.wait()?;
        self.stream.set_read_timeout(Some(wait))?;
        self.stream.read(buf)
    }
}

fn http_get(
    url: &str,
    dest: &Path,
    deadline: Option<Instant>,
    cfg: &ExecConfig,
) -> Result<(), StepError> {
    let u = parse_http_url(url).ok_or_else(|| FetchError::NotHttpUrl { url: url.into() })?;
    let fail = |why: HttpError| http(url, why);
    let mut conn = TimedStream {
        stream: connect(&u, deadline, cfg.io_timeout)
            .map_err(|e| e.map_or(StepError::TimedOut, fail))?,
        io_timeout: cfg.io_timeout,
        deadline,
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: fleetcast-agent/{}\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n",
        u.target,
        u.authority,
        report::AGENT_VERSION
    );
    conn.stream
        .set_write_timeout(Some(conn.wait().map_err(|_| StepError::TimedOut)?))
        .map_err(FetchError::Socket)?;
    conn.stream
        .write_all(request.as_bytes())
        .map_err(|e| read_error(e, deadline))?;

    // Read until the header is complete, never holding more than `max_header_bytes`.
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (header_len, status, body) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&head) {
            Ok(httparse::Status::Complete(n)) => {
                let body = body_kind(resp.headers).map_err(fail)?;
                break (n, resp.code.unwrap_or(0), body);
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(fail(HttpError::BadHeader(e))),
        }
        if head.len() >= cfg.max_header_bytes {
            return Err(fail(HttpError::HeaderTooLarge(cfg.max_header_bytes)));
        }
        let room = (cfg.max_header_bytes - head.len()).min(chunk.len());
        let n = match conn.read(&mut chunk[..room]) {
            Ok(0) => return Err(fail(HttpError::ClosedBeforeHeader)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(e, deadline)),
        };
        head.extend_from_slice(&chunk[..n]);
    };
    if status != 200 {
        return Err(fail(HttpError::Status(status)));
    }
    let leftover = head.split_off(header_len);
    let mut body_in = BufReader::with_capacity(16 * 1024, Cursor::new(leftover).chain(conn));
    let mut f = AtomicFile::create(dest, 0o644).map_err(with_path(&dest.to_string_lossy()))?;
    match body {
        Body::Length(len) => {
            let got = copy(&mut body_in, &mut f, Some(len), deadline)?;
            if got != len {
                return Err(fail(HttpError::ShortBody { got, len }));
            }
        }
        Body::Close => {
            copy(&mut body_in, &mut f, None, deadline)?;
        }
        Body::Chunked => read_chunked(url, &mut body_in, &mut f, deadline)?,
    }
    Ok(f.commit().map_err(with_path(&dest.to_string_lossy()))?)
}

/// Connects to the first address of the host that answers. `Err(None)`: the deadline passed.
fn connect(
    u: &HttpUrl<'_>,
    deadline: Option<Instant>,
    io_timeout: Duration,
) -> Result<TcpStream, Option<HttpError>> {
    let addrs = (u.host, u.port).to_socket_addrs().map_err(|source| {
        Some(HttpError::Resolve {
            host: u.host.into(),
            source,
        })
    })?;
    let mut last = None;
    for addr in addrs {
        let wait = match deadline {
            None => io_timeout,
            Some(d) => match d.checked_duration_since(now()) {
                Some(left) if !left.is_zero() => left.min(io_timeout),
                _ => return Err(None),
            },
        };
        match TcpStream::connect_timeout(&addr, wait) {
            Ok(s) => return Ok(s),
            Err(source) => last = Some(HttpError::Connect { addr, source }),
        }
    }
    if expired(deadline) {
        return Err(None);
    }
    Err(Some(last.unwrap_or_else(|| HttpError::NoAddresses {
        host: u.host.into(),
    })))
}

/// How the response body is delimited (RFC 9112 §6.3).
enum Body {
    Length(u64),
    Chunked,
    Close,
}

fn body_kind(headers: &[httparse::Header<'_>]) -> Result<Body, HttpError> {
    let mut length: Option<u64> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // "If a Transfer-Encoding header field is present in a response and the chunked
            // transfer coding is not the final encoding, the message body length is determined
            // by reading the connection until it is closed by the server." (§6.3 item 4)
            let v = std::str::from_utf8(h.value).map_err(|_| HttpError::BadTransferEncoding)?;
            let last = v.rsplit(',').next().unwrap_or("").trim();
            return Ok(if last.eq_ignore_ascii_case("chunked") {
                Body::Chunked
            } else {
                Body::Close
            });
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(HttpError::BadContentLength)?;
            if length.is_some_and(|l| l != v) {
                return Err(HttpError::ConflictingLength);
            }
            length = Some(v);
        }
    }
    Ok(length.map_or(Body::Close, Body::Length))
}

/// Decodes a chunked body into `f` (RFC 9112 §7.1).
fn read_chunked(
    url: &str,
    r: &mut BufReader<impl Read>,
    f: &mut AtomicFile,
    deadline: Option<Instant>,
) -> Result<(), StepError> {
    let mut line = Vec::with_capacity(64);
    loop {
        read_line(url, r, &mut line, deadline)?;
        let size = match httparse::parse_chunk_size(&line) {
            Ok(httparse::Status::Complete((_, size))) => size,
            _ => return Err(http(url, HttpError::BadChunkSize)),
        };
        if size == 0 {
            // Trailer section, ended by an empty line.
            loop {
                read_line(url, r, &mut line, deadline)?;
                if line == b"\r\n" || line == b"\n" {
                    return Ok(());
                }
            }
        }
        let got = copy(r, f, Some(size), deadline).map_err(|e| in_url(url, e))?;
        if got != size {
            return Err(http(url, HttpError::ClosedInChunk));
        }
        read_line(url, r, &mut line, deadline)?;
        if line != b"\r\n" && line != b"\n" {
            return Err(http(url, HttpError::NoCrlfAfterChunk));
        }
    }
}

/// Reads one line (with its terminator) of at most [`MAX_CHUNK_LINE`] bytes.
fn read_line(
    url: &str,
    r: &mut BufReader<impl Read>,
    line: &mut Vec<u8>,
    deadline: Option<Instant>,
) -> Result<(), StepError> {
    line.clear();
    r.by_ref()
        .take(MAX_CHUNK_LINE)
        .read_until(b'\n', line)
        .map_err(|e| in_url(url, read_error(e, deadline)))?;
    if line.last() != Some(&b'\n') {
        return Err(http(url, HttpError::BadChunkLine));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use super::*;
    use std::fs;
    use std::net::TcpListener;
    use std::path::Path;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn fetch_file_url() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let data = vec![0x5a; 150_000];
        fs::write(&src, &data).unwrap();
        let dest = dir.path().join("dest");
        let done = run(
            &job(
                0,
                vec![
                    Step::Fetch {
                        url: format!("file://{}", src.display()).into(),
                        path: dest.to_str().unwrap().to_owned().into(),
                    },
                    Step::Verify {
                        path: dest.to_str().unwrap().to_owned().into(),
                        sha256: sha256(&data),
                    },
                ],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(statuses(&done), [StepStatus::Ok, StepStatus::Ok]);
        assert_eq!(fs::read(&dest).unwrap(), data);

        let done = run(
            &job(
                0,
                vec![Step::Fetch {
                    url: "ftp://example.invalid/x".into(),
                    path: dest.to_str().unwrap().to_owned().into(),
                }],
            ),
            &ExecConfig::default(),
        );
        assert!(output(&done).contains("unsupported URL"));
    }

    /// A one-shot HTTP server on 127.0.0.1: answers one request with `response`, then keeps
    /// the connection open until the client closes it (bounded by a read timeout). Returns
    /// the base URL and a handle yielding the request head.
    fn serve_once(response: Vec<u8>) -> (String, thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&b[..n]),
                }
            }
            // The client may give up mid-response (header too large): ignore write errors.
            let _ = s.write_all(&response);
            // Hold the connection until the client closes it.
            while matches!(s.read(&mut b), Ok(n) if n > 0) {}
            String::from_utf8_lossy(&req).into_owned()
        });
        (format!("http://{addr}"), h)
    }

    fn fetch_job(url: String, dest: &Path, timeout_ms: u32) -> Completed {
        run(
            &job(
                timeout_ms,
                vec![Step::Fetch {
                    url: url.into(),
                    path: dest.to_str().unwrap().to_owned().into(),
                }],
            ),
            &ExecConfig::default(),
        )
    }

    #[test]
    fn fetch_http_content_length() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let (base, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world"
                .to_vec(),
        );
        let done = fetch_job(format!("{base}/a/b?x=1"), &dest, 5000);
        assert_eq!(statuses(&done), [StepStatus::Ok], "{}", output(&done));
        assert_eq!(fs::read(&dest).unwrap(), b"hello world");
        let req = server.join().unwrap();
        assert!(req.starts_with("GET /a/b?x=1 HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("Host: {}\r\n", &base[7..])), "{req}");
    }

    #[test]
    fn fetch_http_chunked() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let (base, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: y\r\n\r\n"
                .to_vec(),
        );
        let done = fetch_job(format!("{base}/"), &dest, 0);
        assert_eq!(statuses(&done), [StepStatus::Ok], "{}", output(&done));
        assert_eq!(fs::read(&dest).unwrap(), b"hello world");
        server.join().unwrap();
    }

    #[test]
    fn fetch_http_read_to_close() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut resp = b"HTTP/1.0 200 OK\r\n\r\n".to_vec();
        resp.extend_from_slice(&body);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // This server closes right after writing (no length: the close ends the body).
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).unwrap();
            s.write_all(&resp).unwrap();
        });
        let done = fetch_job(format!("http://{addr}/big"), &dest, 0);
        assert_eq!(statuses(&done), [StepStatus::Ok], "{}", output(&done));
        assert_eq!(fs::read(&dest).unwrap(), body);
        server.join().unwrap();
    }

    #[test]
    fn fetch_http_errors() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");

        let (base, server) =
            serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec());
        let done = fetch_job(format!("{base}/missing"), &dest, 5000);
        assert_eq!(statuses(&done), [StepStatus::Failed]);
        assert!(
            output(&done).contains("HTTP status 404"),
            "{}",
            output(&done)
        );
        server.join().unwrap();

        // Short body: the server closes early.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                .unwrap();
        });
        let done = fetch_job(format!("http://{addr}/short"), &dest, 5000);
        assert_eq!(statuses(&done), [StepStatus::Failed]);
        assert!(
            output(&done).contains("after 10 of 100"),
            "{}",
            output(&done)
        );
        server.join().unwrap();

        // A header over the limit.
        let mut big = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 20_000));
        big.extend_from_slice(b"\r\n\r\n");
        let (base, server) = serve_once(big);
        let done = fetch_job(format!("{base}/"), &dest, 5000);
        assert_eq!(statuses(&done), [StepStatus::Failed]);
        assert!(
            output(&done).contains("response header larger"),
            "{}",
            output(&done)
        );
        server.join().unwrap();

        // The body never comes: the command timeout stops the fetch.
        let (base, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec());
        let done = fetch_job(format!("{base}/slow"), &dest, 300);
        assert_eq!(statuses(&done), [StepStatus::TimedOut], "{}", output(&done));
        assert_eq!(done.result.exit_code, EXIT_TIMED_OUT);
        server.join().unwrap();

        // Nothing listens (a port just released).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let done = fetch_job(format!("http://127.0.0.1:{port}/"), &dest, 5000);
        assert_eq!(statuses(&done), [StepStatus::Failed]);
        assert!(output(&done).contains("connecting to"), "{}", output(&done));

        assert!(!dest.exists(), "a failed fetch must not create the file");
    }

    #[test]
    fn http_url_parsing() {
        let u = parse_http_url("http://10.0.0.1:8080/a/b?c=d#frag").unwrap();
        assert_eq!(
            u,
            HttpUrl {
                host: "10.0.0.1",
                port: 8080,
                authority: "10.0.0.1:8080",
                target: "/a/b?c=d"
            }
        );
        let u = parse_http_url("http://[::1]:81").unwrap();
        assert_eq!((u.host, u.port, u.target), ("::1", 81, "/"));
        let u = parse_http_url("http://example.com/x").unwrap();
        assert_eq!((u.host, u.port), ("example.com", 80));
        for bad in [
            "http://",
            "http:///x",
            "http://u:p@host/",
            "http://host:port/",
            "http://host:99999/",
            "http://[::1/",
            "http://host/a b",
            "http://ho\r\nX-Injected: 1/",
            "https://host/",
        ] {
            assert_eq!(parse_http_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn errors_name_the_broken_rule() {
        let h = |name: &'static str, value: &'static [u8]| httparse::Header { name, value };
        let twice = [h("Content-Length", b"3"), h("content-length", b"4")];
        assert!(matches!(
            body_kind(&twice),
            Err(HttpError::ConflictingLength)
        ));
        assert!(matches!(
            body_kind(&[h("Content-Length", b"x")]),
            Err(HttpError::BadContentLength)
        ));
        assert!(matches!(
            body_kind(&[h("Transfer-Encoding", b"gzip, chunked")]),
            Ok(Body::Chunked)
        ));
        // A chunked body's read errors carry the URL; a timeout stays a timeout.
        let e = in_url("http://h/x", FetchError::ReadTimeout.into());
        assert!(matches!(
            e,
            StepError::Fetch(FetchError::Http {
                why: HttpError::ReadTimeout,
                ..
            })
        ));
        assert_eq!(e.to_string(), "http://h/x: read timed out");
        assert!(matches!(
            in_url("http://h/x", StepError::TimedOut),
            StepError::TimedOut
        ));
    }
}
