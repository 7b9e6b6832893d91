//! fleetcast device agent.
pub mod exec;
pub mod report;
pub mod state;
pub mod tls;
