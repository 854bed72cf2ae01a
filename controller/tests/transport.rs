//! gRPC over mutual TLS on loopback: who the server sees, who is refused at the TLS layer, and
//! what malformed, oversized or forged input gets back.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]

use std::{
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use p2pcdn_controller::{
    identity::{CertInfo, NodeIdentity},
    model::{Fingerprint, TrustLevel, now_ms},
    proto::{self, MAX_MESSAGE_BYTES, pb},
    tls::{self, PeerAdmission},
    transport::{self, PeerIdentity, TransportError},
};
use prost::Message as _;
use rustls::pki_types::ServerName;
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{Code, Request, Response, Status};

/// Admits the listed fingerprints as `Allowed`, everyone else only if `first_contact`.
#[derive(Debug)]
struct Admission {
    allowed: Vec<Fingerprint>,
    first_contact: bool,
}

impl Admission {
    fn only(allowed: &[Fingerprint]) -> Arc<Self> {
        Arc::new(Self {
            allowed: allowed.to_vec(),
            first_contact: false,
        })
    }

    fn anyone() -> Arc<Self> {
        Arc::new(Self {
            allowed: Vec::new(),
            first_contact: true,
        })
    }
}

impl PeerAdmission for Admission {
    fn admit(&self, peer: &CertInfo, _chained_to_ca: bool) -> Result<TrustLevel, String> {
        if self.allowed.contains(&peer.fingerprint) {
            Ok(TrustLevel::Allowed)
        } else if self.first_contact {
            Ok(TrustLevel::FirstContact)
        } else {
            Err("not on the allow list".into())
        }
    }
}

/// Records who called; answers RequestOffer with a reject and Advertise like the real agent
/// must (the advert must verify and be the caller's own).
#[derive(Default, Clone)]
struct Recorder {
    calls: Arc<Mutex<Vec<PeerIdentity>>>,
}

impl Recorder {
    fn calls(&self) -> Vec<PeerIdentity> {
        self.calls.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl pb::peering_server::Peering for Recorder {
    async fn advertise(
        &self,
        request: Request<pb::SignedAdvertisement>,
    ) -> Result<Response<pb::AdvertiseAck>, Status> {
        let peer = transport::peer_of(&request)?;
        self.calls.lock().unwrap().push(peer.clone());
        let ad = proto::open_advertisement(request.get_ref(), now_ms())?;
        if ad.node_id != peer.fingerprint.0 {
            return Err(Status::permission_denied(
                "an advertisement must be the caller's own",
            ));
        }
        Ok(Response::new(pb::AdvertiseAck { stored: true }))
    }

    async fn request_offer(
        &self,
        request: Request<pb::ServiceRequirements>,
    ) -> Result<Response<pb::OfferReply>, Status> {
        let peer = transport::peer_of(&request)?;
        self.calls.lock().unwrap().push(peer);
        Ok(Response::new(pb::OfferReply {
            result: Some(pb::offer_reply::Result::Reject(pb::Reject {
                reason: pb::RejectReason::NoCapacity as i32,
                detail: "test".into(),
            })),
        }))
    }

    async fn respond(
        &self,
        _: Request<pb::OfferResponse>,
    ) -> Result<Response<pb::OfferResponseReply>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn activate(
        &self,
        _: Request<pb::ActivateRequest>,
    ) -> Result<Response<pb::Arrangement>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn heartbeat(
        &self,
        _: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn disband(
        &self,
        _: Request<pb::DisbandRequest>,
    ) -> Result<Response<pb::DisbandReply>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn report_reputation(
        &self,
        _: Request<pb::SignedReputationReport>,
    ) -> Result<Response<pb::ReputationAck>, Status> {
        Err(Status::unimplemented("test"))
    }
}

struct Server {
    addr: SocketAddr,
    recorder: Recorder,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), TransportError>>,
}

impl Server {
    async fn start(id: &NodeIdentity, admission: Arc<Admission>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = tls::server_config(id, None, admission).unwrap();
        let recorder = Recorder::default();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(transport::serve(
            listener,
            config,
            recorder.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            recorder,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("server stops within 5 s")
            .unwrap()
            .unwrap();
    }
}

fn node(name: &str) -> NodeIdentity {
    NodeIdentity::generate(name, "Example CDN", &["localhost".into()]).unwrap()
}

fn requirements() -> pb::ServiceRequirements {
    pb::ServiceRequirements {
        request_id: "req-1".into(),
        service: Some(pb::ServiceSpec {
            name: "video".into(),
            addresses: vec!["203.0.113.10:443".into()],
            host_names: vec![],
        }),
        capacity: Some(pb::Capacity {
            new_connections_per_s: 100,
            ..Default::default()
        }),
        duration_s: 600,
        max_price: Some(pb::Price {
            currency: "EUR".into(),
            ..Default::default()
        }),
        modes: vec![pb::RedirectionMode::DsrGue as i32],
        ..Default::default()
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

const TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn mtls_call_reaches_the_handler_with_the_callers_fingerprint() {
    let (client_id, server_id) = (node("primary"), node("provider"));
    let server = Server::start(&server_id, Admission::only(&[client_id.fingerprint])).await;
    let config = tls::client_config(
        &client_id,
        None,
        Some(server_id.fingerprint),
        Admission::only(&[server_id.fingerprint]),
    )
    .unwrap();
    let mut client = transport::connect(&server.addr.to_string(), config, TIMEOUT)
        .await
        .unwrap();
    let reply = client.request_offer(requirements()).await.unwrap();
    assert!(matches!(
        reply.into_inner().result,
        Some(pb::offer_reply::Result::Reject(_))
    ));
    let calls = server.recorder.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].fingerprint, client_id.fingerprint);
    assert_eq!(calls[0].trust, TrustLevel::Allowed);
    assert_eq!(calls[0].organisation.as_deref(), Some("Example CDN"));

    // A first-contact peer is admitted with the lowest trust, and the server can tell.
    let stranger = node("stranger");
    let server2 = Server::start(&server_id, Admission::anyone()).await;
    let config = tls::client_config(&stranger, None, None, Admission::anyone()).unwrap();
    let mut client = transport::connect(&server2.addr.to_string(), config, TIMEOUT)
        .await
        .unwrap();
    client.request_offer(requirements()).await.unwrap();
    let calls = server2.recorder.calls();
    assert_eq!(calls[0].fingerprint, stranger.fingerprint);
    assert_eq!(calls[0].trust, TrustLevel::FirstContact);
    server.stop().await;
    server2.stop().await;
}

#[tokio::test]
async fn a_client_the_policy_refuses_fails_at_the_tls_layer() {
    let (client_id, server_id, other) = (node("primary"), node("provider"), node("other"));
    let server = Server::start(&server_id, Admission::only(&[other.fingerprint])).await;
    let config = tls::client_config(&client_id, None, None, Admission::anyone()).unwrap();
    // TLS 1.3: the client finishes its side of the handshake before the server checks its
    // certificate, so the refusal can surface at connect or at the first call.
    let outcome = match transport::connect(&server.addr.to_string(), config, TIMEOUT).await {
        Err(error) => Err(error_chain(&error)),
        Ok(mut client) => client
            .request_offer(requirements())
            .await
            .map(|_| ())
            .map_err(|status| format!("{status:?}")),
    };
    let error = outcome.expect_err("a refused client must not get an answer");
    assert!(
        error.contains("certificate") || error.contains("alert") || error.contains("connection"),
        "{error}"
    );
    assert!(server.recorder.calls().is_empty(), "the handler never ran");
    server.stop().await;
}

#[tokio::test]
async fn a_client_expecting_another_fingerprint_refuses_the_server() {
    let (client_id, server_id, other) = (node("primary"), node("provider"), node("other"));
    let server = Server::start(&server_id, Admission::anyone()).await;
    let config = tls::client_config(
        &client_id,
        None,
        Some(other.fingerprint),
        Admission::anyone(),
    )
    .unwrap();
    let error = transport::connect(&server.addr.to_string(), config, TIMEOUT)
        .await
        .expect_err("the server is not the pinned peer");
    let text = error_chain(&error);
    assert!(matches!(error, TransportError::Connect { .. }), "{text}");
    assert!(text.contains("not the expected"), "{text}");
    assert!(text.contains(&other.fingerprint.to_string()), "{text}");
    assert!(server.recorder.calls().is_empty());
    server.stop().await;
}

/// Sends one hand-made gRPC request (HTTP/2 over mutual TLS) and returns the grpc-status and
/// grpc-message of the answer.
async fn raw_call(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    body: Vec<u8>,
) -> (Code, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::post(format!("http://{addr}/p2pcdn.peering.v1.Peering/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = tokio::time::timeout(TIMEOUT, send.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let headers = response.headers().clone();
    let collected = tokio::time::timeout(TIMEOUT, response.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = tonic::Status::from_header_map(&headers)
        .or_else(|| tonic::Status::from_header_map(&trailers))
        .expect("a grpc-status");
    (status.code(), status.message().to_owned())
}

fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Log lines of every test of this binary (one global subscriber: a thread-local one would
/// race with the callsite caches of tests running in parallel).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

fn logs() -> Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .init();
        logs
    })
    .clone()
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn malformed_and_oversized_protobuf_is_invalid_argument_and_logged() {
    let logs = logs();
    let (client_id, server_id) = (node("primary"), node("provider"));
    let server = Server::start(&server_id, Admission::anyone()).await;
    let config = tls::client_config(&client_id, None, None, Admission::anyone()).unwrap();

    // The control: a well-formed request through the same raw path reaches the handler.
    let (code, _) = raw_call(
        server.addr,
        config.clone(),
        "RequestOffer",
        frame(&requirements().encode_to_vec()),
    )
    .await;
    assert_eq!(code, Code::Ok);
    assert_eq!(server.recorder.calls().len(), 1);

    let mut oversized = requirements();
    oversized.service.as_mut().unwrap().host_names = vec!["a".repeat(200); 400];
    let oversized = oversized.encode_to_vec();
    assert!(oversized.len() > MAX_MESSAGE_BYTES);
    let mut invalid = requirements();
    invalid.duration_s = 0;

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("undecodable bytes", frame(&[0xff; 12]), "malformed"),
        ("truncated field", frame(&[0x0a, 0x40, b'x']), "malformed"),
        ("oversized message", frame(&oversized), "exceeds the limit"),
        (
            "length prefix of 1 GiB",
            {
                let mut b = vec![0];
                b.extend_from_slice(&(1u32 << 30).to_be_bytes());
                b.extend_from_slice(&[0; 32]);
                b
            },
            "exceeds the limit",
        ),
        (
            "compressed flag",
            {
                let mut b = frame(&requirements().encode_to_vec());
                b[0] = 1;
                b
            },
            "compressed",
        ),
        (
            "decodable but invalid",
            frame(&invalid.encode_to_vec()),
            "duration_s",
        ),
    ];
    for (what, body, needle) in cases {
        let (code, message) = raw_call(server.addr, config.clone(), "RequestOffer", body).await;
        assert_eq!(code, Code::InvalidArgument, "{what}: {message}");
        assert!(message.contains(needle), "{what}: {message}");
    }
    assert_eq!(
        server.recorder.calls().len(),
        1,
        "no bad request reached the handler"
    );
    server.stop().await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    // Each refusal is logged once, with the caller's fingerprint.
    let refusals = text
        .lines()
        .filter(|l| l.contains("request refused"))
        .filter(|l| l.contains(&client_id.fingerprint.to_string()))
        .filter(|l| l.contains("RequestOffer") && l.contains("InvalidArgument"))
        .count();
    assert_eq!(refusals, 6, "{text}");
}

#[tokio::test]
async fn forged_and_foreign_advertisements_are_refused() {
    let (client_id, server_id, third) = (node("primary"), node("provider"), node("third"));
    let server = Server::start(&server_id, Admission::anyone()).await;
    let config = tls::client_config(&client_id, None, None, Admission::anyone()).unwrap();
    let mut client = transport::connect(&server.addr.to_string(), config, TIMEOUT)
        .await
        .unwrap();
    let now = now_ms();
    let ad = pb::Advertisement {
        name: "primary".into(),
        endpoints: Some(pb::Endpoints {
            control: "127.0.0.1:7443".into(),
            ..Default::default()
        }),
        modes: vec![pb::RedirectionMode::DsrIpip as i32],
        spare: Some(pb::Capacity::default()),
        measured_at_ms: now,
        sequence: 1,
        expires_at_ms: now + 60_000,
        ..Default::default()
    };

    // The caller's own advertisement is stored.
    let own = proto::sign_advertisement(&client_id, &ad);
    let ack = client.advertise(own.clone()).await.unwrap().into_inner();
    assert!(ack.stored);

    // A flipped signature bit.
    let mut bad = own.clone();
    bad.signature[10] ^= 0x40;
    let status = client.advertise(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("signature"), "{status:?}");

    // node_id claiming another node than the signing key.
    let mut claimed = pb::Advertisement::decode(own.advertisement.as_slice()).unwrap();
    claimed.node_id = third.fingerprint.0.to_vec();
    let bytes = claimed.encode_to_vec();
    let mismatch = pb::SignedAdvertisement {
        signature: client_id.sign(proto::ADVERTISEMENT_DOMAIN, &bytes),
        advertisement: bytes,
    };
    let status = client.advertise(mismatch).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("node id"), "{status:?}");

    // A valid advertisement of a third node, pushed by the caller.
    let foreign = proto::sign_advertisement(&third, &ad);
    let status = client.advertise(foreign).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A signature of the wrong size never reaches the handler (codec validation).
    let calls_before = server.recorder.calls().len();
    let mut short = own;
    short.signature.truncate(10);
    let status = client.advertise(short).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(server.recorder.calls().len(), calls_before);
    server.stop().await;
}
