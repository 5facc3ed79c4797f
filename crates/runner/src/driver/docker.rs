//! The `docker` driver: function instances as hot containers of the function's image, on the
//! Fn FDK `http-stream` contract, as the original Fn runner ran them.
//!
//! Each instance is one container. The runner makes a private host directory per instance
//! under its iofs root (`FN_DOCKER_IOFS_DIR`) and bind-mounts it at `/tmp/iofs`; the function
//! listens on `unix:/tmp/iofs/lsnr.sock` (`FN_LISTENER`) and the runner calls it through the
//! same socket client as the process driver. The image's entrypoint and cmd run, with the
//! function's config and the contract's `FN_*` variables as its environment.
//!
//! Isolation by default (function code is untrusted): no network (`FN_DOCKER_FUNCTION_NETWORK`,
//! default `none`), a non-root user (`FN_DOCKER_FUNCTION_USER`, default `65534:65534`), a
//! read-only root file system with a private tmpfs `/tmp`, every capability dropped,
//! `no-new-privileges`, a pids limit, a memory limit of the function's `memory_mb` with no
//! swap, and CPU shares in proportion to memory. Nothing of the runner's is mounted but the
//! instance's own directory, so the runner's certificates stay out of reach.
//!
//! Life and clean-up: a watcher task per container waits for it to stop (or for the runner to
//! kill it), says how it ended (its exit status, or that the kernel killed it out of memory),
//! removes the container and the directory. Every container carries labels naming the runner
//! (`FN_RUNNER_ID`), app, function and instance; a runner that starts removes what an earlier
//! run of its own (same runner id) left behind, for example after a `SIGKILL`.
//!
//! Images are used as they are on the engine; with `FN_DOCKER_PULL=missing` (the default) an
//! image the engine does not have is pulled once, bounded by `FN_DOCKER_PULL_TIMEOUT`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, Mount, MountType};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, InspectContainerOptions,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use fn_docker::{EngineError, classify};
use futures::StreamExt;
use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::output::{self, Labels, LineSplitter, MAX_LINE, Stream as OutputStream};
use super::process::check_config;
use super::socket::{
    CONTAINER_END_GRACE, Liveness, SocketClient, remove_instance_dir, set_instance_dir_aside,
    wait_for_listener,
};
use super::{
    BodyStream, Driver, DriverError, FunctionRequest, FunctionResponse, Instance, InstanceSpec,
};

/// Where the instance directory appears inside the container (as in Fn).
const IOFS_MOUNT: &str = "/tmp/iofs";
/// The listener the function is told to open, inside the container.
const LISTENER: &str = "unix:/tmp/iofs/lsnr.sock";
/// Name of the listener socket inside an instance directory.
const LISTENER_NAME: &str = "lsnr.sock";

/// Label on every function container: `function`.
pub const LABEL_ROLE: &str = "fn.dataplane.role";
/// Label naming the runner that owns the container (`FN_RUNNER_ID`).
pub const LABEL_RUNNER: &str = fn_docker::LABEL_RUNNER;
pub const LABEL_APP: &str = "fn.dataplane.app";
pub const LABEL_FUNCTION: &str = "fn.dataplane.function";
pub const LABEL_INSTANCE: &str = "fn.dataplane.instance";
/// Value of [`LABEL_ROLE`] on function containers.
const ROLE_FUNCTION: &str = "function";

/// A lock per image being pulled: calls for one image wait for its one pull; calls for
/// another image do not wait behind it (one lock for all made a call for a small image wait
/// out a large one's pull, up to `FN_DOCKER_PULL_TIMEOUT`). An entry lives while someone
/// holds its lock or waits for it.
#[derive(Debug, Default)]
struct PullLocks {
    by_image: std::sync::Mutex<HashMap<String, std::sync::Weak<PullLock>>>,
}

/// One image's pull lock, holding how its last pull failed, and when.
type PullLock = tokio::sync::Mutex<Option<(Instant, String)>>;

/// Runs `pull` under `lock`: one pull of an image at a time, and the callers that waited
/// for a pull that failed get its error instead of pulling again one after another (twenty
/// calls for an image on a registry that does not answer took twenty pull timeouts). The
/// wait for the lock is bounded by `wait`.
async fn pull_once<Fut>(
    lock: &PullLock,
    wait: Duration,
    pull: impl FnOnce() -> Fut,
) -> Result<(), String>
where
    Fut: Future<Output = Result<(), String>>,
{
    let asked = Instant::now();
    let mut last = tokio::time::timeout(wait, lock.lock())
        .await
        .map_err(|_| format!("another pull of the image took longer than {wait:?}"))?;
    if let Some((ended, error)) = last.as_ref()
        && *ended >= asked
    {
        return Err(error.clone());
    }
    let outcome = pull().await;
    *last = outcome.as_ref().err().map(|e| (Instant::now(), e.clone()));
    outcome
}

impl PullLocks {
    /// The lock of `image`.
    fn of(&self, image: &str) -> Arc<PullLock> {
        let mut by_image = self
            .by_image
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(lock) = by_image.get(image).and_then(std::sync::Weak::upgrade) {
            return lock;
        }
        by_image.retain(|_, lock| lock.strong_count() > 0);
        let lock = Arc::new(tokio::sync::Mutex::new(None));
        by_image.insert(image.to_owned(), Arc::downgrade(&lock));
        lock
    }
}

/// Longest container name made (Docker allows more; names stay readable in `docker ps`).
const MAX_NAME_LEN: usize = 100;

/// How long one removal of a container may take before it is tried again.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);
/// First and longest pause between removals of a container the engine failed to remove.
const REMOVE_RETRY: Duration = Duration::from_secs(1);
const REMOVE_RETRY_MAX: Duration = Duration::from_secs(30);

/// How long a container's watch is asked again, after the engine's answer broke off (an
/// engine restarting with live-restore, a socket proxy that cuts long requests), before the
/// container is taken as lost. The container may well still run meanwhile: it stays an
/// instance of the pool, its memory counted.
const WAIT_LOST_AFTER: Duration = Duration::from_secs(60);
/// First and longest pause between two asks.
const WAIT_RETRY: Duration = Duration::from_millis(100);
const WAIT_RETRY_MAX: Duration = Duration::from_secs(5);
/// A watch that broke after this long had reached the engine: the time without one starts
/// again (a proxy that cuts every request after a while must not end the container).
const WAIT_HELD: Duration = Duration::from_secs(1);

/// How long a shutdown waits for the driver's starts and removals under way, before it
/// removes by label what is left of this runner's.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// The engine socket the driver uses (`DOCKER_HOST`, else the local socket), for messages.
pub fn engine_socket() -> String {
    fn_docker::socket()
}

/// Whether images missing from the engine are pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Only images already on the engine run; a missing one is a call error.
    Never,
    /// A missing image is pulled once, then used as it is.
    Missing,
}

impl PullPolicy {
    /// Parses `FN_DOCKER_PULL`.
    ///
    /// # Errors
    /// A message listing the accepted values.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "never" => Ok(PullPolicy::Never),
            "missing" => Ok(PullPolicy::Missing),
            other => Err(format!("{other:?}: expected never or missing")),
        }
    }
}

/// The numeric user a container runs as (`uid[:gid]`; the gid defaults to the uid). Names
/// are not accepted: they would be resolved inside each image, and `FROM scratch` images have
/// no user database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerUser {
    pub uid: u32,
    pub gid: u32,
}

impl ContainerUser {
    /// `nobody:nogroup`.
    pub const DEFAULT: ContainerUser = ContainerUser {
        uid: 65_534,
        gid: 65_534,
    };

