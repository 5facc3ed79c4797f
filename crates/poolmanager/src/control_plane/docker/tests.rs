//! The docker control plane against an in-memory engine: specs, labels, listing, health
//! gating, removal, adoption after a restart, shutdown.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bollard::models::MountType;
use fn_tls::TlsArgs;

use super::*;

/// An engine that keeps containers in memory.
#[derive(Debug, Default)]
struct FakeEngine {
    /// Shared with the requests it holds (see `held_runs`).
    containers: Arc<Mutex<Vec<(Container, RunnerSpec)>>>,
    /// When set, a container is made only once a permit is added: the request is the
    /// engine's from the call on, and it makes the container even if the caller stopped
    /// waiting for the answer.
    held_runs: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// A held request came in.
    run_held: tokio::sync::Notify,
    /// A held request makes its container at once, `Created`, and starts it once let go;
    /// its created label an hour old, as the npm's wall clock gives it when it stepped
    /// forward between the two.
    created_then_clock_steps: AtomicBool,
    removed: Mutex<Vec<String>>,
    /// New containers exit at once.
    exit_on_start: AtomicBool,
    /// A logs request never answers (swarm's `service logs` can hang).
    logs_hang: AtomicBool,
    /// Removing a container whose name starts with `fn-` (a function's) never answers.
    function_removal_hangs: AtomicBool,
    /// Removing a container that was never started never answers.
    created_removal_hangs: AtomicBool,
    /// What `service_exists` answers, once `service_answers` is empty.
    service: Mutex<Option<bool>>,
    /// What `service_exists` answers first, one answer a call (`None`: the engine cannot
    /// say).
    service_answers: Mutex<std::collections::VecDeque<Option<bool>>>,
    /// A `service_exists` never answers (a manager that does not answer).
    service_hangs: AtomicBool,
    /// `service_exists` calls.
    service_checks: std::sync::atomic::AtomicUsize,
    /// A stop with a grace drains for ever: the container got SIGTERM (see `not_serving`)
    /// and runs on. A stop without grace (a kill) still stops it at once.
    stop_drains: AtomicBool,
    /// A removal with a grace (swarm's, or docker's without a function engine: stop, then
    /// remove, in one request) drains for ever, as `stop_drains`.
    remove_drains: AtomicBool,
    /// A stop with a grace fails, leaving the container as it was.
    stop_fails: AtomicBool,
    /// A removal returns at once and leaves the runner running, `Leaving`, as Swarm's
    /// deletion of a service leaves its task draining on its node.
    remove_leaves: AtomicBool,
    /// Runners that do not answer SERVING (see [`EngineHealth`]): those a stop signalled,
    /// and those a test names (still starting).
    not_serving: Mutex<std::collections::HashSet<String>>,
    /// Runners whose health probes get no answer (the npm is cut off from them), whatever
    /// their state.
    unreachable: Mutex<std::collections::HashSet<String>>,
    /// When set, a list takes its snapshot at once but answers only once a permit is
    /// added (a swarm's list takes seconds with many services).
    held_lists: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// A held list came in.
    list_held: tokio::sync::Notify,
    /// `stop <name> <grace>` and `remove <name>`, in the order asked.
    events: Mutex<Vec<String>>,
}

impl FakeEngine {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Container, RunnerSpec)>> {
        self.containers.lock().expect("fake engine lock")
    }

    fn names(&self) -> Vec<String> {
        self.lock().iter().map(|(c, _)| c.name.clone()).collect()
    }

    fn spec(&self, name: &str) -> RunnerSpec {
        self.lock()
            .iter()
            .find(|(c, _)| c.name == name)
            .map(|(_, s)| s.clone())
            .expect("container exists")
    }

    /// A container some other party created.
    fn add(&self, name: &str, state: ContainerState, labels: &[(&str, &str)]) {
        let container = Container {
            name: name.to_owned(),
            state,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        let spec = RunnerSpec {
            name: name.to_owned(),
            image: "other".into(),
            network: "other".into(),
            env: Vec::new(),
            labels: container.labels.clone(),
            certs: None,
            binds: Vec::new(),
            memory_limit_bytes: 0,
            constraints: Vec::new(),
            stop_grace: Duration::ZERO,
        };
        self.lock().push((container, spec));
    }
}

