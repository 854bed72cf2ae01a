//! The daemon: wires identity, store, policy, registry, discovery, the peering agent, the
//! negotiator and the admin API together, runs the background work (heartbeats, expiry,
//! silence detection, advert refresh) and recovers after a restart.
//!
//! [`start`] runs a node inside the current tokio runtime and returns a [`Node`] (tests and
//! the benchmark run many in one process); [`run`] is `p2pcdn run`: start, wait for SIGINT or
//! SIGTERM, shut down.
//!
//! Recovery at start (the store is checked with [`Store::verify`] first and a node refuses to
//! start on an inconsistent store):
//! - negotiations still `running` were interrupted: they become `abandoned`;
//! - primary arrangements that never became active (requested, offered, accepted) are
//!   cancelled here and the provider is told (decline or disband), best effort; the provider
//!   also lets unanswered offers and unactivated acceptances lapse on its own;
//! - arrangements that were disbanding finish disbanding (the peer is told again);
//! - active arrangements past their end are disbanded; the others are re-confirmed: a primary
//!   sends a heartbeat at once and ends the arrangement if the provider no longer has it, a
//!   provider waits for the primary's heartbeats and ends it after a silence.

pub mod testbed;

mod autopilot;
mod backend;
mod standby;
mod trust_loop;
mod wiring;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

pub use autopilot::LoadEvent;
use tokio::{
    net::TcpListener,
    sync::{Notify, watch},
    task::JoinSet,
};
use tonic::Code;

use crate::{
    admin,
    config::Config,
    discovery::{self, Discovery},
    health::{self, ProbeSettings},
    identity::{IdentityError, NodeIdentity},
    model::{Fingerprint, Role, UnixMs, now_ms},
    monitor,
    negotiation::{LocalEndpoints, Negotiator},
    peering_agent::{Agent, ArrangementHooks, GrpcPeers, LogHooks},
    policy::{Policy, settle},
    proto::pb,
    registry::Registry,
    steering::{SharedDataplane, Steering, SteeringSettings},
    store::{
        ArrangementChanges, ArrangementFilter, ArrangementRecord, NegotiationState, Store,
        StoreError, UsageEntry, UsageKind, UsageSource, is_terminal,
    },
    surrogate::Surrogate,
    tls::{self, CaBundle, PeerAdmission},
    transport,
};

type State = pb::ArrangementState;

/// How long a provider keeps an arrangement after its end time, waiting for the primary's
/// disband (which carries the primary's final count), before disbanding it on its own.
const EXPIRY_GRACE: Duration = Duration::from_secs(10);
/// An accepted offer the primary never activates lapses after this long.
const ACTIVATION_WINDOW: Duration = Duration::from_secs(60);
/// How long shutdown waits for the listeners to finish.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(6);

/// What [`start`] takes besides the config.
#[derive(Clone)]
pub struct Options {
    /// What activating and ending an arrangement does outside the store (the data plane).
    pub hooks: Arc<dyn ArrangementHooks>,
    /// How often a primary sends each active arrangement's provider a heartbeat.
    pub heartbeat_interval: Duration,
    /// Heartbeats missed in a row before a primary disbands (peer unreachable); a provider
    /// that hears none for twice as long disbands too.
    pub heartbeat_misses: u32,
    /// Connect timeout towards peers.
    pub rpc_timeout: Duration,
    /// The data plane this node programs: active arrangements become peers (primary) and
    /// decapsulation allow-list entries (provider). `None`: control plane only.
    pub dataplane: Option<SharedDataplane>,
    /// The surrogate that serves primaries' content under this node's provider arrangements.
    pub surrogate: Option<Surrogate>,
    /// How arrangements are put into the data plane and the surrogate.
    pub steering: SteeringSettings,
    /// How retiring an arrangement waits for its steered flows to go quiet.
    pub drain: Drain,
    /// How a primary probes its providers' data path.
    pub probes: ProbeSettings,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            hooks: Arc::new(LogHooks),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_misses: 3,
            rpc_timeout: Duration::from_secs(2),
            dataplane: None,
            surrogate: None,
            steering: SteeringSettings::default(),
            drain: Drain::default(),
            probes: ProbeSettings::default(),
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("heartbeat_misses", &self.heartbeat_misses)
            .field("rpc_timeout", &self.rpc_timeout)
            .field("dataplane", &self.dataplane.is_some())
            .field("surrogate", &self.surrogate.is_some())
            .field("steering", &self.steering)
            .field("drain", &self.drain)
            .field("probes", &self.probes)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A file the config names is unusable (key, certificate, CA bundle): a bad config.
    #[error("{0}")]
    Config(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the store at {path} is inconsistent ({reason}); restore it from a backup")]
    Inconsistent { path: String, reason: String },
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("discovery: {0}")]
    Discovery(#[from] discovery::DiscoveryError),
    #[error("admin api: {0}")]
    Admin(#[from] admin::AdminError),
    #[error("data plane: {0}")]
    Dataplane(String),
    #[error("surrogate: {0}")]
    Surrogate(String),
}

impl DaemonError {
    /// The error is the configuration's fault (`p2pcdn run` exits 64).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_))
    }
}

/// `p2pcdn run`: start, serve until SIGINT or SIGTERM, then shut down (arrangements stay as
/// they are: a restart re-confirms them).
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let options = wiring::options(&config).await?;
    let redirect_listener = match config.surrogate.as_ref().and_then(|s| s.listen) {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Listen { addr, source })?,
        ),
        None => None,
    };
    let surrogate = options.surrogate.clone();
    let node = start(config, options).await?;
    let (stop_surrogate, surrogate_stopped) = watch::channel(false);
    if let (Some(listener), Some(surrogate)) = (redirect_listener, surrogate) {
        tokio::spawn(async move {
            let mut stopped = surrogate_stopped;
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = surrogate.serve(listener, None, shutdown).await {
                tracing::error!(error = %e, "the surrogate stopped serving");
            }
        });
    }
    tracing::info!(fingerprint = %node.fingerprint(), control = %node.control_addr(),
        gossip = %node.gossip_addr(), admin = %node.admin_addr(), "p2pcdn running");
    wait_for_signal().await;
    tracing::info!("shutting down");
    let _ = stop_surrogate.send(true);
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A running node. Call [`Node::shutdown`] to stop it.
pub struct Node {
    core: Arc<Core>,
    backend: Arc<dyn admin::AdminBackend>,
    load_events: tokio::sync::mpsc::Sender<LoadEvent>,
    discovery: Option<Discovery>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("fingerprint", &self.core.identity.fingerprint)
            .field("control", &self.core.control_addr)
            .finish_non_exhaustive()
    }
}

