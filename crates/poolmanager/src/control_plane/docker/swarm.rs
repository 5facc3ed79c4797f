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
//!   mounted at the same paths and readable by the runner (root in its container) only;
//! - runner services are placed by `FN_SWARM_CONSTRAINTS`.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    EndpointSpec, EndpointSpecModeEnum, Mount, MountType, NetworkAttachmentConfig, ServiceSpec,
    ServiceSpecMode, ServiceSpecModeReplicated, TaskSpec, TaskSpecContainerSpec,
    TaskSpecContainerSpecFile, TaskSpecContainerSpecSecrets, TaskSpecPlacement, TaskSpecResources,
    TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{
    ListSecretsOptionsBuilder, ListServicesOptionsBuilder, ListTasksOptionsBuilder,
};
use fn_docker::{EngineError, classify};
use futures::StreamExt;
use futures::future::BoxFuture;

use super::engine::{BollardEngine, RUNNER_CAPABILITIES, certs_mount, collect_logs, tail_options};
use super::{CertsSource, Container, ContainerState, Engine, RunnerSpec};

/// Task lists asked for at once while listing the runner services.
const TASK_QUERIES_AT_ONCE: usize = 8;

/// Failed tasks after which a runner service counts as not coming up (its task keeps being
/// restarted by Swarm; the control plane gives up on it after its start timeout anyway).
const FAILED_TASKS_GIVE_UP: usize = 3;

/// Runner services through a swarm manager's Engine API.
#[derive(Debug, Clone)]
pub struct SwarmEngine {
    engine: BollardEngine,
}

