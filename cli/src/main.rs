//! `fleetcast`: the operator CLI. Talks to a running `fleetcastd` over its admin socket.
//!
//! Every command takes `--json`: its output is then one JSON document on stdout (`watch`: one
//! JSON object per line), `{"ok":true,"data":...}` or `{"ok":false,"error":"...","kind":...}`.
//! Exit codes are defined in [`fleetcast_daemon::exit`]: 0 success; 1 the gateway refused the
//! request or the operation failed; 2 usage error; 3 the gateway could not be reached; 4 the
//! named device, group, task or file does not exist.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use fleetcast_cli::standalone;
use fleetcast_daemon::admin::{self, ClientError, ErrorKind, OnFailureSpec, Request, Response};
use fleetcast_daemon::exit::Exit;
use fleetcast_daemon::paths::default_data_dir;
use fleetcast_daemon::{errln, outln, output};

#[derive(Parser, Debug)]
#[command(
    name = "fleetcast",
    version,
    about = "Operate a fleetcast gateway",
    after_help = "Exit codes: 0 success; 1 the gateway refused the request or the operation \
                  failed; 2 usage error; 3 the gateway could not be reached; 4 the named device, \
                  group, task or file does not exist. See docs/operator.md."
)]
struct Cli {
    /// The gateway's data directory (its admin socket lives there).
    #[arg(long, global = true, env = "FLEETCAST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Machine-readable output: one JSON document on stdout (`watch`: one per line).
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
    #[command(group(clap::ArgGroup::new("gate").args(["min_ready", "when_online"]).multiple(true)))]
    Push {
        /// The file (on the gateway's machine).
        file: PathBuf,
        /// Target group.
        #[arg(long)]
        group: String,
        /// Payload bytes per datagram. Default: fill a frame of the gateway's multicast
        /// interface (1444 at MTU 1500).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        block_size: Option<u32>,
        /// Rate ceiling, megabits per second.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Return once the task is created instead of following its progress per receiver
        /// (always so with --json: then poll `task show ID --json`).
        #[arg(long)]
        no_follow: bool,
        /// Start the multicast this many seconds from now (a schedule; announces go out at
        /// once so receivers join and wait).
        #[arg(long = "in", value_name = "SECONDS")]
        start_in: Option<u64>,
        /// Start once this many receivers have joined ...
        #[arg(long, value_name = "N")]
        min_ready: Option<u32>,
        /// Devices added to the group later (`group add`) or enrolled into it get the file
        /// too: joining the multicast while it runs, caught up by unicast after. The group may
        /// be empty at the push.
        #[arg(long)]
        follow_group: bool,
        /// Start once N devices of the group are online (and joined), so freshly racked
        /// machines get imaged together; devices that enrol into the group meanwhile count
        /// (implies --follow-group).
        #[arg(long, value_name = "N")]
        when_online: Option<u32>,
        /// ... or after this many seconds, whichever comes first (needs --min-ready or
        /// --when-online).
        #[arg(long, value_name = "SECONDS", requires = "gate")]
        max_wait: Option<u64>,
        /// A command queued on each device once its copy verified, in `queue add` step
        /// syntax (e.g. `sh:dpkg -i /var/lib/fleetcast/downloads/pkg.deb`); repeat for more.
        #[arg(long, value_name = "STEP")]
        then: Vec<String>,
        /// Send by subnet-directed broadcast instead of the multicast group, on the interface
        /// of the gateway's --mcast-addr only: to ADDR, which must be that interface's
        /// directed broadcast (the gateway refuses any other), or without ADDR to that
        /// broadcast itself. Default: the gateway's `mcast.broadcast`, if set. The address
        /// takes `=` (`--broadcast=10.9.255.255`), so a bare `--broadcast FILE` leaves FILE
        /// the file.
        #[arg(long, value_name = "ADDR", num_args = 0..=1, require_equals = true, default_missing_value = "subnet", conflicts_with = "multicast")]
        broadcast: Option<BroadcastArg>,
        /// Send to the multicast group even when the gateway's `mcast.broadcast` is set.
        #[arg(long)]
        multicast: bool,
        /// Write the file as an image straight to each device's disk, partition or slot
        /// instead of its downloads directory: an absolute file path, KIND=ID of a disk or
        /// partition (serial, wwn, partlabel, partuuid, uuid; never a bare /dev name), or
        /// slot=a, slot=b, slot=inactive. The agent refuses a target that is mounted, holds
        /// the running system or is too small, and says why in `task show`.
        #[arg(long, value_name = "SPEC")]
        target: Option<String>,
        /// How the image travels: raw (every byte), sparse (runs of zeros stay off the wire)
        /// or compressed (zstd chunks; agents built with feature `zstd`). Sparse and
        /// compressed forms are prepared once and cached (`fleetcast image prepare`).
        #[arg(long, value_enum, default_value = "raw", requires = "target")]
        form: fleetcast_cli::image::ImageForm,
        /// Image bytes per compressed chunk (K or M suffix), with --form compressed.
        #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = fleetcast_cli::image::parse_size)]
        chunk: u32,
    },
    /// A/B update of a group: push IMAGE to each device's inactive slot, and once a device's
    /// copy verified, switch it to that slot for one boot, reboot, run its health check and
    /// keep the new slot, or roll back to the old one (docs/operator.md, "Updating a fleet
    /// safely"). Follow it with `task show` and `queue show DEVICE`.
    Update {
        /// The image (on the gateway's machine).
        image: PathBuf,
        /// Target group.
        #[arg(long)]
        group: String,
        /// Seconds from each device's reboot to a healthy new slot (default: the device's
        /// `health_deadline_secs`, and the gateway's reboot timeout for a device that does
        /// not come back).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(1..))]
        deadline: Option<u32>,
        /// Rate ceiling, megabits per second.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Return once the task is created instead of following its progress.
        #[arg(long)]
        no_follow: bool,
        /// How the image travels, as for `push --form`: raw, sparse or compressed.
        #[arg(long, value_enum, default_value = "raw")]
        form: fleetcast_cli::image::ImageForm,
        /// Image bytes per compressed chunk (K or M suffix), with --form compressed.
        #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = fleetcast_cli::image::parse_size)]
        chunk: u32,
    },
    /// Distribution tasks.
    #[command(subcommand)]
    Task(TaskCmd),
    /// The gateway's status: per device its queue, session and last configuration report.
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
    /// Follow the event log as it grows (Ctrl-C to stop).
    Watch {
        /// Start at this event id (default: only new events).
        #[arg(long)]
        from: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long = "for")]
        duration: Option<u64>,
    },
    /// The gateway's metrics (the Prometheus text of its metrics endpoint).
    Metrics,
    /// Write a consistent, compacted copy of the store to DEST while the gateway runs.
    /// Restore by stopping fleetcastd and putting DEST in place of `<data-dir>/store`.
    Backup {
        /// Destination directory (created; must not exist or be empty). Relative paths are
        /// taken from the current directory.
        dest: PathBuf,
    },
    /// Print a shell completion script (e.g. `fleetcast completions bash >
    /// /etc/bash_completion.d/fleetcast`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Measure multicast distribution against a raw UDP ceiling in a private lab network
    /// (1 gateway, N receivers, random loss, MTU 1500/9000) and write a report with plots.
    Bench {
        /// Receiver counts, comma-separated.
        #[arg(long, default_value = "1,4,16")]
        receivers: String,
        /// Loss per receiver in percent, comma-separated.
        #[arg(long, default_value = "0,1,5")]
        loss: String,
        /// Lab MTUs, comma-separated.
        #[arg(long, default_value = "1500,9000")]
        mtu: String,
        /// File size, MiB.
        #[arg(long, default_value_t = 256)]
        mib: usize,
        /// Longest wait for one push, seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Report directory (report.md, report.json, three SVG plots).
        #[arg(long, default_value = "bench-report")]
        out: PathBuf,
        /// Draw the report again from an earlier run's report.json instead of measuring.
        #[arg(long, value_name = "FILE")]
        from_json: Option<PathBuf>,
        /// Other tools to run in each cell after fleetcast, comma-separated: udpcast, uftp
        /// (Debian packages `udpcast`, `uftp`).
        #[arg(long, default_value = "")]
        peers: String,
        /// Measure imaging instead: push a generated disk image in these forms
        /// (comma-separated: raw, sparse, compressed) to each receiver's disk (a file labelled
        /// like a partition) at each loss, on the first MTU; writes image-report.md/.json.
        #[arg(long, value_name = "FORMS", value_delimiter = ',')]
        image: Vec<fleetcast_cli::image::ImageForm>,
    },
    /// Send one file by multicast to the receivers that join, with no gateway or enrolment
    /// (like udpcast's udp-sender): progress on stderr, a summary at the end; exit 0 only when
    /// every receiver that joined reported a verified copy. Do not rewrite the file meanwhile.
    Send(standalone::send::SendOpts),
    /// Receive one file from `fleetcast send` (like udpcast's udp-receiver); exit 0 only when
    /// its SHA-256 matched the announced one.
    Receive(standalone::receive::ReceiveOpts),
    /// Disk images: prepare (sparse map, compressed form) once, cached for pushes.
    #[command(subcommand)]
    Image(fleetcast_cli::image::ImageCmd),
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
    /// Show a device and its latest configuration report (OS, kernel, CPU, memory,
    /// addresses, attached devices with their targets, installed software) and when it came.
    Show {
        /// Device name.
        name: String,
    },
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
    /// Every task with its counts.
    List,
    /// One task's status table (per device: pending, in_progress, completed, failed,
    /// cancelled), or every task with its counts.
    Show {
        /// Task id (default: all tasks).
        id: Option<u64>,
    },
    /// Stop serving a task to one device, or to every device still pending or receiving: it
    /// is no longer announced or caught up (the agent is not told; see docs/operator.md).
    Cancel {
        /// Task id.
        id: u64,
        /// Only this device (default: the whole task).
        #[arg(long)]
        device: Option<String>,
    },
    /// Serve a task again to a failed or cancelled device, or to every such device: pending
    /// again, caught up by unicast.
    Retry {
        /// Task id.
        id: u64,
        /// Only this device (default: the whole task).
        #[arg(long)]
        device: Option<String>,
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
    /// The attached device the commands operate on, KIND:ID as `device show` lists it
    /// (disk:SERIAL or disk:WWN, net:MAC, usb:VENDOR:PRODUCT[:SERIAL], serial:/dev/ttyUSB0):
    /// the agent runs no step unless it is attached.
    #[arg(long, value_name = "KIND:ID")]
    attached: Option<String>,
    /// Steps: exec:CMD, sh:SCRIPT, install:PACKAGE..., fetch:PATH=URL (URL may be
    /// gateway:NAME), verify:PATH=SHA256, write:PATH=TEXT, reboot, report.
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

/// A failure of the CLI itself (before or instead of an answer).
struct Fail(Exit, String);

/// `file` as the absolute path the gateway opens (it runs elsewhere in the file system's
/// view: another working directory).
fn absolute_file(file: &std::path::Path) -> Result<std::path::PathBuf, Fail> {
    std::fs::canonicalize(file).map_err(|e| {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => Exit::NotFound,
            _ => Exit::Usage,
        };
        Fail(code, format!("cannot open {}: {e}", file.display()))
    })
}

