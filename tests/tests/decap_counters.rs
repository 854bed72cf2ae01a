//! Per-sender decapsulation counters (`DECAP_ALLOW`, schema 3): what a peer counts for each
//! allowed sender, that it is the primary's measure (a primary's `PEER_STATS` bytes for a
//! packet equal the peer's count for the packet the primary produced), and that pins of the
//! previous schema are refused with the fix rather than misread.
//!
//! Privileged (root, or CAP_BPF + CAP_NET_ADMIN); they fail under `CI=true` without
//! privileges. Run one at a time (`--test-threads=1`), like every privileged test.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4, SocketAddrV6},
    process::Output,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuHashMap};
use p2pcdn_tests::{
    harness::{
        Harness, HarnessNs, action, addrs, fixture_addrs::*, peer, service_key, steer_service, v4,
        v6,
    },
    netns::Testbed,
    packet::{self, Eth, Ip, IpPacket, Ipv4, Tcp},
    privilege::{require_netns_admin, require_root},
    redirector::{Redirector, binary},
};
use redirector_ebpf::{
    AddrKey, CONFIG_DECAP_V4, CONFIG_DECAP_V6, Config, DEFAULT_GUE_PORT, ENCAP_GUE, ENCAP_IPIP,
    Meta, SCHEMA_VERSION, map_names,
};

const PORT: u16 = 443;
const RING: u32 = 13;

fn svc4() -> SocketAddrV4 {
    SocketAddrV4::new(SERVICE_V4, PORT)
}
fn svc6() -> SocketAddrV6 {
    SocketAddrV6::new(SERVICE_V6, PORT, 0, 0)
}

fn counts(h: &Harness, sender: IpAddr) -> (u64, u64) {
    let s = h
        .decap_stats(sender)
        .unwrap()
        .unwrap_or_else(|| panic!("{sender} is not on the allow-list"));
    (s.pkts, s.bytes)
}

