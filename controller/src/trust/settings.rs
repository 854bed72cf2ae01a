//! The engine's settings and their defaults, with the reason for each (docs/trust.md has the
//! same table and the figures the defaults were tuned on).

use serde::{Deserialize, Serialize};

/// Every knob of the trust engine. [`TrustSettings::default`] is what the daemon and the
/// simulation run with; [`TrustSettings::validate`] refuses settings the rules cannot work
/// with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrustSettings {
    /// Half-life of every observation, ms. Default 10 min: a failure an hour old weighs 1/64
    /// of a fresh one, so a peer that was down yesterday is judged on today.
    pub half_life_ms: i64,
    /// Beta prior of each dimension, successes. With `prior_failures`, the score of a peer
    /// nobody has observed: 0.9 per dimension. The prior says nothing about *standing* (how
    /// much a peer is relied on), which starts at 0 for a new identity.
    pub prior_successes: f64,
    /// Beta prior of each dimension, failures (see `prior_successes`).
    pub prior_failures: f64,
    /// Failures one verified corruption counts for in integrity. Default 25: one corruption
    /// outweighs 25 clean samples, where a slow answer counts 1 in latency, a dimension that
    /// can cost at most `latency_share` of the score.
    pub corruption_weight: f64,
    /// Failures one unanswered sample or probe counts for in availability. Default 1.
    pub unavailable_weight: f64,
    /// Time to the response head above which an answer is slow, ms. Default 500.
    pub latency_target_ms: f64,
    /// Failures one slow answer counts for in latency. Default 1.
    pub slow_weight: f64,
    /// Share of the score latency can take away. Default 0.25: a peer that answers everything
    /// late keeps 3/4 of its score; slowness alone never isolates.
    pub latency_share: f64,
    /// Measured capacity ≥ this share of the advertised one counts as honest. Default 0.8
    /// (measurement noise and the peer's own load).
    pub capacity_tolerance: f64,
    /// Failures a capacity measurement counts for, × the relative shortfall below the
    /// tolerance. Default 3: a peer delivering a third of what it advertises (shortfall 0.58)
    /// loses about 1.8 per measurement and is isolated after three.
    pub capacity_weight: f64,
    /// Direct score below which a peer is isolated. Default 0.3.
    pub isolation_threshold: f64,
    /// Direct observations (weighted) the failing dimension needs before a score can isolate:
    /// a peer is never isolated on its prior or on one unlucky sample. Default 4.
    pub min_isolation_evidence: f64,
    /// Verified clean samples for standing ½ (standing = v / (v + this), v = our own clean
    /// samples plus what our long-term peers report, at the hearsay weight). Default 20: a new
    /// identity earns weight only as fast as samples vouch for it, and nobody else's praise
    /// (liars', Sybils') adds to it; the long-term peers have standing 1 from the start.
    pub standing_half: f64,
    /// Weight factor ceiling on probation. Default 0.5.
    pub probation_cap: f64,
    /// Clean samples on probation before a peer can be trusted. Default 10.
    pub recover_samples: u32,
    /// Score a peer on probation needs to be trusted. Default 0.7.
    pub recover_score: f64,
    /// Clean samples of other objects that release a quarantine without its recheck.
    /// Default 5.
    pub release_after: u32,
    /// Isolation for dishonesty (corruption, capacity lies), ms; doubled for each earlier
    /// strike. Default 1 h.
    pub hold_dishonest_ms: i64,
    /// Isolation for unreliability (downtime), ms. Default 5 min.
    pub hold_unreliable_ms: i64,
    /// Half-life of strikes (isolations for dishonesty), ms. Default 24 h: a peer back on
    /// probation within a day is isolated by its first corruption, without quarantine.
    pub strike_half_life_ms: i64,
    /// What a credible reporter's observation weighs against one's own. Default 0.5.
    pub hearsay_weight: f64,
    /// Own observations at which reports count half (reports × d / (d + own)). Default 20:
    /// a peer this node samples often is judged on its own samples.
    pub direct_dominance: f64,
    /// Observations one report can stand for, per dimension. Default 100: no reporter
    /// outweighs a hundred samples, whatever counts it claims.
    pub report_count_cap: f64,
    /// Sum of the credibility of reporters with checkable corruption claims at which a peer
    /// is quarantined pending our own check. Default 1.0: one pre-trusted reporter, or
    /// several established ones; newcomers' claims only ask for a check.
    pub claim_quarantine: f64,
    /// Agreement a reporter needs for its claims to be checked at all. Default 0.3.
    pub check_min_agreement: f64,
    /// Pending checks kept at most. Default 64.
    pub max_checks: usize,
    /// A check not done within this is dropped, ms. Default 60 s.
    pub check_ttl_ms: i64,
    /// Agreement prior (agreements). With `agreement_prior_contradictions`, a reporter
    /// nobody has compared starts at 0.8.
    pub agreement_prior_agreements: f64,
    /// Agreement prior (contradictions).
    pub agreement_prior_contradictions: f64,
    /// Contradictions one statistically impossible report counts for. Default 3.
    pub contradiction_weight: f64,
    /// Contradictions one refuted claim counts for (we fetched the object it named and it was
    /// intact). Default 5: two refuted claims take a reporter below `check_min_agreement`.
    pub refutation_weight: f64,
    /// A report contradicts our own samples when the chance of both being true is below this.
    /// Default 0.01.
    pub contradiction_p: f64,
    /// Own clean samples needed before a corruption claim can be judged statistically.
    /// Default 8.
    pub min_compare_samples: f64,
    /// EigenTrust teleport share towards the pre-trusted set. Default 0.15.
    pub eigen_teleport: f64,
    /// EigenTrust power iterations. Default 20.
    pub eigen_iterations: usize,
    /// EigenTrust is recomputed this often, ms (credibility follows agreement every tick).
    /// Default 5 s: global trust moves with reports, which arrive every few seconds.
    pub eigen_every_ms: i64,
    /// Global trust × number of trusted nodes at which a reporter's weight is 1 (an average
    /// node). Default 1.
    pub eigen_reference: f64,
    /// Window of the counts a report states, ms. Default 10 min (one half-life).
    pub report_window_ms: i64,
    /// A subject's report is re-published at most this often unless a corruption is new, ms.
    /// Default 5 s.
    pub report_interval_ms: i64,
    /// Reports whose window ended longer ago are dropped, ms. Default 15 min.
    pub max_report_age_ms: i64,
}

