//! Types shared by the XDP program (`src/main.rs`) and userspace (`redirector-user`).
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, has explicit padding fields and a
//! compile-time size check: the kernel compares raw bytes, so implicit padding (or a Rust
//! `bool`/`Option`/enum) would make two "equal" keys differ. Flags are integers with named
//! constants for the same reason.
//!
//! Conventions:
//! - Addresses are `[u8; 16]` in network byte order. IPv4 addresses fill bytes `0..4` and the
//!   rest is zero; `family` says which one it is.
//! - Fields ending in `_be` are in network byte order (as they appear on the wire).
//! - Rates are turned into GCRA parameters (`interval_ns`, `burst_ns`) by userspace, so the
//!   kernel never divides.
#![no_std]

/// Version of the map layouts below. Bump it on any change to a map's name, type, key or
/// value; userspace refuses to reuse pinned maps of another version.
///
/// History: 2 added `FlowValue::hash` and `PeerStats::next_hop`; 3 made `DECAP_ALLOW` a
/// per-CPU hash whose values are the per-sender counters (`DecapStats`, was a `u32`).
pub const SCHEMA_VERSION: u32 = 3;

/// Highest number of services (ids `0..MAX_SERVICES`).
pub const MAX_SERVICES: u32 = 64;
/// Highest number of peers (slots `0..MAX_PEERS`).
pub const MAX_PEERS: u32 = 256;
/// Each service owns `MAGLEV_STRIDE` consecutive slots of the `MAGLEV` array; its ring uses
/// the first `ring_size` of them (a prime no larger than this).
pub const MAGLEV_STRIDE: u32 = 65_537;
/// Default Maglev ring size (prime).
pub const DEFAULT_RING_SIZE: u32 = 65_537;
/// Maglev slot value meaning "no peer".
pub const PEER_NONE: u32 = u32::MAX;
/// How many consecutive Maglev slots the kernel tries when the chosen peer has no token.
pub const PEER_TRIES: u32 = 4;
/// Default size of the flow table (LRU).
pub const DEFAULT_FLOW_CAPACITY: u32 = 262_144;
/// Default size of the per-source flood-guard table (LRU).
pub const DEFAULT_GUARD_CAPACITY: u32 = 65_536;
/// Default UDP destination port of GUE tunnels (the port of Linux's `ip fou` examples).
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// Size of the decapsulation allow-list (senders, each with its per-CPU counters).
pub const DECAP_ALLOW_CAPACITY: u32 = 4096;
/// Size of the services hash map (several keys may name one service id).
pub const SERVICE_KEYS_CAPACITY: u32 = 1024;

/// Address families as stored in keys.
pub mod family {
    pub const V4: u8 = 4;
    pub const V6: u8 = 6;
}

/// IP protocol numbers used in keys and packets.
pub mod proto {
    pub const IPIP: u8 = 4;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const IPV6: u8 = 41;
}

/// Names of the maps in the object file (and of their pins under
/// `/sys/fs/bpf/p2pcdn/<iface>/`). Kernel object names are limited to 15 bytes.
pub mod map_names {
    pub const META: &str = "META";
    pub const CONFIG: &str = "CONFIG";
    pub const SERVICES: &str = "SERVICES";
    pub const SVC_CONF: &str = "SVC_CONF";
    pub const PORTS: &str = "PORTS";
    pub const PEERS: &str = "PEERS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const FLOWS: &str = "FLOWS";
    pub const BUCKETS: &str = "BUCKETS";
    pub const GUARD: &str = "GUARD";
    pub const DECAP_ALLOW: &str = "DECAP_ALLOW";
    pub const SVC_STATS: &str = "SVC_STATS";
    pub const PEER_STATS: &str = "PEER_STATS";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const FLOW_BUDGET: &str = "FLOW_BUDGET";
    /// Per-CPU scratch of the kernel program (FIB lookup parameters). Not pinned, not part of
    /// `ALL`: its contents mean nothing between packets.
    pub const FIB_SCRATCH: &str = "FIB_SCRATCH";
    /// Every map that holds state, in a fixed order (used to pin, check and remove them).
    pub const ALL: [&str; 15] = [
        META,
        CONFIG,
        SERVICES,
        SVC_CONF,
        PORTS,
        PEERS,
        MAGLEV,
        FLOWS,
        BUCKETS,
        GUARD,
        DECAP_ALLOW,
        SVC_STATS,
        PEER_STATS,
        GLOBAL_STATS,
        FLOW_BUDGET,
    ];
}

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "p2pcdn_redirect";

