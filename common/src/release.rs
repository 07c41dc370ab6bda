//! Signed agent releases: what `certs sign` writes beside an agent binary (the
//! detached signature, [`Release`]), and what a camera checks before it runs a new
//! agent. The signature is Ed25519 over the binary's target, version, size and
//! SHA-256 together, so a release cannot be passed off as another version or for
//! another camera; the camera trusts only the release keys it was installed with
//! (`release.pub` in the firmware package), so a compromised relay cannot run code on
//! cameras.

use std::{cmp::Ordering, fmt};

use ring::{
    digest,
    signature::{self, Ed25519KeyPair, KeyPair as _},
};
use rustls::pki_types::{pem::PemObject, PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};
use serde::{Deserialize, Serialize};

use crate::protocol::hex;

/// The [`Release::format`] this code writes and reads.
pub const FORMAT: u32 = 1;

/// What the signature covers, before the fields.
const DOMAIN: &str = "camera-agent release";

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// A release's detached signature: which binary, for what, signed by whom. Written as
/// JSON by `certs sign` (`camera-agent.sig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// [`FORMAT`].
    pub format: u32,
    /// The Rust target triple the binary runs on, e.g. `armv7-unknown-linux-gnueabihf`.
    pub target: String,
    /// The agent version inside, e.g. `0.2.0`.
    pub version: String,
    /// The binary's length in bytes.
    pub size: u64,
    /// The binary's SHA-256, lower-case hex.
    pub sha256: String,
    /// The signing key's id ([`PublicKey::id`]).
    pub key: String,
    /// The Ed25519 signature of [`Release::signed_bytes`], lower-case hex.
    pub signature: String,
}

/// Why a release is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    /// Another format than this code reads.
    #[error("release format {0} is not understood (this agent reads format {FORMAT})")]
    Format(u32),
    /// Signed by a key the camera does not trust.
    #[error("signed with release key {0}, which this camera does not trust (it trusts {1})")]
    UnknownKey(String, String),
    /// The signature does not match.
    #[error("the signature does not match the release (altered, or not signed by key {0})")]
    BadSignature(String),
    /// The bytes are not the ones signed.
    #[error("the binary is not the one signed: {0}")]
    WrongBinary(String),
}

impl Release {
    /// Signs `binary` as version `version` for `target` with `key`.
    pub fn sign(key: &SigningKey, target: &str, version: &str, binary: &[u8]) -> Release {
        let mut release = Release {
            format: FORMAT,
            target: target.to_string(),
            version: version.to_string(),
            size: binary.len() as u64,
            sha256: hex(digest::digest(&digest::SHA256, binary).as_ref()),
            key: key.public().id(),
            signature: String::new(),
        };
        release.signature = hex(key.pair.sign(&release.signed_bytes()).as_ref());
        release
    }

    /// What the signature covers: every field but the signature, one per line.
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "{DOMAIN}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            self.format, self.target, self.version, self.size, self.sha256, self.key
        )
        .into_bytes()
    }

    /// Checks that one of `trusted` signed this release.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<(), ReleaseError> {
        if self.format != FORMAT {
            return Err(ReleaseError::Format(self.format));
        }
        let Some(key) = trusted.iter().find(|k| k.id() == self.key) else {
            let ids: Vec<String> = trusted.iter().map(PublicKey::id).collect();
            let ids = if ids.is_empty() {
                "none".to_string()
            } else {
                ids.join(", ")
            };
            return Err(ReleaseError::UnknownKey(self.key.clone(), ids));
        };
        let signature = from_hex(&self.signature)
            .ok_or_else(|| ReleaseError::BadSignature(self.key.clone()))?;
        signature::UnparsedPublicKey::new(&signature::ED25519, &key.bytes)
            .verify(&self.signed_bytes(), &signature)
            .map_err(|_| ReleaseError::BadSignature(self.key.clone()))
    }

    /// Checks that `binary` is the binary this release describes.
    pub fn check_binary(&self, binary: &[u8]) -> Result<(), ReleaseError> {
        if binary.len() as u64 != self.size {
            return Err(ReleaseError::WrongBinary(format!(
                "{} bytes, not {}",
                binary.len(),
                self.size
            )));
        }
        let sha256 = hex(digest::digest(&digest::SHA256, binary).as_ref());
        if sha256 != self.sha256 {
            return Err(ReleaseError::WrongBinary(format!(
                "SHA-256 {sha256}, not {}",
                self.sha256
            )));
        }
        Ok(())
    }

    /// A short name: `0.2.0 for armv7-unknown-linux-gnueabihf`.
    pub fn describe(&self) -> String {
        format!("{} for {}", self.version, self.target)
    }
}

