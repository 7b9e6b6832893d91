//! The executor: runs one command's steps in order and produces its result.
//!
//! # Threading: a worker thread and a channel
//! Steps block: child processes, pipes, file hashing, DNS and HTTP. Making each of them
//! pollable (non-blocking HTTP client, SIGCHLD/pidfd reaping, chunked hashing) would put a
//! second event loop's worth of code into a size-constrained agent for no gain, since the
//! gateway sends one command at a time. So [`spawn`] runs [`run`] on one worker thread that
//! owns everything it touches ([`Job`] is owned); the result comes back over an `mpsc`
//! channel, and a caller-supplied `notify` closure (e.g. `mio::Waker::wake`) wakes the
//! driver's poll so it calls [`Running::try_finish`]. The driver stays single-threaded.
//!
//! # Semantics
//! - Steps run in order; after a step that fails or times out, the rest are `Skipped`.
//!   Overall `exit_code` is the first failing step's, or 0.
//! - `timeout_ms` (0: none) bounds the whole command: a running `exec` is killed with its
//!   whole process group (each exec starts a new group), a fetch or verify stops between
//!   reads; that step is `TimedOut` ([`EXIT_TIMED_OUT`]).
//! - Output: the combined stdout+stderr of every `exec` (one pipe, so the interleaving is
//!   the program's own) plus one `fleetcast-agent: …` line per failure, kept as the last
//!   [`MAX_OUTPUT`] bytes in a ring ([`TailBuffer`]): memory is bounded however much a
//!   program prints.
//! - `exec` runs `argv` directly (no shell), stdin `/dev/null`, working directory `/`, the
//!   agent's environment. Exit code: the program's, `128 + n` if killed by signal `n`,
//!   [`EXIT_NOT_FOUND`]/[`EXIT_CANNOT_EXECUTE`] if it could not be started.
//! - `write` and `fetch` replace their destination atomically ([`AtomicFile`]: temporary file
//!   in the same directory, fsync, rename, directory fsync): a crash leaves the old file or
//!   the new one. Paths must be absolute; parent directories are not created.
//! - `fetch` accepts `file:///path` (no percent-decoding) and `http://host[:port]/path` (HTTP/1.1 GET, no TLS, no
//!   redirects, status 200 only; body by `Content-Length`, chunked, or read to close; the
//!   response header is bounded by [`ExecConfig::max_header_bytes`]; each read or connect
//!   waits at most [`ExecConfig::io_timeout`]).
//! - `reboot` is not executed here: the executor stops, marks the reboot step `Ok` and the
//!   later ones `Skipped`, and returns [`Completed::reboot_at`]; the driver records the
//!   reboot, sends `RebootStarting` and reboots. Work that must follow a reboot is a later
//!   command in the queue.
//! - `report` collects a configuration report ([`crate::report`]) into
//!   [`OwnedResult::report`]: it goes to the gateway inside the result, so it is delivered
//!   exactly when the result is (also in a later `Hello`, from the durable ledger).

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, BufRead as _, BufReader, Cursor, Read, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use fleetcast_wire::msg::limits::MAX_OUTPUT;
use fleetcast_wire::{CommandResult, Dispatch, Step, StepResult, StepStatus};

use crate::report::{self, OwnedConfigReport, ReportConfig};
use fleetcast_os::AtomicFile;

/// Exit code of a non-`exec` step that failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit code of a step stopped by the command's timeout (as `timeout(1)`).
pub const EXIT_TIMED_OUT: i32 = 124;
/// Exit code when the program exists but could not be executed (as the shell).
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// Exit code when the program was not found (as the shell).
pub const EXIT_NOT_FOUND: i32 = 127;
/// Exit code of a command the agent was running when it restarted (negative: no process
/// exits with it).
pub const EXIT_AGENT_RESTARTED: i32 = -1;
/// Exit code of a command whose worker thread died without a result.
pub const EXIT_EXECUTOR_LOST: i32 = -2;

/// Reads of a file or socket are done in chunks of this size.
const CHUNK: usize = 64 * 1024;
/// Longest chunk-size or trailer line accepted in a chunked HTTP body.
const MAX_CHUNK_LINE: u64 = 1024;
/// While a program runs, its status is checked at least this often (a grandchild may keep
/// the output pipe open after the program exits).
const EXEC_POLL: Duration = Duration::from_millis(100);

