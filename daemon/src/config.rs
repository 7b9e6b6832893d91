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
}

/// `[store]`: what the event log and the results keep (0: no limit of that kind).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
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
    /// Block size of triggered pushes, bytes.
    pub block_size: u32,
}

impl Default for WatchSection {
    fn default() -> Self {
        WatchSection {
            dir: None,
            group: None,
            interval_ms: 2000,
            rate_mbps: 200,
            block_size: 1400,
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
    /// FEC group size in blocks; 0: no parity repair.
    pub fec_group: u32,
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
            fec_group: 512,
        }
    }
}

/// One configuration key: its dotted name and what it means.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// `section.key` (or `key` at the top).
    pub name: &'static str,
    /// One-line meaning, with the unit.
    pub doc: &'static str,
    /// A list (environment value: comma-separated).
    pub list: bool,
}

const fn key(name: &'static str, doc: &'static str) -> Key {
    Key {
        name,
        doc,
        list: false,
    }
}

/// Every key, in print order.
pub const KEYS: &[Key] = &[
    key(
        "data_dir",
        "Data directory: store, CA and keys, admin socket, artifacts. Default: /var/lib/fleetcast for root, else $HOME/.local/state/fleetcast.",
    ),
    key("listen", "Address and port agents connect to (TLS)."),
    Key {
        name: "server_names",
        doc: "DNS names or IP addresses agents use to reach this gateway; they go into its TLS certificate.",
        list: true,
    },
    key(
        "heartbeat_secs",
        "Heartbeat interval agents are told to use, seconds (1-3600); a session silent for 3 intervals is closed.",
    ),
    key(
        "reboot_timeout_secs",
        "Time a device has to come back from a reboot step, seconds.",
    ),
    key(
        "listen_extra",
        "A second address served exactly like `listen` (every transport rung), e.g. 0.0.0.0:443 for agents whose network lets only HTTPS out. Unset: none.",
    ),
    key(
        "http_timeout_secs",
        "Seconds an HTTP request (Upgrade head, long-poll request) has to arrive complete before the connection is cut (slowloris).",
    ),
    key(
        "log.level",
        "Log filter: error, warn, info, debug, trace, or tracing directives like `info,fleetcast_daemon=debug`. When FLEETCAST_LOG_LEVEL is not set, RUST_LOG stands in for it.",
    ),
    key(
        "log.format",
        "Log line format on stderr: `text` or `json` (one object per line).",
    ),
    key(
        "mcast.addr",
        "This gateway's unicast IPv4 address on the devices' network: multicast is sent through its interface. Unset: multicast is off and `fleetcast push` is refused (there is deliberately no default).",
    ),
    key("mcast.port", "UDP port of the multicast group and of the NACK socket."),
    key("mcast.group", "IPv4 multicast group pushes are sent to (224.0.0.0/4)."),
    key(
        "mcast.linger_secs",
        "Seconds a finished multicast waits for targets that have not reported (late devices are caught up by unicast meanwhile).",
    ),
    key(
        "mcast.warmup_ms",
        "Milliseconds between a push's announces and its first block (time for receivers to join the group).",
    ),
    key(
        "mcast.fec_group",
        "Blocks per FEC group: repairs multicast fresh parity that heals different losses at different receivers at once. 0: repair by re-multicast and unicast only.",
    ),
    key(
        "artifacts.listen",
        "Serve the files of <data_dir>/artifacts/ over HTTP on this address, so `fetch` steps can name `gateway:NAME`. Unset: off.",
    ),
    key(
        "artifacts.url",
        "The URL agents use to reach artifacts.listen (default http://<its address>). Needs artifacts.listen.",
    ),
    key(
        "watch.dir",
        "A directory whose files are pushed when they appear or change (once unchanged over two scans). Files present at start are not pushed. Needs watch.group and mcast.addr. Unset: off.",
    ),
    key("watch.group", "Target group of the pushes watch.dir triggers."),
    key("watch.interval_ms", "How often watch.dir is scanned, milliseconds."),
    key("watch.rate_mbps", "Rate ceiling of the pushes watch.dir triggers, Mbit/s."),
    key("watch.block_size", "Block size of the pushes watch.dir triggers, bytes."),
    key(
        "store.events_keep_days",
        "Events older than this many days are deleted from the event log (pruned a little at a time). 0: no age limit.",
    ),
    key(
        "store.events_max",
        "At most this many events are kept (the oldest go first; the newest always stays). 0: no count limit.",
    ),
    key(
        "store.results_per_device",
        "Per device, the results (with their commands) of the last this many finished commands are kept; older ones are deleted. Pending and running commands are never touched. 0: keep all.",
    ),
    key(
        "admin.metrics_listen",
        "Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9477. Unset: off. No authentication: keep it on loopback or a management network.",
    ),
];

