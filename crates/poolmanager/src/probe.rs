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
    /// The runner said it does not serve.
    NotServing,
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
            Watched::NotServing => {
                reports.report(&runner.id, true);
                // Not serving, or no answer at all (it is exiting): still draining.
                loop {
                    tokio::time::sleep(RECHECK).await;
                    if health_of(&tls, &runner.address).await == Health::Serving {
                        reports.report(&runner.id, false);
                        break;
                    }
                }
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

/// Watches `runner`'s health, reporting SERVING into `reports`, until it says anything else
/// or the watch fails.
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
    loop {
        match stream.message().await {
            Ok(Some(answer)) if answer.status() == ServingStatus::Serving => {
                backoff.reset();
                reports.report(&runner.id, false);
            }
            Ok(Some(_)) => return Watched::NotServing,
            Ok(None) => return Watched::Failed("the health stream ended".to_owned()),
            Err(status) => return Watched::Failed(error_chain(&status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

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

    /// A runner's health watch reports it serving, then draining as soon as it says
    /// NOT_SERVING, then serving again once it does (a blip), and watches on: and it does not
    /// hold the runner's graceful stop (the stream is dropped at NOT_SERVING).
    #[tokio::test]
    async fn the_health_watch_reports_a_runners_own_drain_and_does_not_hold_its_stop() {
        let (health, service) = fn_lifecycle::health::Health::new(&[]);
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
        health.set_serving().await;

        let probe = GrpcProbe::new(TlsMode::Insecure);
        let reports = Arc::new(HealthReports::default());
        let runner = RunnerInfo {
            id: "r1".into(),
            address,
            group: "g".into(),
            created: SystemTime::now(),
        };
        probe.watch(&runner, &reports);
        until_reported(&reports, "r1", false, Duration::from_secs(5)).await;

        health.set_not_serving().await;
        until_reported(&reports, "r1", true, Duration::from_secs(1)).await;
        health.set_serving().await;
        until_reported(&reports, "r1", false, RECHECK * 3).await;
        // Watched again: the next drain is seen at once too.
        health.set_not_serving().await;
        until_reported(&reports, "r1", true, Duration::from_secs(1)).await;

        // The runner's graceful stop waits for the streams open on it: none is the npm's.
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("the server stopped: no health stream held it")
            .expect("joined")
            .expect("served");
        probe.forget(&runner);
        assert!(probe.watches().is_empty());
    }
}
