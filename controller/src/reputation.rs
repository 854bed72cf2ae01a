//! The trust engine: per-provider reputations from direct observation (content samples) and
//! from other nodes' signed reports, and the decisions they lead to.
//!
//! - **Dimensions**: integrity (bytes match the signed manifest), availability (an answer at
//!   all), latency (an answer within `latency_target_ms`). Each is a Beta reputation: decayed
//!   counts of successes and failures (half-life `half_life_ms`), mean `(s + 1) / (s + f + 2)`.
//! - **Weights of evidence**: a verified corruption counts `corruption_weight` failures (far
//!   more than a slow answer, which counts one) and quarantines the provider at once (weight
//!   0) pending a confirming sample: a second corruption isolates it as dishonest; a run of
//!   `release_after` verified samples releases it to probation.
//! - **Trust** = integrity × (½ + ½ availability) × (¾ + ¼ latency). Below `isolate_below` the
//!   provider is isolated as unreliable (a flapping or absent peer), below `probation_below` it
//!   is on probation; an isolated provider is looked at again after `isolation_ms` (on
//!   probation, with its counts halved) and recovers above `recover_above`.
//! - **Reports**: signed statements of direct observations only (never of hearsay), spread
//!   by gossip. A report counts as `indirect_weight` × the reporter's weight per observation:
//!   the reporter's weight is its own trust from our direct observation (EigenTrust-style,
//!   one step), 1 for the pre-trusted set (this node's long-term peers), `newcomer_weight`
//!   for a reporter we know nothing of — all such strangers sharing that one weight, however
//!   many identities they are (Sybil resistance: new identities gain only what direct
//!   observation supports) — rising towards ½ as its reports about subjects we observed
//!   ourselves agree with us, and divided by 1 + the number of its reports that contradicted
//!   our own observation of the same subject (lying reporters lose their voice). A report
//!   stands for at most 10 observations, whatever sample count it claims.
//! - **Weight factor** (Maglev weight ∝ capacity × factor): trust, scaled for providers with
//!   few direct observations (½ at first, 1 with many; pre-trusted peers start at 1), 0 when
//!   quarantined or isolated.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::Serialize;

use crate::{
    model::{Fingerprint, UnixMs},
    proto::{self, pb},
    sampler::{Sample, Verdict},
};

/// Most observations one report stands for.
const REPORT_CAP: f64 = 10.0;

/// The engine's settings; [`TrustSettings::default`] documents the defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrustSettings {
    pub half_life_ms: u64,
    pub corruption_weight: f64,
    pub latency_target_ms: f64,
    pub isolate_below: f64,
    pub probation_below: f64,
    pub recover_above: f64,
    pub release_after: u32,
    pub isolation_ms: u64,
    pub indirect_weight: f64,
    pub newcomer_weight: f64,
    /// Direct observations kept per report window.
    pub report_window_ms: u64,
}

impl Default for TrustSettings {
    /// Half-life 10 min; a corruption weighs 20 failures; latency target 500 ms; isolated below
    /// 0.3, probation below 0.6, recovered above 0.8; released from quarantine after 5 verified
    /// samples; isolation reviewed after 10 min; a report observation weighs 0.3 × the
    /// reporter's weight, 0.05 for unknown reporters; reports cover the last 10 min.
    fn default() -> Self {
        Self {
            half_life_ms: 600_000,
            corruption_weight: 20.0,
            latency_target_ms: 500.0,
            isolate_below: 0.3,
            probation_below: 0.6,
            recover_above: 0.8,
            release_after: 5,
            isolation_ms: 600_000,
            indirect_weight: 0.3,
            newcomer_weight: 0.05,
            report_window_ms: 600_000,
        }
    }
}

/// Decayed successes and failures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Beta {
    pub successes: f64,
    pub failures: f64,
    #[serde(skip)]
    at_ms: UnixMs,
}

impl Beta {
    fn decay(&mut self, now: UnixMs, half_life_ms: u64) {
        if self.at_ms != 0 && now > self.at_ms && half_life_ms > 0 {
            let k = 0.5_f64.powf((now - self.at_ms) as f64 / half_life_ms as f64);
            self.successes *= k;
            self.failures *= k;
        }
        self.at_ms = now;
    }

