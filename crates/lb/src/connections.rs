//! The open client connections, and the cap on how many there may be (`FN_MAX_CONNECTIONS`).
//!
//! Every accepted connection is registered here, with a count of the requests it is
//! answering. At the cap, a new connection makes room by closing the oldest idle one: a
//! connection answering no request, whether a keep-alive connection between requests or a
//! socket that never sent a byte. When every open connection is busy, the new one is refused
//! instead: closing a connection in the middle of an answer would lose a call. So a flood of
//! idle sockets cannot use up the descriptors that calls need.
//!
//! A request counts until its answer has left: its [`Busy`] is released at the connection's
//! first flush after the answer's body ended ([`Registered::flushed`], called by the
//! connection's I/O), not when hyper took the body's last frame, since up to a buffer of the
//! answer can still be waiting for a slow client then.
//!
//! Closing an idle connection and starting a request on it cannot both win: the closer claims
//! the connection only while its count is 0, and a request that arrives on a claimed
//! connection is told so ([`Busy::is_closing`]) and must not start a call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Set in a connection's count once it has been claimed for closing.
const CLOSING: usize = 1 << (usize::BITS - 1);

/// The registry of open client connections; see the module docs.
#[derive(Debug)]
pub struct Connections {
    cap: usize,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    /// By id, so the oldest comes first.
    open: BTreeMap<u64, Arc<Conn>>,
}

#[derive(Debug, Default)]
struct Conn {
    /// Requests being answered, plus [`CLOSING`] once claimed for closing.
    busy: AtomicUsize,
    /// Of `busy`, the requests whose answers have ended but may not have been flushed.
    unflushed: AtomicUsize,
    close: CancellationToken,
    /// Cancelled when an HTTP/2 stream of the connection is stuck (see
    /// [`crate::client_io::stream_send_timeout`]): the connection is to be closed.
    stuck: CancellationToken,
    /// Of `busy`, the streams found stuck that hyper still holds.
    stuck_streams: AtomicUsize,
}

/// Every open connection is answering a request, and the cap is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub cap: usize,
}

/// How a connection was admitted.
#[derive(Debug)]
pub struct Admitted {
    pub registered: Registered,
    /// Whether an idle connection was closed to make room.
    pub evicted_idle: bool,
}

impl Connections {
    /// A registry that holds at most `cap` connections (at least 1).
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Connections {
            cap: cap.max(1),
            table: Mutex::new(Table::default()),
        })
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table stays consistent even if a holder panicked: every change is one call.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a new connection. At the cap, closes the oldest idle connection first.
    ///
    /// # Errors
    /// [`Full`] when the cap is reached and no open connection is idle.
    pub fn admit(self: &Arc<Self>) -> Result<Admitted, Full> {
        let mut table = self.lock();
        let mut evicted_idle = false;
        if table.open.len() >= self.cap {
            let idle = table.open.iter().find_map(|(id, conn)| {
                conn.busy
                    .compare_exchange(0, CLOSING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                    .then_some(*id)
            });
            let Some(id) = idle else {
                return Err(Full { cap: self.cap });
            };
            if let Some(conn) = table.open.remove(&id) {
                conn.close.cancel();
            }
            evicted_idle = true;
        }
        let id = table.next_id;
        table.next_id += 1;
        let conn = Arc::new(Conn::default());
        table.open.insert(id, Arc::clone(&conn));
        Ok(Admitted {
            registered: Registered {
                table: Arc::clone(self),
                id,
                conn,
            },
            evicted_idle,
        })
    }
}

/// One open connection. Dropping it unregisters the connection.
#[derive(Debug)]
pub struct Registered {
    table: Arc<Connections>,
    id: u64,
    conn: Arc<Conn>,
}

