//! The Prometheus scrape endpoint: `GET /metrics` on `FN_METRICS_PORT`.
//!
//! Owns only the serving: each daemon's `main.rs` creates one [`Registry`], hands it to the
//! constructors that register their metric families (no global statics), and then gives it
//! to [`listen`]. Does not own any metric: those live with the code they measure.
//!
//! Answers, over HTTP/1.1:
//! - `GET /metrics` (or `HEAD`): 200 with the OpenMetrics text exposition;
//! - another method on `/metrics`: 405 with `Allow: GET, HEAD`;
//! - any other path: 404, plain text.
//!
//! The endpoint is unauthenticated plain HTTP: it exposes counters, never call data, and is
//! meant for a monitoring network. When `FN_METRICS_PORT` is unset no listener is opened.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::BindError;
use crate::config::CommonArgs;

/// The content type of the OpenMetrics text format, which is what the registry encodes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The only path served.
pub const PATH: &str = "/metrics";

/// How long a scraper may take to send its request head, and how long an idle keep-alive
/// connection stays open: a silent client must not hold a connection forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most scrapes served at once; a connection beyond them is closed at once. A scraper
/// opens one at a time, and every connection costs a descriptor the daemon's calls need.
const MAX_CONNECTIONS: usize = 32;
/// Most of them from one address: one host opening connections and sending nothing (each
/// held up to the header timeout) cannot keep the scrapers out.
const MAX_CONNECTIONS_PER_ADDRESS: usize = 8;
/// How long a connection may last, its one scrape included (connections are not kept
/// alive: a scrape is one request). A client that stops reading its answer held its
/// connection for ever (hyper's HTTP/1 server has no write timeout).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// How long a shutdown waits for scrapes under way: a scraper that sends half a request or
/// stops reading its answer must not hold the daemon's exit up to its shutdown bound.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(1);

/// A bound metrics listener with the registry it exposes, ready to [`serve`](Self::serve).
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
    registry: Arc<Registry>,
    /// [`MAX_CONNECTIONS`], [`MAX_CONNECTIONS_PER_ADDRESS`] and [`CONNECTION_LIFETIME`],
    /// but in tests.
    max_connections: usize,
    max_per_address: usize,
    lifetime: Duration,
}

/// Binds `FN_LISTEN_ADDR:FN_METRICS_PORT` when `FN_METRICS_PORT` is set; `None` when it is
/// not (no metrics listener at all).
///
/// # Errors
/// [`BindError`] naming `FN_METRICS_PORT` when the port cannot be bound.
pub async fn listen(
    common: &CommonArgs,
    registry: Registry,
) -> Result<Option<MetricsEndpoint>, BindError> {
    let Some(port) = common.metrics_port else {
        return Ok(None);
    };
    let listener = crate::bind(common.listen_on(port), "FN_METRICS_PORT").await?;
    Ok(Some(MetricsEndpoint::new(listener, registry)))
}

impl MetricsEndpoint {
    /// An endpoint on an already bound listener (tests bind `127.0.0.1:0`).
    pub fn new(listener: TcpListener, registry: Registry) -> Self {
        MetricsEndpoint {
            listener,
            registry: Arc::new(registry),
            max_connections: MAX_CONNECTIONS,
            max_per_address: MAX_CONNECTIONS_PER_ADDRESS,
            lifetime: CONNECTION_LIFETIME,
        }
    }

    /// The bound address.
    ///
    /// # Errors
    /// When the socket cannot tell (it was closed underneath).
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves scrapes until `cancel`, then stops accepting and lets open scrapes finish.
    ///
    /// # Errors
    /// Never: accept errors are logged and retried.
    pub async fn serve(self, cancel: CancellationToken) -> Result<(), Infallible> {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(false);
        let accept_warnings = crate::logging::Throttle::new(Duration::from_secs(1));
        let crowded_warnings = crate::logging::Throttle::new(Duration::from_secs(10));
        let places = Arc::new(tokio::sync::Semaphore::new(self.max_connections));
        let per_address = Arc::new(PerAddress::default());
        let lifetime = self.lifetime;
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    crate::warn_throttled!(accept_warnings, error = %e, "metrics: accept failed");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            };
            let Some(address_place) = per_address.claim(peer.ip(), self.max_per_address) else {
                crate::warn_throttled!(
                    crowded_warnings,
                    %peer,
                    limit = self.max_per_address,
                    "metrics: connection refused, too many open from this address"
                );
                continue;
            };
            let Ok(place) = Arc::clone(&places).try_acquire_owned() else {
                crate::warn_throttled!(
                    crowded_warnings,
                    %peer,
                    limit = self.max_connections,
                    "metrics: connection refused, too many open at once"
                );
                continue; // drops the socket
            };
            let registry = Arc::clone(&self.registry);
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = respond(&registry, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                match tokio::time::timeout(lifetime, conn).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "metrics connection ended with an error");
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "metrics connection closed: it outlasted its bound")
                    }
                }
                drop((place, address_place));
            });
        }
        drop(self.listener);
        if tokio::time::timeout(SHUTDOWN_DRAIN, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::info!(
                "metrics: a scrape was still under way at shutdown; its connection is dropped"
            );
        }
        Ok(())
    }
}

