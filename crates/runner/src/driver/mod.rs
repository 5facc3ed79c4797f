//! Drivers start function instances and talk to them.
//!
//! A [`Driver`] turns an [`InstanceSpec`] into a running [`Instance`]; an instance takes up
//! to its spec's `concurrency` calls at once through [`Instance::call`]. Pooling (reuse, idle timeout, eviction),
//! deadlines and capacity are *not* the driver's business: they live in `pool` and
//! `engage`. Both drivers implement the Fn FDK `http-stream` contract: `process` runs a
//! command from the functions directory as a child process, `docker` runs an image as a
//! container. [`Drivers`] picks one per function: an image and no command is `docker`.

pub mod docker;
pub mod process;

mod http_stream;
mod output;
mod socket;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fn_protocol::CallSpec;
use futures::Stream;
use futures::future::BoxFuture;
use http::{HeaderMap, Method, StatusCode};

/// A stream of body chunks.
pub type BodyStream<E> = Pin<Box<dyn Stream<Item = Result<Bytes, E>> + Send>>;

/// Everything needed to start an instance; calls with equal specs share instances.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceSpec {
    pub app: String,
    pub function: String,
    /// Command and arguments; the program is resolved inside the functions directory.
    pub command: Vec<String>,
    /// Container image (docker driver).
    pub image: Option<String>,
    /// Memory limit of the instance.
    pub memory_mb: u64,
    /// Calls the instance takes at once (at least 1).
    pub concurrency: u32,
    /// How long the instance stays hot without a call.
    pub idle_timeout: Duration,
    /// Function configuration, passed as environment variables.
    pub config: BTreeMap<String, String>,
}

impl InstanceSpec {
    /// Fn's `FN_APP_ID` and `FN_FN_ID` (the FDKs' context gives them to the function as its
    /// app's and its own id) that the function's config does not set. The catalog names a
    /// function by its app and name: the ids are the app's name and `app/name`, unique as Fn's
    /// are, unless the config sets them (to carry over an Fn deployment's own ids).
    pub(crate) fn default_ids(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        [
            ("FN_APP_ID", self.app.clone()),
            ("FN_FN_ID", format!("{}/{}", self.app, self.function)),
        ]
        .into_iter()
        .filter(|(name, _)| !self.config.contains_key(*name))
    }
}

impl From<&CallSpec> for InstanceSpec {
    fn from(call: &CallSpec) -> Self {
        InstanceSpec {
            app: call.app.clone(),
            function: call.function.clone(),
            command: call.command.clone(),
            image: call.image.clone(),
            memory_mb: call.memory_mb,
            concurrency: call.concurrency,
            idle_timeout: call.idle_timeout,
            config: call.config.clone(),
        }
    }
}

impl FunctionRequest {
    /// The request for `call`, taking its headers and request URL: nothing reads them after
    /// the call has been sent, and a copy of the header map costs an allocation per call.
    pub fn take_from(call: &mut CallSpec) -> Self {
        FunctionRequest {
            call_id: call.id.clone(),
            method: call.method.clone(),
            request_url: std::mem::take(&mut call.request_url),
            headers: std::mem::take(&mut call.headers),
            deadline: call.wall_deadline(),
            deadline_at: call.deadline,
        }
    }
}

/// One request to an instance: the `http-stream` view of a call.
#[derive(Debug, Clone)]
pub struct FunctionRequest {
    pub call_id: String,
    pub method: Method,
    pub request_url: String,
    /// The client's headers, untranslated (the driver adds the `Fn-Http-H-` prefix).
    pub headers: HeaderMap,
    /// The call's deadline on this machine's wall clock, for the function (`Fn-Deadline`).
    pub deadline: SystemTime,
    /// The same deadline on the monotonic clock: what bounds the runner's own waits (a wall
    /// clock stepped meanwhile moves the other).
    pub deadline_at: std::time::Instant,
}

/// An instance's answer: status and client headers (already translated back from
/// `Fn-Http-Status` / `Fn-Http-H-*`), and the body as it streams.
pub struct FunctionResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: BodyStream<DriverError>,
}

impl std::fmt::Debug for FunctionResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

