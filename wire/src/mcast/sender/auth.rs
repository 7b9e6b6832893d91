//! NACK authentication, replay protection and repair addresses of the sender core.
//!
//! The rules (the driver only does the I/O and supplies the MAC, [`NackMac`]):
//! - Only the control plane creates and keys receivers: [`McastSender::add_receiver`], then
//!   [`McastSender::bind_receiver`] with the device's own NACK key (the driver derives it and
//!   hands it to the device in its announce, over the device's authenticated session) and the
//!   IP that session came from. A NACK naming any other device leaves no trace.
//! - A NACK counts only if its tag verifies under *the named device's* key (with
//!   [`super::SenderConfig::nack_auth`]) and its `seq` is above every one accepted under that
//!   key. Strictly increasing, without a window: a device's latest NACK replaces its earlier
//!   ones anyway (it names the lowest blocks the device still lacks), so a NACK overtaken by
//!   a newer one carries nothing the newer did not, and dropping it (a replay, a duplicate, or
//!   a late one after reordering, which is rare with NACKs at least 20 ms apart) loses
//!   nothing but a little time. Rebinding (a new announce, a new key) starts the sequence
//!   over, so a restarted agent starts at 1 without persisting anything.
//! - A device's unicast repairs go to its *repair address*, never merely to where a NACK came
//!   from. A NACK's source becomes the repair address only if it is on the control session's
//!   IP (the TCP handshake showed the device receives there; the port is the NACK socket's,
//!   which NAT may rewrite), or if the NACK echoes the cookie of a [`Probe`] sent to that very
//!   address (the device showed it receives there: behind NAT or a proxy, or over long-poll).
//!   Any other source gets a probe, smaller than the NACK that caused it and at most one per
//!   [`super::SenderConfig::probe_interval`], and changes nothing.
//! - A NACK asks for at most `max_nack_bytes` (its lowest blocks), and a device's unicast
//!   repairs stop once they cost `repair_budget` bytes, so even a legitimate device (or a
//!   replay that beat the real NACK to the sender) has a bounded cost.

use alloc::vec::Vec;
use core::net::{IpAddr, SocketAddr};

use super::{McastSender, Status};
use crate::header::{Frame, TAG_LEN};
use crate::mcast::NackMac;
use crate::msg::{Message, Nack, Probe, COOKIE_LEN};
use crate::time::Instant;

/// What the sender did with a NACK ([`McastSender::handle_nack`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NackVerdict {
    /// It counts in the open round.
    Accepted,
    /// It names a device this sender does not serve.
    UnknownDevice,
    /// It names another session, or its tag is missing or does not verify under the named
    /// device's key.
    Forged,
    /// Its sequence is not above the device's last accepted one: a replay, a duplicate, or a
    /// NACK a newer one overtook.
    Replayed,
    /// The device is demoted or done, or the sender has finished.
    Inactive,
    /// The device's repair budget is spent.
    OverBudget,
}

/// One receiver's authentication state: its NACK key, the last sequence accepted under it,
/// its control session's IP, its repair address and what its unicast repairs cost so far.
/// [`McastSender::receiver_auth`] hands it to another sender core (a demoted device's
/// catch-up sender), so a NACK accepted by one is a replay for the other and the budget is
/// shared.
#[derive(Clone, Copy, Default)]
pub struct ReceiverAuth {
    key: Option<[u8; 32]>,
    pub(super) seq: u32,
    ctrl_ip: Option<IpAddr>,
    pub(super) addr: Option<SocketAddr>,
    pub(super) spent: u64,
}

impl core::fmt::Debug for ReceiverAuth {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never the key.
        f.debug_struct("ReceiverAuth")
            .field("keyed", &self.key.is_some())
            .field("seq", &self.seq)
            .field("ctrl_ip", &self.ctrl_ip)
            .field("addr", &self.addr)
            .field("spent", &self.spent)
            .finish()
    }
}

