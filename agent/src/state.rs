//! The agent's durable state: one directory, a few small files, every write atomic.
//!
//! # Files (in the state directory, created with mode 0700)
//! | file        | contents                                                              |
//! |-------------|-----------------------------------------------------------------------|
//! | `device.key`| the device's private key, written by [`crate::tls::DeviceKey::save_pem`] (0600) |
//! | `device.crt`| the enrolled client certificate (PEM)                                 |
//! | `ca.crt`    | the gateway CA certificate (PEM)                                      |
//! | `device_id` | the enrolled device id, decimal; written last, so it is the commit point of enrolment |
//! | `transport` | the name of the transport that last completed a round trip            |
//! | `command`   | the [`CommandRecord`]: what was last executed and what became of it    |
//!
//! Every write goes to a temporary file in the same directory, is fsynced, renamed over the
//! destination and the directory is fsynced ([`fleetcast_os::write_atomic`]): after a crash
//! a file holds either its old or its new contents, never a mix. The `command` file also
//! carries a CRC-32, and a pending result is stored as the exact wire frame of the `Result`
//! message (which has its own CRC), so a file damaged some other way is detected: loading
//! fails with [`StateError::Corrupt`] naming the file, never with a silently wrong state.
//!
//! # Exactly-once execution
//! The gateway dispatches one command at a time; each has a queue sequence number `seq`,
//! strictly increasing per device, and an attempt number, strictly increasing per command
//! (a retry — by the command's policy or by the operator — is a new attempt of the same
//! `seq`). The ledger is keyed by `(seq, attempt)`, ordered lexicographically. The `command`
//! file moves through these states, each transition one atomic file replacement (`k` is
//! `(seq, attempt)`):
//!
//! ```text
//!  (none|Acked|Pending|Rebooting of a k' < k) --record_executing(k)--> Executing(k)
//!  Executing(k) --record_result--> Pending(k, result frame) --ack(≥seq)--> Acked(k)
//!  Executing(k) --record_reboot--> Rebooting(k, old boot id, result so far) --take_reboot--> Acked(k)
//!  Executing(k) --[agent restarts]--> Pending(k, "agent restarted while executing")
//! ```
//!
//! - **Never twice.** `Executing(k)` is durable *before* the first step runs. A dispatch is
//!   only run if its `(seq, attempt)` is greater than every recorded one
//!   ([`State::should_run`]); a re-sent dispatch (the gateway crashed before storing the
//!   result, or the ack was lost) carries the same attempt, finds it already recorded and is
//!   not run again, whether the agent or the gateway restarted in between. A deliberate retry
//!   carries a higher attempt and runs. If the agent dies mid-command, [`State::open`] finds
//!   `Executing(seq)` and turns it into a failed result ("agent restarted while executing",
//!   exit code [`EXIT_AGENT_RESTARTED`]) rather than running the command again: its effects
//!   are unknown, and the operator decides.
//! - **Never lost.** The result is durable (`Pending`) before it is sent, and stays until the
//!   gateway acknowledges it ([`State::ack`]: a `ResultAck`, or `Welcome.acked_seq` on a new
//!   session), which the gateway sends only after *its* store is durable. Until then every
//!   `Hello` carries it ([`State::last_executed`]). A dispatch with a higher `(seq, attempt)`
//!   also settles it: the gateway sends a new command or attempt only once it has stored the
//!   previous result (or given up on that attempt), so it implicitly acknowledges it.
//! - **Reboots.** A reboot step is recorded as `Rebooting(seq, old boot id)` before
//!   `RebootStarting` is sent and before the reboot runs, with the result of the steps before
//!   it (the exact `Result` frame `RebootComplete` carries after the reboot, so their real
//!   outcomes and output survive the reboot). After the restart the driver
//!   compares the boot id: a different one means the reboot happened and `RebootComplete`
//!   is due; [`State::take_reboot`] clears the record once the gateway has it. The same
//!   boot id means the agent restarted before the reboot took place (it died between
//!   recording and rebooting): rebooting again is safe, unlike re-running an arbitrary
//!   command, so the driver may simply reboot.

use std::fs::File;
use std::io::{self, Read as _, Write};
use std::path::{Path, PathBuf};

use fleetcast_os::{write_atomic, Tightened};

use fleetcast_wire::{CommandResult, LastExecuted, Message, StepResult, StepStatus};

use crate::exec::EXIT_AGENT_RESTARTED;

/// Errors of the durable state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A file or the directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A state file exists but its contents are invalid.
    #[error("{path}: corrupt state file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A value to store is not acceptable (e.g. a transport name that is too long).
    #[error("invalid {what}")]
    InvalidValue {
        /// Which value.
        what: &'static str,
    },
    /// `record_executing` for a `(seq, attempt)` not greater than the last recorded one:
    /// running it would run a command (attempt) twice.
    #[error(
        "command seq {seq} attempt {attempt} already executed \
         (last recorded: seq {} attempt {})", last.0, last.1
    )]
    AlreadyExecuted {
        /// The refused sequence number.
        seq: u64,
        /// The refused attempt.
        attempt: u32,
        /// The last recorded `(seq, attempt)`.
        last: (u64, u32),
    },
    /// A transition that needs `Executing(seq)` found another state.
    #[error("command seq {seq} is not the one executing (state: {state})")]
    NotExecuting {
        /// The sequence number given.
        seq: u64,
        /// The current state's name.
        state: &'static str,
    },
    /// `record_executing` while another command is executing.
    #[error("command seq {executing} is still executing")]
    Busy {
        /// The sequence number executing.
        executing: u64,
    },
    /// The result could not be encoded as a wire frame (a field over its wire limit).
    #[error("result does not fit the wire format: {0}")]
    Encode(fleetcast_wire::Error),
}

