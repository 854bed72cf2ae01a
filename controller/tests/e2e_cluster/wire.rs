//! Talking to a node below the library clients: hand-made gRPC frames over mutual TLS
//! (HTTP/2), and HTTPS requests to the admin API that keep the response headers.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full};
use hyper::{
    HeaderMap, Method, Request, StatusCode,
    body::Bytes,
    header::{AUTHORIZATION, CONTENT_TYPE, HOST},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use p2pcdn_controller::{
    identity::{CertInfo, NodeIdentity},
    model::{Fingerprint, TrustLevel},
    tls::{self, PeerAdmission},
};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::Code;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Admits every peer certificate (the test's own clients pin the server by fingerprint).
#[derive(Debug)]
pub struct AdmitAll;

impl PeerAdmission for AdmitAll {
    fn admit(&self, _peer: &CertInfo, _chained_to_ca: bool) -> Result<TrustLevel, String> {
        Ok(TrustLevel::FirstContact)
    }
}

/// Mutual TLS client config for the peering port of the node `server`, as `client`.
pub fn peer_tls(client: &NodeIdentity, server: Fingerprint) -> Arc<ClientConfig> {
    tls::client_config(client, None, Some(server), Arc::new(AdmitAll)).unwrap()
}

/// One gRPC message frame: no compression, 4-byte big-endian length, the bytes.
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Sends `body` as the request body of `Peering/{method}` over HTTP/2 and mutual TLS, and
/// returns the answer's grpc-status and grpc-message.
pub async fn grpc_raw(
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    method: &str,
    body: Vec<u8>,
) -> (Code, String) {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let stream = TlsConnector::from(tls)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let driver = tokio::spawn(conn);
        let request = Request::post(format!("http://{addr}/p2pcdn.peering.v1.Peering/{method}"))
            .header(CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        let headers = response.headers().clone();
        let collected = response.into_body().collect().await.unwrap();
        driver.abort();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let status = tonic::Status::from_header_map(&headers)
            .or_else(|| tonic::Status::from_header_map(&trailers))
            .unwrap_or_else(|| panic!("{method}: an answer without grpc-status: {headers:?}"));
        (status.code(), status.message().to_owned())
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method}: no answer within {TIMEOUT:?}"))
}

/// An HTTP answer with its headers.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{}: not the expected JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTPS request to the admin API at `addr`, whose certificate must be `pinned`; no
/// client certificate, a bearer `token` if given, `body` as JSON.
pub async fn https(
    addr: SocketAddr,
    pinned: &CertificateDer<'static>,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Reply {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned {
        cert: pinned.clone(),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let stream = TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let driver = tokio::spawn(conn);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, addr.to_string());
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let payload = match body {
            Some(value) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(&value).unwrap())
            }
            None => Bytes::new(),
        };
        let response = send
            .send_request(request.body(Full::new(payload)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        driver.abort();
        Reply {
            status,
            headers,
            body,
        }
    };
    // Negotiations through the API run to their end before the answer.
    tokio::time::timeout(3 * TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{path}: no answer within {:?}", 3 * TIMEOUT))
}

/// Accepts exactly the pinned certificate, with a verified handshake signature.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "not the pinned certificate".to_owned(),
            ))
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
