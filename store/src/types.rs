//! Domain types of the store and their record encodings.
//!
//! What travels on the wire is kept as the wire message itself (`docs/architecture.md`, "The
//! data model"): a command's steps are [`wire::Step`]s, a device's result is the
//! [`wire::CommandResult`] it sent, a configuration report is a [`wire::ConfigReport`], all
//! owned (`'static`) and embedded in records with the wire's own encoding. The rest (queues,
//! tasks, events) is the store's own vocabulary. Output excerpts are bounded to
//! [`OUTPUT_EXCERPT_MAX`] bytes (the store keeps the *tail*, where errors usually are).

use fleetcast_wire as wire;

use crate::codec::{Reader, Record, Writer, FORMAT_1, FORMAT_2};
use crate::error::{Error, Result};
pub use crate::ids::{DeviceId, EventId, QueueStatus, TaskId};
use crate::legacy;
pub use crate::result::{Received, StoredResult, OUTPUT_EXCERPT_MAX};
use crate::result::{RESULT_RECEIVED, RESULT_SKIPPED, RESULT_TIMED_OUT};

/// The hex text of a boot id, as queue records keep the boot a device left.
pub fn boot_hex(boot_id: &[u8; 16]) -> String {
    wire::hex(boot_id)
}

/// The transport of the traversal ladder that last worked for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Native framing over TLS on the gateway port.
    Native,
    /// Native framing over TLS on port 443.
    Native443,
    /// HTTP/1.1 `Upgrade` to the binary stream.
    HttpUpgrade,
    /// HTTP `CONNECT` through a proxy.
    HttpConnect,
    /// HTTPS long-poll.
    LongPoll,
}

impl Transport {
    fn code(self) -> u8 {
        match self {
            Transport::Native => 1,
            Transport::Native443 => 2,
            Transport::HttpUpgrade => 3,
            Transport::HttpConnect => 4,
            Transport::LongPoll => 5,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Transport::Native,
            2 => Transport::Native443,
            3 => Transport::HttpUpgrade,
            4 => Transport::HttpConnect,
            5 => Transport::LongPoll,
            _ => return None,
        })
    }
}

/// An enrolled device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its id.
    pub id: DeviceId,
    /// Its unique name.
    pub name: String,
    /// Hash of its credential (e.g. SHA-256 of its client certificate).
    pub credential_hash: [u8; 32],
    /// Revoked devices are refused by every queue transition.
    pub revoked: bool,
    /// Enrolment time, ms since the UNIX epoch.
    pub enrolled_ms: u64,
    /// Last time the device was heard from.
    pub last_seen_ms: Option<u64>,
    /// Last configuration report, as the device sent it.
    pub report: Option<wire::ConfigReport<'static>>,
    /// When that report was stored, ms since the UNIX epoch (`None` for a report kept by a
    /// format-2 record, which did not say).
    pub report_ms: Option<u64>,
    /// Transport that last worked.
    pub transport: Option<Transport>,
}

impl Record for Device {
    const TABLE: &'static str = "devices";
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.u64(self.id.0);
        w.str(&self.name);
        w.raw(&self.credential_hash);
        w.bool(self.revoked);
        w.u64(self.enrolled_ms);
        w.opt_u64(self.last_seen_ms);
        match &self.report {
            None => w.u8(0),
            Some(r) => {
                w.u8(1);
                w.embed(r);
            }
        }
        w.u8(self.transport.map_or(0, Transport::code));
        w.opt_u64(self.report_ms);
    }
    fn decode_fields(r: &mut Reader<'_>) -> Result<Self> {
        let id = DeviceId(r.u64()?);
        let name = r.string()?;
        let credential_hash = r.array()?;
        let revoked = r.bool()?;
        let enrolled_ms = r.u64()?;
        let last_seen_ms = r.opt_u64()?;
        let report = match r.u8()? {
            0 => None,
            1 if r.version() == FORMAT_1 => Some(legacy::report(r)?),
            // Format 2 embedded the report in wire version 2's layout.
            1 if r.version() == FORMAT_2 => Some(
                r.embedded_with(wire::ConfigReport::decode_v2_exact)?
                    .into_owned(),
            ),
            1 => Some(r.embedded::<wire::ConfigReport<'_>>()?.into_owned()),
            _ => return Err(r.corrupt("bad report tag")),
        };
        let transport = match r.u8()? {
            0 => None,
            c => Some(Transport::from_code(c).ok_or_else(|| r.corrupt("bad transport"))?),
        };
        // Formats 1 and 2 did not keep the report's time.
        let report_ms = match r.version() {
            FORMAT_1 | FORMAT_2 => None,
            _ => r.opt_u64()?,
        };
        Ok(Device {
            id,
            name,
            credential_hash,
            revoked,
            enrolled_ms,
            last_seen_ms,
            report,
            report_ms,
            transport,
        })
    }
}