/// The stream and image of a push of `file` to `target` in `form` (the cache prepares it).
fn image_push(
    file: &std::path::Path,
    target: &str,
    form: fleetcast_cli::image::ImageForm,
    chunk: u32,
    data_dir: &std::path::Path,
) -> Result<(String, admin::PushImage), Fail> {
    let path = absolute_file(file)?;
    let (stream, image) = fleetcast_cli::image::image_push(&path, target, form, chunk, data_dir)
        .map_err(|e| {
            let code = match e {
                fleetcast_cli::image::PushImageError::Target { .. } => Exit::Usage,
                _ => Exit::Failed,
            };
            Fail(code, e.to_string())
        })?;
    Ok((stream.display().to_string(), image))
}

fn build(cmd: Cmd, data_dir: &std::path::Path) -> Result<Request, Fail> {
    Ok(match cmd {
        Cmd::Device(DeviceCmd::Add { name, groups }) => Request::DeviceAdd { name, groups },
        Cmd::Device(DeviceCmd::List) => Request::DeviceList,
        Cmd::Device(DeviceCmd::Show { name }) => Request::DeviceShow { name },
        Cmd::Device(DeviceCmd::Revoke { name }) => Request::DeviceRevoke { name },
        Cmd::Group(GroupCmd::Add { group, devices }) => Request::GroupAdd { group, devices },
        Cmd::Group(GroupCmd::List) => Request::GroupList,
        Cmd::Queue(QueueCmd::Add(a)) => {
            let steps = a
                .steps
                .iter()
                .map(|s| admin::parse_step(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Fail(Exit::Usage, e.to_string()))?;
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
                attached: a.attached,
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
            follow_group,
            when_online,
            then,
            broadcast,
            multicast,
            target,
            form,
            chunk,
            ..
        } => {
            use fleetcast_daemon::admin::Delivery;
            let delivery = match (broadcast, multicast) {
                (Some(BroadcastArg(a)), _) => Delivery::Broadcast(a),
                (None, true) => Delivery::Multicast,
                (None, false) => Delivery::Default,
            };
            let then = then
                .iter()
                .map(|s| fleetcast_daemon::admin::parse_step(s).map(|st| vec![st]))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Fail(Exit::Usage, format!("--then: {e}")))?;
            let (path, image) = match &target {
                None => (absolute_file(&file)?.display().to_string(), None),
                Some(t) => {
                    let (stream, image) = image_push(&file, t, form, chunk, data_dir)?;
                    (stream, Some(image))
                }
            };
            Request::Push {
                path,
                group,
                // 0: the gateway picks the block that fills its interface's MTU.
                block_size: block_size.unwrap_or(0),
                rate_mbps: rate,
                trigger: fleetcast_daemon::admin::PushTrigger {
                    at_ms: start_in.map(|s| wall_ms() + s * 1000),
                    min_ready,
                    max_wait_s: max_wait,
                },
                then,
                delivery,
                follow: fleetcast_daemon::admin::PushFollow {
                    group: follow_group,
                    when_online,
                },
                image,
            }
        }
        Cmd::Update {
            image,
            group,
            deadline,
            rate,
            form,
            chunk,
            ..
        } => {
            let target = fleetcast_daemon::admin::UPDATE_TARGET;
            let (path, image) = image_push(&image, target, form, chunk, data_dir)?;
            Request::Push {
                path,
                group,
                block_size: 0,
                rate_mbps: rate,
                trigger: Default::default(),
                then: fleetcast_daemon::admin::update_commands(deadline.unwrap_or(0)),
                delivery: Default::default(),
                follow: Default::default(),
                image: Some(image),
            }
        }
        Cmd::Task(TaskCmd::Show { id }) => Request::TaskShow { task: id },
        Cmd::Task(TaskCmd::List) => Request::TaskShow { task: None },
        Cmd::Task(TaskCmd::Cancel { id, device }) => Request::TaskCancel { task: id, device },
        Cmd::Task(TaskCmd::Retry { id, device }) => Request::TaskRetry { task: id, device },
        Cmd::Metrics => Request::Metrics,
        Cmd::Backup { dest } => {
            let dest = std::path::absolute(&dest).map_err(|e| {
                Fail(
                    Exit::Usage,
                    format!("bad destination {}: {e}", dest.display()),
                )
            })?;
            Request::Backup {
                dest: dest.display().to_string(),
            }
        }
        Cmd::Watch { .. }
        | Cmd::Bench { .. }
        | Cmd::Send(_)
        | Cmd::Receive(_)
        | Cmd::Demo { .. }
        | Cmd::Image(_)
        | Cmd::Completions { .. }
        | Cmd::InternalGateway { .. }
        | Cmd::InternalAgent { .. } => {
            return Err(Fail(Exit::Usage, "not a single request".into()))
        }
        Cmd::Events { from, limit } => Request::Events { from, limit },
    })
}

