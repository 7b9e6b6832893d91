//! Control-channel messages: session set-up, enrolment, command queues, reboot suspension.
//!
//! Byte layouts are specified in `docs/wire.md`; each `encode`/`decode` pair below follows the
//! field order written in its type's doc comment.

use alloc::borrow::Cow;
use alloc::vec::Vec;

use super::limits::*;
use super::{borrowed_bytes16, borrowed_str16, owned, owned_list};
use crate::codec::{Reader, Sink};
use crate::error::{Error, Result};

pub use super::report::{ConfigReport, Package, Target};

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $val:expr),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
        #[repr(u8)]
        #[allow(missing_docs)]
        pub enum $name { $($(#[$vm])* $var = $val),+ }

        impl $name {
            pub(crate) fn from_u8(v: u8) -> Result<Self> {
                match v { $($val => Ok($name::$var),)+ _ => Err(Error::InvalidValue) }
            }
        }
    };
}
pub(crate) use wire_enum;

/// `Hello`: the agent's first message on every session (agent → gateway).
///
/// Fields: `device_id u64`, `credential bytes16`, `agent_version str16`, `boot_id [16]`,
/// `last option<LastExecuted>`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Hello<'a> {
    /// The enrolled device's id.
    pub device_id: u64,
    /// Reference to the credential the session authenticated with (certificate fingerprint).
    pub credential: Cow<'a, [u8]>,
    /// Agent software version.
    pub agent_version: Cow<'a, str>,
    /// Identifies this boot of the device; changes on every reboot.
    pub boot_id: [u8; 16],
    /// The last command the agent executed, with its result if not yet acknowledged.
    pub last: Option<LastExecuted<'a>>,
}

/// The last command an agent executed (inside [`Hello`]).
///
/// Fields: `seq u64`, `attempt u32`, `state u8` (0: finished and acknowledged, 1: still
/// executing or rebooting, 2: finished, the unacknowledged `CommandResult` follows).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct LastExecuted<'a> {
    /// Queue sequence number of the command.
    pub seq: u64,
    /// Which attempt of it ([`Dispatch::attempt`]).
    pub attempt: u32,
    /// The agent is still executing it (or rebooting for it): no result yet. Never set
    /// together with `result` (such a value does not encode).
    pub executing: bool,
    /// Its result, when the gateway has not acknowledged it yet.
    pub result: Option<CommandResult<'a>>,
}

/// `LastExecuted.state` codes.
const LAST_ACKED: u8 = 0;
const LAST_EXECUTING: u8 = 1;
const LAST_RESULT: u8 = 2;

impl<'a> LastExecuted<'a> {
    fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.seq)?;
        s.u32(self.attempt)?;
        match (&self.result, self.executing) {
            (Some(_), true) => Err(Error::InvalidValue),
            (Some(r), false) => {
                s.u8(LAST_RESULT)?;
                r.encode(s)
            }
            (None, true) => s.u8(LAST_EXECUTING),
            (None, false) => s.u8(LAST_ACKED),
        }
    }
    fn decode(r: &mut Reader<'a>) -> Result<Self> {
        let seq = r.u64()?;
        let attempt = r.u32()?;
        let (executing, result) = match r.u8()? {
            LAST_ACKED => (false, None),
            LAST_EXECUTING => (true, None),
            LAST_RESULT => (false, Some(CommandResult::decode(r)?)),
            _ => return Err(Error::InvalidValue),
        };
        Ok(LastExecuted {
            seq,
            attempt,
            executing,
            result,
        })
    }
}

impl<'a> Hello<'a> {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.device_id)?;
        s.bytes16(&self.credential, MAX_CREDENTIAL)?;
        s.str16(&self.agent_version, MAX_NAME)?;
        s.put(&self.boot_id)?;
        s.present(self.last.is_some())?;
        match &self.last {
            Some(last) => last.encode(s),
            None => Ok(()),
        }
    }
    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self> {
        let device_id = r.u64()?;
        let credential = borrowed_bytes16(r, MAX_CREDENTIAL)?;
        let agent_version = borrowed_str16(r, MAX_NAME)?;
        let boot_id = r.array()?;
        let last = if r.present()? {
            Some(LastExecuted::decode(r)?)
        } else {
            None
        };
        Ok(Hello {
            device_id,
            credential,
            agent_version,
            boot_id,
            last,
        })
    }
}

