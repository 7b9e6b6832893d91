//! Hand-written, versioned binary encoding of the store's records.
//!
//! Every record value starts with one version byte ([`VERSION`]). Integers are little-endian
//! fixed width; strings and byte strings are a `u32` length followed by the bytes; sequences
//! are a `u32` count followed by the items. Keys are *not* encoded here: they are big-endian
//! composites built in `keys` so that LMDB's lexicographic order is numeric order.
//!
//! No-panic contract: [`Reader`] checks every length against the remaining input and decoding
//! returns `Error::Corrupt` on truncated, oversized or trailing bytes, unknown enum tags and
//! invalid UTF-8. No decoder indexes a slice without a bound check, and no allocation is sized
//! from an unchecked length (a count is first checked against the bytes left).

use crate::error::{Error, Result};

/// Current record encoding version.
pub(crate) const VERSION: u8 = 1;

/// Appends encoded fields to a caller-owned buffer.
#[derive(Debug)]
pub(crate) struct Writer<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    /// Clears `buf` and writes the version byte.
    pub(crate) fn new(buf: &'a mut Vec<u8>) -> Self {
        buf.clear();
        buf.push(VERSION);
        Writer { buf }
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    pub(crate) fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            None => self.u8(0),
            Some(x) => {
                self.u8(1);
                self.u64(x);
            }
        }
    }
    pub(crate) fn len(&mut self, n: usize) {
        // Lengths are bounded far below 4 GiB by LMDB's value size; saturate defensively.
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.buf.extend_from_slice(b);
    }
    pub(crate) fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    pub(crate) fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
}

/// Bounds-checked cursor over an encoded record.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    table: &'static str,
}

impl<'a> Reader<'a> {
    /// Checks the version byte. `table` names the table in `Corrupt` errors.
    pub(crate) fn new(buf: &'a [u8], table: &'static str) -> Result<Self> {
        let mut r = Reader { buf, table };
        match r.u8()? {
            VERSION => Ok(r),
            _ => Err(r.corrupt("unknown record version")),
        }
    }
    pub(crate) fn corrupt(&self, reason: &'static str) -> Error {
        Error::Corrupt {
            table: self.table,
            reason,
        }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(self.corrupt("truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.corrupt("bad bool")),
        }
    }
    pub(crate) fn opt_u64(&mut self) -> Result<Option<u64>> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            _ => Err(self.corrupt("bad option tag")),
        }
    }
    /// A sequence count, checked so that `count * min_item` bytes remain.
    pub(crate) fn count(&mut self, min_item: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item.max(1)) > self.buf.len() {
            return Err(self.corrupt("count exceeds record"));
        }
        Ok(n)
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub(crate) fn string(&mut self) -> Result<String> {
        let b = self.bytes()?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(self.corrupt("invalid utf-8")),
        }
    }
    pub(crate) fn strings(&mut self) -> Result<Vec<String>> {
        let n = self.count(4)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.string()?);
        }
        Ok(v)
    }
    /// Whether every byte has been read (for fields added at the end of a record).
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// Fails unless the whole record was consumed.
    pub(crate) fn finish(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.corrupt("trailing bytes"))
        }
    }
}

/// A record type with a versioned encoding.
pub(crate) trait Record: Sized {
    /// Table name used in `Corrupt` errors.
    const TABLE: &'static str;
    /// Writes the fields (after the version byte).
    fn encode_fields(&self, w: &mut Writer<'_>);
    /// Reads the fields (after the version byte).
    fn decode_fields(r: &mut Reader<'_>) -> Result<Self>;

    fn encode(&self, buf: &mut Vec<u8>) {
        let mut w = Writer::new(buf);
        self.encode_fields(&mut w);
    }
    fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf, Self::TABLE)?;
        let v = Self::decode_fields(&mut r)?;
        r.finish()?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_rejects_truncation_and_garbage() {
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        w.str("hello");
        w.u64(7);
        for cut in 0..buf.len() {
            let mut r = match Reader::new(&buf[..cut], "t") {
                Ok(r) => r,
                Err(_) => continue,
            };
            let ok = r.string().and_then(|_| r.u64());
            assert!(ok.is_err(), "cut {cut} decoded");
        }
        let mut r = Reader::new(&[VERSION, 0xff, 0xff, 0xff, 0xff], "t").unwrap();
        assert!(r.count(1).is_err());
        assert!(Reader::new(&[VERSION + 1], "t").is_err());
        assert!(Reader::new(&[], "t").is_err());
    }
}
