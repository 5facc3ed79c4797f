//! [`ProcessInstance`]: one running function process and the HTTP/1 connection to it.
//!
//! A reaper task owns the `Child`: it waits for the process to exit (or for a kill request,
//! which it carries out while the process is still unreaped, so the process group id cannot
//! have been reused), publishes the exit status, kills what is left of the process group,
//! removes the memory cgroup and the instance directory. Everything else reads the exit
//! status from a `watch` channel, so "has it exited?" is an event, not a poll. If the runtime
//! drops the reaper first (shutdown), a drop guard does the same cleanup, best effort.
//!
//! The instance also holds the wrapper shell's *lifeline* (its stdin pipe): when that closes
//! — the instance is dropped, or the runner dies — the wrapper's watchdog kills the process
//! group, so functions never outlive their runner as orphans.
//!
//! Calls go over one HTTP/1 connection to the instance's socket, made on the first call and
//! reused while it stays open; a closed connection is replaced on the next call.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::process::{Child, ChildStdin};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::cgroup::InstanceCgroup;
use super::http_stream;
use super::output::{self, Labels, Stream as OutputStream};
use crate::driver::{BodyStream, DriverError, FunctionRequest, FunctionResponse, Instance};

/// How long a failed call waits for the process to be reaped before deciding the function
/// misbehaved rather than died. The exit is awaited as an event; this only bounds the wait.
const REAP_GRACE: Duration = Duration::from_millis(500);

/// How long a kept connection may take to become ready for the next request before it is
/// replaced by a new one.
const READY_TIMEOUT: Duration = Duration::from_secs(1);
/// Most bytes read ahead from a function's connection. Answers leave in chunks of at most
/// this size and each is held until the LB's stream takes it; hyper's default (about
/// 400 KiB) multiplies memory by the calls in flight for no throughput (the LB's client
/// side measured the same).
const FUNCTION_READ_BUFFER: usize = 64 * 1024;

/// The request body type sent to functions: the LB's chunks as they arrive.
type CallBody =
    StreamBody<Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send>>>;

/// How the process ended.
#[derive(Debug, Clone)]
pub(super) enum Exit {
    Status(ExitStatus),
    /// `wait` itself failed; the process is treated as gone.
    Unknown(String),
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Status(status) => match (status.code(), status.signal()) {
                (Some(code), _) => write!(f, "exited with status {code}"),
                (None, Some(signal)) => match Signal::try_from(signal) {
                    Ok(name) => write!(f, "killed by signal {signal} ({name})"),
                    Err(_) => write!(f, "killed by signal {signal}"),
                },
                (None, None) => write!(f, "exited ({status})"),
            },
            Exit::Unknown(e) => write!(f, "exited (wait failed: {e})"),
        }
    }
}

/// A freshly spawned child and what belongs to it.
pub(super) struct Spawned {
    pub(super) child: Child,
    pub(super) labels: Labels,
    pub(super) dir: PathBuf,
    pub(super) socket: PathBuf,
    pub(super) cgroup: Option<InstanceCgroup>,
    /// The wrapper shell's stdin (see `WRAPPER_SCRIPT`); `None` for an unwrapped child.
    pub(super) lifeline: Option<ChildStdin>,
    /// Calls the instance takes at once: it keeps up to this many connections.
    pub(super) concurrency: u32,
}

/// State shared by the instance handle and its reaper task.
#[derive(Debug)]
struct Shared {
    labels: Arc<Labels>,
    pid: u32,
    dir: PathBuf,
    socket: PathBuf,
    cgroup: Option<InstanceCgroup>,
    /// Set by [`Instance::kill`]; the instance is no longer alive from then on.
    killed: AtomicBool,
    /// Asks the reaper to kill the process group.
    kill: CancellationToken,
    /// `Some` once the process has been reaped.
    exit: watch::Receiver<Option<Exit>>,
    /// Cancelled when the reaper has finished cleaning up (cgroup and directory removed).
    gone: CancellationToken,
}

/// A function instance running as a child process. Killed when dropped.
pub struct ProcessInstance {
    shared: Arc<Shared>,
    /// Kept connections, one per call the instance may run at once (`concurrency`). A call
    /// takes one out for its round trip to the response head and puts it back.
    conns: std::sync::Mutex<Vec<SendRequest<CallBody>>>,
    concurrency: usize,
    /// Held for the instance's lifetime: when it closes (the instance is dropped, or the
    /// runner dies) the wrapper's watchdog kills the process group.
    lifeline: Option<ChildStdin>,
}

