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

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::NodeTls;

/// Names every dev node certificate carries, so loopback tests and the demo verify.
pub const DEFAULT_SANS: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// A name for a node certificate, as an operator types it, in the form the certificate
/// carries: surrounding blanks trimmed (`FN_CERTS_SANS="fn-node, npm"`), an IP address in
/// its canonical form (`2001:db8::1` for `2001:0db8::1`, as it reads back from a
/// certificate), a DNS name in lower case without its trailing dot (webpki ignores a name
/// with one). A name no client could dial is refused here, once, rather than written into a
/// certificate every peer then quietly fails to match.
///
/// # Errors
/// A message naming the input and what is wrong with it.
pub fn parse_san(input: &str) -> Result<String, String> {
    let name = input.trim();
    if name.is_empty() {
        return Err(format!(
            "{input:?}: an empty name (a stray comma?): give DNS names or IP addresses"
        ));
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    // A wildcard stands for one label of the name after it, which must be a name itself.
    let (wildcard, dns) = match name.strip_prefix("*.") {
        Some(rest) => ("*.", rest),
        None => ("", name),
    };
    match rustls::pki_types::ServerName::try_from(dns) {
        Ok(rustls::pki_types::ServerName::DnsName(dns)) => {
            Ok(format!("{wildcard}{}", dns.as_ref().to_ascii_lowercase()))
        }
        Ok(_) | Err(_) => Err(format!(
            "{input:?} is not a DNS name or an IP address: use letters, digits, '-' and '.' \
             (e.g. fn-node, runner-1.internal, 10.0.0.7, 2001:db8::1)"
        )),
    }
}

/// Whether two names from [`parse_san`] or a certificate are the same name: addresses as
/// addresses (`::1` is `0:0::1`), DNS names without regard to case.
pub fn same_name(a: &str, b: &str) -> bool {
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => a == b,
        (Err(_), Err(_)) => a
            .trim_end_matches('.')
            .eq_ignore_ascii_case(b.trim_end_matches('.')),
        _ => false,
    }
}

