//! The sockets of every gRPC hop: servers accept with [`grpc_server`] and [`grpc_incoming`],
//! clients dial with [`grpc_endpoint`]. Under mutual TLS both do the handshake themselves,
//! with the rustls configs of [`crate::dynamic`], so certificates can be replaced while the
//! daemon runs; tonic sees plain byte streams.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fn_lifecycle::logging::Throttle;
use fn_lifecycle::shards::{ShardLoad, Shards};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::codegen::Service;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cork::Corked;
use crate::open::{OpenConnections, Peer, Registration};
use crate::{NodeTls, TlsMode};

/// HTTP/2 flow-control window of one stream (one call). Body frames are up to 1 MiB. This
/// is what one call whose bytes nobody reads holds at the receiving end: an answer at the
/// lb-agent while its HTTP client reads slowly, a request at the runner while its function
/// ignores its input.
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// HTTP/2 flow-control window of a whole connection: HTTP/2's largest (2 GiB − 1), so the
/// streams of one connection never run it down between them. Bytes a stream holds unread
/// count against both windows; with 64 MiB, 32 calls with slow readers stopped every other
/// call on the connection (their acknowledgements, `Status` answers and reports are data
/// too), and the runner read as down. Now that takes 1,024 such calls on one connection,
/// each holding a whole stream window (2 GiB). What bounds the memory slow readers hold is
/// [`STREAM_WINDOW`] per call (plus what each end has in hand: a frame, a few queued),
/// times the calls a daemon takes; a connection's window only stopped the other calls
/// sooner.
pub const CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// Streams a client connection remembers after resetting them (h2's default is 50), so that
/// the frames a peer had already sent for them are dropped quietly. A call cancelled when
/// its client leaves is a reset; a burst of more than 50 (a load generator stopping, a
/// proxy dropping its connections) left the rest forgotten, and h2 answers a frame for a
/// forgotten stream with a reset of its own.
pub const RESET_STREAMS_REMEMBERED: usize = 1024;

/// How many resets of its own (answers to a peer's frames h2 holds to be in error, such as
/// one for a forgotten stream) an HTTP/2 connection sends before it closes itself: no
/// limit. h2 sets 1,024 for the whole life of a connection, never counting down, as a guard
/// against a hostile peer; between daemons that proved who they are (mutual TLS) it only
/// closed, every so many cancellation bursts, a connection carrying every call between an
/// LB and a runner, and all those calls with it.
pub const LOCAL_ERROR_RESETS: Option<usize> = None;

/// Largest HTTP/2 frame either end of a gRPC connection accepts, so the largest the other
/// sends (h2's default is 16 KiB). A body chunk (up to 128 KiB from a client, 64 KiB from a
/// function) then crosses as one DATA frame: one write, one TLS flight and one wake-up of
/// the peer instead of eight. A frame of another call waits behind it for at most 256 KiB
/// (tens of microseconds on loopback). Measured on the 1 MiB bench-compare row against
/// 16 KiB: 12% less CPU per call in each daemon, 6% more calls per second (README,
/// Performance, session 17).
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;

/// Most bytes of sealed TLS records a connection holds before they are written (rustls's
/// default is 64 KiB). tokio-rustls seals what fits under this and then writes it, so a
/// DATA frame of [`MAX_FRAME_SIZE`] went out in four `writev`s, and the peer was woken four
/// times; under twice the frame it leaves in one. Records are held only until the socket
/// takes them, so a connection holds this much only while its peer reads slower than it
/// is sent to.
pub const TLS_SEND_BUFFER: usize = 2 * MAX_FRAME_SIZE as usize;

/// Lets `connection` hold [`TLS_SEND_BUFFER`] of sealed records, so that a whole DATA
/// frame is sealed before it is written.
fn hold_a_frame<Side>(connection: &mut rustls::ConnectionCommon<Side>) {
    connection.set_buffer_limit(Some(TLS_SEND_BUFFER));
}

/// How long a peer has, from connecting, to finish the TLS handshake and send the first
/// bytes of HTTP/2 (its preface): hyper waits for the preface without a limit of its own,
/// and a connection that never sends it would stay open, and hold up a graceful shutdown,
/// for ever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often an idle HTTP/2 connection pings its peer, and how long the answer may take
/// before the connection is given up (both ends of every gRPC hop).
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepted connections waiting for the server to take them.
const ACCEPT_QUEUE: usize = 64;

/// Most accepted connections a gRPC listener holds before they are served: in their TLS
/// handshake, or waiting for the server to take them. Beyond it a new connection is closed
/// at once. A peer that connects and sends nothing holds its place for at most
/// [`HANDSHAKE_TIMEOUT`], so without a limit a few hundred such connections a second
/// would use up the process's descriptors, which the running calls and their function
/// instances need. Peers open one connection each (or one per shard), so honest ones
/// stay far below it.
pub const MAX_HANDSHAKING: usize = 256;

/// Most of the [`MAX_HANDSHAKING`] places one peer address may hold, so that one host
/// opening connections and sending nothing cannot lock every other peer out (an lb-agent
/// reconnecting to a restarted runner, say): a quarter, far above what an honest peer
/// opens at once.
pub const MAX_HANDSHAKING_PER_PEER: usize = MAX_HANDSHAKING / 4;

/// Of the [`MAX_HANDSHAKING`] places, how many only an address holding none may take: the
/// per-address share alone let four addresses hold them all, and an LB reconnecting from a
/// fifth was refused until one of their connections timed out.
pub const HANDSHAKING_RESERVE: usize = MAX_HANDSHAKING / 8;

