//! Store benches: durable group-committed transitions per second, and open time.
//!
//! Every iteration is one batch of `BATCH` transitions committed with LMDB's durable commit
//! (fsync), spread round-robin over 1, 100 or 10,000 devices.
//! Run: `CARGO_TARGET_DIR=/work/targets/store cargo bench -p fleetcast-benches --bench store`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fleetcast_store::prelude::*;
use fleetcast_store::{BlockSet, DeviceId, Store, Task};

#[path = "common/store_fixtures.rs"]
mod fixtures;
use fixtures::{cmd, ok, BATCH, SIZES};

fn store_with(devices: u64) -> (tempfile::TempDir, Store, Vec<DeviceId>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = Store::open(dir.path()).expect("open");
    let mut b = s.batch().expect("batch");
    let ids = (0..devices)
        .map(|i| b.add_device(&format!("dev-{i}"), [0; 32], 0).expect("add"))
        .collect();
    b.commit().expect("commit");
    (dir, s, ids)
}

fn enqueue(c: &mut Criterion) {
    let mut g = c.benchmark_group("store/enqueue");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(BATCH));
    for n in SIZES {
        let (_dir, mut s, ids) = store_with(n);
        let mut k = 0usize;
        g.bench_function(BenchmarkId::from_parameter(n), |bch| {
            bch.iter(|| {
                let mut b = s.batch().expect("batch");
                for _ in 0..BATCH {
                    b.enqueue(ids[k % ids.len()], cmd()).expect("enqueue");
                    k += 1;
                }
                b.commit().expect("commit")
            })
        });
    }
    g.finish();
}

/// Group-commit scaling: 10,000 enqueues per commit at 10,000 devices.
fn enqueue_big_batch(c: &mut Criterion) {
    const BIG: u64 = 10_000;
    let mut g = c.benchmark_group("store/enqueue_batch10000");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(BIG));
    let (_dir, mut s, ids) = store_with(10_000);
    let mut k = 0usize;
    g.bench_function(BenchmarkId::from_parameter(10_000), |bch| {
        bch.iter(|| {
            let mut b = s.batch().expect("batch");
            for _ in 0..BIG {
                b.enqueue(ids[k % ids.len()], cmd()).expect("enqueue");
                k += 1;
            }
            b.commit().expect("commit")
        })
    });
    g.finish();
}

/// One element = enqueue + mark_transmitted + record_result (3 durable transitions).
fn round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("store/dispatch_result_next");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let per_batch = BATCH / 3;
    g.throughput(Throughput::Elements(per_batch));
    for n in SIZES {
        let (_dir, mut s, ids) = store_with(n);
        let mut k = 0usize;
        let mut now = 0;
        g.bench_function(BenchmarkId::from_parameter(n), |bch| {
            bch.iter(|| {
                let mut b = s.batch().expect("batch");
                for _ in 0..per_batch {
                    let d = ids[k % ids.len()];
                    k += 1;
                    now += 1;
                    b.enqueue(d, cmd()).expect("enqueue");
                    let (seq, _) = b.next_to_dispatch(d).expect("read").expect("next");
                    let attempt = b.mark_transmitted(d, seq, now).expect("transmit");
                    b.record_result(d, seq, attempt, ok()).expect("result");
                }
                b.commit().expect("commit")
            })
        });
    }
    g.finish();
}

fn task_table(c: &mut Criterion) {
    let mut g = c.benchmark_group("store/task_progress");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(BATCH));
    for n in SIZES {
        let (_dir, mut s, ids) = store_with(n);
        let task = Task {
            path: "/srv/image.bin".into(),
            size: 1 << 40,
            block_size: 1024,
            sha256: [0; 32],
            group: None,
            trigger: "bench".into(),
            created_ms: 0,
            then: Vec::new(),
            plan: Default::default(),
            follow: Default::default(),
            image: None,
        };
        let mut b = s.batch().expect("batch");
        let t = b.create_task(task, &ids).expect("task");
        b.commit().expect("commit");
        let mut next_block = vec![0u32; ids.len()];
        let mut k = 0usize;
        g.bench_function(BenchmarkId::from_parameter(n), |bch| {
            bch.iter(|| {
                let mut b = s.batch().expect("batch");
                for _ in 0..BATCH {
                    let i = k % ids.len();
                    k += 1;
                    let mut blocks = BlockSet::new();
                    // Every other block: the record holds many ranges, as under loss.
                    blocks.insert(next_block[i], next_block[i] + 1);
                    next_block[i] += 2;
                    if next_block[i] > 2_000 {
                        next_block[i] = 1; // fill the gaps, merging ranges
                    }
                    b.task_progress(t, ids[i], blocks).expect("progress");
                }
                b.commit().expect("commit")
            })
        });
    }
    g.finish();
}

fn open_million(c: &mut Criterion) {
    let (dir, mut s, ids) = store_with(1000);
    for chunk in 0..100 {
        let mut b = s.batch().expect("batch");
        for i in 0..10_000usize {
            b.enqueue(ids[(chunk * 10_000 + i) % ids.len()], cmd())
                .expect("enqueue");
        }
        b.commit().expect("commit");
    }
    drop(s);
    let mut g = c.benchmark_group("store/open");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.bench_function("1000000_commands", |bch| {
        bch.iter(|| {
            let s = Store::open(dir.path()).expect("open");
            // First dispatch decision after open: one queue and its next command.
            let snap = s.snapshot().expect("snapshot");
            let q = snap.queue(ids[0]).expect("queue").expect("exists");
            assert_eq!(q.next_seq, 1001);
            snap.next_to_dispatch(ids[0])
                .expect("next")
                .map(|(seq, _)| seq)
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    enqueue,
    enqueue_big_batch,
    round_trip,
    task_table,
    open_million
);
criterion_main!(benches);
