//! The real [`RunnerProbe`]: the runner's `Status` over mutual TLS, and a watch of each
//! runner's health.
//!
//! **Why a health watch.** A runner stopped by someone else than the npm (an operator's
//! SIGTERM, `docker stop`, a swarm service removed) says NOT_SERVING from its SIGTERM on and
//! refuses new calls, but the control plane lists it until it has exited: counted as its
//! group's runner meanwhile, it left the group without capacity and without a replacement
//! for its whole drain. The standard gRPC health `Watch` tells the npm at once, on a stream
//! that is silent while nothing changes (a probe at every tick would cost a call per runner
//! per second and up to a tick of delay). The stream is dropped as soon as the runner says
//! NOT_SERVING: the runner's graceful stop waits for the streams open on it, and one that
//! never ends would hold its exit for its whole grace. From then on the runner is checked
//! once a second ([`RECHECK`]) until it serves again (a blip: it is watched again) or is
//! forgotten (it exited, and the control plane no longer lists it).
//!
//! **Only a runner seen serving drains.** NOT_SERVING counts as the runner's own drain only
//! on a stream that said SERVING first: a runner also says NOT_SERVING while it starts, and
//! one restarted in place (the same id and address: a swarm task restarted after a crash, a
//! docker restart policy) is what a watch finds when it reconnects after its stream to the
//! old process broke; taken for draining, it would have had its group provisioned a
//! replacement it does not need. A stream whose first answer is NOT_SERVING is dropped all
//! the same (the runner may be draining, and the stream would hold its stop), and the runner
//! is checked once a second, its report left as it was, until it serves (watched again: its
//! next NOT_SERVING is a drain) or is forgotten. The price: a runner reached only once it
//! drains (its stream broke just before its SIGTERM) keeps its place in its group and the
//! LBs' lists until it has exited and the control plane no longer lists it, as before the
//! watch (the LBs learn of its drain from the runner itself); and one that never gets to
//! SERVING stays its group's runner until its control plane gives up on it (Swarm restarts
//! a runner failing its health check, and removes a service in a crash loop).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fn_lifecycle::retry::Backoff;
use fn_nodepool::{ClientConfig, RunnerClient};
use fn_tls::TlsMode;
use futures::future::BoxFuture;

use crate::control_plane::{Health, RunnerInfo, health_of};
use crate::manager::{HealthReports, RunnerProbe};

/// Pause between health checks of a runner that said NOT_SERVING.
const RECHECK: Duration = Duration::from_secs(1);

/// Asks runners for their status; keeps one client per address, until the runner is
/// forgotten (the process control plane hands out a new address to every runner it spawns,
/// so the map would otherwise grow for as long as the npm runs). Watches each runner's health
/// until it is forgotten (see the module docs).
#[derive(Debug)]
pub struct GrpcProbe {
    tls: TlsMode,
    clients: Mutex<HashMap<String, Arc<RunnerClient>>>,
    /// The health watch of each runner followed, by runner id.
    watches: Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

impl GrpcProbe {
    pub fn new(tls: TlsMode) -> Self {
        GrpcProbe {
            tls,
            clients: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
        }
    }

    fn watches(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::task::AbortHandle>> {
        self.watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn client(&self, address: &str) -> Result<Arc<RunnerClient>, String> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = clients.get(address) {
            return Ok(Arc::clone(c));
        }
        let client = RunnerClient::new(address, address, &self.tls, ClientConfig::default())
            .map_err(|e| e.to_string())?;
        clients.insert(address.to_owned(), Arc::clone(&client));
        Ok(client)
    }
}

impl RunnerProbe for GrpcProbe {
    fn calls_in_flight<'a>(&'a self, runner: &'a RunnerInfo) -> BoxFuture<'a, Result<u64, String>> {
        Box::pin(async move {
            let client = self.client(&runner.address)?;
            client
                .status()
                .await
                .map(|s| s.calls_in_flight)
                .map_err(|s| s.to_string())
        })
    }

    fn watch(&self, runner: &RunnerInfo, reports: &Arc<HealthReports>) {
        let mut watches = self.watches();
        if watches.contains_key(&runner.id) {
            return;
        }
        let task = tokio::spawn(follow_health(
            self.tls.clone(),
            runner.clone(),
            Arc::clone(reports),
        ));
        watches.insert(runner.id.clone(), task.abort_handle());
    }

