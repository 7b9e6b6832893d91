//! The transport ladder's HTTP protocol, both ends, sans-IO: the constants, the request and
//! response heads, and the rules for their fields. The agent (`agent/src/ladder.rs`) builds
//! requests and reads responses with it; the gateway (`daemon/src/gateway/ladder.rs`) sniffs
//! connections, reads requests and builds responses with it. Nothing here touches a socket or
//! a clock: bytes in, decisions and bytes out. `docs/transports.md` is the operator's view.
//!
//! # The rungs (one gateway port serves all of them, [`sniff`])
//! | [`Rung`] | carrier | gateway sees |
//! |---|---|---|
//! | [`Rung::Native`] | TCP to the gateway port, TLS, binary framing | TLS, binary |
//! | [`Rung::Port443`] | the same to the alternative port (443) | TLS, binary |
//! | [`Rung::Upgrade`] | TLS, then [`upgrade_request`] (`GET /fleetcast`, `Upgrade: fleetcast`) → [`SWITCHING`] (`101`), then binary framing | TLS, HTTP, then binary |
//! | [`Rung::Connect`] | [`connect_request`] to the proxy, TLS inside the tunnel, binary framing | TLS (from the proxy), binary |
//! | [`Rung::LongPoll`] | [`PollRequest`] (`POST /fleetcast/poll`, plain HTTP, direct or forwarded by the proxy) whose bodies carry the agent's TLS stream | plain HTTP |
//!
//! # Long-poll
//! Each request's body is the next bytes of the agent's *inner TLS stream*; each answer's body
//! carries the gateway's pending TLS bytes. [`SESSION_HEADER`] names the session (absent on
//! the first request; the answer hands the 128-bit token out, [`format_token`]) and
//! [`WAIT_HEADER`] is how long (ms, at most [`MAX_WAIT_MS`]) the gateway may hold the request
//! when it has nothing to send. No state is tied to a TCP connection: every request names its
//! session. [`UP_HEADER`] is the stream offset of the request body and [`DOWN_HEADER`] the
//! gateway bytes the agent has received; an answer's [`DOWN_HEADER`] is the offset of its
//! body. With them an exchange whose answer was lost can be made again: each end takes only
//! the bytes it does not have ([`fresh_part`]), and the gateway sends again what was not
//! acknowledged ([`PollStream`]). An answer `410` ends the session; a relay no request names
//! for [`RELAY_IDLE`] is closed.
//!
//! # Limits
//! - a request head: at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields; a long-poll body:
//!   at most [`MAX_BODY`] bytes, `Content-Length` required (no chunked bodies);
//! - a field that must appear once ([`SingleField`]) repeated: refused with `400` (two
//!   `Content-Length`s frame the body two ways: request smuggling, RFC 9112 §6.3);
//! - the agent sends bodies of at most [`MAX_REQUEST_BODY`] and reads response heads of at
//!   most [`MAX_RESPONSE_HEAD`] and bodies of at most [`MAX_RESPONSE_BODY`]; the gateway buffers
//!   at most [`RELAY_BUFFER`] for a relay, so its answers always fit.
//!
//! Every refusal is a [`Refusal`]: its status and the reason sent as the body. Parsing never
//! panics on any input (`httparse` plus bounded slicing).

mod request;
mod response;
pub mod sniff;
mod stream;

pub use request::{connect_request, parse_request, upgrade_request, Parsed, PollRequest, Route};
pub use response::{
    head_len, parse_response, refuse, respond, respond_poll, MalformedResponse, ResponseHead,
    SWITCHING,
};
pub use stream::{fresh_part, PollStream, StreamError};

use alloc::string::String;
use core::fmt;
use core::time::Duration;

