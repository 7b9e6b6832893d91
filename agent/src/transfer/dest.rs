//! Where a transfer's verified blocks go: the downloads directory's `.part` file (a file
//! push, stream offset = file offset), or an image's target through a [`Sink`] (an image
//! push: raw, sparse or compressed; `sink.rs`). The worker writes, reads back (parity
//! decoding) and syncs through this one type, so both kinds share every rule of the
//! transfer: a block is written only once verified, and made durable before the record that
//! names it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use fleetcast_wire::Ranges;

use crate::imaging::ImagePlan;
use crate::sink::{write_vectored_at, Sink, SinkError};

/// The destination of one reception.
#[derive(Debug)]
pub(super) enum Dest {
    /// A file push's `.part` file.
    File(File),
    /// An image push's target.
    Image(Box<Sink>),
}

fn io_err(e: SinkError) -> io::Error {
    match e {
        SinkError::Io { source, path } => {
            io::Error::new(source.kind(), format!("{}: {source}", path.display()))
        }
        other => io::Error::other(other.to_string()),
    }
}

impl Dest {
    /// Opens the destination of a stream of `size` bytes in `block_size`-byte blocks: `part`
    /// (created, sized) for a file push, the plan's target (and staging file) for an image.
    pub(super) fn open(
        image: Option<&ImagePlan>,
        part: &Path,
        size: u64,
        block_size: u32,
    ) -> io::Result<Dest> {
        let Some(plan) = image else {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(part)?;
            file.set_len(size)?;
            return Ok(Dest::File(file));
        };
        let sink = Sink::open(
            &plan.path,
            plan.stage.as_deref(),
            plan.form.clone(),
            block_size,
        )
        .map_err(io_err)?;
        if sink.stream_len() != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the image map describes a stream of {} bytes, the announce {size}",
                    sink.stream_len()
                ),
            ));
        }
        Ok(Dest::Image(Box::new(sink)))
    }

    /// After a restart: the blocks the record names are there already (a compressed
    /// image's chunks they complete are decoded and written again).
    pub(super) fn resume(&mut self, received: &Ranges) -> io::Result<()> {
        if let Dest::Image(sink) = self {
            let blocks = received
                .as_slice()
                .iter()
                .flat_map(|r| u64::from(r.start)..u64::from(r.start) + u64::from(r.len));
            sink.resume(blocks).map_err(io_err)?;
        }
        Ok(())
    }

    /// Writes blocks `first`, `first + 1`, … (`payloads`, end to end in the stream) of
    /// `block_size` bytes each.
    pub(super) fn write_run(
        &mut self,
        first: u32,
        block_size: u32,
        payloads: &[&[u8]],
    ) -> io::Result<()> {
        match self {
            Dest::File(f) => {
                write_vectored_at(f, payloads, u64::from(first) * u64::from(block_size))
            }
            Dest::Image(sink) => sink.write(u64::from(first), payloads).map_err(io_err),
        }
    }

    /// Reads block `b` back into `buf` (the block's length).
    pub(super) fn read_block(&self, b: u32, block_size: u32, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Dest::File(f) => f.read_exact_at(buf, u64::from(b) * u64::from(block_size)),
            Dest::Image(sink) => sink.read_block(u64::from(b), buf).map_err(io_err),
        }
    }

    /// Handles on the files a sync makes durable, for the persister thread.
    pub(super) fn handles(&self) -> io::Result<Vec<File>> {
        match self {
            Dest::File(f) => Ok(vec![f.try_clone()?]),
            Dest::Image(sink) => sink.handles().map_err(io_err),
        }
    }

    /// Makes everything written so far durable.
    pub(super) fn sync(&self) -> io::Result<()> {
        match self {
            Dest::File(f) => f.sync_data(),
            Dest::Image(sink) => sink.sync().map_err(io_err),
        }
    }

    /// An image's final check: its holes zeroed, everything durable, and the SHA-256 of the
    /// image as the target holds it, read back (`None` for a file push).
    pub(super) fn read_back_image(&self) -> io::Result<Option<[u8; 32]>> {
        match self {
            Dest::File(_) => Ok(None),
            Dest::Image(sink) => {
                sink.zero_holes().map_err(io_err)?;
                sink.read_back().map(Some).map_err(io_err)
            }
        }
    }
}
