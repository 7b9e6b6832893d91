//! `fleetcast image prepare IMG [--sparse] [--compress] [--chunk SIZE]`: makes an image's
//! sparse map, (with `--sparse`) the sparse form's stream and (with `--compress`) its
//! compressed form once, and keeps them in a cache keyed by the image's SHA-256, so a push of
//! the same image (`fleetcast push --form sparse|compressed`, which prepares through here)
//! finds them ready.
//!
//! Cache layout (`<cache>/`, the gateway's `<data_dir>/images/` when that data directory
//! exists, else `.fleetcast-images/` next to the image):
//! - `<sha256>.map`: the raw form's image map (extents, no chunks), also the sparse form's;
//! - `<sha256>.sparse`: the sparse form's stream (the data extents end to end), checked byte
//!   for byte against the image before it is used;
//! - `<sha256>.z<span>.map` and `<sha256>.z<span>.zst`: the compressed form's map and its
//!   stream (the chunks' zstd frames end to end), one pair per chunk span.
//!
//! Invariants: every file is replaced atomically (temporary file, fsync, rename), the stream
//! before its map, so a map in the cache always names a stream that was whole when written.
//! A cache entry is trusted only after it is checked against the image just scanned: the map
//! decodes (CRC, every rule), says the same size, digest and extents, and (compressed) the
//! stream has the map's length and every chunk decodes to bytes of the chunk's digest. An
//! entry that fails any check is rebuilt, and the output says why.
//!
//! The compression level is not part of the key: any level decodes the same, so a cached
//! stream of another level is used as it is.

mod cmd;
mod push;
mod scan;
mod stream;

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use fleetcast_wire::image::{
    chunk_plan, decode_chunk, ChunkEntry, Compression, ImageMap, MapError, DEFAULT_BLOCK_SIZE,
};
use ring::digest;

pub use cmd::{parse_size, run, ImageCmd, PrepareArgs, SizeError};
pub use push::{image_push, ImageForm, PushImageError};
pub use scan::{scan, Scanned};

/// What `image prepare` was asked.
#[derive(Debug, Clone)]
pub struct PrepareOpts {
    /// The image file (or block device).
    pub image: PathBuf,
    /// Make the compressed form too.
    pub compress: bool,
    /// Make the sparse form's stream too (the data extents end to end, what a sparse push
    /// sends).
    pub sparse: bool,
    /// Image bytes per compressed chunk.
    pub chunk_span: u32,
    /// The sparse map's block size.
    pub block_size: u32,
    /// zstd level (1 to 19).
    pub level: i32,
    /// Where the cache is.
    pub cache_dir: PathBuf,
}

impl PrepareOpts {
    /// Defaults for `image`: raw form only, 1 MiB chunks, 4 KiB blocks, level 3.
    pub fn new(image: PathBuf, cache_dir: PathBuf) -> Self {
        PrepareOpts {
            image,
            compress: false,
            sparse: false,
            chunk_span: fleetcast_wire::image::DEFAULT_CHUNK_SPAN,
            block_size: DEFAULT_BLOCK_SIZE,
            level: 3,
            cache_dir,
        }
    }
}

/// The cache directory for `image`: `<data_dir>/images` when the gateway's data directory
/// exists (the gateway runs, or ran, here), else `.fleetcast-images` next to the image.
pub fn default_cache_dir(data_dir: &Path, image: &Path) -> PathBuf {
    if data_dir.is_dir() {
        return data_dir.join("images");
    }
    let parent = image.parent().filter(|p| !p.as_os_str().is_empty());
    parent.unwrap_or(Path::new(".")).join(".fleetcast-images")
}

/// What happened to one cache entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheState {
    /// Found and checked: used as it was.
    Hit,
    /// Not in the cache: made.
    Built,
    /// In the cache but failed a check (the reason): made again.
    Rebuilt(String),
}

/// What `image prepare` made or found.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The image's size.
    pub image_bytes: u64,
    /// Its data bytes (the extents' total).
    pub data_bytes: u64,
    /// Bytes the file system reported as holes (never read).
    pub hole_bytes: u64,
    /// Its SHA-256.
    pub sha256: [u8; 32],
    /// Data extents.
    pub extents: usize,
    /// The raw form's map and what the cache did with it.
    pub map: (PathBuf, CacheState),
    /// The compressed form, if asked: map, stream, what the cache did, stream bytes, chunks.
    pub compressed: Option<CompressedForm>,
    /// The sparse form's stream, if asked, and what the cache did (its map is `map`).
    pub sparse: Option<(PathBuf, CacheState)>,
}

