//! fleetcast device agent.
