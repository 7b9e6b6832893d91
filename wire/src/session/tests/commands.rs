//! Commands across the session: one in flight, results and their acks, resends across
//! reconnects, reboots, attempts of the same seq, reports.

use super::*;

#[test]
fn dispatch_result_ack_then_next_dispatch_in_order() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    for seq in 1..=3 {
        p.gw.dispatch(&exec(seq)).unwrap();
        p.drive();
        let ev = p.take_ag();
        match &ev[..] {
            [AgentEvent::Dispatch {
                seq: s,
                attempt: 1,
                command_id,
                reboot: false,
                frame,
            }] => {
                assert_eq!((*s, *command_id), (seq, 1000 + seq));
                assert_eq!(frame.message(), Message::Dispatch(exec(seq)));
            }
            other => panic!("{other:?}"),
        }
        p.ag.send_result(&result(seq)).unwrap();
        p.drive();
        let ev = p.take_gw();
        match &ev[..] {
            [GatewayEvent::Result {
                seq: s,
                command_id,
                frame,
            }] => {
                assert_eq!((*s, *command_id), (seq, 1000 + seq));
                assert_eq!(frame.message(), Message::Result(result(seq)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.ag.in_flight(), Some(seq));
        p.gw.ack_result(seq).unwrap();
        p.drive();
        assert_eq!(p.take_ag(), vec![AgentEvent::ResultAcked { seq }]);
        assert_eq!((p.gw.in_flight(), p.ag.in_flight()), (None, None));
    }
    assert!(p.gw_errors.is_empty() && p.ag_errors.is_empty());
}

#[test]
fn one_command_in_flight() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    p.gw.dispatch(&exec(1)).unwrap();
    assert_eq!(
        p.gw.dispatch(&exec(2)),
        Err(SessionError::AlreadyInFlight { in_flight: 1 })
    );
    assert_eq!(
        p.gw.ack_result(1),
        Err(SessionError::NotInFlight { seq: 1 })
    );
    p.drive();
    // The agent refuses a result for another command.
    assert_eq!(
        p.ag.send_result(&result(2)),
        Err(SessionError::NotInFlight { seq: 2 })
    );
    p.ag.send_result(&result(1)).unwrap();
    p.drive();
    // Result received, not acked: still in flight.
    assert_eq!(
        p.gw.dispatch(&exec(2)),
        Err(SessionError::AlreadyInFlight { in_flight: 1 })
    );
    p.gw.ack_result(1).unwrap();
    assert_eq!(
        p.gw.ack_result(1),
        Err(SessionError::NotInFlight { seq: 1 })
    );
    p.gw.dispatch(&exec(2)).unwrap();
    p.drive();
    assert!(p.gw_errors.is_empty() && p.ag_errors.is_empty());
}

#[test]
fn agent_rejects_a_dispatch_while_busy() {
    let mut ag = AgentSession::new(
        Instant::ZERO,
        config(),
        FirstMessage::Hello(hello(BOOT_A, None)),
    )
    .unwrap();
    let bytes = stream(&[
        Message::Welcome(welcome(0)),
        Message::Dispatch(exec(1)),
        Message::Dispatch(exec(2)),
    ]);
    let err = SessionError::DispatchWhileBusy {
        seq: 2,
        in_flight: 1,
    };
    assert_eq!(ag.handle_input(Instant::ZERO, &bytes), Err(err));
    assert!(ag.is_closed());
    let mut out = Vec::new();
    ag.poll_transmit(Instant::ZERO, &mut out).unwrap();
    let sent = frames(&out);
    assert!(matches!(
        sent.last(),
        Some(Message::Close(c)) if c.code == CloseCode::PROTOCOL && c.reason.contains("seq 2")
    ));
}

#[test]
fn agent_rejects_a_dispatch_it_already_executed() {
    let last = LastExecuted {
        seq: 5,
        attempt: 1,
        executing: false,
        result: None,
    };
    let mut ag = AgentSession::new(
        Instant::ZERO,
        config(),
        FirstMessage::Hello(hello(BOOT_A, Some(last))),
    )
    .unwrap();
    let bytes = stream(&[Message::Welcome(welcome(5)), Message::Dispatch(exec(5))]);
    assert_eq!(
        ag.handle_input(Instant::ZERO, &bytes),
        Err(SessionError::StaleDispatch {
            seq: 5,
            attempt: 1,
            last: (5, 1)
        })
    );
}

#[test]
fn reboot_suspends_across_sessions() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    p.gw.dispatch(&reboot_cmd(7)).unwrap();
    p.drive();
    let ev = p.take_ag();
    assert!(matches!(
        ev[..],
        [AgentEvent::Dispatch {
            seq: 7,
            reboot: true,
            ..
        }]
    ));
    p.ag.send_reboot_starting(7).unwrap();
    assert!(p.ag.is_closed());
    p.drive();
    let ev = p.take_gw();
    match &ev[..] {
        [GatewayEvent::RebootStarting(rs), GatewayEvent::Closed(c)] => {
            assert_eq!((rs.seq, rs.command_id, rs.boot_id), (7, 1007, BOOT_A));
            assert_eq!((c.code, c.by_peer), (CloseCode::NORMAL, true));
        }
        other => panic!("{other:?}"),
    }
    assert!(p.gw.is_closed());

    // The device reboots and reconnects on a new session with a new boot id.
    let last = LastExecuted {
        seq: 7,
        attempt: 1,
        executing: true,
        result: None,
    };
    let mut p = Pair::with(
        p.now + Duration::from_secs(40),
        Some(DEVICE),
        FirstMessage::Hello(hello(BOOT_B, Some(last))),
        Chunking::Whole,
    );
    p.drive();
    let ev = p.take_gw();
    assert!(matches!(
        ev[..],
        [GatewayEvent::Hello {
            boot_id: BOOT_B,
            last_seq: Some(7),
            unacked_result: false,
            ..
        }]
    ));
    p.gw.accept(&welcome(7)).unwrap();
    p.drive();
    p.take_ag();
    let rc = RebootComplete {
        seq: 7,
        report: report(BOOT_B),
        result: result(7),
    };
    p.ag.send_reboot_complete(&rc).unwrap();
    p.drive();
    let ev = p.take_gw();
    match &ev[..] {
        [GatewayEvent::RebootComplete {
            seq: 7,
            boot_id,
            frame,
        }] => {
            assert_eq!(*boot_id, BOOT_B);
            assert_eq!(frame.message(), Message::RebootComplete(rc));
        }
        other => panic!("{other:?}"),
    }
    // The queue resumes.
    p.gw.dispatch(&exec(8)).unwrap();
    p.drive();
    assert!(matches!(
        p.take_ag()[..],
        [AgentEvent::Dispatch { seq: 8, .. }]
    ));
}

