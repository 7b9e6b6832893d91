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
                then: crate::watch::follow_ups(
                    &w.cfg.then,
                    &name,
                    crate::fleet::FOLLOW_UP_TIMEOUT_MS,
                ),
                delivery: admin::Delivery::Default,
                follow: Default::default(),
                image: None,
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
                DistEvent::PassDone { task } => self.inputs.push(Input::PassDone { task }),
                DistEvent::Finished {
                    task,
                    completed,
                    unfinished,
                    stats,
                    deferred,
                    send_errors,
                } => {
                    // A group sender that ended without a full pass (every target done or
                    // cancelled first) is over too: a restart must not multicast it again.
                    self.inputs.push(Input::PassDone { task });
                    tracing::info!(
                        task = task.0,
                        completed,
                        unfinished,
                        first_pass = stats.first_pass_blocks,
                        multicast_repairs = stats.multicast_repairs,
                        parity = stats.parity_symbols,
                        unicast_repairs = stats.unicast_repairs,
                        bytes = stats.bytes,
                        nacks = stats.nacks,
                        overflow_reports = stats.overflow_reports,
                        rate_cuts = stats.rate_cuts,
                        rate = stats.rate,
                        demoted = stats.demoted,
                        demotions_withheld = stats.demotions_withheld,
                        deferred,
                        send_errors,
                        "distribution finished"
                    )
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The push route through a real loop: request → fleet → distributor → fleet → answer.
    //! Multicast is on at 127.0.0.1 (as in `distribution.rs`'s tests), and no push here gets
    //! a task, so nothing is ever sent.

    use std::io::{BufRead, BufReader, Write};
    use std::net::Ipv4Addr;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use fleetcast_store::Store;

    use super::super::{Gateway, GatewayConfig};
    use crate::admin::{Delivery, PushTrigger, Request};
    use crate::distribution::McastConfig;
    use crate::fleet::{Fleet, FleetConfig};
    use crate::pki::Pki;
    use crate::watch::WatchConfig;

    fn gateway(dir: &std::path::Path, watch: Option<WatchConfig>) -> Gateway {
        // Any instant: the certificates are not checked by these tests.
        let wall = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let pki = Pki::load_or_create(&dir.join("pki"), &["localhost".into()], wall).unwrap();
        let fleet = Fleet::new(
            Store::open(dir.join("store")).unwrap(),
            pki,
            FleetConfig::default(),
        )
        .unwrap();
        let cfg = GatewayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_socket: dir.join("admin.sock"),
            mcast: Some(McastConfig::loopback()),
            watch,
            ..GatewayConfig::default()
        };
        Gateway::bind(cfg, fleet).unwrap()
    }

    fn push(path: &str, trigger: PushTrigger) -> Request {
        Request::Push {
            path: path.into(),
            group: "g".into(),
            block_size: 1000,
            rate_mbps: 10,
            trigger,
            then: vec![],
            delivery: Default::default(),
            follow: Default::default(),
            image: None,
        }
    }

    #[test]
    fn every_refused_push_is_answered_on_its_connection_and_leaves_no_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("image.bin");
        std::fs::write(&file, vec![7u8; 5000]).unwrap();
        let mut gw = gateway(dir.path(), None);
        let reqs = [
            // Refused by the fleet before any file is touched.
            push(
                &file.display().to_string(),
                PushTrigger {
                    min_ready: Some(0),
                    ..PushTrigger::default()
                },
            ),
            // Refused by the distributor (no such file): back through the fleet.
            push("/nonexistent/fleetcast-image.bin", PushTrigger::default()),
            // Mapped and hashed, then refused by the fleet (the group has no members).
            push(&file.display().to_string(), PushTrigger::default()),
            // By broadcast on loopback, which has none: refused by the distributor before
            // the file is mapped (nothing is ever sent here).
            {
                let mut r = push(&file.display().to_string(), PushTrigger::default());
                if let Request::Push { delivery, .. } = &mut r {
                    *delivery = Delivery::Broadcast(Some(Ipv4Addr::new(127, 255, 255, 255)));
                }
                r
            },
        ];
        let sock = dir.path().join("admin.sock");
        let client = std::thread::spawn(move || {
            let s = UnixStream::connect(sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
            let mut answers = Vec::new();
            for req in reqs {
                let mut line = serde_json::to_vec(&req).unwrap();
                line.push(b'\n');
                (&s).write_all(&line).unwrap();
                let answer = lines.next().unwrap().unwrap();
                answers.push(serde_json::from_str::<serde_json::Value>(&answer).unwrap());
            }
            answers
        });
        for _ in 0..400 {
            if client.is_finished() {
                break;
            }
            gw.run_for(Some(Duration::from_millis(50))).unwrap();
        }
        let answers = client.join().unwrap();
        assert_eq!(
            answers[0],
            serde_json::json!({"ok": false, "error": "--min-ready must be at least 1 (or leave it out to start at once)"})
        );
        assert_eq!(answers[1]["ok"], false);
        let error = answers[1]["error"].as_str().unwrap();
        assert!(
            error.starts_with("cannot map /nonexistent/fleetcast-image.bin: "),
            "{error}"
        );
        assert_eq!(
            answers[2],
            serde_json::json!({"ok": false, "error": "group `g` has no members: `fleetcast group add g DEVICE...` first"})
        );
        assert_eq!(
            answers[3],
            serde_json::json!({"ok": false, "error": "cannot broadcast: interface lo (127.0.0.1/8) has no broadcast address: push by multicast"})
        );
        let d = gw.mcast.dist.as_ref().unwrap();
        assert_eq!(d.prepared(), 0, "a refused push left its mapping behind");
    }

    #[test]
    fn a_watched_push_that_gets_no_task_is_dropped_without_an_answer() {
        let dir = tempfile::tempdir().unwrap();
        let drop_dir = dir.path().join("drop");
        std::fs::create_dir(&drop_dir).unwrap();
        let watch = WatchConfig {
            dir: drop_dir.clone(),
            group: "g".into(),
            interval: Duration::from_millis(20),
            rate_mbps: 10,
            block_size: 1000,
            then: vec![],
        };
        let mut gw = gateway(dir.path(), Some(watch));
        // The first scan is the baseline; the file appears after it and settles.
        gw.run_for(Some(Duration::from_millis(100))).unwrap();
        std::fs::write(drop_dir.join("image.bin"), vec![7u8; 5000]).unwrap();
        for _ in 0..200 {
            gw.run_for(Some(Duration::from_millis(50))).unwrap();
            let pushes = gw.mcast.watch.as_ref().unwrap().pushes;
            if pushes == 1 && gw.mcast.dist.as_ref().unwrap().prepared() == 0 {
                break;
            }
        }
        assert_eq!(gw.mcast.watch.as_ref().unwrap().pushes, 1, "pushed once");
        // Hashed, refused by the fleet (no members), and its mapping dropped.
        assert_eq!(gw.mcast.dist.as_ref().unwrap().prepared(), 0);
        assert!(gw.inputs.is_empty() && !gw.fleet.busy());
        let tasks = gw
            .fleet
            .call(|f| f.store().snapshot().unwrap().tasks().unwrap().len());
        assert_eq!(tasks, 0);
    }
}
