//! The kernel maps behind [`Backend`]: typed aya handles, opened from a freshly loaded
//! object or from their pins, and the layout checks that guard reused pins.

use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
};

use aya::maps::{
    Array, HashMap, IterableMap as _, Map, MapData, MapError, MapInfo, MapType, PerCpuArray,
    PerCpuHashMap, PerCpuValues,
};
use redirector_ebpf::{
    AddrKey, BUCKETS_LEN, Bucket, Config, DECAP_ALLOW_CAPACITY, DecapStats, FlowKey, FlowValue,
    GlobalStats, GuardKey, MAGLEV_STRIDE, MAX_PEERS, MAX_SERVICES, Meta, PeerConf, PeerStats,
    SCHEMA_VERSION, SERVICE_KEYS_CAPACITY, ServiceConf, ServiceKey, ServiceStats, map_names,
};

use crate::{
    engine::Backend,
    error::{Error, Result},
};

/// What userspace relies on in each map: its type, key and value sizes, and the length of
/// the maps it indexes (`None`: overridable at load, like the LRU tables).
struct Layout {
    name: &'static str,
    kind: MapType,
    key: usize,
    value: usize,
    entries: Option<u32>,
}

const fn layout<K, V>(name: &'static str, kind: MapType, entries: Option<u32>) -> Layout {
    Layout {
        name,
        kind,
        key: size_of::<K>(),
        value: size_of::<V>(),
        entries,
    }
}

const LAYOUTS: [Layout; 15] = [
    layout::<u32, Meta>(map_names::META, MapType::Array, Some(1)),
    layout::<u32, Config>(map_names::CONFIG, MapType::Array, Some(1)),
    layout::<ServiceKey, u32>(
        map_names::SERVICES,
        MapType::Hash,
        Some(SERVICE_KEYS_CAPACITY),
    ),
    layout::<u32, ServiceConf>(map_names::SVC_CONF, MapType::Array, Some(MAX_SERVICES)),
    layout::<u32, u32>(map_names::PORTS, MapType::Array, Some(65_536)),
    layout::<u32, PeerConf>(map_names::PEERS, MapType::Array, Some(MAX_PEERS)),
    layout::<u32, u32>(
        map_names::MAGLEV,
        MapType::Array,
        Some(MAX_SERVICES * MAGLEV_STRIDE),
    ),
    layout::<FlowKey, FlowValue>(map_names::FLOWS, MapType::LruHash, None),
    layout::<u32, Bucket>(map_names::BUCKETS, MapType::Array, Some(BUCKETS_LEN)),
    layout::<GuardKey, Bucket>(map_names::GUARD, MapType::LruHash, None),
    layout::<AddrKey, DecapStats>(
        map_names::DECAP_ALLOW,
        MapType::PerCpuHash,
        Some(DECAP_ALLOW_CAPACITY),
    ),
    layout::<u32, ServiceStats>(
        map_names::SVC_STATS,
        MapType::PerCpuArray,
        Some(MAX_SERVICES),
    ),
    layout::<u32, PeerStats>(map_names::PEER_STATS, MapType::PerCpuArray, Some(MAX_PEERS)),
    layout::<u32, GlobalStats>(map_names::GLOBAL_STATS, MapType::PerCpuArray, Some(1)),
    layout::<u32, redirector_ebpf::FlowBudget>(
        map_names::FLOW_BUDGET,
        MapType::PerCpuArray,
        Some(1),
    ),
];

/// `BPF_NOEXIST` (include/uapi/linux/bpf.h): create the element only if it does not exist.
const BPF_NOEXIST: u32 = 1;

/// The `META[0]` this build writes.
pub(crate) const BUILT_META: Meta = Meta {
    schema_version: SCHEMA_VERSION,
    max_services: MAX_SERVICES,
    max_peers: MAX_PEERS,
    maglev_stride: MAGLEV_STRIDE,
};

