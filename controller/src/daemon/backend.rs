//! The admin API's backend: views of the store and the registry, operator rules,
//! negotiations and disbands.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
};

use super::{Core, DisbandCause, DisbandError, granted_conn};
use crate::{
    admin::{
        self, AdminBackend, ArrangementDetail, ArrangementEventView, ArrangementView, BackendError,
        BoxFuture, CapacityView, LivenessView, LongTermView, NegotiateRequest, NegotiationView,
        NewPolicyRule, PeerView, PolicyRuleView, PolicyView, RuleSource, StateView, StatusView,
        TermsView, UsageView,
    },
    mediator,
    model::{Fingerprint, Role, now_ms},
    negotiation::Candidate,
    proto::pb,
    store::{self, ArrangementRecord, Liveness, NegotiationRecord, NegotiationState, StoreError},
};

pub(crate) struct Backend {
    core: Arc<Core>,
}

impl Backend {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

fn internal(e: impl std::fmt::Display) -> BackendError {
    BackendError::Internal(e.to_string())
}

fn capacity_view(c: &pb::Capacity) -> CapacityView {
    CapacityView {
        new_connections_per_s: u64::from(c.new_connections_per_s),
        egress_mbps: u64::from(c.egress_mbps),
        storage_bytes: c.storage_bytes,
    }
}

fn liveness_view(l: Liveness) -> LivenessView {
    match l {
        Liveness::Alive => LivenessView::Alive,
        Liveness::Suspect => LivenessView::Suspect,
        Liveness::Dead => LivenessView::Dead,
    }
}

fn mode_name(mode: i32) -> String {
    match pb::RedirectionMode::try_from(mode) {
        Ok(pb::RedirectionMode::DsrGue) => "dsr-gue".to_owned(),
        Ok(pb::RedirectionMode::DsrIpip) => "dsr-ipip".to_owned(),
        Ok(pb::RedirectionMode::HttpRedirect) => "http-redirect".to_owned(),
        _ => "unspecified".to_owned(),
    }
}

fn negotiation_state(s: NegotiationState) -> admin::NegotiationState {
    match s {
        NegotiationState::Running => admin::NegotiationState::Running,
        NegotiationState::Succeeded => admin::NegotiationState::Succeeded,
        NegotiationState::Partial => admin::NegotiationState::Partial,
        NegotiationState::Failed => admin::NegotiationState::Failed,
        NegotiationState::Abandoned => admin::NegotiationState::Abandoned,
    }
}

fn rule_view(rule: &store::PolicyRule) -> PolicyRuleView {
    PolicyRuleView {
        id: Some(rule.id),
        action: match rule.action {
            store::RuleAction::Allow => admin::RuleAction::Allow,
            store::RuleAction::Deny => admin::RuleAction::Deny,
        },
        subject: subject_view(&rule.subject),
        source: RuleSource::Operator,
        created_ms: Some(rule.created_ms),
    }
}

fn subject_view(s: &store::RuleSubject) -> admin::RuleSubject {
    match s {
        store::RuleSubject::Fingerprint(fp) => admin::RuleSubject::Fingerprint(*fp),
        store::RuleSubject::Organisation(o) => admin::RuleSubject::Organisation(o.clone()),
    }
}

impl Backend {
    fn peer_name(&self, fp: &Fingerprint) -> Option<String> {
        self.core
            .registry
            .get(fp)
            .map(|l| l.advert.name)
            .or_else(|| self.core.store.peer(fp).ok().flatten().map(|p| p.name))
            .filter(|n| !n.is_empty())
    }