/// Most connections one peer address may hold open on a gRPC listener, served or still in
/// their handshake; beyond it a new connection from that address is closed at once. An LB
/// opens one connection to a runner per shard (`FN_SHARDS`), and all the lb-agents of a
/// host share its address (behind swarm's routing mesh, all those of a node), so honest
/// peers stay far below it; without it one peer holding a valid certificate could open
/// connections until the process ran out of descriptors, each holding its buffers and
/// up to 16,384 streams on a runner (`fn_runner::MAX_STREAMS_PER_CONNECTION`).
pub const MAX_OPEN_PER_PEER: usize = 1024;

/// The server builder [`grpc_server`] gives: tonic's, with
/// [`RefuseRetiredLayer`](crate::refuse::RefuseRetiredLayer) in front of every service.
pub type GrpcServer = tonic::transport::Server<GrpcServerLayer>;

/// The layers of a [`GrpcServer`].
pub type GrpcServerLayer =
    tower_layer::Stack<crate::refuse::RefuseRetiredLayer, tower_layer::Identity>;

/// A tonic server builder with the dataplane's HTTP/2 settings. Feed it
/// [`grpc_incoming`], which does the TLS.
///
/// HTTP/2 keepalive pings find peers that vanished without closing their connection (a
/// crashed host, a partition), so their streams end instead of waiting for a deadline.
///
/// Every call first passes [`RefuseRetiredLayer`](crate::refuse::RefuseRetiredLayer): a new
/// call on a connection retired because its client is no longer trusted is refused.
pub fn grpc_server() -> GrpcServer {
    tonic::transport::Server::builder()
        .layer(crate::refuse::RefuseRetiredLayer)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(Some(MAX_FRAME_SIZE))
        .http2_max_local_error_reset_streams(LOCAL_ERROR_RESETS)
}

/// The connections a [`grpc_server`] serves on `listener`: with `TCP_NODELAY` set and, under
/// mutual TLS, once their handshake has succeeded.
///
/// A server fed a bare listener stream keeps Nagle's algorithm on: a small response frame
/// then waits for the peer's delayed ACK (40 ms on Linux) and every call pays it. Measured
/// with `fn-load` (sequential `hello` calls, release): p50 44 ms without, 1.2 ms with.
///
/// Handshakes run concurrently, each bounded by [`HANDSHAKE_TIMEOUT`] up to the first bytes
/// of HTTP/2, so a peer that connects and says nothing holds up no one for longer than
/// that, and at most [`MAX_HANDSHAKING`] at once. A failed handshake is logged with the peer's address and the reason (an unknown
/// CA, an expired certificate, no certificate).
///
/// # Errors
/// When the crypto provider cannot make a server config (not with ring).
pub fn grpc_incoming(mode: &TlsMode, listener: TcpListener) -> Result<GrpcIncoming, rustls::Error> {
    let mut incoming = grpc_incoming_sharded(mode, listener, None)?;
    Ok(incoming.remove(0))
}

/// [`grpc_incoming`] for a server per shard (`FN_SHARDS`): one stream per shard, in the
/// shards' order; serve stream `i` on shard `i`. A connection goes to the shard with the
/// fewest open ([`Shards::assign`]) and its socket moves to that shard's runtime before the
/// TLS handshake, so the handshake, the connection and the calls on it run on that shard's
/// thread. `None` (or one shard) gives one stream, served where this is called.
///
/// # Errors
/// When the crypto provider cannot make a server config (not with ring).
pub fn grpc_incoming_sharded(
    mode: &TlsMode,
    listener: TcpListener,
    shards: Option<Arc<Shards>>,
) -> Result<Vec<GrpcIncoming>, rustls::Error> {
    incoming_limited(
        mode,
        listener,
        shards,
        Limits {
            handshaking: MAX_HANDSHAKING,
            handshaking_per_peer: MAX_HANDSHAKING_PER_PEER,
            open_per_peer: MAX_OPEN_PER_PEER,
        },
    )
}

/// How many connections a listener holds.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Connections before they are served ([`MAX_HANDSHAKING`]), the last eighth of them
    /// (see [`HANDSHAKING_RESERVE`]) for addresses that hold none.
    handshaking: usize,
    /// Of those, from one address ([`MAX_HANDSHAKING_PER_PEER`]).
    handshaking_per_peer: usize,
    /// Connections from one address, served or not ([`MAX_OPEN_PER_PEER`]).
    open_per_peer: usize,
}

/// [`grpc_incoming_sharded`] within `limits`.
fn incoming_limited(
    mode: &TlsMode,
    listener: TcpListener,
    shards: Option<Arc<Shards>>,
    limits: Limits,
) -> Result<Vec<GrpcIncoming>, rustls::Error> {
    let acceptor = match mode {
        TlsMode::Mutual(tls) => Some(Acceptor {
            tls: TlsAcceptor::from(tls.server_config()?),
            open: Arc::clone(tls.open_connections()),
        }),
        TlsMode::Insecure => None,
    };
    let count = shards.as_ref().map_or(1, |s| s.len());
    let (queues, incoming) = (0..count)
        .map(|_| {
            let (queue, accepted) = mpsc::channel(ACCEPT_QUEUE);
            (queue, GrpcIncoming { accepted })
        })
        .unzip();
    let handshaking = Handshaking {
        all: Arc::new(Semaphore::new(limits.handshaking)),
        reserve: limits.handshaking / 8,
        per_peer: Arc::new(PerPeer {
            limit: limits.handshaking_per_peer,
            counts: std::sync::Mutex::default(),
        }),
        open_per_peer: Arc::new(PerPeer {
            limit: limits.open_per_peer,
            counts: std::sync::Mutex::default(),
        }),
    };
    tokio::spawn(accept_loop(listener, acceptor, queues, shards, handshaking));
    Ok(incoming)
}