    /// Parses `FN_DOCKER_FUNCTION_USER`.
    ///
    /// # Errors
    /// A message saying what is expected; uid 0 is refused (functions never run as root).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (uid, gid) = text.split_once(':').unwrap_or((text, text));
        let number = |part: &str| {
            part.parse::<u32>()
                .map_err(|_| format!("{text:?}: expected a numeric uid[:gid], such as 65534:65534"))
        };
        let user = ContainerUser {
            uid: number(uid)?,
            gid: number(gid)?,
        };
        if user.uid == 0 || user.gid == 0 {
            return Err(format!(
                "{text:?}: functions never run as root; give an unprivileged uid:gid"
            ));
        }
        Ok(user)
    }
}

/// Parses `FN_DOCKER_FUNCTION_NETWORK`: `none`, or a network's name.
///
/// # Errors
/// A blank value (the engine reads it as its default network); `host`, and
/// `container:<id>`: a function container would share the host's network namespace, or
/// another container's (its loopback ports, its addresses), which isolation forbids.
pub fn parse_network(text: &str) -> Result<String, String> {
    let text = fn_lifecycle::config::non_blank(text)?;
    if text == "host" || text.starts_with("container:") {
        return Err(format!(
            "{text:?}: function containers never share the host's network namespace nor \
             another container's; give none, or the name of a network made for them"
        ));
    }
    Ok(text)
}

/// Settings of the `docker` driver; built by the runner from its `FN_*` configuration.
#[derive(Debug, Clone)]
pub struct DockerDriverConfig {
    /// `FN_RUNNER_ID`: on every container's labels; what a restarted runner cleans up by.
    pub runner_id: String,
    /// `FN_DOCKER_IOFS_DIR`: where instance directories are made. When the runner itself runs
    /// in a container, this path must be the same on the host (the engine mounts host paths).
    pub iofs_root: PathBuf,
    /// `FN_DOCKER_PULL`.
    pub pull: PullPolicy,
    /// `FN_DOCKER_PULL_TIMEOUT`: how long one pull may take.
    pub pull_timeout: Duration,
    /// `FN_DOCKER_FUNCTION_NETWORK`: `none`, or a network the operator names.
    pub network: String,
    /// `FN_DOCKER_FUNCTION_USER`.
    pub user: ContainerUser,
    /// `FN_DOCKER_PIDS_LIMIT`: most processes (and threads) one container may have.
    pub pids_limit: i64,
}

