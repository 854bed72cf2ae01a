//! The trust engine: how far each peer is trusted, from this node's own observations and from
//! other nodes' signed reports, and what follows (issue 6; docs/trust.md).
//!
//! Seed 003: with many peers, vetting each one is infeasible and identifying a misbehaving
//! peer is not enough; trust is ongoing and never assumes that a peer behaves consistently or
//! honestly. The engine is pure and deterministic: no I/O, no clock of its own (every call
//! takes `now`), no randomness; the daemon (or the simulation, `cargo xtask sim trust`) feeds
//! it and applies what it decides.
//!
//! - **Observations** ([`TrustEngine::observe`]): content samples (verified / corrupted),
//!   unanswered samples and probes, answers with their latency, capacity measurements against
//!   the advertised capacity. Each feeds one or more [`Dimension`]s, each a [`Beta`] reputation
//!   (decayed successes and failures). A verified corruption weighs `corruption_weight`
//!   failures (25) where a slow answer weighs 1 in a dimension that can cost at most a quarter
//!   of the score.
//! - **Corruption** quarantines the peer at once (weight 0), pending a confirming sample: the
//!   same object fetched again ([`TrustEngine::checks`] asks for it). Corrupted again, or any
//!   second corruption while quarantined → isolated for dishonesty; intact → released on
//!   probation (a transfer error is not a lie). A corruption of an object another reporter
//!   already named is corroborated and isolates at once.
//! - **Score** = integrity × capacity honesty × availability × (1 − ¼ + ¼ latency), from the
//!   own observations plus credible reports; **standing** = how much verified evidence vouches
//!   for the peer (0 for a new identity, 1 for the pre-trusted long-term peers); **trust** =
//!   score × standing; the **weight factor** (Maglev weight ∝ capacity × factor) is trust,
//!   capped on probation, 0 when quarantined or isolated.
//! - **Isolation** needs this node's own evidence: a confirmed corruption, or a direct score
//!   below `isolation_threshold` with enough observations in the failing dimension. Reports
//!   alone can quarantine (and ask for a check), never isolate: nobody is terminated for cause
//!   on hearsay. Isolation ends after a hold (1 h for dishonesty, doubled per strike; 5 min for
//!   unreliability), then probation with fresh counts, then trust again.
//! - **Reports** ([`TrustEngine::reports`]) state direct observations only, as counts over a
//!   window, with the paths of corrupted objects as checkable evidence. Received reports
//!   ([`TrustEngine::ingest_report`]) are weighed by the reporter's credibility: its
//!   EigenTrust global trust (pre-trusted set: this node and its long-term peers) × its
//!   agreement with this node's own observations (a reporter whose statements are impossible
//!   given our samples, or whose named objects we fetched intact, loses its voice). A new
//!   identity has no global trust until someone trusted vouches for it, so a crowd of Sybils
//!   carries no weight.
//!
//! Every [`Decision`] carries its evidence (sample ids, report ids, scores);
//! [`TrustEngine::assess`] is what `p2pcdn peers --json` shows.

mod beta;
mod eigen;
mod report;
mod settings;
#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    fmt,
    sync::Arc,
};

pub use beta::Beta;
pub use report::{
    MAX_MISMATCHED_PATHS, MAX_PATH_CHARS, MAX_REPORT_BYTES, MAX_REPORT_COUNT, MAX_SIGNED_BYTES,
    MAX_WINDOW_MS, ReportError, ReportId, VerifiedReport, check_shape, claimed_reporter,
    decode_signed, encode_signed,
};
use serde::Serialize;
pub use settings::{SettingsError, TrustSettings};

use crate::{
    model::{Fingerprint, UnixMs},
    proto::pb,
    sampler::{Sample, Verdict},
};

/// Decisions kept per peer for its assessment.
const LOG_LEN: usize = 16;
/// Failures kept per peer as evidence.
const FAILURES_LEN: usize = 16;
/// Subjects one reporter may report on (memory bound against report floods).
pub const MAX_SUBJECTS_PER_REPORTER: usize = 1024;
/// Buckets of the report window.
const BUCKETS: i64 = 10;
/// Longest isolation, whatever the strikes, ms.
const MAX_HOLD_MS: i64 = 86_400_000;

/// What is judged about a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    /// The bytes it serves match the primary's signed manifest.
    Integrity,
    /// It answers at all.
    Availability,
    /// It answers within `latency_target_ms`.
    Latency,
    /// It delivers the capacity it advertises.
    CapacityHonesty,
}

impl Dimension {
    pub const ALL: [Self; 4] = [
        Self::Integrity,
        Self::Availability,
        Self::Latency,
        Self::CapacityHonesty,
    ];

    fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Integrity => "integrity",
            Self::Availability => "availability",
            Self::Latency => "latency",
            Self::CapacityHonesty => "capacity_honesty",
        }
    }

    /// Whether failing it is dishonesty (rather than unreliability).
    pub fn is_honesty(self) -> bool {
        matches!(self, Self::Integrity | Self::CapacityHonesty)
    }
}

const INT: usize = 0;
const AVAIL: usize = 1;
const LAT: usize = 2;
const CAP: usize = 3;

/// An object of some primary's signed manifest, as served by a peer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectRef {
    /// The primary whose manifest signs it.
    pub owner: Fingerprint,
    pub path: String,
    /// `(first, last)` byte of a slice, inclusive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range: Option<(u64, u64)>,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.owner.short(), self.path)?;
        if let Some((a, b)) = self.range {
            write!(f, " bytes {a}-{b}")?;
        }
        Ok(())
    }
}

/// What one observation found.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A sample whose bytes matched the manifest (integrity, availability, latency).
    Verified { object: ObjectRef, latency_ms: f64 },
    /// A sample whose length or bytes differed from what the manifest signs.
    Corrupted { object: ObjectRef, detail: String },
    /// No answer in time, a refused connection, a 404 for a listed object, a 5xx.
    Unavailable { detail: String },
    /// A probe or heartbeat answered (availability, latency).
    Answered { latency_ms: f64 },
    /// Capacity measured (e.g. connections or bytes per second delivered under load) against
    /// the capacity the peer advertised.
    Capacity { advertised: f64, measured: f64 },
}

/// One direct observation of a peer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Observation {
    /// The sample's or probe's id, quoted as evidence in decisions.
    pub id: u64,
    pub at: UnixMs,
    pub outcome: Outcome,
}

/// Where a peer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Weight factor = trust.
    Trusted,
    /// New, or back from quarantine or isolation: weight factor capped at `probation_cap`.
    Probation,
    /// Weight 0 pending a confirming sample; arrangements kept.
    Quarantined,
    /// Weight 0, arrangements terminated for cause, excluded from negotiation until the hold
    /// is served.
    Isolated,
}

/// One piece of evidence behind a decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Evidence {
    /// A direct observation (its sample or probe id).
    Sample {
        id: u64,
        at: UnixMs,
        dimension: Dimension,
        what: String,
    },
    /// A report, with the credibility it was weighed with.
    Report {
        report: ReportId,
        credibility: f64,
        what: String,
    },
    /// A direct score against its threshold.
    Score {
        dimension: Dimension,
        score: f64,
        threshold: f64,
    },
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sample {
                id,
                dimension,
                what,
                ..
            } => write!(f, "sample {id} ({}: {what})", dimension.as_str()),
            Self::Report {
                report,
                credibility,
                what,
            } => write!(f, "report {report} (credibility {credibility:.2}: {what})"),
            Self::Score {
                dimension,
                score,
                threshold,
            } => write!(
                f,
                "{} score {score:.2} < {threshold:.2}",
                dimension.as_str()
            ),
        }
    }
}

