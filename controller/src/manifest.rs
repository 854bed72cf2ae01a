//! Content manifests (issue 4, primary side): what a peer may serve for a primary, and the
//! proof of it.
//!
//! A [`Manifest`] lists every object of one service (path, size, SHA-256, the headers served
//! with it) with a version, an expiry and the hot set offered for prepositioning. The primary
//! signs its encoded protobuf (`proto/p2pcdn/content/v1/manifest.proto`) with its node key
//! ([`sign`]); a peer accepts it only through [`open`], which checks the size limits, that the
//! named primary is the SHA-256 of the key that signed, the signature (domain-separated, so
//! it can never be replayed as an advertisement), the expiry and every entry. A surrogate then
//! refuses to serve or store a byte whose size or hash the manifest does not vouch for.
//!
//! Manifests are built from a document root ([`build_from_dir`], streaming hashes) or by
//! fetching paths from the origin over HTTP or HTTPS ([`build_from_origin`]). A new version
//! supersedes the old one incrementally: [`diff`] says what was added, changed and removed.
//! `p2pcdn manifest build|show` is the command line (see `cli.rs`).

mod builder;
pub(crate) mod cli;
mod origin;
mod path;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    time::{Duration, UNIX_EPOCH},
};

pub use builder::{
    BuildOptions, DEFAULT_CACHE_CONTROL, DEFAULT_TTL_MS, FetchOptions, build_from_dir,
    build_from_origin,
};
use prost::Message as _;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

pub use self::path::{MAX_PATH_BYTES, PathError, check_path, encode_segment};
use crate::{
    identity::{self, IdentityError, NodeIdentity, fingerprint_of_spki},
    model::{Fingerprint, UnixMs},
};

/// Generated from `proto/p2pcdn/content/v1/manifest.proto`.
pub mod pb {
    tonic::include_proto!("p2pcdn.content.v1");
}

/// Signature domain: the signed bytes are `DOMAIN || 0x00 || encoded manifest`.
pub const DOMAIN: &str = "p2pcdn manifest v1";
/// Largest encoded manifest (the `manifest` bytes of a [`SignedManifest`]).
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024 * 1024;
/// Largest encoded [`SignedManifest`]: the manifest, a signature and a few bytes of framing.
pub const MAX_SIGNED_BYTES: usize = MAX_MANIFEST_BYTES + 1024;
/// Most entries in one manifest.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Largest object a manifest may describe (1 TiB).
pub const MAX_OBJECT_BYTES: u64 = 1 << 40;
/// Longest validity (`expires_ms - created_ms`): 90 days.
pub const MAX_TTL_MS: i64 = 90 * 24 * 3600 * 1000;
/// How far in the future `created_ms` may be (the signer's clock running ahead).
pub const MAX_CLOCK_SKEW_MS: i64 = crate::proto::MAX_CLOCK_SKEW_MS;
/// Origin base URLs, bytes.
pub const MAX_ORIGIN_BYTES: usize = 2048;
/// Content-Type values, bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 255;
/// Entity tags including their quotes, bytes.
pub const MAX_ETAG_BYTES: usize = 130;
/// Cache-Control values, bytes.
pub const MAX_CACHE_CONTROL_BYTES: usize = 256;
/// Ed25519 signatures, bytes.
const SIGNATURE_BYTES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{what} of {size} exceeds the limit of {limit}")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("malformed manifest: {reason}")]
    Decode { reason: String },
    #[error("manifest signature: {reason}")]
    Signature { reason: String },
    #[error("manifest expired at {} (now {})", fmt_ms(*expires_ms), fmt_ms(*now_ms))]
    Expired { expires_ms: UnixMs, now_ms: UnixMs },
    #[error("invalid manifest: {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file or directory the builder cannot use (not a directory, changed while hashing,
    /// a name no URL path can carry, …).
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// An object larger than the build's limit.
    #[error("{location}: {size} bytes exceed the object limit of {limit} bytes")]
    ObjectTooLarge {
        location: String,
        size: u64,
        limit: u64,
    },
    /// An origin URL that cannot be used.
    #[error("origin {url:?}: {reason}")]
    BadOrigin { url: String, reason: String },
    /// The origin answered with something else than 200.
    #[error("{url}: origin answered {status}")]
    Status { url: String, status: u16 },
    /// Fetching from the origin failed (connection, TLS, timeout, bad response).
    #[error("{url}: {reason}")]
    Fetch { url: String, reason: String },
}

