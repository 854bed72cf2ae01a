//! `p2pcdn manifest build|show` through the built binary, with a node made by `p2pcdn init`:
//! a build, a superseding build with a diff and a hot set, verification, and the exit codes
//! of bad input (64) and runtime failures (1).
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use axum::{Router, http::StatusCode, routing::get};
use tokio::net::TcpListener;

fn p2pcdn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_p2pcdn"))
        .args(args)
        .env_remove("P2PCDN_CONFIG")
        .env_remove("P2PCDN_TOKEN")
        .output()
        .unwrap()
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Exit code 64 with exactly one line on stderr that mentions `needle`.
fn assert_bad_input(out: &Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(code(out), 64, "stderr: {err} stdout: {}", stdout(out));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("p2pcdn: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

fn init(dir: &Path, name: &str) -> String {
    let out = p2pcdn(&["init", "--dir", dir.to_str().unwrap(), "--name", name]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    dir.join("p2pcdn.toml").to_str().unwrap().to_owned()
}

fn write(root: &Path, rel: &str, body: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, body).unwrap();
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

struct Node {
    _dir: tempfile::TempDir,
    config: String,
    root: PathBuf,
    work: PathBuf,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let config = init(&dir.path().join("etc"), "edge-a");
    let root = dir.path().join("www");
    write(&root, "index.html", "<html></html>");
    write(&root, "css/site.css", "body{}");
    write(&root, "img/logo.svg", "<svg/>");
    let work = dir.path().join("out");
    fs::create_dir_all(&work).unwrap();
    Node {
        config,
        root,
        work,
        _dir: dir,
    }
}

fn build(n: &Node, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "manifest",
        "build",
        "--config",
        &n.config,
        "--root",
        s(&n.root),
        "--origin",
        "https://www.example/",
        "--service",
        "site",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    p2pcdn(&args)
}

fn show_json(n: &Node, file: &Path) -> serde_json::Value {
    let out = p2pcdn(&["--json", "manifest", "show", s(file), "--config", &n.config]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

#[test]
fn build_show_and_supersede() {
    let n = node();
    let v1 = n.work.join("v1.manifest");
    let out = build(&n, &v1, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("service site, version 1, 3 entries, 25 bytes"),
        "{text}"
    );
    assert!(text.contains("origin https://www.example\n"), "{text}");

    let out = p2pcdn(&["manifest", "show", s(&v1), "--config", &n.config]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("signature valid"), "{text}");
    for path in [
        "/index.html",
        "/css/site.css",
        "/img/logo.svg",
        "image/svg+xml",
    ] {
        assert!(text.contains(path), "{path} in {text}");
    }
    let json = show_json(&n, &v1);
    assert_eq!(json["version"], 1);
    assert_eq!(json["service"], "site");
    assert_eq!(json["total_bytes"], 25);
    assert_eq!(json["entries"]["/css/site.css"]["size"], 6);
    assert_eq!(json["entries"]["/css/site.css"]["content_type"], "text/css");

    // Version 2: one file changed, one added, one removed, a hot list with request counts.
    write(&n.root, "css/site.css", "body{color:red}");
    write(&n.root, "js/app.js", "go()");
    fs::remove_file(n.root.join("img/logo.svg")).unwrap();
    let hot = n.work.join("hot.txt");
    fs::write(
        &hot,
        "  12 /index.html\n 900 /js/app.js\n  50 /img/logo.svg\n",
    )
    .unwrap();
    let v2 = n.work.join("v2.manifest");
    let out = build(&n, &v2, &["--previous", s(&v1), "--hot", s(&hot)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("version 2"), "{text}");
    assert!(
        text.contains("changes since version 1: 1 added, 1 changed, 1 removed"),
        "{text}"
    );
    assert!(text.contains("  + /js/app.js"), "{text}");
    assert!(text.contains("  ~ /css/site.css"), "{text}");
    assert!(text.contains("  - /img/logo.svg"), "{text}");
    assert!(text.contains("hot set 2 paths (1 ignored"), "{text}");
    let json = show_json(&n, &v2);
    assert_eq!(json["version"], 2);
    assert_eq!(
        json["hot"],
        serde_json::json!(["/js/app.js", "/index.html"])
    );

    // --json build summary and an explicit version above the previous one.
    let v9 = n.work.join("v9.manifest");
    let out = p2pcdn(&[
        "--json",
        "manifest",
        "build",
        "--config",
        &n.config,
        "--root",
        s(&n.root),
        "--origin",
        "https://www.example",
        "--service",
        "site",
        "--previous",
        s(&v2),
        "--version",
        "9",
        "--out",
        s(&v9),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(summary["version"], 9);
    assert_eq!(summary["previous_version"], 2);
    assert_eq!(summary["delta"]["added"], serde_json::json!([]));
    assert_eq!(summary["sha256"].as_str().unwrap().len(), 64);
}

#[test]
fn bad_input_exits_64_with_one_line() {
    let n = node();
    let v1 = n.work.join("v1.manifest");
    assert_eq!(code(&build(&n, &v1, &[])), 0);

    // Tampered file.
    let mut bytes = fs::read(&v1).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    let tampered = n.work.join("tampered.manifest");
    fs::write(&tampered, &bytes).unwrap();
    let out = p2pcdn(&["manifest", "show", s(&tampered), "--config", &n.config]);
    assert_bad_input(&out, "tampered.manifest");
    assert!(stderr(&out).contains("manifest"), "{}", stderr(&out));

    // Not a manifest at all.
    let junk = n.work.join("junk");
    fs::write(&junk, b"\xff\xff\xff\xffjunk").unwrap();
    assert_bad_input(
        &p2pcdn(&["manifest", "show", s(&junk), "--config", &n.config]),
        "malformed manifest",
    );

    // Another node's key.
    let other = tempfile::tempdir().unwrap();
    let other_config = init(other.path(), "edge-b");
    assert_bad_input(
        &p2pcdn(&["manifest", "show", s(&v1), "--config", &other_config]),
        "signature",
    );
    // ... unless its certificate is the one given.
    let cert = Path::new(&n.config).with_file_name("node.crt");
    let out = p2pcdn(&[
        "manifest",
        "show",
        s(&v1),
        "--config",
        &other_config,
        "--cert",
        s(&cert),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // Expired.
    let short = n.work.join("short.manifest");
    assert_eq!(code(&build(&n, &short, &["--ttl-s", "1"])), 0);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_bad_input(
        &p2pcdn(&["manifest", "show", s(&short), "--config", &n.config]),
        "expired",
    );
    // An expired previous version may still be superseded.
    let next = n.work.join("next.manifest");
    let out = build(&n, &next, &["--previous", s(&short)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("version 2"), "{}", stdout(&out));

    // Unreadable root, bad URL, bad names and values.
    let mut args = vec![
        "manifest",
        "build",
        "--config",
        &n.config,
        "--service",
        "site",
    ];
    let out_arg = n.work.join("x.manifest");
    args.extend(["--out", s(&out_arg)]);
    let run = |extra: &[&str]| {
        let mut a = args.clone();
        a.extend_from_slice(extra);
        p2pcdn(&a)
    };
    assert_bad_input(
        &run(&[
            "--root",
            "/nonexistent/www",
            "--origin",
            "https://www.example",
        ]),
        "/nonexistent/www",
    );
    assert_bad_input(
        &run(&["--root", s(&n.root), "--origin", "www.example"]),
        "not an http:// or https:// url",
    );
    assert_bad_input(
        &run(&["--root", s(&n.root), "--origin", "https://www.example/a?b"]),
        "query",
    );
    let mut a = vec![
        "manifest",
        "build",
        "--config",
        &n.config,
        "--service",
        "Bad!",
    ];
    a.extend([
        "--root",
        s(&n.root),
        "--origin",
        "https://x",
        "--out",
        s(&out_arg),
    ]);
    assert_bad_input(&p2pcdn(&a), "service");
    assert_bad_input(
        &run(&[
            "--root",
            s(&n.root),
            "--origin",
            "https://x",
            "--previous",
            s(&v1),
            "--version",
            "1",
        ]),
        "greater than the previous version 1",
    );
    let bad_hot = n.work.join("bad-hot.txt");
    fs::write(&bad_hot, "/ok\n/../etc/passwd\n").unwrap();
    assert_bad_input(
        &run(&[
            "--root",
            s(&n.root),
            "--origin",
            "https://x",
            "--hot",
            s(&bad_hot),
        ]),
        "line 2",
    );
    assert!(!out_arg.exists(), "nothing written on failure");

    // Another service's previous manifest.
    let mut a = vec![
        "manifest",
        "build",
        "--config",
        &n.config,
        "--service",
        "other",
    ];
    a.extend([
        "--root",
        s(&n.root),
        "--origin",
        "https://x",
        "--previous",
        s(&v1),
        "--out",
        s(&out_arg),
    ]);
    assert_bad_input(&p2pcdn(&a), "service \"site\"");

    // A missing config.
    let out = p2pcdn(&[
        "manifest",
        "build",
        "--config",
        "/nonexistent/p2pcdn.toml",
        "--root",
        s(&n.root),
        "--origin",
        "https://x",
        "--service",
        "site",
        "--out",
        s(&out_arg),
    ]);
    assert_bad_input(&out, "/nonexistent/p2pcdn.toml");

    // Usage errors are clap's (2): no source.
    let out = p2pcdn(&[
        "manifest",
        "build",
        "--config",
        &n.config,
        "--origin",
        "https://x",
        "--service",
        "site",
        "--out",
        s(&out_arg),
    ]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_from_an_origin_through_the_cli() {
    let n = node();
    let app = Router::new()
        .route("/site/a.css", get(|| async { "body{}" }))
        .route("/site/b.js", get(|| async { "run()" }))
        .route(
            "/site/down",
            get(|| async { StatusCode::SERVICE_UNAVAILABLE }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let origin = format!("http://{addr}/site");
    let list = n.work.join("paths.txt");
    let out_file = n.work.join("origin.manifest");
    let config = n.config.clone();
    let run = move |paths: &str, origin: &str| {
        fs::write(&list, paths).unwrap();
        p2pcdn(&[
            "manifest",
            "build",
            "--config",
            &config,
            "--origin",
            origin,
            "--paths",
            s(&list),
            "--service",
            "site",
            "--timeout-s",
            "5",
            "--out",
            s(&out_file),
        ])
    };
    let (origin2, run2) = (origin.clone(), run.clone());
    let ok = tokio::task::spawn_blocking(move || run2("# objects\n/a.css\n/b.js\n", &origin2))
        .await
        .unwrap();
    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    assert!(
        stdout(&ok).contains("2 entries, 11 bytes"),
        "{}",
        stdout(&ok)
    );
    let json = show_json(&n, &n.work.join("origin.manifest"));
    assert_eq!(json["origin"], origin);
    assert_eq!(json["entries"]["/b.js"]["size"], 5);

    let (origin2, run2) = (origin.clone(), run.clone());
    let missing = tokio::task::spawn_blocking(move || run2("/a.css\n/nope\n", &origin2))
        .await
        .unwrap();
    assert_bad_input(&missing, "origin answered 404");

    let (origin2, run2) = (origin.clone(), run.clone());
    let bad_line = tokio::task::spawn_blocking(move || run2("/a.css\nb.js\n", &origin2))
        .await
        .unwrap();
    assert_bad_input(&bad_line, "line 2");

    // Runtime failures exit 1: a server error, nobody listening.
    let (origin2, run2) = (origin.clone(), run.clone());
    let down = tokio::task::spawn_blocking(move || run2("/down\n", &origin2))
        .await
        .unwrap();
    assert_eq!(code(&down), 1, "{}", stderr(&down));
    assert!(stderr(&down).contains("503"), "{}", stderr(&down));
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let refused = tokio::task::spawn_blocking(move || run("/a.css\n", &format!("http://{closed}")))
        .await
        .unwrap();
    assert_eq!(code(&refused), 1, "{}", stderr(&refused));
    assert_eq!(stderr(&refused).lines().count(), 1, "{}", stderr(&refused));
}
