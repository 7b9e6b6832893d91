//! Stream framing: turns a byte stream (TLS plaintext, a TCP stream, an HTTP body) cut at
//! arbitrary points back into frames.
//!
//! # Contract
//! - Accepts bytes in any chunking: pushing a stream in one piece or byte by byte yields the
//!   same frames in the same order.
//! - A header is checked (magic, version, flags, length limit) as soon as its 12 bytes are in;
//!   an oversized frame is rejected *before* any byte of its body is buffered.
//! - Errors are sticky and reported in stream order: frames completed before a bad header are
//!   still returned by [`Deframer::next_frame`] (whatever the chunking: pushing them together
//!   with the bad header in one chunk loses nothing), then every later call returns the error,
//!   and the connection should be closed with that reason. `push` also returns the error as soon
//!   as it sees it, so a caller may stop reading the socket at once.
//! - Memory: at most one push's worth of complete frames plus one partial frame
//!   (≤ `HEADER_LEN + max_body`) is held.

use alloc::vec::Vec;

use crate::error::{Error, Result};
use crate::header::{Frame, Header, HEADER_LEN, MAX_STREAM_BODY};

/// Reassembles frames from a byte stream.
#[derive(Debug)]
pub struct Deframer {
    buf: Vec<u8>,
    /// Start of the first unconsumed frame in `buf`.
    start: usize,
    /// End of the last complete frame in `buf` (frames in `start..complete` are whole).
    complete: usize,
    max_body: u32,
    error: Option<Error>,
}

impl Default for Deframer {
    fn default() -> Self {
        Deframer::new(MAX_STREAM_BODY)
    }
}

impl Deframer {
    /// A deframer accepting bodies of at most `max_body` bytes.
    pub fn new(max_body: u32) -> Self {
        Deframer {
            buf: Vec::new(),
            start: 0,
            complete: 0,
            max_body,
            error: None,
        }
    }

