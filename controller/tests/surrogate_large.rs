//! A 1 GiB object pulled through and served with peak memory far below its size. Alone in
//! its test binary so that the process's peak RSS (VmHWM) is this test's.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]

mod surrogate_support;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use http_body_util::{BodyExt, Empty};
use p2pcdn_controller::surrogate::{Budgets, Surrogate};
use surrogate_support::*;

const SIZE: u64 = 1 << 30;

/// A /proc/self/status field in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("field in /proc/self/status")
}

/// Downloads `path`, hashing as it goes (nothing kept); returns status, length, SHA-256.
async fn download(running: &Running, path: &str) -> (StatusCode, u64, [u8; 32], String) {
    let client = client();
    let request = hyper::Request::get(running.url(path))
        .header("host", "www.primary.test")
        .body(Empty::new())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(300), client.request(request))
        .await
        .expect("headers within 300 s")
        .unwrap();
    let status = response.status();
    let cache = response
        .headers()
        .get("x-p2pcdn-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut body = response.into_body();
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut total = 0_u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while let Some(frame) = tokio::time::timeout_at(deadline.into(), body.frame())
        .await
        .expect("body within 300 s")
    {
        if let Ok(data) = frame.unwrap().into_data() {
            total += data.len() as u64;
            context.update(&data);
        }
    }
    let digest = context.finish().as_ref().try_into().unwrap();
    (status, total, digest, cache)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_object_streams_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    origin.set("/big.iso", Behaviour::Generated(SIZE));
    let base = origin.start().await;
    let sha = generated_sha256(SIZE);
    let id = primary_identity();
    let m = manifest(&id, &base, vec![entry_with("/big.iso", SIZE, sha)]);
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    let budgets = Budgets {
        max_object_bytes: 2 * SIZE,
        total_bytes: 4 * SIZE,
        ..budgets()
    };
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;

    // Reset the peak to the current RSS (Linux ≥ 4.0), so the peak below is this transfer's.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = if reset {
        status_kib("VmRSS:")
    } else {
        status_kib("VmHWM:")
    };

    // Miss (pulled, verified on a file, then streamed from it), then a hit from disk.
    for expected_cache in ["miss", "hit"] {
        let started = Instant::now();
        let (status, len, digest, cache) = download(&running, "/big.iso").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(len, SIZE);
        assert_eq!(digest, sha, "the bytes the manifest names");
        assert_eq!(cache, expected_cache);
        eprintln!("{expected_cache}: 1 GiB in {:?}", started.elapsed());
    }
    let peak = status_kib("VmHWM:");
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!(
        "rss before {} MiB, peak {} MiB (+{grown_mib} MiB)",
        before / 1024,
        peak / 1024
    );
    assert!(
        grown_mib < 128,
        "peak memory grew by {grown_mib} MiB for a 1024 MiB object"
    );
    assert_eq!(origin.count("/big.iso"), 1);
    let usage = surrogate.usage("arr-1").unwrap();
    assert_eq!(usage.origin_bytes, SIZE);
    assert_eq!(usage.bytes, 2 * SIZE);
    assert_eq!(usage.memory_bytes, 0, "large objects never go to memory");
    assert_eq!(usage.disk_bytes, SIZE);
    running.stop().await;
}
