//! `fleetcast receive`: the agent's [`Transfer`] for one announce, with the control session
//! replaced by the datagrams of [`fleetcast_wire::mcast::standalone`] (see the module above).
//! Nothing is written before an announce verified under the pre-shared key.

use std::borrow::Cow;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetcast_agent::transfer::{Transfer, TransferDone, TransferSpec};
use fleetcast_wire::mcast::standalone::{GiveUp, ReceiveRules};
use fleetcast_wire::{Announce, Completion, Instant, Message, Outcome, Ranges, TaskAsk};

use super::{io_err, Keys, StandaloneError};

/// What `fleetcast receive` was asked.
#[derive(Debug, Clone, clap::Args)]
pub struct ReceiveOpts {
    /// The interface to join the group on (required: never where routing points).
    #[arg(long, value_name = "IF")]
    pub iface: Option<String>,
    /// Multicast group and port, as given to `fleetcast send`.
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub group: String,
    /// The sender's key, 64 hex digits.
    #[arg(long, value_name = "HEX")]
    pub key: String,
    /// The file to write.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Longest wait for an announce, seconds (default: as long as it takes).
    #[arg(long, value_name = "S")]
    pub max_wait: Option<u64>,
}

/// The summary of a receive.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReceiveSummary {
    /// The file written.
    pub path: String,
    /// File bytes.
    pub size: u64,
    /// Seconds from the first announce to the verified copy.
    pub seconds: f64,
    /// File bytes over that time, Mbit/s.
    pub goodput_mbit_s: f64,
    /// Whether the copy's SHA-256 matched the announced one.
    pub verified: bool,
    /// Whether the sender acknowledged the completion.
    pub acknowledged: bool,
    /// Control datagrams dropped as forged (tag missing or invalid).
    pub forged: u64,
}

impl std::fmt::Display for ReceiveSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received {} bytes into {} in {:.2} s: goodput {:.1} Mbit/s, {}, {} forged \
             datagrams dropped{}",
            self.size,
            self.path,
            self.seconds,
            self.goodput_mbit_s,
            if self.verified {
                "SHA-256 verified"
            } else {
                "NOT verified"
            },
            self.forged,
            if self.acknowledged {
                ""
            } else {
                ", the sender did not acknowledge"
            }
        )
    }
}

/// How a receive that got an announce ended.
#[derive(Debug)]
pub struct ReceiveOutcome {
    /// The summary.
    pub summary: ReceiveSummary,
    /// `None`: the copy verified.
    pub error: Option<StandaloneError>,
}

/// The receiver's sockets: announces (the group's port + 1, joined on the interface) and
/// its own unicast control socket (joins and completions out, answers in).
fn sockets(addr: Ipv4Addr, group: Ipv4Addr, port: u16) -> std::io::Result<(UdpSocket, UdpSocket)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let a = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    a.set_reuse_address(true)?;
    a.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port + 1)).into())?;
    a.join_multicast_v4(&group, &addr)?;
    a.set_nonblocking(true)?;
    let c = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    c.bind(&SocketAddr::V4(SocketAddrV4::new(addr, 0)).into())?;
    c.set_nonblocking(true)?;
    Ok((a.into(), c.into()))
}

/// The transfer under way.
struct Running {
    transfer: Option<Transfer>,
    announce: Announce<'static>,
    sender: SocketAddr,
    done: Option<TransferDone>,
    started: Instant,
    finished: Option<Instant>,
}

