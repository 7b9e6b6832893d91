//! fleetcast device agent.
pub mod tls;
