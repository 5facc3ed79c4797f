//! npm, the node pool manager: aggregates the LBs' capacity adverts per LB group and keeps
//! each group's runner set sized to demand through a control plane.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use fn_lifecycle::config::{CommonArgs, exit_config_error, parse_duration, parse_or_exit};
use fn_lifecycle::{CancellationToken, Health, Services};
use fn_poolmanager::control_plane::ControlPlane;
use fn_poolmanager::control_plane::docker::{DockerConfig, DockerControlPlane};
use fn_poolmanager::control_plane::process::{ProcessConfig, ProcessControlPlane};
use fn_poolmanager::control_plane::static_list::StaticControlPlane;
use fn_poolmanager::probe::GrpcProbe;
use fn_poolmanager::{ControlLoop, ManagerConfig, NpmService, Shared};
use fn_tls::{TlsArgs, TlsMode};
use tokio_stream::wrappers::TcpListenerStream;

/// Node pool manager of the function dataplane.
#[derive(Debug, Parser)]
#[command(name = "npm", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// gRPC port for the LBs (NodePoolScaler, RunnerManager) and health checks.
    #[arg(long, env = "FN_GRPC_PORT", default_value_t = 9120)]
    grpc_port: u16,
    /// Where runners come from.
    #[arg(long, env = "FN_CONTROL_PLANE", value_enum, default_value_t = ControlPlaneKind::Process)]
    control_plane: ControlPlaneKind,
    /// Capacity of one runner in MB (a spawned runner's FN_MAX_MEMORY_MB).
    #[arg(long, env = "FN_RUNNER_MEMORY_MB", default_value_t = 1024)]
    runner_memory_mb: u64,
    /// static: the runner addresses (host:port, comma-separated).
    #[arg(long, env = "FN_RUNNER_ADDRESSES", value_delimiter = ',')]
    runner_addresses: Vec<String>,
    /// process: the pure-runner executable [default: pure-runner next to this npm].
    #[arg(long, env = "FN_RUNNER_BINARY")]
    runner_binary: Option<PathBuf>,
    /// process: the functions directory given to spawned runners (their FN_FUNCTIONS_DIR).
    #[arg(long, env = "FN_RUNNER_FUNCTIONS_DIR")]
    runner_functions_dir: Option<PathBuf>,
    /// process: where spawned runners are recorded (for adoption after a restart) and log.
    #[arg(
        long,
        env = "FN_RUNNER_STATE_DIR",
        default_value = "/tmp/fn-npm-runners"
    )]
    runner_state_dir: PathBuf,
    /// docker: the image runner containers are created from.
    #[arg(
        long,
        env = "FN_DOCKER_RUNNER_IMAGE",
        default_value = "fn-dataplane/pure-runner:latest"
    )]
    docker_runner_image: String,
    /// docker: the network runner containers join [default: the npm container's network].
    #[arg(long, env = "FN_DOCKER_NETWORK")]
    docker_network: Option<String>,
    /// docker: volume (or absolute host path) with the certificates, mounted into runners at
    /// the directory of FN_NODE_CERT [default: what the npm's container mounts there].
    #[arg(long, env = "FN_DOCKER_CERTS_VOLUME")]
    docker_certs_volume: Option<String>,
    /// docker: this npm's label on its runner containers [default: the network's name].
    #[arg(long, env = "FN_DOCKER_NPM_ID")]
    docker_npm_id: Option<String>,
    /// docker: leave runner containers running at shutdown, for the next npm to adopt.
    #[arg(long, env = "FN_DOCKER_KEEP_RUNNERS", default_value_t = false,
          value_parser = clap::builder::BoolishValueParser::new())]
    docker_keep_runners: bool,
    /// Runners every LB group keeps without demand.
    #[arg(long, env = "FN_MIN_RUNNERS", default_value_t = 0)]
    min_runners: usize,
    /// Most runners per LB group.
    #[arg(long, env = "FN_MAX_RUNNERS", default_value_t = 10)]
    max_runners: usize,
    /// How long demand must stay low before runners drain.
    #[arg(long, env = "FN_SCALE_DOWN_DELAY", default_value = "30s", value_parser = parse_duration)]
    scale_down_delay: Duration,
    /// A draining runner is removed after this even with calls in flight.
    #[arg(long, env = "FN_MAX_DRAIN_TIME", default_value = "5m", value_parser = parse_duration)]
    max_drain_time: Duration,
    /// An LB silent for this long is forgotten, with its demand.
    #[arg(long, env = "FN_LB_PURGE_AFTER", default_value = "5s", value_parser = parse_duration)]
    lb_purge_after: Duration,
    /// Most runners provisioned per group per control-loop tick.
    #[arg(long, env = "FN_PROVISION_BATCH", default_value_t = 4)]
    provision_batch: usize,
    /// Time between control-loop ticks.
    #[arg(long, env = "FN_SCALE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    scale_interval: Duration,
}

