//! Step 6 of the seed's process, primary side: the negotiation that turns the mediator's
//! service requirements into peering arrangements under an SLA.
//!
//! Short-term peers (3 steps): ask the k best candidates in parallel for an offer
//! (`RequestOffer`), rank the offers, answer the best ones (`Respond`: accept, or one counter
//! round when only the price is above our ceiling), and `Activate` them, until the
//! requirement's new connections/s are covered — by one offer or several. Unresponsive peers
//! time out and the next candidates are asked; what cannot be covered is reported as partial
//! coverage. Long-term peers (2 steps): `Activate` with the agreement id, then the first
//! `Heartbeat` ([`Negotiator::activate_long_term`]).
//!
//! The peers are reached through the [`PeerClient`] trait (the peering agent implements it
//! over gRPC; tests use a fake). Every step is recorded in the store: one negotiation row, one
//! arrangement row per candidate asked, one history event per transition. See
//! `docs/negotiation.md` for ranking, counter-offers, coverage and timeouts.

use std::{
    cmp::Reverse,
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    model::{Role, now_ms},
    policy::{Acceptability, LongTerm, Policy, clip, new_id},
    proto::{self, pb},
    store::{
        ArrangementChanges, ArrangementFilter, ArrangementRecord, NegotiationState, State, Store,
        StoreError,
    },
};
pub use crate::{policy::settle, registry::Candidate};

/// A boxed future, so [`PeerClient`] stays object-safe without the async-trait crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Most candidates one negotiation asks in total (bounds the work of a single request).
pub const MAX_CANDIDATES: usize = 1024;

/// The peering agent's client side, as the negotiation needs it.
pub trait PeerClient: Send + Sync {
    /// Step 1: `RequestOffer`.
    fn request_offer<'a>(
        &'a self,
        peer: &'a Candidate,
        requirements: pb::ServiceRequirements,
    ) -> BoxFuture<'a, Result<pb::OfferReply, tonic::Status>>;
    /// Step 2: `Respond` (accept, counter, decline).
    fn respond<'a>(
        &'a self,
        peer: &'a Candidate,
        response: pb::OfferResponse,
    ) -> BoxFuture<'a, Result<pb::OfferResponseReply, tonic::Status>>;
    /// Step 3 (step 1 of a long-term activation): `Activate`.
    fn activate<'a>(
        &'a self,
        peer: &'a Candidate,
        request: pb::ActivateRequest,
    ) -> BoxFuture<'a, Result<pb::Arrangement, tonic::Status>>;
    /// Step 2 of a long-term activation, and liveness afterwards: `Heartbeat`.
    fn heartbeat<'a>(
        &'a self,
        peer: &'a Candidate,
        request: pb::HeartbeatRequest,
    ) -> BoxFuture<'a, Result<pb::HeartbeatReply, tonic::Status>>;
}

#[derive(Debug, thiserror::Error)]
pub enum NegotiationError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("agreement {agreement_id:?}: {reason}")]
    Agreement {
        agreement_id: String,
        reason: String,
    },
    #[error("peer {peer} refused: {detail}")]
    Refused { peer: String, detail: String },
    #[error("peer {peer}: {detail}")]
    Peer { peer: String, detail: String },
}

/// What this node tells providers when activating: where its tunnels come from and how to
/// reach it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalEndpoints {
    /// Outer source addresses the edge tunnels from (the provider allow-lists them for decap).
    pub tunnel_sources: Vec<String>,
    /// This node's endpoints.
    pub endpoints: pb::Endpoints,
}

/// The result of one negotiation.
#[derive(Debug, Clone, PartialEq)]
pub struct NegotiationOutcome {
    pub request_id: String,
    /// `Succeeded` (covered), `Partial` (some covered) or `Failed` (nothing).
    pub state: NegotiationState,
    pub requested_conn_per_s: u64,
    pub covered_conn_per_s: u64,
    /// The active arrangements it produced, in the order they were activated.
    pub arrangements: Vec<ArrangementRecord>,
    /// Every arrangement row it created (one per candidate asked), as stored at the end.
    pub attempts: Vec<ArrangementRecord>,
    /// One line for operators.
    pub detail: String,
    pub elapsed: Duration,
}

/// The primary side of the negotiation (see the module documentation).
#[derive(Clone)]
pub struct Negotiator {
    policy: Policy,
    store: Store,
    client: Arc<dyn PeerClient>,
    local: Arc<LocalEndpoints>,
    timeout: Duration,
    k: usize,
}

impl fmt::Debug for Negotiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Negotiator")
            .field("timeout", &self.timeout)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// An offer waiting for an answer.
