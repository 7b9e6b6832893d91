//! Liveness and framing: heartbeats and idle timeouts, and the event sequence staying the
//! same however the byte stream is chunked (fixed cases and properties).

use super::*;

#[test]
fn heartbeats_keep_an_idle_session_alive_and_silence_times_out_both_ends() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    let start = p.now;
    // Ten virtual minutes with heartbeats every 10 s and a 30 s idle timeout.
    p.run_until(start + Duration::from_secs(600));
    assert!(!p.gw.is_closed() && !p.ag.is_closed());
    assert!(p.gw_events.is_empty() && p.ag_events.is_empty());
    assert!(p.ag.poll_timeout().is_some_and(|t| t > p.now));

    // The network goes silent: both ends time out on their own.
    p.partitioned = true;
    p.run_until(p.now + Duration::from_secs(60));
    assert!(p.gw.is_closed() && p.ag.is_closed());
    for c in [
        closed_gw(&p.gw_events).unwrap(),
        closed_ag(&p.ag_events).unwrap(),
    ] {
        assert_eq!((c.code, c.by_peer), (CloseCode::TIMEOUT, false));
    }
    let idle = SessionError::TimedOut(TimeoutKind::Idle);
    assert_eq!((p.gw.error(), p.ag.error()), (Some(idle), Some(idle)));
    assert_eq!(p.gw.poll_timeout(), None);
    assert_eq!(p.gw.handle_input(p.now, b"x"), Err(idle));
}

/// A path that silently stops forwarding is noticed within about three heartbeat intervals
/// by both ends, although both were configured with a much longer idle timeout: the agreed
/// heartbeat decides, not the drivers' defaults.
#[test]
fn a_silent_path_is_noticed_within_three_heartbeats_whatever_the_idle_timeout() {
    let slow = Config {
        idle_timeout: Duration::from_secs(90),
        ..config()
    };
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.gw = GatewaySession::new(p.now, slow, Some(DEVICE));
    p.ag = AgentSession::new(p.now, slow, FirstMessage::Hello(hello(BOOT_A, None))).unwrap();
    let hb = Duration::from_secs(2);
    p.establish(Welcome {
        heartbeat_ms: 2_000,
        ..welcome(0)
    });
    // Alive: a minute of idle heartbeats keeps both ends open.
    p.run_until(p.now + Duration::from_secs(60));
    assert!(!p.gw.is_closed() && !p.ag.is_closed());
    let cut = p.now;
    p.partitioned = true;
    // Both ends close within three intervals of the cut (plus one interval of slack for
    // where the cut fell between two heartbeats), far before the 90 s idle timeout.
    p.run_until(cut + hb * (DEAD_AFTER_HEARTBEATS + 1));
    assert!(
        p.gw.is_closed() && p.ag.is_closed(),
        "{:?} {:?}",
        p.gw.phase(),
        p.ag.phase()
    );
    let idle = SessionError::TimedOut(TimeoutKind::Idle);
    assert_eq!((p.gw.error(), p.ag.error()), (Some(idle), Some(idle)));
    for c in [
        closed_gw(&p.gw_events).unwrap(),
        closed_ag(&p.ag_events).unwrap(),
    ] {
        assert_eq!((c.code, c.by_peer), (CloseCode::TIMEOUT, false));
    }
}

/// Heartbeats turned off by the `Welcome` leave the configured idle timeout in force.
#[test]
fn without_heartbeats_the_configured_idle_timeout_stays() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(Welcome {
        heartbeat_ms: 0,
        ..welcome(0)
    });
    let start = p.now;
    p.partitioned = true;
    p.run_until(start + (config().idle_timeout - Duration::from_secs(1)));
    assert!(!p.gw.is_closed() && !p.ag.is_closed());
    p.run_until(start + (config().idle_timeout + Duration::from_secs(1)));
    assert!(p.gw.is_closed() && p.ag.is_closed());
}

#[test]
fn agent_heartbeats_go_out_only_after_a_quiet_interval() {
    let t0 = Instant::ZERO;
    let mut ag = AgentSession::new(t0, config(), FirstMessage::Hello(hello(BOOT_A, None))).unwrap();
    let mut out = Vec::new();
    ag.poll_transmit(t0, &mut out).unwrap();
    ag.handle_input(t0, &stream(&[Message::Welcome(welcome(0))]))
        .unwrap();
    let hb = Duration::from_secs(10);
    assert_eq!(ag.poll_timeout(), Some(t0 + hb));
    // Traffic in both directions pushes the heartbeat back.
    let t1 = t0 + Duration::from_secs(4);
    ag.handle_input(
        t1,
        &stream(&[Message::Heartbeat(Heartbeat {
            nonce: 1,
            echo: false,
        })]),
    )
    .unwrap();
    out.clear();
    ag.poll_transmit(t1, &mut out).unwrap();
    assert_eq!(
        frames(&out),
        vec![Message::Heartbeat(Heartbeat {
            nonce: 1,
            echo: true
        })]
    );
    assert_eq!(ag.poll_timeout(), Some(t1 + hb));
    ag.handle_timeout(t1 + hb);
    out.clear();
    ag.poll_transmit(t1 + hb, &mut out).unwrap();
    assert_eq!(
        frames(&out),
        vec![Message::Heartbeat(Heartbeat {
            nonce: 0,
            echo: false
        })]
    );
    // The gateway stays silent: one request per interval, then the idle timeout.
    assert_eq!(ag.poll_timeout(), Some(t1 + hb + hb));
    ag.handle_timeout(t1 + hb + hb);
    assert!(ag.poll_transmit(t1 + hb + hb, &mut out).is_some());
    assert_eq!(ag.poll_timeout(), Some(t1 + Duration::from_secs(30)));
}

