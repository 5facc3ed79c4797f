//! Service tests of the LB's npm plumbing: the [`NpmPool`] and the [`Advertiser`] against a
//! fake npm (the generated `NodePoolScaler` and `RunnerManager` traits) over mutual TLS.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fn_nodepool::npm_pool::WATCHED_POLL_INTERVAL;
use fn_nodepool::{Advertiser, CapacityTracker, ClientConfig, NpmPool, RunnerPool};
use fn_protocol::poolmanager::node_pool_scaler_server::{NodePoolScaler, NodePoolScalerServer};
use fn_protocol::poolmanager::runner_manager_server::{RunnerManager, RunnerManagerServer};
use fn_protocol::poolmanager::{
    CapacitySnapshotList, LbGroupId, LbGroupMembership, MembershipChanged, Runner,
};
use fn_protocol::runner::RunnerState;
use fn_test_support::TestPki;
use fn_tls::TlsMode;
use futures::FutureExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Bound for anything the tests wait for.
const BOUND: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// What the fake npm serves and what it was told. Shared across restarts of the server.
#[derive(Debug)]
struct NpmState {
    lists: Mutex<HashMap<String, Vec<Runner>>>,
    /// When set, `GetLBGroup` fails with UNAVAILABLE (an npm that answers but is broken).
    failing: AtomicBool,
    /// `GetLBGroup` requests answered with an error.
    failed_polls: AtomicUsize,
    /// `GetLBGroup` requests per group.
    asked: Mutex<HashMap<String, usize>>,
    /// How long each `GetLBGroup` takes to answer, in milliseconds (a distant npm).
    answer_delay_ms: AtomicU64,
    adverts: mpsc::UnboundedSender<CapacitySnapshotList>,
    /// Bumped by every `set`: what `WatchMembership` streams follow.
    changes: tokio::sync::watch::Sender<u64>,
    /// The group each version's `set` changed.
    changed: Mutex<Vec<(u64, String)>>,
    /// When set, `WatchMembership` names no group (an npm from before the field).
    names_no_groups: AtomicBool,
    /// When set, `WatchMembership` answers UNIMPLEMENTED (an npm from before the watch).
    no_watch: AtomicBool,
    /// When set, `AdvertiseCapacity` fails with UNAVAILABLE; each refusal is counted.
    refuse_adverts: AtomicBool,
    refused_adverts: AtomicUsize,
}

impl NpmState {
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<CapacitySnapshotList>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = NpmState {
            lists: Mutex::new(HashMap::new()),
            failing: AtomicBool::new(false),
            failed_polls: AtomicUsize::new(0),
            asked: Mutex::new(HashMap::new()),
            answer_delay_ms: AtomicU64::new(0),
            adverts: tx,
            changes: tokio::sync::watch::Sender::new(0),
            changed: Mutex::new(Vec::new()),
            names_no_groups: AtomicBool::new(false),
            no_watch: AtomicBool::new(false),
            refuse_adverts: AtomicBool::new(false),
            refused_adverts: AtomicUsize::new(0),
        };
        (Arc::new(state), rx)
    }

    fn set(&self, group: &str, addresses: &[&str]) {
        let runners = addresses
            .iter()
            .map(|a| Runner {
                id: format!("id-{a}"),
                address: (*a).to_owned(),
            })
            .collect();
        self.lists
            .lock()
            .expect("lock")
            .insert(group.to_owned(), runners);
        let mut changed = self.changed.lock().expect("lock");
        let version = *self.changes.borrow() + 1;
        changed.push((version, group.to_owned()));
        self.changes.send_modify(|v| *v = version);
    }

    /// `GetLBGroup` requests for `group` so far.
    fn asked(&self, group: &str) -> usize {
        self.asked
            .lock()
            .expect("lock")
            .get(group)
            .copied()
            .unwrap_or(0)
    }
}

/// The fake npm: its state, and the token of the server instance (watches end with it).
#[derive(Debug, Clone)]
struct FakeNpm(Arc<NpmState>, CancellationToken);

#[tonic::async_trait]
impl NodePoolScaler for FakeNpm {
    async fn advertise_capacity(
        &self,
        request: Request<CapacitySnapshotList>,
    ) -> Result<Response<()>, Status> {
        if self.0.refuse_adverts.load(Ordering::SeqCst) {
            self.0.refused_adverts.fetch_add(1, Ordering::SeqCst);
            return Err(Status::unavailable("adverts refused by the test"));
        }
        // The receiver may be gone at the end of a test; nothing to report then.
        self.0.adverts.send(request.into_inner()).ok();
        Ok(Response::new(()))
    }
}

#[tonic::async_trait]
impl RunnerManager for FakeNpm {
    async fn get_lb_group(
        &self,
        request: Request<LbGroupId>,
    ) -> Result<Response<LbGroupMembership>, Status> {
        let group = request.into_inner().id;
        *self
            .0
            .asked
            .lock()
            .expect("lock")
            .entry(group.clone())
            .or_default() += 1;
        let delay = self.0.answer_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.0.failing.load(Ordering::SeqCst) {
            self.0.failed_polls.fetch_add(1, Ordering::SeqCst);
            return Err(Status::unavailable("fake npm told to fail"));
        }
        let runners = self
            .0
            .lists
            .lock()
            .expect("lock")
            .get(&group)
            .cloned()
            .unwrap_or_default();
        Ok(Response::new(LbGroupMembership {
            group_id: group,
            runners,
        }))
    }

    type WatchMembershipStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<MembershipChanged, Status>> + Send + 'static>,
    >;

