//! The `docker` control plane: runners are containers of the runner image, started through
//! the Docker Engine API (bollard) on the network the npm and the LBs share.
//!
//! - **Provision**: create and start a container `<npm id>-runner-<random>` from
//!   `FN_DOCKER_RUNNER_IMAGE` on the network, labelled with its LB group and this npm's id;
//!   report it only once it answers the gRPC health check at `<name>:9190` (Docker's DNS
//!   resolves container names on a user-defined network). A runner that exits or stays
//!   silent past the start timeout is removed, and the error quotes its last output.
//! - **List**: the containers carrying this npm's label. Running ones are the runner set;
//!   exited ones are removed, and so are ones never started (an npm killed between create
//!   and start left them) once twice the start timeout old by their created label, or seen
//!   so that long by this npm. Because the set lives in the engine, not in the npm, a
//!   restarted npm finds its runners again, and the control loop provisions nothing in
//!   place of those it lists. A running one this npm has not seen answer SERVING (it did
//!   not make it) is probed at each list until it does: listed while no probe reaches it
//!   (the LBs probe it themselves), but kept out once it answers NOT_SERVING (a kept runner
//!   still draining after its removal was cut short, one whose npm was killed while it
//!   started), and removed if it still does not serve after a bound; kept out, it does not
//!   count for its group, and the control loop may provision in its place (a restarted npm
//!   retains its group, as a listed runner's, for the group's minimum), but it counts
//!   against the bound on all runners, as it still runs (see [`DockerControlPlane::adopt`]
//!   and [`ControlPlane::held_out`]). On swarm, a runner service removed whose task still
//!   drains on its node (Swarm deletes the service at once, and stops its task afterwards)
//!   counts against the bound on all runners too, until its task stops, and for at most
//!   the stop grace from the list that first found it so (see [`ControlPlane::leaving`]).
//! - **Remove**: stop (SIGTERM; the runner drains, SIGKILL after a grace) and remove. A
//!   removal the npm's shutdown cuts short leaves nothing for good: see below.
//! - **Function containers**: a runner given the engine (`FN_DOCKER_RUNNER_ENGINE`) starts
//!   function containers labelled with its `FN_RUNNER_ID`, which the npm sets to the
//!   runner's container (or service) name. A runner removes its own when it drains; when it
//!   could not (it crashed, or was killed), the npm removes what is left under its name once
//!   the runner has stopped, before its container: when removing it, after finding it
//!   exited, and at shutdown. The runner container goes last, so that a removal cut short in
//!   between leaves it for the next list (the shutdown's, or the next npm's) to finish. On
//!   swarm the npm does not sweep (a deleted service's task still drains after
//!   the npm's call returns, and its containers are on its node's engine, not the
//!   manager's); a service's restarted task keeps the service's name as its id, so the new
//!   runner removes its predecessor's at start.
//! - **Shutdown**: removes this npm's runners, so `docker compose down` leaves nothing
//!   behind; with `FN_DOCKER_KEEP_RUNNERS=true` they stay for the next npm to adopt, and so
//!   they do under swarm while the npm's own service is still there, or while the engine
//!   cannot say whether it is (see [`DockerControlPlane::own_service_stays`]). Not
//!   those still starting: a provisioning stops when the npm does (it is cancelled, see
//!   [`ControlPlane::provision`]) only where it waits, never inside the request that creates
//!   the container (or service), and removes the runner it made, which never answered
//!   health; the control loop waits for it before the shutdown lists what to remove.
//!   Removals under way are dropped, and their runners are among those the shutdown lists;
//!   kept, the next npm finds them stopped, or running and NOT_SERVING (cut while they
//!   drained), and does not adopt them.
//!
//! What runners share with the npm is settled once, at start ([`Placement`]): the network
//! (`FN_DOCKER_NETWORK`, else the one network of the npm's own container), the certificates
//! (`FN_DOCKER_CERTS_VOLUME`, a volume name or an absolute host path, else whatever the npm's
//! own container has mounted at the directory of its `FN_NODE_CERT`) — mounted read-only in
//! every runner at that same directory, so runners get the npm's `FN_NODE_CERT*` paths —
//! and the npm id in the labels (`FN_DOCKER_NPM_ID`, else the network's name).
//!
//! Runner containers are hardened the way the compose file's runners are: read-only root,
//! a private `/tmp`, all capabilities dropped but those needed to start functions as another
//! user, `no-new-privileges` (not on swarm: Engine API 1.41 has no such setting for a
//! service; there the runner's own `no_new_privs`, set before its first thread, is what its
//! functions inherit, and execs into the container, such as its health check, lack it), an
//! init process, and a memory limit of the runner's capacity plus a margin for the runner
//! itself (inside a container the runner cannot create memory
//! cgroups per function, so this limit is what bounds the functions together).
//!
//! Layout: this file decides what a runner container is and drives its life; `setup`
//! holds the settings and settles the [`Placement`]; `engine` is the [`Engine`] trait (the
//! few Engine API calls needed, faked in the tests) and its bollard implementation;
//! `tracking` is what the plane knows of its runners beyond the engine (names claimed by
//! work under way, runners seen answering health).

mod engine;
mod setup;
mod swarm;
mod tracking;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fn_lifecycle::retry::Backoff;
use fn_tls::TlsMode;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

pub use engine::{
    BollardEngine, Container, ContainerState, Engine, EngineError, RUNNER_CAPABILITIES, SelfView,
    create_body,
};
pub use setup::{
    CertsSource, DockerConfig, DockerSetupError, Placement, RUNNER_ENGINE_SOCKET, RunnerEngine,
    SECRETS_DIR, SwarmConfig, TlsFiles, image_missing, resolve_placement,
};
pub use swarm::{SecretRef, SwarmEngine, own_secrets, service_spec};
use tracking::{Adoption, Claims, FirstSeen, Observed, Standing, Warnings, lock};

