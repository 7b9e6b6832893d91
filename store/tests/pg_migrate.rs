//! The cell schema against a real PostgreSQL (fleetcast_lab::Postgres): applied once, the
//! same on every later start, refused when newer, safe when gateways start together.

use fleetcast_lab::Postgres;
use fleetcast_store::pg::{migrate, schema_version, MigrateError, Migrated, SCHEMA_VERSION};
use postgres::{Client, NoTls};

fn server() -> Postgres {
    Postgres::start().expect("PostgreSQL (Debian package postgresql)")
}

fn connect(pg: &Postgres, db: &str) -> Client {
    Client::connect(&pg.url(db), NoTls).expect("connect")
}

#[test]
fn a_new_database_gets_the_schema_once() {
    let pg = server();
    pg.create_database("cell").unwrap();
    let mut c = connect(&pg, "cell");
    assert_eq!(schema_version(&mut c).unwrap(), 0);
    let m = migrate(&mut c).unwrap();
    assert_eq!(
        m,
        Migrated {
            from: 0,
            to: SCHEMA_VERSION
        }
    );
    let mut tables: Vec<String> = c
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    tables.sort();
    let want = [
        "commands",
        "counters",
        "devices",
        "enrolment_tokens",
        "events",
        "fleetcast_schema",
        "gateways",
        "group_members",
        "queues",
        "results",
        "task_devices",
        "tasks",
    ];
    assert_eq!(tables, want);
    // A second start changes nothing.
    let again = migrate(&mut c).unwrap();
    assert_eq!(
        again,
        Migrated {
            from: SCHEMA_VERSION,
            to: SCHEMA_VERSION
        }
    );
    let rows: i64 = c
        .query_one("SELECT count(*) FROM fleetcast_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, i64::from(SCHEMA_VERSION));
    // The fence columns hold together: an owner without an incarnation is refused.
    c.batch_execute(
        "INSERT INTO gateways VALUES ('gw1', 1, now(), '10.0.0.1:7300');
         INSERT INTO devices (id, name, revoked, record, owner_gw, owner_inc)
         VALUES (1, 'd1', false, '', 'gw1', 1)",
    )
    .unwrap();
    let e = c
        .batch_execute(
            "INSERT INTO devices (id, name, revoked, record, owner_gw)
             VALUES (2, 'd2', false, '', 'gw1')",
        )
        .unwrap_err();
    let msg = e.as_db_error().map(|d| d.message().to_string());
    assert!(
        msg.as_deref()
            .is_some_and(|m| m.contains("check constraint")),
        "{msg:?}"
    );
}

#[test]
fn a_newer_schema_is_refused_untouched() {
    let pg = server();
    pg.create_database("cell").unwrap();
    let mut c = connect(&pg, "cell");
    migrate(&mut c).unwrap();
    let newer = SCHEMA_VERSION as i32 + 1;
    c.execute(
        "INSERT INTO fleetcast_schema (version, name) VALUES ($1, 'from the future')",
        &[&newer],
    )
    .unwrap();
    let e = migrate(&mut c).unwrap_err();
    match e {
        MigrateError::TooNew { found, known } => {
            assert_eq!((found, known), (newer as u32, SCHEMA_VERSION));
        }
        e => panic!("{e}"),
    }
    let msg = migrate(&mut c).unwrap_err().to_string();
    assert!(msg.contains("newer than this fleetcastd knows"), "{msg}");
    assert_eq!(schema_version(&mut c).unwrap(), newer as u32);
}

#[test]
fn gateways_starting_together_apply_it_once() {
    let pg = server();
    pg.create_database("cell").unwrap();
    let url = pg.url("cell");
    let results: Vec<Migrated> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                s.spawn(move || migrate(&mut Client::connect(&url, NoTls).unwrap()).unwrap())
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    // One of them applied it; the others, waiting on the lock, found it applied.
    assert_eq!(
        results.iter().filter(|m| m.from == 0).count(),
        1,
        "{results:?}"
    );
    assert!(results.iter().all(|m| m.to == SCHEMA_VERSION));
    let mut c = connect(&pg, "cell");
    let rows: i64 = c
        .query_one("SELECT count(*) FROM fleetcast_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, i64::from(SCHEMA_VERSION));
}
