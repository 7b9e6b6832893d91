//! The gateways an agent knows, and which it tries next.
//!
//! An agent may list several gateways of one cell (`gateway = "a:7300,b:7300,c:7300"`). It
//! tries them in its own order of preference, by rendezvous hashing of its device id over the
//! listed addresses ([`fleetcast_wire::cell::preference`]): every agent spreads over the
//! cell, and the devices of a gateway that dies spread over the others instead of landing
//! on one. Before enrolment (no device id yet) the list's own order is used.
//!
//! Rules:
//! - A gateway that cannot be reached is skipped for the next one at once; only when every
//!   gateway failed in a row does the agent back off.
//! - A session stays where it is welcomed (a gateway coming back does not pull its devices
//!   back: moving them costs sessions and gains nothing).
//! - A `redirect` close names the gateway that owns the device: the next session goes there.
//!   If that one cannot be reached (it died and its lease has not yet run out), the agent
//!   goes back to its own choice after a short pause, which claims the device once the lease
//!   has run out. [`MAX_REDIRECTS`] in a row without a welcome fall back to the back-off.

use crate::ladder::{LadderError, Proxy, Target};

/// Redirects followed in a row without a `Welcome` before the agent backs off as after a
/// failure: enough to ride out a lease of a minute at [`REDIRECT_PAUSE_MS`] a try, few enough
/// that two gateways misconfigured to name each other do not spin.
pub const MAX_REDIRECTS: u32 = 120;

/// The pause before going back to the agent's own choice when the gateway it was sent to
/// cannot be reached, milliseconds (jittered by the caller).
pub const REDIRECT_PAUSE_MS: u64 = 500;

/// The agent's gateways and where it is in them.
#[derive(Debug, Clone)]
pub struct Gateways {
    /// Each gateway as listed, and parsed.
    list: Vec<(String, Target)>,
    alt_port: u16,
    proxy: Option<Proxy>,
    /// Indices of `list`, most preferred first.
    order: Vec<usize>,
    /// The position in `order` of the gateway tried now.
    pos: usize,
    /// Gateways that failed in a row since the last welcome.
    failed: usize,
    /// Redirects followed in a row since the last welcome.
    redirects: u32,
    /// The session goes to a gateway a redirect named, not to `order[pos]`.
    redirected: Option<Target>,
    /// The position in `order` of the gateway that sent the last redirect (alive: it
    /// answered), to go back to if the one it named cannot be reached.
    back: Option<usize>,
}

impl Gateways {
    /// From the configuration's `gateway` value: one or more `HOST:PORT`, comma-separated.
    pub fn parse(
        gateways: &str,
        alt_port: u16,
        proxy: Option<Proxy>,
    ) -> Result<Gateways, LadderError> {
        let list = gateways
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(|g| Ok((g.to_string(), Target::parse(g, alt_port, proxy.clone())?)))
            .collect::<Result<Vec<_>, LadderError>>()?;
        if list.is_empty() {
            return Err(LadderError::GatewayAddress);
        }
        Ok(Gateways {
            order: (0..list.len()).collect(),
            list,
            alt_port,
            proxy,
            pos: 0,
            failed: 0,
            redirects: 0,
            redirected: None,
            back: None,
        })
    }

    /// Whether more than one gateway is listed (a cell).
    pub fn several(&self) -> bool {
        self.list.len() > 1
    }

    /// Orders the list by `device`'s preference and starts from its first choice (once the
    /// device id is known: at start, or after enrolment).
    pub fn prefer(&mut self, device: u64) {
        let names: Vec<&str> = self.list.iter().map(|(g, _)| g.as_str()).collect();
        self.order = fleetcast_wire::cell::preference(device, &names);
        self.pos = 0;
    }

    /// The gateway the next session goes to.
    pub fn target(&self) -> Target {
        match &self.redirected {
            Some(t) => t.clone(),
            None => self.list[self.order[self.pos]].1.clone(),
        }
    }

    /// A session was welcomed: where it is is good.
    pub fn welcomed(&mut self) {
        self.failed = 0;
        self.redirects = 0;
        self.back = None;
    }

    /// A gateway said the device lives at `addr`. `true`: the next session goes there at
    /// once; `false`: too many redirects in a row (or `addr` is not `HOST:PORT`), back off.
    pub fn redirect(&mut self, addr: &str) -> bool {
        self.redirects += 1;
        if self.redirects > MAX_REDIRECTS {
            self.redirects = 0;
            self.redirected = None;
            self.back = None;
            return false;
        }
        let Ok(t) = Target::parse(addr, self.alt_port, self.proxy.clone()) else {
            return false;
        };
        // The gateway that sent it, if it is one of ours (one the list does not name, itself
        // reached by a redirect, leaves the earlier one to go back to).
        if self.redirected.is_none() {
            self.back = Some(self.pos);
        }
        // A gateway of our own list becomes where we are, so that a later failure there
        // moves on from it in our order.
        let listed = self.list.iter().position(|(g, _)| g == addr);
        match listed.and_then(|i| self.order.iter().position(|&o| o == i)) {
            Some(p) => {
                self.pos = p;
                self.redirected = None;
            }
            None => self.redirected = Some(t),
        }
        true
    }

