//! The cell's ownership rules against a real PostgreSQL: leases, claims, redirects and the
//! fence that keeps a gateway which lost a device (or a zombie of an earlier start) from
//! writing for it.

use std::time::Duration;

use fleetcast_lab::Postgres;
use fleetcast_store::pg::{live_gateways, migrate, CellError, Claim, Membership};
use postgres::{Client, NoTls};

const LONG: Duration = Duration::from_secs(60);

fn cell() -> (Postgres, Client) {
    let pg = Postgres::start().expect("PostgreSQL (Debian package postgresql)");
    pg.create_database("cell").unwrap();
    let mut c = Client::connect(&pg.url("cell"), NoTls).unwrap();
    migrate(&mut c).unwrap();
    for d in 1..=3 {
        c.execute(
            "INSERT INTO devices (id, name, revoked, record) VALUES ($1, $2, false, '')",
            &[&(d as i64), &format!("d{d}")],
        )
        .unwrap();
    }
    (pg, c)
}

/// A write for device `dev` as `gw` would make it: fence, then the write, in one transaction.
fn fenced_write(c: &mut Client, gw: &Membership, dev: i64, ms: i64) -> Result<(), CellError> {
    let mut t = c.transaction()?;
    gw.fence(&mut t, dev)?;
    t.execute(
        "UPDATE devices SET last_seen_ms = $2 WHERE id = $1",
        &[&dev, &ms],
    )?;
    t.commit()?;
    Ok(())
}

fn last_seen(c: &mut Client, dev: i64) -> Option<i64> {
    c.query_one("SELECT last_seen_ms FROM devices WHERE id = $1", &[&dev])
        .unwrap()
        .get(0)
}

#[test]
fn one_owner_at_a_time_and_the_others_redirect() {
    let (_pg, mut c) = cell();
    let a = Membership::join(&mut c, "gw-a", "10.77.0.1:7300", LONG).unwrap();
    let b = Membership::join(&mut c, "gw-b", "10.77.0.2:7300", LONG).unwrap();
    assert_eq!((a.incarnation(), b.incarnation()), (1, 1));
    assert_eq!(a.claim(&mut c, 1).unwrap(), Claim::Owned);
    assert_eq!(
        a.claim(&mut c, 1).unwrap(),
        Claim::Owned,
        "claiming again is a no-op"
    );
    assert_eq!(
        b.claim(&mut c, 1).unwrap(),
        Claim::OwnedBy {
            gateway: "gw-a".into(),
            addr: "10.77.0.1:7300".into()
        }
    );
    fenced_write(&mut c, &a, 1, 100).unwrap();
    let e = fenced_write(&mut c, &b, 1, 200).unwrap_err();
    assert!(matches!(e, CellError::Fenced { device: 1, .. }), "{e}");
    assert_eq!(
        last_seen(&mut c, 1),
        Some(100),
        "the fenced write changed nothing"
    );
    // A device nobody claimed cannot be written for either.
    assert!(matches!(
        fenced_write(&mut c, &a, 2, 1),
        Err(CellError::Fenced { .. })
    ));
    assert!(matches!(b.claim(&mut c, 99), Err(CellError::NoDevice(99))));
    let live = live_gateways(&mut c).unwrap();
    assert_eq!(live.len(), 2);
}

#[test]
fn a_restarted_gateway_fences_out_its_zombie() {
    let (_pg, mut c) = cell();
    let old = Membership::join(&mut c, "gw-a", "10.77.0.1:7300", LONG).unwrap();
    assert_eq!(old.claim(&mut c, 1).unwrap(), Claim::Owned);
    // The same gateway starts again (the old process still running: a zombie).
    let new = Membership::join(&mut c, "gw-a", "10.77.0.1:7300", LONG).unwrap();
    assert_eq!(new.incarnation(), 2);
    assert!(matches!(
        old.renew(&mut c),
        Err(CellError::LeaseLost { incarnation: 1, .. })
    ));
    assert!(matches!(
        fenced_write(&mut c, &old, 1, 5),
        Err(CellError::Fenced { .. })
    ));
    // The device's owner (incarnation 1) is dead: the new incarnation takes it over.
    assert_eq!(new.claim(&mut c, 1).unwrap(), Claim::Owned);
    fenced_write(&mut c, &new, 1, 6).unwrap();
    assert_eq!(last_seen(&mut c, 1), Some(6));
    assert!(matches!(
        old.claim(&mut c, 1),
        Err(CellError::LeaseLost { .. })
    ));
}

