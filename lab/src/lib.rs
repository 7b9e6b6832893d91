//! fleetcast's test lab: real multi-host IPv4 networks inside private Linux namespaces.
//!
//! [`Lab::new`] builds, without root, a private user namespace holding a hub (a bridge `br0`)
//! and one network namespace per host, each joined to the hub by a veth pair. Host `i` has
//! address [`host_addr`]`(i)` (10.77.0.1, 10.77.0.2, ..) on `eth0` in 10.77.0.0/16, loopback
//! up and a 224.0.0.0/4 route on `eth0`. Nothing is visible in the test's own namespace and
//! everything disappears with the [`Lab`] value, or with the test process however it dies.
//!
//! ```no_run
//! use fleetcast_lab::{Lab, LabConfig, Profile, ProxyConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let lab = Lab::new(LabConfig::hosts(17))?;
//! let gw = lab.host(0).spawn("fleetcastd", |c| {
//!     c.arg("--listen").arg(format!("{}:443", lab.host(0).addr()));
//! })?;
//! let agents: Vec<_> = (1..=16)
//!     .map(|i| {
//!         let h = lab.host(i);
//!         h.loss_in(&[5000], 5.0)?; // 5% of the multicast stream lost on input
//!         Ok(h.spawn("fleetcast-agent", |c| {
//!             c.arg("--gateway").arg("10.77.0.1:443");
//!         })?)
//!     })
//!     .collect::<Result<_, fleetcast_lab::LabError>>()?;
//! lab.host(3).firewall(&Profile::OnlyTcpOut(vec![443]))?;
//! let proxy = lab.proxy(17 - 1, ProxyConfig { allow_connect: true, ..Default::default() })?;
//! # let _ = (gw, agents, proxy);
//! # Ok(()) }
//! ```
//!
//! Sockets can also be made directly in a host and used from the test's threads:
//! [`Host::udp_socket`], [`Host::tcp_listener`], [`Host::tcp_connect`]; for tests of forged
//! traffic, [`Host::spoofing_udp_socket`] (any source address) and [`Host::capture`] (what the
//! host's link carries). See `docs/lab.md`.

mod counters;
mod error;
mod ethtool;
mod lab;
mod nft;
mod postgres;
mod sys;

pub use counters::IfCounters;
pub use error::LabError;
pub use lab::{
    host_addr, tool_path, Capture, Host, Lab, LabChild, LabConfig, Proxy, ProxyConfig, HOST_IFACE,
    MAX_HOSTS, PREFIX_LEN,
};
pub use nft::{Action, Match, Profile};
pub use postgres::{Postgres, PG_USER};
pub use sys::CapturedUdp;
