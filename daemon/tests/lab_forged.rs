//! Lab test of forged datagrams during a push: a real `fleetcastd` on host 0 pushes a file to
//! two agents (hosts 1 and 2) while a forger on host 3 sends to the same group and port:
//!
//! - blocks of the live session whose CRC is corrupted,
//! - blocks with a valid CRC naming a session no task has,
//! - blocks of the live session with a valid CRC but a forged payload (whose digest is not
//!   the block's),
//! - blocks "replayed" from an earlier push: that push's session id and a valid CRC (the
//!   agent has no way to tell a replay from any other foreign session, so it counts under
//!   `session`).
//!
//! Checked: both copies are byte-identical to the source, `task show` says `completed` for
//! both, and each agent's end-of-transfer line (`transfer <task>: dropped crc=N session=N
//! tag=N ...`) counts drops under `crc`, `session` and `tag`.
//!
//! A second test has an *enrolled receiver* forge for the others: it knows everything a
//! device of the task knows (session, announce, Merkle root, geometry, and, having the file,
//! every real digest and Merkle node), and sends well-formed blocks with wrong payloads
//! together with well-formed manifests listing those payloads' digests, with the real Merkle
//! path of their position. The other receivers drop and count them (`tag`), and finish
//! with byte-identical copies and `completed` rows.

mod common;

use std::net::SocketAddrV4;
use std::time::Duration;

use common::{now, read_log, status_of, wait_for, Gateway, Rng};
use fleetcast_daemon::admin::Request;
use fleetcast_daemon::distribution::{BlockDigests, RingSha};
use fleetcast_lab::{Lab, LabConfig};
use fleetcast_wire::mcast::digest::{block_digest, ManifestGeometry, MerkleTree, DIGEST_LEN};
use fleetcast_wire::{data_prefix, Kind, Manifest, Message};

#[test]
fn agent_role() {
    common::agent_role();
}

const WAIT: Duration = Duration::from_secs(45);
/// The gateway's default group and port.
const GROUP: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(239, 77, 0, 1), 7301);
const BLOCK: u32 = 1400;
/// Upper bound on the forger's rounds (each round: four datagrams of each kind, then 10 ms).
const MAX_ROUNDS: usize = 3000;

fn all_completed(gw: &Gateway<'_>, task: u64, names: &[&str]) -> bool {
    let rows = gw.task_rows(task);
    names.iter().all(|n| status_of(&rows, n) == "completed")
}

fn push(gw: &Gateway<'_>, path: &std::path::Path, rate_mbps: u64) -> u64 {
    gw.admin(&Request::Push {
        path: path.display().to_string(),
        group: "fleet".into(),
        block_size: BLOCK,
        rate_mbps,
        trigger: Default::default(),
        then: vec![],
        delivery: Default::default(),
        follow: Default::default(),
        image: None,
    })["task"]
        .as_u64()
        .expect("task id")
}

/// A data datagram, CRC valid (data carries no tag: it is authenticated by digest).
fn forged(session: u32, block: u32, payload: &[u8]) -> Vec<u8> {
    let prefix = data_prefix(Kind::Data, session, block, payload, None).expect("prefix");
    let mut d = prefix.to_vec();
    d.extend_from_slice(payload);
    d
}

/// The counter `name` of the agent's `transfer <task>: dropped ...` line.
fn dropped(log: &str, task: u64, name: &str) -> Option<u64> {
    let line = log
        .lines()
        .find(|l| l.contains(&format!("transfer {task}: dropped ")))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
}

