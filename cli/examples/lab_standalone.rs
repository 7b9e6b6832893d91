//! Measures `fleetcast send` / `fleetcast receive` in a private lab network (its own
//! namespaces: nothing leaves them): one sender, N receivers, optional random loss on every
//! receiver's group port, a generated file. Prints the send's JSON summary and each
//! receive's summary line.
//!
//! `cargo build --release -p fleetcast-cli && cargo run --release -p fleetcast-cli --example
//! lab_standalone -- RECEIVERS MIB [LOSS_PERCENT [SEND ARGS...]]`
//!
//! The `fleetcast` binary is taken from the example's target directory (build it first).

use std::fs::File;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use fleetcast_lab::{Lab, LabConfig};

const GROUP: &str = "239.1.7.18:7301";
const PORT: u16 = 7301;
const KEY: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
const LIMIT: Duration = Duration::from_secs(600);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .expect("RECEIVERS");
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).expect("MIB");
    let loss: f64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(0.0);
    let extra: Vec<&str> = args.iter().skip(3).map(String::as_str).collect();
    let exe = std::env::current_exe().expect("exe");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("fleetcast");
    assert!(bin.exists(), "build {} first", bin.display());
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let src = dir.join("image.bin");
    let mut f = File::create(&src).expect("source");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        f.write_all(&chunk).expect("write");
    }
    drop(f);
    let lab = Lab::new(LabConfig::hosts(n + 1)).expect("lab (see docs/lab.md)");
    let iface = lab.host(0).iface();
    let mut kids = Vec::new();
    for h in 1..=n {
        if loss > 0.0 {
            lab.host(h).loss_in(&[PORT], loss).expect("loss rule");
        }
        let out = dir.join(format!("copy{h}.bin"));
        let log = File::create(dir.join(format!("r{h}.out"))).expect("log");
        let args = [
            "receive",
            "--iface",
            iface,
            "--group",
            GROUP,
            "--key",
            KEY,
            "--out",
            out.to_str().expect("utf-8"),
            "--max-wait",
            "60",
        ];
        let child = lab
            .host(h)
            .spawn(&bin, |c| {
                c.args(args).stdout(Stdio::from(log)).stderr(Stdio::null());
            })
            .expect("spawn receive");
        kids.push((h, child));
    }
    let n_arg = n.to_string();
    let mut send_args = vec![
        "send",
        src.to_str().expect("utf-8"),
        "--iface",
        iface,
        "--group",
        GROUP,
        "--key",
        KEY,
        "--min-receivers",
        &n_arg,
        "--max-wait",
        "60",
        "--json",
    ];
    send_args.extend(extra);
    let slog = File::create(dir.join("send.out")).expect("log");
    let mut sender = lab
        .host(0)
        .spawn(&bin, |c| {
            c.args(&send_args)
                .stdout(Stdio::from(slog))
                .stderr(Stdio::inherit());
        })
        .expect("spawn send");
    let status = sender
        .wait_timeout(LIMIT)
        .expect("wait")
        .expect("send ended");
    println!("send exit {status}");
    print!(
        "{}",
        std::fs::read_to_string(dir.join("send.out")).unwrap_or_default()
    );
    for (h, mut k) in kids {
        let status = k.wait_timeout(LIMIT).expect("wait").expect("receive ended");
        let out = std::fs::read_to_string(dir.join(format!("r{h}.out"))).unwrap_or_default();
        println!("receive {h} exit {status}: {}", out.trim());
    }
}
