//! Request heads: the agent builds them ([`upgrade_request`], [`connect_request`],
//! [`PollRequest`]); the gateway reads them ([`parse_request`]).

use alloc::format;
use alloc::string::String;

use super::{
    field, parse_num, parse_token, repeated_field, Refusal, DOWN_HEADER, MAX_BODY, MAX_HEAD,
    MAX_HEADERS, MAX_WAIT_MS, POLL_PATH, SESSION_HEADER, UPGRADE_PATH, UPGRADE_TOKEN, UP_HEADER,
    WAIT_HEADER,
};

/// The Upgrade rung's request, sent inside TLS to `host`.
pub fn upgrade_request(host: &str) -> String {
    format!(
        "GET {UPGRADE_PATH} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE_TOKEN}\r\n\r\n"
    )
}

/// The CONNECT rung's request to the proxy for a tunnel to `target` (`host:port`), with the
/// proxy's credentials (`Basic …`) when it has them.
pub fn connect_request(target: &str, proxy_auth: Option<&str>) -> String {
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = proxy_auth {
        req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// One long-poll request's head (the body, `body_len` bytes of the agent's stream, follows).
#[derive(Debug, Clone, Copy)]
pub struct PollRequest<'a> {
    /// The gateway, `host:port`.
    pub target: &'a str,
    /// Through a forwarding proxy: the request target is then the absolute URI.
    pub via_proxy: bool,
    /// Bytes of the body.
    pub body_len: usize,
    /// Longest hold to ask for, ms.
    pub wait_ms: u128,
    /// The body's offset in the agent's stream ([`UP_HEADER`]).
    pub up: u64,
    /// Gateway bytes received so far ([`DOWN_HEADER`]).
    pub down: u64,
    /// The session token the gateway handed out; `None` opens a session.
    pub session: Option<&'a str>,
    /// The proxy's credentials (`Basic …`), when it has them.
    pub proxy_auth: Option<&'a str>,
}

impl PollRequest<'_> {
    /// The head, with its final empty line.
    pub fn head(&self) -> String {
        let uri = if self.via_proxy {
            format!("http://{}{POLL_PATH}", self.target)
        } else {
            POLL_PATH.into()
        };
        let mut req = format!(
            "POST {uri} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n{WAIT_HEADER}: {}\r\n{UP_HEADER}: {}\r\n{DOWN_HEADER}: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.target, self.body_len, self.wait_ms, self.up, self.down,
        );
        if let Some(t) = self.session {
            req.push_str(&format!("{SESSION_HEADER}: {t}\r\n"));
        }
        if let Some(a) = self.proxy_auth {
            req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        req
    }
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
    /// Refused: answer with its status and reason, and close.
    Reject(Refusal),
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
                return Parsed::Reject(Refusal::HeadTooLarge);
            }
            return Parsed::Partial;
        }
        Err(httparse::Error::TooManyHeaders) => return Parsed::Reject(Refusal::TooManyFields),
        Err(_) => return Parsed::Reject(Refusal::Malformed),
    };
    if head_len > MAX_HEAD {
        return Parsed::Reject(Refusal::HeadTooLarge);
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Parsed::Reject(Refusal::Malformed);
    };
    match route(method, target, req.headers, inside_tls) {
        Ok(route) => Parsed::Request { route, head_len },
        Err(r) => Parsed::Reject(r),
    }
}

