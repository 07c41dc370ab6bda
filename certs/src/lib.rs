//! Certificates for the tunnel, made with rcgen: a private CA, the relay's certificate
//! (WSS and QUIC), and one client certificate per agent whose subject common name is
//! the agent id. All keys are ECDSA P-256; every certificate starts one hour in the past
//! so a clock a little behind does not reject a fresh one.
//!
//! Without a CA the relay's certificate is self-signed, as in the quick start: agents
//! then pin its SHA-256 ([`fingerprint_pem`]), which stays the same across restarts as
//! long as the relay keeps its files.

#![forbid(unsafe_code)]

use std::{
    fmt,
    fs::OpenOptions,
    io::Write,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use common::{
    protocol::{check_agent_id, hex},
    tls::sha256,
};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use time::{Duration, OffsetDateTime};

/// Default validity of a CA, in days.
pub const CA_DAYS: u32 = 3650;
/// Default validity of the relay's certificate, in days.
pub const RELAY_DAYS: u32 = 825;
/// Default validity of an agent's certificate, in days: cameras are rarely touched, so
/// longer than the relay's; rotate by issuing a new one (docs/security.md).
pub const AGENT_DAYS: u32 = 1825;

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
    /// A release key or signature could not be made.
    #[error("{0}")]
    Release(String),
    /// A file holds no certificate.
    #[error("{0}: no PEM certificate found")]
    NoCertificate(PathBuf),
    /// A file holds no usable private key.
    #[error("{path}: not a PEM private key ({why})")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A certificate could not be read.
    #[error("{path}: not a certificate this tool can read ({why})")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// An argument is out of place.
    #[error("{0}")]
    Invalid(String),
}

/// A CA loaded from its files, ready to sign.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("key", &"***")
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads `ca.crt` and `ca.key` as written by [`ca_certificate`] and [`write_pair`].
    pub fn load(cert: &Path, key: &Path) -> Result<Ca, CertError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CertError::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let key = KeyPair::from_pem(&read(key)?).map_err(|e| CertError::BadKey {
            path: key.to_path_buf(),
            why: e.to_string(),
        })?;
        let params = CertificateParams::from_ca_cert_pem(&read(cert)?).map_err(|e| {
            CertError::BadCertificate {
                path: cert.to_path_buf(),
                why: e.to_string(),
            }
        })?;
        // Re-signing yields the same subject and key, which is all a signer needs.
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert, key })
    }
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start.
    pub not_before: OffsetDateTime,
    /// End.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From one hour ago for `days` days (1 to 36500).
    pub fn days(days: u32) -> Result<Self, CertError> {
        if days == 0 || days > 36_500 {
            return Err(CertError::Invalid(format!(
                "--days {days}: give 1 to 36500 days"
            )));
        }
        let now = OffsetDateTime::now_utc();
        Ok(Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        })
    }

    fn apply(self, params: &mut CertificateParams) {
        params.not_before = self.not_before;
        params.not_after = self.not_after;
    }
}

fn finish(params: CertificateParams, ca: Option<&Ca>) -> Result<PemPair, CertError> {
    let key = KeyPair::generate()?;
    let cert = match ca {
        Some(ca) => params.signed_by(&key, &ca.cert, &ca.key)?,
        None => params.self_signed(&key)?,
    };
    Ok(PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A CA certificate named `name`, for signing the relay's and the agents' certificates.
pub fn ca_certificate(name: &str, validity: Validity) -> Result<PemPair, CertError> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity.apply(&mut params);
    finish(params, None)
}

/// The relay's server certificate (WSS and QUIC), valid for the given DNS names and IP
/// addresses: signed by `ca`, or self-signed without one.
pub fn relay_certificate(
    dns: &[String],
    ips: &[IpAddr],
    validity: Validity,
    ca: Option<&Ca>,
) -> Result<PemPair, CertError> {
    if dns.is_empty() && ips.is_empty() {
        return Err(CertError::Invalid(
            "name the relay: --dns NAME and/or --ip ADDRESS, as agents dial it".into(),
        ));
    }
    let mut params = CertificateParams::new(dns.to_vec())?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params
        .distinguished_name
        .push(DnType::CommonName, "camera-relay");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity.apply(&mut params);
    finish(params, ca)
}

/// An agent's client certificate, signed by `ca`, whose subject common name is `id`.
pub fn agent_certificate(id: &str, validity: Validity, ca: &Ca) -> Result<PemPair, CertError> {
    check_agent_id(id).map_err(|why| CertError::Invalid(format!("agent id {why}")))?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, id);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity.apply(&mut params);
    finish(params, Some(ca))
}

