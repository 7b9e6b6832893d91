//! The agent's durable records and their encoding: the command ledger ([`CommandRecord`], the
//! state directory's `command` file, kept by [`crate::state`]) and a transfer's received-block
//! record ([`TransferRecord`], the downloads directory's `.rec` files, kept by
//! [`crate::transfer`]).
//!
//! # One codec: the wire's
//! Records are encoded with `fleetcast-wire`'s codec, the one every message is encoded with:
//! its [`Sink`] and [`Reader`] primitives for the fields (network byte order, every read
//! bounds-checked, typed errors, no slicing by hand), and a wire value a record keeps — a
//! command's `Result` — embedded with [`Embed`] (the message part without a frame, as a
//! `bytes32`), the trait the gateway's store embeds wire values with. So a kept result has
//! exactly one encoding, and is decoded with the same limits and checks as a received one.
//! The records themselves are not wire messages (nothing sends them), so they do not implement
//! `Embed`: their layouts are defined here, with the same primitives.
//!
//! # Envelope
//! A record file is `magic [4]`, `version u8`, the record, `crc u32` (CRC-32 of every byte
//! before it). The files are replaced atomically ([`fleetcast_os::write_atomic`]: temporary
//! file, fsync, rename, directory fsync), so a crash leaves the old record or the new one,
//! never a mix; the CRC catches damage of any other kind (a bad disk, a hand edit), so such a
//! file is refused with a [`Corrupt`] naming the broken rule, never read as another state.
//!
//! # Layouts (`command` version 4, `.rec` version 2)
//! ```text
//! command  "FCCR" 4  tag u8, seq u64, command_id u64, attempt u32, then by tag:
//!                      1 executing  steps u16
//!                      2 rebooting  old_boot_id [16], result option<bytes32>
//!                      3 pending    result bytes32
//!                      4 acked      (nothing)
//! .rec     "FCTR" 2  task_id u64, size u64, block_size u32, sha256 [32],
//!                    received: u32 count, then per range varint(gap) varint(len - 1)
//! ```
//! A `result` is the `Result` message's body (docs/wire.md) and must name the record's `seq`,
//! `attempt` and `command_id`; `received` is [`Ranges::encode_record`] (a NACK's ranges with a
//! wider count). `command` version 3 was this layout with the result in wire version 2's
//! layout (its report without what version 3 added); it is read here too. The layouts of
//! before stay readable (`crate::legacy`: `command` versions 1 and 2, the `.rec` without
//! envelope); every record written is of the current version.

use fleetcast_wire::codec::{Reader, Sink};
use fleetcast_wire::{CommandResult, Embed, Error as WireError, Ranges};

/// Magic of the `command` file.
pub(crate) const COMMAND_MAGIC: [u8; 4] = *b"FCCR";
/// Version of the `command` layout written.
pub(crate) const COMMAND_VERSION: u8 = 4;
/// `command` version 3: today's layout, the kept result in wire version 2's layout.
pub(crate) const COMMAND_V3: u8 = 3;
/// Magic of a transfer record.
pub(crate) const TRANSFER_MAGIC: [u8; 4] = *b"FCTR";
/// Version of the transfer record layout written (version 1 had no envelope).
pub(crate) const TRANSFER_VERSION: u8 = 2;

pub(crate) const TAG_EXECUTING: u8 = 1;
pub(crate) const TAG_REBOOTING: u8 = 2;
pub(crate) const TAG_PENDING: u8 = 3;
pub(crate) const TAG_ACKED: u8 = 4;

/// The largest kept result: a `Result` body fits one stream frame.
pub(crate) const MAX_RESULT: usize = fleetcast_wire::MAX_STREAM_BODY as usize;

