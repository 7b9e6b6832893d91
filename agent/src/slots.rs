//! The A/B slot configuration: the `[slot]` section of the agent's configuration file (or of
//! the file `slots` names), checked when the agent starts.
//!
//! ```toml
//! [slot]
//! a = "partlabel=rootfs-a"                # each slot is a target (see target.rs)
//! b = "partlabel=rootfs-b"
//! a_name = "0"                            # what {slot} becomes for a (default "a")
//! b_name = "1"
//! running_command = ["fw_printenv", "-n", "slot"]   # prints the running slot's name
//! # or: running_file = "/run/fleetcast/slot"        # holds it
//! boot_once = ["grub-reboot", "{slot}"]   # try a slot on the next boot only
//! set_default = ["grub-set-default", "{slot}"]      # keep it
//! health_check = ["/usr/local/bin/healthy"]         # exit 0 when the new slot is good
//! health_deadline_secs = "600"            # from the reboot to a healthy new slot
//! ```
//!
//! The section's syntax is the file's (double-quoted strings, lists of them on one line), and
//! it comes last: another section after it is refused. Two kinds of check, each naming the
//! key and what it takes:
//! - when the file is read ([`parse_section`]): unknown or repeated keys, values, a slot that
//!   is not a target, both or neither of `running_file` / `running_command`, a missing
//!   command, a `boot_once` / `set_default` without `{slot}` (it could not tell the slots apart);
//! - when the agent starts ([`SlotConfig::check`]): each command's program exists and is
//!   executable, both slots resolve on this machine and to two different targets, and the
//!   running-slot file exists.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::config::{list, string, ValueError};
use crate::target::{Host, ResolveError, Slot, SlotTargets, Target, TargetSpec};

/// One key of the `[slot]` section.
#[derive(Debug, Clone, Copy)]
pub struct SlotKey {
    /// Its name.
    pub name: &'static str,
    /// A list of strings (a command), else one string.
    pub list: bool,
}

const fn k(name: &'static str, list: bool) -> SlotKey {
    SlotKey { name, list }
}

/// The `[slot]` section's keys.
pub const SLOT_KEYS: &[SlotKey] = &[
    k("a", false),
    k("b", false),
    k("a_name", false),
    k("b_name", false),
    k("running_file", false),
    k("running_command", true),
    k("boot_once", true),
    k("set_default", true),
    k("health_check", true),
    k("health_deadline_secs", false),
];

