//! The README's run command, `fleetcast demo`, works and its summary holds: it runs a real
//! gateway and real agents in a private lab network and fails (non-zero exit) if any device's
//! side effects ran other than exactly once in order, any result is missing, or any copy of
//! the multicast image differs.

use std::process::Command;

#[test]
fn demo_runs_queues_with_a_reboot_to_completion() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(["demo", "--devices", "2"])
        .output()
        .expect("run fleetcast demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("all 2 queues done"), "{stdout}");
    assert_eq!(
        stdout
            .matches("5/5 results ok; side effects ran [1,3,4]")
            .count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("2 reboots completed"), "{stdout}");
    // The multicast part: one receiver online with loss, one caught up by unicast.
    assert!(stdout.contains("private lab network: 3 hosts"), "{stdout}");
    assert!(stdout.contains("1 online copies verified"), "{stdout}");
    assert!(stdout.contains("node2 caught up by unicast"), "{stdout}");
    assert!(stdout.contains("all 2 copies byte-identical"), "{stdout}");
    assert!(stdout.contains("2 copies verified"), "{stdout}");
    // Not a terminal: plain progress lines, no cursor movement.
    assert!(!stdout.contains('\x1b'), "{stdout}");
}
