//! A cell in the lab: one PostgreSQL, three gateways on hosts 0..3 sharing it (and one CA),
//! and real agents on the other hosts, each listing all three gateways. While commands flow
//! (one more per device every two seconds, queued through a random gateway, every fifth with
//! a reboot), a random gateway is killed with SIGKILL every 20 s and started again 5 s later.
//!
//! Halfway through, the database itself is stopped for 5 s (longer than a lease) and started
//! again: every gateway stops acknowledging, its lease lapses, and it joins the cell again once
//! the database is back; the agents' held results go to whichever gateway they reach.
//!
//! Checked: every command ran exactly once and in order on every device (the devices' own
//! logs), every result is stored `ok`, and every device whose gateway was killed came back on
//! a live gateway. Reported (not asserted: a figure, not a rule): the re-home time, from the
//! kill to the device's next session, p50 and p99 over every kill and device.
//!
//! `FLEETCAST_CELL_SECS` sets how long commands flow (default 120 s); the proof of
//! `docs/performance.md` runs it longer.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{read_log, sh, wait_for, AgentSpec, Gateway, Rng, REBOOT_EXIT};
use fleetcast_daemon::admin::{OnFailureSpec, Request};
use fleetcast_lab::{Lab, LabChild, LabConfig, Postgres};
use fleetcast_wire::Step;

#[test]
fn agent_role() {
    common::agent_role();
}

const GATEWAYS: usize = 3;
const DEVICES: usize = 8;
const LEASE_MS: u64 = 3000;
const KILL_EVERY: Duration = Duration::from_secs(20);
const DOWN_FOR: Duration = Duration::from_secs(5);
const WAVE_EVERY: Duration = Duration::from_secs(2);

/// Wall time, to compare with the event log's times (the gateways' wall clocks, on this
/// machine).
#[allow(clippy::disallowed_methods)] // The test's one wall clock read.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes gateway `i`'s configuration: the shared database, its id and address in the cell.
fn gateway_config(dir: &Path, i: usize, url: &str, addr: &str) -> String {
    let p = dir.join(format!("gw{i}.toml"));
    std::fs::write(
        &p,
        format!(
            "[store]\nengine = \"postgres\"\nurl = \"{url}\"\n\n\
             [cell]\ngateway_id = \"gw-{i}\"\nadvertise = \"{addr}\"\nlease_ms = {LEASE_MS}\n"
        ),
    )
    .expect("gateway config");
    p.display().to_string()
}

/// Gives the gateway whose data directory is `data` the cell's CA (what an operator copies
/// before a new gateway's first start: `docs/operator.md`, running a cell).
fn share_ca(from: &Path, data: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = data.join("pki");
    std::fs::create_dir_all(&pki).expect("pki dir");
    for d in [data, pki.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).expect("mode");
    }
    for (f, mode) in [("ca.pem", 0o644), ("ca.key", 0o600)] {
        std::fs::copy(from.join("pki").join(f), pki.join(f)).expect("copy the CA");
        std::fs::set_permissions(pki.join(f), std::fs::Permissions::from_mode(mode)).expect("mode");
    }
}

struct Device<'lab> {
    name: String,
    spec: AgentSpec,
    agent: Option<LabChild<'lab>>,
    boots: u32,
    /// Commands queued for it, in order (the words its log must hold).
    queued: Vec<String>,
}

impl Device<'_> {
    fn log(&self) -> std::path::PathBuf {
        self.spec
            .log
            .parent()
            .expect("agent dir")
            .join("commands.log")
    }
}

/// Restarts every agent that exited for a reboot, with a new boot id (what a reboot looks
/// like from the gateway); any other exit fails the test.
fn supervise<'lab>(lab: &'lab Lab, devices: &mut [Device<'lab>], gateways: usize) {
    for (i, d) in devices.iter_mut().enumerate() {
        let Some(agent) = d.agent.as_mut() else {
            continue;
        };
        let Some(st) = agent.try_wait().expect("wait agent") else {
            continue;
        };
        assert_eq!(
            st.code(),
            Some(REBOOT_EXIT),
            "agent {} exited with {st}\n{}",
            d.name,
            d.spec.output()
        );
        d.boots += 1;
        d.spec
            .set_boot_id(&format!("00000000-0000-4000-8000-{:012x}", d.boots + 1));
        d.agent = Some(d.spec.spawn(lab.host(gateways + i)));
    }
}

