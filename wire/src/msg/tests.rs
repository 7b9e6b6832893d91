//! Property tests: emit→parse round trips for arbitrary messages of every kind, garbage never
//! panics, and the deframer is indifferent to chunking.

use alloc::vec;
use alloc::vec::Vec;

use arbitrary::{Arbitrary, Unstructured};
use proptest::prelude::*;

use super::*;
use crate::deframer::Deframer;
use crate::header::MAX_STREAM_BODY;

fn round_trip(m: &Message<'_>) {
    let n = m.buffer_len().expect("sample within limits");
    let mut buf = vec![0u8; n];
    assert_eq!(m.emit(&mut buf).unwrap(), n);
    let (frame, rest) = Frame::parse_prefix(&buf, MAX_STREAM_BODY).unwrap();
    assert!(rest.is_empty());
    assert_eq!(&Message::parse(&frame).unwrap(), m);
    // A buffer one byte short is refused, never overrun.
    assert_eq!(m.emit(&mut buf[..n - 1]), Err(Error::BufferTooSmall));
}

#[test]
fn every_sample_round_trips() {
    let samples = samples::all();
    let kinds: Vec<Kind> = samples.iter().map(Message::kind).collect();
    assert_eq!(kinds, Kind::ALL.to_vec(), "one sample per kind, in order");
    for m in &samples {
        round_trip(m);
    }
}

#[test]
fn authenticated_emit_carries_a_tag_over_mac_input() {
    let m = Message::Heartbeat(Heartbeat {
        nonce: 5,
        echo: true,
    });
    let mut buf = [0u8; 64];
    let n = m
        .emit_authenticated(&mut buf, |hdr, body| {
            let mut t = [0u8; TAG_LEN];
            t[0] = hdr[2];
            t[1] = body.len() as u8;
            t
        })
        .unwrap();
    assert_eq!(n, m.buffer_len().unwrap() + TAG_LEN);
    let (parsed, frame) = Message::parse_datagram(&buf[..n]).unwrap();
    assert_eq!(parsed, m);
    let tag = frame.tag.unwrap();
    assert_eq!((tag[0], tag[1]), (Kind::Heartbeat as u8, 9));
}

#[test]
fn limits_are_enforced_on_emit_and_parse() {
    let long = "x".repeat(limits::MAX_REASON + 1);
    let m = Message::Close(Close {
        code: CloseCode::NORMAL,
        reason: (&long).into(),
    });
    assert_eq!(m.buffer_len(), Err(Error::FieldTooLong));
    // Hand-built body with an over-long reason.
    let mut body = vec![0, 0];
    body.extend_from_slice(&((limits::MAX_REASON + 1) as u16).to_be_bytes());
    body.extend(core::iter::repeat_n(b'x', limits::MAX_REASON + 1));
    assert_eq!(
        Message::decode_body(Kind::Close, &body),
        Err(Error::FieldTooLong)
    );
}

#[test]
fn trailing_bytes_unknown_values_and_bad_utf8_are_errors() {
    let mut body = 7u64.to_be_bytes().to_vec();
    assert!(Message::decode_body(Kind::ResultAck, &body).is_ok());
    body.push(0);
    assert_eq!(
        Message::decode_body(Kind::ResultAck, &body),
        Err(Error::TrailingBytes)
    );
    // Heartbeat echo byte must be 0 or 1.
    let mut hb = 1u64.to_be_bytes().to_vec();
    hb.push(2);
    assert_eq!(
        Message::decode_body(Kind::Heartbeat, &hb),
        Err(Error::InvalidValue)
    );
    // Close with a reason that is not UTF-8.
    let close = [0, 0, 0, 2, 0xff, 0xfe];
    assert_eq!(Message::decode_body(Kind::Close, &close), Err(Error::Utf8));
    assert_eq!(Kind::from_u8(0x7e), Err(Error::UnknownKind(0x7e)));
    // A step code this version does not define (after command id, seq, attempt, timeout).
    let mut d = vec![0u8; 24];
    d.extend_from_slice(&[0, 1, 9]);
    assert_eq!(
        Message::decode_body(Kind::Dispatch, &d),
        Err(Error::InvalidValue)
    );
}

