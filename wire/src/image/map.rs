//! The image map: the header of a prepared image (format version, image size, block size,
//! data extents, chunk index, the SHA-256 of the whole image), its encoding and its checked
//! decoder.
//!
//! Encoding (integers network byte order), version 1:
//! ```text
//! "FCIM"  version:u8=1  compression:u8 (0 none, 1 zstd)  block_size:u32  chunk_span:u32
//! image_size:u64  image_sha256:[32]
//! extent_count:u32  { offset:u64 len:u64 } × extent_count
//! chunk_count:u32   { image_offset:u64 image_len:u32 comp_offset:u64 comp_len:u32
//!                     sha256:[32] } × chunk_count
//! crc32:u32   (CRC-32/ISO-HDLC of every byte before it)
//! ```
//! `chunk_span` and `chunk_count` are 0 for an uncompressed map. A chunk's image range and
//! stream offset follow from the extents and the span (see [`chunk_plan`]); they are written
//! anyway so a reader can find a chunk without replaying the plan, and the decoder checks
//! they agree with it, so a map never says two things.

use alloc::vec::Vec;
use core::fmt;

use super::sparse::{chunk_count, chunk_plan, Extent};
use crate::codec::Reader;

/// The map's first four bytes.
pub const IMAGE_MAP_MAGIC: [u8; 4] = *b"FCIM";
/// The map encoding this build writes and reads.
pub const IMAGE_MAP_VERSION: u8 = 1;
/// Smallest block size: the smallest logical sector a disk has.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size (a huge page): past it a sparse map finds few holes anyway.
pub const MAX_BLOCK_SIZE: u32 = 1 << 21;
/// Smallest chunk span.
pub const MIN_CHUNK_SPAN: u32 = 4096;
/// Largest chunk span: a device holds a whole chunk, compressed and decoded, in memory.
pub const MAX_CHUNK_SPAN: u32 = 64 << 20;
/// Most extents in a map (2²² extents of one 4 KiB block each describe 16 GiB of scattered
/// data; an image more fragmented than that is better sent raw).
pub const MAX_EXTENTS: u32 = 1 << 22;
/// Most chunks in a map (2²² chunks of 1 MiB: 4 TiB of data).
pub const MAX_CHUNKS: u32 = 1 << 22;

const EXTENT_LEN: usize = 16;
const CHUNK_LEN: usize = 8 + 4 + 8 + 4 + 32;
const FIXED_LEN: usize = 4 + 1 + 1 + 4 + 4 + 8 + 32;

/// How the image's data travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compression {
    /// The data extents as they are.
    None,
    /// The data extents cut at multiples of `span` into chunks, each one zstd frame.
    Zstd {
        /// Image bytes a chunk covers at most (chunks are cut at its multiples).
        span: u32,
        /// One entry per chunk, in image order (and stream order).
        chunks: Vec<ChunkEntry>,
    },
}

/// One compressed chunk: where its image bytes are, where its frame is in the compressed
/// stream, and the digest of the image bytes it decodes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// First image byte it decodes to.
    pub image_offset: u64,
    /// Image bytes it decodes to (at most the span).
    pub image_len: u32,
    /// First byte of its zstd frame in the compressed stream.
    pub comp_offset: u64,
    /// Bytes of its zstd frame.
    pub comp_len: u32,
    /// SHA-256 of the image bytes it decodes to.
    pub sha256: [u8; 32],
}

impl ChunkEntry {
    /// One past its last byte in the compressed stream.
    pub fn comp_end(&self) -> u64 {
        self.comp_offset.saturating_add(u64::from(self.comp_len))
    }

    /// Checks what a driver decoded from this chunk's frame: its length and its SHA-256
    /// (computed by the driver; the wire crate does not hash).
    pub fn check_decoded(&self, len: usize, sha256: &[u8; 32]) -> Result<(), ChunkError> {
        if len as u64 != u64::from(self.image_len) {
            return Err(ChunkError::Length {
                expected: self.image_len,
                found: len as u64,
            });
        }
        if sha256 != &self.sha256 {
            return Err(ChunkError::Digest);
        }
        Ok(())
    }
}