/// `META[0]`: written by userspace when it creates the maps; the kernel never reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub schema_version: u32,
    pub max_services: u32,
    pub max_peers: u32,
    pub maglev_stride: u32,
}
const _: () = assert!(core::mem::size_of::<Meta>() == 16);

/// `CONFIG[0]` flag: accept GUE/IPIP tunnels to `decap_v4` (peer role).
pub const CONFIG_DECAP_V4: u32 = 1 << 0;
/// `CONFIG[0]` flag: accept GUE/IP6IP6 tunnels to `decap_v6` (peer role).
pub const CONFIG_DECAP_V6: u32 = 1 << 1;

/// `CONFIG[0]`: node-wide settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `CONFIG_*` flags.
    pub flags: u32,
    /// New flow-table entries allowed per CPU per second (0 = no ceiling). Above it SYNs are
    /// served locally without an entry, so a SYN flood cannot evict established flows.
    pub flow_ceiling: u32,
    /// UDP port on which this node accepts GUE (network byte order).
    pub gue_port_be: u16,
    pub _pad0: [u8; 2],
    /// Local IPv4 decapsulation address (bytes 0..4).
    pub decap_v4: [u8; 4],
    /// Local IPv6 decapsulation address.
    pub decap_v6: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Config>() == 32);

/// Key of `SERVICES`: one (address, port, protocol) on which a service listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// `ServiceConf::flags`: the slot holds a service.
pub const SVC_ACTIVE: u32 = 1 << 0;
/// `ServiceConf::flags`: steer overflow to peers (mode `steer`); without it, mode `off`
/// (everything is served locally, nothing is tracked).
pub const SVC_STEER: u32 = 1 << 1;

/// `SVC_CONF[id]`: configuration of service `id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceConf {
    /// `SVC_*` flags.
    pub flags: u32,
    /// Size of this service's Maglev ring (prime, ≤ `MAGLEV_STRIDE`).
    pub ring_size: u32,
    /// Local admission bucket (GCRA): one new connection per `local_interval_ns`, with up to
    /// `local_burst_ns / local_interval_ns` at once.
    pub local_interval_ns: u64,
    pub local_burst_ns: u64,
    /// Per-source flood guard (GCRA, per IPv4 /32 or IPv6 /64); `guard_interval_ns == 0`
    /// disables it.
    pub guard_interval_ns: u64,
    pub guard_burst_ns: u64,
    /// The operator's figures the GCRA values came from (for display only).
    pub rate: u32,
    pub burst: u32,
    pub guard_rate: u32,
    pub guard_burst: u32,
    /// Service name, NUL padded (display only).
    pub name: [u8; 32],
}
const _: () = assert!(core::mem::size_of::<ServiceConf>() == 88);

impl Default for ServiceConf {
    fn default() -> Self {
        Self {
            flags: 0,
            ring_size: DEFAULT_RING_SIZE,
            local_interval_ns: 0,
            local_burst_ns: 0,
            guard_interval_ns: 0,
            guard_burst_ns: 0,
            rate: 0,
            burst: 0,
            guard_rate: 0,
            guard_burst: 0,
            name: [0; 32],
        }
    }
}

/// `PeerConf::flags`: the slot holds a peer that may receive new flows.
pub const PEER_ACTIVE: u32 = 1 << 0;

/// `PeerConf::encap`: GUE variant 1 (the inner IP packet right after a UDP header).
pub const ENCAP_GUE: u8 = 1;
/// `PeerConf::encap`: plain IP-in-IP (IPIP, 6in4, 4in6 or IP6IP6 by families).
pub const ENCAP_IPIP: u8 = 2;

