//! An image push on the device: from the announce's target and map to a checked plan, or to
//! the reason it is refused, before anything is written.
//!
//! Order of the checks, each a [`PlanError`] the task table shows as the device's reason:
//! the target parses, `slot=inactive` becomes the slot the device does not run, the target
//! resolves on this machine (a stable id, never a kernel name), the map decodes (its CRC and
//! every rule of [`ImageMap`]), the agent can decode its form (a compressed image needs
//! feature `zstd`), and the target may take the image ([`Host::check`]: not mounted or held,
//! not the boot device, large enough).

use std::path::{Path, PathBuf};

use fleetcast_wire::image::{Compression, ImageMap, MapError};
use fleetcast_wire::Announce;

use crate::sink::Form;
use crate::slots::{SlotConfig, SlotError};
use crate::target::{Host, Refusal, ResolveError, Target, TargetSpec};
use crate::transfer::safe_name;

/// An image push the device may take: where it goes and how the stream relates to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePlan {
    /// The file or device node written.
    pub path: PathBuf,
    /// The target as named and what it resolved to, for messages (`slot=inactive (slot b,
    /// /dev/sda3)`).
    pub shown: String,
    /// Raw, or the map's sparse or compressed form.
    pub form: Form,
    /// Where a compressed stream is staged (in the downloads directory).
    pub stage: Option<PathBuf>,
    /// SHA-256 the image read back from the target must have.
    pub image_sha256: [u8; 32],
}

/// Why an image push is refused.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The target does not parse or does not resolve.
    #[error("target {target}: {why}")]
    Target {
        /// As named.
        target: String,
        /// Why.
        why: ResolveError,
    },
    /// `slot=inactive` on a device whose running slot cannot be read.
    #[error("target {target}: {why}")]
    Running {
        /// As named.
        target: String,
        /// Why.
        why: SlotError,
    },
    /// The image map does not decode.
    #[error("the image map is not valid: {0}")]
    Map(MapError),
    /// The image is compressed and this agent cannot decode it.
    #[error("the image is compressed and this agent was built without feature `zstd`; push it sparse or raw")]
    NoDecoder,
    /// The target may not take the image.
    #[error("target {target}: {why}")]
    Refused {
        /// As named and resolved.
        target: String,
        /// Why.
        why: Refusal,
    },
}

/// The plan for announce `a`'s image (`a.image` must be set; `None` otherwise), on the
/// machine `host` with the configured `slots`; a compressed stream is staged in `downloads`.
pub fn plan(
    a: &Announce<'_>,
    host: &Host,
    slots: Option<&SlotConfig>,
    downloads: &Path,
) -> Option<Result<ImagePlan, PlanError>> {
    let image = a.image.as_ref()?;
    Some(plan_image(
        a,
        &image.target,
        &image.map,
        host,
        slots,
        downloads,
    ))
}

fn plan_image(
    a: &Announce<'_>,
    named: &str,
    map: &[u8],
    host: &Host,
    slots: Option<&SlotConfig>,
    downloads: &Path,
) -> Result<ImagePlan, PlanError> {
    let target_err = |why| PlanError::Target {
        target: named.into(),
        why,
    };
    let mut spec = TargetSpec::parse(named).map_err(target_err)?;
    let mut slot_note = String::new();
    if spec == TargetSpec::InactiveSlot {
        let s = slots.ok_or(target_err(ResolveError::NoSlots("inactive")))?;
        let running = s.read_running().map_err(|why| PlanError::Running {
            target: named.into(),
            why,
        })?;
        let slot = running.other();
        slot_note = format!("slot {}, ", slot.name());
        spec = TargetSpec::Slot(slot);
    }
    let target = host
        .resolve(&spec, slots.map(|s| &s.targets))
        .map_err(target_err)?;
    let path = match &target {
        Target::File(p) => p.clone(),
        Target::Device { node, .. } => node.clone(),
    };
    let shown = format!("{named} ({slot_note}{})", path.display());
    let (form, image_size, image_sha256) = if map.is_empty() {
        (Form::Raw { size: a.size }, a.size, a.sha256)
    } else {
        let m = ImageMap::decode(map).map_err(PlanError::Map)?;
        let (size, sha) = (m.image_size, m.image_sha256);
        (Form::Image(m), size, sha)
    };
    let compressed =
        matches!(&form, Form::Image(m) if matches!(m.compression, Compression::Zstd { .. }));
    if compressed && !cfg!(feature = "zstd") {
        return Err(PlanError::NoDecoder);
    }
    host.check(&target, image_size)
        .map_err(|why| PlanError::Refused {
            target: shown.clone(),
            why,
        })?;
    let stage = compressed.then(|| {
        downloads.join(format!(
            ".{}.task-{}.stage",
            safe_name(&a.name, a.task_id),
            a.task_id
        ))
    });
    Ok(ImagePlan {
        path,
        shown,
        form,
        stage,
        image_sha256,
    })
}

#[cfg(test)]
mod tests;
