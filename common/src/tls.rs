//! TLS for both links, and QUIC endpoint configuration.
//!
//! The relay has one identity (certificate and key) for the control link (WSS) and
//! QUIC: self-signed unless the operator provides one. The agent verifies the control
//! link against a CA file, a pinned SHA-256 ([`PinnedServerVerifier`]) or, failing both,
//! the public web PKI ([`RelayTrust`]); it then learns the QUIC certificate's SHA-256
//! from the `Registered` message on that verified link and accepts no other.
//! Agents may present a client certificate (mutual TLS on both links) whose subject
//! common name is their id ([`peer_common_name`]).

use std::{fmt, path::Path, sync::Arc, time::Duration};

use quinn::{
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
    IdleTimeout, TransportConfig, VarInt,
};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::protocol::{hex, ALPN, PEER_ALPN};

/// How long a QUIC connection may stay silent before it is declared dead.
pub const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often an idle QUIC connection sends a keep-alive by default; well below the 30 s
/// that common NATs keep a UDP mapping alive for (the agent's
/// `network.quic_keepalive_interval` sets its side).
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

/// The trust anchors in a PEM file (a CA certificate, or several).
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = |why: String| TlsError::Pem(path.display().to_string(), why);
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(pem("no usable CA certificate in it".into()));
    }
    Ok(roots)
}

/// The subject common name of a DER certificate: an agent's id in its client
/// certificate.
pub fn peer_common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The relay id a cluster relay's certificate names: its subject common name, which it
/// also carries as a DNS name (as `certs peer` issues them). `None` for any other
/// certificate: an agent's, from the same CA perhaps, names no DNS name.
pub fn peer_relay_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let sans = cert.subject_alternative_name().ok()??;
    sans.value
        .general_names
        .iter()
        .any(|name| matches!(name, x509_parser::extensions::GeneralName::DNSName(d) if *d == cn))
        .then(|| cn.to_string())
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
fn transport(max_streams: u32, keep_alive: Duration) -> TransportConfig {
    let mut t = TransportConfig::default();
    // Cannot fail: 30 s is far below the QUIC varint limit for milliseconds.
    #[allow(clippy::unwrap_used)]
    t.max_idle_timeout(Some(IdleTimeout::try_from(QUIC_IDLE_TIMEOUT).unwrap()));
    t.keep_alive_interval(Some(keep_alive));
    t.max_concurrent_bidi_streams(VarInt::from_u32(max_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // BBR, not quinn's default CUBIC: every Watcher session of a camera shares this one
    // connection, and on a lossy uplink (bench: 2 % loss, 25 ms each way, 8 streams of
    // 4 Mbit/s) CUBIC's backoff on every random loss starved all of them (0 of 8 kept
    // pace, frames minutes late), while BBR, which paces by measured bandwidth and RTT
    // rather than loss, kept all 8 at pace with one stall (docs/benchmarks.md).
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    t
}

/// A TLS 1.3 server configuration with `identity`, offering `alpn`. With `client_ca`,
/// clients may present a certificate issued by it (and one from any other issuer fails
/// the handshake); whether one is required is the relay's decision per agent, made at
/// registration.
pub fn server_config(
    identity: &Identity,
    client_ca: Option<&RootCertStore>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_ca {
        Some(roots) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Quic(format!("client CA: {e}")))?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut crypto = builder.with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    crypto.alpn_protocols = vec![alpn.to_vec()];
    Ok(crypto)
}

/// How the agent decides the relay's control link is genuine.
#[derive(Debug, Clone)]
pub enum RelayTrust {
    /// Certificates issued by these CAs, for the host name dialled.
    Ca(RootCertStore),
    /// Exactly the certificates with these SHA-256s (two while the relay's certificate
    /// is being replaced), whatever their names or issuer.
    Pin(Vec<[u8; 32]>),
    /// The public web PKI (a relay behind a reverse proxy with a public certificate).
    WebPki,
}

/// A TLS 1.3 client configuration trusting `trust`, presenting `identity` if given,
/// offering `alpn` (if not empty).
pub fn client_config(
    trust: &RelayTrust,
    identity: Option<&Identity>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        RelayTrust::Ca(roots) => builder.with_root_certificates(roots.clone()),
        RelayTrust::WebPki => builder.with_root_certificates(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }),
        RelayTrust::Pin(pins) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier {
                pins: pins.clone(),
                algorithms: provider.signature_verification_algorithms,
            })),
    };
    let mut crypto = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    if !alpn.is_empty() {
        crypto.alpn_protocols = vec![alpn.to_vec()];
    }
    Ok(crypto)
}

