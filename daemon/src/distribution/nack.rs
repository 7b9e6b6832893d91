//! The gateway's NACK path: the keys of a task's NACKs, the MAC the sender cores check them
//! with, and the socket reads that hand NACKs (and overflow reports, tagged the same way) to
//! the cores and send the probes the cores ask for. The rules (whose NACK counts, where repairs go, how much one may cost) are the
//! cores' (`fleetcast_wire::mcast`, `sender/auth.rs`); this file only does crypto and I/O.
//!
//! Keys, all derived from the per-process secret, so a restarted gateway makes new ones:
//! - per task, a NACK base key and a probe-cookie key, which never leave the gateway;
//! - per device, a NACK key from the base key, the device id and a counter bumped on every
//!   announce: each announce (over the device's own mutual-TLS session) carries a new one,
//!   so no other receiver can tag a NACK in its name, and NACKs under an earlier key (a
//!   capture from an earlier session) no longer verify.

use fleetcast_wire::mcast::{NackMac, NackVerdict};
use fleetcast_wire::{Instant, Message, TAG_LEN};
use ring::hmac;

use super::{Distributor, TaskId, NACK_BUDGET};

/// HMAC-SHA-256 truncated to the wire's 16-byte tag.
pub(super) struct RingMac;

impl NackMac for RingMac {
    fn tag(&self, key: &[u8; 32], h8: &[u8], body: &[u8]) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
        ctx.update(h8);
        ctx.update(body);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&ctx.sign().as_ref()[..TAG_LEN]);
        tag
    }
}

/// The NACK keys of one task.
pub(super) struct NackKeys {
    base: hmac::Key,
    probe: [u8; 32],
    /// Announces made so far (each gets a new device key).
    epoch: u64,
    /// The one NACK key of every device, when a pre-shared key gave it
    /// ([`Distributor::start_standalone`]): there is no control session to carry one each.
    shared: Option<[u8; 32]>,
}