/// The driver's clock, read at this one call site.
#[allow(clippy::disallowed_methods)] // The executor is driver-side: step durations and the command deadline are measured in real time.
fn now() -> Instant {
    Instant::now()
}

/// One step, owned (a [`Step`] borrows from the received frame).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum OwnedStep {
    Fetch {
        url: String,
        path: String,
    },
    Verify {
        path: String,
        sha256: [u8; 32],
    },
    Write {
        path: String,
        mode: u32,
        contents: Vec<u8>,
    },
    Exec {
        argv: Vec<String>,
    },
    Reboot,
    Report,
}

impl OwnedStep {
    /// Copies a wire step.
    pub fn from_wire(step: &Step<'_>) -> OwnedStep {
        match step {
            Step::Fetch { url, path } => OwnedStep::Fetch {
                url: url.to_string(),
                path: path.to_string(),
            },
            Step::Verify { path, sha256 } => OwnedStep::Verify {
                path: path.to_string(),
                sha256: *sha256,
            },
            Step::Write {
                path,
                mode,
                contents,
            } => OwnedStep::Write {
                path: path.to_string(),
                mode: *mode,
                contents: contents.to_vec(),
            },
            Step::Exec { argv } => OwnedStep::Exec {
                argv: argv.iter().map(|a| a.to_string()).collect(),
            },
            Step::Reboot => OwnedStep::Reboot,
            Step::Report => OwnedStep::Report,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            OwnedStep::Fetch { .. } => "fetch",
            OwnedStep::Verify { .. } => "verify",
            OwnedStep::Write { .. } => "write",
            OwnedStep::Exec { .. } => "exec",
            OwnedStep::Reboot => "reboot",
            OwnedStep::Report => "report",
        }
    }
}

/// A command to execute (an owned [`Dispatch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Gateway-wide command id.
    pub command_id: u64,
    /// Queue sequence number.
    pub seq: u64,
    /// Which attempt of the command this is.
    pub attempt: u32,
    /// Time limit of the whole command in ms (0: none).
    pub timeout_ms: u32,
    /// The steps, in order.
    pub steps: Vec<OwnedStep>,
}

impl Job {
    /// Copies a received dispatch.
    pub fn from_dispatch(d: &Dispatch<'_>) -> Job {
        Job {
            command_id: d.command_id,
            seq: d.seq,
            attempt: d.attempt,
            timeout_ms: d.timeout_ms,
            steps: d.steps.iter().map(OwnedStep::from_wire).collect(),
        }
    }
}

/// A command's result, owned; [`OwnedResult::as_wire`] borrows it as the wire message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedResult {
    /// Gateway-wide command id.
    pub command_id: u64,
    /// Queue sequence number.
    pub seq: u64,
    /// The attempt this is the result of.
    pub attempt: u32,
    /// First failing step's exit code, or 0.
    pub exit_code: i32,
    /// One outcome per step.
    pub steps: Vec<StepResult>,
    /// The last [`MAX_OUTPUT`] bytes of output.
    pub output: Vec<u8>,
    /// The configuration report of the last `report` step that succeeded, if any.
    pub report: Option<OwnedConfigReport>,
}

impl OwnedResult {
    /// Borrows the result as the wire message.
    pub fn as_wire(&self) -> CommandResult<'_> {
        CommandResult {
            command_id: self.command_id,
            seq: self.seq,
            attempt: self.attempt,
            exit_code: self.exit_code,
            steps: self.steps.clone(),
            output: Cow::Borrowed(&self.output),
            report: self.report.as_ref().map(OwnedConfigReport::as_wire),
        }
    }
}

/// What running a [`Job`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The result (partial when a reboot was requested: later steps `Skipped`).
    pub result: OwnedResult,
    /// Index of the reboot step the executor stopped at: the driver now records the reboot,
    /// sends `RebootStarting` and reboots instead of sending the result.
    pub reboot_at: Option<usize>,
}

/// Executor settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecConfig {
    /// Sources of the `report` step.
    pub report: ReportConfig,
    /// Longest wait for one connect or read of a fetch.
    pub io_timeout: Duration,
    /// Largest HTTP response header accepted.
    pub max_header_bytes: usize,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            report: ReportConfig::default(),
            io_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
        }
    }
}

