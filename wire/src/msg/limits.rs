//! Field limits of wire version 3. A field over its limit is [`crate::Error::FieldTooLong`]
//! on both parse and emit.

/// Device names, hostnames, versions, OS and kernel strings, package names.
pub const MAX_NAME: usize = 255;
/// Paths, URLs, one argv element.
pub const MAX_PATH: usize = 4096;
/// Elements of one `exec` argv.
pub const MAX_ARGV: usize = 256;
/// Component steps of one operation.
pub const MAX_STEPS: usize = 64;
/// Bytes of command output carried in a result (an excerpt: the tail of the output).
pub const MAX_OUTPUT: usize = 4096;
/// Bytes of an inline `write` step's contents (larger files go by `fetch` or multicast).
pub const MAX_WRITE: usize = 256 * 1024;
/// Addresses in a configuration report.
pub const MAX_ADDRESSES: usize = 64;
/// Installed packages in a configuration report.
pub const MAX_SOFTWARE: usize = 16_384;
/// Attached devices in a configuration report (disks, interfaces, USB devices, serial ports).
pub const MAX_DEVICES: usize = 256;
/// Credential reference in a hello (a certificate fingerprint).
pub const MAX_CREDENTIAL: usize = 64;
/// One-time enrolment token.
pub const MAX_TOKEN: usize = 64;
/// An agent's SubjectPublicKeyInfo (DER).
pub const MAX_SPKI: usize = 1024;
/// An issued certificate (DER).
pub const MAX_CERT: usize = 8192;
/// Bytes of an encoded image map in an `Announce` (version 6): the frame's 1 MiB less room
/// for the rest. About 61,000 sparse extents, or 17,000 compressed chunks (17 GiB of data
/// at the default 1 MiB chunk span); a map larger than that needs a larger chunk span, or
/// the image goes raw.
pub const MAX_IMAGE_MAP: usize = 960 * 1024;
/// Human-readable reasons (close, failed transfer).
pub const MAX_REASON: usize = 256;