/// The TLS side of a listener: the handshake, and where accepted connections are
/// registered to be checked again ([`NodeTls::recheck_connections`]).
#[derive(Clone)]
struct Acceptor {
    tls: TlsAcceptor,
    open: Arc<OpenConnections>,
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<Acceptor>,
    queues: Vec<mpsc::Sender<GrpcConn>>,
    shards: Option<Arc<Shards>>,
    handshaking: Handshaking,
) {
    let warnings = Arc::new(Warnings::default());
    // Every server stops together (one shutdown): the first one gone ends the loop.
    let Some(first) = queues.first().cloned() else {
        return;
    };
    loop {
        let accepted = tokio::select! {
            () = first.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let accepted_at = tokio::time::Instant::now();
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was taken: the
                // listener itself is fine. Pause so a persistent EMFILE does not spin.
                warnings.accept_failed(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(open_place) = handshaking.open_per_peer.claim(peer.ip()) else {
            warnings.open_too_many(peer, handshaking.open_per_peer.limit);
            continue; // drops the socket: the peer sees the connection close
        };
        let Some(peer_place) = handshaking.per_peer.claim(peer.ip()) else {
            warnings.crowded_by(peer);
            continue;
        };
        // Only this task takes places, so the count can only grow until the next check.
        if !peer_place.first && handshaking.all.available_permits() <= handshaking.reserve {
            warnings.crowded(peer);
            continue;
        }
        let Ok(place) = Arc::clone(&handshaking.all).try_acquire_owned() else {
            warnings.crowded(peer);
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "gRPC connection: TCP_NODELAY not set");
        }
        // The shard that serves it, and its runtime when that is not this one.
        let (shard, elsewhere, load) = match &shards {
            Some(shards) => {
                let (shard, runtime, load) = shards.assign();
                let here = shard == fn_lifecycle::shards::current();
                (shard, (!here).then(|| runtime.clone()), Some(load))
            }
            None => (0, None, None),
        };
        let admit = Admit {
            peer,
            deadline: accepted_at + HANDSHAKE_TIMEOUT,
            acceptor: acceptor.clone(),
            queue: queues[shard].clone(),
            warnings: Arc::clone(&warnings),
            load,
            open_place,
            _place: place,
            _peer_place: peer_place,
        };
        let Some(runtime) = elsewhere else {
            tokio::spawn(admit.run(tcp));
            continue;
        };
        // Registered with this runtime's driver until moved: its events must wake the shard
        // that serves it.
        match tcp.into_std() {
            Ok(tcp) => drop(runtime.spawn(async move {
                match TcpStream::from_std(tcp) {
                    Ok(tcp) => admit.run(tcp).await,
                    Err(e) => tracing::debug!(%peer, shard, error = %e, "gRPC connection lost moving to its shard"),
                }
            })),
            Err(e) => tracing::debug!(%peer, shard, error = %e, "gRPC connection lost moving to its shard"),
        }
    }
}

/// An accepted connection on its way to its server: the TLS handshake (under mutual TLS),
/// then the server's queue.
struct Admit {
    peer: std::net::SocketAddr,
    /// When the TLS handshake and the first bytes of HTTP/2 must be in.
    deadline: tokio::time::Instant,
    acceptor: Option<Acceptor>,
    queue: mpsc::Sender<GrpcConn>,
    warnings: Arc<Warnings>,
    load: Option<ShardLoad>,
    /// Its place among its address's [`MAX_OPEN_PER_PEER`], which the connection keeps.
    open_place: PeerPlace,
    /// Its place among the [`MAX_HANDSHAKING`], given up once the server has it.
    _place: OwnedSemaphorePermit,
    /// Its place among its address's [`MAX_HANDSHAKING_PER_PEER`].
    _peer_place: PeerPlace,
}

/// The places of connections not yet served.
struct Handshaking {
    all: Arc<Semaphore>,
    /// The last places of `all`, for a connection from an address holding none.
    reserve: usize,
    per_peer: Arc<PerPeer>,
    /// The places of connections per address, served or not.
    open_per_peer: Arc<PerPeer>,
}

/// Places per peer address.
#[derive(Debug)]
struct PerPeer {
    limit: usize,
    counts: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl PerPeer {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a connection from `ip`, unless it holds its limit already.
    fn claim(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<PeerPlace> {
        let ip = peer_host(ip);
        let mut counts = self.lock();
        let held = counts.entry(ip).or_insert(0);
        if *held >= self.limit {
            return None;
        }
        *held += 1;
        Some(PeerPlace {
            per_peer: Arc::clone(self),
            ip,
            first: *held == 1,
        })
    }
}

/// The address that stands for one peer in [`PerPeer`]: an IPv4-mapped address as its IPv4
/// address. An IPv6 address stands for itself, not its /64: a container network or a
/// Kubernetes node gives all its hosts one /64, so counting per /64 would put every LB of a
/// node under one limit.
fn peer_host(ip: std::net::IpAddr) -> std::net::IpAddr {
    ip.to_canonical()
}

/// One connection's place among its address's; given back when dropped.
#[derive(Debug)]
struct PeerPlace {
    per_peer: Arc<PerPeer>,
    ip: std::net::IpAddr,
    /// Whether its address held no other place when it was claimed.
    first: bool,
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut counts = self.per_peer.lock();
        if let Some(held) = counts.get_mut(&self.ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

impl Admit {
    async fn run(self, tcp: TcpStream) {
        let Some(acceptor) = self.acceptor else {
            let conn = GrpcConn {
                io: Io::Plain(Corked::new(tcp)),
                first_read: Some(Box::pin(tokio::time::sleep_until(self.deadline))),
                _load: self.load,
                _open_place: self.open_place,
                registration: None,
            };
            let _server_gone = self.queue.send(conn).await;
            return;
        };
        let first_read = Box::pin(tokio::time::sleep_until(self.deadline));
        match tokio::time::timeout_at(self.deadline, acceptor.tls.accept(tcp)).await {
            Ok(Ok(mut tls)) => {
                hold_a_frame(tls.get_mut().1);
                let (tcp, session) = tls.get_ref();
                let open = acceptor
                    .open
                    .register(tcp, Peer::Client, session.peer_certificates());
                let conn = GrpcConn {
                    io: Io::Tls(Box::new(Corked::new(tls))),
                    first_read: Some(first_read),
                    _load: self.load,
                    _open_place: self.open_place,
                    registration: open,
                };
                let _server_gone = self.queue.send(conn).await;
            }
            Ok(Err(e)) => self.warnings.refused(self.peer, &e.to_string()),
            Err(_) => self.warnings.refused(
                self.peer,
                &format!("not finished within {HANDSHAKE_TIMEOUT:?}"),
            ),
        }
    }
}

/// The accept loop's warnings, each let through at most once a second and the rest logged
/// at DEBUG, so that a peer retrying in a loop, a port scanner or a persistent `EMFILE`
/// cannot flood the log. A refused handshake is still worth seeing at WARN: a peer with the
/// wrong CA after a botched rotation, say.
#[derive(Debug)]
struct Warnings {
    refused: Throttle,
    accept_failed: Throttle,
    crowded: Throttle,
    open_too_many: Throttle,
}

impl Default for Warnings {
    fn default() -> Self {
        let second = Duration::from_secs(1);
        Self {
            refused: Throttle::new(second),
            accept_failed: Throttle::new(second),
            crowded: Throttle::new(second),
            open_too_many: Throttle::new(second),
        }
    }
}

impl Warnings {
    fn refused(&self, peer: std::net::SocketAddr, reason: &str) {
        let message = "gRPC connection refused: TLS handshake failed";
        fn_lifecycle::warn_throttled!(self.refused, %peer, error = %reason, "{message}");
    }

    fn accept_failed(&self, error: &std::io::Error) {
        let message = "gRPC listener: accepting a connection failed";
        fn_lifecycle::warn_throttled!(self.accept_failed, %error, "{message}");
    }

    fn crowded_by(&self, peer: std::net::SocketAddr) {
        let message = "gRPC connection refused: this address has too many connections still in \
                       their TLS handshake (a peer opening connections and sending nothing?)";
        fn_lifecycle::warn_throttled!(self.crowded, %peer, limit = MAX_HANDSHAKING_PER_PEER, "{message}");
    }

    fn open_too_many(&self, peer: std::net::SocketAddr, limit: usize) {
        let message = "gRPC connection refused: this address holds too many connections \
                       already (a peer opening connections and never closing them?)";
        fn_lifecycle::warn_throttled!(self.open_too_many, %peer, limit, "{message}");
    }

    fn crowded(&self, peer: std::net::SocketAddr) {
        let message = "gRPC connection refused: too many connections are still in their TLS \
                       handshake (a peer opening connections and sending nothing?)";
        fn_lifecycle::warn_throttled!(self.crowded, %peer, limit = MAX_HANDSHAKING, "{message}");
    }
}

/// The stream of [`grpc_incoming`]. Dropping it stops accepting.
#[derive(Debug)]
pub struct GrpcIncoming {
    accepted: mpsc::Receiver<GrpcConn>,
}

impl tokio_stream::Stream for GrpcIncoming {
    type Item = Result<GrpcConn, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.accepted.poll_recv(cx).map(|conn| conn.map(Ok))
    }
}

/// One accepted gRPC connection. Its writes are [`Corked`]: what the server's tasks have
/// ready at one moment leaves in one write.
#[derive(Debug)]
pub struct GrpcConn {
    io: Io,
    /// Armed until the first bytes arrive: the rest of [`HANDSHAKE_TIMEOUT`].
    first_read: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Under `FN_SHARDS`: counts the connection on its shard while it is open.
    _load: Option<ShardLoad>,
    /// Its place among its address's [`MAX_OPEN_PER_PEER`] while it is open.
    _open_place: PeerPlace,
    /// Under mutual TLS: its place among the connections checked again when trust changes.
    registration: Option<Registration>,
}

#[derive(Debug)]
enum Io {
    /// Plaintext (`FN_INSECURE`).
    Plain(Corked<TcpStream>),
    /// After a successful mutual TLS handshake.
    Tls(Box<Corked<tokio_rustls::server::TlsStream<TcpStream>>>),
}

impl GrpcConn {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match &self.io {
            Io::Plain(tcp) => tcp.get_ref(),
            Io::Tls(tls) => tls.get_ref().get_ref().0,
        }
    }
}

/// What a server knows of the connection a call came on, in the call's request extensions
/// (in place of tonic's [`TcpConnectInfo`], so tonic's `Request::remote_addr` gives `None`:
/// read [`GrpcConnectInfo::tcp`]).
#[derive(Debug, Clone)]
pub struct GrpcConnectInfo {
    tcp: TcpConnectInfo,
    /// Under mutual TLS: set once the client's certificate no longer verifies.
    retirement: Option<Arc<crate::open::Entry>>,
}

impl GrpcConnectInfo {
    /// The connection's addresses.
    pub fn tcp(&self) -> &TcpConnectInfo {
        &self.tcp
    }

    /// Whether the connection has been retired: its client is no longer trusted, and it
    /// takes no new calls ([`crate::refuse`]).
    pub fn is_retired(&self) -> bool {
        self.retirement.as_ref().is_some_and(|r| r.is_retired())
    }
}

impl Connected for GrpcConn {
    type ConnectInfo = GrpcConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        GrpcConnectInfo {
            tcp: self.tcp().connect_info(),
            retirement: self.registration.as_ref().map(Registration::entry),
        }
    }
}

impl AsyncRead for GrpcConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match &mut this.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        };
        let Some(first_read) = this.first_read.as_mut() else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.first_read = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending if first_read.as_mut().poll(cx).is_ready() => {
                this.first_read = None;
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no HTTP/2 preface within {HANDSHAKE_TIMEOUT:?} of connecting"),
                )))
            }
            other => other,
        }
    }
}

