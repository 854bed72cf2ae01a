//! The map-maintenance logic behind [`Dataplane`], written once against a [`Backend`] (the
//! kernel maps, or in-memory maps for tests and fakes).
//!
//! Invariants kept for the XDP program (see `redirector_ebpf`):
//! - `PORTS[port]` is the number of `SERVICES` keys using that port (the kernel skips the
//!   hash lookup when it is 0), recomputed for every port a change touches.
//! - A service becomes visible (`SVC_ACTIVE`, then its `SERVICES` keys) only after its
//!   Maglev ring is written, and disappears keys first.
//! - A slot that gets a new peer, or loses one, gets a new `generation`, a full bucket and
//!   (for a new peer) zeroed counters; a removed peer leaves the rings of its services and
//!   its steered flows are deleted from `FLOWS`.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use log::warn;
use redirector_ebpf::{
    AddrKey, Bucket, Config, DECISION_STEERED, DecapStats, FlowKey, FlowValue, GlobalStats,
    GuardKey, MAGLEV_STRIDE, MAX_PEERS, MAX_SERVICES, PEER_ACTIVE, PeerConf, PeerStats, SVC_ACTIVE,
    ServiceConf, ServiceKey, ServiceStats, peer_bucket, service_bucket,
};

use crate::{
    dataplane::Dataplane,
    error::{Error, Result},
    maglev,
    spec::{
        ALL_SERVICES_MASK, ConfigSpec, PeerInfo, PeerServices, PeerSpec, ServiceInfo, ServiceSpec,
        addr_from_bytes, addr_key, name_from_bytes, peer_info, service_addr, service_info,
        service_key,
    },
    stats::{DecapCounters, Stats, sum_decap, sum_global, sum_peer, sum_service},
};

/// Raw access to the maps, one element at a time.
pub(crate) trait Backend {
    fn config(&self) -> Result<Config>;
    fn set_config(&mut self, config: &Config) -> Result<()>;
    fn service_keys(&self) -> Result<Vec<(ServiceKey, u32)>>;
    fn insert_service_key(&mut self, key: &ServiceKey, id: u32) -> Result<()>;
    fn remove_service_key(&mut self, key: &ServiceKey) -> Result<()>;
    fn svc_conf(&self, id: u32) -> Result<ServiceConf>;
    fn set_svc_conf(&mut self, id: u32, conf: &ServiceConf) -> Result<()>;
    fn port(&self, port: u16) -> Result<u32>;
    fn set_port(&mut self, port: u16, count: u32) -> Result<()>;
    fn peer(&self, slot: u32) -> Result<PeerConf>;
    fn set_peer(&mut self, slot: u32, conf: &PeerConf) -> Result<()>;
    fn maglev(&self, index: u32) -> Result<u32>;
    fn set_maglev(&mut self, index: u32, value: u32) -> Result<()>;
    fn bucket(&self, index: u32) -> Result<Bucket>;
    fn set_bucket(&mut self, index: u32, bucket: &Bucket) -> Result<()>;
    fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>>;
    fn remove_flow(&mut self, key: &FlowKey) -> Result<()>;
    fn guard_keys(&self) -> Result<Vec<GuardKey>>;
    fn remove_guard(&mut self, key: &GuardKey) -> Result<()>;
    fn decap_keys(&self) -> Result<Vec<AddrKey>>;
    /// Adds a sender with zeroed counters; a sender already there keeps its counters.
    fn insert_decap(&mut self, key: &AddrKey) -> Result<()>;
    /// Removes a sender and its counters.
    fn remove_decap(&mut self, key: &AddrKey) -> Result<()>;
    /// Every allowed sender with its per-CPU decapsulation counters.
    fn decap_stats(&self) -> Result<Vec<(AddrKey, Vec<DecapStats>)>>;
    fn service_stats(&self, id: u32) -> Result<Vec<ServiceStats>>;
    fn reset_service_stats(&mut self, id: u32) -> Result<()>;
    fn peer_stats(&self, slot: u32) -> Result<Vec<PeerStats>>;
    fn reset_peer_stats(&mut self, slot: u32) -> Result<()>;
    fn global_stats(&self) -> Result<Vec<GlobalStats>>;
}

