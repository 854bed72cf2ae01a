//! The HTTP face of the surrogate: routing to an arrangement, the manifest as the only
//! source of what exists, conditional and range requests, the egress budget, and bodies
//! streamed from memory or from disk in bounded pieces.

use std::{
    io::SeekFrom,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::StreamExt;
use tokio_util::io::ReaderStream;

use super::{
    Entry, Inner, TenantState,
    fill::{self, FillError, Object},
};
use crate::model::{Fingerprint, now_ms};

/// Size of the pieces a body is read from disk in.
const CHUNK: usize = 64 * 1024;
/// Response header naming whether the object was stored already.
const CACHE_HEADER: &str = "x-p2pcdn-cache";

pub(crate) fn router(inner: Arc<Inner>) -> Router {
    Router::new().fallback(handle).with_state(inner)
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

/// Percent-encoding normalised as manifest paths are written: unreserved characters
/// decoded, other escapes in upper case.
fn normalise_path(path: &str) -> String {
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
    out
}

fn hex_val(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

enum Route {
    Found(Arc<TenantState>, String),
    UnknownHost(String),
    UnknownPrimary(String),
}

fn route(inner: &Inner, host: Option<&str>, raw_path: &str) -> Route {
    let tenants = inner.read_tenants();
    let host = host.and_then(normalise_host);
    if let Some(id) = host.as_ref().and_then(|h| tenants.by_host.get(h))
        && let Some(tenant) = tenants.by_id.get(id)
    {
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
        let path = normalise_path(&format!("/{tail}"));
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
    Route::UnknownHost(host.unwrap_or_default())
}

fn host_of(req: &Request) -> Option<String> {
    req.uri().host().map(str::to_owned).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    let mut text = message.into();
    text.push('\n');
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        text,
    )
        .into_response()
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD && method != Method::OPTIONS {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
        response.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, OPTIONS"),
        );
        return response;
    }
    let host = host_of(&req);
    let (tenant, path) = match route(&inner, host.as_deref(), req.uri().path()) {
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
    serve_entry(
        &inner,
        &tenant,
        entry,
        req.headers(),
        method == Method::HEAD,
    )
    .await
}

fn preflight(tenant: &TenantState) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
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
    let mut put = |name: header::HeaderName, value: &str| {
        if !value.is_empty()
            && let Ok(value) = HeaderValue::from_str(value)
        {
            headers.insert(name, value);
        }
    };
    put(header::ETAG, &entry.etag);
    put(header::CACHE_CONTROL, &entry.cache_control);
    if let Some(modified) = last_modified(entry) {
        put(header::LAST_MODIFIED, &httpdate::fmt_http_date(modified));
    }
    let digest = base64::engine::general_purpose::STANDARD.encode(entry.sha256);
    put(
        header::HeaderName::from_static("repr-digest"),
        &format!("sha-256=:{digest}:"),
    );
    if let Some(origin) = &tenant.allow_origin {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("repr-digest, etag, content-length, content-range"),
        );
    }
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
        let mut response = StatusCode::NOT_MODIFIED.into_response();
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
        usage.budget_rejections.add(1);
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut response = plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "egress budget of this arrangement exhausted",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        return response;
    }

    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes");
    if let Some(value) = header_value(&entry.content_type) {
        builder = builder.header(header::CONTENT_TYPE, value);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{}", start + len - 1, entry.size),
        );
    }
    if let Some(headers) = builder.headers_mut() {
        object_headers(headers, tenant, entry);
    }
    if head {
        // Everything a HEAD answers is in the manifest: no origin fetch.
        return builder.body(Body::empty()).unwrap_or_else(|_| internal());
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
            Object::Memory(bytes) => {
                let from = usize::try_from(start).unwrap_or(usize::MAX);
                let to = usize::try_from(start + len).unwrap_or(usize::MAX);
                let Some(slice) = (from <= to && to <= bytes.len()).then(|| bytes.slice(from..to))
                else {
                    return internal();
                };
                usage.bytes.add(len);
                Body::from(slice)
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
                    Body::from_stream(stream)
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
        let builder = builder.header(CACHE_HEADER, if hit { "hit" } else { "miss" });
        return builder.body(body).unwrap_or_else(|_| internal());
    }
    plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "stored object vanished, retry",
    )
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
}
