//! `fleetcast`: the operator CLI. Talks to a running `fleetcastd` over its admin socket.
//!
//! Exit codes: 0 success; 1 the gateway refused the request (the message says why and what to
//! do); 2 usage error; 3 the gateway could not be reached.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use fleetcast_daemon::admin::{self, OnFailureSpec, Request};
use fleetcast_daemon::paths::default_data_dir;

#[derive(Parser, Debug)]
#[command(name = "fleetcast", version, about = "Operate a fleetcast gateway")]
struct Cli {
    /// The gateway's data directory (its admin socket lives there).
    #[arg(long, global = true, env = "FLEETCAST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print the gateway's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Devices: add (issue an enrolment token), list, revoke.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Groups of devices.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Command queues.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// The gateway's status: sessions, devices, queues.
    Status,
    /// Print the event log (from an event id on).
    Events {
        /// First event id.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand, Debug)]
enum DeviceCmd {
    /// Register a device and print its one-time enrolment token.
    Add {
        /// Device name.
        name: String,
        /// Groups it joins on enrolment.
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// List devices.
    List,
    /// Revoke a device: it is disconnected and refused from now on.
    Revoke {
        /// Device name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    /// Add devices to a group (created on first use).
    Add {
        /// Group name.
        group: String,
        /// Device names.
        #[arg(required = true)]
        devices: Vec<String>,
    },
    /// List groups.
    List,
}

#[derive(Args, Debug)]
struct QueueAddArgs {
    /// Device or group name.
    target: String,
    /// Time allowed per attempt, seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Transmissions allowed per command.
    #[arg(long, default_value_t = 1)]
    attempts: u32,
    /// Keep going after a command fails (default: stop the queue).
    #[arg(long)]
    continue_on_failure: bool,
    /// Queue each step as its own command (default: all steps form one command).
    #[arg(long)]
    each: bool,
    /// Steps: exec:CMD, sh:SCRIPT, fetch:PATH=URL, verify:PATH=SHA256, write:PATH=TEXT,
    /// reboot, report.
    #[arg(last = true, required = true)]
    steps: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum QueueCmd {
    /// Append commands to a device's queue, or to every member of a group.
    Add(QueueAddArgs),
    /// Show a device's queue: status, cursor, commands and results.
    Show {
        /// Device name.
        device: String,
    },
    /// Pause (the command in flight finishes first).
    Pause {
        /// Device name.
        device: String,
    },
    /// Resume a paused queue.
    Resume {
        /// Device name.
        device: String,
    },
    /// Cancel every pending command.
    Cancel {
        /// Device name.
        device: String,
    },
    /// Retry the command a failed queue stopped at.
    Retry {
        /// Device name.
        device: String,
    },
    /// Skip the command a failed queue stopped at.
    Skip {
        /// Device name.
        device: String,
    },
}

fn build(cmd: Cmd) -> Result<Request, String> {
    Ok(match cmd {
        Cmd::Device(DeviceCmd::Add { name, groups }) => Request::DeviceAdd { name, groups },
        Cmd::Device(DeviceCmd::List) => Request::DeviceList,
        Cmd::Device(DeviceCmd::Revoke { name }) => Request::DeviceRevoke { name },
        Cmd::Group(GroupCmd::Add { group, devices }) => Request::GroupAdd { group, devices },
        Cmd::Group(GroupCmd::List) => Request::GroupList,
        Cmd::Queue(QueueCmd::Add(a)) => {
            let steps = a
                .steps
                .iter()
                .map(|s| admin::parse_step(s))
                .collect::<Result<Vec<_>, _>>()?;
            let commands = if a.each {
                steps.into_iter().map(|s| vec![s]).collect()
            } else {
                vec![steps]
            };
            Request::QueueAdd {
                target: a.target,
                commands,
                timeout_ms: a.timeout.saturating_mul(1000),
                max_attempts: a.attempts.max(1),
                on_failure: if a.continue_on_failure {
                    OnFailureSpec::Continue
                } else {
                    OnFailureSpec::Stop
                },
            }
        }
        Cmd::Queue(QueueCmd::Show { device }) => Request::QueueShow { device },
        Cmd::Queue(QueueCmd::Pause { device }) => Request::QueuePause { device },
        Cmd::Queue(QueueCmd::Resume { device }) => Request::QueueResume { device },
        Cmd::Queue(QueueCmd::Cancel { device }) => Request::QueueCancel { device },
        Cmd::Queue(QueueCmd::Retry { device }) => Request::QueueRetry { device },
        Cmd::Queue(QueueCmd::Skip { device }) => Request::QueueSkip { device },
        Cmd::Status => Request::Status,
        Cmd::Events { from, limit } => Request::Events { from, limit },
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let data_dir = cli.data_dir.unwrap_or_else(default_data_dir);
    let req = match build(cli.cmd) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleetcast: {e}");
            return ExitCode::from(2);
        }
    };
    match admin::request(&data_dir, &req) {
        Err(e) => {
            eprintln!("fleetcast: {e}");
            ExitCode::from(3)
        }
        Ok(resp) if cli.json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&resp).unwrap_or_default()
            );
            if resp.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Ok(resp) if resp.ok => {
            print_human(&resp.data);
            ExitCode::SUCCESS
        }
        Ok(resp) => {
            eprintln!(
                "fleetcast: {}",
                resp.error.unwrap_or_else(|| "request refused".into())
            );
            ExitCode::from(1)
        }
    }
}

/// Plain text for people: `key: value` lines, tables as one line per row.
fn print_human(v: &serde_json::Value) {
    fn scalar(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "-".into(),
            other => other.to_string(),
        }
    }
    match v {
        serde_json::Value::Object(map) => {
            for (k, val) in map {
                match val {
                    serde_json::Value::Array(rows) => {
                        println!("{k}:");
                        for row in rows {
                            match row {
                                serde_json::Value::Object(r) => {
                                    let cells: Vec<String> = r
                                        .iter()
                                        .map(|(k, v)| format!("{k}={}", scalar(v)))
                                        .collect();
                                    println!("  {}", cells.join("  "));
                                }
                                other => println!("  {}", scalar(other)),
                            }
                        }
                    }
                    other => println!("{k}: {}", scalar(other)),
                }
            }
        }
        serde_json::Value::Null => {}
        other => println!("{}", scalar(other)),
    }
}
