//! The cell lease, renewed on a thread and a connection of its own.
//!
//! Why a thread: a batch of a busy gateway (a thousand enrolments, a storm of claims after
//! another gateway died) can take longer than a lease. Renewed between batches, the lease of
//! a gateway that is only slow would lapse, and with it every device it holds, exactly when
//! the cell can least afford the moves. Fencing does not depend on the renewal's timing:
//! every write checks the lease inside its own transaction ([`super::cell`]), so renewing
//! beside the batches is as safe as renewing between them.
//!
//! Rules:
//! - The keeper renews every `every` on its own connection (made again after a failure)
//!   and records when the last renewal that succeeded was sent.
//! - A renewal refused because the lease ran out joins the cell again as the next
//!   incarnation; the store learns it at its next [`LeaseKeeper::poll`] and swaps the
//!   membership its batches are fenced by.
//! - By this gateway's own clock, a lease not renewed for its whole length may have lapsed
//!   (the database cannot be reached: a partition, a restart): [`Poll::Lapsed`] is reported
//!   once, so the gateway stops serving its sessions, and claims are refused at once
//!   ([`LeaseKeeper::lapsed`]) instead of waiting on a database that does not answer.
//! - Connections time out: TCP keepalives and a user timeout (set on the configuration by
//!   [`with_timeouts`]) make a silent network fail a statement in about a lease, instead of
//!   leaving the thread waiting forever; the server ends a transaction left idle for a lease,
//!   so a cut-off gateway's row locks do not hold up the gateways taking its devices.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cell::{CellError, Membership};

/// What the keeper has to tell the store.
#[derive(Debug)]
pub(crate) enum Poll {
    /// Renewed, or nothing new.
    Held,
    /// No renewal succeeded for a whole lease: it may have lapsed (reported once).
    Lapsed,
    /// The lease had run out: the keeper joined again as this membership.
    Rejoined(Membership),
    /// The last renewal failed (the lease may still be live).
    Failed(postgres::Error),
}

#[derive(Debug)]
struct State {
    member: Membership,
    rejoined: bool,
    error: Option<postgres::Error>,
    /// When the last renewal that succeeded was sent (or the join).
    renewed: Instant,
    lapsed_told: bool,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic on the keeper thread leaves the state as it was: still the truth.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The lease-renewing thread of a gateway in a cell.
#[derive(Debug)]
pub(crate) struct LeaseKeeper {
    shared: Arc<Shared>,
    lease: Duration,
    thread: Option<JoinHandle<()>>,
}

/// `cfg` with the timeouts that bound a statement on a silent network (see the module's
/// rules), unless the URL set its own: keepalives after 1 s idle, every second, 3 probes;
/// unacknowledged data aborts after `lease`; a connect gives up after `lease`.
///
/// And on the server's side, `idle_in_transaction_session_timeout` of a lease: a gateway cut
/// off in the middle of a batch leaves its transaction open on the server, holding the row
/// locks of its devices, which the gateways taking them over would wait on forever. The
/// server ends such a transaction (rolled back: nothing of it was acknowledged) after a lease.
pub(crate) fn with_timeouts(cfg: &mut postgres::Config, lease: Duration) {
    let idle = format!(
        "-c idle_in_transaction_session_timeout={}",
        lease.as_millis()
    );
    let options = match cfg.get_options() {
        Some(o) if o.contains("idle_in_transaction_session_timeout") => o.to_string(),
        Some(o) => format!("{o} {idle}"),
        None => idle,
    };
    cfg.options(&options);
    cfg.keepalives(true);
    if cfg.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        cfg.keepalives_idle(Duration::from_secs(1));
    }
    if cfg.get_keepalives_interval().is_none() {
        cfg.keepalives_interval(Duration::from_secs(1));
    }
    if cfg.get_keepalives_retries().is_none() {
        cfg.keepalives_retries(3);
    }
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(lease);
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(lease);
    }
}

/// The keeper's clock: when a renewal is sent.
#[allow(clippy::disallowed_methods)] // The lease thread is a driver: it reads the clock.
fn now() -> Instant {
    Instant::now()
}

impl LeaseKeeper {
    /// Starts renewing `member`'s lease every `every` on connections made from `cfg`.
    pub(crate) fn start(
        cfg: postgres::Config,
        member: Membership,
        lease: Duration,
        every: Duration,
    ) -> std::io::Result<LeaseKeeper> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                member,
                rejoined: false,
                error: None,
                renewed: now(),
                lapsed_told: false,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("cell-lease".into())
            .spawn(move || run(&s, &cfg, every))?;
        Ok(LeaseKeeper {
            shared,
            lease,
            thread: Some(thread),
        })
    }

    /// What happened since the last poll.
    pub(crate) fn poll(&self) -> Poll {
        let mut st = self.shared.lock();
        if std::mem::take(&mut st.rejoined) {
            st.lapsed_told = false;
            return Poll::Rejoined(st.member.clone());
        }
        if !st.lapsed_told && st.renewed.elapsed() >= self.lease {
            st.lapsed_told = true;
            return Poll::Lapsed;
        }
        match st.error.take() {
            Some(e) => Poll::Failed(e),
            None => Poll::Held,
        }
    }

    /// Whether, by this gateway's clock, the lease may have lapsed (no renewal for a whole
    /// lease) and not been joined again yet.
    pub(crate) fn lapsed(&self) -> bool {
        let st = self.shared.lock();
        !st.rejoined && st.renewed.elapsed() >= self.lease
    }

    /// The membership the keeper renews now.
    pub(crate) fn member(&self) -> Membership {
        self.shared.lock().member.clone()
    }

    /// Stops the thread (it renews no more) and returns the membership it last held.
    pub(crate) fn stop(mut self) -> Membership {
        self.halt();
        self.member()
    }

    /// Tells the thread to stop and waits for it (once: later calls find no thread).
    fn halt(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The keeper thread: renew, wait `every`, until stopped.
fn run(shared: &Shared, cfg: &postgres::Config, every: Duration) {
    let mut client: Option<postgres::Client> = None;
    loop {
        let member = {
            let st = shared.lock();
            let (st, _) = shared
                .wake
                .wait_timeout_while(st, every, |st| !st.stop)
                .unwrap_or_else(|p| p.into_inner());
            if st.stop {
                return;
            }
            st.member.clone()
        };
        let sent = now();
        let outcome = match client.as_mut() {
            Some(c) => renew(c, &member),
            None => match cfg.connect(postgres::NoTls) {
                Ok(mut c) => {
                    let r = renew(&mut c, &member);
                    client = Some(c);
                    r
                }
                Err(e) => Err(CellError::Database(e)),
            },
        };
        let mut st = shared.lock();
        match outcome {
            Ok(Some(next)) => {
                st.member = next;
                st.rejoined = true;
                st.renewed = sent;
            }
            Ok(None) => st.renewed = sent,
            Err(e) => {
                if client.as_ref().is_none_or(postgres::Client::is_closed)
                    || matches!(&e, CellError::Database(d) if d.as_db_error().is_none())
                {
                    client = None;
                }
                if let CellError::Database(d) = e {
                    st.error = Some(d);
                }
            }
        }
    }
}

/// One renewal; `Some`: the lease had run out and this is the next incarnation.
fn renew(c: &mut postgres::Client, m: &Membership) -> Result<Option<Membership>, CellError> {
    match m.renew(c) {
        Ok(()) => Ok(None),
        Err(CellError::LeaseLost { .. }) => m.rejoin(c).map(Some),
        Err(e) => Err(e),
    }
}