/// The enrolled identity (the private key lives in [`State::key_path`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The id the gateway assigned.
    pub device_id: u64,
    /// The device's client certificate, PEM.
    pub cert_pem: String,
    /// The gateway CA certificate, PEM.
    pub ca_pem: String,
}

/// The reboot in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebootRecord {
    /// The reboot command's queue sequence number.
    pub seq: u64,
    /// Its attempt.
    pub attempt: u32,
    /// The reboot command's gateway-wide id.
    pub command_id: u64,
    /// The boot id before the reboot: a different current one proves the reboot happened.
    pub old_boot_id: [u8; 16],
}

/// What the agent last executed (the `command` file). See the module doc for transitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandRecord {
    /// Nothing executed yet.
    None,
    /// Steps are running (or were, when the agent died).
    Executing {
        /// Queue sequence number.
        seq: u64,
        /// Attempt number.
        attempt: u32,
        /// Gateway-wide id.
        command_id: u64,
        /// Number of steps (to build a result if the agent dies).
        steps: u16,
    },
    /// A reboot step was reached; the reboot is under way.
    Rebooting {
        /// Which command, and the boot being left.
        reboot: RebootRecord,
        /// The emitted `Result` frame of the command so far (steps before the reboot with their
        /// real outcomes, the reboot step `Ok`); empty in a record of version 1, which had none.
        frame: Vec<u8>,
    },
    /// Finished; the result awaits the gateway's acknowledgement.
    Pending {
        /// Queue sequence number.
        seq: u64,
        /// Attempt number.
        attempt: u32,
        /// Gateway-wide id.
        command_id: u64,
        /// The emitted wire frame of the `Result` message.
        frame: Vec<u8>,
    },
    /// Finished and acknowledged (or the reboot reported).
    Acked {
        /// Queue sequence number.
        seq: u64,
        /// Attempt number.
        attempt: u32,
        /// Gateway-wide id.
        command_id: u64,
    },
}

impl CommandRecord {
    /// The recorded sequence number, if any.
    pub fn seq(&self) -> Option<u64> {
        self.key().map(|(seq, _)| seq)
    }

    /// The recorded `(seq, attempt)`, if any: the ledger's order.
    pub fn key(&self) -> Option<(u64, u32)> {
        match self {
            CommandRecord::None => None,
            CommandRecord::Executing { seq, attempt, .. }
            | CommandRecord::Pending { seq, attempt, .. }
            | CommandRecord::Acked { seq, attempt, .. } => Some((*seq, *attempt)),
            CommandRecord::Rebooting { reboot: r, .. } => Some((r.seq, r.attempt)),
        }
    }

    fn command_id(&self) -> u64 {
        match self {
            CommandRecord::None => 0,
            CommandRecord::Executing { command_id, .. }
            | CommandRecord::Pending { command_id, .. }
            | CommandRecord::Acked { command_id, .. } => *command_id,
            CommandRecord::Rebooting { reboot: r, .. } => r.command_id,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            CommandRecord::None => "none",
            CommandRecord::Executing { .. } => "executing",
            CommandRecord::Rebooting { .. } => "rebooting",
            CommandRecord::Pending { .. } => "pending",
            CommandRecord::Acked { .. } => "acked",
        }
    }
}

const KEY_FILE: &str = "device.key";
const CERT_FILE: &str = "device.crt";
const CA_FILE: &str = "ca.crt";
const DEVICE_ID_FILE: &str = "device_id";
const TRANSPORT_FILE: &str = "transport";
const COMMAND_FILE: &str = "command";

/// Longest transport name stored.
pub const MAX_TRANSPORT: usize = 64;

/// `command` file: magic, version, tag, seq, command_id, attempt, body, CRC-32 (big-endian).
/// Version 1 had no attempt (read as attempt 0, the gateway's number for commands sent
/// before attempts existed) and held wire-version-1 result frames (converted when read).
const MAGIC: &[u8; 4] = b"FCCR";
const VERSION: u8 = 2;
const VERSION_1: u8 = 1;
const TAG_EXECUTING: u8 = 1;
const TAG_REBOOTING: u8 = 2;
const TAG_PENDING: u8 = 3;
const TAG_ACKED: u8 = 4;
/// Bytes before the per-state body.
const FIXED: usize = 4 + 1 + 1 + 8 + 8 + 4;
/// The same in version 1 (no attempt).
const FIXED_V1: usize = 4 + 1 + 1 + 8 + 8;
/// The largest `command` file accepted: a result frame (with its configuration report) is
/// at most a stream frame.
const MAX_COMMAND_FILE: u64 = fleetcast_wire::header::MAX_STREAM_BODY as u64 + 4096;

/// The agent's state directory, with the command record cached in memory.
#[derive(Debug)]
pub struct State {
    dir: PathBuf,
    command: CommandRecord,
    interrupted: Option<u64>,
}

impl State {
    /// Opens (creating it with mode 0700 if needed) the state directory and loads the
    /// command record. A command found `Executing` (the agent died while running it) is
    /// turned into a durable failed result; [`State::interrupted`] then names its `seq`.
    ///
    /// The directory holds the device key and the commands' progress: it is made exactly
    /// 0700 whatever the umask, and an existing one open to group or others is tightened to
    /// 0700 (with a line on stderr naming the old mode).
    pub fn open(dir: &Path) -> Result<State, StateError> {
        if let Tightened::From(mode) = fleetcast_os::private_dir(dir).map_err(|e| io_err(dir, e))? {
            // Lost, not a panic, if stderr cannot be written.
            let _ = writeln!(
                io::stderr(),
                "fleetcast-agent: state directory {} was mode {mode:03o}, open to other \
                 users: it is now 0700",
                dir.display()
            );
        }
        let mut state = State {
            dir: dir.to_owned(),
            command: CommandRecord::None,
            interrupted: None,
        };
        state.command = state.load_command()?;
        if let CommandRecord::Executing {
            seq,
            attempt,
            command_id,
            steps,
        } = state.command
        {
            let message = format!(
                "fleetcast-agent: agent restarted while executing seq {seq}; \
                 the command was not run again and its effects are unknown\n"
            );
            let result = CommandResult {
                command_id,
                seq,
                attempt,
                exit_code: EXIT_AGENT_RESTARTED,
                steps: vec![
                    StepResult {
                        status: StepStatus::Failed,
                        exit_code: EXIT_AGENT_RESTARTED,
                        duration_ms: 0,
                    };
                    usize::from(steps)
                ],
                output: message.as_bytes().into(),
                report: None,
            };
            state.record_result(&result)?;
            state.interrupted = Some(seq);
        }
        Ok(state)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the device key lives (read and written by [`crate::tls::DeviceKey`]).
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    /// Where the device certificate lives.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }

    /// Where the gateway CA certificate lives.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(CA_FILE)
    }

