//! The event log and retention: appending events, and the bounded prunes of old events and
//! of finished commands (each engine's own, `tables.rs`).

use super::Exec;
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
            move |cx| {
                let (n, next) = cx.t.prune_results(from, keep, limit)?;
                Ok(Pruned(n, next))
            },
            Pruned::wrote,
        )
        .map(|p| (p.0, p.1))
    }
}
