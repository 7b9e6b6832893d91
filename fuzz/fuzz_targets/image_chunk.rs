//! The agent's chunk decoder (`image::decode_chunk`, pure-Rust zstd) never panics on any
//! frame, and what it accepts is exactly the entry's length. The first two bytes choose the
//! entry's image length (up to 64 KiB, so a run stays fast); the rest is the frame.
#![no_main]

use fleetcast_wire::image::{decode_chunk, ChunkEntry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, frame)) = data.split_first_chunk::<2>() else {
        return;
    };
    let entry = ChunkEntry {
        image_offset: 0,
        image_len: u32::from(u16::from_be_bytes(*len)),
        comp_offset: 0,
        comp_len: frame.len() as u32,
        sha256: [0; 32],
    };
    let mut out = Vec::new();
    if decode_chunk(&entry, frame, &mut out).is_ok() {
        assert_eq!(out.len() as u64, u64::from(entry.image_len));
    }
});
