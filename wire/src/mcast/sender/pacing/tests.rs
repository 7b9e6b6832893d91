use super::*;
use crate::mcast::SenderConfig;
use crate::msg::Message;
use alloc::vec::Vec;

fn ms(v: u64) -> Instant {
    Instant::from_micros(v * 1000)
}

#[test]
fn cuts_at_most_once_per_interval_and_never_below_the_floor() {
    let mut p = Pacing::new(1_000_000, 250, Duration::from_millis(50), ms(0));
    assert!(p.overflow(ms(10)));
    assert_eq!(p.rate(), 750_000);
    // Reports of drops from before the cut are still arriving: no second cut yet.
    assert!(!p.overflow(ms(59)));
    assert_eq!(p.rate(), 750_000);
    // One increase step (an interval after the cut) came first.
    assert!(p.overflow(ms(60)));
    assert_eq!(p.rate(), 581_250);
    let mut t = 60;
    for _ in 0..10 {
        t += 50;
        p.overflow(ms(t));
    }
    assert_eq!(p.rate(), 250_000, "held at the floor");
    assert!(p.at_floor());
    p.overflow(ms(t + 50));
    assert_eq!(p.rate(), 250_000);
}

#[test]
fn probes_back_up_additively_to_the_configured_rate() {
    let mut p = Pacing::new(1_000_000, 250, Duration::from_millis(50), ms(0));
    assert!(p.overflow(ms(0)));
    // Nothing for a whole interval after the cut, then 2.5% of what was cut per interval.
    p.advance(ms(49));
    assert_eq!(p.rate(), 750_000);
    p.advance(ms(50));
    assert_eq!(p.rate(), 775_000);
    p.advance(ms(99));
    assert_eq!(p.rate(), 775_000);
    p.advance(ms(120));
    assert_eq!(p.rate(), 800_000);
    p.advance(ms(500));
    assert_eq!(
        p.rate(),
        1_000_000,
        "back where it was cut from after 10 intervals"
    );
}

#[test]
fn a_cut_starts_from_what_was_sent_and_probes_faster_beyond_it() {
    let mut p = Pacing::new(1_000_000, 50, Duration::from_millis(50), ms(0));
    // Held back elsewhere: 200 kB/s sent, far below the rate.
    for t in 0..=100 {
        p.sent(ms(t), 200);
    }
    assert!(p.overflow(ms(100)));
    assert_eq!(p.rate(), 150_000, "3/4 of what was sent");
    p.advance(ms(100 + 10 * 50));
    assert_eq!(p.rate(), 200_000, "linear back to it");
    // Beyond it the step doubles: 10, 20, 40 kB/s...
    p.advance(ms(100 + 13 * 50));
    assert_eq!(p.rate(), 200_000 + 10_000 + 20_000 + 40_000);
    p.advance(ms(100 + 20 * 50));
    assert_eq!(p.rate(), 1_000_000);
}

struct NoMac;

impl NackMac for NoMac {
    fn tag(&self, _: &[u8; 32], _: &[u8], _: &[u8]) -> [u8; crate::header::TAG_LEN] {
        [0; crate::header::TAG_LEN]
    }
}

/// 1000 blocks of 1000 bytes at 1020 bytes per ms, burst 1, untagged feedback, devices 1-3.
fn sender() -> McastSender {
    let cfg = SenderConfig {
        burst: 1,
        nack_auth: false,
        ..SenderConfig::new(7, 1_000_000, 1000, 1_020_000)
    };
    let mut s = McastSender::new(cfg, ms(0)).unwrap();
    for d in 1..=3 {
        s.add_receiver(d);
    }
    s
}

fn report(s: &mut McastSender, now: Instant, dev: u64, drops: u64) -> NackVerdict {
    let o = Overflow {
        session: s.config.session,
        device_id: dev,
        drops,
    };
    let mut buf = Vec::new();
    Message::Overflow(o).emit_to_vec(&mut buf).unwrap();
    let frame = Frame::parse_datagram(&buf).unwrap();
    s.handle_overflow(now, &frame, &o, &NoMac)
}

/// Datagrams the sender hands out from `from` to `to` (ms), polled at its own deadlines.
fn sent_between(s: &mut McastSender, from: u64, to: u64) -> usize {
    let mut now = ms(from);
    let mut n = 0;
    while now < ms(to) {
        n += core::iter::from_fn(|| s.poll_transmit(now)).count();
        now = s
            .poll_timeout()
            .unwrap()
            .max(now + Duration::from_micros(1));
    }
    n
}

