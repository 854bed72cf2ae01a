//! A node's identity: an Ed25519 key pair and a self-signed certificate (rcgen).
//!
//! The identity of a node is the SHA-256 of its certificate's SubjectPublicKeyInfo (DER): the
//! [`Fingerprint`]. It names the key, not the certificate, so a node that renews its certificate
//! with the same key stays the same peer. The same key signs advertisements and reputation
//! reports with a domain separator (`domain || 0x00 || message`), so a signature made for one
//! purpose can never be replayed as another.

use std::{
    fs::OpenOptions,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ED25519,
};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer,
    pem::{PemObject, SectionKind},
};
use sha2::{Digest, Sha256};
use x509_parser::{oid_registry::OID_SIG_ED25519, prelude::FromDer, x509::SubjectPublicKeyInfo};

use crate::model::{Fingerprint, UnixMs, now_ms};

/// How long a generated certificate is valid (ten years): the fingerprint, not the
/// certificate, is what peers pin, and an operator renews by running `init` again.
const VALIDITY_DAYS: i64 = 3650;

/// Largest PEM file accepted when loading a key or certificate.
const MAX_PEM_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot generate the node certificate: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: refusing to overwrite an existing file")]
    Exists { path: PathBuf },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("the private key is not an ed25519 pkcs#8 key: {0}")]
    Key(String),
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
    #[error("malformed certificate: {0}")]
    Certificate(String),
    #[error("not an ed25519 public key")]
    NotEd25519,
    #[error("bad signature")]
    BadSignature,
}

/// What the TLS layer and the policy need to know about a peer's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// SHA-256 of the SubjectPublicKeyInfo.
    pub fingerprint: Fingerprint,
    /// The SubjectPublicKeyInfo, DER.
    pub spki_der: Vec<u8>,
    /// Subject O= (a claim of the key holder unless the certificate chains to the CA bundle).
    pub organisation: Option<String>,
    /// Subject CN=.
    pub common_name: Option<String>,
    /// End of the validity period.
    pub not_after_ms: UnixMs,
}

/// This node's key pair and certificate.
#[derive(Clone)]
pub struct NodeIdentity {
    pub fingerprint: Fingerprint,
    pub cert_der: CertificateDer<'static>,
    pub spki_der: Vec<u8>,
    pkcs8: Arc<Vec<u8>>,
    key: Arc<Ed25519KeyPair>,
    organisation: Option<String>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("NodeIdentity")
            .field("fingerprint", &self.fingerprint)
            .field("organisation", &self.organisation)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// A fresh Ed25519 key and a self-signed certificate with CN=`name`, O=`organisation` and
    /// the given subject alternative names (DNS names or IP addresses).
    pub fn generate(
        name: &str,
        organisation: &str,
        sans: &[String],
    ) -> Result<Self, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ED25519).map_err(IdentityError::Generate)?;
        let mut params = CertificateParams::new(sans.to_vec()).map_err(IdentityError::Generate)?;
        params.distinguished_name.push(DnType::CommonName, name);
        if !organisation.is_empty() {
            params
                .distinguished_name
                .push(DnType::OrganizationName, organisation);
        }
        let today = now_ms().div_euclid(86_400_000);
        // A day of slack for peers whose clocks are a little behind.
        let (y, m, d) = civil_from_days(today - 1);
        params.not_before = rcgen::date_time_ymd(y, m, d);
        let (y, m, d) = civil_from_days(today + VALIDITY_DAYS);
        params.not_after = rcgen::date_time_ymd(y, m, d);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.self_signed(&key).map_err(IdentityError::Generate)?;
        Self::from_parts(key.serialize_der(), cert.der().clone())
    }

    /// Loads a PKCS#8 PEM key and a PEM certificate, and checks that the key is the
    /// certificate's.
    pub fn load(key_pem: &Path, cert_pem: &Path) -> Result<Self, IdentityError> {
        let key_text = read_bounded(key_pem)?;
        let cert_text = read_bounded(cert_pem)?;
        let key = pem_section(key_pem, &key_text, SectionKind::PrivateKey)?;
        let cert = pem_section(cert_pem, &cert_text, SectionKind::Certificate)?;
        Self::from_parts(key, CertificateDer::from(cert))
    }

    fn from_parts(
        pkcs8: Vec<u8>,
        cert_der: CertificateDer<'static>,
    ) -> Result<Self, IdentityError> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        let info = cert_info(&cert_der)?;
        if ed25519_raw_key(&info.spki_der)? != key.public_key().as_ref() {
            return Err(IdentityError::KeyMismatch);
        }
        Ok(Self {
            fingerprint: info.fingerprint,
            cert_der,
            spki_der: info.spki_der,
            pkcs8: Arc::new(pkcs8),
            key: Arc::new(key),
            organisation: info.organisation,
        })
    }

    /// Writes the key (mode 0600) and the certificate as PEM. Refuses to overwrite either.
    pub fn write(&self, key_pem: &Path, cert_pem: &Path) -> Result<(), IdentityError> {
        for path in [key_pem, cert_pem] {
            if path.exists() {
                return Err(IdentityError::Exists {
                    path: path.to_owned(),
                });
            }
        }
        let key = pem_encode("PRIVATE KEY", &self.pkcs8);
        let cert = pem_encode("CERTIFICATE", &self.cert_der);
        write_new(key_pem, key.as_bytes(), 0o600)?;
        write_new(cert_pem, cert.as_bytes(), 0o644)
    }

    /// Ed25519 signature over `domain || 0x00 || message`.
    pub fn sign(&self, domain: &str, message: &[u8]) -> Vec<u8> {
        self.key
            .sign(&signed_bytes(domain, message))
            .as_ref()
            .to_vec()
    }

    /// The private key for rustls.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.as_ref().clone()))
    }

    /// The certificate's O=, if any.
    pub fn organisation(&self) -> Option<String> {
        self.organisation.clone()
    }
}