/// A one-time enrolment token (stored under the hash of the secret token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolmentToken {
    /// Name the enrolled device will get.
    pub name: String,
    /// Token expiry, ms since the UNIX epoch.
    pub expires_ms: u64,
    /// Groups the device joins on enrolment.
    pub groups: Vec<String>,
}

impl Record for EnrolmentToken {
    const TABLE: &'static str = "enrol_tokens";
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.str(&self.name);
        w.u64(self.expires_ms);
        w.len(self.groups.len());
        for g in &self.groups {
            w.str(g);
        }
    }
    fn decode_fields(r: &mut Reader<'_>) -> Result<Self> {
        Ok(EnrolmentToken {
            name: r.string()?,
            expires_ms: r.u64()?,
            groups: r.strings()?,
        })
    }
}

/// What happens to the rest of the queue when a command finally fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// The queue goes to `failed` until an operator retries or skips.
    Stop,
    /// The failure is recorded and the queue moves on.
    Continue,
}

/// A queued command: an operation (ordered steps) and its policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The steps, executed in order, as they are dispatched.
    pub steps: Vec<wire::Step<'static>>,
    /// Time allowed for one attempt, from transmission to result.
    pub timeout_ms: u64,
    /// Transmissions allowed before the command counts as failed (at least 1).
    pub max_attempts: u32,
    /// Failure policy.
    pub on_failure: OnFailure,
    /// The attached device the steps operate on (`None` in records of formats 1 and 2).
    pub target: Option<wire::Target<'static>>,
}

/// The policy part of a [`Command`], decodable without the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CommandPolicy {
    pub timeout_ms: u64,
    pub max_attempts: u32,
    pub on_failure: OnFailure,
}

impl CommandPolicy {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let timeout_ms = r.u64()?;
        let max_attempts = r.u32()?;
        let on_failure = match r.u8()? {
            0 => OnFailure::Stop,
            1 => OnFailure::Continue,
            _ => return Err(r.corrupt("bad failure policy")),
        };
        Ok(CommandPolicy {
            timeout_ms,
            max_attempts,
            on_failure,
        })
    }
    /// Decodes only the policy prefix of an encoded command (the hot paths need no steps).
    pub(crate) fn decode_prefix(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf, Command::TABLE)?;
        Self::read(&mut r)
    }
}

impl Command {
    /// True if the operation contains a reboot step.
    pub fn has_reboot(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, wire::Step::Reboot))
    }
}

impl Record for Command {
    const TABLE: &'static str = "commands";
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.u64(self.timeout_ms);
        w.u32(self.max_attempts);
        w.u8(match self.on_failure {
            OnFailure::Stop => 0,
            OnFailure::Continue => 1,
        });
        w.len(self.steps.len());
        for s in &self.steps {
            w.embed(s);
        }
        match &self.target {
            None => w.u8(0),
            Some(t) => {
                w.u8(1);
                w.u8(t.kind as u8);
                w.str(&t.id);
            }
        }
    }
    fn decode_fields(r: &mut Reader<'_>) -> Result<Self> {
        let CommandPolicy {
            timeout_ms,
            max_attempts,
            on_failure,
        } = CommandPolicy::read(r)?;
        let steps = if r.version() == FORMAT_1 {
            legacy::steps(r)?
        } else {
            let n = r.count(5)?;
            let mut steps = Vec::with_capacity(n);
            for _ in 0..n {
                steps.push(r.embedded::<wire::Step<'_>>()?.into_owned());
            }
            steps
        };
        // Formats 1 and 2 had no targets.
        let target = match r.version() {
            FORMAT_1 | FORMAT_2 => None,
            _ => match r.u8()? {
                0 => None,
                1 => {
                    let kind = wire::AttachedKind::from_code(r.u8()?)
                        .ok_or_else(|| r.corrupt("bad target kind"))?;
                    Some(wire::Target {
                        kind,
                        id: r.string()?.into(),
                    })
                }
                _ => return Err(r.corrupt("bad target tag")),
            },
        };
        Ok(Command {
            steps,
            timeout_ms,
            max_attempts,
            on_failure,
            target,
        })
    }
}

