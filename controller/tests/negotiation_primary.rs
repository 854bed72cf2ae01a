//! The primary side of the negotiation against fake providers: each fake answers with its own
//! real `Policy` (offers, counters), so only the transport is fake.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use p2pcdn_controller::{
    model::{Fingerprint, Role, TrustLevel, now_ms},
    negotiation::{BoxFuture, Candidate, LocalEndpoints, Negotiator, PeerClient},
    policy::{LongTerm, Policy, PolicySettings},
    proto::pb,
    store::{
        ArrangementRecord, NegotiationState, PolicyRule, RuleAction, RuleSubject, State, Store,
    },
    transport::PeerIdentity,
};

const PRIMARY: Fingerprint = Fingerprint([0xAA; 32]);

fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behaviour {
    /// Answers with its policy.
    Normal,
    /// Never answers `RequestOffer`.
    Hang,
    /// Offers, accepts, then fails `Activate`.
    FailActivate,
}

struct FakeProvider {
    id: Fingerprint,
    behaviour: Behaviour,
    policy: Policy,
    spare: pb::Capacity,
    offers: Mutex<HashMap<String, pb::Offer>>,
    arrangements: Mutex<HashMap<String, pb::Arrangement>>,
    accepted: Mutex<HashMap<String, pb::Offer>>,
    calls: Mutex<Vec<String>>,
}

impl FakeProvider {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn log(&self, call: &str) {
        self.calls.lock().unwrap().push(call.to_owned());
    }

    fn arrangement(&self, id: String, terms: pb::Offer, agreement_id: String) -> pb::Arrangement {
        let now = now_ms();
        let arrangement = pb::Arrangement {
            arrangement_id: id.clone(),
            primary: PRIMARY.0.to_vec(),
            provider: self.id.0.to_vec(),
            state: pb::ArrangementState::Active as i32,
            activated_at_ms: now,
            expires_at_ms: now + i64::try_from(terms.duration_s * 1000).unwrap(),
            provider_endpoints: Some(pb::Endpoints {
                control: "127.0.0.1:7443".to_owned(),
                decap_v4: format!("192.0.2.{}", self.id.0[0]),
                ..Default::default()
            }),
            agreement_id,
            service: None,
            terms: Some(terms),
        };
        self.arrangements
            .lock()
            .unwrap()
            .insert(id, arrangement.clone());
        arrangement
    }
}

struct FakePeers {
    providers: HashMap<Fingerprint, Arc<FakeProvider>>,
}

impl FakePeers {
    fn provider(&self, peer: &Candidate) -> Result<Arc<FakeProvider>, tonic::Status> {
        self.providers
            .get(&peer.fingerprint)
            .cloned()
            .ok_or_else(|| tonic::Status::unavailable("no such peer"))
    }
}

fn primary_identity() -> PeerIdentity {
    PeerIdentity {
        fingerprint: PRIMARY,
        organisation: None,
        trust: TrustLevel::Allowed,
        spki_der: Vec::new(),
    }
}