#[derive(Debug, Clone)]
struct Pending {
    candidate: Candidate,
    /// Position of the candidate in the registry's order (last tie-break of the ranking).
    index: usize,
    arrangement_id: String,
    offer: pb::Offer,
}

impl Negotiator {
    /// A negotiator with the policy's `candidates` (k) and `negotiation_timeout_ms`.
    pub fn new(
        policy: Policy,
        store: Store,
        client: Arc<dyn PeerClient>,
        local: LocalEndpoints,
    ) -> Self {
        let settings = policy.settings();
        let timeout = Duration::from_millis(settings.negotiation_timeout_ms.max(1));
        let k = settings.candidates.clamp(1, MAX_CANDIDATES);
        Self {
            policy,
            store,
            client,
            local: Arc::new(local),
            timeout,
            k,
        }
    }

    /// Overrides the timeout of each step (each RPC).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Overrides how many candidates are asked at once.
    pub fn with_k(mut self, k: usize) -> Self {
        self.k = k.clamp(1, MAX_CANDIDATES);
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Negotiates `req` with `candidates` (the registry's order) until its new connections/s
    /// are covered or the candidates run out. Never fails: what went wrong is in the outcome
    /// and in the store.
    pub async fn negotiate(
        &self,
        req: pb::ServiceRequirements,
        candidates: Vec<Candidate>,
    ) -> NegotiationOutcome {
        let span = info_span!("negotiate", request.id = %req.request_id);
        self.negotiate_inner(req, candidates).instrument(span).await
    }

    async fn negotiate_inner(
        &self,
        req: pb::ServiceRequirements,
        candidates: Vec<Candidate>,
    ) -> NegotiationOutcome {
        let started = Instant::now();
        let needed = u64::from(req.capacity.as_ref().map_or(0, |c| c.new_connections_per_s));
        let mut outcome = NegotiationOutcome {
            request_id: req.request_id.clone(),
            state: NegotiationState::Failed,
            requested_conn_per_s: needed,
            covered_conn_per_s: 0,
            arrangements: Vec::new(),
            attempts: Vec::new(),
            detail: String::new(),
            elapsed: Duration::ZERO,
        };
        let refused = proto::validate_requirements(&req)
            .err()
            .map(|e| format!("invalid requirements: {e}"))
            .or_else(|| (needed == 0).then(|| "requirements ask for no connections".to_owned()));
        if let Err(e) = self.store.begin_negotiation(&req, now_ms()) {
            outcome.detail = format!("not started: {e}");
            return finish_metrics(outcome, started, "short_term");
        }
        if let Some(detail) = refused {
            outcome.detail = detail;
            return self.finish(outcome, started, "short_term");
        }

        let queue = self.usable(&req, candidates);
        let mut covered: u64 = 0;
        let mut pending: Vec<Pending> = Vec::new();
        let mut next = 0;
        let mut store_error: Option<StoreError> = None;

        while covered < needed && store_error.is_none() {
            let remaining = needed - covered;
            if pending.is_empty() {
                if next >= queue.len() {
                    break;
                }
                let end = queue.len().min(next.saturating_add(self.k));
                let mut asks = JoinSet::new();
                for (index, candidate) in queue[next..end].iter().enumerate() {
                    let this = self.clone();
                    let ask = with_remaining(&req, remaining);
                    let candidate = candidate.clone();
                    asks.spawn(
                        async move { this.ask(candidate, next + index, ask).await }
                            .in_current_span(),
                    );
                }
                next = end;
                while let Some(joined) = asks.join_next().await {
                    match joined {
                        Ok(Ok(Some(offer))) => pending.push(offer),
                        Ok(Ok(None)) => {}
                        Ok(Err(e)) => store_error = Some(e),
                        Err(e) => warn!(error = %e, "an offer request task failed"),
                    }
                }
                rank(&req, &mut pending);
                continue;
            }

            // Take the best-ranked offers until they cover what is still needed; conclude them
            // in parallel. Failures leave `covered` short and the loop takes the next ones.
            let mut chosen = Vec::new();
            let mut sum: u64 = 0;
            while sum < remaining && !pending.is_empty() {
                let offer = pending.remove(0);
                sum = sum.saturating_add(granted_conn(&offer.offer));
                chosen.push(offer);
            }
            let mut conclusions = JoinSet::new();
            for (order, offer) in chosen.into_iter().enumerate() {
                let this = self.clone();
                conclusions
                    .spawn(async move { (order, this.conclude(offer).await) }.in_current_span());
            }
            let mut activated = Vec::new();
            while let Some(joined) = conclusions.join_next().await {
                match joined {
                    Ok((order, Ok(Some(record)))) => activated.push((order, record)),
                    Ok((_, Ok(None))) => {}
                    Ok((_, Err(e))) => store_error = Some(e),
                    Err(e) => warn!(error = %e, "an offer answer task failed"),
                }
            }
            activated.sort_by_key(|(order, _)| *order);
            for (_, record) in activated {
                let granted = record.terms.as_ref().map_or(0, granted_conn);
                covered = covered.saturating_add(granted);
                outcome.arrangements.push(record);
            }
        }

        // Offers left over are not needed: tell their providers, so they free the capacity.
        let mut declines = JoinSet::new();
        for offer in pending {
            let this = self.clone();
            declines.spawn(
                async move {
                    this.decline(&offer, "not needed: the requirement is covered")
                        .await
                }
                .in_current_span(),
            );
        }
        while let Some(joined) = declines.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => store_error = Some(e),
                Err(e) => warn!(error = %e, "a decline task failed"),
            }
        }

        outcome.covered_conn_per_s = covered;
        let asked = next;
        outcome.detail = match &store_error {
            Some(e) => format!("store failure: {e}"),
            None if queue.is_empty() => "no usable candidate".to_owned(),
            None => format!(
                "covered {covered} of {needed} connections/s with {} arrangement(s); asked {asked} of {} candidate(s)",
                outcome.arrangements.len(),
                queue.len()
            ),
        };
        outcome.state = if store_error.is_some() {
            NegotiationState::Failed
        } else if covered >= needed {
            NegotiationState::Succeeded
        } else if covered > 0 {
            NegotiationState::Partial
        } else {
            NegotiationState::Failed
        };
        self.finish(outcome, started, "short_term")
    }

