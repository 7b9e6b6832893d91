//! The store's [`Engine`] on PostgreSQL: the batch operations of `batch/` run on a database
//! transaction through [`Tables`], and reads are SQL on the same transaction (a batch) or on
//! a repeatable-read one (a snapshot).
//!
//! Shape:
//! - [`PgStore`] owns one connection; a batch is `BEGIN` … `COMMIT` on it, holding the
//!   connection until it commits or is dropped (rolled back). The gateway's store thread owns
//!   the store: no other thread, and never the event loop, touches the connection.
//! - An operation validates before it writes ([`crate::batch`]'s contract), so a refusal
//!   leaves the transaction as it was; any database error aborts the transaction, which
//!   PostgreSQL then refuses to continue, and poisons the batch like an LMDB failure.
//! - Event ids are given in commit order: the first append of a batch takes a
//!   transaction-scoped advisory lock, so batches appending events (from any gateway of the
//!   cell) take ids one after another, and a reader tailing `events_from` never sees an id
//!   appear below one it has read.
//! - Each commit bumps `counters.commit_seq`, as LMDB's meta record does.

use std::cell::{Cell, RefCell, RefMut};
use std::path::Path;

use postgres::fallible_iterator::FallibleIterator as _;
use postgres::types::ToSql;
use postgres::{Client, Row};

use std::collections::BTreeSet;

use super::cell::{CellError, Claim, Membership};
use super::lease::{self, LeaseKeeper, Poll};
use crate::batch::tables::{Counter, Tables};
use crate::batch::{Cx, Exec};
use crate::codec::Record;
use crate::engine::{Claimed, Engine, Lease, Reads, StoreBatch};
use crate::error::{Error, Result};
use crate::types::{
    Command, CommandPolicy, Device, DeviceId, EnrolmentToken, Event, EventId, QueueState,
    QueueStatus, StoredResult, Task, TaskDeviceStatus, TaskId,
};
use crate::Committed;

/// The channel on which a gateway tells the cell which devices operator requests changed
/// (payload: the device id in decimal).
const NOTIFY_CHANNEL: &str = "fleetcast_devices";

/// The advisory lock key that orders event ids (`events` in ASCII).
const EVENTS_LOCK: i64 = 0x0000_6576_656e_7473;

/// The store on a PostgreSQL database whose schema [`super::migrate`] brought up to date.
pub struct PgStore {
    client: RefCell<Client>,
    /// How to connect again when the server closed the connection (a database restart);
    /// `None` for a store made from a client ([`PgStore::new`]).
    reconnect: Option<postgres::Config>,
    /// This gateway's membership of a cell: every batch's writes for a device are fenced by
    /// its ownership ([`PgStore::fenced`]).
    member: Option<Membership>,
    /// The thread renewing `member`'s lease ([`super::lease`]), for a store that can make
    /// connections of its own ([`PgStore::connect`]).
    keeper: Option<LeaseKeeper>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    /// The store on `client`'s database (migrated already).
    pub fn new(client: Client) -> PgStore {
        PgStore {
            client: RefCell::new(client),
            reconnect: None,
            member: None,
            keeper: None,
        }
    }

    /// This store with every batch fenced by `member`'s ownership of each device it touches:
    /// an operation on a device this gateway does not own under a live lease is refused
    /// ([`Error::NotOwner`]) before it writes, and the batch's other operations still commit
    /// (a lapsed lease owns nothing: it refuses every device). Devices created in the batch
    /// are owned by `member` from the start.
    pub fn fenced(mut self, member: Membership) -> PgStore {
        self.member = Some(member);
        self
    }

    /// Joins the cell as gateway `id`, reached by agents at `addr`, with a lease of `lease`
    /// (a new incarnation, see [`Membership::join`]), and fences every batch by it. A store
    /// made by [`PgStore::connect`] renews the lease on a thread and a connection of its own
    /// (every third of the lease, at most a second apart: [`super::lease`]), its
    /// connections bounded by timeouts; one made from a client renews it in
    /// [`Engine::keep_lease`] on that client.
    pub fn join_cell(
        mut self,
        id: &str,
        addr: &str,
        lease: std::time::Duration,
    ) -> std::result::Result<PgStore, CellError> {
        if let Some(cfg) = &mut self.reconnect {
            lease::with_timeouts(cfg, lease);
            *self.client.get_mut() = cfg.connect(postgres::NoTls)?;
        }
        let c = self.client.get_mut();
        let m = Membership::join(c, id, addr, lease)?;
        listen(c)?;
        if let Some(cfg) = &self.reconnect {
            let every = (lease / 3).min(std::time::Duration::from_secs(1));
            let keeper = LeaseKeeper::start(cfg.clone(), m.clone(), lease, every)
                .map_err(CellError::Thread)?;
            self.keeper = Some(keeper);
        }
        Ok(self.fenced(m))
    }

    /// The cell membership fencing this store's batches, if any.
    pub fn member(&self) -> Option<&Membership> {
        self.member.as_ref()
    }