impl Key {
    /// The environment variable that overrides this key.
    pub fn env(&self) -> String {
        format!("FLEETCAST_{}", self.name.replace('.', "_").to_uppercase())
    }
}

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read configuration file {path}: {why}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        why: String,
    },
    /// The file is not valid TOML or does not fit the schema (the message shows the line and
    /// names the key).
    #[error("configuration file {path}: {why}")]
    File {
        /// File.
        path: String,
        /// The parser's message.
        why: String,
    },
    /// An environment variable's value does not fit its key.
    #[error("environment variable {var} (key `{key}`): {why}")]
    Env {
        /// Variable.
        var: String,
        /// Key.
        key: &'static str,
        /// Problem.
        why: String,
    },
    /// The merged value of a key is not acceptable.
    #[error("configuration key `{key}`: {why}")]
    Invalid {
        /// Key.
        key: &'static str,
        /// Problem and what to do.
        why: String,
    },
}

/// Loads the configuration: defaults, then `file`, then the environment `env` (the process's
/// in production, a fixed list in tests), then the `flags` (dotted key, TOML value).
pub fn load(
    file: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
    flags: &[(&'static str, toml::Value)],
) -> Result<Config, ConfigError> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                path: path.display().to_string(),
                why: e.to_string(),
            })?;
            // Typed parse first: its errors show the line and name the key.
            toml::from_str::<Config>(&text).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                why: e.to_string().trim_end().to_string(),
            })?;
            toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                why: e.to_string(),
            })?
        }
        None => toml::Table::new(),
    };
    for k in KEYS {
        let var = k.env();
        let Some(raw) = env(&var) else { continue };
        let value = env_value(k, &raw);
        let mut one = toml::Table::new();
        set(&mut one, k.name, value.clone());
        toml::Value::Table(one)
            .try_into::<Config>()
            .map_err(|e| ConfigError::Env {
                var,
                key: k.name,
                why: e.to_string().trim_end().to_string(),
            })?;
        set(&mut table, k.name, value);
    }
    for (name, value) in flags {
        set(&mut table, name, value.clone());
    }
    let cfg: Config = toml::Value::Table(table)
        .try_into()
        .map_err(|e| ConfigError::Invalid {
            key: "(flags)",
            why: e.to_string(),
        })?;
    cfg.validate()?;
    Ok(cfg)
}

