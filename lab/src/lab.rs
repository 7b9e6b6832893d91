//! The lab: a private user namespace holding a hub network namespace (one bridge) and one
//! network namespace per host, each host joined to the bridge by a veth pair.
//!
//! Invariants:
//! - Every namespace is held only by file descriptors of this process (see `sys`): no bind
//!   mount, no holder process, no name in `/run/netns`. Closing them (on `Drop`, or when the
//!   process dies in any way) frees the namespaces and with them every interface inside.
//! - Every process the lab starts runs inside a host, has `PR_SET_PDEATHSIG(SIGKILL)` and is
//!   killed (by its own `Child` handle, never by name) and reaped before the namespaces close.
//! - Nothing is created in, or sent from, the namespace the test runs in.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::counters::{self, IfCounters};
use crate::error::LabError;
use crate::ethtool;
use crate::nft::{self, Action, Profile};
use crate::sys;

/// The name of every host's interface towards the hub.
pub const HOST_IFACE: &str = "eth0";
/// Prefix length of the lab network (10.77.0.0/16).
pub const PREFIX_LEN: u8 = 16;
/// Most hosts one lab can hold (a Linux bridge has at most 1024 ports).
pub const MAX_HOSTS: usize = 1000;

/// What to build.
#[derive(Clone, Debug)]
pub struct LabConfig {
    /// Number of hosts (1..=[`MAX_HOSTS`]).
    pub hosts: usize,
    /// IGMP snooping on the hub bridge. Off (the default), the bridge floods multicast to every
    /// host like a plain switch; on, it forwards a group only to ports that joined it (and the
    /// bridge acts as IGMP querier).
    pub mcast_snooping: bool,
    /// MTU of every host interface, its hub port and the bridge (1500 by default; 9000 for
    /// jumbo frames).
    pub mtu: u32,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            hosts: 2,
            mcast_snooping: false,
            mtu: 1500,
        }
    }
}

impl LabConfig {
    /// A lab of `n` hosts with default settings.
    pub fn hosts(n: usize) -> Self {
        LabConfig {
            hosts: n,
            ..LabConfig::default()
        }
    }
}

/// The address of host `index`: 10.77.0.1 for host 0, .. 10.77.0.250 for host 249, then
/// 10.77.1.1 and so on (never a .0 or .255 final octet).
pub fn host_addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, (index / 250) as u8, (index % 250 + 1) as u8)
}

#[derive(Debug)]
struct HostState {
    net: Arc<OwnedFd>,
    dev: OwnedFd,
    tcp: OwnedFd,
}

/// A private multi-host network. See the crate docs for an example.
///
/// Dropping it kills the processes it started and frees every namespace and interface.
#[derive(Debug)]
pub struct Lab {
    user: Arc<OwnedFd>,
    hub: Arc<OwnedFd>,
    hosts: Vec<HostState>,
    ip: PathBuf,
    /// Long-running services the lab itself started (proxies), killed on drop.
    services: Mutex<Vec<Child>>,
    setup_time: Duration,
}

/// Finds `tool` on `PATH` or in the sbin directories non-root users often lack on `PATH`.
pub(crate) fn find_tool(tool: &'static str, package: &'static str) -> Result<PathBuf, LabError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(tool))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or(LabError::MissingTool { tool, package })
}

fn ns_error(step: &'static str, e: sys::ForkError) -> LabError {
    let step = e.step.map_or(step, sys::Step::describe);
    LabError::Namespace {
        step,
        source: e.err,
    }
}

/// One thread, alive as long as the process, forks every long-running lab process. The
/// parent-death signal fires when the *thread* that forked a child exits, so forking from a
/// test's own thread would tie a lab created there to that thread.
fn spawn_detached(cmd: Command) -> io::Result<Child> {
    type Job = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("fleetcast-lab-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the lab's spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("lab spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("lab spawner thread is gone"))?
}

fn run_checked(mut cmd: Command, stdin: &str) -> Result<Output, LabError> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().expect("stdin is piped");
    let writer = {
        let stdin = stdin.to_owned();
        std::thread::spawn(move || input.write_all(stdin.as_bytes()))
    };
    let out = child.wait_with_output()?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(LabError::Command {
            command: shown,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out)
}