/// Constant-time equality of two tags.
fn tags_equal(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Domain label of the probe cookies' MAC input.
const COOKIE_LABEL: &[u8] = b"fleetcast probe cookie";

impl McastSender {
    /// Sets the key of the probe cookies. Only the gateway may hold it (a device that knew it
    /// could "prove" any address). Without one no probe is sent, so only sources on a
    /// device's control-session IP can become its repair address.
    pub fn set_probe_key(&mut self, key: [u8; 32]) {
        self.probe_key = Some(key);
    }

    /// The control plane announced the task to `device` over a session from `ip`, with the
    /// device's new NACK key `key` (`None`: its NACKs are untagged, only with `nack_auth` off).
    /// Its NACK sequence starts over (NACKs under an earlier key no longer verify); a repair
    /// address on another IP than the new session's is forgotten unless it was proved. Returns
    /// `false`, changing nothing, for a device that is not a receiver: only
    /// [`McastSender::add_receiver`] adds one.
    pub fn bind_receiver(
        &mut self,
        device: u64,
        ip: Option<IpAddr>,
        key: Option<[u8; 32]>,
    ) -> bool {
        let Some(rx) = self.receivers.get_mut(&device) else {
            return false;
        };
        // A new key is a new agent or transfer: its drop count starts over.
        rx.drops = 0;
        let a = &mut rx.auth;
        a.key = key;
        a.seq = 0;
        if a.ctrl_ip != ip && a.addr.is_some_and(|x| a.ctrl_ip == Some(x.ip())) {
            // It was the old session's address: the device has moved.
            a.addr = None;
        }
        a.ctrl_ip = ip;
        true
    }

    /// A NACK datagram from `from`, parsed (`frame`, `nack`; the driver routed it here by its
    /// session). See the module docs for what makes it count. Drain
    /// [`McastSender::poll_probe`] and `poll_send` after it.
    pub fn handle_nack(
        &mut self,
        now: Instant,
        from: SocketAddr,
        frame: &Frame<'_>,
        nack: &Nack,
        mac: &dyn NackMac,
    ) -> NackVerdict {
        self.tick(now);
        self.stats.nacks += 1;
        let verdict = match self.check(from, frame, nack, mac) {
            Ok(proven) => {
                self.note_source(now, nack, from, proven);
                self.accept_request(now, nack.device_id, &nack.missing)
            }
            Err(v) => v,
        };
        match verdict {
            NackVerdict::Accepted => {}
            NackVerdict::Forged => self.stats.nacks_forged += 1,
            NackVerdict::Replayed => self.stats.nacks_replayed += 1,
            _ => {}
        }
        if verdict != NackVerdict::Accepted {
            self.stats.nacks_ignored += 1;
        }
        verdict
    }

    /// Whether the NACK is the named device's own and new: `Ok(proven)`, with `proven` saying
    /// whether `from` is an address the device is known to receive at.
    fn check(
        &self,
        from: SocketAddr,
        frame: &Frame<'_>,
        nack: &Nack,
        mac: &dyn NackMac,
    ) -> Result<bool, NackVerdict> {
        if self.finished {
            return Err(NackVerdict::Inactive);
        }
        if nack.session != self.config.session {
            return Err(NackVerdict::Forged);
        }
        let rx = self
            .receivers
            .get(&nack.device_id)
            .ok_or(NackVerdict::UnknownDevice)?;
        if !self.config.nack_auth {
            // Untagged NACKs, their source trusted (simulator, unit tests).
            return match nack.seq > rx.auth.seq {
                true => Ok(true),
                false => Err(NackVerdict::Replayed),
            };
        }
        // The tag first: a forged NACK must not move the device's sequence.
        self.verify_tag(nack.device_id, frame, mac)?;
        if nack.seq <= rx.auth.seq {
            return Err(NackVerdict::Replayed);
        }
        let on_session_ip = rx.auth.ctrl_ip == Some(from.ip());
        let echoed = nack
            .echo
            .is_some_and(|c| self.cookie(mac, nack.device_id, from) == Some(c));
        Ok(on_session_ip || echoed)
    }

    /// Whether `frame` carries a valid tag under `device`'s own key (always, with
    /// `nack_auth` off: untagged feedback, its source trusted).
    pub(super) fn verify_tag(
        &self,
        device: u64,
        frame: &Frame<'_>,
        mac: &dyn NackMac,
    ) -> Result<(), NackVerdict> {
        let rx = self
            .receivers
            .get(&device)
            .ok_or(NackVerdict::UnknownDevice)?;
        if !self.config.nack_auth {
            return Ok(());
        }
        let (Some(key), Some(tag)) = (rx.auth.key, frame.tag) else {
            return Err(NackVerdict::Forged);
        };
        let (h8, body) = frame.mac_input();
        if !tags_equal(&mac.tag(&key, h8, body), tag) {
            return Err(NackVerdict::Forged);
        }
        Ok(())
    }

    /// An authenticated, new NACK from `from`: its sequence is the device's latest; a proven
    /// source becomes its repair address, an unproven one gets a probe (rate-limited).
    fn note_source(&mut self, now: Instant, nack: &Nack, from: SocketAddr, proven: bool) {
        let interval = self.config.probe_interval;
        let can_probe = self.probe_key.is_some();
        let Some(rx) = self.receivers.get_mut(&nack.device_id) else {
            return;
        };
        rx.auth.seq = nack.seq;
        if proven {
            rx.auth.addr = Some(from);
            return;
        }
        let due = rx.probed.is_none_or(|t| now >= t + interval);
        if rx.auth.addr != Some(from) && can_probe && due && rx.status == Status::Active {
            rx.probed = Some(now);
            self.probes.push_back((nack.device_id, from));
        }
    }

    /// The cookie a probe to `to` for `device` carries (`None` without a probe key).
    fn cookie(&self, mac: &dyn NackMac, device: u64, to: SocketAddr) -> Option<[u8; COOKIE_LEN]> {
        let key = self.probe_key.as_ref()?;
        // session, device, family, address (16 bytes, IPv4 zero-padded), port
        let mut input = [0u8; 4 + 8 + 1 + 16 + 2];
        input[..4].copy_from_slice(&self.config.session.to_be_bytes());
        input[4..12].copy_from_slice(&device.to_be_bytes());
        match to.ip() {
            IpAddr::V4(a) => {
                input[12] = 4;
                input[13..17].copy_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                input[12] = 6;
                input[13..29].copy_from_slice(&a.octets());
            }
        }
        input[29..].copy_from_slice(&to.port().to_be_bytes());
        let tag = mac.tag(key, COOKIE_LABEL, &input);
        let mut out = [0u8; COOKIE_LEN];
        out.copy_from_slice(&tag[..COOKIE_LEN]);
        Some(out)
    }

    /// The next probe: appends its datagram (tagged under the device's key) to `buf` and
    /// returns where to send it. Drain until `None` after every `handle_nack`.
    pub fn poll_probe(&mut self, mac: &dyn NackMac, buf: &mut Vec<u8>) -> Option<SocketAddr> {
        while let Some((device, to)) = self.probes.pop_front() {
            let (Some(cookie), Some(key)) = (
                self.cookie(mac, device, to),
                self.receivers.get(&device).and_then(|rx| rx.auth.key),
            ) else {
                continue;
            };
            let msg = Message::Probe(Probe { cookie });
            let start = buf.len();
            let Ok(len) = msg.buffer_len() else { continue };
            buf.resize(start + len + TAG_LEN, 0);
            let Ok(n) = msg.emit_authenticated(&mut buf[start..], |h, b| mac.tag(&key, h, b))
            else {
                buf.truncate(start);
                continue;
            };
            buf.truncate(start + n);
            self.stats.probes += 1;
            return Some(to);
        }
        None
    }

    /// Where `device`'s unicast repairs go ([`super::Dest::Unicast`]), if known.
    pub fn repair_addr(&self, device: u64) -> Option<SocketAddr> {
        self.receivers.get(&device)?.auth.addr
    }

    /// `device`'s authentication state, to carry over to another sender core
    /// ([`McastSender::add_receiver_with`]).
    pub fn receiver_auth(&self, device: u64) -> Option<ReceiverAuth> {
        self.receivers.get(&device).map(|rx| rx.auth)
    }

    /// [`McastSender::add_receiver`] with the state another sender had for the device: its
    /// key, last sequence, addresses and spent budget carry over. `false` (nothing changed)
    /// if it is registered already or the sender has finished.
    pub fn add_receiver_with(&mut self, device: u64, auth: ReceiverAuth) -> bool {
        if !self.add_receiver(device) {
            return false;
        }
        if let Some(rx) = self.receivers.get_mut(&device) {
            rx.auth = auth;
        }
        true
    }
}

#[cfg(test)]
mod tests;