impl Node {
    pub fn fingerprint(&self) -> Fingerprint {
        self.core.identity.fingerprint
    }

    /// The bound gRPC (mutual TLS) address.
    pub fn control_addr(&self) -> SocketAddr {
        self.core.control_addr
    }

    /// The bound gossip address (a seed for other nodes).
    pub fn gossip_addr(&self) -> SocketAddr {
        self.core.gossip_addr
    }

    /// The bound admin API (HTTPS) address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.core.admin_addr
    }

    pub fn registry(&self) -> &Registry {
        &self.core.registry
    }

    pub fn store(&self) -> &Store {
        &self.core.store
    }

    /// Ends every active primary arrangement of `service` gracefully (drain, then disband
    /// with reason "crowd over"); returns the arrangements as they ended.
    pub async fn retire_service(
        &self,
        service: &str,
        detail: &str,
        drain: Drain,
    ) -> Result<Vec<ArrangementRecord>, StoreError> {
        retire_service(&self.core, service, detail, drain).await
    }

    /// Where the load monitor's events go (the flash-crowd loop acts on them).
    pub fn load_events(&self) -> tokio::sync::mpsc::Sender<LoadEvent> {
        self.load_events.clone()
    }

    /// The data-plane side of arrangements, when the node was started with a data plane.
    pub fn steering(&self) -> Option<&Steering> {
        self.core.steering.as_ref()
    }

    /// What the admin API serves (the operator commands, callable in process).
    pub fn backend(&self) -> Arc<dyn admin::AdminBackend> {
        self.backend.clone()
    }

    /// Stops taking offers, leaves the gossip, closes the listeners and stops the background
    /// tasks. The store stays as it is (consistent after every transaction).
    pub async fn shutdown(mut self) {
        self.core.agent.shut_down();
        self.core.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop.send(true);
        if let Some(discovery) = self.discovery.take() {
            discovery.shutdown().await;
        }
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_WAIT, drain).await.is_err() {
            tracing::warn!("background tasks did not stop in time; aborting them");
            self.tasks.abort_all();
        }
    }
}

/// What every task and the admin backend share.
pub(crate) struct Core {
    config: Config,
    options: Options,
    identity: Arc<NodeIdentity>,
    store: Store,
    policy: Policy,
    registry: Registry,
    agent: Agent,
    /// The configured hooks wrapped in [`RefreshingHooks`] (the agent holds the same).
    hooks: Arc<dyn ArrangementHooks>,
    /// The data-plane side of arrangements, when the node has a data plane.
    steering: Option<Steering>,
    peers: GrpcPeers,
    negotiator: Negotiator,
    control_addr: SocketAddr,
    gossip_addr: SocketAddr,
    admin_addr: SocketAddr,
    started_ms: UnixMs,
    /// Heartbeats missed in a row, per primary arrangement.
    misses: Mutex<HashMap<String, u32>>,
    /// Data-path probes failed in a row, per primary arrangement.
    probe_failures: Mutex<HashMap<String, u32>>,
    /// Primary arrangements degraded by failed probes, since when.
    degraded: Mutex<HashMap<String, std::time::Instant>>,
    /// SLA breaches counted per primary arrangement (for the settlement).
    breaches: Mutex<HashMap<String, u32>>,
    /// Primary arrangements recovered at start, not yet re-confirmed by their provider.
    unconfirmed: Mutex<std::collections::HashSet<String>>,
    /// Primary arrangements being retired (drained, waiting for their flows to end).
    draining: Mutex<std::collections::HashSet<String>>,
    /// Reputations of providers (sampling, reports) and the decisions they lead to.
    trust: Arc<Mutex<crate::trust::TrustEngine>>,
    running_negotiations: AtomicU64,
    /// Asks for a fresh advertisement (spare capacity changed).
    refresh: Arc<Notify>,
    stopping: AtomicBool,
}

/// The configured hooks, plus a fresh advertisement whenever capacity changes hands.
struct RefreshingHooks {
    inner: Arc<dyn ArrangementHooks>,
    refresh: Arc<Notify>,
}

impl ArrangementHooks for RefreshingHooks {
    fn activated(&self, arrangement: &ArrangementRecord) -> Result<(), String> {
        let result = off_the_workers(|| self.inner.activated(arrangement));
        self.refresh.notify_one();
        result
    }

    fn ended(&self, arrangement: &ArrangementRecord) {
        off_the_workers(|| self.inner.ended(arrangement));
        self.refresh.notify_one();
    }

    fn count(&self, arrangement: &ArrangementRecord) {
        off_the_workers(|| self.inner.count(arrangement));
    }
}

/// Two hooks in turn: the second is told of an activation only if the first accepted it, and
/// of every end.
struct ChainedHooks {
    first: Arc<dyn ArrangementHooks>,
    then: Arc<dyn ArrangementHooks>,
}

impl ArrangementHooks for ChainedHooks {
    fn activated(&self, arrangement: &ArrangementRecord) -> Result<(), String> {
        self.first.activated(arrangement)?;
        self.then.activated(arrangement)
    }

    fn ended(&self, arrangement: &ArrangementRecord) {
        self.first.ended(arrangement);
        self.then.ended(arrangement);
    }

    fn count(&self, arrangement: &ArrangementRecord) {
        self.first.count(arrangement);
        self.then.count(arrangement);
    }
}

/// Runs a data-plane hook, which may block (a map update, a netlink round trip), without
/// holding up the tasks queued on this worker (gossip probes, RPCs, timers): on a
/// multi-threaded runtime the worker's queue moves to another thread for the duration.
fn off_the_workers<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn config_error(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Config(format!("{what} {}: {e}", path.display()))
}