#[test]
fn reboot_starting_needs_a_reboot_command() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    p.gw.dispatch(&exec(1)).unwrap();
    p.drive();
    assert_eq!(
        p.ag.send_reboot_starting(1),
        Err(SessionError::NotARebootCommand { seq: 1 })
    );
    assert_eq!(
        p.ag.send_reboot_starting(2),
        Err(SessionError::NotInFlight { seq: 2 })
    );
    // The gateway enforces the same rule on the wire.
    let mut gw = GatewaySession::new(Instant::ZERO, config(), Some(DEVICE));
    gw.handle_input(
        Instant::ZERO,
        &stream(&[Message::Hello(hello(BOOT_A, None))]),
    )
    .unwrap();
    gw.accept(&welcome(0)).unwrap();
    gw.dispatch(&exec(1)).unwrap();
    let rs = Message::RebootStarting(crate::msg::RebootStarting {
        command_id: 1001,
        seq: 1,
        boot_id: BOOT_A,
    });
    assert_eq!(
        gw.handle_input(Instant::ZERO, &stream(&[rs])),
        Err(SessionError::NotARebootCommand { seq: 1 })
    );
}

#[test]
fn unacked_result_is_resent_in_hello_and_acked_once() {
    // Session 1: the result reaches the gateway, which stores it but dies before acking.
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    p.gw.dispatch(&exec(3)).unwrap();
    p.drive();
    p.ag.send_result(&result(3)).unwrap();
    p.drive();
    assert!(matches!(
        p.take_gw()[..],
        [GatewayEvent::Result { seq: 3, .. }]
    ));
    p.gw.close(CloseCode::SHUTDOWN, "restarting").unwrap();
    p.drive();
    assert!(p.ag.is_closed());

    // Session 2: the agent still holds the result and sends it in Hello.last.
    let r = result(3);
    let last = LastExecuted {
        seq: 3,
        attempt: 1,
        executing: false,
        result: Some(r.clone()),
    };
    let mut p = Pair::new(
        Some(DEVICE),
        FirstMessage::Hello(hello(BOOT_A, Some(last.clone()))),
    );
    assert_eq!(p.ag.in_flight(), Some(3));
    p.drive();
    let ev = p.take_gw();
    match &ev[..] {
        [GatewayEvent::Hello {
            last_seq: Some(3),
            unacked_result: true,
            frame,
            ..
        }] => {
            let Message::Hello(h) = frame.message() else {
                panic!()
            };
            assert_eq!(h.last, Some(last.clone()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.gw.in_flight(), Some(3));
    // The driver finds seq 3 already stored (idempotent put), welcomes with an older
    // acked_seq and acks explicitly.
    p.gw.accept(&welcome(2)).unwrap();
    assert_eq!(
        p.gw.dispatch(&exec(4)),
        Err(SessionError::AlreadyInFlight { in_flight: 3 })
    );
    p.gw.ack_result(3).unwrap();
    p.drive();
    assert_eq!(
        p.take_ag(),
        vec![
            AgentEvent::Welcomed(welcome(2)),
            AgentEvent::ResultAcked { seq: 3 }
        ]
    );

    // Session 3 variant: Welcome.acked_seq covering the result acks it.
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, Some(last))));
    p.establish(welcome(3));
    assert_eq!(p.take_ag(), vec![AgentEvent::ResultAcked { seq: 3 }]);
    assert_eq!((p.gw.in_flight(), p.ag.in_flight()), (None, None));
    p.gw.dispatch(&exec(4)).unwrap();
    p.drive();
    assert!(p.gw_errors.is_empty() && p.ag_errors.is_empty());
}

