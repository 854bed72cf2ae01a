//! The peering agent: the provider side of `peering.v1` ([`Agent`], a tonic service) and the
//! primary side's gRPC client ([`GrpcPeers`]).
//!
//! The provider answers requirements with offers its policy allows and its spare capacity
//! covers, turns accepted offers into arrangements, activates them (allow-listing the
//! primary's tunnel sources through [`ArrangementHooks`]), records heartbeats in the usage
//! ledger and settles on disband. Every state change goes through the store's transition
//! check, so a request out of order gets `FailedPrecondition`, never a corrupt arrangement.
//! The caller's identity always comes from the TLS layer ([`transport::peer_of`]).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::Mutex;
use tonic::{Request, Response, Status, transport::Channel};

use crate::{
    identity::NodeIdentity,
    model::{Fingerprint, Role, UnixMs, now_ms},
    negotiation::{self, BoxFuture},
    policy::{Policy, new_id, reject},
    proto::{self, pb},
    registry::{Candidate, Registry},
    store::{
        ArrangementChanges, ArrangementFilter, ArrangementRecord, Liveness, PeerRecord,
        ReputationRecord, Store, StoreError, UsageEntry, UsageKind, UsageSource,
    },
    tls::{self, CaBundle, PeerAdmission},
    transport::{self, PeerIdentity},
};

type State = pb::ArrangementState;

/// What activating or ending an arrangement does outside the store (the data plane: the
/// provider's decapsulation allow-list, the primary's peers and Maglev weights). The daemon
/// plugs the data plane in here; [`LogHooks`] only logs.
pub trait ArrangementHooks: Send + Sync + 'static {
    /// The arrangement became active on this node.
    fn activated(&self, arrangement: &ArrangementRecord) -> Result<(), String>;
    /// The arrangement ended (disbanded or cancelled) on this node.
    fn ended(&self, arrangement: &ArrangementRecord);
    /// Record this side's latest usage count of the active arrangement in the ledger now
    /// (before a heartbeat answer or a final count is taken from it). Default: nothing.
    fn count(&self, _arrangement: &ArrangementRecord) {}
}

/// Hooks that only log (a control plane without a data plane: tests, dry runs).
#[derive(Debug, Default)]
pub struct LogHooks;

impl ArrangementHooks for LogHooks {
    fn activated(&self, a: &ArrangementRecord) -> Result<(), String> {
        tracing::info!(arrangement = %a.id, role = a.role.as_str(), peer = %a.peer.short(),
            tunnel_sources = ?a.tunnel_sources, "arrangement active");
        Ok(())
    }

    fn ended(&self, a: &ArrangementRecord) {
        tracing::info!(arrangement = %a.id, role = a.role.as_str(), peer = %a.peer.short(),
            reason = a.end_reason.as_deref().unwrap_or(""), "arrangement ended");
    }
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::IllegalTransition { .. } | StoreError::UnexpectedState { .. } => {
            Status::failed_precondition(e.to_string())
        }
        StoreError::UnknownArrangement(_) => Status::not_found(e.to_string()),
        other => {
            tracing::error!(error = %other, "store failure");
            Status::internal("the provider's store failed; try again")
        }
    }
}

/// The provider side of `peering.v1`.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<AgentInner>,
}

struct AgentInner {
    identity: Arc<NodeIdentity>,
    store: Store,
    policy: Arc<Policy>,
    registry: Registry,
    hooks: Arc<dyn ArrangementHooks>,
    /// This node's own capacity (the policy decides which share of it may be offered).
    capacity: pb::Capacity,
    /// Serialises offer making, so two concurrent requests cannot both get the last capacity.
    offers: Mutex<()>,
    shutting_down: AtomicBool,
}

