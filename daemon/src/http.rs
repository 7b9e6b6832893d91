//! The gateway's HTTP/1.1 surface for the agent's transport ladder (sans-IO: bytes in,
//! decisions out; the mio loop in `gateway.rs` owns the sockets and the deadlines).
//!
//! Two requests are served, nothing else:
//! - **Upgrade** (inside TLS only): `GET /fleetcast HTTP/1.1` with `Upgrade: fleetcast` is
//!   answered `101 Switching Protocols`; the connection then carries binary framing exactly like
//!   the native rung.
//! - **Long-poll** (plain HTTP, direct or through a forwarding proxy):
//!   `POST /fleetcast/poll` whose body is the next bytes of the agent's *inner TLS stream*.
//!   The response body carries the gateway's pending TLS bytes. `X-Fleetcast-Session` names the
//!   session (absent on the first request; the response hands the token out), and
//!   `X-Fleetcast-Wait` is how long (ms) the gateway may hold the request when it has nothing to
//!   send. No state is tied to a TCP connection: every request names its session.
//!   `X-Fleetcast-Up` is the stream offset of the request body and `X-Fleetcast-Down` the
//!   gateway bytes the agent has received; a response's `X-Fleetcast-Down` is the offset of its
//!   body. With them an exchange whose answer was lost can be made again: the gateway takes
//!   only body bytes it does not have, and sends again what was not acknowledged.
//!
//! # Limits (each cut is logged with its reason)
//! - the request head: at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields;
//! - the time from the first byte to a complete head (and body): `GatewayConfig::http_timeout`;
//! - a long-poll body: at most [`MAX_BODY`] bytes, `Content-Length` required;
//! - a field that must appear once ([`SINGLE_FIELDS`]: `Content-Length` and the others whose
//!   first copy would otherwise win) repeated: refused with `400`.
//!
//! Parsing never panics on any input (`httparse` plus bounded slicing).

/// Largest request head (request line and fields, with the final empty line).
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header fields in a request.
pub const MAX_HEADERS: usize = 32;
/// Largest long-poll request body.
pub const MAX_BODY: usize = 256 * 1024;
/// Longest hold the gateway grants a long-poll request.
pub const MAX_WAIT_MS: u32 = 25_000;
/// Path of the Upgrade rung.
pub const UPGRADE_PATH: &str = "/fleetcast";
/// Path of the long-poll rung.
pub const POLL_PATH: &str = "/fleetcast/poll";
/// Session header of the long-poll rung.
pub const SESSION_HEADER: &str = "X-Fleetcast-Session";
/// Hold-time header of the long-poll rung.
pub const WAIT_HEADER: &str = "X-Fleetcast-Wait";
/// Long-poll request header: the agent-to-gateway stream offset of the body.
pub const UP_HEADER: &str = "X-Fleetcast-Up";
/// Long-poll header: in a request, the gateway bytes the agent has received; in a response, the
/// gateway-to-agent stream offset of the body.
pub const DOWN_HEADER: &str = "X-Fleetcast-Down";

/// Header fields a request may carry at most once, with the reason a repetition is refused.
/// Two `Content-Length`s (or a `Transfer-Encoding` next to one) frame the body two ways: a
/// proxy that honours the other copy sees a different request than the gateway does
/// (request smuggling; RFC 9112 §6.3 makes differing lengths an unrecoverable error), so a
/// repeated field is refused instead of letting the first copy win. Every HTTP parser of the
/// gateway (long-poll, Upgrade, artifacts, metrics) checks these.
pub const SINGLE_FIELDS: &[(&str, &str)] = &[
    ("Content-Length", "duplicate Content-Length header"),
    ("Transfer-Encoding", "duplicate Transfer-Encoding header"),
    ("Upgrade", "duplicate Upgrade header"),
    (SESSION_HEADER, "duplicate X-Fleetcast-Session header"),
    (WAIT_HEADER, "duplicate X-Fleetcast-Wait header"),
];