/// Why a queue is `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// The command's last attempt reported a failed step.
    CommandFailed,
    /// Every attempt timed out without a result.
    AttemptsExhausted,
    /// The device did not come back before the reboot deadline.
    RebootDeadlineMissed,
}

/// Per-device queue state. See the `queue` module for the transition rules and invariants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueState {
    /// Current status.
    pub status: QueueStatus,
    /// Sequence number the next enqueued command gets (starts at 1).
    pub next_seq: u64,
    /// Highest sequence number whose command is finished (result final); 0 if none.
    pub completed_through: u64,
    /// The command most recently transmitted, if any.
    pub cursor: Option<u64>,
    /// When the cursor command was last transmitted, ms since the UNIX epoch.
    pub transmitted_ms: u64,
    /// Transmissions of the cursor command counted against its `max_attempts` (reset by an
    /// operator's retry).
    pub attempts: u32,
    /// The cursor command's current attempt number (1, 2, …): every counted transmission is
    /// a new attempt, also after a retry; a redelivery is not. The device's ledger runs an
    /// attempt at most once. 0 in records written before attempts existed.
    pub attempt: u32,
    /// The boot the device left for the cursor command's reboot: the one `RebootStarting`
    /// named, or, until it arrives, the boot of the session the command was sent on. A reboot
    /// completes only on a different boot. `None` for commands without a reboot (and in older
    /// records, where the last stored report's boot id is compared instead).
    pub boot_left: Option<String>,
    /// Reboot deadline while `rebooting`.
    pub reboot_deadline_ms: u64,
    /// Why the queue failed, while `failed`.
    pub failure: Option<FailReason>,
    /// Pause requested while a command was in flight: the queue pauses when it finishes.
    pub pause_requested: bool,
    /// Status to return to on `resume` (only meaningful while `paused`).
    pub paused_from: QueueStatus,
    /// Copy of the device's revoked flag, so hot transitions need not decode the device.
    pub revoked: bool,
}

impl Default for QueueState {
    fn default() -> Self {
        QueueState {
            status: QueueStatus::Idle,
            next_seq: 1,
            completed_through: 0,
            cursor: None,
            transmitted_ms: 0,
            attempts: 0,
            attempt: 0,
            boot_left: None,
            reboot_deadline_ms: 0,
            failure: None,
            pause_requested: false,
            paused_from: QueueStatus::Idle,
            revoked: false,
        }
    }
}

impl Record for QueueState {
    const TABLE: &'static str = "queues";
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.u8(self.status.code());
        w.u64(self.next_seq);
        w.u64(self.completed_through);
        w.opt_u64(self.cursor);
        w.u64(self.transmitted_ms);
        w.u32(self.attempts);
        w.u64(self.reboot_deadline_ms);
        w.u8(match self.failure {
            None => 0,
            Some(FailReason::CommandFailed) => 1,
            Some(FailReason::AttemptsExhausted) => 2,
            Some(FailReason::RebootDeadlineMissed) => 3,
        });
        w.bool(self.pause_requested);
        w.u8(self.paused_from.code());
        w.bool(self.revoked);
        // Added after the first release: absent in older records (attempt 0, which is also
        // what an agent's older ledger records, so the two still agree).
        w.u32(self.attempt);
        match &self.boot_left {
            None => w.u8(0),
            Some(b) => {
                w.u8(1);
                w.str(b);
            }
        }
    }
    fn decode_fields(r: &mut Reader<'_>) -> Result<Self> {
        let status = QueueStatus::from_code(r.u8()?).ok_or_else(|| r.corrupt("bad status"))?;
        let next_seq = r.u64()?;
        let completed_through = r.u64()?;
        let cursor = r.opt_u64()?;
        let transmitted_ms = r.u64()?;
        let attempts = r.u32()?;
        let reboot_deadline_ms = r.u64()?;
        let failure = match r.u8()? {
            0 => None,
            1 => Some(FailReason::CommandFailed),
            2 => Some(FailReason::AttemptsExhausted),
            3 => Some(FailReason::RebootDeadlineMissed),
            _ => return Err(r.corrupt("bad failure reason")),
        };
        let pause_requested = r.bool()?;
        let paused_from =
            QueueStatus::from_code(r.u8()?).ok_or_else(|| r.corrupt("bad paused_from"))?;
        let revoked = r.bool()?;
        let attempt = if r.is_empty() { 0 } else { r.u32()? };
        let boot_left = if r.is_empty() {
            None
        } else {
            match r.u8()? {
                0 => None,
                1 => Some(r.string()?),
                _ => return Err(r.corrupt("bad boot tag")),
            }
        };
        Ok(QueueState {
            status,
            next_seq,
            completed_through,
            cursor,
            transmitted_ms,
            attempts,
            attempt,
            boot_left,
            reboot_deadline_ms,
            failure,
            pause_requested,
            paused_from,
            revoked,
        })
    }
}

