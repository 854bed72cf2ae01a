//! The XDP program: admission, overflow steering over GUE/IPIP, decapsulation on peers,
//! SYN-flood guard. docs/dataplane.md describes the decisions and counters; the maps and
//! their types are in `lib.rs`.
//!
//! Every packet read goes through `ptr_at`, the one bounds check the verifier needs to see.
//! Anything the parser does not understand is passed to the normal stack untouched.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys are passed by reference on purpose: by value they would be copied onto \
              the 512-byte BPF stack"
)]

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    mem,
};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
        xdp_action, xdp_md,
    },
    helpers::generated::{
        bpf_fib_lookup, bpf_jiffies64, bpf_ktime_get_ns, bpf_redirect, bpf_xdp_adjust_head,
        bpf_xdp_load_bytes,
    },
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::XdpContext,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use redirector_ebpf::{
    AddrKey, BUCKETS_LEN, Bucket, CONFIG_DECAP_V4, CONFIG_DECAP_V6, Config, DECAP_ALLOW_CAPACITY,
    DECISION_LOCAL, DECISION_STEERED, DEFAULT_FLOW_CAPACITY, DEFAULT_GUARD_CAPACITY, DecapStats,
    ENCAP_GUE, FLOW_ESTABLISHED, FlowBudget, FlowKey, FlowValue, GlobalStats, GuardKey,
    MAGLEV_STRIDE, MAX_PEERS, MAX_SERVICES, Meta, NextHop, PEER_ACTIVE, PEER_NONE, PEER_TRIES,
    PeerConf, PeerStats, SERVICE_KEYS_CAPACITY, SVC_ACTIVE, SVC_STEER, ServiceConf, ServiceKey,
    ServiceStats, family, flow_hash, gue_source_port, maglev_slot, peer_bucket, proto,
    service_bucket,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_LEN: usize = 4;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// IPv6 next header "fragment".
const IPV6_FRAG: u8 = 44;
const TCP_OPT_END: u8 = 0;
const TCP_OPT_NOP: u8 = 1;
const TCP_OPT_MSS: u8 = 2;
/// TCP options are at most 40 bytes.
const TCP_MAX_OPTS: usize = 40;
/// Offset of the checksum in the TCP header.
const TCP_CHECK_OFFSET: usize = 16;
/// Largest transport offset after encapsulation: Ethernet + VLAN + outer IPv6 + UDP + IPv4
/// with 40 bytes of options.
const MAX_L4_OFFSET: usize = 18 + 48 + 60;
const OUTER_TTL: u8 = 64;
const IPV4_DF: u16 = 0x4000;
const ONE_SECOND_NS: u64 = 1_000_000_000;

#[map]
static META: Array<Meta> = Array::with_max_entries(1, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static SERVICES: HashMap<ServiceKey, u32> = HashMap::with_max_entries(SERVICE_KEYS_CAPACITY, 0);
#[map]
static SVC_CONF: Array<ServiceConf> = Array::with_max_entries(MAX_SERVICES, 0);
#[map]
static PORTS: Array<u32> = Array::with_max_entries(65_536, 0);
#[map]
static PEERS: Array<PeerConf> = Array::with_max_entries(MAX_PEERS, 0);
#[map]
static MAGLEV: Array<u32> = Array::with_max_entries(MAX_SERVICES * MAGLEV_STRIDE, 0);
#[map]
static FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);
#[map]
static BUCKETS: Array<Bucket> = Array::with_max_entries(BUCKETS_LEN, 0);
#[map]
static GUARD: LruHashMap<GuardKey, Bucket> =
    LruHashMap::with_max_entries(DEFAULT_GUARD_CAPACITY, 0);
/// The allow-list and the per-sender counters in one per-CPU hash: the lookup that admits a
/// tunnel packet returns this CPU's counters for its sender.
#[map]
static DECAP_ALLOW: PerCpuHashMap<AddrKey, DecapStats> =
    PerCpuHashMap::with_max_entries(DECAP_ALLOW_CAPACITY, 0);
#[map]
static SVC_STATS: PerCpuArray<ServiceStats> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
#[map]
static PEER_STATS: PerCpuArray<PeerStats> = PerCpuArray::with_max_entries(MAX_PEERS, 0);
#[map]
static GLOBAL_STATS: PerCpuArray<GlobalStats> = PerCpuArray::with_max_entries(1, 0);
#[map]
static FLOW_BUDGET: PerCpuArray<FlowBudget> = PerCpuArray::with_max_entries(1, 0);
/// Jiffies a cached next hop stays valid (25-100 ms at HZ 1000-250).
const NEXT_HOP_JIFFIES: u64 = 25;

/// Per-CPU scratch space for the FIB lookup parameters: on the stack they would push the
/// steering call chain past the 512-byte BPF stack limit. Never pinned, never read by
/// userspace.
#[map]
static FIB_SCRATCH: PerCpuArray<FibParams> = PerCpuArray::with_max_entries(1, 0);

/// The packet could not be parsed: pass it to the stack and count it as `unparsed`.
struct Unparsed;

#[xdp]
pub fn p2pcdn_redirect(ctx: XdpContext) -> u32 {
    match try_redirect(&ctx) {
        Ok(action) => action,
        Err(Unparsed) => {
            if let Some(g) = GLOBAL_STATS.get_ptr_mut(0) {
                // SAFETY: per-CPU value, only this CPU touches it while the program runs.
                unsafe { (*g).unparsed += 1 };
            }
            xdp_action::XDP_PASS
        }
    }
}

/// Bounds-checked pointer to a `T` at `offset` bytes into the packet. The single place where
/// packet memory is validated (the verifier needs the comparison against `data_end`).
///
/// `T` must be at least 2 bytes: for 1 byte LLVM rewrites `p + 1 > end` into `p >= end`, a
/// form after which this kernel's verifier grants no readable range.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Unparsed> {
    const { assert!(mem::size_of::<T>() >= 2) };
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return Err(Unparsed);
    }
    Ok((start + offset) as *mut T)
}