/// The refusal reason when `headers` repeat one of [`SINGLE_FIELDS`] (names compared without
/// case).
pub fn repeated_field(headers: &[httparse::Header<'_>]) -> Option<&'static str> {
    SINGLE_FIELDS.iter().find_map(|(name, reason)| {
        let n = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count();
        (n > 1).then_some(*reason)
    })
}

/// A request the gateway serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Switch this (TLS) connection to binary framing.
    Upgrade,
    /// One long-poll exchange.
    Poll {
        /// The session, `None` to open one.
        session: Option<[u8; 16]>,
        /// Longest hold when nothing is pending, ms (clamped to [`MAX_WAIT_MS`]).
        wait_ms: u32,
        /// Body length (`Content-Length`).
        body_len: usize,
        /// The body's stream offset (`None`: an agent that sends none).
        up: Option<u64>,
        /// Gateway bytes the agent has received (`None`: an agent that does not say).
        down: Option<u64>,
    },
}

/// What the bytes received so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet (and within limits).
    Partial,
    /// A complete head of `head_len` bytes.
    Request {
        /// What it asks for.
        route: Route,
        /// Bytes of the head; the body (if any) follows.
        head_len: usize,
    },
    /// Refused: answer `status` and close, logging `reason`.
    Reject {
        /// HTTP status to answer with.
        status: u16,
        /// Why (logged, and sent as the body).
        reason: &'static str,
    },
}

/// Parses a request head. `inside_tls` says which routes are allowed: Upgrade only inside
/// TLS (the binary stream must be encrypted), long-poll only outside (its body is already TLS).
pub fn parse_request(buf: &[u8], inside_tls: bool) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return reject(431, "request head larger than the limit");
            }
            return Parsed::Partial;
        }
        Err(httparse::Error::TooManyHeaders) => {
            return reject(431, "more header fields than the limit")
        }
        Err(_) => return reject(400, "malformed HTTP request"),
    };
    if head_len > MAX_HEAD {
        return reject(431, "request head larger than the limit");
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return reject(400, "malformed HTTP request");
    };
    if let Some(reason) = repeated_field(req.headers) {
        return reject(400, reason);
    }
    let path = origin_path(target);
    let field = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    match (method, path) {
        ("GET", UPGRADE_PATH) if inside_tls => {
            let upgrade = field("Upgrade")
                .and_then(|v| std::str::from_utf8(v).ok())
                .is_some_and(|v| {
                    v.split(',')
                        .any(|p| p.trim().eq_ignore_ascii_case("fleetcast"))
                });
            if !upgrade {
                return reject(426, "Upgrade: fleetcast required");
            }
            Parsed::Request {
                route: Route::Upgrade,
                head_len,
            }
        }
        ("POST", POLL_PATH) if !inside_tls => {
            if field("Transfer-Encoding").is_some() {
                return reject(411, "chunked bodies are not accepted; send Content-Length");
            }
            let Some(body_len) = field("Content-Length").and_then(parse_num) else {
                return reject(411, "Content-Length required");
            };
            if body_len > MAX_BODY as u64 {
                return reject(413, "body larger than the limit");
            }
            let session = match field(SESSION_HEADER) {
                None => None,
                Some(v) => match parse_token(v) {
                    Some(t) => Some(t),
                    None => return reject(400, "malformed session token"),
                },
            };
            let wait_ms = field(WAIT_HEADER)
                .and_then(parse_num)
                .unwrap_or(0)
                .min(u64::from(MAX_WAIT_MS)) as u32;
            let offset = |name| field(name).map(|v| parse_num(v).ok_or(()));
            let (Ok(up), Ok(down)) = (
                offset(UP_HEADER).transpose(),
                offset(DOWN_HEADER).transpose(),
            ) else {
                return reject(400, "malformed stream offset");
            };
            Parsed::Request {
                route: Route::Poll {
                    session,
                    wait_ms,
                    body_len: body_len as usize,
                    up,
                    down,
                },
                head_len,
            }
        }
        _ => reject(404, "no such fleetcast endpoint"),
    }
}

fn reject(status: u16, reason: &'static str) -> Parsed {
    Parsed::Reject { status, reason }
}

/// The path of an origin-form (`/p`) or absolute-form (`http://host:port/p`, as a forwarding
/// proxy may pass it on) request target, without the query.
fn origin_path(target: &str) -> &str {
    let rest = match target.split_once("://") {
        Some((_, after)) => after.find('/').map_or("/", |i| &after[i..]),
        None => target,
    };
    rest.split('?').next().unwrap_or(rest)
}

