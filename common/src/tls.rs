//! TLS and QUIC endpoint configuration for the data plane.
//!
//! The relay's QUIC certificate is self-signed unless the operator provides one; either
//! way the agent learns its SHA-256 from the `Registered` message on the control link
//! and accepts no other certificate ([`PinnedServerVerifier`]).

use std::{fmt, path::Path, sync::Arc, time::Duration};

use quinn::{
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
    IdleTimeout, TransportConfig, VarInt,
};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};

use crate::protocol::{hex, ALPN};

/// How long a QUIC connection may stay silent before it is declared dead.
pub const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often an idle QUIC connection sends a keep-alive; well below the 30 s that
/// common NATs keep a UDP mapping alive for.
pub const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(10);

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// A fresh self-signed certificate for `names` (DNS names or IP addresses).
    pub fn self_signed(names: &[&str]) -> Result<Self, TlsError> {
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let certified = rcgen::generate_simple_self_signed(names)?;
        Ok(Identity {
            chain: vec![certified.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into()),
        })
    }

    /// Loads a PEM certificate chain and a PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::Pem(cert.display().to_string(), e.to_string()))?;
        if chain.is_empty() {
            return Err(TlsError::Pem(
                cert.display().to_string(),
                "no CERTIFICATE block found".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| TlsError::Pem(key.display().to_string(), e.to_string()))?;
        Ok(Identity { chain, key })
    }

    /// SHA-256 of the leaf certificate, as pinned by agents.
    pub fn leaf_sha256(&self) -> [u8; 32] {
        self.chain.first().map(|c| sha256(c)).unwrap_or_default()
    }
}

/// Errors building TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("could not generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file could not be read.
    #[error("{0}: {1}")]
    Pem(String, String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the TLS configuration.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

/// SHA-256 of a DER blob.
pub fn sha256(der: &[u8]) -> [u8; 32] {
    let digest = ::ring::digest::digest(&::ring::digest::SHA256, der);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Transport settings shared by both ends of the data plane. `max_streams` is how many
/// bidirectional streams the *peer* may open at once.
fn transport(max_streams: u32) -> TransportConfig {
    let mut t = TransportConfig::default();
    // Cannot fail: 30 s is far below the QUIC varint limit for milliseconds.
    #[allow(clippy::unwrap_used)]
    t.max_idle_timeout(Some(IdleTimeout::try_from(QUIC_IDLE_TIMEOUT).unwrap()));
    t.keep_alive_interval(Some(QUIC_KEEP_ALIVE));
    t.max_concurrent_bidi_streams(VarInt::from_u32(max_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t
}

/// QUIC server configuration for the relay: TLS 1.3 only, ALPN [`ALPN`].
pub fn quic_server_config(identity: &Identity) -> Result<quinn::ServerConfig, TlsError> {
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(crypto).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // The agent opens exactly one stream of its own (the hello).
    config.transport_config(Arc::new(transport(2)));
    // Agents behind NAT rebind; the relay must follow them to the new address.
    config.migration(true);
    Ok(config)
}

/// QUIC client configuration for the agent: TLS 1.3 only, ALPN [`ALPN`], and only the
/// certificate whose SHA-256 is `pin` is accepted. `max_streams` bounds the Watcher
/// connections the relay may have open through this agent at once.
pub fn quic_client_config(
    pin: [u8; 32],
    max_streams: u32,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = PinnedServerVerifier {
        pin,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(crypto).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport(max_streams)));
    Ok(config)
}

/// Accepts exactly one server certificate, named by its SHA-256, whatever its names or
/// issuer; handshake signatures are still verified, so only the holder of its key passes.
pub struct PinnedServerVerifier {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PinnedServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedServerVerifier")
            .field("pin", &hex(&self.pin))
            .finish()
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = sha256(end_entity);
        if crate::secret::constant_time_eq(&seen, &self.pin) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "relay certificate sha256 {} is not the pinned {}",
                hex(&seen),
                hex(&self.pin)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
