use std::borrow::Cow;
use std::net::Ipv4Addr;

use fleetcast_wire::image::Extent;
use fleetcast_wire::ImageTarget;

use super::*;

fn announce(target: &str, map: Vec<u8>, size: u64) -> Announce<'static> {
    Announce {
        task_id: 7,
        session: 7,
        group: Ipv4Addr::new(239, 77, 0, 1).into(),
        port: 7301,
        size,
        block_size: 1436,
        fec_group: 0,
        sha256: [1; 32],
        digests: None,
        nack_key: None,
        name: "os.img".into(),
        image: Some(ImageTarget {
            target: Cow::Owned(target.into()),
            map: Cow::Owned(map),
        }),
    }
}

fn sparse_map(compressed: bool) -> Vec<u8> {
    let extents = vec![Extent {
        offset: 4096,
        len: 8192,
    }];
    let compression = if compressed {
        Compression::Zstd {
            span: 4096,
            chunks: (0..2)
                .map(|i| fleetcast_wire::image::ChunkEntry {
                    image_offset: 4096 + i * 4096,
                    image_len: 4096,
                    comp_offset: i * 100,
                    comp_len: 100,
                    sha256: [0; 32],
                })
                .collect(),
        }
    } else {
        Compression::None
    };
    let map = ImageMap {
        block_size: 4096,
        image_size: 1 << 16,
        image_sha256: [9; 32],
        extents,
        compression,
    };
    let mut out = Vec::new();
    map.encode(&mut out).unwrap();
    out
}

/// Slots a and b are files in `dir`; the running slot is in `dir/running`.
fn slots(dir: &Path, running: &str) -> SlotConfig {
    std::fs::write(dir.join("running"), running).unwrap();
    let text = format!(
        "[slot]\na = \"{d}/slot-a.img\"\nb = \"{d}/slot-b.img\"\nrunning_file = \"{d}/running\"\n\
         boot_once = [\"/bin/true\", \"{{slot}}\"]\nset_default = [\"/bin/true\", \"{{slot}}\"]\n\
         health_check = [\"/bin/true\"]\n",
        d = dir.display()
    );
    crate::slots::parse_section(&text).unwrap().unwrap()
}

#[test]
fn a_file_announce_has_no_plan_and_a_raw_image_is_its_stream() {
    let d = tempfile::tempdir().unwrap();
    let host = Host::new("/");
    let mut a = announce("/x", vec![], 10);
    a.image = None;
    assert!(plan(&a, &host, None, d.path()).is_none());
    let target = d.path().join("disk.img");
    let a = announce(&target.display().to_string(), vec![], 5000);
    let p = plan(&a, &host, None, d.path()).unwrap().unwrap();
    assert_eq!(p.path, target);
    assert_eq!(p.form, Form::Raw { size: 5000 });
    assert_eq!((p.stage, p.image_sha256), (None, [1; 32]));
}

#[test]
fn a_sparse_image_takes_the_maps_size_and_digest() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("disk.img").display().to_string();
    let a = announce(&target, sparse_map(false), 8192);
    let p = plan(&a, &Host::new("/"), None, d.path()).unwrap().unwrap();
    assert!(matches!(&p.form, Form::Image(m) if m.image_size == 1 << 16));
    assert_eq!((p.stage, p.image_sha256), (None, [9; 32]));
}

#[test]
fn a_compressed_image_is_staged_or_refused_by_an_agent_without_the_decoder() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("disk.img").display().to_string();
    let a = announce(&target, sparse_map(true), 200);
    let r = plan(&a, &Host::new("/"), None, d.path()).unwrap();
    if cfg!(feature = "zstd") {
        let stage = r.unwrap().stage.unwrap();
        assert_eq!(stage, d.path().join(".os.img.task-7.stage"));
    } else {
        assert!(matches!(r, Err(PlanError::NoDecoder)));
    }
}

#[test]
fn the_inactive_slot_is_the_one_not_running() {
    let d = tempfile::tempdir().unwrap();
    let host = Host::new("/");
    let a = announce("slot=inactive", vec![], 100);
    for (running, other) in [("a", "slot-b.img"), ("b", "slot-a.img")] {
        let s = slots(d.path(), running);
        let p = plan(&a, &host, Some(&s), d.path()).unwrap().unwrap();
        assert_eq!(p.path, d.path().join(other));
        assert!(p.shown.starts_with("slot=inactive (slot "), "{}", p.shown);
    }
    // An unknown running slot, and no slots at all, refuse before anything is written.
    let s = slots(d.path(), "c");
    let e = plan(&a, &host, Some(&s), d.path()).unwrap().unwrap_err();
    assert!(matches!(e, PlanError::Running { .. }), "{e}");
    let e = plan(&a, &host, None, d.path()).unwrap().unwrap_err();
    assert!(e.to_string().contains("no A/B slots configured"), "{e}");
}

#[test]
fn bad_targets_and_maps_are_refused_with_their_reason() {
    let d = tempfile::tempdir().unwrap();
    let host = Host::new("/");
    let e = plan(&announce("/dev/sda", vec![], 1), &host, None, d.path())
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("kernel device name"), "{e}");
    let target = d.path().join("disk.img").display().to_string();
    let mut map = sparse_map(false);
    map[12] ^= 1;
    let e = plan(&announce(&target, map, 8192), &host, None, d.path())
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, PlanError::Map(_)), "{e}");
    // Larger than the file system can hold.
    let e = plan(&announce(&target, vec![], 1 << 62), &host, None, d.path())
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, PlanError::Refused { .. }), "{e}");
    assert!(e.to_string().contains("has room for"), "{e}");
}
