//! Mutual TLS for every gRPC hop of the dataplane.
//!
//! - [`TlsArgs`]: the `FN_NODE_CERT*` / `FN_TLS_SERVER_NAME` / `FN_INSECURE` options shared by
//!   all daemons, validated into a [`TlsMode`] before any port is bound.
//! - [`NodeTls`]: the node's certificate, key and CA bundle, checked, and replaceable while
//!   the daemon runs ([`NodeTls::reload`]); rustls configs that use the current set at each
//!   handshake ([`NodeTls::server_config`], [`NodeTls::client_config`]).
//! - [`transport`]: the gRPC sockets: servers accept and clients dial with those configs.
//! - `open`: the connections open under a [`NodeTls`], verified again when trust changes
//!   ([`NodeTls::recheck_connections`]).
//! - `refuse`: a server refuses new calls on a connection retired because its client is no
//!   longer trusted.
//! - [`cork`]: the writer under their HTTP/2 that lets a call's frames leave in one write.
//! - [`watch`]: reloads the files when they change or on SIGHUP, and keeps the expiry gauge.
//! - [`dev`]: generation of a development CA and node certificates (rcgen), used by the
//!   `fn-certs` tool, the demo, compose and tests.

mod channel;
pub mod cork;
mod details;
pub mod dev;
mod dynamic;
pub mod expiry;
mod material;
mod open;
mod refuse;
pub mod transport;
pub mod watch;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;

pub use channel::DirectChannel;
pub use details::{StrippedBody, WithoutStatusDetails};
use material::{Check, Material, Origin, Pems};
pub use open::{CONTROL_GRACE, RENEW_AHEAD, RETIRE_GRACE, Recheck};
pub use refuse::{RefuseRetired, RefuseRetiredLayer};
pub use transport::{
    CONNECTION_WINDOW, GrpcConn, GrpcConnectInfo, GrpcEndpoint, GrpcIncoming, GrpcServer,
    GrpcServerLayer, LOCAL_ERROR_RESETS, MAX_FRAME_SIZE, RESET_STREAMS_REMEMBERED, STREAM_WINDOW,
    grpc_endpoint, grpc_incoming, grpc_incoming_sharded, grpc_server, peer_certificate,
};

/// Installs the process-wide rustls crypto provider (ring). Call once at start, before any
/// TLS config is used; calling again is harmless.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _already_installed = crypto_provider().install_default();
}

/// ring with every one of its cipher suites, AES-128-GCM offered first.
///
/// rustls offers AES-256-GCM first. Every body byte is sealed once and opened once per hop,
/// and AES-128 runs 10 rounds where AES-256 runs 14: 16 KiB records seal 1.2 × as fast
/// (11.8 against 9.8 GB/s with VAES), and AES-GCM's share of both daemons' CPU on 1 MiB
/// calls falls from 13.3% to 11.5% (docs/performance-log.md, session 19). 128-bit keys are
/// what TLS 1.3 requires every implementation to support (RFC 8446, 9.1). Servers follow
/// the client's order, so a peer that prefers AES-256 still gets it.
#[must_use]
pub fn crypto_provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort keeps rustls's order among the rest.
    provider
        .cipher_suites
        .sort_by_key(|suite| !is_aes_128_gcm(suite.suite()));
    provider
}

fn is_aes_128_gcm(suite: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite as S;
    matches!(
        suite,
        S::TLS13_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}

/// TLS options shared by every daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) this node presents, to servers and to clients.
    #[arg(long, env = "FN_NODE_CERT")]
    pub node_cert: Option<PathBuf>,
    /// PEM private key of FN_NODE_CERT.
    #[arg(long, env = "FN_NODE_CERT_KEY")]
    pub node_cert_key: Option<PathBuf>,
    /// PEM CA certificate that peers' certificates must chain to.
    #[arg(long, env = "FN_NODE_CERT_AUTHORITY")]
    pub node_cert_authority: Option<PathBuf>,
    /// Server name to verify in peers' certificates instead of the host in their address.
    #[arg(long, env = "FN_TLS_SERVER_NAME", value_parser = parse_server_name)]
    pub tls_server_name: Option<String>,
    /// Use plaintext gRPC instead of mutual TLS. For local experiments only.
    #[arg(long, env = "FN_INSECURE", default_value_t = false,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
    /// How often the certificate files are checked for a replacement (SIGHUP checks at
    /// once); `0s` checks only on SIGHUP.
    #[arg(long, env = "FN_TLS_RELOAD_INTERVAL", default_value = "10s",
          value_parser = parse_reload_interval)]
    pub tls_reload_interval: Duration,
    /// How long a connection whose peer no longer verifies (its CA left the bundle, or its
    /// certificate expired) is kept for the calls on it before it is closed.
    #[arg(long, env = "FN_TLS_RETIRE_GRACE", default_value = "10m",
          value_parser = parse_interval)]
    pub tls_retire_grace: Duration,
}

