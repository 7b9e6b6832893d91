//! Response heads: the gateway builds them ([`respond`], [`respond_poll`], [`refuse`],
//! [`SWITCHING`]); the agent reads them ([`parse_response`]).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write as _};

use super::{field, format_token, parse_num, status, Refusal, DOWN_HEADER, SESSION_HEADER};

/// The `101` answer of the Upgrade rung.
pub const SWITCHING: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: fleetcast\r\nConnection: Upgrade\r\n\r\n";

/// Appends a complete response (`Connection: close`) to `out`.
pub fn respond(out: &mut Vec<u8>, status: u16, session: Option<&[u8; 16]>, body: &[u8]) {
    respond_with(out, status, session, None, body);
}

/// Appends the answer to a refused request: its status, its reason as the body.
pub fn refuse(out: &mut Vec<u8>, r: Refusal) {
    respond(out, r.status(), None, r.reason().as_bytes());
}

/// Appends a long-poll answer whose body starts at offset `down` of the gateway's stream.
pub fn respond_poll(out: &mut Vec<u8>, session: &[u8; 16], down: u64, body: &[u8]) {
    respond_with(out, status::OK, Some(session), Some(down), body);
}

fn respond_with(
    out: &mut Vec<u8>,
    code: u16,
    session: Option<&[u8; 16]>,
    down: Option<u64>,
    body: &[u8],
) {
    let mut head = String::with_capacity(256);
    let _ = write!(head, "HTTP/1.1 {code} {}\r\n", status::phrase(code));
    if let Some(t) = session {
        let _ = write!(head, "{SESSION_HEADER}: {}\r\n", format_token(t));
    }
    if let Some(d) = down {
        let _ = write!(head, "{DOWN_HEADER}: {d}\r\n");
    }
    let kind = if code == status::OK {
        "application/octet-stream"
    } else {
        "text/plain"
    };
    let _ = write!(
        head,
        "Content-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
}

/// The length of the head at the start of `buf` (through its empty line), once complete.
pub fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// What the agent reads from a response head (the gateway's, or a proxy's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status.
    pub status: u16,
    /// `Content-Length`, when present and a number.
    pub content_length: Option<usize>,
    /// [`SESSION_HEADER`]: the token to name the session with (kept as sent).
    pub session: Option<String>,
    /// [`DOWN_HEADER`]: the body's offset in the gateway's stream.
    pub down: Option<u64>,
}

/// A response head `httparse` cannot read, or an incomplete one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedResponse;

impl fmt::Display for MalformedResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("malformed HTTP response")
    }
}

#[cfg(feature = "std")]
impl std::error::Error for MalformedResponse {}

/// Parses a complete response head (at most 32 fields).
pub fn parse_response(head: &[u8]) -> Result<ResponseHead, MalformedResponse> {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut fields);
    match r.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(MalformedResponse),
    }
    let text = |name: &str| {
        field(r.headers, name)
            .and_then(|v| core::str::from_utf8(v).ok())
            .map(|v| String::from(v.trim()))
    };
    let num = |name: &str| field(r.headers, name).and_then(parse_num);
    Ok(ResponseHead {
        status: r.code.unwrap_or(0),
        content_length: num("Content-Length").and_then(|n| usize::try_from(n).ok()),
        session: text(SESSION_HEADER),
        down: num(DOWN_HEADER),
    })
}

#[cfg(test)]
mod tests {
    use super::super::StreamError;
    use super::*;

    #[test]
    fn response_is_well_formed() {
        let mut out = Vec::new();
        respond(&mut out, 200, Some(&[1; 16]), b"abc");
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Response::new(&mut fields);
        let n = match r.parse(&out).unwrap() {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => panic!("partial"),
        };
        assert_eq!(r.code, Some(200));
        assert_eq!(&out[n..], b"abc");
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Response::new(&mut fields);
        assert!(r.parse(SWITCHING).unwrap().is_complete());
        assert_eq!(r.code, Some(101));
    }

    /// What the gateway answers is what the agent reads: status, token, offset, length.
    #[test]
    fn the_gateways_answers_are_what_the_agent_reads() {
        let mut out = Vec::new();
        respond_poll(&mut out, &[0xab; 16], 77, b"body");
        let n = head_len(&out).unwrap();
        assert_eq!(&out[n..], b"body");
        assert_eq!(
            parse_response(&out[..n]).unwrap(),
            ResponseHead {
                status: 200,
                content_length: Some(4),
                session: Some(format_token(&[0xab; 16])),
                down: Some(77),
            }
        );
        let mut out = Vec::new();
        refuse(&mut out, Refusal::Stream(StreamError::Gap));
        let n = head_len(&out).unwrap();
        let r = parse_response(&out[..n]).unwrap();
        assert_eq!((r.status, r.session, r.down), (400, None, None));
        assert_eq!(&out[n..], b"skips bytes of the stream");
        assert!(out.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
        assert_eq!(parse_response(SWITCHING).unwrap().status, 101);
        // A proxy's answer, with its own fields and spacing.
        let proxy = b"HTTP/1.1 200 OK\r\nx-fleetcast-session:  t0k3n \r\nContent-Length: 0\r\n\r\n";
        let r = parse_response(proxy).unwrap();
        assert_eq!((r.session.as_deref(), r.down), (Some("t0k3n"), None));
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n"),
            Err(MalformedResponse)
        );
        assert_eq!(parse_response(b"SSH-2.0\r\n\r\n"), Err(MalformedResponse));
        assert_eq!(head_len(b"HTTP/1.1 200 OK\r\n"), None);
    }
}
