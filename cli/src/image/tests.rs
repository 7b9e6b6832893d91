use std::io::{Seek, SeekFrom, Write};

use fleetcast_wire::image::{ChunkAssembler, Extent};

use super::*;

const MIB: u64 = 1 << 20;

/// Seeded bytes (splitmix64): random enough that zstd cannot shrink them, the same each run.
fn random(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// The test image's data: 2 MiB of random bytes in extents at these offsets, the rest zeros
/// (some of it compressible text, so the compressed form is smaller than the data).
fn layout() -> Vec<(u64, Vec<u8>)> {
    let text: Vec<u8> = b"fleetcast imaging test line\n"
        .iter()
        .copied()
        .cycle()
        .take(256 << 10)
        .collect();
    vec![
        (0, random(1, 512 << 10)),
        (3 * MIB, random(2, 768 << 10)),
        (3 * MIB + (768 << 10) + 8192, text),
        (7 * MIB + 4096, random(3, 512 << 10)),
    ]
}

/// Writes the 10 MiB image: `sparse` leaves the zeros as holes (`set_len`), otherwise they are
/// written out (the scanner finds them in the bytes instead).
fn write_image(path: &Path, sparse: bool) -> Vec<u8> {
    let mut whole = vec![0u8; 10 * MIB as usize];
    for (at, bytes) in layout() {
        whole[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
    }
    let mut f = File::create(path).unwrap();
    if sparse {
        f.set_len(10 * MIB).unwrap();
        for (at, bytes) in layout() {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&bytes).unwrap();
        }
    } else {
        f.write_all(&whole).unwrap();
    }
    f.sync_all().unwrap();
    whole
}

fn want_extents() -> Vec<Extent> {
    // The text run starts 8 KiB after the second random run: its own extent.
    layout()
        .iter()
        .map(|(at, b)| Extent {
            offset: *at,
            len: b.len() as u64,
        })
        .collect()
}

#[test]
fn the_map_has_exactly_the_data_extents_sparse_or_not() {
    let d = tempfile::tempdir().unwrap();
    for sparse in [true, false] {
        let img = d.path().join(format!("img-{sparse}"));
        let whole = write_image(&img, sparse);
        let mut o = PrepareOpts::new(img.clone(), d.path().join("cache"));
        o.block_size = 4096;
        let p = prepare(&o).unwrap();
        assert_eq!(p.image_bytes, 10 * MIB);
        assert_eq!(p.data_bytes, 2 * MIB, "sparse {sparse}");
        assert_eq!(p.sha256, sha256(&whole));
        let map = ImageMap::decode(&std::fs::read(&p.map.0).unwrap()).unwrap();
        assert_eq!(map.extents, want_extents(), "sparse {sparse}");
        if !sparse {
            assert_eq!(p.hole_bytes, 0);
        }
        // Which path ran: whether this file system reported the holes.
        eprintln!(
            "sparse={sparse}: {} hole bytes reported by the file system",
            p.hole_bytes
        );
    }
}

#[test]
fn the_compressed_form_decodes_back_chunk_by_chunk_in_any_order() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img");
    let whole = write_image(&img, true);
    let mut o = PrepareOpts::new(img, d.path().join("cache"));
    o.compress = true;
    o.chunk_span = 256 << 10;
    let p = prepare(&o).unwrap();
    let c = p.compressed.as_ref().unwrap();
    assert_eq!(c.state, CacheState::Built);
    // 512K/256K = 2, 768K = 3, 256K text in 2 (it crosses a span multiple), 512K at 7M+4K
    // = 3 (4K offset into a span).
    assert_eq!(c.chunks, 2 + 3 + 2 + 3);
    assert!(c.bytes < p.data_bytes, "{} !< {}", c.bytes, p.data_bytes);
    let map = ImageMap::decode(&std::fs::read(&c.map).unwrap()).unwrap();
    let stream = std::fs::read(&c.stream).unwrap();
    assert_eq!(stream.len() as u64, map.wire_bytes());

    // Blocks of the stream arrive in a scrambled order; each chunk is decoded when whole and
    // written at its offset into a target that starts as zeros (the holes).
    let block = 1436u32;
    let mut a = ChunkAssembler::new(map.chunks(), block).unwrap();
    let mut order: Vec<u64> = (0..a.blocks()).collect();
    let mut r = random(9, order.len() * 8);
    for i in (1..order.len()).rev() {
        let j = u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap()) as usize % (i + 1);
        order.swap(i, j);
    }
    r.clear();
    let mut target = vec![0u8; map.image_size as usize];
    let mut decoded = Vec::new();
    let mut out = Vec::new();
    for b in order {
        a.handle_block(b).unwrap();
        while let Some(i) = a.poll_whole() {
            let e = map.chunks()[i as usize];
            let frame = &stream[e.comp_offset as usize..e.comp_end() as usize];
            decode_chunk(&e, frame, &mut out).unwrap();
            e.check_decoded(out.len(), &sha256(&out)).unwrap();
            let at = e.image_offset as usize;
            target[at..at + out.len()].copy_from_slice(&out);
            decoded.push(i);
        }
    }
    assert!(a.is_complete());
    decoded.sort_unstable();
    assert_eq!(decoded, (0..c.chunks as u32).collect::<Vec<_>>());
    assert!(target == whole, "the decoded image differs");
    assert_eq!(sha256(&target), map.image_sha256);
}

