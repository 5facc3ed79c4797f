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
//! replacement is picked up. The same rejection is logged once, not at every check.
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

use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::expiry::CertExpiry;
use crate::{NodeTls, RETIRE_GRACE, Recheck, Reloaded, TlsArgs, TlsError, TlsMode};

/// How long a change must rest before the files are read as a set.
pub const SETTLE: Duration = Duration::from_millis(500);
/// How often the expiry warning is considered (the gauge is computed when scraped).
const EXPIRY_TICK: Duration = Duration::from_secs(60);

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

    /// Watches until cancelled.
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
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = expiry_tick.tick() => {
                    self.expiry.check(SystemTime::now());
                    self.recheck().await;
                }
                () = close_due(self.next_close) => self.recheck().await,
                _ = poll.tick(), if polling => self.poll().await,
                () = next_hangup(self.hangups.as_mut()) => self.on_hangup().await,
            }
        }
    }

    /// A periodic check: reload only when the files changed, after they settle.
    async fn poll(&mut self) {
        let mut changed = off_thread(&self.tls, NodeTls::changed_on_disk).await;
        if changed.is_err() {
            // A file caught between a writer's removal and its replacement (tools that
            // delete, then create): one more look before it is logged and counted.
            tokio::time::sleep(SETTLE).await;
            changed = off_thread(&self.tls, NodeTls::changed_on_disk).await;
        }
        match changed {
            Ok(false) => {
                self.last_rejection = None;
                self.rejected.set(0);
            }
            Ok(true) => {
                tokio::time::sleep(SETTLE).await;
                let mut outcome = off_thread(&self.tls, NodeTls::reload).await;
                if outcome.is_err() {
                    // Caught between a writer's files (a key renamed into place before its
                    // certificate, or a writer slower than the settling time): one more look
                    // before a good rotation is logged and counted as rejected.
                    tokio::time::sleep(SETTLE).await;
                    outcome = off_thread(&self.tls, NodeTls::reload).await;
                }
                self.record(outcome, false).await;
            }
            Err(e) => self.record(Err(e), false).await,
        }
    }

    /// Checks the open connections' peers again, on the blocking pool (a signature check
    /// per connection: thousands of them must not hold up a runtime thread); see
    /// [`NodeTls::recheck_connections`].
    async fn recheck(&mut self) {
        let (tls, grace) = (self.tls.clone(), self.grace);
        let check = move || tls.recheck_connections(SystemTime::now(), grace);
        let Recheck {
            retired,
            next_close,
            ..
        } = match tokio::task::spawn_blocking(check).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(error = %e, "checking the open connections failed");
                return;
            }
        };
        self.retired.inc_by(retired as u64);
        self.next_close = next_close;
    }

    async fn on_hangup(&mut self) {
        tracing::info!("SIGHUP: checking the certificate files");
        let outcome = off_thread(&self.tls, NodeTls::reload).await;
        self.record(outcome, true).await;
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

/// `read` of `tls` on the blocking pool: file reads (a slow network volume, a secrets
/// mount) must not hold up a runtime thread, which on a sharded daemon carries calls. Run
/// here when the pool is gone (the runtime shutting down).
async fn off_thread<T: Send + 'static>(tls: &NodeTls, read: fn(&NodeTls) -> T) -> T {
    let moved = tls.clone();
    match tokio::task::spawn_blocking(move || read(&moved)).await {
        Ok(value) => value,
        Err(_) => read(tls),
    }
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