/// What the engine decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum DecisionKind {
    /// Weight 0 at once, pending a confirming sample.
    Quarantine,
    /// Weight 0, terminate its arrangements for cause (`dishonest`: with the agreed penalty;
    /// otherwise as an SLA breach), exclude it from negotiation.
    Isolate { dishonest: bool },
    /// Quarantine lifted: on probation.
    Release,
    /// Isolation served: on probation, may be negotiated with again.
    Restore,
    /// Probation over: trusted.
    Recover,
}

/// Why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A sample's bytes did not match the signed manifest.
    Corruption,
    /// The confirming sample of the same object was corrupted too.
    ConfirmedCorruption,
    /// Another object was corrupted while quarantined.
    SecondCorruption,
    /// A corruption within a strike's memory (on probation after an isolation).
    RepeatOffence,
    /// Credible reporters named corrupted objects.
    CredibleClaims,
    /// A dimension's direct score fell below the isolation threshold.
    LowScore,
    /// The confirming sample was intact.
    CleanRecheck,
    /// Enough intact samples of other objects.
    CleanSamples,
    /// The claims lost their credibility (refuted, or the reporters discounted).
    ClaimsWithdrawn,
    /// The isolation's hold was served.
    HoldServed,
    /// Enough clean samples and score on probation.
    Recovered,
}

/// A decision about one peer, with its evidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub subject: Fingerprint,
    pub at: UnixMs,
    #[serde(flatten)]
    pub kind: DecisionKind,
    pub reason: Reason,
    /// The peer's trust when it was decided.
    pub trust: f64,
    pub evidence: Vec<Evidence>,
}

impl Decision {
    /// The evidence on one line (logs, disband reasons).
    pub fn evidence_text(&self) -> String {
        let mut text = format!("{:?}", self.reason);
        for e in &self.evidence {
            text.push_str("; ");
            text.push_str(&e.to_string());
        }
        text
    }

    /// Ids of the samples behind it.
    pub fn sample_ids(&self) -> Vec<u64> {
        self.evidence
            .iter()
            .filter_map(|e| match e {
                Evidence::Sample { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// Ids of the reports behind it.
    pub fn report_ids(&self) -> Vec<ReportId> {
        self.evidence
            .iter()
            .filter_map(|e| match e {
                Evidence::Report { report, .. } => Some(*report),
                _ => None,
            })
            .collect()
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} {} (trust {:.2}): {}",
            self.kind,
            self.subject.short(),
            self.trust,
            self.evidence_text()
        )
    }
}

/// A sample the engine asks for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub subject: Fingerprint,
    /// Fetch this object from `subject` and check it against `object.owner`'s manifest.
    pub object: ObjectRef,
    #[serde(flatten)]
    pub why: CheckWhy,
    pub since: UnixMs,
    /// Higher first.
    pub priority: f64,
}

/// Why a check is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum CheckWhy {
    /// The confirming sample of a quarantine.
    Recheck { sample: u64 },
    /// A reporter named this object as corrupted by `subject`.
    Claim { report: ReportId },
}

/// How a received report compared with our own observations of its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    /// Too few own observations, or nothing to compare.
    NotComparable,
    Agrees,
    /// Improbable given our own samples: the reporter's agreement drops.
    Contradicts,
}

/// A report taken in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ingested {
    pub report: ReportId,
    pub subject: Fingerprint,
    /// False for reports about this node (nothing to assess).
    pub kept: bool,
    pub comparison: Comparison,
}

/// One dimension of an assessment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DimensionView {
    pub dimension: Dimension,
    /// Posterior mean from the prior, own observations and credible reports.
    pub score: f64,
    /// Own observations (decayed, weighted).
    pub direct: Beta,
    /// Credibility-weighted reports, as counted in `score`.
    pub reported: Beta,
}

/// A peer as a reporter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReporterView {
    /// EigenTrust global trust, relative to an average node (capped at 1).
    pub global_trust: f64,
    /// Agreement of its reports with our own observations.
    pub agreement: f64,
    /// What its reports weigh: global trust × agreement (agreement alone if pre-trusted).
    pub credibility: f64,
}

/// Everything the engine holds about one peer (`p2pcdn peers --json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assessment {
    pub subject: Fingerprint,
    pub state: State,
    pub pre_trusted: bool,
    /// Score × standing.
    pub trust: f64,
    /// Behaviour, from own observations and credible reports.
    pub score: f64,
    /// Behaviour, from own observations only (what isolation looks at).
    pub direct_score: f64,
    /// How much verified evidence vouches for it.
    pub standing: f64,
    /// Maglev weight ∝ advertised capacity × this.
    pub weight_factor: f64,
    pub dimensions: Vec<DimensionView>,
    pub as_reporter: ReporterView,
    /// Credibility of reporters with unrefuted corruption claims about it.
    pub claims: f64,
    /// Isolations for dishonesty, decayed.
    pub strikes: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolated_until_ms: Option<UnixMs>,
    pub pending_checks: Vec<Check>,
    /// Most recent last.
    pub decisions: Vec<Decision>,
    /// Most recent last.
    pub recent_failures: Vec<Evidence>,
}

// ---------------------------------------------------------------------------------------
// Internal state
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Cause {
    Corruption {
        object: ObjectRef,
        evidence: Evidence,
        /// Reports that had named the object or quarantined the peer.
        reports: Vec<Evidence>,
    },
    Claims,
}

#[derive(Debug, Clone)]
enum Phase {
    Trusted,
    Probation { clean: u32 },
    Quarantined { cause: Cause, clean: u32 },
    Isolated { until: UnixMs, dishonest: bool },
}

impl Phase {
    fn state(&self) -> State {
        match self {
            Self::Trusted => State::Trusted,
            Self::Probation { .. } => State::Probation,
            Self::Quarantined { .. } => State::Quarantined,
            Self::Isolated { .. } => State::Isolated,
        }
    }
}

/// Own observations of one subject, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    samples: u64,
    mismatches: u64,
    confirmed: u64,
    unanswered: u64,
    in_sla: u64,
    slow: u64,
    capacity_checks: u64,
    capacity_shortfalls: u64,
}

impl Counts {
    fn add(&mut self, o: &Self) {
        self.samples += o.samples;
        self.mismatches += o.mismatches;
        self.confirmed += o.confirmed;
        self.unanswered += o.unanswered;
        self.in_sla += o.in_sla;
        self.slow += o.slow;
        self.capacity_checks += o.capacity_checks;
        self.capacity_shortfalls += o.capacity_shortfalls;
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, Default)]
struct Window {
    /// `(bucket start, counts)`, oldest first.
    buckets: VecDeque<(UnixMs, Counts)>,
    /// `(at, path)` of own objects found corrupted, newest first.
    paths: VecDeque<(UnixMs, String)>,
}

impl Window {
    fn bucket(&mut self, at: UnixMs, len: i64) -> &mut Counts {
        let start = at - at.rem_euclid(len);
        let newer = self.buckets.back().is_none_or(|(s, _)| start > *s);
        if newer {
            self.buckets.push_back((start, Counts::default()));
        }
        // An observation older than the newest bucket is counted in the newest one.
        let last = self.buckets.len() - 1;
        &mut self.buckets[last].1
    }

    fn prune(&mut self, now: UnixMs, window: i64, len: i64) {
        while self
            .buckets
            .front()
            .is_some_and(|(s, _)| s + len <= now - window)
        {
            self.buckets.pop_front();
        }
        while self.paths.back().is_some_and(|(t, _)| *t <= now - window) {
            self.paths.pop_back();
        }
    }

    fn total(&self) -> Counts {
        let mut c = Counts::default();
        for (_, b) in &self.buckets {
            c.add(b);
        }
        c
    }
}

