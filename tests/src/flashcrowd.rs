//! The flash-crowd testbed: the whole loop of issue 5 in network namespaces, shared by
//! `cargo xtask demo` (bin `demo`), `cargo xtask loadtest` (bin `loadtest`), the CI-size
//! test (`tests/tests/flashcrowd.rs`) and the two-node peering tests (`tests/tests/peering.rs`).
//!
//! ```text
//!   client .1 ──┐          edge .2  XDP redirector, `p2pcdn run` (primary), capacity-limited
//!               │                   origin on the service address, signed manifest (python3
//!               │                   http.server)
//!              br0 ─────── peer1 .3 XDP redirector (decapsulation), `p2pcdn run` (provider,
//!               │                   surrogate); long-term agreement with the edge (standby)
//!               ├───────── peer2 .4 the same, short-term (negotiated when the crowd comes)
//!               └───────── peer3 .5 the same, short-term
//! ```
//!
//! Everything real: the XDP program attached with the `p2pcdn-redirector` CLI, `p2pcdn run`
//! daemons that discover each other by gossip, negotiate, program the maps, probe and
//! settle, and the surrogates answering the steered clients directly (DSR) with the
//! primary's bytes. [`FlashCrowd::run_load`] drives an open-loop crowd from the client and
//! samples the edge's counters and arrangements while it runs.
//!
//! Teardown: dropping a [`FlashCrowd`] kills the daemons and the manifest server, stops the
//! origin and deletes the namespaces and pins. A signal handler cannot drop it: it calls
//! [`abort_all`], which kills the child processes and deletes the namespaces, pins and node
//! directories of every testbed of the process.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use p2pcdn_controller::{
    admin::{ArrangementView, NegotiationView, StateView},
    daemon::testbed,
    model::Role,
    steering,
};
use serde::{Deserialize, Serialize};

use crate::{
    loadgen::{self, Bucket, LoadConfig, LoadError, LoadReport, Outcome},
    netns::{Host, NetnsError, Testbed},
    origin::{Origin, OriginConfig, OriginError},
    redirector::{self, Redirector, RedirectorError, Stats},
};

/// The service address clients connect to (outside the testbed's /24: routed via the edge).
pub const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
pub const SERVICE_PORT: u16 = 80;
/// The service's HTTP host name.
pub const HOST_NAME: &str = "shop.test";
/// The one object of the service.
pub const OBJECT: &str = "/index.html";
/// The data plane's and the controller's name of the service.
pub const SERVICE_NAME: &str = "web";
/// The origin's name in `x-served-by` (the surrogates send no such header).
pub const ORIGIN_NAME: &str = "edge";
/// The load generator's name for answers without `x-served-by`: the peers' surrogates.
pub const PEERS_SERVER: &str = loadgen::UNKNOWN_SERVER;
/// The origin also listens here on the edge's own address: surrogates pull through from it.
pub const PULL_PORT: u16 = 8080;
/// The static web server publishing the signed manifest, on the edge's address.
pub const MANIFEST_PORT: u16 = 8081;
/// Every node's admin API, on loopback inside its own namespace.
const ADMIN_LISTEN: &str = "127.0.0.1:9443";
/// Waiting for the daemons to find each other, for standby arrangements, for ledgers.
pub const WAIT: Duration = Duration::from_secs(30);
/// How often [`FlashCrowd::run_load`] reads the edge's counters.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// Errors building or driving the testbed.
#[derive(Debug, thiserror::Error)]
pub enum CrowdError {
    #[error("flash-crowd config: {0}")]
    Config(String),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Redirector(#[from] RedirectorError),
    #[error("origin: {0}")]
    Origin(#[from] OriginError),
    #[error("load generator: {0}")]
    Load(#[from] LoadError),
    #[error("node files of {node}: {detail}")]
    Prepare { node: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {detail}")]
    Cli { command: String, detail: String },
    #[error("{what}: not within {waited:?}\n{context}")]
    Timeout {
        what: String,
        waited: Duration,
        context: String,
    },
    #[error("the testbed has no peer {0:?}")]
    NoPeer(String),
    #[error("peer {0:?} is not running")]
    NotRunning(String),
    #[error("the load generator's thread panicked")]
    LoadThread,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CrowdError {
    let what = what.into();
    move |source| CrowdError::Io { what, source }
}

/// How a peer relates to the edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agreement {
    /// A `[[policy.long_term]]` agreement on both sides for `rate` new connections/s; with
    /// `standby` the edge keeps it active before any crowd (the XDP program steers to it
    /// from the first overflowing SYN).
    LongTerm { rate: u32, standby: bool },
    /// No agreement: negotiated (offer, accept, activate) when the edge is overloaded.
    ShortTerm,
}

impl Agreement {
    pub fn label(&self) -> &'static str {
        match self {
            Self::LongTerm { .. } => "long-term",
            Self::ShortTerm => "short-term",
        }
    }
}

/// One peer of the testbed.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    /// Host name: 1 to 10 of `[a-z0-9]`.
    pub name: String,
    pub agreement: Agreement,
    /// Its `resources.new_connections_per_s`: it offers `offer_share_percent` (50 %) of it
    /// to short-term requests.
    pub capacity: u32,
}

impl PeerSpec {
    pub fn new(name: &str, agreement: Agreement, capacity: u32) -> Self {
        Self {
            name: name.to_owned(),
            agreement,
            capacity,
        }
    }
}

/// The edge's `[monitor]` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MonitorTuning {
    pub interval_ms: u64,
    pub window_ms: u64,
    pub enter_ms: u64,
    pub exit_ms: u64,
}

impl MonitorTuning {
    /// Reacts within about a quarter of a second (50 ms readings over a 500 ms window, high
    /// for 100 ms) and gives the capacity back after `exit_ms` of calm.
    pub fn fast(exit_ms: u64) -> Self {
        Self {
            interval_ms: 50,
            window_ms: 500,
            enter_ms: 100,
            exit_ms,
        }
    }

    fn toml(&self) -> String {
        format!(
            "[monitor]\ninterval_ms = {}\nwindow_ms = {}\nenter_ms = {}\nexit_ms = {}\n",
            self.interval_ms, self.window_ms, self.enter_ms, self.exit_ms
        )
    }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct CrowdConfig {
    /// Without peering the peers' hosts are not built and the edge knows no one: its daemon
    /// still runs (it installs the service and its local admission rate), so overload is
    /// detected but nobody can be asked.
    pub peering: bool,
    pub peers: Vec<PeerSpec>,
    /// The edge's `capacity_conn_per_s`: the XDP program's local admission rate.
    pub capacity: u32,
    /// The origin: `workers / service_time` requests/s sustained, `queue` waiting at most
    /// (then 503).
    pub origin_workers: usize,
    pub origin_service_time: Duration,
    pub origin_queue: usize,
    /// Size of the service's object.
    pub body_bytes: usize,
    /// `None`: the overload detector never fires (high-water mark of 1000 %): capacity is
    /// negotiated by hand ([`FlashCrowd::negotiate`]).
    pub monitor: Option<MonitorTuning>,
    /// XDP attach mode: `skb` (veths), `driver`, `auto`.
    pub xdp_mode: String,
    /// `RUST_LOG` of the daemons.
    pub log_filter: String,
}

impl CrowdConfig {
    /// The demo's testbed at `scale` 1: an edge admitting 200 new connections/s in front of
    /// an origin that sustains 500 requests/s (10 workers × 20 ms, 256 queued); peer1 a
    /// standby long-term peer for 600/s, peer2 and peer3 short-term peers offering 250/s
    /// each (half of 500). A crowd of 1,000/s needs 800/s from peers: peer1 takes 600 from
    /// the first overflowing SYN, the monitor asks for the rest (plus 20 % headroom) within
    /// a fraction of a second. `scale` multiplies every rate.
    pub fn demo(scale: f64) -> Self {
        let r = |v: f64| ((v * scale).round() as u32).max(1);
        Self {
            peering: true,
            peers: vec![
                PeerSpec::new(
                    "peer1",
                    Agreement::LongTerm {
                        rate: r(600.0),
                        standby: true,
                    },
                    r(1200.0),
                ),
                PeerSpec::new("peer2", Agreement::ShortTerm, r(500.0)),
                PeerSpec::new("peer3", Agreement::ShortTerm, r(500.0)),
            ],
            capacity: r(200.0),
            origin_workers: ((10.0 * scale).round() as usize).max(1),
            origin_service_time: Duration::from_millis(20),
            origin_queue: 256,
            body_bytes: 4096,
            monitor: Some(MonitorTuning::fast(3000)),
            xdp_mode: "skb".to_owned(),
            log_filter: "p2pcdn_controller=info".to_owned(),
        }
    }

