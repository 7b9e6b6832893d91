//! Lab test of forged and replayed NACKs during a push: a real `fleetcastd` on host 0 pushes a
//! file to two lossy agents (hosts 1 and 2, so they NACK) while an attacker on host 3, who
//! sees every NACK the gateway's link carries, turns them against a victim (host 4, which
//! runs nothing):
//!
//! - every NACK of `n1` is replayed at once, several times, from the victim's address (a
//!   spoofed source): before NACKs were per-device and fresh, each replay made the victim
//!   the destination of `n1`'s unicast repairs;
//! - every NACK of `n2` is re-sent naming `n1` instead (its tag is `n2`'s, the best a group
//!   member can do for another device's NACK), from the victim's address and the attacker's.
//!
//! Checked: the gateway sent the victim no repair at all, only probes (address checks, each
//! smaller than the NACK that caused it, at most ten a second), counted by an nftables rule on
//! the gateway's output; the attack really ran (NACKs of both devices were captured and
//! re-sent); and both copies still complete, verified, byte-identical to the source.
//!
//! `a_long_poll_device_proves_its_address_and_is_repaired`: the other side of the same rule.
//! A device on the long-poll rung has a control session from the gateway's own relay
//! (127.0.0.1), so its NACKs never come from its session's address; it gets a probe, echoes
//! it, and its unicast repairs reach it (counted on the gateway's output) until it verifies.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use common::{now, status_of, wait_for, Gateway, Rng};
use fleetcast_daemon::admin::Request;
use fleetcast_lab::{tool_path, Host, Lab, LabConfig};
use fleetcast_wire::{Message, TAG_LEN};

#[test]
fn agent_role() {
    common::agent_role();
}

const WAIT: Duration = Duration::from_secs(60);
/// The gateway's default distribution port (source of blocks, destination of NACKs).
const PORT: u16 = 7301;
const BLOCK: u32 = 1400;
/// Replays of each captured NACK of `n1`.
const REPLAYS: usize = 4;
/// Upper bound on the attacker's captured packets.
const MAX_PACKETS: usize = 200_000;
/// Datagrams to the victim above this IP length are repairs (a probe is 64 bytes).
const BIG: u32 = 100;

/// Counts what the gateway host sends `to` from the distribution port: all of it, and the
/// datagrams too large to be probes.
fn count_to_victim(gw: Host<'_>, to: Ipv4Addr) {
    gw.nft(&format!(
        "table inet lab_victim {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    \
         ip daddr {to} udp sport {PORT} counter\n    \
         ip daddr {to} udp sport {PORT} ip length > {BIG} counter\n  }}\n}}\n"
    ))
    .expect("nft counters on the gateway host");
}

/// `(packets, bytes)` of the two counters of [`count_to_victim`]: all, big.
fn victim_counters(gw: Host<'_>) -> [(u64, u64); 2] {
    let nft = tool_path("nft", "nftables").expect("nft");
    let out = gw
        .command(nft)
        .args(["list", "table", "inet", "lab_victim"])
        .output()
        .expect("nft list");
    let text = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "packets")?;
            Some((w.get(i + 1)?.parse().ok()?, w.get(i + 3)?.parse().ok()?))
        })
        .collect();
    assert_eq!(counts.len(), 2, "two counters in\n{text}");
    [counts[0], counts[1]]
}

/// `nack` (a captured NACK datagram) naming `device` instead, keeping its tag.
fn renamed(nack: &[u8], device: u64) -> Option<Vec<u8>> {
    let (Message::Nack(mut n), frame) = Message::parse_datagram(nack).ok()? else {
        return None;
    };
    let tag = *frame.tag?;
    n.device_id = device;
    let msg = Message::Nack(n);
    let mut buf = vec![0u8; msg.buffer_len().ok()? + TAG_LEN];
    let len = msg.emit_authenticated(&mut buf, |_, _| tag).ok()?;
    buf.truncate(len);
    Some(buf)
}

