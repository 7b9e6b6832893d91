//! fleetcast gateway daemon.
pub mod pki;
