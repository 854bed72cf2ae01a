//! The two storage tiers of an arrangement, keyed by the content's SHA-256 (two paths with
//! the same bytes share one stored object):
//!
//! - memory: `Bytes` of objects up to `memory_object_max_bytes`;
//! - disk: one file per object, `<dir>/t-<hash of the arrangement id>/<sha256 hex>.<n>`, with
//!   an in-memory index. A file is written under a temporary name and renamed to its final
//!   name only after the origin's bytes matched the manifest, so a final name always held
//!   verified bytes when it was written; after a restart the bytes are hashed again before
//!   their first use all the same (a disk can rot, a file can be edited).
//!
//! Both tiers are moka caches weighed in bytes (LRU or TinyLFU), bounded by the
//! arrangement's `total_bytes`; a machine-wide reservation ([`DiskSpace`]) bounds their sums
//! by `memory_bytes` and `disk_bytes`. A file leaves the disk when its entry is evicted and
//! the last response streaming it has finished.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{self, Read},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use moka::{notification::RemovalCause, policy::EvictionPolicy, sync::Cache};
use tokio::{io::AsyncWriteExt, sync::watch};

use super::{
    Budgets, Eviction, Manifest, SurrogateConfig,
    fill::{FillResult, Object},
    usage::Usage,
};

pub(crate) type Sha = [u8; 32];

/// Hashes the SHA-256 keys of the tiers by folding their words with a per-process random
/// seed: the keys are uniformly distributed already, so a keyed SipHash over them (the
/// default, on every lookup) buys nothing. The primary chooses its contents, so it could
/// grind SHA-256 prefixes to collide; it would only slow its own arrangement's caches
/// (each arrangement has its own), and the seed keeps it from knowing which prefixes do.
#[derive(Clone)]
pub(crate) struct ShaHash(u64);

impl ShaHash {
    fn new() -> Self {
        // RandomState is seeded per process from the OS.
        use std::hash::BuildHasher as _;
        Self(std::collections::hash_map::RandomState::new().hash_one(0x5ea1_u64))
    }
}

impl std::hash::BuildHasher for ShaHash {
    type Hasher = ShaHasher;

    fn build_hasher(&self) -> ShaHasher {
        ShaHasher(self.0)
    }
}

/// See [`ShaHash`].
pub(crate) struct ShaHasher(u64);

impl std::hash::Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        for word in bytes.chunks(8) {
            let mut buf = [0_u8; 8];
            buf[..word.len()].copy_from_slice(word);
            self.0 = (self.0 ^ u64::from_le_bytes(buf))
                .rotate_left(23)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_usize(&mut self, _: usize) {
        // The length prefix of the key array: always 32.
    }

    fn finish(&self) -> u64 {
        let x = self.0 ^ (self.0 >> 29);
        x.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (x >> 32)
    }
}

/// Machine-wide reservations of memory and disk bytes, shared by every arrangement.
pub(crate) struct DiskSpace {
    memory_limit: u64,
    disk_limit: u64,
    memory_used: AtomicU64,
    disk_used: AtomicU64,
    generation: AtomicU64,
}

impl DiskSpace {
    pub(crate) fn new(memory_limit: u64, disk_limit: u64) -> Self {
        // Unique file name suffixes across restarts without a persisted counter.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self {
            memory_limit,
            disk_limit,
            memory_used: AtomicU64::new(0),
            disk_used: AtomicU64::new(0),
            generation: AtomicU64::new(seed),
        }
    }

    fn reserve(used: &AtomicU64, limit: u64, n: u64) -> bool {
        used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            current.checked_add(n).filter(|total| *total <= limit)
        })
        .is_ok()
    }

    fn release(used: &AtomicU64, n: u64) {
        let _ = used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            Some(current.saturating_sub(n))
        });
    }

    fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed)
    }
}

/// Why the disk tier could not take an object.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DiskError {
    #[error("disk tier full: {needed} more bytes do not fit disk_bytes")]
    Full { needed: u64 },
    #[error("disk tier: {0}")]
    Io(#[from] io::Error),
    #[error("arrangement removed")]
    Removed,
}

