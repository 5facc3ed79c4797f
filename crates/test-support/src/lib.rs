//! Helpers for service and system tests: per-test certificates and readiness waits.
//!
//! Fakes of the dataplane's peers (runner, npm, control plane) live next to the traits they
//! implement, in their crates' `testing` modules; this crate holds what every test needs.

pub mod fake_runner;
pub mod logs;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fn_lifecycle::retry::Backoff;
use fn_tls::dev::DevCa;
use fn_tls::{NodeTls, TlsMode};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A CA and one node identity from it, generated for one test.
#[derive(Debug)]
pub struct TestPki {
    pub ca: DevCa,
    pub node: NodeTls,
}

impl TestPki {
    /// A fresh CA and a node certificate for the loopback names.
    ///
    /// # Panics
    /// When certificate generation fails (a broken test environment).
    pub fn new() -> Self {
        fn_tls::install_crypto_provider();
        let ca = DevCa::new("test CA").expect("generate test CA");
        let node = ca.node_tls(&[]).expect("generate node certificate");
        TestPki { ca, node }
    }

    /// The node identity as a daemon would load it.
    pub fn mode(&self) -> TlsMode {
        TlsMode::Mutual(self.node.clone())
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// Polls the standard gRPC health service at `address` until it reports SERVING for `""`.
///
/// # Errors
/// When it does not within `timeout`; the error carries the last failure seen.
pub async fn wait_serving(mode: &TlsMode, address: &str, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last = String::from("never answered");
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(200));
    while start.elapsed() < timeout {
        match health_status(mode, address).await {
            Ok(ServingStatus::Serving) => return Ok(()),
            Ok(other) => last = format!("status {other:?}"),
            Err(e) => last = format!("{e:#}"),
        }
        backoff.sleep().await;
    }
    bail!("{address} not SERVING after {timeout:?}: {last}")
}

/// One health check of service `""` at `address`.
///
/// # Errors
/// When the connection or the RPC fails.
pub async fn health_status(mode: &TlsMode, address: &str) -> anyhow::Result<ServingStatus> {
    let channel = fn_tls::grpc_endpoint(mode, address)?
        .with(|e| {
            e.connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(2))
        })
        .connect()
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .with_context(|| format!("health check of {address}"))?;
    Ok(reply.into_inner().status())
}

/// Path of a binary built by `cargo build` in this workspace (`target/<profile>/<name>`).
/// Service and system tests run the real example functions and daemons from there; `make
/// test` builds them before the tests run.
///
/// # Panics
/// When the binary has not been built, with the command that builds it.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let dir = bin_dir();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path
}

/// The directory cargo puts this workspace's binaries in.
pub fn bin_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("FN_TEST_BIN_DIR") {
        return dir.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        std::path::PathBuf::from,
    );
    target.join("debug")
}

/// The example functions every test may run.
pub const EXAMPLE_FUNCTIONS: [&str; 4] = ["fn-hello", "fn-echo", "fn-sleep", "fn-crash"];

/// Functions only the tests run: `fn-hostile` attacks other functions' instances (the
/// isolation tests). Never in an image.
pub const TEST_FUNCTIONS: [&str; 1] = ["fn-hostile"];

/// A directory any user can traverse, holding copies of the [`EXAMPLE_FUNCTIONS`] and the
/// [`TEST_FUNCTIONS`]: the `FN_FUNCTIONS_DIR` for tests.
///
/// Functions run as an unprivileged user (`nobody` when the tests run as root), who cannot
/// reach `target/` when the checkout sits under a private directory (a home directory, a
/// `mktemp -d`). Copies in the temporary directory always can be reached. They are refreshed
/// when the built binaries change; concurrent test processes replace them atomically.
///
/// # Panics
/// When an example function is not built or the copies cannot be written.
pub fn functions_dir() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        use std::hash::{Hash, Hasher};
        use std::os::unix::fs::PermissionsExt;
        let source_dir = bin_dir();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        source_dir
            .canonicalize()
            .unwrap_or(source_dir)
            .hash(&mut hasher);
        let dir = std::env::temp_dir().join(format!("fn-test-functions-{:016x}", hasher.finish()));
        std::fs::create_dir_all(&dir).expect("create the test functions directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("make the test functions directory traversable");
        for name in EXAMPLE_FUNCTIONS.iter().chain(&TEST_FUNCTIONS) {
            let source = workspace_bin(name);
            let target = dir.join(name);
            let fresh = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let same_size = std::fs::metadata(&source).map(|m| m.len()).ok()
                == std::fs::metadata(&target).map(|m| m.len()).ok();
            if same_size && fresh(&target) >= fresh(&source) {
                continue;
            }
            let partial = dir.join(format!(".{name}.{}", std::process::id()));
            std::fs::copy(&source, &partial).expect("copy an example function");
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))
                .expect("make an example function executable");
            std::fs::rename(&partial, &target).expect("install an example function");
        }
        dir
    })
    .clone()
}

/// Set to `1` to let the tests whose subject this machine cannot provide (root, enforced
/// cgroup limits, namespaces) pass as skipped; otherwise they fail.
pub const ALLOW_SKIP_VAR: &str = "FN_TEST_ALLOW_SKIP";

/// For a test that cannot check what it is about on this machine (`reason` says why): a
/// failure, so that a control never reads as tested where it was not, unless
/// [`ALLOW_SKIP_VAR`] is `1`. Then the skip is written to the process's stderr itself, which
/// the test harness does not capture, so that it shows in a passing run.
///
/// # Panics
/// Unless [`ALLOW_SKIP_VAR`] is `1`, always.
pub fn skip_or_fail(reason: &str) {
    use std::io::Write;
    assert!(
        std::env::var(ALLOW_SKIP_VAR).is_ok_and(|v| v == "1"),
        "cannot run here: {reason} (set {ALLOW_SKIP_VAR}=1 to skip such tests instead)"
    );
    // Where stderr is closed there is no one to tell.
    drop(writeln!(
        std::io::stderr(),
        "SKIPPED ({ALLOW_SKIP_VAR}=1): {reason}"
    ));
}
