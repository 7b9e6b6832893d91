//! fleetcast's wire format and sans-IO protocol cores.
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod time;

#[cfg(feature = "sim")]
pub mod sim;

pub use time::Instant;