fn slot_key_names() -> String {
    SLOT_KEYS
        .iter()
        .map(|k| k.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The default health deadline, seconds: long enough for a server's firmware and a full boot.
pub const DEFAULT_HEALTH_DEADLINE_SECS: u64 = 600;

/// What is wrong with the `[slot]` configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// A key the section does not have.
    #[error("unknown key `{0}` in [slot]; the keys are {names}", names = slot_key_names())]
    UnknownKey(String),
    /// Neither a comment nor `key = value`.
    #[error("expected `key = \"value\"` in [slot], got `{0}`")]
    NotKeyValue(String),
    /// A section after `[slot]`.
    #[error("[slot] is the last section; `{0}` cannot follow it")]
    SectionAfter(String),
    /// A key set twice.
    #[error("key `slot.{0}` is set twice")]
    Twice(&'static str),
    /// A value's syntax, or a number out of range.
    #[error("key `slot.{key}`: {problem}")]
    Value {
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: ValueError,
    },
    /// Something after the value.
    #[error("key `slot.{0}`: unexpected text after the value")]
    Trailing(&'static str),
    /// A slot's value is not a target.
    #[error("key `slot.{key}`: {problem}")]
    Target {
        /// `a` or `b`.
        key: &'static str,
        /// Why.
        problem: ResolveError,
    },
    /// A required key is missing.
    #[error("[slot] needs `{0}`: {what}", what = missing_what(.0))]
    Missing(&'static str),
    /// Both ways of learning the running slot.
    #[error("[slot] takes one of running_file and running_command, not both")]
    RunningTwice,
    /// A bootloader command that does not say which slot.
    #[error("key `slot.{0}`: the command must contain {{slot}} (replaced by the slot's name), or it cannot tell the slots apart")]
    NoPlaceholder(&'static str),
    /// Both slots have the same name.
    #[error("[slot] a_name and b_name are the same ({0}); the running slot could not be told")]
    SameName(String),
    /// A command's program is not there.
    #[error(
        "key `slot.{key}`: program `{program}` is not an executable file here (looked in {looked})"
    )]
    ProgramNotFound {
        /// The key.
        key: &'static str,
        /// The program.
        program: String,
        /// Where it was looked for.
        looked: String,
    },
    /// A slot's target does not resolve on this machine.
    #[error("slot {slot} ({spec}) does not resolve: {problem}")]
    DoesNotResolve {
        /// `a` or `b`.
        slot: &'static str,
        /// Its target.
        spec: String,
        /// Why.
        problem: ResolveError,
    },
    /// Both slots resolve to one target.
    #[error("slots a and b are the same target ({0:?})")]
    SameTarget(String),
    /// `running_file` is not there.
    #[error("key `slot.running_file`: {0} does not exist")]
    RunningFileMissing(PathBuf),
    /// The running-slot source could not be read (the file, or the command did not run or
    /// failed).
    #[error("cannot learn the running slot from {source_name}: {why}")]
    RunningUnreadable {
        /// The file or the command, as configured.
        source_name: String,
        /// Why.
        why: String,
    },
    /// What the running-slot source said is neither slot's name.
    #[error("the running slot is `{said}`, which is neither a_name ({a}) nor b_name ({b})")]
    UnknownRunning {
        /// What it said (trimmed).
        said: String,
        /// Slot a's name.
        a: String,
        /// Slot b's name.
        b: String,
    },
}

fn missing_what(key: &str) -> &'static str {
    match key {
        "a" | "b" => "each slot's target, e.g. a = \"partlabel=rootfs-a\"",
        "running_file" => "running_file (a file holding the running slot's name) or running_command (a command printing it)",
        "boot_once" => "the command making the bootloader try a slot once, e.g. [\"grub-reboot\", \"{slot}\"]",
        "set_default" => "the command making a slot the default, e.g. [\"grub-set-default\", \"{slot}\"]",
        "health_check" => "the command that exits 0 when the new slot is healthy",
        _ => "it is required",
    }
}

/// How the agent learns which slot it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Running {
    /// A file holding the slot's name.
    File(PathBuf),
    /// A command printing it.
    Command(Vec<String>),
}

/// The checked `[slot]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotConfig {
    /// The two targets.
    pub targets: SlotTargets,
    /// What `{slot}` becomes, and what the running-slot source says, for a and b.
    pub names: [String; 2],
    /// How to learn the running slot.
    pub running: Running,
    /// Try a slot once.
    pub boot_once: Vec<String>,
    /// Make a slot the default.
    pub set_default: Vec<String>,
    /// Exit 0 when healthy.
    pub health_check: Vec<String>,
    /// From the reboot to a healthy new slot.
    pub health_deadline_secs: u64,
}

/// A `[slot]` problem at a line of the file (the `[slot]` header's for a missing key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionError {
    /// The line (from 1).
    pub line: usize,
    /// What is wrong.
    pub problem: SlotError,
}

type Values = std::collections::BTreeMap<&'static str, (usize, Vec<String>)>;

/// Parses the `[slot]` section of `text`, if the file has one.
pub fn parse_section(text: &str) -> Result<Option<SlotConfig>, SectionError> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
    let Some((header, _)) = lines.by_ref().find(|(_, l)| *l == "[slot]") else {
        return Ok(None);
    };
    let mut values = Values::new();
    for (line, l) in lines {
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let at = |problem| SectionError { line, problem };
        let (key, v) = slot_line(l, &values).map_err(at)?;
        values.insert(key, (line, v));
    }
    build(values)
        .map(Some)
        .map_err(|(line, problem)| SectionError {
            line: line.unwrap_or(header),
            problem,
        })
}

fn slot_line(l: &str, seen: &Values) -> Result<(&'static str, Vec<String>), SlotError> {
    if l.starts_with('[') {
        return Err(SlotError::SectionAfter(l.into()));
    }
    let (k, v) = l
        .split_once('=')
        .ok_or_else(|| SlotError::NotKeyValue(l.into()))?;
    let k = k.trim();
    let key = SLOT_KEYS
        .iter()
        .find(|s| s.name == k)
        .ok_or_else(|| SlotError::UnknownKey(k.into()))?;
    let bad = |problem| SlotError::Value {
        key: key.name,
        problem,
    };
    let (value, rest) = if key.list {
        list(v.trim()).map_err(bad)?
    } else {
        let (s, rest) = string(v.trim()).map_err(bad)?;
        (vec![s], rest)
    };
    let rest = rest.trim_start();
    if !(rest.is_empty() || rest.starts_with('#')) {
        return Err(SlotError::Trailing(key.name));
    }
    if seen.contains_key(key.name) {
        return Err(SlotError::Twice(key.name));
    }
    if value.iter().any(String::is_empty) || value.is_empty() {
        return Err(bad(if key.list {
            ValueError::NoProgram
        } else {
            ValueError::Empty
        }));
    }
    Ok((key.name, value))
}

