//! Tenant isolation on a real pure-runner started as root with its defaults: each function
//! runs as a uid of its own, and `fn-hostile` (tenant B) attacks a running instance of
//! `fn-hello` (tenant A). Every attempt must fail, and the victim must answer its next call
//! from the same process.
//!
//! Rows not built yet are reported as skipped with the reason, never passed: PID and mount
//! namespaces, and `FN_FUNCTION_NETWORK=none`.

use anyhow::{Context, ensure};
use fn_system_tests::cluster::{Cluster, Setup};

const CATALOG: &str = r#"
[[functions]]
app = "tenant-a"
name = "victim"
route = "/victim"
command = ["fn-hello"]
memory_mb = 64
[functions.config]
DATABASE_PASSWORD = "tenant-a-secret"

[[functions]]
app = "tenant-b"
name = "hostile"
route = "/hostile"
command = ["fn-hostile"]
memory_mb = 64
"#;

/// Two tenants' functions that say which process answered (`X-Fn-Pid`).
const TWO_TENANTS: &str = r#"
[[functions]]
app = "tenant-a"
name = "victim"
route = "/victim"
command = ["fn-hello"]
memory_mb = 64

[[functions]]
app = "tenant-c"
name = "other"
route = "/other"
command = ["fn-echo"]
memory_mb = 64
"#;

/// Every attempt `fn-hostile` makes.
const ATTEMPTS: [&str; 7] = [
    "read its /proc/PID/environ",
    "send it SIGTERM",
    "ptrace-attach to it",
    "connect to its socket",
    "write into its private directory",
    "read the runner's key",
    "list the runner's socket root",
];

/// A one-runner cluster serving `catalog`, its runner started as root with `runner_env`;
/// `None` (the test skips, saying why) when the tests do not run as root.
async fn root_cluster(
    catalog: &str,
    runner_env: &[(&str, &str)],
    why: &str,
) -> anyhow::Result<Option<Cluster>> {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: {why} needs a root runner");
        return Ok(None);
    }
    let cluster = Cluster::start(Setup {
        runners: 1,
        catalog: catalog.into(),
        runner_env: runner_env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Setup::default()
    })
    .await?;
    Ok(Some(cluster))
}

/// The real uid of process `pid` (read as root, by the test).
fn uid_of(pid: u32) -> anyhow::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .context("Uid line")?
        .parse()?)
}