/// What the engine needs from the host besides the maps.
pub(crate) trait Host {
    /// The interface the program runs on, if any.
    fn iface(&self) -> Option<&str>;
    /// The interface's own address of the given family (for tunnel sources).
    fn default_source(&self, v4: bool) -> Result<IpAddr>;
    /// Makes sure the kernel keeps a neighbour entry for the next hop towards `peer`, so
    /// `bpf_fib_lookup` in XDP finds it.
    fn prepare_peer(&self, peer: IpAddr) -> Result<()>;
}

/// A host without an interface: no default source, no neighbour management.
pub(crate) struct NoHost;

impl Host for NoHost {
    fn iface(&self) -> Option<&str> {
        None
    }
    fn default_source(&self, v4: bool) -> Result<IpAddr> {
        Err(Error::NoSourceAddress {
            iface: "(no interface)".into(),
            family: if v4 { 4 } else { 6 },
        })
    }
    fn prepare_peer(&self, _peer: IpAddr) -> Result<()> {
        Ok(())
    }
}

/// The map logic with caches of the small maps (services, keys, peers) and of the Maglev
/// rings it has read or written.
pub(crate) struct Engine<B> {
    pub(crate) maps: B,
    host: Box<dyn Host + Send>,
    services: Vec<ServiceConf>,
    keys: HashMap<ServiceKey, u32>,
    peers: Vec<PeerConf>,
    rings: HashMap<u32, Vec<u32>>,
}

impl<B: Backend> Engine<B> {
    /// Reads the configured services and peers from `maps`.
    pub(crate) fn new(maps: B, host: Box<dyn Host + Send>) -> Result<Self> {
        let services = (0..MAX_SERVICES)
            .map(|id| maps.svc_conf(id))
            .collect::<Result<Vec<_>>>()?;
        let peers = (0..MAX_PEERS)
            .map(|slot| maps.peer(slot))
            .collect::<Result<Vec<_>>>()?;
        let keys = maps.service_keys()?.into_iter().collect();
        Ok(Self::with_state(maps, host, services, peers, keys))
    }

    /// An engine whose caches are given (they must match `maps`).
    pub(crate) fn with_state(
        maps: B,
        host: Box<dyn Host + Send>,
        services: Vec<ServiceConf>,
        peers: Vec<PeerConf>,
        keys: HashMap<ServiceKey, u32>,
    ) -> Self {
        Self {
            maps,
            host,
            services,
            keys,
            peers,
            rings: HashMap::new(),
        }
    }

    fn service_id(&self, name: &str) -> Option<u32> {
        self.services
            .iter()
            .position(|c| c.flags & SVC_ACTIVE != 0 && name_from_bytes(&c.name) == name)
            .map(|i| i as u32)
    }

    fn peer_slot(&self, name: &str) -> Option<u32> {
        self.peers
            .iter()
            .position(|c| c.flags & PEER_ACTIVE != 0 && name_from_bytes(&c.name) == name)
            .map(|i| i as u32)
    }

