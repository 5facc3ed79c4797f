//! Certificate rotation without a restart: [`CertWatch`] checks the `FN_NODE_CERT*` files
//! every `FN_TLS_RELOAD_INTERVAL` and at once on SIGHUP, and puts a replacement in use for
//! new handshakes ([`NodeTls::reload`]). Connections already open keep working while their
//! peer verifies (below).
//!
//! A replacement is written as several files, rarely at the same instant: when a change is
//! seen, the watch waits [`SETTLE`] for the writer to finish before it reads them all. A set
//! that is still inconsistent after that (a key that does not match, unparsable PEM, an
//! expired certificate, one that does not chain to the bundle) is rejected with a log line
//! naming the file and the reason; the daemon keeps the set it has, and a later good
//! replacement is picked up. The same rejection is logged once, not at every check. A
//! SIGHUP reads at once, and gives a set it finds inconsistent the same second look.
//!
//! Each read of the files is bounded ([`READ_BOUND`]): one that hangs (a hung network or
//! secrets mount) is rejected, left running, and none other is started until it returns,
//! so that the watch's other work goes on (`Reads`). A read is never made on the runtime's
//! thread: one that cannot be started or that panics is rejected, and the next check reads
//! again. A FIFO or a device in place of a file is refused without waiting
//! (`crate::material::read_file`).
//!
//! Connections opened before a change are checked again ([`NodeTls::recheck_connections`]):
//! after each new set is put in use, and every minute (certificates expire). One whose peer
//! no longer verifies is retired, and closed [`RETIRE_GRACE`] later.
//!
//! Metrics: `fn_tls_certificate_reloads_total` (sets put in use),
//! `fn_tls_certificate_reload_rejections_total` (replacements rejected),
//! `fn_tls_certificate_files_rejected` (1 while the files on disk are a rejected set and the
//! old one is served, 0 otherwise),
//! `fn_tls_connections_retired_total` (open connections whose peer stopped verifying), and
//! the expiry gauge of [`crate::expiry`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use fn_lifecycle::fs::BoundedReads;

use crate::expiry::CertExpiry;
use crate::{NodeTls, RETIRE_GRACE, Recheck, Reloaded, TlsArgs, TlsError, TlsMode};

/// How long a change must rest before the files are read as a set.
pub const SETTLE: Duration = Duration::from_millis(500);
/// How often the expiry warning is considered (the gauge is computed when scraped).
const EXPIRY_TICK: Duration = Duration::from_secs(60);
/// How long a read of the files may take before the watch goes on without it.
pub const READ_BOUND: Duration = Duration::from_secs(10);

/// Checks a node's open connections at a time with a grace: [`NodeTls::recheck_connections`]
/// (another in tests).
type CheckConnections = Arc<dyn Fn(&NodeTls, SystemTime, Duration) -> Recheck + Send + Sync>;

/// The certificate watch of one daemon.
pub struct CertWatch {
    tls: NodeTls,
    expiry: CertExpiry,
    interval: Duration,
    hangups: Option<Signal>,
    reloads: Counter,
    rejections: Counter,
    /// 1 while the files on disk are a rejected set (the old one still served): the
    /// rejection is logged and counted once, and an alert needs to see it last.
    rejected: Gauge,
    retired: Counter,
    /// How long a retired connection is kept for its calls.
    grace: Duration,
    /// When the next retired connection is to be closed.
    next_close: Option<tokio::time::Instant>,
    /// The last rejection logged, so a bad set left in place is logged once.
    last_rejection: Option<String>,
    /// Run after each new set is put in use.
    on_replaced: Option<Box<dyn Fn() + Send + Sync>>,
    /// The reads of the files, bounded in time.
    reads: Reads,
    /// How the open connections are checked, on the blocking pool.
    check: CheckConnections,
}

