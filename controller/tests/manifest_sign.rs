//! Signed manifests: what `open` accepts and what it refuses (tampered bytes, another key,
//! expiry, bad entries), the wire form, `diff` and the hot list.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::collections::BTreeMap;

use p2pcdn_controller::{
    identity::NodeIdentity,
    manifest::{
        self, DOMAIN, Delta, Entry, MAX_SIGNED_BYTES, Manifest, ManifestError, SignedManifest,
        decode_signed, diff, encode_signed, etag_of, open, open_any_age, pb, rank_hot_list, sign,
    },
    model::now_ms,
};
use prost::Message as _;
use sha2::{Digest as _, Sha256};

const HOUR_MS: i64 = 3_600_000;

/// A change to a wire manifest.
type Tamper = Box<dyn Fn(&mut pb::Manifest)>;

fn identity() -> NodeIdentity {
    NodeIdentity::generate("edge-a", "Example", &[]).unwrap()
}

fn entry(path: &str, body: &[u8]) -> Entry {
    let sha256: [u8; 32] = Sha256::digest(body).into();
    Entry {
        path: path.to_owned(),
        size: body.len() as u64,
        sha256,
        content_type: "text/css".into(),
        etag: etag_of(&sha256),
        cache_control: "public, max-age=60".into(),
        last_modified_ms: Some(1_700_000_000_000),
    }
}

fn manifest(id: &NodeIdentity, entries: &[(&str, &[u8])]) -> Manifest {
    let now = now_ms();
    Manifest {
        primary: id.fingerprint,
        service: "video".into(),
        version: 3,
        created_ms: now,
        expires_ms: now + HOUR_MS,
        origin: "https://origin.example/static".into(),
        entries: entries
            .iter()
            .map(|(p, b)| ((*p).to_owned(), entry(p, b)))
            .collect::<BTreeMap<_, _>>(),
        hot: Vec::new(),
    }
}

/// Signs an arbitrary wire manifest, bypassing `Manifest::validate`: what a buggy or hostile
/// primary could publish.
fn sign_raw(id: &NodeIdentity, m: &pb::Manifest) -> SignedManifest {
    let bytes = m.encode_to_vec();
    let signature = id.sign(DOMAIN, &bytes);
    SignedManifest { bytes, signature }
}

#[test]
fn sign_open_round_trip_through_the_wire_form() {
    let id = identity();
    let mut m = manifest(
        &id,
        &[
            ("/a.css", b"body{}"),
            ("/img/b.png", b"\x89PNG"),
            ("/empty", b""),
        ],
    );
    assert_eq!(
        m.set_hot([
            "/img/b.png".to_owned(),
            "/nope".to_owned(),
            "/a.css".to_owned()
        ]),
        1
    );
    let signed = sign(&id, &m);
    let wire = encode_signed(&signed);
    let back = decode_signed(&wire).unwrap();
    assert_eq!(back, signed);
    let opened = open(&back, &id.spki_der, now_ms()).unwrap();
    assert_eq!(opened, m);
    assert_eq!(opened.hot, vec!["/img/b.png", "/a.css"]);
    assert_eq!(opened.total_bytes(), 10);
    assert_eq!(opened.entry("/empty").unwrap().size, 0);
    assert!(opened.entry("/missing").is_none());
    assert_eq!(
        opened.url_of("/a.css"),
        "https://origin.example/static/a.css"
    );
    assert_eq!(signed.sha256(), <[u8; 32]>::from(Sha256::digest(&wire)));
}

#[test]
fn tampered_bytes_are_refused() {
    let id = identity();
    let signed = sign(&id, &manifest(&id, &[("/a.css", b"body{}")]));
    // Flip every byte of the manifest in turn: none may open.
    for i in 0..signed.bytes.len() {
        let mut tampered = signed.clone();
        tampered.bytes[i] ^= 0x01;
        let err = open(&tampered, &id.spki_der, now_ms()).unwrap_err();
        assert!(
            matches!(err, ManifestError::Signature { .. }),
            "byte {i}: {err}"
        );
    }
    let mut sig = signed.clone();
    sig.signature[10] ^= 0x80;
    assert!(matches!(
        open(&sig, &id.spki_der, now_ms()),
        Err(ManifestError::Signature { .. })
    ));
    let mut short = signed.clone();
    short.signature.truncate(63);
    let err = open(&short, &id.spki_der, now_ms()).unwrap_err();
    assert!(err.to_string().contains("63 bytes"), "{err}");
}

