//! The runner's side of an instance's unix socket, shared by every driver: kept HTTP/1
//! connections that carry `http-stream` calls, waiting for the listener to appear, and telling
//! "the instance died" from "the function misbehaved" when a call breaks.
//!
//! A driver owns its instance's life (a child process, a container) and publishes it here as
//! [`Liveness`]: whether the runner killed it, and, once it has ended, how. Everything else —
//! connecting, the request, classifying a broken call — is the same whatever runs the function.

use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fn_lifecycle::logging::Throttle;
use fn_lifecycle::retry::Backoff;
use futures::{Stream, StreamExt};
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1::{self, SendRequest};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::http_stream;
use super::{BodyStream, DriverError, FunctionRequest, FunctionResponse};

/// How long a failed call to a child process waits for the process to be seen ended before
/// deciding the function misbehaved rather than died. The end is awaited as an event (the
/// reaper sees it at once); this only bounds the wait.
pub(crate) const PROCESS_END_GRACE: Duration = Duration::from_millis(500);

/// The same for a container. Its end is seen through the engine (the wait stream, then an
/// inspect for the OOM flag), which on a busy engine took more than 500 ms after the
/// container's socket closed: the call was then reported as the function's misbehaviour
/// instead of an OOM kill. Only a failing call waits this long.
pub(crate) const CONTAINER_END_GRACE: Duration = Duration::from_secs(5);

/// How long a kept connection may take to become ready for the next request before it is
/// replaced by a new one.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// Most header lines of a function's answer, the FDK's own included (`Content-Length`,
/// `Date`, `Fn-Http-Status`, `Fn-Fdk-Version`, ...: the Python FDK adds 7): hyper's default,
/// which it parses into slots on the stack. More makes hyper set up that many slots on the
/// heap for every answer it parses: 512 cost the runner 5,000 instructions a call, 3.4%
/// (bench_instructions.py, session 17), for answers that few functions send. An answer with
/// more fails its call at once, saying so (see [`SocketClient::call`]).
const MAX_ANSWER_HEADER_LINES: usize = 100;

/// How long a kept connection may sit idle before it is replaced by a new one rather than
/// used. FDKs close idle connections (the Python FDK after 75 s, `Keep-Alive: 75`); a call
/// sent as the FDK closes its connection breaks, as a crash would, and its instance would
/// be retired. Fn's agent keeps an idle connection 1 s.
const KEPT_IDLE_LIMIT: Duration = Duration::from_secs(60);

/// Most bytes read ahead from a function's connection. Answers leave in chunks of at most
/// this size and each is held until the LB's stream takes it; hyper's default (about
/// 400 KiB) multiplies memory by the calls in flight for no throughput (the LB's client
/// side measured the same). 256 KiB, the gRPC connections' largest frame: a large answer
/// crosses to the LB one read per frame, and the function, whose socket holds about
/// 208 KiB, is drained in one read where it took up to four. Against 64 KiB, per 1 MiB
/// call: 3% fewer instructions in each daemon and 10% fewer wake-ups of the function; the
/// runner's peak RSS under 0–1 MiB bodies at c=64 rose from about 30 to 40 MB
/// (docs/performance-log.md, session 18).
const FUNCTION_READ_BUFFER: usize = 256 * 1024;

/// Warnings of the runner out of descriptors or memory when reaching an instance: one a
/// second for the whole runner (the condition is the process's own, and every call to
/// every instance may meet it), the rest at DEBUG.
// Not a driver's field: both drivers and all instances share the process's fds and memory.
static EXHAUSTION_WARNINGS: LazyLock<Throttle> =
    LazyLock::new(|| Throttle::new(Duration::from_secs(1)));

/// Whether `error` is the runner's own want of a resource (file descriptors, the system's
/// file table, memory, socket buffers) rather than anything the instance did.
fn runner_exhausted(error: &std::io::Error) -> bool {
    use nix::libc::{EMFILE, ENFILE, ENOBUFS, ENOMEM};
    matches!(
        error.raw_os_error(),
        Some(EMFILE | ENFILE | ENOMEM | ENOBUFS)
    )
}

/// The error of reaching `instance` when the runner is out of a resource
/// ([`runner_exhausted`]): the runner's fault, reported at once (there is no end of the
/// instance to wait for) and leaving the instance in service.
#[cold]
fn exhausted(instance: &str, what: &str, error: &std::io::Error) -> DriverError {
    fn_lifecycle::warn_throttled!(
        EXHAUSTION_WARNINGS,
        %instance,
        %error,
        "{what}: the runner is out of file descriptors or memory (raise its RLIMIT_NOFILE or \
         memory); the call fails as the runner's fault and the instance serves on"
    );
    DriverError::Runner(format!("{what}: {error}"))
}

/// The error of an answer whose head the runner does not take.
#[cold]
fn head_too_large() -> DriverError {
    DriverError::Function(format!(
        "its answer's head is too large: more than {MAX_ANSWER_HEADER_LINES} header lines \
         (the FDK's own included) or {FUNCTION_READ_BUFFER} bytes; send fewer headers"
    ))
}

/// The request body type sent to functions: the LB's chunks as they arrive.
type CallBody =
    StreamBody<Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send>>>;

/// A kept connection: the shard it lives on, its sender and its task.
type Kept = (usize, SendRequest<CallBody>, Arc<ConnectionTask>);

/// A kept connection waiting for a call, and since when.
type Idle = (Kept, Instant);

/// A function connection's task, aborted once neither the kept sender nor a call's answer
/// holds it. Letting go of hyper's sender does not end a connection whose request body is
/// still being written: a function that answers without reading all of its body leaves the
/// task waiting on a full socket until the instance ends, one connection per such call.
#[derive(Debug)]
struct ConnectionTask(tokio::task::AbortHandle);

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long before a call's deadline a broken call stops waiting to see whether its
/// instance ended: the call's own timeout must not fire first, or a crash would be reported
/// as a timeout (a container's end can take seconds to be seen).
const CLASSIFIED_BEFORE_DEADLINE: Duration = Duration::from_millis(20);

