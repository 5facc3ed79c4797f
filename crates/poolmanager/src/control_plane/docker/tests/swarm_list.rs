//! The swarm engine's list of runner services, against a fake Engine API on a unix socket
//! that honours the task filters the Engine API 1.41 has (`label`, on the service's labels
//! each task carries, and `service`): states as each service's tasks say, in a bounded
//! number of requests whatever the number of services.

use std::sync::Mutex;

use tokio::net::UnixListener;

use super::fake_api::{Answer, client, decoded, serve};
use super::*;

/// Runner services in the fake swarm, beyond what a list of one request per service's
/// tasks, a few at a time, gave within its bound on a busy manager.
const SERVICES: usize = 150;

/// An Engine API time `secs` seconds into the test's past.
fn stamp(secs: u64) -> String {
    humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs))
        .to_string()
}

/// A task of service `service` created `created` seconds in, last updated `lasted` seconds
/// later, as the Engine API writes it.
fn task(service: &str, n: usize, created: u64, lasted: u64, state: &str, desired: &str) -> String {
    format!(
        r#"{{"ID":"{service}-t{n}","ServiceID":"{service}","CreatedAt":"{}","UpdatedAt":"{}","Status":{{"State":"{state}"}},"DesiredState":"{desired}","Spec":{{}}}}"#,
        stamp(created),
        stamp(created + lasted)
    )
}

/// The tasks of service `id`, the `i`th, by its kind (`i % 6`), and the state they make it:
/// one running; a crash loop (three short-lived failures); a fresh rejection; a crash Swarm
/// is restarting; a clean exit (nothing restarted); no task yet.
fn tasks_of(id: &str, i: usize) -> (Vec<String>, ContainerState) {
    use ContainerState::{Running, Stopped};
    match i % 6 {
        0 => (vec![task(id, 0, 0, 0, "running", "running")], Running),
        1 => (
            vec![
                task(id, 0, 0, 8, "failed", "shutdown"),
                task(id, 1, 8, 9, "failed", "shutdown"),
                task(id, 2, 17, 8, "failed", "shutdown"),
                task(id, 3, 25, 0, "pending", "ready"),
            ],
            Stopped,
        ),
        2 => (
            vec![
                task(id, 0, 0, 5, "rejected", "shutdown"),
                task(id, 1, 5, 0, "pending", "ready"),
            ],
            Stopped,
        ),
        3 => (
            vec![
                task(id, 0, 0, 5, "failed", "shutdown"),
                task(id, 1, 5, 0, "pending", "running"),
            ],
            Running,
        ),
        4 => (vec![task(id, 0, 0, 600, "complete", "shutdown")], Stopped),
        _ => (Vec::new(), Running),
    }
}

/// The fake swarm: services `svc-<i>` named `fn-runner-<i>`, each with its tasks, and the
/// tasks of services removed already (carrying the label).
struct Swarm {
    services: Vec<(String, String, Vec<String>)>,
    gone: Vec<String>,
}

impl Swarm {
    fn new(count: usize) -> Self {
        let services = (0..count)
            .map(|i| {
                let id = format!("svc-{i}");
                let (tasks, _) = tasks_of(&id, i);
                (id, format!("fn-runner-{i}"), tasks)
            })
            .collect();
        // A runner service removed whose task still drains on its node, and one whose
        // task has stopped (Swarm forgets it soon).
        let draining = task("svc-gone", 0, 0, 3_600, "running", "remove").replace(
            r#""Spec":{}"#,
            &format!(
                r#""Spec":{{"ContainerSpec":{{"Env":["FN_GRPC_PORT=9190","FN_RUNNER_ID=fn-runner-gone"],"Labels":{{"{LABEL_ROLE}":"runner","{LABEL_NPM}":"stack_backend"}}}}}}"#
            ),
        );
        Swarm {
            services,
            gone: vec![
                draining,
                task("svc-stopped", 0, 0, 3_600, "shutdown", "remove"),
            ],
        }
    }