/// Path of the Upgrade rung.
pub const UPGRADE_PATH: &str = "/fleetcast";
/// The ALPN protocol name (RFC 7301) both ends offer on every TLS connection, whichever rung
/// carries it; the gateway's TLS configuration and the agent's must agree on it.
pub const ALPN: &[u8] = b"fleetcast/1";
/// Path of the long-poll rung.
pub const POLL_PATH: &str = "/fleetcast/poll";
/// The protocol name in `Upgrade:` (request and `101` answer).
pub const UPGRADE_TOKEN: &str = "fleetcast";
/// Session header of the long-poll rung.
pub const SESSION_HEADER: &str = "X-Fleetcast-Session";
/// Hold-time header of the long-poll rung (ms).
pub const WAIT_HEADER: &str = "X-Fleetcast-Wait";
/// Long-poll request header: the agent-to-gateway stream offset of the body's first byte.
pub const UP_HEADER: &str = "X-Fleetcast-Up";
/// Long-poll header: in a request, the gateway bytes the agent has received (an
/// acknowledgement); in a response, the gateway-to-agent stream offset of the body.
pub const DOWN_HEADER: &str = "X-Fleetcast-Down";

/// Largest request head the gateway reads (request line and fields, with the final empty
/// line).
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header fields in a request.
pub const MAX_HEADERS: usize = 32;
/// Largest long-poll request body the gateway accepts.
pub const MAX_BODY: usize = 256 * 1024;
/// Longest hold the gateway grants a long-poll request, ms.
pub const MAX_WAIT_MS: u32 = 25_000;
/// Largest long-poll request body the agent sends (well under [`MAX_BODY`]).
pub const MAX_REQUEST_BODY: usize = 128 * 1024;
/// Largest HTTP response head the agent reads.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Largest long-poll response body the agent accepts.
pub const MAX_RESPONSE_BODY: usize = 2 << 20;
/// Most gateway bytes a relay buffers for its agent (it stops reading above this): an answer
/// is what is not acknowledged plus at most this much, so it stays under
/// [`MAX_RESPONSE_BODY`].
pub const RELAY_BUFFER: usize = 1 << 20;
/// A long-poll session no request has named for this long is closed by the gateway.
pub const RELAY_IDLE: Duration = Duration::from_secs(60);

const _: () = assert!(MAX_REQUEST_BODY <= MAX_BODY);
// An answer (unacknowledged and fresh bytes together) is at most the buffer and one read.
const _: () = assert!(2 * RELAY_BUFFER <= MAX_RESPONSE_BODY);
const _: () = assert!(MAX_HEAD <= MAX_RESPONSE_HEAD);

/// The HTTP statuses the ladder uses.
pub mod status {
    /// The Upgrade rung's answer: binary framing follows.
    pub const SWITCHING_PROTOCOLS: u16 = 101;
    /// A long-poll answer (its body may be empty).
    pub const OK: u16 = 200;
    /// A malformed request, a repeated field, a bad token or stream offset.
    pub const BAD_REQUEST: u16 = 400;
    /// What tinyproxy answers wrong proxy credentials with (the gateway never sends it).
    pub const UNAUTHORIZED: u16 = 401;
    /// Not a ladder request.
    pub const NOT_FOUND: u16 = 404;
    /// A proxy wants (other) credentials.
    pub const PROXY_AUTH_REQUIRED: u16 = 407;
    /// The request was not complete in time (from the gateway, or a proxy).
    pub const REQUEST_TIMEOUT: u16 = 408;
    /// The long-poll session is closed or unknown: the stream ended.
    pub const GONE: u16 = 410;
    /// A long-poll request without `Content-Length`.
    pub const LENGTH_REQUIRED: u16 = 411;
    /// A long-poll body over [`super::MAX_BODY`].
    pub const CONTENT_TOO_LARGE: u16 = 413;
    /// `GET /fleetcast` without `Upgrade: fleetcast`.
    pub const UPGRADE_REQUIRED: u16 = 426;
    /// A request head over [`super::MAX_HEAD`] or [`super::MAX_HEADERS`].
    pub const HEADER_FIELDS_TOO_LARGE: u16 = 431;
    /// A proxy could not reach the gateway (worth repeating).
    pub const BAD_GATEWAY: u16 = 502;
    /// No session could be opened now (worth repeating).
    pub const SERVICE_UNAVAILABLE: u16 = 503;
    /// A proxy gave up waiting for the gateway (worth repeating).
    pub const GATEWAY_TIMEOUT: u16 = 504;