fn parse_num(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?.trim();
    if s.is_empty() || s.len() > 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a 32-hex-digit session token.
pub fn parse_token(v: &[u8]) -> Option<[u8; 16]> {
    let v = std::str::from_utf8(v).ok()?.trim();
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
    t.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `101` answer of the Upgrade rung.
pub const SWITCHING: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: fleetcast\r\nConnection: Upgrade\r\n\r\n";

/// Appends a complete response (`Connection: close`) to `out`.
pub fn respond(out: &mut Vec<u8>, status: u16, session: Option<&[u8; 16]>, body: &[u8]) {
    respond_with(out, status, session, None, body);
}

/// Appends a long-poll answer whose body starts at offset `down` of the gateway's stream.
pub fn respond_poll(out: &mut Vec<u8>, session: &[u8; 16], down: u64, body: &[u8]) {
    respond_with(out, 200, Some(session), Some(down), body);
}

fn respond_with(
    out: &mut Vec<u8>,
    status: u16,
    session: Option<&[u8; 16]>,
    down: Option<u64>,
    body: &[u8],
) {
    use std::io::Write;
    let phrase = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let _ = write!(out, "HTTP/1.1 {status} {phrase}\r\n");
    if let Some(t) = session {
        let _ = write!(out, "{SESSION_HEADER}: {}\r\n", format_token(t));
    }
    if let Some(d) = down {
        let _ = write!(out, "{DOWN_HEADER}: {d}\r\n");
    }
    let kind = if status == 200 {
        "application/octet-stream"
    } else {
        "text/plain"
    };
    let _ = write!(
        out,
        "Content-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_inside_tls_only() {
        let req = b"GET /fleetcast HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: fleetcast\r\n\r\n\xFC";
        let head_len = req.len() - 1;
        assert_eq!(
            parse_request(req, true),
            Parsed::Request {
                route: Route::Upgrade,
                head_len
            }
        );
        assert!(matches!(
            parse_request(req, false),
            Parsed::Reject { status: 404, .. }
        ));
        let no_upgrade = b"GET /fleetcast HTTP/1.1\r\nHost: gw\r\n\r\n";
        assert!(matches!(
            parse_request(no_upgrade, true),
            Parsed::Reject { status: 426, .. }
        ));
    }

    #[test]
    fn poll_request_fields() {
        let tok = [0xab; 16];
        let req = format!(
            "POST http://10.77.0.1:443/fleetcast/poll HTTP/1.1\r\nHost: 10.77.0.1:443\r\nContent-Length: 5\r\nx-fleetcast-session: {}\r\nX-Fleetcast-Wait: 99999\r\n\r\nhello",
            format_token(&tok)
        );
        assert_eq!(
            parse_request(req.as_bytes(), false),
            Parsed::Request {
                route: Route::Poll {
                    session: Some(tok),
                    wait_ms: MAX_WAIT_MS,
                    body_len: 5,
                    up: None,
                    down: None,
                },
                head_len: req.len() - 5
            }
        );
        let with_offsets = format!(
            "POST /fleetcast/poll HTTP/1.1\r\nContent-Length: 0\r\n{UP_HEADER}: 1234\r\n{DOWN_HEADER}: 77\r\n\r\n"
        );
        assert!(matches!(
            parse_request(with_offsets.as_bytes(), false),
            Parsed::Request {
                route: Route::Poll {
                    up: Some(1234),
                    down: Some(77),
                    ..
                },
                ..
            }
        ));
        let bad_offset = format!(
            "POST /fleetcast/poll HTTP/1.1\r\nContent-Length: 0\r\n{DOWN_HEADER}: -1\r\n\r\n"
        );
        assert!(matches!(
            parse_request(bad_offset.as_bytes(), false),
            Parsed::Reject { status: 400, .. }
        ));
        let no_len = b"POST /fleetcast/poll HTTP/1.1\r\n\r\n";
        assert!(matches!(
            parse_request(no_len, false),
            Parsed::Reject { status: 411, .. }
        ));
        let big = b"POST /fleetcast/poll HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n";
        assert!(matches!(
            parse_request(big, false),
            Parsed::Reject { status: 413, .. }
        ));
        let bad_tok = b"POST /fleetcast/poll HTTP/1.1\r\nContent-Length: 0\r\nX-Fleetcast-Session: zz\r\n\r\n";
        assert!(matches!(
            parse_request(bad_tok, false),
            Parsed::Reject { status: 400, .. }
        ));
    }

    /// A repeated `Content-Length` (equal or not) or other single field is refused on both
    /// routes; before, the first copy won.
    #[test]
    fn repeated_single_fields_are_refused() {
        for (len_a, len_b) in [("5", "5"), ("5", "0"), ("0", "5")] {
            let req = format!(
                "POST /fleetcast/poll HTTP/1.1\r\nContent-Length: {len_a}\r\ncontent-length: {len_b}\r\n\r\nhello"
            );
            assert_eq!(
                parse_request(req.as_bytes(), false),
                Parsed::Reject {
                    status: 400,
                    reason: "duplicate Content-Length header"
                },
                "{len_a}/{len_b}"
            );
        }
        let req = b"GET /fleetcast HTTP/1.1\r\nUpgrade: fleetcast\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(
            parse_request(req, true),
            Parsed::Reject { status: 400, .. }
        ));
        let two_sessions = format!(
            "POST /fleetcast/poll HTTP/1.1\r\nContent-Length: 0\r\n{SESSION_HEADER}: {}\r\n{SESSION_HEADER}: {}\r\n\r\n",
            format_token(&[1; 16]),
            format_token(&[2; 16])
        );
        assert_eq!(
            parse_request(two_sessions.as_bytes(), false),
            Parsed::Reject {
                status: 400,
                reason: "duplicate X-Fleetcast-Session header"
            }
        );
        // One of each is fine.
        let one = b"POST /fleetcast/poll HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(parse_request(one, false), Parsed::Request { .. }));
    }

    #[test]
    fn partial_malformed_and_limits() {
        assert_eq!(
            parse_request(b"POST /fleetcast/poll HTTP/1.1\r\nHost: x", false),
            Parsed::Partial
        );
        assert!(matches!(
            parse_request(b"POST /fleetcast/poll HTTP/9\x00\r\n\r\n", false),
            Parsed::Reject { status: 400, .. }
        ));
        assert!(matches!(
            parse_request(b"GET\x01/ HTTP/1.1\r\n\r\n", false),
            Parsed::Reject { status: 400, .. }
        ));
        // An endless header line: cut once it passes the head limit.
        let mut long = b"GET /fleetcast HTTP/1.1\r\nX-Pad: ".to_vec();
        long.resize(MAX_HEAD + 1, b'a');
        assert!(matches!(
            parse_request(&long, true),
            Parsed::Reject { status: 431, .. }
        ));
        // Too many fields.
        let mut many = b"GET /fleetcast HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(
            parse_request(&many, true),
            Parsed::Reject { status: 431, .. }
        ));
        assert!(matches!(
            parse_request(b"GET /other HTTP/1.1\r\n\r\n", true),
            Parsed::Reject { status: 404, .. }
        ));
    }

    /// Seeded mutations of valid requests and random bytes: never a panic, and every
    /// complete answer stays inside the buffer and the limits.
    #[test]
    fn arbitrary_input_never_panics() {
        let mut x: u64 = 0x5eed_1add_3e00;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: [&[u8]; 3] = [
            b"GET /fleetcast HTTP/1.1\r\nHost: gw\r\nUpgrade: fleetcast\r\n\r\n",
            b"POST /fleetcast/poll HTTP/1.1\r\nContent-Length: 3\r\nX-Fleetcast-Wait: 10\r\n\r\nabc",
            b"POST http://h:1/fleetcast/poll?x HTTP/1.0\r\nX-Fleetcast-Session: 00112233445566778899aabbccddeeff\r\nContent-Length: 0\r\n\r\n",
        ];
        for i in 0..20_000u32 {
            let mut buf = seeds[i as usize % seeds.len()].to_vec();
            for _ in 0..(next() % 6) {
                let pos = (next() as usize) % (buf.len() + 1);
                match next() % 4 {
                    0 => buf.insert(pos, next() as u8),
                    1 if pos < buf.len() => {
                        buf.remove(pos);
                    }
                    2 if pos < buf.len() => buf[pos] = next() as u8,
                    _ => buf.truncate(pos),
                }
            }
            if i % 10 == 0 {
                buf = (0..next() % 64).map(|_| next() as u8).collect();
            }
            for tls in [false, true] {
                match parse_request(&buf, tls) {
                    Parsed::Request { head_len, route } => {
                        assert!(head_len <= buf.len() && head_len <= MAX_HEAD);
                        if let Route::Poll {
                            body_len, wait_ms, ..
                        } = route
                        {
                            assert!(body_len <= MAX_BODY && wait_ms <= MAX_WAIT_MS);
                        }
                    }
                    Parsed::Reject { status, .. } => assert!((400..500).contains(&status)),
                    Parsed::Partial => assert!(buf.len() <= MAX_HEAD),
                }
            }
        }
    }

    #[test]
    fn tokens_round_trip() {
        let t: [u8; 16] = core::array::from_fn(|i| i as u8 * 17);
        assert_eq!(parse_token(format_token(&t).as_bytes()), Some(t));
        assert_eq!(parse_token(b"0011"), None);
        assert_eq!(parse_token(&[b'g'; 32]), None);
    }

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
}