/// SHA-256 of a SubjectPublicKeyInfo (DER).
pub fn fingerprint_of_spki(spki_der: &[u8]) -> Fingerprint {
    Fingerprint(Sha256::digest(spki_der).into())
}

/// Parses a DER certificate into what the TLS layer and the policy need.
pub fn cert_info(cert_der: &[u8]) -> Result<CertInfo, IdentityError> {
    parse_cert(cert_der).map(|parsed| parsed.info)
}

/// [`CertInfo`] plus what only the TLS verifiers need.
pub(crate) struct ParsedCert {
    pub info: CertInfo,
    pub not_before_ms: UnixMs,
}

pub(crate) fn parse_cert(cert_der: &[u8]) -> Result<ParsedCert, IdentityError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::Certificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    let spki_der = cert.public_key().raw.to_vec();
    let organisation = cert
        .subject()
        .iter_organization()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_owned);
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_owned);
    let validity = cert.validity();
    Ok(ParsedCert {
        info: CertInfo {
            fingerprint: fingerprint_of_spki(&spki_der),
            spki_der,
            organisation,
            common_name,
            not_after_ms: validity.not_after.timestamp().saturating_mul(1000),
        },
        not_before_ms: validity.not_before.timestamp().saturating_mul(1000),
    })
}

/// Verifies an Ed25519 signature made by [`NodeIdentity::sign`] with the same domain.
pub fn verify(
    spki_der: &[u8],
    domain: &str,
    message: &[u8],
    signature: &[u8],
) -> Result<(), IdentityError> {
    let raw = ed25519_raw_key(spki_der)?;
    UnparsedPublicKey::new(&ED25519, &raw)
        .verify(&signed_bytes(domain, message), signature)
        .map_err(|_| IdentityError::BadSignature)
}

/// The 32-byte Ed25519 key inside a SubjectPublicKeyInfo; any other algorithm is refused.
fn ed25519_raw_key(spki_der: &[u8]) -> Result<[u8; 32], IdentityError> {
    let (rest, spki) =
        SubjectPublicKeyInfo::from_der(spki_der).map_err(|_| IdentityError::NotEd25519)?;
    if !rest.is_empty() || spki.algorithm.algorithm != OID_SIG_ED25519 {
        return Err(IdentityError::NotEd25519);
    }
    spki.subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| IdentityError::NotEd25519)
}

