//! Field-level encoding shared by every message: a bounds-checked [`Reader`] for parsing and a
//! [`Sink`] for emitting, implemented both by a counter (for `buffer_len`) and by a slice
//! writer (for `emit`), so a message's length and its bytes come from one piece of code.
//!
//! Encodings (all integers network byte order):
//! - `u8`, `u16`, `u32`, `u64`, `i32`: fixed width.
//! - `str16` / `bytes16`: `u16` length, then that many bytes (strings UTF-8).
//! - `bytes32`: `u32` length, then that many bytes.
//! - `option<T>`: one presence byte, 0 (absent) or 1 (present, then `T`).
//! - `list<T>`: `u16` count, then the items.
//! - `varint`: unsigned LEB128, at most 5 bytes for a `u32`.
//! - `varint64`: unsigned LEB128, at most 10 bytes for a `u64`.
//!
//! Every length and count is checked against both its documented limit and the bytes remaining
//! *before* anything is allocated, so no input can make the parser allocate more than a small
//! multiple of the input's own size.

use crate::error::{Error, Result};

/// A cursor over borrowed input. Every read checks bounds first.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails with [`Error::TrailingBytes`] unless all input was consumed.
    pub fn finish(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::TrailingBytes)
        }
    }

    /// Takes the next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Takes everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.buf)
    }

    /// Takes a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let b = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// Reads a `u8`.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    /// Reads a network-order `u16`.
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    /// Reads a network-order `u32`.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    /// Reads a network-order `u64`.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    /// Reads a network-order `i32`.
    pub fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    /// Reads a presence byte: `false` for 0, `true` for 1, [`Error::InvalidValue`] otherwise.
    pub fn present(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Error::InvalidValue),
        }
    }

    /// Reads `bytes16` of at most `max` bytes.
    pub fn bytes16(&mut self, max: usize) -> Result<&'a [u8]> {
        let n = usize::from(self.u16()?);
        if n > max {
            return Err(Error::FieldTooLong);
        }
        self.take(n)
    }

    /// Reads `bytes32` of at most `max` bytes.
    pub fn bytes32(&mut self, max: usize) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(Error::FieldTooLong);
        }
        self.take(n)
    }

    /// Reads `str16` of at most `max` bytes.
    pub fn str16(&mut self, max: usize) -> Result<&'a str> {
        core::str::from_utf8(self.bytes16(max)?).map_err(|_| Error::Utf8)
    }

    /// Reads a list count of at most `max` items each at least `min_item` bytes long, checking
    /// that the remaining input could hold them before anyone allocates for them.
    pub fn count(&mut self, max: usize, min_item: usize) -> Result<usize> {
        let n = usize::from(self.u16()?);
        if n > max {
            return Err(Error::FieldTooLong);
        }
        if n.saturating_mul(min_item) > self.remaining() {
            return Err(Error::Truncated);
        }
        Ok(n)
    }

    /// Reads an unsigned LEB128 `u32` (at most 5 bytes, no overflow, canonical last byte).
    pub fn varint(&mut self) -> Result<u32> {
        let mut value: u32 = 0;
        for i in 0..5 {
            let b = self.u8()?;
            let part = u32::from(b & 0x7f);
            if i == 4 && (b & 0x70) != 0 {
                return Err(Error::InvalidValue);
            }
            value |= part << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    // Non-canonical: a trailing zero group. Rejected so every value has
                    // exactly one encoding and emit→parse→emit is the identity.
                    return Err(Error::InvalidValue);
                }
                return Ok(value);
            }
        }
        Err(Error::InvalidValue)
    }

    /// Reads an unsigned LEB128 `u64` (at most 10 bytes, no overflow, canonical last byte).
    pub fn varint64(&mut self) -> Result<u64> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            // The tenth group holds bit 63 only.
            if i == 9 && (b & 0x7e) != 0 {
                return Err(Error::InvalidValue);
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    // Non-canonical trailing zero group, as for `varint`.
                    return Err(Error::InvalidValue);
                }
                return Ok(value);
            }
        }
        Err(Error::InvalidValue)
    }
}

/// Where an encoder writes: a [`Counter`] or a [`SliceWriter`].
pub trait Sink {
    /// Appends bytes.
    fn put(&mut self, bytes: &[u8]) -> Result<()>;

