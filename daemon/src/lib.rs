//! fleetcast gateway daemon: the `mio` event loop (`fleetcastd`), its admin interface and the
//! operator CLI's client side (`fleetcast`).
pub mod admin;
pub mod artifacts;
pub mod convert;
pub mod daemon_main;
pub mod demo;
pub mod distribution;
pub mod fleet;
pub mod gateway;
pub mod http;
pub mod paths;
pub mod pki;
pub mod sniff;
pub mod tlsconn;
