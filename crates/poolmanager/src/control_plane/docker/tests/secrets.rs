//! The certificate secrets a swarm runner service gets, through the swarm engine against a
//! fake Engine API on a unix socket: the npm's own service's, found by where they are
//! mounted, else the secrets named as the files.

use std::sync::Mutex;

use tokio::net::UnixListener;

use super::fake_api::{Answer, Request, client, serve};
use super::*;

/// The npm's own service: a task of it mounts the secrets a rotation made (`.2`) at the
/// files' names, and the CA under its own name, as `docker service update --secret-rm
/// fn_node.pem --secret-add source=fn_node.pem.2,target=fn_node.pem` leaves it.
const OWN_SERVICE: &str = r#"{"ID":"npm-svc","Spec":{"Name":"fn_npm","TaskTemplate":{"ContainerSpec":{"Image":"npm","Secrets":[
{"File":{"Name":"fn_ca.pem","UID":"0","GID":"0","Mode":292},"SecretID":"id-ca-1","SecretName":"fn_ca.pem"},
{"File":{"Name":"fn_node.pem","UID":"0","GID":"0","Mode":292},"SecretID":"id-node-2","SecretName":"fn_node.pem.2"},
{"File":{"Name":"/run/secrets/fn_node-key.pem","UID":"0","GID":"0","Mode":256},"SecretID":"id-key-2","SecretName":"fn_node-key.pem.2"}
]}}}}"#;

/// The secrets by name: the first ones, still there (or the rotation's were not named so).
const SECRETS: &str = r#"[
{"ID":"id-ca-1","Spec":{"Name":"fn_ca.pem"}},
{"ID":"id-node-1","Spec":{"Name":"fn_node.pem"}},
{"ID":"id-key-1","Spec":{"Name":"fn_node-key.pem"}}
]"#;

