//! Readiness: one switch for the whole daemon.
//!
//! The switch feeds the standard gRPC health service (`grpc.health.v1.Health`, service `""`
//! and every named service registered) and [`Health::is_serving`], which the lb-agent's
//! `GET /health` reads. It flips to NOT_SERVING as the first step of shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The output of `future` if it is ready at its first poll.
fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// The daemon's readiness switch. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    serving: Arc<AtomicBool>,
    reporter: HealthReporter,
    services: Arc<Vec<String>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("serving", &self.is_serving())
            .finish_non_exhaustive()
    }
}

/// The gRPC health service to add to a tonic router.
pub type HealthService =
    tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;

impl Health {
    /// A switch that starts NOT_SERVING, reporting for `""` and each of `services`
    /// (fully qualified gRPC service names).
    pub fn new(services: &[&str]) -> (Health, HealthService) {
        let reporter = HealthReporter::new();
        let service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        let health = Health {
            serving: Arc::new(AtomicBool::new(false)),
            reporter,
            services: Arc::new(services.iter().map(|s| (*s).to_owned()).collect()),
        };
        // tonic-health's reporter starts `""` as SERVING: a probe that came before
        // `set_serving` (the server is up before the rest of the start) took the daemon for
        // ready. Set down now; an uncontended status write needs no waiting.
        if ready_now(health.set(false)).is_none() {
            tracing::warn!("the health status could not be set to NOT_SERVING at start");
        }
        (health, service)
    }

    /// Whether the daemon takes new work.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// Reports SERVING.
    pub async fn set_serving(&self) {
        self.set(true).await;
    }

    /// Reports NOT_SERVING (shutdown or drain).
    pub async fn set_not_serving(&self) {
        self.set(false).await;
    }

    async fn set(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        for name in self.services.iter() {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_server::Health as _;

    async fn status(health: &Health, service: &str) -> Result<i32, tonic::Code> {
        tonic_health::server::HealthService::from_health_reporter(health.reporter.clone())
            .check(tonic::Request::new(HealthCheckRequest {
                service: service.to_owned(),
            }))
            .await
            .map(|r| r.into_inner().status)
            .map_err(|s| s.code())
    }

    /// A probe before `set_serving` sees NOT_SERVING for the whole daemon and each named
    /// service (tonic-health alone answers SERVING for `""` from the start).
    #[tokio::test]
    async fn the_switch_starts_not_serving_for_every_name() {
        let (health, _service) = Health::new(&["dataplane.runner.v1.RunnerProtocol"]);
        let not_serving = ServingStatus::NotServing as i32;
        assert_eq!(status(&health, "").await, Ok(not_serving));
        assert_eq!(
            status(&health, "dataplane.runner.v1.RunnerProtocol").await,
            Ok(not_serving)
        );
        assert!(!health.is_serving());
        health.set_serving().await;
        assert_eq!(status(&health, "").await, Ok(ServingStatus::Serving as i32));
    }
}