/// A name every dial can verify a peer's certificate against: checked at start, not at each
/// connection (where an empty or malformed name failed every one).
fn parse_server_name(s: &str) -> Result<String, String> {
    rustls::pki_types::ServerName::try_from(s)
        .map_err(|e| format!("{s:?} is not a DNS name or an IP address ({e})"))?;
    Ok(s.to_owned())
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let interval =
        humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 10s, 1m, 0s)"))?;
    if interval > fn_lifecycle::config::MAX_DURATION {
        // A retirement's deadline is the instant it was seen plus the grace.
        return Err(format!(
            "{s:?} is longer than 100 years, the most any setting takes"
        ));
    }
    Ok(interval)
}

/// The shortest `FN_TLS_RELOAD_INTERVAL` but `0s`: each check reads every certificate file.
const MIN_RELOAD_INTERVAL: Duration = Duration::from_millis(100);

fn parse_reload_interval(s: &str) -> Result<Duration, String> {
    let interval = parse_interval(s)?;
    if !interval.is_zero() && interval < MIN_RELOAD_INTERVAL {
        // "1ms" would read the files a thousand times a second.
        return Err(format!(
            "{s:?} is shorter than 100ms, the shortest accepted (each check reads every \
             certificate file); use e.g. 10s, or 0s to check only on SIGHUP"
        ));
    }
    Ok(interval)
}

/// How a daemon talks gRPC.
#[derive(Debug, Clone)]
pub enum TlsMode {
    /// Mutual TLS with the loaded material.
    Mutual(NodeTls),
    /// Plaintext; only with an explicit `FN_INSECURE=true`.
    Insecure,
}

impl TlsMode {
    /// The node material, unless plaintext.
    pub fn node(&self) -> Option<&NodeTls> {
        match self {
            TlsMode::Mutual(tls) => Some(tls),
            TlsMode::Insecure => None,
        }
    }
}

/// A configuration error: names the variable, what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{var}: required for mutual TLS (or set FN_INSECURE=true for plaintext gRPC)")]
    Missing { var: &'static str },
    #[error("{var}: file not found: {}", path.display())]
    NotFound { var: &'static str, path: PathBuf },
    #[error("{var}: cannot read {}: {source}", path.display())]
    Unreadable {
        var: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{var}: {}: {reason}", path.display())]
    Invalid {
        var: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// A read of the files that has not returned within the watch's bound (a hung network
    /// or secrets mount); another is started only once it returns.
    #[error(
        "{var}: reading {} has not finished after {}; the certificates in use are kept, and \
         the files are read again once that read returns (a hung network or secrets mount?)",
        path.display(),
        humantime::format_duration(*waited)
    )]
    Stalled {
        var: &'static str,
        path: PathBuf,
        waited: Duration,
    },
    /// A read of the files that could not be made off the runtime: no thread could be
    /// started for it, or it panicked. Not made on a runtime thread instead, where a hung
    /// mount would stall every call; the next check tries again.
    #[error(
        "{var}: {} was not read: {reason}; the certificates in use are kept, and the files \
         are read again at the next check",
        path.display()
    )]
    NotRead {
        var: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("FN_INSECURE=true conflicts with {var}: unset one of them")]
    Conflict { var: &'static str },
}