    /// Records the outcome, reads back every arrangement of the request, counts metrics.
    fn finish(
        &self,
        mut outcome: NegotiationOutcome,
        started: Instant,
        kind: &'static str,
    ) -> NegotiationOutcome {
        if let Err(e) = self.store.finish_negotiation(
            &outcome.request_id,
            outcome.state,
            outcome.covered_conn_per_s,
            &outcome.detail,
            now_ms(),
        ) {
            warn!(error = %e, "cannot record the end of the negotiation");
        }
        match self.store.arrangements(&ArrangementFilter {
            role: Some(Role::Primary),
            request_id: Some(outcome.request_id.clone()),
            ..ArrangementFilter::default()
        }) {
            Ok(mut rows) => {
                rows.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
                outcome.attempts = rows;
            }
            Err(e) => warn!(error = %e, "cannot read the negotiation's arrangements"),
        }
        info!(
            outcome = outcome.state.as_str(),
            covered = outcome.covered_conn_per_s,
            requested = outcome.requested_conn_per_s,
            "{}",
            outcome.detail
        );
        finish_metrics(outcome, started, kind)
    }

    /// Candidates worth asking: not this node, not denied, a mode in common, not expired, with
    /// some spare connection capacity; each once, in the given order.
    fn usable(&self, req: &pb::ServiceRequirements, candidates: Vec<Candidate>) -> Vec<Candidate> {
        let now = now_ms();
        let mut seen = std::collections::HashSet::new();
        candidates
            .into_iter()
            .filter(|c| c.fingerprint != self.policy.self_id())
            .filter(|c| seen.insert(c.fingerprint))
            .filter(|c| {
                let org = Some(c.advert.organisation.as_str()).filter(|o| !o.is_empty());
                self.policy.denied(&c.fingerprint, org).is_none()
            })
            .filter(|c| c.advert.expires_at_ms > now)
            .filter(|c| c.advert.spare.is_some_and(|s| s.new_connections_per_s > 0))
            .filter(|c| req.modes.iter().any(|m| c.advert.modes.contains(m)))
            .take(MAX_CANDIDATES)
            .collect()
    }

