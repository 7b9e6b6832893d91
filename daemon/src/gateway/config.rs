//! The loop's parameters: what it listens on and the budgets it works within.

use super::*;

/// Loop parameters.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where agents connect.
    pub listen: SocketAddr,
    /// A second address served identically (e.g. port 443 for agents behind firewalls).
    pub extra_listen: Option<SocketAddr>,
    /// Time an HTTP request (Upgrade head, long-poll request) has to arrive complete.
    pub http_timeout: Duration,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Session core parameters.
    pub session: session::Config,
    /// New connections accepted per iteration.
    pub accept_budget: usize,
    /// Ciphertext bytes read from one connection per iteration.
    pub read_budget: usize,
    /// Most connections at once (agents and admin clients).
    pub max_connections: usize,
    /// Listen backlog: a reconnect storm of thousands of agents overflows the default 128 and
    /// turns into TCP retry waits (measured: 10,000-agent storm 11.8 s → 7.4 s at 4096).
    /// The kernel caps it at `net.core.somaxconn`.
    pub listen_backlog: i32,
    /// Readiness events taken per `poll`: bounds how many results one iteration (one store
    /// commit, one fsync) can gather.
    pub events_capacity: usize,
    /// Artifact downloads over HTTP (`fetch` steps naming `gateway:NAME`); `None`: off.
    pub artifacts: Option<ArtifactsConfig>,
    /// Multicast distribution; `None`: pushes are refused.
    pub mcast: Option<McastConfig>,
    /// A directory whose new or changed files are pushed (needs `mcast`); `None`: off.
    pub watch: Option<WatchConfig>,
    /// Where the Prometheus metrics endpoint listens (`GET /metrics`); `None`: off.
    pub metrics_listen: Option<SocketAddr>,
    /// What the event log and the results keep (pruned incrementally by the loop).
    pub retention: crate::retention::RetentionConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:7300".parse().expect("literal address"),
            extra_listen: None,
            http_timeout: Duration::from_secs(5),
            admin_socket: PathBuf::from("admin.sock"),
            session: session::Config::default(),
            accept_budget: 256,
            read_budget: 64 * 1024,
            max_connections: 100_000,
            listen_backlog: 4096,
            events_capacity: 8192,
            artifacts: None,
            mcast: None,
            watch: None,
            metrics_listen: None,
            retention: crate::retention::RetentionConfig::default(),
        }
    }
}

/// Where artifacts are served from, and how agents reach them.
#[derive(Debug, Clone)]
pub struct ArtifactsConfig {
    /// Listening address of the HTTP artifact endpoint.
    pub listen: SocketAddr,
    /// The flat directory served (`<data-dir>/artifacts`).
    pub root: PathBuf,
    /// URL agents use for it (`gateway:NAME` in a `fetch` becomes `<base_url>/NAME`);
    /// `None`: `http://` and the bound address.
    pub base_url: Option<String>,
}
