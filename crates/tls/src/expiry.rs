//! Certificate expiry made visible: a gauge of the seconds left on this node's certificate
//! chain (`fn_tls_certificate_expiry_seconds`, to the earliest end of the certificate and the
//! intermediates presented with it; negative once it has expired) and on the CA
//! bundle's first certificate to expire (`fn_tls_ca_expiry_seconds`) on every daemon's
//! `/metrics`, and a warning in the log once a day from [`WARN_BEFORE`] before the node
//! certificate's end.
//!
//! Alert on the gauge, e.g. `fn_tls_certificate_expiry_seconds < 7 * 86400`: a daemon whose
//! certificate expires stops talking to the cluster.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::NodeTls;

/// From how long before the end the log warns.
pub const WARN_BEFORE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the log warns while the end is near.
pub const WARN_EVERY: Duration = Duration::from_secs(24 * 3600);

/// The end of the validity (`notAfter`) of the first certificate in `pem` (blocks of other
/// kinds, a key before it say, are skipped, as rustls skips them).
///
/// # Errors
/// A message when `pem` holds no parsable certificate.
pub fn not_after(pem: &[u8]) -> Result<SystemTime, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let first = CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or("not a PEM certificate: no CERTIFICATE block")?
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    Ok(Validity::of(&first)?.not_after)
}

/// When a certificate is valid, and the names it is valid for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Its subject alternative names, DNS names and IP addresses, as text.
    pub names: Vec<String>,
}

impl Validity {
    /// Reads them from a DER certificate.
    ///
    /// # Errors
    /// A message when `der` is not a parsable X.509 certificate.
    pub fn of(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let at = |seconds: i64| {
            u64::try_from(seconds)
                .map(|s| UNIX_EPOCH + Duration::from_secs(s))
                .unwrap_or(UNIX_EPOCH)
        };
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        names.push((*dns).to_owned());
                    }
                    x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                        let ip = match bytes.len() {
                            4 => <[u8; 4]>::try_from(*bytes)
                                .ok()
                                .map(|b| std::net::IpAddr::from(b).to_string()),
                            16 => <[u8; 16]>::try_from(*bytes)
                                .ok()
                                .map(|b| std::net::IpAddr::from(b).to_string()),
                            _ => None,
                        };
                        names.extend(ip);
                    }
                    _ => {}
                }
            }
        }
        Ok(Validity {
            not_before: at(cert.validity().not_before.timestamp()),
            not_after: at(cert.validity().not_after.timestamp()),
            names,
        })
    }
}

/// Seconds from `now` to `end`; negative once `end` has passed.
fn seconds_left(end: SystemTime, now: SystemTime) -> f64 {
    match end.duration_since(now) {
        Ok(left) => left.as_secs_f64(),
        Err(past) => -past.duration().as_secs_f64(),
    }
}

/// Whether to warn at `now` about a certificate ending at `end`, last warned at `warned`.
fn should_warn(end: SystemTime, now: SystemTime, warned: Option<SystemTime>) -> bool {
    let near = end
        .duration_since(now)
        .map_or(true, |left| left <= WARN_BEFORE);
    // A clock stepped back behind the last warning warns again, rather than staying quiet
    // until it has caught up.
    near && warned.is_none_or(|at| now.duration_since(at).map_or(true, |gap| gap >= WARN_EVERY))
}

/// The expiry gauge and warnings of one daemon's certificate. It reads the certificate in
/// use each time, so after a reload it follows the new one; the gauge is computed when it
/// is scraped, so it is exact to the second.
#[derive(Debug, Clone)]
pub struct CertExpiry {
    tls: NodeTls,
    warned: Arc<std::sync::Mutex<Option<SystemTime>>>,
}

/// Encodes the gauge at scrape time.
#[derive(Debug)]
struct ExpiryCollector(NodeTls);

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = SystemTime::now();
        let gauge = ConstGauge::new(seconds_left(self.0.not_after(), now));
        gauge.encode(encoder.encode_descriptor(
            "fn_tls_certificate_expiry",
            "Time left until this node's certificate (FN_NODE_CERT) expires; negative once it has",
            Some(&Unit::Seconds),
            gauge.metric_type(),
        )?)?;
        let ca = ConstGauge::new(seconds_left(self.0.ca_not_after(), now));
        ca.encode(encoder.encode_descriptor(
            "fn_tls_ca_expiry",
            "Time left until the first CA certificate of FN_NODE_CERT_AUTHORITY expires; \
             negative once it has (the daemons, on rustls, ignore a CA's dates; other TLS \
             clients may check them)",
            Some(&Unit::Seconds),
            ca.metric_type(),
        )?)
    }
}

impl CertExpiry {
    /// The gauge of `tls`'s certificate, registered in `registry` as
    /// `fn_tls_certificate_expiry_seconds`; warns now if the end is near.
    pub fn register(tls: &NodeTls, registry: &mut Registry) -> Self {
        registry.register_collector(Box::new(ExpiryCollector(tls.clone())));
        let expiry = CertExpiry {
            tls: tls.clone(),
            warned: Arc::default(),
        };
        expiry.check(SystemTime::now());
        expiry
    }

