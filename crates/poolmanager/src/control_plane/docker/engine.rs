//! The few Docker Engine operations the docker control plane needs, behind [`Engine`] so the
//! control plane is tested with an in-memory fake; [`BollardEngine`] is the real one (the
//! Engine API over the local socket, through bollard).
//!
//! This module knows containers, not runners: what a runner container looks like is decided
//! in the parent module ([`RunnerSpec`]) and only translated here.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, EndpointSettings, HostConfig,
    HostConfigLogConfig, Mount, MountType, NetworkingConfig, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, InspectNetworkOptions,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
pub use fn_docker::EngineError;
use fn_docker::classify;
use futures::StreamExt;
use futures::future::BoxFuture;

use super::{CertsSource, RunnerSpec};

/// A container as the control plane sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// Name without the leading `/`.
    pub name: String,
    pub state: ContainerState,
    pub labels: HashMap<String, String>,
}

/// The states the control plane tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    /// Created but never started (a provisioning interrupted between create and start).
    Created,
    Running,
    /// Exited or dead: it will not serve again.
    Stopped,
    /// Restarting, paused, being removed, ...: leave it alone this time.
    Other,
    /// Removed, but still running: a swarm runner service deleted whose task still drains
    /// on its node (Swarm stops it with SIGTERM, and kills it after the service's stop
    /// grace, after the deletion has returned). Never listed nor removed again, but it
    /// takes its node's memory until it stops.
    Leaving,
}

/// Container operations of the Docker Engine API.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// Every container (running or not) carrying the label `key=value`.
    fn list<'a>(
        &'a self,
        label_key: &'a str,
        label_value: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Container>, EngineError>>;

    /// Creates and starts a container.
    fn run<'a>(&'a self, spec: &'a RunnerSpec) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Whether the container is running.
    fn is_running<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, EngineError>>;

    /// The last `lines` lines of the container's output, for error messages ("" when
    /// unavailable).
    fn logs_tail<'a>(&'a self, name: &'a str, lines: usize) -> BoxFuture<'a, String>;

    /// Stops the container (SIGTERM, SIGKILL after `grace`) and leaves it, stopped: what it
    /// holds (its name, its labels) stays until [`Engine::remove`]. One already stopped is
    /// not an error; one that is gone is [`EngineError::NotFound`].
    fn stop<'a>(&'a self, name: &'a str, grace: Duration)
    -> BoxFuture<'a, Result<(), EngineError>>;

    /// Stops the container (SIGTERM, SIGKILL after `grace`) and removes it. A container that
    /// is already gone is not an error.
    fn remove<'a>(
        &'a self,
        name: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Whether the swarm service `id` still exists: `None` where the engine has no services
    /// (a plain engine) or cannot tell.
    fn service_exists<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Option<bool>> {
        Box::pin(async { None })
    }
}

/// The Docker Engine API through bollard.
#[derive(Debug, Clone)]
pub struct BollardEngine {
    docker: Docker,
}

/// The label Swarm puts on a task's container: the id of its service.
const SWARM_SERVICE_ID_LABEL: &str = "com.docker.swarm.service.id";

/// Where the npm's own container is attached, as far as the control plane cares.
#[derive(Debug, Clone, Default)]
pub struct SelfView {
    /// Names of the networks the container is on.
    pub networks: Vec<String>,
    /// `(destination, source)` of its volume and bind mounts.
    pub mounts: Vec<(String, CertsSource)>,
    /// The swarm service whose task the container is, if it is one.
    pub service_id: Option<String>,
}

impl BollardEngine {
    /// The engine behind a client already connected (tests: a fake Engine API).
    pub fn with_docker(docker: Docker) -> Self {
        BollardEngine { docker }
    }

