//! HTTP/2 flow control between a [`DirectChannel`] (the lb-agent's side) and a
//! [`fn_tls::grpc_server`] (the runner's): calls whose bytes nobody reads (a slow HTTP client
//! behind the LB, a function that ignores its input) hold at most their own stream's window,
//! and never the connection's, so every other call on the connection keeps moving.
//!
//! Also: calls cancelled in bursts, while their answers are still arriving, do not tear the
//! connection down (h2 counts each frame that arrives for a stream it has already forgotten).
//!
//! The server here is a raw service on the real transport: `Big` answers 3 MiB, more than a
//! stream's window; `Drip` answers a small frame every millisecond until reset; `Hold`
//! answers and never reads its request; `Echo` reads its request, then answers with it.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

mod common;

use bytes::Bytes;
use fn_tls::{CONNECTION_WINDOW, DirectChannel, STREAM_WINDOW};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tonic::body::Body;
use tonic::codegen::Service;

/// Bytes each `Big` answer and each `Hold` request carry: more than one stream's window.
const LARGE: u64 = 3 * 1024 * 1024;
const CHUNK: usize = 256 * 1024;
/// Calls left unread: more than the connection's window holds at one stream's window each
/// before this fix (64 MiB / 2 MiB = 32).
const UNREAD_CALLS: usize = 40;
/// Bytes the unread calls have moved before the small call is made: most of what a 64 MiB
/// connection window held, which is all that moved before this fix; [`SETTLE`] lets the
/// rest follow. Each unread call moves at most its stream's window (2 MiB).
const MOVED: u64 = 56 * 1024 * 1024;
const SETTLE: Duration = Duration::from_millis(300);
/// Bound for a call on a connection that is not stalled (under a debug build, while the
/// unread calls' data is still being moved).
const BOUND: Duration = Duration::from_secs(10);

/// The raw flood service, counting the bytes its `Big` answers have handed to HTTP/2.
#[derive(Clone)]
struct Flood {
    sent: Arc<AtomicU64>,
}

impl tonic::server::NamedService for Flood {
    const NAME: &'static str = "flood.Flood";
}

/// `LARGE` bytes in `CHUNK`s, each counted into `counter` as it is taken.
fn large_body(counter: Arc<AtomicU64>) -> Body {
    let chunks = (0..LARGE.div_ceil(CHUNK as u64)).map(move |_| {
        counter.fetch_add(CHUNK as u64, Ordering::Relaxed);
        Ok::<_, tonic::Status>(Frame::data(Bytes::from(vec![7u8; CHUNK])))
    });
    Body::new(StreamBody::new(futures::stream::iter(chunks)))
}

impl Service<http::Request<Body>> for Flood {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let sent = Arc::clone(&self.sent);
        Box::pin(async move {
            let body = match request.uri().path() {
                "/flood.Flood/Big" => large_body(sent),
                "/flood.Flood/Drip" => {
                    // A small frame every millisecond until the stream is reset.
                    let ticks = futures::stream::unfold((), |()| async {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        Some((
                            Ok::<_, tonic::Status>(Frame::data(Bytes::from_static(b"drip"))),
                            (),
                        ))
                    });
                    Body::new(StreamBody::new(ticks))
                }
                "/flood.Flood/Hold" => {
                    // The request stays unread for as long as the answer is open.
                    let unread = request.into_body();
                    Body::new(StreamBody::new(futures::stream::once(async move {
                        let _unread = unread;
                        std::future::pending::<Result<Frame<Bytes>, tonic::Status>>().await
                    })))
                }
                _ => match request.into_body().collect().await {
                    Ok(read) => Body::new(Full::new(read.to_bytes())),
                    Err(e) => Body::new(Full::new(Bytes::from(e.to_string()))),
                },
            };
            Ok(http::Response::new(body))
        })
    }
}

struct Setup {
    channel: DirectChannel,
    sent: Arc<AtomicU64>,
}

async fn setup() -> Setup {
    let sent = Arc::new(AtomicU64::new(0));
    let service = Flood {
        sent: Arc::clone(&sent),
    };
    let channel = common::direct_to(|server| server.add_service(service)).await;
    Setup { channel, sent }
}

fn request(channel: &DirectChannel, method: &str, body: Body) -> http::Request<Body> {
    let uri = format!("{}flood.Flood/{method}", channel.origin());
    http::Request::post(uri)
        .header("content-type", "application/grpc")
        .body(body)
        .expect("a valid request")
}