/// `Welcome`: the gateway's answer to [`Hello`] (gateway → agent).
///
/// Fields: `session_id u64`, `server_time_ms u64`, `heartbeat_ms u32`, `acked_seq u64`,
/// `pending_commands u32`, `pending_transfers u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Welcome {
    /// Identifies this session in logs and long-poll requests.
    pub session_id: u64,
    /// Gateway wall clock, ms since the UNIX epoch (informational: for skew reports).
    pub server_time_ms: u64,
    /// Interval at which the agent sends [`Heartbeat`]s.
    pub heartbeat_ms: u32,
    /// Highest command sequence whose result the gateway has durably stored: the agent may
    /// forget results up to here.
    pub acked_seq: u64,
    /// Commands the gateway is to send this device, the one in flight included (none while
    /// its queue is paused or stopped on a failure). A hint: the agent polls sooner while it
    /// is not zero (see docs/wire.md); nothing depends on it being exact.
    pub pending_commands: u32,
    /// Distribution tasks this device has not completed (pending or in progress; not failed
    /// or cancelled ones). A hint, as `pending_commands`.
    pub pending_transfers: u32,
}

impl Welcome {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.session_id)?;
        s.u64(self.server_time_ms)?;
        s.u32(self.heartbeat_ms)?;
        s.u64(self.acked_seq)?;
        s.u32(self.pending_commands)?;
        s.u32(self.pending_transfers)
    }
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(Welcome {
            session_id: r.u64()?,
            server_time_ms: r.u64()?,
            heartbeat_ms: r.u32()?,
            acked_seq: r.u64()?,
            pending_commands: r.u32()?,
            pending_transfers: r.u32()?,
        })
    }
}

/// `Heartbeat`: liveness in either direction; the peer echoes the nonce.
///
/// Fields: `nonce u64`, `echo u8` (0 = request, 1 = reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Heartbeat {
    /// Chosen by the requester, echoed by the replier.
    pub nonce: u64,
    /// Whether this is the reply.
    pub echo: bool,
}

impl Heartbeat {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.nonce)?;
        s.present(self.echo)
    }
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(Heartbeat {
            nonce: r.u64()?,
            echo: r.present()?,
        })
    }
}

/// `Enrol`: first contact of a new device, on a session without a client certificate
/// (agent → gateway).
///
/// Fields: `token bytes16`, `name str16`, `spki bytes16`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Enrol<'a> {
    /// The one-time enrolment token the operator issued.
    pub token: Cow<'a, [u8]>,
    /// The device name the token was issued for.
    pub name: Cow<'a, str>,
    /// The agent's public key (SubjectPublicKeyInfo, DER) to certify.
    pub spki: Cow<'a, [u8]>,
}

impl<'a> Enrol<'a> {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.bytes16(&self.token, MAX_TOKEN)?;
        s.str16(&self.name, MAX_NAME)?;
        s.bytes16(&self.spki, MAX_SPKI)
    }
    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self> {
        Ok(Enrol {
            token: borrowed_bytes16(r, MAX_TOKEN)?,
            name: borrowed_str16(r, MAX_NAME)?,
            spki: borrowed_bytes16(r, MAX_SPKI)?,
        })
    }
}

/// `Enrolled`: the gateway's answer to [`Enrol`] (gateway → agent).
///
/// Fields: `device_id u64`, `certificate bytes16`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Enrolled<'a> {
    /// The id assigned to the device.
    pub device_id: u64,
    /// The device's client certificate (DER), signed by the gateway CA.
    pub certificate: Cow<'a, [u8]>,
}

impl<'a> Enrolled<'a> {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.device_id)?;
        s.bytes16(&self.certificate, MAX_CERT)
    }
    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self> {
        Ok(Enrolled {
            device_id: r.u64()?,
            certificate: borrowed_bytes16(r, MAX_CERT)?,
        })
    }
}