impl DockerDriverConfig {
    /// The defaults, for `runner_id` with instance directories under `iofs_root`.
    pub fn new(runner_id: impl Into<String>, iofs_root: impl Into<PathBuf>) -> Self {
        DockerDriverConfig {
            runner_id: runner_id.into(),
            iofs_root: iofs_root.into(),
            pull: PullPolicy::Missing,
            pull_timeout: Duration::from_secs(300),
            network: "none".into(),
            user: ContainerUser::DEFAULT,
            pids_limit: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FunctionLabel {
    app: String,
    function: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn start_histogram() -> Histogram {
    // 10 ms .. about 80 s.
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

/// The driver's metric families: container starts, and how long a container took from
/// create to an open listener, by function.
#[derive(Debug, Clone)]
pub struct DockerMetrics {
    starts: Family<FunctionLabel, Counter>,
    start_failures: Family<FunctionLabel, Counter>,
    start_seconds: HistogramFamily<FunctionLabel>,
    /// The functions with series of their own, at most [`MAX_FUNCTION_SERIES`].
    labelled: Arc<std::sync::Mutex<std::collections::HashSet<FunctionLabel>>>,
}

/// Most functions with series of their own in the container metrics; the starts of others
/// are counted together, with app and function empty: no call names one so (a name of
/// `_other`, the first choice, could be a function's), and Prometheus reads an empty
/// label as one not set. The names come from the calls the LBs send
/// (every function of the catalog over the runner's life, or names made up by a peer with
/// a node certificate), and a series is never removed.
const MAX_FUNCTION_SERIES: usize = 1024;

impl DockerMetrics {
    /// Creates the families and registers them in `registry` (once per registry).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = DockerMetrics {
            starts: Family::default(),
            start_failures: Family::default(),
            start_seconds: Family::new_with_constructor(start_histogram),
            labelled: Arc::default(),
        };
        registry.register(
            "fn_runner_container_starts",
            "Function containers started and answering, by function",
            metrics.starts.clone(),
        );
        registry.register(
            "fn_runner_container_start_failures",
            "Function containers that could not be started (pull, create, start or listener), by function",
            metrics.start_failures.clone(),
        );
        registry.register_with_unit(
            "fn_runner_container_start",
            "Time from creating a function container to its open listener, by function",
            Unit::Seconds,
            metrics.start_seconds.clone(),
        );
        metrics
    }

    fn started(&self, spec: &InstanceSpec, took: Duration) {
        let label = self.label(spec);
        self.start_seconds
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        self.starts.get_or_create(&label).inc();
    }

    fn failed(&self, spec: &InstanceSpec) {
        self.start_failures.get_or_create(&self.label(spec)).inc();
    }

    /// The function's label, or the empty one once [`MAX_FUNCTION_SERIES`] functions have
    /// one, or for names no catalog accepts ([`fn_protocol::valid_name`]): an honest LB
    /// sends its catalog's names, and the wire allows 256 bytes of almost anything, which
    /// a peer making names up could turn into scrapes of megabytes.
    fn label(&self, spec: &InstanceSpec) -> FunctionLabel {
        if !fn_protocol::valid_name(&spec.app) || !fn_protocol::valid_name(&spec.function) {
            return FunctionLabel {
                app: String::new(),
                function: String::new(),
            };
        }
        let label = FunctionLabel {
            app: spec.app.clone(),
            function: spec.function.clone(),
        };
        let mut labelled = self
            .labelled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if labelled.contains(&label) {
            return label;
        }
        if labelled.len() < MAX_FUNCTION_SERIES {
            labelled.insert(label.clone());
            return label;
        }
        FunctionLabel {
            app: String::new(),
            function: String::new(),
        }
    }
}

/// Whether a failed start counts against the function in
/// `fn_runner_container_start_failures_total`: not when the runner itself was out of
/// descriptors or memory ([`DriverError::Runner`]).
fn is_the_functions(error: &DriverError) -> bool {
    !matches!(error, DriverError::Runner(_))
}

/// Runs function instances as containers. See the module docs.
#[derive(Debug)]
pub struct DockerDriver {
    docker: Docker,
    config: DockerDriverConfig,
    /// Canonical iofs root.
    iofs_root: PathBuf,
    /// Whether instance directories can be given to the container user (the runner is root).
    chown: bool,
    metrics: DockerMetrics,
    /// Distinguishes this run's instance ids from an earlier run's.
    id_prefix: String,
    next_id: AtomicU64,
    /// One pull at a time per image, so that a burst of cold calls to a new image pulls it
    /// once, while other images' pulls go on.
    pulls: PullLocks,
    /// The engine's warnings about containers it made, each logged once.
    warned: std::sync::Mutex<HashSet<String>>,
    /// Cancelled as the runner stops ([`Driver::shutdown`]): no start begins, starts under
    /// way end, and every container's watcher removes it (each watcher's kill token is a
    /// child of this one).
    stopping: CancellationToken,
    /// Starts, watchers and background removals, for [`Driver::shutdown`] to wait for: a
    /// runner that exited while they ran left their containers running.
    tasks: TaskTracker,
}

impl DockerDriver {
    /// Reaches the engine (`DOCKER_HOST`, else the local socket), prepares the iofs root and
    /// removes what an earlier run of this runner left behind.
    ///
    /// # Errors
    /// A message saying why image functions cannot run here: no engine answers, or the iofs
    /// root cannot be made.
    pub async fn connect(
        config: DockerDriverConfig,
        metrics: DockerMetrics,
    ) -> Result<Self, String> {
        let docker = fn_docker::connect().await?;
        Self::with_engine(docker, config, metrics).await
    }

    /// [`DockerDriver::connect`] with an engine client already made.
    async fn with_engine(
        docker: Docker,
        config: DockerDriverConfig,
        metrics: DockerMetrics,
    ) -> Result<Self, String> {
        let iofs_root = prepare_iofs_root(&config.iofs_root)?;
        let chown = nix::unistd::Uid::effective().is_root();
        if !chown {
            tracing::warn!(
                iofs = %iofs_root.display(),
                "the runner is not root: instance directories of function containers are \
                 open to every local user (mode 0777), since they cannot be given to the \
                 container's user"
            );
        }
        let driver = DockerDriver {
            docker,
            config,
            iofs_root,
            chown,
            metrics,
            id_prefix: format!("{:08x}", super::id_seed()),
            next_id: AtomicU64::new(1),
            pulls: PullLocks::default(),
            warned: std::sync::Mutex::default(),
            stopping: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        driver.remove_leftovers().await;
        Ok(driver)
    }

    /// The engine this driver uses (tests inspect containers with it).
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Removes the containers labelled with this runner's id, and their instance
    /// directories: what an earlier run left when it was killed. Other runners' containers
    /// and directories (they may share the engine and the iofs root) are left alone. They
    /// are listed now, before this run starts any, and removed in the background: many
    /// leftovers must not hold up the runner's start (it waits a bounded time for the
    /// engine, then serves without image functions).
    async fn remove_leftovers(&self) {
        let containers = match self.own_containers().await {
            Ok(containers) => containers,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for leftover function containers");
                return;
            }
        };
        if containers.is_empty() {
            return;
        }
        let docker = self.docker.clone();
        let iofs_root = self.iofs_root.clone();
        let runner_id = self.config.runner_id.clone();
        tokio::spawn(async move {
            let removals = containers.into_iter().map(|container| {
                let (docker, iofs_root, runner_id) = (&docker, &iofs_root, &runner_id);
                async move { remove_leftover(docker, iofs_root, runner_id, container).await }
            });
            futures::future::join_all(removals).await;
        });
    }

    /// The containers labelled with this runner's id, running or not.
    async fn own_containers(&self) -> Result<Vec<bollard::models::ContainerSummary>, EngineError> {
        let filters = fn_docker::label_filter(LABEL_RUNNER, &self.config.runner_id);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        self.docker
            .list_containers(Some(options))
            .await
            .map_err(|e| classify(e, "listing containers"))
    }

    /// Makes sure `image` is on the engine, pulling it when the policy allows.
    async fn ensure_image(&self, image: &str) -> Result<(), DriverError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(e) => match classify(e, image) {
                EngineError::NotFound(_) => {}
                EngineError::Failed(e) => {
                    return Err(DriverError::Start(format!("cannot inspect image {e}")));
                }
            },
        }
        if self.config.pull == PullPolicy::Never {
            return Err(DriverError::Start(format!(
                "image {image:?} is not on the engine and FN_DOCKER_PULL=never: load or build \
                 it there first"
            )));
        }
        let lock = self.pulls.of(image);
        pull_once(&lock, self.config.pull_timeout, || self.pull(image))
            .await
            .map_err(DriverError::Start)
    }

    /// Pulls `image` unless it arrived meanwhile; the error says what failed.
    async fn pull(&self, image: &str) -> Result<(), String> {
        if self.docker.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        tracing::info!(image, "pulling a function image");
        // A reference with neither tag nor digest pulls `latest`, as `docker pull` does: the
        // Engine API pulls every tag of the repository for a bare name.
        let options = match untagged(image) {
            true => CreateImageOptionsBuilder::default()
                .from_image(image)
                .tag("latest")
                .build(),
            false => CreateImageOptionsBuilder::default()
                .from_image(image)
                .build(),
        };
        let pull = async {
            let mut progress = self.docker.create_image(Some(options), None, None);
            while let Some(item) = progress.next().await {
                item.map_err(|e| match e {
                    BollardError::DockerStreamError { error } => error,
                    other => classify(other, image).to_string(),
                })?;
            }
            Ok::<(), String>(())
        };
        match tokio::time::timeout(self.config.pull_timeout, pull).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!(
                "image {image:?} is not on the engine and pulling it failed: {e}"
            )),
            Err(_) => Err(format!(
                "image {image:?} is not on the engine and pulling it took longer than \
                 FN_DOCKER_PULL_TIMEOUT ({:?})",
                self.config.pull_timeout
            )),
        }
    }

    /// Starts a container of `spec` and waits until its listener is open. Like
    /// [`Driver::start`], but returns the concrete instance.
    ///
    /// # Errors
    /// [`DriverError::Invalid`] when the spec has no image or a bad config;
    /// [`DriverError::Start`] when the image cannot be had, the container cannot be created
    /// or started, or it does not open its listener within `start_timeout` (it is removed).
    pub async fn start_container(
        &self,
        spec: &InstanceSpec,
        call_id: &str,
        start_timeout: Duration,
    ) -> Result<DockerInstance, DriverError> {
        self.check(spec)?;
        let image = spec.image.as_deref().unwrap_or_default();
        let result = self
            .start_checked(spec, image, call_id, start_timeout)
            .await;
        if let Err(e) = &result
            && is_the_functions(e)
        {
            self.metrics.failed(spec);
        }
        result
    }

    async fn start_checked(
        &self,
        spec: &InstanceSpec,
        image: &str,
        call_id: &str,
        start_timeout: Duration,
    ) -> Result<DockerInstance, DriverError> {
        tokio::select! {
            ensured = self.ensure_image(image) => ensured?,
            () = self.stopping.cancelled() => return Err(shutting_down()),
        }
        let began = Instant::now();
        let id = format!(
            "{}-{}",
            self.id_prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let dir = self.iofs_root.join(&id);
        self.create_instance_dir(&dir)?;

        let name = container_name(&spec.app, &spec.function, &id);
        let body = create_body(&self.config, spec, image, &dir, &id);
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let container = match self.docker.create_container(Some(options), body).await {
            Ok(created) => {
                self.engine_warned(&created.warnings, image);
                created.id
            }
            Err(e) => {
                // No answer (a timeout, a broken connection) may hide a container the engine
                // makes all the same, perhaps after a removal would find none: remove it by
                // name now and a few times more, in the background. An answer means none.
                if !matches!(e, BollardError::DockerResponseServerError { .. }) {
                    self.remove_in_background(
                        name.clone(),
                        true,
                        "a container whose creation got no answer",
                    );
                }
                remove_instance_dir(&dir);
                // A 404 here is the image's (gone since it was checked), not the container's.
                return Err(DriverError::Start(format!(
                    "cannot create a container of image {image:?}: {}",
                    classify(e, image)
                )));
            }
        };
        if let Err(e) = self.docker.start_container(&container, None).await {
            // A 404 here is of something the container needs (the engine says which).
            let e = fn_docker::classify_action(e, &name);
            // Retried: an engine too slow to start it may be too slow to remove it at once,
            // and a container left running would hold memory the pool no longer counts.
            self.remove_in_background(container, false, "a container that did not start");
            remove_instance_dir(&dir);
            return Err(DriverError::Start(format!(
                "cannot start a container of image {image:?}: {e}"
            )));
        }

        let labels = Arc::new(Labels::new(
            spec.app.clone(),
            spec.function.clone(),
            id.clone(),
            call_id,
        ));
        let instance = DockerInstance::watch(
            self,
            container,
            labels,
            dir,
            spec.concurrency,
            spec.memory_mb,
        );
        // A runner stopping ends the start: its watcher removes the container.
        let listening = tokio::select! {
            listening = wait_for_listener(&instance.client, start_timeout) => listening,
            () = instance.shared.kill.cancelled() => Err(shutting_down()),
        };
        if let Err(e) = listening {
            instance.kill();
            return Err(e);
        }
        self.metrics.started(spec, began.elapsed());
        tracing::debug!(
            instance = %instance.id(),
            container = %instance.container(),
            image,
            after = ?began.elapsed(),
            "function container started"
        );
        Ok(instance)
    }

    /// Creates the instance directory: mode 0700 and owned by the container's user when the
    /// runner is root, else mode 0777 (see [`DockerDriver::connect`]).
    fn create_instance_dir(&self, dir: &Path) -> Result<(), DriverError> {
        let fail = |e: std::io::Error| {
            remove_instance_dir(dir);
            DriverError::Start(format!(
                "cannot create instance directory {}: {e}",
                dir.display()
            ))
        };
        make_in_root(&self.config.iofs_root, &self.iofs_root, dir).map_err(|e| match e {
            InRoot::Io(e) => fail(e),
            InRoot::Root(why) => DriverError::Start(why),
        })?;
        if self.chown {
            let user = self.config.user;
            std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid)).map_err(fail)?;
        } else {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).map_err(fail)?;
        }
        Ok(())
    }
}