    /// The engine client, for the swarm engine built on this one.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Checks that this engine is a swarm manager (services can be created through it).
    ///
    /// # Errors
    /// What to do when it is not.
    pub async fn check_swarm_manager(&self) -> Result<(), String> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| format!("cannot ask the engine about its swarm: {e}"))?;
        let swarm = info.swarm.unwrap_or_default();
        let active = swarm
            .local_node_state
            .is_some_and(|s| s.to_string() == "active");
        if !active {
            return Err(
                "this Docker engine is not in a swarm; run `docker swarm init` (or join one) \
                 first"
                    .into(),
            );
        }
        if swarm.control_available != Some(true) {
            return Err(
                "this Docker engine is a swarm worker; the npm must talk to a manager (place \
                 it on one: deploy.placement.constraints node.role==manager)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Connects to the engine named by `DOCKER_HOST` (a `unix://` socket) or the default
    /// socket `/var/run/docker.sock`, and settles on an API version both sides speak.
    ///
    /// # Errors
    /// A message saying which socket failed and how.
    pub async fn connect() -> Result<Self, String> {
        Ok(BollardEngine {
            docker: fn_docker::connect().await?,
        })
    }

    /// Networks and mounts of a container (the npm's own, found by its hostname).
    ///
    /// # Errors
    /// When the container cannot be inspected.
    pub async fn inspect_self(&self, container: &str) -> Result<SelfView, EngineError> {
        let inspected = self
            .docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
            .map_err(|e| classify(e, container))?;
        let service_id = inspected
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .and_then(|labels| labels.get(SWARM_SERVICE_ID_LABEL))
            .cloned();
        let networks = inspected
            .network_settings
            .and_then(|n| n.networks)
            .map(|n| n.into_keys().collect())
            .unwrap_or_default();
        let mounts = inspected
            .mounts
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                let destination = m.destination?;
                let source = match m.typ.as_deref() {
                    Some("volume") => CertsSource::Volume(m.name?),
                    Some("bind") => CertsSource::Bind(m.source?),
                    _ => return None,
                };
                Some((destination, source))
            })
            .collect();
        Ok(SelfView {
            networks,
            mounts,
            service_id,
        })
    }

    /// Whether an image is present on the engine.
    ///
    /// # Errors
    /// [`EngineError::NotFound`] when it is not; other failures as they come.
    pub async fn check_image(&self, image: &str) -> Result<(), EngineError> {
        self.docker
            .inspect_image(image)
            .await
            .map(drop)
            .map_err(|e| classify(e, image))
    }

    /// Whether a network exists.
    ///
    /// # Errors
    /// [`EngineError::NotFound`] when it does not; other failures as they come.
    pub async fn check_network(&self, network: &str) -> Result<(), EngineError> {
        self.docker
            .inspect_network(network, None::<InspectNetworkOptions>)
            .await
            .map(drop)
            .map_err(|e| classify(e, network))
    }

    /// Whether a volume exists.
    ///
    /// # Errors
    /// [`EngineError::NotFound`] when it does not; other failures as they come.
    pub async fn check_volume(&self, volume: &str) -> Result<(), EngineError> {
        self.docker
            .inspect_volume(volume)
            .await
            .map(drop)
            .map_err(|e| classify(e, volume))
    }
}

impl Engine for BollardEngine {
    fn list<'a>(
        &'a self,
        label_key: &'a str,
        label_value: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Container>, EngineError>> {
        Box::pin(async move {
            let filters = fn_docker::label_filter(label_key, label_value);
            let options = ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build();
            let summaries = self
                .docker
                .list_containers(Some(options))
                .await
                .map_err(|e| classify(e, "listing containers"))?;
            Ok(summaries
                .into_iter()
                .filter_map(|s| {
                    let name = s.names?.first()?.trim_start_matches('/').to_owned();
                    let state = match s.state {
                        Some(ContainerSummaryStateEnum::RUNNING) => ContainerState::Running,
                        Some(ContainerSummaryStateEnum::CREATED) => ContainerState::Created,
                        Some(
                            ContainerSummaryStateEnum::EXITED | ContainerSummaryStateEnum::DEAD,
                        ) => ContainerState::Stopped,
                        _ => ContainerState::Other,
                    };
                    Some(Container {
                        name,
                        state,
                        labels: s.labels.unwrap_or_default(),
                    })
                })
                .collect())
        })
    }

    fn run<'a>(&'a self, spec: &'a RunnerSpec) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let options = CreateContainerOptionsBuilder::default()
                .name(&spec.name)
                .build();
            // A 404 here is of the image, network or volume (the engine says which).
            self.docker
                .create_container(Some(options), create_body(spec))
                .await
                .map_err(|e| fn_docker::classify_action(e, &spec.name))?;
            self.docker
                .start_container(&spec.name, None)
                .await
                .map_err(|e| fn_docker::classify_action(e, &spec.name))
        })
    }

    fn is_running<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, EngineError>> {
        Box::pin(async move {
            let inspected = self
                .docker
                .inspect_container(name, None::<InspectContainerOptions>)
                .await
                .map_err(|e| classify(e, name))?;
            Ok(inspected.state.and_then(|s| s.running).unwrap_or(false))
        })
    }

    fn logs_tail<'a>(&'a self, name: &'a str, lines: usize) -> BoxFuture<'a, String> {
        Box::pin(async move {
            let logs = self.docker.logs(name, Some(tail_options(lines)));
            collect_logs(logs).await
        })
    }

    fn stop<'a>(
        &'a self,
        name: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
            let stop = StopContainerOptionsBuilder::default().t(seconds).build();
            match self.docker.stop_container(name, Some(stop)).await {
                // 304: already stopped.
                Ok(())
                | Err(BollardError::DockerResponseServerError {
                    status_code: 304, ..
                }) => Ok(()),
                Err(e) => Err(classify(e, name)),
            }
        })
    }

    fn remove<'a>(
        &'a self,
        name: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            match self.stop(name, grace).await {
                Ok(()) => {}
                Err(EngineError::NotFound(_)) => return Ok(()),
                Err(e) => {
                    tracing::warn!(container = name, error = %e, "stopping the container failed; removing it by force")
                }
            }
            let remove = RemoveContainerOptionsBuilder::default().force(true).build();
            match self.docker.remove_container(name, Some(remove)).await {
                Ok(()) => Ok(()),
                Err(e) => match classify(e, name) {
                    EngineError::NotFound(_) => Ok(()),
                    other => Err(other),
                },
            }
        })
    }
}

