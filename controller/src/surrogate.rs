//! The surrogate: the peer side of content delivery. An HTTP server (HTTP/1.1 and HTTP/2,
//! optional TLS) that serves a primary's objects under an active arrangement, pulling each
//! missing object once from the primary's origin and checking its size and SHA-256 against
//! the primary's signed manifest before a byte of it is served or stored.
//!
//! - Routing: by `Host` (tunnelled DSR connections arrive addressed to the primary's service
//!   names) or by `/<primary-id>/<path>` (redirect mode, the primary's fingerprint in hex).
//! - Only manifest entries are served: anything else is a 404, never an open proxy.
//! - Misses are coalesced per object (keyed by the SHA-256 the manifest gives): any number of
//!   concurrent requests cause one origin fetch.
//! - Storage per arrangement: a memory tier for small objects and a disk tier (files named by
//!   the content's SHA-256, an in-memory index), both [`moka`] caches (TinyLFU or LRU) weighed
//!   in bytes and bounded by the arrangement's `total_bytes`; the machine-wide
//!   [`SurrogateConfig::memory_bytes`] and [`SurrogateConfig::disk_bytes`] bound the sums.
//!   Files found on disk at start are checked (size at once, SHA-256 before first use) and
//!   dropped when they do not match.
//! - Egress: one token bucket per arrangement; over budget → 503 with `Retry-After`.
//! - Usage counters per arrangement ([`Surrogate::usage`]) are also exported as `metrics`
//!   counters `p2pcdn_surrogate_*_total{tenant="<arrangement id>"}`.

mod budget;
mod fill;
mod http;
mod origin;
mod server;
mod store;
mod usage;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rustls::pki_types::CertificateDer;
use tokio::{net::TcpListener, task::JoinSet};

use self::{
    origin::OriginClient,
    store::{DiskSpace, TenantStore},
    usage::Usage,
};
pub use self::{origin::OriginError, usage::TenantUsage};
pub use crate::manifest::{Entry, Manifest, ManifestError};
use crate::{
    identity::fingerprint_of_spki,
    manifest,
    model::{Fingerprint, UnixMs, now_ms},
};

/// Largest signed manifest [`fetch_manifest`] reads (the manifest format's own limit).
pub const MAX_MANIFEST_BYTES: usize = manifest::MAX_SIGNED_BYTES;
/// Arrangements one surrogate serves at most.
pub const MAX_TENANTS: usize = 1024;
/// Host names per arrangement at most.
pub const MAX_HOST_NAMES: usize = 64;
/// Objects fetched at once while prepositioning.
const PREPOSITION_PARALLELISM: usize = 4;

/// Which entries a full cache drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Eviction {
    /// Window TinyLFU (moka's default): admission by estimated frequency, so one-off requests
    /// do not flush popular objects.
    #[default]
    TinyLfu,
    /// Least recently used.
    Lru,
}

/// Machine-wide settings of the surrogate.
#[derive(Debug, Clone)]
pub struct SurrogateConfig {
    /// Memory tier, all arrangements together.
    pub memory_bytes: u64,
    /// Objects up to this size are kept in memory (and on disk); larger ones on disk only and
    /// streamed from there.
    pub memory_object_max_bytes: u64,
    /// Directory of the disk tier (one subdirectory per arrangement).
    pub disk_dir: PathBuf,
    /// Disk tier, all arrangements together.
    pub disk_bytes: u64,
    /// Eviction policy of both tiers.
    pub eviction: Eviction,
    /// TCP (and TLS) connect timeout towards an origin.
    pub origin_connect_timeout: Duration,
    /// Time an origin has to send its response headers.
    pub origin_header_timeout: Duration,
    /// Longest pause between two pieces of an origin's body.
    pub origin_idle_timeout: Duration,
    /// Trust anchors for HTTPS origins besides the web PKI roots.
    pub origin_roots: Vec<CertificateDer<'static>>,
    /// Client connections served at once; more are closed at accept.
    pub max_connections: usize,
}

