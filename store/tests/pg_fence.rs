//! The engine's writes in a cell are fenced by device ownership: a gateway's batch refuses
//! operations on devices another gateway owns (the rest of the batch commits), a gateway
//! that let its lease lapse cannot write for a device re-homed since, and devices a gateway
//! enrols are its own from the start.

use std::time::Duration;

use fleetcast_lab::Postgres;
use fleetcast_store::pg::{Claim, Membership, PgStore};
use fleetcast_store::prelude::*;
use fleetcast_store::{Claimed, Command, DeviceId, Error, Lease, OnFailure};
use fleetcast_wire::Step;
use postgres::{Client, NoTls};

fn exec() -> Command {
    Command {
        target: None,
        steps: vec![Step::Exec {
            argv: vec!["true".into()],
        }],
        timeout_ms: 1000,
        max_attempts: 1,
        on_failure: OnFailure::Stop,
    }
}

#[test]
fn writes_are_fenced_by_ownership_and_survive_a_lapsed_lease_only_where_owned() {
    let pg = Postgres::start().expect("PostgreSQL (Debian package postgresql)");
    pg.create_database("cell").unwrap();
    let url = pg.url("cell");
    let (store_a, _) = PgStore::connect(&url, None).unwrap();
    let (store_b, _) = PgStore::connect(&url, None).unwrap();
    let mut ca = Client::connect(&url, NoTls).unwrap();
    let mut cb = Client::connect(&url, NoTls).unwrap();
    let a = Membership::join(
        &mut ca,
        "gw-a",
        "10.77.0.1:7300",
        Duration::from_millis(400),
    )
    .unwrap();
    let b = Membership::join(&mut cb, "gw-b", "10.77.0.2:7300", Duration::from_secs(60)).unwrap();
    let mut store_a = store_a.fenced(a.clone());
    let mut store_b = store_b.fenced(b.clone());

    // gw-a adds a device: it is gw-a's.
    let mut batch = store_a.batch().unwrap();
    let d1 = batch.add_device("d1", [1; 32], 0).unwrap();
    batch.enqueue(d1, exec()).unwrap();
    batch.commit().unwrap();

    // gw-b cannot queue for it; its other work in the same batch commits.
    let mut batch = store_b.batch().unwrap();
    let e = batch.enqueue(d1, exec()).unwrap_err();
    assert!(matches!(e, Error::NotOwner(d) if d == d1), "{e}");
    let d2 = batch.add_device("d2", [2; 32], 0).unwrap();
    batch.enqueue(d2, exec()).unwrap();
    assert_eq!(batch.commit().unwrap().operations, 2);
    let mut batch = store_a.batch().unwrap();
    assert!(matches!(batch.enqueue(d2, exec()), Err(Error::NotOwner(_))));
    drop(batch);

    // gw-a stops renewing; once its lease lapsed gw-b re-homes d1 and queues for it.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(b.claim(&mut cb, d1.0 as i64).unwrap(), Claim::Owned);
    let mut batch = store_b.batch().unwrap();
    batch.enqueue(d1, exec()).unwrap();
    batch.commit().unwrap();

    // gw-a, back from its stall (a zombie of its lease), is fenced out of d1.
    let mut batch = store_a.batch().unwrap();
    assert!(matches!(batch.enqueue(d1, exec()), Err(Error::NotOwner(_))));
    assert!(batch.commit().unwrap().operations == 0);
    assert!(a.renew(&mut ca).is_err(), "its lease is gone");

    // d1 holds gw-a's command from when it owned it, and gw-b's: nothing else.
    let s = store_b.snapshot().unwrap();
    assert_eq!(s.commands(d1, 0, 10).unwrap().len(), 2);
    assert_eq!(s.commands(d2, 0, 10).unwrap().len(), 1);
}

/// A store from `connect` (its lease renewed on a thread of its own) joined to the cell.
fn join(url: &str, id: &str, addr: &str, lease: Duration) -> PgStore {
    let (store, _) = PgStore::connect(url, None).unwrap();
    store.join_cell(id, addr, lease).unwrap()
}