/// A full session exercising every message kind the control session carries.
fn scenario(chunking: Chunking) -> (Vec<GatewayEvent>, Vec<AgentEvent>) {
    let last = LastExecuted {
        seq: 1,
        attempt: 1,
        executing: false,
        result: Some(result(1)),
    };
    let mut p = Pair::with(
        Instant::ZERO,
        Some(DEVICE),
        FirstMessage::Hello(hello(BOOT_A, Some(last))),
        chunking,
    );
    p.drive();
    p.gw.accept(&welcome(0)).unwrap();
    p.gw.ack_result(1).unwrap();
    p.gw.announce(&Announce {
        task_id: 5,
        session: 77,
        group: core::net::IpAddr::V4(core::net::Ipv4Addr::new(239, 1, 2, 3)),
        port: 5000,
        size: 1 << 20,
        block_size: 1024,
        fec_group: 0,
        sha256: [7; 32],
        digests: None,
        nack_key: None,
        name: "image.bin".into(),
        image: None,
    })
    .unwrap();
    p.gw.dispatch(&exec(2)).unwrap();
    p.drive();
    p.ag.send_transfer_status(&TransferStatus {
        task_id: 5,
        session: 77,
        state: TransferState::InProgress,
        received: 10,
        total: 1024,
    })
    .unwrap();
    let mut missing = Ranges::new();
    missing.push(3, 4).unwrap();
    p.ag.send_nack(&Nack {
        session: 77,
        device_id: DEVICE,
        seq: 1,
        echo: None,
        missing,
    })
    .unwrap();
    p.ag.send_result(&result(2)).unwrap();
    p.ag.send_completion(&Completion {
        task_id: 5,
        session: 77,
        outcome: Outcome::Verified,
        sha256: [7; 32],
        reason: "".into(),
    })
    .unwrap();
    p.drive();
    p.gw.ack_result(2).unwrap();
    p.gw.send_transfer_status(&TransferStatus {
        task_id: 5,
        session: 77,
        state: TransferState::Completed,
        received: 1024,
        total: 1024,
    })
    .unwrap();
    p.run_until(p.now + Duration::from_secs(35));
    p.ag.close(CloseCode::NORMAL, "bye").unwrap();
    p.drive();
    assert!(p.gw_errors.is_empty() && p.ag_errors.is_empty());
    assert!(p.gw.is_closed() && p.ag.is_closed());
    (p.gw_events, p.ag_events)
}

#[test]
fn chunking_does_not_change_the_event_sequence() {
    let whole = scenario(Chunking::Whole);
    assert!(
        matches!(
            whole.0[..],
            [
                GatewayEvent::Hello { .. },
                GatewayEvent::TransferStatus(_),
                GatewayEvent::Nack(_),
                GatewayEvent::Result { seq: 2, .. },
                GatewayEvent::Completion(_),
                GatewayEvent::Closed(_),
            ]
        ),
        "{:?}",
        whole.0
    );
    assert!(matches!(
        whole.1[..],
        [
            AgentEvent::Welcomed(_),
            AgentEvent::ResultAcked { seq: 1 },
            AgentEvent::Announce(_),
            AgentEvent::Dispatch { seq: 2, .. },
            AgentEvent::ResultAcked { seq: 2 },
            AgentEvent::TransferStatus(_),
            AgentEvent::Closed(_),
        ]
    ));
    assert_eq!(scenario(Chunking::Bytes), whole);
    for seed in 1..=8 {
        assert_eq!(scenario(Chunking::Random { seed, max: 40 }), whole);
    }
}

/// The task finisher: the agent's `TaskAsk` reaches the gateway's driver as it was sent, and
/// the driver's `TaskAnswer` reaches the agent's.
#[test]
fn a_task_ask_reaches_the_gateway_and_its_answer_the_agent() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    let mut have = Ranges::new();
    have.push(0, 10).unwrap();
    have.push(20, 5).unwrap();
    let ask = TaskAsk {
        device_id: DEVICE,
        task_id: 5,
        total: 64,
        have,
    };
    p.ag.send_task_ask(&ask).unwrap();
    // From zero: a device without records asks for every task of its own.
    let zero = TaskAsk {
        device_id: DEVICE,
        task_id: 0,
        total: 0,
        have: Ranges::new(),
    };
    p.ag.send_task_ask(&zero).unwrap();
    p.drive();
    assert_eq!(
        p.take_gw(),
        vec![GatewayEvent::TaskAsk(ask), GatewayEvent::TaskAsk(zero)]
    );
    let answer = TaskAnswer {
        task_id: 5,
        verdict: TaskVerdict::Completed,
    };
    p.gw.send_task_answer(&answer).unwrap();
    p.drive();
    assert_eq!(p.take_ag(), vec![AgentEvent::TaskAnswer(answer)]);
    assert!(p.gw_errors.is_empty() && p.ag_errors.is_empty());
}

