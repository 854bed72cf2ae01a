//! BPF_PROG_TEST_RUN tests of the XDP program: crafted packets in, return code and output
//! bytes out, outputs read back by an independent parser (etherparse, in `packet`).
//!
//! Privileged (root or CAP_BPF + CAP_NET_ADMIN); fail under `CI=true` without privileges.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, SocketAddrV6};

use p2pcdn_tests::{
    harness::{
        Harness, HarnessNs, action, addrs, fixture_addrs::*, flow_key, peer, service_key,
        steer_service, v4, v6,
    },
    packet::{self, Eth, Ip, Ipv4, Tcp, parse_frame},
    privilege::require_root,
};
use redirector_ebpf::{
    Config, DECISION_LOCAL, DECISION_STEERED, DEFAULT_GUE_PORT, ENCAP_GUE, ENCAP_IPIP,
    FLOW_ESTABLISHED, PeerConf, SVC_ACTIVE, ServiceConf, gcra, gue_source_port,
};

const PORT: u16 = 443;
const RING: u32 = 13;

fn svc4() -> SocketAddrV4 {
    SocketAddrV4::new(SERVICE_V4, PORT)
}
fn svc6() -> SocketAddrV6 {
    SocketAddrV6::new(SERVICE_V6, PORT, 0, 0)
}

/// A loaded program in its own namespace with one service (id 0) on v4 and v6 addresses,
/// whose local admission admits nothing (every SYN is overflow) unless a test changes it.
struct Bed {
    h: Harness,
    _ns: HarnessNs,
}

fn bed(name: &str) -> Option<Bed> {
    if !require_root(name) {
        return None;
    }
    let ns = HarnessNs::enter().unwrap();
    let mut h = Harness::load(4096).unwrap();
    h.add_service(
        0,
        &[
            service_key(v4(SERVICE_V4), PORT),
            service_key(v6(SERVICE_V6), PORT),
        ],
        steer_service(0, 0, RING),
    )
    .unwrap();
    Some(Bed { h, _ns: ns })
}

/// Peer slot 0 = A (IPv4, GUE), slot 1 = B (IPv4, IPIP), both with ample rates, ring
/// alternating A, B.
fn two_peers(h: &mut Harness) {
    h.set_peer(
        0,
        peer(v4(addrs::PEER_A_V4), ENCAP_GUE, 1_000_000, 1_000, 1),
    )
    .unwrap();
    h.set_peer(
        1,
        peer(v4(addrs::PEER_B_V4), ENCAP_IPIP, 1_000_000, 1_000, 1),
    )
    .unwrap();
    h.fill_ring(0, RING, &[0, 1]).unwrap();
}

fn only_peer(h: &mut Harness, conf: PeerConf) {
    h.set_peer(0, conf).unwrap();
    h.fill_ring(0, RING, &[0]).unwrap();
}

fn is_sent(a: u32) -> bool {
    a == action::TX || a == action::REDIRECT
}

#[test]
fn traffic_to_no_service_passes_untouched() {
    let Some(mut b) = bed("traffic_to_no_service_passes_untouched") else {
        return;
    };
    two_peers(&mut b.h);
    for pkt in [
        packet::syn_v4(CLIENT_V4, SocketAddrV4::new(SERVICE_V4, 80), 40_000),
        packet::syn_v4(
            CLIENT_V4,
            SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), PORT),
            40_000,
        ),
        packet::udp_v4(CLIENT_V4, 5353, SocketAddrV4::new(SERVICE_V4, PORT), b"x"),
        packet::syn_v6_hop_by_hop(CLIENT_V6, svc6(), 40_000),
    ] {
        let r = b.h.run(&pkt).unwrap();
        assert_eq!(r.action, action::PASS);
        assert_eq!(r.out, pkt, "passed packets are not modified");
    }
    let s = b.h.service_stats(0).unwrap();
    assert_eq!(s.syn_steered + s.syn_local + s.kept_local + s.pkts_local, 0);
    assert_eq!(b.h.flow_count().unwrap(), 0);
}