impl Lab {
    /// Builds the topology: user namespace, hub bridge, `cfg.hosts` hosts with addresses,
    /// loopback up and a multicast route (224.0.0.0/4) on each host's `eth0`, which cuts UDP GSO
    /// messages into datagrams itself.
    pub fn new(cfg: LabConfig) -> Result<Lab, LabError> {
        if cfg.hosts == 0 || cfg.hosts > MAX_HOSTS {
            return Err(LabError::Config(format!(
                "hosts must be 1..={MAX_HOSTS}, not {}",
                cfg.hosts
            )));
        }
        #[allow(clippy::disallowed_methods)]
        // measuring set-up time for docs/lab.md; not protocol time
        let start = std::time::Instant::now();
        let ip = find_tool("ip", "iproute2")?;
        let un = sys::new_user_net().map_err(|e| match e.step {
            Some(
                sys::Step::Unshare | sys::Step::Setgroups | sys::Step::UidMap | sys::Step::GidMap,
            ) => LabError::UserNamespaces { source: e.err },
            _ => ns_error("create user namespace", e),
        })?;
        let mut lab = Lab {
            user: Arc::new(un.user),
            hub: Arc::new(un.net),
            hosts: Vec::with_capacity(cfg.hosts),
            ip,
            services: Mutex::new(Vec::new()),
            setup_time: Duration::ZERO,
        };
        let snoop = if cfg.mcast_snooping {
            "mcast_snooping 1 mcast_querier 1"
        } else {
            "mcast_snooping 0"
        };
        lab.ip_batch(
            &lab.hub,
            &format!(
                "link set lo up\nlink add name br0 mtu {mtu} type bridge {snoop}\nlink set br0 up\n",
                mtu = cfg.mtu
            ),
        )?;

        for _ in 0..cfg.hosts {
            let h =
                sys::new_host_ns(&lab.user).map_err(|e| ns_error("create host namespace", e))?;
            lab.hosts.push(HostState {
                net: Arc::new(h.net),
                dev: h.dev,
                tcp: h.tcp,
            });
        }
        // Each host creates its own veth pair, with the peer placed straight into the hub.
        let hub_fd = lab.hub.as_raw_fd();
        lab.in_each_host("ip -batch -", |i| {
            let script = format!(
                "link set lo up\n\
                 link add name {HOST_IFACE} mtu {mtu} type veth peer name h{i} mtu {mtu} netns /proc/self/fd/{hub_fd}\n\
                 addr add {addr}/{PREFIX_LEN} dev {HOST_IFACE}\n\
                 link set {HOST_IFACE} up\n\
                 route add 224.0.0.0/4 dev {HOST_IFACE}\n",
                addr = host_addr(i),
                mtu = cfg.mtu
            );
            let mut cmd = lab.in_ns(&lab.hosts[i].net, Some(lab.hub.clone()), &lab.ip);
            cmd.args(["-batch", "-"]);
            (cmd, script)
        })?;
        // A UDP GSO message a host sends is cut into datagrams at its own interface, as a NIC
        // that segments UDP does, not carried whole across the bridge: loss rules and every
        // receiver then see each datagram as it would be on a wire.
        for (i, h) in lab.hosts.iter().enumerate() {
            sys::socket_in(&lab.user, &h.net, libc::SOCK_DGRAM)
                .map_err(|e| ns_error("open a socket in a host", e))
                .and_then(|s| {
                    ethtool::feature_off(&s, HOST_IFACE, "tx-udp-segmentation").map_err(|e| {
                        LabError::Command {
                            command: format!(
                                "ethtool -K {HOST_IFACE} tx-udp-segmentation off (host {i})"
                            ),
                            detail: e.to_string(),
                        }
                    })
                })?;
        }
        let mut hub_script = String::new();
        for i in 0..cfg.hosts {
            hub_script.push_str(&format!("link set h{i} master br0\nlink set h{i} up\n"));
        }
        lab.ip_batch(&lab.hub, &hub_script)?;
        lab.setup_time = start.elapsed();
        Ok(lab)
    }