    /// Connects to the database `url` names (libpq's `key=value` form or a `postgresql://`
    /// URL), with `password` if given (read from a file or the environment by the caller:
    /// never from a command line), and brings its schema up to date ([`super::migrate`]).
    /// TLS to the server is not built yet: a URL that asks for it (`sslmode=require`) is
    /// refused rather than connected in the clear.
    pub fn connect(
        url: &str,
        password: Option<&[u8]>,
    ) -> std::result::Result<(PgStore, super::Migrated), super::MigrateError> {
        let mut cfg = check_url(url)?;
        if let Some(p) = password {
            cfg.password(p);
        }
        let mut client = cfg.connect(postgres::NoTls)?;
        let migrated = super::migrate(&mut client)?;
        let store = PgStore {
            client: RefCell::new(client),
            reconnect: Some(cfg),
            member: None,
            keeper: None,
        };
        Ok((store, migrated))
    }

    fn begin(&self, sql: &str, fence: bool) -> Result<Tx<'_>> {
        let mut c = self.client.try_borrow_mut().map_err(|_| Error::Poisoned)?;
        if let Err(e) = c.batch_execute(sql) {
            // The server went away (restarted, or the network cut): a batch after that tries
            // one new connection, so the gateway resumes once the database is back;
            // meanwhile every batch fails and nothing is acknowledged.
            let Some(cfg) = &self.reconnect else {
                return Err(e.into());
            };
            if !connection_lost(&c, &e) {
                return Err(e.into());
            }
            *c = connect_again(cfg, self.member.is_some())?;
            c.batch_execute(sql)?;
        }
        Ok(Tx {
            c: RefCell::new(c),
            open: Cell::new(true),
            cause: RefCell::new(None),
            events_locked: Cell::new(false),
            ops: 0,
            member: if fence { self.member.as_ref() } else { None },
            keeper: if fence { self.keeper.as_ref() } else { None },
            fenced: RefCell::new(BTreeSet::new()),
            operator: Cell::new(false),
            locked: RefCell::new(BTreeSet::new()),
        })
    }

    fn begin_batch(&self) -> Result<PgBatch<'_>> {
        Ok(PgBatch {
            tx: self.begin("BEGIN", true)?,
            scratch: Vec::new(),
        })
    }

    /// One empty round trip on the batch connection, so the notifications the database sent
    /// it are read while the gateway is idle: the client reads its socket only while it
    /// waits on a query, and with the lease on its own thread nothing else would ask. A
    /// lost connection is opened again (listening again) as a batch would; a failure is
    /// left to the next batch, which hears it.
    fn hear(&mut self) {
        let c = self.client.get_mut();
        let Err(e) = c.simple_query("") else { return };
        if let Some(cfg) = &self.reconnect {
            if connection_lost(c, &e) {
                if let Ok(again) = connect_again(cfg, true) {
                    *c = again;
                }
            }
        }
    }
}

impl Engine for PgStore {
    fn batch(&mut self) -> Result<Box<dyn StoreBatch + '_>> {
        Ok(Box::new(self.begin_batch()?))
    }

    fn snapshot(&self) -> Result<Box<dyn Reads + '_>> {
        Ok(Box::new(PgSnapshot {
            tx: self.begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", false)?,
        }))
    }

    /// PostgreSQL's own tools back a cell up (`pg_dump`, base backups with WAL archiving):
    /// a copy into a directory is LMDB's way, not this engine's.
    fn backup(&self, _dest: &Path) -> Result<()> {
        Err(Error::Unsupported(
            "backup of a PostgreSQL store: use pg_dump or the server's base backups",
        ))
    }

    fn keep_lease(&mut self) -> Result<Lease> {
        if let Some(k) = &self.keeper {
            return match k.poll() {
                Poll::Held => {
                    self.hear();
                    Ok(Lease::Held)
                }
                Poll::Lapsed => Ok(Lease::Lapsed),
                Poll::Rejoined(m) => {
                    let incarnation = m.incarnation();
                    self.member = Some(m);
                    Ok(Lease::Rejoined { incarnation })
                }
                Poll::Failed(e) => Err(e.into()),
            };
        }
        let Some(m) = &self.member else {
            return Ok(Lease::Held);
        };
        let c = self.client.get_mut();
        match m.renew(c) {
            Ok(()) => return Ok(Lease::Held),
            Err(CellError::LeaseLost { .. }) => {}
            Err(CellError::Database(e)) => {
                // A lost connection is tried again once, as a batch would.
                let Some(cfg) = &self.reconnect else {
                    return Err(e.into());
                };
                if !connection_lost(c, &e) {
                    return Err(e.into());
                }
                *c = connect_again(cfg, true)?;
                match m.renew(c) {
                    Ok(()) => return Ok(Lease::Held),
                    Err(CellError::LeaseLost { .. }) => {}
                    Err(e) => return Err(cell_error(e)),
                }
            }
            Err(e) => return Err(cell_error(e)),
        }
        let next = m.rejoin(c).map_err(cell_error)?;
        let incarnation = next.incarnation();
        self.member = Some(next);
        Ok(Lease::Rejoined { incarnation })
    }

    fn changed_elsewhere(&mut self) -> Vec<DeviceId> {
        if self.member.is_none() {
            return Vec::new();
        }
        let c = self.client.get_mut();
        let mut out = Vec::new();
        // Non-blocking: what the connection has received, and what is waiting on its socket.
        let mut n = c.notifications();
        let mut it = n.iter();
        while let Ok(Some(note)) = it.next() {
            if let Ok(d) = note.payload().parse::<u64>() {
                out.push(DeviceId(d));
            }
        }
        out
    }

    fn leave_cell(&mut self) -> Result<()> {
        // The keeper stops first: no renewal after the lease is given up.
        if let Some(k) = self.keeper.take() {
            self.member = Some(k.stop());
        }
        match &self.member {
            Some(m) => m.leave(self.client.get_mut()).map_err(cell_error),
            None => Ok(()),
        }
    }
}

