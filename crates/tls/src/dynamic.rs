//! rustls configs that look up the current material of a [`NodeTls`] at every handshake.
//!
//! The server side resolves its certificate and verifies clients through [`ServerSide`]; the
//! client side presents its certificate and verifies servers through [`ClientSide`]. Both
//! take the set in use when the handshake runs, so a reload needs no new config, listener or
//! channel, and connections already open are not touched (they are checked again apart:
//! [`NodeTls::recheck_connections`]).
//!
//! Session resumption is off on both sides: a resumed session would skip verification
//! against the current CA bundle, and the dataplane's gRPC connections are long-lived, so
//! full handshakes cost nothing measurable.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::NodeTls;

/// The ALPN protocol of gRPC.
const H2: &[u8] = b"h2";

impl NodeTls {
    /// A rustls server config: presents the current certificate and requires a client
    /// certificate that chains to the current CA bundle.
    ///
    /// # Errors
    /// When the crypto provider supports none of the default protocol versions (not with ring).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let side = Arc::new(ServerSide(self.clone()));
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::clone(&self.shared.provider))
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(Arc::clone(&side) as Arc<dyn ClientCertVerifier>)
                .with_cert_resolver(side);
        config.alpn_protocols = vec![H2.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// A rustls client config: verifies servers against the current CA bundle and presents
    /// the current certificate.
    ///
    /// # Errors
    /// When the crypto provider supports none of the default protocol versions (not with ring).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        self.client_config_recording(None)
    }

    /// [`NodeTls::client_config`] for one dial, recording in `presented` the certificate
    /// the handshake presents (a reload during the handshake may put another in use).
    pub(crate) fn client_config_recording(
        &self,
        presented: Option<Arc<std::sync::OnceLock<Arc<CertifiedKey>>>>,
    ) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        let side = Arc::new(ClientSide {
            tls: self.clone(),
            presented,
        });
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::clone(&self.shared.provider))
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::clone(&side) as Arc<dyn ServerCertVerifier>)
                .with_client_cert_resolver(side);
        config.alpn_protocols = vec![H2.to_vec()];
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// The name to verify in the certificate of a server dialled at `host`.
    pub(crate) fn server_name_for<'a>(&'a self, host: &'a str) -> &'a str {
        self.server_name.as_deref().unwrap_or(host)
    }
}

/// The server's view of the current material.
struct ServerSide(NodeTls);

impl std::fmt::Debug for ServerSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ServerSide").field(&self.0).finish()
    }
}

impl ResolvesServerCert for ServerSide {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.current().certified))
    }
}

impl ClientCertVerifier for ServerSide {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would have to outlive a reload. Clients of the dataplane present their one
        // certificate whatever the hints, so none are sent.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().client_verifier.supported_verify_schemes()
    }
}

/// The client's view of the current material.
struct ClientSide {
    tls: NodeTls,
    /// Where a dial records the certificate it presented.
    presented: Option<Arc<std::sync::OnceLock<Arc<CertifiedKey>>>>,
}

impl std::fmt::Debug for ClientSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ClientSide").field(&self.tls).finish()
    }
}

impl ResolvesClientCert for ClientSide {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let certified = Arc::clone(&self.tls.current().certified);
        if let Some(presented) = &self.presented {
            let _first_only = presented.set(Arc::clone(&certified));
        }
        Some(certified)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ServerCertVerifier for ClientSide {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.tls.current().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls
            .current()
            .server_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls
            .current()
            .server_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.tls
            .current()
            .server_verifier
            .supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rustls::{CipherSuite, ClientConnection, ServerConnection};

    use super::*;
    use crate::dev::DevCa;

    /// Moves every TLS record `from` has to send into `to`, which then processes them.
    fn deliver<A, B>(from: &mut rustls::ConnectionCommon<A>, to: &mut rustls::ConnectionCommon<B>) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).expect("peer writes");
        }
        let mut rest = &wire[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).expect("peer reads");
        }
        to.process_new_packets().expect("peer accepts the flight");
    }

    /// Shakes hands in memory; answers the suite each side settled on.
    fn negotiate(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> (CipherSuite, CipherSuite) {
        let name = ServerName::try_from("localhost").expect("server name");
        let mut client = ClientConnection::new(client, name).expect("client connection");
        let mut server = ServerConnection::new(server).expect("server connection");
        for _flight in 0..8 {
            deliver(&mut client, &mut server);
            deliver(&mut server, &mut client);
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!client.is_handshaking(), "client finished its handshake");
        assert!(!server.is_handshaking(), "server finished its handshake");
        let suite = |s: Option<rustls::SupportedCipherSuite>| s.expect("a suite").suite();
        (
            suite(client.negotiated_cipher_suite()),
            suite(server.negotiated_cipher_suite()),
        )
    }

    #[test]
    fn nodes_agree_on_aes_128_gcm() {
        let ca = DevCa::new("ca").expect("ca");
        let server = ca.node_tls(&[]).expect("server node");
        let client = ca.node_tls(&[]).expect("client node");
        let agreed = negotiate(
            client.client_config().expect("client config"),
            server.server_config().expect("server config"),
        );
        let aes_128 = CipherSuite::TLS13_AES_128_GCM_SHA256;
        assert_eq!(agreed, (aes_128, aes_128));
    }

    #[test]
    fn a_peer_that_prefers_aes_256_still_gets_it() {
        // A node built before AES-128 went first, dialling a new one mid rolling restart.
        let ca = DevCa::new("ca").expect("ca");
        let server = ca.node_tls(&[]).expect("server node");
        let old = Arc::new(ClientSide {
            tls: ca.node_tls(&[]).expect("client node"),
            presented: None,
        });
        let mut old_client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&old) as Arc<dyn ServerCertVerifier>)
        .with_client_cert_resolver(old);
        old_client.alpn_protocols = vec![H2.to_vec()];
        let agreed = negotiate(
            Arc::new(old_client),
            server.server_config().expect("server config"),
        );
        let aes_256 = CipherSuite::TLS13_AES_256_GCM_SHA384;
        assert_eq!(agreed, (aes_256, aes_256));
    }
}