/// A report held from one reporter about one subject.
#[derive(Debug, Clone)]
struct Heard {
    report: Arc<pb::ReputationReport>,
    /// One of its named objects was fetched intact.
    refuted: bool,
    /// It was improbable given our own samples: not counted at all.
    contradicted: bool,
}

#[derive(Debug, Clone)]
struct Peer {
    pre_trusted: bool,
    direct: [Beta; 4],
    /// Credibility-weighted report evidence, as of the last tick.
    reported: [Beta; 4],
    reported_clean: f64,
    claim_weight: f64,
    claim_evidence: Vec<Evidence>,
    phase: Phase,
    /// Isolations for dishonesty (in `successes`), decayed with `strike_half_life_ms`.
    strikes: Beta,
    window: Window,
    last_sequence: u64,
    last_published: Option<UnixMs>,
    dirty: bool,
    urgent: bool,
    log: VecDeque<Decision>,
    failures: VecDeque<Evidence>,
    /// As a reporter: agreements (successes) and weighted contradictions (failures).
    agreement: Beta,
    global_trust: f64,
    credibility: f64,
}

impl Peer {
    fn new(pre_trusted: bool) -> Self {
        Self {
            pre_trusted,
            direct: [Beta::default(); 4],
            reported: [Beta::default(); 4],
            reported_clean: 0.0,
            claim_weight: 0.0,
            claim_evidence: Vec::new(),
            phase: if pre_trusted {
                Phase::Trusted
            } else {
                Phase::Probation { clean: 0 }
            },
            strikes: Beta::default(),
            window: Window::default(),
            last_sequence: 0,
            last_published: None,
            dirty: false,
            urgent: false,
            log: VecDeque::new(),
            failures: VecDeque::new(),
            agreement: Beta::default(),
            global_trust: 0.0,
            credibility: 0.0,
        }
    }

    fn push_failure(&mut self, e: Evidence) {
        if self.failures.len() == FAILURES_LEN {
            self.failures.pop_front();
        }
        self.failures.push_back(e);
    }
}

/// The per-dimension means and the score built from them.
#[derive(Debug, Clone, Copy)]
struct Scores {
    means: [f64; 4],
    score: f64,
}

fn scores(st: &TrustSettings, direct: &[Beta; 4], reported: Option<&[Beta; 4]>) -> Scores {
    let mut means = [0.0; 4];
    for d in 0..4 {
        let (rs, rf) = reported.map_or((0.0, 0.0), |r| (r[d].successes, r[d].failures));
        means[d] = (st.prior_successes + direct[d].successes + rs)
            / (st.prior_successes
                + st.prior_failures
                + direct[d].successes
                + direct[d].failures
                + rs
                + rf);
    }
    let f = factors(st, &means);
    Scores {
        means,
        score: f.iter().product(),
    }
}

/// Each dimension's factor in the score.
fn factors(st: &TrustSettings, means: &[f64; 4]) -> [f64; 4] {
    [
        means[INT],
        means[AVAIL],
        1.0 - st.latency_share + st.latency_share * means[LAT],
        means[CAP],
    ]
}

fn agreement_mean(st: &TrustSettings, b: &Beta) -> f64 {
    b.mean(
        st.agreement_prior_agreements,
        st.agreement_prior_contradictions,
    )
}

/// The engine. One per node; the daemon holds it behind a mutex.
#[derive(Debug, Clone)]
pub struct TrustEngine {
    self_id: Fingerprint,
    settings: TrustSettings,
    pre_trusted: BTreeSet<Fingerprint>,
    peers: BTreeMap<Fingerprint, Peer>,
    /// subject → reporter → latest report.
    heard: BTreeMap<Fingerprint, BTreeMap<Fingerprint, Heard>>,
    subjects_per_reporter: BTreeMap<Fingerprint, usize>,
    checks: BTreeMap<(Fingerprint, ObjectRef), Check>,
    pending: Vec<Decision>,
    last_prune: UnixMs,
    last_eigen: UnixMs,
}

impl TrustEngine {
    /// An engine for node `self_id`, whose long-term peers `pre_trusted` anchor EigenTrust
    /// and start trusted.
    pub fn new(
        self_id: Fingerprint,
        settings: TrustSettings,
        pre_trusted: impl IntoIterator<Item = Fingerprint>,
    ) -> Result<Self, SettingsError> {
        settings.validate()?;
        let mut engine = Self {
            self_id,
            settings,
            pre_trusted: BTreeSet::new(),
            peers: BTreeMap::new(),
            heard: BTreeMap::new(),
            subjects_per_reporter: BTreeMap::new(),
            checks: BTreeMap::new(),
            pending: Vec::new(),
            last_prune: UnixMs::MIN,
            last_eigen: UnixMs::MIN,
        };
        engine.set_pre_trusted(pre_trusted);
        Ok(engine)
    }

    pub fn self_id(&self) -> Fingerprint {
        self.self_id
    }

    pub fn settings(&self) -> &TrustSettings {
        &self.settings
    }

    /// Replaces the pre-trusted set (the long-term peers changed). A peer leaving it keeps
    /// its evidence but needs standing like anyone else.
    pub fn set_pre_trusted(&mut self, ids: impl IntoIterator<Item = Fingerprint>) {
        self.pre_trusted = ids.into_iter().filter(|id| *id != self.self_id).collect();
        for (id, peer) in &mut self.peers {
            peer.pre_trusted = self.pre_trusted.contains(id);
        }
        for id in self.pre_trusted.clone() {
            self.peers.entry(id).or_insert_with(|| Peer::new(true));
        }
    }

    fn peer_entry(&mut self, id: Fingerprint) -> &mut Peer {
        let pre = self.pre_trusted.contains(&id);
        self.peers.entry(id).or_insert_with(|| Peer::new(pre))
    }

    fn decide(
        &mut self,
        subject: Fingerprint,
        at: UnixMs,
        kind: DecisionKind,
        reason: Reason,
        evidence: Vec<Evidence>,
    ) -> Decision {
        let trust = self.trust_of(&subject, at);
        let d = Decision {
            subject,
            at,
            kind,
            reason,
            trust,
            evidence,
        };
        if let Some(peer) = self.peers.get_mut(&subject) {
            if peer.log.len() == LOG_LEN {
                peer.log.pop_front();
            }
            peer.log.push_back(d.clone());
        }
        self.pending.push(d.clone());
        d
    }

    /// Isolates `subject` now.
    fn isolate(
        &mut self,
        subject: Fingerprint,
        at: UnixMs,
        dishonest: bool,
        reason: Reason,
        evidence: Vec<Evidence>,
    ) -> Decision {
        let st = &self.settings;
        let (hold, strike_hl) = (
            if dishonest {
                st.hold_dishonest_ms
            } else {
                st.hold_unreliable_ms
            },
            st.strike_half_life_ms,
        );
        let peer = self.peer_entry(subject);
        let mut until = at.saturating_add(hold);
        if dishonest {
            let before = peer.strikes.at(at, strike_hl).successes;
            let doublings = before.round().clamp(0.0, 16.0) as u32;
            until = at.saturating_add(
                hold.saturating_mul(1_i64 << doublings.min(16))
                    .min(MAX_HOLD_MS),
            );
            peer.strikes.add(at, strike_hl, 1.0, 0.0);
        }
        peer.phase = Phase::Isolated { until, dishonest };
        peer.urgent = true;
        self.checks.retain(|(s, _), _| *s != subject);
        self.decide(
            subject,
            at,
            DecisionKind::Isolate { dishonest },
            reason,
            evidence,
        )
    }

    // -----------------------------------------------------------------------------------
    // Observations
    // -----------------------------------------------------------------------------------