/// What the fake Engine API answers the calls a runner service's creation makes. `own` is
/// what inspecting the npm's service answers (`None`: 404).
fn answer(own: Option<&'static str>, path: &str) -> Answer {
    let (status, answer) = if path.contains("/services/npm-svc") {
        match own {
            Some(own) => ("200 OK", own),
            None => (
                "404 Not Found",
                r#"{"message":"service npm-svc not found"}"#,
            ),
        }
    } else if path.contains("/secrets") {
        ("200 OK", SECRETS)
    } else if path.contains("/services/create") {
        ("201 Created", r#"{"ID":"runner-svc"}"#)
    } else {
        ("404 Not Found", r#"{"message":"not in the fake"}"#)
    };
    (status, answer.to_owned())
}

/// Creates one runner service through a swarm engine whose npm is `own_service`, against
/// the fake API answering `own`, and gives the created spec's secrets as `(target, id,
/// name)` and every request made.
async fn create_runner(
    own_service: Option<&str>,
    own: Option<&'static str>,
) -> (Vec<(String, String, String)>, Vec<Request>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("docker.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server = tokio::spawn(serve(
        listener,
        move |_: &str, path: &str| answer(own, path),
        Arc::clone(&seen),
    ));
    let docker = client(&socket);
    let engine = SwarmEngine::new(
        BollardEngine::with_docker(docker),
        Duration::from_secs(30),
        own_service.map(str::to_owned),
    );
    let mut swarm = config();
    swarm.swarm = Some(SwarmConfig::default());
    swarm.network = Some("fn_backend".into());
    swarm.tls_files = Some(TlsFiles {
        cert: "/run/secrets/fn_node.pem".into(),
        key: "/run/secrets/fn_node-key.pem".into(),
        ca: "/run/secrets/fn_ca.pem".into(),
    });
    let placement = resolve_placement(&swarm, None).expect("placement");
    let spec = build_spec(&swarm, &placement, "g", "fn-runner-1", SystemTime::now());
    tokio::time::timeout(Duration::from_secs(10), engine.run(&spec))
        .await
        .expect("the fake answers")
        .expect("runner service created");
    server.abort();
    let seen = seen.lock().expect("seen lock").clone();
    let (_, _, body) = seen
        .iter()
        .find(|(method, path, _)| method == "POST" && path.contains("/services/create"))
        .expect("a service was created")
        .clone();
    (secret_refs(&body), seen)
}

/// The `(target, id, name)` of each secret reference in a service spec as bollard writes
/// it (fields in their declaration order).
fn secret_refs(body: &str) -> Vec<(String, String, String)> {
    let value = |text: &str, key: &str| -> Option<(String, usize)> {
        let start = text.find(key)? + key.len();
        let len = text[start..].find('"')?;
        Some((text[start..start + len].to_owned(), start + len))
    };
    let mut refs = Vec::new();
    let mut rest = body;
    for _ in 0..10 {
        let Some((target, at)) = value(rest, r#""File":{"Name":""#) else {
            break;
        };
        rest = &rest[at..];
        let (id, at) = value(rest, r#""SecretID":""#).expect("an id");
        rest = &rest[at..];
        let (name, at) = value(rest, r#""SecretName":""#).expect("a name");
        rest = &rest[at..];
        refs.push((target, id, name));
    }
    refs
}

fn secret(target: &str, id: &str, name: &str) -> (String, String, String) {
    (target.to_owned(), id.to_owned(), name.to_owned())
}

/// After a rotation (new secrets mounted at the old files' names), a new runner gets the
/// secrets the npm mounts, not the old ones its files are named after (which may be gone).
#[tokio::test]
async fn runners_get_the_secrets_the_npms_own_service_mounts() {
    let (secrets, seen) = create_runner(Some("npm-svc"), Some(OWN_SERVICE)).await;
    assert_eq!(
        secrets,
        vec![
            secret("fn_node.pem", "id-node-2", "fn_node.pem.2"),
            secret("fn_node-key.pem", "id-key-2", "fn_node-key.pem.2"),
            secret("fn_ca.pem", "id-ca-1", "fn_ca.pem"),
        ]
    );
    assert!(
        !seen.iter().any(|(_, path, _)| path.contains("/secrets")),
        "no secret looked up by name: {seen:?}"
    );
}

/// An npm that is not a service, or whose service is gone (`docker stack rm` under way):
/// the secrets named as its files.
#[tokio::test]
async fn without_a_service_of_its_own_runners_get_the_secrets_named_as_the_files() {
    let by_name = vec![
        secret("fn_node.pem", "id-node-1", "fn_node.pem"),
        secret("fn_node-key.pem", "id-key-1", "fn_node-key.pem"),
        secret("fn_ca.pem", "id-ca-1", "fn_ca.pem"),
    ];
    let (secrets, _) = create_runner(None, Some(OWN_SERVICE)).await;
    assert_eq!(secrets, by_name);
    let (secrets, _) = create_runner(Some("npm-svc"), None).await;
    assert_eq!(secrets, by_name, "the npm's service is gone");
}

/// The matching alone: a file the npm's service does not mount from a secret is looked up
/// by name.
#[test]
fn a_file_the_npms_service_mounts_no_secret_at_is_not_matched() {
    let own = vec![bollard::models::TaskSpecContainerSpecSecrets {
        file: Some(bollard::models::TaskSpecContainerSpecFile {
            name: Some("/run/secrets/fn_node.pem".into()),
            ..Default::default()
        }),
        secret_id: Some("id-node-2".into()),
        secret_name: Some("fn_node.pem.2".into()),
    }];
    let found = own_secrets(&["fn_node.pem".into(), "fn_ca.pem".into()], &own);
    assert_eq!(
        found,
        vec![
            Some(SecretRef {
                target: "fn_node.pem".into(),
                id: "id-node-2".into(),
                name: "fn_node.pem.2".into()
            }),
            None
        ]
    );
}