/// A job running on its worker thread.
#[derive(Debug)]
pub struct Running {
    rx: mpsc::Receiver<Completed>,
    thread: Option<thread::JoinHandle<()>>,
    command_id: u64,
    seq: u64,
    attempt: u32,
    steps: usize,
}

/// Starts `job` on a worker thread. `notify` is called on that thread once the result is
/// ready (wake the driver's poll with it); then [`Running::try_finish`] returns it.
pub fn spawn(
    job: Job,
    cfg: ExecConfig,
    notify: impl FnOnce() + Send + 'static,
) -> io::Result<Running> {
    let (tx, rx) = mpsc::channel();
    let (command_id, seq, attempt, steps) = (job.command_id, job.seq, job.attempt, job.steps.len());
    let thread = thread::Builder::new()
        .name("fleetcast-exec".into())
        // Buffers live on the heap; keep the stack small for embedded targets.
        .stack_size(256 * 1024)
        .spawn(move || {
            let done = run(&job, &cfg);
            // The driver may have dropped `Running` (shutting down): nothing to deliver to.
            let _ = tx.send(done);
            notify();
        })?;
    Ok(Running {
        rx,
        thread: Some(thread),
        command_id,
        seq,
        attempt,
        steps,
    })
}

impl Running {
    /// The running command's queue sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The running attempt.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The result, if the job has finished (never blocks). If the worker died without a
    /// result, a failed result saying so ([`EXIT_EXECUTOR_LOST`]).
    pub fn try_finish(&mut self) -> Option<Completed> {
        match self.rx.try_recv() {
            Ok(done) => {
                self.join();
                Some(done)
            }
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.join();
                Some(self.lost())
            }
        }
    }

    /// Blocks until the job finishes.
    pub fn wait(mut self) -> Completed {
        let done = self.rx.recv().unwrap_or_else(|_| self.lost());
        self.join();
        done
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn lost(&self) -> Completed {
        let mut steps = vec![skipped(); self.steps];
        if let Some(first) = steps.first_mut() {
            first.status = StepStatus::Failed;
            first.exit_code = EXIT_EXECUTOR_LOST;
        }
        Completed {
            result: OwnedResult {
                command_id: self.command_id,
                seq: self.seq,
                attempt: self.attempt,
                exit_code: EXIT_EXECUTOR_LOST,
                steps,
                output: b"fleetcast-agent: executor thread died without a result\n".to_vec(),
                report: None,
            },
            reboot_at: None,
        }
    }
}

fn skipped() -> StepResult {
    StepResult {
        status: StepStatus::Skipped,
        exit_code: 0,
        duration_ms: 0,
    }
}

/// How one step ended.
enum Outcome {
    Ok,
    /// Failed with this exit code.
    Failed(i32),
    TimedOut,
    Reboot,
}

/// Why a non-exec step stopped early.
enum StepError {
    TimedOut,
    Failed(String),
}

impl From<io::Error> for StepError {
    fn from(e: io::Error) -> Self {
        StepError::Failed(e.to_string())
    }
}

