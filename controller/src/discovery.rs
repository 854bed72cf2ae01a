//! Discovery: membership gossip with [chitchat] (scuttlebutt anti-entropy and a phi-accrual
//! failure detector over UDP), carrying each node's signed advertisement.
//!
//! Every node publishes one key, `advert`: the base64 of its `SignedAdvertisement`, re-signed
//! every `advert_refresh` with a higher sequence, fresh spare capacity and a new expiry. A
//! task reads the gossiped state every gossip interval: adverts go through
//! [`Registry::insert_for`] (signature, node id = the chitchat node id's fingerprint, expiry),
//! and heartbeats drive liveness: alive while heard, suspect after `suspect_after` without a
//! new heartbeat (and not live for chitchat's detector), dead after `dead_after`, when its
//! advert is removed. Gossip is unauthenticated; see docs/discovery.md for why the signatures
//! make that acceptable and what they do not protect.
//!
//! [chitchat]: https://docs.rs/chitchat

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex as StdMutex, PoisonError},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use chitchat::{
    Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
    spawn_chitchat,
    transport::{Socket, Transport, UdpSocket},
};
use prost::Message;
use tokio::{
    sync::{Mutex, Notify, watch},
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};

use crate::{
    config,
    identity::NodeIdentity,
    model::{Fingerprint, UnixMs, now_ms},
    proto::{self, MAX_MESSAGE_BYTES, ProtoError, pb},
    registry::{Liveness, Registry, RegistryError},
};

/// Chitchat cluster id: nodes of another protocol version never merge state with ours.
pub const CLUSTER_ID: &str = "p2pcdn-v1";
/// The chitchat key that carries the advert.
pub const ADVERT_KEY: &str = "advert";
/// Longest base64 advert value decoded (a `SignedAdvertisement` within the message limit).
const MAX_ADVERT_VALUE: usize = (MAX_MESSAGE_BYTES + 128) / 3 * 4 + 4;
/// Most gossip members tracked for liveness; chitchat's own state is the first bound.
const MAX_TRACKED: usize = 4 * crate::registry::MAX_NODES;
/// Shortest gossip interval accepted.
pub const MIN_GOSSIP_INTERVAL: Duration = Duration::from_millis(10);
/// How often expired adverts are swept from the registry.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// What discovery needs from the configuration (`[discovery]`, plus `[node]` for the advert).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// UDP address to bind; port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// Address peers gossip to; `None`: the bound address (which must then be specified).
    pub advertise: Option<SocketAddr>,
    /// Seed nodes, `host:port` (host names are resolved again every minute by chitchat).
    pub seeds: Vec<String>,
    pub gossip_interval: Duration,
    /// Lifetime of each signed advert.
    pub advert_ttl: Duration,
    /// How often the advert is signed again.
    pub advert_refresh: Duration,
    /// Without a new heartbeat for this long a node is suspect.
    pub suspect_after: Duration,
    /// Without a new heartbeat for this long a node is dead and its advert removed.
    pub dead_after: Duration,
}

impl Default for DiscoveryConfig {
    /// The documented defaults of `[discovery]`.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7946)),
            advertise: None,
            seeds: Vec::new(),
            gossip_interval: Duration::from_millis(500),
            advert_ttl: Duration::from_secs(60),
            advert_refresh: Duration::from_secs(10),
            suspect_after: Duration::from_millis(3000),
            dead_after: Duration::from_millis(15000),
        }
    }
}

impl DiscoveryConfig {
    /// The relations between the timings that discovery relies on.
    pub fn validate(&self) -> Result<(), DiscoveryError> {
        let bad = |reason: String| Err(DiscoveryError::Config(reason));
        if self.gossip_interval < MIN_GOSSIP_INTERVAL {
            return bad(format!(
                "gossip interval {} ms is below {} ms",
                self.gossip_interval.as_millis(),
                MIN_GOSSIP_INTERVAL.as_millis()
            ));
        }
        if self.dead_after <= self.suspect_after {
            return bad("dead_after must be longer than suspect_after".to_owned());
        }
        if self.advert_refresh.is_zero() || self.advert_ttl <= self.advert_refresh {
            return bad(
                "advert_ttl must be longer than advert_refresh (and refresh above 0)".to_owned(),
            );
        }
        if self.advert_ttl.as_millis() > u128::from(proto::MAX_ADVERT_TTL_MS.unsigned_abs()) {
            return bad(format!(
                "advert_ttl is above the protocol's limit of {} s",
                proto::MAX_ADVERT_TTL_MS / 1000
            ));
        }
        Ok(())
    }
}

