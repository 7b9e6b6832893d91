//! The event log and retention: appending events, and the bounded prunes of old events and
//! of finished commands (each engine's own, `tables.rs`).

use super::{Cx, Exec};
use crate::engine::EventOps;
use crate::error::Result;
use crate::types::{DeviceId, Event, EventId};

/// Entries a prune deleted, and where a bounded scan stopped (`None`: at the end).
struct Pruned(usize, Option<DeviceId>);

impl Pruned {
    /// Whether the prune wrote anything (see [`Exec::exec_if`](super::Exec::exec_if)).
    fn wrote(&self) -> bool {
        self.0 > 0
    }
}

impl<B: Exec> EventOps for B {
    fn append_event(&mut self, event: Event) -> Result<EventId> {
        self.exec(move |cx| {
            let id = cx.t.last_event_id()? + 1;
            cx.t.put_event(id, &event)?;
            Ok(id)
        })
    }

    fn prune_events(&mut self, older_than_ms: u64, keep_max: u64, limit: usize) -> Result<usize> {
        self.exec_if(
            move |cx| {
                let n = cx.t.prune_events(older_than_ms, keep_max, limit)?;
                Ok(Pruned(n, None))
            },
            Pruned::wrote,
        )
        .map(|p| p.0)
    }

    fn prune_results(
        &mut self,
        from: DeviceId,
        keep: u64,
        limit: usize,
    ) -> Result<(usize, Option<DeviceId>)> {
        self.exec_if(
            move |cx| prune_results(cx, from, keep, limit),
            Pruned::wrote,
        )
        .map(|p| (p.0, p.1))
    }
}

/// Deletes the finished commands (and their results) that each device from `from` on holds
/// beyond its last `keep`, visiting at most `limit` devices and deletions; says how many,
/// and the device to resume from (`None`: the scan reached the end).
fn prune_results(cx: &mut Cx<'_>, from: DeviceId, keep: u64, limit: usize) -> Result<Pruned> {
    let mut budget = limit;
    let mut deleted = 0;
    let mut dev = from.0;
    loop {
        if budget == 0 {
            return Ok(Pruned(deleted, Some(DeviceId(dev))));
        }
        budget -= 1;
        let Some((id, q)) = cx.t.queue_from(DeviceId(dev))? else {
            return Ok(Pruned(deleted, None));
        };
        if keep > 0 && q.completed_through > keep {
            let doomed =
                cx.t.command_seqs_upto(id, q.completed_through - keep, budget)?;
            for seq in &doomed {
                cx.t.del_command(id, *seq)?;
            }
            deleted += doomed.len();
            budget -= doomed.len();
            if budget == 0 {
                // This device may hold more: resume here.
                return Ok(Pruned(deleted, Some(id)));
            }
        }
        match id.0.checked_add(1) {
            Some(n) => dev = n,
            None => return Ok(Pruned(deleted, None)),
        }
    }
}