fn device_of(nack: &[u8]) -> Option<u64> {
    match Message::parse_datagram(nack).ok()?.0 {
        Message::Nack(n) => Some(n.device_id),
        _ => None,
    }
}

#[test]
fn replayed_and_forged_nacks_send_the_victim_no_repairs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(5)).expect("lab (see docs/lab.md)");
    let (gw_host, attacker, victim) = (lab.host(0), lab.host(3), lab.host(4));
    let gw_addr = gw_host.addr();
    let gw = Gateway::start(gw_host, dir, &["--mcast-addr", &gw_addr.to_string()]);
    let names = ["n1", "n2"];
    let (specs, agents) = gw.enrol_agents(&lab, dir, names.len());
    let ids: Vec<u64> = names
        .iter()
        .map(|n| gw.wait_online(n, WAIT, || gw.diag()))
        .collect();
    // Both receivers lose 5% of what the group port brings: they NACK all along.
    for i in 1..=2 {
        lab.host(i).loss_in(&[PORT], 5.0).expect("loss");
    }
    count_to_victim(gw_host, victim.addr());
    let mut capture = gw_host.capture().expect("capture on the gateway's host");
    let spoofed = attacker
        .spoofing_udp_socket(SocketAddrV4::new(victim.addr(), 4444))
        .expect("spoofing socket");
    let own = attacker.udp_socket(0).expect("attacker socket");

    let mut rng = Rng::from_env(0x5eed_0015);
    let size = 8 << 20;
    let mut data = vec![0u8; size];
    rng.fill(&mut data);
    let src = dir.join("image.bin");
    std::fs::write(&src, &data).expect("write source");
    let task = gw.admin(&Request::Push {
        path: src.display().to_string(),
        group: "fleet".into(),
        block_size: BLOCK,
        rate_mbps: 20,
        trigger: Default::default(),
        then: vec![],
        delivery: Default::default(),
        follow: Default::default(),
        image: None,
    })["task"]
        .as_u64()
        .expect("task id");
    let done = || {
        let rows = gw.task_rows(task);
        names.iter().all(|n| status_of(&rows, n) == "completed")
    };

    let to_gw = SocketAddrV4::new(gw_addr, PORT);
    let (mut replayed, mut forged, mut seen) = (0usize, 0usize, 0usize);
    let started = now();
    let mut checked = now();
    while seen < MAX_PACKETS && started.elapsed() < WAIT {
        if checked.elapsed() > Duration::from_millis(200) {
            checked = now();
            if done() {
                break;
            }
        }
        let Some(p) = capture
            .next_udp(Duration::from_millis(20))
            .expect("capture")
        else {
            continue;
        };
        seen += 1;
        // NACKs on their way to the gateway (not our own re-sends).
        if p.dst != to_gw || *p.src.ip() == victim.addr() || *p.src.ip() == attacker.addr() {
            continue;
        }
        match device_of(&p.payload) {
            Some(d) if d == ids[0] => {
                for _ in 0..REPLAYS {
                    spoofed.send_to(&p.payload, to_gw).expect("replay");
                }
                replayed += 1;
            }
            Some(d) if d == ids[1] => {
                let Some(f) = renamed(&p.payload, ids[0]) else {
                    continue;
                };
                spoofed.send_to(&f, to_gw).expect("forged, spoofed");
                own.send_to(&f, to_gw).expect("forged");
                forged += 1;
            }
            _ => {}
        }
    }
    eprintln!("attacker: {seen} packets seen, {replayed} NACKs of n1 replayed ×{REPLAYS}, {forged} of n2 renamed");
    wait_for(
        "both copies to be verified under attack",
        WAIT,
        || done().then_some(()),
        || gw.task_report(&specs, task),
    );
    assert!(
        replayed > 0 && forged > 0,
        "the attack did not run: {replayed} replays, {forged} forgeries\n{}",
        gw.task_report(&specs, task)
    );
    let [(all_p, all_b), (big_p, big_b)] = victim_counters(gw_host);
    eprintln!("gateway → victim: {all_p} datagrams, {all_b} bytes; {big_p} ({big_b} bytes) larger than a probe");
    assert_eq!(
        (big_p, big_b),
        (0, 0),
        "the gateway sent the victim repairs ({all_p} datagrams, {all_b} bytes in all)"
    );
    // Probes only: at most one per device per 100 ms while the attack ran.
    let secs = started.elapsed().as_secs() + 1;
    assert!(all_p <= 10 * secs, "{all_p} probes in {secs} s");
    for s in &specs {
        let got = std::fs::read(s.state.join("downloads").join("image.bin")).expect("copy");
        assert!(
            got == data,
            "{}: the copy differs from the source",
            s.log.display()
        );
    }
    drop(agents);
}