/// Why a durable file of the agent is refused: one variant per broken rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Corrupt {
    /// Shorter than its envelope (magic, version, CRC).
    #[error("truncated: shorter than a record's envelope")]
    Truncated,
    /// The file does not start with its record kind's magic.
    #[error("bad magic: not a record of this kind")]
    BadMagic,
    /// The CRC-32 does not match the contents.
    #[error("checksum mismatch")]
    Checksum,
    /// A layout version this build does not know.
    #[error("unknown record version {0}")]
    UnknownVersion(u8),
    /// A ledger state tag no version defines.
    #[error("unknown record tag {0}")]
    UnknownTag(u8),
    /// The record's own fields do not decode (cut short, bytes left over, an invalid value).
    #[error("record fields do not decode: {0}")]
    Record(WireError),
    /// The kept result does not decode (in a record of before, its frame does not parse).
    #[error("the stored result does not decode: {0}")]
    Result(WireError),
    /// A kept frame (in a record of before) is a message of another kind than `Result`.
    #[error("the stored frame is a message of kind {kind:#04x}, not a Result")]
    NotAResult {
        /// The frame's kind byte.
        kind: u8,
    },
    /// The kept result is of another command or attempt than the record.
    #[error(
        "the stored result is of seq {seq} attempt {attempt} command {command_id}, \
         not the record's"
    )]
    ForeignResult {
        /// The result's sequence number.
        seq: u64,
        /// The result's attempt.
        attempt: u32,
        /// The result's command id.
        command_id: u64,
    },
    /// Larger than any valid file of its kind.
    #[error("file too large (over {max} bytes)")]
    TooLarge {
        /// The largest size accepted.
        max: u64,
    },
    /// The `device_id` file does not hold a decimal device id.
    #[error("not a decimal device id")]
    DeviceId,
    /// The `transport` file does not hold a transport name.
    #[error("not a transport name")]
    TransportName,
    /// A certificate file has no PEM `CERTIFICATE` section.
    #[error("no PEM CERTIFICATE section")]
    NoCertificate,
    /// A certificate file is not UTF-8.
    #[error("not UTF-8")]
    NotUtf8,
}