#[test]
fn duplicate_result_of_an_acked_seq_is_reacked_and_ignored() {
    let mut gw = GatewaySession::new(Instant::ZERO, config(), Some(DEVICE));
    let t = Instant::ZERO;
    gw.handle_input(t, &stream(&[Message::Hello(hello(BOOT_A, None))]))
        .unwrap();
    gw.accept(&welcome(0)).unwrap();
    gw.dispatch(&exec(1)).unwrap();
    gw.handle_input(t, &stream(&[Message::Result(result(1))]))
        .unwrap();
    gw.ack_result(1).unwrap();
    let mut out = Vec::new();
    while gw.poll_transmit(t, &mut out).is_some() {}
    while gw.poll_event().is_some() {}
    // The same result again: re-acked, no new Result event, no error.
    gw.handle_input(t, &stream(&[Message::Result(result(1))]))
        .unwrap();
    assert_eq!(
        gw.poll_event(),
        Some(GatewayEvent::DuplicateResult { seq: 1 })
    );
    out.clear();
    gw.poll_transmit(t, &mut out).unwrap();
    assert_eq!(
        frames(&out),
        vec![Message::ResultAck(crate::msg::ResultAck { seq: 1 })]
    );
    // A result for a seq never dispatched is a protocol error.
    assert_eq!(
        gw.handle_input(t, &stream(&[Message::Result(result(9))])),
        Err(SessionError::SeqMismatch {
            kind: Kind::Result,
            got: 9,
            expected: None
        })
    );
}

#[test]
fn a_command_still_executing_across_a_reconnect_delivers_its_result_on_the_new_session() {
    // Session 1: dispatch seq 4, then the connection drops while the agent executes it.
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(3));
    p.gw.dispatch(&exec(4)).unwrap();
    p.drive();
    assert!(matches!(
        p.take_ag()[..],
        [AgentEvent::Dispatch { seq: 4, .. }]
    ));

    // Session 2: Hello names seq 4 without a result; both drivers resume it.
    let last = LastExecuted {
        seq: 4,
        attempt: 1,
        executing: true,
        result: None,
    };
    let mut q = Pair::with(
        p.now,
        Some(DEVICE),
        FirstMessage::Hello(hello(BOOT_A, Some(last))),
        Chunking::Whole,
    );
    q.establish(welcome(3));
    // Without resuming, the gateway would treat the result as a protocol error.
    q.gw.resume_in_flight(4, 1, 1004, false).unwrap();
    q.ag.resume_executing(4, 1, 1004, false).unwrap();
    assert_eq!(
        q.gw.resume_in_flight(4, 1, 1004, false),
        Err(SessionError::AlreadyInFlight { in_flight: 4 })
    );
    q.ag.send_result(&result(4)).unwrap();
    q.drive();
    assert!(matches!(
        q.take_gw()[..],
        [GatewayEvent::Result {
            seq: 4,
            command_id: 1004,
            ..
        }]
    ));
    q.gw.ack_result(4).unwrap();
    q.drive();
    assert_eq!(q.take_ag(), vec![AgentEvent::ResultAcked { seq: 4 }]);
    assert!(q.gw_errors.is_empty() && q.ag_errors.is_empty());
}

