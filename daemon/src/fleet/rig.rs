//! The test rig of the fleet's unit tests: the fleet logic without sockets, inputs in,
//! actions out, the store checked directly.

use super::*;
use fleetcast_store::Store;

/// A device's public key as an agent sends it (P-256 SubjectPublicKeyInfo, DER); made with
/// the daemon's own certificate library, so these tests need no agent.
pub(super) fn device_spki() -> Vec<u8> {
    use rcgen::PublicKeyData as _;
    rcgen::KeyPair::generate()
        .unwrap()
        .subject_public_key_info()
}

pub(super) const T0: u64 = 1_795_000_000_000;
/// The boot every test device's sessions run on.
pub(super) const BOOT: [u8; 16] = [0xB0; 16];

pub(super) struct Rig {
    pub(super) _dir: tempfile::TempDir,
    pub(super) fleet: Fleet,
    pub(super) now: u64,
}

impl Rig {
    pub(super) fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let pki =
            Pki::load_or_create(&dir.path().join("pki"), &["localhost".into()], wall(T0)).unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let cfg = FleetConfig {
            reboot_timeout_ms: 60_000,
            ..FleetConfig::default()
        };
        Rig {
            fleet: Fleet::new(store, pki, cfg).unwrap(),
            _dir: dir,
            now: T0,
        }
    }

    /// A rig whose gateway is in a cell, with the renewals' findings set by the test through
    /// [`Lease`]: what the store's keeper would find, and how many batches were opened.
    pub(super) fn in_cell() -> (Rig, Lease) {
        let dir = tempfile::tempdir().unwrap();
        let pki =
            Pki::load_or_create(&dir.path().join("pki"), &["localhost".into()], wall(T0)).unwrap();
        let lease = Lease::default();
        let store = Leased {
            inner: Store::open(dir.path().join("store")).unwrap(),
            lease: lease.clone(),
        };
        let mut fleet = Fleet::new(store, pki, FleetConfig::default()).unwrap();
        fleet.join_cell("gw-a", 1);
        let rig = Rig {
            fleet,
            _dir: dir,
            now: T0,
        };
        (rig, lease)
    }

    /// A rig whose gateway has a distributor (multicast on: pushes are accepted).
    pub(super) fn with_multicast() -> Rig {
        let mut rig = Rig::new();
        rig.fleet.set_multicast(true);
        rig
    }

    pub(super) fn run(&mut self, inputs: Vec<Input>) -> Vec<Action> {
        self.now += 10;
        self.fleet.process(self.now, inputs)
    }

    /// A gateway restart: the fleet is rebuilt from the same store and CA.
    pub(super) fn restart(&mut self) {
        let dir = self._dir.path().to_owned();
        let cfg = self.fleet.cfg.clone();
        let pki =
            || Pki::load_or_create(&dir.join("pki"), &["localhost".into()], wall(T0)).unwrap();
        // The old fleet (and its store environment) is gone before the store reopens.
        let placeholder = Fleet::new(
            Store::open(dir.join("placeholder")).unwrap(),
            pki(),
            cfg.clone(),
        )
        .unwrap();
        drop(std::mem::replace(&mut self.fleet, placeholder));
        let multicast = self.fleet.multicast;
        self.fleet = Fleet::new(Store::open(dir.join("store")).unwrap(), pki(), cfg).unwrap();
        self.fleet.set_multicast(multicast);
    }

    pub(super) fn admin(&mut self, req: Request) -> Response {
        match &self.run(vec![Input::Admin { conn: 999, req }])[..] {
            [Action::Reply { resp, .. }] => resp.clone(),
            other => panic!("{other:?}"),
        }
    }

    /// Issues a token and enrols a device over connection `conn`; returns its id and key hash.
    pub(super) fn enrol(&mut self, name: &str, conn: ConnId) -> (DeviceId, [u8; 32]) {
        self.enrol_into(name, conn, &["g"])
    }

    /// [`Rig::enrol`] with a token that names `groups`.
    pub(super) fn enrol_into(
        &mut self,
        name: &str,
        conn: ConnId,
        groups: &[&str],
    ) -> (DeviceId, [u8; 32]) {
        let r = self.admin(Request::DeviceAdd {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        });
        let token = r.data["token"].as_str().unwrap().to_string();
        let spki = device_spki();
        let a = self.run(vec![Input::Enrol {
            conn,
            token: token.into_bytes(),
            name: name.into(),
            spki: spki.clone(),
        }]);
        match &a[..] {
            [Action::Enrolled { device, .. }] => (*device, sha256(&spki)),
            other => panic!("{other:?}"),
        }
    }

    pub(super) fn hello(
        &mut self,
        conn: ConnId,
        dev: DeviceId,
        key: [u8; 32],
        last: Option<LastSeen>,
    ) -> Vec<Action> {
        self.run(vec![Input::Hello {
            conn,
            device: dev,
            key_hash: key,
            boot_id: BOOT,
            last,
            transport: None,
        }])
    }

    /// The device's finisher asks for `task` (0: from zero), holding `have` of `total` blocks.
    pub(super) fn ask(
        &mut self,
        conn: ConnId,
        dev: DeviceId,
        task: u64,
        total: u32,
        have: &[(u32, u32)],
    ) -> Vec<Action> {
        let mut set = store::BlockSet::new();
        for (s, e) in have {
            set.insert(*s, *e);
        }
        self.run(vec![Input::TaskAsk {
            conn,
            device: dev,
            task,
            total,
            have: set,
        }])
    }

    /// What an agent without records does on connecting: `Hello`, then its finisher's
    /// from-zero ask; the actions of both.
    pub(super) fn connect(&mut self, conn: ConnId, dev: DeviceId, key: [u8; 32]) -> Vec<Action> {
        let mut a = self.hello(conn, dev, key, None);
        a.extend(self.ask(conn, dev, 0, 0, &[]));
        a
    }

    pub(super) fn queue(&mut self, dev: DeviceId) -> store::QueueState {
        self.fleet
            .store()
            .snapshot()
            .unwrap()
            .queue(dev)
            .unwrap()
            .unwrap_or_default()
    }
}

