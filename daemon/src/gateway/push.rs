//! Multicast pushes in the loop, routed and not decided: the fleet's `PreparePush` goes to
//! the distributor, the digest (or why there is none) back to the fleet as
//! [`Input::Hashed`]; the watched directory's scans; driving the distributions.

use super::*;

impl Gateway {
    /// The fleet accepted a push: the distributor maps its file and starts the digest. A file
    /// it cannot map goes back to the fleet as the push's result (the fleet answers).
    pub(super) fn prepare_push(&mut self, origin: Origin, spec: PushSpec) {
        // The fleet asks only while multicast is on (`Fleet::set_multicast` at bind).
        let Some(d) = self.mcast.dist.as_mut() else {
            tracing::error!(%origin, "push to prepare without a distributor: dropped");
            return;
        };
        if let Err(e) = d.prepare_push(origin, spec, self.wall_ms) {
            self.inputs.push(Input::Hashed {
                origin,
                result: Err(Arc::new(e)),
            });
        }
    }

    /// Digests ready from the hashing thread (or files that could not be read) go to the
    /// fleet, which creates the task or answers why not.
    pub(super) fn take_hashed(&mut self) {
        let Some(d) = self.mcast.dist.as_mut() else {
            return;
        };
        for (origin, r) in d.take_hashed() {
            let result = r.map_err(|e| Arc::new(e) as crate::fleet::PrepareError);
            self.inputs.push(Input::Hashed { origin, result });
        }
    }

    /// Scans the watched directory when due and pushes what settled there. Nothing here is
    /// a request to validate (the watch's configuration was checked at start), so its pushes
    /// go to the distributor directly; their digests go to the fleet like an operator's.
    pub(super) fn scan_watch(&mut self, now: Instant) {
        let Multicast {
            dist: Some(d),
            watch: Some(w),
            ..
        } = &mut self.mcast
        else {
            return;
        };
        if now < w.next_scan {
            return;
        }
        w.next_scan = now + w.cfg.interval;
        let entries = match crate::watch::list(&w.cfg.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %w.cfg.dir.display(), error = %e, "watched directory unreadable");
                return;
            }
        };
        let reason = format!("change in watched directory {}", w.cfg.dir.display());
        for name in w.dir.scan(&entries) {
            let path = w.cfg.dir.join(&name);
            w.pushes += 1;
            let origin = Origin::Watch { push: w.pushes };
            let spec = PushSpec {
                path: path.display().to_string(),
                group: w.cfg.group.clone(),
                block_size: w.cfg.block_size,
                rate_mbps: w.cfg.rate_mbps,
                reason: reason.clone(),
                trigger: admin::PushTrigger::default(),
                then: Vec::new(),
            };
            match d.prepare_push(origin, spec, self.wall_ms) {
                Ok(()) => {
                    tracing::info!(file = %path.display(), group = %w.cfg.group, %origin, "watched file changed: pushing");
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "watched file not pushed")
                }
            }
        }
    }

    pub(super) fn drive_distributions(&mut self, now: Instant) {
        let Some(d) = self.mcast.dist.as_mut() else {
            return;
        };
        for ev in d.drive(now) {
            match ev {
                DistEvent::Finished {
                    task,
                    completed,
                    unfinished,
                    stats,
                    deferred,
                    send_errors,
                } => tracing::info!(
                    task = task.0,
                    completed,
                    unfinished,
                    first_pass = stats.first_pass_blocks,
                    multicast_repairs = stats.multicast_repairs,
                    parity = stats.parity_symbols,
                    unicast_repairs = stats.unicast_repairs,
                    bytes = stats.bytes,
                    nacks = stats.nacks,
                    deferred,
                    send_errors,
                    "distribution finished"
                ),
            }
        }
    }
}