/// `sans` through [`parse_san`], without the repeats.
fn parse_sans(sans: &[&str]) -> Result<Vec<String>, DevPkiError> {
    let mut names: Vec<String> = Vec::with_capacity(sans.len());
    for san in sans {
        let name = parse_san(san).map_err(DevPkiError::Name)?;
        if !names.iter().any(|n| same_name(n, &name)) {
            names.push(name);
        }
    }
    Ok(names)
}

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

    /// A CA from its certificate and key, PEM encoded (as [`write_dev_pki`] writes them).
    ///
    /// # Errors
    /// When either does not parse.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(DevCa {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// An intermediate CA signed by this one, valid from yesterday until `days` from now
    /// (tests of chains): its node certificates are presented with it after them.
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn intermediate_expiring_in(
        &self,
        common_name: &str,
        days: i64,
    ) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM encoded.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM encoded. Keep it out of nodes' reach.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
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

    /// A node certificate valid from `age` ago until `left` from now (tests of short-lived
    /// certificates).
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn node_valid_around_now(
        &self,
        sans: &[&str],
        age: std::time::Duration,
        left: std::time::Duration,
    ) -> Result<NodeCert, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        self.node_valid(sans, now - age, now + left)
    }

    /// A node certificate whose validity ended yesterday (for rejection tests).
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn expired_node(&self, sans: &[&str]) -> Result<NodeCert, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        self.node_valid(sans, now - Duration::days(30), now - Duration::days(1))
    }

    /// A node certificate whose validity starts `days` from now (tests of clock skew).
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn node_valid_from(&self, sans: &[&str], days: i64) -> Result<NodeCert, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        self.node_valid(
            sans,
            now + Duration::days(days),
            now + Duration::days(days + 365),
        )
    }

    /// A node certificate for client authentication only (tests: no daemon can serve with
    /// it).
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn client_only_node(&self, sans: &[&str]) -> Result<NodeCert, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        self.node_with(
            sans,
            now - Duration::days(1),
            now + Duration::days(365),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )
    }

    fn node_valid(
        &self,
        sans: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<NodeCert, rcgen::Error> {
        self.node_with(
            sans,
            not_before,
            not_after,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    fn node_with(
        &self,
        sans: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<NodeCert, rcgen::Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            sans.first().copied().unwrap_or("fn-node"),
        );
        params.distinguished_name = dn;
        let mut names: Vec<&str> = DEFAULT_SANS.to_vec();
        for san in sans {
            if !names.iter().any(|n| same_name(n, san)) {
                names.push(san);
            }
        }
        let mut sans: Vec<SanType> = Vec::with_capacity(names.len() + 1);
        for name in names {
            match name.parse::<IpAddr>() {
                Ok(ip) => {
                    // An IPv4-mapped address (`::ffff:10.0.0.7`) goes in both forms: a peer
                    // matches the address it dials byte for byte, and one dials the node's
                    // IPv4 address as four bytes.
                    for ip in [ip, ip.to_canonical()] {
                        if !sans.contains(&SanType::IpAddress(ip)) {
                            sans.push(SanType::IpAddress(ip));
                        }
                    }
                }
                Err(_) => sans.push(SanType::DnsName(name.to_owned().try_into()?)),
            }
        }
        params.subject_alt_names = sans;
        params.extended_key_usages = usages;
        // Signing only: the key is ECDSA P-256, which signs handshakes and encrypts nothing,
        // and RFC 8813 forbids keyEncipherment on such a key (strict verifiers refuse it).
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
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
    pub fn node_tls(&self, sans: &[&str]) -> Result<NodeTls, DevPkiError> {
        let node = self.node(sans)?;
        self.tls_for(&node)
    }

    /// Wraps a node certificate issued by this CA into [`NodeTls`].
    ///
    /// # Errors
    /// When the material does not parse (not for certificates made here).
    pub fn tls_for(&self, node: &NodeCert) -> Result<NodeTls, DevPkiError> {
        Ok(NodeTls::from_pem(
            node.cert_pem.clone().into_bytes(),
            node.key_pem.clone().into_bytes(),
            self.cert_pem.clone().into_bytes(),
        )?)
    }
}

/// Errors of [`write_dev_pki`].
#[derive(Debug, thiserror::Error)]
pub enum DevPkiError {
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("loading generated certificates: {0}")]
    Load(#[from] crate::TlsError),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "reading {path}: {source} (the CA's files are in --issuer-dir, the --out directory unless given; a directory made by fn-certs before rotation existed has no CA key: make a new one with `fn-certs --out DIR --force`)"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a CA certificate and key made by fn-certs: {source}")]
    Parse { path: String, source: rcgen::Error },
    #[error("{0}")]
    Name(String),
    /// A CA rollover step run out of its order, which would leave nodes untrusted.
    #[error("{0}")]
    Rollover(String),
    #[error(
        "a node certificate from {issuer} would not verify under {bundle} ({reason}): that bundle does not hold this CA. Bring node files from the bundle's CA, or replace them all with `fn-certs --force`"
    )]
    Unverified {
        issuer: String,
        bundle: String,
        reason: String,
    },
}

/// The files of a development PKI directory.
pub mod files {
    /// The CA bundle nodes trust (`FN_NODE_CERT_AUTHORITY`).
    pub const BUNDLE: &str = "ca.pem";
    /// The node certificate (`FN_NODE_CERT`).
    pub const NODE: &str = "node.pem";
    /// The node key (`FN_NODE_CERT_KEY`).
    pub const NODE_KEY: &str = "node-key.pem";
    /// The CA that signs node certificates, and its key (never given to nodes).
    pub const ISSUER: &str = "issuer.pem";
    pub const ISSUER_KEY: &str = "issuer-key.pem";
    /// During a CA rollover: the CA that will sign, and its key.
    pub const NEXT_ISSUER: &str = "next-issuer.pem";
    pub const NEXT_ISSUER_KEY: &str = "next-issuer-key.pem";
}