    fn add(&mut self, now: UnixMs, half_life_ms: u64, success: f64, failure: f64) {
        self.decay(now, half_life_ms);
        self.successes += success;
        self.failures += failure;
    }

    /// `(s + 1) / (s + f + 2)`.
    pub fn mean(&self) -> f64 {
        (self.successes + 1.0) / (self.successes + self.failures + 2.0)
    }
}

/// Where a provider stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    Trusted,
    Probation,
    /// A verified corruption, pending a confirming sample.
    Quarantined,
    Isolated,
}

/// One piece of evidence behind a decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evidence {
    pub at_ms: UnixMs,
    /// `sample` or `report`.
    pub kind: &'static str,
    /// Sample id, or the reporter's fingerprint and report sequence.
    pub id: String,
    pub detail: String,
}

/// A change of standing, with what caused it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub subject: Fingerprint,
    pub kind: DecisionKind,
    pub at_ms: UnixMs,
    pub evidence: Vec<Evidence>,
}

impl Decision {
    /// One line: the kind and the evidence.
    pub fn evidence_text(&self) -> String {
        let items: Vec<String> = self
            .evidence
            .iter()
            .map(|e| format!("{} {}: {}", e.kind, e.id, e.detail))
            .collect();
        items.join("; ")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "decision")]
pub enum DecisionKind {
    Quarantine,
    Isolate { dishonest: bool },
    Probation,
    Restore,
}

/// What `p2pcdn peers --json` shows of a provider.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assessment {
    pub standing: Standing,
    pub trust: f64,
    pub weight_factor: f64,
    pub integrity: Beta,
    pub availability: Beta,
    pub latency: Beta,
    pub direct_observations: u64,
    pub reporters: usize,
    /// Latest evidence first (at most 20).
    pub evidence: Vec<Evidence>,
    pub decisions: Vec<Decision>,
}

/// Direct observations within the report window.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    start_ms: UnixMs,
    samples: u64,
    mismatches: u64,
    unanswered: u64,
    in_sla: u64,
}

/// The latest report of one reporter about one subject.
#[derive(Debug, Clone)]
struct Heard {
    sequence: u64,
    samples: u64,
    mismatches: u64,
    unanswered: u64,
    in_sla: u64,
    score: f64,
}

#[derive(Debug, Clone)]
struct Peer {
    integrity: Beta,
    availability: Beta,
    latency: Beta,
    standing: Standing,
    since_ms: UnixMs,
    observations: u64,
    verified_since_quarantine: u32,
    /// The object (and slice) of the corruption that quarantined it, fetched again to confirm.
    confirm: Option<(String, Option<(u64, u64)>)>,
    window: Window,
    heard: HashMap<Fingerprint, Heard>,
    evidence: VecDeque<Evidence>,
    decisions: VecDeque<Decision>,
}

impl Peer {
    fn new(now: UnixMs) -> Self {
        Self {
            integrity: Beta::default(),
            availability: Beta::default(),
            latency: Beta::default(),
            standing: Standing::Trusted,
            since_ms: now,
            observations: 0,
            verified_since_quarantine: 0,
            confirm: None,
            window: Window {
                start_ms: now,
                ..Window::default()
            },
            heard: HashMap::new(),
            evidence: VecDeque::new(),
            decisions: VecDeque::new(),
        }
    }

    fn remember(&mut self, e: Evidence) {
        self.evidence.push_front(e);
        self.evidence.truncate(20);
    }
}

/// Why a report was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Invalid(#[from] proto::ProtoError),
    #[error("a report about its own reporter")]
    SelfReport,
    #[error("a report about this node")]
    AboutUs,
    #[error("sequence {got} is not newer than {had}")]
    Stale { got: u64, had: u64 },
    #[error("{0}")]
    Absurd(&'static str),
}

/// The engine of one node.
#[derive(Debug)]
pub struct TrustEngine {
    me: Fingerprint,
    settings: TrustSettings,
    pre_trusted: HashSet<Fingerprint>,
    peers: HashMap<Fingerprint, Peer>,
    /// Reports per reporter that contradicted our own observation.
    contradictions: HashMap<Fingerprint, u32>,
    /// Reports per reporter that agreed with our own observation.
    agreements: HashMap<Fingerprint, u32>,
    sequence: u64,
    pending: Vec<Decision>,
}

