//! The admin interface: line-delimited JSON over a Unix socket in the gateway's data directory.
//!
//! The operator CLI (`fleetcast`) sends one [`Request`] per line and reads one [`Response`] per
//! line. The gateway serves the socket inside its `mio` loop, so every admin change goes
//! through the same store batch (group commit) and the same dispatch logic as agent traffic.
//! The socket is created mode 0600: whoever can open it administers the fleet.

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use fleetcast_wire::Step;
use serde::{Deserialize, Serialize};

/// Name of the admin socket inside the data directory.
pub const SOCKET_NAME: &str = "admin.sock";

/// Largest request line the gateway accepts.
pub const MAX_REQUEST: usize = 1 << 20;

/// Why a step as the operator wrote it cannot be queued (one variant per broken rule); the
/// message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// `fetch`, `verify` or `write` without its `PATH=VALUE`.
    #[error("`{kind}` needs `{kind}:{what}`, got `{spec}`")]
    NeedsPair {
        /// The step's kind.
        kind: String,
        /// What it needs, e.g. `PATH=URL`.
        what: String,
        /// The step as written.
        spec: String,
    },
    /// Words that do not split like a shell's (an open quote).
    #[error("unbalanced quotes in `{0}`")]
    UnbalancedQuotes(String),
    /// `exec:` without a program.
    #[error("`exec` needs a program: `exec:PROGRAM ARG...`")]
    NoProgram,
    /// `install:` without package names (or with an option instead).
    #[error("`install` needs package names: `install:PACKAGE...`")]
    NoPackages,
    /// `verify:` with a digest that is not one (`fleetcast_wire::parse_sha256` says why).
    #[error("{0}")]
    Digest(fleetcast_wire::DigestError),
    /// `slot-switch:` with a deadline that is not a number of seconds.
    #[error("`slot-switch` takes its deadline in seconds (`slot-switch:600`), got `{0}`")]
    Deadline(String),
    /// No such step.
    #[error(
        "unknown step `{0}`: use exec:CMD, sh:SCRIPT, install:PACKAGE, fetch:PATH=URL \
         (URL may be gateway:NAME), verify:PATH=SHA256, write:PATH=TEXT, reboot, report, \
         slot-switch[:SECONDS] or slot-commit"
    )]
    Unknown(String),
}

/// Why a push trigger is refused (one variant per contradiction); the message says what to
/// do instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    /// `at_ms` more than a second in the past.
    #[error("the scheduled start is in the past: give a future time")]
    InThePast,
    /// `min_ready` of zero.
    #[error("--min-ready must be at least 1 (or leave it out to start at once)")]
    NoneReady,
    /// `max_wait_s` without the `min_ready` or `when_online` it bounds.
    #[error(
        "--max-wait bounds the wait for --min-ready receivers or --when-online devices: give both"
    )]
    WaitAlone,
    /// `when_online` of zero.
    #[error("--when-online must be at least 1 (or leave it out to start at once)")]
    NoneOnline,
    /// `when_online` and `min_ready` together: two gates on the same start.
    #[error(
        "--when-online and --min-ready both gate the start: give one (--when-online N waits \
         for N devices of the group to be online and join)"
    )]
    TwoGates,
}

