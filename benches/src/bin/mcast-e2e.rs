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

fn run(args: &[String]) -> Result<(), String> {
    let mut plan = Plan {
        receivers: vec![1, 4, 16],
        loss: vec![0.0, 1.0, 5.0],
        mtus: vec![1500, 9000],
        mib: 256,
        timeout: Duration::from_secs(600),
        exe: std::env::current_exe().map_err(|e| e.to_string())?,
        work: std::env::temp_dir().join(format!("fleetcast-bench-{}", std::process::id())),
    };
    let mut out = std::path::PathBuf::from("bench-report");
    let mut it = args.iter();
    let text = |e: bench::FlagError| e.to_string();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--receivers" => {
                plan.receivers = bench::parse_list("--receivers", value()?).map_err(text)?
            }
            "--loss" => plan.loss = bench::parse_list("--loss", value()?).map_err(text)?,
            "--mtu" => plan.mtus = bench::parse_list("--mtu", value()?).map_err(text)?,
            "--mib" => plan.mib = bench::parse_list("--mib", value()?).map_err(text)?[0],
            "--timeout" => {
                plan.timeout =
                    Duration::from_secs(bench::parse_list("--timeout", value()?).map_err(text)?[0])
            }
            "--out" => out = value()?.into(),
            other => return Err(format!("unknown argument `{other}` (see the file's docs)")),
        }
    }
    plan.check().map_err(text)?;
    let result = bench::run(&plan, &mut |line| eprintln!("{line}"));
    let _ = std::fs::remove_dir_all(&plan.work);
    let rows = result?;
    let md = bench::write_report(&rows, &plan, &out)?;
    println!("{md}");
    eprintln!("report written to {}", out.display());
    Ok(())
}
