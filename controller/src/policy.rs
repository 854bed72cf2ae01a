//! The policy repository of the seed: who may peer with this node, on which terms this node
//! offers its capacity (provider side), which offers it takes (primary side), and the
//! long-term agreements that skip negotiation.
//!
//! Sources: the `[policy]` section of the configuration (fixed for the process's life) and the
//! operator's allow/deny rules in the store (changed at run time, picked up by
//! [`Policy::reload_rules`]). Evaluation order and arithmetic are described in
//! `docs/negotiation.md`.

use std::sync::{Arc, RwLock};

pub use crate::config::AdmitUnknown;
use crate::{
    config::{LongTermConfig, PeerMatch, PolicyConfig, ResourcesConfig},
    identity::CertInfo,
    model::{Fingerprint, Role, TrustLevel, UnixMs, now_ms},
    proto::pb,
    store::{PolicyRule, RuleAction, RuleSubject, Store, StoreError},
    tls::PeerAdmission,
    transport::PeerIdentity,
};

/// Longest human-readable detail put in a `Reject` or `Decline` (the .proto limit).
pub const MAX_DETAIL_CHARS: usize = 256;

/// Longest offer validity a provider grants, whatever the configuration says.
const MAX_OFFER_TTL_MS: u64 = 10 * 60 * 1000;

/// Longest arrangement (the .proto limit on `duration_s`): 7 days.
pub const MAX_DURATION_S: u64 = 7 * 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy rules: {0}")]
    Store(#[from] StoreError),
    #[error("long-term agreement {agreement_id:?}: {reason}")]
    LongTerm {
        agreement_id: String,
        reason: String,
    },
}

/// The `[policy]` settings this module needs (the configuration's values, validated there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySettings {
    pub admit_unknown: AdmitUnknown,
    /// Allow rules from the configuration file.
    pub allow: Vec<RuleSubject>,
    /// Deny rules from the configuration file.
    pub deny: Vec<RuleSubject>,
    /// Primaries whose known reputation is below this get no offer (0: no minimum).
    pub min_reputation_ppm: u32,
    /// Share of own spare capacity that may be offered, percent (0..=100).
    pub offer_share_percent: u32,
    /// Provider list price.
    pub price_per_gb_micros: u64,
    pub price_per_1000_connections_micros: u64,
    /// ISO 4217 code of every price this node asks or pays.
    pub currency: String,
    /// Counter floor: a counter at or above this percentage of the offered price is taken.
    pub min_price_percent: u32,
    /// SLA this node promises as a provider.
    pub sla_availability_ppm: u32,
    pub sla_p99_latency_ms: u32,
    /// Penalties this node promises as a provider.
    pub penalty_credit_percent: u32,
    pub penalty_max_percent: u32,
    /// How long an offer is binding.
    pub offer_ttl_ms: u64,
    /// Primary-side price ceilings.
    pub max_price_per_gb_micros: u64,
    pub max_price_per_1000_connections_micros: u64,
    /// Primary-side SLA floor.
    pub min_sla_availability_ppm: u32,
    pub max_sla_p99_latency_ms: u32,
    /// How many candidates a negotiation asks at once (k).
    pub candidates: usize,
    /// Timeout of every step of a negotiation.
    pub negotiation_timeout_ms: u64,
    /// Redirection modes this node can take traffic through as a provider, in its order of
    /// preference (from `[resources] modes`).
    pub modes: Vec<pb::RedirectionMode>,
}

impl Default for PolicySettings {
    /// The documented defaults of `[policy]`, with every redirection mode.
    fn default() -> Self {
        let mut settings = Self::from_config(&PolicyConfig::default(), &ResourcesConfig::default());
        settings.modes = vec![
            pb::RedirectionMode::DsrGue,
            pb::RedirectionMode::DsrIpip,
            pb::RedirectionMode::HttpRedirect,
        ];
        settings
    }
}

impl PolicySettings {
    /// From the (validated) `[policy]` and `[resources]` sections.
    pub fn from_config(policy: &PolicyConfig, resources: &ResourcesConfig) -> Self {
        let subject = |m: &PeerMatch| match m {
            PeerMatch::Fingerprint(fp) => RuleSubject::Fingerprint(*fp),
            PeerMatch::Organisation(org) => RuleSubject::Organisation(org.clone()),
        };
        Self {
            admit_unknown: policy.admit_unknown,
            allow: policy.allow.iter().map(subject).collect(),
            deny: policy.deny.iter().map(subject).collect(),
            min_reputation_ppm: policy.min_reputation_ppm,
            offer_share_percent: policy.offer_share_percent,
            price_per_gb_micros: policy.price_per_gb_micros,
            price_per_1000_connections_micros: policy.price_per_1000_connections_micros,
            currency: policy.currency.clone(),
            min_price_percent: policy.min_price_percent,
            sla_availability_ppm: policy.sla_availability_ppm,
            sla_p99_latency_ms: policy.sla_p99_latency_ms,
            penalty_credit_percent: policy.penalty_credit_percent,
            penalty_max_percent: policy.penalty_max_percent,
            offer_ttl_ms: policy.offer_ttl_ms,
            max_price_per_gb_micros: policy.max_price_per_gb_micros,
            max_price_per_1000_connections_micros: policy.max_price_per_1000_connections_micros,
            min_sla_availability_ppm: policy.min_sla_availability_ppm,
            max_sla_p99_latency_ms: policy.max_sla_p99_latency_ms,
            candidates: usize::try_from(policy.candidates).unwrap_or(usize::MAX),
            negotiation_timeout_ms: policy.negotiation_timeout_ms,
            modes: resources
                .effective_modes()
                .into_iter()
                .map(|m| m.to_pb())
                .collect(),
        }
    }
}