/// When a failure of a call with `deadline` is classified at the latest.
fn classify_by(deadline: Instant) -> tokio::time::Instant {
    let by = deadline
        .checked_sub(CLASSIFIED_BEFORE_DEADLINE)
        .unwrap_or(deadline);
    tokio::time::Instant::from_std(by)
}

/// Whether an instance is still there: set by its driver, read by calls.
#[derive(Debug)]
pub(crate) struct Liveness {
    /// Set when the runner kills the instance; it is no longer alive from then on.
    killed: AtomicBool,
    /// Set when a call broke and the instance's end was not seen before the call's
    /// deadline: whether it still serves is not known, so it takes no more calls (as an
    /// instance whose call timed out takes none) and goes once its calls have ended.
    suspect: AtomicBool,
    /// `Some(how it ended)` once the instance has ended.
    ended: watch::Receiver<Option<String>>,
    /// How long a broken call waits to see the end before blaming the function.
    end_grace: Duration,
}

impl Liveness {
    /// A live instance, and the sender its driver reports the end on. `end_grace` bounds how
    /// long a broken call waits for the driver to report the end.
    pub(crate) fn new(end_grace: Duration) -> (Arc<Self>, watch::Sender<Option<String>>) {
        let (tx, ended) = watch::channel(None);
        let liveness = Liveness {
            killed: AtomicBool::new(false),
            suspect: AtomicBool::new(false),
            ended,
            end_grace,
        };
        (Arc::new(liveness), tx)
    }

    /// Marks the instance killed by the runner; returns whether it already was.
    pub(crate) fn mark_killed(&self) -> bool {
        self.killed.swap(true, Ordering::SeqCst)
    }

    pub(crate) fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    pub(crate) fn is_alive(&self) -> bool {
        !self.killed() && !self.suspect.load(Ordering::SeqCst) && self.ended.borrow().is_none()
    }

    /// How the instance ended, once it has.
    pub(crate) fn ended(&self) -> watch::Receiver<Option<String>> {
        self.ended.clone()
    }

    /// The error of a call to an instance that is no longer alive.
    fn gone(&self) -> DriverError {
        match self.ended.borrow().as_ref() {
            Some(end) if !self.killed() => DriverError::Crashed(end.clone()),
            _ => DriverError::Crashed("the instance was killed".into()),
        }
    }

    /// Classifies a transport failure of a call with `deadline`: `Crashed` when the
    /// instance has ended (waiting briefly for its end to be seen, never past
    /// [`CLASSIFIED_BEFORE_DEADLINE`] before the deadline), else `Function`; an instance
    /// whose end was still unseen at that point is suspect from then on.
    async fn failure(
        &self,
        what: &str,
        error: impl fmt::Display,
        deadline: Instant,
    ) -> DriverError {
        let mut ended = self.ended.clone();
        let grace = tokio::time::Instant::now() + self.end_grace;
        let by = classify_by(deadline);
        let end = tokio::time::timeout_at(by.min(grace), ended.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|end| end.clone());
        if end.is_none() && by < grace {
            self.suspect.store(true, Ordering::SeqCst);
        }
        match end {
            Some(_) if self.killed() => {
                DriverError::Crashed(format!("killed by the runner ({what}: {error})"))
            }
            Some(end) => DriverError::Crashed(end),
            None => DriverError::Function(format!("{what}: {error}")),
        }
    }
}

/// Calls to one instance over its listener socket. An instance that takes one call at a time
/// keeps one connection; one that takes several keeps up to that many. Under `FN_SHARDS`
/// each shard keeps its own (a connection is driven by the shard that opened it, and a call
/// on another would cross threads at every step).
pub(crate) struct SocketClient {
    socket: PathBuf,
    /// The instance id, for logs.
    instance: Arc<str>,
    liveness: Arc<Liveness>,
    /// Kept connections with the shard each lives on (see [`SocketClient::connection`]) and
    /// since when each is idle; a call takes one out for its round trip to the response
    /// head and puts it back.
    conns: std::sync::Mutex<Vec<Idle>>,
    concurrency: usize,
    /// How long a kept connection may be idle and still be used ([`KEPT_IDLE_LIMIT`]).
    idle_limit: Duration,
    /// Whether the FDK's name and version were logged (once per instance).
    fdk_logged: AtomicBool,
}