#[test]
fn huge_list_counts_do_not_allocate() {
    // A Result claiming 64 steps (the limit) in a 34-byte body fails before allocating.
    let mut body = vec![0u8; 24];
    body.extend_from_slice(&64u16.to_be_bytes());
    body.extend_from_slice(&[0u8; 8]);
    assert_eq!(
        Message::decode_body(Kind::Result, &body),
        Err(Error::Truncated)
    );
}

#[test]
fn last_executed_states_are_one_byte_and_exclusive() {
    let hello = |last| {
        Message::Hello(Hello {
            device_id: 1,
            credential: b"".into(),
            agent_version: "".into(),
            boot_id: [0; 16],
            last: Some(last),
        })
    };
    let tail = |m: &Message<'_>| {
        let mut v = Vec::new();
        m.emit_to_vec(&mut v).unwrap();
        v[v.len() - 13..].to_vec()
    };
    let last = |executing| LastExecuted {
        seq: 9,
        attempt: 3,
        executing,
        result: None,
    };
    // seq, attempt, then the state byte: 0 finished and acknowledged, 1 executing.
    let mut want = 9u64.to_be_bytes().to_vec();
    want.extend_from_slice(&3u32.to_be_bytes());
    want.push(0);
    assert_eq!(tail(&hello(last(false))), want);
    *want.last_mut().unwrap() = 1;
    assert_eq!(tail(&hello(last(true))), want);
    // Executing and a result at once means nothing: it does not encode, and state 3 does not
    // parse.
    let both = LastExecuted {
        result: Some(
            samples::all()
                .into_iter()
                .find_map(|m| match m {
                    Message::Result(r) => Some(r),
                    _ => None,
                })
                .unwrap(),
        ),
        ..last(true)
    };
    assert_eq!(hello(both).buffer_len(), Err(Error::InvalidValue));
    let mut v = Vec::new();
    hello(last(true)).emit_to_vec(&mut v).unwrap();
    let body = &mut v[HEADER_LEN..];
    let n = body.len();
    body[n - 1] = 3;
    assert_eq!(
        Message::decode_body(Kind::Hello, body),
        Err(Error::InvalidValue)
    );
}

fn arbitrary_message(data: &[u8]) -> Option<Message<'_>> {
    Message::arbitrary(&mut Unstructured::new(data)).ok()
}

