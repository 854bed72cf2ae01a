//! Manifests as a surrogate receives them: fetched from the primary's origin and accepted
//! only when signed by the arrangement's primary, unexpired and matching the expected hash.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]

mod surrogate_support;

use axum::http::StatusCode;
use bytes::Bytes;
use p2pcdn_controller::{
    model::now_ms,
    surrogate::{Surrogate, SurrogateError, fetch_manifest},
};
use surrogate_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_manifest_is_fetched_verified_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let base = origin.start().await;
    let id = primary_identity();
    let body = Bytes::from_static(b"console.log(1)");
    origin.set("/app.js", Behaviour::Serve(body.clone()));
    let m = manifest(&id, &base, vec![entry("/app.js", &body)]);
    let encoded = encode(&sign(&id, &m));
    origin.set(
        "/manifest.bin",
        Behaviour::Serve(Bytes::from(encoded.clone())),
    );
    let url = format!("{base}/manifest.bin");

    let fetched = fetch_manifest(&url, Some(sha256(&encoded)), &id.spki_der, now_ms())
        .await
        .unwrap();
    assert_eq!(fetched, m);

    // The usage counters are exported as metrics labelled with the arrangement.
    let metrics = p2pcdn_controller::admin::install_metrics();
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    let again = surrogate
        .fetch_manifest(&url, None, &id.spki_der, now_ms())
        .await
        .unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", again, budgets()))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    let got = get(&client(), &running, "/app.js", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, body);
    let text = metrics.render();
    for line in [
        "p2pcdn_surrogate_requests_total{tenant=\"arr-1\"} 1",
        "p2pcdn_surrogate_misses_total{tenant=\"arr-1\"} 1",
        &format!(
            "p2pcdn_surrogate_bytes_total{{tenant=\"arr-1\"}} {}",
            body.len()
        ),
        &format!(
            "p2pcdn_surrogate_origin_bytes_total{{tenant=\"arr-1\"}} {}",
            body.len()
        ),
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_served_under_an_expired_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let base = origin.start().await;
    let id = primary_identity();
    let body = Bytes::from_static(b"x");
    origin.set("/x", Behaviour::Serve(body.clone()));
    let mut m = manifest(&id, &base, vec![entry("/x", &body)]);
    m.expires_ms = now_ms() + 1500;
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets()))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    let client = client();
    assert_eq!(
        get(&client, &running, "/x", &[]).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    let got = get(&client, &running, "/x", &[]).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&got.body).contains("expired"));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_foreign_tampered_and_expired_manifests_are_refused() {
    let origin = Origin::default();
    let base = origin.start().await;
    let id = primary_identity();
    let other = primary_identity();
    let m = manifest(&id, &base, vec![entry("/a", b"a")]);
    let signed = sign(&id, &m);

    // A bad signature.
    let mut bad = signed.clone();
    bad.signature[10] ^= 1;
    origin.set("/bad-sig", Behaviour::Serve(Bytes::from(encode(&bad))));
    // The manifest bytes changed after signing (an object's hash swapped).
    let mut tampered = signed.clone();
    let last = tampered.bytes.len() - 1;
    tampered.bytes[last] ^= 1;
    origin.set(
        "/tampered",
        Behaviour::Serve(Bytes::from(encode(&tampered))),
    );
    // Signed by another node.
    let foreign = sign(&other, &manifest(&other, &base, vec![entry("/a", b"a")]));
    origin.set("/foreign", Behaviour::Serve(Bytes::from(encode(&foreign))));
    // Expired an hour ago.
    let mut old = m.clone();
    old.created_ms = now_ms() - 7_200_000;
    old.expires_ms = now_ms() - 3_600_000;
    origin.set(
        "/expired",
        Behaviour::Serve(Bytes::from(encode(&sign(&id, &old)))),
    );
    origin.set(
        "/garbage",
        Behaviour::Serve(Bytes::from_static(b"\xff\xff\xff not protobuf")),
    );
    origin.set("/good", Behaviour::Serve(Bytes::from(encode(&signed))));

    let now = now_ms();
    let spki = &id.spki_der;
    let fetch = |path: &str| fetch_manifest_at(format!("{base}{path}"), spki.clone(), now);

    for path in ["/bad-sig", "/tampered", "/foreign"] {
        let err = fetch(path).await.unwrap_err();
        assert!(matches!(err, SurrogateError::Manifest(_)), "{path}: {err}");
    }
    let err = fetch("/expired").await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    let err = fetch("/garbage").await.unwrap_err();
    assert!(err.to_string().contains("malformed manifest"), "{err}");
    let err = fetch("/missing").await.unwrap_err();
    assert!(err.to_string().contains("status 404"), "{err}");

    // The good one, but with the hash the arrangement announced for another version.
    let err = fetch_manifest(&format!("{base}/good"), Some([0; 32]), spki, now)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SurrogateError::ManifestDigest { .. }),
        "{err}"
    );
    // The good one under the other node's key.
    let err = fetch_manifest(&format!("{base}/good"), None, &other.spki_der, now)
        .await
        .unwrap_err();
    assert!(matches!(err, SurrogateError::Manifest(_)), "{err}");
    // And as it is: accepted. Later than its expiry: refused.
    assert!(fetch("/good").await.is_ok());
    let err = fetch_manifest(&format!("{base}/good"), None, spki, m.expires_ms + 1)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
}

async fn fetch_manifest_at(
    url: String,
    spki: Vec<u8>,
    now: i64,
) -> Result<p2pcdn_controller::manifest::Manifest, SurrogateError> {
    fetch_manifest(&url, None, &spki, now).await
}