    async fn watch_membership(
        &self,
        _request: Request<()>,
    ) -> Result<Response<Self::WatchMembershipStream>, Status> {
        if self.0.no_watch.load(Ordering::SeqCst) {
            return Err(Status::unimplemented("an npm from before the watch"));
        }
        // As the npm does: the first message names no group, each later one those changed
        // since the previous one.
        let state = Arc::clone(&self.0);
        let stream = futures::stream::unfold(
            (None, self.0.changes.subscribe(), self.1.clone()),
            move |(sent, mut changes, stop)| {
                let state = Arc::clone(&state);
                async move {
                    if sent.is_some() {
                        tokio::select! {
                            () = stop.cancelled() => return None,
                            changed = changes.changed() => changed.ok()?,
                        }
                    }
                    let version = *changes.borrow_and_update();
                    let mut groups: Vec<String> = match sent {
                        Some(sent) if !state.names_no_groups.load(Ordering::SeqCst) => state
                            .changed
                            .lock()
                            .expect("lock")
                            .iter()
                            .filter(|(v, _)| *v > sent && *v <= version)
                            .map(|(_, group)| group.clone())
                            .collect(),
                        _ => Vec::new(),
                    };
                    groups.sort();
                    groups.dedup();
                    let message = MembershipChanged { version, groups };
                    Some((Ok(message), (Some(version), changes, stop)))
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A running fake npm server; [`Server::stop`] shuts it down (connections refused after).
struct Server {
    address: SocketAddr,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves `state` on `address` (or a free loopback port).
    async fn start(tls: &TlsMode, state: &Arc<NpmState>, address: Option<SocketAddr>) -> Server {
        let listener = tokio::net::TcpListener::bind(
            address.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        )
        .await
        .expect("bind fake npm");
        let address = listener.local_addr().expect("local addr");
        let cancel = CancellationToken::new();
        let fake = FakeNpm(Arc::clone(state), cancel.clone());
        let incoming = fn_tls::grpc_incoming(tls, listener).expect("server TLS");
        let router = fn_tls::grpc_server()
            .add_service(NodePoolScalerServer::new(fake.clone()))
            .add_service(RunnerManagerServer::new(fake));
        let shutdown = cancel.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
                .expect("fake npm serves");
        });
        Server {
            address,
            cancel,
            task,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(BOUND, self.task)
            .await
            .expect("fake npm stops in time")
            .expect("fake npm task");
    }
}

fn addresses(pool: &NpmPool, group: &str) -> Vec<String> {
    pool.runners(group)
        .iter()
        .map(|c| c.address().to_owned())
        .collect()
}

/// Waits until the pool's list of `group` is `want`.
async fn wait_for_list(pool: &NpmPool, group: &str, want: &[&str]) {
    let start = tokio::time::Instant::now();
    loop {
        let got = addresses(pool, group);
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < BOUND,
            "list of {group} is {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fake npm serving `state`, and a pool polling it every [`POLL`].
async fn start_pool(
    tls: &TlsMode,
    state: &Arc<NpmState>,
) -> (
    Server,
    NpmPool,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), std::convert::Infallible>>,
) {
    let server = Server::start(tls, state, None).await;
    let pool = NpmPool::new(
        &server.address.to_string(),
        tls,
        ClientConfig::default(),
        POLL,
    )
    .expect("pool");
    let cancel = CancellationToken::new();
    let poller = tokio::spawn(pool.clone().run(cancel.clone()));
    (server, pool, cancel, poller)
}

/// Stops a pool's poller, which must end at once.
async fn stop_pool(
    cancel: CancellationToken,
    poller: tokio::task::JoinHandle<Result<(), std::convert::Infallible>>,
) {
    cancel.cancel();
    tokio::time::timeout(BOUND, poller)
        .await
        .expect("poller stops on cancel")
        .expect("join")
        .expect("infallible");
}

#[tokio::test]
async fn npm_pool_keeps_order_reuses_clients_drops_removed_and_keeps_the_last_list() {
    let pki = TestPki::new();
    let tls = pki.mode();
    let (state, _adverts) = NpmState::new();
    // Deliberately not sorted: the pool must keep the npm's order.
    state.set("g", &["127.0.0.1:7003", "127.0.0.1:7001", "127.0.0.1:7002"]);
    state.set("other", &["127.0.0.1:7009"]);
    let (server, pool, cancel, poller) = start_pool(&tls, &state).await;

    // The first lookup of a group registers it and is empty; the poller fills it in.
    assert!(pool.runners("g").is_empty());
    wait_for_list(
        &pool,
        "g",
        &["127.0.0.1:7003", "127.0.0.1:7001", "127.0.0.1:7002"],
    )
    .await;
    assert!(
        addresses(&pool, "other").is_empty(),
        "a group is only polled once the LB has seen it"
    );
    wait_for_list(&pool, "other", &["127.0.0.1:7009"]).await;
    let before = pool.runners("g");
    let kept: Vec<_> = before.iter().map(Arc::clone).collect();
    let removed = Arc::downgrade(&before[1]);

    // 7001 leaves, 7004 joins in the middle: order as the npm says, clients of the runners
    // that stay are the same objects (same connection).
    state.set("g", &["127.0.0.1:7003", "127.0.0.1:7004", "127.0.0.1:7002"]);
    wait_for_list(
        &pool,
        "g",
        &["127.0.0.1:7003", "127.0.0.1:7004", "127.0.0.1:7002"],
    )
    .await;
    let after = pool.runners("g");
    assert!(Arc::ptr_eq(&after[0], &kept[0]), "7003 reuses its client");
    assert!(Arc::ptr_eq(&after[2], &kept[2]), "7002 reuses its client");
    assert_eq!(after[1].id(), "id-127.0.0.1:7004");
    // The removed runner's client is held only by our old snapshot: the pool let it go.
    drop(before);
    drop(kept);
    assert!(
        removed.upgrade().is_none(),
        "the pool still holds the removed runner's client"
    );

    // An npm that answers with errors: the last known list stays.
    state.failing.store(true, Ordering::SeqCst);
    let start = tokio::time::Instant::now();
    while state.failed_polls.load(Ordering::SeqCst) < 3 {
        assert!(start.elapsed() < BOUND, "the pool stopped polling");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        addresses(&pool, "g"),
        ["127.0.0.1:7003", "127.0.0.1:7004", "127.0.0.1:7002"],
        "an npm error must not change the list"
    );
    state.failing.store(false, Ordering::SeqCst);

    // An npm that is gone: the last known list stays, for many poll intervals.
    let address = server.address;
    server.stop().await;
    state.set("g", &[]);
    tokio::time::sleep(POLL * 8).await;
    assert_eq!(
        addresses(&pool, "g"),
        ["127.0.0.1:7003", "127.0.0.1:7004", "127.0.0.1:7002"],
        "an unreachable npm must not empty the list"
    );
    assert_eq!(addresses(&pool, "other"), ["127.0.0.1:7009"]);

    // The npm comes back on the same address: the pool follows it again.
    state.set("g", &["127.0.0.1:7002"]);
    let server = Server::start(&tls, &state, Some(address)).await;
    wait_for_list(&pool, "g", &["127.0.0.1:7002"]).await;
    assert!(
        Arc::ptr_eq(&pool.runners("g")[0], &after[2]),
        "7002 kept its client across the outage"
    );

    stop_pool(cancel, poller).await;
    server.stop().await;
}

/// Each group's runners wake the calls waiting in that group only: a report of one group's
/// runner wakes no call waiting for room in another (with one signal for the LB, every
/// report woke every waiting call of every group).
#[tokio::test]
async fn a_report_wakes_only_the_calls_waiting_in_its_group() {
    let pki = TestPki::new();
    let tls = pki.mode();
    let (state, _adverts) = NpmState::new();
    state.set("g", &["127.0.0.1:7001"]);
    state.set("other", &["127.0.0.1:7002"]);
    let (server, pool, cancel, poller) = start_pool(&tls, &state).await;
    assert!(pool.runners("g").is_empty() && pool.runners("other").is_empty());
    wait_for_list(&pool, "g", &["127.0.0.1:7001"]).await;
    wait_for_list(&pool, "other", &["127.0.0.1:7002"]).await;

    let g = pool.report_signal("g");
    let other = pool.report_signal("other");
    let in_g = g.next_report();
    let in_other = other.next_report();
    tokio::pin!(in_g, in_other);
    in_g.as_mut().enable();
    in_other.as_mut().enable();
    pool.runners("g")[0].reports().update(RunnerState {
        version: 1,
        capacity_total_mb: 1024,
        capacity_free_mb: 1024,
        ..RunnerState::default()
    });
    tokio::time::timeout(BOUND, in_g)
        .await
        .expect("the group's own call is woken");
    assert!(
        in_other.as_mut().now_or_never().is_none(),
        "a call of another group is woken"
    );

    stop_pool(cancel, poller).await;
    server.stop().await;
}

/// A call waiting for room learns of a new runner in its group when the list changes, not
/// at its next retry (under `ch` or `naive` no runner reports).
#[tokio::test]
async fn a_new_runner_in_the_list_wakes_the_calls_waiting_in_its_group() {
    let pki = TestPki::new();
    let tls = pki.mode();
    let (state, _adverts) = NpmState::new();
    state.set("g", &[]);
    let (server, pool, cancel, poller) = start_pool(&tls, &state).await;
    assert!(pool.runners("g").is_empty());
    let g = pool.report_signal("g");
    let woken = g.next_report();
    tokio::pin!(woken);
    woken.as_mut().enable();
    state.set("g", &["127.0.0.1:7001"]);
    wait_for_list(&pool, "g", &["127.0.0.1:7001"]).await;
    assert!(
        woken.as_mut().now_or_never().is_some(),
        "the waiting call was not woken by the new list"
    );
    stop_pool(cancel, poller).await;
    server.stop().await;
}

/// An npm's list is untrusted input: a runner listed twice takes one place (not two shares
/// of the calls and of the hash ring), and a list longer than an LB takes is cut to its
/// first runners, in the npm's order (so every LB keeps the same ones).
#[tokio::test]
async fn a_runner_listed_twice_takes_one_place_and_a_huge_list_is_cut() {
    let pki = TestPki::new();
    let tls = pki.mode();
    let (state, _adverts) = NpmState::new();
    state.set(
        "dup",
        &[
            "127.0.0.1:7002",
            "127.0.0.1:7001",
            "127.0.0.1:7002",
            "127.0.0.1:7003",
        ],
    );
    let huge: Vec<String> = (0..fn_nodepool::npm_pool::MAX_RUNNERS_PER_GROUP + 500)
        .map(|i| format!("127.0.0.{}:{}", 1 + i / 50_000, 10_000 + i % 50_000))
        .collect();
    let huge_refs: Vec<&str> = huge.iter().map(String::as_str).collect();
    state.set("huge", &huge_refs);
    let (server, pool, cancel, poller) = start_pool(&tls, &state).await;

    assert!(pool.runners("dup").is_empty());
    wait_for_list(
        &pool,
        "dup",
        &["127.0.0.1:7002", "127.0.0.1:7001", "127.0.0.1:7003"],
    )
    .await;
    assert!(pool.runners("huge").is_empty());
    let kept = &huge_refs[..fn_nodepool::npm_pool::MAX_RUNNERS_PER_GROUP];
    wait_for_list(&pool, "huge", kept).await;

    stop_pool(cancel, poller).await;
    server.stop().await;
}

/// With polling far too slow to explain it (a minute), a runner the npm publishes reaches
/// the LB's list at once through the membership watch; an npm without the watch still
/// works, by polling.
#[tokio::test]
async fn a_published_runner_reaches_the_list_at_once_through_the_watch() {
    let pki = TestPki::new();
    let tls = pki.mode();
    let (state, _adverts) = NpmState::new();
    state.set("g", &["127.0.0.1:7101"]);
    let server = Server::start(&tls, &state, None).await;
    let pool = NpmPool::new(
        &server.address.to_string(),
        &tls,
        ClientConfig::default(),
        Duration::from_secs(60),
    )
    .expect("pool");
    let cancel = CancellationToken::new();
    let poller = tokio::spawn(pool.clone().run(cancel.clone()));
    assert!(pool.runners("g").is_empty());
    // A new group is fetched at once (the first lookup wakes the poller).
    wait_for_list(&pool, "g", &["127.0.0.1:7101"]).await;
    // Let the watch open (the fake npm's stream subscribes to the changes): its first
    // message comes at once.
    let opening = tokio::time::Instant::now();
    while state.changes.receiver_count() == 0 {
        assert!(opening.elapsed() < BOUND, "the pool never opened the watch");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for round in 0..3 {
        let added = format!("127.0.0.1:{}", 7102 + round);
        let mut want = vec!["127.0.0.1:7101".to_owned(), added.clone()];
        want.dedup();
        state.set("g", &["127.0.0.1:7101", &added]);
        let start = tokio::time::Instant::now();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        wait_for_list(&pool, "g", &want).await;
        // The watch, not the poll (60 s).
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "round {round}: the change took {:?}",
            start.elapsed()
        );
    }
    cancel.cancel();
    poller.await.expect("poller").expect("ends");
    server.stop().await;

    // An npm without the watch: the pool polls at its own interval.
    let (state, _adverts) = NpmState::new();
    state.no_watch.store(true, Ordering::SeqCst);
    state.set("g", &["127.0.0.1:7201"]);
    let (server, pool, cancel, poller) = start_pool(&tls, &state).await;
    assert!(pool.runners("g").is_empty());
    wait_for_list(&pool, "g", &["127.0.0.1:7201"]).await;
    state.set("g", &["127.0.0.1:7201", "127.0.0.1:7202"]);
    wait_for_list(&pool, "g", &["127.0.0.1:7201", "127.0.0.1:7202"]).await;
    cancel.cancel();
    poller.await.expect("poller").expect("ends");
    server.stop().await;
}

/// After a change, the LB's groups are fetched together: a runner new in the last of many
/// groups reaches the LB about one round trip after the watch said so, not one per group
/// (fetched one after another, the last of 12 groups came 12 answers later).
#[tokio::test]
async fn after_a_change_every_group_is_fetched_together() {
    const GROUPS: usize = 12;
    const DELAY: Duration = Duration::from_millis(400);
    let pki = TestPki::new();
    let tls = pki.mode();
    let (state, _adverts) = NpmState::new();
    let groups: Vec<String> = (0..GROUPS).map(|i| format!("g-{i:02}")).collect();
    for group in &groups {
        state.set(group, &["127.0.0.1:7301"]);
    }
    let (server, pool, cancel, poller) = start_pool(&tls, &state).await;
    for group in &groups {
        assert!(pool.runners(group).is_empty());
    }
    for group in &groups {
        wait_for_list(&pool, group, &["127.0.0.1:7301"]).await;
    }
    let opening = tokio::time::Instant::now();
    while state.changes.receiver_count() == 0 {
        assert!(opening.elapsed() < BOUND, "the pool never opened the watch");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Every answer now takes DELAY; a runner joins the group fetched last (in name order).
    state.answer_delay_ms.store(
        u64::try_from(DELAY.as_millis()).expect("small"),
        Ordering::SeqCst,
    );
    let last = &groups[GROUPS - 1];
    let start = tokio::time::Instant::now();
    state.set(last, &["127.0.0.1:7301", "127.0.0.1:7302"]);
    wait_for_list(&pool, last, &["127.0.0.1:7301", "127.0.0.1:7302"]).await;
    let took = start.elapsed();
    assert!(
        took < DELAY * 3,
        "the last of {GROUPS} groups got its new runner after {took:?}, answers taking {DELAY:?} each"
    );

    stop_pool(cancel, poller).await;
    server.stop().await;
}

/// A change fetches only the groups the npm says changed; a message naming none (an npm from
/// before the field) fetches every group, as before.
#[tokio::test]
async fn after_a_change_only_the_groups_the_npm_names_are_fetched() {
    const ROUNDS: usize = 6;
    let pki = TestPki::new();
    let groups = ["a", "b", "c"];
    // A poll interval no round reaches: every fetch comes from the watch.
    let (state, server, pool, cancel, poller) =
        watched_pool(&pki.mode(), &groups, Duration::from_secs(60)).await;

    // Each round changes "b" alone and waits for the LB to have it.
    let rounds = |base: u16| {
        let state = &state;
        let pool = &pool;
        async move {
            for round in 0..ROUNDS {
                let added = format!("127.0.0.1:{}", base + u16::try_from(round).expect("small"));
                state.set("b", &["127.0.0.1:7401", &added]);
                wait_for_list(pool, "b", &["127.0.0.1:7401", &added]).await;
            }
        }
    };
    let asked = |state: &NpmState| groups.map(|g| state.asked(g));
    let before = asked(&state);
    rounds(7410).await;
    let after = asked(&state);
    assert!(after[1] >= before[1] + ROUNDS, "b: {before:?} -> {after:?}");
    // Two passes over every group may still have been on their way: the wake-up of the
    // groups' first lookups and the watch's first message.
    for i in [0, 2] {
        assert!(
            after[i] <= before[i] + 2,
            "{} was fetched at changes of b alone: {before:?} -> {after:?}",
            groups[i]
        );
    }

    // An npm whose messages name no group: every group at each change.
    state.names_no_groups.store(true, Ordering::SeqCst);
    let before = after;
    rounds(7420).await;
    let after = asked(&state);
    for i in 0..groups.len() {
        assert!(
            after[i] >= before[i] + ROUNDS,
            "{} not fetched at each change: {before:?} -> {after:?}",
            groups[i]
        );
    }

    stop_pool(cancel, poller).await;
    server.stop().await;
}

/// A fake npm listing `127.0.0.1:7401` in each of `groups`, and a pool polling it every
/// `poll` that has every list and has opened the membership watch.
async fn watched_pool(
    tls: &TlsMode,
    groups: &[&str],
    poll: Duration,
) -> (
    Arc<NpmState>,
    Server,
    NpmPool,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), std::convert::Infallible>>,
) {
    let (state, _adverts) = NpmState::new();
    for group in groups {
        state.set(group, &["127.0.0.1:7401"]);
    }
    let server = Server::start(tls, &state, None).await;
    let pool = NpmPool::new(
        &server.address.to_string(),
        tls,
        ClientConfig::default(),
        poll,
    )
    .expect("pool");
    let cancel = CancellationToken::new();
    let poller = tokio::spawn(pool.clone().run(cancel.clone()));
    for group in groups {
        assert!(pool.runners(group).is_empty());
    }
    for group in groups {
        wait_for_list(&pool, group, &["127.0.0.1:7401"]).await;
    }
    let opening = tokio::time::Instant::now();
    while state.changes.receiver_count() == 0 {
        assert!(opening.elapsed() < BOUND, "the pool never opened the watch");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (state, server, pool, cancel, poller)
}

/// A group named by a membership message whose fetch fails is asked again at the next
/// message, whichever group that one names; before, only the next pass over every group
/// asked again, and here none comes (a poll interval of a minute).
#[tokio::test]
async fn a_named_group_whose_fetch_failed_is_asked_again_at_the_next_message() {
    let pki = TestPki::new();
    let (state, server, pool, cancel, poller) =
        watched_pool(&pki.mode(), &["a", "b"], Duration::from_secs(60)).await;
    state.failing.store(true, Ordering::SeqCst);
    let failed = state.failed_polls.load(Ordering::SeqCst);
    state.set("b", &["127.0.0.1:7401", "127.0.0.1:7402"]);
    let start = tokio::time::Instant::now();
    while state.failed_polls.load(Ordering::SeqCst) == failed {
        assert!(start.elapsed() < BOUND, "b was never asked for");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    state.failing.store(false, Ordering::SeqCst);
    // Messages that name only "a", until b's new list is in.
    let mut round = 0u16;
    while addresses(&pool, "b") != ["127.0.0.1:7401", "127.0.0.1:7402"] {
        assert!(
            start.elapsed() < BOUND,
            "b's list never came: {:?}",
            addresses(&pool, "b")
        );
        round += 1;
        state.set(
            "a",
            &["127.0.0.1:7401", &format!("127.0.0.1:{}", 7500 + round)],
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_pool(cancel, poller).await;
    server.stop().await;
}

/// The pass over every group comes every [`WATCHED_POLL_INTERVAL`] while the watch is up,
/// however often messages come; before, each message began the wait afresh, and messages
/// closer together than it kept every group no message named from ever being asked again.
#[tokio::test]
async fn the_safety_net_poll_comes_however_often_messages_come() {
    let pki = TestPki::new();
    let (state, server, _pool, cancel, poller) =
        watched_pool(&pki.mode(), &["a", "quiet"], Duration::from_millis(100)).await;
    // The passes over every group of the start (the groups' first lookups, the watch's
    // first message) are over within this.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let quiet = state.asked("quiet");
    let start = tokio::time::Instant::now();
    let mut round = 0u16;
    while state.asked("quiet") == quiet {
        assert!(
            start.elapsed() < WATCHED_POLL_INTERVAL + BOUND,
            "the group no message names was not asked for in {:?}",
            start.elapsed()
        );
        round = round.wrapping_add(1);
        state.set(
            "a",
            &[
                "127.0.0.1:7401",
                &format!("127.0.0.1:{}", 7600 + round % 100),
            ],
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        start.elapsed() >= WATCHED_POLL_INTERVAL / 2,
        "asked for after {:?}: the watch was not up",
        start.elapsed()
    );
    stop_pool(cancel, poller).await;
    server.stop().await;
}

async fn next_advert(
    rx: &mut mpsc::UnboundedReceiver<CapacitySnapshotList>,
) -> CapacitySnapshotList {
    tokio::time::timeout(BOUND, rx.recv())
        .await
        .expect("an advert within the bound")
        .expect("fake npm alive")
}

fn totals(advert: &CapacitySnapshotList) -> BTreeMap<String, u64> {
    advert
        .snapshots
        .iter()
        .map(|s| (s.group_id.clone(), s.mem_mb_total))
        .collect()
}

/// Reads adverts until one satisfies `done`; every advert read is checked with `each`.
async fn adverts_until(
    rx: &mut mpsc::UnboundedReceiver<CapacitySnapshotList>,
    each: impl Fn(&BTreeMap<String, u64>),
    done: impl Fn(&BTreeMap<String, u64>) -> bool,
) {
    for _ in 0..200 {
        let advert = next_advert(rx).await;
        assert_eq!(advert.lb_id, "lb-test");
        let t = totals(&advert);
        each(&t);
        if done(&t) {
            return;
        }
    }
    panic!("the expected advert never came");
}

/// Starts an advertiser of `tracker`'s totals, as "lb-test", to the fake npm `server`.
fn advertise(
    tracker: &CapacityTracker,
    server: &Server,
    tls: &TlsMode,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), std::convert::Infallible>>,
) {
    advertise_every(tracker, server, tls, POLL)
}

/// [`advertise`], every `interval`.
fn advertise_every(
    tracker: &CapacityTracker,
    server: &Server,
    tls: &TlsMode,
    interval: Duration,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), std::convert::Infallible>>,
) {
    let advertiser = Advertiser::new(
        "lb-test",
        tracker.clone(),
        &server.address.to_string(),
        tls,
        interval,
    )
    .expect("advertiser");
    let cancel = CancellationToken::new();
    let task = tokio::spawn(advertiser.run(cancel.clone()));
    (cancel, task)
}

#[tokio::test]
async fn advertiser_sends_group_totals_a_final_zero_and_heartbeats() {
    let pki = TestPki::new();
    let tls = pki.mode();
    let (state, mut rx) = NpmState::new();
    let server = Server::start(&tls, &state, None).await;
    let tracker = CapacityTracker::new();
    let (cancel, task) = advertise(&tracker, &server, &tls);

    // Idle: adverts keep coming, empty (the LB's heartbeat).
    for _ in 0..2 {
        let advert = next_advert(&mut rx).await;
        assert_eq!(advert.lb_id, "lb-test");
        assert!(advert.snapshots.is_empty(), "{advert:?}");
        assert!(advert.ts_unix_ms > 0);
    }

    let a = tracker.assign("g1", 128);
    let b = tracker.assign("g1", 256);
    let c = tracker.assign("g2", 64);
    adverts_until(
        &mut rx,
        |_| {},
        |t| t.get("g1") == Some(&384) && t.get("g2") == Some(&64),
    )
    .await;

    // g2 goes idle: it is advertised at zero (never just dropped), then no longer listed.
    drop(c);
    adverts_until(
        &mut rx,
        |t| {
            assert!(
                t.contains_key("g2"),
                "g2 dropped without a final zero: {t:?}"
            )
        },
        |t| t.get("g2") == Some(&0),
    )
    .await;
    for _ in 0..2 {
        let t = totals(&next_advert(&mut rx).await);
        assert_eq!(t, BTreeMap::from([("g1".to_owned(), 384)]));
    }

    drop(a);
    adverts_until(&mut rx, |_| {}, |t| t.get("g1") == Some(&256)).await;
    drop(b);
    adverts_until(
        &mut rx,
        |t| {
            assert!(
                t.contains_key("g1"),
                "g1 dropped without a final zero: {t:?}"
            )
        },
        |t| t.get("g1") == Some(&0),
    )
    .await;
    // Idle again: heartbeats with no groups.
    for _ in 0..2 {
        let advert = next_advert(&mut rx).await;
        assert!(advert.snapshots.is_empty(), "{advert:?}");
    }

    // The npm goes away and comes back: adverts resume on the same address.
    let address = server.address;
    server.stop().await;
    while rx.try_recv().is_ok() {}
    let busy = tracker.assign("g3", 512);
    tokio::time::sleep(POLL * 4).await;
    let server = Server::start(&tls, &state, Some(address)).await;
    adverts_until(&mut rx, |_| {}, |t| t.get("g3") == Some(&512)).await;
    drop(busy);

    // Stopped, it sends a last advert that says so, and only then.
    assert!(!next_advert(&mut rx).await.leaving);
    while rx.try_recv().is_ok() {}
    cancel.cancel();
    tokio::time::timeout(BOUND, task)
        .await
        .expect("advertiser stops on cancel")
        .expect("join")
        .expect("infallible");
    let mut last = next_advert(&mut rx).await;
    while let Ok(later) = rx.try_recv() {
        last = later;
    }
    assert!(
        last.leaving,
        "the last advert says the LB is leaving: {last:?}"
    );
    server.stop().await;
}

/// Calls one after another (each rises from zero) send an advert per interval, not one per
/// round trip to the npm; the first call of an idle group still reaches the npm at once.
#[tokio::test]
async fn sequential_calls_send_no_adverts_back_to_back() {
    let interval = Duration::from_secs(1);
    let pki = TestPki::new();
    let tls = pki.mode();
    let (state, mut rx) = NpmState::new();
    let server = Server::start(&tls, &state, None).await;
    let tracker = CapacityTracker::new();
    let (cancel, task) = advertise_every(&tracker, &server, &tls, interval);
    // The first tick comes at once; the next one an interval later.
    assert!(next_advert(&mut rx).await.snapshots.is_empty());

    // The first call of an idle group: told at once, well before the tick.
    let start = tokio::time::Instant::now();
    let first = tracker.assign("g", 128);
    let told = totals(&next_advert(&mut rx).await);
    let took = start.elapsed();
    assert_eq!(told.get("g"), Some(&128), "{told:?}");
    assert!(
        took < interval / 4,
        "the first call waited {took:?} for its advert"
    );
    drop(first);

    // A second of calls one after another, each a few ms long.
    let start = tokio::time::Instant::now();
    let mut calls = 0;
    while start.elapsed() < interval {
        let call = tracker.assign("g", 128);
        tokio::time::sleep(Duration::from_millis(2)).await;
        drop(call);
        tokio::task::yield_now().await;
        calls += 1;
    }
    let mut adverts = Vec::new();
    while let Ok(advert) = rx.try_recv() {
        adverts.push(totals(&advert));
    }
    assert!(
        adverts.len() <= 4,
        "{calls} sequential calls in {interval:?} sent {} adverts",
        adverts.len()
    );
    // The group stays busy to the npm between its calls.
    assert!(
        adverts.iter().all(|t| t.get("g") == Some(&128)),
        "{adverts:?}"
    );
    cancel.cancel();
    task.await.expect("joins").expect("ends");
    server.stop().await;
}

/// A call that begins and ends between two adverts is in the next advert (the most its
/// group needed since the previous one), not missed by a snapshot of the moment; the advert
/// after it says the group is idle again.
#[tokio::test]
async fn a_call_between_two_adverts_is_in_the_next_one() {
    let pki = TestPki::new();
    let tls = pki.mode();
    let (state, mut rx) = NpmState::new();
    let server = Server::start(&tls, &state, None).await;
    let tracker = CapacityTracker::new();
    let (cancel, task) = advertise(&tracker, &server, &tls);
    assert!(next_advert(&mut rx).await.snapshots.is_empty());
    // On this (current-thread) runtime nothing else runs between these two lines.
    drop(tracker.assign("g", 128));
    let next = totals(&next_advert(&mut rx).await);
    assert_eq!(next.get("g"), Some(&128), "{next:?}");
    let after = totals(&next_advert(&mut rx).await);
    assert_eq!(after.get("g"), Some(&0), "the final zero: {after:?}");
    cancel.cancel();
    task.await.expect("joins").expect("ends");
    server.stop().await;
}

/// Waits until the fake npm has refused more than `seen` adverts; returns how many.
async fn refused_after(state: &NpmState, seen: usize) -> usize {
    let start = tokio::time::Instant::now();
    loop {
        let refused = state.refused_adverts.load(Ordering::SeqCst);
        if refused > seen {
            return refused;
        }
        assert!(start.elapsed() < BOUND, "no advert refused after {seen}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An advert the npm did not take loses nothing: a call that came and went in its interval
/// is in the first advert that reaches the npm afterwards.
#[tokio::test]
async fn a_failed_advert_leaves_its_figures_to_the_next_one() {
    let pki = TestPki::new();
    let tls = pki.mode();
    let (state, mut rx) = NpmState::new();
    let server = Server::start(&tls, &state, None).await;
    let tracker = CapacityTracker::new();
    // Known to the npm as busy, so that the call below wakes no early advert.
    let busy = tracker.assign("other", 64);
    let (cancel, task) = advertise(&tracker, &server, &tls);
    adverts_until(&mut rx, |_| {}, |t| t.get("other") == Some(&64)).await;

    state.refuse_adverts.store(true, Ordering::SeqCst);
    let refused = refused_after(&state, 0).await;
    // On this (current-thread) runtime nothing else runs between these two lines.
    drop(tracker.assign("g", 128));
    // An advert with the call's figure is refused, and then one more.
    let refused = refused_after(&state, refused).await;
    refused_after(&state, refused).await;
    while rx.try_recv().is_ok() {}
    state.refuse_adverts.store(false, Ordering::SeqCst);
    let next = totals(&next_advert(&mut rx).await);
    assert_eq!(
        next.get("g"),
        Some(&128),
        "the call's demand was lost: {next:?}"
    );
    drop(busy);
    cancel.cancel();
    task.await.expect("joins").expect("ends");
    server.stop().await;
}

/// An LB with demand in more groups than one advert may carry sends those with the most
/// (the npm refuses a longer advert whole, so before every group went unadvertised), and
/// every group once they fit again.
#[tokio::test]
async fn an_advert_over_the_npms_limit_carries_the_groups_with_the_most_demand() {
    use fn_protocol::poolmanager::MAX_GROUPS_PER_ADVERT;
    let pki = TestPki::new();
    let tls = pki.mode();
    let (state, mut rx) = NpmState::new();
    let server = Server::start(&tls, &state, None).await;
    let tracker = CapacityTracker::new();
    // Ten more groups than fit: "big-*" at 2 MB (the ten with the most), "small-*" at 1.
    let mut guards: Vec<_> = (0..10)
        .map(|i| tracker.assign(&format!("big-{i}"), 2))
        .collect();
    let mut small: Vec<_> = (0..MAX_GROUPS_PER_ADVERT)
        .map(|i| tracker.assign(&format!("small-{i:04}"), 1))
        .collect();
    let (cancel, task) = advertise(&tracker, &server, &tls);

    let cut = totals(&next_advert(&mut rx).await);
    assert_eq!(cut.len(), MAX_GROUPS_PER_ADVERT);
    assert!(
        (0..10).all(|i| cut.get(&format!("big-{i}")) == Some(&2)),
        "{cut:?}"
    );
    // Among equals, name order: the last ten small groups are the ones left out.
    let left_out: Vec<String> = (0..MAX_GROUPS_PER_ADVERT)
        .map(|i| format!("small-{i:04}"))
        .filter(|g| !cut.contains_key(g))
        .collect();
    let expected: Vec<String> = (MAX_GROUPS_PER_ADVERT - 10..MAX_GROUPS_PER_ADVERT)
        .map(|i| format!("small-{i:04}"))
        .collect();
    assert_eq!(left_out, expected);

    // Twenty small groups go idle: everything fits again, the last ten small ones too.
    small.truncate(MAX_GROUPS_PER_ADVERT - 20);
    adverts_until(
        &mut rx,
        |_| {},
        |t| t.get(&format!("small-{:04}", MAX_GROUPS_PER_ADVERT - 1)) == Some(&0),
    )
    .await;
    guards.clear();
    cancel.cancel();
    task.await.expect("joins").expect("ends");
}

/// What `pool` says of `group`'s missing list, once it says something (within [`BOUND`]).
async fn trouble_of(pool: &NpmPool, group: &str) -> String {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(why) = pool.list_trouble(group) {
            return why;
        }
        assert!(start.elapsed() < BOUND, "no trouble said for {group}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A group whose runner list cannot be fetched says why to the calls that find it empty:
/// the npm cannot be reached, naming `FN_NPM_ADDRESS`, and for how long; a group whose list
/// came says nothing.
#[tokio::test]
async fn a_group_whose_list_cannot_be_fetched_says_the_npm_cannot_be_reached() {
    let pki = TestPki::new();
    let tls = pki.mode();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").to_string()
    };
    let pool = NpmPool::new(&closed, &tls, ClientConfig::default(), POLL).expect("pool");
    let cancel = CancellationToken::new();
    let poller = tokio::spawn(pool.clone().run(cancel.clone()));
    assert!(pool.runners("g").is_empty());
    let why = trouble_of(&pool, "g").await;
    assert!(
        why.contains("FN_NPM_ADDRESS") && why.contains("cannot be reached"),
        "{why}"
    );
    assert!(
        !why.contains(&closed),
        "the npm's address is no client's to know: {why}"
    );
    stop_pool(cancel, poller).await;

    // An npm that answers UNAVAILABLE itself (starting, relearning its groups after a
    // restart) runs: the message says so, not that it cannot be reached.
    let (state, _adverts) = NpmState::new();
    state.set("g", &["127.0.0.1:7201"]);
    state.failing.store(true, Ordering::SeqCst);
    let (server, pool, cancel, poller) = start_pool(&tls, &state).await;
    assert!(pool.runners("g").is_empty());
    let why = trouble_of(&pool, "g").await;
    assert!(
        why.contains("it answers that it has none yet") && !why.contains("cannot be reached"),
        "{why}"
    );
    state.failing.store(false, Ordering::SeqCst);
    wait_for_list(&pool, "g", &["127.0.0.1:7201"]).await;
    assert_eq!(pool.list_trouble("g"), None);
    stop_pool(cancel, poller).await;
    server.stop().await;
}

/// Waits until the fake npm has been asked for `group` `count` times.
async fn asked_at_least(state: &NpmState, group: &str, count: usize) {
    let start = tokio::time::Instant::now();
    while state.asked(group) < count {
        assert!(
            start.elapsed() < BOUND,
            "{group} asked for {} times, expected {count}",
            state.asked(group)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A group a catalog reload no longer names is forgotten: no longer fetched (with K such
/// groups, each refresh pass waited on K needless round trips), nothing of it kept; a call
/// of it still placing registers nothing and is told why its list is empty; named again, it
/// is fetched afresh.
#[tokio::test]
async fn a_group_no_longer_named_is_forgotten_and_no_longer_fetched() {
    let pki = TestPki::new();
    let tls = pki.mode();
    let (state, _adverts) = NpmState::new();
    // Without the watch the pool polls every POLL: the intervals come quickly.
    state.no_watch.store(true, Ordering::SeqCst);
    state.set("a", &["127.0.0.1:7301"]);
    state.set("b", &["127.0.0.1:7302"]);
    let (server, pool, cancel, poller) = start_pool(&tls, &state).await;
    assert!(pool.runners("a").is_empty() && pool.runners("b").is_empty());
    wait_for_list(&pool, "a", &["127.0.0.1:7301"]).await;
    wait_for_list(&pool, "b", &["127.0.0.1:7302"]).await;
    let both: BTreeSet<String> = ["a", "b"].map(String::from).into();
    assert_eq!(pool.groups_held(), both);

    pool.retain_groups(&["a"].into());
    // A pass that began before the reload may still ask for b once: its last request is
    // in before the second request for a after the reload, which comes from a later pass.
    asked_at_least(&state, "a", state.asked("a") + 2).await;
    let asked_b = state.asked("b");
    asked_at_least(&state, "a", state.asked("a") + 5).await;
    assert_eq!(
        state.asked("b"),
        asked_b,
        "the npm is still asked for a group no longer named"
    );
    let only_a: BTreeSet<String> = ["a"].map(String::from).into();
    assert_eq!(pool.groups_held(), only_a);
    assert_eq!(addresses(&pool, "a"), ["127.0.0.1:7301"]);

    // A call of b that found its function before the reload: an empty list, the reason,
    // and nothing registered.
    assert!(pool.runners("b").is_empty());
    let _signal = pool.report_signal("b");
    let why = pool.list_trouble("b").expect("a reason");
    assert!(
        why.contains("the catalog no longer names the group"),
        "{why}"
    );
    asked_at_least(&state, "a", state.asked("a") + 3).await;
    assert_eq!(state.asked("b"), asked_b);
    assert_eq!(pool.groups_held(), only_a);

    // Named again: its first call registers it, and its list is fetched anew.
    pool.retain_groups(&["a", "b"].into());
    assert!(pool.runners("b").is_empty());
    wait_for_list(&pool, "b", &["127.0.0.1:7302"]).await;
    assert!(state.asked("b") > asked_b);
    assert_eq!(pool.list_trouble("b"), None);
    assert_eq!(pool.groups_held(), both);

    stop_pool(cancel, poller).await;
    server.stop().await;
}
