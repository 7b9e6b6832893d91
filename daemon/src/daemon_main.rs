//! The `fleetcastd` command line, as a library function (the binary and `fleetcast demo` use it).
//!
//! The gateway keeps everything in its data directory: the LMDB store (`store/`), its CA and
//! server key (`pki/`), the admin socket (`admin.sock`) and the lock that keeps a second
//! gateway off the directory (`fleetcastd.lock`, see [`crate::datadir`]). Restarting it at any
//! instant loses nothing.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{self, Config, LogFormat, StoreEngine};
use crate::datadir::{self, Tightened};
use crate::distribution::McastConfig;
use crate::exit::Exit;
use crate::fleet::{Fleet, FleetConfig};
use crate::gateway::{ArtifactsConfig, Clock, Gateway, GatewayConfig};
use crate::output;
use crate::paths::default_data_dir;
use crate::pki::Pki;
use crate::sd_notify;
use clap::Parser;
use fleetcast_store::Store;

#[derive(Parser, Debug)]
#[command(
    name = "fleetcastd",
    version,
    about = "The fleetcast gateway daemon",
    after_help = "Every setting can come from the configuration file (--config), from an \
                  environment variable FLEETCAST_<SECTION>_<KEY>, or from the flag; flags win over \
                  the environment, which wins over the file. `--print-config` shows the result. \
                  See docs/configuration.md."
)]
struct Args {
    /// Configuration file (TOML). Unknown keys and bad values are refused at start.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective configuration (file, environment and flags merged) as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Data directory (store, CA, admin socket) [key: data_dir].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address agents connect to [key: listen; default 0.0.0.0:7300].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// A second address served exactly like --listen (e.g. 0.0.0.0:443, for agents whose
    /// network lets only HTTPS out) [key: listen_extra].
    #[arg(long)]
    listen_extra: Option<SocketAddr>,
    /// Seconds an HTTP request (Upgrade head, long-poll request) has to arrive complete
    /// [key: http_timeout_secs; default 5].
    #[arg(long)]
    http_timeout: Option<u64>,
    /// Names (DNS or IP) agents use to reach this gateway; they go into its TLS certificate
    /// (repeat the flag for several) [key: server_names; default localhost, 127.0.0.1].
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Heartbeat interval agents are told to use, seconds [key: heartbeat_secs; default 15].
    #[arg(long)]
    heartbeat: Option<u32>,
    /// Time a device has to come back from a reboot, seconds [key: reboot_timeout_secs;
    /// default 900].
    #[arg(long)]
    reboot_timeout: Option<u64>,
    /// This gateway's unicast IPv4 address on the devices' network: the multicast socket binds
    /// to it and multicasts through its interface. Required for `fleetcast push`; there is no
    /// default, so multicast never leaves through an interface nobody chose [key: mcast.addr].
    #[arg(long)]
    mcast_addr: Option<Ipv4Addr>,
    /// UDP port of the multicast group (and of the gateway's NACK socket) [key: mcast.port;
    /// default 7301].
    #[arg(long)]
    mcast_port: Option<u16>,
    /// Multicast group pushes are sent to [key: mcast.group; default 239.77.0.1].
    #[arg(long)]
    mcast_group: Option<Ipv4Addr>,
    /// Seconds a finished multicast waits for targets that have not reported (late devices
    /// are caught up by unicast while it waits, and by a re-created sender after)
    /// [key: mcast.linger_secs; default 60].
    #[arg(long)]
    mcast_linger: Option<u64>,
    /// Milliseconds between a push's announces and its first multicast block (time for the
    /// receivers to join the group) [key: mcast.warmup_ms; default 300].
    #[arg(long)]
    mcast_warmup_ms: Option<u64>,
    /// Pushes go by subnet-directed broadcast to this address (the broadcast address of
    /// --mcast-addr's subnet; checked at start) unless they ask for multicast
    /// [key: mcast.broadcast; default: unset, multicast].
    #[arg(long, value_name = "ADDR")]
    mcast_broadcast: Option<Ipv4Addr>,
    /// Serve the files in `<data-dir>/artifacts/` over HTTP on this address, so `fetch` steps
    /// can name `gateway:NAME` (pair each with a `verify` step). Off when not given
    /// [key: artifacts.listen].
    #[arg(long)]
    artifact_listen: Option<SocketAddr>,
    /// The URL agents use to reach `--artifact-listen` (default `http://<its address>`)
    /// [key: artifacts.url].
    #[arg(long)]
    artifact_url: Option<String>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address [key: admin.metrics_listen].
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Push every file that appears or changes in this directory [key: watch.dir].
    #[arg(long)]
    watch_dir: Option<PathBuf>,
    /// Target group of those pushes [key: watch.group].
    #[arg(long)]
    watch_group: Option<String>,
    /// Log filter (error, warn, info, debug, trace or tracing directives) [key: log.level].
    #[arg(long)]
    log_level: Option<String>,
    /// Log format: text or json [key: log.format].
    #[arg(long)]
    log_format: Option<String>,
    /// Print the CA fingerprint (for `fleetcast-agent --ca-fingerprint`) and exit.
    #[arg(long)]
    print_ca_fingerprint: bool,
}