impl TrustEngine {
    pub fn new(
        me: Fingerprint,
        settings: TrustSettings,
        pre_trusted: HashSet<Fingerprint>,
    ) -> Self {
        Self {
            me,
            settings,
            pre_trusted,
            peers: HashMap::new(),
            contradictions: HashMap::new(),
            agreements: HashMap::new(),
            sequence: 0,
            pending: Vec::new(),
        }
    }

    fn peer(&mut self, subject: Fingerprint, now: UnixMs) -> &mut Peer {
        self.peers.entry(subject).or_insert_with(|| Peer::new(now))
    }

    /// A content sample of `sample.peer`.
    pub fn observe_sample(&mut self, sample: &Sample) {
        let s = self.settings;
        let now = sample.at_ms;
        let subject = sample.peer;
        let evidence = Evidence {
            at_ms: now,
            kind: "sample",
            id: sample.id.to_string(),
            detail: match &sample.verdict {
                Verdict::Verified => {
                    format!("{} verified in {:.0} ms", sample.path, sample.latency_ms)
                }
                Verdict::Corrupted(why) => format!("{} corrupted: {why}", sample.path),
                Verdict::Unavailable(why) => format!("{} unavailable: {why}", sample.path),
            },
        };
        let p = self.peer(subject, now);
        p.observations += 1;
        roll_window(&mut p.window, now, s.report_window_ms);
        p.window.samples += 1;
        let mut decision = None;
        match &sample.verdict {
            Verdict::Verified => {
                p.integrity.add(now, s.half_life_ms, 1.0, 0.0);
                p.availability.add(now, s.half_life_ms, 1.0, 0.0);
                let fast = sample.latency_ms <= s.latency_target_ms;
                p.latency.add(
                    now,
                    s.half_life_ms,
                    f64::from(u8::from(fast)),
                    f64::from(u8::from(!fast)),
                );
                if fast {
                    p.window.in_sla += 1;
                }
                if p.standing == Standing::Quarantined {
                    p.verified_since_quarantine += 1;
                    if p.verified_since_quarantine >= s.release_after {
                        decision = Some(DecisionKind::Probation);
                    }
                }
            }
            Verdict::Corrupted(_) => {
                p.integrity
                    .add(now, s.half_life_ms, 0.0, s.corruption_weight);
                p.availability.add(now, s.half_life_ms, 1.0, 0.0);
                p.window.mismatches += 1;
                decision = Some(match p.standing {
                    // Confirmed (or again, soon after a quarantine was released).
                    Standing::Quarantined | Standing::Isolated | Standing::Probation => {
                        DecisionKind::Isolate { dishonest: true }
                    }
                    Standing::Trusted => {
                        p.confirm = Some((sample.path.clone(), sample.range));
                        DecisionKind::Quarantine
                    }
                });
            }
            Verdict::Unavailable(_) => {
                p.availability.add(now, s.half_life_ms, 0.0, 1.0);
                p.window.unanswered += 1;
            }
        }
        p.remember(evidence);
        if let Some(kind) = decision {
            self.decide(subject, kind, now);
        }
    }

    fn decide(&mut self, subject: Fingerprint, kind: DecisionKind, now: UnixMs) {
        let p = self.peer(subject, now);
        let standing = match kind {
            DecisionKind::Quarantine => Standing::Quarantined,
            DecisionKind::Isolate { .. } => Standing::Isolated,
            DecisionKind::Probation => Standing::Probation,
            DecisionKind::Restore => Standing::Trusted,
        };
        if p.standing == standing {
            return;
        }
        p.standing = standing;
        p.since_ms = now;
        p.verified_since_quarantine = 0;
        let d = Decision {
            subject,
            kind,
            at_ms: now,
            evidence: p.evidence.iter().take(5).cloned().collect(),
        };
        p.decisions.push_front(d.clone());
        p.decisions.truncate(10);
        self.pending.push(d);
    }

