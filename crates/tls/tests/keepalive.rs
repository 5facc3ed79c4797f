//! A channel from `grpc_endpoint` whose connection went silent (a peer's host gone, a
//! partition: no FIN, no RST) finds out by its HTTP/2 keepalive and dials again, even when
//! each call on it is short and times out before any ping would be sent for it. Without the
//! pings, such a connection lasted until TCP gave up retransmitting (about 15 minutes) and
//! every call on the channel timed out meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod common;
use common::start_server;

use fn_tls::TlsMode;
use fn_tls::dev::DevCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Copies `from` to `to` until either ends, or, once `frozen` is set, stops moving bytes
/// and holds both sockets open, as a path that drops every packet would.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let Ok(read) = from.read(&mut buffer).await else {
            return;
        };
        if read == 0 || frozen.load(Ordering::Acquire) {
            break;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
    if frozen.load(Ordering::Acquire) {
        // Hold both halves: the peer sees neither an end nor an error.
        std::future::pending::<()>().await;
    }
}

/// A TCP proxy to `upstream`. Setting the flag it returns freezes every connection open at
/// that moment (at the proxy's next accept, which the count it returns counts); connections
/// made later pass (the peer is reachable again, by a new path).
async fn freezing_proxy(upstream: String) -> (String, Arc<AtomicBool>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let freeze = Arc::new(AtomicBool::new(false));
    let freezing = Arc::clone(&freeze);
    let accepts = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::clone(&accepts);
    tokio::spawn(async move {
        // Each connection has its own flag, set by a freeze that finds it open.
        let mut open: Vec<Arc<AtomicBool>> = Vec::new();
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            if freezing.swap(false, Ordering::AcqRel) {
                for connection in open.drain(..) {
                    connection.store(true, Ordering::Release);
                }
            }
            // Counted once a freeze it found has taken effect.
            accepted.fetch_add(1, Ordering::AcqRel);
            let Ok(server) = TcpStream::connect(&upstream).await else {
                continue;
            };
            let frozen = Arc::new(AtomicBool::new(false));
            open.push(Arc::clone(&frozen));
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(pump(client_read, server_write, Arc::clone(&frozen)));
            tokio::spawn(pump(server_read, client_write, frozen));
        }
    });
    (address, freeze, accepts)
}

#[tokio::test]
async fn a_silent_connection_is_found_by_keepalive_and_the_channel_dials_again() {
    let ca = DevCa::new("ca").expect("ca");
    let server = start_server(&ca.node_tls(&[]).expect("node")).await;
    let (address, freeze, accepts) = freezing_proxy(server.address.clone()).await;
    let mode = TlsMode::Mutual(ca.node_tls(&[]).expect("client"));
    // As the LB's unary channels to the npm: calls time out well before a keepalive
    // interval, so no ping is ever sent for a call in flight.
    let channel = fn_tls::grpc_endpoint(&mode, &address)
        .expect("endpoint")
        .with(|e| {
            e.connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(1))
        })
        .connect_lazy();
    let mut client = HealthClient::new(channel);
    let check = HealthCheckRequest::default();
    client
        .check(check.clone())
        .await
        .expect("through the proxy");

    // Freeze the connection the channel holds. The flag takes effect at the next accept:
    // make one, so that the channel's connection is frozen before it is used again.
    let before = accepts.load(Ordering::Acquire);
    freeze.store(true, Ordering::Release);
    drop(TcpStream::connect(&address).await.expect("poke the proxy"));
    let poked = Instant::now();
    while accepts.load(Ordering::Acquire) == before {
        assert!(
            poked.elapsed() < Duration::from_secs(10),
            "the proxy never accepted the poke"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stuck = client.check(check.clone()).await;
    assert!(
        stuck.is_err(),
        "an answer through a frozen connection: {stuck:?}"
    );

    // Keepalive (10 s between pings, 5 s for the answer) finds the connection dead; the
    // next call dials again.
    let start = Instant::now();
    loop {
        if client.check(check.clone()).await.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the channel never left its silent connection"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
