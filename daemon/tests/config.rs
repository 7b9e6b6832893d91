//! `fleetcastd`'s configuration from the outside: `--print-config` with defaults, a file,
//! environment overrides and flags; refused keys and values (exit 2, the key named); JSON logs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const GATEWAYD: &str = env!("CARGO_BIN_EXE_fleetcastd");

/// Runs fleetcastd with `args` and `env`, the data directory pinned; (exit code, stdout,
/// stderr).
fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(GATEWAYD);
    c.args(args)
        .env("FLEETCAST_DATA_DIR", dir.join("data"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run fleetcastd");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn value<'a>(toml: &'a str, section: &str, key: &str) -> Option<&'a str> {
    let mut current = "";
    for l in toml.lines() {
        if let Some(s) = l.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = s;
        } else if current == section {
            if let Some(v) = l.strip_prefix(key).and_then(|r| r.strip_prefix(" = ")) {
                return Some(v);
            }
        }
    }
    None
}

#[test]
fn print_config_shows_defaults_file_env_and_flags_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run(dir.path(), &["--print-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(value(&out, "", "listen"), Some("\"0.0.0.0:7300\""));
    assert_eq!(value(&out, "mcast", "port"), Some("7301"));
    assert!(
        out.contains("# addr ="),
        "multicast is off by default:\n{out}"
    );
    let data = dir.path().join("data").display().to_string();
    assert_eq!(
        value(&out, "", "data_dir"),
        Some(format!("\"{data}\"").as_str())
    );
    // The printed configuration is a valid file that gives the same configuration back.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &out).unwrap();
    let (code, again, err) = run(
        dir.path(),
        &["--config", printed.to_str().unwrap(), "--print-config"],
        &[],
    );
    assert_eq!((code, again.as_str()), (0, out.as_str()), "{err}");

    let file = dir.path().join("fleetcastd.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:7400\"\nheartbeat_secs = 20\n\n[mcast]\nport = 7401\nlinger_secs = 5\n\n[log]\nformat = \"json\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let (code, out, err) = run(dir.path(), &["--config", f, "--print-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(value(&out, "", "listen"), Some("\"127.0.0.1:7400\""));
    assert_eq!(value(&out, "mcast", "port"), Some("7401"));
    assert_eq!(value(&out, "log", "format"), Some("\"json\""));
    // Environment over the file.
    let env = [
        ("FLEETCAST_MCAST_PORT", "7501"),
        ("FLEETCAST_HEARTBEAT_SECS", "30"),
        ("FLEETCAST_ADMIN_METRICS_LISTEN", "127.0.0.1:9477"),
        ("FLEETCAST_LOG_LEVEL", "debug"),
    ];
    let (code, out, err) = run(dir.path(), &["--config", f, "--print-config"], &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(value(&out, "mcast", "port"), Some("7501"));
    assert_eq!(value(&out, "", "heartbeat_secs"), Some("30"));
    assert_eq!(value(&out, "mcast", "linger_secs"), Some("5"), "file kept");
    assert_eq!(
        value(&out, "admin", "metrics_listen"),
        Some("\"127.0.0.1:9477\"")
    );
    assert_eq!(value(&out, "log", "level"), Some("\"debug\""));
    // Flags over the environment.
    let (code, out, err) = run(
        dir.path(),
        &[
            "--config",
            f,
            "--mcast-port",
            "7601",
            "--log-level",
            "warn",
            "--print-config",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(value(&out, "mcast", "port"), Some("7601"));
    assert_eq!(value(&out, "log", "level"), Some("\"warn\""));
    assert_eq!(value(&out, "", "heartbeat_secs"), Some("30"));
}

#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    /// File text, environment, what the message must contain.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            "[mcast]\nprot = 1\n",
            &[],
            &["line 2: unknown key `mcast.prot`", "addr, port"],
        ),
        (
            "heartbeat_secs = \"x\"\n",
            &[],
            &["heartbeat_secs", "line 1"],
        ),
        (
            "heartbeat_secs = 99999\n",
            &[],
            &["`heartbeat_secs`", "1 to 3600"],
        ),
        (
            "[mcast]\ngroup = \"10.1.1.1\"\n",
            &[],
            &["`mcast.group`", "multicast"],
        ),
        (
            "",
            &[("FLEETCAST_LISTEN", "nowhere")],
            &["FLEETCAST_LISTEN", "`listen`"],
        ),
        (
            "",
            &[("FLEETCAST_LOG_FORMAT", "xml")],
            &["FLEETCAST_LOG_FORMAT", "`log.format`"],
        ),
        ("", &[("FLEETCAST_LOG_LEVEL", "web=loud")], &["`log.level`"]),
        ("not toml at all [", &[], &["bad.toml", "line 1: "]),
        (
            "listen = 0.0.0.0:7300\n",
            &[],
            &[
                "bad.toml: line 1: key `listen`",
                "addresses are strings: listen = \"0.0.0.0:7300\"",
            ],
        ),
        (
            "[log]\nlevel = \"verbose\"\n",
            &[],
            &[
                "line 2: key `log.level`: `verbose` is not a level",
                "error, warn, info",
            ],
        ),
        (
            "",
            &[("RUST_LOG", "verbose")],
            &["RUST_LOG (key `log.level`)", "`verbose` is not a level"],
        ),
    ];
    for (text, env, want) in cases {
        std::fs::write(&file, text).unwrap();
        let (code, out, err) = run(
            dir.path(),
            &["--config", file.to_str().unwrap(), "--print-config"],
            env,
        );
        assert_eq!(code, 2, "{text:?} {env:?}: {out}{err}");
        assert!(out.is_empty(), "{out}");
        for w in *want {
            assert!(err.contains(w), "{text:?} {env:?}: want {w:?} in:\n{err}");
        }
    }
    let (code, _, err) = run(dir.path(), &["--config", "/nonexistent.toml"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read configuration file /nonexistent.toml"),
        "{err}"
    );
    let (code, _, _) = run(dir.path(), &["--no-such-flag"], &[]);
    assert_eq!(code, 2);
    // A value given as a flag is named by its flag.
    for (args, want) in [
        (
            &["--heartbeat", "0"][..],
            "--heartbeat (key `heartbeat_secs`): 0 is out of range",
        ),
        (
            &["--log-level", "verbose"][..],
            "--log-level (key `log.level`): `verbose` is not a level",
        ),
        (
            &["--log-format", "xml"][..],
            "--log-format (key `log.format`)",
        ),
    ] {
        let mut a = args.to_vec();
        a.push("--print-config");
        let (code, out, err) = run(dir.path(), &a, &[]);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
    let (code, out, _) = run(dir.path(), &["--help"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--print-config") && out.contains("FLEETCAST_"),
        "{out}"
    );
}

#[test]
fn a_default_broadcast_off_the_interface_stops_the_start() {
    // Checked before anything binds or sends: 127.0.0.1 is on `lo`, which has no broadcast,
    // and no interface holds 10.255.0.1.
    let dir = tempfile::tempdir().unwrap();
    for (args, want) in [
        (
            &["--mcast-addr", "127.0.0.1", "--mcast-broadcast", "127.255.255.255"][..],
            "fleetcastd: key `mcast.broadcast`: interface lo (127.0.0.1/8) has no broadcast address: push by multicast",
        ),
        (
            &["--mcast-addr", "10.255.0.1", "--mcast-broadcast", "10.255.255.255"][..],
            "fleetcastd: key `mcast.broadcast`: no interface holds 10.255.0.1 (mcast.addr)",
        ),
    ] {
        let (code, out, err) = run(dir.path(), args, &[]);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
    // Without mcast.addr the key has nothing to check and the value itself is refused.
    let (code, _, err) = run(
        dir.path(),
        &["--mcast-broadcast", "255.255.255.255", "--print-config"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--mcast-broadcast (key `mcast.broadcast`): 255.255.255.255 is not a subnet's broadcast address"),
        "{err}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(GATEWAYD)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("FLEETCAST_DATA_DIR", dir.path().join("data"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fleetcastd");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut ready = String::new();
    out.read_line(&mut ready).unwrap();
    assert!(ready.starts_with("ready "), "{ready}");
    // Only this test's own child, by PID.
    child.kill().unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert!(!lines.is_empty());
    let mut saw_ready = false;
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{v}");
        saw_ready |= v["fields"]["message"] == "fleetcastd ready";
    }
    assert!(saw_ready, "{err}");
}
