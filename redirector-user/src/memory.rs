//! [`MemoryDataplane`]: the same map logic as [`Redirector`](crate::Redirector) over maps
//! kept in memory, for tests of control-plane logic without root.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use redirector_ebpf::{
    AddrKey, BUCKETS_LEN, Bucket, Config, DEFAULT_GUE_PORT, DecapStats, FlowKey, FlowValue,
    GlobalStats, GuardKey, MAGLEV_STRIDE, MAX_PEERS, MAX_SERVICES, PeerConf, PeerStats,
    ServiceConf, ServiceKey, ServiceStats,
};

use crate::{
    dataplane::Dataplane,
    engine::{Backend, Engine, Host},
    error::{Error, Result},
    spec::{ConfigSpec, PeerInfo, PeerSpec, ServiceInfo, ServiceSpec, addr_key},
    stats::{DecapCounters, Stats},
};

/// Number of simulated CPUs of the per-CPU maps.
const CPUS: usize = 2;

/// In-memory copies of the maps, initialised like freshly created kernel maps (zeroes).
#[derive(Debug)]
pub(crate) struct MemoryMaps {
    config: Config,
    service_keys: HashMap<ServiceKey, u32>,
    svc_conf: Vec<ServiceConf>,
    ports: Vec<u32>,
    peers: Vec<PeerConf>,
    maglev: HashMap<u32, u32>,
    maglev_writes: usize,
    buckets: Vec<Bucket>,
    flows: HashMap<FlowKey, FlowValue>,
    guard: HashMap<GuardKey, Bucket>,
    decap: HashMap<AddrKey, [DecapStats; CPUS]>,
    svc_stats: Vec<[ServiceStats; CPUS]>,
    peer_stats: Vec<[PeerStats; CPUS]>,
    global_stats: [GlobalStats; CPUS],
}

/// Zeroed like a new `BPF_MAP_TYPE_ARRAY` (which is not what `Default` gives every type).
fn zeroed_service() -> ServiceConf {
    ServiceConf {
        ring_size: 0,
        ..ServiceConf::default()
    }
}

fn zeroed_peer() -> PeerConf {
    PeerConf {
        encap: 0,
        family: 0,
        gue_port_be: 0,
        mtu: 0,
        ..PeerConf::default()
    }
}

impl MemoryMaps {
    fn new() -> Self {
        Self {
            config: Config {
                gue_port_be: DEFAULT_GUE_PORT.to_be(),
                ..Config::default()
            },
            service_keys: HashMap::new(),
            svc_conf: vec![zeroed_service(); MAX_SERVICES as usize],
            ports: vec![0; 65_536],
            peers: vec![zeroed_peer(); MAX_PEERS as usize],
            maglev: HashMap::new(),
            maglev_writes: 0,
            buckets: vec![Bucket::default(); BUCKETS_LEN as usize],
            flows: HashMap::new(),
            guard: HashMap::new(),
            decap: HashMap::new(),
            svc_stats: vec![[ServiceStats::default(); CPUS]; MAX_SERVICES as usize],
            peer_stats: vec![[PeerStats::default(); CPUS]; MAX_PEERS as usize],
            global_stats: [GlobalStats::default(); CPUS],
        }
    }
}

fn out_of_range(what: &'static str, index: u32) -> Error {
    Error::invalid(what, index, "out of range")
}

fn get<T: Copy>(v: &[T], what: &'static str, index: u32) -> Result<T> {
    v.get(index as usize)
        .copied()
        .ok_or_else(|| out_of_range(what, index))
}

fn set<T>(v: &mut [T], what: &'static str, index: u32, value: T) -> Result<()> {
    let slot = v
        .get_mut(index as usize)
        .ok_or_else(|| out_of_range(what, index))?;
    *slot = value;
    Ok(())
}

