//! npm, the node pool manager: aggregates the LBs' capacity adverts per LB group and keeps
//! each group's runner set sized to demand through a control plane.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use fn_lifecycle::config::{CommonArgs, exit_config_error, parse_or_exit};
use fn_lifecycle::metrics::Registry;
use fn_lifecycle::{CancellationToken, Health, Services};
use fn_poolmanager::config::{ControlPlaneArgs, ScalingArgs};
use fn_poolmanager::probe::GrpcProbe;
use fn_poolmanager::{ControlLoop, NpmService, Shared};
use fn_tls::TlsArgs;

/// Node pool manager of the function dataplane.
#[derive(Debug, Parser)]
#[command(name = "npm", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// gRPC port for the LBs (NodePoolScaler, RunnerManager) and health checks.
    #[arg(long, env = "FN_GRPC_PORT", default_value_t = 9120, value_parser = clap::value_parser!(u16).range(1..))]
    grpc_port: u16,
    #[command(flatten)]
    control_plane: ControlPlaneArgs,
    #[command(flatten)]
    scaling: ScalingArgs,
}

fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    let mut common = cli.common.clone();
    // npm serves no calls and has no shards: an `FN_SHARDS` meant for the lb-agent and the
    // runner (an env block shared by the stack's services) leaves its runtime as it is.
    common.shards = 1;
    fn_lifecycle::run_daemon(&common, daemon(cli))
}

async fn daemon(cli: Cli) -> ExitCode {
    // First: what loading the configuration warns of (a node certificate its own CA bundle
    // does not trust, one not valid yet) is logged.
    fn_lifecycle::logging::init(&cli.common.log_level, cli.common.log_format)
        .unwrap_or_else(|e| exit_config_error(e));
    let tls = cli.tls.load().unwrap_or_else(|e| exit_config_error(e));
    // A connection from every lb-agent and to every runner, each a descriptor.
    let open_files = fn_lifecycle::limits::raise_open_file_limit();
    tracing::debug!(open_files = open_files.in_force, "open-file limit");
    let manager_config = cli
        .scaling
        .manager_config(cli.common.shutdown_timeout)
        .unwrap_or_else(|e| exit_config_error(e));
    cli.control_plane
        .validate()
        .unwrap_or_else(|e| exit_config_error(e));
    fn_tls::install_crypto_provider();
    fn_tls::warn_if_insecure(&tls);
    let mut registry = Registry::default();
    fn_lifecycle::logging::register_metrics(&mut registry);
    // Now, before the control plane's setup (a Docker engine may take seconds): from here on
    // a SIGHUP (a certificate rotation's hook) reloads certificates instead of killing the
    // npm.
    let cert_watch = fn_tls::watch::CertWatch::for_mode(&tls, &cli.tls, &mut registry)
        .unwrap_or_else(|e| exit_config_error(e));

    // Runners log like their npm, and use as many worker threads.
    let mut runner_env = vec![
        ("FN_LOG_LEVEL".to_owned(), cli.common.log_level.clone()),
        (
            "FN_LOG_FORMAT".to_owned(),
            format!("{:?}", cli.common.log_format).to_lowercase(),
        ),
    ];
    if let Some(threads) = cli.common.worker_threads {
        runner_env.push(("FN_WORKER_THREADS".to_owned(), threads.to_string()));
    }
    let control_plane = cli
        .control_plane
        .build(&cli.tls, &tls, runner_env, cli.common.shutdown_timeout)
        .await
        .unwrap_or_else(|e| exit_config_error(e));

    let listener =
        match fn_lifecycle::bind(cli.common.listen_on(cli.grpc_port), "FN_GRPC_PORT").await {
            Ok(l) => l,
            Err(e) => return fn_lifecycle::exit_status(Err(e)),
        };
    let incoming = match fn_tls::grpc_incoming(&tls, listener) {
        Ok(incoming) => incoming,
        Err(e) => return fn_lifecycle::exit_status(Err(e)),
    };
    let mut server = fn_poolmanager::service::grpc_server();
    let shared = Arc::new(Shared::default());
    let watches = Arc::clone(&shared);
    let npm = NpmService::new(Arc::clone(&shared));
    let (health, health_service) = Health::new(&[
        "dataplane.poolmanager.v1.NodePoolScaler",
        "dataplane.poolmanager.v1.RunnerManager",
    ]);
    let router = server
        .add_service(health_service)
        .add_service(npm.clone().scaler_server())
        .add_service(npm.manager_server());
    let probe = Arc::new(GrpcProbe::new(tls.clone()));
    let control = ControlLoop::new(shared, control_plane, probe, manager_config, &mut registry);
    let metrics = match fn_lifecycle::metrics::listen(&cli.common, registry).await {
        Ok(m) => m,
        Err(e) => return fn_lifecycle::exit_status(Err(e)),
    };

    let mut services = Services::new(CancellationToken::new()).with_health(health.clone());
    services.spawn("grpc", move |cancel| {
        router.serve_with_incoming_shutdown(incoming, async move {
            cancel.cancelled().await;
            // Membership watches never end by themselves: end them, or the graceful
            // shutdown would wait for them.
            watches.close_watches();
        })
    });
    services.spawn("control-loop", move |cancel| control.run(cancel));
    if let Some(metrics) = metrics {
        services.spawn("metrics", move |cancel| metrics.serve(cancel));
    }
    if let Some(watch) = cert_watch {
        services.spawn("cert-watch", move |cancel| watch.run(cancel));
    }
    let shutdown = match fn_lifecycle::signal::shutdown_signal() {
        Ok(signal) => signal,
        Err(e) => return fn_lifecycle::exit_status(Err(e)),
    };
    health.set_serving().await;
    tracing::info!(port = cli.grpc_port, control_plane = ?cli.control_plane.control_plane, "npm serving");

    fn_lifecycle::exit_status(services.run(shutdown, cli.common.shutdown_timeout).await)
}