/// A field of the record itself failed to decode: [`Corrupt::Record`] (an embedded result's
/// errors are mapped to [`Corrupt::Result`] explicitly).
impl From<WireError> for Corrupt {
    fn from(e: WireError) -> Corrupt {
        Corrupt::Record(e)
    }
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

/// What the agent last executed (the `command` file). See [`crate::state`] for transitions.
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
        /// The command's result so far (steps before the reboot with their real outcomes, the
        /// reboot step `Ok`); `None` in a record of `command` version 1, which kept none.
        result: Option<CommandResult<'static>>,
    },
    /// Finished; the result (of the record's command: it names the `seq`, attempt and id)
    /// awaits the gateway's acknowledgement.
    Pending {
        /// The result, as it is sent.
        result: CommandResult<'static>,
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
            | CommandRecord::Acked { seq, attempt, .. } => Some((*seq, *attempt)),
            CommandRecord::Pending { result } => Some((result.seq, result.attempt)),
            CommandRecord::Rebooting { reboot: r, .. } => Some((r.seq, r.attempt)),
        }
    }

    /// The recorded command's gateway-wide id (0 for [`CommandRecord::None`]).
    pub fn command_id(&self) -> u64 {
        match self {
            CommandRecord::None => 0,
            CommandRecord::Executing { command_id, .. }
            | CommandRecord::Acked { command_id, .. } => *command_id,
            CommandRecord::Pending { result } => result.command_id,
            CommandRecord::Rebooting { reboot: r, .. } => r.command_id,
        }
    }

    /// The state's name, for errors.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            CommandRecord::None => "none",
            CommandRecord::Executing { .. } => "executing",
            CommandRecord::Rebooting { .. } => "rebooting",
            CommandRecord::Pending { .. } => "pending",
            CommandRecord::Acked { .. } => "acked",
        }
    }

    /// The `command` file's bytes (current version); `None` for [`CommandRecord::None`], which
    /// is never written. Fails only for a result over a wire limit.
    pub(crate) fn encode(&self) -> Result<Option<Vec<u8>>, WireError> {
        let (Some((seq, attempt)), Some(tag)) = (self.key(), self.tag()) else {
            return Ok(None);
        };
        seal(&COMMAND_MAGIC, COMMAND_VERSION, |s| {
            s.u8(tag)?;
            s.u64(seq)?;
            s.u64(self.command_id())?;
            s.u32(attempt)?;
            match self {
                CommandRecord::Executing { steps, .. } => s.u16(*steps),
                CommandRecord::Rebooting { reboot, result } => {
                    s.put(&reboot.old_boot_id)?;
                    s.present(result.is_some())?;
                    result.as_ref().map_or(Ok(()), |r| embed(s, r))
                }
                CommandRecord::Pending { result } => embed(s, result),
                CommandRecord::None | CommandRecord::Acked { .. } => Ok(()),
            }
        })
        .map(Some)
    }

    /// Decodes the record of a `command` file of the current version or of version 3 (whose
    /// result is in wire version 2's layout): `r` reads what follows the version byte
    /// ([`open`]).
    pub(crate) fn decode(version: u8, mut r: Reader<'_>) -> Result<CommandRecord, Corrupt> {
        let wire_v2 = match version {
            COMMAND_VERSION => false,
            COMMAND_V3 => true,
            v => return Err(Corrupt::UnknownVersion(v)),
        };
        let kept = |r: &mut Reader<'_>, key| kept_result(r, key, wire_v2);
        let tag = r.u8()?;
        let seq = r.u64()?;
        let command_id = r.u64()?;
        let attempt = r.u32()?;
        let record = match tag {
            TAG_EXECUTING => CommandRecord::Executing {
                seq,
                attempt,
                command_id,
                steps: r.u16()?,
            },
            TAG_REBOOTING => {
                let old_boot_id = r.array()?;
                let result = match r.present()? {
                    true => Some(kept(&mut r, (seq, attempt, command_id))?),
                    false => None,
                };
                CommandRecord::Rebooting {
                    reboot: RebootRecord {
                        seq,
                        attempt,
                        command_id,
                        old_boot_id,
                    },
                    result,
                }
            }
            TAG_PENDING => CommandRecord::Pending {
                result: kept(&mut r, (seq, attempt, command_id))?,
            },
            TAG_ACKED => CommandRecord::Acked {
                seq,
                attempt,
                command_id,
            },
            t => return Err(Corrupt::UnknownTag(t)),
        };
        r.finish()?;
        Ok(record)
    }

    fn tag(&self) -> Option<u8> {
        match self {
            CommandRecord::None => None,
            CommandRecord::Executing { .. } => Some(TAG_EXECUTING),
            CommandRecord::Rebooting { .. } => Some(TAG_REBOOTING),
            CommandRecord::Pending { .. } => Some(TAG_PENDING),
            CommandRecord::Acked { .. } => Some(TAG_ACKED),
        }
    }
}

/// A transfer's received-block record: the task's geometry and digest (a record whose task,
/// size, block size or digest differ from the announce's is another transfer's) and the blocks
/// received, all of them durable in the `.part` file when the record was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRecord {
    /// The task.
    pub task_id: u64,
    /// File size in bytes.
    pub size: u64,
    /// Bytes per block.
    pub block_size: u32,
    /// SHA-256 of the whole file.
    pub sha256: [u8; 32],
    /// The blocks received.
    pub received: Ranges,
}

impl TransferRecord {
    /// The record file's bytes (current version). Cannot fail for a [`Ranges`] (its invariant
    /// keeps every count and gap in range); the error is the codec's, should that change.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        seal(&TRANSFER_MAGIC, TRANSFER_VERSION, |s| {
            s.u64(self.task_id)?;
            s.u64(self.size)?;
            s.u32(self.block_size)?;
            s.put(&self.sha256)?;
            self.received.encode_record(s)
        })
    }

    /// Decodes the record of the current version: `r` reads what follows the version byte.
    pub(crate) fn decode(mut r: Reader<'_>) -> Result<TransferRecord, Corrupt> {
        let rec = TransferRecord {
            task_id: r.u64()?,
            size: r.u64()?,
            block_size: r.u32()?,
            sha256: r.array()?,
            received: Ranges::decode_record(&mut r)?,
        };
        r.finish()?;
        Ok(rec)
    }
}

/// A [`Sink`] appending to a `Vec`: every put succeeds, so only a value over a wire limit
/// fails an encoding.
struct VecSink<'a>(&'a mut Vec<u8>);