    /// The `seq` of a command found executing at [`State::open`] (its failed result is now
    /// pending).
    pub fn interrupted(&self) -> Option<u64> {
        self.interrupted
    }

    /// Stores the enrolled identity: certificates first, the device id last (its presence
    /// marks a complete enrolment).
    pub fn save_identity(&self, id: &Identity) -> Result<(), StateError> {
        check_cert_pem(&self.cert_path(), id.cert_pem.as_bytes()).map_err(|_| {
            StateError::InvalidValue {
                what: "certificate PEM",
            }
        })?;
        check_cert_pem(&self.ca_path(), id.ca_pem.as_bytes())
            .map_err(|_| StateError::InvalidValue { what: "CA PEM" })?;
        self.write(CERT_FILE, id.cert_pem.as_bytes(), 0o644)?;
        self.write(CA_FILE, id.ca_pem.as_bytes(), 0o644)?;
        self.write(
            DEVICE_ID_FILE,
            format!("{}\n", id.device_id).as_bytes(),
            0o644,
        )
    }

    /// Loads the enrolled identity; `None` when the device is not enrolled.
    pub fn load_identity(&self) -> Result<Option<Identity>, StateError> {
        let id_path = self.dir.join(DEVICE_ID_FILE);
        let Some(text) = read_optional(&id_path, 64)? else {
            return Ok(None);
        };
        let device_id = std::str::from_utf8(&text)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .ok_or_else(|| corrupt(&id_path, "not a decimal device id"))?;
        let cert_pem = read_pem(&self.cert_path())?;
        let ca_pem = read_pem(&self.ca_path())?;
        Ok(Some(Identity {
            device_id,
            cert_pem,
            ca_pem,
        }))
    }

    /// Remembers the transport that last completed a round trip (≤ [`MAX_TRANSPORT`]
    /// printable ASCII characters).
    pub fn save_transport(&self, name: &str) -> Result<(), StateError> {
        if !valid_transport(name.as_bytes()) {
            return Err(StateError::InvalidValue {
                what: "transport name",
            });
        }
        self.write(TRANSPORT_FILE, name.as_bytes(), 0o644)
    }

    /// The transport that last worked, if one was recorded.
    pub fn load_transport(&self) -> Result<Option<String>, StateError> {
        let path = self.dir.join(TRANSPORT_FILE);
        let Some(bytes) = read_optional(&path, MAX_TRANSPORT as u64 + 1)? else {
            return Ok(None);
        };
        if !valid_transport(&bytes) {
            return Err(corrupt(&path, "not a transport name"));
        }
        Ok(Some(String::from_utf8(bytes).expect("checked ASCII")))
    }

    /// The command record.
    pub fn command(&self) -> &CommandRecord {
        &self.command
    }

    /// Whether a dispatch of attempt `attempt` of command `seq` may run: its `(seq, attempt)`
    /// must be newer than every recorded one. One that may not run is a redelivery: answer it
    /// with [`State::pending_frame`] (or nothing, when already acknowledged).
    pub fn should_run(&self, seq: u64, attempt: u32) -> bool {
        self.command.key().is_none_or(|last| (seq, attempt) > last)
    }

    /// Records, durably, that attempt `attempt` of command `seq` is about to run. Call before
    /// the first step.
    pub fn record_executing(
        &mut self,
        seq: u64,
        attempt: u32,
        command_id: u64,
        steps: usize,
    ) -> Result<(), StateError> {
        if let CommandRecord::Executing { seq: executing, .. } = self.command {
            return Err(StateError::Busy { executing });
        }
        if let Some(last) = self.command.key() {
            if (seq, attempt) <= last {
                return Err(StateError::AlreadyExecuted { seq, attempt, last });
            }
        }
        let steps =
            u16::try_from(steps).map_err(|_| StateError::InvalidValue { what: "step count" })?;
        self.set_command(CommandRecord::Executing {
            seq,
            attempt,
            command_id,
            steps,
        })
    }

    /// Records the result of the executing command (before it is sent).
    pub fn record_result(&mut self, result: &CommandResult<'_>) -> Result<(), StateError> {
        self.expect_executing(result.seq, result.attempt, result.command_id)?;
        let frame = emit_result(result)?;
        self.set_command(CommandRecord::Pending {
            seq: result.seq,
            attempt: result.attempt,
            command_id: result.command_id,
            frame,
        })
    }

