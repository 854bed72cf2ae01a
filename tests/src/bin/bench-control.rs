//! `cargo xtask bench control`: how fast the control plane discovers peers and negotiates an
//! arrangement, with N in-process controllers (real daemons: mutual TLS over loopback TCP,
//! gossip over loopback UDP, one SQLite store each). Writes `target/bench/control.json`.
//!
//! For each cluster size N and run: every node's files are prepared first (keys, config),
//! then the seed node is started and the other N-1 are started at once with the seed's gossip
//! address as their only seed. Gossip runs at the testbed's 50 ms interval, slowed down for
//! large clusters (N²/20 ms, 500 ms for 100 nodes) because every node shares this process's
//! CPUs: see [`gossip_for`].
//!
//! - discovery: for every node, the time from its `daemon::start` call until its registry
//!   holds a live, unexpired advert of each of the other N-1 nodes (`Registry::known` counts
//!   exactly those). The nodes start together, so a node's figure includes waiting for the
//!   others to come up: it is the time a cold cluster takes to converge as that node sees it.
//! - negotiation: with the cluster converged, the seed (the only node with a `[[services]]`
//!   entry) negotiates a rate one provider covers, through the backend the admin API serves
//!   (`POST /v1/negotiate` without HTTP), timed until it returns; the arrangement must then be
//!   active on both sides. Its arrangements are disbanded before the next round.
//!
//! Reported: the median over every node of every run (discovery) and over every negotiation
//! of every run (negotiation), with p90, max and the settings in the JSON as context.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use p2pcdn_controller::{
    admin::{ArrangementFilter, NegotiateRequest, NegotiationState, StateView},
    config::Config,
    daemon::{
        self, Node, Options,
        testbed::{self, Prepared},
    },
    model::{Fingerprint, Role, now_ms},
    registry::{Liveness, Registry},
};
use serde_json::{Value, json};
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(about = "Benchmark peer discovery and negotiation with in-process controllers")]
struct Args {
    /// Cluster sizes (nodes, the seed included), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "3,10,100")]
    sizes: Vec<usize>,
    /// Clusters started per size; discovery pools every node of every run.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Negotiations per cluster, each timed; its arrangements are disbanded before the next.
    #[arg(long, default_value_t = 5)]
    negotiations: usize,
    /// New connections/s each negotiation asks for (at most what one provider offers).
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Deadline of each phase (starting the nodes, discovery, one negotiation, shutdown), in
    /// seconds: past it the benchmark fails and names what was missing.
    #[arg(long, default_value_t = 60)]
    deadline_s: u64,
    /// Seconds the converged cluster is left alone before the negotiations, to measure what
    /// gossip costs by itself (and to negotiate in a settled cluster).
    #[arg(long, default_value_t = 5)]
    idle_s: u64,
    /// Gossip interval of every size, in ms; suspect after 10 and dead after 30 intervals
    /// (the testbed's ratios). Default: the testbed's 50 ms, raised to N²/20 ms for N nodes
    /// above 31 (500 ms for 100, the daemon's default), see `gossip_for`.
    #[arg(long)]
    gossip_interval_ms: Option<u64>,
    /// TOML merged over every node's testbed config, e.g. $'[discovery]\nadvert_refresh_s = 10'
    /// (the gossip timings above are set after it).
    #[arg(long, default_value = "")]
    overlay: String,
    /// Output file (default: <workspace>/target/bench/control.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Largest cluster accepted (the registry tracks up to 4096 nodes; one process and its file
/// descriptors are the practical bound long before that).
const MAX_NODES: usize = 1000;
/// The service the primary negotiates for. Its address is only carried in the requirements,
/// never connected to.
const SERVICE: &str = "web";
const PRIMARY_OVERLAY: &str = "[[services]]\nname = \"web\"\naddresses = [\"127.0.0.1:8080\"]\n";
/// How long the requested arrangements last (they are disbanded long before).
const DURATION_S: u64 = 600;
/// A watcher re-checks its node's registry at least this often even without a change
/// notification. Every advert and liveness change notifies; this is only a safety net (the
/// adverts' expiry, 30 s away, is the one thing that changes with time alone).
const RECHECK: Duration = Duration::from_millis(250);
/// Rough file descriptors per node: three listeners, the SQLite database with its WAL and
/// shared-memory files, and the peer connections of a negotiation.
const FDS_PER_NODE: u64 = 16;
/// Nodes named in a failure message at most.
const NAMED: usize = 5;

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        !args.sizes.is_empty(),
        "--sizes must name at least one size"
    );
    for &size in &args.sizes {
        ensure!(
            (2..=MAX_NODES).contains(&size),
            "--sizes: {size} is out of range (2 to {MAX_NODES}: a primary and at least one provider)"
        );
    }
    ensure!(
        args.runs > 0 && args.negotiations > 0,
        "--runs and --negotiations must be positive"
    );
    ensure!(args.rate > 0, "--rate must be at least 1");
    ensure!(
        (1..=3600).contains(&args.deadline_s),
        "--deadline-s must be 1 to 3600"
    );
    ensure!(args.idle_s <= 600, "--idle-s must be at most 600");
    if let Some(interval) = args.gossip_interval_ms {
        ensure!(
            (10..=10_000).contains(&interval),
            "--gossip-interval-ms must be 10 to 10000"
        );
    }
    let largest = args.sizes.iter().copied().max().unwrap_or(0);
    raise_fd_limit(largest)?;
    // The daemons' logs only on request (RUST_LOG): 100 nodes are chatty.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }

    // Every cluster's keys, configs and stores live under one directory, removed at the end,
    // on error, and on Ctrl-C (the nodes die with the process: nothing else to tear down).
    let root = tempfile::Builder::new()
        .prefix("p2pcdn-bench-control-")
        .tempdir()
        .context("cannot create a directory for the nodes")?;
    let interrupted = root.path().to_owned();
    ctrlc::set_handler(move || {
        let _ = std::fs::remove_dir_all(&interrupted);
        eprintln!("bench-control: interrupted");
        std::process::exit(130);
    })
    .context("cannot handle Ctrl-C")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let workers = runtime.metrics().num_workers();
    let report = runtime.block_on(bench(root.path(), &args, workers))?;
    // Nodes are shut down; whatever their tasks left behind must not keep the process up.
    runtime.shutdown_timeout(Duration::from_secs(5));

    let path = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench/control.json")
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("wrote {}", path.display());
    Ok(())
}