/// A device asks for its own tasks only: an ask in another device's name closes the session
/// `UNAUTHENTICATED`, and the gateway's driver never sees it.
#[test]
fn a_task_ask_in_another_devices_name_closes_the_session() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    p.ag.send_task_ask(&TaskAsk {
        device_id: DEVICE + 1,
        task_id: 5,
        total: 0,
        have: Ranges::new(),
    })
    .unwrap();
    p.drive();
    assert!(
        matches!(
            p.gw_errors[..],
            [SessionError::ForeignAsk {
                claimed: 43,
                session: DEVICE
            }]
        ),
        "{:?}",
        p.gw_errors
    );
    let gw = p.take_gw();
    assert!(!gw.iter().any(|e| matches!(e, GatewayEvent::TaskAsk(_))));
    assert_eq!(
        closed_gw(&gw).map(|c| c.code),
        Some(CloseCode::UNAUTHENTICATED)
    );
}

/// Before `Welcome` the agent cannot ask (the driver is refused, nothing is sent).
#[test]
fn a_task_ask_needs_an_established_session() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    let r = p.ag.send_task_ask(&TaskAsk {
        device_id: DEVICE,
        task_id: 0,
        total: 0,
        have: Ranges::new(),
    });
    assert!(
        matches!(r, Err(SessionError::NotEstablished { .. })),
        "{r:?}"
    );
}

mod props {
    use proptest::prelude::*;

    use super::*;

    /// A valid gateway → agent stream: Welcome, a dispatch, heartbeats, an announce.
    fn gateway_stream() -> Vec<u8> {
        stream(&[
            Message::Welcome(welcome(0)),
            Message::Heartbeat(Heartbeat {
                nonce: 3,
                echo: false,
            }),
            Message::Dispatch(reboot_cmd(4)),
            Message::Heartbeat(Heartbeat {
                nonce: 0,
                echo: true,
            }),
        ])
    }

    fn agent() -> AgentSession {
        AgentSession::new(
            Instant::ZERO,
            config(),
            FirstMessage::Hello(hello(BOOT_A, None)),
        )
        .unwrap()
    }

    /// Feeds `bytes` cut at `cuts`; returns the events, the output and the result of each call.
    fn feed(bytes: &[u8], cuts: &[usize]) -> (Vec<AgentEvent>, Vec<u8>, Option<SessionError>) {
        let mut ag = agent();
        let mut out = Vec::new();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut start = 0;
        let mut err = None;
        for end in cuts.into_iter().chain([bytes.len()]) {
            if err.is_none() {
                err = ag.handle_input(Instant::ZERO, &bytes[start..end]).err();
            }
            start = end;
        }
        while ag.poll_transmit(Instant::ZERO, &mut out).is_some() {}
        (core::iter::from_fn(|| ag.poll_event()).collect(), out, err)
    }

    proptest! {
        #[test]
        fn any_cut_of_a_valid_stream_gives_the_same_events(
            cuts in proptest::collection::vec(any::<usize>(), 0..12)
        ) {
            let bytes = gateway_stream();
            let whole = feed(&bytes, &[]);
            prop_assert_eq!(whole.0.len(), 2);
            prop_assert_eq!(feed(&bytes, &cuts), whole);
        }

        #[test]
        fn any_corruption_is_sticky_and_never_panics(
            pos in any::<usize>(),
            xor in 1u8..,
            cuts in proptest::collection::vec(any::<usize>(), 0..8)
        ) {
            let mut bytes = gateway_stream();
            let i = pos % bytes.len();
            bytes[i] ^= xor;
            // Cut-independent: the same events, output and error for every chunking.
            let whole = feed(&bytes, &[]);
            prop_assert_eq!(&feed(&bytes, &cuts), &whole);
            let (events, out, err) = whole;
            if let Some(err) = err {
                prop_assert!(matches!(events.last(), Some(AgentEvent::Closed(c)) if !c.by_peer));
                let sent = frames(&out);
                prop_assert!(
                    matches!(sent.last(), Some(Message::Close(c)) if c.code == err.close_code())
                );
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_gateway(
            data in proptest::collection::vec(any::<u8>(), 0..256),
            authenticated in proptest::option::of(any::<u64>())
        ) {
            let mut gw = GatewaySession::new(Instant::ZERO, config(), authenticated);
            let first = gw.handle_input(Instant::ZERO, &data);
            if let Err(e) = first {
                prop_assert!(gw.is_closed());
                prop_assert_eq!(gw.handle_input(Instant::ZERO, &data), Err(e));
            }
        }
    }
}
