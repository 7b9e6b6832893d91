//! Lab test of the multicast metrics: a real `fleetcastd` on host 0 (metrics endpoint on its
//! lab address) pushes a file to two agents on hosts 1 and 2, one of which drops 10% of the
//! multicast datagrams it receives (nftables). The endpoint is scraped over HTTP from inside
//! host 1 before and after, and through `fleetcast metrics --json` on the admin socket.
//!
//! Checked: goodput counts the file exactly once, bytes sent cover it, the lossy receiver's
//! NACKs and the repairs they caused are counted, the task shows as finished with two
//! completed receivers, and the command counters stay put (no command was queued).

// The lab harness of the daemon's tests, one file shared by both packages.
#[path = "../../daemon/tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::SocketAddrV4;
use std::time::Duration;

use common::{wait_for, Gateway, Rng};
use fleetcast_lab::{Host, Lab, LabConfig};
use serde_json::Value;

#[test]
fn agent_role() {
    common::agent_role();
}

const WAIT: Duration = Duration::from_secs(60);
const MCAST_PORT: u16 = 7301;
const METRICS_PORT: u16 = 9477;

/// `GET /metrics` from inside `from`; the body.
fn scrape(from: Host<'_>, to: SocketAddrV4) -> String {
    let mut s = from
        .tcp_connect(to, Duration::from_secs(5))
        .expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("response head");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    body.to_string()
}

fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

#[test]
fn multicast_counters_move_with_a_lossy_push() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let gw_ip = lab.host(0).addr();
    let metrics = SocketAddrV4::new(gw_ip, METRICS_PORT);
    let gw = Gateway::start(
        lab.host(0),
        dir,
        &[
            "--mcast-addr",
            &gw_ip.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ],
    );
    let (_specs, agents) = gw.enrol_agents(&lab, dir, 2);
    lab.host(1)
        .loss_in(&[MCAST_PORT], 10.0)
        .expect("nft loss rule");

    let before = scrape(lab.host(1), metrics);
    assert_eq!(sample(&before, "fleetcast_sessions_connected"), 2);
    assert_eq!(sample(&before, "fleetcast_mcast_enabled"), 1);
    assert_eq!(sample(&before, "fleetcast_mcast_goodput_bytes_total"), 0);
    assert_eq!(sample(&before, "fleetcast_mcast_nacks_total"), 0);

    // A 2..4 MiB file (seeded), pushed and followed by the CLI as an operator would.
    let mut rng = Rng::from_env(0x5eed_0010);
    let size = rng.range(2 << 20, 4 << 20) as usize;
    let mut data = vec![0u8; size];
    rng.fill(&mut data);
    let src = dir.join("image.bin");
    std::fs::write(&src, &data).expect("write source");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .arg("--data-dir")
        .arg(&gw.data)
        .args(["push", &src.display().to_string(), "--group", "fleet"])
        .output()
        .expect("run fleetcast push");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "push: {}\n{stdout}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        gw.diag()
    );
    assert!(
        stdout.contains("2 of 2 receivers have a verified copy"),
        "{stdout}"
    );

    // The sender ends after its linger; the counters are complete either way.
    let after = wait_for(
        "the task to show as finished",
        WAIT,
        || {
            let m = scrape(lab.host(1), metrics);
            (sample(&m, "fleetcast_tasks{state=\"finished\"}") == 1).then_some(m)
        },
        || gw.diag(),
    );
    assert_eq!(sample(&after, "fleetcast_tasks{state=\"active\"}"), 0);
    assert_eq!(
        sample(&after, "fleetcast_task_receivers{state=\"completed\"}"),
        2
    );
    assert_eq!(
        sample(&after, "fleetcast_mcast_goodput_bytes_total"),
        size as u64,
        "{after}"
    );
    assert!(sample(&after, "fleetcast_mcast_bytes_sent_total") > size as u64);
    assert!(sample(&after, "fleetcast_mcast_nacks_total") > 0, "{after}");
    let repairs = sample(&after, "fleetcast_mcast_repairs_total{kind=\"multicast\"}")
        + sample(&after, "fleetcast_mcast_repairs_total{kind=\"unicast\"}");
    assert!(repairs > 0, "{after}");
    assert_eq!(sample(&after, "fleetcast_commands_dispatched_total"), 0);

    // The same numbers through the admin socket.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .arg("--data-dir")
        .arg(&gw.data)
        .args(["--json", "metrics"])
        .output()
        .expect("run fleetcast metrics");
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("metrics --json");
    assert_eq!(
        v["data"]["samples"]["fleetcast_mcast_goodput_bytes_total"],
        size as u64
    );
    drop(agents);
}
