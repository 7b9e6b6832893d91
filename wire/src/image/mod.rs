//! Disk-image formats, sans-IO: the *sparse map* of an image (its data extents once runs of
//! zeros are dropped), the *compressed form* (the data extents cut into independently
//! decodable zstd chunks, with an index per chunk) and the *image map* that describes both
//! (versioned, CRC-checked).
//!
//! Nothing here reads a file or a clock, and nothing here hashes: SHA-256 digests are computed
//! by the drivers (the gateway's CLI and the agent link `ring` already; the wire crate stays
//! free of it) and travel here as 32-byte arrays. The drivers supply bytes in order
//! ([`SparseScanner`]), compressed-stream blocks in any order ([`ChunkAssembler`]), and the
//! digests of what they decoded ([`ChunkEntry::check_decoded`]).
//!
//! Invariants every [`ImageMap`] holds (checked by [`ImageMap::decode`], so a map read from a
//! cache or from the wire holds them too):
//! - extents are sorted, do not overlap or touch (two touching extents would be one), are
//!   non-empty, start on a block boundary and end on one or at the image's end;
//! - when compressed, the chunks are exactly the extents cut at multiples of the chunk span
//!   (in order, none empty, none crossing an extent's end or a span boundary), and lie end
//!   to end in the compressed stream from offset 0;
//! - when not compressed, there are no chunks.
//!
//! No-panic contract: as for the rest of the crate, no input makes these parsers panic or
//! allocate more than a small multiple of the input's size; `fuzz/fuzz_targets/image_map.rs`
//! holds them to it.

mod assemble;
mod map;
mod sparse;
#[cfg(feature = "zstd")]
mod zstd;

pub use assemble::ChunkAssembler;
pub use map::{
    ChunkEntry, ChunkError, Compression, ImageMap, MapError, IMAGE_MAP_MAGIC, IMAGE_MAP_VERSION,
    MAX_BLOCK_SIZE, MAX_CHUNKS, MAX_CHUNK_SPAN, MAX_EXTENTS, MIN_BLOCK_SIZE, MIN_CHUNK_SPAN,
};
pub use sparse::{chunk_plan, data_bytes, Extent, SparseScanner};
#[cfg(feature = "zstd")]
pub use zstd::{decode_chunk, DecodeError};

/// The block size a sparse map is computed at unless the operator says otherwise: 4 KiB, the
/// page size and the usual file-system and logical-sector granularity, so the holes a file
/// system reports (`SEEK_HOLE`) line up with the map's.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

/// The image bytes one compressed chunk decodes to unless the operator says otherwise:
/// 1 MiB, large enough for zstd to find its matches (ratio within a few percent of a whole
/// stream on OS images) and small enough that a device holds a whole chunk in memory.
pub const DEFAULT_CHUNK_SPAN: u32 = 1 << 20;
