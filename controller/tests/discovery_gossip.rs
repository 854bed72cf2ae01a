//! Discovery over real UDP gossip on 127.0.0.1: nodes learn each other's signed adverts,
//! forged adverts are refused, a stopped node goes suspect then dead and its advert goes.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
    spawn_chitchat, transport::UdpTransport,
};
use p2pcdn_controller::{
    discovery::{self, ADVERT_KEY, CLUSTER_ID, Discovery, DiscoveryConfig},
    identity::NodeIdentity,
    model::now_ms,
    proto::{self, pb},
    registry::{Liveness, Registry},
    store::Store,
};
use prost::Message;

fn identity(name: &str) -> Arc<NodeIdentity> {
    Arc::new(NodeIdentity::generate(name, "Example Org", &[]).unwrap())
}

fn config(interval_ms: u64, seeds: &[SocketAddr]) -> DiscoveryConfig {
    DiscoveryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        seeds: seeds.iter().map(ToString::to_string).collect(),
        gossip_interval: Duration::from_millis(interval_ms),
        advert_ttl: Duration::from_secs(30),
        advert_refresh: Duration::from_secs(5),
        suspect_after: Duration::from_millis(interval_ms * 8),
        dead_after: Duration::from_millis(interval_ms * 24),
    }
}

/// What a daemon would advertise, minus what discovery fills in.
fn source(name: &str, control_port: u16) -> impl Fn() -> pb::Advertisement + Send + Sync + 'static {
    let name = name.to_owned();
    move || pb::Advertisement {
        name: name.clone(),
        organisation: "Example Org".into(),
        endpoints: Some(pb::Endpoints {
            control: format!("127.0.0.1:{control_port}"),
            decap_v4: "192.0.2.1".into(),
            ..Default::default()
        }),
        footprint: Some(pb::Footprint {
            regions: vec!["DE".into()],
            ..Default::default()
        }),
        modes: vec![pb::RedirectionMode::DsrGue as i32],
        spare: Some(pb::Capacity {
            new_connections_per_s: 5000,
            egress_mbps: 1000,
            storage_bytes: 1 << 30,
        }),
        ..Default::default()
    }
}

async fn node(
    name: &str,
    cfg: DiscoveryConfig,
    control_port: u16,
) -> (Arc<NodeIdentity>, Discovery) {
    let id = identity(name);
    let registry = Registry::new(id.fingerprint);
    let d = discovery::start(cfg, id.clone(), registry, source(name, control_port))
        .await
        .unwrap();
    (id, d)
}

/// Waits until `cond` holds, polling every 5 ms; panics with `what` after `limit`.
async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