/// Waits until `counter` reaches `at_least`, failing the test past [`BOUND`].
async fn wait_for(counter: &AtomicU64, at_least: u64, what: &str) {
    let start = Instant::now();
    while counter.load(Ordering::Relaxed) < at_least {
        assert!(
            start.elapsed() < BOUND,
            "{what}: {} of {at_least} bytes after {BOUND:?}",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One `Echo` of a small body on `channel`, within [`BOUND`].
async fn echo(channel: &DirectChannel) -> Result<Bytes, String> {
    let mut channel = channel.clone();
    let call = async move {
        let response = channel
            .call(request(
                &channel,
                "Echo",
                Body::new(Full::new(Bytes::from_static(b"ping"))),
            ))
            .await
            .map_err(|e| format!("call: {e}"))?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok(body.to_bytes())
    };
    tokio::time::timeout(BOUND, call)
        .await
        .map_err(|_| format!("no answer within {BOUND:?}: the connection is stalled"))?
}

#[test]
fn the_connection_window_outlasts_every_stream_window_a_slow_reader_can_hold() {
    // A stall needs the whole connection window held unread; that takes more calls than a
    // runner's connection carries.
    let streams = u64::from(CONNECTION_WINDOW) / u64::from(STREAM_WINDOW);
    assert!(
        streams >= 1000,
        "only {streams} unread calls fill a connection"
    );
}

#[tokio::test]
async fn answers_nobody_reads_do_not_stall_the_other_calls_on_the_connection() {
    let setup = setup().await;
    let mut unread = Vec::new();
    for _ in 0..UNREAD_CALLS {
        let mut channel = setup.channel.clone();
        let response = tokio::time::timeout(
            BOUND,
            channel.call(request(&setup.channel, "Big", Body::empty())),
        )
        .await
        .expect("a head within the bound")
        .expect("a head");
        unread.push(response.into_body());
    }
    wait_for(&setup.sent, MOVED, "the unread answers").await;
    tokio::time::sleep(SETTLE).await;
    let answer = echo(&setup.channel).await.expect("the echo is answered");
    assert_eq!(answer, Bytes::from_static(b"ping"));
    drop(unread);
}

#[tokio::test]
async fn requests_nobody_reads_do_not_stall_the_other_calls_on_the_connection() {
    let setup = setup().await;
    let taken = Arc::new(AtomicU64::new(0));
    let mut held = Vec::new();
    for _ in 0..UNREAD_CALLS {
        let mut channel = setup.channel.clone();
        let response = tokio::time::timeout(
            BOUND,
            channel.call(request(
                &setup.channel,
                "Hold",
                large_body(Arc::clone(&taken)),
            )),
        )
        .await
        .expect("a head within the bound")
        .expect("a head");
        held.push(response);
    }
    wait_for(&taken, MOVED, "the unread requests").await;
    tokio::time::sleep(SETTLE).await;
    let answer = echo(&setup.channel).await.expect("the echo is answered");
    assert_eq!(answer, Bytes::from_static(b"ping"));
    drop(held);
}

#[tokio::test]
async fn calls_cancelled_in_bursts_while_their_answers_arrive_leave_the_connection_up() {
    let setup = setup().await;
    // A call open throughout, on the same connection: it ends only if the connection does.
    let mut channel = setup.channel.clone();
    let witness = tokio::time::timeout(
        BOUND,
        channel.call(request(&setup.channel, "Drip", Body::empty())),
    )
    .await
    .expect("a head within the bound")
    .expect("a head");
    let mut witness = witness.into_body();
    // h2 remembers 50 reset streams for a second and, by default, closes the connection
    // after 1,024 frames for streams it has forgotten: 12 bursts of 200 give it ample.
    for burst in 0..12 {
        let calls = (0..200).map(|_| {
            let mut channel = setup.channel.clone();
            let call = channel.call(request(&setup.channel, "Drip", Body::empty()));
            async move {
                let response = tokio::time::timeout(BOUND, call)
                    .await
                    .map_err(|_| format!("no head within {BOUND:?}"))?
                    .map_err(|e| format!("the connection failed: {e}"))?;
                let mut body = response.into_body();
                // Its answer is arriving.
                match tokio::time::timeout(BOUND, body.frame()).await {
                    Ok(Some(Ok(_))) => Ok(body),
                    other => Err(format!("no first frame: {other:?}")),
                }
            }
        });
        let bodies: Vec<_> = futures::future::join_all(calls)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("burst {burst}: {e}"));
        // Every call of the burst cancelled at once.
        drop(bodies);
        // The witness keeps receiving.
        let next = tokio::time::timeout(BOUND, witness.frame()).await;
        assert!(
            matches!(next, Ok(Some(Ok(_)))),
            "burst {burst}: the call beside the cancelled ones ended: {next:?}"
        );
    }
    // Its frames still arrive after the last burst has been answered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..50 {
        let next = tokio::time::timeout(BOUND, witness.frame()).await;
        assert!(
            matches!(next, Ok(Some(Ok(_)))),
            "the call beside the cancelled ones ended: {next:?}"
        );
    }
}