use super::{ControlPlane, ControlPlaneError, Health, RunnerInfo};

/// Label present on every runner container: `runner`.
pub const LABEL_ROLE: &str = "fn.dataplane.role";
/// Label naming the npm that owns the container (`FN_DOCKER_NPM_ID`).
pub const LABEL_NPM: &str = "fn.dataplane.npm";
/// Label naming the runner's LB group.
pub const LABEL_GROUP: &str = "fn.dataplane.group";
/// Label holding the provisioning time in Unix milliseconds (runner order in LB lists).
pub const LABEL_CREATED: &str = "fn.dataplane.created";
/// Label holding the runner's gRPC port.
pub const LABEL_PORT: &str = "fn.dataplane.port";

/// gRPC port of runner containers (each has its own address, so one port fits all).
pub const RUNNER_PORT: u16 = 9190;
/// Most processes and threads of one runner container, its functions' included: inside a
/// container the runner cannot limit each function's (the cgroup file system is read-only
/// there), so this bounds them together, and no fork bomb takes the host's pids.
pub const RUNNER_PIDS_LIMIT: i64 = 4096;
/// Log driver of runner containers and services: the engine's `json-file`, bounded below,
/// whatever the engine's default. A runner's stderr carries every line its functions write
/// (up to ~1 MiB/s per instance), and `json-file` without `max-size` keeps them all.
pub const RUNNER_LOG_DRIVER: &str = "json-file";
/// Size at which a runner container's log file is rotated. 10x a function container's
/// (`1m`): a runner's log is its functions' lines and its own.
pub const RUNNER_LOG_MAX_SIZE: &str = "10m";
/// Log files kept per runner container (the current one included): 30 MiB at most, with
/// `docker logs` (and the npm's tail of a failed runner) still reading the recent lines.
pub const RUNNER_LOG_MAX_FILE: &str = "3";

/// The log driver's options for a runner container or service: `max-size` and `max-file`.
pub fn runner_log_options() -> HashMap<String, String> {
    HashMap::from([
        ("max-size".to_owned(), RUNNER_LOG_MAX_SIZE.to_owned()),
        ("max-file".to_owned(), RUNNER_LOG_MAX_FILE.to_owned()),
    ])
}

/// Memory a runner container gets beyond its capacity, for the runner process itself.
const RUNNER_OVERHEAD_MB: u64 = 128;

/// A runner container to create: everything the engine needs, decided here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerSpec {
    pub name: String,
    pub image: String,
    pub network: String,
    /// `KEY=value` pairs.
    pub env: Vec<String>,
    pub labels: HashMap<String, String>,
    /// Certificates and the directory to mount them at (read-only).
    pub certs: Option<(CertsSource, String)>,
    /// Host paths bind-mounted read-write: `(host, container)`.
    pub binds: Vec<(String, String)>,
    pub memory_limit_bytes: i64,
    /// Swarm placement constraints (swarm only).
    pub constraints: Vec<String>,
    /// How long the runner may drain after SIGTERM before it is killed (swarm only: a
    /// service's tasks get it at creation).
    pub stop_grace: Duration,
}

/// The container spec of a new runner for `group`.
pub fn build_spec(
    config: &DockerConfig,
    placement: &Placement,
    group: &str,
    name: &str,
    created: SystemTime,
) -> RunnerSpec {
    let mut env = vec![
        format!("FN_GRPC_PORT={RUNNER_PORT}"),
        format!("FN_MAX_MEMORY_MB={}", config.runner_memory_mb),
        // What its function containers are labelled with: the name the npm knows it by.
        format!("FN_RUNNER_ID={name}"),
    ];
    match &config.tls_files {
        Some(files) => {
            env.push(format!("FN_NODE_CERT={}", files.cert.display()));
            env.push(format!("FN_NODE_CERT_KEY={}", files.key.display()));
            env.push(format!("FN_NODE_CERT_AUTHORITY={}", files.ca.display()));
        }
        None => env.push("FN_INSECURE=true".to_owned()),
    }
    let mut binds = Vec::new();
    if let Some(engine) = &config.runner_engine {
        env.push(format!("DOCKER_HOST=unix://{RUNNER_ENGINE_SOCKET}"));
        env.push(format!("FN_DOCKER_IOFS_DIR={}", engine.iofs_dir));
        binds.push((engine.socket.clone(), RUNNER_ENGINE_SOCKET.to_owned()));
        binds.push((engine.iofs_dir.clone(), engine.iofs_dir.clone()));
    }
    env.extend(config.extra_env.iter().map(|(k, v)| format!("{k}={v}")));
    let created_ms = created
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let labels = HashMap::from([
        (LABEL_ROLE.to_owned(), "runner".to_owned()),
        (LABEL_NPM.to_owned(), placement.npm_id.clone()),
        (LABEL_GROUP.to_owned(), group.to_owned()),
        (LABEL_CREATED.to_owned(), created_ms.to_string()),
        (LABEL_PORT.to_owned(), RUNNER_PORT.to_string()),
    ]);
    let memory_mb = config.runner_memory_mb.saturating_add(RUNNER_OVERHEAD_MB);
    RunnerSpec {
        name: name.to_owned(),
        image: config.runner_image.clone(),
        network: placement.network.clone(),
        env,
        labels,
        certs: placement.certs.clone(),
        binds,
        memory_limit_bytes: i64::try_from(memory_mb.saturating_mul(1024 * 1024))
            .unwrap_or(i64::MAX),
        constraints: config
            .swarm
            .as_ref()
            .map(|s| s.constraints.clone())
            .unwrap_or_default(),
        stop_grace: config.stop_grace,
    }
}

