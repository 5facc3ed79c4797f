//! One node's TLS material, parsed and checked: its certificate chain with the matching key,
//! and verifiers for the CA bundle it trusts.
//!
//! A [`Material`] is immutable. Rotation builds a new one from the files and swaps it in
//! (see [`crate::NodeTls::reload`]); handshakes already under way keep the one they started with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;

use crate::TlsError;

/// The PEM bytes of a set, as read; compared to tell whether the files changed.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Pems {
    pub(crate) cert: Vec<u8>,
    pub(crate) key: Vec<u8>,
    pub(crate) ca: Vec<u8>,
}

/// Where a set came from, for error messages: the files, or memory (tests and tools).
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    Files {
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
    },
    Memory,
}

impl Origin {
    fn path(&self, var: &'static str) -> PathBuf {
        match self {
            Origin::Files { cert, key, ca } => match var {
                "FN_NODE_CERT_KEY" => key.clone(),
                "FN_NODE_CERT_AUTHORITY" => ca.clone(),
                _ => cert.clone(),
            },
            Origin::Memory => PathBuf::from("(in memory)"),
        }
    }

    fn invalid(&self, var: &'static str, reason: impl Into<String>) -> TlsError {
        TlsError::Invalid {
            var,
            path: self.path(var),
            reason: reason.into(),
        }
    }

    /// Reads the three files.
    pub(crate) fn read(&self) -> Result<Option<Pems>, TlsError> {
        self.read_noting(&Mutex::new(None))
    }

    /// Reads the three files, with the variable of the one being read in `reading` while
    /// it is read, so that a read that hangs (a hung network or secrets mount) can be named.
    pub(crate) fn read_noting(
        &self,
        reading: &Mutex<Option<&'static str>>,
    ) -> Result<Option<Pems>, TlsError> {
        let Origin::Files { cert, key, ca } = self else {
            return Ok(None);
        };
        let read = |var: &'static str, path: &Path| {
            *reading.lock().unwrap_or_else(PoisonError::into_inner) = Some(var);
            let bytes = read_file(var, path);
            *reading.lock().unwrap_or_else(PoisonError::into_inner) = None;
            bytes
        };
        Ok(Some(Pems {
            cert: read("FN_NODE_CERT", cert)?,
            key: read("FN_NODE_CERT_KEY", key)?,
            ca: read("FN_NODE_CERT_AUTHORITY", ca)?,
        }))
    }

    /// The file of `var`.
    pub(crate) fn file(&self, var: &'static str) -> PathBuf {
        self.path(var)
    }
}

/// The bytes of the file at `path`, a regular file (or a link to one).
///
/// Opened without blocking: a FIFO put in place of a certificate would block an ordinary
/// open until some writer came, and a device could be read for ever, so anything but a
/// regular file is refused at once, told by the file opened (no race with a rename).
/// `O_NONBLOCK` changes nothing for the read of a regular file.
pub(crate) fn read_file(var: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let unreadable = |source: std::io::Error| {
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
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(unreadable)?;
    let kind = file.metadata().map_err(unreadable)?.file_type();
    if !kind.is_file() {
        return Err(TlsError::Invalid {
            var,
            path: path.to_owned(),
            reason: format!(
                "is not a regular file ({}): put the PEM file itself there, or a link to it",
                describe(kind)
            ),
        });
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(unreadable)?;
    Ok(bytes)
}

/// What a file that is not a regular one is, for an error message.
fn describe(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "an unusual kind of file"
    }
}

/// A parsed, consistent set.
pub(crate) struct Material {
    pub(crate) pems: Pems,
    /// This node's chain and key, presented as a server and as a client.
    pub(crate) certified: Arc<CertifiedKey>,
    /// Verifies clients against the CA bundle (certificates are required).
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
    /// Verifies servers against the CA bundle.
    pub(crate) server_verifier: Arc<WebPkiServerVerifier>,
    /// The end of the validity of the chain the node presents: the earliest `notAfter` of
    /// the node certificate and the intermediates after it in `FN_NODE_CERT`.
    pub(crate) not_after: SystemTime,
    /// The names the node certificate is valid for.
    pub(crate) names: Vec<String>,
    /// The end of the validity of the CA bundle's first certificate to expire.
    pub(crate) ca_not_after: SystemTime,
}

/// How strictly [`Material::parse`] checks a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// At start: the set must parse and the key must match. An expired certificate is
    /// accepted (and reported by the expiry watch), so the daemon starts and says why peers
    /// refuse it.
    Start,
    /// A replacement: it must also be valid now and chain to its own CA bundle, or the
    /// daemon keeps the set it has.
    Replacement,
}

