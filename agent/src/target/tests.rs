use std::os::unix::fs::symlink;

use super::*;

fn put(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

fn link(root: &Path, rel: &str, to: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    symlink(to, p).unwrap();
}

/// A fake machine: disk `sda` (serial, WWN) with `sda1` (mounted on `/`), `sda2` (free),
/// `sda3` (held by dm-0); disk `sdb` whose `sdb1` is mounted on `/boot`; `nvme0n1` known
/// only through `/dev/disk/by-id`; `sdc1` mounted with another device number (btrfs-like).
/// Sizes in 512-byte sectors.
fn fake(root: &Path) {
    put(root, "sys/block/sda/size", "2000000\n");
    put(root, "sys/block/sda/dev", "8:0\n");
    put(root, "sys/block/sda/device/serial", "S3Z9NB0K123456\n");
    put(root, "sys/block/sda/wwid", "naa.5002538e40a1b2c3\n");
    for (p, minor, size) in [
        ("sda1", 1, "500000"),
        ("sda2", 2, "500000"),
        ("sda3", 3, "1000"),
    ] {
        put(root, &format!("sys/block/sda/{p}/partition"), "1\n");
        put(
            root,
            &format!("sys/block/sda/{p}/dev"),
            &format!("8:{minor}\n"),
        );
        put(root, &format!("sys/block/sda/{p}/size"), size);
    }
    put(root, "sys/block/sda/sda3/holders/dm-0", "");
    put(root, "sys/block/sdb/size", "1000000\n");
    put(root, "sys/block/sdb/dev", "8:16\n");
    put(root, "sys/block/sdb/device/serial", "WD-B\n");
    put(root, "sys/block/sdb/sdb1/partition", "1\n");
    put(root, "sys/block/sdb/sdb1/dev", "8:17\n");
    put(root, "sys/block/sdb/sdb1/size", "1000\n");
    put(root, "sys/block/sdc/size", "1000000\n");
    put(root, "sys/block/sdc/dev", "8:32\n");
    put(root, "sys/block/sdc/sdc1/partition", "1\n");
    put(root, "sys/block/sdc/sdc1/dev", "8:33\n");
    put(root, "sys/block/sdc/sdc1/size", "1000\n");
    put(root, "sys/block/nvme0n1/size", "4000000\n");
    put(root, "sys/block/nvme0n1/dev", "259:0\n");
    for d in [
        "sda", "sda1", "sda2", "sda3", "sdb", "sdb1", "sdc", "sdc1", "nvme0n1",
    ] {
        put(root, &format!("dev/{d}"), "");
    }
    link(root, "dev/disk/by-id/nvme-FakeNVMe_NV0001", "../../nvme0n1");
    link(
        root,
        "dev/disk/by-id/nvme-FakeNVMe_NV0001-part1",
        "../../nvme0n1p1",
    );
    link(root, "dev/disk/by-id/wwn-0x5002538e40a1b2c3", "../../sda");
    link(root, "dev/disk/by-partlabel/rootfs-a", "../../sda1");
    link(root, "dev/disk/by-partlabel/rootfs-b", "../../sda2");
    link(root, "dev/disk/by-partuuid/6b1e-02", "../../sda2");
    link(root, "dev/disk/by-uuid/0f3c-aa", "../../sdb1");
    put(
        root,
        "proc/self/mountinfo",
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
         23 22 0:21 / /proc rw - proc proc rw\n\
         24 22 8:17 / /boot rw - vfat /dev/sdb1 rw\n\
         25 22 0:45 /@data /srv/my\\040data rw - btrfs /dev/sdc1 rw\n",
    );
}

fn host() -> (tempfile::TempDir, Host) {
    let d = tempfile::tempdir().unwrap();
    fake(d.path());
    let h = Host::new(d.path());
    (d, h)
}

fn dev(h: &Host, name: &str, disk: Option<&str>) -> Target {
    Target::Device {
        node: h.root.join("dev").join(name),
        name: name.into(),
        disk: disk.map(String::from),
    }
}

fn resolve(h: &Host, s: &str) -> Result<Target, ResolveError> {
    h.resolve(&TargetSpec::parse(s).unwrap(), None)
}

#[test]
fn every_kind_of_target_parses_and_prints_back() {
    for s in [
        "/var/lib/images/os.img",
        "serial=S3Z9NB0K123456",
        "wwn=naa.5002538e40a1b2c3",
        "partlabel=rootfs-b",
        "partuuid=6b1e-02",
        "uuid=0f3c-aa",
        "slot=a",
        "slot=b",
    ] {
        assert_eq!(TargetSpec::parse(s).unwrap().to_string(), s);
    }
}

#[test]
fn bad_targets_are_refused_with_what_they_take() {
    let cases = [
        ("", ResolveError::Empty),
        ("  ", ResolveError::Empty),
        ("label=x", ResolveError::UnknownKind("label".into())),
        ("serial=", ResolveError::EmptyId("serial")),
        ("/dev/sda", ResolveError::BareDevice("/dev/sda".into())),
        (
            "/dev/disk/by-partlabel/x",
            ResolveError::BareDevice("/dev/disk/by-partlabel/x".into()),
        ),
        (
            "images/os.img",
            ResolveError::RelativePath("images/os.img".into()),
        ),
        ("slot=c", ResolveError::BadSlot("c".into())),
    ];
    for (s, want) in cases {
        assert_eq!(TargetSpec::parse(s), Err(want), "{s:?}");
    }
    let e = TargetSpec::parse("label=x").unwrap_err().to_string();
    assert!(
        e.contains("serial, wwn, partlabel, partuuid, uuid, slot"),
        "{e}"
    );
    let e = TargetSpec::parse("/dev/sdb").unwrap_err().to_string();
    assert!(e.contains("stable id"), "{e}");
}

#[test]
fn stable_ids_resolve_to_their_device() {
    let (_d, h) = host();
    assert_eq!(
        resolve(&h, "serial=S3Z9NB0K123456").unwrap(),
        dev(&h, "sda", None)
    );
    assert_eq!(
        resolve(&h, "wwn=naa.5002538e40a1b2c3").unwrap(),
        dev(&h, "sda", None)
    );
    // By-id links when sysfs has no such attribute.
    assert_eq!(
        resolve(&h, "serial=NV0001").unwrap(),
        dev(&h, "nvme0n1", None)
    );
    assert_eq!(
        resolve(&h, "wwn=0x5002538e40a1b2c3").unwrap(),
        dev(&h, "sda", None)
    );
    assert_eq!(
        resolve(&h, "partlabel=rootfs-b").unwrap(),
        dev(&h, "sda2", Some("sda"))
    );
    assert_eq!(
        resolve(&h, "partuuid=6b1e-02").unwrap(),
        dev(&h, "sda2", Some("sda"))
    );
    assert_eq!(
        resolve(&h, "uuid=0f3c-aa").unwrap(),
        dev(&h, "sdb1", Some("sdb"))
    );
    assert_eq!(
        resolve(&h, "/srv/os.img").unwrap(),
        Target::File("/srv/os.img".into())
    );
}

#[test]
fn ids_that_name_nothing_or_several_are_refused() {
    let (d, h) = host();
    match resolve(&h, "partlabel=nope") {
        Err(ResolveError::NotFound { spec, looked }) => {
            assert_eq!(spec, "partlabel=nope");
            assert_eq!(looked, "dev/disk/by-partlabel");
        }
        r => panic!("{r:?}"),
    }
    assert!(matches!(
        resolve(&h, "serial=NOPE"),
        Err(ResolveError::NotFound { .. })
    ));
    put(d.path(), "sys/block/sdc/device/serial", "WD-B\n");
    match resolve(&h, "serial=WD-B") {
        Err(ResolveError::Ambiguous { devices, .. }) => assert_eq!(devices, "sdb, sdc"),
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_file_path_that_leads_to_a_device_is_refused() {
    let (d, h) = host();
    let l = d.path().join("disk-link");
    symlink("/dev/null", &l).unwrap();
    assert!(matches!(
        h.resolve(&TargetSpec::File(l), None),
        Err(ResolveError::LinksToDevice { .. })
    ));
}

#[test]
fn slots_resolve_through_the_configuration() {
    let (_d, h) = host();
    let slots = SlotTargets {
        a: TargetSpec::parse("partlabel=rootfs-a").unwrap(),
        b: TargetSpec::parse("partlabel=rootfs-b").unwrap(),
    };
    let b = TargetSpec::Slot(Slot::B);
    assert_eq!(
        h.resolve(&b, Some(&slots)).unwrap(),
        dev(&h, "sda2", Some("sda"))
    );
    assert_eq!(h.resolve(&b, None), Err(ResolveError::NoSlots("b")));
    let looped = SlotTargets {
        a: TargetSpec::Slot(Slot::B),
        b: TargetSpec::Slot(Slot::A),
    };
    assert_eq!(
        h.resolve(&TargetSpec::Slot(Slot::A), Some(&looped)),
        Err(ResolveError::SlotOfSlot("a"))
    );
    assert_eq!(Slot::A.other(), Slot::B);
}

#[test]
fn a_free_partition_big_enough_may_be_written() {
    let (_d, h) = host();
    let t = resolve(&h, "partlabel=rootfs-b").unwrap();
    h.check(&t, 500_000 * 512).unwrap();
    h.check(&resolve(&h, "serial=NV0001").unwrap(), 1 << 30)
        .unwrap();
}

#[test]
fn the_root_partition_and_its_disk_are_refused() {
    let (_d, h) = host();
    for (t, device) in [
        (resolve(&h, "partlabel=rootfs-a").unwrap(), "sda1"),
        (resolve(&h, "serial=S3Z9NB0K123456").unwrap(), "sda"),
    ] {
        match h.check(&t, 1) {
            Err(Refusal::BootDevice { device: d, root }) => {
                assert_eq!((d.as_str(), root.as_str()), (device, "sda1"));
            }
            r => panic!("{device}: {r:?}"),
        }
    }
}

#[test]
fn a_mounted_partition_or_a_disk_with_one_is_refused() {
    let (_d, h) = host();
    for t in [
        resolve(&h, "uuid=0f3c-aa").unwrap(),
        resolve(&h, "serial=WD-B").unwrap(),
    ] {
        match h.check(&t, 1) {
            Err(Refusal::Mounted {
                device,
                mount_point,
            }) => {
                assert_eq!((device.as_str(), mount_point.as_str()), ("sdb1", "/boot"));
            }
            r => panic!("{r:?}"),
        }
    }
    // A mount whose device number is not the partition's (btrfs): found by its source.
    match h.check(&dev(&h, "sdc1", Some("sdc")), 1) {
        Err(Refusal::Mounted { mount_point, .. }) => assert_eq!(mount_point, "/srv/my data"),
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_held_partition_is_refused() {
    let (_d, h) = host();
    match h.check(&dev(&h, "sda3", Some("sda")), 1) {
        Err(Refusal::Held { device, holder }) => {
            assert_eq!((device.as_str(), holder.as_str()), ("sda3", "dm-0"))
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_device_smaller_than_the_image_is_refused() {
    let (_d, h) = host();
    let t = resolve(&h, "partlabel=rootfs-b").unwrap();
    match h.check(&t, 500_000 * 512 + 1) {
        Err(Refusal::TooSmall { target, need, have }) => {
            assert_eq!(
                (target.as_str(), need, have),
                ("sda2", 256_000_001, 256_000_000)
            );
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_file_target_has_its_length_and_its_file_systems_free_space() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("img");
    fs::write(&f, vec![0u8; 4096]).unwrap();
    check_file(&f, 4096).unwrap();
    check_file(&f, 8192).unwrap(); // the file system has 4 KiB free
    check_file(&d.path().join("new"), 4096).unwrap();
    match check_file(&f, u64::MAX / 2) {
        Err(Refusal::TooSmall { need, have, .. }) => {
            assert_eq!(need, u64::MAX / 2);
            assert!(have >= 4096 && have < need);
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn mountinfo_lines_parse_with_their_escapes() {
    let m = parse_mountinfo(
        "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
         garbage\n",
    );
    assert_eq!(
        m,
        vec![Mount {
            dev: "98:0".into(),
            mount_point: "/mnt/a b".into(),
            source: "/dev/root".into(),
        }]
    );
}

/// On a real loop device when this runs as root with `losetup` (CI does): its size comes from
/// `BLKGETSIZE64`, it is not reported mounted or as the boot device. Elsewhere the same check
/// runs on a regular file's target path, and the test says which ran.
#[test]
fn a_real_loop_device_when_root_else_a_file() {
    let d = tempfile::tempdir().unwrap();
    let backing = d.path().join("disk.img");
    let f = fs::File::create(&backing).unwrap();
    f.set_len(8 << 20).unwrap();
    drop(f);
    let Some(dev) = crate::test_loop::LoopDevice::attach(&backing) else {
        eprintln!("ran on a regular file: not root or losetup unavailable");
        let h = Host::new("/");
        let t = h.resolve(&TargetSpec::File(backing.clone()), None).unwrap();
        h.check(&t, 8 << 20).unwrap();
        return;
    };
    let node = dev.node();
    let name = node.file_name().unwrap().to_string_lossy().into_owned();
    let h = Host::new("/");
    let f = fs::File::open(node).unwrap();
    assert_eq!(blk_size(&f).unwrap(), 8 << 20);
    h.check_device(node, &name, None, 8 << 20).unwrap();
    match h.check_device(node, &name, None, (8 << 20) + 1) {
        Err(Refusal::TooSmall { need, have, .. }) => {
            assert_eq!((need, have), ((8 << 20) + 1, 8 << 20))
        }
        r => panic!("{r:?}"),
    }
}