/// The runner a listed container is, from its name and labels; `None` when labels are
/// missing or malformed.
pub fn runner_info(container: &Container) -> Option<RunnerInfo> {
    let label = |key: &str| container.labels.get(key);
    if label(LABEL_ROLE).map(String::as_str) != Some("runner") {
        return None;
    }
    let group = label(LABEL_GROUP)?.clone();
    let created_ms: u64 = label(LABEL_CREATED)?.parse().ok()?;
    let port: u16 = label(LABEL_PORT)?.parse().ok()?;
    Some(RunnerInfo {
        id: container.name.clone(),
        address: format!("{}:{port}", container.name),
        group,
        created: UNIX_EPOCH + Duration::from_millis(created_ms),
    })
}

/// Container names start with the npm id, made DNS-safe (letters, digits, `-`; at most 40).
fn name_prefix(npm_id: &str) -> String {
    let cleaned: String = npm_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    let cleaned = cleaned.trim_matches('-');
    if cleaned.is_empty() {
        "fn".to_owned()
    } else {
        cleaned.to_owned()
    }
}

/// What a runner answers its health check.
pub trait ReadyProbe: Send + Sync + std::fmt::Debug {
    /// What the runner at `address` (`host:port`) answers: SERVING once it is ready, and
    /// whether it answered at all when it is not.
    fn health<'a>(&'a self, address: &'a str) -> BoxFuture<'a, Health>;
}

/// The gRPC health check, over the npm's TLS.
#[derive(Debug)]
pub struct GrpcHealth {
    tls: TlsMode,
}

impl GrpcHealth {
    pub fn new(tls: TlsMode) -> Self {
        GrpcHealth { tls }
    }
}

impl ReadyProbe for GrpcHealth {
    fn health<'a>(&'a self, address: &'a str) -> BoxFuture<'a, Health> {
        Box::pin(super::health_of(&self.tls, address))
    }
}

/// Runner containers through the Docker Engine API.
#[derive(Debug)]
pub struct DockerControlPlane {
    config: DockerConfig,
    placement: Placement,
    engine: Arc<dyn Engine>,
    ready: Arc<dyn ReadyProbe>,
    /// The engine runners start function containers on, when they were given one: the
    /// npm removes there what a runner that is gone left.
    functions: Option<Arc<dyn Engine>>,
    /// Runners being provisioned: one that stops while it starts is its provisioner's to
    /// report (with its output) and remove, not `list`'s.
    starting: Claims,
    /// Runners being removed: one found stopped is its removal's, which is sweeping what
    /// it left before removing it (see [`DockerControlPlane::remove_runner`]), not an
    /// exited runner for `list` to report and remove.
    removing: Claims,
    /// What the health probe said of the running runners this npm did not see start: which
    /// are listed (see [`DockerControlPlane::adopt`]).
    adoption: Adoption,
    /// Repeats of the warnings about runners not adopted yet, at each tick's list: once a
    /// minute at most for each runner.
    adoption_warnings: Warnings,
    /// The running runners the last list did not report (held out, see
    /// [`ControlPlane::held_out`]).
    held_out: Mutex<Vec<RunnerInfo>>,
    /// Since when each removed runner still running has been seen (swarm: a service
    /// deleted whose task still drains).
    leaving: FirstSeen,
    /// How many of those the last list counted (see [`ControlPlane::leaving`]).
    leaving_count: std::sync::atomic::AtomicUsize,
    /// Since when each runner container created and never started, and not being started,
    /// has been seen: it is removed twice the start timeout after, where its created label
    /// (the npm's wall clock, which steps) may say it is not old yet for hours.
    never_started: FirstSeen,
    /// Under swarm, the npm's own service: while it exists when the npm stops (a rolling
    /// update, its task restarted or moved), the runners stay for its next task.
    own_service: Option<String>,
}

/// Longest wait for a failed runner's last output, for the error: the engines bound the
/// logs themselves ([`engine::LOGS_BOUND`]) and swarm's then asks for the tasks' errors;
/// this is the backstop, so that the provisioning ends whatever the engine does.
const FAILURE_OUTPUT_BOUND: Duration = Duration::from_secs(15);

/// Longest a list waits for its removals, of runner containers never started, of runners
/// that exited and of runners held out past the bound (see
/// [`DockerControlPlane::remove_found`]): well inside the control loop's bound on a list,
/// 10 s, which also covers the engine's listing and the probes (3 s at most).
const LIST_REMOVALS_BOUND: Duration = Duration::from_secs(4);

/// Least time between two repeats of the warnings about one runner not adopted yet (see
/// [`DockerControlPlane::adopt`]).
const ADOPTION_WARNINGS_INTERVAL: Duration = Duration::from_secs(60);

/// Most times the shutdown asks whether the npm's own service is still there when the
/// engine cannot say (see [`DockerControlPlane::own_service_stays`]).
const OWN_SERVICE_CHECKS: u32 = 4;

/// The pause before the shutdown asks again whether the npm's own service is still there:
/// the first, growing ×2 up to the second (a leader election takes a few seconds).
const OWN_SERVICE_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(500), Duration::from_secs(2));

