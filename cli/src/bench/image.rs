//! `fleetcast bench --image raw,sparse,compressed`: imaging end to end in the lab. One gateway
//! pushes a generated disk image (`--mib` MiB: 64 KiB stretches of this binary's own bytes,
//! machine code and tables like most of an OS image's data, in 2 of every 5, zeros in the
//! rest) with `--target partlabel=bench-os` to each `--receivers` count of agents at each
//! `--loss`, once per form; every agent writes it to a disk file of its own through the same
//! code as a block device (its report root gives the file a partition label and a size), and
//! reads it back before it reports.
//!
//! Each cell starts with the same image pushed as a plain file (to the downloads directory,
//! no target): each form's time against it is what imaging costs over a file push.
//!
//! Per row: image bytes per second to disk per device (the image's bytes over the time from
//! the push to the slowest verified read-back), datagram bytes per image byte (the form's
//! wire cost: about 1 raw, the data share sparse, less compressed), and the agents' CPU
//! seconds per GiB of image each (receiving, decoding, writing and reading back).

use std::path::Path;

use fleetcast_daemon::gateway::Clock;
use fleetcast_lab::{Lab, LabConfig};
use serde_json::{json, Value};

use super::{at, push_request, round, BenchError, Fleet, Plan, MCAST_PORT};
use crate::image::{image_push, ImageForm};

/// The partition label every bench agent's disk has.
pub const LABEL: &str = "bench-os";

/// One measured image push.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRow {
    /// raw, sparse or compressed.
    pub form: &'static str,
    /// Receivers.
    pub receivers: usize,
    /// Loss per receiver, percent.
    pub loss: f64,
    /// Bytes of the image.
    pub image_bytes: u64,
    /// Bytes of the stream the form sends (the task's size).
    pub stream_bytes: u64,
    /// Datagram bytes the multicast senders handed out per image byte.
    pub datagram_bytes_per_image_byte: f64,
    /// Image bytes per second to disk per device, MiB/s.
    pub image_mib_s: f64,
    /// Time from the push to the slowest verified read-back, seconds.
    pub slowest_s: f64,
    /// Agent CPU seconds per GiB of image, per device.
    pub cpu_per_gib_s: f64,
    /// Seconds `image prepare` took on the gateway's side (0 when cached or raw).
    pub prepare_s: f64,
}

impl ImageRow {
    /// The row as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "form": self.form,
            "receivers": self.receivers,
            "loss_percent": self.loss,
            "image_bytes": self.image_bytes,
            "stream_bytes": self.stream_bytes,
            "datagram_bytes_per_image_byte": round(self.datagram_bytes_per_image_byte, 4),
            "image_mib_s_per_device": round(self.image_mib_s, 1),
            "slowest_completion_s": round(self.slowest_s, 2),
            "agent_cpu_s_per_gib": round(self.cpu_per_gib_s, 2),
            "prepare_s": round(self.prepare_s, 2),
        })
    }
}

/// A report root for an agent whose disk is `disk` (a regular file of `size` bytes): its
/// own sysfs giving the disk's size, a `/dev` whose node is the file and whose
/// `disk/by-partlabel/bench-os` names it, and a mount table with only `/` (elsewhere).
pub(super) fn disk_root(root: &Path, disk: &Path, size: u64) -> Result<(), BenchError> {
    let sys = root.join("sys/block/benchdisk");
    let by_label = root.join("dev/disk/by-partlabel");
    for d in [&sys, &by_label, &root.join("proc/self")] {
        std::fs::create_dir_all(d).map_err(at(d))?;
    }
    let put = |p: &Path, text: String| std::fs::write(p, text).map_err(at(p));
    put(&sys.join("size"), format!("{}\n", size.div_ceil(512)))?;
    put(&sys.join("dev"), "250:0\n".into())?;
    put(
        &root.join("proc/self/mountinfo"),
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n".into(),
    )?;
    let f = std::fs::File::create(disk).map_err(at(disk))?;
    f.set_len(size).map_err(at(disk))?;
    let node = root.join("dev/benchdisk");
    let _ = std::fs::remove_file(&node);
    std::os::unix::fs::symlink(disk, &node).map_err(at(&node))?;
    let link = by_label.join(LABEL);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("../../benchdisk", &link).map_err(at(&link))
}

/// The benchmark's image: `len` bytes, 64 KiB stretches of this binary's bytes in 2 of every 5.
fn write_image(path: &Path, exe: &Path, len: usize) -> Result<(), BenchError> {
    let code = std::fs::read(exe).map_err(at(exe))?;
    let mut img = vec![0u8; len];
    for (k, stretch) in img.chunks_mut(64 << 10).enumerate() {
        if k % 5 < 2 {
            let from = (k * (64 << 10)) % code.len().saturating_sub(64 << 10).max(1);
            let n = stretch.len().min(code.len() - from);
            stretch[..n].copy_from_slice(&code[from..from + n]);
        }
    }
    std::fs::write(path, img).map_err(at(path))
}