impl Engine for FakeEngine {
    fn service_exists<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Option<bool>> {
        self.service_checks.fetch_add(1, Ordering::SeqCst);
        if self.service_hangs.load(Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        let scripted = self
            .service_answers
            .lock()
            .expect("fake engine lock")
            .pop_front();
        let answer = scripted.unwrap_or(*self.service.lock().expect("fake engine lock"));
        Box::pin(async move { answer })
    }

    fn list<'a>(
        &'a self,
        label_key: &'a str,
        label_value: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Container>, EngineError>> {
        let listed = self
            .lock()
            .iter()
            .filter(|(c, _)| c.labels.get(label_key).map(String::as_str) == Some(label_value))
            .map(|(c, _)| c.clone())
            .collect();
        let Some(gate) = self.held_lists.lock().expect("fake engine lock").clone() else {
            return Box::pin(async move { Ok(listed) });
        };
        self.list_held.notify_one();
        Box::pin(async move {
            let _permit = gate.acquire().await.expect("gate open");
            Ok(listed)
        })
    }

    fn run<'a>(&'a self, spec: &'a RunnerSpec) -> BoxFuture<'a, Result<(), EngineError>> {
        let state = if self.exit_on_start.load(Ordering::SeqCst) {
            ContainerState::Stopped
        } else {
            ContainerState::Running
        };
        let made = (
            Container {
                name: spec.name.clone(),
                state,
                labels: spec.labels.clone(),
            },
            spec.clone(),
        );
        let Some(gate) = self.held_runs.lock().expect("fake engine lock").clone() else {
            self.lock().push(made);
            return Box::pin(async { Ok(()) });
        };
        // The engine's own work, which goes on whether the caller waits or not.
        let containers = Arc::clone(&self.containers);
        let engine_side = if self.created_then_clock_steps.load(Ordering::SeqCst) {
            let (mut container, spec) = made;
            let started = container.state;
            container.state = ContainerState::Created;
            if let Some(created) = container.labels.get_mut(LABEL_CREATED) {
                let ms: u64 = created.parse().expect("the npm's created label");
                *created = ms.saturating_sub(3_600_000).to_string();
            }
            let name = container.name.clone();
            self.lock().push((container, spec));
            tokio::spawn(async move {
                let _permit = gate.acquire().await.expect("gate open");
                for (c, _) in containers.lock().expect("fake engine lock").iter_mut() {
                    if c.name == name {
                        c.state = started;
                    }
                }
            })
        } else {
            tokio::spawn(async move {
                let _permit = gate.acquire().await.expect("gate open");
                containers.lock().expect("fake engine lock").push(made);
            })
        };
        self.run_held.notify_one();
        Box::pin(async move {
            engine_side.await.expect("the engine's side");
            Ok(())
        })
    }

    fn is_running<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, EngineError>> {
        let state = self
            .lock()
            .iter()
            .find(|(c, _)| c.name == name)
            .map(|(c, _)| c.state);
        Box::pin(async move {
            state
                .map(|s| s == ContainerState::Running)
                .ok_or_else(|| EngineError::NotFound(name.to_owned()))
        })
    }

    fn logs_tail<'a>(&'a self, _name: &'a str, _lines: usize) -> BoxFuture<'a, String> {
        if self.logs_hang.load(Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        Box::pin(async { "error: FN_FUNCTIONS_DIR: required".to_owned() })
    }

    fn stop<'a>(
        &'a self,
        name: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        self.events
            .lock()
            .expect("events lock")
            .push(format!("stop {name} {grace:?}"));
        if !grace.is_zero() && self.stop_fails.load(Ordering::SeqCst) {
            return Box::pin(async move { Err(EngineError::Failed(format!("stop {name}"))) });
        }
        if !grace.is_zero() && self.stop_drains.load(Ordering::SeqCst) {
            self.not_serving
                .lock()
                .expect("not serving lock")
                .insert(name.to_owned());
            return Box::pin(std::future::pending());
        }
        let found = self
            .lock()
            .iter_mut()
            .find(|(c, _)| c.name == name)
            .map(|(c, _)| c.state = ContainerState::Stopped)
            .is_some();
        Box::pin(async move {
            found
                .then_some(())
                .ok_or_else(|| EngineError::NotFound(name.to_owned()))
        })
    }

    fn remove<'a>(
        &'a self,
        name: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        self.events
            .lock()
            .expect("events lock")
            .push(format!("remove {name}"));
        if !grace.is_zero() && self.remove_drains.load(Ordering::SeqCst) {
            self.not_serving
                .lock()
                .expect("not serving lock")
                .insert(name.to_owned());
            return Box::pin(std::future::pending());
        }
        if self.remove_leaves.load(Ordering::SeqCst) {
            for (c, _) in self.lock().iter_mut().filter(|(c, _)| c.name == name) {
                c.state = ContainerState::Leaving;
            }
            return Box::pin(async { Ok(()) });
        }
        if name.starts_with("fn-") && self.function_removal_hangs.load(Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        let created = self
            .lock()
            .iter()
            .any(|(c, _)| c.name == name && c.state == ContainerState::Created);
        if created && self.created_removal_hangs.load(Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        self.lock().retain(|(c, _)| c.name != name);
        self.removed
            .lock()
            .expect("removed lock")
            .push(name.to_owned());
        Box::pin(async { Ok(()) })
    }
}

/// Runners are ready when `ready` says so.
#[derive(Debug)]
struct FakeReady {
    ready: AtomicBool,
}

impl ReadyProbe for FakeReady {
    fn health<'a>(&'a self, _address: &'a str) -> BoxFuture<'a, Health> {
        let health = if self.ready.load(Ordering::SeqCst) {
            Health::Serving
        } else {
            Health::NotServing("NOT_SERVING".into())
        };
        Box::pin(async move { health })
    }
}

/// The runners' own health, as the fake engine has them: SERVING when running and not
/// signalled to stop (a runner says NOT_SERVING from its SIGTERM on) nor named not serving;
/// no answer when not running or named unreachable.
#[derive(Debug)]
struct EngineHealth {
    engine: Arc<FakeEngine>,
    /// Probes asked for.
    probes: std::sync::atomic::AtomicUsize,
}

impl EngineHealth {
    fn new(engine: &Arc<FakeEngine>) -> Arc<Self> {
        Arc::new(EngineHealth {
            engine: Arc::clone(engine),
            probes: std::sync::atomic::AtomicUsize::new(0),
        })
    }
}

impl ReadyProbe for EngineHealth {
    fn health<'a>(&'a self, address: &'a str) -> BoxFuture<'a, Health> {
        self.probes.fetch_add(1, Ordering::SeqCst);
        let name = address.split(':').next().unwrap_or_default();
        let running = self
            .engine
            .lock()
            .iter()
            .any(|(c, _)| c.name == name && c.state == ContainerState::Running);
        let silent = self
            .engine
            .not_serving
            .lock()
            .expect("not serving lock")
            .contains(name);
        let cut_off = self
            .engine
            .unreachable
            .lock()
            .expect("unreachable lock")
            .contains(name);
        let health = if cut_off || !running {
            Health::Unreachable("connection refused".into())
        } else if silent {
            Health::NotServing("NOT_SERVING".into())
        } else {
            Health::Serving
        };
        Box::pin(async move { health })
    }
}

fn tls_files() -> TlsFiles {
    TlsFiles {
        cert: "/certs/node.pem".into(),
        key: "/certs/node-key.pem".into(),
        ca: "/certs/ca.pem".into(),
    }
}

fn config() -> DockerConfig {
    let mut config = DockerConfig::new(
        "fn-dataplane/pure-runner:latest".into(),
        TlsMode::Insecure,
        &TlsArgs {
            node_cert: None,
            node_cert_key: None,
            node_cert_authority: None,
            tls_server_name: Some("fn-node".into()),
            insecure: false,
            tls_reload_interval: std::time::Duration::from_secs(10),
            tls_retire_grace: std::time::Duration::from_secs(3600),
        },
    );
    config.tls_files = Some(tls_files());
    config.runner_memory_mb = 512;
    config
        .extra_env
        .push(("FN_LOG_LEVEL".into(), "debug".into()));
    config
}

fn placement() -> Placement {
    Placement {
        network: "stack_backend".into(),
        certs: Some((CertsSource::Volume("stack_certs".into()), "/certs".into())),
        npm_id: "stack_backend".into(),
    }
}

fn control_plane(engine: &Arc<FakeEngine>, ready: bool) -> DockerControlPlane {
    DockerControlPlane::with_engine(
        config(),
        placement(),
        Arc::clone(engine) as Arc<dyn Engine>,
        Arc::new(FakeReady {
            ready: AtomicBool::new(ready),
        }),
    )
}

/// A control loop over `plane` with `config`, its runners all idle, and what it shares.
fn control_loop(
    plane: Arc<dyn ControlPlane>,
    config: crate::manager::ManagerConfig,
) -> (Arc<crate::manager::Shared>, crate::manager::ControlLoop) {
    let shared = Arc::new(crate::manager::Shared::default());
    let control = crate::manager::ControlLoop::new(
        Arc::clone(&shared),
        plane,
        Arc::new(Idle),
        config,
        &mut prometheus_client::registry::Registry::default(),
    );
    (shared, control)
}

/// Every runner is idle, for a control loop over the plane.
#[derive(Debug)]
struct Idle;

impl crate::manager::RunnerProbe for Idle {
    fn calls_in_flight<'a>(
        &'a self,
        _runner: &'a RunnerInfo,
    ) -> BoxFuture<'a, Result<u64, String>> {
        Box::pin(async { Ok(0) })
    }
}

