//! What the TLS tests share: a real tonic server (the standard health service) on loopback
//! with the crate's own transport. Each test file uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use fn_tls::{DirectChannel, NodeTls, TlsMode};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A health server; stops when dropped.
pub struct Server {
    pub address: String,
    /// Sets the status the server's health service reports.
    pub reporter: tonic_health::server::HealthReporter,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Serves gRPC health, SERVING, with mutual TLS from `tls`.
pub async fn start_server(tls: &NodeTls) -> Server {
    start_server_at(tls, "127.0.0.1:0").await
}

/// [`start_server`] on `address` (`127.0.0.1:0` for any free port).
pub async fn start_server_at(tls: &NodeTls, address: &str) -> Server {
    fn_tls::install_crypto_provider();
    let listener = tokio::net::TcpListener::bind(address).await.expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let incoming =
        fn_tls::grpc_incoming(&TlsMode::Mutual(tls.clone()), listener).expect("server config");
    tokio::spawn(async move {
        fn_tls::grpc_server()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
    });
    Server {
        address,
        reporter,
        _stop: stop,
    }
}

/// A channel to `address` under `mode`, connected now.
pub async fn channel(mode: &TlsMode, address: &str) -> Result<Channel, String> {
    fn_tls::grpc_endpoint(mode, address)
        .map_err(|e| e.to_string())?
        .with(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(5))
        })
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))
}

/// One health check on `channel`.
pub async fn health(channel: Channel) -> Result<(), String> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
        .map_err(|e| format!("rpc: {e:?}"))
}

/// A new connection from `mode`, and one health check on it.
pub async fn check(mode: &TlsMode, address: &str) -> Result<(), String> {
    health(channel(mode, address).await?).await
}

/// One health check on a [`DirectChannel`].
pub async fn direct_health(channel: &DirectChannel) -> Result<(), tonic::Status> {
    HealthClient::with_origin(channel.clone(), channel.origin())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

/// A server of `route`'s services (`route` adds them to the builder) with mutual TLS on
/// loopback, and a [`DirectChannel`] to it from another node of the same CA. The server
/// stops with the test's runtime.
pub async fn direct_to(
    route: impl FnOnce(
        &mut fn_tls::GrpcServer,
    ) -> tonic::transport::server::Router<fn_tls::GrpcServerLayer>,
) -> DirectChannel {
    fn_tls::install_crypto_provider();
    let ca = fn_tls::dev::DevCa::new("ca").expect("ca");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let incoming = fn_tls::grpc_incoming(
        &TlsMode::Mutual(ca.node_tls(&[]).expect("server")),
        listener,
    )
    .expect("server config");
    let router = route(&mut fn_tls::grpc_server());
    tokio::spawn(router.serve_with_incoming(incoming));
    let mode = TlsMode::Mutual(ca.node_tls(&[]).expect("client"));
    DirectChannel::new(&mode, &address, Duration::from_secs(5)).expect("a valid address")
}