/// The compressed form as `image prepare` left it.
#[derive(Debug, Clone)]
pub struct CompressedForm {
    /// Its image map.
    pub map: PathBuf,
    /// Its stream.
    pub stream: PathBuf,
    /// What the cache did.
    pub state: CacheState,
    /// Stream bytes.
    pub bytes: u64,
    /// Chunks.
    pub chunks: usize,
}

/// Why an image could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The image cannot be opened or read.
    #[error("cannot read image {path}: {source}")]
    Image {
        /// The image.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The cache directory or one of its files cannot be written.
    #[error("cannot write the image cache {path}: {source}")]
    Cache {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The options make a map that breaks a rule (block size, chunk span).
    #[error("{0}")]
    Map(#[from] MapError),
    /// zstd failed on a chunk.
    #[error("zstd could not compress the chunk at image offset {offset}: {source}")]
    Compress {
        /// The chunk's image offset.
        offset: u64,
        /// Why.
        source: io::Error,
    },
}

/// Hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Prepares `opts.image`: scans it, then finds or makes each asked form in the cache.
pub fn prepare(opts: &PrepareOpts) -> Result<Prepared, PrepareError> {
    let img_err = |source| PrepareError::Image {
        path: opts.image.clone(),
        source,
    };
    let mut file = File::open(&opts.image).map_err(img_err)?;
    // The end, not the metadata's length: a block device's metadata says 0.
    let size = file.seek(SeekFrom::End(0)).map_err(img_err)?;
    let scanned = scan(&file, size, opts.block_size).map_err(img_err)?;
    let dir = &opts.cache_dir;
    std::fs::create_dir_all(dir).map_err(|source| PrepareError::Cache {
        path: dir.clone(),
        source,
    })?;
    let key = hex(&scanned.sha256);
    let raw = ImageMap {
        block_size: opts.block_size,
        image_size: scanned.size,
        image_sha256: scanned.sha256,
        extents: scanned.extents.clone(),
        compression: Compression::None,
    };
    let map_path = dir.join(format!("{key}.map"));
    let raw_state = match check_map(&map_path, &raw) {
        Ok(_) => CacheState::Hit,
        Err(why) => {
            write_map(&map_path, &raw)?;
            why.into_state()
        }
    };
    let compressed = if opts.compress {
        Some(compressed(opts, &file, &raw, &key)?)
    } else {
        None
    };
    let sparse = if opts.sparse {
        Some(stream::sparse(opts, &file, &raw, &key)?)
    } else {
        None
    };
    Ok(Prepared {
        image_bytes: scanned.size,
        data_bytes: raw.data_bytes(),
        hole_bytes: scanned.hole_bytes,
        sha256: scanned.sha256,
        extents: raw.extents.len(),
        map: (map_path, raw_state),
        compressed,
        sparse,
    })
}

/// Why a cache entry was not used.
enum Miss {
    Absent,
    Bad(String),
}

impl Miss {
    fn into_state(self) -> CacheState {
        match self {
            Miss::Absent => CacheState::Built,
            Miss::Bad(why) => CacheState::Rebuilt(why),
        }
    }
}

/// Reads the map at `path` and checks it describes the image `want` describes (everything
/// but the chunks, which [`check_stream`] checks against the stream).
fn check_map(path: &Path, want: &ImageMap) -> Result<ImageMap, Miss> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Miss::Absent),
        Err(e) => return Err(Miss::Bad(format!("{}: {e}", path.display()))),
    };
    let got =
        ImageMap::decode(&bytes).map_err(|e| Miss::Bad(format!("{}: {e}", path.display())))?;
    let same = got.block_size == want.block_size
        && got.image_size == want.image_size
        && got.image_sha256 == want.image_sha256
        && got.extents == want.extents;
    let same_form = match (&got.compression, &want.compression) {
        (Compression::None, Compression::None) => got == *want,
        (Compression::Zstd { span: a, .. }, Compression::Zstd { span: b, .. }) => a == b,
        _ => false,
    };
    if !same || !same_form {
        return Err(Miss::Bad(format!(
            "{}: describes another image or form",
            path.display()
        )));
    }
    Ok(got)
}

