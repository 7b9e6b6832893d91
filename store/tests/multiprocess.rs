//! Two processes on one environment: the other process (say, the daemon) grows the map far
//! beyond this process's mapping; this process's next batch adopts the new size on its own,
//! and a reader adopts it with `adopt_map_size`.

use std::path::Path;
use std::process::Command as Proc;

use fleetcast_store::prelude::*;
use fleetcast_store::{Command, DeviceId, Error, OnFailure, Store};
use fleetcast_wire::Step;

const ROLE: &str = "FLEETCAST_STORE_MP_CHILD";

fn big() -> Command {
    Command {
        target: None,
        steps: vec![Step::Write {
            path: "/blob".into(),
            mode: 0o644,
            contents: vec![7; 256 * 1024].into(),
        }],
        timeout_ms: 1,
        max_attempts: 1,
        on_failure: OnFailure::Stop,
    }
}

fn child(dir: &Path) {
    let mut s = Store::open(dir).unwrap();
    // ~150 MiB of commands: several doublings of the initial 64 MiB map.
    for _ in 0..3 {
        let mut b = s.batch().unwrap();
        for _ in 0..200 {
            b.enqueue(DeviceId(1), big()).unwrap();
        }
        b.commit().unwrap();
    }
}

#[test]
fn map_grown_by_another_process_is_adopted() {
    if let Ok(dir) = std::env::var(ROLE) {
        child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path()).unwrap();
    let mut b = s.batch().unwrap();
    assert_eq!(b.add_device("d", [0; 32], 0).unwrap(), DeviceId(1));
    b.commit().unwrap();
    let before = s.map_size().unwrap();
    let exe = std::env::current_exe().unwrap();
    let st = Proc::new(exe)
        .args(["--exact", "map_grown_by_another_process_is_adopted"])
        .env(ROLE, dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    let resized = match s.snapshot() {
        Err(Error::Lmdb(lmdb::Error::MapResized)) => true,
        Ok(_) => false,
        Err(e) => panic!("{e:?}"),
    };
    assert!(resized, "the reader should notice the grown map");
    s.adopt_map_size().unwrap();
    assert_eq!(
        s.snapshot()
            .unwrap()
            .queue(DeviceId(1))
            .unwrap()
            .unwrap()
            .next_seq,
        601
    );
    let mut b = s.batch().unwrap();
    assert_eq!(b.enqueue(DeviceId(1), big()).unwrap(), 601);
    b.commit().unwrap();
    assert!(s.map_size().unwrap() > before);
}
