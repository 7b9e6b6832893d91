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
    /// Publish a file to every member of a group by multicast (with unicast repair and
    /// catch-up for devices that join later). Do not rewrite the file while it is pushed.
    Push {
        /// The file (on the gateway's machine).
        file: PathBuf,
        /// Target group.
        #[arg(long)]
        group: String,
        /// Payload bytes per datagram.
        #[arg(long, default_value_t = 1400)]
        block_size: u32,
        /// Rate ceiling, megabits per second.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Return once the task is created instead of following its progress per receiver.
        #[arg(long)]
        no_follow: bool,
        /// Start the multicast this many seconds from now (a schedule; announces go out at
        /// once so receivers join and wait).
        #[arg(long = "in", value_name = "SECONDS")]
        start_in: Option<u64>,
        /// Start once this many receivers have joined ...
        #[arg(long, value_name = "N")]
        min_ready: Option<u32>,
        /// ... or after this many seconds, whichever comes first (needs --min-ready).
        #[arg(long, value_name = "SECONDS", requires = "min_ready")]
        max_wait: Option<u64>,
        /// A command queued on each device once its copy verified, in `queue add` step
        /// syntax (e.g. `sh:dpkg -i /var/lib/fleetcast/downloads/pkg.deb`); repeat for more.
        #[arg(long, value_name = "STEP")]
        then: Vec<String>,
    },
    /// Distribution tasks.
    #[command(subcommand)]
    Task(TaskCmd),
    /// The gateway's status: per device its queue, session and last configuration report.
    Status,
    /// Run the whole system on this machine: a gateway, agents, a queue with a reboot.
    Demo {
        /// Number of agents.
        #[arg(long, default_value_t = 3)]
        devices: usize,
    },
    /// (internal) Run the gateway; used by `demo`.
    #[command(name = "__gateway", hide = true)]
    InternalGateway {
        /// fleetcastd arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// (internal) Run an agent; used by `demo`.
    #[command(name = "__agent", hide = true)]
    InternalAgent {
        /// fleetcast-agent arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Follow the event log as it grows (Ctrl-C to stop).
    Watch {
        /// Start at this event id (default: only new events).
        #[arg(long)]
        from: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long = "for")]
        duration: Option<u64>,
    },
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

