//! Multicast pushes in the loop: digests ready from the hashing thread, the watched
//! directory's scans, and driving the distributions.

use super::*;

impl Gateway {
    /// Pushes whose file digest is ready go to the fleet (which creates their task); a file
    /// that could not be read is refused to whoever asked.
    pub(super) fn take_hashed(&mut self, now: Instant) {
        let Some(d) = self.dist.as_mut() else { return };
        for (conn, r) in d.take_hashed() {
            match r {
                Ok(task) => self.inputs.push(Input::Push { conn, task }),
                Err(e) => {
                    tracing::warn!(conn, error = %e, "push refused");
                    self.apply(
                        Action::Reply {
                            conn,
                            resp: Response::err(e.to_string()),
                        },
                        now,
                    );
                }
            }
        }
    }

    /// Scans the watched directory when due and pushes what settled there.
    pub(super) fn scan_watch(&mut self, now: Instant) {
        let (Some((cfg, watch, next)), Some(d)) = (self.watch.as_mut(), self.dist.as_mut()) else {
            return;
        };
        if now < *next {
            return;
        }
        *next = now + cfg.interval;
        let entries = match crate::watch::list(&cfg.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %cfg.dir.display(), error = %e, "watched directory unreadable");
                return;
            }
        };
        let origin = format!("change in watched directory {}", cfg.dir.display());
        for name in watch.scan(&entries) {
            let path = cfg.dir.join(&name);
            let conn = self.watch_conn;
            self.watch_conn -= 1;
            let spec = PushSpec {
                path: &path.display().to_string(),
                group: &cfg.group,
                block_size: cfg.block_size,
                rate_mbps: cfg.rate_mbps,
                origin: &origin,
                trigger: admin::PushTrigger::default(),
                then: Vec::new(),
            };
            match d.prepare_push(conn, spec, self.wall_ms) {
                Ok(()) => {
                    tracing::info!(file = %path.display(), group = %cfg.group, "watched file changed: pushing");
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "watched file not pushed")
                }
            }
        }
    }

    pub(super) fn drive_distributions(&mut self, now: Instant) {
        let Some(d) = self.dist.as_mut() else { return };
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