impl Sink for VecSink<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// A record file: magic, version, the fields `record` writes, CRC-32.
fn seal(
    magic: &[u8; 4],
    version: u8,
    record: impl FnOnce(&mut VecSink<'_>) -> Result<(), WireError>,
) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(magic);
    out.push(version);
    record(&mut VecSink(&mut out))?;
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    Ok(out)
}

/// Checks a record file's envelope (length, magic, CRC); returns its version and a reader
/// over the record (between the version byte and the CRC).
pub(crate) fn open<'a>(bytes: &'a [u8], magic: &[u8; 4]) -> Result<(u8, Reader<'a>), Corrupt> {
    let (content, crc) = bytes.split_last_chunk::<4>().ok_or(Corrupt::Truncated)?;
    let mut r = Reader::new(content);
    let (found, version) = match (r.array::<4>(), r.u8()) {
        (Ok(m), Ok(v)) => (m, v),
        _ => return Err(Corrupt::Truncated),
    };
    if found != *magic {
        return Err(Corrupt::BadMagic);
    }
    if crc32fast::hash(content) != u32::from_be_bytes(*crc) {
        return Err(Corrupt::Checksum);
    }
    Ok((version, r))
}

/// Appends a result as `bytes32` of its [`Embed`] encoding.
fn embed(s: &mut VecSink<'_>, result: &CommandResult<'_>) -> Result<(), WireError> {
    let at = s.0.len();
    s.u32(0)?;
    result.encode_to_vec(s.0)?;
    let len = s.0.len() - at - 4;
    if len > MAX_RESULT {
        return Err(WireError::FieldTooLong);
    }
    let len = u32::try_from(len).map_err(|_| WireError::FieldTooLong)?;
    s.0[at..at + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Reads a result embedded as `bytes32` (in wire version 2's layout if `wire_v2`) and checks
/// it is the record's `(seq, attempt, command_id)`.
fn kept_result(
    r: &mut Reader<'_>,
    key: (u64, u32, u64),
    wire_v2: bool,
) -> Result<CommandResult<'static>, Corrupt> {
    let bytes = r.bytes32(MAX_RESULT)?;
    let result = match wire_v2 {
        true => CommandResult::decode_v2_exact(bytes),
        false => CommandResult::decode_exact(bytes),
    }
    .map_err(Corrupt::Result)?;
    check_result(result.into_owned(), key)
}

/// `result` if it names `(seq, attempt, command_id)`, else [`Corrupt::ForeignResult`].
pub(crate) fn check_result(
    result: CommandResult<'static>,
    (seq, attempt, command_id): (u64, u32, u64),
) -> Result<CommandResult<'static>, Corrupt> {
    if (result.seq, result.attempt, result.command_id) == (seq, attempt, command_id) {
        Ok(result)
    } else {
        Err(Corrupt::ForeignResult {
            seq: result.seq,
            attempt: result.attempt,
            command_id: result.command_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_wire::{ConfigReport, Package, StepResult, StepStatus};

    fn result(seq: u64, attempt: u32, command_id: u64) -> CommandResult<'static> {
        CommandResult {
            command_id,
            seq,
            attempt,
            exit_code: 3,
            steps: vec![
                StepResult {
                    status: StepStatus::Ok,
                    exit_code: 0,
                    duration_ms: 830,
                },
                StepResult {
                    status: StepStatus::TimedOut,
                    exit_code: 124,
                    duration_ms: 12,
                },
            ],
            output: b"kernel installed\n".to_vec().into(),
            report: Some(ConfigReport {
                boot_id: [3; 16],
                os: "Debian GNU/Linux 12".into(),
                kernel: "6.1.0-18-amd64".into(),
                hostname: "n1".into(),
                agent_version: "0.1.0".into(),
                addresses: vec!["10.0.0.2/24".into()],
                software: vec![Package {
                    name: "libc6".into(),
                    version: "2.36".into(),
                }],
                ..Default::default()
            }),
        }
    }

    fn decode_command(bytes: &[u8]) -> Result<CommandRecord, Corrupt> {
        match open(bytes, &COMMAND_MAGIC)? {
            (v @ (COMMAND_VERSION | COMMAND_V3), r) => CommandRecord::decode(v, r),
            (v, _) => Err(Corrupt::UnknownVersion(v)),
        }
    }

    #[test]
    fn every_command_record_round_trips_in_the_current_layout() {
        let reboot = RebootRecord {
            seq: 9,
            attempt: 2,
            command_id: 90,
            old_boot_id: [7; 16],
        };
        let records = [
            CommandRecord::Executing {
                seq: 5,
                attempt: 1,
                command_id: 50,
                steps: 3,
            },
            CommandRecord::Rebooting {
                reboot,
                result: Some(result(9, 2, 90)),
            },
            CommandRecord::Rebooting {
                reboot,
                result: None,
            },
            CommandRecord::Pending {
                result: result(7, 4, 700),
            },
            CommandRecord::Acked {
                seq: u64::MAX,
                attempt: u32::MAX,
                command_id: 1,
            },
        ];
        for rec in records {
            let bytes = rec.encode().unwrap().unwrap();
            assert_eq!(&bytes[..5], b"FCCR\x04");
            assert_eq!(decode_command(&bytes).unwrap(), rec);
        }
        assert_eq!(CommandRecord::None.encode().unwrap(), None);
    }

    /// A `command` file of version 3: today's layout, its result (and the result's report)
    /// in wire version 2's layout, which lacked the report's package manager, CPU, memory
    /// and devices (15 bytes when they are empty, as in `result`).
    #[test]
    fn a_version_3_record_reads_with_its_report() {
        let rec = CommandRecord::Pending {
            result: result(7, 4, 700),
        };
        let now = rec.encode().unwrap().unwrap();
        let record = &now[5..now.len() - 4];
        // tag, seq, command_id, attempt (21 bytes), the result's u32 length, the result.
        let (head, rest) = record.split_at(21);
        let (len, res) = rest.split_at(4);
        assert_eq!(
            u32::from_be_bytes(len.try_into().unwrap()) as usize,
            res.len()
        );
        let (v2, added) = res.split_at(res.len() - 15);
        assert!(added.iter().all(|&b| b == 0));
        let mut old = b"FCCR\x03".to_vec();
        old.extend_from_slice(head);
        old.extend_from_slice(&(v2.len() as u32).to_be_bytes());
        old.extend_from_slice(v2);
        let crc = crc32fast::hash(&old);
        old.extend_from_slice(&crc.to_be_bytes());
        assert_eq!(decode_command(&old).unwrap(), rec);
        // Read as today's layout, the old result is short: corruption, not a guess.
        old[4] = COMMAND_VERSION;
        let n = old.len();
        let crc = crc32fast::hash(&old[..n - 4]);
        old[n - 4..].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            decode_command(&old),
            Err(Corrupt::Result(WireError::Truncated))
        ));
    }

    #[test]
    fn the_current_layout_is_the_wire_encoding_byte_for_byte() {
        // Built by hand from the layout in the module doc and docs/wire.md's `Result` body.
        let r = CommandResult {
            report: None,
            steps: vec![StepResult {
                status: StepStatus::Failed,
                exit_code: 3,
                duration_ms: 12,
            }],
            output: b"hi\n".to_vec().into(),
            ..result(7, 1, 700)
        };
        let mut body = 700u64.to_be_bytes().to_vec();
        body.extend_from_slice(&7u64.to_be_bytes());
        body.extend_from_slice(&1u32.to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(&[0, 1, 1]); // one step, failed
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(&12u32.to_be_bytes());
        body.extend_from_slice(&[0, 3]);
        body.extend_from_slice(b"hi\n");
        body.push(0); // no report
        let mut want = b"FCCR\x04\x03".to_vec();
        want.extend_from_slice(&7u64.to_be_bytes());
        want.extend_from_slice(&700u64.to_be_bytes());
        want.extend_from_slice(&1u32.to_be_bytes());
        want.extend_from_slice(&(body.len() as u32).to_be_bytes());
        want.extend_from_slice(&body);
        let crc = crc32fast::hash(&want);
        want.extend_from_slice(&crc.to_be_bytes());
        let rec = CommandRecord::Pending { result: r };
        assert_eq!(rec.encode().unwrap().unwrap(), want);

        let t = TransferRecord {
            task_id: 3,
            size: 10_000,
            block_size: 1000,
            sha256: [9; 32],
            received: {
                let mut g = Ranges::new();
                g.push(0, 3).unwrap();
                g.push(5, 2).unwrap();
                g
            },
        };
        let mut want = b"FCTR\x02".to_vec();
        want.extend_from_slice(&3u64.to_be_bytes());
        want.extend_from_slice(&10_000u64.to_be_bytes());
        want.extend_from_slice(&1000u32.to_be_bytes());
        want.extend_from_slice(&[9; 32]);
        want.extend_from_slice(&[0, 0, 0, 2, 0, 2, 2, 1]);
        let crc = crc32fast::hash(&want);
        want.extend_from_slice(&crc.to_be_bytes());
        assert_eq!(t.encode().unwrap(), want);
        let (v, r) = open(&want, &TRANSFER_MAGIC).unwrap();
        assert_eq!(v, TRANSFER_VERSION);
        assert_eq!(TransferRecord::decode(r).unwrap(), t);
    }

    #[test]
    fn each_broken_rule_is_its_own_error() {
        let pending = CommandRecord::Pending {
            result: result(7, 1, 700),
        };
        let good = pending.encode().unwrap().unwrap();
        let reseal = |mut content: Vec<u8>| {
            let crc = crc32fast::hash(&content);
            content.extend_from_slice(&crc.to_be_bytes());
            content
        };
        let content = good[..good.len() - 4].to_vec();

        assert_eq!(decode_command(b"FCC"), Err(Corrupt::Truncated));
        assert_eq!(decode_command(b"FCCR\x03\0\0\0"), Err(Corrupt::Truncated));
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(decode_command(&b), Err(Corrupt::BadMagic));
        let mut b = good.clone();
        b[30] ^= 1;
        assert_eq!(decode_command(&b), Err(Corrupt::Checksum));
        let mut c = content.clone();
        c[4] = 9;
        assert_eq!(decode_command(&reseal(c)), Err(Corrupt::UnknownVersion(9)));
        let mut c = content.clone();
        c[5] = 7;
        assert_eq!(decode_command(&reseal(c)), Err(Corrupt::UnknownTag(7)));
        let mut c = content.clone();
        c.push(0);
        assert_eq!(
            decode_command(&reseal(c)),
            Err(Corrupt::Record(WireError::TrailingBytes))
        );
        assert_eq!(
            decode_command(&reseal(content[..30].to_vec())),
            Err(Corrupt::Record(WireError::Truncated))
        );
        // The result's first step status (after the 26-byte head, the length, the result's
        // 24 bytes of ids and exit code and its step count) is no status.
        let mut c = content.clone();
        c[26 + 4 + 24 + 2] = 9;
        assert_eq!(
            decode_command(&reseal(c)),
            Err(Corrupt::Result(WireError::InvalidValue))
        );
        // The record's seq differs from its result's.
        let mut c = content.clone();
        c[13] = 8;
        assert_eq!(
            decode_command(&reseal(c)),
            Err(Corrupt::ForeignResult {
                seq: 7,
                attempt: 1,
                command_id: 700
            })
        );
        // The texts say what is wrong.
        assert!(Corrupt::Checksum.to_string().contains("checksum mismatch"));
        assert!(Corrupt::Truncated.to_string().contains("truncated"));
        assert!(Corrupt::BadMagic.to_string().contains("bad magic"));
        assert!(Corrupt::Result(WireError::InvalidValue)
            .to_string()
            .contains("stored result"));
    }

    #[test]
    fn a_result_over_a_wire_limit_is_refused_not_written_short() {
        let mut r = result(1, 1, 10);
        r.output = vec![b'x'; fleetcast_wire::msg::limits::MAX_OUTPUT + 1].into();
        let rec = CommandRecord::Pending { result: r };
        assert_eq!(rec.encode(), Err(WireError::FieldTooLong));
    }
}