fn check_layout(dir: &Path, layout: &Layout, info: &MapInfo) -> Result<()> {
    let mismatch = |detail: String| Error::MapLayout {
        dir: dir.to_path_buf(),
        map: layout.name.to_owned(),
        detail,
    };
    // The type first: a map of another type with equal sizes (a plain hash where a per-CPU
    // one is expected) would be read wrongly without any error.
    match info.map_type() {
        Ok(kind) if kind == layout.kind => {}
        Ok(kind) => {
            return Err(mismatch(format!(
                "type {kind:?} instead of {:?}",
                layout.kind
            )));
        }
        Err(e) => return Err(Error::map(layout.name, "inspect", e)),
    }
    if info.key_size() as usize != layout.key {
        return Err(mismatch(format!(
            "key size {} instead of {}",
            info.key_size(),
            layout.key
        )));
    }
    if info.value_size() as usize != layout.value {
        return Err(mismatch(format!(
            "value size {} instead of {}",
            info.value_size(),
            layout.value
        )));
    }
    if let Some(entries) = layout.entries
        && info.max_entries() != entries
    {
        return Err(mismatch(format!(
            "{} entries instead of {entries}",
            info.max_entries()
        )));
    }
    Ok(())
}

/// Reads `META[0]` from the pin in `dir`.
fn read_meta(dir: &Path) -> Result<Meta> {
    let path = dir.join(map_names::META);
    let data = MapData::from_pin(&path).map_err(|e| Error::map(map_names::META, "open", e))?;
    let map = Map::from_map_data(data).map_err(|e| Error::map(map_names::META, "open", e))?;
    let meta: Array<MapData, Meta> = Array::try_from(map).map_err(|e| Error::MapLayout {
        dir: dir.to_path_buf(),
        map: map_names::META.to_owned(),
        detail: e.to_string(),
    })?;
    meta.get(&0, 0)
        .map_err(|e| Error::map(map_names::META, "read", e))
}

/// What the pin directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pinned {
    /// No map pins at all.
    Nothing,
    /// Every map, with this build's schema and layouts.
    Compatible,
}

/// Checks the pinned maps in `dir` before anything reuses them: `META` first (its schema
/// version and limits), then every map's key/value sizes and lengths. aya reuses a pinned
/// map by name without looking at it, so this is the only guard against a layout change.
pub(crate) fn check_pinned(dir: &Path) -> Result<Pinned> {
    let meta_path = dir.join(map_names::META);
    if !meta_path.exists() {
        if map_names::ALL.iter().any(|name| dir.join(name).exists()) {
            return Err(Error::UnversionedPins {
                dir: dir.to_path_buf(),
            });
        }
        return Ok(Pinned::Nothing);
    }
    let meta = read_meta(dir)?;
    if meta.schema_version != SCHEMA_VERSION {
        return Err(Error::SchemaMismatch {
            dir: dir.to_path_buf(),
            pinned: meta.schema_version,
            built: SCHEMA_VERSION,
        });
    }
    if meta != BUILT_META {
        return Err(Error::MapLayout {
            dir: dir.to_path_buf(),
            map: map_names::META.to_owned(),
            detail: format!(
                "limits {}/{}/{} instead of {}/{}/{} (services/peers/stride)",
                meta.max_services,
                meta.max_peers,
                meta.maglev_stride,
                MAX_SERVICES,
                MAX_PEERS,
                MAGLEV_STRIDE
            ),
        });
    }
    for layout in &LAYOUTS {
        let path = dir.join(layout.name);
        if !path.exists() {
            return Err(Error::MapLayout {
                dir: dir.to_path_buf(),
                map: layout.name.to_owned(),
                detail: "its pin is missing".into(),
            });
        }
        let info = MapInfo::from_pin(&path).map_err(|e| Error::map(layout.name, "open", e))?;
        check_layout(dir, layout, &info)?;
    }
    Ok(Pinned::Compatible)
}

/// Opens every pinned map of `dir` (after [`check_pinned`]).
pub(crate) fn open_pinned(dir: &Path) -> Result<StdHashMap<String, Map>> {
    let mut maps = StdHashMap::new();
    for name in map_names::ALL {
        let data = MapData::from_pin(dir.join(name)).map_err(|e| Error::map(name, "open", e))?;
        let map = Map::from_map_data(data).map_err(|e| Error::map(name, "open", e))?;
        maps.insert(name.to_owned(), map);
    }
    Ok(maps)
}

/// Typed handles on every map the userspace side touches.
pub(crate) struct KernelMaps {
    pub(crate) meta: Array<MapData, Meta>,
    config: Array<MapData, Config>,
    services: HashMap<MapData, ServiceKey, u32>,
    svc_conf: Array<MapData, ServiceConf>,
    ports: Array<MapData, u32>,
    peers: Array<MapData, PeerConf>,
    maglev: Array<MapData, u32>,
    pub(crate) flows: HashMap<MapData, FlowKey, FlowValue>,
    buckets: Array<MapData, Bucket>,
    guard: HashMap<MapData, GuardKey, Bucket>,
    decap: PerCpuHashMap<MapData, AddrKey, DecapStats>,
    svc_stats: PerCpuArray<MapData, ServiceStats>,
    peer_stats: PerCpuArray<MapData, PeerStats>,
    global_stats: PerCpuArray<MapData, GlobalStats>,
    /// Only the kernel uses it; held so its fd lives as long as the others (a program
    /// loaded after the maps were taken from the object still refers to it).
    _flow_budget: PerCpuArray<MapData, redirector_ebpf::FlowBudget>,
    nr_cpus: usize,
    flow_capacity: u32,
    guard_capacity: u32,
}

