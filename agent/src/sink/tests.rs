use std::fs;
use std::path::PathBuf;

use fleetcast_wire::image::{Compression, ImageMap, SparseScanner};

use super::*;

const BLOCK: u32 = 1436;

fn sha(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// An image of `size` bytes: runs of data (a pattern no two blocks share) and runs of zeros,
/// so its map has holes and extents of several lengths.
fn image(size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut x = 0x9e37_79b9u32;
    for (i, b) in v.iter_mut().enumerate() {
        // Data in 3 of every 5 64-KiB stretches, and the image's last 100 bytes.
        if (i >> 16) % 5 < 3 || i + 100 >= size {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *b = (x >> 24) as u8 | 1;
        }
    }
    v
}

fn sparse_map(img: &[u8]) -> ImageMap {
    let mut s = SparseScanner::new(4096).unwrap();
    s.feed(img);
    let map = ImageMap {
        block_size: 4096,
        image_size: img.len() as u64,
        image_sha256: sha(img),
        extents: s.finish(),
        compression: Compression::None,
    };
    map.validate().unwrap();
    map
}

/// The stream the gateway would send for `map`: the data extents end to end.
fn sparse_stream(img: &[u8], map: &ImageMap) -> Vec<u8> {
    let mut out = Vec::new();
    for e in &map.extents {
        out.extend_from_slice(&img[e.offset as usize..e.end() as usize]);
    }
    out
}

/// Feeds `stream` to the sink in runs of up to 7 blocks, in a shuffled order.
fn feed(sink: &mut Sink, stream: &[u8]) {
    let blocks: Vec<&[u8]> = stream.chunks(BLOCK as usize).collect();
    let runs: Vec<(usize, usize)> = (0..blocks.len())
        .step_by(7)
        .map(|s| (s, (s + 7).min(blocks.len())))
        .collect();
    // Odd runs first, then even: nothing in order, every block once.
    for (s, e) in runs.iter().skip(1).step_by(2).chain(runs.iter().step_by(2)) {
        sink.write(*s as u64, &blocks[*s..*e]).unwrap();
    }
}

/// A target that already holds other bytes everywhere (a disk reused), so a hole left
/// unzeroed shows up in the read-back digest.
fn dirty_target(dir: &Path, len: usize) -> PathBuf {
    let p = dir.join("target.img");
    fs::write(&p, vec![0xa5u8; len]).unwrap();
    p
}

/// Every block of `stream` reads back from the sink as it was written (parity decoding's
/// view of the stream).
fn assert_blocks_read_back(sink: &Sink, stream: &[u8]) {
    for (i, block) in stream.chunks(BLOCK as usize).enumerate() {
        let mut buf = vec![0u8; block.len()];
        sink.read_block(i as u64, &mut buf).unwrap();
        assert!(buf == block, "stream block {i} read back differs");
    }
    let past = stream.len().div_ceil(BLOCK as usize) as u64;
    let mut buf = vec![0u8; 1];
    assert!(matches!(
        sink.read_block(past, &mut buf),
        Err(SinkError::BlockOutOfRange { .. })
    ));
}

#[test]
fn a_short_block_in_the_middle_of_a_run_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let form = Form::Raw {
        size: 3 * u64::from(BLOCK),
    };
    let mut sink = Sink::open(&d.path().join("t"), None, form, BLOCK).unwrap();
    let whole = vec![1u8; BLOCK as usize];
    let short = vec![1u8; BLOCK as usize - 1];
    let e = sink.write(0, &[&whole, &short, &whole]).unwrap_err();
    assert!(
        matches!(e, SinkError::PayloadLength { index: 1, .. }),
        "{e}"
    );
    assert_eq!(sink.image_done(), 0);
}

#[test]
fn raw_stream_lands_at_its_offsets_and_reads_back() {
    let d = tempfile::tempdir().unwrap();
    let img = image(1 << 20);
    let target = d.path().join("raw.img");
    let form = Form::Raw {
        size: img.len() as u64,
    };
    let mut sink = Sink::open(&target, None, form, BLOCK).unwrap();
    assert_eq!(sink.stream_len(), img.len() as u64);
    feed(&mut sink, &img);
    assert_eq!(sink.image_done(), img.len() as u64);
    assert_eq!(sink.read_back().unwrap(), sha(&img));
    assert_eq!(fs::metadata(&target).unwrap().len(), img.len() as u64);
    assert_blocks_read_back(&sink, &img);
}

