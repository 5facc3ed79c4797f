//! Development certificates: a throwaway CA and node certificates signed by it.
//!
//! Every node certificate is valid for both server and client authentication, so one file
//! set serves all three daemons. Names that parse as IP addresses become IP SANs.
//! Production deployments bring their own PKI through `FN_NODE_CERT*`.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::NodeTls;

/// Names every dev node certificate carries, so loopback tests and the demo verify.
pub const DEFAULT_SANS: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// A development certificate authority.
pub struct DevCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

/// A node certificate and its private key, PEM encoded.
#[derive(Clone)]
pub struct NodeCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert").finish_non_exhaustive()
    }
}

impl DevCa {
    /// Creates a new CA with a fresh key, valid from yesterday for ten years.
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn new(common_name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM encoded.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A node certificate for `sans` plus [`DEFAULT_SANS`], valid for a year.
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn node(&self, sans: &[&str]) -> Result<NodeCert, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        self.node_valid(sans, now - Duration::days(1), now + Duration::days(365))
    }

    /// A node certificate that expires `days` days from now (for expiry tests).
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn node_expiring_in(&self, sans: &[&str], days: i64) -> Result<NodeCert, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        self.node_valid(sans, now - Duration::days(1), now + Duration::days(days))
    }

    /// A node certificate whose validity ended yesterday (for rejection tests).
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn expired_node(&self, sans: &[&str]) -> Result<NodeCert, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        self.node_valid(sans, now - Duration::days(30), now - Duration::days(1))
    }

    fn node_valid(
        &self,
        sans: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<NodeCert, rcgen::Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            sans.first().copied().unwrap_or("fn-node"),
        );
        params.distinguished_name = dn;
        let mut names: Vec<&str> = DEFAULT_SANS.to_vec();
        names.extend(sans.iter().copied().filter(|s| !DEFAULT_SANS.contains(s)));
        params.subject_alt_names = names
            .into_iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.to_owned().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Node TLS material for in-process use (tests).
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn node_tls(&self, sans: &[&str]) -> Result<NodeTls, rcgen::Error> {
        let node = self.node(sans)?;
        Ok(self.tls_for(&node))
    }

    /// Wraps a node certificate issued by this CA into [`NodeTls`].
    pub fn tls_for(&self, node: &NodeCert) -> NodeTls {
        NodeTls::from_pem(
            node.cert_pem.clone().into_bytes(),
            node.key_pem.clone().into_bytes(),
            self.cert_pem.clone().into_bytes(),
        )
    }
}

/// Errors of [`write_dev_pki`].
#[derive(Debug, thiserror::Error)]
pub enum DevPkiError {
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Writes `ca.pem`, `node.pem` and `node-key.pem` into `dir` (created if needed): a new CA
/// and one node certificate for `sans` plus [`DEFAULT_SANS`]. Point `FN_NODE_CERT_AUTHORITY`,
/// `FN_NODE_CERT` and `FN_NODE_CERT_KEY` at them.
///
/// # Errors
/// When generation fails or a file cannot be written.
pub fn write_dev_pki(dir: &Path, sans: &[&str]) -> Result<(), DevPkiError> {
    let ca = DevCa::new("fn dev CA")?;
    let node = ca.node(sans)?;
    let write = |name: &str, contents: &str| {
        let path = dir.join(name);
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&path, contents))
            .map_err(|source| DevPkiError::Write {
                path: path.display().to_string(),
                source,
            })
    };
    write("ca.pem", ca.cert_pem())?;
    write("node.pem", &node.cert_pem)?;
    write("node-key.pem", &node.key_pem)?;
    Ok(())
}