#[test]
fn every_truncation_of_every_fixture_passes_unsteered() {
    let Some(mut b) = bed("every_truncation_of_every_fixture_passes_unsteered") else {
        return;
    };
    two_peers(&mut b.h);
    b.h.enable_decap(DEFAULT_GUE_PORT).unwrap();
    b.h.allow_decap(v4(CLIENT_V4)).unwrap();
    b.h.allow_decap(v6(CLIENT_V6)).unwrap();
    let inner = packet::syn_v4_packet(CLIENT_V4, svc4(), 1);
    let inner6 = packet::syn_v6_packet(CLIENT_V6, svc6(), 1);
    let fixtures: Vec<(&str, Vec<u8>)> = vec![
        ("syn_v4", packet::syn_v4(CLIENT_V4, svc4(), 40_001)),
        ("ack_v4", packet::ack_v4(CLIENT_V4, svc4(), 40_002)),
        (
            "data_v4",
            packet::data_v4(CLIENT_V4, svc4(), 40_003, b"GET / HTTP/1.1\r\n\r\n"),
        ),
        (
            "syn_v4_vlan",
            packet::syn_v4_vlan(CLIENT_V4, svc4(), 40_004, 7),
        ),
        (
            "syn_v4_ip_options",
            packet::syn_v4_ip_options(CLIENT_V4, svc4(), 40_005),
        ),
        ("syn_v6", packet::syn_v6(CLIENT_V6, svc6(), 40_006)),
        (
            "data_v6",
            packet::data_v6(CLIENT_V6, svc6(), 40_007, b"hello"),
        ),
        (
            "ipip",
            packet::ipip(v4(CLIENT_V4), v4(addrs::EDGE_V4), &inner),
        ),
        (
            "gue",
            packet::gue(v4(CLIENT_V4), v4(addrs::EDGE_V4), 50_000, &inner),
        ),
        (
            "ip6ip6",
            packet::ipip(v6(CLIENT_V6), v6(addrs::EDGE_V6), &inner6),
        ),
    ];
    for (name, pkt) in &fixtures {
        // The kernel refuses test runs shorter than an Ethernet header.
        for len in 14..pkt.len() {
            let cut = &pkt[..len];
            let before = b.h.global_stats().unwrap().unparsed;
            let r = b.h.run(cut).unwrap();
            assert_eq!(
                r.action,
                action::PASS,
                "{name} cut at {len} of {}: action {}",
                pkt.len(),
                r.action
            );
            assert_eq!(r.out, cut, "{name} cut at {len}: output modified");
            // Cuts inside Ethernet are not IP at all; every cut after it is counted.
            if len >= 14 + 4 * usize::from(name.contains("vlan")) {
                assert_eq!(
                    b.h.global_stats().unwrap().unparsed,
                    before + 1,
                    "{name} cut at {len} not counted as unparsed"
                );
            }
        }
    }
    let s = b.h.service_stats(0).unwrap();
    assert_eq!(s.syn_steered, 0, "a truncated packet was steered");
    assert_eq!(
        b.h.global_stats().unwrap().decap_pkts,
        0,
        "a truncated tunnel was decapsulated"
    );
}

#[test]
fn fragments_and_bad_header_lengths_are_unparsed() {
    let Some(mut b) = bed("fragments_and_bad_header_lengths_are_unparsed") else {
        return;
    };
    two_peers(&mut b.h);
    let mut bad_ihl = packet::syn_v4(CLIENT_V4, svc4(), 40_010);
    bad_ihl[14] = 0x44; // IHL 4 (16 bytes): below the minimum
    let mut bad_doff = packet::syn_v4(CLIENT_V4, svc4(), 40_011);
    bad_doff[14 + 20 + 12] = 0x40; // TCP data offset 4 (16 bytes)
    let mut long_doff = packet::ack_v4(CLIENT_V4, svc4(), 40_012);
    long_doff[14 + 20 + 12] = 0xf0; // 60-byte TCP header in a 20-byte segment
    let mut bad_tot_len = packet::syn_v4(CLIENT_V4, svc4(), 40_013);
    bad_tot_len[16] = 0x05; // total length 0x05xx: more than the frame
    let mut not_v4 = packet::syn_v4(CLIENT_V4, svc4(), 40_014);
    not_v4[14] = 0x65; // version 6 under EtherType IPv4
    let fixtures = [
        packet::first_fragment_v4(CLIENT_V4, svc4(), 40_015),
        packet::later_fragment_v4(CLIENT_V4, svc4(), 8),
        bad_ihl,
        bad_doff,
        long_doff,
        bad_tot_len,
        not_v4,
    ];
    for (i, pkt) in fixtures.iter().enumerate() {
        let r = b.h.run(pkt).unwrap();
        assert_eq!(r.action, action::PASS, "fixture {i}");
        assert_eq!(&r.out, pkt, "fixture {i} modified");
    }
    assert_eq!(b.h.global_stats().unwrap().unparsed, fixtures.len() as u64);
    assert_eq!(b.h.service_stats(0).unwrap().syn_steered, 0);
    assert_eq!(b.h.flow_count().unwrap(), 0);
}

