//! `fleetcastd`'s configuration: one TOML file, environment overrides, command-line flags.
//!
//! Precedence, lowest first: built-in defaults, the file (`--config FILE`), environment
//! variables (`FLEETCAST_<SECTION>_<KEY>`, e.g. `FLEETCAST_MCAST_ADDR`; see [`KEYS`]), flags.
//! The result is validated once at start: an unknown key, a value of the wrong type or a value
//! out of range is an error naming the key (and the file line or the variable) and the problem.
//! `fleetcastd --print-config` prints the effective configuration in this same format.
//!
//! Invariants:
//! - [`KEYS`] lists every key, in the order `--print-config` prints them; a test checks that it
//!   matches [`Config`]'s fields and that `docs/configuration.md` documents each one.
//! - Environment variables not named in [`KEYS`] are ignored (other `FLEETCAST_*` variables
//!   belong to the CLI and the tests).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole configuration of the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Data directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Address agents connect to.
    pub listen: SocketAddr,
    /// A second address served like `listen` (e.g. port 443); unset: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_extra: Option<SocketAddr>,
    /// Seconds an HTTP request (Upgrade head, long-poll request) has to arrive complete.
    pub http_timeout_secs: u64,
    /// Names in the gateway's TLS certificate.
    pub server_names: Vec<String>,
    /// Heartbeat interval agents are told to use, seconds.
    pub heartbeat_secs: u32,
    /// Time a device has to come back from a reboot, seconds.
    pub reboot_timeout_secs: u64,
    /// Logging.
    pub log: LogConfig,
    /// Multicast distribution.
    pub mcast: McastSection,
    /// Artifact downloads over HTTP.
    pub artifacts: ArtifactsSection,
    /// Admin interface.
    pub admin: AdminSection,
    /// Watched-directory trigger.
    pub watch: WatchSection,
    /// Retention of the event log and results.
    pub store: StoreSection,
    /// Membership of a cell of gateways sharing one PostgreSQL database.
    pub cell: CellSection,
}

/// `[cell]`: this gateway as one of several sharing the fleet on one PostgreSQL database
/// (`store.engine = "postgres"`). Unset `gateway_id`: a gateway on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CellSection {
    /// This gateway's id in the cell, the same across its restarts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_id: Option<String>,
    /// Where agents reach this gateway (HOST:PORT), as the cell's other gateways redirect
    /// them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// The lease's length, milliseconds: how long the cell waits for a silent gateway before
    /// its devices may be claimed by the others.
    pub lease_ms: u64,
}

impl Default for CellSection {
    fn default() -> Self {
        CellSection {
            gateway_id: None,
            advertise: None,
            lease_ms: 5000,
        }
    }
}

/// Which storage engine holds the gateway's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreEngine {
    /// The embedded LMDB store in the data directory (the default).
    #[default]
    Lmdb,
    /// A PostgreSQL database (`store.url`).
    Postgres,
}

/// `[store]`: where the state lives, and what the event log and the results keep (0: no
/// limit of that kind).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// The engine.
    pub engine: StoreEngine,
    /// The PostgreSQL database (with `engine = "postgres"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A file holding the database password (its first line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Events older than this many days are deleted.
    pub events_keep_days: u64,
    /// At most this many events are kept.
    pub events_max: u64,
    /// Results (with their commands) of the last this many finished commands per device.
    pub results_per_device: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        let d = crate::retention::RetentionConfig::default();
        StoreSection {
            engine: StoreEngine::Lmdb,
            url: None,
            password_file: None,
            events_keep_days: d.events_keep_days,
            events_max: d.events_max,
            results_per_device: d.results_per_device,
        }
    }
}

/// `[watch]`: push every file that appears or changes in a directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchSection {
    /// The watched directory; unset: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Target group of the pushes it triggers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Scan interval, milliseconds.
    pub interval_ms: u64,
    /// Rate ceiling of triggered pushes, Mbit/s.
    pub rate_mbps: u64,
    /// Block size of triggered pushes, bytes (unset: fill `mcast.addr`'s MTU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// Follow-up commands of triggered pushes, one step each in `queue add` step syntax;
    /// `{file}` stands for the pushed file's name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub then: Vec<String>,
}

