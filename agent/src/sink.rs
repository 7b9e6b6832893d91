//! Where a transfer's bytes land on the device: the writer of an image to its target (a
//! block device, a partition, a slot or a file), raw, sparse or compressed (issue 18).
//!
//! The multicast carries a *stream* in fixed-size blocks and knows nothing of images: the
//! image itself (raw), its data extents end to end (sparse, [`ImageMap`] without
//! compression), or its compressed chunks end to end (compressed). A [`Sink`] turns stream
//! blocks into image bytes at their offsets:
//! - raw: stream offset = image offset;
//! - sparse: each stream byte belongs to one extent, written at the extent's offset; a block
//!   that straddles two extents is cut in two;
//! - compressed: blocks go to a staging file in stream order; once every block a chunk
//!   overlaps is there ([`ChunkAssembler`]), the chunk is read back, decoded (feature `zstd`),
//!   its SHA-256 checked against the map and its bytes written at its image offset.
//!
//! Holes (what the map leaves out) must read as zeros on the target, whatever it held before,
//! or the image's digest cannot match: [`Sink::zero_holes`] punches them in a file and asks a
//! block device to zero them (`BLKZEROOUT`, which uses the device's write-zeroes or unmap
//! where it has them), writing zeros only where neither works.
//!
//! Durability and checking: [`Sink::sync`] makes everything written so far durable (the
//! driver calls it before the progress record that names the blocks); [`Sink::read_back`]
//! drops the target's cached pages and reads the whole image back from it, so the final
//! digest is of what the disk holds, not of what was received.
//!
//! Writes are buffered, not `O_DIRECT`: blocks arrive in runs of a few kilobytes, not aligned
//! to the device's logical blocks, and `sync` flushes them in one go.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use fleetcast_wire::image::{ChunkAssembler, ChunkError, Compression, Extent, ImageMap};

/// How the stream relates to the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Form {
    /// The stream is the image, `size` bytes.
    Raw {
        /// Bytes of the image.
        size: u64,
    },
    /// The stream is what the map says: the data extents, or the compressed chunks.
    Image(ImageMap),
}

/// Why a sink could not write, zero or read back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The target or the staging file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// The target cannot hold the image.
    #[error("{}: holds {have} bytes, the image needs {need}", path.display())]
    TooSmall {
        /// The target.
        path: PathBuf,
        /// Its size.
        have: u64,
        /// The image's size.
        need: u64,
    },
    /// A block past the stream's end.
    #[error("block {index} is past the stream's {blocks} blocks")]
    BlockOutOfRange {
        /// The block.
        index: u64,
        /// Blocks in the stream.
        blocks: u64,
    },
    /// A payload that is not its whole block (a block, or what is left of the stream): blocks
    /// of a run are written end to end.
    #[error("block {index} carries {len} bytes where the stream has room for {room}")]
    PayloadLength {
        /// The block.
        index: u64,
        /// Bytes it carried.
        len: usize,
        /// Bytes it may carry.
        room: u64,
    },
    /// A compressed image needs a staging file and none was given.
    #[error("a compressed image needs a staging file")]
    NoStage,
    /// A chunk did not check out (its assembly, its length or its digest).
    #[error("chunk {index}: {source}")]
    Chunk {
        /// The chunk's index in the map.
        index: u32,
        /// What was wrong.
        source: ChunkError,
    },
    /// A chunk's frame did not decode.
    #[cfg(feature = "zstd")]
    #[error("chunk {index}: {source}")]
    Decode {
        /// The chunk's index in the map.
        index: u32,
        /// What was wrong.
        source: fleetcast_wire::image::DecodeError,
    },
    /// A compressed image reached an agent built without the zstd decoder.
    #[cfg(not(feature = "zstd"))]
    #[error("the image is compressed and this agent was built without feature `zstd`")]
    NoDecoder,
}