    /// The sticky error, if the stream has failed.
    pub fn error(&self) -> Option<Error> {
        self.error
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Releases buffer memory when nothing is pending (for idle connections).
    pub fn shrink(&mut self) {
        if self.buffered() == 0 {
            self.buf = Vec::new();
            self.start = 0;
            self.complete = 0;
        }
    }

    /// Appends stream bytes. Fails (stickily) on the first bad header; nothing past a bad
    /// header is buffered.
    pub fn push(&mut self, mut data: &[u8]) -> Result<()> {
        if let Some(e) = self.error {
            return Err(e);
        }
        // Compact: drop consumed frames before growing.
        if self.start > 0 && (self.start == self.buf.len() || self.start > self.buf.len() / 2) {
            self.buf.drain(..self.start);
            self.complete -= self.start;
            self.start = 0;
        }
        while !data.is_empty() {
            let partial = self.buf.len() - self.complete;
            let need = if partial < HEADER_LEN {
                HEADER_LEN - partial
            } else {
                let hdr = &self.buf[self.complete..self.complete + HEADER_LEN];
                // Checked when the header completed; the length is within `max_body`.
                let body = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
                HEADER_LEN + body - partial
            };
            let n = need.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            let partial = self.buf.len() - self.complete;
            if partial == HEADER_LEN {
                if let Err(e) = Header::check_prefix(&self.buf[self.complete..], self.max_body) {
                    self.buf.truncate(self.complete);
                    self.error = Some(e);
                    return Err(e);
                }
            }
            if partial >= HEADER_LEN {
                let hdr = &self.buf[self.complete..];
                let body = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
                if partial == HEADER_LEN + body {
                    self.complete = self.buf.len();
                }
            }
        }
        Ok(())
    }

    /// The next complete frame, CRC-checked, or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Frame<'_>>> {
        if self.start == self.complete {
            // Everything before the error has been returned: now the error, forever.
            return self.error.map(Err);
        }
        match Frame::parse_prefix(&self.buf[self.start..self.complete], self.max_body) {
            Ok((frame, rest)) => {
                self.start = self.complete - rest.len();
                // Re-borrow: `frame` borrows `self.buf`, which we no longer mutate.
                Some(Ok(frame))
            }
            Err(e) => {
                // Nothing after a corrupt frame can be trusted: stay failed from here on.
                self.error = Some(e);
                self.complete = self.start;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Heartbeat, Message};

    fn stream(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            Message::Heartbeat(Heartbeat {
                nonce: i,
                echo: i % 2 == 0,
            })
            .emit_to_vec(&mut out)
            .unwrap();
        }
        out
    }

    fn drain(d: &mut Deframer, out: &mut Vec<u64>) -> Result<()> {
        while let Some(f) = d.next_frame() {
            match Message::parse(&f?)? {
                Message::Heartbeat(h) => out.push(h.nonce),
                other => panic!("unexpected {other:?}"),
            }
        }
        Ok(())
    }

    #[test]
    fn byte_by_byte_equals_one_push() {
        let s = stream(50);
        let mut a = Deframer::default();
        let mut got_a = Vec::new();
        a.push(&s).unwrap();
        drain(&mut a, &mut got_a).unwrap();
        let mut b = Deframer::default();
        let mut got_b = Vec::new();
        for byte in &s {
            b.push(core::slice::from_ref(byte)).unwrap();
            drain(&mut b, &mut got_b).unwrap();
        }
        assert_eq!(got_a, (0..50).collect::<Vec<_>>());
        assert_eq!(got_a, got_b);
        assert_eq!(b.buffered(), 0);
    }

    #[test]
    fn oversized_frame_rejected_before_body_is_buffered() {
        let mut d = Deframer::new(100);
        let mut hdr = [0u8; HEADER_LEN];
        hdr[0] = crate::MAGIC;
        hdr[1] = crate::VERSION;
        hdr[2] = 3;
        hdr[4..8].copy_from_slice(&1_000_000u32.to_be_bytes());
        let mut data = hdr.to_vec();
        data.extend(core::iter::repeat_n(0u8, 5000));
        assert_eq!(
            d.push(&data),
            Err(Error::FrameTooLarge {
                len: 1_000_000,
                max: 100
            })
        );
        assert_eq!(d.buffered(), 0);
        // Sticky.
        assert_eq!(
            d.push(&stream(1)),
            Err(Error::FrameTooLarge {
                len: 1_000_000,
                max: 100
            })
        );
        assert!(matches!(
            d.next_frame(),
            Some(Err(Error::FrameTooLarge { .. }))
        ));
    }

    #[test]
    fn corrupt_frame_is_a_sticky_checksum_error() {
        let mut s = stream(3);
        let last = s.len() - 1;
        s[last] ^= 1;
        let mut d = Deframer::default();
        d.push(&s).unwrap();
        let mut got = Vec::new();
        assert_eq!(drain(&mut d, &mut got), Err(Error::Checksum));
        assert_eq!(got, vec![0, 1]);
        assert_eq!(d.error(), Some(Error::Checksum));
    }

    #[test]
    fn frames_before_a_bad_header_in_the_same_chunk_are_not_lost() {
        let mut s = stream(3);
        let bad = s.len();
        s.extend_from_slice(&stream(1));
        s[bad] = 0; // the fourth frame's magic
        let mut whole = Deframer::default();
        assert_eq!(whole.push(&s), Err(Error::BadMagic(0)));
        let mut got = Vec::new();
        assert_eq!(drain(&mut whole, &mut got), Err(Error::BadMagic(0)));
        assert_eq!(got, vec![0, 1, 2]);
        // Sticky after the frames are gone.
        assert!(matches!(whole.next_frame(), Some(Err(Error::BadMagic(0)))));
        assert_eq!(whole.push(&stream(1)), Err(Error::BadMagic(0)));
    }

    #[test]
    fn shrink_releases_idle_memory() {
        let mut d = Deframer::default();
        d.push(&stream(10)).unwrap();
        drain(&mut d, &mut Vec::new()).unwrap();
        d.shrink();
        assert_eq!(d.buf.capacity(), 0);
    }
}
