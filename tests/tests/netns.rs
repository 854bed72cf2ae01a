//! Network-namespace integration tests: the real `p2pcdn-redirector` CLI and XDP program
//! between a client, an edge and peer servers on one bridged segment.
//!
//! Privileged (root, or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN); they fail under `CI=true`
//! without privileges. They share kernel state (bpffs, module settings), so each takes a
//! lock and they run one at a time even without `--test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use p2pcdn_tests::{
    http::{Client, KeptId, LoadPlan, Server},
    netns::{Testbed, UdpSink, netns_path},
    privilege::require_netns_admin,
    redirector::{ServiceStats, Stats},
    scenario::{
        EDGE, Encap, Outer, SERVICE, SERVICE_V4, Scenario, ScenarioConfig, service_v4, service_v6,
    },
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The testbed itself, without XDP: a client reaches a server's loopback service address
/// through a route, over IPv4 and IPv6, keep-alive connections carry later requests, and
/// every namespace is gone after drop.
#[test]
fn testbed_carries_http_and_is_torn_down() {
    if !require_netns_admin("testbed_carries_http_and_is_torn_down") {
        return;
    }
    let _serial = serial();
    let service = Ipv4Addr::new(10, 99, 100, 1);
    let testbed = Testbed::builder()
        .host("client")
        .host_with_loopback("server", &[IpAddr::V4(service)])
        .build()
        .unwrap_or_else(|e| panic!("testbed: {e}"));
    let namespaces: Vec<String> = testbed
        .hosts
        .iter()
        .map(|h| h.ns.clone())
        .chain([testbed.switch_ns.clone()])
        .collect();
    for ns in &namespaces {
        assert!(netns_path(ns).exists(), "{ns} missing");
    }
    let server_host = testbed.host("server").clone();
    testbed
        .route("client", "10.99.100.1/32", server_host.v4.into())
        .unwrap_or_else(|e| panic!("route: {e}"));
    {
        let server = Server::start(
            &server_host.ns,
            "server",
            &[
                SocketAddr::new(service.into(), 80),
                SocketAddr::new(server_host.v6.into(), 80),
            ],
        )
        .unwrap_or_else(|e| panic!("server: {e}"));
        let client =
            Client::start(&testbed.host("client").ns).unwrap_or_else(|e| panic!("client: {e}"));

        let plan = LoadPlan::new(
            SocketAddr::new(service.into(), 80),
            40,
            Duration::from_millis(400),
        )
        .keep_per_server(3);
        let mut seen = 0;
        let report = client
            .load(plan, |_| seen += 1)
            .unwrap_or_else(|e| panic!("load: {e}"));
        assert_eq!(seen, 40, "progress reported every connection");
        assert!(report.errors().is_empty(), "errors: {:?}", report.errors());
        assert_eq!(report.count("server"), 40);
        assert_eq!(server.accepted(), 40);
        assert!(
            report.elapsed >= Duration::from_millis(390),
            "open loop paced over 400 ms, took {:?}",
            report.elapsed
        );

        let kept = report.kept();
        assert_eq!(kept.len(), 3, "{kept:?}");
        let ids: Vec<_> = kept.iter().map(|(id, _)| *id).collect();
        let again = client
            .reuse(&ids, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("reuse: {e}"));
        assert!(
            again.iter().all(|o| o.result.as_deref() == Ok("server")),
            "{again:?}"
        );
        assert_eq!(server.accepted(), 40, "reuses opened no connection");
        assert_eq!(server.requests(), 43);

        let v6 = client
            .load(
                LoadPlan::new(
                    SocketAddr::new(server_host.v6.into(), 80),
                    10,
                    Duration::from_millis(100),
                ),
                |_| {},
            )
            .unwrap_or_else(|e| panic!("load: {e}"));
        assert_eq!(v6.count("server"), 10, "{:?}", v6.errors());

        // Nothing but the testbed is reachable: no default route.
        let unreachable = client
            .load(
                LoadPlan::new(
                    "10.99.200.1:80".parse().unwrap_or_else(|e| panic!("{e}")),
                    1,
                    Duration::ZERO,
                ),
                |_| {},
            )
            .unwrap_or_else(|e| panic!("load: {e}"));
        let error = unreachable.errors().first().map(|o| o.result.clone());
        assert!(
            matches!(&error, Some(Err(e)) if e.contains("unreachable")),
            "{error:?}"
        );
    }
    drop(testbed);
    for ns in &namespaces {
        assert!(!netns_path(ns).exists(), "{ns} left behind");
    }
}