#[test]
fn another_key_is_refused() {
    let (a, b) = (identity(), identity());
    let signed = sign(&a, &manifest(&a, &[("/a", b"x")]));
    let err = open(&signed, &b.spki_der, now_ms()).unwrap_err();
    assert!(matches!(err, ManifestError::Signature { .. }), "{err}");
    // Signed by b but naming a as the primary: the signature is good, the claim is not.
    let forged = sign(&b, &manifest(&a, &[("/a", b"x")]));
    let err = open(&forged, &b.spki_der, now_ms()).unwrap_err();
    assert!(matches!(err, ManifestError::Signature { .. }), "{err}");
    assert!(err.to_string().contains("names primary"), "{err}");
    // Not an Ed25519 key at all.
    let err = open(&signed, b"not a key", now_ms()).unwrap_err();
    assert!(err.to_string().contains("not an ed25519 key"), "{err}");
}

#[test]
fn the_signature_is_domain_separated() {
    let id = identity();
    let m = manifest(&id, &[("/a", b"x")]);
    let bytes = m.to_pb().encode_to_vec();
    // The same key and bytes under another domain (an advertisement, say) do not open.
    let other = SignedManifest {
        signature: id.sign("p2pcdn.peering.v1.Advertisement", &bytes),
        bytes,
    };
    assert!(matches!(
        open(&other, &id.spki_der, now_ms()),
        Err(ManifestError::Signature { .. })
    ));
}

#[test]
fn expiry_and_future_creation_are_refused() {
    let id = identity();
    let m = manifest(&id, &[("/a", b"x")]);
    let signed = sign(&id, &m);
    assert!(open(&signed, &id.spki_der, m.expires_ms - 1).is_ok());
    let err = open(&signed, &id.spki_der, m.expires_ms).unwrap_err();
    assert!(matches!(err, ManifestError::Expired { .. }), "{err}");
    assert!(err.to_string().starts_with("manifest expired at "), "{err}");
    // The primary's own tooling may read an expired one.
    assert_eq!(open_any_age(&signed, &id.spki_der).unwrap(), m);
    // Created an hour ahead of the reader's clock.
    let err = open(&signed, &id.spki_der, m.created_ms - HOUR_MS).unwrap_err();
    assert!(err.to_string().contains("in the future"), "{err}");
}

