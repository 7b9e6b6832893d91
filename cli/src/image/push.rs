//! `fleetcast push FILE --target SPEC [--form raw|sparse|compressed]`: the image half of a
//! push request. The target is checked for syntax here (the agent resolves it on each
//! device); a sparse or compressed form is prepared through the cache first
//! ([`super::prepare`]), and the push sends that form's stream with its map.

use std::path::{Path, PathBuf};

use fleetcast_agent::target::{ResolveError, TargetSpec};
use fleetcast_daemon::admin::PushImage;

use super::{default_cache_dir, prepare, PrepareError, PrepareOpts};

/// How an image travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageForm {
    /// Every byte, as the file holds it.
    Raw,
    /// The data extents only: runs of zeros are not sent, each device zeroes its holes.
    Sparse,
    /// The data extents in independently decodable zstd chunks (the agent needs feature
    /// `zstd`).
    Compressed,
}

/// Why an image push cannot be asked for.
#[derive(Debug, thiserror::Error)]
pub enum PushImageError {
    /// The target does not parse.
    #[error("--target {target}: {why}")]
    Target {
        /// As given.
        target: String,
        /// Why.
        why: ResolveError,
    },
    /// The form could not be prepared.
    #[error("{0}")]
    Prepare(#[from] PrepareError),
}

/// The file to push and the image half of the request for pushing `file` (absolute) as an
/// image to `target` in `form`; `chunk_span` for the compressed form, the cache under
/// `data_dir` (see [`default_cache_dir`]).
pub fn image_push(
    file: &Path,
    target: &str,
    form: ImageForm,
    chunk_span: u32,
    data_dir: &Path,
) -> Result<(PathBuf, PushImage), PushImageError> {
    TargetSpec::parse(target).map_err(|why| PushImageError::Target {
        target: target.into(),
        why,
    })?;
    let mut opts = PrepareOpts::new(file.to_owned(), default_cache_dir(data_dir, file));
    opts.chunk_span = chunk_span;
    let (stream, map) = match form {
        ImageForm::Raw => (file.to_owned(), None),
        ImageForm::Sparse => {
            opts.sparse = true;
            let p = prepare(&opts)?;
            let (stream, _) = p.sparse.expect("asked for");
            (stream, Some(p.map.0))
        }
        ImageForm::Compressed => {
            opts.compress = true;
            let p = prepare(&opts)?;
            let c = p.compressed.expect("asked for");
            (c.stream, Some(c.map))
        }
    };
    Ok((
        stream,
        PushImage {
            target: target.into(),
            map: map.map(|m| m.display().to_string()),
        },
    ))
}
