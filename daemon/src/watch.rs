//! The watched-directory trigger: a file that appears in (or changes in) a watched directory
//! while the gateway runs is pushed to the configured group.
//!
//! [`DirWatch`] is the decision logic, fed with directory listings (time and file system are
//! the driver's): a file is pushed once it has kept the same size and modification time over
//! two consecutive scans (so a file still being copied in is not pushed half-written), and
//! pushed again only when it changes. Files present at the first scan are the baseline and
//! are not pushed; hidden files (`.name`) and `*.part` / `*.tmp` files are ignored.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetcast_store as store;
use fleetcast_wire::Step;

use crate::admin::{parse_step, StepError};

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
    /// Follow-up steps of triggered pushes, one command each, `{file}` unresolved
    /// ([`follow_up_templates`]).
    pub then: Vec<Step<'static>>,
}

/// What stands for the pushed file's name in a `watch.then` step.
pub const FILE_PLACEHOLDER: &str = "{file}";

/// A `watch.then` step that cannot be queued: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("step {index} (`{spec}`): {why}")]
pub struct ThenError {
    /// Its position in the list, from 1.
    pub index: usize,
    /// The step as written.
    pub spec: String,
    /// What is wrong with it.
    pub why: StepError,
}

/// Parses `watch.then` (checked at start, so a bad step stops the gateway there, never at
/// the first push).
pub fn follow_up_templates(specs: &[String]) -> Result<Vec<Step<'static>>, ThenError> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            parse_step(spec).map_err(|why| ThenError {
                index: i + 1,
                spec: spec.clone(),
                why,
            })
        })
        .collect()
}

/// The follow-up commands of the push of `name`: each template with `{file}` resolved, one
/// command per step, in order (the first that fails stops the rest, as `push --then`).
///
/// The name comes from whoever can write into the watched directory, so it never becomes
/// shell text: in a `/bin/sh -c SCRIPT` step (`sh:`), `{file}` turns into `"$1"` and the
/// name is passed as the script's first argument; elsewhere it is a whole argument or path
/// component already (no shell reads an `exec:` argument, and a directory entry holds no
/// `/`).
pub fn follow_ups(templates: &[Step<'static>], name: &str, timeout_ms: u64) -> Vec<store::Command> {
    templates
        .iter()
        .map(|t| store::Command {
            target: None,
            steps: vec![resolve(t, name)],
            timeout_ms,
            max_attempts: 1,
            on_failure: store::OnFailure::Stop,
        })
        .collect()
}

fn resolve(t: &Step<'static>, name: &str) -> Step<'static> {
    let sub = |s: &str| -> Cow<'static, str> { Cow::Owned(s.replace(FILE_PLACEHOLDER, name)) };
    match t {
        Step::Exec { argv }
            if argv.len() == 3
                && argv[0] == "/bin/sh"
                && argv[1] == "-c"
                && argv[2].contains(FILE_PLACEHOLDER) =>
        {
            Step::Exec {
                argv: vec![
                    argv[0].clone(),
                    argv[1].clone(),
                    Cow::Owned(argv[2].replace(FILE_PLACEHOLDER, "\"$1\"")),
                    Cow::Borrowed("fleetcast-watch"),
                    Cow::Owned(name.to_string()),
                ],
            }
        }
        Step::Exec { argv } => Step::Exec {
            argv: argv.iter().map(|a| sub(a)).collect(),
        },
        Step::Fetch { url, path } => Step::Fetch {
            url: sub(url),
            path: sub(path),
        },
        Step::Verify { path, sha256 } => Step::Verify {
            path: sub(path),
            sha256: *sha256,
        },
        Step::Write {
            path,
            mode,
            contents,
        } => Step::Write {
            path: sub(path),
            mode: *mode,
            contents: contents.clone(),
        },
        other => other.clone(),
    }
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

    /// `{file}` is the pushed file's name everywhere, and never shell text: a name made to
    /// break out of a script reaches `sh` as its `$1` only.
    #[test]
    fn follow_ups_name_the_file_and_never_let_it_into_a_script() {
        let specs: Vec<String> = [
            "sh:dpkg -i /var/lib/fleetcast/downloads/{file} && echo done",
            "exec:/usr/bin/install -m 0644 {file} /opt/{file}",
            "verify:/var/lib/fleetcast/downloads/{file}=0000000000000000000000000000000000000000000000000000000000000000",
            "reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let t = follow_up_templates(&specs).unwrap();
        let name = "pkg.deb; rm -rf ~ #";
        let cmds = follow_ups(&t, name, 1000);
        assert_eq!(cmds.len(), 4, "one command per step");
        assert!(cmds
            .iter()
            .all(|c| c.steps.len() == 1 && c.timeout_ms == 1000));
        let argv = |i: usize| match &cmds[i].steps[0] {
            Step::Exec { argv } => argv.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            argv(0),
            [
                "/bin/sh",
                "-c",
                "dpkg -i /var/lib/fleetcast/downloads/\"$1\" && echo done",
                "fleetcast-watch",
                name
            ]
        );
        assert_eq!(
            argv(1),
            [
                "/usr/bin/install",
                "-m",
                "0644",
                name,
                &format!("/opt/{name}")
            ]
        );
        assert!(matches!(&cmds[2].steps[0], Step::Verify { path, .. }
            if path == &format!("/var/lib/fleetcast/downloads/{name}")));
        assert_eq!(cmds[3].steps[0], Step::Reboot);
        // A script without the placeholder is left as written.
        let plain = follow_up_templates(&["sh:true".into()]).unwrap();
        assert_eq!(follow_ups(&plain, name, 1)[0].steps, plain);

        let err = follow_up_templates(&["report".into(), "fetch:/x".into()]).unwrap_err();
        assert_eq!(err.index, 2);
        assert!(
            err.to_string().starts_with("step 2 (`fetch:/x`): "),
            "{err}"
        );
    }

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
