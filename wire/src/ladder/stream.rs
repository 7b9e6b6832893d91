//! The stream offsets of a long-poll session, which make repeating an exchange harmless.

use alloc::vec::Vec;
use core::fmt;

/// Stream offsets that do not fit what the other end holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamError {
    /// An acknowledgement of bytes that were never answered.
    Unsent,
    /// A body that starts past the bytes taken so far: bytes in between would be lost.
    Gap,
}

impl StreamError {
    /// Why, in words.
    pub fn reason(self) -> &'static str {
        match self {
            StreamError::Unsent => "acknowledges bytes never sent",
            StreamError::Gap => "skips bytes of the stream",
        }
    }
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

#[cfg(feature = "std")]
impl std::error::Error for StreamError {}

/// The part of `body`, which starts at stream offset `at` (`None`: right after the bytes
/// taken, as from a peer that sends no offsets), that is not among the `taken` bytes already
/// taken. The same rule on both ends: the gateway takes request bodies with it, the agent
/// answers.
pub fn fresh_part(taken: u64, at: Option<u64>, body: &[u8]) -> Result<&[u8], StreamError> {
    let at = at.unwrap_or(taken);
    if at > taken {
        return Err(StreamError::Gap);
    }
    let seen = usize::try_from(taken - at).unwrap_or(usize::MAX);
    Ok(body.get(seen..).unwrap_or_default())
}

/// The gateway's positions in a long-poll session: request bodies are taken by their offset
/// (bytes already taken are dropped), and the gateway's bytes stay here once answered until
/// the agent acknowledges them (an answer lost on the way is sent again). An agent that sends
/// no offsets gets the old behaviour: bodies are appended and an answer counts as received.
#[derive(Debug, Default)]
pub struct PollStream {
    /// Agent bytes taken so far.
    up: u64,
    /// Gateway bytes the agent has acknowledged: the stream offset of `unacked[0]`.
    down: u64,
    /// Gateway bytes answered and not acknowledged.
    unacked: Vec<u8>,
}

impl PollStream {
    /// The agent has received `down` bytes of the gateway's stream.
    pub fn ack(&mut self, down: Option<u64>) -> Result<(), StreamError> {
        let answered = self.down + self.unacked.len() as u64;
        let down = down.unwrap_or(answered);
        if down > answered {
            return Err(StreamError::Unsent);
        }
        // An older acknowledgement (a request overtaken by its own repeat) changes nothing.
        if down > self.down {
            self.unacked.drain(..(down - self.down) as usize);
            self.down = down;
        }
        Ok(())
    }

    /// The part of a request body at stream offset `up` not taken before.
    pub fn take<'a>(&mut self, up: Option<u64>, body: &'a [u8]) -> Result<&'a [u8], StreamError> {
        let fresh = fresh_part(self.up, up, body)?;
        self.up += fresh.len() as u64;
        Ok(fresh)
    }

    /// An answer: what is not acknowledged, then `fresh` (kept until acknowledged). Returns
    /// the stream offset of the body and the body.
    pub fn answer(&mut self, fresh: &[u8]) -> (u64, Vec<u8>) {
        self.unacked.extend_from_slice(fresh);
        (self.down, self.unacked.clone())
    }

    /// Gateway bytes answered and not acknowledged yet.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exchange made again (its answer lost) takes nothing twice and loses nothing.
    #[test]
    fn a_repeated_exchange_takes_and_loses_nothing() {
        let mut s = PollStream::default();
        // Exchange 1: body "hello" at 0; answered "ABC" at 0.
        s.ack(Some(0)).unwrap();
        assert_eq!(s.take(Some(0), b"hello").unwrap(), b"hello");
        assert_eq!(s.answer(b"ABC"), (0, b"ABC".to_vec()));
        // Exchange 2 (answer lost): body "xy" at 5, acks 3; answered "D" at 3.
        s.ack(Some(3)).unwrap();
        assert_eq!(s.take(Some(5), b"xy").unwrap(), b"xy");
        assert_eq!(s.answer(b"D"), (3, b"D".to_vec()));
        // Its repeat: the body is dropped, "D" goes again with what came since.
        s.ack(Some(3)).unwrap();
        assert_eq!(s.take(Some(5), b"xy").unwrap(), b"");
        assert_eq!(s.answer(b"EF"), (3, b"DEF".to_vec()));
        assert_eq!(s.unacked(), 3);
        // A repeat that carries more than was taken: only the new tail.
        s.ack(Some(6)).unwrap();
        assert_eq!(s.take(Some(5), b"xyz").unwrap(), b"z");
        assert_eq!(s.answer(b""), (6, Vec::new()));
        // A stale acknowledgement changes nothing; impossible offsets are refused.
        s.ack(Some(4)).unwrap();
        assert_eq!(s.answer(b""), (6, Vec::new()));
        assert_eq!(s.ack(Some(7)), Err(StreamError::Unsent));
        assert_eq!(s.take(Some(9), b"q"), Err(StreamError::Gap));
    }

    /// An agent that sends no offsets: bodies are appended, answers count as received.
    #[test]
    fn without_offsets_the_old_behaviour() {
        let mut s = PollStream::default();
        s.ack(None).unwrap();
        assert_eq!(s.take(None, b"ab").unwrap(), b"ab");
        assert_eq!(s.answer(b"XY"), (0, b"XY".to_vec()));
        s.ack(None).unwrap();
        assert_eq!(s.take(None, b"ab").unwrap(), b"ab");
        assert_eq!(s.answer(b"Z"), (2, b"Z".to_vec()));
        assert_eq!(s.unacked(), 1);
    }

    /// The agent's side of the same rule: an answer repeating bytes yields the new ones, one
    /// past them is a gap.
    #[test]
    fn fresh_parts_of_an_answer() {
        assert_eq!(fresh_part(2, Some(0), b"ABCD"), Ok(&b"CD"[..]));
        assert_eq!(fresh_part(2, None, b"CD"), Ok(&b"CD"[..]));
        assert_eq!(fresh_part(4, Some(0), b"AB"), Ok(&b""[..]));
        assert_eq!(fresh_part(4, Some(9), b"Z"), Err(StreamError::Gap));
    }
}