    fn active_service_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.services
            .iter()
            .enumerate()
            .filter(|(_, c)| c.flags & SVC_ACTIVE != 0)
            .map(|(i, _)| i as u32)
    }

    /// Slots of the peers in service `id`'s ring, with their names and weights.
    fn ring_members(&self, id: u32) -> Vec<(String, u32, u32)> {
        self.peers
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.flags & PEER_ACTIVE != 0
                    && p.weight > 0
                    && id < 64
                    && p.services & (1u64 << id) != 0
            })
            .map(|(slot, p)| (name_from_bytes(&p.name), slot as u32, p.weight))
            .collect()
    }

    /// The first `size` slots of service `id`'s ring as they are in the map (read once,
    /// then kept up to date by [`Self::sync_ring`]). One lookup per slot: aya 0.14 has no
    /// `BPF_MAP_LOOKUP_BATCH` wrapper, and a 65 537-slot ring reads in tens of milliseconds.
    fn current_ring(&mut self, id: u32, size: u32) -> Result<&[u32]> {
        let base = id * MAGLEV_STRIDE;
        let cached = self.rings.entry(id).or_default();
        while (cached.len() as u32) < size {
            let i = cached.len() as u32;
            cached.push(self.maps.maglev(base + i)?);
        }
        Ok(&cached[..size as usize])
    }

    /// Recomputes service `id`'s ring for `ring_size` and writes the slots that differ.
    /// Returns how many slots were written.
    fn sync_ring(&mut self, id: u32, ring_size: u32) -> Result<usize> {
        let members = self.ring_members(id);
        let members: Vec<maglev::Member<'_>> = members
            .iter()
            .map(|(name, slot, weight)| maglev::Member {
                name,
                slot: *slot,
                weight: *weight,
            })
            .collect();
        let desired = maglev::ring(&members, ring_size);
        let changes = maglev::diff(self.current_ring(id, ring_size)?, &desired);
        let base = id * MAGLEV_STRIDE;
        for &(i, value) in &changes {
            self.maps.set_maglev(base + i, value)?;
            if let Some(ring) = self.rings.get_mut(&id) {
                ring[i as usize] = value;
            }
        }
        Ok(changes.len())
    }

    /// Sets `PORTS[port]` to the number of service keys using it.
    fn sync_ports(&mut self, ports: impl IntoIterator<Item = u16>) -> Result<()> {
        let ports: HashSet<u16> = ports.into_iter().collect();
        for port in ports {
            let count = self
                .keys
                .keys()
                .filter(|k| u16::from_be(k.port_be) == port)
                .count() as u32;
            self.maps.set_port(port, count)?;
        }
        Ok(())
    }

    fn remove_flows_where(&mut self, pred: impl Fn(&FlowValue) -> bool) -> Result<usize> {
        let doomed: Vec<FlowKey> = self
            .maps
            .flows()?
            .into_iter()
            .filter(|(_, v)| pred(v))
            .map(|(k, _)| k)
            .collect();
        for key in &doomed {
            self.maps.remove_flow(key)?;
        }
        Ok(doomed.len())
    }

    fn service_names(&self) -> Vec<Option<String>> {
        self.services
            .iter()
            .map(|c| (c.flags & SVC_ACTIVE != 0).then(|| name_from_bytes(&c.name)))
            .collect()
    }

    fn services_mask(&self, services: &PeerServices) -> Result<u64> {
        match services {
            PeerServices::All => Ok(ALL_SERVICES_MASK),
            PeerServices::Only(names) => {
                let mut mask = 0u64;
                for name in names {
                    let id = self
                        .service_id(name)
                        .ok_or_else(|| Error::UnknownService { name: name.clone() })?;
                    mask |= 1u64 << id;
                }
                Ok(mask)
            }
        }
    }

    /// The current Maglev ring of service `id` (its first `ring_size` slots).
    pub(crate) fn ring(&mut self, id: u32) -> Result<Vec<u32>> {
        let size = self
            .services
            .get(id as usize)
            .filter(|c| c.flags & SVC_ACTIVE != 0)
            .map(|c| c.ring_size)
            .ok_or_else(|| Error::UnknownService {
                name: format!("#{id}"),
            })?;
        Ok(self.current_ring(id, size)?.to_vec())
    }

    pub(crate) fn iface(&self) -> Option<&str> {
        self.host.iface()
    }
}

impl<B: Backend> Dataplane for Engine<B> {
    fn config(&self) -> Result<ConfigSpec> {
        Ok(ConfigSpec::from_config(&self.maps.config()?))
    }

    fn set_config(&mut self, config: &ConfigSpec) -> Result<()> {
        let value = config.to_config()?;
        self.maps.set_config(&value)
    }

    fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<u32> {
        let conf = spec.to_conf()?;
        let existing = self.service_id(&spec.name);
        let wanted: HashSet<ServiceKey> = spec.addrs.iter().map(|&a| service_key(a)).collect();
        for key in &wanted {
            if let Some(&owner) = self.keys.get(key)
                && Some(owner) != existing
            {
                return Err(Error::AddressInUse {
                    addr: service_addr(key).map_or_else(String::new, |a| a.to_string()),
                    service: name_from_bytes(&self.services[owner as usize].name),
                });
            }
        }
        let id = match existing {
            Some(id) => id,
            None => self
                .services
                .iter()
                .position(|c| c.flags & SVC_ACTIVE == 0)
                .map(|i| i as u32)
                .ok_or(Error::Full {
                    what: "service id",
                    max: MAX_SERVICES,
                })?,
        };
        if existing.is_none() {
            // A reused id must not inherit counters, admission state, flows or guard state.
            self.maps.reset_service_stats(id)?;
            self.maps
                .set_bucket(service_bucket(id), &Bucket::default())?;
            self.remove_flows_where(|v| v.service == id)?;
            let guards: Vec<GuardKey> = self
                .maps
                .guard_keys()?
                .into_iter()
                .filter(|k| k.service == id)
                .collect();
            for key in &guards {
                self.maps.remove_guard(key)?;
            }
        }
        // Before the kernel can use the service (or its new ring size). Also on a plain
        // update: re-applying a service heals a ring left half-written by a crash.
        self.sync_ring(id, conf.ring_size)?;
        self.maps.set_svc_conf(id, &conf)?;
        self.services[id as usize] = conf;

        let old_keys: Vec<ServiceKey> = self
            .keys
            .iter()
            .filter(|&(_, &owner)| owner == id)
            .map(|(k, _)| *k)
            .collect();
        let added: Vec<ServiceKey> = wanted
            .iter()
            .filter(|k| !self.keys.contains_key(k))
            .copied()
            .collect();
        let mut touched = Vec::new();
        for key in &added {
            self.keys.insert(*key, id);
            touched.push(u16::from_be(key.port_be));
        }
        self.sync_ports(touched.iter().copied())?;
        for key in wanted.iter().filter(|k| !old_keys.contains(k)) {
            self.maps.insert_service_key(key, id)?;
        }
        let mut dropped = Vec::new();
        for key in old_keys.iter().filter(|k| !wanted.contains(k)) {
            self.maps.remove_service_key(key)?;
            self.keys.remove(key);
            dropped.push(u16::from_be(key.port_be));
        }
        self.sync_ports(dropped)?;
        Ok(id)
    }

    fn remove_service(&mut self, name: &str) -> Result<()> {
        let id = self.service_id(name).ok_or_else(|| Error::UnknownService {
            name: name.to_owned(),
        })?;
        let keys: Vec<ServiceKey> = self
            .keys
            .iter()
            .filter(|&(_, &owner)| owner == id)
            .map(|(k, _)| *k)
            .collect();
        for key in &keys {
            self.maps.remove_service_key(key)?;
            self.keys.remove(key);
        }
        self.sync_ports(keys.iter().map(|k| u16::from_be(k.port_be)))?;
        let cleared = ServiceConf {
            flags: 0,
            ..ServiceConf::default()
        };
        self.maps.set_svc_conf(id, &cleared)?;
        self.services[id as usize] = cleared;
        // A later service reusing the id must not be served by this one's peers.
        for slot in 0..MAX_PEERS {
            let mut peer = self.peers[slot as usize];
            if peer.flags & PEER_ACTIVE != 0
                && peer.services != ALL_SERVICES_MASK
                && peer.services & (1u64 << id) != 0
            {
                peer.services &= !(1u64 << id);
                self.maps.set_peer(slot, &peer)?;
                self.peers[slot as usize] = peer;
            }
        }
        self.remove_flows_where(|v| v.service == id)?;
        let guards: Vec<GuardKey> = self
            .maps
            .guard_keys()?
            .into_iter()
            .filter(|k| k.service == id)
            .collect();
        for key in &guards {
            self.maps.remove_guard(key)?;
        }
        Ok(())
    }

    fn services(&self) -> Result<Vec<ServiceInfo>> {
        let mut out = Vec::new();
        for id in self.active_service_ids() {
            let addrs: Vec<SocketAddr> = self
                .keys
                .iter()
                .filter(|&(_, &owner)| owner == id)
                .filter_map(|(k, _)| service_addr(k))
                .collect();
            let mut peers: Vec<String> = self
                .ring_members(id)
                .into_iter()
                .map(|(n, _, _)| n)
                .collect();
            peers.sort();
            out.push(service_info(id, &self.services[id as usize], addrs, peers));
        }
        Ok(out)
    }

