//! One representative value of every message kind, with every optional field present and
//! every list non-empty. The golden vectors (`wire/tests/golden/`) are these samples emitted;
//! benches and the fuzz seed corpus use them too.

use alloc::borrow::Cow;
use alloc::vec;
use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::data::DataBlock;
use crate::ranges::Ranges;

const OUTPUT: &[u8] = b"Setting up nginx (1.22.1-9) ...\n";
const PAYLOAD: &[u8] = b"0123456789abcdef0123456789abcdef";
/// Two block digests and a two-sibling path, for the `Manifest` sample.
const DIGESTS: [u8; 32] = [0xD6; 32];
const PATH: [u8; 64] = [0x9A; 64];

fn result() -> CommandResult<'static> {
    CommandResult {
        command_id: 0x0102_0304_0506_0708,
        seq: 7,
        attempt: 2,
        exit_code: 0,
        steps: vec![
            StepResult {
                status: StepStatus::Ok,
                exit_code: 0,
                duration_ms: 1250,
            },
            StepResult {
                status: StepStatus::Skipped,
                exit_code: 0,
                duration_ms: 0,
            },
        ],
        output: Cow::Borrowed(OUTPUT),
        report: Some(report()),
    }
}

fn report() -> ConfigReport<'static> {
    ConfigReport {
        boot_id: [0xB2; 16],
        os: "Debian GNU/Linux 12".into(),
        kernel: "6.1.0-18-amd64".into(),
        hostname: "rack4-node17".into(),
        agent_version: "0.1.0".into(),
        addresses: vec!["10.77.0.17/16".into(), "fe80::1/64".into()],
        software: vec![
            Package {
                name: "nginx".into(),
                version: "1.22.1-9".into(),
            },
            Package {
                name: "fleetcast-agent".into(),
                version: "0.1.0".into(),
            },
        ],
        package_manager: PackageManager::Dpkg,
        cpu_model: "Intel(R) Xeon(R) E-2236".into(),
        cpus: 12,
        memory: 34_359_738_368,
        devices: vec![
            Attached {
                kind: AttachedKind::Disk,
                name: "sda".into(),
                id: "S3Z9NB0K123456".into(),
                wwn: "naa.5002538e40a1b2c3".into(),
                model: "Samsung SSD 860".into(),
                size: 500_107_862_016,
            },
            Attached {
                kind: AttachedKind::Serial,
                name: "ttyUSB0".into(),
                id: "/dev/ttyUSB0".into(),
                wwn: "".into(),
                model: "".into(),
                size: 0,
            },
        ],
    }
}

fn hello() -> Hello<'static> {
    Hello {
        device_id: 17,
        credential: Cow::Borrowed(&[0xC7; 32]),
        agent_version: "0.1.0".into(),
        boot_id: [0xB1; 16],
        last: Some(LastExecuted {
            seq: 7,
            attempt: 2,
            executing: false,
            result: Some(result()),
        }),
    }
}

fn dispatch() -> Dispatch<'static> {
    Dispatch {
        target: Some(Target {
            kind: AttachedKind::Disk,
            id: "S3Z9NB0K123456".into(),
        }),
        command_id: 0x0102_0304_0506_0708,
        seq: 8,
        attempt: 1,
        timeout_ms: 600_000,
        steps: vec![
            Step::Fetch {
                url: "https://gw/pkg.deb".into(),
                path: "/tmp/pkg.deb".into(),
            },
            Step::Verify {
                path: "/tmp/pkg.deb".into(),
                sha256: [0x5A; 32],
            },
            Step::Write {
                path: "/etc/app.conf".into(),
                mode: 0o644,
                contents: Cow::Borrowed(b"port=80\n"),
            },
            Step::Exec {
                argv: vec!["dpkg".into(), "-i".into(), "/tmp/pkg.deb".into()],
            },
            Step::Reboot,
            Step::Report,
            Step::SlotSwitch { deadline_secs: 600 },
            Step::SlotCommit,
        ],
    }
}

fn reboot_complete() -> RebootComplete<'static> {
    let step = |duration_ms| StepResult {
        status: StepStatus::Ok,
        exit_code: 0,
        duration_ms,
    };
    RebootComplete {
        seq: 9,
        report: report(),
        result: CommandResult {
            command_id: 9,
            seq: 9,
            attempt: 1,
            exit_code: 0,
            steps: vec![step(830), step(0)],
            output: Cow::Borrowed(b"linux-image-6.1.0-18 installed\n"),
            report: None,
        },
    }
}