    /// Step 1 with one candidate: a new arrangement row, then `Offered` or `Cancelled`.
    async fn ask(
        self,
        candidate: Candidate,
        index: usize,
        req: pb::ServiceRequirements,
    ) -> Result<Option<Pending>, StoreError> {
        let id = new_id("a");
        let mut record = ArrangementRecord::new(
            id.clone(),
            Role::Primary,
            candidate.fingerprint,
            State::Requested,
            req.request_id.clone(),
            now_ms(),
        );
        record.requirements = Some(req.clone());
        record.service = req.service.clone();
        self.store.insert_arrangement(&record)?;

        let peer = candidate.fingerprint.short();
        let reply = self
            .call(self.client.request_offer(&candidate, req.clone()))
            .await;
        let cancel = |reason: String, label: &'static str| {
            metrics::counter!("p2pcdn_negotiation_offers_total", "result" => label).increment(1);
            debug!(peer = %peer, "{reason}");
            self.cancel(&id, &[State::Requested], &reason)
                .map(|()| None)
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(CallError::Timeout) => {
                return cancel(
                    format!("no offer within {} ms", self.timeout.as_millis()),
                    "timeout",
                );
            }
            Err(CallError::Status(status)) => {
                return cancel(status_text("offer request failed", &status), "error");
            }
        };
        let offer = match reply.result {
            Some(pb::offer_reply::Result::Offer(offer)) => offer,
            Some(pb::offer_reply::Result::Reject(reject)) => {
                return cancel(reject_text("rejected", &reject), "rejected");
            }
            None => return cancel("empty offer reply".to_owned(), "invalid"),
        };
        if let Err(reason) = check_offer(&offer, &candidate, &req) {
            return cancel(format!("invalid offer: {reason}"), "invalid");
        }
        metrics::counter!("p2pcdn_negotiation_offers_total", "result" => "offered").increment(1);
        self.store.transition(
            &id,
            &[State::Requested],
            State::Offered,
            now_ms(),
            &offer_text("offer", &offer),
            ArrangementChanges {
                offer_id: Some(offer.offer_id.clone()),
                terms: Some(offer.clone()),
                ..ArrangementChanges::default()
            },
        )?;
        Ok(Some(Pending {
            candidate,
            index,
            arrangement_id: id,
            offer,
        }))
    }

    /// Steps 2 and 3 with one offer: accept it (after one counter round if its price is above
    /// the ceiling) and activate it. `Some` is the active arrangement.
    async fn conclude(self, pending: Pending) -> Result<Option<ArrangementRecord>, StoreError> {
        let Pending {
            candidate,
            arrangement_id: id,
            mut offer,
            ..
        } = pending;
        let mut countered = false;
        let accepted_id = loop {
            if offer.expires_at_ms <= now_ms() {
                self.cancel(
                    &id,
                    &[State::Offered],
                    "the offer expired before the answer",
                )?;
                return Ok(None);
            }
            match self.policy.acceptable(&offer) {
                Acceptability::Accept => {
                    let reply = self
                        .call(
                            self.client
                                .respond(&candidate, response(&offer, Decision::Accept)),
                        )
                        .await;
                    match reply.map(|r| r.result) {
                        Ok(Some(pb::offer_response_reply::Result::Accepted(a))) => {
                            break a.arrangement_id;
                        }
                        Ok(Some(pb::offer_response_reply::Result::Reject(r))) => {
                            self.cancel(
                                &id,
                                &[State::Offered],
                                &reject_text("accept refused", &r),
                            )?;
                        }
                        Ok(_) => {
                            self.cancel(&id, &[State::Offered], "unexpected answer to accept")?;
                        }
                        Err(e) => {
                            self.cancel(
                                &id,
                                &[State::Offered],
                                &e.describe("accept", self.timeout),
                            )?;
                        }
                    }
                    return Ok(None);
                }
                Acceptability::Decline(reason) => {
                    self.decline(
                        &Pending {
                            candidate,
                            index: 0,
                            arrangement_id: id,
                            offer,
                        },
                        &reason,
                    )
                    .await?;
                    return Ok(None);
                }
                Acceptability::Counter(_) if countered => {
                    self.decline(
                        &Pending {
                            candidate,
                            index: 0,
                            arrangement_id: id,
                            offer,
                        },
                        "the counter-offer is still above the price ceiling",
                    )
                    .await?;
                    return Ok(None);
                }
                Acceptability::Counter(counter) => {
                    countered = true;
                    let reply = self
                        .call(self.client.respond(
                            &candidate,
                            response(&offer, Decision::Counter(counter.clone())),
                        ))
                        .await;
                    match reply.map(|r| r.result) {
                        Ok(Some(pb::offer_response_reply::Result::CounterOffer(next))) => {
                            let req = self
                                .store
                                .arrangement(&id)?
                                .and_then(|r| r.requirements)
                                .unwrap_or_default();
                            if let Err(reason) = check_offer(&next, &candidate, &req) {
                                self.cancel(
                                    &id,
                                    &[State::Offered],
                                    &format!("invalid counter-offer: {reason}"),
                                )?;
                                return Ok(None);
                            }
                            self.store.transition(
                                &id,
                                &[State::Offered],
                                State::Offered,
                                now_ms(),
                                &offer_text("counter-offer", &next),
                                ArrangementChanges {
                                    offer_id: Some(next.offer_id.clone()),
                                    terms: Some(next.clone()),
                                    ..ArrangementChanges::default()
                                },
                            )?;
                            offer = next;
                        }
                        Ok(Some(pb::offer_response_reply::Result::Accepted(a))) => {
                            // The provider took the counter as it stood: those are the terms.
                            if let Some(price) = counter.price {
                                offer.price = Some(price);
                            }
                            break a.arrangement_id;
                        }
                        Ok(Some(pb::offer_response_reply::Result::Reject(r))) => {
                            self.cancel(
                                &id,
                                &[State::Offered],
                                &reject_text("counter refused", &r),
                            )?;
                            return Ok(None);
                        }
                        Ok(_) => {
                            self.cancel(&id, &[State::Offered], "unexpected answer to a counter")?;
                            return Ok(None);
                        }
                        Err(e) => {
                            self.cancel(
                                &id,
                                &[State::Offered],
                                &e.describe("counter", self.timeout),
                            )?;
                            return Ok(None);
                        }
                    }
                }
            }
        };

        self.store.transition(
            &id,
            &[State::Offered],
            State::Accepted,
            now_ms(),
            &format!("accepted as {}", clip(accepted_id.clone())),
            ArrangementChanges {
                peer_ref: Some(accepted_id.clone()),
                terms: Some(offer.clone()),
                ..ArrangementChanges::default()
            },
        )?;
        let request = pb::ActivateRequest {
            arrangement_id: accepted_id,
            agreement_id: String::new(),
            requirements: None,
            tunnel_sources: self.local.tunnel_sources.clone(),
            primary_endpoints: Some(self.local.endpoints.clone()),
        };
        let activated = self.call(self.client.activate(&candidate, request)).await;
        self.record_activation(&id, &candidate, &offer, activated)
    }

    /// `Accepted` → `Active` if the provider's answer is an active arrangement of its own,
    /// `Cancelled` otherwise.
    fn record_activation(
        &self,
        id: &str,
        candidate: &Candidate,
        offer: &pb::Offer,
        activated: Result<pb::Arrangement, CallError>,
    ) -> Result<Option<ArrangementRecord>, StoreError> {
        let arrangement = match activated {
            Ok(a) => a,
            Err(e) => {
                self.cancel(
                    id,
                    &[State::Accepted],
                    &e.describe("activation", self.timeout),
                )?;
                return Ok(None);
            }
        };
        let problem = proto::validate_arrangement(&arrangement)
            .err()
            .map(|e| e.to_string())
            .or_else(|| {
                (arrangement.state != pb::ArrangementState::Active as i32)
                    .then(|| "the arrangement is not active".to_owned())
            })
            .or_else(|| {
                (arrangement.provider != candidate.fingerprint.0)
                    .then(|| "the arrangement names another provider".to_owned())
            });
        if let Some(problem) = problem {
            self.cancel(
                id,
                &[State::Accepted],
                &format!("activation failed: {problem}"),
            )?;
            return Ok(None);
        }
        let now = now_ms();
        let duration_ms = i64::try_from(offer.duration_s.saturating_mul(1000)).unwrap_or(i64::MAX);
        let expires = if arrangement.expires_at_ms > 0 {
            arrangement.expires_at_ms
        } else {
            now.saturating_add(duration_ms)
        };
        let record = self.store.transition(
            id,
            &[State::Accepted],
            State::Active,
            now,
            &format!("active with {}", candidate.fingerprint.short()),
            ArrangementChanges {
                peer_ref: Some(arrangement.arrangement_id.clone()),
                terms: Some(arrangement.terms.clone().unwrap_or_else(|| offer.clone())),
                peer_endpoints: arrangement.provider_endpoints.clone(),
                tunnel_sources: Some(self.local.tunnel_sources.clone()),
                expires_ms: Some(expires),
                ..ArrangementChanges::default()
            },
        )?;
        Ok(Some(record))
    }

    /// Sends `Decline` for an offer (bounded by the timeout; its answer changes nothing) and
    /// cancels the arrangement row.
    async fn decline(&self, pending: &Pending, reason: &str) -> Result<(), StoreError> {
        let decision = Decision::Decline(clip(reason.to_owned()));
        if let Err(e) = self
            .call(
                self.client
                    .respond(&pending.candidate, response(&pending.offer, decision)),
            )
            .await
        {
            debug!(peer = %pending.candidate.fingerprint.short(), "{}", e.describe("decline", self.timeout));
        }
        self.cancel(
            &pending.arrangement_id,
            &[State::Offered],
            &format!("declined: {reason}"),
        )
    }

    fn cancel(&self, id: &str, from: &[State], reason: &str) -> Result<(), StoreError> {
        self.store.transition(
            id,
            from,
            State::Cancelled,
            now_ms(),
            reason,
            ArrangementChanges {
                end_reason: Some(reason.to_owned()),
                ..ArrangementChanges::default()
            },
        )?;
        Ok(())
    }

    /// One RPC bounded by the step timeout.
    async fn call<T>(
        &self,
        future: BoxFuture<'_, Result<T, tonic::Status>>,
    ) -> Result<T, CallError> {
        match tokio::time::timeout(self.timeout, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(status)) => Err(CallError::Status(status)),
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// The seed's 2-step branch: activates long-term `agreement` with `peer` for `req`
    /// (`Activate` with the agreement id, then the first `Heartbeat`), without negotiation.
    /// Recorded like a negotiation (a negotiation row and an arrangement row).
    pub async fn activate_long_term(
        &self,
        agreement: &LongTerm,
        peer: &Candidate,
        req: pb::ServiceRequirements,
    ) -> Result<ArrangementRecord, NegotiationError> {
        let span = info_span!(
            "activate_long_term",
            agreement.id = %agreement.agreement_id,
            peer.id = %peer.fingerprint.short()
        );
        let started = Instant::now();
        let result = async {
            let terms = self.long_term_terms(agreement, peer, &req)?;
            self.store.begin_negotiation(&req, now_ms())?;
            let result = self
                .activate_long_term_inner(agreement, peer, &req, terms)
                .await;
            let mut outcome = NegotiationOutcome {
                request_id: req.request_id.clone(),
                state: NegotiationState::Failed,
                requested_conn_per_s: u64::from(
                    req.capacity.as_ref().map_or(0, |c| c.new_connections_per_s),
                ),
                covered_conn_per_s: 0,
                arrangements: Vec::new(),
                attempts: Vec::new(),
                detail: String::new(),
                elapsed: Duration::ZERO,
            };
            match &result {
                Ok(record) => {
                    outcome.state = NegotiationState::Succeeded;
                    outcome.covered_conn_per_s = record.terms.as_ref().map_or(0, granted_conn);
                    outcome.detail = format!(
                        "long-term agreement {} active with {}",
                        agreement.agreement_id,
                        peer.fingerprint.short()
                    );
                }
                Err(e) => outcome.detail = e.to_string(),
            }
            self.finish(outcome, started, "long_term");
            result
        }
        .instrument(span)
        .await;
        if let Err(e) = &result {
            warn!(agreement.id = %agreement.agreement_id, "long-term activation failed: {e}");
        }
        result
    }

    /// The terms of this activation of `agreement`, or why it cannot be activated.
    fn long_term_terms(
        &self,
        agreement: &LongTerm,
        peer: &Candidate,
        req: &pb::ServiceRequirements,
    ) -> Result<pb::Offer, NegotiationError> {
        let refuse = |reason: &str| NegotiationError::Agreement {
            agreement_id: agreement.agreement_id.clone(),
            reason: reason.to_owned(),
        };
        if agreement.role != Role::Primary {
            return Err(refuse("we are not the primary of this agreement"));
        }
        if agreement.peer != peer.fingerprint {
            return Err(refuse("the agreement is with another peer"));
        }
        proto::validate_requirements(req)
            .map_err(|e| refuse(&format!("invalid requirements: {e}")))?;
        let peer_modes: Vec<pb::RedirectionMode> = peer
            .advert
            .modes
            .iter()
            .filter_map(|m| pb::RedirectionMode::try_from(*m).ok())
            .collect();
        agreement
            .terms_for(req, peer.fingerprint, &peer_modes, now_ms())
            .map_err(|r| refuse(&reject_text("does not fit", &r)))
    }

    async fn activate_long_term_inner(
        &self,
        agreement: &LongTerm,
        peer: &Candidate,
        req: &pb::ServiceRequirements,
        terms: pb::Offer,
    ) -> Result<ArrangementRecord, NegotiationError> {
        let now = now_ms();
        let id = new_id("a");
        let mut record = ArrangementRecord::new(
            id.clone(),
            Role::Primary,
            peer.fingerprint,
            State::Accepted,
            req.request_id.clone(),
            now,
        );
        record.agreement_id = Some(agreement.agreement_id.clone());
        record.offer_id = Some(terms.offer_id.clone());
        record.terms = Some(terms.clone());
        record.requirements = Some(req.clone());
        record.service = req.service.clone();
        self.store.insert_arrangement(&record)?;

        let peer_name = peer.fingerprint.short();
        let fail = |detail: String| -> Result<ArrangementRecord, NegotiationError> {
            self.cancel(&id, &[State::Accepted], &detail)?;
            Err(NegotiationError::Peer {
                peer: peer_name.clone(),
                detail,
            })
        };
        let request = pb::ActivateRequest {
            arrangement_id: String::new(),
            agreement_id: agreement.agreement_id.clone(),
            requirements: Some(req.clone()),
            tunnel_sources: self.local.tunnel_sources.clone(),
            primary_endpoints: Some(self.local.endpoints.clone()),
        };
        let arrangement = match self.call(self.client.activate(peer, request)).await {
            Ok(a) => a,
            Err(e) => return fail(e.describe("activation", self.timeout)),
        };
        if let Err(e) = proto::validate_arrangement(&arrangement) {
            return fail(format!("activation failed: {e}"));
        }
        if arrangement.provider != peer.fingerprint.0 {
            return fail("activation failed: the arrangement names another provider".to_owned());
        }
        let heartbeat = pb::HeartbeatRequest {
            arrangement_id: arrangement.arrangement_id.clone(),
            usage: Some(pb::Usage {
                measured_at_ms: now_ms(),
                ..pb::Usage::default()
            }),
            sent_at_ms: now_ms(),
        };
        match self.call(self.client.heartbeat(peer, heartbeat)).await {
            Ok(reply) if reply.state == pb::ArrangementState::Active as i32 => {}
            Ok(reply) => {
                let state = pb::ArrangementState::try_from(reply.state)
                    .map_or("unknown", |s| s.as_str_name());
                return fail(format!("first heartbeat: the provider says {state}"));
            }
            Err(e) => return fail(e.describe("first heartbeat", self.timeout)),
        }
        match self.record_activation(&id, peer, &terms, Ok(arrangement))? {
            Some(record) => Ok(record),
            None => Err(NegotiationError::Peer {
                peer: peer_name,
                detail: "activation failed".to_owned(),
            }),
        }
    }
}

