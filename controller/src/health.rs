//! Data-path health of providers, seen from the primary.
//!
//! Every `interval` the primary probes each provider of an active arrangement: an HTTP `HEAD`
//! of `<surrogate_url>/<primary id>/` on the provider's advertised surrogate (a real TCP
//! connection and HTTP exchange with the process that serves the clients), or, when the
//! provider advertises no surrogate, a TCP connection to its control endpoint. An answer of
//! any status below 500 within `timeout` is healthy (a 404 still proves the surrogate is
//! serving; whether the content is right is what sampling checks).
//!
//! `failures` failed probes in a row make the arrangement *degraded*: its Maglev weight goes
//! to 0 (new flows go elsewhere, established ones stay), the SLA breach is counted for the
//! settlement, and the lost capacity is asked for again. A degraded arrangement whose probes
//! succeed again gets its weight back; one still degraded after `grace` is disbanded for the
//! breach. With the defaults (250 ms, 2 failures, 300 ms timeout) a dead provider leaves the
//! Maglev table within about 0.8 s.

use std::time::{Duration, Instant};

use http_body_util::Empty;
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How providers are probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed probes in a row before the arrangement is degraded.
    pub failures: u32,
    /// How long an arrangement may stay degraded before it is disbanded for the breach.
    pub grace: Duration,
}

impl Default for ProbeSettings {
    /// 250 ms, 300 ms timeout, 2 failures, 10 s grace.
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(250),
            timeout: Duration::from_millis(300),
            failures: 2,
            grace: Duration::from_secs(10),
        }
    }
}

/// What to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `HEAD` of this URL (`http://host:port/path`).
    Http { url: String },
    /// A TCP connection to `host:port`.
    Tcp { endpoint: String },
}

/// One probe: `Ok(round trip)` when healthy, `Err(why)` otherwise (never panics on any
/// answer).
pub async fn probe(target: &Target, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let work = async {
        match target {
            Target::Tcp { endpoint } => TcpStream::connect(endpoint.as_str())
                .await
                .map(|_| ())
                .map_err(|e| format!("connect {endpoint}: {e}")),
            Target::Http { url } => head(url).await,
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

async fn head(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad url {url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url}: only http:// surrogates are probed"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url}: no host"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host().trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{authority}: {e}"))?;
    let driver = tokio::spawn(conn);
    let request = Request::head(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, authority.as_str())
        .header(hyper::header::USER_AGENT, "p2pcdn-probe")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let answer = sender.send_request(request).await;
    driver.abort();
    let response = answer.map_err(|e| format!("{authority}: {e}"))?;
    if response.status().is_server_error() {
        return Err(format!("{authority}: status {}", response.status()));
    }
    Ok(())
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use axum::{Router, http::StatusCode, routing::get};

    use super::*;

    async fn server(status: StatusCode, delay: Duration) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(get(move || async move {
            tokio::time::sleep(delay).await;
            status
        }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/fp/")
    }

    #[tokio::test]
    async fn answers_below_500_are_healthy_and_others_are_not() {
        let t = Duration::from_millis(500);
        for status in [StatusCode::OK, StatusCode::NOT_FOUND] {
            let url = server(status, Duration::ZERO).await;
            assert!(probe(&Target::Http { url }, t).await.is_ok(), "{status}");
        }
        let url = server(StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO).await;
        let e = probe(&Target::Http { url }, t).await.unwrap_err();
        assert!(e.contains("503"), "{e}");
        let url = server(StatusCode::OK, Duration::from_secs(2)).await;
        let e = probe(&Target::Http { url }, t).await.unwrap_err();
        assert!(e.contains("no answer within 500 ms"), "{e}");
    }

    #[tokio::test]
    async fn closed_ports_and_bad_targets_are_errors() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let t = Duration::from_millis(500);
        let e = probe(
            &Target::Tcp {
                endpoint: closed.to_string(),
            },
            t,
        )
        .await
        .unwrap_err();
        assert!(e.contains("connect"), "{e}");
        for url in ["not a url", "https://127.0.0.1:1/", "http:///x"] {
            let e = probe(
                &Target::Http {
                    url: url.to_owned(),
                },
                t,
            )
            .await
            .unwrap_err();
            assert!(!e.is_empty(), "{url}");
        }
    }
}
