//! Content sampling: the primary fetches objects of its own signed manifest from a provider,
//! as a client would, and checks every byte against the manifest's SHA-256.
//!
//! With direct server return the provider answers clients itself: the primary never sees the
//! bytes its clients get, so sampling is its only defence against a provider that serves
//! corrupted content, fails to serve what it claims to hold, or serves it slowly.
//!
//! A sample is one HTTP/1.1 `GET` to the provider's advertised surrogate, sent the way a
//! client's request reaches it: with the service's host name in `Host` (the surrogate routes
//! tunnelled connections by `Host`), or under `/<primary id>/<path>` (the redirect path) when
//! the service has no host name. A whole object is hashed as it streams (memory stays
//! bounded); a `Range` slice of a larger object is compared with the same slice from the
//! primary's own origin. The verdict:
//!
//! - **Verified**: status 200 (206 for a slice), the size and the SHA-256 match;
//! - **Corrupted**: an answer whose length or bytes differ from what the manifest signs —
//!   evidence of dishonesty, never of slowness;
//! - **Unavailable**: no answer in time, a refused connection, a 404 for an object the
//!   manifest lists (content the provider claims but does not serve), a 5xx.
//!
//! How often: [`Budget`] keeps sampling under a share (default 1 %) of the connections
//! steered to the provider, with a slow floor for idle and candidate providers so they are
//! vetted before they carry traffic.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, StatusCode, body::Bytes, header};
use hyper_util::rt::TokioIo;
use ring::digest::{Context, SHA256};
use serde::Serialize;
use tokio::net::TcpStream;

use crate::{
    manifest::{Entry, Manifest},
    model::{Fingerprint, UnixMs, now_ms},
};

/// Largest response body read for one sample (a slice is asked for beyond it).
pub const MAX_SAMPLE_BYTES: u64 = 4 << 20;
/// Length of a `Range` slice of an object larger than [`MAX_SAMPLE_BYTES`].
pub const SLICE_BYTES: u64 = 256 << 10;

/// What one sample found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", content = "detail", rename_all = "snake_case")]
pub enum Verdict {
    Verified,
    Corrupted(String),
    Unavailable(String),
}

/// One sample, with what a reputation needs: the verdict, time to the response head, bytes
/// read and the throughput of the body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// Unique in this process (evidence ids in decisions refer to it).
    pub id: u64,
    /// The provider.
    pub peer: Fingerprint,
    pub url: String,
    pub path: String,
    /// `(first, last)` byte of a slice, inclusive.
    pub range: Option<(u64, u64)>,
    pub verdict: Verdict,
    /// Time to the response head, ms.
    pub latency_ms: f64,
    pub bytes: u64,
    /// Body bytes per second (0 for an empty or failed body).
    pub throughput_bytes_per_s: f64,
    pub at_ms: UnixMs,
}

/// Where and how to sample one provider for one service.
#[derive(Debug, Clone)]
pub struct Target {
    pub peer: Fingerprint,
    /// The provider's advertised surrogate, `http://host:port[/prefix]`.
    pub surrogate_url: String,
    /// The service's first host name, if it has one.
    pub host: Option<String>,
    /// The primary's own node id (the redirect path's first segment).
    pub primary: Fingerprint,
}

impl Target {
    /// The URL and `Host` a client's request for `path` would carry.
    pub fn request_for(&self, path: &str) -> (String, Option<String>) {
        let base = self.surrogate_url.trim_end_matches('/');
        match &self.host {
            Some(host) => (format!("{base}{path}"), Some(host.clone())),
            None => (format!("{base}/{}{path}", self.primary), None),
        }
    }
}

/// Picks what to sample from `manifest`: an entry, and for one larger than
/// [`MAX_SAMPLE_BYTES`] a slice of it, from a caller-supplied random number.
pub fn pick(manifest: &Manifest, random: u64) -> Option<(&Entry, Option<(u64, u64)>)> {
    let n = manifest.entries.len();
    if n == 0 {
        return None;
    }
    let index = usize::try_from(random % n as u64).unwrap_or(0);
    let entry = manifest.entries.values().nth(index)?;
    if entry.size <= MAX_SAMPLE_BYTES {
        return Some((entry, None));
    }
    let slices = entry.size.div_ceil(SLICE_BYTES);
    let first = (random / n as u64 % slices) * SLICE_BYTES;
    let last = (first + SLICE_BYTES).min(entry.size) - 1;
    Some((entry, Some((first, last))))
}