impl ManifestError {
    /// Whether the error is the caller's input (exit 64) rather than a runtime failure
    /// (exit 1): an unusable root, URL, path list or manifest file, an object too large, an
    /// origin that answers a listed path with a redirect or a client error (404, …).
    /// Connection failures, time-outs and server errors (5xx) are runtime failures.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status < 500,
            Self::Fetch { .. } => false,
            _ => true,
        }
    }
}

/// One object of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Request path as sent on the wire: "/a/b.css", normalised (see [`check_path`]).
    pub path: String,
    /// Size of the body in bytes.
    pub size: u64,
    /// SHA-256 of the body.
    #[serde(serialize_with = "hex_bytes")]
    pub sha256: [u8; 32],
    /// Content-Type header value.
    pub content_type: String,
    /// Strong entity tag, quoted (`"<hex sha256>"`).
    pub etag: String,
    /// Cache-Control header value (may be empty).
    pub cache_control: String,
    /// Last modification (Last-Modified header), if known.
    pub last_modified_ms: Option<UnixMs>,
}

/// What a peer may serve for a primary's service, at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    /// The primary's node id (SHA-256 of the SPKI of the key that signs).
    pub primary: Fingerprint,
    /// Service name (`[[services]]` name).
    pub service: String,
    /// Version; a higher one supersedes.
    pub version: u64,
    pub created_ms: UnixMs,
    pub expires_ms: UnixMs,
    /// Base URL peers pull from: `http(s)://host[:port][/prefix]`.
    pub origin: String,
    /// The objects, by path.
    pub entries: BTreeMap<String, Entry>,
    /// The hot set: paths of `entries`, most requested first.
    pub hot: Vec<String>,
}

impl Manifest {
    /// The entry of a request path, if the manifest has it.
    pub fn entry(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Sum of all entries' sizes.
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .values()
            .fold(0u64, |sum, e| sum.saturating_add(e.size))
    }

    /// The URL peers fetch `path` from.
    pub fn url_of(&self, path: &str) -> String {
        format!("{}{}", self.origin, path)
    }

    /// Sets the hot set from paths ranked most requested first: keeps those that are entries,
    /// each once. Returns how many were dropped (not in the manifest, or repeated).
    pub fn set_hot<I: IntoIterator<Item = String>>(&mut self, ranked: I) -> usize {
        let mut seen = HashSet::new();
        let mut dropped = 0;
        self.hot.clear();
        for path in ranked {
            if self.entries.contains_key(&path) && seen.insert(path.clone()) {
                self.hot.push(path);
            } else {
                dropped += 1;
            }
        }
        dropped
    }

