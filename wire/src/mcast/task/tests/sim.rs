//! [`McastTask`] on the seeded simulator ([`crate::sim::Group`]): the sender node is a
//! driver of the task core as the gateway is (one timer, the shared budget refilled once per
//! call, events drained after transmits), the receivers are [`McastReceiver`]s whose NACKs are
//! tagged under the key of their announce (a toy MAC stands in for HMAC), and completions
//! travel back through a mailbox standing in for the control session.

use alloc::rc::Rc;
use core::cell::RefCell;

use super::*;
use crate::data::{data_prefix, DataBlock};
use crate::mcast::{block_len, BlockVerdict, Dest, McastReceiver, ReceiverConfig, ReceiverEvent};
use crate::msg::Message;
use crate::sim::{self, Endpoint, Group, LinkConfig, NodeId};

const SESSION: u32 = 0x7A5C;
const BLOCK: u32 = 1024;
const BLOCKS: u32 = 256;
const RECEIVERS: usize = 1000;
/// Receivers behind a 50% lossy down link: demoted and caught up by unicast.
const LOSSY: [usize; 4] = [10, 200, 500, 900];
/// A target that never comes online: the group lingers for it.
const OFFLINE: usize = 3;
/// A target that comes online after the first pass: caught up by unicast.
const LATE: usize = 7;
const LINGER: Duration = Duration::from_secs(2);

fn file_size() -> u64 {
    u64::from(BLOCKS) * u64::from(BLOCK) - 100
}

fn device(i: usize) -> u64 {
    0x2000 + i as u64
}

fn index_of(dev: u64) -> usize {
    (dev - 0x2000) as usize
}

/// A node's control-session address (its NACKs come from it, so it is its repair address).
fn sim_addr(node: NodeId) -> SocketAddr {
    SocketAddr::from(([10, 1, (node.0 >> 8) as u8, node.0 as u8], 5000))
}

/// A device's NACK key (the gateway derives them with HMAC; any distinct keys do here).
fn key_of(dev: u64) -> [u8; 32] {
    let mut k = [0x5A; 32];
    k[..8].copy_from_slice(&dev.to_be_bytes());
    k
}

/// A toy keyed MAC (FNV-1a over key and input): tags verify only under their key, which is
/// all the policy needs; the crypto is the driver's.
struct ToyMac;

impl NackMac for ToyMac {
    fn tag(&self, key: &[u8; 32], h8: &[u8], body: &[u8]) -> [u8; TAG_LEN] {
        let mut out = [0u8; TAG_LEN];
        for (lane, chunk) in out.chunks_mut(8).enumerate() {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ lane as u64;
            for b in key.iter().chain(h8).chain(body) {
                h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
            chunk.copy_from_slice(&h.to_le_bytes());
        }
        out
    }
}

fn file() -> Rc<[u8]> {
    (0..file_size())
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into()
}

type Mailbox = Rc<RefCell<Vec<u64>>>;

struct TaskNode {
    task: McastTask,
    budget: CatchUpBudget,
    mailbox: Mailbox,
    file: Rc<[u8]>,
    events: Vec<(Instant, TaskEvent)>,
    now: Instant,
    /// Unicast datagrams sent to a device the task had no repair address for.
    no_addr: u64,
}

impl TaskNode {
    /// Applies what the control plane learnt since the last call, and refills the shared
    /// budget (once per call, as the gateway does once per loop turn).
    fn pump(&mut self, now: Instant) {
        self.now = self.now.max(now);
        for dev in self.mailbox.borrow_mut().drain(..) {
            self.task.handle_done(dev, true);
        }
        self.budget.refill(now, self.task.group_running());
    }

    fn announce(&mut self, now: Instant, i: usize) -> bool {
        let ip = sim_addr(NodeId::receiver(i)).ip();
        self.task
            .handle_announce(now, device(i), Some(ip), key_of(device(i)))
    }

