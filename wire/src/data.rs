//! Data blocks: the hot path. A `Data` (multicast) or `Repair` (unicast) datagram is the
//! frame header, an 8-byte [`DataHeader`], then the payload (then a tag when authenticated):
//!
//! ```text
//!  0..12   frame header (kind 0x21 Data or 0x23 Repair)
//! 12..16   session (u32 BE)
//! 16..20   block index (u32 BE)
//! 20..     payload (block_size bytes; the last block of a file may be shorter)
//! [16-byte tag when FLAG_AUTH]
//! ```
//!
//! This module needs no allocator: the sender builds the 20-byte prefix with
//! [`data_prefix`] and hands the payload to the kernel straight from the file's pages (the CRC
//! reads them; nothing copies them), and the receiver parses with [`DataBlock::parse`].

use zerocopy::network_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Error, Result};
use crate::header::{Frame, Header, FLAG_AUTH, HEADER_LEN, MAGIC, TAG_LEN, VERSION};
use crate::msg_kind::Kind;

/// The data-block sub-header.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct DataHeader {
    /// The multicast session.
    pub session: U32,
    /// Block index within the file.
    pub block: U32,
}

/// Bytes before the payload: frame header plus [`DataHeader`].
pub const DATA_PREFIX_LEN: usize = HEADER_LEN + core::mem::size_of::<DataHeader>();

/// A parsed data or repair block, borrowing its payload from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct DataBlock<'a> {
    /// The multicast session.
    pub session: u32,
    /// Block index.
    pub block: u32,
    /// The block's bytes.
    pub payload: &'a [u8],
}

impl<'a> DataBlock<'a> {
    /// Parses a frame body (tag already split off by [`Frame`]).
    pub fn parse_body(body: &'a [u8]) -> Result<Self> {
        let (h, payload) = DataHeader::ref_from_prefix(body).map_err(|_| Error::Truncated)?;
        Ok(DataBlock {
            session: h.session.get(),
            block: h.block.get(),
            payload,
        })
    }

    /// Parses a whole datagram that must be a `Data` or `Repair` frame. Returns the kind, the
    /// block and the frame (for tag verification).
    pub fn parse(datagram: &'a [u8]) -> Result<(Kind, DataBlock<'a>, Frame<'a>)> {
        let frame = Frame::parse_datagram(datagram)?;
        let kind = match frame.header.kind {
            k if k == Kind::Data as u8 => Kind::Data,
            k if k == Kind::Repair as u8 => Kind::Repair,
            k => return Err(Error::UnknownKind(k)),
        };
        Ok((kind, DataBlock::parse_body(frame.body)?, frame))
    }
}

/// Builds the 20-byte prefix of a data or repair datagram whose payload (and optional tag)
/// follow in separate buffers, computing the CRC over all of them without copying any.
///
/// `kind` must be [`Kind::Data`] or [`Kind::Repair`]; the payload plus tag must fit a datagram.
pub fn data_prefix(
    kind: Kind,
    session: u32,
    block: u32,
    payload: &[u8],
    tag: Option<&[u8; TAG_LEN]>,
) -> Result<[u8; DATA_PREFIX_LEN]> {
    if !matches!(kind, Kind::Data | Kind::Repair) {
        return Err(Error::InvalidValue);
    }
    let body_len = core::mem::size_of::<DataHeader>() + payload.len() + tag.map_or(0, |t| t.len());
    if body_len > crate::header::MAX_DATAGRAM_BODY as usize {
        return Err(Error::FieldTooLong);
    }
    let mut out = [0u8; DATA_PREFIX_LEN];
    let header = Header {
        magic: MAGIC,
        version: VERSION,
        kind: kind as u8,
        flags: if tag.is_some() { FLAG_AUTH } else { 0 },
        len: U32::new(body_len as u32),
        crc: U32::ZERO,
    };
    out[..HEADER_LEN].copy_from_slice(header.as_bytes());
    let dh = DataHeader {
        session: U32::new(session),
        block: U32::new(block),
    };
    out[HEADER_LEN..].copy_from_slice(dh.as_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[..8]);
    h.update(&out[HEADER_LEN..]);
    h.update(payload);
    if let Some(t) = tag {
        h.update(t);
    }
    out[8..12].copy_from_slice(&h.finalize().to_be_bytes());
    Ok(out)
}

