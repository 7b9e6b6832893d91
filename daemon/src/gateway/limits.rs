//! Connection caps, the descriptor reserve, eviction and deadlines of the listeners.
//!
//! # The descriptor budget ([`Budget`])
//! At bind the gateway raises its soft `RLIMIT_NOFILE` to the hard limit, counts the
//! descriptors it already holds, keeps [`SPARE_FDS`] free for its own use (store, pushed
//! files, backups, the metrics endpoint's connections, the accept in progress) and splits
//! the rest into per-class caps, so no class can starve another:
//!
//! | class | cap | descriptors each |
//! |---|---|---|
//! | admin clients (the CLI) | [`ADMIN_CONNS`] (reserved first) | 1 |
//! | unauthenticated agent-port connections (TLS handshakes, enrolments, plain-HTTP long-poll requests) | 1/8 of the rest | 1 |
//! | artifact downloads | 1/32 of the rest | 2 (socket and file) |
//! | long-poll relays | 1/32 of the rest | 1 |
//! | authenticated agents (a client certificate from this CA) | everything left (about 78%) | 1 |
//!
//! So a flood of the agent or artifact port fills only its own class: the CLI and enrolled
//! agents still get descriptors. `GatewayConfig::max_connections` caps the total on top.
//!
//! # Eviction and backpressure
//! When an unauthenticated class is full, a new connection replaces the oldest one that
//! has sent nothing at all for [`IDLE_EVICT`] (checked with a peek at its socket) or is
//! older than [`STALE_EVICT`]: an attacker's idle or slow connections, never a real agent's
//! handshake, whose first bytes come with the connection and which takes milliseconds. When
//! none qualifies (a reconnect storm of real agents, all busy handshaking), the listener is
//! left alone for [`ACCEPT_RETRY`]: the connections wait in the kernel's backlog instead of
//! evicting each other.
//!
//! # Deadlines of artifact connections
//! The request must be complete within `GatewayConfig::http_timeout` of the accept (as on
//! the agent port's HTTP rungs); a response the client stops reading is closed once no byte
//! went out for [`ARTIFACT_STALL`].

use super::*;

/// Descriptors kept free for the process itself (store, pushed files, backups, the metrics
/// endpoint's 16 connections, an accept in progress).
pub const SPARE_FDS: usize = 64;
/// Admin connections at once (each CLI command is one short connection: scripts running
/// many in parallel fit); their descriptors are reserved before any other class. One more
/// is answered "too many admin connections at once: retry" and closed.
pub const ADMIN_CONNS: usize = 64;
/// An unauthenticated connection that sent nothing for this long may be evicted.
pub const IDLE_EVICT: Duration = Duration::from_millis(100);
/// Any unauthenticated connection this old may be evicted.
pub const STALE_EVICT: Duration = Duration::from_secs(3);
/// How long a full class leaves its listener alone before accepting again.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// An artifact response that sent nothing for this long is closed.
pub const ARTIFACT_STALL: Duration = Duration::from_secs(30);
/// Eviction looks at most this many of the oldest candidates.
const EVICT_SCAN: usize = 64;

/// What a connection counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    Admin,
    Artifact,
    Relay,
    Unauthenticated,
    Agent,
}

impl Class {
    fn index(self) -> usize {
        self as usize
    }

    pub(super) fn of(conn: &Conn) -> Class {
        match conn {
            Conn::Agent(c) if c.authenticated => Class::Agent,
            Conn::Agent(_) => Class::Unauthenticated,
            Conn::Admin(_) => Class::Admin,
            Conn::Artifact(_) => Class::Artifact,
            Conn::Relay(_) => Class::Relay,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Class::Admin => "admin",
            Class::Artifact => "artifact",
            Class::Relay => "long-poll relay",
            Class::Unauthenticated => "unauthenticated agent-port",
            Class::Agent => "authenticated agent",
        }
    }
}

/// Per-class connection caps derived from the descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The soft `RLIMIT_NOFILE` the budget was computed from.
    pub descriptors: usize,
    /// Descriptors already open when it was computed.
    pub in_use: usize,
    /// Admin clients.
    pub admin: usize,
    /// Artifact downloads (two descriptors each).
    pub artifacts: usize,
    /// Long-poll relays.
    pub relays: usize,
    /// Agent-port connections not (yet) authenticated by a client certificate.
    pub unauthenticated: usize,
    /// Authenticated agents.
    pub agents: usize,
}

impl Budget {
    /// Splits `descriptors` minus the `in_use` ones and [`SPARE_FDS`] (see the module docs);
    /// every class gets a small minimum even when the limit is tiny.
    pub fn split(descriptors: usize, in_use: usize) -> Budget {
        let rest = descriptors
            .saturating_sub(in_use)
            .saturating_sub(SPARE_FDS)
            .saturating_sub(ADMIN_CONNS);
        let unauthenticated = (rest / 8).max(8);
        let artifacts = (rest / 32).max(2);
        let relays = (rest / 32).max(2);
        let agents = rest
            .saturating_sub(unauthenticated + 2 * artifacts + relays)
            .max(8);
        Budget {
            descriptors,
            in_use,
            admin: ADMIN_CONNS,
            artifacts,
            relays,
            unauthenticated,
            agents,
        }
    }