/// What the parser learned about a TCP packet (or a tunnel packet for us). The addresses come
/// first and the struct is 4-aligned so checksum code can load them as 32-bit words.
#[repr(C, align(4))]
struct Packet {
    src: [u8; 16],
    dst: [u8; 16],
    family: u8,
    /// Offset of the IP header (after Ethernet and an optional VLAN tag).
    l3: usize,
    /// IP header length (IPv4 with options; 40 for IPv6).
    ip_hdr_len: usize,
    /// Length of the IP packet (header + payload) as the header says.
    ip_len: usize,
    /// Offset of the transport header.
    l4: usize,
    /// IPv4 TOS or IPv6 traffic class.
    tos: u8,
    proto: u8,
}

#[inline(always)]
fn try_redirect(ctx: &XdpContext) -> Result<u32, Unparsed> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the bounds; EthHdr has alignment 1.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let inner: *const [u8; 2] = ptr_at(ctx, EthHdr::LEN + 2)?;
        // SAFETY: bounds checked above.
        ether_type = u16::from_be_bytes(unsafe { *inner });
        l3 += VLAN_LEN;
    }
    let pkt = match ether_type {
        ETH_P_IP => parse_ipv4(ctx, l3)?,
        ETH_P_IPV6 => match parse_ipv6(ctx, l3)? {
            Some(pkt) => pkt,
            None => return Ok(xdp_action::XDP_PASS),
        },
        _ => return Ok(xdp_action::XDP_PASS),
    };

    if pkt.proto != proto::TCP {
        return tunnel_or_pass(ctx, &pkt);
    }
    tcp(ctx, &pkt)
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3: usize) -> Result<Packet, Unparsed> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3)?;
    // SAFETY: bounds checked by `ptr_at`; Ipv4Hdr has alignment 1.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(Unparsed);
    }
    let hdr_len = ((ip.vihl & 0x0f) as usize) * 4;
    let ip_len = u16::from_be_bytes(ip.tot_len) as usize;
    if hdr_len < Ipv4Hdr::LEN || ip_len < hdr_len || l3 + ip_len > ctx.data_end() - ctx.data() {
        return Err(Unparsed);
    }
    // Fragments never carry a steerable TCP segment of their own: more-fragments set or a
    // non-zero offset means the stack reassembles.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(Unparsed);
    }
    let src = v4_in_16(ip.src_addr);
    let dst = v4_in_16(ip.dst_addr);
    Ok(Packet {
        family: family::V4,
        l3,
        ip_hdr_len: hdr_len,
        ip_len,
        l4: l3 + hdr_len,
        tos: ip.tos,
        proto: ip.proto,
        src,
        dst,
    })
}

/// An IPv4 address in the 16-byte key form. Built from words: a byte array zeroed and
/// copied into becomes a call to `memset` on BPF, which costs more than the whole parse.
#[inline(always)]
fn v4_in_16(a: [u8; 4]) -> [u8; 16] {
    // SAFETY: [u32; 4] and [u8; 16] have the same size and every bit pattern is valid.
    unsafe { mem::transmute::<[u32; 4], [u8; 16]>([u32::from_ne_bytes(a), 0, 0, 0]) }
}

/// `Ok(None)`: a well-formed IPv6 packet with extension headers, which we leave alone.
#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize) -> Result<Option<Packet>, Unparsed> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3)?;
    // SAFETY: bounds checked by `ptr_at`; Ipv6Hdr has alignment 1.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(Unparsed);
    }
    let payload = u16::from_be_bytes(ip.payload_len) as usize;
    // A zero payload length means a jumbogram (hop-by-hop option): not for us.
    if payload == 0 || l3 + Ipv6Hdr::LEN + payload > ctx.data_end() - ctx.data() {
        return Err(Unparsed);
    }
    let next = ip.next_hdr;
    if next == IPV6_FRAG {
        return Err(Unparsed);
    }
    if next != proto::TCP && next != proto::UDP && next != proto::IPIP && next != proto::IPV6 {
        return Ok(None);
    }
    Ok(Some(Packet {
        family: family::V6,
        l3,
        ip_hdr_len: Ipv6Hdr::LEN,
        ip_len: Ipv6Hdr::LEN + payload,
        l4: l3 + Ipv6Hdr::LEN,
        tos: (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
        proto: next,
        src: ip.src_addr,
        dst: ip.dst_addr,
    }))
}

#[inline(always)]
fn global_stats() -> Option<*mut GlobalStats> {
    GLOBAL_STATS.get_ptr_mut(0)
}

// ---------------------------------------------------------------------------------------------
// Peer role: decapsulation
// ---------------------------------------------------------------------------------------------