/// Runs the receive; `say` gets the progress lines (stderr).
pub fn run(
    opts: &ReceiveOpts,
    say: &mut dyn FnMut(&str),
) -> Result<ReceiveOutcome, StandaloneError> {
    let (_, addr) = super::iface_addr(opts.iface.as_deref())?;
    let (group, port) = super::parse_group(&opts.group)?;
    let keys = Keys::derive(&super::parse_key(&opts.key)?);
    let (name, dir) = out_parts(&opts.out)?;
    let (ann, ctl) = sockets(addr, group, port).map_err(io_err(format!(
        "cannot join {group}:{} on {addr}",
        port + 1
    )))?;
    let device: u64 = u64::from_be_bytes(super::random()?);
    let now = super::clock();
    let mut rules = ReceiveRules::new(now(), opts.max_wait.map(Duration::from_secs));
    let mut run: Option<Running> = None;
    let mut buf = vec![0u8; 65_536];
    let mut acknowledged = false;
    let mut next_progress = now() + Duration::from_secs(1);
    let mut last = (now(), 0u32);
    while !rules.is_done() {
        let t = now();
        if let Some(g) = rules.give_up(t) {
            if let Some(r) = run.take() {
                abandon(r, (&name, &dir));
            }
            return Err(match g {
                GiveUp::Forged { dropped } => StandaloneError::Forged { dropped },
                GiveUp::NoAnnounce => StandaloneError::NoAnnounce,
                GiveUp::SenderGone => StandaloneError::SenderGone,
            });
        }
        // Announces: the first valid one starts the transfer; later ones are only drained.
        while let Ok((n, from)) = ann.recv_from(&mut buf) {
            let Ok((Message::Announce(a), frame)) = Message::parse_datagram(&buf[..n]) else {
                continue;
            };
            if !super::verified(&frame, &keys.control) {
                rules.handle_forged(now());
                continue;
            }
            // Only the group and port asked for, and then only the task being received: an
            // announce elsewhere is not this receive's.
            let other = run
                .as_ref()
                .is_some_and(|r| r.announce.task_id != a.task_id);
            if a.group != std::net::IpAddr::V4(group) || a.port != port || other {
                continue;
            }
            if rules.handle_announce(now()) {
                run = Some(start(
                    &a,
                    &keys,
                    (device, addr, from),
                    (&name, &dir),
                    now(),
                )?);
            }
        }
        while let Ok((n, from)) = ctl.recv_from(&mut buf) {
            let Ok((Message::TaskAnswer(ans), frame)) = Message::parse_datagram(&buf[..n]) else {
                continue;
            };
            if !super::verified(&frame, &keys.control) {
                rules.handle_forged(now());
                continue;
            }
            if run
                .as_ref()
                .is_some_and(|r| r.sender == from && ans.task_id == r.announce.task_id)
            {
                rules.handle_answer();
                acknowledged = true;
            }
        }
        if let Some(r) = run.as_mut() {
            let t = now();
            if rules.poll_join(t) {
                let join = Message::TaskAsk(TaskAsk {
                    device_id: device,
                    task_id: r.announce.task_id,
                    total: 0,
                    have: Ranges::new(),
                });
                super::send(&ctl, &super::tagged(&join, &keys.control), r.sender);
            }
            if let Some(d) = r.transfer.as_mut().and_then(Transfer::try_finish) {
                r.done = Some(d);
                r.transfer = None;
                r.finished = Some(t);
                rules.transfer_done(t);
            }
            if let (true, Some(d)) = (rules.poll_completion(t), r.done.as_ref()) {
                let c = Message::Completion(Completion {
                    task_id: d.task_id,
                    session: d.session,
                    outcome: d.outcome,
                    sha256: d.sha256,
                    reason: Cow::Borrowed(&d.reason),
                });
                super::send(&ctl, &super::tagged(&c, &keys.control), r.sender);
            }
            if t >= next_progress {
                if let Some(tr) = &r.transfer {
                    let st = tr.status();
                    let secs = t.saturating_duration_since(last.0).as_secs_f64();
                    let bytes = u64::from(st.received.saturating_sub(last.1))
                        * u64::from(r.announce.block_size);
                    say(&format!(
                        "receive: blocks {}/{}, {:.1} Mbit/s",
                        st.received,
                        st.total,
                        super::mbit(bytes, secs)
                    ));
                    last = (t, st.received);
                }
                next_progress = t + Duration::from_secs(1);
            }
        }
        let t = now();
        let due = rules
            .poll_timeout()
            .unwrap_or(t + Duration::from_millis(50));
        let wait = due
            .saturating_duration_since(t)
            .clamp(Duration::from_millis(1), Duration::from_millis(50));
        super::send::wait_readable(&[ann.as_raw_fd(), ctl.as_raw_fd()], wait);
    }
    let Some(r) = run else {
        return Err(StandaloneError::NoAnnounce);
    };
    Ok(finish(
        r,
        &opts.out,
        acknowledged,
        rules.forged,
        (&name, &dir),
    ))
}

