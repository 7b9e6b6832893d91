//! Any bytes as a datagram: decoding never panics, and whatever decodes re-emits to exactly
//! the same body (one encoding per value; length conserved).
#![no_main]

use fleetcast_wire::{DataBlock, Frame, Manifest, Message, Parity, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = DataBlock::parse(data);
    let _ = Parity::parse(data);
    // The manifest parser the receivers run on every `Manifest` datagram: whole digests and
    // path entries only, and it agrees with the message parser.
    if let Ok(m) = Manifest::parse(data) {
        assert_eq!(m.digests.len() % 16, 0);
        assert_eq!(m.path.len() % 32, 0);
        let (msg, _) = Message::parse_datagram(data).expect("a manifest is a message");
        assert_eq!(msg, Message::Manifest(m));
    }
    let Ok((msg, frame)) = Message::parse_datagram(data) else {
        return;
    };
    let body_len = msg.body_len().expect("a parsed message is within limits");
    assert_eq!(body_len, frame.body.len(), "length conserved");
    let mut out = vec![0u8; HEADER_LEN + body_len];
    let n = msg.emit(&mut out).expect("a parsed message re-emits");
    assert_eq!(&out[HEADER_LEN..n], frame.body, "re-emitted body differs");
    let again = Frame::parse_datagram(&out).expect("emitted frame parses");
    assert_eq!(Message::parse(&again).expect("emitted message parses"), msg);
});