/// Parses one step as written on the command line:
///
/// | syntax | step |
/// |---|---|
/// | `exec:PROGRAM ARG...` | run a program; words split like a shell would (quotes work), no shell runs |
/// | `sh:SCRIPT` | `exec` of `/bin/sh -c SCRIPT` |
/// | `install:PACKAGE...` | install packages with the device's package manager (apt-get, dnf, yum, zypper, apk or opkg, whichever it has) |
/// | `fetch:PATH=URL` | download |
/// | `verify:PATH=SHA256` | check a digest |
/// | `write:PATH=TEXT` | write a file, mode 0644 |
/// | `reboot` | reboot, the queue suspends until the device is back |
/// | `report` | send a configuration report |
/// | `slot-switch[:SECONDS]` | A/B update: try the inactive slot on the next boot (a `reboot` must follow); the deadline from the reboot to a healthy slot, default the device's |
/// | `slot-commit` | A/B update, after the reboot: health check, then keep the new slot or roll back |
pub fn parse_step(spec: &str) -> Result<Step<'static>, StepError> {
    let (kind, arg) = spec.split_once(':').unwrap_or((spec, ""));
    let pair = |what: &str| {
        arg.split_once('=')
            .filter(|(p, v)| !p.is_empty() && !v.is_empty())
            .map(|(p, v)| (p.to_string(), v.to_string()))
            .ok_or_else(|| StepError::NeedsPair {
                kind: kind.to_string(),
                what: what.to_string(),
                spec: spec.to_string(),
            })
    };
    let step = match kind {
        "exec" => {
            let argv =
                shlex::split(arg).ok_or_else(|| StepError::UnbalancedQuotes(spec.to_string()))?;
            if argv.is_empty() {
                return Err(StepError::NoProgram);
            }
            Step::Exec {
                argv: argv.into_iter().map(Cow::Owned).collect(),
            }
        }
        "install" => {
            let pkgs =
                shlex::split(arg).ok_or_else(|| StepError::UnbalancedQuotes(spec.to_string()))?;
            if pkgs.is_empty() || pkgs.iter().any(|p| p.starts_with('-')) {
                return Err(StepError::NoPackages);
            }
            let mut argv = vec![
                "/bin/sh".into(),
                "-c".into(),
                INSTALL_SCRIPT.into(),
                "fleetcast-install".into(),
            ];
            argv.extend(pkgs.into_iter().map(Cow::Owned));
            Step::Exec { argv }
        }
        "sh" if !arg.is_empty() => Step::Exec {
            argv: vec!["/bin/sh".into(), "-c".into(), arg.to_string().into()],
        },
        "fetch" => {
            let (path, url) = pair("PATH=URL")?;
            Step::Fetch {
                url: url.into(),
                path: path.into(),
            }
        }
        "verify" => {
            let (path, sha256) = pair("PATH=SHA256")?;
            Step::Verify {
                path: path.into(),
                sha256: fleetcast_wire::parse_sha256(&sha256).map_err(StepError::Digest)?,
            }
        }
        "write" => {
            let (path, contents) = pair("PATH=TEXT")?;
            Step::Write {
                path: path.into(),
                mode: 0o644,
                contents: contents.into_bytes().into(),
            }
        }
        "reboot" if arg.is_empty() => Step::Reboot,
        "report" if arg.is_empty() => Step::Report,
        "slot-switch" => Step::SlotSwitch {
            deadline_secs: match arg {
                "" => 0,
                a => a
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or_else(|| StepError::Deadline(a.to_string()))?,
            },
        },
        "slot-commit" if arg.is_empty() => Step::SlotCommit,
        _ => return Err(StepError::Unknown(spec.to_string())),
    };
    Ok(step)
}

/// The commands an A/B update (`fleetcast update`) queues on each device once its copy of the
/// image verified on the inactive slot: `slot-switch reboot`, then `slot-commit`.
/// `deadline_secs` (0: each device's own `health_deadline_secs`) bounds the reboot and the
/// health check.
pub fn update_commands(deadline_secs: u32) -> Vec<Vec<Step<'static>>> {
    vec![
        vec![Step::SlotSwitch { deadline_secs }, Step::Reboot],
        vec![Step::SlotCommit],
    ]
}

/// Where an A/B update writes its image: the slot each device does not run.
pub const UPDATE_TARGET: &str = "slot=inactive";

/// Installs "$@" with whichever package manager the device has; fails clearly if none.
const INSTALL_SCRIPT: &str = "\
if command -v apt-get >/dev/null 2>&1; then DEBIAN_FRONTEND=noninteractive exec apt-get install -y \"$@\"; \
elif command -v dnf >/dev/null 2>&1; then exec dnf install -y \"$@\"; \
elif command -v yum >/dev/null 2>&1; then exec yum install -y \"$@\"; \
elif command -v zypper >/dev/null 2>&1; then exec zypper --non-interactive install \"$@\"; \
elif command -v apk >/dev/null 2>&1; then exec apk add \"$@\"; \
elif command -v opkg >/dev/null 2>&1; then exec opkg install \"$@\"; \
else echo 'fleetcast: no supported package manager on this device' >&2; exit 127; fi";

/// Failure policy of a queued command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnFailureSpec {
    /// Stop the queue (status `failed`) until an operator retries or skips.
    #[default]
    Stop,
    /// Record the failure and go on.
    Continue,
}