/// `PEERS[slot]`: a peer server that takes steered connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerConf {
    /// `PEER_*` flags.
    pub flags: u32,
    /// Bumped each time the slot gets a new peer (or the peer is removed): flow entries
    /// remember it, so flows of a removed peer never reach the slot's next occupant.
    pub generation: u32,
    /// `ENCAP_*`.
    pub encap: u8,
    /// Family of `addr` and `src` (the outer header).
    pub family: u8,
    /// GUE destination port at the peer (network byte order).
    pub gue_port_be: u16,
    /// MTU of the path to the peer; SYN MSS options are clamped so encapsulated packets fit.
    pub mtu: u16,
    pub _pad0: [u8; 2],
    /// The peer's decapsulation address (outer destination).
    pub addr: [u8; 16],
    /// This edge's address towards the peer (outer source).
    pub src: [u8; 16],
    /// Negotiated new-connection rate (GCRA, like `ServiceConf`).
    pub interval_ns: u64,
    pub burst_ns: u64,
    pub rate: u32,
    pub burst: u32,
    /// Maglev weight (userspace only).
    pub weight: u32,
    pub _pad1: [u8; 4],
    /// Bit `i` set: the peer serves service `i` (userspace only).
    pub services: u64,
    /// Peer name, NUL padded (userspace only).
    pub name: [u8; 32],
}
const _: () = assert!(core::mem::size_of::<PeerConf>() == 120);

impl Default for PeerConf {
    fn default() -> Self {
        Self {
            flags: 0,
            generation: 0,
            encap: ENCAP_GUE,
            family: family::V4,
            gue_port_be: DEFAULT_GUE_PORT.to_be(),
            mtu: 1500,
            _pad0: [0; 2],
            addr: [0; 16],
            src: [0; 16],
            interval_ns: 0,
            burst_ns: 0,
            rate: 0,
            burst: 0,
            weight: 0,
            _pad1: [0; 4],
            services: 0,
            name: [0; 32],
        }
    }
}

/// Key of `FLOWS`: a TCP 5-tuple as seen at the edge (client → service).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad0: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// `FlowValue::decision`: served by this host.
pub const DECISION_LOCAL: u8 = 1;
/// `FlowValue::decision`: tunnelled to `FlowValue::peer`.
pub const DECISION_STEERED: u8 = 2;

/// `FlowValue::flags`: a packet other than a SYN followed the decision, so the client's
/// connection was established. A later SYN for the same 5-tuple is then a new connection on a
/// reused port (decided afresh), not a retransmission of the first SYN (which follows it).
pub const FLOW_ESTABLISHED: u8 = 1;

/// Value of `FLOWS`: the first decision for a flow, which its later packets follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `DECISION_*`.
    pub decision: u8,
    /// `FLOW_*` bits.
    pub flags: u8,
    pub _pad1: u16,
    /// Service id (for counters).
    pub service: u32,
    /// Peer slot (for `DECISION_STEERED`).
    pub peer: u32,
    /// `PeerConf::generation` of the slot when the flow was placed.
    pub peer_generation: u32,
    /// `flow_hash` of the key (for `DECISION_STEERED`; 0 otherwise): later packets take the
    /// GUE source port and IPv6 flow label from it instead of hashing the key again.
    pub hash: u32,
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 20);

/// Value of `BUCKETS` and `GUARD`: GCRA state (theoretical arrival time, in
/// `bpf_ktime_get_ns` time). Updated with compare-and-swap, so one bucket is exact across CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub tat_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Bucket>() == 8);

/// Number of entries of `BUCKETS`: services first, then peers.
pub const BUCKETS_LEN: u32 = MAX_SERVICES + MAX_PEERS;

/// Index of a service's local admission bucket in `BUCKETS`.
#[inline(always)]
pub const fn service_bucket(service: u32) -> u32 {
    service
}

/// Index of a peer's admission bucket in `BUCKETS`.
#[inline(always)]
pub const fn peer_bucket(peer: u32) -> u32 {
    MAX_SERVICES + peer
}