/// A new connection after the server closed the old one; in a cell, listening again for the
/// devices other gateways changed (a notification sent meanwhile is lost: the owner learns
/// of that command at the device's next session).
fn connect_again(
    cfg: &postgres::Config,
    in_cell: bool,
) -> std::result::Result<Client, postgres::Error> {
    let mut c = cfg.connect(postgres::NoTls)?;
    if in_cell {
        listen(&mut c)?;
    }
    Ok(c)
}

/// Subscribes the connection to the cell's notifications of devices changed elsewhere.
fn listen(c: &mut Client) -> std::result::Result<(), postgres::Error> {
    c.batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
}

/// Whether `e` means the connection is gone (a server restart, a cut network), so one new
/// connection is worth trying, rather than a refusal by a live server.
fn connection_lost(c: &Client, e: &postgres::Error) -> bool {
    c.is_closed() || e.as_db_error().is_none()
}

/// A cell error where the engine's own error is due: the database's, kept whole.
fn cell_error(e: CellError) -> Error {
    match e {
        CellError::Database(e) => Error::Postgres(e),
        CellError::NoDevice(d) => Error::NotFound(crate::Missing::Device(DeviceId(d as u64))),
        CellError::Fenced { device, .. } => Error::NotOwner(DeviceId(device as u64)),
        CellError::LeaseLost { incarnation, .. } => Error::LeaseLost { incarnation },
        CellError::Thread(e) => Error::Io(e),
    }
}

/// Parses a connection string as [`PgStore::connect`] takes it.
pub fn check_url(url: &str) -> std::result::Result<postgres::Config, super::MigrateError> {
    let cfg: postgres::Config = url
        .parse()
        .map_err(|e: postgres::Error| super::MigrateError::BadUrl(e.to_string()))?;
    if cfg.get_ssl_mode() == postgres::config::SslMode::Require {
        return Err(super::MigrateError::BadUrl(
            "TLS to the database (sslmode=require) is not built yet: connect over a Unix \
             socket or a trusted network, with sslmode=disable or prefer"
                .into(),
        ));
    }
    Ok(cfg)
}

/// One open transaction on the store's connection.
struct Tx<'a> {
    c: RefCell<RefMut<'a, Client>>,
    open: Cell<bool>,
    /// What poisoned it (once set, it cannot commit), kept for the commit's error: the
    /// operation that hit it had the error itself; an operator whose request fails with the
    /// batch should read why.
    cause: RefCell<Option<String>>,
    events_locked: Cell<bool>,
    ops: usize,
    /// The cell membership fencing this transaction's device writes (batches only).
    member: Option<&'a Membership>,
    /// The lease thread, when there is one: a lease that may have lapsed refuses every
    /// ownership at once (fences and claims) rather than asking a database that may not
    /// answer; operator writes, which need no ownership, go on.
    keeper: Option<&'a LeaseKeeper>,
    /// Devices whose ownership this transaction checked (and whose rows it locked).
    fenced: RefCell<BTreeSet<u64>>,
    /// Operator requests are running ([`StoreBatch::operator_writes`]).
    operator: Cell<bool>,
    /// Devices whose rows an operator request locked without owning them: their owners are
    /// notified at commit.
    locked: RefCell<BTreeSet<u64>>,
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open.get() {
            // Not committed: nothing of it stays. A failure here leaves the connection in an
            // aborted transaction, which the next BEGIN reports.
            let _ = self.c.get_mut().batch_execute("ROLLBACK");
        }
    }
}

fn i(v: u64) -> i64 {
    v as i64
}

