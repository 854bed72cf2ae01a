//! Pull-through from the origin: verification against the manifest before anything is
//! served or stored, miss coalescing, origin failures, routing.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]

mod surrogate_support;

use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use p2pcdn_controller::surrogate::Surrogate;
use surrogate_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_pulled_verified_then_served_from_store() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let body = Bytes::from_static(b"body { color: red }\n");
    origin.set("/a.css", Behaviour::Serve(body.clone()));
    let base = origin.start().await;
    let id = primary_identity();
    let m = manifest(&id, &base, vec![entry("/a.css", &body)]);
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", m.clone(), budgets()))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    let client = client();

    let first = get(&client, &running, "/a.css", &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, body);
    assert_eq!(first.header("x-p2pcdn-cache"), Some("miss"));
    let e = m.entry("/a.css").unwrap();
    assert_eq!(first.header("etag"), Some(e.etag.as_str()));
    assert_eq!(first.header("content-type"), Some("text/plain"));
    assert_eq!(first.header("cache-control"), Some("public, max-age=60"));
    assert_eq!(
        first.header("last-modified"),
        Some("Tue, 14 Nov 2023 22:13:20 GMT")
    );
    use base64::Engine;
    let digest = base64::engine::general_purpose::STANDARD.encode(sha256(&body));
    assert_eq!(
        first.header("repr-digest"),
        Some(format!("sha-256=:{digest}:").as_str())
    );
    assert_eq!(first.header("access-control-allow-origin"), Some("*"));
    assert_eq!(first.header("accept-ranges"), Some("bytes"));

    let second = get(&client, &running, "/a.css", &[]).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.body, body);
    assert_eq!(second.header("x-p2pcdn-cache"), Some("hit"));
    assert_eq!(origin.count("/a.css"), 1, "the origin is asked once");

    let usage = surrogate.usage("arr-1").unwrap();
    assert_eq!(usage.requests, 2);
    assert_eq!(usage.hits, 1);
    assert_eq!(usage.misses, 1);
    assert_eq!(usage.origin_fetches, 1);
    assert_eq!(usage.origin_bytes, body.len() as u64);
    assert_eq!(usage.bytes, 2 * body.len() as u64);
    assert!(usage.memory_bytes >= body.len() as u64);
    assert!(usage.disk_bytes >= body.len() as u64);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_origin_bytes_are_refused_and_never_cached() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let genuine = Bytes::from_static(b"the real script");
    // Same length, different bytes; and a longer body; both small (memory path) and large
    // (disk path) objects.
    origin.set(
        "/same-size.js",
        Behaviour::Serve(Bytes::from_static(b"the evil script")),
    );
    origin.set(
        "/longer.js",
        Behaviour::Serve(Bytes::from_static(b"the real script, and more")),
    );
    let big_genuine = vec![7_u8; 3 << 20];
    let mut big_tampered = big_genuine.clone();
    big_tampered[2 << 20] ^= 1;
    origin.set("/big.bin", Behaviour::Serve(Bytes::from(big_tampered)));
    let base = origin.start().await;
    let id = primary_identity();
    let m = manifest(
        &id,
        &base,
        vec![
            entry("/same-size.js", &genuine),
            entry("/longer.js", &genuine),
            entry("/big.bin", &big_genuine),
        ],
    );
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets()))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    let client = client();

    for path in ["/same-size.js", "/longer.js", "/big.bin"] {
        for round in 1..=2 {
            let got = get(&client, &running, path, &[]).await;
            assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{path}");
            assert!(
                !got.body.starts_with(b"the evil") && !got.body.starts_with(&[7, 7, 7]),
                "no origin byte is served: {:?}",
                String::from_utf8_lossy(&got.body)
            );
            assert_eq!(
                origin.count(path),
                round,
                "{path}: not cached, fetched again"
            );
        }
    }
    let usage = surrogate.usage("arr-1").unwrap();
    assert_eq!(usage.mismatches, 6);
    assert_eq!(usage.memory_bytes, 0);
    assert_eq!(usage.disk_bytes, 0);
    let files: Vec<_> = walk(&dir.path().join("cache"));
    assert!(files.is_empty(), "nothing stored on disk: {files:?}");

    // The origin repairs the file: it is served.
    origin.set("/same-size.js", Behaviour::Serve(genuine.clone()));
    let got = get(&client, &running, "/same-size.js", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, genuine);
    running.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(items) = std::fs::read_dir(dir) {
        for item in items.flatten() {
            let path = item.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_outside_the_manifest_are_404_and_never_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    origin.set("/secret", Behaviour::Serve(Bytes::from_static(b"secret")));
    let base = origin.start().await;
    let id = primary_identity();
    let listed = Bytes::from_static(b"ok");
    origin.set("/listed", Behaviour::Serve(listed.clone()));
    let m = manifest(&id, &base, vec![entry("/listed", &listed)]);
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets()))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    let client = client();

    for path in [
        "/secret",
        "/listed/../secret",
        "/%2e%2e/secret",
        "/listed?x=/secret",
    ] {
        let got = get(&client, &running, path, &[]).await;
        if path.starts_with("/listed?") {
            // The query is not part of the object's name: still the listed object.
            assert_eq!(got.status, StatusCode::OK);
        } else {
            assert_eq!(got.status, StatusCode::NOT_FOUND, "{path}");
        }
    }
    // An absolute-form request for another site is not proxied either.
    let got = request(
        &client,
        Method::GET,
        &running.url("/secret"),
        "evil.example",
        &[],
    )
    .await;
    assert_eq!(got.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(origin.count("/secret"), 0, "never an open proxy");
    assert_eq!(surrogate.usage("arr-1").unwrap().not_found, 3);

    let got = request(
        &client,
        Method::POST,
        &running.url("/listed"),
        "www.primary.test",
        &[],
    )
    .await;
    assert_eq!(got.status, StatusCode::METHOD_NOT_ALLOWED);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_mode_routes_by_primary_id_and_dsr_by_host() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let body = Bytes::from_static(b"<html></html>");
    origin.set("/index.html", Behaviour::Serve(body.clone()));
    let base = origin.start().await;
    let id = primary_identity();
    let m = manifest(&id, &base, vec![entry("/index.html", &body)]);
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets()))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    let client = client();

    let redirected = format!("/{}/index.html", id.fingerprint);
    let got = request(
        &client,
        Method::GET,
        &running.url(&redirected),
        "peer.test",
        &[],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, body);

    let got = request(
        &client,
        Method::GET,
        &running.url("/index.html"),
        "WWW.Primary.Test:8080",
        &[],
    )
    .await;
    assert_eq!(
        got.status,
        StatusCode::OK,
        "host match ignores case and port"
    );

    let other = primary_identity();
    let got = request(
        &client,
        Method::GET,
        &running.url(&format!("/{}/index.html", other.fingerprint)),
        "peer.test",
        &[],
    )
    .await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert!(String::from_utf8_lossy(&got.body).contains("no arrangement for primary"));

    // Removed arrangement: nothing served any more.
    surrogate.remove_tenant("arr-1");
    assert!(surrogate.usage("arr-1").is_none());
    let got = request(
        &client,
        Method::GET,
        &running.url(&redirected),
        "peer.test",
        &[],
    )
    .await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(origin.count("/index.html"), 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_cause_one_origin_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let small = Bytes::from(vec![1_u8; 10 * 1024]);
    let large = Bytes::from(vec![2_u8; 3 << 20]);
    origin.set(
        "/small",
        Behaviour::Delayed(small.clone(), Duration::from_millis(500)),
    );
    origin.set(
        "/large",
        Behaviour::Delayed(large.clone(), Duration::from_millis(500)),
    );
    let base = origin.start().await;
    let id = primary_identity();
    let m = manifest(
        &id,
        &base,
        vec![entry("/small", &small), entry("/large", &large)],
    );
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets()))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;

    for (path, expected) in [("/small", small), ("/large", large)] {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let url = running.url(path);
            tasks.spawn(async move {
                // One connection per request: 100 requests really are concurrent.
                let client = client();
                request(&client, Method::GET, &url, "www.primary.test", &[]).await
            });
        }
        let mut ok = 0;
        while let Some(got) = tasks.join_next().await {
            let got = got.unwrap();
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(got.body.len(), expected.len());
            assert!(got.body == expected);
            ok += 1;
        }
        assert_eq!(ok, 100);
        assert_eq!(origin.count(path), 1, "{path}: exactly one origin fetch");
    }
    let usage = surrogate.usage("arr-1").unwrap();
    assert_eq!(usage.origin_fetches, 2);
    assert_eq!(usage.requests, 200);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_origin_gives_504_within_the_bound_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let body = Bytes::from(vec![5_u8; 4096]);
    origin.set("/hang", Behaviour::Hang);
    origin.set("/stall", Behaviour::StallBody(body.slice(..100)));
    origin.set("/gone", Behaviour::Status(500));
    let base = origin.start().await;
    let id = primary_identity();
    let m = manifest(
        &id,
        &base,
        vec![
            entry("/hang", &body),
            entry("/stall", &body),
            entry("/gone", &body),
        ],
    );
    let mut cfg = config(dir.path());
    cfg.origin_header_timeout = Duration::from_millis(500);
    cfg.origin_idle_timeout = Duration::from_millis(500);
    let surrogate = Surrogate::new(cfg).await.unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets()))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    let client = client();

    for path in ["/hang", "/stall"] {
        let started = Instant::now();
        let got = get(&client, &running, path, &[]).await;
        assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "{path}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{path}: bounded"
        );
    }
    let got = get(&client, &running, "/gone", &[]).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    let usage = surrogate.usage("arr-1").unwrap();
    assert_eq!(usage.origin_timeouts, 2);
    assert_eq!(usage.origin_errors, 1);

    // An unreachable origin (nothing listens there) is an error, not a hang.
    let unreachable = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let other = primary_identity();
    let m = manifest(
        &other,
        &format!("http://{unreachable}"),
        vec![entry("/x", &body)],
    );
    let mut t = tenant(&other, "arr-2", m, budgets());
    t.host_names = vec!["other.test".to_owned()];
    surrogate.add_tenant(t).unwrap();
    let got = request(&client, Method::GET, &running.url("/x"), "other.test", &[]).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(surrogate.usage("arr-2").unwrap().origin_errors, 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_tenant_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let id = primary_identity();
    let other = primary_identity();
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    let m = manifest(&id, "http://127.0.0.1:9", vec![entry("/a", b"a")]);

    let mut expired = m.clone();
    expired.created_ms -= 7_200_000;
    expired.expires_ms = expired.created_ms + 3_600_000;
    let err = surrogate
        .add_tenant(tenant(&id, "a1", expired, budgets()))
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");

    let foreign = manifest(&other, "http://127.0.0.1:9", vec![]);
    let err = surrogate
        .add_tenant(tenant(&id, "a1", foreign, budgets()))
        .unwrap_err();
    assert!(err.to_string().contains("manifest of primary"), "{err}");

    let mut wrong_key = tenant(&id, "a1", m.clone(), budgets());
    wrong_key.primary_spki = other.spki_der.clone();
    let err = surrogate.add_tenant(wrong_key).unwrap_err();
    assert!(err.to_string().contains("public key"), "{err}");

    let mut bad = budgets();
    bad.total_bytes = bad.max_object_bytes - 1;
    let err = surrogate
        .add_tenant(tenant(&id, "a1", m.clone(), bad))
        .unwrap_err();
    assert!(err.to_string().contains("total_bytes"), "{err}");

    let mut bad_host = tenant(&id, "a1", m.clone(), budgets());
    bad_host.host_names = vec!["bad host".to_owned()];
    assert!(surrogate.add_tenant(bad_host).is_err());

    surrogate
        .add_tenant(tenant(&id, "a1", m.clone(), budgets()))
        .unwrap();
    let err = surrogate
        .add_tenant(tenant(&id, "a1", m.clone(), budgets()))
        .unwrap_err();
    assert!(err.to_string().contains("already served"), "{err}");
    let err = surrogate
        .add_tenant(tenant(&id, "a2", m, budgets()))
        .unwrap_err();
    assert!(
        err.to_string().contains("already served by arrangement a1"),
        "{err}"
    );
}
