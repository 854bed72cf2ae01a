//! The HTTP face of the surrogate: routing to an arrangement, the manifest as the only
//! source of what exists, conditional and range requests, the egress budget, and bodies
//! streamed from memory or from disk in bounded pieces.

use std::{
    borrow::Cow,
    cell::RefCell,
    io::{self, SeekFrom},
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::{Duration, UNIX_EPOCH},
};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header, request::Parts},
};
use base64::Engine;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::{Stream, StreamExt};
use tokio_util::io::ReaderStream;

use super::{
    Entry, Inner, Manifest, TenantState,
    fill::{self, FillError, Object},
};
use crate::model::{Fingerprint, now_ms};

/// Size of the pieces a body is read from disk in.
const CHUNK: usize = 64 * 1024;
/// Response header naming whether the object was stored already.
const CACHE_HEADER: HeaderName = HeaderName::from_static("x-p2pcdn-cache");
const REPR_DIGEST: HeaderName = HeaderName::from_static("repr-digest");
/// Headers of an object answer, at most (room for all of them without regrowing the map).
const OBJECT_HEADERS: usize = 16;

/// The surrogate's answers.
pub(crate) type Response = axum::http::Response<Body>;

/// The body of an answer: nothing, bytes held in memory (a memory-tier object is sent as
/// the stored `Bytes`, without a copy), or a stream read from a stored file. No allocation
/// and no dynamic dispatch for the first two.
pub(crate) enum Body {
    Empty,
    Full(Option<Bytes>),
    Stream(Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>),
}

impl Body {
    fn text(text: String) -> Self {
        Self::Full(Some(Bytes::from(text)))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Stream(stream) => stream
                .as_mut()
                .poll_next(cx)
                .map(|chunk| chunk.map(|c| c.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty | Self::Full(None) => true,
            Self::Full(Some(_)) | Self::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty | Self::Full(None) => SizeHint::with_exact(0),
            Self::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Self::Stream(_) => SizeHint::default(),
        }
    }
}

/// The service as an axum router (for embedding); [`super::server`] calls [`handle`]
/// directly.
pub(crate) fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .fallback(|State(inner): State<Arc<Inner>>, req: Request| async move {
            let (parts, _) = req.into_parts();
            handle(&inner, &parts).await.map(axum::body::Body::new)
        })
        .with_state(inner)
}

pub(crate) fn header_value(value: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(value).ok()
}

/// Lower case, no port, no trailing dot; `None` if it is not a host name or address.
pub(crate) fn normalise_host(host: &str) -> Option<String> {
    let authority: axum::http::uri::Authority = host.trim().parse().ok()?;
    if authority.as_str().contains('@') {
        return None;
    }
    let name = authority.host().trim_end_matches('.').to_ascii_lowercase();
    (!name.is_empty() && name.len() <= 253).then_some(name)
}

/// The host name as [`normalise_host`] gives it, borrowed when it is already in that form
/// (a lower-case name without port or trailing dot: what clients send), so routing a
/// request allocates nothing.
fn host_key(host: &str) -> Option<Cow<'_, str>> {
    let plain = !host.is_empty()
        && host.len() <= 253
        && !host.ends_with('.')
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if plain {
        Some(Cow::Borrowed(host))
    } else {
        normalise_host(host).map(Cow::Owned)
    }
}

/// Percent-encoding normalised as manifest paths are written: unreserved characters
/// decoded, other escapes in upper case. A path without escapes is returned as it is.
fn normalise_path(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex_val(bytes[i + 1]), hex_val(bytes[i + 2]))
        {
            let byte = hi << 4 | lo;
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(byte));
            } else {
                out.push('%');
                out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
            }
            i += 3;
        } else {
            out.push(char::from(bytes[i]));
            i += 1;
        }
    }
    Cow::Owned(out)
}

