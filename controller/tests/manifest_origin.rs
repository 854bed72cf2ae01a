//! `build_from_origin` against a local origin on 127.0.0.1 (plain HTTP, and HTTPS with a
//! private CA): headers taken over, bodies hashed, and every kind of failure reported.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use p2pcdn_controller::{
    manifest::{BuildOptions, DEFAULT_CACHE_CONTROL, ManifestError, build_from_origin, etag_of},
    model::Fingerprint,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;

const BIG: usize = 1024 * 1024 + 7;

#[derive(Clone, Default)]
struct Origin {
    hits: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    requests: Arc<AtomicUsize>,
}

fn big_body() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8).collect()
}

async fn serve_origin(State(origin): State<Origin>, uri: Uri) -> Response {
    origin.requests.fetch_add(1, Ordering::SeqCst);
    let path = uri.path().to_owned();
    *origin.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    match path.as_str() {
        "/static/a.css" => (
            [
                (header::CONTENT_TYPE, "text/css; charset=utf-8"),
                (header::CACHE_CONTROL, "public, max-age=10"),
                (header::LAST_MODIFIED, "Sun, 06 Nov 1994 08:49:37 GMT"),
            ],
            "body{}",
        )
            .into_response(),
        "/static/img/big.bin" => Body::from(big_body()).into_response(),
        "/static/space%20name.txt" => {
            ([(header::CONTENT_TYPE, "text/plain")], "spaced").into_response()
        }
        "/static/empty" => ([(header::CONTENT_TYPE, "text/plain")], "").into_response(),
        "/static/slow" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            "late".into_response()
        }
        "/static/stall" => {
            let first = tokio_stream::once(Ok::<_, std::io::Error>(Bytes::from_static(b"part")));
            Body::from_stream(first.chain(tokio_stream::pending())).into_response()
        }
        "/static/gzip" => ([(header::CONTENT_ENCODING, "gzip")], &b"\x1f\x8b"[..]).into_response(),
        "/static/moved" => {
            (StatusCode::FOUND, [(header::LOCATION, "/static/a.css")]).into_response()
        }
        "/static/broken" => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

fn router(origin: &Origin) -> Router {
    Router::new()
        .fallback(serve_origin)
        .with_state(origin.clone())
}

async fn http_origin() -> (SocketAddr, Origin) {
    let origin = Origin::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(&origin);
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, origin)
}

fn opts() -> BuildOptions {
    let mut o = BuildOptions::new(Fingerprint([5; 32]), "video", "http://unused.invalid");
    o.fetch.response_timeout = Duration::from_millis(500);
    o.fetch.idle_timeout = Duration::from_millis(500);
    o.fetch.object_timeout = Duration::from_secs(20);
    o
}

fn paths(list: &[&str]) -> Vec<String> {
    list.iter().map(|p| (*p).to_owned()).collect()
}

#[tokio::test]
async fn objects_are_fetched_hashed_and_described() {
    let (addr, origin) = http_origin().await;
    let base = format!("http://{addr}/static/");
    let list = paths(&[
        "/a.css",
        "/img/big.bin",
        "/space%20name.txt",
        "/empty",
        "/a.css",
    ]);
    let m = build_from_origin(&base, &list, opts()).await.unwrap();

    assert_eq!(m.origin, format!("http://{addr}/static"));
    assert_eq!(m.entries.len(), 4);
    let css = m.entry("/a.css").unwrap();
    assert_eq!(css.sha256, <[u8; 32]>::from(Sha256::digest(b"body{}")));
    assert_eq!(css.size, 6);
    assert_eq!(
        css.content_type, "text/css; charset=utf-8",
        "the origin's header"
    );
    assert_eq!(
        css.cache_control, "public, max-age=10",
        "the origin's header"
    );
    assert_eq!(css.last_modified_ms, Some(784_111_777_000));
    assert_eq!(css.etag, etag_of(&css.sha256));
    let big = m.entry("/img/big.bin").unwrap();
    assert_eq!(big.size, BIG as u64);
    assert_eq!(big.sha256, <[u8; 32]>::from(Sha256::digest(big_body())));
    assert_eq!(big.content_type, "application/octet-stream", "by extension");
    assert_eq!(big.cache_control, DEFAULT_CACHE_CONTROL, "origin sent none");
    assert_eq!(big.last_modified_ms, None);
    assert_eq!(m.entry("/space%20name.txt").unwrap().size, 6);
    assert_eq!(m.entry("/empty").unwrap().size, 0);

    let hits = origin.hits.lock().unwrap().clone();
    assert_eq!(
        hits.get("/static/a.css"),
        Some(&1),
        "a repeated path is fetched once"
    );
    assert_eq!(
        hits.get("/static/space%20name.txt"),
        Some(&1),
        "sent as encoded"
    );

    // An explicit cache-control overrides the origin's.
    let mut o = opts();
    o.cache_control = Some("no-cache".into());
    let m = build_from_origin(&base, &paths(&["/a.css"]), o)
        .await
        .unwrap();
    assert_eq!(m.entry("/a.css").unwrap().cache_control, "no-cache");
}