/// What went wrong talking to a function. Each variant maps to a wire `ErrorKind`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DriverError {
    /// The spec cannot be run here (command outside the functions directory, no command).
    #[error("invalid function: {0}")]
    Invalid(String),
    /// The instance could not be started or did not open its listener in time.
    #[error("function failed to start: {0}")]
    Start(String),
    /// The instance process died.
    #[error("function crashed: {0}")]
    Crashed(String),
    /// The instance answered something that is not a valid http-stream reply.
    #[error("function error: {0}")]
    Function(String),
    /// The function's FDK answered that the function failed (its own 502, an exception
    /// in the handler): the call failed, and the instance serves on, as under Fn's agent.
    #[error("function failed: {0}")]
    Failed(String),
    /// The function's FDK answered that it saw the call's deadline pass (its own 504): the
    /// call timed out, and the instance serves on, as under Fn's agent.
    #[error("function timed out: {0}")]
    TimedOut(String),
    /// The runner could not reach the instance for want of its own resources (out of file
    /// descriptors or memory: `EMFILE`, `ENFILE`, `ENOMEM`, `ENOBUFS`): the runner's fault,
    /// not the function's. The call never reached the instance, which serves on.
    #[error("runner error: {0}")]
    Runner(String),
}

impl DriverError {
    /// Whether the instance answered the call as its contract says and can take the next
    /// one: the FDK reported the function's failure or timeout itself, or the call never
    /// reached it (the runner's own fault).
    pub fn instance_serves_on(&self) -> bool {
        matches!(
            self,
            DriverError::Failed(_) | DriverError::TimedOut(_) | DriverError::Runner(_)
        )
    }
}

/// A running function instance. It takes at most its spec's `concurrency` calls at once;
/// the pool guarantees it.
pub trait Instance: Send + Sync + std::fmt::Debug {
    /// Sends one call and returns once the response head has arrived; the body streams
    /// afterwards. `body` is the request body as it arrives from the LB.
    fn call(
        &self,
        request: FunctionRequest,
        body: BodyStream<std::io::Error>,
    ) -> BoxFuture<'_, Result<FunctionResponse, DriverError>>;

    /// Whether the instance is still running (not exited, not killed).
    fn is_alive(&self) -> bool;

    /// Kills the instance and everything it started. Idempotent.
    fn kill(&self);

    /// Operating-system process id, where there is one (tests assert reuse with it).
    fn pid(&self) -> Option<u32>;

    /// Completes once the instance is gone and everything it held is released (after
    /// [`Instance::kill`] or its own exit), so that a runner shutting down can wait for the
    /// clean-up before it exits. The default completes at once, for instances with nothing
    /// to clean up.
    fn wait_gone(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Starts instances.
pub trait Driver: Send + Sync + std::fmt::Debug + 'static {
    /// Checks, before a call is committed, that this driver can run `spec` at all (for
    /// example that its command lies inside the functions directory). The default accepts
    /// everything; drivers that can refuse early should say so here, so that the LB gets a
    /// clear refusal instead of a committed call that fails to start.
    ///
    /// # Errors
    /// [`DriverError::Invalid`] naming what is wrong.
    fn check(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let _ = spec;
        Ok(())
    }

    /// Starts an instance of `spec` and waits until it accepts calls, at most `start_timeout`.
    fn start(
        &self,
        spec: &InstanceSpec,
        call_id: &str,
        start_timeout: Duration,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, DriverError>>;

    /// The runner stops: starts under way end (what they made is removed), no new start
    /// begins, and what the driver cleans up in tasks of its own is waited for, so that
    /// nothing is left when the runner exits (its runtime drops those tasks). Called once the
    /// pool has killed its instances; bound it with a timeout. The default has nothing to
    /// wait for.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// A per-driver value that makes instance ids unlikely to repeat across runner restarts
/// (instance directories and containers are named by them).
fn id_seed() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() ^ (d.as_secs() as u32));
    nanos ^ std::process::id().rotate_left(16)
}

/// The runner's drivers: a function with a command runs on the `process` driver, one with
/// only an image on the `docker` driver, when this runner has one.
#[derive(Debug)]
pub struct Drivers {
    process: Arc<dyn Driver>,
    docker: Arc<DockerSlot>,
}

/// Where the docker driver goes once an engine answers: at start, or later (an engine slow
/// to come up with its host must not leave the runner without one until it restarts).
#[derive(Debug, Default)]
pub struct DockerSlot {
    driver: std::sync::OnceLock<Arc<dyn Driver>>,
    /// Why there is none yet.
    missing: std::sync::Mutex<String>,
}

impl DockerSlot {
    /// Puts `driver` in use for image functions from now on; `false` when one already is.
    pub fn fill(&self, driver: Arc<dyn Driver>) -> bool {
        self.driver.set(driver).is_ok()
    }