fn take<T>(maps: &mut StdHashMap<String, Map>, name: &'static str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = maps.remove(name).ok_or_else(|| Error::MissingObject {
        kind: "map",
        name: name.to_owned(),
    })?;
    T::try_from(map).map_err(|e| Error::map(name, "open", e))
}

fn is_enoent(error: &MapError) -> bool {
    matches!(error, MapError::KeyNotFound | MapError::ElementNotFound)
        || crate::error::errno_in(error) == Some(libc::ENOENT)
}

fn capacity<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>, name: &str) -> Result<u32> {
    map.map()
        .info()
        .map(|i| i.max_entries())
        .map_err(|e| Error::map(name, "inspect", e))
}

impl KernelMaps {
    /// Takes the typed handles out of `maps` (from a loaded object or from pins).
    pub(crate) fn from_maps(mut maps: StdHashMap<String, Map>) -> Result<Self> {
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(path, error)| Error::io("read", PathBuf::from(path), error))?;
        let flows: HashMap<MapData, FlowKey, FlowValue> = take(&mut maps, map_names::FLOWS)?;
        let guard: HashMap<MapData, GuardKey, Bucket> = take(&mut maps, map_names::GUARD)?;
        let flow_capacity = capacity(&flows, map_names::FLOWS)?;
        let guard_capacity = capacity(&guard, map_names::GUARD)?;
        Ok(Self {
            meta: take(&mut maps, map_names::META)?,
            config: take(&mut maps, map_names::CONFIG)?,
            services: take(&mut maps, map_names::SERVICES)?,
            svc_conf: take(&mut maps, map_names::SVC_CONF)?,
            ports: take(&mut maps, map_names::PORTS)?,
            peers: take(&mut maps, map_names::PEERS)?,
            maglev: take(&mut maps, map_names::MAGLEV)?,
            flows,
            buckets: take(&mut maps, map_names::BUCKETS)?,
            guard,
            decap: take(&mut maps, map_names::DECAP_ALLOW)?,
            svc_stats: take(&mut maps, map_names::SVC_STATS)?,
            peer_stats: take(&mut maps, map_names::PEER_STATS)?,
            global_stats: take(&mut maps, map_names::GLOBAL_STATS)?,
            _flow_budget: take(&mut maps, map_names::FLOW_BUDGET)?,
            nr_cpus,
            flow_capacity,
            guard_capacity,
        })
    }

    pub(crate) fn flow_capacity(&self) -> u32 {
        self.flow_capacity
    }

    pub(crate) fn guard_capacity(&self) -> u32 {
        self.guard_capacity
    }

    /// Number of flow-table entries (bounded walk: the LRU may change under us).
    pub(crate) fn flow_count(&self) -> Result<usize> {
        Ok(self.flows()?.len())
    }

    pub(crate) fn write_meta(&mut self, meta: &Meta) -> Result<()> {
        self.meta
            .set(0, meta, 0)
            .map_err(|e| Error::map(map_names::META, "write", e))
    }

    pub(crate) fn read_meta(&self) -> Result<Meta> {
        self.meta
            .get(&0, 0)
            .map_err(|e| Error::map(map_names::META, "read", e))
    }

    fn zeroes<T: aya::Pod + Default>(&self) -> Result<PerCpuValues<T>> {
        PerCpuValues::try_from(vec![T::default(); self.nr_cpus])
            .map_err(|e| Error::io("build per-CPU values", PathBuf::new(), e))
    }
}