#[test]
fn a_long_poll_device_proves_its_address_and_is_repaired() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let gw_host = lab.host(0);
    let gw_addr = gw_host.addr();
    let gw = Gateway::start(gw_host, dir, &["--mcast-addr", &gw_addr.to_string()]);
    let mut specs = Vec::new();
    let mut agents = Vec::new();
    for (i, rungs) in [(1, None), (2, Some("longpoll"))] {
        let name = format!("n{i}");
        let d = gw.admin(&Request::DeviceAdd {
            name: name.clone(),
            groups: vec!["fleet".into()],
        });
        let token = d["token"].as_str().expect("token").to_string();
        let mut spec = common::AgentSpec::new(&gw, dir, &name, Some(token));
        if let Some(r) = rungs {
            // Long-poll to the main port (it tells plain HTTP from TLS).
            let port = common::PORT.to_string();
            spec.extra
                .extend(["--proxy", "none", "--rungs", r, "--alt-port", &port].map(String::from));
        }
        agents.push(spec.spawn(lab.host(i)));
        gw.wait_online(&name, WAIT, || spec.output());
        specs.push(spec);
    }
    // The gateway sees the device online as soon as its `Hello` is in; the agent writes its
    // "connected via" line a moment later, so wait for it rather than read the log once.
    wait_for(
        "the long-poll agent to log its rung",
        WAIT,
        || {
            common::read_log(&specs[1].log)
                .contains("connected via rung longpoll")
                .then_some(())
        },
        || common::read_log(&specs[1].log),
    );
    // Only the long-poll device loses blocks, so every repair it needs is unicast to it.
    lab.host(2).loss_in(&[PORT], 5.0).expect("loss");
    count_to_victim(gw_host, lab.host(2).addr());
    let mut rng = Rng::from_env(0x5eed_0016);
    let mut data = vec![0u8; 4 << 20];
    rng.fill(&mut data);
    let src = dir.join("image.bin");
    std::fs::write(&src, &data).expect("write source");
    let task = gw.admin(&Request::Push {
        path: src.display().to_string(),
        group: "fleet".into(),
        block_size: BLOCK,
        rate_mbps: 20,
        trigger: Default::default(),
        then: vec![],
        delivery: Default::default(),
        follow: Default::default(),
        image: None,
    })["task"]
        .as_u64()
        .expect("task id");
    wait_for(
        "both copies to be verified",
        WAIT,
        || {
            let rows = gw.task_rows(task);
            ["n1", "n2"]
                .iter()
                .all(|n| status_of(&rows, n) == "completed")
                .then_some(())
        },
        || gw.task_report(&specs, task),
    );
    let [(all_p, all_b), (big_p, big_b)] = victim_counters(gw_host);
    eprintln!("gateway → long-poll device: {all_p} datagrams ({all_b} bytes), {big_p} repairs ({big_b} bytes)");
    assert!(
        all_p > big_p,
        "no probe reached the long-poll device\n{}",
        gw.task_report(&specs, task)
    );
    assert!(big_p > 0, "no unicast repair reached the long-poll device");
    let got = std::fs::read(specs[1].state.join("downloads").join("image.bin")).expect("copy");
    assert!(
        got == data,
        "the long-poll device's copy differs from the source"
    );
    drop(agents);
}