impl Material {
    /// Parses and checks `pems`; errors name the variable, the file and the reason.
    pub(crate) fn parse(
        pems: Pems,
        origin: &Origin,
        provider: &Arc<CryptoProvider>,
        check: Check,
    ) -> Result<Self, TlsError> {
        let chain =
            certificates(&pems.cert).map_err(|reason| origin.invalid("FN_NODE_CERT", reason))?;
        let key = PrivateKeyDer::from_pem_slice(&pems.key).map_err(|e| {
            origin.invalid(
                "FN_NODE_CERT_KEY",
                format!("holds no usable PEM private key ({e})"),
            )
        })?;
        let cas = certificates(&pems.ca)
            .map_err(|reason| origin.invalid("FN_NODE_CERT_AUTHORITY", reason))?;

        // The key first, on its own: what fails here is the key file's. What fails in the
        // comparison that follows, but a mismatch, is the certificate's (a certificate the
        // verifier cannot parse, say), and was blamed on the key.
        let signing_key = provider.key_provider.load_private_key(key).map_err(|e| {
            origin.invalid("FN_NODE_CERT_KEY", format!("unusable private key: {e}"))
        })?;
        let certified = CertifiedKey::new(chain.clone(), signing_key);
        match certified.keys_match() {
            // A key that cannot tell its public half: nothing to compare (as rustls's own
            // `CertifiedKey::from_der`).
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(origin.invalid(
                    "FN_NODE_CERT_KEY",
                    format!(
                        "does not match the certificate in FN_NODE_CERT ({})",
                        origin.path("FN_NODE_CERT").display()
                    ),
                ));
            }
            Err(other) => {
                return Err(
                    origin.invalid("FN_NODE_CERT", format!("unusable certificate: {other}"))
                );
            }
        }

