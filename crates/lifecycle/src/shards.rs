//! Shards (`FN_SHARDS`): a daemon's work spread over several current-thread runtimes, one
//! thread each, every connection living on one of them.
//!
//! With one thread per daemon, every call through the lb-agent and the runner passes
//! through two single-threaded event loops in turn, and on a small machine that chain leaves
//! CPUs idle while calls wait for one of the two threads: at c=64 on two cores, 18–25% idle.
//! A multi-thread runtime fills some of it but moves wake-ups between threads (each
//! daemon's CPU per call rose 10–20% with two workers). Shards are nginx's shape instead:
//! a connection's socket is registered with one shard's I/O driver, so its events, its
//! tasks and the connections they open stay on that shard's thread, and only what is shared
//! (capacity, the pool's accounting, the catalog, metrics) crosses between threads.
//! docs/performance-log.md, session 28.
//!
//! Shard 0 is the runtime the daemon's `main` runs on; [`Shards::start`] adds the others.
//! [`current`] tells code which shard it runs on, so that per-shard state (a gRPC channel's
//! connection, a function instance's kept connections) is picked without being passed down.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// Most shards a daemon may run (`FN_SHARDS`).
pub const MAX_SHARDS: usize = 256;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The shard the calling thread runs: 0 on the daemon's own thread (and on any thread that
/// is not a shard's), `i` on shard `i`'s.
pub fn current() -> usize {
    SHARD.with(Cell::get)
}

/// The runtimes of a daemon's shards. Dropping it stops the added shards' runtimes (their
/// tasks are dropped) and waits for their threads, so keep it until the daemon's last
/// clean-up is done: a function instance started by a call on a shard is cleaned up by
/// tasks of that shard.
pub struct Shards {
    handles: Vec<Handle>,
    /// Connections open on each shard (see [`Shards::assign`]).
    open: Vec<Arc<AtomicUsize>>,
    /// Where the search for the least loaded shard starts, moved on at each assignment, so
    /// that ties go to the shards in turn.
    next: AtomicUsize,
    stop: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("shards", &self.handles.len())
            .finish_non_exhaustive()
    }
}

impl Shards {
    /// `count` shards: the calling runtime as shard 0, and `count - 1` threads named
    /// `fn-shard-<i>`, each running a current-thread runtime with I/O and timers. One shard
    /// (or 0) adds no thread.
    ///
    /// # Errors
    /// When a thread or its runtime cannot be created (out of threads or descriptors).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(count: usize) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut shards = Shards {
            handles: vec![Handle::current()],
            open: vec![Arc::default()],
            next: AtomicUsize::new(0),
            stop: stop.clone(),
            threads: Mutex::new(Vec::new()),
        };
        for i in 1..count.max(1) {
            let (sender, handle) = std::sync::mpsc::channel();
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("fn-shard-{i}"))
                .spawn(move || {
                    SHARD.with(|s| s.set(i));
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(runtime) => {
                            if sender.send(Ok(runtime.handle().clone())).is_ok() {
                                runtime.block_on(stop.cancelled());
                            }
                            // Its tasks are dropped; blocking work it started finishes on
                            // its own rather than holding up the daemon's exit.
                            runtime.shutdown_background();
                        }
                        Err(e) => drop(sender.send(Err(e))),
                    }
                })?;
            shards.lock_threads().push(thread);
            // On an error `shards` is dropped here, which stops the shards started so far.
            let handle = handle
                .recv()
                .map_err(|_| std::io::Error::other(format!("shard {i} ended as it started")))??;
            shards.handles.push(handle);
            shards.open.push(Arc::default());
        }
        Ok(shards)
    }

    /// How many shards there are (at least 1).
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Never: shard 0 is always there.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The shard for a new connection: the one with the fewest connections open, the
    /// shards in turn among equals. The connection counts there until the returned
    /// [`ShardLoad`] is dropped, so keep it as long as the connection. Fewest rather than
    /// in turn: connections that come and go (health probes, a scrape) would otherwise
    /// leave the long-lived ones (an lb-agent's, one per lb shard) on one shard.
    pub fn assign(&self) -> (usize, &Handle, ShardLoad) {
        let n = self.handles.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let shard = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| self.open[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        self.open[shard].fetch_add(1, Ordering::Relaxed);
        (
            shard,
            &self.handles[shard],
            ShardLoad(Arc::clone(&self.open[shard])),
        )
    }

    /// Shard `i`'s runtime.
    ///
    /// # Panics
    /// When `i >= self.len()`.
    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i]
    }

    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection counted on its shard (from [`Shards::assign`]) until dropped.
#[derive(Debug)]
pub struct ShardLoad(Arc<AtomicUsize>);

impl Drop for ShardLoad {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop.cancel();
        for thread in std::mem::take(&mut *self.lock_threads()) {
            // A shard whose task panicked has already said so on stderr.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn each_shard_runs_its_tasks_on_its_own_thread() {
        let shards = Shards::start(3).expect("shards");
        assert_eq!(shards.len(), 3);
        let mut seen = Vec::new();
        for i in 0..3 {
            let (index, thread) = shards
                .handle(i)
                .spawn(async { (current(), std::thread::current().id()) })
                .await
                .expect("task");
            seen.push((index, thread));
        }
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(
            seen[0].1,
            std::thread::current().id(),
            "shard 0 is the caller's"
        );
        assert_ne!(seen[1].1, seen[2].1);
        assert_ne!(seen[1].1, seen[0].1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_goes_to_the_shard_with_the_fewest() {
        let shards = Shards::start(3).expect("shards");
        let mut open: Vec<(usize, ShardLoad)> = (0..3)
            .map(|_| shards.assign())
            .map(|(i, _, load)| (i, load))
            .collect();
        let mut first: Vec<usize> = open.iter().map(|c| c.0).collect();
        first.sort_unstable();
        assert_eq!(first, [0, 1, 2], "one each while they are equal");
        // Two short connections come and go on whichever shards; the long ones stay put.
        for _ in 0..2 {
            drop(shards.assign());
        }
        // Shard 1's connection closes: the next goes there, and the one after to any.
        let at_1 = open.iter().position(|c| c.0 == 1).expect("one on shard 1");
        open.remove(at_1);
        let (next, _, load) = shards.assign();
        assert_eq!(next, 1);
        open.push((next, load));
        let loads: Vec<usize> = shards
            .open
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect();
        assert_eq!(loads, [1, 1, 1]);
        drop(open);
        let loads: Vec<usize> = shards
            .open
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect();
        assert_eq!(loads, [0, 0, 0], "every dropped connection uncounted");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_shard_adds_no_thread_and_dropping_stops_the_others() {
        let one = Shards::start(1).expect("one shard");
        assert_eq!(one.len(), 1);
        assert!(one.lock_threads().is_empty());

        let shards = Shards::start(2).expect("shards");
        let (ended, mut ends) = tokio::sync::oneshot::channel::<()>();
        // A task that never finishes: dropping the shards must not wait for it, and must
        // drop it (its sender with it).
        shards.handle(1).spawn(async move {
            let _ended = ended;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        drop(shards);
        assert!(
            matches!(
                ends.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Closed)
            ),
            "the shard's task was dropped with its runtime"
        );
    }
}
