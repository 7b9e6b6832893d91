//! `fleetcast send` and `fleetcast receive`: one transfer between machines with no gateway,
//! store or enrolment, like udpcast's `udp-sender` and `udp-receiver`. The sender drives the
//! gateway's [`Distributor`](fleetcast_daemon::distribution::Distributor) and the receiver
//! the agent's [`Transfer`](fleetcast_agent::transfer::Transfer); the control session they
//! normally use is replaced by tagged datagrams, whose rules are the sans-IO core
//! [`fleetcast_wire::mcast::standalone`]. These drivers own sockets, keys and the clock.
//!
//! # Keys
//! Every datagram carries a 16-byte HMAC-SHA256 tag under a key derived from the pre-shared
//! one, one per purpose (so a capture of one kind can never pass for another): `data` for
//! `Data`, `Repair` and `Parity`; `nack` for every receiver's `Nack` and the sender's
//! `Probe`s; `control` for `Announce`, `TaskAsk` (the join), `Completion` and `TaskAnswer`.
//! The announce carries no key at all.
//!
//! # Ports
//! Data goes to the group's port, announces to the group's port + 1 (so the receivers' data
//! socket never sees them); joins and completions go to the unicast address the announces
//! come from.

pub mod receive;
pub mod send;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use fleetcast_daemon::distribution::{ExplicitKeys, Iface};
use fleetcast_wire::{Frame, Message, TAG_LEN};
use ring::hmac;

/// The group's port when `--group` names none (the gateway's default `mcast.port`).
pub const DEFAULT_PORT: u16 = 7301;

/// Why a standalone send or receive cannot run or did not verify.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    /// `--iface` was not given.
    #[error(
        "--iface is required: multicast goes out of and is joined on the interface you name, \
         never where the routing table points (e.g. --iface eth0)"
    )]
    NoIface,
    /// The interface has no IPv4 address (or does not exist).
    #[error("interface {0} does not exist or has no IPv4 address (see `ip -4 addr`)")]
    IfaceAddr(String),
    /// `--group` is not `ADDR[:PORT]` with a multicast ADDR.
    #[error("--group {0}: give a multicast address, with an optional port (e.g. 239.1.2.3:7301)")]
    Group(String),
    /// `--key` is not 64 hex digits.
    #[error("--key: give 32 bytes as 64 hex digits (as `fleetcast send` prints them)")]
    Key,
    /// A socket could not be set up or used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file cannot be distributed.
    #[error(transparent)]
    Dist(#[from] fleetcast_daemon::distribution::DistError),
    /// No randomness for the keys and ids.
    #[error("no randomness available for keys and ids")]
    Random,
    /// The receiver saw only announces whose tags do not verify.
    #[error(
        "no valid announce: {dropped} datagrams dropped as forged (their tags do not verify \
         under --key: give the key `fleetcast send` printed or was given); nothing written"
    )]
    Forged {
        /// Datagrams dropped.
        dropped: u64,
    },
    /// The receiver saw no announce in its longest wait.
    #[error("no announce on the group within --max-wait: is `fleetcast send` running on this network, with this --group?")]
    NoAnnounce,
    /// The sender stopped announcing while the copy was being received.
    #[error(
        "the sender stopped: no announce for 30 s while receiving; the partial copy was removed"
    )]
    SenderGone,
    /// The received copy did not verify.
    #[error("the copy did not verify ({outcome}): {reason}")]
    Unverified {
        /// The outcome's name.
        outcome: String,
        /// Its detail.
        reason: String,
    },
    /// No receiver joined before the first pass.
    #[error("no receiver joined within --max-wait: start `fleetcast receive` with the same --group and --key")]
    NoReceiver,
    /// Some receivers did not report a verified copy.
    #[error("{failed} receivers reported a copy that did not verify and {silent} never reported, of {joined} that joined")]
    ReceiversUnverified {
        /// Reported failures.
        failed: usize,
        /// Never reported.
        silent: usize,
        /// Joined.
        joined: usize,
    },
}

/// A labelled I/O error.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StandaloneError {
    let what = what.into();
    move |source| StandaloneError::Io { what, source }
}