impl AsyncWrite for GrpcConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(tcp) => tcp.is_write_vectored(),
            Io::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A gRPC client endpoint: tonic's [`Endpoint`] and, under mutual TLS, the node material
/// that dials it. Configure the endpoint with [`GrpcEndpoint::with`], then connect.
#[derive(Debug, Clone)]
pub struct GrpcEndpoint {
    endpoint: Endpoint,
    tls: Option<NodeTls>,
}

/// A client endpoint for `address` (`host:port`) under `mode`, with the dataplane's HTTP/2
/// windows and keepalive.
///
/// The keepalive pings run while the connection is idle too: a unary call's timeout is far
/// shorter than the interval, so pings for calls in flight alone never fire, and a
/// connection whose peer went silent (its host gone, a partition: no FIN, no RST) lasted
/// until TCP gave up retransmitting, about 15 minutes, every call on it timing out.
///
/// # Errors
/// When the address is not a valid URI authority.
pub fn grpc_endpoint(
    mode: &TlsMode,
    address: &str,
) -> Result<GrpcEndpoint, tonic::transport::Error> {
    // Always http: under TLS the connector below does the handshake, and tonic must not.
    let endpoint = Endpoint::from_shared(format!("http://{address}"))?
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_max_concurrent_reset_streams(RESET_STREAMS_REMEMBERED)
        .http2_max_local_error_reset_streams(LOCAL_ERROR_RESETS)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(GrpcEndpoint {
        endpoint,
        tls: mode.node().cloned(),
    })
}