impl Default for TrustSettings {
    fn default() -> Self {
        Self {
            half_life_ms: 600_000,
            prior_successes: 1.8,
            prior_failures: 0.2,
            corruption_weight: 25.0,
            unavailable_weight: 1.0,
            latency_target_ms: 500.0,
            slow_weight: 1.0,
            latency_share: 0.25,
            capacity_tolerance: 0.8,
            capacity_weight: 3.0,
            isolation_threshold: 0.3,
            min_isolation_evidence: 4.0,
            standing_half: 40.0,
            probation_cap: 0.5,
            recover_samples: 10,
            recover_score: 0.7,
            release_after: 5,
            hold_dishonest_ms: 3_600_000,
            hold_unreliable_ms: 300_000,
            strike_half_life_ms: 86_400_000,
            hearsay_weight: 0.5,
            direct_dominance: 20.0,
            report_count_cap: 100.0,
            claim_quarantine: 1.0,
            check_min_agreement: 0.3,
            max_checks: 64,
            check_ttl_ms: 60_000,
            agreement_prior_agreements: 4.0,
            agreement_prior_contradictions: 1.0,
            contradiction_weight: 3.0,
            refutation_weight: 5.0,
            contradiction_p: 0.01,
            min_compare_samples: 8.0,
            eigen_teleport: 0.15,
            eigen_iterations: 20,
            eigen_every_ms: 5_000,
            eigen_reference: 1.0,
            report_window_ms: 600_000,
            report_interval_ms: 5_000,
            max_report_age_ms: 900_000,
        }
    }
}