#[test]
fn sparse_stream_fills_extents_and_zeroes_holes_on_a_dirty_target() {
    let d = tempfile::tempdir().unwrap();
    let img = image((1 << 20) + 777);
    let map = sparse_map(&img);
    assert!(map.extents.len() > 2, "{:?}", map.extents);
    let stream = sparse_stream(&img, &map);
    assert!(stream.len() < img.len() * 3 / 4, "holes travel not");
    let target = dirty_target(d.path(), img.len());
    let mut sink = Sink::open(&target, None, Form::Image(map), BLOCK).unwrap();
    assert_eq!(sink.stream_len(), stream.len() as u64);
    sink.zero_holes().unwrap();
    feed(&mut sink, &stream);
    assert_eq!(sink.image_done(), stream.len() as u64);
    assert_eq!(sink.read_back().unwrap(), sha(&img));
    assert_blocks_read_back(&sink, &stream);
    // After a restart, progress counts the stream's (data) bytes, its short last block too.
    let form = Form::Image(sparse_map(&img));
    let mut again = Sink::open(&target, None, form, BLOCK).unwrap();
    again
        .resume(0..stream.len().div_ceil(BLOCK as usize) as u64)
        .unwrap();
    assert_eq!(again.image_done(), stream.len() as u64);
}

#[test]
fn a_block_past_the_stream_is_refused_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("t.img");
    let mut sink = Sink::open(&target, None, Form::Raw { size: 3000 }, BLOCK).unwrap();
    let b = [1u8; BLOCK as usize];
    match sink.write(3, &[&b[..]]) {
        Err(SinkError::BlockOutOfRange { index, blocks }) => assert_eq!((index, blocks), (3, 3)),
        r => panic!("{r:?}"),
    }
    match sink.write(2, &[&b[..], &b[..]]) {
        Err(SinkError::BlockOutOfRange { index, blocks }) => assert_eq!((index, blocks), (3, 3)),
        r => panic!("{r:?}"),
    }
    // The last block holds what is left of the stream (3,000 - 2 x 1,436 = 128 bytes).
    match sink.write(1, &[&b[..], &b[..]]) {
        Err(SinkError::PayloadLength { index, len, room }) => {
            assert_eq!((index, len, room), (2, 1436, 128))
        }
        r => panic!("{r:?}"),
    }
    assert_eq!(sink.image_done(), 0);
    assert_eq!(fs::read(&target).unwrap(), vec![0u8; 3000]);
}

#[test]
fn a_piece_straddling_extents_is_cut_at_their_boundary() {
    let e = |offset, len| Extent { offset, len };
    let extents = [e(0, 4096), e(8192, 4096), e(20_480, 100)];
    let starts = [0, 4096, 8192];
    let p = [7u8; 5000];
    let pieces = sparse_pieces(&extents, &starts, 4000, &p);
    let got: Vec<(u64, usize)> = pieces.iter().map(|(o, b)| (*o, b.len())).collect();
    assert_eq!(got, [(4000, 96), (8192, 4096), (20_480, 100)]);
    assert_eq!(
        holes(&extents, 30_000),
        [(4096, 4096), (12_288, 8192), (20_580, 9420)]
    );
}

#[test]
fn a_compressed_image_without_a_staging_file_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let img = image(200_000);
    let mut map = sparse_map(&img);
    map.compression = Compression::Zstd {
        span: 1 << 16,
        chunks: Vec::new(),
    };
    let r = Sink::open(&d.path().join("t"), None, Form::Image(map), BLOCK);
    assert!(matches!(r, Err(SinkError::NoStage)), "{r:?}");
}

#[cfg(feature = "zstd")]
mod compressed {
    use fleetcast_wire::image::{chunk_plan, ChunkEntry};

    use super::*;

    /// The compressed form of `img` at `span`, as `fleetcast image prepare --compress` makes
    /// it (there with libzstd; ruzstd's encoder here, whose frames the same decoder reads).
    fn compressed(img: &[u8], span: u32) -> (ImageMap, Vec<u8>) {
        let mut map = sparse_map(img);
        let mut stream = Vec::new();
        let mut chunks = Vec::new();
        for p in chunk_plan(&map.extents, span) {
            let bytes = &img[p.offset as usize..p.end() as usize];
            let frame = ruzstd::encoding::compress_to_vec(
                bytes,
                ruzstd::encoding::CompressionLevel::Fastest,
            );
            chunks.push(ChunkEntry {
                image_offset: p.offset,
                image_len: p.len as u32,
                comp_offset: stream.len() as u64,
                comp_len: frame.len() as u32,
                sha256: sha(bytes),
            });
            stream.extend_from_slice(&frame);
        }
        map.compression = Compression::Zstd { span, chunks };
        map.validate().unwrap();
        (map, stream)
    }