/// Starts a node in the current runtime (see the module documentation).
pub async fn start(config: Config, options: Options) -> Result<Node, DaemonError> {
    let identity = Arc::new(
        NodeIdentity::load(&config.tls.key, &config.tls.cert).map_err(|e| match e {
            IdentityError::Io { .. } => config_error("tls.key/tls.cert", &config.tls.key, e),
            other => config_error("tls.key/tls.cert", &config.tls.cert, other),
        })?,
    );
    let ca = match &config.tls.ca_bundle {
        Some(path) => Some(Arc::new(
            CaBundle::load(path).map_err(|e| config_error("tls.ca_bundle", path, e))?,
        )),
        None => None,
    };
    let me = identity.fingerprint;

    let store_path = config.store_path();
    if let Some(dir) = store_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| config_error("node.data_dir", dir, e))?;
    }
    let store = Store::open(&store_path)?;
    match store.verify() {
        Ok(report) => tracing::info!(path = %store_path.display(),
            arrangements = report.arrangements, events = report.events,
            ledger = report.ledger_entries, "store verified"),
        Err(StoreError::Inconsistent(reason)) => {
            return Err(DaemonError::Inconsistent {
                path: store_path.display().to_string(),
                reason,
            });
        }
        Err(e) => return Err(e.into()),
    }

    let policy = Policy::from_config(me, &config, Some(store.clone()))?;
    let admission: Arc<dyn PeerAdmission> = Arc::new(policy.clone());
    let started_ms = now_ms();
    let registry = Registry::with_store(me, store.clone(), started_ms)?;

    let listener = TcpListener::bind(config.node.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: config.node.listen,
            source,
        })?;
    let control_addr = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: config.node.listen,
            source,
        })?;
    let control_endpoint = match &config.node.advertise_control {
        Some(endpoint) => endpoint.clone(),
        None => control_addr.to_string(),
    };
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: config.admin.listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: config.admin.listen,
            source,
        })?;

    let refresh = Arc::new(Notify::new());
    let steering = options.dataplane.clone().map(|dataplane| {
        Steering::new(
            store.clone(),
            dataplane,
            options.surrogate.clone(),
            options.steering.clone(),
        )
    });
    let configured: Arc<dyn ArrangementHooks> = match &steering {
        Some(steering) => Arc::new(ChainedHooks {
            first: Arc::new(steering.clone()),
            then: options.hooks.clone(),
        }),
        None => options.hooks.clone(),
    };
    let hooks: Arc<dyn ArrangementHooks> = Arc::new(RefreshingHooks {
        inner: configured,
        refresh: refresh.clone(),
    });
    let agent = Agent::new(
        identity.clone(),
        store.clone(),
        Arc::new(policy.clone()),
        registry.clone(),
        config.resources.capacity(),
        hooks.clone(),
    );
    let peers = GrpcPeers::new(
        identity.clone(),
        ca.clone(),
        admission.clone(),
        options.rpc_timeout,
    );
    let endpoints = own_endpoints(&config, &control_endpoint);
    let negotiator = Negotiator::new(
        policy.clone(),
        store.clone(),
        Arc::new(peers.clone()),
        LocalEndpoints {
            tunnel_sources: tunnel_sources(&config),
            endpoints: endpoints.clone(),
        },
    );

    let server_tls = tls::server_config(&identity, ca.as_deref(), admission)?;
    let admin_tls = admin::tls_config(identity.cert_der.clone(), identity.private_key_der())?;
    let auth = admin::AdminAuth::from_config(&config.admin)?;

    let advert_source = {
        let agent = agent.clone();
        let share = u64::from(policy.settings().offer_share_percent.min(100));
        let template = pb::Advertisement {
            name: config.node.name.clone(),
            organisation: config.node.organisation.clone(),
            endpoints: Some(endpoints),
            footprint: Some(pb::Footprint {
                regions: config.node.regions.clone(),
                client_prefixes: config.node.client_prefixes.clone(),
                asns: Vec::new(),
            }),
            modes: policy.settings().modes.iter().map(|m| *m as i32).collect(),
            ..pb::Advertisement::default()
        };
        move || {
            let now = now_ms();
            let spare = agent.spare(now).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot compute spare capacity; advertising none");
                pb::Capacity::default()
            });
            pb::Advertisement {
                spare: Some(share_of(&spare, share)),
                measured_at_ms: now,
                ..template.clone()
            }
        }
    };
    let discovery = discovery::start(
        (&config.discovery).into(),
        identity.clone(),
        registry.clone(),
        advert_source,
    )
    .await?;
    let gossip_addr = discovery.gossip_addr();

    // This node's long-term peers are the pre-trusted set of the reputation engine.
    let trust = crate::trust::TrustEngine::new(
        identity.fingerprint,
        crate::trust::TrustSettings::default(),
        policy.long_term().iter().map(|l| l.peer),
    )
    .map_err(|e| DaemonError::Config(format!("trust settings: {e}")))?;
    let trust = Arc::new(Mutex::new(trust));
    let board = discovery.board();
    let core = Arc::new(Core {
        config,
        options,
        identity,
        store,
        policy,
        registry,
        agent,
        hooks,
        steering,
        peers,
        negotiator,
        control_addr,
        gossip_addr,
        admin_addr,
        started_ms,
        misses: Mutex::new(HashMap::new()),
        probe_failures: Mutex::new(HashMap::new()),
        degraded: Mutex::new(HashMap::new()),
        breaches: Mutex::new(HashMap::new()),
        unconfirmed: Mutex::new(std::collections::HashSet::new()),
        draining: Mutex::new(std::collections::HashSet::new()),
        trust,
        running_negotiations: AtomicU64::new(0),
        refresh,
        stopping: AtomicBool::new(false),
    });
    let recovered = core.recover()?;

    let (stop, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = JoinSet::new();
    {
        let agent = core.agent.clone();
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move {
            if let Err(e) = transport::serve(listener, server_tls, agent, stop).await {
                tracing::error!(error = %e, "peering server stopped");
            }
        });
    }
    let backend: Arc<dyn admin::AdminBackend> = Arc::new(backend::Backend::new(core.clone()));
    {
        let app = admin::router(backend.clone(), auth, admin::install_metrics());
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move {
            if let Err(e) = admin::serve(admin_listener, admin_tls, app, stop).await {
                tracing::error!(error = %e, "admin api stopped");
            }
        });
    }
    {
        let core = core.clone();
        let rx = stop_rx.clone();
        tasks.spawn(async move { core.maintain(recovered, rx).await });
    }
    tasks.spawn(standby::keep(core.clone(), stop_rx.clone()));
    tasks.spawn(trust_loop::run(core.clone(), board, stop_rx.clone()));
    let (load_events, load_rx) = tokio::sync::mpsc::channel(autopilot::EVENT_QUEUE);
    {
        let core = core.clone();
        let backend = backend.clone();
        let rx = stop_rx.clone();
        let drain = core.options.drain;
        tasks.spawn(autopilot::run(core, backend, load_rx, drain, rx));
    }
    if let Some(steering) = core.steering.clone() {
        {
            let core = core.clone();
            let events = load_events.clone();
            let rx = stop_rx.clone();
            tasks.spawn(async move { core.probe_providers(events, rx).await });
        }
        // Step 1: one overload detector per service, on the data plane's counters.
        for service in &core.config.services {
            let capacity = service
                .capacity_conn_per_s
                .unwrap_or(core.config.resources.new_connections_per_s);
            let detector = monitor::Detector::new(&service.name, capacity, core.config.monitor);
            let name = service.name.clone();
            let dataplane = steering.dataplane().clone();
            let source: monitor::CounterSource = Box::new(move || {
                let stats = dataplane
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .stats()
                    .map_err(|e| e.to_string())?;
                let s = stats
                    .service(&name)
                    .ok_or_else(|| format!("service {name} is not in the data plane"))?;
                Ok(monitor::ServiceCounters {
                    syn_local: s.syn_local,
                    syn_steered: s.syn_steered,
                    kept_local: s.kept_local,
                })
            });
            // The admission rate follows the origin's signals when `[admission]` says so, and
            // the detector compares arrivals with the tuned rate.
            let tuned = core.config.admission.map(|admission| {
                let (tx, rx) = watch::channel(capacity);
                tasks.spawn(crate::signals::tune(
                    service.name.clone(),
                    capacity,
                    service.origin_status_url.clone(),
                    admission,
                    steering.dataplane().clone(),
                    tx,
                    stop_rx.clone(),
                ));
                rx
            });
            tasks.spawn(monitor::run(
                detector,
                source,
                load_events.clone(),
                tuned,
                stop_rx.clone(),
            ));
        }
    }
    {
        let refresh = core.refresh.clone();
        let trigger = discovery.refresher();
        let mut rx = stop_rx;
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = refresh.notified() => trigger.refresh_now(),
                    _ = rx.wait_for(|s| *s) => break,
                }
                // At most one fresh advert per 200 ms, however many arrangements change.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    tracing::info!(fingerprint = %core.identity.fingerprint, control = %control_addr,
        advertised = %control_endpoint, gossip = %gossip_addr, admin = %admin_addr,
        "node started");
    Ok(Node {
        core,
        backend,
        load_events,
        discovery: Some(discovery),
        stop,
        tasks,
    })
}