/// A setting out of its range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("trust setting {name} = {value}: {why}")]
pub struct SettingsError {
    pub name: &'static str,
    pub value: f64,
    pub why: &'static str,
}

impl TrustSettings {
    /// Refuses values the rules cannot work with (durations ≤ 0, shares outside `[0, 1]`,
    /// weights ≤ 0, NaN).
    pub fn validate(&self) -> Result<(), SettingsError> {
        let positive: [(&'static str, f64); 19] = [
            ("half_life_ms", self.half_life_ms as f64),
            ("prior_successes", self.prior_successes),
            ("prior_failures", self.prior_failures),
            ("corruption_weight", self.corruption_weight),
            ("unavailable_weight", self.unavailable_weight),
            ("latency_target_ms", self.latency_target_ms),
            ("slow_weight", self.slow_weight),
            ("capacity_weight", self.capacity_weight),
            ("standing_half", self.standing_half),
            ("hold_dishonest_ms", self.hold_dishonest_ms as f64),
            ("hold_unreliable_ms", self.hold_unreliable_ms as f64),
            ("strike_half_life_ms", self.strike_half_life_ms as f64),
            ("direct_dominance", self.direct_dominance),
            ("report_count_cap", self.report_count_cap),
            (
                "agreement_prior_agreements",
                self.agreement_prior_agreements,
            ),
            ("report_window_ms", self.report_window_ms as f64),
            ("max_report_age_ms", self.max_report_age_ms as f64),
            ("check_ttl_ms", self.check_ttl_ms as f64),
            ("eigen_every_ms", self.eigen_every_ms as f64),
        ];
        for (name, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(SettingsError {
                    name,
                    value,
                    why: "must be a positive number",
                });
            }
        }
        let shares: [(&'static str, f64); 8] = [
            ("latency_share", self.latency_share),
            ("capacity_tolerance", self.capacity_tolerance),
            ("isolation_threshold", self.isolation_threshold),
            ("probation_cap", self.probation_cap),
            ("recover_score", self.recover_score),
            ("hearsay_weight", self.hearsay_weight),
            ("check_min_agreement", self.check_min_agreement),
            ("contradiction_p", self.contradiction_p),
        ];
        for (name, value) in shares {
            if !(0.0..=1.0).contains(&value) {
                return Err(SettingsError {
                    name,
                    value,
                    why: "must be within [0, 1]",
                });
            }
        }
        if !(self.eigen_teleport > 0.0 && self.eigen_teleport <= 1.0) {
            return Err(SettingsError {
                name: "eigen_teleport",
                value: self.eigen_teleport,
                why: "must be within (0, 1]",
            });
        }
        let non_negative: [(&'static str, f64); 7] = [
            ("min_isolation_evidence", self.min_isolation_evidence),
            ("claim_quarantine", self.claim_quarantine),
            (
                "agreement_prior_contradictions",
                self.agreement_prior_contradictions,
            ),
            ("contradiction_weight", self.contradiction_weight),
            ("refutation_weight", self.refutation_weight),
            ("min_compare_samples", self.min_compare_samples),
            ("eigen_reference", self.eigen_reference),
        ];
        for (name, value) in non_negative {
            if !(value.is_finite() && value >= 0.0) {
                return Err(SettingsError {
                    name,
                    value,
                    why: "must be a non-negative number",
                });
            }
        }
        if self.recover_score < self.isolation_threshold {
            return Err(SettingsError {
                name: "recover_score",
                value: self.recover_score,
                why: "must be at least isolation_threshold",
            });
        }
        if self.report_interval_ms < 0 {
            return Err(SettingsError {
                name: "report_interval_ms",
                value: self.report_interval_ms as f64,
                why: "must not be negative",
            });
        }
        Ok(())
    }
}