/// Key of `GUARD`: a source prefix (IPv4 /32 or IPv6 /64, the rest zeroed) per service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GuardKey {
    pub prefix: [u8; 16],
    pub service: u32,
}
const _: () = assert!(core::mem::size_of::<GuardKey>() == 20);

/// Key of `DECAP_ALLOW`: a sender allowed to tunnel to this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad0: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);

/// Value of `DECAP_ALLOW` (a per-CPU hash keyed by the sender's `AddrKey`): being in the map
/// allows the sender to tunnel to this node, and the value counts what was decapsulated from
/// it on this CPU (the peer side of accounting). The lookup that checks the allow-list returns
/// the counters to increment, so counting costs no second lookup.
///
/// `bytes` is the length of the inner IP packet (header and payload, as the outer header
/// carries it: outer length minus the outer IP and UDP headers), the same measure as the
/// primary's `PeerStats::bytes` for the same packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapStats {
    pub pkts: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<DecapStats>() == 16);

/// `SVC_STATS[id]` (per CPU): what happened to service `id`'s packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// SYNs admitted by the local bucket.
    pub syn_local: u64,
    /// SYNs steered to a peer.
    pub syn_steered: u64,
    /// Overflow SYNs kept local because no peer had room (or none is configured).
    pub kept_local: u64,
    pub pkts_local: u64,
    pub bytes_local: u64,
    pub pkts_steered: u64,
    pub bytes_steered: u64,
    /// Non-SYN packets with no flow entry (served locally).
    pub flow_misses: u64,
    /// SYNs dropped by the per-source flood guard.
    pub guard_drops: u64,
    /// SYNs served locally without a flow entry because the per-CPU new-flow ceiling was hit.
    pub ceiling_hits: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceStats>() == 80);

/// `PEER_STATS[slot]` (per CPU): traffic steered to a peer (the primary side of accounting).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// New connections (SYNs) steered to the peer.
    pub connections: u64,
    /// Packets and bytes (of the inner packets, as received from clients) sent to the peer.
    pub packets: u64,
    pub bytes: u64,
    /// Times the peer was picked by Maglev but had no token.
    pub no_token: u64,
    /// The kernel's next-hop cache towards the peer, kept here so that one per-CPU lookup per
    /// steered packet serves both the cache and the counters. Userspace ignores it when
    /// summing; zeroing it (a stats reset) only makes the next packet look the route up again.
    pub next_hop: NextHop,
}
const _: () = assert!(core::mem::size_of::<PeerStats>() == 64);

/// A cached `bpf_fib_lookup` result (see `PeerStats::next_hop`), written and read only by the
/// kernel on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// `bpf_jiffies64` when the entry was filled.
    pub stamp: u64,
    /// `PeerConf::generation` it was filled for.
    pub generation: u32,
    /// Output interface.
    pub ifindex: u32,
    /// MACs as 16-bit words in wire order, copied with word stores (6-byte array copies
    /// become calls to `memmove` on BPF).
    pub dmac: [u16; 3],
    pub smac: [u16; 3],
    /// Non-zero when the entry holds a lookup result.
    pub valid: u32,
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 32);

/// `GLOBAL_STATS[0]` (per CPU): events that belong to no service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalStats {
    /// Truncated or odd packets, non-first fragments, bad header lengths (passed untouched).
    pub unparsed: u64,
    /// Tunnel packets decapsulated and passed to the stack.
    pub decap_pkts: u64,
    pub decap_bytes: u64,
    /// Tunnel packets from senders not on the allow-list (dropped).
    pub decap_denied: u64,
    /// Packets for a peer whose next hop had no neighbour entry: a new connection is served
    /// locally, a packet of an established steered flow is dropped (TCP retransmits).
    pub fib_no_neigh: u64,
    /// Like `fib_no_neigh`, for no usable route, or a packet too big for the peer's path MTU
    /// once encapsulated.
    pub fib_failed: u64,
    /// Packets dropped because growing them for the outer headers failed.
    pub encap_failed: u64,
    /// Steered packets whose flow pointed at a removed peer (served locally).
    pub stale_peer: u64,
}
const _: () = assert!(core::mem::size_of::<GlobalStats>() == 64);