/// A test that panics with a testbed up leaves nothing behind: namespaces and pins go while
/// the panic unwinds.
#[test]
fn testbed_is_torn_down_when_a_test_panics() {
    if !require_netns_admin("testbed_is_torn_down_when_a_test_panics") {
        return;
    }
    let _serial = serial();
    let created: std::sync::Arc<Mutex<Vec<std::path::PathBuf>>> = std::sync::Arc::default();
    let seen = std::sync::Arc::clone(&created);
    let outcome = std::panic::catch_unwind(move || {
        let testbed = Testbed::builder()
            .host("a")
            .host("b")
            .build()
            .unwrap_or_else(|e| panic!("testbed: {e}"));
        std::fs::create_dir_all(&testbed.host("a").pin_root)
            .unwrap_or_else(|e| panic!("pin root: {e}"));
        let mut paths: Vec<std::path::PathBuf> =
            testbed.hosts.iter().map(|h| h.ns_path()).collect();
        paths.push(netns_path(&testbed.switch_ns));
        paths.push(testbed.pin_base().to_owned());
        assert!(paths.iter().all(|p| p.exists()), "{paths:?}");
        *seen.lock().unwrap_or_else(|p| p.into_inner()) = paths;
        panic!("deliberate failure with the testbed up");
    });
    assert!(outcome.is_err());
    let paths = created.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(paths.len(), 4);
    for path in paths {
        assert!(!path.exists(), "{} left behind", path.display());
    }
}

/// Counter deltas between two `stats --json` snapshots.
fn service_delta(before: &Stats, after: &Stats) -> ServiceStats {
    let b = before.service(SERVICE).cloned().unwrap_or_default();
    let a = after
        .service(SERVICE)
        .cloned()
        .unwrap_or_else(|| panic!("no service {SERVICE} in {after:?}"));
    ServiceStats {
        syn_local: a.syn_local - b.syn_local,
        syn_steered: a.syn_steered - b.syn_steered,
        kept_local: a.kept_local - b.kept_local,
        flow_misses: a.flow_misses - b.flow_misses,
        guard_drops: a.guard_drops - b.guard_drops,
        ceiling_hits: a.ceiling_hits - b.ceiling_hits,
        ..a
    }
}

fn peer_delta(before: &Stats, after: &Stats, peer: &str) -> u64 {
    after.peer_connections(peer) - before.peer_connections(peer)
}

/// The edge's counters must tell the story the client saw: every locally answered
/// connection was admitted (or kept) locally, every connection a peer answered was steered
/// to that peer.
fn check_counters(
    phase: &str,
    before: &Stats,
    after: &Stats,
    served: &BTreeMap<String, usize>,
    peers: &[&str],
) {
    let svc = service_delta(before, after);
    let count = |name: &str| served.get(name).copied().unwrap_or(0) as u64;
    let global_fallback = (after.global.fib_no_neigh - before.global.fib_no_neigh)
        + (after.global.fib_failed - before.global.fib_failed)
        + (after.global.encap_failed - before.global.encap_failed);
    assert_eq!(
        svc.syn_local + svc.kept_local,
        count(EDGE),
        "{phase}: syn_local {} + kept_local {} vs {} answered by the edge \
         (fib/encap fallbacks {global_fallback})\n{after:#?}",
        svc.syn_local,
        svc.kept_local,
        count(EDGE)
    );
    let steered: u64 = peers.iter().map(|p| count(p)).sum();
    assert_eq!(
        svc.syn_steered, steered,
        "{phase}: syn_steered vs answers from peers {served:?}\n{after:#?}"
    );
    for peer in peers {
        assert_eq!(
            peer_delta(before, after, peer),
            count(peer),
            "{phase}: connections counted for {peer} vs its answers {served:?}\n{after:#?}"
        );
    }
    assert_eq!(svc.guard_drops, 0, "{phase}: no flood guard configured");
}