/// The flag of each key that has one.
const FLAGS: &[(&str, &str)] = &[
    ("data_dir", "--data-dir"),
    ("listen", "--listen"),
    ("listen_extra", "--listen-extra"),
    ("http_timeout_secs", "--http-timeout"),
    ("server_names", "--server-name"),
    ("heartbeat_secs", "--heartbeat"),
    ("reboot_timeout_secs", "--reboot-timeout"),
    ("mcast.addr", "--mcast-addr"),
    ("mcast.port", "--mcast-port"),
    ("mcast.group", "--mcast-group"),
    ("mcast.linger_secs", "--mcast-linger"),
    ("mcast.warmup_ms", "--mcast-warmup-ms"),
    ("mcast.broadcast", "--mcast-broadcast"),
    ("artifacts.listen", "--artifact-listen"),
    ("artifacts.url", "--artifact-url"),
    ("admin.metrics_listen", "--metrics-listen"),
    ("watch.dir", "--watch-dir"),
    ("watch.group", "--watch-group"),
    ("log.level", "--log-level"),
    ("log.format", "--log-format"),
];

impl Args {
    /// The flag that set `key`, if one did.
    fn gave(&self, key: &str) -> Option<&'static str> {
        let (_, flag) = FLAGS.iter().find(|(k, _)| *k == key)?;
        self.overrides()
            .iter()
            .any(|(k, _)| *k == key)
            .then_some(*flag)
    }

    /// The flags given, as configuration keys and values.
    fn overrides(&self) -> Vec<(&'static str, toml::Value)> {
        use toml::Value as V;
        let s = |x: &dyn std::fmt::Display| V::String(x.to_string());
        let mut o = Vec::new();
        if let Some(d) = &self.data_dir {
            o.push(("data_dir", s(&d.display())));
        }
        if let Some(x) = self.listen {
            o.push(("listen", s(&x)));
        }
        if let Some(x) = self.listen_extra {
            o.push(("listen_extra", s(&x)));
        }
        if let Some(x) = self.http_timeout {
            o.push(("http_timeout_secs", V::Integer(x as i64)));
        }
        if !self.server_names.is_empty() {
            let names = self.server_names.iter().map(|n| s(n)).collect();
            o.push(("server_names", V::Array(names)));
        }
        if let Some(x) = self.heartbeat {
            o.push(("heartbeat_secs", V::Integer(x.into())));
        }
        if let Some(x) = self.reboot_timeout {
            o.push(("reboot_timeout_secs", V::Integer(x as i64)));
        }
        if let Some(x) = self.mcast_addr {
            o.push(("mcast.addr", s(&x)));
        }
        if let Some(d) = &self.watch_dir {
            o.push(("watch.dir", s(&d.display())));
        }
        if let Some(g) = &self.watch_group {
            o.push(("watch.group", s(g)));
        }
        if let Some(x) = self.mcast_port {
            o.push(("mcast.port", V::Integer(x.into())));
        }
        if let Some(x) = self.mcast_group {
            o.push(("mcast.group", s(&x)));
        }
        if let Some(x) = self.mcast_linger {
            o.push(("mcast.linger_secs", V::Integer(x as i64)));
        }
        if let Some(x) = self.mcast_warmup_ms {
            o.push(("mcast.warmup_ms", V::Integer(x as i64)));
        }
        if let Some(x) = self.mcast_broadcast {
            o.push(("mcast.broadcast", s(&x)));
        }
        if let Some(x) = self.artifact_listen {
            o.push(("artifacts.listen", s(&x)));
        }
        if let Some(x) = &self.artifact_url {
            o.push(("artifacts.url", s(x)));
        }
        if let Some(x) = self.metrics_listen {
            o.push(("admin.metrics_listen", s(&x)));
        }
        if let Some(x) = &self.log_level {
            o.push(("log.level", s(x)));
        }
        if let Some(x) = &self.log_format {
            o.push(("log.format", s(x)));
        }
        o
    }
}

