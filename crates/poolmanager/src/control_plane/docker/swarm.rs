//! The [`Engine`] of `FN_CONTROL_PLANE=swarm`: each runner is a swarm **service** with one
//! replica, not a container, so that the npm decides which runner goes (a replica
//! scale-down lets Swarm pick the victim; removing one service does not).
//!
//! The control plane above is the docker one: the same names, labels (on the service), list,
//! readiness and drain. What differs is here:
//! - a service restarts its task on failure (`on-failure`), so a runner that crashes, or whose
//!   node is lost, comes back under the same service, name and place in the LB lists;
//! - the runner is reached at `<service>:9190` on the overlay network, a name that resolves
//!   to its task (`dnsrr`: no virtual IP, so no IPVS needed in the nodes' kernels);
//! - the certificates are swarm secrets when the npm's own are (see [`CertsSource::Secrets`]),
//!   mounted at the same paths and readable by the runner (root in its container) only: the
//!   secrets the npm's own service mounts there, which a rotation changes while the paths
//!   stay;
//! - runner services are placed by `FN_SWARM_CONSTRAINTS`.
//!
//! `sightings` is the npm's own clock for how long a task has waited for a node.

mod sightings;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bollard::Docker;
use bollard::models::{
    EndpointSpec, EndpointSpecModeEnum, HealthConfig, Mount, MountType, NetworkAttachmentConfig,
    ResourceObject, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, TaskSpec,
    TaskSpecContainerSpec, TaskSpecContainerSpecFile, TaskSpecContainerSpecSecrets,
    TaskSpecLogDriver, TaskSpecPlacement, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{
    ListSecretsOptionsBuilder, ListServicesOptionsBuilder, ListTasksOptionsBuilder,
};
use fn_docker::{EngineError, classify};
use futures::future::BoxFuture;
use tokio::time::Instant;

use super::engine::{BollardEngine, RUNNER_CAPABILITIES, certs_mount, collect_logs, tail_options};
use super::tracking::lock;
use super::{CertsSource, Container, ContainerState, Engine, RunnerSpec, SECRETS_DIR};
use sightings::{Sightings, Waits};

/// Failed tasks in a row, none of which ran (see [`RAN_FOR`]), after which a runner service
/// counts as not coming up: Swarm would restart its task for ever (the restart policy sets no
/// attempts limit), and a runner in a crash loop would keep its place in the LBs' lists.
const FAILED_TASKS_GIVE_UP: usize = 3;

/// How long a task that ended must have lasted, from its creation to its last update, to be
/// taken for one that ran (started and served) rather than one of a crash loop. A task does
/// not record whether it reached `running`: one that failed while starting and one that
/// crashed after hours both end `failed`, and a crash loop's tasks do reach `running` for a
/// moment. A loop's task lasts the restart delay (1 s), scheduling, attaching the overlay
/// network, starting and crashing: the test swarm took 11 s from asking for a service to
/// its runner answering health (10 s of it waiting for the image's first health check,
/// before [`HEALTH_INTERVAL`]), and a runner that serves answered within the control plane's
/// start timeout (30 s by default). Both times are the manager's (a task's status timestamp
/// is its node's clock).
const RAN_FOR: Duration = Duration::from_secs(60);

/// How often Swarm runs the runner image's health check (`fn-probe`, an exec in the runner's
/// container) on each runner task. Swarm adds a task to the overlay's DNS only once its
/// container's health check first passes (moby's swarm executor, `controller.Start`), so
/// the npm's own probe of `<service>:9190`, and every LB, cannot reach a new runner before
/// that: with the image's 10 s, a scale from zero waited ~10 s for it after the runner was
/// ready, and so does every restart after a crash and every move to another node. API 1.41
/// has no start interval (a faster cadence while starting only). At 2 s that wait is 2 s at
/// most, for an exec every 2 s per runner, for the runner's whole life: the probe is small,
/// but each exec costs the node's engine, containerd and runc a process set up in the
/// container's namespaces. 1 s would take a second more off each start for twice the
/// execs on every runner of every node. The check is kept rather than turned off: it is
/// what makes Swarm restart a runner that hangs (it stops answering health; the npm's probe
/// only keeps it from a list).
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// How long one health check may take: a loaded runner answers slowly (the image's 5 s).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Failed health checks in a row after which Swarm takes the runner for hung and restarts
/// it. The engine runs its checks one after another, each [`HEALTH_INTERVAL`] after the
/// last one ended, and a check of a hung runner ends at the probe's own bound (`fn-probe`'s
/// 3 s): 6 take about 6 × (2 + 3) = 30 s, about the image's 3 × (10 + 3) s, so that a
/// runner busy for a moment is not restarted sooner than before (15 took some 75 s).
const HEALTH_RETRIES: i64 = 6;

/// After the container starts, how long failed health checks do not count (the image's).
const HEALTH_START_PERIOD: Duration = Duration::from_secs(5);

/// Runner services through a swarm manager's Engine API.
#[derive(Debug, Clone)]
pub struct SwarmEngine {
    engine: BollardEngine,
    /// How long a task may wait for a node that can take it (see [`unplaced`]).
    place_within: Duration,
    /// The npm's own service, when the npm is a task of one: the certificate secrets it
    /// mounts are what runners get (see [`SwarmEngine::secrets`]).
    own_service: Option<String>,
    /// When this npm first saw each task waiting for a node: how long one has waited is
    /// timed on the npm's clock, not from its creation on the manager's. A std mutex,
    /// never held across an await: a few map operations per listing.
    sightings: Arc<Mutex<Sightings>>,
}

impl SwarmEngine {
    /// Runner services through `engine`; a service whose task no node has taken within
    /// `place_within` (the plane's start timeout) counts as not coming up. Runners get the
    /// certificate secrets `own_service` (the npm's service) mounts, when it is given.
    pub fn new(engine: BollardEngine, place_within: Duration, own_service: Option<String>) -> Self {
        SwarmEngine {
            engine,
            place_within,
            own_service,
            sightings: Arc::default(),
        }
    }

    fn docker(&self) -> &Docker {
        self.engine.docker()
    }

    /// The tasks of `service` (an id or a name) that Swarm has not yet forgotten.
    async fn tasks(&self, service: &str) -> Result<Vec<bollard::models::Task>, EngineError> {
        let filters = HashMap::from([("service", vec![service.to_owned()])]);
        let options = ListTasksOptionsBuilder::default().filters(&filters).build();
        self.docker()
            .list_tasks(Some(options))
            .await
            .map_err(|e| classify(e, service))
    }

    /// The secrets runners mount at `targets` (file names in [`SECRETS_DIR`]), in that
    /// order: those the npm's own service mounts there, else (the npm is not a service, or
    /// its spec has no secret there) the secrets named as the files. The file name says
    /// nothing of the secret behind it once it is rotated (a new secret, mounted at the same
    /// target): by name, runners got the old secret, and none once it was deleted.
    async fn secrets(&self, targets: &[String]) -> Result<Vec<SecretRef>, EngineError> {
        let own = match &self.own_service {
            Some(service) => match self
                .docker()
                .inspect_service(
                    service,
                    None::<bollard::query_parameters::InspectServiceOptions>,
                )
                .await
            {
                Ok(own) => own
                    .spec
                    .and_then(|s| s.task_template)
                    .and_then(|t| t.container_spec)
                    .and_then(|c| c.secrets)
                    .unwrap_or_default(),
                // The npm's service is going (`docker stack rm`): the files' names.
                Err(e) => match classify(e, service) {
                    EngineError::NotFound(_) => Vec::new(),
                    other => return Err(other),
                },
            },
            None => Vec::new(),
        };
        let found = own_secrets(targets, &own);
        let by_name: Vec<String> = targets
            .iter()
            .zip(&found)
            .filter(|(_, found)| found.is_none())
            .map(|(target, _)| target.clone())
            .collect();
        let mut named = if by_name.is_empty() {
            Vec::new()
        } else {
            self.secret_ids(&by_name).await?
        }
        .into_iter();
        targets
            .iter()
            .zip(found)
            .map(|(target, found)| match found {
                Some(found) => Ok(found),
                None => named
                    .next()
                    .map(|id| SecretRef {
                        target: target.clone(),
                        id,
                        name: target.clone(),
                    })
                    .ok_or_else(|| EngineError::NotFound(format!("secret {target}"))),
            })
            .collect()
    }

    /// Ids of the secrets named in `names`, in that order.
    async fn secret_ids(&self, names: &[String]) -> Result<Vec<String>, EngineError> {
        let filters = HashMap::from([("name", names.to_vec())]);
        let options = ListSecretsOptionsBuilder::default()
            .filters(&filters)
            .build();
        let secrets = self
            .docker()
            .list_secrets(Some(options))
            .await
            .map_err(|e| classify(e, "listing secrets"))?;
        names
            .iter()
            .map(|name| {
                secrets
                    .iter()
                    .find(|s| s.spec.as_ref().and_then(|spec| spec.name.as_ref()) == Some(name))
                    .and_then(|s| s.id.clone())
                    .ok_or_else(|| EngineError::NotFound(format!("secret {name}")))
            })
            .collect()
    }
}

/// A swarm secret a runner service mounts: which one (its id and name), at which file name
/// in [`SECRETS_DIR`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub target: String,
    pub id: String,
    pub name: String,
}

