//! The mutually authenticated connections open under one [`NodeTls`], so that they can be
//! checked again after the handshake that let them in.
//!
//! A handshake verifies the peer's certificate once. Without a second look, a connection
//! opened before the CA bundle dropped its peer's issuer (the last step of a CA rollover, or
//! a CA withdrawn after a compromise), or before its peer's certificate expired, would keep
//! carrying calls for as long as it stays open, which on the dataplane's long-lived gRPC
//! connections is until a restart. [`NodeTls::recheck_connections`] verifies each open
//! connection's peer chain again, as its handshake did, against the bundle in use now (at
//! now, or at its handshake when the clock has been stepped back since); one
//! that fails is retired: a [`crate::DirectChannel`] stops giving it new calls at once and
//! dials a new connection, a server refuses new calls on one it accepted
//! ([`crate::refuse`]), and after a grace (for the calls on it to finish) its socket is
//! shut down, which ends it at both ends whatever its peer does. A connection whose peer
//! verifies again before then (the old bundle put back) is kept. A connection this node
//! dialled for a channel that does not move its calls off (tonic's: the control plane's
//! calls and watches, which dial again) gets [`CONTROL_GRACE`], not the grace.
//!
//! A connection this node dialled is also moved off, without being closed, while its peer
//! is still trusted: when the certificate it presented has been replaced, and when the
//! peer's expires within [`RENEW_AHEAD`] (or a third of its lifetime, when shorter). It
//! drains and closes once idle (unless a new connection cannot be had: a
//! [`crate::DirectChannel`] then keeps calling on it, as it still works), so that in a
//! rotation done in its steps (renewals ahead of expiry; a CA rollover's switch before its
//! finish) the connections the grace would cut are already gone.
//!
//! [`crate::watch::CertWatch`] runs the check after each new set is put in use, every minute
//! (certificates expire), and when a grace ends.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::material::Material;

/// How long a retired connection stays open for the calls already on it, unless
/// `FN_TLS_RETIRE_GRACE` says otherwise.
pub const RETIRE_GRACE: Duration = Duration::from_secs(600);

/// The grace of a retired connection this node dialled for a channel that does not move its
/// calls off (tonic's): the bound of a control-plane call (2 s), and time for its peer's
/// own check to see it.
pub const CONTROL_GRACE: Duration = Duration::from_secs(2);

/// A connection this node dialled takes no new calls once its peer's certificate expires
/// within this (the longest call, an hour, and as much again): a new connection finds the
/// peer's renewed certificate, and the old one drains before the old certificate ends.
pub const RENEW_AHEAD: Duration = Duration::from_secs(2 * 3600);

/// The open connections of one [`NodeTls`](crate::NodeTls) (shared by its clones).
#[derive(Debug, Default)]
pub(crate) struct OpenConnections {
    entries: Mutex<HashMap<u64, Arc<Entry>>>,
    next_id: AtomicU64,
}

/// Which end of the connection this node is, so which check its peer's chain passed.
#[derive(Debug)]
pub(crate) enum Peer {
    /// This node accepted it: the peer is a client.
    Client,
    /// This node dialled it: the peer is a server, verified for this name; this node
    /// presented `presented`.
    Server {
        name: ServerName<'static>,
        presented: Arc<CertifiedKey>,
        /// The channel on it moves its new calls off it when it is retired (a
        /// [`crate::DirectChannel`] does), so the calls on it keep the grace. One whose
        /// channel does not (tonic's, for the control plane's short calls and watches,
        /// which dial again) is shut down [`CONTROL_GRACE`] after it is retired: it would
        /// otherwise carry new calls to a peer no longer trusted until the grace ends.
        follows: bool,
    },
}

