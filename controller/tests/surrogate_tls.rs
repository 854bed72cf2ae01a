//! TLS on both sides of the surrogate: an HTTPS origin (verified against configured trust
//! anchors) and the surrogate's own listener with rustls (HTTP/2 by ALPN, and HTTP/1.1).
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]

mod surrogate_support;

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, http::StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use p2pcdn_controller::surrogate::Surrogate;
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use surrogate_support::*;
use tokio::net::TcpListener;

/// A CA and a certificate for 127.0.0.1 and localhost signed by it.
fn private_ca() -> (
    CertificateDer<'static>,
    CertificateDer<'static>,
    PrivateKeyDer<'static>,
) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "surrogate test ca");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    (ca.der().clone(), leaf.der().clone(), key)
}

fn server_config(
    leaf: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf], key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// `app` over TLS on 127.0.0.1.
async fn https_server(config: Arc<rustls::ServerConfig>, app: Router) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let mut app = app.clone();
                    async move { tower::Service::call(&mut app, req).await }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_origins_are_pulled_only_when_their_certificate_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaf, key) = private_ca();
    let origin = Origin::default();
    let body = Bytes::from_static(b"fetched over tls");
    origin.set("/static/t.txt", Behaviour::Serve(body.clone()));
    let addr = https_server(server_config(leaf, key), origin.router()).await;
    let base = format!("https://{addr}/static");
    let id = primary_identity();
    let m = manifest(&id, &base, vec![entry("/t.txt", &body)]);

    // Not trusted (only the web PKI roots): refused, counted.
    let untrusting = Surrogate::new(config(&dir.path().join("a"))).await.unwrap();
    untrusting
        .add_tenant(tenant(&id, "arr-1", m.clone(), budgets()))
        .unwrap();
    let running = Running::start(untrusting.clone()).await;
    let got = get(&client(), &running, "/t.txt", &[]).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert!(
        String::from_utf8_lossy(&got.body).contains("certificate"),
        "{:?}",
        got.body
    );
    assert_eq!(untrusting.usage("arr-1").unwrap().origin_errors, 1);
    running.stop().await;
    assert_eq!(origin.total(), 0, "no request reached the untrusted origin");

    // Trusted through the configured anchor.
    let mut cfg = config(&dir.path().join("b"));
    cfg.origin_roots = vec![ca];
    let trusting = Surrogate::new(cfg).await.unwrap();
    trusting
        .add_tenant(tenant(&id, "arr-1", m, budgets()))
        .unwrap();
    let running = Running::start(trusting.clone()).await;
    let got = get(&client(), &running, "/t.txt", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, body);
    assert_eq!(origin.count("/static/t.txt"), 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_surrogate_serves_https_with_http2_and_http1() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaf, key) = private_ca();
    let origin = Origin::default();
    let body = Bytes::from_static(b"served over tls");
    origin.set("/page.html", Behaviour::Serve(body.clone()));
    let base = origin.start().await;
    let id = primary_identity();
    let m = manifest(&id, &base, vec![entry("/page.html", &body)]);
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets()))
        .unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = surrogate.clone();
    let task = tokio::spawn(async move {
        server
            .serve(listener, Some(server_config(leaf, key)), async {
                let _ = stopped.await;
            })
            .await
    });

    let mut roots = RootCertStore::empty();
    roots.add(ca).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let url = format!(
        "https://localhost:{}/{}/page.html",
        addr.port(),
        id.fingerprint
    );
    for http2 in [true, false] {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_only();
        let connector = if http2 {
            builder.enable_http2().build()
        } else {
            builder.enable_http1().build()
        };
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build(connector);
        let response = client
            .request(hyper::Request::get(&url).body(Empty::new()).unwrap())
            .await
            .unwrap();
        let expected = if http2 {
            hyper::Version::HTTP_2
        } else {
            hyper::Version::HTTP_11
        };
        assert_eq!(response.version(), expected);
        assert_eq!(response.status(), StatusCode::OK);
        let got = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, body);
    }
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(origin.count("/page.html"), 1);
}
