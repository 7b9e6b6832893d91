//! Block ranges: the compact "missing blocks" payload of a NACK, and the received-block record
//! of a transfer.
//!
//! Invariant of [`Ranges`]: ranges are non-empty, sorted, disjoint and non-adjacent (adjacent
//! ranges are merged), and every range ends at or before `u32::MAX`. So a set of blocks has
//! exactly one representation and one encoding.

use alloc::vec::Vec;

use crate::codec::{Reader, Sink};
use crate::error::{Error, Result};

/// Blocks `start .. start + len`, `len >= 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockRange {
    /// First block.
    pub start: u32,
    /// Number of blocks (at least 1).
    pub len: u32,
}

impl BlockRange {
    /// One past the last block.
    pub fn end(&self) -> u64 {
        u64::from(self.start) + u64::from(self.len)
    }
}

/// A canonical set of block ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Ranges(Vec<BlockRange>);

/// Most ranges one NACK may carry (its encoding stays well under one datagram).
pub const MAX_NACK_RANGES: usize = 4096;

impl Ranges {
    /// The empty set.
    pub fn new() -> Self {
        Ranges(Vec::new())
    }

    /// The ranges, in order.
    pub fn as_slice(&self) -> &[BlockRange] {
        &self.0
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Total number of blocks.
    pub fn blocks(&self) -> u64 {
        self.0.iter().map(|r| u64::from(r.len)).sum()
    }

    /// Adds blocks `start .. start + len` after every range already present (ranges must be
    /// pushed in increasing order); merges with the last range when adjacent.
    pub fn push(&mut self, start: u32, len: u32) -> Result<()> {
        if len == 0 || u64::from(start) + u64::from(len) > u64::from(u32::MAX) {
            return Err(Error::InvalidValue);
        }
        match self.0.last_mut() {
            Some(last) if u64::from(start) < last.end() => Err(Error::InvalidValue),
            Some(last) if u64::from(start) == last.end() => {
                last.len = last.len.checked_add(len).ok_or(Error::InvalidValue)?;
                Ok(())
            }
            _ => {
                self.0.push(BlockRange { start, len });
                Ok(())
            }
        }
    }

    /// Whether `block` is in the set.
    pub fn contains(&self, block: u32) -> bool {
        let i = self.0.partition_point(|r| r.end() <= u64::from(block));
        self.0.get(i).is_some_and(|r| r.start <= block)
    }

    /// Encodes as: `u16` count, then per range `varint(gap)` `varint(len - 1)`, where `gap` is
    /// the distance from the end of the previous range (from 0 for the first range).
    pub(crate) fn encode<S: Sink>(&self, s: &mut S, max: usize) -> Result<()> {
        s.count(self.0.len(), max)?;
        self.encode_items(s)
    }

    pub(crate) fn decode(r: &mut Reader<'_>, max: usize) -> Result<Ranges> {
        let n = r.count(max, 2)?;
        Self::decode_items(r, n)
    }

    /// Encodes the received-block record of a transfer (kept by the agent in its `.rec` file):
    /// a `u32` count, then the ranges as in a NACK. A record holds a whole file's ranges, far
    /// more than one NACK may carry (a file of `u32::MAX` blocks has fewer than 2³¹ ranges,
    /// none adjacent), hence the wider count and no limit but the input's own length.
    pub fn encode_record<S: Sink>(&self, s: &mut S) -> Result<()> {
        s.u32(u32::try_from(self.0.len()).map_err(|_| Error::FieldTooLong)?)?;
        self.encode_items(s)
    }

    /// Decodes [`Ranges::encode_record`]'s encoding. The count is checked against the bytes
    /// remaining (each range takes at least two) before anything is allocated.
    pub fn decode_record(r: &mut Reader<'_>) -> Result<Ranges> {
        let n = r.u32()? as usize;
        if n.saturating_mul(2) > r.remaining() {
            return Err(Error::Truncated);
        }
        Self::decode_items(r, n)
    }

    fn encode_items<S: Sink>(&self, s: &mut S) -> Result<()> {
        let mut prev_end = 0u64;
        for r in &self.0 {
            let gap = u64::from(r.start) - prev_end;
            s.varint(u32::try_from(gap).map_err(|_| Error::InvalidValue)?)?;
            s.varint(r.len - 1)?;
            prev_end = r.end();
        }
        Ok(())
    }

    /// `n` ranges, already checked to fit the input.
    fn decode_items(r: &mut Reader<'_>, n: usize) -> Result<Ranges> {
        let mut out = Ranges(Vec::with_capacity(n));
        let mut prev_end = 0u64;
        for i in 0..n {
            let gap = u64::from(r.varint()?);
            let len = r.varint()?.checked_add(1).ok_or(Error::InvalidValue)?;
            if i > 0 && gap == 0 {
                // Adjacent to the previous range: not canonical.
                return Err(Error::InvalidValue);
            }
            let start = u32::try_from(prev_end + gap).map_err(|_| Error::InvalidValue)?;
            out.push(start, len)?;
            prev_end = out.0[out.0.len() - 1].end();
        }
        Ok(out)
    }
}

#[cfg(any(test, feature = "arbitrary"))]
impl<'a> arbitrary::Arbitrary<'a> for Ranges {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let n = u.int_in_range(0..=32)?;
        let mut out = Ranges::new();
        let mut next = 0u32;
        for i in 0..n {
            let gap = u32::from(u.arbitrary::<u16>()?) + u32::from(i > 0);
            let len = u32::from(u.arbitrary::<u16>()?) + 1;
            let Some(start) = next.checked_add(gap) else {
                break;
            };
            if out.push(start, len).is_err() {
                break;
            }
            next = start + len;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Counter, SliceWriter};