impl Tx<'_> {
    /// Checks (once per transaction) that this gateway owns `dev`, locking its row until the
    /// transaction ends; `Ok` at once when the store is not fenced.
    fn fence(&self, dev: DeviceId) -> Result<()> {
        let Some(m) = self.member else {
            return Ok(());
        };
        if self.fenced.borrow().contains(&dev.0) {
            return Ok(());
        }
        self.check()?;
        self.lock_events()?;
        if self.operator.get() {
            return self.lock_for_operator(dev);
        }
        self.lease_live(m)?;
        let r = m.fence(&mut **self.c.borrow_mut(), i(dev.0));
        match r {
            Ok(()) => {
                self.fenced.borrow_mut().insert(dev.0);
                Ok(())
            }
            // A device that does not exist is the operation's own refusal to make.
            Err(CellError::Fenced { .. }) if !self.device_exists(dev)? => Ok(()),
            Err(CellError::Fenced { device, .. }) => Err(Error::NotOwner(DeviceId(device as u64))),
            // `Membership::fence` fails only with `Fenced` or a database error.
            Err(e) => {
                self.poison(&e);
                Err(match e {
                    CellError::Database(e) => Error::Postgres(e),
                    _ => Error::NotOwner(dev),
                })
            }
        }
    }

    /// Takes the events lock (once per transaction). Also taken before a transaction's
    /// first device row lock: one lock order in the whole cell (the events lock, then rows),
    /// since an operator batch holding a device row and waiting on the events lock, beside
    /// the owner's batch holding the events lock and waiting on that row, deadlocked.
    fn lock_events(&self) -> Result<()> {
        if !self.events_locked.get() {
            self.execute("SELECT pg_advisory_xact_lock($1)", &[&EVENTS_LOCK])?;
            self.events_locked.set(true);
        }
        Ok(())
    }

    /// An operator request's access to `dev`: the device's row locked until the transaction
    /// ends (serialized with its owner's batches, which lock it in their fence), ownership not
    /// required.
    fn lock_for_operator(&self, dev: DeviceId) -> Result<()> {
        if self.locked.borrow().contains(&dev.0) {
            return Ok(());
        }
        self.query_opt(
            "SELECT 1 FROM devices WHERE id = $1 FOR UPDATE",
            &[&i(dev.0)],
        )?;
        self.locked.borrow_mut().insert(dev.0);
        Ok(())
    }

    /// [`Tx::fence`] for a write: the operation read the device first, so a refusal here
    /// means it wrote for another device already; the batch cannot commit half of it.
    fn fence_write(&self, dev: DeviceId) -> Result<()> {
        self.fence(dev).inspect_err(|e| self.poison(e))
    }

    fn device_exists(&self, dev: DeviceId) -> Result<bool> {
        Ok(self
            .query_opt("SELECT 1 FROM devices WHERE id = $1", &[&i(dev.0)])?
            .is_some())
    }

    /// Refuses (without poisoning: the batch's other work goes on) when the lease thread
    /// says the lease may have lapsed.
    fn lease_live(&self, m: &Membership) -> Result<()> {
        match self.keeper {
            Some(k) if k.lapsed() => Err(Error::LeaseLost {
                incarnation: m.incarnation(),
            }),
            _ => Ok(()),
        }
    }

    /// Marks the transaction as unable to commit because of `e`.
    fn poison(&self, e: &dyn std::fmt::Display) {
        self.cause.borrow_mut().get_or_insert_with(|| e.to_string());
    }

    fn check(&self) -> Result<()> {
        match self.cause.borrow().as_ref() {
            Some(cause) => Err(Error::PoisonedBy {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.check()?;
        self.c.borrow_mut().query(sql, params).map_err(|e| {
            self.poison(&super::migrate::describe(&e));
            Error::from(e)
        })
    }

    fn query_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.check()?;
        self.c.borrow_mut().execute(sql, params).map_err(|e| {
            self.poison(&super::migrate::describe(&e));
            Error::from(e)
        })
    }

    /// The record in column 0 of the row `sql` finds, decoded.
    fn record<R: Record>(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<R>> {
        match self.query_opt(sql, params)? {
            Some(row) => Ok(Some(R::decode(row.get::<_, &[u8]>(0))?)),
            None => Ok(None),
        }
    }

    /// The records in column 0 of every row `sql` finds, decoded.
    fn records<R: Record>(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<R>> {
        self.query(sql, params)?
            .iter()
            .map(|row| R::decode(row.get::<_, &[u8]>(0)))
            .collect()
    }

    /// The rows `sql` finds as (column 0, an id or seq; column 1, a record decoded).
    fn keyed<R: Record>(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<(u64, R)>> {
        self.query(sql, params)?
            .iter()
            .map(|r| Ok((r.get::<_, i64>(0) as u64, R::decode(r.get::<_, &[u8]>(1))?)))
            .collect()
    }

    /// Column 0 of the rows `sql` finds: ids or seqs.
    fn ids(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<u64>> {
        Ok(self
            .query(sql, params)?
            .iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect())
    }

    fn commit(mut self) -> Result<Committed> {
        self.check()?;
        let ops = self.ops;
        let c = self.c.get_mut();
        let seq: i64 = if ops == 0 {
            c.query_one("SELECT value FROM counters WHERE name = 'commit_seq'", &[])?
                .get(0)
        } else {
            c.query_one(
                "UPDATE counters SET value = value + 1 WHERE name = 'commit_seq' RETURNING value",
                &[],
            )?
            .get(0)
        };
        // The owners of devices operator requests changed hear of it when this commits (a
        // notification is sent only if its transaction commits).
        for dev in self.locked.get_mut().iter() {
            c.execute(
                "SELECT pg_notify($1, $2)",
                &[&NOTIFY_CHANNEL, &dev.to_string()],
            )?;
        }
        // An empty batch changed nothing: it ends without a commit record either way.
        c.batch_execute("COMMIT")?;
        self.open.set(false);
        Ok(Committed {
            commit_seq: seq as u64,
            operations: ops,
        })
    }
}

fn encoded<R: Record>(rec: &R) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    rec.encode(&mut buf)?;
    Ok(buf)
}

impl Tables for Tx<'_> {
    fn device(&self, id: DeviceId) -> Result<Option<Device>> {
        self.fence(id)?;
        self.record("SELECT record FROM devices WHERE id = $1", &[&i(id.0)])
    }
    fn name_taken(&self, name: &str) -> Result<bool> {
        Ok(self
            .query_opt("SELECT 1 FROM devices WHERE name = $1", &[&name])?
            .is_some())
    }
    fn put_device(&mut self, dev: &Device) -> Result<()> {
        let rec = encoded(dev)?;
        let seen = dev.last_seen_ms.map(i);
        let (gw, inc) = match self.member {
            Some(m) => (Some(m.id().to_string()), Some(m.incarnation())),
            None => (None, None),
        };
        // A new device is this gateway's from the start; an existing one keeps its owner
        // (and was fenced when the operation read it).
        let fresh = self.execute(
            "INSERT INTO devices (id, name, revoked, last_seen_ms, record, owner_gw, owner_inc)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
            &[
                &i(dev.id.0),
                &dev.name,
                &dev.revoked,
                &seen,
                &rec,
                &gw,
                &inc,
            ],
        )?;
        if fresh == 1 {
            self.fenced.borrow_mut().insert(dev.id.0);
            return Ok(());
        }
        self.fence_write(dev.id)?;
        self.execute(
            "UPDATE devices SET revoked = $2, last_seen_ms = $3, record = $4 WHERE id = $1",
            &[&i(dev.id.0), &dev.revoked, &seen, &rec],
        )
        .map(drop)
    }
    fn put_device_name(&mut self, _name: &str, _id: DeviceId) -> Result<()> {
        // The name is a column of the device's row (unique): no index of its own.
        Ok(())
    }
    fn next_id(&mut self, counter: Counter) -> Result<u64> {
        let sql = match counter {
            Counter::Device => "SELECT nextval('device_ids')",
            Counter::Task => "SELECT nextval('task_ids')",
        };
        let id: i64 = self
            .query_opt(sql, &[])?
            .map(|r| r.get(0))
            .unwrap_or_default();
        Ok(id as u64)
    }
    fn token(&self, hash: &[u8; 32]) -> Result<Option<EnrolmentToken>> {
        self.record(
            "SELECT record FROM enrolment_tokens WHERE hash = $1",
            &[&&hash[..]],
        )
    }
    fn put_token(&mut self, hash: &[u8; 32], token: &EnrolmentToken) -> Result<()> {
        let rec = encoded(token)?;
        self.execute(
            "INSERT INTO enrolment_tokens (hash, expires_ms, record) VALUES ($1, $2, $3)
             ON CONFLICT (hash) DO UPDATE SET expires_ms = excluded.expires_ms,
                 record = excluded.record",
            &[&&hash[..], &i(token.expires_ms), &rec],
        )
        .map(drop)
    }
    fn del_token(&mut self, hash: &[u8; 32]) -> Result<()> {
        self.execute(
            "DELETE FROM enrolment_tokens WHERE hash = $1",
            &[&&hash[..]],
        )
        .map(drop)
    }
    fn queue(&self, id: DeviceId) -> Result<Option<QueueState>> {
        self.fence(id)?;
        self.record("SELECT record FROM queues WHERE device = $1", &[&i(id.0)])
    }
    fn put_queue(&mut self, id: DeviceId, q: &QueueState) -> Result<()> {
        self.fence_write(id)?;
        let rec = encoded(q)?;
        self.execute(
            "INSERT INTO queues (device, record) VALUES ($1, $2)
             ON CONFLICT (device) DO UPDATE SET record = excluded.record",
            &[&i(id.0), &rec],
        )
        .map(drop)
    }
    fn command(&self, dev: DeviceId, seq: u64) -> Result<Option<Command>> {
        self.record(
            "SELECT record FROM commands WHERE device = $1 AND seq = $2",
            &[&i(dev.0), &i(seq)],
        )
    }
    fn command_policy(&self, dev: DeviceId, seq: u64) -> Result<Option<CommandPolicy>> {
        match self.query_opt(
            "SELECT record FROM commands WHERE device = $1 AND seq = $2",
            &[&i(dev.0), &i(seq)],
        )? {
            Some(row) => CommandPolicy::decode_prefix(row.get::<_, &[u8]>(0)).map(Some),
            None => Ok(None),
        }
    }
    fn first_after(&self, dev: DeviceId, after: u64) -> Result<Option<u64>> {
        let Some(start) = after.checked_add(1) else {
            return Ok(None);
        };
        Ok(self
            .query_opt(
                "SELECT seq FROM commands WHERE device = $1 AND seq >= $2 ORDER BY seq LIMIT 1",
                &[&i(dev.0), &i(start)],
            )?
            .map(|r| r.get::<_, i64>(0) as u64))
    }
    fn command_seqs_from(&self, dev: DeviceId, from: u64) -> Result<Vec<u64>> {
        self.ids(
            "SELECT seq FROM commands WHERE device = $1 AND seq >= $2 ORDER BY seq",
            &[&i(dev.0), &i(from)],
        )
    }
    fn put_command(&mut self, dev: DeviceId, seq: u64, cmd: &Command) -> Result<()> {
        self.fence_write(dev)?;
        let rec = encoded(cmd)?;
        self.execute(
            "INSERT INTO commands (device, seq, record) VALUES ($1, $2, $3)
             ON CONFLICT (device, seq) DO UPDATE SET record = excluded.record",
            &[&i(dev.0), &i(seq), &rec],
        )
        .map(drop)
    }
    fn del_command(&mut self, dev: DeviceId, seq: u64) -> Result<()> {
        self.fence_write(dev)?;
        let (d, s) = (i(dev.0), i(seq));
        self.execute(
            "DELETE FROM results WHERE device = $1 AND seq = $2",
            &[&d, &s],
        )?;
        self.execute(
            "DELETE FROM commands WHERE device = $1 AND seq = $2",
            &[&d, &s],
        )
        .map(drop)
    }
    fn result(&self, dev: DeviceId, seq: u64) -> Result<Option<StoredResult>> {
        self.record(
            "SELECT record FROM results WHERE device = $1 AND seq = $2",
            &[&i(dev.0), &i(seq)],
        )
    }
    fn with_result_bytes(&self, dev: DeviceId, seq: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool> {
        let row = self.query_opt(
            "SELECT record FROM results WHERE device = $1 AND seq = $2",
            &[&i(dev.0), &i(seq)],
        )?;
        Ok(row.map(|r| f(r.get::<_, &[u8]>(0))).is_some())
    }
    fn put_result(&mut self, dev: DeviceId, seq: u64, r: &StoredResult) -> Result<()> {
        self.fence_write(dev)?;
        let rec = encoded(r)?;
        self.execute(
            "INSERT INTO results (device, seq, record) VALUES ($1, $2, $3)
             ON CONFLICT (device, seq) DO UPDATE SET record = excluded.record",
            &[&i(dev.0), &i(seq), &rec],
        )
        .map(drop)
    }
    fn group_members(&self, group: &str) -> Result<Vec<DeviceId>> {
        let ids = self.ids(
            "SELECT device FROM group_members WHERE grp = $1 ORDER BY device",
            &[&group],
        )?;
        Ok(ids.into_iter().map(DeviceId).collect())
    }
    fn add_member(&mut self, group: &str, dev: DeviceId) -> Result<()> {
        self.fence_write(dev)?;
        self.execute(
            "INSERT INTO group_members (grp, device) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&group, &i(dev.0)],
        )
        .map(drop)
    }
    fn del_member(&mut self, group: &str, dev: DeviceId) -> Result<()> {
        self.fence_write(dev)?;
        self.execute(
            "DELETE FROM group_members WHERE grp = $1 AND device = $2",
            &[&group, &i(dev.0)],
        )
        .map(drop)
    }
    fn task(&self, id: TaskId) -> Result<Option<Task>> {
        self.record("SELECT record FROM tasks WHERE id = $1", &[&i(id.0)])
    }
    fn put_task(&mut self, id: TaskId, task: &Task) -> Result<()> {
        let rec = encoded(task)?;
        self.execute(
            "INSERT INTO tasks (id, created_ms, record) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET record = excluded.record",
            &[&i(id.0), &i(task.created_ms), &rec],
        )
        .map(drop)
    }
    fn task_status(&self, task: TaskId, dev: DeviceId) -> Result<Option<TaskDeviceStatus>> {
        self.fence(dev)?;
        self.record(
            "SELECT record FROM task_devices WHERE task = $1 AND device = $2",
            &[&i(task.0), &i(dev.0)],
        )
    }
    fn put_task_status(
        &mut self,
        task: TaskId,
        dev: DeviceId,
        st: &TaskDeviceStatus,
    ) -> Result<()> {
        self.fence_write(dev)?;
        let rec = encoded(st)?;
        self.execute(
            "INSERT INTO task_devices (task, device, status, record) VALUES ($1, $2, $3, $4)
             ON CONFLICT (task, device) DO UPDATE SET status = excluded.status,
                 record = excluded.record",
            &[&i(task.0), &i(dev.0), &st.name(), &rec],
        )
        .map(drop)
    }
    fn last_event_id(&self) -> Result<EventId> {
        // The lock first, so the id read here is still the last when this batch commits.
        self.lock_events()?;
        let last: Option<i64> = self
            .query_opt("SELECT max(id) FROM events", &[])?
            .and_then(|r| r.get(0));
        Ok(last.unwrap_or(0) as u64)
    }
    fn put_event(&mut self, id: EventId, event: &Event) -> Result<()> {
        let rec = encoded(event)?;
        let dev = event.device.map(|d| i(d.0));
        self.execute(
            "INSERT INTO events (id, time_ms, device, record) VALUES ($1, $2, $3, $4)",
            &[&i(id), &i(event.time_ms), &dev, &rec],
        )
        .map(drop)
    }
    fn prune_events(&mut self, older_than_ms: u64, keep_max: u64, limit: usize) -> Result<usize> {
        // As LMDB's scan: from the oldest, never the last, while more than keep_max remain or
        // the event is older than the age limit; the first one that is neither ends it.
        let n = self.execute(
            "WITH total AS (SELECT count(*) AS n, max(id) AS last FROM events),
                  ranked AS (
                      SELECT e.id, e.k,
                             e.id < total.last
                             AND (($2::bigint > 0 AND total.n - e.k + 1 > $2::bigint)
                                  OR ($1::bigint > 0 AND e.time_ms < $1::bigint)) AS doomed
                      FROM (SELECT id, time_ms, row_number() OVER (ORDER BY id) AS k
                            FROM events) e, total),
                  stop AS (SELECT coalesce(min(k), 9223372036854775807) AS k
                           FROM ranked WHERE NOT doomed)
             DELETE FROM events WHERE id IN (
                 SELECT id FROM ranked, stop WHERE ranked.k < stop.k AND ranked.k <= $3::bigint)",
            &[&i(older_than_ms), &i(keep_max), &(limit as i64)],
        )?;
        Ok(n as usize)
    }
    fn queue_from(&self, from: DeviceId) -> Result<Option<(DeviceId, QueueState)>> {
        let rows = self.keyed(
            "SELECT device, record FROM queues WHERE device >= $1 ORDER BY device LIMIT 1",
            &[&i(from.0)],
        )?;
        Ok(rows.into_iter().next().map(|(d, q)| (DeviceId(d), q)))
    }
    fn command_seqs_upto(&self, dev: DeviceId, upto: u64, limit: usize) -> Result<Vec<u64>> {
        self.ids(
            "SELECT seq FROM commands WHERE device = $1 AND seq <= $2 ORDER BY seq LIMIT $3",
            &[&i(dev.0), &i(upto), &(limit as i64)],
        )
    }
}

/// The reads every PostgreSQL view shares (a batch sees its own writes).
macro_rules! pg_reads {
    () => {
        fn device(&self, id: DeviceId) -> Result<Option<Device>> {
            Tables::device(&self.tx, id)
        }
        fn device_by_name(&self, name: &str) -> Result<Option<Device>> {
            self.tx
                .record("SELECT record FROM devices WHERE name = $1", &[&name])
        }
        fn devices(&self) -> Result<Vec<Device>> {
            self.tx
                .records("SELECT record FROM devices ORDER BY id", &[])
        }
        fn queue(&self, id: DeviceId) -> Result<Option<QueueState>> {
            Tables::queue(&self.tx, id)
        }
        fn queues(&self) -> Result<Vec<(DeviceId, QueueState)>> {
            let rows = self
                .tx
                .keyed("SELECT device, record FROM queues ORDER BY device", &[])?;
            Ok(rows.into_iter().map(|(d, q)| (DeviceId(d), q)).collect())
        }
        fn command(&self, id: DeviceId, seq: u64) -> Result<Option<Command>> {
            Tables::command(&self.tx, id, seq)
        }
        fn commands(&self, id: DeviceId, from: u64, limit: usize) -> Result<Vec<(u64, Command)>> {
            self.tx.keyed(
                "SELECT seq, record FROM commands WHERE device = $1 AND seq >= $2
                 ORDER BY seq LIMIT $3",
                &[&i(id.0), &i(from), &(limit as i64)],
            )
        }
        fn next_to_dispatch(&self, id: DeviceId) -> Result<Option<(u64, Command)>> {
            let Some(q) = Tables::queue(&self.tx, id)? else {
                return Ok(None);
            };
            if q.status != QueueStatus::Running {
                return Ok(None);
            }
            let Some(seq) = Tables::first_after(&self.tx, id, q.completed_through)? else {
                return Ok(None);
            };
            let cmd = Tables::command(&self.tx, id, seq)?.ok_or(Error::Corrupt {
                table: "commands",
                reason: "scanned command vanished",
            })?;
            Ok(Some((seq, cmd)))
        }
        fn result(&self, id: DeviceId, seq: u64) -> Result<Option<StoredResult>> {
            Tables::result(&self.tx, id, seq)
        }
        fn group_members(&self, group: &str) -> Result<Vec<DeviceId>> {
            Tables::group_members(&self.tx, group)
        }
        fn groups(&self) -> Result<Vec<(String, Vec<DeviceId>)>> {
            let mut out: Vec<(String, Vec<DeviceId>)> = Vec::new();
            for r in self.tx.query(
                "SELECT grp, device FROM group_members ORDER BY grp, device",
                &[],
            )? {
                let (g, d): (String, i64) = (r.get(0), r.get(1));
                match out.last_mut() {
                    Some((name, members)) if *name == g => members.push(DeviceId(d as u64)),
                    _ => out.push((g, vec![DeviceId(d as u64)])),
                }
            }
            Ok(out)
        }
        fn task(&self, id: TaskId) -> Result<Option<Task>> {
            Tables::task(&self.tx, id)
        }
        fn tasks(&self) -> Result<Vec<(TaskId, Task)>> {
            let rows = self
                .tx
                .keyed("SELECT id, record FROM tasks ORDER BY id", &[])?;
            Ok(rows.into_iter().map(|(t, x)| (TaskId(t), x)).collect())
        }
        fn task_status(&self, task: TaskId, dev: DeviceId) -> Result<Option<TaskDeviceStatus>> {
            Tables::task_status(&self.tx, task, dev)
        }
        fn task_statuses(&self, task: TaskId) -> Result<Vec<(DeviceId, TaskDeviceStatus)>> {
            let rows = self.tx.keyed(
                "SELECT device, record FROM task_devices WHERE task = $1 ORDER BY device",
                &[&i(task.0)],
            )?;
            Ok(rows.into_iter().map(|(d, st)| (DeviceId(d), st)).collect())
        }
        fn incomplete_tasks(&self, dev: DeviceId) -> Result<Vec<TaskId>> {
            let ids = self.tx.ids(
                "SELECT task FROM task_devices
                 WHERE device = $1 AND status IN ('pending', 'in_progress') ORDER BY task",
                &[&i(dev.0)],
            )?;
            Ok(ids.into_iter().map(TaskId).collect())
        }
        fn events_from(&self, from: EventId, limit: usize) -> Result<Vec<(EventId, Event)>> {
            self.tx.keyed(
                "SELECT id, record FROM events WHERE id >= $1 ORDER BY id LIMIT $2",
                &[&i(from), &(limit as i64)],
            )
        }
        fn last_event_id(&self) -> Result<EventId> {
            let last: Option<i64> = self
                .tx
                .query_opt("SELECT max(id) FROM events", &[])?
                .and_then(|r| r.get(0));
            Ok(last.unwrap_or(0) as u64)
        }
        fn commit_seq(&self) -> Result<u64> {
            let v: i64 = self
                .tx
                .query_opt("SELECT value FROM counters WHERE name = 'commit_seq'", &[])?
                .map(|r| r.get(0))
                .unwrap_or_default();
            Ok(v as u64)
        }
    };
}

/// A write batch on PostgreSQL: one transaction, committed by [`StoreBatch::commit`].
pub struct PgBatch<'a> {
    tx: Tx<'a>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for PgBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBatch")
            .field("operations", &self.tx.ops)
            .field("poisoned", &self.tx.cause.borrow().is_some())
            .finish()
    }
}

impl Exec for PgBatch<'_> {
    fn exec_if<T>(
        &mut self,
        op: impl Fn(&mut Cx<'_>) -> Result<T> + 'static,
        wrote: impl Fn(&T) -> bool,
    ) -> Result<T> {
        self.tx.check()?;
        match op(&mut Cx::new(&mut self.tx, &mut self.scratch)) {
            Ok(out) => {
                if wrote(&out) {
                    self.tx.ops += 1;
                }
                Ok(out)
            }
            Err(e) if e.is_refusal() => Err(e),
            Err(e) => {
                self.tx.poison(&e);
                Err(e)
            }
        }
    }
}

impl Reads for PgBatch<'_> {
    pg_reads!();
}

impl StoreBatch for PgBatch<'_> {
    fn len(&self) -> usize {
        self.tx.ops
    }

    fn operator_writes(&mut self, on: bool) {
        self.tx.operator.set(on);
    }

    fn release(&mut self, dev: DeviceId) -> Result<()> {
        let Some(m) = self.tx.member else {
            return Ok(());
        };
        self.tx.check()?;
        let r = m.release(&mut **self.tx.c.borrow_mut(), i(dev.0));
        self.tx.fenced.borrow_mut().remove(&dev.0);
        r.map_err(|e| {
            self.tx.poison(&e);
            cell_error(e)
        })
    }

    fn claim(&mut self, dev: DeviceId) -> Result<Claimed> {
        let Some(m) = self.tx.member else {
            return Ok(Claimed::Ours);
        };
        self.tx.check()?;
        self.tx.lease_live(m)?;
        self.tx.lock_events()?;
        let r = m.claim(&mut **self.tx.c.borrow_mut(), i(dev.0));
        match r {
            Ok(Claim::Owned) => Ok(Claimed::Ours),
            Ok(Claim::OwnedBy { gateway, addr }) => Ok(Claimed::Elsewhere { gateway, addr }),
            // A refusal (our own lease lapsed, no such device): the transaction goes on.
            Err(e @ (CellError::LeaseLost { .. } | CellError::NoDevice(_))) => Err(cell_error(e)),
            Err(e) => {
                self.tx.poison(&e);
                Err(cell_error(e))
            }
        }
    }

    fn commit(self: Box<Self>) -> Result<Committed> {
        self.tx.commit()
    }
}

/// A consistent read view: one repeatable-read, read-only transaction.
struct PgSnapshot<'a> {
    tx: Tx<'a>,
}

impl Reads for PgSnapshot<'_> {
    pg_reads!();
}
