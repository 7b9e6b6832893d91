//! Hand-written, versioned binary encoding of the store's records.
//!
//! Every record value starts with one version byte ([`VERSION`]). Integers are little-endian
//! fixed width; strings and byte strings are a `u32` length followed by the bytes; sequences
//! are a `u32` count followed by the items. A wire value a record keeps (a step, a result, a
//! configuration report) is embedded as a byte string holding its wire encoding
//! ([`fleetcast_wire::Embed`]): one encoding per value, the wire's. Keys are *not* encoded
//! here: they are big-endian composites built in `keys` so that LMDB's lexicographic order is
//! numeric order.
//!
//! Versions: format 1 kept steps, results and reports in store-only layouts; format 2 embeds
//! the wire values; format 3 (this build) adds the time a device's report came to the device
//! record (a format-2 device record reads with that time unknown; every other record reads
//! unchanged). Records of all three formats are read (`legacy` decodes format 1 into today's
//! types); every record written is format 3.
//!
//! No-panic contract: [`Reader`] checks every length against the remaining input and decoding
//! returns `Error::Corrupt` on truncated, oversized or trailing bytes, unknown enum tags and
//! invalid UTF-8. No decoder indexes a slice without a bound check, and no allocation is sized
//! from an unchecked length (a count is first checked against the bytes left).

use fleetcast_wire::Embed;

use crate::error::{Error, Result};

/// Current record encoding version.
pub(crate) const VERSION: u8 = 3;
/// The second format: as today's, without the device record's report time.
pub(crate) const FORMAT_2: u8 = 2;
/// The first format: steps, results and reports in store-only layouts (see `legacy`).
pub(crate) const FORMAT_1: u8 = 1;

/// Appends encoded fields to a caller-owned buffer.
#[derive(Debug)]
pub(crate) struct Writer<'a> {
    buf: &'a mut Vec<u8>,
    /// The first embedded value that did not encode (over a wire limit): the record is
    /// refused by [`Record::encode`], never written cut short.
    failed: Option<fleetcast_wire::Error>,
}

impl<'a> Writer<'a> {
    /// Clears `buf` and writes the version byte.
    pub(crate) fn new(buf: &'a mut Vec<u8>) -> Self {
        buf.clear();
        buf.push(VERSION);
        Writer { buf, failed: None }
    }
    /// Appends a wire value's encoding as a byte string.
    pub(crate) fn embed<'v, T: Embed<'v>>(&mut self, v: &T) {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        match v.encode_to_vec(self.buf) {
            Ok(()) => {
                let n = u32::try_from(self.buf.len() - at - 4).unwrap_or(u32::MAX);
                self.buf[at..at + 4].copy_from_slice(&n.to_le_bytes());
            }
            Err(e) => {
                self.buf.truncate(at);
                self.failed.get_or_insert(e);
            }
        }
    }
    /// A writer of a nested field list into `buf` (no version byte: a record's extension).
    pub(crate) fn raw_into(buf: &'a mut Vec<u8>) -> Self {
        buf.clear();
        Writer { buf, failed: None }
    }
    /// Marks the record as not encodable (a nested record failed).
    pub(crate) fn fail(&mut self, e: fleetcast_wire::Error) {
        self.failed.get_or_insert(e);
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
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
    version: u8,
}

impl<'a> Reader<'a> {
    /// Checks the version byte. `table` names the table in `Corrupt` errors.
    pub(crate) fn new(buf: &'a [u8], table: &'static str) -> Result<Self> {
        let mut r = Reader {
            buf,
            table,
            version: VERSION,
        };
        match r.u8()? {
            v @ (FORMAT_1 | FORMAT_2 | VERSION) => {
                r.version = v;
                Ok(r)
            }
            _ => Err(r.corrupt("unknown record version")),
        }
    }
    /// The record's format version ([`FORMAT_1`], [`FORMAT_2`] or [`VERSION`]).
    pub(crate) fn version(&self) -> u8 {
        self.version
    }
    /// Reads an embedded wire value (borrowing from the record: the caller owns it with
    /// `into_owned` before the record's bytes go away).
    pub(crate) fn embedded<T: Embed<'a>>(&mut self) -> Result<T> {
        let b = self.bytes()?;
        T::decode_exact(b).map_err(|_| self.corrupt("embedded wire value does not decode"))
    }
    /// Reads an embedded wire value with a given decoder: an earlier wire layout's, for a
    /// record of an earlier format.
    pub(crate) fn embedded_with<T>(
        &mut self,
        decode: impl FnOnce(&'a [u8]) -> fleetcast_wire::Result<T>,
    ) -> Result<T> {
        let b = self.bytes()?;
        decode(b).map_err(|_| self.corrupt("embedded wire value does not decode"))
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
    /// An optional `u32` (written as an optional `u64`; a value over `u32::MAX` is corrupt).
    pub(crate) fn opt_u32(&mut self) -> Result<Option<u32>> {
        match self.opt_u64()? {
            None => Ok(None),
            Some(v) => u32::try_from(v)
                .map(Some)
                .map_err(|_| self.corrupt("value over u32")),
        }
    }
    /// A reader of a nested field list (a record's extension), with this record's version.
    pub(crate) fn sub(&self, buf: &'a [u8]) -> Reader<'a> {
        Reader {
            buf,
            table: self.table,
            version: self.version,
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

    /// Encodes the record; refused (nothing to write) if a wire value it embeds is over a
    /// wire limit.
    fn encode(&self, buf: &mut Vec<u8>) -> Result<()> {
        let mut w = Writer::new(buf);
        self.encode_fields(&mut w);
        match w.failed {
            None => Ok(()),
            Some(error) => Err(Error::Unencodable {
                table: Self::TABLE,
                error,
            }),
        }
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
        assert_eq!(Reader::new(&[FORMAT_1], "t").unwrap().version(), FORMAT_1);
        assert!(Reader::new(&[], "t").is_err());
    }
}