/// The keys of one purpose each, from the pre-shared key.
#[derive(Debug, Clone, Copy)]
pub struct Keys {
    /// `Nack`, `Probe`. (`Data`, `Repair` and `Parity` carry no tag since wire version 5:
    /// they are authenticated by digest, under the Merkle root in the tagged `Announce`.)
    pub nack: [u8; 32],
    /// `Announce`, `TaskAsk`, `Completion`, `TaskAnswer`.
    pub control: [u8; 32],
}

impl Keys {
    /// The keys derived from `psk` (HMAC-SHA256 of a label under it).
    pub fn derive(psk: &[u8; 32]) -> Keys {
        let k = hmac::Key::new(hmac::HMAC_SHA256, psk);
        let one = |label: &[u8]| {
            let mut out = [0u8; 32];
            out.copy_from_slice(hmac::sign(&k, label).as_ref());
            out
        };
        Keys {
            nack: one(b"fleetcast standalone nack"),
            control: one(b"fleetcast standalone control"),
        }
    }

    /// The distribution's keys.
    pub fn explicit(&self) -> ExplicitKeys {
        ExplicitKeys { nack: self.nack }
    }
}

/// `--key HEX`.
pub fn parse_key(hex: &str) -> Result<[u8; 32], StandaloneError> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(StandaloneError::Key);
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| StandaloneError::Key)?;
    }
    Ok(out)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `--group ADDR[:PORT]`.
pub fn parse_group(s: &str) -> Result<(Ipv4Addr, u16), StandaloneError> {
    let bad = || StandaloneError::Group(s.into());
    let (addr, port) = match s.split_once(':') {
        Some((a, p)) => (a, p.parse::<u16>().map_err(|_| bad())?),
        None => (s, DEFAULT_PORT),
    };
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    // Port + 1 carries the announces.
    if !addr.is_multicast() || port == 0 || port == u16::MAX {
        return Err(bad());
    }
    Ok((addr, port))
}

/// The IPv4 address of `--iface` (refused when not given).
pub fn iface_addr(iface: Option<&str>) -> Result<(String, Ipv4Addr), StandaloneError> {
    let name = iface.ok_or(StandaloneError::NoIface)?;
    let i = Iface::named(name).ok_or_else(|| StandaloneError::IfaceAddr(name.into()))?;
    Ok((i.name, i.addr))
}

/// Random bytes.
pub(crate) fn random<const N: usize>() -> Result<[u8; N], StandaloneError> {
    let mut out = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut out)
        .map_err(|_| StandaloneError::Random)?;
    Ok(out)
}

/// `msg` as a datagram tagged under `key`.
pub(crate) fn tagged(msg: &Message<'_>, key: &[u8; 32]) -> Vec<u8> {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut buf = vec![0u8; msg.buffer_len().unwrap_or(0) + TAG_LEN];
    let n = msg
        .emit_authenticated(&mut buf, |h, b| {
            let mut ctx = hmac::Context::with_key(&k);
            ctx.update(h);
            ctx.update(b);
            let mut tag = [0u8; TAG_LEN];
            tag.copy_from_slice(&ctx.sign().as_ref()[..TAG_LEN]);
            tag
        })
        .unwrap_or(0);
    buf.truncate(n);
    buf
}

/// Whether `frame` carries a valid tag under `key`.
pub(crate) fn verified(frame: &Frame<'_>, key: &[u8; 32]) -> bool {
    fleetcast_daemon::distribution::verify_tag(&hmac::Key::new(hmac::HMAC_SHA256, key), frame)
}

/// Sends `dgram` to `to`; a failure is only worth a debug line (the rules repeat it).
pub(crate) fn send(sock: &UdpSocket, dgram: &[u8], to: SocketAddr) -> u64 {
    match sock.send_to(dgram, to) {
        Ok(n) => n as u64,
        Err(_) => 0,
    }
}

/// The driver's clock: microseconds since `epoch`.
#[allow(clippy::disallowed_methods)] // The standalone driver's one time source.
pub(crate) fn clock() -> impl Fn() -> fleetcast_wire::Instant {
    let epoch = std::time::Instant::now();
    move || fleetcast_wire::Instant::from_micros(epoch.elapsed().as_micros() as u64)
}