    fn arrangement_view(&self, a: &ArrangementRecord) -> Result<ArrangementView, BackendError> {
        let (local, peer) = self.core.store.usage_totals(&a.id).map_err(internal)?;
        let usage = |u: store::UsageCounts| UsageView {
            connections: u.connections,
            bytes: u.bytes,
            packets: u.packets,
        };
        let terms = a.terms.as_ref().map(|t| {
            let granted = t.granted.unwrap_or_default();
            let price = t.price.clone().unwrap_or_default();
            let sla = t.sla.unwrap_or_default();
            TermsView {
                new_connections_per_s: u64::from(granted.new_connections_per_s),
                egress_mbps: u64::from(granted.egress_mbps),
                price_per_gb_micros: price.per_gb_micros,
                price_per_1000_connections_micros: price.per_1000_connections_micros,
                currency: price.currency,
                availability_ppm: sla.availability_ppm,
                p99_latency_ms: sla.p99_latency_ms,
                mode: mode_name(t.mode),
            }
        });
        Ok(ArrangementView {
            id: a.id.clone(),
            role: a.role,
            peer: a.peer,
            peer_name: self.peer_name(&a.peer),
            state: StateView::from_pb(a.state)
                .ok_or_else(|| internal(format!("arrangement {} has no state", a.id)))?,
            service: a
                .service
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            agreement_id: a.agreement_id.clone(),
            terms,
            created_ms: a.created_ms,
            updated_ms: a.updated_ms,
            activated_ms: a.activated_ms,
            expires_ms: a.expires_ms,
            ended_ms: a.ended_ms,
            end_reason: a.end_reason.clone(),
            usage_local: usage(local),
            usage_peer: usage(peer),
        })
    }

    fn negotiation_view(&self, n: &NegotiationRecord) -> Result<NegotiationView, BackendError> {
        let arrangements = self
            .core
            .store
            .arrangements(&store::ArrangementFilter {
                role: Some(Role::Primary),
                states: vec![
                    pb::ArrangementState::Active,
                    pb::ArrangementState::Disbanding,
                    pb::ArrangementState::Disbanded,
                ],
                request_id: Some(n.request_id.clone()),
                ..store::ArrangementFilter::default()
            })
            .map_err(internal)?
            .into_iter()
            .filter(|a| a.activated_ms.is_some())
            .map(|a| a.id)
            .collect();
        Ok(NegotiationView {
            request_id: n.request_id.clone(),
            service: n.service.clone(),
            state: negotiation_state(n.state),
            started_ms: n.started_ms,
            ended_ms: n.ended_ms,
            requested_connections_per_s: n
                .requirements
                .as_ref()
                .and_then(|r| r.capacity)
                .map_or(0, |c| u64::from(c.new_connections_per_s)),
            covered_connections_per_s: n.covered_conn_per_s,
            arrangements,
            detail: n.detail.clone(),
        })
    }