    /// The CI-size testbed (debug binaries, a crowd of 150/s): the demo's shape, smaller
    /// (edge 30/s, origin 3 × 20 ms = 150/s, peer1 standby 80/s, peer2 and peer3 offering
    /// 50/s each). A peer lost mid-crowd leaves at most what the origin can still take.
    pub fn ci() -> Self {
        let mut c = Self::demo(1.0);
        c.capacity = 30;
        c.origin_workers = 3;
        c.peers = vec![
            PeerSpec::new(
                "peer1",
                Agreement::LongTerm {
                    rate: 80,
                    standby: true,
                },
                160,
            ),
            PeerSpec::new("peer2", Agreement::ShortTerm, 100),
            PeerSpec::new("peer3", Agreement::ShortTerm, 100),
        ];
        c
    }

    /// The same testbed without peering (see [`CrowdConfig::peering`]).
    pub fn without_peering(mut self) -> Self {
        self.peering = false;
        self
    }

    /// The origin's sustained requests/s.
    pub fn origin_capacity(&self) -> f64 {
        self.origin_workers as f64 / self.origin_service_time.as_secs_f64()
    }

    fn validate(&self) -> Result<(), CrowdError> {
        if self.peers.len() > 8 {
            return Err(CrowdError::Config("at most 8 peers".to_owned()));
        }
        for p in &self.peers {
            let ok = !p.name.is_empty()
                && p.name.len() <= 10
                && p.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && !matches!(p.name.as_str(), "client" | "edge");
            if !ok {
                return Err(CrowdError::Config(format!(
                    "peer name {:?}: 1 to 10 of a-z 0-9, not client or edge",
                    p.name
                )));
            }
            if p.capacity == 0 {
                return Err(CrowdError::Config(format!("{}: capacity 0", p.name)));
            }
        }
        if self.capacity == 0 || self.origin_workers == 0 || self.body_bytes == 0 {
            return Err(CrowdError::Config(
                "capacity, origin workers and body size must be positive".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Child processes (daemons, manifest servers) and node directories of this process's
/// testbeds, for [`abort_all`]: a signal may come while a testbed is still being built.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Handle on [`CHILDREN`].
#[derive(Clone, Copy, Debug, Default)]
struct Children;

impl Children {
    fn add(&self, pid: u32) {
        lock(&CHILDREN).push(pid);
    }

    fn remove(&self, pid: u32) {
        lock(&CHILDREN).retain(|p| *p != pid);
    }
}

/// For a signal handler (Ctrl-C, SIGTERM, a time limit): kills every daemon and server of
/// this process's flash-crowd testbeds, deletes their node directories, and deletes every
/// namespace and pin this process created. The caller exits afterwards.
pub fn abort_all() {
    let pids = std::mem::take(&mut *lock(&CHILDREN));
    for pid in pids {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for dir in std::mem::take(&mut *lock(&DIRS)) {
        let _ = fs::remove_dir_all(dir);
    }
    crate::netns::remove_own();
}

/// A child process in a namespace (a daemon, the manifest server); killed on drop.
struct Proc {
    child: Child,
    children: Children,
    log: Option<PathBuf>,
    started: Instant,
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.children.remove(self.child.id());
    }

    fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| fs::read_to_string(l).ok())
            .unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `p2pcdn` binary beside the redirector's CLI (`P2PCDN_REDIRECTOR`, or built).
pub fn p2pcdn_binary() -> Result<PathBuf, CrowdError> {
    let redirector = redirector::binary()?;
    let p2pcdn = redirector.with_file_name("p2pcdn");
    if p2pcdn.is_file() {
        Ok(p2pcdn)
    } else {
        Err(CrowdError::Config(format!(
            "{} missing: build the default members first (`cargo build`, or `cargo build \
             --release` for release binaries)",
            p2pcdn.display()
        )))
    }
}

/// A node of the testbed that runs `p2pcdn`.
struct Node {
    host: Host,
    cli: Redirector,
    config: PathBuf,
    fingerprint: String,
    /// Behind a lock so that a peer can be killed while a load runs.
    daemon: Mutex<Option<Proc>>,
    started: Instant,
}

impl Node {
    fn log(&self) -> String {
        lock(&self.daemon)
            .as_ref()
            .map(Proc::log)
            .unwrap_or_default()
    }

    fn kill(&self) -> bool {
        let mut guard = lock(&self.daemon);
        let Some(d) = guard.as_mut() else {
            return false;
        };
        let running = matches!(d.child.try_wait(), Ok(None));
        d.kill();
        running
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One peer: its spec, host and daemon.
pub struct Peer {
    pub spec: PeerSpec,
    node: Node,
    /// When [`FlashCrowd::kill_peer`] killed its daemon.
    killed_at: Mutex<Option<Instant>>,
}

impl Peer {
    pub fn host(&self) -> &Host {
        &self.node.host
    }

    pub fn fingerprint(&self) -> &str {
        &self.node.fingerprint
    }

    pub fn config(&self) -> &Path {
        &self.node.config
    }

    pub fn redirector(&self) -> &Redirector {
        &self.node.cli
    }

    /// The daemon's log so far (empty if it never ran).
    pub fn log(&self) -> String {
        self.node.log()
    }

    /// When [`FlashCrowd::kill_peer`] killed its daemon.
    pub fn killed_at(&self) -> Option<Instant> {
        *lock(&self.killed_at)
    }
}

/// The running testbed. Fields drop in order: processes first, the namespaces last.
pub struct FlashCrowd {
    edge_node: Node,
    peers: Vec<Peer>,
    _manifest_server: Proc,
    origin: Origin,
    pub config: CrowdConfig,
    pub client: Host,
    /// Edge daemon start to every peer known to the edge.
    pub discovery: Option<Duration>,
    /// Edge daemon start to every standby arrangement active.
    pub standby_ready: Option<Duration>,
    dir: tempfile::TempDir,
    testbed: Testbed,
}

/// `p2pcdn ARGS --config CONFIG` in `host`'s namespace.
fn p2pcdn(host: &Host, config: &Path, args: &[&str]) -> Result<Output, CrowdError> {
    host.command(p2pcdn_binary()?)
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running p2pcdn {}", args.join(" "))))
}

/// [`p2pcdn`], stdout parsed as JSON; an error with stderr unless it exits 0.
fn p2pcdn_json<T: serde::de::DeserializeOwned>(
    host: &Host,
    config: &Path,
    args: &[&str],
) -> Result<T, CrowdError> {
    let out = p2pcdn(host, config, args)?;
    let command = format!("p2pcdn {} (in {})", args.join(" "), host.ns);
    if !out.status.success() {
        return Err(CrowdError::Cli {
            command,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| CrowdError::Cli {
        command,
        detail: format!("{e}: {}", String::from_utf8_lossy(&out.stdout)),
    })
}

fn spawn_daemon(
    host: &Host,
    config: &Path,
    log_filter: &str,
    children: &Children,
) -> Result<Proc, CrowdError> {
    let log = config.with_file_name("daemon.log");
    let file = fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
    let err = file
        .try_clone()
        .map_err(io(format!("opening {}", log.display())))?;
    let child = host
        .command(p2pcdn_binary()?)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", log_filter)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(io(format!("starting p2pcdn run in {}", host.ns)))?;
    children.add(child.id());
    Ok(Proc {
        child,
        children: *children,
        log: Some(log),
        started: Instant::now(),
    })
}

/// One ledger row (`p2pcdn ledger export --format json`; fields used here).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LedgerRow {
    pub arrangement: String,
    pub role: String,
    pub peer: String,
    pub service: String,
    pub state: String,
    pub activated_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    pub end_reason: String,
    pub local_connections: u64,
    pub local_bytes: u64,
    pub local_packets: u64,
    pub local_final: bool,
    pub peer_connections: u64,
    pub peer_bytes: u64,
    pub peer_packets: u64,
    pub peer_final: bool,
    pub connections_discrepancy_percent: f64,
    pub bytes_discrepancy_percent: f64,
    pub total_micros: u64,
    pub currency: String,
}

impl LedgerRow {
    /// `|local − peer| / max` of the byte counts, in percent (0 when both are 0).
    pub fn bytes_gap_percent(&self) -> f64 {
        let max = self.local_bytes.max(self.peer_bytes);
        if max == 0 {
            return 0.0;
        }
        self.local_bytes.abs_diff(self.peer_bytes) as f64 * 100.0 / max as f64
    }
}

/// An arrangement as the live view shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ArrangementBrief {
    pub id: String,
    /// The peer's host name (or its advertised name / short fingerprint).
    pub peer: String,
    /// `long-term` or `short-term`.
    pub kind: &'static str,
    pub state: String,
    /// Granted new connections/s.
    pub rate: u64,
    pub activated_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    pub end_reason: Option<String>,
}

/// A reading of the edge's counters during a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    /// Since the load started (± the load generator's own start-up, a few ms).
    pub at_ms: f64,
    /// SYNs admitted by the local bucket.
    pub local: u64,
    /// Overflow SYNs kept local for lack of a peer with tokens.
    pub kept_local: u64,
    /// Connections steered, by peer host name.
    pub peers: BTreeMap<String, u64>,
}

/// One second of a run as the live view shows it.
#[derive(Clone, Debug, Default)]
pub struct LiveSecond {
    /// The load generator's bucket of that second.
    pub bucket: Bucket,
    /// Admitted locally, per second (counters since the previous view).
    pub local_per_s: f64,
    pub kept_local_per_s: f64,
    /// Steered, per second, by peer host name.
    pub peers_per_s: BTreeMap<String, f64>,
    pub arrangements: Vec<ArrangementBrief>,
    /// Requests finished so far and how many succeeded.
    pub completed: u64,
    pub succeeded: u64,
}

impl LiveSecond {
    /// The view in one line: second, offered, local, each peer, arrangements, success.
    pub fn line(&self) -> String {
        let mut out = format!(
            "t={:>3}s offered {:>5}/s  local {:>5.0}/s",
            self.bucket.second, self.bucket.started, self.local_per_s
        );
        if self.kept_local_per_s >= 0.5 {
            let _ = write!(out, " (+{:.0} kept)", self.kept_local_per_s);
        }
        for (peer, rate) in &self.peers_per_s {
            let _ = write!(out, "  {peer} {rate:>4.0}/s");
        }
        let ok = if self.completed == 0 {
            "-".to_owned()
        } else {
            format!(
                "{:.2}%",
                self.succeeded as f64 * 100.0 / self.completed as f64
            )
        };
        let _ = write!(
            out,
            "  ok {ok} of {}  p99 {}",
            self.completed,
            self.bucket
                .p99_ms
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.0} ms"))
        );
        let states: Vec<String> = self
            .arrangements
            .iter()
            .filter(|a| !matches!(a.state.as_str(), "disbanded" | "cancelled"))
            .map(|a| format!("{}:{}({})", a.peer, a.state, a.rate))
            .collect();
        if !states.is_empty() {
            let _ = write!(out, "  [{}]", states.join(" "));
        }
        out
    }
}

/// What [`FlashCrowd::run_load`] returns.
#[derive(Clone, Debug)]
pub struct CrowdRun {
    pub report: LoadReport,
    pub samples: Vec<Sample>,
    /// Arrangements at the end of the load.
    pub arrangements: Vec<ArrangementBrief>,
    /// When the load started (wall clock, Unix ms), to compare with the daemons' times.
    pub started_unix_ms: i64,
    /// When the load started (± the generator's start-up, a few ms).
    pub started: Instant,
}

impl CrowdRun {
    /// The first request started at or after `onset` that a peer answered: its start and
    /// its completion, from the start of the load.
    pub fn first_peer_answer_after(&self, onset: Duration) -> Option<(Duration, Duration)> {
        self.report
            .records
            .iter()
            .filter(|r| r.started >= onset)
            .filter(|r| matches!(&r.outcome, Outcome::Ok { server, .. } if server != ORIGIN_NAME))
            .map(|r| (r.started, r.started + r.latency))
            .min_by_key(|(_, done)| *done)
    }

    /// The report with the peers' answers (`unknown`: surrogates send no `x-served-by`)
    /// split by peer, second by second, in proportion to the connections the edge's XDP
    /// program steered to each peer in that second (its per-peer counters). A second
    /// without steering counts keeps the answers under `peers`.
    pub fn by_peer(&self) -> LoadReport {
        let mut report = self.report.clone();
        let deltas = per_second_peer_deltas(&self.samples, report.series.len());
        let mut totals: BTreeMap<String, u64> = BTreeMap::new();
        for (bucket, delta) in report.series.iter_mut().zip(deltas) {
            let Some(answers) = bucket.by_server.remove(PEERS_SERVER) else {
                continue;
            };
            for (name, n) in split(answers, &delta) {
                *bucket.by_server.entry(name.clone()).or_default() += n;
                *totals.entry(name).or_default() += n;
            }
        }
        if let Some(all) = report.servers.remove(PEERS_SERVER) {
            let sum: u64 = totals.values().sum();
            for (name, served) in totals {
                let share = |v: u64| {
                    if sum == 0 {
                        0
                    } else {
                        (v as f64 * served as f64 / sum as f64).round() as u64
                    }
                };
                report.servers.insert(
                    name,
                    loadgen::ServerTotals {
                        served,
                        errors: share(all.errors),
                        bytes: share(all.bytes),
                    },
                );
            }
        }
        report
    }
}

/// When things happened in a crowd run, from the crowd's onset (the start of the phase
/// whose rate exceeds the edge's capacity). See `docs/flash-crowd.md` for the definitions.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timeline {
    /// Onset → the completion of the first request started at or after the onset that a
    /// peer answered (per-request timestamps of the load generator).
    pub onset_to_steer_ms: Option<f64>,
    /// Onset → the start of the first negotiation for the crowd (the monitor's decision to
    /// seek capacity; the edge daemon's wall clock).
    pub onset_to_decision_ms: Option<f64>,
    /// That decision → the first arrangement it negotiated active (the arrangement's
    /// activation time in the edge's store).
    pub discovery_negotiation_ms: Option<f64>,
    /// The first negotiation's own length (start → end, including the data-plane hooks).
    pub negotiation_ms: Option<f64>,
    /// Onset → the first edge counter reading (every 200 ms) with a connection steered to
    /// a short-term peer.
    pub onset_to_short_term_ms: Option<f64>,
    /// Requests of the crowd run answered by peers / by the origin.
    pub answered_by_peers: u64,
    pub answered_by_origin: u64,
}

impl FlashCrowd {
    /// The [`Timeline`] of `run`, whose crowd began `onset` after the load's start.
    pub fn timeline(&self, run: &CrowdRun, onset: Duration) -> Timeline {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let onset_unix = run.started_unix_ms as f64 + ms(onset);
        let mut t = Timeline {
            onset_to_steer_ms: run
                .first_peer_answer_after(onset)
                .map(|(_, done)| ms(done - onset)),
            ..Timeline::default()
        };
        for r in &run.report.records {
            match &r.outcome {
                Outcome::Ok { server, .. } if server == ORIGIN_NAME => t.answered_by_origin += 1,
                Outcome::Ok { .. } => t.answered_by_peers += 1,
                Outcome::Failed { .. } => {}
            }
        }
        let negotiations = self.negotiations().unwrap_or_default();
        let first = negotiations
            .iter()
            .filter(|n| n.started_ms >= run.started_unix_ms && !n.arrangements.is_empty())
            .min_by_key(|n| n.started_ms);
        if let Some(n) = first {
            t.onset_to_decision_ms = Some(n.started_ms as f64 - onset_unix);
            t.negotiation_ms = n.ended_ms.map(|e| (e - n.started_ms) as f64);
            t.discovery_negotiation_ms = run
                .arrangements
                .iter()
                .filter(|a| n.arrangements.contains(&a.id))
                .filter_map(|a| a.activated_ms)
                .min()
                .map(|a| (a - n.started_ms) as f64);
        }
        let short_term: Vec<&str> = self
            .peers
            .iter()
            .filter(|p| p.spec.agreement == Agreement::ShortTerm)
            .map(|p| p.spec.name.as_str())
            .collect();
        t.onset_to_short_term_ms = run
            .samples
            .iter()
            .find(|s| {
                short_term
                    .iter()
                    .any(|p| s.peers.get(*p).is_some_and(|n| *n > 0))
            })
            .map(|s| s.at_ms - ms(onset));
        t
    }
}

/// Latency percentile `q` (0 to 1) of the successful requests started in `[from, to)`, in
/// milliseconds (HDR histogram, 3 significant digits).
pub fn latency_quantile(report: &LoadReport, from: Duration, to: Duration, q: f64) -> Option<f64> {
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).ok()?;
    for r in &report.records {
        if r.is_ok() && r.started >= from && r.started < to {
            let us = u64::try_from(r.latency.as_micros()).unwrap_or(u64::MAX);
            h.saturating_record(us.max(1));
        }
    }
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
}

/// Success rate of the requests started in `[from, to)` (none if there were none).
pub fn success_rate(report: &LoadReport, from: Duration, to: Duration) -> Option<f64> {
    let (mut ok, mut all) = (0u64, 0u64);
    for r in &report.records {
        if r.started >= from && r.started < to {
            all += 1;
            ok += u64::from(r.is_ok());
        }
    }
    (all > 0).then(|| ok as f64 / all as f64)
}

/// Connections steered to each peer in each second `[s, s + 1)` of the run.
fn per_second_peer_deltas(samples: &[Sample], seconds: usize) -> Vec<BTreeMap<String, u64>> {
    let at = |t: f64| -> BTreeMap<String, u64> {
        samples
            .iter()
            .take_while(|s| s.at_ms <= t)
            .last()
            .map(|s| s.peers.clone())
            .unwrap_or_default()
    };
    (0..seconds)
        .map(|s| {
            let (a, b) = (at(s as f64 * 1000.0), at((s + 1) as f64 * 1000.0));
            b.iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(a.get(k).copied().unwrap_or(0))))
                .filter(|(_, v)| *v > 0)
                .collect()
        })
        .collect()
}

/// Splits `n` in proportion to `weights` (largest remainder); everything under `peers`
/// when there are no weights.
fn split(n: u64, weights: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let total: u64 = weights.values().sum();
    if total == 0 {
        return vec![("peers".to_owned(), n)];
    }
    let mut parts: Vec<(String, u64, f64)> = weights
        .iter()
        .map(|(k, w)| {
            let exact = n as f64 * *w as f64 / total as f64;
            (k.clone(), exact.floor() as u64, exact.fract())
        })
        .collect();
    let mut left = n - parts.iter().map(|p| p.1).sum::<u64>();
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by(|a, b| parts[*b].2.total_cmp(&parts[*a].2));
    for i in order {
        if left == 0 {
            break;
        }
        parts[i].1 += 1;
        left -= 1;
    }
    parts.into_iter().map(|(k, v, _)| (k, v)).collect()
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl FlashCrowd {
    /// Builds the testbed, starts everything and waits until the edge knows every peer and
    /// every standby arrangement is active. `log` gets one line per step.
    pub fn start(config: CrowdConfig, log: &mut dyn FnMut(&str)) -> Result<Self, CrowdError> {
        config.validate()?;
        let binary = redirector::binary()?;
        p2pcdn_binary()?;
        let peers = if config.peering {
            config.peers.clone()
        } else {
            Vec::new()
        };
        let service = [IpAddr::V4(SERVICE)];
        let mut builder = Testbed::builder()
            .host("client")
            .host_with_loopback("edge", &service);
        for p in &peers {
            builder = builder.host_with_loopback(&p.name, &service);
        }
        log(&format!(
            "namespaces: client, edge{}",
            peers
                .iter()
                .map(|p| format!(", {}", p.name))
                .collect::<String>()
        ));
        let testbed = builder.build()?;
        let children = Children;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", testbed.id))
            .tempdir()
            .map_err(io("creating the node directories"))?;
        lock(&DIRS).push(dir.path().to_owned());
        let client = testbed.host("client").clone();
        let edge = testbed.host("edge").clone();
        testbed.route("client", &format!("{SERVICE}/32"), edge.v4.into())?;
        // One client address stands for a crowd of clients: with the default port range
        // (about 28,000 ports) a 1,000/s crowd reuses 5-tuples within half a minute, and a
        // SYN on a 5-tuple still in the edge's flow table follows the old flow (admission
        // and steering are bypassed). The whole range keeps a 30 s crowd on fresh tuples.
        testbed.set_sysctls("client", &[("net.ipv4.ip_local_port_range", "1024 65535")])?;

        log(&format!(
            "XDP redirector ({} mode) on the edge{}",
            config.xdp_mode,
            if peers.is_empty() {
                ""
            } else {
                " and on every peer (decapsulation)"
            }
        ));
        let edge_cli = Redirector::for_host(&binary, &edge);
        edge_cli.run(&["attach", "--mode", &config.xdp_mode])?;
        let mut peer_hosts = Vec::new();
        for p in &peers {
            let host = testbed.host(&p.name).clone();
            let cli = Redirector::for_host(&binary, &host);
            cli.run(&["attach", "--mode", &config.xdp_mode])?;
            cli.run(&["config", "--decap-v4", &host.v4.to_string()])?;
            peer_hosts.push((host, cli));
        }

        // The origin: the service address for clients, the edge's own address for the
        // peers' surrogates pulling through.
        let body = object_body(config.body_bytes);
        let origin = Origin::start_in(
            &edge.ns,
            OriginConfig::new(
                ORIGIN_NAME,
                &[
                    SocketAddr::new(SERVICE.into(), SERVICE_PORT),
                    SocketAddr::new(edge.v4.into(), PULL_PORT),
                ],
            )
            .object(OBJECT, body.clone())
            .workers(config.origin_workers)
            .service_time(config.origin_service_time)
            .queue_limit(config.origin_queue),
        )?;
        log(&format!(
            "origin on {SERVICE}:{SERVICE_PORT}: {} workers × {} ms = {:.0} requests/s, {} queued \
             at most; the edge admits {} new connections/s",
            config.origin_workers,
            config.origin_service_time.as_millis(),
            config.origin_capacity(),
            config.origin_queue,
            config.capacity
        ));

        // Node files. Peers first: the edge's long-term agreements name their fingerprints;
        // then the edge's fingerprint goes into each long-term peer's agreement.
        let mut prepared_peers = Vec::new();
        for (p, (host, _)) in peers.iter().zip(&peer_hosts) {
            let prep = testbed::prepare(
                &dir.path().join(&p.name),
                &p.name,
                &[],
                &peer_overlay(host, p),
            )
            .map_err(|e| CrowdError::Prepare {
                node: p.name.clone(),
                detail: e.to_string(),
            })?;
            prepared_peers.push(prep);
        }
        let seeds: Vec<SocketAddr> = peer_hosts
            .iter()
            .map(|(h, _)| SocketAddr::new(h.v4.into(), 7946))
            .collect();
        let long_terms: Vec<(String, &PeerSpec)> = peers
            .iter()
            .zip(&prepared_peers)
            .map(|(p, prep)| (prep.fingerprint.to_string(), p))
            .collect();
        let edge_prep = testbed::prepare(
            &dir.path().join("edge"),
            "edge",
            &seeds,
            &edge_overlay(&edge, &config, &long_terms),
        )
        .map_err(|e| CrowdError::Prepare {
            node: "edge".to_owned(),
            detail: e.to_string(),
        })?;
        let edge_fp = edge_prep.fingerprint.to_string();
        for (p, prep) in peers.iter().zip(&prepared_peers) {
            if let Agreement::LongTerm { rate, .. } = p.agreement {
                let mut text = fs::read_to_string(&prep.config_path)
                    .map_err(io(format!("reading {}", prep.config_path.display())))?;
                let _ = write!(
                    text,
                    "\n[[policy.long_term]]\nagreement_id = \"{}\"\npeer = \"{edge_fp}\"\n\
                     role = \"provider\"\nnew_connections_per_s = {rate}\n",
                    agreement_id(&p.name)
                );
                fs::write(&prep.config_path, text)
                    .map_err(io(format!("writing {}", prep.config_path.display())))?;
                p2pcdn_controller::config::Config::load(&prep.config_path).map_err(|e| {
                    CrowdError::Prepare {
                        node: p.name.clone(),
                        detail: e.to_string(),
                    }
                })?;
            }
        }

        // The signed manifest of the content, served by a static web server on the edge.
        let content = dir.path().join("content");
        let published = dir.path().join("published");
        for d in [&content, &published] {
            fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        let file = content.join(OBJECT.trim_start_matches('/'));
        fs::write(&file, &body).map_err(io(format!("writing {}", file.display())))?;
        let manifest = published.join("manifest");
        let out = p2pcdn(
            &edge,
            &edge_prep.config_path,
            &[
                "manifest",
                "build",
                "--root",
                &content.to_string_lossy(),
                "--origin",
                &format!("http://{}:{PULL_PORT}", edge.v4),
                "--service",
                SERVICE_NAME,
                "--out",
                &manifest.to_string_lossy(),
            ],
        )?;
        if !out.status.success() {
            return Err(CrowdError::Cli {
                command: "p2pcdn manifest build".to_owned(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        let child = edge
            .command("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                &edge.v4.to_string(),
                &MANIFEST_PORT.to_string(),
            ])
            .current_dir(&published)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io(
                "starting python3 -m http.server (is python3 installed?)",
            ))?;
        children.add(child.id());
        let manifest_server = Proc {
            child,
            children,
            log: None,
            started: Instant::now(),
        };

        // The daemons: providers first, then the primary.
        let mut peer_list = Vec::new();
        for ((spec, (host, cli)), prep) in peers.into_iter().zip(peer_hosts).zip(prepared_peers) {
            let daemon = spawn_daemon(&host, &prep.config_path, &config.log_filter, &children)?;
            peer_list.push(Peer {
                spec,
                node: Node {
                    host,
                    cli,
                    config: prep.config_path.clone(),
                    fingerprint: prep.fingerprint.to_string(),
                    started: daemon.started,
                    daemon: Mutex::new(Some(daemon)),
                },
                killed_at: Mutex::new(None),
            });
        }
        let edge_daemon =
            spawn_daemon(&edge, &edge_prep.config_path, &config.log_filter, &children)?;
        log(&format!(
            "p2pcdn run on the edge (primary){}",
            if peer_list.is_empty() {
                String::from(", no peers")
            } else {
                format!(
                    " and on {}",
                    peer_list
                        .iter()
                        .map(|p| format!("{} ({})", p.spec.name, p.spec.agreement.label()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ));
        let mut crowd = Self {
            edge_node: Node {
                host: edge,
                cli: edge_cli,
                config: edge_prep.config_path.clone(),
                fingerprint: edge_fp,
                started: edge_daemon.started,
                daemon: Mutex::new(Some(edge_daemon)),
            },
            peers: peer_list,
            _manifest_server: manifest_server,
            origin,
            config,
            client,
            discovery: None,
            standby_ready: None,
            dir,
            testbed,
        };
        crowd.wait_ready(log)?;
        Ok(crowd)
    }

    /// Waits until the edge's admin API answers, it knows every peer (gossip) and every
    /// standby agreement is active.
    fn wait_ready(&mut self, log: &mut dyn FnMut(&str)) -> Result<(), CrowdError> {
        let started = self.edge_node.started;
        let deadline = Instant::now() + WAIT;
        let standby: Vec<String> = self
            .peers
            .iter()
            .filter(|p| matches!(p.spec.agreement, Agreement::LongTerm { standby: true, .. }))
            .map(|p| p.node.fingerprint.clone())
            .collect();
        loop {
            let known: Result<Vec<serde_json::Value>, _> = p2pcdn_json(
                &self.edge_node.host,
                &self.edge_node.config,
                &["--json", "peers"],
            );
            if let Ok(known) = &known {
                let all = self.peers.iter().all(|p| {
                    known
                        .iter()
                        .any(|k| k["fingerprint"].as_str() == Some(p.fingerprint()))
                });
                if all && self.discovery.is_none() {
                    self.discovery = Some(started.elapsed());
                    if !self.peers.is_empty() {
                        log(&format!(
                            "the edge knows its {} peers ({} ms after its start)",
                            self.peers.len(),
                            started.elapsed().as_millis()
                        ));
                    }
                }
            }
            if self.discovery.is_some() {
                let active = self.arrangement_views().unwrap_or_default();
                let ready = standby.iter().all(|fp| {
                    active.iter().any(|a| {
                        a.role == Role::Primary
                            && a.state == StateView::Active
                            && a.peer.to_string() == *fp
                    })
                });
                if ready {
                    if !standby.is_empty() {
                        self.standby_ready = Some(started.elapsed());
                        log(&format!(
                            "standby long-term arrangement active ({} ms after the edge's start)",
                            started.elapsed().as_millis()
                        ));
                    }
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(CrowdError::Timeout {
                    what: "the edge knowing every peer and its standby arrangements active"
                        .to_owned(),
                    waited: WAIT,
                    context: format!("peers: {known:?}\n--- edge log ---\n{}", self.edge_log()),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn edge(&self) -> &Host {
        &self.edge_node.host
    }

    pub fn edge_config(&self) -> &Path {
        &self.edge_node.config
    }

    pub fn edge_redirector(&self) -> &Redirector {
        &self.edge_node.cli
    }

    pub fn edge_fingerprint(&self) -> &str {
        &self.edge_node.fingerprint
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    pub fn peer(&self, name: &str) -> Result<&Peer, CrowdError> {
        self.peers
            .iter()
            .find(|p| p.spec.name == name)
            .ok_or_else(|| CrowdError::NoPeer(name.to_owned()))
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Where clients connect.
    pub fn target(&self) -> SocketAddr {
        SocketAddr::new(SERVICE.into(), SERVICE_PORT)
    }

    /// A load config for the service (host name, object path) with `phases`.
    pub fn load_config(&self, phases: Vec<loadgen::Phase>) -> LoadConfig {
        LoadConfig::new(self.target(), phases)
            .host(HOST_NAME)
            .paths(&[OBJECT], loadgen::PathPick::RoundRobin)
    }

    pub fn testbed_id(&self) -> &str {
        &self.testbed.id
    }

    /// The edge daemon's log so far.
    pub fn edge_log(&self) -> String {
        self.edge_node.log()
    }

    /// Every daemon's log, headed by its name (for failure messages).
    pub fn logs(&self) -> String {
        let mut out = format!("--- edge ---\n{}", self.edge_log());
        for p in &self.peers {
            let _ = write!(out, "\n--- {} ---\n{}", p.spec.name, p.log());
        }
        out
    }

    /// The last `lines` lines of every daemon's log.
    pub fn log_tails(&self, lines: usize) -> String {
        let tail = |text: String| {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        };
        let mut out = format!("--- edge ---\n{}", tail(self.edge_log()));
        for p in &self.peers {
            let _ = write!(out, "\n--- {} ---\n{}", p.spec.name, tail(p.log()));
        }
        out
    }

    /// `p2pcdn ARGS` against the edge's daemon, stdout parsed as JSON.
    pub fn edge_json<T: serde::de::DeserializeOwned>(
        &self,
        args: &[&str],
    ) -> Result<T, CrowdError> {
        p2pcdn_json(&self.edge_node.host, &self.edge_node.config, args)
    }

    /// The edge's arrangements (admin API), newest first.
    pub fn arrangement_views(&self) -> Result<Vec<ArrangementView>, CrowdError> {
        self.edge_json(&["--json", "arrangements"])
    }

    /// The edge's negotiations (admin API), newest first.
    pub fn negotiations(&self) -> Result<Vec<NegotiationView>, CrowdError> {
        self.edge_json(&["--json", "negotiations"])
    }

    /// The peer host name of a fingerprint (or the fingerprint's short form).
    pub fn peer_name_of(&self, fingerprint: &str) -> String {
        self.peers
            .iter()
            .find(|p| p.fingerprint() == fingerprint)
            .map_or_else(
                || fingerprint.chars().take(12).collect(),
                |p| p.spec.name.clone(),
            )
    }

    fn kind_of(&self, fingerprint: &str) -> &'static str {
        self.peers
            .iter()
            .find(|p| p.fingerprint() == fingerprint)
            .map_or("?", |p| p.spec.agreement.label())
    }

    /// The edge's primary arrangements as the live view shows them.
    pub fn arrangements(&self) -> Result<Vec<ArrangementBrief>, CrowdError> {
        Ok(self
            .arrangement_views()?
            .into_iter()
            .filter(|a| a.role == Role::Primary)
            .map(|a| {
                let fp = a.peer.to_string();
                ArrangementBrief {
                    peer: self.peer_name_of(&fp),
                    kind: self.kind_of(&fp),
                    state: a.state.as_str().to_owned(),
                    rate: a.terms.as_ref().map_or(0, |t| t.new_connections_per_s),
                    activated_ms: a.activated_ms,
                    ended_ms: a.ended_ms,
                    end_reason: a.end_reason.clone(),
                    id: a.id,
                }
            })
            .collect())
    }

    /// `p2pcdn ledger export --format json` of the edge.
    pub fn edge_ledger(&self) -> Result<Vec<LedgerRow>, CrowdError> {
        p2pcdn_json(
            &self.edge_node.host,
            &self.edge_node.config,
            &["ledger", "export", "--format", "json"],
        )
    }

    /// The same on a peer (it reads the store: works with the daemon dead too).
    pub fn peer_ledger(&self, name: &str) -> Result<Vec<LedgerRow>, CrowdError> {
        let p = self.peer(name)?;
        p2pcdn_json(
            &p.node.host,
            &p.node.config,
            &["ledger", "export", "--format", "json"],
        )
    }

    /// The edge's XDP counters (`p2pcdn-redirector stats --json`).
    pub fn edge_stats(&self) -> Result<Stats, CrowdError> {
        Ok(self.edge_node.cli.stats()?)
    }

    /// Connections the edge steered so far, by peer host name (data-plane peers are named
    /// after arrangements: `arrangements` maps them to peers).
    pub fn steered_by_peer(
        &self,
        stats: &Stats,
        arrangements: &[ArrangementBrief],
    ) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> = self
            .peers
            .iter()
            .map(|p| (p.spec.name.clone(), 0))
            .collect();
        for p in &stats.peers {
            let peer = arrangements
                .iter()
                .find(|a| steering::peer_name(&a.id) == p.name)
                .map_or_else(|| p.name.clone(), |a| a.peer.clone());
            *out.entry(peer).or_default() += p.connections;
        }
        out
    }

    /// Negotiates `rate` new connections/s for the service now (`p2pcdn negotiate`);
    /// returns the negotiation.
    pub fn negotiate(&self, rate: u32) -> Result<NegotiationView, CrowdError> {
        self.edge_json(&[
            "--json",
            "negotiate",
            "--service",
            SERVICE_NAME,
            "--rate",
            &rate.to_string(),
        ])
    }

    /// Disbands an arrangement from the edge.
    pub fn disband(&self, id: &str, reason: &str) -> Result<(), CrowdError> {
        let out = p2pcdn(
            &self.edge_node.host,
            &self.edge_node.config,
            &["disband", id, "--reason", reason],
        )?;
        if out.status.success() {
            Ok(())
        } else {
            Err(CrowdError::Cli {
                command: format!("p2pcdn disband {id}"),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// Kills a peer's daemon (SIGKILL: no goodbye to anyone; its surrogate dies with it)
    /// and returns when it happened.
    pub fn kill_peer(&self, name: &str) -> Result<Instant, CrowdError> {
        let peer = self.peer(name)?;
        if !peer.node.kill() {
            return Err(CrowdError::NotRunning(name.to_owned()));
        }
        let at = Instant::now();
        *lock(&peer.killed_at) = Some(at);
        Ok(at)
    }

    /// Polls the edge's ledger until `done` says so (every 300 ms, at most `wait`).
    pub fn wait_ledger(
        &self,
        what: &str,
        wait: Duration,
        mut done: impl FnMut(&[LedgerRow]) -> bool,
    ) -> Result<Vec<LedgerRow>, CrowdError> {
        let deadline = Instant::now() + wait;
        loop {
            let rows = self.edge_ledger()?;
            if done(&rows) {
                return Ok(rows);
            }
            if Instant::now() >= deadline {
                return Err(CrowdError::Timeout {
                    what: what.to_owned(),
                    waited: wait,
                    context: format!(
                        "ledger: {}\n{}",
                        serde_json::to_string_pretty(&rows).unwrap_or_default(),
                        self.log_tails(40)
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Runs `load` from the client while reading the edge's counters every 200 ms;
    /// `live` gets each second as it ends (on this thread: it may print or draw).
    ///
    /// Bounded: the load generator ends by [`LoadConfig::deadline`].
    pub fn run_load(
        &self,
        load: LoadConfig,
        mut live: impl FnMut(&LiveSecond),
    ) -> Result<CrowdRun, CrowdError> {
        load.validate()?;
        let (tx, rx) = mpsc::channel::<Bucket>();
        let ns = self.client.ns.clone();
        let started_unix_ms = unix_ms();
        let t0 = Instant::now();
        let generator = std::thread::spawn(move || {
            loadgen::run_in(&ns, load, move |bucket| {
                let _ = tx.send(bucket.clone());
            })
        });
        let mut samples: Vec<Sample> = Vec::new();
        let mut arrangements = self.arrangements().unwrap_or_default();
        let mut next_sample = Instant::now();
        let mut shown: Option<Sample> = None;
        let (mut completed, mut succeeded) = (0u64, 0u64);
        // Data-plane peers come and go with arrangements: keep the last count of each, so
        // a peer's total never drops when its arrangement ends.
        let mut seen: BTreeMap<String, (String, u64)> = BTreeMap::new();
        let mut take_sample = |arrangements: &mut Vec<ArrangementBrief>| -> Option<Sample> {
            let stats = self.edge_stats().ok()?;
            let svc = stats.service(SERVICE_NAME).cloned().unwrap_or_default();
            let unknown = stats.peers.iter().any(|p| {
                !arrangements
                    .iter()
                    .any(|a| steering::peer_name(&a.id) == p.name)
            });
            if unknown && let Ok(fresh) = self.arrangements() {
                *arrangements = fresh;
            }
            for p in &stats.peers {
                let host = arrangements
                    .iter()
                    .find(|a| steering::peer_name(&a.id) == p.name)
                    .map(|a| a.peer.clone());
                let entry = seen
                    .entry(p.name.clone())
                    .or_insert_with(|| (p.name.clone(), 0));
                if let Some(host) = host {
                    entry.0 = host;
                }
                entry.1 = entry.1.max(p.connections);
            }
            let mut peers: BTreeMap<String, u64> = self
                .peers
                .iter()
                .map(|p| (p.spec.name.clone(), 0))
                .collect();
            for (host, n) in seen.values() {
                *peers.entry(host.clone()).or_default() += n;
            }
            Some(Sample {
                at_ms: t0.elapsed().as_secs_f64() * 1000.0,
                local: svc.syn_local,
                kept_local: svc.kept_local,
                peers,
            })
        };
        loop {
            let finished = generator.is_finished();
            if Instant::now() >= next_sample || finished {
                if let Some(s) = take_sample(&mut arrangements) {
                    samples.push(s);
                }
                next_sample += SAMPLE_EVERY;
            }
            // Every bucket the generator finished (one per second) makes a view.
            while let Ok(bucket) = rx.try_recv() {
                completed += bucket.completed;
                succeeded += bucket.succeeded;
                if let Ok(a) = self.arrangements() {
                    arrangements = a;
                }
                let now = samples.last().cloned().unwrap_or_default();
                let before = shown.clone().unwrap_or_else(|| Sample {
                    at_ms: 0.0,
                    ..samples.first().cloned().unwrap_or_default()
                });
                let secs = ((now.at_ms - before.at_ms) / 1000.0).max(0.001);
                let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
                let peers_per_s = now
                    .peers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            rate(*v, before.peers.get(k).copied().unwrap_or(0)),
                        )
                    })
                    .collect();
                live(&LiveSecond {
                    local_per_s: rate(now.local, before.local),
                    kept_local_per_s: rate(now.kept_local, before.kept_local),
                    peers_per_s,
                    arrangements: arrangements.clone(),
                    completed,
                    succeeded,
                    bucket,
                });
                shown = Some(now);
            }
            if finished {
                break;
            }
            std::thread::sleep(
                next_sample
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50)),
            );
        }
        let report = generator.join().map_err(|_| CrowdError::LoadThread)??;
        let arrangements = self.arrangements().unwrap_or(arrangements);
        Ok(CrowdRun {
            report,
            samples,
            arrangements,
            started_unix_ms,
            started: t0,
        })
    }
}

impl Drop for FlashCrowd {
    fn drop(&mut self) {
        // Daemons before the namespaces go (their hooks use the interfaces).
        self.edge_node.kill();
        for p in &self.peers {
            p.node.kill();
        }
        self.origin.stop();
        let dir = self.dir.path().to_owned();
        lock(&DIRS).retain(|d| *d != dir);
    }
}

/// The agreement id of the long-term agreement with `peer`.
pub fn agreement_id(peer: &str) -> String {
    format!("lt-edge-{peer}")
}

/// The service's object: printable, `len` bytes, the same on every run.
pub fn object_body(len: usize) -> Bytes {
    let line = b"p2pcdn flash-crowd object: the same bytes from the origin and every surrogate.\n";
    Bytes::from(line.iter().copied().cycle().take(len).collect::<Vec<u8>>())
}

fn peer_overlay(host: &Host, spec: &PeerSpec) -> String {
    format!(
        r#"
[node]
listen = "{p}:7443"
[discovery]
gossip_listen = "{p}:7946"
suspect_after_ms = 5000
dead_after_ms = 15000
[admin]
listen = "{ADMIN_LISTEN}"
[resources]
decap_v4 = "{p}"
new_connections_per_s = {capacity}
[dataplane]
iface = "{iface}"
pin_root = "{pins}"
[surrogate]
"#,
        p = host.v4,
        capacity = spec.capacity,
        iface = host.iface,
        pins = host.pin_root.display()
    )
}

fn edge_overlay(edge: &Host, config: &CrowdConfig, long_terms: &[(String, &PeerSpec)]) -> String {
    let mut text = format!(
        r#"
[node]
listen = "{e}:7443"
[discovery]
gossip_listen = "{e}:7946"
suspect_after_ms = 5000
dead_after_ms = 15000
[admin]
listen = "{ADMIN_LISTEN}"
[resources]
decap_v4 = "{e}"
[dataplane]
iface = "{iface}"
pin_root = "{pins}"
[[services]]
name = "{SERVICE_NAME}"
addresses = ["{SERVICE}:{SERVICE_PORT}"]
host_names = ["{HOST_NAME}"]
manifest_url = "http://{e}:{MANIFEST_PORT}/manifest"
capacity_conn_per_s = {capacity}
"#,
        e = edge.v4,
        iface = edge.iface,
        pins = edge.pin_root.display(),
        capacity = config.capacity,
    );
    match config.monitor {
        Some(m) => text.push_str(&m.toml()),
        // The detector never fires: capacity is negotiated by hand.
        None => text.push_str("[monitor]\nhigh_water_percent = 1000\n"),
    }
    for (fp, spec) in long_terms {
        if let Agreement::LongTerm { rate, standby } = spec.agreement {
            let _ = write!(
                text,
                "[[policy.long_term]]\nagreement_id = \"{}\"\npeer = \"{fp}\"\nrole = \"primary\"\n\
                 new_connections_per_s = {rate}\nstandby = {standby}\n",
                agreement_id(&spec.name)
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_the_total_and_follows_the_weights() {
        let w = BTreeMap::from([("a".to_owned(), 2), ("b".to_owned(), 1)]);
        let parts: BTreeMap<String, u64> = split(10, &w).into_iter().collect();
        assert_eq!(parts.values().sum::<u64>(), 10);
        assert_eq!(parts["a"], 7);
        assert_eq!(split(5, &BTreeMap::new()), vec![("peers".to_owned(), 5)]);
    }

    #[test]
    fn deltas_are_per_second() {
        let s = |at_ms: f64, a: u64| Sample {
            at_ms,
            peers: BTreeMap::from([("p".to_owned(), a)]),
            ..Sample::default()
        };
        let d = per_second_peer_deltas(&[s(0.0, 0), s(500.0, 5), s(1000.0, 10), s(1900.0, 30)], 2);
        assert_eq!(d[0]["p"], 10);
        assert_eq!(d[1]["p"], 20);
    }

    #[test]
    fn configs_validate() {
        assert!(CrowdConfig::demo(1.0).validate().is_ok());
        assert!(CrowdConfig::ci().validate().is_ok());
        let mut bad = CrowdConfig::ci();
        bad.peers[0].name = "edge".to_owned();
        assert!(bad.validate().is_err());
    }
}

/// A crowd's schedule: `base` requests/s for `before`, `crowd` for `during`, `base` again
/// for `after`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Schedule {
    pub base: f64,
    pub crowd: f64,
    #[serde(serialize_with = "ser_secs")]
    pub before: Duration,
    #[serde(serialize_with = "ser_secs")]
    pub during: Duration,
    #[serde(serialize_with = "ser_secs")]
    pub after: Duration,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Schedule {
    pub fn phases(&self) -> Vec<loadgen::Phase> {
        vec![
            loadgen::Phase::new(self.base, self.before),
            loadgen::Phase::new(self.crowd, self.during),
            loadgen::Phase::new(self.base, self.after),
        ]
    }

    /// When the crowd begins, from the start of the load.
    pub fn onset(&self) -> Duration {
        self.before
    }

    /// When it ends.
    pub fn end_of_crowd(&self) -> Duration {
        self.before + self.during
    }

    pub fn length(&self) -> Duration {
        self.before + self.during + self.after
    }
}

/// What one run of a scenario ([`run_scenario`]) measured.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioResult {
    pub label: String,
    pub peering: bool,
    /// The load report, the peers' answers split by peer ([`CrowdRun::by_peer`]).
    pub report: LoadReport,
    pub timeline: Timeline,
    /// p50 and p99 of the requests started before the crowd (the unloaded service).
    pub unloaded_p50_ms: Option<f64>,
    pub unloaded_p99_ms: Option<f64>,
    /// Success rate of the requests started during the crowd.
    pub crowd_success_rate: Option<f64>,
    pub samples: Vec<Sample>,
    /// The edge's primary arrangements after the run (and the disbands).
    pub arrangements: Vec<ArrangementBrief>,
    /// The edge's ledger after the crowd's arrangements were disbanded.
    pub ledger: Vec<LedgerRow>,
    /// Edge daemon start → every peer known; → standby arrangements active.
    pub discovery_ms: Option<f64>,
    pub standby_ready_ms: Option<f64>,
    /// Arrangements of the crowd not disbanded within [`WAIT`] after the load.
    pub not_disbanded: Vec<String>,
}

/// Builds the testbed of `config`, runs `schedule` against it with `live` called every
/// second, waits (at most [`WAIT`]) until the arrangements that served the crowd are
/// disbanded, collects the figures and tears the testbed down.
pub fn run_scenario(
    label: &str,
    config: CrowdConfig,
    schedule: &Schedule,
    log: &mut dyn FnMut(&str),
    live: impl FnMut(&LiveSecond),
) -> Result<ScenarioResult, CrowdError> {
    let peering = config.peering;
    let crowd = FlashCrowd::start(config, log)?;
    let run = crowd.run_load(crowd.load_config(schedule.phases()), live)?;
    let timeline = crowd.timeline(&run, schedule.onset());
    let crowd_end = run.started_unix_ms
        + i64::try_from(schedule.end_of_crowd().as_millis()).unwrap_or(i64::MAX)
        + 500;
    let served: Vec<String> = run
        .arrangements
        .iter()
        .filter(|a| a.activated_ms.is_some_and(|t| t <= crowd_end))
        .map(|a| a.id.clone())
        .collect();
    let mut not_disbanded = Vec::new();
    let ledger = if served.is_empty() {
        crowd.edge_ledger().unwrap_or_default()
    } else {
        log("waiting for the crowd's arrangements to be drained and disbanded");
        let done = |rows: &[LedgerRow]| {
            served.iter().all(|id| {
                rows.iter()
                    .any(|r| r.arrangement == *id && r.state == "disbanded" && r.peer_final)
            })
        };
        match crowd.wait_ledger("the crowd's arrangements disbanded", WAIT, done) {
            Ok(rows) => rows,
            Err(e) => {
                log(&format!("{e}"));
                let rows = crowd.edge_ledger().unwrap_or_default();
                not_disbanded = served
                    .iter()
                    .filter(|id| {
                        !rows
                            .iter()
                            .any(|r| r.arrangement == **id && r.state == "disbanded")
                    })
                    .cloned()
                    .collect();
                rows
            }
        }
    };
    let arrangements = crowd.arrangements().unwrap_or(run.arrangements.clone());
    let result = ScenarioResult {
        label: label.to_owned(),
        peering,
        report: run.by_peer(),
        timeline,
        unloaded_p50_ms: latency_quantile(&run.report, Duration::ZERO, schedule.onset(), 0.5),
        unloaded_p99_ms: latency_quantile(&run.report, Duration::ZERO, schedule.onset(), 0.99),
        crowd_success_rate: success_rate(&run.report, schedule.onset(), schedule.end_of_crowd()),
        samples: run.samples,
        arrangements,
        ledger,
        discovery_ms: crowd.discovery.map(|d| d.as_secs_f64() * 1000.0),
        standby_ready_ms: crowd.standby_ready.map(|d| d.as_secs_f64() * 1000.0),
        not_disbanded,
    };
    let id = crowd.testbed_id().to_owned();
    drop(crowd);
    log(&format!("removed namespaces {id}-* and their pins"));
    Ok(result)
}
