//! `fleetcast-agent`: the device agent. Dials out to the gateway, enrols once with a token,
//! then runs the commands the gateway sends, in order, across reboots. See `--help`.

fn main() -> std::process::ExitCode {
    fleetcast_agent::cli::main_with_args(std::env::args().skip(1))
}
