//! fleetcast's durable state on LMDB.
