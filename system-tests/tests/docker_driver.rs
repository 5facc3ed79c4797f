//! The docker driver: functions given as images run as hot containers on a real pure-runner,
//! called through a real lb-agent, on this machine's Docker engine.
//!
//! The images are built here, `FROM scratch`, from the statically linked example functions
//! (and `fn-hostile`) that `make test-docker-driver` builds first (`FN_TEST_STATIC_BIN_DIR`):
//! nothing is pulled. Those tests are `#[ignore]`d in a plain `cargo test`, which has neither
//! the static binaries nor, maybe, an engine; `make test` runs them where an engine answers.
//! The test without an engine runs everywhere.
//!
//! Every container a test makes carries its runner's id (`FN_RUNNER_ID`, unique per test), and
//! each test checks that none is left when it ends; the images are removed by the make target.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ::http::Method;
use anyhow::{Context, ensure};
use bytes::Bytes;
use fn_system_tests::cluster::{Cluster, Setup};
use fn_system_tests::hostile::all_denied;
use fn_system_tests::{http, metrics};

/// Label on the images these tests build (the make target removes them by it).
const IMAGE_LABEL: &str = "fn.dataplane.test-image";

/// The images, built once per test process: `(catalog name, static binary)`.
const IMAGES: [(&str, &str); 4] = [
    ("fn-dataplane-test/echo:latest", "fn-echo"),
    ("fn-dataplane-test/hello:latest", "fn-hello"),
    ("fn-dataplane-test/sleep:latest", "fn-sleep"),
    ("fn-dataplane-test/hostile:latest", "fn-hostile"),
];

fn static_bin_dir() -> anyhow::Result<PathBuf> {
    std::env::var_os("FN_TEST_STATIC_BIN_DIR")
        .map(PathBuf::from)
        .context(
            "FN_TEST_STATIC_BIN_DIR is not set: run these tests with `make test-docker-driver`, \
             which builds the static functions they put in images",
        )
}