    #[test]
    fn compressed_chunks_are_decoded_once_whole_and_written_at_their_offsets() {
        let d = tempfile::tempdir().unwrap();
        let img = image((1 << 20) + 4096);
        let (map, stream) = compressed(&img, 1 << 16);
        let target = dirty_target(d.path(), img.len());
        let stage = d.path().join("stage");
        let mut sink = Sink::open(&target, Some(&stage), Form::Image(map), BLOCK).unwrap();
        assert_eq!(sink.stream_len(), stream.len() as u64);
        sink.zero_holes().unwrap();
        feed(&mut sink, &stream);
        let data: u64 = sparse_map(&img).data_bytes();
        assert_eq!(sink.image_done(), data, "progress in image bytes");
        assert_eq!(sink.read_back().unwrap(), sha(&img));
        assert_blocks_read_back(&sink, &stream);
    }

    #[test]
    fn a_restart_decodes_what_the_staged_blocks_complete() {
        let d = tempfile::tempdir().unwrap();
        let img = image(600_000);
        let (map, stream) = compressed(&img, 1 << 16);
        let target = d.path().join("target.img");
        let stage = d.path().join("stage");
        let blocks: Vec<&[u8]> = stream.chunks(BLOCK as usize).collect();
        let half = blocks.len() / 2;
        {
            let mut sink =
                Sink::open(&target, Some(&stage), Form::Image(map.clone()), BLOCK).unwrap();
            sink.zero_holes().unwrap();
            sink.write(0, &blocks[..half]).unwrap();
            sink.sync().unwrap();
        }
        // The target loses what was decoded (as if the crash came before its pages reached
        // the disk); the staging file and the record survive.
        fs::write(&target, vec![0u8; img.len()]).unwrap();
        let mut sink = Sink::open(&target, Some(&stage), Form::Image(map), BLOCK).unwrap();
        sink.resume(0..half as u64).unwrap();
        sink.write(half as u64, &blocks[half..]).unwrap();
        assert_eq!(sink.read_back().unwrap(), sha(&img));
    }

    #[test]
    fn a_chunk_whose_bytes_do_not_match_its_digest_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let img = image(300_000);
        let (mut map, stream) = compressed(&img, 1 << 16);
        if let Compression::Zstd { chunks, .. } = &mut map.compression {
            chunks[0].sha256[0] ^= 1;
        }
        let stage = d.path().join("stage");
        let target = d.path().join("t");
        let mut sink = Sink::open(&target, Some(&stage), Form::Image(map), BLOCK).unwrap();
        let blocks: Vec<&[u8]> = stream.chunks(BLOCK as usize).collect();
        match sink.write(0, &blocks) {
            Err(SinkError::Chunk {
                index: 0,
                source: ChunkError::Digest,
            }) => {}
            r => panic!("{r:?}"),
        }
    }
}

/// On a real loop device when this runs as root with `losetup` (CI does): holes zeroed by
/// `BLKZEROOUT`, the size from `BLKGETSIZE64`, the digest read back from the device. Elsewhere
/// the same on a regular file, and the test says which ran.
#[test]
fn a_sparse_image_to_a_loop_device_when_root_else_a_file() {
    let d = tempfile::tempdir().unwrap();
    let img = image(3 << 20);
    let map = sparse_map(&img);
    let stream = sparse_stream(&img, &map);
    let backing = dirty_target(d.path(), 4 << 20);
    let dev = crate::test_loop::LoopDevice::attach(&backing);
    let target = match &dev {
        Some(l) => l.node().to_owned(),
        None => {
            eprintln!("ran on a regular file: not root or losetup unavailable");
            backing.clone()
        }
    };
    let mut sink = Sink::open(&target, None, Form::Image(map.clone()), BLOCK).unwrap();
    sink.zero_holes().unwrap();
    feed(&mut sink, &stream);
    assert_eq!(sink.read_back().unwrap(), sha(&img));
    drop(sink);
    // An image larger than the device is refused before anything is written.
    if dev.is_some() {
        let mut big = map;
        big.image_size = 5 << 20;
        match Sink::open(&target, None, Form::Image(big), BLOCK) {
            Err(SinkError::TooSmall { have, need, .. }) => {
                assert_eq!((have, need), (4 << 20, 5 << 20))
            }
            r => panic!("{r:?}"),
        }
    }
}