impl DockerControlPlane {
    /// Connects to the Docker engine, settles the [`Placement`] and checks that the image,
    /// the network and the certificates volume exist (under swarm an image missing on the
    /// manager is only warned of: the nodes pull it, see [`image_missing`]).
    ///
    /// # Errors
    /// [`DockerSetupError`] naming the variable at fault and what to do.
    pub async fn connect(config: DockerConfig) -> Result<Self, DockerSetupError> {
        let engine = BollardEngine::connect()
            .await
            .map_err(|reason| DockerSetupError::Engine {
                plane: config.plane(),
                reason,
            })?;
        match engine.check_image(&config.runner_image).await {
            Ok(()) => {}
            Err(EngineError::NotFound(image)) => {
                let warning = image_missing(&config, &image)?;
                tracing::warn!(image = %image, "{warning}");
            }
            Err(e) => return Err(DockerSetupError::Api(e.to_string())),
        }
        if config.swarm.is_some() {
            engine
                .check_swarm_manager()
                .await
                .map_err(DockerSetupError::Swarm)?;
        }
        let own = match own_container_id() {
            Some(id) => match engine.inspect_self(&id).await {
                Ok(view) => Some(view),
                Err(e) => {
                    tracing::info!(hostname = %id, error = %e, "the npm is not in a container it can inspect");
                    None
                }
            },
            None => None,
        };
        let placement = resolve_placement(&config, own.as_ref())?;
        match engine.check_network(&placement.network).await {
            Ok(()) => {}
            Err(EngineError::NotFound(n)) => {
                return Err(DockerSetupError::Network {
                    var: config.network_var(),
                    message: format!("network {n} does not exist on the Docker engine"),
                });
            }
            Err(e) => return Err(DockerSetupError::Api(e.to_string())),
        }
        if let Some((CertsSource::Volume(volume), _)) = &placement.certs {
            match engine.check_volume(volume).await {
                Ok(()) => {}
                Err(EngineError::NotFound(v)) => {
                    return Err(DockerSetupError::Certs(format!(
                        "volume {v} does not exist on the Docker engine"
                    )));
                }
                Err(e) => return Err(DockerSetupError::Api(e.to_string())),
            }
        }
        tracing::info!(
            plane = config.plane(),
            image = %config.runner_image,
            network = %placement.network,
            certs = ?placement.certs,
            npm_id = %placement.npm_id,
            "docker control plane ready"
        );
        let functions: Option<Arc<dyn Engine>> = (config.runner_engine.is_some()
            && config.swarm.is_none())
        .then(|| Arc::new(engine.clone()) as Arc<dyn Engine>);
        let own_service = config
            .swarm
            .as_ref()
            .and(own.as_ref())
            .and_then(|view| view.service_id.clone());
        let engine: Arc<dyn Engine> = if config.swarm.is_some() {
            Arc::new(SwarmEngine::new(
                engine,
                config.start_timeout,
                own_service.clone(),
            ))
        } else {
            Arc::new(engine)
        };
        let plane = Self::with_engine(
            config.clone(),
            placement,
            engine,
            Arc::new(GrpcHealth::new(config.tls)),
        )
        .with_own_service(own_service);
        Ok(match functions {
            Some(functions) => plane.with_function_engine(functions),
            None => plane,
        })
    }

    /// Removes, through `engine`, the function containers of runners that are gone.
    #[must_use]
    pub fn with_function_engine(mut self, engine: Arc<dyn Engine>) -> Self {
        self.functions = Some(engine);
        self
    }

    /// A control plane over any [`Engine`] and [`ReadyProbe`] (tests, other engines).
    pub fn with_engine(
        config: DockerConfig,
        placement: Placement,
        engine: Arc<dyn Engine>,
        ready: Arc<dyn ReadyProbe>,
    ) -> Self {
        DockerControlPlane {
            config,
            placement,
            engine,
            ready,
            functions: None,
            starting: Claims::default(),
            removing: Claims::default(),
            adoption: Adoption::default(),
            adoption_warnings: Warnings::new(ADOPTION_WARNINGS_INTERVAL),
            held_out: Mutex::default(),
            leaving: FirstSeen::default(),
            leaving_count: std::sync::atomic::AtomicUsize::new(0),
            never_started: FirstSeen::default(),
            own_service: None,
        }
    }

    /// Under swarm: the npm's own service, whose runners outlive a task of it that stops
    /// while the service stays (see [`ControlPlane::shutdown`]).
    #[must_use]
    pub fn with_own_service(mut self, service: Option<String>) -> Self {
        self.own_service = service;
        self
    }

    /// What runners share with the npm.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The runner containers this npm made: its label and the runner role. A function
    /// container can carry this npm's label too (the engine merges an image's labels into
    /// its containers', and the driver sets only its own keys): without the role it was
    /// taken for a broken runner, and removed.
    async fn own_containers(&self) -> Result<Vec<Container>, ControlPlaneError> {
        let listed = self
            .engine
            .list(LABEL_NPM, &self.placement.npm_id)
            .await
            .map_err(|e| ControlPlaneError::Failed(format!("listing runner containers: {e}")))?;
        Ok(listed
            .into_iter()
            .filter(|c| c.labels.get(LABEL_ROLE).map(String::as_str) == Some("runner"))
            .collect())
    }

    /// Removes a container that will not become a runner; failures are only logged.
    async fn discard(&self, name: &str) {
        if let Err(e) = self.engine.remove(name, Duration::ZERO).await {
            tracing::warn!(container = name, error = %e, "cannot remove a failed runner container; remove it by hand");
        }
    }