/// Starts four nodes (each seeded with the first) and returns the time until every node
/// knows the three others' adverts.
async fn four_nodes(interval_ms: u64) -> (Duration, Vec<(Arc<NodeIdentity>, Discovery)>) {
    let start = Instant::now();
    let first = node("n0", config(interval_ms, &[]), 7000).await;
    let seed = first.1.gossip_addr();
    let mut nodes = vec![first];
    for i in 1..4u16 {
        nodes.push(node(&format!("n{i}"), config(interval_ms, &[seed]), 7000 + i).await);
    }
    let limit = Duration::from_millis(interval_ms * 40).max(Duration::from_secs(5));
    wait_for("four nodes to learn each other", limit, || {
        nodes.iter().all(|(_, d)| d.known() == 3)
    })
    .await;
    (start.elapsed(), nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_learn_each_others_adverts_at_50ms() {
    let (took, nodes) = four_nodes(50).await;
    println!(
        "discovery of 4 nodes at a 50 ms gossip interval: {} ms",
        took.as_millis()
    );

    let now = now_ms();
    for (i, (_, d)) in nodes.iter().enumerate() {
        let candidates = d.registry().candidates(now);
        assert_eq!(candidates.len(), 3, "node {i}");
        for (j, (id, other)) in nodes.iter().enumerate() {
            if i == j {
                assert!(candidates.iter().all(|c| c.fingerprint != id.fingerprint));
                continue;
            }
            let learned = d.registry().get(&id.fingerprint).unwrap();
            let endpoints = learned.advert.endpoints.as_ref().unwrap();
            assert_eq!(learned.advert.name, format!("n{j}"));
            assert_eq!(endpoints.control, format!("127.0.0.1:{}", 7000 + j));
            assert_eq!(endpoints.gossip, other.gossip_addr().to_string());
            assert_eq!(learned.advert.public_key, id.spki_der);
            assert!(learned.advert.expires_at_ms > now);
            assert_eq!(
                d.registry().liveness(&id.fingerprint).unwrap().0,
                Liveness::Alive
            );
        }
    }
    for (_, d) in nodes {
        d.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_learn_each_others_adverts_at_the_default_500ms() {
    let (took, nodes) = four_nodes(500).await;
    println!(
        "discovery of 4 nodes at a 500 ms gossip interval: {} ms",
        took.as_millis()
    );
    for (_, d) in nodes {
        d.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshed_adverts_replace_older_ones_and_the_registry_change_fires() {
    let mut cfg = config(50, &[]);
    cfg.advert_refresh = Duration::from_millis(300);
    cfg.advert_ttl = Duration::from_millis(2000);
    let (a_id, a) = node("a", cfg.clone(), 7100).await;
    cfg.seeds = vec![a.gossip_addr().to_string()];
    let (_, b) = node("b", cfg, 7101).await;
    wait_for("b to learn a", Duration::from_secs(5), || b.known() == 1).await;
    let first = b.registry().get(&a_id.fingerprint).unwrap().advert;

    let mut changes = b.changes();
    changes.mark_unchanged();
    wait_for("a newer advert of a at b", Duration::from_secs(5), || {
        b.registry().get(&a_id.fingerprint).unwrap().advert.sequence > first.sequence
    })
    .await;
    assert!(changes.has_changed().unwrap());
    let newer = b.registry().get(&a_id.fingerprint).unwrap().advert;
    assert!(newer.expires_at_ms > first.expires_at_ms);
    // Still known after the first advert's 2 s lifetime: refreshes keep it current.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(b.known(), 1);
    assert!(
        b.registry()
            .get(&a_id.fingerprint)
            .unwrap()
            .advert
            .expires_at_ms
            > now_ms()
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// A bare chitchat member (no p2pcdn discovery): gossips `value` under `node_id` in the
/// p2pcdn cluster, as an attacker on the gossip port could.
async fn raw_member(node_id: String, value: String, seed: SocketAddr) -> ChitchatHandle {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = ChitchatConfig {
        chitchat_id: ChitchatId::new(node_id, 1, addr),
        cluster_id: CLUSTER_ID.to_owned(),
        gossip_interval: Duration::from_millis(50),
        listen_addr: addr,
        seed_nodes: vec![seed.to_string()],
        failure_detector_config: FailureDetectorConfig::default(),
        marked_for_deletion_grace_period: Duration::from_secs(60),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V1,
    };
    spawn_chitchat(config, vec![(ADVERT_KEY.to_owned(), value)], &UdpTransport)
        .await
        .unwrap()
}

fn gossip_value(signed: &pb::SignedAdvertisement) -> String {
    BASE64.encode(signed.encode_to_vec())
}

fn advert_of(id: &NodeIdentity) -> pb::Advertisement {
    let mut ad = source("raw", 7200)();
    ad.node_id = id.fingerprint.0.to_vec();
    ad.public_key = id.spki_der.clone();
    ad.sequence = 1;
    ad.measured_at_ms = now_ms();
    ad.expires_at_ms = now_ms() + 60_000;
    ad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_adverts_are_not_accepted() {
    let (_, victim) = node("victim", config(50, &[]), 7300).await;
    let seed = victim.gossip_addr();

    // Control: a genuine advert published by a bare member under its own id is learned, so
    // the refusals below are the checks at work, not a path that never delivers.
    let honest = identity("honest");
    let honest_member = raw_member(
        honest.fingerprint.to_string(),
        gossip_value(&proto::sign_advertisement(&honest, &advert_of(&honest))),
        seed,
    )
    .await;

    // 1. Another node's genuine advert gossiped under this member's id.
    let (impostor, other) = (identity("impostor"), identity("other"));
    let m1 = raw_member(
        impostor.fingerprint.to_string(),
        gossip_value(&proto::sign_advertisement(&other, &advert_of(&other))),
        seed,
    )
    .await;
    // 2. The member's own advert with its signature altered (e.g. capacity edited by a relay).
    let tampered_id = identity("tampered");
    let mut tampered = proto::sign_advertisement(&tampered_id, &advert_of(&tampered_id));
    let mut ad = pb::Advertisement::decode(tampered.advertisement.as_slice()).unwrap();
    ad.spare.as_mut().unwrap().new_connections_per_s = 1_000_000;
    tampered.advertisement = ad.encode_to_vec();
    let m2 = raw_member(
        tampered_id.fingerprint.to_string(),
        gossip_value(&tampered),
        seed,
    )
    .await;
    // 3. An advert claiming a node id, carrying the node's public key, signed by another key.
    let (claimed, signer) = (identity("claimed"), identity("signer"));
    let bytes = advert_of(&claimed).encode_to_vec();
    let forged = pb::SignedAdvertisement {
        signature: signer.sign(proto::ADVERTISEMENT_DOMAIN, &bytes),
        advertisement: bytes,
    };
    let m3 = raw_member(claimed.fingerprint.to_string(), gossip_value(&forged), seed).await;
    // 4. Not even an advert.
    let junk = identity("junk");
    let m4 = raw_member(junk.fingerprint.to_string(), "%%% not base64".into(), seed).await;

    wait_for("the honest member's advert", Duration::from_secs(5), || {
        victim.registry().get(&honest.fingerprint).is_some()
    })
    .await;
    // The forged ones travel in the same rounds; give them several more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let registry = victim.registry();
    for (what, fp) in [
        ("another node's advert", other.fingerprint),
        ("under the impostor's id", impostor.fingerprint),
        ("a tampered advert", tampered_id.fingerprint),
        ("signed by another key", claimed.fingerprint),
        ("junk", junk.fingerprint),
    ] {
        assert!(registry.get(&fp).is_none(), "{what} was accepted");
    }
    let candidates = registry.candidates(now_ms());
    assert_eq!(candidates.len(), 1);
    assert_eq!(candidates[0].fingerprint, honest.fingerprint);

    for member in [honest_member, m1, m2, m3, m4] {
        member.shutdown().await.unwrap();
    }
    victim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_goes_suspect_then_dead_and_its_advert_is_removed() {
    let cfg = config(50, &[]);
    let (suspect_after, dead_after) = (cfg.suspect_after, cfg.dead_after);
    let store = Store::open_in_memory().unwrap();
    let (_, a) = {
        let id = identity("a");
        let store = store.clone();
        let registry = Registry::with_store(id.fingerprint, store, now_ms()).unwrap();
        let d = discovery::start(cfg.clone(), id.clone(), registry, source("a", 7400))
            .await
            .unwrap();
        (id, d)
    };
    let seeded = config(50, &[a.gossip_addr()]);
    let (b_id, b) = node("b", seeded.clone(), 7401).await;
    let (c_id, c) = node("c", seeded, 7402).await;
    wait_for("three nodes", Duration::from_secs(5), || {
        a.known() == 2 && b.known() == 2 && c.known() == 2
    })
    .await;

    let stopped = Instant::now();
    c.shutdown().await;
    let registry = a.registry().clone();
    let suspect = wait_for("c suspect", dead_after, || {
        registry.liveness(&c_id.fingerprint).unwrap().0 == Liveness::Suspect
    })
    .await;
    assert!(
        registry.get(&c_id.fingerprint).is_some(),
        "a suspect keeps its advert"
    );
    assert!(
        registry
            .candidates(now_ms())
            .iter()
            .all(|x| x.fingerprint != c_id.fingerprint),
        "a suspect is no candidate"
    );
    wait_for("c dead", dead_after * 2, || {
        registry.liveness(&c_id.fingerprint).unwrap().0 == Liveness::Dead
    })
    .await;
    let dead = stopped.elapsed();
    println!(
        "stopped node: suspect after {} ms, dead after {} ms (configured {} / {} ms)",
        suspect.as_millis(),
        dead.as_millis(),
        suspect_after.as_millis(),
        dead_after.as_millis()
    );
    // Heartbeats stop a little before the socket closes, never after.
    let slack = Duration::from_millis(150);
    assert!(
        suspect + slack >= suspect_after,
        "suspect too early: {suspect:?}"
    );
    assert!(dead + slack >= dead_after, "dead too early: {dead:?}");
    assert!(
        registry.get(&c_id.fingerprint).is_none(),
        "a dead node's advert is removed"
    );
    assert_eq!(a.known(), 1);

    // B, still running, never left alive, and the store followed.
    assert_eq!(
        registry.liveness(&b_id.fingerprint).unwrap().0,
        Liveness::Alive
    );
    assert!(
        store
            .adverts()
            .unwrap()
            .iter()
            .all(|r| r.node_id != c_id.fingerprint)
    );
    assert!(
        store
            .adverts()
            .unwrap()
            .iter()
            .any(|r| r.node_id == b_id.fingerprint)
    );
    assert_eq!(
        store.peer(&c_id.fingerprint).unwrap().unwrap().liveness,
        Liveness::Dead
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_is_alive_again_with_its_new_advert() {
    let (_, a) = node("a", config(50, &[]), 7500).await;
    let seeded = config(50, &[a.gossip_addr()]);
    let c_id = identity("c");
    let start_c = |port: u16| {
        let (cfg, id) = (seeded.clone(), c_id.clone());
        async move {
            let registry = Registry::new(id.fingerprint);
            discovery::start(cfg, id, registry, source("c", port))
                .await
                .unwrap()
        }
    };
    let c = start_c(7501).await;
    wait_for("a to learn c", Duration::from_secs(5), || a.known() == 1).await;
    let before = a.registry().get(&c_id.fingerprint).unwrap().advert;
    c.shutdown().await;
    let registry = a.registry().clone();
    wait_for("c dead", Duration::from_secs(5), || {
        registry.liveness(&c_id.fingerprint).unwrap().0 == Liveness::Dead
    })
    .await;

    // Same key, new process: a new generation on a new port, a higher sequence.
    let c = start_c(7502).await;
    // Alive again may be seen a gossip round before the new advert arrives.
    wait_for(
        "c alive again with its new advert",
        Duration::from_secs(5),
        || {
            a.known() == 1
                && registry
                    .get(&c_id.fingerprint)
                    .is_some_and(|l| l.advert.sequence > before.sequence)
        },
    )
    .await;
    let after = registry.get(&c_id.fingerprint).unwrap().advert;
    assert!(after.sequence > before.sequence);
    assert_eq!(after.endpoints.unwrap().control, "127.0.0.1:7502");
    assert_eq!(
        registry.liveness(&c_id.fingerprint).unwrap().0,
        Liveness::Alive
    );
    a.shutdown().await;
    c.shutdown().await;
}

#[test]
fn the_config_section_converts_with_its_defaults() {
    let section = p2pcdn_controller::config::DiscoveryConfig::default();
    let cfg = DiscoveryConfig::from(&section);
    assert_eq!(cfg, DiscoveryConfig::default());
    cfg.validate().unwrap();
    let mut bad = cfg.clone();
    bad.dead_after = bad.suspect_after;
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("dead_after")
    );
}

/// Statements published on one node's board reach every other node with the gossip, under
/// the publisher's id; a replaced statement arrives with a higher version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn board_statements_spread_with_the_gossip() {
    let (_, nodes) = four_nodes(50).await;
    let (author, board) = (&nodes[1].0, nodes[1].1.board().unwrap());
    let subject = nodes[2].0.fingerprint.to_string();
    board.publish(&subject, "first").await;
    let readers: Vec<_> = nodes.iter().map(|(_, d)| d.board().unwrap()).collect();
    let mut seen = Vec::new();
    for (i, reader) in readers.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let entries = loop {
            let entries = reader.read().await;
            if i == 1 || entries.iter().any(|e| e.value == "first") || Instant::now() > deadline {
                break entries;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if i == 1 {
            assert!(
                entries.is_empty(),
                "a node does not read its own statements: {entries:?}"
            );
            continue;
        }
        let entry = entries
            .iter()
            .find(|e| e.value == "first")
            .unwrap_or_else(|| panic!("node {i} never saw the statement: {entries:?}"));
        assert_eq!(entry.from, author.fingerprint);
        assert_eq!(entry.key, subject);
        seen.push(entry.version);
    }
    board.publish(&subject, "second").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let entries = readers[0].read().await;
        if let Some(e) = entries.iter().find(|e| e.value == "second") {
            assert!(e.version > seen[0], "{e:?}");
            assert_eq!(entries.len(), 1, "replaced, not added: {entries:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the replacement never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (_, d) in nodes {
        d.shutdown().await;
    }
}
