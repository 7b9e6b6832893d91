//! `fleetcast-agent`'s configuration file, environment overrides and `--print-config`.
//!
//! The file is a flat subset of TOML, parsed by hand to keep the agent small (no serde, no
//! toml crate): one `key = value` per line, `#` comments, blank lines; a value is a
//! double-quoted string (escapes `\"`, `\\`, `\n`, `\t`) or, for [`Key::list`] keys, an array of
//! them on one line (`["a", "b"]`). Anything else is an error naming the line, the key and the
//! problem; unknown keys are refused. The one section is `[slot]`, last in the file: its lines
//! are `slots.rs`'s to parse when the agent starts, and its presence sets `slots` to this file.
//!
//! Precedence, lowest first: the file (`--config FILE`), environment variables
//! `FLEETCAST_AGENT_<KEY>` ([`env_var`]), command-line flags. The merge works on arguments:
//! [`expand`] turns the file and the environment into the equivalent flags, placed before the
//! command line's own (the parser keeps the last value of a flag, so the command line wins);
//! `reboot_command`, whose flag takes the rest of the line, goes last, and only when the
//! command line has no `--reboot-command`.

use std::collections::BTreeMap;
use std::io;

use crate::ladder::ProxyError;

/// A configuration (file, environment, flags) the agent cannot run with: each variant names
/// where the value came from, and says what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A line of the file.
    #[error("{path}, line {line}: {problem}")]
    Line {
        /// The file as given.
        path: String,
        /// The line (from 1).
        line: usize,
        /// What is wrong.
        problem: LineError,
    },
    /// An environment variable's value does not fit its key.
    #[error("environment variable {var} (key `{key}`): {problem}")]
    Env {
        /// The variable.
        var: String,
        /// Its key.
        key: &'static str,
        /// What is wrong.
        problem: ValueError,
    },
    /// A flag's value does not fit its key.
    #[error("{flag}: {problem}")]
    Flag {
        /// The flag as given.
        flag: String,
        /// What is wrong.
        problem: ValueError,
    },
    /// A flag that takes a value is the last argument.
    #[error("{0} needs a value")]
    FlagWithoutValue(String),
    /// `--config` is the last argument.
    #[error("--config needs a file")]
    NoConfigFile,
    /// The file cannot be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file as given.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// `token` without `name`, or the other way round.
    #[error("configuration key `token`: token and name go together")]
    TokenWithoutName,
}

/// What is wrong with a line of the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// A `[section]` header.
    #[error("sections are not supported: every key is at the top level (`{0}`)")]
    Section(String),
    /// Neither a comment nor `key = value`.
    #[error("expected `key = \"value\"`, got `{0}`")]
    NotKeyValue(String),
    /// A key the agent does not know.
    #[error("unknown key `{0}`; the keys are {names}", names = key_names())]
    UnknownKey(String),
    /// A string key's value without its quotes (the usual mistake).
    #[error("key `{key}`: expected a double-quoted string, got `{raw}`; values are strings: {key} = \"{raw}\"")]
    Unquoted {
        /// The key.
        key: &'static str,
        /// The value as written.
        raw: String,
    },
    /// The value does not parse, or the key does not take it.
    #[error("key `{key}`: {problem}")]
    Value {
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: ValueError,
    },
    /// Something after the value.
    #[error("key `{key}`: unexpected `{rest}` after the value")]
    Trailing {
        /// The key.
        key: &'static str,
        /// What follows the value.
        rest: String,
    },
    /// The key is set on an earlier line too.
    #[error("key `{0}` is set twice")]
    Twice(&'static str),
}

