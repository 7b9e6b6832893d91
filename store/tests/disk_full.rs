//! A full file system is a clear error and loses nothing committed.
//!
//! The test re-executes itself under `unshare -Urm` (user + mount namespace, no privileges
//! needed on the host) and the child mounts an 8 MiB tmpfs, fills it through the store until a
//! commit fails, checks the error is `Error::DiskFull`, then reopens the store and checks that
//! every batch it confirmed is present and nothing of the failed batch is.

use std::path::Path;
use std::process::Command as Proc;

use fleetcast_store::prelude::*;
use fleetcast_store::{Command, Error, OnFailure, Store};
use fleetcast_wire::Step;

const ROLE: &str = "FLEETCAST_STORE_DISK_FULL_CHILD";
const PER_BATCH: u64 = 8;

fn big(i: u64) -> Command {
    Command {
        target: None,
        steps: vec![Step::Write {
            path: format!("/f{i}").into(),
            mode: 0o644,
            contents: vec![(i % 251) as u8; 16 * 1024].into(),
        }],
        timeout_ms: 1,
        max_attempts: 1,
        on_failure: OnFailure::Stop,
    }
}

fn mount_tmpfs(dir: &Path) {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
    let fstype = CString::new("tmpfs").unwrap();
    let opts = CString::new("size=8m").unwrap();
    // SAFETY: valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
}

fn child(root: &Path) {
    mount_tmpfs(root);
    let db = root.join("db");
    let mut store = Store::open(&db).unwrap();
    let mut b = store.batch().unwrap();
    let d = b.add_device("d", [0; 32], 0).unwrap();
    b.commit().unwrap();
    let mut confirmed = 0u64;
    let mut failure = None;
    for _ in 0..10_000 {
        let mut b = store.batch().unwrap();
        for i in 0..PER_BATCH {
            b.enqueue(d, big(confirmed + i + 1)).unwrap();
        }
        match b.commit() {
            Ok(_) => confirmed += PER_BATCH,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("8 MiB tmpfs never filled up");
    assert!(matches!(failure, Error::DiskFull), "got {failure:?}");
    assert!(confirmed > 0);
    // A later batch fails the same clear way (or fits in freed pages); the store stays usable.
    {
        let mut b = store.batch().unwrap();
        b.enqueue(d, big(999_999)).unwrap();
        match b.commit() {
            Ok(_) => confirmed += 1,
            Err(e) => assert!(matches!(e, Error::DiskFull), "got {e:?}"),
        }
    }
    drop(store);
    let store = Store::open(&db).unwrap();
    let s = store.snapshot().unwrap();
    let q = s.queue(d).unwrap().unwrap();
    assert_eq!(
        q.next_seq - 1,
        confirmed,
        "confirmed batches lost or failed batch present"
    );
    let cmds = s.commands(d, 0, usize::MAX).unwrap();
    assert_eq!(cmds.len() as u64, confirmed);
    for (seq, c) in cmds.iter().take(PER_BATCH as usize) {
        assert_eq!(*c, big(*seq));
    }
    println!("disk-full child: {confirmed} commands confirmed, then DiskFull");
}

#[test]
fn full_disk_is_a_clear_error_and_loses_nothing() {
    if let Ok(dir) = std::env::var(ROLE) {
        child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = Proc::new("unshare")
        .arg("-Urm")
        .arg(&exe)
        .args([
            "--exact",
            "full_disk_is_a_clear_error_and_loses_nothing",
            "--nocapture",
        ])
        .env(ROLE, dir.path())
        .output()
        .expect("run unshare (util-linux) to get a private mount namespace");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {stdout}\n{stderr}");
    assert!(stdout.contains("then DiskFull"), "{stdout}");
}