impl Default for WatchSection {
    fn default() -> Self {
        WatchSection {
            dir: None,
            group: None,
            interval_ms: 2000,
            rate_mbps: 200,
            block_size: None,
            then: Vec::new(),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: a level or `target=level,...` directives.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[mcast]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McastSection {
    /// The gateway's unicast IPv4 address on the devices' network; unset: multicast off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<Ipv4Addr>,
    /// UDP port of the group and of the NACK socket.
    pub port: u16,
    /// Multicast group.
    pub group: Ipv4Addr,
    /// Seconds a finished multicast waits for targets that have not reported.
    pub linger_secs: u64,
    /// Milliseconds between a push's announces and its first block.
    pub warmup_ms: u64,
    /// FEC group size in blocks; 0: no parity repair; unset: about 720 KiB of blocks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fec_group: Option<u32>,
    /// Pushes go by broadcast to this address (the directed broadcast of `addr`'s subnet)
    /// unless they ask for multicast; unset: multicast unless a push asks for broadcast.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broadcast: Option<Ipv4Addr>,
}

/// `[artifacts]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ArtifactsSection {
    /// HTTP listen address for `<data_dir>/artifacts/`; unset: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// URL agents use to reach it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Prometheus metrics endpoint (`GET /metrics`); unset: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 7300)),
            listen_extra: None,
            http_timeout_secs: 5,
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            heartbeat_secs: 15,
            reboot_timeout_secs: 900,
            log: LogConfig::default(),
            mcast: McastSection::default(),
            artifacts: ArtifactsSection::default(),
            admin: AdminSection::default(),
            watch: WatchSection::default(),
            store: StoreSection::default(),
            cell: CellSection::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Default for McastSection {
    fn default() -> Self {
        McastSection {
            addr: None,
            port: 7301,
            group: Ipv4Addr::new(239, 77, 0, 1),
            linger_secs: 60,
            warmup_ms: 300,
            fec_group: None,
            broadcast: None,
        }
    }
}

/// What a key's value is, for environment values and for the hints of errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A path (a TOML string).
    Path,
    /// An address, `IP:PORT` or `IP` (a TOML string).
    Addr,
    /// Other text (a TOML string).
    Text,
    /// A whole number.
    Int,
    /// A list of strings (environment value: comma-separated).
    List,
}

/// One configuration key: its dotted name, what it means and what it accepts.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// `section.key` (or `key` at the top).
    pub name: &'static str,
    /// One-line meaning, with the unit.
    pub doc: &'static str,
    /// The kind of value.
    pub kind: Kind,
    /// The values accepted, in words, for error messages (`it takes ...`).
    pub accepts: &'static str,
    /// An example value as written in the file.
    pub example: &'static str,
}

const fn key(
    name: &'static str,
    kind: Kind,
    accepts: &'static str,
    example: &'static str,
    doc: &'static str,
) -> Key {
    Key {
        name,
        doc,
        kind,
        accepts,
        example,
    }
}

use Kind::{Addr, Int, List, Path as PathKind, Text};

/// Every key, in print order.
pub const KEYS: &[Key] = &[
    key(
        "data_dir",
        PathKind,
        "a directory path",
        "\"/var/lib/fleetcast\"",
        "Data directory: store, CA and keys, admin socket, artifacts. Default: /var/lib/fleetcast for root, else $HOME/.local/state/fleetcast.",
    ),
    key(
        "listen",
        Addr,
        "an IP address and port",
        "\"0.0.0.0:7300\"",
        "Address and port agents connect to (TLS).",
    ),
    key(
        "server_names",
        List,
        "a list of DNS names or IP addresses",
        "[\"gw.example.net\", \"10.0.0.1\"]",
        "DNS names or IP addresses agents use to reach this gateway; they go into its TLS certificate.",
    ),
    key(
        "heartbeat_secs",
        Int,
        "a whole number of seconds from 1 to 3600",
        "15",
        "Heartbeat interval agents are told to use, seconds (1-3600); a session silent for 3 intervals is closed.",
    ),
    key(
        "reboot_timeout_secs",
        Int,
        "a whole number of seconds from 1 to 2592000 (30 days)",
        "900",
        "Time a device has to come back from a reboot step, seconds.",
    ),
    key(
        "listen_extra",
        Addr,
        "an IP address and port",
        "\"0.0.0.0:443\"",
        "A second address served exactly like `listen` (every transport rung), e.g. 0.0.0.0:443 for agents whose network lets only HTTPS out. Unset: none.",
    ),
    key(
        "http_timeout_secs",
        Int,
        "a whole number of seconds from 1 to 300",
        "5",
        "Seconds an HTTP request (Upgrade head, long-poll request) has to arrive complete before the connection is cut (slowloris).",
    ),
    key(
        "log.level",
        Text,
        "a level (error, warn, info, debug, trace or off), optionally followed by TARGET=LEVEL directives",
        "\"info,fleetcast_daemon=debug\"",
        "Log filter: error, warn, info, debug, trace, or tracing directives like `info,fleetcast_daemon=debug`. When FLEETCAST_LOG_LEVEL is not set, RUST_LOG stands in for it.",
    ),
    key(
        "log.format",
        Text,
        "text or json",
        "\"text\"",
        "Log line format on stderr: `text` or `json` (one object per line).",
    ),
    key(
        "mcast.addr",
        Addr,
        "this gateway's unicast IPv4 address on the devices' network",
        "\"10.0.0.1\"",
        "This gateway's unicast IPv4 address on the devices' network: multicast is sent through its interface. Unset: multicast is off and `fleetcast push` is refused (there is deliberately no default).",
    ),
    key(
        "mcast.port",
        Int,
        "a UDP port from 1 to 65535",
        "7301",
        "UDP port of the multicast group and of the NACK socket.",
    ),
    key(
        "mcast.group",
        Addr,
        "an IPv4 multicast address (224.0.0.0/4)",
        "\"239.77.0.1\"",
        "IPv4 multicast group pushes are sent to (224.0.0.0/4).",
    ),
    key(
        "mcast.linger_secs",
        Int,
        "a whole number of seconds from 0 to 86400",
        "60",
        "Seconds a finished multicast waits for targets that have not reported (late devices are caught up by unicast meanwhile).",
    ),
    key(
        "mcast.warmup_ms",
        Int,
        "a whole number of milliseconds from 0 to 60000",
        "300",
        "Milliseconds between a push's announces and its first block (time for receivers to join the group).",
    ),
    key(
        "mcast.fec_group",
        Int,
        "a whole number of blocks from 0 (off) to 32768",
        "512",
        "Blocks per FEC group: repairs multicast fresh parity that heals different losses at different receivers at once. 0: repair by re-multicast and unicast only. Unset: groups of about 720 KiB, 509 blocks of 1444 bytes (MTU 1500) and 82 of 8944 (MTU 9000), between 32 and 512.",
    ),
    key(
        "mcast.broadcast",
        Addr,
        "the directed broadcast address of mcast.addr's subnet (e.g. 10.0.0.255 for 10.0.0.1/24)",
        "\"10.0.0.255\"",
        "Pushes go by subnet-directed broadcast to this address instead of the multicast group (same datagrams and repair), through mcast.addr's interface only; a push can still ask for multicast (`fleetcast push --multicast`). It must be that interface's own broadcast address: fleetcastd refuses to start otherwise. Unset: multicast, unless a push asks for broadcast (`fleetcast push --broadcast`).",
    ),
    key(
        "artifacts.listen",
        Addr,
        "an IP address and port",
        "\"0.0.0.0:7380\"",
        "Serve the files of <data_dir>/artifacts/ over HTTP on this address, so `fetch` steps can name `gateway:NAME`. Unset: off.",
    ),
    key(
        "artifacts.url",
        Text,
        "an http:// or https:// URL",
        "\"http://gw.example.net:7380\"",
        "The URL agents use to reach artifacts.listen (default http://<its address>). Needs artifacts.listen.",
    ),
    key(
        "watch.dir",
        PathKind,
        "a directory path",
        "\"/srv/fleetcast/drop\"",
        "A directory whose files are pushed when they appear or change (once unchanged over two scans). Files present at start are not pushed. Needs watch.group and mcast.addr. Unset: off.",
    ),
    key(
        "watch.group",
        Text,
        "a group name",
        "\"web\"",
        "Target group of the pushes watch.dir triggers.",
    ),
    key(
        "watch.interval_ms",
        Int,
        "a whole number of milliseconds from 100 to 3600000",
        "2000",
        "How often watch.dir is scanned, milliseconds.",
    ),
    key(
        "watch.rate_mbps",
        Int,
        "a whole number of Mbit/s from 1 to 100000",
        "200",
        "Rate ceiling of the pushes watch.dir triggers, Mbit/s.",
    ),
    key(
        "watch.block_size",
        Int,
        "a whole number of bytes from 512 to 65000",
        "1400",
        "Block size of the pushes watch.dir triggers, bytes. Unset: the block that fills a frame of mcast.addr's interface (1444 at MTU 1500).",
    ),
    key(
        "watch.then",
        List,
        "a list of steps in `fleetcast queue add` syntax (sh:, exec:, install:, fetch:, verify:, write:, reboot, report)",
        "[\"sh:dpkg -i /var/lib/fleetcast/downloads/{file}\"]",
        "Commands queued on each device once its copy of a file watch.dir pushed verified, one step each, in order ({file}: the file's name; in sh: steps it is passed quoted, as $1). In the environment, comma-separated. Unset: none.",
    ),
    key(
        "store.engine",
        Text,
        "lmdb (the embedded store in the data directory) or postgres (store.url)",
        "\"postgres\"",
        "Where the gateway keeps its state: lmdb, the embedded store in <data_dir>/store (the default, for one gateway), or postgres, the database store.url names (its schema is created or migrated at start; a database with a newer schema is refused). Several gateways sharing one database is the cell of docs/operator.md, not built yet.",
    ),
    key(
        "store.url",
        Text,
        "a libpq connection string (host=/run/postgresql dbname=fleetcast user=fleetcast) or a postgresql:// URL, without a password",
        "\"host=/run/postgresql dbname=fleetcast user=fleetcast\"",
        "The PostgreSQL database, with store.engine = postgres. Put no password in it: use store.password_file or PGPASSWORD. TLS to the database is not built yet: sslmode=require is refused; use a Unix socket or a trusted network.",
    ),
    key(
        "store.password_file",
        PathKind,
        "a path to a file whose first line is the database password",
        "\"/etc/fleetcast/db-password\"",
        "The database password, read from this file at start (keep it 0600). Unset: the environment's PGPASSWORD, else none (e.g. peer authentication over a Unix socket).",
    ),
    key(
        "store.events_keep_days",
        Int,
        "a whole number of days from 0 (no age limit) to 36500",
        "30",
        "Events older than this many days are deleted from the event log (pruned a little at a time). 0: no age limit.",
    ),
    key(
        "store.events_max",
        Int,
        "a whole number of events, 0 for no count limit",
        "100000",
        "At most this many events are kept (the oldest go first; the newest always stays). 0: no count limit.",
    ),
    key(
        "store.results_per_device",
        Int,
        "a whole number of finished commands, 0 to keep all",
        "1000",
        "Per device, the results (with their commands) of the last this many finished commands are kept; older ones are deleted. Pending and running commands are never touched. 0: keep all.",
    ),
    key(
        "cell.gateway_id",
        Text,
        "a name of 1 to 64 letters, digits, '-', '_' or '.'",
        "\"gw-a\"",
        "This gateway's id in a cell of gateways sharing the fleet on one PostgreSQL database (needs store.engine = postgres and cell.advertise). Keep it across restarts; each start is a new incarnation of it. Unset: a gateway on its own.",
    ),
    key(
        "cell.advertise",
        Text,
        "HOST:PORT as agents reach this gateway (one of their gateway list's entries)",
        "\"gw-a.example.net:7300\"",
        "Where agents reach this gateway: the cell's other gateways send a device's agent here while this gateway owns the device. Write it as the agents' configuration lists it.",
    ),
    key(
        "cell.lease_ms",
        Int,
        "a whole number of milliseconds from 1000 to 60000",
        "5000",
        "Length of this gateway's lease in the cell, renewed every second. A gateway silent for this long (dead, or cut from the database) loses its devices to the others; shorter re-homes faster, longer rides out longer database stalls.",
    ),
    key(
        "admin.metrics_listen",
        Addr,
        "an IP address and port",
        "\"127.0.0.1:9477\"",
        "Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9477. Unset: off. No authentication: keep it on loopback or a management network.",
    ),
];

/// Letters, digits, `-`, `_` and `.`, 1 to 64 of them: an id that reads the same in logs,
/// the database and a metrics label.
fn valid_gateway_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `HOST:PORT` with a non-empty host and a port from 1 to 65535.
fn host_port(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty() && !h.contains(char::is_whitespace) && p.parse::<u16>().is_ok_and(|p| p > 0)
    })
}