impl DockerDriver {
    /// Logs, once each, what the engine said about a container it made: it drops limits the
    /// host cannot enforce ("PIDs limit discarded", "Memory limited without swap") and says
    /// so only there, so that functions would otherwise run without them unknown.
    fn engine_warned(&self, warnings: &[String], image: &str) {
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for warning in warnings {
            if warned.len() < 64 && warned.insert(warning.clone()) {
                tracing::warn!(%image, warning = %warning, "the Docker engine changed a function container's settings: function containers run without what it dropped (said once)");
            }
        }
    }
}

impl Driver for DockerDriver {
    fn check(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        if spec.image.as_deref().is_none_or(str::is_empty) {
            return Err(DriverError::Invalid(format!(
                "function {}/{} has no image for the docker driver",
                spec.app, spec.function
            )));
        }
        check_config(&spec.config)
    }

    fn start(
        &self,
        spec: &InstanceSpec,
        call_id: &str,
        start_timeout: Duration,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, DriverError>> {
        let spec = spec.clone();
        let call_id = call_id.to_owned();
        if self.stopping.is_cancelled() {
            return Box::pin(std::future::ready(Err(shutting_down())));
        }
        // Tracked: a shutdown waits for it (it may have made a container).
        Box::pin(self.tasks.track_future(async move {
            let instance = self.start_container(&spec, &call_id, start_timeout).await?;
            Ok(Box::new(instance) as Box<dyn Instance>)
        }))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.stop())
    }
}

/// The error of a start the runner's shutdown ended, or refused.
fn shutting_down() -> DriverError {
    DriverError::Start("the runner is shutting down".into())
}

impl DockerDriver {
    /// See [`Driver::shutdown`]: refuses new starts, ends those under way and has every
    /// container's watcher remove it, waits for them and the background removals at most
    /// [`SHUTDOWN_WAIT`], then removes by label whatever of this runner's is left (one
    /// removal each: what the engine keeps, the runner's next start removes).
    async fn stop(&self) {
        self.stopping.cancel();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_WAIT, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.tasks.len(),
                "function container starts or removals still under way after \
                 {SHUTDOWN_WAIT:?}; removing this runner's containers by label"
            );
        }
        self.sweep().await;
    }

    /// Removes every container labelled with this runner's id, then this run's instance
    /// directories, once none is left.
    async fn sweep(&self) {
        let containers = match self.own_containers().await {
            Ok(containers) => containers,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot look for function containers left as the runner stops; its next \
                     start removes them"
                );
                return;
            }
        };
        let removals = containers
            .into_iter()
            .filter_map(|c| c.id)
            .map(|id| async move {
                let removal = remove_container(&self.docker, &id).await;
                if let Err(e) = &removal {
                    tracing::warn!(
                        container = %id,
                        error = %e,
                        "cannot remove a function container as the runner stops; its next start \
                         removes it"
                    );
                }
                matches!(removal, Ok(Removal::Gone))
            });
        let gone = futures::future::join_all(removals).await;
        if gone.iter().all(|gone| *gone) {
            self.remove_own_dirs().await;
        }
    }

    /// Removes the instance directories this run made (named `<id prefix>-<n>`, perhaps
    /// set aside), once none of its containers is left: those whose watcher did not get to
    /// it.
    async fn remove_own_dirs(&self) {
        let Ok(entries) = std::fs::read_dir(&self.iofs_root) else {
            return;
        };
        let own = format!("{}-", self.id_prefix);
        let removals: Vec<_> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&own)))
            .map(|e| remove_instance_dir(&e.path()))
            .collect();
        futures::future::join_all(removals).await;
    }

    /// Removes container `name` in the background until the engine says it is gone, at
    /// pauses of 0, 5, 30 and 120 s (the runner's next start removes one still there after
    /// them). `every` keeps removing after a success: a creation that got no answer may make
    /// the container after a removal found none. A shutdown cuts the pauses short: one
    /// removal more, then [`DockerDriver::sweep`] takes over.
    fn remove_in_background(&self, name: String, every: bool, what: &'static str) {
        let docker = self.docker.clone();
        let stopping = self.stopping.clone();
        self.tasks.spawn(async move {
            for pause in [0, 5, 30, 120] {
                let stopped = tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(pause)) => false,
                    () = stopping.cancelled() => true,
                };
                match remove_container(&docker, &name).await {
                    Ok(Removal::Gone) if !every => return,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(
                            container = %name,
                            error = %e,
                            "cannot remove {what}; retrying, and the runner's next start \
                             removes it"
                        );
                    }
                }
                if stopped {
                    return;
                }
            }
        });
    }
}

/// State shared by the instance handle and its watcher task.
#[derive(Debug)]
struct Shared {
    liveness: Arc<Liveness>,
    /// Asks the watcher to remove the container.
    kill: CancellationToken,
    /// Cancelled when the container and the directory are gone.
    gone: CancellationToken,
    dir: PathBuf,
}

/// A function instance running as a container. Removed when dropped.
#[derive(Debug)]
pub struct DockerInstance {
    id: String,
    container: String,
    shared: Arc<Shared>,
    client: SocketClient,
    /// What its output is logged under.
    labels: Arc<Labels>,
}

impl DockerInstance {
    /// Takes over a started container: follows its output and starts its watcher.
    fn watch(
        driver: &DockerDriver,
        container: String,
        labels: Arc<Labels>,
        dir: PathBuf,
        concurrency: u32,
        memory_mb: u64,
    ) -> Self {
        let (liveness, ended_tx) = Liveness::new(CONTAINER_END_GRACE);
        let shared = Arc::new(Shared {
            liveness: liveness.clone(),
            // Cancelled by the runner's shutdown too.
            kill: driver.stopping.child_token(),
            gone: CancellationToken::new(),
            dir: dir.clone(),
        });
        let docker = driver.docker.clone();
        tokio::spawn(follow_output(
            docker.clone(),
            container.clone(),
            labels.clone(),
        ));
        driver.tasks.spawn(watch_container(
            docker,
            container.clone(),
            memory_mb,
            ended_tx,
            shared.clone(),
        ));
        DockerInstance {
            id: labels.instance.clone(),
            container,
            shared,
            client: SocketClient::new(
                dir.join(LISTENER_NAME),
                labels.instance.as_str().into(),
                liveness,
                concurrency,
            ),
            labels,
        }
    }

    /// The instance id (also the name of its directory).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's id on the engine.
    pub fn container(&self) -> &str {
        &self.container
    }
}

