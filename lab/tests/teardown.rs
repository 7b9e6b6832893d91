//! After a lab ends, by drop, panic or SIGKILL of the test process, no namespace, interface or
//! process of it is left.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use fleetcast_lab::{Lab, LabConfig, ProxyConfig};

const CHILD_ENV: &str = "FLEETCAST_LAB_TEARDOWN_CHILD";

fn alive(pid: u32) -> bool {
    // A reaped child has no /proc entry; a zombie would still be "alive" here, which is what
    // we want to catch too.
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Every (device, inode) of a user or network namespace that process `pid` ("self" for this
/// one) is in or holds an open descriptor to.
///
/// Only the lab's own holders are scanned: the test process and the processes the lab started.
/// The lab creates no bind mounts and no other holders, so when none of these holds a lab
/// namespace, the kernel has freed it. (A machine-wide scan would be flaky: the kernel reuses
/// namespace inode numbers at once, e.g. for a lab another test builds meanwhile.)
fn namespaces_held_by(pid: &str) -> BTreeSet<(u64, u64)> {
    let mut out = BTreeSet::new();
    let proc = std::path::Path::new("/proc").join(pid);
    for ns in ["ns/net", "ns/user"] {
        if let Ok(m) = std::fs::metadata(proc.join(ns)) {
            out.insert((m.dev(), m.ino()));
        }
    }
    if let Ok(fds) = std::fs::read_dir(proc.join("fd")) {
        for fd in fds.flatten() {
            let is_ns = std::fs::read_link(fd.path()).is_ok_and(|l| {
                let l = l.to_string_lossy();
                l.starts_with("net:[") || l.starts_with("user:[")
            });
            if let (true, Ok(m)) = (is_ns, std::fs::metadata(fd.path())) {
                out.insert((m.dev(), m.ino()));
            }
        }
    }
    out
}

fn held(pids: &[u32]) -> BTreeSet<(u64, u64)> {
    let mut all = namespaces_held_by("self");
    for pid in pids {
        all.extend(namespaces_held_by(&pid.to_string()));
    }
    all
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..500 {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("after 5 s: {what}");
}

#[test]
fn drop_leaves_no_namespace_interface_or_process() {
    let own_ifaces = std::fs::read_dir("/sys/class/net").unwrap().count();
    let lab = Lab::new(LabConfig::hosts(4)).unwrap();
    let ids = lab.namespace_ids();
    assert_eq!(ids.len(), 2 + 4);
    let live = held(&[]);
    assert!(
        ids.iter().all(|id| live.contains(id)),
        "the scan must see the lab's namespaces"
    );
    let proxy = lab.proxy(3, ProxyConfig::default()).unwrap();
    let sleeper = lab
        .host(1)
        .spawn("sleep", |c| {
            c.arg("1000").stdin(Stdio::null());
        })
        .unwrap();
    let pids = [proxy.pid, sleeper.id()];
    assert!(pids.iter().all(|&p| alive(p)));
    let sock = lab.host(2).udp_socket(5000).unwrap();

    drop(sock);
    drop(sleeper);
    drop(lab);
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the lab");
    }
    let live = held(&pids);
    let left: Vec<_> = ids.iter().filter(|id| live.contains(id)).collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert_eq!(
        std::fs::read_dir("/sys/class/net").unwrap().count(),
        own_ifaces
    );
}

/// The child half of `sigkill_of_the_test_process_leaves_nothing`: builds a lab, starts a
/// process in it, reports, and waits to be killed.
#[test]
fn teardown_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return; // only meaningful when started by the test below
    }
    let lab = Lab::new(LabConfig::hosts(3)).unwrap();
    let proxy = lab.proxy(2, ProxyConfig::default()).unwrap();
    let sleeper = lab
        .host(1)
        .spawn("sleep", |c| {
            c.arg("1000").stdin(Stdio::null());
        })
        .unwrap();
    let ids: Vec<String> = lab
        .namespace_ids()
        .iter()
        .map(|(d, i)| format!("{d}:{i}"))
        .collect();
    println!("READY {} {} {}", proxy.pid, sleeper.id(), ids.join(","));
    std::thread::sleep(Duration::from_secs(60));
    unreachable!("the parent test kills this process");
}

#[test]
fn sigkill_of_the_test_process_leaves_nothing() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "teardown_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "child ended without reporting"
        );
        // The harness may print "test teardown_child ... " on the same line first.
        if let Some(i) = line.find("READY ") {
            line.drain(..i);
            break;
        }
    }
    let mut f = line.split_whitespace().skip(1);
    let pids: Vec<u32> = (0..2).map(|_| f.next().unwrap().parse().unwrap()).collect();
    let ids: Vec<(u64, u64)> = f
        .next()
        .unwrap()
        .split(',')
        .map(|s| {
            let (d, i) = s.split_once(':').unwrap();
            (d.parse().unwrap(), i.parse().unwrap())
        })
        .collect();
    assert!(pids.iter().all(|&p| alive(p)));
    let holders = [pids[0], pids[1], child.id()];
    let live = held(&holders);
    assert!(
        ids.iter().all(|id| live.contains(id)),
        "the scan must see the child's lab"
    );

    child.kill().unwrap(); // SIGKILL: no destructor runs in the child
    child.wait().unwrap();
    for pid in pids {
        wait_until(&format!("process {pid} outlived the killed test"), || {
            !alive(pid)
        });
    }
    wait_until("namespaces outlived the killed test", || {
        let live = held(&holders);
        ids.iter().all(|id| !live.contains(id))
    });
}
