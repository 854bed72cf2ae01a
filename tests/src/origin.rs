//! A capacity-limited origin web server for the testbed: the edge's own server in the
//! flash-crowd demo.
//!
//! It serves a fixed set of objects over HTTP/1.1 (hyper), names itself in `x-served-by`,
//! and behaves like a server with limited capacity: at most `workers` requests are
//! processed at once, each for a fixed `service_time`; more wait in a FIFO queue of at most
//! `queue_limit`, and beyond that they are refused at once with `503 Service Unavailable`.
//! Under overload latency therefore climbs (queueing) and then errors appear, as they do on
//! a real overloaded origin. Sustainable throughput is `workers / service_time`.
//!
//! Like [`crate::http::Server`], it runs on a current-thread tokio runtime on its own
//! thread, in the caller's network namespace ([`Origin::start`], also on loopback) or in a
//! named one ([`Origin::start_in`]).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header::HeaderValue};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::{Semaphore, oneshot};

use crate::{
    http::SERVED_BY,
    netns::{NetnsError, spawn_in_netns},
};

/// At most this long a service time.
pub const MAX_SERVICE_TIME: Duration = Duration::from_secs(60);

/// Errors of the origin server.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("origin name {0:?} is not a valid header value (use a short printable name)")]
    BadName(String),
    #[error("the origin needs at least one listening address")]
    NoAddress,
    #[error("the origin needs at least one worker")]
    ZeroWorkers,
    #[error("the origin serves no object: add at least one")]
    NoObjects,
    #[error("object path {0:?} must start with '/'")]
    BadPath(String),
    #[error("service time {0:?} is more than {max:?}", max = MAX_SERVICE_TIME)]
    BadServiceTime(Duration),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the origin thread stopped before it was ready")]
    ThreadGone,
}

/// What an origin serves and how much it can take. [`OriginConfig::new`] gives the
/// defaults.
#[derive(Clone, Debug)]
pub struct OriginConfig {
    /// Sent as `x-served-by`.
    pub name: String,
    pub addrs: Vec<SocketAddr>,
    /// Path → body.
    pub objects: BTreeMap<String, Bytes>,
    /// Requests processed at once.
    pub workers: usize,
    /// How long each request is processed.
    pub service_time: Duration,
    /// Requests waiting for a worker, at most; more are refused with 503.
    pub queue_limit: usize,
    /// Serves counters in nginx `stub_status` format on this path, outside the capacity
    /// limit (a monitor's view of the origin).
    pub status_path: Option<String>,
}

impl OriginConfig {
    /// Defaults: one object `/` (the name as body), 4 workers, 20 ms service time (so 200
    /// requests/s sustained), a queue of 64, no status path.
    pub fn new(name: &str, addrs: &[SocketAddr]) -> Self {
        Self {
            name: name.to_owned(),
            addrs: addrs.to_vec(),
            objects: BTreeMap::from([("/".to_owned(), Bytes::from(name.to_owned()))]),
            workers: 4,
            service_time: Duration::from_millis(20),
            queue_limit: 64,
            status_path: None,
        }
    }

    /// Serves `body` at `path` (replacing the default `/` object once any is added).
    pub fn object(mut self, path: &str, body: impl Into<Bytes>) -> Self {
        if self.objects.get("/").is_some_and(|b| *b == self.name) {
            self.objects.remove("/");
        }
        self.objects.insert(path.to_owned(), body.into());
        self
    }

    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    pub fn service_time(mut self, t: Duration) -> Self {
        self.service_time = t;
        self
    }

    pub fn queue_limit(mut self, n: usize) -> Self {
        self.queue_limit = n;
        self
    }

    pub fn status_path(mut self, path: &str) -> Self {
        self.status_path = Some(path.to_owned());
        self
    }

    /// Requests per second the origin sustains (`workers / service_time`); infinite for a
    /// zero service time.
    pub fn capacity(&self) -> f64 {
        self.workers as f64 / self.service_time.as_secs_f64()
    }

