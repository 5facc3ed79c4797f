//! The lb-agent: takes HTTP invocations, resolves the function, places the call on a runner
//! of the function's LB group and streams bodies both ways.
//!
//! Layout:
//! - [`body`]: the response body type (a leaf every other module may use).
//! - [`catalog`]: the function catalog (TOML), validated, reloadable.
//! - [`reload`]: the catalog's reload on SIGHUP, its file read off the runtime in a bound.
//! - [`dispatch`]: placement: walks the placer's order over the group's runners, retrying
//!   whole passes with backoff until the placer deadline; never re-places a committed call.
//! - [`invoke`]: one call end to end: capacity accounting, placement, request body out,
//!   response back.
//! - [`front`]: the HTTP server (HTTP/1.1 and h2c), routing, `Fn-Call-Id`, JSON errors.
//! - [`client_io`]: a client connection below HTTP: the first-byte and send timeouts and the
//!   lingering close.
//! - [`connections`]: the open client connections and their cap (`FN_MAX_CONNECTIONS`),
//!   which closes the oldest idle connection to make room.
//! - [`leftover`]: the rest of a request body answered before it was read, read and
//!   dropped so that the client's connection stays usable.
//! - [`error`]: the one place where call failures become HTTP statuses.
//! - [`failure_log`]: the log line of a failed call; those the LB answers itself (no
//!   runner took the call) throttled per kind.
//! - [`metrics`]: the Prometheus metric families (calls by outcome, durations, placement),
//!   registered into the registry the binary passes to [`Invoker::new`].

pub mod body;
pub mod catalog;
pub mod client_io;
pub mod connections;
pub mod dispatch;
pub mod error;
pub mod failure_log;
pub mod front;
pub mod invoke;
pub mod leftover;
pub mod metrics;
pub mod reload;

pub use catalog::{Catalog, CatalogHandle, Function};
pub use client_io::ClientLimits;
pub use dispatch::{DispatchConfig, Dispatcher};
pub use front::Front;
pub use invoke::Invoker;
pub use metrics::LbMetrics;
pub use reload::CatalogReload;