#[test]
fn local_admission_then_overflow_stays_local_without_peers() {
    let Some(mut b) = bed("local_admission_then_overflow_stays_local_without_peers") else {
        return;
    };
    b.h.set_service_conf(0, steer_service(1, 3, RING)).unwrap();
    for sport in 0..5u16 {
        let pkt = packet::syn_v4(CLIENT_V4, svc4(), 41_000 + sport);
        let r = b.h.run(&pkt).unwrap();
        assert_eq!(r.action, action::PASS);
        assert_eq!(r.out, pkt);
    }
    let s = b.h.service_stats(0).unwrap();
    assert_eq!(s.syn_local, 3, "burst of 3 admitted locally");
    assert_eq!(
        s.kept_local, 2,
        "no peers: overflow kept local, never dropped"
    );
    assert_eq!(s.pkts_local, 5);
    let f =
        b.h.flow(&flow_key(v4(CLIENT_V4), 41_004, v4(SERVICE_V4), PORT))
            .unwrap();
    assert_eq!(f.unwrap().decision, DECISION_LOCAL);
}

/// Steers a SYN and checks the encapsulation with the independent parser.
fn check_steered(out: &[u8], peer_addr: IpAddr, gue: bool, sent: &packet::IpPacket, mss: u16) {
    let p = parse_frame(out, DEFAULT_GUE_PORT).unwrap();
    assert_eq!(
        p.eth.destination,
        addrs::PEER_MAC,
        "next hop MAC from the FIB"
    );
    let edge = match peer_addr {
        IpAddr::V4(_) => v4(addrs::EDGE_V4),
        IpAddr::V6(_) => v6(addrs::EDGE_V6),
    };
    assert_eq!(p.outer.src, edge, "outer source is the edge");
    assert_eq!(p.outer.dst, peer_addr, "outer destination is the peer");
    let inner = p.inner.as_ref().expect("a tunnelled packet");
    let orig = parse_frame(&sent.frame(), DEFAULT_GUE_PORT).unwrap();
    assert_eq!(inner.src, orig.outer.src);
    assert_eq!(inner.dst, orig.outer.dst);
    assert_eq!(inner.len, sent.bytes().len(), "inner packet length kept");
    match (&p.tunnel, gue) {
        (Some(packet::Tunnel::Gue(_)), true) | (Some(packet::Tunnel::IpInIp), false) => {}
        (t, _) => panic!("unexpected tunnel {t:?}"),
    }
    assert_eq!(p.mss(), Some(mss), "MSS option");
}

#[test]
fn overflow_syn_is_steered_over_gue_with_valid_checksums_and_clamped_mss() {
    let Some(mut b) = bed("overflow_syn_is_steered_over_gue") else {
        return;
    };
    two_peers(&mut b.h);
    // Ingress on veth0, where the FIB sends the packet: XDP_TX.
    b.h.set_ingress(Some(b._ns.veth0));
    let mut steered = [0u32; 2];
    for sport in 0..40u16 {
        let sent = packet::syn_v4_packet(CLIENT_V4, svc4(), 42_000 + sport);
        let r = b.h.run(&sent.frame()).unwrap();
        assert_eq!(r.action, action::TX, "same interface: XDP_TX");
        let p = parse_frame(&r.out, DEFAULT_GUE_PORT).unwrap();
        if p.outer.dst == v4(addrs::PEER_A_V4) {
            steered[0] += 1;
            // GUE over IPv4: 1500 - 20 - 8 - 20 - 20.
            check_steered(&r.out, v4(addrs::PEER_A_V4), true, &sent, 1432);
            let key = flow_key(v4(CLIENT_V4), 42_000 + sport, v4(SERVICE_V4), PORT);
            let want = gue_source_port(redirector_ebpf::flow_hash(&key));
            match p.tunnel {
                Some(packet::Tunnel::Gue(udp)) => assert_eq!(udp.source_port, want),
                t => panic!("{t:?}"),
            }
        } else {
            steered[1] += 1;
            // IPIP over IPv4: 1500 - 20 - 20 - 20.
            check_steered(&r.out, v4(addrs::PEER_B_V4), false, &sent, 1440);
        }
    }
    assert!(
        steered[0] > 5 && steered[1] > 5,
        "both peers used: {steered:?}"
    );
    let s = b.h.service_stats(0).unwrap();
    assert_eq!(s.syn_steered, 40);
    assert_eq!(
        b.h.peer_stats(0).unwrap().connections,
        u64::from(steered[0])
    );
    assert_eq!(
        b.h.peer_stats(1).unwrap().connections,
        u64::from(steered[1])
    );
}

