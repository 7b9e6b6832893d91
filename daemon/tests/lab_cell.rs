//! A cell in the lab: one PostgreSQL, three gateways on hosts 0..3 sharing it (and one CA),
//! real agents on the next hosts, and a swarm of 1,000 simulated agents (the load
//! generator's, `fleetcast_agent::swarm`: real TLS and the real session core, executing
//! nothing) on the last host, every agent listing all three gateways. While commands flow
//! (one more per device every two seconds, queued through a random gateway, every fifth of
//! the real agents' with a reboot), a random gateway is killed with SIGKILL every 20 s and
//! started again 5 s later.
//!
//! Halfway through, the database itself is stopped for 5 s (longer than a lease) and started
//! again: every gateway stops acknowledging, its lease lapses, and it joins the cell again once
//! the database is back; the agents' held results go to whichever gateway they reach.
//!
//! Checked: every command ran exactly once and in order on every device (the real devices'
//! own logs; each simulated agent counts the commands it ran and any dispatch of a seq it had
//! already run), every result is stored `ok`, and every device whose gateway was killed came
//! back on a live gateway. Reported (not asserted: a figure, not a rule): the re-home time,
//! from the kill to the device's next session, p50 and p99 over every kill and device.
//!
//! `FLEETCAST_CELL_SECS` sets how long commands flow (default 120 s; the proof of
//! `docs/performance.md` runs it longer), `FLEETCAST_CELL_SWARM` how many simulated agents
//! (default 1,000).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cell::{diag, drain_and_check, enrol_devices, start_gateways, supervise, wall_ms};
use common::{read_log, sh, wait_for, Rng};
use fleetcast_agent::swarm::{self, Clock, Swarm, SwarmConfig};
use fleetcast_daemon::admin::{OnFailureSpec, Request};
use fleetcast_lab::{Host, Lab, LabChild, LabConfig, Postgres};
use fleetcast_wire::Step;
use serde_json::{json, Value};

#[test]
fn agent_role() {
    common::agent_role();
}

/// The swarm role's arguments, a JSON object (see [`swarm_role`]).
const SWARM_ENV: &str = "FLEETCAST_SWARM_ARGS";

/// When [`common::ROLE_ENV`] is `swarm`, this test binary is the swarm: the devices of the
/// `devices` file (a JSON list of `[name, token]`), enrolled and kept connected to the
/// `gateways` list; every half second it writes what each agent did to the `status` file,
/// and it exits once the `stop` file exists. Otherwise it returns at once.
#[test]
fn swarm_role() {
    if std::env::var(common::ROLE_ENV).as_deref() != Ok("swarm") {
        return;
    }
    let args: Value = serde_json::from_str(&std::env::var(SWARM_ENV).expect("swarm arguments"))
        .expect("swarm arguments are JSON");
    let path = |k: &str| PathBuf::from(args[k].as_str().expect("a path argument"));
    swarm::raise_nofile().expect("raise RLIMIT_NOFILE");
    let ca = fleetcast_agent::tls::load_cert_pem(&path("ca")).expect("the CA");
    let devices: Vec<(String, String)> =
        serde_json::from_str(&std::fs::read_to_string(path("devices")).expect("devices file"))
            .expect("devices file is JSON");
    let clock = Clock::new();
    let cfg = SwarmConfig {
        gateways: args["gateways"].as_str().expect("gateways").into(),
        spread_sources: false,
        server_name: None,
        // Enrolment eight at a time: the swarm has one address, and a gateway allows a source
        // only a few enrolments in flight (its limit on failed enrolments). Once enrolled,
        // no limit: as real devices on their own machines, all at once.
        max_connecting: 8,
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(10),
        seed: 19,
    };
    let n = devices.len() as u64;
    let mut s = Swarm::new(cfg, clock, ca, devices).expect("swarm");
    s.connect_all();
    let mut enrolling = true;
    let (status, stop) = (path("status"), path("stop"));
    loop {
        s.run_until(clock.now() + Duration::from_millis(500), |_| false);
        if enrolling && s.stats.enrolled >= n {
            s.set_max_connecting(0);
            enrolling = false;
        }
        let agents: Vec<Value> = s
            .agents
            .iter()
            .map(|a| json!([a.name, a.executed, a.repeats, a.sessions]))
            .collect();
        let doc = json!({
            "established": s.stats.established,
            "enrolled": s.stats.enrolled,
            "redirects": s.stats.redirects,
            "agents": agents,
        });
        let tmp = status.with_extension("tmp");
        std::fs::write(&tmp, doc.to_string()).expect("write swarm status");
        std::fs::rename(&tmp, &status).expect("write swarm status");
        if stop.exists() {
            std::process::exit(0);
        }
    }
}

