//! Lab test of `fleetcast send` and `fleetcast receive` (no gateway, no enrolment, a
//! pre-shared key): a sender on host 0 and receivers on hosts 1 and 2, host 2 dropping 5% of
//! the datagrams it receives on the group's port (nftables). Every process runs inside the
//! lab's namespaces, multicasts on the lab interface only, and is bounded in time.
//!
//! Checked: both copies are byte-identical to the source and both receives exit 0; the send
//! exits 0 with a summary naming 2 verified receivers and some repair for the lossy one; a
//! receive given the wrong key exits non-zero, writes nothing and says the datagrams were
//! dropped as forged; a send or receive without `--iface` is refused.

use std::fs::File;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use fleetcast_lab::{Lab, LabChild, LabConfig};
use serde_json::Value;

const PORT: u16 = 7301;
const GROUP: &str = "239.1.7.17:7301";
const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const OTHER_KEY: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
const WAIT: Duration = Duration::from_secs(60);

/// `fleetcast ARGS` on `host`, stdout and stderr into `log.out` and `log.err`.
fn spawn<'lab>(lab: &'lab Lab, host: usize, args: &[&str], log: &Path) -> LabChild<'lab> {
    let out = File::create(log.with_extension("out")).expect("log");
    let err = File::create(log.with_extension("err")).expect("log");
    lab.host(host)
        .spawn(env!("CARGO_BIN_EXE_fleetcast"), |c| {
            c.args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err));
        })
        .expect("spawn fleetcast")
}

/// Waits (bounded) for `child`; its exit status and its stdout and stderr.
fn finish(child: &mut LabChild<'_>, log: &Path, limit: Duration) -> (ExitStatus, String, String) {
    let status = child.wait_timeout(limit).expect("wait");
    let out = std::fs::read_to_string(log.with_extension("out")).unwrap_or_default();
    let err = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        panic!(
            "{} still running after {limit:?}\nstdout: {out}\nstderr: {err}",
            log.display()
        );
    };
    (status, out, err)
}

/// `n` bytes that do not repeat in any block-sized pattern.
fn data(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// From `host`: waits for an announce, then sends its source a join tagged under a wrong
/// key and one without a tag (neither may count: the send's summary must name 2 receivers
/// and count them as forged).
fn forge_joins(lab: &Lab, host: usize) {
    use fleetcast_wire::{Message, Ranges, TaskAsk, TAG_LEN};
    let spy = lab.host(host).udp_socket(PORT + 1).expect("socket");
    let group: std::net::Ipv4Addr = GROUP.split(':').next().unwrap().parse().unwrap();
    spy.join_multicast_v4(&group, &lab.host(host).addr())
        .expect("join");
    spy.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 2048];
    let (n, sender) = spy.recv_from(&mut buf).expect("an announce");
    let Ok((Message::Announce(a), _)) = Message::parse_datagram(&buf[..n]) else {
        panic!("not an announce");
    };
    let join = Message::TaskAsk(TaskAsk {
        device_id: 666,
        task_id: a.task_id,
        total: 0,
        have: Ranges::new(),
    });
    let mut out = vec![0u8; join.buffer_len().unwrap() + TAG_LEN];
    let n = join
        .emit_authenticated(&mut out, |_, _| [0x5a; TAG_LEN])
        .unwrap();
    spy.send_to(&out[..n], sender).expect("send");
    let n = join.emit(&mut out).unwrap();
    spy.send_to(&out[..n], sender).expect("send");
}

