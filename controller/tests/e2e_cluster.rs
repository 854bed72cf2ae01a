//! Four controllers on loopback, end to end: real daemons (`daemon::start`) with generated
//! certificates, mutual TLS gRPC, gossip and SQLite stores in temporary directories. Each test
//! asserts what an operator would notice: who knows whom, which arrangements become active on
//! both sides and on which terms, what is refused and how, and what the admin API answers.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

#[path = "e2e_cluster/support.rs"]
mod support;
#[path = "e2e_cluster/wire.rs"]
mod wire;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::{Method, StatusCode, header::WWW_AUTHENTICATE};
use p2pcdn_controller::{
    admin::{
        ArrangementView, BackendError, NegotiationState, NegotiationView, PeerView, StateView,
        StatusView,
    },
    identity::NodeIdentity,
    model::{Role, now_ms},
    peering_agent::GrpcPeers,
    proto::{MAX_MESSAGE_BYTES, pb},
    store::{UsageEntry, UsageKind, UsageSource},
};
use prost::Message as _;
use support::{Cluster, Member, SERVICE, WAIT, assert_succeeded, describe, eventually};
use tokio::net::TcpListener;
use tonic::Code;
use wire::{AdmitAll, grpc_frame, grpc_raw, https, peer_tls};

type State = pb::ArrangementState;

/// A provider's list prices as an overlay.
fn prices(per_gb: u64, per_1000_connections: u64) -> String {
    format!(
        "[policy]\nprice_per_gb_micros = {per_gb}\nprice_per_1000_connections_micros = {per_1000_connections}\n"
    )
}

/// Requirements a primary could send (valid, within the testbed's default ceilings).
fn requirements(request_id: &str) -> pb::ServiceRequirements {
    pb::ServiceRequirements {
        request_id: request_id.to_owned(),
        service: Some(pb::ServiceSpec {
            name: "web".to_owned(),
            addresses: vec!["192.0.2.80:80".to_owned()],
            host_names: vec![],
        }),
        manifest: None,
        capacity: Some(pb::Capacity {
            new_connections_per_s: 100,
            egress_mbps: 100,
            storage_bytes: 0,
        }),
        duration_s: 600,
        max_price: Some(pb::Price {
            per_gb_micros: 50_000,
            per_1000_connections_micros: 5_000,
            currency: "EUR".to_owned(),
        }),
        min_sla: Some(pb::SlaTerms {
            availability_ppm: 990_000,
            p99_latency_ms: 500,
        }),
        modes: vec![pb::RedirectionMode::DsrGue as i32],
    }
}

fn price_of(record: &p2pcdn_controller::store::ArrangementRecord) -> pb::Price {
    record
        .terms
        .as_ref()
        .and_then(|t| t.price.clone())
        .unwrap_or_else(|| panic!("arrangement {} has no priced terms", record.id))
}

/// No arrangement of `node` with `peer` is (or was) active.
fn assert_never_active(node: &Member, peer: &Member) {
    let rows = node.arrangements_with(peer);
    assert!(
        rows.iter().all(|a| a.state != State::Active
            && a.activated_ms.is_none()
            && !matches!(a.state, State::Disbanding | State::Disbanded)),
        "{} must have no active arrangement with {}: {}",
        node.name,
        peer.name,
        describe(&rows)
    );
}