fn announce() -> Announce<'static> {
    Announce {
        task_id: 3,
        session: 0xCAFE,
        group: IpAddr::V4(Ipv4Addr::new(239, 77, 0, 1)),
        port: 7301,
        size: 268_435_456,
        block_size: 1400,
        fec_group: 512,
        sha256: [0xD1; 32],
        digests: Some(DigestRoot {
            root: [0x4B; 32],
            per_manifest: 64,
        }),
        nack_key: Some([0x4E; 32]),
        name: "debian-12.img".into(),
        image: Some(ImageTarget {
            target: "partlabel=rootfs-b".into(),
            map: (&b"FCIM\x01\x01"[..]).into(),
        }),
    }
}

fn nack() -> Nack {
    let mut missing = Ranges::new();
    missing.push(3, 2).expect("canonical");
    missing.push(100, 1).expect("canonical");
    Nack {
        session: 0xCAFE,
        device_id: 17,
        seq: 300,
        echo: Some([0xEC; COOKIE_LEN]),
        missing,
    }
}

/// A sample of every kind, in [`Kind::ALL`] order.
pub fn all() -> Vec<Message<'static>> {
    let block = |block| DataBlock {
        session: 0xCAFE,
        block,
        payload: PAYLOAD,
    };
    vec![
        Message::Hello(hello()),
        Message::Welcome(Welcome {
            session_id: 0xAB,
            server_time_ms: 1_795_000_000_000,
            heartbeat_ms: 15_000,
            acked_seq: 7,
            pending_commands: 2,
            pending_transfers: 1,
        }),
        Message::Heartbeat(Heartbeat {
            nonce: 99,
            echo: false,
        }),
        Message::Enrol(Enrol {
            token: Cow::Borrowed(b"tok-5f2a"),
            name: "rack4-node17".into(),
            spki: Cow::Borrowed(&[0x30, 0x59, 0x30]),
        }),
        Message::Enrolled(Enrolled {
            device_id: 17,
            certificate: Cow::Borrowed(&[0x30, 0x82, 0x01, 0x0a]),
        }),
        Message::Dispatch(dispatch()),
        Message::Result(result()),
        Message::ResultAck(ResultAck { seq: 7 }),
        Message::RebootStarting(RebootStarting {
            command_id: 9,
            seq: 9,
            boot_id: [0xB1; 16],
        }),
        Message::RebootComplete(reboot_complete()),
        Message::Report(report()),
        Message::Announce(announce()),
        Message::Data(block(5)),
        Message::Nack(nack()),
        Message::Repair(block(100)),
        Message::Completion(Completion {
            task_id: 3,
            session: 0xCAFE,
            outcome: Outcome::Verified,
            sha256: [0xD1; 32],
            reason: "".into(),
        }),
        Message::TransferStatus(TransferStatus {
            task_id: 3,
            session: 0xCAFE,
            state: TransferState::InProgress,
            received: 1000,
            total: 191_740,
        }),
        Message::Parity(Parity {
            session: 0xCAFE,
            group: 3,
            group_size: 1024,
            parity_count: 256,
            index: 17,
            payload: PAYLOAD,
        }),
        Message::Probe(Probe {
            cookie: [0xEC; COOKIE_LEN],
        }),
        Message::TaskAsk(TaskAsk {
            device_id: 42,
            task_id: 3,
            total: 191_740,
            have: {
                let mut r = Ranges::new();
                r.push(0, 1000).expect("sample ranges are valid");
                r.push(1500, 20).expect("sample ranges are valid");
                r
            },
        }),
        Message::TaskAnswer(TaskAnswer {
            task_id: 3,
            verdict: TaskVerdict::Serving,
        }),
        Message::Manifest(Manifest {
            session: 0xCAFE,
            index: 2,
            digests: &DIGESTS,
            path: &PATH,
        }),
        Message::Overflow(Overflow {
            session: 0xCAFE,
            device_id: 42,
            drops: 1500,
        }),
        Message::Close(Close {
            code: CloseCode::REVOKED,
            reason: "device revoked by operator".into(),
        }),
    ]
}
