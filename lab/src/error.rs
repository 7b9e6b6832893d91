//! The lab's error type. Every prerequisite failure names what to install or enable.

use std::fmt;
use std::io;

/// Why the lab could not do what was asked.
#[derive(Debug)]
#[non_exhaustive]
pub enum LabError {
    /// The kernel refused to create a user namespace.
    UserNamespaces {
        /// The underlying OS error.
        source: io::Error,
    },
    /// A program the lab runs is not installed.
    MissingTool {
        /// The program, e.g. `nft`.
        tool: &'static str,
        /// The Debian package that provides it, e.g. `nftables`.
        package: &'static str,
    },
    /// A namespace operation failed.
    Namespace {
        /// What the lab was doing.
        step: &'static str,
        /// The underlying OS error.
        source: io::Error,
    },
    /// A helper program ran but failed.
    Command {
        /// The command line, for the message.
        command: String,
        /// Its exit status and standard error.
        detail: String,
    },
    /// The lab was asked for something it cannot build (e.g. zero hosts).
    Config(String),
    /// A lab-started service (e.g. the proxy) did not become ready.
    NotReady {
        /// The service.
        what: String,
        /// What was observed instead.
        detail: String,
    },
    /// Other I/O failure.
    Io(io::Error),
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabError::UserNamespaces { source } => write!(
                f,
                "cannot create a user namespace ({source}): unprivileged user namespaces are \
                 disabled on this machine; enable them with `sysctl -w user.max_user_namespaces=15000` \
                 (and on Debian/Ubuntu kernels `sysctl -w kernel.unprivileged_userns_clone=1`, on \
                 Ubuntu 24.04+ `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`)"
            ),
            LabError::MissingTool { tool, package } => write!(
                f,
                "the lab needs `{tool}`, which is not installed: \
                 `apt-get install {package}` (Debian package `{package}`)"
            ),
            LabError::Namespace { step, source } => write!(f, "lab namespace setup failed at {step}: {source}"),
            LabError::Command { command, detail } => write!(f, "lab command `{command}` failed: {detail}"),
            LabError::Config(msg) => write!(f, "invalid lab configuration: {msg}"),
            LabError::NotReady { what, detail } => write!(f, "{what} did not become ready: {detail}"),
            LabError::Io(e) => write!(f, "lab I/O error: {e}"),
        }
    }
}

impl std::error::Error for LabError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LabError::UserNamespaces { source }
            | LabError::Namespace { source, .. }
            | LabError::Io(source) => Some(source),
            _ => None,
        }
    }
}

impl From<io::Error> for LabError {
    fn from(e: io::Error) -> Self {
        LabError::Io(e)
    }
}
