//! The npm's gRPC services over mutual TLS, driven by a control loop with a fake control
//! plane: argument checks, unknown groups, and adverts turning into runner lists.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{FakeControlPlane, FakeProbe, RUNNER_MB};
use fn_poolmanager::service::MAX_GROUPS_PER_ADVERT;
use fn_poolmanager::{ControlLoop, ManagerConfig, NpmService, Shared};
use fn_protocol::poolmanager::node_pool_scaler_client::NodePoolScalerClient;
use fn_protocol::poolmanager::runner_manager_client::RunnerManagerClient;
use fn_protocol::poolmanager::{CapacitySnapshot, CapacitySnapshotList, LbGroupId};
use fn_test_support::TestPki;
use fn_tls::TlsMode;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

struct Npm {
    shared: Arc<Shared>,
    cp: Arc<FakeControlPlane>,
    control: ControlLoop,
    scaler: NodePoolScalerClient<Channel>,
    manager: RunnerManagerClient<Channel>,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Npm {
    async fn start() -> Npm {
        let pki = TestPki::new();
        let tls: TlsMode = pki.mode();
        let shared = Arc::new(Shared::default());
        let service = NpmService::new(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let cancel = CancellationToken::new();
        let incoming = fn_tls::grpc_incoming(&tls, listener).expect("server TLS");
        let router = fn_poolmanager::service::grpc_server()
            .add_service(service.clone().scaler_server())
            .add_service(service.manager_server());
        let shutdown = cancel.clone().cancelled_owned();
        let server = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
                .expect("npm serves");
        });
        let channel = fn_tls::grpc_endpoint(&tls, &address)
            .expect("endpoint")
            .with(|e| e.timeout(Duration::from_secs(5)))
            .connect()
            .await
            .expect("connect over mTLS");
        let cp = Arc::new(FakeControlPlane::default());
        let control = ControlLoop::new(
            Arc::clone(&shared),
            cp.clone(),
            Arc::new(FakeProbe::default()),
            ManagerConfig {
                provision_batch: 4,
                // Short, so that the relearning after the load ends within a test.
                lb_purge_after: RELEARNING / 2,
                tick: RELEARNING / 4,
                ..ManagerConfig::default()
            },
            &mut prometheus_client::registry::Registry::default(),
        );
        Npm {
            shared,
            cp,
            control,
            scaler: NodePoolScalerClient::new(channel.clone()),
            manager: RunnerManagerClient::new(channel),
            cancel,
            server,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("server stops")
            .expect("join");
    }

    async fn get_group(&mut self, group: &str) -> Result<Vec<(String, String)>, tonic::Status> {
        let reply = self
            .manager
            .get_lb_group(LbGroupId { id: group.into() })
            .await?
            .into_inner();
        assert_eq!(reply.group_id, group);
        Ok(reply
            .runners
            .into_iter()
            .map(|r| (r.id, r.address))
            .collect())
    }
}

fn advert(lb_id: &str, groups: &[(&str, u64)]) -> CapacitySnapshotList {
    CapacitySnapshotList {
        ts_unix_ms: 1,
        lb_id: lb_id.into(),
        leaving: false,
        snapshots: groups
            .iter()
            .map(|(g, mb)| CapacitySnapshot {
                group_id: (*g).into(),
                mem_mb_total: *mb,
            })
            .collect(),
    }
}

#[tokio::test]
async fn advertise_capacity_rejects_bad_adverts_with_invalid_argument() {
    let mut npm = Npm::start().await;
    let status = npm
        .scaler
        .advertise_capacity(advert("", &[("g", 128)]))
        .await
        .expect_err("empty lb_id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("lb_id"), "{status:?}");

    let many: Vec<String> = (0..=MAX_GROUPS_PER_ADVERT)
        .map(|i| format!("g{i}"))
        .collect();
    let groups: Vec<(&str, u64)> = many.iter().map(|g| (g.as_str(), 1)).collect();
    let status = npm
        .scaler
        .advertise_capacity(advert("lb1", &groups))
        .await
        .expect_err("too many groups");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let status = npm
        .scaler
        .advertise_capacity(advert("lb1", &[("", 128)]))
        .await
        .expect_err("empty group id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Named as an LB catalog names them: a blank, a control character or a name no
    // catalog accepts is refused (the process control plane's records split on blanks).
    let long = "g".repeat(129);
    for bad in ["a b", "g\n", "..", "grüße", long.as_str()] {
        let status = npm
            .scaler
            .advertise_capacity(advert("lb1", &[(bad, 128)]))
            .await
            .expect_err(bad);
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
        assert!(status.message().contains("group_id"), "{status:?}");
        let status = npm
            .manager
            .get_lb_group(LbGroupId { id: bad.to_owned() })
            .await
            .expect_err(bad);
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
    }

    // None of the rejected adverts counted as demand.
    npm.control.tick().await;
    assert_eq!(npm.cp.provisioned(), 0);
    assert!(npm.shared.membership().is_empty());
    npm.stop().await;
}

/// How long the npm of these tests relearns its groups after loading: its purge interval
/// and two ticks. Long enough that a stalled gRPC round trip (a loaded machine's, seconds
/// at worst) still falls inside it, where the test asks during the relearning.
const RELEARNING: Duration = Duration::from_secs(2);

#[tokio::test]
async fn runner_lists_are_unavailable_until_loaded_then_follow_the_adverts() {
    let mut npm = Npm::start().await;
    // Before the control loop has loaded the runner set, the npm does not know the lists:
    // an empty answer would make the LBs drop their runners.
    *npm.cp.list_fails.lock().expect("lock") = true;
    npm.control.tick().await;
    let status = npm.get_group("g").await.expect_err("not loaded yet");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    *npm.cp.list_fails.lock().expect("lock") = false;
    npm.control.tick().await;
    let loaded = tokio::time::Instant::now();
    let status = npm
        .get_group("unknown")
        .await
        .expect_err("not relearnt from the adverts yet");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("relearning"), "{status:?}");

    // Two LBs want 3 runners in total: the npm provisions them and lists them oldest first.
    npm.scaler
        .advertise_capacity(advert("lb1", &[("g", 2 * RUNNER_MB)]))
        .await
        .expect("advert");
    npm.scaler
        .advertise_capacity(advert("lb2", &[("g", RUNNER_MB), ("h", 0)]))
        .await
        .expect("advert");
    npm.control.tick().await;
    let listed = npm.get_group("g").await.expect("g");
    let ids: Vec<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2", "r3"]);
    assert!(
        listed
            .iter()
            .all(|(_, address)| address.starts_with("127.0.0.1:"))
    );
    tokio::time::sleep_until(loaded + RELEARNING).await;
    assert_eq!(npm.get_group("h").await.expect("h"), []);
    assert_eq!(
        npm.get_group("unknown").await.expect("unknown group"),
        [],
        "once relearnt, an unknown group has no runners"
    );

    // A control plane outage after loading keeps serving the last lists.
    *npm.cp.list_fails.lock().expect("lock") = true;
    npm.control.tick().await;
    assert_eq!(npm.get_group("g").await.expect("g").len(), 3);

    let status = npm.get_group("").await.expect_err("empty group id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    npm.stop().await;
}

#[tokio::test]
async fn the_membership_watch_says_when_the_published_lists_change_and_ends_on_shutdown() {
    let mut npm = Npm::start().await;
    let mut watch = npm
        .manager
        .watch_membership(())
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("stream").expect("at once");
    npm.control.tick().await;
    // Loading the (empty) runner set publishes the lists for the first time.
    let loaded = watch.message().await.expect("stream").expect("loaded");
    assert!(loaded.version > first.version, "{loaded:?} after {first:?}");

    // A tick that changes nothing says nothing.
    npm.control.tick().await;
    let quiet = tokio::time::timeout(Duration::from_millis(200), watch.message()).await;
    assert!(quiet.is_err(), "a message without a change: {quiet:?}");

    // Demand provisions a runner: the lists change, and the watch says so.
    npm.scaler
        .advertise_capacity(advert("lb1", &[("g", RUNNER_MB)]))
        .await
        .expect("advert");
    npm.control.tick().await;
    let changed = watch.message().await.expect("stream").expect("changed");
    assert!(changed.version > loaded.version);
    // The first message and the first publication name no group (the LB fetches all it
    // uses); a change names the groups it changed, for the LB to fetch those alone.
    assert!(
        first.groups.is_empty() && loaded.groups.is_empty(),
        "{first:?} {loaded:?}"
    );
    assert_eq!(changed.groups, ["g"]);
    assert_eq!(npm.get_group("g").await.expect("g").len(), 1);

    // Stopping the npm ends the stream, so its graceful shutdown does not wait for it.
    npm.shared.close_watches();
    let end = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    npm.stop().await;
}

/// One connection holds at most `MAX_STREAMS_PER_CONNECTION` streams at once: one more
/// membership watch waits until one of them ends, and then opens.
#[tokio::test]
async fn one_connection_holds_a_bounded_number_of_streams_and_the_next_waits_its_turn() {
    use fn_poolmanager::service::MAX_STREAMS_PER_CONNECTION;
    let npm = Npm::start().await;
    let mut watches = Vec::new();
    for _ in 0..MAX_STREAMS_PER_CONNECTION {
        let mut manager = npm.manager.clone();
        let mut watch = manager
            .watch_membership(())
            .await
            .expect("watch")
            .into_inner();
        watch.message().await.expect("stream").expect("at once");
        watches.push(watch);
    }
    let mut manager = npm.manager.clone();
    let mut one_more = Box::pin(manager.watch_membership(()));
    let waited = tokio::time::timeout(Duration::from_millis(500), &mut one_more).await;
    assert!(waited.is_err(), "opened past the limit: {waited:?}");
    drop(watches.pop());
    let mut opened = tokio::time::timeout(Duration::from_secs(5), one_more)
        .await
        .expect("opens once a stream ended")
        .expect("watch")
        .into_inner();
    opened.message().await.expect("stream").expect("at once");
    npm.shared.close_watches();
    drop((watches, opened));
    npm.stop().await;
}

/// An LB's last advert (it is shutting down) takes its demand away at once, whatever
/// figures it carries, rather than leaving them to be purged as a silent LB's.
#[tokio::test]
async fn an_lb_that_says_it_is_leaving_takes_its_demand_away_at_once() {
    let mut npm = Npm::start().await;
    npm.control.tick().await;
    npm.scaler
        .advertise_capacity(advert("lb1", &[("g", RUNNER_MB)]))
        .await
        .expect("advert");
    let mut last = advert("lb1", &[("g", RUNNER_MB)]);
    last.leaving = true;
    npm.scaler.advertise_capacity(last).await.expect("advert");
    npm.control.tick().await;
    assert_eq!(
        npm.cp.provisioned(),
        0,
        "no demand is left to provision for"
    );
    npm.stop().await;
}
