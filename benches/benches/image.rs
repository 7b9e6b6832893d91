//! Disk-image micro-benchmarks: one 1 MiB chunk decoded by the agent's pure-Rust decoder
//! (`fleetcast_wire::image::decode_chunk`, ruzstd) beside libzstd's (the `zstd` crate, the
//! gateway's), compressed at the gateway's default level, and the sparse scanner over the
//! same bytes and over zeros. The chunk is the first MiB of this benchmark's own executable:
//! machine code and tables, what most of an OS image's data is.
//!
//! `cargo bench -p fleetcast-benches --bench image`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fleetcast_wire::image::{decode_chunk, ChunkEntry, SparseScanner};

const CHUNK: usize = 1 << 20;

fn chunk() -> Vec<u8> {
    let exe = std::env::current_exe().expect("own executable");
    let mut b = std::fs::read(exe).expect("read own executable");
    b.truncate(CHUNK);
    b.resize(CHUNK, 0);
    b
}

fn decode(c: &mut Criterion) {
    let data = chunk();
    let frame = zstd::bulk::compress(&data, 3).expect("compress");
    let entry = ChunkEntry {
        image_offset: 0,
        image_len: CHUNK as u32,
        comp_offset: 0,
        comp_len: frame.len() as u32,
        sha256: [0; 32],
    };
    eprintln!(
        "chunk: {CHUNK} bytes, {} compressed at level 3 (ratio {:.2})",
        frame.len(),
        CHUNK as f64 / frame.len() as f64
    );
    let mut g = c.benchmark_group("image_chunk_1MiB");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let mut out = Vec::with_capacity(CHUNK);
    g.bench_function("decode_ruzstd", |b| {
        b.iter(|| {
            decode_chunk(&entry, black_box(&frame), &mut out).unwrap();
            black_box(out.len())
        })
    });
    let mut d = zstd::bulk::Decompressor::new().unwrap();
    let mut buf = vec![0u8; CHUNK];
    g.bench_function("decode_libzstd", |b| {
        b.iter(|| black_box(d.decompress_to_buffer(black_box(&frame), &mut buf).unwrap()))
    });
    let mut z = zstd::bulk::Compressor::new(3).unwrap();
    g.bench_function("compress_libzstd_level3", |b| {
        b.iter(|| black_box(z.compress(black_box(&data)).unwrap().len()))
    });
    g.bench_function("sparse_scan_data", |b| {
        b.iter(|| {
            let mut s = SparseScanner::new(4096).unwrap();
            s.feed(black_box(&data));
            black_box(s.finish().len())
        })
    });
    let zeros = vec![0u8; CHUNK];
    g.bench_function("sparse_scan_zeros", |b| {
        b.iter(|| {
            let mut s = SparseScanner::new(4096).unwrap();
            s.feed(black_box(&zeros));
            black_box(s.finish().len())
        })
    });
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