fn signed_bytes(domain: &str, message: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(domain.len() + 1 + message.len());
    bytes.extend_from_slice(domain.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(message);
    bytes
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, IdentityError> {
    use std::io::Read as _;
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(IdentityError::Pem {
            path: path.to_owned(),
            reason: format!("larger than {MAX_PEM_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

/// The first PEM section of `kind` in `text`.
fn pem_section(path: &Path, text: &[u8], kind: SectionKind) -> Result<Vec<u8>, IdentityError> {
    let err = |reason: String| IdentityError::Pem {
        path: path.to_owned(),
        reason,
    };
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(text) {
        let (found, der) = item.map_err(|e| err(format!("invalid pem: {e}")))?;
        if found == kind {
            return Ok(der);
        }
    }
    let wanted = match kind {
        SectionKind::PrivateKey => "no \"PRIVATE KEY\" (pkcs#8) section",
        SectionKind::Certificate => "no \"CERTIFICATE\" section",
        _ => "no usable pem section",
    };
    Err(err(wanted.into()))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let io = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            IdentityError::Exists {
                path: path.to_owned(),
            }
        } else {
            IdentityError::Io {
                path: path.to_owned(),
                source,
            }
        }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        i32::try_from(y).unwrap_or(i32::MAX),
        u8::try_from(m).unwrap_or(1),
        u8::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn identity() -> NodeIdentity {
        NodeIdentity::generate("edge-1", "Example CDN", &["edge-1.example".into()]).unwrap()
    }

    #[test]
    fn generated_certificate_names_the_node_and_its_key() {
        let id = identity();
        let info = cert_info(&id.cert_der).unwrap();
        assert_eq!(info.fingerprint, id.fingerprint);
        assert_eq!(info.fingerprint, fingerprint_of_spki(&id.spki_der));
        assert_eq!(info.common_name.as_deref(), Some("edge-1"));
        assert_eq!(info.organisation.as_deref(), Some("Example CDN"));
        assert_eq!(id.organisation().as_deref(), Some("Example CDN"));
        let now = now_ms();
        assert!(info.not_after_ms > now + 9 * 365 * 86_400_000);
        let parsed = parse_cert(&id.cert_der).unwrap();
        assert!(parsed.not_before_ms < now);
        assert_ne!(identity().fingerprint, id.fingerprint, "keys are fresh");
    }

    #[test]
    fn signatures_are_bound_to_key_domain_and_message() {
        let id = identity();
        let sig = id.sign("p2pcdn.test", b"hello");
        verify(&id.spki_der, "p2pcdn.test", b"hello", &sig).unwrap();
        assert!(matches!(
            verify(&id.spki_der, "p2pcdn.other", b"hello", &sig),
            Err(IdentityError::BadSignature)
        ));
        assert!(verify(&id.spki_der, "p2pcdn.test", b"hellO", &sig).is_err());
        assert!(verify(&identity().spki_der, "p2pcdn.test", b"hello", &sig).is_err());
        assert!(verify(&id.spki_der, "p2pcdn.test", b"hello", &sig[..10]).is_err());
        assert!(matches!(
            verify(b"garbage", "p2pcdn.test", b"hello", &sig),
            Err(IdentityError::NotEd25519)
        ));
    }

    #[test]
    fn write_then_load_round_trips_with_private_key_mode() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("node.key"), dir.path().join("node.crt"));
        let id = identity();
        id.write(&key, &cert).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = NodeIdentity::load(&key, &cert).unwrap();
        assert_eq!(loaded.fingerprint, id.fingerprint);
        let sig = loaded.sign("d", b"m");
        verify(&id.spki_der, "d", b"m", &sig).unwrap();
        assert!(matches!(
            id.write(&key, &cert),
            Err(IdentityError::Exists { .. })
        ));
    }

    #[test]
    fn load_refuses_a_key_of_another_certificate_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, c1) = (dir.path().join("1.key"), dir.path().join("1.crt"));
        let (k2, c2) = (dir.path().join("2.key"), dir.path().join("2.crt"));
        identity().write(&k1, &c1).unwrap();
        identity().write(&k2, &c2).unwrap();
        assert!(matches!(
            NodeIdentity::load(&k1, &c2),
            Err(IdentityError::KeyMismatch)
        ));
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "not pem at all").unwrap();
        let err = NodeIdentity::load(&junk, &c1).unwrap_err();
        assert!(err.to_string().contains("PRIVATE KEY"), "{err}");
        let missing = NodeIdentity::load(&dir.path().join("none"), &c1).unwrap_err();
        assert!(matches!(missing, IdentityError::Io { .. }));
    }

    #[test]
    fn cert_info_refuses_garbage() {
        assert!(cert_info(b"\x30\x03\x02\x01\x00").is_err());
        assert!(cert_info(&[]).is_err());
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