impl Instance for DockerInstance {
    fn call(
        &self,
        request: FunctionRequest,
        body: BodyStream<std::io::Error>,
    ) -> BoxFuture<'_, Result<FunctionResponse, DriverError>> {
        self.labels.took_call(&request.call_id);
        Box::pin(self.client.send(request, body))
    }

    fn is_alive(&self) -> bool {
        self.shared.liveness.is_alive()
    }

    fn kill(&self) {
        if self.shared.liveness.mark_killed() {
            return;
        }
        self.shared.kill.cancel();
        // Nothing connects to a dying instance; the watcher removes the directory once the
        // container is gone (removed now, while the function can still write into it, its
        // tree had two removers).
        set_instance_dir_aside(&self.shared.dir);
    }

    fn pid(&self) -> Option<u32> {
        None
    }

    fn wait_gone(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.shared.gone.cancelled())
    }
}

impl Drop for DockerInstance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for the container to stop or for the runner to kill it; says how it ended, then
/// removes the container and the instance directory.
async fn watch_container(
    docker: Docker,
    container: String,
    memory_mb: u64,
    ended_tx: watch::Sender<Option<String>>,
    shared: Arc<Shared>,
) {
    let ended = match wait_stopped(&docker, &container, &shared.kill).await {
        None => "killed by the runner".to_owned(),
        Some(Ok(code)) => describe_exit(&docker, &container, code, memory_mb).await,
        Some(Err(lost)) => lost,
    };
    tracing::debug!(%container, %ended, "function container ended");
    ended_tx.send_replace(Some(ended));
    // Until the engine says it is gone: a removal that failed once (the engine restarting,
    // a 500) left the container running, untracked, until the runner's next start.
    let mut backoff = fn_lifecycle::retry::Backoff::new(REMOVE_RETRY, REMOVE_RETRY_MAX);
    let mut warned = false;
    loop {
        let failure =
            match tokio::time::timeout(REMOVE_TIMEOUT, remove_container(&docker, &container)).await
            {
                Ok(Ok(Removal::Gone)) => break,
                // An earlier attempt given up on may still be at it, and may fail: asked
                // again until the engine says the container is gone.
                Ok(Ok(Removal::UnderWay)) => "the engine says a removal is under way".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {REMOVE_TIMEOUT:?}"),
            };
        if warned {
            tracing::debug!(%container, error = %failure, "cannot remove a function container yet");
        } else {
            tracing::warn!(%container, error = %failure, "cannot remove a function container; retrying until the engine does");
            warned = true;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    if warned {
        tracing::info!(%container, "function container removed after all");
    }
    let _ = remove_instance_dir(&shared.dir).await;
    shared.gone.cancel();
}

/// Waits for the container to stop: its exit status; `None` once `kill` is cancelled;
/// `Err` when the engine says it is gone, or its answers broke off for
/// [`WAIT_LOST_AFTER`]. A wait whose answer broke off (a restarting engine, a proxy that
/// cuts long requests) is asked again: for a container that stopped meanwhile, the engine
/// answers at once (`condition=not-running`).
async fn wait_stopped(
    docker: &Docker,
    container: &str,
    kill: &CancellationToken,
) -> Option<Result<i64, String>> {
    let options = WaitContainerOptionsBuilder::default()
        .condition("not-running")
        .build();
    let mut backoff = fn_lifecycle::retry::Backoff::new(WAIT_RETRY, WAIT_RETRY_MAX);
    let mut unsure_since: Option<Instant> = None;
    loop {
        let asked = Instant::now();
        let mut wait = docker.wait_container(container, Some(options.clone()));
        let outcome = tokio::select! {
            outcome = wait.next() => outcome,
            () = kill.cancelled() => return None,
        };
        let broke = match outcome {
            Some(Ok(answer)) => return Some(Ok(answer.status_code)),
            Some(Err(BollardError::DockerContainerWaitError { code, .. })) => {
                return Some(Ok(code));
            }
            Some(Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            })) => {
                return Some(Err(
                    "the container is gone from the engine (removed by someone else?)".into(),
                ));
            }
            Some(Err(e)) => e.to_string(),
            None => "the engine's answer ended without a status".to_owned(),
        };
        if asked.elapsed() >= WAIT_HELD {
            // It had reached the engine: the time without a watch starts again.
            unsure_since = None;
            backoff.reset();
        }
        let since = *unsure_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= WAIT_LOST_AFTER {
            return Some(Err(format!(
                "the runner lost track of the container: the engine did not answer its \
                 watch for {WAIT_LOST_AFTER:?}: {broke}"
            )));
        }
        tracing::debug!(
            %container,
            error = %broke,
            "the watch of a function container broke off; asking again"
        );
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = kill.cancelled() => return None,
        }
    }
}

/// How a stopped container ended: killed out of memory, or its exit status.
async fn describe_exit(docker: &Docker, container: &str, code: i64, memory_mb: u64) -> String {
    let oom = docker
        .inspect_container(container, None::<InspectContainerOptions>)
        .await
        .ok()
        .and_then(|c| c.state)
        .and_then(|s| s.oom_killed)
        .unwrap_or(false);
    if oom {
        format!("killed for using more than its memory limit ({memory_mb} MB)")
    } else if code > 128 && code < 128 + 65 {
        format!("killed by signal {}", code - 128)
    } else {
        format!("exited with status {code}")
    }
}

/// Removes one container an earlier run of this runner left, and its instance directory.
async fn remove_leftover(
    docker: &Docker,
    iofs_root: &Path,
    runner_id: &str,
    container: bollard::models::ContainerSummary,
) {
    let Some(id) = container.id else { return };
    // A removal the engine has under way (the earlier run's, cut short) is waited for: once
    // it is done the container is no longer listed, and its directory would stay for ever.
    let mut removal = remove_container(docker, &id).await;
    for pause in [1, 5, 30, 120] {
        if !matches!(removal, Ok(Removal::UnderWay)) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(pause)).await;
        removal = remove_container(docker, &id).await;
    }
    match removal {
        Ok(Removal::Gone) => tracing::info!(
            container = %id,
            runner_id,
            "removed a function container an earlier run of this runner left"
        ),
        Ok(Removal::UnderWay) => {
            // Its directory stays: the container may still run, and its socket with it.
            tracing::warn!(container = %id, "a leftover function container is still being removed by the engine after 2.5 minutes; its directory stays");
            return;
        }
        Err(e) => {
            // Its directory stays too: the container may still run, and its socket with it.
            tracing::warn!(container = %id, error = %e, "cannot remove a leftover function container; the runner's next start tries again");
            return;
        }
    }
    let instance = container
        .labels
        .as_ref()
        .and_then(|labels| labels.get(LABEL_INSTANCE));
    // An instance id is a file name this driver made; anything else is not followed.
    if let Some(instance) = instance
        && !instance.is_empty()
        && !instance.contains('/')
        && !instance.starts_with('.')
    {
        remove_instance_dir(&iofs_root.join(instance));
    }
}

/// What a removal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// The container is gone (now, or it already was).
    Gone,
    /// Another removal of it is under way (the engine's 409), which may yet fail.
    UnderWay,
}

/// Removes a container by force (killing it if it runs); one already gone is fine.
async fn remove_container(docker: &Docker, container: &str) -> Result<Removal, EngineError> {
    let options = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(container, Some(options)).await {
        Ok(()) => Ok(Removal::Gone),
        Err(e) => match classify(e, container) {
            EngineError::NotFound(_) => Ok(Removal::Gone),
            EngineError::Failed(text) if text.contains(" 409: ") => Ok(Removal::UnderWay),
            other => Err(other),
        },
    }
}