impl PeerClient for FakePeers {
    fn request_offer<'a>(
        &'a self,
        peer: &'a Candidate,
        requirements: pb::ServiceRequirements,
    ) -> BoxFuture<'a, Result<pb::OfferReply, tonic::Status>> {
        Box::pin(async move {
            let p = self.provider(peer)?;
            p.log("request_offer");
            if p.behaviour == Behaviour::Hang {
                std::future::pending::<()>().await;
            }
            let result = match p.policy.offer_for(
                &requirements,
                &primary_identity(),
                None,
                p.spare,
                now_ms(),
            ) {
                Ok(offer) => {
                    p.offers
                        .lock()
                        .unwrap()
                        .insert(offer.offer_id.clone(), offer.clone());
                    pb::offer_reply::Result::Offer(offer)
                }
                Err(reject) => pb::offer_reply::Result::Reject(reject),
            };
            Ok(pb::OfferReply {
                result: Some(result),
            })
        })
    }

    fn respond<'a>(
        &'a self,
        peer: &'a Candidate,
        response: pb::OfferResponse,
    ) -> BoxFuture<'a, Result<pb::OfferResponseReply, tonic::Status>> {
        use pb::{offer_response::Decision, offer_response_reply::Result as R};
        Box::pin(async move {
            let p = self.provider(peer)?;
            let offer = p.offers.lock().unwrap().get(&response.offer_id).cloned();
            let Some(offer) = offer else {
                return Err(tonic::Status::not_found("unknown offer"));
            };
            let result = match response.decision.unwrap() {
                Decision::Accept(_) => {
                    p.log("accept");
                    let id = format!("p-{}", offer.offer_id);
                    p.accepted.lock().unwrap().insert(id.clone(), offer);
                    R::Accepted(pb::Accepted { arrangement_id: id })
                }
                Decision::Counter(counter) => {
                    p.log("counter");
                    match p.policy.answer_counter(&offer, &counter) {
                        Ok(next) => {
                            p.offers
                                .lock()
                                .unwrap()
                                .insert(next.offer_id.clone(), next.clone());
                            R::CounterOffer(next)
                        }
                        Err(reject) => R::Reject(reject),
                    }
                }
                Decision::Decline(_) => {
                    p.log("decline");
                    R::Declined(pb::Declined {})
                }
            };
            Ok(pb::OfferResponseReply {
                result: Some(result),
            })
        })
    }

    fn activate<'a>(
        &'a self,
        peer: &'a Candidate,
        request: pb::ActivateRequest,
    ) -> BoxFuture<'a, Result<pb::Arrangement, tonic::Status>> {
        Box::pin(async move {
            let p = self.provider(peer)?;
            p.log("activate");
            if p.behaviour == Behaviour::FailActivate {
                return Err(tonic::Status::unavailable("decap allow-list is full"));
            }
            if request.tunnel_sources != ["203.0.113.1"] {
                return Err(tonic::Status::invalid_argument("unexpected tunnel sources"));
            }
            if !request.agreement_id.is_empty() {
                let agreement = p
                    .policy
                    .agreement(&request.agreement_id, &PRIMARY)
                    .ok_or_else(|| tonic::Status::not_found("unknown agreement"))?;
                let terms = agreement
                    .terms_for(
                        request.requirements.as_ref().unwrap(),
                        p.id,
                        &p.policy.settings().modes,
                        now_ms(),
                    )
                    .map_err(|r| tonic::Status::failed_precondition(r.detail))?;
                return Ok(p.arrangement(
                    format!("lt-{}", request.agreement_id),
                    terms,
                    request.agreement_id,
                ));
            }
            let terms = p
                .accepted
                .lock()
                .unwrap()
                .get(&request.arrangement_id)
                .cloned()
                .ok_or_else(|| tonic::Status::not_found("unknown arrangement"))?;
            Ok(p.arrangement(request.arrangement_id, terms, String::new()))
        })
    }

    fn heartbeat<'a>(
        &'a self,
        peer: &'a Candidate,
        request: pb::HeartbeatRequest,
    ) -> BoxFuture<'a, Result<pb::HeartbeatReply, tonic::Status>> {
        Box::pin(async move {
            let p = self.provider(peer)?;
            p.log("heartbeat");
            let known = p
                .arrangements
                .lock()
                .unwrap()
                .contains_key(&request.arrangement_id);
            if !known {
                return Err(tonic::Status::not_found("unknown arrangement"));
            }
            Ok(pb::HeartbeatReply {
                state: pb::ArrangementState::Active as i32,
                usage: Some(pb::Usage::default()),
            })
        })
    }
}

/// The primary's settings: pays at most 20 000 per GB and 2 000 per 1000 connections.
fn primary_settings() -> PolicySettings {
    PolicySettings {
        max_price_per_gb_micros: 20_000,
        max_price_per_1000_connections_micros: 2_000,
        ..PolicySettings::default()
    }
}

/// A provider's settings: allows the primary, sells at `gb`/`conn` list prices.
fn provider_settings(gb: u64, conn: u64) -> PolicySettings {
    PolicySettings {
        allow: vec![RuleSubject::Fingerprint(PRIMARY)],
        price_per_gb_micros: gb,
        price_per_1000_connections_micros: conn,
        ..PolicySettings::default()
    }
}

struct Provider {
    n: u8,
    settings: PolicySettings,
    spare_conn: u32,
    behaviour: Behaviour,
    reputation: Option<u32>,
    long_term: Vec<LongTerm>,
}

fn provider(n: u8, settings: PolicySettings, spare_conn: u32) -> Provider {
    Provider {
        n,
        settings,
        spare_conn,
        behaviour: Behaviour::Normal,
        reputation: None,
        long_term: Vec::new(),
    }
}