    /// The gateway has durably stored results up to `seq`: forget a pending result whose
    /// `seq` is not above it. Returns whether one was cleared.
    pub fn ack(&mut self, seq: u64) -> Result<bool, StateError> {
        match self.command {
            CommandRecord::Pending {
                seq: pending,
                attempt,
                command_id,
                ..
            } if pending <= seq => {
                self.set_command(CommandRecord::Acked {
                    seq: pending,
                    attempt,
                    command_id,
                })?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Records that the executing command reached a reboot step, with the boot id being left
    /// and the command's result so far (`result`, which must be the executing command's).
    /// Call before sending `RebootStarting` and before rebooting.
    pub fn record_reboot(
        &mut self,
        record: RebootRecord,
        result: &CommandResult<'_>,
    ) -> Result<(), StateError> {
        self.expect_executing(record.seq, record.attempt, record.command_id)?;
        if (result.seq, result.attempt, result.command_id)
            != (record.seq, record.attempt, record.command_id)
        {
            return Err(StateError::NotExecuting {
                seq: result.seq,
                state: self.command.name(),
            });
        }
        let frame = emit_result(result)?;
        self.set_command(CommandRecord::Rebooting {
            reboot: record,
            frame,
        })
    }

    /// The reboot in progress, if any.
    pub fn reboot(&self) -> Option<RebootRecord> {
        match self.command {
            CommandRecord::Rebooting { reboot, .. } => Some(reboot),
            _ => None,
        }
    }

    /// The result of the rebooting command's steps before the reboot, as recorded with it;
    /// `None` for a record written by a version-1 agent, which kept none.
    pub fn reboot_result(&self) -> Option<CommandResult<'_>> {
        match &self.command {
            CommandRecord::Rebooting { frame, .. } if !frame.is_empty() => parse_frame(frame).ok(),
            _ => None,
        }
    }

    /// Ends the reboot in progress (the gateway has the `RebootComplete`), returning it.
    pub fn take_reboot(&mut self) -> Result<Option<RebootRecord>, StateError> {
        let Some(r) = self.reboot() else {
            return Ok(None);
        };
        self.set_command(CommandRecord::Acked {
            seq: r.seq,
            attempt: r.attempt,
            command_id: r.command_id,
        })?;
        Ok(Some(r))
    }

    /// The emitted `Result` frame awaiting acknowledgement: send it as is.
    pub fn pending_frame(&self) -> Option<&[u8]> {
        match &self.command {
            CommandRecord::Pending { frame, .. } => Some(frame),
            _ => None,
        }
    }

    /// The result awaiting acknowledgement, parsed from its stored frame.
    pub fn pending_result(&self) -> Option<CommandResult<'_>> {
        // Checked when the frame was loaded or emitted.
        parse_frame(self.pending_frame()?).ok()
    }

    /// What `Hello.last` should carry: the last recorded command and attempt, whether it is
    /// still executing (or rebooting), and its result while unacknowledged.
    pub fn last_executed(&self) -> Option<LastExecuted<'_>> {
        let (seq, attempt) = self.command.key()?;
        Some(LastExecuted {
            seq,
            attempt,
            executing: matches!(
                self.command,
                CommandRecord::Executing { .. } | CommandRecord::Rebooting { .. }
            ),
            result: self.pending_result(),
        })
    }

    fn expect_executing(&self, seq: u64, attempt: u32, command_id: u64) -> Result<(), StateError> {
        match self.command {
            CommandRecord::Executing {
                seq: s,
                attempt: a,
                command_id: c,
                ..
            } if s == seq && a == attempt && c == command_id => Ok(()),
            _ => Err(StateError::NotExecuting {
                seq,
                state: self.command.name(),
            }),
        }
    }

    fn set_command(&mut self, record: CommandRecord) -> Result<(), StateError> {
        let bytes = encode_command(&record);
        self.write(COMMAND_FILE, &bytes, 0o600)?;
        self.command = record;
        Ok(())
    }

    fn load_command(&self) -> Result<CommandRecord, StateError> {
        let path = self.dir.join(COMMAND_FILE);
        match read_optional(&path, MAX_COMMAND_FILE)? {
            None => Ok(CommandRecord::None),
            Some(bytes) => decode_command(&bytes).map_err(|reason| corrupt(&path, reason)),
        }
    }

    fn write(&self, name: &str, bytes: &[u8], mode: u32) -> Result<(), StateError> {
        let path = self.dir.join(name);
        write_atomic(&path, bytes, mode).map_err(|e| io_err(&path, e))
    }
}