fn hex_val(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

enum Route<'a> {
    Found(Arc<TenantState>, Cow<'a, str>),
    UnknownHost(String),
    UnknownPrimary(String),
}

fn route<'a>(inner: &Inner, host: Option<&str>, raw_path: &'a str) -> Route<'a> {
    let tenants = inner.read_tenants();
    let host = host.and_then(host_key);
    if let Some(tenant) = host.as_deref().and_then(|h| tenants.by_host.get(h)) {
        return Route::Found(Arc::clone(tenant), normalise_path(raw_path));
    }
    // Redirect mode: /<primary fingerprint hex>/<path>.
    let rest = raw_path.strip_prefix('/').unwrap_or(raw_path);
    let (first, tail) = rest.split_once('/').unwrap_or((rest, ""));
    if first.len() == 64 && first.bytes().all(|b| b.is_ascii_hexdigit()) {
        let found = first
            .parse::<Fingerprint>()
            .ok()
            .and_then(|fp| tenants.by_primary.get(&fp))
            .filter(|ids| !ids.is_empty());
        let Some(ids) = found else {
            return Route::UnknownPrimary(first.to_owned());
        };
        // "/<tail>": the rest after the fingerprint, its slash included.
        let path = if tail.is_empty() && !rest[first.len()..].starts_with('/') {
            Cow::Borrowed("/")
        } else {
            normalise_path(&rest[first.len()..])
        };
        let candidates: Vec<&Arc<TenantState>> =
            ids.iter().filter_map(|id| tenants.by_id.get(id)).collect();
        let chosen = candidates
            .iter()
            .find(|t| t.manifest().entry(&path).is_some())
            .or_else(|| candidates.first());
        return match chosen {
            Some(tenant) => Route::Found(Arc::clone(tenant), path),
            None => Route::UnknownPrimary(first.to_owned()),
        };
    }
    Route::UnknownHost(host.map(Cow::into_owned).unwrap_or_default())
}

fn host_of(req: &Parts) -> Option<&str> {
    req.uri
        .host()
        .or_else(|| req.headers.get(header::HOST).and_then(|v| v.to_str().ok()))
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    let mut text = message.into();
    text.push('\n');
    let mut response = Response::new(Body::text(text));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn status_only(status: StatusCode) -> Response {
    let mut response = Response::new(Body::Empty);
    *response.status_mut() = status;
    response
}

/// Answers one request (the body of a GET or HEAD is not read).
pub(crate) async fn handle(inner: &Arc<Inner>, req: &Parts) -> Response {
    if let Some(response) = memory_hit(inner, req) {
        return response;
    }
    let method = &req.method;
    if method != Method::GET && method != Method::HEAD && method != Method::OPTIONS {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
        response.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, OPTIONS"),
        );
        return response;
    }
    let (tenant, path) = match route(inner, host_of(req), req.uri.path()) {
        Route::Found(tenant, path) => (tenant, path),
        Route::UnknownHost(host) => {
            metrics::counter!("p2pcdn_surrogate_unrouted_total", "reason" => "host").increment(1);
            return plain(
                StatusCode::MISDIRECTED_REQUEST,
                format!("no arrangement serves host {host:?}"),
            );
        }
        Route::UnknownPrimary(id) => {
            metrics::counter!("p2pcdn_surrogate_unrouted_total", "reason" => "primary")
                .increment(1);
            return plain(
                StatusCode::NOT_FOUND,
                format!("no arrangement for primary {id}"),
            );
        }
    };
    tenant.usage.requests.add(1);
    if method == Method::OPTIONS {
        return preflight(&tenant);
    }
    let manifest = tenant.manifest();
    if manifest.expires_ms <= now_ms() {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "the primary's manifest has expired",
        );
    }
    let Some(entry) = manifest.entry(&path) else {
        tenant.usage.not_found.add(1);
        return plain(StatusCode::NOT_FOUND, "not in the primary's manifest");
    };
    serve_entry(inner, &tenant, entry, &req.headers, method == Method::HEAD).await
}

fn preflight(tenant: &TenantState) -> Response {
    let mut response = status_only(StatusCode::NO_CONTENT);
    if let Some(origin) = &tenant.allow_origin {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, HEAD"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("range, if-none-match, if-modified-since, if-range"),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
    }
    response
}