    fn forget(&self, runner: &RunnerInfo) {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&runner.address);
        if let Some(watch) = self.watches().remove(&runner.id) {
            watch.abort();
        }
    }
}

impl Drop for GrpcProbe {
    fn drop(&mut self) {
        for watch in self.watches().values() {
            watch.abort();
        }
    }
}

/// How a health watch ended.
enum Watched {
    /// The runner said SERVING, then something else: it drains.
    StoppedServing,
    /// The runner's first answer was not SERVING: it starts (or was reached only once it
    /// drains), and is not taken for draining.
    NotServingYet,
    /// The runner has no health `Watch`: it is not asked again.
    Unimplemented,
    /// Not reached, or the stream failed or ended: why, for the logs.
    Failed(String),
}

/// Follows `runner`'s health into `reports` until aborted (see the module docs).
async fn follow_health(tls: TlsMode, runner: RunnerInfo, reports: Arc<HealthReports>) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        match watch_until_not_serving(&tls, &runner, &reports, &mut backoff).await {
            Watched::StoppedServing => {
                reports.report(&runner.id, true);
                // Not serving, or no answer at all (it is exiting): still draining.
                until_serving(&tls, &runner).await;
                reports.report(&runner.id, false);
            }
            Watched::NotServingYet => {
                tracing::debug!(
                    runner = %runner.id,
                    "the runner's health watch found it not serving yet (it starts, or it was \
                     reached only once draining); not taken for draining, checked until it serves"
                );
                until_serving(&tls, &runner).await;
            }
            Watched::Unimplemented => {
                tracing::debug!(runner = %runner.id, "the runner has no health Watch; its own drain is not followed");
                return;
            }
            Watched::Failed(why) => {
                tracing::debug!(runner = %runner.id, error = %why, "the runner's health watch failed; watching again after a pause");
                backoff.sleep().await;
            }
        }
    }
}

/// Returns once `runner` answers SERVING, checked every [`RECHECK`].
async fn until_serving(tls: &TlsMode, runner: &RunnerInfo) {
    loop {
        tokio::time::sleep(RECHECK).await;
        if health_of(tls, &runner.address).await == Health::Serving {
            return;
        }
    }
}