/// Provisions one runner of `group` on `cp` and gives it a running function container, as
/// a runner that has taken a call has: what a removal must sweep.
async fn runner_with_a_function(
    cp: &DockerControlPlane,
    engine: &FakeEngine,
    group: &str,
) -> RunnerInfo {
    let runner = cp
        .provision(group, 1, &CancellationToken::new())
        .await
        .expect("provisioned")
        .remove(0);
    engine.add(
        &format!("fn-{}-1", runner.id),
        ContainerState::Running,
        &[(fn_docker::LABEL_RUNNER, runner.id.as_str())],
    );
    runner
}

#[test]
fn spec_carries_labels_env_mount_and_limits() {
    let created = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    let spec = build_spec(&config(), &placement(), "gpu", "stack-runner-1", created);
    assert_eq!(spec.image, "fn-dataplane/pure-runner:latest");
    assert_eq!(spec.network, "stack_backend");
    assert_eq!(spec.labels[LABEL_ROLE], "runner");
    assert_eq!(spec.labels[LABEL_NPM], "stack_backend");
    assert_eq!(spec.labels[LABEL_GROUP], "gpu");
    assert_eq!(spec.labels[LABEL_CREATED], "1700000000123");
    assert_eq!(spec.labels[LABEL_PORT], "9190");
    for expected in [
        "FN_GRPC_PORT=9190",
        "FN_MAX_MEMORY_MB=512",
        "FN_NODE_CERT=/certs/node.pem",
        "FN_NODE_CERT_KEY=/certs/node-key.pem",
        "FN_NODE_CERT_AUTHORITY=/certs/ca.pem",
        "FN_TLS_SERVER_NAME=fn-node",
        "FN_LOG_LEVEL=debug",
        "FN_RUNNER_ID=stack-runner-1",
        // The npm's, as on the process plane.
        "FN_TLS_RELOAD_INTERVAL=10s",
        "FN_TLS_RETIRE_GRACE=1h",
    ] {
        assert!(spec.env.iter().any(|e| e == expected), "{expected} missing");
    }
    assert_eq!(spec.memory_limit_bytes, (512 + 128) * 1024 * 1024);

    let mut insecure = config();
    insecure.tls_files = None;
    let spec = build_spec(&insecure, &placement(), "g", "n", created);
    assert!(spec.env.iter().any(|e| e == "FN_INSECURE=true"));
    assert!(!spec.env.iter().any(|e| e.starts_with("FN_NODE_CERT")));
}