#[test]
fn reboot_complete_after_a_lost_reboot_starting_completes_the_resumed_reboot() {
    // The gateway resumed the reboot command as in flight (its store never saw RebootStarting);
    // the agent, back from the reboot, reports completion.
    let last = LastExecuted {
        seq: 5,
        attempt: 1,
        executing: true,
        result: None,
    };
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_B, Some(last))));
    p.establish(welcome(4));
    p.gw.resume_in_flight(5, 1, 1005, true).unwrap();
    p.ag.send_reboot_complete(&RebootComplete {
        seq: 5,
        report: report(BOOT_B),
        result: result(5),
    })
    .unwrap();
    p.drive();
    assert!(matches!(
        p.take_gw()[..],
        [GatewayEvent::RebootComplete { seq: 5, .. }]
    ));
    assert_eq!(p.gw.in_flight(), None);
    // A completion for another seq while something else is in flight is still refused.
    let mut q = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_B, None)));
    q.establish(welcome(4));
    q.gw.resume_in_flight(6, 1, 1006, false).unwrap();
    q.ag.send_reboot_complete(&RebootComplete {
        seq: 5,
        report: report(BOOT_B),
        result: result(5),
    })
    .unwrap();
    q.drive();
    assert!(
        matches!(q.gw_errors[..], [SessionError::SeqMismatch { .. }]),
        "{:?}",
        q.gw_errors
    );
}

fn attempt<'a>(mut d: Dispatch<'a>, attempt: u32) -> Dispatch<'a> {
    d.attempt = attempt;
    d
}

fn result_of(seq: u64, attempt: u32) -> CommandResult<'static> {
    CommandResult {
        attempt,
        ..result(seq)
    }
}

/// A retry is the same seq with a higher attempt: the agent runs it; a dispatch of the
/// attempt it already executed (a redelivery) or of an older one is refused.
#[test]
fn agent_runs_a_higher_attempt_of_the_same_seq_and_refuses_a_redelivery() {
    let last = LastExecuted {
        seq: 5,
        attempt: 1,
        executing: false,
        result: None,
    };
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, Some(last))));
    p.establish(welcome(4));
    p.gw.dispatch(&attempt(exec(5), 2)).unwrap();
    p.drive();
    assert!(
        matches!(
            p.take_ag()[..],
            [AgentEvent::Dispatch {
                seq: 5,
                attempt: 2,
                ..
            }]
        ),
        "{:?}",
        p.ag_errors
    );
    // The result of attempt 2 goes through; one of attempt 1 is not the one executing.
    assert_eq!(
        p.ag.send_result(&result_of(5, 1)),
        Err(SessionError::AttemptMismatch {
            seq: 5,
            got: 1,
            expected: 2
        })
    );
    p.ag.send_result(&result_of(5, 2)).unwrap();
    p.drive();
    assert!(matches!(
        p.take_gw()[..],
        [GatewayEvent::Result { seq: 5, .. }]
    ));
    p.gw.ack_result(5).unwrap();
    p.drive();
    // In the same session, a third attempt still runs; attempt 3 again does not.
    p.gw.dispatch(&attempt(exec(5), 3)).unwrap();
    p.drive();
    assert!(p.ag_errors.is_empty(), "{:?}", p.ag_errors);
    p.ag.send_result(&result_of(5, 3)).unwrap();
    p.drive();
    p.gw.ack_result(5).unwrap();
    p.gw.dispatch(&attempt(exec(5), 3)).unwrap();
    p.drive();
    assert_eq!(
        p.ag_errors,
        vec![SessionError::StaleDispatch {
            seq: 5,
            attempt: 3,
            last: (5, 3)
        }]
    );

    // A Hello naming attempt 2: attempt 1 of the same seq is stale too.
    let last = LastExecuted {
        seq: 5,
        attempt: 2,
        executing: false,
        result: None,
    };
    let mut ag = AgentSession::new(
        Instant::ZERO,
        config(),
        FirstMessage::Hello(hello(BOOT_A, Some(last))),
    )
    .unwrap();
    let bytes = stream(&[
        Message::Welcome(welcome(4)),
        Message::Dispatch(attempt(exec(5), 1)),
    ]);
    assert!(matches!(
        ag.handle_input(Instant::ZERO, &bytes),
        Err(SessionError::StaleDispatch { attempt: 1, .. })
    ));
}

