//! Arrangements become data-plane state (step 7 of the seed's process, and the provider's
//! side of step 6).
//!
//! - **Primary**: an active arrangement is a peer of the XDP program: its decapsulation
//!   address, the encapsulation of the agreed mode, the agreed new connections per second as
//!   the peer's rate and as its Maglev weight, for the arrangement's service only. Draining
//!   sets the weight to 0 (no new flows; established ones keep going to the peer); the end
//!   removes the peer.
//! - **Provider**: the primary's tunnel sources go on the decapsulation allow-list; with a
//!   surrogate, the primary's signed manifest is fetched and verified, the arrangement becomes
//!   a tenant of the surrogate, its service addresses go on `lo` and the surrogate listens on
//!   them (DSR: the decapsulated packets are addressed to the service address), and the hot set
//!   is prepositioned in the background. The end undoes each of these, shared state (an
//!   address, a tunnel source) only when no other arrangement still uses it.
//!
//! Everything runs behind [`ArrangementHooks`], which the daemon calls off its async workers:
//! map updates and netlink requests block, and the provider's manifest fetch is awaited with a
//! bounded time.

pub mod loopback;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use redirector_user::{Dataplane, Encap, PeerServices, PeerSpec};
use tokio::sync::watch;

use crate::{
    accounting::{Reading, UsageCounter},
    model::{Fingerprint, Role, now_ms},
    peering_agent::ArrangementHooks,
    proto::pb,
    store::{ArrangementRecord, Store, UsageEntry, UsageKind, UsageSource},
    surrogate::{Budgets, Surrogate, Tenant},
};

/// The data plane as the controller holds it: one writer at a time.
pub type SharedDataplane = Arc<Mutex<Box<dyn Dataplane + Send>>>;

/// How arrangements are put into the data plane.
#[derive(Debug, Clone)]
pub struct SteeringSettings {
    /// GUE destination port at providers (the redirector's default unless they say otherwise).
    pub gue_port: u16,
    /// MTU of the paths to providers (steered SYNs get their MSS clamped to fit the tunnel).
    pub mtu: u16,
    /// Provider: largest object the surrogate accepts for one arrangement.
    pub max_object_bytes: u64,
    /// Provider: bytes the surrogate stores for one arrangement (each tier).
    pub storage_bytes: u64,
    /// Provider: put the primary's service addresses on `lo` (needs CAP_NET_ADMIN).
    pub manage_loopback: bool,
    /// Provider: time for fetching and verifying the primary's manifest at activation.
    pub manifest_timeout: Duration,
    /// Provider: `Access-Control-Allow-Origin` for the primary's objects.
    pub allow_origin: Option<String>,
}

impl Default for SteeringSettings {
    fn default() -> Self {
        Self {
            gue_port: PeerSpec::new("default", IpAddr::from([0, 0, 0, 0])).gue_port,
            mtu: 1500,
            max_object_bytes: 1 << 30,
            storage_bytes: 1 << 30,
            manage_loopback: true,
            manifest_timeout: Duration::from_secs(2),
            allow_origin: None,
        }
    }
}

/// The data-plane side of arrangements. Cheap to clone.
#[derive(Clone)]
pub struct Steering {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("settings", &self.inner.settings)
            .field("surrogate", &self.inner.surrogate.is_some())
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Store,
    dataplane: SharedDataplane,
    surrogate: Option<Surrogate>,
    settings: SteeringSettings,
    provider: Mutex<ProviderState>,
    /// Keeps the ledger cumulative when data-plane counters restart.
    counter: Mutex<UsageCounter>,
    /// Primary: each provider's trust factor in `[0, 1]` (1 when not set), which scales its
    /// Maglev weight: weights ∝ capacity × trust.
    trust: Mutex<HashMap<Fingerprint, f64>>,
}

/// What active provider arrangements share, by user.
#[derive(Default)]
struct ProviderState {
    /// Tunnel source → arrangements allowing it.
    sources: HashMap<IpAddr, HashSet<String>>,
    /// Service address → the listener serving it.
    listeners: HashMap<SocketAddr, Listener>,
    /// Arrangement → its tunnel sources' decapsulation counters when it activated: the
    /// per-sender counters belong to the source, so an arrangement's share starts there.
    baselines: HashMap<String, HashMap<IpAddr, (u64, u64)>>,
}