    /// Every structural rule [`open`] enforces except the signature and the expiry: limits,
    /// service name, origin URL, times, and every entry.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.entries.len() > MAX_ENTRIES {
            return Err(ManifestError::TooLarge {
                what: "entry count",
                size: self.entries.len() as u64,
                limit: MAX_ENTRIES as u64,
            });
        }
        check_service(&self.service)?;
        if self.version == 0 {
            return Err(invalid("version", "must be at least 1"));
        }
        if self.created_ms < 0 {
            return Err(invalid("created_ms", "must not be negative"));
        }
        if self.expires_ms <= self.created_ms {
            return Err(invalid("expires_ms", "must be later than created_ms"));
        }
        if self.expires_ms - self.created_ms > MAX_TTL_MS {
            return Err(invalid(
                "expires_ms",
                format!(
                    "more than {} days after created_ms",
                    MAX_TTL_MS / 86_400_000
                ),
            ));
        }
        check_origin(&self.origin).map_err(|reason| invalid("origin", reason))?;
        let mut total = 0u64;
        for (key, entry) in &self.entries {
            if key != &entry.path {
                return Err(invalid(
                    format!("entries[{key}]"),
                    format!("keyed by another path ({:?})", entry.path),
                ));
            }
            check_entry(entry)?;
            total = total
                .checked_add(entry.size)
                .ok_or_else(|| invalid("entries", "total size overflows 64 bits".to_owned()))?;
        }
        if self.hot.len() > self.entries.len() {
            return Err(invalid("hot", "more paths than entries"));
        }
        let mut seen = HashSet::with_capacity(self.hot.len());
        for path in &self.hot {
            if !self.entries.contains_key(path) {
                return Err(invalid("hot", format!("{path:?} is not an entry")));
            }
            if !seen.insert(path.as_str()) {
                return Err(invalid("hot", format!("{path:?} appears twice")));
            }
        }
        Ok(())
    }

    /// The wire form (entries in path order).
    pub fn to_pb(&self) -> pb::Manifest {
        pb::Manifest {
            primary: self.primary.0.to_vec(),
            service: self.service.clone(),
            version: self.version,
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
            origin: self.origin.clone(),
            entries: self
                .entries
                .values()
                .map(|e| pb::Entry {
                    path: e.path.clone(),
                    size: e.size,
                    sha256: e.sha256.to_vec(),
                    content_type: e.content_type.clone(),
                    etag: e.etag.clone(),
                    cache_control: e.cache_control.clone(),
                    last_modified_ms: e.last_modified_ms,
                })
                .collect(),
            hot: self.hot.clone(),
        }
    }

    /// From the wire form, validated (entries must come sorted by path, each once).
    pub fn from_pb(m: pb::Manifest) -> Result<Self, ManifestError> {
        if m.entries.len() > MAX_ENTRIES {
            return Err(ManifestError::TooLarge {
                what: "entry count",
                size: m.entries.len() as u64,
                limit: MAX_ENTRIES as u64,
            });
        }
        let primary =
            Fingerprint::from_slice(&m.primary).map_err(|e| invalid("primary", e.to_string()))?;
        let mut entries = BTreeMap::new();
        let mut last: Option<String> = None;
        for (i, e) in m.entries.into_iter().enumerate() {
            if let Some(previous) = &last
                && previous.as_bytes() >= e.path.as_bytes()
            {
                let reason = if previous == &e.path {
                    "duplicate path"
                } else {
                    "entries not sorted by path"
                };
                return Err(invalid(format!("entries[{i}] {:?}", e.path), reason));
            }
            let sha256: [u8; 32] = e.sha256.as_slice().try_into().map_err(|_| {
                invalid(
                    format!("entries[{}].sha256", e.path),
                    format!("{} bytes, not 32", e.sha256.len()),
                )
            })?;
            last = Some(e.path.clone());
            entries.insert(
                e.path.clone(),
                Entry {
                    path: e.path,
                    size: e.size,
                    sha256,
                    content_type: e.content_type,
                    etag: e.etag,
                    cache_control: e.cache_control,
                    last_modified_ms: e.last_modified_ms,
                },
            );
        }
        let manifest = Self {
            primary,
            service: m.service,
            version: m.version,
            created_ms: m.created_ms,
            expires_ms: m.expires_ms,
            origin: m.origin,
            entries,
            hot: m.hot,
        };
        manifest.validate()?;
        Ok(manifest)
    }
}

/// A signed manifest as it travels: the encoded [`pb::Manifest`] and the signature over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    /// The encoded `pb::Manifest`, exactly the bytes that were signed.
    pub bytes: Vec<u8>,
    /// Ed25519 signature over `DOMAIN || 0x00 || bytes`.
    pub signature: Vec<u8>,
}

impl SignedManifest {
    /// The encoded `pb::SignedManifest` (what the primary publishes at `manifest_url`).
    pub fn encode(&self) -> Vec<u8> {
        encode_signed(self)
    }

    /// Reads an encoded `pb::SignedManifest` (size limit checked first).
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        decode_signed(bytes)
    }

    /// SHA-256 of the encoded form: what `peering.v1` `ManifestRef.sha256` carries.
    pub fn sha256(&self) -> [u8; 32] {
        Sha256::digest(self.encode()).into()
    }
}