/// The gateway accepts a result only for the dispatched attempt, and a `Hello.last` whose
/// result names another attempt than the `LastExecuted` is malformed.
#[test]
fn gateway_checks_the_attempt_of_results() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.establish(welcome(0));
    p.gw.dispatch(&attempt(exec(3), 2)).unwrap();
    p.drive();
    p.take_ag();
    // The agent core would refuse to send it: feed the gateway directly.
    let err =
        p.gw.handle_input(p.now, &stream(&[Message::Result(result_of(3, 1))]))
            .unwrap_err();
    assert_eq!(
        err,
        SessionError::AttemptMismatch {
            seq: 3,
            got: 1,
            expected: 2
        }
    );
    assert_eq!(
        alloc::format!("{err}"),
        "seq 3 carries attempt 1, but attempt 2 was dispatched"
    );

    let last = LastExecuted {
        seq: 3,
        attempt: 2,
        executing: false,
        result: Some(result_of(3, 1)),
    };
    let mut gw = GatewaySession::new(Instant::ZERO, config(), Some(DEVICE));
    let bytes = stream(&[Message::Hello(hello(BOOT_A, Some(last)))]);
    assert!(matches!(
        gw.handle_input(Instant::ZERO, &bytes),
        Err(SessionError::AttemptMismatch { seq: 3, .. })
    ));
}

/// The device is back from the reboot of attempt 1 while the gateway has dispatched attempt
/// 2 (the queue was retried): that completion is passed on but does not end attempt 2.
#[test]
fn a_reboot_completion_of_an_earlier_attempt_leaves_the_dispatched_one_in_flight() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_B, None)));
    p.establish(welcome(4));
    p.gw.dispatch(&attempt(reboot_cmd(5), 2)).unwrap();
    p.drive();
    p.take_ag();
    let stale = RebootComplete {
        seq: 5,
        report: report(BOOT_B),
        result: result_of(5, 1),
    };
    p.gw.handle_input(p.now, &stream(&[Message::RebootComplete(stale)]))
        .unwrap();
    assert!(matches!(
        p.gw.poll_event(),
        Some(GatewayEvent::RebootComplete { seq: 5, .. })
    ));
    assert_eq!(p.gw.in_flight(), Some(5));
    // Its own completion ends it.
    let own = RebootComplete {
        seq: 5,
        report: report(BOOT_B),
        result: result_of(5, 2),
    };
    p.gw.handle_input(p.now, &stream(&[Message::RebootComplete(own)]))
        .unwrap();
    assert_eq!(p.gw.in_flight(), None);
    // A completion whose result names another command is malformed.
    let bad = RebootComplete {
        seq: 5,
        report: report(BOOT_B),
        result: result_of(6, 2),
    };
    assert!(matches!(
        p.gw.handle_input(p.now, &stream(&[Message::RebootComplete(bad)])),
        Err(SessionError::SeqMismatch {
            kind: crate::Kind::RebootComplete,
            ..
        })
    ));
}

/// A configuration report on its own reaches the gateway driver once established.
#[test]
fn a_report_is_passed_to_the_gateway_driver() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    assert_eq!(
        p.ag.send_report(&report(BOOT_A)),
        Err(SessionError::NotEstablished {
            phase: Phase::AwaitingWelcome
        })
    );
    p.establish(welcome(0));
    p.ag.send_report(&report(BOOT_A)).unwrap();
    p.drive();
    match &p.take_gw()[..] {
        [GatewayEvent::Report(frame)] => {
            assert_eq!(frame.message(), Message::Report(report(BOOT_A)));
        }
        other => panic!("{other:?}"),
    }
}
