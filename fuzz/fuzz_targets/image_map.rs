//! The image map's decoder (`ImageMap::decode`: a prepared image's header, read from the
//! gateway's cache and, later, from an announce) never panics on any bytes; what it accepts
//! encodes back to the same bytes (the CRC aside: fuzzing builds skip its check), and its
//! chunks, fed block by block to a `ChunkAssembler`, all come out whole exactly once.
#![no_main]

use fleetcast_wire::image::{ChunkAssembler, ImageMap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(map) = ImageMap::decode(data) else {
        return;
    };
    let mut out = Vec::new();
    map.encode(&mut out).expect("a decoded map encodes");
    assert_eq!(out.len(), data.len(), "length not conserved");
    assert_eq!(
        out[..out.len() - 4],
        data[..data.len() - 4],
        "not canonical"
    );
    let mut a = ChunkAssembler::new(map.chunks(), 1436).expect("non-zero block size");
    // Bounded work: a map may describe a large stream in few bytes.
    if a.blocks() > 1 << 16 {
        return;
    }
    let mut seen = vec![false; map.chunks().len()];
    for b in (0..a.blocks()).rev() {
        a.handle_block(b).expect("block in range");
        while let Some(c) = a.poll_whole() {
            assert!(!std::mem::replace(&mut seen[c as usize], true), "twice");
        }
    }
    assert!(a.is_complete());
    assert!(seen.iter().all(|s| *s), "a chunk never came out");
});