impl SwarmEngine {
    pub fn new(engine: BollardEngine) -> Self {
        SwarmEngine { engine }
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

/// A service's state as the control plane sees it. The service *is* the runner: it stays
/// `Running` (listed, in the LBs' lists) while Swarm starts or restarts its task, after a
/// crash or a node loss, so that it keeps its place; only a service whose task cannot come
/// up is `Stopped` (the control plane removes it). A task is also "starting" until the
/// image's health check first passes, well after the runner answers the npm's own probe.
fn service_state(tasks: &[bollard::models::Task]) -> ContainerState {
    if may_come_up(tasks) {
        ContainerState::Running
    } else {
        ContainerState::Stopped
    }
}

/// Whether a service's runner is up or may still come up: a task of it runs, or none was
/// rejected (no image on the node, a constraint no node meets, a missing secret) and not
/// too many failed. Swarm keeps a service's old tasks (five by default), so failures long
/// past do not count against a runner that serves now.
fn may_come_up(tasks: &[bollard::models::Task]) -> bool {
    let state = |t: &bollard::models::Task| t.status.as_ref().and_then(|s| s.state);
    if tasks.iter().any(|t| state(t) == Some(TaskState::RUNNING)) {
        return true;
    }
    let rejected = tasks.iter().any(|t| state(t) == Some(TaskState::REJECTED));
    let failed = tasks
        .iter()
        .filter(|t| state(t) == Some(TaskState::FAILED))
        .count();
    !rejected && failed < FAILED_TASKS_GIVE_UP
}

/// The service spec of a runner. `secret_ids` are the ids of the certificate secrets, in
/// the order of [`CertsSource::Secrets`].
pub fn service_spec(spec: &RunnerSpec, secret_ids: &[String]) -> ServiceSpec {
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
        Some((CertsSource::Secrets(names), _)) => Some(
            names
                .iter()
                .zip(secret_ids)
                .map(|(name, id)| TaskSpecContainerSpecSecrets {
                    file: Some(TaskSpecContainerSpecFile {
                        name: Some(name.clone()),
                        uid: Some("0".to_owned()),
                        gid: Some("0".to_owned()),
                        // The runner is root in its container; its functions are not.
                        mode: Some(0o400),
                    }),
                    secret_id: Some(id.clone()),
                    secret_name: Some(name.clone()),
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

    fn list<'a>(
        &'a self,
        label_key: &'a str,
        label_value: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Container>, EngineError>> {
        Box::pin(async move {
            let filters = fn_docker::label_filter(label_key, label_value);
            let options = ListServicesOptionsBuilder::default()
                .filters(&filters)
                .build();
            let services = self
                .docker()
                .list_services(Some(options))
                .await
                .map_err(|e| classify(e, "listing services"))?;
            // Each service's tasks are a request of their own: a few at a time, so that a
            // swarm of many runners is listed within the control loop's bound.
            let named = services.into_iter().filter_map(|service| {
                let spec = service.spec?;
                Some((spec.name?, spec.labels.unwrap_or_default()))
            });
            let mut listed = futures::stream::iter(named)
                .map(|(name, labels)| async move {
                    let tasks = self.tasks(&name).await;
                    (name, labels, tasks)
                })
                .buffered(TASK_QUERIES_AT_ONCE);
            let mut found = Vec::new();
            while let Some((name, labels, tasks)) = listed.next().await {
                let tasks = match tasks {
                    Ok(tasks) => tasks,
                    // Removed since it was listed (by this npm draining it, or by hand).
                    Err(EngineError::NotFound(_)) => continue,
                    Err(e) => return Err(e),
                };
                found.push(Container {
                    name,
                    state: service_state(&tasks),
                    labels,
                });
            }
            Ok(found)
        })
    }

    fn run<'a>(&'a self, spec: &'a RunnerSpec) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let secret_ids = match &spec.certs {
                Some((CertsSource::Secrets(names), _)) => self.secret_ids(names).await?,
                _ => Vec::new(),
            };
            self.docker()
                .create_service(service_spec(spec, &secret_ids), None)
                .await
                .map(drop)
                .map_err(|e| classify(e, &spec.name))
        })
    }

    fn is_running<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, EngineError>> {
        Box::pin(async move { Ok(may_come_up(&self.tasks(name).await?)) })
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

    fn remove<'a>(
        &'a self,
        name: &'a str,
        _grace: Duration,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        // The grace is the service's own (`stop_grace_period`, set at creation): Swarm stops
        // the task with SIGTERM and kills it after that.
        Box::pin(async move {
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
    use bollard::models::{Task, TaskStatus};

    fn task(state: TaskState, desired: TaskState) -> Task {
        Task {
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
        use TaskState::{FAILED, PENDING, REJECTED, RUNNING, SHUTDOWN, STARTING};
        assert_eq!(
            service_state(&[task(RUNNING, RUNNING)]),
            ContainerState::Running
        );
        assert_eq!(
            service_state(&[task(STARTING, RUNNING)]),
            ContainerState::Running,
            "starting until the image's health check passes"
        );
        assert_eq!(
            service_state(&[task(FAILED, SHUTDOWN), task(PENDING, RUNNING)]),
            ContainerState::Running,
            "a runner Swarm restarts keeps its place"
        );
        assert_eq!(
            service_state(&[task(REJECTED, SHUTDOWN)]),
            ContainerState::Stopped
        );
        assert!(may_come_up(&[task(PENDING, RUNNING)]));
        assert!(may_come_up(&[
            task(FAILED, SHUTDOWN),
            task(PENDING, RUNNING)
        ]));
        assert!(!may_come_up(&[task(REJECTED, SHUTDOWN)]));
        assert!(!may_come_up(&[
            task(FAILED, SHUTDOWN),
            task(FAILED, SHUTDOWN),
            task(FAILED, SHUTDOWN)
        ]));
        // Old failures, a task serving now: the runner is up.
        assert_eq!(
            service_state(&[
                task(FAILED, SHUTDOWN),
                task(REJECTED, SHUTDOWN),
                task(FAILED, SHUTDOWN),
                task(FAILED, SHUTDOWN),
                task(RUNNING, RUNNING)
            ]),
            ContainerState::Running
        );
    }
}