/// Runs `job` to completion on the calling thread (blocking).
pub fn run(job: &Job, cfg: &ExecConfig) -> Completed {
    let start = now();
    let deadline =
        (job.timeout_ms > 0).then(|| start + Duration::from_millis(job.timeout_ms.into()));
    let mut out = TailBuffer::new(MAX_OUTPUT);
    let mut steps = Vec::with_capacity(job.steps.len());
    let mut exit_code = 0;
    let mut reboot_at = None;
    let mut report = None;
    let mut stopped = false;
    for (i, step) in job.steps.iter().enumerate() {
        if stopped {
            steps.push(skipped());
            continue;
        }
        let t0 = now();
        let outcome = if expired(deadline) {
            Outcome::TimedOut
        } else {
            match step {
                OwnedStep::Exec { argv } => exec(argv, deadline, &mut out),
                OwnedStep::Reboot => Outcome::Reboot,
                OwnedStep::Report => match report::collect(&cfg.report) {
                    Ok(r) => {
                        report = Some(r);
                        Outcome::Ok
                    }
                    Err(e) => fail(&mut out, i, step, &e.to_string()),
                },
                OwnedStep::Fetch { url, path } => {
                    file_step(&mut out, i, step, fetch(url, path, deadline, cfg))
                }
                OwnedStep::Verify { path, sha256 } => {
                    file_step(&mut out, i, step, verify(path, sha256, deadline))
                }
                OwnedStep::Write {
                    path,
                    mode,
                    contents,
                } => file_step(&mut out, i, step, write(path, *mode, contents)),
            }
        };
        let duration_ms = u32::try_from(now().duration_since(t0).as_millis()).unwrap_or(u32::MAX);
        let (status, code) = match outcome {
            Outcome::Ok => (StepStatus::Ok, 0),
            Outcome::Reboot => {
                reboot_at = Some(i);
                stopped = true;
                (StepStatus::Ok, 0)
            }
            Outcome::Failed(code) => {
                stopped = true;
                (StepStatus::Failed, code)
            }
            Outcome::TimedOut => {
                out.push(
                    format!(
                        "fleetcast-agent: step {i} ({}): command timed out after {} ms\n",
                        step.kind(),
                        job.timeout_ms
                    )
                    .as_bytes(),
                );
                stopped = true;
                (StepStatus::TimedOut, EXIT_TIMED_OUT)
            }
        };
        if status != StepStatus::Ok && exit_code == 0 {
            exit_code = code;
        }
        steps.push(StepResult {
            status,
            exit_code: code,
            duration_ms,
        });
    }
    Completed {
        result: OwnedResult {
            command_id: job.command_id,
            seq: job.seq,
            attempt: job.attempt,
            exit_code,
            steps,
            output: out.to_vec(),
            report,
        },
        reboot_at,
    }
}

fn expired(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| now() >= d)
}

fn fail(out: &mut TailBuffer, i: usize, step: &OwnedStep, msg: &str) -> Outcome {
    out.push(format!("fleetcast-agent: step {i} ({}): {msg}\n", step.kind()).as_bytes());
    Outcome::Failed(EXIT_FAILED)
}

fn file_step(
    out: &mut TailBuffer,
    i: usize,
    step: &OwnedStep,
    r: Result<(), StepError>,
) -> Outcome {
    match r {
        Ok(()) => Outcome::Ok,
        Err(StepError::TimedOut) => Outcome::TimedOut,
        Err(StepError::Failed(msg)) => fail(out, i, step, &msg),
    }
}

fn absolute(path: &str) -> Result<&Path, StepError> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(StepError::Failed(format!("{path}: path must be absolute")))
    }
}

fn with_path(path: &str) -> impl Fn(io::Error) -> StepError + '_ {
    move |e| StepError::Failed(format!("{path}: {e}"))
}

fn write(path: &str, mode: u32, contents: &[u8]) -> Result<(), StepError> {
    let p = absolute(path)?;
    let mut f = AtomicFile::create(p, mode).map_err(with_path(path))?;
    f.write_all(contents).map_err(with_path(path))?;
    f.commit().map_err(with_path(path))
}