#[test]
fn later_packets_follow_the_first_decision_and_bytes_are_counted() {
    let Some(mut b) = bed("later_packets_follow_the_first_decision") else {
        return;
    };
    only_peer(&mut b.h, peer(v4(addrs::PEER_A_V4), ENCAP_GUE, 1000, 10, 1));
    let syn = packet::syn_v4(CLIENT_V4, svc4(), 43_000);
    let r = b.h.run(&syn).unwrap();
    assert_eq!(
        r.action,
        action::REDIRECT,
        "loopback ingress, veth0 egress: redirect"
    );
    let payload = vec![0x41u8; 700];
    let data = packet::data_v4(CLIENT_V4, svc4(), 43_000, &payload);
    let r = b.h.run(&data).unwrap();
    assert!(is_sent(r.action));
    let p = parse_frame(&r.out, DEFAULT_GUE_PORT).unwrap();
    assert_eq!(
        p.transport.payload(),
        &payload[..],
        "payload carried intact"
    );
    // Table change: the ring now points nowhere; the flow keeps its peer.
    b.h.fill_ring(0, RING, &[]).unwrap();
    let r = b.h.run(&packet::ack_v4(CLIENT_V4, svc4(), 43_000)).unwrap();
    assert!(
        is_sent(r.action),
        "established flow survives a table change"
    );
    let ps = b.h.peer_stats(0).unwrap();
    assert_eq!(ps.connections, 1);
    assert_eq!(ps.packets, 3);
    let ip_bytes = (syn.len() - 14) + (data.len() - 14) + 40;
    assert_eq!(ps.bytes, ip_bytes as u64, "per-peer bytes are IP bytes");
    assert_eq!(b.h.service_stats(0).unwrap().bytes_steered, ip_bytes as u64);
    // A new SYN finds no peer now and stays local.
    let r = b.h.run(&packet::syn_v4(CLIENT_V4, svc4(), 43_001)).unwrap();
    assert_eq!(r.action, action::PASS);
    assert_eq!(b.h.service_stats(0).unwrap().kept_local, 1);
}

#[test]
fn non_syn_without_flow_goes_local_and_is_counted() {
    let Some(mut b) = bed("non_syn_without_flow_goes_local") else {
        return;
    };
    two_peers(&mut b.h);
    let pkt = packet::ack_v4(CLIENT_V4, svc4(), 44_000);
    let r = b.h.run(&pkt).unwrap();
    assert_eq!(r.action, action::PASS);
    assert_eq!(r.out, pkt);
    let s = b.h.service_stats(0).unwrap();
    assert_eq!((s.flow_misses, s.pkts_local), (1, 1));
}

#[test]
fn removed_peer_loses_its_flows_and_gets_no_new_ones() {
    let Some(mut b) = bed("removed_peer_loses_its_flows") else {
        return;
    };
    only_peer(&mut b.h, peer(v4(addrs::PEER_A_V4), ENCAP_GUE, 1000, 10, 1));
    assert!(is_sent(
        b.h.run(&packet::syn_v4(CLIENT_V4, svc4(), 45_000))
            .unwrap()
            .action
    ));
    // Remove: inactive, new generation (what redirector-user does).
    let mut gone = peer(v4(addrs::PEER_A_V4), ENCAP_GUE, 1000, 10, 2);
    gone.flags = 0;
    b.h.set_peer(0, gone).unwrap();
    let r = b.h.run(&packet::ack_v4(CLIENT_V4, svc4(), 45_000)).unwrap();
    assert_eq!(
        r.action,
        action::PASS,
        "flow of a removed peer is not steered"
    );
    assert_eq!(b.h.global_stats().unwrap().stale_peer, 1);
    let key = flow_key(v4(CLIENT_V4), 45_000, v4(SERVICE_V4), PORT);
    assert_eq!(b.h.flow(&key).unwrap(), None, "its flow entry is gone");
    // A slot reused by a new peer does not inherit old flows either.
    let r = b.h.run(&packet::syn_v4(CLIENT_V4, svc4(), 45_001)).unwrap();
    assert_eq!(
        r.action,
        action::PASS,
        "a removed peer gets no new connection"
    );
    b.h.set_peer(0, peer(v4(addrs::PEER_B_V4), ENCAP_GUE, 1000, 10, 3))
        .unwrap();
    let r = b.h.run(&packet::syn_v4(CLIENT_V4, svc4(), 45_002)).unwrap();
    assert!(is_sent(r.action));
    assert_eq!(
        parse_frame(&r.out, DEFAULT_GUE_PORT).unwrap().outer.dst,
        v4(addrs::PEER_B_V4)
    );
}

