//! Signed reputation reports: the checks a report passes before the engine uses it.
//!
//! A report travels as `pb::SignedReputationReport` (the report's bytes and an Ed25519
//! signature by the reporter's node key, domain `"p2pcdn.peering.v1.ReputationReport"`; see
//! [`crate::proto::sign_reputation`] and [`crate::proto::open_reputation`]). Before the
//! signature is verified — the expensive step — the bytes are bounded and decoded, and the
//! statement is checked for what no honest reporter would say; then [`proto::open_reputation`]
//! binds the reporter's key to its node id and verifies the signature. Every failure is a
//! [`ReportError`]; nothing on this path panics.

use std::{fmt, sync::Arc};

use prost::Message as _;
use serde::Serialize;

use crate::{
    model::{Fingerprint, UnixMs},
    proto::{self, ProtoError, pb},
};

/// Largest serialised report accepted (the board carries it base64-encoded in at most 4 KiB).
pub const MAX_REPORT_BYTES: usize = 2048;
/// Most mismatched paths a report may name.
pub const MAX_MISMATCHED_PATHS: usize = 4;
/// Longest mismatched path, characters.
pub const MAX_PATH_CHARS: usize = 256;
/// Largest count a report may state in any field (about 1,600 a second over a 10 min
/// window: more samples than any budget allows).
pub const MAX_REPORT_COUNT: u64 = 1_000_000;
/// Longest window a report may cover, ms (1 day).
pub const MAX_WINDOW_MS: i64 = 86_400_000;

/// Why a report was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("report of {size} bytes, at most {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("undecodable report: {reason}")]
    Decode { reason: String },
    #[error("{field} is {len} bytes, a node id is 32")]
    NodeId { field: &'static str, len: usize },
    #[error("the reporter reports on itself")]
    SelfReport,
    #[error("the window ends at {window_end_ms}, in the future (now {now_ms})")]
    FutureWindow {
        window_end_ms: UnixMs,
        now_ms: UnixMs,
    },
    #[error("the window starts ({window_start_ms}) after it ends ({window_end_ms})")]
    InvertedWindow {
        window_start_ms: UnixMs,
        window_end_ms: UnixMs,
    },
    #[error("a window of {len_ms} ms, at most {limit_ms}")]
    WindowTooLong { len_ms: i64, limit_ms: i64 },
    #[error("{field} = {value}: {why}")]
    Absurd {
        field: &'static str,
        value: u64,
        why: &'static str,
    },
    #[error("mismatched_paths: {why}")]
    BadEvidence { why: &'static str },
    #[error("forged report: {0}")]
    Forged(#[source] ProtoError),
    #[error("invalid report: {0}")]
    Invalid(#[source] ProtoError),
    #[error("a report of this node came back")]
    FromSelf,
    #[error("the window ended at {window_end_ms}, more than {max_age_ms} ms before {now_ms}")]
    Stale {
        window_end_ms: UnixMs,
        max_age_ms: i64,
        now_ms: UnixMs,
    },
    #[error("sequence {sequence} is not newer than {latest}")]
    Replayed { sequence: u64, latest: u64 },
    #[error("the reporter already reports on {limit} subjects")]
    TooManySubjects { limit: usize },
}

impl ReportError {
    /// A short stable name (metrics labels, the simulation's refusal counts).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Decode { .. } => "undecodable",
            Self::NodeId { .. } => "node_id",
            Self::SelfReport => "self_report",
            Self::FutureWindow { .. } => "future_window",
            Self::InvertedWindow { .. } => "inverted_window",
            Self::WindowTooLong { .. } => "window_too_long",
            Self::Absurd { .. } => "absurd_counts",
            Self::BadEvidence { .. } => "bad_evidence",
            Self::Forged(_) => "forged",
            Self::Invalid(_) => "invalid",
            Self::FromSelf => "from_self",
            Self::Stale { .. } => "stale",
            Self::Replayed { .. } => "replayed",
            Self::TooManySubjects { .. } => "too_many_subjects",
        }
    }
}

/// Which report: its reporter and sequence (evidence in decisions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ReportId {
    pub reporter: Fingerprint,
    pub sequence: u64,
}

impl fmt::Display for ReportId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.reporter.short(), self.sequence)
    }
}

/// A report whose shape was checked and whose signature verified. Only [`VerifiedReport::open`]
/// makes one, so holding one proves the checks ran; cloning it lets several engines (the
/// simulation's nodes) share one verification.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedReport {
    report: Arc<pb::ReputationReport>,
    reporter: Fingerprint,
    subject: Fingerprint,
}

impl VerifiedReport {
    /// Checks `signed` and verifies it with `reporter_spki`, the reporter's
    /// SubjectPublicKeyInfo (from its advertisement or certificate), whose SHA-256 must be
    /// the report's `reporter`.
    pub fn open(
        signed: &pb::SignedReputationReport,
        reporter_spki: &[u8],
        now: UnixMs,
    ) -> Result<Self, ReportError> {
        if signed.report.len() > MAX_REPORT_BYTES {
            return Err(ReportError::TooLarge {
                size: signed.report.len(),
                limit: MAX_REPORT_BYTES,
            });
        }
        let report = pb::ReputationReport::decode(signed.report.as_slice()).map_err(|e| {
            ReportError::Decode {
                reason: e.to_string(),
            }
        })?;
        let (reporter, subject) = check_shape(&report, now)?;
        let opened = proto::open_reputation(signed, reporter_spki, now).map_err(|e| match e {
            ProtoError::BadSignature { .. }
            | ProtoError::NodeIdMismatch { .. }
            | ProtoError::NotEd25519 => ReportError::Forged(e),
            other => ReportError::Invalid(other),
        })?;
        Ok(Self {
            report: Arc::new(opened),
            reporter,
            subject,
        })
    }

