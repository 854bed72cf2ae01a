//! Shared pieces of the surrogate tests: a test origin on 127.0.0.1 that counts its requests
//! and can tamper, hang or trickle; signed manifests; a surrogate on an ephemeral port; an
//! HTTP client.
#![allow(dead_code, reason = "each test binary uses a part of this module")]

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use p2pcdn_controller::{
    identity::NodeIdentity,
    manifest::{self, Entry, Manifest, SignedManifest},
    model::now_ms,
    surrogate::{Budgets, Surrogate, SurrogateConfig, Tenant},
};
use tokio::sync::oneshot;

/// How the test origin answers for one path.
#[derive(Clone)]
pub enum Behaviour {
    /// The bytes.
    Serve(Bytes),
    /// The bytes, after waiting (so concurrent misses overlap).
    Delayed(Bytes, Duration),
    /// Never answers.
    Hang,
    /// Sends the headers and a first piece, then stalls.
    StallBody(Bytes),
    /// A generated body of `size` bytes (see [`generated_chunk`]), never held whole.
    Generated(u64),
    /// A status without body.
    Status(u16),
}

/// The test origin.
#[derive(Clone, Default)]
pub struct Origin {
    objects: Arc<Mutex<HashMap<String, Behaviour>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    total: Arc<AtomicUsize>,
}

impl Origin {
    pub fn set(&self, path: &str, behaviour: Behaviour) {
        self.objects
            .lock()
            .unwrap()
            .insert(path.to_owned(), behaviour);
    }

    /// Requests the origin received for `path`.
    pub fn count(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// Serves on 127.0.0.1 (ephemeral port); returns the base URL.
    pub async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = self.router();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        format!("http://{addr}")
    }

    /// The origin as a router, to serve it some other way (TLS).
    pub fn router(&self) -> Router {
        Router::new()
            .fallback(origin_handler)
            .with_state(self.clone())
    }
}

async fn origin_handler(State(origin): State<Origin>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    origin.total.fetch_add(1, Ordering::SeqCst);
    *origin.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let behaviour = origin.objects.lock().unwrap().get(&path).cloned();
    match behaviour {
        None => StatusCode::NOT_FOUND.into_response(),
        Some(Behaviour::Serve(bytes)) => bytes.into_response(),
        Some(Behaviour::Delayed(bytes, delay)) => {
            tokio::time::sleep(delay).await;
            bytes.into_response()
        }
        Some(Behaviour::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        Some(Behaviour::StallBody(first)) => {
            let stream = async_stream(first);
            Response::new(Body::from_stream(stream))
        }
        Some(Behaviour::Generated(size)) => {
            let stream = tokio_stream::iter((0..size.div_ceil(CHUNK as u64)).map(move |i| {
                let len = (size - i * CHUNK as u64).min(CHUNK as u64) as usize;
                let mut chunk = generated_chunk(i);
                chunk.truncate(len);
                Ok::<_, std::io::Error>(Bytes::from(chunk))
            }));
            let mut response = Response::new(Body::from_stream(stream));
            response
                .headers_mut()
                .insert("content-length", size.to_string().parse().unwrap());
            response
        }
        Some(Behaviour::Status(code)) => StatusCode::from_u16(code).unwrap().into_response(),
    }
}

fn async_stream(first: Bytes) -> impl tokio_stream::Stream<Item = Result<Bytes, std::io::Error>> {
    use tokio_stream::StreamExt;
    tokio_stream::once(Ok(first)).chain(tokio_stream::pending())
}

pub const CHUNK: usize = 64 * 1024;

/// Piece `i` of a generated object: a fixed pseudo-random block with the piece number in
/// its first bytes (different pieces, no big buffer).
pub fn generated_chunk(i: u64) -> Vec<u8> {
    static BLOCK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let mut block = BLOCK
        .get_or_init(|| {
            let mut block = Vec::with_capacity(CHUNK);
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            while block.len() < CHUNK {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                block.extend_from_slice(&x.to_le_bytes());
            }
            block
        })
        .clone();
    block[..8].copy_from_slice(&i.to_le_bytes());
    block
}

/// SHA-256 of a generated object of `size` bytes, computed piece by piece.
pub fn generated_sha256(size: u64) -> [u8; 32] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for i in 0..size.div_ceil(CHUNK as u64) {
        let chunk = generated_chunk(i);
        let len = (size - i * CHUNK as u64).min(CHUNK as u64) as usize;
        context.update(&chunk[..len]);
    }
    context.finish().as_ref().try_into().unwrap()
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .try_into()
        .unwrap()
}

