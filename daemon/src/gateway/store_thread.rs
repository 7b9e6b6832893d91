//! The store thread: the fleet's batches are applied and committed off the event loop.
//!
//! The thread owns the [`Fleet`] (store engine, who is online, deadlines): one owner for the
//! state every batch reads and writes, so nothing is shared or locked. The loop hands it one
//! iteration's inputs at a time ([`StoreThread::submit`]) and goes on reading and writing
//! sockets while the batch is applied and committed (its fsync); the thread then sends the
//! batch's actions back and wakes the loop with a [`mio::Waker`]. The loop releases those
//! actions (acknowledgements, next commands) only when it takes them
//! ([`StoreThread::take_done`]), i.e. after the commit: as before, nothing is acknowledged
//! before it is durable, and a failed commit acknowledges nothing (the fleet closes the
//! sessions of that batch).
//!
//! One batch is in flight at a time. Inputs that arrive meanwhile wait for the next batch,
//! which keeps the order of every device's inputs and lets a batch read the state the
//! previous one committed. Group commit grows with load: the longer a commit takes, the more
//! inputs the next batch carries.
//!
//! Reads the loop needs now (metrics, backup, a task row for an announce) and retention
//! passes run on the thread too ([`StoreThread::call`]), after the batch in flight.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use fleetcast_wire::Instant;

use super::Gateway;
use crate::fleet::{Action, Fleet, Input};

/// The loop's side: one step per iteration.
impl Gateway {
    /// Releases the actions of the batch in flight once it is committed, then hands the
    /// inputs gathered meanwhile (and due deadlines) to the store thread as the next batch.
    pub(super) fn process_fleet(&mut self, now: Instant, wall: u64) {
        if let Some(actions) = self.fleet.take_done() {
            for a in actions {
                self.apply(a, now);
            }
        }
        if self.fleet.busy() {
            return;
        }
        let due = self.fleet.next_deadline().is_some_and(|d| d <= wall);
        if self.inputs.is_empty() && !due {
            return;
        }
        let inputs = std::mem::take(&mut self.inputs);
        for i in &inputs {
            match i {
                Input::Result { .. } => self.telemetry.counters.results += 1,
                Input::Admin { .. } => self.telemetry.counters.admin_requests += 1,
                _ => {}
            }
        }
        self.fleet.submit(wall, inputs);
    }

    /// One bounded retention pass when due (see [`crate::retention`]).
    pub(super) fn prune(&mut self, now: Instant, wall: u64) {
        // Not while a batch is in flight: the pass would wait for its commit.
        if self.pruner.next_due() > now || self.fleet.busy() {
            return;
        }
        let mut pruner = self.pruner.clone();
        let (pruner, pass) = self.fleet.call(move |f| {
            let pass = pruner.run_due(f.store_mut(), now, wall);
            (pruner, pass)
        });
        self.pruner = pruner;
        match pass {
            Some(Ok(p)) if p.events + p.results > 0 => {
                tracing::debug!(
                    events = p.events,
                    results = p.results,
                    more = p.more,
                    "retention: pruned"
                );
            }
            Some(Err(e)) => tracing::warn!(error = %e, "retention pass failed; retried later"),
            _ => {}
        }
    }
}

/// Work for the thread, in order.
enum Job {
    Batch { now_ms: u64, inputs: Vec<Input> },
    Call(Box<dyn FnOnce(&mut Fleet) + Send>),
}

/// A committed (or failed) batch: what to send, and the fleet's next deadline after it.
struct Done {
    actions: Vec<Action>,
    next_deadline: Option<u64>,
}

/// The loop's handle on the store thread.
pub(super) struct StoreThread {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    /// A batch was submitted and its outcome not yet taken.
    busy: bool,
    /// The fleet's earliest deadline as of the last batch (only batches change it).
    next_deadline: Option<u64>,
}

impl std::fmt::Debug for StoreThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreThread")
            .field("busy", &self.busy)
            .finish_non_exhaustive()
    }
}

impl StoreThread {
    /// Moves `fleet` onto a new thread that wakes the loop through `waker` after each batch.
    pub(super) fn spawn(fleet: Fleet, waker: Arc<mio::Waker>) -> std::io::Result<StoreThread> {
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let next_deadline = fleet.next_deadline();
        let thread = std::thread::Builder::new()
            .name("fleetcast-store".into())
            .spawn(move || run(fleet, &job_rx, &done_tx, &waker))?;
        Ok(StoreThread {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            busy: false,
            next_deadline,
        })
    }

    /// Whether a batch is being applied and committed.
    pub(super) fn busy(&self) -> bool {
        self.busy
    }