    fn saw(&self, want: impl Fn(&TaskEvent) -> bool) -> bool {
        self.events.iter().any(|(_, e)| want(e))
    }
}

impl Endpoint for TaskNode {
    fn handle_datagram(&mut self, now: Instant, from: NodeId, data: &[u8]) {
        self.pump(now);
        if let Ok((Message::Nack(n), frame)) = Message::parse_datagram(data) {
            if n.session == SESSION {
                self.task
                    .handle_nack(now, sim_addr(from), &frame, &n, &ToyMac);
                let mut buf = Vec::new();
                while self.task.poll_probe(&ToyMac, &mut buf).is_some() {
                    buf.clear();
                }
            }
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.pump(now);
        self.task.handle_timeout(now);
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<sim::Dest> {
        let b = match self.task.poll_transmit(now, &mut self.budget)? {
            Transmit::Block(b) => b,
            Transmit::Parity(_) => unreachable!("no FEC in this scenario"),
        };
        let len = block_len(file_size(), BLOCK, b.block) as usize;
        let start = b.block as usize * BLOCK as usize;
        let payload = &self.file[start..start + len];
        buf.extend_from_slice(&data_prefix(b.kind, SESSION, b.block, payload, None).unwrap());
        buf.extend_from_slice(payload);
        Some(match b.dest {
            Dest::Group => sim::Dest::Multicast,
            Dest::Unicast(dev) => {
                if self.task.repair_addr(dev).is_none() {
                    self.no_addr += 1;
                }
                sim::Dest::Unicast(NodeId::receiver(index_of(dev)))
            }
        })
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(e) = self.task.poll_event() {
            self.events.push((self.now, e));
        }
        self.task.poll_timeout(&self.budget)
    }
}

struct RxNode {
    /// `None` while the device is offline (it ignores everything).
    core: Option<McastReceiver>,
    dev: u64,
    mailbox: Mailbox,
    file: Rc<[u8]>,
    bad_writes: u64,
    complete_at: Option<Instant>,
}

impl RxNode {
    fn online(&mut self, now: Instant) {
        let cfg = ReceiverConfig::new(SESSION, self.dev, file_size(), BLOCK, self.dev);
        self.core = Some(McastReceiver::new(cfg, None, now).unwrap());
    }
}

impl Endpoint for RxNode {
    fn handle_datagram(&mut self, now: Instant, _from: NodeId, data: &[u8]) {
        let Some(core) = self.core.as_mut() else {
            return;
        };
        if let Ok((kind, b, _)) = DataBlock::parse(data) {
            let verdict = match kind {
                crate::Kind::Repair => core.handle_repair(now, b.block),
                _ => core.handle_block(now, b.block),
            };
            let start = b.block as usize * BLOCK as usize;
            if verdict == BlockVerdict::New && b.payload != &self.file[start..][..b.payload.len()] {
                self.bad_writes += 1;
            }
        }
        while let Some(e) = core.poll_event() {
            if e == ReceiverEvent::Complete {
                self.complete_at = Some(now);
                self.mailbox.borrow_mut().push(self.dev);
            }
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        if let Some(core) = self.core.as_mut() {
            core.handle_timeout(now);
            while core.poll_event().is_some() {}
        }
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<sim::Dest> {
        let core = self.core.as_mut()?;
        core.poll_transmit(now, buf)?;
        // Tag the NACK under the device's key, as the agent does.
        let (Message::Nack(n), _) = Message::parse_datagram(buf).unwrap() else {
            unreachable!("a receiver sends only NACKs")
        };
        let msg = Message::Nack(n);
        let mut out = alloc::vec![0u8; msg.buffer_len().unwrap() + TAG_LEN];
        let key = key_of(self.dev);
        let len = msg
            .emit_authenticated(&mut out, |h, b| ToyMac.tag(&key, h, b))
            .unwrap();
        out.truncate(len);
        buf.clear();
        buf.extend_from_slice(&out);
        Some(sim::Dest::Unicast(NodeId::SENDER))
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.core.as_ref()?.poll_timeout()
    }
}

fn link(loss: f64) -> LinkConfig {
    LinkConfig {
        delay: Duration::from_millis(2),
        jitter: Duration::from_micros(500),
        loss,
        mtu: Some(1500),
        ..LinkConfig::default()
    }
}

fn build(seed: u64) -> Group<TaskNode, RxNode> {
    let mailbox: Mailbox = Rc::default();
    let file = file();
    let targets: Vec<u64> = (0..RECEIVERS).map(device).collect();
    let cfg = TaskConfig {
        session: SESSION,
        file_size: file_size(),
        block_size: BLOCK,
        rate: 20_000_000,
        linger: LINGER,
        warmup: Duration::from_millis(100),
        fec_group: 0,
        trigger: Trigger::default(),
        probe_key: [3; 32],
    };
    let task = McastTask::new(cfg, &targets, Instant::ZERO).unwrap();
    let sender = TaskNode {
        task,
        budget: CatchUpBudget::new(),
        mailbox: Rc::clone(&mailbox),
        file: Rc::clone(&file),
        events: Vec::new(),
        now: Instant::ZERO,
        no_addr: 0,
    };
    let receivers = (0..RECEIVERS)
        .map(|i| RxNode {
            core: None,
            dev: device(i),
            mailbox: Rc::clone(&mailbox),
            file: Rc::clone(&file),
            bad_writes: 0,
            complete_at: None,
        })
        .collect();
    let mut g = Group::new(seed, sender, receivers, link(0.01), link(0.01));
    for i in LOSSY {
        g.set_link(NodeId::SENDER, NodeId::receiver(i), link(0.5));
    }
    // Everyone but the offline and the late target comes online and is announced at once.
    for i in (0..RECEIVERS).filter(|&i| i != OFFLINE && i != LATE) {
        g.receiver_mut(i).online(Instant::ZERO);
        assert!(g.sender_mut().announce(Instant::ZERO, i), "joins the group");
    }
    g
}

/// Runs the scenario; returns the group at the end of the task.
fn run(seed: u64) -> Group<TaskNode, RxNode> {
    let mut g = build(seed);
    let deadline = Instant::ZERO + Duration::from_secs(60);
    let first_pass = |g: &Group<TaskNode, RxNode>| {
        g.sender()
            .saw(|e| matches!(e, TaskEvent::FirstPassDone { .. }))
    };
    assert!(g.drive_until(first_pass, deadline), "first pass not done");
    // The late target comes online: the first pass is over, so it gets a catch-up sender.
    let now = g.time();
    g.receiver_mut(LATE).online(now);
    assert!(!g.sender_mut().announce(now, LATE), "too late to join");
    assert!(g.sender().task.catch_up(device(LATE)).is_some());
    let over = |g: &Group<TaskNode, RxNode>| g.sender().task.is_over();
    assert!(
        g.drive_until(over, deadline),
        "task not over by {deadline:?}"
    );
    g
}

#[test]
fn thousand_receivers_demotion_catch_up_linger_and_end_of_task() {
    let g = run(11);
    let s = g.sender();
    // The lossy receivers were demoted and handed to catch-up senders of their own, which
    // caught them up and ended with them.
    for i in LOSSY {
        let dev = device(i);
        assert!(s.saw(|e| *e == TaskEvent::Demoted(dev)), "{i} not demoted");
        assert!(
            s.saw(
                |e| matches!(e, TaskEvent::CatchUpFinished { device, verified: true, repairs }
                if *device == dev && *repairs > 0)
            ),
            "{i} not caught up"
        );
    }
    // So was the late joiner, without being demoted.
    let late = device(LATE);
    assert!(!s.saw(|e| *e == TaskEvent::Demoted(late)));
    assert!(s.saw(
        |e| matches!(e, TaskEvent::CatchUpFinished { device, verified: true, .. }
        if *device == late)
    ));
    // Every receiver but the offline one has the file, byte for byte.
    for (i, r) in g.receivers().iter().enumerate() {
        assert_eq!(r.complete_at.is_some(), i != OFFLINE, "receiver {i}");
        assert_eq!(r.bad_writes, 0, "receiver {i}");
    }
    // The group lingered for the offline target, then finished without it.
    let (at, completed, unfinished) = s
        .events
        .iter()
        .find_map(|(at, e)| match e {
            TaskEvent::Finished {
                completed,
                unfinished,
                ..
            } => Some((*at, completed.len(), unfinished.clone())),
            _ => None,
        })
        .expect("the group finished");
    assert_eq!(unfinished, [device(OFFLINE)]);
    assert_eq!(completed, RECEIVERS - 1);
    // Its members (not the demoted, not the late one) had completed; it still waited the
    // linger after its last traffic, which is no sooner than its first pass's end.
    let members = g
        .receivers()
        .iter()
        .enumerate()
        .filter(|(i, _)| !LOSSY.contains(i) && *i != LATE);
    let last_member = members.filter_map(|(_, r)| r.complete_at).max().unwrap();
    let first_pass_at = s
        .events
        .iter()
        .find_map(|(at, e)| matches!(e, TaskEvent::FirstPassDone { .. }).then_some(*at))
        .unwrap();
    assert!(at > last_member, "{at:?} {last_member:?}");
    assert!(at >= first_pass_at + LINGER, "{at:?} {first_pass_at:?}");
    // The end of the task: nothing left, and no repair went to an unknown address.
    assert_eq!(s.task.catch_up_count(), 0);
    assert_eq!(s.no_addr, 0);
    let c = s.task.catch_up_stats();
    assert!(c.unicast_repairs > 0 && c.nacks > 0, "{c:?}");
    assert_eq!(s.task.stats().nacks_forged, 0);
    assert!(s.task.poll_timeout(&s.budget).is_none(), "no timer left");
}

#[test]
fn task_scenario_is_deterministic() {
    let (a, b) = (run(5), run(5));
    assert_eq!(a.digest(), b.digest());
    assert_eq!(a.sender().events, b.sender().events);
}