/// Logs the container's output line by line, as the process driver logs a child's.
async fn follow_output(docker: Docker, container: String, labels: Arc<Labels>) {
    let options = LogsOptionsBuilder::default()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .build();
    let mut logs = docker.logs(&container, Some(options));
    let mut stdout = LineSplitter::new(MAX_LINE);
    let mut stderr = LineSplitter::new(MAX_LINE);
    // Both streams come in one: the bound is on the two together.
    let mut rate = output::ReadRate::new();
    while let Some(Ok(chunk)) = logs.next().await {
        rate.read(chunk.as_ref().len()).await;
        match chunk {
            bollard::container::LogOutput::StdErr { message } => {
                stderr.push(&message, |line, cut| {
                    output::log_line(&labels, OutputStream::Stderr, line, cut);
                });
            }
            bollard::container::LogOutput::StdOut { message }
            | bollard::container::LogOutput::Console { message } => {
                stdout.push(&message, |line, cut| {
                    output::log_line(&labels, OutputStream::Stdout, line, cut);
                });
            }
            bollard::container::LogOutput::StdIn { .. } => {}
        }
    }
    stdout.finish(|line, cut| output::log_line(&labels, OutputStream::Stdout, line, cut));
    stderr.finish(|line, cut| output::log_line(&labels, OutputStream::Stderr, line, cut));
    labels.flush_dropped();
}

/// Why an instance directory was not made.
#[derive(Debug)]
enum InRoot {
    Io(std::io::Error),
    /// The iofs root was gone and could not be made again as it was at start.
    Root(String),
}

/// Makes instance directory `dir` in the iofs root (`root`, canonical; `configured`, as
/// `FN_DOCKER_IOFS_DIR` names it). A root that has gone since the runner started (a `/tmp`
/// cleaner removes a directory left empty long enough) is made again, checked as at start,
/// rather than failing every later start of an image function.
fn make_in_root(configured: &Path, root: &Path, dir: &Path) -> Result<(), InRoot> {
    let make = || std::fs::DirBuilder::new().mode(0o700).create(dir);
    match make() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !root.exists() => {
            let again = prepare_iofs_root(configured).map_err(InRoot::Root)?;
            if again != root {
                return Err(InRoot::Root(format!(
                    "FN_DOCKER_IOFS_DIR {}: now {}, not {} as at start; restart the runner",
                    configured.display(),
                    again.display(),
                    root.display()
                )));
            }
            tracing::warn!(iofs = %root.display(), "the iofs root was removed while the runner ran (a /tmp cleaner?); made again");
            make().map_err(InRoot::Io)
        }
        // The root is there but was removed (a bind of a host directory that a cleaner on
        // the host removed): nothing can be made in it any more.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && std::fs::metadata(root)
                    .is_ok_and(|m| std::os::unix::fs::MetadataExt::nlink(&m) == 0) =>
        {
            Err(InRoot::Root(format!(
                "FN_DOCKER_IOFS_DIR {}: removed while the runner ran (a bind of a host \
                 directory a cleaner removed?): keep the directory out of the cleaner's reach \
                 and restart the runner",
                configured.display()
            )))
        }
        made => made.map_err(InRoot::Io),
    }
}

/// The Engine API body of an instance's container. See the module docs for what each
/// setting is for.
fn create_body(
    config: &DockerDriverConfig,
    spec: &InstanceSpec,
    image: &str,
    dir: &Path,
    instance: &str,
) -> ContainerCreateBody {
    let memory = i64::try_from(spec.memory_mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
    let host_config = HostConfig {
        network_mode: Some(config.network.clone()),
        // A mount, not a bind string: a ':' or ',' in the path would be read as a separator.
        mounts: Some(vec![Mount {
            typ: Some(MountType::BIND),
            source: Some(dir.to_string_lossy().into_owned()),
            target: Some(IOFS_MOUNT.to_owned()),
            ..Mount::default()
        }]),
        readonly_rootfs: Some(true),
        tmpfs: Some(HashMap::from([(
            "/tmp".to_owned(),
            "rw,nosuid,nodev,mode=1777".to_owned(),
        )])),
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
        pids_limit: Some(config.pids_limit),
        memory: Some(memory),
        memory_swap: Some(memory),
        cpu_shares: Some(cpu_shares(spec.memory_mb)),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".to_owned()),
            config: Some(HashMap::from([
                ("max-size".to_owned(), "1m".to_owned()),
                ("max-file".to_owned(), "2".to_owned()),
            ])),
        }),
        ..HostConfig::default()
    };
    let labels = HashMap::from([
        (LABEL_ROLE.to_owned(), ROLE_FUNCTION.to_owned()),
        (LABEL_RUNNER.to_owned(), config.runner_id.clone()),
        (LABEL_APP.to_owned(), spec.app.clone()),
        (LABEL_FUNCTION.to_owned(), spec.function.clone()),
        (LABEL_INSTANCE.to_owned(), instance.to_owned()),
    ]);
    ContainerCreateBody {
        image: Some(image.to_owned()),
        env: Some(environment(spec)),
        labels: Some(labels),
        user: Some(format!("{}:{}", config.user.uid, config.user.gid)),
        host_config: Some(host_config),
        ..ContainerCreateBody::default()
    }
}

