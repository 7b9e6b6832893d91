//! The gateway's NACK path: the keys of a task's NACKs, the MAC the sender cores check them
//! with, and the socket reads that hand NACKs to the cores and send the probes the cores ask
//! for. The rules (whose NACK counts, where repairs go, how much one may cost) are the
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
        }
    }

    /// A new NACK key for `device`, for the announce about to go out.
    pub(super) fn next_device_key(&mut self, device: u64) -> [u8; 32] {
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
            let Ok((Message::Nack(nack), frame)) = Message::parse_datagram(&self.buf[..n]) else {
                continue;
            };
            let Some(sender) = self
                .dists
                .get_mut(&nack.session)
                .and_then(|d| d.sender_of(nack.device_id))
            else {
                continue;
            };
            // Close a round that is due before this NACK counts in it.
            if sender.poll_timeout().is_some_and(|t| t <= now) {
                sender.handle_timeout(now);
            }
            let verdict = sender.handle_nack(now, from, &frame, &nack, &RingMac);
            if verdict != NackVerdict::Accepted {
                tracing::debug!(%from, device = nack.device_id, ?verdict, "NACK ignored");
            }
            loop {
                probe.clear();
                let Some(to) = sender.poll_probe(&RingMac, &mut probe) else {
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
    use super::*;

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