/// 1. Every controller learns every other's signed advertisement through gossip, fresh and
///    with the name and control endpoint the other node really has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_controllers_see_each_others_fresh_adverts() {
    let mut cluster = Cluster::new();
    for name in ["edge-a", "edge-b", "edge-c", "edge-d"] {
        cluster.add(name, "").await;
    }
    eventually("each node has the other three's fresh adverts", || async {
        let now = now_ms();
        for m in &cluster.members {
            for other in cluster.members.iter().filter(|o| o.name != m.name) {
                let learned = m
                    .node
                    .registry()
                    .get(&other.fingerprint())
                    .ok_or_else(|| format!("{} has no advert of {}", m.name, other.name))?;
                let advert = &learned.advert;
                if learned.expires_at_ms() <= now {
                    return Err(format!("{}'s advert of {} expired", m.name, other.name));
                }
                assert_eq!(advert.node_id, other.fingerprint().0.to_vec());
                assert_eq!(advert.name, other.name, "advert name as {} sees it", m.name);
                let control = advert.endpoints.as_ref().map(|e| e.control.clone());
                assert_eq!(
                    control,
                    Some(other.node.control_addr().to_string()),
                    "{}'s control endpoint as {} sees it",
                    other.name,
                    m.name
                );
            }
            let known = m.node.registry().known(now);
            if known != 3 {
                return Err(format!("{} counts {known} live peers, not 3", m.name));
            }
        }
        Ok(())
    })
    .await;
    cluster.shutdown().await;
}

/// 2. Three providers with different list prices; the primary asks for more than one offer
///    covers: the two cheapest become active on both sides, the dearest is declined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_activates_the_two_cheapest_offers_on_both_sides() {
    let mut cluster = Cluster::new();
    cluster.add("primary", SERVICE).await;
    cluster.add("cheap", &prices(10_000, 500)).await;
    cluster.add("middle", &prices(20_000, 1_000)).await;
    cluster.add("dear", &prices(40_000, 4_000)).await;
    cluster.wait_for_mesh().await;
    let [primary, cheap, middle, dear] =
        ["primary", "cheap", "middle", "dear"].map(|n| cluster.get(n));

    // Each provider offers at most half its 1000 connections/s: 800 needs two offers.
    let view = primary.negotiate(800).await;
    assert_succeeded(&view, 800);

    for provider in [cheap, middle] {
        let ours = primary.active_with(provider, Role::Primary);
        let theirs = provider.active_with(primary, Role::Provider);
        assert_eq!(
            ours.peer_ref.as_deref(),
            Some(theirs.id.as_str()),
            "the primary's arrangement refers to {}'s",
            provider.name
        );
        assert_eq!(ours.request_id, view.request_id);
        assert!(
            view.arrangements.contains(&ours.id),
            "the negotiation lists {}: {view:?}",
            ours.id
        );
        let policy = &provider.prepared.config.policy;
        for record in [&ours, &theirs] {
            let price = price_of(record);
            assert_eq!(price.per_gb_micros, policy.price_per_gb_micros);
            assert_eq!(
                price.per_1000_connections_micros,
                policy.price_per_1000_connections_micros
            );
        }
    }
    let active = primary
        .arrangements()
        .into_iter()
        .filter(|a| a.state == State::Active)
        .count();
    assert_eq!(active, 2, "{}", describe(&primary.arrangements()));

    // The dearest provider was asked, made an offer, and was declined.
    assert_never_active(primary, dear);
    assert_never_active(dear, primary);
    let asked = primary.arrangements_with(dear);
    assert!(
        asked.iter().any(|a| {
            a.state == State::Cancelled
                && primary.events(&a.id).iter().any(|e| e.to == State::Offered)
        }),
        "the dearest provider's offer was received and declined: {}",
        describe(&asked)
    );
    let theirs = dear.arrangements_with(primary);
    assert!(
        !theirs.is_empty() && theirs.iter().all(|a| a.state == State::Cancelled),
        "the dearest provider's offer ends cancelled on its side: {}",
        describe(&theirs)
    );
    cluster.shutdown().await;
}