/// Where a development PKI lives.
///
/// The CA's key signs certificates every node trusts, so whoever reads it can pose as any
/// node. The node files are mounted into every daemon (an internet-facing lb-agent among
/// them, as the same user that owns the CA's key), so the CA's files belong in a directory
/// of their own that only `fn-certs` sees; [`Dirs::one`] keeps them together for tests and
/// a single machine's demo.
#[derive(Debug, Clone, Copy)]
pub struct Dirs<'a> {
    /// `ca.pem`, `node.pem`, `node-key.pem`: what the daemons read.
    pub nodes: &'a Path,
    /// `issuer.pem`, `issuer-key.pem` and, during a CA rollover, `next-issuer*.pem`.
    pub issuer: &'a Path,
}

impl<'a> Dirs<'a> {
    /// Everything in `dir`.
    pub fn one(dir: &'a Path) -> Self {
        Dirs {
            nodes: dir,
            issuer: dir,
        }
    }

    /// The CA's key, [`files::ISSUER_KEY`] in [`Dirs::issuer`].
    pub fn issuer_key(&self) -> std::path::PathBuf {
        self.issuer.join(files::ISSUER_KEY)
    }
}

/// Writes a new development PKI into `dir` (created if needed): a new CA (`issuer.pem`,
/// `issuer-key.pem`), the bundle nodes trust (`ca.pem`, that CA alone) and one node
/// certificate (`node.pem`, `node-key.pem`) for `sans` plus [`DEFAULT_SANS`]. Point
/// `FN_NODE_CERT_AUTHORITY`, `FN_NODE_CERT` and `FN_NODE_CERT_KEY` at the last three.
///
/// # Errors
/// When a name is not a DNS name or an IP address, generation fails or a file cannot be
/// written.
pub fn write_dev_pki(dir: &Path, sans: &[&str]) -> Result<(), DevPkiError> {
    write_dev_pki_in(Dirs::one(dir), sans)
}

/// [`write_dev_pki`], with the CA's files in `dirs.issuer`.
///
/// # Errors
/// As [`write_dev_pki`].
pub fn write_dev_pki_in(dirs: Dirs<'_>, sans: &[&str]) -> Result<(), DevPkiError> {
    let sans = parse_sans(sans)?;
    let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
    let ca = DevCa::new("fn dev CA")?;
    write_issuer(dirs.issuer, files::ISSUER, files::ISSUER_KEY, &ca)?;
    write_file(dirs.nodes, files::BUNDLE, ca.cert_pem(), PUBLIC)?;
    write_node(dirs.nodes, &ca, &sans)?;
    // A rollover begun under the CA just replaced is over: its next CA is in no bundle, and
    // a later `switch` or `finish` with it would cut every node off.
    remove_next_issuer(dirs.issuer)
}

/// Moves the CA's files from `dirs.nodes`, where fn-certs wrote them before it had
/// `--issuer-dir`, into `dirs.issuer` when that has none, so that a stack made before
/// keeps its CA and no longer hands its key to every daemon. Returns the files moved.
///
/// # Errors
/// When a file cannot be read, written or removed.
pub fn move_issuer_out_of_nodes(dirs: Dirs<'_>) -> Result<Vec<String>, DevPkiError> {
    let mut moved = Vec::new();
    if dirs.nodes == dirs.issuer {
        return Ok(moved);
    }
    let issuer_files = [
        (files::ISSUER, PUBLIC),
        (files::ISSUER_KEY, SECRET),
        (files::NEXT_ISSUER, PUBLIC),
        (files::NEXT_ISSUER_KEY, SECRET),
    ];
    // All or none: a CA from one directory and its key from the other would not match.
    if issuer_files
        .iter()
        .any(|(name, _)| dirs.issuer.join(name).exists())
    {
        return Ok(moved);
    }
    for (name, mode) in issuer_files {
        let from = dirs.nodes.join(name);
        let contents = match std::fs::read_to_string(&from) {
            Ok(contents) => contents,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(DevPkiError::Read {
                    path: from.display().to_string(),
                    source,
                });
            }
        };
        write_file(dirs.issuer, name, &contents, mode)?;
        moved.push(name.to_owned());
    }
    // Removed only once all are in their new place: a failure half-way loses nothing.
    for name in &moved {
        let from = dirs.nodes.join(name);
        std::fs::remove_file(&from).map_err(|source| DevPkiError::Write {
            path: from.display().to_string(),
            source,
        })?;
    }
    Ok(moved)
}