/// One component step of an operation.
///
/// Encoding: a `u8` step code, then the step's fields:
/// `1 Fetch {url str16, path str16}`, `2 Verify {path str16, sha256 [32]}`,
/// `3 Write {path str16, mode u32, contents bytes32}`, `4 Exec {argv list<str16>}`,
/// `5 Reboot {}`, `6 Report {}`, `7 SlotSwitch {deadline_secs u32}`, `8 SlotCommit {}`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub enum Step<'a> {
    /// Download `url` to `path`.
    Fetch {
        /// Source URL.
        url: Cow<'a, str>,
        /// Destination path on the device.
        path: Cow<'a, str>,
    },
    /// Check that the file at `path` has this SHA-256 digest.
    Verify {
        /// File to check.
        path: Cow<'a, str>,
        /// Expected digest.
        sha256: [u8; 32],
    },
    /// Write `contents` to `path` with permission bits `mode`.
    Write {
        /// Destination path.
        path: Cow<'a, str>,
        /// Unix permission bits.
        mode: u32,
        /// File contents.
        contents: Cow<'a, [u8]>,
    },
    /// Run a program (`argv[0]`) with arguments, no shell.
    Exec {
        /// Program and arguments.
        argv: Vec<Cow<'a, str>>,
    },
    /// Reboot the device; the queue suspends until the agent reports back from a new boot.
    Reboot,
    /// Send a configuration report.
    Report,
    /// A/B update, before its reboot: the agent records an update of the slot it does not
    /// run (its ledger: from, to, deadline) and makes the bootloader try that slot once.
    /// Must be followed by `Reboot` in the same command.
    SlotSwitch {
        /// Seconds from the reboot to a healthy new slot; 0: the device's own
        /// `health_deadline_secs`. The gateway's reboot deadline for the command too.
        deadline_secs: u32,
    },
    /// A/B update, after its reboot: the agent checks the running slot and the health check,
    /// and makes the new slot the default (ok) or rolls back (failed, with the reason).
    SlotCommit,
}

impl<'a> Step<'a> {
    /// The step's code on the wire.
    pub fn code(&self) -> u8 {
        match self {
            Step::Fetch { .. } => 1,
            Step::Verify { .. } => 2,
            Step::Write { .. } => 3,
            Step::Exec { .. } => 4,
            Step::Reboot => 5,
            Step::Report => 6,
            Step::SlotSwitch { .. } => 7,
            Step::SlotCommit => 8,
        }
    }

    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u8(self.code())?;
        match self {
            Step::Fetch { url, path } => {
                s.str16(url, MAX_PATH)?;
                s.str16(path, MAX_PATH)
            }
            Step::Verify { path, sha256 } => {
                s.str16(path, MAX_PATH)?;
                s.put(sha256)
            }
            Step::Write {
                path,
                mode,
                contents,
            } => {
                s.str16(path, MAX_PATH)?;
                s.u32(*mode)?;
                s.bytes32(contents, MAX_WRITE)
            }
            Step::Exec { argv } => {
                s.count(argv.len(), MAX_ARGV)?;
                argv.iter().try_for_each(|a| s.str16(a, MAX_PATH))
            }
            Step::SlotSwitch { deadline_secs } => s.u32(*deadline_secs),
            Step::Reboot | Step::Report | Step::SlotCommit => Ok(()),
        }
    }

    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self> {
        Ok(match r.u8()? {
            1 => Step::Fetch {
                url: borrowed_str16(r, MAX_PATH)?,
                path: borrowed_str16(r, MAX_PATH)?,
            },
            2 => Step::Verify {
                path: borrowed_str16(r, MAX_PATH)?,
                sha256: r.array()?,
            },
            3 => Step::Write {
                path: borrowed_str16(r, MAX_PATH)?,
                mode: r.u32()?,
                contents: Cow::Borrowed(r.bytes32(MAX_WRITE)?),
            },
            4 => {
                let n = r.count(MAX_ARGV, 2)?;
                let mut argv = Vec::with_capacity(n);
                for _ in 0..n {
                    argv.push(borrowed_str16(r, MAX_PATH)?);
                }
                Step::Exec { argv }
            }
            5 => Step::Reboot,
            6 => Step::Report,
            7 => Step::SlotSwitch {
                deadline_secs: r.u32()?,
            },
            8 => Step::SlotCommit,
            _ => return Err(Error::InvalidValue),
        })
    }
}

/// `Dispatch`: one command for the agent to execute (gateway → agent).
///
/// Fields: `command_id u64`, `seq u64`, `attempt u32`, `timeout_ms u32`, `steps list<Step>`,
/// `target opt<Target>` (wire version 3).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Dispatch<'a> {
    /// Gateway-wide command id.
    pub command_id: u64,
    /// Position in this device's queue; strictly increasing per device.
    pub seq: u64,
    /// Which attempt of the command this is (1, 2, …; strictly increasing per command, also
    /// across an operator's retry). A dispatch with the `(seq, attempt)` the agent already
    /// executed is a redelivery and never runs again; a higher attempt is a deliberate retry.
    pub attempt: u32,
    /// The whole operation's time limit on the device (0: none).
    pub timeout_ms: u32,
    /// The operation's component steps, run in order.
    pub steps: Vec<Step<'a>>,
    /// The attached device the steps operate on: the agent runs none of them unless its
    /// report lists it.
    pub target: Option<Target<'a>>,
}