#[test]
fn peer_without_token_falls_to_next_slot_then_local() {
    let Some(mut b) = bed("peer_without_token_falls_to_next_slot") else {
        return;
    };
    // A admits 2 connections, B admits 3; the ring alternates A, B.
    b.h.set_peer(0, peer(v4(addrs::PEER_A_V4), ENCAP_GUE, 1, 2, 1))
        .unwrap();
    b.h.set_peer(1, peer(v4(addrs::PEER_B_V4), ENCAP_GUE, 1, 3, 1))
        .unwrap();
    b.h.fill_ring(0, RING, &[0, 1]).unwrap();
    let mut sent = 0;
    for sport in 0..10u16 {
        let r =
            b.h.run(&packet::syn_v4(CLIENT_V4, svc4(), 46_000 + sport))
                .unwrap();
        if is_sent(r.action) {
            sent += 1;
        } else {
            assert_eq!(r.action, action::PASS, "never dropped for lack of peers");
        }
    }
    assert_eq!(sent, 5, "2 + 3 tokens");
    assert_eq!(b.h.peer_stats(0).unwrap().connections, 2);
    assert_eq!(b.h.peer_stats(1).unwrap().connections, 3);
    assert_eq!(b.h.service_stats(0).unwrap().kept_local, 5);
    assert!(b.h.peer_stats(0).unwrap().no_token > 0);
}

#[test]
fn ipv6_and_mixed_family_tunnels() {
    let Some(mut b) = bed("ipv6_and_mixed_family_tunnels") else {
        return;
    };
    // IPv6 client over an IPv6 GUE peer: 1500 - 40 - 8 - 40 - 20.
    only_peer(&mut b.h, peer(v6(addrs::PEER_A_V6), ENCAP_GUE, 1000, 10, 1));
    let sent = packet::syn_v6_packet(CLIENT_V6, svc6(), 47_000);
    let r = b.h.run(&sent.frame()).unwrap();
    assert!(is_sent(r.action), "action {}", r.action);
    check_steered(&r.out, v6(addrs::PEER_A_V6), true, &sent, 1392);
    // IP6IP6: 1500 - 40 - 40 - 20.
    only_peer(
        &mut b.h,
        peer(v6(addrs::PEER_A_V6), ENCAP_IPIP, 1000, 10, 2),
    );
    let sent = packet::syn_v6_packet(CLIENT_V6, svc6(), 47_001);
    let r = b.h.run(&sent.frame()).unwrap();
    check_steered(&r.out, v6(addrs::PEER_A_V6), false, &sent, 1400);
    // 6in4: IPv6 client, IPv4 peer: 1500 - 20 - 40 - 20.
    only_peer(
        &mut b.h,
        peer(v4(addrs::PEER_A_V4), ENCAP_IPIP, 1000, 10, 3),
    );
    let sent = packet::syn_v6_packet(CLIENT_V6, svc6(), 47_002);
    let r = b.h.run(&sent.frame()).unwrap();
    check_steered(&r.out, v4(addrs::PEER_A_V4), false, &sent, 1420);
    // 4in6 over GUE: 1500 - 40 - 8 - 20 - 20.
    only_peer(&mut b.h, peer(v6(addrs::PEER_A_V6), ENCAP_GUE, 1000, 10, 4));
    let sent = packet::syn_v4_packet(CLIENT_V4, svc4(), 47_003);
    let r = b.h.run(&sent.frame()).unwrap();
    check_steered(&r.out, v6(addrs::PEER_A_V6), true, &sent, 1412);
}

#[test]
fn vlan_tag_and_ip_options_survive_steering() {
    let Some(mut b) = bed("vlan_tag_and_ip_options_survive_steering") else {
        return;
    };
    only_peer(&mut b.h, peer(v4(addrs::PEER_A_V4), ENCAP_GUE, 1000, 10, 1));
    let r =
        b.h.run(&packet::syn_v4_vlan(CLIENT_V4, svc4(), 48_000, 42))
            .unwrap();
    assert!(is_sent(r.action));
    let p = parse_frame(&r.out, DEFAULT_GUE_PORT).unwrap();
    assert_eq!(
        p.vlan.as_ref().map(|v| v.vlan_id.value()),
        Some(42),
        "tag kept"
    );
    assert_eq!(p.outer.dst, v4(addrs::PEER_A_V4));

    let sent = Ipv4::new(CLIENT_V4, SERVICE_V4)
        .options(&[0x94, 0x04, 0x00, 0x00])
        .tcp(&Tcp::syn(48_001, PORT));
    let r = b.h.run(&sent.frame()).unwrap();
    assert!(is_sent(r.action));
    // GUE over IPv4 with a 24-byte inner IPv4 header: 1500 - 28 - 24 - 20.
    check_steered(&r.out, v4(addrs::PEER_A_V4), true, &sent, 1428);
}