/// The key named `name`.
pub fn lookup(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

impl Key {
    /// The environment variable that overrides this key.
    pub fn env(&self) -> String {
        format!("FLEETCAST_{}", self.name.replace('.', "_").to_uppercase())
    }
}

/// Log levels, as `log.level` accepts them (any case).
const LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace", "off"];

/// Checks a `log.level` filter: comma-separated directives, each a level or `TARGET=LEVEL`.
/// `tracing` would also take a bare word as "everything from that target", but then
/// `verbose` (a misspelt level) would silence the whole log: a target needs its `=LEVEL`.
fn check_filter(filter: &str) -> Result<(), FilterError> {
    let level = |l: &str| LEVELS.iter().any(|x| x.eq_ignore_ascii_case(l.trim()));
    let directives: Vec<&str> = filter.split(',').map(str::trim).collect();
    if directives.iter().all(|d| d.is_empty()) {
        return Err(FilterError::Empty);
    }
    for d in directives.into_iter().filter(|d| !d.is_empty()) {
        match d.rsplit_once('=') {
            None if !level(d) => return Err(FilterError::NotALevel(d.into())),
            Some((target, l)) if target.trim().is_empty() || !level(l) => {
                return Err(FilterError::NotTargetLevel(d.into()))
            }
            _ => {}
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| FilterError::Rejected {
            filter: filter.into(),
            reason: e.to_string(),
        })
}

/// What is wrong with a `log.level` filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// No directive at all.
    #[error("the filter is empty")]
    Empty,
    /// A bare word that is no level.
    #[error("`{0}` is not a level")]
    NotALevel(String),
    /// `TARGET=LEVEL` without a target or a level.
    #[error("`{0}` is not TARGET=LEVEL with a level")]
    NotTargetLevel(String),
    /// `tracing` refuses the filter.
    #[error("`{filter}` is not a log filter ({reason})")]
    Rejected {
        /// The filter.
        filter: String,
        /// `tracing`'s reason.
        reason: String,
    },
}

/// What is wrong with one value of a key; [`Unfit`] adds what the key takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A number outside the key's range.
    #[error("{0} is out of range")]
    OutOfRange(u64),
    /// An empty path.
    #[error("the path is empty")]
    EmptyPath,
    /// No server name.
    #[error("the list is empty (agents put one of its names in --gateway)")]
    NoServerNames,
    /// A server name that cannot be in a certificate.
    #[error("`{0}` is neither a DNS name nor an IP address")]
    BadServerName(String),
    /// A `log.level` that is no filter.
    #[error(transparent)]
    Filter(FilterError),
    /// `mcast.addr` is not a unicast address.
    #[error("{0} is not a unicast address")]
    NotUnicast(Ipv4Addr),
    /// `mcast.group` is not a multicast address.
    #[error("{0} is not a multicast address")]
    NotMulticast(Ipv4Addr),
    /// `mcast.broadcast` cannot be a subnet's directed broadcast.
    #[error("{0} is not a subnet's broadcast address")]
    NotDirectedBroadcast(Ipv4Addr),
    /// `artifacts.url` is not an HTTP URL.
    #[error("`{0}` is not an http:// or https:// URL")]
    NotHttpUrl(String),
    /// An empty name.
    #[error("the name is empty")]
    EmptyName,
    /// An environment value of a number key that is not a whole number.
    #[error("`{0}` is not a whole number")]
    NotANumber(String),
    /// A `watch.then` step that does not parse or breaks a rule.
    #[error(transparent)]
    BadStep(Box<crate::watch::ThenError>),
    /// `store.engine = "postgres"` without `store.url`.
    #[error("store.engine is postgres but no database is named")]
    NoStoreUrl,
    /// A `store.url` that does not parse or asks for what is not built.
    #[error("{0}")]
    StoreUrl(String),
    /// A `cell.gateway_id` with characters outside its alphabet, empty or too long.
    #[error("`{0}` is not a gateway id")]
    BadGatewayId(String),
    /// A `cell.advertise` that is not HOST:PORT.
    #[error("`{0}` is not HOST:PORT")]
    NotHostPort(String),
    /// A value of the wrong type, in the words of the TOML parser.
    #[error("{0}")]
    Type(String),
}

/// A value its key does not take: what is wrong, and what the key takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}; it takes {accepts}")]
pub struct Unfit {
    /// What is wrong.
    pub problem: Problem,
    /// The values the key accepts, in words ([`Key::accepts`]).
    pub accepts: &'static str,
}