/// Why a decoded chunk is not the image bytes its entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChunkError {
    /// It decoded to another number of bytes.
    Length {
        /// The entry's `image_len`.
        expected: u32,
        /// Bytes decoded.
        found: u64,
    },
    /// Its bytes' SHA-256 is not the entry's.
    Digest,
    /// A compressed-stream block past the stream's end.
    BlockOutOfRange {
        /// The block's index.
        index: u64,
        /// Blocks in the stream.
        blocks: u64,
    },
    /// A compressed-stream block size of 0.
    ZeroBlockSize,
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ChunkError::Length { expected, found } => write!(
                f,
                "chunk decoded to {found} bytes where its index says {expected}"
            ),
            ChunkError::Digest => f.write_str("chunk's SHA-256 differs from its index's"),
            ChunkError::BlockOutOfRange { index, blocks } => write!(
                f,
                "compressed-stream block {index} is past the stream's {blocks} blocks"
            ),
            ChunkError::ZeroBlockSize => f.write_str("compressed-stream block size of 0"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ChunkError {}

/// Largest frame zstd makes of `len` bytes (`ZSTD_COMPRESSBOUND`): an index entry claiming
/// more is refused, so a device never reserves more than this for a chunk.
pub(crate) fn compress_bound(len: u32) -> u64 {
    let len = u64::from(len);
    let small = if len < (128 << 10) {
        ((128 << 10) - len) >> 11
    } else {
        0
    };
    len + (len >> 8) + small
}

/// Why bytes are not an image map, or a map breaks one of its rules: one variant per rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapError {
    /// The input ends inside a field.
    Truncated,
    /// The first four bytes are not [`IMAGE_MAP_MAGIC`].
    BadMagic,
    /// A map version this build does not read.
    UnsupportedVersion(u8),
    /// The CRC-32 trailer does not match the bytes.
    Checksum,
    /// Bytes after the trailer.
    TrailingBytes,
    /// A compression byte other than 0 (none) or 1 (zstd).
    UnknownCompression(u8),
    /// The block size is not a power of two from [`MIN_BLOCK_SIZE`] to [`MAX_BLOCK_SIZE`].
    BlockSize(u32),
    /// The chunk span is not a multiple of the block size from [`MIN_CHUNK_SPAN`] to
    /// [`MAX_CHUNK_SPAN`] (compressed), or not 0 (uncompressed).
    ChunkSpan(u32),
    /// More extents than [`MAX_EXTENTS`] or chunks than [`MAX_CHUNKS`].
    TooMany(u32),
    /// Extent `index` is empty.
    EmptyExtent(u32),
    /// Extent `index` does not start on a block boundary, or ends off one before the image's
    /// end.
    UnalignedExtent(u32),
    /// Extent `index` starts before (or at) the end of the one before it: unsorted,
    /// overlapping or touching.
    ExtentOrder(u32),
    /// Extent `index` ends past the image's end.
    ExtentPastEnd(u32),
    /// An uncompressed map lists chunks.
    ChunksWithoutCompression,
    /// The chunk count is not the number of pieces the extents cut into at the span.
    ChunkCount {
        /// Pieces the plan makes.
        expected: u32,
        /// Chunks listed.
        found: u32,
    },
    /// Chunk `index`'s image range is not the plan's piece `index`.
    ChunkRange(u32),
    /// Chunk `index` does not start where the one before it ends in the compressed stream
    /// (the first at 0).
    ChunkStream(u32),
    /// Chunk `index`'s compressed length is 0 or more than zstd makes of its image length.
    ChunkCompressedLen(u32),
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MapError::Truncated => f.write_str("image map truncated: input ends inside a field"),
            MapError::BadMagic => f.write_str("not an image map (bad magic)"),
            MapError::UnsupportedVersion(v) => write!(
                f,
                "image map version {v} is not supported (this build reads {IMAGE_MAP_VERSION})"
            ),
            MapError::Checksum => f.write_str("image map CRC-32 mismatch"),
            MapError::TrailingBytes => f.write_str("bytes after the image map's trailer"),
            MapError::UnknownCompression(c) => {
                write!(f, "unknown compression {c} (0 none, 1 zstd)")
            }
            MapError::BlockSize(b) => write!(
                f,
                "block size {b} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
            ),
            MapError::ChunkSpan(s) => write!(
                f,
                "chunk span {s} is not a multiple of the block size from {MIN_CHUNK_SPAN} to \
                 {MAX_CHUNK_SPAN} (or 0 without compression)"
            ),
            MapError::TooMany(n) => write!(f, "{n} extents or chunks: over the limit"),
            MapError::EmptyExtent(i) => write!(f, "extent {i} is empty"),
            MapError::UnalignedExtent(i) => {
                write!(f, "extent {i} is not aligned to the block size")
            }
            MapError::ExtentOrder(i) => write!(
                f,
                "extent {i} does not start after the end of the one before it"
            ),
            MapError::ExtentPastEnd(i) => write!(f, "extent {i} ends past the image's end"),
            MapError::ChunksWithoutCompression => {
                f.write_str("an uncompressed image map lists chunks")
            }
            MapError::ChunkCount { expected, found } => write!(
                f,
                "{found} chunks listed where the extents cut into {expected}"
            ),
            MapError::ChunkRange(i) => {
                write!(f, "chunk {i}'s image range is not the extents' piece {i}")
            }
            MapError::ChunkStream(i) => write!(
                f,
                "chunk {i} does not start where chunk {} ends in the compressed stream",
                i.wrapping_sub(1)
            ),
            MapError::ChunkCompressedLen(i) => write!(
                f,
                "chunk {i}'s compressed length is 0 or more than zstd makes of its image bytes"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for MapError {}

impl From<crate::Error> for MapError {
    // The codec's reader fails only for want of bytes; its counts are not used here (they
    // are u16), so every error it gives is a truncation.
    fn from(_: crate::Error) -> Self {
        MapError::Truncated
    }
}

/// The header of a prepared image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMap {
    /// Granularity of the sparse map.
    pub block_size: u32,
    /// Bytes of the whole image, holes included.
    pub image_size: u64,
    /// SHA-256 of the whole image's bytes (holes as zeros): what the target must hold.
    pub image_sha256: [u8; 32],
    /// The data extents.
    pub extents: Vec<Extent>,
    /// How the data travels.
    pub compression: Compression,
}

impl ImageMap {
    /// Data bytes (the extents' total).
    pub fn data_bytes(&self) -> u64 {
        super::data_bytes(&self.extents)
    }

    /// Bytes that travel: the compressed stream, or the data bytes.
    pub fn wire_bytes(&self) -> u64 {
        match &self.compression {
            Compression::None => self.data_bytes(),
            Compression::Zstd { chunks, .. } => chunks.last().map_or(0, ChunkEntry::comp_end),
        }
    }

    /// The chunks (empty when uncompressed).
    pub fn chunks(&self) -> &[ChunkEntry] {
        match &self.compression {
            Compression::None => &[],
            Compression::Zstd { chunks, .. } => chunks,
        }
    }

    /// Checks every rule of the module's invariants.
    pub fn validate(&self) -> Result<(), MapError> {
        let b = self.block_size;
        if !b.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&b) {
            return Err(MapError::BlockSize(b));
        }
        let b = u64::from(b);
        count_ok(self.extents.len())?;
        let mut prev_end = None;
        for (i, e) in self.extents.iter().enumerate() {
            let i = i as u32;
            if e.len == 0 {
                return Err(MapError::EmptyExtent(i));
            }
            let end = e
                .offset
                .checked_add(e.len)
                .ok_or(MapError::ExtentPastEnd(i))?;
            if end > self.image_size {
                return Err(MapError::ExtentPastEnd(i));
            }
            if e.offset % b != 0 || (end % b != 0 && end != self.image_size) {
                return Err(MapError::UnalignedExtent(i));
            }
            if prev_end.is_some_and(|p| e.offset <= p) {
                return Err(MapError::ExtentOrder(i));
            }
            prev_end = Some(end);
        }
        match &self.compression {
            Compression::None => Ok(()),
            Compression::Zstd { span, chunks } => self.validate_chunks(*span, chunks),
        }
    }

    fn validate_chunks(&self, span: u32, chunks: &[ChunkEntry]) -> Result<(), MapError> {
        if span % self.block_size != 0 || !(MIN_CHUNK_SPAN..=MAX_CHUNK_SPAN).contains(&span) {
            return Err(MapError::ChunkSpan(span));
        }
        count_ok(chunks.len())?;
        // Counted before the plan is built: the extents may describe far more chunks than
        // the map lists (found by the image_map fuzz target as an out-of-memory), and only
        // a plan as long as the listed chunks, themselves bounded by the map's bytes, is built.
        let expected = chunk_count(&self.extents, span);
        if expected != chunks.len() as u64 {
            return Err(MapError::ChunkCount {
                expected: u32::try_from(expected).unwrap_or(u32::MAX),
                found: chunks.len() as u32,
            });
        }
        let plan = chunk_plan(&self.extents, span);
        let mut stream = 0u64;
        for (i, (c, p)) in chunks.iter().zip(&plan).enumerate() {
            let i = i as u32;
            if c.image_offset != p.offset || u64::from(c.image_len) != p.len {
                return Err(MapError::ChunkRange(i));
            }
            if c.comp_offset != stream {
                return Err(MapError::ChunkStream(i));
            }
            if c.comp_len == 0 || u64::from(c.comp_len) > compress_bound(c.image_len) {
                return Err(MapError::ChunkCompressedLen(i));
            }
            stream = c.comp_end();
        }
        Ok(())
    }

    /// Appends the map's encoding to `out` (cleared first), after checking it: a map that
    /// encodes always decodes.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), MapError> {
        self.validate()?;
        out.clear();
        let (code, span) = match &self.compression {
            Compression::None => (0u8, 0u32),
            Compression::Zstd { span, .. } => (1, *span),
        };
        let chunks = self.chunks();
        out.reserve(FIXED_LEN + 8 + self.extents.len() * EXTENT_LEN + chunks.len() * CHUNK_LEN + 4);
        out.extend_from_slice(&IMAGE_MAP_MAGIC);
        out.push(IMAGE_MAP_VERSION);
        out.push(code);
        out.extend_from_slice(&self.block_size.to_be_bytes());
        out.extend_from_slice(&span.to_be_bytes());
        out.extend_from_slice(&self.image_size.to_be_bytes());
        out.extend_from_slice(&self.image_sha256);
        out.extend_from_slice(&(self.extents.len() as u32).to_be_bytes());
        for e in &self.extents {
            out.extend_from_slice(&e.offset.to_be_bytes());
            out.extend_from_slice(&e.len.to_be_bytes());
        }
        out.extend_from_slice(&(chunks.len() as u32).to_be_bytes());
        for c in chunks {
            out.extend_from_slice(&c.image_offset.to_be_bytes());
            out.extend_from_slice(&c.image_len.to_be_bytes());
            out.extend_from_slice(&c.comp_offset.to_be_bytes());
            out.extend_from_slice(&c.comp_len.to_be_bytes());
            out.extend_from_slice(&c.sha256);
        }
        let crc = crc32fast::hash(out);
        out.extend_from_slice(&crc.to_be_bytes());
        Ok(())
    }

    /// Decodes and checks a map: every rule broken is its own [`MapError`].
    pub fn decode(bytes: &[u8]) -> Result<ImageMap, MapError> {
        if bytes.len() < 4 {
            return Err(MapError::Truncated);
        }
        if bytes[..4] != IMAGE_MAP_MAGIC {
            return Err(MapError::BadMagic);
        }
        let version = *bytes.get(4).ok_or(MapError::Truncated)?;
        if version != IMAGE_MAP_VERSION {
            return Err(MapError::UnsupportedVersion(version));
        }
        let body_len = bytes.len().checked_sub(4).ok_or(MapError::Truncated)?;
        if body_len < FIXED_LEN + 8 {
            return Err(MapError::Truncated);
        }
        let (body, crc) = bytes.split_at(body_len);
        let crc = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
        // As in the rest of the crate: fuzzers skip the checksum to reach the parser.
        if !cfg!(fuzzing) && crc32fast::hash(body) != crc {
            return Err(MapError::Checksum);
        }
        let mut r = Reader::new(&body[5..]);
        let code = r.u8()?;
        let block_size = r.u32()?;
        let span = r.u32()?;
        let image_size = r.u64()?;
        let image_sha256 = r.array::<32>()?;
        let n = counted(&mut r, EXTENT_LEN)?;
        let mut extents = Vec::with_capacity(n);
        for _ in 0..n {
            extents.push(Extent {
                offset: r.u64()?,
                len: r.u64()?,
            });
        }
        let n = counted(&mut r, CHUNK_LEN)?;
        let mut chunks = Vec::with_capacity(n);
        for _ in 0..n {
            chunks.push(ChunkEntry {
                image_offset: r.u64()?,
                image_len: r.u32()?,
                comp_offset: r.u64()?,
                comp_len: r.u32()?,
                sha256: r.array::<32>()?,
            });
        }
        if r.remaining() != 0 {
            return Err(MapError::TrailingBytes);
        }
        let compression = match code {
            0 if !chunks.is_empty() => return Err(MapError::ChunksWithoutCompression),
            0 if span != 0 => return Err(MapError::ChunkSpan(span)),
            0 => Compression::None,
            1 => Compression::Zstd { span, chunks },
            c => return Err(MapError::UnknownCompression(c)),
        };
        let map = ImageMap {
            block_size,
            image_size,
            image_sha256,
            extents,
            compression,
        };
        map.validate()?;
        Ok(map)
    }
}