#[test]
fn an_expired_lease_lets_another_gateway_claim_and_fences_the_first() {
    let (_pg, mut c) = cell();
    let short = Duration::from_millis(300);
    let a = Membership::join(&mut c, "gw-a", "10.77.0.1:7300", short).unwrap();
    let b = Membership::join(&mut c, "gw-b", "10.77.0.2:7300", LONG).unwrap();
    assert_eq!(a.claim(&mut c, 1).unwrap(), Claim::Owned);
    a.renew(&mut c).unwrap();
    // gw-a stops renewing (partitioned from the database, or hung).
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(b.claim(&mut c, 1).unwrap(), Claim::Owned, "re-homed");
    assert!(matches!(a.renew(&mut c), Err(CellError::LeaseLost { .. })));
    assert!(matches!(
        fenced_write(&mut c, &a, 1, 7),
        Err(CellError::Fenced { .. })
    ));
    fenced_write(&mut c, &b, 1, 8).unwrap();
    // A clean leave frees a gateway's devices at once.
    b.leave(&mut c).unwrap();
    let a2 = Membership::join(&mut c, "gw-a", "10.77.0.1:7300", LONG).unwrap();
    assert_eq!(a2.claim(&mut c, 1).unwrap(), Claim::Owned);
}

#[test]
fn a_claim_waits_for_the_owners_write_to_commit() {
    let (pg, mut c) = cell();
    let short = Duration::from_millis(300);
    let a = Membership::join(&mut c, "gw-a", "10.77.0.1:7300", short).unwrap();
    let b = Membership::join(&mut c, "gw-b", "10.77.0.2:7300", LONG).unwrap();
    assert_eq!(a.claim(&mut c, 1).unwrap(), Claim::Owned);
    // gw-a fences and holds its transaction open while its lease runs out.
    let mut t = c.transaction().unwrap();
    a.fence(&mut t, 1).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let url = pg.url("cell");
    let claimer = std::thread::spawn(move || {
        let mut c2 = Client::connect(&url, NoTls).unwrap();
        b.claim(&mut c2, 1).unwrap()
    });
    // The claim blocks on the device row until gw-a's write commits, then takes it.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !claimer.is_finished(),
        "the claim must wait for the fenced transaction"
    );
    t.execute("UPDATE devices SET last_seen_ms = 9 WHERE id = 1", &[])
        .unwrap();
    t.commit().unwrap();
    assert_eq!(claimer.join().unwrap(), Claim::Owned);
    assert_eq!(last_seen(&mut c, 1), Some(9));
}

#[test]
fn of_gateways_claiming_at_once_exactly_one_wins() {
    let (pg, mut c) = cell();
    let gws: Vec<Membership> = (0..6)
        .map(|i| {
            Membership::join(
                &mut c,
                &format!("gw-{i}"),
                &format!("10.77.0.{i}:7300"),
                LONG,
            )
            .unwrap()
        })
        .collect();
    let url = pg.url("cell");
    let claims: Vec<Claim> = std::thread::scope(|s| {
        let hs: Vec<_> = gws
            .iter()
            .map(|g| {
                let url = url.clone();
                s.spawn(move || {
                    g.claim(&mut Client::connect(&url, NoTls).unwrap(), 3)
                        .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        claims.iter().filter(|c| **c == Claim::Owned).count(),
        1,
        "{claims:?}"
    );
    let owner: String = c
        .query_one("SELECT owner_gw FROM devices WHERE id = 3", &[])
        .unwrap()
        .get(0);
    for cl in &claims {
        if let Claim::OwnedBy { gateway, .. } = cl {
            assert_eq!(*gateway, owner);
        }
    }
}
