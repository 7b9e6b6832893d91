//! The one frame header shared by stream framing (control channel) and datagram framing
//! (multicast data, NACKs, unicast repair).
//!
//! ```text
//!  0       1       2       3       4       5       6       7       8       9      10      11
//! +-------+-------+-------+-------+-------+-------+-------+-------+-------+-------+-------+-------+
//! | magic |version| kind  | flags |       body length (u32 BE)    |         CRC32 (u32 BE)        |
//! | 0xFC  |  0x02 |       |       |                               |                               |
//! +-------+-------+-------+-------+-------+-------+-------+-------+-------+-------+-------+-------+
//! ```
//!
//! The CRC32 (IEEE, as computed by `crc32fast`) covers header bytes 0..8 followed by the whole
//! body (including an authentication tag when [`FLAG_AUTH`] is set).
//!
//! Invariants, for every input: parsing never panics, never allocates and never loops; the body
//! length is checked against the framing's limit before any byte of the body is touched.

use zerocopy::network_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Error, Result};

/// First byte of every frame.
pub const MAGIC: u8 = 0xFC;
/// The wire version this build emits and accepts. Version 2 added command attempts
/// (`Dispatch`, `Result`, `Hello.last`), the report inside a result, the pre-reboot result in
/// `RebootComplete`, the `Report` kind, per-device NACK keys (`Announce.nack_key`), numbered
/// NACKs and the `Probe` kind; version 3 the report's package manager, CPU, memory and
/// attached devices; version 4 the FEC group size in `Announce`; version 5 authentication by digest (the
/// `Announce`'s Merkle root instead of its data key, the `Manifest` kind); version 6 the image
/// target and map in `Announce` and the `Refused` outcome (docs/wire.md, "Versioning").
pub const VERSION: u8 = 6;
/// Size of [`Header`] in bytes.
pub const HEADER_LEN: usize = 12;
/// Flag: the body ends with a [`TAG_LEN`]-byte packet-authentication tag.
pub const FLAG_AUTH: u8 = 0x01;
/// Flag bits that versions 1 and 2 define; any other bit set is [`Error::ReservedFlags`].
pub const KNOWN_FLAGS: u8 = FLAG_AUTH;
/// Length of the packet-authentication tag.
pub const TAG_LEN: usize = 16;
/// Largest body of a control-stream frame (1 MiB).
pub const MAX_STREAM_BODY: u32 = 1 << 20;
/// Largest body of a control-stream frame the gateway accepts from a peer TLS did not
/// authenticate (no client certificate): such a peer may only `Enrol`, whose largest body is
/// 1,349 bytes (token 64, name 255, key 1,024, their 2-byte lengths), so buffering 1 MiB for it
/// would only serve an attacker (200 such clients took a gateway from 6 to 209 MiB).
pub const MAX_PRE_AUTH_BODY: u32 = 4096;
/// Largest body of a datagram frame (what fits a UDP/IPv4 datagram after our header).
pub const MAX_DATAGRAM_BODY: u32 = 65_507 - HEADER_LEN as u32;

/// The 12-byte frame header, a zero-copy view over network-endian bytes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Header {
    /// Always [`MAGIC`].
    pub magic: u8,
    /// Always [`VERSION`] for frames this build accepts.
    pub version: u8,
    /// Message kind, see [`crate::Kind`].
    pub kind: u8,
    /// Flag bits, see [`FLAG_AUTH`].
    pub flags: u8,
    /// Body length in bytes (not counting this header).
    pub len: U32,
    /// CRC32 of header bytes 0..8 and the body.
    pub crc: U32,
}

impl Header {
    /// Views the first [`HEADER_LEN`] bytes of `buf` as a header, after checking magic, version,
    /// flags and the body-length limit `max_body`. Does not look at the body.
    pub fn check_prefix(buf: &[u8], max_body: u32) -> Result<(&Header, &[u8])> {
        let (hdr, rest) = Header::ref_from_prefix(buf).map_err(|_| Error::Truncated)?;
        if hdr.magic != MAGIC {
            return Err(Error::BadMagic(hdr.magic));
        }
        if hdr.version != VERSION {
            return Err(Error::UnsupportedVersion(hdr.version));
        }
        if hdr.flags & !KNOWN_FLAGS != 0 {
            return Err(Error::ReservedFlags(hdr.flags));
        }
        let len = hdr.len.get();
        if len > max_body {
            return Err(Error::FrameTooLarge { len, max: max_body });
        }
        if hdr.flags & FLAG_AUTH != 0 && (len as usize) < TAG_LEN {
            return Err(Error::Truncated);
        }
        Ok((hdr, rest))
    }

    /// Body length as declared.
    pub fn body_len(&self) -> usize {
        self.len.get() as usize
    }
}

/// CRC32 over header bytes 0..8 and `body`.
pub fn frame_crc(header_prefix: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header_prefix[..8]);
    h.update(body);
    h.finalize()
}