impl std::fmt::Debug for CertWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertWatch")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl CertWatch {
    /// The watch for a daemon in `mode`, registered in `registry`: `None` without TLS
    /// (`FN_INSECURE`). Installs the SIGHUP handler now, in either mode, so that SIGHUP
    /// never terminates the daemon once this returns (without TLS it does nothing).
    ///
    /// # Errors
    /// When the SIGHUP handler cannot be installed.
    pub fn for_mode(
        mode: &TlsMode,
        args: &TlsArgs,
        registry: &mut Registry,
    ) -> Result<Option<Self>, String> {
        let hangups = signal(SignalKind::hangup())
            .map_err(|e| format!("cannot handle SIGHUP (certificate reload): {e}"))?;
        let Some(tls) = mode.node() else {
            // tokio keeps its handler installed once registered: later SIGHUPs are ignored.
            return Ok(None);
        };
        Ok(Some(
            Self::new(
                tls.clone(),
                args.tls_reload_interval,
                Some(hangups),
                registry,
            )
            .retire_grace(args.tls_retire_grace),
        ))
    }

    /// A watch of `tls` checking every `interval` (zero: only on SIGHUP), and on each
    /// `hangups` signal when given.
    pub fn new(
        tls: NodeTls,
        interval: Duration,
        hangups: Option<Signal>,
        registry: &mut Registry,
    ) -> Self {
        let expiry = CertExpiry::register(&tls, registry);
        let reloads = Counter::default();
        let rejections = Counter::default();
        let rejected = Gauge::default();
        let retired = Counter::default();
        registry.register(
            "fn_tls_connections_retired",
            "Open gRPC connections retired because their peer's certificate no longer verifies \
             (its CA left the bundle, or it expired); each is closed after a grace",
            retired.clone(),
        );
        registry.register(
            "fn_tls_certificate_reloads",
            "Certificate sets (FN_NODE_CERT*) put in use after a change on disk",
            reloads.clone(),
        );
        registry.register(
            "fn_tls_certificate_reload_rejections",
            "Replacement certificate sets rejected; the set in use was kept",
            rejections.clone(),
        );
        registry.register(
            "fn_tls_certificate_files_rejected",
            "Whether the certificate files on disk (FN_NODE_CERT*) are a rejected set while \
             the set loaded before is served (1), or the set in use (0)",
            rejected.clone(),
        );
        CertWatch {
            tls,
            expiry,
            interval,
            hangups,
            reloads,
            rejections,
            rejected,
            retired,
            grace: RETIRE_GRACE,
            next_close: None,
            last_rejection: None,
            on_replaced: None,
            reads: Reads::new(READ_BOUND),
            check: Arc::new(|tls, now, grace| tls.recheck_connections(now, grace)),
        }
    }

    /// Runs `check` after each new set of certificates is put in use (a daemon's own checks
    /// of the new files, say).
    #[must_use]
    pub fn on_replaced(mut self, check: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_replaced = Some(Box::new(check));
        self
    }

    /// How long a retired connection is kept for its calls ([`RETIRE_GRACE`] unless set).
    #[must_use]
    pub fn retire_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Watches until cancelled. A cancellation while the watch reads the files or checks
    /// the open connections ends it at once, where it waited for a read on a hung mount up
    /// to the reads' bound: a read is left to its own thread (what a reload it made put in
    /// use stays); a check of the connections, on the blocking pool, still holds the
    /// runtime's drop until it ends (it is a signature check per connection, not a read).
    ///
    /// # Errors
    /// Never; the signature fits the lifecycle's service runner.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), std::convert::Infallible> {
        let mut expiry_tick = tokio::time::interval(EXPIRY_TICK);
        expiry_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let polling = !self.interval.is_zero();
        let mut poll = tokio::time::interval(if polling { self.interval } else { EXPIRY_TICK });
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.reset();
        loop {
            let work = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = expiry_tick.tick() => {
                    self.expiry.check(SystemTime::now());
                    Work::Recheck
                }
                () = close_due(self.next_close) => Work::Recheck,
                _ = poll.tick(), if polling => Work::Poll,
                () = next_hangup(self.hangups.as_mut()) => Work::Hangup,
            };
            let done = async {
                match work {
                    Work::Recheck => self.recheck().await,
                    Work::Poll => self.poll().await,
                    Work::Hangup => self.on_hangup().await,
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = done => {}
            }
        }
    }

    /// A periodic check: reload only when the files changed, after they settle.
    async fn poll(&mut self) {
        let mut changed = self.reads.read(&self.tls, NodeTls::changed_on_disk).await;
        if changed.as_ref().is_err_and(|e| !stalled(e)) {
            // A file caught between a writer's removal and its replacement (tools that
            // delete, then create): one more look before it is logged and counted.
            tokio::time::sleep(SETTLE).await;
            changed = self.reads.read(&self.tls, NodeTls::changed_on_disk).await;
        }
        match changed {
            Ok(false) => {
                self.last_rejection = None;
                self.rejected.set(0);
            }
            Ok(true) => {
                tokio::time::sleep(SETTLE).await;
                let outcome = self.settled_reload().await;
                self.record(outcome, false).await;
            }
            Err(e) => self.record(Err(e), false).await,
        }
    }

    /// Checks the open connections' peers again, on the blocking pool (a signature check
    /// per connection: thousands of them must not hold up a runtime thread); see
    /// [`NodeTls::recheck_connections`].
    ///
    /// A check that fails (it panicked) leaves a close still to come as it was, and forgets
    /// one that is due: kept, a due close would end the next wait of [`CertWatch::run`] at
    /// once, and the next, each time with a check that may fail the same way, for ever (a
    /// loop of checks and ERROR lines). The minute's check tries again, and closes then the
    /// retired connections whose grace is over.
    async fn recheck(&mut self) {
        let (tls, grace, check) = (self.tls.clone(), self.grace, Arc::clone(&self.check));
        let check = move || check(&tls, SystemTime::now(), grace);
        let Recheck {
            retired,
            next_close,
            ..
        } = match tokio::task::spawn_blocking(check).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(error = %e, "checking the open connections failed; the next check is within a minute");
                let now = tokio::time::Instant::now();
                self.next_close = self.next_close.filter(|at| *at > now);
                return;
            }
        };
        self.retired.inc_by(retired as u64);
        self.next_close = next_close;
    }

    async fn on_hangup(&mut self) {
        tracing::info!("SIGHUP: checking the certificate files");
        let outcome = self.settled_reload().await;
        self.record(outcome, true).await;
    }

    /// Reads the files and puts them in use when they changed; a set that is rejected gets
    /// one more look after [`SETTLE`]: it may have been caught between a writer's files (a
    /// key renamed into place before its certificate, or a writer slower than the settling
    /// time), and a good rotation is not to be logged and counted as rejected. A read that
    /// hung is not tried again: it is still running.
    async fn settled_reload(&mut self) -> Result<Reloaded, TlsError> {
        let outcome = self.reads.read(&self.tls, NodeTls::reload).await;
        match outcome {
            Err(e) if !stalled(&e) => {
                tokio::time::sleep(SETTLE).await;
                self.reads.read(&self.tls, NodeTls::reload).await
            }
            outcome => outcome,
        }
    }

    async fn record(&mut self, outcome: Result<Reloaded, TlsError>, asked: bool) {
        match outcome {
            Ok(Reloaded::Replaced) => {
                self.last_rejection = None;
                self.rejected.set(0);
                self.reloads.inc();
                self.expiry.replaced(SystemTime::now());
                let not_after = humantime::format_rfc3339_seconds(self.tls.not_after());
                tracing::info!(%not_after, "new certificates in use for new connections (FN_NODE_CERT, FN_NODE_CERT_KEY, FN_NODE_CERT_AUTHORITY)");
                if let Some(check) = &self.on_replaced {
                    check();
                }
                self.recheck().await;
            }
            Ok(Reloaded::Unchanged) => {
                self.rejected.set(0);
                if asked {
                    tracing::info!("the certificate files are unchanged");
                }
            }
            Err(e) => {
                self.rejected.set(1);
                let message = e.to_string();
                if asked || self.last_rejection.as_ref() != Some(&message) {
                    self.rejections.inc();
                    tracing::error!(error = %message, "certificate replacement rejected; the certificates in use are kept");
                    self.last_rejection = Some(message);
                }
            }
        }
    }
}