fn encode_command(record: &CommandRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    let Some((seq, attempt)) = record.key() else {
        return out;
    };
    let tag = match record {
        CommandRecord::None => return out,
        CommandRecord::Executing { .. } => TAG_EXECUTING,
        CommandRecord::Rebooting { .. } => TAG_REBOOTING,
        CommandRecord::Pending { .. } => TAG_PENDING,
        CommandRecord::Acked { .. } => TAG_ACKED,
    };
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(tag);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&record.command_id().to_be_bytes());
    out.extend_from_slice(&attempt.to_be_bytes());
    match record {
        CommandRecord::Executing { steps, .. } => out.extend_from_slice(&steps.to_be_bytes()),
        CommandRecord::Rebooting { reboot, frame } => {
            out.extend_from_slice(&reboot.old_boot_id);
            let len = u32::try_from(frame.len()).expect("a result frame is far below 4 GiB");
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(frame);
        }
        CommandRecord::Pending { frame, .. } => {
            let len = u32::try_from(frame.len()).expect("a result frame is far below 4 GiB");
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(frame);
        }
        CommandRecord::None | CommandRecord::Acked { .. } => {}
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn decode_command(bytes: &[u8]) -> Result<CommandRecord, &'static str> {
    let Some((content, crc)) = bytes.split_last_chunk::<4>() else {
        return Err("truncated");
    };
    if content.len() < FIXED_V1 {
        return Err("truncated");
    }
    if &content[..4] != MAGIC {
        return Err("bad magic");
    }
    if crc32fast::hash(content) != u32::from_be_bytes(*crc) {
        return Err("checksum mismatch");
    }
    let version = content[4];
    let fixed = match version {
        VERSION if content.len() >= FIXED => FIXED,
        VERSION => return Err("truncated"),
        VERSION_1 => FIXED_V1,
        _ => return Err("unknown version"),
    };
    let tag = content[5];
    let seq = u64::from_be_bytes(content[6..14].try_into().expect("8 bytes"));
    let command_id = u64::from_be_bytes(content[14..22].try_into().expect("8 bytes"));
    let attempt = match version {
        VERSION => u32::from_be_bytes(content[22..26].try_into().expect("4 bytes")),
        // Before attempts: the gateway numbers such commands' attempt 0 too.
        _ => 0,
    };
    let body = &content[fixed..];
    let record = match tag {
        TAG_EXECUTING => {
            let steps: [u8; 2] = body.try_into().map_err(|_| "bad executing record")?;
            CommandRecord::Executing {
                seq,
                attempt,
                command_id,
                steps: u16::from_be_bytes(steps),
            }
        }
        TAG_REBOOTING => {
            let (old_boot_id, rest) = body
                .split_first_chunk::<16>()
                .ok_or("bad rebooting record")?;
            let frame = match version {
                VERSION => {
                    let (len, frame) = rest
                        .split_first_chunk::<4>()
                        .ok_or("bad rebooting record")?;
                    if u32::from_be_bytes(*len) as usize != frame.len() {
                        return Err("bad rebooting record length");
                    }
                    match parse_frame(frame) {
                        Ok(r)
                            if r.seq == seq
                                && r.command_id == command_id
                                && r.attempt == attempt => {}
                        Ok(_) => return Err("rebooting frame is not this command's result"),
                        Err(_) => return Err("rebooting result frame does not parse"),
                    }
                    frame.to_vec()
                }
                _ if rest.is_empty() => Vec::new(),
                _ => return Err("bad rebooting record"),
            };
            CommandRecord::Rebooting {
                reboot: RebootRecord {
                    seq,
                    attempt,
                    command_id,
                    old_boot_id: *old_boot_id,
                },
                frame,
            }
        }
        TAG_PENDING => {
            let (len, frame) = body.split_first_chunk::<4>().ok_or("bad pending record")?;
            if u32::from_be_bytes(*len) as usize != frame.len() {
                return Err("bad pending record length");
            }
            let frame = match version {
                VERSION => frame.to_vec(),
                _ => upgrade_v1_result(frame).ok_or("pending result frame does not parse")?,
            };
            match parse_frame(&frame) {
                Ok(r) if r.seq == seq && r.command_id == command_id && r.attempt == attempt => {}
                Ok(_) => return Err("pending frame is not this command's result"),
                Err(e) => return Err(e),
            }
            CommandRecord::Pending {
                seq,
                attempt,
                command_id,
                frame,
            }
        }
        TAG_ACKED if body.is_empty() => CommandRecord::Acked {
            seq,
            attempt,
            command_id,
        },
        TAG_ACKED => return Err("bad acked record"),
        _ => return Err("unknown record tag"),
    };
    Ok(record)
}

/// Emits a result as the `Result` frame the ledger stores.
fn emit_result(result: &CommandResult<'_>) -> Result<Vec<u8>, StateError> {
    let msg = Message::Result(result.clone());
    let len = msg.buffer_len().map_err(StateError::Encode)?;
    let mut frame = vec![0u8; len];
    msg.emit(&mut frame).map_err(StateError::Encode)?;
    Ok(frame)
}

/// Parses a stored `Result` frame: one whole stream frame (a result with its report may be far
/// larger than a datagram).
fn parse_frame(frame: &[u8]) -> Result<CommandResult<'_>, &'static str> {
    let parsed =
        fleetcast_wire::Frame::parse_prefix(frame, fleetcast_wire::header::MAX_STREAM_BODY)
            .ok()
            .filter(|(_, rest)| rest.is_empty())
            .and_then(|(f, _)| Message::parse(&f).ok());
    match parsed {
        Some(Message::Result(r)) => Ok(r),
        Some(_) => Err("pending frame is not this command's result"),
        None => Err("pending result frame does not parse"),
    }
}

/// Re-emits a `Result` frame of wire version 1 (what a version-1 `command` file holds) as
/// the current version: attempt 0, no report. `None` if it is not a valid version-1 `Result`
/// frame. Version 1 body: `command_id u64, seq u64, exit_code i32, steps list<(status u8,
/// exit_code i32, duration_ms u32)>, output bytes16`.
fn upgrade_v1_result(frame: &[u8]) -> Option<Vec<u8>> {
    use fleetcast_wire::msg::limits::{MAX_OUTPUT, MAX_STEPS};
    const V1_RESULT: [u8; 4] = [
        fleetcast_wire::MAGIC,
        1,
        fleetcast_wire::Kind::Result as u8,
        0,
    ];
    let (header, body) = frame.split_at_checked(fleetcast_wire::HEADER_LEN)?;
    if header[..4] != V1_RESULT
        || u32::from_be_bytes(header[4..8].try_into().ok()?) as usize != body.len()
    {
        return None;
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[..8]);
    crc.update(body);
    if crc.finalize().to_be_bytes() != header[8..12] {
        return None;
    }
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let b = body.get(at..at.checked_add(n)?)?;
        at += n;
        Some(b)
    };
    let u64_at = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    let u32_at = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes"));
    let command_id = u64_at(take(8)?);
    let seq = u64_at(take(8)?);
    let exit_code = u32_at(take(4)?) as i32;
    let n = usize::from(u16::from_be_bytes(take(2)?.try_into().ok()?));
    if n > MAX_STEPS {
        return None;
    }
    let mut steps = Vec::with_capacity(n);
    for _ in 0..n {
        let st = take(9)?;
        let status = match st[0] {
            0 => StepStatus::Ok,
            1 => StepStatus::Failed,
            2 => StepStatus::Skipped,
            3 => StepStatus::TimedOut,
            _ => return None,
        };
        steps.push(StepResult {
            status,
            exit_code: u32_at(&st[1..5]) as i32,
            duration_ms: u32_at(&st[5..9]),
        });
    }
    let len = usize::from(u16::from_be_bytes(take(2)?.try_into().ok()?));
    if len > MAX_OUTPUT {
        return None;
    }
    let output = take(len)?;
    if at != body.len() {
        return None;
    }
    let msg = Message::Result(CommandResult {
        command_id,
        seq,
        attempt: 0,
        exit_code,
        steps,
        output: output.into(),
        report: None,
    });
    let mut out = Vec::new();
    msg.emit_to_vec(&mut out).ok()?;
    Some(out)
}