/// Removes the next CA's files of a rollover, if there are any.
fn remove_next_issuer(dir: &Path) -> Result<(), DevPkiError> {
    for name in [files::NEXT_ISSUER, files::NEXT_ISSUER_KEY] {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                return Err(DevPkiError::Write {
                    path: path.display().to_string(),
                    source,
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// Replaces the node certificate and key in `dir` with new ones from the same CA, for
/// `sans` (none: the names of the certificate it replaces, so that peers dialling the
/// node by them still accept it). Daemons watching the files pick them up without a
/// restart.
///
/// # Errors
/// When the CA's files are missing or unparsable, or a file cannot be written.
pub fn rotate_node(dir: &Path, sans: &[&str]) -> Result<(), DevPkiError> {
    rotate_node_in(Dirs::one(dir), sans)
}

/// [`rotate_node`], with the CA's files in `dirs.issuer`.
///
/// # Errors
/// As [`rotate_node`].
pub fn rotate_node_in(dirs: Dirs<'_>, sans: &[&str]) -> Result<(), DevPkiError> {
    let ca = signing_ca(dirs)?;
    let names = names_or_current(dirs.nodes, sans)?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    write_node(dirs.nodes, &ca, &names)
}

/// The CA new node certificates come from: the rollover's new CA once the node
/// certificate is from it (its switch ran; one from the old CA would be cut off at its
/// finish), else the issuer.
///
/// # Errors
/// When the CA's files cannot be read.
fn signing_ca(dirs: Dirs<'_>) -> Result<DevCa, DevPkiError> {
    if switched(dirs)? {
        return read_issuer(dirs.issuer, files::NEXT_ISSUER, files::NEXT_ISSUER_KEY);
    }
    read_issuer(dirs.issuer, files::ISSUER, files::ISSUER_KEY)
}

/// Whether a CA rollover is under way and past its switch: the node certificate verifies
/// under the rollover's new CA. Told from certificates alone (the new CA's key may be
/// unreadable here, the node's key missing).
///
/// # Errors
/// When the new CA's certificate is there but cannot be read.
fn switched(dirs: Dirs<'_>) -> Result<bool, DevPkiError> {
    let pending = dirs.issuer.join(files::NEXT_ISSUER);
    let next = match std::fs::read_to_string(&pending) {
        Ok(next) => next,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(DevPkiError::Read {
                path: pending.display().to_string(),
                source,
            });
        }
    };
    Ok(dirs.nodes.join(files::NODE).exists() && node_verifies_under(dirs.nodes, &next)?.is_ok())
}

/// `sans`, or when there are none the names of the node certificate now in `dir` (none
/// when it cannot be read: the defaults then).
fn names_or_current(dir: &Path, sans: &[&str]) -> Result<Vec<String>, DevPkiError> {
    if !sans.is_empty() {
        return parse_sans(sans);
    }
    Ok(current_names(dir))
}

/// The names of the node certificate in `dir` (none when it cannot be read).
fn current_names(dir: &Path) -> Vec<String> {
    let Ok(pem) = std::fs::read(dir.join(files::NODE)) else {
        return Vec::new();
    };
    let Some(Ok(der)) = CertificateDer::pem_slice_iter(&pem).next() else {
        return Vec::new();
    };
    crate::expiry::Validity::of(&der)
        .map(|v| v.names)
        .unwrap_or_default()
}

/// A step of a CA rollover, run in this order with every node reloading in between. No
/// handshake fails at any step: nodes trust both CAs from the first step until the last
/// (connections opened before `Switch` are retired at `Finish`: [`NodeTls::recheck_connections`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloverStep {
    /// A new CA is made; the bundle holds the old and the new CA.
    Begin,
    /// Node certificates from the new CA replace the old ones.
    Switch,
    /// The new CA becomes the issuer and the old one leaves the bundle.
    Finish,
}

/// Runs one step of a CA rollover in `dir`.
///
/// # Errors
/// When a step's inputs are missing (e.g. `Switch` before `Begin`), unparsable, or a file
/// cannot be written.
pub fn ca_rollover(dir: &Path, step: RolloverStep, sans: &[&str]) -> Result<(), DevPkiError> {
    ca_rollover_in(Dirs::one(dir), step, sans)
}

/// [`ca_rollover`], with the CA's files in `dirs.issuer`.
///
/// # Errors
/// As [`ca_rollover`].
pub fn ca_rollover_in(
    dirs: Dirs<'_>,
    step: RolloverStep,
    sans: &[&str],
) -> Result<(), DevPkiError> {
    let Dirs { nodes, issuer } = dirs;
    let node = nodes.join(files::NODE);
    match step {
        RolloverStep::Begin => {
            // A second begin after the switch would drop the CA the node certificates
            // now come from out of every bundle.
            if switched(dirs)? {
                return Err(DevPkiError::Rollover(format!(
                    "{} is already from the rollover's new CA ({}; its switch ran): run --ca-rollover finish once every daemon has reloaded; a new CA now would leave it untrusted",
                    node.display(),
                    issuer.join(files::NEXT_ISSUER).display()
                )));
            }
            let old = read_issuer(issuer, files::ISSUER, files::ISSUER_KEY)?;
            let next = DevCa::new("fn dev CA (next)")?;
            write_issuer(issuer, files::NEXT_ISSUER, files::NEXT_ISSUER_KEY, &next)?;
            let bundle = format!("{}{}", old.cert_pem(), next.cert_pem());
            write_file(nodes, files::BUNDLE, &bundle, PUBLIC)
        }
        RolloverStep::Switch => {
            let next = read_issuer(issuer, files::NEXT_ISSUER, files::NEXT_ISSUER_KEY)?;
            let names = names_or_current(nodes, sans)?;
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            write_node(nodes, &next, &names)
        }
        RolloverStep::Finish => {
            let next = read_issuer(issuer, files::NEXT_ISSUER, files::NEXT_ISSUER_KEY)?;
            // The bundle about to be written trusts the new CA alone.
            if let Err(reason) = node_verifies_under(nodes, next.cert_pem())? {
                return Err(DevPkiError::Rollover(format!(
                    "{} does not verify under the rollover's new CA ({reason}): run --ca-rollover switch, and let every daemon reload, before finish; finishing now would leave every node untrusted",
                    node.display()
                )));
            }
            write_issuer(issuer, files::ISSUER, files::ISSUER_KEY, &next)?;
            write_file(nodes, files::BUNDLE, next.cert_pem(), PUBLIC)?;
            remove_next_issuer(issuer)
        }
    }
}

/// Whether the node certificate in `dir` verifies now under the CA `ca_pem` alone (its key
/// is not needed for that), and why not, when it does not.
///
/// # Errors
/// When the certificate cannot be read.
fn node_verifies_under(dir: &Path, ca_pem: &str) -> Result<Result<(), String>, DevPkiError> {
    let path = dir.join(files::NODE);
    let cert = std::fs::read(&path).map_err(|source| DevPkiError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(crate::material::verifies_under(&cert, ca_pem.as_bytes()))
}

/// How long before its end `fn-certs --keep` renews a node certificate. Node certificates
/// last a year and a stack's `certs` step runs at each start: a month's margin renews one
/// at a restart well before peers refuse it, rather than keeping it until they do.
pub const RENEW_WITHIN: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Why the node certificate in `dir` must be renewed before it is kept, or `None` when it
/// serves as it is. It is checked as a daemon checks a replacement (valid now, its key
/// matching, chaining to the bundle in `ca.pem`, usable by a server) and must stay valid
/// for [`RENEW_WITHIN`] more.
///
/// # Errors
/// When a file cannot be read.
pub fn kept_needs_renewal(dir: &Path) -> Result<Option<Renewal>, DevPkiError> {
    use crate::material::{Check, Material, Origin};
    let cert = dir.join(files::NODE);
    let origin = Origin::Files {
        cert: cert.clone(),
        key: dir.join(files::NODE_KEY),
        ca: dir.join(files::BUNDLE),
    };
    let Some(pems) = origin.read()? else {
        return Ok(None);
    };
    let provider = std::sync::Arc::new(crate::crypto_provider());
    let material = match Material::parse(pems, &origin, &provider, Check::Replacement) {
        Ok(material) => material,
        Err(e) => return Ok(Some(Renewal::Refused(e.to_string()))),
    };
    let left = material
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    Ok((left < RENEW_WITHIN).then(|| {
        Renewal::Soon(format!(
            "{}: expires at {}, within {} days",
            cert.display(),
            humantime::format_rfc3339_seconds(material.not_after),
            RENEW_WITHIN.as_secs() / (24 * 3600)
        ))
    }))
}

/// Why a kept node certificate should be renewed ([`kept_needs_renewal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Peers refuse it now (expired, key not matching, not from the CA in `ca.pem`).
    Refused(String),
    /// Peers accept it, but not for long.
    Soon(String),
}

impl std::fmt::Display for Renewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Renewal::Refused(why) | Renewal::Soon(why) => f.write_str(why),
        }
    }
}

