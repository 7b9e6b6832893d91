//! The at-scale load test, CI-sized: 300 simulated TLS agents against a real gateway process
//! enrol, hold their sessions, each runs 2 queued commands plus latency probes, and all come
//! back after a `kill -9` of the gateway and run one more command. Asserts completion and
//! consistency, never speed (the figures live in docs/performance.md).

use std::path::PathBuf;
use std::time::Duration;

use fleetcast_benches::scale::{self, ScaleConfig};

#[test]
fn three_hundred_agents_enrol_run_commands_and_survive_a_gateway_kill() {
    scale::raise_nofile().expect("raise RLIMIT_NOFILE");
    let cfg = ScaleConfig {
        agents: 300,
        heartbeat: 1,
        idle_secs: 2,
        commands: 2,
        lat_rate: 300,
        lat_secs: 2,
        groups: 10,
        max_connecting: 64,
        storm: true,
        backoff_max: Duration::from_secs(5),
        deadline: Duration::from_secs(240),
        gateway_bin: PathBuf::from(env!("CARGO_BIN_EXE_bench-gateway")),
        data_dir: None,
        seed: 7,
    };
    let r = scale::run(&cfg).expect("every phase completes");
    println!("{r}");
    assert_eq!(r.gateway_online, 300, "the gateway holds every session");
    assert_eq!(r.cmds, 600);
    assert!(r.lat_n >= 300, "latency probes reached agents: {}", r.lat_n);
    assert!(r.storm_done_s > 0.0 && r.storm_welcomed_s <= r.storm_done_s);
    assert!(r.storm_connects >= 300, "every agent reconnected");
}
