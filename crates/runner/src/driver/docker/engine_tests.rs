//! The docker driver against a fake Engine API on a unix socket: what it does when the
//! engine's answers break off, and what a shutdown leaves.
//!
//! The fake keeps containers in memory and answers the requests the driver makes (image
//! inspect, create, start, wait, logs, inspect, remove, list). A started container "listens"
//! when the fake binds `lsnr.sock` in the directory mounted into it, unless told not to.

use std::convert::Infallible;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::*;
use crate::pool::Pool;

/// One container of the fake engine.
struct FakeContainer {
    id: String,
    /// Whether it runs; waits answer once it does not.
    running: watch::Sender<bool>,
    /// The listener the fake opened for it, if it "listens".
    _listener: Option<tokio::net::UnixListener>,
}

#[derive(Default)]
struct FakeEngine {
    containers: Mutex<Vec<FakeContainer>>,
    /// Started containers never open their listener (an image slow to listen).
    never_listen: AtomicBool,
    /// Waits whose answer breaks off after its head, before these many have.
    broken_waits: AtomicUsize,
    /// Wait requests received.
    waits: AtomicUsize,
    /// Containers removed.
    removed: AtomicUsize,
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: u16, text: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(text.into()).map_err(|e| match e {}).boxed());
    *response.status_mut() = http::StatusCode::from_u16(status).expect("a status");
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().expect("a header"),
    );
    response
}

impl FakeEngine {
    fn count(&self) -> usize {
        self.containers.lock().expect("fake engine").len()
    }