/// Headers every answer about an object carries (200, 206, 304, HEAD).
fn object_headers(headers: &mut HeaderMap, tenant: &TenantState, entry: &Entry) {
    let mut put = |name: HeaderName, value: &str| {
        if !value.is_empty()
            && let Ok(value) = HeaderValue::from_str(value)
        {
            headers.insert(name, value);
        }
    };
    put(header::ETAG, &entry.etag);
    put(header::CACHE_CONTROL, &entry.cache_control);
    if let Some(modified) = last_modified(entry)
        && let Ok(value) = HeaderValue::try_from(httpdate::fmt_http_date(modified))
    {
        headers.insert(header::LAST_MODIFIED, value);
    }
    headers.insert(REPR_DIGEST, repr_digest(&entry.sha256));
    if let Some(origin) = &tenant.allow_origin {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("repr-digest, etag, content-length, content-range"),
        );
    }
}

/// `sha-256=:<base64>:` (RFC 9530), built on the stack.
fn repr_digest(sha256: &[u8; 32]) -> HeaderValue {
    const PREFIX: &[u8] = b"sha-256=:";
    // 32 bytes are 44 base64 characters.
    let mut out = [0_u8; PREFIX.len() + 44 + 1];
    out[..PREFIX.len()].copy_from_slice(PREFIX);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(sha256, &mut out[PREFIX.len()..])
        .unwrap_or(0);
    let end = PREFIX.len() + written;
    out[end] = b':';
    HeaderValue::from_bytes(&out[..=end]).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn last_modified(entry: &Entry) -> Option<std::time::SystemTime> {
    let ms = u64::try_from(entry.last_modified_ms?).ok()?;
    // HTTP dates have whole seconds.
    UNIX_EPOCH.checked_add(Duration::from_secs(ms / 1000))
}

fn etag_matches(list: &str, etag: &str) -> bool {
    let ours = etag.strip_prefix("W/").unwrap_or(etag);
    list.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == ours
    })
}

fn not_modified(headers: &HeaderMap, entry: &Entry) -> bool {
    if let Some(list) = headers.get(header::IF_NONE_MATCH) {
        return list
            .to_str()
            .is_ok_and(|list| etag_matches(list, &entry.etag));
    }
    let since = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    matches!((since, last_modified(entry)), (Some(since), Some(modified)) if modified <= since)
}

#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    Full,
    Partial { start: u64, len: u64 },
    Unsatisfiable,
}

/// One byte range (`bytes=a-b`, `bytes=a-`, `bytes=-n`). Several ranges, other units and
/// malformed values are ignored (the whole object is sent), as RFC 9110 allows.
fn parse_range(value: &str, size: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeRequest::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        let Ok(suffix) = last.parse::<u64>() else {
            return RangeRequest::Full;
        };
        if suffix == 0 || size == 0 {
            return RangeRequest::Unsatisfiable;
        }
        let len = suffix.min(size);
        return RangeRequest::Partial {
            start: size - len,
            len,
        };
    }
    let Ok(start) = first.parse::<u64>() else {
        return RangeRequest::Full;
    };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        match last.parse::<u64>() {
            Ok(end) if end >= start => end,
            _ => return RangeRequest::Full,
        }
    };
    if start >= size {
        return RangeRequest::Unsatisfiable;
    }
    let end = end.min(size - 1);
    RangeRequest::Partial {
        start,
        len: end - start + 1,
    }
}

/// `If-Range` holds when it names the current strong entity tag or exact modification date.
fn if_range_holds(headers: &HeaderMap, entry: &Entry) -> bool {
    let Some(value) = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) else {
        return headers.get(header::IF_RANGE).is_none();
    };
    let value = value.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        return value == entry.etag && !value.starts_with("W/");
    }
    match (httpdate::parse_http_date(value), last_modified(entry)) {
        (Ok(date), Some(modified)) => date == modified,
        _ => false,
    }
}