/// `docker <args>`, bounded; its stdout.
fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .with_context(|| format!("docker {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the test images once (later calls return the first outcome).
fn build_images() -> anyhow::Result<()> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let build = || -> anyhow::Result<()> {
                let bins = static_bin_dir()?;
                for (image, binary) in IMAGES {
                    let context = tempfile::tempdir()?;
                    let source = bins.join(binary);
                    std::fs::copy(&source, context.path().join("function"))
                        .with_context(|| format!("{} (a static build)", source.display()))?;
                    // A directory anyone may write: only the read-only root file system
                    // keeps a function from writing there. In a tar file, because COPY
                    // makes a directory 0755 whatever its mode, and ADD keeps the archive's.
                    let writable = context.path().join("writable");
                    std::fs::create_dir(&writable)?;
                    std::fs::set_permissions(
                        &writable,
                        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
                    )?;
                    let tar = std::process::Command::new("tar")
                        .args(["-cf", "writable.tar", "writable"])
                        .current_dir(context.path())
                        .status()?;
                    anyhow::ensure!(tar.success(), "tar of the writable directory: {tar}");
                    std::fs::write(
                        context.path().join("Dockerfile"),
                        format!(
                            "FROM scratch\nLABEL {IMAGE_LABEL}=1\nCOPY function /function\n\
                             ADD writable.tar /\nENTRYPOINT [\"/function\"]\n"
                        ),
                    )?;
                    let dir = context.path().display().to_string();
                    docker(&["build", "--quiet", "--tag", image, &dir])?;
                }
                Ok(())
            };
            build().map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// An unmodified Fn Python function (the shape `fn init --runtime python` makes).
const PYTHON_FUNC: &str = r#"import io
import json

from fdk import response


def handler(ctx, data: io.BytesIO = None):
    body = data.getvalue().decode("utf-8")
    answer = {"got": body, "method": ctx.Method(), "x-in": ctx.HTTPHeaders().get("x-in")}
    return response.Response(
        ctx,
        response_data=json.dumps(answer, sort_keys=True),
        headers={"Content-Type": "application/json", "X-Python-Fn": "yes"},
        status_code=201,
    )
"#;

/// Debian's Python on this machine (the `python3.11-minimal` and `libpython3.11-stdlib`
/// packages) and what it loads.
const PYTHON: &str = "/usr/bin/python3.11";
const PYTHON_STDLIB: &str = "/usr/lib/python3.11";
const PYTHON_IMAGE: &str = "fn-dataplane-test/python:latest";

/// Copies `path` (following symlinks) to the same path under `root`.
fn copy_into(root: &std::path::Path, path: &std::path::Path) -> anyhow::Result<()> {
    let target = root.join(path.strip_prefix("/").unwrap_or(path));
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(path, &target).with_context(|| format!("copying {}", path.display()))?;
    Ok(())
}

/// `cp -a src dst` (symlinks kept as they are, modes kept).
fn copy_tree(src: &std::path::Path, dst: &std::path::Path) -> anyhow::Result<()> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let status = Command::new("cp").arg("-a").arg(src).arg(dst).status()?;
    ensure!(
        status.success(),
        "cp -a {} {}",
        src.display(),
        dst.display()
    );
    Ok(())
}

/// The shared libraries `binary` loads, by `ldd`.
fn shared_libraries(binary: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// A Python function image made on this machine, from nothing pulled: `FROM scratch` with
/// Debian's Python (its binary, standard library and the libraries they load), the Python FDK
/// as `pip` installed it from PyPI (`make test-deps`), and [`PYTHON_FUNC`], started the way
/// Fn's Python images start (`fdk func.py handler`).
fn build_python_image() -> anyhow::Result<()> {
    let fdk = PathBuf::from(
        std::env::var_os("FN_TEST_PYTHONPATH").unwrap_or_else(|| "/opt/fn-test-python".into()),
    );
    ensure!(
        fdk.join("fdk/__init__.py").is_file(),
        "the Python FDK is not in {}: run `make test-deps`",
        fdk.display()
    );
    ensure!(
        std::path::Path::new(PYTHON).is_file(),
        "{PYTHON} (Debian's python3.11-minimal) is not installed"
    );
    let context = tempfile::tempdir()?;
    let root = context.path().join("root");
    let mut binaries = vec![PathBuf::from(PYTHON)];
    for dir in [
        PathBuf::from(PYTHON_STDLIB).join("lib-dynload"),
        fdk.join("httptools/parser"),
    ] {
        for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "so") {
                binaries.push(path);
            }
        }
    }
    let mut libraries = std::collections::BTreeSet::new();
    for binary in &binaries {
        libraries.extend(shared_libraries(binary)?);
    }
    for library in &libraries {
        copy_into(&root, library)?;
    }
    copy_into(&root, std::path::Path::new(PYTHON))?;
    copy_tree(
        std::path::Path::new(PYTHON_STDLIB),
        &root.join(PYTHON_STDLIB.trim_start_matches('/')),
    )?;
    for package in ["fdk", "iso8601", "httptools", "pbr"] {
        copy_tree(&fdk.join(package), &root.join("opt/fdk").join(package))?;
    }
    std::fs::create_dir_all(root.join("function"))?;
    std::fs::write(root.join("function/func.py"), PYTHON_FUNC)?;
    std::fs::write(
        context.path().join("Dockerfile"),
        format!(
            "FROM scratch\nLABEL {IMAGE_LABEL}=1\nCOPY root/ /\nENV PYTHONPATH=/opt/fdk\n\
             ENTRYPOINT [\"{PYTHON}\", \"-c\", \"import sys; from fdk.scripts.fdk import main; \
             sys.argv[0] = 'fdk'; main()\", \"/function/func.py\", \"handler\"]\n"
        ),
    )?;
    let dir = context.path().display().to_string();
    docker(&["build", "--quiet", "--tag", PYTHON_IMAGE, &dir])?;
    Ok(())
}