/// A cluster relay's certificate for its relay-to-relay links, signed by `ca`: its
/// subject common name and a DNS name are the relay id (`[cluster] relay_id`), which
/// the other relays check, and it serves as both server and client certificate.
pub fn peer_certificate(id: &str, validity: Validity, ca: &Ca) -> Result<PemPair, CertError> {
    check_agent_id(id).map_err(|why| CertError::Invalid(format!("relay id {why}")))?;
    let mut params = CertificateParams::new(vec![id.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, id);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity.apply(&mut params);
    finish(params, Some(ca))
}

/// A fresh random agent token: 32 bytes from the OS's generator, as 64 hex digits.
pub fn new_token() -> String {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    hex(&bytes)
}

/// The argon2id hash of `token` with a fresh salt, in PHC format: what the relay's
/// config stores (`token_hash`) instead of the token itself.
pub fn hash_token(token: &str) -> Result<String, CertError> {
    use argon2::{
        password_hash::{rand_core::OsRng, PasswordHasher, SaltString},
        Argon2,
    };
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(token.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| CertError::Invalid(format!("cannot hash the token: {e}")))
}

/// What `certs inspect` prints about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// Subject distinguished name.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Subject alternative names (`DNS:…`, `IP:…`).
    pub sans: Vec<String>,
    /// Start of validity (RFC 3339).
    pub not_before: String,
    /// End of validity (RFC 3339).
    pub not_after: String,
    /// True if it may sign certificates.
    pub is_ca: bool,
    /// SHA-256 of the DER, lower-case hex.
    pub sha256: String,
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "subject     {}", self.subject)?;
        writeln!(f, "issuer      {}", self.issuer)?;
        let sans = if self.sans.is_empty() {
            "(none)".to_string()
        } else {
            self.sans.join(", ")
        };
        writeln!(f, "SANs        {sans}")?;
        writeln!(f, "not before  {}", self.not_before)?;
        writeln!(f, "not after   {}", self.not_after)?;
        writeln!(f, "CA          {}", if self.is_ca { "yes" } else { "no" })?;
        write!(f, "sha256      {}", self.sha256)
    }
}

/// Reads the first certificate of a PEM file.
pub fn inspect(path: &Path) -> Result<Inspection, CertError> {
    let der = first_certificate(path)?;
    let bad = |why: String| CertError::BadCertificate {
        path: path.to_path_buf(),
        why,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad(e.to_string()))?;
    let sans = match cert
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?
    {
        Some(ext) => ext
            .value
            .general_names
            .iter()
            .map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(d) => format!("DNS:{d}"),
                x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                    4 => format!(
                        "IP:{}",
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap_or_default())
                    ),
                    16 => format!(
                        "IP:{}",
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap_or_default())
                    ),
                    _ => "IP:?".to_string(),
                },
                other => other.to_string(),
            })
            .collect(),
        None => Vec::new(),
    };
    let time = |t: x509_parser::time::ASN1Time| {
        t.to_datetime()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| t.to_string())
    };
    Ok(Inspection {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        sans,
        not_before: time(cert.validity().not_before),
        not_after: time(cert.validity().not_after),
        is_ca: cert.is_ca(),
        sha256: hex(&sha256(&der)),
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
    let [key, cert] = write_files(
        dir,
        [
            (format!("{stem}.key"), pair.key.as_bytes(), 0o600),
            (format!("{stem}.crt"), pair.cert.as_bytes(), 0o644),
        ],
        force,
    )?;
    Ok((cert, key))
}

/// Writes an Ed25519 release key pair into `dir`: `release.key` (PKCS#8, mode 0600:
/// keep it offline) and `release.pub` (what cameras trust, in the firmware package).
/// Returns their paths, public first.
pub fn write_release_key(dir: &Path, force: bool) -> Result<(PathBuf, PathBuf), CertError> {
    let key = common::release::SigningKey::generate().map_err(CertError::Release)?;
    let [private, public] = write_files(
        dir,
        [
            ("release.key".to_string(), key.to_pem().as_bytes(), 0o600),
            (
                "release.pub".to_string(),
                key.public().to_pem().as_bytes(),
                0o644,
            ),
        ],
        force,
    )?;
    Ok((public, private))
}

/// Signs the agent binary `file` as `version` for `target` with the release key at
/// `key`, writing the detached signature to `out`.
pub fn sign_release(
    file: &Path,
    key: &Path,
    target: &str,
    version: &str,
    out: &Path,
    force: bool,
) -> Result<common::release::Release, CertError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let signing = common::release::SigningKey::from_pem(&read(key)?)
        .map_err(|why| CertError::Release(format!("{}: {why}", key.display())))?;
    if target.is_empty() || target.contains(char::is_whitespace) {
        return Err(CertError::Release(format!(
            "{target:?} is not a target triple (e.g. armv7-unknown-linux-gnueabihf)"
        )));
    }
    if version.is_empty() || version.contains(char::is_whitespace) {
        return Err(CertError::Release(format!(
            "{version:?} is not a version (e.g. 0.2.0)"
        )));
    }
    let release = common::release::Release::sign(&signing, target, version, &read(file)?);
    let json =
        serde_json::to_string_pretty(&release).map_err(|e| CertError::Release(e.to_string()))?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    write_files(dir, [(name, format!("{json}\n").as_bytes(), 0o644)], force)?;
    Ok(release)
}