impl Registered {
    /// Completes when the connection has been chosen to make room for a new one; the
    /// connection should then be closed.
    pub fn evicted(&self) -> WaitForCancellationFuture<'_> {
        self.conn.close.cancelled()
    }

    /// What an HTTP/2 stream of the connection that its client keeps stuck reports, to
    /// have the connection closed once its other requests have ended: a stuck stream holds
    /// the connection otherwise.
    pub fn stuck(&self) -> Stuck {
        Stuck {
            conn: Arc::clone(&self.conn),
        }
    }

    /// Completes once a stream has reported itself stuck ([`Stuck::hold`]).
    pub fn stuck_closes(&self) -> WaitForCancellationFuture<'_> {
        self.conn.stuck.cancelled()
    }

    /// From now on every request that arrives on the connection is told it is closing
    /// ([`Busy::is_closing`]) and starts no call.
    pub fn refuse_new_requests(&self) {
        self.conn.busy.fetch_or(CLOSING, Ordering::AcqRel);
    }

    /// Completes once the only requests of the connection still being answered are stuck
    /// streams, polling: a rare path, taken once per stuck connection.
    pub async fn only_stuck_left(&self) {
        loop {
            let busy = self.conn.busy.load(Ordering::Acquire) & !CLOSING;
            let ended = self.conn.unflushed.load(Ordering::Acquire);
            let stuck = self.conn.stuck_streams.load(Ordering::Acquire);
            if busy.saturating_sub(ended) <= stuck {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// A request begins on this connection; it is busy until the returned guard drops.
    pub fn busy(&self) -> Busy {
        let before = self.conn.busy.fetch_add(1, Ordering::AcqRel);
        Busy {
            conn: Arc::clone(&self.conn),
            closing: before & CLOSING != 0,
        }
    }
}

/// Reports the HTTP/2 streams of one connection that are stuck; see [`Registered::stuck`].
#[derive(Debug, Clone)]
pub struct Stuck {
    conn: Arc<Conn>,
}

impl Stuck {
    /// A stream was given up and hyper still holds it, for a window its client keeps shut:
    /// the connection is to close once its other requests have ended. The stream counts as
    /// stuck until the returned guard drops (when hyper lets the stream go).
    pub fn hold(&self) -> StuckStream {
        self.conn.stuck_streams.fetch_add(1, Ordering::AcqRel);
        self.conn.stuck.cancel();
        StuckStream {
            conn: Arc::clone(&self.conn),
        }
    }
}

/// One stuck stream; see [`Stuck::hold`].
#[derive(Debug)]
pub struct StuckStream {
    conn: Arc<Conn>,
}

impl Drop for StuckStream {
    fn drop(&mut self) {
        self.conn.stuck_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Registered {
    /// Everything written so far has left (a flush completed): requests whose answers ended
    /// before it no longer keep the connection busy.
    pub fn flushed(&self) {
        if self.conn.unflushed.load(Ordering::Acquire) == 0 {
            return;
        }
        let ended = self.conn.unflushed.swap(0, Ordering::AcqRel);
        self.conn.busy.fetch_sub(ended, Ordering::AcqRel);
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.table.lock().open.remove(&self.id);
    }
}

/// A request being answered; see [`Registered::busy`].
#[derive(Debug)]
pub struct Busy {
    conn: Arc<Conn>,
    closing: bool,
}

impl Busy {
    /// Whether the connection was already claimed for closing when this request arrived:
    /// the request must not start a call, because its connection is about to go.
    pub fn is_closing(&self) -> bool {
        self.closing
    }
}

impl Drop for Busy {
    /// The answer has ended, but what hyper has not yet written is still the request's: the
    /// connection stays busy until [`Registered::flushed`].
    fn drop(&mut self) {
        self.conn.unflushed.fetch_add(1, Ordering::AcqRel);
    }
}

/// The default cap for a process allowed `open_files` descriptors: three quarters of them,
/// leaving the rest for connections to runners and the npm, the listeners and accepts in
/// progress; counted from at most 2^20 descriptors (a limit inherited already higher, as
/// under systemd's `LimitNOFILE=infinity` with its `fs.nr_open` of 2^30, is kept, but would
/// make a cap of some 800 million: none).
pub fn default_cap(open_files: u64) -> usize {
    let open_files = open_files.min(fn_lifecycle::limits::MAX_OPEN_FILES);
    usize::try_from(open_files / 4 * 3)
        .unwrap_or(usize::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(table: &Arc<Connections>) -> Registered {
        table.admit().expect("admitted").registered
    }

    #[test]
    fn under_the_cap_nothing_is_closed() {
        let table = Connections::new(3);
        let held: Vec<_> = (0..3).map(|_| table.admit().expect("room")).collect();
        assert!(held.iter().all(|a| !a.evicted_idle));
        assert!(held.iter().all(|a| !a.registered.conn.close.is_cancelled()));
        assert_eq!(table.open(), 3);
    }

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room() {
        let table = Connections::new(3);
        let oldest = admit(&table);
        let busy_one = admit(&table);
        let idle_younger = admit(&table);
        let _request = busy_one.busy();
        let earlier_request = oldest.busy();
        drop(earlier_request);
        oldest.flushed(); // the oldest is idle again

        let fourth = table.admit().expect("room is made");
        assert!(fourth.evicted_idle);
        assert!(oldest.conn.close.is_cancelled(), "the oldest idle one goes");
        assert!(!busy_one.conn.close.is_cancelled());
        assert!(!idle_younger.conn.close.is_cancelled());
        assert_eq!(table.open(), 3);

        let fifth = table.admit().expect("room is made again");
        assert!(fifth.evicted_idle);
        assert!(
            idle_younger.conn.close.is_cancelled(),
            "then the next idle one"
        );
        assert!(!busy_one.conn.close.is_cancelled(), "a busy one never");
    }

    #[test]
    fn when_every_connection_is_busy_the_new_one_is_refused() {
        let table = Connections::new(2);
        let a = admit(&table);
        let b = admit(&table);
        let _on_a = a.busy();
        let on_b = b.busy();
        assert_eq!(table.admit().map(|_| ()), Err(Full { cap: 2 }));
        assert!(!a.conn.close.is_cancelled() && !b.conn.close.is_cancelled());
        drop(on_b);
        b.flushed();
        assert!(
            table.admit().is_ok(),
            "room once a request's answer has left"
        );
        assert!(b.conn.close.is_cancelled());
    }

    #[test]
    fn a_request_on_a_connection_claimed_for_closing_is_told_so() {
        let table = Connections::new(1);
        let first = admit(&table);
        let second = admit(&table);
        let late = first.busy();
        assert!(late.is_closing());
        let fresh = second.busy();
        assert!(!fresh.is_closing());
    }

    #[test]
    fn an_ended_answer_keeps_its_connection_until_a_flush() {
        let table = Connections::new(1);
        let a = admit(&table);
        let two = (a.busy(), a.busy());
        drop(two);
        assert_eq!(
            table.admit().map(|_| ()),
            Err(Full { cap: 1 }),
            "answers not yet flushed"
        );
        a.flushed();
        assert!(table.admit().is_ok(), "both released by one flush");
        assert!(a.conn.close.is_cancelled());
    }

    #[test]
    fn a_closed_connection_leaves_the_table() {
        let table = Connections::new(2);
        let a = admit(&table);
        let _b = admit(&table);
        drop(a);
        assert_eq!(table.open(), 1);
        let c = table.admit().expect("room");
        assert!(!c.evicted_idle);
    }

    #[test]
    fn the_default_cap_leaves_a_quarter_of_the_descriptors() {
        assert_eq!(default_cap(1024), 768);
        assert_eq!(default_cap(20_000), 15_000);
        assert_eq!(default_cap(0), 1);
        // A limit inherited far above what the LB raises to counts as 2^20.
        assert_eq!(default_cap(1 << 30), 786_432);
    }
}