#[test]
fn runners_get_the_engine_only_when_the_operator_gives_it() {
    let spec = build_spec(&config(), &placement(), "g", "n", SystemTime::now());
    assert!(
        spec.binds.is_empty(),
        "no engine by default: {:?}",
        spec.binds
    );
    assert!(!spec.env.iter().any(|e| e.starts_with("DOCKER_HOST=")));

    let mut with_engine = config();
    with_engine.runner_engine = Some(RunnerEngine {
        socket: "/run/docker.sock".into(),
        iofs_dir: "/srv/fn-iofs".into(),
    });
    let spec = build_spec(&with_engine, &placement(), "g", "n", SystemTime::now());
    assert_eq!(
        spec.binds,
        vec![
            (
                "/run/docker.sock".to_owned(),
                RUNNER_ENGINE_SOCKET.to_owned()
            ),
            ("/srv/fn-iofs".to_owned(), "/srv/fn-iofs".to_owned()),
        ]
    );
    for expected in [
        "DOCKER_HOST=unix:///var/run/docker.sock",
        "FN_DOCKER_IOFS_DIR=/srv/fn-iofs",
    ] {
        assert!(spec.env.iter().any(|e| e == expected), "{expected} missing");
    }
    let body = create_body(&spec);
    let binds = body.host_config.and_then(|h| h.binds).expect("binds");
    assert_eq!(
        binds,
        vec![
            "/run/docker.sock:/var/run/docker.sock".to_owned(),
            "/srv/fn-iofs:/srv/fn-iofs".to_owned()
        ]
    );
}

#[test]
fn create_body_hardens_the_container() {
    let spec = build_spec(&config(), &placement(), "g", "n", SystemTime::now());
    let body = create_body(&spec);
    let host = body.host_config.expect("host config");
    assert_eq!(host.network_mode.as_deref(), Some("stack_backend"));
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
    assert!(
        host.cap_add
            .as_ref()
            .is_some_and(|caps| caps.iter().any(|c| c == "SETUID"))
    );
    assert_eq!(host.readonly_rootfs, Some(true));
    assert_eq!(host.init, Some(true));
    assert_eq!(host.memory, Some(spec.memory_limit_bytes));
    assert_eq!(
        host.pids_limit,
        Some(RUNNER_PIDS_LIMIT),
        "no fork bomb takes the host"
    );
    let mounts = host.mounts.expect("mounts");
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].typ, Some(MountType::VOLUME));
    assert_eq!(mounts[0].source.as_deref(), Some("stack_certs"));
    assert_eq!(mounts[0].target.as_deref(), Some("/certs"));
    assert_eq!(mounts[0].read_only, Some(true));
    assert!(
        body.networking_config
            .and_then(|n| n.endpoints_config)
            .is_some_and(|e| e.contains_key("stack_backend"))
    );
    assert_eq!(body.labels.expect("labels")[LABEL_GROUP], "g");
}

#[test]
fn placement_from_configuration_or_own_container() {
    let own = SelfView {
        networks: vec!["stack_backend".into()],
        mounts: vec![
            (
                "/var/run/docker.sock".into(),
                CertsSource::Bind("/var/run/docker.sock".into()),
            ),
            ("/certs".into(), CertsSource::Volume("stack_certs".into())),
        ],
        service_id: None,
    };
    let found = resolve_placement(&config(), Some(&own)).expect("from own container");
    assert_eq!(found, placement());

    let mut explicit = config();
    explicit.network = Some("net".into());
    explicit.certs = Some("/srv/fn/certs".into());
    explicit.npm_id = Some("npm-a".into());
    let p = resolve_placement(&explicit, None).expect("explicit");
    assert_eq!(p.network, "net");
    assert_eq!(
        p.certs,
        Some((CertsSource::Bind("/srv/fn/certs".into()), "/certs".into()))
    );
    assert_eq!(p.npm_id, "npm-a");

    let err = resolve_placement(&config(), None).expect_err("no network");
    assert!(err.to_string().starts_with("FN_DOCKER_NETWORK:"), "{err}");
    let mut swarm = config();
    swarm.swarm = Some(SwarmConfig::default());
    let err = resolve_placement(&swarm, None).expect_err("no network");
    assert!(err.to_string().starts_with("FN_SWARM_NETWORK:"), "{err}");
    let published = SelfView {
        networks: vec!["ingress".into(), "fn_backend".into()],
        mounts: own.mounts.clone(),
        service_id: Some("npm-service-id".into()),
    };
    let p = resolve_placement(&swarm, Some(&published)).expect("ingress is never the one");
    assert_eq!(p.network, "fn_backend");
    let two = SelfView {
        networks: vec!["a".into(), "b".into()],
        mounts: own.mounts.clone(),
        service_id: Some("npm-service-id".into()),
    };
    let err = resolve_placement(&config(), Some(&two)).expect_err("ambiguous");
    assert!(err.to_string().contains("several networks (a, b)"), "{err}");

    let no_mount = SelfView {
        networks: vec!["n".into()],
        mounts: Vec::new(),
        service_id: None,
    };
    let err = resolve_placement(&config(), Some(&no_mount)).expect_err("no certs");
    assert!(
        err.to_string().starts_with("FN_DOCKER_CERTS_VOLUME:"),
        "{err}"
    );

    let mut insecure = config();
    insecure.tls_files = None;
    let p = resolve_placement(&insecure, Some(&no_mount)).expect("insecure needs no certs");
    assert_eq!(p.certs, None);

    let mut scattered = config();
    scattered.tls_files = Some(TlsFiles {
        ca: "/etc/ca.pem".into(),
        ..tls_files()
    });
    let err = resolve_placement(&scattered, Some(&own)).expect_err("two directories");
    assert!(err.to_string().contains("in one directory"), "{err}");
}

#[test]
fn names_are_dns_safe() {
    assert_eq!(name_prefix("fn-test_42_backend"), "fn-test-42-backend");
    assert_eq!(name_prefix("__"), "fn");
    assert!(name_prefix(&"x".repeat(100)).len() <= 40);
}