/// What is wrong with one value: its syntax in the file, or what its key takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A string value without its opening quote.
    #[error("expected a double-quoted string, got `{0}`")]
    NotQuoted(String),
    /// An escape other than `\"`, `\\`, `\n`, `\t`.
    #[error("unsupported escape `\\{0}`")]
    Escape(char),
    /// No closing quote on the line.
    #[error("unterminated string (a value is on one line)")]
    Unterminated,
    /// A list key's value that is not `[...]`.
    #[error("expected a list like [\"a\", \"b\"], got `{0}`")]
    NotAList(String),
    /// List items not separated by commas.
    #[error("expected `,` or `]` in the list")]
    ListSeparator,
    /// An empty string.
    #[error("is empty")]
    Empty,
    /// An empty reboot command.
    #[error(
        "needs a program; it takes a program and its arguments, e.g. [\"systemctl\", \"reboot\"]"
    )]
    NoProgram,
    /// A number outside its key's range.
    #[error("{value} is out of range; it takes {unit} from {lo} to {hi}")]
    OutOfRange {
        /// The number given.
        value: u64,
        /// What the number counts.
        unit: &'static str,
        /// Smallest accepted.
        lo: u64,
        /// Largest accepted.
        hi: u64,
    },
    /// Not a whole number.
    #[error("`{raw}` is not a whole number; it takes {unit} from {lo} to {hi}")]
    NotANumber {
        /// The value given.
        raw: String,
        /// What the number counts.
        unit: &'static str,
        /// Smallest accepted.
        lo: u64,
        /// Largest accepted.
        hi: u64,
    },
    /// `gateway` is not `HOST:PORT`.
    #[error("`{0}` is not HOST:PORT; it takes the gateway as HOST:PORT, e.g. gw.example.net:7300")]
    NotHostPort(String),
    /// `ca_fingerprint` is not 64 hex digits.
    #[error("`{0}` is not a SHA-256 fingerprint; it takes 64 hex digits, as fleetcastd --print-ca-fingerprint prints them")]
    NotFingerprint(String),
    /// A name in `rungs` that is no rung.
    #[error("`{0}` is not a rung; it takes a comma-separated list of native, 443, upgrade, connect, longpoll")]
    NotARung(String),
    /// `proxy` is not a proxy URL the agent can use.
    #[error("{0}; it takes none, or an HTTP proxy URL http://[user:pass@]host:port")]
    Proxy(ProxyError),
}

/// The keys, comma-separated (for [`LineError::UnknownKey`]).
fn key_names() -> String {
    KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// Name in the file (`snake_case`); the flag is `--` and the name with `-` for `_`.
    pub name: &'static str,
    /// Meaning.
    pub doc: &'static str,
    /// An array of strings (else one string).
    pub list: bool,
}

const fn key(name: &'static str, doc: &'static str) -> Key {
    Key {
        name,
        doc,
        list: false,
    }
}

/// Every key, in print order. (No key may be named `args`: the daemon's test harness passes
/// agent arguments in `FLEETCAST_AGENT_ARGS`.)
pub const KEYS: &[Key] = &[
    key("gateway", "The gateway, HOST:PORT (fleetcastd's listen address as agents reach it), or the gateways of a cell, comma-separated (each one's cell.advertise). Required."),
    key("state_dir", "Where the agent keeps its key, certificate and queue progress; must survive reboots. Required."),
    key("server_name", "Name in the gateway's certificate (one of fleetcastd's server_names). Default: the HOST of the gateway tried."),
    key("ca", "Gateway CA certificate (PEM file: <data_dir>/pki/ca.pem on the gateway), trusted for enrolment."),
    key("ca_fingerprint", "Or the CA's SHA-256 fingerprint, 64 hex digits (fleetcastd --print-ca-fingerprint)."),
    key("token", "One-time enrolment token from `fleetcast device add NAME`; needs name. Unused once enrolled."),
    key("name", "The device name the token was issued for."),
    key("boot_id_file", "Boot id source. Default: /proc/sys/kernel/random/boot_id."),
    key("dpkg_status", "A dpkg status database to report instead of detecting the package manager (dpkg, rpm, apk, opkg) under report_root."),
    key("report_root", "Root of the proc/, sys/, dev/ and package databases a report reads. Default: /."),
    key("downloads", "Where pushed files land. Default: <state_dir>/downloads."),
    key("proxy", "HTTP proxy for the CONNECT and long-poll rungs, http://[user:pass@]host:port, or `none`. Default: https_proxy / HTTPS_PROXY unless no_proxy names the gateway."),
    key("alt_port", "The gateway's alternative port for the 443, upgrade, CONNECT and long-poll rungs. Default: 443."),
    key("rungs", "Transport rungs to try, best first, comma-separated. Default: native,443,upgrade,connect,longpoll."),
    key("rung_timeout_ms", "Time one rung has to open and answer Hello. Default: 4000."),
    key("stagger_ms", "Delay between starting one rung and the next (they overlap). Default: 250."),
    key("upgrade_after", "Seconds between background retries of better rungs while on a worse one. Default: 600."),
    key("slots", "A file whose [slot] section configures the A/B slots (checked at start). Default: this file, when it has a [slot] section."),
    Key {
        name: "reboot_command",
        doc: "How a reboot step reboots, program and arguments. Default: [\"systemctl\", \"reboot\"].",
        list: true,
    },
];