/// A stored file. When its index entry is evicted its bytes are released at once and the
/// file is unlinked as soon as no [`Lease`] holds it (a response streaming it, a fill result
/// waiting to be served); when the surrogate merely stops, it stays for the next run.
pub(crate) struct DiskObject {
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    verified: AtomicBool,
    evicted: AtomicBool,
    users: AtomicUsize,
    unlinked: AtomicBool,
}

impl DiskObject {
    pub(crate) fn verified(&self) -> bool {
        self.verified.load(Ordering::Acquire)
    }

    pub(crate) fn set_verified(&self) {
        self.verified.store(true, Ordering::Release);
    }

    /// A lease keeping the file on disk, `None` if it was evicted already.
    pub(crate) fn lease(self: &Arc<Self>) -> Option<Arc<Lease>> {
        // Dekker-style with `evict`: either this sees `evicted`, or `evict` sees the user.
        self.users.fetch_add(1, Ordering::SeqCst);
        let lease = Arc::new(Lease(Arc::clone(self)));
        (!self.evicted.load(Ordering::SeqCst)).then_some(lease)
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::SeqCst);
        if self.users.load(Ordering::SeqCst) == 0 {
            self.unlink();
        }
    }

    fn unlink(&self) {
        if self.unlinked.swap(true, Ordering::AcqRel) {
            return;
        }
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "surrogate: removing an evicted file")
            }
        }
    }
}

/// A user of a stored file (see [`DiskObject`]).
pub(crate) struct Lease(Arc<DiskObject>);

impl std::ops::Deref for Lease {
    type Target = DiskObject;

    fn deref(&self) -> &DiskObject {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.0.users.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.evicted.load(Ordering::SeqCst)
        {
            self.0.unlink();
        }
    }
}

/// A file being written; removed (and its reservation released) unless published.
pub(crate) struct TempFile {
    path: PathBuf,
    size: u64,
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    space: Arc<DiskSpace>,
    published: bool,
}

impl TempFile {
    pub(crate) async fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        match self.file.as_mut() {
            Some(file) => file.write_all(chunk).await,
            None => Err(io::Error::other("temporary file already closed")),
        }
    }

    /// Flushes to the kernel. No fsync: a file a crash left incomplete or garbled is caught
    /// by the SHA-256 check every stored file passes again after a restart.
    async fn finish(&mut self) -> io::Result<()> {
        if let Some(mut file) = self.file.take() {
            file.flush().await?;
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        drop(self.file.take());
        let _ = fs::remove_file(&self.path);
        DiskSpace::release(&self.space.disk_used, self.size);
    }
}

pub(crate) type Inflight = Mutex<HashMap<Sha, watch::Receiver<Option<FillResult>>>>;

/// The stored objects of one arrangement.
pub(crate) struct TenantStore {
    dir: PathBuf,
    memory: Cache<Sha, Bytes, ShaHash>,
    disk: Cache<Sha, Arc<DiskObject>, ShaHash>,
    memory_object_max: u64,
    space: Arc<DiskSpace>,
    memory_bytes: Arc<AtomicU64>,
    disk_bytes: Arc<AtomicU64>,
    usage: Usage,
    removed: AtomicBool,
    /// Fills under way (miss coalescing).
    pub(crate) inflight: Inflight,
}

/// Weights are bytes unless an object could exceed `u32::MAX`: then units of `unit` bytes.
fn unit_for(max_object: u64) -> u64 {
    max_object.div_ceil(u64::from(u32::MAX)).max(1)
}

fn weight(size: u64, unit: u64) -> u32 {
    u32::try_from(size.div_ceil(unit)).unwrap_or(u32::MAX)
}

fn policy(eviction: Eviction) -> EvictionPolicy {
    match eviction {
        Eviction::TinyLfu => EvictionPolicy::tiny_lfu(),
        Eviction::Lru => EvictionPolicy::lru(),
    }
}

/// The directory of an arrangement's files.
pub(crate) fn tenant_dir(root: &Path, id: &str) -> PathBuf {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    root.join(format!("t-{}", hex::encode(&digest.as_ref()[..16])))
}