#[test]
fn a_second_run_hits_the_cache_and_a_corrupted_entry_is_rebuilt() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img");
    write_image(&img, true);
    let mut o = PrepareOpts::new(img, d.path().join("cache"));
    o.compress = true;
    let first = prepare(&o).unwrap();
    assert_eq!(first.map.1, CacheState::Built);
    let c = first.compressed.unwrap();
    assert_eq!(c.state, CacheState::Built);

    let again = prepare(&o).unwrap();
    assert_eq!(again.map.1, CacheState::Hit);
    assert_eq!(again.compressed.as_ref().unwrap().state, CacheState::Hit);

    // A flipped byte inside the stream: the chunk no longer decodes to its digest.
    let mut s = std::fs::read(&c.stream).unwrap();
    let mid = s.len() / 2;
    s[mid] ^= 0x55;
    std::fs::write(&c.stream, &s).unwrap();
    // A flipped byte in the raw map: its CRC.
    let mut m = std::fs::read(&first.map.0).unwrap();
    m[20] ^= 1;
    std::fs::write(&first.map.0, &m).unwrap();
    let fixed = prepare(&o).unwrap();
    match &fixed.map.1 {
        CacheState::Rebuilt(why) => assert!(why.contains("CRC"), "{why}"),
        s => panic!("{s:?}"),
    }
    match &fixed.compressed.as_ref().unwrap().state {
        CacheState::Rebuilt(why) => assert!(why.contains("chunk"), "{why}"),
        s => panic!("{s:?}"),
    }
    // And the rebuilt entries are good again.
    let last = prepare(&o).unwrap();
    assert_eq!(last.map.1, CacheState::Hit);
    assert_eq!(last.compressed.unwrap().state, CacheState::Hit);

    // A truncated stream: its length.
    std::fs::write(&c.stream, &s[..mid]).unwrap();
    match prepare(&o).unwrap().compressed.unwrap().state {
        CacheState::Rebuilt(why) => assert!(why.contains("bytes where its map says"), "{why}"),
        s => panic!("{s:?}"),
    }
}

#[test]
fn the_cache_is_the_data_dir_when_there_is_one() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("sub/img");
    assert_eq!(
        default_cache_dir(&d.path().join("gw"), &img),
        d.path().join("sub/.fleetcast-images")
    );
    std::fs::create_dir(d.path().join("gw")).unwrap();
    assert_eq!(
        default_cache_dir(&d.path().join("gw"), &img),
        d.path().join("gw/images")
    );
    assert_eq!(
        default_cache_dir(&d.path().join("none"), Path::new("img")),
        Path::new("./.fleetcast-images")
    );
}

#[test]
fn bad_options_are_refused_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img");
    std::fs::write(&img, b"x").unwrap();
    let mut o = PrepareOpts::new(img.clone(), d.path().join("cache"));
    o.compress = true;
    o.chunk_span = 5000;
    let e = prepare(&o).unwrap_err();
    assert!(
        matches!(e, PrepareError::Map(MapError::ChunkSpan(5000))),
        "{e}"
    );
    let mut o = PrepareOpts::new(d.path().join("missing"), d.path().join("cache"));
    o.compress = true;
    let e = prepare(&o).unwrap_err().to_string();
    assert!(e.starts_with("cannot read image"), "{e}");
}

#[test]
fn the_sparse_stream_is_the_data_end_to_end_checked_against_the_image() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img");
    write_image(&img, true);
    let mut o = PrepareOpts::new(img.clone(), d.path().join("cache"));
    o.sparse = true;
    let p = prepare(&o).unwrap();
    let (path, state) = p.sparse.clone().unwrap();
    assert_eq!(state, CacheState::Built);
    let want: Vec<u8> = layout().into_iter().flat_map(|(_, b)| b).collect();
    assert!(
        std::fs::read(&path).unwrap() == want,
        "the stream is the data"
    );
    // Its map describes it: the gateway takes the pair.
    let map = ImageMap::decode(&std::fs::read(&p.map.0).unwrap()).unwrap();
    assert_eq!(map.wire_bytes(), want.len() as u64);
    assert_eq!(prepare(&o).unwrap().sparse.unwrap().1, CacheState::Hit);
    // One byte changed in the cached stream: found and made again.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[600_000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let again = prepare(&o).unwrap().sparse.unwrap();
    assert!(
        matches!(&again.1, CacheState::Rebuilt(why) if why.contains("differs from the image")),
        "{:?}",
        again.1
    );
    assert!(std::fs::read(&path).unwrap() == want);
}
