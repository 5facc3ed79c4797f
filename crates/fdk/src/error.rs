//! Why a function could not start serving.
//!
//! Every variant is a startup failure: the FDK does not serve at all, and restarting the process
//! with the same environment fails the same way (except [`Error::Socket`] when the socket
//! directory was briefly unavailable). Failures during a call never surface here: a handler's
//! error becomes a 502 reply to that call and the FDK keeps serving.

use std::io;
use std::path::PathBuf;

/// A function that cannot start: bad contract environment, or no socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `FN_FORMAT` is not set: the process was not started by an Fn runner.
    #[error(
        "FN_FORMAT is not set; this function must be started by an Fn runner with FN_FORMAT=http-stream"
    )]
    FormatMissing,
    /// `FN_FORMAT` names a contract this FDK does not speak (runner misconfiguration).
    #[error("FN_FORMAT is {found:?}, but this FDK speaks only \"http-stream\"")]
    FormatUnsupported {
        /// The value found.
        found: String,
    },
    /// `FN_LISTENER` is not set: the runner did not say where to listen.
    #[error("FN_LISTENER is not set; expected unix:/<dir>/lsnr.sock")]
    ListenerMissing,
    /// `FN_LISTENER` is not `unix:<absolute path of a file>`.
    #[error("FN_LISTENER {value:?} is malformed: {reason}; expected unix:/<dir>/lsnr.sock")]
    ListenerMalformed {
        /// The value found.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `FN_MEMORY` is set but is not a whole number of MB.
    #[error("FN_MEMORY {value:?} is not a whole number of MB")]
    Memory {
        /// The value found.
        value: String,
    },
    /// The listener socket could not be prepared (stale files, bind, chmod or symlink).
    #[error("cannot prepare the listener socket {}: {source}", path.display())]
    Socket {
        /// The file being removed, bound, chmod-ed or linked.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// The async runtime could not be built ([`crate::run`] only).
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
    /// The SIGTERM/SIGINT handlers could not be installed ([`crate::serve`] only).
    #[error("cannot install the shutdown signal handlers: {0}")]
    Signal(#[source] io::Error),
}
