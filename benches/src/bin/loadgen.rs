//! `loadgen`: thousands of simulated TLS agents against a real gateway process, measuring the
//! "Gateway at scale" figures of `docs/performance.md`.
//!
//! ```text
//! loadgen --agents 10000 [--heartbeat 5] [--idle-secs 20] [--commands 5] [--lat-rate 2000]
//!         [--lat-secs 10] [--groups 100] [--max-connecting 256] [--no-storm]
//!         [--backoff-max 30] [--deadline 900] [--gateway-bin PATH] [--data-dir DIR] [--seed S]
//! ```
//! The gateway binary defaults to `bench-gateway` next to this one. `RLIMIT_NOFILE` is raised to
//! its hard limit first; the gateway inherits it (each process needs about one fd per agent).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use fleetcast_benches::scale::{self, ScaleConfig};

fn main() -> ExitCode {
    let mut cfg = ScaleConfig {
        agents: 1000,
        heartbeat: 5,
        idle_secs: 20,
        commands: 5,
        lat_rate: 2000,
        lat_secs: 10,
        groups: 100,
        max_connecting: 256,
        storm: true,
        backoff_max: Duration::from_secs(30),
        deadline: Duration::from_secs(900),
        gateway_bin: std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("bench-gateway")))
            .unwrap_or_else(|| PathBuf::from("bench-gateway")),
        data_dir: None,
        seed: 1,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next().cloned().unwrap_or_else(|| {
                eprintln!("loadgen: {a} needs a value");
                std::process::exit(2)
            })
        };
        let num = |v: String| -> u64 {
            v.parse().unwrap_or_else(|_| {
                eprintln!("loadgen: {v:?} is not a number");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--agents" => cfg.agents = num(val()) as usize,
            "--heartbeat" => cfg.heartbeat = num(val()) as u32,
            "--idle-secs" => cfg.idle_secs = num(val()),
            "--commands" => cfg.commands = num(val()) as usize,
            "--lat-rate" => cfg.lat_rate = num(val()),
            "--lat-secs" => cfg.lat_secs = num(val()),
            "--groups" => cfg.groups = num(val()) as usize,
            "--max-connecting" => cfg.max_connecting = num(val()) as usize,
            "--no-storm" => cfg.storm = false,
            "--backoff-max" => cfg.backoff_max = Duration::from_secs(num(val())),
            "--deadline" => cfg.deadline = Duration::from_secs(num(val())),
            "--gateway-bin" => cfg.gateway_bin = PathBuf::from(val()),
            "--data-dir" => cfg.data_dir = Some(PathBuf::from(val())),
            "--seed" => cfg.seed = num(val()),
            "-h" | "--help" => {
                println!("see the doc comment of benches/src/bin/loadgen.rs");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("loadgen: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    match scale::raise_nofile() {
        Ok(n) if (n as usize) < cfg.agents + 100 => {
            eprintln!("loadgen: warning: RLIMIT_NOFILE is {n}, below agents + 100")
        }
        Ok(_) => {}
        Err(e) => eprintln!("loadgen: cannot raise RLIMIT_NOFILE: {e}"),
    }
    match scale::run(&cfg) {
        Ok(r) => {
            println!("{r}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
