//! Building manifests: from a document root on disk, or by fetching paths from the origin.
//! Both hash streaming, so memory stays bounded whatever the size of an object.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;

use super::{
    Entry, MAX_CACHE_CONTROL_BYTES, MAX_ENTRIES, MAX_OBJECT_BYTES, Manifest, ManifestError,
    check_header_value, check_origin, check_path, check_service, encode_segment, etag_of, invalid,
    origin::{Fetched, Fetcher},
};
use crate::model::{Fingerprint, UnixMs, now_ms};

/// Cache-Control of entries when the options give none (and, for origin builds, the origin
/// sends none).
pub const DEFAULT_CACHE_CONTROL: &str = "public, max-age=3600";
/// Validity of a manifest when the options give none: 7 days (the longest arrangement).
pub const DEFAULT_TTL_MS: i64 = 7 * 24 * 3600 * 1000;
/// Read buffer of the file hasher.
const READ_CHUNK: usize = 256 * 1024;
/// A hidden name that is still published: RFC 8615 well-known URIs.
const WELL_KNOWN: &str = ".well-known";

/// What a build needs besides its source.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The primary that will sign (its fingerprint goes into the manifest).
    pub primary: Fingerprint,
    /// Service name (`[[services]]` name).
    pub service: String,
    /// Version of the new manifest (at least 1).
    pub version: u64,
    /// [`build_from_dir`] only: the base URL peers pull the files from
    /// (`http(s)://host[:port][/prefix]`; a trailing "/" is dropped). [`build_from_origin`]
    /// uses its `origin` argument instead.
    pub origin: String,
    /// `created_ms` of the manifest.
    pub now: UnixMs,
    /// Validity from `now`, milliseconds (at most [`super::MAX_TTL_MS`]).
    pub ttl_ms: i64,
    /// Cache-Control of every entry. `None`: the origin's header (origin builds), else
    /// [`DEFAULT_CACHE_CONTROL`].
    pub cache_control: Option<String>,
    /// [`build_from_dir`]: also publish names starting with "." (".well-known" always is).
    pub include_hidden: bool,
    /// Largest object accepted, bytes.
    pub max_object_bytes: u64,
    /// Most entries.
    pub max_entries: usize,
    /// [`build_from_origin`]: how to fetch.
    pub fetch: FetchOptions,
}

impl BuildOptions {
    /// Defaults: version 1, created now, valid [`DEFAULT_TTL_MS`], default cache control, no
    /// hidden files, [`MAX_OBJECT_BYTES`] and [`MAX_ENTRIES`].
    pub fn new(primary: Fingerprint, service: &str, origin: &str) -> Self {
        Self {
            primary,
            service: service.to_owned(),
            version: 1,
            origin: origin.to_owned(),
            now: now_ms(),
            ttl_ms: DEFAULT_TTL_MS,
            cache_control: None,
            include_hidden: false,
            max_object_bytes: MAX_OBJECT_BYTES,
            max_entries: MAX_ENTRIES,
            fetch: FetchOptions::default(),
        }
    }
}

/// Fetching from the origin: time limits, parallelism and extra trust anchors.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// TCP connect time limit.
    pub connect_timeout: Duration,
    /// Time limit until the response headers arrive.
    pub response_timeout: Duration,
    /// Longest silence while the body streams.
    pub idle_timeout: Duration,
    /// Time limit of one whole object (headers and body).
    pub object_timeout: Duration,
    /// Objects fetched at once (at least 1).
    pub concurrency: usize,
    /// Trusted in addition to the Mozilla roots (webpki-roots): a private origin's CA.
    pub extra_roots: Vec<CertificateDer<'static>>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            object_timeout: Duration::from_secs(3600),
            concurrency: 4,
            extra_roots: Vec::new(),
        }
    }
}