/// Counts the outcome and the duration, and returns the outcome with its elapsed time.
fn finish_metrics(
    mut outcome: NegotiationOutcome,
    started: Instant,
    kind: &'static str,
) -> NegotiationOutcome {
    outcome.elapsed = started.elapsed();
    metrics::counter!(
        "p2pcdn_negotiations_total",
        "outcome" => outcome.state.as_str(),
        "kind" => kind
    )
    .increment(1);
    metrics::histogram!("p2pcdn_negotiation_duration_seconds", "kind" => kind)
        .record(outcome.elapsed.as_secs_f64());
    outcome
}

enum CallError {
    Timeout,
    Status(tonic::Status),
}

impl CallError {
    fn describe(&self, step: &str, timeout: Duration) -> String {
        match self {
            Self::Timeout => format!("{step}: no answer within {} ms", timeout.as_millis()),
            Self::Status(status) => status_text(&format!("{step} failed"), status),
        }
    }
}

enum Decision {
    Accept,
    Counter(pb::Counter),
    Decline(String),
}

fn response(offer: &pb::Offer, decision: Decision) -> pb::OfferResponse {
    use pb::offer_response::Decision as D;
    pb::OfferResponse {
        offer_id: offer.offer_id.clone(),
        decision: Some(match decision {
            Decision::Accept => D::Accept(pb::Accept {}),
            Decision::Counter(c) => D::Counter(c),
            Decision::Decline(reason) => D::Decline(pb::Decline { reason }),
        }),
    }
}