impl From<&config::DiscoveryConfig> for DiscoveryConfig {
    /// The `[discovery]` section, already validated by [`config::Config::load`].
    fn from(c: &config::DiscoveryConfig) -> Self {
        Self {
            listen: c.gossip_listen,
            advertise: c.advertise_gossip,
            seeds: c.seeds.clone(),
            gossip_interval: Duration::from_millis(c.gossip_interval_ms),
            advert_ttl: Duration::from_secs(c.advert_ttl_s),
            advert_refresh: Duration::from_secs(c.advert_refresh_s),
            suspect_after: Duration::from_millis(c.suspect_after_ms),
            dead_after: Duration::from_millis(c.dead_after_ms),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("discovery: {0}")]
    Config(String),
    #[error("discovery: cannot bind gossip socket {addr}/udp: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error(
        "discovery: gossip listens on the unspecified address {0}; set discovery.advertise_gossip"
    )]
    UnspecifiedAdvertise(SocketAddr),
    #[error("discovery: this node's own advertisement is invalid: {0}")]
    OwnAdvert(#[from] ProtoError),
    #[error("discovery: cannot start gossip: {0}")]
    Start(String),
    #[error("discovery: {0}")]
    Registry(#[from] RegistryError),
}

/// Hands chitchat the socket bound before it started (so port 0 works and the advertised
/// address is the real one).
struct PreBound(StdMutex<Option<Box<dyn Socket>>>);

impl Transport for PreBound {
    fn open<'life0, 'async_trait>(
        &'life0 self,
        listen_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<Box<dyn Socket>>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let socket = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        Box::pin(async move {
            socket.ok_or_else(|| anyhow::anyhow!("gossip socket for {listen_addr} already taken"))
        })
    }
}

/// The closure the daemon gives: this node's advert as of now (spare capacity, endpoints,
/// footprint, modes). Discovery fills node id, key, gossip endpoint, sequence, times.
pub type AdvertSource = Arc<dyn Fn() -> pb::Advertisement + Send + Sync + 'static>;

/// Prefix of the chitchat keys that carry signed statements besides the advert (reputation
/// reports: `rep:<subject fingerprint>`).
pub const BOARD_PREFIX: &str = "rep:";
/// Longest board value read from another node (a base64 signed report).
pub const MAX_BOARD_VALUE: usize = 4096;

/// Signed statements spread with the membership gossip: each node publishes its own under
/// [`BOARD_PREFIX`] keys in its chitchat state, and reads everyone else's. Values are opaque
/// here; their signatures are checked by whoever reads them.
#[derive(Clone)]
pub struct Board {
    chitchat: Arc<Mutex<Chitchat>>,
    self_id: Fingerprint,
}

/// One statement read from the board.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoardEntry {
    /// The node whose gossip state carries it (not yet verified to be its author).
    pub from: Fingerprint,
    /// The key without [`BOARD_PREFIX`].
    pub key: String,
    pub value: String,
    /// Chitchat's version of the key: a changed statement has a higher one.
    pub version: u64,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board")
            .field("self_id", &self.self_id)
            .finish_non_exhaustive()
    }
}

impl Board {
    /// Publishes (or replaces) this node's statement under `key`.
    pub async fn publish(&self, key: &str, value: &str) {
        self.chitchat
            .lock()
            .await
            .self_node_state()
            .set(format!("{BOARD_PREFIX}{key}"), value);
    }

    /// Every other live or recently seen node's statements; oversized values are skipped.
    pub async fn read(&self) -> Vec<BoardEntry> {
        let chitchat = self.chitchat.lock().await;
        let mut out = Vec::new();
        for (id, state) in chitchat.node_states() {
            let Ok(from) = id.node_id.parse::<Fingerprint>() else {
                continue;
            };
            if from == self.self_id {
                continue;
            }
            for (key, versioned) in state.iter_prefix(BOARD_PREFIX) {
                if versioned.is_deleted() || versioned.value.len() > MAX_BOARD_VALUE {
                    continue;
                }
                out.push(BoardEntry {
                    from,
                    key: key[BOARD_PREFIX.len()..].to_owned(),
                    value: versioned.value.clone(),
                    version: versioned.version,
                });
            }
        }
        out
    }
}