impl TenantStore {
    pub(crate) fn new(
        cfg: &SurrogateConfig,
        id: &str,
        budgets: &Budgets,
        space: Arc<DiskSpace>,
        usage: Usage,
    ) -> Self {
        let dir = tenant_dir(&cfg.disk_dir, id);
        if let Err(e) = fs::create_dir_all(&dir) {
            usage.disk_errors.add(1);
            tracing::warn!(arrangement.id = %id, dir = %dir.display(), error = %e, "surrogate: disk tier unavailable, serving from memory only");
        }
        let memory_bytes = Arc::new(AtomicU64::new(0));
        let disk_bytes = Arc::new(AtomicU64::new(0));

        let memory_object_max = cfg.memory_object_max_bytes.min(budgets.max_object_bytes);
        let memory_unit = unit_for(memory_object_max);
        let memory = {
            let space = Arc::clone(&space);
            let tenant_bytes = Arc::clone(&memory_bytes);
            Cache::builder()
                .max_capacity(budgets.total_bytes.min(cfg.memory_bytes) / memory_unit)
                .eviction_policy(policy(cfg.eviction))
                .weigher(move |_: &Sha, v: &Bytes| weight(v.len() as u64, memory_unit))
                .eviction_listener(move |_: Arc<Sha>, v: Bytes, _: RemovalCause| {
                    DiskSpace::release(&space.memory_used, v.len() as u64);
                    DiskSpace::release(&tenant_bytes, v.len() as u64);
                })
                .build_with_hasher(ShaHash::new())
        };
        let disk_unit = unit_for(budgets.max_object_bytes);
        let disk = {
            let memory = memory.clone();
            let space = Arc::clone(&space);
            let tenant_bytes = Arc::clone(&disk_bytes);
            Cache::builder()
                .max_capacity(budgets.total_bytes / disk_unit)
                .eviction_policy(policy(cfg.eviction))
                .weigher(move |_: &Sha, v: &Arc<DiskObject>| weight(v.size, disk_unit))
                .eviction_listener(
                    move |key: Arc<Sha>, v: Arc<DiskObject>, cause: RemovalCause| {
                        DiskSpace::release(&space.disk_used, v.size);
                        DiskSpace::release(&tenant_bytes, v.size);
                        v.evict();
                        // What leaves the disk leaves memory too: the arrangement's footprint
                        // stays within its budget in both tiers.
                        if cause != RemovalCause::Replaced {
                            memory.invalidate(&*key);
                        }
                    },
                )
                .build_with_hasher(ShaHash::new())
        };
        Self {
            dir,
            memory,
            disk,
            memory_object_max,
            space,
            memory_bytes,
            disk_bytes,
            usage,
            removed: AtomicBool::new(false),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn disk_bytes(&self) -> u64 {
        self.disk_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn memory_object_max(&self) -> u64 {
        self.memory_object_max
    }

    /// Takes back the files of this arrangement left on disk by a previous run: those named
    /// after an entry's SHA-256 with the entry's size are indexed as unverified (hashed
    /// before first use); everything else is deleted.
    pub(crate) fn recover(&self, manifest: &Manifest) {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return;
        };
        let sizes: HashMap<Sha, u64> = manifest
            .entries
            .values()
            .map(|e| (e.sha256, e.size))
            .collect();
        let mut taken = HashSet::new();
        let (mut kept, mut dropped) = (0_usize, 0_usize);
        for item in dir.flatten() {
            let path = item.path();
            let name = item.file_name();
            let sha = name.to_str().and_then(parse_object_name);
            let len = item
                .metadata()
                .ok()
                .filter(fs::Metadata::is_file)
                .map(|m| m.len());
            let keep = match (sha, len) {
                (Some(sha), Some(len)) => {
                    sizes.get(&sha) == Some(&len)
                        && !taken.contains(&sha)
                        && DiskSpace::reserve(&self.space.disk_used, self.space.disk_limit, len)
                        && {
                            taken.insert(sha);
                            drop(self.index(sha, path.clone(), len, false));
                            true
                        }
                }
                _ => false,
            };
            if keep {
                kept += 1;
            } else {
                dropped += 1;
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "surrogate: removing a stale file");
                }
            }
        }
        self.disk.run_pending_tasks();
        if dropped > 0 {
            self.usage.disk_dropped.add(dropped as u64);
        }
        if kept + dropped > 0 {
            tracing::info!(dir = %self.dir.display(), kept, dropped, "surrogate: disk tier recovered (kept files are verified before use)");
        }
    }

