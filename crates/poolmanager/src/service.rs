//! The npm's gRPC services: `NodePoolScaler.AdvertiseCapacity` (LB → npm demand) and
//! `RunnerManager.GetLBGroup` (LB ← npm runner lists). Both only touch [`Shared`].
//!
//! `GetLBGroup` answers `UNAVAILABLE` until the control loop has loaded the runner set from
//! the control plane: a just-started npm does not know the lists yet, and the LBs keep their
//! last known list on an error but would drop every runner on an empty answer. For the same
//! reason a group absent from the membership is answered `UNAVAILABLE` while a restarted
//! npm relearns its groups from the adverts (see `Shared::published_group`).

use std::sync::Arc;

use fn_protocol::poolmanager::node_pool_scaler_server::{NodePoolScaler, NodePoolScalerServer};
use fn_protocol::poolmanager::runner_manager_server::{RunnerManager, RunnerManagerServer};
use fn_protocol::poolmanager::{
    CapacitySnapshotList, LbGroupId, LbGroupMembership, MembershipChanged, Runner,
};
use tonic::{Request, Response, Status};

use crate::manager::Shared;

pub use fn_protocol::poolmanager::MAX_GROUPS_PER_ADVERT;
/// Longest LB id accepted (a group is named as in the catalog: [`fn_protocol::valid_name`]).
pub const MAX_ID_LEN: usize = 256;

/// Most streams one connection may have open on the npm at once. An LB holds one
/// membership watch, and beside it, on another connection, asks for up to 16 groups' lists
/// at once (`fn_nodepool::npm_pool::MAX_FETCHES_IN_FLIGHT`), so 16 is the most it uses;
/// without a limit one peer could hold any number of watches, each a task and a receiver.
/// A peer past it waits for one of its streams to end (HTTP/2's
/// `SETTINGS_MAX_CONCURRENT_STREAMS`), as it does at any HTTP/2 server.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// The npm's gRPC server: the dataplane's HTTP/2 settings ([`fn_tls::grpc_server`]) with
/// [`MAX_STREAMS_PER_CONNECTION`]. Feed it [`fn_tls::grpc_incoming`].
pub fn grpc_server() -> fn_tls::GrpcServer {
    fn_tls::grpc_server().max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
}

/// Both npm services over the shared state. Cheap to clone.
#[derive(Debug, Clone)]
pub struct NpmService {
    shared: Arc<Shared>,
}

impl NpmService {
    pub fn new(shared: Arc<Shared>) -> Self {
        NpmService { shared }
    }

    pub fn scaler_server(self) -> NodePoolScalerServer<Self> {
        NodePoolScalerServer::new(self)
    }

    pub fn manager_server(self) -> RunnerManagerServer<Self> {
        RunnerManagerServer::new(self)
    }
}

fn check_id(what: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{what} must be 1-{MAX_ID_LEN} printable characters"
        )));
    }
    Ok(())
}

/// A group is named as in the catalog: the LBs name no other, and the process control
/// plane writes it in a record of blank-separated fields (a group with a blank in it left
/// its runners unadoptable after an npm crash).
fn check_group(what: &str, group: &str) -> Result<(), Status> {
    if !fn_protocol::valid_name(group) {
        return Err(Status::invalid_argument(format!(
            "{what} {:?} must be 1-{} of [A-Za-z0-9._-], as an LB catalog's lb_group",
            group.chars().take(64).collect::<String>(),
            fn_protocol::MAX_NAME_LEN
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl NodePoolScaler for NpmService {
    async fn advertise_capacity(
        &self,
        request: Request<CapacitySnapshotList>,
    ) -> Result<Response<()>, Status> {
        let advert = request.into_inner();
        check_id("lb_id", &advert.lb_id)?;
        if advert.leaving {
            // Its last advert: whatever it still counts is going away with it.
            self.shared.lb_left(&advert.lb_id);
            return Ok(Response::new(()));
        }
        if advert.snapshots.len() > MAX_GROUPS_PER_ADVERT {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_GROUPS_PER_ADVERT} groups per advert"
            )));
        }
        let mut groups = Vec::with_capacity(advert.snapshots.len());
        for s in advert.snapshots {
            check_group("group_id", &s.group_id)?;
            groups.push((s.group_id, s.mem_mb_total));
        }
        self.shared
            .record_advert(&advert.lb_id, groups, tokio::time::Instant::now())
            .map_err(|refused| Status::resource_exhausted(refused.to_string()))?;
        Ok(Response::new(()))
    }
}

#[tonic::async_trait]
impl RunnerManager for NpmService {
    async fn get_lb_group(
        &self,
        request: Request<LbGroupId>,
    ) -> Result<Response<LbGroupMembership>, Status> {
        let group = request.into_inner().id;
        check_group("group id", &group)?;
        let Some(list) = self.shared.published_group(&group) else {
            return Err(Status::unavailable(if self.shared.is_loaded() {
                "the npm (re)started and is relearning its groups from the LBs' adverts; \
                 keep the current list"
            } else {
                "the npm has not loaded its runner set yet; keep the current list"
            }));
        };
        let runners = list
            .iter()
            .map(|r| Runner {
                id: r.id.clone(),
                address: r.address.clone(),
            })
            .collect();
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
        // The current version at once, naming no group (the LB fetches all it uses), then
        // each change with the groups it changed; changes published while the LB was slow
        // to read merge into one message, naming the groups of them all.
        let (changes, closed) = self.shared.watch_membership();
        let shared = Arc::clone(&self.shared);
        let stream = futures::stream::unfold(
            (None, changes, closed),
            move |(sent, mut changes, closed)| {
                let shared = Arc::clone(&shared);
                async move {
                    if sent.is_some() {
                        tokio::select! {
                            () = closed.cancelled() => return None,
                            changed = changes.changed() => changed.ok()?,
                        }
                    }
                    let version = *changes.borrow_and_update();
                    let groups = match sent {
                        Some(sent) => shared.changed_groups(sent, version),
                        None => Vec::new(),
                    };
                    let message = MembershipChanged { version, groups };
                    Some((Ok(message), (Some(version), changes, closed)))
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}