#[test]
fn a_cell_of_three_gateways_loses_and_repeats_nothing_while_gateways_are_killed() {
    let secs: u64 = std::env::var("FLEETCAST_CELL_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut pg = Postgres::start().expect("PostgreSQL (Debian package postgresql)");
    pg.create_database("cell").expect("createdb");
    let url = pg.url("cell");
    let lab = Lab::new(LabConfig::hosts(GATEWAYS + DEVICES)).expect("lab (see docs/lab.md)");
    let mut rng = Rng::from_env(19);

    // Three gateways, the first one's CA shared with the others.
    let mut gws: Vec<Gateway<'_>> = Vec::new();
    for i in 0..GATEWAYS {
        let gdir = dir.join(format!("gw{i}"));
        std::fs::create_dir_all(&gdir).expect("gateway dir");
        let addr = format!("{}:{}", lab.host(i).addr(), common::PORT);
        let cfg = gateway_config(dir, i, &url, &addr);
        if let Some(first) = gws.first() {
            share_ca(&first.data, &gdir.join("gateway"));
        }
        gws.push(Gateway::start(lab.host(i), &gdir, &["--config", &cfg]));
    }
    let list: Vec<String> = gws.iter().map(|g| g.addr.to_string()).collect();
    let diag = |gws: &[Gateway<'_>]| -> String {
        gws.iter()
            .enumerate()
            .map(|(i, g)| format!("=== gw-{i} ===\n{}", g.diag()))
            .collect()
    };

    // Devices enrolled through gw-0 (a token is the cell's, in the database), each agent
    // listing the three gateways.
    let mut devices: Vec<Device<'_>> = Vec::new();
    for i in 0..DEVICES {
        let name = format!("n{i}");
        let token = gws[0].device_add(&name);
        let mut spec = AgentSpec::new(&gws[0], dir, &name, Some(token));
        spec.gateway = list.join(",");
        let agent = Some(spec.spawn(lab.host(GATEWAYS + i)));
        devices.push(Device {
            name,
            spec,
            agent,
            boots: 0,
            queued: Vec::new(),
        });
    }
    for d in &devices {
        wait_for(
            &format!("{} to be enrolled and connected", d.name),
            Duration::from_secs(60),
            || {
                let events = gws[0].events();
                let id = gws[0].device(&d.name)?["id"].as_u64()?;
                events
                    .iter()
                    .any(|e| e["device"] == id && e["kind"] == "connected")
                    .then_some(())
            },
            || format!("{}\n{}", d.spec.output(), diag(&gws)),
        );
    }

    // Commands flow; gateways die.
    let start = common::now();
    let mut kills: Vec<(u64, usize)> = Vec::new();
    let mut next_kill = start + KILL_EVERY;
    let mut next_wave = start;
    let mut down: Option<(usize, Instant)> = None;
    let mut db_down: Option<Instant> = None;
    let mut db_restarted = false;
    let mut wave = 0u32;
    while start.elapsed() < Duration::from_secs(secs) {
        supervise(&lab, &mut devices, GATEWAYS);
        let now = common::now();
        if let Some((g, at)) = down {
            if now >= at {
                gws[g].restart();
                down = None;
            }
        }
        if let Some(at) = db_down {
            if now >= at {
                pg.start_server().expect("restart PostgreSQL");
                db_down = None;
                next_kill = now + KILL_EVERY / 2;
            }
        }
        if !db_restarted
            && down.is_none()
            && start.elapsed() >= Duration::from_secs(secs / 2)
            && next_kill > now + DOWN_FOR * 2
        {
            pg.stop().expect("stop PostgreSQL");
            db_down = Some(now + DOWN_FOR);
            db_restarted = true;
        }
        if down.is_none() && db_down.is_none() && now >= next_kill {
            let g = rng.range(0, GATEWAYS as u64) as usize;
            kills.push((wall_ms(), g));
            gws[g].kill();
            down = Some((g, now + DOWN_FOR));
            next_kill = now + KILL_EVERY;
        }
        // No command is queued while the database is down: the request would fail, and its
        // outcome is all the check needs to know.
        if now >= next_wave && db_down.is_none() {
            wave += 1;
            let live: Vec<usize> = (0..GATEWAYS)
                .filter(|g| down.is_none_or(|(d, _)| d != *g))
                .collect();
            for d in devices.iter_mut() {
                let word = format!("w{wave}");
                let log = d.log().display().to_string();
                let mut steps = vec![sh(&format!("echo {word} >> {log}"))];
                if wave % 5 == 0 {
                    steps.push(Step::Reboot);
                }
                let via = live[rng.range(0, live.len() as u64) as usize];
                gws[via]
                    .try_admin(&Request::QueueAdd {
                        attached: None,
                        target: d.name.clone(),
                        commands: vec![steps],
                        timeout_ms: 60_000,
                        max_attempts: 1,
                        on_failure: OnFailureSpec::Stop,
                    })
                    .unwrap_or_else(|e| {
                        panic!("queue add {} via gw-{via}: {e}\n{}", d.name, diag(&gws))
                    });
                d.queued.push(word);
            }
            next_wave = now + WAVE_EVERY;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some((g, _)) = down.take() {
        gws[g].restart();
    }
    if db_down.take().is_some() {
        pg.start_server().expect("restart PostgreSQL");
    }

    // Every queue drains: each device ran each of its commands once, in order.
    for i in 0..DEVICES {
        let name = devices[i].name.clone();
        let want = devices[i].queued.len();
        let agent_log = devices[i].spec.log.clone();
        wait_for(
            &format!("{name}'s {want} commands to be done"),
            Duration::from_secs(120),
            || {
                supervise(&lab, &mut devices, GATEWAYS);
                let q = gws[0].queue(&name);
                (q["queue"]["status"] == "done"
                    && q["commands"].as_array().is_some_and(|c| c.len() == want))
                .then_some(())
            },
            || {
                format!(
                    "{:#}\n--- agent ---\n{}\n{}",
                    gws[0].queue(&name),
                    read_log(&agent_log),
                    diag(&gws)
                )
            },
        );
        let q = gws[0].queue(&name);
        for (n, c) in q["commands"]
            .as_array()
            .expect("commands")
            .iter()
            .enumerate()
        {
            assert_eq!(c["state"], "ok", "{name} command {}: {q:#}", n + 1);
        }
        let d = &devices[i];
        let ran: Vec<String> = read_log(&d.log()).lines().map(String::from).collect();
        assert_eq!(
            ran,
            d.queued,
            "{name} ran its commands other than once each, in order\n{}",
            d.spec.output()
        );
    }

    // Re-homing: for each kill, the devices whose last session was on the killed gateway,
    // and how long until each had its next session.
    let events = gws[0].events();
    let connected: Vec<(u64, u64, String)> = events
        .iter()
        .filter(|e| e["kind"] == "connected")
        .filter_map(|e| {
            Some((
                e["device"].as_u64()?,
                e["time_ms"].as_u64()?,
                e["message"].as_str()?.to_string(),
            ))
        })
        .collect();
    let ids: Vec<u64> = devices
        .iter()
        .map(|d| {
            gws[0]
                .device(&d.name)
                .and_then(|r| r["id"].as_u64())
                .expect("id")
        })
        .collect();
    let mut rehome_ms: Vec<u64> = Vec::new();
    for &(at, g) in &kills {
        let on = format!("on gateway gw-{g}");
        for &id in &ids {
            let last = connected.iter().rfind(|(d, t, _)| *d == id && *t <= at);
            if !last.is_some_and(|(_, _, m)| m.ends_with(&on)) {
                continue;
            }
            let back = connected
                .iter()
                .find(|(d, t, _)| *d == id && *t > at)
                .map(|(_, t, _)| t - at);
            let back = back.unwrap_or_else(|| {
                panic!(
                    "device {id} never came back after gw-{g} was killed\n{}",
                    diag(&gws)
                )
            });
            rehome_ms.push(back);
        }
    }
    rehome_ms.sort_unstable();
    let pct = |p: f64| -> u64 {
        let i = ((rehome_ms.len() as f64 * p).ceil() as usize).saturating_sub(1);
        rehome_ms.get(i).copied().unwrap_or(0)
    };
    let sessions: Vec<String> = (0..GATEWAYS)
        .map(|g| {
            let on = format!("on gateway gw-{g}");
            let n = connected
                .iter()
                .filter(|(_, _, m)| m.ends_with(&on))
                .count();
            format!("gw-{g}: {n}")
        })
        .collect();
    println!(
        "cell: {secs} s, {} kills, a database restart: {db_restarted}, {} devices × {} commands ({} reboots each), re-homes {}: \
         p50 {} ms, p99 {} ms, max {} ms; sessions per gateway {}",
        kills.len(),
        DEVICES,
        devices[0].queued.len(),
        devices[0].boots,
        rehome_ms.len(),
        pct(0.5),
        pct(0.99),
        rehome_ms.last().copied().unwrap_or(0),
        sessions.join(", ")
    );
    assert!(
        !kills.is_empty(),
        "the run killed no gateway: FLEETCAST_CELL_SECS too short"
    );
    assert!(
        !rehome_ms.is_empty(),
        "no device was on a killed gateway: nothing was re-homed\n{}",
        diag(&gws)
    );
}