    /// Appends a `u8`.
    fn u8(&mut self, v: u8) -> Result<()> {
        self.put(&[v])
    }
    /// Appends a network-order `u16`.
    fn u16(&mut self, v: u16) -> Result<()> {
        self.put(&v.to_be_bytes())
    }
    /// Appends a network-order `u32`.
    fn u32(&mut self, v: u32) -> Result<()> {
        self.put(&v.to_be_bytes())
    }
    /// Appends a network-order `u64`.
    fn u64(&mut self, v: u64) -> Result<()> {
        self.put(&v.to_be_bytes())
    }
    /// Appends a network-order `i32`.
    fn i32(&mut self, v: i32) -> Result<()> {
        self.put(&v.to_be_bytes())
    }
    /// Appends a presence byte.
    fn present(&mut self, p: bool) -> Result<()> {
        self.u8(u8::from(p))
    }
    /// Appends `bytes16`, refusing more than `max` bytes.
    fn bytes16(&mut self, b: &[u8], max: usize) -> Result<()> {
        if b.len() > max || b.len() > usize::from(u16::MAX) {
            return Err(Error::FieldTooLong);
        }
        self.u16(b.len() as u16)?;
        self.put(b)
    }
    /// Appends `bytes32`, refusing more than `max` bytes.
    fn bytes32(&mut self, b: &[u8], max: usize) -> Result<()> {
        if b.len() > max || b.len() > u32::MAX as usize {
            return Err(Error::FieldTooLong);
        }
        self.u32(b.len() as u32)?;
        self.put(b)
    }
    /// Appends `str16`, refusing more than `max` bytes.
    fn str16(&mut self, s: &str, max: usize) -> Result<()> {
        self.bytes16(s.as_bytes(), max)
    }
    /// Appends a list count, refusing more than `max` items.
    fn count(&mut self, n: usize, max: usize) -> Result<()> {
        if n > max || n > usize::from(u16::MAX) {
            return Err(Error::FieldTooLong);
        }
        self.u16(n as u16)
    }
    /// Appends an unsigned LEB128 `u32`.
    fn varint(&mut self, mut v: u32) -> Result<()> {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                return self.u8(b);
            }
            self.u8(b | 0x80)?;
        }
    }
    /// Appends an unsigned LEB128 `u64`.
    fn varint64(&mut self, mut v: u64) -> Result<()> {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                return self.u8(b);
            }
            self.u8(b | 0x80)?;
        }
    }
}

/// A [`Sink`] that only counts bytes.
#[derive(Debug, Default)]
pub struct Counter(pub usize);

impl Sink for Counter {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.0 += bytes.len();
        Ok(())
    }
}

/// A [`Sink`] writing into a caller-owned slice.
#[derive(Debug)]
pub struct SliceWriter<'b> {
    buf: &'b mut [u8],
    pos: usize,
}

impl<'b> SliceWriter<'b> {
    /// A writer at the start of `buf`.
    pub fn new(buf: &'b mut [u8]) -> Self {
        SliceWriter { buf, pos: 0 }
    }
    /// Bytes written so far.
    pub fn position(&self) -> usize {
        self.pos
    }
}

impl Sink for SliceWriter<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        let end = self
            .pos
            .checked_add(bytes.len())
            .ok_or(Error::BufferTooSmall)?;
        let dst = self
            .buf
            .get_mut(self.pos..end)
            .ok_or(Error::BufferTooSmall)?;
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trips_and_rejects_overlong() {
        for v in [0u32, 1, 127, 128, 300, 16_383, 16_384, u32::MAX] {
            let mut buf = [0u8; 8];
            let mut w = SliceWriter::new(&mut buf);
            w.varint(v).unwrap();
            let n = w.position();
            let mut c = Counter::default();
            c.varint(v).unwrap();
            assert_eq!(c.0, n);
            let mut r = Reader::new(&buf[..n]);
            assert_eq!(r.varint().unwrap(), v);
            r.finish().unwrap();
        }
        assert_eq!(
            Reader::new(&[0x80, 0x00]).varint(),
            Err(Error::InvalidValue)
        );
        assert_eq!(Reader::new(&[0xff; 5]).varint(), Err(Error::InvalidValue));
        assert_eq!(
            Reader::new(&[0xff, 0xff, 0xff, 0xff, 0x1f]).varint(),
            Err(Error::InvalidValue)
        );
        assert_eq!(Reader::new(&[0x80]).varint(), Err(Error::Truncated));
    }

    #[test]
    fn varint64_round_trips_and_rejects_overlong() {
        for v in [
            0u64,
            1,
            127,
            128,
            0x1000,
            u64::from(u32::MAX) + 1,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut buf = [0u8; 12];
            let mut w = SliceWriter::new(&mut buf);
            w.varint64(v).unwrap();
            let n = w.position();
            let mut c = Counter::default();
            c.varint64(v).unwrap();
            assert_eq!(c.0, n);
            assert!(n <= 10);
            let mut r = Reader::new(&buf[..n]);
            assert_eq!(r.varint64().unwrap(), v);
            r.finish().unwrap();
        }
        assert_eq!(
            Reader::new(&[0x80, 0x00]).varint64(),
            Err(Error::InvalidValue)
        );
        assert_eq!(
            Reader::new(&[0xff; 11]).varint64(),
            Err(Error::InvalidValue)
        );
        // Bit 64 and above.
        let mut over = [0xff; 10];
        over[9] = 0x02;
        assert_eq!(Reader::new(&over).varint64(), Err(Error::InvalidValue));
        assert_eq!(Reader::new(&[0x80]).varint64(), Err(Error::Truncated));
    }

    #[test]
    fn count_checks_remaining_before_allocation() {
        // Claims 1000 items of at least 4 bytes with 6 bytes left.
        let mut r = Reader::new(&[0x03, 0xe8, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.count(5000, 4), Err(Error::Truncated));
        let mut r = Reader::new(&[0x03, 0xe8]);
        assert_eq!(r.count(10, 0), Err(Error::FieldTooLong));
    }

    #[test]
    fn slice_writer_refuses_overflow() {
        let mut buf = [0u8; 3];
        let mut w = SliceWriter::new(&mut buf);
        assert_eq!(w.u32(1), Err(Error::BufferTooSmall));
        w.u16(0xabcd).unwrap();
        assert_eq!(buf, [0xab, 0xcd, 0]);
    }
}
