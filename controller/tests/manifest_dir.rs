//! `build_from_dir` over a temporary document root: nested directories, empty files, names
//! that need encoding, hidden files and links, options, and the errors of bad input.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::{fs, path::Path};

use p2pcdn_controller::{
    identity::NodeIdentity,
    manifest::{
        BuildOptions, DEFAULT_CACHE_CONTROL, ManifestError, build_from_dir, etag_of, open, sign,
    },
    model::{Fingerprint, now_ms},
};
use sha2::{Digest as _, Sha256};

fn write(root: &Path, rel: &str, body: &[u8]) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, body).unwrap();
}

fn sha(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

fn opts(primary: Fingerprint) -> BuildOptions {
    BuildOptions::new(primary, "video", "https://origin.example/static/")
}

fn tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "index.html", b"<!doctype html><title>x</title>");
    write(root, "css/site.css", b"body { color: red }");
    write(root, "js/app.js", b"console.log(1)");
    write(root, "nested/deep/deeper/data.json", b"{\"a\": 1}");
    write(root, "empty.txt", b"");
    write(root, "a b+c.txt", b"space");
    write(root, "caf\u{e9}.bin", b"\x00\x01\x02");
    write(root, ".hidden/secret", b"do not publish");
    write(root, ".env", b"KEY=1");
    write(root, ".well-known/security.txt", b"Contact: x");
    std::os::unix::fs::symlink(root.join("index.html"), root.join("link.html")).unwrap();
    dir
}

#[tokio::test]
async fn a_tree_becomes_a_manifest() {
    let dir = tree();
    let id = NodeIdentity::generate("edge-a", "Example", &[]).unwrap();
    let mut o = opts(id.fingerprint);
    o.version = 7;
    o.ttl_ms = 60_000;
    let before = now_ms();
    o.now = before;
    let m = build_from_dir(dir.path(), o).await.unwrap();

    let paths: Vec<&str> = m.entries.keys().map(String::as_str).collect();
    assert_eq!(
        paths,
        vec![
            "/.well-known/security.txt",
            "/a%20b+c.txt",
            "/caf%C3%A9.bin",
            "/css/site.css",
            "/empty.txt",
            "/index.html",
            "/js/app.js",
            "/nested/deep/deeper/data.json",
        ],
        "hidden files and links are not published"
    );
    let css = m.entry("/css/site.css").unwrap();
    assert_eq!(css.size, 19);
    assert_eq!(css.sha256, sha(b"body { color: red }"));
    assert_eq!(css.etag, etag_of(&css.sha256));
    assert_eq!(css.etag, format!("\"{}\"", hex::encode(css.sha256)));
    assert_eq!(css.content_type, "text/css");
    assert_eq!(css.cache_control, DEFAULT_CACHE_CONTROL);
    let modified = css.last_modified_ms.unwrap();
    assert!(
        (before - 600_000..=now_ms() + 1000).contains(&modified),
        "{modified}"
    );
    assert_eq!(m.entry("/index.html").unwrap().content_type, "text/html");
    assert_eq!(
        m.entry("/nested/deep/deeper/data.json")
            .unwrap()
            .content_type,
        "application/json"
    );
    assert!(
        m.entry("/js/app.js")
            .unwrap()
            .content_type
            .contains("javascript")
    );
    assert_eq!(
        m.entry("/caf%C3%A9.bin").unwrap().content_type,
        "application/octet-stream"
    );
    let empty = m.entry("/empty.txt").unwrap();
    assert_eq!((empty.size, empty.sha256), (0, sha(b"")));
    assert_eq!(m.entry("/a%20b+c.txt").unwrap().sha256, sha(b"space"));

    assert_eq!(
        m.origin, "https://origin.example/static",
        "trailing slash dropped"
    );
    assert_eq!((m.service.as_str(), m.version), ("video", 7));
    assert_eq!((m.created_ms, m.expires_ms), (before, before + 60_000));
    assert_eq!(m.primary, id.fingerprint);
    assert!(m.hot.is_empty());
    assert_eq!(m.total_bytes(), 31 + 19 + 14 + 8 + 5 + 3 + 10);

    // What the builder produces signs and opens.
    let opened = open(&sign(&id, &m), &id.spki_der, now_ms()).unwrap();
    assert_eq!(opened, m);
}

#[tokio::test]
async fn options_change_hidden_files_and_cache_control() {
    let dir = tree();
    let mut o = opts(Fingerprint([1; 32]));
    o.include_hidden = true;
    o.cache_control = Some("public, max-age=31536000, immutable".into());
    let m = build_from_dir(dir.path(), o).await.unwrap();
    assert!(m.entry("/.hidden/secret").is_some());
    assert!(m.entry("/.env").is_some());
    assert!(m.entry("/link.html").is_none(), "links are never followed");
    assert!(
        m.entries
            .values()
            .all(|e| e.cache_control == "public, max-age=31536000, immutable")
    );

    let mut o = opts(Fingerprint([1; 32]));
    o.cache_control = Some("bad\nvalue".into());
    let err = build_from_dir(dir.path(), o).await.unwrap_err();
    assert!(err.to_string().contains("cache_control"), "{err}");
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let dir = tree();
    let fp = Fingerprint([1; 32]);

    let missing = dir.path().join("no-such-dir");
    let err = build_from_dir(&missing, opts(fp)).await.unwrap_err();
    assert!(matches!(err, ManifestError::Io { .. }), "{err}");
    assert!(err.is_bad_input());
    assert!(err.to_string().contains("no-such-dir"), "{err}");

    let err = build_from_dir(&dir.path().join("index.html"), opts(fp))
        .await
        .unwrap_err();
    assert!(err.to_string().ends_with("not a directory"), "{err}");

    let mut o = opts(fp);
    o.origin = "not a url".into();
    let err = build_from_dir(dir.path(), o).await.unwrap_err();
    assert!(matches!(err, ManifestError::BadOrigin { .. }), "{err}");

    let mut o = opts(fp);
    o.service = "Video!".into();
    assert!(
        build_from_dir(dir.path(), o)
            .await
            .unwrap_err()
            .to_string()
            .contains("service")
    );

    let mut o = opts(fp);
    o.max_entries = 3;
    let err = build_from_dir(dir.path(), o).await.unwrap_err();
    assert!(matches!(err, ManifestError::TooLarge { .. }), "{err}");

    let mut o = opts(fp);
    o.max_object_bytes = 20;
    let err = build_from_dir(dir.path(), o).await.unwrap_err();
    assert!(
        matches!(err, ManifestError::ObjectTooLarge { size: 31, .. }),
        "{err}"
    );

    write(dir.path(), "bad\nname", b"x");
    let err = build_from_dir(dir.path(), opts(fp)).await.unwrap_err();
    assert!(err.to_string().contains("cannot be published"), "{err}");
    assert!(!err.to_string().contains('\n'), "one line: {err}");
}

#[tokio::test]
async fn an_empty_root_gives_an_empty_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let m = build_from_dir(dir.path(), opts(Fingerprint([2; 32])))
        .await
        .unwrap();
    assert!(m.entries.is_empty());
    assert_eq!(m.total_bytes(), 0);
}
