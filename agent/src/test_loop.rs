//! A loop device for tests that run as root (CI does): attached to a backing file with
//! `losetup`, detached when dropped. Tests that get `None` run the same checks on the regular
//! file and say so.

use std::path::{Path, PathBuf};
use std::process::Command;

/// An attached loop device.
pub(crate) struct LoopDevice(PathBuf);

impl LoopDevice {
    /// Attaches `backing`, if this runs as root and `losetup` works.
    pub(crate) fn attach(backing: &Path) -> Option<LoopDevice> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let node = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        eprintln!("ran on loop device {}", node.display());
        Some(LoopDevice(node))
    }

    /// Its node, `/dev/loopN`.
    pub(crate) fn node(&self) -> &Path {
        &self.0
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}