/// 100 daemons in one process hold well over a thousand descriptors, more than a common
/// default soft limit of 1024: raise the soft limit up to the hard one if needed.
fn raise_fd_limit(nodes: usize) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let need = u64::try_from(nodes)
        .unwrap_or(u64::MAX)
        .saturating_mul(FDS_PER_NODE)
        .saturating_add(256);
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).context("cannot read the file descriptor limit")?;
    if soft >= need {
        return Ok(());
    }
    ensure!(
        hard >= need,
        "{nodes} nodes need about {need} file descriptors but the hard limit is {hard} \
         (raise it, e.g. `ulimit -Hn {need}`, or pass smaller --sizes)"
    );
    setrlimit(Resource::RLIMIT_NOFILE, need, hard)
        .with_context(|| format!("cannot raise the file descriptor limit to {need}"))
}

/// Samples of one size, pooled over runs.
#[derive(Default)]
struct SizeSamples {
    discovery_ms: Vec<f64>,
    negotiation_ms: Vec<f64>,
    /// The first negotiation of each cluster (no connection to any peer open yet).
    first_negotiation_ms: Vec<f64>,
    disband_ms: Vec<f64>,
    /// From the seed's start until every node's `start` returned.
    start_all_ms: Vec<f64>,
    load: Vec<Load>,
    gossip: Gossip,
}

/// Gossip timings of one cluster size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Gossip {
    interval_ms: u64,
    suspect_after_ms: u64,
    dead_after_ms: u64,
}

/// The testbed's gossip interval; its suspect and dead timeouts are 10 and 30 intervals.
const TESTBED_GOSSIP_MS: u64 = 50;

/// The gossip timings of a cluster of `size` nodes: `fixed` if given, else the testbed's
/// interval, raised to size²/20 ms once that is longer. One process runs every node and a
/// gossip round costs in proportion to the members it lists, so the process's gossip work
/// grows as size² / interval; at 50 ms, 100 nodes take both vCPUs of the reference machine
/// and heartbeats fall behind the 500 ms suspect timeout (see docs/negotiation.md).
fn gossip_for(size: usize, fixed: Option<u64>) -> Gossip {
    let scaled = u64::try_from(size.saturating_mul(size) / 20).unwrap_or(u64::MAX);
    let interval_ms = fixed.unwrap_or(scaled.max(TESTBED_GOSSIP_MS));
    Gossip {
        interval_ms,
        suspect_after_ms: interval_ms.saturating_mul(10),
        dead_after_ms: interval_ms.saturating_mul(30),
    }
}