#[test]
fn bad_entries_are_refused_even_when_signed() {
    let id = identity();
    let good = manifest(&id, &[("/a", b"x"), ("/b", b"y")]).to_pb();
    let cases: Vec<(&str, Tamper)> = vec![
        (
            "path",
            Box::new(|m| m.entries[0].path = "/../etc/passwd".into()),
        ),
        ("path", Box::new(|m| m.entries[1].path = "/a//b".into())),
        ("path", Box::new(|m| m.entries[1].path = "/b\u{1}".into())),
        ("path", Box::new(|m| m.entries[1].path = "relative".into())),
        ("path", Box::new(|m| m.entries[1].path = "/b%2F..".into())),
        (
            "duplicate path",
            Box::new(|m| m.entries[1].path = "/a".into()),
        ),
        ("not sorted", Box::new(|m| m.entries.swap(0, 1))),
        ("sha256", Box::new(|m| m.entries[0].sha256.truncate(31))),
        ("size", Box::new(|m| m.entries[0].size = u64::MAX)),
        ("etag", Box::new(|m| m.entries[0].etag = "W/\"abc\"".into())),
        (
            "content_type",
            Box::new(|m| m.entries[0].content_type = "text".into()),
        ),
        (
            "content_type",
            Box::new(|m| m.entries[0].content_type = "text/html\r\nx: y".into()),
        ),
        (
            "cache_control",
            Box::new(|m| m.entries[0].cache_control = "a\nb".into()),
        ),
        ("service", Box::new(|m| m.service = "Bad Name".into())),
        (
            "origin",
            Box::new(|m| m.origin = "ftp://origin.example".into()),
        ),
        (
            "origin",
            Box::new(|m| m.origin = "https://user@origin.example".into()),
        ),
        (
            "origin",
            Box::new(|m| m.origin = "https://origin.example/x?y".into()),
        ),
        ("version", Box::new(|m| m.version = 0)),
        ("expires_ms", Box::new(|m| m.expires_ms = m.created_ms)),
        (
            "expires_ms",
            Box::new(|m| m.expires_ms = m.created_ms + 91 * 24 * HOUR_MS),
        ),
        ("hot", Box::new(|m| m.hot = vec!["/c".into()])),
        ("hot", Box::new(|m| m.hot = vec!["/a".into(), "/a".into()])),
        ("primary", Box::new(|m| m.primary.truncate(16))),
    ];
    assert!(open(&sign_raw(&id, &good), &id.spki_der, now_ms()).is_ok());
    for (what, tamper) in cases {
        let mut bad = good.clone();
        tamper(&mut bad);
        let err = open(&sign_raw(&id, &bad), &id.spki_der, now_ms()).unwrap_err();
        // A truncated primary no longer matches the signing key: a signature error.
        let expected = if what == "primary" {
            matches!(err, ManifestError::Signature { .. })
        } else {
            matches!(err, ManifestError::Invalid { .. })
        };
        assert!(expected, "{what}: {err:?}");
        let text = err.to_string();
        assert!(text.contains(what), "{what}: {text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }
}

#[test]
fn malformed_and_oversized_input_is_refused() {
    let err = decode_signed(b"\xff\xff\xff\xff").unwrap_err();
    assert!(matches!(err, ManifestError::Decode { .. }), "{err}");
    let huge = vec![0u8; MAX_SIGNED_BYTES + 1];
    assert!(matches!(
        decode_signed(&huge),
        Err(ManifestError::TooLarge { .. })
    ));
    let id = identity();
    // A signature over bytes that are not a manifest.
    let garbage = SignedManifest {
        bytes: b"\xff\xff\xff".to_vec(),
        signature: id.sign(DOMAIN, b"\xff\xff\xff"),
    };
    assert!(matches!(
        open(&garbage, &id.spki_der, now_ms()),
        Err(ManifestError::Decode { .. })
    ));
    let big = SignedManifest {
        bytes: vec![0; manifest::MAX_MANIFEST_BYTES + 1],
        signature: vec![0; 64],
    };
    assert!(matches!(
        open(&big, &id.spki_der, now_ms()),
        Err(ManifestError::TooLarge { .. })
    ));
}

#[test]
fn diff_lists_added_changed_and_removed() {
    let id = identity();
    let old = manifest(
        &id,
        &[
            ("/keep", b"1"),
            ("/change", b"2"),
            ("/gone", b"3"),
            ("/touch", b"4"),
        ],
    );
    let mut new = manifest(
        &id,
        &[
            ("/keep", b"1"),
            ("/change", b"2!"),
            ("/new", b"5"),
            ("/touch", b"4"),
        ],
    );
    new.entries.get_mut("/touch").unwrap().cache_control = "no-store".into();
    let delta = diff(&old, &new);
    assert_eq!(
        delta,
        Delta {
            added: vec!["/new".into()],
            changed: vec!["/change".into(), "/touch".into()],
            removed: vec!["/gone".into()],
        }
    );
    assert!(!delta.is_empty());
    assert!(diff(&new, &new).is_empty());
    let back = diff(&new, &old);
    assert_eq!(back.added, vec!["/gone"]);
    assert_eq!(back.removed, vec!["/new"]);
}

#[test]
fn hot_lists_rank_by_count_in_either_column_order() {
    let ranked = rank_hot_list(
        "# from the access log\n\
         /a.css 10\n\
         \n\
         250 /b.js\n\
         /c.png?v=3 40\n\
         /a.css 300\n\
         /plain\n",
    )
    .unwrap();
    assert_eq!(ranked, vec!["/a.css", "/b.js", "/c.png", "/plain"]);
    let plain = rank_hot_list("/z\n/y\n/z\n").unwrap();
    assert_eq!(plain, vec!["/z", "/y"]);
    let err = rank_hot_list("/ok\n/a many\n").unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
    let err = rank_hot_list("/a/../b\n").unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");
    assert!(rank_hot_list("a b c\n").is_err());
}

#[test]
fn hot_lists_read_an_nginx_access_log_directly() {
    let log = r#"192.0.2.7 - - [22/Nov/2026:12:00:01 +0000] "GET /b.js HTTP/1.1" 200 512 "-" "curl/8"
192.0.2.8 - - [22/Nov/2026:12:00:02 +0000] "GET /a.css?v=2 HTTP/2.0" 200 90 "https://shop.test/" "Mozilla/5.0"
192.0.2.9 - - [22/Nov/2026:12:00:03 +0000] "GET /a.css HTTP/1.1" 304 0 "-" "Mozilla/5.0"
192.0.2.9 - - [22/Nov/2026:12:00:04 +0000] "HEAD /a.css HTTP/1.1" 200 0 "-" "Mozilla/5.0"
192.0.2.9 - - [22/Nov/2026:12:00:05 +0000] "POST /a.css HTTP/1.1" 200 0 "-" "-"
192.0.2.9 - - [22/Nov/2026:12:00:06 +0000] "GET /missing.png HTTP/1.1" 404 0 "-" "-"
192.0.2.9 - - [22/Nov/2026:12:00:07 +0000] "GET /../../etc/passwd HTTP/1.1" 400 0 "-" "-"
192.0.2.9 - - [22/Nov/2026:12:00:08 +0000] "GET /x/../../y HTTP/1.1" 200 0 "-" "-"
192.0.2.9 - - [22/Nov/2026:12:00:09 +0000] "\x16\x03\x01" 400 0 "-" "-"
"#;
    let ranked = rank_hot_list(log).unwrap();
    assert_eq!(
        ranked,
        vec!["/a.css", "/b.js"],
        "3 successful requests for /a.css, 1 for /b.js; errors, POSTs and junk do not count"
    );
}
