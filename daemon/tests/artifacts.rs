//! `fetch` from the gateway: an artifact placed in `<data-dir>/artifacts/` reaches a real agent
//! through `fetch:PATH=gateway:NAME`, its digest is verified, and a missing artifact fails the
//! step with a recorded reason. Gateway and agent are real processes on 127.0.0.1 (the agent
//! is this test binary in the harness's agent role, [`common::agent_role`]).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleetcast_daemon::admin::{self, OnFailureSpec, Request};
use fleetcast_wire::Step;

#[test]
fn agent_role() {
    common::agent_role();
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn req(data: &Path, r: &Request) -> serde_json::Value {
    let resp = admin::request(data, r).expect("admin request");
    assert!(resp.ok, "{r:?}: {:?}", resp.error);
    resp.data
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..600 {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn fetch_from_the_gateway_then_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("gw");
    std::fs::create_dir_all(data.join("artifacts")).unwrap();
    let payload: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(data.join("artifacts/pkg-1.0.bin"), &payload).unwrap();
    let sha = ring::digest::digest(&ring::digest::SHA256, &payload);
    let sha: String = sha.as_ref().iter().map(|b| format!("{b:02x}")).collect();

    let art = format!("127.0.0.1:{}", free_port());
    let mut gw = Command::new(env!("CARGO_BIN_EXE_fleetcastd"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--artifact-listen", &art])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(gw.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _gw = Kill(gw);
    let addr = line
        .trim()
        .strip_prefix("ready ")
        .expect("ready line")
        .to_string();

    let token = req(
        &data,
        &Request::DeviceAdd {
            name: "n1".into(),
            groups: vec![],
        },
    )["token"]
        .as_str()
        .unwrap()
        .to_string();
    let boot = tmp.path().join("boot");
    std::fs::write(&boot, "0f0e0d0c-0b0a-4908-8706-050403020100").unwrap();
    let args = [
        "--gateway".into(),
        addr.clone(),
        "--state-dir".into(),
        tmp.path().join("agent").display().to_string(),
        "--ca".into(),
        data.join("pki/ca.pem").display().to_string(),
        "--boot-id-file".into(),
        boot.display().to_string(),
        "--token".into(),
        token.clone(),
        "--name".into(),
        "n1".into(),
    ];
    let agent = common::agent_command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _agent = Kill(agent);
    wait_for("the agent to enrol", || {
        let st = req(&data, &Request::Status);
        (st["online"] == 1).then_some(())
    });

    let out = tmp.path().join("pkg.bin").display().to_string();
    let missing = tmp.path().join("missing.bin").display().to_string();
    req(
        &data,
        &Request::QueueAdd {
            attached: None,
            target: "n1".into(),
            commands: vec![
                vec![
                    Step::Fetch {
                        url: "gateway:pkg-1.0.bin".into(),
                        path: out.clone().into(),
                    },
                    Step::Verify {
                        path: out.clone().into(),
                        sha256: fleetcast_wire::parse_sha256(&sha).unwrap(),
                    },
                ],
                vec![Step::Fetch {
                    url: "gateway:no-such.bin".into(),
                    path: missing.clone().into(),
                }],
            ],
            timeout_ms: 30_000,
            max_attempts: 1,
            on_failure: OnFailureSpec::Continue,
        },
    );
    let q = wait_for("the queue to finish", || {
        let q = req(
            &data,
            &Request::QueueShow {
                device: "n1".into(),
            },
        );
        (q["queue"]["status"] == "done").then_some(q)
    });
    assert_eq!(q["commands"][0]["state"], "ok", "{q:#}");
    assert_eq!(std::fs::read(&out).unwrap(), payload);
    assert_eq!(q["commands"][1]["state"], "failed", "{q:#}");
    assert!(
        q["commands"][1]["output"]
            .as_str()
            .unwrap_or("")
            .contains("404"),
        "{q:#}"
    );
    assert!(!Path::new(&missing).exists());
}

/// `GET` of one artifact over a fresh connection; returns the status line.
fn http_get(addr: &str, name: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /{name} HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

/// A symlink to the CA key and a FIFO placed in `artifacts/` are refused by a live gateway,
/// which keeps serving (before: the symlink served the key, the FIFO blocked the loop in
/// `open`, CLI included).
#[test]
fn symlinks_and_fifos_in_the_artifact_directory_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("gw");
    let art = format!("127.0.0.1:{}", free_port());
    let mut gw = Command::new(env!("CARGO_BIN_EXE_fleetcastd"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--artifact-listen", &art])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(gw.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _gw = Kill(gw);
    assert!(line.starts_with("ready "), "{line}");
    let dir = data.join("artifacts");
    std::fs::write(dir.join("ok.bin"), b"fine").unwrap();
    std::os::unix::fs::symlink("../pki/ca.key", dir.join("key.bin")).unwrap();
    let fifo =
        std::ffi::CString::new(dir.join("pipe.bin").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    assert_eq!(http_get(&art, "key.bin"), "HTTP/1.1 404 Not Found");
    assert_eq!(http_get(&art, "pipe.bin"), "HTTP/1.1 404 Not Found");
    // The loop is not stuck: the CLI and the next download are served.
    req(&data, &Request::Status);
    assert_eq!(http_get(&art, "ok.bin"), "HTTP/1.1 200 OK");
}
