//! Privileged smoke test: loads the real XDP object unattached and round-trips a service,
//! a peer and the node settings through the kernel maps.
//!
//! Needs CAP_BPF and CAP_NET_ADMIN. Without them it fails when `CI=true` and otherwise
//! skips with a printed reason.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::net::IpAddr;

use redirector_ebpf::{
    PEER_ACTIVE, PEER_NONE, SCHEMA_VERSION, SVC_ACTIVE, SVC_STEER, family, gcra, peer_bucket,
};
use redirector_user::{
    ConfigSpec, Dataplane, LoadOptions, PeerServices, PeerSpec, Redirector, ServiceSpec, privilege,
};

/// `Some(reason)` when the test cannot run here (and may skip).
fn skip_reason() -> Option<String> {
    match privilege::require() {
        Ok(()) => None,
        Err(e) => {
            let reason = format!("privileged test skipped: {e}");
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{reason} (CI=true: privileged tests must run)"
            );
            Some(reason)
        }
    }
}

#[test]
fn service_and_peer_round_trip_through_the_kernel_maps() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let mut r = Redirector::load_unattached(&LoadOptions {
        flow_capacity: Some(4096),
        guard_capacity: Some(4096),
    })
    .unwrap_or_else(|e| panic!("load: {e}\n{}", e.verifier_log().unwrap_or("")));

    let status = r.status().unwrap();
    assert_eq!(status.schema_version, SCHEMA_VERSION);
    assert!(!status.attached);
    assert_eq!(
        status.flow_capacity, 4096,
        "--flow-capacity reaches the map"
    );

    let config = ConfigSpec {
        decap_v4: Some("192.0.2.50".parse().unwrap()),
        flow_ceiling: 5000,
        ..ConfigSpec::default()
    };
    r.set_config(&config).unwrap();
    assert_eq!(r.config().unwrap(), config);

    let mut web = ServiceSpec::new(
        "web",
        vec![
            "10.0.0.1:80".parse().unwrap(),
            "[2001:db8::1]:80".parse().unwrap(),
        ],
        50,
    );
    web.burst = Some(10);
    web.ring_size = 251;
    let id = r.upsert_service(&web).unwrap();
    let conf = r.service_conf(id).unwrap();
    assert_eq!(conf.flags, SVC_ACTIVE | SVC_STEER);
    assert_eq!((conf.local_interval_ns, conf.local_burst_ns), gcra(50, 10));
    assert_eq!(r.port_refs(80).unwrap(), 2);
    assert!(r.ring(id).unwrap().iter().all(|&s| s == PEER_NONE));

    let mut p = PeerSpec::new("peer-a", "192.0.2.10".parse().unwrap());
    p.src = Some("192.0.2.1".parse().unwrap());
    p.rate = Some(100);
    p.weight = 2;
    let slot = r.set_peer(&p).unwrap();
    let peer = r.peer_conf(slot).unwrap();
    assert_eq!(peer.flags, PEER_ACTIVE);
    assert_eq!(peer.family, family::V4);
    assert_eq!(&peer.addr[..4], &[192, 0, 2, 10]);
    assert_eq!(r.ring(id).unwrap(), vec![slot; 251]);

    let mut q = PeerSpec::new("peer-b", "2001:db8::20".parse().unwrap());
    q.src = Some("2001:db8::2".parse().unwrap());
    q.services = PeerServices::Only(vec!["web".into()]);
    let slot_b = r.set_peer(&q).unwrap();
    let ring = r.ring(id).unwrap();
    let share_a = ring.iter().filter(|&&s| s == slot).count();
    assert!(
        (150..=185).contains(&share_a),
        "weight 2 of 3: {share_a} of 251"
    );
    assert!(ring.iter().all(|&s| s == slot || s == slot_b));

    // What was written reads back the same through a fresh listing.
    let services = r.services().unwrap();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].name, "web");
    assert_eq!(services[0].addrs.len(), 2);
    assert_eq!(services[0].peers, vec!["peer-a", "peer-b"]);
    let peers = r.peers().unwrap();
    assert_eq!(peers.len(), 2);
    assert_eq!(peers[0].rate, Some(100));
    assert_eq!(peers[1].services, PeerServices::Only(vec!["web".into()]));

    let allowed: IpAddr = "192.0.2.10".parse().unwrap();
    assert!(r.allow_decap(allowed).unwrap());
    assert_eq!(r.decap_allowed().unwrap(), vec![allowed]);

    // Removing a peer bumps its generation, refills its bucket and empties it from rings.
    let generation = r.peer_conf(slot).unwrap().generation;
    r.set_bucket(peer_bucket(slot), redirector_ebpf::Bucket { tat_ns: 42 })
        .unwrap();
    r.remove_peer("peer-a").unwrap();
    assert_eq!(r.peer_conf(slot).unwrap().generation, generation + 1);
    assert_eq!(r.bucket(peer_bucket(slot)).unwrap().tat_ns, 0);
    assert_eq!(r.ring(id).unwrap(), vec![slot_b; 251]);

    let stats = r.stats().unwrap();
    assert_eq!(stats.services.len(), 1);
    assert_eq!(stats.peers.len(), 1);
    assert_eq!(stats.service("web").unwrap().syn_local, 0);

    r.remove_service("web").unwrap();
    assert_eq!(r.port_refs(80).unwrap(), 0);
    assert!(r.services().unwrap().is_empty());
}