/// The environment variable of key `name`: `FLEETCAST_AGENT_` and the name in capitals.
pub fn env_var(name: &str) -> String {
    format!("FLEETCAST_AGENT_{}", name.to_ascii_uppercase())
}

fn flag(name: &str) -> String {
    format!("--{}", name.replace('_', "-"))
}

/// A value: one string, or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A string.
    Str(String),
    /// An array of strings.
    List(Vec<String>),
}

/// Settings by key name.
pub type Settings = BTreeMap<&'static str, Value>;

fn lookup(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// Parses the file's text (`path` only names it in errors).
pub fn parse(path: &str, text: &str) -> Result<Settings, ConfigError> {
    let mut out = Settings::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |problem| ConfigError::Line {
            path: path.into(),
            line: i + 1,
            problem,
        };
        // The one section: the A/B slots, last in the file. Its lines are `slots.rs`'s,
        // read (and checked, naming the line) from `slots` when the agent starts: parsing
        // them here too would link a second copy of the checks' messages into the agent.
        if line == "[slot]" {
            if out.contains_key("slots") {
                return Err(at(LineError::Twice("slots")));
            }
            out.insert("slots", Value::Str(path.into()));
            break;
        }
        let (key, value) = parse_line(line, &out).map_err(at)?;
        out.insert(key, value);
    }
    Ok(out)
}

/// One `key = value` line (not blank, not a comment), checked against the keys `seen` so far.
fn parse_line(line: &str, seen: &Settings) -> Result<(&'static str, Value), LineError> {
    if line.starts_with('[') {
        return Err(LineError::Section(line.into()));
    }
    let (k, v) = line
        .split_once('=')
        .ok_or_else(|| LineError::NotKeyValue(line.into()))?;
    let k = k.trim();
    let key = lookup(k).ok_or_else(|| LineError::UnknownKey(k.into()))?;
    let bad = |problem| LineError::Value {
        key: key.name,
        problem,
    };
    let (value, rest) = if key.list {
        let (l, rest) = list(v.trim()).map_err(bad)?;
        (Value::List(l), rest)
    } else {
        let (s, rest) = string(v.trim()).map_err(|e| match e {
            ValueError::NotQuoted(raw) => LineError::Unquoted { key: key.name, raw },
            e => bad(e),
        })?;
        (Value::Str(s), rest)
    };
    check_value(key, &value).map_err(bad)?;
    let rest = rest.trim_start();
    if !(rest.is_empty() || rest.starts_with('#')) {
        return Err(LineError::Trailing {
            key: key.name,
            rest: rest.into(),
        });
    }
    if seen.contains_key(key.name) {
        return Err(LineError::Twice(key.name));
    }
    Ok((key.name, value))
}

/// A double-quoted string at the start of `s`; returns it and the rest.
pub(crate) fn string(s: &str) -> Result<(String, &str), ValueError> {
    let Some(body) = s.strip_prefix('"') else {
        return Err(ValueError::NotQuoted(s.into()));
    };
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &body[i + 1..])),
            '\\' => match chars.next().map(|(_, c)| c) {
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                other => return Err(ValueError::Escape(other.unwrap_or(' '))),
            },
            c => out.push(c),
        }
    }
    Err(ValueError::Unterminated)
}

/// `["a", "b"]` at the start of `s`.
pub(crate) fn list(s: &str) -> Result<(Vec<String>, &str), ValueError> {
    let Some(mut rest) = s.strip_prefix('[') else {
        return Err(ValueError::NotAList(s.into()));
    };
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix(']') {
            return Ok((out, r));
        }
        let (item, r) = string(rest)?;
        out.push(item);
        rest = r.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with(']') {
            return Err(ValueError::ListSeparator);
        }
    }
}