impl<'a> Dispatch<'a> {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.command_id)?;
        s.u64(self.seq)?;
        s.u32(self.attempt)?;
        s.u32(self.timeout_ms)?;
        s.count(self.steps.len(), MAX_STEPS)?;
        self.steps.iter().try_for_each(|st| st.encode(s))?;
        s.present(self.target.is_some())?;
        match &self.target {
            Some(t) => t.encode(s),
            None => Ok(()),
        }
    }
    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self> {
        let command_id = r.u64()?;
        let seq = r.u64()?;
        let attempt = r.u32()?;
        let timeout_ms = r.u32()?;
        let n = r.count(MAX_STEPS, 1)?;
        let mut steps = Vec::with_capacity(n);
        for _ in 0..n {
            steps.push(Step::decode(r)?);
        }
        let target = match r.present()? {
            true => Some(Target::decode(r)?),
            false => None,
        };
        Ok(Dispatch {
            command_id,
            seq,
            attempt,
            timeout_ms,
            steps,
            target,
        })
    }
}

wire_enum! {
    /// Outcome of one step.
    StepStatus { Ok = 0, Failed = 1, Skipped = 2, TimedOut = 3 }
}

/// Outcome of one step inside a [`CommandResult`].
///
/// Fields: `status u8`, `exit_code i32`, `duration_ms u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct StepResult {
    /// What happened.
    pub status: StepStatus,
    /// Exit code for `exec` steps; 0 otherwise on success.
    pub exit_code: i32,
    /// How long the step ran.
    pub duration_ms: u32,
}

/// `Result`: the outcome of a dispatched command (agent → gateway; also inside [`Hello`]).
///
/// Fields: `command_id u64`, `seq u64`, `attempt u32`, `exit_code i32`,
/// `steps list<StepResult>`, `output bytes16` (≤ [`MAX_OUTPUT`]), `report opt<ConfigReport>`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct CommandResult<'a> {
    /// The command's gateway-wide id.
    pub command_id: u64,
    /// The command's queue sequence number.
    pub seq: u64,
    /// The attempt this is the result of ([`Dispatch::attempt`]).
    pub attempt: u32,
    /// Overall exit code (first failing step's, or 0).
    pub exit_code: i32,
    /// Per-step outcomes, in step order (steps not reached are `Skipped`).
    pub steps: Vec<StepResult>,
    /// The tail of the combined output.
    pub output: Cow<'a, [u8]>,
    /// The configuration report of the command's last successful `report` step: it travels
    /// with the result, so it is delivered exactly when the result is.
    pub report: Option<ConfigReport<'a>>,
}

impl<'a> CommandResult<'a> {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.command_id)?;
        s.u64(self.seq)?;
        s.u32(self.attempt)?;
        s.i32(self.exit_code)?;
        s.count(self.steps.len(), MAX_STEPS)?;
        for st in &self.steps {
            s.u8(st.status as u8)?;
            s.i32(st.exit_code)?;
            s.u32(st.duration_ms)?;
        }
        s.bytes16(&self.output, MAX_OUTPUT)?;
        s.present(self.report.is_some())?;
        match &self.report {
            Some(rep) => rep.encode(s),
            None => Ok(()),
        }
    }
    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self> {
        Self::decode_with(r, ConfigReport::decode)
    }

    /// Decodes exactly `bytes` in the layout of wire version 2, whose report lacked what
    /// version 3 added (see [`ConfigReport::decode_v2`]). For records kept before version 3.
    pub fn decode_v2_exact(bytes: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let v = Self::decode_with(&mut r, ConfigReport::decode_v2)?;
        r.finish()?;
        Ok(v)
    }

    fn decode_with(
        r: &mut Reader<'a>,
        report: fn(&mut Reader<'a>) -> Result<ConfigReport<'a>>,
    ) -> Result<Self> {
        let command_id = r.u64()?;
        let seq = r.u64()?;
        let attempt = r.u32()?;
        let exit_code = r.i32()?;
        let n = r.count(MAX_STEPS, 9)?;
        let mut steps = Vec::with_capacity(n);
        for _ in 0..n {
            steps.push(StepResult {
                status: StepStatus::from_u8(r.u8()?)?,
                exit_code: r.i32()?,
                duration_ms: r.u32()?,
            });
        }
        let output = borrowed_bytes16(r, MAX_OUTPUT)?;
        let report = if r.present()? { Some(report(r)?) } else { None };
        Ok(CommandResult {
            command_id,
            seq,
            attempt,
            exit_code,
            steps,
            output,
            report,
        })
    }
}