struct World {
    store: Store,
    primary: Policy,
    negotiator: Negotiator,
    candidates: Vec<Candidate>,
    fakes: HashMap<u8, Arc<FakeProvider>>,
}

impl World {
    fn calls(&self, n: u8) -> Vec<String> {
        self.fakes[&n].calls()
    }

    fn arrangement_with(&self, n: u8, outcome_rows: &[ArrangementRecord]) -> ArrangementRecord {
        outcome_rows
            .iter()
            .find(|r| r.peer == fp(n))
            .cloned()
            .unwrap_or_else(|| panic!("no arrangement with provider {n}"))
    }
}

fn world(primary: PolicySettings, providers: Vec<Provider>, long_term: Vec<LongTerm>) -> World {
    let store = Store::open_in_memory().unwrap();
    let policy = Policy::new(PRIMARY, primary, long_term, Some(store.clone())).unwrap();
    let mut fakes = HashMap::new();
    let mut candidates = Vec::new();
    for p in providers {
        let id = fp(p.n);
        let fake = Arc::new(FakeProvider {
            id,
            behaviour: p.behaviour,
            policy: Policy::new(id, p.settings, p.long_term, None).unwrap(),
            spare: pb::Capacity {
                new_connections_per_s: p.spare_conn,
                egress_mbps: 10_000,
                storage_bytes: 1 << 30,
            },
            offers: Mutex::default(),
            arrangements: Mutex::default(),
            accepted: Mutex::default(),
            calls: Mutex::default(),
        });
        candidates.push(Candidate {
            fingerprint: id,
            advert: pb::Advertisement {
                node_id: id.0.to_vec(),
                name: format!("provider-{}", p.n),
                organisation: format!("org-{}", p.n),
                modes: vec![pb::RedirectionMode::DsrGue as i32],
                spare: Some(fake.spare),
                expires_at_ms: now_ms() + 60_000,
                ..Default::default()
            },
            reputation_ppm: p.reputation,
            trust: TrustLevel::Allowed,
        });
        fakes.insert(p.n, fake);
    }
    let client = Arc::new(FakePeers {
        providers: fakes.values().map(|f| (f.id, f.clone())).collect(),
    });
    let negotiator = Negotiator::new(
        policy.clone(),
        store.clone(),
        client,
        LocalEndpoints {
            tunnel_sources: vec!["203.0.113.1".to_owned()],
            endpoints: pb::Endpoints {
                control: "127.0.0.1:7443".to_owned(),
                ..Default::default()
            },
        },
    )
    .with_timeout(Duration::from_millis(300));
    World {
        store,
        primary: policy,
        negotiator,
        candidates,
        fakes,
    }
}

fn requirements(id: &str, conn: u32) -> pb::ServiceRequirements {
    pb::ServiceRequirements {
        request_id: id.to_owned(),
        service: Some(pb::ServiceSpec {
            name: "web".to_owned(),
            addresses: vec!["198.51.100.10:443".to_owned()],
            host_names: vec!["www.example.org".to_owned()],
        }),
        manifest: None,
        capacity: Some(pb::Capacity {
            new_connections_per_s: conn,
            egress_mbps: 100,
            storage_bytes: 0,
        }),
        duration_s: 600,
        max_price: Some(pb::Price {
            per_gb_micros: 20_000,
            per_1000_connections_micros: 2_000,
            currency: "EUR".to_owned(),
        }),
        min_sla: Some(pb::SlaTerms {
            availability_ppm: 990_000,
            p99_latency_ms: 500,
        }),
        modes: vec![pb::RedirectionMode::DsrGue as i32],
    }
}

fn states(store: &Store, id: &str) -> Vec<State> {
    store
        .events(id)
        .unwrap()
        .into_iter()
        .map(|e| e.to)
        .collect()
}

