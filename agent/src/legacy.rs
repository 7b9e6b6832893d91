//! Records written before the agent's records took the wire codec's layouts
//! ([`crate::record`]): read and converted to today's types, never written. Each is rewritten
//! in the current layout the next time it changes. Nothing is invented in the conversion; what
//! an old layout did not keep is said where it is set.
//!
//! # `command`, versions 1 and 2
//! The envelope is today's (`"FCCR"`, version, record, CRC-32: [`crate::record::open`]).
//! Version 2: `tag u8, seq u64, command_id u64, attempt u32`, then by tag: executing
//! `steps u16`; rebooting `old_boot_id [16]`, a `u32` length and a whole `Result` frame
//! (header and body, wire version 2); pending a `u32` length and a `Result` frame; acked
//! nothing. Version 1: the same without `attempt` (read as attempt 0, the gateway's number for
//! commands sent before attempts existed), a rebooting record without a result, and a pending
//! result as a `Result` frame of wire version 1 (converted: attempt 0, no report).
//!
//! # Transfer records, version 1
//! No envelope: `task_id u64, size u64, block_size u32, sha256 [32]`, then `start u32, len u32`
//! per received range, to the end of the file. Its first bytes are a task id, which the
//! gateway counts up from 1: it never starts with today's magic (`0x4643_5452…`), so the
//! two layouts cannot be taken for each other.
//!
//! Every field is read with the wire codec's [`Reader`] (bounds-checked, typed errors).

use fleetcast_wire::codec::Reader;
use fleetcast_wire::header::{frame_crc, MAX_STREAM_BODY};
use fleetcast_wire::msg::limits::{MAX_OUTPUT, MAX_STEPS};
use fleetcast_wire::{
    CommandResult, Error as WireError, Kind, Ranges, StepResult, StepStatus, HEADER_LEN, MAGIC,
};

use crate::record::{
    check_result, CommandRecord, Corrupt, RebootRecord, TransferRecord, TAG_ACKED, TAG_EXECUTING,
    TAG_PENDING, TAG_REBOOTING,
};

/// `command` layout version 1: no attempt, wire-version-1 result frames.
pub(crate) const COMMAND_V1: u8 = 1;
/// `command` layout version 2: results kept as whole `Result` frames.
pub(crate) const COMMAND_V2: u8 = 2;

/// The largest frame a `command` file of version 1 or 2 holds: one stream frame.
const MAX_FRAME: usize = HEADER_LEN + MAX_STREAM_BODY as usize;