fn valid_transport(name: &[u8]) -> bool {
    !name.is_empty() && name.len() <= MAX_TRANSPORT && name.iter().all(u8::is_ascii_graphic)
}

fn check_cert_pem(path: &Path, pem: &[u8]) -> Result<(), StateError> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::from_pem_slice(pem)
        .map(drop)
        .map_err(|_| corrupt(path, "no PEM CERTIFICATE section"))
}

fn read_pem(path: &Path) -> Result<String, StateError> {
    let bytes = read_optional(path, 64 * 1024)?.ok_or_else(|| {
        io_err(
            path,
            io::Error::new(
                io::ErrorKind::NotFound,
                "enrolment incomplete: file missing",
            ),
        )
    })?;
    check_cert_pem(path, &bytes)?;
    String::from_utf8(bytes).map_err(|_| corrupt(path, "not UTF-8"))
}

/// Reads a whole file of at most `max` bytes; `None` if it does not exist.
fn read_optional(path: &Path, max: u64) -> Result<Option<Vec<u8>>, StateError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, e)),
    };
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_err(path, e))?;
    if bytes.len() as u64 > max {
        return Err(corrupt(path, "file too large"));
    }
    Ok(Some(bytes))
}

fn io_err(path: &Path, source: io::Error) -> StateError {
    StateError::Io {
        path: path.to_owned(),
        source,
    }
}

