//! The task policy's unit tests (the trigger gate, moved from the daemon) and its scenario on
//! the seeded simulator: 1,000 receivers, lossy ones demoted and handed to catch-up senders,
//! a late joiner caught up by unicast, an offline target the group lingers for, and the end
//! of the task.

use super::*;

fn ms(v: u64) -> Instant {
    Instant::from_micros(v * 1000)
}

fn cfg(trigger: Trigger, warmup: Duration) -> TaskConfig {
    TaskConfig {
        session: 9,
        file_size: 10_000,
        block_size: 1000,
        rate: 1_000_000,
        linger: Duration::from_secs(5),
        warmup,
        fec_group: 0,
        trigger,
        probe_key: [1; 32],
    }
}

#[test]
fn gate_opens_on_schedule_quorum_or_deadline() {
    let warm = Duration::from_millis(300);
    let created = ms(1000);
    // Default: at once, after the warm-up.
    let g = McastTask::catch_up_only(cfg(Trigger::default(), warm), created);
    assert_eq!(g.gate_opens(ms(1001)), Some(ms(1301)));
    // Scheduled 5 s after creation.
    let t = Trigger {
        delay: Duration::from_secs(5),
        ..Trigger::default()
    };
    let g = McastTask::catch_up_only(cfg(t, warm), created);
    assert_eq!(g.gate_opens(ms(5999)), None);
    assert_eq!(g.gate_wake(ms(2000)), ms(6000));
    assert_eq!(g.gate_opens(ms(6000)), Some(ms(6300)));
    // Two ready receivers or 10 s.
    let t = Trigger {
        quorum: Some((2, Duration::from_secs(10))),
        ..Trigger::default()
    };
    let mut g = McastTask::catch_up_only(cfg(t, warm), created);
    g.handle_ready(7);
    assert_eq!(g.gate_opens(ms(3000)), None);
    assert_eq!(g.gate_wake(ms(3000)), ms(11_000));
    g.handle_ready(7);
    assert_eq!(g.gate_opens(ms(3000)), None, "a repeated join counts once");
    g.handle_ready(8);
    assert_eq!(g.gate_opens(ms(3000)), Some(ms(3000)));
    g.ready.clear();
    assert_eq!(g.gate_opens(ms(11_000)), Some(ms(11_000)));
}

#[test]
fn gate_is_looked_at_only_after_the_creating_instant() {
    let created = ms(1000);
    let mut t = McastTask::new(cfg(Trigger::default(), Duration::ZERO), &[1], created).unwrap();
    let mut budget = CatchUpBudget::new();
    t.handle_timeout(created);
    assert!(!t.started(created));
    assert_eq!(t.poll_transmit(created, &mut budget), None);
    let next = t.poll_timeout(&budget).unwrap();
    assert!(next > created && next <= created + Duration::from_millis(1));
    t.handle_timeout(next);
    assert!(t.started(next));
    assert!(t.poll_transmit(next, &mut budget).is_some());
}

#[test]
fn shared_budget_refills_at_a_quarter_while_a_first_pass_runs() {
    let mut b = CatchUpBudget::new();
    b.tokens = 0;
    b.refill(ms(1), true);
    assert_eq!(b.tokens(), CATCH_UP_RATE / 4 / 1000);
    b.refill(ms(2), false);
    assert_eq!(b.tokens(), CATCH_UP_RATE / 4 / 1000 + CATCH_UP_RATE / 1000);
    assert!(!b.throttled());
    b.refill(ms(1000), false);
    assert_eq!(b.tokens(), CATCH_UP_BURST, "the bucket is bounded");
}

/// A receiver the group counts as done (failed, or cancelled by an operator) and announced
/// again (`task retry`) during the first pass gets a catch-up sender: the group takes no second
/// word from it. An active receiver announced again (a new session) stays in the group.
#[test]
fn a_done_receiver_announced_again_is_caught_up_by_unicast() {
    let now = ms(1000);
    let mut t = McastTask::new(cfg(Trigger::default(), Duration::ZERO), &[1, 2], now).unwrap();
    assert!(
        t.handle_announce(now, 1, None, [3; 32]),
        "joins the first pass"
    );
    t.handle_done(1, false);
    assert!(!t.handle_announce(now, 1, None, [4; 32]), "retried");
    assert!(t.catch_up(1).is_some());
    assert!(t.handle_announce(now, 2, None, [5; 32]));
    assert!(t.handle_announce(now, 2, None, [6; 32]), "a new session");
    assert!(t.catch_up(2).is_none());
}

/// No target and nothing to wait for (a push that follows an empty group): no first pass to
/// nobody; the task is over at once and a device is caught up by unicast. With a quorum (an
/// online gate) or a schedule the group sender waits for devices to join.
#[test]
fn a_task_without_targets_multicasts_only_when_it_waits_for_some() {
    let now = ms(1000);
    let mut budget = CatchUpBudget::new();
    let mut t = McastTask::new(cfg(Trigger::default(), Duration::ZERO), &[], now).unwrap();
    assert!(t.group().is_none());
    assert!(t.is_over());
    t.handle_timeout(now + Duration::from_millis(5));
    assert_eq!(
        t.poll_transmit(now + Duration::from_millis(5), &mut budget),
        None
    );
    assert!(
        !t.handle_announce(now, 1, None, [3; 32]),
        "caught up by unicast"
    );
    assert!(t.catch_up(1).is_some());
    for trigger in [
        Trigger {
            quorum: Some((2, Duration::from_secs(60))),
            ..Trigger::default()
        },
        Trigger {
            delay: Duration::from_secs(5),
            ..Trigger::default()
        },
    ] {
        let mut t = McastTask::new(cfg(trigger, Duration::ZERO), &[], now).unwrap();
        assert!(t.group().is_some());
        assert!(!t.is_over());
        assert!(t.handle_announce(now, 1, None, [3; 32]), "joins the group");
    }
}

#[cfg(feature = "sim")]
mod sim;