/// `ResultAck`: the gateway has durably stored the result of `seq` (gateway → agent).
///
/// Fields: `seq u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct ResultAck {
    /// The acknowledged command sequence number.
    pub seq: u64,
}

/// `RebootStarting`: the agent is about to reboot for command `seq` (agent → gateway).
///
/// Fields: `command_id u64`, `seq u64`, `boot_id [16]` (the boot being left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct RebootStarting {
    /// The reboot command's gateway-wide id.
    pub command_id: u64,
    /// The reboot command's queue sequence number.
    pub seq: u64,
    /// The boot id before the reboot.
    pub boot_id: [u8; 16],
}

impl RebootStarting {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u64(self.command_id)?;
        s.u64(self.seq)?;
        s.put(&self.boot_id)
    }
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(RebootStarting {
            command_id: r.u64()?,
            seq: r.u64()?,
            boot_id: r.array()?,
        })
    }
}

/// `RebootComplete`: first message after [`Hello`] on the session that follows a reboot
/// (agent → gateway).
///
/// Fields: `seq u64` (the reboot command), `report ConfigReport`, `result CommandResult`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct RebootComplete<'a> {
    /// The reboot command's queue sequence number.
    pub seq: u64,
    /// Configuration after the reboot.
    pub report: ConfigReport<'a>,
    /// The reboot command's result: the real outcomes and output of the steps before the
    /// reboot (kept by the agent across it), the reboot step `Ok`. Its `seq` is `seq`.
    pub result: CommandResult<'a>,
}

/// Why a session is closing. A `u16` on the wire; unknown codes are kept, not rejected, so a
/// newer peer's reason still reaches the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// Orderly close.
    pub const NORMAL: CloseCode = CloseCode(0);
    /// The peer broke the protocol (malformed frame, unexpected message).
    pub const PROTOCOL: CloseCode = CloseCode(1);
    /// No valid credential.
    pub const UNAUTHENTICATED: CloseCode = CloseCode(2);
    /// The device's credential was revoked.
    pub const REVOKED: CloseCode = CloseCode(3);
    /// The device is not enrolled.
    pub const UNKNOWN_DEVICE: CloseCode = CloseCode(4);
    /// The enrolment token is invalid or used.
    pub const BAD_TOKEN: CloseCode = CloseCode(5);
    /// The gateway is overloaded; retry later.
    pub const OVERLOADED: CloseCode = CloseCode(6);
    /// The peer was silent too long.
    pub const TIMEOUT: CloseCode = CloseCode(7);
    /// The gateway is shutting down.
    pub const SHUTDOWN: CloseCode = CloseCode(8);
    /// An internal error on the sender's side.
    pub const INTERNAL: CloseCode = CloseCode(9);
    /// Another gateway of the cell owns the device: the reason is that gateway's address
    /// (`HOST:PORT`), where the agent connects next.
    pub const REDIRECT: CloseCode = CloseCode(10);

    /// A short name for known codes.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            CloseCode::NORMAL => "normal",
            CloseCode::PROTOCOL => "protocol-error",
            CloseCode::UNAUTHENTICATED => "unauthenticated",
            CloseCode::REVOKED => "revoked",
            CloseCode::UNKNOWN_DEVICE => "unknown-device",
            CloseCode::BAD_TOKEN => "bad-token",
            CloseCode::OVERLOADED => "overloaded",
            CloseCode::TIMEOUT => "timeout",
            CloseCode::SHUTDOWN => "shutdown",
            CloseCode::INTERNAL => "internal-error",
            CloseCode::REDIRECT => "redirect",
            _ => return None,
        })
    }
}

/// `Close`: the sender is closing the session (either direction).
///
/// Fields: `code u16`, `reason str16` (≤ [`MAX_REASON`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Close<'a> {
    /// Machine-readable reason.
    pub code: CloseCode,
    /// Human-readable detail.
    pub reason: Cow<'a, str>,
}

impl<'a> Close<'a> {
    pub(crate) fn encode<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u16(self.code.0)?;
        s.str16(&self.reason, MAX_REASON)
    }
    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self> {
        Ok(Close {
            code: CloseCode(r.u16()?),
            reason: borrowed_str16(r, MAX_REASON)?,
        })
    }
}