fn corrupt(path: &Path, reason: &'static str) -> StateError {
    StateError::Corrupt {
        path: path.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, Permissions};
    use std::os::unix::fs::PermissionsExt as _;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n";

    fn result(seq: u64, command_id: u64) -> CommandResult<'static> {
        CommandResult {
            command_id,
            seq,
            attempt: 1,
            exit_code: 3,
            steps: vec![StepResult {
                status: StepStatus::Failed,
                exit_code: 3,
                duration_ms: 12,
            }],
            output: b"hi\n".into(),
            report: None,
        }
    }

    #[test]
    fn an_open_state_directory_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, Permissions::from_mode(0o755)).unwrap();
        State::open(&d).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o7777,
            0o700
        );
    }

    #[test]
    fn identity_and_transport_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(&dir.path().join("state")).unwrap();
        assert_eq!(
            fs::metadata(s.dir()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(s.load_identity().unwrap(), None);
        assert_eq!(s.load_transport().unwrap(), None);
        let id = Identity {
            device_id: 42,
            cert_pem: CERT.into(),
            ca_pem: CERT.into(),
        };
        s.save_identity(&id).unwrap();
        s.save_transport("tls-443").unwrap();
        let s = State::open(s.dir()).unwrap();
        assert_eq!(s.load_identity().unwrap(), Some(id));
        assert_eq!(s.load_transport().unwrap().as_deref(), Some("tls-443"));
        assert!(matches!(
            s.save_transport("has space"),
            Err(StateError::InvalidValue { .. })
        ));
        assert_eq!(s.key_path(), s.dir().join("device.key"));
    }

    #[test]
    fn result_lifecycle_round_trips_through_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        assert!(s.last_executed().is_none());
        assert!(s.should_run(1, 1));
        s.record_executing(7, 1, 700, 1).unwrap();
        assert!(!s.should_run(7, 1));
        s.record_result(&result(7, 700)).unwrap();

        let mut s = State::open(dir.path()).unwrap();
        assert_eq!(s.interrupted(), None);
        assert_eq!(s.pending_result(), Some(result(7, 700)));
        let last = s.last_executed().unwrap();
        assert_eq!((last.seq, last.result), (7, Some(result(7, 700))));
        // A re-sent dispatch of seq 7 must not run again.
        assert!(!s.should_run(7, 1));
        assert!(matches!(
            s.record_executing(7, 1, 700, 1),
            Err(StateError::AlreadyExecuted {
                seq: 7,
                attempt: 1,
                last: (7, 1)
            })
        ));
        assert!(!s.ack(6).unwrap());
        assert!(s.ack(7).unwrap());
        assert!(!s.ack(7).unwrap());

        let s = State::open(dir.path()).unwrap();
        assert_eq!(
            *s.command(),
            CommandRecord::Acked {
                seq: 7,
                attempt: 1,
                command_id: 700
            }
        );
        let last = s.last_executed().unwrap();
        assert_eq!((last.seq, last.result), (7, None));
        assert!(s.should_run(8, 1));
    }

    #[test]
    fn newer_dispatch_implicitly_acknowledges_and_transitions_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        assert!(matches!(
            s.record_result(&result(1, 10)),
            Err(StateError::NotExecuting { seq: 1, .. })
        ));
        s.record_executing(1, 1, 10, 1).unwrap();
        assert!(matches!(
            s.record_executing(2, 1, 20, 1),
            Err(StateError::Busy { executing: 1 })
        ));
        // A result for another command is refused.
        assert!(matches!(
            s.record_result(&result(1, 11)),
            Err(StateError::NotExecuting { .. })
        ));
        s.record_result(&result(1, 10)).unwrap();
        s.record_executing(2, 1, 20, 1).unwrap();
        assert_eq!(s.pending_frame(), None);
    }

    #[test]
    fn crash_while_executing_becomes_a_failed_result_not_a_rerun() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        s.record_executing(5, 1, 50, 3).unwrap();
        drop(s); // the agent dies here: no result recorded

        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.interrupted(), Some(5));
        assert!(!s.should_run(5, 1));
        let r = s.pending_result().unwrap();
        assert_eq!((r.seq, r.command_id), (5, 50));
        assert_eq!(r.exit_code, EXIT_AGENT_RESTARTED);
        assert_eq!(r.steps.len(), 3);
        assert!(r.steps.iter().all(|st| st.status == StepStatus::Failed));
        assert!(std::str::from_utf8(&r.output)
            .unwrap()
            .contains("agent restarted while executing"));

        // The conversion is durable: a second restart finds the result, not `Executing`.
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.interrupted(), None);
        assert_eq!(s.pending_result().unwrap().seq, 5);
    }

    #[test]
    fn reboot_record_round_trips_and_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        let rec = RebootRecord {
            seq: 9,
            attempt: 1,
            command_id: 90,
            old_boot_id: [7; 16],
        };
        // The steps before the reboot, as they ran: an exec that printed, the reboot itself.
        let before = CommandResult {
            exit_code: 0,
            steps: vec![
                StepResult {
                    status: StepStatus::Ok,
                    exit_code: 0,
                    duration_ms: 830,
                },
                StepResult {
                    status: StepStatus::Ok,
                    exit_code: 0,
                    duration_ms: 0,
                },
            ],
            output: b"kernel installed\n".into(),
            ..result(9, 90)
        };
        assert!(matches!(
            s.record_reboot(rec, &before),
            Err(StateError::NotExecuting { .. })
        ));
        s.record_executing(9, 1, 90, 2).unwrap();
        // Another command's result is refused.
        assert!(matches!(
            s.record_reboot(rec, &result(8, 90)),
            Err(StateError::NotExecuting { seq: 8, .. })
        ));
        s.record_reboot(rec, &before).unwrap();

        // The reboot (a new process): record and result are both still there.
        let mut s = State::open(dir.path()).unwrap();
        assert_eq!(
            s.interrupted(),
            None,
            "a reboot is not an interrupted command"
        );
        assert_eq!(s.reboot(), Some(rec));
        assert_eq!(s.reboot_result(), Some(before));
        assert!(!s.should_run(9, 1));
        assert_eq!(s.take_reboot().unwrap(), Some(rec));
        assert_eq!(s.take_reboot().unwrap(), None);
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.reboot(), None);
        assert_eq!(s.command().seq(), Some(9));
    }

    #[test]
    fn a_higher_attempt_of_the_same_seq_runs_a_redelivery_never_does() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        s.record_executing(5, 1, 50, 1).unwrap();
        let last = s.last_executed().unwrap();
        assert_eq!((last.seq, last.attempt, last.executing), (5, 1, true));
        let mut r1 = result(5, 50);
        r1.exit_code = 3;
        s.record_result(&r1).unwrap();
        assert!(s.ack(5).unwrap());
        // The same attempt again (a redelivery), an older one, an older seq: refused.
        assert!(!s.should_run(5, 1));
        assert!(!s.should_run(5, 0));
        assert!(!s.should_run(4, 9));
        assert!(matches!(
            s.record_executing(5, 1, 50, 1),
            Err(StateError::AlreadyExecuted {
                seq: 5,
                attempt: 1,
                last: (5, 1)
            })
        ));
        // The operator's retry: attempt 2 runs.
        assert!(s.should_run(5, 2));
        s.record_executing(5, 2, 50, 1).unwrap();
        // A result must name the attempt executing.
        assert!(matches!(
            s.record_result(&r1),
            Err(StateError::NotExecuting { seq: 5, .. })
        ));
        drop(s); // the agent dies while running attempt 2

        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.interrupted(), Some(5));
        let r = s.pending_result().unwrap();
        assert_eq!(
            (r.seq, r.attempt, r.exit_code),
            (5, 2, EXIT_AGENT_RESTARTED)
        );
        let last = s.last_executed().unwrap();
        assert_eq!((last.seq, last.attempt, last.executing), (5, 2, false));
        // After the restart, attempt 2 redelivered does not run again; attempt 3 would.
        assert!(!s.should_run(5, 2));
        assert!(s.should_run(5, 3));
        assert!(s.should_run(6, 1));
    }

    #[test]
    fn a_report_inside_a_pending_result_survives_a_restart() {
        use fleetcast_wire::{ConfigReport, Package};
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        s.record_executing(4, 1, 40, 1).unwrap();
        let software: Vec<Package<'_>> = (0..2000)
            .map(|_| Package {
                name: "some-long-package-name-of-a-full-system".into(),
                version: "1:2.34.5-6+deb12u7".into(),
            })
            .collect();
        let report = ConfigReport {
            boot_id: [3; 16],
            os: "Debian GNU/Linux 12".into(),
            kernel: "6.1.0-18-amd64".into(),
            hostname: "n1".into(),
            agent_version: "0.1.0".into(),
            addresses: vec!["10.0.0.2/24".into()],
            software,
        };
        let r = CommandResult {
            report: Some(report),
            ..result(4, 40)
        };
        // A full system's package list is far more than the 64 KiB the file once allowed.
        s.record_result(&r).unwrap();
        let s = State::open(dir.path()).unwrap();
        let last = s.last_executed().unwrap();
        assert_eq!(last.result, Some(r));
    }

    #[test]
    fn hello_says_whether_the_command_is_still_executing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        s.record_executing(2, 3, 20, 2).unwrap();
        assert!(s.last_executed().unwrap().executing);
        let r = CommandResult {
            attempt: 3,
            ..result(2, 20)
        };
        s.record_reboot(
            RebootRecord {
                seq: 2,
                attempt: 3,
                command_id: 20,
                old_boot_id: [1; 16],
            },
            &r,
        )
        .unwrap();
        let s = State::open(dir.path()).unwrap();
        let last = s.last_executed().unwrap();
        assert_eq!((last.seq, last.attempt, last.executing), (2, 3, true));
        assert!(last.result.is_none());
    }

    /// A `command` file of version 1: `FCCR`, 1, tag, seq, command id, body, CRC-32.
    fn v1_file(tag: u8, seq: u64, command_id: u64, body: &[u8]) -> Vec<u8> {
        let mut out = b"FCCR".to_vec();
        out.push(1);
        out.push(tag);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&command_id.to_be_bytes());
        out.extend_from_slice(body);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// A `Result` frame of wire version 1, built by hand from docs/wire.md of version 1.
    fn v1_result_frame(seq: u64, command_id: u64) -> Vec<u8> {
        let mut body = command_id.to_be_bytes().to_vec();
        body.extend_from_slice(&seq.to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(&1u16.to_be_bytes());
        body.push(1); // failed
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(&12u32.to_be_bytes());
        body.extend_from_slice(&3u16.to_be_bytes());
        body.extend_from_slice(b"hi\n");
        let mut frame = vec![0xFC, 1, 0x11, 0];
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&frame);
        crc.update(&body);
        frame.extend_from_slice(&crc.finalize().to_be_bytes());
        frame.extend_from_slice(&body);
        frame
    }

    #[test]
    fn a_version_1_ledger_is_read_as_attempt_0_and_keeps_its_pending_result() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(COMMAND_FILE);
        let frame = v1_result_frame(7, 700);
        let mut body = (frame.len() as u32).to_be_bytes().to_vec();
        body.extend_from_slice(&frame);
        fs::write(&path, v1_file(TAG_PENDING, 7, 700, &body)).unwrap();
        let mut s = State::open(dir.path()).unwrap();
        // The result an agent upgraded with a pending result still has, as the current wire
        // version, attempt 0 (what the gateway calls commands sent before attempts).
        let want = CommandResult {
            attempt: 0,
            ..result(7, 700)
        };
        assert_eq!(s.pending_result(), Some(want));
        let last = s.last_executed().unwrap();
        assert_eq!((last.seq, last.attempt), (7, 0));
        assert!(!s.should_run(7, 0));
        assert!(s.should_run(7, 1));
        // Written back in the current version on the next transition.
        assert!(s.ack(7).unwrap());
        assert_eq!(fs::read(&path).unwrap()[4], VERSION);
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.command().key(), Some((7, 0)));

        // The other records of version 1.
        fs::write(&path, v1_file(TAG_EXECUTING, 3, 30, &2u16.to_be_bytes())).unwrap();
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.interrupted(), Some(3));
        assert_eq!(s.pending_result().unwrap().attempt, 0);
        fs::write(&path, v1_file(TAG_REBOOTING, 4, 40, &[9; 16])).unwrap();
        let s = State::open(dir.path()).unwrap();
        assert_eq!(
            s.reboot(),
            Some(RebootRecord {
                seq: 4,
                attempt: 0,
                command_id: 40,
                old_boot_id: [9; 16]
            })
        );
        // Version 1 kept no result of the steps before the reboot.
        assert_eq!(s.reboot_result(), None);
        // A damaged version-1 frame is corruption, not a silently different result.
        let mut bad = frame.clone();
        bad[20] ^= 1;
        let mut body = (bad.len() as u32).to_be_bytes().to_vec();
        body.extend_from_slice(&bad);
        fs::write(&path, v1_file(TAG_PENDING, 7, 700, &body)).unwrap();
        assert!(matches!(
            State::open(dir.path()),
            Err(StateError::Corrupt {
                reason: "pending result frame does not parse",
                ..
            })
        ));
    }

    #[test]
    fn corrupt_files_are_typed_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        s.record_executing(1, 1, 10, 1).unwrap();
        s.record_result(&result(1, 10)).unwrap();
        let path = dir.path().join(COMMAND_FILE);
        let good = fs::read(&path).unwrap();

        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"garbage".to_vec(), "truncated"),
            (
                {
                    let mut b = good.clone();
                    b[30] ^= 1;
                    b
                },
                "checksum mismatch",
            ),
            (good[..good.len() - 1].to_vec(), "checksum mismatch"),
            (
                {
                    let mut b = good.clone();
                    b[0] = b'X';
                    b
                },
                "bad magic",
            ),
        ];
        for (bytes, reason) in cases {
            fs::write(&path, &bytes).unwrap();
            match State::open(dir.path()) {
                Err(e @ StateError::Corrupt { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains(&*path.to_string_lossy()), "{text}");
                    assert!(text.contains(reason), "{text}");
                }
                other => panic!("expected Corrupt({reason}), got {other:?}"),
            }
        }

        // A valid CRC over a frame that is not a `Result` is still caught.
        let bad = {
            let mut content = good[..FIXED].to_vec();
            let frame = b"not a frame";
            content.extend_from_slice(&(frame.len() as u32).to_be_bytes());
            content.extend_from_slice(frame);
            let crc = crc32fast::hash(&content);
            content.extend_from_slice(&crc.to_be_bytes());
            content
        };
        fs::write(&path, bad).unwrap();
        assert!(matches!(
            State::open(dir.path()),
            Err(StateError::Corrupt {
                reason: "pending result frame does not parse",
                ..
            })
        ));

        fs::write(&path, &good).unwrap();
        let s = State::open(dir.path()).unwrap();
        fs::write(dir.path().join(DEVICE_ID_FILE), "forty-two\n").unwrap();
        let e = s.load_identity().unwrap_err();
        assert!(e.to_string().contains("device_id"), "{e}");
        fs::write(dir.path().join(DEVICE_ID_FILE), "42\n").unwrap();
        fs::write(dir.path().join(CERT_FILE), "junk").unwrap();
        fs::write(dir.path().join(CA_FILE), CERT).unwrap();
        assert!(matches!(
            s.load_identity(),
            Err(StateError::Corrupt { path, .. }) if path.ends_with(CERT_FILE)
        ));
        fs::write(dir.path().join(TRANSPORT_FILE), "a b").unwrap();
        assert!(matches!(
            s.load_transport(),
            Err(StateError::Corrupt { .. })
        ));
    }
}