    /// Records one direct observation of `subject`. Returns the decision it forced at once
    /// (a corruption quarantines or isolates without waiting for [`TrustEngine::tick`]); every
    /// decision is also returned by the next `tick`.
    pub fn observe(&mut self, subject: Fingerprint, obs: Observation) -> Option<Decision> {
        if subject == self.self_id {
            return None;
        }
        let now = obs.at;
        let hl = self.settings.half_life_ms;
        let bucket_len = (self.settings.report_window_ms / BUCKETS).max(1);
        match obs.outcome {
            Outcome::Verified { object, latency_ms } => {
                let slow = latency_ms.is_nan() || latency_ms > self.settings.latency_target_ms;
                let slow_weight = self.settings.slow_weight;
                let peer = self.peer_entry(subject);
                peer.direct[INT].add(now, hl, 1.0, 0.0);
                peer.direct[AVAIL].add(now, hl, 1.0, 0.0);
                if slow {
                    peer.direct[LAT].add(now, hl, 0.0, slow_weight);
                } else {
                    peer.direct[LAT].add(now, hl, 1.0, 0.0);
                }
                let c = peer.window.bucket(now, bucket_len);
                c.samples += 1;
                if slow {
                    c.slow += 1;
                } else {
                    c.in_sla += 1;
                }
                peer.dirty = true;
                self.verified(subject, obs.id, now, object)
            }
            Outcome::Corrupted { object, detail } => {
                let w = self.settings.corruption_weight;
                let self_id = self.self_id;
                let evidence = Evidence::Sample {
                    id: obs.id,
                    at: now,
                    dimension: Dimension::Integrity,
                    what: format!("corrupted {object}: {detail}"),
                };
                let peer = self.peer_entry(subject);
                peer.direct[INT].add(now, hl, 0.0, w);
                peer.direct[AVAIL].add(now, hl, 1.0, 0.0);
                let c = peer.window.bucket(now, bucket_len);
                c.samples += 1;
                c.mismatches += 1;
                if object.owner == self_id
                    && !peer.window.paths.iter().any(|(_, p)| *p == object.path)
                {
                    peer.window.paths.push_front((now, object.path.clone()));
                    peer.window.paths.truncate(MAX_MISMATCHED_PATHS);
                }
                peer.dirty = true;
                peer.urgent = true;
                peer.push_failure(evidence.clone());
                self.corrupted(subject, obs.id, now, object, evidence)
            }
            Outcome::Unavailable { detail } => {
                let w = self.settings.unavailable_weight;
                let peer = self.peer_entry(subject);
                peer.direct[AVAIL].add(now, hl, 0.0, w);
                peer.window.bucket(now, bucket_len).unanswered += 1;
                peer.dirty = true;
                peer.push_failure(Evidence::Sample {
                    id: obs.id,
                    at: now,
                    dimension: Dimension::Availability,
                    what: format!("unanswered: {detail}"),
                });
                None
            }
            Outcome::Answered { latency_ms } => {
                let slow = latency_ms.is_nan() || latency_ms > self.settings.latency_target_ms;
                let slow_weight = self.settings.slow_weight;
                let peer = self.peer_entry(subject);
                peer.direct[AVAIL].add(now, hl, 1.0, 0.0);
                let c = peer.window.bucket(now, bucket_len);
                if slow {
                    c.slow += 1;
                    peer.direct[LAT].add(now, hl, 0.0, slow_weight);
                    peer.push_failure(Evidence::Sample {
                        id: obs.id,
                        at: now,
                        dimension: Dimension::Latency,
                        what: format!("answered in {latency_ms:.0} ms"),
                    });
                } else {
                    c.in_sla += 1;
                    peer.direct[LAT].add(now, hl, 1.0, 0.0);
                }
                peer.dirty = true;
                None
            }
            Outcome::Capacity {
                advertised,
                measured,
            } => {
                if !(advertised > 0.0 && advertised.is_finite() && measured.is_finite()) {
                    return None;
                }
                let ratio = (measured / advertised).max(0.0);
                let tolerance = self.settings.capacity_tolerance;
                let weight = self.settings.capacity_weight;
                let peer = self.peer_entry(subject);
                let c = peer.window.bucket(now, bucket_len);
                c.capacity_checks += 1;
                if ratio >= tolerance {
                    peer.direct[CAP].add(now, hl, 1.0, 0.0);
                } else {
                    c.capacity_shortfalls += 1;
                    let shortfall = if tolerance > 0.0 {
                        (tolerance - ratio) / tolerance
                    } else {
                        0.0
                    };
                    peer.direct[CAP].add(now, hl, 0.0, weight * shortfall);
                    peer.push_failure(Evidence::Sample {
                        id: obs.id,
                        at: now,
                        dimension: Dimension::CapacityHonesty,
                        what: format!(
                            "delivered {measured:.0} of {advertised:.0} advertised ({:.0} %)",
                            ratio * 100.0
                        ),
                    });
                }
                peer.dirty = true;
                None
            }
        }
    }

    /// A content sample from [`crate::sampler`] (an object of this node's own manifest).
    pub fn observe_sample(&mut self, sample: &Sample) -> Option<Decision> {
        let object = ObjectRef {
            owner: self.self_id,
            path: sample.path.clone(),
            range: sample.range,
        };
        let outcome = match &sample.verdict {
            Verdict::Verified => Outcome::Verified {
                object,
                latency_ms: sample.latency_ms,
            },
            Verdict::Corrupted(detail) => Outcome::Corrupted {
                object,
                detail: detail.clone(),
            },
            Verdict::Unavailable(detail) => Outcome::Unavailable {
                detail: detail.clone(),
            },
        };
        self.observe(
            sample.peer,
            Observation {
                id: sample.id,
                at: sample.at_ms,
                outcome,
            },
        )
    }

    fn verified(
        &mut self,
        subject: Fingerprint,
        id: u64,
        now: UnixMs,
        object: ObjectRef,
    ) -> Option<Decision> {
        let evidence = Evidence::Sample {
            id,
            at: now,
            dimension: Dimension::Integrity,
            what: format!("intact {object}"),
        };
        // A claim about this object is refuted.
        if let Some(check) = self.checks.remove(&(subject, object.clone()))
            && let CheckWhy::Claim { report } = check.why
        {
            self.refute(subject, report, now);
        }
        let release_after = self.settings.release_after;
        let peer = self.peers.get_mut(&subject)?;
        let mut release = None;
        match &mut peer.phase {
            Phase::Probation { clean } => *clean += 1,
            Phase::Quarantined { cause, clean } => {
                *clean += 1;
                if let Cause::Corruption {
                    object: first,
                    evidence: first_evidence,
                    ..
                } = cause
                {
                    if *first == object {
                        release =
                            Some((Reason::CleanRecheck, vec![first_evidence.clone(), evidence]));
                    } else if *clean >= release_after {
                        release =
                            Some((Reason::CleanSamples, vec![first_evidence.clone(), evidence]));
                    }
                }
            }
            _ => {}
        }
        let (reason, evidence) = release?;
        if reason == Reason::CleanRecheck {
            // The recheck cleared the object: our reports stop naming it.
            if let Phase::Quarantined {
                cause: Cause::Corruption { object: first, .. },
                ..
            } = &peer.phase
            {
                let path = first.path.clone();
                peer.window.paths.retain(|(_, p)| *p != path);
            }
            peer.urgent = true;
        }
        peer.phase = Phase::Probation { clean: 0 };
        self.checks
            .retain(|(s, _), c| !(*s == subject && matches!(c.why, CheckWhy::Recheck { .. })));
        Some(self.decide(subject, now, DecisionKind::Release, reason, evidence))
    }