    pub fn report(&self) -> &pb::ReputationReport {
        &self.report
    }

    pub fn reporter(&self) -> Fingerprint {
        self.reporter
    }

    pub fn subject(&self) -> Fingerprint {
        self.subject
    }

    pub fn id(&self) -> ReportId {
        ReportId {
            reporter: self.reporter,
            sequence: self.report.sequence,
        }
    }

    pub(crate) fn into_report(self) -> Arc<pb::ReputationReport> {
        self.report
    }
}

/// Largest signed report on the wire (the report, its signature, framing).
pub const MAX_SIGNED_BYTES: usize = MAX_REPORT_BYTES + 128;

/// The wire bytes of a signed report: what the gossip board carries (base64-encoded).
pub fn encode_signed(signed: &pb::SignedReputationReport) -> Vec<u8> {
    signed.encode_to_vec()
}

/// Decodes the wire bytes of a signed report, at most [`MAX_SIGNED_BYTES`].
pub fn decode_signed(bytes: &[u8]) -> Result<pb::SignedReputationReport, ReportError> {
    if bytes.len() > MAX_SIGNED_BYTES {
        return Err(ReportError::TooLarge {
            size: bytes.len(),
            limit: MAX_SIGNED_BYTES,
        });
    }
    pb::SignedReputationReport::decode(bytes).map_err(|e| ReportError::Decode {
        reason: e.to_string(),
    })
}

/// The reporter a signed report claims (not yet verified): whose key to verify it with.
pub fn claimed_reporter(signed: &pb::SignedReputationReport) -> Result<Fingerprint, ReportError> {
    if signed.report.len() > MAX_REPORT_BYTES {
        return Err(ReportError::TooLarge {
            size: signed.report.len(),
            limit: MAX_REPORT_BYTES,
        });
    }
    let report = pb::ReputationReport::decode(signed.report.as_slice()).map_err(|e| {
        ReportError::Decode {
            reason: e.to_string(),
        }
    })?;
    Fingerprint::from_slice(&report.reporter).map_err(|_| ReportError::NodeId {
        field: "reporter",
        len: report.reporter.len(),
    })
}

/// What no honest reporter would state; checked before the signature.
pub fn check_shape(
    r: &pb::ReputationReport,
    now: UnixMs,
) -> Result<(Fingerprint, Fingerprint), ReportError> {
    let reporter = Fingerprint::from_slice(&r.reporter).map_err(|_| ReportError::NodeId {
        field: "reporter",
        len: r.reporter.len(),
    })?;
    let subject = Fingerprint::from_slice(&r.subject).map_err(|_| ReportError::NodeId {
        field: "subject",
        len: r.subject.len(),
    })?;
    if reporter == subject {
        return Err(ReportError::SelfReport);
    }
    if r.window_start_ms > r.window_end_ms {
        return Err(ReportError::InvertedWindow {
            window_start_ms: r.window_start_ms,
            window_end_ms: r.window_end_ms,
        });
    }
    if r.window_end_ms > now.saturating_add(proto::MAX_CLOCK_SKEW_MS) {
        return Err(ReportError::FutureWindow {
            window_end_ms: r.window_end_ms,
            now_ms: now,
        });
    }
    let len_ms = r.window_end_ms.saturating_sub(r.window_start_ms);
    if len_ms > MAX_WINDOW_MS {
        return Err(ReportError::WindowTooLong {
            len_ms,
            limit_ms: MAX_WINDOW_MS,
        });
    }
    let counts = [
        ("samples", r.samples),
        ("mismatches", r.mismatches),
        ("unanswered", r.unanswered),
        ("answered_in_sla", r.answered_in_sla),
        ("answered_slow", r.answered_slow),
        ("capacity_checks", r.capacity_checks),
        ("capacity_shortfalls", r.capacity_shortfalls),
        ("confirmed_mismatches", r.confirmed_mismatches),
    ];
    for (field, value) in counts {
        if value > MAX_REPORT_COUNT {
            return Err(ReportError::Absurd {
                field,
                value,
                why: "more than any sampling budget allows",
            });
        }
    }
    let parts = [
        ("mismatches", r.mismatches, r.samples, "more than samples"),
        (
            "confirmed_mismatches",
            r.confirmed_mismatches,
            r.mismatches,
            "more than mismatches",
        ),
        (
            "capacity_shortfalls",
            r.capacity_shortfalls,
            r.capacity_checks,
            "more than capacity_checks",
        ),
    ];
    for (field, value, whole, why) in parts {
        if value > whole {
            return Err(ReportError::Absurd { field, value, why });
        }
    }
    if r.score_ppm > 1_000_000 {
        return Err(ReportError::Absurd {
            field: "score_ppm",
            value: u64::from(r.score_ppm),
            why: "more than 1000000",
        });
    }
    if r.mismatched_paths.len() > MAX_MISMATCHED_PATHS {
        return Err(ReportError::BadEvidence {
            why: "more than 4 paths",
        });
    }
    if r.mismatched_paths.len() as u64 > r.mismatches {
        return Err(ReportError::BadEvidence {
            why: "more paths than mismatches",
        });
    }
    for path in &r.mismatched_paths {
        if !path.starts_with('/') || path.chars().count() > MAX_PATH_CHARS {
            return Err(ReportError::BadEvidence {
                why: "a path is not absolute or longer than 256 characters",
            });
        }
    }
    Ok((reporter, subject))
}
