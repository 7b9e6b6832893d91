//! The store's batches on PostgreSQL: durable group-committed transitions per second, the
//! same operations and shapes as `store.rs` measures on LMDB, on a private server with its
//! default durability (`fsync` on; `fleetcast_lab::Postgres::start_durable`) over its Unix
//! socket, one connection (as one gateway's store thread has).
//!
//! `store_pg/cell_round_trips` runs the round trips of a cell: 1 or 3 gateways, each a
//! store joined to one cell (fenced by its lease; the lease renewed on its own thread) with
//! its own 1,000 devices, each on its own connection and thread (as each gateway's store
//! thread), all at once; the figure is the cell's total.
//!
//! Run: `CARGO_TARGET_DIR=/work/targets/store cargo bench -p fleetcast-benches --bench store_pg`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fleetcast_lab::Postgres;
use fleetcast_store::pg::PgStore;
use fleetcast_store::prelude::*;
use fleetcast_store::DeviceId;

#[path = "common/store_fixtures.rs"]
mod fixtures;
use fixtures::{cmd, ok, BATCH, SIZES};

fn store_with(pg: &Postgres, db: &str, devices: u64) -> (PgStore, Vec<DeviceId>) {
    pg.create_database(db).expect("createdb");
    let (mut s, _) = PgStore::connect(&pg.url(db), None).expect("connect");
    let mut b = s.batch().expect("batch");
    let ids = (0..devices)
        .map(|i| b.add_device(&format!("dev-{i}"), [0; 32], 0).expect("add"))
        .collect();
    b.commit().expect("commit");
    (s, ids)
}

fn enqueue(c: &mut Criterion) {
    let pg = Postgres::start_durable().expect("PostgreSQL (Debian package postgresql)");
    let mut g = c.benchmark_group("store_pg/enqueue");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(BATCH));
    for n in SIZES {
        let (mut s, ids) = store_with(&pg, &format!("enqueue{n}"), n);
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

/// One element = enqueue + mark_transmitted + record_result (3 durable transitions).
fn round_trip(c: &mut Criterion) {
    let pg = Postgres::start_durable().expect("PostgreSQL (Debian package postgresql)");
    let mut g = c.benchmark_group("store_pg/dispatch_result_next");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    let per_batch = BATCH / 3;
    g.throughput(Throughput::Elements(per_batch));
    for n in SIZES {
        let (mut s, ids) = store_with(&pg, &format!("round{n}"), n);
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

/// One batch of `per_batch` command round trips on `ids` (enqueue, dispatch, result).
fn round_trips(s: &mut PgStore, ids: &[DeviceId], k: &mut usize, per_batch: u64) {
    let mut b = s.batch().expect("batch");
    for _ in 0..per_batch {
        let d = ids[*k % ids.len()];
        *k += 1;
        b.enqueue(d, cmd()).expect("enqueue");
        let (seq, _) = b.next_to_dispatch(d).expect("read").expect("next");
        let attempt = b.mark_transmitted(d, seq, *k as u64).expect("transmit");
        b.record_result(d, seq, attempt, ok()).expect("result");
    }
    b.commit().expect("commit");
}

/// The cell's round trips per second with 1 and 3 gateways (one element: one round trip).
fn cell(c: &mut Criterion) {
    const DEVICES: u64 = 1000;
    let pg = Postgres::start_durable().expect("PostgreSQL (Debian package postgresql)");
    let mut g = c.benchmark_group("store_pg/cell_round_trips");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    let per_batch = BATCH / 3;
    for gateways in [1usize, 3] {
        let db = format!("cell{gateways}");
        pg.create_database(&db).expect("createdb");
        let mut stores: Vec<(PgStore, Vec<DeviceId>, usize)> = (0..gateways)
            .map(|i| {
                let (s, _) = PgStore::connect(&pg.url(&db), None).expect("connect");
                let mut s = s
                    .join_cell(
                        &format!("gw-{i}"),
                        &format!("192.0.2.{}:7300", i + 1),
                        Duration::from_secs(5),
                    )
                    .expect("join the cell");
                // Devices made by a fenced batch are its gateway's from the start.
                let mut b = s.batch().expect("batch");
                let ids = (0..DEVICES)
                    .map(|d| {
                        b.add_device(&format!("gw{i}-dev-{d}"), [0; 32], 0)
                            .expect("add")
                    })
                    .collect();
                b.commit().expect("commit");
                (s, ids, 0)
            })
            .collect();
        g.throughput(Throughput::Elements(per_batch * gateways as u64));
        g.bench_function(BenchmarkId::from_parameter(gateways), |bch| {
            bch.iter_custom(|iters| {
                #[allow(clippy::disallowed_methods)] // The bench's wall clock.
                let t = Instant::now();
                std::thread::scope(|sc| {
                    for (s, ids, k) in stores.iter_mut() {
                        sc.spawn(move || {
                            for _ in 0..iters {
                                round_trips(s, ids, k, per_batch);
                            }
                        });
                    }
                });
                t.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, enqueue, round_trip, cell);
criterion_main!(benches);