/// The writer of one stream to one target. See the module's documentation.
#[derive(Debug)]
pub struct Sink {
    target: File,
    path: PathBuf,
    form: Form,
    block: u64,
    /// Sparse: where each extent starts in the stream (the extents' lengths summed).
    starts: Vec<u64>,
    stage: Option<(File, PathBuf)>,
    assembler: Option<ChunkAssembler>,
    image_done: u64,
}

impl Sink {
    /// A sink writing a stream of `block_size`-byte blocks to `target` (opened for writing,
    /// created if it is a missing file; a file shorter than the image is extended, a block
    /// device must be large enough). `stage` is where a compressed stream is kept until its
    /// chunks are whole (a file on the agent's own disk, created or reused).
    pub fn open(
        target: &Path,
        stage: Option<&Path>,
        form: Form,
        block_size: u32,
    ) -> Result<Sink, SinkError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| SinkError::Io { path, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(target)
            .map_err(io_err(target))?;
        let meta = file.metadata().map_err(io_err(target))?;
        let need = image_size(&form);
        if meta.file_type().is_block_device() {
            let have = crate::target::blk_size(&file).map_err(io_err(target))?;
            if have < need {
                return Err(SinkError::TooSmall {
                    path: target.to_owned(),
                    have,
                    need,
                });
            }
        } else if meta.len() < need {
            file.set_len(need).map_err(io_err(target))?;
        }
        let mut starts = Vec::new();
        let mut assembler = None;
        let mut staged = None;
        if let Form::Image(map) = &form {
            let mut at = 0u64;
            for e in &map.extents {
                starts.push(at);
                at += e.len;
            }
            if let Compression::Zstd { chunks, .. } = &map.compression {
                let stage = stage.ok_or(SinkError::NoStage)?;
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(stage)
                    .map_err(io_err(stage))?;
                staged = Some((f, stage.to_owned()));
                let a = ChunkAssembler::new(chunks, block_size)
                    .map_err(|source| SinkError::Chunk { index: 0, source })?;
                assembler = Some(a);
            }
        }
        Ok(Sink {
            target: file,
            path: target.to_owned(),
            form,
            block: u64::from(block_size.max(1)),
            starts,
            stage: staged,
            assembler,
            image_done: 0,
        })
    }

    /// Bytes of the image the target ends up holding.
    pub fn image_size(&self) -> u64 {
        image_size(&self.form)
    }

    /// Bytes of the stream the multicast carries.
    pub fn stream_len(&self) -> u64 {
        match &self.form {
            Form::Raw { size } => *size,
            Form::Image(map) => map.wire_bytes(),
        }
    }

    /// Image data bytes written so far (holes are not counted; a compressed chunk counts
    /// once decoded and written): what progress reports speak of.
    pub fn image_done(&self) -> u64 {
        self.image_done
    }

    /// Writes `payloads`, stream blocks `first`, `first + 1`, … (each a whole block but the
    /// stream's last), then decodes and writes the compressed chunks they completed.
    pub fn write(&mut self, first: u64, payloads: &[&[u8]]) -> Result<(), SinkError> {
        let blocks = self.stream_len().div_ceil(self.block);
        let last = first.saturating_add(payloads.len() as u64);
        if last > blocks {
            return Err(SinkError::BlockOutOfRange {
                index: last - 1,
                blocks,
            });
        }
        let stream = self.stream_len();
        for (i, p) in payloads.iter().enumerate() {
            let index = first + i as u64;
            let room = self.block.min(stream - index * self.block);
            if p.len() as u64 != room {
                return Err(SinkError::PayloadLength {
                    index,
                    len: p.len(),
                    room,
                });
            }
        }
        let at = first * self.block;
        let map = match &self.form {
            Form::Raw { .. } => {
                // The run lies end to end on the target: one vectored write for all of it.
                write_vectored_at(&self.target, payloads, at).map_err(|source| self.io(source))?;
                self.image_done += payloads.iter().map(|p| p.len() as u64).sum::<u64>();
                return Ok(());
            }
            Form::Image(map) => map,
        };
        match map.compression {
            Compression::None => {
                for (i, p) in payloads.iter().enumerate() {
                    let from = at + i as u64 * self.block;
                    for (off, piece) in sparse_pieces(&map.extents, &self.starts, from, p) {
                        write_at(&self.target, &self.path, piece, off)?;
                    }
                    self.image_done += p.len() as u64;
                }
            }
            Compression::Zstd { .. } => {
                // The staged stream is the stream: the run lies end to end there too.
                let (f, path) = self.stage.as_ref().ok_or(SinkError::NoStage)?;
                write_vectored_at(f, payloads, at).map_err(|source| SinkError::Io {
                    path: path.clone(),
                    source,
                })?;
            }
        }
        if self.assembler.is_some() {
            for b in first..last {
                self.stored(b)?;
            }
            self.write_whole_chunks()?;
        }
        Ok(())
    }