/// Replaces the node certificate and key in `dirs.nodes` with new ones from the CA in
/// `dirs.issuer`, for the names of the certificate replaced and `sans`, as `--keep` does
/// for one that [`kept_needs_renewal`]. Nothing is written unless the new certificate
/// verifies under the bundle in `ca.pem`: a bundle of another CA would refuse it too.
///
/// # Errors
/// When a name is invalid, the CA's files or the bundle cannot be read, the new
/// certificate does not verify under the bundle, or a file cannot be written.
pub fn renew_node_in(dirs: Dirs<'_>, sans: &[&str]) -> Result<(), DevPkiError> {
    use crate::material::{Check, Material, Origin, Pems};
    let ca = signing_ca(dirs)?;
    let mut names = current_names(dirs.nodes);
    for name in parse_sans(sans)? {
        if !names.iter().any(|n| same_name(n, &name)) {
            names.push(name);
        }
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let node = ca.node(&names)?;
    let bundle = dirs.nodes.join(files::BUNDLE);
    let pems = Pems {
        cert: node.cert_pem.clone().into_bytes(),
        key: node.key_pem.clone().into_bytes(),
        ca: std::fs::read(&bundle).map_err(|source| DevPkiError::Read {
            path: bundle.display().to_string(),
            source,
        })?,
    };
    let provider = std::sync::Arc::new(crate::crypto_provider());
    Material::parse(pems, &Origin::Memory, &provider, Check::Replacement).map_err(|e| {
        DevPkiError::Unverified {
            issuer: dirs.issuer.join(files::ISSUER).display().to_string(),
            bundle: bundle.display().to_string(),
            reason: e.to_string(),
        }
    })?;
    write_node_cert(dirs.nodes, &node)
}

fn write_node(dir: &Path, ca: &DevCa, sans: &[&str]) -> Result<(), DevPkiError> {
    write_node_cert(dir, &ca.node(sans)?)
}

fn write_node_cert(dir: &Path, node: &NodeCert) -> Result<(), DevPkiError> {
    // The key first: a reader between the two renames sees a mismatched pair and waits.
    // Owner and group only: functions run as other users and must not read a node's key,
    // and a daemon may read it through its group (as the images do).
    write_file(dir, files::NODE_KEY, &node.key_pem, KEY)?;
    write_file(dir, files::NODE, &node.cert_pem, PUBLIC)
}

fn write_issuer(dir: &Path, cert: &str, key: &str, ca: &DevCa) -> Result<(), DevPkiError> {
    write_file(dir, key, &ca.key_pem(), SECRET)?;
    write_file(dir, cert, ca.cert_pem(), PUBLIC)
}

fn read_issuer(dir: &Path, cert: &str, key: &str) -> Result<DevCa, DevPkiError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| DevPkiError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    DevCa::from_pem(&cert_pem, &key_pem).map_err(|source| DevPkiError::Parse {
        path: dir.join(cert).display().to_string(),
        source,
    })
}

