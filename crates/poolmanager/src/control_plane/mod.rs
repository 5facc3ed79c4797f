//! Control planes: where runners come from.
//!
//! The npm's control loop only lists, provisions and removes runners through the
//! [`ControlPlane`] trait; what a runner *is* (an address from a fixed list, a local process,
//! a container) is each implementation's business:
//! - [`static_list`]: a fixed list of runner addresses, assigned to groups as demand requires;
//! - [`process`]: local `pure-runner` processes on free loopback ports (the one-machine
//!   default, used by `make demo`);
//! - [`docker`]: runner containers on one Docker engine, or (`FN_CONTROL_PLANE=swarm`) one
//!   swarm service per runner across a swarm's nodes.

use std::time::Duration;

/// How long a runner may drain at the npm's own shutdown before it is killed, at most: the
/// rest of the npm's bound (`FN_SHUTDOWN_TIMEOUT`, 30 s by default) removes what the
/// runners leave.
pub const SHUTDOWN_STOP_GRACE: Duration = Duration::from_secs(20);

/// What of the npm's shutdown bound is kept beyond its runners' stop grace: for the
/// provisionings under way to stop first (at most half of it, see
/// [`crate::manager::provisioning_stop_bound`]), and for the control plane's own work
/// around the runners' stop (listing, removing records, containers, directories).
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);

/// The runners' stop grace at the npm's shutdown for an npm whose own bound is
/// `npm_bound`: [`SHUTDOWN_STOP_GRACE`], or the bound less 5 s when that is shorter, so that
/// the npm's shutdown ends within its bound; never under a second, so a bound of 6 s or
/// less (an npm told not to wait) may end before its runners are seen gone.
pub fn shutdown_stop_grace(npm_bound: Duration) -> Duration {
    SHUTDOWN_STOP_GRACE
        .min(npm_bound.saturating_sub(SHUTDOWN_MARGIN))
        .max(Duration::from_secs(1))
}

pub mod docker;
pub mod process;
pub mod static_list;

use std::time::SystemTime;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// A runner as a control plane knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerInfo {
    /// Unique and stable for the runner's life.
    pub id: String,
    /// `host:port` of its gRPC endpoint.
    pub address: String,
    /// The LB group it serves.
    pub group: String,
    /// When it was provisioned; the control loop orders runners by it (oldest first): runners
    /// that join together are appended to their group's LB list in this order, and an npm
    /// that restarts publishes its runners so (see [`crate::order`]).
    pub created: SystemTime,
}

/// A control plane failure. Transient by nature: the control loop retries on its next tick.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlPlaneError {
    /// No more runners can be had (static list exhausted, limits reached).
    #[error("no runner available: {0}")]
    Exhausted(String),
    /// Provisioning or removal failed.
    #[error("control plane operation failed: {0}")]
    Failed(String),
    /// The npm is stopping: the provisioning ended before its runner was ready (what it
    /// made is removed, by the provisioning itself or by the control plane's shutdown).
    #[error("provisioning stopped: the npm is shutting down")]
    Cancelled,
}

/// Lists, provisions and removes runners.
pub trait ControlPlane: Send + Sync + std::fmt::Debug {
    /// Memory of one runner, in MB.
    fn runner_memory_mb(&self) -> u64;

    /// Every runner this control plane currently has, in any group, but for runners whose
    /// provisioning is under way and that have not answered yet, and (where a plane finds
    /// runners it did not make, kept by an npm before it) those that answered health with
    /// another status than SERVING: the npm publishes what is listed, and a runner the LBs
    /// are given before it serves, or while it drains, refuses their calls. A found runner
    /// the npm's probe cannot reach is listed: the LBs probe it themselves, and a probe
    /// outage must not hide healthy runners from them.
    fn list(&self) -> BoxFuture<'_, Result<Vec<RunnerInfo>, ControlPlaneError>>;

    /// The running runners the last [`ControlPlane::list`] did not report because they
    /// answered health with another status than SERVING (found runners held out from the
    /// LBs until they serve, or until they are removed). They take a machine's resources as
    /// any runner does, so the control loop counts them against its bound on all runners
    /// (`FN_MAX_TOTAL_RUNNERS`), though not for their group nor in the LBs' lists; and a
    /// restarted npm retains their groups, as it does the listed runners' (each keeps its
    /// `FN_MIN_RUNNERS`, provisioned in place of those held out). None for a plane that
    /// lists every runner it runs (the default).
    fn held_out(&self) -> Vec<RunnerInfo> {
        Vec::new()
    }

    /// How many runners this control plane has removed that still ran at the last
    /// [`ControlPlane::list`]: a removal that returns before its runner has stopped (a swarm
    /// service's deletion; its task drains on its node for up to its stop grace). The control
    /// loop counts them against `FN_MAX_TOTAL_RUNNERS`, and for nothing else. None for a plane
    /// whose removal returns once its runner is gone (the default).
    fn leaving(&self) -> usize {
        0
    }