/// An admin request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Request {
    /// Register a device name and issue its one-time enrolment token.
    DeviceAdd {
        /// Device name (unique).
        name: String,
        /// Groups the device joins when it enrols.
        #[serde(default)]
        groups: Vec<String>,
    },
    /// List devices.
    DeviceList,
    /// One device in full: its latest configuration report (software, attached devices) and
    /// when it came.
    DeviceShow {
        /// Device name.
        name: String,
    },
    /// Revoke a device: its sessions are closed and it is refused from now on.
    DeviceRevoke {
        /// Device name.
        name: String,
    },
    /// Add devices to a group.
    GroupAdd {
        /// Group name.
        group: String,
        /// Device names.
        devices: Vec<String>,
    },
    /// List groups and members.
    GroupList,
    /// Append commands to a device's queue or to every member of a group.
    QueueAdd {
        /// Device name, or group name.
        target: String,
        /// The commands: each is an operation of steps.
        commands: Vec<Vec<Step<'static>>>,
        /// Per-attempt timeout.
        timeout_ms: u64,
        /// Transmissions allowed (retries = attempts − 1).
        max_attempts: u32,
        /// What a final failure does to the rest of the queue.
        on_failure: OnFailureSpec,
        /// The attached device the commands operate on, `KIND:ID` (`disk:SERIAL`): the
        /// agent runs none of their steps unless its report lists it.
        #[serde(default)]
        attached: Option<String>,
    },
    /// Show a device's queue, commands and results.
    QueueShow {
        /// Device name.
        device: String,
    },
    /// Pause a device's queue.
    QueuePause {
        /// Device name.
        device: String,
    },
    /// Resume a paused queue.
    QueueResume {
        /// Device name.
        device: String,
    },
    /// Cancel every pending command of a queue.
    QueueCancel {
        /// Device name.
        device: String,
    },
    /// Retry the failed command of a failed queue.
    QueueRetry {
        /// Device name.
        device: String,
    },
    /// Skip the failed command of a failed queue and go on.
    QueueSkip {
        /// Device name.
        device: String,
    },
    /// The gateway's overall status.
    Status,
    /// Publish a file to every member of a group by multicast (a distribution task).
    Push {
        /// The file, as a path the gateway can open (the CLI makes it absolute).
        path: String,
        /// Target group.
        group: String,
        /// Payload bytes per datagram; 0 (or absent): fill a frame of `mcast.addr`'s
        /// interface (1,444 bytes at MTU 1,500).
        #[serde(default)]
        block_size: u32,
        /// Sending rate ceiling, megabits per second.
        rate_mbps: u64,
        /// When the multicast starts (default: at once).
        #[serde(default)]
        trigger: PushTrigger,
        /// Commands queued for each device once its copy verified (e.g. install it), one
        /// step list per command, as in `QueueAdd`.
        #[serde(default)]
        then: Vec<Vec<Step<'static>>>,
        /// Multicast group or subnet-directed broadcast (default: the gateway's own,
        /// `mcast.broadcast`).
        #[serde(default)]
        delivery: Delivery,
        /// Whether devices that join the group later get the task, and whether the multicast
        /// waits for devices to come online (default: neither; older clients send none).
        #[serde(default)]
        follow: PushFollow,
        /// The file is an image for each device's disk, partition or slot (default: a file
        /// for the downloads directory).
        #[serde(default)]
        image: Option<PushImage>,
    },
    /// A task's status table, or (without an id) every task with its counts.
    TaskShow {
        /// Task id.
        #[serde(default)]
        task: Option<u64>,
    },
    /// Cancels a task for one target, or for every target still pending or in progress: they
    /// are no longer announced or caught up.
    TaskCancel {
        /// Task id.
        task: u64,
        /// The target's device name (`None`: the whole task).
        #[serde(default)]
        device: Option<String>,
    },
    /// Retries a task for one failed or cancelled target, or for every such target: pending
    /// again, served by unicast catch-up.
    TaskRetry {
        /// Task id.
        task: u64,
        /// The target's device name (`None`: the whole task).
        #[serde(default)]
        device: Option<String>,
    },
    /// Events from the log, from id `from` on.
    Events {
        /// First event id to return.
        from: u64,
        /// At most this many.
        limit: usize,
    },
    /// The gateway's metrics in the Prometheus text format (served by the gateway loop).
    Metrics,
    /// A consistent, compacted copy of the store written to `dest` while the gateway runs
    /// (served by the gateway loop).
    Backup {
        /// Destination directory, as a path the gateway can write (the CLI makes it
        /// absolute); it must not exist yet or be empty.
        dest: String,
    },
}