    /// The budget of this process: raises the soft descriptor limit to the hard one first.
    pub fn of_process() -> Budget {
        Budget::split(raise_nofile(), fds_in_use())
    }

    fn cap(&self, class: Class) -> usize {
        match class {
            Class::Admin => self.admin,
            Class::Artifact => self.artifacts,
            Class::Relay => self.relays,
            Class::Unauthenticated => self.unauthenticated,
            Class::Agent => self.agents,
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit now in force.
fn raise_nofile() -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, exclusively borrowed `rlimit` the call fills in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    if r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: `raised` is a valid `rlimit`; raising the soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            r = raised;
        }
    }
    // RLIM_INFINITY, or more than a gateway will ever use: a large finite number.
    usize::try_from(r.rlim_cur)
        .unwrap_or(usize::MAX)
        .min(1 << 24)
}

/// Descriptors open in this process (`/proc/self/fd`, without the one reading it).
fn fds_in_use() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(32, |d| d.count().saturating_sub(1))
}

/// Whether nothing at all arrived on `sock` yet (not even a FIN): its first bytes may just
/// not have been read, so the socket is asked, not the connection's state.
fn sent_nothing(sock: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(sock.peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Connections per class now.
#[derive(Debug, Default)]
pub(super) struct Counts([usize; 5]);

impl Counts {
    pub(super) fn get(&self, c: Class) -> usize {
        self.0[c.index()]
    }
    pub(super) fn add(&mut self, c: Class) {
        self.0[c.index()] += 1;
    }
    pub(super) fn remove(&mut self, c: Class) {
        self.0[c.index()] = self.0[c.index()].saturating_sub(1);
    }
}

/// A connection that may be evicted, in accept order.
pub(super) type Candidate = (usize, ConnId, Instant);

/// A warning repeated at most every few seconds, with the count of the ones left out.
#[derive(Debug, Default)]
pub(super) struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// Whether to log now; `Some(n)`: yes, `n` were left out since the last one.
    pub(super) fn due(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now - t < Duration::from_secs(5)) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The loop's limit state.
#[derive(Debug)]
pub(super) struct Limits {
    pub(super) budget: Budget,
    pub(super) counts: Counts,
    /// Unauthenticated agent-port connections, oldest first (stale entries are skipped).
    unauth: VecDeque<Candidate>,
    /// Artifact connections, oldest first.
    artifacts: VecDeque<Candidate>,
    /// Listeners left alone until then (their class was full, nothing evictable).
    pub(super) agents_paused: Option<Instant>,
    pub(super) artifacts_paused: Option<Instant>,
    full: Throttle,
    /// Warnings of refused enrolments.
    pub(super) enrol_log: Throttle,
    /// Failed enrolments per source.
    pub(super) enrol: crate::ratelimit::EnrolLimiter,
}

impl Limits {
    pub(super) fn new(budget: Budget) -> Limits {
        Limits {
            budget,
            counts: Counts::default(),
            unauth: VecDeque::new(),
            artifacts: VecDeque::new(),
            agents_paused: None,
            artifacts_paused: None,
            full: Throttle::default(),
            enrol_log: Throttle::default(),
            enrol: crate::ratelimit::EnrolLimiter::default(),
        }
    }

    /// Counts agent connection `c` as authenticated from now on (a client certificate of
    /// this CA, or a long-poll request of a relay whose session has one). `false`: the class
    /// of authenticated agents is full (logged), the connection should be closed.
    pub(super) fn authenticate(&mut self, c: &mut AgentConn, id: ConnId) -> bool {
        if c.authenticated {
            return true;
        }
        if !self.has_room(Class::Agent) {
            tracing::warn!(
                conn = id,
                cap = self.budget.agents,
                descriptors = self.budget.descriptors,
                "authenticated agent refused: the descriptor budget for agents is full (raise LimitNOFILE / ulimit -n)"
            );
            return false;
        }
        c.authenticated = true;
        self.counts.remove(Class::Unauthenticated);
        self.counts.add(Class::Agent);
        true
    }

    /// Whether `class` has room for one more connection.
    pub(super) fn has_room(&self, class: Class) -> bool {
        self.counts.get(class) < self.budget.cap(class)
    }

    /// The earliest paused listener's retry time.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        match (self.agents_paused, self.artifacts_paused) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn remember(&mut self, class: Class, c: Candidate) {
        match class {
            Class::Unauthenticated => self.unauth.push_back(c),
            Class::Artifact => self.artifacts.push_back(c),
            _ => {}
        }
    }
}

impl Gateway {
    /// Counts a connection just added to the slab, and remembers it as an eviction candidate.
    pub(super) fn count_new(&mut self, idx: usize, id: ConnId, now: Instant) {
        let class = Class::of(&self.conns[idx].conn);
        self.limits.counts.add(class);
        self.limits.remember(class, (idx, id, now));
        self.prune_candidates(class);
    }

    /// Drops candidate entries of connections that are gone or changed class (they are
    /// otherwise dropped lazily) once the queue grew well past its class's size.
    fn prune_candidates(&mut self, class: Class) {
        let conns = &self.conns;
        let (q, cap) = match class {
            Class::Unauthenticated => (&mut self.limits.unauth, self.limits.budget.unauthenticated),
            Class::Artifact => (&mut self.limits.artifacts, self.limits.budget.artifacts),
            _ => return,
        };
        if q.len() > 2 * cap + EVICT_SCAN {
            q.retain(|(i, id, _)| {
                conns
                    .get(*i)
                    .is_some_and(|s| s.id == *id && Class::of(&s.conn) == class)
            });
        }
    }

    /// Whether one more connection of `class` (unauthenticated or artifact) may be accepted:
    /// `Some(None)` there is room, `Some(Some(i))` there will be once candidate `i` is
    /// evicted ([`Gateway::evict`], only after an accept actually returned a connection),
    /// `None` the class is full with nothing evictable: its listener is paused for
    /// [`ACCEPT_RETRY`] and new connections wait in the kernel's backlog.
    pub(super) fn room_for(&mut self, class: Class, now: Instant) -> Option<Option<usize>> {
        if self.limits.has_room(class) {
            return Some(None);
        }
        if let Some(i) = self.evictable(class, now) {
            return Some(Some(i));
        }
        let pause = Some(now + ACCEPT_RETRY);
        match class {
            Class::Artifact => self.limits.artifacts_paused = pause,
            _ => self.limits.agents_paused = pause,
        }
        if let Some(left_out) = self.limits.full.due(now) {
            tracing::warn!(
                class = class.name(),
                cap = self.limits.budget.cap(class),
                descriptors = self.limits.budget.descriptors,
                left_out,
                "connection class full and nothing evictable: new connections wait in the backlog"
            );
        }
        None
    }

    /// Closes candidate `i` of `class` (from [`Gateway::room_for`]) at once, releasing its
    /// descriptor before the next accept.
    pub(super) fn evict(&mut self, class: Class, i: usize, now: Instant) {
        let q = match class {
            Class::Unauthenticated => &mut self.limits.unauth,
            _ => &mut self.limits.artifacts,
        };
        if let Some((idx, id, since)) = q.remove(i) {
            tracing::debug!(
                conn = id,
                class = class.name(),
                age_ms = (now - since).as_millis() as u64,
                "connection evicted: its class is full"
            );
            self.remove_conn(idx);
        }
    }

    /// The position in its queue of the oldest connection of `class` that may be evicted.
    fn evictable(&mut self, class: Class, now: Instant) -> Option<usize> {
        let conns = &self.conns;
        let q = match class {
            Class::Unauthenticated => &mut self.limits.unauth,
            Class::Artifact => &mut self.limits.artifacts,
            _ => return None,
        };
        // Stale entries at the front cost nothing to drop.
        while let Some((i, id, _)) = q.front() {
            let live = conns
                .get(*i)
                .is_some_and(|s| s.id == *id && Class::of(&s.conn) == class);
            if live {
                break;
            }
            q.pop_front();
        }
        q.iter().take(EVICT_SCAN).position(|(i, id, since)| {
            let Some(slot) = conns.get(*i).filter(|s| s.id == *id) else {
                return false;
            };
            let age = now - *since;
            match &slot.conn {
                Conn::Agent(c) if !c.authenticated => {
                    age >= STALE_EVICT
                        || (age >= IDLE_EVICT
                            && matches!(c.sniff, ladder::Sniffing::Outer)
                            && sent_nothing(&c.tls.sock))
                }
                // A real request arrives with the connection: one still unread after
                // IDLE_EVICT is idle or slow.
                Conn::Artifact(a) => !a.responding && age >= IDLE_EVICT,
                _ => false,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_leaves_most_to_agents_and_something_to_everyone() {
        let b = Budget::split(256, 16);
        assert_eq!(b.admin, ADMIN_CONNS);
        let used = b.admin + b.unauthenticated + 2 * b.artifacts + b.relays + b.agents;
        assert!(used + 16 + SPARE_FDS <= 256, "{b:?}");
        assert!(
            b.agents > b.unauthenticated && b.unauthenticated >= 8,
            "{b:?}"
        );
        let b = Budget::split(1 << 20, 20);
        assert!(b.agents * 100 / (1 << 20) >= 75, "{b:?}");
        // A tiny limit still gives every class a minimum.
        let b = Budget::split(32, 30);
        assert!(b.artifacts >= 2 && b.relays >= 2 && b.unauthenticated >= 8 && b.agents >= 8);
    }
}
