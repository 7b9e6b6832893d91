//! The engine's writes in a cell are fenced by device ownership: a gateway's batch refuses
//! operations on devices another gateway owns (the rest of the batch commits), a gateway
//! that let its lease lapse cannot write for a device re-homed since, and devices a gateway
//! enrols are its own from the start.

use std::time::Duration;

use fleetcast_lab::Postgres;
use fleetcast_store::pg::{Claim, Membership, PgStore};
use fleetcast_store::prelude::*;
use fleetcast_store::{Command, Error, OnFailure};
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