/// Overlays the environment (`env` looks a variable up): a list value splits on whitespace.
/// A value the key does not accept is an error naming the variable and the key.
pub fn overlay_env(
    s: &mut Settings,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for k in KEYS {
        let var = env_var(k.name);
        if let Some(v) = env(&var) {
            let v = if k.list {
                Value::List(v.split_whitespace().map(String::from).collect())
            } else {
                Value::Str(v)
            };
            check_value(k, &v).map_err(|problem| ConfigError::Env {
                var: var.clone(),
                key: k.name,
                problem,
            })?;
            s.insert(k.name, v);
        }
    }
    Ok(())
}

/// Checks the command-line flags that set keys, as the file and the environment are checked.
fn check_flags(args: &[String]) -> Result<(), ConfigError> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(k) = KEYS.iter().find(|k| flag(k.name) == *a) else {
            continue;
        };
        if k.list {
            // `--reboot-command` takes the rest of the line.
            let rest: Vec<String> = it.cloned().collect();
            return check_value(k, &Value::List(rest)).map_err(|problem| ConfigError::Flag {
                flag: a.clone(),
                problem,
            });
        }
        match it.next() {
            Some(v) => {
                check_value(k, &Value::Str(v.clone())).map_err(|problem| ConfigError::Flag {
                    flag: a.clone(),
                    problem,
                })?
            }
            None => return Err(ConfigError::FlagWithoutValue(a.clone())),
        }
    }
    Ok(())
}

/// `s` as a whole number of `unit` from `lo` to `hi`, or what is wrong with it.
pub(crate) fn number_in(s: &str, lo: u64, hi: u64, unit: &'static str) -> Result<u64, ValueError> {
    match s.trim().parse::<u64>() {
        Ok(n) if (lo..=hi).contains(&n) => Ok(n),
        Ok(value) => Err(ValueError::OutOfRange {
            value,
            unit,
            lo,
            hi,
        }),
        Err(_) => Err(ValueError::NotANumber {
            raw: s.into(),
            unit,
            lo,
            hi,
        }),
    }
}

/// Checks one value of key `k`: `Err` says what is wrong and what the key takes.
pub fn check_value(k: &Key, v: &Value) -> Result<(), ValueError> {
    let number = |s: &str, lo, hi, unit| number_in(s, lo, hi, unit).map(|_| ());
    let s = match v {
        Value::List(l) => {
            return match l.first() {
                Some(p) if !p.is_empty() => Ok(()),
                _ => Err(ValueError::NoProgram),
            }
        }
        Value::Str(s) if s.trim().is_empty() => return Err(ValueError::Empty),
        Value::Str(s) => s.as_str(),
    };
    match k.name {
        "gateway" => {
            // One HOST:PORT, or a cell's several, comma-separated.
            let ok = s.split(',').all(|g| {
                g.trim()
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
            });
            if ok {
                Ok(())
            } else {
                Err(ValueError::NotHostPort(s.into()))
            }
        }
        "ca_fingerprint" => {
            let hex = s.replace(':', "");
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(())
            } else {
                Err(ValueError::NotFingerprint(s.into()))
            }
        }
        "alt_port" => number(s, 1, 65_535, "a TCP port"),
        "rung_timeout_ms" => number(s, 100, 600_000, "milliseconds"),
        "stagger_ms" => number(s, 0, 60_000, "milliseconds"),
        "upgrade_after" => number(s, 1, 604_800, "seconds"),
        "rungs" => match s
            .split(',')
            .map(str::trim)
            .find(|r| crate::ladder::Rung::parse(r).is_none())
        {
            Some(bad) => Err(ValueError::NotARung(bad.into())),
            None => Ok(()),
        },
        "proxy" if s != "none" => crate::ladder::parse_proxy(s)
            .map(drop)
            .map_err(ValueError::Proxy),
        _ => Ok(()),
    }
}

/// Overlays the flags of `args` that are keys (for `--print-config`).
fn overlay_args(s: &mut Settings, args: &[String]) {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(k) = KEYS.iter().find(|k| flag(k.name) == *a) else {
            continue;
        };
        if k.list {
            s.insert(k.name, Value::List(it.by_ref().cloned().collect()));
        } else if let Some(v) = it.next() {
            s.insert(k.name, Value::Str(v.clone()));
        }
    }
}