/// How a push's datagrams reach the devices: the same datagrams, repair and task table
/// either way; only the destination address differs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// The gateway's default: `mcast.broadcast` when it is set, the multicast group otherwise.
    #[default]
    Default,
    /// The multicast group (`mcast.group`), even when `mcast.broadcast` is set.
    Multicast,
    /// Subnet-directed broadcast on the interface of `mcast.addr`: to this address, which
    /// must be that interface's directed broadcast, or (`None`) to that broadcast itself.
    Broadcast(Option<std::net::Ipv4Addr>),
}

/// Where an image push goes on each device, and the form it travels in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushImage {
    /// The target as each agent resolves it: an absolute file path, `KIND=ID` of a disk or a
    /// partition (`serial`, `wwn`, `partlabel`, `partuuid`, `uuid`), or `slot=a|b|inactive`.
    pub target: String,
    /// The image map (a `.map` file of `fleetcast image prepare`'s cache) when the pushed file
    /// is the image's sparse data or its compressed stream; absent: the file is the image.
    #[serde(default)]
    pub map: Option<String>,
}

/// When a push's multicast starts. Announces go out at once either way, so receivers join
/// and wait; the first pass starts when the trigger fires. The default starts at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushTrigger {
    /// Not before this wall-clock time, milliseconds since the UNIX epoch (a schedule).
    #[serde(default)]
    pub at_ms: Option<u64>,
    /// Once at least this many targets have joined ...
    #[serde(default)]
    pub min_ready: Option<u32>,
    /// ... or this many seconds after the push (or the scheduled time), whichever is first.
    #[serde(default)]
    pub max_wait_s: Option<u64>,
}

impl PushTrigger {
    /// Refuses contradictions, with what to do instead (a push that follows nothing).
    pub fn validate(&self, wall_ms: u64) -> Result<(), TriggerError> {
        self.validate_with(&PushFollow::default(), wall_ms)
    }

    /// [`PushTrigger::validate`] of a push with `follow`: `max_wait_s` may bound its online
    /// gate instead of `min_ready`, and the two gates exclude each other.
    pub fn validate_with(&self, follow: &PushFollow, wall_ms: u64) -> Result<(), TriggerError> {
        if follow.when_online == Some(0) {
            return Err(TriggerError::NoneOnline);
        }
        if follow.when_online.is_some() && self.min_ready.is_some() {
            return Err(TriggerError::TwoGates);
        }
        if let Some(at) = self.at_ms {
            if at + 1000 < wall_ms {
                return Err(TriggerError::InThePast);
            }
        }
        if self.min_ready == Some(0) {
            return Err(TriggerError::NoneReady);
        }
        if self.max_wait_s.is_some() && self.min_ready.is_none() && follow.when_online.is_none() {
            return Err(TriggerError::WaitAlone);
        }
        Ok(())
    }

    /// The trigger as the task table records it, after `origin` (what asked for the push).
    pub fn describe(&self, origin: &str) -> String {
        let mut s = origin.to_string();
        if let Some(at) = self.at_ms {
            s.push_str(&format!(", scheduled at {at} ms (UNIX)"));
        }
        match (self.min_ready, self.max_wait_s) {
            (Some(n), Some(w)) => {
                s.push_str(&format!(", when {n} receivers are ready or {w} s passed"))
            }
            (Some(n), None) => s.push_str(&format!(", when {n} receivers are ready")),
            _ => {}
        }
        s
    }
}

/// Which devices a push serves beyond the group's members at the time of the push, and
/// whether its multicast waits for devices to come online.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushFollow {
    /// Devices added to the group later (`group add`) or enrolled into it get the task too
    /// (`--follow-group`).
    #[serde(default)]
    pub group: bool,
    /// The multicast starts once this many devices of the group are online and joined (or
    /// `PushTrigger::max_wait_s` passed); implies [`PushFollow::group`], so devices that
    /// enrol while it waits count (`--when-online N`).
    #[serde(default)]
    pub when_online: Option<u32>,
}