/// Builds a manifest of every regular file under `root`: paths are the file paths relative to
/// the root (percent-encoded), hashed streaming with a fixed buffer, content-type from the
/// extension, a strong ETag from the SHA-256, Last-Modified from the file's mtime. Symbolic
/// links and special files are skipped (logged), so are names starting with "." unless
/// `include_hidden` (".well-known" is always included).
pub async fn build_from_dir(root: &Path, opts: BuildOptions) -> Result<Manifest, ManifestError> {
    let origin = normalise_origin(&opts.origin)?;
    check_options(&opts)?;
    let cache_control = opts
        .cache_control
        .clone()
        .unwrap_or_else(|| DEFAULT_CACHE_CONTROL.to_owned());
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ManifestError::Io { path, source }
    };
    let meta = tokio::fs::metadata(root).await.map_err(io(root))?;
    if !meta.is_dir() {
        return Err(ManifestError::File {
            path: root.to_owned(),
            reason: "not a directory".into(),
        });
    }
    let files = walk(root, &opts).await?;
    let mut entries = BTreeMap::new();
    for (file, path) in files {
        let hashed = hash_file(&file, opts.max_object_bytes).await?;
        let content_type = content_type_by_extension(&path);
        entries.insert(
            path.clone(),
            Entry {
                path,
                size: hashed.size,
                sha256: hashed.sha256,
                content_type,
                etag: etag_of(&hashed.sha256),
                cache_control: cache_control.clone(),
                last_modified_ms: hashed.modified_ms,
            },
        );
    }
    finish(&opts, origin, entries)
}

/// Builds a manifest by fetching each of `paths` (normalised request paths, see
/// [`check_path`]; repeated ones once) from `origin` over HTTP or HTTPS: 200 answers only
/// (redirects are not followed), the body hashed as it streams, within the size and time
/// limits of `opts`. Content-Type, Cache-Control and Last-Modified come from the origin's
/// answer (Content-Type falls back to the extension, Cache-Control to the options).
pub async fn build_from_origin(
    origin: &str,
    paths: &[String],
    opts: BuildOptions,
) -> Result<Manifest, ManifestError> {
    let origin = normalise_origin(origin)?;
    check_options(&opts)?;
    let mut unique: Vec<&String> = paths.iter().collect();
    unique.sort();
    unique.dedup();
    if unique.len() > opts.max_entries {
        return Err(ManifestError::TooLarge {
            what: "entry count",
            size: unique.len() as u64,
            limit: opts.max_entries as u64,
        });
    }
    for path in &unique {
        check_path(path).map_err(|e| invalid("paths", e.to_string()))?;
    }
    let fetcher = Arc::new(Fetcher::new(&origin, &opts.fetch, opts.max_object_bytes)?);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(opts.fetch.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for path in unique {
        let (fetcher, semaphore) = (fetcher.clone(), semaphore.clone());
        let url = format!("{origin}{path}");
        let path = path.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            fetcher.fetch(&url).await.map(|fetched| (path, fetched))
        });
    }
    let mut entries = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (path, fetched) = joined.map_err(|e| ManifestError::Fetch {
            url: origin.clone(),
            reason: format!("fetch task failed: {e}"),
        })??;
        let entry = entry_from_fetch(&path, fetched, opts.cache_control.as_deref());
        entries.insert(path, entry);
    }
    finish(&opts, origin, entries)
}

fn entry_from_fetch(path: &str, f: Fetched, cache_control: Option<&str>) -> Entry {
    let content_type = f
        .content_type
        .filter(|ct| check_header_value(ct, super::MAX_CONTENT_TYPE_BYTES).is_ok())
        .filter(|ct| super::is_media_type(ct))
        .unwrap_or_else(|| content_type_by_extension(path));
    let cache_control = match cache_control {
        Some(cc) => cc.to_owned(),
        None => f
            .cache_control
            .filter(|cc| check_header_value(cc, MAX_CACHE_CONTROL_BYTES).is_ok())
            .unwrap_or_else(|| DEFAULT_CACHE_CONTROL.to_owned()),
    };
    Entry {
        path: path.to_owned(),
        size: f.size,
        sha256: f.sha256,
        content_type,
        etag: etag_of(&f.sha256),
        cache_control,
        last_modified_ms: f.last_modified_ms,
    }
}

fn check_options(opts: &BuildOptions) -> Result<(), ManifestError> {
    check_service(&opts.service)?;
    if let Some(cc) = &opts.cache_control
        && !cc.is_empty()
    {
        check_header_value(cc, MAX_CACHE_CONTROL_BYTES)
            .map_err(|reason| invalid("cache_control", reason))?;
    }
    if opts.ttl_ms <= 0 || opts.ttl_ms > super::MAX_TTL_MS {
        return Err(invalid(
            "ttl",
            format!(
                "must be between 1 ms and {} days",
                super::MAX_TTL_MS / 86_400_000
            ),
        ));
    }
    if opts.version == 0 {
        return Err(invalid("version", "must be at least 1"));
    }
    Ok(())
}