/// Round-trips 20,000 seeded arbitrary messages and checks that every kind was exercised many
/// times, so the property below cannot pass by only ever generating one kind.
#[test]
fn arbitrary_round_trips_cover_every_kind() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut per_kind = [0u32; Kind::ALL.len()];
    for _ in 0..20_000 {
        let data: Vec<u8> = (0..256).map(|_| next() as u8).collect();
        let Some(m) = arbitrary_message(&data) else {
            continue;
        };
        let Ok(n) = m.buffer_len() else { continue };
        let mut buf = vec![0u8; n];
        m.emit(&mut buf).unwrap();
        let (frame, _) = Frame::parse_prefix(&buf, MAX_STREAM_BODY).unwrap();
        assert_eq!(Message::parse(&frame).unwrap(), m);
        let i = Kind::ALL.iter().position(|k| *k == m.kind()).unwrap();
        per_kind[i] += 1;
    }
    for (k, n) in Kind::ALL.iter().zip(per_kind) {
        assert!(n >= 100, "{k:?} round-tripped only {n} times");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_messages_round_trip(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Some(m) = arbitrary_message(&data) {
            if let Ok(n) = m.buffer_len() {
                let mut buf = vec![0u8; n];
                prop_assert_eq!(m.emit(&mut buf).unwrap(), n);
                let (frame, rest) = Frame::parse_prefix(&buf, MAX_STREAM_BODY).unwrap();
                prop_assert!(rest.is_empty());
                prop_assert_eq!(Message::parse(&frame).unwrap(), m);
            }
        }
    }

    #[test]
    fn garbage_never_panics(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(k) = Kind::from_u8(kind) {
            if let Ok(m) = Message::decode_body(k, &body) {
                // Anything accepted re-emits to the same bytes (one encoding per value).
                let mut out = vec![0u8; HEADER_LEN + body.len()];
                let n = m.emit(&mut out).unwrap();
                prop_assert_eq!(&out[HEADER_LEN..n], &body[..]);
            }
        }
        let _ = Message::parse_datagram(&body);
    }

    #[test]
    fn deframer_is_indifferent_to_chunking(
        picks in proptest::collection::vec(0usize..Kind::ALL.len(), 1..20),
        cuts in proptest::collection::vec(1usize..64, 1..200),
    ) {
        let samples = samples::all();
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for p in &picks {
            samples[*p].emit_to_vec(&mut stream).unwrap();
            want.push(samples[*p].clone());
        }
        let mut d = Deframer::default();
        let mut got = Vec::new();
        let mut rest = &stream[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = cuts[i % cuts.len()].min(rest.len());
            i += 1;
            d.push(&rest[..n]).unwrap();
            rest = &rest[n..];
            while let Some(f) = d.next_frame() {
                let f = f.unwrap();
                // Re-emit into an owned buffer: the frame borrows the deframer.
                let m = Message::parse(&f).unwrap();
                let mut v = Vec::new();
                m.emit_to_vec(&mut v).unwrap();
                got.push(v);
            }
        }
        let want_bytes: Vec<Vec<u8>> = want.iter().map(|m| { let mut v = Vec::new(); m.emit_to_vec(&mut v).unwrap(); v }).collect();
        prop_assert_eq!(got, want_bytes);
        prop_assert_eq!(d.buffered(), 0);
    }
}