#[tokio::test]
async fn the_best_ranked_offer_wins_and_the_others_are_declined() {
    let w = world(
        primary_settings(),
        vec![
            provider(1, provider_settings(15_000, 1_500), 1000),
            provider(2, provider_settings(10_000, 1_000), 1000),
            provider(3, provider_settings(12_000, 1_200), 1000),
        ],
        vec![],
    );
    let outcome = w
        .negotiator
        .negotiate(requirements("r-best", 300), w.candidates.clone())
        .await;
    assert_eq!(
        outcome.state,
        NegotiationState::Succeeded,
        "{}",
        outcome.detail
    );
    assert_eq!(outcome.covered_conn_per_s, 300);
    assert_eq!(outcome.arrangements.len(), 1);
    let active = &outcome.arrangements[0];
    assert_eq!(active.peer, fp(2), "the cheapest provider");
    assert_eq!(active.state, State::Active);
    assert_eq!(
        active.peer_ref.as_deref().map(|r| r.starts_with("p-")),
        Some(true)
    );
    assert_eq!(
        active.peer_endpoints.as_ref().unwrap().decap_v4,
        "192.0.2.2"
    );
    assert_eq!(w.calls(2), ["request_offer", "accept", "activate"]);
    for loser in [1, 3] {
        assert_eq!(w.calls(loser), ["request_offer", "decline"]);
        let row = w.arrangement_with(loser, &outcome.attempts);
        assert_eq!(row.state, State::Cancelled);
        assert!(row.end_reason.unwrap().contains("not needed"));
        assert_eq!(
            states(&w.store, &row.id),
            [State::Requested, State::Offered, State::Cancelled]
        );
    }
    assert_eq!(
        states(&w.store, &active.id),
        [
            State::Requested,
            State::Offered,
            State::Accepted,
            State::Active
        ]
    );
    let row = w.store.negotiation("r-best").unwrap().unwrap();
    assert_eq!(row.state, NegotiationState::Succeeded);
    assert_eq!(row.covered_conn_per_s, 300);
    assert!(row.ended_ms.is_some());
}

#[tokio::test]
async fn on_equal_price_lower_latency_then_reputation_win() {
    let fast = PolicySettings {
        sla_p99_latency_ms: 50,
        ..provider_settings(10_000, 1_000)
    };
    let mut reputed = provider(2, provider_settings(10_000, 1_000), 1000);
    reputed.reputation = Some(900_000);
    let mut unknown = provider(3, provider_settings(10_000, 1_000), 1000);
    unknown.reputation = None;
    let w = world(
        primary_settings(),
        vec![unknown, reputed, provider(1, fast, 1000)],
        vec![],
    );
    let outcome = w
        .negotiator
        .negotiate(requirements("r-latency", 100), w.candidates.clone())
        .await;
    assert_eq!(outcome.arrangements[0].peer, fp(1), "lowest p99 first");

    let mut reputed = provider(2, provider_settings(10_000, 1_000), 1000);
    reputed.reputation = Some(900_000);
    let w = world(
        primary_settings(),
        vec![provider(3, provider_settings(10_000, 1_000), 1000), reputed],
        vec![],
    );
    let outcome = w
        .negotiator
        .negotiate(requirements("r-reputation", 100), w.candidates.clone())
        .await;
    assert_eq!(
        outcome.arrangements[0].peer,
        fp(2),
        "known reputation first"
    );
}