// `into_owned`: the same message detached from the buffer it was parsed from, to keep in a
// queue, a store record or another thread. Parsing never copies; only this does.

impl Hello<'_> {
    /// This message, owning its strings and bytes.
    pub fn into_owned(self) -> Hello<'static> {
        Hello {
            device_id: self.device_id,
            credential: owned(self.credential),
            agent_version: owned(self.agent_version),
            boot_id: self.boot_id,
            last: self.last.map(LastExecuted::into_owned),
        }
    }
}

impl LastExecuted<'_> {
    /// This value, owning its strings and bytes.
    pub fn into_owned(self) -> LastExecuted<'static> {
        LastExecuted {
            seq: self.seq,
            attempt: self.attempt,
            executing: self.executing,
            result: self.result.map(CommandResult::into_owned),
        }
    }
}

impl Enrol<'_> {
    /// This message, owning its strings and bytes.
    pub fn into_owned(self) -> Enrol<'static> {
        Enrol {
            token: owned(self.token),
            name: owned(self.name),
            spki: owned(self.spki),
        }
    }
}

impl Enrolled<'_> {
    /// This message, owning its bytes.
    pub fn into_owned(self) -> Enrolled<'static> {
        Enrolled {
            device_id: self.device_id,
            certificate: owned(self.certificate),
        }
    }
}

impl Step<'_> {
    /// This step, owning its strings and bytes.
    pub fn into_owned(self) -> Step<'static> {
        match self {
            Step::Fetch { url, path } => Step::Fetch {
                url: owned(url),
                path: owned(path),
            },
            Step::Verify { path, sha256 } => Step::Verify {
                path: owned(path),
                sha256,
            },
            Step::Write {
                path,
                mode,
                contents,
            } => Step::Write {
                path: owned(path),
                mode,
                contents: owned(contents),
            },
            Step::Exec { argv } => Step::Exec {
                argv: owned_list(argv),
            },
            Step::Reboot => Step::Reboot,
            Step::Report => Step::Report,
            Step::SlotSwitch { deadline_secs } => Step::SlotSwitch { deadline_secs },
            Step::SlotCommit => Step::SlotCommit,
        }
    }
}

impl Step<'_> {
    /// This step borrowing from `self` (to encode a kept step without copying it).
    pub fn borrowed(&self) -> Step<'_> {
        match self {
            Step::Fetch { url, path } => Step::Fetch {
                url: Cow::Borrowed(url),
                path: Cow::Borrowed(path),
            },
            Step::Verify { path, sha256 } => Step::Verify {
                path: Cow::Borrowed(path),
                sha256: *sha256,
            },
            Step::Write {
                path,
                mode,
                contents,
            } => Step::Write {
                path: Cow::Borrowed(path),
                mode: *mode,
                contents: Cow::Borrowed(contents),
            },
            Step::Exec { argv } => Step::Exec {
                argv: argv.iter().map(|a| Cow::Borrowed(&**a)).collect(),
            },
            Step::Reboot => Step::Reboot,
            Step::Report => Step::Report,
            Step::SlotSwitch { deadline_secs } => Step::SlotSwitch {
                deadline_secs: *deadline_secs,
            },
            Step::SlotCommit => Step::SlotCommit,
        }
    }
}

impl Dispatch<'_> {
    /// This message, owning its steps' strings and bytes.
    pub fn into_owned(self) -> Dispatch<'static> {
        Dispatch {
            command_id: self.command_id,
            seq: self.seq,
            attempt: self.attempt,
            timeout_ms: self.timeout_ms,
            steps: self.steps.into_iter().map(Step::into_owned).collect(),
            target: self.target.map(Target::into_owned),
        }
    }
}

impl CommandResult<'_> {
    /// This message, owning its output and report.
    pub fn into_owned(self) -> CommandResult<'static> {
        CommandResult {
            command_id: self.command_id,
            seq: self.seq,
            attempt: self.attempt,
            exit_code: self.exit_code,
            steps: self.steps,
            output: owned(self.output),
            report: self.report.map(ConfigReport::into_owned),
        }
    }
}

impl RebootComplete<'_> {
    /// This message, owning its report and result.
    pub fn into_owned(self) -> RebootComplete<'static> {
        RebootComplete {
            seq: self.seq,
            report: self.report.into_owned(),
            result: self.result.into_owned(),
        }
    }
}

impl Close<'_> {
    /// This message, owning its reason.
    pub fn into_owned(self) -> Close<'static> {
        Close {
            code: self.code,
            reason: owned(self.reason),
        }
    }
}
