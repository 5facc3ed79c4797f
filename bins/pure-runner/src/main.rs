//! pure-runner: admits a call only if its memory fits, runs it in a hot function instance
//! (the Fn FDK `http-stream` contract) and streams the result back to the LB.

/// jemalloc rather than glibc's malloc: a call makes about a hundred allocations here, many
/// of them a few KiB (task cells, codec and header buffers), which glibc serves from its
/// slower general bins. User-space instructions per call fell 10% with it (174,576 → 156,315,
/// `make bench-instructions`). One arena for all threads (`.cargo/config.toml`, as for the
/// lb-agent): with jemalloc's default of four per CPU, peak RSS under 0–1 MiB bodies at c=64
/// was 37–41 MiB, with one 32–35 (`fn-load --payload uniform`; glibc's: about 31).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use fn_lifecycle::config::{
    CommonArgs, duration_at_least, exit_config_error, non_blank, parse_duration, parse_or_exit,
};
use fn_lifecycle::metrics::Registry;
use fn_lifecycle::retry::Backoff;
use fn_lifecycle::shards::Shards;
use fn_lifecycle::{CancellationToken, Health, Services};
use fn_runner::driver::docker::{
    ContainerUser, DockerDriver, DockerDriverConfig, DockerMetrics, PullPolicy, parse_network,
};
use fn_runner::driver::process::{
    FunctionUser, FunctionUsers, Isolation, ProcessDriver, ProcessDriverConfig, UidRange,
};
use fn_runner::driver::{DockerSlot, Driver, Drivers};
use fn_runner::{EngageConfig, EngageFirst, Pool, RunnerService};
use fn_tls::TlsArgs;

/// How long the runner waits at start for the Docker engine (and the removal of what an
/// earlier run left) before it serves without the docker driver.
const DOCKER_SETUP_BOUND: Duration = Duration::from_secs(15);

/// How long the runner waits, after the drain, for its last instances to be cleaned up.
const INSTANCE_CLEANUP_BOUND: Duration = Duration::from_secs(5);