/// `FLOW_BUDGET[0]` (per CPU): new flow-table entries in the current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBudget {
    pub window_start_ns: u64,
    pub inserted: u64,
}
const _: () = assert!(core::mem::size_of::<FlowBudget>() == 16);

/// Hash of a flow key, used for the Maglev slot and the GUE source port. Userspace computes
/// the same value (tests, tools). A 64-bit multiply-xorshift over the key's ten 32-bit words,
/// finished with the murmur3 `fmix64` avalanche so every key bit affects every output bit.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    h = mix(h, &key.src);
    h = mix(h, &key.dst);
    let tail = (key.sport_be as u64)
        | ((key.dport_be as u64) << 16)
        | ((key.proto as u64) << 32)
        | ((key.family as u64) << 40);
    h = (h ^ tail).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h as u32
}

#[inline(always)]
fn mix(mut h: u64, bytes: &[u8; 16]) -> u64 {
    let lo = u64::from_ne_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ]);
    let hi = u64::from_ne_bytes([
        bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15],
    ]);
    h = (h ^ lo).wrapping_mul(0x0000_0100_0000_01b3) ^ (h >> 29);
    h = (h ^ hi).wrapping_mul(0x0000_0100_0000_01b3) ^ (h >> 29);
    h
}

/// Maglev slot for a flow hash in a ring of `ring_size` slots (Lemire's multiply-shift
/// range reduction: no division on the packet path).
#[inline(always)]
pub const fn maglev_slot(hash: u32, ring_size: u32) -> u32 {
    (((hash as u64) * (ring_size as u64)) >> 32) as u32
}

/// GUE source port for a flow hash: in the dynamic range, so receivers that spread UDP by
/// port (RSS) spread tunnelled flows too.
#[inline(always)]
pub const fn gue_source_port(hash: u32) -> u16 {
    0xc000 | ((hash >> 18) as u16 & 0x3fff)
}

/// GCRA parameters for a rate of `rate` new connections per second with bursts of `burst`:
/// `(interval_ns, burst_ns)`. A rate of 0 admits nothing (`burst_ns == 0`).
pub const fn gcra(rate: u32, burst: u32) -> (u64, u64) {
    if rate == 0 {
        return (1, 0);
    }
    let interval = 1_000_000_000u64 / rate as u64;
    let interval = if interval == 0 { 1 } else { interval };
    let burst = if burst == 0 { 1 } else { burst };
    (interval, interval * burst as u64)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls): `#[repr(C)]`, only integer fields and arrays of integers, explicit
    // padding fields and a size check above, so every bit pattern is valid.
    unsafe impl aya::Pod for super::Meta {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceConf {}
    unsafe impl aya::Pod for super::PeerConf {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::Bucket {}
    unsafe impl aya::Pod for super::GuardKey {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::DecapStats {}
    unsafe impl aya::Pod for super::ServiceStats {}
    unsafe impl aya::Pod for super::PeerStats {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::GlobalStats {}
    unsafe impl aya::Pod for super::FlowBudget {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_admits_the_burst_then_the_rate() {
        assert_eq!(gcra(50, 10), (20_000_000, 200_000_000));
        assert_eq!(gcra(0, 10).1, 0, "rate 0 admits nothing");
        assert_eq!(gcra(2_000_000_000, 1), (1, 1), "interval never rounds to 0");
    }

    #[test]
    fn maglev_slot_stays_in_the_ring() {
        for h in [0u32, 1, 0x8000_0000, u32::MAX] {
            assert!(maglev_slot(h, 65_537) < 65_537);
            assert!(maglev_slot(h, 7) < 7);
        }
    }

    #[test]
    fn flow_hash_spreads_neighbouring_ports() {
        let mut key = FlowKey {
            family: family::V4,
            proto: proto::TCP,
            ..FlowKey::default()
        };
        let mut buckets = [0u32; 16];
        for port in 0..16_000u16 {
            key.sport_be = port.to_be();
            buckets[(flow_hash(&key) >> 28) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "uneven: {buckets:?}");
        }
    }
}
