//! What the first bytes of a connection say it speaks (no allocation): the gateway serves
//! every rung of the ladder on one port by looking at the first byte of each accepted
//! connection.
//!
//! | outer first byte | meaning | then |
//! |---|---|---|
//! | `0x16` (TLS handshake record) | TLS | inside TLS: [`sniff_inner`] |
//! | an upper-case ASCII letter | plain HTTP (`POST /fleetcast/poll`, long-poll) | [`super::parse_request`] |
//! | anything else | nothing we serve | closed, reason logged |
//!
//! Inside TLS, the first plaintext byte is our frame magic ([`crate::MAGIC`], `0xFC`, never an
//! ASCII letter) for binary framing, or an ASCII letter for an HTTP request (`GET /fleetcast`
//! with `Upgrade: fleetcast`).
//!
//! Invariant: one byte decides; the functions never panic and never ask for more than one byte.

/// The outer layer of a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outer {
    /// Nothing received yet.
    NeedMore,
    /// A TLS record (`ContentType::Handshake`, RFC 8446 §5.1).
    Tls,
    /// Plain HTTP/1.x (a request method starts with an upper-case letter).
    Http,
    /// Neither: closed with this reason.
    Unknown(u8),
}

/// The first bytes inside TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inner {
    /// No plaintext yet.
    NeedMore,
    /// Binary framing (the frame header's magic).
    Binary,
    /// An HTTP request (the Upgrade rung).
    Http,
    /// Neither: closed with this reason.
    Unknown(u8),
}

/// Classifies the first ciphertext bytes of an accepted connection.
pub fn sniff_outer(first: &[u8]) -> Outer {
    match first.first() {
        None => Outer::NeedMore,
        Some(0x16) => Outer::Tls,
        Some(b) if b.is_ascii_uppercase() => Outer::Http,
        Some(&b) => Outer::Unknown(b),
    }
}

/// Classifies the first plaintext bytes inside TLS.
pub fn sniff_inner(plain: &[u8]) -> Inner {
    match plain.first() {
        None => Inner::NeedMore,
        Some(&crate::MAGIC) => Inner::Binary,
        Some(b) if b.is_ascii_uppercase() => Inner::Http,
        Some(&b) => Inner::Unknown(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outer_classification() {
        assert_eq!(sniff_outer(b""), Outer::NeedMore);
        // A real ClientHello record starts 16 03 01.
        assert_eq!(sniff_outer(&[0x16, 0x03, 0x01, 0x02, 0x00]), Outer::Tls);
        assert_eq!(
            sniff_outer(b"POST /fleetcast/poll HTTP/1.1\r\n"),
            Outer::Http
        );
        assert_eq!(sniff_outer(b"GET / HTTP/1.0\r\n"), Outer::Http);
        assert_eq!(sniff_outer(&[0xFC, 1, 2]), Outer::Unknown(0xFC));
        assert_eq!(sniff_outer(b"\x00\x01"), Outer::Unknown(0));
        assert_eq!(sniff_outer(b"get lowercase"), Outer::Unknown(b'g'));
    }

    #[test]
    fn inner_classification() {
        assert_eq!(sniff_inner(b""), Inner::NeedMore);
        assert_eq!(sniff_inner(&[crate::MAGIC, 1]), Inner::Binary);
        assert_eq!(sniff_inner(b"GET /fleetcast HTTP/1.1\r\n"), Inner::Http);
        assert_eq!(sniff_inner(b"\x16\x03"), Inner::Unknown(0x16));
        // What the agent's requests start with is HTTP on both layers.
        assert_eq!(
            sniff_inner(super::super::upgrade_request("gw").as_bytes()),
            Inner::Http
        );
    }
}