/// Runs the gateway with these arguments (the first is the program name).
///
/// Exit codes ([`crate::exit`]): 0 clean exit, 1 runtime failure, 2 usage error or invalid
/// configuration.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Ok
            }
            .into();
        }
    };
    let env = |var: &str| std::env::var(var).ok();
    let mut cfg = match config::load(args.config.as_deref(), env, &args.overrides()) {
        Ok(c) => c,
        // A value the user gave as a flag is named by its flag.
        Err(config::ConfigError::Invalid { key, why }) if args.gave(key).is_some() => {
            let flag = args.gave(key).unwrap_or(key);
            output::err(&format!("fleetcastd: {flag} (key `{key}`): {why}"));
            return Exit::Usage.into();
        }
        Err(e) => {
            output::err(&format!("fleetcastd: {e}"));
            return Exit::Usage.into();
        }
    };
    if cfg.data_dir.is_none() {
        cfg.data_dir = Some(default_data_dir());
    }
    if args.print_config {
        return print_out(&cfg.to_toml());
    }
    init_logging(&cfg.log);
    let data = cfg.data_dir.clone().unwrap_or_else(default_data_dir);
    if args.print_ca_fingerprint {
        // A print command only reads: no directory, key or certificate is created or
        // re-issued, and it works beside a running gateway.
        return match Pki::read_ca_fingerprint(&data.join("pki")) {
            Ok(fp) => print_out(&format!("{fp}\n")),
            Err(e) => {
                output::err(&format!("fleetcastd: {e}"));
                Exit::Failed.into()
            }
        };
    }
    if let (Some(addr), Some(b)) = (cfg.mcast.addr, cfg.mcast.broadcast) {
        // The default broadcast must be the directed broadcast of the interface that holds
        // mcast.addr: refuse to start (a configuration error) rather than every push.
        let iface = crate::distribution::Iface::holding(addr);
        if let Err(e) = crate::distribution::resolve_broadcast(iface.as_ref(), addr, Some(b)) {
            let e = crate::distribution::BroadcastKeyError(e);
            output::err(&format!("fleetcastd: {e}"));
            return Exit::Usage.into();
        }
    }
    match run(cfg, data) {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            tracing::error!(error = %e, "fleetcastd stopped");
            output::err(&format!("fleetcastd: {e}"));
            Exit::Failed.into()
        }
    }
}