#[tokio::test]
async fn provisions_ready_runners_and_lists_only_its_own() {
    let engine = Arc::new(FakeEngine::default());
    let cp = control_plane(&engine, true);
    let runners = cp
        .provision("default", 2, &CancellationToken::new())
        .await
        .expect("provisioned");
    assert_eq!(runners.len(), 2);
    for r in &runners {
        assert!(r.id.starts_with("stack-backend-runner-"), "{}", r.id);
        assert_eq!(r.address, format!("{}:9190", r.id));
        assert_eq!(r.group, "default");
        assert_eq!(engine.spec(&r.id).labels[LABEL_NPM], "stack_backend");
    }
    // Another npm's runner and a container without runner labels are not ours to report.
    engine.add(
        "other-runner",
        ContainerState::Running,
        &[
            (LABEL_ROLE, "runner"),
            (LABEL_NPM, "other"),
            (LABEL_GROUP, "default"),
            (LABEL_CREATED, "1"),
            (LABEL_PORT, "9190"),
        ],
    );
    engine.add(
        "unlabelled",
        ContainerState::Running,
        &[(LABEL_NPM, "stack_backend")],
    );
    let mut listed = cp.list().await.expect("list");
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    let mut expected = runners.clone();
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    // Creation times round-trip through the label at millisecond precision.
    let ids = |v: &[RunnerInfo]| v.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&listed), ids(&expected));
    assert!(engine.names().contains(&"other-runner".to_owned()));
}

#[tokio::test]
async fn a_restarted_npm_finds_its_runners() {
    let engine = Arc::new(FakeEngine::default());
    let first = control_plane(&engine, true);
    let runners = first
        .provision("default", 1, &CancellationToken::new())
        .await
        .expect("provisioned");
    drop(first);
    let second = control_plane(&engine, true);
    let listed = second.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, runners[0].id);
    assert_eq!(listed[0].group, "default");
}

#[tokio::test]
async fn exited_runners_are_removed_not_listed() {
    let engine = Arc::new(FakeEngine::default());
    let cp = control_plane(&engine, true);
    let runners = cp
        .provision("default", 1, &CancellationToken::new())
        .await
        .expect("provisioned");
    engine.lock()[0].0.state = ContainerState::Stopped;
    assert_eq!(cp.list().await.expect("list"), Vec::new());
    assert!(engine.names().is_empty());
    assert_eq!(
        *engine.removed.lock().expect("lock"),
        vec![runners[0].id.clone()]
    );
}

#[tokio::test(start_paused = true)]
async fn a_runner_that_never_answers_health_is_removed() {
    let engine = Arc::new(FakeEngine::default());
    let cp = control_plane(&engine, false);
    let err = cp
        .provision("default", 1, &CancellationToken::new())
        .await
        .expect_err("never ready");
    let text = err.to_string();
    assert!(text.contains("did not answer health"), "{text}");
    assert!(
        text.contains("FN_FUNCTIONS_DIR"),
        "quotes the output: {text}"
    );
    assert!(engine.names().is_empty(), "the container is removed");
}

#[tokio::test]
async fn a_runner_that_exits_at_start_is_reported_with_its_output() {
    let engine = Arc::new(FakeEngine::default());
    engine.exit_on_start.store(true, Ordering::SeqCst);
    let cp = control_plane(&engine, false);
    let err = cp
        .provision("default", 1, &CancellationToken::new())
        .await
        .expect_err("exited");
    assert!(
        err.to_string().contains("exited before answering health"),
        "{err}"
    );
    assert!(engine.names().is_empty());
}

#[tokio::test]
async fn remove_and_shutdown_remove_containers_unless_kept() {
    let engine = Arc::new(FakeEngine::default());
    let cp = control_plane(&engine, true);
    let runners = cp
        .provision("default", 3, &CancellationToken::new())
        .await
        .expect("provisioned");
    cp.remove(&runners[0]).await.expect("removed");
    assert_eq!(engine.names().len(), 2);

    let mut keeping = config();
    keeping.keep_runners = true;
    let kept = DockerControlPlane::with_engine(
        keeping,
        placement(),
        Arc::clone(&engine) as Arc<dyn Engine>,
        Arc::new(FakeReady {
            ready: AtomicBool::new(true),
        }),
    );
    kept.shutdown().await;
    assert_eq!(engine.names().len(), 2, "kept for the next npm");

    cp.shutdown().await;
    assert!(engine.names().is_empty());
}

/// Under swarm, an npm whose service is still there when it stops (a rolling update, its
/// task restarted) leaves the runners for its next task, and so does one that cannot tell
/// (see `tests/shutdown.rs`); one whose service is gone (`docker stack rm`) removes them.
#[tokio::test(start_paused = true)]
async fn an_npm_whose_service_stays_leaves_its_runners_to_its_next_task() {
    for (service, kept) in [(Some(true), true), (Some(false), false), (None, true)] {
        let engine = Arc::new(FakeEngine::default());
        *engine.service.lock().expect("lock") = service;
        let cp = control_plane(&engine, true).with_own_service(Some("npm-service-id".into()));
        cp.provision("default", 2, &CancellationToken::new())
            .await
            .expect("provisioned");
        cp.shutdown().await;
        let left = engine.names().len();
        assert_eq!(
            left,
            if kept { 2 } else { 0 },
            "service exists: {service:?}"
        );
    }
    // Not under swarm (no service of its own): the runners go whatever the engine says.
    let engine = Arc::new(FakeEngine::default());
    *engine.service.lock().expect("lock") = Some(true);
    let cp = control_plane(&engine, true);
    cp.provision("default", 1, &CancellationToken::new())
        .await
        .expect("provisioned");
    cp.shutdown().await;
    assert!(engine.names().is_empty());
}