fn derive(key: &hmac::Key, parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = hmac::Context::with_key(key);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

impl NackKeys {
    /// The keys of `task` under the gateway's `secret` (labelled inputs, so they are
    /// unrelated to the task's data key, which every receiver knows).
    pub(super) fn new(secret: &[u8; 32], task: TaskId) -> NackKeys {
        let k = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let id = task.0.to_be_bytes();
        NackKeys {
            base: hmac::Key::new(
                hmac::HMAC_SHA256,
                &derive(&k, &[b"fleetcast nack keys", &id]),
            ),
            probe: derive(&k, &[b"fleetcast probe cookies", &id]),
            epoch: 0,
            shared: None,
        }
    }

    /// The keys of `task` whose devices all NACK under `shared` (the probe-cookie key is
    /// still the gateway's own).
    pub(super) fn shared(secret: &[u8; 32], task: TaskId, shared: [u8; 32]) -> NackKeys {
        NackKeys {
            shared: Some(shared),
            ..NackKeys::new(secret, task)
        }
    }

    /// A new NACK key for `device`, for the announce about to go out.
    pub(super) fn next_device_key(&mut self, device: u64) -> [u8; 32] {
        if let Some(k) = self.shared {
            return k;
        }
        self.epoch += 1;
        derive(
            &self.base,
            &[&device.to_be_bytes(), &self.epoch.to_be_bytes()],
        )
    }

    /// The probe-cookie key.
    pub(super) fn probe_key(&self) -> [u8; 32] {
        self.probe
    }
}

impl Distributor {
    /// Reads NACK datagrams (at most a budget per call) and hands each to the sender serving
    /// the device it names, which decides whether it counts; sends the probes they ask for.
    /// Returns whether more may be waiting.
    pub fn handle_readable(&mut self, now: Instant) -> bool {
        let mut probe = Vec::new();
        for _ in 0..NACK_BUDGET {
            let (n, from) = match self.sock.recv_from(&mut self.buf) {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "mcast socket read failed");
                    return false;
                }
            };
            let (nack, frame) = match Message::parse_datagram(&self.buf[..n]) {
                Ok((Message::Nack(nack), frame)) => (nack, frame),
                Ok((Message::Overflow(report), frame)) => {
                    // Feedback like a NACK: counted with them, checked by the core the same way.
                    self.nack_bytes += n as u64;
                    if let Some(d) = self.dists.get_mut(&report.session) {
                        let verdict = d.core.handle_overflow(now, &frame, &report, &RingMac);
                        if verdict != NackVerdict::Accepted {
                            tracing::debug!(%from, device = report.device_id, ?verdict, "overflow report ignored");
                        }
                        self.touched.insert(report.session);
                    }
                    continue;
                }
                _ => continue,
            };
            self.nack_bytes += n as u64;
            let Some(d) = self.dists.get_mut(&nack.session) else {
                continue;
            };
            // The task's core routes it to the sender serving the device.
            let verdict = d.core.handle_nack(now, from, &frame, &nack, &RingMac);
            if verdict != NackVerdict::Accepted {
                tracing::debug!(%from, device = nack.device_id, ?verdict, "NACK ignored");
            }
            self.touched.insert(nack.session);
            loop {
                probe.clear();
                let Some(to) = d.core.poll_probe(&RingMac, &mut probe) else {
                    break;
                };
                if let Err(e) = self.sock.send_to(&probe, to) {
                    tracing::debug!(%to, error = %e, "probe not sent");
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
    use std::time::Duration;

    use fleetcast_store::{self as store, DeviceId};
    use fleetcast_wire::{Nack, Ranges};

    use super::*;
    use crate::distribution::McastConfig;

    /// A NACK datagram of `device` tagged under `key`.
    fn nack(device: u64, seq: u32, echo: Option<[u8; 8]>, key: &[u8; 32]) -> Vec<u8> {
        let mut missing = Ranges::new();
        missing.push(0, 3).unwrap();
        let msg = Message::Nack(Nack {
            session: 5,
            device_id: device,
            seq,
            echo,
            missing,
        });
        tagged(&msg, key)
    }

    /// `msg` as a datagram tagged under `key`.
    fn tagged(msg: &Message<'_>, key: &[u8; 32]) -> Vec<u8> {
        let mut buf = vec![0u8; msg.buffer_len().unwrap() + TAG_LEN];
        let n = msg
            .emit_authenticated(&mut buf, |h, b| RingMac.tag(key, h, b))
            .unwrap();
        buf.truncate(n);
        buf
    }

    /// Reads NACKs until the sender serving device 1 has seen `nacks` of them (bounded).
    fn read_until(dist: &mut Distributor, nacks: u64) {
        for _ in 0..200 {
            dist.handle_readable(Instant::ZERO);
            let d = &dist.dists[&5];
            let seen: u64 = d.core.catch_up_stats().nacks;
            if seen >= nacks {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("{nacks} NACKs not read");
    }

    /// The gateway's NACK path on 127.0.0.1 (no multicast: the task is a catch-up-only one,
    /// re-created from its row, and nothing is driven): only the named device's own key
    /// counts, made-up devices leave no trace, and a source off the session's IP becomes the
    /// repair address only after echoing the probe sent to it.
    #[test]
    fn nacks_count_only_from_the_device_and_other_addresses_must_be_proved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let mut dist = Distributor::open(McastConfig {
            addr: Ipv4Addr::LOCALHOST,
            port: 0,
            group: Ipv4Addr::new(239, 77, 9, 9),
            linger: Duration::from_secs(5),
            warmup: Duration::ZERO,
            fec_group: Some(0),
            broadcast: None,
        })
        .unwrap();
        let gw = dist.sock.local_addr().unwrap();
        let row = store::Task {
            path: path.display().to_string(),
            size: 10_000,
            block_size: 1000,
            sha256: [0; 32],
            group: None,
            trigger: String::new(),
            created_ms: 0,
            then: vec![],
            plan: Default::default(),
            follow: Default::default(),
            image: None,
        };
        let session_ip = Some(Ipv4Addr::LOCALHOST.into());
        let a = dist
            .announce_for(
                TaskId(5),
                DeviceId(1),
                session_ip,
                || Some((row.clone(), vec![])),
                (Instant::ZERO, 0),
            )
            .unwrap();
        let dev = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sent = |sock: &UdpSocket, d: &[u8]| {
            sock.send_to(d, gw).unwrap();
        };
        // Under a key that is not the device's, and with made-up ids.
        sent(&dev, &nack(1, 1, None, &[0x4B; 32]));
        for id in 2..500 {
            sent(&dev, &nack(id, 1, None, &a.nack_key.unwrap()));
        }
        // The device's own.
        sent(&dev, &nack(1, 1, None, &a.nack_key.unwrap()));
        read_until(&mut dist, 2);
        let d = &dist.dists[&5];
        assert_eq!(
            d.core.catch_up_count(),
            1,
            "only the announced device has a sender"
        );
        let c = d.core.catch_up(1).unwrap();
        assert_eq!(c.receiver_count(), 1);
        assert_eq!(c.stats().nacks_forged, 1);
        assert_eq!(c.repair_addr(1), Some(dev.local_addr().unwrap()));
        // The same device from another address (127.0.0.2: not the session's IP) gets a
        // probe there; echoing it makes that address the device's.
        let other = UdpSocket::bind("127.0.0.2:0").unwrap();
        other
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        sent(&other, &nack(1, 2, None, &a.nack_key.unwrap()));
        read_until(&mut dist, 3);
        assert_eq!(
            dist.dists[&5].core.catch_up(1).unwrap().repair_addr(1),
            Some(dev.local_addr().unwrap())
        );
        let mut buf = [0u8; 256];
        let (n, from) = other.recv_from(&mut buf).expect("a probe");
        assert_eq!(from, gw);
        let (Message::Probe(p), frame) = Message::parse_datagram(&buf[..n]).unwrap() else {
            panic!("not a probe")
        };
        let (h8, body) = frame.mac_input();
        assert_eq!(
            frame.tag,
            Some(&RingMac.tag(&a.nack_key.unwrap(), h8, body))
        );
        sent(&other, &nack(1, 3, Some(p.cookie), &a.nack_key.unwrap()));
        read_until(&mut dist, 4);
        let moved: SocketAddr = other.local_addr().unwrap();
        assert_eq!(
            dist.dists[&5].core.catch_up(1).unwrap().repair_addr(1),
            Some(moved)
        );
        // A new announce: a new key; the old one no longer counts.
        let b = dist
            .announce_for(
                TaskId(5),
                DeviceId(1),
                session_ip,
                || Some((row.clone(), vec![])),
                (Instant::ZERO, 0),
            )
            .unwrap();
        assert_ne!(a.nack_key, b.nack_key);
        sent(&dev, &nack(1, 9, None, &a.nack_key.unwrap()));
        read_until(&mut dist, 5);
        assert_eq!(
            dist.dists[&5]
                .core
                .catch_up(1)
                .unwrap()
                .stats()
                .nacks_forged,
            2
        );
        // Overflow reports take the same path and the same keys: under the old key forged,
        // under the current one they cut the rate of the sender serving the device.
        let overflow = |drops, key: &[u8; 32]| {
            let msg = Message::Overflow(fleetcast_wire::Overflow {
                session: 5,
                device_id: 1,
                drops,
            });
            tagged(&msg, key)
        };
        sent(&dev, &overflow(10, &a.nack_key.unwrap()));
        sent(&dev, &overflow(10, &b.nack_key.unwrap()));
        let before = dist.nack_bytes();
        for _ in 0..200 {
            dist.handle_readable(Instant::ZERO);
            if dist.dists[&5].core.catch_up_stats().overflow_reports >= 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let c = dist.dists[&5].core.catch_up(1).unwrap().stats();
        assert_eq!((c.overflow_reports, c.nacks_forged, c.rate_cuts), (2, 3, 1));
        assert!(dist.nack_bytes() > before, "counted as feedback");
    }

    #[test]
    fn device_keys_differ_per_device_announce_and_task() {
        let secret = [5u8; 32];
        let mut a = NackKeys::new(&secret, TaskId(1));
        let mut b = NackKeys::new(&secret, TaskId(2));
        let k1 = a.next_device_key(7);
        let k2 = a.next_device_key(7);
        let k3 = a.next_device_key(8);
        let other_task = b.next_device_key(7);
        assert_ne!(k1, k2, "a new key with every announce");
        assert_ne!(k2, k3);
        assert_ne!(k1, other_task);
        assert_ne!(a.probe_key(), b.probe_key());
        // Unrelated to the task's data key, which is HMAC(secret, task id).
        let data = derive(
            &hmac::Key::new(hmac::HMAC_SHA256, &secret),
            &[&1u64.to_be_bytes()],
        );
        assert!(![k1, k2, k3, a.probe_key()].contains(&data));
        // The MAC is HMAC-SHA-256, truncated.
        let full = derive(&hmac::Key::new(hmac::HMAC_SHA256, &k1), &[b"ab", b"cd"]);
        assert_eq!(RingMac.tag(&k1, b"ab", b"cd")[..], full[..TAG_LEN]);
    }
}