    /// Runs the command `make(i)` gives for every host `i`, with its stdin script, at most
    /// a few at a time (the machine has few cores); any failure is the lab's, named by
    /// `what` and the host.
    fn in_each_host(
        &self,
        what: &str,
        make: impl Fn(usize) -> (Command, String),
    ) -> Result<(), LabError> {
        let n = self.hosts.len();
        let mut i = 0;
        while i < n {
            let children = (i..(i + 8).min(n))
                .map(|i| {
                    let (mut cmd, script) = make(i);
                    let mut child = cmd
                        .stdin(Stdio::piped())
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .spawn()?;
                    child
                        .stdin
                        .take()
                        .expect("piped")
                        .write_all(script.as_bytes())?;
                    Ok((i, child))
                })
                .collect::<io::Result<Vec<_>>>()?;
            i += children.len();
            for (i, child) in children {
                let out = child.wait_with_output()?;
                if !out.status.success() {
                    return Err(LabError::Command {
                        command: format!("{what} (host {i})"),
                        detail: format!(
                            "{}: {}",
                            out.status,
                            String::from_utf8_lossy(&out.stderr).trim()
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// A command for `program` that runs inside namespace `net` of this lab.
    fn in_ns(
        &self,
        net: &Arc<OwnedFd>,
        keep: Option<Arc<OwnedFd>>,
        program: impl AsRef<OsStr>,
    ) -> Command {
        let mut cmd = Command::new(program);
        let (user, net) = (self.user.clone(), net.clone());
        let parent = sys::own_pid();
        // SAFETY: the hook only makes raw system calls (`sys::pre_exec_enter`); the Arcs keep
        // the descriptors open for as long as the command exists.
        unsafe {
            cmd.pre_exec(move || {
                sys::pre_exec_enter(
                    user.as_raw_fd(),
                    net.as_raw_fd(),
                    keep.as_ref().map(|k| k.as_raw_fd()),
                    parent,
                )
            });
        }
        cmd
    }

    fn ip_batch(&self, net: &Arc<OwnedFd>, script: &str) -> Result<(), LabError> {
        let mut cmd = self.in_ns(net, None, &self.ip);
        cmd.args(["-batch", "-"]);
        run_checked(cmd, script).map(drop)
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Always false: a lab has at least one host.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Host `index` (0-based). Panics if out of range.
    pub fn host(&self, index: usize) -> Host<'_> {
        assert!(
            index < self.hosts.len(),
            "host {index} of a {}-host lab",
            self.hosts.len()
        );
        Host { lab: self, index }
    }

    /// All hosts, in order.
    pub fn hosts(&self) -> impl Iterator<Item = Host<'_>> {
        (0..self.hosts.len()).map(|i| self.host(i))
    }

    /// How long [`Lab::new`] took.
    pub fn setup_time(&self) -> Duration {
        self.setup_time
    }

    /// Identities (device, inode) of the lab's user namespace, hub and host network namespaces,
    /// for leak checks: none of them may exist after the lab is dropped.
    pub fn namespace_ids(&self) -> Vec<(u64, u64)> {
        std::iter::once(&*self.user)
            .chain(std::iter::once(&*self.hub))
            .chain(self.hosts.iter().map(|h| &*h.net))
            .filter_map(|fd| sys::ns_id(fd).ok())
            .collect()
    }

    /// A command that runs inside the hub namespace (the bridge `br0` and the `h<i>` ports),
    /// e.g. `ip -s link` for debugging.
    pub fn hub_command(&self, program: impl AsRef<OsStr>) -> Command {
        self.in_ns(&self.hub, None, program)
    }

    /// Starts a real HTTP proxy (tinyproxy) on host `index`, listening on the host's address.
    /// It runs until the lab is dropped.
    pub fn proxy(&self, index: usize, cfg: ProxyConfig) -> Result<Proxy, LabError> {
        let tinyproxy = find_tool("tinyproxy", "tinyproxy")?;
        let host = self.host(index);
        let addr = SocketAddrV4::new(host.addr(), cfg.port);
        let mut conf = format!(
            "Port {}\nListen {}\nTimeout {}\nMaxClients 256\nLogLevel Info\n",
            cfg.port,
            host.addr(),
            cfg.timeout_secs.max(1)
        );
        if !cfg.allow_connect {
            // tinyproxy: "a single ConnectPort line with a value of 0" disables CONNECT.
            conf.push_str("ConnectPort 0\n");
        }
        for p in &cfg.connect_ports {
            conf.push_str(&format!("ConnectPort {p}\n"));
        }
        if let Some((user, pass)) = &cfg.basic_auth {
            conf.push_str(&format!("BasicAuth {user} {pass}\n"));
        }
        let conf_file = Arc::new(OwnedFd::from(unlinked_file(conf.as_bytes())?));
        let mut log = unlinked_file(b"")?;
        let conf_path = format!("/proc/self/fd/{}", conf_file.as_raw_fd());
        let mut cmd = self.in_ns(&self.hosts[index].net, Some(conf_file), &tinyproxy);
        cmd.args(["-d", "-c", &conf_path])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log.try_clone()?));
        let mut child = spawn_detached(cmd)?;
        let not_ready = |log: &mut File, why: String| {
            let mut text = String::new();
            let _ = log.rewind().and_then(|_| log.read_to_string(&mut text));
            LabError::NotReady {
                what: format!("tinyproxy on host {index}"),
                detail: format!("{why}; log:\n{text}"),
            }
        };
        for _ in 0..1000 {
            if let Some(status) = child.try_wait()? {
                return Err(not_ready(&mut log, format!("exited with {status}")));
            }
            if host.listening_tcp(cfg.port)? {
                let pid = child.id();
                self.services
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(child);
                return Ok(Proxy {
                    host: index,
                    addr,
                    pid,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(not_ready(&mut log, "not listening after 10 s".into()))
    }
}

/// A file with `data` in it and no name (unlinked at once, so nothing is left on disk).
fn unlinked_file(data: &[u8]) -> io::Result<File> {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        ".fleetcast-lab-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    f.write_all(data)?;
    Ok(f)
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        for child in services.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The namespace descriptors close after this, freeing every namespace and interface.
    }
}

/// Settings of a lab proxy.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Port to listen on (default 3128).
    pub port: u16,
    /// Whether `CONNECT` tunnels are allowed.
    pub allow_connect: bool,
    /// If `allow_connect`, the only ports `CONNECT` may reach (empty: any port).
    pub connect_ports: Vec<u16>,
    /// Require `Proxy-Authorization: Basic` with this user and password.
    pub basic_auth: Option<(String, String)>,
    /// tinyproxy's `Timeout`: a connection idle this long (seconds, at least 1) is closed,
    /// including a request whose answer is held longer (tinyproxy 1.11 then closes the
    /// client connection without a response). Default 30.
    pub timeout_secs: u32,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            port: 3128,
            allow_connect: true,
            connect_ports: Vec::new(),
            basic_auth: None,
            timeout_secs: 30,
        }
    }
}

/// A running lab proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proxy {
    /// The host it runs on.
    pub host: usize,
    /// Where it listens.
    pub addr: SocketAddrV4,
    /// Its process id (it is the lab's child until the lab drops).
    pub pid: u32,
}

/// One host of a [`Lab`].
#[derive(Clone, Copy, Debug)]
pub struct Host<'lab> {
    lab: &'lab Lab,
    index: usize,
}

impl<'lab> Host<'lab> {
    /// The host's index in the lab.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The host's address (see [`host_addr`]).
    pub fn addr(&self) -> Ipv4Addr {
        host_addr(self.index)
    }

    /// The host's only non-loopback interface.
    pub fn iface(&self) -> &'static str {
        HOST_IFACE
    }

    /// A command that runs `program` inside this host (its network namespace, as root of the
    /// lab's user namespace). The process gets `PR_SET_PDEATHSIG(SIGKILL)`: it dies when the
    /// thread that spawns it ends. Use [`Host::spawn`] for processes that must live as long as
    /// the lab and be killed with it; `.output()` / `.status()` are fine for short commands.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.lab
            .in_ns(&self.lab.hosts[self.index].net, None, program)
    }