/// Open connections per peer address.
#[derive(Debug, Default)]
struct PerAddress(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl PerAddress {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a connection from `ip`, unless it holds `limit` already.
    fn claim(self: &Arc<Self>, ip: std::net::IpAddr, limit: usize) -> Option<AddressPlace> {
        let ip = ip.to_canonical();
        let mut counts = self.lock();
        let held = counts.entry(ip).or_insert(0);
        if *held >= limit {
            return None;
        }
        *held += 1;
        Some(AddressPlace(Arc::clone(self), ip))
    }
}

/// One connection's place among its address's; given back when dropped.
#[derive(Debug)]
struct AddressPlace(Arc<PerAddress>, std::net::IpAddr);

impl Drop for AddressPlace {
    fn drop(&mut self) {
        let mut counts = self.0.lock();
        if let Some(held) = counts.get_mut(&self.1) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.remove(&self.1);
            }
        }
    }
}

/// The text exposition of everything registered in `registry`.
///
/// # Errors
/// When a metric or collector fails to encode itself.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// Answers one request.
pub fn respond<B>(registry: &Registry, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.uri().path() != PATH {
        return plain(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed; use GET\n",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match encode(registry) {
        Ok(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
            response
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics: encoding the registry failed");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding the metrics failed\n",
            )
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sends one raw HTTP/1.1 request and returns the whole response as text.
    async fn raw(address: std::net::SocketAddr, method: &str, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send request");
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await
            .expect("answered in time")
            .expect("read response");
        response
    }

    async fn start() -> (std::net::SocketAddr, Counter, CancellationToken) {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register(
            "fn_test_things",
            "Things counted by the test",
            counter.clone(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = MetricsEndpoint::new(listener, registry);
        let address = endpoint.local_addr().expect("address");
        let cancel = CancellationToken::new();
        tokio::spawn(endpoint.serve(cancel.clone()));
        (address, counter, cancel)
    }

    #[tokio::test]
    async fn a_scrape_shows_a_registered_counters_value() {
        let (address, counter, cancel) = start().await;
        counter.inc_by(3);
        let response = raw(address, "GET", "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response.contains(&format!("content-type: {CONTENT_TYPE}")),
            "{response}"
        );
        assert!(
            response.contains("\nfn_test_things_total 3\n"),
            "{response}"
        );
        assert!(response.trim_end().ends_with("# EOF"), "{response}");
        counter.inc();
        let response = raw(address, "GET", "/metrics").await;
        assert!(
            response.contains("\nfn_test_things_total 4\n"),
            "{response}"
        );
        cancel.cancel();
    }

    #[tokio::test]
    async fn other_paths_get_404_in_plain_text() {
        let (address, _counter, cancel) = start().await;
        for path in ["/", "/metricsx", "/health", "/metrics/"] {
            let response = raw(address, "GET", path).await;
            assert!(response.starts_with("HTTP/1.1 404"), "{path}: {response}");
            assert!(response.contains("content-type: text/plain"), "{response}");
            assert!(!response.contains('{'), "{response}");
        }
        cancel.cancel();
    }

    #[tokio::test]
    async fn other_methods_on_metrics_get_405_with_allow() {
        let (address, _counter, cancel) = start().await;
        for method in ["POST", "PUT", "DELETE"] {
            let response = raw(address, method, "/metrics").await;
            assert!(response.starts_with("HTTP/1.1 405"), "{method}: {response}");
            assert!(response.contains("allow: GET, HEAD"), "{response}");
        }
        cancel.cancel();
    }

    /// Whether the server closes `stream` within `within`.
    async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(within, stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// Connections beyond the limit are closed at once; a connection is closed at the end
    /// of its lifetime whatever it is doing (here, sending nothing: before, until hyper's
    /// header timeout; with an answer it does not read, for ever).
    #[tokio::test]
    async fn connections_are_bounded_in_number_and_in_time() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut endpoint = MetricsEndpoint::new(listener, Registry::default());
        endpoint.max_connections = 2;
        endpoint.lifetime = Duration::from_millis(600);
        let address = endpoint.local_addr().expect("address");
        let cancel = CancellationToken::new();
        tokio::spawn(endpoint.serve(cancel.clone()));
        let connect = || async {
            tokio::net::TcpStream::connect(address)
                .await
                .expect("connect")
        };
        let started = tokio::time::Instant::now();
        let mut first = connect().await;
        let mut second = connect().await;
        let mut third = connect().await;
        assert!(
            closed_within(&mut third, Duration::from_millis(400)).await,
            "a third connection is closed at once"
        );
        assert!(
            closed_within(&mut first, Duration::from_secs(3)).await,
            "closed at the end of its lifetime"
        );
        assert!(closed_within(&mut second, Duration::from_secs(3)).await);
        let lasted = started.elapsed();
        assert!(
            lasted >= Duration::from_millis(500) && lasted < HEADER_READ_TIMEOUT,
            "{lasted:?}"
        );
        // Places given back: a scrape is served.
        let answer = raw(address, "GET", "/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        cancel.cancel();
    }

    /// One address holding its share of connections leaves the others theirs.
    #[tokio::test]
    async fn one_address_cannot_hold_every_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut endpoint = MetricsEndpoint::new(listener, Registry::default());
        endpoint.max_connections = 8;
        endpoint.max_per_address = 2;
        let address = endpoint.local_addr().expect("address");
        let cancel = CancellationToken::new();
        tokio::spawn(endpoint.serve(cancel.clone()));
        let from = |ip: [u8; 4]| async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind(std::net::SocketAddr::from((ip, 0)))
                .expect("bind a loopback address");
            socket.connect(address).await.expect("connect")
        };
        let _first = from([127, 0, 0, 2]).await;
        let _second = from([127, 0, 0, 2]).await;
        let mut third = from([127, 0, 0, 2]).await;
        assert!(
            closed_within(&mut third, Duration::from_secs(2)).await,
            "a third from one address is closed"
        );
        let answer = raw(address, "GET", "/metrics").await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "another address is served: {answer}"
        );
        cancel.cancel();
    }

    #[tokio::test]
    async fn serving_stops_on_cancel() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = MetricsEndpoint::new(listener, Registry::default());
        let cancel = CancellationToken::new();
        let serving = tokio::spawn(endpoint.serve(cancel.clone()));
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("stopped in time")
            .expect("no panic")
            .expect("infallible");
    }

    /// Before, a scraper that sent half a request held the shutdown until hyper's header
    /// timeout (10 s), past a daemon's shutdown bound.
    #[tokio::test]
    async fn a_half_sent_scrape_does_not_hold_up_the_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = MetricsEndpoint::new(listener, Registry::default());
        let address = endpoint.local_addr().expect("address");
        let cancel = CancellationToken::new();
        let serving = tokio::spawn(endpoint.serve(cancel.clone()));
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: te")
            .await
            .expect("half a request");
        tokio::time::sleep(Duration::from_millis(100)).await;
        cancel.cancel();
        tokio::time::timeout(SHUTDOWN_DRAIN * 3, serving)
            .await
            .expect("stopped within the drain bound")
            .expect("no panic")
            .expect("infallible");
    }

    #[tokio::test]
    async fn no_port_no_listener_and_a_taken_port_names_the_variable() {
        let mut common = CommonArgs {
            log_level: "info".into(),
            log_format: crate::config::LogFormat::Text,
            listen_addr: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            shutdown_timeout: Duration::from_secs(1),
            metrics_port: None,
            worker_threads: None,
            shards: 1,
        };
        assert!(
            listen(&common, Registry::default())
                .await
                .expect("nothing to bind")
                .is_none()
        );
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        common.metrics_port = Some(taken.local_addr().expect("address").port());
        let err = listen(&common, Registry::default())
            .await
            .expect_err("port in use");
        assert!(
            err.to_string()
                .starts_with("FN_METRICS_PORT: cannot listen on"),
            "{err}"
        );
    }
}