/// The swarm process of the test, and its files.
struct SimSwarm<'lab> {
    child: std::cell::RefCell<LabChild<'lab>>,
    status: PathBuf,
    stop: PathBuf,
    log: PathBuf,
    /// Commands queued to every simulated device.
    queued: u64,
}

impl<'lab> SimSwarm<'lab> {
    /// Starts the swarm (this test binary in the swarm role) on `host`.
    fn start(
        host: Host<'lab>,
        dir: &Path,
        ca: &Path,
        gateways: &str,
        devices: &[(String, String)],
    ) -> Self {
        let file = dir.join("swarm-devices.json");
        std::fs::write(&file, serde_json::to_string(devices).expect("json")).expect("devices");
        let (status, stop, log) = (
            dir.join("swarm-status.json"),
            dir.join("swarm-stop"),
            dir.join("swarm.log"),
        );
        let args = json!({
            "gateways": gateways,
            "ca": ca,
            "devices": file,
            "status": status,
            "stop": stop,
        });
        let out = std::fs::File::create(&log).expect("swarm log");
        let err = out.try_clone().expect("swarm log");
        let child = host
            .spawn(std::env::current_exe().expect("current exe"), |c| {
                c.args(["--exact", "swarm_role", "--nocapture", "--test-threads=1"])
                    .env(common::ROLE_ENV, "swarm")
                    .env(SWARM_ENV, args.to_string())
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err);
            })
            .expect("spawn the swarm");
        SimSwarm {
            child: child.into(),
            status,
            stop,
            log,
            queued: 0,
        }
    }

    /// The swarm's last status (`Null` before the first).
    fn status(&self) -> Value {
        if let Some(st) = self.child.borrow_mut().try_wait().expect("wait swarm") {
            panic!(
                "the swarm exited with {st}
{}",
                read_log(&self.log)
            );
        }
        std::fs::read_to_string(&self.status)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    }

    /// Each agent's `[name, executed, repeats, sessions]`.
    fn agents(&self) -> Vec<(String, u64, u64)> {
        self.status()["agents"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        let n = |i: usize| r[i].as_u64().unwrap_or(0);
                        (r[0].as_str().unwrap_or("").to_string(), n(1), n(2))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

const GATEWAYS: usize = 3;
const DEVICES: usize = 8;
const LEASE_MS: u64 = 3000;
const KILL_EVERY: Duration = Duration::from_secs(20);
const DOWN_FOR: Duration = Duration::from_secs(5);
const WAVE_EVERY: Duration = Duration::from_secs(2);
/// The group of the simulated devices.
const SWARM_GROUP: &str = "swarm";

#[test]
fn a_cell_of_three_gateways_loses_and_repeats_nothing_while_gateways_are_killed() {
    let secs: u64 = std::env::var("FLEETCAST_CELL_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let sims: usize = std::env::var("FLEETCAST_CELL_SWARM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut pg = Postgres::start().expect("PostgreSQL (Debian package postgresql)");
    pg.create_database("cell").expect("createdb");
    let url = pg.url("cell");
    let lab = Lab::new(LabConfig::hosts(GATEWAYS + DEVICES + 1)).expect("lab (see docs/lab.md)");
    let mut rng = Rng::from_env(19);

    // Three gateways, the first one's CA shared with the others.
    let mut gws = start_gateways(&lab, dir, GATEWAYS, &url, LEASE_MS);

    // Devices enrolled through gw-0 (a token is the cell's, in the database), each agent
    // listing the three gateways.
    let mut devices = enrol_devices(&lab, dir, &gws, 0, DEVICES, GATEWAYS);
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

    // The swarm: enrolled through gw-0 into its group, then spread over the cell.
    let tokens: Vec<(String, String)> = (0..sims)
        .map(|i| {
            let name = format!("s{i}");
            let d = gws[0].admin(&Request::DeviceAdd {
                name: name.clone(),
                groups: vec![SWARM_GROUP.into()],
            });
            (name, d["token"].as_str().expect("token").to_string())
        })
        .collect();
    let mut swarm = SimSwarm::start(
        lab.host(GATEWAYS + DEVICES),
        dir,
        &gws[0].ca(),
        &gws.iter()
            .map(|g| g.addr.to_string())
            .collect::<Vec<_>>()
            .join(","),
        &tokens,
    );
    wait_for(
        &format!("{sims} simulated agents to be enrolled and connected"),
        Duration::from_secs(180),
        || {
            let st = swarm.status();
            (st["enrolled"].as_u64() == Some(sims as u64)
                && st["established"].as_u64() == Some(sims as u64))
            .then_some(())
        },
        || {
            format!(
                "{}
{}",
                swarm.status(),
                diag(&gws)
            )
        },
    );

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
            if sims > 0 {
                let via = live[rng.range(0, live.len() as u64) as usize];
                gws[via]
                    .try_admin(&Request::QueueAdd {
                        attached: None,
                        target: SWARM_GROUP.into(),
                        commands: vec![vec![sh(&format!("echo w{wave}"))]],
                        timeout_ms: 60_000,
                        max_attempts: 1,
                        on_failure: OnFailureSpec::Stop,
                    })
                    .unwrap_or_else(|e| panic!("queue add to the swarm via gw-{via}: {e}"));
                swarm.queued += 1;
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
    drain_and_check(&lab, &gws[0], &mut devices, GATEWAYS, || diag(&gws));

    // The swarm's queues drain too: each simulated agent ran each command once, in order
    // (no dispatch of a seq it had run), and the store holds every result, `ok`.
    let want = swarm.queued;
    wait_for(
        &format!("{sims} simulated agents to run {want} commands each"),
        Duration::from_secs(180),
        || {
            let agents = swarm.agents();
            (agents.len() == sims && agents.iter().all(|(_, ran, _)| *ran >= want)).then_some(())
        },
        || {
            let late: Vec<String> = swarm
                .agents()
                .iter()
                .filter(|(_, ran, _)| *ran < want)
                .take(10)
                .map(|(n, ran, _)| format!("{n} ran {ran}"))
                .collect();
            format!("behind: {}\n{}", late.join(", "), diag(&gws))
        },
    );
    for (name, ran, repeats) in swarm.agents() {
        assert_eq!(
            (ran, repeats),
            (want, 0),
            "{name} ran (commands, repeats) other than ({want}, 0)\n{}",
            diag(&gws)
        );
    }
    // A result is run before it is stored: each queue is read until it is done.
    for (name, _) in &tokens {
        wait_for(
            &format!("{name}'s {want} results to be stored"),
            Duration::from_secs(60),
            || (gws[0].queue(name)["queue"]["status"] == "done").then_some(()),
            || format!("{:#}\n{}", gws[0].queue(name), diag(&gws)),
        );
        let q = gws[0].queue(name);
        let commands = q["commands"].as_array().expect("commands");
        assert!(
            commands.len() == want as usize && commands.iter().all(|c| c["state"] == "ok"),
            "{name}'s queue is not {want} commands all ok: {q:#}"
        );
    }
    let redirects = swarm.status()["redirects"].as_u64().unwrap_or(0);
    std::fs::write(&swarm.stop, "").expect("stop the swarm");

    // Re-homing: for each kill, the devices whose last session was on the killed gateway,
    // and how long until each had its next session.
    let events = gws[0].all_events();
    // Each device's sessions, in time order: (time, "… on gateway gw-N").
    let mut sessions: HashMap<u64, Vec<(u64, String)>> = HashMap::new();
    for e in events.iter().filter(|e| e["kind"] == "connected") {
        if let (Some(d), Some(t), Some(m)) = (
            e["device"].as_u64(),
            e["time_ms"].as_u64(),
            e["message"].as_str(),
        ) {
            sessions.entry(d).or_default().push((t, m.to_string()));
        }
    }
    let listed = gws[0].admin(&Request::DeviceList);
    let id_of: HashMap<&str, u64> = listed["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| Some((d["name"].as_str()?, d["id"].as_u64()?)))
        .collect();
    let real: Vec<u64> = devices.iter().map(|d| id_of[d.name.as_str()]).collect();
    let simulated: Vec<u64> = tokens.iter().map(|(n, _)| id_of[n.as_str()]).collect();
    // The re-home times of `ids`, sorted.
    let rehomes = |ids: &[u64]| -> Vec<u64> {
        let mut ms = Vec::new();
        for &(at, g) in &kills {
            let on = format!("on gateway gw-{g}");
            for id in ids {
                let list = sessions.get(id).map_or(&[][..], Vec::as_slice);
                let after = list.partition_point(|(t, _)| *t <= at);
                if !after
                    .checked_sub(1)
                    .is_some_and(|last| list[last].1.ends_with(&on))
                {
                    continue;
                }
                let back = list.get(after).map(|(t, _)| t - at).unwrap_or_else(|| {
                    panic!(
                        "device {id} never came back after gw-{g} was killed\n{}",
                        diag(&gws)
                    )
                });
                ms.push(back);
            }
        }
        ms.sort_unstable();
        ms
    };
    let figures = |ms: &[u64]| -> String {
        let pct = |p: f64| -> u64 {
            let i = ((ms.len() as f64 * p).ceil() as usize).saturating_sub(1);
            ms.get(i).copied().unwrap_or(0)
        };
        format!(
            "{} re-homes, p50 {} ms, p99 {} ms, max {} ms",
            ms.len(),
            pct(0.5),
            pct(0.99),
            ms.last().copied().unwrap_or(0)
        )
    };
    let (real_ms, sim_ms) = (rehomes(&real), rehomes(&simulated));
    let per_gateway: Vec<String> = (0..GATEWAYS)
        .map(|g| {
            let on = format!("on gateway gw-{g}");
            let n = sessions
                .values()
                .flatten()
                .filter(|(_, m)| m.ends_with(&on))
                .count();
            format!("gw-{g}: {n}")
        })
        .collect();
    println!(
        "cell: {secs} s, {} kills, a database restart: {db_restarted}; {} real devices × {} commands \
         ({} reboots each): {}; {sims} simulated devices × {want} commands: {}; \
         {redirects} redirects followed; sessions per gateway {}",
        kills.len(),
        DEVICES,
        devices[0].queued.len(),
        devices[0].boots,
        figures(&real_ms),
        figures(&sim_ms),
        per_gateway.join(", ")
    );
    assert!(
        !kills.is_empty(),
        "the run killed no gateway: FLEETCAST_CELL_SECS too short"
    );
    assert!(
        !real_ms.is_empty() && (sims == 0 || !sim_ms.is_empty()),
        "no device was on a killed gateway: nothing was re-homed\n{}",
        diag(&gws)
    );
}

/// The relay role's arguments, a JSON object: `listen` (`IP:PORT`) and `to` (a Unix socket).
const RELAY_ENV: &str = "FLEETCAST_RELAY_ARGS";
/// The database's port on the relay's host.
const DB_PORT: u16 = 5432;

/// When [`common::ROLE_ENV`] is `relay`, this test binary relays every TCP connection on
/// `listen` to the Unix socket `to`: the database reached across the lab's network, where
/// nftables can cut a gateway off from it. Otherwise it returns at once.
#[test]
fn relay_role() {
    use std::io::Write as _;
    if std::env::var(common::ROLE_ENV).as_deref() != Ok("relay") {
        return;
    }
    let args: Value = serde_json::from_str(&std::env::var(RELAY_ENV).expect("relay arguments"))
        .expect("relay arguments are JSON");
    let to = PathBuf::from(args["to"].as_str().expect("to"));
    let listener = std::net::TcpListener::bind(args["listen"].as_str().expect("listen"))
        .expect("relay listen");
    println!("relaying");
    let _ = std::io::stdout().flush();
    for tcp in listener.incoming() {
        let Ok(tcp) = tcp else { continue };
        let Ok(unix) = std::os::unix::net::UnixStream::connect(&to) else {
            continue;
        };
        let (Ok(mut tcp_w), Ok(mut unix_w)) = (tcp.try_clone(), unix.try_clone()) else {
            continue;
        };
        let (mut tcp_r, mut unix_r) = (tcp, unix);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut tcp_r, &mut unix_w);
            let _ = unix_w.shutdown(std::net::Shutdown::Write);
        });
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut unix_r, &mut tcp_w);
            let _ = tcp_w.shutdown(std::net::Shutdown::Both);
        });
    }
}