/// QUIC server configuration for the relay: TLS 1.3 only, ALPN [`ALPN`], client
/// certificates from `client_ca` accepted (see [`server_config`]).
pub fn quic_server_config(
    identity: &Identity,
    client_ca: Option<&RootCertStore>,
) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = server_config(identity, client_ca, ALPN)?;
    let crypto = QuicServerConfig::try_from(crypto).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // The agent opens exactly one stream of its own (the hello).
    config.transport_config(Arc::new(transport(2, QUIC_KEEP_ALIVE)));
    // Agents behind NAT rebind; the relay must follow them to the new address.
    config.migration(true);
    Ok(config)
}

/// QUIC client configuration for the agent: TLS 1.3 only, ALPN [`ALPN`], and only the
/// certificate whose SHA-256 is `pin` is accepted; `identity` is presented if given.
/// `max_streams` bounds the Watcher connections the relay may have open through this
/// agent at once; `keep_alive` is how often an idle connection says it is alive.
pub fn quic_client_config(
    pin: [u8; 32],
    identity: Option<&Identity>,
    max_streams: u32,
    keep_alive: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = client_config(&RelayTrust::Pin(vec![pin]), identity, ALPN)?;
    let crypto = QuicClientConfig::try_from(crypto).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport(max_streams, keep_alive)));
    Ok(config)
}

/// Watcher connections one relay may carry through another at once.
pub const PEER_MAX_STREAMS: u32 = 16_384;

/// QUIC configurations of a cluster relay's relay-to-relay endpoint, which both serves
/// and dials: it presents `identity` either way, serves only relays presenting a
/// client certificate `ca` issued (without one the handshake fails), and dials only
/// relays whose certificate `ca` issued for the relay id dialled (the server name).
pub fn peer_quic_configs(
    identity: &Identity,
    ca: &RootCertStore,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TlsError> {
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(ca.clone()), provider())
                .build()
                .map_err(|e| TlsError::Quic(format!("cluster CA: {e}")))?,
        )
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    server.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let server = QuicServerConfig::try_from(server).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(Arc::new(transport(PEER_MAX_STREAMS, QUIC_KEEP_ALIVE)));
    // Relays have fixed addresses.
    server.migration(false);

    let client = client_config(&RelayTrust::Ca(ca.clone()), Some(identity), PEER_ALPN)?;
    let client = QuicClientConfig::try_from(client).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(Arc::new(transport(PEER_MAX_STREAMS, QUIC_KEEP_ALIVE)));
    Ok((server, client))
}

/// Accepts exactly the server certificates named by their SHA-256, whatever their names
/// or issuer; handshake signatures are still verified, so only the holder of the key
/// passes.
pub struct PinnedServerVerifier {
    pins: Vec<[u8; 32]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PinnedServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedServerVerifier")
            .field(
                "pins",
                &self.pins.iter().map(|p| hex(p)).collect::<Vec<_>>(),
            )
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
        if self
            .pins
            .iter()
            .any(|pin| crate::secret::constant_time_eq(&seen, pin))
        {
            Ok(ServerCertVerified::assertion())
        } else {
            let pinned: Vec<String> = self.pins.iter().map(|p| hex(p)).collect();
            Err(rustls::Error::General(format!(
                "relay certificate sha256 {} is not the pinned {}",
                hex(&seen),
                pinned.join(" or ")
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