#[tokio::test]
async fn the_function_containers_a_runner_left_go_once_it_is_gone() {
    let engine = Arc::new(FakeEngine::default());
    let cp = control_plane(&engine, true).with_function_engine(Arc::clone(&engine) as _);
    let runners = cp
        .provision("default", 3, &CancellationToken::new())
        .await
        .expect("provisioned");
    let function = |n: usize, runner: &str| {
        engine.add(
            &format!("fn-{runner}-{n}"),
            ContainerState::Running,
            &[
                (fn_docker::LABEL_RUNNER, runner),
                ("fn.dataplane.role", "function"),
            ],
        );
    };
    for runner in &runners {
        function(1, &runner.id);
        function(2, &runner.id);
    }
    let functions_of = |runner: &str| {
        engine
            .names()
            .into_iter()
            .filter(|n| n.starts_with(&format!("fn-{runner}-")))
            .count()
    };

    // Removed (killed while it drained): what it left goes after it.
    cp.remove(&runners[0]).await.expect("removed");
    assert_eq!(functions_of(&runners[0].id), 0);
    assert_eq!(functions_of(&runners[1].id), 2, "another runner's stay");

    // Found exited (it crashed): removed with what it left.
    engine
        .lock()
        .iter_mut()
        .find(|(c, _)| c.name == runners[1].id)
        .expect("runner container")
        .0
        .state = ContainerState::Stopped;
    let listed = cp.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(functions_of(&runners[1].id), 0);
    assert_eq!(functions_of(&runners[2].id), 2, "a running runner's stay");

    // Shutdown: the last runner and what it left.
    cp.shutdown().await;
    assert!(engine.names().is_empty(), "{:?}", engine.names());
}

/// A runner whose stop failed may still run, and start a function container while what it
/// left is swept (left for good once the runner container goes): it is killed first.
#[tokio::test]
async fn a_runner_whose_stop_failed_is_killed_before_what_it_left_is_swept() {
    let engine = Arc::new(FakeEngine::default());
    let cp = control_plane(&engine, true).with_function_engine(Arc::clone(&engine) as _);
    let runner = runner_with_a_function(&cp, &engine, "default").await;
    engine.stop_fails.store(true, Ordering::SeqCst);
    cp.remove(&runner).await.expect("removed");
    let events = engine.events.lock().expect("lock").clone();
    let at = |event: String| events.iter().position(|e| *e == event);
    let killed = at(format!("stop {} 0ns", runner.id));
    let swept = at(format!("remove fn-{}-1", runner.id));
    assert!(
        matches!((killed, swept), (Some(k), Some(s)) if k < s),
        "{events:?}"
    );
    assert!(engine.names().is_empty(), "{:?}", engine.names());
}

/// An image labelled with this npm's id (the engine merges an image's labels into its
/// containers') makes a function container that carries it: the npm neither lists it as a
/// runner nor removes it, created or running, nor at shutdown.
#[tokio::test]
async fn a_function_container_carrying_the_npms_label_is_no_runner() {
    let engine = Arc::new(FakeEngine::default());
    let cp = control_plane(&engine, true);
    let npm_id = placement().npm_id;
    for (name, state) in [
        ("fn-created", ContainerState::Created),
        ("fn-running", ContainerState::Running),
        ("fn-exited", ContainerState::Stopped),
    ] {
        engine.add(
            name,
            state,
            &[(LABEL_NPM, npm_id.as_str()), (LABEL_ROLE, "function")],
        );
    }
    assert!(cp.list().await.expect("list").is_empty());
    cp.shutdown().await;
    assert_eq!(engine.names().len(), 3, "{:?}", engine.names());
}

#[tokio::test]
async fn without_a_function_engine_the_npm_touches_no_function_container() {
    let engine = Arc::new(FakeEngine::default());
    let cp = control_plane(&engine, true);
    let runners = cp
        .provision("default", 1, &CancellationToken::new())
        .await
        .expect("provisioned");
    engine.add(
        "fn-left",
        ContainerState::Running,
        &[(fn_docker::LABEL_RUNNER, &runners[0].id)],
    );
    cp.remove(&runners[0]).await.expect("removed");
    assert_eq!(engine.names(), vec!["fn-left".to_owned()]);
}

/// A runner image missing from the engine the npm talks to: the docker plane cannot start
/// a runner and stops with a configuration error; under swarm the nodes pull it, and the
/// manager need not have it, so the npm warns and goes on (it exited, and Swarm restarted it
/// for ever, in the documented registry setup).
#[test]
fn a_runner_image_missing_on_the_manager_is_a_warning_under_swarm_only() {
    let docker = config();
    let err = image_missing(&docker, "registry.example.com/fn/pure-runner:1")
        .expect_err("the docker plane needs the image on its engine");
    assert!(matches!(err, DockerSetupError::Image { .. }), "{err}");
    assert!(err.to_string().contains("FN_DOCKER_RUNNER_IMAGE"), "{err}");

    let mut swarm = config();
    swarm.swarm = Some(SwarmConfig::default());
    let warning = image_missing(&swarm, "registry.example.com/fn/pure-runner:1")
        .expect("the swarm plane goes on");
    for said in [
        "FN_SWARM_RUNNER_IMAGE",
        "registry.example.com/fn/pure-runner:1",
        "every node",
        "pull it",
    ] {
        assert!(warning.contains(said), "{said}: {warning}");
    }
}