/// 3. One provider denies the primary by fingerprint, another's price floor is above the
///    primary's ceiling: neither gets an arrangement, and the third covers the requirement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_whose_policy_refuses_the_primary_get_no_arrangement() {
    let mut cluster = Cluster::new();
    let primary_fp = cluster.add("primary", SERVICE).await.fingerprint();
    cluster
        .add(
            "denier",
            &format!("[policy]\ndeny = [{{ fingerprint = \"{primary_fp}\" }}]\n"),
        )
        .await;
    // Floor: 80 % of 200000 = 160000 per GB, above the primary's ceiling of 50000.
    cluster
        .add(
            "floor",
            "[policy]\nprice_per_gb_micros = 200000\nmin_price_percent = 80\n",
        )
        .await;
    cluster.add("open", "").await;
    cluster.wait_for_mesh().await;
    let [primary, denier, floor, open] =
        ["primary", "denier", "floor", "open"].map(|n| cluster.get(n));
    assert!(
        floor.prepared.config.policy.price_per_gb_micros * 80 / 100
            > primary.prepared.config.policy.max_price_per_gb_micros
    );

    let view = primary.negotiate(400).await;
    assert_succeeded(&view, 400);
    primary.active_with(open, Role::Primary);
    open.active_with(primary, Role::Provider);

    for refuser in [denier, floor] {
        assert!(
            refuser.arrangements().is_empty(),
            "{} must record nothing for a primary it refuses: {}",
            refuser.name,
            describe(&refuser.arrangements())
        );
        let asked = primary.arrangements_with(refuser);
        assert!(
            !asked.is_empty()
                && asked
                    .iter()
                    .all(|a| a.state == State::Cancelled && a.end_reason.is_some()),
            "the primary asked {} and recorded why it got nothing: {}",
            refuser.name,
            describe(&asked)
        );
    }
    let reasons: Vec<String> = primary
        .arrangements_with(floor)
        .into_iter()
        .filter_map(|a| a.end_reason)
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("PRICE_TOO_LOW") && r.contains("floor")),
        "the price floor is the reason given: {reasons:?}"
    );
    cluster.shutdown().await;
}

/// 4. A provider lists a price above the primary's ceiling but accepts down to 80 % of it:
///    the primary counters, and the arrangement is active at a price within the ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_offer_brings_the_price_down_to_the_ceiling() {
    let mut cluster = Cluster::new();
    cluster.add("primary", SERVICE).await;
    cluster.add("cheap", &prices(10_000, 500)).await;
    cluster.add("middle", &prices(20_000, 1_000)).await;
    // List 60000 per GB, above the ceiling of 50000; floor 48000, below it.
    cluster
        .add(
            "haggler",
            "[policy]\nprice_per_gb_micros = 60000\nmin_price_percent = 80\n",
        )
        .await;
    cluster.wait_for_mesh().await;
    let [primary, haggler] = ["primary", "haggler"].map(|n| cluster.get(n));
    let ceiling = &primary.prepared.config.policy;
    assert!(haggler.prepared.config.policy.price_per_gb_micros > ceiling.max_price_per_gb_micros);

    // 1200 connections/s needs all three offers of 500, the haggler's included.
    let view = primary.negotiate(1200).await;
    assert_succeeded(&view, 1200);
    let ours = primary.active_with(haggler, Role::Primary);
    let theirs = haggler.active_with(primary, Role::Provider);
    for (side, record) in [("primary", &ours), ("haggler", &theirs)] {
        let price = price_of(record);
        assert!(
            price.per_gb_micros <= ceiling.max_price_per_gb_micros
                && price.per_1000_connections_micros
                    <= ceiling.max_price_per_1000_connections_micros,
            "{side}'s terms must be within the primary's ceiling: {price:?}"
        );
        assert!(
            price.per_gb_micros * 100 >= haggler.prepared.config.policy.price_per_gb_micros * 80,
            "{side}'s terms must be above the haggler's floor: {price:?}"
        );
    }
    // Both sides recorded the counter round (a revised offer: Offered -> Offered).
    for (member, id) in [(primary, &ours.id), (haggler, &theirs.id)] {
        let events = member.events(id);
        assert!(
            events
                .iter()
                .any(|e| e.from == Some(State::Offered) && e.to == State::Offered),
            "{} records a revised offer: {events:?}",
            member.name
        );
    }
    cluster.shutdown().await;
}