/// Ends every active primary arrangement of `service` gracefully, all at once.
async fn retire_service(
    core: &Arc<Core>,
    service: &str,
    detail: &str,
    drain: Drain,
) -> Result<Vec<ArrangementRecord>, StoreError> {
    let active = core.store.arrangements(&ArrangementFilter {
        role: Some(Role::Primary),
        states: vec![State::Active],
        limit: Some(usize::MAX),
        ..ArrangementFilter::default()
    })?;
    let mut retiring = JoinSet::new();
    for a in active
        .into_iter()
        .filter(|a| a.service.as_ref().is_some_and(|s| s.name == service))
    {
        let core = core.clone();
        let cause = DisbandCause::new(pb::DisbandReason::CrowdOver, detail);
        retiring.spawn(async move { core.retire(&a.id, cause, drain).await });
    }
    let mut ended = Vec::new();
    while let Some(done) = retiring.join_next().await {
        match done {
            Ok(Ok(record)) => ended.push(record),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot retire an arrangement"),
            Err(e) => tracing::warn!(error = %e, "retiring task failed"),
        }
    }
    Ok(ended)
}

/// `share` percent of `capacity`.
fn share_of(capacity: &pb::Capacity, share: u64) -> pb::Capacity {
    let part = |v: u64| v.saturating_mul(share) / 100;
    pb::Capacity {
        new_connections_per_s: u32::try_from(part(u64::from(capacity.new_connections_per_s)))
            .unwrap_or(u32::MAX),
        egress_mbps: u32::try_from(part(u64::from(capacity.egress_mbps))).unwrap_or(u32::MAX),
        storage_bytes: part(capacity.storage_bytes),
    }
}

/// This node's endpoints as it advertises them (discovery adds the gossip endpoint).
fn own_endpoints(config: &Config, control: &str) -> pb::Endpoints {
    let r = &config.resources;
    pb::Endpoints {
        control: control.to_owned(),
        decap_v4: r.decap_v4.map(|a| a.to_string()).unwrap_or_default(),
        decap_v6: r.decap_v6.map(|a| a.to_string()).unwrap_or_default(),
        surrogate_url: r.surrogate_url.clone().unwrap_or_default(),
        gossip: String::new(),
    }
}

/// The outer source addresses this node tunnels from as a primary: its own addresses (the
/// ones it takes tunnelled traffic on as a provider).
fn tunnel_sources(config: &Config) -> Vec<String> {
    let r = &config.resources;
    r.decap_v4
        .map(|a| a.to_string())
        .into_iter()
        .chain(r.decap_v6.map(|a| a.to_string()))
        .collect()
}

/// Active arrangements found at start, to re-install in the data plane.
pub(crate) struct Recovered {
    active: Vec<ArrangementRecord>,
    /// Half-done primary arrangements cancelled at start: tell their providers.
    cancelled: Vec<ArrangementRecord>,
    /// Arrangements that were disbanding: finish.
    disbanding: Vec<ArrangementRecord>,
}

/// How long [`Core::retire`] waits for steered flows to go quiet.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// No packet to the provider for this long: drained.
    pub quiet: Duration,
    /// Disband after this long whatever the flows do.
    pub max: Duration,
    /// How often the counters are read.
    pub poll: Duration,
}

impl Default for Drain {
    /// 2 s quiet, at most 60 s, counters read every 200 ms.
    fn default() -> Self {
        Self {
            quiet: Duration::from_secs(2),
            max: Duration::from_secs(60),
            poll: Duration::from_millis(200),
        }
    }
}

/// Why an arrangement is being disbanded, as recorded and as sent.
#[derive(Debug, Clone)]
pub(crate) struct DisbandCause {
    pub reason: pb::DisbandReason,
    pub detail: String,
}