#[tokio::test]
async fn failures_are_reported_with_the_url() {
    let (addr, _origin) = http_origin().await;
    let base = format!("http://{addr}/static");
    let fetch = |list: &[&str], o: BuildOptions| {
        let (base, list) = (base.clone(), paths(list));
        async move { build_from_origin(&base, &list, o).await.unwrap_err() }
    };

    let err = fetch(&["/a.css", "/missing"], opts()).await;
    assert!(
        matches!(err, ManifestError::Status { status: 404, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("/static/missing"), "{err}");
    assert!(err.is_bad_input());

    let err = fetch(&["/moved"], opts()).await;
    assert!(
        matches!(err, ManifestError::Status { status: 302, .. }),
        "redirects not followed: {err}"
    );
    assert!(err.is_bad_input());

    let err = fetch(&["/broken"], opts()).await;
    assert!(
        matches!(err, ManifestError::Status { status: 500, .. }),
        "{err}"
    );
    assert!(!err.is_bad_input());

    let started = std::time::Instant::now();
    let err = fetch(&["/slow"], opts()).await;
    assert!(err.to_string().contains("no response within"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the time limit holds"
    );
    assert!(!err.is_bad_input());

    let err = fetch(&["/stall"], opts()).await;
    assert!(err.to_string().contains("body stalled"), "{err}");

    let mut o = opts();
    o.max_object_bytes = 1000;
    let err = fetch(&["/img/big.bin"], o).await;
    assert!(
        matches!(err, ManifestError::ObjectTooLarge { limit: 1000, .. }),
        "{err}"
    );

    let err = fetch(&["/gzip"], opts()).await;
    assert!(err.to_string().contains("content-encoding"), "{err}");

    let err = fetch(&["/a/../etc/passwd"], opts()).await;
    assert!(matches!(err, ManifestError::Invalid { .. }), "{err}");

    for bad in [
        "ftp://127.0.0.1/x",
        "http://",
        "http://user@127.0.0.1",
        "127.0.0.1:80",
        "http://h/a?b",
    ] {
        let err = build_from_origin(bad, &paths(&["/a.css"]), opts())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ManifestError::BadOrigin { .. }),
            "{bad}: {err}"
        );
        assert!(err.is_bad_input());
    }

    // Nobody listens: a runtime failure, not bad input.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let err = build_from_origin(&format!("http://{closed}"), &paths(&["/a"]), opts())
        .await
        .unwrap_err();
    assert!(matches!(err, ManifestError::Fetch { .. }), "{err}");
    assert!(!err.is_bad_input());
    assert!(!err.to_string().contains('\n'), "one line: {err}");
}

/// A CA and a certificate for 127.0.0.1 signed by it.
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
        .push(rcgen::DnType::CommonName, "test origin ca");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    (ca.der().clone(), leaf.der().clone(), key)
}

async fn https_origin(leaf: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> SocketAddr {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf], key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(&Origin::default());
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
                // A Router is always ready: `call` without `poll_ready` is fine.
                let service = hyper::service::service_fn(move |req| {
                    let mut app = app.clone();
                    async move { tower::Service::call(&mut app, req).await }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_origins_are_verified() {
    let (ca, leaf, key) = private_ca();
    let addr = https_origin(leaf, key).await;
    let base = format!("https://{addr}/static");

    // Unknown to the Mozilla roots: refused.
    let err = build_from_origin(&base, &paths(&["/a.css"]), opts())
        .await
        .unwrap_err();
    assert!(matches!(err, ManifestError::Fetch { .. }), "{err}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );

    // Trusted through the extra root.
    let mut o = opts();
    o.fetch.extra_roots = vec![ca];
    let m = build_from_origin(&base, &paths(&["/a.css", "/img/big.bin"]), o)
        .await
        .unwrap();
    assert_eq!(
        m.entry("/a.css").unwrap().sha256,
        <[u8; 32]>::from(Sha256::digest(b"body{}"))
    );
    assert_eq!(m.entry("/img/big.bin").unwrap().size, BIG as u64);
    assert_eq!(m.origin, base);
}