/// Decodes the record of a `command` file of version 1 or 2 (`r` reads what follows the
/// version byte).
pub(crate) fn command(version: u8, mut r: Reader<'_>) -> Result<CommandRecord, Corrupt> {
    let v2 = match version {
        COMMAND_V1 => false,
        COMMAND_V2 => true,
        v => return Err(Corrupt::UnknownVersion(v)),
    };
    let tag = r.u8()?;
    let seq = r.u64()?;
    let command_id = r.u64()?;
    // Before attempts: the gateway numbers such commands' attempt 0 too.
    let attempt = if v2 { r.u32()? } else { 0 };
    let key = (seq, attempt, command_id);
    let record = match tag {
        TAG_EXECUTING => CommandRecord::Executing {
            seq,
            attempt,
            command_id,
            steps: r.u16()?,
        },
        TAG_REBOOTING => {
            let old_boot_id = r.array()?;
            // Version 1 kept no result of the steps before the reboot.
            let result = match v2 {
                true => Some(check_result(frame_v2(r.bytes32(MAX_FRAME)?)?, key)?),
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
        TAG_PENDING => {
            let frame = r.bytes32(MAX_FRAME)?;
            let result = match v2 {
                true => frame_v2(frame)?,
                false => frame_v1(frame)?,
            };
            CommandRecord::Pending {
                result: check_result(result, key)?,
            }
        }
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

/// A whole `Result` frame, as version 2 kept it: of wire version 2, whose report lacked what
/// version 3 added ([`CommandResult::decode_v2_exact`]).
fn frame_v2(frame: &[u8]) -> Result<CommandResult<'static>, Corrupt> {
    let body = old_frame(frame, 2)?;
    CommandResult::decode_v2_exact(body)
        .map(CommandResult::into_owned)
        .map_err(Corrupt::Result)
}

/// A `Result` frame of wire version 1 (what a version-1 `command` file holds), as today's
/// result: attempt 0, no report (version 1 had neither). The body is `command_id u64, seq
/// u64, exit_code i32, steps list<(status u8, exit_code i32, duration_ms u32)>, output
/// bytes16`.
fn frame_v1(frame: &[u8]) -> Result<CommandResult<'static>, Corrupt> {
    result_body_v1(Reader::new(old_frame(frame, 1)?)).map_err(Corrupt::Result)
}

/// The body of a `Result` frame of an earlier wire `version`, checked as a received frame
/// is: the header is today's with that version byte (magic, version, kind, flags, body
/// length, CRC-32 of the first 8 header bytes and the body), with nothing after the body.
fn old_frame(frame: &[u8], version: u8) -> Result<&[u8], Corrupt> {
    let mut r = Reader::new(frame);
    let head: [u8; 8] = r.array().map_err(Corrupt::Result)?;
    let crc = r.u32().map_err(Corrupt::Result)?;
    let body = r.rest();
    let [magic, found, kind, flags, len @ ..] = head;
    let check = if magic != MAGIC {
        Err(WireError::BadMagic(magic))
    } else if found != version {
        Err(WireError::UnsupportedVersion(found))
    } else if flags != 0 {
        Err(WireError::ReservedFlags(flags))
    } else if u32::from_be_bytes(len) as usize != body.len() {
        Err(WireError::LengthMismatch)
    } else if frame_crc(&head, body) != crc {
        Err(WireError::Checksum)
    } else {
        Ok(())
    };
    check.map_err(Corrupt::Result)?;
    if kind != Kind::Result as u8 {
        return Err(Corrupt::NotAResult { kind });
    }
    Ok(body)
}

fn result_body_v1(mut r: Reader<'_>) -> Result<CommandResult<'static>, WireError> {
    let command_id = r.u64()?;
    let seq = r.u64()?;
    let exit_code = r.i32()?;
    let n = r.count(MAX_STEPS, 9)?;
    let mut steps = Vec::with_capacity(n);
    for _ in 0..n {
        let status = match r.u8()? {
            0 => StepStatus::Ok,
            1 => StepStatus::Failed,
            2 => StepStatus::Skipped,
            3 => StepStatus::TimedOut,
            _ => return Err(WireError::InvalidValue),
        };
        steps.push(StepResult {
            status,
            exit_code: r.i32()?,
            duration_ms: r.u32()?,
        });
    }
    let output = r.bytes16(MAX_OUTPUT)?.to_vec();
    r.finish()?;
    Ok(CommandResult {
        command_id,
        seq,
        attempt: 0,
        exit_code,
        steps,
        output: output.into(),
        report: None,
    })
}

/// Decodes a transfer record of version 1 (no envelope).
pub(crate) fn transfer_record(bytes: &[u8]) -> Result<TransferRecord, Corrupt> {
    let mut r = Reader::new(bytes);
    let task_id = r.u64()?;
    let size = r.u64()?;
    let block_size = r.u32()?;
    let sha256 = r.array()?;
    let mut received = Ranges::new();
    while r.remaining() > 0 {
        let start = r.u32()?;
        let len = r.u32()?;
        received.push(start, len)?;
    }
    Ok(TransferRecord {
        task_id,
        size,
        block_size,
        sha256,
        received,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::record::open;

    /// Decodes a whole `command` file of an old version.
    fn decode(bytes: &[u8]) -> Result<CommandRecord, Corrupt> {
        let (version, r) = open(bytes, b"FCCR")?;
        command(version, r)
    }

    /// A `command` file of version 1: `FCCR`, 1, tag, seq, command id, body, CRC-32.
    pub(crate) fn v1_file(tag: u8, seq: u64, command_id: u64, body: &[u8]) -> Vec<u8> {
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

    /// A `command` file of version 2: `FCCR`, 2, tag, seq, command id, attempt, body, CRC-32.
    pub(crate) fn v2_file(
        tag: u8,
        seq: u64,
        command_id: u64,
        attempt: u32,
        body: &[u8],
    ) -> Vec<u8> {
        let mut out = b"FCCR".to_vec();
        out.push(2);
        out.push(tag);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&command_id.to_be_bytes());
        out.extend_from_slice(&attempt.to_be_bytes());
        out.extend_from_slice(body);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// A frame by hand: magic, `version`, kind, no flags, length, CRC-32, body.
    pub(crate) fn frame(version: u8, kind: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![0xFC, version, kind, 0];
        f.extend_from_slice(&(body.len() as u32).to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&f);
        crc.update(body);
        f.extend_from_slice(&crc.finalize().to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    /// A `Result` body of wire version 1 (docs/wire.md of version 1): one failed step, "hi\n".
    pub(crate) fn v1_result_body(seq: u64, command_id: u64) -> Vec<u8> {
        let mut body = command_id.to_be_bytes().to_vec();
        body.extend_from_slice(&seq.to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(&1u16.to_be_bytes());
        body.push(1); // failed
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(&12u32.to_be_bytes());
        body.extend_from_slice(&3u16.to_be_bytes());
        body.extend_from_slice(b"hi\n");
        body
    }

    /// The same result in wire version 2, with an attempt and a report flag.
    pub(crate) fn v2_result_body(seq: u64, attempt: u32, command_id: u64) -> Vec<u8> {
        let mut body = command_id.to_be_bytes().to_vec();
        body.extend_from_slice(&seq.to_be_bytes());
        body.extend_from_slice(&attempt.to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(&1u16.to_be_bytes());
        body.push(1); // failed
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(&12u32.to_be_bytes());
        body.extend_from_slice(&3u16.to_be_bytes());
        body.extend_from_slice(b"hi\n");
        body.push(0); // no report
        body
    }

    fn expected(seq: u64, attempt: u32, command_id: u64) -> CommandResult<'static> {
        CommandResult {
            command_id,
            seq,
            attempt,
            exit_code: 3,
            steps: vec![StepResult {
                status: StepStatus::Failed,
                exit_code: 3,
                duration_ms: 12,
            }],
            output: b"hi\n".to_vec().into(),
            report: None,
        }
    }

    pub(crate) fn with_len(frame: &[u8]) -> Vec<u8> {
        let mut body = (frame.len() as u32).to_be_bytes().to_vec();
        body.extend_from_slice(frame);
        body
    }

    #[test]
    fn every_version_1_record_is_read() {
        let result = Kind::Result as u8;
        assert_eq!(
            decode(&v1_file(TAG_EXECUTING, 3, 30, &2u16.to_be_bytes())),
            Ok(CommandRecord::Executing {
                seq: 3,
                attempt: 0,
                command_id: 30,
                steps: 2
            })
        );
        assert_eq!(
            decode(&v1_file(TAG_REBOOTING, 4, 40, &[9; 16])),
            Ok(CommandRecord::Rebooting {
                reboot: RebootRecord {
                    seq: 4,
                    attempt: 0,
                    command_id: 40,
                    old_boot_id: [9; 16]
                },
                result: None
            })
        );
        let f = frame(1, result, &v1_result_body(7, 700));
        assert_eq!(
            decode(&v1_file(TAG_PENDING, 7, 700, &with_len(&f))),
            Ok(CommandRecord::Pending {
                result: expected(7, 0, 700)
            })
        );
        assert_eq!(
            decode(&v1_file(TAG_ACKED, 8, 800, &[])),
            Ok(CommandRecord::Acked {
                seq: 8,
                attempt: 0,
                command_id: 800
            })
        );

        // A damaged frame, a frame of another kind or version, or another command's result
        // is corruption, never a silently different result.
        let mut bad = f.clone();
        bad[20] ^= 1;
        assert_eq!(
            decode(&v1_file(TAG_PENDING, 7, 700, &with_len(&bad))),
            Err(Corrupt::Result(WireError::Checksum))
        );
        let ack = frame(1, Kind::ResultAck as u8, &7u64.to_be_bytes());
        assert_eq!(
            decode(&v1_file(TAG_PENDING, 7, 700, &with_len(&ack))),
            Err(Corrupt::NotAResult {
                kind: Kind::ResultAck as u8
            })
        );
        let v2 = frame(2, result, &v1_result_body(7, 700));
        assert_eq!(
            decode(&v1_file(TAG_PENDING, 7, 700, &with_len(&v2))),
            Err(Corrupt::Result(WireError::UnsupportedVersion(2)))
        );
        assert!(matches!(
            decode(&v1_file(TAG_PENDING, 6, 700, &with_len(&f))),
            Err(Corrupt::ForeignResult { seq: 7, .. })
        ));
        // A rebooting record of version 1 is exactly the boot id.
        assert_eq!(
            decode(&v1_file(TAG_REBOOTING, 4, 40, &[9; 17])),
            Err(Corrupt::Record(WireError::TrailingBytes))
        );
    }

    #[test]
    fn every_version_2_record_is_read() {
        let result = Kind::Result as u8;
        assert_eq!(
            decode(&v2_file(TAG_EXECUTING, 5, 50, 2, &3u16.to_be_bytes())),
            Ok(CommandRecord::Executing {
                seq: 5,
                attempt: 2,
                command_id: 50,
                steps: 3
            })
        );
        let f = frame(2, result, &v2_result_body(9, 2, 90));
        let mut body = [1u8; 16].to_vec();
        body.extend_from_slice(&with_len(&f));
        assert_eq!(
            decode(&v2_file(TAG_REBOOTING, 9, 90, 2, &body)),
            Ok(CommandRecord::Rebooting {
                reboot: RebootRecord {
                    seq: 9,
                    attempt: 2,
                    command_id: 90,
                    old_boot_id: [1; 16]
                },
                result: Some(expected(9, 2, 90))
            })
        );
        let f = frame(2, result, &v2_result_body(7, 1, 700));
        // The hand-built frame is the one that release stored: the wire's own emitter's but
        // for the version byte (and so the CRC); a result without a report has the same body
        // in wire versions 2 and later.
        let mut emitted = Vec::new();
        fleetcast_wire::Message::Result(expected(7, 1, 700))
            .emit_to_vec(&mut emitted)
            .unwrap();
        assert_eq!((f[1], emitted[1]), (2, fleetcast_wire::VERSION));
        assert_eq!(f[12..], emitted[12..]);
        assert_eq!(
            decode(&v2_file(TAG_PENDING, 7, 700, 1, &with_len(&f))),
            Ok(CommandRecord::Pending {
                result: expected(7, 1, 700)
            })
        );
        assert_eq!(
            decode(&v2_file(TAG_ACKED, 7, 700, 1, &[])),
            Ok(CommandRecord::Acked {
                seq: 7,
                attempt: 1,
                command_id: 700
            })
        );

        // The length must be the frame's; the frame must parse and be this attempt's.
        let mut short = with_len(&f);
        short.pop();
        assert_eq!(
            decode(&v2_file(TAG_PENDING, 7, 700, 1, &short)),
            Err(Corrupt::Record(WireError::Truncated))
        );
        let mut long = with_len(&f);
        long.push(0);
        assert_eq!(
            decode(&v2_file(TAG_PENDING, 7, 700, 1, &long)),
            Err(Corrupt::Record(WireError::TrailingBytes))
        );
        assert_eq!(
            decode(&v2_file(
                TAG_PENDING,
                7,
                700,
                1,
                &with_len(b"not a frame at all")
            )),
            Err(Corrupt::Result(WireError::BadMagic(b'n')))
        );
        assert!(matches!(
            decode(&v2_file(TAG_PENDING, 7, 700, 2, &with_len(&f))),
            Err(Corrupt::ForeignResult { attempt: 1, .. })
        ));
        assert_eq!(
            decode(&v2_file(9, 7, 700, 1, &[])),
            Err(Corrupt::UnknownTag(9))
        );
    }

    #[test]
    fn version_1_transfer_records_are_read() {
        let mut old = 3u64.to_be_bytes().to_vec();
        old.extend_from_slice(&10_000u64.to_be_bytes());
        old.extend_from_slice(&1000u32.to_be_bytes());
        old.extend_from_slice(&[9; 32]);
        for (start, len) in [(0u32, 3u32), (5, 2)] {
            old.extend_from_slice(&start.to_be_bytes());
            old.extend_from_slice(&len.to_be_bytes());
        }
        let mut received = Ranges::new();
        received.push(0, 3).unwrap();
        received.push(5, 2).unwrap();
        let want = TransferRecord {
            task_id: 3,
            size: 10_000,
            block_size: 1000,
            sha256: [9; 32],
            received,
        };
        assert_eq!(transfer_record(&old), Ok(want.clone()));
        // It has no envelope: today's reader sees no magic, so it is the old layout.
        assert_eq!(open(&old, b"FCTR").err(), Some(Corrupt::BadMagic));
        // Cut inside a range, or ranges out of order: refused.
        assert_eq!(
            transfer_record(&old[..old.len() - 1]),
            Err(Corrupt::Record(WireError::Truncated))
        );
        let mut disorder = old[..52].to_vec();
        for (start, len) in [(5u32, 2u32), (0, 3)] {
            disorder.extend_from_slice(&start.to_be_bytes());
            disorder.extend_from_slice(&len.to_be_bytes());
        }
        assert_eq!(
            transfer_record(&disorder),
            Err(Corrupt::Record(WireError::InvalidValue))
        );
        // No range at all: a record of nothing received yet.
        assert_eq!(transfer_record(&old[..52]).unwrap().received, Ranges::new());
    }
}
