//! BPF_PROG_TEST_RUN harness: loads the real XDP object (unpinned, unattached) inside a
//! throwaway network namespace, fills its maps directly with the shared `#[repr(C)]` types and
//! runs crafted packets through it. Used by `tests/testrun.rs` and the data-plane benchmark.
//!
//! The namespace gives `bpf_fib_lookup` something real to find: a veth pair with an IPv4 and
//! an IPv6 subnet, permanent neighbours for the "reachable" peer addresses, forwarding on.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use redirector_ebpf::{
    AddrKey, Bucket, CONFIG_DECAP_V4, CONFIG_DECAP_V6, Config, DEFAULT_GUE_PORT, DecapStats,
    FlowKey, FlowValue, GlobalStats, MAGLEV_STRIDE, PEER_ACTIVE, PROGRAM_NAME, PeerConf, PeerStats,
    SVC_ACTIVE, SVC_STEER, ServiceConf, ServiceKey, ServiceStats, family, gcra, map_names,
    peer_bucket, proto,
};

/// Addresses of the harness namespace.
pub mod addrs {
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// The edge's own address (outer source of tunnels), on `veth0`.
    pub const EDGE_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
    pub const EDGE_V6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);
    /// Peers with a permanent neighbour entry (FIB lookups succeed).
    pub const PEER_A_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
    pub const PEER_B_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
    pub const PEER_A_V6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 2);
    /// A peer on the subnet with no neighbour entry (FIB says "no neighbour").
    pub const PEER_UNRESOLVED_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 9);
    /// MAC of the permanent neighbours.
    pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
}

/// A throwaway network namespace with the harness topology; deleted on drop.
pub struct HarnessNs {
    name: String,
    /// ifindex of `veth0` (the interface towards the peers).
    pub veth0: u32,
    /// Our thread's original namespace, restored on drop.
    original: std::fs::File,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {args:?}"))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl HarnessNs {
    /// Creates the namespace and moves the calling thread into it (test-run uses the caller's
    /// namespace for its loopback device and FIB).
    pub fn enter() -> Result<Self> {
        let name = format!("p2ptr{}x{}", std::process::id(), unique());
        ip(&["netns", "add", &name])?;
        let ns = Self::setup(&name);
        match ns {
            Ok(ns) => Ok(ns),
            Err(e) => {
                let _ = ip(&["netns", "del", &name]);
                Err(e)
            }
        }
    }

    fn setup(name: &str) -> Result<Self> {
        let n = |rest: &[&str]| {
            let mut args = vec!["-n", name];
            args.extend_from_slice(rest);
            ip(&args)
        };
        n(&["link", "set", "lo", "up"])?;
        n(&[
            "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
        ])?;
        n(&["link", "set", "veth0", "up"])?;
        n(&["link", "set", "veth1", "up"])?;
        n(&["addr", "add", "10.99.0.1/24", "dev", "veth0"])?;
        n(&["addr", "add", "fd99::1/64", "dev", "veth0", "nodad"])?;
        let mac = "02:00:00:00:00:02";
        n(&[
            "neigh",
            "add",
            "10.99.0.2",
            "lladdr",
            mac,
            "dev",
            "veth0",
            "nud",
            "permanent",
        ])?;
        n(&[
            "neigh",
            "add",
            "10.99.0.3",
            "lladdr",
            mac,
            "dev",
            "veth0",
            "nud",
            "permanent",
        ])?;
        n(&[
            "-6",
            "neigh",
            "add",
            "fd99::2",
            "lladdr",
            mac,
            "dev",
            "veth0",
            "nud",
            "permanent",
        ])?;
        let original =
            std::fs::File::open("/proc/thread-self/ns/net").context("opening our netns")?;
        let target = std::fs::File::open(format!("/run/netns/{name}"))
            .with_context(|| format!("opening /run/netns/{name}"))?;
        // SAFETY: plain syscall on valid fds; affects only this thread.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns into {name}: {}", std::io::Error::last_os_error());
        }
        // bpf_fib_lookup refuses to answer for devices without forwarding.
        for key in [
            "net/ipv4/conf/all/forwarding",
            "net/ipv4/conf/lo/forwarding",
            "net/ipv4/conf/veth0/forwarding",
            "net/ipv6/conf/all/forwarding",
        ] {
            std::fs::write(format!("/proc/sys/{key}"), "1")
                .with_context(|| format!("enabling {key}"))?;
        }
        // Per-CPU state (counters, the flow-insert budget) must stay on one CPU across runs.
        // SAFETY: plain syscall with a valid, zero-initialised cpu_set_t.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
        let veth0 = ifindex("veth0")?;
        Ok(Self {
            name: name.to_owned(),
            veth0,
            original,
        })
    }
}