/// One open connection.
#[derive(Debug)]
pub(crate) struct Entry {
    address: SocketAddr,
    peer: Peer,
    /// The chain the peer presented, end entity first.
    chain: Vec<CertificateDer<'static>>,
    /// When the connection was registered, by the wall clock: its peer verified then, so a
    /// later check verifies at no earlier time ([`OpenConnections::recheck`]).
    opened: UnixTime,
    /// When the peer's certificate ends, when it could be read.
    /// When the peer's certificate ends, and how long before that a dialled connection to
    /// it takes no new calls: [`RENEW_AHEAD`], or a third of the certificate's lifetime when
    /// that is shorter (certificates living an hour, renewed at half their life, would
    /// otherwise send every connection to a new one at each check, a minute apart).
    peer_end: Option<(SystemTime, Duration)>,
    /// A second descriptor of the connection's socket, to shut it down from outside the
    /// task that drives it. Closed when the connection ends (its [`Registration`] drops),
    /// not with the entry, which a channel may hold longer: the socket would stay open
    /// (in CLOSE_WAIT, its FIN never sent) for as long.
    socket: Mutex<Option<std::net::TcpStream>>,
    /// Set while the peer no longer verifies: the connection takes no new calls, and closes
    /// when `close_at` comes.
    retired: AtomicBool,
    /// A dialled connection moved off though its peer is still trusted: why, as a
    /// [`Moved`] (0 while it is not), so that a channel that cannot dial a new connection
    /// can go on with this one, and say why it tried.
    moved: AtomicU8,
    /// Set once the socket has been shut down.
    shut: AtomicBool,
    /// When a retired connection is shut down.
    close_at: Mutex<Option<Instant>>,
}

/// Why a dialled connection whose peer is still trusted takes no new calls ([`Entry::stale`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Moved {
    /// The certificate this node presented on it has been replaced.
    OwnReplaced = 1,
    /// The peer's certificate expires within [`RENEW_AHEAD`] (or its last third of life).
    PeerEndsSoon = 2,
}

impl Moved {
    fn from_u8(code: u8) -> Option<Self> {
        match code {
            1 => Some(Moved::OwnReplaced),
            2 => Some(Moved::PeerEndsSoon),
            _ => None,
        }
    }

    /// The reason, for the log.
    pub(crate) fn why(self) -> &'static str {
        match self {
            Moved::OwnReplaced => "the certificate this node presented on it has been replaced",
            Moved::PeerEndsSoon => "the peer's certificate expires soon",
        }
    }
}

impl Entry {
    /// Whether the peer no longer verifies: the connection should take no new calls, and
    /// will be closed.
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Why a connection whose peer is still trusted should take no new calls, when it
    /// should not: it still works, and may carry them when no new connection can be had.
    pub(crate) fn moved(&self) -> Option<Moved> {
        Moved::from_u8(self.moved.load(Ordering::Acquire))
    }

    /// Shut down [`CONTROL_GRACE`] after it is retired rather than after the grace: a
    /// dialled connection whose channel does not move its calls off.
    fn closes_soon_when_retired(&self) -> bool {
        matches!(self.peer, Peer::Server { follows: false, .. })
    }

    /// Shuts the socket down, ending the connection at both ends; false when it was already.
    fn shut_down(&self) -> bool {
        if self.shut.swap(true, Ordering::AcqRel) {
            return false;
        }
        let socket = self.socket.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(Err(e)) = socket.as_ref().map(|s| s.shutdown(Shutdown::Both)) {
            tracing::debug!(peer = %self.address, error = %e, "retired gRPC connection: shutdown failed (it has closed)");
        }
        true
    }

    /// Why the connection should take no more calls under `material` at `now`, if so: its
    /// peer's chain does not verify. On a connection this node dialled, also when the
    /// certificate it presented does not verify under the bundle while the one in use now
    /// does: the peer, which trusts the same bundle, is about to retire the connection (or
    /// did), and a new one would present the certificate it trusts.
    fn fails(&self, material: &Material, now: UnixTime) -> Option<rustls::Error> {
        let (end_entity, intermediates) = self.chain.split_first()?;
        match &self.peer {
            Peer::Client => material
                .client_verifier
                .verify_client_cert(end_entity, intermediates, now)
                .err(),
            Peer::Server {
                name, presented, ..
            } => {
                if let Err(e) = material.server_verifier.verify_server_cert(
                    end_entity,
                    intermediates,
                    name,
                    &[],
                    now,
                ) {
                    return Some(e);
                }
                if Arc::ptr_eq(presented, &material.certified) {
                    return None;
                }
                let refusal = |key: &CertifiedKey| {
                    key.cert.split_first().and_then(|(cert, intermediates)| {
                        material
                            .client_verifier
                            .verify_client_cert(cert, intermediates, now)
                            .err()
                    })
                };
                if refusal(&material.certified).is_some() {
                    return None; // a new connection would fare no better
                }
                refusal(presented).map(|e| {
                    rustls::Error::General(format!(
                        "the certificate this node presented on it is no longer trusted \
                             ({e}); the one in use now is"
                    ))
                })
            }
        }
    }

