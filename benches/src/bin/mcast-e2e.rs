//! End-to-end multicast benchmark against the raw UDP ceiling (issue #8); the same harness
//! as `fleetcast bench` (see `fleetcast_cli::bench`).
//!
//! ```text
//! cargo build --release -p fleetcast-benches --bin mcast-e2e
//! target/release/mcast-e2e [--receivers 1,4,16] [--loss 0,1,5] [--mtu 1500,9000] \
//!     [--mib 256] [--timeout 600] [--out bench-report]
//! ```
//!
//! Everything runs inside a private lab network (user + network namespaces); the binary
//! re-executes itself as the gateway (`__gateway`) and the agents (`__agent`).

use std::process::ExitCode;
use std::time::Duration;

use fleetcast_cli::bench::{self, Plan};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("__gateway") => {
            return fleetcast_daemon::daemon_main::main_with_args(
                std::iter::once("fleetcastd".to_string()).chain(args.into_iter().skip(2)),
            )
        }
        Some("__agent") => return fleetcast_agent::cli::main_with_args(args.into_iter().skip(2)),
        _ => {}
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcast-e2e: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why the benchmark stopped.
#[derive(Debug, thiserror::Error)]
enum E2eError {
    /// `current_exe` failed: the binary re-executes itself.
    #[error("cannot find my own binary: {0}")]
    OwnBinary(#[source] std::io::Error),
    /// A flag was given without its value.
    #[error("{0} needs a value")]
    NoValue(String),
    /// An argument this binary does not take.
    #[error("unknown argument `{0}` (see the file's docs)")]
    Unknown(String),
    /// A flag's value cannot be measured.
    #[error(transparent)]
    Flag(#[from] bench::FlagError),
    /// The run or its report failed.
    #[error(transparent)]
    Bench(#[from] bench::BenchError),
}

fn run(args: &[String]) -> Result<(), E2eError> {
    let mut plan = Plan {
        receivers: vec![1, 4, 16],
        loss: vec![0.0, 1.0, 5.0],
        mtus: vec![1500, 9000],
        mib: 256,
        timeout: Duration::from_secs(600),
        exe: std::env::current_exe().map_err(E2eError::OwnBinary)?,
        work: std::env::temp_dir().join(format!("fleetcast-bench-{}", std::process::id())),
    };
    let mut out = std::path::PathBuf::from("bench-report");
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| E2eError::NoValue(flag.clone()));
        match flag.as_str() {
            "--receivers" => plan.receivers = bench::parse_list("--receivers", value()?)?,
            "--loss" => plan.loss = bench::parse_list("--loss", value()?)?,
            "--mtu" => plan.mtus = bench::parse_list("--mtu", value()?)?,
            "--mib" => plan.mib = bench::parse_list("--mib", value()?)?[0],
            "--timeout" => {
                plan.timeout = Duration::from_secs(bench::parse_list("--timeout", value()?)?[0])
            }
            "--out" => out = value()?.into(),
            other => return Err(E2eError::Unknown(other.to_string())),
        }
    }
    plan.check()?;
    let result = bench::run(&plan, &mut |line| eprintln!("{line}"));
    let _ = std::fs::remove_dir_all(&plan.work);
    let rows = result?;
    let md = bench::write_report(&rows, &plan, &out)?;
    println!("{md}");
    eprintln!("report written to {}", out.display());
    Ok(())
}