#[test]
fn swarm_runners_are_one_restarting_service_each_with_the_npm_secrets_and_constraints() {
    let mut swarm = config();
    swarm.swarm = Some(SwarmConfig {
        constraints: vec!["node.labels.fn==runner".into()],
    });
    swarm.tls_files = Some(TlsFiles {
        cert: "/run/secrets/fn_node.pem".into(),
        key: "/run/secrets/fn_node-key.pem".into(),
        ca: "/run/secrets/fn_ca.pem".into(),
    });
    let placement = resolve_placement(&swarm, None).expect_err("network still needed");
    assert!(
        placement.to_string().contains("FN_SWARM_NETWORK"),
        "{placement}"
    );
    swarm.network = Some("fn_backend".into());
    let placement = resolve_placement(&swarm, None).expect("secrets need no mount");
    assert_eq!(
        placement.certs,
        Some((
            CertsSource::Secrets(vec![
                "fn_node.pem".into(),
                "fn_node-key.pem".into(),
                "fn_ca.pem".into()
            ]),
            SECRETS_DIR.into()
        ))
    );
    let spec = build_spec(&swarm, &placement, "g", "fn-runner-1", SystemTime::now());
    let secret = |target: &str, id: &str| SecretRef {
        target: target.into(),
        id: id.into(),
        name: format!("{target}.2"),
    };
    let refs = [
        secret("fn_node.pem", "s1"),
        secret("fn_node-key.pem", "s2"),
        secret("fn_ca.pem", "s3"),
    ];
    let service = service_spec(&spec, &refs);
    assert_eq!(service.name.as_deref(), Some("fn-runner-1"));
    assert_eq!(
        service.labels.as_ref().map(|l| l[LABEL_GROUP].as_str()),
        Some("g")
    );
    assert_eq!(
        service
            .mode
            .and_then(|m| m.replicated)
            .and_then(|r| r.replicas),
        Some(1),
        "one service per runner"
    );
    let task = service.task_template.expect("task");
    assert_eq!(
        task.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.pids),
        Some(RUNNER_PIDS_LIMIT)
    );
    // Swarm places by reservations only: the runner's memory is reserved, all of it.
    let memory = i64::try_from((512 + RUNNER_OVERHEAD_MB) * 1024 * 1024).expect("fits");
    assert_eq!(
        task.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.memory_bytes),
        Some(memory)
    );
    assert_eq!(
        task.resources
            .as_ref()
            .and_then(|r| r.reservations.as_ref())
            .and_then(|r| r.memory_bytes),
        Some(memory),
        "the scheduler counts the runner's memory on its node"
    );
    assert_eq!(
        task.restart_policy.and_then(|r| r.condition),
        Some(bollard::models::TaskSpecRestartPolicyConditionEnum::ON_FAILURE)
    );
    assert_eq!(
        task.placement.and_then(|p| p.constraints),
        Some(vec!["node.labels.fn==runner".to_owned()])
    );
    assert_eq!(
        task.networks.expect("networks")[0].target.as_deref(),
        Some("fn_backend")
    );
    let container = task.container_spec.expect("container");
    let secrets = container.secrets.expect("secrets");
    assert_eq!(secrets.len(), 3);
    assert_eq!(secrets[1].secret_id.as_deref(), Some("s2"));
    assert_eq!(secrets[1].secret_name.as_deref(), Some("fn_node-key.pem.2"));
    let file = secrets[1].file.clone().expect("file");
    assert_eq!(file.name.as_deref(), Some("fn_node-key.pem"));
    assert_eq!(
        file.mode,
        Some(0o400),
        "only the runner (root) reads the key"
    );
    assert_eq!(container.read_only, Some(true));
    assert_eq!(container.capability_drop, Some(vec!["ALL".to_owned()]));
    assert!(
        container
            .env
            .expect("env")
            .contains(&"FN_NODE_CERT_KEY=/run/secrets/fn_node-key.pem".to_owned())
    );
    assert_eq!(container.stop_grace_period, Some(40_000_000_000));
    // Swarm gives a task a DNS name only once its health check passes: the runner's is run
    // every 2 s, not the image's 10 s, its command still the image's.
    let health = container
        .health_check
        .expect("a health check of the plane's own");
    assert_eq!(health.interval, Some(2_000_000_000));
    assert_eq!(health.test, None, "the image's command");
    // Each check of a hung runner takes the interval and the probe's own 3 s bound.
    let probe_bound = 3_000_000_000;
    assert_eq!(
        health
            .retries
            .zip(health.interval)
            .map(|(retries, interval)| retries * (interval + probe_bound)),
        Some(30_000_000_000),
        "a hung runner is restarted after some 30 s of failed checks, as with the image's"
    );
}

