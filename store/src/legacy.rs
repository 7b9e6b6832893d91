//! Format 1 records, written before the wire messages became the store's data model: steps,
//! results and configuration reports in store-only layouts. They are read and converted to
//! today's types, never written: a record is rewritten in format 2 the next time it changes.
//! Nothing is invented in the conversion; what format 1 did not keep is said where it is set.

use std::borrow::Cow;

use fleetcast_wire as wire;

use crate::codec::Reader;
use crate::error::Result;
use crate::result::{Received, StoredResult, OUTPUT_EXCERPT_MAX};

/// A format-1 configuration report (the boot id was kept as hex text).
pub(crate) fn report(r: &mut Reader<'_>) -> Result<wire::ConfigReport<'static>> {
    let os = r.string()?;
    let kernel = r.string()?;
    let hostname = r.string()?;
    let addresses = r.strings()?;
    let n = r.count(8)?;
    let mut software = Vec::with_capacity(n);
    for _ in 0..n {
        software.push(wire::Package {
            name: r.string()?.into(),
            version: r.string()?.into(),
        });
    }
    let agent_version = r.string()?;
    let boot = r.string()?;
    let boot_id =
        unhex16(&boot).ok_or_else(|| r.corrupt("format-1 boot id is not 32 hex digits"))?;
    Ok(wire::ConfigReport {
        boot_id,
        os: os.into(),
        kernel: kernel.into(),
        hostname: hostname.into(),
        agent_version: agent_version.into(),
        addresses: addresses.into_iter().map(Cow::Owned).collect(),
        software,
        ..Default::default()
    })
}

fn unhex16(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (o, pair) in out.iter_mut().zip(b.chunks(2)) {
        *o = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// A format-1 command's steps.
pub(crate) fn steps(r: &mut Reader<'_>) -> Result<Vec<wire::Step<'static>>> {
    let n = r.count(1)?;
    let mut steps = Vec::with_capacity(n);
    for _ in 0..n {
        steps.push(match r.u8()? {
            1 => wire::Step::Fetch {
                url: r.string()?.into(),
                path: r.string()?.into(),
            },
            2 => wire::Step::Verify {
                path: r.string()?.into(),
                sha256: r.array()?,
            },
            3 => wire::Step::Write {
                path: r.string()?.into(),
                mode: r.u32()?,
                contents: r.bytes()?.to_vec().into(),
            },
            4 => wire::Step::Exec {
                argv: r.strings()?.into_iter().map(Cow::Owned).collect(),
            },
            5 => wire::Step::Reboot,
            6 => wire::Step::Report,
            _ => return Err(r.corrupt("bad step kind")),
        });
    }
    Ok(steps)
}

/// One step of a format-1 result.
struct Step1 {
    status: wire::StepStatus,
    exit_code: Option<i32>,
    output: Vec<u8>,
    started_ms: u64,
    finished_ms: u64,
}

/// A format-1 result. Format 1 kept, per step, an outcome (a timed-out step was already
/// `failed`), an exit code, the step's start and end (laid end to end back from the reception
/// time, so their differences are the reported durations and the last end is the reception
/// time) and an output excerpt (on the last step). The gateway's own records (a timeout, a
/// skip) were one step without an exit code. The command id and attempt were not kept: they
/// are 0, and the sequence number is the record key's (set by `read::result`).
pub(crate) fn result(r: &mut Reader<'_>) -> Result<StoredResult> {
    let n = r.count(22)?;
    let mut steps = Vec::with_capacity(n);
    for _ in 0..n {
        let status = match r.u8()? {
            0 => wire::StepStatus::Ok,
            1 => wire::StepStatus::Failed,
            2 => wire::StepStatus::Skipped,
            _ => return Err(r.corrupt("bad step outcome")),
        };
        let exit_code = match r.u8()? {
            0 => None,
            1 => Some(r.i32()?),
            _ => return Err(r.corrupt("bad exit code tag")),
        };
        steps.push(Step1 {
            status,
            exit_code,
            output: r.bytes()?.to_vec(),
            started_ms: r.u64()?,
            finished_ms: r.u64()?,
        });
    }
    if !steps.is_empty() && steps.iter().all(|s| s.exit_code.is_none()) {
        return Ok(
            if steps.iter().any(|s| s.status == wire::StepStatus::Failed) {
                StoredResult::TimedOut {
                    at_ms: steps.iter().map(|s| s.finished_ms).max().unwrap_or(0),
                }
            } else {
                StoredResult::Skipped
            },
        );
    }
    let exit_code = steps
        .iter()
        .find(|s| s.status == wire::StepStatus::Failed)
        .and_then(|s| s.exit_code)
        .unwrap_or(0);
    let mut output: Vec<u8> = steps
        .iter()
        .flat_map(|s| s.output.iter().copied())
        .collect();
    if output.len() > OUTPUT_EXCERPT_MAX {
        output.drain(..output.len() - OUTPUT_EXCERPT_MAX);
    }
    let at_ms = steps.last().map_or(0, |s| s.finished_ms);
    let steps = steps
        .iter()
        .map(|s| wire::StepResult {
            status: s.status,
            exit_code: s.exit_code.unwrap_or(0),
            duration_ms: u32::try_from(s.finished_ms.saturating_sub(s.started_ms))
                .unwrap_or(u32::MAX),
        })
        .collect();
    Ok(StoredResult::Received(Received {
        result: wire::CommandResult {
            command_id: 0,
            seq: 0,
            attempt: 0,
            exit_code,
            steps,
            output: output.into(),
            report: None,
        },
        at_ms,
    }))
}

#[cfg(test)]
mod tests {
    use lmdb::Transaction;

    use super::*;
    use crate::codec::{Record, Writer, FORMAT_1, FORMAT_2, VERSION};
    use crate::env::{key2, META_SCHEMA};
    use crate::prelude::*;
    use crate::{Command, Device, OnFailure, Store};

    /// Byte for byte what the format-1 code wrote (its `Writer` with version byte 1).
    fn format1(fields: impl FnOnce(&mut Writer<'_>)) -> Vec<u8> {
        let mut buf = Vec::new();
        fields(&mut Writer::new(&mut buf));
        buf[0] = FORMAT_1;
        buf
    }

    const BOOT: &str = "00112233445566778899aabbccddeeff";

    fn old_device(id: u64) -> Vec<u8> {
        format1(|w| {
            w.u64(id);
            w.str("rack4-node17");
            w.raw(&[7; 32]);
            w.bool(false);
            w.u64(100);
            w.opt_u64(Some(200));
            w.u8(1); // a report
            w.str("Debian GNU/Linux 12");
            w.str("6.1.0-18-amd64");
            w.str("rack4-node17");
            w.len(1);
            w.str("10.77.0.17/16");
            w.len(1);
            w.str("nginx");
            w.str("1.22.1-9");
            w.str("0.1.0");
            w.str(BOOT);
            w.u8(1); // transport: native
        })
    }

    fn old_command() -> Vec<u8> {
        format1(|w| {
            w.u64(60_000);
            w.u32(3);
            w.u8(1); // continue
            w.len(3);
            w.u8(3); // write
            w.str("/etc/app.conf");
            w.u32(0o644);
            w.bytes(b"port=80\n");
            w.u8(4); // exec
            w.len(2);
            w.str("/bin/sh");
            w.str("-c");
            w.u8(5); // reboot
        })
    }

    /// A device's result as format 1 kept it: step times laid end to end back from the
    /// reception at 10_000, the output on the last step.
    fn old_result() -> Vec<u8> {
        format1(|w| {
            w.len(2);
            w.u8(1); // failed (the agent said: timed out)
            w.u8(1);
            w.raw(&124i32.to_le_bytes());
            w.bytes(b"");
            w.u64(8_000);
            w.u64(9_500);
            w.u8(2); // skipped
            w.u8(1);
            w.raw(&0i32.to_le_bytes());
            w.bytes(b"sleep: killed\n");
            w.u64(9_500);
            w.u64(10_000);
        })
    }

    fn old_synthetic(outcome: u8, note: &str, at: u64) -> Vec<u8> {
        format1(|w| {
            w.len(1);
            w.u8(outcome);
            w.u8(0); // no exit code: the gateway's own record
            w.bytes(note.as_bytes());
            w.u64(at);
            w.u64(at);
        })
    }

    #[test]
    fn format1_records_decode_into_the_wire_model() {
        let d = Device::decode(&old_device(3)).unwrap();
        let r = d.report.unwrap();
        assert_eq!(r.boot_id[..4], [0x00, 0x11, 0x22, 0x33]);
        assert_eq!(
            (&*r.os, &*r.hostname),
            ("Debian GNU/Linux 12", "rack4-node17")
        );
        assert_eq!(r.addresses, ["10.77.0.17/16"]);
        assert_eq!(
            (&*r.software[0].name, &*r.software[0].version),
            ("nginx", "1.22.1-9")
        );
        assert_eq!(d.last_seen_ms, Some(200));

        let c = Command::decode(&old_command()).unwrap();
        assert_eq!(
            (c.timeout_ms, c.max_attempts, c.on_failure),
            (60_000, 3, OnFailure::Continue)
        );
        assert_eq!(
            c.steps,
            [
                wire::Step::Write {
                    path: "/etc/app.conf".into(),
                    mode: 0o644,
                    contents: b"port=80\n".into()
                },
                wire::Step::Exec {
                    argv: vec!["/bin/sh".into(), "-c".into()]
                },
                wire::Step::Reboot,
            ]
        );

        let StoredResult::Received(x) = StoredResult::decode(&old_result()).unwrap() else {
            panic!("a device's result")
        };
        assert_eq!(x.at_ms, 10_000, "the reception time format 1 kept");
        assert_eq!(x.result.exit_code, 124, "the first failed step's");
        assert_eq!(
            x.result.steps,
            [
                wire::StepResult {
                    status: wire::StepStatus::Failed,
                    exit_code: 124,
                    duration_ms: 1_500
                },
                wire::StepResult {
                    status: wire::StepStatus::Skipped,
                    exit_code: 0,
                    duration_ms: 500
                },
            ]
        );
        assert_eq!(*x.result.output, *b"sleep: killed\n");
        assert!(!x.succeeded());

        assert_eq!(
            StoredResult::decode(&old_synthetic(1, "timed out", 77)).unwrap(),
            StoredResult::TimedOut { at_ms: 77 }
        );
        assert_eq!(
            StoredResult::decode(&old_synthetic(2, "skipped", 0)).unwrap(),
            StoredResult::Skipped
        );
        // A format-1 boot id that is not the hex of 16 bytes is corruption, not a guess.
        let mut bad = old_device(3);
        let at = bad
            .windows(BOOT.len())
            .position(|w| w == BOOT.as_bytes())
            .unwrap();
        bad[at] = b'x';
        assert!(Device::decode(&bad).is_err());
    }

    #[test]
    fn a_schema1_store_opens_reads_and_rewrites_in_format2() {
        let dir = tempfile::tempdir().unwrap();
        let dev = {
            let mut s = Store::open(dir.path()).unwrap();
            let mut b = s.batch().unwrap();
            let dev = b.add_device("rack4-node17", [7; 32], 100).unwrap();
            b.commit().unwrap();
            // What the format-1 build left: its records and schema 1.
            let mut t = s.env.begin_rw_txn().unwrap();
            let put = |t: &mut lmdb::RwTransaction<'_>, db, k: &[u8], v: &[u8]| {
                t.put(db, &k, &v, lmdb::WriteFlags::empty()).unwrap()
            };
            put(
                &mut t,
                s.dbs.devices,
                &dev.0.to_be_bytes(),
                &old_device(dev.0),
            );
            put(&mut t, s.dbs.commands, &key2(dev.0, 1), &old_command());
            put(&mut t, s.dbs.results, &key2(dev.0, 1), &old_result());
            put(&mut t, s.dbs.meta, META_SCHEMA, &1u32.to_le_bytes());
            t.commit().unwrap();
            dev
        };
        let mut s = Store::open(dir.path()).unwrap();
        {
            let t = s.env.begin_ro_txn().unwrap();
            assert_eq!(
                t.get(s.dbs.meta, &META_SCHEMA).unwrap(),
                crate::SCHEMA_VERSION.to_le_bytes()
            );
        }
        let snap = s.snapshot().unwrap();
        assert_eq!(
            snap.device(dev).unwrap().unwrap().report.unwrap().boot_id[15],
            0xff
        );
        assert_eq!(snap.command(dev, 1).unwrap().unwrap().steps.len(), 3);
        let Some(StoredResult::Received(x)) = snap.result(dev, 1).unwrap() else {
            panic!("a device's result")
        };
        assert_eq!(x.result.seq, 1, "the key's");
        drop(snap);
        // A change rewrites the record in today's format.
        let mut b = s.batch().unwrap();
        let mut report = b.device(dev).unwrap().unwrap().report.unwrap();
        report.hostname = "renamed".into();
        b.set_report(dev, report, 300).unwrap();
        b.commit().unwrap();
        let t = s.env.begin_ro_txn().unwrap();
        let raw = t.get(s.dbs.devices, &dev.0.to_be_bytes()).unwrap();
        assert_eq!(raw[0], VERSION);
        let d = Device::decode(raw).unwrap();
        assert_eq!(&*d.report.unwrap().hostname, "renamed");
        assert_eq!(
            d.report_ms,
            Some(300),
            "today's format keeps the report's time"
        );
    }

    /// A device record as format 2 wrote it: today's fields up to the transport, the report
    /// embedded in the wire layout, no report time.
    #[test]
    fn format2_device_reads_with_its_report_and_no_report_time() {
        let report = wire::ConfigReport {
            boot_id: [5; 16],
            os: "Debian GNU/Linux 12".into(),
            kernel: "6.1.0-18-amd64".into(),
            hostname: "rack4-node17".into(),
            agent_version: "0.1.0".into(),
            addresses: vec!["10.77.0.17/16".into()],
            software: vec![wire::Package {
                name: "nginx".into(),
                version: "1.22.1-9".into(),
            }],
            ..Default::default()
        };
        // Wire version 2's report layout is today's without the fields version 3 appended:
        // package manager u8, cpu model str16, cpus u16, memory u64, devices list (15 bytes
        // when empty, as they are in `report`).
        let mut v2 = Vec::new();
        wire::Embed::encode_to_vec(&report, &mut v2).unwrap();
        let cut = v2.len() - 15;
        assert!(v2[cut..].iter().all(|&b| b == 0));
        v2.truncate(cut);
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        w.u64(9);
        w.str("rack4-node17");
        w.raw(&[7; 32]);
        w.bool(false);
        w.u64(100);
        w.opt_u64(Some(200));
        w.u8(1); // a report
        w.bytes(&v2);
        w.u8(1); // transport: native
        buf[0] = FORMAT_2;
        let d = Device::decode(&buf).unwrap();
        assert_eq!(d.report.as_ref(), Some(&report));
        assert_eq!(d.report_ms, None);
        assert_eq!(d.last_seen_ms, Some(200));
        assert_eq!(d.transport, Some(crate::Transport::Native));
        // The same bytes with a format-3 version byte lack the report time: refused.
        buf[0] = VERSION;
        assert!(Device::decode(&buf).is_err());
    }

    /// A device's result as format 2 kept it: wire version 2's `Result` body, whose report
    /// lacked what version 3 added, then the reception time.
    #[test]
    fn format2_result_reads_with_its_report() {
        let result = wire::CommandResult {
            command_id: 70,
            seq: 7,
            attempt: 1,
            exit_code: 0,
            steps: vec![],
            output: b"ok\n".to_vec().into(),
            report: Some(wire::ConfigReport {
                hostname: "n7".into(),
                ..Default::default()
            }),
        };
        let mut v2 = Vec::new();
        wire::Embed::encode_to_vec(&result, &mut v2).unwrap();
        // The report is last: its version-3 fields (15 bytes, empty here) end the body.
        let cut = v2.len() - 15;
        assert!(v2[cut..].iter().all(|&b| b == 0));
        v2.truncate(cut);
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        w.u8(crate::result::RESULT_RECEIVED);
        w.bytes(&v2);
        w.u64(9_000);
        buf[0] = FORMAT_2;
        let Ok(StoredResult::Received(x)) = StoredResult::decode(&buf) else {
            panic!("a device's result")
        };
        assert_eq!((x.result, x.at_ms), (result, 9_000));
    }

    /// A command record as format 2 wrote it (no target) reads without one; today's keeps
    /// its target.
    #[test]
    fn format2_command_reads_without_a_target_and_today_s_keeps_it() {
        let step = wire::Step::Exec {
            argv: vec!["/bin/true".into()],
        };
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        w.u64(60_000);
        w.u32(3);
        w.u8(0); // stop
        w.len(1);
        w.embed(&step);
        buf[0] = FORMAT_2;
        let c = Command::decode(&buf).unwrap();
        assert_eq!((c.steps, c.target), (vec![step.clone()], None));
        let cmd = Command {
            steps: vec![step],
            timeout_ms: 1,
            max_attempts: 1,
            on_failure: OnFailure::Stop,
            target: Some(wire::Target {
                kind: wire::AttachedKind::Serial,
                id: "/dev/ttyUSB0".into(),
            }),
        };
        let mut raw = Vec::new();
        cmd.encode(&mut raw).unwrap();
        assert_eq!(raw[0], VERSION);
        assert_eq!(Command::decode(&raw).unwrap(), cmd);
        // A target kind no version defines is corruption.
        let at = raw.len() - (2 + 4 + "/dev/ttyUSB0".len()) + 1;
        assert_eq!(raw[at], wire::AttachedKind::Serial as u8);
        raw[at] = 9;
        assert!(Command::decode(&raw).is_err());
    }
}