impl Record for StoredResult {
    const TABLE: &'static str = "results";
    fn encode_fields(&self, w: &mut Writer<'_>) {
        match self {
            StoredResult::Received(r) => {
                w.u8(RESULT_RECEIVED);
                w.embed(&r.result);
                // Last, so `same_received` compares everything before it.
                w.u64(r.at_ms);
            }
            StoredResult::TimedOut { at_ms } => {
                w.u8(RESULT_TIMED_OUT);
                w.u64(*at_ms);
            }
            StoredResult::Skipped => w.u8(RESULT_SKIPPED),
        }
    }
    fn decode_fields(r: &mut Reader<'_>) -> Result<Self> {
        if r.version() == FORMAT_1 {
            return legacy::result(r);
        }
        Ok(match r.u8()? {
            RESULT_RECEIVED => {
                // Format 2 embedded the result (and its report) in wire version 2's layout.
                let result = match r.version() {
                    FORMAT_2 => r.embedded_with(wire::CommandResult::decode_v2_exact)?,
                    _ => r.embedded::<wire::CommandResult<'_>>()?,
                }
                .into_owned();
                StoredResult::Received(Received {
                    result,
                    at_ms: r.u64()?,
                })
            }
            RESULT_TIMED_OUT => StoredResult::TimedOut { at_ms: r.u64()? },
            RESULT_SKIPPED => StoredResult::Skipped,
            _ => return Err(r.corrupt("bad result tag")),
        })
    }
}

/// A distribution task (one file multicast to a set of devices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// File name or path on the gateway.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Block size in bytes (non-zero).
    pub block_size: u32,
    /// SHA-256 of the whole file.
    pub sha256: [u8; 32],
    /// Target group, if the task was addressed to a group.
    pub group: Option<String>,
    /// Human-readable trigger description (e.g. `"publish by alice"`).
    pub trigger: String,
    /// Creation time, ms since the UNIX epoch.
    pub created_ms: u64,
    /// Follow-up commands, queued for each device only after its copy verified (e.g. install
    /// the package just received).
    pub then: Vec<Command>,
    /// How the multicast runs: kept so that a gateway restart re-creates it as pushed.
    pub plan: TaskPlan,
    /// Which devices the task serves beyond its first targets, and the online gate.
    pub follow: TaskFollow,
    /// Where an image goes on each device, and how its stream relates to it (`None`: a file
    /// for the downloads directory).
    pub image: Option<TaskImage>,
}

/// An image task's target and map, as the announce carries them
/// (`fleetcast_wire::ImageTarget`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskImage {
    /// The target as the operator named it (`partlabel=rootfs-b`, `slot=inactive`, a path).
    pub target: String,
    /// The encoded image map; empty for a raw image (the stream is the image).
    pub map: Vec<u8>,
    /// Bytes of the image on the target (the stream's size for a raw image).
    pub image_size: u64,
}

/// How a task's multicast runs, recorded with the task so that a gateway restart before or
/// during the first pass re-creates the same multicast (at its time, after its quorum, at its
/// rate, to its destination) instead of catching every device up by unicast.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskPlan {
    /// Not before this wall-clock time, ms since the UNIX epoch (a schedule).
    pub at_ms: Option<u64>,
    /// Once at least this many targets have joined ...
    pub min_ready: Option<u32>,
    /// ... or this many seconds after the push (or the scheduled time), whichever is first
    /// (also the longest wait of [`TaskFollow::when_online`]).
    pub max_wait_s: Option<u64>,
    /// Rate ceiling of the group sender, datagram bytes per second; 0 in a record written
    /// before plans were kept (a restart then catches devices up, as it always did).
    pub rate: u64,
    /// Subnet-directed broadcast address the group datagrams go to (`None`: the gateway's
    /// multicast group).
    pub broadcast: Option<std::net::Ipv4Addr>,
    /// Whether the multicast first pass is over: after it, a restart catches devices up by
    /// unicast, never multicasts the file again.
    pub pass_done: bool,
}