/// Fetches `entry` (or its `range`) from `target` and checks it. `reference` is the slice's
/// SHA-256 from the primary's own origin, required for a range. Never panics on any answer.
pub async fn sample(
    id: u64,
    target: &Target,
    entry: &Entry,
    range: Option<(u64, u64)>,
    reference: Option<[u8; 32]>,
    timeout: Duration,
) -> Sample {
    let (url, host) = target.request_for(&entry.path);
    let started = Instant::now();
    let mut latency = None;
    let outcome = tokio::time::timeout(
        timeout,
        fetch(&url, host.as_deref(), range, entry, &mut latency),
    )
    .await;
    let elapsed = started.elapsed();
    let (verdict, bytes) = match outcome {
        Err(_) => (
            Verdict::Unavailable(format!(
                "no complete answer within {} ms",
                timeout.as_millis()
            )),
            0,
        ),
        Ok(Err(Failure::Unavailable(why))) => (Verdict::Unavailable(why), 0),
        Ok(Err(Failure::Corrupted(why, bytes))) => (Verdict::Corrupted(why), bytes),
        Ok(Ok(Body { digest, bytes })) => (judge(entry, range, reference, digest, bytes), bytes),
    };
    let latency = latency.unwrap_or(elapsed);
    let body_time = elapsed.saturating_sub(latency).as_secs_f64();
    Sample {
        id,
        peer: target.peer,
        url,
        path: entry.path.clone(),
        range,
        verdict,
        latency_ms: latency.as_secs_f64() * 1000.0,
        bytes,
        throughput_bytes_per_s: if bytes == 0 || body_time <= 0.0 {
            0.0
        } else {
            bytes as f64 / body_time
        },
        at_ms: now_ms(),
    }
}

fn judge(
    entry: &Entry,
    range: Option<(u64, u64)>,
    reference: Option<[u8; 32]>,
    digest: [u8; 32],
    bytes: u64,
) -> Verdict {
    match range {
        None if bytes != entry.size => Verdict::Corrupted(format!(
            "{} bytes for an object of {} in the manifest",
            bytes, entry.size
        )),
        None if digest != entry.sha256 => Verdict::Corrupted(format!(
            "SHA-256 {} differs from the manifest's {}",
            hex::encode(digest),
            hex::encode(entry.sha256)
        )),
        None => Verdict::Verified,
        Some((first, last)) => {
            let want = last - first + 1;
            if bytes != want {
                Verdict::Corrupted(format!("{bytes} bytes for a slice of {want}"))
            } else {
                match reference {
                    Some(r) if r == digest => Verdict::Verified,
                    Some(_) => {
                        Verdict::Corrupted(format!("bytes {first}-{last} differ from the origin's"))
                    }
                    // Nothing to compare with: only the length could be checked.
                    None => Verdict::Verified,
                }
            }
        }
    }
}

struct Body {
    digest: [u8; 32],
    bytes: u64,
}

enum Failure {
    Unavailable(String),
    /// With the bytes read before the mismatch showed.
    Corrupted(String, u64),
}

async fn fetch(
    url: &str,
    host: Option<&str>,
    range: Option<(u64, u64)>,
    entry: &Entry,
    latency: &mut Option<Duration>,
) -> Result<Body, Failure> {
    let started = Instant::now();
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| Failure::Unavailable(format!("bad url {url:?}: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(Failure::Unavailable(format!(
            "{url}: only http:// surrogates are sampled"
        )));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| Failure::Unavailable(format!("{url}: no host")))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host().trim_matches(['[', ']']), port))
        .await
        .map_err(|e| Failure::Unavailable(format!("connect {authority}: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Failure::Unavailable(format!("{authority}: {e}")))?;
    let driver = tokio::spawn(conn);
    let mut request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, host.unwrap_or(authority.as_str()))
        .header(header::USER_AGENT, "p2pcdn-sampler");
    if let Some((first, last)) = range {
        request = request.header(header::RANGE, format!("bytes={first}-{last}"));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| Failure::Unavailable(format!("{authority}: {e}")))?;
        *latency = Some(started.elapsed());
        let status = response.status();
        let expected = if range.is_some() {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        };
        if status == StatusCode::NOT_FOUND {
            return Err(Failure::Unavailable(format!(
                "404 for {}, which the manifest lists",
                entry.path
            )));
        }
        if status != expected {
            return Err(Failure::Unavailable(format!(
                "status {status} (expected {expected})"
            )));
        }
        let limit = match range {
            Some((first, last)) => last - first + 1,
            None => entry.size,
        };
        let mut body = response.into_body();
        let mut context = Context::new(&SHA256);
        let mut bytes: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Failure::Unavailable(format!("body: {e}")))?;
            if let Some(data) = frame.data_ref() {
                bytes += data.len() as u64;
                if bytes > limit {
                    return Err(Failure::Corrupted(
                        format!("more than the {limit} bytes the manifest signs"),
                        bytes,
                    ));
                }
                context.update(data);
            }
        }
        let mut digest = [0_u8; 32];
        digest.copy_from_slice(context.finish().as_ref());
        Ok(Body { digest, bytes })
    }
    .await;
    driver.abort();
    result
}

