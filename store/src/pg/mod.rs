//! The PostgreSQL engine, for a cell of several gateways sharing one fleet (feature
//! `postgres`, issue 19). Built so far: the cell's schema (`store/pg/migrations/`) and
//! [`migrate`], which a gateway runs at start; the cell's membership, device ownership and
//! write fence ([`Membership`], [`rendezvous`]); the engine ([`PgStore`], behind
//! [`crate::Engine`]), which runs the store's own batch operations on a database
//! transaction, its device writes fenced by a cell membership when it has one
//! ([`PgStore::fenced`], [`PgStore::join_cell`]). `fleetcastd` runs it for a single gateway
//! (`store.engine = "postgres"`) or as one gateway of a cell (`[cell]`): it renews its lease
//! through [`crate::Engine::keep_lease`], claims a device on its agent's Hello
//! ([`crate::StoreBatch::claim`]) or redirects the agent to the owner, and lets operator
//! requests act on any device ([`crate::StoreBatch::operator_writes`]).
//!
//! The client is the `postgres` crate, the synchronous face of `tokio-postgres` (the
//! best-kept PostgreSQL client in Rust): each `Client` drives its connection on a small
//! runtime of its own, inside whichever thread calls it. That thread is the gateway's store
//! thread, never the `mio` event loop, so no second async runtime runs in the loop.

mod cell;
mod engine;
mod lease;
mod migrate;

pub use cell::{live_gateways, rendezvous, CellError, Claim, Membership};
pub use engine::{check_url, PgBatch, PgStore};
pub(crate) use migrate::describe;
pub use migrate::{migrate, schema_version, MigrateError, Migrated, SCHEMA_VERSION};