    pub fn validate(&self) -> Result<(), OriginError> {
        if self.name.is_empty() || HeaderValue::from_str(&self.name).is_err() {
            return Err(OriginError::BadName(self.name.clone()));
        }
        if self.addrs.is_empty() {
            return Err(OriginError::NoAddress);
        }
        if self.workers == 0 {
            return Err(OriginError::ZeroWorkers);
        }
        if self.objects.is_empty() {
            return Err(OriginError::NoObjects);
        }
        if let Some(bad) = self
            .objects
            .keys()
            .chain(self.status_path.iter())
            .find(|p| !p.starts_with('/'))
        {
            return Err(OriginError::BadPath(bad.clone()));
        }
        if self.service_time > MAX_SERVICE_TIME {
            return Err(OriginError::BadServiceTime(self.service_time));
        }
        Ok(())
    }
}

/// Counters of an [`Origin`].
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    connections: AtomicU64,
    requests: AtomicU64,
    served: AtomicU64,
    rejected: AtomicU64,
    not_found: AtomicU64,
    bytes: AtomicU64,
    in_service: AtomicU64,
    queued: AtomicU64,
    max_queued: AtomicU64,
}

/// A snapshot of an origin's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OriginStats {
    /// TCP connections accepted.
    pub accepted: u64,
    /// Connections open now.
    pub connections: u64,
    /// HTTP requests received (all of them, status requests too).
    pub requests: u64,
    /// Objects served (200).
    pub served: u64,
    /// Refused with 503 (queue full).
    pub rejected: u64,
    /// Unknown paths and methods (404, 405).
    pub not_found: u64,
    /// Body bytes of the objects served.
    pub bytes: u64,
    /// Requests being processed now.
    pub in_service: u64,
    /// Requests waiting for a worker now.
    pub queued: u64,
    /// The longest the queue has been.
    pub max_queued: u64,
}

impl Counters {
    fn snapshot(&self) -> OriginStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        OriginStats {
            accepted: get(&self.accepted),
            connections: get(&self.connections),
            requests: get(&self.requests),
            served: get(&self.served),
            rejected: get(&self.rejected),
            not_found: get(&self.not_found),
            bytes: get(&self.bytes),
            in_service: get(&self.in_service),
            queued: get(&self.queued),
            max_queued: get(&self.max_queued),
        }
    }
}

/// Counts one up while alive (also when hyper drops a request whose client went away).
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(counter: &'a AtomicU64) -> (Self, u64) {
        let now = counter.fetch_add(1, Ordering::Relaxed) + 1;
        (Self(counter), now)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct State {
    name: HeaderValue,
    objects: BTreeMap<String, Bytes>,
    workers: Arc<Semaphore>,
    service_time: Duration,
    queue_limit: u64,
    status_path: Option<String>,
    counters: Arc<Counters>,
}

/// A running origin server; stopped on drop.
#[derive(Debug)]
pub struct Origin {
    pub name: String,
    local_addrs: Vec<SocketAddr>,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), NetnsError>>>,
}

type Ready = mpsc::Sender<Result<Vec<SocketAddr>, OriginError>>;

impl Origin {
    /// Starts the origin in the calling thread's network namespace (its thread inherits
    /// it); returns once every address is bound. Port 0 picks a free port: see
    /// [`Origin::local_addrs`].
    pub fn start(config: OriginConfig) -> Result<Self, OriginError> {
        config.validate()?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let name = config.name.clone();
        let thread = {
            let counters = Arc::clone(&counters);
            std::thread::spawn(move || {
                thread_main(config, counters, ready_tx, stop_rx);
                Ok(())
            })
        };
        Self::ready(name, counters, stop_tx, thread, ready_rx)
    }

    /// Starts the origin in network namespace `ns`.
    pub fn start_in(ns: &str, config: OriginConfig) -> Result<Self, OriginError> {
        config.validate()?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let name = config.name.clone();
        let thread = {
            let counters = Arc::clone(&counters);
            spawn_in_netns(ns, move || thread_main(config, counters, ready_tx, stop_rx))
        };
        Self::ready(name, counters, stop_tx, thread, ready_rx)
    }

    fn ready(
        name: String,
        counters: Arc<Counters>,
        stop: oneshot::Sender<()>,
        thread: JoinHandle<Result<(), NetnsError>>,
        ready: mpsc::Receiver<Result<Vec<SocketAddr>, OriginError>>,
    ) -> Result<Self, OriginError> {
        match ready.recv() {
            Ok(Ok(local_addrs)) => Ok(Self {
                name,
                local_addrs,
                counters,
                stop: Some(stop),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            // The thread ended before saying anything: it could not enter the namespace.
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e.into()),
                _ => Err(OriginError::ThreadGone),
            },
        }
    }