    /// The fleet's earliest deadline (wall ms), as of the last batch.
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.next_deadline
    }

    /// Hands one batch of inputs to the thread (the loop calls this only when not busy).
    pub(super) fn submit(&mut self, now_ms: u64, inputs: Vec<Input>) {
        debug_assert!(!self.busy, "one batch in flight at a time");
        if self.send(Job::Batch { now_ms, inputs }) {
            self.busy = true;
        }
    }

    /// The actions of the batch in flight, once it is committed (`None`: not yet).
    pub(super) fn take_done(&mut self) -> Option<Vec<Action>> {
        if !self.busy {
            return None;
        }
        let d = match self.done.try_recv() {
            Ok(d) => d,
            Err(mpsc::TryRecvError::Empty) => return None,
            Err(mpsc::TryRecvError::Disconnected) => thread_gone(),
        };
        self.busy = false;
        self.next_deadline = d.next_deadline;
        Some(d.actions)
    }

    /// Runs `f` on the fleet (after the batch in flight, if any) and waits for its answer.
    pub(super) fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Fleet) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = mpsc::sync_channel(1);
        let job = Job::Call(Box::new(move |fleet| {
            let _ = tx.send(f(fleet));
        }));
        let sent = self.send(job);
        match rx.recv() {
            Ok(r) if sent => r,
            _ => thread_gone(),
        }
    }

    fn send(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }
}

/// The thread is gone: the fleet panicked on it. Nothing more can be committed, so the loop
/// ends the same way it did when the fleet ran on it.
#[allow(clippy::panic)]
fn thread_gone() -> ! {
    panic!("the store thread ended")
}

impl Drop for StoreThread {
    /// Lets the thread finish what it was given (a batch in flight commits) and joins it.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    mut fleet: Fleet,
    jobs: &mpsc::Receiver<Job>,
    done: &mpsc::Sender<Done>,
    waker: &mio::Waker,
) {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Batch { now_ms, inputs } => {
                let actions = fleet.process(now_ms, inputs);
                let next_deadline = fleet.next_deadline();
                if done
                    .send(Done {
                        actions,
                        next_deadline,
                    })
                    .is_err()
                {
                    return;
                }
                if let Err(e) = waker.wake() {
                    tracing::error!(error = %e, "cannot wake the event loop");
                }
            }
            Job::Call(f) => f(&mut fleet),
        }
    }
    // The loop let go of the thread: the gateway is stopping.
    fleet.leave_cell();
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    use fleetcast_store::{Engine, Reads, Store, StoreBatch};

    use super::super::{Gateway, GatewayConfig};
    use crate::fleet::{Fleet, FleetConfig};
    use crate::pki::Pki;

    /// An engine whose batches wait for a permit: a store stuck in a commit.
    struct Gated {
        inner: Store,
        permits: mpsc::Receiver<()>,
        timed_out: Arc<AtomicBool>,
    }

    impl Engine for Gated {
        fn batch(&mut self) -> fleetcast_store::Result<Box<dyn StoreBatch + '_>> {
            // Bounded: a loop that waits for the store (the old design) gets its answer late
            // instead of never, and the test sees the order.
            if self.permits.recv_timeout(Duration::from_secs(5)).is_err() {
                self.timed_out.store(true, Ordering::SeqCst);
            }
            Engine::batch(&mut self.inner)
        }
        fn snapshot(&self) -> fleetcast_store::Result<Box<dyn Reads + '_>> {
            Engine::snapshot(&self.inner)
        }
        fn backup(&self, dest: &Path) -> fleetcast_store::Result<()> {
            Engine::backup(&self.inner, dest)
        }
    }

    #[test]
    fn the_loop_serves_connections_while_a_batch_commits() {
        let dir = tempfile::tempdir().unwrap();
        // Any instant: the certificates are not checked by this test.
        let wall = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let pki =
            Pki::load_or_create(&dir.path().join("pki"), &["localhost".into()], wall).unwrap();
        let (permit, permits) = mpsc::channel();
        let timed_out = Arc::new(AtomicBool::new(false));
        let engine = Gated {
            inner: Store::open(dir.path().join("store")).unwrap(),
            permits,
            timed_out: timed_out.clone(),
        };
        let fleet = Fleet::new(engine, pki, FleetConfig::default()).unwrap();
        let cfg = GatewayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_socket: dir.path().join("admin.sock"),
            ..GatewayConfig::default()
        };
        let mut gw = Gateway::bind(cfg, fleet).unwrap();
        let addr = gw.local_addr().unwrap();
        // A batch is in flight and its store is stuck.
        let input = crate::fleet::Input::Disconnected {
            conn: 1,
            device: None,
            reason: "test".into(),
        };
        gw.fleet.submit(1, vec![input]);
        assert!(gw.fleet.busy());
        // Meanwhile a client on the agent port gets its answer from the loop.
        let client = std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut head = [0u8; 12];
            s.read_exact(&mut head).unwrap();
            head
        });
        for _ in 0..200 {
            if client.is_finished() {
                break;
            }
            gw.run_for(Some(Duration::from_millis(50))).unwrap();
        }
        let head = client.join().unwrap();
        assert_eq!(&head, b"HTTP/1.1 404");
        assert!(
            !timed_out.load(Ordering::SeqCst),
            "the loop waited for the store before it answered"
        );
        assert!(gw.fleet.busy(), "the batch is still in flight");
        // The commit goes through; its outcome is taken once the store thread wakes the loop.
        // (The second permit is the first retention pass's batch, due at once.)
        permit.send(()).unwrap();
        permit.send(()).unwrap();
        for _ in 0..200 {
            if !gw.fleet.busy() {
                break;
            }
            gw.run_for(Some(Duration::from_millis(50))).unwrap();
        }
        assert!(!gw.fleet.busy(), "the committed batch's outcome was taken");
        // Later batches (if any) must not wait out the gate while the gateway joins its thread.
        drop(permit);
        drop(gw);
    }
}
