//! fleetcast device agent.

/// Writes one line to stderr, prefixed `fleetcast-agent: `. Unlike `eprintln!` it never
/// panics: a full disk or a closed journal under the agent's log must not stop the agent
/// (the line is lost; the work goes on).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr().lock(),
            "fleetcast-agent: {}",
            format_args!($($arg)*)
        );
    }};
}

pub mod cli;
pub mod config;
pub mod driver;
pub mod exec;
pub mod gateways;
pub mod imaging;
pub mod inventory;
pub mod ladder;
mod legacy;
pub mod packages;
pub mod record;
pub mod report;
pub mod sink;
pub mod slots;
pub mod state;
#[cfg(feature = "swarm")]
pub mod swarm;
pub mod target;
#[cfg(test)]
mod test_loop;
pub mod tls;
pub mod transfer;
pub mod update;
mod verify;
