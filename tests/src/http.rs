//! A test HTTP/1.1 server that names itself, and an open-loop client that records who
//! answered.
//!
//! Both run on a current-thread tokio runtime (hyper for HTTP) on a thread that entered the
//! host's network namespace first, so their sockets live in that namespace.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Request, Response, body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::netns::{NetnsError, spawn_in_netns};

/// The header naming the server that answered.
pub const SERVED_BY: &str = "x-served-by";

/// Errors of the test HTTP server and client.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error("binding {addr} in {namespace}: {source}")]
    Bind {
        addr: SocketAddr,
        namespace: String,
        source: std::io::Error,
    },
    #[error("the {0} thread stopped")]
    ThreadGone(&'static str),
}

fn runtime() -> Result<tokio::runtime::Runtime, HttpError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(HttpError::Runtime)
}

/// Counters of a [`Server`].
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// TCP connections accepted.
    pub accepted: AtomicU64,
    /// HTTP requests answered.
    pub requests: AtomicU64,
}

/// An HTTP/1.1 server (keep-alive) that answers every request with `200`, its name as the
/// body and an `x-served-by: <name>` header. Stopped on drop.
#[derive(Debug)]
pub struct Server {
    pub name: String,
    counters: Arc<ServerCounters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), NetnsError>>>,
}

impl Server {
    /// Starts the server in namespace `ns`, listening on every address of `addrs`; returns
    /// once they are all bound.
    pub fn start(ns: &str, name: &str, addrs: &[SocketAddr]) -> Result<Self, HttpError> {
        let counters = Arc::new(ServerCounters::default());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), HttpError>>();
        let thread = {
            let counters = Arc::clone(&counters);
            let name = name.to_owned();
            let addrs = addrs.to_vec();
            let ns_name = ns.to_owned();
            spawn_in_netns(ns, move || {
                let rt = match runtime() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(serve(name, ns_name, addrs, counters, ready_tx, stop_rx));
            })
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                name: name.to_owned(),
                counters,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            // The thread ended before saying anything: it could not enter the namespace.
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e.into()),
                _ => Err(HttpError::ThreadGone("server")),
            },
        }
    }

    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
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

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(
    name: String,
    namespace: String,
    addrs: Vec<SocketAddr>,
    counters: Arc<ServerCounters>,
    ready: mpsc::Sender<Result<(), HttpError>>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut listeners = Vec::new();
    for addr in addrs {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => listeners.push(l),
            Err(source) => {
                let _ = ready.send(Err(HttpError::Bind {
                    addr,
                    namespace,
                    source,
                }));
                return;
            }
        }
    }
    let _ = ready.send(Ok(()));
    let body = Bytes::from(name.clone());
    for listener in listeners {
        tokio::spawn(accept_loop(
            listener,
            name.clone(),
            body.clone(),
            Arc::clone(&counters),
        ));
    }
    // Returning drops the runtime, which cancels every task and closes every socket.
    let _ = (&mut stop).await;
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    name: String,
    body: Bytes,
    counters: Arc<ServerCounters>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        let counters = Arc::clone(&counters);
        let name = name.clone();
        let body = body.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                counters.requests.fetch_add(1, Ordering::Relaxed);
                let response = Response::builder()
                    .header(SERVED_BY, name.as_str())
                    .body(Full::new(body.clone()));
                async move { response }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .header_read_timeout(None)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// What happened to one connection (or one request on a kept connection).
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Position in the plan (or in the list of kept connections for reuses).
    pub index: usize,
    /// When the connection was started, from the start of the plan.
    pub at: Duration,
    /// The client's address of the connection, once connected.
    pub local: Option<SocketAddr>,
    /// The server's name, or what went wrong.
    pub result: Result<String, String>,
    /// From the start of `connect` (or of the request, for reuses) to the end of the body.
    pub latency: Duration,
    /// Set when the connection was kept open for later requests ([`Client::reuse`]).
    pub kept: Option<KeptId>,
}

/// A connection kept open by [`Client::load`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeptId(pub u64);

/// An open-loop load: `connections` connections started at a fixed rate over `over`
/// (whatever the answers), one request each.
#[derive(Clone, Debug)]
pub struct LoadPlan {
    pub target: SocketAddr,
    pub connections: usize,
    pub over: Duration,
    /// Keep up to this many connections per answering server open (the first ones that
    /// answer), for [`Client::reuse`]; the others are closed after their answer.
    pub keep_per_server: usize,
    /// Per-connection deadline (connect, request and answer).
    pub timeout: Duration,
}

impl LoadPlan {
    pub fn new(target: SocketAddr, connections: usize, over: Duration) -> Self {
        Self {
            target,
            connections,
            over,
            keep_per_server: 0,
            timeout: Duration::from_secs(5),
        }
    }