/// Function runner of the dataplane.
#[derive(Debug, Parser)]
#[command(name = "pure-runner", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// gRPC port for LBs (RunnerProtocol) and health checks.
    #[arg(long, env = "FN_GRPC_PORT", default_value_t = 9190, value_parser = clap::value_parser!(u16).range(1..))]
    grpc_port: u16,
    /// Memory this runner gives to calls, in MB [default: the machine's or cgroup's total].
    #[arg(long, env = "FN_MAX_MEMORY_MB")]
    max_memory_mb: Option<u64>,
    /// The only directory function commands are started from.
    #[arg(long, env = "FN_FUNCTIONS_DIR")]
    functions_dir: Option<PathBuf>,
    /// Where per-instance socket directories are created.
    #[arg(long, env = "FN_SOCKET_DIR", default_value = "/tmp/fn-runner")]
    socket_dir: PathBuf,
    /// One user every function runs as, instead of a uid per function: tenants are then not
    /// isolated from each other [default: unset; a runner that is not root runs functions
    /// as its own user].
    #[arg(long, env = "FN_FUNCTION_USER")]
    function_user: Option<String>,
    /// When the runner is root and FN_FUNCTION_USER is unset, each function (app and name)
    /// runs as a uid and gid of its own from this range, kept in FN_FUNCTION_UID_TABLE.
    #[arg(long, env = "FN_FUNCTION_UIDS", default_value = "100000-165535", value_parser = UidRange::parse)]
    function_uids: UidRange,
    /// The host's table of the uid each function got from FN_FUNCTION_UIDS, shared by every
    /// runner of the host: a uid is never given to two functions while it lasts. Its
    /// directory and the file must be root's and writable by nobody else (the runner makes
    /// them, 0700 and 0600). In /run by default, cleared at reboot like /tmp.
    #[arg(long, env = "FN_FUNCTION_UID_TABLE", default_value = fn_runner::driver::process::DEFAULT_UID_TABLE)]
    function_uid_table: PathBuf,
    /// Give each function instance a PID and a mount namespace of its own (it sees only its
    /// own processes, and a private /tmp), when the runner may make them (root or
    /// CAP_SYS_ADMIN; otherwise one warning at start).
    #[arg(long, env = "FN_FUNCTION_NAMESPACES", default_value_t = true,
          value_parser = clap::builder::BoolishValueParser::new())]
    function_namespaces: bool,
    /// `host`: functions use the runner's network (as Fn's); `none`: each instance gets an
    /// empty network namespace and reaches nothing but its own socket.
    #[arg(long, env = "FN_FUNCTION_NETWORK", default_value = "host", value_parser = ["host", "none"])]
    function_network: String,
    /// Most processes and threads one function instance may have, its wrapper shell and
    /// namespace helper included (0: no limit). Enforced with the pids cgroup controller.
    #[arg(long, env = "FN_FUNCTION_PIDS_LIMIT", default_value_t = fn_runner::driver::process::DEFAULT_PIDS_LIMIT,
          value_parser = parse_pids_limit)]
    function_pids_limit: u32,
    /// The helper that makes the namespaces [default: fn-isolate next to pure-runner].
    #[arg(long, env = "FN_ISOLATE_BINARY")]
    isolate_binary: Option<PathBuf>,
    /// Bound for a new instance to open its listener.
    #[arg(long, env = "FN_START_TIMEOUT", default_value = "10s", value_parser = parse_start_timeout)]
    start_timeout: Duration,
    /// This runner's name on the function containers it starts, so that a restarted runner
    /// removes what its earlier run left [default: <hostname>-<FN_GRPC_PORT>].
    #[arg(long, env = "FN_RUNNER_ID", value_parser = non_blank)]
    runner_id: Option<String>,
    /// Where the docker driver makes each function container's directory (mounted at
    /// /tmp/iofs in it). A runner in a container needs this path to be the same on the host.
    #[arg(long, env = "FN_DOCKER_IOFS_DIR", default_value = "/tmp/fn-iofs")]
    docker_iofs_dir: PathBuf,
    /// `missing`: pull a function image the engine does not have; `never`: only run images
    /// already there.
    #[arg(long, env = "FN_DOCKER_PULL", default_value = "missing", value_parser = PullPolicy::parse)]
    docker_pull: PullPolicy,
    /// Bound for one image pull (at least 1s).
    #[arg(long, env = "FN_DOCKER_PULL_TIMEOUT", default_value = "5m",
          value_parser = duration_at_least(Duration::from_secs(1), "every pull would fail at once; an image takes time to fetch"))]
    docker_pull_timeout: Duration,
    /// Network of function containers: `none` (no network at all), or a network's name
    /// (`host` and `container:<id>` are refused).
    #[arg(long, env = "FN_DOCKER_FUNCTION_NETWORK", default_value = "none", value_parser = parse_network)]
    docker_function_network: String,
    /// Numeric uid[:gid] function containers run as (never root).
    #[arg(long, env = "FN_DOCKER_FUNCTION_USER", default_value = "65534:65534", value_parser = ContainerUser::parse)]
    docker_function_user: ContainerUser,
    /// Most processes and threads one function container may have.
    #[arg(long, env = "FN_DOCKER_PIDS_LIMIT", default_value_t = 256,
          value_parser = clap::value_parser!(i64).range(8..))]
    docker_pids_limit: i64,
}

/// `FN_FUNCTION_USER` as a runner running as `runner` can use it: another user (or group)
/// only when it is root, since every start would fail otherwise.
fn check_function_user(
    name: &str,
    user: FunctionUser,
    runner: FunctionUser,
    root: bool,
) -> Result<(), String> {
    if root || user == runner {
        return Ok(());
    }
    Err(format!(
        "FN_FUNCTION_USER: {name} is another user (or group) than the runner's, and the runner \
         is not root, so it cannot run functions as {name}; unset it (functions then run as \
         the runner's user) or run the runner as root"
    ))
}

/// Bounds of `FN_START_TIMEOUT`: below the first, no instance would start (each call,
/// already committed, would fail); the second keeps a deadline computed from it in range.
const START_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(600));

fn parse_start_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text)?;
    let (min, max) = START_TIMEOUT_RANGE;
    if timeout < min || timeout > max {
        return Err(format!(
            "{text:?} is out of range: give between {min:?} and {max:?} for a new instance to \
             open its socket"
        ));
    }
    Ok(timeout)
}