/// The running discovery. [`Discovery::shutdown`] stops it; dropping it aborts it.
pub struct Discovery {
    chitchat: Option<ChitchatHandle>,
    task: Option<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    refresh: Arc<Notify>,
    registry: Registry,
    gossip_addr: SocketAddr,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("gossip_addr", &self.gossip_addr)
            .field("self_id", &self.registry.self_id())
            .finish_non_exhaustive()
    }
}

/// Starts gossip: binds the UDP socket, signs and publishes this node's advert, and spawns
/// the task that feeds the registry.
pub async fn start(
    cfg: DiscoveryConfig,
    identity: Arc<NodeIdentity>,
    registry: Registry,
    advert_source: impl Fn() -> pb::Advertisement + Send + Sync + 'static,
) -> Result<Discovery, DiscoveryError> {
    cfg.validate()?;
    if cfg.suspect_after < cfg.gossip_interval * 2 {
        tracing::warn!(
            suspect_after_ms = cfg.suspect_after.as_millis(),
            gossip_interval_ms = cfg.gossip_interval.as_millis(),
            "suspect_after is under two gossip intervals: healthy peers will flap to suspect"
        );
    }
    let socket = UdpSocket::open(cfg.listen)
        .await
        .map_err(|e| DiscoveryError::Bind {
            addr: cfg.listen,
            reason: format!("{e:#}"),
        })?;
    let bound = socket.local_addr().map_err(|e| DiscoveryError::Bind {
        addr: cfg.listen,
        reason: format!("{e:#}"),
    })?;
    let gossip_addr = match cfg.advertise {
        Some(mut addr) => {
            if addr.port() == 0 {
                addr.set_port(bound.port());
            }
            addr
        }
        None => bound,
    };
    if gossip_addr.ip().is_unspecified() {
        return Err(DiscoveryError::UnspecifiedAdvertise(gossip_addr));
    }

    let source: AdvertSource = Arc::new(advert_source);
    let mut publisher = Publisher {
        identity: identity.clone(),
        source,
        registry: registry.clone(),
        gossip: gossip_addr.to_string(),
        ttl_ms: i64::try_from(cfg.advert_ttl.as_millis()).unwrap_or(i64::MAX),
        sequence: 0,
    };
    let first = publisher.sign(now_ms())?;

    let generation = u64::try_from(now_ms()).unwrap_or(0);
    let chitchat_id = ChitchatId::new(identity.fingerprint.to_string(), generation, gossip_addr);
    let interval = cfg.gossip_interval;
    // Phi = time since the last heartbeat / mean interval between heartbeats: with the prior
    // at the gossip interval, the detector flags a node after about `suspect_after`.
    let phi_threshold = (cfg.suspect_after.as_secs_f64() / interval.as_secs_f64()).max(2.0);
    let config = ChitchatConfig {
        chitchat_id,
        cluster_id: CLUSTER_ID.to_owned(),
        gossip_interval: interval,
        listen_addr: bound,
        seed_nodes: cfg.seeds.clone(),
        failure_detector_config: FailureDetectorConfig {
            phi_threshold,
            sampling_window_size: 1000,
            max_interval: cfg.dead_after,
            initial_interval: interval,
            // Chitchat forgets a dead node's state (and stops gossiping it) this long after
            // declaring it dead; our own dead_after has passed by then.
            dead_node_grace_period: cfg.dead_after * 4,
        },
        marked_for_deletion_grace_period: cfg.dead_after * 4,
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V1,
    };
    let transport = PreBound(StdMutex::new(Some(Box::new(socket))));
    let handle = spawn_chitchat(config, vec![(ADVERT_KEY.to_owned(), first)], &transport)
        .await
        .map_err(|e| DiscoveryError::Start(format!("{e:#}")))?;

    let (stop, stop_rx) = watch::channel(false);
    let refresh = Arc::new(Notify::new());
    let watcher = Watcher {
        chitchat: handle.chitchat(),
        registry: registry.clone(),
        self_id: identity.fingerprint,
        suspect_after: cfg.suspect_after,
        dead_after: cfg.dead_after,
        ids: HashMap::new(),
        tracks: HashMap::new(),
    };
    let task = tokio::spawn(run(
        watcher,
        publisher,
        cfg.clone(),
        stop_rx,
        refresh.clone(),
    ));
    tracing::info!(gossip = %gossip_addr, seeds = ?cfg.seeds, "discovery started");
    Ok(Discovery {
        chitchat: Some(handle),
        task: Some(task),
        stop,
        refresh,
        registry,
        gossip_addr,
    })
}

