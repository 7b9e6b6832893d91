//! The sender core's NACK rules against an attacker: replays, NACKs in another device's name,
//! spoofed sources, amplification, made-up device ids.

use alloc::vec;
use alloc::vec::Vec;
use core::net::{IpAddr, SocketAddr};
use core::time::Duration;

use super::*;
use crate::mcast::{Dest, SenderConfig, Transmit};
use crate::msg::Message;
use crate::ranges::Ranges;

/// A keyed test MAC (not cryptographic; it only has to tell keys and inputs apart).
struct TestMac;

impl NackMac for TestMac {
    fn tag(&self, key: &[u8; 32], h8: &[u8], body: &[u8]) -> [u8; TAG_LEN] {
        let mut lanes = [0xcbf2_9ce4_8422_2325u64, 0x8422_2325_cbf2_9ce4];
        for (i, b) in key.iter().chain(h8).chain(body).enumerate() {
            let l = &mut lanes[i % 2];
            *l = (*l ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut out = [0u8; TAG_LEN];
        out[..8].copy_from_slice(&lanes[0].to_be_bytes());
        out[8..].copy_from_slice(&lanes[1].to_be_bytes());
        out
    }
}

const SESSION: u32 = 7;
const K1: [u8; 32] = [1; 32];
const K2: [u8; 32] = [2; 32];
/// The group's data key, which every receiver knows.
const GROUP_KEY: [u8; 32] = [9; 32];

fn us(v: u64) -> Instant {
    Instant::from_micros(v)
}

fn addr(a: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((a, port))
}

fn dev1() -> SocketAddr {
    addr([10, 0, 0, 1], 40001)
}

fn dev2() -> SocketAddr {
    addr([10, 0, 0, 2], 40002)
}

fn victim() -> SocketAddr {
    addr([10, 0, 0, 99], 9)
}

fn rs(list: &[(u32, u32)]) -> Ranges {
    let mut r = Ranges::new();
    for &(s, l) in list {
        r.push(s, l).unwrap();
    }
    r
}

/// A catch-up sender (every block sent, every repair unicast, 2 ms rounds) of 100 blocks of
/// 1000 bytes, fast enough that a test drains it in a few steps; devices 1 and 2 bound to
/// their control sessions (10.0.0.1, 10.0.0.2) with keys K1 and K2.
fn sender(cfg: impl FnOnce(SenderConfig) -> SenderConfig) -> McastSender {
    let base = SenderConfig {
        multicast_threshold: u32::MAX,
        round: Duration::from_millis(2),
        burst: 64,
        ..SenderConfig::new(SESSION, 100_000, 1000, 100_000_000)
    };
    let mut s = McastSender::new_catch_up(cfg(base), us(0)).unwrap();
    s.set_probe_key([0x77; 32]);
    for (d, ip, k) in [(1, [10, 0, 0, 1], K1), (2, [10, 0, 0, 2], K2)] {
        assert!(s.add_receiver(d));
        assert!(s.bind_receiver(d, Some(IpAddr::from(ip)), Some(k)));
    }
    s
}

/// A NACK datagram naming `device`, tagged under `key` (`None`: untagged).
fn datagram(
    device: u64,
    seq: u32,
    echo: Option<[u8; COOKIE_LEN]>,
    missing: &Ranges,
    key: Option<&[u8; 32]>,
) -> Vec<u8> {
    let msg = Message::Nack(Nack {
        session: SESSION,
        device_id: device,
        seq,
        echo,
        missing: missing.clone(),
    });
    let mut buf = vec![0u8; msg.buffer_len().unwrap() + TAG_LEN];
    let n = match key {
        Some(k) => msg
            .emit_authenticated(&mut buf, |h, b| TestMac.tag(k, h, b))
            .unwrap(),
        None => msg.emit(&mut buf).unwrap(),
    };
    buf.truncate(n);
    buf
}

/// Hands `datagram`, arriving from `from`, to the sender.
fn deliver(s: &mut McastSender, now: Instant, from: SocketAddr, datagram: &[u8]) -> NackVerdict {
    let (msg, frame) = Message::parse_datagram(datagram).unwrap();
    let Message::Nack(n) = msg else {
        panic!("not a NACK")
    };
    s.handle_nack(now, from, &frame, &n, &TestMac)
}

/// Closes the open round and sends everything due; returns the unicast repairs as
/// (device, destination, block).
fn repairs(s: &mut McastSender, mut now: Instant) -> Vec<(u64, SocketAddr, u32)> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        s.handle_timeout(now);
        while let Some(t) = s.poll_send(now) {
            let Transmit::Block(b) = t else {
                panic!("no parity here")
            };
            let Dest::Unicast(d) = b.dest else {
                panic!("catch-up repairs are unicast")
            };
            out.push((
                d,
                s.repair_addr(d).expect("sent only where reachable"),
                b.block,
            ));
        }
        match s.poll_timeout() {
            Some(t) if t > now && t < now + Duration::from_millis(100) => now = t,
            _ => break,
        }
    }
    out
}