#[test]
fn a_batch_claims_a_device_names_its_live_owner_and_a_lapsed_lease_rejoins() {
    let pg = Postgres::start().expect("PostgreSQL (Debian package postgresql)");
    pg.create_database("cell").unwrap();
    let url = pg.url("cell");
    let mut b = join(&url, "gw-b", "10.77.0.2:7300", Duration::from_secs(60));
    // gw-a is made from a client: it renews its lease in keep_lease on that client, so a
    // stall of the gateway is a stall of its lease (a store from `connect` renews on a
    // thread of its own: the next test).
    let client = Client::connect(&url, NoTls).unwrap();
    let mut a = PgStore::new(client)
        .join_cell("gw-a", "10.77.0.1:7300", Duration::from_millis(500))
        .unwrap();

    let mut batch = a.batch().unwrap();
    let d1 = batch.add_device("d1", [1; 32], 0).unwrap();
    let d3 = batch.add_device("d3", [3; 32], 0).unwrap();
    assert_eq!(batch.claim(d1).unwrap(), Claimed::Ours);
    batch.commit().unwrap();

    // gw-b is told where d1 lives, and its batch goes on.
    let mut batch = b.batch().unwrap();
    assert_eq!(
        batch.claim(d1).unwrap(),
        Claimed::Elsewhere {
            gateway: "gw-a".into(),
            addr: "10.77.0.1:7300".into()
        }
    );
    let e = batch.claim(DeviceId(999)).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    let d2 = batch.add_device("d2", [2; 32], 0).unwrap();
    batch.commit().unwrap();

    // An operator request through gw-b queues for d1, serialized with gw-a and not refused;
    // the rest of gw-b's batch stays fenced, and gw-a hears which device changed.
    let mut batch = b.batch().unwrap();
    batch.operator_writes(true);
    batch.enqueue(d1, exec()).unwrap();
    batch.operator_writes(false);
    assert!(matches!(batch.enqueue(d1, exec()), Err(Error::NotOwner(_))));
    batch.commit().unwrap();
    // Heard on gw-a's connection as it next talks to the database (its renewal, a batch).
    let heard = (0..50)
        .find_map(|_| {
            assert_eq!(a.keep_lease().unwrap(), Lease::Held);
            let d = a.changed_elsewhere();
            if d.is_empty() {
                std::thread::sleep(Duration::from_millis(20));
                None
            } else {
                Some(d)
            }
        })
        .expect("gw-a is told");
    assert_eq!(heard, vec![d1]);
    assert_eq!(a.snapshot().unwrap().commands(d1, 0, 10).unwrap().len(), 1);

    // gw-a keeps its lease while it renews it.
    for _ in 0..4 {
        assert_eq!(a.keep_lease().unwrap(), Lease::Held);
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut batch = b.batch().unwrap();
    assert!(matches!(
        batch.claim(d1).unwrap(),
        Claimed::Elsewhere { .. }
    ));
    drop(batch);

    // gw-a stalls past its lease: gw-b takes d1; gw-a's claim is refused as a lapsed lease
    // until its next renewal joins the cell again, as incarnation 2 owning nothing.
    std::thread::sleep(Duration::from_millis(700));
    let mut batch = b.batch().unwrap();
    assert_eq!(batch.claim(d1).unwrap(), Claimed::Ours);
    batch.commit().unwrap();
    let mut batch = a.batch().unwrap();
    let e = batch.claim(d3).unwrap_err();
    assert!(matches!(e, Error::LeaseLost { incarnation: 1 }), "{e}");
    assert!(matches!(
        batch.claim(d2).unwrap(),
        Claimed::Elsewhere { .. }
    ));
    drop(batch);
    assert_eq!(a.keep_lease().unwrap(), Lease::Rejoined { incarnation: 2 });
    let mut batch = a.batch().unwrap();
    assert!(
        matches!(batch.claim(d1).unwrap(), Claimed::Elsewhere { gateway, .. } if gateway == "gw-b")
    );
    assert!(matches!(batch.enqueue(d1, exec()), Err(Error::NotOwner(_))));
    drop(batch);

    // gw-b leaves cleanly: gw-a may claim its devices at once.
    b.leave_cell().unwrap();
    let mut batch = a.batch().unwrap();
    assert_eq!(batch.claim(d1).unwrap(), Claimed::Ours);
    assert_eq!(batch.claim(d2).unwrap(), Claimed::Ours);
    assert_eq!(batch.claim(d3).unwrap(), Claimed::Ours);
    batch.enqueue(d2, exec()).unwrap();
    batch.commit().unwrap();
}

#[test]
fn a_lease_kept_on_its_own_thread_outlives_a_stalled_gateway_and_lapses_without_the_database() {
    let mut pg = Postgres::start().expect("PostgreSQL (Debian package postgresql)");
    pg.create_database("cell").unwrap();
    let url = pg.url("cell");
    let mut a = join(&url, "gw-a", "10.77.0.1:7300", Duration::from_millis(600));
    let mut b = join(&url, "gw-b", "10.77.0.2:7300", Duration::from_secs(60));
    let mut batch = a.batch().unwrap();
    let d1 = batch.add_device("d1", [1; 32], 0).unwrap();
    assert_eq!(batch.claim(d1).unwrap(), Claimed::Ours);
    batch.commit().unwrap();

    // gw-a's loop does nothing for three leases: its thread renewed meanwhile.
    std::thread::sleep(Duration::from_millis(1800));
    let mut batch = b.batch().unwrap();
    assert!(
        matches!(batch.claim(d1).unwrap(), Claimed::Elsewhere { gateway, .. } if gateway == "gw-a")
    );
    drop(batch);
    assert_eq!(a.keep_lease().unwrap(), Lease::Held);
    let mut batch = a.batch().unwrap();
    batch.enqueue(d1, exec()).unwrap();
    batch.commit().unwrap();

    // An idle gateway still hears of an operator's write elsewhere: its renewals are on
    // another connection, so keep_lease asks on the batch connection.
    let mut batch = b.batch().unwrap();
    batch.operator_writes(true);
    batch.enqueue(d1, exec()).unwrap();
    batch.commit().unwrap();
    let heard = (0..50).find_map(|_| {
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(a.keep_lease().unwrap(), Lease::Held);
        Some(a.changed_elsewhere()).filter(|d| !d.is_empty())
    });
    assert_eq!(heard, Some(vec![d1]), "gw-a is told");

    // The database goes away for longer than a lease: gw-a hears its lease lapsed (by its
    // own clock), and refuses to claim; once the database is back it joins again.
    pg.stop().unwrap();
    let lapsed = (0..40).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        a.keep_lease().ok() == Some(Lease::Lapsed)
    });
    assert!(lapsed, "gw-a hears its lease lapsed");
    pg.start_server().unwrap();
    let rejoined = (0..100).find_map(|_| {
        std::thread::sleep(Duration::from_millis(100));
        match a.keep_lease() {
            Ok(Lease::Rejoined { incarnation }) => Some(incarnation),
            _ => None,
        }
    });
    assert_eq!(rejoined, Some(2), "gw-a joins again as a new incarnation");
}
