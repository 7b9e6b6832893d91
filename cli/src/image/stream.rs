//! The sparse form's stream: the image's data extents end to end, which is what a sparse
//! push sends (`<key>.sparse` in the cache, next to the map that describes it). Kept as a
//! file so the gateway pushes it like any other file (mapped, hashed, block digests) and a
//! restarted gateway finds it again; it costs the data's size on the gateway's disk, never
//! the holes'.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use fleetcast_wire::image::ImageMap;

use super::{scan, CacheState, Miss, PrepareError, PrepareOpts};

/// Bytes compared or copied per read.
const PIECE: u64 = 1 << 20;

/// Finds the sparse stream of `raw` (the map of the image `image`) in the cache, checked
/// byte for byte against the image, or makes it.
pub(super) fn sparse(
    opts: &PrepareOpts,
    image: &File,
    raw: &ImageMap,
    key: &str,
) -> Result<(PathBuf, CacheState), PrepareError> {
    let path = opts.cache_dir.join(format!("{key}.sparse"));
    let state = match check(&path, opts, image, raw)? {
        Ok(()) => CacheState::Hit,
        Err(miss) => {
            write(&path, opts, image, raw)?;
            miss.into_state()
        }
    };
    Ok((path, state))
}

fn image_err(opts: &PrepareOpts) -> impl Fn(io::Error) -> PrepareError + '_ {
    |source| PrepareError::Image {
        path: opts.image.clone(),
        source,
    }
}

/// `Ok(Ok(()))`: the cached stream is the image's extents; `Ok(Err(miss))`: it is not (or
/// is not there); `Err`: the image itself cannot be read.
fn check(
    path: &Path,
    opts: &PrepareOpts,
    image: &File,
    raw: &ImageMap,
) -> Result<Result<(), Miss>, PrepareError> {
    let bad = |why: String| Ok(Err(Miss::Bad(format!("{}: {why}", path.display()))));
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Err(Miss::Absent)),
        Err(e) => return bad(e.to_string()),
    };
    let len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return bad(e.to_string()),
    };
    if len != raw.data_bytes() {
        return bad(format!(
            "{len} bytes where the image has {} data bytes",
            raw.data_bytes()
        ));
    }
    let (mut want, mut got) = (Vec::new(), Vec::new());
    let mut at = 0u64;
    for e in &raw.extents {
        let mut done = 0u64;
        while done < e.len {
            let n = (e.len - done).min(PIECE) as usize;
            want.resize(n, 0);
            got.resize(n, 0);
            scan::read_exact_at(image, &mut want, e.offset + done).map_err(image_err(opts))?;
            if let Err(e) = scan::read_exact_at(&file, &mut got, at) {
                return bad(e.to_string());
            }
            if want != got {
                return bad(format!("differs from the image at stream offset {at}"));
            }
            done += n as u64;
            at += n as u64;
        }
    }
    Ok(Ok(()))
}

fn write(
    path: &Path,
    opts: &PrepareOpts,
    image: &File,
    raw: &ImageMap,
) -> Result<(), PrepareError> {
    let cache_err = |source| PrepareError::Cache {
        path: path.to_owned(),
        source,
    };
    let mut out = fleetcast_os::AtomicFile::create(path, 0o644).map_err(cache_err)?;
    let mut buf = Vec::new();
    for e in &raw.extents {
        let mut done = 0u64;
        while done < e.len {
            let n = (e.len - done).min(PIECE) as usize;
            buf.resize(n, 0);
            scan::read_exact_at(image, &mut buf, e.offset + done).map_err(image_err(opts))?;
            out.write_all(&buf).map_err(cache_err)?;
            done += n as u64;
        }
    }
    out.commit().map_err(cache_err)
}
