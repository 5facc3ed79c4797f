//! Mutual TLS for every gRPC hop of the dataplane.
//!
//! - [`TlsArgs`]: the `FN_NODE_CERT*` / `FN_TLS_SERVER_NAME` / `FN_INSECURE` options shared by
//!   all daemons, validated into a [`TlsMode`] before any port is bound.
//! - [`NodeTls`]: the loaded PEM material, turned into tonic server configs (client
//!   certificates required and verified against the CA) and client configs (server verified
//!   against the CA, with an optional server-name override).
//! - [`dev`]: generation of a development CA and node certificates (rcgen), used by the
//!   `fn-certs` tool, the demo, compose and tests.
//!
//! This crate owns no sockets; daemons hand its configs to tonic.

pub mod dev;
pub mod expiry;

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Installs the process-wide rustls crypto provider (ring). Call once at start, before any
/// TLS config is used; calling again is harmless.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
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
    #[arg(long, env = "FN_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Use plaintext gRPC instead of mutual TLS. For local experiments only.
    #[arg(long, env = "FN_INSECURE", default_value_t = false,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
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
    /// URI scheme for client endpoints.
    pub fn scheme(&self) -> &'static str {
        match self {
            TlsMode::Mutual(_) => "https",
            TlsMode::Insecure => "http",
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
    #[error("{var}: {} holds no PEM {what}", path.display())]
    NotPem {
        var: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("FN_INSECURE=true conflicts with {var}: unset one of them")]
    Conflict { var: &'static str },
}

impl TlsArgs {
    /// Validates the options and loads the PEM files.
    ///
    /// # Errors
    /// A [`TlsError`] naming the variable when a file is missing, unreadable or not PEM, or
    /// when neither certificates nor `FN_INSECURE` are given.
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
        let mut pems = Vec::with_capacity(3);
        for (var, path) in given {
            let path = path.as_ref().ok_or(TlsError::Missing { var })?;
            pems.push(read_pem(var, path)?);
        }
        let [cert, key, ca]: [Vec<u8>; 3] = pems.try_into().map_err(|_| TlsError::Missing {
            var: "FN_NODE_CERT",
        })?;
        check_pem(
            "FN_NODE_CERT",
            self.node_cert.as_deref(),
            &cert,
            "CERTIFICATE",
        )?;
        check_pem(
            "FN_NODE_CERT_KEY",
            self.node_cert_key.as_deref(),
            &key,
            "PRIVATE KEY",
        )?;
        check_pem(
            "FN_NODE_CERT_AUTHORITY",
            self.node_cert_authority.as_deref(),
            &ca,
            "CERTIFICATE",
        )?;
        Ok(TlsMode::Mutual(NodeTls {
            cert,
            key,
            ca,
            server_name: self.tls_server_name.clone(),
        }))
    }
}

fn read_pem(var: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            TlsError::NotFound {
                var,
                path: path.to_owned(),
            }
        } else {
            TlsError::Unreadable {
                var,
                path: path.to_owned(),
                source,
            }
        }
    })
}

fn check_pem(
    var: &'static str,
    path: Option<&Path>,
    pem: &[u8],
    what: &'static str,
) -> Result<(), TlsError> {
    let text = String::from_utf8_lossy(pem);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.contains(what));
    if found {
        Ok(())
    } else {
        Err(TlsError::NotPem {
            var,
            path: path.map(Path::to_owned).unwrap_or_default(),
            what,
        })
    }
}

/// PEM material of one node: its certificate and key, and the CA it trusts.
#[derive(Clone)]
pub struct NodeTls {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
    server_name: Option<String>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("NodeTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Builds node material from PEM bytes (tests and tools; daemons use [`TlsArgs::load`]).
    pub fn from_pem(cert: Vec<u8>, key: Vec<u8>, ca: Vec<u8>) -> Self {
        NodeTls {
            cert,
            key,
            ca,
            server_name: None,
        }
    }

    /// Sets the name verified in server certificates, whatever address is dialled.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Server side: present our certificate, require a client certificate from the CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// Client side: verify the server against the CA, present our certificate.
    /// `host` is the host part of the address dialled, used unless a server name override
    /// is configured.
    pub fn client_config(&self, host: &str) -> ClientTlsConfig {
        let name = self.server_name.as_deref().unwrap_or(host);
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(name.to_owned())
    }
}

/// HTTP/2 flow-control window of one stream (one call). Body frames are up to 1 MiB.
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// HTTP/2 flow-control window of a whole connection. Much larger than a stream's, so that
/// one call whose reader is slow (a slow HTTP client behind the LB) cannot use up the window
/// every other call on the connection needs.
pub const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

/// A tonic server builder for `mode`: mutual TLS, or plaintext with a warning.
///
/// HTTP/2 keepalive pings find peers that vanished without closing their connection (a
/// crashed host, a partition), so their streams end instead of waiting for a deadline.
///
/// # Errors
/// When tonic rejects the TLS configuration.
pub fn grpc_server(mode: &TlsMode) -> Result<tonic::transport::Server, tonic::transport::Error> {
    let builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    match mode {
        TlsMode::Mutual(tls) => builder.tls_config(tls.server_config()),
        TlsMode::Insecure => Ok(builder),
    }
}

/// The connections a [`grpc_server`] accepts on `listener`, with `TCP_NODELAY` set.
///
/// A server fed a bare listener stream keeps Nagle's algorithm on: a small response frame
/// then waits for the peer's delayed ACK (40 ms on Linux) and every call pays it. Measured
/// with `fn-load` (sequential `hello` calls, release): p50 44 ms without, 1.2 ms with.
pub fn grpc_incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A tonic client endpoint for `address` (`host:port`) under `mode`.
///
/// # Errors
/// When the address is not a valid URI authority or tonic rejects the TLS configuration.
pub fn grpc_endpoint(
    mode: &TlsMode,
    address: &str,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("{}://{address}", mode.scheme()))?
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW);
    match mode {
        TlsMode::Mutual(tls) => {
            let host = endpoint
                .uri()
                .host()
                .unwrap_or(address)
                .trim_matches(['[', ']']);
            let config = tls.client_config(host);
            endpoint.tls_config(config)
        }
        TlsMode::Insecure => Ok(endpoint),
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
    use super::*;

    fn args(dir: &Path) -> TlsArgs {
        TlsArgs {
            node_cert: Some(dir.join("node.pem")),
            node_cert_key: Some(dir.join("node-key.pem")),
            node_cert_authority: Some(dir.join("ca.pem")),
            tls_server_name: None,
            insecure: false,
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

    #[tokio::test]
    async fn accepted_grpc_connections_have_nodelay_set() {
        use tokio_stream::StreamExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let mut incoming = grpc_incoming(listener);
        let _client = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let accepted = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.nodelay().expect("nodelay readable"));
    }
}
