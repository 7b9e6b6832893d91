//! The `fleetcastd` command line, as a library function (the binary and `fleetcast demo` use it).
//!
//! The gateway keeps everything in its data directory: the LMDB store (`store/`), its CA and
//! server key (`pki/`) and the admin socket (`admin.sock`). Restarting it at any instant loses
//! nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::distribution::McastConfig;
use crate::fleet::{Fleet, FleetConfig};
use crate::gateway::{ArtifactsConfig, Clock, Gateway, GatewayConfig};
use crate::paths::default_data_dir;
use crate::pki::Pki;
use clap::Parser;
use fleetcast_store::Store;

#[derive(Parser, Debug)]
#[command(name = "fleetcastd", version, about = "The fleetcast gateway daemon")]
struct Args {
    /// Data directory (store, CA, admin socket).
    #[arg(long, env = "FLEETCAST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address agents connect to.
    #[arg(long, default_value = "0.0.0.0:7300")]
    listen: SocketAddr,
    /// A second address served exactly like --listen (e.g. 0.0.0.0:443, for agents whose
    /// network lets only HTTPS out).
    #[arg(long)]
    listen_extra: Option<SocketAddr>,
    /// Seconds an HTTP request (Upgrade head, long-poll request) has to arrive complete.
    #[arg(long, default_value_t = 5)]
    http_timeout: u64,
    /// Names (DNS or IP) agents use to reach this gateway; they go into its TLS certificate.
    #[arg(long = "server-name", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
    server_names: Vec<String>,
    /// Heartbeat interval agents are told to use, seconds.
    #[arg(long, default_value_t = 15)]
    heartbeat: u32,
    /// Time a device has to come back from a reboot, seconds.
    #[arg(long, default_value_t = 900)]
    reboot_timeout: u64,
    /// This gateway's unicast IPv4 address on the devices' network: the multicast socket binds
    /// to it and multicasts through its interface. Required for `fleetcast push`; there is no
    /// default, so multicast never leaves through an interface nobody chose.
    #[arg(long)]
    mcast_addr: Option<std::net::Ipv4Addr>,
    /// UDP port of the multicast group (and of the gateway's NACK socket).
    #[arg(long, default_value_t = 7301)]
    mcast_port: u16,
    /// Multicast group pushes are sent to.
    #[arg(long, default_value = "239.77.0.1")]
    mcast_group: std::net::Ipv4Addr,
    /// Seconds a finished multicast waits for targets that have not reported (late devices
    /// are caught up by unicast while it waits, and by a re-created sender after).
    #[arg(long, default_value_t = 60)]
    mcast_linger: u64,
    /// Milliseconds between a push's announces and its first multicast block (time for the
    /// receivers to join the group).
    #[arg(long, default_value_t = 300)]
    mcast_warmup_ms: u64,
    /// Serve the files in `<data-dir>/artifacts/` over HTTP on this address, so `fetch` steps
    /// can name `gateway:NAME` (pair each with a `verify` step). Off when not given.
    #[arg(long)]
    artifact_listen: Option<SocketAddr>,
    /// The URL agents use to reach `--artifact-listen` (default `http://<its address>`).
    #[arg(long)]
    artifact_url: Option<String>,
    /// Print the CA fingerprint (for `fleetcast-agent --ca-fingerprint`) and exit.
    #[arg(long)]
    print_ca_fingerprint: bool,
}

/// Runs the gateway with these arguments (the first is the program name).
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetcastd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let data = args.data_dir.unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data)
        .map_err(|e| format!("cannot create data directory {}: {e}", data.display()))?;
    let clock = Clock::new();
    let (_, wall_ms) = clock.read();
    let now = std::time::UNIX_EPOCH + Duration::from_millis(wall_ms);
    let pki = Pki::load_or_create(&data.join("pki"), &args.server_names, now)?;
    if args.print_ca_fingerprint {
        println!("{}", pki.ca_fingerprint_sha256());
        return Ok(());
    }
    let store = Store::open(data.join("store"))?;
    let fleet_cfg = FleetConfig {
        heartbeat_ms: args.heartbeat.saturating_mul(1000),
        reboot_timeout_ms: args.reboot_timeout.saturating_mul(1000),
        ..FleetConfig::default()
    };
    let fleet = Fleet::new(store, pki, fleet_cfg)?;
    let session = fleetcast_wire::SessionConfig {
        idle_timeout: Duration::from_secs(u64::from(args.heartbeat.max(1)) * 3),
        ..Default::default()
    };
    let cfg = GatewayConfig {
        listen: args.listen,
        extra_listen: args.listen_extra,
        http_timeout: Duration::from_secs(args.http_timeout.max(1)),
        admin_socket: data.join(crate::admin::SOCKET_NAME),
        session,
        mcast: match args.mcast_addr {
            Some(addr) => {
                if !args.mcast_group.is_multicast() {
                    return Err(format!(
                        "--mcast-group {} is not a multicast address",
                        args.mcast_group
                    )
                    .into());
                }
                Some(McastConfig {
                    addr,
                    port: args.mcast_port,
                    group: args.mcast_group,
                    linger: Duration::from_secs(args.mcast_linger),
                    warmup: Duration::from_millis(args.mcast_warmup_ms),
                })
            }
            None => None,
        },
        artifacts: args.artifact_listen.map(|listen| ArtifactsConfig {
            listen,
            root: data.join("artifacts"),
            base_url: args.artifact_url.clone(),
        }),
        ..GatewayConfig::default()
    };
    let mut gw = Gateway::bind(cfg, fleet)?;
    tracing::info!(listen = %gw.local_addr()?, extra = ?gw.extra_addr(), data = %data.display(), "fleetcastd ready");
    // Readiness line for scripts and tests (stdout, one line).
    println!("ready {}", gw.local_addr()?);
    if let Some(url) = gw.artifact_base_url() {
        tracing::info!(%url, "serving artifacts");
    }
    gw.run()?;
    Ok(())
}
