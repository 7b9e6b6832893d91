//! Helpers of the cell tests (`lab_cell.rs`): gateways sharing one PostgreSQL, and real
//! agents whose commands write to their own logs, so that each test can check every command
//! ran once and in order.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetcast_lab::{Lab, LabChild};

use super::{read_log, wait_for, AgentSpec, Gateway, REBOOT_EXIT};

/// Wall time, to compare with the event log's times (the gateways' wall clocks, on this
/// machine).
#[allow(clippy::disallowed_methods)] // The test's one wall clock read.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes gateway `i`'s configuration: the shared database, its id and address in the cell.
/// The event log is kept whole (`events_max = 0`): the re-home figures read every session.
pub fn gateway_config(dir: &Path, i: usize, url: &str, addr: &str, lease_ms: u64) -> String {
    let p = dir.join(format!("gw{i}.toml"));
    std::fs::write(
        &p,
        format!(
            "[store]\nengine = \"postgres\"\nurl = \"{url}\"\nevents_max = 0\n\n\
             [cell]\ngateway_id = \"gw-{i}\"\nadvertise = \"{addr}\"\nlease_ms = {lease_ms}\n"
        ),
    )
    .expect("gateway config");
    p.display().to_string()
}

/// Gives the gateway whose data directory is `data` the cell's CA (what an operator copies
/// before a new gateway's first start: `docs/operator.md`, running a cell).
pub fn share_ca(from: &Path, data: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = data.join("pki");
    std::fs::create_dir_all(&pki).expect("pki dir");
    for d in [data, pki.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).expect("mode");
    }
    for (f, mode) in [("ca.pem", 0o644), ("ca.key", 0o600)] {
        std::fs::copy(from.join("pki").join(f), pki.join(f)).expect("copy the CA");
        std::fs::set_permissions(pki.join(f), std::fs::Permissions::from_mode(mode)).expect("mode");
    }
}

/// Starts `n` gateways of one cell on the lab's first `n` hosts (data under `dir/gw<i>`),
/// each on database `url` with a lease of `lease_ms`, the first one's CA shared with the
/// others.
pub fn start_gateways<'lab>(
    lab: &'lab Lab,
    dir: &Path,
    n: usize,
    url: &str,
    lease_ms: u64,
) -> Vec<Gateway<'lab>> {
    let mut gws: Vec<Gateway<'lab>> = Vec::new();
    for i in 0..n {
        let gdir = dir.join(format!("gw{i}"));
        std::fs::create_dir_all(&gdir).expect("gateway dir");
        let addr = format!("{}:{}", lab.host(i).addr(), super::PORT);
        let cfg = gateway_config(dir, i, url, &addr, lease_ms);
        if let Some(first) = gws.first() {
            share_ca(&first.data, &gdir.join("gateway"));
        }
        gws.push(Gateway::start(lab.host(i), &gdir, &["--config", &cfg]));
    }
    gws
}

/// Every gateway's diagnostics, for a failure message.
pub fn diag(gws: &[Gateway<'_>]) -> String {
    gws.iter()
        .enumerate()
        .map(|(i, g)| format!("=== gw-{i} ===\n{}", g.diag()))
        .collect()
}

/// Enrols `n` real agents `n0`, `n1`, … through `via`, on the lab's hosts from `first_host`
/// on, each listing every gateway of `gws`.
pub fn enrol_devices<'lab>(
    lab: &'lab Lab,
    dir: &Path,
    gws: &[Gateway<'lab>],
    via: usize,
    n: usize,
    first_host: usize,
) -> Vec<Device<'lab>> {
    let list: Vec<String> = gws.iter().map(|g| g.addr.to_string()).collect();
    (0..n)
        .map(|i| {
            let name = format!("n{i}");
            let token = gws[via].device_add(&name);
            let mut spec = AgentSpec::new(&gws[via], dir, &name, Some(token));
            spec.gateway = list.join(",");
            let agent = Some(spec.spawn(lab.host(first_host + i)));
            Device {
                name,
                spec,
                agent,
                boots: 0,
                queued: Vec::new(),
            }
        })
        .collect()
}

/// A real agent of a cell test, and what it was asked to run.
pub struct Device<'lab> {
    /// Its name.
    pub name: String,
    /// Its arguments and files.
    pub spec: AgentSpec,
    /// The running agent.
    pub agent: Option<LabChild<'lab>>,
    /// Reboots so far.
    pub boots: u32,
    /// Commands queued for it, in order (the words its log must hold).
    pub queued: Vec<String>,
}

impl Device<'_> {
    /// The file its commands append their words to.
    pub fn log(&self) -> std::path::PathBuf {
        self.spec
            .log
            .parent()
            .expect("agent dir")
            .join("commands.log")
    }
}

/// Restarts every agent that exited for a reboot, with a new boot id (what a reboot looks
/// like from the gateway); any other exit fails the test.
pub fn supervise<'lab>(lab: &'lab Lab, devices: &mut [Device<'lab>], gateways: usize) {
    for (i, d) in devices.iter_mut().enumerate() {
        let Some(agent) = d.agent.as_mut() else {
            continue;
        };
        let Some(st) = agent.try_wait().expect("wait agent") else {
            continue;
        };
        assert_eq!(
            st.code(),
            Some(REBOOT_EXIT),
            "agent {} exited with {st}\n{}",
            d.name,
            d.spec.output()
        );
        d.boots += 1;
        d.spec
            .set_boot_id(&format!("00000000-0000-4000-8000-{:012x}", d.boots + 1));
        d.agent = Some(d.spec.spawn(lab.host(gateways + i)));
    }
}

/// Waits for every device's queue to be done (through `gw`, any gateway of the cell), with
/// every command `ok` and its log holding each queued word once, in order. The agents of
/// `devices` run on lab hosts `gateways..`; `diag` adds the gateways' state to a failure.
pub fn drain_and_check<'lab>(
    lab: &'lab Lab,
    gw: &Gateway<'_>,
    devices: &mut [Device<'lab>],
    gateways: usize,
    diag: impl Fn() -> String,
) {
    for i in 0..devices.len() {
        let name = devices[i].name.clone();
        let want = devices[i].queued.len();
        let agent_log = devices[i].spec.log.clone();
        wait_for(
            &format!("{name}'s {want} commands to be done"),
            Duration::from_secs(120),
            || {
                supervise(lab, devices, gateways);
                let q = gw.queue(&name);
                (q["queue"]["status"] == "done"
                    && q["commands"].as_array().is_some_and(|c| c.len() == want))
                .then_some(())
            },
            || {
                format!(
                    "{:#}\n--- agent ---\n{}\n{}",
                    gw.queue(&name),
                    read_log(&agent_log),
                    diag()
                )
            },
        );
        let q = gw.queue(&name);
        for (n, c) in q["commands"]
            .as_array()
            .expect("commands")
            .iter()
            .enumerate()
        {
            assert_eq!(c["state"], "ok", "{name} command {}: {q:#}", n + 1);
        }
        let d = &devices[i];
        let ran: Vec<String> = read_log(&d.log()).lines().map(String::from).collect();
        assert_eq!(
            ran,
            d.queued,
            "{name} ran its commands other than once each, in order\n{}",
            d.spec.output()
        );
    }
}