/// Watches `runner`'s health, reporting SERVING into `reports`, until it says anything else
/// (a drain only if it said SERVING first on this stream) or the watch fails.
async fn watch_until_not_serving(
    tls: &TlsMode,
    runner: &RunnerInfo,
    reports: &HealthReports,
    backoff: &mut Backoff,
) -> Watched {
    use fn_lifecycle::logging::error_chain;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let endpoint = match fn_tls::grpc_endpoint(tls, &runner.address) {
        Ok(endpoint) => endpoint,
        Err(e) => return Watched::Failed(error_chain(&e)),
    };
    // No timeout on the call: the stream lasts as long as the runner does (the endpoint's
    // keepalive notices a peer that went away).
    let channel = match endpoint
        .with(|e| e.connect_timeout(Duration::from_secs(1)))
        .connect()
        .await
    {
        Ok(channel) => channel,
        Err(e) => return Watched::Failed(error_chain(&e)),
    };
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let mut stream = match HealthClient::new(fn_tls::WithoutStatusDetails(channel))
        .watch(request)
        .await
    {
        Ok(answer) => answer.into_inner(),
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            return Watched::Unimplemented;
        }
        Err(status) => return Watched::Failed(error_chain(&status)),
    };
    let mut served = false;
    loop {
        match stream.message().await {
            Ok(Some(answer)) if answer.status() == ServingStatus::Serving => {
                backoff.reset();
                served = true;
                reports.report(&runner.id, false);
            }
            Ok(Some(_)) if served => return Watched::StoppedServing,
            Ok(Some(_)) => return Watched::NotServingYet,
            Ok(None) => return Watched::Failed("the health stream ended".to_owned()),
            Err(status) => return Watched::Failed(error_chain(&status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::SystemTime;

    use futures::StreamExt;
    use futures::stream::BoxStream;
    use tokio_util::sync::CancellationToken;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_server::{Health as HealthServe, HealthServer};
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
    use tonic_health::server::HealthReporter;

    use super::*;

    #[tokio::test]
    async fn clients_are_kept_per_address_until_forgotten() {
        let probe = GrpcProbe::new(TlsMode::Insecure);
        let runner = RunnerInfo {
            id: "r1".into(),
            address: "127.0.0.1:1".into(),
            group: "g".into(),
            created: SystemTime::now(),
        };
        let first = probe.client(&runner.address).expect("client");
        let again = probe.client(&runner.address).expect("client");
        assert!(Arc::ptr_eq(&first, &again));
        probe.forget(&runner);
        assert!(probe.clients.lock().expect("lock").is_empty());
    }

    /// Waits, at most `bound`, until `reports` says `draining` of `id`.
    async fn until_reported(reports: &HealthReports, id: &str, draining: bool, bound: Duration) {
        let deadline = tokio::time::Instant::now() + bound;
        while reports.draining(id) != Some(draining) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no report of draining={draining} within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A runner's health on a gRPC server on loopback: tonic-health's service (as the
    /// runner's [`fn_lifecycle::health::Health`] serves it) behind a wrapper that counts the
    /// `Check`s it answers (the probe checks a runner only once a watch of it has ended) and
    /// the SERVING answers its `Watch` streams send, and can end those streams, as a crash of
    /// the runner's process does.
    struct Runner {
        address: String,
        reporter: HealthReporter,
        counts: Arc<Counts>,
        crash: Arc<Mutex<CancellationToken>>,
        stop: tokio::sync::oneshot::Sender<()>,
        server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    }

    #[derive(Default)]
    struct Counts {
        checks: AtomicUsize,
        watched_serving: AtomicUsize,
    }

    /// The [`Runner`]'s health service.
    struct CountedHealth {
        health: tonic_health::server::HealthService,
        counts: Arc<Counts>,
        crash: Arc<Mutex<CancellationToken>>,
    }

    #[tonic::async_trait]
    impl HealthServe for CountedHealth {
        async fn check(
            &self,
            request: tonic::Request<HealthCheckRequest>,
        ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
            self.counts.checks.fetch_add(1, Ordering::SeqCst);
            self.health.check(request).await
        }

        type WatchStream = BoxStream<'static, Result<HealthCheckResponse, tonic::Status>>;

        async fn watch(
            &self,
            request: tonic::Request<HealthCheckRequest>,
        ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
            let crashed = self.crash.lock().expect("lock").clone().cancelled_owned();
            let counts = Arc::clone(&self.counts);
            let stream = self
                .health
                .watch(request)
                .await?
                .into_inner()
                .inspect(move |a| {
                    if matches!(a, Ok(a) if a.status() == ServingStatus::Serving) {
                        counts.watched_serving.fetch_add(1, Ordering::SeqCst);
                    }
                });
            Ok(tonic::Response::new(stream.take_until(crashed).boxed()))
        }
    }

    impl Runner {
        /// A runner that says NOT_SERVING, as one does while it starts.
        async fn starting() -> Runner {
            let reporter = HealthReporter::new();
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            let counts = Arc::new(Counts::default());
            let crash = Arc::new(Mutex::new(CancellationToken::new()));
            let service = HealthServer::new(CountedHealth {
                health: tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
                counts: Arc::clone(&counts),
                crash: Arc::clone(&crash),
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("binds");
            let address = listener.local_addr().expect("address").to_string();
            let incoming = fn_tls::grpc_incoming(&TlsMode::Insecure, listener).expect("incoming");
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(
                fn_tls::grpc_server()
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _stopped = stopped.await;
                    }),
            );
            Runner {
                address,
                reporter,
                counts,
                crash,
                stop,
                server,
            }
        }

        fn info(&self) -> RunnerInfo {
            RunnerInfo {
                id: "r1".into(),
                address: self.address.clone(),
                group: "g".into(),
                created: SystemTime::now(),
            }
        }

        async fn set(&self, serving: bool) {
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            self.reporter.set_service_status("", status).await;
        }

        /// The runner's process dies and its replacement starts at the same address: the
        /// watch streams to the old one end, and the new one says NOT_SERVING.
        async fn restart_in_place(&self) {
            let old = std::mem::take(&mut *self.crash.lock().expect("lock"));
            old.cancel();
            self.set(false).await;
        }

        fn checks(&self) -> usize {
            self.counts.checks.load(Ordering::SeqCst)
        }

        fn watched_serving(&self) -> usize {
            self.counts.watched_serving.load(Ordering::SeqCst)
        }

        /// Stops the server gracefully: within a bound, so no stream open on it (the npm's
        /// health watch) holds its stop.
        async fn stop(self) {
            let _ = self.stop.send(());
            tokio::time::timeout(Duration::from_secs(2), self.server)
                .await
                .expect("the server stopped: no health stream held it")
                .expect("joined")
                .expect("served");
        }
    }

    /// Waits, at most 5 s, until `count()` is past `before`; asserting meanwhile, with
    /// `never_draining`, that those reports never said runner r1 drains.
    async fn until_past(
        count: impl Fn() -> usize,
        before: usize,
        never_draining: Option<&HealthReports>,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let past = count() > before;
            if let Some(reports) = never_draining {
                assert_ne!(reports.draining("r1"), Some(true), "taken for draining");
            }
            if past {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "not within 5 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A runner's health watch reports it serving, then draining as soon as it says
    /// NOT_SERVING, then serving again once it does (a blip), and watches on: and it does not
    /// hold the runner's graceful stop (the stream is dropped at NOT_SERVING).
    #[tokio::test]
    async fn the_health_watch_reports_a_runners_own_drain_and_does_not_hold_its_stop() {
        let runner = Runner::starting().await;
        runner.set(true).await;
        let probe = GrpcProbe::new(TlsMode::Insecure);
        let reports = Arc::new(HealthReports::default());
        probe.watch(&runner.info(), &reports);
        until_reported(&reports, "r1", false, Duration::from_secs(5)).await;

        runner.set(false).await;
        until_reported(&reports, "r1", true, Duration::from_secs(1)).await;
        let served = runner.watched_serving();
        runner.set(true).await;
        until_reported(&reports, "r1", false, RECHECK * 3).await;
        // Watched again (once the new stream said SERVING): the next drain is seen at once.
        until_past(|| runner.watched_serving(), served, None).await;
        runner.set(false).await;
        until_reported(&reports, "r1", true, Duration::from_secs(1)).await;

        // The runner's graceful stop waits for the streams open on it: none is the npm's.
        let info = runner.info();
        runner.stop().await;
        probe.forget(&info);
        assert!(probe.watches().is_empty());
    }

    /// A runner whose first health answer is NOT_SERVING (it starts) is not taken for
    /// draining: once it serves it is reported serving, and from then on its NOT_SERVING is
    /// its drain, seen at once. Nor is one restarted in place (a swarm task restarted after
    /// a crash, a docker restart policy): the watch reconnects after its stream broke, and
    /// finds the new process NOT_SERVING while it starts.
    #[tokio::test]
    async fn a_runner_starting_or_restarted_in_place_is_not_taken_for_draining() {
        let runner = Runner::starting().await;
        let probe = GrpcProbe::new(TlsMode::Insecure);
        let reports = Arc::new(HealthReports::default());
        let checks = runner.checks();
        probe.watch(&runner.info(), &reports);
        // The probe checks the runner once its watch ended on NOT_SERVING; a report of a
        // drain would have come before.
        until_past(|| runner.checks(), checks, Some(&reports)).await;
        let served = runner.watched_serving();
        runner.set(true).await;
        until_past(|| runner.watched_serving(), served, Some(&reports)).await;
        until_reported(&reports, "r1", false, Duration::from_secs(1)).await;

        let checks = runner.checks();
        runner.restart_in_place().await;
        until_past(|| runner.checks(), checks, Some(&reports)).await;
        let served = runner.watched_serving();
        runner.set(true).await;
        until_past(|| runner.watched_serving(), served, Some(&reports)).await;
        assert_eq!(reports.draining("r1"), Some(false));

        // SERVING then NOT_SERVING on one stream: its drain, seen at once.
        runner.set(false).await;
        until_reported(&reports, "r1", true, Duration::from_secs(1)).await;
        let info = runner.info();
        runner.stop().await;
        probe.forget(&info);
    }
}