/// `FN_CONTROL_PLANE` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ControlPlaneKind {
    /// A fixed list of runner addresses (FN_RUNNER_ADDRESSES).
    Static,
    /// Local pure-runner processes on loopback ports.
    Process,
    /// Runner containers through the Docker Engine API (FN_DOCKER_*).
    Docker,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    let tls = cli.tls.load().unwrap_or_else(|e| exit_config_error(e));
    if cli.runner_memory_mb == 0 {
        exit_config_error("FN_RUNNER_MEMORY_MB: must be at least 1");
    }
    if cli.max_runners == 0 || cli.min_runners > cli.max_runners {
        exit_config_error("FN_MAX_RUNNERS: must be at least 1 and at least FN_MIN_RUNNERS");
    }
    if cli.provision_batch == 0 {
        exit_config_error("FN_PROVISION_BATCH: must be at least 1");
    }
    fn_lifecycle::logging::init(&cli.common.log_level, cli.common.log_format)
        .unwrap_or_else(|e| exit_config_error(e));
    fn_tls::install_crypto_provider();
    fn_tls::warn_if_insecure(&tls);
    let control_plane = build_control_plane(&cli, &tls).await;

    let listener =
        match fn_lifecycle::bind(cli.common.listen_on(cli.grpc_port), "FN_GRPC_PORT").await {
            Ok(l) => l,
            Err(e) => return fn_lifecycle::exit_status(Err(e)),
        };
    let mut server = match fn_tls::grpc_server(&tls) {
        Ok(s) => s,
        Err(e) => return fn_lifecycle::exit_status(Err(e)),
    };
    let shared = Arc::new(Shared::default());
    let npm = NpmService::new(Arc::clone(&shared));
    let (health, health_service) = Health::new(&[
        "dataplane.poolmanager.v1.NodePoolScaler",
        "dataplane.poolmanager.v1.RunnerManager",
    ]);
    let router = server
        .add_service(health_service)
        .add_service(npm.clone().scaler_server())
        .add_service(npm.manager_server());
    let control = ControlLoop::new(
        shared,
        control_plane,
        Arc::new(GrpcProbe::new(tls.clone())),
        ManagerConfig {
            min_runners: cli.min_runners,
            max_runners: cli.max_runners,
            scale_down_delay: cli.scale_down_delay,
            max_drain_time: cli.max_drain_time,
            lb_purge_after: cli.lb_purge_after,
            provision_batch: cli.provision_batch,
            tick: cli.scale_interval,
            ..ManagerConfig::default()
        },
    );

    let mut services = Services::new(CancellationToken::new()).with_health(health.clone());
    services.spawn("grpc", move |cancel| {
        router.serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            cancel.cancelled_owned(),
        )
    });
    services.spawn("control-loop", move |cancel| control.run(cancel));
    let shutdown = match fn_lifecycle::signal::shutdown_signal() {
        Ok(signal) => signal,
        Err(e) => return fn_lifecycle::exit_status(Err(e)),
    };
    health.set_serving().await;
    tracing::info!(port = cli.grpc_port, control_plane = ?cli.control_plane, "npm serving");

    fn_lifecycle::exit_status(services.run(shutdown, cli.common.shutdown_timeout).await)
}

/// The configured control plane, or a configuration error (exit 2).
async fn build_control_plane(cli: &Cli, tls: &TlsMode) -> Arc<dyn ControlPlane> {
    match cli.control_plane {
        ControlPlaneKind::Static => {
            let addresses: Vec<String> = cli
                .runner_addresses
                .iter()
                .map(|a| a.trim().to_owned())
                .filter(|a| !a.is_empty())
                .collect();
            if addresses.is_empty() {
                exit_config_error("FN_RUNNER_ADDRESSES: required with FN_CONTROL_PLANE=static");
            }
            Arc::new(StaticControlPlane::new(addresses, cli.runner_memory_mb))
        }
        ControlPlaneKind::Process => {
            let Some(functions_dir) = cli.runner_functions_dir.clone() else {
                exit_config_error("FN_RUNNER_FUNCTIONS_DIR: required with FN_CONTROL_PLANE=process")
            };
            let runner_binary = cli.runner_binary.clone().unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|exe| exe.parent().map(|dir| dir.join("pure-runner")))
                    .unwrap_or_else(|| PathBuf::from("pure-runner"))
            });
            let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
            let tls_env = if cli.tls.insecure {
                vec![("FN_INSECURE".to_owned(), "true".to_owned())]
            } else {
                [
                    ("FN_NODE_CERT", &cli.tls.node_cert),
                    ("FN_NODE_CERT_KEY", &cli.tls.node_cert_key),
                    ("FN_NODE_CERT_AUTHORITY", &cli.tls.node_cert_authority),
                ]
                .into_iter()
                .filter_map(|(k, v)| {
                    v.as_ref()
                        .map(|p| (k.to_owned(), absolute(p).display().to_string()))
                })
                .collect()
            };
            let mut config = ProcessConfig::new(
                runner_binary,
                absolute(&functions_dir),
                absolute(&cli.runner_state_dir),
                tls.clone(),
            );
            config.runner_memory_mb = cli.runner_memory_mb;
            config.tls_env = tls_env;
            config.extra_env = vec![
                ("FN_LOG_LEVEL".to_owned(), cli.common.log_level.clone()),
                (
                    "FN_LOG_FORMAT".to_owned(),
                    format!("{:?}", cli.common.log_format).to_lowercase(),
                ),
            ];
            let cp = ProcessControlPlane::new(config)
                .await
                .unwrap_or_else(|e| exit_config_error(e));
            Arc::new(cp)
        }
        ControlPlaneKind::Docker => {
            let mut config =
                DockerConfig::new(cli.docker_runner_image.clone(), tls.clone(), &cli.tls);
            config.network = cli.docker_network.clone();
            config.certs = cli.docker_certs_volume.clone();
            config.npm_id = cli.docker_npm_id.clone();
            config.runner_memory_mb = cli.runner_memory_mb;
            config.keep_runners = cli.docker_keep_runners;
            config.extra_env.extend([
                ("FN_LOG_LEVEL".to_owned(), cli.common.log_level.clone()),
                (
                    "FN_LOG_FORMAT".to_owned(),
                    format!("{:?}", cli.common.log_format).to_lowercase(),
                ),
            ]);
            let cp = DockerControlPlane::connect(config)
                .await
                .unwrap_or_else(|e| exit_config_error(e));
            Arc::new(cp)
        }
    }
}
