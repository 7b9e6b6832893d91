//! The `fleetcast-agent` binary's command line from the outside: help and version on stdout
//! with exit 0, usage and configuration errors on stderr with exit 2. Nothing connects
//! anywhere: every run ends before the agent would dial.

use std::process::{Command, Output, Stdio};

const AGENT: &str = env!("CARGO_BIN_EXE_fleetcast-agent");

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(AGENT);
    c.args(args).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run fleetcast-agent")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_and_version_go_to_stdout_and_exit_0() {
    for a in ["--help", "-h"] {
        let o = run(&[a], &[]);
        assert_eq!(o.status.code(), Some(0), "{a}: {}", text(&o.stderr));
        let out = text(&o.stdout);
        assert!(out.starts_with("usage: fleetcast-agent"), "{a}: {out}");
        assert!(
            out.contains("--state-dir") && out.contains("--version"),
            "{out}"
        );
        assert!(o.stderr.is_empty(), "{a}: {}", text(&o.stderr));
    }
    for a in ["--version", "-V"] {
        let o = run(&[a], &[]);
        assert_eq!(o.status.code(), Some(0), "{a}");
        assert_eq!(
            text(&o.stdout),
            format!("fleetcast-agent {}\n", env!("CARGO_PKG_VERSION"))
        );
        assert!(o.stderr.is_empty(), "{a}: {}", text(&o.stderr));
    }
    // Help works even beside a bad setting, and after other flags.
    let o = run(
        &["--gateway", "gw:1", "--help"],
        &[("FLEETCAST_AGENT_ALT_PORT", "x")],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stdout).starts_with("usage: "));
    // After --reboot-command, `--help` is the reboot program's argument, not a request for help.
    let o = run(&["--reboot-command", "my-reboot", "--help"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stdout));
    assert!(text(&o.stderr).contains("--gateway is required"));
}

#[test]
fn usage_and_configuration_errors_exit_2_on_stderr() {
    // Never used: every case is refused before the agent opens it (a temporary path all the
    // same, so that a regression cannot create a directory anywhere else).
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state").display().to_string();
    for (args, env, want) in [
        (&["--bogus"][..], &[][..], "unknown argument --bogus"),
        (&[][..], &[][..], "--gateway is required"),
        (
            &[
                "--gateway",
                "gw:7300",
                "--state-dir",
                &state,
                "--alt-port",
                "0",
            ][..],
            &[][..],
            "--alt-port: 0 is out of range; it takes a TCP port from 1 to 65535",
        ),
        (
            &["--print-config"][..],
            &[("FLEETCAST_AGENT_RUNGS", "native,pigeon")][..],
            "environment variable FLEETCAST_AGENT_RUNGS (key `rungs`): `pigeon` is not a rung",
        ),
    ] {
        let o = run(args, env);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}: {}", text(&o.stdout));
        assert!(
            err.starts_with(&format!("fleetcast-agent: {want}")),
            "{args:?}: want {want:?} in {err}"
        );
    }
    assert!(
        !dir.path().join("state").exists(),
        "a refused start created its state"
    );
}

/// A `[slot]` section that does not fit the machine stops the agent at start with exit 2 and
/// the reason, before it would dial.
#[test]
fn a_bad_slot_section_stops_the_agent_at_start() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("agent.toml");
    let state = d.path().join("state");
    std::fs::write(
        &cfg,
        format!(
            "gateway = \"127.0.0.1:9\"\nstate_dir = \"{}\"\n\n[slot]\na = \"{}/a.img\"\nb = \"{}/b.img\"\n\
             running_command = [\"fleetcast-no-such-program\"]\nboot_once = [\"true\", \"{{slot}}\"]\n\
             set_default = [\"true\", \"{{slot}}\"]\nhealth_check = [\"true\"]\n",
            state.display(),
            d.path().display(),
            d.path().display()
        ),
    )
    .unwrap();
    let o = run(&["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("key `slot.running_command`: program `fleetcast-no-such-program` is not an executable file here"),
        "{err}"
    );
}
