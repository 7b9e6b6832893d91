//! fleetcast gateway daemon: the `mio` event loop (`fleetcastd`), its admin interface and the
//! operator CLI's client side (`fleetcast`).
pub mod admin;
pub mod artifacts;
pub mod bench;
pub mod config;
pub mod convert;
pub mod daemon_main;
pub mod datadir;
pub mod demo;
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
pub mod watch;