impl PushFollow {
    /// As the task record keeps it: an online gate follows the group (the devices it waits
    /// for are typically not enrolled yet).
    pub fn to_task(self) -> fleetcast_store::TaskFollow {
        fleetcast_store::TaskFollow {
            group: self.group || self.when_online.is_some(),
            when_online: self.when_online,
        }
    }

    /// What the push follows, in the words of the task table's trigger (after the origin
    /// and before the schedule): empty when it follows nothing.
    pub fn describe(&self, group: &str, max_wait_s: Option<u64>) -> String {
        match (self.when_online, max_wait_s) {
            (Some(n), Some(w)) => {
                format!(", when {n} devices of group {group} are online or {w} s passed")
            }
            (Some(n), None) => format!(", when {n} devices of group {group} are online"),
            (None, _) if self.group => format!(", following group {group}"),
            (None, _) => String::new(),
        }
    }
}

/// An admin response: `ok` with data, or an error saying what to do next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result (request-specific JSON).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What kind of failure, when the gateway can tell (absent on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
}

/// The kind of a refused request: lets the CLI pick a meaningful exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The device, group or task named does not exist.
    NotFound,
}

impl Response {
    /// A success.
    pub fn ok(data: serde_json::Value) -> Self {
        Response {
            ok: true,
            data,
            error: None,
            kind: None,
        }
    }
    /// A failure with a message that says what to do next.
    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            data: serde_json::Value::Null,
            error: Some(msg.into()),
            kind: None,
        }
    }
    /// A failure because the named device, group or task does not exist.
    pub fn not_found(msg: impl Into<String>) -> Self {
        Response {
            kind: Some(ErrorKind::NotFound),
            ..Response::err(msg)
        }
    }
}

/// Why the CLI could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket: the gateway is not running with this data directory.
    #[error(
        "cannot reach the gateway: {why} at {path}.\n\
         Start it with `fleetcastd --data-dir {dir}` (or `systemctl start fleetcastd`), or \
         point this command at the data directory it runs with: `--data-dir DIR` or \
         FLEETCAST_DATA_DIR"
    )]
    NotRunning {
        /// Socket path tried.
        path: String,
        /// The data directory it is in.
        dir: String,
        /// "no admin socket" or "nothing listens on the admin socket".
        why: &'static str,
    },
    /// The socket exists but this user may not open it.
    #[error(
        "permission denied on the admin socket {path}: it is mode 0600, owned by the user \
         fleetcastd runs as; run this command as that user (or root)"
    )]
    Denied {
        /// Socket path.
        path: String,
    },
    /// Any other failure to connect.
    #[error("cannot connect to the admin socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The connection broke mid-request.
    #[error("admin connection failed: {0} (the gateway may have stopped; see its log)")]
    Io(#[from] std::io::Error),
    /// The gateway answered something that is not a response.
    #[error(
        "malformed answer from the gateway: {0} (are the CLI and fleetcastd the same version?)"
    )]
    Malformed(#[from] serde_json::Error),
}

/// Sends one request to the gateway whose data directory is `data_dir` (blocking; CLI side).
pub fn request(data_dir: &Path, req: &Request) -> Result<Response, ClientError> {
    request_timeout(data_dir, req, Duration::from_secs(30))
}

