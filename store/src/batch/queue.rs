//! Command queues: enqueue, transmission, results, timeouts, reboots and operator actions.

use super::{Cx, Exec, Recorded};
use crate::engine::QueueOps;
use crate::error::{Error, Illegal, Result};
use crate::queue::AfterFailure;
use fleetcast_wire::{self as wire, Embed};

use crate::types::{boot_hex, Command, DeviceId, FailReason, QueueStatus, Received, StoredResult};

impl<B: Exec> QueueOps for B {
    fn enqueue(&mut self, dev: DeviceId, cmd: Command) -> Result<u64> {
        self.exec(move |cx| {
            validate_command(dev, &cmd)?;
            let mut q = cx.live_queue(dev)?;
            let seq = q.enqueue();
            cx.t.put_command(dev, seq, &cmd)?;
            cx.put_queue(dev, &q)?;
            Ok(seq)
        })
    }

    fn enqueue_group(&mut self, group: &str, cmd: Command) -> Result<Vec<(DeviceId, u64)>> {
        let group = group.to_owned();
        self.exec(move |cx| enqueue_group(cx, &group, &cmd))
    }

    fn mark_transmitted(&mut self, dev: DeviceId, seq: u64, now_ms: u64) -> Result<u32> {
        self.exec(move |cx| mark_transmitted(cx, dev, seq, now_ms))
    }

    fn redeliver(&mut self, dev: DeviceId, seq: u64, now_ms: u64) -> Result<u32> {
        self.exec(move |cx| {
            let mut q = cx.live_queue(dev)?;
            let attempt = q
                .redeliver(seq, now_ms)
                .map_err(|k| Error::illegal(dev, k))?;
            cx.put_queue(dev, &q)?;
            Ok(attempt)
        })
    }

    fn record_result(
        &mut self,
        dev: DeviceId,
        seq: u64,
        attempt: u32,
        mut result: Received,
    ) -> Result<Recorded> {
        result.bound();
        let result = StoredResult::Received(result);
        self.exec(move |cx| record_result(cx, dev, seq, attempt, &result))
    }

    fn command_timed_out(&mut self, dev: DeviceId, seq: u64, now_ms: u64) -> Result<QueueStatus> {
        self.exec(move |cx| command_timed_out(cx, dev, seq, now_ms))
    }

    fn reboot_started(
        &mut self,
        dev: DeviceId,
        seq: u64,
        deadline_ms: u64,
        boot_id: &str,
    ) -> Result<()> {
        let boot = boot_id.to_owned();
        self.exec(move |cx| {
            let mut q = cx.queue(dev)?;
            let has_reboot = cx.t.command(dev, seq)?.is_some_and(|c| c.has_reboot());
            q.reboot_started(seq, has_reboot, deadline_ms, &boot)
                .map_err(|k| Error::illegal(dev, k))?;
            cx.put_queue(dev, &q)
        })
    }

    fn boot_at_dispatch(&mut self, dev: DeviceId, seq: u64, boot_id: &str) -> Result<()> {
        let boot = boot_id.to_owned();
        self.exec(move |cx| {
            let mut q = cx.queue(dev)?;
            q.boot_at_dispatch(seq, &boot)
                .map_err(|k| Error::illegal(dev, k))?;
            cx.put_queue(dev, &q)
        })
    }

    fn reboot_completed(
        &mut self,
        dev: DeviceId,
        seq: u64,
        attempt: u32,
        report: wire::ConfigReport<'static>,
        mut result: Received,
        now_ms: u64,
    ) -> Result<QueueStatus> {
        result.bound();
        let result = StoredResult::Received(result);
        self.exec(move |cx| reboot_completed(cx, dev, seq, attempt, &report, &result, now_ms))
    }

    fn reboot_deadline_missed(&mut self, dev: DeviceId, now_ms: u64) -> Result<()> {
        self.exec(move |cx| {
            let mut q = cx.queue(dev)?;
            q.reboot_deadline_missed(now_ms)
                .map_err(|k| Error::illegal(dev, k))?;
            cx.put_queue(dev, &q)
        })
    }

    fn pause(&mut self, dev: DeviceId) -> Result<()> {
        self.exec(move |cx| {
            let mut q = cx.queue(dev)?;
            q.pause().map_err(|k| Error::illegal(dev, k))?;
            cx.put_queue(dev, &q)
        })
    }