impl TaskPlan {
    /// Whether a restart should re-create the multicast (a plan was recorded and its first
    /// pass did not end).
    pub fn multicast_pending(&self) -> bool {
        self.rate > 0 && !self.pass_done
    }
}

/// Which devices a task serves beyond the members its group had when it was pushed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskFollow {
    /// Devices added to the group later, or enrolled into it, get the task too.
    pub group: bool,
    /// The multicast waits until this many devices of the group are online (or
    /// [`TaskPlan::max_wait_s`] passed).
    pub when_online: Option<u32>,
}

impl TaskFollow {
    /// Whether the task asks for nothing beyond its first targets.
    pub fn is_default(&self) -> bool {
        *self == TaskFollow::default()
    }
}

/// Tags of a task record's trailing extensions (each `tag, bytes`), after `then`.
const TASK_EXT_PLAN: u8 = 1;
const TASK_EXT_FOLLOW: u8 = 2;
const TASK_EXT_IMAGE: u8 = 3;

impl Task {
    /// Number of blocks.
    pub fn blocks(&self) -> u32 {
        let bs = u64::from(self.block_size.max(1));
        u32::try_from(self.size.div_ceil(bs)).unwrap_or(u32::MAX)
    }
}

impl Record for Task {
    const TABLE: &'static str = "tasks";
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.str(&self.path);
        w.u64(self.size);
        w.u32(self.block_size);
        w.raw(&self.sha256);
        match &self.group {
            None => w.u8(0),
            Some(g) => {
                w.u8(1);
                w.str(g);
            }
        }
        w.str(&self.trigger);
        w.u64(self.created_ms);
        // Added after the first release: absent in older records (decoded as none). The
        // extensions after it need the count, even of none.
        let plan = self.plan != TaskPlan::default();
        let follow = !self.follow.is_default();
        if !self.then.is_empty() || plan || follow || self.image.is_some() {
            w.len(self.then.len());
            for c in &self.then {
                let mut buf = Vec::new();
                if let Err(Error::Unencodable { error, .. }) = c.encode(&mut buf) {
                    w.fail(error);
                }
                w.bytes(&buf);
            }
        }
        // Tagged extensions, each a byte string: a reader skips a tag it does not know, so
        // a later extension never makes an older build refuse the record.
        if plan {
            let mut b = Vec::new();
            let mut e = Writer::raw_into(&mut b);
            let p = &self.plan;
            e.opt_u64(p.at_ms);
            e.opt_u64(p.min_ready.map(u64::from));
            e.opt_u64(p.max_wait_s);
            e.u64(p.rate);
            e.opt_u64(p.broadcast.map(|a| u64::from(u32::from(a))));
            e.bool(p.pass_done);
            w.u8(TASK_EXT_PLAN);
            w.bytes(&b);
        }
        if follow {
            let mut b = Vec::new();
            let mut e = Writer::raw_into(&mut b);
            e.bool(self.follow.group);
            e.opt_u64(self.follow.when_online.map(u64::from));
            w.u8(TASK_EXT_FOLLOW);
            w.bytes(&b);
        }
        if let Some(i) = &self.image {
            let mut b = Vec::new();
            let mut e = Writer::raw_into(&mut b);
            e.str(&i.target);
            e.bytes(&i.map);
            e.u64(i.image_size);
            w.u8(TASK_EXT_IMAGE);
            w.bytes(&b);
        }
    }
    fn decode_fields(r: &mut Reader<'_>) -> Result<Self> {
        let path = r.string()?;
        let size = r.u64()?;
        let block_size = r.u32()?;
        if block_size == 0 {
            return Err(r.corrupt("zero block size"));
        }
        let sha256 = r.array()?;
        let group = match r.u8()? {
            0 => None,
            1 => Some(r.string()?),
            _ => return Err(r.corrupt("bad group tag")),
        };
        let trigger = r.string()?;
        let created_ms = r.u64()?;
        let mut then = Vec::new();
        if !r.is_empty() {
            for _ in 0..r.count(4)? {
                then.push(Command::decode(r.bytes()?)?);
            }
        }
        let (mut plan, mut follow, mut image) = (TaskPlan::default(), TaskFollow::default(), None);
        while !r.is_empty() {
            let tag = r.u8()?;
            let ext = r.bytes()?;
            let mut e = r.sub(ext);
            match tag {
                TASK_EXT_PLAN => {
                    plan = TaskPlan {
                        at_ms: e.opt_u64()?,
                        min_ready: e.opt_u32()?,
                        max_wait_s: e.opt_u64()?,
                        rate: e.u64()?,
                        broadcast: match e.opt_u64()? {
                            None => None,
                            Some(a) => Some(std::net::Ipv4Addr::from(
                                u32::try_from(a).map_err(|_| e.corrupt("bad broadcast address"))?,
                            )),
                        },
                        pass_done: e.bool()?,
                    };
                }
                TASK_EXT_FOLLOW => {
                    follow = TaskFollow {
                        group: e.bool()?,
                        when_online: e.opt_u32()?,
                    };
                }
                TASK_EXT_IMAGE => {
                    image = Some(TaskImage {
                        target: e.string()?,
                        map: e.bytes()?.to_vec(),
                        image_size: e.u64()?,
                    });
                }
                // Written by a later build: skipped, as its writer meant.
                _ => continue,
            }
            e.finish()?;
        }
        Ok(Task {
            path,
            size,
            block_size,
            sha256,
            group,
            trigger,
            created_ms,
            then,
            plan,
            follow,
            image,
        })
    }
}