impl DisbandCause {
    pub(crate) fn new(reason: pb::DisbandReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// Why a disband was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DisbandError {
    #[error("no arrangement {0:?}")]
    Unknown(String),
    #[error("arrangement {id} is already {state}")]
    Ended { id: String, state: &'static str },
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

fn state_name(state: State) -> &'static str {
    crate::admin::StateView::from_pb(state).map_or("unspecified", |s| s.as_str())
}

impl Core {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The store part of recovery (see the module documentation); the network part runs in
    /// [`Core::maintain`].
    fn recover(&self) -> Result<Recovered, DaemonError> {
        let now = now_ms();
        for n in self.store.unfinished_negotiations()? {
            let covered = self
                .store
                .arrangements(&ArrangementFilter {
                    role: Some(Role::Primary),
                    states: vec![State::Active],
                    request_id: Some(n.request_id.clone()),
                    ..ArrangementFilter::default()
                })?
                .iter()
                .map(granted_conn)
                .sum();
            self.store.finish_negotiation(
                &n.request_id,
                NegotiationState::Abandoned,
                covered,
                "interrupted by a restart",
                now,
            )?;
            tracing::warn!(request = %n.request_id, "negotiation interrupted by a restart: abandoned");
        }
        let mut recovered = Recovered {
            active: Vec::new(),
            cancelled: Vec::new(),
            disbanding: Vec::new(),
        };
        let open = self.store.arrangements(&ArrangementFilter {
            states: vec![
                State::Requested,
                State::Offered,
                State::Accepted,
                State::Active,
                State::Disbanding,
            ],
            limit: Some(usize::MAX),
            ..ArrangementFilter::default()
        })?;
        for a in open {
            match (a.role, a.state) {
                (Role::Primary, State::Requested | State::Offered | State::Accepted) => {
                    let detail = "abandoned: the negotiation was interrupted by a restart";
                    let ended = self.store.transition(
                        &a.id,
                        &[State::Requested, State::Offered, State::Accepted],
                        State::Cancelled,
                        now,
                        detail,
                        ArrangementChanges {
                            end_reason: Some(detail.to_owned()),
                            ..ArrangementChanges::default()
                        },
                    )?;
                    recovered.cancelled.push(ended);
                }
                (_, State::Active) => {
                    if a.role == Role::Primary {
                        Self::lock(&self.unconfirmed).insert(a.id.clone());
                    }
                    recovered.active.push(a);
                }
                (_, State::Disbanding) => recovered.disbanding.push(a),
                // Provider offers and acceptances lapse on their own (maintenance).
                _ => {}
            }
        }
        Ok(recovered)
    }

    /// Background work until `stop`: finishing recovery, then every heartbeat interval
    /// heartbeats (primary), expiry and silence (both sides), lapsed offers (provider).
    async fn maintain(self: Arc<Self>, recovered: Recovered, mut stop: watch::Receiver<bool>) {
        for a in &recovered.active {
            if a.expires_ms.is_some_and(|e| e > now_ms()) {
                // Re-install what the data plane had (the primary's peers, the provider's
                // decap allow-list); a primary ends it if the provider denies it below.
                if let Err(e) = self.hooks.activated(a) {
                    tracing::error!(arrangement = %a.id, error = %e,
                        "cannot re-install a recovered arrangement");
                }
            }
        }
        for a in recovered.cancelled {
            self.tell_cancelled(&a).await;
        }
        for a in recovered.disbanding {
            let cause = DisbandCause::new(
                pb::DisbandReason::Shutdown,
                "finishing a disband interrupted by a restart",
            );
            if let Err(e) = self.finish_disband(a, &cause).await {
                tracing::warn!(error = %e, "cannot finish an interrupted disband");
            }
        }
        let mut ticker = tokio::time::interval(self.options.heartbeat_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "maintenance round failed");
            }
        }
    }

    /// One maintenance round.
    async fn tick(self: &Arc<Self>) -> Result<(), StoreError> {
        let now = now_ms();
        let open = self.store.arrangements(&ArrangementFilter {
            states: vec![State::Offered, State::Accepted, State::Active],
            limit: Some(usize::MAX),
            ..ArrangementFilter::default()
        })?;
        if let Some(steering) = &self.steering {
            // This side's counts first, so heartbeats (and their answers) carry fresh ones.
            off_the_workers(|| {
                for a in open.iter().filter(|a| a.state == State::Active) {
                    if let Err(e) = steering.record_usage(a) {
                        tracing::warn!(arrangement = %a.id, error = %e, "cannot count usage");
                    }
                }
            });
        }
        let mut heartbeats = JoinSet::new();
        for a in open {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            match (a.role, a.state) {
                (Role::Primary, State::Active) => {
                    if a.expires_ms.is_some_and(|e| e <= now) {
                        let cause = DisbandCause::new(
                            pb::DisbandReason::Expired,
                            "the arrangement reached its end time",
                        );
                        self.disband_logged(&a.id, cause).await;
                    } else {
                        let core = self.clone();
                        heartbeats.spawn(async move { core.heartbeat(a).await });
                    }
                }
                (Role::Provider, State::Active) => self.watch_provider(&a, now).await,
                (Role::Provider, State::Offered)
                    if a.terms.as_ref().is_none_or(|t| t.expires_at_ms <= now) =>
                {
                    self.lapse(&a, &[State::Offered], "the offer expired without an answer")?;
                }
                (Role::Provider, State::Accepted)
                    if now.saturating_sub(a.updated_ms) > millis(ACTIVATION_WINDOW) =>
                {
                    self.lapse(&a, &[State::Accepted], "accepted but never activated")?;
                }
                _ => {}
            }
        }
        while heartbeats.join_next().await.is_some() {}
        Ok(())
    }

    /// The peer's control endpoint: what it gave us for this arrangement, else its advert.
    fn control_of(&self, a: &ArrangementRecord) -> Option<String> {
        a.peer_endpoints
            .as_ref()
            .map(|e| e.control.clone())
            .filter(|c| !c.is_empty())
            .or_else(|| {
                self.registry
                    .get(&a.peer)
                    .and_then(|l| l.advert.endpoints)
                    .map(|e| e.control)
                    .filter(|c| !c.is_empty())
            })
    }

    /// The other side's id of arrangement `a` (the provider's id on a primary; a provider
    /// sends its own id, which the primary keeps as its reference).
    fn remote_id(a: &ArrangementRecord) -> String {
        match a.role {
            Role::Primary => a.peer_ref.clone().unwrap_or_else(|| a.id.clone()),
            Role::Provider => a.id.clone(),
        }
    }

    /// Our count of an arrangement's usage so far.
    /// Records this side's count as final (the last one, taken as the arrangement ends).
    fn record_local_final(&self, id: &str, usage: &pb::Usage) {
        let entry = UsageEntry {
            arrangement: id.to_owned(),
            at_ms: now_ms(),
            source: UsageSource::Local,
            kind: UsageKind::Final,
            connections: usage.connections,
            bytes: usage.bytes,
            packets: usage.packets,
        };
        if let Err(e) = self.store.record_usage(&entry) {
            tracing::warn!(arrangement = %id, error = %e, "cannot record the final count");
        }
    }

    fn local_usage(&self, id: &str) -> pb::Usage {
        let (local, _) = self.store.usage_totals(id).unwrap_or_default();
        pb::Usage {
            connections: local.connections,
            bytes: local.bytes,
            packets: local.packets,
            measured_at_ms: now_ms(),
        }
    }