impl Drop for HarnessNs {
    fn drop(&mut self) {
        // SAFETY: plain syscall on a valid fd.
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("no interface {name}");
    }
    Ok(idx)
}

/// The result of one test run.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub action: u32,
    pub out: Vec<u8>,
    pub duration: Duration,
}

/// XDP return codes.
pub mod action {
    pub const ABORTED: u32 = 0;
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
    pub const REDIRECT: u32 = 4;
}

/// The loaded program and its maps.
pub struct Harness {
    ebpf: Ebpf,
    /// ctx_in for test runs: an `xdp_md` with `ingress_ifindex` set, or none (loopback).
    ingress: Option<u32>,
}

/// Builds a service key.
pub fn service_key(addr: IpAddr, port: u16) -> ServiceKey {
    let (addr, fam) = addr_bytes(addr);
    ServiceKey {
        addr,
        port_be: port.to_be(),
        proto: proto::TCP,
        family: fam,
    }
}

/// The `DECAP_ALLOW` key of a sender.
pub fn sender_key(sender: IpAddr) -> AddrKey {
    let (addr, family) = addr_bytes(sender);
    AddrKey {
        addr,
        family,
        _pad0: [0; 3],
    }
}

/// An address as stored in keys, with its family.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (out, family::V4)
        }
        IpAddr::V6(a) => (a.octets(), family::V6),
    }
}

/// A flow key for a client → service TCP flow.
pub fn flow_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> FlowKey {
    let (s, fam) = addr_bytes(src);
    let (d, _) = addr_bytes(dst);
    FlowKey {
        src: s,
        dst: d,
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto: proto::TCP,
        family: fam,
        _pad0: [0; 2],
    }
}

/// A service in steer mode with the given local admission.
pub fn steer_service(rate: u32, burst: u32, ring_size: u32) -> ServiceConf {
    let (li, lb) = gcra(rate, burst);
    ServiceConf {
        flags: SVC_ACTIVE | SVC_STEER,
        ring_size,
        local_interval_ns: li,
        local_burst_ns: lb,
        rate,
        burst,
        ..ServiceConf::default()
    }
}

/// A peer reached over `encap` at `addr` from the harness edge address of the same family.
pub fn peer(addr: IpAddr, encap: u8, rate: u32, burst: u32, generation: u32) -> PeerConf {
    let (a, fam) = addr_bytes(addr);
    let src = match addr {
        IpAddr::V4(_) => IpAddr::V4(addrs::EDGE_V4),
        IpAddr::V6(_) => IpAddr::V6(addrs::EDGE_V6),
    };
    let (interval_ns, burst_ns) = gcra(rate, burst);
    PeerConf {
        flags: PEER_ACTIVE,
        generation,
        encap,
        family: fam,
        gue_port_be: DEFAULT_GUE_PORT.to_be(),
        mtu: 1500,
        addr: a,
        src: addr_bytes(src).0,
        interval_ns,
        burst_ns,
        rate,
        burst,
        weight: 1,
        ..PeerConf::default()
    }
}