struct Listener {
    users: HashSet<String>,
    /// Whether we put the address on `lo` (and so remove it at the end).
    added_to_lo: bool,
    stop: watch::Sender<bool>,
}

/// The name of an arrangement's peer in the data plane (≤ 31 characters of
/// `[A-Za-z0-9._-]`; stable, so its Maglev positions survive restarts).
pub fn peer_name(arrangement_id: &str) -> String {
    let clean: String = arrangement_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .collect();
    if clean.len() <= 31 {
        return clean;
    }
    // Keep the prefix ("a-") and as many of the random hex digits as fit.
    clean.chars().take(31).collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Steering {
    pub fn new(
        store: Store,
        dataplane: SharedDataplane,
        surrogate: Option<Surrogate>,
        settings: SteeringSettings,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                dataplane,
                surrogate,
                settings,
                provider: Mutex::new(ProviderState::default()),
                counter: Mutex::new(UsageCounter::default()),
                trust: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The data plane (for the monitor's counters and the operator's views).
    pub fn dataplane(&self) -> &SharedDataplane {
        &self.inner.dataplane
    }

    pub fn surrogate(&self) -> Option<&Surrogate> {
        self.inner.surrogate.as_ref()
    }

    /// Primary: the peer spec of an active arrangement.
    pub fn peer_spec(&self, a: &ArrangementRecord) -> Result<PeerSpec, String> {
        let terms = a.terms.as_ref().ok_or("the arrangement has no terms")?;
        let service = a
            .service
            .as_ref()
            .map(|s| s.name.clone())
            .filter(|s| !s.is_empty())
            .ok_or("the arrangement names no service")?;
        let endpoints = a
            .peer_endpoints
            .as_ref()
            .ok_or("the provider's endpoints are unknown")?;
        let addr = decap_address(endpoints)?;
        let encap = match pb::RedirectionMode::try_from(terms.mode) {
            Ok(pb::RedirectionMode::DsrGue) => Encap::Gue,
            Ok(pb::RedirectionMode::DsrIpip) => Encap::Ipip,
            Ok(other) => {
                return Err(format!(
                    "mode {} is not steered by the data plane",
                    other.as_str_name()
                ));
            }
            Err(_) => return Err(format!("unknown mode {}", terms.mode)),
        };
        let rate = terms
            .granted
            .as_ref()
            .map_or(0, |g| g.new_connections_per_s);
        if rate == 0 {
            return Err("the arrangement grants no connections".to_owned());
        }
        let mut spec = PeerSpec::new(peer_name(&a.id), addr);
        spec.encap = encap;
        spec.gue_port = self.inner.settings.gue_port;
        spec.mtu = self.inner.settings.mtu;
        // Maglev weight ∝ the capacity the provider agreed to take × how far it is trusted.
        spec.weight = weight(rate, self.trust_factor(&a.peer));
        spec.rate = Some(rate);
        spec.services = PeerServices::Only(vec![service]);
        Ok(spec)
    }

    /// Primary: the trust factor of `peer` (1 when none was set).
    pub fn trust_factor(&self, peer: &Fingerprint) -> f64 {
        lock(&self.inner.trust).get(peer).copied().unwrap_or(1.0)
    }

    /// Primary: sets `peer`'s trust factor (clamped to `[0, 1]`) for this and later
    /// activations, and rewrites the weights of `active`, its arrangements in the data plane.
    /// Factor 0 takes the peer out of the Maglev table (new flows only).
    pub fn set_trust_factor(
        &self,
        peer: Fingerprint,
        factor: f64,
        active: &[ArrangementRecord],
    ) -> Result<(), String> {
        let factor = if factor.is_finite() {
            factor.clamp(0.0, 1.0)
        } else {
            0.0
        };
        lock(&self.inner.trust).insert(peer, factor);
        let configured: HashSet<String> = lock(&self.inner.dataplane)
            .peers()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|p| p.name)
            .collect();
        for a in active
            .iter()
            .filter(|a| a.peer == peer && a.role == Role::Primary)
        {
            let spec = self.peer_spec(a)?;
            if !configured.contains(&spec.name) {
                continue;
            }
            lock(&self.inner.dataplane)
                .set_peer(&spec)
                .map_err(|e| format!("cannot reweigh peer {}: {e}", spec.name))?;
        }
        Ok(())
    }

    /// Primary: no new flows to the arrangement's peer; established ones keep going to it.
    pub fn drain(&self, a: &ArrangementRecord) -> Result<(), String> {
        let mut spec = self.peer_spec(a)?;
        spec.weight = 0;
        lock(&self.inner.dataplane)
            .set_peer(&spec)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Primary: the data plane's counters of the arrangement's peer (connections, packets,
    /// bytes since it was configured), `None` when it is not configured.
    pub fn peer_counters(
        &self,
        a: &ArrangementRecord,
    ) -> Result<Option<redirector_user::PeerCounters>, String> {
        let name = peer_name(&a.id);
        let stats = lock(&self.inner.dataplane)
            .stats()
            .map_err(|e| e.to_string())?;
        Ok(stats.peer(&name).cloned())
    }

    /// This side's raw counts of an active arrangement, `None` when the data plane has none:
    /// the primary's are the XDP counters of the arrangement's peer (connections steered,
    /// packets and bytes tunnelled); the provider's are the requests its surrogate answered
    /// for the arrangement and the packets and bytes its XDP program decapsulated from the
    /// primary's tunnel sources since the arrangement activated (the same inner-packet bytes
    /// the primary counts, so the two sides reconcile).
    pub fn usage(&self, a: &ArrangementRecord) -> Result<Option<Reading>, String> {
        match a.role {
            Role::Primary => Ok(self.peer_counters(a)?.map(|c| Reading {
                connections: c.connections,
                bytes: c.bytes,
                packets: c.packets,
            })),
            Role::Provider => self.provider_usage(a),
        }
    }

    fn provider_usage(&self, a: &ArrangementRecord) -> Result<Option<Reading>, String> {
        let surrogate = self.inner.surrogate.as_ref();
        let requests = |id: &str| surrogate.and_then(|s| s.usage(id)).map(|u| u.requests);
        let state = lock(&self.inner.provider);
        let Some(baseline) = state.baselines.get(&a.id) else {
            return Ok(requests(&a.id).map(|r| Reading {
                connections: r,
                ..Reading::default()
            }));
        };
        let decap = lock(&self.inner.dataplane)
            .decap_stats()
            .map_err(|e| e.to_string())?;
        let mut reading = Reading {
            connections: requests(&a.id).unwrap_or(0),
            ..Reading::default()
        };
        for (source, &(base_packets, base_bytes)) in baseline {
            let Some(now) = decap.iter().find(|c| c.addr == *source) else {
                continue;
            };
            let (packets, bytes) = since(base_packets, base_bytes, now);
            // A source shared by several active arrangements of the same primary (two of its
            // services at once): its count is split by the requests each one answered.
            let sharers = state.sources.get(source).map_or(1, HashSet::len);
            let (packets, bytes) = if sharers > 1 {
                let all: u64 = state.sources[source]
                    .iter()
                    .map(|id| requests(id).unwrap_or(0))
                    .sum();
                let ours = requests(&a.id).unwrap_or(0);
                (share(packets, ours, all), share(bytes, ours, all))
            } else {
                (packets, bytes)
            };
            reading.packets = reading.packets.saturating_add(packets);
            reading.bytes = reading.bytes.saturating_add(bytes);
        }
        Ok(Some(reading))
    }

    /// Records this side's cumulative counts of active arrangement `a` in the usage ledger
    /// (source `local`); heartbeats and the disband carry them to the peer.
    pub fn record_usage(&self, a: &ArrangementRecord) -> Result<(), String> {
        let Some(raw) = self.usage(a)? else {
            return Ok(());
        };
        let store = &self.inner.store;
        let (recorded, _) = store.usage_totals(&a.id).map_err(|e| e.to_string())?;
        let total = lock(&self.inner.counter).total(&a.id, raw, recorded.into());
        if total == Reading::from(recorded) && recorded.at_ms != 0 {
            return Ok(());
        }
        store
            .record_usage(&UsageEntry {
                arrangement: a.id.clone(),
                at_ms: now_ms(),
                source: UsageSource::Local,
                kind: UsageKind::Heartbeat,
                connections: total.connections,
                bytes: total.bytes,
                packets: total.packets,
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The last count before the data plane forgets the arrangement.
    fn record_last_usage(&self, a: &ArrangementRecord) {
        if let Err(e) = self.record_usage(a) {
            tracing::warn!(arrangement = %a.id, error = %e, "cannot record the last usage count");
        }
        lock(&self.inner.counter).forget(&a.id);
    }

    fn activate_primary(&self, a: &ArrangementRecord) -> Result<(), String> {
        let spec = self.peer_spec(a)?;
        let mut dp = lock(&self.inner.dataplane);
        dp.set_peer(&spec)
            .map_err(|e| format!("cannot configure peer {}: {e}", spec.name))?;
        tracing::info!(arrangement = %a.id, peer = %spec.name, addr = %spec.addr,
            rate = spec.rate, encap = ?spec.encap, "steering to the provider");
        Ok(())
    }

    fn end_primary(&self, a: &ArrangementRecord) {
        self.record_last_usage(a);
        let name = peer_name(&a.id);
        let mut dp = lock(&self.inner.dataplane);
        match dp.remove_peer(&name) {
            Ok(()) => tracing::info!(arrangement = %a.id, peer = %name, "peer removed"),
            Err(e) => tracing::debug!(arrangement = %a.id, peer = %name, error = %e,
                "no peer to remove"),
        }
    }

    fn activate_provider(&self, a: &ArrangementRecord) -> Result<(), String> {
        let sources = a
            .tunnel_sources
            .iter()
            .map(|s| {
                s.parse::<IpAddr>()
                    .map_err(|_| format!("tunnel source {s:?} is not an address"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        {
            let mut state = lock(&self.inner.provider);
            let mut dp = lock(&self.inner.dataplane);
            for source in &sources {
                dp.allow_decap(*source)
                    .map_err(|e| format!("cannot allow tunnels from {source}: {e}"))?;
                state
                    .sources
                    .entry(*source)
                    .or_default()
                    .insert(a.id.clone());
            }
            let counts = dp.decap_stats().unwrap_or_default();
            let baseline = sources
                .iter()
                .map(|source| {
                    let base = counts
                        .iter()
                        .find(|c| c.addr == *source)
                        .map_or((0, 0), |c| (c.packets, c.bytes));
                    (*source, base)
                })
                .collect();
            state.baselines.insert(a.id.clone(), baseline);
        }
        if let Err(e) = self.serve_content(a) {
            self.end_provider(a);
            return Err(e);
        }
        Ok(())
    }

    /// The surrogate's part of a provider's activation.
    fn serve_content(&self, a: &ArrangementRecord) -> Result<(), String> {
        let Some(surrogate) = &self.inner.surrogate else {
            return Ok(());
        };
        let service = a.service.clone().unwrap_or_default();
        let manifest_ref = a
            .requirements
            .as_ref()
            .and_then(|r| r.manifest.clone())
            .filter(|m| !m.url.is_empty())
            .ok_or("the primary named no content manifest, so the surrogate cannot serve it")?;
        let spki = self
            .inner
            .store
            .peer(&a.peer)
            .map_err(|e| e.to_string())?
            .map(|p| p.pinned_spki)
            .filter(|k| !k.is_empty())
            .ok_or("the primary's public key is not known")?;
        let expected = <[u8; 32]>::try_from(manifest_ref.sha256.as_slice()).ok();
        let url = manifest_ref.url.clone();
        let timeout = self.inner.settings.manifest_timeout;
        let fetch_spki = spki.clone();
        let manifest = block_on_bounded(timeout, async move {
            crate::surrogate::fetch_manifest(&url, expected, &fetch_spki, now_ms()).await
        })
        .map_err(|e| format!("manifest {}: {e}", manifest_ref.url))?
        .map_err(|e| format!("manifest {}: {e}", manifest_ref.url))?;

        let egress_bytes_per_s = a
            .terms
            .as_ref()
            .and_then(|t| t.granted.as_ref())
            .map_or(0, |g| u64::from(g.egress_mbps) * 125_000);
        let budgets = Budgets {
            max_object_bytes: self.inner.settings.max_object_bytes,
            total_bytes: self.inner.settings.storage_bytes,
            egress_bytes_per_s: if egress_bytes_per_s == 0 {
                u64::MAX / 4
            } else {
                egress_bytes_per_s
            },
            // One second of the agreed rate as a burst.
            egress_burst_bytes: if egress_bytes_per_s == 0 {
                u64::MAX / 4
            } else {
                egress_bytes_per_s.max(self.inner.settings.max_object_bytes.min(64 << 20))
            },
        };
        surrogate
            .add_tenant(Tenant {
                arrangement_id: a.id.clone(),
                primary: a.peer,
                primary_spki: spki,
                host_names: service.host_names.clone(),
                manifest,
                budgets,
                allow_origin: self.inner.settings.allow_origin.clone(),
            })
            .map_err(|e| e.to_string())?;

        for text in &service.addresses {
            let addr: SocketAddr = text
                .parse()
                .map_err(|_| format!("service address {text:?} is not ip:port"))?;
            self.listen(surrogate, addr, &a.id)?;
        }

        let id = a.id.clone();
        let preposition = surrogate.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let progress_id = id.clone();
                let report = preposition
                    .preposition(&id, move |done, total| {
                        tracing::debug!(arrangement = %progress_id, done, total, "prepositioning");
                    })
                    .await;
                match report {
                    Ok(r) => tracing::info!(arrangement = %id, fetched = r.fetched,
                        already = r.already_stored, skipped = r.skipped, failed = r.failed.len(),
                        bytes = r.bytes, "hot set prepositioned"),
                    Err(e) => tracing::warn!(arrangement = %id, error = %e,
                        "cannot preposition the hot set"),
                }
            });
        }
        Ok(())
    }

    /// Makes the surrogate answer on `addr` (DSR: the primary's service address on `lo`).
    fn listen(&self, surrogate: &Surrogate, addr: SocketAddr, id: &str) -> Result<(), String> {
        let mut state = lock(&self.inner.provider);
        if let Some(l) = state.listeners.get_mut(&addr) {
            l.users.insert(id.to_owned());
            return Ok(());
        }
        let added_to_lo = if self.inner.settings.manage_loopback && !addr.ip().is_loopback() {
            loopback::add(addr.ip()).map_err(|e| format!("cannot put {} on lo: {e}", addr.ip()))?
        } else {
            false
        };
        let listener = match std::net::TcpListener::bind(addr).and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        }) {
            Ok(l) => l,
            Err(e) => {
                if added_to_lo {
                    let _ = loopback::remove(addr.ip());
                }
                return Err(format!("the surrogate cannot listen on {addr}: {e}"));
            }
        };
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| "no runtime to serve the surrogate on".to_owned())?;
        let listener = {
            let _guard = handle.enter();
            tokio::net::TcpListener::from_std(listener)
                .map_err(|e| format!("the surrogate cannot listen on {addr}: {e}"))?
        };
        let (stop, mut stopped) = watch::channel(false);
        let serving = surrogate.clone();
        handle.spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = serving.serve(listener, None, shutdown).await {
                tracing::error!(%addr, error = %e, "the surrogate stopped serving");
            }
        });
        tracing::info!(%addr, arrangement = id, "surrogate listening on the service address");
        state.listeners.insert(
            addr,
            Listener {
                users: HashSet::from([id.to_owned()]),
                added_to_lo,
                stop,
            },
        );
        Ok(())
    }

    fn end_provider(&self, a: &ArrangementRecord) {
        self.record_last_usage(a);
        if let Some(surrogate) = &self.inner.surrogate {
            surrogate.remove_tenant(&a.id);
        }
        let mut state = lock(&self.inner.provider);
        state.baselines.remove(&a.id);
        let mut dp = lock(&self.inner.dataplane);
        let mut unused = Vec::new();
        for (source, users) in &mut state.sources {
            if users.remove(&a.id) && users.is_empty() {
                unused.push(*source);
            }
        }
        for source in unused {
            state.sources.remove(&source);
            if let Err(e) = dp.deny_decap(source) {
                tracing::warn!(%source, error = %e, "cannot remove a tunnel source");
            }
        }
        drop(dp);
        let mut closed = Vec::new();
        for (addr, l) in &mut state.listeners {
            if l.users.remove(&a.id) && l.users.is_empty() {
                closed.push(*addr);
            }
        }
        for addr in closed {
            if let Some(l) = state.listeners.remove(&addr) {
                let _ = l.stop.send(true);
                if l.added_to_lo
                    && let Err(e) = loopback::remove(addr.ip())
                {
                    tracing::warn!(%addr, error = %e, "cannot remove the service address from lo");
                }
            }
        }
    }
}

impl ArrangementHooks for Steering {
    fn activated(&self, a: &ArrangementRecord) -> Result<(), String> {
        match a.role {
            Role::Primary => self.activate_primary(a),
            Role::Provider => self.activate_provider(a),
        }
    }

    fn ended(&self, a: &ArrangementRecord) {
        match a.role {
            Role::Primary => self.end_primary(a),
            Role::Provider => self.end_provider(a),
        }
    }

    fn count(&self, a: &ArrangementRecord) {
        if let Err(e) = self.record_usage(a) {
            tracing::warn!(arrangement = %a.id, error = %e, "cannot count usage");
        }
    }
}

/// The Maglev weight of `rate` granted connections/s at trust `factor`: 0 only at factor 0.
fn weight(rate: u32, factor: f64) -> u32 {
    if factor <= 0.0 {
        return 0;
    }
    let scaled = (f64::from(rate) * factor.min(1.0)).round();
    (scaled as u32).max(1)
}

/// Packets and bytes counted since a baseline; a counter below its baseline was recreated
/// (the source was denied and allowed again), so all of it is new.
fn since(base_packets: u64, base_bytes: u64, now: &redirector_user::DecapCounters) -> (u64, u64) {
    if now.packets < base_packets || now.bytes < base_bytes {
        (now.packets, now.bytes)
    } else {
        (now.packets - base_packets, now.bytes - base_bytes)
    }
}

/// `total × ours / all`, rounded down; nothing when no request was answered yet.
fn share(total: u64, ours: u64, all: u64) -> u64 {
    if all == 0 {
        return 0;
    }
    u64::try_from(u128::from(total) * u128::from(ours) / u128::from(all)).unwrap_or(u64::MAX)
}

/// The provider's decapsulation address: IPv4 if it has one, else IPv6.
fn decap_address(endpoints: &pb::Endpoints) -> Result<IpAddr, String> {
    for text in [&endpoints.decap_v4, &endpoints.decap_v6] {
        if text.is_empty() {
            continue;
        }
        return text
            .parse()
            .map_err(|_| format!("the provider's decap address {text:?} is not an address"));
    }
    Err("the provider has no decapsulation address".to_owned())
}

/// Runs `future` to completion from blocking code (a hook), within `timeout`. Needs a
/// multi-threaded runtime (the daemon's); anything else is an error, never a panic.
fn block_on_bounded<F: std::future::Future>(
    timeout: Duration,
    future: F,
) -> Result<F::Output, String> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| "no runtime to fetch it with".to_owned())?;
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return Err("fetching needs the daemon's multi-threaded runtime".to_owned());
    }
    tokio::task::block_in_place(|| handle.block_on(tokio::time::timeout(timeout, future)))
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))
}

#[cfg(test)]
mod weight_tests {
    use super::weight;

    #[test]
    fn weights_scale_with_trust_and_only_zero_trust_removes_a_peer() {
        assert_eq!(weight(400, 1.0), 400);
        assert_eq!(weight(400, 0.5), 200);
        assert_eq!(
            weight(400, 0.0001),
            1,
            "a little trust keeps a little weight"
        );
        assert_eq!(weight(400, 0.0), 0);
        assert_eq!(weight(400, -1.0), 0);
        assert_eq!(weight(400, 7.0), 400, "never above the capacity's share");
    }
}