/// A non-TCP packet: a GUE/IPIP tunnel packet to our decapsulation address, or anything else
/// (passed untouched).
#[inline(always)]
fn tunnel_or_pass(ctx: &XdpContext, pkt: &Packet) -> Result<u32, Unparsed> {
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let ours = if pkt.family == family::V4 {
        cfg.flags & CONFIG_DECAP_V4 != 0 && pkt.dst[..4] == cfg.decap_v4
    } else {
        cfg.flags & CONFIG_DECAP_V6 != 0 && pkt.dst == cfg.decap_v6
    };
    if !ours {
        return Ok(xdp_action::XDP_PASS);
    }
    let outer_len = match pkt.proto {
        proto::IPIP | proto::IPV6 => pkt.ip_hdr_len,
        proto::UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, pkt.l4)?;
            // SAFETY: bounds checked by `ptr_at`.
            if unsafe { (*udp).dst } != cfg.gue_port_be.to_ne_bytes() {
                return Ok(xdp_action::XDP_PASS);
            }
            pkt.ip_hdr_len + UdpHdr::LEN
        }
        _ => return Ok(xdp_action::XDP_PASS),
    };

    let sender = AddrKey {
        addr: pkt.src,
        family: pkt.family,
        _pad0: [0; 3],
    };
    // One lookup both checks the allow-list and finds this CPU's counters for the sender.
    let Some(counts) = DECAP_ALLOW.get_ptr_mut(&sender) else {
        if let Some(g) = global_stats() {
            // SAFETY: per-CPU value.
            unsafe { (*g).decap_denied += 1 };
        }
        return Ok(xdp_action::XDP_DROP);
    };

    // The inner packet must be IP of the version the outer header announces, and the outer
    // length must leave room for it (the byte count below must not wrap).
    if pkt.ip_len <= outer_len {
        return Err(Unparsed);
    }
    let inner_first: *const [u8; 2] = ptr_at(ctx, pkt.l3 + outer_len)?;
    // SAFETY: bounds checked by `ptr_at`.
    let version = unsafe { (*inner_first)[0] } >> 4;
    let inner_type = match (pkt.proto, version) {
        (proto::IPIP, 4) | (proto::UDP, 4) => ETH_P_IP,
        (proto::IPV6, 6) | (proto::UDP, 6) => ETH_P_IPV6,
        _ => return Err(Unparsed),
    };
    if !decapsulate(ctx, pkt, outer_len, inner_type)? {
        return Ok(xdp_action::XDP_PASS);
    }
    // The inner IP packet's length as the outer header carries it: for a packet a primary
    // built, exactly the client packet it counted in `PeerStats::bytes` (`encapsulate`
    // writes outer length = outer headers + that length).
    let inner_len = (pkt.ip_len - outer_len) as u64;
    // SAFETY: per-CPU values (this CPU's copy of the sender's counters, and the globals).
    unsafe {
        (*counts).pkts += 1;
        (*counts).bytes += inner_len;
    }
    if let Some(g) = global_stats() {
        // SAFETY: per-CPU value.
        unsafe {
            (*g).decap_pkts += 1;
            (*g).decap_bytes += inner_len;
        }
    }
    Ok(xdp_action::XDP_PASS)
}

/// Strips the outer IP (and UDP) header, keeps the Ethernet header (and VLAN tag) with the
/// inner EtherType, so the caller can hand the inner packet to the stack, which delivers it
/// to the service address on loopback: the reply goes straight to the client (direct server
/// return). `Ok(false)`: the head could not be moved, the packet is still encapsulated (passed
/// uncounted).
#[inline(always)]
fn decapsulate(
    ctx: &XdpContext,
    pkt: &Packet,
    outer_len: usize,
    inner_type: u16,
) -> Result<bool, Unparsed> {
    match decapsulate_call(ctx.ctx, pkt, outer_len, inner_type) {
        DECAP_DONE => Ok(true),
        DECAP_NOT_MOVED => Ok(false),
        _ => Err(Unparsed),
    }
}

/// `decapsulate_call` results.
const DECAP_DONE: u32 = 0;
const DECAP_NOT_MOVED: u32 = 1;
const DECAP_UNPARSED: u32 = 2;

/// Not inlined, for the same stack reason as `steer_call`.
#[inline(never)]
fn decapsulate_call(raw: *mut xdp_md, pkt: &Packet, outer_len: usize, inner_type: u16) -> u32 {
    decapsulate_inner(&XdpContext::new(raw), pkt, outer_len, inner_type).unwrap_or(DECAP_UNPARSED)
}

#[inline(always)]
fn decapsulate_inner(
    ctx: &XdpContext,
    pkt: &Packet,
    outer_len: usize,
    inner_type: u16,
) -> Result<u32, Unparsed> {
    // Copy the whole L2 header (14 or 18 bytes) before moving the packet start.
    let mut saved = [0u8; 18];
    if pkt.l3 == EthHdr::LEN + VLAN_LEN {
        let l2: *const [u8; 18] = ptr_at(ctx, 0)?;
        // SAFETY: bounds checked by `ptr_at`.
        saved = unsafe { *l2 };
    } else {
        let l2: *const [u8; 14] = ptr_at(ctx, 0)?;
        // SAFETY: bounds checked by `ptr_at`.
        saved[..14].copy_from_slice(unsafe { &*l2 });
    }

    // SAFETY: plain helper call on our own context; it validates `delta` itself.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return Ok(DECAP_NOT_MOVED);
    }
    let type_at = if pkt.l3 == EthHdr::LEN + VLAN_LEN {
        let hdr: *mut [u8; 18] = ptr_at(ctx, 0)?;
        // SAFETY: bounds checked by `ptr_at` (after the head moved).
        unsafe { *hdr = saved };
        16
    } else {
        let hdr: *mut [u8; 14] = ptr_at(ctx, 0)?;
        let mut eth = [0u8; 14];
        eth.copy_from_slice(&saved[..14]);
        // SAFETY: bounds checked by `ptr_at` (after the head moved).
        unsafe { *hdr = eth };
        12
    };
    let ty: *mut [u8; 2] = ptr_at(ctx, type_at)?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe { *ty = inner_type.to_be_bytes() };
    Ok(DECAP_DONE)
}