/// A TCP listener that accepts connections and never answers, keeping them open.
struct BlackHole {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    async fn open() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            // Accepted sockets stay open (and silent) until the task is aborted.
            let mut held = Vec::new();
            // Bounded: a negotiation dials a few times at most.
            for _ in 0..256 {
                let Ok((socket, _)) = listener.accept().await else {
                    break;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
            // Past the bound: keep what was accepted until the test ends.
            std::future::pending::<()>().await;
            drop(held);
        });
        Self {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// 5. A node advertises a control endpoint that accepts and never answers: the primary's
///    request to it times out and another provider covers the requirement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresponsive_peer_times_out_and_another_covers() {
    let hole = BlackHole::open().await;
    let mut cluster = Cluster::new();
    cluster.add("primary", SERVICE).await;
    cluster
        .add(
            "silent",
            &format!("[node]\nadvertise_control = \"{}\"\n", hole.addr),
        )
        .await;
    cluster.add("steady", "").await;
    cluster.add("backup", &prices(30_000, 2_000)).await;
    cluster.wait_for_mesh().await;
    let [primary, silent] = ["primary", "silent"].map(|n| cluster.get(n));

    let started = Instant::now();
    let view = primary.negotiate(400).await;
    let elapsed = started.elapsed();
    assert_succeeded(&view, 400);
    println!(
        "negotiation with an unresponsive candidate took {elapsed:?} (timeout {} ms)",
        primary.prepared.config.policy.negotiation_timeout_ms
    );
    assert!(
        elapsed < WAIT,
        "the negotiation waits for the unresponsive peer only up to its timeout: {elapsed:?}"
    );
    assert!(
        hole.accepted.load(Ordering::SeqCst) >= 1,
        "the primary did dial the unresponsive peer's endpoint"
    );
    assert!(
        silent.arrangements().is_empty(),
        "the unresponsive node never heard a request: {}",
        describe(&silent.arrangements())
    );
    let asked = primary.arrangements_with(silent);
    assert!(
        !asked.is_empty() && asked.iter().all(|a| a.state == State::Cancelled),
        "the primary's request to the unresponsive node ended cancelled: {}",
        describe(&asked)
    );
    let covering = primary
        .arrangements()
        .into_iter()
        .filter(|a| a.state == State::Active)
        .collect::<Vec<_>>();
    assert!(
        !covering.is_empty() && covering.iter().all(|a| a.peer != silent.fingerprint()),
        "another provider covers: {}",
        describe(&covering)
    );
    cluster.shutdown().await;
}

/// One side's `[[policy.long_term]]` entry of agreement `lt-7` with `peer`.
fn long_term_with(peer: &str, role: Role) -> String {
    format!(
        "[[policy.long_term]]\nagreement_id = \"lt-7\"\npeer = \"{peer}\"\nrole = \"{}\"\nnew_connections_per_s = 300\negress_mbps = 300\nprice_per_gb_micros = 15000\nprice_per_1000_connections_micros = 700\nduration_s = 900\n",
        role.as_str()
    )
}

/// 6. Matching long-term agreements on both sides: the arrangement becomes active with the
///    agreement id, without any offer, and nobody else is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_term_peer_activates_without_negotiation() {
    let mut cluster = Cluster::new();
    cluster.add("seed", "").await;
    // Each side names the other: the primary's file is completed once the provider exists.
    let mut primary = cluster.prepare("primary", SERVICE);
    let provider = cluster.prepare(
        "provider",
        &long_term_with(&primary.fingerprint.to_string(), Role::Provider),
    );
    support::amend(
        &mut primary,
        &long_term_with(&provider.fingerprint.to_string(), Role::Primary),
    );
    cluster.start(primary).await;
    cluster.start(provider).await;
    cluster.add("bystander", "").await;
    cluster.wait_for_mesh().await;
    let [seed, primary, provider, bystander] =
        ["seed", "primary", "provider", "bystander"].map(|n| cluster.get(n));

