//! [`DirectChannel`]: a gRPC client channel that hands each request straight to hyper's
//! HTTP/2 connection.
//!
//! tonic's `Channel` puts a `tower::buffer` in front of the connection: every request goes
//! through a channel to a worker task, which calls the connection and sends the response
//! future back. On the LB's hot path (one Engage stream per call) that is a task hop and
//! some 8,000 instructions per call (callgrind) for a queue the runner never needs: hyper's
//! own dispatch already queues requests for the connection task. This channel keeps the
//! rest of what the LB used from tonic's: it dials lazily, redials when the connection has
//! closed, bounds the dial, and pings the peer as the servers do. Under `FN_SHARDS` it keeps
//! one connection per shard.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fn_lifecycle::logging::Throttle;
use hyper::client::conn::http2;
use hyper_util::rt::TokioTimer;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::transport::Uri;

use crate::open::{Entry, Moved};
use crate::transport::{Dialer, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, PlainDialer};
use crate::{
    CONNECTION_WINDOW, LOCAL_ERROR_RESETS, MAX_FRAME_SIZE, NodeTls, RESET_STREAMS_REMEMBERED,
    STREAM_WINDOW, TlsMode,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long calls stay on a connection moved off (its peer still trusted) once a dial to
/// replace it has failed, before the next call tries again.
pub(crate) const REPLACE_RETRY: Duration = Duration::from_secs(10);

/// A gRPC channel to one server over one HTTP/2 connection, dialled on first use and again
/// whenever the connection has closed. Cheap to clone; every clone shares the connection.
/// The connection closes once the last clone is dropped and its calls have ended.
#[derive(Clone)]
pub struct DirectChannel {
    inner: Arc<Inner>,
}

struct Inner {
    /// `http://host:port`: what the channel dials, and the origin requests must carry.
    origin: Uri,
    /// The node material under mutual TLS; `None` dials plaintext (`FN_INSECURE`).
    tls: Option<NodeTls>,
    connect_timeout: Duration,
    /// The connection's request handle while it is open, one connection per shard
    /// (`FN_SHARDS`; index 0 without shards): each is dialled on, and driven by, the shard
    /// whose call found none, so a shard's calls never wake another shard's thread.
    current: Mutex<Vec<Option<Connection>>>,
    /// Held while dialling: calls that find no connection wait for one dial, not each
    /// their own.
    dialling: tokio::sync::Mutex<()>,
    /// The last dial that failed, and when it ended: a call that waited for that dial
    /// fails with its error rather than dialling again (one after another, waiting calls
    /// would otherwise each spend a whole connect timeout on a server that does not answer).
    failed: Mutex<Option<(Instant, Status)>>,
    /// Set when a dial to replace a connection moved off (its peer still trusted: this
    /// node's certificate was rotated, or the peer's ends soon) failed: until then, calls go
    /// on that connection, which still works, rather than fail or dial for each call. A
    /// retired connection (its peer no longer trusted) is never kept so.
    keep_moved_until: Mutex<Option<Instant>>,
    /// The warning that such a dial failed, at most once a minute.
    replace_failed: Throttle,
}

/// An open connection of the channel.
struct Connection {
    sender: http2::SendRequest<Body>,
    /// Under mutual TLS: set once the server's certificate no longer verifies, when the
    /// connection takes no new calls ([`NodeTls::recheck_connections`]).
    retirement: Option<Arc<Entry>>,
}

impl Connection {
    /// Whether new calls may go on it.
    fn takes_calls(&self) -> bool {
        !self.sender.is_closed()
            && !self
                .retirement
                .as_ref()
                .is_some_and(|r| r.is_retired() || r.moved().is_some())
    }

    /// Why it was moved off while it is open and its peer still trusted: it may then carry
    /// calls while no new connection can be had.
    fn moved(&self) -> Option<Moved> {
        let retirement = self.retirement.as_ref()?;
        if self.sender.is_closed() || retirement.is_retired() {
            return None;
        }
        retirement.moved()
    }
}

impl std::fmt::Debug for DirectChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectChannel")
            .field("origin", &self.inner.origin)
            .finish_non_exhaustive()
    }
}

impl DirectChannel {
    /// A channel to `address` (`host:port`) under `mode`; nothing is dialled yet. A dial
    /// (TCP, TLS, HTTP/2 handshake) taking longer than `connect_timeout` fails the call
    /// that started it.
    ///
    /// # Errors
    /// When `address` is not a valid URI authority.
    pub fn new(
        mode: &TlsMode,
        address: &str,
        connect_timeout: Duration,
    ) -> Result<Self, http::uri::InvalidUri> {
        let origin: Uri = format!("http://{address}").parse()?;
        Ok(DirectChannel {
            inner: Arc::new(Inner {
                origin,
                tls: mode.node().cloned(),
                connect_timeout,
                current: Mutex::new(Vec::new()),
                dialling: tokio::sync::Mutex::new(()),
                failed: Mutex::new(None),
                keep_moved_until: Mutex::new(None),
                replace_failed: Throttle::new(Duration::from_secs(60)),
            }),
        })
    }

    /// `http://host:port`: the origin a gRPC client on this channel must put in its
    /// requests (`with_origin`), as HTTP/2 sends it in every stream's headers.
    pub fn origin(&self) -> Uri {
        self.inner.origin.clone()
    }
}