/// Checks the rules between keys (each value was checked where it came from).
fn validate(s: &Settings) -> Result<(), ConfigError> {
    if s.contains_key("token") != s.contains_key("name") {
        return Err(ConfigError::TokenWithoutName);
    }
    Ok(())
}

/// The settings as a configuration file, every key documented, unset ones commented out.
pub fn render(s: &Settings) -> String {
    fn quote(v: &str) -> String {
        let mut o = String::from('"');
        for c in v.chars() {
            match c {
                '"' => o.push_str("\\\""),
                '\\' => o.push_str("\\\\"),
                '\n' => o.push_str("\\n"),
                '\t' => o.push_str("\\t"),
                c => o.push(c),
            }
        }
        o.push('"');
        o
    }
    let mut out = String::from(
        "# fleetcast-agent configuration (`fleetcast-agent --config FILE`).\n\
         # Environment variables FLEETCAST_AGENT_<KEY> and flags override the file.\n",
    );
    for k in KEYS {
        out.push_str(&format!("\n# {} (env {})\n", k.doc, env_var(k.name)));
        match s.get(k.name) {
            Some(Value::Str(v)) => out.push_str(&format!("{} = {}\n", k.name, quote(v))),
            Some(Value::List(l)) => {
                let items: Vec<String> = l.iter().map(|v| quote(v)).collect();
                out.push_str(&format!("{} = [{}]\n", k.name, items.join(", ")));
            }
            None => out.push_str(&format!("# {} =\n", k.name)),
        }
    }
    out
}

/// What [`expand`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Expanded {
    /// Run with these arguments (file and environment as flags, then the command line's).
    Run(Vec<String>),
    /// `--print-config`: print this and exit.
    Print(String),
}