// ---------------------------------------------------------------------------------------------
// Edge role: admission and steering
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn tcp(ctx: &XdpContext, pkt: &Packet) -> Result<u32, Unparsed> {
    let th: *const TcpHdr = ptr_at(ctx, pkt.l4)?;
    // SAFETY: bounds checked by `ptr_at`; TcpHdr has alignment 1.
    let th = unsafe { &*th };
    let tcp_hdr_len = (th.doff() as usize) * 4;
    if tcp_hdr_len < TcpHdr::LEN || pkt.ip_hdr_len + tcp_hdr_len > pkt.ip_len {
        return Err(Unparsed);
    }

    // Cheap pre-filter: most traffic is not to a service port.
    let dport = u16::from_be_bytes(th.dest);
    match PORTS.get(dport as u32) {
        Some(n) if *n != 0 => {}
        _ => return Ok(xdp_action::XDP_PASS),
    }
    let key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport_be: u16::from_ne_bytes(th.source),
        dport_be: u16::from_ne_bytes(th.dest),
        proto: proto::TCP,
        family: pkt.family,
        _pad0: [0; 2],
    };
    let bytes = pkt.ip_len as u64;
    let is_syn = th.syn() != 0 && th.ack() == 0;
    // SAFETY: FlowValue is Copy; we copy it out at once.
    let existing = unsafe { FLOWS.get(&key) }.copied();

    // Established packets: the flow entry alone decides (one hash lookup on the hot path).
    if !is_syn && let Some(flow) = existing {
        if flow.flags & FLOW_ESTABLISHED == 0 {
            // First packet after the SYN: mark the connection established (once per flow).
            if let Some(entry) = FLOWS.get_ptr_mut(&key) {
                // SAFETY: an entry of the LRU map; a racing CPU sets the same bit.
                unsafe { (*entry).flags |= FLOW_ESTABLISHED };
            }
        }
        let Some(stats) = SVC_STATS.get_ptr_mut(flow.service) else {
            return Ok(xdp_action::XDP_PASS);
        };
        return follow(ctx, pkt, &key, &flow, stats, bytes, false, tcp_hdr_len);
    }

    let skey = ServiceKey {
        addr: pkt.dst,
        port_be: key.dport_be,
        proto: proto::TCP,
        family: pkt.family,
    };
    // SAFETY: the value is a plain u32 read once.
    let Some(&svc) = (unsafe { SERVICES.get(&skey) }) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let Some(conf) = SVC_CONF.get(svc) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let Some(stats) = SVC_STATS.get_ptr_mut(svc) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if conf.flags & SVC_ACTIVE == 0 {
        return Ok(xdp_action::XDP_PASS);
    }
    if conf.flags & SVC_STEER == 0 {
        return Ok(local(stats, bytes));
    }
    if !is_syn {
        // SAFETY: per-CPU value.
        unsafe { (*stats).flow_misses += 1 };
        return Ok(local(stats, bytes));
    }

    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if conf.guard_interval_ns != 0 && !guard_admits(pkt, svc, conf, now) {
        // SAFETY: per-CPU value.
        unsafe { (*stats).guard_drops += 1 };
        return Ok(xdp_action::XDP_DROP);
    }
    if let Some(flow) = existing
        && flow.flags & FLOW_ESTABLISHED == 0
    {
        // A retransmitted SYN follows its first decision.
        return follow(ctx, pkt, &key, &flow, stats, bytes, true, tcp_hdr_len);
    }
    // No entry, or one whose connection was established: a client reusing the port for a
    // new connection is admitted (or steered) like any other, and counted.
    if !flow_budget_allows(now) {
        // SAFETY: per-CPU value.
        unsafe { (*stats).ceiling_hits += 1 };
        return Ok(local(stats, bytes));
    }

    let mut flow = FlowValue {
        decision: DECISION_LOCAL,
        flags: 0,
        _pad1: 0,
        service: svc,
        peer: PEER_NONE,
        peer_generation: 0,
        hash: 0,
    };
    if take_token(
        service_bucket(svc),
        conf.local_interval_ns,
        conf.local_burst_ns,
        now,
    ) {
        // SAFETY: per-CPU value.
        unsafe { (*stats).syn_local += 1 };
        let _ = FLOWS.insert(&key, &flow, 0);
        return Ok(local(stats, bytes));
    }

    let hash = flow_hash(&key);
    let Some((peer, peer_conf)) = choose_peer(svc, conf.ring_size, hash, now) else {
        // SAFETY: per-CPU value.
        unsafe { (*stats).kept_local += 1 };
        let _ = FLOWS.insert(&key, &flow, 0);
        return Ok(local(stats, bytes));
    };
    flow.decision = DECISION_STEERED;
    flow.peer = peer;
    flow.peer_generation = peer_conf.generation;
    flow.hash = hash;

    match steer(
        ctx,
        pkt,
        peer | STEER_NEW_CONNECTION,
        peer_conf,
        hash,
        false,
    ) {
        Steered::Sent(action) => {
            clamp_mss(ctx, pkt, peer_conf, tcp_hdr_len);
            // SAFETY: per-CPU values.
            unsafe { (*stats).syn_steered += 1 };
            let _ = FLOWS.insert(&key, &flow, 0);
            count_steered(stats, bytes);
            Ok(action)
        }
        Steered::NotSent => {
            // No route or neighbour towards the peer: serve it here rather than drop it.
            // SAFETY: per-CPU value.
            unsafe { (*stats).kept_local += 1 };
            flow.decision = DECISION_LOCAL;
            flow.peer = PEER_NONE;
            flow.hash = 0;
            let _ = FLOWS.insert(&key, &flow, 0);
            Ok(local(stats, bytes))
        }
    }
}

#[inline(always)]
fn local(stats: *mut ServiceStats, bytes: u64) -> u32 {
    // SAFETY: per-CPU value.
    unsafe {
        (*stats).pkts_local += 1;
        (*stats).bytes_local += bytes;
    }
    xdp_action::XDP_PASS
}

/// Service side of a steered packet's accounting (`steer_call` counts the peer side).
#[inline(always)]
fn count_steered(stats: *mut ServiceStats, bytes: u64) {
    // SAFETY: per-CPU values.
    unsafe {
        (*stats).pkts_steered += 1;
        (*stats).bytes_steered += bytes;
    }
}