/// The owned copy of a parsed message, for the kinds that can be kept (not data, repair or
/// parity, which stay slices of the datagram).
fn owned(m: Message<'_>) -> Option<Message<'static>> {
    Some(match m {
        Message::Hello(m) => Message::Hello(m.into_owned()),
        Message::Enrol(m) => Message::Enrol(m.into_owned()),
        Message::Enrolled(m) => Message::Enrolled(m.into_owned()),
        Message::Dispatch(m) => Message::Dispatch(m.into_owned()),
        Message::Result(m) => Message::Result(m.into_owned()),
        Message::RebootComplete(m) => Message::RebootComplete(m.into_owned()),
        Message::Report(m) => Message::Report(m.into_owned()),
        Message::Announce(m) => Message::Announce(m.into_owned()),
        Message::Completion(m) => Message::Completion(m.into_owned()),
        Message::Close(m) => Message::Close(m.into_owned()),
        Message::Data(_) | Message::Repair(_) | Message::Parity(_) | Message::Manifest(_) => {
            return None
        }
        Message::Welcome(m) => Message::Welcome(m),
        Message::Heartbeat(m) => Message::Heartbeat(m),
        Message::ResultAck(m) => Message::ResultAck(m),
        Message::RebootStarting(m) => Message::RebootStarting(m),
        Message::Nack(m) => Message::Nack(m),
        Message::TransferStatus(m) => Message::TransferStatus(m),
        Message::Probe(m) => Message::Probe(m),
        Message::TaskAsk(m) => Message::TaskAsk(m),
        Message::TaskAnswer(m) => Message::TaskAnswer(m),
        Message::Overflow(m) => Message::Overflow(m),
    })
}

#[test]
fn parsing_borrows_and_into_owned_outlives_the_buffer() {
    let mut kept = Vec::new();
    for m in samples::all() {
        let mut buf = Vec::new();
        m.emit_to_vec(&mut buf).unwrap();
        let (frame, _) = Frame::parse_prefix(&buf, MAX_STREAM_BODY).unwrap();
        let parsed = Message::parse(&frame).unwrap();
        if let Message::Dispatch(d) = &parsed {
            // The hot path does not copy: strings and bytes point into the frame.
            let Step::Exec { argv } = &d.steps[3] else {
                panic!("sample step 3 is exec")
            };
            assert!(matches!(argv[0], Cow::Borrowed(_)));
            let Step::Write { contents, .. } = &d.steps[2] else {
                panic!("sample step 2 is write")
            };
            let inside = buf.as_ptr_range();
            assert!(inside.contains(&contents.as_ptr()));
        }
        if let Some(o) = owned(parsed) {
            kept.push((m, o));
        }
        // `buf` is dropped here; the owned copies must not need it.
    }
    assert_eq!(kept.len(), Kind::ALL.len() - 4);
    for (sample, o) in &kept {
        assert_eq!(sample, o);
    }
}

fn embeds_exactly<'a, T: Embed<'a> + PartialEq + core::fmt::Debug>(v: &T, buf: &'a mut Vec<u8>) {
    buf.clear();
    buf.push(0xEE); // encode_to_vec appends
    v.encode_to_vec(buf).unwrap();
    buf.push(0);
    let body = &buf[1..];
    assert_eq!(
        T::decode_exact(body).map(|_| ()),
        Err(Error::TrailingBytes),
        "a trailing byte is refused"
    );
    assert_eq!(&T::decode_exact(&body[..body.len() - 1]).unwrap(), v);
}

#[test]
fn embedded_parts_round_trip_and_must_be_exact() {
    for m in samples::all() {
        let mut buf = Vec::new();
        match &m {
            Message::Dispatch(d) => d.steps.iter().for_each(|s| embeds_exactly(s, &mut buf)),
            Message::Result(r) => embeds_exactly(r, &mut buf),
            Message::Report(r) => embeds_exactly(r, &mut buf),
            Message::Announce(a) => embeds_exactly(a, &mut buf),
            _ => {}
        }
    }
    let too_long = CommandResult {
        output: vec![0; limits::MAX_OUTPUT + 1].into(),
        ..match &samples::all()[6] {
            Message::Result(r) => r.clone(),
            _ => panic!("sample 6 is a result"),
        }
    };
    let mut out = vec![1, 2];
    assert_eq!(too_long.encode_to_vec(&mut out), Err(Error::FieldTooLong));
    assert_eq!(out, [1, 2], "nothing appended on error");
}

#[test]
fn a_kept_step_reborrows_without_copying() {
    let Message::Dispatch(d) = &samples::all()[5] else {
        panic!("sample 5 is a dispatch")
    };
    for st in &d.steps {
        let owned = st.clone().into_owned();
        let b = owned.borrowed();
        assert_eq!(&b, st);
        if let (Step::Exec { argv }, Step::Exec { argv: kept }) = (&b, &owned) {
            assert!(matches!(argv[0], Cow::Borrowed(_)));
            assert_eq!(
                argv[0].as_ptr(),
                kept[0].as_ptr(),
                "the same bytes, not a copy"
            );
        }
    }
}

#[test]
fn sha256_text_is_64_hex_digits_and_nothing_else() {
    let d: [u8; 32] = core::array::from_fn(|i| (i * 7 + 3) as u8);
    assert_eq!(parse_sha256(&hex(&d)), Ok(d));
    assert_eq!(parse_sha256(&hex(&d).to_uppercase()), Ok(d));
    assert_eq!(parse_sha256("ab"), Err(DigestError::Length(2)));
    // A sign inside a pair is not a digit (from_str_radix would have read "+f" as 0x0f).
    let mut signed = hex(&d);
    signed.replace_range(10..11, "+");
    assert_eq!(parse_sha256(&signed), Err(DigestError::NotHex(10)));
    let mut bad = hex(&d);
    bad.replace_range(63..64, "g");
    assert_eq!(parse_sha256(&bad), Err(DigestError::NotHex(63)));
    assert_eq!(
        DigestError::Length(2).to_string(),
        "a SHA-256 is 64 hex digits, got 2 characters"
    );
}