/// Drops every packet between `host` and `peer` (both ways), silently: a network partition,
/// not a refused connection.
fn cut(host: Host<'_>, peer: std::net::Ipv4Addr) {
    host.nft(&format!(
        "table inet lab_cut {{\n  chain in {{\n    type filter hook input priority 0; policy accept;\n    \
         ip saddr {peer} drop\n  }}\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    \
         ip daddr {peer} drop\n  }}\n}}\n"
    ))
    .expect("nft: cut the gateway off");
}

/// Undoes [`cut`].
fn heal(host: Host<'_>) {
    host.nft("delete table inet lab_cut\n")
        .expect("nft: heal the partition");
}

/// Two gateways reach the database across the lab's network (a relay on its own host). One
/// of them is cut off from it for longer than two leases while commands flow through the
/// other: it stops acknowledging and serving (its sessions closed once its lease is not
/// renewed for a whole lease; an operator request to it fails rather than answering from
/// what it knew), its devices move to the other gateway within the partition, and when the
/// network heals it joins the cell again as a new incarnation. Nothing is lost or repeated:
/// every device ran each of its commands once, in order.
#[test]
fn a_gateway_cut_off_from_the_database_stops_serving_and_its_devices_move() {
    const GWS: usize = 2;
    const N: usize = 6;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let pg = Postgres::start().expect("PostgreSQL (Debian package postgresql)");
    pg.create_database("cell").expect("createdb");
    let lab = Lab::new(LabConfig::hosts(GWS + N + 1)).expect("lab (see docs/lab.md)");

    // The database, relayed from its own lab host.
    let db = lab.host(GWS + N);
    let relay_args = json!({
        "listen": format!("{}:{DB_PORT}", db.addr()),
        "to": pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port())),
    });
    let relay_log = dir.join("relay.log");
    let out = std::fs::File::create(&relay_log).expect("relay log");
    let err = out.try_clone().expect("relay log");
    let _relay = db
        .spawn(std::env::current_exe().expect("current exe"), |c| {
            c.args(["--exact", "relay_role", "--nocapture", "--test-threads=1"])
                .env(common::ROLE_ENV, "relay")
                .env(RELAY_ENV, relay_args.to_string())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
        })
        .expect("spawn the relay");
    wait_for(
        "the database relay to listen",
        Duration::from_secs(30),
        || db.listening_tcp(DB_PORT).ok().filter(|l| *l),
        || read_log(&relay_log),
    );
    let url = format!(
        "host={} port={DB_PORT} user={} dbname=cell",
        db.addr(),
        fleetcast_lab::PG_USER
    );

    let gws = start_gateways(&lab, dir, GWS, &url, LEASE_MS);
    let mut devices = enrol_devices(&lab, dir, &gws, 1, N, GWS);
    let session_on = |gw: usize, id: u64, after: u64| -> bool {
        let on = format!("on gateway gw-{gw}");
        gws[1].all_events().iter().any(|e| {
            e["kind"] == "connected"
                && e["device"] == id
                && e["time_ms"].as_u64().is_some_and(|t| t > after)
                && e["message"].as_str().is_some_and(|m| m.ends_with(&on))
        })
    };
    let mut ids = Vec::new();
    for d in &devices {
        let id = wait_for(
            &format!("{} to be enrolled and connected", d.name),
            Duration::from_secs(60),
            || {
                let id = gws[1].device(&d.name)?["id"].as_u64()?;
                (session_on(0, id, 0) || session_on(1, id, 0)).then_some(id)
            },
            || format!("{}\n{}", d.spec.output(), diag(&gws)),
        );
        ids.push(id);
    }

    // Commands flow through gw-1; gw-0 is cut off from the database from 8 s to 20 s.
    let start = common::now();
    let (cut_at, heal_at, end) = (
        Duration::from_secs(8),
        Duration::from_secs(20),
        Duration::from_secs(36),
    );
    let (mut cut_ms, mut stale_checked, mut healed) = (None, false, false);
    let mut on_gw0: Vec<u64> = Vec::new();
    let mut next_wave = start;
    let mut wave = 0u32;
    while start.elapsed() < end {
        supervise(&lab, &mut devices, GWS);
        let now = common::now();
        if cut_ms.is_none() && start.elapsed() >= cut_at {
            let at = wall_ms();
            // The devices whose session is on gw-0 now: those that must move.
            on_gw0 = ids
                .iter()
                .copied()
                .filter(|&id| {
                    let events = gws[1].all_events();
                    let last = events
                        .iter()
                        .rfind(|e| e["kind"] == "connected" && e["device"] == id)
                        .and_then(|e| e["message"].as_str().map(String::from));
                    last.is_some_and(|m| m.ends_with("on gateway gw-0"))
                })
                .collect();
            cut(lab.host(0), db.addr());
            cut_ms = Some(at);
        }
        if cut_ms.is_some() && !stale_checked && start.elapsed() >= cut_at + Duration::from_secs(6)
        {
            // Cut off for two leases: gw-0 answers an operator from nothing it cached.
            let r = gws[0].try_admin(&Request::QueueShow {
                device: devices[0].name.clone(),
            });
            assert!(
                r.is_err(),
                "gw-0, cut off from the database, answered a queue show: {r:?}"
            );
            stale_checked = true;
        }
        if !healed && start.elapsed() >= heal_at {
            heal(lab.host(0));
            healed = true;
        }
        if now >= next_wave {
            wave += 1;
            for d in devices.iter_mut() {
                let word = format!("w{wave}");
                let log = d.log().display().to_string();
                let mut steps = vec![sh(&format!("echo {word} >> {log}"))];
                if wave % 5 == 0 {
                    steps.push(Step::Reboot);
                }
                gws[1]
                    .try_admin(&Request::QueueAdd {
                        attached: None,
                        target: d.name.clone(),
                        commands: vec![steps],
                        timeout_ms: 60_000,
                        max_attempts: 1,
                        on_failure: OnFailureSpec::Stop,
                    })
                    .unwrap_or_else(|e| panic!("queue add {}: {e}\n{}", d.name, diag(&gws)));
                d.queued.push(word);
            }
            next_wave = now + WAVE_EVERY;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drain_and_check(&lab, &gws[1], &mut devices, GWS, || diag(&gws));

    // The devices of gw-0 moved to gw-1 while it was cut off, and gw-0 came back as a new
    // incarnation once the network healed.
    let cut_ms = cut_ms.expect("the partition happened");
    let heal_ms = cut_ms + (heal_at - cut_at).as_millis() as u64;
    assert!(
        !on_gw0.is_empty(),
        "no device was on gw-0 when it was cut off: nothing to move\n{}",
        diag(&gws)
    );
    let events = gws[1].all_events();
    for id in &on_gw0 {
        let moved = events.iter().any(|e| {
            e["kind"] == "connected"
                && e["device"] == *id
                && e["time_ms"]
                    .as_u64()
                    .is_some_and(|t| t > cut_ms && t < heal_ms)
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.ends_with("on gateway gw-1"))
        });
        assert!(
            moved,
            "device {id} did not move to gw-1 while gw-0 was cut off\n{}",
            diag(&gws)
        );
    }
    let log = gws[0].stderr();
    assert!(
        log.contains("not renewed for a whole lease"),
        "gw-0 did not stop serving when cut off:\n{log}"
    );
    assert!(
        log.contains("joined again"),
        "gw-0 did not join the cell again after the partition:\n{log}"
    );
    println!(
        "partition: {} of {N} devices moved off the cut-off gateway; {wave} waves",
        on_gw0.len()
    );
}