/// A compact set of received block numbers: sorted, disjoint, non-adjacent half-open ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockSet {
    ranges: Vec<(u32, u32)>,
}

impl BlockSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }
    /// The ranges `[start, end)`, sorted and disjoint.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }
    /// Adds the blocks `start..end` (no-op if empty).
    pub fn insert(&mut self, start: u32, end: u32) {
        if start >= end {
            return;
        }
        // First range whose end reaches start (touching ranges merge).
        let i = self.ranges.partition_point(|&(_, e)| e < start);
        let mut j = i;
        let (mut s, mut e) = (start, end);
        while j < self.ranges.len() && self.ranges[j].0 <= e {
            s = s.min(self.ranges[j].0);
            e = e.max(self.ranges[j].1);
            j += 1;
        }
        self.ranges.splice(i..j, std::iter::once((s, e)));
    }
    /// Adds every block of `other`.
    pub fn union(&mut self, other: &BlockSet) {
        for &(s, e) in &other.ranges {
            self.insert(s, e);
        }
    }
    /// True if `block` is in the set.
    pub fn contains(&self, block: u32) -> bool {
        let i = self.ranges.partition_point(|&(_, e)| e <= block);
        self.ranges.get(i).is_some_and(|&(s, _)| s <= block)
    }
    /// Number of blocks in the set.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|&(s, e)| u64::from(e - s)).sum()
    }
    /// Highest block + 1, or 0 if empty.
    pub fn end(&self) -> u32 {
        self.ranges.last().map_or(0, |&(_, e)| e)
    }
    /// The ranges of `0..total` not in the set (what to repair).
    pub fn missing(&self, total: u32) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut at = 0;
        for &(s, e) in &self.ranges {
            if s >= total {
                break;
            }
            if s > at {
                out.push((at, s));
            }
            at = e;
        }
        if at < total {
            out.push((at, total));
        }
        out
    }
    fn write(&self, w: &mut Writer<'_>) {
        w.len(self.ranges.len());
        for &(s, e) in &self.ranges {
            w.u32(s);
            w.u32(e);
        }
    }
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let n = r.count(8)?;
        let mut ranges = Vec::with_capacity(n);
        let mut prev_end: Option<u32> = None;
        for _ in 0..n {
            let (s, e) = (r.u32()?, r.u32()?);
            if s >= e || prev_end.is_some_and(|p| s <= p) {
                return Err(r.corrupt("block ranges not sorted and disjoint"));
            }
            prev_end = Some(e);
            ranges.push((s, e));
        }
        Ok(BlockSet { ranges })
    }
}

/// Status of one device within a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskDeviceStatus {
    /// Not started.
    Pending,
    /// Receiving; the blocks received so far.
    InProgress(BlockSet),
    /// Whole file received and digest verified.
    Completed,
    /// Gave up, with a reason.
    Failed(String),
    /// The operator cancelled it (`task cancel`): not announced or caught up again until
    /// `task retry`.
    Cancelled,
}