#[test]
fn mss_clamp_cases() {
    let Some(mut b) = bed("mss_clamp_cases") else {
        return;
    };
    only_peer(
        &mut b.h,
        peer(v4(addrs::PEER_A_V4), ENCAP_GUE, 1_000_000, 1000, 1),
    );
    let cases: Vec<(&str, Tcp, Option<u16>)> = vec![
        (
            "small MSS kept",
            Tcp::syn(49_000, PORT).mss(1200),
            Some(1200),
        ),
        ("no MSS option", Tcp::syn(49_001, PORT).no_options(), None),
        (
            "MSS after one NOP (odd offset)",
            Tcp::syn(49_002, PORT)
                .no_options()
                .option(etherparse::TcpOptionElement::Noop)
                .option(etherparse::TcpOptionElement::MaximumSegmentSize(9000))
                .option(etherparse::TcpOptionElement::Noop)
                .option(etherparse::TcpOptionElement::Noop)
                .option(etherparse::TcpOptionElement::Noop),
            Some(1432),
        ),
        (
            "MSS after timestamps",
            Tcp::syn(49_003, PORT)
                .no_options()
                .option(etherparse::TcpOptionElement::Timestamp(7, 0))
                .option(etherparse::TcpOptionElement::MaximumSegmentSize(8960)),
            Some(1432),
        ),
    ];
    for (name, tcp, want) in cases {
        let sent = Ipv4::new(CLIENT_V4, SERVICE_V4).tcp(&tcp);
        let r = b.h.run(&sent.frame()).unwrap();
        assert!(is_sent(r.action), "{name}");
        let p = parse_frame(&r.out, DEFAULT_GUE_PORT).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(p.mss(), want, "{name}");
    }
    // A smaller path MTU clamps harder.
    let mut small = peer(v4(addrs::PEER_A_V4), ENCAP_IPIP, 1000, 10, 2);
    small.mtu = 1280;
    only_peer(&mut b.h, small);
    let sent = Ipv4::new(CLIENT_V4, SERVICE_V4).tcp(&Tcp::syn(49_010, PORT));
    let r = b.h.run(&sent.frame()).unwrap();
    check_steered(&r.out, v4(addrs::PEER_A_V4), false, &sent, 1280 - 60);
}

#[test]
fn unresolved_next_hop_keeps_the_connection_local() {
    let Some(mut b) = bed("unresolved_next_hop_keeps_the_connection_local") else {
        return;
    };
    only_peer(
        &mut b.h,
        peer(v4(addrs::PEER_UNRESOLVED_V4), ENCAP_GUE, 1000, 10, 1),
    );
    let pkt = packet::syn_v4(CLIENT_V4, svc4(), 50_000);
    let r = b.h.run(&pkt).unwrap();
    assert_eq!(r.action, action::PASS);
    assert_eq!(r.out, pkt);
    assert_eq!(b.h.global_stats().unwrap().fib_no_neigh, 1);
    let key = flow_key(v4(CLIENT_V4), 50_000, v4(SERVICE_V4), PORT);
    assert_eq!(b.h.flow(&key).unwrap().unwrap().decision, DECISION_LOCAL);
    // A peer with no route at all.
    only_peer(
        &mut b.h,
        peer(v4(Ipv4Addr::new(192, 0, 2, 99)), ENCAP_GUE, 1000, 10, 2),
    );
    let r = b.h.run(&packet::syn_v4(CLIENT_V4, svc4(), 50_001)).unwrap();
    assert_eq!(r.action, action::PASS);
    assert_eq!(b.h.global_stats().unwrap().fib_failed, 1);
}