    /// Removes the function containers runner `runner` left (it crashed, or was killed
    /// while it drained); none when it removed its own. Failures are only logged: the next
    /// removal of a runner tries again for its own.
    async fn remove_function_containers(&self, runner: &str) {
        let Some(engine) = &self.functions else {
            return;
        };
        let containers = match engine.list(fn_docker::LABEL_RUNNER, runner).await {
            Ok(containers) => containers,
            Err(e) => {
                tracing::warn!(runner, error = %e, "cannot look for the function containers of a runner that is gone");
                return;
            }
        };
        let removals = containers.iter().map(|c| async move {
            match engine.remove(&c.name, Duration::ZERO).await {
                Ok(()) => tracing::info!(runner, container = %c.name, "removed a function container its runner left"),
                Err(e) => tracing::warn!(runner, container = %c.name, error = %e, "cannot remove a function container its runner left"),
            }
        });
        futures::future::join_all(removals).await;
    }

    /// Removes runner container `name`, giving it `grace` to drain, and the function
    /// containers it left.
    ///
    /// With a function engine, in this order: stop it, remove what it left, remove it. The
    /// runner container is what says that function containers of its may be left, so it
    /// goes last: whatever cuts this short (the control loop drops the removals under way
    /// when the npm stops, the npm's bound cuts its shutdown) leaves it in the engine,
    /// draining (SIGTERM sent, so NOT_SERVING) or stopped, for whoever lists it next to
    /// finish: this npm's shutdown, or, with `FN_DOCKER_KEEP_RUNNERS`, the next npm's list,
    /// which does not adopt a runner that does not answer health and removes an exited
    /// runner's function containers before the runner. Removed first, a removal cut between
    /// the two left its function containers to nobody, for good. So a removal needs no
    /// waiting for at the npm's shutdown (see [`ControlPlane::remove`]).
    async fn remove_runner(&self, name: &str, grace: Duration) -> Result<(), EngineError> {
        // Claimed either way: while the runner drains it says NOT_SERVING, and a list must
        // not take it for one to hold out and kill (see [`DockerControlPlane::adopt`]).
        let _removing = self.removing.claim(name);
        if self.functions.is_none() {
            // Nothing to sweep (swarm, or no engine given to runners): one request, which
            // the engine completes or not; either way nothing is left that the next list
            // does not find.
            return self.engine.remove(name, grace).await;
        }
        match self.engine.stop(name, grace).await {
            // Gone already: what it left may still be there.
            Ok(()) | Err(EngineError::NotFound(_)) => {}
            Err(e) => {
                // It may still run, and a function container it starts while its others
                // are swept would be left once the runner container goes: killed first.
                tracing::warn!(container = name, error = %e, "stopping a runner container failed; killing it, then removing what it left, then it");
                match self.engine.stop(name, Duration::ZERO).await {
                    Ok(()) | Err(EngineError::NotFound(_)) => {}
                    // Left as it is, with what it runs, for the removal's next try (the
                    // control loop's next tick) or the next list.
                    Err(e) => return Err(e),
                }
            }
        }
        self.remove_function_containers(name).await;
        self.engine.remove(name, Duration::ZERO).await
    }