/// For each of `targets`, the secret the npm's own service mounts there (`own`, its spec's
/// secret references), if any. A reference's target is a file name in [`SECRETS_DIR`] or
/// an absolute path.
pub fn own_secrets(
    targets: &[String],
    own: &[TaskSpecContainerSpecSecrets],
) -> Vec<Option<SecretRef>> {
    let at = |name: &str| Path::new(SECRETS_DIR).join(name);
    targets
        .iter()
        .map(|target| {
            own.iter().find_map(|secret| {
                let mounted = secret.file.as_ref()?.name.as_deref()?;
                if at(mounted) != at(target) {
                    return None;
                }
                Some(SecretRef {
                    target: target.clone(),
                    id: secret.secret_id.clone()?,
                    name: secret.secret_name.clone().unwrap_or_default(),
                })
            })
        })
        .collect()
}

/// A service's state as the control plane sees it, its tasks waiting for a node having
/// waited `waits`. The service *is* the runner: it stays `Running` (listed, in the LBs'
/// lists) while Swarm starts or restarts its task, after a crash or a node loss, so that it
/// keeps its place; only a service whose task cannot come up is `Stopped` (the control plane
/// removes it). A task is "starting" until its health check first passes (at most
/// [`HEALTH_INTERVAL`] after the runner is ready), and the npm's own probe cannot reach it
/// before: Swarm gives it a DNS name only then.
fn service_state(
    tasks: &[bollard::models::Task],
    waits: &Waits,
    place_within: Duration,
) -> ContainerState {
    if may_come_up(tasks, waits, place_within) {
        ContainerState::Running
    } else {
        ContainerState::Stopped
    }
}