impl GrpcEndpoint {
    /// Applies tonic endpoint settings (timeouts, keepalive).
    #[must_use]
    pub fn with(mut self, configure: impl FnOnce(Endpoint) -> Endpoint) -> Self {
        self.endpoint = configure(self.endpoint);
        self
    }

    /// A channel that connects on first use and reconnects when the connection drops.
    pub fn connect_lazy(&self) -> Channel {
        match &self.tls {
            Some(tls) => self.endpoint.connect_with_connector_lazy(Dialer::new(tls)),
            None => self.endpoint.connect_with_connector_lazy(PlainDialer),
        }
    }

    /// A channel connected now.
    ///
    /// # Errors
    /// When the connection or the TLS handshake fails.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        match &self.tls {
            Some(tls) => self.endpoint.connect_with_connector(Dialer::new(tls)).await,
            None => self.endpoint.connect_with_connector(PlainDialer).await,
        }
    }
}

/// Dials a server over plaintext TCP (`FN_INSECURE`), with the writes [`Corked`] as under
/// TLS.
#[derive(Clone, Copy)]
pub(crate) struct PlainDialer;

impl Service<Uri> for PlainDialer {
    type Response = TokioIo<Corked<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(async move {
            let (host, port) = host_port(&uri)?;
            Ok(TokioIo::new(Corked::new(connect_tcp(host, port).await?)))
        })
    }
}

/// The host (without IPv6 brackets) and port a gRPC URI dials.
fn host_port(uri: &Uri) -> std::io::Result<(&str, u16)> {
    let invalid = |what: &str| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}: {what}"))
    };
    let host = uri
        .host()
        .ok_or_else(|| invalid("no host"))?
        .trim_matches(['[', ']']);
    let port = uri.port_u16().ok_or_else(|| invalid("no port"))?;
    Ok((host, port))
}

/// A TCP connection to `host:port` with `TCP_NODELAY` set (small frames must not wait for
/// the peer's delayed ACK).
async fn connect_tcp(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let addresses = resolve(host, port).await?;
    let tcp = TcpStream::connect(addresses.as_slice()).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// `host:port`'s addresses (an address's own at once). tokio resolves a name on its
/// blocking pool, and panics (`OS can't spawn worker thread`) when that pool has no thread
/// and cannot start one: here that is an error, so that a dial under thread exhaustion fails
/// as any other dial does, where the panic ended the task dialling (a runner's probe).
async fn resolve(host: &str, port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
    let addresses = caught(tokio::net::lookup_host((host, port)))
        .await
        .map_err(|panic| std::io::Error::other(format!("resolving {host}: {panic}")))??;
    Ok(addresses.collect())
}

/// `fut`'s output, or what it panicked with.
async fn caught<T>(fut: impl Future<Output = T>) -> Result<T, String> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned())
        })
}