/// Whether `e` is a read that was not made or has not returned (rather than files found
/// wrong): not looked at again after [`SETTLE`], as a set caught mid-write is.
fn stalled(e: &TlsError) -> bool {
    matches!(e, TlsError::Stalled { .. } | TlsError::NotRead { .. })
}

/// The reads of the files, each on a thread of its own (a slow network volume, a secrets
/// mount must not hold up a runtime thread, which on a sharded daemon carries calls) and
/// waited for `bound` at most: a read that hangs (a hung NFS or FUSE mount) must not stop
/// the watch's other work, closing retired connections and warning of expiry. Such a read
/// is left running, and none other is started until it returns
/// ([`fn_lifecycle::fs::BoundedReads`]). A read that cannot be made so (no thread can be
/// started, or it panicked) is an error, never made on the runtime thread instead.
struct Reads {
    work: BoundedReads,
}

impl Reads {
    fn new(bound: Duration) -> Self {
        Reads {
            work: BoundedReads::new("fn-tls-read", "the certificate files", bound),
        }
    }

    /// `read` of `tls`, or [`TlsError::Stalled`] when it has not returned within the bound
    /// (or an earlier one still has not), or [`TlsError::NotRead`] when no thread could be
    /// started for it or it panicked.
    async fn read<T: Send + 'static>(
        &mut self,
        tls: &NodeTls,
        read: fn(&NodeTls) -> Result<T, TlsError>,
    ) -> Result<T, TlsError> {
        let moved = tls.clone();
        match self.work.read(move || read(&moved)).await {
            Ok(outcome) => outcome,
            Err(e) => {
                let (var, path) = tls.reading().unwrap_or_else(|| tls.file("FN_NODE_CERT"));
                Err(if e.is_stalled() {
                    TlsError::Stalled {
                        var,
                        path,
                        waited: self.work.bound(),
                    }
                } else {
                    TlsError::NotRead {
                        var,
                        path,
                        reason: e.to_string(),
                    }
                })
            }
        }
    }
}