#[derive(Subcommand, Debug)]
enum TaskCmd {
    /// One task's status table (per device: pending, in_progress, completed, failed), or
    /// every task with its counts.
    Show {
        /// Task id (default: all tasks).
        id: Option<u64>,
    },
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
        Cmd::Push {
            file,
            group,
            block_size,
            rate,
            start_in,
            min_ready,
            max_wait,
            then,
            ..
        } => {
            let then = then
                .iter()
                .map(|s| fleetcast_daemon::admin::parse_step(s).map(|st| vec![st]))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--then: {e}"))?;
            let path = std::fs::canonicalize(&file)
                .map_err(|e| format!("cannot open {}: {e}", file.display()))?;
            Request::Push {
                path: path.display().to_string(),
                group,
                block_size,
                rate_mbps: rate,
                trigger: fleetcast_daemon::admin::PushTrigger {
                    at_ms: start_in.map(|s| wall_ms() + s * 1000),
                    min_ready,
                    max_wait_s: max_wait,
                },
                then,
            }
        }
        Cmd::Task(TaskCmd::Show { id }) => Request::TaskShow { task: id },
        Cmd::Watch { .. }
        | Cmd::Demo { .. }
        | Cmd::InternalGateway { .. }
        | Cmd::InternalAgent { .. } => return Err("not a single request".into()),
        Cmd::Events { from, limit } => Request::Events { from, limit },
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let data_dir = cli.data_dir.unwrap_or_else(default_data_dir);
    match cli.cmd {
        Cmd::Watch { from, duration } => return watch(&data_dir, from, duration, cli.json),
        Cmd::Demo { devices } => return fleetcast_daemon::demo::run(devices),
        Cmd::InternalGateway { args } => {
            return fleetcast_daemon::daemon_main::main_with_args(
                std::iter::once("fleetcastd".to_string()).chain(args),
            )
        }
        Cmd::InternalAgent { args } => return fleetcast_agent::cli::main_with_args(args),
        _ => {}
    }
    let follow = matches!(
        cli.cmd,
        Cmd::Push {
            no_follow: false,
            ..
        }
    ) && !cli.json;
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
        Ok(resp) if resp.ok && follow => {
            print_human(&resp.data);
            match resp.data.get("task").and_then(|t| t.as_u64()) {
                Some(task) => follow_task(&data_dir, task),
                None => ExitCode::SUCCESS,
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

/// Polls the event log and prints new events until `duration` passes (or forever).
fn watch(
    data_dir: &std::path::Path,
    from: Option<u64>,
    duration: Option<u64>,
    json: bool,
) -> ExitCode {
    let mut next = match from {
        Some(f) => f,
        None => match admin::request(data_dir, &Request::Status) {
            Ok(r) => {
                r.data
                    .get("last_event")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0)
                    + 1
            }
            Err(e) => {
                eprintln!("fleetcast: {e}");
                return ExitCode::from(3);
            }
        },
    };
    let polls = duration.map(|d| d * 4);
    let mut n = 0u64;
    loop {
        match admin::request(
            data_dir,
            &Request::Events {
                from: next,
                limit: 1000,
            },
        ) {
            Ok(r) if r.ok => {
                let events = r.data.get("events").and_then(|v| v.as_array());
                for e in events.into_iter().flatten() {
                    if json {
                        println!("{e}");
                    } else {
                        println!(
                            "#{} device={} {}: {}",
                            e["id"],
                            e["device"],
                            e["kind"].as_str().unwrap_or("?"),
                            e["message"].as_str().unwrap_or("")
                        );
                    }
                    next = e["id"].as_u64().unwrap_or(next) + 1;
                }
            }
            Ok(r) => {
                eprintln!("fleetcast: {}", r.error.unwrap_or_default());
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("fleetcast: {e}");
                return ExitCode::from(3);
            }
        }
        n += 1;
        if polls.is_some_and(|p| n >= p) {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Prints each receiver's progress as it changes until every target has completed or failed.
/// Exit code 0 when all completed, 1 when any failed.
fn follow_task(data_dir: &std::path::Path, task: u64) -> ExitCode {
    let mut last: std::collections::BTreeMap<String, String> = Default::default();
    loop {
        let rows = match admin::request(data_dir, &Request::TaskShow { task: Some(task) }) {
            Ok(r) if r.ok => r.data["devices"].as_array().cloned().unwrap_or_default(),
            Ok(r) => {
                eprintln!("fleetcast: {}", r.error.unwrap_or_default());
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("fleetcast: {e}");
                return ExitCode::from(3);
            }
        };
        for r in &rows {
            let name = r["device"].as_str().unwrap_or("?").to_string();
            let line = format!(
                "{} {}{}",
                r["status"].as_str().unwrap_or("?"),
                r["blocks"].as_str().unwrap_or(""),
                r["reason"]
                    .as_str()
                    .map(|x| format!(" ({x})"))
                    .unwrap_or_default()
            );
            if last.get(&name) != Some(&line) {
                println!("  {name}: {line}");
                last.insert(name, line);
            }
        }
        let done = |st: &str| {
            rows.iter()
                .all(|r| r["status"] == "completed" || r["status"] == st)
        };
        if !rows.is_empty() && done("failed") {
            let failed = rows.iter().filter(|r| r["status"] == "failed").count();
            println!(
                "task {task}: {} of {} receivers have a verified copy",
                rows.len() - failed,
                rows.len()
            );
            return if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Wall-clock milliseconds since the UNIX epoch (for `push --in`).
#[allow(clippy::disallowed_methods)] // The CLI's one clock read: turning "in N s" into a time.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