    /// Spawns `program` inside this host, after `configure` has set its arguments,
    /// environment and stdio. The child is killed and reaped when the returned handle drops,
    /// which the borrow checker guarantees happens before the lab drops. It is forked by a
    /// lab thread that lives as long as the process, so its parent-death signal fires only
    /// when the test process itself dies.
    pub fn spawn(
        &self,
        program: impl AsRef<OsStr>,
        configure: impl FnOnce(&mut Command),
    ) -> io::Result<LabChild<'lab>> {
        let mut cmd = self.command(program);
        configure(&mut cmd);
        Ok(LabChild {
            child: Some(spawn_detached(cmd)?),
            _lab: std::marker::PhantomData,
        })
    }

    fn net(&self) -> &OwnedFd {
        &self.lab.hosts[self.index].net
    }

    fn socket(&self, ty: i32) -> io::Result<OwnedFd> {
        sys::socket_in(&self.lab.user, self.net(), ty).map_err(|e| {
            io::Error::new(
                e.err.kind(),
                format!("socket in host {}: {}", self.index, e.err),
            )
        })
    }

    /// A UDP socket of this host, bound to `0.0.0.0:port` (0: any port), whose multicast is
    /// sent out of the host's interface (`IP_MULTICAST_IF` = [`Host::addr`]). The socket lives
    /// in the host's namespace but is used from the test like any `UdpSocket`.
    pub fn udp_socket(&self, port: u16) -> io::Result<UdpSocket> {
        sys::udp_bind(
            self.socket(libc::SOCK_DGRAM)?,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
            self.addr(),
        )
    }

    /// A UDP socket of this host bound to `src`, which need not be the host's address: its
    /// datagrams leave with a spoofed source (`IP_TRANSPARENT`). For tests of forged
    /// traffic; it exists, like everything of the lab, only inside the lab's namespaces.
    pub fn spoofing_udp_socket(&self, src: SocketAddrV4) -> io::Result<UdpSocket> {
        sys::udp_spoofing(self.socket(libc::SOCK_DGRAM)?, src)
    }

    /// A passive capture of the IPv4 UDP datagrams this host receives and sends (a packet
    /// socket in the host's namespace, as an eavesdropper on its link sees them).
    pub fn capture(&self) -> io::Result<Capture> {
        let proto = i32::from((libc::ETH_P_IP as u16).to_be());
        let fd = sys::socket_of(
            &self.lab.user,
            self.net(),
            (libc::AF_PACKET, libc::SOCK_DGRAM, proto),
        )
        .map_err(|e| {
            io::Error::new(
                e.err.kind(),
                format!("packet socket in host {}: {}", self.index, e.err),
            )
        })?;
        Ok(Capture {
            fd,
            buf: vec![0; 65_536],
        })
    }

    /// A TCP listener of this host on `0.0.0.0:port`.
    pub fn tcp_listener(&self, port: u16) -> io::Result<TcpListener> {
        sys::tcp_listen(
            self.socket(libc::SOCK_STREAM)?,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
        )
    }

    /// A TCP connection from this host to `to`, failing with `TimedOut` after `timeout`.
    pub fn tcp_connect(&self, to: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
        sys::tcp_connect(self.socket(libc::SOCK_STREAM)?, to, timeout)
    }

    /// Counters of the host's interface (`eth0`).
    pub fn counters(&self) -> io::Result<IfCounters> {
        let text = sys::pread_all(&self.lab.hosts[self.index].dev)?;
        counters::parse_proc_net_dev(&text, HOST_IFACE).ok_or_else(|| {
            io::Error::other(format!(
                "no {HOST_IFACE} in /proc/net/dev of host {}",
                self.index
            ))
        })
    }

    /// Whether some socket in this host listens on TCP `port`.
    pub fn listening_tcp(&self, port: u16) -> io::Result<bool> {
        Ok(counters::tcp_listening(
            &sys::pread_all(&self.lab.hosts[self.index].tcp)?,
            port,
        ))
    }

    /// Applies an nftables script inside this host (one transaction).
    pub fn nft(&self, script: &str) -> Result<(), LabError> {
        let nft = find_tool("nft", "nftables")?;
        let mut cmd = self.command(nft);
        cmd.args(["-f", "-"]);
        run_checked(cmd, script).map(drop)
    }

    /// Drops `percent`% (0.01% resolution) of the UDP datagrams this host receives on `ports`
    /// (all UDP if empty), replacing any earlier loss rule. The kernel's `numgen random` picks
    /// the victims, so system-level loss is random but not seedable; seeded loss is the
    /// in-memory simulator's job.
    pub fn loss_in(&self, ports: &[u16], percent: f64) -> Result<(), LabError> {
        self.nft(&nft::loss_script(ports, percent))
    }

    /// Removes the loss rule.
    pub fn clear_loss(&self) -> Result<(), LabError> {
        self.nft(&nft::clear_script("lab_loss"))
    }

    /// Applies a firewall profile, dropping what it blocks. Replaces any earlier profile.
    pub fn firewall(&self, profile: &Profile) -> Result<(), LabError> {
        self.firewall_with(profile, Action::Drop)
    }

    /// Applies a firewall profile with the given verdict for blocked traffic.
    pub fn firewall_with(&self, profile: &Profile, action: Action) -> Result<(), LabError> {
        self.nft(&nft::firewall_script(profile, action))
    }

    /// Removes the firewall.
    pub fn clear_firewall(&self) -> Result<(), LabError> {
        self.nft(&nft::clear_script("lab_fw"))
    }
}