    fn corrupted(
        &mut self,
        subject: Fingerprint,
        id: u64,
        now: UnixMs,
        object: ObjectRef,
        evidence: Evidence,
    ) -> Option<Decision> {
        // Did a reporter name this very object? Its claim is corroborated (its agreement
        // rises), but a claim is not an observation: isolation still waits for our own
        // confirming sample, so a liar's claim and one transfer error cannot add up to it.
        let mut corroborating = None;
        if let Some(check) = self.checks.remove(&(subject, object.clone()))
            && let CheckWhy::Claim { report } = check.why
        {
            corroborating = Some(report);
        }
        if corroborating.is_none()
            && let Some(by_reporter) = self.heard.get(&subject)
            && let Some(h) = by_reporter.get(&object.owner)
            && h.report.mismatched_paths.contains(&object.path)
        {
            corroborating = Some(ReportId {
                reporter: object.owner,
                sequence: h.report.sequence,
            });
        }
        let mut reports = Vec::new();
        if let Some(report) = corroborating {
            let hl = self.settings.half_life_ms;
            if let Some(reporter) = self.peers.get_mut(&report.reporter) {
                reporter.agreement.add(now, hl, 2.0, 0.0);
                reports.push(Evidence::Report {
                    report,
                    credibility: reporter.credibility,
                    what: format!("named {object}"),
                });
            }
        }
        let strike_hl = self.settings.strike_half_life_ms;
        let (phase, strikes) = match self.peers.get(&subject) {
            Some(p) => (p.phase.clone(), p.strikes.at(now, strike_hl).successes),
            None => (Phase::Probation { clean: 0 }, 0.0),
        };
        let decision = match phase {
            Phase::Isolated { .. } => return None,
            Phase::Quarantined {
                cause:
                    Cause::Corruption {
                        object: first,
                        evidence: first_evidence,
                        reports: first_reports,
                    },
                ..
            } => {
                let reason = if first == object {
                    Reason::ConfirmedCorruption
                } else {
                    Reason::SecondCorruption
                };
                self.count_confirmed(subject, now);
                let mut all = vec![first_evidence, evidence];
                all.extend(first_reports);
                for r in reports {
                    let seen = all.iter().any(|e| match (e, &r) {
                        (
                            Evidence::Report { report: a, .. },
                            Evidence::Report { report: b, .. },
                        ) => a == b,
                        _ => false,
                    });
                    if !seen {
                        all.push(r);
                    }
                }
                self.isolate(subject, now, true, reason, all)
            }
            _ if strikes >= 0.5 => {
                let mut all = vec![evidence];
                all.extend(reports);
                self.isolate(subject, now, true, Reason::RepeatOffence, all)
            }
            previous => {
                if matches!(
                    previous,
                    Phase::Quarantined {
                        cause: Cause::Claims,
                        ..
                    }
                ) && let Some(p) = self.peers.get(&subject)
                {
                    reports.extend(p.claim_evidence.iter().cloned());
                }
                let peer = self.peer_entry(subject);
                peer.phase = Phase::Quarantined {
                    cause: Cause::Corruption {
                        object: object.clone(),
                        evidence: evidence.clone(),
                        reports: reports.clone(),
                    },
                    clean: 0,
                };
                self.add_check(Check {
                    subject,
                    object,
                    why: CheckWhy::Recheck { sample: id },
                    since: now,
                    priority: f64::INFINITY,
                });
                let mut all = vec![evidence];
                all.extend(reports);
                self.decide(
                    subject,
                    now,
                    DecisionKind::Quarantine,
                    Reason::Corruption,
                    all,
                )
            }
        };
        Some(decision)
    }

    fn count_confirmed(&mut self, subject: Fingerprint, now: UnixMs) {
        let len = (self.settings.report_window_ms / BUCKETS).max(1);
        if let Some(peer) = self.peers.get_mut(&subject) {
            peer.window.bucket(now, len).confirmed += 1;
        }
    }

    fn add_check(&mut self, check: Check) {
        let key = (check.subject, check.object.clone());
        if self.checks.contains_key(&key) {
            return;
        }
        if self.checks.len() >= self.settings.max_checks {
            // Make room only for something more urgent than the least urgent check.
            let lowest = self
                .checks
                .iter()
                .min_by(|a, b| a.1.priority.total_cmp(&b.1.priority))
                .map(|(k, c)| (k.clone(), c.priority));
            match lowest {
                Some((k, p)) if p < check.priority => {
                    self.checks.remove(&k);
                }
                _ => return,
            }
        }
        self.checks.insert(key, check);
    }

    /// A claim of `report` about `subject` was refuted by our own intact sample.
    fn refute(&mut self, subject: Fingerprint, report: ReportId, now: UnixMs) {
        let (hl, mut w) = (self.settings.half_life_ms, self.settings.refutation_weight);
        if let Some(h) = self
            .heard
            .get_mut(&subject)
            .and_then(|m| m.get_mut(&report.reporter))
            && h.report.sequence == report.sequence
        {
            h.refuted = true;
            // A single unconfirmed mismatch may have been a transfer error on the reporter's
            // side: half the blame of a confirmed claim.
            if h.report.confirmed_mismatches == 0 {
                w *= 0.5;
            }
        }
        if let Some(reporter) = self.peers.get_mut(&report.reporter) {
            reporter.agreement.add(now, hl, 0.0, w);
        }
    }