type Bad = (Option<usize>, SlotError);

/// Slot `key`'s target.
fn target(v: &mut Values, key: &'static str) -> Result<TargetSpec, Bad> {
    let (line, s) = v.remove(key).ok_or((None, SlotError::Missing(key)))?;
    match TargetSpec::parse(&s[0]) {
        Ok(TargetSpec::Slot(_) | TargetSpec::InactiveSlot) => Err((
            Some(line),
            SlotError::Target {
                key,
                problem: ResolveError::SlotOfSlot(key),
            },
        )),
        Ok(t) => Ok(t),
        Err(problem) => Err((Some(line), SlotError::Target { key, problem })),
    }
}

/// Command `key`, which must say `{slot}` when `placeholder`.
fn command(v: &mut Values, key: &'static str, placeholder: bool) -> Result<Vec<String>, Bad> {
    let (line, c) = v.remove(key).ok_or((None, SlotError::Missing(key)))?;
    if placeholder && !c.iter().any(|w| w.contains("{slot}")) {
        return Err((Some(line), SlotError::NoPlaceholder(key)));
    }
    Ok(c)
}

/// The section's values, checked; errors carry the line of the key they are about.
fn build(mut v: Values) -> Result<SlotConfig, Bad> {
    let targets = SlotTargets {
        a: target(&mut v, "a")?,
        b: target(&mut v, "b")?,
    };
    let mut name = |key, d: &str| v.remove(key).map_or(d.to_owned(), |(_, s)| s[0].clone());
    let names = [name("a_name", "a"), name("b_name", "b")];
    if names[0] == names[1] {
        return Err((None, SlotError::SameName(names[0].clone())));
    }
    let running = match (v.remove("running_file"), v.remove("running_command")) {
        (Some(_), Some((line, _))) => return Err((Some(line), SlotError::RunningTwice)),
        (Some((_, f)), None) => Running::File(PathBuf::from(&f[0])),
        (None, Some((_, c))) => Running::Command(c),
        (None, None) => return Err((None, SlotError::Missing("running_file"))),
    };
    let boot_once = command(&mut v, "boot_once", true)?;
    let set_default = command(&mut v, "set_default", true)?;
    let health_check = command(&mut v, "health_check", false)?;
    let health_deadline_secs = match v.remove("health_deadline_secs") {
        None => DEFAULT_HEALTH_DEADLINE_SECS,
        Some((line, s)) => deadline(&s[0]).map_err(|problem| {
            (
                Some(line),
                SlotError::Value {
                    key: "health_deadline_secs",
                    problem,
                },
            )
        })?,
    };
    Ok(SlotConfig {
        targets,
        names,
        running,
        boot_once,
        set_default,
        health_check,
        health_deadline_secs,
    })
}

fn deadline(s: &str) -> Result<u64, ValueError> {
    crate::config::number_in(s, 10, 86_400, "seconds")
}

impl SlotConfig {
    /// `slot`'s name (what `{slot}` becomes).
    pub fn name(&self, slot: Slot) -> &str {
        match slot {
            Slot::A => &self.names[0],
            Slot::B => &self.names[1],
        }
    }

    /// `cmd` with every `{slot}` replaced by `slot`'s name.
    pub fn command_for(&self, cmd: &[String], slot: Slot) -> Vec<String> {
        cmd.iter()
            .map(|w| w.replace("{slot}", self.name(slot)))
            .collect()
    }

    /// The slot the running-slot source's output (or file) names.
    pub fn running_slot(&self, said: &str) -> Result<Slot, SlotError> {
        let said = said.trim();
        [Slot::A, Slot::B]
            .into_iter()
            .find(|s| self.name(*s) == said)
            .ok_or_else(|| SlotError::UnknownRunning {
                said: said.into(),
                a: self.names[0].clone(),
                b: self.names[1].clone(),
            })
    }