/// A capture made by [`Host::capture`].
#[derive(Debug)]
pub struct Capture {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Capture {
    /// The next UDP datagram seen, waiting at most `timeout` for a packet (`None`: nothing
    /// arrived, or what arrived was not IPv4 UDP).
    pub fn next_udp(&mut self, timeout: Duration) -> io::Result<Option<sys::CapturedUdp>> {
        Ok(sys::recv_packet(&self.fd, &mut self.buf, timeout)?
            .and_then(|n| sys::parse_udp(&self.buf[..n])))
    }
}

/// A process running inside a lab host; killed and reaped on drop.
#[derive(Debug)]
pub struct LabChild<'lab> {
    child: Option<Child>,
    _lab: std::marker::PhantomData<&'lab Lab>,
}

impl LabChild<'_> {
    fn inner(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until drop")
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("child present until drop").id()
    }

    /// The underlying `Child`, e.g. to take its piped stdout.
    pub fn child(&mut self) -> &mut Child {
        self.inner()
    }

    /// Returns the exit status if the process has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.inner().try_wait()
    }

    /// Waits up to `timeout` for the process to exit (polling every 5 ms).
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let step = Duration::from_millis(5);
        let mut waited = Duration::ZERO;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if waited >= timeout {
                return Ok(None);
            }
            std::thread::sleep(step);
            waited += step;
        }
    }

    /// Waits for the process and collects its piped output.
    pub fn wait_with_output(mut self) -> io::Result<Output> {
        self.child
            .take()
            .expect("child present until drop")
            .wait_with_output()
    }

    /// Kills (SIGKILL) and reaps the process.
    pub fn kill(&mut self) -> io::Result<()> {
        let child = self.inner();
        if child.try_wait()?.is_none() {
            child.kill()?;
        }
        child.wait().map(drop)
    }
}