/// `KEY=value` pairs: the function's config, then the contract's variables, which win.
fn environment(spec: &InstanceSpec) -> Vec<String> {
    let mut env: BTreeMap<&str, String> = spec
        .config
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    env.insert("FN_FORMAT", "http-stream".into());
    env.insert("FN_LISTENER", LISTENER.into());
    env.insert("FN_APP_NAME", spec.app.clone());
    env.insert("FN_FN_NAME", spec.function.clone());
    env.insert("FN_MEMORY", spec.memory_mb.to_string());
    env.insert("FN_TYPE", "sync".into());
    for (name, value) in spec.default_ids() {
        env.insert(name, value);
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// CPU shares in proportion to memory: 1024 (Docker's default weight) per GiB, at least 2
/// (the engine's minimum).
fn cpu_shares(memory_mb: u64) -> i64 {
    i64::try_from(memory_mb)
        .unwrap_or(i64::MAX)
        .clamp(2, 262_144)
}

/// `fn-<app>-<function>-<instance>`, with what Docker does not allow in names replaced.
fn container_name(app: &str, function: &str, instance: &str) -> String {
    let clean = |text: &str| -> String {
        text.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let mut head = format!("fn-{}-{}", clean(app), clean(function));
    let room = MAX_NAME_LEN.saturating_sub(instance.len() + 1);
    if head.len() > room {
        head.truncate(room);
    }
    format!("{head}-{instance}")
}

/// Creates the iofs root (mode 0711: containers' users reach their own directory, nobody
/// lists the others) and returns its canonical path. One that exists must be a directory
/// of the runner's own user, not a symlink: instance directories are made and handed to
/// function users in it by path, and whoever owns it could swap one for a link to any
/// directory between the two steps (and have it chowned, and mounted into a container).
fn prepare_iofs_root(root: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt as _;
    let fail = |what: &str, e: std::io::Error| {
        format!("FN_DOCKER_IOFS_DIR {}: {what}: {e}", root.display())
    };
    if let Err(e) = std::fs::symlink_metadata(root) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(fail("cannot read", e));
        }
        // Made here, or by someone else since the look above: checked below either way.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(root)
            .map_err(|e| fail("cannot create", e))?;
    }
    match std::fs::symlink_metadata(root) {
        Err(e) => return Err(fail("cannot read", e)),
        Ok(meta) => {
            let own = nix::unistd::geteuid().as_raw();
            if !meta.is_dir() {
                return Err(format!(
                    "FN_DOCKER_IOFS_DIR {}: not a directory (a symlink?): point it at a \
                     directory of the runner's own",
                    root.display()
                ));
            }
            if meta.uid() != own {
                return Err(format!(
                    "FN_DOCKER_IOFS_DIR {}: owned by uid {}, not the runner's ({own}): \
                     another user could swap the instance directories made in it; remove it \
                     or point FN_DOCKER_IOFS_DIR at a directory of the runner's own",
                    root.display(),
                    meta.uid()
                ));
            }
        }
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| fail("cannot set mode 0711", e))?;
    let canonical = std::fs::canonicalize(root).map_err(|e| fail("cannot resolve", e))?;
    // `<root>/<8 hex>-<counter>/lsnr.sock` must fit a unix socket path (107 bytes).
    let room = 107 - (1 + 8 + 1 + 20 + 1 + LISTENER_NAME.len());
    let len = canonical.as_os_str().len();
    if len > room {
        return Err(format!(
            "FN_DOCKER_IOFS_DIR {}: too long for unix socket paths: {len} bytes, at most \
             {room} allowed",
            root.display()
        ));
    }
    Ok(canonical)
}

/// Whether an image reference names neither a tag nor a digest (`repo`, `host:5000/repo`).
fn untagged(image: &str) -> bool {
    let last = image.rsplit('/').next().unwrap_or(image);
    !last.contains(':') && !image.contains('@')
}

#[cfg(test)]
mod engine_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// Past [`MAX_FUNCTION_SERIES`] functions, starts are counted under empty names: the
    /// series stay bounded however many names the calls bring, and a function named
    /// `_other` keeps a series of its own.
    #[test]
    fn container_metrics_hold_a_bounded_number_of_functions() {
        let mut registry = Registry::default();
        let metrics = DockerMetrics::register(&mut registry);
        let spec = |name: String| InstanceSpec {
            app: "a".into(),
            function: name,
            command: Vec::new(),
            image: Some("i:1".into()),
            memory_mb: 64,
            concurrency: 1,
            idle_timeout: Duration::from_secs(30),
            config: std::collections::BTreeMap::new(),
        };
        let other = |name: &str| InstanceSpec {
            app: "_other".into(),
            ..spec(name.into())
        };
        metrics.failed(&other("_other"));
        for i in 0..MAX_FUNCTION_SERIES + 500 {
            metrics.failed(&spec(format!("f{i}")));
        }
        metrics.failed(&other("_other"));
        metrics.failed(&spec("f0".into()));
        // A name no catalog accepts (the wire takes 256 bytes of almost anything).
        metrics.failed(&spec("f 0 \"é\"".repeat(20)));
        let text = fn_lifecycle::metrics::encode(&registry).expect("encoded");
        let series = text
            .lines()
            .filter(|l| l.starts_with("fn_runner_container_start_failures_total{"))
            .count();
        assert_eq!(series, MAX_FUNCTION_SERIES + 1, "one for the rest");
        assert!(
            text.contains(r#"fn_runner_container_start_failures_total{app="",function=""} 502"#),
            "the rest counted together, and the names no catalog accepts"
        );
        assert!(
            text.contains(
                r#"fn_runner_container_start_failures_total{app="_other",function="_other"} 2"#
            ),
            "a function named _other counted alone"
        );
        assert!(
            text.contains(r#"fn_runner_container_start_failures_total{app="a",function="f0"} 2"#),
            "a function with a series keeps it"
        );
    }

    /// A start the runner's own exhaustion failed is not the function's failure.
    #[test]
    fn only_the_functions_own_start_failures_are_counted_against_it() {
        assert!(is_the_functions(&DriverError::Start("no listener".into())));
        assert!(is_the_functions(&DriverError::Function(
            "pull failed".into()
        )));
        assert!(!is_the_functions(&DriverError::Runner(
            "cannot look for the listener: Too many open files".into()
        )));
    }

    /// The container's environment: the config, then the contract's variables, which win;
    /// Fn's ids default to the app's name and `app/name` unless the config sets them.
    #[test]
    fn the_environment_is_the_config_under_the_contract_with_the_ids() {
        let spec = |config: &[(&str, &str)]| InstanceSpec {
            app: "shop".into(),
            function: "cart".into(),
            command: Vec::new(),
            image: Some("cart:1".into()),
            memory_mb: 128,
            concurrency: 1,
            idle_timeout: Duration::from_secs(30),
            config: config
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        let plain = environment(&spec(&[("GREETING", "hi")]));
        for var in [
            "GREETING=hi",
            "FN_APP_NAME=shop",
            "FN_FN_NAME=cart",
            "FN_APP_ID=shop",
            "FN_FN_ID=shop/cart",
            "FN_FORMAT=http-stream",
            "FN_MEMORY=128",
        ] {
            assert!(plain.iter().any(|v| v == var), "{var} in {plain:?}");
        }
        let set = environment(&spec(&[
            ("FN_APP_ID", "01HAPP"),
            ("FN_FN_ID", "01HFN"),
            ("FN_FN_NAME", "other"),
        ]));
        for var in ["FN_APP_ID=01HAPP", "FN_FN_ID=01HFN", "FN_FN_NAME=cart"] {
            assert!(set.iter().any(|v| v == var), "{var} in {set:?}");
        }
        assert_eq!(
            set.iter().filter(|v| v.starts_with("FN_FN_ID=")).count(),
            1,
            "{set:?}"
        );
    }

    /// Calls that waited for a pull that failed get its error: the image is pulled once,
    /// not once per waiting call; a call that comes after tries again; the wait for another
    /// call's pull is bounded.
    #[tokio::test]
    async fn callers_that_waited_for_a_failed_pull_share_its_error() {
        let lock = PullLock::new(None);
        let pulls = std::sync::atomic::AtomicUsize::new(0);
        let failing = || async {
            pulls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err::<(), _>("registry says no".to_owned())
        };
        let wait = Duration::from_secs(5);
        let outcomes =
            futures::future::join_all((0..5).map(|_| pull_once(&lock, wait, failing))).await;
        assert_eq!(
            pulls.load(Ordering::SeqCst),
            1,
            "pulled once for five callers"
        );
        assert!(
            outcomes
                .iter()
                .all(|o| o.as_ref().err().map(String::as_str) == Some("registry says no")),
            "{outcomes:?}"
        );
        assert!(pull_once(&lock, wait, failing).await.is_err());
        assert_eq!(pulls.load(Ordering::SeqCst), 2, "a later call tries again");
        assert_eq!(pull_once(&lock, wait, || async { Ok(()) }).await, Ok(()));

        let held = lock.lock().await;
        let err = pull_once(&lock, Duration::from_millis(20), || async { Ok(()) })
            .await
            .expect_err("the lock is held");
        assert!(
            err.contains("another pull of the image took longer"),
            "{err}"
        );
        drop(held);
    }

    #[tokio::test]
    async fn a_pull_holds_up_calls_for_its_image_only() {
        let locks = PullLocks::default();
        let a = locks.of("a:1");
        let pulling_a = a.lock().await;
        assert!(
            Arc::ptr_eq(&a, &locks.of("a:1")),
            "a second call for the image waits for the same pull"
        );
        assert!(a.try_lock().is_err());
        let b = locks.of("b:1");
        assert!(b.try_lock().is_ok(), "another image is not held up");
        drop(pulling_a);
        drop((a, b));
        // Nobody holds either: a new lock, and the old entries are gone.
        let _c = locks.of("c:1");
        assert_eq!(locks.by_image.lock().expect("lock").len(), 1);
    }

    /// Instance directories are made and chowned by path in the iofs root: one another user
    /// owns, or a symlink, is refused (whoever owns it could swap an instance directory for
    /// a link to any directory); a missing one is made; one of the runner's own gets 0711.
    #[test]
    fn the_iofs_root_must_be_a_directory_of_the_runners_own() {
        use std::os::unix::fs::MetadataExt as _;
        let base = tempfile::tempdir().expect("tempdir");
        let made = base.path().join("iofs");
        let canonical = prepare_iofs_root(&made).expect("made");
        assert_eq!(canonical, std::fs::canonicalize(&made).expect("exists"));
        let mode = std::fs::metadata(&made).expect("meta").mode() & 0o7777;
        assert_eq!(mode, 0o711);

        std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        prepare_iofs_root(&made).expect("its own, loosened: tightened again");
        let mode = std::fs::metadata(&made).expect("meta").mode() & 0o7777;
        assert_eq!(mode, 0o711);

        let link = base.path().join("link");
        std::os::unix::fs::symlink(&made, &link).expect("symlink");
        let err = prepare_iofs_root(&link).expect_err("a symlink");
        assert!(err.contains("not a directory"), "{err}");

        if nix::unistd::geteuid().is_root() {
            let theirs = base.path().join("theirs");
            std::fs::create_dir(&theirs).expect("mkdir");
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
            let err = prepare_iofs_root(&theirs).expect_err("another user's");
            assert!(err.contains("owned by uid 65534"), "{err}");
        }
    }

    /// An iofs root removed while the runner runs (a `/tmp` cleaner) is made again, checked
    /// as at start, for the next instance: every start of an image function failed with "No
    /// such file or directory" until the runner restarted.
    #[test]
    fn an_iofs_root_removed_meanwhile_is_made_again() {
        use std::os::unix::fs::MetadataExt as _;
        let base = tempfile::tempdir().expect("tempdir");
        let configured = base.path().join("iofs");
        let root = prepare_iofs_root(&configured).expect("made");
        make_in_root(&configured, &root, &root.join("a-1")).expect("an instance directory");
        std::fs::remove_dir_all(&root).expect("cleaned away");
        make_in_root(&configured, &root, &root.join("a-2")).expect("made again");
        assert!(root.join("a-2").is_dir());
        let mode = std::fs::metadata(&root).expect("meta").mode() & 0o7777;
        assert_eq!(mode, 0o711, "checked and tightened as at start");
    }

    #[test]
    fn a_reference_without_tag_or_digest_is_untagged() {
        for image in ["repo", "org/repo", "host:5000/org/repo"] {
            assert!(untagged(image), "{image}");
        }
        for image in [
            "repo:1",
            "host:5000/repo:1",
            "repo@sha256:abc",
            "host:5000/r@sha256:abc",
        ] {
            assert!(!untagged(image), "{image}");
        }
    }

    fn spec() -> InstanceSpec {
        InstanceSpec {
            app: "shop".into(),
            function: "cart/v2".into(),
            command: Vec::new(),
            image: Some("shop/cart:2".into()),
            memory_mb: 128,
            concurrency: 1,
            idle_timeout: Duration::from_secs(30),
            config: BTreeMap::from([
                ("DB_URL".to_owned(), "postgres://db".to_owned()),
                ("FN_LISTENER".to_owned(), "tcp:evil".to_owned()),
            ]),
        }
    }

    #[test]
    fn the_container_is_isolated_by_default_and_carries_the_runner_and_function_labels() {
        let config = DockerDriverConfig::new("runner-7", "/tmp/iofs-root");
        let body = create_body(
            &config,
            &spec(),
            "shop/cart:2",
            Path::new("/tmp/iofs-root/a-1"),
            "a-1",
        );
        let host = body.host_config.expect("host config");
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges:true".to_owned()])
        );
        assert_eq!(host.memory, Some(128 * 1024 * 1024));
        assert_eq!(host.memory_swap, host.memory, "no swap");
        assert_eq!(host.pids_limit, Some(256));
        assert_eq!(host.binds, None);
        let mounts = host.mounts.expect("mounts");
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        assert_eq!(mounts[0].typ, Some(MountType::BIND));
        assert_eq!(mounts[0].source.as_deref(), Some("/tmp/iofs-root/a-1"));
        assert_eq!(mounts[0].target.as_deref(), Some("/tmp/iofs"));
        assert!(host.tmpfs.is_some_and(|t| t.contains_key("/tmp")));
        assert_eq!(body.user.as_deref(), Some("65534:65534"));
        let labels = body.labels.expect("labels");
        assert_eq!(
            labels.get(LABEL_RUNNER).map(String::as_str),
            Some("runner-7")
        );
        assert_eq!(
            labels.get(LABEL_FUNCTION).map(String::as_str),
            Some("cart/v2")
        );
        assert_eq!(labels.get(LABEL_ROLE).map(String::as_str), Some("function"));
        let env = body.env.expect("env");
        assert!(env.contains(&"DB_URL=postgres://db".to_owned()), "{env:?}");
        assert!(
            env.contains(&"FN_LISTENER=unix:/tmp/iofs/lsnr.sock".to_owned()),
            "the contract wins: {env:?}"
        );
        assert!(!env.iter().any(|e| e.contains("tcp:evil")), "{env:?}");
        assert!(env.contains(&"FN_MEMORY=128".to_owned()), "{env:?}");
    }

    #[test]
    fn users_are_numeric_and_never_root() {
        assert_eq!(
            ContainerUser::parse("65534:65534"),
            Ok(ContainerUser::DEFAULT)
        );
        assert_eq!(
            ContainerUser::parse("1000"),
            Ok(ContainerUser {
                uid: 1000,
                gid: 1000
            })
        );
        for bad in ["nobody", "0", "1000:0", "", "1:2:3"] {
            assert!(ContainerUser::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(PullPolicy::parse("never"), Ok(PullPolicy::Never));
        assert!(PullPolicy::parse("always").is_err());
    }

    /// `host` and `container:<id>` would put functions in the host's network namespace or
    /// another container's: refused, as a blank value is; `none` and named networks pass.
    #[test]
    fn functions_never_share_the_hosts_network_namespace() {
        for good in ["none", "fn-functions", "bridge"] {
            assert_eq!(parse_network(good), Ok(good.to_owned()));
        }
        for bad in ["host", "container:abc", "container:fn-runner-1"] {
            let err = parse_network(bad).expect_err(bad);
            assert!(err.contains("never share the host's network"), "{err}");
        }
        assert!(parse_network(" ").is_err());
    }

    /// The instance directory is mounted as it is named, whatever it holds: as a bind
    /// string, a ':' in `FN_DOCKER_IOFS_DIR` was read as the separator of the target and a
    /// ',' of the options, and every start failed.
    #[test]
    fn an_iofs_dir_with_a_colon_or_a_comma_is_mounted_as_it_is() {
        let config = DockerDriverConfig::new("runner-7", "/srv/fn:iofs,a");
        let dir = Path::new("/srv/fn:iofs,a/a-1");
        let host = create_body(&config, &spec(), "shop/cart:2", dir, "a-1")
            .host_config
            .expect("host config");
        assert_eq!(host.binds, None);
        let mounts = host.mounts.expect("mounts");
        assert_eq!(mounts[0].source.as_deref(), Some("/srv/fn:iofs,a/a-1"));
        assert_eq!(mounts[0].target.as_deref(), Some(IOFS_MOUNT));
    }

    #[test]
    fn names_are_valid_docker_names_and_bounded() {
        assert_eq!(
            container_name("shop", "cart/v2", "ab-1"),
            "fn-shop-cart_v2-ab-1"
        );
        let long = container_name(&"a".repeat(300), "f", "abcdef01-12");
        assert!(long.len() <= MAX_NAME_LEN, "{}", long.len());
        assert!(long.ends_with("-abcdef01-12"));
        assert_eq!(cpu_shares(0), 2);
        assert_eq!(cpu_shares(512), 512);
    }
}