    /// The reason phrase the gateway sends with `code`.
    pub fn phrase(code: u16) -> &'static str {
        match code {
            SWITCHING_PROTOCOLS => "Switching Protocols",
            OK => "OK",
            BAD_REQUEST => "Bad Request",
            NOT_FOUND => "Not Found",
            REQUEST_TIMEOUT => "Request Timeout",
            GONE => "Gone",
            LENGTH_REQUIRED => "Length Required",
            CONTENT_TOO_LARGE => "Content Too Large",
            UPGRADE_REQUIRED => "Upgrade Required",
            HEADER_FIELDS_TOO_LARGE => "Request Header Fields Too Large",
            SERVICE_UNAVAILABLE => "Service Unavailable",
            _ => "Error",
        }
    }
}

/// One way to reach the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rung {
    /// Binary framing over TLS to the gateway's port.
    Native,
    /// The same on the alternative port (443 by default).
    Port443,
    /// HTTP/1.1 `Upgrade: fleetcast` inside TLS on the alternative port.
    Upgrade,
    /// An HTTP `CONNECT` tunnel through the proxy to the alternative port.
    Connect,
    /// HTTP long-poll carrying the TLS stream, direct or through the proxy.
    LongPoll,
}

/// The ladder, best first.
pub const LADDER: [Rung; 5] = [
    Rung::Native,
    Rung::Port443,
    Rung::Upgrade,
    Rung::Connect,
    Rung::LongPoll,
];

impl Rung {
    /// Short name: logs, the agent's state file, its configuration, and the build metadata of
    /// the version it sends in `Hello` (`0.1.0+connect`, [`Rung::of_version`]).
    pub fn name(self) -> &'static str {
        match self {
            Rung::Native => "native",
            Rung::Port443 => "443",
            Rung::Upgrade => "upgrade",
            Rung::Connect => "connect",
            Rung::LongPoll => "longpoll",
        }
    }

    /// Parses [`Rung::name`].
    pub fn parse(s: &str) -> Option<Rung> {
        LADDER.into_iter().find(|r| r.name() == s)
    }

    /// Position in [`LADDER`] (0 is best).
    pub fn rank(self) -> usize {
        LADDER
            .iter()
            .position(|r| *r == self)
            .unwrap_or(LADDER.len())
    }

    /// The rung an agent reports in its version's build metadata (SemVer 2.0 §10).
    pub fn of_version(agent_version: &str) -> Option<Rung> {
        Rung::parse(agent_version.rsplit_once('+')?.1)
    }
}