fn count_ok(n: usize) -> Result<(), MapError> {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    if n > MAX_EXTENTS.max(MAX_CHUNKS) {
        return Err(MapError::TooMany(n));
    }
    Ok(())
}

/// A `u32` count of items of `item` bytes each, checked against the limit and against the
/// bytes left before anything is allocated for them.
fn counted(r: &mut Reader<'_>, item: usize) -> Result<usize, MapError> {
    let n = r.u32()?;
    if n > MAX_EXTENTS.max(MAX_CHUNKS) {
        return Err(MapError::TooMany(n));
    }
    let n = n as usize;
    if n.saturating_mul(item) > r.remaining() {
        return Err(MapError::Truncated);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn ext(offset: u64, len: u64) -> Extent {
        Extent { offset, len }
    }

    fn sample(compressed: bool) -> ImageMap {
        let extents = vec![ext(0, 8192), ext(16_384, 4096), ext(65_536, 1000)];
        let compression = if compressed {
            let mut at = 0;
            let chunks = chunk_plan(&extents, 4096)
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let c = ChunkEntry {
                        image_offset: p.offset,
                        image_len: p.len as u32,
                        comp_offset: at,
                        comp_len: 100 + i as u32,
                        sha256: [i as u8; 32],
                    };
                    at = c.comp_end();
                    c
                })
                .collect();
            Compression::Zstd { span: 4096, chunks }
        } else {
            Compression::None
        };
        ImageMap {
            block_size: 4096,
            image_size: 66_536,
            image_sha256: [7; 32],
            extents,
            compression,
        }
    }

    fn enc(m: &ImageMap) -> Vec<u8> {
        let mut out = Vec::new();
        m.encode(&mut out).unwrap();
        out
    }

    /// Encodes `m` without validating it (to test the decoder's checks), with a good CRC.
    fn enc_raw(m: &ImageMap) -> Vec<u8> {
        // The fields by hand, in `encode`'s layout.
        let mut out = Vec::new();
        out.extend_from_slice(&IMAGE_MAP_MAGIC);
        out.push(IMAGE_MAP_VERSION);
        let (code, span) = match &m.compression {
            Compression::None => (0u8, 0u32),
            Compression::Zstd { span, .. } => (1, *span),
        };
        out.push(code);
        out.extend_from_slice(&m.block_size.to_be_bytes());
        out.extend_from_slice(&span.to_be_bytes());
        out.extend_from_slice(&m.image_size.to_be_bytes());
        out.extend_from_slice(&m.image_sha256);
        out.extend_from_slice(&(m.extents.len() as u32).to_be_bytes());
        for e in &m.extents {
            out.extend_from_slice(&e.offset.to_be_bytes());
            out.extend_from_slice(&e.len.to_be_bytes());
        }
        out.extend_from_slice(&(m.chunks().len() as u32).to_be_bytes());
        for c in m.chunks() {
            out.extend_from_slice(&c.image_offset.to_be_bytes());
            out.extend_from_slice(&c.image_len.to_be_bytes());
            out.extend_from_slice(&c.comp_offset.to_be_bytes());
            out.extend_from_slice(&c.comp_len.to_be_bytes());
            out.extend_from_slice(&c.sha256);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    fn recrc(b: &mut [u8]) {
        let n = b.len() - 4;
        let crc = crc32fast::hash(&b[..n]);
        b[n..].copy_from_slice(&crc.to_be_bytes());
    }

    #[test]
    fn both_forms_round_trip() {
        for compressed in [false, true] {
            let m = sample(compressed);
            assert_eq!(ImageMap::decode(&enc(&m)).unwrap(), m);
            assert_eq!(enc_raw(&m), enc(&m));
        }
        let m = sample(true);
        assert_eq!(m.data_bytes(), 8192 + 4096 + 1000);
        assert_eq!(m.wire_bytes(), 100 + 101 + 102 + 103);
        assert_eq!(sample(false).wire_bytes(), m.data_bytes());
    }

    /// The image_map fuzz target's first finding: extents that describe 2⁴⁸ chunks in a map
    /// of a few hundred bytes made the check build the whole chunk plan (out of memory). The
    /// count is now compared first; this map must be refused at once.
    #[test]
    fn extents_describing_vast_chunk_plans_are_refused_without_building_them() {
        let huge = 1u64 << 60;
        let map = ImageMap {
            block_size: 4096,
            image_size: huge,
            image_sha256: [7; 32],
            extents: vec![ext(0, huge)],
            compression: Compression::Zstd {
                span: 4096,
                chunks: Vec::new(),
            },
        };
        assert_eq!(
            map.validate(),
            Err(MapError::ChunkCount {
                expected: u32::MAX,
                found: 0
            })
        );
        // And through the decoder, from the fuzzer's own input with its CRC made right.
        let mut v = include_bytes!("../../../fuzz/corpus/image_map/oom-chunk-plan").to_vec();
        recrc(&mut v);
        assert!(ImageMap::decode(&v).is_err());
    }

    #[test]
    fn chunk_count_matches_the_plan() {
        let extents = [
            ext(0, 8192),
            ext(16_384, 4096),
            ext(65_536, 1000),
            ext(81_920, 1),
        ];
        for span in [1, 4096, 8192, 12_288, 1 << 20] {
            assert_eq!(
                chunk_count(&extents, span),
                chunk_plan(&extents, span).len() as u64,
                "span {span}"
            );
        }
        assert_eq!(chunk_count(&[], 4096), 0);
    }

    #[test]
    fn framing_errors() {
        let good = enc(&sample(true));
        assert_eq!(ImageMap::decode(&good[..3]), Err(MapError::Truncated));
        assert_eq!(ImageMap::decode(b"FCIX\x01"), Err(MapError::BadMagic));
        let mut v = good.clone();
        v[4] = 2;
        assert_eq!(ImageMap::decode(&v), Err(MapError::UnsupportedVersion(2)));
        let mut v = good.clone();
        v[30] ^= 1;
        assert_eq!(ImageMap::decode(&v), Err(MapError::Checksum));
        let mut v = good.clone();
        v.truncate(v.len() - 10);
        recrc_tail(&mut v);
        assert_eq!(ImageMap::decode(&v), Err(MapError::Truncated));
        let mut v = good.clone();
        let n = v.len() - 4;
        v.insert(n, 0);
        recrc(&mut v);
        assert_eq!(ImageMap::decode(&v), Err(MapError::TrailingBytes));
        let mut v = good.clone();
        v[5] = 9;
        recrc(&mut v);
        assert_eq!(ImageMap::decode(&v), Err(MapError::UnknownCompression(9)));
        // A count that the bytes left could not hold is refused before allocating.
        let mut v = good;
        v[FIXED_LEN..FIXED_LEN + 4].copy_from_slice(&1_000_000u32.to_be_bytes());
        recrc(&mut v);
        assert_eq!(ImageMap::decode(&v), Err(MapError::Truncated));
        v[FIXED_LEN..FIXED_LEN + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        recrc(&mut v);
        assert_eq!(ImageMap::decode(&v), Err(MapError::TooMany(u32::MAX)));
    }

    /// Appends a CRC over `v` (after a truncation removed the old one).
    fn recrc_tail(v: &mut Vec<u8>) {
        let crc = crc32fast::hash(v);
        v.extend_from_slice(&crc.to_be_bytes());
    }

    /// Every rule, broken one at a time: the encoder refuses the map and the decoder refuses
    /// its bytes, with the same error.
    #[test]
    fn every_rule_is_refused_by_encoder_and_decoder() {
        type Breaker = fn(&mut ImageMap);
        fn zstd(m: &mut ImageMap) -> (&mut u32, &mut Vec<ChunkEntry>) {
            match &mut m.compression {
                Compression::Zstd { span, chunks } => (span, chunks),
                Compression::None => unreachable!(),
            }
        }
        let cases: &[(Breaker, MapError)] = &[
            (|m| m.block_size = 3000, MapError::BlockSize(3000)),
            (|m| m.block_size = 256, MapError::BlockSize(256)),
            (|m| m.extents[1].len = 0, MapError::EmptyExtent(1)),
            (
                |m| m.extents[1].offset = 16_385,
                MapError::UnalignedExtent(1),
            ),
            (|m| m.extents[0].len = 8000, MapError::UnalignedExtent(0)),
            (|m| m.extents[1].offset = 8192, MapError::ExtentOrder(1)),
            (|m| m.extents.swap(0, 1), MapError::ExtentOrder(1)),
            (|m| m.image_size = 66_000, MapError::ExtentPastEnd(2)),
            (|m| m.extents[2].len = u64::MAX, MapError::ExtentPastEnd(2)),
            (|m| *zstd(m).0 = 6000, MapError::ChunkSpan(6000)),
            (|m| *zstd(m).0 = 128 << 20, MapError::ChunkSpan(128 << 20)),
            (
                |m| {
                    zstd(m).1.pop();
                },
                MapError::ChunkCount {
                    expected: 4,
                    found: 3,
                },
            ),
            (|m| zstd(m).1[2].image_len = 4095, MapError::ChunkRange(2)),
            (|m| zstd(m).1[1].image_offset = 0, MapError::ChunkRange(1)),
            (|m| zstd(m).1[1].comp_offset += 1, MapError::ChunkStream(1)),
            (|m| zstd(m).1[0].comp_offset = 1, MapError::ChunkStream(0)),
            (
                |m| zstd(m).1[3].comp_len = 0,
                MapError::ChunkCompressedLen(3),
            ),
            (
                |m| zstd(m).1[3].comp_len = 1_000_000,
                MapError::ChunkCompressedLen(3),
            ),
        ];
        for (i, (brk, want)) in cases.iter().enumerate() {
            let mut m = sample(true);
            brk(&mut m);
            assert_eq!(m.encode(&mut Vec::new()), Err(*want), "case {i}");
            assert_eq!(ImageMap::decode(&enc_raw(&m)), Err(*want), "case {i}");
        }
        // Rules of the uncompressed form.
        let mut v = enc_raw(&sample(true));
        v[5] = 0;
        recrc(&mut v);
        assert_eq!(
            ImageMap::decode(&v),
            Err(MapError::ChunksWithoutCompression)
        );
        let mut v = enc(&sample(false));
        v[10..14].copy_from_slice(&4096u32.to_be_bytes());
        recrc(&mut v);
        assert_eq!(ImageMap::decode(&v), Err(MapError::ChunkSpan(4096)));
        // Every error says what is wrong.
        for (_, e) in cases {
            assert!(!alloc::format!("{e}").is_empty());
        }
    }

    #[test]
    fn decoded_chunks_are_checked() {
        let m = sample(true);
        let c = m.chunks()[2];
        assert_eq!(c.check_decoded(4096, &[2; 32]), Ok(()));
        assert_eq!(
            c.check_decoded(4095, &[2; 32]),
            Err(ChunkError::Length {
                expected: 4096,
                found: 4095
            })
        );
        assert_eq!(c.check_decoded(4096, &[3; 32]), Err(ChunkError::Digest));
    }

    /// The fuzz seeds were written by an encoder of the layout in the module doc made apart
    /// from this one (a script): they decode, and to the maps the doc's layout says.
    #[test]
    fn the_documented_layout_is_the_encoding() {
        let raw = ImageMap::decode(include_bytes!("../../../fuzz/corpus/image_map/raw")).unwrap();
        assert_eq!(raw, sample(false));
        let z = ImageMap::decode(include_bytes!("../../../fuzz/corpus/image_map/zstd")).unwrap();
        assert_eq!(z, sample(true));
        let empty = ImageMap::decode(include_bytes!("../../../fuzz/corpus/image_map/empty"));
        assert_eq!(empty.unwrap().image_size, 0);
    }

    #[test]
    fn compress_bound_matches_zstd() {
        // ZSTD_COMPRESSBOUND(0) = 64, (1 MiB) = 1 MiB + 4096.
        assert_eq!(compress_bound(0), 64);
        assert_eq!(compress_bound(1 << 20), (1 << 20) + 4096);
    }
}