    #[test]
    fn push_merges_and_rejects_disorder() {
        let mut r = Ranges::new();
        r.push(5, 2).unwrap();
        r.push(7, 3).unwrap();
        assert_eq!(r.as_slice(), &[BlockRange { start: 5, len: 5 }]);
        assert_eq!(r.push(9, 1), Err(Error::InvalidValue));
        assert_eq!(r.push(20, 0), Err(Error::InvalidValue));
        assert_eq!(r.push(u32::MAX, 1), Err(Error::InvalidValue));
        r.push(100, 1).unwrap();
        assert!(r.contains(5) && r.contains(9) && r.contains(100));
        assert!(!r.contains(4) && !r.contains(10) && !r.contains(101));
        assert_eq!(r.blocks(), 6);
    }

    #[test]
    fn encoding_is_compact_and_round_trips() {
        let mut r = Ranges::new();
        r.push(1000, 1).unwrap();
        r.push(1002, 40).unwrap();
        let mut buf = [0u8; 32];
        let mut w = SliceWriter::new(&mut buf);
        r.encode(&mut w, 16).unwrap();
        let n = w.position();
        // count(2) + varint(1000)=2 + varint(0)=1 + varint(1)=1 + varint(39)=1
        assert_eq!(&buf[..n], &[0, 2, 0xe8, 0x07, 0x00, 0x01, 0x27]);
        let mut c = Counter::default();
        r.encode(&mut c, 16).unwrap();
        assert_eq!(c.0, n);
        let mut rd = Reader::new(&buf[..n]);
        assert_eq!(Ranges::decode(&mut rd, 16).unwrap(), r);
    }

    #[test]
    fn decode_rejects_non_canonical_and_overflow() {
        // Second range adjacent to the first (gap 0).
        let mut rd = Reader::new(&[0, 2, 0, 0, 0, 0]);
        assert_eq!(Ranges::decode(&mut rd, 16), Err(Error::InvalidValue));
        // A range running past u32::MAX.
        let mut rd = Reader::new(&[0, 1, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x05]);
        assert_eq!(Ranges::decode(&mut rd, 16), Err(Error::InvalidValue));
    }

    #[test]
    fn record_encoding_has_a_wide_count_and_round_trips() {
        let mut r = Ranges::new();
        for i in 0..70_000u32 {
            // More ranges than a u16 count holds: a record is a whole file's.
            r.push(i * 3, 2).unwrap();
        }
        let mut c = Counter::default();
        r.encode_record(&mut c).unwrap();
        let mut buf = vec![0u8; c.0];
        let mut w = SliceWriter::new(&mut buf);
        r.encode_record(&mut w).unwrap();
        assert_eq!(w.position(), c.0);
        assert_eq!(&buf[..4], &70_000u32.to_be_bytes());
        let mut rd = Reader::new(&buf);
        assert_eq!(Ranges::decode_record(&mut rd).unwrap(), r);
        rd.finish().unwrap();

        // The same items as a NACK's: count(1), varint(5), varint(1).
        let mut one = Ranges::new();
        one.push(5, 2).unwrap();
        let mut buf = [0u8; 8];
        let mut w = SliceWriter::new(&mut buf);
        one.encode_record(&mut w).unwrap();
        let n = w.position();
        assert_eq!(&buf[..n], &[0, 0, 0, 1, 5, 1]);
        // A count the input cannot hold is refused before allocating; so is a gap of 0.
        let mut rd = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0, 0]);
        assert_eq!(Ranges::decode_record(&mut rd), Err(Error::Truncated));
        let mut rd = Reader::new(&[0, 0, 0, 2, 0, 0, 0, 0]);
        assert_eq!(Ranges::decode_record(&mut rd), Err(Error::InvalidValue));
    }
}