impl Discovery {
    /// The address peers gossip to (the bound port when configured with port 0).
    pub fn gossip_addr(&self) -> SocketAddr {
        self.gossip_addr
    }

    /// How many other nodes are alive with an unexpired advert.
    pub fn known(&self) -> usize {
        self.registry.known(now_ms())
    }

    /// The board of signed statements spread with this node's gossip.
    pub fn board(&self) -> Option<Board> {
        self.chitchat.as_ref().map(|handle| Board {
            chitchat: handle.chitchat(),
            self_id: self.registry.self_id(),
        })
    }

    /// Fires whenever the registry changes (an advert or a liveness).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.registry.subscribe()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Signs and publishes the advert now (e.g. after a large change of spare capacity)
    /// instead of at the next refresh.
    pub fn refresh_now(&self) {
        self.refresh.notify_one();
    }

    /// A handle that asks for a fresh advert like [`Discovery::refresh_now`], for tasks that
    /// do not own the `Discovery`.
    pub fn refresher(&self) -> Refresher {
        Refresher(self.refresh.clone())
    }

    /// Stops the task and the gossip server (the UDP socket is closed when this returns).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            tracing::warn!(%error, "discovery task ended abnormally");
        }
        if let Some(chitchat) = self.chitchat.take()
            && let Err(error) = chitchat.shutdown().await
        {
            tracing::warn!(error = %format!("{error:#}"), "gossip server ended with an error");
        }
    }
}

/// See [`Discovery::refresher`].
#[derive(Debug, Clone)]
pub struct Refresher(Arc<Notify>);

impl Refresher {
    /// Signs and publishes the advert now instead of at the next refresh.
    pub fn refresh_now(&self) {
        self.0.notify_one();
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        if let Some(chitchat) = &self.chitchat {
            chitchat.abort();
        }
    }
}

/// Signs this node's advert.
struct Publisher {
    identity: Arc<NodeIdentity>,
    source: AdvertSource,
    registry: Registry,
    gossip: String,
    ttl_ms: i64,
    sequence: u64,
}

impl Publisher {
    /// Signs the current advert and returns the gossip value. The sequence is at least the
    /// current time in ms, so it keeps increasing across restarts without being stored.
    fn sign(&mut self, now: UnixMs) -> Result<String, ProtoError> {
        let mut ad = (self.source)();
        let floor = u64::try_from(now).unwrap_or(0);
        self.sequence = self.sequence.saturating_add(1).max(floor);
        ad.sequence = self.sequence;
        if ad.measured_at_ms == 0 {
            ad.measured_at_ms = now;
        }
        ad.expires_at_ms = now.saturating_add(self.ttl_ms);
        let endpoints = ad.endpoints.get_or_insert_with(Default::default);
        if endpoints.gossip.is_empty() {
            endpoints.gossip.clone_from(&self.gossip);
        }
        let signed = proto::sign_advertisement(&self.identity, &ad);
        // What every receiver will check, checked here first: a bad advert is our bug.
        let opened = proto::open_advertisement(&signed, now)?;
        let value = BASE64.encode(signed.encode_to_vec());
        self.registry.set_own(opened, signed, now);
        Ok(value)
    }
}

/// What the watcher remembers of one chitchat member (node id + generation + address).
struct SeenId {
    fingerprint: Fingerprint,
    /// Version of the `advert` value last handed to the registry.
    advert_version: u64,
}

