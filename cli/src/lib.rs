//! fleetcast operator CLI (`fleetcast`): the admin commands (a client of the gateway's admin
//! socket, `fleetcast_daemon::admin`), `fleetcast demo` and `fleetcast bench`.
//!
//! The one crate that links the gateway, the agent and the lab together: `demo` and `bench`
//! run both sides in a private lab network by re-executing this binary as `__gateway` and
//! `__agent`.
pub mod bench;
pub mod demo;
pub mod image;
pub mod standalone;