/// Why the merged configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rule {
    /// A value its key does not take.
    #[error(transparent)]
    Unfit(Unfit),
    /// `watch.dir` without `watch.group`.
    #[error("watch.dir {} needs a target group", .0.display())]
    WatchWithoutGroup(PathBuf),
    /// `watch.dir` without `mcast.addr`.
    #[error("pushes need multicast: set mcast.addr too")]
    WatchWithoutMcast,
    /// `artifacts.url` without `artifacts.listen`.
    #[error("is set but artifacts.listen is not: set both, or neither")]
    UrlWithoutListen,
    /// `cell.gateway_id` with the embedded store.
    #[error(
        "a cell shares one PostgreSQL database: set store.engine = \"postgres\" and store.url"
    )]
    CellWithoutPostgres,
    /// `cell.gateway_id` without `cell.advertise`.
    #[error("is unset: a gateway in a cell needs the address agents reach it at")]
    CellWithoutAdvertise,
    /// `cell.advertise` outside a cell.
    #[error("is set but cell.gateway_id is not: set both, or neither")]
    AdvertiseWithoutCell,
    /// The merged table does not fit the schema, in the words of the TOML parser.
    #[error("{0}")]
    Merge(String),
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema (the message shows the line and
    /// names the key).
    #[error("configuration file {path}: {why}")]
    File {
        /// File.
        path: String,
        /// The TOML parser's message, explained: the line, the key, what it takes, the line
        /// itself.
        why: String,
    },
    /// A value in the file its key does not take.
    #[error(
        "configuration file {path}: line {line}: key `{key}`: {unfit}, e.g. {example}\n{shown}"
    )]
    FileValue {
        /// File.
        path: String,
        /// The line (from 1).
        line: usize,
        /// Key.
        key: &'static str,
        /// What is wrong, and what the key takes (boxed: errors stay small).
        unfit: Box<Unfit>,
        /// An example as the file writes it (`leaf = value`).
        example: String,
        /// The line itself, numbered.
        shown: String,
    },
    /// An environment variable's value does not fit its key.
    #[error("environment variable {var} (key `{key}`): {unfit}, {example}")]
    Env {
        /// Variable.
        var: String,
        /// Key.
        key: &'static str,
        /// What is wrong, and what the key takes (boxed: errors stay small).
        unfit: Box<Unfit>,
        /// An example as the environment writes it (`e.g. VAR=value`).
        example: String,
    },
    /// The merged value of a key is not acceptable.
    #[error("configuration key `{key}`: {why}")]
    Invalid {
        /// Key.
        key: &'static str,
        /// The rule broken.
        why: Rule,
    },
}

/// Loads the configuration: defaults, then `file`, then the environment `env` (the process's
/// in production, a fixed list in tests; `RUST_LOG` stands in for an unset
/// `FLEETCAST_LOG_LEVEL`), then the `flags` (dotted key, TOML value).
///
/// Each value is checked where it comes from, so the error names the file line or the
/// variable as well as the key and what it accepts; the merged result is checked again
/// (flags, and rules between keys).
pub fn load(
    file: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
    flags: &[(&'static str, toml::Value)],
) -> Result<Config, ConfigError> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let file_err = |why| ConfigError::File {
                path: path.display().to_string(),
                why,
            };
            let table = toml::from_str::<toml::Table>(&text)
                .map_err(|e| file_err(explain(&text, &e, true)))?;
            let cfg =
                toml::from_str::<Config>(&text).map_err(|e| file_err(explain(&text, &e, false)))?;
            for k in KEYS {
                let Some(n) = line_of(&text, k.name) else {
                    continue;
                };
                cfg.check(k).map_err(|unfit| {
                    let leaf = k.name.rsplit('.').next().unwrap_or(k.name);
                    ConfigError::FileValue {
                        path: path.display().to_string(),
                        line: n,
                        key: k.name,
                        unfit: Box::new(unfit),
                        example: format!("{leaf} = {}", k.example),
                        shown: show_line(&text, n),
                    }
                })?;
            }
            table
        }
        None => toml::Table::new(),
    };
    for k in KEYS {
        let mut var = k.env();
        let mut raw = env(&var);
        if raw.is_none() && k.name == "log.level" {
            raw = env("RUST_LOG");
            var = "RUST_LOG".into();
        }
        let Some(raw) = raw else { continue };
        let env_err = |unfit: Unfit| ConfigError::Env {
            var: var.clone(),
            key: k.name,
            unfit: Box::new(unfit),
            // The example as an environment value: no TOML quotes.
            example: format!("e.g. {var}={}", k.example.replace('"', "")),
        };
        let value = env_value(k, &raw).map_err(env_err)?;
        let mut one = toml::Table::new();
        set(&mut one, k.name, value.clone());
        let cfg: Config = toml::Value::Table(one).try_into().map_err(|e| {
            env_err(Unfit {
                problem: Problem::Type(e.message().trim().into()),
                accepts: k.accepts,
            })
        })?;
        cfg.check(k).map_err(env_err)?;
        set(&mut table, k.name, value);
    }
    for (name, value) in flags {
        let mut one = toml::Table::new();
        set(&mut one, name, value.clone());
        if let Err(e) = toml::Value::Table(one).try_into::<Config>() {
            let accepts = lookup(name).map_or("", |k| k.accepts);
            return Err(ConfigError::Invalid {
                key: name,
                why: Rule::Unfit(Unfit {
                    problem: Problem::Type(e.message().trim().into()),
                    accepts,
                }),
            });
        }
        set(&mut table, name, value.clone());
    }
    let cfg: Config = toml::Value::Table(table)
        .try_into()
        .map_err(|e| ConfigError::Invalid {
            key: "(flags)",
            why: Rule::Merge(e.to_string()),
        })?;
    cfg.validate()?;
    Ok(cfg)
}

/// An environment value as TOML, by the key's kind: a list splits on commas, a number must be
/// digits, anything else is the string as given.
fn env_value(k: &Key, raw: &str) -> Result<toml::Value, Unfit> {
    Ok(match k.kind {
        Kind::List => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect(),
        ),
        Kind::Int => toml::Value::Integer(raw.trim().parse().map_err(|_| Unfit {
            problem: Problem::NotANumber(raw.into()),
            accepts: k.accepts,
        })?),
        Kind::Path | Kind::Addr | Kind::Text => toml::Value::String(raw.into()),
    })
}

/// Line `n` (from 1) of `text`, shown under an error.
fn show_line(text: &str, n: usize) -> String {
    format!("  {n} | {}", text.lines().nth(n - 1).unwrap_or_default())
}

/// The dotted key set on line `n` of `text` (the section header above it, and the key before
/// its `=`), if that line sets one.
fn key_on_line(text: &str, n: usize) -> Option<String> {
    let mut section = String::new();
    for (i, line) in text.lines().enumerate().take(n) {
        let l = line.trim();
        if let Some(h) = l.strip_prefix('[').and_then(|h| h.split(']').next()) {
            section = h.trim().trim_matches('"').to_string();
            if i + 1 == n {
                return None;
            }
            continue;
        }
        if i + 1 == n {
            let (k, _) = l.split_once('=')?;
            let k: String = k
                .split('.')
                .map(|p| p.trim().trim_matches(['"', '\'']))
                .collect::<Vec<_>>()
                .join(".");
            if k.is_empty() || k.starts_with('#') {
                return None;
            }
            return Some(if section.is_empty() {
                k
            } else {
                format!("{section}.{k}")
            });
        }
    }
    None
}