/// A long-term agreement: terms both sides put in their policy beforehand, so an activation
/// needs no negotiation (the seed's 2-step branch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongTerm {
    pub agreement_id: String,
    /// The other side.
    pub peer: Fingerprint,
    /// Our side: `Primary` if we steer to `peer`, `Provider` if `peer` steers to us.
    pub role: Role,
    /// The most an activation may ask for (egress 0: not limited by the agreement).
    pub new_connections_per_s: u32,
    pub egress_mbps: u32,
    pub price_per_gb_micros: u64,
    pub price_per_1000_connections_micros: u64,
    pub currency: String,
    pub sla_availability_ppm: u32,
    pub sla_p99_latency_ms: u32,
    pub penalty_credit_percent: u32,
    pub penalty_max_percent: u32,
    /// Longest activation, seconds.
    pub duration_s: u64,
    /// Kept active at all times for every service (primary only).
    pub standby: bool,
}

impl LongTerm {
    /// From a `[[policy.long_term]]` entry; what it leaves out (currency, SLA, penalties)
    /// comes from `[policy]`.
    pub fn from_config(entry: &LongTermConfig, policy: &PolicyConfig) -> Self {
        Self {
            agreement_id: entry.agreement_id.clone(),
            peer: entry.peer,
            role: entry.role,
            new_connections_per_s: entry.new_connections_per_s,
            egress_mbps: entry.egress_mbps,
            price_per_gb_micros: entry.price_per_gb_micros,
            price_per_1000_connections_micros: entry.price_per_1000_connections_micros,
            currency: entry
                .currency
                .clone()
                .unwrap_or_else(|| policy.currency.clone()),
            sla_availability_ppm: entry
                .sla_availability_ppm
                .unwrap_or(policy.sla_availability_ppm),
            sla_p99_latency_ms: entry
                .sla_p99_latency_ms
                .unwrap_or(policy.sla_p99_latency_ms),
            penalty_credit_percent: policy.penalty_credit_percent,
            penalty_max_percent: policy.penalty_max_percent,
            duration_s: entry.duration_s,
            standby: entry.standby,
        }
    }

    /// The terms of one activation of the agreement for `req`: the agreement's price, SLA and
    /// penalties, the capacity asked for (refused if above the agreement's), the first mode of
    /// the primary's list that `modes` (the provider's) supports.
    pub fn terms_for(
        &self,
        req: &pb::ServiceRequirements,
        provider: Fingerprint,
        modes: &[pb::RedirectionMode],
        now: UnixMs,
    ) -> Result<pb::Offer, pb::Reject> {
        let asked = req.capacity.unwrap_or_default();
        if asked.new_connections_per_s > self.new_connections_per_s
            || (self.egress_mbps > 0 && asked.egress_mbps > self.egress_mbps)
        {
            return Err(reject(
                pb::RejectReason::NoCapacity,
                format!(
                    "agreement {} allows {} connections/s and {} Mbit/s, asked {} and {}",
                    self.agreement_id,
                    self.new_connections_per_s,
                    self.egress_mbps,
                    asked.new_connections_per_s,
                    asked.egress_mbps
                ),
            ));
        }
        let mode = common_mode(&req.modes, modes).ok_or_else(|| {
            reject(
                pb::RejectReason::ModeUnsupported,
                "no acceptable redirection mode is supported".to_owned(),
            )
        })?;
        let granted_conn = if asked.new_connections_per_s == 0 {
            self.new_connections_per_s
        } else {
            asked.new_connections_per_s
        };
        let duration_s = match req.duration_s {
            0 => self.duration_s,
            d => d.min(self.duration_s),
        };
        Ok(pb::Offer {
            offer_id: format!("lt-{}", self.agreement_id),
            request_id: req.request_id.clone(),
            provider: provider.0.to_vec(),
            granted: Some(pb::Capacity {
                new_connections_per_s: granted_conn,
                egress_mbps: asked.egress_mbps,
                storage_bytes: asked.storage_bytes,
            }),
            price: Some(pb::Price {
                per_gb_micros: self.price_per_gb_micros,
                per_1000_connections_micros: self.price_per_1000_connections_micros,
                currency: self.currency.clone(),
            }),
            sla: Some(pb::SlaTerms {
                availability_ppm: self.sla_availability_ppm,
                p99_latency_ms: self.sla_p99_latency_ms,
            }),
            penalties: Some(pb::Penalties {
                credit_percent_per_breach: self.penalty_credit_percent,
                max_credit_percent: self.penalty_max_percent,
            }),
            expires_at_ms: now,
            mode: mode as i32,
            duration_s,
        })
    }
}

/// What the primary does with an offer.
#[derive(Debug, Clone, PartialEq)]
pub enum Acceptability {
    /// Within every ceiling: take it as it is.
    Accept,
    /// Only the price is too high: propose this instead (one round).
    Counter(pb::Counter),
    /// Not acceptable whatever the price.
    Decline(String),
}

/// The policy repository (see the module documentation).
#[derive(Debug, Clone)]
pub struct Policy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    self_id: Fingerprint,
    settings: PolicySettings,
    long_term: Vec<LongTerm>,
    store: Option<Store>,
    rules: RwLock<Vec<PolicyRule>>,
}

impl Policy {
    /// A policy for node `self_id`. With a store, its operator rules are loaded now and on
    /// every [`Policy::reload_rules`].
    pub fn new(
        self_id: Fingerprint,
        settings: PolicySettings,
        long_term: Vec<LongTerm>,
        store: Option<Store>,
    ) -> Result<Self, PolicyError> {
        let mut seen = std::collections::HashSet::new();
        for agreement in &long_term {
            if agreement.agreement_id.is_empty() || agreement.agreement_id.chars().count() > 64 {
                return Err(PolicyError::LongTerm {
                    agreement_id: agreement.agreement_id.clone(),
                    reason: "an agreement id is 1 to 64 characters".to_owned(),
                });
            }
            if !seen.insert(agreement.agreement_id.clone()) {
                return Err(PolicyError::LongTerm {
                    agreement_id: agreement.agreement_id.clone(),
                    reason: "defined twice".to_owned(),
                });
            }
        }
        let policy = Self {
            inner: Arc::new(Inner {
                self_id,
                settings,
                long_term,
                store,
                rules: RwLock::new(Vec::new()),
            }),
        };
        policy.reload_rules()?;
        Ok(policy)
    }