/// Later packets (and retransmitted SYNs) of a flow follow its first decision.
#[expect(
    clippy::too_many_arguments,
    reason = "inlined hot path; a struct would cost copies"
)]
#[inline(always)]
fn follow(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    flow: &FlowValue,
    stats: *mut ServiceStats,
    bytes: u64,
    is_syn: bool,
    tcp_hdr_len: usize,
) -> Result<u32, Unparsed> {
    if flow.decision != DECISION_STEERED {
        return Ok(local(stats, bytes));
    }
    let peer_conf = match PEERS.get(flow.peer) {
        Some(p) if p.flags & PEER_ACTIVE != 0 && p.generation == flow.peer_generation => p,
        _ => {
            // The peer was removed (or its slot reused): this flow has nowhere to go.
            let _ = FLOWS.remove(key);
            if let Some(g) = global_stats() {
                // SAFETY: per-CPU value.
                unsafe { (*g).stale_peer += 1 };
            }
            return Ok(local(stats, bytes));
        }
    };
    match steer(ctx, pkt, flow.peer, peer_conf, flow.hash, !is_syn) {
        Steered::Sent(action) => {
            if is_syn {
                clamp_mss(ctx, pkt, peer_conf, tcp_hdr_len);
            }
            count_steered(stats, bytes);
            Ok(action)
        }
        // The peer holds this connection: handing the packet to our stack would only earn
        // the client a reset. Dropped (and counted), TCP retransmits once the path is back.
        Steered::NotSent => Ok(xdp_action::XDP_DROP),
    }
}

/// GCRA on `BUCKETS[index]`: admit if the theoretical arrival time stays within the burst.
/// Compare-and-swap keeps one bucket exact across CPUs.
#[inline(always)]
fn take_token(index: u32, interval_ns: u64, burst_ns: u64, now: u64) -> bool {
    match BUCKETS.get_ptr_mut(index) {
        Some(b) => gcra(b.cast::<u64>(), interval_ns, burst_ns, now),
        None => false,
    }
}

#[inline(always)]
fn gcra(tat_ptr: *mut u64, interval_ns: u64, burst_ns: u64, now: u64) -> bool {
    if burst_ns == 0 {
        return false;
    }
    // SAFETY: `tat_ptr` points into a map value (8-byte aligned, lives as long as the map).
    // A torn or stale read is harmless: the compare-and-swap below only succeeds against the
    // value really there. (An atomic load would need BPF's load-acquire, kernel ≥ 6.15.)
    let mut current = unsafe { core::ptr::read_volatile(tat_ptr) };
    for _ in 0..3 {
        let base = if current > now { current } else { now };
        let next = base + interval_ns;
        if next - now > burst_ns {
            return false;
        }
        // `core` offers no compare_exchange on BPF (the target spec says atomic-cas: false,
        // for old kernels), but the kernel has had BPF_CMPXCHG since 5.12: use the intrinsic.
        // SAFETY: as above; a relaxed CAS on an aligned u64.
        let (seen, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                tat_ptr, current, next,
            )
        };
        if swapped {
            return true;
        }
        current = seen;
    }
    false
}

/// Per-source new-connection limit (IPv4 /32, IPv6 /64) for one service.
#[inline(always)]
fn guard_admits(pkt: &Packet, svc: u32, conf: &ServiceConf, now: u64) -> bool {
    let mut key = GuardKey {
        prefix: pkt.src,
        service: svc,
    };
    if pkt.family == family::V6 {
        key.prefix[8..].copy_from_slice(&[0u8; 8]);
    }
    match GUARD.get_ptr_mut(&key) {
        Some(b) => gcra(
            b.cast::<u64>(),
            conf.guard_interval_ns,
            conf.guard_burst_ns,
            now,
        ),
        None => {
            if conf.guard_burst_ns == 0 {
                return false;
            }
            let fresh = Bucket {
                tat_ns: now + conf.guard_interval_ns,
            };
            let _ = GUARD.insert(&key, &fresh, 0);
            true
        }
    }
}

/// Per-CPU ceiling on new flow-table entries per second.
#[inline(always)]
fn flow_budget_allows(now: u64) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return true;
    };
    if cfg.flow_ceiling == 0 {
        return true;
    }
    let Some(b) = FLOW_BUDGET.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU value.
    unsafe {
        if now - (*b).window_start_ns >= ONE_SECOND_NS {
            (*b).window_start_ns = now;
            (*b).inserted = 0;
        }
        if (*b).inserted >= cfg.flow_ceiling as u64 {
            return false;
        }
        (*b).inserted += 1;
    }
    true
}