    /// The trust of `subject` from what we saw and heard, in `[0, 1]`.
    pub fn trust(&self, subject: &Fingerprint, now: UnixMs) -> f64 {
        let Some(p) = self.peers.get(subject) else {
            return self.prior(subject);
        };
        let s = self.settings;
        let (mut integrity, mut availability, mut latency) =
            (p.integrity, p.availability, p.latency);
        for b in [&mut integrity, &mut availability, &mut latency] {
            b.decay(now, s.half_life_ms);
        }
        // Reporters we know nothing of share one newcomer's weight between them, however
        // many identities they are.
        let strangers = p
            .heard
            .keys()
            .filter(|r| self.is_stranger(r))
            .count()
            .max(1) as f64;
        for (reporter, h) in &p.heard {
            let mut w = self.reporter_weight(reporter, now) * s.indirect_weight;
            if self.is_stranger(reporter) {
                w /= strangers;
            }
            if w <= 0.0 || h.samples == 0 {
                continue;
            }
            // A report counts as at most REPORT_CAP observations, in its proportions: a
            // reporter cannot outvote direct observation by claiming many samples.
            let n = h.samples as f64;
            let scale = w * n.min(REPORT_CAP) / n;
            let answered = (h.samples - h.unanswered.min(h.samples)) as f64;
            let mismatches = h.mismatches as f64;
            integrity.successes += scale * (answered - mismatches).max(0.0);
            integrity.failures += scale * mismatches * s.corruption_weight;
            availability.successes += scale * answered;
            availability.failures += scale * h.unanswered as f64;
            latency.successes += scale * h.in_sla as f64;
            latency.failures += scale * (answered - h.in_sla as f64).max(0.0);
        }
        integrity.mean() * (0.5 + 0.5 * availability.mean()) * (0.75 + 0.25 * latency.mean())
    }

    /// Neither pre-trusted, nor observed by us, nor ever confirmed by our own observation.
    fn is_stranger(&self, reporter: &Fingerprint) -> bool {
        !self.pre_trusted.contains(reporter)
            && self.peers.get(reporter).is_none_or(|p| p.observations == 0)
            && !self.agreements.contains_key(reporter)
    }

    fn prior(&self, subject: &Fingerprint) -> f64 {
        if self.pre_trusted.contains(subject) {
            1.0
        } else {
            0.5
        }
    }

    /// How much a reporter's statements count: its trust from our direct observation (1 for
    /// the pre-trusted set, `newcomer_weight` when we have none), divided by 1 + its
    /// contradictions of our own observations.
    fn reporter_weight(&self, reporter: &Fingerprint, now: UnixMs) -> f64 {
        let base = if self.pre_trusted.contains(reporter) {
            1.0
        } else {
            match self.peers.get(reporter) {
                Some(p) if p.observations > 0 => {
                    let mut i = p.integrity;
                    i.decay(now, self.settings.half_life_ms);
                    i.mean()
                }
                _ => {
                    // A stranger earns credibility only where its reports matched what we
                    // saw ourselves (up to half a known peer's weight).
                    let agreed = f64::from(self.agreements.get(reporter).copied().unwrap_or(0));
                    self.settings.newcomer_weight + 0.5 * agreed / (agreed + 3.0)
                }
            }
        };
        base / (1.0 + f64::from(self.contradictions.get(reporter).copied().unwrap_or(0)))
    }

    /// The factor of `subject`'s Maglev weight, in `[0, 1]`.
    pub fn weight_factor(&self, subject: &Fingerprint, now: UnixMs) -> f64 {
        let Some(p) = self.peers.get(subject) else {
            return if self.pre_trusted.contains(subject) {
                1.0
            } else {
                0.5
            };
        };
        if matches!(p.standing, Standing::Quarantined | Standing::Isolated) {
            return 0.0;
        }
        let confidence = if self.pre_trusted.contains(subject) {
            1.0
        } else {
            let n = p.observations as f64;
            0.5 + 0.5 * n / (n + 5.0)
        };
        (self.trust(subject, now) * confidence).clamp(0.0, 1.0)
    }