/// An environment value as TOML: a list splits on commas; an integer-looking value is an
/// integer; anything else is a string.
fn env_value(k: &Key, raw: &str) -> toml::Value {
    if k.list {
        return toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect(),
        );
    }
    match raw.trim().parse::<i64>() {
        Ok(n) => toml::Value::Integer(n),
        Err(_) => toml::Value::String(raw.into()),
    }
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
    /// Checks what the types cannot: ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, why: String| Err(ConfigError::Invalid { key, why });
        if !(1..=3600).contains(&self.heartbeat_secs) {
            return bad(
                "heartbeat_secs",
                format!("{} is out of range: use 1 to 3600", self.heartbeat_secs),
            );
        }
        if !(1..=300).contains(&self.http_timeout_secs) {
            return bad(
                "http_timeout_secs",
                format!("{} is out of range: use 1 to 300", self.http_timeout_secs),
            );
        }
        if self.reboot_timeout_secs == 0 {
            return bad(
                "reboot_timeout_secs",
                "0 would fail every reboot: use at least 1".into(),
            );
        }
        if self.server_names.is_empty() || self.server_names.iter().any(|n| n.trim().is_empty()) {
            return bad(
                "server_names",
                "needs at least one non-empty name (what agents put in --gateway)".into(),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return bad(
                "log.level",
                format!(
                    "`{}` is not a log filter ({e}): use error, warn, info, debug or trace",
                    self.log.level
                ),
            );
        }
        if let Some(d) = &self.watch.dir {
            if self.watch.group.as_deref().is_none_or(str::is_empty) {
                return bad(
                    "watch.group",
                    format!("watch.dir {} needs a target group", d.display()),
                );
            }
            if self.mcast.addr.is_none() {
                return bad(
                    "watch.dir",
                    "pushes need multicast: set mcast.addr too".into(),
                );
            }
        }
        if self.mcast.fec_group > 32_768 {
            return bad(
                "mcast.fec_group",
                format!(
                    "{} is too large: use 0 (off) to 32768",
                    self.mcast.fec_group
                ),
            );
        }
        if self.watch.interval_ms < 100 {
            return bad(
                "watch.interval_ms",
                format!(
                    "{} ms is too often: use at least 100",
                    self.watch.interval_ms
                ),
            );
        }
        if self.watch.rate_mbps == 0 {
            return bad(
                "watch.rate_mbps",
                "0 would never send: use at least 1".into(),
            );
        }
        if !(512..=65_000).contains(&self.watch.block_size) {
            return bad(
                "watch.block_size",
                format!(
                    "{} is out of range: use 512 to 65000",
                    self.watch.block_size
                ),
            );
        }
        if !self.mcast.group.is_multicast() {
            return bad(
                "mcast.group",
                format!(
                    "{} is not a multicast address: use one in 224.0.0.0/4, e.g. 239.77.0.1",
                    self.mcast.group
                ),
            );
        }
        if let Some(a) = self.mcast.addr {
            if a.is_multicast() || a.is_unspecified() || a.is_broadcast() {
                return bad(
                    "mcast.addr",
                    format!("{a} is not a unicast address: give this gateway's own address on the devices' network"),
                );
            }
        }
        if self.mcast.port == 0 {
            return bad("mcast.port", "0 is not a usable port".into());
        }
        if self.store.events_keep_days > 36_500 {
            return bad(
                "store.events_keep_days",
                format!(
                    "{} days is more than a century: use 0 (no age limit) to 36500",
                    self.store.events_keep_days
                ),
            );
        }
        if self.artifacts.url.is_some() && self.artifacts.listen.is_none() {
            return bad(
                "artifacts.url",
                "is set but artifacts.listen is not: set both, or neither".into(),
            );
        }
        Ok(())
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
                ..WatchSection::default()
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
        ("artifacts.listen", "10.0.0.1:7380", "\"10.0.0.1:7380\""),
        ("artifacts.url", "http://gw/a", "\"http://gw/a\""),
        ("watch.dir", "/srv/drop", "\"/srv/drop\""),
        ("watch.group", "web", "\"web\""),
        ("watch.interval_ms", "500", "500"),
        ("watch.rate_mbps", "300", "300"),
        ("watch.block_size", "8000", "8000"),
        ("store.events_keep_days", "7", "7"),
        ("store.events_max", "5000", "5000"),
        ("store.results_per_device", "20", "20"),
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
        assert!(e.contains("prot") && e.contains("unknown field"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        let (_d, p) = file("[metrics]\nlisten = \"127.0.0.1:1\"\n");
        let e = load(Some(&p), no_env, &[]).unwrap_err().to_string();
        assert!(e.contains("metrics"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key_and_the_problem() {
        let (_d, p) = file("[mcast]\nport = \"seven\"\n");
        let e = load(Some(&p), no_env, &[]).unwrap_err().to_string();
        assert!(e.contains("port") && e.contains("line 2"), "{e}");
        let (_d, p) = file("heartbeat_secs = 0\n");
        let e = load(Some(&p), no_env, &[]).unwrap_err();
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