/// Collects `(key, value)` pairs of a hash map, skipping keys that vanish while we walk (LRU
/// evictions) and stopping after twice the capacity: a walk can restart from the first key
/// when the current one is evicted, and must not loop forever under churn.
fn collect<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &str,
    limit: u32,
) -> Result<Vec<(K, V)>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (n, key) in map.keys().enumerate() {
        if n as u64 >= 2 * u64::from(limit) {
            break;
        }
        let key = match key {
            Ok(key) => key,
            Err(e) if is_enoent(&e) => continue,
            Err(e) => return Err(Error::map(name, "iterate", e)),
        };
        if !seen.insert(key) {
            continue;
        }
        match map.get(&key, 0) {
            Ok(value) => out.push((key, value)),
            Err(e) if is_enoent(&e) => {}
            Err(e) => return Err(Error::map(name, "read", e)),
        }
    }
    Ok(out)
}

/// Like [`collect`] for the per-CPU allow-list: every sender with its per-CPU counters.
fn collect_decap(
    map: &PerCpuHashMap<MapData, AddrKey, DecapStats>,
) -> Result<Vec<(AddrKey, Vec<DecapStats>)>> {
    let name = map_names::DECAP_ALLOW;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (n, key) in map.keys().enumerate() {
        if n as u64 >= 2 * u64::from(DECAP_ALLOW_CAPACITY) {
            break;
        }
        let key = match key {
            Ok(key) => key,
            Err(e) if is_enoent(&e) => continue,
            Err(e) => return Err(Error::map(name, "iterate", e)),
        };
        if !seen.insert(key) {
            continue;
        }
        match map.get(&key, 0) {
            Ok(values) => out.push((key, values.to_vec())),
            Err(e) if is_enoent(&e) => {}
            Err(e) => return Err(Error::map(name, "read", e)),
        }
    }
    Ok(out)
}

fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &str,
    key: &K,
) -> Result<()> {
    match map.remove(key) {
        Ok(()) => Ok(()),
        Err(e) if is_enoent(&e) => Ok(()),
        Err(e) => Err(Error::map(name, "delete from", e)),
    }
}

