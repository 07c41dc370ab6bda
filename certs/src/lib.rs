//! Certificates for the tunnel, made with rcgen.
//!
//! Today: the relay's QUIC certificate. The relay makes a throw-away one at every start
//! unless its config names one (`[tls] quic_cert`, `quic_key`); a certificate written
//! by [`relay_certificate`] keeps its SHA-256 fingerprint (the pin agents learn at
//! registration) the same across restarts, which operators can check with
//! [`fingerprint_pem`].

#![forbid(unsafe_code)]

use std::{
    fs::OpenOptions,
    io::Write,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use common::{protocol::hex, tls::sha256};
use rcgen::{CertificateParams, DnType, KeyPair, SanType};
use rustls::pki_types::{pem::PemObject, CertificateDer};

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct PemPair {
    /// The certificate.
    pub cert: String,
    /// The private key (PKCS#8). Never printed: see the `Debug` impl.
    pub key: String,
}

impl std::fmt::Debug for PemPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemPair")
            .field("cert", &self.cert)
            .field("key", &"***")
            .finish()
    }
}

/// Errors of this crate, saying which file and why.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters.
    #[error("cannot create the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file exists and `--force` was not given.
    #[error("{0} exists; pass --force to replace it")]
    Exists(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no certificate.
    #[error("{0}: no PEM certificate found")]
    NoCertificate(PathBuf),
}

/// A self-signed ECDSA P-256 certificate for the relay's QUIC endpoint, valid for the
/// given DNS names and IP addresses.
pub fn relay_certificate(dns: &[String], ips: &[IpAddr]) -> Result<PemPair, CertError> {
    let mut params = CertificateParams::new(dns.to_vec())?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params
        .distinguished_name
        .push(DnType::CommonName, "camera-relay");
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Writes `pair` as `<dir>/<stem>.crt` and `<dir>/<stem>.key` (the key with mode 0600),
/// refusing to replace existing files unless `force`. Returns the two paths.
pub fn write_pair(
    dir: &Path,
    stem: &str,
    pair: &PemPair,
    force: bool,
) -> Result<(PathBuf, PathBuf), CertError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cert_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    for path in [&cert_path, &key_path] {
        if !force && path.exists() {
            return Err(CertError::Exists(path.clone()));
        }
    }
    write_file(&key_path, pair.key.as_bytes(), 0o600).map_err(io(&key_path))?;
    write_file(&cert_path, pair.cert.as_bytes(), 0o644).map_err(io(&cert_path))?;
    Ok((cert_path, key_path))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    // Remove first so an existing file's wider permissions are not inherited.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// SHA-256 of the first certificate in a PEM file, as lower-case hex: the pin agents
/// compare the relay's QUIC certificate against.
pub fn fingerprint_pem(path: &Path) -> Result<String, CertError> {
    let cert = CertificateDer::pem_file_iter(path)
        .map_err(|e| CertError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?
        .next()
        .ok_or_else(|| CertError::NoCertificate(path.to_path_buf()))?
        .map_err(|_| CertError::NoCertificate(path.to_path_buf()))?;
    Ok(hex(&sha256(&cert)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn relay_certificate_round_trips_through_files_and_loads_as_identity() {
        let dir = tempfile::tempdir().unwrap();
        let pair = relay_certificate(
            &["relay.example.com".into()],
            &["203.0.113.5".parse().unwrap()],
        )
        .unwrap();
        let (cert, key) = write_pair(dir.path(), "relay", &pair, false).unwrap();
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let identity = common::tls::Identity::from_pem_files(&cert, &key).unwrap();
        assert_eq!(
            fingerprint_pem(&cert).unwrap(),
            hex(&identity.leaf_sha256())
        );
        assert!(!format!("{pair:?}").contains("PRIVATE KEY"));

        let e = write_pair(dir.path(), "relay", &pair, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        write_pair(dir.path(), "relay", &pair, true).unwrap();
    }

    #[test]
    fn fingerprint_of_a_file_without_certificate_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "nothing here").unwrap();
        assert!(fingerprint_pem(&path)
            .unwrap_err()
            .to_string()
            .contains("no PEM certificate"));
    }
}
