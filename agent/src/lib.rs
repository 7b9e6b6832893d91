//! fleetcast device agent.
pub mod cli;
pub mod config;
pub mod driver;
pub mod exec;
pub mod ladder;
pub mod report;
pub mod state;
pub mod tls;
pub mod transfer;
