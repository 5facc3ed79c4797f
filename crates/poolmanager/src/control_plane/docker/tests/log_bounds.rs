//! The log bounds of runner containers and services, as the engines send them to a fake
//! Engine API on a unix socket: a runner's stderr carries every line its functions write,
//! and the engine's default `json-file` keeps all of it.

use std::sync::Mutex;

use tokio::net::UnixListener;

use super::fake_api::{Answer, Request, client, serve};
use super::*;

/// What the fake Engine API answers a runner's creation and start, container or service.
fn answer(_: &str, path: &str) -> Answer {
    let (status, answer) = if path.contains("/containers/create") {
        ("201 Created", r#"{"Id":"runner-1","Warnings":[]}"#)
    } else if path.contains("/start") {
        ("204 No Content", "")
    } else if path.contains("/services/create") {
        ("201 Created", r#"{"ID":"runner-svc"}"#)
    } else {
        ("404 Not Found", r#"{"message":"not in the fake"}"#)
    };
    (status, answer.to_owned())
}

/// Runs one runner through the engine `make` builds on a client of the fake API, and gives
/// the body of the request whose path has `create`.
async fn created_body<E: Engine>(make: impl FnOnce(bollard::Docker) -> E, create: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("docker.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let seen: Arc<Mutex<Vec<Request>>> = Arc::new(Mutex::new(Vec::new()));
    let server = tokio::spawn(serve(listener, answer, Arc::clone(&seen)));
    let engine = make(client(&socket));
    let spec = build_spec(
        &config(),
        &placement(),
        "g",
        "fn-runner-1",
        SystemTime::now(),
    );
    tokio::time::timeout(Duration::from_secs(10), engine.run(&spec))
        .await
        .expect("the fake answers")
        .expect("runner created");
    server.abort();
    let seen = seen.lock().expect("seen lock").clone();
    seen.into_iter()
        .find(|(method, path, _)| method == "POST" && path.contains(create))
        .map(|(_, _, body)| body)
        .expect("a runner was created")
}

/// The JSON object that is `key`'s value in `body` (`{` to its matching `}`; no brace in
/// the strings this looks at), or "" when `key` is not there.
fn object<'a>(body: &'a str, key: &str) -> &'a str {
    let Some(at) = body.find(&format!("\"{key}\":{{")) else {
        return "";
    };
    let start = at + key.len() + 3;
    let mut depth = 0;
    for (i, c) in body[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &body[start..=start + i];
                }
            }
            _ => {}
        }
    }
    ""
}

/// The driver's bounds: rotated at 10 MiB, three files kept.
fn assert_bounded(options: &str, whole: &str) {
    for option in [r#""max-size":"10m""#, r#""max-file":"3""#] {
        assert!(options.contains(option), "{option} not in {whole}");
    }
}

#[tokio::test]
async fn runner_containers_get_a_bounded_json_file_log() {
    let body = created_body(BollardEngine::with_docker, "/containers/create").await;
    let log = object(object(&body, "HostConfig"), "LogConfig");
    assert!(
        log.contains(r#""Type":"json-file""#),
        "no json-file: {body}"
    );
    assert_bounded(object(log, "Config"), &body);
}

#[tokio::test]
async fn runner_services_get_a_bounded_json_file_log() {
    let make = |docker| {
        SwarmEngine::new(
            BollardEngine::with_docker(docker),
            Duration::from_secs(30),
            None,
        )
    };
    let body = created_body(make, "/services/create").await;
    let log = object(object(&body, "TaskTemplate"), "LogDriver");
    assert!(
        log.contains(r#""Name":"json-file""#),
        "no json-file: {body}"
    );
    assert_bounded(object(log, "Options"), &body);
}