        let ca_not_after = cas
            .iter()
            .filter_map(|ca| crate::expiry::Validity::of(ca).ok())
            .map(|v| v.not_after)
            .min()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut roots = RootCertStore::empty();
        for (i, ca) in cas.into_iter().enumerate() {
            roots.add(ca).map_err(|e| {
                origin.invalid(
                    "FN_NODE_CERT_AUTHORITY",
                    format!("certificate {} is not a usable CA certificate: {e}", i + 1),
                )
            })?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(provider))
                .build()
                .map_err(|e| origin.invalid("FN_NODE_CERT_AUTHORITY", e.to_string()))?;
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(provider))
                .build()
                .map_err(|e| origin.invalid("FN_NODE_CERT_AUTHORITY", e.to_string()))?;

        let (end_entity, intermediates) = chain
            .split_first()
            .ok_or_else(|| origin.invalid("FN_NODE_CERT", "holds no certificate"))?;
        let validity = crate::expiry::Validity::of(end_entity)
            .map_err(|reason| origin.invalid("FN_NODE_CERT", reason))?;
        let now = SystemTime::now();
        let not_after = chain_end(
            client_verifier.as_ref(),
            end_entity,
            intermediates,
            validity.not_after,
            now,
        );
        let early = validity.not_before > now;

        match check {
            Check::Start if early => tracing::warn!(
                cert = %origin.path("FN_NODE_CERT").display(),
                not_before = %humantime::format_rfc3339_seconds(validity.not_before),
                "the node certificate is not valid yet: peers refuse it until then (is this \
                 host's clock, or its issuer's, wrong?)"
            ),
            Check::Start if not_after > now => {
                // Loaded all the same (as an expired certificate is, to be replaced while
                // the daemon runs), but said: peers with this bundle refuse the node, and it
                // refuses them, and each refusal otherwise read as a fault of the peer.
                if let Err(e) =
                    client_verifier.verify_client_cert(end_entity, intermediates, UnixTime::now())
                {
                    tracing::warn!(
                        cert = %origin.path("FN_NODE_CERT").display(),
                        ca = %origin.path("FN_NODE_CERT_AUTHORITY").display(),
                        error = %e,
                        "the node certificate is not valid under this node's own CA bundle: \
                         peers with the same bundle refuse it (is the right ca.pem mounted, or \
                         the certificate from another CA?)"
                    );
                }
            }
            Check::Start => {}
            Check::Replacement => {
                if not_after <= now {
                    let end = humantime::format_rfc3339_seconds(not_after);
                    let what = if not_after < validity.not_after {
                        "an intermediate CA certificate in it expired"
                    } else {
                        "expired"
                    };
                    return Err(origin.invalid("FN_NODE_CERT", format!("{what} at {end}")));
                }
                if early {
                    let start = humantime::format_rfc3339_seconds(validity.not_before);
                    return Err(origin.invalid(
                        "FN_NODE_CERT",
                        format!(
                            "not valid until {start}: is this host's clock, or its issuer's, \
                             wrong? (it is tried again at the next check, or with \
                             FN_TLS_RELOAD_INTERVAL=0s at the next SIGHUP)"
                        ),
                    ));
                }
                client_verifier
                    .verify_client_cert(end_entity, intermediates, UnixTime::now())
                    .map_err(|e| {
                        origin.invalid(
                            "FN_NODE_CERT",
                            format!(
                                "is not valid under the CA bundle in FN_NODE_CERT_AUTHORITY ({}): {e}",
                                origin.path("FN_NODE_CERT_AUTHORITY").display()
                            ),
                        )
                    })?;
                // Every daemon serves with it too: a certificate a peer cannot accept from a
                // server (no serverAuth usage, say) would refuse every inbound connection.
                // Checked for the first name a client could dial (a wildcard's stands for
                // one of its names); with none, there is nothing to check it for here.
                let dialled = validity.names.iter().find_map(|name| {
                    let name = match name.strip_prefix("*.") {
                        Some(rest) => format!("fn-check.{rest}"),
                        None => name.clone(),
                    };
                    rustls::pki_types::ServerName::try_from(name.clone())
                        .ok()
                        .map(|server| (name, server))
                });
                if let Some((name, server_name)) = dialled {
                    server_verifier
                        .verify_server_cert(
                            end_entity,
                            intermediates,
                            &server_name,
                            &[],
                            UnixTime::now(),
                        )
                        .map_err(|e| {
                            origin.invalid(
                                "FN_NODE_CERT",
                                format!("cannot serve as a server certificate for {name}: {e}"),
                            )
                        })?;
                }
            }
        }

        Ok(Material {
            pems,
            certified: Arc::new(certified),
            client_verifier,
            server_verifier,
            not_after,
            ca_not_after,
            names: validity.names,
        })
    }
}

/// The certificates of a PEM file, at least one.
/// Whether the certificate chain `cert_pem` verifies now under the CAs of `ca_pem` alone
/// (no key needed); why not, when it does not.
pub(crate) fn verifies_under(cert_pem: &[u8], ca_pem: &[u8]) -> Result<(), String> {
    let chain = certificates(cert_pem)?;
    let (end_entity, intermediates) = chain.split_first().ok_or("holds no certificate")?;
    let mut roots = RootCertStore::empty();
    for ca in certificates(ca_pem)? {
        roots
            .add(ca)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    let provider = Arc::new(crate::crypto_provider());
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())?
        .verify_client_cert(end_entity, intermediates, UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("unparsable PEM: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM CERTIFICATE".to_owned());
    }
    Ok(certs)
}

