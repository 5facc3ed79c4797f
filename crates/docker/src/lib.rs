//! Reaching the Docker Engine and telling its errors apart, for the two parts of the
//! dataplane that drive it: the npm's `docker` control plane (runner containers) and the
//! runner's `docker` driver (function containers).
//!
//! Only the local transport is built in (a unix socket, no TLS stack, so no second crypto
//! provider in the binaries): `DOCKER_HOST=unix:///path`, else `/var/run/docker.sock`, the
//! engine's own convention.

use std::collections::HashMap;

use bollard::Docker;
use bollard::errors::Error as BollardError;

pub use bollard;

/// The engine socket used when `DOCKER_HOST` does not name one.
pub const DEFAULT_SOCKET: &str = "unix:///var/run/docker.sock";

/// Seconds an Engine API request may take to answer its head. Streams (wait, logs, pull)
/// are not bounded by it once their head has arrived.
const REQUEST_TIMEOUT_SECS: u64 = 60;

/// An Engine API failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The container (or image, network, volume) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Anything else, with what it was about.
    #[error("{0}")]
    Failed(String),
}

/// The engine socket this process uses: `DOCKER_HOST` when it is a `unix://` address, else
/// [`DEFAULT_SOCKET`].
pub fn socket() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| h.starts_with("unix://"))
        .unwrap_or_else(|| DEFAULT_SOCKET.to_owned())
}

/// Connects to the engine at [`socket`], settles on an API version both sides speak (the
/// engine here speaks 1.41, older than bollard's default) and checks that it answers.
///
/// # Errors
/// A message naming the socket and what failed; `DOCKER_HOST` set to anything but a
/// `unix://` address is said so.
pub async fn connect() -> Result<Docker, String> {
    if let Ok(host) = std::env::var("DOCKER_HOST")
        && !host.is_empty()
        && !host.starts_with("unix://")
    {
        return Err(format!(
            "DOCKER_HOST={host}: only unix:// sockets are supported (mount the engine's \
             socket instead)"
        ));
    }
    let socket = socket();
    let docker =
        Docker::connect_with_unix(&socket, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
            .map_err(|e| format!("{socket}: {e}"))?;
    let docker = docker
        .negotiate_version()
        .await
        .map_err(|e| format!("{socket}: {e}"))?;
    docker.ping().await.map_err(|e| format!("{socket}: {e}"))?;
    Ok(docker)
}

/// Label on every function container a runner's docker driver starts, naming that runner
/// (its `FN_RUNNER_ID`): the runner's own leftover sweep and the npm's sweep after a runner
/// container is gone both find its function containers by it.
pub const LABEL_RUNNER: &str = "fn.dataplane.runner";

/// The Engine API list filter for objects labelled `key=value`.
pub fn label_filter(key: &str, value: &str) -> HashMap<&'static str, Vec<String>> {
    HashMap::from([("label", vec![format!("{key}={value}")])])
}

/// Sorts a bollard error about `what` (a container, image, network or volume name):
/// 404 is [`EngineError::NotFound`]; an engine that cannot be reached is said so, naming its
/// socket; everything else keeps the engine's status and message.
pub fn classify(e: BollardError, what: &str) -> EngineError {
    match e {
        BollardError::HyperLegacyError { err } if err.is_connect() => unreachable(what, &err),
        BollardError::DockerResponseServerError {
            status_code: 404, ..
        } => EngineError::NotFound(what.to_owned()),
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => EngineError::Failed(format!("{what}: Docker answered {status_code}: {message}")),
        other => EngineError::Failed(format!("{what}: {other}")),
    }
}

/// Sorts a bollard error of an action on `what` whose 404 is about something else it needs
/// (creating or starting a container: its image, network or volume), as a failure that
/// keeps the engine's message ("No such image: ...").
pub fn classify_action(e: BollardError, what: &str) -> EngineError {
    match e {
        BollardError::HyperLegacyError { err } if err.is_connect() => unreachable(what, &err),
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => EngineError::Failed(format!("{what}: Docker answered {status_code}: {message}")),
        other => EngineError::Failed(format!("{what}: {other}")),
    }
}

/// The error of a request about `what` that could not reach the engine (stopped,
/// restarting, its socket gone): "Error in the hyper legacy client: client error
/// (Connect)" said neither which engine nor what to do.
fn unreachable(what: &str, e: &impl std::fmt::Display) -> EngineError {
    EngineError::Failed(format!(
        "{what}: the Docker engine at {} cannot be reached ({e}): check that it runs and that \
         its socket is there (DOCKER_HOST)",
        socket()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_404_is_not_found_and_other_answers_keep_status_and_message() {
        let missing = BollardError::DockerResponseServerError {
            status_code: 404,
            message: "No such image: nope:1".into(),
        };
        assert_eq!(
            classify(missing, "nope:1"),
            EngineError::NotFound("nope:1".into())
        );
        let conflict = BollardError::DockerResponseServerError {
            status_code: 409,
            message: "name in use".into(),
        };
        let EngineError::Failed(text) = classify(conflict, "fn-a") else {
            panic!("a 409 is not a missing thing");
        };
        assert!(
            text.contains("409") && text.contains("name in use") && text.contains("fn-a"),
            "{text}"
        );
        // Creating a container whose image is gone: the engine says which.
        let no_image = BollardError::DockerResponseServerError {
            status_code: 404,
            message: "No such image: nope:1".into(),
        };
        let EngineError::Failed(text) = classify_action(no_image, "fn-a") else {
            panic!("a 404 of a create is not the container missing");
        };
        assert!(text.contains("No such image: nope:1"), "{text}");
    }
}