    /// Long-term agreements first (2 steps each), then a negotiation for what is left.
    async fn run_negotiation(
        &self,
        request: NegotiateRequest,
    ) -> Result<NegotiationView, BackendError> {
        request.validate().map_err(BackendError::Invalid)?;
        let core = &self.core;
        if core.stopping.load(Ordering::SeqCst) {
            return Err(BackendError::Unavailable("shutting down".to_owned()));
        }
        let service = core
            .config
            .services
            .iter()
            .find(|s| s.name == request.service)
            .ok_or_else(|| {
                BackendError::NotFound(format!(
                    "no service {:?} in the config ([[services]])",
                    request.service
                ))
            })?;
        let wanted = request
            .new_connections_per_s
            .unwrap_or(u64::from(core.config.resources.new_connections_per_s));
        let wanted = u32::try_from(wanted).map_err(|_| {
            BackendError::Invalid(format!(
                "new_connections_per_s must be at most {}",
                u32::MAX
            ))
        })?;
        core.running_negotiations.fetch_add(1, Ordering::SeqCst);
        let _running = Running(core);
        let started_ms = now_ms();
        let requirements = |rate: u32, suffix: usize, base: Option<&str>| {
            let mut req = mediator::requirements(
                service,
                &core.config.resources,
                &core.policy,
                rate,
                now_ms(),
            );
            if let Some(d) = request.duration_s {
                req.duration_s = d;
            }
            if let Some(base) = base {
                req.request_id = format!("{base}-{suffix}");
            }
            req
        };
        // Quarantined and isolated providers are not asked.
        let candidates: Vec<Candidate> = core
            .registry
            .candidates(now_ms())
            .into_iter()
            .filter(|c| super::trust_loop::usable(core, &c.fingerprint))
            .collect();
        let already = core.active_primary(&service.name).map_err(internal)?;
        let mut base: Option<String> = None;
        let mut steps = 0_usize;
        let mut covered: u64 = 0;
        let mut active: Vec<ArrangementRecord> = Vec::new();
        let mut details: Vec<String> = Vec::new();
        let mut used: Vec<Fingerprint> = Vec::new();

        for agreement in core
            .policy
            .long_term()
            .iter()
            .filter(|l| l.role == Role::Primary)
        {
            if covered >= u64::from(wanted) {
                break;
            }
            // An agreement already active for the service (a standby peer, or an earlier
            // overload's) is in use: activating it twice would double what was agreed.
            if already.iter().any(|a| {
                a.agreement_id.as_deref() == Some(agreement.agreement_id.as_str())
                    && a.peer == agreement.peer
            }) {
                used.push(agreement.peer);
                continue;
            }
            let Some(peer) = candidates.iter().find(|c| c.fingerprint == agreement.peer) else {
                details.push(format!(
                    "long-term peer {} not reachable",
                    agreement.peer.short()
                ));
                continue;
            };
            let remaining = u32::try_from(u64::from(wanted) - covered).unwrap_or(u32::MAX);
            let rate = remaining.min(agreement.new_connections_per_s);
            steps += 1;
            let req = requirements(rate, steps, base.as_deref());
            base.get_or_insert_with(|| req.request_id.clone());
            match core
                .negotiator
                .activate_long_term(agreement, peer, req)
                .await
            {
                Ok(record) => {
                    covered += granted_conn(&record);
                    used.push(agreement.peer);
                    details.push(format!("long-term {} active", agreement.agreement_id));
                    active.push(record);
                }
                Err(e) => details.push(format!("long-term {}: {e}", agreement.agreement_id)),
            }
        }
        if covered < u64::from(wanted) {
            let remaining = u32::try_from(u64::from(wanted) - covered).unwrap_or(u32::MAX);
            steps += 1;
            let req = requirements(remaining, steps, base.as_deref());
            base.get_or_insert_with(|| req.request_id.clone());
            let others = candidates
                .into_iter()
                .filter(|c| !used.contains(&c.fingerprint))
                .collect();
            let outcome = core.negotiator.negotiate(req, others).await;
            covered += outcome.covered_conn_per_s;
            details.push(outcome.detail.clone());
            active.extend(outcome.arrangements);
        }

        // The primary's side of the data plane: steer to the new providers.
        let mut kept = Vec::new();
        for record in active {
            match core.hooks.activated(&record) {
                Ok(()) => kept.push(record),
                Err(e) => {
                    tracing::error!(arrangement = %record.id, error = %e, "cannot steer to the provider; disbanding");
                    covered = covered.saturating_sub(granted_conn(&record));
                    let cause = DisbandCause::new(
                        pb::DisbandReason::Operator,
                        format!("the data plane refused it: {e}"),
                    );
                    core.disband_logged(&record.id, cause).await;
                }
            }
        }
        let state = if covered >= u64::from(wanted) {
            admin::NegotiationState::Succeeded
        } else if covered > 0 {
            admin::NegotiationState::Partial
        } else {
            admin::NegotiationState::Failed
        };
        Ok(NegotiationView {
            request_id: base.unwrap_or_default(),
            service: service.name.clone(),
            state,
            started_ms,
            ended_ms: Some(now_ms()),
            requested_connections_per_s: u64::from(wanted),
            covered_connections_per_s: covered,
            arrangements: kept.into_iter().map(|a| a.id).collect(),
            detail: crate::policy::clip(details.join("; ")),
        })
    }
}

/// Counts a running negotiation while alive.
struct Running<'a>(&'a Core);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running_negotiations.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AdminBackend for Backend {
    fn status(&self) -> BoxFuture<'_, Result<StatusView, BackendError>> {
        Box::pin(async move {
            let core = &self.core;
            let mut peers: std::collections::BTreeMap<LivenessView, u64> =
                LivenessView::ALL.into_iter().map(|l| (l, 0)).collect();
            for node in core.registry.snapshot().nodes {
                *peers.entry(liveness_view(node.liveness)).or_default() += 1;
            }
            let mut arrangements: std::collections::BTreeMap<StateView, u64> =
                StateView::ALL.into_iter().map(|s| (s, 0)).collect();
            for (state, n) in core.store.arrangement_counts().map_err(internal)? {
                if let Some(s) = StateView::from_pb(state) {
                    *arrangements.entry(s).or_default() += n;
                }
            }
            let spare = core.agent.spare(now_ms()).map_err(internal)?;
            let organisation = core.config.node.organisation.clone();
            Ok(StatusView {
                name: core.config.node.name.clone(),
                organisation: (!organisation.is_empty()).then_some(organisation),
                fingerprint: core.identity.fingerprint,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_ms: core.started_ms,
                control_listen: core.control_addr.to_string(),
                gossip_listen: core.gossip_addr.to_string(),
                admin_listen: core.admin_addr.to_string(),
                capacity: capacity_view(&core.config.resources.capacity()),
                spare: capacity_view(&spare),
                peers,
                arrangements,
                negotiations_running: core.running_negotiations.load(Ordering::SeqCst),
            })
        })
    }

    fn peers(&self) -> BoxFuture<'_, Result<Vec<PeerView>, BackendError>> {
        Box::pin(async move {
            let core = &self.core;
            let now = now_ms();
            let reputation: HashMap<Fingerprint, Option<u32>> = core
                .registry
                .candidates(now)
                .into_iter()
                .map(|c| (c.fingerprint, c.reputation_ppm))
                .collect();
            let stored: HashMap<Fingerprint, store::PeerRecord> = core
                .store
                .peers()
                .map_err(internal)?
                .into_iter()
                .map(|p| (p.fingerprint, p))
                .collect();
            let mut views = Vec::new();
            for node in core.registry.snapshot().nodes {
                let record = stored.get(&node.fingerprint);
                let advert = core.registry.get(&node.fingerprint);
                let or_none = |s: &str| (!s.is_empty()).then(|| s.to_owned());
                views.push(PeerView {
                    fingerprint: node.fingerprint,
                    name: or_none(&node.name).or_else(|| record.map(|r| r.name.clone())),
                    organisation: or_none(&node.organisation)
                        .or_else(|| record.and_then(|r| r.organisation.clone())),
                    trust: record.map(|r| r.trust),
                    liveness: liveness_view(node.liveness),
                    control_endpoint: or_none(&node.control),
                    regions: node.regions.clone(),
                    modes: node.modes.clone(),
                    spare: advert
                        .as_ref()
                        .and_then(|l| l.advert.spare)
                        .map(|c| capacity_view(&c)),
                    advert_sequence: node.sequence,
                    advert_expires_ms: node.expires_at_ms,
                    last_seen_ms: record.map(|r| r.last_seen_ms).or(node.received_ms),
                    reputation_ppm: reputation.get(&node.fingerprint).copied().flatten(),
                    assessment: core
                        .trust
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .assess(&node.fingerprint, now)
                        .and_then(|a| serde_json::to_value(a).ok()),
                });
            }
            Ok(views)
        })
    }

    fn arrangements(
        &self,
        filter: admin::ArrangementFilter,
    ) -> BoxFuture<'_, Result<Vec<ArrangementView>, BackendError>> {
        Box::pin(async move {
            let rows = self
                .core
                .store
                .arrangements(&store::ArrangementFilter {
                    role: filter.role,
                    states: filter.state.map(StateView::to_pb).into_iter().collect(),
                    peer: filter.peer,
                    ..store::ArrangementFilter::default()
                })
                .map_err(internal)?;
            rows.iter().map(|a| self.arrangement_view(a)).collect()
        })
    }

    fn arrangement(&self, id: String) -> BoxFuture<'_, Result<ArrangementDetail, BackendError>> {
        Box::pin(async move {
            let a = self
                .core
                .store
                .arrangement(&id)
                .map_err(internal)?
                .ok_or_else(|| BackendError::NotFound(format!("no arrangement {id:?}")))?;
            let events = self
                .core
                .store
                .events(&id)
                .map_err(internal)?
                .into_iter()
                .filter_map(|e| {
                    Some(ArrangementEventView {
                        from: e.from.and_then(StateView::from_pb),
                        to: StateView::from_pb(e.to)?,
                        at_ms: e.at_ms,
                        detail: e.detail,
                    })
                })
                .collect();
            Ok(ArrangementDetail {
                arrangement: self.arrangement_view(&a)?,
                events,
            })
        })
    }

    fn policy(&self) -> BoxFuture<'_, Result<PolicyView, BackendError>> {
        Box::pin(async move {
            let policy = &self.core.policy;
            let s = policy.settings();
            let config_rule = |action, subject: &store::RuleSubject| PolicyRuleView {
                id: None,
                action,
                subject: subject_view(subject),
                source: RuleSource::Config,
                created_ms: None,
            };
            let rules = s
                .allow
                .iter()
                .map(|r| config_rule(admin::RuleAction::Allow, r))
                .chain(
                    s.deny
                        .iter()
                        .map(|r| config_rule(admin::RuleAction::Deny, r)),
                )
                .chain(policy.rules().iter().map(rule_view))
                .collect();
            Ok(PolicyView {
                admit_unknown: match s.admit_unknown {
                    crate::policy::AdmitUnknown::AllowList => "allow-list".to_owned(),
                    crate::policy::AdmitUnknown::FirstContact => "first-contact".to_owned(),
                },
                rules,
                min_reputation_ppm: (s.min_reputation_ppm > 0).then_some(s.min_reputation_ppm),
                offer_share_percent: s.offer_share_percent,
                price_per_gb_micros: s.price_per_gb_micros,
                price_per_1000_connections_micros: s.price_per_1000_connections_micros,
                currency: s.currency.clone(),
                max_price_per_gb_micros: s.max_price_per_gb_micros,
                max_price_per_1000_connections_micros: s.max_price_per_1000_connections_micros,
                long_term: policy
                    .long_term()
                    .iter()
                    .map(|l| LongTermView {
                        agreement_id: l.agreement_id.clone(),
                        peer: l.peer,
                        role: l.role,
                        new_connections_per_s: u64::from(l.new_connections_per_s),
                        duration_s: l.duration_s,
                    })
                    .collect(),
            })
        })
    }

    fn negotiations(&self) -> BoxFuture<'_, Result<Vec<NegotiationView>, BackendError>> {
        Box::pin(async move {
            self.core
                .store
                .negotiations(100)
                .map_err(internal)?
                .iter()
                .map(|n| self.negotiation_view(n))
                .collect()
        })
    }

    fn add_policy_rule(
        &self,
        rule: NewPolicyRule,
    ) -> BoxFuture<'_, Result<PolicyRuleView, BackendError>> {
        Box::pin(async move {
            let subject = match rule.subject().map_err(BackendError::Invalid)? {
                admin::RuleSubject::Fingerprint(fp) => store::RuleSubject::Fingerprint(fp),
                admin::RuleSubject::Organisation(o) => store::RuleSubject::Organisation(o),
            };
            let action = match rule.action {
                admin::RuleAction::Allow => store::RuleAction::Allow,
                admin::RuleAction::Deny => store::RuleAction::Deny,
            };
            let core = &self.core;
            if core
                .policy
                .rules()
                .iter()
                .any(|r| r.action == action && r.subject == subject)
            {
                return Err(BackendError::Invalid("this rule exists already".to_owned()));
            }
            let mut record = store::PolicyRule {
                id: 0,
                action,
                subject,
                note: "admin api".to_owned(),
                created_ms: now_ms(),
            };
            record.id = core.store.add_policy_rule(&record).map_err(internal)?;
            core.policy.reload_rules().map_err(internal)?;
            if let store::RuleSubject::Fingerprint(fp) = &record.subject {
                // A cached channel was admitted under the old rules.
                core.peers.forget(fp).await;
            }
            tracing::info!(rule = record.id, action = %record.action, "operator policy rule added");
            Ok(rule_view(&record))
        })
    }

    fn remove_policy_rule(&self, id: i64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let core = &self.core;
            if !core.store.remove_policy_rule(id).map_err(internal)? {
                return Err(BackendError::NotFound(format!("no operator rule {id}")));
            }
            core.policy.reload_rules().map_err(internal)?;
            tracing::info!(rule = id, "operator policy rule removed");
            Ok(())
        })
    }

    fn negotiate(
        &self,
        request: NegotiateRequest,
    ) -> BoxFuture<'_, Result<NegotiationView, BackendError>> {
        Box::pin(self.run_negotiation(request))
    }

    fn disband(
        &self,
        id: String,
        reason: String,
    ) -> BoxFuture<'_, Result<ArrangementView, BackendError>> {
        Box::pin(async move {
            let cause = DisbandCause::new(pb::DisbandReason::Operator, reason);
            match self.core.disband(&id, cause).await {
                Ok(record) => self.arrangement_view(&record),
                Err(DisbandError::Unknown(_)) => {
                    Err(BackendError::NotFound(format!("no arrangement {id:?}")))
                }
                Err(e @ DisbandError::Ended { .. }) => Err(BackendError::Conflict(e.to_string())),
                Err(DisbandError::Store(
                    e @ (StoreError::IllegalTransition { .. } | StoreError::UnexpectedState { .. }),
                )) => Err(BackendError::Conflict(e.to_string())),
                Err(DisbandError::Store(e)) => Err(internal(e)),
            }
        })
    }
}