/// `FN_FUNCTION_PIDS_LIMIT`: 0 (no limit) or at least 8, room for the wrapper shell, its
/// watchdog, the namespace helper and a function's first few processes.
fn parse_pids_limit(text: &str) -> Result<u32, String> {
    let limit: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of processes (0 for no limit)"))?;
    if (1..8).contains(&limit) {
        return Err(format!(
            "{limit} is too few: an instance's wrapper shell, its watchdog and the namespace \
             helper take up to 4 of them; give at least 8, or 0 for no limit"
        ));
    }
    Ok(limit)
}

fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    let common = cli.common.clone();
    // Before any other thread exists, so that every thread (and every function started from
    // one) inherits it: no exec of a setuid program gives a function more privileges than it
    // started with. The runner itself only ever drops privileges.
    let no_new_privs = nix::sys::prctl::set_no_new_privs();
    // Before any other thread exists too: a new mount namespace is the calling thread's
    // alone. Tried wherever instances may get namespaces, which the runner's probe decides
    // later (the tmpfs it mounts on their directories are then in this namespace); a runner
    // that may not make them fails here too, which is said only if the probe finds it may.
    let own_mounts = cli.function_namespaces.then(own_mount_namespace);
    fn_lifecycle::run_daemon(&common, daemon(cli, no_new_privs, own_mounts))
}

/// Moves the runner into a mount namespace of its own that receives the host's mounts and
/// sends none back (a slave of the host's): the tmpfs mounted on instance directories (see
/// the process driver) then stay out of the host's mount table and of every namespace
/// that shares it, and go with the runner's namespace when the runner and its children
/// are gone, so a runner killed outright leaves no mount on a directory its npm removes.
fn own_mount_namespace() -> nix::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_SLAVE,
        None::<&str>,
    )
}