/// Each allowed sender gets its own packets and inner bytes, over every tunnel form (GUE and
/// IP in IP, IPv4 and IPv6 outer, either inner family, a VLAN tag); strangers, packets that
/// are not decapsulated, and denied senders are counted for nobody; allowing again starts
/// from zero. The global counters stay the sum.
#[test]
fn each_allowed_sender_is_counted_apart() {
    if !require_root("each_allowed_sender_is_counted_apart") {
        return;
    }
    let _ns = HarnessNs::enter().unwrap();
    let mut h = Harness::load(4096).unwrap();
    h.enable_decap(DEFAULT_GUE_PORT).unwrap();
    let a4 = v4(addrs::PEER_A_V4);
    let b4 = v4(addrs::PEER_B_V4);
    let a6 = v6(addrs::PEER_A_V6);
    let stranger = v4(Ipv4Addr::new(10, 99, 0, 77));
    let edge4 = v4(addrs::EDGE_V4);
    let edge6 = v6(addrs::EDGE_V6);
    for sender in [a4, b4, a6] {
        h.allow_decap(sender).unwrap();
        assert_eq!(counts(&h, sender), (0, 0), "{sender} starts at zero");
    }

    let syn4 = packet::syn_v4_packet(CLIENT_V4, svc4(), 52_000);
    let data4 = Ipv4::new(CLIENT_V4, SERVICE_V4).tcp(&Tcp::data(52_000, PORT, &[0x41; 900]));
    let syn6 = packet::syn_v6_packet(CLIENT_V6, svc6(), 52_001);
    let tagged = |p: &IpPacket| Eth::default().vlan(42).frame(p);
    // (sender, frame, inner packet)
    let frames: Vec<(IpAddr, Vec<u8>, &IpPacket)> = vec![
        (a4, packet::gue(a4, edge4, 50_000, &syn4), &syn4),
        (a4, packet::gue(a4, edge4, 50_000, &data4), &data4),
        (a4, packet::ipip(a4, edge4, &data4), &data4),
        (a4, Ip::new(a4, edge4).encap(&syn6).frame(), &syn6), // 6in4
        (b4, packet::ipip(b4, edge4, &syn4), &syn4),
        (
            b4,
            tagged(&Ip::new(b4, edge4).gue(50_001, DEFAULT_GUE_PORT, &data4)),
            &data4,
        ),
        (a6, packet::gue(a6, edge6, 50_002, &syn6), &syn6),
        (a6, packet::ipip(a6, edge6, &syn6), &syn6), // IP6IP6
        (a6, Ip::new(a6, edge6).encap(&data4).frame(), &data4), // 4in6
    ];
    let mut want = std::collections::BTreeMap::<IpAddr, (u64, u64)>::new();
    for (i, (sender, frame, inner)) in frames.iter().enumerate() {
        let r = h.run(frame).unwrap();
        assert_eq!(r.action, action::PASS, "frame {i} from {sender}");
        let e = want.entry(*sender).or_default();
        e.0 += 1;
        e.1 += inner.bytes().len() as u64;
    }
    for (sender, w) in &want {
        assert_eq!(
            counts(&h, *sender),
            *w,
            "{sender}: packets and inner IP bytes (no outer headers, no Ethernet)"
        );
    }
    let g = h.global_stats().unwrap();
    let total = want
        .values()
        .fold((0, 0), |(p, b), (wp, wb)| (p + wp, b + wb));
    assert_eq!(
        (g.decap_pkts, g.decap_bytes),
        total,
        "globals are the per-sender sum"
    );

    // Counted for nobody: a stranger (dropped), a tunnel that is not decapsulated (IPIP
    // announcing IPv4 but carrying IPv6: unparsed), a frame to another GUE port (passed).
    let r = h.run(&packet::gue(stranger, edge4, 50_000, &syn4)).unwrap();
    assert_eq!(r.action, action::DROP);
    assert_eq!(h.decap_stats(stranger).unwrap(), None);
    let mut bad = packet::ipip(a4, edge4, &syn4);
    // The inner version nibble (after 14 bytes of Ethernet and 20 of outer IPv4) says 6.
    bad[34] = 0x60 | (bad[34] & 0x0f);
    assert_eq!(h.run(&bad).unwrap().action, action::PASS);
    let other_port = Ip::new(a4, edge4).gue(1, 7777, &syn4).frame();
    assert_eq!(h.run(&other_port).unwrap().action, action::PASS);
    assert_eq!(counts(&h, a4), want[&a4], "nothing added for {a4}");
    let g = h.global_stats().unwrap();
    assert_eq!((g.decap_pkts, g.decap_bytes), total);
    assert_eq!((g.decap_denied, g.unparsed), (1, 1));

    // Denied: its counters go, its packets are dropped and counted as denied only.
    h.deny_decap(b4).unwrap();
    assert_eq!(h.decap_stats(b4).unwrap(), None);
    let r = h.run(&packet::ipip(b4, edge4, &syn4)).unwrap();
    assert_eq!(r.action, action::DROP);
    assert_eq!(h.global_stats().unwrap().decap_denied, 2);
    assert_eq!(h.decap_stats(b4).unwrap(), None);
    h.allow_decap(b4).unwrap();
    assert_eq!(counts(&h, b4), (0, 0), "allowed again: from zero");
    assert_eq!(counts(&h, a6), want[&a6], "other senders untouched");
}