impl Backend for KernelMaps {
    fn config(&self) -> Result<Config> {
        self.config
            .get(&0, 0)
            .map_err(|e| Error::map(map_names::CONFIG, "read", e))
    }
    fn set_config(&mut self, config: &Config) -> Result<()> {
        self.config
            .set(0, config, 0)
            .map_err(|e| Error::map(map_names::CONFIG, "write", e))
    }
    fn service_keys(&self) -> Result<Vec<(ServiceKey, u32)>> {
        collect(&self.services, map_names::SERVICES, SERVICE_KEYS_CAPACITY)
    }
    fn insert_service_key(&mut self, key: &ServiceKey, id: u32) -> Result<()> {
        self.services
            .insert(key, id, 0)
            .map_err(|e| Error::map(map_names::SERVICES, "insert into", e))
    }
    fn remove_service_key(&mut self, key: &ServiceKey) -> Result<()> {
        remove(&mut self.services, map_names::SERVICES, key)
    }
    fn svc_conf(&self, id: u32) -> Result<ServiceConf> {
        self.svc_conf
            .get(&id, 0)
            .map_err(|e| Error::map(map_names::SVC_CONF, "read", e))
    }
    fn set_svc_conf(&mut self, id: u32, conf: &ServiceConf) -> Result<()> {
        self.svc_conf
            .set(id, conf, 0)
            .map_err(|e| Error::map(map_names::SVC_CONF, "write", e))
    }
    fn port(&self, port: u16) -> Result<u32> {
        self.ports
            .get(&u32::from(port), 0)
            .map_err(|e| Error::map(map_names::PORTS, "read", e))
    }
    fn set_port(&mut self, port: u16, count: u32) -> Result<()> {
        self.ports
            .set(u32::from(port), count, 0)
            .map_err(|e| Error::map(map_names::PORTS, "write", e))
    }
    fn peer(&self, slot: u32) -> Result<PeerConf> {
        self.peers
            .get(&slot, 0)
            .map_err(|e| Error::map(map_names::PEERS, "read", e))
    }
    fn set_peer(&mut self, slot: u32, conf: &PeerConf) -> Result<()> {
        self.peers
            .set(slot, conf, 0)
            .map_err(|e| Error::map(map_names::PEERS, "write", e))
    }
    fn maglev(&self, index: u32) -> Result<u32> {
        self.maglev
            .get(&index, 0)
            .map_err(|e| Error::map(map_names::MAGLEV, "read", e))
    }
    fn set_maglev(&mut self, index: u32, value: u32) -> Result<()> {
        self.maglev
            .set(index, value, 0)
            .map_err(|e| Error::map(map_names::MAGLEV, "write", e))
    }
    fn bucket(&self, index: u32) -> Result<Bucket> {
        self.buckets
            .get(&index, 0)
            .map_err(|e| Error::map(map_names::BUCKETS, "read", e))
    }
    fn set_bucket(&mut self, index: u32, bucket: &Bucket) -> Result<()> {
        self.buckets
            .set(index, bucket, 0)
            .map_err(|e| Error::map(map_names::BUCKETS, "write", e))
    }
    fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        collect(&self.flows, map_names::FLOWS, self.flow_capacity)
    }
    fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        remove(&mut self.flows, map_names::FLOWS, key)
    }
    fn guard_keys(&self) -> Result<Vec<GuardKey>> {
        Ok(collect(&self.guard, map_names::GUARD, self.guard_capacity)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }
    fn remove_guard(&mut self, key: &GuardKey) -> Result<()> {
        remove(&mut self.guard, map_names::GUARD, key)
    }
    fn decap_keys(&self) -> Result<Vec<AddrKey>> {
        // Bounded like `collect`: a walk may restart when the current key is deleted.
        let mut seen = std::collections::HashSet::new();
        let mut keys = Vec::new();
        for key in self.decap.keys().take(2 * DECAP_ALLOW_CAPACITY as usize) {
            match key {
                Ok(key) if seen.insert(key) => keys.push(key),
                Ok(_) => {}
                Err(e) if is_enoent(&e) => {}
                Err(e) => return Err(Error::map(map_names::DECAP_ALLOW, "iterate", e)),
            }
        }
        Ok(keys)
    }
    fn insert_decap(&mut self, key: &AddrKey) -> Result<()> {
        let zero = self.zeroes()?;
        // BPF_NOEXIST: never zero the counters of a sender already on the list.
        match self.decap.insert(key, zero, u64::from(BPF_NOEXIST)) {
            Ok(()) => Ok(()),
            Err(e) if crate::error::errno_in(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(Error::map(map_names::DECAP_ALLOW, "insert into", e)),
        }
    }
    fn remove_decap(&mut self, key: &AddrKey) -> Result<()> {
        match self.decap.remove(key) {
            Ok(()) => Ok(()),
            Err(e) if is_enoent(&e) => Ok(()),
            Err(e) => Err(Error::map(map_names::DECAP_ALLOW, "delete from", e)),
        }
    }
    fn decap_stats(&self) -> Result<Vec<(AddrKey, Vec<DecapStats>)>> {
        collect_decap(&self.decap)
    }
    fn service_stats(&self, id: u32) -> Result<Vec<ServiceStats>> {
        self.svc_stats
            .get(&id, 0)
            .map(|v| v.to_vec())
            .map_err(|e| Error::map(map_names::SVC_STATS, "read", e))
    }
    fn reset_service_stats(&mut self, id: u32) -> Result<()> {
        let zero = self.zeroes()?;
        self.svc_stats
            .set(id, zero, 0)
            .map_err(|e| Error::map(map_names::SVC_STATS, "write", e))
    }
    fn peer_stats(&self, slot: u32) -> Result<Vec<PeerStats>> {
        self.peer_stats
            .get(&slot, 0)
            .map(|v| v.to_vec())
            .map_err(|e| Error::map(map_names::PEER_STATS, "read", e))
    }
    fn reset_peer_stats(&mut self, slot: u32) -> Result<()> {
        let zero = self.zeroes()?;
        self.peer_stats
            .set(slot, zero, 0)
            .map_err(|e| Error::map(map_names::PEER_STATS, "write", e))
    }
    fn global_stats(&self) -> Result<Vec<GlobalStats>> {
        self.global_stats
            .get(&0, 0)
            .map(|v| v.to_vec())
            .map_err(|e| Error::map(map_names::GLOBAL_STATS, "read", e))
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;

    #[test]
    fn layouts_cover_every_map_once() {
        let mut names: Vec<&str> = LAYOUTS.iter().map(|l| l.name).collect();
        names.sort_unstable();
        let mut all = map_names::ALL.to_vec();
        all.sort_unstable();
        assert_eq!(names, all);
    }

    #[test]
    fn a_directory_without_pins_is_empty_state() {
        let dir = std::env::temp_dir().join(format!("p2pcdn-nopins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(check_pinned(&dir).unwrap(), Pinned::Nothing);
        // A map pin without META cannot be checked: refuse it.
        std::fs::write(dir.join(map_names::PEERS), b"").unwrap();
        let err = check_pinned(&dir).unwrap_err();
        assert!(matches!(err, Error::UnversionedPins { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