    pub fn keep_per_server(mut self, n: usize) -> Self {
        self.keep_per_server = n;
        self
    }
}

/// The outcomes of a load, in plan order.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub outcomes: Vec<Outcome>,
    /// From the first connection's start to the last answer.
    pub elapsed: Duration,
}

impl LoadReport {
    /// Answers per server name.
    pub fn served_by(&self) -> BTreeMap<String, usize> {
        count_servers(&self.outcomes)
    }

    /// Number of answers from `server`.
    pub fn count(&self, server: &str) -> usize {
        self.served_by().get(server).copied().unwrap_or(0)
    }

    pub fn errors(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.result.is_err()).collect()
    }

    /// Kept connections and who answered on them.
    pub fn kept(&self) -> Vec<(KeptId, String)> {
        self.outcomes
            .iter()
            .filter_map(|o| Some((o.kept?, o.result.clone().ok()?)))
            .collect()
    }

    /// The `p`-th percentile (0-100) of the latency of answered connections.
    pub fn latency_percentile(&self, p: f64) -> Option<Duration> {
        let mut latencies: Vec<Duration> = self
            .outcomes
            .iter()
            .filter(|o| o.result.is_ok())
            .map(|o| o.latency)
            .collect();
        latencies.sort();
        let last = latencies.len().checked_sub(1)?;
        let rank = ((p / 100.0) * last as f64).round() as usize;
        latencies.get(rank.min(last)).copied()
    }
}

/// Answers per server name of `outcomes`.
pub fn count_servers(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for o in outcomes {
        if let Ok(name) = &o.result {
            *counts.entry(name.clone()).or_insert(0) += 1;
        }
    }
    counts
}

enum Command {
    Load {
        plan: LoadPlan,
        progress: mpsc::Sender<Outcome>,
        done: oneshot::Sender<LoadReport>,
    },
    Reuse {
        ids: Vec<KeptId>,
        timeout: Duration,
        done: oneshot::Sender<Vec<Outcome>>,
    },
    Close {
        ids: Vec<KeptId>,
    },
}

/// An HTTP client living in one namespace, which keeps some connections open between loads.
#[derive(Debug)]
pub struct Client {
    commands: Option<tmpsc::UnboundedSender<Command>>,
    thread: Option<JoinHandle<Result<(), NetnsError>>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Load { plan, .. } => write!(f, "Load({plan:?})"),
            Self::Reuse { ids, .. } => write!(f, "Reuse({ids:?})"),
            Self::Close { ids } => write!(f, "Close({ids:?})"),
        }
    }
}

impl Client {
    /// Starts the client's thread in namespace `ns`.
    pub fn start(ns: &str) -> Result<Self, HttpError> {
        let (tx, rx) = tmpsc::unbounded_channel();
        let thread = spawn_in_netns(ns, move || {
            if let Ok(rt) = runtime() {
                rt.block_on(client_loop(rx));
            }
        });
        Ok(Self {
            commands: Some(tx),
            thread: Some(thread),
        })
    }

    fn send(&self, command: Command) -> Result<(), HttpError> {
        self.commands
            .as_ref()
            .and_then(|c| c.send(command).ok())
            .ok_or(HttpError::ThreadGone("client"))
    }

    /// Runs `plan`, calling `on_outcome` for each connection as it completes (in completion
    /// order), and returns all outcomes in plan order.
    pub fn load(
        &self,
        plan: LoadPlan,
        mut on_outcome: impl FnMut(&Outcome),
    ) -> Result<LoadReport, HttpError> {
        let (progress, progress_rx) = mpsc::channel();
        let (done, mut done_rx) = oneshot::channel();
        self.send(Command::Load {
            plan,
            progress,
            done,
        })?;
        loop {
            match progress_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(outcome) => on_outcome(&outcome),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // The sender is dropped once every connection is done.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if let Ok(report) = done_rx.try_recv() {
                while let Ok(outcome) = progress_rx.try_recv() {
                    on_outcome(&outcome);
                }
                return Ok(report);
            }
        }
        done_rx
            .blocking_recv()
            .map_err(|_| HttpError::ThreadGone("client"))
    }

    /// Sends one more request on each kept connection of `ids` (outcome `index` = position
    /// in `ids`); a connection that fails is closed.
    pub fn reuse(&self, ids: &[KeptId], timeout: Duration) -> Result<Vec<Outcome>, HttpError> {
        let (done, done_rx) = oneshot::channel();
        self.send(Command::Reuse {
            ids: ids.to_vec(),
            timeout,
            done,
        })?;
        done_rx
            .blocking_recv()
            .map_err(|_| HttpError::ThreadGone("client"))
    }

    /// Closes kept connections.
    pub fn close(&self, ids: &[KeptId]) -> Result<(), HttpError> {
        self.send(Command::Close { ids: ids.to_vec() })
    }

    /// Closes every connection and stops the thread.
    pub fn stop(&mut self) {
        self.commands = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop();
    }
}