fn finish(
    opts: &BuildOptions,
    origin: String,
    entries: BTreeMap<String, Entry>,
) -> Result<Manifest, ManifestError> {
    let manifest = Manifest {
        primary: opts.primary,
        service: opts.service.clone(),
        version: opts.version,
        created_ms: opts.now,
        expires_ms: opts.now.saturating_add(opts.ttl_ms),
        origin,
        entries,
        hot: Vec::new(),
    };
    manifest.validate()?;
    Ok(manifest)
}

/// The origin without a trailing "/", checked.
pub(crate) fn normalise_origin(url: &str) -> Result<String, ManifestError> {
    let trimmed = url.trim();
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    check_origin(trimmed).map_err(|reason| ManifestError::BadOrigin {
        url: url.to_owned(),
        reason,
    })?;
    Ok(trimmed.to_owned())
}

/// Regular files under `root` with their request paths, depth first, bounded in count.
async fn walk(root: &Path, opts: &BuildOptions) -> Result<Vec<(PathBuf, String)>, ManifestError> {
    let mut files = Vec::new();
    let mut dirs = vec![(root.to_owned(), String::new())];
    while let Some((dir, prefix)) = dirs.pop() {
        let io = |source| ManifestError::Io {
            path: dir.clone(),
            source,
        };
        let mut reader = tokio::fs::read_dir(&dir).await.map_err(io)?;
        while let Some(item) = reader.next_entry().await.map_err(io)? {
            let name = item.file_name();
            let raw = name.as_encoded_bytes();
            if raw.first() == Some(&b'.') && !opts.include_hidden && raw != WELL_KNOWN.as_bytes() {
                continue;
            }
            let file = item.path();
            let kind = item.file_type().await.map_err(|source| ManifestError::Io {
                path: file.clone(),
                source,
            })?;
            let path = format!("{prefix}/{}", encode_segment(raw));
            if kind.is_dir() {
                dirs.push((file, path));
            } else if kind.is_file() {
                check_path(&path).map_err(|e| ManifestError::File {
                    // Escaped: the name may hold a line break, the message must not.
                    path: PathBuf::from(file.to_string_lossy().escape_debug().to_string()),
                    reason: format!("cannot be published: {e}"),
                })?;
                if files.len() >= opts.max_entries {
                    return Err(ManifestError::TooLarge {
                        what: "entry count",
                        size: files.len() as u64 + 1,
                        limit: opts.max_entries as u64,
                    });
                }
                files.push((file, path));
            } else {
                tracing::warn!(path = %file.display(), "skipped: not a regular file or directory");
            }
        }
    }
    Ok(files)
}

struct Hashed {
    size: u64,
    sha256: [u8; 32],
    modified_ms: Option<UnixMs>,
}

/// SHA-256 and size of a file, read in fixed chunks.
async fn hash_file(file: &Path, max_bytes: u64) -> Result<Hashed, ManifestError> {
    let io = |source| ManifestError::Io {
        path: file.to_owned(),
        source,
    };
    let mut handle = tokio::fs::File::open(file).await.map_err(io)?;
    let meta = handle.metadata().await.map_err(io)?;
    if meta.len() > max_bytes {
        return Err(ManifestError::ObjectTooLarge {
            location: file.display().to_string(),
            size: meta.len(),
            limit: max_bytes,
        });
    }
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; READ_CHUNK];
    let mut size = 0u64;
    loop {
        let n = handle.read(&mut buffer).await.map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
        if size > meta.len() {
            break;
        }
    }
    if size != meta.len() {
        return Err(ManifestError::File {
            path: file.to_owned(),
            reason: format!(
                "changed while being hashed ({} bytes, then {size})",
                meta.len()
            ),
        });
    }
    Ok(Hashed {
        size,
        sha256: hasher.finalize().into(),
        modified_ms: meta.modified().ok().and_then(ms_of),
    })
}

pub(crate) fn ms_of(time: SystemTime) -> Option<UnixMs> {
    let since = time.duration_since(UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

/// Content-Type from the last segment's extension (mime_guess's table), else
/// `application/octet-stream`.
pub(crate) fn content_type_by_extension(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or(path);
    mime_guess::from_path(name)
        .first_raw()
        .unwrap_or("application/octet-stream")
        .to_owned()
}