impl TaskDeviceStatus {
    /// Short name used in errors.
    pub fn name(&self) -> &'static str {
        match self {
            TaskDeviceStatus::Pending => "pending",
            TaskDeviceStatus::InProgress(_) => "in_progress",
            TaskDeviceStatus::Completed => "completed",
            TaskDeviceStatus::Failed(_) => "failed",
            TaskDeviceStatus::Cancelled => "cancelled",
        }
    }
    /// Pending or in progress.
    pub fn is_incomplete(&self) -> bool {
        matches!(
            self,
            TaskDeviceStatus::Pending | TaskDeviceStatus::InProgress(_)
        )
    }
}

impl Record for TaskDeviceStatus {
    const TABLE: &'static str = "task_status";
    fn encode_fields(&self, w: &mut Writer<'_>) {
        match self {
            TaskDeviceStatus::Pending => w.u8(0),
            TaskDeviceStatus::InProgress(b) => {
                w.u8(1);
                b.write(w);
            }
            TaskDeviceStatus::Completed => w.u8(2),
            TaskDeviceStatus::Failed(reason) => {
                w.u8(3);
                w.str(reason);
            }
            // Added in schema 3: a schema-2 store has no such record, and a build that knows
            // only schema 2 refuses a schema-3 store instead of meeting it.
            TaskDeviceStatus::Cancelled => w.u8(4),
        }
    }
    fn decode_fields(r: &mut Reader<'_>) -> Result<Self> {
        Ok(match r.u8()? {
            0 => TaskDeviceStatus::Pending,
            1 => TaskDeviceStatus::InProgress(BlockSet::read(r)?),
            2 => TaskDeviceStatus::Completed,
            3 => TaskDeviceStatus::Failed(r.string()?),
            4 => TaskDeviceStatus::Cancelled,
            _ => return Err(r.corrupt("bad task status")),
        })
    }
}

/// Kind of an event-log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Device enrolled.
    Enrolled,
    /// Device connected.
    Connected,
    /// Device disconnected.
    Disconnected,
    /// Command transmitted.
    CommandSent,
    /// Command result recorded.
    CommandResult,
    /// Reboot started.
    RebootStarted,
    /// Reboot completed.
    RebootCompleted,
    /// Queue failed.
    QueueFailed,
    /// Task status changed.
    TaskStatus,
    /// Operator action.
    Operator,
    /// Anything else.
    Other,
}

impl EventKind {
    const ALL: [EventKind; 11] = [
        EventKind::Enrolled,
        EventKind::Connected,
        EventKind::Disconnected,
        EventKind::CommandSent,
        EventKind::CommandResult,
        EventKind::RebootStarted,
        EventKind::RebootCompleted,
        EventKind::QueueFailed,
        EventKind::TaskStatus,
        EventKind::Operator,
        EventKind::Other,
    ];
    fn code(self) -> u8 {
        // Position in ALL; stable because variants are only ever appended.
        EventKind::ALL.iter().position(|&k| k == self).unwrap_or(10) as u8
    }
}

/// One event-log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When, ms since the UNIX epoch.
    pub time_ms: u64,
    /// Which device, if any.
    pub device: Option<DeviceId>,
    /// What kind of event.
    pub kind: EventKind,
    /// Free text.
    pub message: String,
}

impl Record for Event {
    const TABLE: &'static str = "events";
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.u64(self.time_ms);
        w.opt_u64(self.device.map(|d| d.0));
        w.u8(self.kind.code());
        w.str(&self.message);
    }
    fn decode_fields(r: &mut Reader<'_>) -> Result<Self> {
        let time_ms = r.u64()?;
        let device = r.opt_u64()?.map(DeviceId);
        let kind = *EventKind::ALL
            .get(usize::from(r.u8()?))
            .ok_or_else(|| r.corrupt("bad event kind"))?;
        Ok(Event {
            time_ms,
            device,
            kind,
            message: r.string()?,
        })
    }
}

#[cfg(test)]
mod task_codec_tests {
    use super::*;

