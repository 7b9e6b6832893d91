//! The `fleetcast-agent` command line, as a library function so tests (and the lab) can run
//! the real agent by re-executing their own binary.
//!
//! Arguments are parsed by hand (no clap) to keep the binary small for embedded targets.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::driver::{Agent, AgentConfig, CaSource, LadderConfig, RebootAction};
use crate::exec::ExecConfig;
use crate::ladder::{self, ProxyError, Rung};
use crate::tls::parse_fingerprint;

/// A command line the agent cannot run with (answered with the usage, exit 2).
#[derive(Debug, thiserror::Error)]
enum UsageError {
    /// A flag that takes a value is the last argument.
    #[error("{0} needs a value")]
    NeedsValue(String),
    /// A flag's value is not what it takes.
    #[error("{flag} takes {what}")]
    Takes {
        /// The flag.
        flag: &'static str,
        /// What it takes.
        what: &'static str,
    },
    /// A name in `--rungs` that is no rung.
    #[error("unknown rung {0:?}")]
    UnknownRung(String),
    /// `--rungs` names none.
    #[error("--rungs needs at least one rung")]
    NoRungs,
    /// `--reboot-command` without a program.
    #[error("--reboot-command needs a program")]
    NoRebootProgram,
    /// Not a flag of the agent.
    #[error("unknown argument {0}")]
    Unknown(String),
    /// A required flag is missing.
    #[error("{0} is required")]
    Required(&'static str),
    /// The proxy (`--proxy`, or the environment's) is not one the agent can use.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// `--token` without `--name`, or the other way round.
    #[error("--token and --name go together")]
    TokenWithoutName,
    /// The A/B slot configuration (`--slots`) is bad or does not fit this machine.
    #[error(transparent)]
    Slots(#[from] Box<crate::slots::LoadError>),
}

const USAGE: &str = "usage: fleetcast-agent --gateway HOST:PORT --state-dir DIR [options]

  -h, --help                print this help and exit
  -V, --version             print the version and exit

  --config FILE             read settings from FILE (flat TOML: docs/configuration.md);
                            FLEETCAST_AGENT_<KEY> variables and flags override it
  --print-config            print the merged settings as a configuration file and exit
  --gateway HOST:PORT       the gateway (fleetcastd --listen); for a cell of gateways,
                            several, comma-separated (HOST:PORT,HOST:PORT,...)
  --state-dir DIR           where the agent keeps its key, certificate and progress
  --server-name NAME        name in the gateway certificate (default: the HOST tried)
  --ca FILE                 gateway CA certificate (PEM), for enrolment
  --ca-fingerprint HEX      or its SHA-256 (fleetcastd --print-ca-fingerprint)
  --token TOKEN --name NAME enrol with a token from `fleetcast device add NAME`
  --boot-id-file FILE       boot id source (default /proc/sys/kernel/random/boot_id)
  --dpkg-status FILE        dpkg database to report (default: detect dpkg, rpm, apk or
                            opkg under the report root)
  --report-root DIR         root of proc/, sys/, dev/ and package databases (default /)
  --reboot-command CMD...   how to reboot (default: systemctl reboot); must be last
  --reboot-exit CODE        simulate a reboot by exiting with CODE (tests, the lab)
  --max-sessions N          stop after N sessions (tests)
  --downloads DIR           where pushed files land (default: STATE-DIR/downloads)
  --slots FILE              A/B slots: FILE's [slot] section, checked against this
                            machine (under --report-root) at start

transport ladder (see docs/transports.md):
  --proxy URL|none          HTTP proxy for the CONNECT and long-poll rungs,
                            http://[user:pass@]host:port (default: https_proxy /
                            HTTPS_PROXY unless no_proxy / NO_PROXY names the gateway)
  --alt-port PORT           the gateway's second port: 443 rung, Upgrade, CONNECT, long-poll
                            (default 443)
  --rungs LIST              rungs allowed, comma-separated, of native,443,upgrade,connect,
                            longpoll (default: all)
  --rung-timeout-ms MS      time a rung has to open (TCP, proxy, TLS), and again to get
                            its Hello answered (default 4000)
  --stagger-ms MS           start the next rung this long after the previous one; they
                            overlap (default 250)
  --upgrade-after SECS      on a fallback rung, retry better ones this often (default 600)
";

fn parse(args: impl IntoIterator<Item = String>) -> Result<AgentConfig, UsageError> {
    let takes = |flag, what| UsageError::Takes { flag, what };
    let mut args = args.into_iter();
    let mut gateway = None;
    let mut state_dir = None;
    let mut server_name = None;
    let mut ca = CaSource::Stored;
    let mut token = None;
    let mut name = None;
    let mut exec = ExecConfig::default();
    let mut reboot = RebootAction::Command(vec!["systemctl".into(), "reboot".into()]);
    let mut max_sessions = None;
    let mut downloads = None;
    let mut lad = LadderConfig::default();
    let mut proxy_arg: Option<String> = None;
    let mut slots: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| UsageError::NeedsValue(a.clone()));
        match a.as_str() {
            "--gateway" => gateway = Some(val()?),
            "--state-dir" => state_dir = Some(PathBuf::from(val()?)),
            "--server-name" => server_name = Some(val()?),
            "--ca" => ca = CaSource::File(PathBuf::from(val()?)),
            "--ca-fingerprint" => {
                let v = val()?;
                ca = CaSource::Fingerprint(
                    parse_fingerprint(&v).ok_or(takes("--ca-fingerprint", "64 hex digits"))?,
                )
            }
            "--token" => token = Some(val()?),
            "--downloads" => downloads = Some(PathBuf::from(val()?)),
            "--slots" => slots = Some(PathBuf::from(val()?)),
            "--name" => name = Some(val()?),
            "--boot-id-file" => exec.report.boot_id = PathBuf::from(val()?),
            "--dpkg-status" => exec.report.dpkg_status = Some(PathBuf::from(val()?)),
            "--report-root" => exec.report.root = PathBuf::from(val()?),
            "--reboot-exit" => {
                reboot = RebootAction::Exit(
                    val()?
                        .parse()
                        .map_err(|_| takes("--reboot-exit", "a number"))?,
                )
            }
            "--max-sessions" => {
                max_sessions = Some(
                    val()?
                        .parse()
                        .map_err(|_| takes("--max-sessions", "a number"))?,
                )
            }
            "--proxy" => proxy_arg = Some(val()?),
            "--alt-port" => {
                lad.alt_port = val()?.parse().map_err(|_| takes("--alt-port", "a port"))?
            }
            "--rungs" => {
                lad.rungs = val()?
                    .split(',')
                    .map(|r| Rung::parse(r.trim()).ok_or_else(|| UsageError::UnknownRung(r.into())))
                    .collect::<Result<_, _>>()?;
                if lad.rungs.is_empty() {
                    return Err(UsageError::NoRungs);
                }
            }
            "--rung-timeout-ms" => {
                lad.rung_timeout = Duration::from_millis(
                    val()?
                        .parse()
                        .map_err(|_| takes("--rung-timeout-ms", "a number"))?,
                )
            }
            "--stagger-ms" => {
                lad.stagger = Duration::from_millis(
                    val()?
                        .parse()
                        .map_err(|_| takes("--stagger-ms", "a number"))?,
                )
            }
            "--upgrade-after" => {
                lad.upgrade_after = Duration::from_secs(
                    val()?
                        .parse()
                        .map_err(|_| takes("--upgrade-after", "seconds"))?,
                )
            }
            "--reboot-command" => {
                let rest: Vec<String> = args.by_ref().collect();
                if rest.is_empty() {
                    return Err(UsageError::NoRebootProgram);
                }
                reboot = RebootAction::Command(rest);
            }
            other => return Err(UsageError::Unknown(other.into())),
        }
    }
    let gateway = gateway.ok_or(UsageError::Required("--gateway"))?;
    let state_dir = state_dir.ok_or(UsageError::Required("--state-dir"))?;
    // The proxy decision (no_proxy) is made for the first gateway listed: the gateways of
    // one cell sit on one network.
    let first = gateway.split(',').next().unwrap_or_default().trim();
    let host = first.rsplit_once(':').map_or(first, |(h, _)| h).to_string();
    lad.proxy = match proxy_arg.as_deref() {
        Some("none") => None,
        Some(url) => Some(ladder::parse_proxy(url)?),
        None => ladder::proxy_from_env(&host, |k| std::env::var(k).ok()).transpose()?,
    };
    // Checked at start so a bad slot setup is found when the agent is installed, not when
    // the first update comes.
    let slots = match &slots {
        Some(path) => {
            let env_path = std::env::var_os("PATH");
            let c = crate::slots::load_checked(path, &exec.report.root, env_path.as_deref())
                .map_err(Box::new)?;
            // Each start says which slot it runs: after an update's reboot (or its rollback)
            // the log shows where the device came back.
            match c.read_running() {
                Ok(s) => crate::say!("A/B slots: running slot {} ({})", s.name(), c.name(s)),
                Err(e) => crate::say!("A/B slots: {e}"),
            }
            Some(c)
        }
        None => None,
    };
    let enrol = match (token, name) {
        (Some(t), Some(n)) => Some((t, n)),
        (None, None) => None,
        _ => return Err(UsageError::TokenWithoutName),
    };
    Ok(AgentConfig {
        gateway,
        server_name,
        downloads: downloads.unwrap_or_else(|| state_dir.join("downloads")),
        state_dir,
        ca,
        enrol,
        exec,
        reboot,
        ladder: lad,
        max_backoff: Duration::from_secs(30),
        max_sessions,
        slots,
    })
}