#[test]
fn forged_datagrams_are_dropped_counted_and_never_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(4)).expect("lab (see docs/lab.md)");
    let gw_addr = lab.host(0).addr().to_string();
    let gw = Gateway::start(lab.host(0), dir, &["--mcast-addr", &gw_addr]);
    let names = ["n1", "n2"];
    let (specs, agents) = gw.enrol_agents(&lab, dir, names.len());
    let mut rng = Rng::from_env(0x5eed_000f);

    // An earlier push, whose session the forger replays.
    let mut old = vec![0u8; 256 << 10];
    rng.fill(&mut old);
    let old_src = dir.join("old.bin");
    std::fs::write(&old_src, &old).expect("write old source");
    let old_task = push(&gw, &old_src, 100);
    wait_for(
        "the earlier push to complete",
        WAIT,
        || all_completed(&gw, old_task, &names).then_some(()),
        || gw.task_report(&specs, old_task),
    );

    // The push under attack: 6 MiB at 10 Mbit/s, a first pass of about 5 s (long enough for
    // the agents' once-a-second progress reports to show up in the task table).
    let size = 6 << 20;
    let mut data = vec![0u8; size];
    rng.fill(&mut data);
    let src = dir.join("image.bin");
    std::fs::write(&src, &data).expect("write source");
    let task = push(&gw, &src, 10);
    let session = task as u32;
    let old_session = old_task as u32;
    assert_ne!(session, old_session);
    let blocks = size.div_ceil(BLOCK as usize) as u32;

    // Forge only once both receivers have joined (their `.part` files exist).
    wait_for(
        "both receivers to start the transfer",
        WAIT,
        || {
            specs
                .iter()
                .all(|s| s.state.join("downloads").join("image.bin.part").exists())
                .then_some(())
        },
        || gw.task_report(&specs, task),
    );
    let forger = lab.host(3).udp_socket(0).expect("forger socket");
    let mut payload = vec![0u8; BLOCK as usize];
    let mut rounds = 0;
    let mut seen_in_progress = None;
    let started = now();
    while rounds < MAX_ROUNDS && started.elapsed() < WAIT {
        for _ in 0..4 {
            // Full-size blocks only (never the last, shorter one), so only the intended check
            // fails.
            let block = rng.range(0, u64::from(blocks - 1)) as u32;
            rng.fill(&mut payload);
            let mut crc = forged(session, block, &payload);
            let i = 20 + rng.range(0, u64::from(BLOCK)) as usize;
            crc[i] ^= 0x01;
            let wrong_session = forged(0xF0F0_0000 | block, block, &payload);
            let wrong_tag = forged(session, block, &payload);
            let replay = forged(old_session, block, &payload);
            for d in [&crc, &wrong_session, &wrong_tag, &replay] {
                forger.send_to(d, GROUP).expect("forger send");
            }
        }
        rounds += 1;
        if seen_in_progress.is_none() {
            seen_in_progress = gw.task_rows(task).into_iter().find(|r| {
                r["status"] == "in_progress"
                    && !r["blocks"].as_str().unwrap_or("0/").starts_with("0/")
            });
        }
        if all_completed(&gw, task, &names) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("forger: {rounds} rounds of 16 datagrams");
    // The task table showed a receiver part-way through (its progress reports were recorded).
    let row = seen_in_progress
        .unwrap_or_else(|| panic!("no in_progress row seen\n{}", gw.task_report(&specs, task)));
    eprintln!("in progress: {row}");
    wait_for(
        "both to complete the push under attack",
        WAIT,
        || all_completed(&gw, task, &names).then_some(()),
        || gw.task_report(&specs, task),
    );

    for s in &specs {
        let downloads = s.state.join("downloads");
        let got = std::fs::read(downloads.join("image.bin")).expect("received copy");
        assert!(
            got == data,
            "{}: the received copy differs from the source\n{}",
            s.log.display(),
            gw.task_report(&specs, task)
        );
        let got_old = std::fs::read(downloads.join("old.bin")).expect("earlier copy");
        assert!(
            got_old == old,
            "{}: the earlier copy changed",
            s.log.display()
        );
        let log = read_log(&s.log);
        for name in ["crc", "session", "tag"] {
            let n = dropped(&log, task, name).unwrap_or_else(|| {
                panic!("no `transfer {task}: dropped {name}=` line\n{}", s.output())
            });
            assert!(
                n > 0,
                "{}: no forged datagram counted under {name}\n{}",
                s.log.display(),
                s.output()
            );
        }
        eprintln!(
            "{}",
            log.lines()
                .find(|l| l.contains(&format!("transfer {task}: dropped ")))
                .unwrap_or_default()
        );
    }
    drop(agents);
}

