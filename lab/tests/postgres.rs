//! The lab's PostgreSQL: a private cluster that starts, accepts connections on its socket,
//! keeps its data across a restart, and is gone after drop.

use fleetcast_lab::Postgres;

#[test]
fn a_private_cluster_starts_restarts_with_its_data_and_is_removed() {
    let mut pg = Postgres::start().expect("PostgreSQL (Debian package postgresql)");
    let dir = pg.socket_dir().to_path_buf();
    assert!(dir.join(format!(".s.PGSQL.{}", pg.port())).exists());
    // createdb connects through the socket: the server is up and takes connections.
    pg.create_database("cell").unwrap();
    pg.stop().unwrap();
    assert!(!dir.join(format!(".s.PGSQL.{}", pg.port())).exists());
    assert!(pg.create_database("other").is_err(), "stopped: no server");
    pg.start_server().unwrap();
    // The database made before the restart is still there.
    let again = pg.create_database("cell").unwrap_err().to_string();
    assert!(again.contains("already exists"), "{again}");
    assert!(pg.url("cell").contains(&format!("host={}", dir.display())));
    drop(pg);
    assert!(!dir.exists(), "the cluster's directory is removed");
}