/// Encodes a signed manifest (`pb::SignedManifest`).
pub fn encode_signed(s: &SignedManifest) -> Vec<u8> {
    pb::SignedManifest {
        manifest: s.bytes.clone(),
        signature: s.signature.clone(),
    }
    .encode_to_vec()
}

/// Decodes a `pb::SignedManifest`; refuses more than [`MAX_SIGNED_BYTES`] before decoding.
/// Nothing is verified yet: see [`open`].
pub fn decode_signed(bytes: &[u8]) -> Result<SignedManifest, ManifestError> {
    if bytes.len() > MAX_SIGNED_BYTES {
        return Err(ManifestError::TooLarge {
            what: "signed manifest size",
            size: bytes.len() as u64,
            limit: MAX_SIGNED_BYTES as u64,
        });
    }
    let s = pb::SignedManifest::decode(bytes).map_err(|e| ManifestError::Decode {
        reason: one_line(&e.to_string()),
    })?;
    Ok(SignedManifest {
        bytes: s.manifest,
        signature: s.signature,
    })
}

/// Signs a manifest with the node key. The manifest should be [`Manifest::validate`]d and
/// name `identity`'s fingerprint as its primary, or [`open`] will refuse it.
pub fn sign(identity: &NodeIdentity, m: &Manifest) -> SignedManifest {
    let bytes = m.to_pb().encode_to_vec();
    let signature = identity.sign(DOMAIN, &bytes);
    SignedManifest { bytes, signature }
}

/// Verifies and reads a signed manifest: size limits, the signature by `primary_spki`, that
/// the manifest's primary is SHA-256(`primary_spki`), that it is not expired at `now` (nor
/// created further than [`MAX_CLOCK_SKEW_MS`] in the future), and every entry.
pub fn open(
    s: &SignedManifest,
    primary_spki: &[u8],
    now: UnixMs,
) -> Result<Manifest, ManifestError> {
    let manifest = open_any_age(s, primary_spki)?;
    if now >= manifest.expires_ms {
        return Err(ManifestError::Expired {
            expires_ms: manifest.expires_ms,
            now_ms: now,
        });
    }
    if manifest.created_ms > now.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(invalid(
            "created_ms",
            format!(
                "{} is in the future (now {})",
                fmt_ms(manifest.created_ms),
                fmt_ms(now)
            ),
        ));
    }
    Ok(manifest)
}

/// [`open`] without the time checks: for the primary's own tooling (the previous version of
/// a manifest being superseded, which may well have expired). Never for serving.
pub fn open_any_age(s: &SignedManifest, primary_spki: &[u8]) -> Result<Manifest, ManifestError> {
    if s.bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            what: "manifest size",
            size: s.bytes.len() as u64,
            limit: MAX_MANIFEST_BYTES as u64,
        });
    }
    if s.signature.len() != SIGNATURE_BYTES {
        return Err(ManifestError::Signature {
            reason: format!("{} bytes, not {SIGNATURE_BYTES}", s.signature.len()),
        });
    }
    identity::verify(primary_spki, DOMAIN, &s.bytes, &s.signature).map_err(|e| {
        ManifestError::Signature {
            reason: match e {
                IdentityError::BadSignature => {
                    "does not verify with the primary's key (tampered, or signed by another key)"
                        .to_owned()
                }
                IdentityError::NotEd25519 => "the primary's key is not an ed25519 key".to_owned(),
                other => other.to_string(),
            },
        }
    })?;
    let decoded = pb::Manifest::decode(s.bytes.as_slice()).map_err(|e| ManifestError::Decode {
        reason: one_line(&e.to_string()),
    })?;
    let key_id = fingerprint_of_spki(primary_spki);
    if decoded.primary != key_id.0 {
        return Err(ManifestError::Signature {
            reason: format!(
                "the manifest names primary {} but is signed by {key_id}",
                hex::encode(&decoded.primary)
            ),
        });
    }
    Manifest::from_pb(decoded)
}