/// Takes `--config FILE` and `--print-config` out of `args` and merges the file, the
/// environment (`env`) and the remaining flags. Errors name the file line or the key.
pub fn expand(
    args: Vec<String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Expanded, ConfigError> {
    let mut rest = Vec::with_capacity(args.len());
    let mut file = None;
    let mut print = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => file = Some(it.next().ok_or(ConfigError::NoConfigFile)?),
            "--print-config" => print = true,
            // `--reboot-command` takes everything after it.
            "--reboot-command" => {
                rest.push(a);
                rest.extend(it.by_ref());
            }
            _ => rest.push(a),
        }
    }
    let mut s = match &file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            parse(path, &text)?
        }
        None => Settings::new(),
    };
    overlay_env(&mut s, env)?;
    check_flags(&rest)?;
    if print {
        overlay_args(&mut s, &rest);
        validate(&s)?;
        return Ok(Expanded::Print(render(&s)));
    }
    validate(&s)?;
    let mut out = Vec::new();
    let mut reboot = None;
    for (k, v) in &s {
        match v {
            Value::Str(v) => out.extend([flag(k), v.clone()]),
            Value::List(l) => reboot = Some(l.clone()),
        }
    }
    let cli_reboot = rest.iter().any(|a| a == "--reboot-command");
    out.extend(rest);
    if let (Some(l), false) = (reboot, cli_reboot) {
        out.push("--reboot-command".into());
        out.extend(l);
    }
    Ok(Expanded::Run(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn file(text: &str) -> (tempfile::TempDir, String) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("agent.toml");
        std::fs::write(&p, text).unwrap();
        (d, p.display().to_string())
    }

    #[test]
    fn no_config_changes_nothing() {
        let a = args(&["--gateway", "g:1", "--state-dir", "/s"]);
        assert_eq!(expand(a.clone(), no_env).unwrap(), Expanded::Run(a));
    }

    #[test]
    fn file_then_env_then_flags() {
        let (_d, p) = file(
            "# comment\ngateway = \"gw:7300\"  # trailing\nstate_dir = \"/var/lib/a\"\n\n\
             reboot_command = [\"/sbin/reboot\", \"-f\"]\nname = \"web \\\"1\\\"\"\ntoken = \"t\"\n",
        );
        let got = expand(args(&["--config", &p, "--state-dir", "/flag"]), no_env).unwrap();
        assert_eq!(
            got,
            Expanded::Run(args(&[
                "--gateway",
                "gw:7300",
                "--name",
                "web \"1\"",
                "--state-dir",
                "/var/lib/a",
                "--token",
                "t",
                "--state-dir",
                "/flag",
                "--reboot-command",
                "/sbin/reboot",
                "-f",
            ]))
        );
        let env = |v: &str| (v == "FLEETCAST_AGENT_GATEWAY").then(|| "env:1".to_string());
        let Expanded::Run(a) = expand(args(&["--config", &p]), env).unwrap() else {
            panic!()
        };
        assert_eq!(&a[..2], ["--gateway", "env:1"]);
        // A command-line reboot command replaces the file's.
        let Expanded::Run(a) =
            expand(args(&["--config", &p, "--reboot-command", "x"]), no_env).unwrap()
        else {
            panic!()
        };
        assert_eq!(&a[a.len() - 2..], ["--reboot-command", "x"]);
        assert_eq!(a.iter().filter(|x| *x == "--reboot-command").count(), 1);
    }

    #[test]
    fn print_config_shows_the_merge_and_reads_back() {
        let (_d, p) = file("gateway = \"gw:7300\"\nstate_dir = \"/s\"\n");
        let env = |v: &str| (v == "FLEETCAST_AGENT_DOWNLOADS").then(|| "/dl".to_string());
        let Expanded::Print(text) = expand(
            args(&[
                "--config",
                &p,
                "--print-config",
                "--server-name",
                "gw.example",
            ]),
            env,
        )
        .unwrap() else {
            panic!()
        };
        assert!(text.contains("gateway = \"gw:7300\"\n"), "{text}");
        assert!(text.contains("downloads = \"/dl\"\n"), "{text}");
        assert!(text.contains("server_name = \"gw.example\"\n"), "{text}");
        assert!(text.contains("# token =\n"), "{text}");
        for k in KEYS {
            assert!(text.contains(&env_var(k.name)), "{}", k.name);
        }
        let back = parse("printed", &text).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back["server_name"], Value::Str("gw.example".into()));
    }

    #[test]
    fn every_key_can_be_set_from_the_environment_and_read_back() {
        let sample = |k: &Key| match k.name {
            "gateway" => "gw.example:7300".to_string(),
            "ca_fingerprint" => "ab".repeat(32),
            "reboot_command" => "/sbin/reboot -f".into(),
            "proxy" => "http://proxy.example:3128".into(),
            "alt_port" => "8443".into(),
            "rungs" => "native,longpoll".into(),
            "rung_timeout_ms" => "2500".into(),
            "stagger_ms" => "100".into(),
            "upgrade_after" => "300".into(),
            other => format!("/v/{other}"),
        };
        let env = |var: &str| KEYS.iter().find(|k| env_var(k.name) == var).map(sample);
        let Expanded::Print(text) = expand(args(&["--print-config"]), env).unwrap() else {
            panic!()
        };
        let back = parse("printed", &text).unwrap();
        assert_eq!(back.len(), KEYS.len(), "{text}");
        for k in KEYS {
            let want = if k.list {
                Value::List(sample(k).split(' ').map(String::from).collect())
            } else {
                Value::Str(sample(k))
            };
            assert_eq!(back[k.name], want, "{}", k.name);
        }
        // And each becomes its flag for the command-line parser.
        let Expanded::Run(a) = expand(vec![], env).unwrap() else {
            panic!()
        };
        for k in KEYS {
            assert!(a.contains(&flag(k.name)), "{}: {a:?}", k.name);
        }
    }

    #[test]
    fn every_key_is_documented() {
        let doc = include_str!("../../docs/configuration.md");
        for k in KEYS {
            assert!(doc.contains(&format!("`{}`", k.name)), "{}", k.name);
            assert!(doc.contains(&env_var(k.name)), "{}", k.name);
            assert!(doc.contains(&flag(k.name)), "{}", k.name);
        }
    }

    #[test]
    fn errors_name_the_line_the_key_and_the_problem() {
        let cases = [
            ("gatway = \"x:1\"\n", "line 1: unknown key `gatway`"),
            (
                "\ngateway = x:1\n",
                "line 2: key `gateway`: expected a double-quoted string",
            ),
            ("gateway = \"x:1\n", "unterminated"),
            ("gateway = \"x:1\" extra\n", "unexpected `extra`"),
            (
                "gateway = \"a:1\"\ngateway = \"b:1\"\n",
                "line 2: key `gateway` is set twice",
            ),
            ("[agent]\n", "sections are not supported"),
            (
                "reboot_command = \"reboot\"\n",
                "key `reboot_command`: expected a list",
            ),
            ("reboot_command = [\"a\" \"b\"]\n", "expected `,` or `]`"),
            ("just words\n", "expected `key = \"value\"`"),
            (
                "gateway = \"nohost\"\n",
                "line 1: key `gateway`: `nohost` is not HOST:PORT; it takes the gateway as HOST:PORT",
            ),
            (
                "ca_fingerprint = \"abc\"\n",
                "key `ca_fingerprint`: `abc` is not a SHA-256 fingerprint; it takes 64 hex digits",
            ),
            ("token = \"t\"\n", "token and name go together"),
            ("reboot_command = []\n", "`reboot_command`: needs a program"),
            ("server_name = \"\"\n", "`server_name`: is empty"),
            // Every key with a format is checked, naming the key and what it takes.
            (
                "\n\nalt_port = \"0\"\n",
                "line 3: key `alt_port`: 0 is out of range; it takes a TCP port from 1 to 65535",
            ),
            (
                "alt_port = \"https\"\n",
                "key `alt_port`: `https` is not a whole number; it takes a TCP port",
            ),
            (
                "rungs = \"native,carrier-pigeon\"\n",
                "key `rungs`: `carrier-pigeon` is not a rung; it takes a comma-separated list of native, 443, upgrade, connect, longpoll",
            ),
            (
                "rung_timeout_ms = \"0\"\n",
                "key `rung_timeout_ms`: 0 is out of range; it takes milliseconds from 100 to 600000",
            ),
            (
                "stagger_ms = \"-1\"\n",
                "key `stagger_ms`: `-1` is not a whole number; it takes milliseconds from 0 to 60000",
            ),
            (
                "upgrade_after = \"0\"\n",
                "key `upgrade_after`: 0 is out of range; it takes seconds from 1 to 604800",
            ),
            (
                "proxy = \"socks5://p:1080\"\n",
                "key `proxy`: proxy scheme socks5:// is not supported (use http://); it takes none, or an HTTP proxy URL",
            ),
            (
                "gateway = gw.example.net:7300\n",
                "line 1: key `gateway`: expected a double-quoted string, got `gw.example.net:7300`; values are strings: gateway = \"gw.example.net:7300\"",
            ),
        ];
        for (text, want) in cases {
            let (_d, p) = file(text);
            let e = expand(args(&["--config", &p]), no_env)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text:?}: want {want:?} in {e:?}");
        }
        let e = expand(args(&["--config", "/nonexistent"]), no_env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read configuration file /nonexistent"),
            "{e}"
        );
        let e = expand(args(&["--config"]), no_env).unwrap_err().to_string();
        assert!(e.contains("--config needs a file"), "{e}");
        let env = |v: &str| (v == "FLEETCAST_AGENT_GATEWAY").then(|| "bad".to_string());
        let e = expand(vec![], env).unwrap_err().to_string();
        assert!(
            e.starts_with("environment variable FLEETCAST_AGENT_GATEWAY (key `gateway`): `bad` is not HOST:PORT"),
            "{e}"
        );
        let env = |v: &str| (v == "FLEETCAST_AGENT_STAGGER_MS").then(|| "soon".to_string());
        let e = expand(vec![], env).unwrap_err().to_string();
        assert!(
            e.starts_with("environment variable FLEETCAST_AGENT_STAGGER_MS (key `stagger_ms`): `soon` is not a whole number; it takes milliseconds"),
            "{e}"
        );
        // Flags are checked the same way, named by the flag.
        for (a, want) in [
            (
                &["--alt-port", "99999"][..],
                "--alt-port: 99999 is out of range; it takes a TCP port from 1 to 65535",
            ),
            (&["--rungs", "tls"][..], "--rungs: `tls` is not a rung"),
            (&["--gateway"][..], "--gateway needs a value"),
            (
                &["--reboot-command"][..],
                "--reboot-command: needs a program",
            ),
        ] {
            let e = expand(args(a), no_env).unwrap_err().to_string();
            assert!(e.starts_with(want), "{a:?}: want {want:?}, got {e:?}");
        }
    }
}
