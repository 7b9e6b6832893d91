//! The event log and retention: appending events, and the bounded prunes of old events and
//! of finished commands.

use lmdb::{Transaction, WriteFlags};

use super::{Batch, Cx};
use crate::codec::Record;
use crate::engine::EventOps;
use crate::env::{self, key2};
use crate::error::Result;
use crate::read;
use crate::types::{DeviceId, Event, EventId, QueueState};

/// Entries a prune deleted, and where a bounded scan stopped (`None`: at the end).
struct Pruned(usize, Option<DeviceId>);

impl Pruned {
    /// Whether the prune wrote anything (see [`Batch::exec_if`]).
    fn wrote(&self) -> bool {
        self.0 > 0
    }
}

impl EventOps for Batch<'_> {
    fn append_event(&mut self, event: Event) -> Result<EventId> {
        self.exec(move |cx| {
            let id = read::last_event_id(&*cx.t, cx.d)? + 1;
            event.encode(cx.buf)?;
            cx.t.put(
                cx.d.events,
                &id.to_be_bytes(),
                &cx.buf.as_slice(),
                WriteFlags::APPEND,
            )?;
            Ok(id)
        })
    }

    fn prune_events(&mut self, older_than_ms: u64, keep_max: u64, limit: usize) -> Result<usize> {
        self.exec_if(
            move |cx| prune_events(cx, older_than_ms, keep_max, limit),
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

fn prune_events(
    cx: &mut Cx<'_, '_>,
    older_than: u64,
    keep_max: u64,
    limit: usize,
) -> Result<Pruned> {
    let d = *cx.d;
    let last = read::last_event_id(&*cx.t, &d)?;
    let entries = cx.t.stat(d.events)?.entries() as u64;
    let mut doomed = Vec::new();
    env::scan(&*cx.t, d.events, &[], &[], |k, v| {
        let id = env::be(k, "events")?;
        if id >= last || doomed.len() >= limit {
            return Ok(false);
        }
        let left = entries - doomed.len() as u64;
        let too_many = keep_max > 0 && left > keep_max;
        let too_old = !too_many && older_than > 0 && Event::decode(v)?.time_ms < older_than;
        if !(too_many || too_old) {
            return Ok(false);
        }
        doomed.push(id);
        Ok(true)
    })?;
    for id in &doomed {
        cx.del(d.events, &id.to_be_bytes())?;
    }
    Ok(Pruned(doomed.len(), None))
}

fn prune_results(cx: &mut Cx<'_, '_>, from: DeviceId, keep: u64, limit: usize) -> Result<Pruned> {
    let d = *cx.d;
    let mut budget = limit;
    let mut deleted = 0;
    let mut dev = from.0;
    loop {
        if budget == 0 {
            return Ok(Pruned(deleted, Some(DeviceId(dev))));
        }
        budget -= 1;
        // The first device at or after `dev`.
        let mut next = None;
        env::scan(&*cx.t, d.queues, &dev.to_be_bytes(), &[], |k, v| {
            next = Some((env::be(k, "queues")?, QueueState::decode(v)?));
            Ok(false)
        })?;
        let Some((id, q)) = next else {
            return Ok(Pruned(deleted, None));
        };
        if keep > 0 && q.completed_through > keep {
            let upto = q.completed_through - keep;
            let mut doomed = Vec::new();
            env::scan(
                &*cx.t,
                d.commands,
                &key2(id, 0),
                &id.to_be_bytes(),
                |k, _| {
                    let (_, seq) = env::split2(k, "commands")?;
                    if seq > upto || doomed.len() >= budget {
                        return Ok(false);
                    }
                    doomed.push(seq);
                    Ok(true)
                },
            )?;
            for seq in &doomed {
                cx.del(d.commands, &key2(id, *seq))?;
                cx.del(d.results, &key2(id, *seq))?;
            }
            deleted += doomed.len();
            budget -= doomed.len();
            if budget == 0 {
                // This device may hold more: resume here.
                return Ok(Pruned(deleted, Some(DeviceId(id))));
            }
        }
        match id.checked_add(1) {
            Some(n) => dev = n,
            None => return Ok(Pruned(deleted, None)),
        }
    }
}