#[test]
fn decapsulation_allowed_and_refused() {
    let Some(mut b) = bed("decapsulation_allowed_and_refused") else {
        return;
    };
    b.h.enable_decap(DEFAULT_GUE_PORT).unwrap();
    let edge_mac_frame_inner = |inner: &packet::IpPacket| Eth::default().frame(inner);
    let inner4 = packet::syn_v4_packet(CLIENT_V4, svc4(), 51_000);
    let inner6 = packet::syn_v6_packet(CLIENT_V6, svc6(), 51_001);
    let sender4 = v4(addrs::PEER_A_V4);
    let sender6 = v6(addrs::PEER_A_V6);
    let cases = [
        (
            packet::gue(sender4, v4(addrs::EDGE_V4), 50_000, &inner4),
            &inner4,
        ),
        (packet::ipip(sender4, v4(addrs::EDGE_V4), &inner4), &inner4),
        (
            packet::gue(sender6, v6(addrs::EDGE_V6), 50_000, &inner6),
            &inner6,
        ),
        (packet::ipip(sender6, v6(addrs::EDGE_V6), &inner6), &inner6),
        (
            Ip::new(sender4, v4(addrs::EDGE_V4)).encap(&inner6).frame(),
            &inner6,
        ),
        (
            Ip::new(sender6, v6(addrs::EDGE_V6))
                .gue(1, DEFAULT_GUE_PORT, &inner4)
                .frame(),
            &inner4,
        ),
    ];
    // Refused: nobody is on the allow-list yet.
    for (i, (pkt, _)) in cases.iter().enumerate() {
        assert_eq!(
            b.h.run(pkt).unwrap().action,
            action::DROP,
            "case {i} from a stranger"
        );
    }
    assert_eq!(b.h.global_stats().unwrap().decap_denied, cases.len() as u64);
    b.h.allow_decap(sender4).unwrap();
    b.h.allow_decap(sender6).unwrap();
    for (i, (pkt, inner)) in cases.iter().enumerate() {
        let r = b.h.run(pkt).unwrap();
        assert_eq!(r.action, action::PASS, "case {i}");
        assert_eq!(
            r.out,
            edge_mac_frame_inner(inner),
            "case {i}: exactly the inner packet"
        );
    }
    let g = b.h.global_stats().unwrap();
    assert_eq!(g.decap_pkts, cases.len() as u64);
    // Not for us: another GUE port, another destination.
    let other_port = Ip::new(sender4, v4(addrs::EDGE_V4))
        .gue(1, 7777, &inner4)
        .frame();
    let other_dst = packet::ipip(sender4, v4(Ipv4Addr::new(10, 99, 0, 50)), &inner4);
    for pkt in [other_port, other_dst] {
        let r = b.h.run(&pkt).unwrap();
        assert_eq!((r.action, r.out == pkt), (action::PASS, true));
    }
    // Decapsulated packets are never steered again (no loops), even to a steered service.
    let r = b.h.run(&cases[0].0).unwrap();
    assert_eq!(r.action, action::PASS);
    assert_eq!(b.h.service_stats(0).unwrap().syn_steered, 0);
}

#[test]
fn flood_guard_per_source_and_per_v6_prefix() {
    let Some(mut b) = bed("flood_guard_per_source_and_per_v6_prefix") else {
        return;
    };
    let mut conf = steer_service(1_000_000, 1_000, RING);
    (conf.guard_interval_ns, conf.guard_burst_ns) = gcra(1, 3);
    b.h.set_service_conf(0, conf).unwrap();
    let mut drops = 0;
    for sport in 0..5u16 {
        let r =
            b.h.run(&packet::syn_v4(CLIENT_V4, svc4(), 52_000 + sport))
                .unwrap();
        if r.action == action::DROP {
            drops += 1;
        }
    }
    assert_eq!(drops, 2, "burst 3 per source");
    // Another source is unaffected.
    let other = Ipv4Addr::new(198, 51, 100, 8);
    assert_eq!(
        b.h.run(&packet::syn_v4(other, svc4(), 52_100))
            .unwrap()
            .action,
        action::PASS
    );
    // IPv6: the whole /64 shares one bucket; another /64 does not.
    let same64 = |last: u16| std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, last);
    let mut v6_drops = 0;
    for i in 0..5u16 {
        let r =
            b.h.run(&packet::syn_v6(same64(100 + i), svc6(), 52_200 + i))
                .unwrap();
        v6_drops += u32::from(r.action == action::DROP);
    }
    assert_eq!(v6_drops, 2);
    let other64 = std::net::Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1);
    assert_eq!(
        b.h.run(&packet::syn_v6(other64, svc6(), 52_300))
            .unwrap()
            .action,
        action::PASS
    );
    // Established packets are not limited.
    assert_eq!(
        b.h.run(&packet::ack_v4(CLIENT_V4, svc4(), 52_000))
            .unwrap()
            .action,
        action::PASS
    );
    assert_eq!(b.h.service_stats(0).unwrap().guard_drops, 4);
}