    let view = primary.negotiate(300).await;
    assert_succeeded(&view, 300);
    let ours = primary.active_with(provider, Role::Primary);
    let theirs = provider.active_with(primary, Role::Provider);
    for (side, record) in [("primary", &ours), ("provider", &theirs)] {
        assert_eq!(record.agreement_id.as_deref(), Some("lt-7"), "{side}");
        let price = price_of(record);
        assert_eq!(
            (price.per_gb_micros, price.per_1000_connections_micros),
            (15_000, 700),
            "{side}: the agreed prices"
        );
    }
    // No offer anywhere in either side's history.
    let detail = provider
        .node
        .backend()
        .arrangement(theirs.id.clone())
        .await
        .unwrap();
    assert_eq!(detail.arrangement.agreement_id.as_deref(), Some("lt-7"));
    assert!(
        detail
            .events
            .iter()
            .all(|e| e.to != StateView::Offered && e.from != Some(StateView::Offered)),
        "the provider's history has no offer: {:?}",
        detail.events
    );
    assert!(
        detail.events.iter().any(|e| e.to == StateView::Active),
        "{:?}",
        detail.events
    );
    let history = primary.events(&ours.id);
    assert!(
        history
            .iter()
            .all(|e| e.to != State::Offered && e.from != Some(State::Offered)),
        "the primary's history has no offer: {history:?}"
    );
    for other in [seed, bystander] {
        assert!(
            other.arrangements().is_empty(),
            "{} was not asked: {}",
            other.name,
            describe(&other.arrangements())
        );
    }
    cluster.shutdown().await;
}

