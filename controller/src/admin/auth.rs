//! Who may call the admin API: bearer tokens (compared in constant time) and client
//! certificates (by fingerprint), each with a role.

use std::{collections::HashMap, fmt, sync::Arc};

use ring::{hmac, rand::SystemRandom};
use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use serde::{Deserialize, Serialize};

use super::AdminError;
use crate::model::Fingerprint;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminRole {
    /// Every `GET` and `/metrics`.
    Viewer,
    /// Everything, including policy changes, negotiation and disband.
    Operator,
}

impl AdminRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
        }
    }
}

impl std::str::FromStr for AdminRole {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Self::Viewer),
            "operator" => Ok(Self::Operator),
            other => Err(format!("unknown admin role {other:?} (viewer or operator)")),
        }
    }
}

/// Longest token accepted in a header (longer ones are refused before hashing).
pub const MAX_TOKEN_LEN: usize = 512;

/// The credentials the admin API accepts.
///
/// Tokens are kept only as HMAC tags under a key drawn at start; a presented token is checked
/// with [`ring::hmac::verify`], which compares in constant time, against every configured tag
/// (no early exit), so neither the content nor the position of a match leaks through timing.
#[derive(Clone)]
pub struct AdminAuth {
    inner: Arc<Inner>,
}

struct Inner {
    key: hmac::Key,
    tokens: Vec<(hmac::Tag, AdminRole)>,
    clients: HashMap<Fingerprint, AdminRole>,
}

impl fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminAuth")
            .field("tokens", &self.inner.tokens.len())
            .field("clients", &self.inner.clients)
            .finish()
    }
}

impl AdminAuth {
    /// Tokens and client fingerprints with their roles. An empty token is refused.
    pub fn new(
        tokens: impl IntoIterator<Item = (String, AdminRole)>,
        clients: impl IntoIterator<Item = (Fingerprint, AdminRole)>,
    ) -> Result<Self, AdminError> {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .map_err(|_| AdminError::Random)?;
        let mut tags = Vec::new();
        for (token, role) in tokens {
            if token.is_empty() || token.len() > MAX_TOKEN_LEN {
                return Err(AdminError::BadToken(MAX_TOKEN_LEN));
            }
            tags.push((hmac::sign(&key, token.as_bytes()), role));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                key,
                tokens: tags,
                clients: clients.into_iter().collect(),
            }),
        })
    }

    /// The tokens and clients of the config's `[admin]` section.
    pub fn from_config(config: &crate::config::AdminConfig) -> Result<Self, AdminError> {
        Self::new(
            config.tokens.iter().map(|t| (t.token.clone(), t.role)),
            config.clients.iter().map(|c| (c.fingerprint, c.role)),
        )
    }

    /// The role of a bearer token, if it is one of ours. When a token is listed twice the
    /// higher role wins.
    pub fn token_role(&self, token: &str) -> Option<AdminRole> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return None;
        }
        let mut found = None;
        for (tag, role) in &self.inner.tokens {
            if hmac::verify(&self.inner.key, token.as_bytes(), tag.as_ref()).is_ok() {
                found = found.max(Some(*role));
            }
        }
        found
    }

    /// The role of a client certificate's fingerprint, if the config lists it.
    pub fn client_role(&self, fingerprint: &Fingerprint) -> Option<AdminRole> {
        self.inner.clients.get(fingerprint).copied()
    }
}

/// The fingerprint of the client certificate of a connection (inserted into every request of
/// it by the server; `None` when the client sent none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCert(pub Option<Fingerprint>);

/// SHA-256 of the certificate's SubjectPublicKeyInfo, and whether `now` is within its validity.
pub(crate) fn inspect_cert(der: &[u8], now_s: i64) -> Result<(Fingerprint, bool), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let fingerprint = crate::identity::fingerprint_of_spki(cert.tbs_certificate.subject_pki.raw);
    let valid = x509_parser::time::ASN1Time::from_timestamp(now_s)
        .map(|now| cert.validity().is_valid_at(now))
        .unwrap_or(false);
    Ok((fingerprint, valid))
}

/// Asks for a client certificate but does not require one (token callers send none). A
/// certificate that is sent must be within its validity period and its handshake signature
/// must verify; whether its fingerprint grants a role is decided per request.
#[derive(Debug)]
pub(crate) struct OptionalClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl OptionalClientCert {
    pub(crate) fn new(provider: &CryptoProvider) -> Self {
        Self {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let now_s = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        match inspect_cert(end_entity, now_s) {
            Ok((_, true)) => Ok(ClientCertVerified::assertion()),
            Ok((_, false)) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired,
            )),
            Err(_) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            )),
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

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_their_roles_and_nothing_else() {
        let auth = AdminAuth::new(
            [
                ("view-secret".to_owned(), AdminRole::Viewer),
                ("op-secret".to_owned(), AdminRole::Operator),
            ],
            [],
        )
        .unwrap();
        assert_eq!(auth.token_role("view-secret"), Some(AdminRole::Viewer));
        assert_eq!(auth.token_role("op-secret"), Some(AdminRole::Operator));
        assert_eq!(auth.token_role("op-secre"), None);
        assert_eq!(auth.token_role("op-secrett"), None);
        assert_eq!(auth.token_role(""), None);
        assert_eq!(auth.token_role(&"x".repeat(MAX_TOKEN_LEN + 1)), None);
    }

    #[test]
    fn empty_token_in_config_is_refused() {
        assert!(AdminAuth::new([(String::new(), AdminRole::Operator)], []).is_err());
    }
}