/// An Ed25519 release public key, as `certs release-key` writes it (`release.pub`,
/// PEM SubjectPublicKeyInfo, readable by `openssl pkey -pubin`).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    bytes: [u8; 32],
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl PublicKey {
    /// Reads a PEM public key; an error says what is wrong with it.
    pub fn from_pem(pem: &[u8]) -> Result<PublicKey, String> {
        let der = SubjectPublicKeyInfoDer::from_pem_slice(pem)
            .map_err(|e| format!("not a PEM public key: {e}"))?;
        let der = der.as_ref();
        match der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            Some(bytes) if bytes.len() == 32 => {
                let mut key = [0; 32];
                key.copy_from_slice(bytes);
                Ok(PublicKey { bytes: key })
            }
            _ => Err("not an Ed25519 public key (make one with `certs release-key`)".into()),
        }
    }

    /// The key as PEM.
    pub fn to_pem(&self) -> String {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.bytes);
        pem_encode("PUBLIC KEY", &der)
    }

    /// Its id: the first 8 bytes of its SHA-256, hex.
    pub fn id(&self) -> String {
        hex(&digest::digest(&digest::SHA256, &self.bytes).as_ref()[..8])
    }
}

/// An Ed25519 release private key (`release.key`, PEM PKCS#8).
#[derive(Debug)]
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<SigningKey, String> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| "no random numbers for a new key".to_string())?;
        Self::from_pkcs8(pkcs8.as_ref().to_vec())
    }

    /// Reads a PEM PKCS#8 key.
    pub fn from_pem(pem: &[u8]) -> Result<SigningKey, String> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem)
            .map_err(|e| format!("not a PEM private key: {e}"))?;
        Self::from_pkcs8(der.secret_pkcs8_der().to_vec())
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Result<SigningKey, String> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
            .map_err(|e| format!("not an Ed25519 key ({e}); make one with `certs release-key`"))?;
        Ok(SigningKey { pair, pkcs8 })
    }

    /// The key as PEM.
    pub fn to_pem(&self) -> String {
        pem_encode("PRIVATE KEY", &self.pkcs8)
    }

    /// Its public half.
    pub fn public(&self) -> PublicKey {
        let mut bytes = [0; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey { bytes }
    }
}

/// Compares two versions (`0.10.1` > `0.9.3`; `0.2.0-rc1` < `0.2.0`): dotted numbers,
/// then a pre-release suffix sorts before none.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let split = |v: &str| {
        let (core, pre) = v
            .split_once('-')
            .map_or((v, None), |(c, p)| (c, Some(p.to_string())));
        let numbers: Vec<u64> = core.split('.').map(|n| n.parse().unwrap_or(0)).collect();
        (numbers, pre)
    };
    let (na, pa) = split(a);
    let (nb, pb) = split(b);
    let width = na.len().max(nb.len());
    let pad = |mut n: Vec<u64>| {
        n.resize(width, 0);
        n
    };
    pad(na).cmp(&pad(nb)).then_with(|| match (pa, pb) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(x), Some(y)) => x.cmp(&y),
    })
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                encoded.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                encoded.push('=');
            }
        }
    }
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TARGET: &str = "armv7-unknown-linux-gnueabihf";

    #[test]
    fn a_signed_release_verifies_with_its_key_only() {
        let key = SigningKey::generate().unwrap();
        let binary = b"\x7fELF pretend agent".to_vec();
        let release = Release::sign(&key, TARGET, "0.2.0", &binary);
        let trusted = [key.public()];
        release.verify(&trusted).unwrap();
        release.check_binary(&binary).unwrap();

        // Every signed field matters.
        for altered in [
            Release {
                version: "9.9.9".into(),
                ..release.clone()
            },
            Release {
                target: "aarch64-unknown-linux-gnu".into(),
                ..release.clone()
            },
            Release {
                size: release.size + 1,
                ..release.clone()
            },
            Release {
                sha256: "00".repeat(32),
                ..release.clone()
            },
        ] {
            assert!(matches!(
                altered.verify(&trusted),
                Err(ReleaseError::BadSignature(_))
            ));
        }
        let other = SigningKey::generate().unwrap();
        let err = release.verify(&[other.public()]).unwrap_err();
        assert!(err.to_string().contains(&key.public().id()), "{err}");
        let mut truncated = binary.clone();
        truncated.pop();
        assert!(release
            .check_binary(&truncated)
            .unwrap_err()
            .to_string()
            .contains("bytes"));
    }

    #[test]
    fn keys_survive_pem() {
        let key = SigningKey::generate().unwrap();
        let again = SigningKey::from_pem(key.to_pem().as_bytes()).unwrap();
        assert_eq!(again.public(), key.public());
        let public = PublicKey::from_pem(key.public().to_pem().as_bytes()).unwrap();
        assert_eq!(public, key.public());
        assert!(PublicKey::from_pem(b"garbage").is_err());
        // A certificate's key (P-256) is not a release key.
        let p256 = rcgen::KeyPair::generate().unwrap();
        let err = PublicKey::from_pem(p256.public_key_pem().as_bytes()).unwrap_err();
        assert!(err.contains("Ed25519"), "{err}");
    }

    #[test]
    fn versions_compare_by_number_then_pre_release() {
        use Ordering::*;
        assert_eq!(compare_versions("0.10.0", "0.9.3"), Greater);
        assert_eq!(compare_versions("0.2.0", "0.2"), Equal);
        assert_eq!(compare_versions("0.2.0-rc1", "0.2.0"), Less);
        assert_eq!(compare_versions("1.0.0", "1.0.0"), Equal);
        assert_eq!(compare_versions("0.1.0", "0.1.1"), Less);
    }
}
