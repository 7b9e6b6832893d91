//! fleetcast benchmark support.