    /// Samples the engine wants, most urgent first: confirming samples of quarantines, then
    /// objects named by reporters, by the reporter's credibility. A check is done by fetching
    /// `object` from `subject` and calling [`TrustEngine::observe`] with that object; checks
    /// not done within `check_ttl_ms` are dropped by [`TrustEngine::tick`].
    pub fn checks(&self, now: UnixMs) -> Vec<Check> {
        let ttl = self.settings.check_ttl_ms;
        let mut out: Vec<Check> = self
            .checks
            .values()
            .filter(|c| now - c.since < ttl)
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            b.priority
                .total_cmp(&a.priority)
                .then(a.since.cmp(&b.since))
                .then(a.subject.cmp(&b.subject))
                .then(a.object.cmp(&b.object))
        });
        out
    }

    // -----------------------------------------------------------------------------------
    // Reports
    // -----------------------------------------------------------------------------------

    /// A fresh report of this node's direct observations of `subject` over the last
    /// `report_window_ms` (`None` if there are none), with a new sequence. `reporter` is left
    /// for [`crate::proto::sign_reputation`] to set.
    pub fn report_for(
        &mut self,
        subject: &Fingerprint,
        now: UnixMs,
    ) -> Option<pb::ReputationReport> {
        if *subject == self.self_id {
            return None;
        }
        let window = self.settings.report_window_ms;
        let len = (window / BUCKETS).max(1);
        let direct_score = {
            let peer = self.peers.get(subject)?;
            let direct = peer.direct.map(|b| b.at(now, self.settings.half_life_ms));
            scores(&self.settings, &direct, None).score
        };
        let self_id = self.self_id;
        let peer = self.peers.get_mut(subject)?;
        peer.window.prune(now, window, len);
        let c = peer.window.total();
        if c.is_empty() {
            return None;
        }
        let start = peer
            .window
            .buckets
            .front()
            .map_or(now, |(s, _)| *s)
            .max(now - window)
            .min(now);
        let paths: Vec<String> = peer
            .window
            .paths
            .iter()
            .map(|(_, p)| p.clone())
            .take(
                usize::try_from(c.mismatches)
                    .unwrap_or(usize::MAX)
                    .min(MAX_MISMATCHED_PATHS),
            )
            .collect();
        let sequence = (peer.last_sequence + 1).max(u64::try_from(now).unwrap_or(0));
        peer.last_sequence = sequence;
        peer.last_published = Some(now);
        peer.dirty = false;
        peer.urgent = false;
        Some(pb::ReputationReport {
            reporter: self_id.0.to_vec(),
            subject: subject.0.to_vec(),
            samples: c.samples,
            mismatches: c.mismatches,
            unanswered: c.unanswered,
            answered_in_sla: c.in_sla,
            score_ppm: (direct_score.clamp(0.0, 1.0) * 1e6).round() as u32,
            window_start_ms: start,
            window_end_ms: now,
            sequence,
            answered_slow: c.slow,
            capacity_checks: c.capacity_checks,
            capacity_shortfalls: c.capacity_shortfalls,
            confirmed_mismatches: c.confirmed.min(c.mismatches),
            mismatched_paths: paths,
        })
    }

    /// The reports due now: subjects with a new corruption or isolation at once, others
    /// with new observations at most every `report_interval_ms`.
    pub fn reports(&mut self, now: UnixMs) -> Vec<pb::ReputationReport> {
        let interval = self.settings.report_interval_ms;
        let due: Vec<Fingerprint> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.urgent || (p.dirty && p.last_published.is_none_or(|t| now - t >= interval))
            })
            .map(|(id, _)| *id)
            .collect();
        due.iter()
            .filter_map(|id| self.report_for(id, now))
            .collect()
    }

    /// Verifies a signed report with its reporter's SPKI and takes it in.
    pub fn ingest_report(
        &mut self,
        signed: &pb::SignedReputationReport,
        reporter_spki: &[u8],
        now: UnixMs,
    ) -> Result<Ingested, ReportError> {
        let report = VerifiedReport::open(signed, reporter_spki, now)?;
        self.ingest_verified(report, now)
    }

    /// Takes in a report already verified ([`VerifiedReport::open`]).
    pub fn ingest_verified(
        &mut self,
        verified: VerifiedReport,
        now: UnixMs,
    ) -> Result<Ingested, ReportError> {
        let id = verified.id();
        let reporter = verified.reporter();
        let subject = verified.subject();
        if reporter == self.self_id {
            return Err(ReportError::FromSelf);
        }
        let report = verified.into_report();
        let max_age = self.settings.max_report_age_ms;
        if report.window_end_ms < now - max_age {
            return Err(ReportError::Stale {
                window_end_ms: report.window_end_ms,
                max_age_ms: max_age,
                now_ms: now,
            });
        }
        if subject == self.self_id {
            return Ok(Ingested {
                report: id,
                subject,
                kept: false,
                comparison: Comparison::NotComparable,
            });
        }
        let existing = self.heard.get(&subject).and_then(|m| m.get(&reporter));
        match existing {
            Some(h) if report.sequence <= h.report.sequence => {
                return Err(ReportError::Replayed {
                    sequence: report.sequence,
                    latest: h.report.sequence,
                });
            }
            Some(_) => {}
            None => {
                let n = self
                    .subjects_per_reporter
                    .get(&reporter)
                    .copied()
                    .unwrap_or(0);
                if n >= MAX_SUBJECTS_PER_REPORTER {
                    return Err(ReportError::TooManySubjects {
                        limit: MAX_SUBJECTS_PER_REPORTER,
                    });
                }
                self.subjects_per_reporter.insert(reporter, n + 1);
            }
        }
        self.peer_entry(reporter);
        self.peer_entry(subject);
        let comparison = self.compare(&report, &subject, now);
        let hl = self.settings.half_life_ms;
        let weight = self.settings.contradiction_weight;
        let min_agreement = self.settings.check_min_agreement;
        let (agreement, credibility) = {
            let r = self.peer_entry(reporter);
            match comparison {
                Comparison::Agrees => r.agreement.add(now, hl, 1.0, 0.0),
                Comparison::Contradicts => r.agreement.add(now, hl, 0.0, weight),
                Comparison::NotComparable => {}
            }
            let a = r.agreement.at(now, hl);
            (a, r.credibility)
        };
        let agreement = agreement_mean(&self.settings, &agreement);
        // A checkable claim about a peer we observe ourselves: ask for its object.
        let observed = self
            .peers
            .get(&subject)
            .is_some_and(|p| p.direct[INT].weight() + p.direct[AVAIL].weight() > 0.0);
        let isolated = self
            .peers
            .get(&subject)
            .is_some_and(|p| matches!(p.phase, Phase::Isolated { .. }));
        if report.mismatches > 0
            && observed
            && !isolated
            && agreement >= min_agreement
            && let Some(path) = report.mismatched_paths.first()
        {
            let exposure = self.weight_factor(&subject, now);
            self.add_check(Check {
                subject,
                object: ObjectRef {
                    owner: reporter,
                    path: path.clone(),
                    range: None,
                },
                why: CheckWhy::Claim { report: id },
                since: now,
                // The exposure it protects first (the traffic the subject carries), then
                // who says it. A bogus claim costs one sample and refutes its author.
                priority: exposure + 0.1 * credibility * agreement,
            });
        }
        self.heard.entry(subject).or_default().insert(
            reporter,
            Heard {
                report,
                refuted: false,
                contradicted: comparison == Comparison::Contradicts,
            },
        );
        Ok(Ingested {
            report: id,
            subject,
            kept: true,
            comparison,
        })
    }

    /// Whether `report` is improbable given our own samples of `subject`.
    fn compare(
        &self,
        report: &pb::ReputationReport,
        subject: &Fingerprint,
        now: UnixMs,
    ) -> Comparison {
        let st = &self.settings;
        let Some(peer) = self.peers.get(subject) else {
            return Comparison::NotComparable;
        };
        let int = peer.direct[INT].at(now, st.half_life_ms);
        let own_clean = int.successes;
        let own_bad = int.failures / st.corruption_weight;
        let samples = report.samples as f64;
        let mismatches = report.mismatches as f64;
        if report.mismatches > 0 {
            if own_bad >= 0.5 {
                return Comparison::Agrees;
            }
            if own_clean >= st.min_compare_samples {
                // The least corruption rate the claim is compatible with: could we have
                // seen `own_clean` intact samples in a row?
                let rate = mismatches / (samples + 10.0);
                if (1.0 - rate).powf(own_clean) < st.contradiction_p {
                    return Comparison::Contradicts;
                }
            }
            Comparison::NotComparable
        } else if report.samples > 0 {
            if own_bad >= 0.5 {
                let rate = own_bad / (own_bad + own_clean + 10.0);
                if (1.0 - rate).powf(samples) < st.contradiction_p {
                    return Comparison::Contradicts;
                }
                return Comparison::NotComparable;
            }
            if own_clean >= st.min_compare_samples {
                return Comparison::Agrees;
            }
            Comparison::NotComparable
        } else {
            Comparison::NotComparable
        }
    }

    // -----------------------------------------------------------------------------------
    // The control cycle
    // -----------------------------------------------------------------------------------

    /// One control cycle: recomputes reporters' credibility (EigenTrust) and the reported
    /// evidence, applies the rules that need them (isolation by score, quarantine by claims,
    /// release, restore, recovery), drops stale reports and checks, and returns every
    /// decision since the last tick (including those [`TrustEngine::observe`] made at once).
    pub fn tick(&mut self, now: UnixMs) -> Vec<Decision> {
        self.prune(now);
        if now.saturating_sub(self.last_eigen) >= self.settings.eigen_every_ms {
            self.last_eigen = now;
            self.recompute_global_trust(now);
        }
        self.refresh_credibility(now);
        self.aggregate(now);
        let ids: Vec<Fingerprint> = self.peers.keys().copied().collect();
        for id in ids {
            self.rules(id, now);
        }
        std::mem::take(&mut self.pending)
    }

    fn prune(&mut self, now: UnixMs) {
        // Reports only need to go some time after they are stale: every 10 s is enough.
        if now.saturating_sub(self.last_prune) < 10_000 {
            return;
        }
        self.last_prune = now;
        let max_age = self.settings.max_report_age_ms;
        let ttl = self.settings.check_ttl_ms;
        let mut dropped: Vec<Fingerprint> = Vec::new();
        self.heard.retain(|_, by_reporter| {
            by_reporter.retain(|reporter, h| {
                let keep = h.report.window_end_ms >= now - max_age;
                if !keep {
                    dropped.push(*reporter);
                }
                keep
            });
            !by_reporter.is_empty()
        });
        for r in dropped {
            if let Some(n) = self.subjects_per_reporter.get_mut(&r) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.subjects_per_reporter.remove(&r);
                }
            }
        }
        self.checks.retain(|_, c| now - c.since < ttl);
    }

    /// EigenTrust over what this node knows (every `eigen_every_ms`).
    fn recompute_global_trust(&mut self, now: UnixMs) {
        let st = &self.settings;
        let hl = st.half_life_ms;
        let mut index: HashMap<Fingerprint, usize> = HashMap::with_capacity(self.peers.len() + 1);
        index.insert(self.self_id, 0);
        for (n, id) in self.peers.keys().enumerate() {
            index.insert(*id, n + 1);
        }
        let n = index.len();
        let mut rows: Vec<Vec<(usize, f64)>> = vec![Vec::new(); n];
        let mut keep = vec![1.0; n];
        for (id, peer) in &self.peers {
            let Some(&j) = index.get(id) else { continue };
            keep[j] = agreement_mean(st, &peer.agreement.at(now, hl));
            if matches!(
                peer.phase,
                Phase::Isolated { .. } | Phase::Quarantined { .. }
            ) {
                continue;
            }
            let int = peer.direct[INT].at(now, hl);
            let avail = peer.direct[AVAIL].at(now, hl);
            let s = (int.successes - int.failures).max(0.0)
                * avail.mean(st.prior_successes, st.prior_failures);
            if s > 0.0 {
                rows[0].push((j, s));
            }
        }
        let cap = st.report_count_cap;
        for (subject, by_reporter) in &self.heard {
            let Some(&j) = index.get(subject) else {
                continue;
            };
            for (reporter, h) in by_reporter {
                let Some(&i) = index.get(reporter) else {
                    continue;
                };
                if h.contradicted {
                    continue;
                }
                let r = &h.report;
                let s = (r.samples.saturating_sub(r.mismatches) as f64
                    - st.corruption_weight * r.mismatches as f64
                    - r.unanswered as f64)
                    .clamp(0.0, cap);
                if s > 0.0 {
                    rows[i].push((j, s));
                }
            }
        }
        let pre: Vec<usize> = std::iter::once(0)
            .chain(
                self.pre_trusted
                    .iter()
                    .filter_map(|id| index.get(id).copied()),
            )
            .collect();
        let t = eigen::global_trust(&rows, &keep, &pre, st.eigen_teleport, st.eigen_iterations);
        let trusted = t.iter().filter(|x| **x > 1e-12).count().max(1) as f64;
        let reference = st.eigen_reference.max(1e-9);
        for (id, peer) in &mut self.peers {
            let Some(&i) = index.get(id) else { continue };
            let global = (t[i] * trusted / reference).clamp(0.0, 1.0);
            peer.global_trust = if peer.pre_trusted { 1.0 } else { global };
        }
    }

    /// Credibility = global trust × agreement (every tick: agreement moves with every
    /// report compared and every claim checked); 0 for a peer isolated for dishonesty.
    fn refresh_credibility(&mut self, now: UnixMs) {
        let st = &self.settings;
        for peer in self.peers.values_mut() {
            let agreement = agreement_mean(st, &peer.agreement.at(now, st.half_life_ms));
            let global = if peer.pre_trusted {
                1.0
            } else {
                peer.global_trust
            };
            peer.credibility = match peer.phase {
                Phase::Isolated {
                    dishonest: true, ..
                } => 0.0,
                _ => global * agreement,
            };
        }
    }

    /// Credibility-weighted report evidence per subject, and the weight of unrefuted
    /// corruption claims.
    fn aggregate(&mut self, now: UnixMs) {
        let st = self.settings.clone();
        let hl = st.half_life_ms;
        let credibility: HashMap<Fingerprint, f64> = self
            .peers
            .iter()
            .map(|(id, p)| (*id, p.credibility))
            .collect();
        for (subject, peer) in &mut self.peers {
            let mut reported = [Beta::default(); 4];
            let mut clean = 0.0;
            let mut claims = 0.0;
            let mut claim_evidence = Vec::new();
            if let Some(by_reporter) = self.heard.get(subject) {
                for (reporter, h) in by_reporter {
                    let cred = credibility.get(reporter).copied().unwrap_or(0.0);
                    if cred <= 0.0 || h.contradicted {
                        continue;
                    }
                    let r = &h.report;
                    let age = beta::decay(now - r.window_end_ms, hl);
                    let w = cred * age * st.hearsay_weight;
                    let samples = r.samples as f64;
                    let mismatches = r.mismatches as f64;
                    let scale = |n: f64| {
                        if n > st.report_count_cap {
                            st.report_count_cap / n
                        } else {
                            1.0
                        }
                    };
                    let k = w * scale(samples);
                    reported[INT].successes += k * (samples - mismatches);
                    reported[INT].failures += k * mismatches * st.corruption_weight;
                    // Standing: only our long-term peers vouch for a newcomer; anyone else's
                    // word moves its score, never how far we rely on it.
                    if self.pre_trusted.contains(reporter) {
                        clean += k * (samples - mismatches);
                    }
                    let answered = (r.answered_in_sla + r.answered_slow) as f64;
                    let unanswered = r.unanswered as f64;
                    let k = w * scale(answered + unanswered);
                    reported[AVAIL].successes += k * answered;
                    reported[AVAIL].failures += k * unanswered * st.unavailable_weight;
                    reported[LAT].successes += k * r.answered_in_sla as f64;
                    reported[LAT].failures += k * r.answered_slow as f64 * st.slow_weight;
                    let checks = r.capacity_checks as f64;
                    let shortfalls = r.capacity_shortfalls as f64;
                    let k = w * scale(checks);
                    reported[CAP].successes += k * (checks - shortfalls);
                    // The shortfall's size is not reported: count half the full weight.
                    reported[CAP].failures += k * shortfalls * st.capacity_weight * 0.5;
                    if r.mismatches > 0 && !r.mismatched_paths.is_empty() && !h.refuted {
                        // Confirmed claims count in full, single mismatches half.
                        let strength = if r.confirmed_mismatches > 0 { 1.0 } else { 0.5 };
                        claims += cred * age * strength;
                        claim_evidence.push(Evidence::Report {
                            report: ReportId {
                                reporter: *reporter,
                                sequence: r.sequence,
                            },
                            credibility: cred,
                            what: format!(
                                "{} of {} samples mismatched, e.g. {}",
                                r.mismatches,
                                r.samples,
                                r.mismatched_paths.first().map_or("", |p| p.as_str())
                            ),
                        });
                    }
                }
            }
            // Own observations dominate: reports count less the more we saw ourselves.
            let own =
                peer.direct[INT].at(now, hl).weight() + peer.direct[AVAIL].at(now, hl).weight();
            let dominance = st.direct_dominance / (st.direct_dominance + own);
            for b in &mut reported {
                b.successes *= dominance;
                b.failures *= dominance;
            }
            peer.reported = reported;
            peer.reported_clean = clean * dominance;
            peer.claim_weight = claims;
            peer.claim_evidence = claim_evidence;
        }
    }

    /// The rules that run every cycle, for one peer.
    fn rules(&mut self, id: Fingerprint, now: UnixMs) {
        let st = self.settings.clone();
        let hl = st.half_life_ms;
        let Some(peer) = self.peers.get(&id) else {
            return;
        };
        let direct = peer.direct.map(|b| b.at(now, hl));
        match peer.phase.clone() {
            Phase::Isolated { until, .. } => {
                if now >= until {
                    let peer = self.peer_entry(id);
                    // Probation with fresh counts: judged on what it does now. Strikes stay.
                    peer.direct = [Beta::default(); 4];
                    peer.phase = Phase::Probation { clean: 0 };
                    self.decide(
                        id,
                        now,
                        DecisionKind::Restore,
                        Reason::HoldServed,
                        Vec::new(),
                    );
                }
            }
            phase => {
                // Isolation by the direct score, on enough evidence of the failing dimension.
                let s = scores(&st, &direct, None);
                let f = factors(&st, &s.means);
                let mut product = 1.0;
                let mut worst: Option<(usize, f64)> = None;
                // Integrity has its own rule (quarantine, confirming sample); its score isolates
                // only with more than one corruption on record.
                let corruptions = direct[INT].failures / st.corruption_weight;
                for d in 0..4 {
                    let enough = if d == INT {
                        corruptions >= 1.5
                    } else {
                        direct[d].weight() >= st.min_isolation_evidence
                    };
                    if enough {
                        product *= f[d];
                        if worst.is_none_or(|(_, w)| f[d] < w) {
                            worst = Some((d, f[d]));
                        }
                    }
                }
                if product < st.isolation_threshold
                    && let Some((d, _)) = worst
                {
                    let dimension = Dimension::ALL[d];
                    let mut evidence = vec![Evidence::Score {
                        dimension,
                        score: s.score,
                        threshold: st.isolation_threshold,
                    }];
                    evidence.extend(
                        peer.failures
                            .iter()
                            .filter(|e| matches!(e, Evidence::Sample { dimension: x, .. } if *x == dimension))
                            .rev()
                            .take(6)
                            .cloned(),
                    );
                    self.isolate(id, now, dimension.is_honesty(), Reason::LowScore, evidence);
                    return;
                }
                match phase {
                    // Claims quarantine only peers we observe ourselves (so can check); about
                    // the others they only lower the reported score.
                    Phase::Trusted | Phase::Probation { .. }
                        if peer.claim_weight >= st.claim_quarantine
                            && direct[INT].weight() + direct[AVAIL].weight() > 0.0 =>
                    {
                        let evidence = peer.claim_evidence.clone();
                        let peer = self.peer_entry(id);
                        peer.phase = Phase::Quarantined {
                            cause: Cause::Claims,
                            clean: 0,
                        };
                        self.decide(
                            id,
                            now,
                            DecisionKind::Quarantine,
                            Reason::CredibleClaims,
                            evidence,
                        );
                    }
                    Phase::Quarantined {
                        cause: Cause::Claims,
                        ..
                    } if peer.claim_weight < st.claim_quarantine / 2.0 => {
                        let peer = self.peer_entry(id);
                        peer.phase = Phase::Probation { clean: 0 };
                        self.decide(
                            id,
                            now,
                            DecisionKind::Release,
                            Reason::ClaimsWithdrawn,
                            Vec::new(),
                        );
                    }
                    Phase::Probation { clean } if clean >= st.recover_samples => {
                        let score = scores(&st, &direct, Some(&peer.reported)).score;
                        if score >= st.recover_score {
                            let peer = self.peer_entry(id);
                            peer.phase = Phase::Trusted;
                            self.decide(
                                id,
                                now,
                                DecisionKind::Recover,
                                Reason::Recovered,
                                Vec::new(),
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // What the daemon reads
    // -----------------------------------------------------------------------------------

    /// How much verified evidence vouches for `subject` (0 for a new identity, 1 for a
    /// pre-trusted peer): where sampling is most needed.
    pub fn standing(&self, subject: &Fingerprint, now: UnixMs) -> f64 {
        if self.pre_trusted.contains(subject) {
            return 1.0;
        }
        self.peers
            .get(subject)
            .map_or(0.0, |p| self.standing_of(p, now))
    }

    fn standing_of(&self, peer: &Peer, now: UnixMs) -> f64 {
        if peer.pre_trusted {
            return 1.0;
        }
        let v = peer.direct[INT]
            .at(now, self.settings.half_life_ms)
            .successes
            + peer.reported_clean;
        v / (v + self.settings.standing_half)
    }

    fn trust_of(&self, subject: &Fingerprint, now: UnixMs) -> f64 {
        let Some(peer) = self.peers.get(subject) else {
            return 0.0;
        };
        let direct = peer.direct.map(|b| b.at(now, self.settings.half_life_ms));
        scores(&self.settings, &direct, Some(&peer.reported)).score * self.standing_of(peer, now)
    }

    /// Maglev weight factor of `subject` (weight ∝ advertised capacity × factor): trust,
    /// capped on probation, 0 when quarantined or isolated or unknown.
    pub fn weight_factor(&self, subject: &Fingerprint, now: UnixMs) -> f64 {
        let Some(peer) = self.peers.get(subject) else {
            return 0.0;
        };
        match peer.phase {
            Phase::Quarantined { .. } | Phase::Isolated { .. } => 0.0,
            Phase::Probation { .. } => self.trust_of(subject, now).min(self.settings.probation_cap),
            Phase::Trusted => self.trust_of(subject, now),
        }
    }

    /// `subject`'s state (`Probation` for a peer never heard of).
    pub fn state(&self, subject: &Fingerprint) -> State {
        self.peers.get(subject).map_or(
            if self.pre_trusted.contains(subject) {
                State::Trusted
            } else {
                State::Probation
            },
            |p| p.phase.state(),
        )
    }

    /// Whether `subject` must not be offered or accepted in negotiation (quarantined or
    /// isolated).
    pub fn excluded(&self, subject: &Fingerprint) -> bool {
        matches!(self.state(subject), State::Quarantined | State::Isolated)
    }

    /// What `reporter`'s reports weigh (as of the last tick).
    pub fn credibility(&self, reporter: &Fingerprint) -> f64 {
        self.peers.get(reporter).map_or(0.0, |p| p.credibility)
    }

    /// Everything about `subject`, or `None` if it was never observed or heard of.
    pub fn assess(&self, subject: &Fingerprint, now: UnixMs) -> Option<Assessment> {
        let st = &self.settings;
        let peer = self.peers.get(subject)?;
        let direct = peer.direct.map(|b| b.at(now, st.half_life_ms));
        let all = scores(st, &direct, Some(&peer.reported));
        let own = scores(st, &direct, None);
        let standing = self.standing_of(peer, now);
        Some(Assessment {
            subject: *subject,
            state: peer.phase.state(),
            pre_trusted: peer.pre_trusted,
            trust: all.score * standing,
            score: all.score,
            direct_score: own.score,
            standing,
            weight_factor: self.weight_factor(subject, now),
            dimensions: Dimension::ALL
                .iter()
                .map(|d| DimensionView {
                    dimension: *d,
                    score: all.means[d.index()],
                    direct: direct[d.index()],
                    reported: peer.reported[d.index()],
                })
                .collect(),
            as_reporter: ReporterView {
                global_trust: peer.global_trust,
                agreement: agreement_mean(st, &peer.agreement.at(now, st.half_life_ms)),
                credibility: peer.credibility,
            },
            claims: peer.claim_weight,
            strikes: peer.strikes.at(now, st.strike_half_life_ms).successes,
            isolated_until_ms: match peer.phase {
                Phase::Isolated { until, .. } => Some(until),
                _ => None,
            },
            pending_checks: self
                .checks
                .values()
                .filter(|c| c.subject == *subject)
                .cloned()
                .collect(),
            decisions: peer.log.iter().cloned().collect(),
            recent_failures: peer.failures.iter().cloned().collect(),
        })
    }

    /// [`TrustEngine::assess`] for every peer known, by fingerprint.
    pub fn assessments(&self, now: UnixMs) -> Vec<Assessment> {
        self.peers
            .keys()
            .filter_map(|id| self.assess(id, now))
            .collect()
    }
}
