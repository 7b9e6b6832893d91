//! The gateway's HTTP rules shared by its HTTP surfaces.
//!
//! The transport ladder's HTTP protocol (the Upgrade and long-poll requests, their answers,
//! limits and refusals, and the sniffing of a connection's first byte) is defined once, for
//! the agent and the gateway, in [`fleetcast_wire::ladder`]; the gateway's side of it runs in
//! `gateway/ladder.rs`. What this module adds is the ladder's rule on repeated fields for the
//! gateway's other HTTP parsers (artifacts, metrics), which read heads with `httparse`.

use fleetcast_wire::ladder::{repeated_field as repeated, Refusal};

/// The refusal reason when `headers` repeat a field that must appear once
/// ([`fleetcast_wire::ladder::SingleField`]: `Content-Length` and the others whose first copy
/// would otherwise win; names compared without case).
pub fn repeated_field(headers: &[httparse::Header<'_>]) -> Option<&'static str> {
    repeated(headers.iter().map(|h| h.name)).map(|f| Refusal::Repeated(f).reason())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The artifacts and metrics parsers refuse what the ladder refuses, with its words.
    #[test]
    fn repeated_fields_are_named() {
        let mut fields = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut fields);
        req.parse(b"GET /m HTTP/1.1\r\nContent-Length: 0\r\ncontent-length: 1\r\n\r\n")
            .unwrap();
        assert_eq!(
            repeated_field(req.headers),
            Some("duplicate Content-Length header")
        );
        let mut fields = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut fields);
        req.parse(b"GET /m HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        assert_eq!(repeated_field(req.headers), None);
    }
}
