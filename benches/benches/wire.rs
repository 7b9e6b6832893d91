//! Wire-format micro-benchmarks: data-block header parse, data-block prefix emit (CRC over the
//! payload), control message parse/emit, the deframer, and CRC32 over a block, each beside its
//! ceiling measured in the same run (a `memcpy` of the same bytes).
//!
//! `cargo bench -p fleetcast-benches --bench wire`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fleetcast_wire::msg::samples;
use fleetcast_wire::{data_prefix, DataBlock, Deframer, Frame, Kind, Message, DATA_PREFIX_LEN};

/// Block sizes: a 1500-byte-MTU payload and a 9000-byte (jumbo) payload.
const BLOCKS: [usize; 2] = [1400, 8900];

fn datagram(payload_len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 31) as u8).collect();
    let prefix = data_prefix(Kind::Data, 7, 12345, &payload, None).unwrap();
    let mut d = prefix.to_vec();
    d.extend_from_slice(&payload);
    d
}

fn data_block(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_block");
    let d = datagram(1400);
    // Header only: the zero-copy view, magic/version/flags/length checks, sub-header.
    g.bench_function("parse_header_1400", |b| {
        b.iter(|| {
            let (hdr, rest) =
                fleetcast_wire::Header::check_prefix(black_box(&d), u32::MAX).unwrap();
            let blk = DataBlock::parse_body(&rest[..hdr.body_len()]).unwrap();
            black_box((blk.session, blk.block))
        })
    });
    for n in BLOCKS {
        let d = datagram(n);
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_function(format!("parse_with_crc_{n}"), |b| {
            b.iter(|| black_box(DataBlock::parse(black_box(&d)).unwrap().1.block))
        });
        let payload = d[DATA_PREFIX_LEN..].to_vec();
        g.bench_function(format!("emit_prefix_with_crc_{n}"), |b| {
            b.iter(|| black_box(data_prefix(Kind::Data, 7, 1, black_box(&payload), None).unwrap()))
        });
        g.bench_function(format!("crc32_{n}"), |b| {
            b.iter(|| black_box(crc32fast::hash(black_box(&payload))))
        });
        let mut dst = vec![0u8; n];
        g.bench_function(format!("ceiling_memcpy_{n}"), |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&payload));
                black_box(&dst);
            })
        });
    }
    g.finish();
}

fn control(c: &mut Criterion) {
    let mut g = c.benchmark_group("control");
    let all = samples::all();
    let dispatch = all
        .iter()
        .find(|m| m.kind() == Kind::Dispatch)
        .unwrap()
        .clone();
    let mut bytes = Vec::new();
    dispatch.emit_to_vec(&mut bytes).unwrap();
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("dispatch_parse", |b| {
        b.iter(|| {
            let (f, _) = Frame::parse_prefix(black_box(&bytes), u32::MAX).unwrap();
            black_box(Message::parse(&f).unwrap());
        })
    });
    let mut out = vec![0u8; bytes.len()];
    g.bench_function("dispatch_emit", |b| {
        b.iter(|| black_box(dispatch.emit(&mut out).unwrap()))
    });

    // A stream of every kind, pushed in 1 KiB chunks, as a TLS record stream would be.
    let mut stream = Vec::new();
    for _ in 0..64 {
        for m in &all {
            m.emit_to_vec(&mut stream).unwrap();
        }
    }
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("deframe_and_parse_1k_chunks", |b| {
        b.iter_batched_ref(
            Deframer::default,
            |d| {
                let mut n = 0usize;
                for chunk in stream.chunks(1024) {
                    d.push(chunk).unwrap();
                    while let Some(f) = d.next_frame() {
                        black_box(Message::parse(&f.unwrap()).unwrap());
                        n += 1;
                    }
                }
                n
            },
            BatchSize::SmallInput,
        )
    });
    let mut dst = vec![0u8; stream.len()];
    g.bench_function("ceiling_memcpy_stream", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&stream));
            black_box(&dst);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = data_block, control
}
criterion_main!(benches);