    /// The end of the validity of the certificate in use.
    pub fn end(&self) -> SystemTime {
        self.tls.not_after()
    }

    /// Warns when due.
    pub(crate) fn check(&self, now: SystemTime) {
        let end = self.end();
        let left = seconds_left(end, now);
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if should_warn(end, now, *warned) {
            *warned = Some(now);
            let end = humantime::format_rfc3339_seconds(end);
            if left < 0.0 {
                tracing::error!(%end, "this node's certificate (FN_NODE_CERT) has expired: peers refuse it; replace it");
            } else {
                tracing::warn!(%end, days_left = (left / 86_400.0) as u64, "this node's certificate (FN_NODE_CERT) expires soon; replace it");
            }
        }
    }

    /// After a reload: warnings about the new certificate start afresh.
    pub(crate) fn replaced(&self, now: SystemTime) {
        *self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.check(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::DevCa;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn not_after_is_read_from_the_certificate() {
        let ca = DevCa::new("expiry test CA").expect("ca");
        let now = SystemTime::now();
        let node = ca.node_expiring_in(&[], 3).expect("node");
        let end = not_after(node.cert_pem.as_bytes()).expect("parses");
        let left = seconds_left(end, now);
        assert!(
            (left - 3.0 * 86_400.0).abs() < 120.0,
            "about three days left: {left}"
        );
        assert!(
            not_after(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err()
        );
        assert!(not_after(b"not pem").is_err());
    }

    #[test]
    fn the_gauge_counts_down_and_goes_negative_after_the_end() {
        let ca = DevCa::new("expiry test CA").expect("ca");
        let node = ca.node_expiring_in(&[], 10).expect("node");
        let tls = NodeTls::from_pem(
            node.cert_pem.into_bytes(),
            node.key_pem.into_bytes(),
            ca.cert_pem().as_bytes().to_vec(),
        )
        .expect("valid material");
        let mut registry = Registry::default();
        let expiry = CertExpiry::register(&tls, &mut registry);
        let scrape = |registry: &Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry).expect("encodes");
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix("fn_tls_certificate_expiry_seconds "))
                .unwrap_or_else(|| panic!("no gauge in {text}"))
                .parse::<f64>()
                .expect("a number");
            (value, text)
        };
        let (left, text) = scrape(&registry);
        let exact = seconds_left(expiry.end(), SystemTime::now());
        assert!((left - exact).abs() < 1.0, "{left} against {exact}");
        assert!((left - 10.0 * 86_400.0).abs() < 120.0, "{left}");
        assert!(
            text.contains("# UNIT fn_tls_certificate_expiry_seconds seconds"),
            "{text}"
        );
        // The CA: valid until ten years from now.
        let ca_left: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("fn_tls_ca_expiry_seconds "))
            .expect("the CA gauge")
            .parse()
            .expect("a number");
        assert!((ca_left - 3650.0 * 86_400.0).abs() < 120.0, "{ca_left}");
        assert!(seconds_left(expiry.end(), expiry.end() + DAY) + 86_400.0 < 1.0);
    }

    /// An intermediate CA in `FN_NODE_CERT` that ends before the node certificate ends the
    /// chain, for the gauge as for peers (before, the gauge showed the leaf's year).
    #[test]
    fn an_intermediate_ending_first_is_the_end_of_the_chain() {
        let root = DevCa::new("expiry test root").expect("root");
        let intermediate = root
            .intermediate_expiring_in("expiry test intermediate", 2)
            .expect("intermediate");
        let node = intermediate.node(&[]).expect("a node valid for a year");
        let tls = NodeTls::from_pem(
            format!("{}{}", node.cert_pem, intermediate.cert_pem()).into_bytes(),
            node.key_pem.into_bytes(),
            root.cert_pem().as_bytes().to_vec(),
        )
        .expect("valid material");
        let mut registry = Registry::default();
        let _expiry = CertExpiry::register(&tls, &mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        let left: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("fn_tls_certificate_expiry_seconds "))
            .unwrap_or_else(|| panic!("no gauge in {text}"))
            .parse()
            .expect("a number");
        assert!(
            (left - 2.0 * 86_400.0).abs() < 120.0,
            "two days left: {left}"
        );
    }

    #[test]
    fn warnings_start_seven_days_before_the_end_and_repeat_daily() {
        let now = SystemTime::now();
        let end = now + 10 * DAY;
        assert!(!should_warn(end, now, None), "ten days left");
        let soon = end - 6 * DAY;
        assert!(should_warn(end, soon, None), "six days left");
        assert!(
            !should_warn(end, soon + DAY / 2, Some(soon)),
            "not twice a day"
        );
        assert!(should_warn(end, soon + DAY, Some(soon)), "the next day");
        assert!(
            should_warn(end, end + DAY, Some(end)),
            "expired, a day later"
        );
        assert!(
            should_warn(end, soon - DAY, Some(soon)),
            "the clock stepped back a day behind the last warning"
        );
    }
}