/// What changed from one version to the next, paths in byte order. `changed` lists paths
/// whose entry differs in any field (content, size or the headers served with it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Delta {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// The incremental change from `old` to `new` (the surrogate applies it on supersede: drop
/// removed and changed objects, keep the rest of its cache).
pub fn diff(old: &Manifest, new: &Manifest) -> Delta {
    let mut delta = Delta::default();
    for (path, entry) in &new.entries {
        match old.entries.get(path) {
            None => delta.added.push(path.clone()),
            Some(before) if before != entry => delta.changed.push(path.clone()),
            Some(_) => {}
        }
    }
    delta.removed = old
        .entries
        .keys()
        .filter(|path| !new.entries.contains_key(*path))
        .cloned()
        .collect();
    delta
}

/// Ranks a hot list: one path per line (`/a.css`), request counts as `PATH COUNT` or
/// `COUNT PATH` (the output of `sort | uniq -c`), or the web server's access log itself
/// (Common or Combined Log Format, as nginx and Apache write it: each `GET`/`HEAD` answered
/// with a 2xx or 3xx status counts one request; other lines of the log, such as scanners'
/// junk requests, are skipped). Empty lines and `#` comments are skipped, a query string is
/// cut off, counts of a repeated path add up. Most requested first; paths without a count
/// keep their order after those with one.
pub fn rank_hot_list(text: &str) -> Result<Vec<String>, ManifestError> {
    let mut counts: HashMap<String, (u64, usize)> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(logged) = access_log_request(line) {
            if let Some(path) = logged {
                let order = counts.len();
                let slot = counts.entry(path).or_insert((0, order));
                slot.0 = slot.0.saturating_add(1);
            }
            continue;
        }
        let field = || format!("hot list line {}", n + 1);
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let (raw, count) = match tokens.as_slice() {
            [path] => (*path, 0),
            [a, b] if a.starts_with('/') => (
                *a,
                parse_count(b)
                    .ok_or_else(|| invalid(field(), format!("count {b:?} is not a number")))?,
            ),
            [a, b] => (
                *b,
                parse_count(a).ok_or_else(|| {
                    invalid(
                        field(),
                        format!("expected \"PATH [COUNT]\" or \"COUNT PATH\", got {line:?}"),
                    )
                })?,
            ),
            _ => {
                return Err(invalid(
                    field(),
                    format!("expected \"PATH [COUNT]\" or \"COUNT PATH\", got {line:?}"),
                ));
            }
        };
        let path = raw.split(['?', '#']).next().unwrap_or(raw);
        check_path(path).map_err(|e| invalid(field(), e.to_string()))?;
        let order = counts.len();
        let slot = counts.entry(path.to_owned()).or_insert((0, order));
        slot.0 = slot.0.saturating_add(count);
    }
    let mut ranked: Vec<(String, (u64, usize))> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.1.1.cmp(&b.1.1)));
    Ok(ranked.into_iter().map(|(path, _)| path).collect())
}

/// `None` if `line` is not an access-log line; `Some(None)` for one that does not count (not
/// a successful `GET`/`HEAD`, or a path the manifest could not hold); else the path.
fn access_log_request(line: &str) -> Option<Option<String>> {
    // `... "METHOD TARGET PROTOCOL" STATUS SIZE ...`
    let open = line.find('"')?;
    let rest = &line[open + 1..];
    let close = rest.find('"')?;
    let request = &rest[..close];
    // A quoted field followed by a three-digit status is a log line, whatever it requested.
    let status: u16 = rest[close + 1..].split_whitespace().next()?.parse().ok()?;
    if !(100..600).contains(&status) {
        return None;
    }
    let words: Vec<&str> = request.split(' ').collect();
    let [method, target, protocol] = words.as_slice() else {
        return Some(None);
    };
    if !protocol.starts_with("HTTP/")
        || !matches!(*method, "GET" | "HEAD")
        || !(200..400).contains(&status)
    {
        return Some(None);
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some(check_path(path).ok().map(|()| path.to_owned()))
}

fn parse_count(text: &str) -> Option<u64> {
    text.parse().ok()
}

/// Service names: 1 to 32 characters of `[a-z0-9-]` (as in the config).
pub fn check_service(name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "service",
            format!("{name:?} is not 1 to 32 characters of a-z 0-9 -"),
        ))
    }
}