/// The file name and directory of `--out`.
fn out_parts(out: &Path) -> Result<(String, PathBuf), StandaloneError> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| StandaloneError::Io {
            what: format!("--out {}", out.display()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "name a file"),
        })?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((name, dir))
}

/// Starts the agent's transfer of `a` (announced from `from`) into `--out`: the announce as
/// the gateway would have sent it over a control session, with the keys derived from the
/// pre-shared one and `--out`'s name.
fn start(
    a: &Announce<'_>,
    keys: &Keys,
    (device, local, from): (u64, Ipv4Addr, SocketAddr),
    (name, dir): (&str, &Path),
    now: Instant,
) -> Result<Running, StandaloneError> {
    let announce = Announce {
        nack_key: Some(keys.nack),
        name: Cow::Owned(name.to_string()),
        image: None,
        ..a.clone().into_owned()
    };
    let SocketAddr::V4(src) = from else {
        return Err(StandaloneError::NoAnnounce);
    };
    let spec = TransferSpec {
        announce: announce.clone(),
        device_id: device,
        local,
        gateway: SocketAddrV4::new(*src.ip(), a.port),
        dir: dir.to_path_buf(),
        image: None,
    };
    let transfer = Transfer::spawn(spec).map_err(io_err(format!(
        "cannot receive into {}",
        dir.join(name).display()
    )))?;
    Ok(Running {
        transfer: Some(transfer),
        announce,
        sender: from,
        done: None,
        started: now,
        finished: None,
    })
}

/// Stops an unfinished transfer and removes what it wrote (a standalone copy has no agent to
/// resume it).
fn abandon(r: Running, (name, dir): (&str, &Path)) {
    if let Some(t) = r.transfer {
        t.stop();
    }
    let id = r.announce.task_id;
    for f in [format!("{name}.part"), format!(".{name}.task-{id}.rec")] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// The summary, and the transfer's own bookkeeping files removed (a standalone copy has no
/// agent to resume it).
fn finish(
    r: Running,
    out: &Path,
    acknowledged: bool,
    forged: u64,
    (name, dir): (&str, &Path),
) -> ReceiveOutcome {
    let id = r.announce.task_id;
    for f in [
        format!(".{name}.task-{id}.done"),
        format!(".{name}.task-{id}.rec"),
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let seconds = r.finished.map_or(0.0, |f| {
        f.saturating_duration_since(r.started).as_secs_f64()
    });
    let verified = r
        .done
        .as_ref()
        .is_some_and(|d| d.outcome == Outcome::Verified);
    let summary = ReceiveSummary {
        path: out.display().to_string(),
        size: r.announce.size,
        seconds,
        goodput_mbit_s: super::mbit(r.announce.size, seconds),
        verified,
        acknowledged,
        forged,
    };
    let error = match r.done {
        Some(d) if d.outcome == Outcome::Verified => None,
        Some(d) => Some(StandaloneError::Unverified {
            outcome: d.outcome.to_string(),
            reason: d.reason,
        }),
        None => Some(StandaloneError::Unverified {
            outcome: "unfinished".into(),
            reason: "the transfer ended without a result".into(),
        }),
    };
    ReceiveOutcome { summary, error }
}