    /// The policy of a node configured by `config` (its `[policy]`, `[resources]` modes and
    /// `[[policy.long_term]]`), with the operator rules of `store`.
    pub fn from_config(
        self_id: Fingerprint,
        config: &crate::config::Config,
        store: Option<Store>,
    ) -> Result<Self, PolicyError> {
        let long_term = config
            .policy
            .long_term
            .iter()
            .map(|entry| LongTerm::from_config(entry, &config.policy))
            .collect();
        Self::new(
            self_id,
            PolicySettings::from_config(&config.policy, &config.resources),
            long_term,
            store,
        )
    }

    /// Re-reads the operator rules from the store (call after every rule change).
    pub fn reload_rules(&self) -> Result<(), PolicyError> {
        if let Some(store) = &self.inner.store {
            let rules = store.policy_rules()?;
            let mut guard = self
                .inner
                .rules
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *guard = rules;
        }
        Ok(())
    }

    pub fn settings(&self) -> &PolicySettings {
        &self.inner.settings
    }

    pub fn self_id(&self) -> Fingerprint {
        self.inner.self_id
    }

    pub fn long_term(&self) -> &[LongTerm] {
        &self.inner.long_term
    }

    /// The operator rules currently in force.
    pub fn rules(&self) -> Vec<PolicyRule> {
        self.inner
            .rules
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The long-term agreement `id` with `peer`, if the policy has one.
    pub fn agreement(&self, id: &str, peer: &Fingerprint) -> Option<LongTerm> {
        self.inner
            .long_term
            .iter()
            .find(|a| a.agreement_id == id && a.peer == *peer)
            .cloned()
    }

    /// The agreements in which we are `role` towards `peer`.
    pub fn agreements_with(&self, peer: &Fingerprint, role: Role) -> Vec<LongTerm> {
        self.inner
            .long_term
            .iter()
            .filter(|a| a.peer == *peer && a.role == role)
            .cloned()
            .collect()
    }

    /// Deny rules (configuration and operator) that name this peer, as a reason.
    pub fn denied(&self, fingerprint: &Fingerprint, organisation: Option<&str>) -> Option<String> {
        let matches = |subject: &RuleSubject| match subject {
            RuleSubject::Fingerprint(fp) => fp == fingerprint,
            // Denying a claimed organisation is safe even when nothing vouches for the claim.
            RuleSubject::Organisation(org) => organisation.is_some_and(|o| o == org),
        };
        if let Some(subject) = self.inner.settings.deny.iter().find(|s| matches(s)) {
            return Some(format!("denied by configuration ({})", describe(subject)));
        }
        let rules = self
            .inner
            .rules
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rules
            .iter()
            .find(|r| r.action == RuleAction::Deny && matches(&r.subject))
            .map(|r| {
                format!(
                    "denied by operator rule {} ({})",
                    r.id,
                    describe(&r.subject)
                )
            })
    }

    /// Whether an allow rule names this peer. An organisation only counts when the CA bundle
    /// vouches for the certificate: in a self-signed certificate O= is a mere claim.
    fn allowed(
        &self,
        fingerprint: &Fingerprint,
        organisation: Option<&str>,
        org_verified: bool,
    ) -> bool {
        let matches = |subject: &RuleSubject| match subject {
            RuleSubject::Fingerprint(fp) => fp == fingerprint,
            RuleSubject::Organisation(org) => {
                org_verified && organisation.is_some_and(|o| o == org)
            }
        };
        if self.inner.settings.allow.iter().any(matches) {
            return true;
        }
        let rules = self
            .inner
            .rules
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rules
            .iter()
            .any(|r| r.action == RuleAction::Allow && matches(&r.subject))
    }

    /// The admission decision for a peer (see [`PeerAdmission`]): a deny rule wins over
    /// everything; then a long-term agreement (trust `LongTerm`); then an allow rule or the CA
    /// bundle (`Allowed`); then first contact if the policy admits unknown peers.
    pub fn admission(
        &self,
        fingerprint: &Fingerprint,
        organisation: Option<&str>,
        chained_to_ca: bool,
    ) -> Result<TrustLevel, String> {
        if *fingerprint == self.inner.self_id {
            // Our own key on the other end is a misconfiguration or a reflection attack.
            return Err("peer presents this node's own key".to_owned());
        }
        if let Some(reason) = self.denied(fingerprint, organisation) {
            return Err(reason);
        }
        if self.inner.long_term.iter().any(|a| a.peer == *fingerprint) {
            return Ok(TrustLevel::LongTerm);
        }
        if chained_to_ca || self.allowed(fingerprint, organisation, chained_to_ca) {
            return Ok(TrustLevel::Allowed);
        }
        match self.inner.settings.admit_unknown {
            AdmitUnknown::FirstContact => Ok(TrustLevel::FirstContact),
            AdmitUnknown::AllowList => Err(format!(
                "peer {} is not on the allow list",
                fingerprint.short()
            )),
        }
    }

    /// Provider side, step 1: the offer this node makes for `req` from `primary`, or why not.
    ///
    /// Checks, in this order: admission (rules may have changed since the handshake),
    /// reputation, redirection mode, capacity (the configured share of `spare`), price (the
    /// primary's maximum against the counter floor), SLA. The offer asks the list price; a
    /// primary whose ceiling is lower counters.
    pub fn offer_for(
        &self,
        req: &pb::ServiceRequirements,
        primary: &PeerIdentity,
        reputation: Option<u32>,
        spare: pb::Capacity,
        now: UnixMs,
    ) -> Result<pb::Offer, pb::Reject> {
        let s = &self.inner.settings;
        self.admission(&primary.fingerprint, primary.organisation.as_deref(), false)
            .or_else(|reason| {
                // A CA-chained or TLS-admitted peer keeps its handshake trust unless denied.
                if self
                    .denied(&primary.fingerprint, primary.organisation.as_deref())
                    .is_none()
                    && primary.trust >= TrustLevel::Allowed
                {
                    Ok(primary.trust)
                } else {
                    Err(reason)
                }
            })
            .map_err(|reason| reject(pb::RejectReason::PolicyDenied, reason))?;
        if let Some(score) = reputation
            && score < s.min_reputation_ppm
        {
            return Err(reject(
                pb::RejectReason::ReputationTooLow,
                format!(
                    "reputation {score} ppm is below the minimum {} ppm",
                    s.min_reputation_ppm
                ),
            ));
        }
        let mode = common_mode(&req.modes, &s.modes).ok_or_else(|| {
            reject(
                pb::RejectReason::ModeUnsupported,
                "no acceptable redirection mode is supported".to_owned(),
            )
        })?;

        let asked = req.capacity.unwrap_or_default();
        let share = u64::from(s.offer_share_percent.min(100));
        let offerable = |spare: u64| spare.saturating_mul(share) / 100;
        let conn_offerable = offerable(u64::from(spare.new_connections_per_s));
        let egress_offerable = offerable(u64::from(spare.egress_mbps));
        let storage_offerable = offerable(spare.storage_bytes);
        if conn_offerable == 0 {
            return Err(reject(
                pb::RejectReason::NoCapacity,
                "no spare connection capacity".to_owned(),
            ));
        }
        if asked.egress_mbps > 0 && egress_offerable == 0 {
            return Err(reject(
                pb::RejectReason::NoCapacity,
                "no spare egress capacity".to_owned(),
            ));
        }
        if asked.storage_bytes > storage_offerable {
            return Err(reject(
                pb::RejectReason::NoCapacity,
                format!(
                    "content of {} bytes does not fit the {} bytes offered",
                    asked.storage_bytes, storage_offerable
                ),
            ));
        }
        let grant = |asked: u32, offerable: u64| -> u32 {
            let offerable = u32::try_from(offerable).unwrap_or(u32::MAX);
            if asked == 0 {
                offerable
            } else {
                asked.min(offerable)
            }
        };
        let granted = pb::Capacity {
            new_connections_per_s: grant(asked.new_connections_per_s, conn_offerable),
            egress_mbps: if asked.egress_mbps == 0 {
                0
            } else {
                grant(asked.egress_mbps, egress_offerable)
            },
            storage_bytes: asked.storage_bytes,
        };

        let list = self.list_price();
        if let Some(max) = &req.max_price {
            if max.currency != list.currency {
                return Err(reject(
                    pb::RejectReason::PriceTooLow,
                    format!("prices are in {}, not {}", list.currency, max.currency),
                ));
            }
            let floor = floor_price(&list, s.min_price_percent);
            if max.per_gb_micros < floor.per_gb_micros
                || max.per_1000_connections_micros < floor.per_1000_connections_micros
            {
                return Err(reject(
                    pb::RejectReason::PriceTooLow,
                    format!(
                        "floor is {} per GB and {} per 1000 connections (micro-{})",
                        floor.per_gb_micros, floor.per_1000_connections_micros, floor.currency
                    ),
                ));
            }
        }

        let sla = pb::SlaTerms {
            availability_ppm: s.sla_availability_ppm,
            p99_latency_ms: s.sla_p99_latency_ms,
        };
        if let Some(min) = &req.min_sla
            && (sla.availability_ppm < min.availability_ppm
                || (min.p99_latency_ms > 0 && sla.p99_latency_ms > min.p99_latency_ms))
        {
            return Err(reject(
                pb::RejectReason::SlaUnachievable,
                format!(
                    "promises {} ppm and p99 {} ms, asked {} ppm and p99 {} ms",
                    sla.availability_ppm,
                    sla.p99_latency_ms,
                    min.availability_ppm,
                    min.p99_latency_ms
                ),
            ));
        }

        let ttl = i64::try_from(s.offer_ttl_ms.min(MAX_OFFER_TTL_MS)).unwrap_or(0);
        Ok(pb::Offer {
            offer_id: new_id("o"),
            request_id: req.request_id.clone(),
            provider: self.inner.self_id.0.to_vec(),
            granted: Some(granted),
            price: Some(list),
            sla: Some(sla),
            penalties: Some(pb::Penalties {
                credit_percent_per_breach: s.penalty_credit_percent,
                max_credit_percent: s.penalty_max_percent,
            }),
            expires_at_ms: now.saturating_add(ttl),
            mode: mode as i32,
            duration_s: req.duration_s.min(MAX_DURATION_S),
        })
    }

    /// Provider side, step 2: the answer to a primary's counter to `offer`. A price at or above
    /// `min_price_percent` of the offered price (each component) becomes a new offer (new id,
    /// fresh expiry) at the countered price and capacity (never more than offered); a lower one
    /// is refused.
    pub fn answer_counter(
        &self,
        offer: &pb::Offer,
        counter: &pb::Counter,
    ) -> Result<pb::Offer, pb::Reject> {
        let s = &self.inner.settings;
        let offered = offer.price.clone().unwrap_or_default();
        let Some(proposed) = &counter.price else {
            return Err(reject(
                pb::RejectReason::PriceTooLow,
                "a counter without a price".to_owned(),
            ));
        };
        if proposed.currency != offered.currency {
            return Err(reject(
                pb::RejectReason::PriceTooLow,
                format!(
                    "prices are in {}, not {}",
                    offered.currency, proposed.currency
                ),
            ));
        }
        let floor = floor_price(&offered, s.min_price_percent);
        if proposed.per_gb_micros < floor.per_gb_micros
            || proposed.per_1000_connections_micros < floor.per_1000_connections_micros
        {
            return Err(reject(
                pb::RejectReason::PriceTooLow,
                format!(
                    "floor is {} per GB and {} per 1000 connections (micro-{})",
                    floor.per_gb_micros, floor.per_1000_connections_micros, floor.currency
                ),
            ));
        }
        let granted = offer.granted.unwrap_or_default();
        let wanted = counter.capacity.unwrap_or_default();
        let pick = |wanted: u32, granted: u32| {
            if wanted == 0 {
                granted
            } else {
                wanted.min(granted)
            }
        };
        let ttl = i64::try_from(s.offer_ttl_ms.min(MAX_OFFER_TTL_MS)).unwrap_or(0);
        Ok(pb::Offer {
            offer_id: new_id("o"),
            granted: Some(pb::Capacity {
                new_connections_per_s: pick(
                    wanted.new_connections_per_s,
                    granted.new_connections_per_s,
                ),
                egress_mbps: pick(wanted.egress_mbps, granted.egress_mbps),
                storage_bytes: granted.storage_bytes,
            }),
            price: Some(pb::Price {
                per_gb_micros: proposed.per_gb_micros.min(offered.per_gb_micros),
                per_1000_connections_micros: proposed
                    .per_1000_connections_micros
                    .min(offered.per_1000_connections_micros),
                currency: offered.currency,
            }),
            expires_at_ms: now_ms().saturating_add(ttl),
            ..offer.clone()
        })
    }

    /// Primary side: what to do with an offer, against this node's ceilings (price, SLA,
    /// currency, modes are checked by the negotiation).
    pub fn acceptable(&self, offer: &pb::Offer) -> Acceptability {
        let s = &self.inner.settings;
        let granted = offer.granted.unwrap_or_default();
        if granted.new_connections_per_s == 0 {
            return Acceptability::Decline("the offer grants no capacity".to_owned());
        }
        let Some(price) = &offer.price else {
            return Acceptability::Decline("the offer has no price".to_owned());
        };
        if price.currency != s.currency {
            return Acceptability::Decline(format!(
                "prices are in {}, not {}",
                s.currency, price.currency
            ));
        }
        let sla = offer.sla.unwrap_or_default();
        if sla.availability_ppm < s.min_sla_availability_ppm {
            return Acceptability::Decline(format!(
                "availability {} ppm is below the minimum {} ppm",
                sla.availability_ppm, s.min_sla_availability_ppm
            ));
        }
        if s.max_sla_p99_latency_ms > 0
            && (sla.p99_latency_ms == 0 || sla.p99_latency_ms > s.max_sla_p99_latency_ms)
        {
            return Acceptability::Decline(format!(
                "p99 latency {} ms is above the maximum {} ms",
                sla.p99_latency_ms, s.max_sla_p99_latency_ms
            ));
        }
        if price.per_gb_micros <= s.max_price_per_gb_micros
            && price.per_1000_connections_micros <= s.max_price_per_1000_connections_micros
        {
            return Acceptability::Accept;
        }
        Acceptability::Counter(pb::Counter {
            price: Some(pb::Price {
                per_gb_micros: price.per_gb_micros.min(s.max_price_per_gb_micros),
                per_1000_connections_micros: price
                    .per_1000_connections_micros
                    .min(s.max_price_per_1000_connections_micros),
                currency: s.currency.clone(),
            }),
            capacity: None,
        })
    }

    /// This node's list price as a provider.
    pub fn list_price(&self) -> pb::Price {
        let s = &self.inner.settings;
        pb::Price {
            per_gb_micros: s.price_per_gb_micros,
            per_1000_connections_micros: s.price_per_1000_connections_micros,
            currency: s.currency.clone(),
        }
    }

    /// The most this node pays as a primary.
    pub fn max_price(&self) -> pb::Price {
        let s = &self.inner.settings;
        pb::Price {
            per_gb_micros: s.max_price_per_gb_micros,
            per_1000_connections_micros: s.max_price_per_1000_connections_micros,
            currency: s.currency.clone(),
        }
    }

    /// The least SLA this node accepts as a primary.
    pub fn min_sla(&self) -> pb::SlaTerms {
        let s = &self.inner.settings;
        pb::SlaTerms {
            availability_ppm: s.min_sla_availability_ppm,
            p99_latency_ms: s.max_sla_p99_latency_ms,
        }
    }
}

impl PeerAdmission for Policy {
    fn admit(&self, peer: &CertInfo, chained_to_ca: bool) -> Result<TrustLevel, String> {
        self.admission(
            &peer.fingerprint,
            peer.organisation.as_deref(),
            chained_to_ca,
        )
    }
}

/// `percent` of `price`, rounded up (so the floor is never below the percentage).
fn floor_price(price: &pb::Price, percent: u32) -> pb::Price {
    let pct = u128::from(percent.min(100));
    let scale = |v: u64| {
        let scaled = (u128::from(v) * pct).div_ceil(100);
        u64::try_from(scaled).unwrap_or(u64::MAX)
    };
    pb::Price {
        per_gb_micros: scale(price.per_gb_micros),
        per_1000_connections_micros: scale(price.per_1000_connections_micros),
        currency: price.currency.clone(),
    }
}

/// The first mode of `wanted` (the primary's order of preference) that `supported` has.
pub fn common_mode(
    wanted: &[i32],
    supported: &[pb::RedirectionMode],
) -> Option<pb::RedirectionMode> {
    wanted
        .iter()
        .filter_map(|m| pb::RedirectionMode::try_from(*m).ok())
        .filter(|m| *m != pb::RedirectionMode::Unspecified)
        .find(|m| supported.contains(m))
}

fn describe(subject: &RuleSubject) -> String {
    match subject {
        RuleSubject::Fingerprint(fp) => format!("fingerprint {}", fp.short()),
        RuleSubject::Organisation(org) => format!("organisation {org:?}"),
    }
}

/// A `Reject` with its detail clipped to the .proto limit.
pub fn reject(reason: pb::RejectReason, detail: String) -> pb::Reject {
    pb::Reject {
        reason: reason as i32,
        detail: clip(detail),
    }
}

/// `text` clipped to [`MAX_DETAIL_CHARS`] characters.
pub fn clip(text: String) -> String {
    if text.chars().count() <= MAX_DETAIL_CHARS {
        text
    } else {
        text.chars().take(MAX_DETAIL_CHARS).collect()
    }
}

/// A fresh identifier: `prefix-` and 16 random bytes in hex (at most 64 characters).
pub fn new_id(prefix: &str) -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // The system RNG never fails on Linux; still, never hand out a constant id.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = nanos.to_le_bytes();
    }
    format!("{prefix}-{}", hex::encode(bytes))
}