    /// A primary's heartbeat to the provider of active arrangement `a`.
    async fn heartbeat(self: Arc<Self>, a: ArrangementRecord) {
        let Some(control) = self.control_of(&a) else {
            self.missed(&a, "no control endpoint known").await;
            return;
        };
        let request = pb::HeartbeatRequest {
            arrangement_id: Self::remote_id(&a),
            usage: Some(self.local_usage(&a.id)),
            sent_at_ms: now_ms(),
        };
        let call = self.peers.heartbeat(a.peer, &control, request);
        let timeout = self.negotiator.timeout().max(Duration::from_millis(500));
        let reply = match tokio::time::timeout(timeout, call).await {
            Ok(reply) => reply,
            Err(_) => Err(tonic::Status::deadline_exceeded("no answer in time")),
        };
        match reply {
            Ok(reply) => {
                Self::lock(&self.misses).remove(&a.id);
                let state = State::try_from(reply.state).unwrap_or(State::Unspecified);
                if state != State::Active {
                    let detail =
                        format!("the provider reports the arrangement {}", state_name(state));
                    self.end_locally(&a, &detail, None);
                    return;
                }
                if Self::lock(&self.unconfirmed).remove(&a.id) {
                    tracing::info!(arrangement = %a.id, peer = %a.peer.short(),
                        "recovered arrangement re-confirmed by the provider");
                }
                if let Some(usage) = reply.usage {
                    self.record_peer_usage(&a.id, &usage, UsageKind::Heartbeat);
                }
            }
            Err(status) if matches!(status.code(), Code::NotFound | Code::FailedPrecondition) => {
                let detail = format!("the provider no longer has it: {}", status.message());
                self.end_locally(&a, &detail, None);
            }
            Err(status) => {
                let why = format!("{:?}: {}", status.code(), status.message());
                self.missed(&a, &why).await;
            }
        }
    }