/// Mbit/s of `bytes` in `secs`.
pub(crate) fn mbit(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        bytes as f64 * 8.0 / secs / 1e6
    }
}

/// `fleetcast send`: progress on stderr, the summary on stdout (one JSON document with
/// `json`); exit 0 only when every receiver that joined reported a verified copy.
pub fn send_main(opts: &send::SendOpts, json: bool) -> std::process::ExitCode {
    let mut say = |l: &str| fleetcast_daemon::errln!("{l}");
    match send::run(opts, &mut say) {
        Ok(o) => report(json, &o.summary, o.error.as_ref(), |s| s.to_string()),
        Err(e) => report::<send::SendSummary>(json, None, Some(&e), |_| String::new()),
    }
}

/// `fleetcast receive`: progress on stderr, the summary on stdout (one JSON document with
/// `json`); exit 0 only when the copy's SHA-256 matched the announced one.
pub fn receive_main(opts: &receive::ReceiveOpts, json: bool) -> std::process::ExitCode {
    let mut say = |l: &str| fleetcast_daemon::errln!("{l}");
    match receive::run(opts, &mut say) {
        Ok(o) => report(json, &o.summary, o.error.as_ref(), |s| s.to_string()),
        Err(e) => report::<receive::ReceiveSummary>(json, None, Some(&e), |_| String::new()),
    }
}

/// Prints a summary (if any) and an error (if any); the exit code says which.
fn report<'a, S: serde::Serialize + 'a>(
    json: bool,
    summary: impl Into<Option<&'a S>>,
    error: Option<&StandaloneError>,
    text: impl Fn(&S) -> String,
) -> std::process::ExitCode {
    use fleetcast_daemon::exit::Exit;
    let summary = summary.into();
    let code = match error {
        None => Exit::Ok,
        Some(StandaloneError::NoIface)
        | Some(StandaloneError::IfaceAddr(_))
        | Some(StandaloneError::Group(_))
        | Some(StandaloneError::Key) => Exit::Usage,
        Some(_) => Exit::Failed,
    };
    if json {
        let doc = serde_json::json!({
            "ok": error.is_none(),
            "summary": summary,
            "error": error.map(|e| e.to_string()),
            "kind": code.name(),
        });
        fleetcast_daemon::outln!("{doc}");
    } else {
        if let Some(s) = summary {
            fleetcast_daemon::outln!("{}", text(s));
        }
        if let Some(e) = error {
            fleetcast_daemon::errln!("fleetcast: {e}");
        }
    }
    code.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_groups_and_ifaces_are_checked() {
        let k = [0xabu8; 32];
        assert_eq!(parse_key(&hex(&k)).unwrap(), k);
        assert!(parse_key("ab").is_err());
        assert!(parse_key(&"zz".repeat(32)).is_err());
        let keys = Keys::derive(&k);
        assert_ne!(keys.nack, keys.control);
        assert_ne!(Keys::derive(&[1; 32]).nack, keys.nack);
        assert_eq!(
            parse_group("239.1.2.3:9000").unwrap(),
            (Ipv4Addr::new(239, 1, 2, 3), 9000)
        );
        assert_eq!(parse_group("239.1.2.3").unwrap().1, DEFAULT_PORT);
        assert!(parse_group("10.0.0.1:9000").is_err(), "not multicast");
        assert!(parse_group("239.1.2.3:x").is_err());
        assert!(matches!(iface_addr(None), Err(StandaloneError::NoIface)));
        assert!(matches!(
            iface_addr(Some("no-such-if0")),
            Err(StandaloneError::IfaceAddr(_))
        ));
    }

    #[test]
    fn a_datagram_verifies_only_under_its_key() {
        let msg = Message::TaskAnswer(fleetcast_wire::TaskAnswer {
            task_id: 5,
            verdict: fleetcast_wire::TaskVerdict::Completed,
        });
        let d = tagged(&msg, &[1; 32]);
        let (_, frame) = Message::parse_datagram(&d).unwrap();
        assert!(verified(&frame, &[1; 32]));
        assert!(!verified(&frame, &[2; 32]));
    }
}
