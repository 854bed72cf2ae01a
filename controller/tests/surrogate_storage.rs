//! Storage of the surrogate: eviction under the byte budget, a full or failing disk (the
//! memory tier keeps serving), restart (stored files verified again before use), manifest
//! updates, prepositioning of the hot set.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]

mod surrogate_support;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use axum::http::StatusCode;
use bytes::Bytes;
use p2pcdn_controller::surrogate::{Budgets, Eviction, Surrogate};
use surrogate_support::*;

fn object(fill: u8, len: usize) -> Bytes {
    Bytes::from(vec![fill; len])
}

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(items) = std::fs::read_dir(dir) {
        for item in items.flatten() {
            let path = item.path();
            if path.is_dir() {
                out.extend(files(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// The stored file of an object (named after its SHA-256).
fn stored_file(dir: &Path, bytes: &[u8]) -> PathBuf {
    let prefix = hex::encode(sha256(bytes));
    files(dir)
        .into_iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .expect("object stored on disk")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_eviction_keeps_the_arrangement_within_its_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let objects: Vec<(String, Bytes)> = (0..4_u8)
        .map(|i| (format!("/o{i}"), object(i, 30 * 1024)))
        .collect();
    for (path, bytes) in &objects {
        origin.set(path, Behaviour::Serve(bytes.clone()));
    }
    let base = origin.start().await;
    let id = primary_identity();
    let m = manifest(
        &id,
        &base,
        objects.iter().map(|(p, b)| entry(p, b)).collect(),
    );
    let mut cfg = config(dir.path());
    cfg.eviction = Eviction::Lru;
    let surrogate = Surrogate::new(cfg).await.unwrap();
    let budget = 100 * 1024;
    let budgets = Budgets {
        max_object_bytes: 40 * 1024,
        total_bytes: budget,
        ..budgets()
    };
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    let client = client();

    for path in ["/o0", "/o1", "/o2", "/o0", "/o3"] {
        let got = get(&client, &running, path, &[]).await;
        assert_eq!(got.status, StatusCode::OK, "{path}");
        let usage = surrogate.usage("arr-1").unwrap();
        assert!(usage.disk_bytes <= budget, "{usage:?}");
        assert!(usage.memory_bytes <= budget, "{usage:?}");
    }
    // o1 was the least recently used when o3 came: gone from both tiers; o0 (used again)
    // stayed.
    let usage = surrogate.usage("arr-1").unwrap();
    assert_eq!(usage.disk_bytes, 90 * 1024);
    assert_eq!(files(&dir.path().join("cache")).len(), 3);
    let got = get(&client, &running, "/o0", &[]).await;
    assert_eq!(got.header("x-p2pcdn-cache"), Some("hit"));
    let got = get(&client, &running, "/o1", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("x-p2pcdn-cache"), Some("miss"));
    assert_eq!(origin.count("/o0"), 1);
    assert_eq!(origin.count("/o1"), 2, "evicted, fetched again");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tinylfu_stays_within_the_budget_under_a_scan() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let objects: Vec<(String, Bytes)> = (0..20_u8)
        .map(|i| (format!("/s{i}"), object(i, 10 * 1024)))
        .collect();
    for (path, bytes) in &objects {
        origin.set(path, Behaviour::Serve(bytes.clone()));
    }
    let base = origin.start().await;
    let id = primary_identity();
    let m = manifest(
        &id,
        &base,
        objects.iter().map(|(p, b)| entry(p, b)).collect(),
    );
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    let budget = 50 * 1024;
    let budgets = Budgets {
        max_object_bytes: 10 * 1024,
        total_bytes: budget,
        ..budgets()
    };
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    let client = client();
    for _ in 0..2 {
        for (path, bytes) in &objects {
            let got = get(&client, &running, path, &[]).await;
            assert_eq!(got.status, StatusCode::OK);
            assert!(got.body == bytes);
            let usage = surrogate.usage("arr-1").unwrap();
            assert!(usage.disk_bytes <= budget, "{usage:?}");
            assert!(usage.memory_bytes <= budget, "{usage:?}");
        }
    }
    let on_disk: u64 = files(&dir.path().join("cache"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(on_disk <= budget, "{on_disk} bytes on disk");
    assert!(origin.total() > 20, "a 50 KiB budget cannot keep 200 KiB");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_counted_and_the_memory_tier_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let x = object(1, 30 * 1024);
    let y = object(2, 30 * 1024);
    let z = object(3, 40 * 1024);
    origin.set("/x", Behaviour::Serve(x.clone()));
    origin.set("/y", Behaviour::Serve(y.clone()));
    origin.set("/z", Behaviour::Serve(z.clone()));
    let base = origin.start().await;
    let id = primary_identity();
    let m = manifest(
        &id,
        &base,
        vec![entry("/x", &x), entry("/y", &y), entry("/z", &z)],
    );
    let mut cfg = config(dir.path());
    // The disk quota holds one object; /z is too big for memory.
    cfg.disk_bytes = 50 * 1024;
    cfg.memory_object_max_bytes = 32 * 1024;
    let surrogate = Surrogate::new(cfg).await.unwrap();
    let budgets = Budgets {
        max_object_bytes: 40 * 1024,
        total_bytes: 200 * 1024,
        ..budgets()
    };
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    let client = client();

    assert_eq!(
        get(&client, &running, "/x", &[]).await.status,
        StatusCode::OK
    );
    let got = get(&client, &running, "/y", &[]).await;
    assert_eq!(
        got.status,
        StatusCode::OK,
        "served although the disk is full"
    );
    assert!(got.body == y);
    assert_eq!(surrogate.usage("arr-1").unwrap().disk_errors, 1);
    let got = get(&client, &running, "/z", &[]).await;
    assert_eq!(
        got.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "cannot be stored anywhere"
    );
    assert!(String::from_utf8_lossy(&got.body).contains("disk tier full"));
    assert_eq!(surrogate.usage("arr-1").unwrap().disk_errors, 2);
    for (path, bytes) in [("/x", &x), ("/y", &y)] {
        let got = get(&client, &running, path, &[]).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.header("x-p2pcdn-cache"), Some("hit"), "{path}");
        assert!(got.body == bytes);
    }
    assert_eq!(origin.count("/x") + origin.count("/y"), 2);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_disk_directory_is_counted_and_memory_serves() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let x = object(1, 4096);
    let big = object(2, 2 << 20);
    origin.set("/x", Behaviour::Serve(x.clone()));
    origin.set("/big", Behaviour::Serve(big.clone()));
    let base = origin.start().await;
    let id = primary_identity();
    let m = manifest(&id, &base, vec![entry("/x", &x), entry("/big", &big)]);
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets()))
        .unwrap();
    // Replace the arrangement's directory by a file: every write fails (ENOTDIR), also for
    // root, which a read-only mode would not stop.
    let cache = dir.path().join("cache");
    let tenant_dir = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_dir_all(&tenant_dir).unwrap();
    std::fs::write(&tenant_dir, b"not a directory").unwrap();
    let running = Running::start(surrogate.clone()).await;
    let client = client();

    let got = get(&client, &running, "/x", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.body == x);
    let got = get(&client, &running, "/big", &[]).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    let usage = surrogate.usage("arr-1").unwrap();
    assert_eq!(usage.disk_errors, 2);
    let got = get(&client, &running, "/x", &[]).await;
    assert_eq!(got.header("x-p2pcdn-cache"), Some("hit"));
    assert_eq!(origin.count("/x"), 1);
    running.stop().await;
}

/// A tmpfs of 256 KiB mounted for the test; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Option<Self> {
        // SAFETY-free check: geteuid through the proc file.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let root = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
        if !root {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the tmpfs disk-full test needs root (CAP_SYS_ADMIN) in CI"
            );
            eprintln!("skipping: mounting a tmpfs needs root");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs failed");
        Some(Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_really_full_filesystem_is_counted_and_memory_serves() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_tmpfs) = Tmpfs::mount(&dir.path().join("cache")) else {
        return;
    };
    let origin = Origin::default();
    // Each 200 KiB: the first fits the 256 KiB file system, the second does not.
    let a = object(1, 200 * 1024);
    let b = object(2, 200 * 1024);
    origin.set("/a", Behaviour::Serve(a.clone()));
    origin.set("/b", Behaviour::Serve(b.clone()));
    let base = origin.start().await;
    let id = primary_identity();
    let m = manifest(&id, &base, vec![entry("/a", &a), entry("/b", &b)]);
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets()))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    let client = client();
    for (path, bytes) in [("/a", &a), ("/b", &b), ("/a", &a), ("/b", &b)] {
        let got = get(&client, &running, path, &[]).await;
        assert_eq!(got.status, StatusCode::OK, "{path}");
        assert!(got.body == bytes);
    }
    let usage = surrogate.usage("arr-1").unwrap();
    assert_eq!(usage.disk_errors, 1, "ENOSPC counted once: {usage:?}");
    assert_eq!(usage.hits, 2, "both served from memory the second time");
    assert_eq!(origin.total(), 2);
    let leftovers: Vec<_> = files(&dir.path().join("cache"))
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("tmp-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "failed writes are cleaned up: {leftovers:?}"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_stored_files_are_verified_before_use() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let small = object(1, 8 * 1024);
    let large = Bytes::from(
        (0..(3_u32 << 20))
            .map(|i| (i % 241) as u8)
            .collect::<Vec<u8>>(),
    );
    origin.set("/small", Behaviour::Serve(small.clone()));
    origin.set("/large", Behaviour::Serve(large.clone()));
    let base = origin.start().await;
    let id = primary_identity();
    let m = manifest(
        &id,
        &base,
        vec![entry("/small", &small), entry("/large", &large)],
    );
    let cache = dir.path().join("cache");

    // Run 1: fill the disk tier.
    {
        let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
        surrogate
            .add_tenant(tenant(&id, "arr-1", m.clone(), budgets()))
            .unwrap();
        let running = Running::start(surrogate.clone()).await;
        let client = client();
        for path in ["/small", "/large"] {
            assert_eq!(
                get(&client, &running, path, &[]).await.status,
                StatusCode::OK
            );
        }
        running.stop().await;
    }
    assert_eq!(files(&cache).len(), 2, "kept across the stop");
    // A stray file of no entry is dropped at start.
    let tenant_dir = stored_file(&cache, &small).parent().unwrap().to_owned();
    std::fs::write(
        tenant_dir.join(format!("{}.1", hex::encode([9_u8; 32]))),
        b"junk",
    )
    .unwrap();

    // Run 2: served from disk without the origin, after hashing.
    {
        let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
        surrogate
            .add_tenant(tenant(&id, "arr-1", m.clone(), budgets()))
            .unwrap();
        assert_eq!(
            surrogate.usage("arr-1").unwrap().disk_dropped,
            1,
            "the stray file"
        );
        let running = Running::start(surrogate.clone()).await;
        let client = client();
        for (path, bytes) in [("/small", &small), ("/large", &large)] {
            let got = get(&client, &running, path, &[]).await;
            assert_eq!(got.status, StatusCode::OK);
            assert!(got.body == bytes);
            let again = get(&client, &running, path, &[]).await;
            assert_eq!(again.header("x-p2pcdn-cache"), Some("hit"));
        }
        assert_eq!(origin.count("/small"), 1);
        assert_eq!(origin.count("/large"), 1);
        running.stop().await;
    }

    // Corrupt both files between runs (same sizes): run 3 must not serve them.
    for bytes in [&small, &large] {
        let path = stored_file(&cache, bytes);
        let mut content = std::fs::read(&path).unwrap();
        let middle = content.len() / 2;
        content[middle] ^= 0xff;
        std::fs::write(&path, content).unwrap();
    }
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets()))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    let client = client();
    for (path, bytes) in [("/small", &small), ("/large", &large)] {
        let got = get(&client, &running, path, &[]).await;
        assert_eq!(got.status, StatusCode::OK);
        assert!(got.body == bytes, "{path}: the genuine bytes, refetched");
        assert_eq!(origin.count(path), 2, "{path}: refetched");
    }
    assert_eq!(surrogate.usage("arr-1").unwrap().disk_dropped, 2);
    for bytes in [&small, &large] {
        assert_eq!(
            std::fs::read(stored_file(&cache, bytes)).unwrap(),
            bytes.to_vec()
        );
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_manifest_version_keeps_unchanged_objects_and_drops_changed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let a = object(1, 1000);
    let b1 = object(2, 1000);
    let b2 = object(3, 1200);
    origin.set("/a", Behaviour::Serve(a.clone()));
    origin.set("/b", Behaviour::Serve(b1.clone()));
    let base = origin.start().await;
    let id = primary_identity();
    let v1 = manifest(&id, &base, vec![entry("/a", &a), entry("/b", &b1)]);
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    surrogate
        .add_tenant(tenant(&id, "arr-1", v1.clone(), budgets()))
        .unwrap();
    let running = Running::start(surrogate.clone()).await;
    let client = client();
    for path in ["/a", "/b"] {
        assert_eq!(
            get(&client, &running, path, &[]).await.status,
            StatusCode::OK
        );
    }

    origin.set("/b", Behaviour::Serve(b2.clone()));
    let mut v2 = manifest(
        &id,
        &base,
        vec![entry("/a", &a), entry("/b", &b2), entry("/c", &a)],
    );
    v2.version = 2;
    let update = surrogate.update_manifest("arr-1", v2.clone()).unwrap();
    assert_eq!(update.added, vec!["/c".to_owned()]);
    assert_eq!(update.changed, vec!["/b".to_owned()]);
    assert!(update.removed.is_empty());
    assert_eq!(update.objects_dropped, 1);
    let err = surrogate.update_manifest("arr-1", v1).unwrap_err();
    assert!(err.to_string().contains("does not supersede"), "{err}");

    let got = get(&client, &running, "/b", &[]).await;
    assert!(got.body == b2);
    // /c has /a's bytes: served from the same stored object.
    let got = get(&client, &running, "/c", &[]).await;
    assert_eq!(got.header("x-p2pcdn-cache"), Some("hit"));
    assert!(got.body == a);
    assert_eq!(origin.count("/a"), 1);
    assert_eq!(origin.count("/b"), 2);
    assert_eq!(origin.count("/c"), 0);

    let mut v3 = v2;
    v3.version = 3;
    v3.entries.remove("/a");
    v3.entries.remove("/c");
    v3.hot = vec!["/b".to_owned()];
    let update = surrogate.update_manifest("arr-1", v3).unwrap();
    assert_eq!(update.removed, vec!["/a".to_owned(), "/c".to_owned()]);
    assert_eq!(
        get(&client, &running, "/a", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepositioning_fetches_the_hot_set_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::default();
    let objects: Vec<(String, Bytes)> = (0..5_u8)
        .map(|i| (format!("/h{i}"), object(i, 20 * 1024)))
        .collect();
    for (path, bytes) in &objects {
        origin.set(path, Behaviour::Serve(bytes.clone()));
    }
    let huge = object(9, 200 * 1024);
    origin.set("/huge", Behaviour::Serve(huge.clone()));
    let base = origin.start().await;
    let id = primary_identity();
    let mut entries: Vec<_> = objects.iter().map(|(p, b)| entry(p, b)).collect();
    entries.push(entry("/huge", &huge));
    let mut m = manifest(&id, &base, entries);
    m.hot = vec![
        "/huge".to_owned(),
        "/h0".to_owned(),
        "/h1".to_owned(),
        "/h2".to_owned(),
        "/h3".to_owned(),
        "/h4".to_owned(),
    ];
    let surrogate = Surrogate::new(config(dir.path())).await.unwrap();
    let budgets = Budgets {
        max_object_bytes: 60 * 1024,
        total_bytes: 70 * 1024,
        ..budgets()
    };
    surrogate
        .add_tenant(tenant(&id, "arr-1", m, budgets))
        .unwrap();

    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&calls);
    let report = surrogate
        .preposition("arr-1", move |done, total| {
            seen.lock().unwrap().push((done, total))
        })
        .await
        .unwrap();
    assert_eq!(report.planned, 3, "{report:?}");
    assert_eq!(report.fetched, 3);
    assert_eq!(report.skipped, 3, "huge, and two beyond 70 KiB");
    assert!(report.failed.is_empty());
    assert_eq!(report.bytes, 60 * 1024);
    assert_eq!(*calls.lock().unwrap(), vec![(0, 3), (1, 3), (2, 3), (3, 3)]);
    assert_eq!(origin.count("/huge"), 0);
    assert_eq!(origin.count("/h3"), 0);

    let running = Running::start(surrogate.clone()).await;
    let client = client();
    for path in ["/h0", "/h1", "/h2"] {
        let got = get(&client, &running, path, &[]).await;
        assert_eq!(got.header("x-p2pcdn-cache"), Some("hit"), "{path}");
    }
    let again = surrogate.preposition("arr-1", |_, _| {}).await.unwrap();
    assert_eq!(again.already_stored, 3);
    assert_eq!(again.fetched, 0);
    assert_eq!(origin.total(), 3);
    assert!(surrogate.preposition("nope", |_, _| {}).await.is_err());
    running.stop().await;
}