/// Maglev pick with fallback: the hashed slot, then the next few, first peer with a token.
#[inline(always)]
fn choose_peer(svc: u32, ring_size: u32, hash: u32, now: u64) -> Option<(u32, &'static PeerConf)> {
    if ring_size == 0 || ring_size > MAGLEV_STRIDE {
        return None;
    }
    let base = svc * MAGLEV_STRIDE;
    let mut slot = maglev_slot(hash, ring_size);
    for _ in 0..PEER_TRIES {
        if let Some(&peer) = MAGLEV.get(base + slot)
            && peer != PEER_NONE
            && let Some(conf) = PEERS.get(peer)
            && conf.flags & PEER_ACTIVE != 0
        {
            if take_token(peer_bucket(peer), conf.interval_ns, conf.burst_ns, now) {
                return Some((peer, conf));
            }
            if let Some(p) = PEER_STATS.get_ptr_mut(peer) {
                // SAFETY: per-CPU value.
                unsafe { (*p).no_token += 1 };
            }
        }
        slot += 1;
        if slot >= ring_size {
            slot = 0;
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Encapsulation
// ---------------------------------------------------------------------------------------------

enum Steered {
    Sent(u32),
    NotSent,
}

#[inline(always)]
fn outer_len(peer: &PeerConf) -> usize {
    let ip = if peer.family == family::V4 {
        Ipv4Hdr::LEN
    } else {
        Ipv6Hdr::LEN
    };
    if peer.encap == ENCAP_GUE {
        ip + UdpHdr::LEN
    } else {
        ip
    }
}

/// Looks up the next hop towards the peer, then grows the packet by the outer headers and
/// writes them. Returns `NotSent` (packet untouched) when the FIB cannot send it.
///
/// `slot` may carry `STEER_NEW_CONNECTION` (a SYN steered for the first time): a sent packet
/// is counted in the peer's `PEER_STATS` entry, which also holds the next-hop cache.
///
/// `inline`: packets of established flows (the hot path) get their own inlined copy of the
/// body, which saves the call and its register spills (about 7 ns per packet); SYNs share the
/// out-of-line `steer_call`, which keeps the program small (inlining every call site made
/// the whole program, pass-through included, slower).
#[inline(always)]
fn steer(
    ctx: &XdpContext,
    pkt: &Packet,
    slot: u32,
    peer: &PeerConf,
    hash: u32,
    inline: bool,
) -> Steered {
    let action = if inline {
        steer_body(ctx.ctx, pkt, slot, peer, hash)
    } else {
        steer_call(ctx.ctx, pkt, slot, peer, hash)
    };
    match action {
        NOT_SENT => Steered::NotSent,
        action => Steered::Sent(action),
    }
}

const NOT_SENT: u32 = u32::MAX;
/// Flag in `steer`'s `slot` argument (peer slots are below `MAX_PEERS`): count a new
/// connection. A flag rather than an argument: BPF functions take at most five.
const STEER_NEW_CONNECTION: u32 = 1 << 31;

#[inline(never)]
fn steer_call(raw: *mut xdp_md, pkt: &Packet, slot: u32, peer: &PeerConf, hash: u32) -> u32 {
    steer_body(raw, pkt, slot, peer, hash)
}

#[inline(always)]
fn steer_body(raw: *mut xdp_md, pkt: &Packet, slot: u32, peer: &PeerConf, hash: u32) -> u32 {
    let ctx = &XdpContext::new(raw);
    let outer = outer_len(peer);
    let total = outer + pkt.ip_len;
    let ingress = ctx.ingress_ifindex() as u32;

    if total > peer.mtu as usize {
        // Too big for the path to the peer once encapsulated (the peer should advertise a
        // smaller MSS, see docs/peer-setup.md).
        count_global(|g| g.fib_failed += 1);
        return NOT_SENT;
    }
    let Some(ps) = PEER_STATS.get_ptr_mut(slot & !STEER_NEW_CONNECTION) else {
        return NOT_SENT;
    };
    // SAFETY: per-CPU value, only this CPU touches it while the program runs.
    let ps = unsafe { &mut *ps };
    let Some(nh) = next_hop(ctx, &mut ps.next_hop, peer) else {
        return NOT_SENT;
    };
    // Counted as sent from here on, like the service side in the caller (an encapsulation
    // failure below drops the packet but still counts it).
    ps.packets += 1;
    ps.bytes += pkt.ip_len as u64;
    if slot & STEER_NEW_CONNECTION != 0 {
        ps.connections += 1;
    }
    if encapsulate(ctx, pkt, peer, hash, nh, outer).is_err() {
        if let Some(g) = global_stats() {
            // SAFETY: per-CPU value.
            unsafe { (*g).encap_failed += 1 };
        }
        // The head may have moved already: this packet is lost (TCP retransmits), but we
        // never hand a half-written packet to the stack.
        return xdp_action::XDP_DROP;
    }
    if nh.ifindex == ingress {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(nh.ifindex, 0) as u32 }
    }
}

/// Next hop towards a peer: a per-CPU cache in front of `bpf_fib_lookup` (a FIB and
/// neighbour lookup per packet would cost more than the rest of the steering path). An entry
/// is trusted for `NEXT_HOP_JIFFIES` jiffies and only for the peer generation it was made for,
/// so route and neighbour changes are picked up within 25-100 ms (HZ 1000-250).
#[inline(always)]
fn next_hop<'a>(ctx: &XdpContext, c: &'a mut NextHop, peer: &PeerConf) -> Option<&'a NextHop> {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_jiffies64() };
    if c.valid != 0 && c.generation == peer.generation && now - c.stamp < NEXT_HOP_JIFFIES {
        return Some(c);
    }
    let fib = FIB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch value; all-zero is a valid `bpf_fib_lookup`.
    let fib = unsafe {
        *fib = mem::zeroed();
        &mut *fib
    };
    fib.ifindex = ctx.ingress_ifindex() as u32;
    if peer.family == family::V4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src =
            u32::from_ne_bytes([peer.src[0], peer.src[1], peer.src[2], peer.src[3]]);
        fib.__bindgen_anon_4.ipv4_dst =
            u32::from_ne_bytes([peer.addr[0], peer.addr[1], peer.addr[2], peer.addr[3]]);
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = words(&peer.src);
        fib.__bindgen_anon_4.ipv6_dst = words(&peer.addr);
    }
    // An input-route lookup as if the packet came in on our interface (forwarding must be on
    // there); no MTU check here (tot_len 0): `steer_call` checks the peer's path MTU.
    // SAFETY: `fib` is a valid, fully initialised parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &mut *fib,
            mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        c.valid = 0;
        if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
            count_global(|g| g.fib_no_neigh += 1);
        } else {
            count_global(|g| g.fib_failed += 1);
        }
        return None;
    }
    let (d, m) = (fib.dmac, fib.smac);
    c.dmac = [
        u16::from_ne_bytes([d[0], d[1]]),
        u16::from_ne_bytes([d[2], d[3]]),
        u16::from_ne_bytes([d[4], d[5]]),
    ];
    c.smac = [
        u16::from_ne_bytes([m[0], m[1]]),
        u16::from_ne_bytes([m[2], m[3]]),
        u16::from_ne_bytes([m[4], m[5]]),
    ];
    c.ifindex = fib.ifindex;
    c.generation = peer.generation;
    c.stamp = now;
    c.valid = 1;
    Some(c)
}

