//! fleetcast gateway daemon.