/// A health probe that says "not yet" once it is let go, so that a test can act while a
/// provisioning waits in it.
#[derive(Debug, Default)]
struct GatedReady {
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl ReadyProbe for GatedReady {
    fn health<'a>(&'a self, _address: &'a str) -> BoxFuture<'a, Health> {
        Box::pin(async move {
            self.entered.notify_one();
            self.release.notified().await;
            Health::NotServing("NOT_SERVING".into())
        })
    }
}

/// A runner that stops while it starts is left by `list` to its provisioner, which reports
/// that it exited, with its output, at once (before, the tick's list removed it, and the
/// provisioning waited out the start timeout and blamed the network, the output lost).
#[tokio::test(start_paused = true)]
async fn a_runner_that_stops_while_starting_is_its_provisioners_to_report() {
    let engine = Arc::new(FakeEngine::default());
    engine.exit_on_start.store(true, Ordering::SeqCst);
    let ready = Arc::new(GatedReady::default());
    let cp = Arc::new(DockerControlPlane::with_engine(
        config(),
        placement(),
        Arc::clone(&engine) as Arc<dyn Engine>,
        Arc::clone(&ready) as Arc<dyn ReadyProbe>,
    ));
    let provisioning = tokio::spawn({
        let cp = Arc::clone(&cp);
        async move { cp.provision("default", 1, &CancellationToken::new()).await }
    });
    ready.entered.notified().await;
    let listed = cp.list().await.expect("lists");
    assert!(listed.is_empty());
    assert_eq!(
        engine.names().len(),
        1,
        "list left the starting runner alone"
    );
    ready.release.notify_one();
    let started = tokio::time::Instant::now();
    let err = provisioning
        .await
        .expect("task")
        .expect_err("the runner exited");
    let err = err.to_string();
    assert!(
        err.contains("exited before answering health")
            && err.contains("FN_FUNCTIONS_DIR: required"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(engine.names().is_empty(), "the provisioner removed it");
    // Once its provisioning is over, a stopped runner is list's to remove again.
    engine.add(
        "stack-backend-runner-old",
        ContainerState::Stopped,
        &[(LABEL_ROLE, "runner"), (LABEL_NPM, "stack_backend")],
    );
    cp.list().await.expect("lists");
    assert!(engine.names().is_empty());
}

/// A runner created and not started yet is its provisioner's, whatever its created label
/// says: with the npm's clock stepped forward between create and start, the tick's list
/// took it for one a killed npm left and removed it (before, only running and stopped
/// runners being started were left alone).
#[tokio::test]
async fn a_runner_created_and_not_started_yet_is_its_provisioners() {
    let engine = Arc::new(FakeEngine::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *engine.held_runs.lock().expect("fake engine lock") = Some(Arc::clone(&gate));
    engine
        .created_then_clock_steps
        .store(true, Ordering::SeqCst);
    let cp = Arc::new(control_plane(&engine, true));
    let run_held = engine.run_held.notified();
    let provisioning = tokio::spawn({
        let cp = Arc::clone(&cp);
        async move { cp.provision("default", 1, &CancellationToken::new()).await }
    });
    run_held.await;
    assert!(cp.list().await.expect("lists").is_empty(), "not ready yet");
    assert_eq!(
        engine.names().len(),
        1,
        "list left the runner being started"
    );
    assert!(engine.removed.lock().expect("removed lock").is_empty());
    gate.add_permits(1);
    let runners = tokio::time::timeout(Duration::from_secs(10), provisioning)
        .await
        .expect("provisioned within the bound")
        .expect("task")
        .expect("the runner started");
    assert_eq!(runners.len(), 1);
    let listed: Vec<String> = cp
        .list()
        .await
        .expect("lists")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, vec![runners[0].id.clone()]);

    // Once no provisioning claims it, a stale created runner is list's to remove again.
    engine.add(
        "stack-backend-runner-old",
        ContainerState::Created,
        &[(LABEL_ROLE, "runner"), (LABEL_NPM, "stack_backend")],
    );
    cp.list().await.expect("lists");
    assert_eq!(engine.names(), vec![runners[0].id.clone()]);
}

/// An engine that never gives a failed runner's output does not hold its provisioning (and
/// with it the group's scale-up) for ever: the error says the output did not come, and the
/// container is removed.
#[tokio::test(start_paused = true)]
async fn a_logs_request_that_hangs_does_not_hold_a_failed_provisioning() {
    let engine = Arc::new(FakeEngine::default());
    engine.exit_on_start.store(true, Ordering::SeqCst);
    engine.logs_hang.store(true, Ordering::SeqCst);
    let cp = control_plane(&engine, false);
    let err = tokio::time::timeout(
        FAILURE_OUTPUT_BOUND * 2,
        cp.provision("default", 1, &CancellationToken::new()),
    )
    .await
    .expect("the provisioning ends")
    .expect_err("the runner exited");
    assert!(
        err.to_string().contains("the engine gave none within 15s"),
        "{err}"
    );
    assert!(engine.names().is_empty());
}

/// A list cut short while it cleans up after an exited runner (the control loop bounds
/// each list) leaves nothing behind for good: the next list finds the runner again and
/// removes what it left.
#[tokio::test(start_paused = true)]
async fn a_cleanup_cut_short_is_finished_by_the_next_list() {
    let engine = Arc::new(FakeEngine::default());
    let cp = control_plane(&engine, true).with_function_engine(Arc::clone(&engine) as _);
    let runner = runner_with_a_function(&cp, &engine, "default").await;
    engine
        .lock()
        .iter_mut()
        .find(|(c, _)| c.name == runner.id)
        .expect("runner container")
        .0
        .state = ContainerState::Stopped;
    engine.function_removal_hangs.store(true, Ordering::SeqCst);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), cp.list())
            .await
            .is_err(),
        "the list is cut short"
    );
    engine.function_removal_hangs.store(false, Ordering::SeqCst);
    cp.list().await.expect("lists");
    assert!(engine.names().is_empty(), "left: {:?}", engine.names());
}

/// A logs stream that never ends (swarm's `service logs` can hang) gives way after the
/// bound, so that swarm's tail still goes on to ask for the tasks' errors.
#[tokio::test(start_paused = true)]
async fn a_logs_stream_that_never_ends_gives_way_at_its_bound() {
    let logs =
        futures::stream::pending::<Result<bollard::container::LogOutput, bollard::errors::Error>>();
    let text = tokio::time::timeout(engine::LOGS_BOUND * 2, engine::collect_logs(logs))
        .await
        .expect("bounded");
    assert_eq!(text, "(no output within 5s)");
}

mod adoption;
mod fake_api;
mod leaving;
mod log_bounds;
mod never_started;
mod secrets;
mod shutdown;
mod swarm_list;
