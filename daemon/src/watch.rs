//! The watched-directory trigger: a file that appears in (or changes in) a watched directory
//! while the gateway runs is pushed to the configured group.
//!
//! [`DirWatch`] is the decision logic, fed with directory listings (time and file system are
//! the driver's): a file is pushed once it has kept the same size and modification time over
//! two consecutive scans (so a file still being copied in is not pushed half-written), and
//! pushed again only when it changes. Files present at the first scan are the baseline and
//! are not pushed; hidden files (`.name`) and `*.part` / `*.tmp` files are ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the gateway watches.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The directory.
    pub dir: PathBuf,
    /// Target group of every push it triggers.
    pub group: String,
    /// Scan interval.
    pub interval: Duration,
    /// Rate ceiling of triggered pushes, Mbit/s.
    pub rate_mbps: u64,
    /// Block size of triggered pushes.
    pub block_size: u32,
}

/// One directory entry as a scan saw it: (size, modification time in ns).
pub type Stamp = (u64, i128);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Seen with this stamp once; pushed if the next scan sees the same.
    Settling(Stamp),
    /// Pushed (or baseline) with this stamp.
    Done(Stamp),
}

/// The watch's memory of the directory.
#[derive(Debug, Default)]
pub struct DirWatch {
    files: HashMap<String, State>,
    primed: bool,
}

impl DirWatch {
    /// A watch that takes its first scan as the baseline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one scan (file name → stamp); returns the names to push now, sorted.
    pub fn scan(&mut self, entries: &[(String, Stamp)]) -> Vec<String> {
        let mut out = Vec::new();
        let mut present = HashMap::with_capacity(entries.len());
        for (name, stamp) in entries {
            if ignored(name) {
                continue;
            }
            present.insert(name.clone(), ());
            let next = match (self.primed, self.files.get(name)) {
                (false, _) => State::Done(*stamp),
                (true, None) => State::Settling(*stamp),
                (true, Some(State::Done(s))) if s == stamp => State::Done(*s),
                (true, Some(State::Done(_))) => State::Settling(*stamp),
                (true, Some(State::Settling(s))) if s == stamp => {
                    out.push(name.clone());
                    State::Done(*s)
                }
                (true, Some(State::Settling(_))) => State::Settling(*stamp),
            };
            self.files.insert(name.clone(), next);
        }
        self.files.retain(|n, _| present.contains_key(n));
        self.primed = true;
        out.sort();
        out
    }
}

fn ignored(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".part") || name.ends_with(".tmp")
}

/// Lists the regular files of `dir` with their stamps (unreadable entries are skipped).
pub fn list(dir: &Path) -> std::io::Result<Vec<(String, Stamp)>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let Ok(e) = e else { continue };
        let Ok(md) = e.metadata() else { continue };
        if !md.is_file() {
            continue;
        }
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        let mtime = i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec());
        out.push((name, (md.len(), mtime)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(list: &[(&str, u64, i128)]) -> Vec<(String, Stamp)> {
        list.iter()
            .map(|&(n, s, t)| (n.to_string(), (s, t)))
            .collect()
    }

    #[test]
    fn baseline_settling_changes_and_ignored_names() {
        let mut w = DirWatch::new();
        // The first scan is the baseline.
        assert!(w.scan(&e(&[("old.img", 10, 1)])).is_empty());
        // A new file is pushed only once it stopped changing.
        assert!(w
            .scan(&e(&[("old.img", 10, 1), ("new.img", 5, 2)]))
            .is_empty());
        assert!(w
            .scan(&e(&[("old.img", 10, 1), ("new.img", 9, 3)]))
            .is_empty());
        assert_eq!(
            w.scan(&e(&[("old.img", 10, 1), ("new.img", 9, 3)])),
            ["new.img"]
        );
        // Unchanged: not again.
        assert!(w
            .scan(&e(&[("old.img", 10, 1), ("new.img", 9, 3)]))
            .is_empty());
        // A change to the baseline file is a change like any other.
        assert!(w
            .scan(&e(&[("old.img", 11, 4), ("new.img", 9, 3)]))
            .is_empty());
        assert_eq!(
            w.scan(&e(&[("old.img", 11, 4), ("new.img", 9, 3)])),
            ["old.img"]
        );
        // Removed and re-added: pushed again once settled.
        assert!(w.scan(&e(&[("old.img", 11, 4)])).is_empty());
        assert!(w
            .scan(&e(&[("old.img", 11, 4), ("new.img", 9, 3)]))
            .is_empty());
        assert_eq!(
            w.scan(&e(&[("old.img", 11, 4), ("new.img", 9, 3)])),
            ["new.img"]
        );
        // Hidden and partial files never count.
        let skip = e(&[(".x", 1, 1), ("a.part", 1, 1), ("b.tmp", 1, 1)]);
        assert!(w.scan(&skip).is_empty());
        assert!(w.scan(&skip).is_empty());
    }

    #[test]
    fn list_reads_regular_files_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"abc").unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let l = list(d.path()).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].0.as_str(), l[0].1 .0), ("f", 3));
    }
}