/// Logging to stderr, set up so that it can never take the gateway down and reads well
/// wherever stderr goes.
///
/// - A failed write (a full disk under the log file, a closed journal pipe, `/dev/full`) loses
///   that line and nothing else: tracing-subscriber's own report of the failure, which would
///   go to the same stderr through `eprintln!` and panic there, is off.
/// - Colour only for a person at a terminal (and not with `NO_COLOR`): a file or the journal
///   gets plain text.
fn init_logging(log: &config::LogConfig) {
    use std::io::IsTerminal as _;
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let filter = tracing_subscriber::EnvFilter::new(&log.level);
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
    let _ = match log.format {
        LogFormat::Text => fmt.try_init(),
        LogFormat::Json => fmt.json().try_init(),
    };
}

/// The output of a print command (exit 1 when it could not be written; a reader that went
/// away early, as `| head -1`, is not an error).
fn print_out(text: &str) -> ExitCode {
    output::out(text);
    output::exit_code(Exit::Ok.into())
}

/// The PostgreSQL store `store` names, its schema brought up to date. The password comes
/// from `store.password_file` or `PGPASSWORD`, never from the command line.
fn open_postgres(
    store: &config::StoreSection,
    cell: &config::CellSection,
) -> Result<fleetcast_store::pg::PgStore, Box<dyn std::error::Error>> {
    // `validate` refused a postgres engine without a URL.
    let url = store.url.as_deref().unwrap_or_default();
    let password = match &store.password_file {
        Some(p) => {
            let text = std::fs::read(p)
                .map_err(|e| format!("store.password_file {}: {e}", p.display()))?;
            let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
            Some(line.strip_suffix(b"\r").unwrap_or(line).to_vec())
        }
        None => std::env::var_os("PGPASSWORD").map(|p| p.into_encoded_bytes()),
    };
    let (pg, m) = fleetcast_store::pg::PgStore::connect(url, password.as_deref())?;
    tracing::info!(schema = m.to, migrated_from = m.from, "store: PostgreSQL");
    // `validate` refused a gateway id without an address to advertise.
    let (Some(id), Some(addr)) = (&cell.gateway_id, &cell.advertise) else {
        return Ok(pg);
    };
    let pg = pg.join_cell(id, addr, Duration::from_millis(cell.lease_ms))?;
    if let Some(m) = pg.member() {
        tracing::info!(
            gateway = m.id(),
            incarnation = m.incarnation(),
            advertise = m.addr(),
            lease_ms = cell.lease_ms,
            "joined the cell"
        );
    }
    Ok(pg)
}