/// What one cluster measured.
struct ClusterSamples {
    discovery_ms: Vec<f64>,
    negotiation_ms: Vec<f64>,
    disband_ms: Vec<f64>,
    start_all_ms: f64,
    load: Load,
    gossip: Gossip,
}

/// How busy the process was: every node shares its CPUs, so a saturated machine shows up in
/// the figures (gossip heartbeats late, peers flapping to suspect).
#[derive(Clone, Copy)]
struct Load {
    /// Process CPU time over wall time × CPUs, from the seed's start until all converged.
    discovery_cpu_percent: f64,
    /// The same while the converged cluster only gossips (`--idle-s`).
    idle_cpu_percent: f64,
    /// Registry changes (adverts and liveness) per node and second in that window: one advert
    /// per peer and refresh period when calm; more means peers flapping between alive and
    /// suspect.
    idle_registry_changes_per_node_s: f64,
    /// How late a task woken by a 10 ms timer runs in that window (median, p99): how long
    /// any step of a negotiation waits for a worker thread.
    idle_lag_p50_ms: f64,
    idle_lag_p99_ms: f64,
    /// CPU over the negotiation rounds.
    negotiation_cpu_percent: f64,
}

/// Process CPU time (user + system) so far.
fn cpu_time() -> Result<Duration> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).context("cannot read the process CPU time")?;
    let total = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
    };
    Ok(total(usage.user_time()) + total(usage.system_time()))
}

/// Measures how busy the process is from `new` on.
struct CpuMeter {
    cpu: Duration,
    wall: Instant,
}

impl CpuMeter {
    fn new() -> Result<Self> {
        Ok(Self {
            cpu: cpu_time()?,
            wall: Instant::now(),
        })
    }

    /// Percent of all CPUs used since `new`.
    fn percent(&self) -> Result<f64> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let cpu = cpu_time()?.saturating_sub(self.cpu).as_secs_f64();
        let wall = self.wall.elapsed().as_secs_f64() * cpus as f64;
        Ok(if wall > 0.0 { 100.0 * cpu / wall } else { 0.0 })
    }
}

/// Changes counted by every registry so far.
fn registry_changes(registries: &[Option<Registry>]) -> u64 {
    registries
        .iter()
        .flatten()
        .map(|r| *r.subscribe().borrow())
        .sum()
}

/// What the nodes were configured with (from the testbed, not assumed).
struct Settings {
    advert_refresh_s: u64,
    negotiation_timeout_ms: u64,
    candidates: u32,
    offerable: u64,
}

impl Settings {
    fn of(config: &Config) -> Self {
        Self {
            advert_refresh_s: config.discovery.advert_refresh_s,
            negotiation_timeout_ms: config.policy.negotiation_timeout_ms,
            candidates: config.policy.candidates,
            offerable: u64::from(config.resources.new_connections_per_s)
                * u64::from(config.policy.offer_share_percent)
                / 100,
        }
    }
}

async fn bench(root: &Path, args: &Args, workers: usize) -> Result<Value> {
    let deadline = Duration::from_secs(args.deadline_s);
    let mut settings = None;
    let mut results: BTreeMap<usize, SizeSamples> = BTreeMap::new();
    for &size in &args.sizes {
        for run in 1..=args.runs {
            let label = format!("{size} nodes, run {run}/{}", args.runs);
            let cluster = measure_cluster(root, size, &label, args, deadline, &mut settings)
                .await
                .with_context(|| label.clone())?;
            eprintln!(
                "{label}: all started in {:.0} ms; discovery median {:.1} ms (max {:.1}); \
                 negotiation median {:.1} ms (first {:.1}); CPU discovery {:.0} %, idle {:.0} % \
                 ({:.1} registry changes/node/s, runtime lag p50 {:.1} ms p99 {:.1} ms), \
                 negotiation {:.0} %",
                cluster.start_all_ms,
                median(&cluster.discovery_ms),
                max(&cluster.discovery_ms),
                median(&cluster.negotiation_ms),
                cluster.negotiation_ms.first().copied().unwrap_or(f64::NAN),
                cluster.load.discovery_cpu_percent,
                cluster.load.idle_cpu_percent,
                cluster.load.idle_registry_changes_per_node_s,
                cluster.load.idle_lag_p50_ms,
                cluster.load.idle_lag_p99_ms,
                cluster.load.negotiation_cpu_percent,
            );
            let samples = results.entry(size).or_default();
            samples.discovery_ms.extend(&cluster.discovery_ms);
            samples
                .first_negotiation_ms
                .extend(cluster.negotiation_ms.first());
            samples.negotiation_ms.extend(&cluster.negotiation_ms);
            samples.disband_ms.extend(&cluster.disband_ms);
            samples.start_all_ms.push(cluster.start_all_ms);
            samples.load.push(cluster.load);
            samples.gossip = cluster.gossip;
        }
    }
    let Some(settings) = settings else {
        bail!("no cluster was measured");
    };
    Ok(report(args, workers, &settings, &results))
}