/// The line (from 1) of `text` that sets the dotted key `name`, if one does.
fn line_of(text: &str, name: &str) -> Option<usize> {
    (1..=text.lines().count()).find(|&n| key_on_line(text, n).as_deref() == Some(name))
}

/// A TOML error (`syntax`: of the parser; else of the schema) as one line that names the line
/// and the key, says what the key accepts, and hints at the usual mistake, then the line.
fn explain(text: &str, e: &toml::de::Error, syntax: bool) -> String {
    let msg = e.message().trim();
    let Some(n) = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
    else {
        return msg.to_string();
    };
    let shown = show_line(text, n);
    let Some(name) = key_on_line(text, n) else {
        return format!("line {n}: {msg}\n{shown}");
    };
    let leaf = name.rsplit('.').next().unwrap_or(&name);
    let Some(k) = lookup(&name) else {
        if KEYS.iter().any(|k| k.name.starts_with(&format!("{name}."))) {
            return format!(
                "line {n}: `{name}` is a section: write [{name}] and its keys on the lines below\n{shown}"
            );
        }
        let (section, _) = name.rsplit_once('.').unwrap_or(("", &name));
        let known: Vec<&str> = KEYS
            .iter()
            .filter_map(|k| {
                let (s, l) = k.name.rsplit_once('.').unwrap_or(("", k.name));
                (s == section).then_some(l)
            })
            .collect();
        let place = if section.is_empty() {
            "at the top".to_string()
        } else {
            format!("in [{section}]")
        };
        return format!(
            "line {n}: unknown key `{name}`; the keys {place} are {}\n{shown}",
            known.join(", ")
        );
    };
    if msg.starts_with("duplicate key") {
        return format!("line {n}: key `{name}` is set twice\n{shown}");
    }
    let value = text
        .lines()
        .nth(n - 1)
        .and_then(|l| l.split_once('='))
        .map_or("", |(_, v)| v.trim());
    let hint = match k.kind {
        Kind::Addr | Kind::Path | Kind::Text | Kind::List
            if syntax && !value.starts_with(['"', '\'', '[']) =>
        {
            let what = match k.kind {
                Kind::Addr => "addresses are strings",
                Kind::Path => "paths are strings",
                Kind::List => "it is a list of strings",
                _ => "its value is a string",
            };
            let fixed = match k.kind {
                Kind::List => format!("[\"{value}\"]"),
                _ => format!("\"{value}\""),
            };
            format!("; {what}: {leaf} = {fixed}")
        }
        _ => format!("; it takes {}, e.g. {leaf} = {}", k.accepts, k.example),
    };
    let msg = match (syntax, hint.starts_with("; it takes")) {
        (false, _) => msg.to_string(),
        (true, true) => format!("`{value}` is not a TOML value ({msg})"),
        (true, false) => format!("`{value}` is not a TOML value"),
    };
    format!("line {n}: key `{name}`: {msg}{hint}\n{shown}")
}