/// `NAME=value` from a process's environment (read as root, by the test).
fn environ_var(pid: u32, name: &str) -> anyhow::Result<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    environ
        .split(|b| *b == 0)
        .find_map(|var| var.strip_prefix(format!("{name}=").as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .with_context(|| format!("no {name} in the environment of {pid}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_function_cannot_reach_another_tenants_instance() -> anyhow::Result<()> {
    let Some(cluster) = root_cluster(CATALOG, &[], "every row (a uid per function)").await? else {
        return Ok(());
    };
    let first = cluster.call("/r/tenant-a/victim", "Ann").await?;
    ensure!(first.status == 200, "victim: {first:?}");
    let victim = first.fn_pid()?;
    let dir = environ_var(victim, "HOME")?;
    let socket = environ_var(victim, "FN_LISTENER")?;
    let socket = socket.trim_start_matches("unix:").to_owned();
    let root = std::path::Path::new(&dir)
        .parent()
        .context("the instance directory has a parent")?
        .display()
        .to_string();
    let key = cluster
        .certs
        .env()
        .into_iter()
        .find(|(k, _)| k == "FN_NODE_CERT_KEY")
        .map(|(_, v)| v)
        .context("the runner's key")?;

    let status = std::fs::read_to_string(format!("/proc/{victim}/status"))?;
    ensure!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])),
        "functions run with no_new_privs:\n{status}"
    );
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{victim}/fd"))?
        .filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .map(|link| link.display().to_string())
        .collect();
    println!("victim's descriptors: {fds:?}");
    ensure!(
        fds.iter()
            .all(|fd| !fd.starts_with(&cluster.certs.dir().display().to_string())),
        "a function holds one of the runner's files open: {fds:?}"
    );
    let target = format!("pid={victim}\ndir={dir}\nsocket={socket}\nkey={key}\nroot={root}\n");
    let attack = cluster.call("/r/tenant-b/hostile", target).await?;
    ensure!(attack.status == 200, "hostile: {attack:?}");
    let report = attack.text();
    println!("fn-hostile against {victim} ({dir}):\n{report}");
    for attempt in ATTEMPTS {
        let line = report
            .lines()
            .find(|l| l.starts_with(attempt))
            .with_context(|| format!("no row for {attempt:?} in\n{report}"))?;
        ensure!(
            line.starts_with(&format!("{attempt}: denied")),
            "tenant B could {attempt}: {line}\n{report}"
        );
    }
    for (row, reason) in [
        (
            "see only its own processes (PID namespace)",
            "not built yet",
        ),
        ("a private /tmp (mount namespace)", "not built yet"),
        (
            "FN_FUNCTION_NETWORK=none: connect to the runner's gRPC port",
            "not built yet",
        ),
    ] {
        println!("skipped: {row}: {reason}");
    }

    let again = cluster.call("/r/tenant-a/victim", "Ann").await?;
    ensure!(
        again.status == 200 && again.text() == "Hello, Ann!\n",
        "the victim's next call: {again:?}"
    );
    ensure!(
        again.fn_pid()? == victim,
        "the victim's instance did not survive"
    );
    ensure!(
        !std::path::Path::new(&dir).join("pwned").exists(),
        "tenant B wrote into tenant A's directory"
    );
    Ok(())
}

/// The same attack against a runner that runs every function as one user (`FN_FUNCTION_USER`):
/// what the uid per function prevents, and what the matrix above would catch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_one_shared_user_a_tenant_reads_and_signals_another() -> anyhow::Result<()> {
    let shared_user = [("FN_FUNCTION_USER", "nobody")];
    let Some(cluster) =
        root_cluster(CATALOG, &shared_user, "running functions as another user").await?
    else {
        return Ok(());
    };
    let first = cluster.call("/r/tenant-a/victim", "Ann").await?;
    ensure!(first.status == 200, "victim: {first:?}");
    let victim = first.fn_pid()?;
    let attack = cluster
        .call("/r/tenant-b/hostile", format!("pid={victim}\n"))
        .await?;
    let report = attack.text();
    for attempt in ["read its /proc/PID/environ", "send it SIGTERM"] {
        ensure!(
            report.contains(&format!("{attempt}: ALLOWED")),
            "with one shared user, {attempt} should succeed:\n{report}"
        );
    }
    ensure!(
        cluster.runners[0]
            .log()
            .contains("tenants are not isolated from each other"),
        "the runner says so at start:\n{}",
        cluster.logs()
    );
    Ok(())
}

/// On a root runner (the default configuration) each function runs as a uid of its own from
/// `FN_FUNCTION_UIDS`, so one tenant cannot read another's environment or signal it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_function_runs_as_a_uid_of_its_own() -> anyhow::Result<()> {
    let Some(cluster) = root_cluster(TWO_TENANTS, &[], "a uid per function").await? else {
        return Ok(());
    };
    let mut uids = Vec::new();
    for path in ["/r/tenant-a/victim", "/r/tenant-c/other"] {
        let reply = cluster.call(path, "who").await?;
        ensure!(reply.status == 200, "{path}: {reply:?}");
        uids.push(uid_of(reply.fn_pid()?)?);
    }
    ensure!(uids[0] != uids[1], "two functions share uid {}", uids[0]);
    ensure!(
        uids.iter().all(|uid| (100_000..=165_535).contains(uid)),
        "uids {uids:?} outside FN_FUNCTION_UIDS"
    );
    ensure!(
        cluster.runners[0]
            .log()
            .contains("each function runs as a uid of its own"),
        "{}",
        cluster.logs()
    );
    Ok(())
}
