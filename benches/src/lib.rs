//! fleetcast benchmark support.
//!
//! [`scale`] is the at-scale load harness behind `loadgen` and `tests/scale.rs`.

pub mod scale;