async fn daemon(
    cli: Cli,
    no_new_privs: nix::Result<()>,
    own_mounts: Option<nix::Result<()>>,
) -> ExitCode {
    // First: what loading the configuration warns of (a node certificate its own CA bundle
    // does not trust, one not valid yet) is logged.
    fn_lifecycle::logging::init(&cli.common.log_level, cli.common.log_format)
        .unwrap_or_else(|e| exit_config_error(e));
    let tls = cli.tls.load().unwrap_or_else(|e| exit_config_error(e));
    let Some(functions_dir) = cli.functions_dir.clone() else {
        exit_config_error("FN_FUNCTIONS_DIR: required (the directory function commands run from)")
    };
    let total_mb =
        fn_runner::memory::total_mb(cli.max_memory_mb).unwrap_or_else(|e| exit_config_error(e));
    let root = nix::unistd::Uid::effective().is_root();
    let function_users = match &cli.function_user {
        Some(name) => {
            let user = FunctionUser::lookup(name)
                .unwrap_or_else(|e| exit_config_error(format!("FN_FUNCTION_USER: {e}")));
            let runner = FunctionUser {
                uid: nix::unistd::Uid::effective().as_raw(),
                gid: nix::unistd::Gid::effective().as_raw(),
            };
            check_function_user(name, user, runner, root).unwrap_or_else(|e| exit_config_error(e));
            FunctionUsers::Shared(user)
        }
        None if root => FunctionUsers::PerFunction(cli.function_uids),
        None => FunctionUsers::Runner,
    };
    // Function containers as a uid a function of the process driver may run as: that
    // function could enter the containers' instance directories and call them.
    let docker_uid = cli.docker_function_user.uid;
    let shared_with_containers = function_users.may_run_as(docker_uid);
    if shared_with_containers && matches!(function_users, FunctionUsers::PerFunction(_)) {
        exit_config_error(format!(
            "FN_DOCKER_FUNCTION_USER: uid {docker_uid} is in FN_FUNCTION_UIDS, where each \
             function of the process driver gets a uid of its own: such a function could enter \
             function containers' instance directories and call them; give containers a uid \
             outside the range"
        ));
    }
    if shared_with_containers {
        // FN_FUNCTION_USER already leaves tenants unisolated from each other; say that
        // image functions are in the same case.
        tracing::warn!(
            uid = docker_uid,
            "FN_FUNCTION_USER and FN_DOCKER_FUNCTION_USER are the same user: functions of the \
             process driver can reach function containers' instance directories"
        );
    }
    fn_tls::install_crypto_provider();
    fn_tls::warn_if_insecure(&tls);
    let mut registry = Registry::default();
    fn_lifecycle::logging::register_metrics(&mut registry);
    // Now, before the slow parts of the start (namespaces, the Docker engine): from here on
    // a SIGHUP (a certificate rotation's hook) reloads certificates instead of killing the
    // runner.
    let cert_watch = fn_tls::watch::CertWatch::for_mode(&tls, &cli.tls, &mut registry)
        .unwrap_or_else(|e| exit_config_error(e));
    match function_users {
        FunctionUsers::PerFunction(range) => tracing::info!(
            uids = format!("{}-{}", range.first, range.last),
            table = %cli.function_uid_table.display(),
            "each function runs as a uid of its own"
        ),
        FunctionUsers::Shared(user) => tracing::warn!(
            uid = user.uid,
            "FN_FUNCTION_USER: every function runs as this one user, so tenants are not \
             isolated from each other (one can read another's environment and signal it); \
             unset it on a root runner to give each function a uid of its own"
        ),
        FunctionUsers::Runner => tracing::warn!(
            "the runner is not root: functions run as its own user, isolated neither from \
             each other nor from the runner"
        ),
    }

    if let Err(e) = no_new_privs {
        tracing::warn!(error = %e, "cannot set no_new_privs; functions could gain privileges through setuid programs");
    }

    let isolation = isolation(&cli, &function_users)
        .await
        .unwrap_or_else(|e| exit_config_error(e));
    // Said only where it matters: a runner that may not make namespaces (a container
    // without CAP_SYS_ADMIN) has said so above, and mounts nothing.
    if let (Some(_), Some(Err(e))) = (&isolation, own_mounts) {
        tracing::warn!(error = %e, "cannot make a mount namespace of the runner's own (or share none of its mounts with the host's): the tmpfs on the directories of instances in namespaces are in the host's mount table, and those of a runner killed outright stay mounted there until a runner takes its socket root again (umount -l them; an npm cannot remove that runner's socket directory until then)");
    }
    // Instances in namespaces get a session of their own from fn-isolate; the others are in
    // the runner's, and share the terminal it was started from (see `fn_runner::terminal`).
    if isolation.is_none() {
        match fn_runner::terminal::controlling_terminal() {
            Ok(false) => {}
            Ok(true) => tracing::warn!(
                "the runner has a controlling terminal, and functions run without namespaces \
                 in its session: any function can open /dev/tty to read and write that \
                 terminal, and push keystrokes into its shell where the kernel allows TIOCSTI \
                 (sysctl dev.tty.legacy_tiocsti); start the runner without a terminal \
                 (`setsid -w pure-runner ...` with its output sent to a file, or as a \
                 service), or where namespaces are allowed"
            ),
            Err(e) => {
                tracing::debug!(error = %e, "cannot tell whether the runner has a controlling terminal")
            }
        }
    }
    // Each instance holds a few descriptors (its socket, its output pipes, its lifeline), and
    // each lb-agent a connection; functions get back the limit the runner was given.
    let open_files = fn_lifecycle::limits::raise_open_file_limit();
    tracing::debug!(open_files = open_files.in_force, "open-file limit");
    let driver_config = ProcessDriverConfig::new(functions_dir, &cli.socket_dir)
        .with_function_users(function_users)
        .with_uid_table(&cli.function_uid_table)
        .with_isolation(isolation)
        .with_function_open_files(open_files.raised().then_some(open_files.inherited))
        .with_pids_limit(cli.function_pids_limit);
    let driver =
        Arc::new(ProcessDriver::new(driver_config).unwrap_or_else(|e| exit_config_error(e)));
    // Checked at start and after every certificate reload: a rotated key may be written
    // with other modes than the one it replaces.
    let cert_watch = match cli.tls.node_cert_key.clone() {
        Some(key) => {
            let driver = Arc::clone(&driver);
            let check_key = move || {
                if driver.exposes(&key) {
                    tracing::warn!(
                        key = %key.display(),
                        "FN_NODE_CERT_KEY is readable by the users functions run as: any \
                         function can read this runner's private key; make it readable by the \
                         runner only (chmod 600, or 640 with a group no function is in)"
                    );
                }
            };
            check_key();
            cert_watch.map(|watch| watch.on_replaced(check_key))
        }
        None => cert_watch,
    };
    let docker_metrics = DockerMetrics::register(&mut registry);
    let docker = docker_driver(&cli, docker_metrics.clone()).await;
    let docker_missing = docker.is_err();
    let drivers = Drivers::new(driver, docker);
    let docker_slot = drivers.docker_slot();
    let pool = Pool::new(Arc::new(drivers), total_mb, cli.start_timeout);
    let runner = RunnerService::new(Arc::clone(&pool), EngageConfig::default(), &mut registry);

    let listener =
        match fn_lifecycle::bind(cli.common.listen_on(cli.grpc_port), "FN_GRPC_PORT").await {
            Ok(l) => l,
            Err(e) => return fn_lifecycle::exit_status(Err(e)),
        };
    let metrics = match fn_lifecycle::metrics::listen(&cli.common, registry).await {
        Ok(m) => m,
        Err(e) => return fn_lifecycle::exit_status(Err(e)),
    };
    let shards = match Shards::start(cli.common.shards.into()) {
        Ok(shards) => Arc::new(shards),
        // Out of threads, not a bad setting: the status says failure, not configuration.
        Err(e) => {
            return fn_lifecycle::exit_status(Err(format!(
                "FN_SHARDS: cannot start a shard's thread: {e} (lower FN_SHARDS, or raise the \
                 process's thread limit)"
            )));
        }
    };
    let incoming = match fn_tls::grpc_incoming_sharded(&tls, listener, Some(Arc::clone(&shards))) {
        Ok(incoming) => incoming,
        Err(e) => return fn_lifecycle::exit_status(Err(e)),
    };
    let mut server = fn_runner::grpc_server().layer(EngageFirst::new(runner.clone().into_server()));
    let (health, health_service) = Health::new(&["dataplane.runner.v1.RunnerProtocol"]);
    let router = server
        .add_service(health_service)
        .add_service(runner.clone().into_server());

    let mut services = Services::new(CancellationToken::new()).with_health(health.clone());
    // On shutdown: refuse new calls as draining, let calls in flight finish, then stop.
    // A server per shard, each on its shard's thread. On shutdown: refuse new calls as
    // draining, let calls in flight finish (one drain for all), then stop every server.
    let grpc_shards = Arc::clone(&shards);
    services.spawn("grpc", move |cancel| async move {
        let drained = CancellationToken::new();
        let mut servers = tokio::task::JoinSet::new();
        for (shard, incoming) in incoming.into_iter().enumerate() {
            let drained = drained.clone();
            let serve = router
                .clone()
                .serve_with_incoming_shutdown(incoming, drained.cancelled_owned());
            servers.spawn_on(serve, grpc_shards.handle(shard));
        }
        tokio::select! {
            () = cancel.cancelled() => {}
            Some(ended) = servers.join_next() => return server_ended(ended, false),
        }
        runner.drain().await;
        drained.cancel();
        while let Some(ended) = servers.join_next().await {
            server_ended(ended, true)?;
        }
        Ok(())
    });
    if let Some(metrics) = metrics {
        services.spawn("metrics", move |cancel| metrics.serve(cancel));
    }
    if let Some(watch) = cert_watch {
        services.spawn("cert-watch", move |cancel| watch.run(cancel));
    }
    let reaper_pool = Arc::clone(&pool);
    services.spawn("idle-reaper", move |cancel| {
        reaper_pool.run_reaper(Duration::from_secs(1), cancel)
    });
    if docker_missing {
        let config = docker_config(&cli);
        services.spawn("docker-engine", move |cancel| {
            docker_later(config, docker_metrics, docker_slot, cancel)
        });
    }
    let shutdown = match fn_lifecycle::signal::shutdown_signal() {
        Ok(signal) => signal,
        Err(e) => return fn_lifecycle::exit_status(Err(e)),
    };
    health.set_serving().await;
    tracing::info!(
        port = cli.grpc_port,
        total_mb,
        shards = cli.common.shards,
        "pure-runner serving"
    );

    let result = services.run(shutdown, cli.common.shutdown_timeout).await;
    // Calls that ended during the drain left their instances hot: kill them and wait for
    // their clean-up (process group, memory cgroup, socket directory) before exiting.
    if tokio::time::timeout(INSTANCE_CLEANUP_BOUND, pool.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(bound = ?INSTANCE_CLEANUP_BOUND, "function instances not cleaned up in time");
    }
    // Only now: instances started by calls on other shards were cleaned up by their tasks.
    drop(shards);
    fn_lifecycle::exit_status(result)
}