async fn serve_entry(
    inner: &Arc<Inner>,
    tenant: &Arc<TenantState>,
    entry: &Entry,
    headers: &HeaderMap,
    head: bool,
) -> Response {
    let usage = &tenant.usage;
    if not_modified(headers, entry) {
        let mut response = status_only(StatusCode::NOT_MODIFIED);
        object_headers(response.headers_mut(), tenant, entry);
        return response;
    }
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(value) if if_range_holds(headers, entry) => parse_range(value, entry.size),
        _ => RangeRequest::Full,
    };
    let (status, start, len) = match range {
        RangeRequest::Full => (StatusCode::OK, 0, entry.size),
        RangeRequest::Partial { start, len } => (StatusCode::PARTIAL_CONTENT, start, len),
        RangeRequest::Unsatisfiable => {
            let mut response = plain(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            if let Some(value) = header_value(&format!("bytes */{}", entry.size)) {
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            object_headers(response.headers_mut(), tenant, entry);
            return response;
        }
    };
    if entry.size > tenant.budgets.max_object_bytes {
        usage.oversize.add(1);
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "object larger than this arrangement accepts",
        );
    }
    if let Err(wait) = tenant.bucket.take(if head { 0 } else { len }) {
        return budget_refused(tenant, wait);
    }

    let mut answer = answer_headers(tenant, entry, status, start, len);
    let respond = |body: Body, headers: HeaderMap| {
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    };
    if head {
        // Everything a HEAD answers is in the manifest: no origin fetch.
        return respond(Body::Empty, answer);
    }

    // A file can vanish between lookup and open (evicted meanwhile): one more try.
    for _ in 0..2 {
        let (object, hit) = match fill::obtain(inner, tenant, entry).await {
            Ok(found) => found,
            Err(e) => {
                usage.misses.add(1);
                return fill_error(&e);
            }
        };
        let body = match object {
            // The whole object: the stored Bytes as they are.
            Object::Memory(bytes) if start == 0 && len == bytes.len() as u64 => {
                usage.bytes.add(len);
                Body::Full(Some(bytes))
            }
            Object::Memory(bytes) => {
                let from = usize::try_from(start).unwrap_or(usize::MAX);
                let to = usize::try_from(start + len).unwrap_or(usize::MAX);
                let Some(slice) = (from <= to && to <= bytes.len()).then(|| bytes.slice(from..to))
                else {
                    return internal();
                };
                usage.bytes.add(len);
                Body::Full(Some(slice))
            }
            Object::Disk(file) => match open_at(&file.path, start).await {
                Ok(reader) => {
                    let counter = tenant.usage.clone();
                    let stream =
                        ReaderStream::with_capacity(reader.take(len), CHUNK).map(move |chunk| {
                            // The object stays alive (not deleted) while it streams.
                            let _keep = &file;
                            if let Ok(bytes) = &chunk {
                                counter.bytes.add(bytes.len() as u64);
                            }
                            chunk
                        });
                    Body::Stream(Box::pin(stream))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tenant.store.invalidate(&entry.sha256);
                    continue;
                }
                Err(e) => {
                    usage.disk_errors.add(1);
                    tracing::warn!(arrangement.id = %tenant.id, path = %entry.path, error = %e, "surrogate: reading a stored file");
                    tenant.store.invalidate(&entry.sha256);
                    return plain(StatusCode::SERVICE_UNAVAILABLE, "stored object unreadable");
                }
            },
        };
        if hit {
            usage.hits.add(1);
        } else {
            usage.misses.add(1);
        }
        answer.insert(
            CACHE_HEADER,
            HeaderValue::from_static(if hit { "hit" } else { "miss" }),
        );
        return respond(body, answer);
    }
    plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "stored object vanished, retry",
    )
}