/// One checked frame: a header and its body, both borrowed from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The header, a view into the input.
    pub header: &'a Header,
    /// The body without the authentication tag.
    pub body: &'a [u8],
    /// The authentication tag, when [`FLAG_AUTH`] is set.
    pub tag: Option<&'a [u8; TAG_LEN]>,
}

impl<'a> Frame<'a> {
    /// Parses one frame from the start of `buf` with body limit `max_body`, verifying the CRC.
    /// Returns the frame and the bytes after it.
    pub fn parse_prefix(buf: &'a [u8], max_body: u32) -> Result<(Frame<'a>, &'a [u8])> {
        let (header, rest) = Header::check_prefix(buf, max_body)?;
        let len = header.body_len();
        if rest.len() < len {
            return Err(Error::Truncated);
        }
        let (body, after) = rest.split_at(len);
        // Fuzzers cannot forge CRCs; skipping the check lets them reach the message parsers.
        if !cfg!(fuzzing) && frame_crc(&buf[..8], body) != header.crc.get() {
            return Err(Error::Checksum);
        }
        let (body, tag) = if header.flags & FLAG_AUTH != 0 {
            let (b, t) = body.split_at(len - TAG_LEN);
            (
                b,
                Some(<&[u8; TAG_LEN]>::try_from(t).map_err(|_| Error::Truncated)?),
            )
        } else {
            (body, None)
        };
        Ok((Frame { header, body, tag }, after))
    }

    /// Parses a whole datagram: exactly one frame, nothing after it.
    pub fn parse_datagram(buf: &'a [u8]) -> Result<Frame<'a>> {
        let (header, rest) = Header::check_prefix(buf, MAX_DATAGRAM_BODY)?;
        if rest.len() != header.body_len() {
            return Err(Error::LengthMismatch);
        }
        let (frame, _) = Frame::parse_prefix(buf, MAX_DATAGRAM_BODY)?;
        Ok(frame)
    }

    /// The bytes a packet-authentication tag covers: header bytes 0..8, then the body without
    /// the tag. Feed both to the MAC in this order.
    pub fn mac_input(&self) -> (&'a [u8], &'a [u8]) {
        (&self.header.as_bytes()[..8], self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, body: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[0] = MAGIC;
        out[1] = VERSION;
        out[2] = kind;
        out[3] = flags;
        out[4..8].copy_from_slice(&(body.len() as u32).to_be_bytes());
        out[12..12 + body.len()].copy_from_slice(body);
        let crc = frame_crc(&out[..8], body);
        out[8..12].copy_from_slice(&crc.to_be_bytes());
        out
    }

    #[test]
    fn header_is_twelve_bytes() {
        assert_eq!(core::mem::size_of::<Header>(), HEADER_LEN);
    }

    #[test]
    fn parses_and_checks_crc() {
        let buf = frame(3, 0, b"abcd");
        let (f, rest) = Frame::parse_prefix(&buf, 100).unwrap();
        assert_eq!(f.body, b"abcd");
        assert_eq!(f.header.kind, 3);
        assert_eq!(rest.len(), 64 - 16);
        let mut bad = buf;
        bad[13] ^= 1;
        assert_eq!(Frame::parse_prefix(&bad, 100).unwrap_err(), Error::Checksum);
    }

    #[test]
    fn rejects_bad_header_fields() {
        let buf = frame(3, 0, b"abcd");
        let mut b = buf;
        b[0] = 0;
        assert_eq!(
            Frame::parse_prefix(&b, 100).unwrap_err(),
            Error::BadMagic(0)
        );
        let mut b = buf;
        b[1] = 9;
        assert_eq!(
            Frame::parse_prefix(&b, 100).unwrap_err(),
            Error::UnsupportedVersion(9)
        );
        let mut b = buf;
        b[3] = 0x80;
        assert_eq!(
            Frame::parse_prefix(&b, 100).unwrap_err(),
            Error::ReservedFlags(0x80)
        );
        assert_eq!(
            Frame::parse_prefix(&buf, 3).unwrap_err(),
            Error::FrameTooLarge { len: 4, max: 3 }
        );
        assert_eq!(
            Frame::parse_prefix(&buf[..15], 100).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            Frame::parse_prefix(&buf[..5], 100).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            Frame::parse_datagram(&buf[..17]).unwrap_err(),
            Error::LengthMismatch
        );
        assert!(Frame::parse_datagram(&buf[..16]).is_ok());
    }

    #[test]
    fn auth_tag_is_split_off() {
        let body: [u8; 20] = core::array::from_fn(|i| i as u8);
        let buf = frame(3, FLAG_AUTH, &body);
        let f = Frame::parse_datagram(&buf[..32]).unwrap();
        assert_eq!(f.body, &body[..4]);
        assert_eq!(f.tag.unwrap(), &body[4..]);
        let (hdr, b) = f.mac_input();
        assert_eq!(hdr, &buf[..8]);
        assert_eq!(b, &body[..4]);
        // A tag flag on a body shorter than a tag is truncated, not a panic.
        let short = frame(3, FLAG_AUTH, b"abc");
        assert_eq!(
            Frame::parse_datagram(&short[..15]).unwrap_err(),
            Error::Truncated
        );
    }
}