/// Accounting: what the edge counted as steered to each peer (`PEER_STATS` packets and bytes)
/// equals what the peer counted as decapsulated from the edge's tunnel source, exactly (veth
/// loses nothing). Polled for a bounded time, so packets still in flight (FINs of closed
/// connections) settle on both sides first.
fn check_accounting(phase: &str, scenario: &Scenario, peers: &[(&str, IpAddr)]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let edge = scenario
            .stats(EDGE)
            .unwrap_or_else(|e| panic!("stats on {EDGE}: {e}"));
        let mut mismatches = Vec::new();
        for (name, tunnel_src) in peers {
            let sent = edge
                .peer(name)
                .map(|p| (p.packets, p.bytes))
                .unwrap_or_else(|| panic!("{phase}: no peer {name} on the edge: {edge:#?}"));
            let peer = scenario
                .stats(name)
                .unwrap_or_else(|e| panic!("stats on {name}: {e}"));
            let got = peer
                .decap_from(*tunnel_src)
                .map(|d| (d.packets, d.bytes))
                .unwrap_or_else(|| panic!("{phase}: {name} lists no sender {tunnel_src}"));
            assert!(sent.0 > 0, "{phase}: nothing steered to {name}");
            if sent != got {
                mismatches.push(format!(
                    "{name}: edge sent {} packets / {} bytes, {name} decapsulated {} / {}                      from {tunnel_src}",
                    sent.0, sent.1, got.0, got.1
                ));
            }
        }
        if mismatches.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{phase}: per-peer accounting differs: {mismatches:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn diff(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .collect()
}

fn as_u64(served: &BTreeMap<String, usize>) -> BTreeMap<String, u64> {
    served
        .iter()
        .map(|(k, v)| (k.clone(), *v as u64))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn nonzero(map: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    map.into_iter().filter(|(_, v)| *v > 0).collect()
}

/// `share` of `total` within `tolerance` (a fraction of the total, i.e. percentage points).
fn assert_share(what: &str, got: usize, total: usize, share: f64, tolerance: f64) {
    let seen = got as f64 / total.max(1) as f64;
    assert!(
        (seen - share).abs() <= tolerance,
        "{what}: {got} of {total} = {:.1} %, expected {:.1} % ± {:.0} points",
        seen * 100.0,
        share * 100.0,
        tolerance * 100.0
    );
}

/// The scenario through the real CLI and XDP program: local admission at 50 conn/s
/// with 500 connections over 2 s keeps about 100 local and spreads the rest over the peers by
/// weight; IPv6 is steered over the same IPv4 tunnels; established connections survive a
/// table change; a removed peer gets nothing new; tunnels from senders off the allow-list
/// are dropped. The edge's counters must match what the client saw.
#[test]
fn overflow_is_steered_to_peers_with_dsr() {
    if !require_netns_admin("overflow_is_steered_to_peers_with_dsr") {
        return;
    }
    let _serial = serial();
    let mut log = |line: &str| eprintln!("[setup] {line}");
    let scenario = Scenario::setup(ScenarioConfig::default(), &mut log)
        .unwrap_or_else(|e| panic!("scenario setup: {e}"));
    let client = &scenario.client;
    let stats = |host: &str| {
        scenario
            .stats(host)
            .unwrap_or_else(|e| panic!("stats on {host}: {e}"))
    };

    // Phase 1: 500 IPv4 connections over 2 s, local admission 50/s with a burst of 5.
    let before = stats("edge");
    let accepted_before = scenario.accepted();
    let report = client
        .load(
            LoadPlan::new(service_v4(), 500, Duration::from_secs(2)).keep_per_server(4),
            |_| {},
        )
        .unwrap_or_else(|e| panic!("load: {e}"));
    let after = stats("edge");
    let served = report.served_by();
    eprintln!(
        "phase 1 (IPv4, 500 over 2 s): {served:?}, p50 {:?} p99 {:?}",
        report.latency_percentile(50.0),
        report.latency_percentile(99.0)
    );
    assert!(
        report.errors().is_empty(),
        "every request answered; {} errors: {:#?}\nedge: {after:#?}\npeer1: {:#?}\npeer2: {:#?}",
        report.errors().len(),
        report.errors(),
        stats("peer1"),
        stats("peer2")
    );
    let local = report.count(EDGE);
    assert!(
        (90..=110).contains(&local),
        "about 100 served locally (50/s over 2 s), got {local}: {served:?}"
    );
    let (p1, p2) = (report.count("peer1"), report.count("peer2"));
    assert_eq!(
        local + p1 + p2,
        500,
        "only the edge and the two peers answer: {served:?}"
    );
    // Weights 1:2. Maglev over ~400 random 5-tuples: the binomial spread of peer1's share is
    // about 2.4 points, so ±10 points never fails by chance, yet an unweighted split (50 %)
    // is 17 points off.
    assert_share("peer1 of the steered", p1, p1 + p2, 1.0 / 3.0, 0.10);
    assert_eq!(
        nonzero(diff(&scenario.accepted(), &accepted_before)),
        as_u64(&served),
        "each server accepted exactly the connections it answered"
    );
    check_counters("phase 1", &before, &after, &served, &["peer1", "peer2"]);
    let p1_stats = stats("peer1");
    assert!(
        p1_stats.global.decap_pkts >= 3 * p1 as u64,
        "peer1 decapsulated at least SYN, ACK and request of each connection: {:?}",
        p1_stats.global
    );
    assert_eq!(p1_stats.global.decap_denied, 0);
    let edge_host = scenario.testbed.host(EDGE).clone();
    let (edge_v4, edge_v6) = (IpAddr::V4(edge_host.v4), IpAddr::V6(edge_host.v6));
    check_accounting(
        "phase 1",
        &scenario,
        &[("peer1", edge_v4), ("peer2", edge_v4)],
    );

    // Phase 2: IPv6 service address, steered over the same IPv4 tunnels (GUE with an inner
    // IPv6 packet to peer1, 6in4 to peer2).
    let before = stats("edge");
    let report6 = client
        .load(
            LoadPlan::new(service_v6(), 150, Duration::from_secs(1)),
            |_| {},
        )
        .unwrap_or_else(|e| panic!("load: {e}"));
    let after = stats("edge");
    let served6 = report6.served_by();
    eprintln!("phase 2 (IPv6, 150 over 1 s): {served6:?}");
    assert!(
        report6.errors().is_empty(),
        "every IPv6 request answered; first error: {:?}",
        report6.errors().first()
    );
    assert!(
        report6.count("peer1") > 0 && report6.count("peer2") > 0,
        "IPv6 reached both peers: {served6:?}"
    );
    let local6 = report6.count(EDGE);
    assert!(
        (30..=70).contains(&local6),
        "about 50 local + burst in 1 s, got {local6}: {served6:?}"
    );
    check_counters("phase 2", &before, &after, &served6, &["peer1", "peer2"]);

    // Phase 3: a table change does not move established connections.
    let kept = report.kept();
    for server in [EDGE, "peer1", "peer2"] {
        assert!(
            kept.iter().any(|(_, s)| s == server),
            "a kept connection to {server}: {kept:?}"
        );
    }
    let mut log = |line: &str| eprintln!("[phase 3] {line}");
    scenario
        .set_peer("peer1", Encap::Gue, Outer::V4, 5, &mut log)
        .unwrap_or_else(|e| panic!("{e}"));
    scenario
        .add_peer("peer3", Encap::Gue, Outer::V6, 2, &mut log)
        .unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<KeptId> = kept.iter().map(|(id, _)| *id).collect();
    let again = client
        .reuse(&ids, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("reuse: {e}"));
    for ((id, first), outcome) in kept.iter().zip(&again) {
        assert_eq!(
            outcome.result.as_deref(),
            Ok(first.as_str()),
            "kept connection {id:?} first answered by {first}"
        );
    }
    let before = stats("edge");
    let accepted_before = scenario.accepted();
    let report3 = client
        .load(
            LoadPlan::new(service_v4(), 300, Duration::from_secs(1)),
            |_| {},
        )
        .unwrap_or_else(|e| panic!("load: {e}"));
    let after = stats("edge");
    let served3 = report3.served_by();
    eprintln!("phase 3 (weights 5:2:2 with peer3 added, 300 over 1 s): {served3:?}");
    assert!(
        report3.errors().is_empty(),
        "{:?}",
        report3.errors().first()
    );
    let (q1, q2, q3) = (
        report3.count("peer1"),
        report3.count("peer2"),
        report3.count("peer3"),
    );
    assert!(q3 > 0, "the added peer gets new connections: {served3:?}");
    assert_share(
        "peer1 of the steered after 1→5",
        q1,
        q1 + q2 + q3,
        5.0 / 9.0,
        0.10,
    );
    assert_eq!(
        nonzero(diff(&scenario.accepted(), &accepted_before)),
        as_u64(&served3)
    );
    check_counters(
        "phase 3",
        &before,
        &after,
        &served3,
        &["peer1", "peer2", "peer3"],
    );

    // The IPv6 service with peer3 in the table: IPv6 inside GUE over IPv6 to peer3.
    let before = stats("edge");
    let report3v6 = client
        .load(
            LoadPlan::new(service_v6(), 150, Duration::from_secs(1)),
            |_| {},
        )
        .unwrap_or_else(|e| panic!("load: {e}"));
    let after = stats("edge");
    let served3v6 = report3v6.served_by();
    eprintln!("phase 3, IPv6 (150 over 1 s): {served3v6:?}");
    assert!(
        report3v6.errors().is_empty(),
        "{:?}",
        report3v6.errors().first()
    );
    assert!(
        report3v6.count("peer3") > 0,
        "IPv6 in GUE over IPv6 reached peer3: {served3v6:?}"
    );
    check_counters(
        "phase 3, IPv6",
        &before,
        &after,
        &served3v6,
        &["peer1", "peer2", "peer3"],
    );

    // Phase 4: a removed peer gets no new connection.
    let peer2_kept: Vec<KeptId> = kept
        .iter()
        .filter(|(_, s)| s == "peer2")
        .map(|(id, _)| *id)
        .collect();
    client
        .close(&peer2_kept)
        .unwrap_or_else(|e| panic!("close: {e}"));
    scenario
        .remove_peer("peer2", &mut |l| eprintln!("[phase 4] {l}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let accepted_before = scenario.accepted();
    let before = stats("edge");
    let report4 = client
        .load(
            LoadPlan::new(service_v4(), 200, Duration::from_secs(1)),
            |_| {},
        )
        .unwrap_or_else(|e| panic!("load: {e}"));
    let after = stats("edge");
    let served4 = report4.served_by();
    eprintln!("phase 4 (peer2 removed, 200 over 1 s): {served4:?}");
    assert!(
        report4.errors().is_empty(),
        "{:?}",
        report4.errors().first()
    );
    assert_eq!(
        report4.count("peer2"),
        0,
        "removed peer2 answered: {served4:?}"
    );
    let accepted4 = diff(&scenario.accepted(), &accepted_before);
    assert_eq!(accepted4.get("peer2"), Some(&0), "{accepted4:?}");
    assert!(
        after.peer("peer2").is_none() || peer_delta(&before, &after, "peer2") == 0,
        "no connection counted for removed peer2: {after:#?}"
    );
    let (r1, r3) = (report4.count("peer1"), report4.count("peer3"));
    assert_share(
        "peer1 of the steered without peer2",
        r1,
        r1 + r3,
        5.0 / 7.0,
        0.10,
    );
    check_counters("phase 4", &before, &after, &served4, &["peer1", "peer3"]);

    // Everything so far (IPv4 and IPv6 clients, GUE over IPv4 to peer1 and over IPv6 to
    // peer3) counted alike on both sides; the probes of phase 5 come from outside the
    // program, so this is the last point where the edge's counts tell the whole story.
    check_accounting(
        "phase 4",
        &scenario,
        &[("peer1", edge_v4), ("peer3", edge_v6)],
    );

    // Phase 5: tunnels from a sender off the allow-list are dropped; from the edge they pass.
    let probe = SocketAddrV4::new(SERVICE_V4, 9999);
    let sink1 = UdpSink::start(&scenario.testbed.host("peer1").ns, probe.into())
        .unwrap_or_else(|e| panic!("sink: {e}"));
    let sink2 = UdpSink::start(&scenario.testbed.host("peer2").ns, probe.into())
        .unwrap_or_else(|e| panic!("sink: {e}"));
    let (p1_before, p2_before) = (stats("peer1"), stats("peer2"));
    for (to, encap) in [("peer1", Encap::Gue), ("peer2", Encap::Ipip)] {
        let sent = scenario
            .send_tunnel_frames("edge", to, encap, 10, probe)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sent, 10);
        let sent = scenario
            .send_tunnel_frames("client", to, encap, 25, probe)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sent, 25);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while (sink1.received() < 10 || sink2.received() < 10) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (p1_after, p2_after) = (stats("peer1"), stats("peer2"));
    for (name, sink, b, a, encap) in [
        ("peer1", &sink1, &p1_before, &p1_after, "GUE"),
        ("peer2", &sink2, &p2_before, &p2_after, "IPIP"),
    ] {
        assert_eq!(
            sink.received(),
            10,
            "{name}: the 10 {encap} probes from the edge arrive, none of the 25 from the client"
        );
        assert_eq!(
            a.global.decap_denied - b.global.decap_denied,
            25,
            "{name}: decap_denied rises by the 25 {encap} frames the client sent"
        );
        assert_eq!(
            a.global.decap_pkts - b.global.decap_pkts,
            10,
            "{name}: decap_pkts rises by the 10 frames the edge sent"
        );
    }
    drop((sink1, sink2));

    let failures = scenario.detach_all();
    assert!(failures.is_empty(), "detach: {failures:?}");
}