/// What the command line asks for before anything else is read.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Help,
    Version,
    Run,
}

/// `--help` or `--version` anywhere before `--reboot-command` (whose arguments are the reboot
/// program's): answered before the configuration is read, so they work even when it is bad.
fn asked(args: &[String]) -> Asked {
    for a in args {
        match a.as_str() {
            "-h" | "--help" => return Asked::Help,
            "-V" | "--version" => return Asked::Version,
            "--reboot-command" => break,
            _ => {}
        }
    }
    Asked::Run
}

/// Writes to stdout or stderr without `print!`'s panic when it cannot be written.
fn say(mut to: impl Write, text: &str) {
    let _ = to.write_all(text.as_bytes()).and_then(|()| to.flush());
}

/// Runs the agent with these arguments (without the program name); returns the exit code.
///
/// `--help` and `--version` print on stdout and exit 0; a usage or configuration error is
/// exit 2 with the message and the usage on stderr.
pub fn main_with_args(args: impl IntoIterator<Item = String>) -> ExitCode {
    let args: Vec<String> = args.into_iter().collect();
    match asked(&args) {
        Asked::Help => {
            say(std::io::stdout(), USAGE);
            return ExitCode::SUCCESS;
        }
        Asked::Version => {
            say(
                std::io::stdout(),
                &format!("fleetcast-agent {}\n", env!("CARGO_PKG_VERSION")),
            );
            return ExitCode::SUCCESS;
        }
        Asked::Run => {}
    }
    let args = match crate::config::expand(args, |v| std::env::var(v).ok()) {
        Ok(crate::config::Expanded::Run(a)) => a,
        Ok(crate::config::Expanded::Print(text)) => {
            say(std::io::stdout(), &text);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            say(std::io::stderr(), &format!("fleetcast-agent: {e}\n"));
            return ExitCode::from(2);
        }
    };
    let cfg = match parse(args) {
        Ok(c) => c,
        Err(e) => {
            say(
                std::io::stderr(),
                &format!("fleetcast-agent: {e}\n\n{USAGE}"),
            );
            return ExitCode::from(2);
        }
    };
    let result = Agent::new(cfg).and_then(|mut a| a.run());
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            say(std::io::stderr(), &format!("fleetcast-agent: {e}\n"));
            ExitCode::FAILURE
        }
    }
}