fn probes(s: &mut McastSender) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut buf = Vec::new();
        match s.poll_probe(&TestMac, &mut buf) {
            Some(to) => out.push((to, buf)),
            None => return out,
        }
    }
}

#[test]
fn a_replayed_nack_is_ignored() {
    let mut s = sender(|c| c);
    let d = datagram(1, 1, None, &rs(&[(0, 4)]), Some(&K1));
    assert_eq!(deliver(&mut s, us(0), dev1(), &d), NackVerdict::Accepted);
    assert_eq!(repairs(&mut s, us(0)).len(), 4);
    // The same bytes again, from the device's own address and from anywhere else: nothing.
    for (i, from) in [dev1(), victim(), dev2()].into_iter().enumerate() {
        let t = us(10_000 * (i as u64 + 1));
        assert_eq!(deliver(&mut s, t, from, &d), NackVerdict::Replayed);
        assert!(repairs(&mut s, t).is_empty());
    }
    // A newer NACK counts; an older one arriving after it (reordered) does not.
    let (d3, d2) = (
        datagram(1, 3, None, &rs(&[(10, 2)]), Some(&K1)),
        datagram(1, 2, None, &rs(&[(20, 2)]), Some(&K1)),
    );
    let t = us(100_000);
    assert_eq!(deliver(&mut s, t, dev1(), &d3), NackVerdict::Accepted);
    assert_eq!(deliver(&mut s, t, dev1(), &d2), NackVerdict::Replayed);
    let got: Vec<u32> = repairs(&mut s, t).iter().map(|r| r.2).collect();
    assert_eq!(got, [10, 11]);
    assert_eq!(s.stats().nacks_replayed, 4);
    // A new announce (new key) starts the sequence over: the agent restarted and counts from
    // 1 again, and nothing under the old key verifies any more.
    assert!(s.bind_receiver(1, Some(dev1().ip()), Some([3; 32])));
    assert_eq!(deliver(&mut s, t, dev1(), &d3), NackVerdict::Forged);
    let fresh = datagram(1, 1, None, &rs(&[(30, 1)]), Some(&[3; 32]));
    assert_eq!(deliver(&mut s, t, dev1(), &fresh), NackVerdict::Accepted);
}

#[test]
fn a_nack_in_another_devices_name_or_under_another_key_is_ignored() {
    let mut s = sender(|c| c);
    let missing = rs(&[(0, 50)]);
    // Device 2 names device 1 under its own key, under the group's data key, or untagged;
    // and names itself under device 1's key. A high sequence, to push device 1's up.
    for (dev, key) in [
        (1, Some(&K2)),
        (1, Some(&GROUP_KEY)),
        (1, None),
        (2, Some(&K1)),
    ] {
        let d = datagram(dev, u32::MAX, None, &missing, key);
        assert_eq!(deliver(&mut s, us(0), dev2(), &d), NackVerdict::Forged);
    }
    // Another session, under the right key.
    let msg = Message::Nack(Nack {
        session: SESSION + 1,
        device_id: 1,
        seq: 5,
        echo: None,
        missing: missing.clone(),
    });
    let mut buf = vec![0u8; msg.buffer_len().unwrap() + TAG_LEN];
    let n = msg
        .emit_authenticated(&mut buf, |h, b| TestMac.tag(&K1, h, b))
        .unwrap();
    assert_eq!(
        deliver(&mut s, us(0), dev1(), &buf[..n]),
        NackVerdict::Forged
    );
    assert!(repairs(&mut s, us(0)).is_empty(), "nothing was asked");
    assert_eq!(s.stats().nacks_forged, 5);
    // None of it moved device 1's sequence: its own first NACK still counts.
    let real = datagram(1, 1, None, &rs(&[(7, 1)]), Some(&K1));
    assert_eq!(deliver(&mut s, us(0), dev1(), &real), NackVerdict::Accepted);
    assert_eq!(repairs(&mut s, us(0)), [(1, dev1(), 7)]);
}