/// The requirements with the connections/s still needed (egress scaled in proportion).
fn with_remaining(req: &pb::ServiceRequirements, remaining: u64) -> pb::ServiceRequirements {
    let mut ask = req.clone();
    if let Some(capacity) = ask.capacity.as_mut() {
        let total = u64::from(capacity.new_connections_per_s);
        let remaining = remaining.min(total);
        if total > 0 && remaining < total {
            let egress = u64::from(capacity.egress_mbps)
                .saturating_mul(remaining)
                .div_ceil(total);
            capacity.egress_mbps = u32::try_from(egress).unwrap_or(u32::MAX);
        }
        capacity.new_connections_per_s = u32::try_from(remaining).unwrap_or(u32::MAX);
    }
    ask
}

fn granted_conn(offer: &pb::Offer) -> u64 {
    u64::from(
        offer
            .granted
            .as_ref()
            .map_or(0, |g| g.new_connections_per_s),
    )
}

/// An offer must be well-formed, answer this request, come from the candidate it was asked of,
/// use a mode the primary listed and grant some connections.
fn check_offer(
    offer: &pb::Offer,
    candidate: &Candidate,
    req: &pb::ServiceRequirements,
) -> Result<(), String> {
    proto::validate_offer(offer).map_err(|e| e.to_string())?;
    if offer.request_id != req.request_id {
        return Err(format!(
            "answers request {:?}",
            clip(offer.request_id.clone())
        ));
    }
    if offer.provider != candidate.fingerprint.0 {
        return Err("names another provider".to_owned());
    }
    if !req.modes.contains(&offer.mode) {
        return Err("uses a redirection mode the primary did not list".to_owned());
    }
    if granted_conn(offer) == 0 {
        return Err("grants no connections".to_owned());
    }
    Ok(())
}