    /// The slot the device runs now: the running-slot file's contents, or the running-slot
    /// command's standard output (it must exit 0), matched against the slots' names.
    pub fn read_running(&self) -> Result<Slot, SlotError> {
        let said = match &self.running {
            Running::File(p) => {
                std::fs::read_to_string(p).map_err(|e| SlotError::RunningUnreadable {
                    source_name: p.display().to_string(),
                    why: e.to_string(),
                })?
            }
            Running::Command(cmd) => {
                let unreadable = |why: String| SlotError::RunningUnreadable {
                    source_name: cmd.join(" "),
                    why,
                };
                let (prog, args) = cmd
                    .split_first()
                    .ok_or_else(|| unreadable("empty".into()))?;
                let out = std::process::Command::new(prog)
                    .args(args)
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .map_err(|e| unreadable(e.to_string()))?;
                if !out.status.success() {
                    return Err(unreadable(format!("it exited with {}", out.status)));
                }
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
        };
        self.running_slot(&said)
    }

    /// The checks against this machine (see the module doc): `host` for the slots, `path`
    /// (`PATH`'s value) for programs named without a directory.
    pub fn check(&self, host: &Host, path: Option<&OsStr>) -> Result<[Target; 2], SlotError> {
        let mut commands = vec![
            ("boot_once", &self.boot_once),
            ("set_default", &self.set_default),
            ("health_check", &self.health_check),
        ];
        match &self.running {
            Running::Command(c) => commands.push(("running_command", c)),
            Running::File(f) if !f.exists() => {
                return Err(SlotError::RunningFileMissing(f.clone()))
            }
            Running::File(_) => {}
        }
        for (key, cmd) in commands {
            let program = &cmd[0];
            if find_program(program, path).is_none() {
                let looked = if program.contains('/') {
                    "that path".to_owned()
                } else {
                    format!(
                        "PATH={}",
                        path.map_or(String::new(), |p| p.to_string_lossy().into_owned())
                    )
                };
                return Err(SlotError::ProgramNotFound {
                    key,
                    program: program.clone(),
                    looked,
                });
            }
        }
        let resolve = |slot: Slot| {
            let spec = self.targets.get(slot);
            host.resolve(spec, None)
                .map_err(|problem| SlotError::DoesNotResolve {
                    slot: slot.name(),
                    spec: spec.to_string(),
                    problem,
                })
        };
        let (a, b) = (resolve(Slot::A)?, resolve(Slot::B)?);
        if a == b {
            return Err(SlotError::SameTarget(self.targets.a.to_string()));
        }
        Ok([a, b])
    }
}

/// `program` as run: a path with a `/` as it is, else the first executable file of that name
/// in `path`'s directories.
pub fn find_program(program: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return runnable(&p).then_some(p);
    }
    std::env::split_paths(path?)
        .map(|d| d.join(program))
        .find(|p| runnable(p))
}

/// Reads the `[slot]` section of the file at `path` (the agent's `slots` setting).
pub fn load(path: &Path) -> Result<SlotConfig, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    match parse_section(&text) {
        Ok(Some(c)) => Ok(c),
        Ok(None) => Err(LoadError::NoSection(path.to_owned())),
        Err(e) => Err(LoadError::Section {
            path: path.to_owned(),
            line: e.line,
            problem: Box::new(e.problem),
        }),
    }
}

/// Why the slot configuration could not be loaded or does not fit this machine.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file cannot be read.
    #[error("cannot read the slot configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file has no `[slot]` section.
    #[error("{0} has no [slot] section")]
    NoSection(PathBuf),
    /// A line of the section.
    #[error("{path}, line {line}: {problem}")]
    Section {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// What is wrong.
        problem: Box<SlotError>,
    },
    /// The section is well formed but does not fit this machine.
    #[error("{path}: {problem}")]
    Check {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: Box<SlotError>,
    },
}

/// Loads the slot configuration at `path` and checks it against the machine under `root`
/// (what the agent does at start when `slots` is set).
pub fn load_checked(
    path: &Path,
    root: &Path,
    env_path: Option<&OsStr>,
) -> Result<SlotConfig, LoadError> {
    let c = load(path)?;
    c.check(&Host::new(root), env_path)
        .map_err(|problem| LoadError::Check {
            path: path.to_owned(),
            problem: Box::new(problem),
        })?;
    Ok(c)
}

#[cfg(test)]
mod tests;