    /// The bound addresses, in config order.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    pub fn stats(&self) -> OriginStats {
        self.counters.snapshot()
    }

    /// Stops the server and closes its connections.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop();
    }
}

fn thread_main(
    config: OriginConfig,
    counters: Arc<Counters>,
    ready: Ready,
    stop: oneshot::Receiver<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(OriginError::Runtime(e)));
            return;
        }
    };
    rt.block_on(serve(config, counters, ready, stop));
}

async fn serve(
    config: OriginConfig,
    counters: Arc<Counters>,
    ready: Ready,
    stop: oneshot::Receiver<()>,
) {
    let mut listeners = Vec::new();
    let mut local = Vec::new();
    for addr in &config.addrs {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                local.push(l.local_addr().unwrap_or(*addr));
                listeners.push(l);
            }
            Err(source) => {
                let _ = ready.send(Err(OriginError::Bind {
                    addr: *addr,
                    source,
                }));
                return;
            }
        }
    }
    let name = match HeaderValue::from_str(&config.name) {
        Ok(n) => n,
        Err(_) => {
            let _ = ready.send(Err(OriginError::BadName(config.name)));
            return;
        }
    };
    let state = Arc::new(State {
        name,
        objects: config.objects,
        workers: Arc::new(Semaphore::new(config.workers)),
        service_time: config.service_time,
        queue_limit: config.queue_limit as u64,
        status_path: config.status_path,
        counters,
    });
    let _ = ready.send(Ok(local));
    for listener in listeners {
        tokio::spawn(accept_loop(listener, Arc::clone(&state)));
    }
    // Returning drops the runtime, which cancels every task and closes every socket.
    let _ = stop.await;
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors and the like: the backlog keeps the connection, so
            // try again shortly rather than give up serving.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        state.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _open = Gauge::up(&state.counters.connections);
            let service = hyper::service::service_fn(|req| handle(req, &state));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(state: &State, status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(SERVED_BY, state.name.clone());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

async fn handle(
    req: Request<Incoming>,
    state: &State,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let counters = &state.counters;
    counters.requests.fetch_add(1, Ordering::Relaxed);
    if req.method() != Method::GET && req.method() != Method::HEAD {
        counters.not_found.fetch_add(1, Ordering::Relaxed);
        return Ok(respond(state, StatusCode::METHOD_NOT_ALLOWED, Bytes::new()));
    }
    let path = req.uri().path();
    if state.status_path.as_deref() == Some(path) {
        return Ok(respond(state, StatusCode::OK, stub_status(counters)));
    }
    let Some(body) = state.objects.get(path) else {
        counters.not_found.fetch_add(1, Ordering::Relaxed);
        return Ok(respond(state, StatusCode::NOT_FOUND, Bytes::new()));
    };
    // A worker at once, else a place in the queue, else 503. tokio's semaphore is fair: a
    // freed permit goes to the oldest waiter, and try_acquire fails while anyone waits.
    let permit = match Arc::clone(&state.workers).try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            let (_queued, depth) = Gauge::up(&counters.queued);
            if depth > state.queue_limit {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
                return Ok(respond(
                    state,
                    StatusCode::SERVICE_UNAVAILABLE,
                    Bytes::new(),
                ));
            }
            counters.max_queued.fetch_max(depth, Ordering::Relaxed);
            match Arc::clone(&state.workers).acquire_owned().await {
                Ok(permit) => permit,
                // Never closed; refuse rather than serve without capacity.
                Err(_) => {
                    counters.rejected.fetch_add(1, Ordering::Relaxed);
                    return Ok(respond(
                        state,
                        StatusCode::SERVICE_UNAVAILABLE,
                        Bytes::new(),
                    ));
                }
            }
        }
    };
    {
        let _busy = Gauge::up(&counters.in_service);
        tokio::time::sleep(state.service_time).await;
    }
    drop(permit);
    counters.served.fetch_add(1, Ordering::Relaxed);
    counters
        .bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    Ok(respond(state, StatusCode::OK, body.clone()))
}

/// nginx's `stub_status` page: Writing = requests in service, Waiting = queued.
fn stub_status(counters: &Counters) -> Bytes {
    let s = counters.snapshot();
    Bytes::from(format!(
        "Active connections: {} \nserver accepts handled requests\n {} {} {} \nReading: 0 Writing: {} Waiting: {} \n",
        s.connections, s.accepted, s.accepted, s.requests, s.in_service, s.queued
    ))
}