fn budget_refused(tenant: &TenantState, wait: Duration) -> Response {
    tenant.usage.budget_rejections.add(1);
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut response = plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "egress budget of this arrangement exhausted",
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

/// The headers of a 200 or 206 answer (all but `x-p2pcdn-cache`).
fn answer_headers(
    tenant: &TenantState,
    entry: &Entry,
    status: StatusCode,
    start: u64,
    len: u64,
) -> HeaderMap {
    let mut answer = HeaderMap::with_capacity(OBJECT_HEADERS);
    answer.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    answer.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(value) = header_value(&entry.content_type) {
        answer.insert(header::CONTENT_TYPE, value);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(value) =
            HeaderValue::try_from(format!("bytes {start}-{}/{}", start + len - 1, entry.size))
    {
        answer.insert(header::CONTENT_RANGE, value);
    }
    object_headers(&mut answer, tenant, entry);
    answer
}

/// Routes this worker thread resolved: the host name as clients send it → its arrangement
/// and that arrangement's manifest, or no arrangement (redirect mode, a foreign name).
struct CachedRoute {
    surrogate: u64,
    generation: u64,
    host: Box<str>,
    route: Option<(Arc<TenantState>, Arc<Manifest>)>,
}

/// Routes cached per thread, at most.
const CACHED_ROUTES: usize = 8;

thread_local! {
    static ROUTES: RefCell<Vec<CachedRoute>> = const { RefCell::new(Vec::new()) };
}

/// Calls `f` with the arrangement serving `host` and its manifest, from this thread's cache
/// while the surrogate's generation (bumped by every change of an arrangement or a manifest)
/// is the one cached: no lock, no hash of the name and no reference count shared with the
/// other threads on the way. `None`: no arrangement has this host name.
///
/// A thread keeps what it cached (at most [`CACHED_ROUTES`] arrangements and manifests) until
/// it routes a request of that surrogate again; removed arrangements release their stored
/// objects at once all the same ([`super::Surrogate::remove_tenant`]).
fn with_route<R>(
    inner: &Inner,
    host: &str,
    f: impl FnOnce(&TenantState, &Manifest) -> R,
) -> Option<R> {
    let generation = inner.generation.load(Ordering::Acquire);
    ROUTES.with(|routes| {
        let mut routes = routes.try_borrow_mut().ok()?;
        let found = routes
            .iter()
            .position(|r| r.surrogate == inner.id && *r.host == *host);
        let index = match found {
            Some(i) if routes[i].generation == generation => i,
            _ => {
                // Whatever changed, the routes cached before it go.
                routes.retain(|r| r.surrogate != inner.id || r.generation == generation);
                let tenant = host_key(host).and_then(|key| {
                    inner
                        .read_tenants()
                        .by_host
                        .get(key.as_ref())
                        .map(Arc::clone)
                });
                if routes.len() >= CACHED_ROUTES {
                    routes.remove(0);
                }
                routes.push(CachedRoute {
                    surrogate: inner.id,
                    generation,
                    host: host.into(),
                    route: tenant.map(|t| {
                        let manifest = t.manifest();
                        (t, manifest)
                    }),
                });
                routes.len() - 1
            }
        };
        let (tenant, manifest) = routes[index].route.as_ref()?;
        Some(f(tenant, manifest))
    })
}

/// The most common request, a plain GET (no condition, no range) of a whole object held in
/// the memory tier, routed by host name: answered at once, through the thread's route cache.
/// `None` for anything else, with nothing counted or taken: [`handle`]'s general path
/// answers it, with the same semantics.
fn memory_hit(inner: &Inner, req: &Parts) -> Option<Response> {
    if req.method != Method::GET
        || req.headers.contains_key(header::RANGE)
        || req.headers.contains_key(header::IF_NONE_MATCH)
        || req.headers.contains_key(header::IF_MODIFIED_SINCE)
    {
        return None;
    }
    let host = host_of(req)?;
    let path = req.uri.path();
    if path.contains('%') {
        return None;
    }
    with_route(inner, host, |tenant, manifest| {
        if manifest.expires_ms <= now_ms() {
            return None;
        }
        let entry = manifest.entry(path)?;
        if entry.size > tenant.budgets.max_object_bytes {
            return None;
        }
        let bytes = tenant
            .store
            .memory_hit(&entry.sha256)
            .filter(|b| b.len() as u64 == entry.size)?;
        let usage = &tenant.usage;
        usage.requests.add(1);
        if let Err(wait) = tenant.bucket.take(entry.size) {
            return Some(budget_refused(tenant, wait));
        }
        let mut headers = answer_headers(tenant, entry, StatusCode::OK, 0, entry.size);
        headers.insert(CACHE_HEADER, HeaderValue::from_static("hit"));
        usage.hits.add(1);
        usage.bytes.add(entry.size);
        let mut response = Response::new(Body::Full(Some(bytes)));
        *response.headers_mut() = headers;
        Some(response)
    })
    .flatten()
}

async fn open_at(path: &std::path::Path, start: u64) -> std::io::Result<tokio::fs::File> {
    let mut file = tokio::fs::File::open(path).await?;
    if start > 0 {
        file.seek(SeekFrom::Start(start)).await?;
    }
    Ok(file)
}

fn internal() -> Response {
    plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

fn fill_error(e: &FillError) -> Response {
    match e {
        FillError::Origin(origin) if origin.is_timeout() => plain(
            StatusCode::GATEWAY_TIMEOUT,
            format!("origin timed out: {origin}"),
        ),
        FillError::Origin(origin) if origin.is_mismatch() => plain(
            StatusCode::BAD_GATEWAY,
            format!("origin content refused: {origin}"),
        ),
        FillError::Origin(origin) => plain(StatusCode::BAD_GATEWAY, origin.to_string()),
        FillError::Disk(_) => plain(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        FillError::Aborted => plain(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeRequest::{Full, Partial, Unsatisfiable};
        assert_eq!(parse_range("bytes=0-9", 100), Partial { start: 0, len: 10 });
        assert_eq!(
            parse_range("bytes=90-", 100),
            Partial { start: 90, len: 10 }
        );
        assert_eq!(
            parse_range("bytes=-10", 100),
            Partial { start: 90, len: 10 }
        );
        assert_eq!(
            parse_range("bytes=-200", 100),
            Partial { start: 0, len: 100 }
        );
        assert_eq!(
            parse_range("bytes=95-200", 100),
            Partial { start: 95, len: 5 }
        );
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), Full);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Full);
        assert_eq!(parse_range("items=0-1", 100), Full);
        assert_eq!(parse_range("bytes=x-", 100), Full);
    }

    #[test]
    fn paths_and_hosts() {
        assert_eq!(normalise_path("/a%2fb/%7euser/%41"), "/a%2Fb/~user/A");
        assert_eq!(normalise_path("/bad%zz"), "/bad%zz");
        assert_eq!(normalise_path("/trail%4"), "/trail%4");
        assert_eq!(
            normalise_host("WWW.Example.com.:443").as_deref(),
            Some("www.example.com")
        );
        assert_eq!(normalise_host("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(normalise_host("a b"), None);
    }

    #[test]
    fn etags() {
        assert!(etag_matches("\"a\", \"b\"", "\"b\""));
        assert!(etag_matches("W/\"b\"", "\"b\""));
        assert!(etag_matches("*", "\"b\""));
        assert!(!etag_matches("\"c\"", "\"b\""));
    }

    #[test]
    fn host_keys_are_the_normalised_names() {
        for host in [
            "www.example.com",
            "WWW.Example.com",
            "www.example.com.",
            "www.example.com:8080",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]:443",
            "a-b.c",
            "a b",
            "",
            "user@host",
        ] {
            assert_eq!(
                host_key(host).map(Cow::into_owned),
                normalise_host(host),
                "{host:?}"
            );
        }
        assert!(matches!(
            host_key("www.example.com"),
            Some(Cow::Borrowed(_))
        ));
        assert!(matches!(
            normalise_path("/a/b.js"),
            Cow::Borrowed("/a/b.js")
        ));
    }

    fn request(host: &str, path: &str, extra: &[(HeaderName, &str)]) -> Parts {
        let mut builder = axum::http::Request::builder()
            .uri(path)
            .header(header::HOST, host);
        for (name, value) in extra {
            builder = builder.header(name, *value);
        }
        match builder.body(()) {
            Ok(req) => req.into_parts().0,
            Err(e) => panic!("{e}"),
        }
    }

    async fn body_of(response: Response) -> Bytes {
        use http_body_util::BodyExt as _;
        match response.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => panic!("{e}"),
        }
    }

    /// The memory-hit shortcut answers exactly as the general path does, and follows
    /// manifest updates and removed arrangements at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_memory_hit_shortcut_answers_as_the_general_path() {
        use crate::{
            identity::NodeIdentity,
            manifest::etag_of,
            surrogate::{Budgets, Surrogate, SurrogateConfig, Tenant},
        };
        let Ok(dir) = tempfile::tempdir() else {
            panic!("tempdir")
        };
        let Ok(id) = NodeIdentity::generate("primary", "Primary", &[]) else {
            panic!("identity")
        };
        let body = Bytes::from_static(b"console.log('hit');\n");
        let sha: [u8; 32] = match ring::digest::digest(&ring::digest::SHA256, &body)
            .as_ref()
            .try_into()
        {
            Ok(sha) => sha,
            Err(e) => panic!("{e}"),
        };
        let entry = Entry {
            path: "/app.js".to_owned(),
            size: body.len() as u64,
            sha256: sha,
            content_type: "text/javascript".to_owned(),
            etag: etag_of(&sha),
            cache_control: "public, max-age=60".to_owned(),
            last_modified_ms: Some(1_700_000_000_000),
        };
        let manifest = |version| Manifest {
            primary: id.fingerprint,
            service: "www".to_owned(),
            version,
            created_ms: now_ms(),
            expires_ms: now_ms() + 3_600_000,
            // Never contacted: the object is put in memory below.
            origin: "http://127.0.0.1:9".to_owned(),
            entries: [(entry.path.clone(), entry.clone())].into(),
            hot: Vec::new(),
        };
        let Ok(surrogate) = Surrogate::new(SurrogateConfig::new(dir.path().join("cache"))).await
        else {
            panic!("surrogate")
        };
        let added = surrogate.add_tenant(Tenant {
            arrangement_id: "arr".to_owned(),
            primary: id.fingerprint,
            primary_spki: id.spki_der.clone(),
            host_names: vec!["www.primary.test".to_owned()],
            manifest: manifest(1),
            budgets: Budgets {
                max_object_bytes: 1 << 20,
                total_bytes: 1 << 24,
                egress_bytes_per_s: 1 << 30,
                egress_burst_bytes: 1 << 30,
            },
            allow_origin: Some("*".to_owned()),
        });
        assert!(added.is_ok(), "{added:?}");
        let inner = &surrogate.inner;
        let Some(tenant) = surrogate.tenant("arr") else {
            panic!("tenant")
        };
        tenant.store.put_memory(sha, body.clone());

        let get = request("www.primary.test", "/app.js", &[]);
        let Some(fast) = memory_hit(inner, &get) else {
            panic!("a memory hit takes the shortcut")
        };
        let general = serve_entry(inner, &tenant, &entry, &get.headers, false).await;
        assert_eq!(fast.status(), StatusCode::OK);
        assert_eq!(fast.status(), general.status());
        assert_eq!(fast.headers(), general.headers());
        assert_eq!(
            fast.headers().get(CACHE_HEADER),
            Some(&HeaderValue::from_static("hit"))
        );
        assert_eq!(body_of(fast).await, body);
        assert_eq!(body_of(general).await, body);
        let usage = surrogate.usage("arr").unwrap_or_default();
        // The shortcut counted its request; serve_entry alone does not count requests.
        assert_eq!(
            (usage.requests, usage.hits, usage.bytes),
            (1, 2, 2 * body.len() as u64)
        );

        // Conditions, ranges, other methods and other hosts take the general path.
        for other in [
            request(
                "www.primary.test",
                "/app.js",
                &[(header::RANGE, "bytes=0-1")],
            ),
            request(
                "www.primary.test",
                "/app.js",
                &[(header::IF_NONE_MATCH, "*")],
            ),
            request("www.primary.test", "/nope.js", &[]),
            request("other.test", "/app.js", &[]),
        ] {
            assert!(memory_hit(inner, &other).is_none(), "{:?}", other.headers);
        }
        let mut head = request("www.primary.test", "/app.js", &[]);
        head.method = Method::HEAD;
        assert!(memory_hit(inner, &head).is_none());

        // A new manifest without the object: the cached route is not used any more.
        let mut emptied = manifest(2);
        emptied.entries.clear();
        assert!(surrogate.update_manifest("arr", emptied).is_ok());
        assert!(memory_hit(inner, &get).is_none());
        assert_eq!(handle(inner, &get).await.status(), StatusCode::NOT_FOUND);
        surrogate.remove_tenant("arr");
        assert!(memory_hit(inner, &get).is_none());
        assert_eq!(
            handle(inner, &get).await.status(),
            StatusCode::MISDIRECTED_REQUEST
        );
    }
}
