//! A byte stream cut at arbitrary points: the deframer yields the same frames (or the same
//! first error) as one whole push, never panics, and never buffers past its limit.
#![no_main]

use arbitrary::Arbitrary;
use fleetcast_wire::{Deframer, Error, Message, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    max_body: u16,
    cuts: Vec<u8>,
    stream: Vec<u8>,
}

fn run(d: &mut Deframer, chunks: &mut dyn Iterator<Item = &[u8]>) -> (Vec<Vec<u8>>, Option<Error>) {
    let mut frames = Vec::new();
    for chunk in chunks {
        let pushed = d.push(chunk);
        while let Some(f) = d.next_frame() {
            match f {
                Ok(f) => {
                    let _ = Message::parse(&f);
                    frames.push(f.body.to_vec());
                }
                Err(e) => return (frames, Some(e)),
            }
        }
        // A push error is also reported by next_frame, after the frames before it.
        assert!(
            pushed.is_ok(),
            "push failed but next_frame did not report it"
        );
    }
    (frames, None)
}

fuzz_target!(|input: Input| {
    let max_body = u32::from(input.max_body);
    let mut whole = Deframer::new(max_body);
    let a = run(&mut whole, &mut std::iter::once(&input.stream[..]));

    let mut cut = Deframer::new(max_body);
    let mut rest = &input.stream[..];
    let mut sizes = input.cuts.iter().map(|c| usize::from(*c).max(1)).cycle();
    let mut chunks = Vec::new();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(1).min(rest.len());
        chunks.push(&rest[..n]);
        rest = &rest[n..];
    }
    let b = run(&mut cut, &mut chunks.into_iter());
    assert_eq!(a, b, "chunking changed the outcome");
    assert!(cut.buffered() <= input.stream.len());
    assert!(cut.buffered() <= HEADER_LEN + max_body as usize + 255 || a.1.is_none());
});