impl Backend for MemoryMaps {
    fn config(&self) -> Result<Config> {
        Ok(self.config)
    }
    fn set_config(&mut self, config: &Config) -> Result<()> {
        self.config = *config;
        Ok(())
    }
    fn service_keys(&self) -> Result<Vec<(ServiceKey, u32)>> {
        Ok(self.service_keys.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn insert_service_key(&mut self, key: &ServiceKey, id: u32) -> Result<()> {
        self.service_keys.insert(*key, id);
        Ok(())
    }
    fn remove_service_key(&mut self, key: &ServiceKey) -> Result<()> {
        self.service_keys.remove(key);
        Ok(())
    }
    fn svc_conf(&self, id: u32) -> Result<ServiceConf> {
        get(&self.svc_conf, "service id", id)
    }
    fn set_svc_conf(&mut self, id: u32, conf: &ServiceConf) -> Result<()> {
        set(&mut self.svc_conf, "service id", id, *conf)
    }
    fn port(&self, port: u16) -> Result<u32> {
        get(&self.ports, "port", u32::from(port))
    }
    fn set_port(&mut self, port: u16, count: u32) -> Result<()> {
        set(&mut self.ports, "port", u32::from(port), count)
    }
    fn peer(&self, slot: u32) -> Result<PeerConf> {
        get(&self.peers, "peer slot", slot)
    }
    fn set_peer(&mut self, slot: u32, conf: &PeerConf) -> Result<()> {
        set(&mut self.peers, "peer slot", slot, *conf)
    }
    fn maglev(&self, index: u32) -> Result<u32> {
        if index >= MAX_SERVICES * MAGLEV_STRIDE {
            return Err(out_of_range("maglev index", index));
        }
        Ok(self.maglev.get(&index).copied().unwrap_or(0))
    }
    fn set_maglev(&mut self, index: u32, value: u32) -> Result<()> {
        if index >= MAX_SERVICES * MAGLEV_STRIDE {
            return Err(out_of_range("maglev index", index));
        }
        self.maglev.insert(index, value);
        self.maglev_writes += 1;
        Ok(())
    }
    fn bucket(&self, index: u32) -> Result<Bucket> {
        get(&self.buckets, "bucket", index)
    }
    fn set_bucket(&mut self, index: u32, bucket: &Bucket) -> Result<()> {
        set(&mut self.buckets, "bucket", index, *bucket)
    }
    fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        Ok(self.flows.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        self.flows.remove(key);
        Ok(())
    }
    fn guard_keys(&self) -> Result<Vec<GuardKey>> {
        Ok(self.guard.keys().copied().collect())
    }
    fn remove_guard(&mut self, key: &GuardKey) -> Result<()> {
        self.guard.remove(key);
        Ok(())
    }
    fn decap_keys(&self) -> Result<Vec<AddrKey>> {
        Ok(self.decap.keys().copied().collect())
    }
    fn insert_decap(&mut self, key: &AddrKey) -> Result<()> {
        // Like BPF_NOEXIST in the kernel backend: an existing sender keeps its counters.
        self.decap
            .entry(*key)
            .or_insert([DecapStats::default(); CPUS]);
        Ok(())
    }
    fn remove_decap(&mut self, key: &AddrKey) -> Result<()> {
        self.decap.remove(key);
        Ok(())
    }
    fn decap_stats(&self) -> Result<Vec<(AddrKey, Vec<DecapStats>)>> {
        Ok(self.decap.iter().map(|(k, v)| (*k, v.to_vec())).collect())
    }
    fn service_stats(&self, id: u32) -> Result<Vec<ServiceStats>> {
        get(&self.svc_stats, "service id", id).map(|s| s.to_vec())
    }
    fn reset_service_stats(&mut self, id: u32) -> Result<()> {
        set(
            &mut self.svc_stats,
            "service id",
            id,
            [ServiceStats::default(); CPUS],
        )
    }
    fn peer_stats(&self, slot: u32) -> Result<Vec<PeerStats>> {
        get(&self.peer_stats, "peer slot", slot).map(|s| s.to_vec())
    }
    fn reset_peer_stats(&mut self, slot: u32) -> Result<()> {
        set(
            &mut self.peer_stats,
            "peer slot",
            slot,
            [PeerStats::default(); CPUS],
        )
    }
    fn global_stats(&self) -> Result<Vec<GlobalStats>> {
        Ok(self.global_stats.to_vec())
    }
}

/// Interface addresses of the simulated host; neighbour requests are only recorded.
struct MemoryHost {
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

impl Host for MemoryHost {
    fn iface(&self) -> Option<&str> {
        Some("mem0")
    }
    fn default_source(&self, v4: bool) -> Result<IpAddr> {
        let addr = if v4 {
            self.v4.map(IpAddr::V4)
        } else {
            self.v6.map(IpAddr::V6)
        };
        addr.ok_or(Error::NoSourceAddress {
            iface: "mem0".into(),
            family: if v4 { 4 } else { 6 },
        })
    }
    fn prepare_peer(&self, _peer: IpAddr) -> Result<()> {
        Ok(())
    }
}

/// A [`Dataplane`] over in-memory maps: the exact logic of
/// [`Redirector`](crate::Redirector) (Maglev diffs, `PORTS` counts, generations, flow
/// clean-up), observable through the inspection methods, without root or a kernel.
pub struct MemoryDataplane {
    engine: Engine<MemoryMaps>,
}

impl MemoryDataplane {
    /// Empty maps; `v4`/`v6` are the interface addresses used as default tunnel sources.
    pub fn new(v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> Self {
        let maps = MemoryMaps::new();
        let services = maps.svc_conf.clone();
        let peers = maps.peers.clone();
        let keys = maps.service_keys.clone();
        let engine =
            Engine::with_state(maps, Box::new(MemoryHost { v4, v6 }), services, peers, keys);
        Self { engine }
    }

    /// The current Maglev ring of service `id` (peer slots, `PEER_NONE` for none).
    pub fn ring(&mut self, id: u32) -> Result<Vec<u32>> {
        self.engine.ring(id)
    }

    /// `PORTS[port]`: how many service addresses use this port.
    pub fn port_refs(&self, port: u16) -> u32 {
        self.engine.maps.ports[usize::from(port)]
    }

    /// `SVC_CONF[id]` as written.
    pub fn service_conf(&self, id: u32) -> Option<ServiceConf> {
        self.engine.maps.svc_conf.get(id as usize).copied()
    }

    /// `PEERS[slot]` as written.
    pub fn peer_conf(&self, slot: u32) -> Option<PeerConf> {
        self.engine.maps.peers.get(slot as usize).copied()
    }

    /// `BUCKETS[index]`.
    pub fn bucket(&self, index: u32) -> Option<Bucket> {
        self.engine.maps.buckets.get(index as usize).copied()
    }

    /// Sets `BUCKETS[index]` (as the kernel would when admitting connections).
    pub fn set_bucket(&mut self, index: u32, bucket: Bucket) {
        if let Some(b) = self.engine.maps.buckets.get_mut(index as usize) {
            *b = bucket;
        }
    }

    /// Number of `MAGLEV` elements written so far.
    pub fn maglev_writes(&self) -> usize {
        self.engine.maps.maglev_writes
    }

    /// The flow table.
    pub fn flows(&self) -> Vec<(FlowKey, FlowValue)> {
        self.engine
            .maps
            .flows
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    /// Inserts a flow (as the kernel would on a SYN).
    pub fn insert_flow(&mut self, key: FlowKey, value: FlowValue) {
        self.engine.maps.flows.insert(key, value);
    }

    /// Inserts flood-guard state (as the kernel would).
    pub fn insert_guard(&mut self, key: GuardKey, bucket: Bucket) {
        self.engine.maps.guard.insert(key, bucket);
    }

    /// Number of flood-guard entries.
    pub fn guard_len(&self) -> usize {
        self.engine.maps.guard.len()
    }

    /// Adds to CPU `cpu`'s counters of service `id` (as the kernel would).
    pub fn add_service_stats(&mut self, id: u32, cpu: usize, add: impl FnOnce(&mut ServiceStats)) {
        if let Some(stats) = self
            .engine
            .maps
            .svc_stats
            .get_mut(id as usize)
            .and_then(|s| s.get_mut(cpu))
        {
            add(stats);
        }
    }

    /// Adds to CPU `cpu`'s counters of peer `slot` (as the kernel would).
    pub fn add_peer_stats(&mut self, slot: u32, cpu: usize, add: impl FnOnce(&mut PeerStats)) {
        if let Some(stats) = self
            .engine
            .maps
            .peer_stats
            .get_mut(slot as usize)
            .and_then(|s| s.get_mut(cpu))
        {
            add(stats);
        }
    }

    /// Adds to CPU `cpu`'s decapsulation counters of sender `addr` (as the kernel would for
    /// a tunnel packet from an allowed sender). Returns false, like the kernel dropping the
    /// packet, if `addr` is not allowed.
    pub fn add_decap_stats(
        &mut self,
        addr: IpAddr,
        cpu: usize,
        add: impl FnOnce(&mut DecapStats),
    ) -> bool {
        match self
            .engine
            .maps
            .decap
            .get_mut(&addr_key(addr))
            .and_then(|s| s.get_mut(cpu))
        {
            Some(stats) => {
                add(stats);
                true
            }
            None => false,
        }
    }

    /// Adds to CPU `cpu`'s global counters (as the kernel would).
    pub fn add_global_stats(&mut self, cpu: usize, add: impl FnOnce(&mut GlobalStats)) {
        if let Some(stats) = self.engine.maps.global_stats.get_mut(cpu) {
            add(stats);
        }
    }
}

impl Dataplane for MemoryDataplane {
    fn config(&self) -> Result<ConfigSpec> {
        self.engine.config()
    }
    fn set_config(&mut self, config: &ConfigSpec) -> Result<()> {
        self.engine.set_config(config)
    }
    fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<u32> {
        self.engine.upsert_service(spec)
    }
    fn remove_service(&mut self, name: &str) -> Result<()> {
        self.engine.remove_service(name)
    }
    fn services(&self) -> Result<Vec<ServiceInfo>> {
        self.engine.services()
    }
    fn set_peer(&mut self, spec: &PeerSpec) -> Result<u32> {
        self.engine.set_peer(spec)
    }
    fn remove_peer(&mut self, name: &str) -> Result<()> {
        self.engine.remove_peer(name)
    }
    fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.engine.peers()
    }
    fn allow_decap(&mut self, addr: IpAddr) -> Result<bool> {
        self.engine.allow_decap(addr)
    }
    fn deny_decap(&mut self, addr: IpAddr) -> Result<bool> {
        self.engine.deny_decap(addr)
    }
    fn decap_allowed(&self) -> Result<Vec<IpAddr>> {
        self.engine.decap_allowed()
    }
    fn decap_stats(&self) -> Result<Vec<DecapCounters>> {
        self.engine.decap_stats()
    }
    fn stats(&self) -> Result<Stats> {
        self.engine.stats()
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use redirector_ebpf::{
        DECISION_LOCAL, DECISION_STEERED, DEFAULT_RING_SIZE, MAX_SERVICES, PEER_ACTIVE, PEER_NONE,
        SVC_ACTIVE, family, peer_bucket, proto, service_bucket,
    };

    use super::*;
    use crate::spec::{PeerServices, ServiceMode};

    fn plane() -> MemoryDataplane {
        MemoryDataplane::new(
            Some("192.0.2.1".parse().unwrap()),
            Some("2001:db8::1".parse().unwrap()),
        )
    }

    fn service(name: &str, addrs: &[&str]) -> ServiceSpec {
        let mut spec =
            ServiceSpec::new(name, addrs.iter().map(|a| a.parse().unwrap()).collect(), 50);
        spec.ring_size = 251;
        spec
    }

    fn peer(name: &str, addr: &str) -> PeerSpec {
        PeerSpec::new(name, addr.parse().unwrap())
    }

    fn flow(sport: u16, service: u32, decision: u8, peer: u32) -> (FlowKey, FlowValue) {
        (
            FlowKey {
                sport_be: sport.to_be(),
                dport_be: 80u16.to_be(),
                proto: proto::TCP,
                family: family::V4,
                ..FlowKey::default()
            },
            FlowValue {
                decision,
                service,
                peer,
                ..FlowValue::default()
            },
        )
    }

    #[test]
    fn ports_count_the_service_keys_using_them() {
        let mut dp = plane();
        let web = service("web", &["10.0.0.1:80", "[2001:db8::80]:80", "10.0.0.1:443"]);
        let id = dp.upsert_service(&web).unwrap();
        assert_eq!(
            (dp.port_refs(80), dp.port_refs(443), dp.port_refs(81)),
            (2, 1, 0)
        );
        dp.upsert_service(&service("api", &["10.0.0.2:80"]))
            .unwrap();
        assert_eq!(dp.port_refs(80), 3);

        // Update: drop the IPv6 address and port 443, add port 8080.
        let web2 = service("web", &["10.0.0.1:80", "10.0.0.1:8080"]);
        assert_eq!(dp.upsert_service(&web2).unwrap(), id, "same name, same id");
        assert_eq!(
            (dp.port_refs(80), dp.port_refs(443), dp.port_refs(8080)),
            (2, 0, 1)
        );
        dp.remove_service("web").unwrap();
        assert_eq!((dp.port_refs(80), dp.port_refs(8080)), (1, 0));
        dp.remove_service("api").unwrap();
        assert_eq!(dp.port_refs(80), 0);
        assert!(dp.services().unwrap().is_empty());
    }

    #[test]
    fn an_address_belongs_to_one_service() {
        let mut dp = plane();
        dp.upsert_service(&service("web", &["10.0.0.1:80"]))
            .unwrap();
        let err = dp
            .upsert_service(&service("other", &["10.0.0.2:80", "10.0.0.1:80"]))
            .unwrap_err();
        assert!(
            matches!(&err, Error::AddressInUse { service, .. } if service == "web"),
            "{err}"
        );
        assert_eq!(dp.port_refs(80), 1, "a refused service changes nothing");
        assert_eq!(dp.services().unwrap().len(), 1);
    }

    #[test]
    fn services_read_back_as_configured() {
        let mut dp = plane();
        let mut web = service("web", &["10.0.0.1:80", "[2001:db8::80]:80"]);
        web.mode = ServiceMode::Off;
        web.guard_rate = Some(20);
        let id = dp.upsert_service(&web).unwrap();
        dp.set_peer(&peer("p1", "192.0.2.10")).unwrap();
        let info = &dp.services().unwrap()[0];
        assert_eq!(info.id, id);
        assert_eq!(info.name, "web");
        assert_eq!(info.addrs.len(), 2);
        assert_eq!(info.mode, ServiceMode::Off);
        assert_eq!(info.guard_rate, Some(20));
        assert_eq!(info.peers, vec!["p1".to_owned()]);
        let conf = dp.service_conf(id).unwrap();
        assert_eq!(conf.flags, SVC_ACTIVE, "mode off");
    }

    #[test]
    fn rings_hold_the_serving_peers_by_weight() {
        let mut dp = plane();
        let id = dp
            .upsert_service(&service("web", &["10.0.0.1:80"]))
            .unwrap();
        assert!(dp.ring(id).unwrap().iter().all(|&s| s == PEER_NONE));
        let a = dp.set_peer(&peer("a", "192.0.2.10")).unwrap();
        let mut heavy = peer("b", "192.0.2.11");
        heavy.weight = 3;
        let b = dp.set_peer(&heavy).unwrap();
        let ring = dp.ring(id).unwrap();
        assert_eq!(ring.len(), 251);
        let count = |s: u32| ring.iter().filter(|&&v| v == s).count();
        assert_eq!(count(a) + count(b), 251, "every slot has a peer");
        assert!(
            (55..=70).contains(&count(a)),
            "a has about a quarter: {}",
            count(a)
        );
    }

    #[test]
    fn only_changed_ring_slots_are_written() {
        let mut dp = plane();
        let id = dp
            .upsert_service(&service("web", &["10.0.0.1:80"]))
            .unwrap();
        let after_create = dp.maglev_writes();
        assert_eq!(
            after_create, 251,
            "a new service writes its whole ring once"
        );
        dp.set_peer(&peer("a", "192.0.2.10")).unwrap();
        assert_eq!(
            dp.maglev_writes() - after_create,
            251,
            "PEER_NONE -> a everywhere"
        );
        let before = dp.ring(id).unwrap();
        let writes = dp.maglev_writes();
        dp.set_peer(&peer("b", "192.0.2.11")).unwrap();
        let after = dp.ring(id).unwrap();
        let changed = before.iter().zip(&after).filter(|(x, y)| x != y).count();
        assert_eq!(dp.maglev_writes() - writes, changed);
        assert!(
            changed < 251 && changed > 60,
            "b took about half: {changed}"
        );

        // Same weight and services: nothing to write.
        let writes = dp.maglev_writes();
        let mut moved = peer("b", "192.0.2.99");
        moved.mtu = 1400;
        dp.set_peer(&moved).unwrap();
        assert_eq!(dp.maglev_writes(), writes);
    }

    #[test]
    fn ring_size_changes_are_written_before_use() {
        let mut dp = plane();
        let mut web = service("web", &["10.0.0.1:80"]);
        let id = dp.upsert_service(&web).unwrap();
        let a = dp.set_peer(&peer("a", "192.0.2.10")).unwrap();
        web.ring_size = 13;
        dp.upsert_service(&web).unwrap();
        assert_eq!(dp.ring(id).unwrap(), vec![a; 13]);
        web.ring_size = DEFAULT_RING_SIZE;
        dp.upsert_service(&web).unwrap();
        let ring = dp.ring(id).unwrap();
        assert_eq!(ring.len(), DEFAULT_RING_SIZE as usize);
        assert!(
            ring.iter().all(|&s| s == a),
            "no zero (= slot 0) left in the ring"
        );
        web.ring_size = 100;
        assert!(dp.upsert_service(&web).is_err(), "not a prime");
    }

    #[test]
    fn peers_serve_named_services_only() {
        let mut dp = plane();
        let web = dp
            .upsert_service(&service("web", &["10.0.0.1:80"]))
            .unwrap();
        let api = dp
            .upsert_service(&service("api", &["10.0.0.2:80"]))
            .unwrap();
        let mut p = peer("p", "192.0.2.10");
        p.services = PeerServices::Only(vec!["api".into()]);
        let slot = dp.set_peer(&p).unwrap();
        assert!(dp.ring(web).unwrap().iter().all(|&s| s == PEER_NONE));
        assert!(dp.ring(api).unwrap().iter().all(|&s| s == slot));
        // Moving it to web leaves api's ring empty.
        p.services = PeerServices::Only(vec!["web".into()]);
        dp.set_peer(&p).unwrap();
        assert!(dp.ring(web).unwrap().iter().all(|&s| s == slot));
        assert!(dp.ring(api).unwrap().iter().all(|&s| s == PEER_NONE));
        p.services = PeerServices::Only(vec!["nope".into()]);
        assert!(matches!(
            dp.set_peer(&p),
            Err(Error::UnknownService { name }) if name == "nope"
        ));
        // Weight 0: configured, but in no ring.
        p.services = PeerServices::All;
        p.weight = 0;
        dp.set_peer(&p).unwrap();
        assert!(dp.ring(web).unwrap().iter().all(|&s| s == PEER_NONE));
        assert_eq!(dp.peers().unwrap()[0].weight, 0);
    }

    #[test]
    fn removing_a_service_clears_it_from_peers_and_flows() {
        let mut dp = plane();
        let web = dp
            .upsert_service(&service("web", &["10.0.0.1:80"]))
            .unwrap();
        let api = dp
            .upsert_service(&service("api", &["10.0.0.2:80"]))
            .unwrap();
        let mut p = peer("p", "192.0.2.10");
        p.services = PeerServices::Only(vec!["web".into(), "api".into()]);
        let slot = dp.set_peer(&p).unwrap();
        let (k1, v1) = flow(1, web, DECISION_LOCAL, 0);
        let (k2, v2) = flow(2, api, DECISION_STEERED, slot);
        dp.insert_flow(k1, v1);
        dp.insert_flow(k2, v2);
        dp.insert_guard(
            GuardKey {
                service: web,
                ..GuardKey::default()
            },
            Bucket { tat_ns: 5 },
        );
        dp.remove_service("web").unwrap();
        assert_eq!(dp.flows(), vec![(k2, v2)]);
        assert_eq!(dp.guard_len(), 0);
        assert_eq!(dp.peer_conf(slot).unwrap().services, 1u64 << api);
        assert_eq!(
            dp.peers().unwrap()[0].services,
            PeerServices::Only(vec!["api".into()])
        );
        assert!(matches!(
            dp.remove_service("web"),
            Err(Error::UnknownService { .. })
        ));
        // The id comes back clean: no counters, a full bucket.
        dp.add_service_stats(web, 1, |s| s.syn_local = 9);
        dp.set_bucket(service_bucket(web), Bucket { tat_ns: 77 });
        dp.remove_service("api").unwrap();
        let again = dp
            .upsert_service(&service("new", &["10.0.0.3:80"]))
            .unwrap();
        assert_eq!(again, web);
        assert_eq!(dp.bucket(service_bucket(again)), Some(Bucket::default()));
        assert_eq!(dp.stats().unwrap().service("new").unwrap().syn_local, 0);
    }

    #[test]
    fn peer_slots_get_new_generations_and_clean_state() {
        let mut dp = plane();
        let id = dp
            .upsert_service(&service("web", &["10.0.0.1:80"]))
            .unwrap();
        let slot = dp.set_peer(&peer("p", "192.0.2.10")).unwrap();
        let gen1 = dp.peer_conf(slot).unwrap().generation;
        assert_eq!(dp.peer_conf(slot).unwrap().flags, PEER_ACTIVE);
        // An update keeps the generation (established flows stay valid).
        let mut p = peer("p", "192.0.2.10");
        p.rate = Some(100);
        assert_eq!(dp.set_peer(&p).unwrap(), slot);
        assert_eq!(dp.peer_conf(slot).unwrap().generation, gen1);

        dp.add_peer_stats(slot, 0, |s| s.connections = 5);
        dp.set_bucket(peer_bucket(slot), Bucket { tat_ns: 123 });
        let (steered, sv) = flow(1, id, DECISION_STEERED, slot);
        let (other, ov) = flow(2, id, DECISION_STEERED, slot + 1);
        let (local, lv) = flow(3, id, DECISION_LOCAL, slot);
        dp.insert_flow(steered, sv);
        dp.insert_flow(other, ov);
        dp.insert_flow(local, lv);

        dp.remove_peer("p").unwrap();
        let conf = dp.peer_conf(slot).unwrap();
        assert_eq!(conf.flags & PEER_ACTIVE, 0);
        assert_eq!(conf.generation, gen1 + 1);
        assert_eq!(dp.bucket(peer_bucket(slot)), Some(Bucket::default()));
        assert!(dp.ring(id).unwrap().iter().all(|&s| s == PEER_NONE));
        let mut left: Vec<u16> = dp
            .flows()
            .iter()
            .map(|(k, _)| u16::from_be(k.sport_be))
            .collect();
        left.sort_unstable();
        assert_eq!(
            left,
            vec![2, 3],
            "only the removed peer's steered flow is gone"
        );
        assert!(dp.peers().unwrap().is_empty());
        assert!(matches!(
            dp.remove_peer("p"),
            Err(Error::UnknownPeer { .. })
        ));

        // A new peer in the slot: newer generation, zeroed counters.
        let again = dp.set_peer(&peer("q", "192.0.2.11")).unwrap();
        assert_eq!(again, slot);
        assert_eq!(dp.peer_conf(slot).unwrap().generation, gen1 + 2);
        assert_eq!(dp.stats().unwrap().peer("q").unwrap().connections, 0);
    }

    #[test]
    fn tunnel_sources_default_to_the_interface_address() {
        let mut dp = plane();
        dp.set_peer(&peer("v4", "192.0.2.10")).unwrap();
        dp.set_peer(&peer("v6", "2001:db8::10")).unwrap();
        let peers = dp.peers().unwrap();
        assert_eq!(peers[0].src, "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(peers[1].src, "2001:db8::1".parse::<IpAddr>().unwrap());

        let mut v4_only = MemoryDataplane::new(Some("192.0.2.1".parse().unwrap()), None);
        let err = v4_only.set_peer(&peer("v6", "2001:db8::10")).unwrap_err();
        assert!(
            matches!(err, Error::NoSourceAddress { family: 6, .. }),
            "{err}"
        );
        let mut explicit = peer("v6", "2001:db8::10");
        explicit.src = Some("2001:db8::2".parse().unwrap());
        v4_only.set_peer(&explicit).unwrap();
    }

    #[test]
    fn limits_are_reported() {
        let mut dp = plane();
        for i in 0..MAX_SERVICES {
            dp.upsert_service(&service(&format!("s{i}"), &[&format!("10.0.{i}.1:80")]))
                .unwrap();
        }
        let err = dp
            .upsert_service(&service("one-more", &["10.1.0.1:80"]))
            .unwrap_err();
        assert!(matches!(err, Error::Full { .. }), "{err}");
    }

    #[test]
    fn decap_allow_list() {
        let mut dp = plane();
        let a: IpAddr = "192.0.2.10".parse().unwrap();
        let b: IpAddr = "2001:db8::10".parse().unwrap();
        assert!(dp.allow_decap(a).unwrap());
        assert!(!dp.allow_decap(a).unwrap(), "already there");
        assert!(dp.allow_decap(b).unwrap());
        assert_eq!(dp.decap_allowed().unwrap(), vec![a, b]);
        assert!(dp.deny_decap(a).unwrap());
        assert!(!dp.deny_decap(a).unwrap());
        assert_eq!(dp.decap_allowed().unwrap(), vec![b]);
    }

    #[test]
    fn decap_counters_per_sender_follow_allow_and_deny() {
        let mut dp = plane();
        let a: IpAddr = "192.0.2.10".parse().unwrap();
        let b: IpAddr = "2001:db8::10".parse().unwrap();
        let stranger: IpAddr = "192.0.2.99".parse().unwrap();
        assert!(dp.decap_stats().unwrap().is_empty());
        dp.allow_decap(b).unwrap();
        dp.allow_decap(a).unwrap();
        let zero = |addr| DecapCounters {
            addr,
            packets: 0,
            bytes: 0,
        };
        assert_eq!(
            dp.decap_stats().unwrap(),
            vec![zero(a), zero(b)],
            "new senders start at zero, listed by address"
        );

        // Two CPUs' worth of traffic from a, one from b; nothing counted for a stranger.
        assert!(dp.add_decap_stats(a, 0, |s| {
            s.pkts += 3;
            s.bytes += 180;
        }));
        assert!(dp.add_decap_stats(a, 1, |s| {
            s.pkts += 1;
            s.bytes += 1500;
        }));
        assert!(dp.add_decap_stats(b, 1, |s| {
            s.pkts += 2;
            s.bytes += 160;
        }));
        assert!(!dp.add_decap_stats(stranger, 0, |s| s.pkts += 1));
        let counted = vec![
            DecapCounters {
                addr: a,
                packets: 4,
                bytes: 1680,
            },
            DecapCounters {
                addr: b,
                packets: 2,
                bytes: 160,
            },
        ];
        assert_eq!(dp.decap_stats().unwrap(), counted, "summed across CPUs");
        assert_eq!(dp.stats().unwrap().decap, counted, "stats carries them too");
        assert_eq!(dp.stats().unwrap().decap_from(a).unwrap().bytes, 1680);

        // Allowing again keeps the counters; denying drops them, and a sender allowed
        // again starts from zero.
        assert!(!dp.allow_decap(a).unwrap());
        assert_eq!(dp.decap_stats().unwrap(), counted);
        assert!(dp.deny_decap(a).unwrap());
        assert_eq!(dp.decap_stats().unwrap(), vec![counted[1].clone()]);
        assert!(dp.stats().unwrap().decap_from(a).is_none());
        assert!(dp.allow_decap(a).unwrap());
        assert_eq!(dp.decap_stats().unwrap()[0], zero(a));
        assert_eq!(dp.decap_allowed().unwrap(), vec![a, b]);
    }

    #[test]
    fn config_is_stored() {
        let mut dp = plane();
        assert_eq!(dp.config().unwrap(), ConfigSpec::default());
        let config = ConfigSpec {
            decap_v6: Some("2001:db8::50".parse().unwrap()),
            flow_ceiling: 1000,
            ..ConfigSpec::default()
        };
        dp.set_config(&config).unwrap();
        assert_eq!(dp.config().unwrap(), config);
    }

    #[test]
    fn stats_sum_cpus_per_service_and_peer() {
        let mut dp = plane();
        let id = dp
            .upsert_service(&service("web", &["10.0.0.1:80"]))
            .unwrap();
        let slot = dp.set_peer(&peer("p", "192.0.2.10")).unwrap();
        dp.add_service_stats(id, 0, |s| s.syn_local = 3);
        dp.add_service_stats(id, 1, |s| s.syn_local = 4);
        dp.add_peer_stats(slot, 1, |s| s.bytes = 1500);
        dp.add_global_stats(0, |g| g.decap_denied = 2);
        let stats = dp.stats().unwrap();
        assert_eq!(stats.service("web").unwrap().syn_local, 7);
        assert_eq!(stats.service("web").unwrap().id, id);
        assert_eq!(stats.peer("p").unwrap().bytes, 1500);
        assert_eq!(stats.global.decap_denied, 2);
    }
}