/// Whether a service's runner is up or may still come up, from the tasks Swarm keeps of it
/// (five by default, in no useful order):
/// - a task Swarm means to run (desired state `ready` or `running`) that runs: up. A task
///   still reported `running` but meant to shut down never counts: when its node is lost
///   Swarm replaces it and keeps reporting it `running` until the node returns, or for 24 h;
/// - no task Swarm means to run: down (it restarts none after a clean exit, `on-failure`);
/// - a task Swarm means to run that no node has taken for `place_within` (see [`unplaced`]):
///   down, even while the task it replaces is still reported `running` on a lost node.
///   Swarm never gives up on such a task: it stays `pending` for ever, and the runner would
///   stay in the LBs' lists with it;
/// - otherwise, newest first, the tasks that ended since the newest that ran (one reported
///   `running`, or one that ended after [`RAN_FOR`]) decide: a rejected one (no image on
///   the node, a missing secret; Swarm rejects what fails before the container starts), or
///   [`FAILED_TASKS_GIVE_UP`] failed ones, mean down. A rejection or crashes before a task
///   that ran are past: the runner served since, and Swarm restarts it under the same
///   service.
///
/// A task that ended within [`RAN_FOR`] of its creation is taken for one that never served:
/// its failure counts, and one that was shut down or completed that fast is passed over, so
/// that a crash loop is told even if something stopped one of its tasks. A task whose times
/// are missing or unreadable counts the same way, and one without a readable creation time
/// sorts as the oldest.
fn may_come_up(tasks: &[bollard::models::Task], waits: &Waits, place_within: Duration) -> bool {
    use TaskState::{FAILED, REJECTED, RUNNING};
    if tasks
        .iter()
        .any(|t| meant_to_run(t) && task_state(t) == Some(RUNNING))
    {
        return true;
    }
    if !tasks.is_empty() && !tasks.iter().any(meant_to_run) {
        return false;
    }
    if unplaced(tasks, waits, place_within).is_some() {
        return false;
    }
    // Newest first. The times are RFC 3339 with as many fraction digits as needed (Go drops
    // trailing zeros), so they are parsed rather than compared as text.
    let mut newest_first: Vec<_> = tasks.iter().collect();
    newest_first.sort_by_key(|t| std::cmp::Reverse(task_time(t.created_at.as_ref())));
    let mut failed = 0;
    for task in newest_first {
        match task_state(task) {
            // Ran, and is not meant to run any more (its node was lost, or Swarm is stopping
            // it): what failed before it is past.
            Some(RUNNING) => return true,
            Some(REJECTED) => return false,
            Some(s) if s > RUNNING && ran(task) => return true,
            Some(FAILED) => {
                failed += 1;
                if failed >= FAILED_TASKS_GIVE_UP {
                    return false;
                }
            }
            // Not started yet, or stopped by Swarm before it served.
            _ => {}
        }
    }
    true
}

/// A task's state, when the Engine API gave one.
fn task_state(task: &bollard::models::Task) -> Option<TaskState> {
    task.status.as_ref().and_then(|s| s.state)
}

/// Whether Swarm means to run `task` (desired state `ready` or `running`).
fn meant_to_run(task: &bollard::models::Task) -> bool {
    task.desired_state.is_some_and(|d| d <= TaskState::RUNNING)
}

/// Whether `task` is one Swarm means to run and has given to no node yet (`new`,
/// `allocated` or `pending`).
fn waiting_for_node(task: &bollard::models::Task) -> bool {
    meant_to_run(task) && task_state(task).is_some_and(|s| s <= TaskState::PENDING)
}