fn main() -> ExitCode {
    // A reader that goes away (`| head -1`) ends the output quietly; the exit code stays the
    // command's own (see `fleetcast_daemon::output`).
    output::exit_code(run())
}

fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // Usage errors are JSON too when --json is on the line (help and version are not
        // errors).
        Err(e) if e.use_stderr() && std::env::args().any(|a| a == "--json") => {
            let msg = e.render().to_string();
            return fail(true, Exit::Usage, msg.trim_end());
        }
        Err(e) => e.exit(),
    };
    let data_dir = cli.data_dir.unwrap_or_else(default_data_dir);
    let json = cli.json;
    match cli.cmd {
        Cmd::Watch { from, duration } => return watch(&data_dir, from, duration, json),
        Cmd::Demo { devices } => return fleetcast_cli::demo::run(devices),
        Cmd::Image(cmd) => return fleetcast_cli::image::run(cmd, &data_dir, json),
        Cmd::Send(opts) => return standalone::send_main(&opts, json),
        Cmd::Receive(opts) => return standalone::receive_main(&opts, json),
        Cmd::Bench {
            receivers,
            loss,
            mtu,
            mib,
            timeout,
            out,
            from_json,
            peers,
            image,
        } => {
            return match from_json {
                Some(f) => bench_replot(&f, &out, json),
                None if !image.is_empty() => bench_image(
                    &BenchFlags {
                        receivers: &receivers,
                        loss: &loss,
                        mtu: &mtu,
                        peers: "",
                        mib,
                        timeout,
                    },
                    &image,
                    &out,
                ),
                None => bench(
                    &BenchFlags {
                        receivers: &receivers,
                        loss: &loss,
                        mtu: &mtu,
                        peers: &peers,
                        mib,
                        timeout,
                    },
                    &out,
                    json,
                ),
            }
        }
        Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "fleetcast", &mut script);
            output::out(&String::from_utf8_lossy(&script));
            return Exit::Ok.into();
        }
        Cmd::InternalGateway { args } => {
            return fleetcast_daemon::daemon_main::main_with_args(
                std::iter::once("fleetcastd".to_string()).chain(args),
            )
        }
        Cmd::InternalAgent { args } => return fleetcast_agent::cli::main_with_args(args),
        _ => {}
    }
    // With --json a push answers once the task exists (scripts poll `task show ID --json`).
    let follow = matches!(
        cli.cmd,
        Cmd::Push {
            no_follow: false,
            ..
        } | Cmd::Update {
            no_follow: false,
            ..
        }
    ) && !json;
    let metrics = matches!(cli.cmd, Cmd::Metrics);
    let device_show = matches!(cli.cmd, Cmd::Device(DeviceCmd::Show { .. }));
    let timeout = match cli.cmd {
        // A backup copies the whole store before it answers.
        Cmd::Backup { .. } => std::time::Duration::from_secs(3600),
        _ => std::time::Duration::from_secs(30),
    };
    let req = match build(cli.cmd, &data_dir) {
        Ok(r) => r,
        Err(Fail(code, msg)) => return fail(json, code, &msg),
    };
    let resp = match admin::request_timeout(&data_dir, &req, timeout) {
        Ok(r) => r,
        Err(e) => return client_fail(json, &e),
    };
    if !resp.ok {
        return refused(json, resp);
    }
    if follow {
        print_human(&resp.data);
        return match resp.data.get("task").and_then(|t| t.as_u64()) {
            Some(task) => follow_task(&data_dir, task),
            None => Exit::Ok.into(),
        };
    }
    if json {
        print_json(&resp);
    } else if metrics {
        output::out(resp.data["text"].as_str().unwrap_or_default());
    } else if device_show {
        print_device(&resp.data);
    } else {
        print_human(&resp.data);
    }
    Exit::Ok.into()
}