    /// Whether a docker driver is in use.
    pub fn is_filled(&self) -> bool {
        self.driver.get().is_some()
    }

    /// Records why there is no docker driver (the last failed attempt).
    pub fn missing(&self, reason: String) {
        *self
            .missing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = reason;
    }
}

impl Drivers {
    /// `process` for commands; `docker` for images, or the reason image functions cannot
    /// run here (yet: see [`Drivers::docker_slot`]).
    pub fn new(process: Arc<dyn Driver>, docker: Result<Arc<dyn Driver>, String>) -> Self {
        let slot = DockerSlot::default();
        match docker {
            Ok(driver) => {
                slot.fill(driver);
            }
            Err(reason) => slot.missing(reason),
        }
        Drivers {
            process,
            docker: Arc::new(slot),
        }
    }

    /// The slot a docker driver connected later goes in.
    pub fn docker_slot(&self) -> Arc<DockerSlot> {
        Arc::clone(&self.docker)
    }

    /// The driver for `spec`.
    ///
    /// # Errors
    /// [`DriverError::Invalid`] for an image function on a runner without a docker driver.
    fn pick(&self, spec: &InstanceSpec) -> Result<&dyn Driver, DriverError> {
        if !spec.command.is_empty() || spec.image.is_none() {
            return Ok(self.process.as_ref());
        }
        match self.docker.driver.get() {
            Some(docker) => Ok(docker.as_ref()),
            None => Err(DriverError::Invalid(format!(
                "function {}/{} runs the image {:?}, but this runner has no Docker engine \
                 ({}): give it one (DOCKER_HOST or the engine's socket), or give the \
                 function a command",
                spec.app,
                spec.function,
                spec.image.as_deref().unwrap_or_default(),
                self.docker
                    .missing
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            ))),
        }
    }
}

impl Driver for Drivers {
    fn check(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        self.pick(spec)?.check(spec)
    }

    fn start(
        &self,
        spec: &InstanceSpec,
        call_id: &str,
        start_timeout: Duration,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, DriverError>> {
        match self.pick(spec) {
            Ok(driver) => driver.start(spec, call_id, start_timeout),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let docker = async {
                if let Some(docker) = self.docker.driver.get() {
                    docker.shutdown().await;
                }
            };
            futures::future::join(self.process.shutdown(), docker).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeDriver;

    fn image_spec() -> InstanceSpec {
        InstanceSpec {
            app: "app".into(),
            function: "img".into(),
            command: Vec::new(),
            image: Some("repo/img:1".into()),
            memory_mb: 64,
            concurrency: 1,
            idle_timeout: Duration::from_secs(30),
            config: BTreeMap::new(),
        }
    }

    /// A runner whose engine did not answer at start refuses image functions, saying why,
    /// until a driver connected later fills the slot; then they run on it (before, only a
    /// restart gave it one).
    #[tokio::test]
    async fn image_functions_run_once_a_docker_driver_arrives_later() {
        let process = Arc::new(FakeDriver::default());
        let drivers = Drivers::new(process.clone(), Err("no answer within 15s".into()));
        let refused = drivers
            .start(&image_spec(), "call-1", Duration::from_secs(1))
            .await
            .expect_err("no docker driver yet");
        assert!(
            matches!(&refused, DriverError::Invalid(m) if m.contains("no answer within 15s")),
            "{refused:?}"
        );
        let slot = drivers.docker_slot();
        assert!(!slot.is_filled());
        let docker = Arc::new(FakeDriver::default());
        assert!(slot.fill(docker.clone()));
        assert!(!slot.fill(Arc::new(FakeDriver::default())), "filled once");
        drivers
            .start(&image_spec(), "call-2", Duration::from_secs(1))
            .await
            .expect("the late driver runs it");
        assert_eq!(docker.started(), 1);
        assert_eq!(process.started(), 0);
    }
}