/// An origin base URL: `http(s)://host[:port][/prefix]`, no user info, query, fragment or
/// trailing slash, the prefix a valid path.
pub(crate) fn check_origin(url: &str) -> Result<(), String> {
    if url.len() > MAX_ORIGIN_BYTES {
        return Err(format!("longer than {MAX_ORIGIN_BYTES} bytes"));
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| "not an http:// or https:// url".to_owned())?;
    let (authority, prefix) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err("no host".into());
    }
    if authority.contains('@') {
        return Err("user info is not allowed".into());
    }
    if authority.contains(['?', '#']) || prefix.contains(['?', '#']) {
        return Err("query and fragment are not allowed".into());
    }
    let parsed: hyper::Uri = url.parse().map_err(|e| format!("invalid url: {e}"))?;
    if parsed.host().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    if !prefix.is_empty() {
        if prefix.ends_with('/') {
            return Err("the prefix must not end with \"/\"".into());
        }
        check_path(prefix).map_err(|e| format!("prefix: {e}"))?;
    }
    Ok(())
}

fn check_entry(e: &Entry) -> Result<(), ManifestError> {
    let field = |name: &str| format!("entries[{}].{name}", e.path);
    check_path(&e.path)
        .map_err(|err| invalid(format!("entries[{:?}].path", e.path), err.to_string()))?;
    if e.size > MAX_OBJECT_BYTES {
        return Err(invalid(
            field("size"),
            format!("{} exceeds {MAX_OBJECT_BYTES} bytes", e.size),
        ));
    }
    check_header_value(&e.content_type, MAX_CONTENT_TYPE_BYTES)
        .map_err(|reason| invalid(field("content_type"), reason))?;
    if !is_media_type(&e.content_type) {
        return Err(invalid(
            field("content_type"),
            format!("{:?} is not a media type", e.content_type),
        ));
    }
    check_etag(&e.etag).map_err(|reason| invalid(field("etag"), reason))?;
    if !e.cache_control.is_empty() {
        check_header_value(&e.cache_control, MAX_CACHE_CONTROL_BYTES)
            .map_err(|reason| invalid(field("cache_control"), reason))?;
    }
    if let Some(ms) = e.last_modified_ms
        && ms < 0
    {
        return Err(invalid(field("last_modified_ms"), "negative"));
    }
    Ok(())
}

/// A header value made of visible ASCII and spaces, not empty, within `limit` bytes.
pub(crate) fn check_header_value(value: &str, limit: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err("empty".into());
    }
    if value.len() > limit {
        return Err(format!("longer than {limit} bytes"));
    }
    if value.starts_with(' ') || value.ends_with(' ') {
        return Err("leading or trailing space".into());
    }
    if !value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err("only visible ascii characters and spaces are allowed".into());
    }
    Ok(())
}

/// `type/subtype[; parameters]`.
pub(crate) fn is_media_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or("").trim();
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    matches!(essence.split_once('/'), Some((t, s)) if token(t) && token(s))
}

/// A strong entity tag: `"` etagc* `"` (RFC 9110 §8.8.3), no `W/` prefix.
fn check_etag(etag: &str) -> Result<(), String> {
    if etag.len() < 3 || etag.len() > MAX_ETAG_BYTES {
        return Err(format!("3 to {MAX_ETAG_BYTES} bytes with the quotes"));
    }
    let inner = etag
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .ok_or_else(|| "not a strong, quoted entity tag".to_owned())?;
    if !inner
        .bytes()
        .all(|b| b == 0x21 || (0x23..=0x7e).contains(&b))
    {
        return Err("invalid character in the entity tag".into());
    }
    Ok(())
}

/// The strong entity tag of a body with this SHA-256.
pub fn etag_of(sha256: &[u8; 32]) -> String {
    format!("\"{}\"", hex::encode(sha256))
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An instant for messages: the HTTP date, or the raw number if out of range.
pub(crate) fn fmt_ms(ms: UnixMs) -> String {
    // httpdate panics from the year 9999 on.
    const LAST_HTTP_DATE_MS: u64 = 253_402_300_799_000;
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms <= LAST_HTTP_DATE_MS)
        .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
        .map_or_else(|| format!("{ms} ms"), httpdate::fmt_http_date)
}

fn hex_bytes<S: serde::Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}
