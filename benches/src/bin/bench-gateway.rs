//! `fleetcastd` built inside the benches crate, so the load test (`tests/scale.rs`) and
//! `loadgen` can start a real gateway process (`CARGO_BIN_EXE_bench-gateway`).

fn main() -> std::process::ExitCode {
    fleetcast_daemon::daemon_main::main_with_args(std::env::args_os())
}
