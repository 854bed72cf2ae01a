//! HTTP semantics of the surrogate: HEAD, Range (206/416, If-Range), conditional requests
//! (304), the egress budget (503 + Retry-After), CORS, oversize objects, HTTP/2.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]

mod surrogate_support;

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use p2pcdn_controller::surrogate::{Budgets, Surrogate};
use surrogate_support::*;

struct Fixture {
    _dir: tempfile::TempDir,
    origin: Origin,
    surrogate: Surrogate,
    running: Running,
    small: Bytes,
    large: Bytes,
    primary: String,
}

async fn fixture(budgets: Budgets) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let small: Bytes = (0..1000_u32).map(|i| (i % 251) as u8).collect();
    let large: Bytes = (0..(2_u32 << 20)).map(|i| (i % 253) as u8).collect();
    origin.set("/small.txt", Behaviour::Serve(small.clone()));
    origin.set("/large.bin", Behaviour::Serve(large.clone()));
    let base = origin.start().await;
    let id = primary_identity();
    let m = manifest(
        &id,
        &base,
        vec![entry("/small.txt", &small), entry("/large.bin", &large)],
    );
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    Fixture {
        _dir: dir,
        origin,
        surrogate,
        running,
        small,
        large,
        primary: id.fingerprint.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_from_the_manifest_without_fetching() {
    let f = fixture(budgets()).await;
    let client = client();
    let got = request(
        &client,
        Method::HEAD,
        &f.running.url("/large.bin"),
        "www.primary.test",
        &[],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("content-length"), Some("2097152"));
    assert!(got.body.is_empty());
    assert!(got.header("etag").is_some());
    assert!(got.header("repr-digest").is_some());
    assert_eq!(f.origin.count("/large.bin"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_ranges_from_memory_and_from_disk() {
    let f = fixture(budgets()).await;
    let client = client();
    for (path, bytes) in [("/small.txt", &f.small), ("/large.bin", &f.large)] {
        let size = bytes.len();
        let cases = [
            ("bytes=0-9".to_owned(), 0, 10),
            ("bytes=100-".to_owned(), 100, size - 100),
            ("bytes=-7".to_owned(), size - 7, 7),
            (format!("bytes=500-{}", size + 50), 500, size - 500),
        ];
        for (range, start, len) in cases {
            let got = get(&client, &f.running, path, &[("range", &range)]).await;
            assert_eq!(got.status, StatusCode::PARTIAL_CONTENT, "{path} {range}");
            assert_eq!(got.body.len(), len, "{path} {range}");
            assert!(
                got.body == bytes.slice(start..start + len),
                "{path} {range}"
            );
            assert_eq!(
                got.header("content-range"),
                Some(format!("bytes {start}-{}/{size}", start + len - 1).as_str())
            );
            assert_eq!(got.header("content-length"), Some(len.to_string().as_str()));
        }
        let got = get(
            &client,
            &f.running,
            path,
            &[("range", &format!("bytes={size}-"))],
        )
        .await;
        assert_eq!(got.status, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(
            got.header("content-range"),
            Some(format!("bytes */{size}").as_str())
        );
        // Several ranges: the whole object (allowed by RFC 9110).
        let got = get(&client, &f.running, path, &[("range", "bytes=0-1,5-6")]).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body.len(), size);
        assert_eq!(
            f.origin.count(path),
            1,
            "{path}: one origin fetch for all of it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_requests_get_304_and_if_range_falls_back_to_200() {
    let f = fixture(budgets()).await;
    let client = client();
    let first = get(&client, &f.running, "/small.txt", &[]).await;
    let etag = first.header("etag").unwrap().to_owned();
    let modified = first.header("last-modified").unwrap().to_owned();

    for headers in [
        vec![("if-none-match", etag.as_str())],
        vec![("if-none-match", "\"nope\", W/\"x\", *")],
        vec![("if-modified-since", modified.as_str())],
    ] {
        let got = get(&client, &f.running, "/small.txt", &headers).await;
        assert_eq!(got.status, StatusCode::NOT_MODIFIED, "{headers:?}");
        assert!(got.body.is_empty());
        assert_eq!(got.header("etag"), Some(etag.as_str()));
        assert_eq!(got.header("cache-control"), Some("public, max-age=60"));
    }
    let got = get(
        &client,
        &f.running,
        "/small.txt",
        &[("if-none-match", "\"other\"")],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let got = get(
        &client,
        &f.running,
        "/small.txt",
        &[("if-modified-since", "Mon, 01 Jan 2001 00:00:00 GMT")],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);

    let got = get(
        &client,
        &f.running,
        "/small.txt",
        &[("range", "bytes=0-9"), ("if-range", etag.as_str())],
    )
    .await;
    assert_eq!(got.status, StatusCode::PARTIAL_CONTENT);
    let got = get(
        &client,
        &f.running,
        "/small.txt",
        &[("range", "bytes=0-9"), ("if-range", "\"stale\"")],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body.len(), f.small.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_egress_budget_is_503_with_retry_after() {
    let f = fixture(Budgets {
        egress_bytes_per_s: 1000,
        egress_burst_bytes: 2500,
        ..budgets()
    })
    .await;
    let client = client();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(get(&client, &f.running, "/small.txt", &[]).await);
    }
    assert_eq!(statuses[0].status, StatusCode::OK);
    assert_eq!(statuses[1].status, StatusCode::OK);
    let refused = &statuses[2];
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=2).contains(&retry),
        "about 0.5 s of refill needed, got {retry}"
    );
    let usage = f.surrogate.usage("arr-1").unwrap();
    assert_eq!(usage.budget_rejections, 1);
    assert_eq!(usage.bytes, 2000, "refused bytes are not sent");

    // A body larger than the burst goes out once the bucket is full, then the debt blocks.
    tokio::time::sleep(std::time::Duration::from_millis(2600)).await;
    let big = get(&client, &f.running, "/large.bin", &[]).await;
    assert_eq!(big.status, StatusCode::OK);
    let after = get(&client, &f.running, "/small.txt", &[]).await;
    assert_eq!(after.status, StatusCode::SERVICE_UNAVAILABLE);
    let retry: u64 = after.header("retry-after").unwrap().parse().unwrap();
    assert!(
        retry > 2000,
        "the 2 MiB debt takes ~2100 s at 1000 B/s, got {retry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_above_max_object_bytes_are_refused_without_fetching() {
    let f = fixture(Budgets {
        max_object_bytes: 1 << 20,
        ..budgets()
    })
    .await;
    let client = client();
    let got = get(&client, &f.running, "/large.bin", &[]).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(f.origin.count("/large.bin"), 0);
    assert_eq!(f.surrogate.usage("arr-1").unwrap().oversize, 1);
    let got = get(&client, &f.running, "/small.txt", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_headers_follow_the_tenant_policy() {
    let f = fixture(budgets()).await;
    let client = client();
    let got = request(
        &client,
        Method::OPTIONS,
        &f.running.url("/small.txt"),
        "www.primary.test",
        &[
            ("origin", "https://site.test"),
            ("access-control-request-method", "GET"),
        ],
    )
    .await;
    assert_eq!(got.status, StatusCode::NO_CONTENT);
    assert_eq!(got.header("access-control-allow-origin"), Some("*"));
    assert!(
        got.header("access-control-allow-headers")
            .unwrap()
            .contains("range")
    );
    let got = get(&client, &f.running, "/small.txt", &[]).await;
    assert!(
        got.header("access-control-expose-headers")
            .unwrap()
            .contains("repr-digest")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_is_served() {
    let f = fixture(budgets()).await;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let response = client
        .request(
            // HTTP/2 carries the authority in the URI: redirect-mode path.
            hyper::Request::get(f.running.url(&format!("/{}/small.txt", f.primary)))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, f.small);
}