    #[test]
    fn task_follow_up_round_trips_and_older_records_still_decode() {
        let mut t = Task {
            path: "/srv/pkg.deb".into(),
            size: 10,
            block_size: 4,
            sha256: [3; 32],
            group: Some("web".into()),
            trigger: "publish by operator".into(),
            created_ms: 5,
            then: vec![Command {
                target: None,
                steps: vec![wire::Step::Exec {
                    argv: vec!["dpkg".into(), "-i".into(), "/x/pkg.deb".into()],
                }],
                timeout_ms: 60_000,
                max_attempts: 1,
                on_failure: OnFailure::Stop,
            }],
            plan: Default::default(),
            follow: Default::default(),
            image: None,
        };
        let mut buf = Vec::new();
        t.encode(&mut buf).unwrap();
        assert_eq!(Task::decode(&buf).unwrap(), t);
        // A record written before follow-ups existed ends after `created_ms`.
        t.then.clear();
        let mut old = Vec::new();
        t.encode(&mut old).unwrap();
        assert_eq!(Task::decode(&old).unwrap(), t);
        // A follow-up cut short is corruption, not silence.
        assert!(Task::decode(&buf[..buf.len() - 3]).is_err());
    }

    #[test]
    fn task_plan_and_follow_round_trip_and_records_without_them_still_decode() {
        let mut t = Task {
            path: "/srv/os.img".into(),
            size: 10,
            block_size: 4,
            sha256: [3; 32],
            group: Some("rack7".into()),
            trigger: "publish by operator".into(),
            created_ms: 5,
            then: vec![],
            plan: TaskPlan {
                at_ms: Some(1_800_000_000_000),
                min_ready: Some(3),
                max_wait_s: Some(60),
                rate: 12_500_000,
                broadcast: Some(std::net::Ipv4Addr::new(10, 9, 255, 255)),
                pass_done: false,
            },
            follow: TaskFollow {
                group: true,
                when_online: Some(20),
            },
            image: None,
        };
        let mut buf = Vec::new();
        t.encode(&mut buf).unwrap();
        assert_eq!(Task::decode(&buf).unwrap(), t);
        // Either extension alone, with no follow-ups before it.
        let plan = t.plan;
        t.follow = TaskFollow::default();
        t.encode(&mut buf).unwrap();
        assert_eq!(Task::decode(&buf).unwrap(), t);
        t.plan = TaskPlan::default();
        t.follow.when_online = Some(1);
        t.encode(&mut buf).unwrap();
        assert_eq!(Task::decode(&buf).unwrap(), t);
        // An image task, with and without the others, and a raw image's empty map.
        for map in [vec![], b"FCIM map bytes".to_vec()] {
            t.image = Some(TaskImage {
                target: "partlabel=rootfs-b".into(),
                map,
                image_size: 1 << 33,
            });
            t.encode(&mut buf).unwrap();
            assert_eq!(Task::decode(&buf).unwrap(), t);
            t.follow = TaskFollow::default();
            t.encode(&mut buf).unwrap();
            assert_eq!(Task::decode(&buf).unwrap(), t);
        }
        t.image = None;

        // Bytes built by hand as a build before plans wrote them (format 3, nothing after
        // `created_ms`; and format 2, the same layout): the task reads with no plan.
        for version in [crate::codec::VERSION, FORMAT_2] {
            let mut old = vec![version];
            old.extend_from_slice(&7u32.to_le_bytes());
            old.extend_from_slice(b"/a/file");
            old.extend_from_slice(&10u64.to_le_bytes());
            old.extend_from_slice(&4u32.to_le_bytes());
            old.extend_from_slice(&[3; 32]);
            old.push(0);
            old.extend_from_slice(&2u32.to_le_bytes());
            old.extend_from_slice(b"op");
            old.extend_from_slice(&5u64.to_le_bytes());
            let d = Task::decode(&old).unwrap();
            assert_eq!(
                (d.path.as_str(), d.group.as_deref(), d.created_ms),
                ("/a/file", None, 5)
            );
            assert!(!d.plan.multicast_pending() && d.follow.is_default() && d.then.is_empty());
            // A later build's extension (tag 9) is skipped; a known one cut short is not.
            old.extend_from_slice(&0u32.to_le_bytes());
            old.push(9);
            old.extend_from_slice(&1u32.to_le_bytes());
            old.push(0xee);
            assert_eq!(Task::decode(&old).unwrap(), d);
            old.push(TASK_EXT_FOLLOW);
            old.extend_from_slice(&1u32.to_le_bytes());
            old.push(1);
            assert!(Task::decode(&old).is_err());
        }
        // The plan's own reading of itself.
        assert!(plan.multicast_pending());
        assert!(!TaskPlan {
            pass_done: true,
            ..plan
        }
        .multicast_pending());
    }
}