/// Runs the image benchmark: each receiver count, loss and form of `plan` (first MTU only).
pub fn run(
    plan: &Plan,
    forms: &[ImageForm],
    log: &mut dyn FnMut(&str),
) -> Result<Vec<ImageRow>, BenchError> {
    let clock = Clock::new();
    std::fs::create_dir_all(&plan.work).map_err(at(&plan.work))?;
    let src = plan.work.join("disk.img");
    write_image(&src, &plan.exe, plan.mib << 20)?;
    let mtu = plan.mtus.first().copied().unwrap_or(1500);
    let max_n = plan.receivers.iter().copied().max().unwrap_or(1);
    let lab = Lab::new(LabConfig {
        mtu,
        ..LabConfig::hosts(max_n + 1)
    })
    .map_err(BenchError::Lab)?;
    let mut rows = Vec::new();
    for &n in &plan.receivers {
        let dir = plan.work.join(format!("image-n{n}"));
        let disk = Some(((plan.mib as u64) << 20) + (1 << 20));
        let fleet = Fleet::start_with_disks(&lab, plan, &dir, n, &clock, disk)?;
        for &loss in &plan.loss {
            // The same image as a plain file to the downloads directory first: the ratio of
            // each form's time to it is what imaging costs over a file push, same run.
            let baseline = std::iter::once(None);
            for form in baseline.chain(forms.iter().copied().map(Some)) {
                let row = push_image(&fleet, &lab, plan, &src, (mtu, n, loss, form), &clock)?;
                log(&format!(
                    "{n} receivers, {loss}% loss, {}: {:.1} MiB/s of image per device, {:.3} datagram B per image B, \
                     slowest {:.1} s, agent CPU {:.2} s/GiB, prepare {:.1} s",
                    row.form,
                    row.image_mib_s,
                    row.datagram_bytes_per_image_byte,
                    row.slowest_s,
                    row.cpu_per_gib_s,
                    row.prepare_s
                ));
                rows.push(row);
            }
        }
        drop(fleet);
        if std::env::var_os("FLEETCAST_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(rows)
}

fn form_name(f: Option<ImageForm>) -> &'static str {
    match f {
        None => "file (downloads, no target)",
        Some(ImageForm::Raw) => "raw",
        Some(ImageForm::Sparse) => "sparse",
        Some(ImageForm::Compressed) => "compressed",
    }
}

/// One image push of `src` in `form` (`None`: as a plain file), measured.
fn push_image(
    fleet: &Fleet<'_>,
    lab: &Lab,
    plan: &Plan,
    src: &Path,
    (mtu, n, loss, form): (u32, usize, f64, Option<ImageForm>),
    clock: &Clock,
) -> Result<ImageRow, BenchError> {
    for i in 1..=n {
        let h = lab.host(i);
        h.clear_loss().map_err(BenchError::Loss)?;
        if loss > 0.0 {
            h.loss_in(&[MCAST_PORT], loss).map_err(BenchError::Loss)?;
        }
    }
    let image_bytes = std::fs::metadata(src).map_err(at(src))?.len();
    let p0 = clock.read().0;
    let cache = plan.work.join("image-cache");
    let (stream, image) = match form {
        Some(f) => {
            let target = format!("partlabel={LABEL}");
            let (stream, image) = image_push(src, &target, f, 1 << 20, &cache).map_err(Box::new)?;
            (stream, Some(image))
        }
        None => {
            // A fresh copy each time: a file already in the downloads would be re-verified.
            for (_, state) in &fleet.agents {
                let _ = std::fs::remove_dir_all(state.join("downloads"));
            }
            (src.to_owned(), None)
        }
    };
    let prepare_s = (clock.read().0 - p0).as_secs_f64();
    let stream_bytes = std::fs::metadata(&stream).map_err(at(&stream))?.len();
    let (_, cpu_a0) = fleet.cpu();
    let dg0 = fleet.datagram_bytes()?;
    let t0 = clock.read().0;
    let r = fleet.admin(&push_request(&stream, mtu, n, 1000, image))?;
    let task = r["task"].as_u64().ok_or(BenchError::Missing("task id"))?;
    fleet.wait_completed(task, n, t0 + plan.timeout, plan.timeout, clock)?;
    let secs = (clock.read().0 - t0).as_secs_f64();
    let (_, cpu_a1) = fleet.cpu();
    let dg1 = fleet.datagram_bytes()?;
    let gib = image_bytes as f64 / f64::from(1u32 << 30);
    Ok(ImageRow {
        form: form_name(form),
        receivers: n,
        loss,
        image_bytes,
        stream_bytes,
        datagram_bytes_per_image_byte: dg1.saturating_sub(dg0) as f64 / image_bytes as f64,
        image_mib_s: image_bytes as f64 / f64::from(1u32 << 20) / secs.max(1e-9),
        slowest_s: secs,
        cpu_per_gib_s: (cpu_a1 - cpu_a0) / n as f64 / gib,
        prepare_s,
    })
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[ImageRow]) -> String {
    let mut s = String::from(
        "| receivers | loss | form | stream bytes / image bytes | datagram B / image B | image MiB/s per device | slowest s | agent CPU s/GiB | prepare s |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {}% | {} | {:.3} | {:.3} | {:.1} | {:.1} | {:.2} | {:.1} |\n",
            r.receivers,
            r.loss,
            r.form,
            r.stream_bytes as f64 / r.image_bytes.max(1) as f64,
            r.datagram_bytes_per_image_byte,
            r.image_mib_s,
            r.slowest_s,
            r.cpu_per_gib_s,
            r.prepare_s
        ));
    }
    s
}