#[test]
fn a_nack_from_a_spoofed_source_does_not_redirect_repairs() {
    let mut s = sender(|c| c);
    // The device's first NACK, from its control session's IP: that is its repair address.
    let first = datagram(1, 1, None, &rs(&[(0, 1)]), Some(&K1));
    assert_eq!(
        deliver(&mut s, us(0), dev1(), &first),
        NackVerdict::Accepted
    );
    assert_eq!(repairs(&mut s, us(0)), [(1, dev1(), 0)]);
    assert!(probes(&mut s).is_empty(), "its own address needs no proof");
    // A fresh NACK of the device, captured and delivered first from a spoofed source (the
    // victim's address): its request counts, its repairs still go to the device.
    let captured = datagram(1, 2, None, &rs(&[(0, 60)]), Some(&K1));
    let t = us(10_000);
    assert_eq!(
        deliver(&mut s, t, victim(), &captured),
        NackVerdict::Accepted
    );
    let sent = repairs(&mut s, t);
    assert_eq!(sent.len(), 60);
    assert!(sent.iter().all(|r| r.1 == dev1()), "{sent:?}");
    // The victim got one probe, smaller than the NACK that caused it, and nothing else.
    let p = probes(&mut s);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0, victim());
    assert!(
        p[0].1.len() <= captured.len(),
        "{} > {}",
        p[0].1.len(),
        captured.len()
    );
    // More spoofed copies within the probe interval: no more probes (and they are replays).
    assert_eq!(
        deliver(&mut s, t, victim(), &captured),
        NackVerdict::Replayed
    );
    assert!(probes(&mut s).is_empty());
    // Echoing the wrong cookie proves nothing; nor does echoing the cookie the device got for
    // its own address, from the victim's.
    let (Message::Probe(probe), _) = Message::parse_datagram(&p[0].1).unwrap() else {
        panic!("not a probe")
    };
    assert_eq!(probe.cookie.len(), COOKIE_LEN);
    let wrong = datagram(1, 3, Some([0; COOKIE_LEN]), &rs(&[(99, 1)]), Some(&K1));
    let t = us(200_000);
    assert_eq!(deliver(&mut s, t, victim(), &wrong), NackVerdict::Accepted);
    assert_eq!(repairs(&mut s, t), [(1, dev1(), 99)]);
    assert_eq!(s.repair_addr(1), Some(dev1()));
}

#[test]
fn an_address_the_device_proves_receives_its_repairs() {
    // Device 1's control session comes through a proxy (10.0.0.200); its NACKs from its own
    // address behind NAT (10.0.0.50:61000) get a probe there, and once it echoes the probe's
    // cookie its repairs go there.
    let mut s = sender(|c| c);
    assert!(s.bind_receiver(1, Some(addr([10, 0, 0, 200], 0).ip()), Some(K1)));
    let nat = addr([10, 0, 0, 50], 61000);
    let n1 = datagram(1, 1, None, &rs(&[(0, 3)]), Some(&K1));
    assert_eq!(deliver(&mut s, us(0), nat, &n1), NackVerdict::Accepted);
    assert!(repairs(&mut s, us(0)).is_empty(), "no address yet");
    let p = probes(&mut s);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0, nat);
    // The probe is tagged under the device's key: the device can tell it from a forgery.
    let (Message::Probe(probe), frame) = Message::parse_datagram(&p[0].1).unwrap() else {
        panic!("not a probe")
    };
    let (h8, body) = frame.mac_input();
    assert_eq!(frame.tag, Some(&TestMac.tag(&K1, h8, body)));
    // A replay of the echoing NACK from elsewhere proves nothing for that elsewhere.
    let n2 = datagram(1, 2, Some(probe.cookie), &rs(&[(0, 3)]), Some(&K1));
    let t = us(30_000);
    assert_eq!(deliver(&mut s, t, victim(), &n2), NackVerdict::Accepted);
    assert!(repairs(&mut s, t).is_empty());
    assert_eq!(s.repair_addr(1), None);
    let n3 = datagram(1, 3, Some(probe.cookie), &rs(&[(0, 3)]), Some(&K1));
    let t = us(60_000);
    assert_eq!(deliver(&mut s, t, nat, &n3), NackVerdict::Accepted);
    assert_eq!(repairs(&mut s, t), [(1, nat, 0), (1, nat, 1), (1, nat, 2)]);
    // Rebinding from the same proxy keeps the proven address; the cookie still proves it.
    assert!(s.bind_receiver(1, Some(addr([10, 0, 0, 200], 0).ip()), Some(K2)));
    assert_eq!(s.repair_addr(1), Some(nat));
}

