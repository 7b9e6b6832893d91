//! The driver side of the sparse map: reads an image once, asking the file system first
//! where its holes are (`SEEK_DATA`/`SEEK_HOLE`) so holes are neither read nor scanned, and
//! feeds the rest to the pure [`SparseScanner`]; the same pass computes the image's SHA-256.
//!
//! A file system without hole reporting answers `SEEK_DATA` with the offset itself (the whole
//! file is "data") or `EINVAL`; both fall back to reading everything, which gives the same map
//! (the scanner finds zeros in bytes as well as it is told of them).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use fleetcast_wire::image::{Extent, SparseScanner};
use ring::digest;

/// Bytes read at a time: large enough for few system calls, small enough to stay in cache.
const READ: usize = 1 << 20;

/// Zeros hashed for a hole (the image's digest covers its holes as zeros).
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// What one pass over an image found.
#[derive(Debug)]
pub struct Scanned {
    /// The image's size.
    pub size: u64,
    /// Its data extents.
    pub extents: Vec<Extent>,
    /// SHA-256 of all its bytes.
    pub sha256: [u8; 32],
    /// Bytes the file system reported as holes (not read).
    pub hole_bytes: u64,
}

/// `lseek(at, whence)` for `SEEK_DATA` (where the next data starts at or after `at`) or
/// `SEEK_HOLE` (where the next hole does): `None` when there is no data at or after `at`;
/// `Err` when the file system cannot say.
fn seek(file: &File, at: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(at).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a descriptor we own, with a valid whence; it touches no memory.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // ENXIO: no data at or after `at` (the rest is a hole).
        Some(libc::ENXIO) => Ok(None),
        _ => Err(e),
    }
}

/// Scans `file` (of `size` bytes) at `block_size`.
pub fn scan(file: &File, size: u64, block_size: u32) -> io::Result<Scanned> {
    let mut scanner = SparseScanner::new(block_size)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; READ];
    let mut at = 0u64;
    let mut holes = 0u64;
    let mut seekable = true;
    while at < size {
        // Where this data run starts and ends, as the file system says (else: all data).
        let (data, end) = if seekable {
            match seek(file, at, libc::SEEK_DATA) {
                Ok(Some(d)) => (d.min(size), seek(file, d, libc::SEEK_HOLE)?.unwrap_or(size)),
                Ok(None) => (size, size),
                Err(_) => {
                    seekable = false;
                    (at, size)
                }
            }
        } else {
            (at, size)
        };
        if data > at {
            let gap = data - at;
            scanner.skip_zeros(gap);
            hash_zeros(&mut hash, gap);
            holes += gap;
            at = data;
        }
        let end = end.min(size);
        while at < end {
            let n = usize::try_from(end - at).map_or(READ, |r| r.min(READ));
            let got = read_at(file, &mut buf[..n], at)?;
            scanner.feed(&buf[..got]);
            hash.update(&buf[..got]);
            at += got as u64;
        }
    }
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(hash.finish().as_ref());
    Ok(Scanned {
        size,
        extents: scanner.finish(),
        sha256,
        hole_bytes: holes,
    })
}

fn hash_zeros(hash: &mut digest::Context, mut n: u64) {
    while n > 0 {
        let k = usize::try_from(n).map_or(ZEROS.len(), |n| n.min(ZEROS.len()));
        hash.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Reads at least one byte at `at` (an image that shrinks under us is an error, not a loop).
pub fn read_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    loop {
        match file.read_at(buf, at) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Fills `buf` from `at`.
pub fn read_exact_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    file.read_exact_at(buf, at)
}