fn report(
    args: &Args,
    workers: usize,
    settings: &Settings,
    results: &BTreeMap<usize, SizeSamples>,
) -> Value {
    let per_size = |pick: &dyn Fn(&SizeSamples) -> Value| -> Value {
        results
            .iter()
            .map(|(size, samples)| (size.to_string(), pick(samples)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let discovery = per_size(&|s| json!(round1(median(&s.discovery_ms))));
    let negotiation = per_size(&|s| json!(round1(median(&s.negotiation_ms))));
    let targets = json!({"3": 1000, "100": 5000});
    for (what, figures) in [
        ("discovery_ms", &discovery),
        ("negotiation_ms", &negotiation),
    ] {
        for (size, target) in [("3", 1000.0), ("100", 5000.0)] {
            if let Some(ms) = figures.get(size).and_then(Value::as_f64)
                && ms > target
            {
                eprintln!(
                    "warning: {what} with {size} nodes is {ms} ms, over the {target} ms target"
                );
            }
        }
    }
    json!({
        "discovery_ms": discovery,
        "negotiation_ms": negotiation,
        "targets_ms": {"discovery_ms": targets, "negotiation_ms": targets},
        "discovery": per_size(&|s| summary(&s.discovery_ms)),
        "negotiation": per_size(&|s| {
            let mut v = summary(&s.negotiation_ms);
            v["first_of_cluster_median_ms"] = json!(round1(median(&s.first_negotiation_ms)));
            v["disband_median_ms"] = json!(round1(median(&s.disband_ms)));
            v
        }),
        "start_all_nodes_median_ms": per_size(&|s| json!(round1(median(&s.start_all_ms)))),
        "load_median": per_size(&|s| {
            let pick = |f: fn(&Load) -> f64| round1(median(&s.load.iter().map(f).collect::<Vec<_>>()));
            json!({
                "discovery_cpu_percent": pick(|l| l.discovery_cpu_percent),
                "idle_cpu_percent": pick(|l| l.idle_cpu_percent),
                "idle_registry_changes_per_node_s": pick(|l| l.idle_registry_changes_per_node_s),
                "idle_runtime_lag_p50_ms": pick(|l| l.idle_lag_p50_ms),
                "idle_runtime_lag_p99_ms": pick(|l| l.idle_lag_p99_ms),
                "negotiation_cpu_percent": pick(|l| l.negotiation_cpu_percent),
            })
        }),
        "method": {
            "runs": args.runs,
            "negotiations_per_run": args.negotiations,
            "rate_new_connections_per_s": args.rate,
            "gossip_interval_ms": per_size(&|s| json!(s.gossip.interval_ms)),
            "gossip": per_size(&|s| json!({
                "interval_ms": s.gossip.interval_ms,
                "suspect_after_ms": s.gossip.suspect_after_ms,
                "dead_after_ms": s.gossip.dead_after_ms,
            })),
            "gossip_rule": "unless --gossip-interval-ms is given: the testbed's 50 ms, raised to \
                            N²/20 ms for N nodes (500 ms for 100): every node shares the \
                            process, and its gossip work grows as N × N / interval (each round \
                            carries a digest of every member), which at 50 ms and 100 nodes \
                            is more than 2 vCPUs do; suspect after 10, dead after 30 intervals",
            "negotiation_timeout_ms": settings.negotiation_timeout_ms,
            "candidates_asked": settings.candidates,
            "tokio_worker_threads": workers,
            "overlay": args.overlay,
            "idle_s": args.idle_s,
            "load": "process CPU time over wall time × CPUs (every node shares the process); \
                     idle: the converged cluster left alone for idle_s before negotiating, \
                     where registry changes above (nodes - 1) / advert_refresh_s per node and \
                     second are peers flapping, and runtime lag is how late a task woken by a \
                     10 ms timer runs (every step of a negotiation waits about that long)",
            "advert_refresh_s": settings.advert_refresh_s,
            "cpus": std::thread::available_parallelism().map_or(0, usize::from),
            "discovery": "per node: from its daemon::start call until its registry holds a live, \
                          unexpired advert of every other node; the seed starts first, the \
                          others all at once; median over every node of every run",
            "negotiation": "the seed negotiates the rate for its service through the admin \
                            backend, timed until the negotiation returns succeeded; the \
                            arrangement is then checked active on both sides and disbanded; \
                            median over every negotiation of every run",
        },
    })
}

fn summary(samples: &[f64]) -> Value {
    json!({
        "samples": samples.len(),
        "median_ms": round1(median(samples)),
        "p90_ms": round1(percentile(samples, 90)),
        "max_ms": round1(max(samples)),
    })
}

/// One node of a cluster.
struct Member {
    name: String,
    fingerprint: Fingerprint,
    node: Node,
}

/// The nodes started so far; [`Cluster::shutdown`] stops them all, also after a failure.
struct Cluster {
    members: Vec<Member>,
    /// Holds the nodes' keys, configs and stores; removed when dropped (after the shutdown).
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn shutdown(self, deadline: Duration) -> Result<()> {
        let Self { members, _dir } = self;
        let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
        let mut stopping = JoinSet::new();
        for member in members {
            stopping.spawn(async move {
                member.node.shutdown().await;
                member.name
            });
        }
        let total = stopping.len();
        let mut pending: BTreeSet<String> = names.into_iter().collect();
        let all = async {
            while let Some(done) = stopping.join_next().await {
                pending.remove(&done.context("a node's shutdown panicked")?);
            }
            anyhow::Ok(())
        };
        match tokio::time::timeout(deadline, all).await {
            Ok(result) => result,
            Err(_) => bail!(
                "shutdown: {} of {total} nodes had not stopped after {} s: {}",
                pending.len(),
                deadline.as_secs(),
                pending
                    .into_iter()
                    .take(NAMED)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

fn bar(label: &str, len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(u64::try_from(len).unwrap_or(u64::MAX));
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} {msg} [{bar:30}] {pos}/{len} {elapsed}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_owned());
    bar.set_message(what.to_owned());
    bar
}

async fn measure_cluster(
    root: &Path,
    size: usize,
    label: &str,
    args: &Args,
    deadline: Duration,
    settings: &mut Option<Settings>,
) -> Result<ClusterSamples> {
    let dir = tempfile::Builder::new()
        .prefix("cluster-")
        .tempdir_in(root)
        .context("cannot create a directory for the nodes")?;
    // Every node's key and config before any clock starts. The gossip timings and the seed's
    // gossip port (known only once it runs) are set in the loaded configs, not in the files.
    let gossip = gossip_for(size, args.gossip_interval_ms);
    let mut prepared = Vec::with_capacity(size);
    for index in 0..size {
        let name = format!("node-{index}");
        let mut overlay = args.overlay.clone();
        if index == 0 {
            overlay.push('\n');
            overlay.push_str(PRIMARY_OVERLAY);
        }
        let mut node = testbed::prepare(&dir.path().join(&name), &name, &[], &overlay)
            .with_context(|| format!("preparing {name}"))?;
        let discovery = &mut node.config.discovery;
        discovery.gossip_interval_ms = gossip.interval_ms;
        discovery.suspect_after_ms = gossip.suspect_after_ms;
        discovery.dead_after_ms = gossip.dead_after_ms;
        prepared.push(node);
    }
    if settings.is_none() {
        let s = Settings::of(&prepared[0].config);
        ensure!(
            args.rate <= s.offerable,
            "--rate {} is more than one provider offers ({} new connections/s)",
            args.rate,
            s.offerable
        );
        *settings = Some(s);
    }

    let mut cluster = Cluster {
        members: Vec::with_capacity(size),
        _dir: dir,
    };
    let measured = measure(&mut cluster, prepared, label, args, deadline).await;
    let stopped = cluster.shutdown(deadline).await;
    let mut samples = measured?;
    stopped?;
    samples.gossip = gossip;
    Ok(samples)
}

async fn measure(
    cluster: &mut Cluster,
    prepared: Vec<Prepared>,
    label: &str,
    args: &Args,
    deadline: Duration,
) -> Result<ClusterSamples> {
    let size = prepared.len();
    let names: Arc<Vec<String>> = Arc::new(
        prepared
            .iter()
            .map(|p| p.config.node.name.clone())
            .collect(),
    );
    let fingerprints: Arc<Vec<Fingerprint>> =
        Arc::new(prepared.iter().map(|p| p.fingerprint).collect());
    let progress = bar(label, size, "discovery");
    let mut watchers = JoinSet::new();
    let mut registries: Vec<Option<Registry>> = vec![None; size];

    // The seed, then everyone else at once.
    let discovery_cpu = CpuMeter::new()?;
    let mut prepared = prepared.into_iter();
    let Some(seed) = prepared.next() else {
        bail!("a cluster needs nodes");
    };
    let began = Instant::now();
    let node = within(
        deadline,
        "starting the seed node",
        daemon::start(seed.config, Options::default()),
    )
    .await?
    .context("starting the seed node")?;
    let seed_addr = node.gossip_addr();
    registries[0] = Some(node.registry().clone());
    watchers.spawn(converge(
        0,
        node.registry().clone(),
        fingerprints.clone(),
        began,
    ));
    cluster.members.push(Member {
        name: names[0].clone(),
        fingerprint: fingerprints[0],
        node,
    });

    let mut starting = JoinSet::new();
    for (offset, mut node) in prepared.enumerate() {
        node.config.discovery.seeds = vec![seed_addr.to_string()];
        starting.spawn(async move {
            let started = Instant::now();
            (
                offset + 1,
                started,
                daemon::start(node.config, Options::default()).await,
            )
        });
    }
    let start_all = async {
        while let Some(done) = starting.join_next().await {
            let (index, started, node) = done.context("a node's start panicked")?;
            let node = node.with_context(|| format!("starting {}", names[index]))?;
            registries[index] = Some(node.registry().clone());
            watchers.spawn(converge(
                index,
                node.registry().clone(),
                fingerprints.clone(),
                started,
            ));
            cluster.members.push(Member {
                name: names[index].clone(),
                fingerprint: fingerprints[index],
                node,
            });
        }
        anyhow::Ok(())
    };
    let started_all = tokio::time::timeout(deadline, start_all).await;
    let start_all_ms = ms(began.elapsed());
    match started_all {
        Ok(result) => result?,
        Err(_) => bail!(
            "starting the nodes: {} of {size} had not started after {} s",
            size - cluster.members.len(),
            deadline.as_secs()
        ),
    }

    // Discovery: every node's watcher reports once its node knows everyone.
    let mut discovery_ms = Vec::with_capacity(size);
    let converged = async {
        while let Some(done) = watchers.join_next().await {
            let (_, elapsed) = done.context("a discovery watcher panicked")?;
            discovery_ms.push(ms(elapsed));
            progress.inc(1);
        }
        anyhow::Ok(())
    };
    if tokio::time::timeout(deadline, converged).await.is_err() {
        progress.abandon();
        bail!(
            "discovery: after {} s, {}",
            deadline.as_secs(),
            who_is_missing(&registries, &names, &fingerprints)
        );
    }
    progress.finish_and_clear();
    let discovery_cpu_percent = discovery_cpu.percent()?;

    // The converged cluster left alone: what gossip and advert refreshes cost by themselves.
    let idle = CpuMeter::new()?;
    let changes_before = registry_changes(&registries);
    let idle_lag_ms = tokio::spawn(runtime_lag(Duration::from_secs(args.idle_s)))
        .await
        .context("the runtime lag probe panicked")?;
    let changes = registry_changes(&registries).saturating_sub(changes_before);
    let idle_seconds = idle.wall.elapsed().as_secs_f64().max(1e-3);
    let idle_cpu_percent = idle.percent()?;

    let negotiation_cpu = CpuMeter::new()?;
    let (negotiation_ms, disband_ms) = negotiate(cluster, label, args, deadline).await?;
    Ok(ClusterSamples {
        discovery_ms,
        negotiation_ms,
        disband_ms,
        start_all_ms,
        gossip: Gossip::default(),
        load: Load {
            discovery_cpu_percent,
            idle_cpu_percent,
            idle_registry_changes_per_node_s: changes as f64 / size as f64 / idle_seconds,
            idle_lag_p50_ms: median(&idle_lag_ms),
            idle_lag_p99_ms: percentile(&idle_lag_ms, 99),
            negotiation_cpu_percent: negotiation_cpu.percent()?,
        },
    })
}

/// For `window`, sleeps 10 ms again and again and returns by how much each wake-up was late
/// (ms). Spawned on the runtime, it queues for a worker thread like every daemon task.
async fn runtime_lag(window: Duration) -> Vec<f64> {
    const TICK: Duration = Duration::from_millis(10);
    let until = Instant::now() + window;
    let mut lag_ms = Vec::new();
    while Instant::now() < until {
        let asked = Instant::now();
        tokio::time::sleep(TICK).await;
        lag_ms.push(ms(asked.elapsed().saturating_sub(TICK)));
    }
    lag_ms
}

/// Waits until `registry` (node `index`'s) knows every other node; returns the time since
/// `started`.
async fn converge(
    index: usize,
    registry: Registry,
    fingerprints: Arc<Vec<Fingerprint>>,
    started: Instant,
) -> (usize, Duration) {
    let mut changes = registry.subscribe();
    loop {
        // `known` only counts (no advert is cloned): it runs at every change of 100 registries.
        if registry.known(now_ms()) + 1 >= fingerprints.len()
            && missing(&registry, index, &fingerprints).is_empty()
        {
            return (index, started.elapsed());
        }
        match tokio::time::timeout(RECHECK, changes.changed()).await {
            Ok(Ok(())) | Err(_) => {}
            // The node is stopping: no more notifications, only the periodic re-check.
            Ok(Err(_)) => tokio::time::sleep(RECHECK).await,
        }
    }
}

/// The nodes `registry` (node `index`'s) does not know yet: not alive, or without an
/// unexpired advert (what `Registry::known` counts).
fn missing(registry: &Registry, index: usize, fingerprints: &[Fingerprint]) -> Vec<usize> {
    let now = now_ms();
    fingerprints
        .iter()
        .enumerate()
        .filter(|&(other, _)| other != index)
        .filter(|&(_, fp)| {
            let alive = registry
                .liveness(fp)
                .is_some_and(|(liveness, _)| liveness == Liveness::Alive);
            let advert = registry
                .get(fp)
                .is_some_and(|learned| learned.expires_at_ms() > now);
            !(alive && advert)
        })
        .map(|(other, _)| other)
        .collect()
}

/// "3 of 100 nodes do not know every peer: node-7 misses node-42, node-88; …".
fn who_is_missing(
    registries: &[Option<Registry>],
    names: &[String],
    fingerprints: &[Fingerprint],
) -> String {
    let mut lagging = Vec::new();
    for (index, registry) in registries.iter().enumerate() {
        let Some(registry) = registry else {
            lagging.push(format!("{} never started", names[index]));
            continue;
        };
        let absent = missing(registry, index, fingerprints);
        if !absent.is_empty() {
            let mut shown: Vec<&str> = absent
                .iter()
                .take(NAMED)
                .map(|&i| names[i].as_str())
                .collect();
            if absent.len() > NAMED {
                shown.push("…");
            }
            lagging.push(format!(
                "{} misses {} of {} ({})",
                names[index],
                absent.len(),
                names.len() - 1,
                shown.join(", ")
            ));
        }
    }
    let count = lagging.len();
    let more = count.saturating_sub(NAMED);
    lagging.truncate(NAMED);
    let mut text = format!(
        "{count} of {} nodes do not know every peer: {}",
        names.len(),
        lagging.join("; ")
    );
    if more > 0 {
        text.push_str(&format!("; and {more} more"));
    }
    text
}

/// The seed negotiates `args.negotiations` times; returns the negotiation and disband times.
async fn negotiate(
    cluster: &Cluster,
    label: &str,
    args: &Args,
    deadline: Duration,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let Some(primary) = cluster.members.iter().find(|m| m.name == "node-0") else {
        bail!("the primary (node-0) is not running");
    };
    let backend = primary.node.backend();
    let progress = bar(label, args.negotiations, "negotiation");
    let mut negotiation_ms = Vec::with_capacity(args.negotiations);
    let mut disband_ms = Vec::new();
    for round in 1..=args.negotiations {
        let request = NegotiateRequest {
            service: SERVICE.to_owned(),
            new_connections_per_s: Some(args.rate),
            duration_s: Some(DURATION_S),
        };
        let what = format!("negotiation {round}");
        let began = Instant::now();
        let view = within(deadline, &what, backend.negotiate(request))
            .await?
            .with_context(|| format!("{what} failed"))?;
        let elapsed = began.elapsed();
        ensure!(
            view.state == NegotiationState::Succeeded && !view.arrangements.is_empty(),
            "{what} ended {} covering {} of {} new connections/s with {} arrangements: {}",
            view.state.as_str(),
            view.covered_connections_per_s,
            view.requested_connections_per_s,
            view.arrangements.len(),
            view.detail
        );
        negotiation_ms.push(ms(elapsed));

        // Untimed: the arrangements are active on both sides, then disbanded.
        for id in &view.arrangements {
            let detail = backend
                .arrangement(id.clone())
                .await
                .with_context(|| format!("{what}: reading arrangement {id}"))?;
            let arrangement = detail.arrangement;
            ensure!(
                arrangement.state == StateView::Active,
                "{what}: arrangement {id} is {} on the primary, not active",
                arrangement.state
            );
            let Some(provider) = cluster
                .members
                .iter()
                .find(|m| m.fingerprint == arrangement.peer)
            else {
                bail!("{what}: arrangement {id} is with a node outside the cluster");
            };
            let filter = ArrangementFilter {
                state: Some(StateView::Active),
                role: Some(Role::Provider),
                peer: Some(primary.fingerprint),
            };
            let theirs = provider
                .node
                .backend()
                .arrangements(filter)
                .await
                .with_context(|| format!("{what}: reading {}'s arrangements", provider.name))?;
            ensure!(
                !theirs.is_empty(),
                "{what}: arrangement {id} is active on the primary but {} has no active \
                 arrangement with it",
                provider.name
            );
            let began = Instant::now();
            let after = within(
                deadline,
                &format!("{what}: disbanding {id}"),
                backend.disband(id.clone(), "benchmark round over".to_owned()),
            )
            .await?
            .with_context(|| format!("{what}: disbanding {id}"))?;
            disband_ms.push(ms(began.elapsed()));
            ensure!(
                matches!(after.state, StateView::Disbanded | StateView::Disbanding),
                "{what}: arrangement {id} is {} after disbanding",
                after.state
            );
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok((negotiation_ms, disband_ms))
}

/// `future`, or an error naming `what` if it takes longer than `deadline`.
async fn within<T>(deadline: Duration, what: &str, future: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(deadline, future)
        .await
        .with_context(|| format!("{what} did not finish within {} s", deadline.as_secs()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

fn median(v: &[f64]) -> f64 {
    let s = sorted(v);
    let n = s.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile.
fn percentile(v: &[f64], p: usize) -> f64 {
    let s = sorted(v);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = (p * s.len()).div_ceil(100).clamp(1, s.len());
    s[rank - 1]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&hundred, 90), 90.0);
        assert_eq!(percentile(&[5.0], 90), 5.0);
        assert_eq!(max(&[1.0, 7.0, 3.0]), 7.0);
    }

    #[test]
    fn gossip_slows_down_only_for_large_clusters() {
        let interval = |size, fixed| gossip_for(size, fixed).interval_ms;
        assert_eq!(interval(3, None), 50);
        assert_eq!(interval(10, None), 50);
        assert_eq!(interval(31, None), 50);
        assert_eq!(interval(40, None), 80);
        assert_eq!(interval(100, None), 500);
        assert_eq!(interval(100, Some(50)), 50);
        let g = gossip_for(100, None);
        assert_eq!((g.suspect_after_ms, g.dead_after_ms), (5000, 15000));
    }

    #[test]
    fn sizes_parse_as_a_list() {
        let Ok(args) = Args::try_parse_from(["bench-control", "--sizes", "3,10"]) else {
            panic!("--sizes 3,10 must parse");
        };
        assert_eq!(args.sizes, vec![3, 10]);
        assert!(Args::try_parse_from(["bench-control", "--sizes", "3,x"]).is_err());
    }
}