    /// Counts a missed heartbeat; disbands after `heartbeat_misses` in a row.
    async fn missed(&self, a: &ArrangementRecord, why: &str) {
        // Ended while the heartbeat was under way (a disband by the operator or expiry).
        if !matches!(self.store.arrangement(&a.id), Ok(Some(now)) if now.state == State::Active) {
            return;
        }
        let misses = {
            let mut map = Self::lock(&self.misses);
            let n = map.entry(a.id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        tracing::warn!(arrangement = %a.id, peer = %a.peer.short(), misses, why, "heartbeat missed");
        if misses >= self.options.heartbeat_misses.max(1) {
            Self::lock(&self.misses).remove(&a.id);
            let cause = DisbandCause::new(
                pb::DisbandReason::PeerUnreachable,
                format!("{misses} heartbeats missed ({why})"),
            );
            self.disband_logged(&a.id, cause).await;
        }
    }

    /// Records what the peer counted, when it differs from its last count.
    fn record_peer_usage(&self, id: &str, usage: &pb::Usage, kind: UsageKind) {
        let (_, last) = self.store.usage_totals(id).unwrap_or_default();
        if kind == UsageKind::Heartbeat
            && last.at_ms != 0
            && (last.connections, last.bytes, last.packets)
                == (usage.connections, usage.bytes, usage.packets)
        {
            return;
        }
        if let Err(e) = self.store.record_usage(&UsageEntry {
            arrangement: id.to_owned(),
            at_ms: now_ms(),
            source: UsageSource::Peer,
            kind,
            connections: usage.connections,
            bytes: usage.bytes,
            packets: usage.packets,
        }) {
            tracing::warn!(arrangement = %id, error = %e, "cannot record the peer's usage");
        }
    }

    /// Provider side: ends an active arrangement after its end time (plus a grace for the
    /// primary's own disband) or after the primary's heartbeats stop.
    async fn watch_provider(&self, a: &ArrangementRecord, now: UnixMs) {
        if a.expires_ms
            .is_some_and(|e| e.saturating_add(millis(EXPIRY_GRACE)) <= now)
        {
            let cause = DisbandCause::new(
                pb::DisbandReason::Expired,
                "the arrangement reached its end time",
            );
            self.disband_logged(&a.id, cause).await;
            return;
        }
        let heard = self
            .store
            .usage_totals(&a.id)
            .map(|(_, peer)| peer.at_ms)
            .unwrap_or(0);
        let since = heard
            .max(a.activated_ms.unwrap_or(a.updated_ms))
            .max(self.started_ms);
        let silence = self
            .options
            .heartbeat_interval
            .saturating_mul(self.options.heartbeat_misses.max(1).saturating_mul(2));
        if now.saturating_sub(since) > millis(silence) {
            let cause = DisbandCause::new(
                pb::DisbandReason::PeerUnreachable,
                format!("no heartbeat from the primary for {} s", silence.as_secs()),
            );
            self.disband_logged(&a.id, cause).await;
        }
    }

    /// Provider side: an offer or acceptance that lapsed.
    fn lapse(&self, a: &ArrangementRecord, from: &[State], detail: &str) -> Result<(), StoreError> {
        match self.store.transition(
            &a.id,
            from,
            State::Cancelled,
            now_ms(),
            detail,
            ArrangementChanges {
                end_reason: Some(detail.to_owned()),
                ..ArrangementChanges::default()
            },
        ) {
            Ok(ended) => {
                self.hooks.ended(&ended);
                Ok(())
            }
            // Answered in the meantime.
            Err(StoreError::IllegalTransition { .. } | StoreError::UnexpectedState { .. }) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Ends an active (or disbanding) arrangement in the store without telling the peer
    /// (the peer told us, or no longer knows it).
    fn end_locally(&self, a: &ArrangementRecord, detail: &str, peer_final: Option<&pb::Usage>) {
        if let Some(usage) = peer_final {
            self.record_peer_usage(&a.id, usage, UsageKind::Final);
        }
        if a.state == State::Active {
            self.hooks.count(a);
        }
        let ours = self.local_usage(&a.id);
        self.record_local_final(&a.id, &ours);
        let settlement = a
            .terms
            .as_ref()
            .map(|t| settle(t, &ours, self.breaches_of(&a.id)));
        match self.store.transition(
            &a.id,
            &[State::Active, State::Disbanding],
            State::Disbanded,
            now_ms(),
            detail,
            ArrangementChanges {
                end_reason: Some(detail.to_owned()),
                settlement,
                ..ArrangementChanges::default()
            },
        ) {
            Ok(ended) => {
                tracing::info!(arrangement = %a.id, peer = %a.peer.short(), detail, "arrangement ended");
                if a.state == State::Active {
                    self.hooks.ended(&ended);
                }
            }
            Err(e) => tracing::debug!(arrangement = %a.id, error = %e, "already ended"),
        }
        Self::lock(&self.misses).remove(&a.id);
        Self::lock(&self.unconfirmed).remove(&a.id);
    }

    /// SLA breaches counted for arrangement `id`.
    fn breaches_of(&self, id: &str) -> u32 {
        Self::lock(&self.breaches).get(id).copied().unwrap_or(0)
    }

    /// Probes the providers of active primary arrangements until `stop` (see [`health`]).
    async fn probe_providers(
        self: Arc<Self>,
        events: tokio::sync::mpsc::Sender<LoadEvent>,
        mut stop: watch::Receiver<bool>,
    ) {
        let settings = self.options.probes;
        let mut ticker = tokio::time::interval(settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let active = match self.store.arrangements(&ArrangementFilter {
                role: Some(Role::Primary),
                states: vec![State::Active],
                limit: Some(usize::MAX),
                ..ArrangementFilter::default()
            }) {
                Ok(active) => active,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list arrangements to probe");
                    continue;
                }
            };
            let mut probes = JoinSet::new();
            for a in active {
                let Some(target) = self.probe_target(&a) else {
                    continue;
                };
                probes.spawn(async move {
                    let result = health::probe(&target, settings.timeout).await;
                    (a, result)
                });
            }
            while let Some(done) = probes.join_next().await {
                if let Ok((a, result)) = done {
                    self.probe_result(&a, result, &events).await;
                }
            }
        }
    }

    fn probe_target(&self, a: &ArrangementRecord) -> Option<health::Target> {
        let surrogate = a
            .peer_endpoints
            .as_ref()
            .map(|e| e.surrogate_url.trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty());
        match surrogate {
            Some(base) => Some(health::Target::Http {
                url: format!("{base}/{}/", self.identity.fingerprint),
            }),
            None => self
                .control_of(a)
                .map(|endpoint| health::Target::Tcp { endpoint }),
        }
    }

    async fn probe_result(
        self: &Arc<Self>,
        a: &ArrangementRecord,
        result: Result<Duration, String>,
        events: &tokio::sync::mpsc::Sender<LoadEvent>,
    ) {
        let Some(steering) = self.steering.clone() else {
            return;
        };
        let settings = self.options.probes;
        match result {
            Ok(rtt) => {
                metrics::histogram!("p2pcdn_probe_ms").record(rtt.as_secs_f64() * 1000.0);
                Self::lock(&self.probe_failures).remove(&a.id);
                // A provider being retired stays drained (weight 0) even when it recovers.
                if Self::lock(&self.degraded).remove(&a.id).is_some()
                    && !Self::lock(&self.draining).contains(&a.id)
                {
                    match off_the_workers(|| steering.activated(a)) {
                        Ok(()) => tracing::info!(arrangement = %a.id, peer = %a.peer.short(),
                            "provider healthy again: steering to it again"),
                        Err(e) => tracing::warn!(arrangement = %a.id, error = %e,
                            "cannot steer to the provider again"),
                    }
                }
            }
            Err(why) => {
                metrics::counter!("p2pcdn_probe_failures_total").increment(1);
                let failures = {
                    let mut all = Self::lock(&self.probe_failures);
                    let n = all.entry(a.id.clone()).or_insert(0);
                    *n = n.saturating_add(1);
                    *n
                };
                let since = Self::lock(&self.degraded).get(&a.id).copied();
                match since {
                    None if failures >= settings.failures => {
                        Self::lock(&self.degraded).insert(a.id.clone(), std::time::Instant::now());
                        *Self::lock(&self.breaches).entry(a.id.clone()).or_insert(0) += 1;
                        metrics::counter!("p2pcdn_sla_breaches_total").increment(1);
                        if let Err(e) = off_the_workers(|| steering.drain(a)) {
                            tracing::warn!(arrangement = %a.id, error = %e,
                                "cannot take the failing provider out of the Maglev table");
                        }
                        tracing::warn!(arrangement = %a.id, peer = %a.peer.short(), failures,
                            error = %why, "provider failing its probes: degraded, no new flows");
                        let granted = a
                            .terms
                            .as_ref()
                            .and_then(|t| t.granted.as_ref())
                            .map_or(0, |g| g.new_connections_per_s);
                        if let Some(service) = a.service.as_ref().map(|s| s.name.clone())
                            && granted > 0
                        {
                            let _ = events.try_send(LoadEvent::MoreNeeded {
                                service,
                                deficit_conn_per_s: granted,
                            });
                        }
                    }
                    Some(since) if since.elapsed() >= settings.grace => {
                        Self::lock(&self.degraded).remove(&a.id);
                        let cause = DisbandCause::new(
                            pb::DisbandReason::SlaBreach,
                            format!(
                                "data-path probes failing for {} s: {why}",
                                since.elapsed().as_secs()
                            ),
                        );
                        let core = self.clone();
                        let id = a.id.clone();
                        tokio::spawn(async move { core.disband_logged(&id, cause).await });
                    }
                    _ => {}
                }
            }
        }
    }

    /// Ends primary arrangement `id` gracefully: no new flows to the provider (weight 0),
    /// then waits until its steered flows are quiet (no packet for `drain.quiet`, at most
    /// `drain.max`), then disbands. Without a data plane it disbands at once.
    /// Active primary arrangements of `service`.
    pub(crate) fn active_primary(
        &self,
        service: &str,
    ) -> Result<Vec<ArrangementRecord>, StoreError> {
        Ok(self
            .store
            .arrangements(&ArrangementFilter {
                role: Some(Role::Primary),
                states: vec![State::Active],
                limit: Some(usize::MAX),
                ..ArrangementFilter::default()
            })?
            .into_iter()
            .filter(|a| a.service.as_ref().is_some_and(|s| s.name == service))
            .collect())
    }

    pub(crate) async fn retire(
        &self,
        id: &str,
        cause: DisbandCause,
        drain: Drain,
    ) -> Result<ArrangementRecord, DisbandError> {
        let a = self
            .store
            .arrangement(id)?
            .ok_or_else(|| DisbandError::Unknown(id.to_owned()))?;
        if let Some(steering) = self.steering.clone()
            && a.role == Role::Primary
            && a.state == State::Active
        {
            let record = a.clone();
            Self::lock(&self.draining).insert(id.to_owned());
            let drained = tokio::task::spawn_blocking({
                let steering = steering.clone();
                let record = record.clone();
                move || steering.drain(&record)
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match drained {
                Ok(()) => {
                    tracing::info!(arrangement = %id, "draining: no new flows to the provider");
                    let started = tokio::time::Instant::now();
                    let mut last = None;
                    let mut quiet_since = started;
                    while started.elapsed() < drain.max {
                        let packets = off_the_workers(|| steering.peer_counters(&record))
                            .ok()
                            .flatten()
                            .map(|c| c.packets);
                        if packets != last {
                            last = packets;
                            quiet_since = tokio::time::Instant::now();
                        } else if quiet_since.elapsed() >= drain.quiet {
                            break;
                        }
                        tokio::time::sleep(drain.poll).await;
                    }
                    tracing::info!(arrangement = %id, waited_ms = started.elapsed().as_millis(),
                        "drained");
                }
                Err(e) => tracing::warn!(arrangement = %id, error = %e,
                    "cannot drain; disbanding at once"),
            }
        }
        let result = self.disband(id, cause).await;
        Self::lock(&self.draining).remove(id);
        result
    }

    async fn disband_logged(&self, id: &str, cause: DisbandCause) {
        if let Err(e) = self.disband(id, cause).await {
            tracing::debug!(arrangement = %id, error = %e, "disband not needed");
        }
    }

    /// Disbands arrangement `id` with its peer: stop using it (Disbanding, hooks), tell the
    /// peer with our final count and settlement, record theirs, end it (Disbanded). An
    /// arrangement not yet active is cancelled and the peer told.
    pub(crate) async fn disband(
        &self,
        id: &str,
        cause: DisbandCause,
    ) -> Result<ArrangementRecord, DisbandError> {
        let a = self
            .store
            .arrangement(id)?
            .ok_or_else(|| DisbandError::Unknown(id.to_owned()))?;
        if is_terminal(a.state) {
            return Err(DisbandError::Ended {
                id: a.id,
                state: state_name(a.state),
            });
        }
        if matches!(a.state, State::Requested | State::Offered | State::Accepted) {
            let detail = format!("cancelled: {}", cause.detail);
            let ended = self.store.transition(
                &a.id,
                &[State::Requested, State::Offered, State::Accepted],
                State::Cancelled,
                now_ms(),
                &detail,
                ArrangementChanges {
                    end_reason: Some(detail.clone()),
                    ..ArrangementChanges::default()
                },
            )?;
            self.tell_cancelled(&ended).await;
            return Ok(ended);
        }
        let a = if a.state == State::Active {
            let disbanding = self.store.transition(
                &a.id,
                &[State::Active],
                State::Disbanding,
                now_ms(),
                &cause.detail,
                ArrangementChanges {
                    end_reason: Some(cause.detail.clone()),
                    ..ArrangementChanges::default()
                },
            )?;
            // From now on nothing new is steered to (or accepted from) the peer.
            self.hooks.ended(&disbanding);
            disbanding
        } else {
            a
        };
        self.finish_disband(a, &cause).await
    }

    /// Disbanding → Disbanded: tells the peer (bounded), then records the end either way.
    async fn finish_disband(
        &self,
        a: ArrangementRecord,
        cause: &DisbandCause,
    ) -> Result<ArrangementRecord, DisbandError> {
        let ours = self.local_usage(&a.id);
        self.record_local_final(&a.id, &ours);
        // Terminated for cause (served corrupted content): the agreed penalty in full.
        let breaches = if cause.reason == pb::DisbandReason::Dishonest {
            u32::MAX
        } else {
            self.breaches_of(&a.id)
        };
        let settlement = a.terms.as_ref().map(|t| settle(t, &ours, breaches));
        let mut detail = format!("{}: {}", cause.reason.as_str_name(), cause.detail);
        if let Some(control) = self.control_of(&a) {
            let request = pb::DisbandRequest {
                arrangement_id: Self::remote_id(&a),
                reason: cause.reason as i32,
                effective_at_ms: now_ms(),
                final_usage: Some(ours),
                settlement: settlement.clone(),
            };
            let call = self.peers.disband(a.peer, &control, request);
            let timeout = self.negotiator.timeout().max(Duration::from_millis(500));
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(reply)) => {
                    if let Some(usage) = reply.final_usage {
                        self.record_peer_usage(&a.id, &usage, UsageKind::Final);
                    }
                    if let (Some(theirs), Some(mine)) = (&reply.settlement, &settlement)
                        && theirs.total_micros != mine.total_micros
                    {
                        tracing::warn!(arrangement = %a.id, theirs = theirs.total_micros,
                            ours = mine.total_micros, "settlements differ; both counts are in the ledger");
                    }
                }
                Ok(Err(status)) => {
                    detail.push_str(&format!(
                        " (the peer answered {:?}: {})",
                        status.code(),
                        status.message()
                    ));
                }
                Err(_) => detail.push_str(" (the peer did not answer; settled on our count)"),
            }
        } else {
            detail.push_str(" (no control endpoint of the peer known; settled on our count)");
        }
        let ended = self.store.transition(
            &a.id,
            &[State::Disbanding],
            State::Disbanded,
            now_ms(),
            &detail,
            ArrangementChanges {
                end_reason: Some(detail.clone()),
                settlement,
                ..ArrangementChanges::default()
            },
        )?;
        Self::lock(&self.misses).remove(&a.id);
        Self::lock(&self.unconfirmed).remove(&a.id);
        tracing::info!(arrangement = %a.id, peer = %a.peer.short(), %detail, "arrangement disbanded");
        Ok(ended)
    }

    /// Tells the provider of a cancelled primary arrangement (decline an open offer, disband
    /// an accepted one). Best effort: the provider lets them lapse anyway.
    async fn tell_cancelled(&self, a: &ArrangementRecord) {
        if a.role != Role::Primary {
            return;
        }
        let Some(control) = self.control_of(a) else {
            return;
        };
        let timeout = self.negotiator.timeout().max(Duration::from_millis(500));
        let reason = a.end_reason.clone().unwrap_or_default();
        let told = match (a.peer_ref.as_ref(), a.offer_id.as_ref()) {
            (Some(_), _) => {
                let request = pb::DisbandRequest {
                    arrangement_id: Self::remote_id(a),
                    reason: pb::DisbandReason::Shutdown as i32,
                    effective_at_ms: now_ms(),
                    final_usage: None,
                    settlement: None,
                };
                tokio::time::timeout(timeout, self.peers.disband(a.peer, &control, request))
                    .await
                    .map(|r| r.map(drop))
            }
            (None, Some(offer_id)) => {
                let request = pb::OfferResponse {
                    offer_id: offer_id.clone(),
                    decision: Some(pb::offer_response::Decision::Decline(pb::Decline {
                        reason: crate::policy::clip(reason),
                    })),
                };
                tokio::time::timeout(timeout, self.peers.respond(a.peer, &control, request))
                    .await
                    .map(|r| r.map(drop))
            }
            (None, None) => return,
        };
        if !matches!(told, Ok(Ok(()))) {
            tracing::debug!(arrangement = %a.id, "the provider was not told of the cancellation; it lapses there");
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// New connections/s an arrangement's terms grant.
fn granted_conn(a: &ArrangementRecord) -> u64 {
    a.terms
        .as_ref()
        .and_then(|t| t.granted)
        .map_or(0, |g| u64::from(g.new_connections_per_s))
}