impl Inner {
    /// The calling shard's open connection's handle, if there is one that takes calls: one
    /// moved off is kept for [`REPLACE_RETRY`] after a dial to replace it failed.
    fn open(&self) -> Option<http2::SendRequest<Body>> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let connection = current
            .get(fn_lifecycle::shards::current())
            .and_then(Option::as_ref)?;
        if connection.takes_calls() {
            return Some(connection.sender.clone());
        }
        let kept = connection.moved().is_some()
            && self
                .keep_moved_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some_and(|until| Instant::now() < until);
        kept.then(|| connection.sender.clone())
    }

    /// After a dial failed with `error`: the calling shard's connection, when it was moved
    /// off though its peer is still trusted and is still open; calls stay on it for
    /// [`REPLACE_RETRY`] before a dial is tried again.
    fn keep_moved(&self, error: &str) -> Option<http2::SendRequest<Body>> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let connection = current
            .get(fn_lifecycle::shards::current())
            .and_then(Option::as_ref)?;
        let moved = connection.moved()?;
        *self
            .keep_moved_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + REPLACE_RETRY);
        let message = "a new gRPC connection to replace one this node moved its calls off \
                       failed: calls stay on the old connection, which its peer still accepts, \
                       and a new one is tried again after `retry` (does the peer trust this \
                       node's new certificate yet? each step of a CA rollover must reach every \
                       daemon before the next)";
        fn_lifecycle::warn_throttled!(self.replace_failed, origin = %self.origin, moved = moved.why(), error, retry = ?REPLACE_RETRY, "{message}");
        Some(connection.sender.clone())
    }

    /// A new connection's handle, for a call that found none open: dials unless another
    /// call did while this one waited for its turn.
    async fn dial(&self) -> Result<http2::SendRequest<Body>, Status> {
        let asked = Instant::now();
        let _dialling = self.dialling.lock().await;
        if let Some(sender) = self.open() {
            return Ok(sender);
        }
        if let Some((_, status)) = self
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|(ended, _)| *ended >= asked)
        {
            return Err(status.clone());
        }
        let dialled = match tokio::time::timeout(self.connect_timeout, self.connect()).await {
            Ok(Ok(sender)) => Ok(sender),
            Ok(Err(e)) => Err(format!(
                "cannot connect to {}: {}",
                self.origin,
                fn_lifecycle::logging::error_chain(e.as_ref())
            )),
            Err(_) => Err(format!(
                "cannot connect to {}: no connection within {:?}",
                self.origin, self.connect_timeout
            )),
        };
        let connection = match dialled {
            Ok(connection) => connection,
            Err(message) => {
                if let Some(sender) = self.keep_moved(&message) {
                    return Ok(sender);
                }
                let status = Status::unavailable(message);
                *self.failed.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((Instant::now(), status.clone()));
                return Err(status);
            }
        };
        {
            let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            let shard = fn_lifecycle::shards::current();
            if current.len() <= shard {
                current.resize_with(shard + 1, || None);
            }
            let sender = connection.sender.clone();
            current[shard] = Some(connection);
            Ok(sender)
        }
    }

    /// Dials (TCP, then the TLS handshake under mutual TLS) and sets up HTTP/2.
    async fn connect(&self) -> Result<Connection, BoxError> {
        let origin = self.origin.clone();
        match &self.tls {
            Some(tls) => {
                // This channel moves its calls off a retired connection.
                let mut dialer = Dialer {
                    tls: tls.clone(),
                    follows: true,
                };
                let mut io = dialer.call(origin).await?;
                // A server that refuses this node's certificate says so after the client's
                // side of the handshake: a dial is good once the server has spoken.
                io.inner_mut().server_speaks().await?;
                let retirement = io.inner().retirement();
                Ok(Connection {
                    sender: self.handshake(io).await?,
                    retirement,
                })
            }
            None => Ok(Connection {
                sender: self.handshake(PlainDialer.call(origin).await?).await?,
                retirement: None,
            }),
        }
    }

    /// The HTTP/2 handshake on a dialled connection, and the task that drives it.
    async fn handshake<T>(&self, io: T) -> Result<http2::SendRequest<Body>, BoxError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, connection) = http2::Builder::new(BoxingExecutor)
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_concurrent_reset_streams(RESET_STREAMS_REMEMBERED)
            .max_local_error_reset_streams(LOCAL_ERROR_RESETS)
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(io)
            .await?;
        let origin = self.origin.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                let error = fn_lifecycle::logging::error_chain(&e);
                tracing::debug!(%origin, error, "gRPC connection ended with an error");
            }
        });
        Ok(sender)
    }
}

impl Service<http::Request<Body>> for DirectChannel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // hyper's dispatch queues requests for the connection; a closed connection is
        // replaced in `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        // The usual case, an open connection, takes a small future; dialling (a TLS
        // handshake's worth of state) is boxed apart, so that every call does not carry it.
        match inner.open() {
            Some(sender) => Box::pin(send(sender, request, inner)),
            None => Box::pin(async move {
                let sender = Box::pin(inner.dial()).await?;
                send(sender, request, inner).await
            }),
        }
    }
}

async fn send(
    mut sender: http2::SendRequest<Body>,
    request: http::Request<Body>,
    inner: Arc<Inner>,
) -> Result<http::Response<hyper::body::Incoming>, Status> {
    sender.send_request(request).await.map_err(|e| {
        let error = fn_lifecycle::logging::error_chain(&e);
        Status::unavailable(format!("call to {} failed: {error}", inner.origin))
    })
}

/// Runs hyper's connection-side futures (one per request body) as tasks, each boxed first:
/// spawning the unboxed future copied it three times over (some 6,000 instructions per
/// call, callgrind), a box once.
#[derive(Clone, Copy)]
struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Box::pin(future));
    }
}