/// What is owed at the end of an arrangement with `terms` after `usage`, with `breaches`
/// measured SLA breaches.
///
/// Integer micro-units, never floats: charges = (per_1000_connections × connections × 10^6 +
/// per_gb × bytes) / 10^9, rounded down; credit = charges × min(breaches × credit per breach,
/// max credit, 100) / 100, rounded down; total = charges − credit. Every step saturates instead
/// of overflowing.
pub fn settle(terms: &pb::Offer, usage: &pb::Usage, breaches: u32) -> pb::Settlement {
    let price = terms.price.clone().unwrap_or_default();
    let penalties = terms.penalties.unwrap_or_default();
    let conn_part =
        u128::from(price.per_1000_connections_micros).saturating_mul(u128::from(usage.connections));
    let conn_part = conn_part.saturating_mul(1_000_000);
    let byte_part = u128::from(price.per_gb_micros).saturating_mul(u128::from(usage.bytes));
    let charges = conn_part.saturating_add(byte_part) / 1_000_000_000;
    let charges = u64::try_from(charges).unwrap_or(u64::MAX);
    let percent = penalties
        .credit_percent_per_breach
        .saturating_mul(breaches)
        .min(penalties.max_credit_percent)
        .min(100);
    let credit = u128::from(charges) * u128::from(percent) / 100;
    let credit = u64::try_from(credit).unwrap_or(u64::MAX);
    pb::Settlement {
        charges_micros: charges,
        credit_micros: credit,
        total_micros: charges.saturating_sub(credit),
        currency: price.currency,
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint([n; 32])
    }

    fn policy(settings: PolicySettings, long_term: Vec<LongTerm>) -> Policy {
        Policy::new(fp(0), settings, long_term, None).unwrap()
    }

    fn requirements(conn: u32) -> pb::ServiceRequirements {
        pb::ServiceRequirements {
            request_id: "r-1".to_owned(),
            service: Some(pb::ServiceSpec {
                name: "web".to_owned(),
                addresses: vec!["192.0.2.1:443".to_owned()],
                host_names: vec![],
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
            modes: vec![
                pb::RedirectionMode::DsrIpip as i32,
                pb::RedirectionMode::DsrGue as i32,
            ],
        }
    }

    fn requester(n: u8, trust: TrustLevel) -> PeerIdentity {
        PeerIdentity {
            fingerprint: fp(n),
            organisation: None,
            trust,
            spki_der: Vec::new(),
        }
    }

    fn spare(conn: u32) -> pb::Capacity {
        pb::Capacity {
            new_connections_per_s: conn,
            egress_mbps: 1000,
            storage_bytes: 1 << 30,
        }
    }

    fn allow_fp(n: u8) -> PolicySettings {
        PolicySettings {
            allow: vec![RuleSubject::Fingerprint(fp(n))],
            ..PolicySettings::default()
        }
    }

    #[test]
    fn admission_order_deny_wins_then_long_term_then_allow_then_first_contact() {
        let long_term = LongTerm {
            agreement_id: "lt".to_owned(),
            peer: fp(3),
            role: Role::Primary,
            new_connections_per_s: 100,
            egress_mbps: 100,
            price_per_gb_micros: 1,
            price_per_1000_connections_micros: 1,
            currency: "EUR".to_owned(),
            sla_availability_ppm: 999_000,
            sla_p99_latency_ms: 100,
            penalty_credit_percent: 1,
            penalty_max_percent: 10,
            duration_s: 3600,
            standby: false,
        };
        let settings = PolicySettings {
            allow: vec![
                RuleSubject::Fingerprint(fp(1)),
                RuleSubject::Fingerprint(fp(3)),
            ],
            deny: vec![RuleSubject::Organisation("Evil".to_owned())],
            ..PolicySettings::default()
        };
        let p = policy(settings.clone(), vec![long_term.clone()]);
        assert_eq!(p.admission(&fp(1), None, false), Ok(TrustLevel::Allowed));
        assert_eq!(p.admission(&fp(3), None, false), Ok(TrustLevel::LongTerm));
        // Deny by organisation beats the allow by fingerprint.
        assert!(p.admission(&fp(1), Some("Evil"), false).is_err());
        // Unknown: refused under allow-list, first contact otherwise.
        assert!(p.admission(&fp(2), None, false).is_err());
        assert_eq!(p.admission(&fp(2), None, true), Ok(TrustLevel::Allowed));
        let open = policy(
            PolicySettings {
                admit_unknown: AdmitUnknown::FirstContact,
                ..settings
            },
            vec![long_term],
        );
        assert_eq!(
            open.admission(&fp(2), None, false),
            Ok(TrustLevel::FirstContact)
        );
        // Our own key is never a peer.
        assert!(open.admission(&fp(0), None, false).is_err());
    }

    #[test]
    fn organisation_allow_needs_the_ca() {
        let p = policy(
            PolicySettings {
                allow: vec![RuleSubject::Organisation("Acme".to_owned())],
                ..PolicySettings::default()
            },
            vec![],
        );
        assert!(p.admission(&fp(5), Some("Acme"), false).is_err());
        assert_eq!(
            p.admission(&fp(5), Some("Acme"), true),
            Ok(TrustLevel::Allowed)
        );
    }

    #[test]
    fn operator_rules_from_the_store_apply_after_reload() {
        let store = Store::open_in_memory().unwrap();
        let p = Policy::new(
            fp(0),
            PolicySettings::default(),
            vec![],
            Some(store.clone()),
        )
        .unwrap();
        assert!(p.admission(&fp(7), None, false).is_err());
        let id = store
            .add_policy_rule(&PolicyRule {
                id: 0,
                action: RuleAction::Allow,
                subject: RuleSubject::Fingerprint(fp(7)),
                note: String::new(),
                created_ms: 1,
            })
            .unwrap();
        assert!(
            p.admission(&fp(7), None, false).is_err(),
            "not before reload"
        );
        p.reload_rules().unwrap();
        assert_eq!(p.admission(&fp(7), None, false), Ok(TrustLevel::Allowed));
        store
            .add_policy_rule(&PolicyRule {
                id: 0,
                action: RuleAction::Deny,
                subject: RuleSubject::Fingerprint(fp(7)),
                note: String::new(),
                created_ms: 2,
            })
            .unwrap();
        p.reload_rules().unwrap();
        assert!(p.admission(&fp(7), None, false).is_err(), "deny wins");
        assert!(store.remove_policy_rule(id).unwrap());
    }

    #[test]
    fn offer_grants_the_share_of_spare_at_list_price() {
        let p = policy(allow_fp(1), vec![]);
        let offer = p
            .offer_for(
                &requirements(1000),
                &requester(1, TrustLevel::Allowed),
                None,
                spare(400),
                1_000,
            )
            .unwrap();
        let granted = offer.granted.unwrap();
        assert_eq!(granted.new_connections_per_s, 200, "50 % of 400");
        assert_eq!(granted.egress_mbps, 100);
        assert_eq!(offer.price.unwrap().per_gb_micros, 20_000);
        assert_eq!(
            offer.mode,
            pb::RedirectionMode::DsrIpip as i32,
            "primary's first choice"
        );
        assert_eq!(offer.expires_at_ms, 11_000);
        assert_eq!(offer.provider, fp(0).0.to_vec());
        assert_eq!(offer.request_id, "r-1");
        let small = p
            .offer_for(
                &requirements(10),
                &requester(1, TrustLevel::Allowed),
                None,
                spare(400),
                1_000,
            )
            .unwrap();
        assert_eq!(small.granted.unwrap().new_connections_per_s, 10);
        assert_ne!(small.offer_id, offer.offer_id);
    }

    #[test]
    fn offer_rejections_name_their_reason() {
        let p = policy(allow_fp(1), vec![]);
        let who = requester(1, TrustLevel::Allowed);
        let reason = |r: Result<pb::Offer, pb::Reject>| r.unwrap_err().reason();
        assert_eq!(
            reason(p.offer_for(
                &requirements(10),
                &requester(9, TrustLevel::FirstContact),
                None,
                spare(400),
                0
            )),
            pb::RejectReason::PolicyDenied
        );
        assert_eq!(
            reason(p.offer_for(&requirements(10), &who, None, spare(1), 0)),
            pb::RejectReason::NoCapacity
        );
        let mut cheap = requirements(10);
        cheap.max_price.as_mut().unwrap().per_gb_micros = 15_999;
        assert_eq!(
            reason(p.offer_for(&cheap, &who, None, spare(400), 0)),
            pb::RejectReason::PriceTooLow
        );
        let mut at_floor = requirements(10);
        at_floor.max_price.as_mut().unwrap().per_gb_micros = 16_000;
        assert!(p.offer_for(&at_floor, &who, None, spare(400), 0).is_ok());
        let mut strict = requirements(10);
        strict.min_sla.as_mut().unwrap().p99_latency_ms = 50;
        assert_eq!(
            reason(p.offer_for(&strict, &who, None, spare(400), 0)),
            pb::RejectReason::SlaUnachievable
        );
        let mut http = requirements(10);
        http.modes = vec![pb::RedirectionMode::HttpRedirect as i32];
        let gue_only = policy(
            PolicySettings {
                modes: vec![pb::RedirectionMode::DsrGue],
                ..allow_fp(1)
            },
            vec![],
        );
        assert_eq!(
            reason(gue_only.offer_for(&http, &who, None, spare(400), 0)),
            pb::RejectReason::ModeUnsupported
        );
        let picky = policy(
            PolicySettings {
                min_reputation_ppm: 500_000,
                ..allow_fp(1)
            },
            vec![],
        );
        assert_eq!(
            reason(picky.offer_for(&requirements(10), &who, Some(499_999), spare(400), 0)),
            pb::RejectReason::ReputationTooLow
        );
        assert!(
            picky
                .offer_for(&requirements(10), &who, Some(500_000), spare(400), 0)
                .is_ok()
        );
    }

    #[test]
    fn counter_is_taken_down_to_the_floor_and_refused_below() {
        let p = policy(allow_fp(1), vec![]);
        let offer = p
            .offer_for(
                &requirements(100),
                &requester(1, TrustLevel::Allowed),
                None,
                spare(400),
                0,
            )
            .unwrap();
        let counter = |gb: u64, conn: u64| pb::Counter {
            price: Some(pb::Price {
                per_gb_micros: gb,
                per_1000_connections_micros: conn,
                currency: "EUR".to_owned(),
            }),
            capacity: Some(pb::Capacity {
                new_connections_per_s: 60,
                ..Default::default()
            }),
        };
        let answer = p.answer_counter(&offer, &counter(16_000, 800)).unwrap();
        assert_ne!(answer.offer_id, offer.offer_id);
        assert_eq!(answer.price.as_ref().unwrap().per_gb_micros, 16_000);
        assert_eq!(answer.granted.unwrap().new_connections_per_s, 60);
        assert_eq!(answer.request_id, offer.request_id);
        let refused = p.answer_counter(&offer, &counter(16_000, 799)).unwrap_err();
        assert_eq!(refused.reason(), pb::RejectReason::PriceTooLow);
        // A counter above the offered price never raises it.
        let generous = p.answer_counter(&offer, &counter(99_000, 99_000)).unwrap();
        assert_eq!(generous.price.unwrap().per_gb_micros, 20_000);
    }

    #[test]
    fn primary_accepts_counters_or_declines() {
        let p = policy(PolicySettings::default(), vec![]);
        let offer = |gb: u64, conn: u64, p99: u32| pb::Offer {
            granted: Some(pb::Capacity {
                new_connections_per_s: 10,
                ..Default::default()
            }),
            price: Some(pb::Price {
                per_gb_micros: gb,
                per_1000_connections_micros: conn,
                currency: "EUR".to_owned(),
            }),
            sla: Some(pb::SlaTerms {
                availability_ppm: 999_000,
                p99_latency_ms: p99,
            }),
            ..Default::default()
        };
        assert_eq!(
            p.acceptable(&offer(20_000, 2_000, 500)),
            Acceptability::Accept
        );
        match p.acceptable(&offer(60_000, 1_000, 100)) {
            Acceptability::Counter(c) => {
                let price = c.price.unwrap();
                assert_eq!(price.per_gb_micros, 50_000);
                assert_eq!(price.per_1000_connections_micros, 1_000);
            }
            other => panic!("expected a counter, got {other:?}"),
        }
        assert!(matches!(
            p.acceptable(&offer(1, 1, 501)),
            Acceptability::Decline(_)
        ));
        let mut usd = offer(1, 1, 100);
        usd.price.as_mut().unwrap().currency = "USD".to_owned();
        assert!(matches!(p.acceptable(&usd), Acceptability::Decline(_)));
    }

    #[test]
    fn long_term_terms_fit_the_agreement() {
        let lt = LongTerm {
            agreement_id: "acme-2026".to_owned(),
            peer: fp(3),
            role: Role::Provider,
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
        let p = policy(PolicySettings::default(), vec![lt.clone()]);
        assert_eq!(p.agreement("acme-2026", &fp(3)), Some(lt.clone()));
        assert_eq!(p.agreement("acme-2026", &fp(4)), None);
        let modes = [pb::RedirectionMode::DsrGue];
        let terms = lt.terms_for(&requirements(400), fp(0), &modes, 7).unwrap();
        assert_eq!(terms.price.unwrap().per_gb_micros, 5_000);
        assert_eq!(terms.duration_s, 600);
        assert_eq!(terms.mode, pb::RedirectionMode::DsrGue as i32);
        let too_much = lt
            .terms_for(&requirements(501), fp(0), &modes, 7)
            .unwrap_err();
        assert_eq!(too_much.reason(), pb::RejectReason::NoCapacity);
        let duplicate = Policy::new(fp(0), PolicySettings::default(), vec![lt.clone(), lt], None);
        assert!(duplicate.is_err());
    }

    #[test]
    fn built_from_the_configuration_sections() {
        let policy_toml = format!(
            r#"
admit_unknown = "first-contact"
deny = [{{ fingerprint = "{deny}" }}]
price_per_gb_micros = 12345
max_price_per_gb_micros = 23456

[[long_term]]
agreement_id = "acme-2026"
peer = "{peer}"
role = "primary"
new_connections_per_s = 300
price_per_gb_micros = 1000
"#,
            deny = fp(9),
            peer = fp(3),
        );
        let policy: PolicyConfig = toml::from_str(&policy_toml).unwrap();
        let resources: ResourcesConfig = toml::from_str(r#"decap_v4 = "192.0.2.1""#).unwrap();
        let long_term = policy
            .long_term
            .iter()
            .map(|e| LongTerm::from_config(e, &policy))
            .collect();
        let settings = PolicySettings::from_config(&policy, &resources);
        let p = Policy::new(fp(0), settings, long_term, None).unwrap();
        let s = p.settings();
        assert_eq!(s.price_per_gb_micros, 12_345);
        assert_eq!(s.max_price_per_gb_micros, 23_456);
        assert_eq!(
            s.modes,
            [pb::RedirectionMode::DsrGue, pb::RedirectionMode::DsrIpip],
            "a decap address and no surrogate"
        );
        assert!(p.admission(&fp(9), None, false).is_err());
        assert_eq!(
            p.admission(&fp(4), None, false),
            Ok(TrustLevel::FirstContact)
        );
        assert_eq!(p.admission(&fp(3), None, false), Ok(TrustLevel::LongTerm));
        let lt = p.agreement("acme-2026", &fp(3)).unwrap();
        assert_eq!(lt.role, Role::Primary);
        assert_eq!(lt.currency, "EUR");
        assert_eq!(lt.price_per_gb_micros, 1_000);
        assert_eq!(lt.sla_p99_latency_ms, s.sla_p99_latency_ms);
    }

    #[test]
    fn settlement_arithmetic_is_exact_and_saturating() {
        let terms = pb::Offer {
            price: Some(pb::Price {
                per_gb_micros: 10_000,
                per_1000_connections_micros: 1_000,
                currency: "EUR".to_owned(),
            }),
            penalties: Some(pb::Penalties {
                credit_percent_per_breach: 10,
                max_credit_percent: 25,
            }),
            ..Default::default()
        };
        let usage = |connections: u64, bytes: u64| pb::Usage {
            connections,
            bytes,
            packets: 0,
            measured_at_ms: 0,
        };
        // 2500 connections at 1000 per 1000 = 2500; 3 GB at 10000 per GB = 30000.
        let s = settle(&terms, &usage(2_500, 3_000_000_000), 0);
        assert_eq!(
            (s.charges_micros, s.credit_micros, s.total_micros),
            (32_500, 0, 32_500)
        );
        assert_eq!(s.currency, "EUR");
        // One breach: 10 %; five breaches: capped at 25 %.
        let s = settle(&terms, &usage(2_500, 3_000_000_000), 1);
        assert_eq!((s.credit_micros, s.total_micros), (3_250, 29_250));
        let s = settle(&terms, &usage(2_500, 3_000_000_000), 5);
        assert_eq!((s.credit_micros, s.total_micros), (8_125, 24_375));
        // Fractions of a micro-unit round down, on the sum: 0.5 + 0.7 = 1.2 → 1, not 0 + 0.
        let mut fine = terms.clone();
        fine.price.as_mut().unwrap().per_1000_connections_micros = 1;
        let s = settle(&fine, &usage(500, 70_000), 0);
        assert_eq!(s.charges_micros, 1);
        let s = settle(&fine, &usage(500, 0), 0);
        assert_eq!(s.charges_micros, 0);
        // Overflow saturates.
        let mut huge = terms.clone();
        huge.price.as_mut().unwrap().per_gb_micros = u64::MAX;
        huge.penalties.as_mut().unwrap().credit_percent_per_breach = u32::MAX;
        let s = settle(&huge, &usage(u64::MAX, u64::MAX), u32::MAX);
        assert_eq!(s.charges_micros, u64::MAX);
        assert_eq!(s.credit_micros, u64::MAX / 4);
        assert_eq!(s.total_micros, u64::MAX - u64::MAX / 4);
    }
}