impl fmt::Debug for SocketClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocketClient")
            .field("socket", &self.socket)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl SocketClient {
    pub(crate) fn new(
        socket: PathBuf,
        instance: Arc<str>,
        liveness: Arc<Liveness>,
        concurrency: u32,
    ) -> Self {
        SocketClient {
            socket,
            instance,
            liveness,
            conns: std::sync::Mutex::new(Vec::new()),
            concurrency: usize::try_from(concurrency.max(1)).unwrap_or(1),
            idle_limit: KEPT_IDLE_LIMIT,
            fdk_logged: AtomicBool::new(false),
        }
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A kept connection that is free for a call, else a new one. A one-call instance
    /// waits (briefly) for its one connection to finish the previous answer; an instance
    /// that takes several calls opens another connection instead of queueing behind one.
    ///
    /// Under `FN_SHARDS`, a one-call instance's one connection serves calls of every shard
    /// (each step of a call on another shard than the connection's crosses threads): an FDK
    /// that serves one connection at a time (fdk-java, fdk-ruby) never answers a second
    /// while the first is open, and the call on it would time out. An instance that takes
    /// several calls serves concurrent connections (the README requires it), so each shard
    /// keeps its own. A failure is classified before the call's `deadline` (see
    /// [`Liveness::failure`]).
    async fn connection(&self, deadline: Instant) -> Result<Kept, DriverError> {
        let candidate = {
            let here = fn_lifecycle::shards::current();
            let now = Instant::now();
            let mut kept = self.kept();
            // A connection idle too long may be closing at the FDK's end: a new one is safe.
            kept.retain(|((_, sender, _), since)| {
                !sender.is_closed() && now.saturating_duration_since(*since) < self.idle_limit
            });
            let pick = if self.concurrency == 1 {
                // Its one connection (ready, or still finishing an answer), on any shard.
                (!kept.is_empty()).then_some(0)
            } else {
                kept.iter()
                    .position(|((s, c, _), _)| *s == here && c.is_ready())
            };
            pick.map(|pos| kept.swap_remove(pos).0)
        };
        if let Some((shard, mut sender, task)) = candidate
            && matches!(
                tokio::time::timeout(READY_TIMEOUT, sender.ready()).await,
                Ok(Ok(()))
            )
        {
            return Ok((shard, sender, task));
        }
        // A connection that did not become ready is dropped here, and with it its task
        // unless a call's answer still holds it.
        let stream = match self.connect().await {
            Ok(stream) => stream,
            Err(e) if runner_exhausted(&e) => {
                return Err(exhausted(&self.instance, "cannot connect", &e));
            }
            Err(e) => return Err(self.liveness.failure("cannot connect", e, deadline).await),
        };
        let handshake = http1::Builder::new()
            .max_buf_size(FUNCTION_READ_BUFFER)
            .handshake(TokioIo::new(stream));
        let (sender, connection) = match handshake.await {
            Ok(pair) => pair,
            Err(e) => return Err(self.liveness.failure("handshake failed", e, deadline).await),
        };
        let instance = self.instance.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%instance, error = %e, "function connection ended");
            }
        });
        Ok((
            fn_lifecycle::shards::current(),
            sender,
            Arc::new(ConnectionTask(task.abort_handle())),
        ))
    }

    /// Connects to the instance's listener as [`open_listener`] finds it: never to a socket
    /// outside the instance's directory that the function points its listener at.
    async fn connect(&self) -> std::io::Result<UnixStream> {
        use std::os::fd::AsRawFd;
        let listener = open_listener(&self.socket)?;
        // Through the descriptor, so that a link swapped in since cannot redirect it.
        UnixStream::connect(format!("/proc/self/fd/{}", listener.as_raw_fd())).await
    }

    /// Puts a connection (living on `shard`) back for the next call, unless the instance
    /// keeps as many as it takes calls already: a one-call instance one over every shard,
    /// another as many on each shard.
    fn keep(&self, shard: usize, sender: SendRequest<CallBody>, task: Arc<ConnectionTask>) {
        let now = Instant::now();
        let mut kept = self.kept();
        let on_shard = if self.concurrency == 1 {
            kept.len()
        } else {
            kept.iter().filter(|((s, _, _), _)| *s == shard).count()
        };
        if on_shard < self.concurrency {
            kept.push(((shard, sender, task), now));
        }
    }

    /// Logs the FDK an instance runs (its `Fn-Fdk-Version` and `Fn-Fdk-Runtime`), once.
    #[cold]
    fn log_fdk(&self, reply: &http::HeaderMap) {
        if self.fdk_logged.swap(true, Ordering::Relaxed) {
            return;
        }
        let named = |name: &str| {
            reply
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()))
        };
        tracing::debug!(
            instance = %self.instance,
            fdk_version = ?named("fn-fdk-version"),
            fdk_runtime = ?named("fn-fdk-runtime"),
            "the function's FDK"
        );
    }

    /// The error of a reply that is not the function's answer. The FDK's own body (the
    /// Python FDK's carries the exception's text, which may hold secrets) goes neither to
    /// the client nor to the log: only its length, as the reply frames it.
    #[cold]
    fn not_answered(
        &self,
        not: http_stream::NotAnswered,
        body: &hyper::body::Incoming,
    ) -> DriverError {
        let length = match hyper::body::Body::size_hint(body).exact() {
            Some(bytes) => format!("a body of {bytes} bytes"),
            None => "a body of unknown length".to_owned(),
        };
        match not {
            http_stream::NotAnswered::Failed => DriverError::Failed(format!(
                "its FDK answered 502 ({length}, not passed on); the function's log says why"
            )),
            http_stream::NotAnswered::TimedOut => DriverError::TimedOut(format!(
                "its FDK answered 504: it saw the call's deadline pass ({length}, not passed on)"
            )),
            http_stream::NotAnswered::Invalid(why) => DriverError::Function(why),
        }
    }

    /// Sends one call and returns once the response head has arrived; the body streams
    /// afterwards.
    pub(crate) async fn send(
        &self,
        request: FunctionRequest,
        body: BodyStream<std::io::Error>,
    ) -> Result<FunctionResponse, DriverError> {
        if !self.liveness.is_alive() {
            return Err(self.liveness.gone());
        }
        let headers = http_stream::call_headers(&request)?;
        let method = request.method;
        let deadline = request.deadline_at;
        let frames: Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send>> =
            Box::pin(body.map(|chunk| chunk.map(Frame::data)));
        let mut http_request = Request::post("/call")
            .body(StreamBody::new(frames))
            .map_err(|e| DriverError::Invalid(format!("cannot build the call request: {e}")))?;
        *http_request.headers_mut() = headers;

        let (shard, mut sender, task) = self.connection(deadline).await?;
        let reply = match sender.send_request(http_request).await {
            Ok(reply) => reply,
            // The function answered, with a head the runner does not take: no end of the
            // instance to wait for.
            Err(e) if e.is_parse_too_large() => return Err(head_too_large()),
            Err(e) => return Err(self.liveness.failure("call failed", e, deadline).await),
        };
        self.keep(shard, sender, task.clone());

        let (head, incoming) = reply.into_parts();
        if !self.fdk_logged.load(Ordering::Relaxed) {
            self.log_fdk(&head.headers);
        }
        let status = match http_stream::client_status(head.status, &head.headers) {
            Ok(status) => status,
            Err(not) => return Err(self.not_answered(not, &incoming)),
        };
        let mut headers = http_stream::fn_to_client(&head.headers);
        // The length hyper decoded, not the header: a reply with both Transfer-Encoding and
        // Content-Length is framed by the first. A 204 has none (RFC 9110 8.6). The answer
        // to a HEAD (whose body the client does not get) has the length the function
        // declares a GET's body would have, if it declares one: an FDK frames that HEAD's
        // empty body with 0; one that answers a HEAD as a GET frames the GET's body.
        let framed = || {
            hyper::body::Body::size_hint(&incoming)
                .exact()
                .map(http::HeaderValue::from)
        };
        let length = if status == http::StatusCode::NO_CONTENT {
            None
        } else if method == http::Method::HEAD {
            http_stream::declared_length(&head.headers).or_else(framed)
        } else {
            framed()
        };
        match length {
            Some(length) => {
                headers.insert(http::header::CONTENT_LENGTH, length);
            }
            None => {
                headers.remove(http::header::CONTENT_LENGTH);
            }
        }
        let liveness = self.liveness.clone();
        let body = incoming.into_data_stream().then(move |chunk| {
            // The answer holds its connection until it is dropped.
            let _connection = &task;
            let liveness = liveness.clone();
            async move {
                match chunk {
                    Ok(bytes) => Ok(bytes),
                    Err(e) => Err(liveness.failure("reply broke off", e, deadline).await),
                }
            }
        });
        Ok(FunctionResponse {
            status,
            headers,
            body: Box::pin(body),
        })
    }
}