    /// Indexes a file; with `lease`, the lease is taken before the cache can evict it
    /// (TinyLFU may refuse a newcomer at once): requests waiting for a fill are served from
    /// the file either way.
    fn index(&self, sha: Sha, path: PathBuf, size: u64, verified: bool) -> Arc<Lease> {
        self.disk_bytes.fetch_add(size, Ordering::Relaxed);
        let object = Arc::new(DiskObject {
            path,
            size,
            verified: AtomicBool::new(verified),
            evicted: AtomicBool::new(false),
            users: AtomicUsize::new(1),
            unlinked: AtomicBool::new(false),
        });
        let lease = Arc::new(Lease(Arc::clone(&object)));
        self.disk.insert(sha, object);
        lease
    }

    pub(crate) fn memory_get(&self, sha: &Sha) -> Option<Bytes> {
        self.memory.get(sha)
    }

    pub(crate) fn disk_get(&self, sha: &Sha) -> Option<Arc<DiskObject>> {
        self.disk.get(sha)
    }

    /// The object if the memory tier holds it (touching its disk entry as [`Self::lookup`]
    /// does).
    pub(crate) fn memory_hit(&self, sha: &Sha) -> Option<Bytes> {
        let bytes = self.memory_get(sha)?;
        drop(self.disk.get(sha));
        Some(bytes)
    }

    /// A cached object ready to serve without the origin (memory, or a verified file).
    pub(crate) fn lookup(&self, sha: &Sha) -> Option<Object> {
        if let Some(bytes) = self.memory_get(sha) {
            // The disk entry sees the access too: evicting it drops the memory copy.
            drop(self.disk.get(sha));
            return Some(Object::Memory(bytes));
        }
        self.disk_get(sha)
            .filter(|d| d.verified())
            .and_then(|d| d.lease())
            .map(Object::Disk)
    }

    /// Keeps verified bytes in the memory tier if the machine-wide memory budget allows.
    pub(crate) fn put_memory(&self, sha: Sha, bytes: Bytes) {
        let len = bytes.len() as u64;
        if len > self.memory_object_max || self.removed.load(Ordering::Acquire) {
            return;
        }
        if !DiskSpace::reserve(&self.space.memory_used, self.space.memory_limit, len) {
            return;
        }
        self.memory_bytes.fetch_add(len, Ordering::Relaxed);
        self.memory.insert(sha, bytes);
        self.memory.run_pending_tasks();
    }

    /// A temporary file for `size` bytes, reserved against the machine-wide disk budget.
    pub(crate) async fn temp_file(&self, size: u64) -> Result<TempFile, DiskError> {
        if self.removed.load(Ordering::Acquire) {
            return Err(DiskError::Removed);
        }
        if !DiskSpace::reserve(&self.space.disk_used, self.space.disk_limit, size) {
            return Err(DiskError::Full { needed: size });
        }
        let path = self
            .dir
            .join(format!("tmp-{}", self.space.next_generation()));
        let mut temp = TempFile {
            path,
            size,
            file: None,
            space: Arc::clone(&self.space),
            published: false,
        };
        let file = tokio::fs::File::create(&temp.path).await?;
        temp.file = Some(tokio::io::BufWriter::with_capacity(256 * 1024, file));
        Ok(temp)
    }

    /// Renames a temporary file holding verified bytes to its final name and indexes it.
    pub(crate) async fn publish(
        &self,
        sha: Sha,
        mut temp: TempFile,
    ) -> Result<Arc<Lease>, DiskError> {
        temp.finish().await?;
        if self.removed.load(Ordering::Acquire) {
            return Err(DiskError::Removed);
        }
        let name = format!("{}.{}", hex::encode(sha), self.space.next_generation());
        let path = self.dir.join(name);
        tokio::fs::rename(&temp.path, &path).await?;
        temp.published = true;
        let lease = self.index(sha, path, temp.size, true);
        self.disk.run_pending_tasks();
        Ok(lease)
    }