/// [`request`] with an explicit answer timeout (a backup of a large store takes longer).
pub fn request_timeout(
    data_dir: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let path = data_dir.join(SOCKET_NAME);
    let mut s = UnixStream::connect(&path).map_err(|source| {
        let path_s = path.display().to_string();
        let dir = data_dir.display().to_string();
        match source.kind() {
            std::io::ErrorKind::NotFound => ClientError::NotRunning {
                path: path_s,
                dir,
                why: "no admin socket",
            },
            std::io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
                path: path_s,
                dir,
                why: "nothing listens on the admin socket",
            },
            std::io::ErrorKind::PermissionDenied => ClientError::Denied { path: path_s },
            _ => ClientError::Connect {
                path: path_s,
                source,
            },
        }
    })?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse() {
        assert_eq!(
            parse_step("exec:apt-get install -y 'nginx light'").unwrap(),
            Step::Exec {
                argv: vec![
                    "apt-get".into(),
                    "install".into(),
                    "-y".into(),
                    "nginx light".into()
                ]
            }
        );
        assert_eq!(
            parse_step("sh:echo hi > /tmp/x").unwrap(),
            Step::Exec {
                argv: vec!["/bin/sh".into(), "-c".into(), "echo hi > /tmp/x".into()]
            }
        );
        assert_eq!(
            parse_step("fetch:/tmp/a.deb=http://10.0.0.1/a.deb").unwrap(),
            Step::Fetch {
                url: "http://10.0.0.1/a.deb".into(),
                path: "/tmp/a.deb".into()
            }
        );
        assert_eq!(
            parse_step("write:/etc/motd=hello=world").unwrap(),
            Step::Write {
                path: "/etc/motd".into(),
                mode: 0o644,
                contents: b"hello=world".into()
            }
        );
        assert_eq!(parse_step("reboot").unwrap(), Step::Reboot);
        match parse_step("install:nginx curl").unwrap() {
            Step::Exec { argv } => {
                assert_eq!(&argv[..2], ["/bin/sh", "-c"]);
                assert!(argv[2].contains("apt-get install -y \"$@\""));
                assert_eq!(&argv[3..], ["fleetcast-install", "nginx", "curl"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_step("install:").is_err());
        assert!(parse_step("install:-y").is_err());
        assert_eq!(parse_step("report").unwrap(), Step::Report);
        assert_eq!(
            parse_step("slot-switch").unwrap(),
            Step::SlotSwitch { deadline_secs: 0 }
        );
        assert_eq!(
            parse_step("slot-switch:90").unwrap(),
            Step::SlotSwitch { deadline_secs: 90 }
        );
        for bad in ["slot-switch:0", "slot-switch:soon", "slot-commit:x"] {
            assert!(parse_step(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_step("slot-commit").unwrap(), Step::SlotCommit);
        let sha = "ab".repeat(32);
        assert!(parse_step(&format!("verify:/x={sha}")).is_ok());
    }

    #[test]
    fn install_uses_the_package_manager_the_device_has() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("args");
        // A stand-in `apk` first on PATH (and no apt-get/dnf/... in that directory).
        let fake = dir.path().join("apk");
        std::fs::write(
            &fake,
            format!("#!/bin/sh\necho \"$@\" > {}\n", out.display()),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let Step::Exec { argv } = parse_step("install:'nginx-light' curl").unwrap() else {
            panic!("not exec")
        };
        let st = std::process::Command::new(&*argv[0])
            .args(argv[1..].iter().map(|a| &**a))
            .env("PATH", dir.path())
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "add nginx-light curl\n"
        );
        // No package manager at all: a clear failure.
        std::fs::remove_file(&fake).unwrap();
        let o = std::process::Command::new(&*argv[0])
            .args(argv[1..].iter().map(|a| &**a))
            .env("PATH", dir.path())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(127));
        assert!(String::from_utf8_lossy(&o.stderr).contains("no supported package manager"));
    }

    #[test]
    fn bad_steps_say_what_to_do() {
        assert!(parse_step("exec:")
            .unwrap_err()
            .to_string()
            .contains("needs a program"));
        assert!(parse_step("exec:'unbalanced")
            .unwrap_err()
            .to_string()
            .contains("quotes"));
        assert!(parse_step("fetch:/tmp/x")
            .unwrap_err()
            .to_string()
            .contains("fetch:PATH=URL"));
        assert!(parse_step("verify:/x=abc")
            .unwrap_err()
            .to_string()
            .contains("64 hex"));
        assert!(parse_step("dance")
            .unwrap_err()
            .to_string()
            .contains("unknown step"));
        assert!(parse_step("reboot:now")
            .unwrap_err()
            .to_string()
            .contains("unknown step"));
    }

    #[test]
    fn requests_are_stable_json() {
        let r = Request::QueuePause {
            device: "web1".into(),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"queue_pause","device":"web1"}"#
        );
        let back: Request = serde_json::from_str(r#"{"op":"device_add","name":"n1"}"#).unwrap();
        assert_eq!(
            back,
            Request::DeviceAdd {
                name: "n1".into(),
                groups: vec![]
            }
        );
    }
}
