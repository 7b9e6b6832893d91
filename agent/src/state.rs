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
//! a file holds either its old or its new contents, never a mix. The `command` file is a
//! record of [`crate::record`]: encoded with the wire codec (a kept result is the `Result`
//! message's own encoding, [`fleetcast_wire::Embed`]) inside an envelope with a CRC-32, so a
//! file damaged some other way is detected: loading fails with [`StateError::Corrupt`] naming
//! the file and the broken rule ([`Corrupt`]), never with a silently wrong state. Files of the
//! layouts of before are read too (`legacy.rs`) and rewritten in today's on the next
//! transition.
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
//!  Executing(k) --record_result--> Pending(k, result) --ack(≥seq)--> Acked(k)
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
//!   it (the `Result` that `RebootComplete` carries after the reboot, so their real outcomes
//!   and output survive the reboot). After the restart the driver
//!   compares the boot id: a different one means the reboot happened and `RebootComplete`
//!   is due; [`State::take_reboot`] clears the record once the gateway has it. The same
//!   boot id means the agent restarted before the reboot took place (it died between
//!   recording and rebooting): rebooting again is safe, unlike re-running an arbitrary
//!   command, so the driver may simply reboot.

use std::fs::File;
use std::io::{self, Read as _, Write};
use std::path::{Path, PathBuf};

use fleetcast_os::{write_atomic, Tightened};

use fleetcast_wire::{CommandResult, LastExecuted, StepResult, StepStatus};

use crate::exec::EXIT_AGENT_RESTARTED;
use crate::legacy;
use crate::record::{open, COMMAND_MAGIC, COMMAND_V3, COMMAND_VERSION};
pub use crate::record::{CommandRecord, Corrupt, RebootRecord};

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
        /// The rule its contents break.
        reason: Corrupt,
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
    /// The result could not be encoded in the wire format (a field over its wire limit).
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

const KEY_FILE: &str = "device.key";
const CERT_FILE: &str = "device.crt";
const CA_FILE: &str = "ca.crt";
const DEVICE_ID_FILE: &str = "device_id";
const TRANSPORT_FILE: &str = "transport";
const COMMAND_FILE: &str = "command";

/// Longest transport name stored.
pub const MAX_TRANSPORT: usize = 64;