/// The last `lines` lines of both output streams.
pub(super) fn tail_options(lines: usize) -> bollard::query_parameters::LogsOptions {
    LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .tail(&lines.to_string())
        .build()
}

/// Longest wait for a container's or service's last output: an engine may hang on a logs
/// request (swarm's `service logs` is known to), and what asked must go on.
pub(super) const LOGS_BOUND: Duration = Duration::from_secs(5);

/// The text of a logs stream, trimmed; chunks that fail are left out. Bounded by
/// [`LOGS_BOUND`].
pub(super) async fn collect_logs(
    logs: impl futures::Stream<Item = Result<bollard::container::LogOutput, BollardError>>,
) -> String {
    let Ok(chunks) = tokio::time::timeout(LOGS_BOUND, logs.collect::<Vec<_>>()).await else {
        return format!("(no output within {LOGS_BOUND:?})");
    };
    let mut text = String::new();
    for chunk in chunks.into_iter().flatten() {
        text.push_str(&chunk.to_string());
    }
    text.trim().to_owned()
}

/// Capabilities a runner keeps: starting functions as another user (setuid/setgid), managing
/// their private directories (chown, dac_override, fowner) and killing them (kill).
pub const RUNNER_CAPABILITIES: &[&str] = &[
    "SETUID",
    "SETGID",
    "KILL",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
];

/// The read-only mount of the certificates (a volume or a host path), if the spec has one.
/// Secrets are not a mount: only swarm services have them.
pub fn certs_mount(spec: &RunnerSpec) -> Option<Mount> {
    let (source, target) = spec.certs.as_ref()?;
    let (typ, source) = match source {
        CertsSource::Volume(name) => (MountType::VOLUME, name.clone()),
        CertsSource::Bind(path) => (MountType::BIND, path.clone()),
        CertsSource::Secrets(_) => return None,
    };
    Some(Mount {
        target: Some(target.clone()),
        source: Some(source),
        typ: Some(typ),
        read_only: Some(true),
        ..Mount::default()
    })
}

/// The Engine API body for a runner container.
pub fn create_body(spec: &RunnerSpec) -> ContainerCreateBody {
    let mounts = certs_mount(spec).map(|m| vec![m]);
    // `Binds`, not bind mounts: the engine creates a missing host directory for a bind, and
    // the npm (in a container) cannot create host directories itself.
    let binds: Vec<String> = spec
        .binds
        .iter()
        .map(|(host, target)| format!("{host}:{target}"))
        .collect();
    let binds = (!binds.is_empty()).then_some(binds);
    let host_config = HostConfig {
        network_mode: Some(spec.network.clone()),
        mounts,
        binds,
        tmpfs: Some(HashMap::from([("/tmp".to_owned(), "mode=1777".to_owned())])),
        readonly_rootfs: Some(true),
        init: Some(true),
        cap_drop: Some(vec!["ALL".to_owned()]),
        cap_add: Some(
            RUNNER_CAPABILITIES
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
        ),
        security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
        memory: Some(spec.memory_limit_bytes),
        pids_limit: Some(super::RUNNER_PIDS_LIMIT),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        // Bounded: the runner's stderr is its functions' output too.
        log_config: Some(HostConfigLogConfig {
            typ: Some(super::RUNNER_LOG_DRIVER.to_owned()),
            config: Some(super::runner_log_options()),
        }),
        ..HostConfig::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        env: Some(spec.env.clone()),
        labels: Some(spec.labels.clone()),
        host_config: Some(host_config),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                spec.network.clone(),
                EndpointSettings::default(),
            )])),
        }),
        ..ContainerCreateBody::default()
    }
}
