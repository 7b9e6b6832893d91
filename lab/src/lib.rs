//! fleetcast's test lab.