impl SurrogateConfig {
    /// Defaults: 256 MiB of memory, objects up to 1 MiB in memory, 10 GiB of disk, TinyLFU,
    /// origin timeouts 5 s (connect), 10 s (headers), 10 s (body pauses), 4096 connections.
    pub fn new(disk_dir: impl Into<PathBuf>) -> Self {
        Self {
            memory_bytes: 256 << 20,
            memory_object_max_bytes: 1 << 20,
            disk_dir: disk_dir.into(),
            disk_bytes: 10 << 30,
            eviction: Eviction::TinyLfu,
            origin_connect_timeout: Duration::from_secs(5),
            origin_header_timeout: Duration::from_secs(10),
            origin_idle_timeout: Duration::from_secs(10),
            origin_roots: Vec::new(),
            max_connections: 4096,
        }
    }
}

/// What an arrangement allows the primary's content to use on this peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// Largest object accepted; larger manifest entries are answered 503 and never fetched.
    pub max_object_bytes: u64,
    /// Bytes stored for the arrangement (each tier).
    pub total_bytes: u64,
    /// Sustained egress (token bucket rate).
    pub egress_bytes_per_s: u64,
    /// Egress burst (token bucket size).
    pub egress_burst_bytes: u64,
}

/// One arrangement served by the surrogate.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub arrangement_id: String,
    pub primary: Fingerprint,
    /// The primary's SubjectPublicKeyInfo (DER); its SHA-256 must be `primary`.
    pub primary_spki: Vec<u8>,
    /// Host names routed to this arrangement (DSR); may be empty in redirect mode.
    pub host_names: Vec<String>,
    /// A verified manifest of `primary` (see [`fetch_manifest`]).
    pub manifest: Manifest,
    pub budgets: Budgets,
    /// `Access-Control-Allow-Origin` value sent with every object, if any.
    pub allow_origin: Option<String>,
}

/// What [`Surrogate::update_manifest`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestUpdate {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// Stored objects dropped because no entry of the new manifest has their content.
    pub objects_dropped: usize,
}

/// The outcome of [`Surrogate::preposition`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrepositionReport {
    /// Hot-set entries planned (they fit the budgets).
    pub planned: usize,
    /// Fetched from the origin now.
    pub fetched: usize,
    /// Already stored.
    pub already_stored: usize,
    /// Hot-set paths left out: larger than `max_object_bytes`, beyond `total_bytes`, or not in
    /// the manifest.
    pub skipped: usize,
    /// Planned objects that could not be fetched, with the reason.
    pub failed: Vec<(String, String)>,
    /// Bytes of the planned objects now stored.
    pub bytes: u64,
}