/// Writes each `(name, bytes, mode)` into `dir`, none if any exists (unless `force`);
/// their paths, in order.
fn write_files<const N: usize>(
    dir: &Path,
    files: [(String, &[u8], u32); N],
    force: bool,
) -> Result<[PathBuf; N], CertError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let paths = files.each_ref().map(|(name, _, _)| dir.join(name));
    for path in &paths {
        if !force && path.exists() {
            return Err(CertError::Exists(path.clone()));
        }
    }
    for (path, (_, bytes, mode)) in paths.iter().zip(&files) {
        write_file(path, bytes, *mode).map_err(io(path))?;
    }
    Ok(paths)
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
    Ok(hex(&sha256(&first_certificate(path)?)))
}

fn first_certificate(path: &Path) -> Result<CertificateDer<'static>, CertError> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| CertError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?
        .next()
        .ok_or_else(|| CertError::NoCertificate(path.to_path_buf()))?
        .map_err(|_| CertError::NoCertificate(path.to_path_buf()))
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
            Validity::days(RELAY_DAYS).unwrap(),
            None,
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
    fn tokens_are_random_and_hash_to_argon2id_phc_strings() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let hash = hash_token(&a).unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains(&a));
        assert_ne!(hash, hash_token(&a).unwrap(), "salted");
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

    #[test]
    fn a_ca_signs_relay_and_agent_certificates_that_inspect_right() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_certificate("test CA", Validity::days(CA_DAYS).unwrap()).unwrap();
        let (ca_cert, ca_key) = write_pair(dir.path(), "ca", &ca, false).unwrap();
        let ca = Ca::load(&ca_cert, &ca_key).unwrap();
        assert!(!format!("{ca:?}").contains("PRIVATE"));

        let relay = relay_certificate(
            &["relay.example.com".into()],
            &["203.0.113.5".parse().unwrap()],
            Validity::days(RELAY_DAYS).unwrap(),
            Some(&ca),
        )
        .unwrap();
        let (relay_cert, _) = write_pair(dir.path(), "relay", &relay, false).unwrap();
        let seen = inspect(&relay_cert).unwrap();
        assert_eq!(seen.subject, "CN=camera-relay");
        assert_eq!(seen.issuer, "CN=test CA");
        assert_eq!(seen.sans, ["DNS:relay.example.com", "IP:203.0.113.5"]);
        assert!(!seen.is_ca);
        assert_eq!(seen.sha256, fingerprint_pem(&relay_cert).unwrap());
        let at = |t: &str| {
            OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap()
        };
        let span = at(&seen.not_after) - at(&seen.not_before);
        assert_eq!(span.whole_days(), i64::from(RELAY_DAYS), "{seen}");
        assert!(at(&seen.not_before) < OffsetDateTime::now_utc());

        let agent = agent_certificate(
            "dahua-2449s-il-001",
            Validity::days(AGENT_DAYS).unwrap(),
            &ca,
        )
        .unwrap();
        let (agent_cert, agent_key) =
            write_pair(dir.path(), "dahua-2449s-il-001", &agent, false).unwrap();
        let seen = inspect(&agent_cert).unwrap();
        assert_eq!(seen.subject, "CN=dahua-2449s-il-001");
        assert_eq!(seen.issuer, "CN=test CA");
        assert!(inspect(&ca_cert).unwrap().is_ca);
        assert_eq!(
            std::fs::metadata(&agent_key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let text = seen.to_string();
        assert!(
            text.contains("not after") && text.contains(&seen.sha256),
            "{text}"
        );

        // A relay's peer certificate names its id twice; an agent's does not count as one.
        let peer = peer_certificate("relay-a", Validity::days(RELAY_DAYS).unwrap(), &ca).unwrap();
        let (peer_cert, _) = write_pair(dir.path(), "peer-relay-a", &peer, false).unwrap();
        let seen = inspect(&peer_cert).unwrap();
        assert_eq!(seen.subject, "CN=relay-a");
        assert_eq!(seen.sans, ["DNS:relay-a"]);
        assert_eq!(
            common::tls::peer_relay_id(&first_certificate(&peer_cert).unwrap()).as_deref(),
            Some("relay-a")
        );
        assert_eq!(
            common::tls::peer_relay_id(&first_certificate(&agent_cert).unwrap()),
            None
        );
        assert!(peer_certificate("a/b", Validity::days(1).unwrap(), &ca).is_err());

        assert!(
            agent_certificate("bad id", Validity::days(AGENT_DAYS).unwrap(), &ca)
                .unwrap_err()
                .to_string()
                .contains("agent id")
        );
        assert!(
            relay_certificate(&[], &[], Validity::days(RELAY_DAYS).unwrap(), None)
                .unwrap_err()
                .to_string()
                .contains("--dns")
        );
        assert!(Validity::days(0)
            .unwrap_err()
            .to_string()
            .contains("--days"));
    }
}