/// Ids of the containers (running or not) labelled `label=value`.
fn containers(label: &str, value: &str) -> anyhow::Result<Vec<String>> {
    let filter = format!("label={label}={value}");
    Ok(
        docker(&["ps", "--all", "--quiet", "--no-trunc", "--filter", &filter])?
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// The containers of `function` (an app's function name) under runner `runner_id`.
fn function_containers(runner_id: &str, function: &str) -> anyhow::Result<Vec<String>> {
    let of_runner = containers("fn.dataplane.runner", runner_id)?;
    let of_function = containers("fn.dataplane.function", function)?;
    Ok(of_runner
        .into_iter()
        .filter(|id| of_function.contains(id))
        .collect())
}

/// A runner id no other test (or earlier run) uses.
fn runner_id(test: &str) -> String {
    format!("fntest-{}-{test}", std::process::id())
}

/// Removes the containers of a runner id when dropped: a test that fails half-way (its
/// runner killed with the cluster) leaves nothing on the engine.
struct Leftovers(String);

impl Drop for Leftovers {
    fn drop(&mut self) {
        if let Ok(ids) = containers("fn.dataplane.runner", &self.0)
            && !ids.is_empty()
        {
            let mut args = vec!["rm", "--force", "--volumes"];
            args.extend(ids.iter().map(String::as_str));
            if let Err(e) = docker(&args) {
                eprintln!("cannot remove the test's containers: {e:#}");
            }
        }
    }
}

/// Stops the cluster's runner with SIGTERM and checks that it leaves no container.
async fn stop_and_check_clean(cluster: &mut Cluster, id: &str) -> anyhow::Result<()> {
    let status = cluster.stop_runner(0, Duration::from_secs(20)).await?;
    ensure!(status.success(), "runner exit on SIGTERM: {status}");
    let left = containers("fn.dataplane.runner", id)?;
    ensure!(left.is_empty(), "SIGTERM left containers: {left:?}");
    Ok(())
}

const CATALOG: &str = r#"
[[functions]]
app = "images"
name = "echo"
route = "/echo"
image = "fn-dataplane-test/echo:latest"
memory_mb = 64

[[functions]]
app = "images"
name = "hello"
route = "/hello"
image = "fn-dataplane-test/hello:latest"
memory_mb = 64
[functions.config]
GREETING = "Howdy"

[[functions]]
app = "images"
name = "sleep"
route = "/sleep"
image = "fn-dataplane-test/sleep:latest"
memory_mb = 64
timeout = "2s"

[[functions]]
app = "images"
name = "overlap"
route = "/overlap"
image = "fn-dataplane-test/sleep:latest"
memory_mb = 64
timeout = "30s"

[[functions]]
app = "images"
name = "hostile"
route = "/hostile"
image = "fn-dataplane-test/hostile:latest"
memory_mb = 64

[[functions]]
app = "images"
name = "python"
route = "/python"
image = "fn-dataplane-test/python:latest"
memory_mb = 128

[[functions]]
app = "images"
name = "missing"
route = "/missing"
image = "127.0.0.1:1/fn-dataplane-test/does-not-exist:nope"
memory_mb = 64
"#;

/// One runner (root, as in CI) with the docker driver under `id`, and an LB in front.
async fn cluster(id: &str, extra: &[(&str, &str)]) -> anyhow::Result<Cluster> {
    build_images()?;
    let mut runner_env = vec![("FN_RUNNER_ID".to_owned(), id.to_owned())];
    runner_env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Cluster::start(Setup {
        runners: 1,
        runner_memory_mb: 1024,
        catalog: CATALOG.into(),
        runner_env,
        metrics: true,
        ..Setup::default()
    })
    .await
}

/// A runner whose engine did not answer at start (one slow to come up with its host) runs
/// image functions once it does, without a restart: the engine's socket appears at the
/// runner's `DOCKER_HOST` only after the runner started (before, image functions were
/// refused until a restart).
#[tokio::test]
#[ignore = "needs a Docker engine and the static functions: run by `make test-docker-driver`"]
async fn an_engine_that_answers_after_the_runner_started_is_taken_up() -> anyhow::Result<()> {
    let id = runner_id("late");
    let _leftovers = Leftovers(id.clone());
    let dir = tempfile::tempdir()?;
    let late = dir.path().join("docker.sock");
    let host = format!("unix://{}", late.display());
    let cluster = cluster(&id, &[("DOCKER_HOST", host.as_str())]).await?;
    let refused = cluster.call("/r/images/hello", "early").await?;
    ensure!(
        refused.status >= 500 && refused.text().contains("no Docker engine"),
        "before the engine answers: {} {}",
        refused.status,
        refused.text()
    );
    let engine = std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_owned))
        .unwrap_or_else(|| "/var/run/docker.sock".to_owned());
    std::os::unix::fs::symlink(engine, &late)?;
    let start = std::time::Instant::now();
    loop {
        let reply = cluster.call("/r/images/hello", "late").await?;
        if reply.status == 200 {
            ensure!(reply.text() == "Howdy, late!\n", "{}", reply.text());
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "image functions still refused a minute after the engine answered: {} {}\n{}",
            reply.status,
            reply.text(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ensure!(
        cluster.runners[0]
            .log()
            .contains("a Docker engine answers now"),
        "{}",
        cluster.logs()
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs a Docker engine and the static functions: run by `make test-docker-driver`"]
async fn image_functions_answer_byte_exact_and_hot_containers_are_reused() -> anyhow::Result<()> {
    let id = runner_id("reuse");
    let _leftovers = Leftovers(id.clone());
    let mut cluster = cluster(&id, &[]).await?;

    for size in [0_usize, 1 << 20, 8 << 20] {
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let reply = cluster.call("/r/images/echo", body.clone()).await?;
        ensure!(
            reply.status == 200,
            "echo of {size} B: {} {}",
            reply.status,
            reply.text()
        );
        ensure!(
            reply.body.as_ref() == body.as_slice(),
            "echo of {size} B came back as {} B, or different",
            reply.body.len()
        );
    }

    let mut seen = Vec::new();
    for i in 0..20 {
        let reply = cluster
            .call("/r/images/hello", format!("caller {i}"))
            .await?;
        ensure!(
            reply.status == 200 && reply.text() == format!("Howdy, caller {i}!\n"),
            "call {i}: {} {}",
            reply.status,
            reply.text()
        );
        seen.push(function_containers(&id, "hello")?);
    }
    ensure!(
        seen.iter().all(|ids| ids.len() == 1 && *ids == seen[0]),
        "20 sequential calls did not all use one container: {seen:?}"
    );

    // Each call starts a container and then sleeps; the cold start counts against the
    // call's timeout, so the function has 30 s (with 2 s, two container starts at once on a
    // busy engine took too long). `sleep`'s 2 s are for the 504 below.
    let (a, b) = tokio::join!(
        cluster.call("/r/images/overlap", "800"),
        cluster.call("/r/images/overlap", "800")
    );
    for reply in [a?, b?] {
        ensure!(
            reply.status == 200,
            "overlapping sleep: {} {}",
            reply.status,
            reply.text()
        );
    }
    let sleepers = function_containers(&id, "overlap")?;
    ensure!(
        sleepers.len() == 2,
        "two overlapping calls used {} containers: {sleepers:?}",
        sleepers.len()
    );

    let address = cluster.runners[0]
        .metrics
        .clone()
        .context("runner metrics")?;
    let text = metrics::scrape(&address).await?;
    let starts = metrics::sample(
        &text,
        r#"fn_runner_container_starts_total{app="images",function="hello"}"#,
    );
    ensure!(
        starts == Some(1.0),
        "container starts of hello: {starts:?}:\n{text}"
    );
    let timed = metrics::sample(
        &text,
        r#"fn_runner_container_start_seconds_count{app="images",function="overlap"}"#,
    );
    ensure!(
        timed == Some(2.0),
        "start durations of overlap: {timed:?}:\n{text}"
    );

    stop_and_check_clean(&mut cluster, &id).await
}

#[tokio::test]
#[ignore = "needs a Docker engine and the static functions: run by `make test-docker-driver`"]
async fn containers_are_isolated_limited_and_fail_clearly() -> anyhow::Result<()> {
    let id = runner_id("limits");
    let _leftovers = Leftovers(id.clone());
    let mut cluster = cluster(&id, &[]).await?;
    let key = cluster.certs.key_path();

    // The runner's own pid: a container must not be able to signal or trace it.
    let runner = cluster.runners[0].pid().context("the runner's pid")?;
    let target = format!(
        "pid={runner}\nkey={key}\ngrpc={}\n",
        cluster.runners[0].address
    );
    let reply = cluster.call("/r/images/hostile", target).await?;
    ensure!(
        reply.status == 200,
        "hostile: {} {}",
        reply.status,
        reply.text()
    );
    let report = reply.text();
    all_denied(
        &report,
        [
            "send it SIGTERM",
            "ptrace-attach to it",
            "run as root",
            "write to the root file system",
            "see a network interface other than loopback",
            "read the runner's key",
            "connect to the runner's gRPC port",
            "see the runner's processes",
        ],
    )?;
    ensure!(
        report.contains("run as root: denied (uid 65534)"),
        "not the default user:\n{report}"
    );
    ensure!(
        report.contains("write to the root file system: denied (Read-only file system"),
        "the write was refused for another reason than a read-only root:\n{report}"
    );

    // Past its 64 MB: the kernel kills it, the call is a 502 that says so.
    let reply = cluster
        .call("/r/images/hostile", "allocate_mb=200\n")
        .await?;
    ensure!(
        reply.status == 502 && reply.text().contains("memory"),
        "allocating past the limit: {} {}",
        reply.status,
        reply.text()
    );
    let reply = cluster.call("/r/images/hostile", "allocate_mb=8\n").await?;
    ensure!(
        reply.status == 200,
        "the runner serves on after an OOM kill: {} {}",
        reply.status,
        reply.text()
    );

    // Past its 2 s timeout: 504, and the container is removed.
    let reply = cluster.call("/r/images/sleep", "60000").await?;
    ensure!(
        reply.status == 504,
        "sleep past the timeout: {} {}",
        reply.status,
        reply.text()
    );
    let start = Instant::now();
    while !function_containers(&id, "sleep")?.is_empty() {
        ensure!(
            start.elapsed() < Duration::from_secs(15),
            "the container of a timed-out call is still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An image that exists nowhere: a prompt error that names it. Its registry is a closed
    // port on loopback, so that the pull fails at once (one on Docker Hub waited for DNS
    // and the registry, and a slow resolver could pass the bound below).
    let start = Instant::now();
    let reply = cluster.call("/r/images/missing", "").await?;
    ensure!(
        reply.status >= 500
            && reply
                .text()
                .contains("127.0.0.1:1/fn-dataplane-test/does-not-exist:nope"),
        "a missing image: {} {}",
        reply.status,
        reply.text()
    );
    ensure!(
        start.elapsed() < Duration::from_secs(30),
        "a missing image took {:?}",
        start.elapsed()
    );

    stop_and_check_clean(&mut cluster, &id).await
}

#[tokio::test]
#[ignore = "needs a Docker engine and the static functions: run by `make test-docker-driver`"]
async fn sigterm_leaves_no_container_and_a_restart_after_sigkill_removes_the_orphans()
-> anyhow::Result<()> {
    let id = runner_id("cleanup");
    let _leftovers = Leftovers(id.clone());
    let mut cluster = cluster(&id, &[]).await?;
    let hello = || async {
        let reply = cluster.call("/r/images/hello", "again").await?;
        ensure!(
            reply.status == 200,
            "hello: {} {}",
            reply.status,
            reply.text()
        );
        Ok::<_, anyhow::Error>(())
    };
    hello().await?;
    ensure!(
        function_containers(&id, "hello")?.len() == 1,
        "one hot container"
    );

    cluster.kill_runner(0).await?;
    let orphans = containers("fn.dataplane.runner", &id)?;
    ensure!(
        orphans.len() == 1,
        "a SIGKILLed runner cannot remove its container, so one is left: {orphans:?}"
    );
    cluster.restart_runner(0).await?;
    // Listed before it serves, removed in the background (its start is not held up).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !containers("fn.dataplane.runner", &id)?.is_empty() {
        ensure!(
            std::time::Instant::now() < deadline,
            "the restarted runner did not remove its orphans"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = cluster.runners[0].log();
    ensure!(log.contains("an earlier run of this runner left"), "{log}");

    let reply = cluster.call("/r/images/hello", "again").await?;
    ensure!(
        reply.status == 200,
        "after the restart: {} {}",
        reply.status,
        reply.text()
    );
    ensure!(
        function_containers(&id, "hello")?.len() == 1,
        "a new hot container"
    );

    stop_and_check_clean(&mut cluster, &id).await
}

#[tokio::test]
#[ignore = "needs a Docker engine and the static functions: run by `make test-docker-driver`"]
async fn an_unmodified_python_fdk_function_image_runs() -> anyhow::Result<()> {
    build_python_image()?;
    let id = runner_id("python");
    let _leftovers = Leftovers(id.clone());
    let mut cluster = cluster(&id, &[]).await?;
    for round in 0..2 {
        let reply = http::request(
            &cluster.http,
            Method::POST,
            "/r/images/python",
            &[("x-in", "from the client")],
            Bytes::from_static(b"hello python"),
        )
        .await?;
        ensure!(
            reply.status == 201
                && reply.text()
                    == r#"{"got": "hello python", "method": "POST", "x-in": "from the client"}"#,
            "round {round}: {} {}\n{}",
            reply.status,
            reply.text(),
            cluster.logs()
        );
        ensure!(
            reply.header("x-python-fn").as_deref() == Some("yes")
                && reply.header("content-type").as_deref() == Some("application/json"),
            "round {round}: headers {:?}",
            reply.headers
        );
    }
    ensure!(
        function_containers(&id, "python")?.len() == 1,
        "both calls on one hot container"
    );
    stop_and_check_clean(&mut cluster, &id).await
}

#[tokio::test]
async fn an_image_function_on_a_runner_without_an_engine_is_refused_with_the_reason()
-> anyhow::Result<()> {
    let cluster = Cluster::start(Setup {
        runners: 1,
        catalog: CATALOG.into(),
        runner_env: vec![(
            "DOCKER_HOST".to_owned(),
            "unix:///nonexistent/docker.sock".to_owned(),
        )],
        ..Setup::default()
    })
    .await?;
    let reply = cluster.call("/r/images/hello", "").await?;
    let text = reply.text();
    ensure!(
        reply.status >= 500 && text.contains("no Docker engine") && text.contains("hello:latest"),
        "an image function without an engine: {} {text}",
        reply.status
    );
    let log = cluster.runners[0].log();
    ensure!(
        log.matches("no Docker engine").count() == 1,
        "one warning at start:\n{log}"
    );
    Ok(())
}
