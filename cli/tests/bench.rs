//! `fleetcast bench` end to end, at toy size: it builds its lab, measures the raw ceiling and
//! two pushes, and writes the report (the figures themselves are not checked: performance
//! is measured by running the command, see docs/performance.md).

use serde_json::Value;

#[test]
fn bench_writes_a_report_with_a_row_per_measurement() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_dir = tmp.path().join("report");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(["--json", "bench", "--receivers", "1,2", "--loss", "0,3"])
        .args(["--mtu", "1500", "--mib", "2", "--timeout", "120", "--out"])
        .arg(&out_dir)
        .output()
        .expect("run fleetcast bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let rows = v["data"]["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4, "{v:#}");
    for r in rows {
        assert!(r["ceiling_mbps"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["goodput_mbps"].as_f64().unwrap() > 0.0, "{r}");
        // Every file byte left the sender at least once.
        assert!(
            r["datagram_bytes_per_file_byte"].as_f64().unwrap() >= 1.0,
            "{r}"
        );
        assert!(
            r["sender_bytes_per_file_byte"].as_f64().unwrap() >= 1.0,
            "{r}"
        );
    }
    for f in [
        "report.md",
        "report.json",
        "goodput-vs-loss.svg",
        "completion-vs-receivers.svg",
        "overhead-vs-receivers.svg",
    ] {
        let text = std::fs::read_to_string(out_dir.join(f)).expect(f);
        assert!(!text.is_empty(), "{f}");
    }
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert_eq!(md.matches("\n| 1500 |").count(), 4, "{md}");

    // The same report, drawn again from its JSON without measuring.
    let again = tmp.path().join("again");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(["bench", "--from-json"])
        .arg(out_dir.join("report.json"))
        .arg("--out")
        .arg(&again)
        .output()
        .expect("run fleetcast bench --from-json");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same rows (the JSON keeps fewer digits: compare what identifies each row).
    let lead = |md: &str| -> Vec<String> {
        md.lines()
            .filter(|l| l.starts_with("| 1500 |"))
            .map(|l| l.split('|').take(4).collect::<Vec<_>>().join("|"))
            .collect()
    };
    let redrawn = std::fs::read_to_string(again.join("report.md")).unwrap();
    assert_eq!(lead(&redrawn), lead(&md), "{redrawn}");
    assert!(again.join("overhead-vs-receivers.svg").exists());
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(["bench", "--from-json", "/nonexistent/report.json"])
        .output()
        .expect("run fleetcast bench");
    assert_eq!(bad.status.code(), Some(2));
}

/// `--peers udpcast,uftp` at toy size: every peer row completes and every copy verifies, in
/// each cell, beside fleetcast's row; the report shows them side by side and draws again
/// from its JSON. Needs the Debian packages `udpcast` and `uftp` (`.ci/run` installs them).
#[test]
fn bench_runs_each_peer_beside_fleetcast_and_verifies_its_copies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_dir = tmp.path().join("report");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(["--json", "bench", "--receivers", "2", "--loss", "0,3"])
        .args(["--mtu", "1500", "--mib", "1", "--timeout", "60"])
        .args(["--peers", "udpcast,uftp", "--out"])
        .arg(&out_dir)
        .output()
        .expect("run fleetcast bench --peers");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        v["data"]["rows"].as_array().expect("rows").len(),
        2,
        "{v:#}"
    );
    let peers = v["data"]["peer_rows"].as_array().expect("peer_rows");
    assert_eq!(peers.len(), 4, "{v:#}");
    for (r, (tool, loss)) in peers.iter().zip([
        ("udpcast", 0.0),
        ("uftp", 0.0),
        ("udpcast", 3.0),
        ("uftp", 3.0),
    ]) {
        assert_eq!(r["tool"], tool, "{r}");
        assert_eq!(r["loss_percent"].as_f64(), Some(loss), "{r}");
        assert_eq!(r["verified"], true, "{r}\n{stderr}");
        assert!(r.get("failed").is_none(), "{r}");
        assert!(r["goodput_mbps"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["ceiling_mbps"].as_f64().unwrap() > 0.0, "{r}");
        // Every file byte left the sender's interface at least once.
        assert!(
            r["sender_bytes_per_file_byte"].as_f64().unwrap() >= 1.0,
            "{r}"
        );
        // Both tools' receivers answer: joins, acknowledgements.
        assert!(
            r["feedback_bytes_per_file_byte"].as_f64().unwrap() > 0.0,
            "{r}"
        );
    }
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    for tool in ["fleetcast", "udpcast", "uftp"] {
        let lines = md
            .lines()
            .filter(|l| l.starts_with(&format!("| {tool} | 1500 | 2 |")))
            .collect::<Vec<_>>();
        assert_eq!(lines.len(), 2, "{tool}: {md}");
        assert!(lines.iter().all(|l| l.ends_with("| verified |")), "{md}");
    }
    let wire = std::fs::read_to_string(out_dir.join("wire-vs-receivers.svg")).unwrap();
    assert!(wire.contains("udpcast, 3% loss, MTU 1500"), "{wire}");
    assert!(wire.contains("uftp, 0% loss, MTU 1500"), "{wire}");

    // Drawn again from its JSON, the side-by-side table is the same.
    let again = tmp.path().join("again");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(["--json", "bench", "--from-json"])
        .arg(out_dir.join("report.json"))
        .arg("--out")
        .arg(&again)
        .output()
        .expect("run fleetcast bench --from-json");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["data"]["peer_rows"], 4, "{v:#}");
    let side = |md: &str| -> Vec<String> {
        md.lines()
            .filter(|l| l.starts_with("| udpcast |") || l.starts_with("| uftp |"))
            .map(|l| l.split('|').take(6).collect::<Vec<_>>().join("|"))
            .collect()
    };
    let redrawn = std::fs::read_to_string(again.join("report.md")).unwrap();
    assert_eq!(side(&redrawn), side(&md), "{redrawn}");
}

#[test]
fn an_unknown_peer_is_refused_naming_the_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(["bench", "--peers", "udpcast,mrsync"])
        .output()
        .expect("run fleetcast bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("fleetcast bench: --peers udpcast,mrsync: `mrsync` is not a peer"),
        "{stderr}"
    );
}

#[test]
fn values_that_cannot_be_measured_are_refused_naming_their_flag() {
    for (args, want) in [
        (
            &["--receivers", "0"][..],
            "--receivers 0: a push needs at least one receiver",
        ),
        (
            &["--receivers", "1,x"][..],
            "--receivers 1,x: `x` is not a number",
        ),
        (&["--loss", "100"][..], "--loss 100: loss is a percentage"),
        (&["--mtu", "20"][..], "--mtu 20: the lab's MTU must be"),
        (&["--mib", "0"][..], "--mib 0"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
            .arg("bench")
            .args(args)
            .output()
            .expect("run fleetcast bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("fleetcast bench: {want}")),
            "{args:?}: want {want:?} in {stderr:?}"
        );
    }
}