/// A task waiting for a node (see [`waiting_for_node`]) that has waited more than
/// `place_within` by `waits`, and says why (`no suitable node (...)`: no node meets the
/// constraints or has the memory; Swarm writes it after a scheduling pass that found
/// none): with its reason and how long it has waited.
///
/// Swarm never rejects such a task; it waits for a node for ever. How long it has waited is
/// the npm's own measure, from its first sight of the task (see [`sightings`]), never its
/// creation time: that is the manager's clock, and against the npm's a skewed clock made a
/// new task look a year old, or never old. The reason keeps a task Swarm has not yet tried
/// to place from counting.
fn unplaced<'t>(
    tasks: &'t [bollard::models::Task],
    waits: &Waits,
    place_within: Duration,
) -> Option<(&'t str, Duration)> {
    tasks.iter().find_map(|task| {
        if !waiting_for_node(task) {
            return None;
        }
        let reason = task
            .status
            .as_ref()
            .and_then(|s| s.err.as_deref())
            .filter(|err| !err.trim().is_empty())?;
        let waited = waits.of(task)?;
        (waited > place_within).then_some((reason, waited))
    })
}

/// The runner of a service removed, from the tasks Swarm still keeps of it, when one of them
/// is on a node and has not ended (`assigned` to `running`): Swarm deletes a service at
/// once, and stops its task afterwards (SIGTERM, then SIGKILL after the service's stop
/// grace). Named as the service was (its `FN_RUNNER_ID`), with its labels.
fn leaving(tasks: &[bollard::models::Task]) -> Option<Container> {
    use TaskState::{ASSIGNED, RUNNING};
    let task = tasks
        .iter()
        .find(|t| task_state(t).is_some_and(|s| (ASSIGNED..=RUNNING).contains(&s)))?;
    let container = task.spec.as_ref()?.container_spec.as_ref()?;
    let name = container
        .env
        .as_ref()?
        .iter()
        .find_map(|pair| pair.strip_prefix("FN_RUNNER_ID="))?;
    Some(Container {
        name: name.to_owned(),
        state: ContainerState::Leaving,
        labels: container.labels.clone().unwrap_or_default(),
    })
}

/// Whether a task that ended lasted [`RAN_FOR`] from its creation to its last update.
fn ran(task: &bollard::models::Task) -> bool {
    match (
        task_time(task.created_at.as_ref()),
        task_time(task.updated_at.as_ref()),
    ) {
        (Some(created), Some(updated)) => updated
            .duration_since(created)
            .is_ok_and(|lasted| lasted >= RAN_FOR),
        _ => false,
    }
}

/// A task's time as the Engine API gives it (RFC 3339 in UTC).
fn task_time(date: Option<&String>) -> Option<SystemTime> {
    humantime::parse_rfc3339(date?).ok()
}