/// Mode of certificates and bundles.
const PUBLIC: u32 = 0o644;
/// Mode of a node's key.
const KEY: u32 = 0o640;
/// Mode of a CA's key: no daemon reads it.
const SECRET: u32 = 0o600;

/// Writes `dir/name` with `mode`, whole or not at all (a temporary file renamed over it), so
/// a daemon reading it never sees half a file.
fn write_file(dir: &Path, name: &str, contents: &str, mode: u32) -> Result<(), DevPkiError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(name);
    let staged = dir.join(format!(".{name}.new"));
    let fail = |source| DevPkiError::Write {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let _stale = std::fs::remove_file(&staged);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&staged)
        .map_err(fail)?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(fail)?;
    std::fs::rename(&staged, &path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_canonical_and_checked() {
        for (input, want) in [
            (" npm", "npm"),
            ("fn-node \t", "fn-node"),
            ("Fn-Node.", "fn-node"),
            ("2001:0db8::1", "2001:db8::1"),
            (" 10.0.0.7 ", "10.0.0.7"),
            ("*.fn.internal", "*.fn.internal"),
        ] {
            assert_eq!(parse_san(input).as_deref(), Ok(want), "{input:?}");
        }
        for bad in ["", "  ", "fn node", "-npm", "a..b", "*.", "npm/1"] {
            let err = parse_san(bad).expect_err(bad);
            assert!(
                err.contains("empty name") || err.contains("not a DNS name or an IP address"),
                "{bad:?}: {err}"
            );
        }
        assert!(same_name("2001:db8::1", "2001:0db8:0::1"));
        assert!(same_name("fn-node", "FN-NODE."));
        assert!(!same_name("::1", "localhost"));
        // A peer matches addresses byte for byte: the mapped form is another name.
        assert!(!same_name("::ffff:10.0.0.7", "10.0.0.7"));
    }

    /// A node asked for an IPv4-mapped address is valid for it and for the IPv4 address
    /// (four bytes), which a peer dialling the node's IPv4 address matches.
    #[test]
    fn an_ipv4_mapped_address_is_written_in_both_forms() {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let ca = DevCa::new("mapped test CA").expect("ca");
        let node = ca.node(&["::ffff:10.0.0.9"]).expect("node");
        let der = CertificateDer::from_pem_slice(node.cert_pem.as_bytes()).expect("pem");
        let names = crate::expiry::Validity::of(&der).expect("parses").names;
        for want in ["10.0.0.9", "::ffff:10.0.0.9"] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
    }

    /// The files of a PKI directory, by name.
    fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|entry| {
                let entry = entry.expect("entry");
                let name = entry.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(entry.path()).expect("read"))
            })
            .collect();
        files.sort();
        files
    }

    /// A rollover step run out of its order, which would leave the node certificate
    /// untrusted (a finish before the switch; a begin after it), is refused and changes
    /// nothing; in order, each step goes, and a new rollover may begin after the finish.
    #[test]
    fn rollover_steps_out_of_order_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_dev_pki(dir.path(), &[]).expect("pki");
        let out_of_order = |step| {
            let before = contents(dir.path());
            let refused = ca_rollover(dir.path(), step, &[]);
            assert!(
                matches!(refused, Err(DevPkiError::Rollover(_))),
                "{step:?}: {refused:?}"
            );
            assert_eq!(contents(dir.path()), before, "{step:?} changed files");
            refused.err().map(|e| e.to_string()).unwrap_or_default()
        };
        ca_rollover(dir.path(), RolloverStep::Begin, &[]).expect("begin");
        let early = out_of_order(RolloverStep::Finish);
        assert!(
            early.contains("run --ca-rollover switch") && early.contains("does not verify"),
            "{early}"
        );
        ca_rollover(dir.path(), RolloverStep::Switch, &[]).expect("switch");
        let again = out_of_order(RolloverStep::Begin);
        assert!(again.contains("run --ca-rollover finish"), "{again}");
        // Told by the certificates alone: without the node's key, and with the next CA's
        // key unreadable, a begin is refused all the same.
        let key = std::fs::read(dir.path().join(files::NODE_KEY)).expect("key");
        std::fs::remove_file(dir.path().join(files::NODE_KEY)).expect("no key");
        let next_key = dir.path().join(files::NEXT_ISSUER_KEY);
        let next_key_pem = std::fs::read(&next_key).expect("next key");
        std::fs::write(&next_key, b"garbage").expect("spoil");
        out_of_order(RolloverStep::Begin);
        std::fs::write(dir.path().join(files::NODE_KEY), key).expect("key back");
        std::fs::write(&next_key, next_key_pem).expect("next key back");
        // A rotation between the switch and the finish stays with the new CA: one from the
        // old would be cut off at the finish (which would then be refused).
        rotate_node(dir.path(), &[]).expect("rotate");
        let next = std::fs::read_to_string(dir.path().join(files::NEXT_ISSUER)).expect("next");
        assert_eq!(
            node_verifies_under(dir.path(), &next).expect("read"),
            Ok(())
        );
        ca_rollover(dir.path(), RolloverStep::Finish, &[]).expect("finish");
        ca_rollover(dir.path(), RolloverStep::Begin, &[]).expect("the next rollover");
        // A begin again before any switch only replaces the CA nobody uses yet.
        ca_rollover(dir.path(), RolloverStep::Begin, &[]).expect("begin again");
    }

    #[test]
    fn a_certificate_carries_the_names_as_given_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_dev_pki(dir.path(), &["fn-node", " npm", "2001:0db8::1", "0:0::1"]).expect("pki");
        let names = current_names(dir.path());
        assert_eq!(
            names,
            [
                "localhost",
                "127.0.0.1",
                "::1",
                "fn-node",
                "npm",
                "2001:db8::1"
            ],
            "no blank, no repeated ::1, IPv6 as an address"
        );
        let err = write_dev_pki(dir.path(), &["fn-node", ""]).expect_err("an empty name");
        assert!(err.to_string().contains("empty name"), "{err}");
    }

    #[test]
    fn a_node_certificate_may_only_sign() {
        let ca = DevCa::new("test CA").expect("ca");
        let node = ca.node(&["fn-node"]).expect("node");
        let der = CertificateDer::from_pem_slice(node.cert_pem.as_bytes()).expect("pem");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
        let usage = cert
            .key_usage()
            .expect("parsable key usage")
            .expect("a key usage extension")
            .value;
        assert!(usage.digital_signature(), "{usage}");
        assert!(
            !usage.key_encipherment(),
            "keyEncipherment on an ECDSA key (RFC 8813): {usage}"
        );
        assert_eq!(usage.flags, 1, "digitalSignature alone: {usage}");
    }
}
