//! Where the gateway keeps its data: the store, its CA and keys, and the admin socket.

use std::path::PathBuf;

/// The default data directory: `$FLEETCAST_DATA_DIR`, else `/var/lib/fleetcast` for root,
/// else `$HOME/.local/state/fleetcast`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLEETCAST_DATA_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return PathBuf::from("/var/lib/fleetcast");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/state/fleetcast"),
        None => PathBuf::from("fleetcast-data"),
    }
}