    /// Makes one runner and waits until it answers health. Cut by `cancel` only where it
    /// waits (for health, between probes, for a failed runner's output), never inside the
    /// request that makes the container (or service); cut, it removes what it made (see
    /// [`DockerControlPlane::cancelled`]). Dropped instead (the control loop's bound on
    /// that stop ran out), what it made is in the engine, for [`ControlPlane::shutdown`].
    async fn provision_one(
        &self,
        group: &str,
        cancel: &CancellationToken,
    ) -> Result<RunnerInfo, ControlPlaneError> {
        if cancel.is_cancelled() {
            return Err(ControlPlaneError::Cancelled);
        }
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!(
            "{}-runner-{}",
            name_prefix(&self.placement.npm_id),
            &suffix[..12]
        );
        let created = SystemTime::now();
        let spec = build_spec(&self.config, &self.placement, group, &name, created);
        let _starting = self.starting.claim(&name);
        if let Err(e) = self.engine.run(&spec).await {
            self.discard(&name).await;
            return Err(ControlPlaneError::Failed(format!(
                "starting runner container {name} from {}: {e}",
                self.config.runner_image
            )));
        }
        let address = format!("{name}:{RUNNER_PORT}");
        let started = tokio::time::Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            // Until it answers, the runner is not the control loop's: cancelled, this
            // removes it.
            let Some(health) = cancel
                .run_until_cancelled(self.ready.health(&address))
                .await
            else {
                return Err(self.cancelled(&name).await);
            };
            if health.is_serving() {
                tracing::info!(runner = %name, %address, group, "runner container ready");
                self.adoption.serving(&name);
                return Ok(RunnerInfo {
                    id: name,
                    address,
                    group: group.to_owned(),
                    created,
                });
            }
            let failure = match self.engine.is_running(&name).await {
                // Docker: the container exited. Swarm: every task failed or was rejected,
                // or none was placed within the start timeout (its output quotes why).
                Ok(false) => Some(
                    "exited before answering health (as a swarm service: or no node took its \
                     task)"
                        .to_owned(),
                ),
                Err(EngineError::NotFound(_)) => {
                    Some("was removed while it started (by hand, or by another npm)".to_owned())
                }
                _ if started.elapsed() > self.config.start_timeout => Some(format!(
                    "did not answer health at {address} within {:?} (is the npm on network {}?)",
                    self.config.start_timeout, self.placement.network
                )),
                _ => None,
            };
            if let Some(what) = failure {
                let tail =
                    tokio::time::timeout(FAILURE_OUTPUT_BOUND, self.engine.logs_tail(&name, 10));
                let Some(output) = cancel.run_until_cancelled(tail).await else {
                    return Err(self.cancelled(&name).await);
                };
                let output = output.unwrap_or_else(|_| {
                    format!("(the engine gave none within {FAILURE_OUTPUT_BOUND:?})")
                });
                self.discard(&name).await;
                return Err(ControlPlaneError::Failed(format!(
                    "runner container {name} {what}; its last output: {}",
                    if output.is_empty() { "(none)" } else { &output }
                )));
            }
            if cancel.run_until_cancelled(backoff.sleep()).await.is_none() {
                return Err(self.cancelled(&name).await);
            }
        }
    }

    /// The runners among `found` (running, not seen answering SERVING by this npm) to list,
    /// each probed (together) and taken by what it answers:
    /// - SERVING: adopted, listed from now on without probes.
    /// - No answer (not reached, or not within the probe's bound): listed, as before the npm
    ///   probed the runners it finds (the LBs probe each runner themselves, and do not call
    ///   one that does not answer them), and never removed for it: an npm cut off from its
    ///   runners (a network fault, a certificate problem) hid healthy runners from the LBs
    ///   and killed them. Probed again at each list.
    /// - Another status (NOT_SERVING: a runner whose removal was cut short while it drained
    ///   says so from its SIGTERM on, and one whose npm was killed while it started says so
    ///   until it is ready): held out, from then on until it answers SERVING, even when a
    ///   later probe cannot reach it (a draining runner stops answering before it exits);
    ///   given to the LBs, it refused their calls. A draining runner exits on its own, and
    ///   the next list removes it, with what it left; one held out for longer than
    ///   [`Self::silence_bound`] is killed and removed.
    ///
    /// A runner being removed is its removal's: not probed (it says NOT_SERVING while it
    /// drains), never killed here, and listed, or held out, as it was.
    ///
    /// Returns the runners to list, those held out within the bound, and those held out
    /// past it, for the list to remove (see [`Self::remove_found`]).
    async fn adopt(&self, found: Vec<RunnerInfo>) -> Adopted {
        let mut adopted = Adopted::default();
        let mut to_probe = Vec::new();
        for info in found {
            if !self.removing.contains(&info.id) {
                to_probe.push(info);
            } else if self.adoption.standing(&info.id) == Some(Standing::Unreached) {
                adopted.listed.push(info);
            } else {
                adopted.held.push(info);
            }
        }
        let probes = to_probe.into_iter().map(|info| async move {
            let health = self.ready.health(&info.address).await;
            (info, health)
        });
        let probed = futures::future::join_all(probes).await;
        let now = tokio::time::Instant::now();
        let bound = self.silence_bound();
        for (info, health) in probed {
            let (runner, address, group) = (&info.id, &info.address, &info.group);
            match self.adoption.observe(runner, &health, now) {
                Observed::Adopted => {
                    tracing::info!(%runner, %address, %group, "adopted a running runner container: it answers health SERVING");
                    adopted.listed.push(info);
                }
                Observed::Unreached { first: true } => {
                    self.adoption_warnings.first(runner, now);
                    tracing::warn!(%runner, %address, %group, %health, "a running runner container this npm did not start does not answer its health probe: listed, as the LBs probe it themselves; probed again at each list");
                    adopted.listed.push(info);
                }
                Observed::Unreached { first: false } => {
                    fn_lifecycle::warn_throttled!(self.adoption_warnings.repeat(runner, now), %runner, %address, %group, %health, "a running runner container this npm did not start still does not answer its health probe (listed)");
                    adopted.listed.push(info);
                }
                Observed::HeldOut { held, .. } if held > bound => adopted.overdue.push(info),
                Observed::HeldOut { first: true, .. } => {
                    self.adoption_warnings.first(runner, now);
                    tracing::warn!(%runner, %address, %group, %health, ?bound, "a running runner container this npm did not start does not serve (it drains, or still starts): kept from the LBs until it answers SERVING; removed if it has not within the bound");
                    adopted.held.push(info);
                }
                Observed::HeldOut { held, first: false } => {
                    fn_lifecycle::warn_throttled!(self.adoption_warnings.repeat(runner, now), %runner, %address, %group, %health, ?held, ?bound, "a running runner container this npm did not start still does not serve: kept from the LBs");
                    adopted.held.push(info);
                }
            }
        }
        adopted
    }

    /// Removes what a list found to remove, all together, for at most
    /// [`LIST_REMOVALS_BOUND`]: the runner containers `never_started` (one request each),
    /// those that `exited` (the function containers each left first, then it), and the
    /// runners held out past [`Self::silence_bound`] (`overdue`: killed, then the same). The
    /// list they run in is bounded (the control loop's `LIST_BOUND`), and its runners must
    /// come out of it: one after another, a removal that hangs (a sweep, or a removal, the
    /// engine does not answer) timed out that list, and, for a runner it had killed, every
    /// list after it. A removal cut short is finished by a later list (the runner is still
    /// held out, or found stopped, or still never started).
    ///
    /// Returns the `overdue` runners not seen removed: they may still run.
    async fn remove_found(
        &self,
        never_started: Vec<String>,
        exited: Vec<String>,
        overdue: Vec<RunnerInfo>,
    ) -> Vec<RunnerInfo> {
        if never_started.is_empty() && exited.is_empty() && overdue.is_empty() {
            return overdue;
        }
        let never_started_removals = never_started.iter().map(|name| self.discard(name));
        let exited_removals = exited.iter().map(|name| async move {
            // Its function containers first: a removal cut short in between finds the
            // runner again next time and goes on, where the other order would leave them
            // behind for good.
            self.remove_function_containers(name).await;
            self.discard(name).await;
        });
        let bound = self.silence_bound();
        let removed: Vec<AtomicBool> = overdue.iter().map(|_| AtomicBool::new(false)).collect();
        let overdue_removals = overdue.iter().zip(&removed).map(|(info, removed)| async move {
            let (runner, address) = (&info.id, &info.address);
            tracing::warn!(%runner, %address, ?bound, "removing a running runner container that has not answered health SERVING within the bound");
            match self.remove_runner(runner, Duration::ZERO).await {
                Ok(()) => removed.store(true, Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!(%runner, error = %e, "cannot remove a runner container that does not serve");
                }
            }
        });
        let removals = futures::future::join3(
            futures::future::join_all(never_started_removals),
            futures::future::join_all(exited_removals),
            futures::future::join_all(overdue_removals),
        );
        if tokio::time::timeout(LIST_REMOVALS_BOUND, removals)
            .await
            .is_err()
        {
            tracing::warn!(never_started = never_started.len(), exited = exited.len(), not_serving = overdue.len(), bound = ?LIST_REMOVALS_BOUND, "removing runner containers that never started, exited or do not serve took longer than the bound; the next list goes on");
        }
        overdue
            .into_iter()
            .zip(removed)
            .filter(|(_, removed)| !removed.load(Ordering::Relaxed))
            .map(|(info, _)| info)
            .collect()
    }

    /// How long a running runner container found silent is given before it is removed: the
    /// start timeout, which its provisioning would have given it, or the stop grace, within
    /// which a draining runner's removal would have seen it exit (or killed it), whichever
    /// is longer.
    fn silence_bound(&self) -> Duration {
        self.config.start_timeout.max(self.config.stop_grace)
    }

    /// Whether the npm's own swarm service `service` is still there at its shutdown: asked
    /// up to [`OWN_SERVICE_CHECKS`] times, with a short backoff, while the engine cannot say
    /// (a manager that loses its leader, or times out, answers errors for seconds), within
    /// the runners' stop grace at shutdown, which a swarm removal does not wait for (Swarm
    /// drains a deleted service's task itself). `None` when still unsure at the end.
    async fn own_service_stays(&self, service: &str) -> Option<bool> {
        let deadline = tokio::time::Instant::now() + self.config.shutdown_grace;
        let (first, max) = OWN_SERVICE_BACKOFF;
        let mut backoff = Backoff::new(first, max);
        for attempt in 1..=OWN_SERVICE_CHECKS {
            match tokio::time::timeout_at(deadline, self.engine.service_exists(service)).await {
                Ok(Some(exists)) => return Some(exists),
                Ok(None) => {}
                Err(_) => return None,
            }
            let pause = backoff.next_delay();
            if attempt == OWN_SERVICE_CHECKS || tokio::time::Instant::now() + pause >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
        }
        None
    }

    /// Ends a provisioning cancelled after it made runner `name` (the npm is stopping): the
    /// runner is removed at once, whatever the shutdown does with the others. It has never
    /// answered health; left in the engine when the runners stay for the next npm
    /// (`FN_DOCKER_KEEP_RUNNERS`, or an npm service that stays for its next task), that npm
    /// would hold it out while it says NOT_SERVING and remove it after a bound, but list it
    /// while its probes cannot reach it (see [`DockerControlPlane::adopt`]): nothing is
    /// left for that.
    async fn cancelled(&self, name: &str) -> ControlPlaneError {
        self.discard(name).await;
        ControlPlaneError::Cancelled
    }
}