/// What a complete head asks for, or the rule it breaks.
fn route(
    method: &str,
    target: &str,
    headers: &[httparse::Header<'_>],
    inside_tls: bool,
) -> Result<Route, Refusal> {
    if let Some(f) = repeated_field(headers.iter().map(|h| h.name)) {
        return Err(Refusal::Repeated(f));
    }
    let field = |name: &str| field(headers, name);
    match (method, origin_path(target)) {
        ("GET", UPGRADE_PATH) if inside_tls => {
            let upgrade = field("Upgrade")
                .and_then(|v| core::str::from_utf8(v).ok())
                .is_some_and(|v| {
                    v.split(',')
                        .any(|p| p.trim().eq_ignore_ascii_case(UPGRADE_TOKEN))
                });
            if !upgrade {
                return Err(Refusal::UpgradeRequired);
            }
            Ok(Route::Upgrade)
        }
        ("POST", POLL_PATH) if !inside_tls => {
            if field("Transfer-Encoding").is_some() {
                return Err(Refusal::Chunked);
            }
            let body_len = field("Content-Length")
                .and_then(parse_num)
                .ok_or(Refusal::LengthRequired)?;
            if body_len > MAX_BODY as u64 {
                return Err(Refusal::BodyTooLarge);
            }
            let session = match field(SESSION_HEADER) {
                None => None,
                Some(v) => Some(parse_token(v).ok_or(Refusal::BadToken)?),
            };
            let wait_ms = field(WAIT_HEADER)
                .and_then(parse_num)
                .unwrap_or(0)
                .min(u64::from(MAX_WAIT_MS)) as u32;
            let offset = |name| field(name).map(|v| parse_num(v).ok_or(Refusal::BadOffset));
            Ok(Route::Poll {
                session,
                wait_ms,
                body_len: body_len as usize,
                up: offset(UP_HEADER).transpose()?,
                down: offset(DOWN_HEADER).transpose()?,
            })
        }
        _ => Err(Refusal::NoSuchEndpoint),
    }
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

#[cfg(test)]
mod tests {
    use super::super::{format_token, SingleField};
    use super::*;
    use alloc::vec::Vec;

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
            Parsed::Reject(r) if r.status() == 404
        ));
        let no_upgrade = b"GET /fleetcast HTTP/1.1\r\nHost: gw\r\n\r\n";
        assert!(matches!(
            parse_request(no_upgrade, true),
            Parsed::Reject(r) if r.status() == 426
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
            Parsed::Reject(r) if r.status() == 400
        ));
        let no_len = b"POST /fleetcast/poll HTTP/1.1\r\n\r\n";
        assert!(matches!(
            parse_request(no_len, false),
            Parsed::Reject(r) if r.status() == 411
        ));
        let big = b"POST /fleetcast/poll HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n";
        assert!(matches!(
            parse_request(big, false),
            Parsed::Reject(r) if r.status() == 413
        ));
        let bad_tok = b"POST /fleetcast/poll HTTP/1.1\r\nContent-Length: 0\r\nX-Fleetcast-Session: zz\r\n\r\n";
        assert!(matches!(
            parse_request(bad_tok, false),
            Parsed::Reject(r) if r.status() == 400
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
            let Parsed::Reject(r) = parse_request(req.as_bytes(), false) else {
                panic!("{len_a}/{len_b}: accepted");
            };
            assert_eq!(
                (r.status(), r.reason()),
                (400, "duplicate Content-Length header"),
                "{len_a}/{len_b}"
            );
        }
        let req = b"GET /fleetcast HTTP/1.1\r\nUpgrade: fleetcast\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(
            parse_request(req, true),
            Parsed::Reject(r) if r.status() == 400
        ));
        let two_sessions = format!(
            "POST /fleetcast/poll HTTP/1.1\r\nContent-Length: 0\r\n{SESSION_HEADER}: {}\r\n{SESSION_HEADER}: {}\r\n\r\n",
            format_token(&[1; 16]),
            format_token(&[2; 16])
        );
        let Parsed::Reject(r) = parse_request(two_sessions.as_bytes(), false) else {
            panic!("two sessions accepted");
        };
        assert_eq!(r, Refusal::Repeated(SingleField::Session));
        assert_eq!(
            (r.status(), r.reason()),
            (400, "duplicate X-Fleetcast-Session header")
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
            Parsed::Reject(r) if r.status() == 400
        ));
        assert!(matches!(
            parse_request(b"GET\x01/ HTTP/1.1\r\n\r\n", false),
            Parsed::Reject(r) if r.status() == 400
        ));
        // An endless header line: cut once it passes the head limit.
        let mut long = b"GET /fleetcast HTTP/1.1\r\nX-Pad: ".to_vec();
        long.resize(MAX_HEAD + 1, b'a');
        assert!(matches!(
            parse_request(&long, true),
            Parsed::Reject(r) if r.status() == 431
        ));
        // Too many fields.
        let mut many = b"GET /fleetcast HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(
            parse_request(&many, true),
            Parsed::Reject(r) if r.status() == 431
        ));
        assert!(matches!(
            parse_request(b"GET /other HTTP/1.1\r\n\r\n", true),
            Parsed::Reject(r) if r.status() == 404
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
                    Parsed::Reject(r) => assert!((400..500).contains(&r.status())),
                    Parsed::Partial => assert!(buf.len() <= MAX_HEAD),
                }
            }
        }
    }

    /// What the agent sends is what the gateway serves: each built request parses to the
    /// route with the same fields, on the side of TLS it belongs to.
    #[test]
    fn the_agents_requests_are_the_gateways_routes() {
        let up = upgrade_request("gw.example");
        assert_eq!(
            parse_request(up.as_bytes(), true),
            Parsed::Request {
                route: Route::Upgrade,
                head_len: up.len()
            }
        );
        let token = format_token(&[7; 16]);
        for via_proxy in [false, true] {
            let head = PollRequest {
                target: "10.77.0.1:443",
                via_proxy,
                body_len: 3,
                wait_ms: 1500,
                up: 5,
                down: 9,
                session: Some(&token),
                proxy_auth: via_proxy.then_some("Basic dTpw"),
            }
            .head();
            let mut req: Vec<u8> = head.clone().into_bytes();
            req.extend_from_slice(b"abc");
            assert_eq!(
                parse_request(&req, false),
                Parsed::Request {
                    route: Route::Poll {
                        session: Some([7; 16]),
                        wait_ms: 1500,
                        body_len: 3,
                        up: Some(5),
                        down: Some(9),
                    },
                    head_len: head.len()
                },
                "{head}"
            );
            assert!(head.starts_with(if via_proxy {
                "POST http://10.77.0.1:443/fleetcast/poll HTTP/1.1\r\n"
            } else {
                "POST /fleetcast/poll HTTP/1.1\r\n"
            }));
            assert_eq!(
                head.contains("Proxy-Authorization: Basic dTpw\r\n"),
                via_proxy
            );
        }
        // The first request opens a session: no token.
        let first = PollRequest {
            target: "gw:443",
            via_proxy: false,
            body_len: 0,
            wait_ms: 0,
            up: 0,
            down: 0,
            session: None,
            proxy_auth: None,
        }
        .head();
        assert!(!first.contains(SESSION_HEADER), "{first}");
        assert!(first.contains("X-Fleetcast-Wait: 0\r\n"), "{first}");
        assert!(matches!(
            parse_request(first.as_bytes(), false),
            Parsed::Request {
                route: Route::Poll { session: None, .. },
                ..
            }
        ));
        assert_eq!(
            connect_request("10.9.8.7:443", Some("Basic dTpw")),
            "CONNECT 10.9.8.7:443 HTTP/1.1\r\nHost: 10.9.8.7:443\r\nProxy-Authorization: Basic dTpw\r\n\r\n"
        );
        assert_eq!(
            connect_request("h:443", None),
            "CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n"
        );
    }
}
