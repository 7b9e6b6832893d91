//! The wire layer's one error type: small, `Copy`, no allocation, hand-written `Display`.

use core::fmt;

/// Why bytes could not be parsed, or a message could not be emitted.
///
/// Every variant is a property of the bytes (or of the value being emitted), never of I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The input ended before a declared field or length did.
    Truncated,
    /// The first byte is not [`crate::MAGIC`]: this is not a fleetcast frame.
    BadMagic(u8),
    /// The frame's version is not one this build speaks.
    UnsupportedVersion(u8),
    /// The message kind byte names no message of this version.
    UnknownKind(u8),
    /// A flag bit that this version reserves is set.
    ReservedFlags(u8),
    /// The header declares a body longer than the limit for this framing.
    FrameTooLarge {
        /// Declared body length.
        len: u32,
        /// Largest body accepted.
        max: u32,
    },
    /// A datagram's length differs from the length its header declares.
    LengthMismatch,
    /// The CRC32 over the frame does not match.
    Checksum,
    /// A string field is not valid UTF-8.
    Utf8,
    /// A field holds a value this version does not define (an enum discriminant, a presence
    /// byte other than 0 or 1, an address family, an empty or overlapping NACK range).
    InvalidValue,
    /// A field (string, byte string, list) is longer than its documented limit.
    FieldTooLong,
    /// The body has bytes left over after the message ended.
    TrailingBytes,
    /// The output buffer is too small for the message; see `buffer_len`.
    BufferTooSmall,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Truncated => f.write_str("truncated: input ends inside a field"),
            Error::BadMagic(b) => write!(f, "bad magic byte {b:#04x}: not a fleetcast frame"),
            Error::UnsupportedVersion(v) => write!(f, "unsupported wire version {v}"),
            Error::UnknownKind(k) => write!(f, "unknown message kind {k:#04x}"),
            Error::ReservedFlags(fl) => write!(f, "reserved flag bits set: {fl:#04x}"),
            Error::FrameTooLarge { len, max } => {
                write!(f, "frame body of {len} bytes exceeds the limit of {max}")
            }
            Error::LengthMismatch => f.write_str("datagram length differs from header length"),
            Error::Checksum => f.write_str("CRC32 mismatch"),
            Error::Utf8 => f.write_str("string field is not valid UTF-8"),
            Error::InvalidValue => f.write_str("field holds an undefined value"),
            Error::FieldTooLong => f.write_str("field exceeds its length limit"),
            Error::TrailingBytes => f.write_str("trailing bytes after the message"),
            Error::BufferTooSmall => f.write_str("output buffer too small"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

/// Result with the wire [`Error`].
pub type Result<T> = core::result::Result<T, Error>;
