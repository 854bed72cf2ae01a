//! Fetching objects from a primary's origin (HTTP or HTTPS through hyper and rustls with the
//! ring provider), hashing the body as it streams.

use std::{sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Empty};
use hyper::{
    Request, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use sha2::{Digest as _, Sha256};

use super::{ManifestError, builder::FetchOptions};
use crate::model::UnixMs;

const USER_AGENT: &str = concat!("p2pcdn-manifest/", env!("CARGO_PKG_VERSION"));

/// What the origin answered for one object.
pub(crate) struct Fetched {
    pub size: u64,
    pub sha256: [u8; 32],
    pub content_type: Option<String>,
    pub cache_control: Option<String>,
    pub last_modified_ms: Option<UnixMs>,
}

/// One HTTP(S) client for all objects of a build (connections are pooled).
pub(crate) struct Fetcher {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    opts: FetchOptions,
    max_bytes: u64,
}

impl Fetcher {
    pub fn new(origin: &str, opts: &FetchOptions, max_bytes: u64) -> Result<Self, ManifestError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in &opts.extra_roots {
            roots
                .add(cert.clone())
                .map_err(|e| ManifestError::BadOrigin {
                    url: origin.to_owned(),
                    reason: format!("unusable extra root certificate: {e}"),
                })?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ManifestError::Fetch {
            url: origin.to_owned(),
            reason: format!("tls setup: {e}"),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(opts.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            opts: opts.clone(),
            max_bytes,
        })
    }

    /// GETs `url` within the object time limit.
    pub async fn fetch(&self, url: &str) -> Result<Fetched, ManifestError> {
        match tokio::time::timeout(self.opts.object_timeout, self.fetch_inner(url)).await {
            Ok(result) => result,
            Err(_) => Err(fetch_err(
                url,
                format!("not complete within {}", seconds(self.opts.object_timeout)),
            )),
        }
    }

    async fn fetch_inner(&self, url: &str) -> Result<Fetched, ManifestError> {
        let uri: hyper::Uri = url.parse().map_err(|e| ManifestError::BadOrigin {
            url: url.to_owned(),
            reason: format!("invalid url: {e}"),
        })?;
        let request = Request::get(uri)
            .header(header::USER_AGENT, USER_AGENT)
            // The manifest vouches for the bytes of an identity response: never a compressed
            // variant.
            .header(header::ACCEPT_ENCODING, "identity")
            .body(Empty::<Bytes>::new())
            .map_err(|e| fetch_err(url, format!("cannot build the request: {e}")))?;
        let response =
            match tokio::time::timeout(self.opts.response_timeout, self.client.request(request))
                .await
            {
                Ok(Ok(response)) => response,
                Ok(Err(e)) => return Err(fetch_err(url, chain(&e))),
                Err(_) => {
                    return Err(fetch_err(
                        url,
                        format!("no response within {}", seconds(self.opts.response_timeout)),
                    ));
                }
            };
        let status = response.status();
        if status != StatusCode::OK {
            return Err(ManifestError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
            });
        }
        let headers = response.headers();
        let text = |name: header::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_owned())
        };
        if let Some(encoding) = text(header::CONTENT_ENCODING)
            && !encoding.eq_ignore_ascii_case("identity")
        {
            return Err(fetch_err(
                url,
                format!("the origin sent content-encoding {encoding:?} though asked for identity"),
            ));
        }
        if let Some(length) = text(header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok())
            && length > self.max_bytes
        {
            return Err(ManifestError::ObjectTooLarge {
                location: url.to_owned(),
                size: length,
                limit: self.max_bytes,
            });
        }
        let content_type = text(header::CONTENT_TYPE);
        let cache_control = text(header::CACHE_CONTROL);
        let last_modified_ms = text(header::LAST_MODIFIED)
            .and_then(|v| httpdate::parse_http_date(&v).ok())
            .and_then(super::builder::ms_of);
        let (size, sha256) = self.hash_body(url, response.into_body()).await?;
        Ok(Fetched {
            size,
            sha256,
            content_type,
            cache_control,
            last_modified_ms,
        })
    }

    async fn hash_body(
        &self,
        url: &str,
        mut body: Incoming,
    ) -> Result<(u64, [u8; 32]), ManifestError> {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let frame = match tokio::time::timeout(self.opts.idle_timeout, body.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(e))) => return Err(fetch_err(url, format!("body: {}", chain(&e)))),
                Ok(None) => break,
                Err(_) => {
                    return Err(fetch_err(
                        url,
                        format!(
                            "body stalled for {} after {size} bytes",
                            seconds(self.opts.idle_timeout)
                        ),
                    ));
                }
            };
            if let Ok(data) = frame.into_data() {
                size = size.saturating_add(data.len() as u64);
                if size > self.max_bytes {
                    return Err(ManifestError::ObjectTooLarge {
                        location: url.to_owned(),
                        size,
                        limit: self.max_bytes,
                    });
                }
                hasher.update(&data);
            }
        }
        Ok((size, hasher.finalize().into()))
    }
}

fn fetch_err(url: &str, reason: impl Into<String>) -> ManifestError {
    ManifestError::Fetch {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

/// An error and its sources on one line (hyper's own message alone says little, e.g.
/// "client error (Connect)").
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = inner.source();
    }
    super::one_line(&parts.join(": "))
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