/// The docker driver, for functions given as images; or, when no engine answers, why not
/// (calls of image functions are then refused as invalid with that reason).
async fn docker_driver(cli: &Cli, metrics: DockerMetrics) -> Result<Arc<dyn Driver>, String> {
    let config = docker_config(cli);
    let (runner_id, network) = (config.runner_id.clone(), config.network.clone());
    match connect_docker(config, metrics).await {
        Ok(driver) => {
            tracing::info!(
                runner_id,
                %network,
                "docker driver ready: functions given as images run as containers"
            );
            Ok(driver)
        }
        Err(reason) => {
            tracing::warn!(
                %reason,
                "no Docker engine: functions given as images cannot run on this runner (set \
                 DOCKER_HOST or mount the engine's socket to run them); trying again now \
                 and then"
            );
            Err(reason)
        }
    }
}

/// The docker driver's settings, from the runner's.
fn docker_config(cli: &Cli) -> DockerDriverConfig {
    let runner_id = cli.runner_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "runner".to_owned());
        format!("{host}-{}", cli.grpc_port)
    });
    let mut config = DockerDriverConfig::new(runner_id, &cli.docker_iofs_dir);
    config.pull = cli.docker_pull;
    config.pull_timeout = cli.docker_pull_timeout;
    config.network.clone_from(&cli.docker_function_network);
    config.user = cli.docker_function_user;
    config.pids_limit = cli.docker_pids_limit;
    config
}