    /// Why a connection this node dialled, though still trusted, should take no new calls:
    /// the certificate it presented has been replaced (a new connection presents the new
    /// one, which the peer will still trust when the old one's CA has left the bundle), or
    /// the peer's expires within [`RENEW_AHEAD`]. The connection then drains and closes
    /// once idle, before anything would close it with calls on it.
    fn stale(&self, material: &Material, now: SystemTime) -> Option<Moved> {
        let Peer::Server { presented, .. } = &self.peer else {
            return None;
        };
        if presented.cert.first() != material.certified.cert.first() {
            return Some(Moved::OwnReplaced);
        }
        let ends_soon = self
            .peer_end
            .is_some_and(|(end, ahead)| end.duration_since(now).map_or(true, |left| left < ahead));
        ends_soon.then_some(Moved::PeerEndsSoon)
    }

    fn close_at(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.close_at.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's place in its [`OpenConnections`]; the connection's I/O holds it, so it
/// leaves when the connection ends.
#[derive(Debug)]
pub(crate) struct Registration {
    open: Arc<OpenConnections>,
    id: u64,
    entry: Arc<Entry>,
}

impl Registration {
    /// The entry, for a channel to see when its connection is retired.
    pub(crate) fn entry(&self) -> Arc<Entry> {
        Arc::clone(&self.entry)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.open.lock().remove(&self.id);
        drop(
            self.entry
                .socket
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

/// What one [`NodeTls::recheck_connections`](crate::NodeTls::recheck_connections) found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recheck {
    /// Connections open.
    pub open: usize,
    /// Connections retired by this check.
    pub retired: usize,
    /// Retired connections shut down by this check, their grace over.
    pub closed: usize,
    /// Retired connections kept because their peer verifies again.
    pub restored: usize,
    /// Connections this node dialled that take no new calls though their peer is still
    /// trusted (see `RENEW_AHEAD`): they drain, and close once idle.
    pub moved: usize,
    /// When the next retired connection's grace ends.
    pub next_close: Option<Instant>,
}

impl OpenConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the connection on `tcp`, whose peer at `address` presented `chain`. `None`
    /// (with a debug line) when the socket cannot be duplicated or the peer presented
    /// nothing, neither of which happens after a successful mutual handshake: such a
    /// connection is served, and not checked again.
    pub(crate) fn register(
        self: &Arc<Self>,
        tcp: &TcpStream,
        peer: Peer,
        chain: Option<&[CertificateDer<'static>]>,
    ) -> Option<Registration> {
        let address = tcp.peer_addr().ok()?;
        let chain = chain.filter(|c| !c.is_empty())?.to_vec();
        let peer_end = chain
            .first()
            .and_then(|end_entity| crate::expiry::Validity::of(end_entity).ok())
            .map(|validity| {
                let lifetime = validity
                    .not_after
                    .duration_since(validity.not_before)
                    .unwrap_or_default();
                (validity.not_after, RENEW_AHEAD.min(lifetime / 3))
            });
        let socket = match tcp.as_fd().try_clone_to_owned() {
            Ok(fd) => std::net::TcpStream::from(fd),
            Err(e) => {
                tracing::debug!(peer = %address, error = %e, "gRPC connection: not checked again later (its socket cannot be duplicated)");
                return None;
            }
        };
        let entry = Arc::new(Entry {
            address,
            peer,
            chain,
            opened: UnixTime::now(),
            peer_end,
            socket: Mutex::new(Some(socket)),
            retired: AtomicBool::new(false),
            moved: AtomicU8::new(0),
            shut: AtomicBool::new(false),
            close_at: Mutex::new(None),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, Arc::clone(&entry));
        Some(Registration {
            open: Arc::clone(self),
            id,
            entry,
        })
    }

    /// Checks every open connection's peer under `material` at `now`; see the module docs.
    pub(crate) fn recheck(&self, material: &Material, now: SystemTime, grace: Duration) -> Recheck {
        let entries: Vec<Arc<Entry>> = self.lock().values().cloned().collect();
        let wall = now;
        let now = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let instant = Instant::now();
        let mut outcome = Recheck {
            open: entries.len(),
            ..Recheck::default()
        };
        // The first of each kind, for the summary: a rollover retires every connection of
        // a daemon at once, and one line says it.
        let mut first_retired: Option<(SocketAddr, rustls::Error)> = None;
        let mut first_closed: Option<SocketAddr> = None;
        for entry in entries {
            if entry.shut.load(Ordering::Acquire) {
                continue; // closed, on its way out of the registry
            }
            // Never before the handshake: a clock stepped back (an NTP step, a VM resumed)
            // would find a certificate issued since then not yet valid, and retire
            // connections whose peer did verify, which no new handshake can replace until
            // the clock passes the certificate's start again.
            let failure = entry.fails(material, now.max(entry.opened));
            let mut close_at = entry.close_at();
            let mut shut = false;
            match (failure, *close_at) {
                (None, None) => {
                    if entry.moved().is_none()
                        && let Some(moved) = entry.stale(material, wall)
                    {
                        entry.moved.store(moved as u8, Ordering::Release);
                        outcome.moved += 1;
                        tracing::debug!(peer = %entry.address, why = moved.why(), "gRPC connection: new calls go on a new connection");
                    }
                }
                (None, Some(_)) => {
                    *close_at = None;
                    entry.retired.store(false, Ordering::Release);
                    outcome.restored += 1;
                    tracing::info!(peer = %entry.address, "a retired gRPC connection's peer verifies again: the connection is kept");
                }
                (Some(reason), None) => {
                    entry.retired.store(true, Ordering::Release);
                    outcome.retired += 1;
                    tracing::info!(peer = %entry.address, error = %reason, "gRPC connection retired");
                    first_retired.get_or_insert((entry.address, reason));
                    let grace = if entry.closes_soon_when_retired() {
                        grace.min(CONTROL_GRACE)
                    } else {
                        grace
                    };
                    *close_at = Some(instant + grace);
                    // No grace (FN_TLS_RETIRE_GRACE=0s): closed now, not at the next check.
                    shut = grace.is_zero();
                }
                (Some(_), Some(at)) => shut = at <= instant,
            }
            if shut && entry.shut_down() {
                outcome.closed += 1;
                tracing::info!(peer = %entry.address, "retired gRPC connection closed");
                first_closed.get_or_insert(entry.address);
            }
            if let Some(at) = *close_at
                && at > instant
            {
                outcome.next_close = Some(outcome.next_close.map_or(at, |n| n.min(at)));
            }
        }
        if let Some((peer, reason)) = first_retired {
            tracing::warn!(
                retired = outcome.retired, first = %peer, error = %reason, ?grace,
                "gRPC connections retired: their peer's certificate no longer verifies under \
                 the certificates in use (a CA removed from FN_NODE_CERT_AUTHORITY, or the \
                 peer's certificate expired); an lb-agent moves its calls to runners off them \
                 at once, a server refuses new calls on those it accepted, those dialled for \
                 control-plane calls are closed 2 s later, and the rest when the grace ends"
            );
        }
        if let Some(peer) = first_closed {
            tracing::warn!(
                closed = outcome.closed, first = %peer,
                "retired gRPC connections closed, their grace over: calls still on them fail"
            );
        }
        outcome
    }
}