/// Bytes and packets the primary counts for a peer (`PEER_STATS`, steer path) equal what the
/// peer counts for the primary's tunnel source (decap path) for the very packets the primary
/// produced, for every encapsulation and client family, with IPv4 options, a VLAN tag,
/// Ethernet padding and a clamped SYN; and both equal the client packets' IP lengths.
#[test]
fn primary_and_peer_count_the_same_bytes_for_the_same_packets() {
    if !require_root("primary_and_peer_count_the_same_bytes_for_the_same_packets") {
        return;
    }
    let ns = HarnessNs::enter().unwrap();
    // The primary: every SYN is overflow, its only peer in slot 0.
    let mut primary = Harness::load(4096).unwrap();
    primary
        .add_service(
            0,
            &[
                service_key(v4(SERVICE_V4), PORT),
                service_key(v6(SERVICE_V6), PORT),
            ],
            steer_service(0, 0, RING),
        )
        .unwrap();
    primary.set_ingress(Some(ns.veth0));
    // The peer: decapsulates to the primary's peer addresses, allows the primary's sources.
    let mut peer_node = Harness::load(1024).unwrap();
    peer_node
        .set_config(Config {
            flags: CONFIG_DECAP_V4 | CONFIG_DECAP_V6,
            gue_port_be: DEFAULT_GUE_PORT.to_be(),
            decap_v4: addrs::PEER_A_V4.octets(),
            decap_v6: addrs::PEER_A_V6.octets(),
            ..Config::default()
        })
        .unwrap();
    peer_node.allow_decap(v4(addrs::EDGE_V4)).unwrap();
    peer_node.allow_decap(v6(addrs::EDGE_V6)).unwrap();

    let variants = [
        ("GUE over IPv4", v4(addrs::PEER_A_V4), ENCAP_GUE),
        ("IPIP over IPv4", v4(addrs::PEER_A_V4), ENCAP_IPIP),
        ("GUE over IPv6", v6(addrs::PEER_A_V6), ENCAP_GUE),
        ("IP in IPv6", v6(addrs::PEER_A_V6), ENCAP_IPIP),
    ];
    let mut generation = 0;
    let mut sport = 53_000u16;
    for (name, peer_addr, encap) in variants {
        generation += 1;
        primary
            .set_peer(0, peer(peer_addr, encap, 1_000_000, 1_000, generation))
            .unwrap();
        primary.fill_ring(0, RING, &[0]).unwrap();
        let tunnel_src = match peer_addr {
            IpAddr::V4(_) => v4(addrs::EDGE_V4),
            IpAddr::V6(_) => v6(addrs::EDGE_V6),
        };
        let sent_before = primary.peer_stats(0).unwrap();
        let got_before = peer_node.decap_stats(tunnel_src).unwrap().unwrap();

        // Client frames of two connections (IPv4 and IPv6), as the primary receives them.
        let (s4, s6) = (sport, sport + 1);
        sport += 2;
        let v4_conn = Ipv4::new(CLIENT_V4, SERVICE_V4);
        let syn4 = v4_conn
            .clone()
            .options(&[0x94, 0x04, 0x00, 0x00])
            .tcp(&Tcp::syn(s4, PORT));
        let data4 = v4_conn.tcp(&Tcp::data(s4, PORT, &[0x42; 1000]));
        let ack4 = v4_conn.tcp(&Tcp::handshake_ack(s4, PORT));
        let syn6 = packet::syn_v6_packet(CLIENT_V6, svc6(), s6);
        let data6 = Ip::new(v6(CLIENT_V6), v6(SERVICE_V6)).tcp(&Tcp::data(s6, PORT, &[7; 333]));
        let mut padded_ack4 = ack4.frame();
        // 54 bytes on the wire become 60: Ethernet pads short frames; the IP length does not
        // include the padding, and neither side may count it.
        padded_ack4.resize(60, 0);
        let frames: Vec<(Vec<u8>, &IpPacket)> = vec![
            (syn4.frame(), &syn4),
            (Eth::default().vlan(7).frame(&data4), &data4),
            (padded_ack4, &ack4),
            (syn6.frame(), &syn6),
            (data6.frame(), &data6),
            (data4.frame(), &data4),
        ];
        let mut client_bytes = 0u64;
        for (i, (frame, client)) in frames.iter().enumerate() {
            let steered = primary.run(frame).unwrap();
            assert!(
                steered.action == action::TX || steered.action == action::REDIRECT,
                "{name}, frame {i}: steered, got action {}",
                steered.action
            );
            let arrived = peer_node.run(&steered.out).unwrap();
            assert_eq!(
                arrived.action,
                action::PASS,
                "{name}, frame {i}: decapsulated"
            );
            // What reaches the peer's stack is the client's IP packet (the SYN's MSS
            // option clamped, same length), behind the primary's Ethernet header.
            let l2 = if i == 1 { 18 } else { 14 };
            let inner = &arrived.out[l2..l2 + client.bytes().len()];
            if i != 0 && i != 3 {
                assert_eq!(
                    inner,
                    client.bytes(),
                    "{name}, frame {i}: the client packet"
                );
            }
            client_bytes += client.bytes().len() as u64;
        }
        let sent = primary.peer_stats(0).unwrap();
        let got = peer_node.decap_stats(tunnel_src).unwrap().unwrap();
        let sent = (
            sent.packets - sent_before.packets,
            sent.bytes - sent_before.bytes,
        );
        let got = (got.pkts - got_before.pkts, got.bytes - got_before.bytes);
        assert_eq!(
            got, sent,
            "{name}: the peer's count for {tunnel_src} equals the primary's PEER_STATS"
        );
        assert_eq!(
            sent,
            (frames.len() as u64, client_bytes),
            "{name}: both count the client IP packets (no Ethernet, padding or tunnel)"
        );
    }
}

fn one_line_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn set_schema(dir: &std::path::Path, version: u32) {
    let data = MapData::from_pin(dir.join(map_names::META)).unwrap();
    let mut meta: Array<MapData, Meta> = Map::from_map_data(data).unwrap().try_into().unwrap();
    let mut value = meta.get(&0, 0).unwrap();
    value.schema_version = version;
    meta.set(0, value, 0).unwrap();
}