/// The largest `command` file accepted: a result (with its configuration report) is at most a
/// stream frame.
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
                output: message.into_bytes().into(),
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
            .ok_or_else(|| corrupt(&id_path, Corrupt::DeviceId))?;
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
            return Err(corrupt(&path, Corrupt::TransportName));
        }
        Ok(Some(String::from_utf8(bytes).expect("checked ASCII")))
    }

    /// The command record.
    pub fn command(&self) -> &CommandRecord {
        &self.command
    }

    /// Whether a dispatch of attempt `attempt` of command `seq` may run: its `(seq, attempt)`
    /// must be newer than every recorded one. One that may not run is a redelivery: answer it
    /// with [`State::pending_result`] (or nothing, when already acknowledged).
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
        self.set_command(CommandRecord::Pending {
            result: result.clone().into_owned(),
        })
    }

    /// The gateway has durably stored results up to `seq`: forget a pending result whose
    /// `seq` is not above it. Returns whether one was cleared.
    pub fn ack(&mut self, seq: u64) -> Result<bool, StateError> {
        match &self.command {
            CommandRecord::Pending { result } if result.seq <= seq => {
                let acked = CommandRecord::Acked {
                    seq: result.seq,
                    attempt: result.attempt,
                    command_id: result.command_id,
                };
                self.set_command(acked)?;
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
        self.set_command(CommandRecord::Rebooting {
            reboot: record,
            result: Some(result.clone().into_owned()),
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
    pub fn reboot_result(&self) -> Option<CommandResult<'static>> {
        match &self.command {
            CommandRecord::Rebooting { result, .. } => result.clone(),
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

    /// The result awaiting acknowledgement.
    pub fn pending_result(&self) -> Option<&CommandResult<'static>> {
        match &self.command {
            CommandRecord::Pending { result } => Some(result),
            _ => None,
        }
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
            result: self.pending_result().cloned(),
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

    /// Makes `record` durable (encoded first: a result over a wire limit is refused before
    /// anything is written), then current.
    fn set_command(&mut self, record: CommandRecord) -> Result<(), StateError> {
        // `None` is never set: the ledger only moves forward from the first command.
        if let Some(bytes) = record.encode().map_err(StateError::Encode)? {
            self.write(COMMAND_FILE, &bytes, 0o600)?;
        }
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

/// A `command` file of any version: today's ([`crate::record`]) or one of before
/// (`legacy.rs`).
fn decode_command(bytes: &[u8]) -> Result<CommandRecord, Corrupt> {
    let (version, r) = open(bytes, &COMMAND_MAGIC)?;
    match version {
        COMMAND_VERSION | COMMAND_V3 => CommandRecord::decode(version, r),
        legacy::COMMAND_V1 | legacy::COMMAND_V2 => legacy::command(version, r),
        v => Err(Corrupt::UnknownVersion(v)),
    }
}

fn valid_transport(name: &[u8]) -> bool {
    !name.is_empty() && name.len() <= MAX_TRANSPORT && name.iter().all(u8::is_ascii_graphic)
}

fn check_cert_pem(path: &Path, pem: &[u8]) -> Result<(), StateError> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::from_pem_slice(pem)
        .map(drop)
        .map_err(|_| corrupt(path, Corrupt::NoCertificate))
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
    String::from_utf8(bytes).map_err(|_| corrupt(path, Corrupt::NotUtf8))
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
        return Err(corrupt(path, Corrupt::TooLarge { max }));
    }
    Ok(Some(bytes))
}

fn io_err(path: &Path, source: io::Error) -> StateError {
    StateError::Io {
        path: path.to_owned(),
        source,
    }
}

fn corrupt(path: &Path, reason: Corrupt) -> StateError {
    StateError::Corrupt {
        path: path.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::tests as old;
    use crate::record::{TAG_ACKED, TAG_EXECUTING, TAG_PENDING, TAG_REBOOTING};
    use fleetcast_wire::Kind;
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
        assert_eq!(s.pending_result(), Some(&result(7, 700)));
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
        assert_eq!(s.pending_result(), None);
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
            ..Default::default()
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

    #[test]
    fn a_version_1_ledger_is_read_as_attempt_0_and_keeps_its_pending_result() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(COMMAND_FILE);
        let frame = old::frame(1, Kind::Result as u8, &old::v1_result_body(7, 700));
        fs::write(
            &path,
            old::v1_file(TAG_PENDING, 7, 700, &old::with_len(&frame)),
        )
        .unwrap();
        let mut s = State::open(dir.path()).unwrap();
        // The result an agent upgraded with a pending result still has, as the current wire
        // version, attempt 0 (what the gateway calls commands sent before attempts).
        let want = CommandResult {
            attempt: 0,
            ..result(7, 700)
        };
        assert_eq!(s.pending_result(), Some(&want));
        let last = s.last_executed().unwrap();
        assert_eq!((last.seq, last.attempt), (7, 0));
        assert!(!s.should_run(7, 0));
        assert!(s.should_run(7, 1));
        // Written back in the current layout on the next transition.
        assert!(s.ack(7).unwrap());
        assert_eq!(fs::read(&path).unwrap()[4], COMMAND_VERSION);
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.command().key(), Some((7, 0)));

        // The other records of version 1.
        fs::write(
            &path,
            old::v1_file(TAG_EXECUTING, 3, 30, &2u16.to_be_bytes()),
        )
        .unwrap();
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.interrupted(), Some(3));
        assert_eq!(s.pending_result().unwrap().attempt, 0);
        fs::write(&path, old::v1_file(TAG_REBOOTING, 4, 40, &[9; 16])).unwrap();
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
        fs::write(
            &path,
            old::v1_file(TAG_PENDING, 7, 700, &old::with_len(&bad)),
        )
        .unwrap();
        assert!(matches!(
            State::open(dir.path()),
            Err(StateError::Corrupt {
                reason: Corrupt::Result(fleetcast_wire::Error::Checksum),
                ..
            })
        ));
    }

    #[test]
    fn a_version_2_ledger_keeps_its_result_and_reboot_across_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(COMMAND_FILE);
        // A pending result as the release before this layout wrote it: a whole `Result` frame.
        let frame = old::frame(2, Kind::Result as u8, &old::v2_result_body(7, 1, 700));
        fs::write(
            &path,
            old::v2_file(TAG_PENDING, 7, 700, 1, &old::with_len(&frame)),
        )
        .unwrap();
        let mut s = State::open(dir.path()).unwrap();
        assert_eq!(s.pending_result(), Some(&result(7, 700)));
        assert_eq!(s.last_executed().unwrap().result, Some(result(7, 700)));
        assert!(!s.should_run(7, 1));
        assert!(s.ack(7).unwrap());
        assert_eq!(fs::read(&path).unwrap()[4], COMMAND_VERSION);

        // A reboot under way, with the result of the steps before it.
        let r = CommandResult {
            attempt: 2,
            ..result(9, 90)
        };
        let frame = old::frame(2, Kind::Result as u8, &old::v2_result_body(9, 2, 90));
        let mut body = [5u8; 16].to_vec();
        body.extend_from_slice(&old::with_len(&frame));
        fs::write(&path, old::v2_file(TAG_REBOOTING, 9, 90, 2, &body)).unwrap();
        let mut s = State::open(dir.path()).unwrap();
        assert_eq!(s.interrupted(), None);
        let rec = RebootRecord {
            seq: 9,
            attempt: 2,
            command_id: 90,
            old_boot_id: [5; 16],
        };
        assert_eq!(s.reboot(), Some(rec));
        assert_eq!(s.reboot_result(), Some(r));
        assert_eq!(s.take_reboot().unwrap(), Some(rec));
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.command().key(), Some((9, 2)));
        assert_eq!(fs::read(&path).unwrap()[4], COMMAND_VERSION);

        // Executing when the agent was upgraded: a failed result, not a rerun.
        fs::write(
            &path,
            old::v2_file(TAG_EXECUTING, 10, 100, 1, &1u16.to_be_bytes()),
        )
        .unwrap();
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.interrupted(), Some(10));
        assert_eq!(
            s.pending_result().map(|r| (r.seq, r.exit_code)),
            Some((10, EXIT_AGENT_RESTARTED))
        );
        fs::write(&path, old::v2_file(TAG_ACKED, 11, 110, 3, &[])).unwrap();
        let s = State::open(dir.path()).unwrap();
        assert!(!s.should_run(11, 3) && s.should_run(11, 4));
    }

    #[test]
    fn corrupt_files_are_typed_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        s.record_executing(1, 1, 10, 1).unwrap();
        s.record_result(&result(1, 10)).unwrap();
        let path = dir.path().join(COMMAND_FILE);
        let good = fs::read(&path).unwrap();

        let flip = |at: usize| {
            let mut b = good.clone();
            b[at] ^= 1;
            b
        };
        let cases: Vec<(Vec<u8>, Corrupt, &str)> = vec![
            (b"garbage".to_vec(), Corrupt::Truncated, "truncated"),
            (flip(30), Corrupt::Checksum, "checksum mismatch"),
            (
                good[..good.len() - 1].to_vec(),
                Corrupt::Checksum,
                "checksum mismatch",
            ),
            (flip(0), Corrupt::BadMagic, "bad magic"),
        ];
        for (bytes, want, text) in cases {
            fs::write(&path, &bytes).unwrap();
            let e = State::open(dir.path()).unwrap_err();
            assert!(
                matches!(e, StateError::Corrupt { reason, .. } if reason == want),
                "expected Corrupt({want:?}), got {e:?}"
            );
            let shown = e.to_string();
            assert!(shown.contains(&*path.to_string_lossy()), "{shown}");
            assert!(shown.contains(text), "{shown}");
        }

        // A valid CRC over a result that does not decode is still caught.
        let bad = {
            let mut content = good[..good.len() - 4].to_vec();
            let at = 4 + 1 + 1 + 8 + 8 + 4;
            content.truncate(at);
            let junk = b"not a result";
            content.extend_from_slice(&(junk.len() as u32).to_be_bytes());
            content.extend_from_slice(junk);
            let crc = crc32fast::hash(&content);
            content.extend_from_slice(&crc.to_be_bytes());
            content
        };
        fs::write(&path, bad).unwrap();
        assert!(matches!(
            State::open(dir.path()),
            Err(StateError::Corrupt {
                reason: Corrupt::Result(_),
                ..
            })
        ));

        fs::write(&path, &good).unwrap();
        let s = State::open(dir.path()).unwrap();
        fs::write(dir.path().join(DEVICE_ID_FILE), "forty-two\n").unwrap();
        let e = s.load_identity().unwrap_err();
        assert!(e.to_string().contains("device_id"), "{e}");
        assert!(matches!(
            e,
            StateError::Corrupt {
                reason: Corrupt::DeviceId,
                ..
            }
        ));
        fs::write(dir.path().join(DEVICE_ID_FILE), "42\n").unwrap();
        fs::write(dir.path().join(CERT_FILE), "junk").unwrap();
        fs::write(dir.path().join(CA_FILE), CERT).unwrap();
        assert!(matches!(
            s.load_identity(),
            Err(StateError::Corrupt { path, reason: Corrupt::NoCertificate })
                if path.ends_with(CERT_FILE)
        ));
        fs::write(dir.path().join(TRANSPORT_FILE), "a b").unwrap();
        assert!(matches!(
            s.load_transport(),
            Err(StateError::Corrupt {
                reason: Corrupt::TransportName,
                ..
            })
        ));
        fs::write(dir.path().join(TRANSPORT_FILE), [b'x'; MAX_TRANSPORT + 2]).unwrap();
        assert!(matches!(
            s.load_transport(),
            Err(StateError::Corrupt {
                reason: Corrupt::TooLarge { .. },
                ..
            })
        ));
    }
}