/// Checks that the stream at `path` is the one `map` describes: its length, and every chunk
/// decoding to bytes of the chunk's digest.
fn check_stream(path: &Path, map: &ImageMap) -> Result<(), Miss> {
    let bad = |why: String| Miss::Bad(format!("{}: {why}", path.display()));
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Miss::Absent),
        Err(e) => return Err(bad(e.to_string())),
    };
    let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    if len != map.wire_bytes() {
        return Err(bad(format!(
            "{len} bytes where its map says {}",
            map.wire_bytes()
        )));
    }
    let mut frame = Vec::new();
    let mut out = Vec::new();
    for (i, c) in map.chunks().iter().enumerate() {
        frame.resize(c.comp_len as usize, 0);
        scan::read_exact_at(&file, &mut frame, c.comp_offset).map_err(|e| bad(e.to_string()))?;
        decode_chunk(c, &frame, &mut out).map_err(|e| bad(format!("chunk {i}: {e}")))?;
        c.check_decoded(out.len(), &sha256(&out))
            .map_err(|e| bad(format!("chunk {i}: {e}")))?;
    }
    Ok(())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut d = [0u8; 32];
    d.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    d
}

fn write_map(path: &Path, map: &ImageMap) -> Result<(), PrepareError> {
    let mut bytes = Vec::new();
    map.encode(&mut bytes)?;
    fleetcast_os::write_atomic(path, &bytes, 0o644).map_err(|source| PrepareError::Cache {
        path: path.to_owned(),
        source,
    })
}

/// Finds the compressed form in the cache, or makes it.
fn compressed(
    opts: &PrepareOpts,
    image: &File,
    raw: &ImageMap,
    key: &str,
) -> Result<CompressedForm, PrepareError> {
    let span = opts.chunk_span;
    let map_path = opts.cache_dir.join(format!("{key}.z{span}.map"));
    let stream_path = opts.cache_dir.join(format!("{key}.z{span}.zst"));
    let want = ImageMap {
        compression: Compression::Zstd {
            span,
            chunks: Vec::new(),
        },
        ..raw.clone()
    };
    let found =
        check_map(&map_path, &want).and_then(|m| check_stream(&stream_path, &m).map(|()| m));
    let (map, state) = match found {
        Ok(m) => (m, CacheState::Hit),
        Err(why) => {
            let m = compress(opts, image, raw, &stream_path)?;
            write_map(&map_path, &m)?;
            (m, why.into_state())
        }
    };
    Ok(CompressedForm {
        map: map_path,
        stream: stream_path,
        state,
        bytes: map.wire_bytes(),
        chunks: map.chunks().len(),
    })
}

/// Compresses every chunk of the plan into the stream at `path`; returns its map.
fn compress(
    opts: &PrepareOpts,
    image: &File,
    raw: &ImageMap,
    path: &Path,
) -> Result<ImageMap, PrepareError> {
    let cache_err = |source| PrepareError::Cache {
        path: path.to_owned(),
        source,
    };
    let span = opts.chunk_span;
    // Checked before any work: the plan's chunks must fit the map's rules.
    ImageMap {
        compression: Compression::Zstd {
            span,
            chunks: Vec::new(),
        },
        extents: Vec::new(),
        ..raw.clone()
    }
    .validate()?;
    let mut out = fleetcast_os::AtomicFile::create(path, 0o644).map_err(cache_err)?;
    let mut z = zstd::bulk::Compressor::new(opts.level)
        .map_err(|source| PrepareError::Compress { offset: 0, source })?;
    let mut buf = Vec::new();
    let mut chunks = Vec::new();
    let mut at = 0u64;
    for piece in chunk_plan(&raw.extents, span) {
        buf.resize(piece.len as usize, 0);
        scan::read_exact_at(image, &mut buf, piece.offset).map_err(|source| {
            PrepareError::Image {
                path: opts.image.clone(),
                source,
            }
        })?;
        let frame = z.compress(&buf).map_err(|source| PrepareError::Compress {
            offset: piece.offset,
            source,
        })?;
        out.write_all(&frame).map_err(cache_err)?;
        let entry = ChunkEntry {
            image_offset: piece.offset,
            image_len: piece.len as u32,
            comp_offset: at,
            comp_len: frame.len() as u32,
            sha256: sha256(&buf),
        };
        at = entry.comp_end();
        chunks.push(entry);
    }
    out.commit().map_err(cache_err)?;
    let map = ImageMap {
        compression: Compression::Zstd { span, chunks },
        ..raw.clone()
    };
    map.validate()?;
    Ok(map)
}

#[cfg(test)]
mod tests;