    /// Reads stream block `index` back into `buf` (its length: the block's, shorter for the
    /// stream's last), from where [`Sink::write`] put it: the target (raw, sparse) or the
    /// staging file (compressed). Parity decoding reads a group's present blocks this way.
    pub fn read_block(&self, index: u64, buf: &mut [u8]) -> Result<(), SinkError> {
        let at = index.saturating_mul(self.block);
        let end = at.saturating_add(buf.len() as u64);
        if end > self.stream_len() {
            return Err(SinkError::BlockOutOfRange {
                index,
                blocks: self.stream_len().div_ceil(self.block),
            });
        }
        match &self.form {
            Form::Raw { .. } => self
                .target
                .read_exact_at(buf, at)
                .map_err(|source| self.io(source)),
            Form::Image(map) => match &map.compression {
                Compression::None => {
                    let mut done = 0usize;
                    for (off, len) in sparse_spans(&map.extents, &self.starts, at, buf.len()) {
                        self.target
                            .read_exact_at(&mut buf[done..done + len], off)
                            .map_err(|source| self.io(source))?;
                        done += len;
                    }
                    Ok(())
                }
                Compression::Zstd { .. } => {
                    let (f, path) = self.stage.as_ref().ok_or(SinkError::NoStage)?;
                    f.read_exact_at(buf, at).map_err(|source| SinkError::Io {
                        path: path.clone(),
                        source,
                    })
                }
            },
        }
    }

    /// Handles on the files [`Sink::sync`] makes durable (the target, and the staging file
    /// when there is one), for a thread that syncs them while this one writes.
    pub fn handles(&self) -> Result<Vec<File>, SinkError> {
        let mut out = vec![self.target.try_clone().map_err(|source| self.io(source))?];
        if let Some((f, path)) = &self.stage {
            out.push(f.try_clone().map_err(|source| SinkError::Io {
                path: path.clone(),
                source,
            })?);
        }
        Ok(out)
    }

    /// The target's path (as opened).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// After a restart: the compressed-stream blocks the transfer's record says are stored
    /// in the staging file. Every chunk they complete is decoded and written again (writing
    /// the same bytes twice is harmless; a record never names a block that is not durable).
    pub fn resume(&mut self, stored: impl IntoIterator<Item = u64>) -> Result<(), SinkError> {
        if self.assembler.is_none() {
            // Raw and sparse blocks were written in place; count them for progress.
            let n: u64 = stored.into_iter().count() as u64;
            // The stream's last block may be short; the stream is the image's data.
            self.image_done = (n * self.block).min(self.stream_len());
            return Ok(());
        }
        for b in stored {
            self.stored(b)?;
        }
        self.write_whole_chunks()
    }

    fn stored(&mut self, b: u64) -> Result<(), SinkError> {
        if let Some(a) = self.assembler.as_mut() {
            a.handle_block(b).map_err(|source| match source {
                ChunkError::BlockOutOfRange { index, blocks } => {
                    SinkError::BlockOutOfRange { index, blocks }
                }
                source => SinkError::Chunk { index: 0, source },
            })?;
        }
        Ok(())
    }