impl Drop for LabChild<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Re-exported for [`Host::command`] users who need the path of a tool.
pub fn tool_path(tool: &'static str, package: &'static str) -> Result<PathBuf, LabError> {
    find_tool(tool, package)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_packets_parse_as_udp_or_not_at_all() {
        // 20-byte IPv4 header (no options), UDP 10.77.0.2:40000 -> 10.77.0.1:7301, 3 bytes.
        let mut p = vec![
            0x45, 0, 0, 31, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 77, 0, 2, 10, 77, 0, 1,
        ];
        p.extend_from_slice(&[0x9c, 0x40, 0x1c, 0x85, 0, 11, 0, 0, 1, 2, 3]);
        let u = sys::parse_udp(&p).unwrap();
        assert_eq!(u.src, SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), 40000));
        assert_eq!(u.dst, SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7301));
        assert_eq!(u.payload, [1, 2, 3]);
        // Trailing link padding is not payload.
        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 5]);
        assert_eq!(sys::parse_udp(&padded).unwrap().payload, [1, 2, 3]);
        let mut tcp = p.clone();
        tcp[9] = 6;
        assert!(sys::parse_udp(&tcp).is_none());
        let mut fragment = p.clone();
        fragment[6] = 0x20; // more fragments
        assert!(sys::parse_udp(&fragment).is_none());
        assert!(sys::parse_udp(&p[..25]).is_none());
        assert!(sys::parse_udp(&[]).is_none());
    }

    #[test]
    fn missing_tool_names_the_package() {
        let err = find_tool("fleetcast-no-such-tool", "fleetcast-no-such-package").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`fleetcast-no-such-tool`"), "{msg}");
        assert!(
            msg.contains("apt-get install fleetcast-no-such-package"),
            "{msg}"
        );
        assert!(
            find_tool("ip", "iproute2").is_ok(),
            "the lab's own prerequisite"
        );
    }

    #[test]
    fn user_namespace_error_names_the_sysctls() {
        let msg = LabError::UserNamespaces {
            source: io::Error::from_raw_os_error(libc::EPERM),
        }
        .to_string();
        assert!(msg.contains("user.max_user_namespaces"), "{msg}");
        assert!(msg.contains("kernel.unprivileged_userns_clone"), "{msg}");
    }

    #[test]
    fn lab_is_send_and_sync() {
        fn is<T: Send + Sync>() {}
        is::<Lab>();
    }
}
