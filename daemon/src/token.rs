//! The one encoding of the gateway loop's `mio` tokens.
//!
//! One `Poll` carries the gateway's listeners, its waker, its connections (agents, admin
//! clients, artifact downloads, long-poll relays: one slab) and the metrics endpoint's
//! listener and connections (a second slab). [`Tok`] names each; [`Tok::encode`] and
//! [`Tok::decode`] are inverse, so two sources can never share a token: the fixed tokens come
//! first, then the two slabs' indices interleave (even: a gateway connection, odd: a metrics
//! connection), and no range can run into another however large either slab grows.

use mio::Token;

/// What a readiness event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tok {
    /// The agent listener.
    Listener,
    /// The admin socket's listener.
    Admin,
    /// The multicast socket (NACKs).
    Mcast,
    /// The artifact endpoint's listener.
    Artifacts,
    /// The optional second agent listener (e.g. port 443).
    ExtraListener,
    /// The loop's one `mio::Waker` (store thread and digest thread share it).
    Wake,
    /// The metrics endpoint's listener.
    MetricsListener,
    /// A gateway connection: its index in the loop's slab.
    Conn(usize),
    /// A metrics endpoint connection: its index in the endpoint's slab.
    MetricsConn(usize),
}

/// The fixed tokens, in their encoding's order (the position is the token).
const FIXED: [Tok; 7] = [
    Tok::Listener,
    Tok::Admin,
    Tok::Mcast,
    Tok::Artifacts,
    Tok::ExtraListener,
    Tok::Wake,
    Tok::MetricsListener,
];

impl Tok {
    /// The `mio` token. A slab index stays far below `usize::MAX / 2` (each is a live socket).
    pub fn encode(self) -> Token {
        let slab = |i: usize, odd: usize| FIXED.len() + 2 * i + odd;
        Token(match self {
            Tok::Conn(i) => slab(i, 0),
            Tok::MetricsConn(i) => slab(i, 1),
            fixed => FIXED
                .iter()
                .position(|f| *f == fixed)
                .expect("every fixed token is listed in FIXED"),
        })
    }

    /// What `token` names (the inverse of [`Tok::encode`]).
    pub fn decode(token: Token) -> Tok {
        match token.0.checked_sub(FIXED.len()) {
            None => FIXED[token.0],
            Some(i) if i % 2 == 0 => Tok::Conn(i / 2),
            Some(i) => Tok::MetricsConn(i / 2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_inverts_encode_and_no_two_sources_share_a_token() {
        let mut all: Vec<Tok> = FIXED.to_vec();
        for i in [0, 1, 2, 3, 1000, 1 << 20] {
            all.push(Tok::Conn(i));
            all.push(Tok::MetricsConn(i));
        }
        let mut seen = std::collections::HashSet::new();
        for t in &all {
            assert_eq!(Tok::decode(t.encode()), *t, "{t:?}");
            assert!(seen.insert(t.encode()), "{t:?} shares its token");
        }
        // Every token names something: the first tokens after the fixed ones are slots 0.
        assert_eq!(Tok::decode(Token(FIXED.len())), Tok::Conn(0));
        assert_eq!(Tok::decode(Token(FIXED.len() + 1)), Tok::MetricsConn(0));
        for (i, f) in FIXED.iter().enumerate() {
            assert_eq!(Tok::decode(Token(i)), *f);
        }
    }
}