/// What the renewals of a [`Rig::in_cell`] find, and the batches its store opened.
#[derive(Clone, Default)]
pub(super) struct Lease {
    lapsed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    batches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Lease {
    /// From now on the renewals find the lease lapsed (`true`) or held.
    pub(super) fn set_lapsed(&self, lapsed: bool) {
        self.lapsed
            .store(lapsed, std::sync::atomic::Ordering::SeqCst);
    }

    /// Batches opened so far.
    pub(super) fn batches(&self) -> usize {
        self.batches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// An LMDB store whose lease renewals find what the test set.
struct Leased {
    inner: Store,
    lease: Lease,
}

impl Engine for Leased {
    fn batch(&mut self) -> store::Result<Box<dyn store::StoreBatch + '_>> {
        self.lease
            .batches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Engine::batch(&mut self.inner)
    }
    fn snapshot(&self) -> store::Result<Box<dyn store::Reads + '_>> {
        Engine::snapshot(&self.inner)
    }
    fn backup(&self, dest: &std::path::Path) -> store::Result<()> {
        Engine::backup(&self.inner, dest)
    }
    fn keep_lease(&mut self) -> store::Result<store::Lease> {
        Ok(
            if self.lease.lapsed.load(std::sync::atomic::Ordering::SeqCst) {
                store::Lease::Lapsed
            } else {
                store::Lease::Held
            },
        )
    }
}

pub(super) fn exec(name: &str) -> Vec<wire::Step<'static>> {
    vec![wire::Step::Exec {
        argv: vec!["echo".into(), name.to_string().into()],
    }]
}

pub(super) fn add(
    rig: &mut Rig,
    target: &str,
    commands: Vec<Vec<wire::Step<'static>>>,
) -> Vec<Action> {
    rig.run(vec![Input::Admin {
        conn: 999,
        req: Request::QueueAdd {
            attached: None,
            target: target.into(),
            commands,
            timeout_ms: 10_000,
            max_attempts: 1,
            on_failure: OnFailureSpec::Stop,
        },
    }])
}

pub(super) fn ok_result(steps: usize) -> store::Received {
    store::Received {
        result: wire::CommandResult {
            command_id: 1,
            seq: 1,
            attempt: 1,
            exit_code: 0,
            steps: (0..steps)
                .map(|_| wire::StepResult {
                    status: wire::StepStatus::Ok,
                    exit_code: 0,
                    duration_ms: 0,
                })
                .collect(),
            output: b"".into(),
            report: None,
        },
        at_ms: T0,
    }
}

/// What a `Hello` says: still executing (`result` none) or finished with `result`.
pub(super) fn last(seq: u64, attempt: u32, result: Option<store::Received>) -> Option<LastSeen> {
    Some(LastSeen {
        seq,
        attempt,
        executing: result.is_none(),
        result,
    })
}

pub(super) fn dispatched(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| {
            if let Action::Dispatch { seq, .. } = a {
                Some(*seq)
            } else {
                None
            }
        })
        .collect()
}

pub(super) fn attempt_of(actions: &[Action], seq: u64) -> Option<u32> {
    actions.iter().find_map(|a| match a {
        Action::Dispatch {
            seq: s, attempt, ..
        } if *s == seq => Some(*attempt),
        _ => None,
    })
}

pub(super) fn failed_result() -> store::Received {
    let mut r = ok_result(1);
    r.result.steps[0].status = wire::StepStatus::Failed;
    r.result.steps[0].exit_code = 3;
    r.result.exit_code = 3;
    r
}

pub(super) fn result_input(conn: ConnId, dev: DeviceId, seq: u64, attempt: u32, ok: bool) -> Input {
    Input::Result {
        conn,
        device: dev,
        seq,
        attempt,
        result: if ok { ok_result(1) } else { failed_result() },
    }
}

pub(super) fn events_with(rig: &mut Rig, text: &str) -> usize {
    let r = rig.admin(Request::Events {
        from: 0,
        limit: 1000,
    });
    r.data["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["message"].as_str().is_some_and(|m| m.contains(text)))
        .count()
}

/// `r` carrying the configuration report of a `report` step.
pub(super) fn with_report(
    mut r: store::Received,
    report: wire::ConfigReport<'static>,
) -> store::Received {
    r.result.report = Some(report);
    r
}

/// A test boot id from a readable name.
pub(super) fn boot_named(name: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (o, c) in b.iter_mut().zip(name.bytes()) {
        *o = c;
    }
    b
}

pub(super) fn report_with(os: &str, boot_id: [u8; 16]) -> wire::ConfigReport<'static> {
    wire::ConfigReport {
        boot_id,
        os: os.to_string().into(),
        kernel: "6.1".into(),
        hostname: "n1".into(),
        agent_version: "0.1.0".into(),
        addresses: vec![],
        software: vec![wire::Package {
            name: "nginx".into(),
            version: "1.22".into(),
        }],
        ..Default::default()
    }
}

pub(super) fn stored_report(rig: &Rig, dev: DeviceId) -> Option<wire::ConfigReport<'static>> {
    let snap = rig.fleet.store().snapshot().unwrap();
    snap.device(dev).unwrap().unwrap().report
}