    /// What the Engine API answers, filters honoured: `service` (by id or name; an unknown
    /// one is a 404, as the Engine API's) and `label` (every task here carries the npm's).
    fn answer(&self, path: &str) -> Answer {
        let path = decoded(path);
        let json = |items: Vec<&String>| {
            let items: Vec<&str> = items.iter().map(|s| s.as_str()).collect();
            format!("[{}]", items.join(","))
        };
        if path.contains("/services?") || path.ends_with("/services") {
            let labels = format!(
                r#"{{"{LABEL_ROLE}":"runner","{LABEL_NPM}":"stack_backend","{LABEL_GROUP}":"g","{LABEL_CREATED}":"1700000000000","{LABEL_PORT}":"9190"}}"#
            );
            let services: Vec<String> = self
                .services
                .iter()
                .map(|(id, name, _)| {
                    format!(r#"{{"ID":"{id}","Spec":{{"Name":"{name}","Labels":{labels}}}}}"#)
                })
                .collect();
            return ("200 OK", json(services.iter().collect()));
        }
        if path.contains("/tasks") {
            let service = path
                .split(r#""service":[""#)
                .nth(1)
                .and_then(|rest| rest.split('"').next());
            let Some(service) = service else {
                let all = self
                    .services
                    .iter()
                    .flat_map(|(_, _, tasks)| tasks)
                    .chain(&self.gone)
                    .collect();
                return ("200 OK", json(all));
            };
            return match self
                .services
                .iter()
                .find(|(id, name, _)| id == service || name == service)
            {
                Some((_, _, tasks)) => ("200 OK", json(tasks.iter().collect())),
                None => (
                    "404 Not Found",
                    format!(r#"{{"message":"service {service} not found"}}"#),
                ),
            };
        }
        (
            "404 Not Found",
            r#"{"message":"not in the fake"}"#.to_owned(),
        )
    }
}

/// A list of many runner services makes two requests, the tasks of all of them filtered
/// by the npm's label, then the services, and gives each service the state its own tasks
/// make. One request per service's tasks made 151 here. A service removed whose task
/// still runs is reported leaving, by its runner's name; one whose task has stopped, not
/// at all.
#[tokio::test]
async fn a_list_of_many_runner_services_is_two_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("docker.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let swarm = Swarm::new(SERVICES);
    let server = tokio::spawn(serve(
        listener,
        move |_: &str, path: &str| swarm.answer(path),
        Arc::clone(&seen),
    ));
    let engine = SwarmEngine::new(
        BollardEngine::with_docker(client(&socket)),
        Duration::from_secs(30),
        None,
    );
    let listed = tokio::time::timeout(
        Duration::from_secs(10),
        engine.list(LABEL_NPM, "stack_backend"),
    )
    .await
    .expect("the fake answers")
    .expect("listed");
    server.abort();

    assert_eq!(listed.len(), SERVICES + 1);
    let (leaving, listed) = listed.split_last().expect("listed");
    assert_eq!(leaving.name, "fn-runner-gone");
    assert_eq!(leaving.state, ContainerState::Leaving);
    assert_eq!(
        leaving.labels.get(LABEL_ROLE).map(String::as_str),
        Some("runner")
    );
    for (i, container) in listed.iter().enumerate() {
        let (_, expected) = tasks_of(&format!("svc-{i}"), i);
        assert_eq!(container.name, format!("fn-runner-{i}"));
        assert_eq!(
            container.state,
            expected,
            "{} (kind {})",
            container.name,
            i % 6
        );
        assert_eq!(
            container.labels.get(LABEL_NPM).map(String::as_str),
            Some("stack_backend")
        );
    }
    let seen = seen.lock().expect("seen lock").clone();
    let paths: Vec<String> = seen.iter().map(|(_, path, _)| decoded(path)).collect();
    assert_eq!(
        paths.len(),
        2,
        "{} requests: {:?}",
        paths.len(),
        &paths[..3.min(paths.len())]
    );
    assert!(
        paths[0].contains("/tasks")
            && paths[0].contains(r#""label":["fn.dataplane.npm=stack_backend"]"#),
        "{paths:?}"
    );
    assert!(paths[1].contains("/services"), "{paths:?}");
}

/// A task of service `service` that no node can take, made at `created` on the manager's
/// clock: Swarm keeps it pending, meant to run, and says why.
fn unplaceable(service: &str, created: SystemTime) -> String {
    let stamp = humantime::format_rfc3339_nanos(created).to_string();
    format!(
        r#"{{"ID":"{service}-t0","ServiceID":"{service}","CreatedAt":"{stamp}","UpdatedAt":"{stamp}","Status":{{"State":"pending","Err":"no suitable node (scheduling constraints not satisfied on 3 nodes)"}},"DesiredState":"running","Spec":{{}}}}"#
    )
}

/// A task no node takes counts as not coming up once it has waited the bound as the npm
/// timed it, from its first listing, whatever the manager's clock says of its creation: a
/// year before the npm's clock (a manager behind, or an npm ahead), the task is not taken
/// for one that waited a year at its first listing; a year after (the other way round), it
/// is still taken for one that waited once the bound has passed.
#[tokio::test(start_paused = true)]
async fn a_task_no_node_takes_is_timed_on_the_npms_clock_from_its_first_listing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("docker.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let year = Duration::from_secs(365 * 24 * 3_600);
    let now = SystemTime::now();
    let swarm = Swarm {
        services: vec![
            (
                "svc-past".to_owned(),
                "fn-runner-past".to_owned(),
                vec![unplaceable("svc-past", now - year)],
            ),
            (
                "svc-future".to_owned(),
                "fn-runner-future".to_owned(),
                vec![unplaceable("svc-future", now + year)],
            ),
        ],
        gone: Vec::new(),
    };
    let server = tokio::spawn(serve(
        listener,
        move |_: &str, path: &str| swarm.answer(path),
        Arc::new(Mutex::new(Vec::new())),
    ));
    let bound = Duration::from_secs(30);
    let engine = SwarmEngine::new(BollardEngine::with_docker(client(&socket)), bound, None);
    let states = || async {
        let listed = engine
            .list(LABEL_NPM, "stack_backend")
            .await
            .expect("listed");
        listed
            .into_iter()
            .map(|c| (c.name, c.state))
            .collect::<Vec<_>>()
    };
    let all = |state| {
        vec![
            ("fn-runner-past".to_owned(), state),
            ("fn-runner-future".to_owned(), state),
        ]
    };

    assert_eq!(
        states().await,
        all(ContainerState::Running),
        "at the first listing"
    );
    tokio::time::advance(bound - Duration::from_secs(1)).await;
    assert_eq!(
        states().await,
        all(ContainerState::Running),
        "within the bound"
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        states().await,
        all(ContainerState::Stopped),
        "past the bound"
    );
    server.abort();
}