/// What [`DockerControlPlane::adopt`] made of the running runners not seen serving.
#[derive(Debug, Default)]
struct Adopted {
    /// To list: they answered SERVING, or no probe reaches them.
    listed: Vec<RunnerInfo>,
    /// Held out within the bound (they answered another status), or as their removal's.
    held: Vec<RunnerInfo>,
    /// Held out past the bound: to remove.
    overdue: Vec<RunnerInfo>,
}

/// The npm's own container id, if it runs in one: Docker sets the hostname to it.
fn own_container_id() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

impl ControlPlane for DockerControlPlane {
    fn runner_memory_mb(&self) -> u64 {
        self.config.runner_memory_mb
    }

    fn held_out(&self) -> Vec<RunnerInfo> {
        lock(&self.held_out).clone()
    }

    fn leaving(&self) -> usize {
        self.leaving_count.load(Ordering::Relaxed)
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<RunnerInfo>, ControlPlaneError>> {
        Box::pin(async move {
            let began = self.adoption.begin_list();
            let containers = self.own_containers().await?;
            let names = containers.iter().map(|c| c.name.as_str()).collect();
            self.adoption.retain(&names, began);
            self.adoption_warnings.retain(&names);
            self.leaving.retain(&names);
            let created = containers
                .iter()
                .filter(|c| c.state == ContainerState::Created)
                .map(|c| c.name.as_str())
                .collect();
            self.never_started.retain(&created);
            let now = tokio::time::Instant::now();
            let mut leaving = 0;
            let mut runners = Vec::new();
            let mut unproven = Vec::new();
            let mut exited = Vec::new();
            let mut never_started = Vec::new();
            for container in containers {
                match container.state {
                    ContainerState::Running if self.starting.contains(&container.name) => {
                        // Its provisioning reports it once it answers health.
                    }
                    ContainerState::Running => match runner_info(&container) {
                        Some(info)
                            if self.adoption.standing(&info.id) == Some(Standing::Adopted) =>
                        {
                            runners.push(info)
                        }
                        Some(info) => unproven.push(info),
                        None => {
                            tracing::warn!(container = %container.name, "container carries this npm's label but not valid runner labels; ignored")
                        }
                    },
                    ContainerState::Stopped if self.starting.contains(&container.name) => {
                        // Its provisioner reports why, with its output, and removes it.
                    }
                    ContainerState::Stopped if self.removing.contains(&container.name) => {
                        // Stopped by its removal, which removes what it left, then it.
                    }
                    ContainerState::Stopped => {
                        tracing::warn!(container = %container.name, "runner container exited; removing it");
                        exited.push(container.name);
                    }
                    ContainerState::Created if self.starting.contains(&container.name) => {
                        // Being started: its provisioner's, whatever its created label says
                        // (the npm's wall clock may have stepped forward since it was made).
                    }
                    ContainerState::Created => {
                        // Left over from a provisioning the npm did not finish (it was
                        // killed between create and start). Stale twice the start timeout
                        // after this npm first saw it so, on its monotonic clock: its created
                        // label is the npm's wall clock, which may have stepped back since
                        // (NTP, a VM restored), and a label in the future never aged. A label
                        // plainly older than that still removes it at first sight, so that a
                        // restarted npm (or one restarting again and again, which never sees
                        // it that long) clears its predecessors' at once.
                        let bound = self.config.start_timeout * 2;
                        let stale = runner_info(&container).is_none_or(|info| {
                            info.created.elapsed().is_ok_and(|age| age > bound)
                                || self.never_started.seen_for(&container.name, now) > bound
                        });
                        if stale {
                            tracing::warn!(container = %container.name, "removing a runner container that was never started");
                            never_started.push(container.name);
                        }
                    }
                    ContainerState::Leaving if self.removing.contains(&container.name) => {
                        // Its removal has not returned: the control loop counts it still.
                    }
                    ContainerState::Leaving => {
                        // Removed, and draining on its node until it stops, or its stop
                        // grace has passed (then it is killed, or its node is lost).
                        if self.leaving.seen_for(&container.name, now) < self.config.stop_grace {
                            leaving += 1;
                        }
                    }
                    ContainerState::Other => {}
                }
            }
            let Adopted {
                listed,
                mut held,
                overdue,
            } = self.adopt(unproven).await;
            runners.extend(listed);
            // Held out (by the probe, or as its removal's), or overdue and not removed yet:
            // running all the same.
            held.extend(self.remove_found(never_started, exited, overdue).await);
            *lock(&self.held_out) = held;
            self.leaving_count.store(leaving, Ordering::Relaxed);
            Ok(runners)
        })
    }

    fn provision<'a>(
        &'a self,
        group: &'a str,
        count: usize,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<Vec<RunnerInfo>, ControlPlaneError>> {
        Box::pin(async move {
            let results =
                futures::future::join_all((0..count).map(|_| self.provision_one(group, cancel)))
                    .await;
            super::gather_provisioned(results, "runner container")
        })
    }

    fn remove<'a>(
        &'a self,
        runner: &'a RunnerInfo,
    ) -> BoxFuture<'a, Result<(), ControlPlaneError>> {
        Box::pin(async move {
            self.remove_runner(&runner.id, self.config.stop_grace)
                .await
                .map_err(|e| {
                    ControlPlaneError::Failed(format!(
                        "removing runner container {}: {e}",
                        runner.id
                    ))
                })?;
            tracing::info!(runner = %runner.id, "runner container removed");
            Ok(())
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut containers = match self.own_containers().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot list runner containers at shutdown; they stay");
                    return;
                }
            };
            // Removed already (a swarm service deleted, its task still draining).
            containers.retain(|c| c.state != ContainerState::Leaving);
            if self.config.keep_runners {
                tracing::info!(
                    runners = containers.len(),
                    "FN_DOCKER_KEEP_RUNNERS: leaving the runner containers for the next npm"
                );
                return;
            }
            // A task of the npm's service that stops while the service stays (a rolling
            // update, a restart, a node drained) is followed by another, which adopts the
            // runners: removing them cut every call and started the groups from zero.
            // `docker stack rm` removes the service first, and then the runners go. When
            // the engine cannot say, they stay: runner services left behind can be found by
            // their label and removed later (and a next npm of the same id adopts them),
            // where calls cut cannot be had back.
            if let Some(service) = &self.own_service {
                match self.own_service_stays(service).await {
                    Some(true) => {
                        tracing::info!(
                            runners = containers.len(),
                            service = %service,
                            "the npm's service is still there (an update or a restart of its \
                             task): leaving the runner services for its next task"
                        );
                        return;
                    }
                    Some(false) => {}
                    None => {
                        let npm = &self.placement.npm_id;
                        tracing::warn!(
                            runners = containers.len(),
                            service = %service,
                            "cannot tell whether the npm's service is still there: leaving the \
                             runner services, for its next task if it stays; if the stack was \
                             removed, remove them by hand: docker service rm $(docker service ls \
                             -q --filter label={LABEL_NPM}={npm} --filter label={LABEL_ROLE}=runner)"
                        );
                        return;
                    }
                }
            }
            let removals = containers.iter().map(|c| async move {
                let grace = self.config.stop_grace.min(self.config.shutdown_grace);
                if let Err(e) = self.remove_runner(&c.name, grace).await {
                    tracing::warn!(container = %c.name, error = %e, "cannot remove a runner container at shutdown");
                }
            });
            futures::future::join_all(removals).await;
            tracing::info!(
                runners = containers.len(),
                "runner containers removed at shutdown"
            );
        })
    }
}

#[cfg(test)]
mod tests;
