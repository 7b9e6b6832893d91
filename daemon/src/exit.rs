//! Exit codes of `fleetcast` and `fleetcastd`: the one place they are defined (documented in
//! `docs/operator.md`, "Exit codes").
//!
//! | code | `fleetcast` | `fleetcastd` |
//! |---|---|---|
//! | 0 | success | clean exit (`--print-config`, `--print-ca-fingerprint`) |
//! | 1 | the gateway refused the request or the operation failed (a push with a failed receiver) | runtime failure (cannot bind, store error) |
//! | 2 | usage error: bad arguments, bad step syntax, unreadable local file | usage error or invalid configuration (the message names the key) |
//! | 3 | the gateway could not be reached (not running, wrong `--data-dir`, permission) | — |
//! | 4 | the named device, group, task or file does not exist | — |

use std::process::ExitCode;

/// A meaningful process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// The operation was refused or failed.
    Failed = 1,
    /// Usage error, or (for `fleetcastd`) an invalid configuration.
    Usage = 2,
    /// The gateway could not be reached.
    Unreachable = 3,
    /// The named object does not exist.
    NotFound = 4,
}

impl Exit {
    /// The numeric code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// A short machine-readable name (the `kind` of `--json` errors).
    pub fn name(self) -> &'static str {
        match self {
            Exit::Ok => "ok",
            Exit::Failed => "failed",
            Exit::Usage => "usage",
            Exit::Unreachable => "unreachable",
            Exit::NotFound => "not_found",
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable() {
        let all = [
            (Exit::Ok, 0, "ok"),
            (Exit::Failed, 1, "failed"),
            (Exit::Usage, 2, "usage"),
            (Exit::Unreachable, 3, "unreachable"),
            (Exit::NotFound, 4, "not_found"),
        ];
        for (e, n, name) in all {
            assert_eq!(e.code(), n);
            assert_eq!(e.name(), name);
        }
    }
}
