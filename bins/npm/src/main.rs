//! npm, the node pool manager: aggregates the LBs' capacity adverts per LB group and keeps
//! each group's runner set sized to demand through a control plane.

use std::process::ExitCode;

use clap::Parser;
use fn_lifecycle::config::{CommonArgs, exit_config_error, parse_or_exit};
use fn_lifecycle::{CancellationToken, Health, Services};
use fn_tls::TlsArgs;
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
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    let tls = cli.tls.load().unwrap_or_else(|e| exit_config_error(e));
    fn_lifecycle::logging::init(&cli.common.log_level, cli.common.log_format)
        .unwrap_or_else(|e| exit_config_error(e));
    fn_tls::install_crypto_provider();
    fn_tls::warn_if_insecure(&tls);

    let listener =
        match fn_lifecycle::bind(cli.common.listen_on(cli.grpc_port), "FN_GRPC_PORT").await {
            Ok(l) => l,
            Err(e) => return fn_lifecycle::exit_status(Err(e)),
        };
    let server = match fn_tls::grpc_server(&tls) {
        Ok(s) => s,
        Err(e) => return fn_lifecycle::exit_status(Err(e)),
    };
    let (health, health_service) = Health::new(&[]);
    let mut services = Services::new(CancellationToken::new()).with_health(health.clone());
    let mut server = server;
    let router = server.add_service(health_service);
    services.spawn("grpc", move |cancel| {
        router.serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            cancel.cancelled_owned(),
        )
    });
    health.set_serving().await;
    tracing::info!(port = cli.grpc_port, "npm serving");

    let shutdown = async {
        if let Err(e) = fn_lifecycle::signal::shutdown_signal().await {
            tracing::error!(error = %e, "cannot install signal handlers; shutting down");
        }
    };
    fn_lifecycle::exit_status(services.run(shutdown, cli.common.shutdown_timeout).await)
}