/// 7. A provider that admits only its allow list refuses the primary's certificate during
///    the TLS handshake: nothing reaches its handler, and the primary covers elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_outside_the_allow_list_is_refused_at_the_tls_layer() {
    let mut cluster = Cluster::new();
    cluster.add("primary", SERVICE).await;
    cluster
        .add("gatekeeper", "[policy]\nadmit_unknown = \"allow-list\"\n")
        .await;
    cluster.add("open-1", "").await;
    cluster.add("open-2", "").await;
    cluster.wait_for_mesh().await;
    let [primary, gatekeeper, open] = ["primary", "gatekeeper", "open-1"].map(|n| cluster.get(n));

    let view = primary.negotiate(400).await;
    assert_succeeded(&view, 400);
    assert_never_active(primary, gatekeeper);
    let asked = primary.arrangements_with(gatekeeper);
    assert!(
        !asked.is_empty() && asked.iter().all(|a| a.state == State::Cancelled),
        "the primary asked the gatekeeper and got nothing: {}",
        describe(&asked)
    );
    assert!(
        gatekeeper.arrangements().is_empty(),
        "the gatekeeper's handler never ran: {}",
        describe(&gatekeeper.arrangements())
    );

    // The same request, straight from the refused node's identity.
    let config = &primary.prepared.config;
    let identity = Arc::new(NodeIdentity::load(&config.tls.key, &config.tls.cert).unwrap());
    let peers = GrpcPeers::new(identity, None, Arc::new(AdmitAll), Duration::from_secs(5));
    let refused = tokio::time::timeout(
        WAIT,
        peers.request_offer(
            gatekeeper.fingerprint(),
            &gatekeeper.node.control_addr().to_string(),
            requirements("direct-1"),
        ),
    )
    .await
    .unwrap();
    let Err(refused) = refused else {
        panic!("the gatekeeper must not answer a refused certificate: {refused:?}");
    };
    // A handler would answer with a reply (an offer or a reject) or a status of its own
    // (InvalidArgument, PermissionDenied, NotFound...), without a source; a refused handshake
    // is a failure of the client's transport: the alert, or the connection the server closed
    // (reset, broken pipe), depending on who reads or writes first.
    let transport = std::error::Error::source(&refused)
        .and_then(|s| s.downcast_ref::<tonic::transport::Error>());
    assert!(
        transport.is_some()
            && matches!(
                refused.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
        "a transport error, not the handler's answer: {refused:?}"
    );
    assert!(gatekeeper.arrangements().is_empty());

    // The control: the same client and request reach an open provider's handler.
    let reply = tokio::time::timeout(
        WAIT,
        peers.request_offer(
            open.fingerprint(),
            &open.node.control_addr().to_string(),
            requirements("direct-2"),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        matches!(reply.result, Some(pb::offer_reply::Result::Offer(_))),
        "{reply:?}"
    );
    cluster.shutdown().await;
}

/// 8. Undecodable, truncated and oversized protobuf sent to a running node's peering port
///    get InvalidArgument; well-formed requests before and after are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_protobuf_get_invalid_argument_from_a_running_node() {
    let mut cluster = Cluster::new();
    cluster.add("edge", "").await;
    let edge = cluster.get("edge");
    let client = NodeIdentity::generate("prober", "Testbed", &["localhost".to_owned()]).unwrap();
    let tls = peer_tls(&client, edge.fingerprint());
    let addr = edge.node.control_addr();

    let (code, message) = grpc_raw(
        addr,
        tls.clone(),
        "RequestOffer",
        grpc_frame(&requirements("probe-1").encode_to_vec()),
    )
    .await;
    assert_eq!(code, Code::Ok, "the well-formed control request: {message}");
    assert_eq!(edge.arrangements().len(), 1, "the control got an offer");

    let mut oversized = requirements("probe-big");
    oversized.service.as_mut().unwrap().host_names = vec!["a".repeat(200); 400];
    let oversized = oversized.encode_to_vec();
    assert!(oversized.len() > MAX_MESSAGE_BYTES);
    let mut huge_prefix = vec![0];
    huge_prefix.extend_from_slice(&(1u32 << 30).to_be_bytes());
    huge_prefix.extend_from_slice(&[0; 64]);
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("undecodable bytes", "RequestOffer", grpc_frame(&[0xff; 12])),
        (
            "truncated length-delimited field",
            "RequestOffer",
            grpc_frame(&[0x0a, 0x40, b'x']),
        ),
        ("oversized message", "RequestOffer", grpc_frame(&oversized)),
        ("length prefix of 1 GiB", "RequestOffer", huge_prefix),
        ("undecodable heartbeat", "Heartbeat", grpc_frame(&[0xff; 7])),
        (
            "undecodable advertisement",
            "Advertise",
            grpc_frame(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]),
        ),
    ];
    for (what, method, body) in cases {
        let (code, message) = grpc_raw(addr, tls.clone(), method, body).await;
        assert_eq!(code, Code::InvalidArgument, "{what}: {message}");
        assert!(!message.is_empty(), "{what}: the status says why");
    }
    assert_eq!(
        edge.arrangements().len(),
        1,
        "no bad request reached the handler: {}",
        describe(&edge.arrangements())
    );

    // The node still serves.
    let (code, message) = grpc_raw(
        addr,
        tls,
        "RequestOffer",
        grpc_frame(&requirements("probe-2").encode_to_vec()),
    )
    .await;
    assert_eq!(code, Code::Ok, "after the bad requests: {message}");
    assert_eq!(edge.arrangements().len(), 2);
    cluster.shutdown().await;
}

/// The value of the metric line `name{labels}` in Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|rest| rest.trim().parse().ok())
}

