//! Mutual TLS end to end: a real tonic server (the standard health service) on loopback,
//! clients with good and bad identities.

use std::time::Duration;

mod common;
use common::{check, start_server};

use fn_tls::dev::DevCa;
use fn_tls::{NodeTls, TlsMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn valid_certificates_succeed() {
    let ca = DevCa::new("ca").expect("ca");
    let server = start_server(&ca.node_tls(&[]).expect("node")).await;
    let client = TlsMode::Mutual(ca.node_tls(&[]).expect("client"));
    check(&client, &server.address)
        .await
        .expect("valid client accepted");
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let ca = DevCa::new("ca").expect("ca");
    let server = start_server(&ca.node_tls(&[]).expect("node")).await;
    // Trusts the server, presents nothing.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", server.address))
        .expect("uri")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca.cert_pem()))
                .domain_name("localhost"),
        )
        .expect("tls config");
    let result = match endpoint.connect().await {
        Ok(channel) => HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(format!("connect failed: {e:?}"))),
    };
    // TLS 1.3: the handshake completes on the client's side, and the server's verdict comes
    // as an alert on the first RPC.
    let err = format!(
        "{:?}",
        result.expect_err("a client without a certificate is rejected")
    );
    assert!(err.contains("CertificateRequired"), "{err}");
    // The server still serves a valid client.
    let client = TlsMode::Mutual(ca.node_tls(&[]).expect("client"));
    check(&client, &server.address)
        .await
        .expect("still serving");
}

#[tokio::test]
async fn certificate_from_another_ca_is_rejected_both_ways() {
    let ca = DevCa::new("ca").expect("ca");
    let other = DevCa::new("other").expect("other ca");
    let server = start_server(&ca.node_tls(&[]).expect("node")).await;

    // Client cert signed by another CA, but trusting the right CA: server rejects it.
    let foreign = other.node(&[]).expect("foreign node");
    let client = TlsMode::Mutual(
        NodeTls::from_pem(
            foreign.cert_pem.into_bytes(),
            foreign.key_pem.into_bytes(),
            ca.cert_pem().as_bytes().to_vec(),
        )
        .expect("foreign material parses"),
    );
    let err = check(&client, &server.address)
        .await
        .expect_err("foreign client");
    assert!(
        err.contains("UnknownCA"),
        "the server names the reason: {err}"
    );

    // A client of the other CA does not trust the server either.
    let client = TlsMode::Mutual(other.node_tls(&[]).expect("other client"));
    let err = check(&client, &server.address)
        .await
        .expect_err("server not trusted");
    assert!(err.contains("UnknownIssuer"), "{err}");

    let client = TlsMode::Mutual(ca.node_tls(&[]).expect("client"));
    check(&client, &server.address)
        .await
        .expect("still serving");
}

#[tokio::test]
async fn expired_certificates_are_rejected() {
    let ca = DevCa::new("ca").expect("ca");
    let server = start_server(&ca.node_tls(&[]).expect("node")).await;
    let expired = ca.expired_node(&[]).expect("expired");
    let client = TlsMode::Mutual(ca.tls_for(&expired).expect("material"));
    let err = check(&client, &server.address)
        .await
        .expect_err("expired client certificate");
    assert!(err.contains("CertificateExpired"), "{err}");

    // And a server with an expired certificate is not trusted by a valid client.
    let expired_server = start_server(
        &ca.tls_for(&ca.expired_node(&[]).expect("expired"))
            .expect("material"),
    )
    .await;
    let client = TlsMode::Mutual(ca.node_tls(&[]).expect("client"));
    let err = check(&client, &expired_server.address)
        .await
        .expect_err("expired server certificate");
    assert!(err.contains("Expired"), "{err}");
    check(&client, &server.address)
        .await
        .expect("still serving");
}

#[tokio::test]
async fn plaintext_client_fails_cleanly_and_server_keeps_serving() {
    let ca = DevCa::new("ca").expect("ca");
    let server = start_server(&ca.node_tls(&[]).expect("node")).await;

    // A plaintext gRPC client.
    check(&TlsMode::Insecure, &server.address)
        .await
        .expect_err("plaintext client rejected");

    // Raw garbage on the socket: the server closes the connection.
    let mut raw = tokio::net::TcpStream::connect(&server.address)
        .await
        .expect("tcp connect");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "server must close a plaintext connection, not hang"
    );

    let client = TlsMode::Mutual(ca.node_tls(&[]).expect("client"));
    check(&client, &server.address)
        .await
        .expect("still serving");
}

#[tokio::test]
async fn server_name_override_is_used() {
    let ca = DevCa::new("ca").expect("ca");
    // Server cert only for "fn-node" (and the default loopback names).
    let server = start_server(&ca.node_tls(&["fn-node"]).expect("node")).await;
    let good = TlsMode::Mutual(
        ca.node_tls(&[])
            .expect("client")
            .with_server_name("fn-node"),
    );
    check(&good, &server.address)
        .await
        .expect("override matches a SAN");
    let bad = TlsMode::Mutual(
        ca.node_tls(&[])
            .expect("client")
            .with_server_name("elsewhere"),
    );
    check(&bad, &server.address)
        .await
        .expect_err("override that matches no SAN");
}