#[test]
fn send_reaches_two_receivers_one_losing_five_percent_and_both_verify() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    // Host 3 forges joins.
    let lab = Lab::new(LabConfig::hosts(4)).expect("lab (see docs/lab.md)");
    lab.host(2).loss_in(&[PORT], 5.0).expect("nft loss rule");
    let src = data(4 << 20);
    std::fs::write(dir.join("image.bin"), &src).expect("source");
    let iface = lab.host(0).iface();
    let mut receivers = Vec::new();
    for h in [1, 2] {
        let out_dir = dir.join(format!("r{h}"));
        std::fs::create_dir(&out_dir).expect("dir");
        let out = out_dir.join("copy.bin");
        let out = out.to_str().expect("utf-8");
        let args = [
            "receive",
            "--iface",
            iface,
            "--group",
            GROUP,
            "--key",
            KEY,
            "--out",
            out,
            "--max-wait",
            "30",
        ];
        let log = dir.join(format!("receive{h}"));
        receivers.push((h, spawn(&lab, h, &args, &log), log, out_dir));
    }
    let image = dir.join("image.bin");
    let args = [
        "send",
        image.to_str().expect("utf-8"),
        "--iface",
        iface,
        "--group",
        GROUP,
        "--key",
        KEY,
        "--rate",
        "30",
        "--min-receivers",
        "2",
        "--max-wait",
        "20",
        "--json",
    ];
    let slog = dir.join("send");
    let mut sender = spawn(&lab, 0, &args, &slog);
    forge_joins(&lab, 3);
    for (h, child, log, out_dir) in &mut receivers {
        let (status, out, err) = finish(child, log, WAIT);
        eprintln!("receive on host {h}: {out}\n{err}");
        assert!(
            status.success(),
            "receive on host {h}: {status}\n{out}\n{err}"
        );
        assert!(out.contains("SHA-256 verified"), "host {h}: {out}");
        assert!(err.contains("receive: blocks"), "a progress line: {err}");
        let got = std::fs::read(out_dir.join("copy.bin")).expect("copy");
        assert!(got == src, "host {h}: the copy differs");
        let names: Vec<_> = std::fs::read_dir(&*out_dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            ["copy.bin"],
            "host {h}: nothing but the copy is left"
        );
    }
    let (status, out, err) = finish(&mut sender, &slog, WAIT);
    eprintln!("send: {out}\n{err}");
    assert!(status.success(), "send: {status}\n{out}\n{err}");
    assert!(err.contains("send: blocks"), "a progress line: {err}");
    let doc: Value = serde_json::from_str(out.trim()).expect("send --json");
    let s = &doc["summary"];
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(s["receivers"], 2, "{doc}");
    assert_eq!(s["verified"], 2, "{doc}");
    assert_eq!(s["size"], 4 << 20, "{doc}");
    assert_eq!(
        s["block_size"], 1444,
        "fills the lab's MTU of 1500 with parity: {doc}"
    );
    let repairs = ["multicast_repairs", "unicast_repairs", "parity_symbols"]
        .iter()
        .map(|k| s[k].as_u64().expect("a count"))
        .sum::<u64>();
    assert!(repairs > 0, "host 2 lost 5%: something was repaired: {doc}");
    assert!(s["feedback_bytes"].as_u64().expect("bytes") > 0, "{doc}");
    assert!(
        s["forged"].as_u64().expect("count") >= 2,
        "the forged joins: {doc}"
    );
    assert!(s["goodput_mbit_s"].as_f64().expect("rate") > 1.0, "{doc}");
}

/// The `--key` value of the `fleetcast receive` line a send without `--key` printed on its
/// stderr (`log.err`), once it is there (bounded).
fn printed_key(log: &Path) -> String {
    for _ in 0..200 {
        let err = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
        if let Some(line) = err
            .lines()
            .find(|l| l.starts_with("receive with: fleetcast receive"))
        {
            let mut words = line.split_whitespace().skip_while(|w| *w != "--key");
            return words.nth(1).expect("a key after --key").to_string();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no receive line printed");
}

/// Waits (bounded) until `log.err` holds `needle`.
fn wait_for_line(log: &Path, needle: &str) {
    for _ in 0..400 {
        let err = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
        if err.contains(needle) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} never said {needle:?}", log.display());
}

/// Without `--key` the send prints a one-time key and the receive line to paste; a receiver
/// given it verifies, and one started while the first pass runs joins it, has what it
/// missed repaired, and is counted too.
#[test]
fn a_one_time_key_works_and_a_receiver_started_mid_pass_is_caught_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(3)).expect("lab (see docs/lab.md)");
    let src = data(2 << 20);
    let image = dir.join("image.bin");
    std::fs::write(&image, &src).expect("source");
    let iface = lab.host(0).iface();
    let send = [
        "send",
        image.to_str().expect("utf-8"),
        "--iface",
        iface,
        "--group",
        GROUP,
        "--rate",
        "4",
    ];
    let slog = dir.join("send");
    let mut sender = spawn(&lab, 0, &send, &slog);
    let key = printed_key(&slog);
    assert_eq!(key.len(), 64, "{key}");
    assert_ne!(key, KEY);
    let mut receivers = Vec::new();
    for h in [1, 2] {
        if h == 2 {
            // Once the first pass runs (about 4 s of it at 4 Mbit/s).
            wait_for_line(&slog, "send: blocks");
        }
        let out = dir.join(format!("copy{h}.bin"));
        let args = [
            "receive",
            "--iface",
            iface,
            "--group",
            GROUP,
            "--key",
            &key,
            "--out",
            out.to_str().expect("utf-8"),
            "--max-wait",
            "30",
        ];
        let log = dir.join(format!("receive{h}"));
        receivers.push((h, spawn(&lab, h, &args, &log), log, out));
    }
    for (h, child, log, out) in &mut receivers {
        let (status, stdout, err) = finish(child, log, WAIT);
        assert!(
            status.success(),
            "receive on host {h}: {status}\n{stdout}\n{err}"
        );
        assert!(
            std::fs::read(&*out).expect("copy") == src,
            "host {h}: the copy differs"
        );
    }
    let (status, out, err) = finish(&mut sender, &slog, WAIT);
    assert!(status.success(), "send: {status}\n{out}\n{err}");
    assert!(out.contains("to 2 receivers (2 verified)"), "{out}");
    assert!(
        !out.contains("repairs 0 multicast 0 unicast, 0 parity"),
        "host 2 missed the start: {out}"
    );
}