impl Harness {
    /// Loads the program from the object built by `redirector-user/build.rs`.
    pub fn load(flow_capacity: u32) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::FLOWS, flow_capacity)
            .load(redirector_user::PROGRAM_OBJECT)
            .context("loading the XDP object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("no program {PROGRAM_NAME}"))?
            .try_into()?;
        prog.load().context("verifier rejected the program")?;
        Ok(Self {
            ebpf,
            ingress: None,
        })
    }

    /// Runs test packets as if received on `ifindex` (default: loopback).
    pub fn set_ingress(&mut self, ifindex: Option<u32>) {
        self.ingress = ifindex;
    }

    fn prog(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("no program"))?
            .try_into()?)
    }

    /// Runs `pkt` once; returns the action and the output bytes.
    pub fn run(&mut self, pkt: &[u8]) -> Result<RunResult> {
        let mut out = vec![0u8; pkt.len() + 256];
        let ctx = self.ctx_in(pkt.len());
        let prog = self.prog()?;
        let r = prog.test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: ctx.as_deref(),
            ..TestRunOptions::new()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok(RunResult {
            action: r.return_value,
            out,
            duration: r.duration,
        })
    }

    /// Runs `pkt` `repeat` times in one kernel call (only for paths that do not rewrite the
    /// packet): returns the action and the kernel's mean duration per iteration.
    pub fn run_repeat(&mut self, pkt: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let mut out = vec![0u8; pkt.len() + 256];
        let ctx = self.ctx_in(pkt.len());
        let prog = self.prog()?;
        let r = prog.test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: ctx.as_deref(),
            repeat,
            ..TestRunOptions::new()
        })?;
        Ok((r.return_value, r.duration))
    }

    fn ctx_in(&self, len: usize) -> Option<Vec<u8>> {
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex } (6 × u32); the kernel wants data_end == the packet size
        // (net/bpf/test_run.c, bpf_prog_test_run_xdp).
        self.ingress.map(|idx| {
            let mut md = vec![0u8; 24];
            md[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
            md[12..16].copy_from_slice(&idx.to_ne_bytes());
            md
        })
    }

    pub fn set_config(&mut self, cfg: Config) -> Result<()> {
        let mut m: Array<_, Config> = Array::try_from(self.map(map_names::CONFIG)?)?;
        m.set(0, cfg, 0)?;
        Ok(())
    }

    /// Accept tunnels to the harness edge addresses (peer role).
    pub fn enable_decap(&mut self, gue_port: u16) -> Result<()> {
        let mut cfg = Config {
            flags: CONFIG_DECAP_V4 | CONFIG_DECAP_V6,
            gue_port_be: gue_port.to_be(),
            ..Config::default()
        };
        cfg.decap_v4 = addrs::EDGE_V4.octets();
        cfg.decap_v6 = addrs::EDGE_V6.octets();
        self.set_config(cfg)
    }

    /// Puts `sender` on the allow-list with zeroed counters.
    pub fn allow_decap(&mut self, sender: IpAddr) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(path, e)| anyhow!("{path}: {e}"))?;
        let zero = PerCpuValues::try_from(vec![DecapStats::default(); cpus])?;
        let mut m: PerCpuHashMap<_, AddrKey, DecapStats> =
            PerCpuHashMap::try_from(self.map(map_names::DECAP_ALLOW)?)?;
        m.insert(sender_key(sender), zero, 0)?;
        Ok(())
    }

    /// Takes `sender` off the allow-list (its counters go with it).
    pub fn deny_decap(&mut self, sender: IpAddr) -> Result<()> {
        let mut m: PerCpuHashMap<_, AddrKey, DecapStats> =
            PerCpuHashMap::try_from(self.map(map_names::DECAP_ALLOW)?)?;
        m.remove(&sender_key(sender))?;
        Ok(())
    }

    /// What was decapsulated from `sender`, summed across CPUs; `None` if it is not allowed.
    pub fn decap_stats(&self, sender: IpAddr) -> Result<Option<DecapStats>> {
        let m: PerCpuHashMap<_, AddrKey, DecapStats> =
            PerCpuHashMap::try_from(self.map_ref(map_names::DECAP_ALLOW)?)?;
        match m.get(&sender_key(sender), 0) {
            Ok(per_cpu) => {
                let mut t = DecapStats::default();
                for s in per_cpu.iter() {
                    t.pkts += s.pkts;
                    t.bytes += s.bytes;
                }
                Ok(Some(t))
            }
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Installs service `id` listening on `keys`, keeping the port pre-filter in step.
    pub fn add_service(&mut self, id: u32, keys: &[ServiceKey], conf: ServiceConf) -> Result<()> {
        {
            let mut m: Array<_, ServiceConf> = Array::try_from(self.map(map_names::SVC_CONF)?)?;
            m.set(id, conf, 0)?;
        }
        for key in keys {
            let mut m: HashMap<_, ServiceKey, u32> =
                HashMap::try_from(self.map(map_names::SERVICES)?)?;
            m.insert(key, id, 0)?;
            let mut ports: Array<_, u32> = Array::try_from(self.map(map_names::PORTS)?)?;
            let port = u16::from_be(key.port_be) as u32;
            let n = ports.get(&port, 0)?;
            ports.set(port, n + 1, 0)?;
        }
        Ok(())
    }

    pub fn set_service_conf(&mut self, id: u32, conf: ServiceConf) -> Result<()> {
        let mut m: Array<_, ServiceConf> = Array::try_from(self.map(map_names::SVC_CONF)?)?;
        m.set(id, conf, 0)?;
        Ok(())
    }

    pub fn set_peer(&mut self, slot: u32, conf: PeerConf) -> Result<()> {
        {
            let mut m: Array<_, PeerConf> = Array::try_from(self.map(map_names::PEERS)?)?;
            m.set(slot, conf, 0)?;
        }
        let mut b: Array<_, Bucket> = Array::try_from(self.map(map_names::BUCKETS)?)?;
        b.set(peer_bucket(slot), Bucket::default(), 0)?;
        Ok(())
    }

    /// Writes service `id`'s ring: slot `i` gets `peers[i % peers.len()]` (or "no peer").
    pub fn fill_ring(&mut self, id: u32, ring_size: u32, peers: &[u32]) -> Result<()> {
        let mut m: Array<_, u32> = Array::try_from(self.map(map_names::MAGLEV)?)?;
        for i in 0..ring_size {
            let v = if peers.is_empty() {
                redirector_ebpf::PEER_NONE
            } else {
                peers[i as usize % peers.len()]
            };
            m.set(id * MAGLEV_STRIDE + i, v, 0)?;
        }
        Ok(())
    }

    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
        let m: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(self.map_ref(map_names::FLOWS)?)?;
        match m.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn flow_count(&self) -> Result<usize> {
        let m: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(self.map_ref(map_names::FLOWS)?)?;
        Ok(m.keys().count())
    }

    pub fn clear_flows(&mut self) -> Result<()> {
        let mut m: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(self.map(map_names::FLOWS)?)?;
        let keys: Vec<FlowKey> = m.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            m.remove(&k)?;
        }
        Ok(())
    }

    pub fn service_stats(&self, id: u32) -> Result<ServiceStats> {
        let m: PerCpuArray<_, ServiceStats> =
            PerCpuArray::try_from(self.map_ref(map_names::SVC_STATS)?)?;
        let mut t = ServiceStats::default();
        for s in m.get(&id, 0)?.iter() {
            t.syn_local += s.syn_local;
            t.syn_steered += s.syn_steered;
            t.kept_local += s.kept_local;
            t.pkts_local += s.pkts_local;
            t.bytes_local += s.bytes_local;
            t.pkts_steered += s.pkts_steered;
            t.bytes_steered += s.bytes_steered;
            t.flow_misses += s.flow_misses;
            t.guard_drops += s.guard_drops;
            t.ceiling_hits += s.ceiling_hits;
        }
        Ok(t)
    }

    pub fn peer_stats(&self, slot: u32) -> Result<PeerStats> {
        let m: PerCpuArray<_, PeerStats> =
            PerCpuArray::try_from(self.map_ref(map_names::PEER_STATS)?)?;
        let mut t = PeerStats::default();
        for s in m.get(&slot, 0)?.iter() {
            t.connections += s.connections;
            t.packets += s.packets;
            t.bytes += s.bytes;
            t.no_token += s.no_token;
        }
        Ok(t)
    }

    pub fn global_stats(&self) -> Result<GlobalStats> {
        let m: PerCpuArray<_, GlobalStats> =
            PerCpuArray::try_from(self.map_ref(map_names::GLOBAL_STATS)?)?;
        let mut t = GlobalStats::default();
        for s in m.get(&0, 0)?.iter() {
            t.unparsed += s.unparsed;
            t.decap_pkts += s.decap_pkts;
            t.decap_bytes += s.decap_bytes;
            t.decap_denied += s.decap_denied;
            t.fib_no_neigh += s.fib_no_neigh;
            t.fib_failed += s.fib_failed;
            t.encap_failed += s.encap_failed;
            t.stale_peer += s.stale_peer;
        }
        Ok(t)
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("no map {name}"))
    }

    fn map_ref(&self, name: &str) -> Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or_else(|| anyhow!("no map {name}"))
    }
}

/// The client and service addresses used by fixtures.
pub mod fixture_addrs {
    use std::net::{Ipv4Addr, Ipv6Addr};
    pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
    pub const SERVICE_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7);
    pub const SERVICE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 10);
}

/// Convenience: `IpAddr` of an `Ipv4Addr`/`Ipv6Addr`.
pub fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}
pub fn v6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}
