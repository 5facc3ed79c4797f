//! Catalog reloads on SIGHUP ([`CatalogReload`]): the file is read and parsed on a thread of
//! its own, waited for [`READ_BOUND`] at most ([`fn_lifecycle::fs::BoundedReads`]), and only
//! the parsed catalog is swapped in on the runtime. A read that hangs (the catalog on a hung
//! network mount) must not hold a runtime thread: with `FN_WORKER_THREADS=1` that thread
//! carries every call. Such a read is left running and the old catalog kept; the next SIGHUP
//! reads again once it has returned. A shutdown does not wait for the read: the reload is
//! dropped, and the read left to its thread.
//!
//! Metric: `fn_lb_catalog_reload_rejections_total` (reloads rejected: a bad file, or one
//! that could not be read in time).

use std::sync::Arc;
use std::time::Duration;

use fn_lifecycle::fs::BoundedReads;
use fn_nodepool::RunnerPool;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::signal::unix::Signal;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, CatalogError, CatalogHandle};
use crate::metrics::LbMetrics;

/// How long a read of the catalog may take before the reload is given up.
pub const READ_BOUND: Duration = Duration::from_secs(10);

/// Reloads the catalog on every SIGHUP, drops the metrics series of functions no longer in
/// it, and has the runner pool forget the LB groups it no longer names (their runner lists,
/// and fetching them from the npm); a bad file, or one that cannot be read in time, keeps the old catalog and is
/// counted as a rejection.
#[derive(Debug)]
pub struct CatalogReload {
    catalog: Arc<CatalogHandle>,
    metrics: LbMetrics,
    /// Told the catalog's groups after each reload.
    pool: Arc<dyn RunnerPool>,
    rejections: Counter,
    /// The reads of the file, bounded in time, one stuck at most.
    reads: BoundedReads,
}

impl CatalogReload {
    /// Reloads of `catalog`, whose rejections are registered in `registry`; `pool` forgets
    /// the groups a reload no longer names.
    pub fn new(
        catalog: Arc<CatalogHandle>,
        metrics: LbMetrics,
        pool: Arc<dyn RunnerPool>,
        registry: &mut Registry,
    ) -> Self {
        let rejections = Counter::default();
        registry.register(
            "fn_lb_catalog_reload_rejections",
            "Catalog reloads (SIGHUP) rejected for a bad file, or one not read in time; the \
             previous catalog stays",
            rejections.clone(),
        );
        CatalogReload {
            reads: reads_of(&catalog, READ_BOUND),
            catalog,
            metrics,
            pool,
            rejections,
        }
    }

    /// How long a read of the file may take ([`READ_BOUND`] unless set).
    #[must_use]
    pub fn read_bound(mut self, bound: Duration) -> Self {
        self.reads = reads_of(&self.catalog, bound);
        self
    }

    /// Reloads at each of `hangups` until cancelled. A cancellation while a reload reads the
    /// file ends it at once: the read is left to its thread (and [`BoundedReads`]' bound),
    /// and nothing is put in use after it; the shutdown waited for a read that hung, up to
    /// [`READ_BOUND`].
    ///
    /// # Errors
    /// When the SIGHUP handler could not be installed.
    pub async fn run(
        mut self,
        hangups: std::io::Result<Signal>,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        let mut hup = hangups?;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                received = hup.recv() => {
                    if received.is_none() {
                        return Ok(());
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        // Logged and counted within.
                        _ = self.reload() => {}
                    }
                }
            }
        }
    }

    /// Reads the file off the runtime and puts it in use; a rejection is logged and counted,
    /// and the old catalog stays.
    ///
    /// # Errors
    /// Why the file was rejected: invalid, emptied, or not read in time.
    pub async fn reload(&mut self) -> Result<usize, CatalogError> {
        let path = self.catalog.path().to_owned();
        let read = path.clone();
        let outcome = match self.reads.read(move || Catalog::load(&read)).await {
            Ok(loaded) => loaded.and_then(|catalog| {
                // The pool takes the groups of both catalogs while the new one goes in: a
                // call of a group it adds, looked up once it is in and before the pool is
                // told below, would be refused a place in the pool (its wake-ups lost).
                let old = self.catalog.current();
                let mut both = old.lb_groups();
                both.extend(catalog.lb_groups());
                self.pool.retain_groups(&both);
                self.catalog.replace(catalog)
            }),
            Err(source) => Err(CatalogError::NotRead { path, source }),
        };
        match &outcome {
            Ok(count) => {
                tracing::info!(functions = count, "catalog reloaded");
                let current = self.catalog.current();
                self.metrics.forget_functions(current.names());
                self.pool.retain_groups(&current.lb_groups());
            }
            Err(e) => {
                self.rejections.inc();
                tracing::error!(error = %e, "catalog reload rejected; keeping the previous catalog");
            }
        }
        outcome
    }
}

