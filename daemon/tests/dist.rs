//! The shipped systemd units agree with the programs: the flags and environment variables they
//! use exist, `Type=notify` is what fleetcastd implements, and `RestartPreventExitStatus` is the
//! exit code of a configuration error.

use std::process::Command;

use fleetcast_daemon::config::KEYS;
use fleetcast_daemon::exit::Exit;

fn unit(name: &str) -> String {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/systemd/");
    std::fs::read_to_string(format!("{p}{name}")).expect("unit file")
}

fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn gateway_unit_matches_fleetcastd() {
    let u = unit("fleetcastd.service");
    assert_eq!(values(&u, "Type"), ["notify"]);
    let usage = Exit::Usage.code().to_string();
    assert_eq!(values(&u, "RestartPreventExitStatus"), [usage.as_str()]);
    let exec = values(&u, "ExecStart")[0];
    assert!(exec.starts_with("/usr/bin/fleetcastd --config "), "{exec}");
    for env in values(&u, "Environment") {
        let var = env.split('=').next().unwrap();
        assert!(
            KEYS.iter().any(|k| k.env() == var),
            "{var} is not a fleetcastd setting"
        );
    }
    // The flags the unit passes are accepted (parsed before the file is read).
    let help = Command::new(env!("CARGO_BIN_EXE_fleetcastd"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(help.contains(flag), "{flag} not in fleetcastd --help");
    }
}

#[test]
fn agent_unit_uses_the_agent_config() {
    let u = unit("fleetcast-agent.service");
    let exec = values(&u, "ExecStart")[0];
    assert!(
        exec.starts_with("/usr/bin/fleetcast-agent --config "),
        "{exec}"
    );
    let usage = Exit::Usage.code().to_string();
    assert_eq!(values(&u, "RestartPreventExitStatus"), [usage.as_str()]);
    for env in values(&u, "Environment") {
        let var = env.split('=').next().unwrap();
        assert!(
            fleetcast_agent::config::KEYS
                .iter()
                .any(|k| fleetcast_agent::config::env_var(k.name) == var),
            "{var} is not a fleetcast-agent setting"
        );
    }
}