/// Polls for the listener socket with short, growing pauses, until it appears, the instance
/// ends, or `start_timeout` passes. There is no event to await for "a file appeared" that
/// works for symlinks created by another user, so this is a bounded poll; the end is awaited
/// as an event.
///
/// # Errors
/// [`DriverError::Start`] when the instance ended first or the time ran out,
/// [`DriverError::Runner`] when the runner is out of descriptors or memory to look; the
/// caller kills the instance then.
pub(crate) async fn wait_for_listener(
    client: &SocketClient,
    start_timeout: Duration,
) -> Result<(), DriverError> {
    let started = Instant::now();
    let deadline = started + start_timeout;
    let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(50));
    let mut ended = client.liveness.ended();
    loop {
        if let Some(end) = ended.borrow().as_ref() {
            return Err(DriverError::Start(format!(
                "{end} before opening its listener"
            )));
        }
        match open_listener(&client.socket) {
            Ok(_) => {
                tracing::debug!(
                    instance = %client.instance,
                    after = ?started.elapsed(),
                    "function listener is up"
                );
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(DriverError::Start(e.to_string()));
            }
            // The runner cannot look: waiting on would end in a timeout blaming the function.
            Err(e) if runner_exhausted(&e) => {
                return Err(exhausted(
                    &client.instance,
                    "cannot look for the listener",
                    &e,
                ));
            }
            // Not there yet, or not a socket yet.
            Err(_) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(DriverError::Start(format!(
                "did not open its listener within {start_timeout:?}"
            )));
        }
        tokio::select! {
            // A closed channel means the driver's watcher is gone; the next turn sees the end.
            _ = ended.changed() => {}
            () = tokio::time::sleep(backoff.next_delay().min(deadline - now)) => {}
        }
    }
}

/// The socket an instance listens on, opened as a path (`O_PATH`) without following links.
/// The FDK contract lets `lsnr.sock` be a link to the socket the function bound, and FDKs
/// make it a link to a sibling (`phony*.sock`): a link to a bare name in the same directory,
/// written `name` or `./name` (as Fn's agent takes it), is followed, any other is refused
/// (`PermissionDenied`). The runner reaches every instance's
/// directory, so following a function's link elsewhere would let it send its calls to
/// another function's instance, or to any socket on the host.
fn open_listener(socket: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut target = socket.to_path_buf();
    if std::fs::symlink_metadata(socket)?.file_type().is_symlink() {
        let link = std::fs::read_link(socket)?;
        // A leading `.` is the only one `components` keeps (`././x` is `./x`).
        let mut parts = link
            .components()
            .skip_while(|part| *part == std::path::Component::CurDir);
        match (parts.next(), parts.next(), socket.parent()) {
            (Some(std::path::Component::Normal(name)), None, Some(dir)) => target = dir.join(name),
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "{} links to {}: a listener must be a socket in the instance's own \
                         directory",
                        socket.display(),
                        link.display()
                    ),
                ));
            }
        }
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH | nix::libc::O_NOFOLLOW)
        .open(&target)?;
    if file.metadata()?.file_type().is_socket() {
        Ok(file)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a socket", target.display()),
        ))
    }
}

/// Most file systems [`unmount_instance_dir`] takes off one directory: one is the process
/// driver's tmpfs; a few more cover a directory mounted twice by hand, and the bound keeps
/// a directory that somehow stays a mount point from holding the caller.
const MAX_UNMOUNTS: usize = 4;

/// Takes what is mounted on an instance directory off it: the process driver mounts a tmpfs
/// on each instance's directory in namespaces (see `process::tmpfs`), and a mount point can
/// be neither renamed nor removed. A directory on the same device as its parent is no mount
/// point, and is left alone without a system call; a missing one or a link is none either
/// (neither is followed). Detached (`MNT_DETACH`): the runner's path leaves the tmpfs at
/// once, and the file system goes when the last namespace holding it (the dying
/// instance's) does.
/// Failures are logged: the caller's removal then reports what stayed.
pub(crate) fn unmount_instance_dir(dir: &Path) {
    use std::os::unix::fs::MetadataExt as _;
    let Some(parent) = dir.parent() else {
        return;
    };
    for _ in 0..MAX_UNMOUNTS {
        let (Ok(meta), Ok(above)) = (
            std::fs::symlink_metadata(dir),
            std::fs::symlink_metadata(parent),
        ) else {
            return;
        };
        if !meta.is_dir() || meta.dev() == above.dev() {
            return;
        }
        let flags = nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW;
        if let Err(e) = nix::mount::umount2(dir, flags) {
            tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "cannot unmount the file system on an instance directory; it stays mounted \
                 until it is unmounted by hand (umount -l)"
            );
            return;
        }
    }
}