/// The service spec of a runner. `secrets` are the certificate secrets (see
/// [`CertsSource::Secrets`]).
pub fn service_spec(spec: &RunnerSpec, secrets: &[SecretRef]) -> ServiceSpec {
    let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    let mut mounts: Vec<Mount> = certs_mount(spec).into_iter().collect();
    mounts.push(Mount {
        target: Some("/tmp".to_owned()),
        typ: Some(MountType::TMPFS),
        ..Mount::default()
    });
    mounts.extend(spec.binds.iter().map(|(host, target)| Mount {
        target: Some(target.clone()),
        source: Some(host.clone()),
        typ: Some(MountType::BIND),
        read_only: Some(false),
        ..Mount::default()
    }));
    let secrets = match &spec.certs {
        Some((CertsSource::Secrets(_), _)) => Some(
            secrets
                .iter()
                .map(|secret| TaskSpecContainerSpecSecrets {
                    file: Some(TaskSpecContainerSpecFile {
                        name: Some(secret.target.clone()),
                        uid: Some("0".to_owned()),
                        gid: Some("0".to_owned()),
                        // The runner is root in its container; its functions are not.
                        mode: Some(0o400),
                    }),
                    secret_id: Some(secret.id.clone()),
                    secret_name: Some(secret.name.clone()),
                })
                .collect(),
        ),
        _ => None,
    };
    let container = TaskSpecContainerSpec {
        image: Some(spec.image.clone()),
        env: Some(spec.env.clone()),
        labels: Some(spec.labels.clone()),
        mounts: Some(mounts),
        secrets,
        read_only: Some(true),
        init: Some(true),
        capability_drop: Some(vec!["ALL".to_owned()]),
        capability_add: Some(
            RUNNER_CAPABILITIES
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
        ),
        stop_grace_period: Some(nanos(spec.stop_grace)),
        // The image's check (its `test`, left empty, is inherited), at this plane's pace.
        health_check: Some(HealthConfig {
            test: None,
            interval: Some(nanos(HEALTH_INTERVAL)),
            timeout: Some(nanos(HEALTH_TIMEOUT)),
            retries: Some(HEALTH_RETRIES),
            start_period: Some(nanos(HEALTH_START_PERIOD)),
            ..HealthConfig::default()
        }),
        ..TaskSpecContainerSpec::default()
    };
    let task = TaskSpec {
        container_spec: Some(container),
        resources: Some(TaskSpecResources {
            limits: Some(bollard::models::Limit {
                memory_bytes: Some(spec.memory_limit_bytes),
                pids: Some(super::RUNNER_PIDS_LIMIT),
                ..bollard::models::Limit::default()
            }),
            // Swarm's scheduler places a task by its reservations alone, never by its limits:
            // without this, every runner fits every node, a node (a manager too) takes more
            // runners than its memory holds, and a task never waits for a node with the
            // memory free. Reserved as much as it may use: the runner fills its capacity.
            reservations: Some(ResourceObject {
                memory_bytes: Some(spec.memory_limit_bytes),
                ..ResourceObject::default()
            }),
            ..TaskSpecResources::default()
        }),
        restart_policy: Some(TaskSpecRestartPolicy {
            condition: Some(TaskSpecRestartPolicyConditionEnum::ON_FAILURE),
            delay: Some(nanos(Duration::from_secs(1))),
            ..TaskSpecRestartPolicy::default()
        }),
        placement: (!spec.constraints.is_empty()).then(|| TaskSpecPlacement {
            constraints: Some(spec.constraints.clone()),
            ..TaskSpecPlacement::default()
        }),
        networks: Some(vec![NetworkAttachmentConfig {
            target: Some(spec.network.clone()),
            ..NetworkAttachmentConfig::default()
        }]),
        // Bounded on whichever node runs the task: the runner's stderr is its functions'
        // output too.
        log_driver: Some(TaskSpecLogDriver {
            name: Some(super::RUNNER_LOG_DRIVER.to_owned()),
            options: Some(super::runner_log_options()),
        }),
        ..TaskSpec::default()
    };
    ServiceSpec {
        name: Some(spec.name.clone()),
        labels: Some(spec.labels.clone()),
        task_template: Some(task),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..ServiceSpecMode::default()
        }),
        // The name resolves to the task itself: a virtual IP would need IPVS in every
        // node's kernel, and one task per service has nothing to balance.
        endpoint_spec: Some(EndpointSpec {
            mode: Some(EndpointSpecModeEnum::DNSRR),
            ..EndpointSpec::default()
        }),
        ..ServiceSpec::default()
    }
}

impl Engine for SwarmEngine {
    fn service_exists<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<bool>> {
        Box::pin(async move {
            match self
                .docker()
                .inspect_service(id, None::<bollard::query_parameters::InspectServiceOptions>)
                .await
                .map_err(|e| classify(e, id))
            {
                Ok(_) => Some(true),
                Err(EngineError::NotFound(_)) => Some(false),
                Err(e) => {
                    tracing::warn!(service = id, error = %e, "cannot tell whether the npm's own service is still there");
                    None
                }
            }
        })
    }

    /// The runner services carrying the label, each in the state its tasks say (see
    /// [`service_state`]), in two requests whatever their number: the tasks of all of them
    /// (a task carries its service's labels as they were when Swarm made it, which a
    /// runner service's never change, and the Engine API filters tasks by them), then
    /// the services. One request per service's tasks, a few at a time, shared the control
    /// loop's bound on a list (10 s, probes and removals included) with a hundred requests
    /// or more on a swarm of a hundred runners, and one service whose tasks could not be
    /// listed failed the whole list.
    ///
    /// The tasks first: a service removed between the two requests is not listed (its tasks,
    /// shutting down, would have made it a runner that exited), and one created between them
    /// is taken as a new service whose first task Swarm has not made yet: it may come up.
    /// Each service's tasks come from the one snapshot, so a task Swarm replaces is never
    /// seen without its replacement.
    fn list<'a>(
        &'a self,
        label_key: &'a str,
        label_value: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Container>, EngineError>> {
        Box::pin(async move {
            let filters = fn_docker::label_filter(label_key, label_value);
            let options = ListTasksOptionsBuilder::default().filters(&filters).build();
            let began = Instant::now();
            let tasks = self
                .docker()
                .list_tasks(Some(options))
                .await
                .map_err(|e| classify(e, "listing the runner services' tasks"))?;
            let mut tasks_of: HashMap<String, Vec<bollard::models::Task>> = HashMap::new();
            for task in tasks {
                if let Some(service) = task.service_id.clone() {
                    tasks_of.entry(service).or_default().push(task);
                }
            }
            let options = ListServicesOptionsBuilder::default()
                .filters(&filters)
                .build();
            let services = self
                .docker()
                .list_services(Some(options))
                .await
                .map_err(|e| classify(e, "listing services"))?;
            let now = Instant::now();
            let mut sightings = lock(&self.sightings);
            {
                let listed: HashSet<&str> = tasks_of
                    .values()
                    .flatten()
                    .filter_map(|t| t.id.as_deref())
                    .collect();
                let names: HashSet<&str> = services
                    .iter()
                    .filter_map(|s| s.spec.as_ref()?.name.as_deref())
                    .collect();
                sightings.forget_gone(&listed, &names, began, self.place_within);
            }
            let mut found = Vec::new();
            for service in services {
                let (Some(id), Some(spec)) = (service.id, service.spec) else {
                    continue;
                };
                let Some(name) = spec.name else {
                    continue;
                };
                let tasks = tasks_of.remove(&id).unwrap_or_default();
                let waits = sightings.waits(&name, &tasks, now);
                let state = service_state(&tasks, &waits, self.place_within);
                if state == ContainerState::Stopped
                    && let Some((reason, waited)) = unplaced(&tasks, &waits, self.place_within)
                {
                    tracing::warn!(
                        service = %name,
                        task_error = reason,
                        waited = ?Duration::from_secs(waited.as_secs()),
                        bound = ?self.place_within,
                        "no node takes the runner service's task (check FN_SWARM_CONSTRAINTS, \
                         the nodes' free memory and their availability); it is not coming up, \
                         and the service goes"
                    );
                }
                found.push(Container {
                    name,
                    state,
                    labels: spec.labels.unwrap_or_default(),
                });
            }
            drop(sightings);
            // What is left are the tasks of services removed: one still on its node drains
            // there until Swarm has stopped it.
            found.extend(tasks_of.values().filter_map(|tasks| leaving(tasks)));
            Ok(found)
        })
    }