/// The cost per second of the request's traffic mix at `price`, in 1/8000 micro-units: new
/// connections/s × price per 1000 / 1000 plus Mbit/s / 8000 GB/s × price per GB, both scaled
/// by 8000 to stay in integers.
pub fn unit_cost(req: &pb::ServiceRequirements, price: &pb::Price) -> u128 {
    let capacity = req.capacity.unwrap_or_default();
    let conn = u128::from(price.per_1000_connections_micros)
        .saturating_mul(u128::from(capacity.new_connections_per_s))
        .saturating_mul(8);
    let bytes = u128::from(price.per_gb_micros).saturating_mul(u128::from(capacity.egress_mbps));
    conn.saturating_add(bytes)
}

/// Orders offers best first: lowest [`unit_cost`], then lowest p99 latency, then highest
/// reputation (unknown last), then most connections granted, then the registry's order.
fn rank(req: &pb::ServiceRequirements, offers: &mut [Pending]) {
    offers.sort_by_cached_key(|p| {
        let price = p.offer.price.clone().unwrap_or_default();
        let p99 = p.offer.sla.map_or(u32::MAX, |s| s.p99_latency_ms);
        (
            unit_cost(req, &price),
            p99,
            Reverse(p.candidate.reputation_ppm),
            Reverse(granted_conn(&p.offer)),
            p.index,
        )
    });
}