    fn resume(&mut self, dev: DeviceId) -> Result<()> {
        self.exec(move |cx| {
            let mut q = cx.queue(dev)?;
            let pending = cx.first_after(dev, q.completed_through)?.is_some();
            q.resume(pending).map_err(|k| Error::illegal(dev, k))?;
            cx.put_queue(dev, &q)
        })
    }

    fn retry(&mut self, dev: DeviceId) -> Result<()> {
        self.exec(move |cx| {
            let mut q = cx.queue(dev)?;
            q.retry().map_err(|k| Error::illegal(dev, k))?;
            cx.put_queue(dev, &q)
        })
    }

    fn skip(&mut self, dev: DeviceId) -> Result<()> {
        self.exec(move |cx| skip(cx, dev))
    }

    fn cancel(&mut self, dev: DeviceId) -> Result<u64> {
        self.exec(move |cx| cancel(cx, dev))
    }
}

fn enqueue_group(cx: &mut Cx<'_>, group: &str, cmd: &Command) -> Result<Vec<(DeviceId, u64)>> {
    let members = cx.t.group_members(group)?;
    if members.is_empty() {
        return Err(Error::NotFound(crate::error::Missing::Group(
            group.to_owned(),
        )));
    }
    validate_command(members[0], cmd)?;
    let mut targets = Vec::with_capacity(members.len());
    for m in members {
        let q = cx.queue(m)?;
        if !q.revoked {
            targets.push((m, q));
        }
    }
    let mut out = Vec::with_capacity(targets.len());
    for (m, mut q) in targets {
        let seq = q.enqueue();
        cx.t.put_command(m, seq, cmd)?;
        cx.put_queue(m, &q)?;
        out.push((m, seq));
    }
    Ok(out)
}

fn mark_transmitted(cx: &mut Cx<'_>, dev: DeviceId, seq: u64, now: u64) -> Result<u32> {
    let mut q = cx.live_queue(dev)?;
    let first = if q.status == QueueStatus::Running {
        cx.first_after(dev, q.completed_through)?
    } else {
        q.cursor
    };
    let max =
        cx.t.command_policy(dev, seq)?
            .map_or(u32::MAX, |c| c.max_attempts);
    let attempt = q
        .mark_transmitted(seq, first, max, now)
        .map_err(|k| Error::illegal(dev, k))?;
    cx.put_queue(dev, &q)?;
    Ok(attempt)
}

fn record_result(
    cx: &mut Cx<'_>,
    dev: DeviceId,
    seq: u64,
    attempt: u32,
    result: &StoredResult,
) -> Result<Recorded> {
    use crate::codec::Record;
    let mut q = cx.queue(dev)?;
    // Duplicate detection compares encodings: no decode (nor copy) of the stored result.
    let Cx { t, scratch: mine } = cx;
    result
        .encode(mine)
        .map_err(|_| Error::illegal(dev, Illegal::Invalid("result over the wire's limits")))?;
    let mut duplicate = false;
    let existing = t.with_result_bytes(dev, seq, &mut |v| {
        // A record of an older format (kept before an upgrade) has other bytes for the same
        // result: compared decoded.
        duplicate = StoredResult::same_received(v, mine)
            || (v.first() != mine.first() && StoredResult::same_decoded(v, result));
    })?;
    if duplicate {
        return Ok(Recorded::Duplicate);
    }
    if !q.accepts_result(seq, attempt) {
        let kind = if q.accepts_result(seq, q.attempt) {
            Illegal::StaleAttempt {
                seq,
                attempt,
                current: q.attempt,
            }
        } else if existing {
            Illegal::ConflictingResult { seq }
        } else if q.cursor.is_none_or(|c| seq > c) {
            Illegal::NotTransmitted { seq }
        } else {
            Illegal::WrongStatus {
                op: "record_result",
                status: q.status,
            }
        };
        return Err(Error::illegal(dev, kind));
    }
    cx.finish_attempt(dev, &mut q, seq, result)?;
    Ok(Recorded::Stored(q.status))
}

