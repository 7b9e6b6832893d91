//! Opening a session: enrolment, hello/welcome, authentication rules, timeouts and garbage
//! before a session exists, the pre-authentication frame limit.

use super::*;

#[test]
fn enrolment_issues_a_certificate_then_closes_normally() {
    let enrol = Enrol {
        token: b"one-time-token".into(),
        name: "rack4-node17".into(),
        spki: b"spki-der".into(),
    };
    let mut p = Pair::new(None, FirstMessage::Enrol(enrol.clone()));
    p.drive();
    let ev = p.take_gw();
    let [GatewayEvent::Enrol(frame)] = &ev[..] else {
        panic!("{ev:?}")
    };
    assert_eq!(frame.message(), Message::Enrol(enrol));
    assert_eq!(p.gw.phase(), Phase::AwaitingEnrolDecision);
    // Only enrolment decisions are possible now.
    assert_eq!(
        p.gw.accept(&welcome(0)),
        Err(SessionError::NoPendingDecision {
            phase: Phase::AwaitingEnrolDecision
        })
    );
    p.gw.send_enrolled(&Enrolled {
        device_id: DEVICE,
        certificate: b"cert-der".into(),
    })
    .unwrap();
    p.drive();
    assert!(p.gw.is_closed() && p.ag.is_closed());
    let ev = p.take_ag();
    match &ev[..] {
        [AgentEvent::Enrolled { device_id, frame }, AgentEvent::Closed(c)] => {
            assert_eq!(*device_id, DEVICE);
            assert!(
                matches!(frame.message(), Message::Enrolled(e) if *e.certificate == *b"cert-der")
            );
            assert_eq!((c.code, c.by_peer), (CloseCode::NORMAL, true));
        }
        other => panic!("{other:?}"),
    }
    assert!(p.gw_errors.is_empty() && p.ag_errors.is_empty());
}

#[test]
fn bad_enrolment_token_is_refused() {
    let enrol = Enrol {
        token: b"stale".into(),
        name: "n".into(),
        spki: b"k".into(),
    };
    let mut p = Pair::new(None, FirstMessage::Enrol(enrol));
    p.drive();
    p.gw.close(CloseCode::BAD_TOKEN, "token already used")
        .unwrap();
    p.drive();
    let c = closed_ag(&p.ag_events).unwrap();
    assert_eq!(
        (c.code, c.reason.as_str(), c.by_peer),
        (CloseCode::BAD_TOKEN, "token already used", true)
    );
}