#[test]
fn a_receive_with_the_wrong_key_writes_nothing_and_says_why() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    std::fs::write(dir.join("image.bin"), data(1 << 20)).expect("source");
    let iface = lab.host(0).iface();
    let out_dir = dir.join("r1");
    std::fs::create_dir(&out_dir).expect("dir");
    let out = out_dir.join("copy.bin");
    let image = dir.join("image.bin");
    let send = [
        "send",
        image.to_str().expect("utf-8"),
        "--iface",
        iface,
        "--group",
        GROUP,
        "--key",
        KEY,
        "--max-wait",
        "8",
    ];
    let slog = dir.join("send");
    let mut sender = spawn(&lab, 0, &send, &slog);
    let recv = [
        "receive",
        "--iface",
        iface,
        "--group",
        GROUP,
        "--key",
        OTHER_KEY,
        "--out",
        out.to_str().expect("utf-8"),
        "--max-wait",
        "30",
    ];
    let rlog = dir.join("receive");
    let mut receiver = spawn(&lab, 1, &recv, &rlog);
    let (status, _, err) = finish(&mut receiver, &rlog, Duration::from_secs(20));
    assert!(!status.success(), "a wrong key must fail: {err}");
    assert!(err.contains("dropped as forged"), "it says why: {err}");
    assert_eq!(
        std::fs::read_dir(&out_dir).expect("dir").count(),
        0,
        "nothing written"
    );
    // Nobody joined the send: it gives up after its longest wait.
    let (status, _, err) = finish(&mut sender, &slog, Duration::from_secs(30));
    assert!(!status.success(), "no receiver: {err}");
    assert!(err.contains("no receiver joined"), "{err}");
}

#[test]
fn send_and_receive_refuse_to_run_without_iface() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    // In a lab host all the same: were the refusal broken, nothing would leave the lab.
    let lab = Lab::new(LabConfig::hosts(1)).expect("lab (see docs/lab.md)");
    std::fs::write(dir.join("image.bin"), b"x").expect("source");
    let image = dir.join("image.bin");
    let out = dir.join("copy.bin");
    for args in [
        vec![
            "send",
            image.to_str().expect("utf-8"),
            "--group",
            GROUP,
            "--key",
            KEY,
        ],
        vec![
            "receive",
            "--group",
            GROUP,
            "--key",
            KEY,
            "--out",
            out.to_str().expect("utf-8"),
        ],
    ] {
        let o = lab
            .host(0)
            .command(env!("CARGO_BIN_EXE_fleetcast"))
            .args(&args)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("--iface is required"), "{args:?}: {err}");
    }
    assert!(!out.exists());
}

/// A sender that stops mid-transfer (killed): the receive takes it for gone after 30 s
/// without an announce, exits non-zero, says so and leaves nothing behind.
#[test]
fn a_receive_whose_sender_stops_gives_up_and_removes_its_partial_copy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(2)).expect("lab (see docs/lab.md)");
    let image = dir.join("image.bin");
    std::fs::write(&image, data(2 << 20)).expect("source");
    let iface = lab.host(0).iface();
    let out_dir = dir.join("r1");
    std::fs::create_dir(&out_dir).expect("dir");
    let out = out_dir.join("copy.bin");
    let recv = [
        "receive",
        "--iface",
        iface,
        "--group",
        GROUP,
        "--key",
        KEY,
        "--out",
        out.to_str().expect("utf-8"),
    ];
    let rlog = dir.join("receive");
    let mut receiver = spawn(&lab, 1, &recv, &rlog);
    // About 8 s of first pass at 2 Mbit/s.
    let send = [
        "send",
        image.to_str().expect("utf-8"),
        "--iface",
        iface,
        "--group",
        GROUP,
        "--key",
        KEY,
        "--rate",
        "2",
    ];
    let slog = dir.join("send");
    let mut sender = spawn(&lab, 0, &send, &slog);
    wait_for_line(&rlog, "receive: blocks");
    sender.kill().expect("kill the sender");
    let (status, _, err) = finish(&mut receiver, &rlog, Duration::from_secs(45));
    assert!(!status.success(), "{err}");
    assert!(err.contains("the sender stopped"), "{err}");
    assert_eq!(
        std::fs::read_dir(&out_dir).expect("dir").count(),
        0,
        "the partial copy is removed"
    );
}