    /// Standing changes of this control cycle (those taken on samples since the last call,
    /// and those the scores lead to now).
    pub fn tick(&mut self, now: UnixMs) -> Vec<Decision> {
        let s = self.settings;
        let subjects: Vec<Fingerprint> = self.peers.keys().copied().collect();
        for subject in subjects {
            let trust = self.trust(&subject, now);
            let Some(p) = self.peers.get(&subject) else {
                continue;
            };
            let (standing, since) = (p.standing, p.since_ms);
            let next = match standing {
                Standing::Isolated
                    if now.saturating_sub(since)
                        >= i64::try_from(s.isolation_ms).unwrap_or(i64::MAX) =>
                {
                    // Looked at again: half of what it earned is forgotten.
                    if let Some(p) = self.peers.get_mut(&subject) {
                        for b in [&mut p.integrity, &mut p.availability, &mut p.latency] {
                            b.successes /= 2.0;
                            b.failures /= 2.0;
                        }
                    }
                    Some(DecisionKind::Probation)
                }
                Standing::Trusted | Standing::Probation if trust < s.isolate_below => {
                    Some(DecisionKind::Isolate { dishonest: false })
                }
                Standing::Trusted if trust < s.probation_below => Some(DecisionKind::Probation),
                Standing::Probation if trust > s.recover_above => Some(DecisionKind::Restore),
                _ => None,
            };
            if let Some(kind) = next {
                self.decide(subject, kind, now);
            }
        }
        std::mem::take(&mut self.pending)
    }

    /// This node's reports: one per provider it observed within the window, direct
    /// observations only.
    pub fn reports(&mut self, now: UnixMs) -> Vec<pb::ReputationReport> {
        let window_ms = self.settings.report_window_ms;
        let mut subjects: Vec<Fingerprint> = self.peers.keys().copied().collect();
        subjects.sort();
        let mut out = Vec::new();
        for subject in subjects {
            let trust = self.trust(&subject, now);
            let Some(p) = self.peers.get_mut(&subject) else {
                continue;
            };
            roll_window(&mut p.window, now, window_ms);
            if p.window.samples == 0 {
                continue;
            }
            self.sequence += 1;
            out.push(pb::ReputationReport {
                reporter: self.me.0.to_vec(),
                subject: subject.0.to_vec(),
                samples: p.window.samples,
                mismatches: p.window.mismatches,
                unanswered: p.window.unanswered,
                answered_in_sla: p.window.in_sla,
                score_ppm: (trust * 1e6).round() as u32,
                window_start_ms: p.window.start_ms,
                window_end_ms: now,
                sequence: self.sequence,
                ..pb::ReputationReport::default()
            });
        }
        out
    }

    /// Verifies a signed report (its reporter's key from the reporter's advertisement) and
    /// takes it into account.
    pub fn ingest_report(
        &mut self,
        signed: &pb::SignedReputationReport,
        reporter_spki: &[u8],
        now: UnixMs,
    ) -> Result<(), ReportError> {
        let report = proto::open_reputation(signed, reporter_spki, now)?;
        let reporter = Fingerprint::from_slice(&report.reporter)
            .map_err(|_| ReportError::Absurd("reporter is not a node id"))?;
        let subject = Fingerprint::from_slice(&report.subject)
            .map_err(|_| ReportError::Absurd("subject is not a node id"))?;
        if reporter == subject {
            return Err(ReportError::SelfReport);
        }
        if subject == self.me {
            return Err(ReportError::AboutUs);
        }
        if report.mismatches > report.samples
            || report.unanswered > report.samples
            || report.answered_in_sla > report.samples
        {
            return Err(ReportError::Absurd("more outcomes than samples"));
        }
        if report.window_start_ms > report.window_end_ms {
            return Err(ReportError::Absurd("window ends before it starts"));
        }
        let score = f64::from(report.score_ppm.min(1_000_000)) / 1e6;
        // Contradiction: we observed the subject ourselves and the reporter's score is far
        // from ours.
        let ours = self
            .peers
            .get(&subject)
            .filter(|p| p.observations >= 3)
            .map(|_| self.trust(&subject, now));
        if let Some(h) = self
            .peers
            .get(&subject)
            .and_then(|p| p.heard.get(&reporter))
            && report.sequence <= h.sequence
        {
            return Err(ReportError::Stale {
                got: report.sequence,
                had: h.sequence,
            });
        }
        match ours {
            Some(ours) if (ours - score).abs() > 0.5 => {
                *self.contradictions.entry(reporter).or_insert(0) += 1;
            }
            Some(ours) if (ours - score).abs() < 0.2 => {
                *self.agreements.entry(reporter).or_insert(0) += 1;
            }
            _ => {}
        }
        let p = self.peer(subject, now);
        p.heard.insert(
            reporter,
            Heard {
                sequence: report.sequence,
                samples: report.samples,
                mismatches: report.mismatches,
                unanswered: report.unanswered,
                in_sla: report.answered_in_sla,
                score,
            },
        );
        p.remember(Evidence {
            at_ms: now,
            kind: "report",
            id: format!("{}#{}", reporter.short(), report.sequence),
            detail: format!(
                "{} samples, {} mismatches, {} unanswered, score {:.2}",
                report.samples, report.mismatches, report.unanswered, score
            ),
        });
        Ok(())
    }