/// The SHA-256 of bytes `range` of `path` at the primary's own origin (`origin`, the
/// manifest's base URL): the reference a provider's slice is compared with.
pub async fn origin_digest(
    origin: &str,
    path: &str,
    range: (u64, u64),
    timeout: Duration,
) -> Result<[u8; 32], String> {
    let url = format!("{}{path}", origin.trim_end_matches('/'));
    let want = Entry {
        path: path.to_owned(),
        size: range.1 - range.0 + 1,
        sha256: [0; 32],
        content_type: String::new(),
        etag: String::new(),
        cache_control: String::new(),
        last_modified_ms: None,
    };
    let mut latency = None;
    match tokio::time::timeout(timeout, fetch(&url, None, Some(range), &want, &mut latency)).await {
        Ok(Ok(body)) if body.bytes == want.size => Ok(body.digest),
        Ok(Ok(body)) => Err(format!(
            "the origin sent {} bytes for a slice of {}",
            body.bytes, want.size
        )),
        Ok(Err(Failure::Unavailable(e) | Failure::Corrupted(e, _))) => Err(e),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// How many samples a provider gets: at most `share` of the connections steered to it, and
/// one every `idle_every` when it carries little or nothing (candidates and idle standbys are
/// vetted too).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub share: f64,
    pub idle_every: Duration,
}

impl Default for Budget {
    /// 1 % of steered connections (documented target: under 1 % of steered traffic), and one
    /// sample every 5 s for idle providers.
    fn default() -> Self {
        Self {
            share: 0.01,
            idle_every: Duration::from_secs(5),
        }
    }
}

impl Budget {
    /// Samples due for a provider that was steered `steered` connections since the last
    /// sample `since` ago: 1 if the share of those connections reaches one sample or the
    /// idle interval passed, else 0.
    pub fn due(&self, steered: u64, since: Duration) -> bool {
        steered as f64 * self.share >= 1.0 || since >= self.idle_every
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use std::collections::BTreeMap;

    use axum::{
        Router,
        http::{HeaderMap, StatusCode},
        routing::get,
    };

    use super::*;

    fn entry(path: &str, body: &[u8]) -> Entry {
        let mut sha = [0_u8; 32];
        sha.copy_from_slice(ring::digest::digest(&SHA256, body).as_ref());
        Entry {
            path: path.to_owned(),
            size: body.len() as u64,
            sha256: sha,
            content_type: "text/plain".to_owned(),
            etag: format!("\"{}\"", hex::encode(sha)),
            cache_control: String::new(),
            last_modified_ms: None,
        }
    }

    /// A surrogate that answers `body` for every path, and the Host it saw.
    async fn surrogate(
        status: StatusCode,
        body: Vec<u8>,
    ) -> (String, tokio::sync::mpsc::Receiver<String>) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(get(move |headers: HeaderMap| {
            let tx = tx.clone();
            let body = body.clone();
            async move {
                let host = headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let _ = tx.send(host).await;
                (status, body)
            }
        }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), rx)
    }

    fn target(url: String, host: Option<&str>) -> Target {
        Target {
            peer: Fingerprint([1; 32]),
            surrogate_url: url,
            host: host.map(str::to_owned),
            primary: Fingerprint([2; 32]),
        }
    }

    const T: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn the_right_bytes_verify_and_the_request_looks_like_a_clients() {
        let e = entry("/a.css", b"body { color: red }");
        let (url, mut hosts) = surrogate(StatusCode::OK, b"body { color: red }".to_vec()).await;
        let s = sample(1, &target(url, Some("shop.test")), &e, None, None, T).await;
        assert_eq!(s.verdict, Verdict::Verified, "{s:?}");
        assert_eq!(s.bytes, 19);
        assert!(s.url.ends_with("/a.css"), "{}", s.url);
        assert_eq!(hosts.recv().await.unwrap(), "shop.test");
    }

    #[tokio::test]
    async fn tampered_or_truncated_bytes_are_corruption() {
        let e = entry("/a.css", b"body { color: red }");
        let (url, _h) = surrogate(StatusCode::OK, b"body { color: RED }".to_vec()).await;
        let s = sample(1, &target(url, None), &e, None, None, T).await;
        assert!(
            matches!(&s.verdict, Verdict::Corrupted(d) if d.contains("SHA-256")),
            "{s:?}"
        );
        assert!(
            s.url.contains(&Fingerprint([2; 32]).to_string()),
            "redirect path: {}",
            s.url
        );
        let (url, _h) = surrogate(StatusCode::OK, b"body".to_vec()).await;
        let s = sample(2, &target(url, None), &e, None, None, T).await;
        assert!(
            matches!(&s.verdict, Verdict::Corrupted(d) if d.contains("4 bytes")),
            "{s:?}"
        );
        let (url, _h) = surrogate(StatusCode::OK, vec![b'x'; 100]).await;
        let s = sample(3, &target(url, None), &e, None, None, T).await;
        assert!(
            matches!(&s.verdict, Verdict::Corrupted(d) if d.contains("more than")),
            "{s:?}"
        );
    }

    #[tokio::test]
    async fn missing_failing_or_absent_providers_are_unavailable_not_corrupt() {
        let e = entry("/a.css", b"x");
        let (url, _h) = surrogate(StatusCode::NOT_FOUND, Vec::new()).await;
        let s = sample(1, &target(url, None), &e, None, None, T).await;
        assert!(
            matches!(&s.verdict, Verdict::Unavailable(d) if d.contains("404")),
            "{s:?}"
        );
        let (url, _h) = surrogate(StatusCode::SERVICE_UNAVAILABLE, Vec::new()).await;
        let s = sample(2, &target(url, None), &e, None, None, T).await;
        assert!(
            matches!(&s.verdict, Verdict::Unavailable(d) if d.contains("503")),
            "{s:?}"
        );
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let s = sample(3, &target(url, None), &e, None, None, T).await;
        assert!(
            matches!(&s.verdict, Verdict::Unavailable(d) if d.contains("connect")),
            "{s:?}"
        );
        let s = sample(4, &target("ftp://x".to_owned(), None), &e, None, None, T).await;
        assert!(matches!(s.verdict, Verdict::Unavailable(_)), "{s:?}");
    }

    #[test]
    fn large_objects_are_sampled_by_slices_within_the_object() {
        let mut entries = BTreeMap::new();
        let mut big = entry("/big.bin", b"");
        big.size = 10 * MAX_SAMPLE_BYTES + 17;
        entries.insert(big.path.clone(), big.clone());
        let manifest = Manifest {
            primary: Fingerprint([2; 32]),
            service: "web".to_owned(),
            version: 1,
            created_ms: 0,
            expires_ms: 1,
            origin: "http://o".to_owned(),
            entries,
            hot: Vec::new(),
        };
        for random in [0, 1, 7, 12_345, u64::MAX] {
            let (e, range) = pick(&manifest, random).unwrap();
            let (first, last) = range.unwrap();
            assert_eq!(e.path, "/big.bin");
            assert!(first <= last && last < big.size, "{first}-{last}");
            assert!(last - first < SLICE_BYTES);
        }
        let empty = Manifest {
            entries: BTreeMap::new(),
            ..manifest
        };
        assert!(pick(&empty, 3).is_none());
    }

    #[test]
    fn the_budget_is_a_share_of_steered_connections_with_an_idle_floor() {
        let b = Budget::default();
        assert!(
            !b.due(99, Duration::from_secs(1)),
            "99 connections: under 1 %"
        );
        assert!(b.due(100, Duration::from_millis(10)));
        assert!(
            b.due(0, Duration::from_secs(5)),
            "idle providers are vetted too"
        );
        assert!(!b.due(0, Duration::from_secs(4)));
    }

    #[tokio::test]
    async fn a_slice_is_checked_against_the_origins_same_slice() {
        use axum::http::HeaderMap;
        // Both serve ranges of their body; the "provider" flips one byte of its copy.
        async fn ranged(body: Vec<u8>) -> String {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let app = Router::new().fallback(get(move |headers: HeaderMap| {
                let body = body.clone();
                async move {
                    let range = headers
                        .get(header::RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("bytes="))
                        .and_then(|v| v.split_once('-'))
                        .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                    match range {
                        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, body[a..=b].to_vec()),
                        None => (StatusCode::OK, body),
                    }
                }
            }));
            tokio::spawn(async move { axum::serve(listener, app).await });
            format!("http://{addr}")
        }
        let original: Vec<u8> = (0..2000_u32).map(|i| (i % 251) as u8).collect();
        let mut tampered = original.clone();
        tampered[1500] ^= 0xff;
        let origin = ranged(original.clone()).await;
        let mut e = entry("/big.bin", &original);
        e.size = original.len() as u64;
        for (provider_body, range, good) in [
            (original.clone(), (1000, 1999), true),
            (tampered.clone(), (1000, 1999), false),
            (tampered, (0, 999), true),
        ] {
            let provider = ranged(provider_body).await;
            let reference = origin_digest(&origin, "/big.bin", range, T).await.unwrap();
            let s = sample(
                1,
                &target(provider, None),
                &e,
                Some(range),
                Some(reference),
                T,
            )
            .await;
            if good {
                assert_eq!(s.verdict, Verdict::Verified, "{range:?} {s:?}");
            } else {
                assert!(
                    matches!(&s.verdict, Verdict::Corrupted(d) if d.contains("differ from the origin")),
                    "{s:?}"
                );
            }
        }
    }
}
