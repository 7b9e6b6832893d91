//! Arbitrary (structured) messages: emit then parse gives back the same message, and the
//! emitted length is what `buffer_len` promised.
#![no_main]

use fleetcast_wire::{Frame, Message, TAG_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|msg: Message<'_>| {
    let Ok(n) = msg.buffer_len() else { return };
    let mut buf = vec![0u8; n + TAG_LEN];
    assert_eq!(msg.emit(&mut buf).expect("buffer_len bytes suffice"), n);
    let (frame, rest) = Frame::parse_prefix(&buf[..n], u32::MAX).expect("emitted frame parses");
    assert!(rest.is_empty());
    assert_eq!(Message::parse(&frame).expect("emitted message parses"), msg);

    let tagged = msg
        .emit_authenticated(&mut buf, |_, _| [0x5A; TAG_LEN])
        .expect("room for tag");
    assert_eq!(tagged, n + TAG_LEN);
    let (frame, _) = Frame::parse_prefix(&buf, u32::MAX).expect("tagged frame parses");
    assert_eq!(frame.tag, Some(&[0x5A; TAG_LEN]));
    assert_eq!(Message::parse(&frame).expect("tagged message parses"), msg);
});