    fn set_peer(&mut self, spec: &PeerSpec) -> Result<u32> {
        spec.validate()?;
        let mask = self.services_mask(&spec.services)?;
        let src = match spec.src {
            Some(src) => src,
            None => self.host.default_source(spec.addr.is_ipv4())?,
        };
        let mut conf = spec.to_conf(src, mask)?;
        let existing = self.peer_slot(&spec.name);
        let slot = match existing {
            Some(slot) => slot,
            None => self
                .peers
                .iter()
                .position(|c| c.flags & PEER_ACTIVE == 0)
                .map(|i| i as u32)
                .ok_or(Error::Full {
                    what: "peer slot",
                    max: MAX_PEERS,
                })?,
        };
        let old = self.peers[slot as usize];
        if let Err(error) = self.host.prepare_peer(spec.addr) {
            // Graceful: without a neighbour entry the kernel serves the peer's share
            // locally (counted as fib_no_neigh) until the stack resolves it.
            warn!("peer {}: {error}", spec.name);
        }
        let resync = if existing.is_some() {
            conf.generation = old.generation;
            if old.weight != conf.weight || old.services != conf.services {
                old.services | conf.services
            } else {
                0
            }
        } else {
            conf.generation = old.generation.wrapping_add(1);
            self.maps.reset_peer_stats(slot)?;
            self.maps
                .set_bucket(peer_bucket(slot), &Bucket::default())?;
            conf.services
        };
        self.maps.set_peer(slot, &conf)?;
        self.peers[slot as usize] = conf;
        let ids: Vec<u32> = self
            .active_service_ids()
            .filter(|&id| id < 64 && resync & (1u64 << id) != 0)
            .collect();
        for id in ids {
            let size = self.services[id as usize].ring_size;
            self.sync_ring(id, size)?;
        }
        Ok(slot)
    }

    fn remove_peer(&mut self, name: &str) -> Result<()> {
        let slot = self.peer_slot(name).ok_or_else(|| Error::UnknownPeer {
            name: name.to_owned(),
        })?;
        let old = self.peers[slot as usize];
        let cleared = PeerConf {
            flags: 0,
            generation: old.generation.wrapping_add(1),
            ..PeerConf::default()
        };
        // Inactive first: from here on the kernel never picks the slot nor follows its
        // flows (their generation is stale).
        self.maps.set_peer(slot, &cleared)?;
        self.peers[slot as usize] = cleared;
        let ids: Vec<u32> = self
            .active_service_ids()
            .filter(|&id| id < 64 && old.services & (1u64 << id) != 0)
            .collect();
        for id in ids {
            let size = self.services[id as usize].ring_size;
            self.sync_ring(id, size)?;
        }
        self.maps
            .set_bucket(peer_bucket(slot), &Bucket::default())?;
        self.remove_flows_where(|v| v.decision == DECISION_STEERED && v.peer == slot)?;
        Ok(())
    }

    fn peers(&self) -> Result<Vec<PeerInfo>> {
        let names = self.service_names();
        Ok(self
            .peers
            .iter()
            .enumerate()
            .filter_map(|(slot, conf)| peer_info(slot as u32, conf, &names))
            .collect())
    }

    fn allow_decap(&mut self, addr: IpAddr) -> Result<bool> {
        let key = addr_key(addr);
        if self.maps.decap_keys()?.contains(&key) {
            return Ok(false);
        }
        self.maps.insert_decap(&key)?;
        Ok(true)
    }

    fn deny_decap(&mut self, addr: IpAddr) -> Result<bool> {
        let key = addr_key(addr);
        if !self.maps.decap_keys()?.contains(&key) {
            return Ok(false);
        }
        self.maps.remove_decap(&key)?;
        Ok(true)
    }

    fn decap_allowed(&self) -> Result<Vec<IpAddr>> {
        let mut out: Vec<IpAddr> = self
            .maps
            .decap_keys()?
            .iter()
            .filter_map(|k| addr_from_bytes(&k.addr, k.family))
            .collect();
        out.sort();
        Ok(out)
    }

    fn decap_stats(&self) -> Result<Vec<DecapCounters>> {
        let mut out: Vec<DecapCounters> = self
            .maps
            .decap_stats()?
            .iter()
            .filter_map(|(k, per_cpu)| {
                addr_from_bytes(&k.addr, k.family).map(|addr| sum_decap(addr, per_cpu))
            })
            .collect();
        out.sort_by_key(|c| c.addr);
        Ok(out)
    }

    fn stats(&self) -> Result<Stats> {
        let global = sum_global(&self.maps.global_stats()?);
        let mut services = Vec::new();
        for id in self.active_service_ids() {
            let name = name_from_bytes(&self.services[id as usize].name);
            services.push(sum_service(name, id, &self.maps.service_stats(id)?));
        }
        let mut peers = Vec::new();
        for (slot, conf) in self.peers.iter().enumerate() {
            if conf.flags & PEER_ACTIVE != 0 {
                let slot = slot as u32;
                let name = name_from_bytes(&conf.name);
                peers.push(sum_peer(name, slot, &self.maps.peer_stats(slot)?));
            }
        }
        Ok(Stats {
            global,
            services,
            peers,
            decap: self.decap_stats()?,
        })
    }
}
