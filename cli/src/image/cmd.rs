//! The `fleetcast image` subcommands' arguments and output (the work is in [`super::prepare`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use fleetcast_daemon::exit::Exit;
use fleetcast_daemon::{errln, outln};

use super::{default_cache_dir, hex, prepare, CacheState, PrepareOpts, Prepared};

/// `fleetcast image …`.
#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Make an image's sparse map and (with --compress) its compressed form once, and cache
    /// them by the image's SHA-256 (in <data-dir>/images when the gateway's data directory
    /// exists, else in .fleetcast-images next to the image). A second run finds them, checks
    /// them against the image and says so; a damaged entry is made again.
    Prepare(PrepareArgs),
}

/// `fleetcast image prepare`.
#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// The image (a file, or a block device read as one).
    pub image: PathBuf,
    /// Also make the compressed form: the data cut into independently decodable zstd chunks.
    #[arg(long)]
    pub compress: bool,
    /// Also make the sparse form's stream (the data extents end to end: what a sparse push
    /// sends).
    #[arg(long)]
    pub sparse: bool,
    /// Image bytes per compressed chunk, with an optional K or M suffix (a multiple of the
    /// block size from 4K to 64M).
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    pub chunk: u32,
    /// The sparse map's block size: a zero run shorter than this is not a hole.
    #[arg(long, value_name = "SIZE", default_value = "4K", value_parser = parse_size)]
    pub block_size: u32,
    /// zstd level, 1 (fastest) to 19 (smallest).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,
    /// The cache directory, instead of the default.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// Why a SIZE argument is not a size.
#[derive(Debug, thiserror::Error)]
pub enum SizeError {
    /// Not digits with an optional K or M.
    #[error("`{0}` is not a size; it takes bytes, or a number with K or M (e.g. 1M)")]
    NotASize(String),
    /// 0, or 4 GiB and more.
    #[error("`{0}` is out of range; it takes 1 byte to 4095M")]
    OutOfRange(String),
}

/// `1048576`, `1024K`, `1M`. (The map's own rules on block sizes and chunk spans are checked
/// by the map, which names the rule.)
pub fn parse_size(s: &str) -> Result<u32, SizeError> {
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    let n: u64 = digits.parse().map_err(|_| SizeError::NotASize(s.into()))?;
    u32::try_from(n.saturating_mul(mult))
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| SizeError::OutOfRange(s.into()))
}

/// Runs `fleetcast image …`.
pub fn run(cmd: ImageCmd, data_dir: &Path, json: bool) -> ExitCode {
    match cmd {
        ImageCmd::Prepare(a) => run_prepare(a, data_dir, json),
    }
}

/// CPU time (user + system) this process used so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes the struct we pass, which is ours and zeroed.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

#[allow(clippy::disallowed_methods)] // `image prepare`'s one clock read: its elapsed time.
fn start_clock() -> std::time::Instant {
    std::time::Instant::now()
}

fn run_prepare(a: PrepareArgs, data_dir: &Path, json: bool) -> ExitCode {
    let cache_dir = a
        .cache_dir
        .clone()
        .unwrap_or_else(|| default_cache_dir(data_dir, &a.image));
    let opts = PrepareOpts {
        image: a.image.clone(),
        compress: a.compress,
        sparse: a.sparse,
        chunk_span: a.chunk,
        block_size: a.block_size,
        level: a.level,
        cache_dir,
    };
    let (t0, c0) = (start_clock(), cpu_time());
    let p = match prepare(&opts) {
        Ok(p) => p,
        Err(e) => {
            // A missing image is "not found" (exit 4), like a missing file elsewhere.
            let code = match &e {
                super::PrepareError::Image { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    Exit::NotFound
                }
                _ => Exit::Failed,
            };
            let msg = e.to_string();
            if json {
                outln!(
                    "{}",
                    serde_json::json!({ "ok": false, "error": msg, "kind": code.name() })
                );
            } else {
                errln!("fleetcast: {msg}");
            }
            return code.into();
        }
    };
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), (cpu_time() - c0).as_secs_f64());
    if json {
        outln!("{}", to_json(&opts, &p, secs, cpu));
    } else {
        print_human(&opts, &p, secs, cpu);
    }
    Exit::Ok.into()
}

fn state(s: &CacheState) -> (&'static str, Option<&str>) {
    match s {
        CacheState::Hit => ("cached", None),
        CacheState::Built => ("built", None),
        CacheState::Rebuilt(why) => ("rebuilt", Some(why)),
    }
}

fn to_json(o: &PrepareOpts, p: &Prepared, secs: f64, cpu: f64) -> serde_json::Value {
    let (map_state, map_why) = state(&p.map.1);
    let compressed = p.compressed.as_ref().map(|c| {
        let (s, why) = state(&c.state);
        serde_json::json!({
            "map": c.map, "stream": c.stream, "cache": s, "rebuilt_because": why,
            "bytes": c.bytes, "chunks": c.chunks, "chunk_span": o.chunk_span,
            "ratio": ratio(p.image_bytes, c.bytes),
        })
    });
    serde_json::json!({ "ok": true, "data": {
        "image": o.image, "sha256": hex(&p.sha256), "image_bytes": p.image_bytes,
        "data_bytes": p.data_bytes, "hole_bytes_reported": p.hole_bytes, "extents": p.extents,
        "block_size": o.block_size, "map": p.map.0, "cache": map_state,
        "rebuilt_because": map_why, "compressed": compressed,
        "sparse": p.sparse.as_ref().map(|(path, st)| {
            let (s, why) = state(st);
            serde_json::json!({ "stream": path, "cache": s, "rebuilt_because": why,
                                "bytes": p.data_bytes })
        }),
        "seconds": secs, "cpu_seconds": cpu,
    }})
}

/// Image bytes per wire byte.
fn ratio(image: u64, wire: u64) -> f64 {
    if wire == 0 {
        0.0
    } else {
        image as f64 / wire as f64
    }
}

fn print_human(o: &PrepareOpts, p: &Prepared, secs: f64, cpu: f64) {
    let (s, why) = state(&p.map.1);
    outln!(
        "image       {} (sha256 {})",
        o.image.display(),
        hex(&p.sha256)
    );
    outln!(
        "image bytes {}  data bytes {} in {} extents of {}-byte blocks ({:.1}% of the image; {} bytes of holes reported by the file system)",
        p.image_bytes,
        p.data_bytes,
        p.extents,
        o.block_size,
        100.0 * p.data_bytes as f64 / p.image_bytes.max(1) as f64,
        p.hole_bytes
    );
    outln!("sparse map  {} ({s})", p.map.0.display());
    if let Some(why) = why {
        outln!("            rebuilt because {why}");
    }
    if let Some((path, st)) = &p.sparse {
        let (s, why) = state(st);
        outln!("sparse      {} ({s})", path.display());
        if let Some(why) = why {
            outln!("            rebuilt because {why}");
        }
    }
    if let Some(c) = &p.compressed {
        let (s, why) = state(&c.state);
        outln!(
            "compressed  {} bytes in {} chunks of up to {} image bytes: ratio {:.2} to the image, {:.2} to the data ({s})",
            c.bytes,
            c.chunks,
            o.chunk_span,
            ratio(p.image_bytes, c.bytes),
            ratio(p.data_bytes, c.bytes)
        );
        outln!("            {}", c.stream.display());
        if let Some(why) = why {
            outln!("            rebuilt because {why}");
        }
    }
    outln!("time        {secs:.2} s, CPU {cpu:.2} s");
}