/// Liveness bookkeeping of one node (all its generations).
struct Track {
    heartbeat: HashMap<u64, u64>,
    last_heard: Instant,
    /// Heard a heartbeat move (or chitchat's detector said live): a state merely relayed for a
    /// node that has since died is not enough to believe it alive.
    confirmed: bool,
}

/// Turns the gossiped state into registry inserts and liveness.
struct Watcher {
    chitchat: Arc<Mutex<Chitchat>>,
    registry: Registry,
    self_id: Fingerprint,
    suspect_after: Duration,
    dead_after: Duration,
    ids: HashMap<ChitchatId, SeenId>,
    tracks: HashMap<Fingerprint, Track>,
}

/// One member's state as read under the chitchat lock.
struct Observed {
    id: ChitchatId,
    fingerprint: Fingerprint,
    heartbeat: u64,
    /// `(version, value)` when the advert changed since last handed over.
    advert: Option<(u64, String)>,
}

impl Watcher {
    /// Loaded registry entries (from the store) start as if last heard `suspect_after` ago:
    /// they turn dead unless gossip hears from them.
    fn adopt_registry(&mut self, now: Instant) {
        let heard = now.checked_sub(self.suspect_after).unwrap_or(now);
        for fingerprint in self.registry.nodes() {
            self.tracks.entry(fingerprint).or_insert(Track {
                heartbeat: HashMap::new(),
                last_heard: heard,
                confirmed: true,
            });
        }
    }

    async fn observe(&mut self) -> (Vec<Observed>, HashSet<Fingerprint>) {
        let chitchat = self.chitchat.lock().await;
        let live: HashSet<Fingerprint> = chitchat
            .live_nodes()
            .filter_map(|id| id.node_id.parse().ok())
            .collect();
        let mut observed = Vec::new();
        for (id, state) in chitchat.node_states() {
            let Ok(fingerprint) = id.node_id.parse::<Fingerprint>() else {
                continue;
            };
            if fingerprint == self.self_id {
                continue;
            }
            let known_version = self.ids.get(id).map(|s| s.advert_version);
            let advert = state
                .get_versioned(ADVERT_KEY)
                .filter(|v| !v.is_deleted() && Some(v.version) != known_version)
                .map(|v| (v.version, v.value.clone()));
            observed.push(Observed {
                id: id.clone(),
                fingerprint,
                heartbeat: u64::from(state.heartbeat()),
                advert,
            });
        }
        (observed, live)
    }

    async fn tick(&mut self) {
        let (observed, live) = self.observe().await;
        let now = Instant::now();
        let wall = now_ms();
        let mut present = HashSet::new();
        let mut adverts = Vec::new();
        for member in observed {
            present.insert(member.id.clone());
            if !self.tracks.contains_key(&member.fingerprint) && self.tracks.len() >= MAX_TRACKED {
                continue;
            }
            let track = self.tracks.entry(member.fingerprint).or_insert(Track {
                heartbeat: HashMap::new(),
                last_heard: now,
                confirmed: false,
            });
            match track
                .heartbeat
                .insert(member.id.generation_id, member.heartbeat)
            {
                Some(previous) if previous != member.heartbeat => {
                    track.last_heard = now;
                    track.confirmed = true;
                }
                None if track.confirmed => track.last_heard = now,
                _ => {}
            }
            if live.contains(&member.fingerprint) {
                track.confirmed = true;
            }
            self.ids.entry(member.id.clone()).or_insert(SeenId {
                fingerprint: member.fingerprint,
                advert_version: 0,
            });
            if let Some(advert) = member.advert {
                adverts.push((member.id, member.fingerprint, advert));
            }
        }
        // Members chitchat forgot: forget their generation's heartbeat too.
        self.ids.retain(|id, _| present.contains(id));

        // Liveness first, so that a node found dead does not get its advert back below.
        let mut states = HashMap::new();
        for (fingerprint, track) in &self.tracks {
            if !track.confirmed {
                continue;
            }
            let quiet = now.saturating_duration_since(track.last_heard);
            let liveness = if quiet >= self.dead_after {
                Liveness::Dead
            } else if quiet < self.suspect_after || live.contains(fingerprint) {
                Liveness::Alive
            } else {
                Liveness::Suspect
            };
            states.insert(*fingerprint, liveness);
            match self.registry.set_liveness(fingerprint, liveness, wall) {
                Ok(true) => {
                    tracing::info!(node.id = %fingerprint.short(), liveness = liveness.as_str(), "peer liveness");
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(node.id = %fingerprint.short(), %error, "recording liveness")
                }
            }
        }
        for (id, fingerprint, (version, value)) in adverts {
            match states.get(&fingerprint) {
                // Not confirmed yet: try again next tick.
                None => continue,
                // Dead: its advert is handed over again once it lives (version reset below).
                Some(Liveness::Dead) => continue,
                Some(_) => {}
            }
            if let Some(seen) = self.ids.get_mut(&id) {
                seen.advert_version = version;
            }
            match decode_advert(&value) {
                Ok(signed) => match self.registry.insert_for(&fingerprint, &signed, wall) {
                    Ok(_) => {}
                    Err(error) => tracing::warn!(
                        node.id = %fingerprint.short(), gossip = %id.gossip_advertise_addr, %error,
                        "gossiped advertisement refused"
                    ),
                },
                Err(error) => tracing::warn!(
                    node.id = %fingerprint.short(), gossip = %id.gossip_advertise_addr, %error,
                    "gossiped advertisement refused"
                ),
            }
        }
        // A dead node's advert will be needed again if it comes back.
        for seen in self.ids.values_mut() {
            if states.get(&seen.fingerprint) == Some(&Liveness::Dead) {
                seen.advert_version = 0;
            }
        }
        // Forget dead nodes chitchat no longer gossips about.
        let gossiped: HashSet<Fingerprint> = self.ids.values().map(|s| s.fingerprint).collect();
        self.tracks.retain(|fingerprint, track| {
            gossiped.contains(fingerprint)
                || (track.confirmed && states.get(fingerprint) != Some(&Liveness::Dead))
        });
    }
}

