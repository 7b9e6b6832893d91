//! Decoding one compressed chunk (feature `zstd`): pure Rust (`ruzstd`), bytes in, bytes out,
//! so the embedded agent links no C library for it and fuzzers reach it like any parser.
//!
//! The decoded bytes are checked against the chunk's index entry for length here; their
//! SHA-256 is the driver's to compute and pass to [`ChunkEntry::check_decoded`] (the wire
//! crate does not hash).

use alloc::vec::Vec;
use core::fmt;

use ruzstd::decoding::errors::FrameDecoderError;
use ruzstd::decoding::FrameDecoder;

use super::map::{ChunkEntry, MAX_CHUNK_SPAN};

/// Why a chunk's frame did not decode to its image bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame handed in is not the entry's `comp_len` bytes.
    FrameLength {
        /// The entry's `comp_len`.
        expected: u32,
        /// Bytes handed in.
        found: u64,
    },
    /// The bytes are not a zstd frame this decoder reads (bad magic, bad block, a window
    /// larger than a chunk may need).
    Frame,
    /// The frame decodes to more than the entry's `image_len`.
    TooLong {
        /// The entry's `image_len`.
        expected: u32,
    },
    /// The frame decodes to fewer bytes than the entry's `image_len`.
    TooShort {
        /// The entry's `image_len`.
        expected: u32,
        /// Bytes decoded.
        found: u64,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DecodeError::FrameLength { expected, found } => write!(
                f,
                "chunk frame of {found} bytes where its index says {expected}"
            ),
            DecodeError::Frame => f.write_str("chunk is not a valid zstd frame"),
            DecodeError::TooLong { expected } => write!(
                f,
                "chunk decodes to more than the {expected} bytes its index says"
            ),
            DecodeError::TooShort { expected, found } => write!(
                f,
                "chunk decodes to {found} bytes where its index says {expected}"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DecodeError {}

/// Decodes the frame of `entry` into `out` (cleared, then exactly `image_len` bytes on
/// success; reused across chunks, so a device allocates its chunk buffer once).
pub fn decode_chunk(
    entry: &ChunkEntry,
    frame: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    if frame.len() as u64 != u64::from(entry.comp_len) {
        return Err(DecodeError::FrameLength {
            expected: entry.comp_len,
            found: frame.len() as u64,
        });
    }
    let expected = entry.image_len;
    out.clear();
    out.resize(expected as usize, 0);
    let mut dec = FrameDecoder::new();
    // A chunk never needs a window larger than its span: refuse frames that ask for more
    // before the decoder allocates it.
    dec.set_max_window_size(u64::from(MAX_CHUNK_SPAN));
    let n = match dec.decode_all(frame, out) {
        Ok(n) => n as u64,
        Err(FrameDecoderError::TargetTooSmall) => {
            out.clear();
            return Err(DecodeError::TooLong { expected });
        }
        Err(_) => {
            out.clear();
            return Err(DecodeError::Frame);
        }
    };
    if n != u64::from(expected) {
        out.clear();
        return Err(DecodeError::TooShort { expected, found: n });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use ruzstd::encoding::{compress_to_vec, CompressionLevel};

    fn entry(image_len: u32, comp_len: usize) -> ChunkEntry {
        ChunkEntry {
            image_offset: 0,
            image_len,
            comp_offset: 0,
            comp_len: comp_len as u32,
            sha256: [0; 32],
        }
    }

    fn sample() -> Vec<u8> {
        (0..100_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 7000) as u8)
            .collect()
    }

    #[test]
    fn a_frame_decodes_to_its_bytes() {
        let data = sample();
        let frame = compress_to_vec(&data[..], CompressionLevel::Fastest);
        assert!(frame.len() < data.len());
        let mut out = vec![1, 2, 3];
        decode_chunk(&entry(data.len() as u32, frame.len()), &frame, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn every_mismatch_is_refused() {
        let data = sample();
        let frame = compress_to_vec(&data[..], CompressionLevel::Fastest);
        let n = data.len() as u32;
        let mut out = Vec::new();
        assert_eq!(
            decode_chunk(&entry(n, frame.len() + 1), &frame, &mut out),
            Err(DecodeError::FrameLength {
                expected: frame.len() as u32 + 1,
                found: frame.len() as u64
            })
        );
        assert_eq!(
            decode_chunk(&entry(n - 1, frame.len()), &frame, &mut out),
            Err(DecodeError::TooLong { expected: n - 1 })
        );
        assert_eq!(
            decode_chunk(&entry(n + 1, frame.len()), &frame, &mut out),
            Err(DecodeError::TooShort {
                expected: n + 1,
                found: u64::from(n)
            })
        );
        let mut bad = frame.clone();
        bad[0] ^= 0xff; // the magic
        assert_eq!(
            decode_chunk(&entry(n, bad.len()), &bad, &mut out),
            Err(DecodeError::Frame)
        );
        assert!(out.is_empty());
        // A cut frame never decodes to the whole chunk.
        let cut = &frame[..frame.len() / 2];
        assert!(decode_chunk(&entry(n, cut.len()), cut, &mut out).is_err());
    }
}