/// When the chain the node presents stops verifying under its own CA bundle (the one its
/// peers hold): the first end among the certificates of the path a peer builds, the leaf's
/// and the intermediates' it uses (webpki checks each one's dates as it checks the leaf's).
/// An extra certificate the path does not use (a root, or an expired cross-sign, sent along
/// in a full chain) moves nothing. Found by verifying at each intermediate's end, in order;
/// when the chain does not verify even now (a certificate from another CA: the start says
/// so), the first end of any certificate in it.
fn chain_end(
    verifier: &dyn ClientCertVerifier,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    leaf_end: SystemTime,
    now: SystemTime,
) -> SystemTime {
    let at = |time: SystemTime| {
        let since = time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::since_unix_epoch(since))
            .is_ok()
    };
    let mut ends: Vec<SystemTime> = intermediates
        .iter()
        .filter_map(|cert| crate::expiry::Validity::of(cert).ok())
        .map(|v| v.not_after)
        .filter(|&end| end < leaf_end)
        .collect();
    if !at(now) {
        return ends.into_iter().fold(leaf_end, SystemTime::min);
    }
    ends.retain(|&end| end > now);
    ends.sort_unstable();
    ends.dedup();
    ends.into_iter()
        .find(|&end| !at(end + std::time::Duration::from_secs(1)))
        .unwrap_or(leaf_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::DevCa;

    fn parse(cert: String, key: String, ca: &str) -> Result<Material, TlsError> {
        let pems = Pems {
            cert: cert.into_bytes(),
            key: key.into_bytes(),
            ca: ca.as_bytes().to_vec(),
        };
        let provider = Arc::new(crate::crypto_provider());
        Material::parse(pems, &Origin::Memory, &provider, Check::Replacement)
    }

    fn days_left(material: &Material) -> f64 {
        let left = material
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        left.as_secs_f64() / 86_400.0
    }

    /// The chain's end is that of the path a peer builds: an intermediate on it that ends
    /// first ends the chain; certificates sent along that the path does not use (an expired
    /// cross-sign, another intermediate ending soon) move nothing, and do not get a valid
    /// replacement rejected.
    #[test]
    fn the_chain_ends_with_the_first_end_on_the_path_a_peer_builds() {
        let root = DevCa::new("chain test root").expect("root");
        let soon = root
            .intermediate_expiring_in("chain test intermediate", 2)
            .expect("intermediate");
        let expired = root
            .intermediate_expiring_in("chain test expired cross-sign", -1)
            .expect("an expired intermediate");

        let under_soon = soon.node(&[]).expect("node");
        let used = parse(
            format!("{}{}", under_soon.cert_pem, soon.cert_pem()),
            under_soon.key_pem,
            root.cert_pem(),
        )
        .expect("a valid chain");
        assert!(
            (days_left(&used) - 2.0).abs() < 0.01,
            "{}",
            days_left(&used)
        );

        let direct = root.node(&[]).expect("node");
        let unused = parse(
            format!(
                "{}{}{}",
                direct.cert_pem,
                soon.cert_pem(),
                expired.cert_pem()
            ),
            direct.key_pem,
            root.cert_pem(),
        )
        .expect("a valid chain with certificates it does not use is accepted");
        assert!(days_left(&unused) > 364.0, "{}", days_left(&unused));

        let under_expired = expired.node(&[]).expect("node");
        let Err(refused) = parse(
            format!("{}{}", under_expired.cert_pem, expired.cert_pem()),
            under_expired.key_pem,
            root.cert_pem(),
        ) else {
            panic!("a chain through an expired intermediate is refused");
        };
        assert!(
            refused
                .to_string()
                .contains("an intermediate CA certificate in it expired"),
            "{refused}"
        );
    }
}
