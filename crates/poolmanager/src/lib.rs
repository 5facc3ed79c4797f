//! The npm (node pool manager): keeps each LB group's runner fleet sized to demand.
//!
//! Layout:
//! - [`config`]: the npm's `FN_*` options for the control plane and scaling.
//! - [`demand`]: the latest capacity advert of every live LB, per group; purging of LBs
//!   that went silent.
//! - [`predictor`]: the [`Predictor`](predictor::Predictor) trait and the default windowed
//!   predictor (up at once, down after a quiet window).
//! - [`control_plane`]: the [`ControlPlane`](control_plane::ControlPlane) trait and the
//!   `static` and `process` implementations.
//! - [`manager`]: the control loop (load, purge, scale, drain, remove, publish).
//! - [`metrics`]: the Prometheus metric families (runners, demand, LBs per group;
//!   provisions, removals, purges), registered into the registry passed to
//!   [`ControlLoop::new`].
//! - [`order`]: the order in which each group's runners are published (appended on a join,
//!   swap-removed on a leave, so that the LBs' consistent hashing moves few functions).
//! - [`service`]: the gRPC services the LBs call.
//! - [`probe`]: asking runners how many calls they have in flight, and following their health
//!   (a runner that drains on its own).

pub mod config;
pub mod control_plane;
pub mod demand;
pub mod manager;
pub mod metrics;
pub mod order;
pub mod predictor;
pub mod probe;
pub mod service;

pub use manager::{ControlLoop, ManagerConfig, Shared};
pub use metrics::NpmMetrics;
pub use service::NpmService;