pub fn primary_identity() -> NodeIdentity {
    NodeIdentity::generate("primary", "Primary Org", &[]).unwrap()
}

pub fn entry(path: &str, bytes: &[u8]) -> Entry {
    entry_with(path, bytes.len() as u64, sha256(bytes))
}

pub fn entry_with(path: &str, size: u64, sha: [u8; 32]) -> Entry {
    Entry {
        path: path.to_owned(),
        size,
        sha256: sha,
        content_type: "text/plain".to_owned(),
        etag: manifest::etag_of(&sha),
        cache_control: "public, max-age=60".to_owned(),
        last_modified_ms: Some(1_700_000_000_000),
    }
}

pub fn manifest(id: &NodeIdentity, origin: &str, entries: Vec<Entry>) -> Manifest {
    Manifest {
        primary: id.fingerprint,
        service: "www".to_owned(),
        version: 1,
        created_ms: now_ms(),
        expires_ms: now_ms() + 3_600_000,
        origin: origin.to_owned(),
        hot: entries.iter().map(|e| e.path.clone()).collect(),
        entries: entries
            .into_iter()
            .map(|e| (e.path.clone(), e))
            .collect::<BTreeMap<_, _>>(),
    }
}

pub fn sign(id: &NodeIdentity, m: &Manifest) -> SignedManifest {
    manifest::sign(id, m)
}

pub fn encode(s: &SignedManifest) -> Vec<u8> {
    manifest::encode_signed(s)
}

pub fn budgets() -> Budgets {
    Budgets {
        max_object_bytes: 16 << 20,
        total_bytes: 64 << 20,
        egress_bytes_per_s: 1 << 30,
        egress_burst_bytes: 1 << 30,
    }
}

pub fn tenant(id: &NodeIdentity, arrangement: &str, m: Manifest, budgets: Budgets) -> Tenant {
    Tenant {
        arrangement_id: arrangement.to_owned(),
        primary: id.fingerprint,
        primary_spki: id.spki_der.clone(),
        host_names: vec!["www.primary.test".to_owned()],
        manifest: m,
        budgets,
        allow_origin: Some("*".to_owned()),
    }
}

pub fn config(dir: &Path) -> SurrogateConfig {
    let mut cfg = SurrogateConfig::new(dir.join("cache"));
    cfg.origin_header_timeout = Duration::from_secs(2);
    cfg.origin_idle_timeout = Duration::from_secs(2);
    cfg
}

/// A surrogate serving on 127.0.0.1; dropped → stopped.
pub struct Running {
    pub surrogate: Surrogate,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub async fn start(surrogate: Surrogate) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = surrogate.clone();
        let task = tokio::spawn(async move {
            server
                .serve(listener, None, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            surrogate,
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A response read whole.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn request(
    client: &Client<HttpConnector, Empty<Bytes>>,
    method: Method,
    url: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("host", host);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(60),
        client.request(builder.body(Empty::new()).unwrap()),
    )
    .await
    .expect("surrogate answers within 60 s")
    .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// GET with the primary's host name.
pub async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    running: &Running,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    request(
        client,
        Method::GET,
        &running.url(path),
        "www.primary.test",
        headers,
    )
    .await
}