fn verify(path: &str, expected: &[u8; 32], deadline: Option<Instant>) -> Result<(), StepError> {
    let p = absolute(path)?;
    let mut f = File::open(p).map_err(with_path(path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(with_path(path)(e)),
        };
        ctx.update(&buf[..n]);
        if expired(deadline) {
            return Err(StepError::TimedOut);
        }
    }
    let got = ctx.finish();
    if got.as_ref() == expected {
        Ok(())
    } else {
        Err(StepError::Failed(format!(
            "{path}: sha256 mismatch: expected {}, got {}",
            hex(expected),
            hex(got.as_ref())
        )))
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn fetch(
    url: &str,
    path: &str,
    deadline: Option<Instant>,
    cfg: &ExecConfig,
) -> Result<(), StepError> {
    let dest = absolute(path)?;
    if let Some(src) = url.strip_prefix("file://") {
        // `file:///abs/path` (RFC 8089: empty authority).
        if !src.starts_with('/') {
            return Err(StepError::Failed(format!(
                "{url}: only file:///absolute/path URLs are supported"
            )));
        }
        let mut input = File::open(src).map_err(with_path(src))?;
        let mut f = AtomicFile::create(dest, 0o644).map_err(with_path(path))?;
        copy(&mut input, &mut f, None, deadline)?;
        return f.commit().map_err(with_path(path));
    }
    if url.starts_with("http://") {
        return http_get(url, dest, deadline, cfg);
    }
    Err(StepError::Failed(format!(
        "{url}: unsupported URL (file:// and http:// only)"
    )))
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
        out.write_all(&buf[..n])?;
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
        StepError::Failed("read timed out".into())
    } else {
        StepError::Failed(e.to_string())
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
    let u = parse_http_url(url)
        .ok_or_else(|| StepError::Failed(format!("{url}: not an http://host[:port]/path URL")))?;
    let fail = |msg: String| StepError::Failed(format!("{url}: {msg}"));
    let mut conn = TimedStream {
        stream: connect(&u, deadline, cfg.io_timeout).map_err(|e| match e {
            StepError::Failed(m) => fail(m),
            t => t,
        })?,
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
        .set_write_timeout(Some(conn.wait().map_err(|_| StepError::TimedOut)?))?;
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
                let body = body_kind(resp.headers).map_err(|m| fail(m.into()))?;
                break (n, resp.code.unwrap_or(0), body);
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(fail(format!("bad response header: {e}"))),
        }
        if head.len() >= cfg.max_header_bytes {
            return Err(fail(format!(
                "response header larger than {} bytes",
                cfg.max_header_bytes
            )));
        }
        let room = (cfg.max_header_bytes - head.len()).min(chunk.len());
        let n = match conn.read(&mut chunk[..room]) {
            Ok(0) => return Err(fail("connection closed before the response header".into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(e, deadline)),
        };
        head.extend_from_slice(&chunk[..n]);
    };
    if status != 200 {
        return Err(fail(format!("HTTP status {status}")));
    }
    let leftover = head.split_off(header_len);
    let mut body_in = BufReader::with_capacity(16 * 1024, Cursor::new(leftover).chain(conn));
    let mut f = AtomicFile::create(dest, 0o644).map_err(with_path(&dest.to_string_lossy()))?;
    match body {
        Body::Length(len) => {
            let got = copy(&mut body_in, &mut f, Some(len), deadline)?;
            if got != len {
                return Err(fail(format!(
                    "connection closed after {got} of {len} body bytes"
                )));
            }
        }
        Body::Close => {
            copy(&mut body_in, &mut f, None, deadline)?;
        }
        Body::Chunked => read_chunked(&mut body_in, &mut f, deadline).map_err(|e| match e {
            StepError::Failed(m) => fail(m),
            t => t,
        })?,
    }
    f.commit().map_err(with_path(&dest.to_string_lossy()))
}

fn connect(
    u: &HttpUrl<'_>,
    deadline: Option<Instant>,
    io_timeout: Duration,
) -> Result<TcpStream, StepError> {
    let addrs = (u.host, u.port)
        .to_socket_addrs()
        .map_err(|e| StepError::Failed(format!("resolving {}: {e}", u.host)))?;
    let mut last = None;
    for addr in addrs {
        let wait = match deadline {
            None => io_timeout,
            Some(d) => match d.checked_duration_since(now()) {
                Some(left) if !left.is_zero() => left.min(io_timeout),
                _ => return Err(StepError::TimedOut),
            },
        };
        match TcpStream::connect_timeout(&addr, wait) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(format!("connecting to {addr}: {e}")),
        }
    }
    if expired(deadline) {
        return Err(StepError::TimedOut);
    }
    Err(StepError::Failed(
        last.unwrap_or_else(|| format!("{}: no addresses", u.host)),
    ))
}

/// How the response body is delimited (RFC 9112 §6.3).
enum Body {
    Length(u64),
    Chunked,
    Close,
}

fn body_kind(headers: &[httparse::Header<'_>]) -> Result<Body, &'static str> {
    let mut length: Option<u64> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // "If a Transfer-Encoding header field is present in a response and the chunked
            // transfer coding is not the final encoding, the message body length is determined
            // by reading the connection until it is closed by the server." (§6.3 item 4)
            let v = std::str::from_utf8(h.value).map_err(|_| "bad Transfer-Encoding")?;
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
                .ok_or("bad Content-Length")?;
            if length.is_some_and(|l| l != v) {
                return Err("conflicting Content-Length headers");
            }
            length = Some(v);
        }
    }
    Ok(length.map_or(Body::Close, Body::Length))
}

/// Decodes a chunked body into `f` (RFC 9112 §7.1).
fn read_chunked(
    r: &mut BufReader<impl Read>,
    f: &mut AtomicFile,
    deadline: Option<Instant>,
) -> Result<(), StepError> {
    let mut line = Vec::with_capacity(64);
    loop {
        read_line(r, &mut line, deadline)?;
        let size = match httparse::parse_chunk_size(&line) {
            Ok(httparse::Status::Complete((_, size))) => size,
            _ => return Err(StepError::Failed("bad chunk size line".into())),
        };
        if size == 0 {
            // Trailer section, ended by an empty line.
            loop {
                read_line(r, &mut line, deadline)?;
                if line == b"\r\n" || line == b"\n" {
                    return Ok(());
                }
            }
        }
        let got = copy(r, f, Some(size), deadline)?;
        if got != size {
            return Err(StepError::Failed("connection closed inside a chunk".into()));
        }
        read_line(r, &mut line, deadline)?;
        if line != b"\r\n" && line != b"\n" {
            return Err(StepError::Failed("chunk not followed by CRLF".into()));
        }
    }
}

/// Reads one line (with its terminator) of at most [`MAX_CHUNK_LINE`] bytes.
fn read_line(
    r: &mut BufReader<impl Read>,
    line: &mut Vec<u8>,
    deadline: Option<Instant>,
) -> Result<(), StepError> {
    line.clear();
    r.by_ref()
        .take(MAX_CHUNK_LINE)
        .read_until(b'\n', line)
        .map_err(|e| read_error(e, deadline))?;
    if line.last() != Some(&b'\n') {
        return Err(StepError::Failed(
            "connection closed or line too long in chunked body".into(),
        ));
    }
    Ok(())
}

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

fn exec(argv: &[String], deadline: Option<Instant>, out: &mut TailBuffer) -> Outcome {
    let Some(program) = argv.first() else {
        out.push(b"fleetcast-agent: exec: empty argv\n");
        return Outcome::Failed(EXIT_NOT_FOUND);
    };
    let spawned = pipe().and_then(|(r, w)| {
        let w2 = w.try_clone()?;
        // The Command (holding the parent's copies of the write end) is dropped at the end of
        // this closure, so end of file arrives when the child side closes.
        let child = Command::new(program)
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::from(w))
            .stderr(Stdio::from(w2))
            .current_dir("/")
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

/// The last `cap` bytes written to it, in a fixed ring (memory never exceeds `cap`).
#[derive(Debug, Clone)]
pub struct TailBuffer {
    buf: Vec<u8>,
    cap: usize,
    /// Index of the oldest byte once the ring is full (0 until then).
    start: usize,
    total: u64,
}

impl TailBuffer {
    /// An empty buffer keeping the last `cap` bytes.
    pub fn new(cap: usize) -> TailBuffer {
        TailBuffer {
            buf: Vec::new(),
            cap,
            start: 0,
            total: 0,
        }
    }

    /// Appends bytes, dropping the oldest beyond the capacity.
    pub fn push(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if data.len() >= self.cap {
            self.buf.clear();
            self.buf.extend_from_slice(&data[data.len() - self.cap..]);
            self.start = 0;
            return;
        }
        if self.buf.len() < self.cap {
            let take = (self.cap - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        while !data.is_empty() {
            let n = (self.cap - self.start).min(data.len());
            self.buf[self.start..self.start + n].copy_from_slice(&data[..n]);
            self.start = (self.start + n) % self.cap;
            data = &data[n..];
        }
    }

    /// The kept bytes, oldest first, as two slices.
    pub fn as_slices(&self) -> (&[u8], &[u8]) {
        (&self.buf[self.start..], &self.buf[..self.start])
    }

    /// The kept bytes, oldest first.
    pub fn to_vec(&self) -> Vec<u8> {
        let (a, b) = self.as_slices();
        [a, b].concat()
    }

    /// Bytes ever pushed (more than kept if the output was truncated).
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::net::TcpListener;
    use std::os::unix::fs::PermissionsExt as _;

    fn sh(script: &str) -> OwnedStep {
        OwnedStep::Exec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
        }
    }

    fn job(timeout_ms: u32, steps: Vec<OwnedStep>) -> Job {
        Job {
            command_id: 77,
            seq: 3,
            attempt: 1,
            timeout_ms,
            steps,
        }
    }

    fn statuses(done: &Completed) -> Vec<StepStatus> {
        done.result.steps.iter().map(|s| s.status).collect()
    }

    fn output(done: &Completed) -> String {
        String::from_utf8_lossy(&done.result.output).into_owned()
    }

    fn sha256(data: &[u8]) -> [u8; 32] {
        let mut out = [0; 32];
        out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
        out
    }

    #[test]
    fn tail_buffer_keeps_the_last_bytes() {
        let mut t = TailBuffer::new(8);
        t.push(b"abc");
        assert_eq!(t.to_vec(), b"abc");
        t.push(b"defgh");
        assert_eq!(t.to_vec(), b"abcdefgh");
        t.push(b"ij");
        assert_eq!(t.to_vec(), b"cdefghij");
        t.push(b"klmnopq"); // wraps around the ring end
        assert_eq!(t.to_vec(), b"jklmnopq");
        t.push(b"0123456789");
        assert_eq!(t.to_vec(), b"23456789");
        t.push(b"x");
        assert_eq!(t.to_vec(), b"3456789x");
        assert_eq!(t.total(), 3 + 5 + 2 + 7 + 10 + 1);
        // Byte-by-byte agrees with a naive tail.
        let mut t = TailBuffer::new(5);
        let mut all = Vec::new();
        for i in 0..37u8 {
            let piece = vec![i; usize::from(i % 4)];
            t.push(&piece);
            all.extend_from_slice(&piece);
            assert_eq!(t.to_vec(), all[all.len().saturating_sub(5)..]);
        }
    }

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
                vec![OwnedStep::Exec {
                    argv: vec!["/nonexistent/program".into()],
                }],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(done.result.exit_code, EXIT_NOT_FOUND);
        assert!(output(&done).contains("/nonexistent/program"));
        let done = run(
            &job(0, vec![OwnedStep::Exec { argv: vec![] }]),
            &ExecConfig::default(),
        );
        assert_eq!(done.result.exit_code, EXIT_NOT_FOUND);
        // No shell: metacharacters are plain arguments. stdin is /dev/null: `cat` ends at once.
        let done = run(
            &job(
                0,
                vec![
                    OwnedStep::Exec {
                        argv: vec!["echo".into(), "$HOME;".into(), "|x".into()],
                    },
                    OwnedStep::Exec {
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

    #[test]
    fn output_keeps_only_the_tail() {
        // 1000 lines of 100 bytes = 100 KB.
        let script = r#"i=0; while [ $i -lt 1000 ]; do printf "%099d\n" $i; i=$((i+1)); done"#;
        let done = run(&job(0, vec![sh(script)]), &ExecConfig::default());
        assert_eq!(statuses(&done), [StepStatus::Ok]);
        let expected: String = (0..1000).map(|i| format!("{i:099}\n")).collect();
        assert_eq!(expected.len(), 100_000);
        assert_eq!(done.result.output.len(), MAX_OUTPUT);
        assert_eq!(
            done.result.output,
            expected.as_bytes()[expected.len() - MAX_OUTPUT..]
        );
    }

    #[test]
    fn steps_after_a_failure_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("never");
        let done = run(
            &job(
                0,
                vec![
                    sh("true"),
                    sh("exit 5"),
                    OwnedStep::Write {
                        path: target.to_str().unwrap().into(),
                        mode: 0o644,
                        contents: b"x".to_vec(),
                    },
                    sh("echo nope"),
                ],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(
            statuses(&done),
            [
                StepStatus::Ok,
                StepStatus::Failed,
                StepStatus::Skipped,
                StepStatus::Skipped
            ]
        );
        assert_eq!(done.result.exit_code, 5);
        assert!(!target.exists());
        assert!(!output(&done).contains("nope"));
    }

    #[test]
    fn write_is_atomic_with_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("conf");
        fs::write(&p, "old contents").unwrap();
        let path = p.to_str().unwrap().to_owned();
        let done = run(
            &job(
                0,
                vec![OwnedStep::Write {
                    path: path.clone(),
                    mode: 0o640,
                    contents: b"new".to_vec(),
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
                    vec![OwnedStep::Write {
                        path: bad.clone(),
                        mode: 0o644,
                        contents: b"x".to_vec(),
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
                vec![OwnedStep::Verify {
                    path: path.clone(),
                    sha256: sha256(&data),
                }],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(statuses(&ok), [StepStatus::Ok]);
        let bad = run(
            &job(
                0,
                vec![OwnedStep::Verify {
                    path: path.clone(),
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
                vec![OwnedStep::Verify {
                    path: format!("{path}.missing"),
                    sha256: [0; 32],
                }],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(statuses(&missing), [StepStatus::Failed]);
    }

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
                    OwnedStep::Fetch {
                        url: format!("file://{}", src.display()),
                        path: dest.to_str().unwrap().into(),
                    },
                    OwnedStep::Verify {
                        path: dest.to_str().unwrap().into(),
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
                vec![OwnedStep::Fetch {
                    url: "ftp://example.invalid/x".into(),
                    path: dest.to_str().unwrap().into(),
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
                vec![OwnedStep::Fetch {
                    url,
                    path: dest.to_str().unwrap().into(),
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
    fn reboot_stops_the_executor() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("after");
        let done = run(
            &job(
                0,
                vec![
                    sh("echo before"),
                    OwnedStep::Reboot,
                    sh(&format!("touch {}", marker.display())),
                ],
            ),
            &ExecConfig::default(),
        );
        assert_eq!(done.reboot_at, Some(1));
        assert_eq!(
            statuses(&done),
            [StepStatus::Ok, StepStatus::Ok, StepStatus::Skipped]
        );
        assert_eq!(done.result.exit_code, 0);
        assert!(!marker.exists());
    }

    #[test]
    fn report_step_and_worker_thread() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot_id");
        fs::write(&boot, "00112233-4455-6677-8899-aabbccddeeff\n").unwrap();
        let cfg = ExecConfig {
            report: ReportConfig {
                os_release: dir.path().join("missing-os-release"),
                dpkg_status: dir.path().join("missing-status"),
                boot_id: boot,
            },
            ..ExecConfig::default()
        };
        let (tx, rx) = mpsc::channel();
        let mut running = spawn(
            job(0, vec![sh("echo working"), OwnedStep::Report]),
            cfg.clone(),
            move || tx.send(()).unwrap(),
        )
        .unwrap();
        assert_eq!(running.seq(), 3);
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
        let done = running.try_finish().expect("notified, so finished");
        assert_eq!(statuses(&done), [StepStatus::Ok, StepStatus::Ok]);
        let report = done.result.report.clone().unwrap();
        assert_eq!(report.boot_id[1], 0x11);
        assert!(report.software.is_empty());
        // The report travels inside the result.
        assert_eq!(done.result.as_wire().report, Some(report.as_wire()));
        assert_eq!(output(&done), "working\n");

        // A failing report step (bad boot id file) is a failed step with a message.
        let bad = ExecConfig {
            report: ReportConfig {
                boot_id: dir.path().join("nope"),
                ..cfg.report
            },
            ..ExecConfig::default()
        };
        let done = spawn(job(0, vec![OwnedStep::Report]), bad, || {})
            .unwrap()
            .wait();
        assert_eq!(statuses(&done), [StepStatus::Failed]);
        assert!(output(&done).contains("nope"));
        assert_eq!(done.result.report, None);
    }

    #[test]
    fn job_from_dispatch_and_result_as_wire() {
        let d = Dispatch {
            command_id: 1,
            seq: 2,
            attempt: 5,
            timeout_ms: 3,
            steps: vec![
                Step::Exec {
                    argv: vec!["a".into(), "b".into()],
                },
                Step::Write {
                    path: "/p".into(),
                    mode: 0o600,
                    contents: b"c".into(),
                },
                Step::Verify {
                    path: "/p".into(),
                    sha256: [1; 32],
                },
                Step::Fetch {
                    url: "file:///x".into(),
                    path: "/y".into(),
                },
                Step::Reboot,
                Step::Report,
            ],
        };
        let j = Job::from_dispatch(&d);
        assert_eq!((j.command_id, j.seq, j.attempt, j.timeout_ms), (1, 2, 5, 3));
        assert_eq!(
            j.steps[0],
            OwnedStep::Exec {
                argv: vec!["a".into(), "b".into()]
            }
        );
        assert_eq!(j.steps.len(), 6);
        let r = OwnedResult {
            command_id: 1,
            seq: 2,
            attempt: 4,
            exit_code: 0,
            steps: vec![skipped()],
            output: b"out".to_vec(),
            report: None,
        };
        let w = r.as_wire();
        assert_eq!(
            (w.command_id, w.seq, w.attempt, &*w.output),
            (1, 2, 4, &b"out"[..])
        );
    }
}
