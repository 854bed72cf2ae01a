//! The client towards primaries' origins: HTTP or HTTPS (rustls with ring, web PKI roots plus
//! configured anchors), HTTP/1.1 or HTTP/2 by ALPN, pooled connections, and timeouts on
//! connect, on the response headers and on every pause of the body.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{
    Request, StatusCode, Uri,
    body::Incoming,
    header::{ACCEPT_ENCODING, CONTENT_LENGTH, USER_AGENT},
};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use rustls::{ClientConfig, RootCertStore};

use super::{Entry, SurrogateConfig, SurrogateError, store::TempFile, usage::Counter};

const AGENT: &str = concat!("p2pcdn-surrogate/", env!("CARGO_PKG_VERSION"));

/// Why an origin fetch failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OriginError {
    #[error("invalid origin url {0:?}")]
    Url(String),
    #[error("origin request failed: {}", chain(.0.as_ref()))]
    Request(Arc<hyper_util::client::legacy::Error>),
    #[error("origin sent no response headers within {0:?}")]
    HeaderTimeout(Duration),
    #[error("origin body stalled for {0:?}")]
    BodyTimeout(Duration),
    #[error("origin answered status {0}")]
    Status(u16),
    #[error("origin body: {}", chain(.0.as_ref()))]
    Body(Arc<hyper::Error>),
    #[error("origin sent {got} bytes, the manifest says {expected}")]
    SizeMismatch { expected: u64, got: u64 },
    #[error("origin bytes do not match the manifest's sha-256")]
    DigestMismatch,
    #[error("origin response larger than {0} bytes")]
    TooLarge(usize),
}

/// An error and its causes on one line (hyper's errors keep the useful part in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

impl OriginError {
    /// The origin hung (504).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::HeaderTimeout(_) | Self::BodyTimeout(_))
    }

    /// The origin's bytes are not the manifest's (502, counted as a mismatch).
    pub fn is_mismatch(&self) -> bool {
        matches!(self, Self::SizeMismatch { .. } | Self::DigestMismatch)
    }
}

/// Where verified-to-be bytes go while they are hashed.
pub(crate) enum Sink<'a> {
    Memory(&'a mut Vec<u8>),
    File(&'a mut TempFile),
}

/// A failed object fetch: the origin's fault or the local sink's.
#[derive(Debug)]
pub(crate) enum FetchFailure {
    Origin(OriginError),
    Sink(std::io::Error),
}

pub(crate) struct OriginClient {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl OriginClient {
    pub(crate) fn new(cfg: &SurrogateConfig) -> Result<Self, SurrogateError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for anchor in &cfg.origin_roots {
            roots.add(anchor.clone())?;
        }
        let tls =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.origin_connect_timeout));
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(16)
            .build(https);
        Ok(Self {
            client,
            header_timeout: cfg.origin_header_timeout,
            idle_timeout: cfg.origin_idle_timeout,
        })
    }

    async fn get(&self, url: &str) -> Result<hyper::Response<Incoming>, OriginError> {
        let uri: Uri = url.parse().map_err(|_| OriginError::Url(url.to_owned()))?;
        let request = Request::get(uri)
            .header(USER_AGENT, AGENT)
            .header(ACCEPT_ENCODING, "identity")
            .body(Empty::new())
            .map_err(|_| OriginError::Url(url.to_owned()))?;
        let response = tokio::time::timeout(self.header_timeout, self.client.request(request))
            .await
            .map_err(|_| OriginError::HeaderTimeout(self.header_timeout))?
            .map_err(|e| OriginError::Request(Arc::new(e)))?;
        if response.status() != StatusCode::OK {
            return Err(OriginError::Status(response.status().as_u16()));
        }
        Ok(response)
    }

    async fn next_chunk(&self, body: &mut Incoming) -> Result<Option<Bytes>, OriginError> {
        loop {
            let frame = tokio::time::timeout(self.idle_timeout, body.frame())
                .await
                .map_err(|_| OriginError::BodyTimeout(self.idle_timeout))?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(OriginError::Body(Arc::new(e))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// A whole response body of at most `limit` bytes (manifests).
    pub(crate) async fn fetch_limited(
        &self,
        url: &str,
        limit: usize,
    ) -> Result<Vec<u8>, OriginError> {
        let response = self.get(url).await?;
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        while let Some(chunk) = self.next_chunk(&mut body).await? {
            if bytes.len() + chunk.len() > limit {
                return Err(OriginError::TooLarge(limit));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    /// Streams an object into `sink` while hashing it; succeeds only if the origin sent
    /// exactly the manifest's size and SHA-256 (more bytes than announced stop the fetch at
    /// once). The caller publishes the sink only after this returned `Ok`.
    pub(crate) async fn fetch_object(
        &self,
        url: &str,
        entry: &Entry,
        sink: &mut Sink<'_>,
        origin_bytes: &Counter,
    ) -> Result<(), FetchFailure> {
        let response = self.get(url).await.map_err(FetchFailure::Origin)?;
        if let Some(length) = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && length != entry.size
        {
            return Err(FetchFailure::Origin(OriginError::SizeMismatch {
                expected: entry.size,
                got: length,
            }));
        }
        let mut body = response.into_body();
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut total = 0_u64;
        while let Some(chunk) = self
            .next_chunk(&mut body)
            .await
            .map_err(FetchFailure::Origin)?
        {
            origin_bytes.add(chunk.len() as u64);
            total += chunk.len() as u64;
            if total > entry.size {
                return Err(FetchFailure::Origin(OriginError::SizeMismatch {
                    expected: entry.size,
                    got: total,
                }));
            }
            context.update(&chunk);
            match sink {
                Sink::Memory(buf) => buf.extend_from_slice(&chunk),
                Sink::File(file) => file.write(&chunk).await.map_err(FetchFailure::Sink)?,
            }
        }
        if total != entry.size {
            return Err(FetchFailure::Origin(OriginError::SizeMismatch {
                expected: entry.size,
                got: total,
            }));
        }
        if context.finish().as_ref() != entry.sha256 {
            return Err(FetchFailure::Origin(OriginError::DigestMismatch));
        }
        Ok(())
    }
}

/// `http(s)://host[:port][/prefix]`, no query, fragment or user info, no trailing slash.
pub(crate) fn valid_origin(origin: &str) -> bool {
    let Ok(uri) = origin.parse::<Uri>() else {
        return false;
    };
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let authority_ok = uri
        .authority()
        .is_some_and(|a| !a.as_str().contains('@') && !a.host().is_empty());
    scheme_ok
        && authority_ok
        && uri.query().is_none()
        && !origin.contains('#')
        && !origin.ends_with('/')
        && origin.len() <= 2048
}

/// The URL of an entry: the origin followed by the entry's (wire-form) path.
pub(crate) fn object_url(origin: &str, path: &str) -> String {
    format!("{origin}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert!(valid_origin("http://127.0.0.1:8080"));
        assert!(valid_origin("https://example.com/static"));
        assert!(!valid_origin("ftp://example.com"));
        assert!(!valid_origin("https://example.com/"));
        assert!(!valid_origin("https://user@example.com"));
        assert!(!valid_origin("https://example.com/a?b=c"));
        assert!(!valid_origin("/relative"));
    }
}