    /// What operators see of `subject`.
    pub fn assessment(&self, subject: &Fingerprint, now: UnixMs) -> Option<Assessment> {
        let p = self.peers.get(subject)?;
        Some(Assessment {
            standing: p.standing,
            trust: self.trust(subject, now),
            weight_factor: self.weight_factor(subject, now),
            integrity: p.integrity,
            availability: p.availability,
            latency: p.latency,
            direct_observations: p.observations,
            reporters: p.heard.len(),
            evidence: p.evidence.iter().cloned().collect(),
            decisions: p.decisions.iter().cloned().collect(),
        })
    }

    /// What to sample to confirm `subject`'s quarantine: the object (and slice) that was
    /// corrupted.
    pub fn confirm_target(&self, subject: &Fingerprint) -> Option<(String, Option<(u64, u64)>)> {
        let p = self.peers.get(subject)?;
        (p.standing == Standing::Quarantined)
            .then(|| p.confirm.clone())
            .flatten()
    }

    /// Whether `subject` is excluded from negotiation now.
    pub fn excluded(&self, subject: &Fingerprint) -> bool {
        self.peers
            .get(subject)
            .is_some_and(|p| matches!(p.standing, Standing::Quarantined | Standing::Isolated))
    }

    /// The standing of `subject` (trusted when never observed).
    pub fn standing(&self, subject: &Fingerprint) -> Standing {
        self.peers
            .get(subject)
            .map_or(Standing::Trusted, |p| p.standing)
    }

    /// The score another node reported (for tests and views).
    pub fn heard_score(&self, subject: &Fingerprint, reporter: &Fingerprint) -> Option<f64> {
        self.peers
            .get(subject)?
            .heard
            .get(reporter)
            .map(|h| h.score)
    }
}