    /// The gateway tried now could not be reached. What to do next.
    pub fn failed(&mut self) -> Next {
        self.redirected = None;
        if let Some(b) = self.back.take() {
            // Sent to an owner that is gone (its lease not yet run out): back to the gateway
            // that sent us, after a pause; its claim succeeds once the lease has run out.
            self.pos = b;
            return Next::Pause;
        }
        self.failed += 1;
        self.pos = (self.pos + 1) % self.order.len();
        if self.failed < self.order.len() {
            Next::Now
        } else {
            self.failed = 0;
            Next::BackOff
        }
    }
}

/// What the agent does after a gateway could not be reached ([`Gateways::failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try the next gateway at once.
    Now,
    /// Pause briefly (about [`REDIRECT_PAUSE_MS`]), then try.
    Pause,
    /// Every gateway failed in a row: the usual growing back-off.
    BackOff,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hostport(t: &Target) -> String {
        format!("{}:{}", t.host, t.port)
    }

    #[test]
    fn failures_move_through_the_preference_order_then_back_off() {
        let mut g = Gateways::parse("a:1, b:2,c:3", 443, None).unwrap();
        assert!(g.several());
        assert_eq!(hostport(&g.target()), "a:1", "list order before enrolment");
        g.prefer(42);
        let names = ["a:1", "b:2", "c:3"];
        let order = fleetcast_wire::cell::preference(42, &names);
        assert_eq!(hostport(&g.target()), names[order[0]]);
        assert_eq!(g.failed(), Next::Now);
        assert_eq!(hostport(&g.target()), names[order[1]]);
        assert_eq!(g.failed(), Next::Now);
        assert_eq!(hostport(&g.target()), names[order[2]]);
        assert_eq!(g.failed(), Next::BackOff, "all three failed in a row");
        assert_eq!(hostport(&g.target()), names[order[0]], "then around again");
        // A welcome resets the count: one failure moves on at once again.
        assert_eq!(g.failed(), Next::Now);
        g.welcomed();
        assert_eq!(g.failed(), Next::Now);
        assert_eq!(g.failed(), Next::Now);
        assert_eq!(g.failed(), Next::BackOff);
    }

    #[test]
    fn a_redirect_is_followed_and_a_dead_owner_sends_the_agent_back_after_a_pause() {
        let mut g = Gateways::parse("a:1,b:2", 443, None).unwrap();
        // To a gateway outside the list.
        assert!(g.redirect("z:9"));
        assert_eq!(hostport(&g.target()), "z:9");
        assert_eq!(g.failed(), Next::Pause);
        assert_eq!(hostport(&g.target()), "a:1", "back to the one that sent us");
        // To one in the list: it becomes where we are.
        assert!(g.redirect("b:2"));
        assert_eq!(hostport(&g.target()), "b:2");
        assert_eq!(
            g.failed(),
            Next::Pause,
            "b is gone: back to a, which sent us"
        );
        assert_eq!(hostport(&g.target()), "a:1");
        // The common case: our first choice b died; a still names it until b's lease runs
        // out. Each try goes b (fails), back to a (redirects), never b twice in a row.
        g.pos = 1;
        assert_eq!(g.failed(), Next::Now, "b dead: a at once");
        assert_eq!(hostport(&g.target()), "a:1");
        for _ in 0..3 {
            assert!(g.redirect("b:2"));
            assert_eq!(hostport(&g.target()), "b:2");
            assert_eq!(g.failed(), Next::Pause);
            assert_eq!(hostport(&g.target()), "a:1");
        }
        g.welcomed();
        assert_eq!(
            hostport(&g.target()),
            "a:1",
            "a claimed it: the agent stays"
        );
        // Not HOST:PORT: not followed.
        assert!(!g.redirect("nonsense"));
        // Two gateways that keep naming each other end in the back-off.
        let mut g = Gateways::parse("a:1,b:2", 443, None).unwrap();
        let followed = (0..MAX_REDIRECTS + 5)
            .take_while(|i| g.redirect(if i % 2 == 0 { "b:2" } else { "a:1" }))
            .count();
        assert_eq!(followed as u32, MAX_REDIRECTS);
        assert!(Gateways::parse(" , ", 443, None).is_err());
        assert!(Gateways::parse("a:1,nohost", 443, None).is_err());
    }
}
