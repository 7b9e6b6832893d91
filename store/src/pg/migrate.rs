//! The schema's migrations: applied in order, each once, all that a start needs in one
//! transaction, at most one gateway at a time.
//!
//! Rules:
//! - `fleetcast_schema` lists the versions applied. A database whose highest version is
//!   above [`SCHEMA_VERSION`] was written by a newer fleetcastd: [`migrate`] refuses it
//!   ([`MigrateError::TooNew`]) and changes nothing, since this binary cannot know what the
//!   newer schema means.
//! - Everything runs in one transaction holding an advisory lock: DDL is transactional in
//!   PostgreSQL, so a failed migration leaves the database as it was, and gateways of a cell
//!   started together wait for one another instead of applying a migration twice.

use postgres::{Client, Transaction};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// The migrations, in order: (version, name, SQL).
const MIGRATIONS: &[(u32, &str, &str)] =
    &[(1, "cell", include_str!("../../pg/migrations/0001_cell.sql"))];

/// The advisory lock key serialising migrations (`fleetcast` in ASCII, as a number).
const LOCK_KEY: i64 = 0x666c_6565_7463_6173;

/// What [`migrate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The version found (0: an empty database).
    pub from: u32,
    /// The version now.
    pub to: u32,
}

/// Why the schema could not be brought to [`SCHEMA_VERSION`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The database's schema is newer than this build knows.
    #[error(
        "the database's fleetcast schema is version {found}, newer than this fleetcastd knows \
         ({known}): run the fleetcastd that wrote it, or a newer one"
    )]
    TooNew {
        /// The version found.
        found: u32,
        /// [`SCHEMA_VERSION`].
        known: u32,
    },
    /// Migration `version` (`name`) failed; nothing was applied.
    #[error("schema migration {version} ({name}) failed, nothing applied: {}", describe(.source))]
    Failed {
        /// Its version.
        version: u32,
        /// Its name.
        name: &'static str,
        /// What PostgreSQL said.
        source: postgres::Error,
    },
    /// The connection string does not parse, or asks for what is not built.
    #[error("store.url: {0}")]
    BadUrl(String),
    /// The database could not be reached or read.
    #[error("PostgreSQL: {}", describe(.0))]
    Database(#[from] postgres::Error),
}

/// The server's own message where it gave one (`postgres::Error` alone says "db error").
pub(crate) fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{}: {} ({d})", db.severity(), db.message()),
            None => format!("{}: {}", db.severity(), db.message()),
        },
        None => e.to_string(),
    }
}

/// Brings the schema to [`SCHEMA_VERSION`].
pub fn migrate(client: &mut Client) -> Result<Migrated, MigrateError> {
    apply(client, MIGRATIONS)
}

/// The highest version applied (0 for a database fleetcast never used).
pub fn schema_version(client: &mut Client) -> Result<u32, MigrateError> {
    let mut t = client.transaction()?;
    let v = current(&mut t)?;
    t.commit()?;
    Ok(v)
}

fn current(t: &mut Transaction<'_>) -> Result<u32, postgres::Error> {
    let exists: bool = t
        .query_one("SELECT to_regclass('fleetcast_schema') IS NOT NULL", &[])?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: i32 = t
        .query_one(
            "SELECT coalesce(max(version), 0) FROM fleetcast_schema",
            &[],
        )?
        .get(0);
    Ok(v as u32)
}

fn apply(
    client: &mut Client,
    migrations: &[(u32, &'static str, &str)],
) -> Result<Migrated, MigrateError> {
    let known = migrations.last().map_or(0, |m| m.0);
    let mut t = client.transaction()?;
    t.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])?;
    t.batch_execute(
        "CREATE TABLE IF NOT EXISTS fleetcast_schema (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )?;
    let from = current(&mut t)?;
    if from > known {
        return Err(MigrateError::TooNew { found: from, known });
    }
    for &(version, name, sql) in migrations.iter().filter(|m| m.0 > from) {
        t.batch_execute(sql)
            .map_err(|source| MigrateError::Failed {
                version,
                name,
                source,
            })?;
        t.execute(
            "INSERT INTO fleetcast_schema (version, name) VALUES ($1, $2)",
            &[&(version as i32), &name],
        )?;
    }
    t.commit()?;
    Ok(Migrated {
        from,
        to: known.max(from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_lab::Postgres;

    #[test]
    fn a_failing_migration_applies_nothing_and_says_which() {
        let pg = Postgres::start().expect("PostgreSQL (Debian package postgresql)");
        pg.create_database("broken").unwrap();
        let mut c = Client::connect(&pg.url("broken"), postgres::NoTls).unwrap();
        let good = "CREATE TABLE first_table (x integer)";
        let bad = "CREATE TABLE second_table (x no_such_type)";
        let e = apply(&mut c, &[(1, "first", good), (2, "second", bad)]).unwrap_err();
        assert!(
            matches!(
                e,
                MigrateError::Failed {
                    version: 2,
                    name: "second",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("no_such_type"), "{e}");
        // Not even the first one, nor the version table's rows, stayed.
        assert_eq!(schema_version(&mut c).unwrap(), 0);
        let t: bool = c
            .query_one("SELECT to_regclass('first_table') IS NOT NULL", &[])
            .unwrap()
            .get(0);
        assert!(!t, "migration 1 was rolled back with 2");
        // Fixed, it goes through from the start.
        let fixed = "CREATE TABLE second_table (x integer)";
        let m = apply(&mut c, &[(1, "first", good), (2, "second", fixed)]).unwrap();
        assert_eq!(m, Migrated { from: 0, to: 2 });
    }
}