fn decode_advert(value: &str) -> Result<pb::SignedAdvertisement, ProtoError> {
    if value.len() > MAX_ADVERT_VALUE {
        return Err(ProtoError::TooLarge {
            what: "gossiped advertisement",
            size: value.len(),
            limit: MAX_ADVERT_VALUE,
        });
    }
    let bytes = BASE64.decode(value).map_err(|e| ProtoError::Decode {
        what: "gossiped advertisement",
        reason: e.to_string(),
    })?;
    pb::SignedAdvertisement::decode(bytes.as_slice()).map_err(|e| ProtoError::Decode {
        what: "gossiped advertisement",
        reason: e.to_string(),
    })
}

async fn run(
    mut watcher: Watcher,
    mut publisher: Publisher,
    cfg: DiscoveryConfig,
    mut stop: watch::Receiver<bool>,
    refresh_now: Arc<Notify>,
) {
    watcher.adopt_registry(Instant::now());
    let mut gossip = tokio::time::interval(cfg.gossip_interval);
    gossip.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut refresh =
        tokio::time::interval_at(Instant::now() + cfg.advert_refresh, cfg.advert_refresh);
    refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    expire.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Chitchat updates this after each gossip round in which membership or a member's state
    // changed: reading the state then saves up to one interval against the ticks alone.
    let mut members = watcher.chitchat.lock().await.live_nodes_watcher();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = gossip.tick() => watcher.tick().await,
            Ok(()) = members.changed() => {
                watcher.tick().await;
                // The state was just read: the next periodic read can wait a full interval.
                gossip.reset();
            }
            _ = refresh.tick() => publish(&mut publisher, &watcher.chitchat).await,
            () = refresh_now.notified() => publish(&mut publisher, &watcher.chitchat).await,
            _ = expire.tick() => {
                if let Err(error) = watcher.registry.expire(now_ms()) {
                    tracing::warn!(%error, "expiring adverts");
                }
            }
        }
    }
}

async fn publish(publisher: &mut Publisher, chitchat: &Mutex<Chitchat>) {
    match publisher.sign(now_ms()) {
        Ok(value) => chitchat
            .lock()
            .await
            .self_node_state()
            .set(ADVERT_KEY, value),
        // Keep gossiping the previous advert until it expires; the daemon's source is wrong.
        Err(error) => tracing::error!(%error, "cannot refresh this node's advertisement"),
    }
}
