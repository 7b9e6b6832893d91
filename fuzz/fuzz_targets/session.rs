//! Structured fuzzing of the gateway session core: arbitrary byte chunks, timeouts and driver
//! operations in any order. Invariants: nothing panics; time only moves forward; an error from
//! `handle_input` is sticky (every later call returns the same one); every byte the core emits
//! deframes and parses as valid messages.
#![no_main]

use arbitrary::Arbitrary;
use fleetcast_wire::session::GatewaySession;
use fleetcast_wire::{
    CloseCode, Deframer, Dispatch, Instant, Message, SessionConfig, Step, Welcome,
};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op<'a> {
    Input(&'a [u8]),
    Advance(u16),
    Accept(u64),
    Dispatch(u64),
    Ack(u64),
    Close,
}

fuzz_target!(|input: (bool, Vec<Op<'_>>)| {
    let (authenticated, ops) = input;
    let mut now = Instant::ZERO;
    let mut s = GatewaySession::new(now, SessionConfig::default(), authenticated.then_some(42));
    let mut sticky = None;
    let mut out = Vec::new();
    for op in ops {
        match op {
            Op::Input(bytes) => {
                let r = s.handle_input(now, bytes);
                if let Some(e) = sticky {
                    assert_eq!(r, Err(e), "errors must be sticky");
                } else if let Err(e) = r {
                    sticky = Some(e);
                }
            }
            Op::Advance(ms) => {
                now += core::time::Duration::from_millis(u64::from(ms));
                s.handle_timeout(now);
            }
            Op::Accept(acked) => {
                let _ = s.accept(&Welcome {
                    session_id: 1,
                    server_time_ms: 0,
                    heartbeat_ms: 1000,
                    acked_seq: acked,
                    pending_commands: 0,
                    pending_transfers: 0,
                });
            }
            Op::Dispatch(seq) => {
                let _ = s.dispatch(&Dispatch {
                    command_id: seq,
                    seq,
                    attempt: 1,
                    timeout_ms: 0,
                    steps: vec![Step::Report],
                    target: None,
                });
            }
            Op::Ack(seq) => {
                let _ = s.ack_result(seq);
            }
            Op::Close => {
                let _ = s.close(CloseCode::NORMAL, "fuzz");
            }
        }
        while s.poll_transmit(now, &mut out).is_some() {}
        while s.poll_event().is_some() {}
        if let Some(t) = s.poll_timeout() {
            assert!(t >= Instant::ZERO);
        }
    }
    let mut d = Deframer::default();
    d.push(&out).expect("the core emits valid frames");
    while let Some(f) = d.next_frame() {
        Message::parse(&f.expect("valid frame")).expect("valid message");
    }
    assert_eq!(d.buffered(), 0, "the core emitted a partial frame");
});
