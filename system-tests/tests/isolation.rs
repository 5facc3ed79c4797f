//! Tenant isolation on a real pure-runner started as root: each function runs as a uid of its
//! own, and `fn-hostile` (tenant B) attacks a running instance of `fn-hello` (tenant A).
//! Every attempt must fail, and the victim must answer its next call from the same process.
//! The matrix runs twice: with the uid alone, and with the namespaces each instance gets by
//! default (PID, mount, and with `FN_FUNCTION_NETWORK=none` network), where the hostile
//! function also sees no other process, leaves nothing in the runner's `/tmp`, cannot
//! reach the runner's gRPC port, and its instance directory is a tmpfs of its own.

use anyhow::{Context, ensure};
use fn_system_tests::cluster::{Cluster, Setup};
use fn_system_tests::hostile::all_denied;

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
/// `None` when the tests do not run as root and skips are allowed (see
/// [`fn_test_support::skip_or_fail`]).
async fn root_cluster(
    catalog: &str,
    runner_env: &[(&str, &str)],
    why: &str,
) -> anyhow::Result<Option<Cluster>> {
    if !nix::unistd::geteuid().is_root() {
        fn_test_support::skip_or_fail(&format!("{why} needs a root runner"));
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

/// What `fn-hostile` attacks: the victim's instance directory and socket (from its
/// environment, read by the test as root), the runner's socket root and key.
struct Target {
    dir: String,
    socket: String,
    root: String,
    key: String,
}

impl Target {
    fn of(cluster: &Cluster, victim: u32) -> anyhow::Result<Target> {
        let socket = environ_var(victim, "FN_LISTENER")?
            .trim_start_matches("unix:")
            .to_owned();
        let dir = std::path::Path::new(&socket)
            .parent()
            .context("the socket is in the instance directory")?
            .display()
            .to_string();
        let root = std::path::Path::new(&dir)
            .parent()
            .context("the instance directory has a parent")?
            .display()
            .to_string();
        let key = cluster.certs.key_path();
        Ok(Target {
            dir,
            socket,
            root,
            key,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_function_cannot_reach_another_tenants_instance() -> anyhow::Result<()> {
    let Some(cluster) = root_cluster(CATALOG, &[], "every row (a uid per function)").await? else {
        return Ok(());
    };
    let first = cluster.call("/r/tenant-a/victim", "Ann").await?;
    ensure!(first.status == 200, "victim: {first:?}");
    let victim = first.fn_pid()?;
    let Target {
        dir,
        socket,
        root,
        key,
    } = Target::of(&cluster, victim)?;

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
    all_denied(&report, ATTEMPTS)?;
    // Without namespaces (this cluster turns them off) the rest is open; the test below
    // closes it.
    ensure!(
        report.contains("see the runner's processes: ALLOWED"),
        "without a PID namespace every process is listed:\n{report}"
    );

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

/// The host pid of the instance of `app` that `runner` started (its function process,
/// running as a function uid), found in /proc by the test (root): inside its PID namespace
/// its pid is another. Only the runner's descendants count: other tests of this binary run
/// instances of the same app names.
fn host_pid_of(runner: u32, app: &str) -> anyhow::Result<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")?.filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let function_uid = uid_of(pid).is_ok_and(|uid| (100_000..=165_535).contains(&uid));
        if function_uid
            && environ_var(pid, "FN_APP_NAME").is_ok_and(|a| a == app)
            && descends_from(pid, runner)
        {
            found.push(pid);
        }
    }
    ensure!(found.len() == 1, "instances of {app}: {found:?}");
    Ok(found[0])
}

/// Whether `ancestor` is `pid`'s parent, or its parent's, and so on (host pids).
fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    // A chain of parents is short; the bound only guards against a /proc read racing exits.
    for _ in 0..64 {
        let Some(parent) = parent_of(pid) else {
            return false;
        };
        if parent == ancestor {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        pid = parent;
    }
    false
}

/// `pid`'s parent, from /proc/PID/stat (the field after the command, which may hold spaces
/// and parentheses, so read from the last `)`).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn namespace(pid: &str, kind: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))?
        .display()
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_namespaces_a_hostile_function_sees_and_reaches_nothing_of_the_runner()
-> anyhow::Result<()> {
    let namespaces = [
        ("FN_FUNCTION_NAMESPACES", "true"),
        ("FN_FUNCTION_NETWORK", "none"),
    ];
    // Where this machine cannot make namespaces (a container without CAP_SYS_ADMIN), the
    // test fails with the reason, or is skipped saying so where skips are allowed.
    let probe = std::process::Command::new(fn_test_support::workspace_bin("fn-isolate"))
        .args(["--probe", "--net-none"])
        .output()?;
    if !probe.status.success() {
        fn_test_support::skip_or_fail(&format!(
            "namespace rows: {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
        return Ok(());
    }
    // The functions in a directory two levels under /tmp, as `make demo` has them: the
    // private /tmp hides the host's, and the working directory (the functions directory)
    // must not lead back to the host's directory above it.
    let above = tempfile::Builder::new()
        .prefix("fn-isolated")
        .tempdir_in("/tmp")?;
    let functions = above.path().join("functions");
    std::fs::create_dir(&functions)?;
    for dir in [above.path(), functions.as_path()] {
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    for program in ["fn-hello", "fn-hostile"] {
        std::fs::copy(
            fn_test_support::functions_dir().join(program),
            functions.join(program),
        )?;
    }
    let functions_dir = functions.display().to_string();
    let namespaces = [
        namespaces[0],
        namespaces[1],
        ("FN_FUNCTIONS_DIR", functions_dir.as_str()),
    ];
    let Some(cluster) = root_cluster(CATALOG, &namespaces, "namespaces per instance").await? else {
        return Ok(());
    };
    ensure!(
        cluster.runners[0]
            .log()
            .contains("each function instance runs in PID and mount namespaces of its own"),
        "{}",
        cluster.logs()
    );
    let first = cluster.call("/r/tenant-a/victim", "Ann").await?;
    ensure!(first.status == 200, "victim: {first:?}\n{}", cluster.logs());
    let runner_pid = cluster.runners[0].pid().context("the runner's pid")?;
    let victim = host_pid_of(runner_pid, "tenant-a")?;
    let inside = first.fn_pid()?;
    // The config reaches the program under its own name, and the root stages before it
    // (fn-isolate, PID 1 of the namespace) only under the prefix the loader never reads.
    ensure!(environ_var(victim, "DATABASE_PASSWORD")? == "tenant-a-secret");
    let status = std::fs::read_to_string(format!("/proc/{victim}/status"))?;
    let helper: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .context("PPid")?
        .trim()
        .parse()?;
    ensure!(
        uid_of(helper)? == 0 && environ_var(helper, "DATABASE_PASSWORD").is_err(),
        "the root helper {helper} holds the tenant's config under its own name"
    );
    ensure!(environ_var(helper, "FN_ISOLATE_CONFIG_DATABASE_PASSWORD")? == "tenant-a-secret");
    ensure!(
        inside < 10 && inside != victim,
        "the function sees itself with a pid of its own namespace, not the host's {victim}: {first:?}"
    );
    let runner = cluster.runners[0].pid().context("runner pid")?.to_string();
    for kind in ["pid", "mnt", "net", "ipc"] {
        ensure!(
            namespace(&victim.to_string(), kind)? != namespace(&runner, kind)?,
            "the instance shares the runner's {kind} namespace"
        );
    }
    // Shared memory and /var/tmp are the instance's own, gone with it: a file system of
    // their own (a device number the runner's do not have).
    let device = |pid: &str, dir: &str| -> anyhow::Result<Option<String>> {
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
        Ok(mounts
            .lines()
            .rfind(|l| l.split(' ').nth(4) == Some(dir))
            .and_then(|l| l.split(' ').nth(2))
            .map(str::to_owned))
    };
    for dir in ["/dev/shm", "/var/tmp", "/run/lock", "/dev/mqueue"] {
        if std::path::Path::new(dir).is_dir() {
            let theirs = device(&victim.to_string(), dir)?;
            ensure!(
                theirs.is_some() && theirs != device(&runner, dir)?,
                "{dir} is not a file system of the instance's own ({theirs:?})"
            );
        }
    }
    // The function's working directory is entered in its own tree: `..` of it is on the
    // private /tmp, not the host's directory above the functions (the inherited one was).
    use std::os::unix::fs::MetadataExt as _;
    let cwd = std::fs::read_link(format!("/proc/{victim}/cwd"))?;
    ensure!(cwd == functions, "working directory {}", cwd.display());
    let theirs = std::fs::metadata(format!("/proc/{victim}/cwd/.."))?;
    let host = std::fs::metadata(above.path())?;
    ensure!(
        (theirs.dev(), theirs.ino()) != (host.dev(), host.ino()),
        "the function's working directory {} leads to the host's {}",
        cwd.display(),
        above.path().display()
    );
    let Target {
        dir,
        socket,
        root,
        key,
    } = Target::of(&cluster, victim)?;
    let marker = format!("/tmp/fn-hostile-was-here-{}", std::process::id());
    let grpc = &cluster.runners[0].address;
    let target = format!(
        "pid={victim}\ndir={dir}\nsocket={socket}\nkey={key}\nroot={root}\nmarker={marker}\ngrpc={grpc}\n"
    );
    let attack = cluster.call("/r/tenant-b/hostile", target).await?;
    ensure!(
        attack.status == 200,
        "hostile: {attack:?}\n{}",
        cluster.logs()
    );
    let report = attack.text();
    println!("fn-hostile in its namespaces against {victim} ({dir}):\n{report}");
    all_denied(
        &report,
        ATTEMPTS.into_iter().chain([
            "see the runner's processes",
            "connect to the runner's gRPC port",
        ]),
    )?;
    ensure!(
        !std::path::Path::new(&marker).exists(),
        "a file the function wrote in its /tmp reached the runner's /tmp"
    );

    let again = cluster.call("/r/tenant-a/victim", "Ann").await?;
    ensure!(
        again.status == 200 && again.text() == "Hello, Ann!\n",
        "the victim's next call: {again:?}"
    );
    ensure!(
        host_pid_of(runner_pid, "tenant-a")? == victim,
        "the victim's instance did not survive"
    );

    // The instance's directory is a tmpfs of its own (what it writes there is memory,
    // charged to it), mounted in the runner's own mount namespace: not in the host's (here,
    // the test's), whose mount table does not grow with instances.
    ensure!(
        mount_type(&format!("/proc/{runner_pid}/mountinfo"), &dir)?.as_deref() == Some("tmpfs"),
        "{dir} is not a tmpfs in the runner's mount namespace"
    );
    ensure!(
        mount_type("/proc/self/mountinfo", &dir)?.is_none(),
        "{dir} is mounted in the host's mount namespace"
    );

    // A runner killed outright takes its instances' namespaces with it.
    let mut cluster = cluster;
    cluster.kill_runner(0).await?;
    let start = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{victim}")).exists() {
        ensure!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "instance {victim} outlived its runner"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Their directories are plain directories in the host's mount namespace, which the
    // runner that takes the socket root again (or the npm, removing a runner's socket
    // directory) removes.
    ensure!(
        mount_type("/proc/self/mountinfo", &dir)?.is_none(),
        "{dir} is mounted in the host's mount namespace after its runner was killed"
    );
    cluster.restart_runner(0).await?;
    let start = std::time::Instant::now();
    while std::path::Path::new(&dir).exists() {
        ensure!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "{dir} left by the killed runner is still there\n{}",
            cluster.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The type of the file system mounted on `dir` in the mount namespace whose table
/// `mountinfo` is (`/proc/<pid>/mountinfo`), if one is.
fn mount_type(mountinfo: &str, dir: &str) -> anyhow::Result<Option<String>> {
    let mounts = std::fs::read_to_string(mountinfo)?;
    Ok(mounts.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let after = fields.iter().position(|f| *f == "-")?;
        (fields.get(4) == Some(&dir))
            .then(|| fields.get(after + 1).map(|t| (*t).to_owned()))
            .flatten()
    }))
}

/// A closed network the runner cannot give is a configuration error, not a silent open one.
#[tokio::test]
async fn function_network_none_without_namespaces_stops_the_runner_at_start() -> anyhow::Result<()>
{
    let certs = fn_system_tests::Certs::new()?;
    let (status, log) = fn_system_tests::run_to_exit(
        "pure-runner",
        &fn_system_tests::merge(&[
            &certs.env(),
            &fn_system_tests::env(&[
                ("FN_LISTEN_ADDR", "127.0.0.1"),
                ("FN_GRPC_PORT", &fn_system_tests::free_port()?.to_string()),
                (
                    "FN_FUNCTIONS_DIR",
                    &fn_test_support::functions_dir().display().to_string(),
                ),
                ("FN_MAX_MEMORY_MB", "256"),
                ("FN_FUNCTION_NETWORK", "none"),
                ("FN_FUNCTION_NAMESPACES", "false"),
            ]),
        ]),
    )
    .await?;
    ensure!(!status.success(), "the runner started: {log}");
    ensure!(
        log.contains("FN_FUNCTION_NETWORK=none needs FN_FUNCTION_NAMESPACES=true"),
        "{log}"
    );
    Ok(())
}

/// Under a narrow umask (an operator's 027 or 077) the directories fn-isolate makes in the
/// private `/tmp` to bind an instance's directory back stay traversable: they were made
/// 0711 less the umask, and the function could not reach its own directory (every call
/// "did not open its listener").
#[test]
fn under_a_narrow_umask_the_function_reaches_its_own_directory() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        fn_test_support::skip_or_fail("fn-isolate's private mounts need root");
        return Ok(());
    }
    let isolate = fn_test_support::workspace_bin("fn-isolate");
    let probe = std::process::Command::new(&isolate)
        .arg("--probe")
        .output()?;
    if !probe.status.success() {
        fn_test_support::skip_or_fail(&format!(
            "namespaces: {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
        return Ok(());
    }
    let root = tempfile::Builder::new()
        .prefix("fn-umask")
        .tempdir_in("/tmp")?;
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )?;
    let instance = root.path().join("runner").join("instance");
    std::fs::create_dir_all(&instance)?;
    std::fs::set_permissions(
        root.path().join("runner"),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )?;
    std::fs::write(instance.join("f"), "its own")?;
    let nobody = nix::unistd::Uid::from_raw(65534);
    let nogroup = nix::unistd::Gid::from_raw(65534);
    for path in [instance.clone(), instance.join("f")] {
        nix::unistd::chown(&path, Some(nobody), Some(nogroup))?;
    }
    for umask in ["027", "077"] {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "umask {umask}; exec \"$0\" --uid 65534 --gid 65534 --keep \"$1\" -- /bin/cat \"$1/f\""
            ))
            .arg(&isolate)
            .arg(&instance)
            .current_dir("/")
            .output()?;
        anyhow::ensure!(
            out.status.success() && out.stdout == b"its own",
            "umask {umask}: {:?} {} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