/// Replaces the pinned `DECAP_ALLOW` with a plain hash of `u32` holding `sender`: the
/// schema 2 allow-list.
fn pin_schema2_decap_allow(dir: &std::path::Path, sender: Ipv4Addr) {
    let path = dir.join(map_names::DECAP_ALLOW);
    std::fs::remove_file(&path).unwrap();
    let mut map = HashMap::<MapData, AddrKey, u32>::create(4096, 0).unwrap();
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&sender.octets());
    let key = AddrKey {
        addr,
        family: 4,
        _pad0: [0; 3],
    };
    map.insert(key, 1, 0).unwrap();
    map.pin(&path).unwrap();
}

/// Pins of schema 2 (`DECAP_ALLOW` a plain hash of `u32`) are refused by `attach --upgrade`
/// and every other command with one line saying the versions and the fix, and the running
/// program is left alone; under this build's version number the old map is refused by the
/// map checks too (its type; a per-CPU hash of `u32`, its value size), never read as counters. `detach` then `attach` recovers,
/// and the CLI shows the counters in `decap list` and `stats --json`.
#[test]
fn pins_of_the_previous_schema_are_refused_with_the_fix() {
    if !require_netns_admin("pins_of_the_previous_schema_are_refused_with_the_fix") {
        return;
    }
    let testbed = Testbed::builder()
        .host("node")
        .build()
        .unwrap_or_else(|e| panic!("testbed: {e}"));
    let host = testbed.host("node").clone();
    let cli = Redirector::for_host(&binary().unwrap_or_else(|e| panic!("{e}")), &host);
    let dir = redirector_user::pin_dir(&host.pin_root, &host.iface);
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&cli.run(&all).unwrap_or_else(|e| panic!("{e}"))).unwrap()
    };
    let xdp_on_iface = || {
        let out = host.run("ip", &["link", "show", &host.iface]).unwrap();
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    };

    assert_eq!(json(&["attach"])["outcome"], "attached");
    let sender = Ipv4Addr::new(10, 0, 0, 5);
    json(&["decap", "allow", &sender.to_string()]);
    assert_eq!(
        json(&["decap", "list"]),
        serde_json::json!([{"addr": "10.0.0.5", "packets": 0, "bytes": 0}])
    );
    let text = cli.run(&["decap", "list"]).unwrap();
    assert!(
        text.contains("SENDER") && text.contains("BYTES") && text.contains("10.0.0.5"),
        "{text}"
    );

    // What the previous release left pinned: schema 2, DECAP_ALLOW a hash of u32.
    pin_schema2_decap_allow(&dir, sender);
    set_schema(&dir, 2);
    for args in [&["attach", "--upgrade"][..], &["decap", "list"], &["stats"]] {
        let out = cli.output(args).unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let line = one_line_error(&out);
        assert!(
            line.contains("schema version 2")
                && line.contains(&format!("this build uses {SCHEMA_VERSION}"))
                && line.contains("detach")
                && line.contains("attach"),
            "{args:?}: {line}"
        );
    }
    assert!(
        xdp_on_iface(),
        "a refused upgrade leaves the program attached"
    );

    // The version forced to this build's: the map itself is refused, by its type (the
    // schema 2 map), or by its value size (a per-CPU hash of the old values).
    set_schema(&dir, SCHEMA_VERSION);
    let out = cli.output(&["attach", "--upgrade"]).unwrap();
    assert_eq!(out.status.code(), Some(64));
    let line = one_line_error(&out);
    assert!(
        line.contains("DECAP_ALLOW") && line.contains("type Hash instead of PerCpuHash"),
        "{line}"
    );
    let path = dir.join(map_names::DECAP_ALLOW);
    std::fs::remove_file(&path).unwrap();
    PerCpuHashMap::<MapData, AddrKey, u32>::create(4096, 0)
        .unwrap()
        .pin(&path)
        .unwrap();
    let out = cli.output(&["stats"]).unwrap();
    assert_eq!(out.status.code(), Some(64));
    let line = one_line_error(&out);
    assert!(
        line.contains("DECAP_ALLOW") && line.contains("value size 4 instead of 16"),
        "{line}"
    );
    assert!(xdp_on_iface(), "still attached");

    // The documented way out.
    json(&["detach"]);
    assert_eq!(json(&["attach"])["outcome"], "attached");
    assert_eq!(json(&["decap", "list"]), serde_json::json!([]));
    json(&["decap", "allow", &sender.to_string()]);
    let stats = cli.stats().unwrap_or_else(|e| panic!("{e}"));
    let from = stats
        .decap_from(IpAddr::V4(sender))
        .expect("listed in stats");
    assert_eq!((from.packets, from.bytes), (0, 0));
    json(&["detach"]);
}