fn print_json(v: &impl serde::Serialize) {
    outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Reports a failure: as a JSON document on stdout with `--json`, else on stderr.
fn fail(json: bool, code: Exit, msg: &str) -> ExitCode {
    if json {
        print_json(&serde_json::json!({ "ok": false, "error": msg, "kind": code.name() }));
    } else {
        errln!("fleetcast: {msg}");
    }
    code.into()
}

fn client_fail(json: bool, e: &ClientError) -> ExitCode {
    let code = match e {
        ClientError::Malformed(_) => Exit::Failed,
        _ => Exit::Unreachable,
    };
    fail(json, code, &e.to_string())
}

/// The gateway refused: exit 4 when what was named does not exist, else 1.
fn refused(json: bool, resp: Response) -> ExitCode {
    let code = match resp.kind {
        Some(ErrorKind::NotFound) => Exit::NotFound,
        None => Exit::Failed,
    };
    if json {
        let mut v = serde_json::to_value(&resp).unwrap_or_default();
        v["kind"] = code.name().into();
        print_json(&v);
        return code.into();
    }
    let msg = resp.error.unwrap_or_else(|| "request refused".into());
    errln!("fleetcast: {msg}");
    code.into()
}

/// `device show` for people: the device's fields, then its report's, then a table each of
/// attached devices and installed software.
fn print_device(v: &serde_json::Value) {
    let mut top = v.clone();
    let report = top
        .as_object_mut()
        .and_then(|m| m.remove("report"))
        .unwrap_or_default();
    print_human(&top);
    if report.is_null() {
        outln!("report: - (none received yet)");
        return;
    }
    outln!("report:");
    for (k, val) in report.as_object().into_iter().flatten() {
        match (k.as_str(), val) {
            ("software" | "devices", _) => {}
            (_, serde_json::Value::Array(items)) => {
                let items: Vec<String> = items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                    .collect();
                outln!("  {k}: {}", items.join(", "));
            }
            (_, serde_json::Value::String(s)) => outln!("  {k}: {s}"),
            (_, other) => outln!("  {k}: {other}"),
        }
    }
    let devices = report["devices"].as_array().cloned().unwrap_or_default();
    outln!("  devices: {}", devices.len());
    for d in &devices {
        let text = |k: &str| d[k].as_str().unwrap_or_default().to_string();
        let size = d["size"].as_u64().unwrap_or(0);
        let mut line = format!("    {}  {}", text("target"), text("name"));
        for k in ["model", "wwn"] {
            if !text(k).is_empty() {
                line.push_str(&format!("  {k}={}", text(k)));
            }
        }
        if size > 0 {
            line.push_str(&format!("  size={size}"));
        }
        outln!("{line}");
    }
    let software = report["software"].as_array().cloned().unwrap_or_default();
    outln!(
        "  software: {} ({})",
        software.len(),
        report["package_manager"].as_str().unwrap_or("none")
    );
    for p in &software {
        outln!(
            "    {} {}",
            p["name"].as_str().unwrap_or_default(),
            p["version"].as_str().unwrap_or_default()
        );
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
                        outln!("{k}:");
                        for row in rows {
                            match row {
                                serde_json::Value::Object(r) => {
                                    let cells: Vec<String> = r
                                        .iter()
                                        .map(|(k, v)| format!("{k}={}", scalar(v)))
                                        .collect();
                                    outln!("  {}", cells.join("  "));
                                }
                                other => outln!("  {}", scalar(other)),
                            }
                        }
                    }
                    other => outln!("{k}: {}", scalar(other)),
                }
            }
        }
        serde_json::Value::Null => {}
        other => outln!("{}", scalar(other)),
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
            Err(e) => return client_fail(json, &e),
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
                        outln!("{e}");
                    } else {
                        outln!(
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
            Ok(r) => return refused(json, r),
            Err(e) => return client_fail(json, &e),
        }
        n += 1;
        // Nobody reads any more (`watch | head`): stop instead of polling forever.
        if polls.is_some_and(|p| n >= p) || output::stdout_gone() {
            return Exit::Ok.into();
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Prints each receiver's progress as it changes until every target has completed, failed or
/// was cancelled. Exit code 0 when all completed, 1 otherwise.
fn follow_task(data_dir: &std::path::Path, task: u64) -> ExitCode {
    let mut last: std::collections::BTreeMap<String, String> = Default::default();
    let mut waiting: Option<String> = None;
    let mut told_empty = false;
    loop {
        let resp = match admin::request(data_dir, &Request::TaskShow { task: Some(task) }) {
            Ok(r) if r.ok => r,
            Ok(r) => return refused(false, r),
            Err(e) => return client_fail(false, &e),
        };
        // A `--when-online` gate: say how far it is whenever that changes.
        let now_waiting = resp.data["waiting"].as_str().map(str::to_string);
        if now_waiting != waiting {
            if let Some(w) = &now_waiting {
                outln!("  waiting: {w}");
            }
            waiting = now_waiting;
        }
        let rows = resp.data["devices"].as_array().cloned().unwrap_or_default();
        // A push that follows an empty group: nothing to show until a device joins it.
        if rows.is_empty() && !told_empty {
            outln!(
                "  no targets yet: devices joining group {} get it as they come (stop following \
                 with Ctrl-C: the push goes on)",
                resp.data["group"].as_str().unwrap_or("?")
            );
            told_empty = true;
        }
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
                outln!("  {name}: {line}");
                last.insert(name, line);
            }
        }
        // Final: completed, failed, or cancelled by an operator (`task cancel`).
        let over = rows.iter().all(|r| {
            ["completed", "failed", "cancelled"]
                .iter()
                .any(|st| r["status"] == *st)
        });
        if !rows.is_empty() && over {
            let completed = rows.iter().filter(|r| r["status"] == "completed").count();
            outln!(
                "task {task}: {completed} of {} receivers have a verified copy",
                rows.len()
            );
            return if completed == rows.len() {
                Exit::Ok
            } else {
                Exit::Failed
            }
            .into();
        }
        if output::stdout_gone() {
            // Following is only display: the push goes on in the gateway.
            return Exit::Ok.into();
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// `push --broadcast [ADDR]`: an address, or (bare flag) the subnet's own broadcast.
#[derive(Debug, Clone, Copy)]
struct BroadcastArg(Option<std::net::Ipv4Addr>);

impl std::str::FromStr for BroadcastArg {
    type Err = std::net::AddrParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "subnet" {
            return Ok(BroadcastArg(None));
        }
        s.parse().map(|a| BroadcastArg(Some(a)))
    }
}

/// Wall-clock milliseconds since the UNIX epoch (for `push --in`).
#[allow(clippy::disallowed_methods)] // The CLI's one clock read: turning "in N s" into a time.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why `fleetcast bench`'s flags give no plan.
#[derive(Debug, thiserror::Error)]
enum PlanError {
    /// A flag's value cannot be measured.
    #[error(transparent)]
    Flag(#[from] fleetcast_cli::bench::FlagError),
    /// `current_exe` failed: the bench re-executes its own binary.
    #[error("cannot find my own binary: {0}")]
    OwnBinary(#[source] std::io::Error),
}

/// `fleetcast bench`'s measuring flags, as given.
struct BenchFlags<'a> {
    receivers: &'a str,
    loss: &'a str,
    mtu: &'a str,
    peers: &'a str,
    mib: usize,
    timeout: u64,
}

/// The plan `fleetcast bench`'s measuring flags give (checked).
fn bench_plan(flags: &BenchFlags) -> Result<fleetcast_cli::bench::Plan, PlanError> {
    use fleetcast_cli::bench::{parse_list, Plan};
    let plan = Plan {
        receivers: parse_list("--receivers", flags.receivers)?,
        loss: parse_list("--loss", flags.loss)?,
        mtus: parse_list("--mtu", flags.mtu)?,
        mib: flags.mib,
        timeout: std::time::Duration::from_secs(flags.timeout),
        exe: std::env::current_exe().map_err(PlanError::OwnBinary)?,
        work: std::env::temp_dir().join(format!("fleetcast-bench-{}", std::process::id())),
    };
    plan.check()?;
    Ok(plan)
}

/// `fleetcast bench`: the end-to-end multicast benchmark (see `fleetcast_cli::bench`).
fn bench(flags: &BenchFlags, out: &std::path::Path, json: bool) -> ExitCode {
    use fleetcast_cli::bench::{self, peers::parse_peers};
    let plan = bench_plan(flags).and_then(|p| Ok((p, parse_peers(flags.peers)?)));
    let (plan, peers) = match plan {
        Ok(p) => p,
        Err(e) => {
            errln!("fleetcast bench: {e}");
            return Exit::Usage.into();
        }
    };
    let result = bench::run_with_peers(&plan, &peers, &mut |line| errln!("{line}"));
    if std::env::var_os("FLEETCAST_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&plan.work);
    }
    let measured = match result {
        Ok(r) => r,
        Err(e) => {
            errln!("fleetcast bench: {e}");
            return Exit::Failed.into();
        }
    };
    match bench::write_measured(&measured, &plan, out) {
        Ok(md) => {
            if json {
                let rows: Vec<_> = measured.rows.iter().map(bench::Row::to_json).collect();
                let peer_rows: Vec<_> = measured
                    .peers
                    .iter()
                    .map(bench::peers::PeerRow::to_json)
                    .collect();
                outln!(
                    "{}",
                    serde_json::json!({ "ok": true, "data": { "rows": rows, "peer_rows": peer_rows, "report": out.display().to_string() } })
                );
            } else {
                outln!("{md}");
                errln!("report written to {}", out.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("fleetcast bench: {e}");
            Exit::Failed.into()
        }
    }
}

/// `fleetcast bench --image FORMS`: imaging end to end (see `fleetcast_cli::bench::image`).
fn bench_image(
    flags: &BenchFlags,
    forms: &[fleetcast_cli::image::ImageForm],
    out: &std::path::Path,
) -> ExitCode {
    use fleetcast_cli::bench::image;
    let plan = match bench_plan(flags) {
        Ok(p) => p,
        Err(e) => {
            errln!("fleetcast bench: {e}");
            return Exit::Usage.into();
        }
    };
    let result = image::run(&plan, forms, &mut |line| errln!("{line}"));
    if std::env::var_os("FLEETCAST_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&plan.work);
    }
    let rows = match result {
        Ok(r) => r,
        Err(e) => {
            errln!("fleetcast bench: {e}");
            return Exit::Failed.into();
        }
    };
    let md = image::markdown(&rows);
    let json: Vec<_> = rows.iter().map(image::ImageRow::to_json).collect();
    let written = std::fs::create_dir_all(out)
        .and_then(|()| std::fs::write(out.join("image-report.md"), &md))
        .and_then(|()| {
            let v = serde_json::json!({ "mib": plan.mib, "rows": json });
            std::fs::write(out.join("image-report.json"), format!("{v:#}\n"))
        });
    if let Err(e) = written {
        errln!("fleetcast bench: {}: {e}", out.display());
        return Exit::Failed.into();
    }
    outln!("{md}");
    errln!("report written to {}", out.display());
    ExitCode::SUCCESS
}

/// `fleetcast bench --from-json FILE`: the report of an earlier run, drawn again.
fn bench_replot(file: &std::path::Path, out: &std::path::Path, json: bool) -> ExitCode {
    use fleetcast_cli::bench::{self, Plan};
    let parsed = std::fs::read_to_string(file)
        .map_err(|source| bench::BenchError::File {
            path: file.to_path_buf(),
            source,
        })
        .and_then(|t| {
            serde_json::from_str::<serde_json::Value>(&t).map_err(|source| {
                bench::BenchError::Json {
                    path: file.to_path_buf(),
                    source,
                }
            })
        })
        .and_then(|v| bench::measured_from_json(&v));
    let (mib, measured) = match parsed {
        Ok(x) => x,
        Err(e) => {
            errln!("fleetcast bench: {e}");
            return Exit::Usage.into();
        }
    };
    let plan = Plan {
        receivers: vec![],
        loss: vec![],
        mtus: vec![],
        mib,
        timeout: std::time::Duration::ZERO,
        exe: PathBuf::new(),
        work: PathBuf::new(),
    };
    match bench::write_measured(&measured, &plan, out) {
        Ok(md) => {
            if json {
                outln!(
                    "{}",
                    serde_json::json!({ "ok": true, "data": { "rows": measured.rows.len(), "peer_rows": measured.peers.len(), "report": out.display().to_string() } })
                );
            } else {
                outln!("{md}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("fleetcast bench: {e}");
            Exit::Failed.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Cmd};

    /// `fleetcast update` is a push to each device's inactive slot whose `then` commands switch,
    /// reboot and commit.
    #[test]
    fn update_is_a_push_to_the_inactive_slot_that_switches_and_commits() {
        use fleetcast_daemon::admin::Request;
        use fleetcast_wire::Step;
        let img = tempfile::NamedTempFile::new().unwrap();
        let path = img.path().to_str().unwrap();
        let cli = Cli::try_parse_from([
            "fleetcast",
            "update",
            path,
            "--group",
            "g",
            "--deadline",
            "90",
        ])
        .unwrap();
        match super::build(cli.cmd, img.path().parent().unwrap()) {
            Ok(Request::Push {
                group, then, image, ..
            }) => {
                assert_eq!(group, "g");
                assert_eq!(image.unwrap().target, "slot=inactive");
                assert_eq!(
                    then,
                    [
                        vec![Step::SlotSwitch { deadline_secs: 90 }, Step::Reboot],
                        vec![Step::SlotCommit]
                    ]
                );
            }
            _ => panic!("not a push"),
        }
        let bad = Cli::try_parse_from([
            "fleetcast",
            "update",
            path,
            "--group",
            "g",
            "--deadline",
            "0",
        ]);
        assert!(bad.is_err());
    }

    /// `--broadcast` takes its address only with `=`: a bare flag before the file leaves
    /// the file alone (it used to swallow it as the address, and fail to parse).
    #[test]
    fn a_bare_broadcast_flag_does_not_take_the_file() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).map(|c| c.cmd) {
            Ok(Cmd::Push {
                file, broadcast, ..
            }) => Ok((file, broadcast.map(|b| b.0))),
            Ok(_) => panic!("not a push"),
            Err(e) => Err(e.kind()),
        };
        let bare = parse(&[
            "fleetcast",
            "push",
            "--broadcast",
            "img.bin",
            "--group",
            "g",
        ]);
        assert_eq!(bare, Ok(("img.bin".into(), Some(None))));
        let at = parse(&[
            "fleetcast",
            "push",
            "img.bin",
            "--broadcast=10.9.255.255",
            "--group",
            "g",
        ]);
        assert_eq!(
            at,
            Ok((
                "img.bin".into(),
                Some(Some("10.9.255.255".parse().unwrap()))
            ))
        );
        let none = parse(&["fleetcast", "push", "img.bin", "--group", "g"]);
        assert_eq!(none, Ok(("img.bin".into(), None)));
        // An address after a space is now the file, and the file a second one: refused.
        assert!(parse(&[
            "fleetcast",
            "push",
            "img.bin",
            "--broadcast",
            "10.9.255.255",
            "--group",
            "g"
        ])
        .is_err());
    }
}