/// 9. The admin API over HTTPS on a running node: 401 with a bearer challenge without a
///    token, 403 for a viewer on operator routes, 200 for the operator; peers and metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_over_https_checks_tokens_and_serves_peers_and_metrics() {
    let mut cluster = Cluster::new();
    cluster.add("primary", SERVICE).await;
    for name in ["edge-b", "edge-c", "edge-d"] {
        cluster.add(name, "").await;
    }
    cluster.wait_for_mesh().await;
    let primary = cluster.get("primary");
    let addr = primary.node.admin_addr();
    let cert = &primary.prepared.cert_der;
    let viewer = Some(primary.prepared.viewer_token.as_str());
    let operator = Some(primary.prepared.operator_token.as_str());
    let negotiate = serde_json::json!({"service": "web", "new_connections_per_s": 100});

    for (token, path) in [
        (None, "/v1/status"),
        (Some("not-a-token"), "/v1/status"),
        (None, "/metrics"),
    ] {
        let reply = https(addr, cert, token, Method::GET, path, None).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path} {token:?}");
        let challenge = reply
            .headers
            .get(WWW_AUTHENTICATE)
            .unwrap_or_else(|| panic!("{path}: a 401 carries WWW-Authenticate"));
        assert!(
            challenge.to_str().unwrap().starts_with("Bearer"),
            "{challenge:?}"
        );
    }
    let reply = https(
        addr,
        cert,
        None,
        Method::POST,
        "/v1/negotiate",
        Some(negotiate.clone()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());

    let status = https(addr, cert, viewer, Method::GET, "/v1/status", None).await;
    assert_eq!(status.status, StatusCode::OK, "{}", status.text());
    let status: StatusView = status.json();
    assert_eq!(status.fingerprint, primary.fingerprint());
    assert_eq!(status.name, "primary");

    let others: Vec<_> = cluster
        .members
        .iter()
        .filter(|m| m.name != "primary")
        .map(Member::fingerprint)
        .collect();
    let peers: Vec<PeerView> = eventually("GET /v1/peers lists the other three", || async {
        let reply = https(addr, cert, viewer, Method::GET, "/v1/peers", None).await;
        if reply.status != StatusCode::OK {
            return Err(format!("{}: {}", reply.status, reply.text()));
        }
        let peers: Vec<PeerView> = reply.json();
        match others
            .iter()
            .find(|fp| !peers.iter().any(|p| p.fingerprint == **fp))
        {
            Some(missing) => Err(format!("{} is missing from {peers:?}", missing.short())),
            None => Ok(peers),
        }
    })
    .await;
    for member in cluster.members.iter().filter(|m| m.name != "primary") {
        let view = peers
            .iter()
            .find(|p| p.fingerprint == member.fingerprint())
            .unwrap();
        assert_eq!(
            view.control_endpoint.as_deref(),
            Some(member.node.control_addr().to_string().as_str()),
            "{view:?}"
        );
    }
    assert!(
        peers.iter().all(|p| p.fingerprint != primary.fingerprint()),
        "a node does not list itself: {peers:?}"
    );

    // A viewer may not negotiate; nothing happens.
    let reply = https(
        addr,
        cert,
        viewer,
        Method::POST,
        "/v1/negotiate",
        Some(negotiate.clone()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert!(
        primary.arrangements().is_empty(),
        "{}",
        describe(&primary.arrangements())
    );

    // The operator may.
    let reply = https(
        addr,
        cert,
        operator,
        Method::POST,
        "/v1/negotiate",
        Some(negotiate),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let view: NegotiationView = reply.json();
    assert_eq!(view.state, NegotiationState::Succeeded, "{view:?}");
    let active = primary
        .arrangements()
        .into_iter()
        .find(|a| a.state == State::Active)
        .unwrap_or_else(|| {
            panic!(
                "an active arrangement: {}",
                describe(&primary.arrangements())
            )
        });

    // A viewer may not disband it; it stays active. The operator may.
    let disband = format!("/v1/arrangements/{}/disband", active.id);
    let body = serde_json::json!({"reason": "admin api test"});
    let reply = https(
        addr,
        cert,
        viewer,
        Method::POST,
        &disband,
        Some(body.clone()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let still = primary
        .node
        .store()
        .arrangement(&active.id)
        .unwrap()
        .unwrap();
    assert_eq!(still.state, State::Active);
    let reply = https(addr, cert, operator, Method::POST, &disband, Some(body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let ended: ArrangementView = reply.json();
    assert_eq!(ended.state, StateView::Disbanded, "{ended:?}");

    let reply = https(addr, cert, viewer, Method::GET, "/metrics", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let text = reply.text();
    assert_eq!(
        metric(&text, "p2pcdn_peers{state=\"alive\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "p2pcdn_arrangements{state=\"disbanded\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric(&text, "p2pcdn_arrangements{state=\"active\"}").is_some(),
        "{text}"
    );
    cluster.shutdown().await;
}

/// 10. The primary's operator disbands an active arrangement: both sides end Disbanded with a
///     settlement, and each side's ledger holds the other's final count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_disband_ends_the_arrangement_on_both_sides_with_a_settlement() {
    let mut cluster = Cluster::new();
    cluster.add("primary", SERVICE).await;
    for name in ["edge-b", "edge-c", "edge-d"] {
        cluster.add(name, "").await;
    }
    cluster.wait_for_mesh().await;
    let primary = cluster.get("primary");

    let view = primary.negotiate(300).await;
    assert_succeeded(&view, 300);
    let ours = primary
        .arrangements()
        .into_iter()
        .find(|a| a.state == State::Active)
        .unwrap_or_else(|| {
            panic!(
                "an active arrangement: {}",
                describe(&primary.arrangements())
            )
        });
    let provider = cluster
        .members
        .iter()
        .find(|m| m.fingerprint() == ours.peer)
        .unwrap();
    let theirs_id = ours.peer_ref.clone().unwrap();
    assert_eq!(
        provider
            .node
            .store()
            .arrangement(&theirs_id)
            .unwrap()
            .unwrap()
            .state,
        State::Active
    );

    // What the primary's data plane counted (the data plane is a later issue): 20000
    // connections and 3 GB through this provider.
    let counted = UsageEntry {
        arrangement: ours.id.clone(),
        at_ms: now_ms(),
        source: UsageSource::Local,
        kind: UsageKind::Heartbeat,
        connections: 20_000,
        bytes: 3_000_000_000,
        packets: 2_500_000,
    };
    primary.node.store().record_usage(&counted).unwrap();

    let ended = primary
        .node
        .backend()
        .disband(ours.id.clone(), "maintenance window".to_owned())
        .await
        .unwrap();
    assert_eq!(ended.state, StateView::Disbanded, "{ended:?}");

    let record = primary.node.store().arrangement(&ours.id).unwrap().unwrap();
    assert_eq!(record.state, State::Disbanded);
    let price = price_of(&record);
    let settlement = record
        .settlement
        .clone()
        .unwrap_or_else(|| panic!("the primary settles: {record:?}"));
    // 20 x the price per 1000 connections + 3 x the price per GB.
    let expected = 20 * price.per_1000_connections_micros + 3 * price.per_gb_micros;
    assert_eq!(settlement.charges_micros, expected, "{settlement:?}");
    assert_eq!(
        settlement.total_micros, expected,
        "no SLA breach: {settlement:?}"
    );
    assert_eq!(settlement.currency, "EUR");

    let theirs = eventually("the provider ends the arrangement too", || async {
        let record = provider
            .node
            .store()
            .arrangement(&theirs_id)
            .unwrap()
            .unwrap();
        if record.state == State::Disbanded {
            Ok(record)
        } else {
            Err(format!("{:?}", record.state))
        }
    })
    .await;
    assert!(
        theirs.settlement.is_some(),
        "the provider settles: {theirs:?}"
    );
    assert!(theirs.ended_ms.is_some());

    // The provider's ledger has the primary's final count; the primary's has both.
    let ledger = provider.node.store().usage(&theirs_id).unwrap();
    assert!(
        ledger.iter().any(|e| e.source == UsageSource::Peer
            && e.kind == UsageKind::Final
            && (e.connections, e.bytes) == (20_000, 3_000_000_000)),
        "the provider records the primary's final count: {ledger:?}"
    );
    let ledger = primary.node.store().usage(&ours.id).unwrap();
    assert!(
        ledger.iter().any(|e| e.source == UsageSource::Local),
        "{ledger:?}"
    );
    assert!(
        ledger
            .iter()
            .any(|e| e.source == UsageSource::Peer && e.kind == UsageKind::Final),
        "the primary records the provider's final count: {ledger:?}"
    );

    // Disbanding again is refused: it is over.
    let again = primary
        .node
        .backend()
        .disband(ours.id.clone(), "again".to_owned())
        .await
        .unwrap_err();
    assert!(matches!(again, BackendError::Conflict(_)), "{again:?}");
    cluster.shutdown().await;
}