#[test]
fn new_drops_of_an_active_receiver_slow_the_pass_and_old_counts_do_not() {
    let mut s = sender();
    assert_eq!(sent_between(&mut s, 0, 100), 100, "one datagram per ms");
    assert_eq!(report(&mut s, ms(100), 2, 40), NackVerdict::Accepted);
    assert_eq!(s.stats().rate, 765_000);
    assert_eq!(s.stats().rate_cuts, 1);
    // 40 ms at 75% of the rate: 30 datagrams.
    let n = sent_between(&mut s, 100, 140);
    assert!((29..=31).contains(&n), "{n}");
    // A replay (or a reordered report) says nothing new.
    assert_eq!(report(&mut s, ms(200), 2, 40), NackVerdict::Replayed);
    assert_eq!(report(&mut s, ms(200), 2, 39), NackVerdict::Replayed);
    assert_eq!(s.stats().rate_cuts, 1);
    // A device the sender does not serve moves nothing.
    assert_eq!(report(&mut s, ms(300), 9, 1), NackVerdict::UnknownDevice);
    assert_eq!(s.stats().rate_cuts, 1);
    assert_eq!(s.stats().overflow_reports, 4);
}

#[test]
fn a_demoted_receiver_does_not_move_the_rate() {
    let mut s = sender();
    s.demote(3);
    assert_eq!(report(&mut s, ms(10), 3, 500), NackVerdict::Inactive);
    assert_eq!(s.stats().rate, 1_020_000);
    assert_eq!(s.stats().rate_cuts, 0);
}

#[test]
fn off_the_rate_is_fixed() {
    let cfg = SenderConfig {
        pace_follow: false,
        ..*sender().config()
    };
    let mut s = McastSender::new(cfg, ms(0)).unwrap();
    s.add_receiver(1);
    assert_eq!(report(&mut s, ms(10), 1, 5), NackVerdict::Accepted);
    assert_eq!(s.stats().rate, 1_020_000);
}

#[test]
fn a_receiver_that_overflows_at_the_floor_stops_holding_the_others_down() {
    let mut s = sender();
    let mut t = 0;
    let mut drops = 0;
    // Device 1 overflows every interval: down to the floor, then FLOOR_STRIKES more reports.
    while !s.pacing.at_floor() {
        drops += 10;
        report(&mut s, ms(t), 1, drops);
        t += 50;
    }
    assert_eq!(s.stats().rate, 51_000);
    for _ in 0..FLOOR_STRIKES {
        drops += 10;
        assert_eq!(report(&mut s, ms(t), 1, drops), NackVerdict::Accepted);
        t += 50;
    }
    // Its reports no longer count: the rate probes back up for the others.
    let cuts = s.stats().rate_cuts;
    for _ in 0..40 {
        drops += 10;
        report(&mut s, ms(t), 1, drops);
        t += 50;
    }
    assert_eq!(s.stats().rate_cuts, cuts);
    assert_eq!(s.stats().rate, 1_020_000);
    // Another receiver's overflow still counts.
    assert_eq!(report(&mut s, ms(t), 2, 1), NackVerdict::Accepted);
    assert_eq!(s.stats().rate_cuts, cuts + 1);
}

#[test]
fn reports_must_carry_the_devices_tag() {
    struct KeyMac;
    impl NackMac for KeyMac {
        fn tag(&self, key: &[u8; 32], _: &[u8], _: &[u8]) -> [u8; crate::header::TAG_LEN] {
            let mut t = [0; crate::header::TAG_LEN];
            t.copy_from_slice(&key[..crate::header::TAG_LEN]);
            t
        }
    }
    let cfg = SenderConfig {
        nack_auth: true,
        ..*sender().config()
    };
    let mut s = McastSender::new(cfg, ms(0)).unwrap();
    s.add_receiver(1);
    s.bind_receiver(1, None, Some([1; 32]));
    let emit = |key: &[u8; 32], drops| {
        let o = Overflow {
            session: 7,
            device_id: 1,
            drops,
        };
        let msg = Message::Overflow(o);
        let mut buf = alloc::vec![0u8; msg.buffer_len().unwrap() + crate::header::TAG_LEN];
        let n = msg
            .emit_authenticated(&mut buf, |h, b| KeyMac.tag(key, h, b))
            .unwrap();
        buf.truncate(n);
        (buf, o)
    };
    let (forged, o) = emit(&[2; 32], 10);
    let f = Frame::parse_datagram(&forged).unwrap();
    assert_eq!(
        s.handle_overflow(ms(1), &f, &o, &KeyMac),
        NackVerdict::Forged
    );
    assert_eq!(s.stats().rate_cuts, 0);
    assert_eq!(s.stats().nacks_forged, 1);
    let (good, o) = emit(&[1; 32], 10);
    let f = Frame::parse_datagram(&good).unwrap();
    assert_eq!(
        s.handle_overflow(ms(2), &f, &o, &KeyMac),
        NackVerdict::Accepted
    );
    assert_eq!(s.stats().rate_cuts, 1);
}