/// The reads of `catalog`'s file, waited for `bound`.
fn reads_of(catalog: &CatalogHandle, bound: Duration) -> BoundedReads {
    let what = format!("the catalog {}", catalog.path().display());
    BoundedReads::new("fn-catalog-read", what, bound)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn catalog_of(names: &[&str]) -> String {
        names
            .iter()
            .map(|name| {
                format!("[[functions]]\napp = \"demo\"\nname = \"{name}\"\ncommand = [\"x\"]\n")
            })
            .collect()
    }

    /// A pool with no runners, which keeps nothing per group.
    fn no_pool() -> Arc<dyn RunnerPool> {
        let pool = fn_nodepool::StaticPool::new(
            &[],
            &fn_tls::TlsMode::Insecure,
            &fn_nodepool::ClientConfig::default(),
        )
        .expect("no addresses");
        Arc::new(pool)
    }

    /// A pool that records the groups each reload names.
    #[derive(Debug, Default)]
    struct Named(std::sync::Mutex<Vec<Vec<String>>>);

    impl RunnerPool for Named {
        fn runners(&self, _group: &str) -> fn_nodepool::RunnerList {
            Arc::new(Vec::new())
        }

        fn report_signal(&self, _group: &str) -> fn_nodepool::ReportSignal {
            fn_nodepool::ReportSignal::default()
        }

        fn retain_groups(&self, named: &std::collections::BTreeSet<&str>) {
            self.0
                .lock()
                .expect("lock")
                .push(named.iter().map(|&g| g.to_owned()).collect());
        }
    }

    /// A reload tells the pool the groups the new catalog names (each once), and a rejected
    /// one tells it nothing: its groups stay.
    #[tokio::test]
    async fn a_reload_tells_the_pool_the_groups_the_catalog_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("functions.toml");
        let in_group = |name: &str, group: &str| {
            format!(
                "[[functions]]\napp = \"demo\"\nname = \"{name}\"\ncommand = [\"x\"]\n\
                 lb_group = \"{group}\"\n"
            )
        };
        std::fs::write(&path, in_group("one", "a") + &in_group("two", "b")).expect("write");
        let handle = Arc::new(CatalogHandle::load(&path).expect("loads"));
        let mut registry = Registry::default();
        let metrics = LbMetrics::register(&mut registry);
        let pool = Arc::new(Named::default());
        let mut reload = CatalogReload::new(
            Arc::clone(&handle),
            metrics,
            Arc::clone(&pool) as Arc<dyn RunnerPool>,
            &mut registry,
        );

        std::fs::write(
            &path,
            in_group("one", "a") + &in_group("three", "a") + &catalog_of(&["four"]),
        )
        .expect("write");
        assert_eq!(reload.reload().await.expect("reloads"), 3);
        std::fs::write(&path, "not toml [").expect("write");
        assert!(reload.reload().await.is_err());
        assert_eq!(
            *pool.0.lock().expect("lock"),
            [vec!["a", "b", "default"], vec!["a", "default"]],
            "the groups of both catalogs while the new one goes in (default is new), then b \
             is no longer named; the rejected reload names nothing"
        );
    }

    /// A shutdown while a SIGHUP's reload reads a catalog that hangs (a FIFO opened by no
    /// writer, and then written nothing) ends the loop at once, and the runtime's shutdown
    /// too, where both waited for the read's bound (10 s).
    #[test]
    fn a_shutdown_does_not_wait_for_a_catalog_read_that_hangs() {
        use nix::fcntl::OFlag;
        use nix::sys::stat::Mode;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("functions.toml");
        std::fs::write(&path, catalog_of(&["one"])).expect("write");
        let handle = Arc::new(CatalogHandle::load(&path).expect("loads"));
        std::fs::remove_file(&path).expect("remove");
        nix::unistd::mkfifo(&path, Mode::S_IRWXU).expect("mkfifo");

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let writer = runtime.block_on(async {
            let mut registry = Registry::default();
            let metrics = LbMetrics::register(&mut registry);
            let reload = CatalogReload::new(Arc::clone(&handle), metrics, no_pool(), &mut registry);
            assert_eq!(reload.reads.bound(), READ_BOUND);
            let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
            let cancel = CancellationToken::new();
            let running = tokio::spawn(reload.run(hangups, cancel.clone()));
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
            // The read is under way once the FIFO has a reader: then opening its other end
            // succeeds, and holding it open, writing nothing, keeps the read waiting.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let writer = loop {
                match nix::fcntl::open(&path, OFlag::O_WRONLY | OFlag::O_NONBLOCK, Mode::empty()) {
                    Ok(end) => break end,
                    Err(nix::errno::Errno::ENXIO) if std::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => panic!("the reload never read the catalog: {e}"),
                }
            };

            let start = std::time::Instant::now();
            cancel.cancel();
            let ran = tokio::time::timeout(Duration::from_secs(15), running)
                .await
                .expect("the loop ended")
                .expect("joined");
            assert!(ran.is_ok(), "{ran:?}");
            let waited = start.elapsed();
            assert!(
                waited < Duration::from_secs(1),
                "the loop waited {waited:?} for the read after its cancellation"
            );
            writer
        });
        let start = std::time::Instant::now();
        drop(runtime);
        let waited = start.elapsed();
        // The mount comes back: the read returns (to no one).
        let catalog = catalog_of(&["one", "two"]);
        nix::unistd::write(&writer, catalog.as_bytes()).expect("write the FIFO");
        drop(writer);
        assert!(
            waited < Duration::from_secs(1),
            "the runtime's shutdown waited {waited:?} for the read"
        );
    }

    fn rejections(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text.lines()
            .find(|l| l.starts_with("fn_lb_catalog_reload_rejections_total "))
            .unwrap_or("no rejections line")
            .to_owned()
    }

    /// A catalog whose read hangs (a FIFO with no writer: opening it for reading blocks, as
    /// a read on a hung NFS mount does) holds neither the runtime's one thread nor the reload
    /// past its bound: another task goes on meanwhile, the reload is rejected, counted and
    /// the old catalog kept; a SIGHUP while that read still hangs starts none other, and
    /// once it has returned the next reload reads the file again.
    #[tokio::test(flavor = "current_thread")]
    async fn a_catalog_read_that_hangs_holds_neither_the_runtime_nor_the_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("functions.toml");
        std::fs::write(&path, catalog_of(&["one"])).expect("write");
        let handle = Arc::new(CatalogHandle::load(&path).expect("loads"));
        std::fs::remove_file(&path).expect("remove");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");

        let mut registry = Registry::default();
        let metrics = LbMetrics::register(&mut registry);
        let bound = Duration::from_millis(300);
        let mut reload = CatalogReload::new(Arc::clone(&handle), metrics, no_pool(), &mut registry)
            .read_bound(bound);

        // The writer that ends the hung read: when the test says so, or after 3 s, so that
        // a read made on the runtime's thread returns and the test fails rather than hangs.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let fifo = path.clone();
        let writer = std::thread::spawn(move || {
            let _ = released.recv_timeout(Duration::from_secs(3));
            let mut end = std::fs::OpenOptions::new()
                .write(true)
                .open(&fifo)
                .expect("open the FIFO for writing");
            end.write_all(catalog_of(&["one", "two", "three"]).as_bytes())
                .expect("write the FIFO");
        });
        let ticks = Arc::new(AtomicUsize::new(0));
        let ticker = tokio::spawn({
            let ticks = Arc::clone(&ticks);
            async move {
                loop {
                    ticks.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });

        let start = std::time::Instant::now();
        let stalled = reload.reload().await;
        let waited = start.elapsed();
        let during = ticks.load(Ordering::SeqCst);
        assert!(
            during >= 5,
            "the runtime's thread was held by the read: {during} ticks in {waited:?}"
        );
        assert!(
            waited >= bound && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        let Err(e @ CatalogError::NotRead { source, .. }) = &stalled else {
            panic!("{stalled:?}");
        };
        assert!(matches!(
            source,
            fn_lifecycle::fs::Unfinished::TimedOut { .. }
        ));
        let message = e.to_string();
        assert!(
            message.contains("functions.toml: not read: it has not finished after 300ms")
                && message.contains("kept the current catalog")
                && message.contains("send SIGHUP again"),
            "{message}"
        );
        assert_eq!(handle.current().len(), 1, "the old catalog is kept");
        assert_eq!(
            rejections(&registry),
            "fn_lb_catalog_reload_rejections_total 1"
        );

        // Another SIGHUP while the read still hangs: no second read, rejected at once.
        let start = std::time::Instant::now();
        let again = reload.reload().await;
        assert!(start.elapsed() < bound, "{:?}", start.elapsed());
        assert!(
            matches!(
                &again,
                Err(CatalogError::NotRead {
                    source: fn_lifecycle::fs::Unfinished::StillRunning { .. },
                    ..
                })
            ),
            "{again:?}"
        );
        assert_eq!(
            rejections(&registry),
            "fn_lb_catalog_reload_rejections_total 2"
        );
        assert_eq!(handle.current().len(), 1);

        // The mount comes back: the hung read returns, and the file is a file again.
        let _ = release.send(());
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .expect("joined")
            .expect("the writer");
        let staged = dir.path().join("functions.toml.new");
        std::fs::write(&staged, catalog_of(&["one", "two"])).expect("write");
        std::fs::rename(&staged, &path).expect("rename");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let count = loop {
            match reload.reload().await {
                Ok(count) => break count,
                Err(CatalogError::NotRead {
                    source: fn_lifecycle::fs::Unfinished::StillRunning { .. },
                    ..
                }) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(count, 2);
        assert_eq!(handle.current().len(), 2);
        ticker.abort();
    }
}
