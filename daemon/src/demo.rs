//! `fleetcast demo`: the whole control plane on this machine, no configuration, no root.
//!
//! Starts a gateway with an embedded store in a fresh temporary directory, listening on
//! 127.0.0.1 only; enrols a handful of real agents (separate processes, each with its own state
//! directory and boot id); queues five commands per device with a reboot in the middle; plays
//! the machine's part in each reboot (the agent exits, the demo gives it a new boot id and
//! starts it again, and it comes back on a new TLS session); and prints what happened and how
//! long it took. Every process it starts is ended by PID when it finishes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::admin::{self, OnFailureSpec, Request, StepSpec};
use crate::gateway::Clock;

/// Exit code with which a demo agent "reboots".
const REBOOT_EXIT: i32 = 75;

struct Proc {
    child: Child,
    name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Only processes this demo started, by PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn new_boot_id(dir: &Path, device: &str, n: u32, clock: &Clock) -> std::io::Result<PathBuf> {
    let (mono, wall) = clock.read();
    let p = dir.join(format!("{device}.boot"));
    let id = format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        wall as u32,
        n,
        mono.as_micros() & 0xffff_ffff_ffff
    );
    std::fs::write(&p, id)?;
    Ok(p)
}

fn req(data: &Path, r: &Request) -> Result<Value, String> {
    match admin::request(data, r) {
        Ok(resp) if resp.ok => Ok(resp.data),
        Ok(resp) => Err(resp.error.unwrap_or_default()),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs the demo with `devices` agents. Returns the process exit code.
pub fn run(devices: usize) -> ExitCode {
    match demo(devices.clamp(1, 50)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetcast demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(n: usize) -> Result<(), String> {
    let clock = Clock::new();
    let (t0, _) = clock.read();
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let tmp = std::env::temp_dir().join(format!("fleetcast-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let cleanup = TempDir(tmp.clone());
    let data = tmp.join("gateway");
    println!("fleetcast demo: gateway data in {}", data.display());

    // 1. The gateway, on loopback only.
    let mut gw = Command::new(&exe)
        .args(["__gateway", "--", "--data-dir"])
        .arg(&data)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--heartbeat",
            "5",
            "--reboot-timeout",
            "60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(tmp.join("gateway.log")).map_err(|e| e.to_string())?,
        ))
        .spawn()
        .map_err(|e| format!("cannot start the gateway: {e}"))?;
    let mut line = String::new();
    BufReader::new(gw.stdout.take().ok_or("no gateway stdout")?)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let gw = Proc {
        child: gw,
        name: "gateway".into(),
    };
    let addr = line.trim().strip_prefix("ready ").ok_or_else(|| {
        format!(
            "gateway did not start (see {})",
            tmp.join("gateway.log").display()
        )
    })?;
    let addr = addr.to_string();
    println!("  gateway listening on {addr} (TLS, its own CA)");

    // 2. Enrol the agents.
    let names: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
    let mut agents: Vec<Option<Proc>> = Vec::new();
    let mut boots = vec![0u32; n];
    let start_agent = |name: &str, token: Option<&str>, boot: &Path| -> Result<Proc, String> {
        let mut c = Command::new(&exe);
        c.args(["__agent", "--", "--gateway", &addr, "--state-dir"])
            .arg(tmp.join(name))
            .arg("--ca")
            .arg(data.join("pki/ca.pem"))
            .arg("--boot-id-file")
            .arg(boot)
            .args(["--reboot-exit", &REBOOT_EXIT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(t) = token {
            c.args(["--token", t, "--name", name]);
        }
        let child = c
            .spawn()
            .map_err(|e| format!("cannot start agent {name}: {e}"))?;
        Ok(Proc {
            child,
            name: name.to_string(),
        })
    };
    for (i, name) in names.iter().enumerate() {
        let d = req(
            &data,
            &Request::DeviceAdd {
                name: name.clone(),
                groups: vec!["demo".into()],
            },
        )?;
        let token = d["token"].as_str().ok_or("no token")?.to_string();
        let boot = new_boot_id(&tmp, name, boots[i], &clock).map_err(|e| e.to_string())?;
        agents.push(Some(start_agent(name, Some(&token), &boot)?));
    }
    println!("  {n} agents started; enrolling with one-time tokens, then mutual TLS");

    let enrol_deadline = t0 + Duration::from_secs(30);
    loop {
        let st = req(&data, &Request::Status)?;
        let online = st["devices"]
            .as_array()
            .map_or(0, |d| d.iter().filter(|d| d["online"] == true).count());
        if online == n {
            break;
        }
        if clock.read().0 > enrol_deadline {
            return Err(format!("only {online} of {n} agents enrolled within 30 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (t_enrolled, _) = clock.read();
    println!(
        "  {n} devices enrolled and online in {:.2} s",
        (t_enrolled - t0).as_secs_f64()
    );

    // 3. Queue: five commands with a reboot in the middle.
    let log = |name: &str| tmp.join(format!("{name}.log"));
    for name in &names {
        let l = log(name).display().to_string();
        let cmds: Vec<Vec<StepSpec>> = vec![
            vec![StepSpec::Exec {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!("echo 1 >> {l}; uname -sr"),
                ],
            }],
            vec![StepSpec::Write {
                path: tmp.join(format!("{name}.conf")).display().to_string(),
                mode: 0o644,
                contents: format!("device={name}\n"),
            }],
            vec![
                StepSpec::Exec {
                    argv: vec!["/bin/sh".into(), "-c".into(), format!("echo 3 >> {l}")],
                },
                StepSpec::Reboot,
            ],
            vec![StepSpec::Exec {
                argv: vec!["/bin/sh".into(), "-c".into(), format!("echo 4 >> {l}")],
            }],
            vec![StepSpec::Report],
        ];
        req(
            &data,
            &Request::QueueAdd {
                target: name.clone(),
                commands: cmds,
                timeout_ms: 30_000,
                max_attempts: 1,
                on_failure: OnFailureSpec::Stop,
            },
        )?;
    }
    println!("  queued 5 commands per device: exec, write, exec+reboot, exec, report");

    // 4. Watch, and play the machine's part in reboots.
    let mut last_line = String::new();
    let deadline = t0 + Duration::from_secs(120);
    loop {
        let (now, _) = clock.read();
        if now > deadline {
            return Err("timed out after 120 s; see the gateway log".into());
        }
        for (i, slot) in agents.iter_mut().enumerate() {
            let exited = match slot.as_mut() {
                Some(p) => p.child.try_wait().map_err(|e| e.to_string())?,
                None => None,
            };
            if let Some(status) = exited {
                let name = slot.take().map(|p| p.name.clone()).unwrap_or_default();
                if status.code() == Some(REBOOT_EXIT) {
                    boots[i] += 1;
                    let boot =
                        new_boot_id(&tmp, &name, boots[i], &clock).map_err(|e| e.to_string())?;
                    println!("  {name}: rebooting (new boot id), agent restarting");
                    *slot = Some(start_agent(&name, None, &boot)?);
                } else {
                    return Err(format!("agent {name} exited: {status}"));
                }
            }
        }
        let st = req(&data, &Request::Status)?;
        let rows = st["devices"].as_array().cloned().unwrap_or_default();
        let summary: Vec<String> = rows
            .iter()
            .map(|d| {
                format!(
                    "{}={} {}/5",
                    d["name"].as_str().unwrap_or("?"),
                    d["queue"].as_str().unwrap_or("?"),
                    d["done"]
                )
            })
            .collect();
        let line = summary.join("  ");
        if line != last_line {
            println!("  {line}");
            last_line = line;
        }
        if rows.len() == n && rows.iter().all(|d| d["queue"] == "done") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (t1, _) = clock.read();

    // 5. Summary.
    println!(
        "\nall {n} queues done {:.2} s after queueing (5 commands each, one reboot each)",
        (t1 - t_enrolled).as_secs_f64()
    );
    let st = req(&data, &Request::Status)?;
    for d in st["devices"].as_array().into_iter().flatten() {
        let name = d["name"].as_str().unwrap_or("?");
        let ran = std::fs::read_to_string(log(name))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(",");
        // Commands 1, 3 and 4 append their number to the device's log: each exactly once,
        // in queue order, is the whole claim; check it rather than assume it.
        if ran != "1,3,4" {
            return Err(format!(
                "{name}: the commands' log reads [{ran}], expected [1,3,4]"
            ));
        }
        let results = req(
            &data,
            &Request::QueueShow {
                device: name.to_string(),
            },
        )?;
        let ok = results["commands"]
            .as_array()
            .map_or(0, |c| c.iter().filter(|c| c["state"] == "ok").count());
        if ok != 5 {
            return Err(format!("{name}: {ok} of 5 results are ok"));
        }
        println!(
            "  {name}: 5/5 results ok; side effects ran [{ran}], once each, in order; back from reboot with boot id {}; report: {} / {} / {} packages",
            d["boot_id"].as_str().unwrap_or("-"),
            d["os"].as_str().unwrap_or("-"),
            d["kernel"].as_str().unwrap_or("-"),
            d["packages"]
        );
    }
    let ev = req(
        &data,
        &Request::Events {
            from: 1,
            limit: 10_000,
        },
    )?;
    let count = |k: &str| {
        ev["events"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|e| e["kind"] == k).count())
    };
    println!(
        "  events: {} enrolled, {} sessions, {} commands sent, {} results, {} reboots completed",
        count("enrolled"),
        count("connected"),
        count("commandsent"),
        count("commandresult"),
        count("rebootcompleted")
    );
    drop(agents);
    drop(gw);
    drop(cleanup);
    Ok(())
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