/// Connects the docker driver, within [`DOCKER_SETUP_BOUND`].
async fn connect_docker(
    config: DockerDriverConfig,
    metrics: DockerMetrics,
) -> Result<Arc<dyn Driver>, String> {
    let connect = tokio::time::timeout(DOCKER_SETUP_BOUND, DockerDriver::connect(config, metrics));
    match connect.await {
        Ok(Ok(driver)) => Ok(Arc::new(driver)),
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err(format!(
            "{}: no answer within {DOCKER_SETUP_BOUND:?}",
            fn_runner::driver::docker::engine_socket()
        )),
    }
}

/// For a runner whose engine did not answer at start (one slow to come up with its host):
/// tries again, 10 s apart at first and at most 5 minutes, and puts the driver in use once
/// it answers. Runs until the runner stops.
async fn docker_later(
    config: DockerDriverConfig,
    metrics: DockerMetrics,
    slot: Arc<DockerSlot>,
    cancel: CancellationToken,
) -> Result<(), std::convert::Infallible> {
    let mut backoff = Backoff::new(Duration::from_secs(10), Duration::from_secs(300));
    while !slot.is_filled() {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
        let attempt = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            attempt = connect_docker(config.clone(), metrics.clone()) => attempt,
        };
        match attempt {
            Ok(driver) => {
                slot.fill(driver);
                tracing::info!(
                    runner_id = config.runner_id,
                    "a Docker engine answers now: functions given as images run as containers"
                );
            }
            Err(reason) => {
                tracing::debug!(%reason, "the Docker engine still does not answer");
                slot.missing(reason);
            }
        }
    }
    cancel.cancelled().await;
    Ok(())
}