#[test]
fn flow_ceiling_stops_inserts_but_serves_locally() {
    let Some(mut b) = bed("flow_ceiling_stops_inserts_but_serves_locally") else {
        return;
    };
    two_peers(&mut b.h);
    b.h.set_config(Config {
        flow_ceiling: 3,
        ..Config::default()
    })
    .unwrap();
    for sport in 0..6u16 {
        let r =
            b.h.run(&packet::syn_v4(CLIENT_V4, svc4(), 53_000 + sport))
                .unwrap();
        if sport < 3 {
            assert!(is_sent(r.action), "under the ceiling: steered");
        } else {
            assert_eq!(r.action, action::PASS, "over the ceiling: local, no entry");
        }
    }
    assert_eq!(
        b.h.flow_count().unwrap(),
        3,
        "no entry inserted above the ceiling"
    );
    assert_eq!(b.h.service_stats(0).unwrap().ceiling_hits, 3);
    // Established flows are untouched by the flood.
    assert!(is_sent(
        b.h.run(&packet::ack_v4(CLIENT_V4, svc4(), 53_000))
            .unwrap()
            .action
    ));
}

#[test]
fn mode_off_serves_everything_locally_without_state() {
    let Some(mut b) = bed("mode_off_serves_everything_locally_without_state") else {
        return;
    };
    two_peers(&mut b.h);
    b.h.set_service_conf(
        0,
        ServiceConf {
            flags: SVC_ACTIVE,
            ..ServiceConf::default()
        },
    )
    .unwrap();
    for sport in 0..3u16 {
        let r =
            b.h.run(&packet::syn_v4(CLIENT_V4, svc4(), 54_000 + sport))
                .unwrap();
        assert_eq!(r.action, action::PASS);
    }
    assert_eq!(b.h.flow_count().unwrap(), 0);
    let s = b.h.service_stats(0).unwrap();
    assert_eq!((s.pkts_local, s.syn_steered), (3, 0));
}

/// A SYN on a 5-tuple whose earlier connection was established is a new connection on a
/// reused port (clients wrap their port range within seconds during a crowd): it is admitted
/// or steered afresh and counted, while a retransmitted SYN of a connection not yet
/// established still follows its first decision.
#[test]
fn a_reused_port_is_a_new_connection_and_a_retransmitted_syn_is_not() {
    let Some(mut b) = bed("a_reused_port_is_a_new_connection") else {
        return;
    };
    // One local token, then overflow to the only peer.
    b.h.set_service_conf(0, steer_service(1, 1, RING)).unwrap();
    only_peer(
        &mut b.h,
        peer(v4(addrs::PEER_A_V4), ENCAP_GUE, 1000, 100, 1),
    );
    let key = flow_key(v4(CLIENT_V4), 45_000, v4(SERVICE_V4), PORT);
    let syn = packet::syn_v4(CLIENT_V4, svc4(), 45_000);
    assert_eq!(
        b.h.run(&syn).unwrap().action,
        action::PASS,
        "admitted locally"
    );
    let first = b.h.flow(&key).unwrap().unwrap();
    assert_eq!((first.decision, first.flags), (DECISION_LOCAL, 0));
    // Retransmitted before anything else: same decision, not a new connection.
    assert_eq!(b.h.run(&syn).unwrap().action, action::PASS);
    let s = b.h.service_stats(0).unwrap();
    assert_eq!((s.syn_local, s.syn_steered, s.kept_local), (1, 0, 0));
    // The handshake completes, the connection lives and closes.
    assert_eq!(
        b.h.run(&packet::ack_v4(CLIENT_V4, svc4(), 45_000))
            .unwrap()
            .action,
        action::PASS
    );
    assert_eq!(b.h.flow(&key).unwrap().unwrap().flags, FLOW_ESTABLISHED);
    // The client reuses the port: the local bucket is empty now, so this connection is
    // overflow and goes to the peer, counted like any new connection.
    let r = b.h.run(&syn).unwrap();
    assert!(is_sent(r.action), "steered afresh: {}", r.action);
    let s = b.h.service_stats(0).unwrap();
    assert_eq!((s.syn_local, s.syn_steered), (1, 1));
    assert_eq!(b.h.peer_stats(0).unwrap().connections, 1);
    let again = b.h.flow(&key).unwrap().unwrap();
    assert_eq!((again.decision, again.flags), (DECISION_STEERED, 0));
    // Its own retransmission follows the new decision without counting again.
    assert!(is_sent(b.h.run(&syn).unwrap().action));
    assert_eq!(b.h.peer_stats(0).unwrap().connections, 1);
}