/// Errors of the surrogate's API (request-level failures are HTTP statuses and counters).
#[derive(Debug, thiserror::Error)]
pub enum SurrogateError {
    #[error("surrogate disk directory {path}: {source}")]
    DiskDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("origin tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("surrogate configuration: {reason}")]
    Config { reason: &'static str },
    #[error("unknown arrangement {0:?}")]
    UnknownTenant(String),
    #[error("arrangement {0:?} is already served")]
    TenantExists(String),
    #[error("too many arrangements (at most {MAX_TENANTS})")]
    TooManyTenants,
    #[error("arrangement id {0:?}: expected 1 to 128 visible ascii characters")]
    BadId(String),
    #[error("arrangement {id}: invalid host name {host:?}")]
    BadHost { id: String, host: String },
    #[error("arrangement {id}: host name {host:?} is already served by arrangement {other}")]
    HostTaken {
        id: String,
        host: String,
        other: String,
    },
    #[error("arrangement {id}: budgets: {reason}")]
    Budgets { id: String, reason: &'static str },
    #[error("arrangement {id}: allow_origin: {reason}")]
    AllowOrigin { id: String, reason: &'static str },
    #[error("the primary's public key does not match its fingerprint {0}")]
    PrimaryKey(Fingerprint),
    #[error("manifest of primary {got} given for an arrangement with primary {expected}")]
    ForeignManifest {
        expected: Fingerprint,
        got: Fingerprint,
    },
    #[error("manifest expired at {expires_ms} ms (now {now} ms)")]
    ManifestExpired { expires_ms: UnixMs, now: UnixMs },
    #[error("manifest version {new} does not supersede version {current}")]
    StaleManifest { current: u64, new: u64 },
    #[error("manifest service {new:?} differs from the arrangement's {current:?}")]
    ServiceChanged { current: String, new: String },
    #[error("invalid manifest origin {origin:?}")]
    BadOrigin { origin: String },
    #[error("manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("manifest url {url:?}: {source}")]
    ManifestFetch { url: String, source: OriginError },
    #[error("manifest at {url} does not have the expected sha-256")]
    ManifestDigest { url: String },
    #[error("accepting connections: {0}")]
    Accept(std::io::Error),
}

/// The surrogate. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Surrogate {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Surrogate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Surrogate")
            .field("disk_dir", &self.inner.cfg.disk_dir)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    cfg: SurrogateConfig,
    origin: OriginClient,
    space: Arc<DiskSpace>,
    tenants: RwLock<Tenants>,
    /// Unique in the process: keys the per-thread route caches of the HTTP handler.
    id: u64,
    /// Bumped after every change of the arrangements or of a manifest: a thread's cached
    /// route of an older generation is looked up again.
    generation: AtomicU64,
}

#[derive(Default)]
struct Tenants {
    by_id: HashMap<String, Arc<TenantState>>,
    /// Host name → its arrangement, looked up on every request.
    by_host: HashMap<String, Arc<TenantState>>,
    by_primary: HashMap<Fingerprint, Vec<String>>,
}

/// An arrangement being served.
pub(crate) struct TenantState {
    id: String,
    primary: Fingerprint,
    allow_origin: Option<axum::http::HeaderValue>,
    budgets: Budgets,
    manifest: RwLock<Arc<Manifest>>,
    store: TenantStore,
    bucket: budget::TokenBucket,
    usage: Usage,
}

impl TenantState {
    fn manifest(&self) -> Arc<Manifest> {
        match self.manifest.read() {
            Ok(m) => Arc::clone(&m),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

impl Surrogate {
    /// Prepares the disk directory (creating it, removing temporary files a crash left) and
    /// the origin client. Stored objects are picked up per arrangement by
    /// [`Surrogate::add_tenant`].
    pub async fn new(cfg: SurrogateConfig) -> Result<Self, SurrogateError> {
        if cfg.memory_object_max_bytes > cfg.memory_bytes {
            return Err(SurrogateError::Config {
                reason: "memory_object_max_bytes exceeds memory_bytes",
            });
        }
        if cfg.max_connections == 0 {
            return Err(SurrogateError::Config {
                reason: "max_connections must be at least 1",
            });
        }
        tokio::fs::create_dir_all(&cfg.disk_dir)
            .await
            .map_err(|source| SurrogateError::DiskDir {
                path: cfg.disk_dir.clone(),
                source,
            })?;
        let origin = OriginClient::new(&cfg)?;
        let space = Arc::new(DiskSpace::new(cfg.memory_bytes, cfg.disk_bytes));
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                origin,
                space,
                tenants: RwLock::new(Tenants::default()),
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// Starts serving an arrangement. The manifest must be the primary's (its fingerprint is
    /// the SHA-256 of `primary_spki`) and unexpired; objects of this arrangement already on
    /// disk (from before a restart) are taken back if their size matches an entry, and are
    /// hashed again before their first use.
    pub fn add_tenant(&self, t: Tenant) -> Result<(), SurrogateError> {
        let id = t.arrangement_id.clone();
        if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SurrogateError::BadId(id));
        }
        if fingerprint_of_spki(&t.primary_spki) != t.primary {
            return Err(SurrogateError::PrimaryKey(t.primary));
        }
        check_manifest(&t.primary, &t.manifest, now_ms())?;
        validate_budgets(&id, &t.budgets, &self.inner.cfg)?;
        if t.host_names.len() > MAX_HOST_NAMES {
            return Err(SurrogateError::BadHost {
                id,
                host: format!("{} names", t.host_names.len()),
            });
        }
        let mut hosts = Vec::with_capacity(t.host_names.len());
        for host in &t.host_names {
            let Some(normal) = http::normalise_host(host) else {
                return Err(SurrogateError::BadHost {
                    id,
                    host: host.clone(),
                });
            };
            hosts.push(normal);
        }
        let allow_origin = match &t.allow_origin {
            None => None,
            Some(value) => {
                Some(
                    http::header_value(value).ok_or_else(|| SurrogateError::AllowOrigin {
                        id: id.clone(),
                        reason: "not a valid header value",
                    })?,
                )
            }
        };
        let mut tenants = self.write_tenants();
        if tenants.by_id.contains_key(&id) {
            return Err(SurrogateError::TenantExists(id));
        }
        if tenants.by_id.len() >= MAX_TENANTS {
            return Err(SurrogateError::TooManyTenants);
        }
        for host in &hosts {
            if let Some(other) = tenants.by_host.get(host) {
                return Err(SurrogateError::HostTaken {
                    id,
                    host: host.clone(),
                    other: other.id.clone(),
                });
            }
        }
        let usage = Usage::new(&id);
        let store = TenantStore::new(
            &self.inner.cfg,
            &id,
            &t.budgets,
            Arc::clone(&self.inner.space),
            usage.clone(),
        );
        store.recover(&t.manifest);
        let state = Arc::new(TenantState {
            id: id.clone(),
            primary: t.primary,
            allow_origin,
            budgets: t.budgets,
            manifest: RwLock::new(Arc::new(t.manifest)),
            store,
            bucket: budget::TokenBucket::new(
                t.budgets.egress_bytes_per_s,
                t.budgets.egress_burst_bytes,
            ),
            usage,
        });
        for host in hosts {
            tenants.by_host.insert(host, Arc::clone(&state));
        }
        tenants
            .by_primary
            .entry(t.primary)
            .or_default()
            .push(id.clone());
        tenants.by_id.insert(id.clone(), state);
        self.inner.changed();
        drop(tenants);
        tracing::info!(arrangement.id = %id, primary.id = %t.primary, "surrogate: serving arrangement");
        Ok(())
    }

    /// Replaces an arrangement's manifest by a newer version of the same service and primary:
    /// stored objects whose content no entry of the new manifest has are dropped, the others
    /// are kept (an unchanged object is never fetched again).
    pub fn update_manifest(
        &self,
        id: &str,
        new: Manifest,
    ) -> Result<ManifestUpdate, SurrogateError> {
        let tenant = self
            .tenant(id)
            .ok_or_else(|| SurrogateError::UnknownTenant(id.to_owned()))?;
        check_manifest(&tenant.primary, &new, now_ms())?;
        let mut slot = match tenant.manifest.write() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        let old = Arc::clone(&slot);
        if new.version <= old.version {
            return Err(SurrogateError::StaleManifest {
                current: old.version,
                new: new.version,
            });
        }
        if new.service != old.service {
            return Err(SurrogateError::ServiceChanged {
                current: old.service.clone(),
                new: new.service,
            });
        }
        let delta = manifest::diff(&old, &new);
        let mut update = ManifestUpdate {
            added: delta.added,
            changed: delta.changed,
            removed: delta.removed,
            objects_dropped: 0,
        };
        let keep: HashSet<[u8; 32]> = new.entries.values().map(|e| e.sha256).collect();
        update.objects_dropped = tenant.store.retain(|sha| keep.contains(sha));
        *slot = Arc::new(new);
        drop(slot);
        self.inner.changed();
        tracing::info!(
            arrangement.id = %id,
            added = update.added.len(),
            changed = update.changed.len(),
            removed = update.removed.len(),
            "surrogate: manifest updated"
        );
        Ok(update)
    }

    /// Stops serving an arrangement and deletes what it stored. Unknown ids are ignored.
    pub fn remove_tenant(&self, id: &str) {
        let removed = {
            let mut tenants = self.write_tenants();
            let removed = tenants.by_id.remove(id);
            tenants.by_host.retain(|_, owner| owner.id != id);
            for ids in tenants.by_primary.values_mut() {
                ids.retain(|owner| owner != id);
            }
            tenants.by_primary.retain(|_, ids| !ids.is_empty());
            self.inner.changed();
            removed
        };
        if let Some(tenant) = removed {
            tenant.store.remove_all();
            tracing::info!(arrangement.id = %id, "surrogate: arrangement removed");
        }
    }

    /// The usage counters of an arrangement, `None` if it is not served.
    pub fn usage(&self, id: &str) -> Option<TenantUsage> {
        self.tenant(id).map(|t| t.usage.snapshot(&t.store))
    }

    /// Ids of the arrangements being served.
    pub fn tenants(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.read_tenants().by_id.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Fetches the manifest's hot set (most requested first) within the arrangement's
    /// budgets: entries larger than `max_object_bytes` and those beyond `total_bytes` are left
    /// out. `progress(done, total)` is called after each planned object.
    pub async fn preposition(
        &self,
        id: &str,
        progress: impl Fn(usize, usize),
    ) -> Result<PrepositionReport, SurrogateError> {
        let tenant = self
            .tenant(id)
            .ok_or_else(|| SurrogateError::UnknownTenant(id.to_owned()))?;
        let manifest = tenant.manifest();
        let mut report = PrepositionReport::default();
        let mut planned = Vec::new();
        let mut budget = tenant.budgets.total_bytes;
        let mut seen = HashSet::new();
        for path in &manifest.hot {
            let Some(entry) = manifest.entry(path) else {
                report.skipped += 1;
                continue;
            };
            if entry.size > tenant.budgets.max_object_bytes
                || entry.size > budget
                || !seen.insert(entry.sha256)
            {
                report.skipped += 1;
                continue;
            }
            budget -= entry.size;
            planned.push(entry.clone());
        }
        report.planned = planned.len();
        let total = planned.len();
        progress(0, total);
        let mut queue = planned.into_iter();
        let mut running = JoinSet::new();
        let mut done = 0;
        loop {
            while running.len() < PREPOSITION_PARALLELISM {
                let Some(entry) = queue.next() else { break };
                let inner = Arc::clone(&self.inner);
                let tenant = Arc::clone(&tenant);
                running.spawn(async move {
                    let outcome = fill::obtain(&inner, &tenant, &entry).await;
                    (entry, outcome)
                });
            }
            let Some(joined) = running.join_next().await else {
                break;
            };
            done += 1;
            match joined {
                Ok((entry, Ok((_, hit)))) => {
                    if hit {
                        report.already_stored += 1;
                    } else {
                        report.fetched += 1;
                    }
                    report.bytes += entry.size;
                }
                Ok((entry, Err(e))) => report.failed.push((entry.path, e.to_string())),
                Err(e) => report
                    .failed
                    .push((String::from("?"), format!("task failed: {e}"))),
            }
            progress(done, total);
        }
        Ok(report)
    }

    /// Fetches and verifies a signed manifest with this surrogate's origin client (its trust
    /// anchors and timeouts); see [`fetch_manifest`].
    pub async fn fetch_manifest(
        &self,
        url: &str,
        expected_sha256: Option<[u8; 32]>,
        primary_spki: &[u8],
        now: UnixMs,
    ) -> Result<Manifest, SurrogateError> {
        fetch_manifest_with(&self.inner.origin, url, expected_sha256, primary_spki, now).await
    }

    /// The HTTP service: GET/HEAD (and CORS preflight) for every arrangement.
    pub fn router(&self) -> axum::Router {
        http::router(Arc::clone(&self.inner))
    }

    /// Serves [`Surrogate::router`] on `listener` (HTTP/1.1 and HTTP/2; TLS when `tls` is
    /// given — set its ALPN to `h2`, `http/1.1` for HTTP/2) until `shutdown` completes, then
    /// lets requests in flight finish for a grace period.
    pub async fn serve(
        &self,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), SurrogateError> {
        server::serve(
            listener,
            tls,
            Arc::clone(&self.inner),
            self.inner.cfg.max_connections,
            shutdown,
        )
        .await
    }

    fn tenant(&self, id: &str) -> Option<Arc<TenantState>> {
        self.read_tenants().by_id.get(id).cloned()
    }

    fn read_tenants(&self) -> std::sync::RwLockReadGuard<'_, Tenants> {
        self.inner.read_tenants()
    }

    fn write_tenants(&self) -> std::sync::RwLockWriteGuard<'_, Tenants> {
        match self.inner.tenants.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl Inner {
    /// Invalidates the route caches (after a change of the arrangements or a manifest).
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn read_tenants(&self) -> std::sync::RwLockReadGuard<'_, Tenants> {
        match self.tenants.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

fn check_manifest(primary: &Fingerprint, m: &Manifest, now: UnixMs) -> Result<(), SurrogateError> {
    m.validate()?;
    if m.primary != *primary {
        return Err(SurrogateError::ForeignManifest {
            expected: *primary,
            got: m.primary,
        });
    }
    if m.expires_ms <= now {
        return Err(SurrogateError::ManifestExpired {
            expires_ms: m.expires_ms,
            now,
        });
    }
    if !origin::valid_origin(&m.origin) {
        return Err(SurrogateError::BadOrigin {
            origin: m.origin.clone(),
        });
    }
    Ok(())
}

fn validate_budgets(id: &str, b: &Budgets, cfg: &SurrogateConfig) -> Result<(), SurrogateError> {
    let reason = if b.max_object_bytes == 0 {
        Some("max_object_bytes must be at least 1")
    } else if b.total_bytes < b.max_object_bytes {
        Some("total_bytes must be at least max_object_bytes")
    } else if b.egress_bytes_per_s == 0 {
        Some("egress_bytes_per_s must be at least 1")
    } else if b.egress_burst_bytes == 0 {
        Some("egress_burst_bytes must be at least 1")
    } else if b.max_object_bytes > cfg.disk_bytes {
        Some("max_object_bytes exceeds the surrogate's disk_bytes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(SurrogateError::Budgets {
            id: id.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Fetches a signed manifest from `url` (HTTP or HTTPS, web PKI roots, at most
/// [`MAX_MANIFEST_BYTES`]), checks its SHA-256 if one is expected (e.g. from the
/// arrangement), and verifies it: signature by `primary_spki`, primary fingerprint, expiry,
/// entries.
pub async fn fetch_manifest(
    url: &str,
    expected_sha256: Option<[u8; 32]>,
    primary_spki: &[u8],
    now: UnixMs,
) -> Result<Manifest, SurrogateError> {
    let client = OriginClient::new(&SurrogateConfig::new(PathBuf::new()))?;
    fetch_manifest_with(&client, url, expected_sha256, primary_spki, now).await
}

async fn fetch_manifest_with(
    client: &OriginClient,
    url: &str,
    expected_sha256: Option<[u8; 32]>,
    primary_spki: &[u8],
    now: UnixMs,
) -> Result<Manifest, SurrogateError> {
    let bytes = client
        .fetch_limited(url, MAX_MANIFEST_BYTES)
        .await
        .map_err(|source| SurrogateError::ManifestFetch {
            url: url.to_owned(),
            source,
        })?;
    if let Some(expected) = expected_sha256 {
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        if digest.as_ref() != expected {
            return Err(SurrogateError::ManifestDigest {
                url: url.to_owned(),
            });
        }
    }
    let signed = manifest::decode_signed(&bytes)?;
    Ok(manifest::open(&signed, primary_spki, now)?)
}
