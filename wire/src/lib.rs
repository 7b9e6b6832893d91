//! fleetcast's wire format and sans-IO protocol cores.
//!
//! # The wire format
//! Every message, on the control stream and in datagrams, is one *frame*: a 12-byte
//! [`Header`] (magic, version, kind, flags, body length, CRC32) and a body. The header is a
//! zero-copy `zerocopy` view; bodies are read with a bounds-checked cursor. `docs/wire.md` is
//! the specification, with a byte diagram of every message.
//!
//! # No-panic contract
//! Nothing in this crate panics, loops without bound or allocates without bound on any input:
//! every length is checked against its limit and against the bytes remaining before it is used,
//! unknown versions, kinds and values are typed [`Error`]s, and the parsers are fuzzed
//! (`fuzz/`). The CRC check is skipped under `cfg(fuzzing)` so fuzzers reach the parsers.
//!
//! # Features
//! - `std` (default): `std::error::Error` for [`Error`]; implies `alloc`.
//! - `alloc`: the [`Message`] enum (its lists are `Vec`s), [`Deframer`], [`Ranges`], the
//!   transport ladder's HTTP protocol ([`ladder`], with `httparse`).
//! - without either: the header, data blocks ([`DataBlock`], [`data_prefix`]) and time.
//! - `arbitrary`: `arbitrary::Arbitrary` for every message (fuzzing).
//! - `fec` (default; not implied by `std`): the Reed–Solomon codec `mcast::ReedSolomon` (`reed-solomon-simd`);
//!   the `mcast::Fec` trait itself needs only `alloc`.
//! - `sim`: the seeded in-memory network simulator.
//! - `zstd`: the disk images' chunk decoder ([`image::decode_chunk`], pure-Rust `ruzstd`);
//!   the image formats themselves ([`image`]) need only `alloc`.
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod cell;
pub mod codec;
pub mod data;
pub mod error;
pub mod header;
mod msg_kind;
pub mod time;

#[cfg(feature = "alloc")]
pub mod deframer;
#[cfg(feature = "alloc")]
pub mod image;
#[cfg(feature = "alloc")]
pub mod ladder;
#[cfg(feature = "alloc")]
pub mod mcast;
#[cfg(feature = "alloc")]
pub mod msg;
#[cfg(feature = "alloc")]
pub mod ranges;
#[cfg(feature = "alloc")]
pub mod session;

#[cfg(feature = "sim")]
pub mod sim;

pub use data::{data_prefix, DataBlock, DataHeader, DATA_PREFIX_LEN};
pub use error::{Error, Result};
pub use header::{
    Frame, Header, FLAG_AUTH, HEADER_LEN, MAGIC, MAX_PRE_AUTH_BODY, MAX_STREAM_BODY, TAG_LEN,
    VERSION,
};
pub use msg_kind::Kind;
pub use time::Instant;

#[cfg(feature = "alloc")]
pub use deframer::Deframer;
#[cfg(feature = "alloc")]
pub use mcast::{McastReceiver, McastSender};
#[cfg(feature = "alloc")]
pub use msg::*;
#[cfg(feature = "alloc")]
pub use ranges::{BlockRange, Ranges};
#[cfg(feature = "alloc")]
pub use session::{
    AgentEvent, AgentSession, CloseInfo, Config as SessionConfig, FirstMessage, GatewayEvent,
    GatewaySession, Phase as SessionPhase, ReceivedFrame, SessionError, TimeoutKind,
};
