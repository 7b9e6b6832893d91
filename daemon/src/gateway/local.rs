//! Requests the loop serves itself, not the fleet: the metrics endpoint and `fleetcast
//! metrics`, and `fleetcast backup`.

use super::*;

impl Gateway {
    /// The metrics of this gateway now (what `GET /metrics` and `fleetcast metrics` show).
    pub fn metrics(&self) -> Result<Vec<metrics::Family>, fleetcast_store::Error> {
        let mut live = metrics::Live {
            sessions: 0,
            connections: self.conns.len(),
            counters: self.telemetry.counters,
            mcast: self.mcast.dist.as_ref().map(|d| d.totals()),
        };
        self.fleet.call(move |f| {
            live.sessions = f.online();
            metrics::gather(f.store(), &live)
        })
    }

    pub(super) fn metrics_event(&mut self, token: Token, now: Instant) {
        let Some(mut srv) = self.telemetry.endpoint.take() else {
            return;
        };
        srv.handle(self.poll.registry(), token, now, || match self.metrics() {
            Ok(f) => metrics::render(&f),
            Err(e) => format!("# metrics unavailable: {e}\n"),
        });
        self.telemetry.endpoint = Some(srv);
    }

    /// Requests the loop serves itself (not the fleet): metrics and backup.
    pub(super) fn serve_local(&mut self, idx: usize, req: Request) {
        self.telemetry.counters.admin_requests += 1;
        let resp = match req {
            Request::Metrics => match self.metrics() {
                Ok(f) => Response::ok(serde_json::json!({
                    "text": metrics::render(&f),
                    "samples": metrics::to_json(&f),
                })),
                Err(e) => Response::err(format!("cannot read the store: {e}")),
            },
            Request::Backup { dest } => self.backup(&dest),
            _ => Response::err("not a local request"),
        };
        if let Some(Slot {
            conn: Conn::Admin(a),
            ..
        }) = self.conns.get_mut(idx)
        {
            push_json_line(&mut a.out, &resp);
            self.work.touched.push(idx);
        }
    }

    /// `fleetcast backup`: a consistent, compacted copy of the store (the loop waits for it).
    pub(super) fn backup(&self, dest: &str) -> Response {
        let path = std::path::Path::new(dest);
        if !path.is_absolute() {
            return Response::err(format!("backup destination `{dest}` must be absolute"));
        }
        if path.read_dir().is_ok_and(|mut d| d.next().is_some()) {
            return Response::err(format!(
                "backup destination {dest} is not empty: give a new directory"
            ));
        }
        let dest_path = path.to_path_buf();
        match self.fleet.call(move |f| f.store().backup(&dest_path)) {
            Ok(()) => {
                let bytes = std::fs::metadata(path.join("data.mdb")).map_or(0, |m| m.len());
                tracing::info!(dest, bytes, "store backed up");
                Response::ok(serde_json::json!({ "backup": dest, "bytes": bytes }))
            }
            Err(e) => Response::err(format!("backup to {dest} failed: {e}")),
        }
    }
}