/// Parses a 32-hex-digit session token (surrounding blanks ignored).
pub fn parse_token(v: &[u8]) -> Option<[u8; 16]> {
    let v = core::str::from_utf8(v).ok()?.trim();
    if v.len() != 32 {
        return None;
    }
    let mut t = [0u8; 16];
    for (i, b) in t.iter_mut().enumerate() {
        *b = u8::from_str_radix(v.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(t)
}

/// Formats a session token (32 lower-case hex digits).
pub fn format_token(t: &[u8; 16]) -> String {
    use core::fmt::Write as _;
    let mut s = String::with_capacity(32);
    for b in t {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A field a request may carry at most once: when repeated, the first copy would win, and a
/// proxy that honours another copy sees a different request than the gateway does. Every
/// HTTP parser of the gateway (long-poll, Upgrade, artifacts, metrics) checks these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SingleField {
    /// `Content-Length`.
    ContentLength,
    /// `Transfer-Encoding` (chunked framing next to a length).
    TransferEncoding,
    /// `Upgrade`.
    Upgrade,
    /// [`SESSION_HEADER`].
    Session,
    /// [`WAIT_HEADER`].
    Wait,
}

impl SingleField {
    /// Every field that must appear at most once.
    pub const ALL: [SingleField; 5] = [
        SingleField::ContentLength,
        SingleField::TransferEncoding,
        SingleField::Upgrade,
        SingleField::Session,
        SingleField::Wait,
    ];

    /// The field's name.
    pub fn name(self) -> &'static str {
        match self {
            SingleField::ContentLength => "Content-Length",
            SingleField::TransferEncoding => "Transfer-Encoding",
            SingleField::Upgrade => "Upgrade",
            SingleField::Session => SESSION_HEADER,
            SingleField::Wait => WAIT_HEADER,
        }
    }
}

/// The first of [`SingleField::ALL`] that the field `names` repeat (compared without case).
pub fn repeated_field<'a>(names: impl Iterator<Item = &'a str> + Clone) -> Option<SingleField> {
    SingleField::ALL.into_iter().find(|f| {
        names
            .clone()
            .filter(|n| n.eq_ignore_ascii_case(f.name()))
            .count()
            > 1
    })
}

/// Why the gateway refuses a request: each variant is one broken rule, with the status it is
/// answered with ([`Refusal::status`]) and the reason logged and sent as the body
/// ([`Refusal::reason`], also its `Display`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The head passed [`MAX_HEAD`] bytes.
    HeadTooLarge,
    /// The head has more than [`MAX_HEADERS`] fields.
    TooManyFields,
    /// Not an HTTP/1.x request.
    Malformed,
    /// A field that must appear once is repeated.
    Repeated(SingleField),
    /// `GET /fleetcast` without `Upgrade: fleetcast`.
    UpgradeRequired,
    /// A chunked long-poll body.
    Chunked,
    /// A long-poll request without a (valid) `Content-Length`.
    LengthRequired,
    /// A long-poll body over [`MAX_BODY`].
    BodyTooLarge,
    /// A [`SESSION_HEADER`] that is not 32 hex digits.
    BadToken,
    /// An [`UP_HEADER`] or [`DOWN_HEADER`] that is not a number.
    BadOffset,
    /// Neither ladder request (or one on the wrong side of TLS).
    NoSuchEndpoint,
    /// The session named is not (or no longer) open.
    UnknownSession,
    /// The session ended and the agent has all its bytes.
    SessionClosed,
    /// No session can be opened now (the relay budget is full, say).
    CannotOpenSession,
    /// The stream offsets do not fit the session ([`PollStream`]).
    Stream(StreamError),
    /// The request (head and body) was not complete in time.
    RequestTimeout,
    /// The Upgrade head was not complete in time.
    HeadTimeout,
}

impl Refusal {
    /// The status the refusal is answered with.
    pub fn status(self) -> u16 {
        use status::*;
        match self {
            Refusal::HeadTooLarge | Refusal::TooManyFields => HEADER_FIELDS_TOO_LARGE,
            Refusal::Malformed
            | Refusal::Repeated(_)
            | Refusal::BadToken
            | Refusal::BadOffset
            | Refusal::Stream(_) => BAD_REQUEST,
            Refusal::UpgradeRequired => UPGRADE_REQUIRED,
            Refusal::Chunked | Refusal::LengthRequired => LENGTH_REQUIRED,
            Refusal::BodyTooLarge => CONTENT_TOO_LARGE,
            Refusal::NoSuchEndpoint => NOT_FOUND,
            Refusal::UnknownSession | Refusal::SessionClosed => GONE,
            Refusal::CannotOpenSession => SERVICE_UNAVAILABLE,
            Refusal::RequestTimeout | Refusal::HeadTimeout => REQUEST_TIMEOUT,
        }
    }