/// The namespaces instances get: checked once, by starting the helper in probe mode.
///
/// # Errors
/// When `FN_FUNCTION_NETWORK=none` is asked for and cannot be given: functions would reach
/// the network the operator meant to close.
async fn isolation(cli: &Cli, users: &FunctionUsers) -> Result<Option<Isolation>, String> {
    let network_none = cli.function_network == "none";
    let unavailable = |reason: String| {
        if network_none {
            Err(format!("FN_FUNCTION_NETWORK=none: {reason}"))
        } else {
            tracing::warn!(%reason, "function instances run without namespaces of their own: they see the runner's processes and share its /tmp");
            Ok(None)
        }
    };
    if !cli.function_namespaces {
        if network_none {
            return Err("FN_FUNCTION_NETWORK=none needs FN_FUNCTION_NAMESPACES=true".into());
        }
        tracing::info!(
            "FN_FUNCTION_NAMESPACES=false: function instances run in the runner's namespaces"
        );
        return Ok(None);
    }
    if matches!(users, FunctionUsers::Runner) {
        return unavailable("the runner is not root".into());
    }
    let helper = match &cli.isolate_binary {
        Some(path) => path.clone(),
        None => match std::env::current_exe() {
            Ok(exe) => exe.with_file_name("fn-isolate"),
            Err(e) => return unavailable(format!("cannot find fn-isolate: {e}")),
        },
    };
    // Started by its full path: instances run with a PATH of their own (a function's config
    // may set it), not the runner's.
    let helper = match full_path(&helper, std::env::var_os("PATH")) {
        Ok(helper) => helper,
        Err(e) => return unavailable(format!("FN_ISOLATE_BINARY: {e}")),
    };
    let mut probe = tokio::process::Command::new(&helper);
    probe.arg("--probe");
    if network_none {
        probe.arg("--net-none");
    }
    match probe.output().await {
        Ok(out) if out.status.success() => {
            tracing::info!(
                network = %cli.function_network,
                "each function instance runs in PID and mount namespaces of its own"
            );
            Ok(Some(Isolation {
                helper,
                network_none,
            }))
        }
        Ok(out) => unavailable(format!(
            "{} --probe: {}",
            helper.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => unavailable(format!(
            "cannot run {}: {e} (set FN_ISOLATE_BINARY)",
            helper.display()
        )),
    }
}

/// `program` as a full path: a bare name is looked up in the directories of `path` (as a
/// shell would), a relative path from the working directory.
///
/// # Errors
/// When no such file is found.
fn full_path(
    program: &std::path::Path,
    path: Option<std::ffi::OsString>,
) -> Result<PathBuf, String> {
    let found = if program.components().count() == 1 && !program.is_absolute() {
        path.iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| format!("{} not found on PATH", program.display()))?
    } else {
        program.to_path_buf()
    };
    std::fs::canonicalize(&found).map_err(|e| format!("{}: {e}", found.display()))
}

/// What a shard's gRPC server ending means: nothing after shutdown when it ended cleanly,
/// an error otherwise (its own, a panic, or ending before shutdown was asked for).
fn server_ended(
    ended: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
    shutting_down: bool,
) -> Result<(), String> {
    match ended {
        Ok(Ok(())) if shutting_down => Ok(()),
        Ok(Ok(())) => Err("the gRPC server stopped before shutdown".to_owned()),
        Ok(Err(e)) => Err(format!("the gRPC server failed: {e}")),
        Err(e) => Err(format!(
            "a shard's gRPC server panicked or was cancelled: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Cli, FunctionUser, check_function_user, full_path, parse_pids_limit, parse_start_timeout,
    };
    use fn_lifecycle::config::{ParseOutcome, try_parse_from};

    #[test]
    fn the_isolation_helper_is_found_by_its_full_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin");
        std::fs::write(bin.join("fn-isolate"), b"").expect("helper");
        let full = std::fs::canonicalize(bin.join("fn-isolate")).expect("canonical");
        let path = std::env::join_paths([dir.path().join("none"), bin.clone()]).expect("PATH");
        let bare = std::path::Path::new("fn-isolate");
        assert_eq!(full_path(bare, Some(path.clone())), Ok(full.clone()));
        assert_eq!(full_path(&bin.join("fn-isolate"), None), Ok(full));
        let missing = full_path(std::path::Path::new("fn-nothing"), Some(path));
        assert_eq!(missing, Err("fn-nothing not found on PATH".to_owned()));
        assert!(full_path(bare, None).is_err(), "no PATH, no lookup");
    }

    #[test]
    fn a_non_root_runner_refuses_a_function_user_it_cannot_become() {
        let me = FunctionUser {
            uid: 1000,
            gid: 1000,
        };
        let nobody = FunctionUser {
            uid: 65534,
            gid: 65534,
        };
        assert_eq!(check_function_user("me", me, me, false), Ok(()));
        assert_eq!(check_function_user("nobody", nobody, me, true), Ok(()));
        let err = check_function_user("nobody", nobody, me, false).expect_err("not root");
        assert!(
            err.starts_with("FN_FUNCTION_USER: nobody is another user"),
            "{err}"
        );
        let other_group = FunctionUser { uid: 1000, gid: 0 };
        assert!(check_function_user("g", other_group, me, false).is_err());
    }

    /// An empty network would put function containers on the engine's default network
    /// (Docker reads "" as `default`), and an empty runner id would match every container
    /// of every runner given one: both are refused, naming the variable.
    #[test]
    fn blank_docker_settings_are_refused() {
        for (flag, var) in [
            ("--docker-function-network", "FN_DOCKER_FUNCTION_NETWORK"),
            ("--runner-id", "FN_RUNNER_ID"),
        ] {
            let parsed = try_parse_from::<Cli, _, _>(["pure-runner", flag, " "]);
            let Err(ParseOutcome::Invalid(line)) = parsed else {
                panic!("{flag} blank was accepted");
            };
            assert!(line.starts_with(&format!("{var}: ")), "{line}");
        }
        let parsed =
            try_parse_from::<Cli, _, _>(["pure-runner", "--docker-function-network", "host"]);
        let Err(ParseOutcome::Invalid(line)) = parsed else {
            panic!("FN_DOCKER_FUNCTION_NETWORK=host was accepted");
        };
        assert!(line.starts_with("FN_DOCKER_FUNCTION_NETWORK: "), "{line}");
    }

    /// A pull timeout of zero (or below a second) would fail every pull at once, as taking
    /// longer than it: refused at start, naming the variable.
    #[test]
    fn a_pull_timeout_leaves_a_pull_time_to_fetch() {
        for bad in ["0s", "500ms"] {
            let parsed = try_parse_from::<Cli, _, _>(["pure-runner", "--docker-pull-timeout", bad]);
            let Err(ParseOutcome::Invalid(line)) = parsed else {
                panic!("FN_DOCKER_PULL_TIMEOUT={bad} was accepted");
            };
            assert!(line.starts_with("FN_DOCKER_PULL_TIMEOUT: "), "{line}");
            assert!(line.contains("every pull would fail"), "{line}");
        }
        let cli = try_parse_from::<Cli, _, _>(["pure-runner", "--docker-pull-timeout", "1s"])
            .unwrap_or_else(|_| panic!("1s is enough"));
        assert_eq!(cli.docker_pull_timeout, std::time::Duration::from_secs(1));
    }

    #[test]
    fn a_start_timeout_leaves_an_instance_time_to_start() {
        assert_eq!(
            parse_start_timeout("10s"),
            Ok(std::time::Duration::from_secs(10))
        );
        assert_eq!(
            parse_start_timeout("100ms"),
            Ok(std::time::Duration::from_millis(100))
        );
        for bad in ["0s", "50ms", "11m", "18446744073709551615s"] {
            let e = parse_start_timeout(bad).expect_err(bad);
            assert!(
                e.contains("out of range")
                    || e.contains("expected a duration")
                    || e.contains("100 years"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_pids_limit_is_zero_or_room_for_the_wrapper() {
        assert_eq!(parse_pids_limit("0"), Ok(0));
        assert_eq!(parse_pids_limit("8"), Ok(8));
        assert_eq!(parse_pids_limit(" 4096 "), Ok(4096));
        let few = parse_pids_limit("3").expect_err("too few");
        assert!(few.contains("at least 8"), "{few}");
        let junk = parse_pids_limit("lots").expect_err("not a number");
        assert!(junk.contains("not a number"), "{junk}");
        assert!(parse_pids_limit("-1").is_err());
    }
}
