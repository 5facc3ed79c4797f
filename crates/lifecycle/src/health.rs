//! Readiness: one switch for the whole daemon.
//!
//! The switch feeds the standard gRPC health service (`grpc.health.v1.Health`, service `""`
//! and every named service registered) and [`Health::is_serving`], which the lb-agent's
//! `GET /health` reads. It flips to NOT_SERVING as the first step of shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

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