impl TlsArgs {
    /// Validates the options and loads the PEM files.
    ///
    /// # Errors
    /// A [`TlsError`] naming the variable when a file is missing, unreadable or not usable
    /// (no PEM, a key that does not match the certificate), or when neither certificates nor
    /// `FN_INSECURE` are given.
    pub fn load(&self) -> Result<TlsMode, TlsError> {
        let given = [
            ("FN_NODE_CERT", &self.node_cert),
            ("FN_NODE_CERT_KEY", &self.node_cert_key),
            ("FN_NODE_CERT_AUTHORITY", &self.node_cert_authority),
        ];
        if self.insecure {
            if let Some((var, _)) = given.iter().find(|(_, v)| v.is_some()) {
                return Err(TlsError::Conflict { var });
            }
            return Ok(TlsMode::Insecure);
        }
        let mut paths = Vec::with_capacity(3);
        for (var, path) in given {
            paths.push(path.clone().ok_or(TlsError::Missing { var })?);
        }
        let [cert, key, ca]: [PathBuf; 3] = paths.try_into().map_err(|_| TlsError::Missing {
            var: "FN_NODE_CERT",
        })?;
        let tls = NodeTls::load(Origin::Files { cert, key, ca })?;
        Ok(TlsMode::Mutual(match &self.tls_server_name {
            Some(name) => tls.with_server_name(name.clone()),
            None => tls,
        }))
    }
}

/// A node's TLS material: its certificate and key, and the CA bundle it trusts.
///
/// Clones share the material. [`NodeTls::reload`] replaces it for every clone at once: the
/// rustls configs made from it resolve the certificate and verify peers through the current
/// set at each handshake, so new connections use new material while open ones keep going
/// as long as their peer still verifies ([`NodeTls::recheck_connections`]).
#[derive(Clone)]
pub struct NodeTls {
    shared: Arc<Shared>,
    server_name: Option<String>,
}

struct Shared {
    current: RwLock<Arc<Material>>,
    origin: Origin,
    provider: Arc<CryptoProvider>,
    /// The connections open under this material, for [`NodeTls::recheck_connections`].
    open: Arc<open::OpenConnections>,
    /// The variable whose file is being read, while it is: names a read that hangs.
    reading: Mutex<Option<&'static str>>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("NodeTls")
            .field("origin", &self.shared.origin)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The outcome of a [`NodeTls::reload`] that kept going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// The files hold what is already in use.
    Unchanged,
    /// A new set is in use for new handshakes.
    Replaced,
}

impl NodeTls {
    /// Builds node material from PEM bytes (tests and tools; daemons use [`TlsArgs::load`]).
    ///
    /// # Errors
    /// When a PEM does not parse or the key does not match the certificate.
    pub fn from_pem(cert: Vec<u8>, key: Vec<u8>, ca: Vec<u8>) -> Result<Self, TlsError> {
        Self::from_pems(Pems { cert, key, ca }, Origin::Memory)
    }

    fn load(origin: Origin) -> Result<Self, TlsError> {
        let pems = origin.read()?.ok_or(TlsError::Missing {
            var: "FN_NODE_CERT",
        })?;
        Self::from_pems(pems, origin)
    }

    fn from_pems(pems: Pems, origin: Origin) -> Result<Self, TlsError> {
        let provider = Arc::new(crypto_provider());
        let material = Material::parse(pems, &origin, &provider, Check::Start)?;
        Ok(NodeTls {
            shared: Arc::new(Shared {
                current: RwLock::new(Arc::new(material)),
                origin,
                provider,
                open: Arc::default(),
                reading: Mutex::new(None),
            }),
            server_name: None,
        })
    }

    /// Sets the name verified in server certificates, whatever address is dialled.
    #[must_use]
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Reads the files again and, when they changed, puts the new set in use.
    ///
    /// A replacement must parse, its key must match its certificate, the certificate must
    /// be valid now and chain to the new CA bundle. Otherwise the error names the file and
    /// the reason, and the set in use stays.
    ///
    /// # Errors
    /// A [`TlsError`] for a file that cannot be read or a set that is rejected. Material
    /// built from memory has nothing to reload and answers [`Reloaded::Unchanged`].
    pub fn reload(&self) -> Result<Reloaded, TlsError> {
        let Some(pems) = self.shared.origin.read_noting(&self.shared.reading)? else {
            return Ok(Reloaded::Unchanged);
        };
        if self.current().pems == pems {
            return Ok(Reloaded::Unchanged);
        }
        let material = Material::parse(
            pems,
            &self.shared.origin,
            &self.shared.provider,
            Check::Replacement,
        )?;
        let current = self.current();
        let dropped: Vec<&String> = current
            .names
            .iter()
            .filter(|name| !material.names.contains(name))
            .collect();
        if !dropped.is_empty() {
            // Put in use all the same (dropping a name can be meant), but peers that dial
            // this node by such a name will refuse it from now on.
            tracing::warn!(
                ?dropped,
                names = ?material.names,
                "the new node certificate lacks names the one in use has: peers that dial \
                 this node by them will refuse it"
            );
        }
        *self
            .shared
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(material);
        Ok(Reloaded::Replaced)
    }