    /// Provisions up to `count` new runners for `group` and returns those that are ready
    /// (answering health). May return fewer than asked.
    ///
    /// `cancel` is cancelled when the npm stops. The provisioning then ends at its next safe
    /// point, between requests to the engine or while it waits for a runner to come up, with
    /// [`ControlPlaneError::Cancelled`] for the runners not ready yet. Every runner it made
    /// is then where [`ControlPlane::shutdown`] finds it (or it removed it itself): the
    /// control loop waits for its provisionings to end before the shutdown, instead of
    /// dropping them, because a request the engine has taken (a container or service
    /// created) makes its runner even when nobody waits for the answer, and after the
    /// shutdown's list it would be left behind.
    fn provision<'a>(
        &'a self,
        group: &'a str,
        count: usize,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<Vec<RunnerInfo>, ControlPlaneError>>;

    /// Removes a runner (it has drained or overrun its drain time).
    ///
    /// When the npm stops, the control loop drops the removals under way, at whatever await
    /// point they are, and does not wait for them: a removal waits for its runner's drain,
    /// longer than the npm's shutdown bound leaves. So a removal cut short anywhere must
    /// leave its runner, and whatever the runner left, where [`ControlPlane::shutdown`]
    /// finds it (and, where the shutdown keeps the runners for the next npm, where that
    /// npm's [`ControlPlane::list`] finishes the removal).
    fn remove<'a>(&'a self, runner: &'a RunnerInfo)
    -> BoxFuture<'a, Result<(), ControlPlaneError>>;

    /// Releases everything at npm shutdown (the process control plane reaps its children).
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Gathers the outcomes of a batch of concurrent provisions: the runners that are ready, or
/// the last error when none is. Each failure is logged (`what` names the kind of runner).
pub(crate) fn gather_provisioned(
    results: Vec<Result<RunnerInfo, ControlPlaneError>>,
    what: &str,
) -> Result<Vec<RunnerInfo>, ControlPlaneError> {
    let mut ready = Vec::new();
    let mut last_error = None;
    for result in results {
        match result {
            Ok(info) => ready.push(info),
            Err(e @ ControlPlaneError::Cancelled) => last_error = Some(e),
            Err(e) => {
                tracing::error!(error = %e, "provisioning a {what} failed");
                last_error = Some(e);
            }
        }
    }
    match (ready.is_empty(), last_error) {
        (true, Some(e)) => Err(e),
        _ => Ok(ready),
    }
}

/// What a runner said to the standard gRPC health check (the whole server's status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// It answered SERVING.
    Serving,
    /// It answered, with another status: NOT_SERVING (a runner says so until it has started,
    /// and from its SIGTERM on, while it drains), UNKNOWN, or SERVICE_UNKNOWN (also as a
    /// `NotFound` status). The status, as the health protocol names it.
    NotServing(String),
    /// No answer: not reached (no route, a name not resolved, a connection refused, a TLS
    /// handshake refused) or no answer within the probe's bound. Why, for the logs.
    Unreachable(String),
}

impl Health {
    pub fn is_serving(&self) -> bool {
        *self == Health::Serving
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Serving => f.write_str("SERVING"),
            Health::NotServing(status) => write!(f, "answered {status}"),
            Health::Unreachable(why) => write!(f, "no answer: {why}"),
        }
    }
}

/// Whether the runner at `address` answers the standard gRPC health check with SERVING,
/// within a short bound. Control planes report a runner only once it does.
pub(crate) async fn answers_health(tls: &fn_tls::TlsMode, address: &str) -> bool {
    health_of(tls, address).await.is_serving()
}

/// What the runner at `address` answers the standard gRPC health check, within a short
/// bound (a second to connect, two for the answer).
pub(crate) async fn health_of(tls: &fn_tls::TlsMode, address: &str) -> Health {
    use fn_lifecycle::logging::error_chain;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let endpoint = match fn_tls::grpc_endpoint(tls, address) {
        Ok(endpoint) => endpoint,
        Err(e) => return Health::Unreachable(error_chain(&e)),
    };
    let channel = match endpoint
        .with(|e| {
            e.connect_timeout(std::time::Duration::from_secs(1))
                .timeout(std::time::Duration::from_secs(2))
        })
        .connect()
        .await
    {
        Ok(channel) => channel,
        Err(e) => return Health::Unreachable(error_chain(&e)),
    };
    match HealthClient::new(fn_tls::WithoutStatusDetails(channel))
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
    {
        Ok(answer) => match answer.into_inner().status() {
            ServingStatus::Serving => Health::Serving,
            other => Health::NotServing(other.as_str_name().to_owned()),
        },
        // The health service's answer for a service it does not know.
        Err(status) if status.code() == tonic::Code::NotFound => {
            Health::NotServing(ServingStatus::ServiceUnknown.as_str_name().to_owned())
        }
        Err(status) => Health::Unreachable(error_chain(&status)),
    }
}