fn command_timed_out(cx: &mut Cx<'_>, dev: DeviceId, seq: u64, now: u64) -> Result<QueueStatus> {
    let mut q = cx.queue(dev)?;
    let policy = match cx.t.command_policy(dev, seq)? {
        Some(p) => p,
        None => return Err(Error::illegal(dev, Illegal::NotTransmitted { seq })),
    };
    q.check_timeout(seq, policy.timeout_ms, now)
        .map_err(|k| Error::illegal(dev, k))?;
    let more = cx.first_after(dev, seq)?.is_some();
    if q.command_failed(&policy, FailReason::AttemptsExhausted, more) == AfterFailure::MovedOn {
        let r = StoredResult::TimedOut { at_ms: now };
        cx.t.put_result(dev, seq, &r)?;
    }
    cx.put_queue(dev, &q)?;
    Ok(q.status)
}

fn reboot_completed(
    cx: &mut Cx<'_>,
    dev: DeviceId,
    seq: u64,
    attempt: u32,
    report: &wire::ConfigReport<'static>,
    result: &StoredResult,
    now: u64,
) -> Result<QueueStatus> {
    let mut q = cx.queue(dev)?;
    let has_reboot = cx.t.command(dev, seq)?.is_some_and(|c| c.has_reboot());
    q.check_reboot_completed(seq, attempt, has_reboot, &boot_hex(&report.boot_id))
        .map_err(|k| Error::illegal(dev, k))?;
    let mut x = cx.device(dev)?;
    // A record from before the boot left was kept: the last report's boot is the best the
    // store knows.
    if q.boot_left.is_none()
        && x.report
            .as_ref()
            .is_some_and(|r| r.boot_id == report.boot_id)
    {
        return Err(Error::illegal(dev, Illegal::BootIdUnchanged));
    }
    x.report = Some(report.clone());
    x.report_ms = Some(now);
    x.last_seen_ms = Some(now);
    cx.t.put_device(&x)?;
    cx.finish_attempt(dev, &mut q, seq, result)?;
    Ok(q.status)
}

fn skip(cx: &mut Cx<'_>, dev: DeviceId) -> Result<()> {
    let mut q = cx.queue(dev)?;
    if q.status != QueueStatus::Failed {
        return Err(Error::illegal(
            dev,
            Illegal::WrongStatus {
                op: "skip",
                status: q.status,
            },
        ));
    }
    let cursor = q.cursor.ok_or(Error::Corrupt {
        table: "queues",
        reason: "failed queue without cursor",
    })?;
    let more = cx.first_after(dev, cursor)?.is_some();
    q.skip(more).map_err(|k| Error::illegal(dev, k))?;
    if cx.t.result(dev, cursor)?.is_none() {
        cx.t.put_result(dev, cursor, &StoredResult::Skipped)?;
    }
    cx.put_queue(dev, &q)
}

fn cancel(cx: &mut Cx<'_>, dev: DeviceId) -> Result<u64> {
    let mut q = cx.queue(dev)?;
    q.cancel();
    let doomed =
        cx.t.command_seqs_from(dev, q.completed_through.saturating_add(1))?;
    // A cancelled command can no longer be the cursor: its late result is refused.
    if q.cursor.is_some_and(|c| doomed.contains(&c)) {
        q.cursor = None;
        q.attempts = 0;
    }
    for s in &doomed {
        cx.t.del_command(dev, *s)?;
    }
    cx.put_queue(dev, &q)?;
    Ok(doomed.len() as u64)
}

fn validate_command(dev: DeviceId, cmd: &Command) -> Result<()> {
    if cmd.steps.is_empty() {
        return Err(Error::illegal(
            dev,
            Illegal::Invalid("command has no steps"),
        ));
    }
    if cmd.max_attempts == 0 {
        return Err(Error::illegal(dev, Illegal::Invalid("max_attempts is 0")));
    }
    // Refused here, not when the record is written: an illegal command leaves the batch valid.
    let mut probe = Vec::new();
    let fits = cmd.steps.len() <= wire::limits::MAX_STEPS
        && cmd.steps.iter().all(|s| {
            probe.clear();
            s.encode_to_vec(&mut probe).is_ok()
        });
    if !fits {
        return Err(Error::illegal(
            dev,
            Illegal::Invalid("command over the wire's limits"),
        ));
    }
    Ok(())
}