    fn running(&self, id: &str) -> Option<watch::Receiver<bool>> {
        let containers = self.containers.lock().expect("fake engine");
        containers
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.running.subscribe())
    }

    async fn answer(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        // `/v1.NN/containers/...`: the version prefix goes.
        let path = match path.strip_prefix("/v") {
            Some(rest) => rest
                .find('/')
                .map_or(path.clone(), |at| rest[at..].to_owned()),
            None => path,
        };
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let body = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        match (method.as_str(), parts.as_slice()) {
            ("GET", ["_ping"]) => full(200, "OK"),
            ("GET", ["images", .., "json"]) => full(200, r#"{"Id":"sha256:feed"}"#),
            ("GET", ["containers", "json"]) => {
                let list: Vec<String> = self
                    .containers
                    .lock()
                    .expect("fake engine")
                    .iter()
                    .map(|c| format!(r#"{{"Id":"{}","Labels":{{}}}}"#, c.id))
                    .collect();
                full(200, format!("[{}]", list.join(",")))
            }
            ("POST", ["containers", "create"]) => {
                let text = String::from_utf8_lossy(&body);
                // The directory mounted at /tmp/iofs: a mount's source, or a bind's.
                let source = text
                    .split(r#""Source":""#)
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .or_else(|| {
                        let bind = text.split(r#""Binds":[""#).nth(1)?;
                        bind.split(':').next()
                    });
                let Some(source) = source else {
                    return full(400, r#"{"message":"no mount"}"#);
                };
                let mut containers = self.containers.lock().expect("fake engine");
                let id = format!("c{}", containers.len() + 1);
                let listener = if self.never_listen.load(Ordering::SeqCst) {
                    None
                } else {
                    let socket = Path::new(source).join(LISTENER_NAME);
                    Some(tokio::net::UnixListener::bind(socket).expect("the fake listens"))
                };
                containers.push(FakeContainer {
                    id: id.clone(),
                    running: watch::Sender::new(false),
                    _listener: listener,
                });
                full(201, format!(r#"{{"Id":"{id}","Warnings":[]}}"#))
            }
            ("POST", ["containers", id, "start"]) => {
                let containers = self.containers.lock().expect("fake engine");
                match containers.iter().find(|c| c.id == *id) {
                    Some(c) => {
                        c.running.send_replace(true);
                        full(204, "")
                    }
                    None => full(404, r#"{"message":"No such container"}"#),
                }
            }
            ("POST", ["containers", id, "wait"]) => {
                self.waits.fetch_add(1, Ordering::SeqCst);
                let Some(mut running) = self.running(id) else {
                    return full(404, r#"{"message":"No such container"}"#);
                };
                let breaks = self
                    .broken_waits
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                let answer = async move {
                    if breaks {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        return Err(std::io::Error::other("the proxy cut the answer"));
                    }
                    let _ = running.wait_for(|running| !running).await;
                    Ok(Frame::data(Bytes::from_static(br#"{"StatusCode":137}"#)))
                };
                let stream = futures::stream::once(answer);
                let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    "application/json".parse().expect("h"),
                );
                response
            }
            ("GET", ["containers", _, "logs"]) => full(200, ""),
            ("GET", ["containers", id, "json"]) => full(
                200,
                format!(r#"{{"Id":"{id}","State":{{"OOMKilled":false}}}}"#),
            ),
            ("DELETE", ["containers", id]) => {
                let mut containers = self.containers.lock().expect("fake engine");
                match containers.iter().position(|c| c.id == *id) {
                    Some(at) => {
                        containers.remove(at).running.send_replace(false);
                        self.removed.fetch_add(1, Ordering::SeqCst);
                        full(204, "")
                    }
                    None => full(404, r#"{"message":"No such container"}"#),
                }
            }
            _ => full(
                404,
                format!(r#"{{"message":"the fake has no {method} {path}"}}"#),
            ),
        }
    }
}

/// A fake engine on a socket in `dir`, and a client of it.
fn serve(dir: &Path, engine: Arc<FakeEngine>) -> Docker {
    let socket = dir.join("engine.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind the fake engine");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let engine = Arc::clone(&engine);
            let service = hyper::service::service_fn(move |request| {
                let engine = Arc::clone(&engine);
                async move { Ok::<_, Infallible>(engine.answer(request).await) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Docker::connect_with_unix(
        &socket.display().to_string(),
        10,
        bollard::API_DEFAULT_VERSION,
    )
    .expect("a client of the fake engine")
}

async fn driver(dir: &Path, engine: Arc<FakeEngine>) -> DockerDriver {
    let docker = serve(dir, engine);
    let config = DockerDriverConfig::new("runner-under-test", dir.join("iofs"));
    let metrics = DockerMetrics::register(&mut Registry::default());
    DockerDriver::with_engine(docker, config, metrics)
        .await
        .expect("the driver")
}

fn image_spec() -> InstanceSpec {
    InstanceSpec {
        app: "app".into(),
        function: "slow".into(),
        command: Vec::new(),
        image: Some("slow:1".into()),
        memory_mb: 64,
        concurrency: 1,
        idle_timeout: Duration::from_secs(30),
        config: BTreeMap::new(),
    }
}

/// Polls `done` every 10 ms for at most `within`; whether it held.
async fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

/// A runner stopping while a container still starts (its call gave up at its timeout; the
/// image listens late): the pool's shutdown ends the start, and the container and its
/// directory are gone when it returns. The start ran in a task of its own that nothing
/// waited for: the runner exited, its runtime dropped the task, and the container ran on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_removes_a_container_still_starting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Arc::new(FakeEngine::default());
    engine.never_listen.store(true, Ordering::SeqCst);
    let driver = Arc::new(driver(dir.path(), Arc::clone(&engine)).await);
    let pool = Pool::new(driver, 256, Duration::from_secs(60));

    let mut call = pool.admit(image_spec()).expect("fits");
    let gave_up = tokio::time::timeout(Duration::from_millis(300), call.instance("c1")).await;
    assert!(gave_up.is_err(), "the container never listens");
    drop(call);
    assert!(
        eventually(Duration::from_secs(5), || engine.count() == 1).await,
        "the start made a container"
    );

    tokio::time::timeout(Duration::from_secs(5), pool.shutdown())
        .await
        .expect("the shutdown ends within its bound");
    assert_eq!(engine.count(), 0, "a container left running");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("iofs"))
        .expect("the iofs root")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "instance directories left: {left:?}");
}

/// After a shutdown the driver starts nothing: a start that arrives late is refused
/// without a container.
#[tokio::test]
async fn a_driver_shut_down_starts_no_container() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Arc::new(FakeEngine::default());
    let driver = driver(dir.path(), Arc::clone(&engine)).await;
    Driver::shutdown(&driver).await;
    let refused = Driver::start(&driver, &image_spec(), "c1", Duration::from_secs(5))
        .await
        .expect_err("shut down");
    assert!(refused.to_string().contains("shutting down"), "{refused}");
    assert_eq!(engine.count(), 0);
}

/// The engine's answer to a container's wait breaks off (a proxy cutting long requests, an
/// engine restarting with live-restore): the driver asks again, and the instance lives on.
/// It was taken as lost at once: the container was removed and a call in flight failed.
#[tokio::test]
async fn a_broken_wait_is_asked_again_and_the_instance_lives_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Arc::new(FakeEngine::default());
    engine.broken_waits.store(2, Ordering::SeqCst);
    let driver = driver(dir.path(), Arc::clone(&engine)).await;
    let instance = driver
        .start_container(&image_spec(), "c1", Duration::from_secs(5))
        .await
        .expect("started");
    let asked_again = eventually(Duration::from_secs(5), || {
        engine.waits.load(Ordering::SeqCst) >= 3 || engine.removed.load(Ordering::SeqCst) > 0
    })
    .await;
    assert!(asked_again, "neither asked again nor removed");
    assert_eq!(engine.removed.load(Ordering::SeqCst), 0, "removed as lost");
    assert!(instance.is_alive(), "taken as ended");
    assert_eq!(engine.count(), 1);

    // The container stops: the wait that holds now says so.
    for container in engine.containers.lock().expect("fake engine").iter() {
        container.running.send_replace(false);
    }
    let ended = eventually(Duration::from_secs(5), || !instance.is_alive()).await;
    assert!(ended, "the stop was not seen");
    let removed = eventually(Duration::from_secs(5), || engine.count() == 0).await;
    assert!(removed, "the stopped container was not removed");
}

/// An engine gone after the runner connected (stopped, restarting): a start fails saying
/// that the engine cannot be reached, where it said "Error in the hyper legacy client:
/// client error (Connect)".
#[tokio::test]
async fn a_start_on_an_engine_gone_says_it_cannot_be_reached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gone = dir.path().join("no-engine.sock");
    // A socket nobody listens on any more: connections are refused.
    drop(std::os::unix::net::UnixListener::bind(&gone).expect("bind"));
    let docker = Docker::connect_with_unix(
        &gone.display().to_string(),
        10,
        bollard::API_DEFAULT_VERSION,
    )
    .expect("a client");
    let config = DockerDriverConfig::new("runner-under-test", dir.path().join("iofs"));
    let metrics = DockerMetrics::register(&mut Registry::default());
    let driver = DockerDriver::with_engine(docker, config, metrics)
        .await
        .expect("the driver");
    let err = driver
        .start_container(&image_spec(), "c1", Duration::from_secs(5))
        .await
        .expect_err("no engine");
    let text = err.to_string();
    assert!(
        text.contains("slow:1")
            && text.contains("Docker engine at")
            && text.contains("cannot be reached"),
        "{text}"
    );
}