fn run(cfg: Config, data: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    // First the lock: a second gateway on this directory stops here, before it touches the
    // admin socket, the store or the certificates.
    let (_lock, tightened) = datadir::claim(&data)?;
    if let Tightened::From(mode) = tightened {
        tracing::warn!(
            dir = %data.display(),
            mode = %format_args!("{mode:03o}"),
            "the data directory was open to other users: it is now 0700"
        );
    }
    let clock = Clock::new();
    let (_, wall_ms) = clock.read();
    let now = std::time::UNIX_EPOCH + Duration::from_millis(wall_ms);
    let pki = Pki::load_or_create(&data.join("pki"), &cfg.server_names, now)?;
    let fleet_cfg = FleetConfig {
        heartbeat_ms: cfg.heartbeat_secs.saturating_mul(1000),
        reboot_timeout_ms: cfg.reboot_timeout_secs.saturating_mul(1000),
        ..FleetConfig::default()
    };
    let fleet = match cfg.store.engine {
        StoreEngine::Lmdb => Fleet::new(Store::open(data.join("store"))?, pki, fleet_cfg)?,
        StoreEngine::Postgres => {
            let mut f = Fleet::new(open_postgres(&cfg.store, &cfg.cell)?, pki, fleet_cfg)?;
            if let Some(id) = &cfg.cell.gateway_id {
                // Every second, or three times a lease: one slow renewal never costs it.
                f.join_cell(id, (cfg.cell.lease_ms / 3).min(1000));
            }
            f
        }
    };
    let session = fleetcast_wire::SessionConfig {
        idle_timeout: Duration::from_secs(u64::from(cfg.heartbeat_secs.max(1)) * 3),
        ..Default::default()
    };
    let gw_cfg = GatewayConfig {
        listen: cfg.listen,
        extra_listen: cfg.listen_extra,
        http_timeout: Duration::from_secs(cfg.http_timeout_secs.max(1)),
        admin_socket: data.join(crate::admin::SOCKET_NAME),
        session,
        mcast: cfg.mcast.addr.map(|addr| McastConfig {
            addr,
            port: cfg.mcast.port,
            group: cfg.mcast.group,
            linger: Duration::from_secs(cfg.mcast.linger_secs),
            warmup: Duration::from_millis(cfg.mcast.warmup_ms),
            fec_group: cfg.mcast.fec_group,
            broadcast: cfg.mcast.broadcast,
        }),
        artifacts: cfg.artifacts.listen.map(|listen| ArtifactsConfig {
            listen,
            root: data.join("artifacts"),
            base_url: cfg.artifacts.url.clone(),
        }),
        metrics_listen: cfg.admin.metrics_listen,
        retention: crate::retention::RetentionConfig {
            events_keep_days: cfg.store.events_keep_days,
            events_max: cfg.store.events_max,
            results_per_device: cfg.store.results_per_device,
        },
        watch: match (&cfg.watch.dir, &cfg.watch.group) {
            (Some(dir), Some(group)) => Some(crate::watch::WatchConfig {
                dir: dir.clone(),
                group: group.clone(),
                interval: Duration::from_millis(cfg.watch.interval_ms),
                rate_mbps: cfg.watch.rate_mbps,
                // 0: the distributor fills the interface's MTU.
                block_size: cfg.watch.block_size.unwrap_or(0),
                // Parsed by `Config::validate` already: a bad step stopped the start there.
                then: crate::watch::follow_up_templates(&cfg.watch.then).unwrap_or_default(),
            }),
            _ => None,
        },
        ..GatewayConfig::default()
    };
    let mut gw = Gateway::bind(gw_cfg, fleet)?;
    let metrics = gw.metrics_addr();
    // Log fields are plain values: optional listeners get a line of their own when present.
    tracing::info!(listen = %gw.local_addr()?, data = %data.display(), "fleetcastd ready");
    if let Some(extra) = gw.extra_addr() {
        tracing::info!(listen = %extra, "also serving agents on a second address");
    }
    if let Some(m) = metrics {
        tracing::info!(url = %format_args!("http://{m}/metrics"), "serving metrics");
    }
    // Readiness lines for scripts and tests (stdout). Nobody reading them is no reason to
    // stop: write errors are ignored.
    let mut ready = format!("ready {}\n", gw.local_addr()?);
    if let Some(m) = metrics {
        ready.push_str(&format!("metrics http://{m}/metrics\n"));
    }
    output::out(&ready);
    if let Some(url) = gw.artifact_base_url() {
        tracing::info!(%url, "serving artifacts");
    }
    // systemd readiness (Type=notify): everything is bound.
    match sd_notify::notify_ready() {
        Ok(true) => tracing::info!("readiness sent to systemd"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "cannot notify systemd of readiness"),
    }
    gw.run()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_names_a_key_and_is_documented_with_it() {
        let doc = include_str!("../../docs/configuration.md");
        for (key, flag) in FLAGS {
            assert!(config::lookup(key).is_some(), "{key}");
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{key}` |")))
                .unwrap_or_else(|| panic!("{key} has no row"));
            assert!(
                row.contains(&format!("`{flag}")),
                "{key}: {flag} not in {row}"
            );
        }
        let a = Args::try_parse_from(["fleetcastd", "--heartbeat", "5", "--log-level", "debug"])
            .unwrap();
        assert_eq!(a.gave("heartbeat_secs"), Some("--heartbeat"));
        assert_eq!(a.gave("log.level"), Some("--log-level"));
        assert_eq!(a.gave("listen"), None);
    }
}
