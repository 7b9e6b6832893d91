//! fleetcast gateway daemon: the `mio` event loop (`fleetcastd`), its admin interface and the
//! client side of the admin protocol ([`admin::request`], used by the operator CLI in the
//! `fleetcast-cli` crate). It links neither the agent nor the lab.
pub mod admin;
pub mod artifacts;
pub mod config;
pub mod daemon_main;
pub mod datadir;
pub mod distribution;
pub mod exit;
pub mod fleet;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod output;
pub mod paths;
pub mod pki;
pub mod ratelimit;
pub mod retention;
pub mod sd_notify;
pub mod tlsconn;
pub mod token;
pub mod watch;