#[inline(always)]
fn count_global(f: impl FnOnce(&mut GlobalStats)) {
    if let Some(g) = global_stats() {
        // SAFETY: per-CPU value.
        f(unsafe { &mut *g });
    }
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Grows the head by `outer` bytes and writes: Ethernet (VLAN tag kept), outer IPv4/IPv6,
/// and for GUE a UDP header whose checksum covers the inner packet.
#[inline(always)]
fn encapsulate(
    ctx: &XdpContext,
    pkt: &Packet,
    peer: &PeerConf,
    hash: u32,
    nh: &NextHop,
    outer: usize,
) -> Result<(), Unparsed> {
    // What the checksum of the UDP payload needs, read before the packet moves.
    let inner_sum = if peer.encap == ENCAP_GUE {
        inner_packet_sum(ctx, pkt)?
    } else {
        0
    };
    let vlan_tci: [u8; 2] = if pkt.l3 != EthHdr::LEN {
        let tci: *const [u8; 2] = ptr_at(ctx, EthHdr::LEN)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe { *tci }
    } else {
        [0; 2]
    };

    // SAFETY: plain helper call; the kernel checks the headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer as i32)) } != 0 {
        return Err(Unparsed);
    }

    let outer_type = if peer.family == family::V4 {
        ETH_P_IP
    } else {
        ETH_P_IPV6
    };
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let macs = eth.cast::<u16>();
    // SAFETY: bounds checked by `ptr_at` (14 bytes); the frame start is 2-aligned. Volatile
    // word stores keep LLVM from turning them back into a `memmove` call.
    unsafe {
        for (i, w) in [
            nh.dmac[0], nh.dmac[1], nh.dmac[2], nh.smac[0], nh.smac[1], nh.smac[2],
        ]
        .into_iter()
        .enumerate()
        {
            macs.add(i).write_volatile(w);
        }
    }
    if pkt.l3 != EthHdr::LEN {
        let tag: *mut [u8; 6] = ptr_at(ctx, 12)?;
        let t = ETH_P_8021Q.to_be_bytes();
        let o = outer_type.to_be_bytes();
        // SAFETY: bounds checked by `ptr_at`.
        unsafe { *tag = [t[0], t[1], vlan_tci[0], vlan_tci[1], o[0], o[1]] };
    } else {
        // SAFETY: bounds checked by `ptr_at`.
        unsafe { (*eth).ether_type = outer_type.to_be() };
    }

    let l3 = pkt.l3;
    let inner_proto = if pkt.family == family::V4 {
        proto::IPIP
    } else {
        proto::IPV6
    };
    let next = if peer.encap == ENCAP_GUE {
        proto::UDP
    } else {
        inner_proto
    };
    let total = outer + pkt.ip_len;
    // Both the outer IPv4 header checksum and the UDP pseudo header cover the two addresses.
    let addr_sum = addr_words(&peer.src, peer.family) + addr_words(&peer.addr, peer.family);
    // Headers are written field by field in place: images on the stack would cost frame
    // space the 512-byte BPF stack cannot spare.
    let ip_hdr = if peer.family == family::V4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, l3)?;
        let tot_len = (total as u16).to_be();
        // The header's checksum from the values written (no re-read of packet memory):
        // version/IHL/TOS, total length, id 0, DF, TTL/protocol and the addresses.
        let check = !fold(
            u16::from_ne_bytes([0x45, pkt.tos]) as u64
                + tot_len as u64
                + IPV4_DF.to_be() as u64
                + u16::from_ne_bytes([OUTER_TTL, next]) as u64
                + addr_sum,
        );
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            (*ip).vihl = 0x45;
            (*ip).tos = pkt.tos;
            (*ip).tot_len = tot_len.to_ne_bytes();
            (*ip).id = [0; 2];
            (*ip).frags = IPV4_DF.to_be_bytes(); // we clamp the MSS instead of fragmenting
            (*ip).ttl = OUTER_TTL;
            (*ip).proto = next;
            (*ip).check = check.to_ne_bytes();
            (*ip).src_addr = [peer.src[0], peer.src[1], peer.src[2], peer.src[3]];
            (*ip).dst_addr = [peer.addr[0], peer.addr[1], peer.addr[2], peer.addr[3]];
        }
        Ipv4Hdr::LEN
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, l3)?;
        let label = hash & 0x000f_ffff;
        let vcf = (6u32 << 28) | ((pkt.tos as u32) << 20) | label;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            (*ip).vcf = vcf.to_be_bytes();
            (*ip).payload_len = ((total - Ipv6Hdr::LEN) as u16).to_be_bytes();
            (*ip).next_hdr = next;
            (*ip).hop_limit = OUTER_TTL;
            (*ip).src_addr = peer.src;
            (*ip).dst_addr = peer.addr;
        }
        Ipv6Hdr::LEN
    };

    if peer.encap == ENCAP_GUE {
        let udp: *mut UdpHdr = ptr_at(ctx, l3 + ip_hdr)?;
        let udp_len = (UdpHdr::LEN + pkt.ip_len) as u16;
        let sport = gue_source_port(hash);
        // Pseudo header + UDP header + the inner packet (wire-order sums, see `fold`).
        let mut sum = addr_sum;
        sum += (proto::UDP as u16).to_be() as u64 + 2 * udp_len.to_be() as u64;
        sum += sport.to_be() as u64 + peer.gue_port_be as u64;
        sum += inner_sum;
        let mut check = !fold(sum);
        if check == 0 {
            check = 0xffff;
        }
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            (*udp).src = sport.to_be_bytes();
            (*udp).dst = peer.gue_port_be.to_ne_bytes();
            (*udp).len = udp_len.to_be_bytes();
            (*udp).check = check.to_ne_bytes();
        }
    }
    Ok(())
}

