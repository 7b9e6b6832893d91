//! `fleetcastd`: the fleetcast gateway. See `fleetcastd --help`.

fn main() -> std::process::ExitCode {
    fleetcast_daemon::daemon_main::main_with_args(std::env::args_os())
}
