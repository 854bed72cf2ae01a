//! Request paths as manifests carry them: the wire form, normalised, so that a surrogate can
//! look up `request.uri().path()` as it is and no two spellings name one object.

/// Longest path, bytes.
pub const MAX_PATH_BYTES: usize = 1024;

/// Why a path is not a normalised manifest path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path {0:?} does not start with \"/\"")]
    NotAbsolute(String),
    #[error("path of {0} bytes is longer than {MAX_PATH_BYTES}")]
    TooLong(usize),
    #[error("path {0:?} has an empty segment (\"//\")")]
    EmptySegment(String),
    #[error("path {0:?} has a \".\" or \"..\" segment")]
    DotSegment(String),
    #[error(
        "path {path:?}: character {found:?} must be percent-encoded (or is a query or fragment)"
    )]
    Character { path: String, found: char },
    #[error("path {0:?}: \"%\" must be followed by two upper-case hex digits")]
    BadEscape(String),
    #[error("path {path:?}: %{byte:02X} encodes {reason}")]
    Escape {
        path: String,
        byte: u8,
        reason: &'static str,
    },
}

/// Checks that `path` is a normalised request path: starts with "/", at most
/// [`MAX_PATH_BYTES`]; no empty segment ("//"; a trailing "/" is allowed); no "." or ".."
/// segment; only RFC 3986 path characters (unreserved, sub-delims, ":", "@"), everything else
/// percent-encoded with upper-case hex; no encoded "/", control character or unreserved
/// character (which would be a second spelling of the same path).
pub fn check_path(path: &str) -> Result<(), PathError> {
    let owned = || path.chars().take(80).collect::<String>();
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong(path.len()));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathError::NotAbsolute(owned()));
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        if segment.is_empty() && i != last {
            return Err(PathError::EmptySegment(owned()));
        }
        if *segment == "." || *segment == ".." {
            return Err(PathError::DotSegment(owned()));
        }
    }
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |b: u8| match b {
                b'0'..=b'9' => Some(b - b'0'),
                b'A'..=b'F' => Some(b - b'A' + 10),
                _ => None,
            };
            let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape(owned()));
            };
            let byte = (hi << 4) | lo;
            let reason = if byte == b'/' {
                Some("\"/\"")
            } else if byte < 0x20 || byte == 0x7f {
                Some("a control character")
            } else if is_unreserved(byte) {
                Some("an unreserved character, which must not be encoded")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(PathError::Escape {
                    path: owned(),
                    byte,
                    reason,
                });
            }
            i += 3;
            continue;
        }
        if b != b'/' && !is_pchar(b) {
            let found = path[i..].chars().next().unwrap_or('\u{fffd}');
            return Err(PathError::Character {
                path: owned(),
                found,
            });
        }
        i += 1;
    }
    Ok(())
}

/// Percent-encodes one path segment (a file name's bytes) into its normalised wire form.
/// Control characters come out encoded, which [`check_path`] then refuses.
pub fn encode_segment(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for &b in raw {
        if is_pchar(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// RFC 3986 `pchar` without `pct-encoded`: unreserved, sub-delims, ":" and "@".
fn is_pchar(b: u8) -> bool {
    is_unreserved(b) || b"!$&'()*+,;=:@".contains(&b)
}

#[cfg(test)]
#[expect(clippy::expect_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;

    #[test]
    fn normalised_paths_pass() {
        for ok in [
            "/",
            "/a",
            "/a/b.css",
            "/blog/",
            "/a%20b",
            "/%C3%A9t%C3%A9.txt",
            "/a/.well-known/x",
            "/v1/x;y=1,z@host:8",
            "/...",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn everything_else_is_refused() {
        type Expected = fn(&PathError) -> bool;
        let cases: &[(&str, Expected)] = &[
            ("", |e| matches!(e, PathError::Empty)),
            ("a/b", |e| matches!(e, PathError::NotAbsolute(_))),
            ("/a//b", |e| matches!(e, PathError::EmptySegment(_))),
            ("//", |e| matches!(e, PathError::EmptySegment(_))),
            ("/a/../b", |e| matches!(e, PathError::DotSegment(_))),
            ("/..", |e| matches!(e, PathError::DotSegment(_))),
            ("/./a", |e| matches!(e, PathError::DotSegment(_))),
            ("/a/.", |e| matches!(e, PathError::DotSegment(_))),
            ("/a%2E%2E/b", |e| {
                matches!(e, PathError::Escape { byte: b'.', .. })
            }),
            ("/a%2Fb", |e| {
                matches!(e, PathError::Escape { byte: b'/', .. })
            }),
            ("/a%0Ab", |e| {
                matches!(e, PathError::Escape { byte: b'\n', .. })
            }),
            ("/a%41", |e| {
                matches!(e, PathError::Escape { byte: b'A', .. })
            }),
            ("/a%2f", |e| matches!(e, PathError::BadEscape(_))),
            ("/a%2", |e| matches!(e, PathError::BadEscape(_))),
            ("/a\nb", |e| {
                matches!(e, PathError::Character { found: '\n', .. })
            }),
            ("/a\u{7f}", |e| matches!(e, PathError::Character { .. })),
            ("/a b", |e| {
                matches!(e, PathError::Character { found: ' ', .. })
            }),
            ("/a?q=1", |e| {
                matches!(e, PathError::Character { found: '?', .. })
            }),
            ("/a#f", |e| {
                matches!(e, PathError::Character { found: '#', .. })
            }),
            ("/a\\b", |e| matches!(e, PathError::Character { .. })),
            ("/é", |e| {
                matches!(e, PathError::Character { found: 'é', .. })
            }),
        ];
        for (path, expected) in cases {
            let err = check_path(path).expect_err(path);
            assert!(expected(&err), "{path:?}: {err:?}");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
        let long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert_eq!(
            check_path(&long),
            Err(PathError::TooLong(MAX_PATH_BYTES + 1))
        );
    }

    #[test]
    fn encoded_segments_are_normalised() {
        assert_eq!(encode_segment(b"plain-name_1.css"), "plain-name_1.css");
        assert_eq!(encode_segment(b"a b%c"), "a%20b%25c");
        assert_eq!(encode_segment("été".as_bytes()), "%C3%A9t%C3%A9");
        assert_eq!(encode_segment(b"\xff"), "%FF");
        let path = format!("/{}", encode_segment("a b?#é".as_bytes()));
        assert_eq!(check_path(&path), Ok(()));
        let control = format!("/{}", encode_segment(b"a\nb"));
        assert!(check_path(&control).is_err());
    }
}