/// A receiver of the task forges for the others (see the module docs): forged manifests
/// with real paths and the forged blocks they list, for the blocks the first pass is about
/// to send and for every other position, all through the push.
#[test]
fn an_enrolled_receiver_cannot_forge_for_the_others() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab = Lab::new(LabConfig::hosts(4)).expect("lab (see docs/lab.md)");
    let gw_addr = lab.host(0).addr().to_string();
    let gw = Gateway::start(lab.host(0), dir, &["--mcast-addr", &gw_addr]);
    // Three enrolled devices on hosts 1..=3; the forger runs on host 3, beside its device,
    // with all that device knows.
    let names = ["n1", "n2", "n3"];
    let (specs, agents) = gw.enrol_agents(&lab, dir, names.len());
    let mut rng = Rng::from_env(0x5eed_0017);
    let size = 6 << 20;
    let mut data = vec![0u8; size];
    rng.fill(&mut data);
    let src = dir.join("image.bin");
    std::fs::write(&src, &data).expect("write source");
    // What a device of the task knows: the geometry and root (the announce), and, from its
    // own copy, every real digest and so every Merkle node.
    let real = BlockDigests::of_bytes(&data, BLOCK).expect("digests");
    let geom: ManifestGeometry = *real.geometry();
    let real_digests: Vec<[u8; DIGEST_LEN]> = data
        .chunks(BLOCK as usize)
        .enumerate()
        .map(|(b, p)| block_digest(&mut RingSha, b as u32, p))
        .collect();
    let tree = MerkleTree::build(&mut RingSha, &geom, &real_digests);
    assert_eq!(tree.root(), real.root().root);
    let task = push(&gw, &src, 10);
    let session = task as u32;
    let forger = lab.host(3).udp_socket(0).expect("forger socket");
    let (mut rounds, mut sent_manifests, mut sent_blocks) = (0u64, 0u64, 0u64);
    let started = now();
    let n_manifests = geom.n_manifests();
    let mut next = 0u32;
    while started.elapsed() < WAIT && !all_completed(&gw, task, &names) {
        // In turn through the file (so each manifest is forged ahead of the real one at
        // some point), plus one at random.
        for m in [
            next % n_manifests,
            rng.range(0, u64::from(n_manifests)) as u32,
        ] {
            let blocks = geom.blocks_of(m);
            let mut payloads = Vec::new();
            let mut digests = Vec::new();
            for b in blocks.clone() {
                let len = (size - b as usize * BLOCK as usize).min(BLOCK as usize);
                let mut p = vec![0u8; len];
                rng.fill(&mut p);
                digests.extend_from_slice(&block_digest(&mut RingSha, b, &p));
                payloads.push((b, p));
            }
            let mut path = Vec::new();
            tree.path_into(m, &mut path);
            let man = Message::Manifest(Manifest {
                session,
                index: m,
                digests: &digests,
                path: &path,
            });
            let mut d = Vec::new();
            man.emit_to_vec(&mut d).expect("manifest");
            // The forged manifest first, as the real sender does, then its blocks.
            forger.send_to(&d, GROUP).expect("forger send");
            sent_manifests += 1;
            for (b, p) in payloads.iter().take(8) {
                forger
                    .send_to(&forged(session, *b, p), GROUP)
                    .expect("forger send");
                sent_blocks += 1;
            }
        }
        next = next.wrapping_add(1);
        rounds += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("forger: {rounds} rounds, {sent_manifests} manifests, {sent_blocks} blocks");
    wait_for(
        "all three to complete the push under attack",
        WAIT,
        || all_completed(&gw, task, &names).then_some(()),
        || gw.task_report(&specs, task),
    );
    for s in &specs {
        let got = std::fs::read(s.state.join("downloads").join("image.bin")).expect("copy");
        assert!(
            got == data,
            "{}: the received copy differs from the source\n{}",
            s.log.display(),
            gw.task_report(&specs, task)
        );
        let log = read_log(&s.log);
        let tag = dropped(&log, task, "tag")
            .unwrap_or_else(|| panic!("no `transfer {task}: dropped` line\n{}", s.output()));
        eprintln!(
            "{}",
            log.lines()
                .find(|l| l.contains(&format!("transfer {task}: dropped ")))
                .unwrap_or_default()
        );
        assert!(
            tag > 0,
            "{}: no forgery counted under tag\n{}",
            s.log.display(),
            s.output()
        );
    }
    drop(agents);
}