fn status_text(what: &str, status: &tonic::Status) -> String {
    clip(format!("{what}: {:?}: {}", status.code(), status.message()))
}

fn reject_text(what: &str, reject: &pb::Reject) -> String {
    let reason = pb::RejectReason::try_from(reject.reason)
        .map_or("REJECT_REASON_UNKNOWN_VALUE", |r| r.as_str_name());
    clip(format!("{what} ({reason}): {}", reject.detail))
}

fn offer_text(what: &str, offer: &pb::Offer) -> String {
    let price = offer.price.clone().unwrap_or_default();
    format!(
        "{what} {}: {} connections/s at {} per 1000 connections and {} per GB (micro-{})",
        offer.offer_id,
        granted_conn(offer),
        price.per_1000_connections_micros,
        price.per_gb_micros,
        price.currency
    )
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;

    fn req(conn: u32, egress: u32) -> pb::ServiceRequirements {
        pb::ServiceRequirements {
            capacity: Some(pb::Capacity {
                new_connections_per_s: conn,
                egress_mbps: egress,
                storage_bytes: 0,
            }),
            ..Default::default()
        }
    }

    fn price(gb: u64, conn: u64) -> pb::Price {
        pb::Price {
            per_gb_micros: gb,
            per_1000_connections_micros: conn,
            currency: "EUR".to_owned(),
        }
    }

    #[test]
    fn unit_cost_weighs_connections_and_bytes_by_the_request() {
        // 1000 conn/s at 1000 per 1000 = 1000 µ/s; 8000 Mbit/s = 1 GB/s at 10 per GB = 10 µ/s.
        assert_eq!(unit_cost(&req(1000, 8000), &price(10, 1000)), 8000 * 1010);
        // A connection-heavy request prefers the cheap-per-connection offer, a byte-heavy one
        // the cheap-per-GB offer.
        let a = price(20_000, 100);
        let b = price(5_000, 2_000);
        assert!(unit_cost(&req(10_000, 10), &a) < unit_cost(&req(10_000, 10), &b));
        assert!(unit_cost(&req(10, 10_000), &a) > unit_cost(&req(10, 10_000), &b));
    }

    #[test]
    fn remaining_scales_egress() {
        let ask = with_remaining(&req(1000, 400), 250);
        let c = ask.capacity.unwrap();
        assert_eq!((c.new_connections_per_s, c.egress_mbps), (250, 100));
        let all = with_remaining(&req(1000, 400), 5000);
        assert_eq!(all.capacity.unwrap().new_connections_per_s, 1000);
    }
}