    /// Why, in words (logged, and sent as the body).
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::HeadTooLarge => "request head larger than the limit",
            Refusal::TooManyFields => "more header fields than the limit",
            Refusal::Malformed => "malformed HTTP request",
            Refusal::Repeated(f) => match f {
                SingleField::ContentLength => "duplicate Content-Length header",
                SingleField::TransferEncoding => "duplicate Transfer-Encoding header",
                SingleField::Upgrade => "duplicate Upgrade header",
                SingleField::Session => "duplicate X-Fleetcast-Session header",
                SingleField::Wait => "duplicate X-Fleetcast-Wait header",
            },
            Refusal::UpgradeRequired => "Upgrade: fleetcast required",
            Refusal::Chunked => "chunked bodies are not accepted; send Content-Length",
            Refusal::LengthRequired => "Content-Length required",
            Refusal::BodyTooLarge => "body larger than the limit",
            Refusal::BadToken => "malformed session token",
            Refusal::BadOffset => "malformed stream offset",
            Refusal::NoSuchEndpoint => "no such fleetcast endpoint",
            Refusal::UnknownSession => "unknown or expired session",
            Refusal::SessionClosed => "session closed",
            Refusal::CannotOpenSession => "cannot open a session",
            Refusal::Stream(e) => e.reason(),
            Refusal::RequestTimeout => "request not complete in time",
            Refusal::HeadTimeout => "request head not complete in time",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Refusal {}

/// A decimal field value (blanks around it allowed): digits only, at most 12 of them, so it
/// neither overflows nor admits signs or other forms a proxy may read differently.
pub(crate) fn parse_num(v: &[u8]) -> Option<u64> {
    let s = core::str::from_utf8(v).ok()?.trim();
    if s.is_empty() || s.len() > 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The value of the first field named `name` (without case).
pub(crate) fn field<'h>(headers: &[httparse::Header<'h>], name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_rank() {
        for (i, r) in LADDER.into_iter().enumerate() {
            assert_eq!(Rung::parse(r.name()), Some(r));
            assert_eq!(r.rank(), i);
        }
        assert_eq!(Rung::parse("carrier-pigeon"), None);
    }

    #[test]
    fn the_rung_rides_in_the_version() {
        assert_eq!(Rung::of_version("0.1.0+connect"), Some(Rung::Connect));
        assert_eq!(Rung::of_version("0.1.0+443"), Some(Rung::Port443));
        assert_eq!(Rung::of_version("0.1.0"), None);
        assert_eq!(Rung::of_version("0.1.0+pigeon"), None);
    }

    #[test]
    fn tokens_round_trip() {
        let t: [u8; 16] = core::array::from_fn(|i| i as u8 * 17);
        assert_eq!(parse_token(format_token(&t).as_bytes()), Some(t));
        assert_eq!(parse_token(b"0011"), None);
        assert_eq!(parse_token(&[b'g'; 32]), None);
    }

    /// Each refusal's status is the one its rule names, and its words are what the gateway
    /// has always sent.
    #[test]
    fn refusals_have_their_status_and_words() {
        assert_eq!(Refusal::HeadTooLarge.status(), 431);
        assert_eq!(Refusal::Repeated(SingleField::Session).status(), 400);
        assert_eq!(
            Refusal::Repeated(SingleField::Session).to_string(),
            "duplicate X-Fleetcast-Session header"
        );
        assert_eq!(Refusal::UpgradeRequired.status(), 426);
        assert_eq!(Refusal::UnknownSession.status(), 410);
        assert_eq!(Refusal::CannotOpenSession.status(), 503);
        assert_eq!(Refusal::RequestTimeout.status(), 408);
        assert_eq!(Refusal::Stream(StreamError::Gap).status(), 400);
        assert_eq!(
            Refusal::Stream(StreamError::Unsent).reason(),
            "acknowledges bytes never sent"
        );
        for f in SingleField::ALL {
            assert!(Refusal::Repeated(f).reason().contains(f.name()), "{f:?}");
        }
    }

    #[test]
    fn repeated_fields_are_found_without_case() {
        let names = ["Host", "content-length", "Content-Length"];
        assert_eq!(
            repeated_field(names.iter().copied()),
            Some(SingleField::ContentLength)
        );
        assert_eq!(repeated_field(["Host", "Host"].iter().copied()), None);
    }
}