impl fmt::Debug for ProcessInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessInstance")
            .field("id", &self.shared.labels.instance)
            .field("pid", &self.shared.pid)
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl ProcessInstance {
    /// Takes over a spawned child: moves it into its cgroup, starts the output loggers and
    /// the reaper.
    ///
    /// # Errors
    /// A message when the child has no pid (already reaped) or cannot join its cgroup; the
    /// child is killed and cleaned up then.
    pub(super) fn spawned(spawned: Spawned) -> Result<Self, String> {
        let Spawned {
            mut child,
            labels,
            dir,
            socket,
            cgroup,
            lifeline,
            concurrency,
        } = spawned;
        let labels = Arc::new(labels);
        let Some(pid) = child.id() else {
            remove_instance_dir(&dir);
            return Err("the process exited before it could be watched".into());
        };
        let join_error = cgroup.as_ref().and_then(|cgroup| cgroup.add(pid).err());

        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(output::log_lines(
                stdout,
                OutputStream::Stdout,
                labels.clone(),
            ));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(output::log_lines(
                stderr,
                OutputStream::Stderr,
                labels.clone(),
            ));
        }

        let (exit_tx, exit) = watch::channel(None);
        let shared = Arc::new(Shared {
            labels,
            pid,
            dir,
            socket,
            cgroup,
            killed: AtomicBool::new(false),
            kill: CancellationToken::new(),
            exit,
            gone: CancellationToken::new(),
        });
        tokio::spawn(reap(child, exit_tx, shared.clone()));
        let instance = ProcessInstance {
            shared,
            conns: std::sync::Mutex::new(Vec::new()),
            concurrency: usize::try_from(concurrency.max(1)).unwrap_or(1),
            lifeline,
        };
        if let Some(e) = join_error {
            instance.kill();
            return Err(e);
        }
        Ok(instance)
    }

    /// Lets a wrapped child exec its program (it has joined its cgroup by now). A failed
    /// write means the child is already gone, which waiting for its listener reports.
    pub(super) async fn open_gate(&mut self) {
        if let Some(lifeline) = self.lifeline.as_mut()
            && let Err(e) = lifeline.write_all(b"go\n").await
        {
            tracing::debug!(instance = %self.id(), error = %e, "cannot open the gate");
        }
    }

    /// The instance id (also the name of its directory and cgroup).
    pub fn id(&self) -> &str {
        &self.shared.labels.instance
    }

    /// The instance's private directory, holding its socket.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The listener socket path (`<dir>/lsnr.sock`).
    pub fn socket_path(&self) -> &Path {
        &self.shared.socket
    }

    /// The instance's memory cgroup, when limits are enforced.
    pub fn cgroup_dir(&self) -> Option<&Path> {
        self.shared.cgroup.as_ref().map(InstanceCgroup::dir)
    }

    /// Waits until the process has been reaped and its cgroup and directory removed.
    pub async fn wait_gone(&self) {
        self.shared.gone.cancelled().await;
    }

    pub(super) fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.shared.exit.clone()
    }

    /// Classifies a transport failure: `Crashed` when the process has exited (waiting
    /// briefly for it to be reaped), else `Function`.
    async fn failure(shared: &Shared, what: &str, error: impl fmt::Display) -> DriverError {
        let mut exit = shared.exit.clone();
        let reaped = tokio::time::timeout(REAP_GRACE, exit.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|exit| exit.clone());
        match reaped {
            Some(_) if shared.killed.load(Ordering::SeqCst) => {
                DriverError::Crashed(format!("killed by the runner ({what}: {error})"))
            }
            Some(exit) => DriverError::Crashed(exit.to_string()),
            None => DriverError::Function(format!("{what}: {error}")),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<SendRequest<CallBody>>> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A kept connection that is free for a call, else a new one. A one-call instance
    /// waits (briefly) for its one connection to finish the previous answer; an instance
    /// that takes several calls opens another connection instead of queueing behind one.
    async fn connection(&self) -> Result<SendRequest<CallBody>, DriverError> {
        let candidate = {
            let mut kept = self.kept();
            kept.retain(|sender| !sender.is_closed());
            match kept.iter().position(SendRequest::is_ready) {
                Some(pos) => Some(kept.swap_remove(pos)),
                None if self.concurrency == 1 => kept.pop(),
                None => None,
            }
        };
        if let Some(mut sender) = candidate
            && matches!(
                tokio::time::timeout(READY_TIMEOUT, sender.ready()).await,
                Ok(Ok(()))
            )
        {
            return Ok(sender);
        }
        let stream = match UnixStream::connect(&self.shared.socket).await {
            Ok(stream) => stream,
            Err(e) => return Err(Self::failure(&self.shared, "cannot connect", e).await),
        };
        let handshake = http1::Builder::new()
            .max_buf_size(FUNCTION_READ_BUFFER)
            .handshake(TokioIo::new(stream));
        let (sender, connection) = match handshake.await {
            Ok(pair) => pair,
            Err(e) => return Err(Self::failure(&self.shared, "handshake failed", e).await),
        };
        let instance = self.shared.labels.instance.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%instance, error = %e, "function connection ended");
            }
        });
        Ok(sender)
    }

    /// Puts a connection back for the next call, unless enough are kept already.
    fn keep(&self, sender: SendRequest<CallBody>) {
        let mut kept = self.kept();
        if kept.len() < self.concurrency {
            kept.push(sender);
        }
    }

    async fn send(
        &self,
        request: FunctionRequest,
        body: BodyStream<std::io::Error>,
    ) -> Result<FunctionResponse, DriverError> {
        if !self.is_alive() {
            return Err(match self.shared.exit.borrow().as_ref() {
                Some(exit) if !self.shared.killed.load(Ordering::SeqCst) => {
                    DriverError::Crashed(exit.to_string())
                }
                _ => DriverError::Crashed("the instance was killed".into()),
            });
        }
        let headers = http_stream::call_headers(&request)?;
        let frames: Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send>> =
            Box::pin(body.map(|chunk| chunk.map(Frame::data)));
        let mut http_request = Request::post("/call")
            .body(StreamBody::new(frames))
            .map_err(|e| DriverError::Invalid(format!("cannot build the call request: {e}")))?;
        *http_request.headers_mut() = headers;

        let mut sender = self.connection().await?;
        let reply = match sender.send_request(http_request).await {
            Ok(reply) => reply,
            Err(e) => return Err(Self::failure(&self.shared, "call failed", e).await),
        };
        self.keep(sender);

        let (head, incoming) = reply.into_parts();
        let status = http_stream::client_status(head.status, &head.headers)
            .map_err(DriverError::Function)?;
        let headers = http_stream::fn_to_client(&head.headers);
        let shared = self.shared.clone();
        let body = incoming.into_data_stream().then(move |chunk| {
            let shared = shared.clone();
            async move {
                match chunk {
                    Ok(bytes) => Ok(bytes),
                    Err(e) => Err(Self::failure(&shared, "reply broke off", e).await),
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

impl Instance for ProcessInstance {
    fn call(
        &self,
        request: FunctionRequest,
        body: BodyStream<std::io::Error>,
    ) -> BoxFuture<'_, Result<FunctionResponse, DriverError>> {
        Box::pin(self.send(request, body))
    }

    fn is_alive(&self) -> bool {
        !self.shared.killed.load(Ordering::SeqCst) && self.shared.exit.borrow().is_none()
    }

    fn kill(&self) {
        if self.shared.killed.swap(true, Ordering::SeqCst) {
            return;
        }
        // The reaper signals the group while the leader is unreaped (see `reap`).
        self.shared.kill.cancel();
        // The socket goes now, so nothing can connect to a dying instance; the reaper
        // removes the directory again (a no-op) and the cgroup once the process is gone.
        remove_instance_dir(&self.shared.dir);
    }

    fn pid(&self) -> Option<u32> {
        Some(self.shared.pid)
    }

    fn wait_gone(&self) -> BoxFuture<'_, ()> {
        Box::pin(ProcessInstance::wait_gone(self))
    }
}

impl Drop for ProcessInstance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILLs the instance's process group, whose id is the leader's pid (`process_group(0)`).
fn signal_group(shared: &Shared) {
    match killpg(Pid::from_raw(shared.pid as i32), Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(
            instance = %shared.labels.instance,
            error = %e,
            "cannot kill function process group"
        ),
    }
}

/// Cleans up when the reaper is dropped before it finished — the runtime is shutting down
/// with the instance still around. Synchronous and best effort: kill the group, remove the
/// directory, and leave the cgroup removal (which must wait for the kernel) to a thread.
struct ReaperAbandoned {
    shared: Arc<Shared>,
    finished: bool,
}

impl Drop for ReaperAbandoned {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if self.shared.exit.borrow().is_none() {
            // Not reaped (the child is dropped with this future), so the pid is still ours.
            signal_group(&self.shared);
        }
        remove_instance_dir(&self.shared.dir);
        if let Some(cgroup) = &self.shared.cgroup {
            cgroup.remove_in_background();
        }
    }
}

/// Owns the child until it is reaped, then cleans up after it.
async fn reap(mut child: Child, exit_tx: watch::Sender<Option<Exit>>, shared: Arc<Shared>) {
    let mut abandoned = ReaperAbandoned {
        shared: shared.clone(),
        finished: false,
    };
    let exit = tokio::select! {
        status = child.wait() => status,
        () = shared.kill.cancelled() => {
            // The leader is not reaped yet, so its pid still names this process group.
            signal_group(&shared);
            child.wait().await
        }
    };
    let exit = match exit {
        Ok(status) => Exit::Status(status),
        Err(e) => Exit::Unknown(e.to_string()),
    };
    tracing::debug!(instance = %shared.labels.instance, pid = shared.pid, %exit, "function process ended");
    exit_tx.send_replace(Some(exit));
    // The leader exited on its own: kill what it left in its group. Its pid cannot be
    // reused while any member remains; if none does this finds nothing (ESRCH).
    signal_group(&shared);
    if let Some(cgroup) = &shared.cgroup {
        cgroup.remove().await;
    }
    remove_instance_dir(&shared.dir);
    abandoned.finished = true;
    shared.gone.cancel();
}

/// Removes an instance directory and everything in it; a missing directory is fine.
pub(super) fn remove_instance_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(
            dir = %dir.display(),
            error = %e,
            "cannot remove instance directory"
        ),
    }
}