/// Ones'-complement sum (unfolded, wire order) of the inner IP packet, without reading its
/// payload: the TCP checksum makes `pseudo header + segment` sum to 0xffff, so the segment sums
/// to the complement of its pseudo header (the trick behind Linux's local checksum offload).
/// - IPv4: a header with a correct checksum sums to 0xffff, which is zero in ones'-complement
///   arithmetic, so the packet sums to the segment alone.
/// - IPv6: the header's addresses cancel against the pseudo header's, which leaves the first
///   eight header bytes minus (next header + segment length).
///
/// A packet with a wrong inner checksum gets a wrong UDP checksum and is dropped by the peer,
/// exactly as it would have been dropped after decapsulation.
#[inline(always)]
fn inner_packet_sum(ctx: &XdpContext, pkt: &Packet) -> Result<u64, Unparsed> {
    let seg_len = (pkt.ip_len - pkt.ip_hdr_len) as u16;
    let proto_len = (proto::TCP as u16).to_be() as u64 + seg_len.to_be() as u64;
    if pkt.family == family::V4 {
        let pseudo = addr_words(&pkt.src, pkt.family) + addr_words(&pkt.dst, pkt.family);
        Ok((!fold(pseudo + proto_len)) as u64)
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, pkt.l3)?;
        Ok(wire_words::<4>(ip.cast()) + (!fold(proto_len)) as u64)
    }
}

/// Sum of `N` 16-bit words at `p` (packet memory, already bounds checked by the caller
/// through a pointer to a header of that size), loaded in native order.
#[inline(always)]
fn wire_words<const N: usize>(p: *const u16) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i < N {
        // SAFETY: the caller's `ptr_at` covered N words; headers start 2-aligned (Ethernet
        // is 14 or 18 bytes and the XDP headroom is aligned).
        s += unsafe { p.add(i).read() } as u64;
        i += 1;
    }
    s
}

/// Sum of an address's 32-bit words, loaded in native order (four for IPv6, one for IPv4).
#[inline(always)]
fn addr_words(a: &[u8; 16], fam: u8) -> u64 {
    let p = a.as_ptr().cast::<u32>();
    // SAFETY: every caller passes a 4-aligned array (`Packet` and `PeerConf` fields).
    unsafe {
        let mut s = p.read() as u64;
        if fam == family::V6 {
            s += p.add(1).read() as u64 + p.add(2).read() as u64 + p.add(3).read() as u64;
        }
        s
    }
}

/// Folds a ones'-complement accumulator to 16 bits. Sums in this file are taken over words
/// loaded in native order straight from wire bytes; the ones'-complement sum is byte-order
/// independent (RFC 1071, 2.B), so host values enter as `x.to_be()` and results are stored
/// with `to_ne_bytes`.
#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Clamps the MSS option of a steered SYN so the encapsulated segments fit the path MTU to
/// the peer, fixing the TCP checksum incrementally (RFC 1624). Runs after encapsulation (the
/// TCP header is `outer_len` further in), so a SYN that ends up served locally is untouched;
/// the GUE checksum stays valid because it relies only on the TCP checksum being right.
#[inline(always)]
fn clamp_mss(ctx: &XdpContext, pkt: &Packet, peer: &PeerConf, tcp_hdr_len: usize) {
    let outer = outer_len(peer);
    let overhead = outer + pkt.ip_hdr_len + TcpHdr::LEN;
    let mtu = peer.mtu as usize;
    let opts_len = tcp_hdr_len - TcpHdr::LEN;
    if mtu <= overhead || opts_len == 0 {
        return;
    }
    clamp_mss_call(ctx.ctx, pkt.l4 + outer, opts_len, (mtu - overhead) as u16);
}

/// Not inlined, so the option scan is verified with a small state (it loops over options).
/// The options are copied to the stack first: a loop over packet offsets multiplies the
/// verifier's states beyond its limit.
#[inline(never)]
fn clamp_mss_call(raw: *mut xdp_md, l4: usize, opts_len: usize, limit: u16) {
    let ctx = &XdpContext::new(raw);
    if opts_len > TCP_MAX_OPTS || l4 > MAX_L4_OFFSET {
        return;
    }
    let mut opts = [0u8; TCP_MAX_OPTS];
    // SAFETY: `opts` is a stack buffer of `TCP_MAX_OPTS` ≥ `opts_len` bytes.
    let copied = unsafe {
        bpf_xdp_load_bytes(
            raw,
            (l4 + TcpHdr::LEN) as u32,
            opts.as_mut_ptr().cast(),
            opts_len as u32,
        )
    };
    if copied != 0 {
        return;
    }
    // Walk every byte position and act only where the next option starts: the buffer index
    // is the loop counter (a constant per step) and `next` is never used as an address, so
    // the verifier's states at each step collapse into one instead of multiplying.
    let mut next = 0usize;
    let mut mss_at = usize::MAX;
    for j in 0..TCP_MAX_OPTS - 1 {
        if j + 1 >= opts_len {
            break;
        }
        if j != next {
            continue;
        }
        let kind = opts[j];
        if kind == TCP_OPT_END {
            break;
        }
        if kind == TCP_OPT_NOP {
            next = j + 1;
            continue;
        }
        let len = opts[j + 1] as usize;
        if len < 2 {
            break;
        }
        if kind == TCP_OPT_MSS {
            if len == 4 && j + 4 <= opts_len {
                mss_at = j + 2;
            }
            break;
        }
        next = j + len;
    }
    if mss_at >= TCP_MAX_OPTS - 1 {
        return;
    }
    let value_off = l4 + TcpHdr::LEN + mss_at;
    let (Ok(value), Ok(check)) = (
        ptr_at::<[u8; 2]>(ctx, value_off),
        ptr_at::<[u8; 2]>(ctx, l4 + TCP_CHECK_OFFSET),
    ) else {
        return;
    };
    // SAFETY: bounds checked by `ptr_at`.
    unsafe {
        let old = u16::from_be_bytes(*value);
        if old <= limit {
            return;
        }
        *value = limit.to_be_bytes();
        // Checksum words are aligned to the TCP header: a value at an odd offset contributes
        // its bytes swapped.
        let (o, n) = if mss_at & 1 == 1 {
            (old.swap_bytes(), limit.swap_bytes())
        } else {
            (old, limit)
        };
        let c = u16::from_be_bytes(*check);
        let sum = (!c) as u64 + (!o) as u64 + n as u64;
        *check = (!fold(sum)).to_be_bytes();
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
