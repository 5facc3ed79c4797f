//! What the TLS tests share: a real tonic server (the standard health service) on loopback
//! with the crate's own transport.

use fn_tls::{NodeTls, TlsMode};

/// A health server; stops when dropped.
pub struct Server {
    pub address: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Serves gRPC health, SERVING, with mutual TLS from `tls`.
pub async fn start_server(tls: &NodeTls) -> Server {
    fn_tls::install_crypto_provider();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let incoming =
        fn_tls::grpc_incoming(&TlsMode::Mutual(tls.clone()), listener).expect("server config");
    tokio::spawn(async move {
        let _reporter = reporter;
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
        _stop: stop,
    }
}