impl Agent {
    pub fn new(
        identity: Arc<NodeIdentity>,
        store: Store,
        policy: Arc<Policy>,
        registry: Registry,
        capacity: pb::Capacity,
        hooks: Arc<dyn ArrangementHooks>,
    ) -> Self {
        Self {
            inner: Arc::new(AgentInner {
                identity,
                store,
                policy,
                registry,
                hooks,
                capacity,
                offers: Mutex::new(()),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    /// From now on every request for an offer is rejected with `SHUTTING_DOWN`.
    pub fn shut_down(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Capacity not yet promised: our capacity minus what open offers, accepted and active
    /// arrangements (provider side) hold. The policy offers its configured share of it.
    pub fn spare(&self, now: UnixMs) -> Result<pb::Capacity, StoreError> {
        let total = &self.inner.capacity;
        let mut conn = u64::from(total.new_connections_per_s);
        let mut mbps = u64::from(total.egress_mbps);
        let mut storage = total.storage_bytes;
        for a in self.inner.store.arrangements(&ArrangementFilter {
            role: Some(Role::Provider),
            states: vec![State::Offered, State::Accepted, State::Active],
            ..ArrangementFilter::default()
        })? {
            let holds = match a.state {
                State::Accepted | State::Active => true,
                State::Offered => a.terms.as_ref().is_some_and(|t| t.expires_at_ms > now),
                _ => false,
            };
            if let (true, Some(granted)) = (holds, a.terms.as_ref().and_then(|t| t.granted)) {
                conn = conn.saturating_sub(u64::from(granted.new_connections_per_s));
                mbps = mbps.saturating_sub(u64::from(granted.egress_mbps));
                storage = storage.saturating_sub(granted.storage_bytes);
            }
        }
        Ok(pb::Capacity {
            new_connections_per_s: u32::try_from(conn).unwrap_or(u32::MAX),
            egress_mbps: u32::try_from(mbps).unwrap_or(u32::MAX),
            storage_bytes: storage,
        })
    }

    fn own_endpoints(&self) -> pb::Endpoints {
        self.inner
            .registry
            .own()
            .and_then(|l| l.advert.endpoints)
            .unwrap_or_default()
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<PeerIdentity, Status> {
        transport::peer_of(request)
    }

    /// Records `caller`'s public key (from its TLS certificate) unless one is pinned already.
    fn pin(&self, caller: &PeerIdentity) {
        if caller.spki_der.is_empty() {
            return;
        }
        let store = &self.inner.store;
        let existing = match store.peer(&caller.fingerprint) {
            Ok(Some(p)) if !p.pinned_spki.is_empty() => return,
            Ok(existing) => existing,
            Err(e) => {
                tracing::warn!(peer = %caller.fingerprint.short(), error = %e, "cannot read the peer");
                return;
            }
        };
        let now = now_ms();
        let record = PeerRecord {
            fingerprint: caller.fingerprint,
            name: existing
                .as_ref()
                .map(|p| p.name.clone())
                .unwrap_or_default(),
            organisation: caller.organisation.clone(),
            trust: existing.as_ref().map_or(caller.trust, |p| p.trust),
            liveness: existing.as_ref().map_or(Liveness::Alive, |p| p.liveness),
            liveness_ms: existing.as_ref().map_or(now, |p| p.liveness_ms),
            control_endpoint: existing
                .as_ref()
                .map(|p| p.control_endpoint.clone())
                .unwrap_or_default(),
            first_seen_ms: existing.as_ref().map_or(now, |p| p.first_seen_ms),
            last_seen_ms: now,
            pinned_spki: caller.spki_der.clone(),
        };
        if let Err(e) = store.upsert_peer(&record) {
            tracing::warn!(peer = %caller.fingerprint.short(), error = %e, "cannot pin the peer's key");
        }
    }

    /// The arrangement `id` if `caller` is its other side: our id, or (when a provider
    /// disbands an arrangement we are the primary of) the provider's id we keep as `peer_ref`.
    fn owned(&self, id: &str, caller: &PeerIdentity) -> Result<ArrangementRecord, Status> {
        match self.inner.store.arrangement(id).map_err(store_status)? {
            Some(a) if a.peer == caller.fingerprint => return Ok(a),
            _ => {}
        }
        let theirs = self
            .inner
            .store
            .arrangements(&ArrangementFilter {
                role: Some(Role::Primary),
                peer: Some(caller.fingerprint),
                ..ArrangementFilter::default()
            })
            .map_err(store_status)?
            .into_iter()
            .find(|a| a.peer_ref.as_deref() == Some(id));
        // Someone else's arrangement looks exactly like a missing one.
        theirs.ok_or_else(|| Status::not_found(format!("no arrangement {id:?} with you")))
    }

    fn by_offer(&self, offer_id: &str, caller: &PeerIdentity) -> Result<ArrangementRecord, Status> {
        let found = self
            .inner
            .store
            .arrangements(&ArrangementFilter {
                role: Some(Role::Provider),
                peer: Some(caller.fingerprint),
                ..ArrangementFilter::default()
            })
            .map_err(store_status)?
            .into_iter()
            .find(|a| a.offer_id.as_deref() == Some(offer_id));
        found.ok_or_else(|| Status::not_found(format!("no offer {offer_id:?} to you")))
    }

    fn cancel(&self, a: &ArrangementRecord, detail: &str) -> Result<ArrangementRecord, Status> {
        let ended = self
            .inner
            .store
            .transition(
                &a.id,
                &[State::Requested, State::Offered, State::Accepted],
                State::Cancelled,
                now_ms(),
                detail,
                ArrangementChanges {
                    end_reason: Some(detail.to_owned()),
                    ..ArrangementChanges::default()
                },
            )
            .map_err(store_status)?;
        self.inner.hooks.ended(&ended);
        Ok(ended)
    }

    /// Our usage count for an arrangement: the ledger's local entries.
    fn local_usage(&self, id: &str) -> pb::Usage {
        match self.inner.store.usage_totals(id) {
            Ok((local, _peer)) => pb::Usage {
                connections: local.connections,
                bytes: local.bytes,
                packets: local.packets,
                measured_at_ms: now_ms(),
            },
            Err(_) => pb::Usage {
                measured_at_ms: now_ms(),
                ..pb::Usage::default()
            },
        }
    }

    fn activate_long_term(
        &self,
        caller: &PeerIdentity,
        m: &pb::ActivateRequest,
    ) -> Result<ArrangementRecord, Status> {
        let Some(agreement) = self
            .inner
            .policy
            .agreement(&m.agreement_id, &caller.fingerprint)
        else {
            return Err(Status::permission_denied(format!(
                "no long-term agreement {:?} with you",
                m.agreement_id
            )));
        };
        let Some(req) = m.requirements.as_ref() else {
            return Err(Status::invalid_argument(
                "a long-term activation carries the requirements",
            ));
        };
        let now = now_ms();
        if agreement.role != Role::Provider {
            return Err(Status::permission_denied(format!(
                "agreement {:?} has you as the provider, not us",
                m.agreement_id
            )));
        }
        let terms = agreement
            .terms_for(
                req,
                self.inner.identity.fingerprint,
                &self.inner.policy.settings().modes,
                now,
            )
            .map_err(|r| Status::failed_precondition(r.detail))?;
        let mut record = ArrangementRecord::new(
            new_id("arr"),
            Role::Provider,
            caller.fingerprint,
            State::Accepted,
            req.request_id.clone(),
            now,
        );
        record.agreement_id = Some(m.agreement_id.clone());
        record.service = req.service.clone();
        record.requirements = Some(req.clone());
        record.terms = Some(terms);
        self.inner
            .store
            .insert_arrangement(&record)
            .map_err(store_status)?;
        Ok(record)
    }
}

#[tonic::async_trait]
impl pb::peering_server::Peering for Agent {
    async fn advertise(
        &self,
        request: Request<pb::SignedAdvertisement>,
    ) -> Result<Response<pb::AdvertiseAck>, Status> {
        let caller = self.caller(&request)?;
        let signed = request.into_inner();
        let advert = proto::open_advertisement(&signed, now_ms())?;
        if Fingerprint::from_slice(&advert.node_id).ok() != Some(caller.fingerprint) {
            tracing::warn!(peer = %caller.fingerprint.short(), "advertisement for another node refused");
            return Err(Status::permission_denied(
                "an advertisement may only be pushed by the node it describes",
            ));
        }
        let stored = self
            .inner
            .registry
            .insert(&signed, now_ms())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::AdvertiseAck { stored }))
    }

    async fn request_offer(
        &self,
        request: Request<pb::ServiceRequirements>,
    ) -> Result<Response<pb::OfferReply>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        proto::validate_requirements(&req)?;
        let answer = |result| {
            Ok(Response::new(pb::OfferReply {
                result: Some(result),
            }))
        };
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return answer(pb::offer_reply::Result::Reject(reject(
                pb::RejectReason::ShuttingDown,
                "shutting down".to_owned(),
            )));
        }
        let now = now_ms();
        let reputation = self
            .inner
            .registry
            .candidates(now)
            .into_iter()
            .find(|c| c.fingerprint == caller.fingerprint)
            .and_then(|c| c.reputation_ppm);
        let _guard = self.inner.offers.lock().await;
        let spare = self.spare(now).map_err(store_status)?;
        let offer = match self
            .inner
            .policy
            .offer_for(&req, &caller, reputation, spare, now)
        {
            Ok(offer) => offer,
            Err(rejected) => {
                tracing::info!(peer = %caller.fingerprint.short(), request = %req.request_id,
                    reason = ?rejected.reason(), detail = %rejected.detail, "requirements rejected");
                metrics::counter!("p2pcdn_offers_total", "outcome" => "rejected").increment(1);
                return answer(pb::offer_reply::Result::Reject(rejected));
            }
        };
        let mut record = ArrangementRecord::new(
            new_id("arr"),
            Role::Provider,
            caller.fingerprint,
            State::Offered,
            req.request_id.clone(),
            now,
        );
        record.offer_id = Some(offer.offer_id.clone());
        record.terms = Some(offer.clone());
        record.service = req.service.clone();
        record.requirements = Some(req);
        self.inner
            .store
            .insert_arrangement(&record)
            .map_err(store_status)?;
        metrics::counter!("p2pcdn_offers_total", "outcome" => "offered").increment(1);
        answer(pb::offer_reply::Result::Offer(offer))
    }

    async fn respond(
        &self,
        request: Request<pb::OfferResponse>,
    ) -> Result<Response<pb::OfferResponseReply>, Status> {
        use pb::{offer_response::Decision, offer_response_reply::Result as R};
        let caller = self.caller(&request)?;
        let m = request.into_inner();
        proto::validate_offer_response(&m)?;
        let reply = |result| {
            Ok(Response::new(pb::OfferResponseReply {
                result: Some(result),
            }))
        };
        let a = self.by_offer(&m.offer_id, &caller)?;
        let now = now_ms();
        let Some(terms) = a.terms.clone() else {
            return Err(Status::internal("offer without terms"));
        };
        if let (State::Accepted, Some(Decision::Decline(decline))) = (a.state, &m.decision) {
            // The primary accepted, then lost track (it restarted before activating): it
            // takes the acceptance back.
            self.cancel(
                &a,
                &format!("declined after acceptance: {}", decline.reason),
            )?;
            return reply(R::Declined(pb::Declined {}));
        }
        if a.state != State::Offered {
            return reply(R::Reject(reject(
                pb::RejectReason::Unknown,
                format!("offer {} is no longer open", m.offer_id),
            )));
        }
        if terms.expires_at_ms <= now {
            self.cancel(&a, "offer expired before an answer")?;
            return reply(R::Reject(reject(
                pb::RejectReason::Expired,
                format!("offer {} expired", m.offer_id),
            )));
        }
        match m.decision {
            Some(Decision::Accept(_)) => {
                let _guard = self.inner.offers.lock().await;
                self.inner
                    .store
                    .transition(
                        &a.id,
                        &[State::Offered],
                        State::Accepted,
                        now,
                        "offer accepted",
                        ArrangementChanges::default(),
                    )
                    .map_err(store_status)?;
                metrics::counter!("p2pcdn_offers_total", "outcome" => "accepted").increment(1);
                reply(R::Accepted(pb::Accepted {
                    arrangement_id: a.id,
                }))
            }
            Some(Decision::Counter(counter)) => {
                match self.inner.policy.answer_counter(&terms, &counter) {
                    Ok(revised) => {
                        self.inner
                            .store
                            .transition(
                                &a.id,
                                &[State::Offered],
                                State::Offered,
                                now,
                                "counter-offer answered with a revised offer",
                                ArrangementChanges {
                                    offer_id: Some(revised.offer_id.clone()),
                                    terms: Some(revised.clone()),
                                    ..ArrangementChanges::default()
                                },
                            )
                            .map_err(store_status)?;
                        metrics::counter!("p2pcdn_offers_total", "outcome" => "countered")
                            .increment(1);
                        reply(R::CounterOffer(revised))
                    }
                    Err(rejected) => {
                        self.cancel(&a, &format!("counter refused: {}", rejected.detail))?;
                        reply(R::Reject(rejected))
                    }
                }
            }
            Some(Decision::Decline(decline)) => {
                self.cancel(&a, &format!("declined: {}", decline.reason))?;
                reply(R::Declined(pb::Declined {}))
            }
            None => Err(Status::invalid_argument("an answer needs a decision")),
        }
    }

    async fn activate(
        &self,
        request: Request<pb::ActivateRequest>,
    ) -> Result<Response<pb::Arrangement>, Status> {
        let caller = self.caller(&request)?;
        let m = request.into_inner();
        proto::validate_activate(&m)?;
        let a = if m.arrangement_id.is_empty() {
            self.activate_long_term(&caller, &m)?
        } else {
            self.owned(&m.arrangement_id, &caller)?
        };
        // The primary's key, pinned from this connection if gossip has not brought its advert
        // yet: activation verifies the primary's signed manifest with it.
        self.pin(&caller);
        let now = now_ms();
        let duration_ms = a.terms.as_ref().map_or(0, |t| {
            i64::try_from(t.duration_s).unwrap_or(i64::MAX / 2) * 1000
        });
        let active = self
            .inner
            .store
            .transition(
                &a.id,
                &[State::Accepted],
                State::Active,
                now,
                if m.agreement_id.is_empty() {
                    "activated"
                } else {
                    "activated from a long-term agreement"
                },
                ArrangementChanges {
                    peer_endpoints: m.primary_endpoints.clone(),
                    tunnel_sources: Some(m.tunnel_sources.clone()),
                    activated_ms: Some(now),
                    expires_ms: Some(now.saturating_add(duration_ms)),
                    ..ArrangementChanges::default()
                },
            )
            .map_err(store_status)?;
        if let Err(e) = self.inner.hooks.activated(&active) {
            // The data plane refused: the arrangement must not look usable to the primary.
            tracing::error!(arrangement = %active.id, error = %e, "activation failed");
            let _ = self.inner.store.transition(
                &active.id,
                &[State::Active],
                State::Disbanded,
                now_ms(),
                &format!("activation failed: {e}"),
                ArrangementChanges {
                    end_reason: Some(format!("activation failed: {e}")),
                    ..ArrangementChanges::default()
                },
            );
            return Err(Status::unavailable(format!("cannot activate: {e}")));
        }
        metrics::counter!("p2pcdn_activations_total").increment(1);
        Ok(Response::new(arrangement_message(
            &active,
            &self.inner.identity.fingerprint,
            self.own_endpoints(),
        )))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let caller = self.caller(&request)?;
        let m = request.into_inner();
        proto::validate_heartbeat(&m)?;
        let a = self.owned(&m.arrangement_id, &caller)?;
        if a.state == State::Active
            && let Some(usage) = m.usage
        {
            self.inner
                .store
                .record_usage(&UsageEntry {
                    arrangement: a.id.clone(),
                    at_ms: now_ms(),
                    source: UsageSource::Peer,
                    kind: UsageKind::Heartbeat,
                    connections: usage.connections,
                    bytes: usage.bytes,
                    packets: usage.packets,
                })
                .map_err(store_status)?;
        }
        if a.state == State::Active {
            self.inner.hooks.count(&a);
        }
        Ok(Response::new(pb::HeartbeatReply {
            state: a.state as i32,
            usage: Some(self.local_usage(&a.id)),
        }))
    }

    async fn disband(
        &self,
        request: Request<pb::DisbandRequest>,
    ) -> Result<Response<pb::DisbandReply>, Status> {
        let caller = self.caller(&request)?;
        let m = request.into_inner();
        proto::validate_disband(&m)?;
        let a = self.owned(&m.arrangement_id, &caller)?;
        let now = now_ms();
        if let Some(usage) = m.final_usage {
            self.inner
                .store
                .record_usage(&UsageEntry {
                    arrangement: a.id.clone(),
                    at_ms: now,
                    source: UsageSource::Peer,
                    kind: UsageKind::Final,
                    connections: usage.connections,
                    bytes: usage.bytes,
                    packets: usage.packets,
                })
                .map_err(store_status)?;
        }
        if a.state == State::Active {
            self.inner.hooks.count(&a);
        }
        let ours = self.local_usage(&a.id);
        self.inner
            .store
            .record_usage(&UsageEntry {
                arrangement: a.id.clone(),
                at_ms: now,
                source: UsageSource::Local,
                kind: UsageKind::Final,
                connections: ours.connections,
                bytes: ours.bytes,
                packets: ours.packets,
            })
            .map_err(store_status)?;
        let settlement = a.terms.as_ref().map(|t| negotiation::settle(t, &ours, 0));
        let reason =
            pb::DisbandReason::try_from(m.reason).map_or("unspecified", |r| r.as_str_name());
        if let (Some(theirs), Some(mine)) = (m.settlement.as_ref(), settlement.as_ref())
            && theirs.total_micros != mine.total_micros
        {
            tracing::warn!(arrangement = %a.id, theirs = theirs.total_micros,
                ours = mine.total_micros, "settlements differ; both are recorded");
        }
        let ended = match a.state {
            State::Active | State::Disbanding => Some(
                self.inner
                    .store
                    .transition(
                        &a.id,
                        &[State::Active, State::Disbanding],
                        State::Disbanded,
                        now,
                        &format!("disbanded by the peer: {reason}"),
                        ArrangementChanges {
                            end_reason: Some(reason.to_owned()),
                            settlement: settlement.clone(),
                            ..ArrangementChanges::default()
                        },
                    )
                    .map_err(store_status)?,
            ),
            State::Requested | State::Offered | State::Accepted => {
                Some(self.cancel(&a, &format!("disbanded before activation: {reason}"))?)
            }
            // Already over: the answer is the same as the first time (idempotent).
            _ => None,
        };
        if let Some(ended) = ended.as_ref().filter(|e| e.state == State::Disbanded) {
            self.inner.hooks.ended(ended);
        }
        Ok(Response::new(pb::DisbandReply {
            final_usage: Some(ours),
            settlement: settlement.or(a.settlement),
        }))
    }

    async fn report_reputation(
        &self,
        request: Request<pb::SignedReputationReport>,
    ) -> Result<Response<pb::ReputationAck>, Status> {
        let caller = self.caller(&request)?;
        let signed = request.into_inner();
        let reporter_key = self
            .inner
            .registry
            .get(&caller.fingerprint)
            .map(|l| l.advert.public_key)
            .ok_or_else(|| {
                Status::failed_precondition("advertise yourself before reporting reputations")
            })?;
        let report = proto::open_reputation(&signed, &reporter_key, now_ms())?;
        if Fingerprint::from_slice(&report.reporter).ok() != Some(caller.fingerprint) {
            return Err(Status::permission_denied(
                "a report may only be sent by its reporter",
            ));
        }
        let subject = Fingerprint::from_slice(&report.subject)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let stored = self
            .inner
            .store
            .put_reputation(&ReputationRecord {
                subject,
                reporter: caller.fingerprint,
                sequence: report.sequence,
                score_ppm: report.score_ppm,
                samples: report.samples,
                mismatches: report.mismatches,
                unanswered: report.unanswered,
                window_end_ms: report.window_end_ms,
                received_ms: now_ms(),
                signed: prost::Message::encode_to_vec(&signed),
            })
            .map_err(store_status)?;
        Ok(Response::new(pb::ReputationAck { stored }))
    }
}

/// The wire form of an arrangement record.
pub fn arrangement_message(
    a: &ArrangementRecord,
    me: &Fingerprint,
    my_endpoints: pb::Endpoints,
) -> pb::Arrangement {
    let (primary, provider, provider_endpoints) = match a.role {
        Role::Provider => (a.peer, *me, Some(my_endpoints)),
        Role::Primary => (*me, a.peer, a.peer_endpoints.clone()),
    };
    pb::Arrangement {
        arrangement_id: a.peer_ref.clone().unwrap_or_else(|| a.id.clone()),
        primary: primary.0.to_vec(),
        provider: provider.0.to_vec(),
        terms: a.terms.clone(),
        state: a.state as i32,
        activated_at_ms: a.activated_ms.unwrap_or(0),
        expires_at_ms: a.expires_ms.unwrap_or(0),
        provider_endpoints,
        agreement_id: a.agreement_id.clone().unwrap_or_default(),
        service: a.service.clone(),
    }
}

/// The primary side: gRPC clients to providers, one channel per peer, over mutual TLS with
/// the provider's fingerprint pinned.
#[derive(Clone)]
pub struct GrpcPeers {
    identity: Arc<NodeIdentity>,
    ca: Option<Arc<CaBundle>>,
    admission: Arc<dyn PeerAdmission>,
    connect_timeout: Duration,
    channels: Arc<Mutex<HashMap<Fingerprint, pb::peering_client::PeeringClient<Channel>>>>,
}

impl GrpcPeers {
    pub fn new(
        identity: Arc<NodeIdentity>,
        ca: Option<Arc<CaBundle>>,
        admission: Arc<dyn PeerAdmission>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            identity,
            ca,
            admission,
            connect_timeout,
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A client for `peer` at `control` ("host:port"), reusing an open channel.
    pub async fn client(
        &self,
        peer: Fingerprint,
        control: &str,
    ) -> Result<pb::peering_client::PeeringClient<Channel>, Status> {
        if let Some(c) = self.channels.lock().await.get(&peer) {
            return Ok(c.clone());
        }
        let config = tls::client_config(
            &self.identity,
            self.ca.as_deref(),
            Some(peer),
            self.admission.clone(),
        )
        .map_err(|e| Status::internal(e.to_string()))?;
        let client = transport::connect(control, config, self.connect_timeout)
            .await
            .map_err(|e| Status::unavailable(format!("{}: {e}", peer.short())))?;
        self.channels.lock().await.insert(peer, client.clone());
        Ok(client)
    }

    /// Forgets the channel to `peer` (after a transport failure).
    pub async fn forget(&self, peer: &Fingerprint) {
        self.channels.lock().await.remove(peer);
    }

    async fn call<T, F, Fut>(&self, peer: Fingerprint, control: &str, f: F) -> Result<T, Status>
    where
        F: FnOnce(pb::peering_client::PeeringClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let client = self.client(peer, control).await?;
        match f(client).await {
            Ok(r) => Ok(r.into_inner()),
            Err(e) => {
                if matches!(
                    e.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) {
                    self.forget(&peer).await;
                }
                Err(e)
            }
        }
    }

    pub async fn request_offer(
        &self,
        peer: Fingerprint,
        control: &str,
        req: pb::ServiceRequirements,
    ) -> Result<pb::OfferReply, Status> {
        self.call(
            peer,
            control,
            |mut c| async move { c.request_offer(req).await },
        )
        .await
    }

    pub async fn respond(
        &self,
        peer: Fingerprint,
        control: &str,
        m: pb::OfferResponse,
    ) -> Result<pb::OfferResponseReply, Status> {
        self.call(peer, control, |mut c| async move { c.respond(m).await })
            .await
    }

    pub async fn activate(
        &self,
        peer: Fingerprint,
        control: &str,
        m: pb::ActivateRequest,
    ) -> Result<pb::Arrangement, Status> {
        self.call(peer, control, |mut c| async move { c.activate(m).await })
            .await
    }

    pub async fn heartbeat(
        &self,
        peer: Fingerprint,
        control: &str,
        m: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatReply, Status> {
        self.call(peer, control, |mut c| async move { c.heartbeat(m).await })
            .await
    }

    pub async fn disband(
        &self,
        peer: Fingerprint,
        control: &str,
        m: pb::DisbandRequest,
    ) -> Result<pb::DisbandReply, Status> {
        self.call(peer, control, |mut c| async move { c.disband(m).await })
            .await
    }

    pub async fn advertise(
        &self,
        peer: Fingerprint,
        control: &str,
        m: pb::SignedAdvertisement,
    ) -> Result<pb::AdvertiseAck, Status> {
        self.call(peer, control, |mut c| async move { c.advertise(m).await })
            .await
    }
}

/// The control endpoint a candidate advertises.
fn control_of(peer: &Candidate) -> Result<&str, Status> {
    match peer.advert.endpoints.as_ref().map(|e| e.control.as_str()) {
        Some(control) if !control.is_empty() => Ok(control),
        _ => Err(Status::failed_precondition(format!(
            "peer {} advertises no control endpoint",
            peer.fingerprint.short()
        ))),
    }
}

impl negotiation::PeerClient for GrpcPeers {
    fn request_offer<'a>(
        &'a self,
        peer: &'a Candidate,
        requirements: pb::ServiceRequirements,
    ) -> BoxFuture<'a, Result<pb::OfferReply, Status>> {
        Box::pin(async move {
            GrpcPeers::request_offer(self, peer.fingerprint, control_of(peer)?, requirements).await
        })
    }

    fn respond<'a>(
        &'a self,
        peer: &'a Candidate,
        response: pb::OfferResponse,
    ) -> BoxFuture<'a, Result<pb::OfferResponseReply, Status>> {
        Box::pin(async move {
            GrpcPeers::respond(self, peer.fingerprint, control_of(peer)?, response).await
        })
    }

    fn activate<'a>(
        &'a self,
        peer: &'a Candidate,
        request: pb::ActivateRequest,
    ) -> BoxFuture<'a, Result<pb::Arrangement, Status>> {
        Box::pin(async move {
            GrpcPeers::activate(self, peer.fingerprint, control_of(peer)?, request).await
        })
    }

    fn heartbeat<'a>(
        &'a self,
        peer: &'a Candidate,
        request: pb::HeartbeatRequest,
    ) -> BoxFuture<'a, Result<pb::HeartbeatReply, Status>> {
        Box::pin(async move {
            GrpcPeers::heartbeat(self, peer.fingerprint, control_of(peer)?, request).await
        })
    }
}