    /// Verifies again the peer of every connection open under this material, against the
    /// set in use at `now`: one that no longer verifies is retired (it takes no new calls
    /// from a [`DirectChannel`]) and, `grace` later, at a later check, shut down (the
    /// `open` module's docs say why).
    pub fn recheck_connections(&self, now: SystemTime, grace: Duration) -> Recheck {
        self.shared.open.recheck(&self.current(), now, grace)
    }

    pub(crate) fn open_connections(&self) -> &Arc<open::OpenConnections> {
        &self.shared.open
    }

    /// Whether the files differ from the set in use (a cheap read, no parsing).
    ///
    /// # Errors
    /// When a file cannot be read.
    pub fn changed_on_disk(&self) -> Result<bool, TlsError> {
        Ok(self
            .shared
            .origin
            .read_noting(&self.shared.reading)?
            .is_some_and(|pems| self.current().pems != pems))
    }

    /// `var` and its file.
    pub(crate) fn file(&self, var: &'static str) -> (&'static str, PathBuf) {
        (var, self.shared.origin.file(var))
    }

    /// The variable and file being read now by [`NodeTls::reload`] or
    /// [`NodeTls::changed_on_disk`], if any: names a read that hangs.
    pub(crate) fn reading(&self) -> Option<(&'static str, PathBuf)> {
        let var = (*self
            .shared
            .reading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))?;
        Some((var, self.shared.origin.file(var)))
    }

    /// The end of the validity of the certificate in use: the earliest `notAfter` of the
    /// chain the node presents (its certificate and the intermediates after it), as peers
    /// refuse the chain once any of them has ended.
    pub fn not_after(&self) -> SystemTime {
        self.current().not_after
    }

    /// The end of the validity of the first certificate of the CA bundle in use to expire.
    pub fn ca_not_after(&self) -> SystemTime {
        self.current().ca_not_after
    }

    /// The certificate in use, PEM encoded.
    pub fn cert_pem(&self) -> Vec<u8> {
        self.current().pems.cert.clone()
    }

    /// The certificate in use (the first of its chain), DER encoded.
    pub fn cert_der(&self) -> Vec<u8> {
        self.current()
            .certified
            .cert
            .first()
            .map(|cert| cert.to_vec())
            .unwrap_or_default()
    }

    fn current(&self) -> Arc<Material> {
        Arc::clone(
            &self
                .shared
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// Logs the plaintext warning once at start; call from `main` after logging is set up.
pub fn warn_if_insecure(mode: &TlsMode) {
    if matches!(mode, TlsMode::Insecure) {
        tracing::warn!(
            "FN_INSECURE=true: gRPC runs WITHOUT TLS; peers are not authenticated and traffic \
             is readable on the network. Never use this outside a local experiment."
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn args(dir: &Path) -> TlsArgs {
        TlsArgs {
            node_cert: Some(dir.join("node.pem")),
            node_cert_key: Some(dir.join("node-key.pem")),
            node_cert_authority: Some(dir.join("ca.pem")),
            tls_server_name: None,
            insecure: false,
            tls_reload_interval: Duration::from_secs(10),
            tls_retire_grace: RETIRE_GRACE,
        }
    }

    #[test]
    fn missing_variables_are_named() {
        let mut a = args(Path::new("/nonexistent"));
        a.node_cert = None;
        let err = a.load().expect_err("no cert");
        assert!(
            err.to_string().starts_with("FN_NODE_CERT: required"),
            "{err}"
        );
    }

    #[test]
    fn a_server_name_and_the_intervals_are_checked_at_start() {
        assert_eq!(parse_server_name("fn-node"), Ok("fn-node".to_owned()));
        assert_eq!(parse_server_name("10.0.0.7"), Ok("10.0.0.7".to_owned()));
        for bad in ["", "fn node", "-"] {
            let err = parse_server_name(bad).expect_err(bad);
            assert!(err.contains("not a DNS name or an IP address"), "{err}");
        }
        assert_eq!(parse_interval("0s"), Ok(Duration::ZERO));
        let err = parse_interval("18446744073709551615s").expect_err("overflows a deadline");
        assert!(err.contains("100 years"), "{err}");
        assert_eq!(parse_reload_interval("0s"), Ok(Duration::ZERO));
        assert_eq!(
            parse_reload_interval("100ms"),
            Ok(Duration::from_millis(100))
        );
        let err = parse_reload_interval("1ms").expect_err("a thousand reads a second");
        assert!(err.contains("shorter than 100ms"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = args(Path::new("/nonexistent")).load().expect_err("no file");
        assert_eq!(
            err.to_string(),
            "FN_NODE_CERT: file not found: /nonexistent/node.pem"
        );
    }

    #[test]
    fn insecure_conflicts_with_certificates() {
        let mut a = args(Path::new("/x"));
        a.insecure = true;
        assert!(matches!(a.load(), Err(TlsError::Conflict { .. })));
        let plain = TlsArgs {
            node_cert: None,
            node_cert_key: None,
            node_cert_authority: None,
            tls_server_name: None,
            insecure: true,
            tls_reload_interval: Duration::ZERO,
            tls_retire_grace: RETIRE_GRACE,
        };
        assert!(matches!(plain.load(), Ok(TlsMode::Insecure)));
    }

    #[test]
    fn loads_generated_files_and_rejects_non_pem() {
        let dir = tempfile::tempdir().expect("tempdir");
        dev::write_dev_pki(dir.path(), &["localhost"]).expect("write pki");
        let mode = args(dir.path()).load().expect("loads");
        assert!(matches!(mode, TlsMode::Mutual(_)));

        std::fs::write(dir.path().join("node-key.pem"), "not a key").expect("write");
        let err = args(dir.path()).load().expect_err("not pem");
        assert!(err.to_string().starts_with("FN_NODE_CERT_KEY:"), "{err}");
    }

    /// Logged lines of `run`, at INFO and above.
    fn logged(run: impl FnOnce()) -> String {
        #[derive(Clone)]
        struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Capture(std::sync::Arc::default());
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            // Another test's thread may have cached "never" for a callsite as this
            // subscriber came in.
            tracing::callsite::rebuild_interest_cache();
            run();
        });
        let text = captured
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        String::from_utf8_lossy(&text).into_owned()
    }

    /// A node certificate from another CA than its own bundle's (the wrong `ca.pem`
    /// mounted) is loaded, as before, but said at start: every refusal from a peer would
    /// otherwise read as the peer's fault.
    #[test]
    fn a_certificate_its_own_bundle_does_not_trust_is_warned_of_at_start() {
        let (good, wrong) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        dev::write_dev_pki(good.path(), &["localhost"]).expect("write pki");
        dev::write_dev_pki(wrong.path(), &["localhost"]).expect("write pki");
        let said = logged(|| {
            args(good.path()).load().expect("loads");
        });
        assert!(!said.contains("not valid under"), "{said}");
        std::fs::copy(wrong.path().join("ca.pem"), good.path().join("ca.pem")).expect("copy");
        let said = logged(|| {
            let mode = args(good.path()).load().expect("still loads");
            assert!(matches!(mode, TlsMode::Mutual(_)));
        });
        assert!(
            said.contains("WARN") && said.contains("not valid under this node's own CA bundle"),
            "{said}"
        );
    }

    /// A certificate that is PEM but no certificate inside is the certificate file's fault,
    /// not the key's (the key and certificate are compared by parsing the certificate).
    #[test]
    fn an_unparsable_certificate_is_blamed_on_the_certificate_not_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        dev::write_dev_pki(dir.path(), &["localhost"]).expect("write pki");
        std::fs::write(
            dir.path().join("node.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let err = args(dir.path()).load().expect_err("no certificate inside");
        assert!(err.to_string().starts_with("FN_NODE_CERT:"), "{err}");
        assert!(err.to_string().contains("node.pem"), "{err}");
    }

    #[tokio::test]
    async fn accepted_grpc_connections_have_nodelay_set() {
        use tokio_stream::StreamExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let mut incoming = grpc_incoming(&TlsMode::Insecure, listener).expect("incoming");
        let _client = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let accepted = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.tcp().nodelay().expect("nodelay readable"));
    }
}
