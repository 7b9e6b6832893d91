//! A real PostgreSQL for tests: Debian's server binaries (package `postgresql`), a cluster made
//! by `initdb` in a private temporary directory, started by `pg_ctl` listening only on a Unix
//! socket in that directory (no TCP port: nothing on the machine's network, nothing another
//! test can collide with), stopped by `pg_ctl` and removed on drop.
//!
//! A path-named Unix socket is reached by its path from every network namespace, so gateways
//! running inside lab hosts connect to the same server. As root (CI), the cluster belongs to
//! `nobody` (`initdb` refuses to run as root); otherwise to the test's own user.
//!
//! The server runs with `fsync` off ([`Postgres::start`]): tests stop and kill PostgreSQL's
//! processes, never the machine, and the kernel keeps what they wrote. Benchmarks of durable
//! commits use [`Postgres::start_durable`], with PostgreSQL's own defaults (`fsync` on).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::LabError;

/// The database user `initdb` creates (the cluster's superuser).
pub const PG_USER: &str = "fleetcast";
/// The port that names the socket file (`.s.PGSQL.<port>`); no TCP listener uses it.
const PORT: u16 = 5432;
/// `nobody`, which runs the server when the test runs as root.
const NOBODY: u32 = 65534;

/// A running PostgreSQL server of this test.
#[derive(Debug)]
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    /// The (uid, gid) the server runs as when the test is root.
    owner: Option<(u32, u32)>,
    running: bool,
    /// `fsync` on (the server's default) rather than off.
    durable: bool,
}

/// The newest `/usr/lib/postgresql/<major>/bin` that has `initdb` (or `FLEETCAST_PG_BIN`).
fn find_bin() -> Result<PathBuf, LabError> {
    if let Some(p) = std::env::var_os("FLEETCAST_PG_BIN") {
        return Ok(PathBuf::from(p));
    }
    let missing = LabError::MissingTool {
        tool: "initdb",
        package: "postgresql",
    };
    let Ok(dir) = std::fs::read_dir("/usr/lib/postgresql") else {
        return Err(missing);
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
        .ok_or(missing)
}

impl Postgres {
    /// Makes a new cluster and starts its server, `fsync` off; returns once it accepts
    /// connections.
    pub fn start() -> Result<Postgres, LabError> {
        Postgres::make(false)
    }

    /// As [`Postgres::start`], with `fsync` on: every commit durable, for benchmarks.
    pub fn start_durable() -> Result<Postgres, LabError> {
        Postgres::make(true)
    }

    fn make(durable: bool) -> Result<Postgres, LabError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let bin = find_bin()?;
        let dir = std::env::temp_dir().join(format!(
            "fleetcast-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(LabError::Io)?;
        // Traversable by all (the data directory inside is the owner's alone, 0700): a
        // process in a lab host is root of its user namespace, where `nobody` is not mapped,
        // and still reaches the socket.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(LabError::Io)?;
        // SAFETY: geteuid has no preconditions.
        let owner = (unsafe { libc::geteuid() } == 0).then_some((NOBODY, NOBODY));
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(LabError::Io)?;
        }
        let mut pg = Postgres {
            dir,
            bin,
            owner,
            running: false,
            durable,
        };
        let data = pg.data_dir();
        pg.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                PG_USER.as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        pg.start_server()?;
        Ok(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The directory holding the server's socket (libpq's `host`).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The port naming the socket (libpq's `port`).
    pub fn port(&self) -> u16 {
        PORT
    }

    /// A connection string for `dbname` (key = value form, as libpq and the `postgres` crate
    /// take it).
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "host={} port={PORT} user={PG_USER} dbname={dbname}",
            self.dir.display()
        )
    }

    /// Creates database `name` (owned by [`PG_USER`]).
    pub fn create_database(&self, name: &str) -> Result<(), LabError> {
        let sock = self.dir.clone();
        self.run(
            "createdb",
            &[
                "-h".as_ref(),
                sock.as_os_str(),
                "-p".as_ref(),
                PORT.to_string().as_ref(),
                "-U".as_ref(),
                PG_USER.as_ref(),
                name.as_ref(),
            ],
        )
        .map(drop)
    }

    /// Stops the server (`pg_ctl stop -m fast`: connections are cut, work in flight rolls back).
    pub fn stop(&mut self) -> Result<(), LabError> {
        if !self.running {
            return Ok(());
        }
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        )?;
        self.running = false;
        Ok(())
    }

    /// Starts the server again after [`Postgres::stop`] (the same cluster and data).
    pub fn start_server(&mut self) -> Result<(), LabError> {
        if self.running {
            return Ok(());
        }
        let data = self.data_dir();
        let log = self.dir.join("server.log");
        let opts = format!(
            "-k {} -p {PORT} -c listen_addresses='' -c max_connections=200{}",
            self.dir.display(),
            if self.durable { "" } else { " -F" }
        );
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                opts.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        )
        .map_err(|e| match e {
            LabError::Command { command, detail } => {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                LabError::NotReady {
                    what: "PostgreSQL".into(),
                    detail: format!("{command}: {detail}; server log: {}", log.trim()),
                }
            }
            e => e,
        })?;
        self.running = true;
        Ok(())
    }

    /// Runs server program `tool` with `args` as the cluster's owner; its output on failure.
    fn run(&self, tool: &'static str, args: &[&std::ffi::OsStr]) -> Result<String, LabError> {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.args(args)
            .env("LC_ALL", "C")
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.owner {
            // std drops the supplementary groups when a root parent sets the uid.
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LabError::MissingTool {
                tool,
                package: "postgresql",
            },
            _ => LabError::Io(e),
        })?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: format!("{tool} {}", display(args)),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn display(args: &[&std::ffi::OsStr]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!(
                "fleetcast-lab: stopping PostgreSQL in {}: {e}",
                self.dir.display()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