/// Takes an instance directory out of its place (renamed aside, as [`remove_instance_dir`]
/// does), so that nothing can connect to the socket in it, and leaves the removal of its
/// tree to whoever removes the instance (once its process is gone): a single remover, where
/// two on one tree raced (one finding the top empty while the other moved entries up). A
/// tmpfs on it is unmounted first: the host's path then reaches nothing the dying instance
/// writes, and the directory under it, empty, can be renamed.
pub(crate) fn set_instance_dir_aside(dir: &Path) {
    unmount_instance_dir(dir);
    let mut aside = dir.as_os_str().to_owned();
    aside.push(".removing");
    if let Err(e) = std::fs::rename(dir, &aside)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::debug!(dir = %dir.display(), error = %e, "cannot set an instance directory aside; it is removed with the instance");
    }
}

/// Removes an instance directory and everything in it; a missing directory is fine. The
/// directory leaves its place at once (renamed aside, so nothing can connect to the socket
/// in it), and its tree is removed on a thread of its own, never on the runtime (a wide
/// or deep tree took seconds). The returned receiver completes when the tree is gone;
/// dropping it leaves the removal to finish in the background. A tmpfs on the directory is
/// unmounted first ([`unmount_instance_dir`]).
pub(crate) fn remove_instance_dir(dir: &Path) -> tokio::sync::oneshot::Receiver<()> {
    unmount_instance_dir(dir);
    let mut aside = dir.as_os_str().to_owned();
    aside.push(".removing");
    let target = match std::fs::rename(dir, &aside) {
        Ok(()) => PathBuf::from(aside),
        // Already set aside (a kill, then the reaper): what the process wrote into it while
        // it was dying is removed now.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && Path::new(&aside).exists() => {
            PathBuf::from(aside)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (done, removed) = tokio::sync::oneshot::channel();
            let _ = done.send(());
            return removed;
        }
        Err(_) => dir.to_path_buf(),
    };
    fn_lifecycle::fs::remove_tree(target)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Sends a call to a function that answers `reply` on its socket; the client's status,
    /// `Content-Length` and body.
    async fn answered(reply: &'static str) -> (http::StatusCode, Option<String>, Bytes) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fn.sock");
        serve(&path, reply);
        let response = call(path).await.unwrap_or_else(|e| panic!("{e}"));
        let length = response
            .headers
            .get(http::header::CONTENT_LENGTH)
            .map(|v| v.to_str().expect("ascii").to_owned());
        let body: Vec<Bytes> =
            tokio::time::timeout(Duration::from_secs(3), response.body.collect::<Vec<_>>())
                .await
                .expect("the body ends by its framing")
                .into_iter()
                .map(|chunk| chunk.unwrap_or_else(|e| panic!("{e}")))
                .collect();
        (response.status, length, body.concat().into())
    }

    /// A function listening at `path` that answers every call with `reply`, then holds the
    /// connection open (so a body ends by its framing).
    fn serve(path: &Path, reply: &str) {
        let listener = tokio::net::UnixListener::bind(path).expect("bind");
        let reply: Arc<str> = reply.into();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let reply = Arc::clone(&reply);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    if conn.write_all(reply.as_bytes()).await.is_ok() {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                });
            }
        });
    }

    /// A call as the runner sends one, due in 10 s.
    fn request() -> FunctionRequest {
        FunctionRequest {
            call_id: "c".into(),
            method: http::Method::POST,
            request_url: "http://lb.test/r/app/fn".into(),
            headers: http::HeaderMap::new(),
            deadline: std::time::SystemTime::now() + Duration::from_secs(10),
            deadline_at: Instant::now() + Duration::from_secs(10),
        }
    }

    /// One call, with no body, to the listener at `path`.
    async fn call(path: PathBuf) -> Result<FunctionResponse, DriverError> {
        call_as(path, request()).await
    }

    /// `request`, with no body, to the listener at `path`.
    async fn call_as(
        path: PathBuf,
        request: FunctionRequest,
    ) -> Result<FunctionResponse, DriverError> {
        let (liveness, _ended) = Liveness::new(Duration::from_millis(100));
        let client = SocketClient::new(path, "test".into(), liveness, 1);
        wait_for_listener(&client, Duration::from_secs(2)).await?;
        client
            .send(request, Box::pin(futures::stream::empty()))
            .await
    }

    /// A function that serves calls on its connections, one after another on each, each
    /// answered `200 ok`; counts the connections it accepted.
    fn serve_counting(path: &Path) -> Arc<std::sync::atomic::AtomicUsize> {
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let listener = tokio::net::UnixListener::bind(path).expect("bind");
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    loop {
                        // A head, then the empty chunked body's last chunk.
                        let end = loop {
                            if let Some(head) = got.windows(4).position(|w| w == b"\r\n\r\n")
                                && let Some(at) =
                                    got[head + 4..].windows(5).position(|w| w == b"0\r\n\r\n")
                            {
                                break head + 4 + at + 5;
                            }
                            match conn.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                        };
                        got.drain(..end);
                        let reply = b"HTTP/1.1 200 OK\r\nfn-fdk-version: fdk-test/1.0\r\n\
                                      content-length: 2\r\n\r\nok";
                        if conn.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        accepted
    }

    /// Under `FN_SHARDS`, a call on another shard than the one-call instance's kept
    /// connection takes that connection rather than opening a second: an FDK that serves one
    /// connection at a time (fdk-java, fdk-ruby) would never answer it.
    #[tokio::test]
    async fn a_one_call_instance_keeps_one_connection_over_every_shard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fn.sock");
        let accepted = serve_counting(&path);
        let (liveness, _ended) = Liveness::new(Duration::from_millis(100));
        let client = Arc::new(SocketClient::new(path, "test".into(), liveness, 1));
        wait_for_listener(&client, Duration::from_secs(2))
            .await
            .expect("listening");
        let one = |client: Arc<SocketClient>, request: FunctionRequest| async move {
            let response = client
                .send(request, Box::pin(futures::stream::empty()))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let body: Vec<_> = response.body.collect().await;
            assert_eq!(response.status, http::StatusCode::OK);
            body.len()
        };
        let shards = fn_lifecycle::shards::Shards::start(2).expect("shards");
        // On this thread (shard 0), then on shard 1, then here again.
        one(Arc::clone(&client), request()).await;
        let elsewhere = shards.handle(1).spawn(one(Arc::clone(&client), request()));
        tokio::time::timeout(Duration::from_secs(5), elsewhere)
            .await
            .expect("answered on the kept connection")
            .expect("the call on shard 1");
        one(Arc::clone(&client), request()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "connections opened");
    }

    #[tokio::test]
    async fn a_directory_tree_deeper_than_a_worker_stack_is_removed_without_a_crash() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("instance");
        std::fs::create_dir(&dir).expect("mkdir");
        // 18,000 levels, as a function can make in its TMPDIR in well under a second (the
        // removal holds two descriptors and no stack frame per level).
        let depth = 18_000;
        let made = std::process::Command::new("python3")
            .args([
                "-c",
                "import os, sys\nos.chdir(sys.argv[1])\nfor _ in range(int(sys.argv[2])):\n    os.mkdir('d')\n    os.chdir('d')",
            ])
            .arg(&dir)
            .arg(depth.to_string())
            .status()
            .expect("python3");
        assert!(made.success());
        let removed = remove_instance_dir(&dir);
        assert!(!dir.exists(), "out of its place at once");
        tokio::time::timeout(Duration::from_secs(60), removed)
            .await
            .expect("removed in time")
            .expect("reported");
        assert!(
            std::fs::read_dir(&root).expect("read").next().is_none(),
            "nothing left"
        );
        // A missing directory is fine.
        remove_instance_dir(&dir).await.expect("reported");
    }

    /// A request body that never ends.
    fn endless_body() -> BodyStream<std::io::Error> {
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        Box::pin(futures::stream::repeat_with(move || Ok(chunk.clone())))
    }

    #[tokio::test]
    async fn a_function_that_answers_without_reading_its_body_keeps_no_connection_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fn.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        // Answers each call once its head is in, reads nothing more, and hands the
        // connection to the test.
        let (answered_tx, mut answered) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 1];
                while !got.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => got.push(buf[0]),
                    }
                }
                let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if conn.write_all(reply).await.is_err() || answered_tx.send(conn).is_err() {
                    return;
                }
            }
        });
        let (liveness, _ended) = Liveness::new(Duration::from_millis(100));
        let client = SocketClient::new(path, "test".into(), liveness, 1);
        for _ in 0..2 {
            let response = client
                .send(request(), endless_body())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let body: Vec<_> = response.body.collect().await;
            assert!(matches!(&body[..], [Ok(b)] if &b[..] == b"ok"), "{body:?}");
        }
        // The second call found the first connection still writing its body and took a new
        // one: the first must be closed, not left writing until the instance ends.
        let mut first = answered.recv().await.expect("first connection");
        let _second = answered.recv().await.expect("second connection");
        let mut buf = vec![0u8; 64 * 1024];
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            let mut total = 0usize;
            loop {
                match first.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        })
        .await
        .expect("the first connection is closed, not kept writing an endless body");
        assert!(drained > 0, "the body had started");
    }

    #[tokio::test]
    async fn a_listener_linked_outside_its_instance_directory_is_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let (mine, theirs) = (root.path().join("a"), root.path().join("b"));
        std::fs::create_dir(&mine).expect("a");
        std::fs::create_dir(&theirs).expect("b");
        // Another instance's socket, and a link to it as this instance's listener.
        serve(
            &theirs.join("real.sock"),
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\ntheir",
        );
        // And one in a directory of its own, which a link to `sub/real.sock` would reach.
        std::fs::create_dir(mine.join("sub")).expect("sub");
        serve(
            &mine.join("sub").join("real.sock"),
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nsub",
        );
        for link in [
            theirs.join("real.sock"),
            PathBuf::from("../b/real.sock"),
            PathBuf::from("./../b/real.sock"),
            PathBuf::from("sub/real.sock"),
            PathBuf::from("./sub/real.sock"),
            PathBuf::from("."),
        ] {
            let listener = mine.join("lsnr.sock");
            let _ = std::fs::remove_file(&listener);
            std::os::unix::fs::symlink(&link, &listener).expect("symlink");
            let started = Instant::now();
            let err = match call(listener).await {
                Ok(_) => panic!("a call through {} reached the other socket", link.display()),
                Err(e) => e.to_string(),
            };
            assert!(err.contains("own directory"), "{err}");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "refused at once"
            );
        }
        // As FDKs do it: a link to a sibling socket, by its name or as `./name` (Fn's agent
        // takes both).
        let linked = [
            ("phony.sock", "phony.sock", "mine"),
            ("phonylsnr.sock", "./phonylsnr.sock", "dot/"),
        ];
        for (name, link, answer) in linked {
            serve(
                &mine.join(name),
                &format!("HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n{answer}"),
            );
            let listener = mine.join("lsnr.sock");
            std::fs::remove_file(&listener).expect("unlink");
            std::os::unix::fs::symlink(link, &listener).expect("symlink");
            let response = call(listener)
                .await
                .unwrap_or_else(|e| panic!("through {link}: {e}"));
            let body: Vec<_> = response.body.collect().await;
            assert_eq!(body.len(), 1);
            assert!(
                matches!(&body[0], Ok(b) if &b[..] == answer.as_bytes()),
                "through {link}: {body:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_client_gets_the_length_of_the_body_it_gets() {
        let (status, length, body) = answered(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n\
             a\r\n0123456789\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(status, http::StatusCode::OK);
        assert_eq!(&body[..], b"0123456789");
        assert_eq!(length, None, "chunked framing: no length to claim");

        // A 304 from the FDK itself (no body, whatever its length says) is outside the
        // contract: refused, not passed on as the function's 200.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fn.sock");
        serve(
            &path,
            "HTTP/1.1 304 Not Modified\r\nfn-http-status: 200\r\ncontent-length: 10\r\n\r\n",
        );
        match call(path).await {
            Err(DriverError::Function(message)) => assert!(message.contains("304"), "{message}"),
            Err(e) => panic!("{e}"),
            Ok(response) => panic!("passed on as {}", response.status),
        }

        let (_, length, body) = answered("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc").await;
        assert_eq!(
            (length.as_deref(), &body[..]),
            (Some("3"), b"abc".as_slice())
        );
    }

    /// A call whose connection breaks while its instance's end is not seen (a container's
    /// end can take seconds to show) is answered as the function's failure before the
    /// call's deadline, not left to time out: a crash is never reported as a timeout.
    #[tokio::test]
    async fn a_broken_call_is_classified_before_its_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fn.sock");
        // A function that reads the call's head and hangs up without an answer.
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let _ = conn.read(&mut buf).await;
                drop(conn);
            }
        });
        // Its end would be waited for 30 s; the call has 500 ms, and is bounded by its
        // deadline as the runner bounds it (which polls the call before its timer).
        let (liveness, _ended) = Liveness::new(Duration::from_secs(30));
        let client = SocketClient::new(path, "test".into(), Arc::clone(&liveness), 1);
        wait_for_listener(&client, Duration::from_secs(2))
            .await
            .expect("listening");
        let budget = Duration::from_millis(500);
        // On the wall clock the call is due in an hour (a clock stepped back since the call
        // came): the monotonic deadline bounds the wait, not the wall clock.
        let request = FunctionRequest {
            deadline: std::time::SystemTime::now() + Duration::from_secs(3600),
            deadline_at: Instant::now() + budget,
            ..request()
        };
        let started = Instant::now();
        let sent = tokio::time::timeout_at(
            tokio::time::Instant::now() + budget,
            client.send(request, Box::pin(futures::stream::empty())),
        )
        .await;
        match sent {
            Ok(Err(DriverError::Function(message))) => {
                assert!(message.contains("call failed"), "{message}");
            }
            Ok(Err(e)) => panic!("{e}"),
            Ok(Ok(response)) => panic!("answered {}", response.status),
            Err(_) => panic!("not classified before the deadline: a timeout"),
        }
        assert!(
            started.elapsed() >= budget - Duration::from_millis(100),
            "it did not wait for the instance's end: {:?}",
            started.elapsed()
        );
        // Whether it still serves is not known: it takes no more calls.
        assert!(!liveness.is_alive(), "a suspect instance kept taking calls");
    }

    /// The length the client gets with an answer to a HEAD: what the function declares a
    /// GET's body would be, else the FDK's framing (an FDK that answers a HEAD as a GET);
    /// nothing with a 204, whatever the method.
    #[tokio::test]
    async fn an_answer_to_a_head_has_the_length_the_function_declares() {
        let head = FunctionRequest {
            method: http::Method::HEAD,
            ..request()
        };
        for (method, reply, expected) in [
            (
                &head,
                "HTTP/1.1 200 OK\r\nfn-http-h-content-length: 1234\r\ncontent-length: 0\r\n\r\n",
                Some("1234"),
            ),
            // The GET's body, framed: its length.
            (
                &head,
                "HTTP/1.1 200 OK\r\ncontent-length: 14\r\n\r\nHello, World!\n",
                Some("14"),
            ),
            (
                &head,
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                Some("0"),
            ),
            (
                &head,
                "HTTP/1.1 200 OK\r\nfn-http-status: 204\r\nfn-http-h-content-length: 5\r\ncontent-length: 0\r\n\r\n",
                None,
            ),
            (
                &request(),
                "HTTP/1.1 200 OK\r\nfn-http-status: 204\r\nfn-http-h-content-length: 5\r\ncontent-length: 0\r\n\r\n",
                None,
            ),
            // Two lengths that disagree: the framing's.
            (
                &head,
                "HTTP/1.1 200 OK\r\nfn-http-h-content-length: 1\r\nfn-http-h-content-length: 2\r\ncontent-length: 0\r\n\r\n",
                Some("0"),
            ),
            // A GET's own framing, whatever the function declares.
            (
                &request(),
                "HTTP/1.1 200 OK\r\nfn-http-h-content-length: 1234\r\ncontent-length: 2\r\n\r\nok",
                Some("2"),
            ),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("fn.sock");
            serve(&path, reply);
            let response = call_as(path, method.clone())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let length = response
                .headers
                .get(http::header::CONTENT_LENGTH)
                .map(|v| v.to_str().expect("ascii").to_owned());
            assert_eq!(length.as_deref(), expected, "{} {reply:?}", method.method);
        }
    }

    /// An answer of 90 headers reaches the caller whole; one of more header lines than
    /// [`MAX_ANSWER_HEADER_LINES`] fails its call at once as the function's, saying why (it
    /// was hyper's "message head is too large", after waiting for the instance's end).
    #[tokio::test]
    async fn an_answer_of_90_headers_reaches_the_caller_and_one_of_150_is_refused() {
        let answer = |headers: usize| {
            let mut reply =
                String::from("HTTP/1.1 200 OK\r\nfn-fdk-version: fdk-python/0.1.128\r\n");
            for i in 0..headers {
                reply.push_str(&format!("fn-http-h-x-h{i}: v{i}\r\n"));
            }
            reply.push_str("content-length: 2\r\n\r\nok");
            reply
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fn.sock");
        serve(&path, &answer(90));
        let response = call(path).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(response.status, http::StatusCode::OK);
        for i in [0, 89] {
            let got = response.headers.get(format!("x-h{i}"));
            assert_eq!(got.map(|v| v.as_bytes()), Some(format!("v{i}").as_bytes()));
        }
        // 90 of the function's and the length.
        assert_eq!(response.headers.len(), 91, "{:?}", response.headers);

        let path = dir.path().join("many.sock");
        serve(&path, &answer(150));
        match call(path).await {
            Err(DriverError::Function(why)) => {
                assert!(why.contains("more than 100 header lines"), "{why}");
            }
            other => panic!("an answer of 150 headers: {other:?}"),
        }
    }

    /// The FDK's own 502 (the function raised) and 504 (it saw the deadline pass) are its
    /// report on the call, as Fn's agent takes them: not an answer for the client, whose
    /// body (an exception's text) goes neither to the client nor to the error.
    #[tokio::test]
    async fn an_fdks_own_502_and_504_are_the_functions_failure_and_timeout() {
        for (reply, want_timeout) in [
            (
                "HTTP/1.1 502 Bad Gateway\r\nfn-http-status: 502\r\n\
                 fn-http-h-content-type: application/json\r\ncontent-length: 21\r\n\r\n\
                 password=hunter2 oops",
                false,
            ),
            (
                "HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 21\r\n\r\n\
                 password=hunter2 late",
                true,
            ),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("fn.sock");
            serve(&path, reply);
            let error = match call(path).await {
                Ok(response) => panic!("passed on to the client as {}", response.status),
                Err(e) => e,
            };
            let message = error.to_string();
            assert!(!message.contains("hunter2"), "{message}");
            assert!(message.contains("21 bytes"), "{message}");
            match &error {
                DriverError::TimedOut(_) => assert!(want_timeout, "{message}"),
                DriverError::Failed(_) => assert!(!want_timeout, "{message}"),
                other => panic!("{other:?}"),
            }
            // The instance answered as its contract says: it takes the next call.
            assert!(error.instance_serves_on(), "{message}");
        }
    }

    /// A function that answers `200 ok` to calls one after another on each connection, but
    /// closes a connection idle for `idle_close` when the next call arrives on it, unanswered
    /// (as a call sent just as an FDK closes an idle connection meets it).
    fn serve_closing_idle(path: &Path, idle_close: Duration) {
        let listener = tokio::net::UnixListener::bind(path).expect("bind");
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    let mut answered: Option<Instant> = None;
                    loop {
                        let end = loop {
                            if let Some(head) = got.windows(4).position(|w| w == b"\r\n\r\n")
                                && let Some(at) =
                                    got[head + 4..].windows(5).position(|w| w == b"0\r\n\r\n")
                            {
                                break head + 4 + at + 5;
                            }
                            match conn.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                            if answered.is_some_and(|at| at.elapsed() >= idle_close) {
                                return;
                            }
                        };
                        got.drain(..end);
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if conn.write_all(reply).await.is_err() {
                            return;
                        }
                        answered = Some(Instant::now());
                    }
                });
            }
        });
    }

    /// A kept connection idle longer than the runner keeps one is not used: the FDK may be
    /// closing it (the Python FDK closes one idle 75 s), and a call on it would break as if
    /// the function had crashed.
    #[tokio::test]
    async fn a_connection_idle_too_long_is_replaced_before_a_call() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fn.sock");
        serve_closing_idle(&path, Duration::from_millis(200));
        let (liveness, _ended) = Liveness::new(Duration::from_millis(100));
        let mut client = SocketClient::new(path, "test".into(), liveness, 1);
        client.idle_limit = Duration::from_millis(100);
        wait_for_listener(&client, Duration::from_secs(2))
            .await
            .expect("listening");
        for round in 0..2 {
            let response = client
                .send(request(), Box::pin(futures::stream::empty()))
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let body: Vec<_> = response.body.collect().await;
            assert!(matches!(&body[..], [Ok(b)] if &b[..] == b"ok"), "{body:?}");
            // Past the runner's limit and the function's: its connection is closing.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Records the `fdk_version` field of each event that has one.
    struct FdkVersions(Arc<std::sync::Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for FdkVersions {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Visit(Option<String>);
            impl tracing::field::Visit for Visit {
                fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
                    if field.name() == "fdk_version" {
                        self.0 = Some(format!("{value:?}"));
                    }
                }
            }
            let mut visit = Visit(None);
            event.record(&mut visit);
            if let Some(version) = visit.0 {
                self.0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(version);
            }
        }
    }

    /// The FDK an instance runs is logged once, at its first answer, not with every call.
    #[tokio::test]
    async fn an_instances_fdk_is_logged_once() {
        use tracing_subscriber::layer::SubscriberExt;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(FdkVersions(Arc::clone(&seen)));
        // The test's runtime has one thread: the calls log on it.
        let _guard = fn_test_support::logs::scoped_subscriber(subscriber);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fn.sock");
        serve_counting(&path);
        let (liveness, _ended) = Liveness::new(Duration::from_millis(100));
        let client = SocketClient::new(path.clone(), "test".into(), liveness, 1);
        wait_for_listener(&client, Duration::from_secs(2))
            .await
            .expect("listening");
        for _ in 0..3 {
            let response = client
                .send(request(), Box::pin(futures::stream::empty()))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let _: Vec<_> = response.body.collect().await;
        }
        let seen = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        assert_eq!(seen, [r#"Some("fdk-test/1.0")"#]);
    }
}