#[tokio::test]
async fn two_offers_cover_what_one_cannot() {
    let w = world(
        primary_settings(),
        vec![
            provider(1, provider_settings(10_000, 1_000), 1000), // grants 500
            provider(2, provider_settings(10_000, 1_000), 600),  // grants 300
            provider(3, provider_settings(10_000, 1_000), 200),  // grants 100
        ],
        vec![],
    );
    let outcome = w
        .negotiator
        .negotiate(requirements("r-two", 800), w.candidates.clone())
        .await;
    assert_eq!(
        outcome.state,
        NegotiationState::Succeeded,
        "{}",
        outcome.detail
    );
    assert_eq!(outcome.covered_conn_per_s, 800);
    let mut peers: Vec<Fingerprint> = outcome.arrangements.iter().map(|a| a.peer).collect();
    peers.sort();
    assert_eq!(
        peers,
        [fp(1), fp(2)],
        "the two largest grants at equal price"
    );
    assert_eq!(w.calls(3), ["request_offer", "decline"]);
    let active = w
        .store
        .arrangements(&p2pcdn_controller::store::ArrangementFilter {
            states: vec![State::Active],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(active.len(), 2);
}

#[tokio::test]
async fn a_price_above_the_ceiling_is_countered_once() {
    // List price 25 000 / 2 500 is above the primary's 20 000 / 2 000; the provider's floor
    // (80 %) is 20 000 / 2 000, so the counter at the ceiling is taken.
    let w = world(
        primary_settings(),
        vec![provider(1, provider_settings(25_000, 2_500), 1000)],
        vec![],
    );
    let outcome = w
        .negotiator
        .negotiate(requirements("r-counter", 100), w.candidates.clone())
        .await;
    assert_eq!(
        outcome.state,
        NegotiationState::Succeeded,
        "{}",
        outcome.detail
    );
    assert_eq!(
        w.calls(1),
        ["request_offer", "counter", "accept", "activate"]
    );
    let active = &outcome.arrangements[0];
    let price = active.terms.as_ref().unwrap().price.clone().unwrap();
    assert_eq!(price.per_gb_micros, 20_000);
    assert_eq!(price.per_1000_connections_micros, 2_000);
    assert_eq!(
        states(&w.store, &active.id),
        [
            State::Requested,
            State::Offered,
            State::Offered,
            State::Accepted,
            State::Active
        ]
    );
    let events = w.store.events(&active.id).unwrap();
    assert!(
        events[2].detail.starts_with("counter-offer"),
        "{:?}",
        events[2]
    );
}

#[tokio::test]
async fn a_refused_counter_cancels_and_the_next_offer_covers() {
    // Provider 1 is the cheapest for this mix (cheap connections) but asks 25 000 per GB,
    // above the primary's 20 000 ceiling. The request tolerates 30 000 (so it makes an offer);
    // the primary counters at its ceiling, below provider 1's 90 % floor (22 500).
    let stubborn = PolicySettings {
        min_price_percent: 90,
        ..provider_settings(25_000, 100)
    };
    let w = world(
        primary_settings(),
        vec![
            provider(1, stubborn, 1000),
            // Dearer per connection than the countered price but within the ceiling.
            provider(2, provider_settings(20_000, 2_000), 1000),
        ],
        vec![],
    );
    let mut req = requirements("r-refused", 100);
    req.max_price = Some(pb::Price {
        per_gb_micros: 30_000,
        per_1000_connections_micros: 3_000,
        currency: "EUR".to_owned(),
    });
    let outcome = w.negotiator.negotiate(req, w.candidates.clone()).await;
    assert_eq!(
        outcome.state,
        NegotiationState::Succeeded,
        "{}",
        outcome.detail
    );
    assert_eq!(outcome.arrangements[0].peer, fp(2));
    let refused = w.arrangement_with(1, &outcome.attempts);
    assert_eq!(refused.state, State::Cancelled);
    assert!(
        refused
            .end_reason
            .as_deref()
            .unwrap()
            .contains("counter refused"),
        "{refused:?}"
    );
    assert_eq!(w.calls(1), ["request_offer", "counter"]);
}

#[tokio::test]
async fn a_provider_policy_rejection_is_recorded_with_its_reason() {
    // The provider's operator denied the primary after the connection was set up (the fake
    // hands the provider the handshake's trust, `Allowed`): the offer request is rejected.
    let closed = PolicySettings {
        deny: vec![RuleSubject::Fingerprint(PRIMARY)],
        ..provider_settings(10_000, 1_000)
    };
    let w = world(primary_settings(), vec![provider(1, closed, 1000)], vec![]);
    let outcome = w
        .negotiator
        .negotiate(requirements("r-denied", 100), w.candidates.clone())
        .await;
    assert_eq!(outcome.state, NegotiationState::Failed);
    assert_eq!(outcome.covered_conn_per_s, 0);
    assert!(outcome.arrangements.is_empty());
    let row = w.arrangement_with(1, &outcome.attempts);
    assert_eq!(row.state, State::Cancelled);
    assert!(
        row.end_reason
            .as_deref()
            .unwrap()
            .contains("REJECT_REASON_POLICY_DENIED"),
        "{row:?}"
    );
    assert_eq!(
        w.store.negotiation("r-denied").unwrap().unwrap().state,
        NegotiationState::Failed
    );
}

#[tokio::test]
async fn a_candidate_the_primary_denies_is_never_asked() {
    let w = world(
        primary_settings(),
        vec![
            provider(1, provider_settings(1, 1), 1000),
            provider(2, provider_settings(10_000, 1_000), 1000),
        ],
        vec![],
    );
    w.store
        .add_policy_rule(&PolicyRule {
            id: 0,
            action: RuleAction::Deny,
            subject: RuleSubject::Organisation("org-1".to_owned()),
            note: "test".to_owned(),
            created_ms: now_ms(),
        })
        .unwrap();
    w.primary.reload_rules().unwrap();
    let outcome = w
        .negotiator
        .negotiate(requirements("r-deny", 100), w.candidates.clone())
        .await;
    assert_eq!(outcome.state, NegotiationState::Succeeded);
    assert_eq!(outcome.arrangements[0].peer, fp(2));
    assert!(
        w.calls(1).is_empty(),
        "denied peer contacted: {:?}",
        w.calls(1)
    );
}

#[tokio::test]
async fn an_unresponsive_candidate_times_out_and_the_next_covers() {
    let mut silent = provider(1, provider_settings(1, 1), 1000);
    silent.behaviour = Behaviour::Hang;
    let w = world(
        primary_settings(),
        vec![silent, provider(2, provider_settings(10_000, 1_000), 1000)],
        vec![],
    );
    // One at a time: the silent candidate is asked alone first.
    let negotiator = w.negotiator.clone().with_k(1);
    let started = std::time::Instant::now();
    let outcome = negotiator
        .negotiate(requirements("r-timeout", 100), w.candidates.clone())
        .await;
    let elapsed = started.elapsed();
    assert_eq!(
        outcome.state,
        NegotiationState::Succeeded,
        "{}",
        outcome.detail
    );
    assert_eq!(outcome.arrangements[0].peer, fp(2));
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    let timed_out = w.arrangement_with(1, &outcome.attempts);
    assert_eq!(timed_out.state, State::Cancelled);
    assert_eq!(
        timed_out.end_reason.as_deref(),
        Some("no offer within 300 ms")
    );
    assert_eq!(w.calls(1), ["request_offer"]);
}

#[tokio::test]
async fn a_failed_activation_is_cancelled_and_another_offer_covers() {
    let mut broken = provider(1, provider_settings(1_000, 100), 1000);
    broken.behaviour = Behaviour::FailActivate;
    let w = world(
        primary_settings(),
        vec![broken, provider(2, provider_settings(10_000, 1_000), 1000)],
        vec![],
    );
    let outcome = w
        .negotiator
        .negotiate(requirements("r-activate", 100), w.candidates.clone())
        .await;
    assert_eq!(
        outcome.state,
        NegotiationState::Succeeded,
        "{}",
        outcome.detail
    );
    assert_eq!(outcome.arrangements[0].peer, fp(2));
    let failed = w.arrangement_with(1, &outcome.attempts);
    assert_eq!(
        states(&w.store, &failed.id),
        [
            State::Requested,
            State::Offered,
            State::Accepted,
            State::Cancelled
        ]
    );
    assert!(
        failed
            .end_reason
            .unwrap()
            .contains("decap allow-list is full")
    );
    // Provider 2's offer was kept while provider 1 was tried, then accepted.
    assert_eq!(w.calls(2), ["request_offer", "accept", "activate"]);
}

#[tokio::test]
async fn what_no_one_can_cover_is_reported_as_partial() {
    let w = world(
        primary_settings(),
        vec![provider(1, provider_settings(10_000, 1_000), 400)],
        vec![],
    );
    let outcome = w
        .negotiator
        .negotiate(requirements("r-partial", 1000), w.candidates.clone())
        .await;
    assert_eq!(
        outcome.state,
        NegotiationState::Partial,
        "{}",
        outcome.detail
    );
    assert_eq!(outcome.requested_conn_per_s, 1000);
    assert_eq!(outcome.covered_conn_per_s, 200);
    let row = w.store.negotiation("r-partial").unwrap().unwrap();
    assert_eq!(row.state, NegotiationState::Partial);
    assert_eq!(row.covered_conn_per_s, 200);
    // No candidates at all: failed, and said so.
    let outcome = w
        .negotiator
        .negotiate(requirements("r-none", 10), vec![])
        .await;
    assert_eq!(outcome.state, NegotiationState::Failed);
    assert_eq!(outcome.detail, "no usable candidate");
    // The same request id twice is refused rather than mixed with the first.
    let again = w
        .negotiator
        .negotiate(requirements("r-partial", 10), w.candidates.clone())
        .await;
    assert_eq!(again.state, NegotiationState::Failed);
    assert!(again.detail.starts_with("not started"), "{}", again.detail);
}

#[tokio::test]
async fn a_long_term_peer_activates_in_two_steps() {
    let agreement = |role| LongTerm {
        agreement_id: "acme-2026".to_owned(),
        peer: if role == Role::Primary {
            fp(1)
        } else {
            PRIMARY
        },
        role,
        new_connections_per_s: 500,
        egress_mbps: 1000,
        price_per_gb_micros: 5_000,
        price_per_1000_connections_micros: 500,
        currency: "EUR".to_owned(),
        sla_availability_ppm: 999_900,
        sla_p99_latency_ms: 80,
        penalty_credit_percent: 5,
        penalty_max_percent: 30,
        duration_s: 3600,
        standby: false,
    };
    let mut peer = provider(1, PolicySettings::default(), 1000);
    peer.long_term = vec![agreement(Role::Provider)];
    let w = world(
        primary_settings(),
        vec![peer],
        vec![agreement(Role::Primary)],
    );
    let lt = w.primary.agreement("acme-2026", &fp(1)).unwrap();
    let record = w
        .negotiator
        .activate_long_term(&lt, &w.candidates[0], requirements("r-lt", 400))
        .await
        .unwrap();
    assert_eq!(w.calls(1), ["activate", "heartbeat"], "no negotiation");
    assert_eq!(record.state, State::Active);
    assert_eq!(record.agreement_id.as_deref(), Some("acme-2026"));
    assert_eq!(record.peer_ref.as_deref(), Some("lt-acme-2026"));
    assert_eq!(
        record.terms.unwrap().price.unwrap().per_gb_micros,
        5_000,
        "the agreement's price"
    );
    assert_eq!(
        states(&w.store, &record.id),
        [State::Accepted, State::Active]
    );
    assert_eq!(
        w.store.negotiation("r-lt").unwrap().unwrap().state,
        NegotiationState::Succeeded
    );
    // More than the agreement allows is refused before any call.
    let err = w
        .negotiator
        .activate_long_term(&lt, &w.candidates[0], requirements("r-lt-big", 501))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("acme-2026"), "{err}");
    assert_eq!(w.calls(1).len(), 2);
}

#[test]
fn outcomes_and_durations_are_counted() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let w = world(
                primary_settings(),
                vec![provider(1, provider_settings(10_000, 1_000), 1000)],
                vec![],
            );
            let ok = w
                .negotiator
                .negotiate(requirements("r-m1", 100), w.candidates.clone())
                .await;
            assert_eq!(ok.state, NegotiationState::Succeeded);
            let failed = w
                .negotiator
                .negotiate(requirements("r-m2", 100), vec![])
                .await;
            assert_eq!(failed.state, NegotiationState::Failed);
        });
    });
    let text = handle.render();
    assert!(
        text.contains(r#"p2pcdn_negotiations_total{outcome="succeeded",kind="short_term"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"p2pcdn_negotiations_total{outcome="failed",kind="short_term"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("p2pcdn_negotiation_duration_seconds"),
        "{text}"
    );
    assert!(
        text.contains(r#"p2pcdn_negotiation_offers_total{result="offered"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn the_mediators_requirements_negotiate_end_to_end() {
    let service: p2pcdn_controller::config::ServiceConfig = toml::from_str(
        r#"
name = "shop"
addresses = ["198.51.100.10:443"]
duration_s = 900
"#,
    )
    .unwrap();
    let resources = p2pcdn_controller::config::ResourcesConfig::default();
    let w = world(
        primary_settings(),
        vec![
            provider(1, provider_settings(10_000, 1_000), 300), // grants 150
            provider(2, provider_settings(12_000, 1_000), 300), // grants 150
        ],
        vec![],
    );
    let req =
        p2pcdn_controller::mediator::requirements(&service, &resources, &w.primary, 250, now_ms());
    let outcome = w
        .negotiator
        .negotiate(req.clone(), w.candidates.clone())
        .await;
    assert_eq!(
        outcome.state,
        NegotiationState::Succeeded,
        "{}",
        outcome.detail
    );
    // Offers are taken whole (prices are per use): 150 + 150 for the 250 asked.
    assert_eq!(outcome.covered_conn_per_s, 300);
    assert_eq!(outcome.arrangements.len(), 2);
    // The cheaper provider was asked for everything and granted 150; the other one covers the
    // rest out of the same round of offers.
    assert_eq!(outcome.arrangements[0].peer, fp(1));
    for a in &outcome.arrangements {
        assert_eq!(a.service.as_ref().unwrap().name, "shop");
        assert_eq!(a.terms.as_ref().unwrap().duration_s, 900);
        assert!(a.expires_ms.unwrap() > now_ms());
    }
    assert_eq!(
        w.store.negotiation(&req.request_id).unwrap().unwrap().state,
        NegotiationState::Succeeded
    );
}