/// The bytes a data block's tag covers, for a sender that has not built the prefix yet:
/// header bytes 0..8 (with the final length and flags), then the body without the tag. Feed
/// `mac(prefix[..8])`, `mac(prefix[12..])`, `mac(payload)` in that order; see
/// [`Frame::mac_input`] for the receiver's side.
pub fn data_mac_prefix(
    kind: Kind,
    session: u32,
    block: u32,
    payload_len: usize,
) -> [u8; DATA_PREFIX_LEN] {
    let body_len = core::mem::size_of::<DataHeader>() + payload_len + TAG_LEN;
    let mut out = [0u8; DATA_PREFIX_LEN];
    out[0] = MAGIC;
    out[1] = VERSION;
    out[2] = kind as u8;
    out[3] = FLAG_AUTH;
    out[4..8].copy_from_slice(&(body_len as u32).to_be_bytes());
    out[12..16].copy_from_slice(&session.to_be_bytes());
    out[16..20].copy_from_slice(&block.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_parse_agree_without_copying_payload_in() {
        let payload: [u8; 100] = core::array::from_fn(|i| i as u8);
        let prefix = data_prefix(Kind::Data, 7, 42, &payload, None).unwrap();
        let mut dgram = [0u8; DATA_PREFIX_LEN + 100];
        dgram[..DATA_PREFIX_LEN].copy_from_slice(&prefix);
        dgram[DATA_PREFIX_LEN..].copy_from_slice(&payload);
        let (kind, b, f) = DataBlock::parse(&dgram).unwrap();
        assert_eq!(kind, Kind::Data);
        assert_eq!((b.session, b.block, b.payload), (7, 42, &payload[..]));
        assert!(f.tag.is_none());
        dgram[50] ^= 0x40;
        assert_eq!(DataBlock::parse(&dgram).unwrap_err(), Error::Checksum);
    }

    #[test]
    fn tagged_block_round_trips() {
        let payload = [9u8; 33];
        let tag = [0xAA; TAG_LEN];
        let prefix = data_prefix(Kind::Repair, 1, 2, &payload, Some(&tag)).unwrap();
        let mut dgram = [0u8; DATA_PREFIX_LEN + 33 + TAG_LEN];
        dgram[..DATA_PREFIX_LEN].copy_from_slice(&prefix);
        dgram[DATA_PREFIX_LEN..DATA_PREFIX_LEN + 33].copy_from_slice(&payload);
        dgram[DATA_PREFIX_LEN + 33..].copy_from_slice(&tag);
        let (kind, b, f) = DataBlock::parse(&dgram).unwrap();
        assert_eq!(kind, Kind::Repair);
        assert_eq!(b.payload, &payload);
        assert_eq!(f.tag, Some(&tag));
        // The sender's MAC input matches the receiver's.
        let mp = data_mac_prefix(Kind::Repair, 1, 2, 33);
        let (h8, body) = f.mac_input();
        assert_eq!(h8, &mp[..8]);
        assert_eq!(&body[..8], &mp[12..]);
        assert_eq!(&body[8..], &payload);
    }

    #[test]
    fn rejects_other_kinds_and_short_bodies() {
        assert_eq!(
            data_prefix(Kind::Hello, 0, 0, &[], None),
            Err(Error::InvalidValue)
        );
        let big = [0u8; 70_000];
        assert_eq!(
            data_prefix(Kind::Data, 0, 0, &big, None),
            Err(Error::FieldTooLong)
        );
        assert_eq!(DataBlock::parse_body(&[0; 7]), Err(Error::Truncated));
    }
}