    #[cfg(feature = "zstd")]
    fn write_whole_chunks(&mut self) -> Result<(), SinkError> {
        let Form::Image(map) = &self.form else {
            return Ok(());
        };
        let (Some(a), Some((stage, stage_path))) = (self.assembler.as_mut(), self.stage.as_ref())
        else {
            return Ok(());
        };
        let mut frame = Vec::new();
        let mut out = Vec::new();
        while let Some(i) = a.poll_whole() {
            let c = &map.chunks()[i as usize];
            frame.resize(c.comp_len as usize, 0);
            stage
                .read_exact_at(&mut frame, c.comp_offset)
                .map_err(|source| SinkError::Io {
                    path: stage_path.clone(),
                    source,
                })?;
            fleetcast_wire::image::decode_chunk(c, &frame, &mut out)
                .map_err(|source| SinkError::Decode { index: i, source })?;
            let digest = ring::digest::digest(&ring::digest::SHA256, &out);
            let mut sha = [0u8; 32];
            sha.copy_from_slice(digest.as_ref());
            c.check_decoded(out.len(), &sha)
                .map_err(|source| SinkError::Chunk { index: i, source })?;
            write_at(&self.target, &self.path, &out, c.image_offset)?;
            self.image_done += u64::from(c.image_len);
        }
        Ok(())
    }

    #[cfg(not(feature = "zstd"))]
    fn write_whole_chunks(&mut self) -> Result<(), SinkError> {
        match self.assembler.as_mut().and_then(ChunkAssembler::poll_whole) {
            Some(_) => Err(SinkError::NoDecoder),
            None => Ok(()),
        }
    }

    /// Makes the image's holes read as zeros on the target (nothing to do for a raw image).
    /// Call it once before the first write of a fresh transfer (again after a restart is
    /// harmless: holes hold no data).
    pub fn zero_holes(&self) -> Result<(), SinkError> {
        let Form::Image(map) = &self.form else {
            return Ok(());
        };
        let block_device = self
            .target
            .metadata()
            .map(|m| m.file_type().is_block_device())
            .map_err(|source| self.io(source))?;
        for (off, len) in holes(&map.extents, map.image_size) {
            let done = if block_device {
                zero_out(&self.target, off, len)
            } else {
                punch(&self.target, off, len)
            };
            if done.is_err() {
                write_zeros(&self.target, off, len).map_err(|source| self.io(source))?;
            }
        }
        Ok(())
    }