#[test]
fn repair_bytes_per_nack_and_per_device_are_bounded() {
    // At most 10 blocks per NACK, 25 blocks' worth of datagrams per device.
    let datagram_len = (crate::data::DATA_PREFIX_LEN + 1000) as u64;
    let mut s = sender(|c| SenderConfig {
        max_nack_bytes: 10 * 1000,
        repair_budget: 25 * datagram_len,
        ..c
    });
    let whole = rs(&[(0, 100)]);
    let d = datagram(1, 1, None, &whole, Some(&K1));
    assert!(
        d.len() < 64,
        "a {}-byte NACK asks for the whole file",
        d.len()
    );
    assert_eq!(deliver(&mut s, us(0), dev1(), &d), NackVerdict::Accepted);
    let first = repairs(&mut s, us(0));
    assert_eq!(first.len(), 10, "one NACK, at most 10 blocks: {first:?}");
    assert_eq!(first.last().map(|r| r.2), Some(9), "the lowest ones");
    // The device keeps asking (fresh, authentic NACKs): its budget ends it.
    let mut total = first.len();
    let mut last = NackVerdict::Accepted;
    for seq in 2..10 {
        let t = us(u64::from(seq) * 10_000);
        let missing = rs(&[(total as u32, 100 - total as u32)]);
        last = deliver(
            &mut s,
            t,
            dev1(),
            &datagram(1, seq, None, &missing, Some(&K1)),
        );
        total += repairs(&mut s, t).len();
    }
    assert_eq!(total, 25, "the budget, in whole datagrams");
    assert_eq!(last, NackVerdict::OverBudget);
    assert_eq!(s.stats().bytes, 25 * datagram_len);
    // The other device's budget is its own.
    let d2 = datagram(2, 1, None, &whole, Some(&K2));
    assert_eq!(
        deliver(&mut s, us(500_000), dev2(), &d2),
        NackVerdict::Accepted
    );
    assert_eq!(repairs(&mut s, us(500_000)).len(), 10);
}

#[test]
fn unknown_device_ids_do_not_grow_the_table() {
    let mut s = sender(|c| c);
    let missing = rs(&[(0, 100)]);
    for i in 0..10_000u64 {
        let dev = 1000 + i * 7919;
        let d = datagram(dev, 1, None, &missing, Some(&K1));
        let from = addr([10, 0, (i >> 8) as u8, i as u8], 5000);
        assert_eq!(deliver(&mut s, us(i), from, &d), NackVerdict::UnknownDevice);
    }
    assert_eq!(s.receiver_count(), 2);
    assert!(!s.bind_receiver(5000, Some(victim().ip()), Some(K1)));
    assert_eq!(s.receiver_count(), 2);
    assert_eq!(s.repair_addr(5000), None);
    assert!(s.requests.is_empty() && s.unicast.is_empty() && s.probes.is_empty());
    assert!(repairs(&mut s, us(20_000)).is_empty());
    assert_eq!(s.stats().nacks_ignored, 10_000);
}

#[test]
fn a_catch_up_sender_inherits_sequence_address_and_budget() {
    let datagram_len = (crate::data::DATA_PREFIX_LEN + 1000) as u64;
    let mut group = sender(|c| SenderConfig {
        repair_budget: 5 * datagram_len,
        ..c
    });
    let d = datagram(1, 4, None, &rs(&[(0, 3)]), Some(&K1));
    assert_eq!(
        deliver(&mut group, us(0), dev1(), &d),
        NackVerdict::Accepted
    );
    assert_eq!(repairs(&mut group, us(0)).len(), 3);
    let auth = group.receiver_auth(1).unwrap();
    let mut c = McastSender::new_catch_up(*group.config(), us(0)).unwrap();
    assert!(c.add_receiver_with(1, auth));
    assert!(!c.add_receiver_with(1, auth), "registered once");
    assert_eq!(c.repair_addr(1), Some(dev1()));
    // The NACK the group sender accepted is a replay here.
    assert_eq!(deliver(&mut c, us(0), dev1(), &d), NackVerdict::Replayed);
    let next = datagram(1, 5, None, &rs(&[(10, 50)]), Some(&K1));
    assert_eq!(deliver(&mut c, us(0), dev1(), &next), NackVerdict::Accepted);
    assert_eq!(repairs(&mut c, us(0)).len(), 2, "3 of 5 spent already");
    assert!(
        format!("{auth:?}").contains("keyed: true"),
        "the key is never printed"
    );
}
