//! `DirectChannel` against a real tonic server: it dials on first use, redials once the
//! server has gone and come back, and a dial that cannot finish fails within the connect
//! timeout with an error that names the server.

use std::time::{Duration, Instant};

mod common;
use common::{check, direct_health as health, start_server, start_server_at};

use fn_tls::dev::DevCa;
use fn_tls::{DirectChannel, TlsMode};

#[tokio::test]
async fn dials_on_first_use_and_again_after_the_server_restarts() {
    let ca = DevCa::new("ca").expect("ca");
    let node = ca.node_tls(&[]).expect("node");
    let server = start_server(&node).await;
    let address = server.address.clone();
    let mode = TlsMode::Mutual(ca.node_tls(&[]).expect("client"));
    let channel =
        DirectChannel::new(&mode, &address, Duration::from_secs(5)).expect("a valid address");
    health(&channel).await.expect("first call dials");
    health(&channel)
        .await
        .expect("second call on the same connection");

    drop(server);
    let start = Instant::now();
    while health(&channel).await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "calls still succeed after the server stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let down = health(&channel).await.expect_err("nobody listens");
    assert_eq!(down.code(), tonic::Code::Unavailable, "{down:?}");
    assert!(down.message().contains(&address), "{down:?}");

    let _server = start_server_at(&node, &address).await;
    check(&mode, &address)
        .await
        .expect("the restarted server serves a new tonic channel");
    health(&channel)
        .await
        .expect("the next call after the restart dials a new connection");
}

/// The address of a server that accepts connections and never answers: no TLS handshake
/// with it can finish. It runs until the test's runtime ends.
async fn silent_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    address
}

#[tokio::test]
async fn a_dial_that_cannot_finish_fails_within_the_connect_timeout() {
    let ca = DevCa::new("ca").expect("ca");
    let address = silent_server().await;
    let mode = TlsMode::Mutual(ca.node_tls(&[]).expect("client"));
    let channel =
        DirectChannel::new(&mode, &address, Duration::from_millis(300)).expect("a valid address");
    let start = Instant::now();
    let err = health(&channel).await.expect_err("no handshake");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(&address) && err.message().contains("no connection within"),
        "{err:?}"
    );
}

/// Calls waiting for the same dial share its failure: four calls to a server that never
/// answers fail after one connect timeout, not one after another in four.
#[tokio::test]
async fn calls_waiting_for_a_dial_that_fails_fail_with_it() {
    let ca = DevCa::new("ca").expect("ca");
    let address = silent_server().await;
    let mode = TlsMode::Mutual(ca.node_tls(&[]).expect("client"));
    // A second: dialling in turn (4 s) is then seconds away from the bound (3 s), and one
    // dial (1 s) too.
    let timeout = Duration::from_secs(1);
    let channel = DirectChannel::new(&mode, &address, timeout).expect("a valid address");
    let start = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let channel = channel.clone();
            tokio::spawn(async move { health(&channel).await })
        })
        .collect();
    for call in calls {
        let err = call
            .await
            .expect("the call's task")
            .expect_err("no handshake");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(err.message().contains("no connection within"), "{err:?}");
    }
    let took = start.elapsed();
    assert!(
        took < 3 * timeout,
        "four waiting calls took {took:?}, each dialling in turn"
    );
    // A call that comes after the failure dials again, rather than reusing it.
    let start = Instant::now();
    health(&channel).await.expect_err("still no handshake");
    assert!(start.elapsed() >= timeout, "took {:?}", start.elapsed());
}

/// A server that refuses this node's certificate (its CA is not in the server's bundle)
/// says so only after the client's side of the TLS handshake has finished, in an alert on
/// the first read: the call's error carries that cause, not only hyper's "connection
/// error", which read as a runner that was down.
#[tokio::test]
async fn a_refused_certificate_is_named_in_the_calls_error() {
    let ca = DevCa::new("the server's CA").expect("ca");
    let server = start_server(&ca.node_tls(&[]).expect("node")).await;
    let stranger = DevCa::new("another CA").expect("ca");
    let node = stranger.node(&[]).expect("node");
    // The client trusts the server's CA, but presents a certificate from another.
    let client = fn_tls::NodeTls::from_pem(
        node.cert_pem.into_bytes(),
        node.key_pem.into_bytes(),
        ca.cert_pem().as_bytes().to_vec(),
    )
    .expect("client material");
    let channel = DirectChannel::new(
        &TlsMode::Mutual(client),
        &server.address,
        Duration::from_secs(5),
    )
    .expect("a valid address");
    let err = health(&channel).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(&server.address) && err.message().contains("alert"),
        "{err:?}"
    );
}

#[test]
fn an_address_that_is_no_uri_authority_is_refused() {
    let err = DirectChannel::new(
        &TlsMode::Insecure,
        "no spaces allowed:1",
        Duration::from_secs(1),
    )
    .expect_err("not an authority");
    assert!(!err.to_string().is_empty());
}