/// Dials a server over TCP and does the TLS handshake with the current material. The
/// connection's writes are [`Corked`].
#[derive(Clone)]
pub(crate) struct Dialer {
    pub(crate) tls: NodeTls,
    /// The channel moves its new calls off a retired connection (see
    /// [`crate::open::Peer::Server`]).
    pub(crate) follows: bool,
}

impl Dialer {
    /// For a channel that does not move off a retired connection (tonic's).
    pub(crate) fn new(tls: &NodeTls) -> Self {
        Dialer {
            tls: tls.clone(),
            follows: false,
        }
    }
}

impl Service<Uri> for Dialer {
    type Response = TokioIo<Dialled<Corked<tokio_rustls::client::TlsStream<TcpStream>>>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let follows = self.follows;
        Box::pin(async move {
            let (host, port) = host_port(&uri)?;
            let name =
                rustls::pki_types::ServerName::try_from(tls.server_name_for(host).to_owned())
                    .map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!("{uri}: not a valid TLS server name: {e}"),
                        )
                    })?;
            let presented = Arc::new(std::sync::OnceLock::new());
            let config = tls
                .client_config_recording(Some(Arc::clone(&presented)))
                .map_err(std::io::Error::other)?;
            let tcp = connect_tcp(host, port).await?;
            let mut stream = TlsConnector::from(config)
                .connect(name.clone(), tcp)
                .await?;
            hold_a_frame(stream.get_mut().1);
            let (tcp, session) = stream.get_ref();
            let open = tls.open_connections().register(
                tcp,
                Peer::Server {
                    name,
                    presented: presented
                        .get()
                        .cloned()
                        .unwrap_or_else(|| Arc::clone(&tls.current().certified)),
                    follows,
                },
                session.peer_certificates(),
            );
            Ok(TokioIo::new(Dialled {
                io: Corked::new(stream),
                open,
                early: Vec::new(),
            }))
        })
    }
}

/// A dialled connection's I/O, holding its place among the connections checked again when
/// trust changes ([`NodeTls::recheck_connections`]) for as long as the connection lives.
#[derive(Debug)]
pub(crate) struct Dialled<T> {
    io: T,
    open: Option<Registration>,
    /// Bytes [`Dialled::server_speaks`] read, given to the first reads.
    early: Vec<u8>,
}

impl<T: AsyncRead + Unpin> Dialled<T> {
    /// Waits for the server's first bytes (HTTP/2's SETTINGS, which a server sends at once),
    /// kept for the first reads. Under TLS 1.3 the client's handshake ends before the server
    /// has verified the client's certificate: a server that refuses it says so only now,
    /// and without this wait the dial would look good and its first call fail.
    ///
    /// # Errors
    /// The server's refusal (`received fatal alert: UnknownCA`, say), or the connection
    /// closed before it said anything.
    pub(crate) async fn server_speaks(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncReadExt as _;
        let mut first = [0u8; 512];
        let read = self.io.read(&mut first).await?;
        if read == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection before it sent anything (does it trust this \
                 node's certificate?)",
            ));
        }
        self.early.extend_from_slice(&first[..read]);
        Ok(())
    }
}