/// What woke [`CertWatch::run`].
enum Work {
    /// Check the open connections (the minute's tick, or a retired connection's close).
    Recheck,
    /// Look whether the files changed.
    Poll,
    /// SIGHUP: read the files.
    Hangup,
}

/// When the next retired connection is to be closed; never without one.
async fn close_due(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next SIGHUP; never without a handler, or once the signal driver is gone.
async fn next_hangup(hangups: Option<&mut Signal>) {
    if let Some(signal) = hangups
        && signal.recv().await.is_some()
    {
        return;
    }
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// A check of the open connections that fails when a retired connection's grace ends
    /// is not run again and again: the close it was due for is forgotten, and the minute's
    /// check tries again. It ran without a pause before, each time at once (the close
    /// stayed due), an ERROR line and a panic each.
    #[tokio::test(start_paused = true)]
    async fn a_check_that_fails_at_a_close_is_not_run_again_at_once() {
        let tls = crate::dev::DevCa::new("test CA")
            .expect("ca")
            .node_tls(&[])
            .expect("tls");
        let cancel = CancellationToken::new();
        let checks = Arc::new(AtomicUsize::new(0));
        let mut watch = CertWatch::new(tls, Duration::ZERO, None, &mut Registry::default());
        watch.check = {
            let (checks, cancel) = (Arc::clone(&checks), cancel.clone());
            Arc::new(move |_, _, _| {
                let n = checks.fetch_add(1, Ordering::SeqCst) + 1;
                if n > 20 {
                    cancel.cancel(); // a loop: ended here, so that the test ends
                }
                assert!(n == 1, "a check that fails (check {n})");
                // The first check (the minute's first tick, at once) retires a connection,
                // to be closed in a second.
                Recheck {
                    retired: 1,
                    next_close: Some(tokio::time::Instant::now() + Duration::from_secs(1)),
                    ..Recheck::default()
                }
            })
        };
        let running = tokio::spawn(watch.run(cancel.clone()));
        tokio::time::sleep(Duration::from_secs(10)).await;
        cancel.cancel();
        running.await.expect("the watch ends").expect("infallible");
        assert_eq!(
            checks.load(Ordering::SeqCst),
            2,
            "the minute's first, and the close's (which failed)"
        );
    }

    /// A shutdown while the watch waits for work on a thread (here a check of the open
    /// connections that hangs; a read of the files on a hung mount is the same) ends the
    /// watch at once, where it waited for the work to end.
    #[tokio::test]
    async fn a_shutdown_does_not_wait_for_the_watchs_work_on_a_thread() {
        let tls = crate::dev::DevCa::new("test CA")
            .expect("ca")
            .node_tls(&[])
            .expect("tls");
        let cancel = CancellationToken::new();
        let (started, released) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let mut watch = CertWatch::new(tls, Duration::ZERO, None, &mut Registry::default());
        watch.check = {
            let (started, released) = (Arc::clone(&started), Arc::clone(&released));
            Arc::new(move |_, _, _| {
                started.store(true, Ordering::SeqCst);
                let start = std::time::Instant::now();
                while !released.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(10)
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Recheck::default()
            })
        };
        let running = tokio::spawn(watch.run(cancel.clone()));
        // The minute's first tick comes at once, with a check.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !started.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "no check started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let cancelled = std::time::Instant::now();
        cancel.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(15), running).await;
        let waited = cancelled.elapsed();
        released.store(true, Ordering::SeqCst);
        ended
            .expect("the watch ends")
            .expect("joined")
            .expect("infallible");
        assert!(
            waited < Duration::from_secs(1),
            "the watch waited {waited:?} for its check after the cancellation"
        );
    }

    /// Set by the test when the reads below are to return.
    static RELEASED: AtomicBool = AtomicBool::new(false);
    static STARTED: AtomicUsize = AtomicUsize::new(0);

    /// A read that hangs until [`RELEASED`] (30 s at most).
    fn hanging(_: &NodeTls) -> Result<Reloaded, TlsError> {
        STARTED.fetch_add(1, Ordering::SeqCst);
        let start = std::time::Instant::now();
        while !RELEASED.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Reloaded::Unchanged)
    }

    /// A read that hangs (a hung NFS or FUSE mount) is given up after the bound, and no
    /// other is started while it still hangs (each check would leave a thread blocked);
    /// once it returns, the next check reads again.
    #[tokio::test]
    async fn a_read_that_hangs_is_bounded_and_not_started_again_until_it_returns() {
        let tls = crate::dev::DevCa::new("test CA")
            .expect("ca")
            .node_tls(&[])
            .expect("tls");
        let bound = Duration::from_millis(200);
        let mut reads = Reads::new(bound);

        let start = std::time::Instant::now();
        let first = reads.read(&tls, hanging).await;
        let waited = start.elapsed();
        assert!(matches!(first, Err(TlsError::Stalled { .. })), "{first:?}");
        assert!(
            waited >= bound && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert_eq!(STARTED.load(Ordering::SeqCst), 1);

        let start = std::time::Instant::now();
        let again = reads.read(&tls, hanging).await;
        assert!(matches!(again, Err(TlsError::Stalled { .. })), "{again:?}");
        assert!(start.elapsed() < bound, "{:?}", start.elapsed());
        assert_eq!(
            STARTED.load(Ordering::SeqCst),
            1,
            "a second read started while the first hangs"
        );

        RELEASED.store(true, Ordering::SeqCst);
        let returned = std::time::Instant::now();
        while reads.work.is_stuck() {
            assert!(
                returned.elapsed() < Duration::from_secs(5),
                "the read never returned"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let after = reads.read(&tls, hanging).await;
        assert!(matches!(after, Ok(Reloaded::Unchanged)), "{after:?}");
        assert_eq!(STARTED.load(Ordering::SeqCst), 2);
    }

    static PANICKED: AtomicUsize = AtomicUsize::new(0);

    /// A read that panics, as a bug in the parsing of a file might.
    fn panicking(_: &NodeTls) -> Result<Reloaded, TlsError> {
        PANICKED.fetch_add(1, Ordering::SeqCst);
        panic!("a read that panics (test)");
    }

    /// A read that panics is an error (counted as a rejected reload, and tried again at
    /// the next check), never made again on the runtime's thread, where a hung mount would
    /// stall every call. (A thread that cannot be started: fn_lifecycle::fs's tests.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_read_that_panics_is_an_error_not_made_again_on_the_runtime() {
        let tls = crate::dev::DevCa::new("test CA")
            .expect("ca")
            .node_tls(&[])
            .expect("tls");
        let mut reads = Reads::new(Duration::from_secs(5));

        let panicked = reads.read(&tls, panicking).await;
        let Err(e @ TlsError::NotRead { .. }) = &panicked else {
            panic!("{panicked:?}");
        };
        let message = e.to_string();
        assert!(
            message.contains("was not read: it panicked") && message.contains("next check"),
            "{message}"
        );
        assert_eq!(
            PANICKED.load(Ordering::SeqCst),
            1,
            "read again after its panic"
        );
        assert!(!reads.work.is_stuck());
    }
}