#[test]
fn hello_welcome_establishes_both_ends() {
    let mut p = Pair::new(Some(DEVICE), FirstMessage::Hello(hello(BOOT_A, None)));
    p.drive();
    let ev = p.take_gw();
    match &ev[..] {
        [GatewayEvent::Hello {
            device_id,
            boot_id,
            last_seq,
            unacked_result,
            frame,
        }] => {
            assert_eq!(
                (*device_id, *boot_id, *last_seq, *unacked_result),
                (DEVICE, BOOT_A, None, false)
            );
            assert_eq!(frame.message(), Message::Hello(hello(BOOT_A, None)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.gw.device_id(), Some(DEVICE));
    // Nothing may be dispatched before the driver accepts.
    assert_eq!(
        p.gw.dispatch(&exec(1)),
        Err(SessionError::NotEstablished {
            phase: Phase::AwaitingAccept
        })
    );
    p.gw.accept(&welcome(0)).unwrap();
    p.drive();
    assert_eq!(p.take_ag(), vec![AgentEvent::Welcomed(welcome(0))]);
    assert_eq!(
        (p.gw.phase(), p.ag.phase()),
        (Phase::Established, Phase::Established)
    );
}

#[test]
fn hello_timeout_closes_a_silent_connection() {
    let mut gw = GatewaySession::new(Instant::ZERO, config(), Some(DEVICE));
    let deadline = gw.poll_timeout().unwrap();
    assert_eq!(deadline, Instant::ZERO + Duration::from_secs(5));
    gw.handle_timeout(Instant::from_micros(deadline.as_micros() - 1_000));
    assert!(!gw.is_closed());
    gw.handle_timeout(deadline);
    assert!(gw.is_closed());
    assert_eq!(gw.error(), Some(SessionError::TimedOut(TimeoutKind::Hello)));
    let mut out = Vec::new();
    gw.poll_transmit(deadline, &mut out).unwrap();
    assert!(matches!(&frames(&out)[..], [Message::Close(c)] if c.code == CloseCode::TIMEOUT));
}

#[test]
fn device_id_mismatch_closes_unauthenticated() {
    let mut p = Pair::new(Some(DEVICE + 1), FirstMessage::Hello(hello(BOOT_A, None)));
    p.drive();
    let err = SessionError::DeviceMismatch {
        claimed: DEVICE,
        authenticated: DEVICE + 1,
    };
    assert_eq!(p.gw_errors, vec![err]);
    assert_eq!(p.gw.error(), Some(err));
    let c = closed_ag(&p.ag_events).unwrap();
    assert_eq!((c.code, c.by_peer), (CloseCode::UNAUTHENTICATED, true));
    assert!(!p
        .gw_events
        .iter()
        .any(|e| matches!(e, GatewayEvent::Hello { .. })));
}

#[test]
fn unauthenticated_session_may_not_hello() {
    let mut p = Pair::new(None, FirstMessage::Hello(hello(BOOT_A, None)));
    p.drive();
    assert_eq!(p.gw_errors, vec![SessionError::Unauthenticated]);
    let c = closed_ag(&p.ag_events).unwrap();
    assert_eq!((c.code, c.by_peer), (CloseCode::UNAUTHENTICATED, true));
    assert!(p.gw.is_closed() && p.ag.is_closed());
}

#[test]
fn garbage_closes_protocol_with_a_sticky_error() {
    let mut gw = GatewaySession::new(Instant::ZERO, config(), Some(DEVICE));
    let t = Instant::ZERO;
    let err = SessionError::Wire(crate::Error::BadMagic(b'G'));
    assert_eq!(gw.handle_input(t, b"GET / HTTP/1.1\r\n\r\n"), Err(err));
    assert_eq!(
        gw.handle_input(t, &stream(&[Message::Hello(hello(BOOT_A, None))])),
        Err(err)
    );
    assert_eq!(gw.error(), Some(err));
    assert_eq!(gw.accept(&welcome(0)), Err(err));
    let mut out = Vec::new();
    gw.poll_transmit(t, &mut out).unwrap();
    match &frames(&out)[..] {
        [Message::Close(c)] => {
            assert_eq!(c.code, CloseCode::PROTOCOL);
            assert!(c.reason.contains("bad magic"), "{}", c.reason);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&gw.poll_event(), Some(GatewayEvent::Closed(c)) if !c.by_peer));
    assert_eq!(gw.poll_event(), None);

    // A well-framed message the agent may not send is just as fatal.
    let mut gw = GatewaySession::new(t, config(), Some(DEVICE));
    let err = SessionError::UnexpectedMessage {
        kind: Kind::Welcome,
        phase: Phase::AwaitingHello,
    };
    assert_eq!(
        gw.handle_input(t, &stream(&[Message::Welcome(welcome(0))])),
        Err(err)
    );

    // And on the agent: a corrupted frame (CRC) from the gateway.
    let mut ag = AgentSession::new(t, config(), FirstMessage::Hello(hello(BOOT_A, None))).unwrap();
    let mut bytes = stream(&[Message::Welcome(welcome(0))]);
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    let err = SessionError::Wire(crate::Error::Checksum);
    assert_eq!(ag.handle_input(t, &bytes), Err(err));
    assert_eq!(ag.handle_input(t, &bytes), Err(err));
}

/// A peer TLS did not authenticate may send at most `pre_auth_max_frame_body` per frame: the
/// largest possible `Enrol` fits, a bigger header is refused before any of its body is
/// buffered, and an authenticated session keeps the full limit.
#[test]
fn frames_before_authentication_are_cut_at_the_pre_auth_limit() {
    use crate::msg::limits::{MAX_NAME, MAX_SPKI, MAX_TOKEN};
    let name = "n".repeat(MAX_NAME);
    let (token, spki) = (vec![7u8; MAX_TOKEN], vec![9u8; MAX_SPKI]);
    let biggest = stream(&[Message::Enrol(Enrol {
        token: (&token).into(),
        name: (&name).into(),
        spki: (&spki).into(),
    })]);
    assert!(biggest.len() < crate::header::MAX_PRE_AUTH_BODY as usize);
    let mut gw = GatewaySession::new(Instant::ZERO, config(), None);
    gw.handle_input(Instant::ZERO, &biggest).unwrap();
    assert!(matches!(gw.poll_event(), Some(GatewayEvent::Enrol(_))));

    // A header announcing a body just over the limit, and most of that body.
    let len = crate::header::MAX_PRE_AUTH_BODY + 1;
    let mut big = vec![crate::MAGIC, crate::VERSION, 0x01, 0];
    big.extend_from_slice(&len.to_be_bytes());
    big.extend_from_slice(&[0; 4]);
    big.resize(big.len() + len as usize - 10, 0);
    let want = SessionError::PreAuthFrameTooLarge {
        len,
        max: crate::header::MAX_PRE_AUTH_BODY,
    };
    let mut gw = GatewaySession::new(Instant::ZERO, config(), None);
    assert_eq!(gw.handle_input(Instant::ZERO, &big), Err(want));
    assert!(gw.is_closed());
    match gw.poll_event() {
        Some(GatewayEvent::Closed(info)) => {
            assert_eq!(info.code, CloseCode::PROTOCOL);
            assert!(info.reason.contains("before authentication"), "{info:?}");
        }
        other => panic!("{other:?}"),
    }
    // With a client certificate the same frame is only incomplete.
    let mut gw = GatewaySession::new(Instant::ZERO, config(), Some(DEVICE));
    gw.handle_input(Instant::ZERO, &big).unwrap();
    assert!(!gw.is_closed());
}