    /// Makes everything written so far durable (the target and the staging file).
    pub fn sync(&self) -> Result<(), SinkError> {
        self.target.sync_data().map_err(|source| self.io(source))?;
        if let Some((f, path)) = &self.stage {
            f.sync_data().map_err(|source| SinkError::Io {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// SHA-256 of the image's bytes as the target holds them: synced, its cached pages
    /// dropped, and read back from offset 0 to the image's size.
    pub fn read_back(&self) -> Result<[u8; 32], SinkError> {
        self.sync()?;
        let len = self.image_size();
        // SAFETY: a plain call on an open descriptor; advice only, no memory passed.
        unsafe {
            libc::posix_fadvise(
                self.target.as_raw_fd(),
                0,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            self.target
                .read_exact_at(&mut buf[..n], at)
                .map_err(|source| self.io(source))?;
            ctx.update(&buf[..n]);
            at += n as u64;
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        Ok(out)
    }

    fn io(&self, source: io::Error) -> SinkError {
        SinkError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

fn image_size(form: &Form) -> u64 {
    match form {
        Form::Raw { size } => *size,
        Form::Image(map) => map.image_size,
    }
}

/// `pwritev` of `bufs` end to end at `off`, until every byte is written (a short write goes
/// on where it stopped). One call for a run of blocks instead of one per block.
pub(crate) fn write_vectored_at(file: &File, bufs: &[&[u8]], mut off: u64) -> io::Result<()> {
    // At most IOV_MAX (1024 on Linux) per call.
    const MAX_IOV: usize = 1024;
    let mut iovs: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            // The kernel only reads through this pointer (pwritev), never writes.
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut iovs = &mut iovs[..];
    while !iovs.is_empty() {
        let n = iovs.len().min(MAX_IOV);
        // SAFETY: every iovec points at `iov_len` readable bytes of `bufs`, which outlive
        // the call; `n` is at most IOV_MAX.
        let r = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iovs.as_ptr(),
                n as libc::c_int,
                off as libc::off_t,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        let mut left = r as usize;
        off += left as u64;
        while let Some(first) = iovs.first_mut() {
            if left < first.iov_len {
                // SAFETY: advancing within the same buffer, `left` < its length.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(left) }.cast();
                first.iov_len -= left;
                break;
            }
            left -= first.iov_len;
            iovs = &mut std::mem::take(&mut iovs)[1..];
        }
    }
    Ok(())
}

fn write_at(f: &File, path: &Path, bytes: &[u8], at: u64) -> Result<(), SinkError> {
    f.write_all_at(bytes, at).map_err(|source| SinkError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The image offsets and bytes of `payload`, the stream bytes from `at`, cut where they
/// cross from one extent into the next. Bytes past the last extent (never in a valid
/// stream: the caller bounds blocks by the stream's length) are dropped.
fn sparse_pieces<'a>(
    extents: &[Extent],
    starts: &[u64],
    at: u64,
    payload: &'a [u8],
) -> Vec<(u64, &'a [u8])> {
    let mut rest = payload;
    sparse_spans(extents, starts, at, payload.len())
        .into_iter()
        .map(|(off, len)| {
            let (piece, tail) = rest.split_at(len);
            rest = tail;
            (off, piece)
        })
        .collect()
}

/// The image ranges (offset, length) of `len` stream bytes from `at`, one per extent they
/// fall in, in stream order (see [`sparse_pieces`]).
fn sparse_spans(
    extents: &[Extent],
    starts: &[u64],
    mut at: u64,
    mut len: usize,
) -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    // The extent holding `at`: the last one starting at or before it.
    let mut k = starts.partition_point(|&s| s <= at).saturating_sub(1);
    while len > 0 && k < extents.len() {
        let e = extents[k];
        let into = at - starts[k];
        if into >= e.len {
            k += 1;
            continue;
        }
        let n = (e.len - into).min(len as u64) as usize;
        out.push((e.offset + into, n));
        len -= n;
        at += n as u64;
        k += 1;
    }
    out
}

/// The runs of `[0, size)` no extent covers, as (offset, length).
fn holes(extents: &[Extent], size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for e in extents {
        if e.offset > at {
            out.push((at, e.offset - at));
        }
        at = e.end();
    }
    if size > at {
        out.push((at, size - at));
    }
    out
}

/// Deallocates a file's range, which then reads as zeros (the file keeps its size).
fn punch(f: &File, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: a plain call on an open descriptor; no memory passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BLKZEROOUT` (`_IO(0x12, 127)`: no size or direction bits, the same on every
/// architecture), which libc does not export.
const BLKZEROOUT: u64 = 0x127f;

/// Asks a block device to zero a range (512-byte aligned, or the kernel refuses it).
fn zero_out(f: &File, off: u64, len: u64) -> io::Result<()> {
    if off % 512 != 0 || len % 512 != 0 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let range: [u64; 2] = [off, len];
    // SAFETY: BLKZEROOUT reads two u64 (start, length) through the pointer, which points at
    // `range`; the descriptor is open for the call's duration.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn write_zeros(f: &File, mut off: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; (len.min(1 << 20)) as usize];
    let end = off + len;
    while off < end {
        let n = (end - off).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