    /// Writes verified bytes of a small object to the disk tier.
    pub(crate) async fn put_disk(&self, sha: Sha, bytes: &Bytes) -> Result<(), DiskError> {
        let mut temp = self.temp_file(bytes.len() as u64).await?;
        temp.write(bytes).await?;
        self.publish(sha, temp).await.map(drop)
    }

    /// Forgets an object in both tiers (its file goes once no response uses it).
    pub(crate) fn invalidate(&self, sha: &Sha) {
        self.disk.invalidate(sha);
        self.memory.invalidate(sha);
        self.disk.run_pending_tasks();
        self.memory.run_pending_tasks();
    }

    /// Keeps only the objects `keep` accepts; returns how many were dropped.
    pub(crate) fn retain(&self, keep: impl Fn(&Sha) -> bool) -> usize {
        let mut gone: HashSet<Sha> = self
            .disk
            .iter()
            .map(|(sha, _)| *sha)
            .filter(|sha| !keep(sha))
            .collect();
        gone.extend(
            self.memory
                .iter()
                .map(|(sha, _)| *sha)
                .filter(|sha| !keep(sha)),
        );
        for sha in &gone {
            self.disk.invalidate(sha);
            self.memory.invalidate(sha);
        }
        self.disk.run_pending_tasks();
        self.memory.run_pending_tasks();
        gone.len()
    }

    /// Drops everything (the arrangement ended) and removes its directory.
    pub(crate) fn remove_all(&self) {
        self.removed.store(true, Ordering::Release);
        self.memory.invalidate_all();
        self.disk.invalidate_all();
        self.memory.run_pending_tasks();
        self.disk.run_pending_tasks();
        if let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "surrogate: removing an arrangement's files");
        }
    }
}

/// `<64 hex>.<digits>` → the SHA-256.
fn parse_object_name(name: &str) -> Option<Sha> {
    let (hex_part, generation) = name.split_once('.')?;
    if generation.is_empty() || !generation.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut sha = [0_u8; 32];
    hex::decode_to_slice(hex_part, &mut sha).ok()?;
    Some(sha)
}

/// Hashes a stored file (blocking; run it on the blocking pool): `true` if it has `size`
/// bytes with SHA-256 `sha`.
pub(crate) fn file_matches(path: &Path, size: u64, sha: &Sha) -> io::Result<bool> {
    let mut file = fs::File::open(path)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0_u8; 256 * 1024];
    let mut total = 0_u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > size {
            return Ok(false);
        }
        context.update(&buf[..n]);
    }
    Ok(total == size && context.finish().as_ref() == sha)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_round_trip() {
        let sha = [0xab_u8; 32];
        let name = format!("{}.{}", hex::encode(sha), 17);
        assert_eq!(parse_object_name(&name), Some(sha));
        assert_eq!(parse_object_name("tmp-12"), None);
        assert_eq!(parse_object_name(&format!("{}.", hex::encode(sha))), None);
        assert_eq!(parse_object_name(&format!("{}.x", hex::encode(sha))), None);
    }

    #[test]
    fn weights_stay_in_u32() {
        assert_eq!(unit_for(1 << 20), 1);
        assert_eq!(weight(1000, 1), 1000);
        let unit = unit_for(1 << 40);
        assert_eq!(unit, 257);
        assert!(u64::from(weight(1 << 40, unit)) * unit >= 1 << 40);
    }

    #[test]
    fn sha_keys_hash_apart() {
        use std::hash::BuildHasher as _;
        let hash = ShaHash::new();
        let mut seen = HashSet::new();
        for i in 0..1000_u32 {
            let digest = ring::digest::digest(&ring::digest::SHA256, &i.to_le_bytes());
            let mut sha = [0_u8; 32];
            sha.copy_from_slice(digest.as_ref());
            assert_eq!(hash.hash_one(sha), hash.hash_one(sha));
            seen.insert(hash.hash_one(sha));
        }
        assert_eq!(seen.len(), 1000);
        // Keys differing in one late byte only still hash apart.
        let (a, mut b) = ([7_u8; 32], [7_u8; 32]);
        b[31] = 8;
        assert_ne!(hash.hash_one(a), hash.hash_one(b));
    }
}