    fn run<'a>(&'a self, spec: &'a RunnerSpec) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let secrets = match &spec.certs {
                Some((CertsSource::Secrets(targets), _)) => self.secrets(targets).await?,
                _ => Vec::new(),
            };
            lock(&self.sightings).asking(&spec.name, Instant::now());
            self.docker()
                .create_service(service_spec(spec, &secrets), None)
                .await
                .map(drop)
                .map_err(|e| fn_docker::classify_action(e, &spec.name))
        })
    }

    fn is_running<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, EngineError>> {
        Box::pin(async move {
            let tasks = self.tasks(name).await?;
            let waits = lock(&self.sightings).waits(name, &tasks, Instant::now());
            Ok(may_come_up(&tasks, &waits, self.place_within))
        })
    }

    fn logs_tail<'a>(&'a self, name: &'a str, lines: usize) -> BoxFuture<'a, String> {
        Box::pin(async move {
            let logs = self.docker().service_logs(name, Some(tail_options(lines)));
            let mut text = collect_logs(logs).await;
            // Why tasks were rejected or failed, which the logs do not say.
            if let Ok(tasks) = self.tasks(name).await {
                for task in tasks {
                    if let Some(err) = task.status.and_then(|s| s.err) {
                        text.push_str(&format!("\ntask: {err}"));
                    }
                }
            }
            text.trim().to_owned()
        })
    }

    /// Refused: a service has no stopped state to be left in (its task is stopped by
    /// deleting it). The plane stops a runner apart from its removal only to sweep the
    /// function containers it left, which it never does on swarm.
    fn stop<'a>(
        &'a self,
        name: &'a str,
        _grace: Duration,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            Err(EngineError::Failed(format!(
                "runner service {name}: a service is not stopped apart from its removal"
            )))
        })
    }

    fn remove<'a>(
        &'a self,
        name: &'a str,
        _grace: Duration,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        // The grace is the service's own (`stop_grace_period`, set at creation): Swarm stops
        // the task with SIGTERM and kills it after that.
        Box::pin(async move {
            lock(&self.sightings).forget_service(name);
            match self.docker().delete_service(name).await {
                Ok(()) => Ok(()),
                Err(e) => match classify(e, name) {
                    EngineError::NotFound(_) => Ok(()),
                    other => Err(other),
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskState::{
        COMPLETE, FAILED, PENDING, PREPARING, READY, REJECTED, RUNNING, SHUTDOWN, STARTING,
    };
    use bollard::models::{Task, TaskStatus};
    use std::time::UNIX_EPOCH;

    /// The bound tasks are placed within (the plane's default start timeout).
    const PLACE_WITHIN: Duration = Duration::from_secs(30);

    /// `secs` seconds into the test.
    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    /// Each of `tasks` timed as having waited `secs` seconds for a node (whether it waits
    /// for one or not: [`unplaced`] tells).
    fn waited(tasks: &[Task], secs: u64) -> Waits {
        tasks
            .iter()
            .filter_map(|t| Some((t.id.clone()?, Duration::from_secs(secs))))
            .collect()
    }

    /// The state of a service with `tasks` long after the npm first saw them: only a task
    /// that says why no node took it counts as waiting too long.
    fn state(tasks: &[Task]) -> ContainerState {
        service_state(tasks, &waited(tasks, 10_000_000), PLACE_WITHIN)
    }

    /// [`may_come_up`], as [`state`] asks it.
    fn comes_up(tasks: &[Task]) -> bool {
        may_come_up(tasks, &waited(tasks, 10_000_000), PLACE_WITHIN)
    }

    /// A task created `created` seconds into the test and last updated `lasted` seconds
    /// after that, the times written as the Engine API writes them.
    fn task(created: u64, lasted: u64, state: TaskState, desired: TaskState) -> Task {
        let stamp = |secs: u64| humantime::format_rfc3339_nanos(at(secs)).to_string();
        Task {
            id: Some(format!("t{created}-{state}")),
            created_at: Some(stamp(created)),
            updated_at: Some(stamp(created + lasted)),
            status: Some(TaskStatus {
                state: Some(state),
                ..TaskStatus::default()
            }),
            desired_state: Some(desired),
            ..Task::default()
        }
    }

    #[test]
    fn a_service_is_its_runner_until_its_task_is_rejected_or_fails_repeatedly() {
        assert_eq!(
            state(&[task(0, 0, RUNNING, RUNNING)]),
            ContainerState::Running
        );
        assert_eq!(
            state(&[task(0, 0, STARTING, RUNNING)]),
            ContainerState::Running,
            "starting until its first health check passes"
        );
        assert_eq!(
            state(&[task(0, 5, FAILED, SHUTDOWN), task(5, 0, PENDING, RUNNING)]),
            ContainerState::Running,
            "a runner Swarm restarts keeps its place"
        );
        assert_eq!(
            state(&[task(0, 5, REJECTED, SHUTDOWN), task(5, 0, PENDING, READY)]),
            ContainerState::Stopped,
            "a fresh rejection"
        );
        assert!(comes_up(&[]), "Swarm has not made the first task yet");
        assert!(comes_up(&[task(0, 0, PENDING, RUNNING)]));
        assert!(!comes_up(&[
            task(0, 5, FAILED, SHUTDOWN),
            task(5, 5, FAILED, SHUTDOWN),
            task(10, 5, FAILED, SHUTDOWN),
            task(15, 0, PENDING, READY)
        ]));
        // Old failures, a task serving now: the runner is up.
        assert_eq!(
            state(&[
                task(0, 5, FAILED, SHUTDOWN),
                task(5, 5, REJECTED, SHUTDOWN),
                task(10, 5, FAILED, SHUTDOWN),
                task(15, 5, FAILED, SHUTDOWN),
                task(20, 0, RUNNING, RUNNING)
            ]),
            ContainerState::Running
        );
    }

    #[test]
    fn a_task_left_running_on_a_lost_node_does_not_keep_a_rejected_service_up() {
        // The node went down an hour in; Swarm still reports its task running, and every
        // node left rejects the replacement (no image there).
        let lost = task(0, 3_600, RUNNING, SHUTDOWN);
        assert_eq!(
            state(&[
                task(3_602, 1, REJECTED, SHUTDOWN),
                lost.clone(),
                task(3_603, 0, PENDING, READY),
                task(3_600, 2, REJECTED, SHUTDOWN),
            ]),
            ContainerState::Stopped
        );
        assert!(
            comes_up(&[lost, task(3_600, 0, PENDING, RUNNING)]),
            "until the replacement is rejected, it may come up"
        );
    }

    #[test]
    fn crashes_before_a_task_that_ran_are_past() {
        // Three crashes over the runner's life, each after hours of serving; the fourth
        // task served for a day, then crashed; Swarm is restarting it.
        let life = [
            task(0, 7_200, FAILED, SHUTDOWN),
            task(7_201, 20_000, FAILED, SHUTDOWN),
            task(27_202, 9_000, FAILED, SHUTDOWN),
            task(36_203, 86_400, FAILED, SHUTDOWN),
        ];
        let mut tasks = vec![task(122_604, 0, PENDING, RUNNING)];
        tasks.extend(life.iter().cloned());
        assert_eq!(state(&tasks), ContainerState::Running);

        // A crash loop in its first minutes: three short-lived failures in a row.
        let looping = [
            task(0, 8, FAILED, SHUTDOWN),
            task(8, 9, FAILED, SHUTDOWN),
            task(17, 8, FAILED, SHUTDOWN),
            task(25, 0, PENDING, READY),
        ];
        assert_eq!(state(&looping), ContainerState::Stopped);

        // The same crashes before a task that served for a day, and one since: up, until
        // the crashes since make a loop of their own.
        let served = task(100_000, 86_400, FAILED, SHUTDOWN);
        let mut tasks = looping[..3].to_vec();
        tasks.extend([
            served.clone(),
            task(186_401, 8, FAILED, SHUTDOWN),
            task(186_409, 0, PENDING, READY),
        ]);
        assert_eq!(state(&tasks), ContainerState::Running);
        let tasks = [
            served,
            task(186_401, 8, FAILED, SHUTDOWN),
            task(186_409, 8, FAILED, SHUTDOWN),
            task(186_417, 9, FAILED, SHUTDOWN),
            task(186_426, 0, PENDING, READY),
        ];
        assert_eq!(
            state(&tasks),
            ContainerState::Stopped,
            "three short-lived failures since the task that ran"
        );
    }

    #[test]
    fn a_rejection_long_past_does_not_count() {
        // Rejected on a node without the image, then served for two hours on another; the
        // creation times are a second apart less half a second, which the text alone
        // would order the wrong way (Go writes no trailing zeros: `01Z` after `01.5Z`).
        let at = |time: &str| Some(time.to_owned());
        let rejected = Task {
            created_at: at("2024-05-01T10:00:01Z"),
            updated_at: at("2024-05-01T10:00:01.4Z"),
            ..task(0, 0, REJECTED, SHUTDOWN)
        };
        let served = Task {
            created_at: at("2024-05-01T10:00:01.5Z"),
            updated_at: at("2024-05-01T12:00:01.5Z"),
            ..task(0, 0, FAILED, SHUTDOWN)
        };
        let restarting = Task {
            created_at: at("2024-05-01T12:00:01.6Z"),
            updated_at: at("2024-05-01T12:00:01.6Z"),
            ..task(0, 0, PENDING, READY)
        };
        assert_eq!(
            state(&[restarting, rejected, served]),
            ContainerState::Running
        );
    }

    /// A task made `created` seconds into the test that no node can take: Swarm keeps it
    /// `pending`, meant to run, and says why.
    fn unplaceable(created: u64) -> Task {
        let mut task = task(created, 0, PENDING, RUNNING);
        if let Some(status) = task.status.as_mut() {
            status.err = Some(
                "no suitable node (scheduling constraints not satisfied on 2 nodes; \
                 insufficient resources on 1 node)"
                    .to_owned(),
            );
        }
        task
    }

    #[test]
    fn a_task_no_node_takes_within_the_bound_is_not_coming_up() {
        // The runner's node was lost an hour in; Swarm still reports its task running, and
        // no node left can take the replacement.
        let lost = task(0, 3_600, RUNNING, SHUTDOWN);
        let tasks = [lost.clone(), unplaceable(3_605)];
        let verdict = |secs| service_state(&tasks, &waited(&tasks, secs), PLACE_WITHIN);
        assert_eq!(
            verdict(15),
            ContainerState::Running,
            "a node may free up within the bound"
        );
        assert_eq!(verdict(31), ContainerState::Stopped, "waited 31 s");
        let (reason, waits) =
            unplaced(&tasks, &waited(&tasks, 31), PLACE_WITHIN).expect("unplaced");
        assert!(reason.starts_with("no suitable node ("), "{reason}");
        assert_eq!(waits, Duration::from_secs(31));

        // A new runner whose first task no node takes: the same.
        let first = [unplaceable(0)];
        assert_eq!(
            service_state(&first, &waited(&first, 31), PLACE_WITHIN),
            ContainerState::Stopped
        );
        // Untimed (the npm has not seen it waiting): not counted, however old it is.
        assert_eq!(
            service_state(&first, &Waits::default(), PLACE_WITHIN),
            ContainerState::Running
        );

        // Not counted: a task Swarm has not tried to place yet (no reason), one a node took
        // (it may pull its image for minutes), one Swarm no longer means to run, and a
        // replacement while another task meant to run runs.
        let fresh = [lost.clone(), task(3_605, 0, PENDING, RUNNING)];
        assert_eq!(
            service_state(&fresh, &waited(&fresh, 9_999), PLACE_WITHIN),
            ContainerState::Running
        );
        let mut preparing = unplaceable(3_605);
        preparing.status.as_mut().expect("status").state = Some(PREPARING);
        let taken = [lost.clone(), preparing];
        assert_eq!(
            service_state(&taken, &waited(&taken, 9_999), PLACE_WITHIN),
            ContainerState::Running
        );
        let mut dropped = unplaceable(0);
        dropped.desired_state = Some(SHUTDOWN);
        let dropped = [dropped];
        assert!(unplaced(&dropped, &waited(&dropped, 9_999), PLACE_WITHIN).is_none());
        let replacing = [unplaceable(0), task(5, 0, RUNNING, RUNNING)];
        assert_eq!(
            service_state(&replacing, &waited(&replacing, 9_999), PLACE_WITHIN),
            ContainerState::Running
        );
    }

    #[test]
    fn a_service_swarm_restarts_nothing_of_is_stopped() {
        // The runner exited cleanly (stopped by hand on its node): `on-failure` does not
        // restart it.
        assert_eq!(
            state(&[task(0, 600, COMPLETE, SHUTDOWN)]),
            ContainerState::Stopped
        );
        assert_eq!(
            state(&[
                task(0, 600, COMPLETE, SHUTDOWN),
                task(600, 5, FAILED, RUNNING)
            ]),
            ContainerState::Running,
            "a failure Swarm has yet to act on: it restarts the task"
        );
    }
}