fn set(table: &mut toml::Table, dotted: &str, value: toml::Value) {
    match dotted.split_once('.') {
        None => {
            table.insert(dotted.into(), value);
        }
        Some((section, rest)) => {
            let sub = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !sub.is_table() {
                *sub = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(t) = sub {
                set(t, rest, value);
            }
        }
    }
}

impl Config {
    /// Checks what the types cannot: each key's range or format, then the rules between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for k in KEYS {
            self.check(k).map_err(|unfit| ConfigError::Invalid {
                key: k.name,
                why: Rule::Unfit(unfit),
            })?;
        }
        let bad = |key, why| Err(ConfigError::Invalid { key, why });
        if let Some(d) = &self.watch.dir {
            if self.watch.group.is_none() {
                return bad("watch.group", Rule::WatchWithoutGroup(d.clone()));
            }
            if self.mcast.addr.is_none() {
                return bad("watch.dir", Rule::WatchWithoutMcast);
            }
        }
        if self.artifacts.url.is_some() && self.artifacts.listen.is_none() {
            return bad("artifacts.url", Rule::UrlWithoutListen);
        }
        if self.cell.gateway_id.is_some() {
            if self.store.engine != StoreEngine::Postgres {
                return bad("cell.gateway_id", Rule::CellWithoutPostgres);
            }
            if self.cell.advertise.is_none() {
                return bad("cell.advertise", Rule::CellWithoutAdvertise);
            }
        } else if self.cell.advertise.is_some() {
            return bad("cell.advertise", Rule::AdvertiseWithoutCell);
        }
        Ok(())
    }

    /// The value of key `k` on its own: `Err` says what is wrong and what `k` accepts.
    fn check(&self, k: &Key) -> Result<(), Unfit> {
        let takes = |problem| {
            Err(Unfit {
                problem,
                accepts: k.accepts,
            })
        };
        let range = |v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                takes(Problem::OutOfRange(v))
            }
        };
        match k.name {
            "data_dir" | "watch.dir" => {
                let d = if k.name == "data_dir" {
                    &self.data_dir
                } else {
                    &self.watch.dir
                };
                match d {
                    Some(d) if d.as_os_str().is_empty() => takes(Problem::EmptyPath),
                    _ => Ok(()),
                }
            }
            "server_names" => {
                if self.server_names.is_empty() {
                    return takes(Problem::NoServerNames);
                }
                for n in &self.server_names {
                    if rustls::pki_types::ServerName::try_from(n.as_str()).is_err() {
                        return takes(Problem::BadServerName(n.clone()));
                    }
                }
                Ok(())
            }
            "heartbeat_secs" => range(self.heartbeat_secs.into(), 1, 3600),
            "reboot_timeout_secs" => range(self.reboot_timeout_secs, 1, 30 * 86_400),
            "http_timeout_secs" => range(self.http_timeout_secs, 1, 300),
            "log.level" => check_filter(&self.log.level).or_else(|e| takes(Problem::Filter(e))),
            "mcast.addr" => match self.mcast.addr {
                Some(a) if a.is_multicast() || a.is_unspecified() || a.is_broadcast() => {
                    takes(Problem::NotUnicast(a))
                }
                _ => Ok(()),
            },
            "mcast.port" => range(self.mcast.port.into(), 1, 65_535),
            "mcast.group" if !self.mcast.group.is_multicast() => {
                takes(Problem::NotMulticast(self.mcast.group))
            }
            "mcast.linger_secs" => range(self.mcast.linger_secs, 0, 86_400),
            "mcast.warmup_ms" => range(self.mcast.warmup_ms, 0, 60_000),
            "mcast.fec_group" => match self.mcast.fec_group {
                Some(g) => range(g.into(), 0, 32_768),
                None => Ok(()),
            },
            // The subnet is checked against the interface at start (`daemon_main`); here
            // only what no interface's directed broadcast can be.
            "mcast.broadcast" => match self.mcast.broadcast {
                Some(a) if a.is_multicast() || a.is_unspecified() || a.is_broadcast() => {
                    takes(Problem::NotDirectedBroadcast(a))
                }
                _ => Ok(()),
            },
            "artifacts.url" => match &self.artifacts.url {
                Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                    takes(Problem::NotHttpUrl(u.clone()))
                }
                _ => Ok(()),
            },
            "watch.group" => match &self.watch.group {
                Some(g) if g.trim().is_empty() => takes(Problem::EmptyName),
                _ => Ok(()),
            },
            "watch.interval_ms" => range(self.watch.interval_ms, 100, 3_600_000),
            "watch.rate_mbps" => range(self.watch.rate_mbps, 1, 100_000),
            "watch.block_size" => match self.watch.block_size {
                Some(b) => range(b.into(), 512, 65_000),
                None => Ok(()),
            },
            "watch.then" => match crate::watch::follow_up_templates(&self.watch.then) {
                Ok(_) => Ok(()),
                Err(e) => takes(Problem::BadStep(Box::new(e))),
            },
            "store.events_keep_days" => range(self.store.events_keep_days, 0, 36_500),
            "cell.gateway_id" => match &self.cell.gateway_id {
                Some(id) if !valid_gateway_id(id) => takes(Problem::BadGatewayId(id.clone())),
                _ => Ok(()),
            },
            "cell.advertise" => match &self.cell.advertise {
                Some(a) if !host_port(a) => takes(Problem::NotHostPort(a.clone())),
                _ => Ok(()),
            },
            "cell.lease_ms" => range(self.cell.lease_ms, 1000, 60_000),
            "store.url" => match (&self.store.url, self.store.engine) {
                (None, StoreEngine::Postgres) => takes(Problem::NoStoreUrl),
                (Some(u), _) => match fleetcast_store::pg::check_url(u) {
                    Ok(_) => Ok(()),
                    Err(e) => takes(Problem::StoreUrl(e.to_string())),
                },
                (None, StoreEngine::Lmdb) => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// The effective configuration as TOML, each key preceded by its documentation; keys that
    /// are unset are printed commented out.
    pub fn to_toml(&self) -> String {
        let table = toml::Table::try_from(self).unwrap_or_default();
        let mut out = String::from(
            "# fleetcastd configuration (`fleetcastd --config FILE`).\n\
             # Every key is optional; environment variables FLEETCAST_<SECTION>_<KEY> and\n\
             # command-line flags override the file. See docs/configuration.md.\n",
        );
        let mut section = "";
        for k in KEYS {
            let (sec, leaf) = k.name.split_once('.').unwrap_or(("", k.name));
            if sec != section {
                out.push_str(&format!("\n[{sec}]\n"));
                section = sec;
            } else {
                out.push('\n');
            }
            out.push_str(&format!("# {} (env {})\n", k.doc, k.env()));
            let v = if sec.is_empty() {
                table.get(leaf)
            } else {
                table
                    .get(sec)
                    .and_then(|t| t.as_table())
                    .and_then(|t| t.get(leaf))
            };
            match v {
                Some(v) => out.push_str(&format!("{leaf} = {v}\n")),
                None => out.push_str(&format!("# {leaf} =\n")),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fleetcastd.toml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn defaults_are_valid_and_print_every_key() {
        let c = load(None, no_env, &[]).unwrap();
        assert_eq!(c, Config::default());
        let text = c.to_toml();
        for k in KEYS {
            let leaf = k.name.rsplit('.').next().unwrap();
            assert!(
                text.contains(&format!("{leaf} =")),
                "{} missing:\n{text}",
                k.name
            );
            assert!(text.contains(&k.env()), "{}", k.env());
        }
        // The printed defaults read back as the same configuration.
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn keys_match_the_struct_and_the_docs() {
        // Every field, with every option set, is a key of KEYS and the other way round.
        let full = Config {
            data_dir: Some("/d".into()),
            listen_extra: Some("127.0.0.1:3".parse().unwrap()),
            mcast: McastSection {
                addr: Some(Ipv4Addr::new(10, 0, 0, 1)),
                broadcast: Some(Ipv4Addr::new(10, 0, 0, 255)),
                fec_group: Some(512),
                ..McastSection::default()
            },
            artifacts: ArtifactsSection {
                listen: Some("127.0.0.1:1".parse().unwrap()),
                url: Some("http://x".into()),
            },
            admin: AdminSection {
                metrics_listen: Some("127.0.0.1:2".parse().unwrap()),
            },
            watch: WatchSection {
                dir: Some("/w".into()),
                group: Some("g".into()),
                then: vec!["report".into()],
                block_size: Some(1400),
                ..WatchSection::default()
            },
            store: StoreSection {
                url: Some("dbname=f".into()),
                password_file: Some("/p".into()),
                ..StoreSection::default()
            },
            cell: CellSection {
                gateway_id: Some("gw".into()),
                advertise: Some("gw:7300".into()),
                ..CellSection::default()
            },
            ..Config::default()
        };
        let t = toml::Table::try_from(&full).unwrap();
        let mut leaves = Vec::new();
        for (k, v) in &t {
            match v.as_table() {
                Some(sub) => leaves.extend(sub.keys().map(|l| format!("{k}.{l}"))),
                None => leaves.push(k.clone()),
            }
        }
        let mut names: Vec<String> = KEYS.iter().map(|k| k.name.to_string()).collect();
        leaves.sort();
        names.sort();
        assert_eq!(leaves, names);
        let doc = include_str!("../../docs/configuration.md");
        for k in KEYS {
            assert!(
                doc.contains(&format!("`{}`", k.name)),
                "{} undocumented",
                k.name
            );
            assert!(doc.contains(&k.env()), "{} undocumented", k.env());
        }
    }

    /// A valid, non-default value for every key (environment form, TOML form).
    const SAMPLES: &[(&str, &str, &str)] = &[
        ("data_dir", "/srv/fc", "\"/srv/fc\""),
        ("listen", "10.0.0.1:7000", "\"10.0.0.1:7000\""),
        (
            "server_names",
            "a.example,10.0.0.1",
            "[\"a.example\", \"10.0.0.1\"]",
        ),
        ("heartbeat_secs", "20", "20"),
        ("listen_extra", "10.0.0.1:443", "\"10.0.0.1:443\""),
        ("http_timeout_secs", "9", "9"),
        ("reboot_timeout_secs", "60", "60"),
        ("log.level", "debug", "\"debug\""),
        ("log.format", "json", "\"json\""),
        ("mcast.addr", "10.0.0.1", "\"10.0.0.1\""),
        ("mcast.port", "7400", "7400"),
        ("mcast.group", "239.1.2.3", "\"239.1.2.3\""),
        ("mcast.linger_secs", "9", "9"),
        ("mcast.warmup_ms", "50", "50"),
        ("mcast.fec_group", "256", "256"),
        ("mcast.broadcast", "10.0.0.255", "\"10.0.0.255\""),
        ("artifacts.listen", "10.0.0.1:7380", "\"10.0.0.1:7380\""),
        ("artifacts.url", "http://gw/a", "\"http://gw/a\""),
        ("watch.dir", "/srv/drop", "\"/srv/drop\""),
        ("watch.group", "web", "\"web\""),
        ("watch.interval_ms", "500", "500"),
        ("watch.rate_mbps", "300", "300"),
        ("watch.block_size", "8000", "8000"),
        ("watch.then", "sh:dpkg -i {file}", "[\"sh:dpkg -i {file}\"]"),
        ("store.engine", "postgres", "\"postgres\""),
        (
            "store.url",
            "host=/run/postgresql dbname=f",
            "\"host=/run/postgresql dbname=f\"",
        ),
        ("store.password_file", "/etc/f/pw", "\"/etc/f/pw\""),
        ("store.events_keep_days", "7", "7"),
        ("store.events_max", "5000", "5000"),
        ("store.results_per_device", "20", "20"),
        ("cell.gateway_id", "gw-b", "\"gw-b\""),
        ("cell.advertise", "gw-b:7300", "\"gw-b:7300\""),
        ("cell.lease_ms", "3000", "3000"),
        (
            "admin.metrics_listen",
            "127.0.0.1:9477",
            "\"127.0.0.1:9477\"",
        ),
    ];

    #[test]
    fn every_key_can_be_set_from_the_environment_and_a_file() {
        let mut names: Vec<&str> = SAMPLES.iter().map(|s| s.0).collect();
        let mut keys: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
        names.sort_unstable();
        keys.sort_unstable();
        assert_eq!(names, keys, "a sample per key");
        let env = |var: &str| {
            SAMPLES
                .iter()
                .find(|(k, _, _)| KEYS.iter().any(|key| key.name == *k && key.env() == var))
                .map(|(_, v, _)| v.to_string())
        };
        let from_env = load(None, env, &[]).unwrap();
        assert_ne!(from_env, Config::default());
        let text = from_env.to_toml();
        for (k, _, toml) in SAMPLES {
            let leaf = k.rsplit('.').next().unwrap();
            assert!(
                text.contains(&format!("\n{leaf} = {toml}\n")),
                "{k}:\n{text}"
            );
        }
        // The same values from a file.
        let (_d, p) = file(&text);
        assert_eq!(load(Some(&p), no_env, &[]).unwrap(), from_env);
    }

    #[test]
    fn file_then_env_then_flags() {
        let (_d, p) = file(
            "listen = \"127.0.0.1:7000\"\nheartbeat_secs = 5\n[mcast]\nport = 9000\n[log]\nformat = \"json\"\n",
        );
        let c = load(Some(&p), no_env, &[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!((c.heartbeat_secs, c.mcast.port), (5, 9000));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(
            c.reboot_timeout_secs, 900,
            "untouched keys keep their default"
        );
        let env = |v: &str| match v {
            "FLEETCAST_MCAST_PORT" => Some("9100".into()),
            "FLEETCAST_MCAST_ADDR" => Some("10.1.2.3".into()),
            "FLEETCAST_SERVER_NAMES" => Some("gw.example, 10.1.2.3".into()),
            "FLEETCAST_ADMIN_METRICS_LISTEN" => Some("127.0.0.1:9477".into()),
            "FLEETCAST_UNRELATED" => Some("ignored".into()),
            _ => None,
        };
        let c = load(Some(&p), env, &[]).unwrap();
        assert_eq!(c.mcast.port, 9100);
        assert_eq!(c.mcast.addr, Some(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(c.server_names, ["gw.example", "10.1.2.3"]);
        assert_eq!(
            c.admin.metrics_listen,
            Some("127.0.0.1:9477".parse().unwrap())
        );
        assert_eq!(c.heartbeat_secs, 5, "the file still applies");
        let c = load(
            Some(&p),
            env,
            &[
                ("mcast.port", toml::Value::Integer(9200)),
                ("heartbeat_secs", toml::Value::Integer(7)),
            ],
        )
        .unwrap();
        assert_eq!((c.mcast.port, c.heartbeat_secs), (9200, 7));
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let (_d, p) = file("listen = \"127.0.0.1:7000\"\n[mcast]\nprot = 9000\n");
        let e = load(Some(&p), no_env, &[]).unwrap_err().to_string();
        assert!(
            e.contains("line 3: unknown key `mcast.prot`; the keys in [mcast] are addr, port,"),
            "{e}"
        );
        assert!(e.contains("  3 | prot = 9000"), "{e}");
        let (_d, p) = file("[metrics]\nlisten = \"127.0.0.1:1\"\n");
        let e = load(Some(&p), no_env, &[]).unwrap_err().to_string();
        assert!(e.contains("metrics"), "{e}");
        let (_d, p) = file("mcast = 5\n");
        let e = load(Some(&p), no_env, &[]).unwrap_err().to_string();
        assert!(e.contains("`mcast` is a section: write [mcast]"), "{e}");
        assert!(!e.contains("McastSection"), "a Rust type name: {e}");
    }

    /// Load with a file of `text` and no environment; the error's text.
    fn file_error(text: &str) -> String {
        let (_d, p) = file(text);
        load(Some(&p), no_env, &[]).unwrap_err().to_string()
    }

    #[test]
    fn toml_mistakes_name_the_line_and_the_key_and_show_the_fix() {
        for (text, want) in [
            (
                "heartbeat_secs = 20\nlisten = 0.0.0.0:7300\n",
                "line 2: key `listen`: `0.0.0.0:7300` is not a TOML value; addresses are strings: listen = \"0.0.0.0:7300\"",
            ),
            (
                "data_dir = /srv/fc\n",
                "line 1: key `data_dir`: `/srv/fc` is not a TOML value; paths are strings: data_dir = \"/srv/fc\"",
            ),
            (
                "[mcast]\naddr = 10.0.0.1\n",
                "line 2: key `mcast.addr`: `10.0.0.1` is not a TOML value; addresses are strings: addr = \"10.0.0.1\"",
            ),
            (
                "[mcast]\nport = \"seven\"\n",
                "line 2: key `mcast.port`: invalid type: string \"seven\", expected u16; it takes a UDP port from 1 to 65535, e.g. port = 7301",
            ),
            (
                "listen = \"1.2.3.4:5\"\nlisten = \"1.2.3.4:6\"\n",
                "line 2: key `listen` is set twice",
            ),
            (
                "[log]\nformat = \"xml\"\n",
                "line 2: key `log.format`: unknown variant `xml`, expected `text` or `json`; it takes text or json",
            ),
        ] {
            let e = file_error(text);
            assert!(e.contains(want), "{text:?}: want {want:?} in:\n{e}");
        }
    }

    #[test]
    fn every_key_is_checked_and_the_message_says_what_it_takes() {
        // (file text, key, what the message must say).
        let cases = [
            ("heartbeat_secs = 0\n", "heartbeat_secs", "0 is out of range; it takes a whole number of seconds from 1 to 3600"),
            ("reboot_timeout_secs = 99999999\n", "reboot_timeout_secs", "out of range"),
            ("http_timeout_secs = 0\n", "http_timeout_secs", "from 1 to 300"),
            ("server_names = []\n", "server_names", "the list is empty"),
            ("server_names = [\"a b\"]\n", "server_names", "`a b` is neither a DNS name nor an IP address"),
            ("data_dir = \"\"\n", "data_dir", "the path is empty"),
            ("[log]\nlevel = \"verbose\"\n", "log.level", "`verbose` is not a level; it takes a level (error, warn, info, debug, trace or off)"),
            ("[log]\nlevel = \"info,web=loud\"\n", "log.level", "`web=loud` is not TARGET=LEVEL"),
            ("[log]\nlevel = \" , \"\n", "log.level", "the filter is empty"),
            ("[mcast]\naddr = \"239.1.1.1\"\n", "mcast.addr", "not a unicast address"),
            ("[mcast]\nport = 0\n", "mcast.port", "0 is out of range; it takes a UDP port"),
            ("[mcast]\ngroup = \"10.0.0.1\"\n", "mcast.group", "not a multicast address"),
            ("[mcast]\nlinger_secs = 100000\n", "mcast.linger_secs", "from 0 to 86400"),
            ("[mcast]\nwarmup_ms = 100000\n", "mcast.warmup_ms", "from 0 to 60000"),
            ("[mcast]\nfec_group = 40000\n", "mcast.fec_group", "from 0 (off) to 32768"),
            ("[mcast]\nbroadcast = \"255.255.255.255\"\n", "mcast.broadcast", "255.255.255.255 is not a subnet's broadcast address; it takes the directed broadcast address of mcast.addr's subnet"),
            ("[mcast]\nbroadcast = \"239.1.1.1\"\n", "mcast.broadcast", "not a subnet's broadcast address"),
            ("[artifacts]\nlisten = \"127.0.0.1:1\"\nurl = \"ftp://x\"\n", "artifacts.url", "not an http:// or https:// URL"),
            ("[watch]\ngroup = \" \"\n", "watch.group", "the name is empty"),
            ("[watch]\ninterval_ms = 10\n", "watch.interval_ms", "from 100 to 3600000"),
            ("[watch]\nrate_mbps = 0\n", "watch.rate_mbps", "from 1 to 100000"),
            ("[watch]\nblock_size = 100\n", "watch.block_size", "from 512 to 65000"),
            ("[watch]\nthen = [\"shell:ls\"]\n", "watch.then", "step 1 (`shell:ls`): unknown step `shell:ls`"),
            ("[watch]\nthen = [\"reboot\", \"fetch:/x\"]\n", "watch.then", "fetch:PATH=URL"),
            ("[cell]\ngateway_id = \"gw a\"\n", "cell.gateway_id", "`gw a` is not a gateway id; it takes a name of 1 to 64 letters"),
            ("[cell]\nadvertise = \"gw\"\n", "cell.advertise", "`gw` is not HOST:PORT"),
            ("[cell]\nlease_ms = 100\n", "cell.lease_ms", "from 1000 to 60000"),
        ];
        for (text, key, want) in cases {
            let e = file_error(text);
            assert!(
                e.contains(&format!("key `{key}`: ")) && e.contains(want),
                "{text:?}: want `{key}` and {want:?} in:\n{e}"
            );
            assert!(e.contains("line "), "{text:?}: no line in {e}");
        }
        // Valid filters stay valid.
        for ok in [
            "info",
            "WARN",
            "off",
            "info,fleetcast_daemon=debug",
            "fleetcast_daemon::gateway=trace",
        ] {
            assert_eq!(check_filter(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn environment_values_are_checked_naming_the_variable() {
        let one = |var: &'static str, value: &'static str| {
            load(None, move |v| (v == var).then(|| value.to_string()), &[])
                .unwrap_err()
                .to_string()
        };
        let e = one("FLEETCAST_LOG_LEVEL", "verbose");
        assert!(
            e.starts_with("environment variable FLEETCAST_LOG_LEVEL (key `log.level`): `verbose` is not a level"),
            "{e}"
        );
        let e = one("RUST_LOG", "verbose");
        assert!(
            e.starts_with("environment variable RUST_LOG (key `log.level`)"),
            "{e}"
        );
        let e = one("FLEETCAST_MCAST_PORT", "x");
        assert!(
            e.contains("`x` is not a whole number; it takes a UDP port from 1 to 65535, e.g. FLEETCAST_MCAST_PORT=7301"),
            "{e}"
        );
        let e = one("FLEETCAST_LISTEN", "nowhere");
        assert!(
            e.contains("it takes an IP address and port, e.g. FLEETCAST_LISTEN=0.0.0.0:7300"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
        let e = one("FLEETCAST_HEARTBEAT_SECS", "0");
        assert!(
            e.contains("FLEETCAST_HEARTBEAT_SECS") && e.contains("out of range"),
            "{e}"
        );
        // A text key keeps a value that looks like a number.
        let c = load(
            None,
            |v| (v == "FLEETCAST_WATCH_GROUP").then(|| "123".into()),
            &[],
        )
        .unwrap();
        assert_eq!(c.watch.group.as_deref(), Some("123"));
        // A flag's value is checked too, naming the key.
        let e = load(
            None,
            no_env,
            &[("log.format", toml::Value::String("xml".into()))],
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "log.format",
                    ..
                }
            ) && e.to_string().contains("text or json"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_the_key_and_the_problem() {
        let (_d, p) = file("[mcast]\nport = \"seven\"\n");
        let e = load(Some(&p), no_env, &[]).unwrap_err().to_string();
        assert!(e.contains("port") && e.contains("line 2"), "{e}");
        // A flag's value out of range is an error of the merged configuration.
        let e = load(None, no_env, &[("heartbeat_secs", toml::Value::Integer(0))]).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "heartbeat_secs",
                    ..
                }
            ),
            "{e}"
        );
        let (_d, p) = file("[mcast]\ngroup = \"10.0.0.1\"\n");
        let e = load(Some(&p), no_env, &[]).unwrap_err().to_string();
        assert!(
            e.contains("`mcast.group`") && e.contains("not a multicast"),
            "{e}"
        );
        let (_d, p) = file("[log]\nformat = \"xml\"\n");
        let e = load(Some(&p), no_env, &[]).unwrap_err().to_string();
        assert!(e.contains("format") && e.contains("json"), "{e}");
        let (_d, p) = file("[artifacts]\nurl = \"http://x\"\n");
        let e = load(Some(&p), no_env, &[]).unwrap_err().to_string();
        assert!(e.contains("`artifacts.url`"), "{e}");
        // A cell needs PostgreSQL and an address to redirect agents to; an address needs a cell.
        for (text, want) in [
            (
                "[cell]\ngateway_id = \"gw\"\nadvertise = \"gw:1\"\n",
                "`cell.gateway_id`: a cell shares one PostgreSQL database",
            ),
            (
                "[store]\nengine = \"postgres\"\nurl = \"dbname=f\"\n[cell]\ngateway_id = \"gw\"\n",
                "`cell.advertise`: is unset",
            ),
            (
                "[cell]\nadvertise = \"gw:1\"\n",
                "`cell.advertise`: is set but cell.gateway_id is not",
            ),
        ] {
            let (_d, p) = file(text);
            let e = load(Some(&p), no_env, &[]).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = load(
            None,
            |v| (v == "FLEETCAST_MCAST_PORT").then(|| "x".into()),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("FLEETCAST_MCAST_PORT") && e.contains("`mcast.port`"),
            "{e}"
        );
        let e = load(
            None,
            |v| (v == "FLEETCAST_MCAST_ADDR").then(|| "239.1.1.1".into()),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`mcast.addr`") && e.contains("unicast"), "{e}");
        let e = load(Some(Path::new("/nonexistent/fleetcastd.toml")), no_env, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }
}