fn roll_window(w: &mut Window, now: UnixMs, window_ms: u64) {
    if now.saturating_sub(w.start_ms) > i64::try_from(window_ms).unwrap_or(i64::MAX) {
        *w = Window {
            start_ms: now,
            ..Window::default()
        };
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;
    use crate::identity::NodeIdentity;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint([n; 32])
    }

    fn sample(
        id: u64,
        peer: Fingerprint,
        at_ms: UnixMs,
        verdict: Verdict,
        latency_ms: f64,
    ) -> Sample {
        Sample {
            id,
            peer,
            url: "http://p/a".to_owned(),
            path: format!("/obj{id}"),
            range: None,
            verdict,
            latency_ms,
            bytes: 10,
            throughput_bytes_per_s: 1e6,
            at_ms,
        }
    }

    fn engine() -> TrustEngine {
        TrustEngine::new(fp(0), TrustSettings::default(), HashSet::from([fp(9)]))
    }

    #[test]
    fn a_corruption_quarantines_at_once_and_a_confirming_sample_isolates() {
        let mut e = engine();
        let p = fp(1);
        for i in 0..10 {
            e.observe_sample(&sample(i, p, 1_000 + i as i64, Verdict::Verified, 20.0));
        }
        assert!(e.weight_factor(&p, 2_000) > 0.5);
        e.observe_sample(&sample(
            11,
            p,
            2_000,
            Verdict::Corrupted("sha".into()),
            20.0,
        ));
        assert_eq!(e.weight_factor(&p, 2_000), 0.0, "quarantined at once");
        let d = e.tick(2_000);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].kind, DecisionKind::Quarantine);
        assert!(
            d[0].evidence_text().contains("/obj11 corrupted"),
            "{}",
            d[0].evidence_text()
        );
        assert!(e.excluded(&p));
        e.observe_sample(&sample(
            12,
            p,
            2_500,
            Verdict::Corrupted("sha".into()),
            20.0,
        ));
        let d = e.tick(2_500);
        assert_eq!(d[0].kind, DecisionKind::Isolate { dishonest: true });
        assert_eq!(e.standing(&p), Standing::Isolated);
    }

    #[test]
    fn a_quarantine_not_confirmed_is_released_to_probation() {
        let mut e = engine();
        let p = fp(1);
        e.observe_sample(&sample(1, p, 1_000, Verdict::Corrupted("sha".into()), 20.0));
        for i in 0..5 {
            e.observe_sample(&sample(2 + i, p, 1_100 + i as i64, Verdict::Verified, 20.0));
        }
        assert_eq!(e.standing(&p), Standing::Probation);
        assert!(e.weight_factor(&p, 2_000) > 0.0);
    }

    #[test]
    fn a_slow_answer_weighs_far_less_than_a_corruption() {
        let mut slow = engine();
        let mut bad = engine();
        let p = fp(1);
        for i in 0..10 {
            slow.observe_sample(&sample(i, p, 1_000, Verdict::Verified, 20.0));
            bad.observe_sample(&sample(i, p, 1_000, Verdict::Verified, 20.0));
        }
        slow.observe_sample(&sample(20, p, 1_000, Verdict::Verified, 5_000.0));
        assert_eq!(slow.standing(&p), Standing::Trusted);
        assert!(slow.trust(&p, 1_000) > 0.8, "{}", slow.trust(&p, 1_000));
        bad.observe_sample(&sample(20, p, 1_000, Verdict::Corrupted("x".into()), 20.0));
        assert!(bad.trust(&p, 1_000) < 0.5, "{}", bad.trust(&p, 1_000));
    }

    #[test]
    fn an_absent_provider_is_isolated_as_unreliable_not_dishonest_and_decay_forgets() {
        let mut e = engine();
        let p = fp(1);
        for i in 0..8 {
            e.observe_sample(&sample(
                i,
                p,
                1_000,
                Verdict::Unavailable("refused".into()),
                0.0,
            ));
        }
        let d = e.tick(1_000);
        assert!(
            d.iter()
                .any(|d| d.kind == DecisionKind::Isolate { dishonest: false }),
            "{d:?}"
        );
        // Reviewed after the isolation period, with half of the failures forgotten.
        let later = 1_000 + TrustSettings::default().isolation_ms as i64;
        let d = e.tick(later);
        assert_eq!(d[0].kind, DecisionKind::Probation);
        // Old failures decay: an hour later the same provider is far better thought of.
        let before = e.trust(&p, later);
        assert!(e.trust(&p, later + 3_600_000) > before);
    }

    fn signed_report(
        reporter: &NodeIdentity,
        subject: Fingerprint,
        samples: u64,
        mismatches: u64,
        score_ppm: u32,
        sequence: u64,
    ) -> pb::SignedReputationReport {
        proto::sign_reputation(
            reporter,
            &pb::ReputationReport {
                reporter: Vec::new(),
                subject: subject.0.to_vec(),
                samples,
                mismatches,
                unanswered: 0,
                answered_in_sla: samples - mismatches,
                score_ppm,
                window_start_ms: 1_000,
                window_end_ms: 2_000,
                sequence,
                ..pb::ReputationReport::default()
            },
        )
    }

    fn identity(name: &str) -> NodeIdentity {
        NodeIdentity::generate(name, "Test", &["localhost".to_owned()]).unwrap()
    }

    #[test]
    fn a_liar_cannot_get_an_honest_provider_isolated_and_loses_its_voice() {
        let liar = identity("liar");
        let mut e = engine();
        let honest = fp(1);
        for i in 0..10 {
            e.observe_sample(&sample(i, honest, 2_000, Verdict::Verified, 20.0));
        }
        e.ingest_report(
            &signed_report(&liar, honest, 100, 100, 0, 1),
            &liar.spki_der,
            2_000,
        )
        .unwrap();
        assert!(e.tick(2_000).is_empty(), "no decision on the liar's word");
        assert!(
            e.weight_factor(&honest, 2_000) > 0.5,
            "{}",
            e.weight_factor(&honest, 2_000)
        );
        assert!(
            e.reporter_weight(&liar.fingerprint, 2_000) < TrustSettings::default().newcomer_weight
        );
    }

    #[test]
    fn sybils_cannot_raise_a_bad_provider_but_a_pre_trusted_peer_is_heard() {
        let mut e = engine();
        let bad = fp(1);
        e.observe_sample(&sample(
            1,
            bad,
            2_000,
            Verdict::Unavailable("x".into()),
            0.0,
        ));
        e.observe_sample(&sample(
            2,
            bad,
            2_000,
            Verdict::Unavailable("x".into()),
            0.0,
        ));
        let before = e.trust(&bad, 2_000);
        for i in 0..20 {
            let sybil = identity(&format!("sybil{i}"));
            e.ingest_report(
                &signed_report(&sybil, bad, 50, 0, 1_000_000, 1),
                &sybil.spki_der,
                2_000,
            )
            .unwrap();
        }
        assert!(
            e.trust(&bad, 2_000) - before < 0.2,
            "{before} → {}",
            e.trust(&bad, 2_000)
        );

        // A long-term (pre-trusted) peer's report of corruption counts.
        let trusted = identity("lt");
        let mut e = TrustEngine::new(
            fp(0),
            TrustSettings::default(),
            HashSet::from([trusted.fingerprint]),
        );
        let subject = fp(2);
        e.ingest_report(
            &signed_report(&trusted, subject, 10, 3, 100_000, 1),
            &trusted.spki_der,
            2_000,
        )
        .unwrap();
        assert!(
            e.trust(&subject, 2_000) < 0.3,
            "{}",
            e.trust(&subject, 2_000)
        );
    }

    #[test]
    fn forged_stale_or_absurd_reports_are_refused() {
        let a = identity("a");
        let b = identity("b");
        let mut e = engine();
        let r = signed_report(&a, fp(1), 10, 0, 900_000, 5);
        assert!(
            matches!(
                e.ingest_report(&r, &b.spki_der, 2_000),
                Err(ReportError::Invalid(_))
            ),
            "wrong key"
        );
        let mut tampered = r.clone();
        if let Some(byte) = tampered.report.last_mut() {
            *byte ^= 1;
        }
        assert!(
            e.ingest_report(&tampered, &a.spki_der, 2_000).is_err(),
            "tampered bytes"
        );
        e.ingest_report(&r, &a.spki_der, 2_000).unwrap();
        assert!(matches!(
            e.ingest_report(&r, &a.spki_der, 2_000),
            Err(ReportError::Stale { .. })
        ));
        let own = signed_report(&a, a.fingerprint, 10, 0, 1, 6);
        assert!(
            e.ingest_report(&own, &a.spki_der, 2_000).is_err(),
            "about its own reporter"
        );
        let us = signed_report(&a, fp(0), 10, 0, 1, 7);
        assert!(matches!(
            e.ingest_report(&us, &a.spki_der, 2_000),
            Err(ReportError::AboutUs)
        ));
        let absurd = signed_report(&a, fp(1), 1, 0, 1, 8);
        let mut report = pb::ReputationReport::decode(absurd.report.as_slice()).unwrap();
        report.mismatches = 5;
        let absurd = proto::sign_reputation(&a, &report);
        assert!(e.ingest_report(&absurd, &a.spki_der, 2_000).is_err());
        let garbage = pb::SignedReputationReport {
            report: vec![0xff; 40],
            signature: vec![1; 64],
        };
        assert!(e.ingest_report(&garbage, &a.spki_der, 2_000).is_err());
    }

    #[test]
    fn reports_carry_direct_observations_only() {
        let mut e = engine();
        let other = identity("o");
        e.ingest_report(
            &signed_report(&other, fp(3), 10, 10, 0, 1),
            &other.spki_der,
            2_000,
        )
        .unwrap();
        e.observe_sample(&sample(1, fp(1), 2_000, Verdict::Verified, 20.0));
        e.observe_sample(&sample(
            2,
            fp(1),
            2_000,
            Verdict::Corrupted("x".into()),
            20.0,
        ));
        let reports = e.reports(2_100);
        assert_eq!(
            reports.len(),
            1,
            "nothing about fp(3), only heard of: {reports:?}"
        );
        assert_eq!((reports[0].samples, reports[0].mismatches), (2, 1));
        let again = e.reports(2_200);
        assert!(again[0].sequence > reports[0].sequence);
    }

    use prost::Message as _;
}
