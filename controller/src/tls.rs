//! Mutual TLS between peers (rustls, ring provider, TLS 1.3 only, ALPN h2).
//!
//! Peers usually present self-signed certificates, so the Web PKI cannot vouch for them.
//! Instead the verifiers here check, for every handshake and on both sides:
//! 1. the handshake signature, with the ring provider's algorithms (proof that the peer holds
//!    the private key of the certificate it presented);
//! 2. the certificate's validity period;
//! 3. whether it chains to the operator's CA bundle, if one is configured (`chained_to_ca`);
//! 4. on the client, that the server has the expected fingerprint, if the caller pinned one;
//! 5. the [`PeerAdmission`] policy, which sees the certificate and `chained_to_ca` and may
//!    refuse the handshake.
//!
//! Session resumption is disabled on both sides, so every connection runs the admission
//! policy again (a resumed TLS 1.3 session would skip certificate verification).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock, Mutex, Weak},
};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as RustlsError, OtherError,
    RootCertStore, SignatureScheme,
    client::{
        Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
    server::{
        ParsedCertificate, StoresServerSessions, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use crate::{
    identity::{CertInfo, NodeIdentity, parse_cert},
    model::{Fingerprint, TrustLevel},
};

/// The only application protocol spoken on the control endpoint.
pub const ALPN_H2: &[u8] = b"h2";

/// Largest CA bundle file accepted.
const MAX_CA_BUNDLE_BYTES: u64 = 1024 * 1024;

/// How many admission decisions a server keeps for the connections it is setting up.
const MAX_RECORDED_DECISIONS: usize = 4096;

/// Decides whether a peer may complete a TLS handshake, and with which trust.
pub trait PeerAdmission: Send + Sync + std::fmt::Debug {
    /// Called during the TLS handshake for every peer certificate (client certs on the server,
    /// server certs on the client). Err(reason) refuses the handshake.
    fn admit(&self, peer: &CertInfo, chained_to_ca: bool) -> Result<TrustLevel, String>;
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    CaBundle { path: PathBuf, reason: String },
    #[error("tls configuration: {0}")]
    Config(#[from] RustlsError),
    #[error("tls configuration: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Trust anchors of an operator's own CA (optional). A peer whose certificate chains to one of
/// them is reported to [`PeerAdmission::admit`] with `chained_to_ca = true`.
#[derive(Debug, Clone)]
pub struct CaBundle {
    roots: Arc<RootCertStore>,
}

impl CaBundle {
    /// Loads every `CERTIFICATE` of a PEM file; at least one is required.
    pub fn load(pem: &Path) -> Result<Self, TlsError> {
        use std::io::Read as _;
        let io = |source| TlsError::Io {
            path: pem.to_owned(),
            source,
        };
        let bad = |reason: String| TlsError::CaBundle {
            path: pem.to_owned(),
            reason,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(pem)
            .map_err(io)?
            .take(MAX_CA_BUNDLE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_CA_BUNDLE_BYTES {
            return Err(bad(format!("larger than {MAX_CA_BUNDLE_BYTES} bytes")));
        }
        let mut certs = Vec::new();
        for cert in CertificateDer::pem_slice_iter(&bytes) {
            certs.push(cert.map_err(|e| bad(format!("invalid pem: {e}")))?);
        }
        Self::from_der(certs).map_err(|e| match e {
            TlsError::CaBundle { reason, .. } => bad(reason),
            other => other,
        })
    }

    /// From DER certificates (at least one).
    pub fn from_der(certs: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for (n, cert) in certs.into_iter().enumerate() {
            roots.add(cert).map_err(|e| TlsError::CaBundle {
                path: PathBuf::new(),
                reason: format!("certificate {}: {e}", n + 1),
            })?;
        }
        if roots.is_empty() {
            return Err(TlsError::CaBundle {
                path: PathBuf::new(),
                reason: "no CERTIFICATE in the bundle".into(),
            });
        }
        Ok(Self {
            roots: Arc::new(roots),
        })
    }

    /// Number of trust anchors.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }
}

/// The server side: client certificate required, ALPN h2, TLS 1.3, no resumption.
pub fn server_config(
    id: &NodeIdentity,
    ca: Option<&CaBundle>,
    admission: Arc<dyn PeerAdmission>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = match ca {
        Some(ca) => Some(
            WebPkiClientVerifier::builder_with_provider(ca.roots.clone(), provider.clone())
                .build()?,
        ),
        None => None,
    };
    let recorder = Arc::new(TrustRecorder::default());
    let verifier = ClientVerifier {
        core: Core {
            provider: provider.clone(),
            admission,
        },
        chain,
        recorder: recorder.clone(),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(vec![id.cert_der.clone()], id.private_key_der())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.send_tls13_tickets = 0;
    register_recorder(&recorder);
    config.session_storage = recorder;
    Ok(Arc::new(config))
}

/// The client side: presents this node's certificate; the server must have the `expected`
/// fingerprint if one is given, and pass the admission policy in any case.
pub fn client_config(
    id: &NodeIdentity,
    ca: Option<&CaBundle>,
    expected: Option<Fingerprint>,
    admission: Arc<dyn PeerAdmission>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = ServerVerifier {
        core: Core {
            provider: provider.clone(),
            admission,
        },
        roots: ca.map(|ca| ca.roots.clone()),
        expected,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(vec![id.cert_der.clone()], id.private_key_der())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The certificate of a peer after a completed handshake, with the trust the admission
/// policy gave it on this server. None if `config` was not made by [`server_config`] or the
/// decision is gone (it should not be: it is recorded during the same handshake).
pub(crate) fn admitted(
    config: &rustls::ServerConfig,
    peer_cert: &[u8],
) -> Option<(CertInfo, TrustLevel)> {
    let info = parse_cert(peer_cert).ok()?.info;
    let key = recorder_key(&config.session_storage);
    let recorder = RECORDERS.lock().ok()?.get(&key).and_then(Weak::upgrade)?;
    let trust = recorder
        .decisions
        .lock()
        .ok()?
        .get(&info.fingerprint)
        .copied()?;
    Some((info, trust))
}

/// Why a verifier refused a certificate (carried inside rustls's error).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

fn refuse(reason: String) -> RustlsError {
    RustlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(
        reason,
    )))))
}

/// What both verifiers share.
#[derive(Debug)]
struct Core {
    provider: Arc<CryptoProvider>,
    admission: Arc<dyn PeerAdmission>,
}

impl Core {
    /// Validity period, then the admission policy.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        now: UnixTime,
        chained: bool,
        side: &str,
    ) -> Result<(CertInfo, TrustLevel), RustlsError> {
        let parsed = parse_cert(end_entity)
            .map_err(|_| RustlsError::InvalidCertificate(CertificateError::BadEncoding))?;
        let now_ms = i64::try_from(now.as_secs())
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        if now_ms < parsed.not_before_ms {
            return Err(RustlsError::InvalidCertificate(
                CertificateError::NotValidYet,
            ));
        }
        if now_ms > parsed.info.not_after_ms {
            return Err(RustlsError::InvalidCertificate(CertificateError::Expired));
        }
        match self.admission.admit(&parsed.info, chained) {
            Ok(trust) => Ok((parsed.info, trust)),
            Err(reason) => {
                tracing::warn!(
                    peer.fingerprint = %parsed.info.fingerprint,
                    peer.organisation = parsed.info.organisation.as_deref().unwrap_or(""),
                    chained_to_ca = chained,
                    side,
                    %reason,
                    "peer refused by admission policy"
                );
                Err(refuse(format!(
                    "peer {} refused by policy: {reason}",
                    parsed.info.fingerprint
                )))
            }
        }
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Debug)]
struct ClientVerifier {
    core: Core,
    /// Chain check against the CA bundle, if any.
    chain: Option<Arc<dyn ClientCertVerifier>>,
    recorder: Arc<TrustRecorder>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client always sends its (usually self-signed) certificate.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, RustlsError> {
        let chained = self.chain.as_ref().is_some_and(|chain| {
            chain
                .verify_client_cert(end_entity, intermediates, now)
                .is_ok()
        });
        let (info, trust) = self.core.check(end_entity, now, chained, "client")?;
        self.recorder.record(info.fingerprint, trust);
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.core.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.core.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.core.schemes()
    }
}

#[derive(Debug)]
struct ServerVerifier {
    core: Core,
    roots: Option<Arc<RootCertStore>>,
    expected: Option<Fingerprint>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, RustlsError> {
        // The server name is not checked: a peer is its key's fingerprint (pinned through
        // `expected` or admitted by policy), not the address we dialled.
        let chained = self.roots.as_ref().is_some_and(|roots| {
            ParsedCertificate::try_from(end_entity).is_ok_and(|cert| {
                verify_server_cert_signed_by_trust_anchor(
                    &cert,
                    roots,
                    intermediates,
                    now,
                    self.core.provider.signature_verification_algorithms.all,
                )
                .is_ok()
            })
        });
        if let Some(expected) = self.expected {
            let info = parse_cert(end_entity)
                .map_err(|_| RustlsError::InvalidCertificate(CertificateError::BadEncoding))?
                .info;
            if info.fingerprint != expected {
                tracing::warn!(
                    peer.fingerprint = %info.fingerprint,
                    expected = %expected,
                    "server is not the pinned peer"
                );
                return Err(refuse(format!(
                    "server fingerprint {} is not the expected {expected}",
                    info.fingerprint
                )));
            }
        }
        self.core.check(end_entity, now, chained, "server")?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.core.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.core.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.core.schemes()
    }
}

/// Admission decisions of one server configuration, by peer fingerprint, so that `serve` can
/// tell the handler with which trust a peer was admitted. It is installed as the
/// configuration's (storing-nothing) session store, which is how `serve`, holding only the
/// `ServerConfig`, finds it again: see [`RECORDERS`].
#[derive(Debug, Default)]
struct TrustRecorder {
    decisions: Mutex<HashMap<Fingerprint, TrustLevel>>,
}

impl TrustRecorder {
    fn record(&self, fingerprint: Fingerprint, trust: TrustLevel) {
        if let Ok(mut decisions) = self.decisions.lock() {
            if decisions.len() >= MAX_RECORDED_DECISIONS && !decisions.contains_key(&fingerprint) {
                decisions.clear();
            }
            decisions.insert(fingerprint, trust);
        }
    }
}

impl StoresServerSessions for TrustRecorder {
    fn put(&self, _key: Vec<u8>, _value: Vec<u8>) -> bool {
        false
    }

    fn get(&self, _key: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn take(&self, _key: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn can_cache(&self) -> bool {
        false
    }
}

/// Live recorders by the address of their allocation. A `Weak` that still upgrades proves the
/// address belongs to that recorder (an address is reused only after the recorder is freed).
static RECORDERS: LazyLock<Mutex<HashMap<usize, Weak<TrustRecorder>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn recorder_key<T: ?Sized>(arc: &Arc<T>) -> usize {
    Arc::as_ptr(arc).cast::<()>() as usize
}

fn register_recorder(recorder: &Arc<TrustRecorder>) {
    if let Ok(mut map) = RECORDERS.lock() {
        map.retain(|_, weak| weak.strong_count() > 0);
        map.insert(recorder_key(recorder), Arc::downgrade(recorder));
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rustls::{ClientConnection, ServerConnection};

    use super::*;

    #[derive(Debug)]
    struct Fixed {
        allow: Option<Fingerprint>,
        calls: AtomicUsize,
        saw_chained: Mutex<Vec<bool>>,
    }

    impl Fixed {
        fn allowing(fp: Option<Fingerprint>) -> Arc<Self> {
            Arc::new(Self {
                allow: fp,
                calls: AtomicUsize::new(0),
                saw_chained: Mutex::new(Vec::new()),
            })
        }
    }

    impl PeerAdmission for Fixed {
        fn admit(&self, peer: &CertInfo, chained_to_ca: bool) -> Result<TrustLevel, String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.saw_chained.lock().unwrap().push(chained_to_ca);
            match self.allow {
                Some(fp) if fp == peer.fingerprint => Ok(TrustLevel::Allowed),
                None => Ok(TrustLevel::FirstContact),
                Some(_) => Err("not on the allow list".into()),
            }
        }
    }

    fn id(name: &str) -> NodeIdentity {
        NodeIdentity::generate(name, "Org", &["localhost".into()]).unwrap()
    }

    /// Runs a handshake in memory; Ok if both sides completed.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<(ClientConnection, ServerConnection), RustlsError> {
        let mut c = ClientConnection::new(client, ServerName::try_from("localhost").unwrap())?;
        let mut s = ServerConnection::new(server)?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok((c, s));
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn mutual_handshake_records_the_clients_trust() {
        let (a, b) = (id("a"), id("b"));
        let server_adm = Fixed::allowing(Some(a.fingerprint));
        let server = server_config(&b, None, server_adm.clone()).unwrap();
        let client = client_config(&a, None, Some(b.fingerprint), Fixed::allowing(None)).unwrap();
        let (c, s) = handshake(client, server.clone()).unwrap();
        assert_eq!(c.alpn_protocol(), Some(ALPN_H2));
        let peer = s.peer_certificates().unwrap()[0].clone();
        let (info, trust) = admitted(&server, &peer).unwrap();
        assert_eq!(info.fingerprint, a.fingerprint);
        assert_eq!(trust, TrustLevel::Allowed);
        assert_eq!(server_adm.calls.load(Ordering::SeqCst), 1);
        assert_eq!(*server_adm.saw_chained.lock().unwrap(), vec![false]);
    }

    #[test]
    fn server_refuses_a_client_the_policy_refuses() {
        let (a, b, other) = (id("a"), id("b"), id("other"));
        let server = server_config(&b, None, Fixed::allowing(Some(other.fingerprint))).unwrap();
        let client = client_config(&a, None, None, Fixed::allowing(None)).unwrap();
        let err = handshake(client, server).unwrap_err();
        assert!(err.to_string().contains("refused by policy"), "{err}");
    }

    #[test]
    fn client_refuses_a_server_with_another_fingerprint() {
        let (a, b, other) = (id("a"), id("b"), id("other"));
        let server = server_config(&b, None, Fixed::allowing(None)).unwrap();
        let adm = Fixed::allowing(None);
        let client = client_config(&a, None, Some(other.fingerprint), adm.clone()).unwrap();
        let err = handshake(client, server).unwrap_err();
        assert!(err.to_string().contains("not the expected"), "{err}");
        assert_eq!(adm.calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn client_without_certificate_is_refused() {
        let b = id("b");
        let server = server_config(&b, None, Fixed::allowing(None)).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            core: Core {
                provider: Arc::new(rustls::crypto::ring::default_provider()),
                admission: Fixed::allowing(None),
            },
            roots: None,
            expected: None,
        }))
        .with_no_client_auth();
        assert!(handshake(Arc::new(client), server).is_err());
    }

    /// Presents one fixed certificate and key, whether or not they belong together.
    #[derive(Debug)]
    struct Present(Arc<rustls::sign::CertifiedKey>);

    impl rustls::client::ResolvesClientCert for Present {
        fn resolve(
            &self,
            _hints: &[&[u8]],
            _schemes: &[SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }

        fn has_certs(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_certificate_with_a_foreign_key_fails_the_handshake_signature() {
        // The client presents b's certificate but signs with a's key: the CertificateVerify
        // signature cannot verify against the certificate, and admission is never asked.
        let (a, b, s) = (id("a"), id("b"), id("s"));
        let server_adm = Fixed::allowing(None);
        let server = server_config(&s, None, server_adm.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = provider
            .key_provider
            .load_private_key(a.private_key_der())
            .unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                core: Core {
                    provider,
                    admission: Fixed::allowing(None),
                },
                roots: None,
                expected: None,
            }))
            .with_client_cert_resolver(Arc::new(Present(Arc::new(
                rustls::sign::CertifiedKey::new(vec![b.cert_der.clone()], key),
            ))));
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        let err = handshake(Arc::new(client), server).unwrap_err();
        assert!(
            err.to_string().to_lowercase().contains("signature"),
            "{err}"
        );
    }

    #[test]
    fn ca_bundle_marks_issued_certificates_as_chained() {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, PKCS_ED25519,
        };
        let ca_key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "operator ca");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf.distinguished_name
            .push(DnType::OrganizationName, "Org");
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (kp, cp) = (dir.path().join("k"), dir.path().join("c"));
        std::fs::write(&kp, leaf_key.serialize_pem()).unwrap();
        std::fs::write(&cp, leaf_cert.pem()).unwrap();
        let issued = NodeIdentity::load(&kp, &cp).unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        let bundle = CaBundle::load(&ca_path).unwrap();
        assert_eq!(bundle.len(), 1);

        // Issued client → server with the bundle: chained. Self-signed client: not chained.
        let server_adm = Fixed::allowing(None);
        let b = id("b");
        let server = server_config(&b, Some(&bundle), server_adm.clone()).unwrap();
        for client_id in [&issued, &id("self-signed")] {
            let client = client_config(client_id, None, None, Fixed::allowing(None)).unwrap();
            handshake(client, server.clone()).unwrap();
        }
        assert_eq!(*server_adm.saw_chained.lock().unwrap(), vec![true, false]);

        // Issued server → client with the bundle: chained.
        let client_adm = Fixed::allowing(None);
        let server = server_config(&issued, None, Fixed::allowing(None)).unwrap();
        let client = client_config(&b, Some(&bundle), None, client_adm.clone()).unwrap();
        handshake(client, server).unwrap();
        assert_eq!(*client_adm.saw_chained.lock().unwrap(), vec![true]);
    }

    #[test]
    fn ca_bundle_refuses_empty_and_garbage_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "nothing here").unwrap();
        let err = CaBundle::load(&path).unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
        assert!(CaBundle::load(&dir.path().join("missing")).is_err());
    }
}