impl<T> Dialled<T> {
    /// What tells whether the connection has been retired (its peer no longer verifies).
    pub(crate) fn retirement(&self) -> Option<Arc<crate::open::Entry>> {
        self.open.as_ref().map(Registration::entry)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Dialled<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let given = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early[..given]);
            this.early.drain(..given);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Dialled<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The certificate (DER) the server at `address` (`host:port`) presents in a new handshake
/// with `tls`: what a peer connecting now would see, e.g. to check that a rotation took.
///
/// # Errors
/// When the connection or the handshake fails (the server is not trusted, or refuses us),
/// or is not done within [`HANDSHAKE_TIMEOUT`].
pub async fn peer_certificate(tls: &NodeTls, address: &str) -> std::io::Result<Vec<u8>> {
    let uri: Uri = format!("http://{address}").parse().map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{address}: {e}"))
    })?;
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, Dialer::new(tls).call(uri))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{address}: no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
            )
        })??;
    let (_, session) = stream.inner().io.get_ref().get_ref();
    session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.to_vec())
        .ok_or_else(|| std::io::Error::other(format!("{address} presented no certificate")))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::dev::DevCa;

    /// A dial whose resolution panics (tokio's, with no blocking thread and none to be had)
    /// gets an error naming the cause, where the panic ended the task dialling. tokio's
    /// blocking pool cannot be made to fail here, so a future that panics stands for it.
    #[tokio::test]
    async fn a_panic_while_resolving_is_an_error_that_names_it() {
        let message = "OS can't spawn worker thread: Resource temporarily unavailable";
        let got = caught::<u8>(async {
            panic!("OS can't spawn worker thread: Resource temporarily unavailable")
        })
        .await;
        assert_eq!(got, Err(message.to_owned()));
        let errno = 11;
        let got = caught::<u8>(async move { panic!("os error {errno}") }).await;
        assert_eq!(got, Err("os error 11".to_owned()));
        assert_eq!(caught(async { 7 }).await, Ok(7));
        // An address needs no resolver.
        let addresses = resolve("127.0.0.1", 9).await.expect("an address");
        assert_eq!(addresses, ["127.0.0.1:9".parse().expect("an address")]);
    }

    /// An address's places are its own, an IPv4-mapped address's those of its IPv4 address.
    #[test]
    fn an_addresss_handshake_places_are_its_own_and_mapped_is_ipv4() {
        let per_peer = Arc::new(PerPeer {
            limit: 2,
            counts: std::sync::Mutex::default(),
        });
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("an address");
        let v4 = per_peer.claim(ip("10.0.0.7")).expect("a place");
        let mapped = per_peer.claim(ip("::ffff:10.0.0.7")).expect("a place");
        assert!(
            per_peer.claim(ip("10.0.0.7")).is_none(),
            "mapped is the same peer"
        );
        assert!(per_peer.claim(ip("10.0.0.8")).is_some(), "another peer");
        assert!(per_peer.claim(ip("2001:db8::1")).is_some(), "an IPv6 peer");
        drop(v4);
        assert!(
            per_peer.claim(ip("10.0.0.7")).is_some(),
            "a place given back"
        );
        drop(mapped);
    }

    /// One end of an in-memory pipe that counts the writes that reached it, each vectored
    /// write as one (as `writev` is one syscall).
    struct Counted {
        pipe: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.pipe).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let written = Pin::new(&mut self.pipe).poll_write(cx, buf);
            if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            written
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            // The pipe is larger than anything the test sends, so it takes all of it.
            let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.poll_write(cx, &joined)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.pipe).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.pipe).poll_shutdown(cx)
        }
    }

    /// Sends one DATA frame's worth of bytes from a dialled node to an accepting one, over
    /// TLS; answers how many writes it took, and checks the bytes arrived intact.
    async fn writes_for_one_frame(hold: bool) -> usize {
        let ca = DevCa::new("ca").expect("ca");
        let client = ca.node_tls(&[]).expect("client node");
        let server = ca.node_tls(&[]).expect("server node");
        let (near, far) = tokio::io::duplex(8 * MAX_FRAME_SIZE as usize);
        let writes = Arc::new(AtomicUsize::new(0));
        let near = Counted {
            pipe: near,
            writes: Arc::clone(&writes),
        };
        let name = ServerName::try_from("localhost").expect("server name");
        let connector = TlsConnector::from(client.client_config().expect("client config"));
        let acceptor = TlsAcceptor::from(server.server_config().expect("server config"));
        let (dialled, accepted) = tokio::join!(connector.connect(name, near), acceptor.accept(far));
        let mut dialled = dialled.expect("client handshake");
        let mut accepted = accepted.expect("server handshake");
        if hold {
            hold_a_frame(dialled.get_mut().1);
        }

        let frame: Vec<u8> = (0..MAX_FRAME_SIZE).map(|i| (i % 251) as u8).collect();
        writes.store(0, Ordering::Relaxed);
        dialled.write_all(&frame).await.expect("write a frame");
        dialled.flush().await.expect("flush");
        let sent = writes.load(Ordering::Relaxed);

        let mut received = vec![0; frame.len()];
        accepted
            .read_exact(&mut received)
            .await
            .expect("read the frame");
        assert!(received == frame, "the frame arrives byte for byte");
        sent
    }

    /// The first accepted connection of a plaintext [`grpc_incoming`], and the peer's end.
    async fn accepted_plain() -> (GrpcConn, TcpStream) {
        use tokio_stream::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let mut incoming = grpc_incoming(&TlsMode::Insecure, listener).expect("incoming");
        let peer = TcpStream::connect(address).await.expect("connect");
        let conn = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        (conn, peer)
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_sends_its_preface_is_closed_at_the_handshake_limit() {
        let (mut conn, _peer) = accepted_plain().await;
        let started = tokio::time::Instant::now();
        let err = tokio::time::timeout(2 * HANDSHAKE_TIMEOUT, conn.read(&mut [0u8; 24]))
            .await
            .expect("the connection is given up on, not left waiting")
            .expect_err("times out");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("preface"), "{err}");
        assert!(
            started.elapsed() <= HANDSHAKE_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        assert!(started.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_secs(1));
    }

    #[tokio::test]
    async fn connections_beyond_the_handshake_limit_are_closed_at_once() {
        let tls = DevCa::new("test").expect("ca").node_tls(&[]).expect("node");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let mode = TlsMode::Mutual(tls.clone());
        let _incoming =
            incoming_limited(&mode, listener, None, handshakes(2, 2)).expect("incoming");
        // Two peers that connect and say nothing take both places, for up to
        // HANDSHAKE_TIMEOUT (10 s).
        let silent = TcpStream::connect(address).await.expect("connect");
        let _second = TcpStream::connect(address).await.expect("connect");
        let mut third = TcpStream::connect(address).await.expect("connect");
        let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut [0u8; 1]))
            .await
            .expect("the third is closed at once, not after the handshake limit");
        assert!(
            matches!(&read, Ok(0)) || read.is_err(),
            "closed, not answered: {read:?}"
        );
        // A place given up (the peer left) is a place for the next.
        drop(silent);
        let mut handshakes = 0;
        let cert = loop {
            handshakes += 1;
            match peer_certificate(&tls, &address.to_string()).await {
                Ok(cert) => break cert,
                Err(e) if handshakes < 50 => {
                    tracing::debug!(error = %e, "not yet");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("no handshake after a place was given up: {e}"),
            }
        };
        assert!(!cert.is_empty());
    }

    /// Limits of `handshaking` connections, `per_peer` from one address, and no lower limit
    /// on open ones.
    fn handshakes(handshaking: usize, per_peer: usize) -> Limits {
        Limits {
            handshaking,
            handshaking_per_peer: per_peer,
            open_per_peer: MAX_OPEN_PER_PEER,
        }
    }

    /// An address holding its limit of open connections, served ones, gets no more until
    /// one closes; another address still does.
    #[tokio::test]
    async fn one_address_cannot_hold_more_than_its_open_connections() {
        use tokio_stream::StreamExt;
        const BOUND: Duration = Duration::from_secs(5);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let limits = Limits {
            open_per_peer: 2,
            ..handshakes(8, 8)
        };
        let mut incoming = incoming_limited(&TlsMode::Insecure, listener, None, limits)
            .expect("incoming")
            .remove(0);
        let from = |ip: [u8; 4]| connect_from(ip, address);
        let mut served = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..2 {
            peers.push(from([127, 0, 0, 1]).await);
            let conn = tokio::time::timeout(BOUND, incoming.next())
                .await
                .expect("served in time")
                .expect("a connection")
                .expect("accepted");
            served.push(conn);
        }
        assert!(
            closed_within(from([127, 0, 0, 1]).await, BOUND).await,
            "a third from the same address is refused"
        );
        assert!(
            !closed_within(from([127, 0, 0, 2]).await, Duration::from_millis(500)).await,
            "another address still gets a place"
        );
        // One closes: the address has a place again.
        drop(served.pop());
        let mut placed = false;
        for _ in 0..20 {
            if !closed_within(from([127, 0, 0, 1]).await, Duration::from_millis(300)).await {
                placed = true;
                break;
            }
        }
        assert!(placed, "no place given back when a connection closed");
    }

    /// A connection to `address` from the loopback address `ip`.
    async fn connect_from(ip: [u8; 4], address: std::net::SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::from((ip, 0)))
            .expect("bind a loopback address");
        socket.connect(address).await.expect("connect")
    }

    /// Whether the server closes `conn` within `within`, rather than holding it (waiting
    /// for its handshake) that long.
    async fn closed_within(mut conn: TcpStream, within: Duration) -> bool {
        match tokio::time::timeout(within, conn.read(&mut [0u8; 1])).await {
            Ok(read) => matches!(read, Ok(0) | Err(_)),
            Err(_) => false,
        }
    }

    /// One address that holds its share of the places with silent connections leaves the
    /// others theirs.
    #[tokio::test]
    async fn one_address_cannot_take_every_handshake_place() {
        let tls = DevCa::new("test").expect("ca").node_tls(&[]).expect("node");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let mode = TlsMode::Mutual(tls);
        let _incoming =
            incoming_limited(&mode, listener, None, handshakes(8, 2)).expect("incoming");
        let from = |ip: [u8; 4]| connect_from(ip, address);
        let _first = from([127, 0, 0, 1]).await;
        let _second = from([127, 0, 0, 1]).await;
        assert!(
            closed_within(from([127, 0, 0, 1]).await, Duration::from_secs(5)).await,
            "a third from the same address is refused"
        );
        assert!(
            !closed_within(from([127, 0, 0, 2]).await, Duration::from_millis(500)).await,
            "another address still gets a place"
        );
    }

    /// Addresses that share out every place but the reserve leave it to an address holding
    /// none: two holding four each of eight places cannot lock a third out.
    #[tokio::test]
    async fn the_last_handshake_places_are_for_addresses_holding_none() {
        let tls = DevCa::new("test").expect("ca").node_tls(&[]).expect("node");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let mode = TlsMode::Mutual(tls);
        // Eight places, four per address, one (8 / 8) in reserve.
        let _incoming =
            incoming_limited(&mode, listener, None, handshakes(8, 4)).expect("incoming");
        let from = |ip: [u8; 4]| connect_from(ip, address);
        // Accepted in the order they connect: seven places taken, the reserve left.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(from([127, 0, 0, 1]).await);
        }
        for _ in 0..3 {
            held.push(from([127, 0, 0, 2]).await);
        }
        assert!(
            closed_within(from([127, 0, 0, 2]).await, Duration::from_secs(5)).await,
            "an address holding places is refused the reserve"
        );
        assert!(
            !closed_within(from([127, 0, 0, 3]).await, Duration::from_millis(500)).await,
            "an address holding none gets the last place"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_its_first_bytes_a_connection_waits_as_long_as_it_needs() {
        let (mut conn, mut peer) = accepted_plain().await;
        peer.write_all(b"PRI").await.expect("write");
        let mut got = [0u8; 3];
        conn.read_exact(&mut got).await.expect("the first bytes");
        assert_eq!(&got, b"PRI");
        let late = tokio::spawn(async move {
            tokio::time::sleep(10 * HANDSHAKE_TIMEOUT).await;
            peer.write_all(b" * HTTP").await.expect("write");
            peer
        });
        let mut more = [0u8; 7];
        conn.read_exact(&mut more)
            .await
            .expect("no limit after the preface");
        assert_eq!(&more, b" * HTTP");
        drop(late.await);
    }

    #[tokio::test]
    async fn a_whole_frame_leaves_in_one_write() {
        assert_eq!(writes_for_one_frame(true).await, 1);
    }

    #[tokio::test]
    async fn rustls_alone_splits_a_frame_into_several_writes() {
        // What hold_a_frame changes: rustls's own 64 KiB limit writes a frame in parts.
        let writes = writes_for_one_frame(false).await;
        assert!(writes >= 4, "{writes} writes for a 256 KiB frame");
    }
}