type Sender = SendRequest<Empty<Bytes>>;

async fn client_loop(mut commands: tmpsc::UnboundedReceiver<Command>) {
    let mut kept: HashMap<KeptId, Sender> = HashMap::new();
    let mut next_id = 0u64;
    while let Some(command) = commands.recv().await {
        match command {
            Command::Load {
                plan,
                progress,
                done,
            } => {
                let report = run_load(&plan, progress, &mut kept, &mut next_id).await;
                let _ = done.send(report);
            }
            Command::Reuse { ids, timeout, done } => {
                let mut outcomes = Vec::with_capacity(ids.len());
                for (index, id) in ids.iter().enumerate() {
                    let started = Instant::now();
                    let result = match kept.get_mut(id) {
                        None => Err("no such kept connection (closed?)".to_owned()),
                        Some(sender) => {
                            match tokio::time::timeout(timeout, request(sender)).await {
                                Ok(r) => r,
                                Err(_) => Err(format!("no answer within {timeout:?}")),
                            }
                        }
                    };
                    if result.is_err() {
                        kept.remove(id);
                    }
                    outcomes.push(Outcome {
                        index,
                        at: Duration::ZERO,
                        local: None,
                        result,
                        latency: started.elapsed(),
                        kept: Some(*id),
                    });
                }
                let _ = done.send(outcomes);
            }
            Command::Close { ids } => {
                for id in ids {
                    kept.remove(&id);
                }
            }
        }
    }
}

async fn run_load(
    plan: &LoadPlan,
    progress: mpsc::Sender<Outcome>,
    kept: &mut HashMap<KeptId, Sender>,
    next_id: &mut u64,
) -> LoadReport {
    let start = tokio::time::Instant::now();
    let keep_counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let n = plan.connections.max(1);
    for index in 0..plan.connections {
        let offset = plan.over.mul_f64(index as f64 / n as f64);
        tokio::time::sleep_until(start + offset).await;
        let plan = plan.clone();
        let progress = progress.clone();
        let keep_counts = Arc::clone(&keep_counts);
        tasks.spawn(async move {
            let at = start.elapsed();
            let started = Instant::now();
            let mut local = None;
            let attempt =
                tokio::time::timeout(plan.timeout, connect_and_request(plan.target, &mut local))
                    .await;
            let latency = started.elapsed();
            let (result, sender) = match attempt {
                Ok(Ok((name, sender))) => (Ok(name), Some(sender)),
                Ok(Err(e)) => (Err(e), None),
                Err(_) => (Err(format!("no answer within {:?}", plan.timeout)), None),
            };
            // Keep the first connections each server answered, close the others (dropping
            // the sender closes the connection).
            let keep = match (&result, sender) {
                (Ok(name), Some(sender)) if plan.keep_per_server > 0 => {
                    let mut counts = match keep_counts.lock() {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                    let count = counts.entry(name.clone()).or_insert(0);
                    if *count < plan.keep_per_server {
                        *count += 1;
                        Some(sender)
                    } else {
                        None
                    }
                }
                _ => None,
            };
            let outcome = Outcome {
                index,
                at,
                local,
                result,
                latency,
                kept: None,
            };
            let _ = progress.send(outcome.clone());
            (outcome, keep)
        });
    }
    drop(progress);
    let mut outcomes = Vec::with_capacity(plan.connections);
    while let Some(joined) = tasks.join_next().await {
        let Ok((mut outcome, keep)) = joined else {
            continue;
        };
        if let Some(sender) = keep {
            let id = KeptId(*next_id);
            *next_id += 1;
            kept.insert(id, sender);
            outcome.kept = Some(id);
        }
        outcomes.push(outcome);
    }
    outcomes.sort_by_key(|o| o.index);
    LoadReport {
        outcomes,
        elapsed: start.elapsed(),
    }
}

async fn connect_and_request(
    target: SocketAddr,
    local: &mut Option<SocketAddr>,
) -> Result<(String, Sender), String> {
    let stream = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    *local = stream.local_addr().ok();
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let name = request(&mut sender).await?;
    Ok((name, sender))
}

/// `GET /` on `sender`; the server's name from the body, checked against `x-served-by`.
async fn request(sender: &mut Sender) -> Result<String, String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection closed: {e}"))?;
    let req = Request::builder()
        .uri("/")
        .header(hyper::header::HOST, "service")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    let header = response
        .headers()
        .get(SERVED_BY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    match header {
        Some(h) if h == body => Ok(body),
        other => Err(format!("body {body:?} but {SERVED_BY}: {other:?}")),
    }
}
